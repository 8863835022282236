//! Upstream side: reaching a target. `dial` is the leaf (one attempt, errno
//! classification), refusing targets that are the proxy itself
//! (`loop_guard`) and sharing host-name lookups (`resolve`); `health`
//! tracks each target from probes and failed connects; `balancer` picks a
//! target; `connect` fails over between them.

pub mod balancer;
pub mod connect;
pub mod dial;
pub mod health;
pub mod loop_guard;
pub mod probe;
pub mod proxy_protocol;
mod resolve;
pub mod rotation;
pub mod stats;

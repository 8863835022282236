//! Upstream side: reaching a target. `dial` is the leaf (one attempt, errno
//! classification); `health` tracks each target from probes and failed
//! connects; `balancer` picks a target; `connect` fails over between them.

pub mod balancer;
pub mod connect;
pub mod dial;
pub mod health;
pub mod proxy_protocol;
pub mod stats;

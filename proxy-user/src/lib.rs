//! Layer-4 TCP proxy: control plane (config, balancing, health, failover,
//! limits, lifecycle) and data planes (userspace copy, splice(2), kernel
//! fastpath).
//!
//! - `config`: the app table (parse, validate, watch the file);
//! - `edge`: accept, admit, one record per connection;
//! - `upstream`: dial, health, balance, fail over;
//! - `dataplane`: how the bytes move once both sockets are connected;
//! - `ops`: metrics, admin endpoints, access log, logging (every component
//!   registers its own series, `metric` helps);
//! - `server`: wires them together, reloads, drains;
//! - `gate`: a future polled only when it woke (a connection's timers).

// The data planes return `impl Future` from a fn whose body is one async
// block over its arguments, on purpose: an async fn keeps its arguments
// and the block's captures both, for every connection's life (NOTES §2,
// "Memory per idle connection"). Clippy's suggestion would undo that.
#![allow(clippy::manual_async_fn)]

mod bpf;
pub mod cli;
mod config;
mod dataplane;
mod edge;
mod gate;
mod metric;
mod ops;
pub use ops::logging;
pub mod server;
mod upstream;

//! Operating the proxy: metrics, readiness, the admin listener, the access
//! log, logs.

pub mod access_log;
pub mod admin;
mod labels;
pub mod logging;
pub mod metrics;
mod process;
pub use process::pid;
pub mod readiness;
pub mod sd_notify;

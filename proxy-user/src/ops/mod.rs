//! Operating the proxy: metrics, the admin listener, the access log, logs.

pub mod access_log;
pub mod admin;
pub mod logging;
pub mod metrics;

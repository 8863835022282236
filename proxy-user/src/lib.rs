//! Layer-4 TCP proxy: control plane (config, balancing, health, failover,
//! limits, lifecycle) and data planes (userspace copy, kernel fastpath).

pub mod access_log;
pub mod admin;
pub mod balancer;
pub mod cli;
pub mod config;
pub mod config_watch;
pub mod connect;
pub mod dataplane;
pub mod health;
pub mod lifecycle;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod proxy_protocol;
pub mod run;
pub mod steering;

//! Helpers for the hot-reload and sk_lookup steering tests: the proxy
//! started on a config written as is (port ranges included), on a loopback
//! address of its own, so steered ranges never catch other tests' traffic.
#![allow(dead_code)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{write_temp, Proxy, PROXY};

/// A random 127.0.0.x (x in 2..=254) per call, distinct within one test binary.
pub fn loopback_ip() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let base = (std::process::id() as usize * 7 + fastrand::usize(..253)) % 253;
    format!("127.0.0.{}", 2 + (base + n * 37) % 253)
}

/// A first port for a test's ranges: below the ephemeral range (32768+),
/// so no client port is ever steered, with room for 20,000 ports above it.
pub fn base_port() -> u16 {
    10_000 + fastrand::u16(..10_000)
}

/// Spawns the proxy on `config` (JSON text) with `args`; waits for "proxy ready".
pub async fn spawn_proxy(config: &str, args: &[&str]) -> Proxy {
    match try_spawn_proxy(config, args).await {
        Ok(proxy) => proxy,
        Err(log) => panic!("proxy exited before ready; log:\n{log}"),
    }
}

/// Like `spawn_proxy`; `Err(log)` when the proxy exits before "proxy ready".
pub async fn try_spawn_proxy(config: &str, args: &[&str]) -> Result<Proxy, String> {
    try_spawn_proxy_with(config, args, |_| {}).await
}

/// `try_spawn_proxy`, with `setup` applied to the command first (to drop
/// capabilities, say).
pub async fn try_spawn_proxy_with(
    config: &str,
    args: &[&str],
    setup: impl FnOnce(&mut Command),
) -> Result<Proxy, String> {
    let config_path = write_temp("config.json", config);
    let log_path = write_temp("proxy.log", "");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(PROXY);
    setup(&mut cmd);
    let child = cmd
        .arg("--config")
        .arg(&config_path)
        .args([
            "--log-format",
            "json",
            "--log-level",
            "info,proxy_user=debug",
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn proxy");
    let mode = args
        .iter()
        .position(|a| *a == "--mode")
        .and_then(|i| args.get(i + 1))
        .unwrap_or(&"auto");
    let mut proxy = Proxy::from_child(child, log_path, config_path, mode);
    proxy.wait_ready().await?;
    Ok(proxy)
}

/// Replaces the config file the way editors do: write a temp file, rename over.
pub fn replace_config(proxy: &Proxy, text: &str) {
    let tmp = proxy.config_path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &proxy.config_path).unwrap();
}

/// Waits until `needle` occurs at least `count` times in the log.
pub async fn wait_log(proxy: &Proxy, needle: &str, count: usize, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while proxy.log().matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "fewer than {count} {needle:?} in log:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The identify backend's id seen through `addr`.
pub async fn id_at(addr: &str) -> std::io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    crate::common::read_id(&mut s).await
}

/// Polls `addr` until it answers `want`; returns how long that took.
pub async fn time_until_id(addr: &str, want: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(id) = id_at(addr).await {
            if id == want {
                return started.elapsed();
            }
        }
        assert!(
            started.elapsed() < limit,
            "{addr} did not answer {want:?} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

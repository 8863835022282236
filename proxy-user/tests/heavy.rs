//! Bulk and concurrency tests. Kept in their own test binary: cargo runs
//! test binaries one after another, so these never overlap with each other's
//! peak load beyond the two tests here.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Instant;

use common::*;

planes!(one_gib_both_ways, thousand_concurrent_connections);

/// 1 GiB through the proxy to an echo target and back, streamed and hashed
/// on the fly: SHA-256 of what came back must equal what was sent.
async fn one_gib_both_ways(mode: &str) {
    let echo = Backend::echo("echo").await;
    let proxy = Proxy::start(mode, &[AppSpec::new("bulk", 1, vec![echo.target()])], &[]).await;
    let len = 1u64 << 30;
    let s = tokio::net::TcpStream::connect(proxy.addr(0, 0))
        .await
        .unwrap();
    let_the_fastpath_install().await;
    let started = Instant::now();
    bounded(400, "1 GiB echo", echo_check_stream(s, 42, len))
        .await
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "1 GiB each way in {secs:.1}s ({:.0} MiB/s per direction)",
        1024.0 / secs
    );
    let lines = proxy.wait_conn_lines(1, 10).await;
    assert_eq!(lines[0]["bytes_in"], len);
    assert_eq!(lines[0]["bytes_out"], len);
    assert_eq!(lines[0]["end"], "closed");
    assert_eq!(lines[0]["plane"], unpromoted_plane(mode), "{}", lines[0]);
}

/// 1,000 connections open at once, each with its own SHA-checked payload.
async fn thousand_concurrent_connections(mode: &str) {
    let echo = Backend::echo("echo").await;
    let echo2 = Backend::echo("echo2").await;
    let proxy = Proxy::start(
        mode,
        &[AppSpec::new("many", 2, vec![echo.target(), echo2.target()])],
        &[],
    )
    .await;
    let n = 1000;
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let addr = proxy.addr(0, i % 2);
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            // All 1,000 are connected before any sends: truly concurrent.
            barrier.wait().await;
            echo_check_stream(s, i as u64, 64 * 1024 + i as u64).await
        }));
    }
    let failures = bounded(180, "1000 concurrent", async {
        let mut f = Vec::new();
        for t in tasks {
            if let Err(e) = t.await.unwrap() {
                f.push(e);
            }
        }
        f
    })
    .await;
    assert!(
        failures.is_empty(),
        "{} failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    let lines = proxy.wait_conn_lines(n, 20).await;
    assert_eq!(lines.len(), n);
    assert!(lines.iter().all(|l| l["end"] == "closed"));
}

//! SIGTERM drain, drain timeout, second signal.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

planes!(
    sigterm_drains_live_transfer,
    drain_timeout_cuts_the_rest,
    second_signal_exits_at_once
);

/// SIGTERM mid-transfer: listeners close at once, the live transfer runs to
/// completion (SHA both ways), then the proxy exits 0.
async fn sigterm_drains_live_transfer(mode: &str) {
    let echo = Backend::echo("echo").await;
    let mut proxy = Proxy::spawn(mode, &[AppSpec::new("a", 1, vec![echo.target()])], &[]).await;
    let addr = proxy.addr(0, 0);
    bounded(60, "drain", async {
        let s = TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let len: u64 = 24 << 20;
        // Paced sender: ~1.5 s of traffic, so the signal lands mid-transfer.
        let sender = tokio::spawn(async move {
            let mut p = Payload::new(9, len);
            let mut h = StreamHasher::new(len);
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = p.fill(&mut buf);
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]).await;
                w.write_all(&buf[..n]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            w.shutdown().await.unwrap();
            h.finish().await
        });
        let receiver = tokio::spawn(async move { recv_hash(&mut r, len).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            !sender.is_finished(),
            "transfer ended before the signal; make it longer"
        );
        proxy.signal(libc::SIGTERM);
        // New connections are refused promptly.
        let t = Instant::now();
        loop {
            match TcpStream::connect(addr).await {
                Err(_) => break,
                Ok(_) if t.elapsed() < Duration::from_secs(2) => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Ok(_) => panic!("still accepting 2s after SIGTERM"),
            }
        }
        let sent = sender.await.unwrap();
        let (got, got_sha) = receiver.await.unwrap();
        assert_eq!(got, len);
        assert_eq!(sha_hex(&got_sha), sha_hex(&sent));
        let status = proxy
            .wait_exit(10)
            .await
            .expect("proxy exits after the drain");
        assert!(status.success(), "exit status {status:?}");
    })
    .await;
    let log = proxy.log();
    assert!(log.contains("drained"), "{log}");
    // The transfer's line (the probes of "refused promptly" that got in
    // before the listener closed have theirs too).
    let lines = proxy.conn_lines();
    let transfer: Vec<_> = lines.iter().filter(|l| l["bytes_in"] == 24 << 20).collect();
    assert_eq!(transfer.len(), 1, "{log}");
    assert_eq!(transfer[0]["end"], "closed");
    assert_eq!(
        transfer[0]["plane"],
        unpromoted_plane(mode),
        "{}",
        transfer[0]
    );
}

/// Connections still open at --drain-timeout are cut; the proxy exits 0.
async fn drain_timeout_cuts_the_rest(mode: &str) {
    let echo = Backend::echo("echo").await;
    let mut proxy = Proxy::spawn(
        mode,
        &[AppSpec::new("a", 1, vec![echo.target()])],
        &["--drain-timeout", "500ms"],
    )
    .await;
    bounded(30, "drain timeout", async {
        let mut s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        s.write_all(b"hi").await.unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.unwrap();
        // The drain deadline then cuts a pair the kernel carries.
        let_the_fastpath_install().await;
        let t = Instant::now();
        proxy.signal(libc::SIGTERM);
        let status = proxy.wait_exit(10).await.expect("exits");
        assert!(status.success(), "{status:?}");
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_secs(4),
            "{took:?}"
        );
        // The idle client learns its connection was cut.
        expect_reset(&mut s).await;
    })
    .await;
    let lines = proxy.conn_lines();
    assert_eq!(lines.len(), 1, "{}", proxy.log());
    assert_eq!(lines[0]["end"], "drain_timeout");
    assert_eq!(lines[0]["plane"], unpromoted_plane(mode), "{}", lines[0]);
}

/// A second SIGTERM/SIGINT during the drain exits immediately.
async fn second_signal_exits_at_once(mode: &str) {
    let echo = Backend::echo("echo").await;
    let mut proxy = Proxy::spawn(mode, &[AppSpec::new("a", 1, vec![echo.target()])], &[]).await;
    bounded(30, "second signal", async {
        let _held = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        proxy.signal(libc::SIGTERM);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            proxy.is_running(),
            "first signal must drain (30 s default), not exit"
        );
        let t = Instant::now();
        proxy.signal(libc::SIGINT);
        let status = proxy.wait_exit(5).await.expect("exits on second signal");
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(!status.success());
    })
    .await;
}

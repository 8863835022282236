//! `proxy_bytes_total` moves while a connection is open, on every plane
//! (the fastpath included), within the flush interval, and the close adds
//! only the rest: each byte is counted once.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::seq::{SeqCheck, SeqGen};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

planes!(bytes_count_while_the_connection_is_open);

const FLUSH_MS: u64 = 200;

async fn bytes(admin: &str) -> (f64, f64) {
    let (_, text) = http_get(admin, "/metrics").await.unwrap();
    (
        metric(
            &text,
            r#"proxy_bytes_total{app="live",direction="client_to_target"}"#,
        ),
        metric(
            &text,
            r#"proxy_bytes_total{app="live",direction="target_to_client"}"#,
        ),
    )
}

async fn bytes_count_while_the_connection_is_open(mode: &str) {
    let echo = Backend::echo("echo").await;
    let flush = format!("{FLUSH_MS}ms");
    let proxy = Proxy::start(
        mode,
        &[AppSpec::new("live", 1, vec![echo.target()])],
        &[
            "--admin-address",
            "127.0.0.1:0",
            "--bytes-flush-interval",
            &flush,
        ],
    )
    .await;
    let admin = admin_addr(&proxy);
    bounded(30, "live bytes", async {
        let len = 1u64 << 20;
        let mut s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        let mut data = vec![0u8; len as usize];
        SeqGen::new(0x11 << 41, len).fill(&mut data);
        let (mut r, mut w) = s.split();
        let mut back = vec![0u8; len as usize];
        // A first message and its echo, then a pause: a fastpath pair is
        // installed by then, so the kernel carries the rest and its count
        // is the one under test (sent at once, the whole MiB went by the
        // copy before the install).
        const FIRST: usize = 4096;
        w.write_all(&data[..FIRST]).await.unwrap();
        r.read_exact(&mut back[..FIRST]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (sent, got) = tokio::join!(
            w.write_all(&data[FIRST..]),
            r.read_exact(&mut back[FIRST..])
        );
        sent.unwrap();
        got.unwrap();
        let mut check = SeqCheck::new(0x11 << 41);
        check.feed(&back);
        check.finish(len).expect("the echo");
        // Every byte is through both ways; the counter must show it within
        // a flush interval (and a little for the scrape).
        let echoed = Instant::now();
        let within = Duration::from_millis(2 * FLUSH_MS + 800);
        loop {
            let (c2t, t2c) = bytes(&admin).await;
            assert!(
                c2t <= len as f64 && t2c <= len as f64,
                "overcounted: {c2t} {t2c}"
            );
            if c2t == len as f64 && t2c == len as f64 {
                break;
            }
            assert!(
                echoed.elapsed() < within,
                "after {:?} on an open connection: {c2t} and {t2c} of {len} bytes counted",
                echoed.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Closing adds nothing more: counted once.
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let lines = proxy.wait_conn_lines(1, 10).await;
        assert_eq!(bytes(&admin).await, (len as f64, len as f64));
        if mode == "fastpath" {
            let user = lines[0]["userspace_bytes"]
                .as_u64()
                .expect("userspace_bytes");
            assert!(
                user < len,
                "userspace moved {user} of {} bytes: the kernel's count went untested",
                2 * len
            );
        }
    })
    .await;
}

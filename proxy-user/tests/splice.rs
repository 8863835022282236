//! What only the splice(2) plane must prove: that it really moves bytes
//! through pipes (a silent fall back to the copy pump would pass every
//! data-path test), that an idle connection holds no pipe, and that closing
//! a connection releases its pipes. The data-path semantics themselves
//! (half-close, resets, 1 GiB, slow readers) run for this plane through
//! `planes!` in the other test files.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn splice_pipes_per_spoken_direction_and_none_left_after_close() {
    let echo = Backend::echo("echo").await;
    let proxy = Proxy::spawn("splice", &[AppSpec::new("a", 1, vec![echo.target()])], &[]).await;
    let pid = proxy.pid();
    let base = pipe_fds(pid);

    bounded(30, "pipe accounting", async {
        // Connected but silent: no direction has spoken, so no pipe.
        let mut quiet = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        let mut talking = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        // Both directions of `talking` speak (the echo answers).
        talking.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        talking.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
        // Two directions, two ends each.
        wait_for_pipes(pid, base + 4).await;

        // The quiet one speaks: its two directions get theirs.
        quiet.write_all(b"pong").await.unwrap();
        quiet.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"pong");
        wait_for_pipes(pid, base + 8).await;

        drop(quiet);
        drop(talking);
        wait_for_pipes(pid, base).await;
    })
    .await;

    let lines = proxy.wait_conn_lines(2, 10).await;
    for line in &lines {
        assert_eq!(line["plane"], "splice", "{line}");
        assert_eq!(line["userspace_bytes"], 8, "{line}");
    }
    assert!(
        !proxy.log().contains("cannot create a splice pipe"),
        "no direction may have fallen back to the copy pump"
    );
}

/// Waits up to 5 s for the proxy to hold exactly `want` pipe fds.
async fn wait_for_pipes(pid: i32, want: usize) {
    let mut have = pipe_fds(pid);
    for _ in 0..100 {
        if have == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        have = pipe_fds(pid);
    }
    panic!("proxy holds {have} pipe fds, expected {want}");
}

fn pipe_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

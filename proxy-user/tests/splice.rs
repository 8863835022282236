//! What only the splice(2) plane must prove: that it really moves bulk
//! bytes through pipes (a silent fall back to the copy pump would pass every
//! data-path test), that small messages take no pipe, and that an idle
//! connection holds none (pipes go back to per-thread shelves). The data-path semantics themselves
//! (half-close, resets, 1 GiB, slow readers) run for this plane through
//! `planes!` in the other test files.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bulk bursts a direction makes; each is a connection kept open (idle)
/// afterwards. If an idle connection kept its pipes, the proxy would hold
/// 4 pipe fds per burst; with the per-thread shelves it holds at most
/// `shelved_max`, however many bursts there were.
const BURSTS: usize = 10;
/// Pipe fds the shelves may keep: at most two pipes (one per direction in
/// flight) per thread of the proxy, two fds each. Counted from the running
/// proxy, so a machine with more cores (one tokio worker each) does not make
/// the bound too tight; 10 idle connections holding their pipes would still
/// be 40 fds, over it on any machine with fewer than 10 threads.
fn shelved_max(pid: i32) -> usize {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    threads * 2 * 2
}
const BURST: usize = 4 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_messages_take_no_pipe_bulk_takes_one_and_idle_holds_none() {
    let echo = Backend::echo("echo").await;
    let proxy = Proxy::spawn("splice", &[AppSpec::new("a", 1, vec![echo.target()])], &[]).await;
    let pid = proxy.pid();
    let base = pipe_fds(pid);

    bounded(60, "pipe accounting", async {
        // Small messages both ways go through a read and a write: no pipe.
        let mut quiet = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        let mut talking = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        for round in 0..20u32 {
            talking.write_all(&round.to_be_bytes()).await.unwrap();
            let mut back = [0u8; 4];
            talking.read_exact(&mut back).await.unwrap();
            assert_eq!(u32::from_be_bytes(back), round);
        }
        assert_eq!(pipe_fds(pid), base, "small messages must not take a pipe");

        // A bulk burst the client does not read back yet: the echo stalls,
        // so the proxy's directions stall mid-burst, holding their pipes.
        // That is the proof the bytes go through pipes (zero-copy), not a
        // silent copy fallback.
        let mut bulk = Vec::new();
        for i in 0..BURSTS {
            let s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
            let (mut r, mut w) = s.into_split();
            let seed = i as u64 * BURST as u64;
            let writer = tokio::spawn(async move {
                w.write_all(&sequence(seed, BURST)).await.unwrap();
                w
            });
            if i == 0 {
                wait_until(
                    || pipe_fds(pid) >= base + 2,
                    "a stalled bulk burst to hold a pipe",
                )
                .await;
            }
            let mut back = vec![0u8; BURST];
            r.read_exact(&mut back).await.unwrap();
            assert!(back == sequence(seed, BURST), "burst {i} came back changed");
            bulk.push((r, writer.await.unwrap()));
        }
        // Every bulk connection is open and idle now: none holds a pipe.
        let held = pipe_fds(pid) - base;
        assert!(
            held <= shelved_max(pid),
            "{BURSTS} idle connections after a burst each: the proxy holds {held} pipe fds, \
             more than the shelves keep ({}): idle connections hold pipes",
            shelved_max(pid)
        );

        // The quiet one speaks after all: still no pipe of its own needed.
        quiet.write_all(b"pong").await.unwrap();
        let mut back = [0u8; 4];
        quiet.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"pong");
        drop((quiet, talking, bulk));
    })
    .await;

    let lines = proxy.wait_conn_lines(2 + BURSTS, 10).await;
    for line in &lines {
        assert_eq!(line["plane"], "splice", "{line}");
    }
    assert!(
        !proxy.log().contains("cannot create a splice pipe"),
        "no direction may have fallen back to the copy pump"
    );
}

/// `len` bytes of big-endian u64 counters from `seed`: a replayed,
/// dropped or reordered chunk cannot compare equal.
fn sequence(seed: u64, len: usize) -> Vec<u8> {
    (seed..).flat_map(u64::to_be_bytes).take(len).collect()
}

async fn wait_until(cond: impl Fn() -> bool, what: &str) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("waited 5 s for {what}");
}

fn pipe_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

//! Kernel memory per slow reader stays bounded by `--socket-buffer`: 1,000
//! clients read at 100 KB/s while their targets send as fast as they can.
//! Through the real binary, on the userspace planes (the fastpath's bound is
//! its in-flight limit on top, see `fastpath.rs`).

#[macro_use]
mod common;

use std::time::Duration;

use common::seq::{SeqCheck, SeqGen};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

macro_rules! userspace_planes {
    ($($name:ident),* $(,)?) => {
        plane_mod!(copy, "copy", $($name),*);
        plane_mod!(splice, "splice", $($name),*);
    };
}

userspace_planes!(
    thousand_slow_readers_stay_within_the_bound,
    fifty_slow_readers_stay_within_the_bound,
);

const LEN: u64 = 8 << 20;
/// What one slow reader may cost in kernel memory on the proxy's sockets at
/// the default `--socket-buffer 256KiB`: its socket to the reader and its
/// socket from the target hold at most 512 KiB each (the kernel doubles the
/// size), 1 MiB in all, plus skb overhead. Measured up to 1,030 KiB (copy)
/// and 979 KiB (splice) on a quiet machine, less when senders are starved
/// of CPU. With kernel autotuning (`--socket-buffer 0`, the behaviour before
/// the flag) it grows until the machine-wide TCP memory limit stops it:
/// 4.1 MiB (copy) and 4.9 MiB (splice) each with 50 readers, which the
/// 50-reader case catches; 1.25 MiB each with 1,000, when that limit (2.2 GB
/// here) already held every TCP socket on the machine back.
const BOUND_PER_READER: u64 = 5 << 18; // 1.25 MiB
/// Streams read to the end and checked byte for byte after the slow phase.
const CHECKED: usize = 10;
/// How long every reader reads at 100 KB/s.
const SLOW_PHASE: Duration = Duration::from_secs(8);
/// The targets' write size.
const CHUNK: usize = 64 * 1024;

/// Reads `s` at about 100 KB/s for `slow`, then as fast as it can; returns
/// the byte count and what the sequence check found. Each connection's
/// stream has its own tag, its first word (the sender numbers them), so
/// bytes that crossed from another connection fail the check even at the
/// same offset.
async fn slow_then_fast(
    mut s: TcpStream,
    slow: Duration,
) -> std::io::Result<(u64, Result<(), String>)> {
    let mut head = [0u8; 8];
    s.read_exact(&mut head).await?;
    let mut check = SeqCheck::new(u64::from_le_bytes(head));
    check.feed(&head);
    let mut buf = vec![0u8; 64 * 1024];
    let start = std::time::Instant::now();
    loop {
        let slow_now = start.elapsed() < slow;
        let want = if slow_now { 10 << 10 } else { buf.len() };
        let n = s.read(&mut buf[..want]).await?;
        if n == 0 {
            return Ok((check.received(), check.finish(LEN)));
        }
        check.feed(&buf[..n]);
        if slow_now {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn thousand_slow_readers_stay_within_the_bound(mode: &str) {
    slow_readers_stay_within_the_bound(mode, 1_000).await;
}

async fn fifty_slow_readers_stay_within_the_bound(mode: &str) {
    slow_readers_stay_within_the_bound(mode, 50).await;
}

async fn slow_readers_stay_within_the_bound(mode: &str, readers: usize) {
    // The planes take turns: two floods at once starve each other's senders
    // and fill nothing.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _alone = ONE_AT_A_TIME.lock().await;
    // Sends as fast as the proxy takes it: a sequence-numbered stream
    // tagged per connection.
    static TAGS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let sender = Backend::with("sender", |mut s: TcpStream| async move {
        let n = TAGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut p = SeqGen::new((n + 1) << 41, LEN);
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = p.fill(&mut buf);
            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = s.shutdown().await;
    })
    .await;
    let proxy = Proxy::spawn(mode, &[AppSpec::new("a", 1, vec![sender.target()])], &[]).await;
    let pid = proxy.pid();
    let grew = bounded(180, "slow readers", async {
        let mut streams = Vec::with_capacity(readers);
        for i in 0..readers {
            let s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
            // The checked ones read slowly, then to the end; the rest slowly
            // until they are dropped.
            let slow = if i < CHECKED {
                SLOW_PHASE
            } else {
                Duration::MAX
            };
            streams.push(tokio::spawn(slow_then_fast(s, slow)));
        }
        // While every reader is slow, the senders fill whatever the proxy lets them.
        let mut most = 0;
        let start = std::time::Instant::now();
        while start.elapsed() < SLOW_PHASE {
            tokio::time::sleep(Duration::from_millis(500)).await;
            most = most.max(proxy_socket_mem(pid));
        }
        // Then the checked ones read everything: each byte arrived, once, in order.
        for (i, r) in streams.drain(..CHECKED).enumerate() {
            let (got, checked) = r.await.unwrap().unwrap();
            assert_eq!(got, LEN, "{mode}: reader {i}");
            if let Err(e) = checked {
                panic!("{mode}: reader {i}: {e}");
            }
        }
        for r in streams {
            r.abort();
        }
        most
    })
    .await;
    let per_reader = grew / readers as u64;
    eprintln!(
        "{mode}: {readers} slow readers held at most {} MiB on the proxy's sockets ({} KiB each)",
        grew >> 20,
        per_reader >> 10
    );
    assert!(
        per_reader <= BOUND_PER_READER,
        "{mode}: {} KiB of kernel TCP memory per slow reader, bound {} KiB",
        per_reader >> 10,
        BOUND_PER_READER >> 10
    );
    // A reading that found none of the proxy's sockets (`ss` filtered by a
    // wrong pid) would pass the bound: slow readers hold something.
    assert!(
        per_reader >= 64 << 10,
        "{mode}: only {} KiB per slow reader: was the proxy's memory read?",
        per_reader >> 10
    );
}

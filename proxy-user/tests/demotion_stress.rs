//! Sequence-numbered upload, download, echo and turning streams (round
//! trips, bulk both ways, round trips) through `--mode fastpath` with a
//! 256 KiB in-flight bound, so directions are demoted to userspace all the
//! time; through `--mode auto` promoting every stream early with the same
//! bound; and through auto with busy demotion on, so streams enter the
//! kernel light and leave it busy. Each with and without a CPU hog. Every
//! byte is checked by position (see `common::seq`): a loss, duplicate or
//! replay fails the run even when the byte count is right.
//!
//! The short runs are part of the suite. The long ones are run by hand:
//! `STRESS_STREAMS=1000 cargo test --release -p proxy-user --test demotion_stress -- --ignored --nocapture --test-threads=1`
//! (half the streams under the hog).

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::seq::*;
use common::*;

/// `--mode fastpath` with a bound that demotes all the time.
const FASTPATH: (&str, &[&str]) = ("fastpath", &["--fastpath-inflight", "256KiB"]);

/// `--mode auto` moving every stream into the kernel 20 ms in, mid-transfer
/// (no byte or segment rate is too high), with the same bound: each stream changes plane
/// once or twice while bytes flow.
const AUTO: (&str, &[&str]) = (
    "auto",
    &[
        "--fastpath-inflight",
        "256KiB",
        "--promote-after",
        "20ms",
        "--promote-below",
        "4GiB",
        "--promote-segments-below",
        "1000000000",
        "--promote-periods",
        "1",
    ],
);

/// `--mode auto` with a segment rate, so busy demotion is on: a stream is
/// moved into the kernel in a light period (its greeting pause, or the round
/// trips of a turning stream) and moved back out, losslessly, when its bulk
/// starts (more than 10 skbs in a 20 ms window). The in-flight bound is the
/// default, so most directions leave for being busy, not for the bound.
const AUTO_BUSY: (&str, &[&str]) = (
    "auto",
    &[
        "--promote-after",
        "20ms",
        "--promote-below",
        "4GiB",
        "--promote-segments-below",
        "500",
        "--promote-periods",
        "1",
    ],
);

/// Runs `streams` streams (half under a CPU hog) and fails on any error.
async fn stress_fastpath(streams: usize, max_len: u64, seed: u64) {
    stress_mode(FASTPATH, streams, max_len, seed).await
}

async fn stress_mode((mode, extra): (&str, &[&str]), streams: usize, max_len: u64, seed: u64) {
    let backend = Backend::with("seq", seq_backend).await;
    let proxy = Proxy::start(
        mode,
        &[AppSpec::new("seq", 1, vec![backend.target()])],
        extra,
    )
    .await;
    let start = Instant::now();
    let calm = stress(proxy.addr(0, 0), streams / 2, 4, max_len, seed).await;
    let hogged = {
        let _hog = CpuHog::new(2, Duration::from_secs(600));
        stress(
            proxy.addr(0, 0),
            streams - streams / 2,
            4,
            max_len,
            seed + 1,
        )
        .await
    };
    let log = proxy.log();
    let demotions = log
        .matches("receiver fell a bound behind; direction continues in userspace")
        .count();
    let ledger = log.matches("lost or duplicated bytes").count();
    let lines = proxy.conn_lines();
    let promoted = lines.iter().filter(|l| l["promoted_ms"].is_u64()).count();
    let busy: u64 = lines
        .iter()
        .filter_map(|l| l["demoted_busy"].as_u64())
        .sum();
    let mut bad = Vec::new();
    for (name, t) in [("calm", &calm), ("hog", &hogged)] {
        eprintln!(
            "{name}: {} streams, {} exact, {} silent errors, {} loud errors, {} MB",
            t.streams,
            t.exact,
            t.silent.len(),
            t.loud.len(),
            t.bytes / 1_000_000
        );
        bad.extend(t.silent.iter().map(|e| format!("{name} silent: {e}")));
        bad.extend(t.loud.iter().map(|e| format!("{name} loud: {e}")));
    }
    eprintln!(
        "total ({mode} {extra:?}): {streams} streams, {promoted} promoted, {demotions} bound demotions, {busy} busy demotions, {ledger} FIN-ledger failures, {:.1} s",
        start.elapsed().as_secs_f64()
    );
    assert!(
        bad.is_empty(),
        "{} of {streams} streams failed ({demotions} demotions, {ledger} FIN-ledger failures): {bad:#?}; log at {}",
        bad.len(),
        proxy.log_path.display()
    );
    if mode == "auto" {
        // Streams shorter than 20 ms end in userspace; most are longer.
        assert!(
            promoted >= streams / 4,
            "only {promoted} of {streams} streams moved into the kernel; log at {}",
            proxy.log_path.display()
        );
    }
    if (mode, extra) == FASTPATH {
        // A stress of the kernel's demotions, not of the copy fallback:
        // most pairs installed, and the small bound demoted many.
        let installed = lines.iter().filter(|l| l["plane"] == "fastpath").count();
        assert!(
            installed >= streams / 2 && demotions >= streams / 4,
            "{installed} of {streams} streams installed, {demotions} demotions; log at {}",
            proxy.log_path.display()
        );
    }
    if (mode, extra) == AUTO_BUSY {
        assert!(
            busy as usize >= streams / 4,
            "only {busy} directions of {streams} streams left the kernel as busy; log at {}",
            proxy.log_path.display()
        );
    }
}

/// The short version, part of every test run (well under a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demoted_directions_lose_nothing() {
    bounded(
        90,
        "short demotion stress",
        stress_fastpath(60, 8 << 20, 0x5a),
    )
    .await;
}

/// The same through `--mode auto`, every stream promoted mid-transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promoted_streams_lose_nothing() {
    bounded(
        90,
        "short promotion stress",
        stress_mode(AUTO, 60, 8 << 20, 0x5b),
    )
    .await;
}

/// The same with busy demotion on: streams go in light and come out busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn busy_streams_leave_the_kernel_and_lose_nothing() {
    bounded(
        90,
        "short busy-demotion stress",
        stress_mode(AUTO_BUSY, 60, 8 << 20, 0x5c),
    )
    .await;
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The long version: `STRESS_STREAMS` streams (default 400).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn demoted_directions_lose_nothing_long() {
    let streams = env_or("STRESS_STREAMS", 400) as usize;
    stress_fastpath(streams, 16 << 20, env_or("STRESS_SEED", 0x77)).await;
}

/// The long version through `--mode auto`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn promoted_streams_lose_nothing_long() {
    let streams = env_or("STRESS_STREAMS", 400) as usize;
    stress_mode(AUTO, streams, 16 << 20, env_or("STRESS_SEED", 0x78)).await;
}

/// The long version with busy demotion on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn busy_streams_leave_the_kernel_and_lose_nothing_long() {
    let streams = env_or("STRESS_STREAMS", 400) as usize;
    stress_mode(AUTO_BUSY, streams, 16 << 20, env_or("STRESS_SEED", 0x79)).await;
}

// ------------------------------------------ the checker catches what it must

fn checked(pieces: &[&[u8]], len: u64) -> Result<(), String> {
    let mut c = SeqCheck::new(0xabc0);
    for p in pieces {
        c.feed(p);
    }
    c.finish(len)
}

fn stream(len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    SeqGen::new(0xabc0, len).fill(&mut buf);
    buf
}

#[test]
fn checker_passes_an_exact_stream_in_odd_pieces() {
    let s = stream(100_003);
    let pieces: Vec<&[u8]> = s.chunks(4_999).collect();
    assert_eq!(checked(&pieces, 100_003), Ok(()));
}

#[test]
fn checker_catches_a_dropped_segment() {
    let s = stream(200_000);
    let e = checked(&[&s[..65_000], &s[65_000 + 1_448..]], 200_000).unwrap_err();
    assert!(
        e.contains("offset 65000") && e.contains("1448 bytes missing"),
        "{e}"
    );
}

/// Losses and duplicates of odd lengths shift the stream's words off the
/// receiver's alignment; they are still named, with their size.
#[test]
fn checker_names_odd_sized_losses_and_duplicates() {
    let s = stream(200_000);
    let e = checked(&[&s[..65_000], &s[65_000 + 1_447..]], 200_000).unwrap_err();
    assert!(e.contains("1447 bytes missing"), "{e}");
    let e = checked(&[&s[..65_003], &s[65_003 + 65_483..]], 200_000).unwrap_err();
    assert!(e.contains("65483 bytes missing"), "{e}");
    let e = checked(&[&s[..70_001], &s[60_000..70_001], &s[70_001..]], 200_000).unwrap_err();
    assert!(e.contains("10001 bytes from earlier"), "{e}");
}

#[test]
fn checker_catches_a_duplicated_segment() {
    let s = stream(200_000);
    let e = checked(&[&s[..70_000], &s[60_000..70_000], &s[70_000..]], 200_000).unwrap_err();
    assert!(
        e.contains("offset 70000") && e.contains("10000 bytes from earlier"),
        "{e}"
    );
}

/// A replay with the exact byte count: what a SHA of a repeated pattern or
/// the FIN ledger cannot see.
#[test]
fn checker_catches_a_replay_with_the_exact_count() {
    let mut s = stream(300_000);
    let (early, late) = s.split_at_mut(150_000);
    late[..65_480].copy_from_slice(&early[19_000..19_000 + 65_480]);
    let e = checked(&[&s], 300_000).unwrap_err();
    assert!(
        e.contains("offset 150000") && e.contains("131000 bytes from earlier"),
        "{e}"
    );
}

#[test]
fn checker_catches_zeros_and_a_short_clean_stream() {
    let mut s = stream(50_000);
    s[8_000..9_000].fill(0);
    let e = checked(&[&s], 50_000).unwrap_err();
    // A zero can be right by chance (the low byte of a word), so the hole is
    // found within its first word.
    assert!(
        e.contains("wrong byte at offset 800") && e.contains("not of this stream"),
        "{e}"
    );
    let s = stream(50_000);
    let e = checked(&[&s[..49_992]], 50_000).unwrap_err();
    assert!(e.contains("49992 bytes of 50000"), "{e}");
}

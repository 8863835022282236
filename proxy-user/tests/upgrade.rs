//! Upgrades through the real binary: `--handoff-socket` on the running
//! proxy, `--takeover` (or SIGUSR2) for the new one. Long-lived
//! sequence-checked streams and a new-connection load run throughout; no
//! connection may be refused or reset, no byte lost or reordered.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::generations::{second_binary, Setup, SECOND_BUILD_STAMP};
use common::streams::{Seen, Traffic};
use common::*;

/// Slow streams (1 KiB every 20 ms) and bulk ones (64 KiB every ms: they
/// are mostly mid-write when asked to park).
const STREAMS: u64 = 200;
const BULK: u64 = 4;
const LOAD_WORKERS: usize = 16;

/// The runs below take turns: on 2 cores, three of them at once would
/// measure the test client's share of the CPU, not the upgrade.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The `commit` label of `proxy_build_info` that the admin listener at
/// `admin` reports: which build serves it.
async fn serving_build(admin: &str) -> String {
    let (status, body) = http_get(admin, "/metrics")
        .await
        .unwrap_or_else(|e| panic!("GET /metrics from {admin}: {e}"));
    assert_eq!(status, 200, "GET /metrics: {body}");
    let line = body
        .lines()
        .find(|l| l.starts_with("proxy_build_info{"))
        .unwrap_or_else(|| panic!("no proxy_build_info in /metrics:\n{body}"));
    let commit = line
        .split("commit=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no commit label in {line}"));
    commit.to_string()
}

/// `upgrades` handoffs in a row, alternating two builds (`cargo xtask test`
/// compiles the second one), under the streams and the load. After each,
/// the admin listener (handed over with the rest) must report the new
/// build. Returns the long-lived streams' close lines (all written by the
/// last process).
async fn upgrades_in_a_row(
    mode: &'static str,
    upgrades: usize,
    extra: &[&str],
) -> Vec<serde_json::Value> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut flags = vec!["--admin-address", "127.0.0.1:0"];
    flags.extend_from_slice(extra);
    let s = Setup::with(mode, &flags).await;
    let first = s.first().await;
    let admin = admin_addr(&first.proxy);
    let second = second_binary();
    let first_build = serving_build(&admin).await;
    let builds = if second.real {
        assert_ne!(
            first_build, SECOND_BUILD_STAMP,
            "the test's own build carries the second build's stamp"
        );
        [SECOND_BUILD_STAMP.to_string(), first_build]
    } else {
        [first_build.clone(), first_build]
    };
    let bins = [second.path, PathBuf::from(PROXY)];
    let traffic = Traffic::start(s.addr, STREAMS, BULK, LOAD_WORKERS);
    let started = Instant::now();
    let mut cur = first;
    let mut exits = Vec::new();
    let mut moved = 0u64;
    let mut kept = Vec::new();
    for i in 0..upgrades {
        // Let the streams and the load run on each generation.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let next = s
            .launch(&bins[i % 2], &s.config, true)
            .await
            .unwrap_or_else(|log| panic!("upgrade {i}: new proxy failed:\n{log}"));
        let t = Instant::now();
        assert_eq!(
            serving_build(&admin).await,
            builds[i % 2],
            "upgrade {i}: the build serving after the handoff"
        );
        let status = cur.proxy.wait_exit(10).await;
        let log = cur.proxy.log();
        assert!(
            status.is_some_and(|st| st.success()),
            "upgrade {i}: old proxy did not exit cleanly within 10 s ({status:?}); log:\n{log}"
        );
        exits.push(t.elapsed());
        moved += log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["message"] == "handoff: done; the connections that did not move drain here"
            })
            .filter_map(|v| v["moved"].as_u64())
            .sum::<u64>();
        // Kept (exited) until the end: its log is checked at drop.
        kept.push(std::mem::replace(&mut cur, next).proxy);
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let Seen {
        bytes,
        ok,
        failures,
    } = traffic.finish(&cur.proxy.log_path).await;
    let secs = started.elapsed().as_secs_f64();
    let slowest = exits.iter().max().copied().unwrap_or_default();
    let mut sorted = exits.clone();
    sorted.sort();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
    eprintln!(
        "{mode}: {upgrades} upgrades in {secs:.1} s; {STREAMS}+{BULK} streams, {bytes} bytes checked; \
         {ok} new connections ({:.0}/s), {} failed; {moved} established connections moved; \
         old process gone {median:?} (median), at most {slowest:?} after the new one was ready",
        ok as f64 / secs,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "new connections failed: {:?}",
        &failures[..failures.len().min(10)]
    );
    // No failures and no connections would mean the load never ran.
    assert!(ok > 0, "the new-connection load made no connection");
    let all = STREAMS + BULK;
    assert!(
        moved >= all * upgrades as u64,
        "only {moved} connections moved in {upgrades} upgrades"
    );
    // Every stream's one close line, written by the last process, names
    // every process that carried it, in order, each once (the load's
    // connections are moved at most once: accepted by a process in its
    // last moments).
    let generations = kept
        .iter()
        .map(|p| p.pid().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let carried_all =
        |l: &serde_json::Value| l["carried_by"].as_str() == Some(generations.as_str());
    let deadline = Instant::now() + Duration::from_secs(10);
    let long = loop {
        let long: Vec<_> = cur
            .proxy
            .conn_lines()
            .into_iter()
            .filter(|l| carried_all(l))
            .collect();
        if long.len() >= all as usize || Instant::now() > deadline {
            break long;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        long.len(),
        all as usize,
        "streams closed by the last process after {upgrades} moves"
    );
    assert!(long.iter().all(|l| l["end"] == "closed"));
    let last = cur.proxy.pid() as u64;
    assert!(
        long.iter().all(|l| l["pid"].as_u64() == Some(last)),
        "close lines not written by the last process ({last})"
    );
    cur.proxy.signal(libc::SIGTERM);
    assert!(cur.proxy.wait_exit(10).await.is_some());
    let _ = std::fs::remove_file(&bins[0]);
    long
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_upgrades_copy() {
    bounded(150, "upgrades", upgrades_in_a_row("copy", 20, &[])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_upgrades_splice() {
    bounded(150, "upgrades", upgrades_in_a_row("splice", 20, &[])).await;
}

/// `auto`: the slow streams are promoted into the kernel early (quiet
/// over one 200 ms period: each process starts the count again, and one
/// lives about 280 ms here) and move as fastpath pairs with their map sets; the bulk
/// ones mostly stay on splice (far above --promote-below) and move at a
/// safe point.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_upgrades_auto() {
    let f = upgrades_in_a_row(
        "auto",
        20,
        &["--promote-after", "200ms", "--promote-periods", "1"],
    );
    let long = bounded(150, "upgrades", f).await;
    let in_kernel = long.iter().filter(|l| l["plane"] == "fastpath").count();
    assert!(
        in_kernel as u64 >= STREAMS / 2,
        "only {in_kernel} of {STREAMS} slow streams ended promoted after 20 moves"
    );
    // Bulk streams stay on splice unless a starved test client slows
    // them for a whole period (then they move little, and are promoted too).
    let on_splice = long.iter().filter(|l| l["plane"] == "splice").count();
    eprintln!("auto: {in_kernel} streams ended in the kernel (promoted, then moved as pairs), {on_splice} on splice");
}

/// Fastpath pairs move with their map sets: every stream completes in the
/// last process, and each old process exits right after its handoff (it
/// would wait on its pairs, streams that outlive the test, otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_upgrades_fastpath() {
    let long = bounded(150, "upgrades", upgrades_in_a_row("fastpath", 20, &[])).await;
    let in_kernel = long.iter().filter(|l| l["plane"] == "fastpath").count();
    assert_eq!(
        in_kernel,
        long.len(),
        "streams not ended on the fastpath: {:?}",
        long.iter()
            .filter(|l| l["plane"] != "fastpath")
            .take(3)
            .collect::<Vec<_>>()
    );
}

/// sk_lookup: the steered socket moves, and the new program steers to it
/// before the old one is detached.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrades_with_sk_lookup_steering() {
    let f = upgrades_in_a_row("splice", 5, &["--steering", "sk_lookup"]);
    bounded(150, "upgrades", f).await;
}

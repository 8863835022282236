//! The kernel behaviours the fastpath relies on, each tested on this exact
//! kernel through the real proxy with sequence-numbered streams (every
//! 8-byte word holds its own offset, so a loss, duplicate, replay or
//! reorder is located to the byte), most of them under a CPU hog that makes
//! the kernel's deferred work compete with the endpoints. They run as root;
//! when BPF cannot load, `Proxy::start` fails with the proxy's reason.
//!
//! What each proves, and what the fastpath does with it, is in NOTES.md §2.

#[macro_use]
mod common;

use std::time::Duration;

use common::seq::*;
use common::*;

/// One byte behind every message of a demotion (proxy-user's log).
const DEMOTED: &str = "receiver fell a bound behind; direction continues in userspace";
/// The FIN ledger's error line.
const LEDGER: &str = "lost or duplicated bytes";

/// A seq backend, a fastpath proxy at `inflight` in front of it, and a CPU
/// hog for the length of a test.
struct Rig {
    proxy: Proxy,
    _backend: Backend,
    _hog: CpuHog,
}

async fn rig(inflight: &str) -> Rig {
    let backend = Backend::with("seq", seq_backend).await;
    let proxy = Proxy::start(
        "fastpath",
        &[AppSpec::new("seq", 1, vec![backend.target()])],
        // A bound past three times the fixed socket buffers is refused, so
        // the never-demoted rigs run on autotuned ones.
        &[
            "--fastpath-inflight",
            inflight,
            "--socket-buffer",
            if inflight == "4GiB" { "0" } else { "256KiB" },
        ],
    )
    .await;
    Rig {
        proxy,
        _backend: backend,
        _hog: CpuHog::new(2, Duration::from_secs(50)),
    }
}

/// Fails unless at least `least` directions were demoted.
fn assert_demoted(proxy: &Proxy, least: usize) {
    let demotions = proxy.log().matches(DEMOTED).count();
    assert!(
        demotions >= least,
        "the slow readers must force {least} demotions; saw {demotions}"
    );
}

/// Runs the streams at once and fails with every stream that was not exact.
async fn all_exact(proxy: &Proxy, streams: &[(Kind, u64, u64)]) {
    let addr = proxy.addr(0, 0);
    let tasks: Vec<_> = streams
        .iter()
        .map(|&(kind, len, tag)| tokio::spawn(run_stream(addr, kind, len, tag)))
        .collect();
    let mut bad = Vec::new();
    for (task, (kind, len, tag)) in tasks.into_iter().zip(streams) {
        match task.await.expect("stream task") {
            Outcome::Exact => {}
            other => bad.push(format!("{kind:?} of {len} (tag {tag:#x}): {other:?}")),
        }
    }
    let log = proxy.log();
    assert!(
        bad.is_empty() && !log.contains(LEDGER),
        "streams not exact: {bad:#?}; FIN-ledger failures: {}; log at {}",
        log.matches(LEDGER).count(),
        proxy.log_path.display()
    );
}

/// Redirect order and exactness, bulk both ways at once, never demoted (the
/// bound is above the transfer): every skb the verdict redirects leaves the
/// peer once, in order, under a CPU hog.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redirect_is_exact_both_ways_under_hog() {
    let Rig { proxy, .. } = &rig("4GiB").await;
    let mb = 1 << 20;
    bounded(
        50,
        "bulk both ways",
        all_exact(
            proxy,
            &[
                (Kind::Upload, 48 * mb, 0x10 << 41),
                (Kind::Download, 48 * mb, 0x12 << 41),
                (Kind::Echo, 32 * mb, 0x14 << 41),
                (Kind::Echo, 32 * mb + 5, 0x16 << 41),
            ],
        ),
    )
    .await;
    assert!(
        !proxy.log().contains(DEMOTED),
        "nothing may be demoted at a 4 GiB bound"
    );
    let lines = proxy.wait_conn_lines(4, 10).await;
    assert!(
        lines.iter().all(|l| l["plane"] == "fastpath"),
        "every stream must be installed: {lines:?}"
    );
}

/// FIN after drain: many short streams, each ended by a FIN from one side
/// while the kernel may still hold redirected bytes for the peer; the FIN
/// must follow the last byte, never overtake it or cut it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fin_follows_the_last_redirected_byte_under_hog() {
    let Rig { proxy, .. } = &rig("4GiB").await;
    let mut rng = fastrand::Rng::with_seed(0xf1);
    let kinds = [Kind::Upload, Kind::Download, Kind::Echo];
    let streams: Vec<_> = (0..90u64)
        .map(|i| {
            (
                kinds[i as usize % 3],
                rng.u64(1..=512 * 1024),
                (0x40 + i) << 41,
            )
        })
        .collect();
    for batch in streams.chunks(10) {
        bounded(30, "short streams", all_exact(proxy, batch)).await;
    }
}

/// Reads after the verdict stopped redirecting a direction are exact: a slow
/// reader makes the receiver fall the 256 KiB bound behind, the direction is
/// demoted while the sender keeps sending, and userspace reads the source
/// socket from then on (on this kernel: the bytes the verdict returns
/// `SK_PASS` for). Every byte must arrive once, in order, under a CPU hog.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demoted_reads_are_exact_under_hog() {
    let Rig { proxy, .. } = &rig("256KiB").await;
    let mb = 1 << 20;
    // Odd tags: slow readers on the receiving end.
    let streams: Vec<_> = (0..8u64)
        .map(|i| {
            let kind = if i % 2 == 0 {
                Kind::Upload
            } else {
                Kind::Download
            };
            (kind, 12 * mb + i * 1_001, ((0x80 + i) << 41) | 1)
        })
        .collect();
    bounded(50, "demoted bulk", all_exact(proxy, &streams)).await;
    assert_demoted(proxy, 4);
}

/// Demotion with bytes in flight both ways: echo streams with a slow echo,
/// so both directions of a pair fall behind and are demoted while the
/// kernel still holds redirected bytes for the peer; the userspace bytes
/// must follow the last redirected one exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demotion_with_bytes_in_flight_is_exact() {
    let Rig { proxy, .. } = &rig("256KiB").await;
    let mb = 1 << 20;
    let streams: Vec<_> = (0..6u64)
        .map(|i| (Kind::Echo, 8 * mb + i * 4_099, ((0xc0 + i) << 41) | (i & 1)))
        .collect();
    bounded(50, "demoted echo", all_exact(proxy, &streams)).await;
    assert_demoted(proxy, 2);
}

/// The suite's own proof: the same redirect check run against a verdict
/// told to drop one skb per direction (`--fastpath-fault-drop-at`, a test
/// hook) must fail, loudly: the FIN ledger sees the hole and resets both
/// sides, and the sequence checker never reports the stream exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_skb_is_caught() {
    let backend = Backend::with("seq", seq_backend).await;
    let proxy = Proxy::start(
        "fastpath",
        &[AppSpec::new("seq", 1, vec![backend.target()])],
        &[
            "--fastpath-inflight",
            "4GiB",
            "--socket-buffer",
            "0",
            "--fastpath-fault-drop-at",
            "1048576",
        ],
    )
    .await;
    let mb = 1 << 20;
    let streams = [
        (Kind::Upload, 8 * mb, 0x70 << 41),
        (Kind::Download, 8 * mb, 0x72 << 41),
        (Kind::Echo, 8 * mb, 0x74 << 41),
    ];
    for (kind, len, tag) in streams {
        let outcome = bounded(
            30,
            "a stream with a hole",
            run_stream(proxy.addr(0, 0), kind, len, tag),
        )
        .await;
        assert!(
            matches!(outcome, Outcome::Loud(_)),
            "{kind:?}: a dropped skb must end the stream with an error, not {outcome:?}"
        );
    }
    let log = proxy.log();
    assert!(
        log.contains(LEDGER),
        "the FIN ledger must name the loss; log at {}",
        proxy.log_path.display()
    );
    let lines = proxy.wait_conn_lines(3, 10).await;
    assert!(
        lines.iter().all(|l| l["end"] != "closed"),
        "a stream with a hole must not close cleanly: {lines:?}"
    );
}

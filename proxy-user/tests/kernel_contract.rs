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

use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    assert_eq!(lines.len(), 4, "{lines:?}");
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
    // The FINs must have met installed pairs: a stream that ended before
    // its install ran on the copy pump and proves nothing here.
    let lines = proxy.wait_conn_lines(streams.len(), 10).await;
    let installed = lines.iter().filter(|l| l["plane"] == "fastpath").count();
    eprintln!(
        "{installed} of {} streams ran on the fastpath",
        streams.len()
    );
    assert!(
        installed >= streams.len() / 2,
        "only {installed} of {} streams ran on the fastpath",
        streams.len()
    );
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
    // Both ways on one pair, the case this exists for; not two one-way
    // demotions on different pairs.
    let lines = proxy.wait_conn_lines(streams.len(), 10).await;
    assert!(
        lines.iter().any(|l| l["demoted"] == 2),
        "no pair had both directions demoted: {lines:?}"
    );
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
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines.iter().all(|l| l["end"] != "closed"),
        "a stream with a hole must not close cleanly: {lines:?}"
    );
}

/// TCP queues a retransmitted segment that partly overlaps bytes already
/// received as it came (its head before `rcv_nxt`); `tcp_recvmsg` skips the
/// overlap, but the verdict is handed whole skbs (`tcp_read_skb`), so it
/// must cut the head itself. Seen once in CI as 24 bytes duplicated in a
/// 1 GiB echo (the FIN ledger reset it). Here the overlap is made on
/// purpose: a raw socket injects a segment that starts 1,000 bytes before
/// the client's next sequence number and carries 1,000 new bytes, exactly
/// as a retransmission cut differently from the original would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retransmitted_overlap_is_forwarded_once() {
    let backend = Backend::with("seq", seq_backend).await;
    let proxy = Proxy::start(
        "fastpath",
        &[AppSpec::new("seq", 1, vec![backend.target()])],
        &["--admin-address", "127.0.0.1:0"],
    )
    .await;
    let (len, tag) = (64 * 1024u64, 0x76 << 41);
    let (sent_first, overlap, fresh) = (8_000u64, 1_000u64, 1_000u64);
    let outcome = bounded(30, "an upload with an overlapping segment", async {
        let mut s = tokio::net::TcpStream::connect(proxy.addr(0, 0))
            .await
            .expect("connect");
        let mut header = Vec::new();
        for v in [Kind::Upload.code(), len, tag] {
            header.extend_from_slice(&v.to_le_bytes());
        }
        s.write_all(&header).await.expect("header");
        let mut greeting = [0u8; 1];
        s.read_exact(&mut greeting).await.expect("greeting");
        // Installed by now: the pre-install copy stops once both sides are
        // quiet (the other tests here give it 20 ms, under a CPU hog).
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(b"g").await.expect("go");
        s.write_all(&seq_bytes(tag, 0, sent_first))
            .await
            .expect("first part");
        wait_all_acked(&s).await;
        inject_overlap(&s, |seq_of_next| {
            let at = sent_first - overlap;
            (
                seq_of_next.wrapping_sub(overlap as u32),
                seq_bytes(tag, at, overlap + fresh),
            )
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The client's own TCP sends from where it stands: the fresh bytes
        // again (a duplicate the proxy's TCP drops or the verdict cuts),
        // then the rest.
        s.write_all(&seq_bytes(tag, sent_first, len - sent_first))
            .await
            .expect("rest");
        s.shutdown().await.expect("shutdown");
        let mut answer = String::new();
        match s.read_to_string(&mut answer).await {
            Ok(_) if answer == "OK\n" => Outcome::Exact,
            Ok(_) => Outcome::Silent(answer),
            Err(e) => Outcome::Loud(e.to_string()),
        }
    })
    .await;
    assert!(
        matches!(outcome, Outcome::Exact),
        "an overlapping retransmission must reach the target once: {outcome:?}; log at {}",
        proxy.log_path.display()
    );
    // The pair's debug line comes just before its close line.
    proxy.wait_conn_lines(1, 5).await;
    let log = proxy.log();
    let done = log
        .lines()
        .find(|l| l.contains("fastpath pair done"))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    let trimmed = done.as_ref().and_then(|d| d["trimmed_c2t"].as_u64());
    assert!(
        trimmed.is_some_and(|t| t >= overlap),
        "the verdict must have cut the {overlap} overlapping bytes itself (trimmed_c2t {trimmed:?}): the injection did not reach it as one skb"
    );
    let metrics = http_get(&admin_addr(&proxy), "/metrics")
        .await
        .expect("metrics")
        .1;
    assert_eq!(
        metric(&metrics, r#"proxy_fastpath_overlap_bytes_total{app="seq"}"#) as u64,
        trimmed.unwrap_or_default(),
        "the metric counts what the close line says was cut"
    );
}

/// The stream tagged `tag`, bytes `[at, at + n)`.
fn seq_bytes(tag: u64, at: u64, n: u64) -> Vec<u8> {
    let mut bytes = vec![0; n as usize];
    fill_at(tag, at, &mut bytes);
    bytes
}

/// Waits until the peer acknowledged every byte `s` sent (SIOCOUTQ 0).
async fn wait_all_acked(s: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    for _ in 0..1000 {
        let mut outq: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int.
        let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut outq) };
        assert_eq!(rc, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
        if outq == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the proxy never acknowledged the first part");
}

/// Sends, from a raw socket, the TCP segment `make(seq_of_next)` returns
/// (its sequence number and payload) as if `s` sent it. `s`'s next sequence
/// number, the one it acknowledges, and its timestamp clock come from
/// TCP_REPAIR (root), so the proxy's TCP takes the segment as in-window.
fn inject_overlap(s: &tokio::net::TcpStream, make: impl FnOnce(u32) -> (u32, Vec<u8>)) {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let set = |opt: libc::c_int, val: libc::c_int| {
        // SAFETY: an int option.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                opt,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(
            rc,
            0,
            "setsockopt {opt}: {}",
            std::io::Error::last_os_error()
        );
    };
    let get = |opt: libc::c_int| -> u32 {
        let mut val: u32 = 0;
        let mut n = std::mem::size_of::<u32>() as libc::socklen_t;
        // SAFETY: a u32 option.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                opt,
                (&mut val as *mut u32).cast(),
                &mut n,
            )
        };
        assert_eq!(
            rc,
            0,
            "getsockopt {opt}: {}",
            std::io::Error::last_os_error()
        );
        val
    };
    set(libc::TCP_REPAIR, 1);
    set(libc::TCP_REPAIR_QUEUE, TCP_SEND_QUEUE);
    let snd_nxt = get(libc::TCP_QUEUE_SEQ);
    set(libc::TCP_REPAIR_QUEUE, TCP_RECV_QUEUE);
    let rcv_nxt = get(libc::TCP_QUEUE_SEQ);
    set(libc::TCP_REPAIR, 0);
    let tsval = get(libc::TCP_TIMESTAMP);

    let (seq, payload) = make(snd_nxt);
    let local = s.local_addr().expect("local addr");
    let peer = s.peer_addr().expect("peer addr");
    let (std::net::IpAddr::V4(src), std::net::IpAddr::V4(dst)) = (local.ip(), peer.ip()) else {
        panic!("IPv4 only");
    };
    // 20-byte header, then NOP NOP TIMESTAMP (the connection uses them:
    // PAWS takes a segment without one as old).
    let mut seg = Vec::with_capacity(32 + payload.len());
    seg.extend_from_slice(&local.port().to_be_bytes());
    seg.extend_from_slice(&peer.port().to_be_bytes());
    seg.extend_from_slice(&seq.to_be_bytes());
    seg.extend_from_slice(&rcv_nxt.to_be_bytes());
    seg.extend_from_slice(&[8 << 4, 0x18]); // data offset 8 words; ACK|PSH
    seg.extend_from_slice(&0xffffu16.to_be_bytes()); // window
    seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    seg.extend_from_slice(&[1, 1, 8, 10]);
    seg.extend_from_slice(&tsval.to_be_bytes());
    seg.extend_from_slice(&0u32.to_be_bytes());
    seg.extend_from_slice(&payload);
    let sum = checksum(src, dst, &seg);
    seg[16..18].copy_from_slice(&sum.to_be_bytes());

    // The kernel writes the IP header; the TCP header is ours.
    let raw = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::TCP),
    )
    .expect("raw socket");
    let to = std::net::SocketAddr::from((dst, 0));
    let sent = raw.send_to(&seg, &to.into()).expect("raw send");
    assert_eq!(sent, seg.len(), "raw send: short");
}

/// TCP_REPAIR_QUEUE's queues (include/uapi/linux/tcp.h; not in libc).
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;

/// The TCP checksum over the IPv4 pseudo-header and `seg`.
fn checksum(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, seg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&[0, 6]);
    add(&(seg.len() as u16).to_be_bytes());
    add(seg);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

//! `--mode auto` with BPF (root): the adaptive plane. Connections start on
//! splice; quiet ones move into the kernel; bulk ones and short ones stay
//! in userspace. Every byte is checked by position (`common::seq`), and the
//! close lines say which plane carried each connection and when it moved.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::seq::{fill_at, CpuHog, SeqCheck, SeqGen};
use common::*;

/// Watch periods short enough for a test, and the default rate.
const FAST: &[&str] = &["--promote-after", "200ms", "--admin-address", "127.0.0.1:0"];

async fn auto_proxy(backend: &Backend, extra: &[&str]) -> Proxy {
    Proxy::start(
        "auto",
        &[AppSpec::new("app", 1, vec![backend.target()])],
        extra,
    )
    .await
}

/// One echo connection that the client drives through phases: `(pieces,
/// piece size, pause between pieces)`. Everything it sends is one
/// sequence-numbered stream, checked as it comes back; then a half-close,
/// and the echo must end exactly at the stream's end.
async fn echo_phases(addr: SocketAddr, tag: u64, phases: &[(usize, usize, Duration)]) {
    let total: u64 = phases.iter().map(|&(n, size, _)| (n * size) as u64).sum();
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut r, mut w) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut check = SeqCheck::new(tag);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = r.read(&mut buf).await.expect("read the echo");
            if n == 0 {
                break;
            }
            check.feed(&buf[..n]);
        }
        check.finish(total)
    });
    let mut gen = SeqGen::new(tag, total);
    for &(pieces, size, pause) in phases {
        let mut piece = vec![0u8; size];
        for _ in 0..pieces {
            let n = gen.fill(&mut piece);
            w.write_all(&piece[..n]).await.expect("write");
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }
    w.shutdown().await.expect("half-close");
    let result = reader.await.expect("reader task");
    assert_eq!(result, Ok(()), "the echo must come back exact");
}

/// The close line of the only connection.
fn only_conn(proxy: &Proxy) -> serde_json::Value {
    let lines = proxy.conn_lines();
    assert_eq!(lines.len(), 1, "one connection: {lines:?}");
    lines[0].clone()
}

/// One echo connection through its phases (`echo_phases`) via a fresh auto
/// proxy with `extra`; returns the proxy and the connection's close line.
async fn one_connection(
    extra: &[&str],
    tag: u64,
    phases: &[(usize, usize, Duration)],
) -> (Proxy, serde_json::Value) {
    let backend = Backend::echo("echo").await;
    let proxy = auto_proxy(&backend, extra).await;
    bounded(
        60,
        "one echo connection",
        echo_phases(proxy.addr(0, 0), tag, phases),
    )
    .await;
    proxy.wait_conn_lines(1, 10).await;
    let line = only_conn(&proxy);
    (proxy, line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_connection_moves_into_the_kernel_and_back_out_exact() {
    // Interactive (a small message every 20 ms, long past the 200 ms watch),
    // then bulk (16 MiB as fast as it goes, through a promoted pair), then
    // interactive again.
    let chat = (40, 200, Duration::from_millis(20));
    let bulk = (256, 64 * 1024, Duration::ZERO);
    let (proxy, line) = one_connection(FAST, 0x7100, &[chat, bulk, chat]).await;
    assert_eq!(line["plane"], "fastpath", "promoted: {line}");
    assert_eq!(line["end"], "closed", "{line}");
    let after = line["promoted_ms"].as_u64().expect("promoted_ms");
    assert!(after >= 400, "not before two watch periods: {line}");
    // ... and back out: the bulk is busy, whichever way it turned.
    let out = line["demoted"].as_u64().unwrap_or(0);
    assert!(out >= 1, "the bulk left the pair in the kernel: {line}");
    let metrics = http_get(&admin_addr(&proxy), "/metrics").await.unwrap().1;
    assert_eq!(
        metric(&metrics, r#"proxy_promotions_total{app="app"}"#),
        1.0
    );
    assert_eq!(
        metric(&metrics, r#"proxy_fin_ledger_failures_total{app="app"}"#),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_connection_stays_in_userspace() {
    // 1 MiB every 10 ms for well over a second: far above 1 MiB/s.
    let busy = (150, 1 << 20, Duration::from_millis(10));
    let (_, line) = one_connection(FAST, 0x7200, &[busy]).await;
    assert_eq!(line["plane"], "splice", "bulk stays on splice: {line}");
    assert!(line["promoted_ms"].is_null(), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_connections_never_pay_an_install() {
    let backend = Backend::echo("echo").await;
    let proxy = auto_proxy(&backend, FAST).await;
    let addr = proxy.addr(0, 0);
    bounded(60, "200 short exchanges", async {
        for i in 0..200u64 {
            echo_phases(addr, 0x7300 + i, &[(1, 100, Duration::ZERO)]).await;
        }
    })
    .await;
    let lines = proxy.wait_conn_lines(200, 10).await;
    assert_eq!(lines.len(), 200);
    for line in lines {
        assert_eq!(line["plane"], "splice", "{line}");
    }
    let metrics = http_get(&admin_addr(&proxy), "/metrics").await.unwrap().1;
    assert_eq!(
        metric(&metrics, r#"proxy_promotions_total{app="app"}"#),
        0.0
    );
}

/// Without `--promote-after` auto never touches the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_after_zero_keeps_auto_in_userspace() {
    let chat = (20, 100, Duration::from_millis(10));
    let (_, line) = one_connection(&["--promote-after", "0"], 0x7400, &[chat]).await;
    assert_eq!(line["plane"], "splice", "{line}");
}

/// A silent period is no evidence of light traffic: a connection that says
/// nothing moves only after periods that carried a little.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_moves_after_light_periods() {
    // Three and a half silent watch periods, then a small message every 20 ms.
    let silence = (1, 0, Duration::from_millis(700));
    let chat = (40, 200, Duration::from_millis(20));
    let (_, line) = one_connection(FAST, 0x7500, &[silence, chat]).await;
    assert_eq!(line["plane"], "fastpath", "promoted: {line}");
    let after = line["promoted_ms"].as_u64().expect("promoted_ms");
    assert!(after >= 700, "not while it was silent: {line}");
}

/// A mostly idle connection (one small message every other watch period,
/// silence between) moves: a silent period neither counts nor breaks the
/// run of light ones. idle-mostly in the bench is this shape, and the
/// kernel carries it for a third of splice's CPU (NOTES §2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mostly_idle_connection_moves_across_silent_periods() {
    // A message every 400 ms: no 200 ms period holds two, and every other
    // one is silent.
    let lead = (1, 0, Duration::from_millis(100));
    let sparse = (6, 64, Duration::from_millis(400));
    let (_, line) = one_connection(FAST, 0x7b00, &[lead, sparse]).await;
    assert_eq!(line["plane"], "fastpath", "promoted: {line}");
    let after = line["promoted_ms"].as_u64().expect("promoted_ms");
    // Two light periods in (the second message, about 500 ms in), not
    // after the connection went quiet for good.
    assert!((400..=1500).contains(&after), "{line}");
}

/// A light connection the client half-closed is ending: it stays on
/// splice. It used to be promoted, fail its install (a side had sent its
/// FIN) and finish on the copy plane, counted as a promotion. The target
/// answers the client's request, after its FIN, in small pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_connection_is_not_moved() {
    const TAG: u64 = 0x4a1f_c105;
    const PIECE: usize = 100;
    const PIECES: u64 = 20;
    let backend = Backend::with("trickle", |mut s: TcpStream| async move {
        let mut request = Vec::new();
        s.read_to_end(&mut request).await?;
        let mut gen = SeqGen::new(TAG, PIECE as u64 * PIECES);
        let mut buf = [0u8; PIECE];
        while gen.fill(&mut buf) > 0 {
            s.write_all(&buf).await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    let proxy = auto_proxy(&backend, FAST).await;
    bounded(30, "a half-closed trickle", async {
        let mut s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        s.write_all(b"request").await.unwrap();
        s.shutdown().await.unwrap();
        let mut check = SeqCheck::new(TAG);
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.expect("read the answer");
            if n == 0 {
                break;
            }
            check.feed(&buf[..n]);
        }
        check.finish(PIECE as u64 * PIECES).unwrap();
    })
    .await;
    proxy.wait_conn_lines(1, 10).await;
    let line = only_conn(&proxy);
    assert_eq!(line["plane"], "splice", "{line}");
    assert_eq!(line["end"], "closed", "{line}");
    let metrics = http_get(&admin_addr(&proxy), "/metrics").await.unwrap().1;
    assert_eq!(
        metric(&metrics, r#"proxy_promotions_total{app="app"}"#),
        0.0
    );
}

/// Ping-pong over `s`: `round_trips` messages of `size` bytes, each echoed
/// before the next is sent, checked by position against `tag`'s stream
/// from `at` on. Returns where the stream stands.
async fn ping_pong(s: &mut TcpStream, tag: u64, at: u64, round_trips: u64, size: usize) -> u64 {
    let mut buf = vec![0u8; size];
    let mut echo = vec![0u8; size];
    let mut at = at;
    for _ in 0..round_trips {
        fill_at(tag, at, &mut buf);
        s.write_all(&buf).await.expect("write a ping");
        s.read_exact(&mut echo).await.expect("read its echo");
        assert_eq!(echo, buf, "echo at byte {at}");
        at += size as u64;
    }
    at
}

/// Half-closes `s`; the echo must end exactly there.
async fn end_of_echo(s: &mut TcpStream) {
    s.shutdown().await.unwrap();
    assert_eq!(
        s.read(&mut [0u8; 1]).await.unwrap(),
        0,
        "the echo ends there"
    );
}

/// `messages` single round trips of `size` bytes, 20 ms apart: light
/// traffic, the kind a watch period promotes. Returns where the stream stands.
async fn chat(s: &mut TcpStream, tag: u64, at: u64, messages: u32, size: usize) -> u64 {
    let mut at = at;
    for _ in 0..messages {
        at = ping_pong(s, tag, at, 1, size).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    at
}

/// A light chat moves the connection into the kernel; then it ping-pongs
/// flat out. On auto each direction leaves the kernel as it turns busy (the
/// verdict passes its skbs on, losslessly); forced, the kernel keeps it.
async fn chat_then_busy(mode: &str, extra: &[&str]) -> serde_json::Value {
    let backend = Backend::echo("echo").await;
    let proxy = Proxy::start(
        mode,
        &[AppSpec::new("app", 1, vec![backend.target()])],
        extra,
    )
    .await;
    bounded(60, "chat, then ping-pong", async {
        let mut s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        s.set_nodelay(true).unwrap();
        // 30 messages 20 ms apart: 600 ms, three watch periods.
        let at = chat(&mut s, 0x7700, 0, 30, 200).await;
        ping_pong(&mut s, 0x7700, at, 5000, 100).await;
        end_of_echo(&mut s).await;
    })
    .await;
    proxy.wait_conn_lines(1, 10).await;
    let line = only_conn(&proxy);
    assert_eq!(line["plane"], "fastpath", "{mode}: {line}");
    assert_eq!(line["end"], "closed", "{mode}: {line}");
    let metrics = http_get(&admin_addr(&proxy), "/metrics").await.unwrap().1;
    assert_eq!(
        metric(&metrics, r#"proxy_fin_ledger_failures_total{app="app"}"#),
        0.0
    );
    let busy = metric(
        &metrics,
        r#"proxy_demotions_total{app="app",reason="busy"}"#,
    );
    assert_eq!(busy, line["demoted_busy"].as_f64().unwrap(), "{line}");
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_connection_that_turns_busy_leaves_the_kernel() {
    let line = chat_then_busy("auto", FAST).await;
    assert!(line["promoted_ms"].is_u64(), "promoted first: {line}");
    assert_eq!(line["demoted_busy"], 2, "both directions left busy: {line}");
    assert_eq!(line["demoted"], 2, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_fastpath_keeps_a_busy_pair_in_the_kernel() {
    let line = chat_then_busy("fastpath", &["--admin-address", "127.0.0.1:0"]).await;
    assert_eq!(line["demoted"], 0, "{line}");
    assert_eq!(line["demoted_busy"], 0, "{line}");
}

/// sockperf's shape: connect, say nothing for a while, then ping-pong flat
/// out. Promoted at its first silent period, it would run the ping-pong in
/// the kernel, where busy small messages are slower than on splice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_then_busy_connection_stays_in_userspace() {
    let backend = Backend::echo("echo").await;
    let proxy = auto_proxy(&backend, FAST).await;
    bounded(60, "silence, then ping-pong", async {
        let mut s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        s.set_nodelay(true).unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        ping_pong(&mut s, 0x7600, 0, 5000, 100).await;
        end_of_echo(&mut s).await;
    })
    .await;
    proxy.wait_conn_lines(1, 10).await;
    let line = only_conn(&proxy);
    assert_eq!(line["plane"], "splice", "busy after silence stays: {line}");
    assert!(line["promoted_ms"].is_null(), "{line}");
}

/// sockperf's whole shape: silence, one small warm-up round trip, silence,
/// then ping-pong flat out. The warm-up's period is light; the next one
/// that carries anything is busy. Returns the close line.
async fn warm_up_then_busy(extra: &[&str]) -> serde_json::Value {
    let backend = Backend::echo("echo").await;
    let proxy = auto_proxy(&backend, extra).await;
    bounded(60, "warm-up, then ping-pong", async {
        let mut s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        s.set_nodelay(true).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let at = ping_pong(&mut s, 0x7a00, 0, 1, 100).await;
        // The ping-pong starts mid-period (about 700 ms in), so that
        // period is busy however the periods fall against the client's clock.
        tokio::time::sleep(Duration::from_millis(400)).await;
        ping_pong(&mut s, 0x7a00, at, 5000, 100).await;
        end_of_echo(&mut s).await;
    })
    .await;
    proxy.wait_conn_lines(1, 10).await;
    only_conn(&proxy)
}

/// One light period is not enough (`--promote-periods` is 2 by default):
/// the warm-up does not move the connection, and the busy period after it
/// starts the count again, so the ping-pong runs on splice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_then_busy_connection_stays_in_userspace() {
    let line = warm_up_then_busy(FAST).await;
    assert_eq!(
        line["plane"], "splice",
        "busy after a warm-up stays: {line}"
    );
    assert!(line["promoted_ms"].is_null(), "{line}");
}

/// What the default avoids: with `--promote-periods 1` the warm-up moves
/// the connection in, and both directions leave again as the ping-pong
/// turns them busy, for the rest of the connection on the demoted path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_promotes_with_one_period_and_busy_sends_it_back() {
    let extra = [FAST, &["--promote-periods", "1"]].concat();
    let line = warm_up_then_busy(&extra).await;
    assert!(
        line["promoted_ms"].is_u64(),
        "promoted at the warm-up: {line}"
    );
    assert_eq!(line["demoted_busy"], 2, "{line}");
}

/// The busy rule under load: many connections at once, the second half
/// under a CPU hog, each chatting until it is promoted, ping-ponging until
/// its directions leave busy, then chatting again. Every byte is checked by
/// position, and the FIN ledger must never fire.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_connections_turn_busy_and_lose_nothing() {
    const CONNS: u64 = 16;
    let backend = Backend::echo("echo").await;
    let proxy = auto_proxy(&backend, FAST).await;
    let addr = proxy.addr(0, 0);
    let one = |tag: u64| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        // 30 messages 20 ms apart: two whole light periods and then some.
        let at = chat(&mut s, tag, 0, 30, 200).await;
        let at = ping_pong(&mut s, tag, at, 2000, 100).await;
        chat(&mut s, tag, at, 5, 300).await;
        end_of_echo(&mut s).await;
    };
    let batch = |first: u64| {
        let runs: Vec<_> = (first..first + CONNS)
            .map(|i| tokio::spawn(one(0x7800 + i)))
            .collect();
        async move {
            for r in runs {
                r.await.expect("a connection's task");
            }
        }
    };
    bounded(120, "calm batch", batch(0)).await;
    {
        let _hog = CpuHog::new(2, Duration::from_secs(120));
        bounded(120, "batch under a CPU hog", batch(CONNS)).await;
    }
    let lines = proxy.wait_conn_lines(2 * CONNS as usize, 10).await;
    let promoted = lines.iter().filter(|l| l["promoted_ms"].is_u64()).count();
    let busy: u64 = lines
        .iter()
        .filter_map(|l| l["demoted_busy"].as_u64())
        .sum();
    eprintln!(
        "{} connections: {promoted} promoted, {busy} directions left busy",
        lines.len()
    );
    assert_eq!(lines.len(), 2 * CONNS as usize, "{lines:?}");
    assert!(lines.iter().all(|l| l["end"] == "closed"), "{lines:?}");
    // Measured: all 32 promoted, all 64 directions left busy (3 runs).
    assert!(promoted as u64 >= CONNS, "too few promoted: {lines:?}");
    assert!(busy > 0, "no direction left the kernel busy: {lines:?}");
    let metrics = http_get(&admin_addr(&proxy), "/metrics").await.unwrap().1;
    assert_eq!(
        metric(&metrics, r#"proxy_fin_ledger_failures_total{app="app"}"#),
        0.0
    );
}

//! Accepting PROXY protocol headers from a load balancer in front
//! (`AcceptProxyProtocol`) and per-client limits, through the real binary:
//! the real client is logged, limited and passed on; forged, malformed and
//! slow headers are refused and counted.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::generations::{scratch, Setup};
use common::seq::{SeqCheck, SeqGen};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A v2 PROXY header for a TCP4 client.
fn v2(src: &str, dst: &str) -> Vec<u8> {
    let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    let ip = |a: SocketAddr| match a.ip() {
        std::net::IpAddr::V4(v4) => v4.octets(),
        _ => unreachable!(),
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    h.extend_from_slice(&ip(src));
    h.extend_from_slice(&ip(dst));
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

/// `v2`, with one NOOP TLV (type 0x04) of `tlv` bytes in all after the
/// addresses, as a load balancer adding TLS details might send.
fn v2_with_tlv(src: &str, dst: &str, tlv: u16) -> Vec<u8> {
    let mut h = v2(src, dst);
    h[14..16].copy_from_slice(&(12 + tlv).to_be_bytes());
    h.push(0x04);
    h.extend_from_slice(&(tlv - 3).to_be_bytes());
    h.resize(h.len() + usize::from(tlv - 3), 0);
    h
}

/// Reads the v1 line the proxy sends on, reports it, then echoes.
async fn v1_reader(tx: mpsc::UnboundedSender<String>) -> Backend {
    Backend::with("pp", move |mut s| {
        let tx = tx.clone();
        async move {
            let mut line = Vec::new();
            while !line.ends_with(b"\r\n") {
                line.push(s.read_u8().await?);
            }
            let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
            echo_conn(s).await
        }
    })
    .await
}

/// A connection through the proxy as `src` behind a v2 sender, checked to
/// reach the echo behind it.
async fn through(addr: SocketAddr, src: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    let mut out = v2(src, "198.51.100.1:443");
    out.extend_from_slice(b"ping");
    s.write_all(&out).await?;
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await?;
    assert_eq!(&back, b"ping");
    Ok(s)
}

fn accept(trusted: &str, timeout: &str) -> serde_json::Value {
    serde_json::json!({"TrustedSources": [trusted], "Timeout": timeout})
}

planes!(header_is_no_loss_at_the_fin);

/// The proxy reads a client's PROXY header and forwards none of it, yet
/// the client socket's TCP counts it as received. The fastpath's FIN
/// ledger, which compares what TCP received with what went on, must count
/// it, or every such connection that reaches the kernel is reset at its
/// FIN as a loss. (The header carries 1.5 KiB of TLVs, so its length is
/// not one a wrong constant could match.) The client chats (light: auto moves it into the kernel),
/// half-closes, and must get its whole echo, in order, then a FIN.
async fn header_is_no_loss_at_the_fin(mode: &str) {
    let backend = Backend::echo("echo").await;
    let mut app = AppSpec::new("app", 1, vec![backend.target()]);
    app.extra
        .insert("AcceptProxyProtocol".into(), accept("127.0.0.0/8", "1s"));
    let flags = [
        "--promote-after",
        "100ms",
        "--promote-periods",
        "1",
        "--admin-address",
        "127.0.0.1:0",
        "--health-interval",
        "1h",
    ];
    let proxy = Proxy::start(mode, &[app], &flags).await;
    let (tag, piece, pieces) = (0xacc0_5eed_u64, 64, 30);
    let total = (piece * pieces) as u64;
    bounded(30, "a chat behind a PROXY header", async {
        let mut s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        // 1,500 bytes of TLVs: over the 1 KiB this reader once refused.
        let header = v2_with_tlv("203.0.113.9:1000", "198.51.100.1:443", 1500);
        s.write_all(&header).await.unwrap();
        let (mut gen, mut check) = (SeqGen::new(tag, total), SeqCheck::new(tag));
        let mut buf = vec![0u8; piece];
        for _ in 0..pieces {
            let n = gen.fill(&mut buf);
            s.write_all(&buf[..n]).await.unwrap();
            let mut back = vec![0u8; n];
            s.read_exact(&mut back).await.unwrap();
            check.feed(&back);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let end = s.read_to_end(&mut rest).await;
        assert!(end.is_ok(), "{mode}: after the half-close: {end:?}");
        check.feed(&rest);
        check.finish(total).unwrap();
    })
    .await;
    let lines = proxy.wait_conn_lines(1, 10).await;
    let line = &lines[0];
    assert_eq!(line["end"], "closed", "{line}");
    let plane = match mode {
        "auto" => "fastpath",
        m => m,
    };
    assert_eq!(line["plane"], plane, "{line}");
    let (_, m) = http_get(&admin_addr(&proxy), "/metrics").await.unwrap();
    assert_eq!(
        metric(&m, r#"proxy_fin_ledger_failures_total{app="app"}"#),
        0.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_client_is_logged_limited_and_passed_on() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let backend = v1_reader(tx).await;
    let mut edge = AppSpec::new("edge", 1, vec![backend.target()]);
    edge.proxy_protocol = Some("v1");
    edge.extra
        .insert("AcceptProxyProtocol".into(), accept("127.0.0.0/8", "1s"));
    edge.extra
        .insert("MaxConnectionsPerClient".into(), 2.into());
    let mut other = AppSpec::new("other", 1, vec![backend.target()]);
    other.proxy_protocol = Some("v1");
    other
        .extra
        .insert("AcceptProxyProtocol".into(), accept("127.0.0.1", "1s"));
    let mut proxy = Proxy::spawn(
        "splice",
        &[edge, other],
        &[
            "--admin-address",
            "127.0.0.1:0",
            "--max-connections-per-client",
            "3",
            // No probes: the backend sees clients only.
            "--health-interval",
            "1h",
        ],
    )
    .await;
    proxy.wait_ready().await.unwrap();
    let admin = admin_addr(&proxy);
    let (edge, other) = (proxy.addr(0, 0), proxy.addr(1, 0));
    bounded(30, "accept proxy", async {
        // Passed on as the target's own PROXY header, and logged.
        let first = through(edge, "203.0.113.7:4444").await.unwrap();
        assert_eq!(
            rx.recv().await.unwrap(),
            "PROXY TCP4 203.0.113.7 198.51.100.1 4444 443\r\n"
        );
        // The app's limit (2) counts 203.0.113.7, though every connection
        // comes from 127.0.0.1: a third is refused, another client is not.
        let second = through(edge, "203.0.113.7:4445").await.unwrap();
        assert!(
            through(edge, "203.0.113.7:4446").await.is_err(),
            "third connection served"
        );
        let another = through(edge, "203.0.113.8:1").await.unwrap();
        // The global per-client limit (3) spans apps.
        let third = through(other, "203.0.113.7:5000").await.unwrap();
        assert!(
            through(other, "203.0.113.7:5001").await.is_err(),
            "fourth connection served"
        );
        let (_, m) = http_get(&admin, "/metrics").await.unwrap();
        let refused = |app: &str, limit: &str| {
            metric(
                &m,
                &format!(r#"proxy_connections_refused_total{{app="{app}",limit="{limit}"}}"#),
            )
        };
        assert_eq!(refused("edge", "per_app_client"), 1.0);
        assert_eq!(refused("other", "per_client"), 1.0);
        // Freed slots are given back: the client gets in again.
        drop((first, second, third, another));
        let lines = proxy.wait_conn_lines(4, 10).await;
        let clients: Vec<&str> = lines.iter().filter_map(|l| l["client"].as_str()).collect();
        assert!(clients.contains(&"203.0.113.7:4444"), "{clients:?}");
        assert!(clients.contains(&"203.0.113.8:1"), "{clients:?}");
        through(edge, "203.0.113.7:4447").await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_malformed_and_slow_headers_are_refused() {
    let echo = Backend::echo("echo").await;
    let mut untrusted = AppSpec::new("untrusted", 1, vec![echo.target()]);
    untrusted
        .extra
        .insert("AcceptProxyProtocol".into(), accept("192.0.2.0/24", "1s"));
    let mut strict = AppSpec::new("strict", 1, vec![echo.target()]);
    strict
        .extra
        .insert("AcceptProxyProtocol".into(), accept("127.0.0.1", "300ms"));
    let mut proxy = Proxy::spawn(
        "copy",
        &[untrusted, strict],
        &["--admin-address", "127.0.0.1:0", "--health-interval", "1h"],
    )
    .await;
    proxy.wait_ready().await.unwrap();
    let admin = admin_addr(&proxy);
    bounded(30, "refused headers", async {
        // A well-formed header from a source that is not trusted.
        assert!(through(proxy.addr(0, 0), "203.0.113.7:1").await.is_err());
        // Malformed: a client speaking without a header; a bad v1 line.
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PROXY TCP4 1.2.3.4 nope 1 2\r\n",
        ] {
            let mut s = TcpStream::connect(proxy.addr(1, 0)).await.unwrap();
            s.write_all(bad).await.unwrap();
            let mut b = [0u8; 1];
            assert!(
                !matches!(s.read(&mut b).await, Ok(1..)),
                "answered a bad header"
            );
        }
        // Slow: half a header, then nothing.
        let mut s = TcpStream::connect(proxy.addr(1, 0)).await.unwrap();
        s.write_all(&v2("203.0.113.7:1", "198.51.100.1:443")[..20])
            .await
            .unwrap();
        let mut b = [0u8; 1];
        let cut = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
        assert!(
            matches!(cut, Ok(Ok(0) | Err(_))),
            "slow header not cut: {cut:?}"
        );
        let (_, m) = http_get(&admin, "/metrics").await.unwrap();
        let failed = |app: &str, reason: &str| {
            metric(
                &m,
                &format!(
                    r#"proxy_accept_proxy_header_failures_total{{app="{app}",reason="{reason}"}}"#
                ),
            )
        };
        assert_eq!(failed("untrusted", "untrusted"), 1.0);
        assert_eq!(failed("strict", "malformed"), 2.0);
        assert_eq!(failed("strict", "timeout"), 1.0);
        // Every accepted client ends under some `end`: these four too.
        for (app, n) in [("untrusted", 1.0), ("strict", 3.0)] {
            let series =
                |name: &str, end: &str| metric(&m, &format!(r#"{name}{{app="{app}"{end}}}"#));
            assert_eq!(series("proxy_connections_accepted_total", ""), n);
            assert_eq!(
                series("proxy_connections_total", r#",end="proxy_header""#),
                n,
                "{m}"
            );
        }
        assert_eq!(
            echo.accepted.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "a refused client reached the target"
        );
    })
    .await;
}

/// A connection an upgrade moves keeps the address its client's PROXY
/// header named: the new process's access log says where the client
/// connected (the load balancer's front), not the proxy's own address,
/// which is all the moved socket can tell it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_connection_keeps_its_header_addresses() {
    let access = scratch("access.jsonl");
    let access_arg = access.display().to_string();
    let s = Setup::with("copy", &["--access-log", &access_arg]).await;
    let backend = Backend::echo("echo").await;
    let mut app = AppSpec::new("app", 1, vec![backend.target()]);
    app.extra
        .insert("AcceptProxyProtocol".into(), accept("127.0.0.0/8", "1s"));
    let config = write_temp("config.json", &config_json(&[app], &[vec![s.addr.port()]]));
    let proxy = Path::new(PROXY);
    let mut old = s.launch(proxy, &config, false).await.unwrap();
    let line = bounded(40, "a moved connection", async {
        let mut c = through(s.addr, "203.0.113.7:4444").await.unwrap();
        let mut new = s.launch(proxy, &config, true).await.unwrap();
        assert!(
            old.proxy.wait_exit(15).await.is_some_and(|st| st.success()),
            "old proxy did not hand over; log:\n{}",
            old.proxy.log()
        );
        // Carried by the new process now, to its end.
        c.write_all(b"pong").await.unwrap();
        let mut back = [0u8; 4];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"pong");
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        let lines = new.proxy.wait_conn_lines(1, 10).await;
        assert_eq!(lines.len(), 1, "close lines: {lines:?}");
        new.proxy.signal(libc::SIGTERM);
        new.proxy.wait_exit(15).await;
        let text = std::fs::read_to_string(&access).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["client"] == "203.0.113.7:4444")
            .unwrap_or_else(|| panic!("no access-log entry for the client:\n{text}"))
    })
    .await;
    let _ = std::fs::remove_file(&access);
    assert_eq!(line["local"], "198.51.100.1:443", "{line}");
    assert_eq!(line["bytes_in"], 8, "{line}");
}

/// The drain deadline reaches a client still sending its PROXY header
/// (its app waits up to 30 s for it): a reset and a close line with
/// `end="drain_timeout"`, at the deadline. Before, the header read did not
/// watch the hard stop: the client got a FIN when the process exited, and
/// no record was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_deadline_resets_a_client_mid_header() {
    let echo = Backend::echo("echo").await;
    let mut app = AppSpec::new("app", 1, vec![echo.target()]);
    app.extra
        .insert("AcceptProxyProtocol".into(), accept("127.0.0.0/8", "30s"));
    let mut proxy = Proxy::spawn("copy", &[app], &["--drain-timeout", "500ms"]).await;
    proxy.wait_ready().await.unwrap();
    bounded(30, "a header cut by the drain deadline", async {
        let mut s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        // Half a v2 header, then nothing.
        s.write_all(&v2("203.0.113.7:4444", "198.51.100.1:443")[..10])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        proxy.signal(libc::SIGTERM);
        let status = proxy.wait_exit(10).await.expect("exits");
        assert!(status.success(), "{status:?}");
        expect_reset(&mut s).await;
    })
    .await;
    let lines = proxy.conn_lines();
    assert_eq!(lines.len(), 1, "{}", proxy.log());
    assert_eq!(lines[0]["end"], "drain_timeout", "{}", lines[0]);
}

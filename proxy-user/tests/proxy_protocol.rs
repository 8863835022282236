//! PROXY protocol v1/v2 headers towards targets.

#[macro_use]
mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

planes!(
    proxy_protocol_v1_then_payload,
    proxy_protocol_v2_then_payload
);

/// Reads a PROXY header (v1 or v2), reports (client, destination), echoes the rest.
async fn header_reader(tx: mpsc::UnboundedSender<(SocketAddr, SocketAddr)>) -> Backend {
    Backend::with("pp", move |mut s| {
        let tx = tx.clone();
        async move {
            let mut first = [0u8; 16];
            s.read_exact(&mut first[..5]).await?;
            let addrs = if &first[..5] == b"PROXY" {
                let mut line = first[..5].to_vec();
                while !line.ends_with(b"\r\n") {
                    line.push(s.read_u8().await?);
                }
                let text = String::from_utf8(line).unwrap();
                let f: Vec<&str> = text.trim_end().split(' ').collect();
                assert_eq!(f[1], "TCP4", "{text}");
                (
                    SocketAddr::new(f[2].parse().unwrap(), f[4].parse().unwrap()),
                    SocketAddr::new(f[3].parse().unwrap(), f[5].parse().unwrap()),
                )
            } else {
                s.read_exact(&mut first[5..]).await?;
                assert_eq!(&first[..12], b"\r\n\r\n\0\r\nQUIT\n");
                assert_eq!(first[12], 0x21);
                assert_eq!(first[13], 0x11);
                let len = u16::from_be_bytes([first[14], first[15]]) as usize;
                let mut a = vec![0u8; len];
                s.read_exact(&mut a).await?;
                let ip = |o: usize| std::net::Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]);
                let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
                (
                    SocketAddr::new(ip(0).into(), port(8)),
                    SocketAddr::new(ip(4).into(), port(10)),
                )
            };
            let _ = tx.send(addrs);
            echo_conn(s).await
        }
    })
    .await
}

async fn check(mode: &str, version: &'static str) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let backend = header_reader(tx).await;
    let mut spec = AppSpec::new("pp", 1, vec![backend.target()]);
    spec.proxy_protocol = Some(version);
    let proxy = Proxy::start(mode, &[spec], &["--health-interval", "1h"]).await;
    bounded(30, "proxy protocol", async {
        let s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        let me = s.local_addr().unwrap();
        // The header precedes the payload, and the payload is intact.
        echo_check_stream(s, 4, 300_000).await.unwrap();
        let (src, dst) = rx.recv().await.unwrap();
        assert_eq!(src, me, "target must see the real client");
        assert_eq!(dst, proxy.addr(0, 0));
    })
    .await;
    let lines = proxy.wait_conn_lines(1, 5).await;
    // Header bytes are not client bytes.
    assert_eq!(lines[0]["bytes_in"], 300_000);
}

async fn proxy_protocol_v1_then_payload(mode: &str) {
    check(mode, "v1").await
}

async fn proxy_protocol_v2_then_payload(mode: &str) {
    check(mode, "v2").await
}

//! Reading the PROXY protocol header (v1 or v2, haproxy.org's
//! proxy-protocol.txt) a load balancer in front sends before its client's
//! bytes, for apps with `AcceptProxyProtocol`. Exactly the header is read:
//! the client's first bytes stay in the socket for the data plane.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::ops::metrics::HeaderFailure;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The shortest header of either version: `PROXY UNKNOWN\r\n`.
const MIN_HEADER: usize = 15;
/// The longest v1 line, CRLF included (the spec's 107).
const MAX_V1: usize = 107;
/// The longest v2 address block (TCP over IPv6); TLVs follow it.
const V2_ADDRESSES: usize = 36;

/// The client and the address it connected to, as the sender saw them;
/// None: the sender speaks for itself (v1 UNKNOWN, v2 LOCAL or a family
/// other than TCP), so the socket's own addresses stand.
pub(super) type Addrs = Option<(SocketAddr, SocketAddr)>;

#[derive(Debug)]
pub(super) struct Failed {
    pub(super) reason: HeaderFailure,
    pub(super) detail: String,
}

fn malformed(detail: impl Into<String>) -> Failed {
    Failed {
        reason: HeaderFailure::Malformed,
        detail: detail.into(),
    }
}

/// Reads one header from `sock`: its addresses and its length (the bytes
/// of the client's stream it took). Time limits are the caller's.
pub(super) async fn read(sock: &mut TcpStream) -> Result<(Addrs, u32), Failed> {
    let mut head = vec![0u8; MIN_HEADER];
    read_exact(sock, &mut head).await?;
    if head[..12] == V2_SIGNATURE {
        head.resize(16, 0);
        read_exact(sock, &mut head[MIN_HEADER..]).await?;
        // As many address and TLV bytes as the length says (64 KiB at
        // most): only trusted senders get this far, and a load balancer
        // that adds TLS details (HAProxy's `proxy-v2-options ssl,cert-cn`)
        // can pass 1 KiB, which a cap there used to refuse. The addresses
        // are kept (36 bytes at most); the TLVs, skipped, pass through a
        // buffer of at most 4 KiB (made only for them), so a header held
        // open costs no 64 KiB.
        let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
        let mut body = vec![0u8; len.min(V2_ADDRESSES)];
        read_exact(sock, &mut body).await?;
        let mut skip = len - body.len();
        let mut scratch = vec![0u8; skip.min(4096)];
        while skip > 0 {
            let n = skip.min(scratch.len());
            read_exact(sock, &mut scratch[..n]).await?;
            skip -= n;
        }
        let taken = (head.len() + len) as u32;
        return parse_v2(head[12], head[13], &body).map(|a| (a, taken));
    }
    if !head.starts_with(b"PROXY ") {
        return Err(malformed(
            "no PROXY header (neither v1 \"PROXY \" nor the v2 signature)",
        ));
    }
    // A v1 line: byte by byte to its CRLF, so nothing after it is taken.
    while !head.ends_with(b"\r\n") {
        if head.len() >= MAX_V1 {
            return Err(malformed(format!("v1 line longer than {MAX_V1} bytes")));
        }
        let mut b = [0u8; 1];
        read_exact(sock, &mut b).await?;
        head.push(b[0]);
    }
    parse_v1(&head).map(|a| (a, head.len() as u32))
}

async fn read_exact(sock: &mut TcpStream, buf: &mut [u8]) -> Result<(), Failed> {
    sock.read_exact(buf).await.map(drop).map_err(|e| Failed {
        reason: HeaderFailure::Closed,
        detail: format!("closed before the end of the PROXY header: {e}"),
    })
}

fn parse_v1(line: &[u8]) -> Result<Addrs, Failed> {
    let text = std::str::from_utf8(&line[..line.len() - 2])
        .map_err(|_| malformed("v1 line is not ASCII"))?;
    let parts: Vec<&str> = text.split(' ').collect();
    match parts[..] {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        ["PROXY", fam @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let ip = |s: &str| -> Result<IpAddr, Failed> {
                let ip: IpAddr = match fam {
                    "TCP4" => s.parse::<Ipv4Addr>().map(IpAddr::V4),
                    _ => s.parse::<Ipv6Addr>().map(IpAddr::V6),
                }
                .map_err(|_| malformed(format!("v1 {fam} address {s:?}")))?;
                Ok(ip)
            };
            let port = |s: &str| -> Result<u16, Failed> {
                // The spec allows no leading zeros or signs.
                s.parse::<u16>()
                    .ok()
                    .filter(|p| p.to_string() == s)
                    .ok_or_else(|| malformed(format!("v1 port {s:?}")))
            };
            Ok(Some((
                SocketAddr::new(ip(src)?, port(sport)?),
                SocketAddr::new(ip(dst)?, port(dport)?),
            )))
        }
        _ => Err(malformed(format!("v1 line {text:?}"))),
    }
}

fn parse_v2(ver_cmd: u8, fam: u8, body: &[u8]) -> Result<Addrs, Failed> {
    if ver_cmd >> 4 != 2 {
        return Err(malformed(format!("v2 version {}", ver_cmd >> 4)));
    }
    match ver_cmd & 0x0f {
        0 => return Ok(None), // LOCAL: the sender's own connection
        1 => {}
        c => return Err(malformed(format!("v2 command {c}"))),
    }
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    match fam {
        0x11 if body.len() >= 12 => {
            let ip = |b: &[u8]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
            Ok(Some((
                SocketAddr::new(ip(&body[0..4]), port(&body[8..10])),
                SocketAddr::new(ip(&body[4..8]), port(&body[10..12])),
            )))
        }
        0x21 if body.len() >= 36 => {
            let ip = |b: &[u8]| {
                let mut a = [0u8; 16];
                a.copy_from_slice(b);
                IpAddr::V6(Ipv6Addr::from(a))
            };
            Ok(Some((
                SocketAddr::new(ip(&body[0..16]), port(&body[32..34])),
                SocketAddr::new(ip(&body[16..32]), port(&body[34..36])),
            )))
        }
        0x11 | 0x21 => Err(malformed(format!(
            "v2 addresses cut short ({} bytes)",
            body.len()
        ))),
        // UNSPEC, UDP, unix sockets: nothing we can use as a TCP client.
        0x00 | 0x12 | 0x22 | 0x31 | 0x32 => Ok(None),
        // The spec: other values "must be rejected as invalid".
        _ => Err(malformed(format!(
            "v2 address family and protocol byte {fam:#04x} is not one the protocol defines"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProxyProtocol;
    use crate::upstream::proxy_protocol::{header, local_header};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_lines() {
        let ok = parse_v1(b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 5001\r\n").unwrap();
        assert_eq!(
            ok,
            Some((addr("192.0.2.1:40000"), addr("198.51.100.2:5001")))
        );
        let ok = parse_v1(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n").unwrap();
        assert_eq!(ok, Some((addr("[2001:db8::1]:1"), addr("[2001:db8::2]:2"))));
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n").unwrap(), None);
        for bad in [
            &b"PROXY TCP4 192.0.2.1 198.51.100.2 40000\r\n"[..],
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 70000 2\r\n",
            b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n",
        ] {
            assert!(parse_v1(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    /// The family byte: the defined ones that carry no TCP client pass as
    /// "no address"; undefined ones are refused, as the spec asks (they
    /// were taken as "no address", so garbage from a trusted sender made
    /// the load balancer itself the client).
    #[test]
    fn v2_family_bytes() {
        let v4 = [192, 0, 2, 1, 198, 51, 100, 2, 0x9c, 0x40, 0x13, 0x89];
        let cases: [(u8, bool); 9] = [
            (0x11, true),
            (0x00, true),
            (0x12, true),
            (0x22, true),
            (0x31, true),
            (0x32, true),
            (0x44, false),
            (0x13, false),
            (0xff, false),
        ];
        for (fam, valid) in cases {
            let got = parse_v2(0x21, fam, &v4);
            assert_eq!(got.is_ok(), valid, "family {fam:#04x}: {got:?}");
        }
    }

    /// What our own sender writes, our reader reads back.
    #[tokio::test]
    async fn round_trips_with_the_sender() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (c, d) = (addr("192.0.2.1:40000"), addr("198.51.100.2:5001"));
        let (c6, d6) = (addr("[2001:db8::1]:1"), addr("[2001:db8::2]:443"));
        let cases = [
            (header(ProxyProtocol::V1, c, d), Some((c, d))),
            (header(ProxyProtocol::V2, c, d), Some((c, d))),
            (header(ProxyProtocol::V1, c6, d6), Some((c6, d6))),
            (header(ProxyProtocol::V2, c6, d6), Some((c6, d6))),
            (local_header(ProxyProtocol::V1), None),
            (local_header(ProxyProtocol::V2), None),
        ];
        for (h, want) in cases {
            let mut out = tokio::net::TcpStream::connect(l.local_addr().unwrap())
                .await
                .unwrap();
            let (mut sock, _) = l.accept().await.unwrap();
            let mut sent = h.clone();
            sent.extend_from_slice(b"payload");
            tokio::io::AsyncWriteExt::write_all(&mut out, &sent)
                .await
                .unwrap();
            // The length counts in the FIN ledger: exactly the header.
            assert_eq!(read(&mut sock).await.unwrap(), (want, h.len() as u32));
            let mut rest = [0u8; 7];
            sock.read_exact(&mut rest).await.unwrap();
            assert_eq!(&rest, b"payload", "the header's reader took client bytes");
        }
    }
}

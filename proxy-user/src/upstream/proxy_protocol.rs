//! PROXY protocol v1/v2 headers (haproxy.org/download/2.9/doc/proxy-protocol.txt),
//! sent to a target before any client byte so it sees the real client
//! address instead of the proxy's.

use std::net::{IpAddr, SocketAddr};

use crate::config::ProxyProtocol;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A dual-stack (`::`) listener reports IPv4 clients as `::ffff:a.b.c.d`;
/// targets expect them as plain IPv4.
fn unmap(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// `client`: the client's address; `local`: the address it connected to.
pub fn header(version: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (src, dst) = (unmap(client), unmap(local));
    match version {
        ProxyProtocol::V1 => match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                format!("PROXY TCP4 {s} {d} {} {}\r\n", src.port(), dst.port()).into_bytes()
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                format!("PROXY TCP6 {s} {d} {} {}\r\n", src.port(), dst.port()).into_bytes()
            }
            // Mixed families cannot be expressed; the spec says UNKNOWN.
            _ => b"PROXY UNKNOWN\r\n".to_vec(),
        },
        ProxyProtocol::V2 => {
            let mut h = V2_SIGNATURE.to_vec();
            h.push(0x21); // version 2, command PROXY
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    h.push(0x11); // AF_INET, STREAM
                    h.extend_from_slice(&12u16.to_be_bytes());
                    h.extend_from_slice(&s.octets());
                    h.extend_from_slice(&d.octets());
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    h.push(0x21); // AF_INET6, STREAM
                    h.extend_from_slice(&36u16.to_be_bytes());
                    h.extend_from_slice(&s.octets());
                    h.extend_from_slice(&d.octets());
                }
                _ => {
                    h.push(0x00); // AF_UNSPEC: receiver uses the real addresses
                    h.extend_from_slice(&0u16.to_be_bytes());
                    return h;
                }
            }
            h.extend_from_slice(&src.port().to_be_bytes());
            h.extend_from_slice(&dst.port().to_be_bytes());
            h
        }
    }
}

/// The header of a connection the proxy makes on its own behalf (health
/// probes): v1 `UNKNOWN`, v2 command `LOCAL`; the spec's way of saying
/// there is no client, so the receiver uses the real addresses.
pub fn local_header(version: ProxyProtocol) -> Vec<u8> {
    match version {
        ProxyProtocol::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        ProxyProtocol::V2 => {
            let mut h = V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[0x20, 0x00, 0, 0]); // v2 LOCAL, AF_UNSPEC, no addresses
            h
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_lines() {
        let c: SocketAddr = "192.0.2.1:40000".parse().unwrap();
        let l: SocketAddr = "198.51.100.2:5001".parse().unwrap();
        assert_eq!(
            header(ProxyProtocol::V1, c, l),
            b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 5001\r\n"
        );
        let c6: SocketAddr = "[2001:db8::1]:40000".parse().unwrap();
        let l6: SocketAddr = "[2001:db8::2]:443".parse().unwrap();
        assert_eq!(
            header(ProxyProtocol::V1, c6, l6),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 443\r\n"
        );
        // IPv4 clients on a dual-stack listener are reported as IPv4.
        let mc: SocketAddr = "[::ffff:192.0.2.1]:40000".parse().unwrap();
        let ml: SocketAddr = "[::ffff:198.51.100.2]:5001".parse().unwrap();
        assert_eq!(
            header(ProxyProtocol::V1, mc, ml),
            header(ProxyProtocol::V1, c, l)
        );
        assert_eq!(header(ProxyProtocol::V1, c, l6), b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn v2_binary() {
        let c: SocketAddr = "192.0.2.1:40000".parse().unwrap();
        let l: SocketAddr = "198.51.100.2:5001".parse().unwrap();
        let h = header(ProxyProtocol::V2, c, l);
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12);
        assert_eq!(&h[16..20], &[192, 0, 2, 1]);
        assert_eq!(&h[20..24], &[198, 51, 100, 2]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 40000);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 5001);
        assert_eq!(h.len(), 28);
        let c6: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        let l6: SocketAddr = "[2001:db8::2]:2".parse().unwrap();
        assert_eq!(header(ProxyProtocol::V2, c6, l6).len(), 16 + 36);
    }
}

//! Listening sockets already on a port this proxy is about to steer.
//!
//! sk_lookup runs before the kernel's own listener lookup, so steering a
//! port on which, say, a proxy with `--steering listeners` listens would
//! silently take that proxy's connections. Nothing in our maps can tell;
//! the kernel's socket tables can, so this runs before a port goes into
//! `PORTS`.

use std::collections::{BTreeSet, HashSet};
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context, Result};
use socket2::{Domain, Socket, Type};

/// Refuses when a socket already listens where connections to `steered`
/// (`--listen-address`; unspecified means every local address, as the
/// program steers them) on one of `ports` would find it. `own` is this
/// proxy's steering socket, which may sit on a configured port.
pub fn check_listeners(steered: IpAddr, ports: &[u16], own: Option<SocketAddr>) -> Result<()> {
    let wanted: HashSet<u16> = ports.iter().copied().collect();
    let mut taken = BTreeSet::new();
    for port in listening_ports()? {
        if !wanted.contains(&port) || own.is_some_and(|own| own.port() == port) {
            continue;
        }
        if listener_at(SocketAddr::new(steered, port))? {
            taken.insert(port);
        }
    }
    if taken.is_empty() {
        return Ok(());
    }
    let place = if steered.is_unspecified() {
        format!("on a local address (--listen-address {steered} steers every one)")
    } else {
        format!("on {steered}")
    };
    bail!(
        "{} {place} already {} a listening socket (another process: for instance a proxy with \
         --steering listeners); sk_lookup runs before the kernel's listener lookup and would take \
         its connections without a word: stop that process, or remove {} from this config",
        port_list(&taken),
        if taken.len() == 1 { "has" } else { "have" },
        if taken.len() == 1 { "it" } else { "them" },
    )
}

/// Every port some socket in this network namespace listens on, whatever
/// its address: one read of /proc/net/tcp{,6} narrows 10,000 ports to the
/// few that `listener_at` must decide (a bind test costs ~20 us a port).
fn listening_ports() -> Result<BTreeSet<u16>> {
    const TCP_LISTEN: &str = "0A";
    let mut ports = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(text) => text,
            // No IPv6 in this kernel: no IPv6 listeners either.
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {table}")),
        };
        // "sl local_address rem_address st ...", addresses as HEXIP:HEXPORT.
        for line in text.lines().skip(1) {
            let mut fields = line.split_whitespace().skip(1);
            let (Some(local), Some(_remote), Some(state)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if state != TCP_LISTEN {
                continue;
            }
            if let Some(port) = local
                .rsplit(':')
                .next()
                .and_then(|hex| u16::from_str_radix(hex, 16).ok())
            {
                ports.insert(port);
            }
        }
    }
    Ok(ports)
}

/// Whether binding `addr` clashes with a listener. A throwaway bind asks
/// the kernel itself, which knows what /proc/net/tcp* cannot show: that
/// a wildcard listener covers our address, and whether a `[::]` listener
/// also takes IPv4 (IPV6_V6ONLY). SO_REUSEADDR makes TIME_WAIT and
/// connected sockets on the port (a killed predecessor's steered
/// connections) no clash, so only a listener (or a socket bound there
/// without SO_REUSEADDR) is one. The socket never listens.
fn listener_at(addr: SocketAddr) -> Result<bool> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)
        .context("creating a socket to check for listeners")?;
    sock.set_reuse_address(true)
        .context("setting SO_REUSEADDR on the listener check socket")?;
    if addr.is_ipv6() {
        // As our own listeners bind `::`: IPv4 clients included.
        sock.set_only_v6(false)
            .context("clearing IPV6_V6ONLY on the listener check socket")?;
    }
    match sock.bind(&addr.into()) {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == ErrorKind::AddrInUse => Ok(true),
        Err(e) => Err(e).with_context(|| format!("checking for a listener on {addr}")),
    }
}

/// "port 8000" or "ports 8000-8009, 8100": runs of consecutive ports, the
/// first few only, so 10,000 ports make one readable line.
pub(super) fn port_list(ports: &BTreeSet<u16>) -> String {
    const SHOWN: usize = 8;
    let mut runs: Vec<(u16, u16)> = Vec::new();
    for &p in ports {
        match runs.last_mut() {
            Some((_, end)) if u32::from(*end) + 1 == u32::from(p) => *end = p,
            _ => runs.push((p, p)),
        }
    }
    let mut text: Vec<String> = runs
        .iter()
        .take(SHOWN)
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    if runs.len() > SHOWN {
        let rest: usize = runs[SHOWN..]
            .iter()
            .map(|&(a, b)| usize::from(b - a) + 1)
            .sum();
        text.push(format!("and {rest} more"));
    }
    let noun = if ports.len() == 1 { "port" } else { "ports" };
    format!("{noun} {}", text.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists_read_as_runs() {
        let set = |v: &[u16]| v.iter().copied().collect::<BTreeSet<u16>>();
        assert_eq!(port_list(&set(&[8000])), "port 8000");
        assert_eq!(
            port_list(&set(&[8000, 8001, 8002, 8100, 65535])),
            "ports 8000-8002, 8100, 65535"
        );
        let many: Vec<u16> = (0..20).map(|i| 1000 + i * 10).collect();
        assert_eq!(
            port_list(&set(&many)),
            "ports 1000, 1010, 1020, 1030, 1040, 1050, 1060, 1070, and 12 more"
        );
    }

    #[test]
    fn a_listener_is_a_clash_and_a_free_port_is_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = l.local_addr().unwrap();
        assert!(listening_ports().unwrap().contains(&taken.port()));
        assert!(listener_at(taken).unwrap());
        // The wildcard covers 127.0.0.1 too.
        assert!(listener_at(SocketAddr::new([0, 0, 0, 0].into(), taken.port())).unwrap());
        let err = check_listeners(taken.ip(), &[taken.port()], None).unwrap_err();
        assert!(format!("{err}").contains(&format!("port {} on", taken.port())));
        assert!(check_listeners(taken.ip(), &[taken.port()], Some(taken)).is_ok());
        drop(l);
        assert!(!listener_at(taken).unwrap());
    }
}

//! Where this proxy's own listeners are reached, so a target that points
//! back at the proxy can be refused: validation does it for targets written
//! as an address, the connect path (`upstream::loop_guard`) for names that
//! resolve to one. Such a target turns one client into an endless chain of
//! internal connections.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The addresses a connection can go to and land on our listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// `--listen-address`.
    ip: IpAddr,
    /// The host's own addresses: with an unspecified listen address, a
    /// connection to any of them reaches us.
    host: Vec<IpAddr>,
}

impl Listen {
    pub fn new(ip: IpAddr, host: Vec<IpAddr>) -> Listen {
        Listen {
            ip: ip.to_canonical(),
            host: host.into_iter().map(|a| a.to_canonical()).collect(),
        }
    }

    /// Listening on `ip`; the host's addresses are read now if `ip` is
    /// unspecified (they matter only then).
    pub fn on(ip: IpAddr) -> Listen {
        let host = if ip.is_unspecified() {
            host_addrs()
        } else {
            Vec::new()
        };
        Listen::new(ip, host)
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Whether a connection to `to` (on one of our ports) would be ours.
    pub fn reaches_us(&self, to: IpAddr) -> bool {
        let to = match to.to_canonical() {
            // Linux sends a connect to 0.0.0.0 or :: to the loopback address.
            IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            a => a,
        };
        match self.ip {
            IpAddr::V4(any) if any.is_unspecified() => {
                to.is_ipv4() && (to.is_loopback() || self.host.contains(&to))
            }
            // `::` takes IPv4 too: listeners clear IPV6_V6ONLY.
            IpAddr::V6(any) if any.is_unspecified() => to.is_loopback() || self.host.contains(&to),
            ip => ip == to,
        }
    }
}

impl Default for Listen {
    /// `--listen-address`'s default, 0.0.0.0, knowing only loopback.
    fn default() -> Self {
        Listen::new(Ipv4Addr::UNSPECIFIED.into(), Vec::new())
    }
}

/// The addresses of this host's interfaces (getifaddrs); empty if they
/// cannot be read, which leaves loopback and the connect-time guard.
pub fn host_addrs() -> Vec<IpAddr> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs only writes the list head; freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Vec::new();
    }
    let mut addrs = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive
        // until freeifaddrs; `ifa_addr` is null or a sockaddr whose family
        // field says which sockaddr it is.
        unsafe {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null() {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        addrs.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        addrs.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = ifa.ifa_next;
        }
    }
    // SAFETY: the list from getifaddrs above, freed once.
    unsafe { libc::freeifaddrs(head) };
    addrs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_addresses_reach_us() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let host = vec![ip("10.1.2.3"), ip("fd00::7")];
        let any4 = Listen::new(ip("0.0.0.0"), host.clone());
        let any6 = Listen::new(ip("::"), host);
        let lo = Listen::new(ip("127.0.0.1"), Vec::new());
        let one = Listen::new(ip("10.1.2.3"), Vec::new());
        // (address, 0.0.0.0, ::, 127.0.0.1, 10.1.2.3)
        let cases = [
            ("127.0.0.1", true, true, true, false),
            ("127.9.9.9", true, true, false, false),
            ("0.0.0.0", true, true, true, false),
            ("::ffff:127.0.0.1", true, true, true, false),
            ("::1", false, true, false, false),
            ("::", false, true, false, false),
            ("10.1.2.3", true, true, false, true),
            ("fd00::7", false, true, false, false),
            ("192.0.2.1", false, false, false, false),
        ];
        for (to, a4, a6, l, o) in cases {
            let got = [
                any4.reaches_us(ip(to)),
                any6.reaches_us(ip(to)),
                lo.reaches_us(ip(to)),
                one.reaches_us(ip(to)),
            ];
            assert_eq!(got, [a4, a6, l, o], "{to}");
        }
    }

    #[test]
    fn host_addrs_include_loopback() {
        assert!(host_addrs().iter().any(|a| a.is_loopback()));
    }
}

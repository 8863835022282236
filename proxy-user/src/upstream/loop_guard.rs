//! The connect-time half of "no self-loops". Validation refuses targets
//! that name one of our listeners by address; a name that resolves to one
//! (DNS, /etc/hosts, a shorthand like `127.1`) is caught here, on every
//! resolved address before connecting, so no internal connection is made.
//!
//! One case only shows after connecting: listening on 0.0.0.0 or `::`, an
//! address the host gained since the last reload. A connection from one of
//! the host's addresses to itself has the same address at both ends; that
//! address is then remembered, so the one internal connection it made is
//! refused at its own first connect and the chain ends there.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::config::Listen;

/// Where the running proxy listens; shared by every connect and probe,
/// updated by each reload.
#[derive(Debug, Default)]
pub struct LoopGuard {
    listen: ArcSwap<Listen>,
    /// The listening ports: configured ones and the steering socket's.
    ports: ArcSwap<HashSet<u16>>,
    /// Host addresses found only after connecting to them.
    learned: Mutex<HashSet<IpAddr>>,
}

impl LoopGuard {
    pub fn new(listen: Listen) -> Self {
        LoopGuard {
            listen: ArcSwap::from_pointee(listen),
            ..LoopGuard::default()
        }
    }

    /// A reload re-read the host's addresses.
    pub fn set_listen(&self, listen: Listen) {
        self.listen.store(Arc::new(listen));
    }

    pub fn set_ports(&self, ports: impl IntoIterator<Item = u16>) {
        self.ports.store(Arc::new(ports.into_iter().collect()));
    }

    /// Before connecting: would a connection to `to` land on our listeners?
    pub fn is_ours(&self, to: SocketAddr) -> bool {
        if !self.ports.load().contains(&to.port()) {
            return false;
        }
        self.listen.load().reaches_us(to.ip()) || self.learned().contains(&to.ip().to_canonical())
    }

    /// After connecting from `local` to `peer`: was that one of our
    /// listeners at an address `is_ours` did not know? `local` is asked
    /// for only when it can be (a getsockname per connection otherwise).
    pub fn connected_to_us(
        &self,
        local: impl FnOnce() -> Option<SocketAddr>,
        peer: SocketAddr,
    ) -> bool {
        let ip = peer.ip().to_canonical();
        let ours = self.ports.load().contains(&peer.port())
            && self.listen.load().ip().is_unspecified()
            && local().is_some_and(|local| local.ip().to_canonical() == ip);
        if ours {
            self.learned().insert(ip);
        }
        ours
    }

    fn learned(&self) -> std::sync::MutexGuard<'_, HashSet<IpAddr>> {
        self.learned.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ours_on_our_ports_at_addresses_that_reach_us() {
        let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let g = LoopGuard::new(Listen::new("0.0.0.0".parse().unwrap(), Vec::new()));
        g.set_ports([5000]);
        assert!(g.is_ours(addr("127.0.0.1:5000")));
        assert!(!g.is_ours(addr("127.0.0.1:5001")));
        assert!(!g.is_ours(addr("10.9.9.9:5000")));
        // 10.9.9.9 turned out to be ours: remembered from then on.
        assert!(g.connected_to_us(|| Some(addr("10.9.9.9:40000")), addr("10.9.9.9:5000")));
        assert!(g.is_ours(addr("10.9.9.9:5000")));
        assert!(!g.connected_to_us(|| Some(addr("10.0.0.1:40000")), addr("10.9.9.8:5000")));
        // Not one of our ports: the local address is never asked for.
        assert!(!g.connected_to_us(|| unreachable!(), addr("10.9.9.9:5002")));
        g.set_ports([5001]);
        assert!(!g.is_ours(addr("127.0.0.1:5000")));
    }
}

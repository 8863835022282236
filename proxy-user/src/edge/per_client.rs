//! Connections per client address, so one client cannot take a whole
//! app's (or the proxy's) budget: `--max-connections-per-client` over all
//! apps, `MaxConnectionsPerClient` per app. The address is the real
//! client's, the PROXY header's source when the app accepts one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Live connections by client address; an address leaves the map with its
/// last connection, so the map is as large as the clients connected now.
#[derive(Debug, Default)]
pub struct ClientCounts {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl ClientCounts {
    /// Counts one more connection of `ip` unless it holds `cap` already.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<ClientSlot> {
        let ip = ip.to_canonical();
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= cap {
            if *n == 0 {
                counts.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(ClientSlot(self.clone(), ip))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.counts.lock().unwrap().len()
    }
}

/// One connection's place in a `ClientCounts`, given back on drop.
#[derive(Debug)]
pub struct ClientSlot(Arc<ClientCounts>, IpAddr);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.0.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_address_and_forgets_idle_ones() {
        let c = Arc::new(ClientCounts::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = c.try_take(a, 2).unwrap();
        let s2 = c.try_take(mapped, 2).unwrap();
        assert!(
            c.try_take(a, 2).is_none(),
            "the mapped form is the same client"
        );
        let s3 = c.try_take(b, 2).unwrap();
        drop(s1);
        let s4 = c.try_take(a, 2).unwrap();
        drop((s2, s3, s4));
        assert_eq!(c.len(), 0);
    }
}

//! Loopback ports for servers that are told their port in a config file
//! (the bench's peers and ours, the end-to-end runs), so they cannot bind
//! port 0 themselves.
//!
//! A port from the kernel's ephemeral range, which binding port 0 hands
//! out, can be taken meanwhile as the source port of a client's connection
//! (the bench opens tens of thousands), and then the server that binds it
//! fails with EADDRINUSE: a HAProxy did, in round 3 of a full bench run.
//! So the ports come from below that range, where the kernel places no
//! connection unasked, each checked free and handed out once per run.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::sync::Mutex;

use anyhow::{Context, Result};

/// Where the search starts: above the well-known and most registered
/// services' ports.
const FLOOR: u16 = 10_000;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A free loopback port below the ephemeral range, not handed out before
/// by this process. Falls back to one from the range (port 0) when the
/// range starts too low to leave room below it.
pub fn free_port() -> Result<u16> {
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    let ceiling = ephemeral_floor().unwrap_or(32_768);
    if ceiling > FLOOR + 1_000 {
        let span = u64::from(ceiling - FLOOR);
        for _ in 0..1_000 {
            let port = FLOOR + (random() % span) as u16;
            if !handed.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                handed.insert(port);
                return Ok(port);
            }
        }
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .context("binding a loopback port")?
        .local_addr()?
        .port();
    handed.insert(port);
    Ok(port)
}

/// The first port of `net.ipv4.ip_local_port_range`.
fn ephemeral_floor() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// A random number from std's per-process hash keys (no rand crate in
/// xtask for this).
fn random() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_and_distinct() {
        let ceiling = ephemeral_floor().expect("ip_local_port_range is readable");
        let ports: Vec<u16> = (0..200).map(|_| free_port().unwrap()).collect();
        let distinct: HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        if ceiling > FLOOR + 1_000 {
            assert!(
                ports.iter().all(|&p| (FLOOR..ceiling).contains(&p)),
                "{ports:?}"
            );
        }
    }
}

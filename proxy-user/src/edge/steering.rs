//! `--steering sk_lookup`: one listening socket for every configured port.
//!
//! The `steer` sk_lookup program (proxy-ebpf) is attached to this process's
//! network namespace. For a TCP connection whose destination port is in the
//! `PORTS` map (and whose destination address matches `--listen-address`, or
//! any address when that is unspecified), it assigns the proxy's one
//! listening socket (slot 0 of `STEER_SOCKET`) before the kernel's normal
//! listener lookup. The accepted socket keeps the original destination, so
//! `getsockname` names the port and with it the app. A reload rewrites
//! `PORTS` entry by entry; the program stays attached for the life of the
//! process (one attach, detached at exit or when this is dropped).
//!
//! Startup and memory do not grow with the port count: 10,000 ports are
//! 10,000 small map entries, not 10,000 sockets and accept tasks.

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arc_swap::ArcSwap;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, SockMap};
use aya::programs::sk_lookup::SkLookupLinkId;
use aya::programs::SkLookup;
use aya::{Ebpf, EbpfLoader};
use proxy_common::{
    SteerConfig, STEER_MATCH_ANY, STEER_MATCH_ANY4, STEER_MATCH_IP4, STEER_MATCH_IP6,
};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::admission::admit;
use super::listener::accept_until_stopped;
use super::{AppRuntime, RateLimit, Shared};
use crate::bpf::{self, take_map};
use crate::dataplane::arm_reset;

/// How connections find the proxy, from `--steering`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Steering {
    /// One listening socket per configured port.
    Listeners,
    /// One listening socket; an sk_lookup BPF program steers every configured port to it.
    #[value(name = "sk_lookup")]
    SkLookup,
}

/// Destination port -> app, swapped whole by a reload.
pub type PortTable = Arc<ArcSwap<HashMap<u16, Arc<AppRuntime>>>>;

/// The loaded and attached program and the map a reload writes.
pub struct SkLookupSteering {
    ports: BpfHashMap<MapData, u32, u32>,
    /// What `PORTS` holds now: port -> app index.
    current: HashMap<u16, u32>,
    link: Option<SkLookupLinkId>,
    /// Owns the program and its link; dropping it detaches.
    ebpf: Ebpf,
}

/// Linux >= 5.9 and CAP_NET_ADMIN + CAP_BPF (or CAP_SYS_ADMIN), checked up
/// front so `--steering sk_lookup` exits with the reason, not a bare EPERM.
pub fn check_support() -> Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut nums = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    if let (Some(major), Some(minor)) = (nums.next(), nums.next()) {
        if (major, minor) < (5, 9) {
            bail!(
                "kernel {} has no sk_lookup programs (added in Linux 5.9)",
                release.trim()
            );
        }
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok());
    if let Some(caps) = caps {
        let has = |bit: u32| caps & (1 << bit) != 0;
        const NET_ADMIN: u32 = 12;
        const SYS_ADMIN: u32 = 21;
        const BPF: u32 = 39;
        let mut missing = Vec::new();
        if !has(NET_ADMIN) && !has(SYS_ADMIN) {
            missing.push("CAP_NET_ADMIN");
        }
        if !has(BPF) && !has(SYS_ADMIN) {
            missing.push("CAP_BPF");
        }
        if !missing.is_empty() {
            bail!(
                "missing capabilit{} {} (run as root, or grant CAP_BPF and CAP_NET_ADMIN)",
                if missing.len() == 1 { "y" } else { "ies" },
                missing.join(" and ")
            );
        }
    }
    Ok(())
}

/// Where the one listening socket binds and which destinations are steered,
/// from `--listen-address`: a specific address is both; an unspecified one
/// steers every local address to a socket on loopback.
pub fn addresses(listen: IpAddr, port: u16) -> (SocketAddr, SteerConfig) {
    match listen {
        IpAddr::V4(ip) if ip.is_unspecified() => (
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            SteerConfig {
                mode: STEER_MATCH_ANY4,
                ..Default::default()
            },
        ),
        IpAddr::V6(ip) if ip.is_unspecified() => (
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
            SteerConfig {
                mode: STEER_MATCH_ANY,
                ..Default::default()
            },
        ),
        IpAddr::V4(ip) => (
            SocketAddr::from((ip, port)),
            SteerConfig {
                mode: STEER_MATCH_IP4,
                ip4: u32::from_ne_bytes(ip.octets()),
                ..Default::default()
            },
        ),
        IpAddr::V6(ip) => {
            let o = ip.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (
                SocketAddr::from((ip, port)),
                SteerConfig {
                    mode: STEER_MATCH_IP6,
                    ip6: [word(0), word(4), word(8), word(12)],
                    ..Default::default()
                },
            )
        }
    }
}

impl SkLookupSteering {
    /// Loads `steer`, puts `listener` in its socket map and attaches it to
    /// this process's network namespace. `PORTS` starts empty.
    pub fn load(listener: &TcpListener, config: SteerConfig) -> Result<Self> {
        check_support()?;
        let mut loader = EbpfLoader::new();
        // The object also holds the fastpath's maps; this instance never
        // uses them, so they are created as small as the kernel allows.
        for name in ["SOCKETS", "PEERS", "CONTROL", "STATE"] {
            loader.map_max_entries(name, 1);
        }
        loader.map_max_entries("EVENTS", 4096);
        let mut ebpf = bpf::load(&mut loader)?;
        let mut socket: SockMap<MapData> = take_map(&mut ebpf, "STEER_SOCKET")?;
        socket
            .set(0, &listener.as_raw_fd(), 0)
            .context("putting the listening socket into STEER_SOCKET")?;
        let mut cfg: Array<MapData, SteerConfig> = take_map(&mut ebpf, "STEER_CONFIG")?;
        cfg.set(0, config, 0).context("writing STEER_CONFIG")?;
        let ports: BpfHashMap<MapData, u32, u32> = take_map(&mut ebpf, "PORTS")?;
        let program: &mut SkLookup = ebpf
            .program_mut("steer")
            .context("the eBPF object has no `steer` program")?
            .try_into()
            .context("`steer` is not an sk_lookup program")?;
        program
            .load()
            .context("loading the sk_lookup program (verifier output above)")?;
        let netns = File::open("/proc/self/ns/net").context("opening /proc/self/ns/net")?;
        let link = program
            .attach(&netns)
            .context("attaching the sk_lookup program to the network namespace")?;
        Ok(SkLookupSteering {
            ports,
            current: HashMap::new(),
            link: Some(link),
            ebpf,
        })
    }

    /// Makes `PORTS` equal `wanted` (port -> app index): upserts first, then
    /// deletes, so a port that stays is never missing. Returns (added or
    /// changed, removed). On error `PORTS` holds a mix; the next reload
    /// converges it, since `current` tracks what the map really holds.
    pub fn update(&mut self, wanted: &HashMap<u16, u32>) -> Result<(usize, usize)> {
        let mut upserted = 0;
        for (&port, &app) in wanted {
            if self.current.get(&port) != Some(&app) {
                self.ports
                    .insert(u32::from(port), app, 0)
                    .with_context(|| format!("PORTS insert of port {port}"))?;
                self.current.insert(port, app);
                upserted += 1;
            }
        }
        let gone: Vec<u16> = self
            .current
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for &port in &gone {
            self.ports
                .remove(&u32::from(port))
                .with_context(|| format!("PORTS delete of port {port}"))?;
            self.current.remove(&port);
        }
        Ok((upserted, gone.len()))
    }

    pub fn port_count(&self) -> usize {
        self.current.len()
    }

    /// Detaches the program from the network namespace.
    pub fn detach(&mut self) {
        if let Some(link) = self.link.take() {
            if let Some(Ok(program)) = self
                .ebpf
                .program_mut("steer")
                .map(<&mut SkLookup>::try_from)
            {
                if let Err(e) = program.detach(link) {
                    tracing::warn!(error = %e, "detaching the sk_lookup program failed");
                    return;
                }
            }
            tracing::info!("sk_lookup program detached");
        }
    }
}

impl Drop for SkLookupSteering {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Accepts on the one steered socket; the app is the one configured for the
/// port the client connected to.
pub async fn accept_loop(
    l: TcpListener,
    table: PortTable,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let unknown_log = RateLimit::default();
    accept_until_stopped(&l, "sk_lookup", &shared, &mut stop, |sock, peer| {
        let port = match sock.local_addr() {
            Ok(a) => a.port(),
            Err(e) => {
                tracing::debug!(client = %peer, error = %e, "getsockname failed; dropping");
                return;
            }
        };
        match table.load().get(&port) {
            Some(app) => admit(sock, peer, port, app, &shared),
            None => {
                // Steered just before a reload removed its port, or
                // dialled to the listener's own port: refuse with RST.
                if let Some(suppressed) = unknown_log.check() {
                    tracing::debug!(port, client = %peer, suppressed, "no app for this port; refusing");
                }
                arm_reset(&sock);
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_listen_address() {
        let (bind, cfg) = addresses("0.0.0.0".parse().unwrap(), 0);
        assert_eq!(bind, "127.0.0.1:0".parse().unwrap());
        assert_eq!(cfg.mode, STEER_MATCH_ANY4);
        let (bind, cfg) = addresses("::".parse().unwrap(), 7);
        assert_eq!(bind, "[::1]:7".parse().unwrap());
        assert_eq!(cfg.mode, STEER_MATCH_ANY);
        let (bind, cfg) = addresses("127.0.0.9".parse().unwrap(), 0);
        assert_eq!(bind, "127.0.0.9:0".parse().unwrap());
        assert_eq!(cfg.mode, STEER_MATCH_IP4);
        // Network byte order, as the kernel's local_ip4 holds it.
        assert_eq!(cfg.ip4.to_ne_bytes(), [127, 0, 0, 9]);
        let (_, cfg) = addresses("::1".parse().unwrap(), 0);
        assert_eq!(cfg.mode, STEER_MATCH_IP6);
        assert_eq!(cfg.ip6[3].to_ne_bytes(), [0, 0, 0, 1]);
    }
}

//! The `steer` sk_lookup program: loaded, attached to this process's
//! network namespace once, fed through `PORTS`, detached at exit.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, SockMap};
use aya::programs::sk_lookup::SkLookupLinkId;
use aya::programs::SkLookup;
use aya::{Ebpf, EbpfLoader};
use proxy_common::SteerConfig;
use tokio::net::TcpListener;

use super::peers::Ours;
use crate::bpf::{self, take_map};

/// What one `update` changed in `PORTS`.
#[derive(Debug, Default)]
pub struct PortsUpdate {
    /// Ports that were not steered before: the ones to verify.
    pub added: Vec<u16>,
    /// Ports that stayed, for another app.
    pub moved: usize,
    pub removed: usize,
}

/// The loaded and attached program and the map a reload writes.
pub struct SkLookupSteering {
    ports: BpfHashMap<MapData, u32, u32>,
    /// What `PORTS` holds now: port -> app index.
    current: HashMap<u16, u32>,
    link: Option<SkLookupLinkId>,
    ours: Ours,
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
        let info = program
            .info()
            .context("reading the sk_lookup program's id")?;
        let ours = Ours {
            id: info.id(),
            tag: info.tag(),
            config,
        };
        let netns = File::open("/proc/self/ns/net").context("opening /proc/self/ns/net")?;
        let link = program
            .attach(netns)
            .context("attaching the sk_lookup program to the network namespace")?;
        Ok(SkLookupSteering {
            ports,
            current: HashMap::new(),
            link: Some(link),
            ours,
            ebpf,
        })
    }

    /// Makes `PORTS` equal `wanted` (port -> app index): upserts first, then
    /// deletes, so a port that stays is never missing. Returns the ports
    /// new to `PORTS`, how many moved to another app, and how many were
    /// removed. On error `PORTS` holds a mix; the next reload converges it,
    /// since `current` tracks what the map really holds.
    pub fn update(&mut self, wanted: &HashMap<u16, u32>) -> Result<PortsUpdate> {
        let mut done = PortsUpdate::default();
        for (&port, &app) in wanted {
            let before = self.current.get(&port).copied();
            if before != Some(app) {
                self.ports
                    .insert(u32::from(port), app, 0)
                    .with_context(|| format!("PORTS insert of port {port}"))?;
                self.current.insert(port, app);
                match before {
                    None => done.added.push(port),
                    Some(_) => done.moved += 1,
                }
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
            done.removed += 1;
        }
        Ok(done)
    }

    /// What tells our program from the others in the network namespace.
    pub fn ours(&self) -> Ours {
        self.ours
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

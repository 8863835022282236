//! Map sets: one generation's fastpath maps (`SOCKETS`, `PEERS`, `CONTROL`,
//! `STATE`, `EVENTS`), with the waiters and the dispatcher of its ring.
//! A pair lives in the set it was installed in until it closes: a socket
//! must never leave `SOCKETS` while bytes can arrive (NOTES §2), so on an
//! upgrade the maps move to the new process, not the pairs. A process
//! installs new pairs only in its own set (its own program's verdict is
//! attached there) and keeps every *adopted* set while a pair in it lives.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, RingBuf, SockHash};
use aya::Ebpf;
use proxy_common::{FlowControl, FlowState};

use super::events::{Dispatcher, Waiters};
use super::lock;
use crate::dataplane::tcpinfo;

/// The maps of a set, in the order their fds travel.
const NAMES: [&str; 5] = ["SOCKETS", "PEERS", "CONTROL", "STATE", "EVENTS"];
/// Fds per set on the handoff socket.
pub const FDS_PER_SET: usize = NAMES.len();

/// The maps userspace writes: declared in proxy-ebpf's `main.rs`.
pub(super) struct Maps {
    /// Sockets whose received bytes the verdict forwards.
    pub(super) sockets: SockHash<MapData, u64>,
    /// Redirect targets, by cookie.
    pub(super) peers: SockHash<MapData, u64>,
    pub(super) control: BpfHashMap<MapData, u64, FlowControl>,
    pub(super) state: BpfHashMap<MapData, u64, FlowState>,
}

impl Maps {
    /// Entries left in all four maps: 0 once every pair is uninstalled.
    pub(super) fn entries(&self) -> usize {
        self.control.keys().count()
            + self.state.keys().count()
            + self.peers.keys().count()
            + self.sockets.keys().count()
    }

    /// Proves the kernel takes an established TCP socket into the map, so that
    /// `--mode auto` falls back at start rather than on every connection.
    pub(super) fn probe_insert(&mut self) -> Result<()> {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("probe: binding loopback")?;
        let probe =
            std::net::TcpStream::connect(listener.local_addr()?).context("probe: connect")?;
        let (accepted, _) = listener.accept().context("probe: accept")?;
        let key = tcpinfo::cookie(&probe)?;
        self.sockets
            .insert(key, probe.as_raw_fd(), 0)
            .context("probe: this kernel refused a TCP socket in the socket map")?;
        self.sockets
            .remove(&key)
            .context("probe: removing the probe socket")?;
        drop((probe, accepted));
        Ok(())
    }
}

pub(super) struct MapSet {
    /// The kernel's id of its `SOCKETS` map: names the set in every process.
    pub(super) id: u32,
    pub(super) maps: Mutex<Maps>,
    pub(super) waiters: Waiters,
    /// Copies of the maps' fds, for a handoff (`NAMES` order).
    fds: Vec<OwnedFd>,
    dispatcher: Mutex<Option<Dispatcher>>,
    /// Pairs that live in this set (`PairHold`s).
    pairs: AtomicUsize,
    /// Came from an older process: dropped once its last pair closes.
    adopted: bool,
}

fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::SockHash(m) | Map::HashMap(m) | Map::RingBuf(m) => Some(m),
        _ => None,
    }
}

impl MapSet {
    /// The set of a program this process just loaded.
    pub(super) fn from_loaded(ebpf: &mut Ebpf) -> Result<MapSet> {
        let mut maps = Vec::new();
        for name in NAMES {
            maps.push(
                ebpf.take_map(name)
                    .with_context(|| format!("the eBPF object has no map `{name}`"))?,
            );
        }
        Self::build(maps, false)
    }

    /// A set another process sent (`fds` in `NAMES` order). Each map's key
    /// and value sizes are checked against this build's types: a build
    /// whose `FlowControl`/`FlowState` layout changed refuses the set
    /// instead of misreading it.
    fn adopt(id: u32, fds: Vec<OwnedFd>) -> Result<MapSet> {
        let mut maps = Vec::new();
        for (fd, name) in fds.into_iter().zip(NAMES) {
            let data = MapData::from_fd(fd).with_context(|| format!("reading map `{name}`"))?;
            maps.push(Map::from_map_data(data).with_context(|| format!("map `{name}`"))?);
        }
        let set = Self::build(maps, true)?;
        if set.id != id {
            bail!("the SOCKETS map has id {}, {id} was announced", set.id);
        }
        Ok(set)
    }

    fn build(maps: Vec<Map>, adopted: bool) -> Result<MapSet> {
        let mut fds = Vec::new();
        for (map, name) in maps.iter().zip(NAMES) {
            let data =
                map_data(map).with_context(|| format!("map `{name}` has an unexpected type"))?;
            fds.push(
                data.fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .context("duplicating a map fd")?,
            );
        }
        let id = map_data(&maps[0])
            .context("no SOCKETS map")?
            .info()
            .context("reading the SOCKETS map's id")?
            .id();
        let mut maps = maps.into_iter();
        let mut next = |name: &str| maps.next().with_context(|| format!("no map `{name}`"));
        let typed = |e: aya::maps::MapError, name: &str| {
            anyhow::Error::new(e).context(format!("map `{name}` has an unexpected type or layout"))
        };
        let sockets = next("SOCKETS")?
            .try_into()
            .map_err(|e| typed(e, "SOCKETS"))?;
        let peers = next("PEERS")?.try_into().map_err(|e| typed(e, "PEERS"))?;
        let control = next("CONTROL")?
            .try_into()
            .map_err(|e| typed(e, "CONTROL"))?;
        let state = next("STATE")?.try_into().map_err(|e| typed(e, "STATE"))?;
        let ring: RingBuf<MapData> = next("EVENTS")?.try_into().map_err(|e| typed(e, "EVENTS"))?;
        let waiters = Waiters::default();
        let dispatcher = Dispatcher::start(ring, Arc::clone(&waiters))?;
        Ok(MapSet {
            id,
            maps: Mutex::new(Maps {
                sockets,
                peers,
                control,
                state,
            }),
            waiters,
            fds,
            dispatcher: Mutex::new(Some(dispatcher)),
            pairs: AtomicUsize::new(0),
            adopted,
        })
    }

    /// Stops reading `EVENTS` (before another process reads it).
    async fn stop_dispatcher(&self) {
        let running = lock(&self.dispatcher).take();
        if let Some(d) = running {
            d.stop().await;
        }
    }

    /// Reads `EVENTS` again after a handoff that did not take the set: a
    /// new reader, from the ring's shared consumer position.
    fn restart_dispatcher(&self) -> Result<()> {
        let mut running = lock(&self.dispatcher);
        if running.is_some() {
            return Ok(());
        }
        let fd = self.fds[4]
            .try_clone()
            .context("duplicating the EVENTS fd")?;
        let data = MapData::from_fd(fd).context("reading map `EVENTS`")?;
        let map = Map::from_map_data(data).context("map `EVENTS`")?;
        let ring: RingBuf<MapData> = map.try_into().context("map `EVENTS` is not a ring")?;
        *running = Some(Dispatcher::start(ring, Arc::clone(&self.waiters))?);
        Ok(())
    }

    pub(super) fn pairs(&self) -> usize {
        self.pairs.load(Ordering::Relaxed)
    }
}

/// Every set a process holds: its own (new pairs go there) and the adopted
/// ones with pairs alive.
pub(super) struct Sets {
    pub(super) own: Arc<MapSet>,
    adopted: Mutex<HashMap<u32, Arc<MapSet>>>,
    /// False while a handoff brings sets in: an adopted set whose pairs
    /// have not all arrived yet must not be dropped for having none.
    settled: AtomicBool,
    /// The own set was handed to a new process (its entries are not leaks).
    pub(super) given: AtomicBool,
}

impl Sets {
    pub(super) fn new(own: MapSet) -> Arc<Sets> {
        Arc::new(Sets {
            own: Arc::new(own),
            adopted: Mutex::default(),
            settled: AtomicBool::new(true),
            given: AtomicBool::new(false),
        })
    }

    /// A pair just installed in the own set.
    pub(super) fn hold_own(self: &Arc<Self>) -> PairHold {
        self.own.pairs.fetch_add(1, Ordering::Relaxed);
        PairHold {
            set: Arc::clone(&self.own),
            sets: Arc::clone(self),
        }
    }

    /// A pair of set `id` lives on here: keeps the set until it closes.
    pub(super) fn hold(self: &Arc<Self>, id: u32) -> Option<PairHold> {
        let adopted = lock(&self.adopted);
        let set = if id == self.own.id {
            Arc::clone(&self.own)
        } else {
            Arc::clone(adopted.get(&id)?)
        };
        set.pairs.fetch_add(1, Ordering::Relaxed);
        Some(PairHold {
            set,
            sets: Arc::clone(self),
        })
    }

    /// Every set, stopped reading its ring, for the new process.
    pub(super) async fn give(&self) -> GivenSets {
        let mut all = vec![Arc::clone(&self.own)];
        all.extend(lock(&self.adopted).values().cloned());
        for set in &all {
            set.stop_dispatcher().await;
        }
        self.given.store(true, Ordering::Relaxed);
        GivenSets(all)
    }

    /// Adopts the sets another process sent; returns the ids adopted.
    pub(super) fn adopt(&self, ids: &[u32], fds: Vec<OwnedFd>) -> Vec<u32> {
        self.settled.store(false, Ordering::Relaxed);
        let mut fds = fds.into_iter();
        let mut took = Vec::new();
        for &id in ids {
            let set_fds: Vec<OwnedFd> = fds.by_ref().take(FDS_PER_SET).collect();
            if set_fds.len() != FDS_PER_SET {
                tracing::warn!(set = id, "handoff: a map set came without its fds");
                break;
            }
            if id == self.own.id || lock(&self.adopted).contains_key(&id) {
                continue;
            }
            match MapSet::adopt(id, set_fds) {
                Ok(set) => {
                    lock(&self.adopted).insert(id, Arc::new(set));
                    took.push(id);
                }
                Err(e) => {
                    tracing::warn!(set = id, error = %format!("{e:#}"), "handoff: cannot adopt the old process's fastpath maps; its pairs stay there")
                }
            }
        }
        took
    }

    /// The handoff is over: adopted sets no pair came for are dropped.
    pub(super) fn settle(&self) {
        self.settled.store(true, Ordering::Relaxed);
        let mut adopted = lock(&self.adopted);
        adopted.retain(|_, set| set.pairs() > 0);
        tracing::info!(
            adopted = adopted.len(),
            pairs = adopted.values().map(|s| s.pairs()).sum::<usize>(),
            "fastpath: map sets adopted from older processes"
        );
    }
}

/// Keeps a pair's map set alive (and counted) while the pair lives.
pub struct PairHold {
    pub(super) set: Arc<MapSet>,
    sets: Arc<Sets>,
}

impl Drop for PairHold {
    fn drop(&mut self) {
        let mut adopted = lock(&self.sets.adopted);
        let left = self.set.pairs.fetch_sub(1, Ordering::Relaxed) - 1;
        if left == 0 && self.set.adopted && self.sets.settled.load(Ordering::Relaxed) {
            adopted.remove(&self.set.id);
            tracing::debug!(
                set = self.set.id,
                "fastpath: the last pair of an adopted map set closed; set dropped"
            );
        }
    }
}

/// Map sets on their way to a new process, their rings no longer read here.
pub struct GivenSets(Vec<Arc<MapSet>>);

impl GivenSets {
    pub fn ids(&self) -> Vec<u32> {
        self.0.iter().map(|s| s.id).collect()
    }

    /// `FDS_PER_SET` per set, in `ids` order; open while `self` lives.
    pub fn fds(&self) -> Vec<RawFd> {
        self.0
            .iter()
            .flat_map(|s| s.fds.iter().map(|fd| fd.as_raw_fd()))
            .collect()
    }

    /// Reads the rings of the sets the new process did not adopt (all of
    /// them when it went away) again.
    pub fn restart(&self, except: &[u32]) {
        for set in self.0.iter().filter(|s| !except.contains(&s.id)) {
            if let Err(e) = set.restart_dispatcher() {
                tracing::error!(set = set.id, error = %format!("{e:#}"), "fastpath: cannot read the flow event ring again; linked directions demote when their receiver falls behind");
            }
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

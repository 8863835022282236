//! Putting a pair into the socket maps and taking it out again, and the
//! pre-install copy that forwards what both sockets held before.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use proxy_common::{FlowControl, FlowState};
use tokio::{net::TcpStream, sync::Notify};

use super::events::Wakeup;
use super::lock;
use super::mapset::MapSet;
use crate::dataplane::pool::{give_back, take_buffer};
use crate::dataplane::tcpinfo;
use crate::dataplane::userspace::{write_all_from, DirEnd};

impl MapSet {
    /// Both sockets into `PEERS`, then each into `SOCKETS` with a sweep. A
    /// socket refused by `SOCKETS` (it already received FIN) leaves its
    /// direction to userspace; one refused by `PEERS` leaves the whole pair.
    pub(super) fn install(
        &self,
        client: &TcpStream,
        upstream: &TcpStream,
        control: impl Fn(u64) -> FlowControl,
    ) -> Result<Pair> {
        let mut pair = Pair {
            client: Side::new(tcpinfo::cookie(client).context("SO_COOKIE of the client")?),
            upstream: Side::new(tcpinfo::cookie(upstream).context("SO_COOKIE of the upstream")?),
        };
        {
            let mut waiters = lock(&self.waiters);
            for side in [&pair.client, &pair.upstream] {
                waiters.insert(side.cookie, Arc::clone(&side.wakeup));
            }
        }
        let result = (|| -> Result<()> {
            let mut maps = lock(&self.maps);
            for (src, dst) in [
                (&pair.client, &pair.upstream),
                (&pair.upstream, &pair.client),
            ] {
                maps.control
                    .insert(src.cookie, control(dst.cookie), 0)
                    .context("CONTROL map insert")?;
                maps.state
                    .insert(src.cookie, FlowState::default(), 0)
                    .context("STATE map insert")?;
            }
            for (side, sock, which) in [
                (&pair.client, client, "client"),
                (&pair.upstream, upstream, "upstream"),
            ] {
                if let Err(e) = maps.peers.insert(side.cookie, sock.as_raw_fd(), 0) {
                    // The map takes established sockets only: one that got
                    // its FIN or RST since the pre-install copy looked is a
                    // race, not a fault, and the copy pump carries it.
                    if !tcpinfo::is_established(sock) {
                        anyhow::bail!("the {which} socket closed before the install");
                    }
                    return Err(e)
                        .with_context(|| format!("inserting the {which} socket into PEERS"));
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.uninstall(&pair);
            return Err(e);
        }
        // Baselines before the first redirect into either socket. The flow
        // entries and PEERS are in by now: a failure here takes them out
        // again, or they would stay for the process's life.
        let bases = tcpinfo::handed(client).and_then(|c| Ok((c, tcpinfo::handed(upstream)?)));
        let (c, u) = match bases {
            Ok(b) => b,
            Err(e) => {
                self.uninstall(&pair);
                return Err(e.into());
            }
        };
        pair.client.base = c.total;
        pair.upstream.base = u.total;
        pair.client.linked = self.link(pair.client.cookie, client);
        pair.upstream.linked = self.link(pair.upstream.cookie, upstream);
        Ok(pair)
    }

    /// Puts a socket where the verdict forwards its bytes, then sweeps what
    /// arrived since userspace last read it through the verdict. False if
    /// refused (the socket already received FIN).
    pub(super) fn link(&self, cookie: u64, sock: &TcpStream) -> bool {
        if let Err(e) = lock(&self.maps).sockets.insert(cookie, sock.as_raw_fd(), 0) {
            tracing::debug!(error = %e, "socket map refused a socket; its direction is copied");
            return false;
        }
        if let Err(e) = tcpinfo::sweep_receive_queue(sock) {
            tracing::warn!(error = %e, "SO_RCVLOWAT sweep failed; bytes wait for the next arrival");
        }
        true
    }

    pub(super) fn uninstall(&self, pair: &Pair) {
        let mut waiters = lock(&self.waiters);
        let mut maps = lock(&self.maps);
        for side in [&pair.client, &pair.upstream] {
            waiters.remove(&side.cookie);
            // The verdict must stop before its flow entries go. Closing the fd
            // would also remove the socket maps' entries; the flow maps are
            // ours to clean. A missing key is not an error here.
            let _ = maps.sockets.remove(&side.cookie);
            let _ = maps.peers.remove(&side.cookie);
            let _ = maps.control.remove(&side.cookie);
            let _ = maps.state.remove(&side.cookie);
        }
    }

    pub(super) fn state(&self, cookie: u64) -> io::Result<FlowState> {
        lock(&self.maps)
            .state
            .get(&cookie, 0)
            .map_err(|e| io::Error::other(format!("STATE lookup: {e}")))
    }

    pub(super) fn set_control(&self, cookie: u64, control: FlowControl) -> io::Result<()> {
        lock(&self.maps)
            .control
            .insert(cookie, control, 0)
            .map_err(|e| io::Error::other(format!("CONTROL update: {e}")))
    }
}

pub(super) struct Early {
    pub(super) moved: u64,
    pub(super) end: EarlyEnd,
}

pub(super) enum EarlyEnd {
    /// Neither FIN nor an error yet: the socket can enter the map.
    Open,
    Eof,
    /// Reading the source failed (it was reset).
    ReadFailed,
    /// Writing the destination failed (it was reset).
    WriteFailed,
}

/// Pre-install copy: both directions run at once and stop together, when
/// both sources are empty. One direction that stopped while the other still
/// copied could deadlock behind an echoing target (its writes wait for the
/// target, which waits for us to read it); seen under a CPU hog in the bidi
/// bench. A sender that never pauses keeps the pair here, copied correctly.
#[derive(Default)]
pub(super) struct Quiet {
    state: Mutex<QuietState>,
    /// Signalled once `done` is set, for a direction waiting at EAGAIN.
    done_signal: Notify,
}

#[derive(Default)]
struct QuietState {
    /// Per direction: waiting at EAGAIN, or finished.
    idle: [bool; 2],
    /// Both were idle at once: every direction stops at its EAGAIN.
    done: bool,
}

impl Quiet {
    /// Direction `me` is at EAGAIN or finished; true when the copy is done.
    fn rest(&self, me: usize) -> bool {
        let mut s = lock(&self.state);
        s.idle[me] = true;
        if s.idle[1 - me] && !s.done {
            s.done = true;
            self.done_signal.notify_one();
        }
        s.done
    }

    /// Direction `me` has bytes again; false if the copy is already done
    /// (the decision stands: the bytes are left for the verdict's sweep).
    fn wake(&self, me: usize) -> bool {
        let mut s = lock(&self.state);
        if s.done {
            return false;
        }
        s.idle[me] = false;
        true
    }
}

/// What arrives before an install is a greeting or a message or two (the
/// policy promotes quiet connections), so a small pooled buffer: a fresh
/// 64 KiB per direction per install was 40 of 54 MB of page faults over 500
/// pairs, and stayed in the heap's high-water mark.
const PRE_INSTALL_READ: usize = 16 * 1024;

/// Forwards what `src` holds, until it and the other direction's source are
/// both empty (or this one ends). It must stop only at EAGAIN: the verdict's
/// sweep (tcp_read_skb) takes whole skbs from the receive queue and ignores
/// how much of the first one was already read, so stopping mid-skb would
/// send that part twice (seen: 48 KiB duplicated).
pub(super) async fn forward_ready(
    src: &TcpStream,
    dst: &TcpStream,
    me: usize,
    quiet: &Quiet,
    moved: &AtomicU64,
) -> Early {
    let mut held: Option<Vec<u8>> = None;
    let end = loop {
        let buf = held.get_or_insert_with(|| take_buffer(PRE_INSTALL_READ));
        match src.try_read(buf) {
            Ok(0) => break EarlyEnd::Eof,
            Ok(n) => {
                // As every userspace write: the source's reset ends it
                // (`cut_short` around this copy would too), and says
                // which side it was.
                match write_all_from(src, dst, &buf[..n]).await {
                    Ok(()) => {}
                    Err(DirEnd::ReadFailed(_)) => break EarlyEnd::ReadFailed,
                    Err(_) => break EarlyEnd::WriteFailed,
                }
                moved.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if quiet.rest(me) {
                    break EarlyEnd::Open;
                }
                // No buffer held while waiting: a burst of new connections
                // has many installs waiting here at once.
                if let Some(buf) = held.take() {
                    give_back(buf);
                }
                tokio::select! {
                    r = src.readable() => {
                        if r.is_err() {
                            break EarlyEnd::ReadFailed;
                        }
                        if !quiet.wake(me) {
                            break EarlyEnd::Open;
                        }
                    }
                    _ = quiet.done_signal.notified() => break EarlyEnd::Open,
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break EarlyEnd::ReadFailed,
        }
    };
    // Every byte read was written (or the write failed and the
    // connection ends), so the buffer holds nothing owed to anyone.
    if let Some(buf) = held {
        give_back(buf);
    }
    // A finished direction counts as idle for good.
    quiet.rest(me);
    Early {
        moved: moved.load(Ordering::Relaxed),
        end,
    }
}

/// One socket of an installed pair.
pub(super) struct Side {
    pub(super) cookie: u64,
    /// Bytes handed to this socket's TCP before the install (SYN included).
    pub(super) base: u64,
    /// In `SOCKETS` at install: the verdict forwards what this socket receives.
    pub(super) linked: bool,
    pub(super) wakeup: Arc<Wakeup>,
}

impl Side {
    pub(super) fn new(cookie: u64) -> Self {
        Side {
            cookie,
            base: 0,
            linked: false,
            wakeup: Arc::default(),
        }
    }
}

pub(super) struct Pair {
    pub(super) client: Side,
    pub(super) upstream: Side,
}

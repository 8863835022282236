//! Loopback connects to steered ports, each of which must arrive at our
//! own listening socket: the kernel's own answer to "where does a
//! connection to this port go", whoever else steers it. A probe costs a
//! full handshake (~40 us here), so `verify` decides which ports need one.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use socket2::{Domain, Socket, Type};
use tokio::sync::Notify;

/// Probes in flight: below the listener's backlog, so a full accept queue
/// never passes for a port taken elsewhere.
const BATCH: usize = 512;
/// A probe not at our socket this long after the last one arrived went
/// elsewhere: on loopback a handshake takes microseconds.
pub(super) const QUIET: Duration = Duration::from_millis(50);

/// Both ends and evenly spaced ports between: enough to prove the plumbing
/// (listener in `STEER_SOCKET`, `PORTS` filled) when no other program can
/// take a port.
pub fn sample(ports: &[u16]) -> Vec<u16> {
    const SAMPLE: usize = 16;
    let step = (ports.len() / SAMPLE).max(1);
    let mut picked: Vec<u16> = ports.iter().step_by(step).copied().collect();
    picked.extend(ports.last());
    picked.sort_unstable();
    picked.dedup();
    picked
}

/// Client addresses of the probes sent and not yet seen by the accept loop.
#[derive(Default)]
pub struct Probes {
    pending: Mutex<HashSet<SocketAddr>>,
    arrived: Notify,
}

impl Probes {
    /// For the accept loop: true when `peer` is one of our probes (then it
    /// is not a client, and the caller just closes it).
    pub fn claim(&self, peer: SocketAddr) -> bool {
        if self.lock().remove(&peer) {
            self.arrived.notify_one();
            true
        } else {
            false
        }
    }

    /// Ends a check: probes still out are late or went elsewhere, and a
    /// real client may reuse their addresses from now on.
    pub(super) fn forget(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<SocketAddr>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn any_pending(&self, batch: &[Probe]) -> bool {
        let pending = self.lock();
        batch.iter().any(|p| pending.contains(&p.from))
    }

    /// Returns once every probe of `batch` arrived, or none did for `QUIET`.
    async fn settle(&self, batch: &[Probe]) {
        loop {
            // Created before the check: an arrival in between leaves a permit.
            let next = self.arrived.notified();
            if !self.any_pending(batch) {
                return;
            }
            if tokio::time::timeout(QUIET, next).await.is_err() {
                return;
            }
        }
    }
}

/// Why a probe did not reach us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Miss {
    /// Another socket accepted it.
    Elsewhere,
    /// Reset: no socket took it.
    Refused,
    /// Neither, within `QUIET`.
    NoAnswer,
}

/// One connect in flight. Its socket lingers 0, so closing it resets the
/// connection wherever it landed and leaves no TIME_WAIT behind.
struct Probe {
    port: u16,
    from: SocketAddr,
    sock: Socket,
    refused: bool,
}

impl Probe {
    fn miss(&self) -> Miss {
        let reset = matches!(
            self.sock.take_error(),
            Ok(Some(e)) if e.raw_os_error() == Some(libc::ECONNREFUSED)
        );
        if self.refused || reset {
            Miss::Refused
        } else if self.sock.peer_addr().is_ok() {
            Miss::Elsewhere
        } else {
            Miss::NoAnswer
        }
    }
}

/// One probe per port, `BATCH` at a time; returns the ports that missed.
pub(super) async fn round(
    probes: &Probes,
    ip: IpAddr,
    ports: &[u16],
) -> Result<BTreeMap<u16, Miss>> {
    let mut missed = BTreeMap::new();
    for chunk in ports.chunks(BATCH) {
        let mut batch = Vec::with_capacity(chunk.len());
        for &port in chunk {
            batch.push(send(probes, SocketAddr::new(ip, port))?);
        }
        probes.settle(&batch).await;
        let pending = probes.lock();
        for p in batch.iter().filter(|p| pending.contains(&p.from)) {
            missed.insert(p.port, p.miss());
        }
    }
    Ok(missed)
}

/// Starts a non-blocking connect to `to`, registered before it is sent:
/// on loopback the handshake may be done before `connect` returns.
fn send(probes: &Probes, to: SocketAddr) -> Result<Probe> {
    let sock = Socket::new(Domain::for_address(to), Type::STREAM.nonblocking(), None)
        .context("creating a probe socket")?;
    sock.set_linger(Some(Duration::ZERO))
        .context("setting SO_LINGER on a probe socket")?;
    sock.bind(&SocketAddr::new(to.ip(), 0).into())
        .with_context(|| format!("binding a probe socket on {}", to.ip()))?;
    let from = sock
        .local_addr()
        .context("probe socket address")?
        .as_socket()
        .context("probe socket address is not IP")?;
    probes.lock().insert(from);
    let refused = match sock.connect(&to.into()) {
        Ok(()) => false,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => false,
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => true,
        Err(e) => return Err(e).with_context(|| format!("probe connect to {to}")),
    };
    Ok(Probe {
        port: to.port(),
        from,
        sock,
        refused,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_has_both_ends_and_few_ports() {
        let ports: Vec<u16> = (10_000..20_000).collect();
        let picked = sample(&ports);
        assert_eq!(picked.first(), Some(&10_000));
        assert_eq!(picked.last(), Some(&19_999));
        assert!(picked.len() <= 18, "{picked:?}");
        assert_eq!(sample(&[7]), vec![7]);
        assert!(sample(&[]).is_empty());
    }
}

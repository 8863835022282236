//! One connect attempt to one target, and what its failure means.
//!
//! A leaf: health probes and client connects both dial through here, and
//! neither knows about the other.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::anyhow;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use super::loop_guard::LoopGuard;
use super::resolve::resolve;
use crate::config::Target;

/// Why a connect attempt failed: the `reason` label of
/// `proxy_target_connect_failures_total`, a small fixed set so free-form
/// error text never becomes a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    Refused,
    Reset,
    Unreachable,
    Timeout,
    Resolve,
    /// Our own fds, memory or ports ran out.
    LocalResource,
    /// The target is this proxy itself (`loop_guard`); not connected.
    Loop,
    Other,
}

impl FailureReason {
    pub const ALL: [FailureReason; 8] = [
        FailureReason::Refused,
        FailureReason::Reset,
        FailureReason::Unreachable,
        FailureReason::Timeout,
        FailureReason::Resolve,
        FailureReason::LocalResource,
        FailureReason::Loop,
        FailureReason::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Refused => "refused",
            FailureReason::Reset => "reset",
            FailureReason::Unreachable => "unreachable",
            FailureReason::Timeout => "timeout",
            FailureReason::Resolve => "resolve",
            FailureReason::LocalResource => "local_resource",
            FailureReason::Loop => "loop",
            FailureReason::Other => "other",
        }
    }

    fn of(e: &io::Error) -> FailureReason {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => FailureReason::Refused,
            Some(libc::ECONNRESET) => FailureReason::Reset,
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH) => FailureReason::Unreachable,
            _ if is_local_resource_error(e) => FailureReason::LocalResource,
            _ => FailureReason::Other,
        }
    }
}

/// Out of fds, memory or local ports: retrying at once would spin, and the
/// target is not to blame.
pub fn is_local_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

#[derive(Debug)]
pub struct DialError {
    pub err: anyhow::Error,
    pub reason: FailureReason,
}

impl DialError {
    fn new(err: anyhow::Error, reason: FailureReason) -> Self {
        DialError { err, reason }
    }

    /// Our own resource shortage says nothing about the target, so it must
    /// not mark the target down.
    pub fn is_local(&self) -> bool {
        self.reason == FailureReason::LocalResource
    }

    pub fn timed_out(&self) -> bool {
        self.reason == FailureReason::Timeout
    }
}

/// One attempt: resolve (targets can move, so every time; `resolve` keeps
/// it to one lookup per name at a time), then try each
/// address that is not the proxy itself in turn within `budget`.
pub async fn dial(
    target: &Target,
    budget: Duration,
    guard: &LoopGuard,
) -> Result<(TcpStream, SocketAddr), DialError> {
    let end = Instant::now() + budget;
    let lookup = resolve(&target.host, target.port);
    let addrs = match tokio::time::timeout_at(end, lookup).await {
        Err(_) => {
            return Err(DialError::new(
                anyhow!("resolving {target} timed out after {budget:?}"),
                FailureReason::Timeout,
            ))
        }
        Ok(Err(e)) => {
            return Err(DialError::new(
                anyhow::Error::new(e).context(format!("resolving {target}")),
                FailureReason::Resolve,
            ))
        }
        Ok(Ok(addrs)) => addrs,
    };
    connect_any(target, addrs, end, guard).await
}

/// Tries each address in turn until `end`. Each gets an equal share of the
/// time left, the last one all of it: an address that drops packets
/// silently (an IPv6 route that goes nowhere, listed before a working IPv4
/// one) must not use up the whole budget, or the target looks down to every
/// connection and every health probe while it has a working address.
async fn connect_any(
    target: &Target,
    addrs: Vec<SocketAddr>,
    end: Instant,
    guard: &LoopGuard,
) -> Result<(TcpStream, SocketAddr), DialError> {
    // Built only on failure: a formatted error per connect cost an
    // allocation and a format on every connection (0.5% of a churn profile).
    let mut last = None;
    // Said over any other address's failure: it is the config's mistake.
    let mut looped = None;
    // Addresses left to try: ours are skipped, so they get no share (one
    // address, most targets, needs no count).
    let mut left = match addrs.len() {
        1 => 1,
        _ => addrs.iter().filter(|a| !guard.is_ours(**a)).count(),
    };
    for addr in addrs {
        if guard.is_ours(addr) {
            looped = Some(loop_error(target, addr));
            continue;
        }
        // The last one (or the only one): no clock read to split the budget.
        let until = match left {
            0 | 1 => end,
            n => {
                let now = Instant::now();
                now + end.saturating_duration_since(now) / n as u32
            }
        };
        left = left.saturating_sub(1);
        match tokio::time::timeout_at(until, connect_addr(addr)).await {
            Err(_) => {
                last = Some(DialError::new(
                    anyhow!("connecting to {target} ({addr}) timed out"),
                    FailureReason::Timeout,
                ));
            }
            Ok(Ok(s)) => {
                if guard.connected_to_us(|| s.local_addr().ok(), addr) {
                    looped = Some(loop_error(target, addr));
                    continue;
                }
                return Ok((s, addr));
            }
            Ok(Err(e)) => {
                let reason = FailureReason::of(&e);
                let err = DialError::new(
                    anyhow::Error::new(e).context(format!("connecting to {target} ({addr})")),
                    reason,
                );
                let local = err.is_local();
                last = Some(err);
                if local {
                    break; // another address won't fix our own shortage
                }
            }
        }
    }
    Err(looped.or(last).unwrap_or_else(|| {
        DialError::new(
            anyhow!("{target} resolved to no addresses"),
            FailureReason::Resolve,
        )
    }))
}

fn loop_error(target: &Target, addr: SocketAddr) -> DialError {
    DialError::new(
        anyhow!("{target} resolves to {addr}, a listener of this proxy: a connection there would loop back into the proxy, so none is made; point the target at the backend"),
        FailureReason::Loop,
    )
}

async fn connect_addr(addr: SocketAddr) -> io::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    let stream = sock.connect(addr).await?;
    // Interactive protocols through the proxy must not gain Nagle delays.
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A listener that drops SYNs (its accept queue is full: Linux drops
    /// new SYNs then), with what fills it: keep both for the test's length.
    async fn silent_listener() -> (SocketAddr, (TcpListener, Vec<TcpStream>)) {
        let silent = TcpSocket::new_v4().unwrap();
        silent.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let silent = silent.listen(1).unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..8 {
            let connect = TcpStream::connect(silent_addr);
            match tokio::time::timeout(Duration::from_millis(200), connect).await {
                Ok(Ok(s)) => queued.push(s),
                _ => break,
            }
        }
        (silent_addr, (silent, queued))
    }

    /// The first address drops SYNs, the second answers: the dial must
    /// reach the second within the budget. Before the split, the first
    /// one's timeout took the whole budget and the dial failed.
    #[tokio::test]
    async fn a_silent_address_leaves_time_for_the_next() {
        let (silent_addr, _queued) = silent_listener().await;
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let target = Target {
            host: "127.0.0.1".into(),
            port: good_addr.port(),
        };
        let end = Instant::now() + Duration::from_secs(2);
        let addrs = vec![silent_addr, good_addr];
        let dialed = connect_any(&target, addrs, end, &LoopGuard::default()).await;
        let (_, addr) = dialed
            .map_err(|e| format!("{:#}", e.err))
            .expect("the second address");
        assert_eq!(addr, good_addr);
    }

    /// An address of ours among a target's addresses is skipped, and takes
    /// no share of the budget: the one address left to try gets all of it.
    /// Before, a silent backend listed before our own address got half.
    #[tokio::test]
    async fn our_own_address_takes_no_share_of_the_budget() {
        let (silent_addr, _queued) = silent_listener().await;
        let ours: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let guard = LoopGuard::new(crate::config::Listen::new(
            "127.0.0.1".parse().unwrap(),
            Vec::new(),
        ));
        guard.set_ports([ours.port()]);
        let target = Target {
            host: "backend.example".into(),
            port: silent_addr.port(),
        };
        let budget = Duration::from_millis(600);
        let started = Instant::now();
        let dialed = connect_any(&target, vec![silent_addr, ours], started + budget, &guard).await;
        let waited = started.elapsed();
        let err = dialed.map(|_| ()).expect_err("nothing answers");
        assert_eq!(err.reason, FailureReason::Loop, "{:#}", err.err);
        assert!(
            waited >= budget - Duration::from_millis(20),
            "the silent address got {waited:?} of {budget:?}"
        );
    }

    #[test]
    fn errno_classification() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(
            FailureReason::of(&e(libc::ECONNREFUSED)),
            FailureReason::Refused
        );
        assert_eq!(
            FailureReason::of(&e(libc::EMFILE)),
            FailureReason::LocalResource
        );
        assert_eq!(
            FailureReason::of(&e(libc::ENETUNREACH)),
            FailureReason::Unreachable
        );
        assert_eq!(FailureReason::of(&e(libc::EPROTO)), FailureReason::Other);
    }
}

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

/// One attempt: resolve (targets can move, so every time), then try each
/// address that is not the proxy itself in turn within `budget`.
pub async fn dial(
    target: &Target,
    budget: Duration,
    guard: &LoopGuard,
) -> Result<(TcpStream, SocketAddr), DialError> {
    let end = Instant::now() + budget;
    let lookup = tokio::net::lookup_host((target.host.as_str(), target.port));
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
        Ok(Ok(addrs)) => addrs.collect::<Vec<_>>(),
    };
    // Built only on failure: a formatted error per connect cost an
    // allocation and a format on every connection (0.5% of a churn profile).
    let mut last = None;
    // Said over any other address's failure: it is the config's mistake.
    let mut looped = None;
    for addr in addrs {
        if guard.is_ours(addr) {
            looped = Some(loop_error(target, addr));
            continue;
        }
        match tokio::time::timeout_at(end, connect_addr(addr)).await {
            Err(_) => {
                return Err(DialError::new(
                    anyhow!("connecting to {target} ({addr}) timed out after {budget:?}"),
                    FailureReason::Timeout,
                ))
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

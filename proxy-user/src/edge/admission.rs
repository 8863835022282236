//! Admission: a client is let in only while both its app's and the global
//! connection limits have room; otherwise it is reset at once. The last
//! tenth of the global limit is shared out equally between the apps: once
//! the rest is taken, an app gets a connection only while it holds fewer than
//! its part of that tenth, so a flood on some apps leaves the others served.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::accept_proxy;
use super::per_client::ClientSlot;
use super::{AppRuntime, Shared};
use crate::dataplane::{arm_reset, EndReason};
use crate::ops::metrics::{HeaderFailure, Limit};

/// The first gate, as the listener accepts: the connection's app and global
/// permits, or None: the client was reset, and counted.
pub(super) fn admit(
    sock: &TcpStream,
    peer: SocketAddr,
    port: u16,
    app: &AppRuntime,
    shared: &Shared,
) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
    app.metrics.accepted();
    let permits = match (
        app.permits.clone().try_acquire_owned(),
        shared.global.clone().try_acquire_owned(),
    ) {
        (Ok(a), Ok(g)) if !over_fair_share(app, shared) => (a, g),
        (a, _g) => {
            let which = if a.is_err() {
                Limit::PerApp
            } else {
                Limit::Global
            };
            app.metrics.rejected(which);
            if let Some(suppressed) = shared.limit_log.check() {
                tracing::warn!(app = %app.balancer.app, port, client = %peer, limit = which.as_str(), suppressed, end = EndReason::Limit.as_str(), "connection limit reached, rejecting new connections");
            }
            // RST, not FIN: the client must not read an empty stream as a
            // complete response.
            arm_reset(sock);
            return None;
        }
    };
    Some(permits)
}

/// Only the reserved tenth of the global limit is left, and `app` already
/// holds its part of it. Called with this connection's permits taken.
fn over_fair_share(app: &AppRuntime, shared: &Shared) -> bool {
    let reserve = shared.global_cap / 10;
    if shared.global.available_permits() >= reserve {
        return false;
    }
    let apps = shared.apps.load(Ordering::Relaxed).max(1);
    // Counts this connection, whose permit is already taken.
    let active = shared
        .per_app_cap
        .saturating_sub(app.permits.available_permits());
    active > (reserve / apps).max(1)
}

/// A client past the second gate: who it really is and what it holds.
pub(super) struct Client {
    /// The PROXY header's source, else the socket's peer.
    pub(super) addr: SocketAddr,
    /// The address it connected to, from its PROXY header; None without
    /// one (the socket's own address is looked up where it is needed).
    pub(super) local: Option<SocketAddr>,
    /// Its places under the per-client limits (global, the app's): held
    /// until the connection closes.
    pub(super) slots: ClientSlots,
    /// Bytes of its PROXY header, read here and forwarded to nobody.
    pub(super) header: u32,
}

/// A client's places under the per-client limits; dropping them frees them.
/// Boxed, and only with a per-client limit: every connection holds this
/// for its whole life, and most run with no such limit (64 bytes inline).
#[derive(Default)]
pub(super) struct ClientSlots {
    _held: Option<Box<[Option<ClientSlot>; 2]>>,
}

impl ClientSlots {
    /// The places taken under the global and the app's per-client limits;
    /// boxed only when there is one.
    fn of(global: Option<ClientSlot>, own: Option<ClientSlot>) -> ClientSlots {
        ClientSlots {
            _held: (global.is_some() || own.is_some()).then(|| Box::new([global, own])),
        }
    }
}

/// The second gate, once a task serves the client: its PROXY header (apps
/// with `AcceptProxyProtocol`), then the per-client limits, which need the
/// real address. None: the client was reset, and counted.
pub(super) async fn admit_client(
    sock: &mut TcpStream,
    peer: SocketAddr,
    app: &AppRuntime,
    shared: &Shared,
) -> Option<Client> {
    let (mut addr, mut local, mut header) = (peer, None, 0);
    if let Some(accept) = &app.accept_proxy {
        let read = async {
            if !accept.trusts(peer.ip()) {
                return Err(accept_proxy::Failed {
                    reason: HeaderFailure::Untrusted,
                    detail: "not from one of the app's AcceptProxyProtocol.TrustedSources".into(),
                });
            }
            match tokio::time::timeout(accept.timeout, accept_proxy::read(sock)).await {
                Ok(r) => r,
                Err(_) => Err(accept_proxy::Failed {
                    reason: HeaderFailure::Timeout,
                    detail: format!("no complete PROXY header within {:?}", accept.timeout),
                }),
            }
        };
        match read.await {
            Ok((Some((src, dst)), len)) => (addr, local, header) = (src, Some(dst), len),
            Ok((None, len)) => header = len,
            Err(f) => {
                app.metrics.header_failed(f.reason);
                if let Some(suppressed) = shared.limit_log.check() {
                    tracing::warn!(app = %app.balancer.app, client = %peer, reason = f.reason.as_str(), error = %f.detail, suppressed, end = EndReason::ProxyHeader.as_str(), "PROXY header refused, resetting client");
                }
                arm_reset(sock);
                return None;
            }
        }
    }
    let global = match shared.per_client_cap {
        Some(cap) => match shared.per_client.try_take(addr.ip(), cap) {
            Some(slot) => Some(slot),
            None => return refuse_client(sock, addr, app, shared, Limit::PerClient),
        },
        None => None,
    };
    let own = match app.max_per_client {
        Some(cap) => match app.clients.try_take(addr.ip(), cap) {
            Some(slot) => Some(slot),
            None => return refuse_client(sock, addr, app, shared, Limit::PerAppClient),
        },
        None => None,
    };
    Some(Client {
        addr,
        local,
        slots: ClientSlots::of(global, own),
        header,
    })
}

/// The places of a connection an upgrade moved here, under the same
/// per-client limits as any other: counted, so the client's new ones see
/// it, but never refused (it is established).
pub(super) fn resumed_slots(client: IpAddr, app: &AppRuntime, shared: &Shared) -> ClientSlots {
    let global = (shared.per_client_cap.is_some())
        .then(|| shared.per_client.try_take(client, usize::MAX))
        .flatten();
    let own = (app.max_per_client.is_some())
        .then(|| app.clients.try_take(client, usize::MAX))
        .flatten();
    ClientSlots::of(global, own)
}

fn refuse_client(
    sock: &TcpStream,
    client: SocketAddr,
    app: &AppRuntime,
    shared: &Shared,
    which: Limit,
) -> Option<Client> {
    app.metrics.rejected(which);
    if let Some(suppressed) = shared.limit_log.check() {
        tracing::warn!(app = %app.balancer.app, client = %client, limit = which.as_str(), suppressed, end = EndReason::Limit.as_str(), "per-client connection limit reached, resetting client");
    }
    arm_reset(sock);
    None
}

//! Admission: a client is let in only while both its app's and the global
//! connection limits have room; otherwise it is reset at once. The last
//! tenth of the global limit is shared out equally between the apps: once
//! the rest is taken, an app gets a connection only while it holds fewer than
//! its part of that tenth, so a flood on some apps leaves the others served.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::conn::Conn;
use super::{AppRuntime, Shared};
use crate::dataplane::{arm_reset, EndReason};
use crate::ops::metrics::Limit;

pub(super) fn admit(
    sock: TcpStream,
    peer: SocketAddr,
    port: u16,
    app: &Arc<AppRuntime>,
    shared: &Arc<Shared>,
) {
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
            arm_reset(&sock);
            drop(sock);
            return;
        }
    };
    let conn = Conn::admitted(peer, port, app.clone(), shared, permits);
    let shared = shared.clone();
    tokio::spawn(conn.serve(sock, shared));
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

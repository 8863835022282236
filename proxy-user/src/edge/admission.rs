//! Admission: a client is let in only while both its app's and the global
//! connection limits have room; otherwise it is reset at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::conn::Conn;
use super::{AppRuntime, Shared};
use crate::dataplane::EndReason;
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
        (Ok(a), Ok(g)) => (a, g),
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
            let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
            drop(sock);
            return;
        }
    };
    let conn = Conn::admitted(peer, port, app.clone(), shared, permits);
    let shared = shared.clone();
    tokio::spawn(conn.serve(sock, shared));
}

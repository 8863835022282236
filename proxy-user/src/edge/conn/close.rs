//! The one record a connection leaves, on whichever path it ends and in
//! whichever process: its metrics, its access log entry and its "connection
//! closed" line.

use std::time::SystemTime;

use super::{Conn, Ends};
use crate::dataplane::{Demotion, Transfer};
use crate::edge::Shared;
use crate::ops::access_log;
use crate::ops::metrics::ByteTally;

impl Conn {
    /// The one record per connection: metrics, the access log and the log
    /// line. `bytes_in` is client→target and `bytes_out` target→client, as
    /// seen from the client's side of the proxy (HAProxy's and Envoy's
    /// convention for "received"/"sent" by the listener).
    pub(super) fn close(
        self,
        shared: &Shared,
        Ends { local, upstream }: Ends,
        t: &Transfer,
        tally: ByteTally,
    ) {
        let lived = self.started.elapsed();
        self.app
            .metrics
            .finished(t, upstream.attempts, tally, lived.as_secs_f64());
        let target = upstream.target.as_deref().unwrap_or("-");
        let duration_ms = lived.as_millis() as u64;
        let connect_ms = upstream.connect.as_millis() as u64;
        let carried_by = self
            .carried_by
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        if let Some(log) = &shared.access_log {
            // One reading for both: two could straddle a clock step (or a
            // connection younger than the gap between them) and put the
            // start after the close.
            let now = SystemTime::now();
            log.record(&access_log::Entry {
                timestamp: access_log::rfc3339(now),
                // From the monotonic start (no wall-clock field kept in
                // every connection): now less its age.
                start: access_log::rfc3339(
                    now.checked_sub(lived).unwrap_or(SystemTime::UNIX_EPOCH),
                ),
                conn: self.id,
                app: &self.app.balancer.app,
                port: self.port,
                client: self.client.to_string(),
                local: local.map_or_else(|| "-".to_string(), |a| a.to_string()),
                connect_ms,
                target,
                attempts: upstream.attempts,
                bytes_in: t.client_to_target,
                bytes_out: t.target_to_client,
                userspace_bytes: t.userspace_bytes,
                duration_ms,
                plane: t.plane.as_str(),
                end: t.end.as_str(),
            });
        }
        if !shared.log_connections {
            return;
        }
        tracing::info!(
            conn = self.id,
            app = %self.app.balancer.app,
            port = self.port,
            client = %self.client,
            target,
            attempts = upstream.attempts,
            connect_ms,
            bytes_in = t.client_to_target,
            bytes_out = t.target_to_client,
            userspace_bytes = t.userspace_bytes,
            duration_ms,
            plane = t.plane.as_str(),
            promoted_ms = t.promoted_after.map(|d| d.as_millis() as u64),
            demoted = t.demoted.iter().sum::<u8>(),
            demoted_busy = t.demoted[Demotion::Busy as usize],
            end = t.end.as_str(),
            pid = crate::ops::pid(),
            carried_by = %carried_by,
            "connection closed"
        );
    }
}

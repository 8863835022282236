//! One admitted client connection: connect to a target, carry the bytes,
//! write one close record. The `Conn` owns what the connection holds (limit
//! permits, its place in the drain tracker, the active gauge), so whatever
//! path it ends on releases all of it.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::admission::admit_client;
use super::live::{self, Sampler};
use super::tracker::Tracked;
use super::{AppRuntime, Shared};
use crate::config::ProxyProtocol;
use crate::dataplane::{arm_reset, ConnInfo, EndReason, Transfer};
use crate::ops::access_log;
use crate::ops::metrics::{ActiveConn, ByteTally};
use crate::upstream::connect;
use crate::upstream::proxy_protocol;

/// What a connection holds until it is closed.
struct Held {
    _app_permit: OwnedSemaphorePermit,
    _global_permit: OwnedSemaphorePermit,
    _tracked: Tracked,
    _active: ActiveConn,
}

pub(super) struct Conn {
    id: u64,
    client: SocketAddr,
    port: u16,
    app: Arc<AppRuntime>,
    started: Instant,
    /// Wall clock of `started`, for the access log.
    started_at: SystemTime,
    _held: Held,
}

/// Where the connection got to upstream: the target as configured ("-" if
/// none), how many connect attempts it took, and how long they took.
struct Upstream {
    target: String,
    attempts: u32,
    connect: Duration,
}

impl Upstream {
    const NONE: Upstream = Upstream {
        target: String::new(),
        attempts: 0,
        connect: Duration::ZERO,
    };
}

impl Conn {
    pub(super) fn admitted(
        client: SocketAddr,
        port: u16,
        app: Arc<AppRuntime>,
        shared: &Shared,
        (app_permit, global_permit): (OwnedSemaphorePermit, OwnedSemaphorePermit),
    ) -> Conn {
        Conn {
            id: shared.next_id.fetch_add(1, Ordering::Relaxed),
            client,
            port,
            _held: Held {
                _app_permit: app_permit,
                _global_permit: global_permit,
                _tracked: shared.tracker.track(),
                _active: app.metrics.open(),
            },
            app,
            started: Instant::now(),
            started_at: SystemTime::now(),
        }
    }

    /// Connects, carries and closes; the record is written on every path.
    pub(super) async fn serve(mut self, mut client: TcpStream, shared: Arc<Shared>) {
        let _ = client.set_nodelay(true);
        // The PROXY header and the per-client limits: refused clients are
        // counted there and get no close record, like those over a limit.
        let Some(admitted) = admit_client(&mut client, self.client, &self.app, &shared).await
        else {
            return;
        };
        self.client = admitted.addr;
        let local = admitted.local;
        let balancer = &self.app.balancer;
        let mut hard_stop = shared.hard_stop.clone();
        let connected = tokio::select! {
            r = connect::connect(balancer, &shared.policy, &shared.loop_guard) => r,
            _ = hard_stop.wait_for(|s| *s) => {
                arm_reset(&client);
                let t = Transfer::none(EndReason::DrainTimeout);
                return self.close(&shared, local, Upstream::NONE, &t, ByteTally::default());
            }
        };
        let mut c = match connected {
            Ok(c) => c,
            Err(failed) => {
                tracing::warn!(conn = self.id, app = %balancer.app, port = self.port, client = %self.client, attempts = failed.attempts, error = %format!("{:#}", failed.last_error), "all connect attempts failed, resetting client");
                // RST: a clean EOF would pass for an empty session to a
                // protocol where the server speaks first.
                arm_reset(&client);
                drop(client);
                let upstream = Upstream {
                    attempts: failed.attempts,
                    connect: self.started.elapsed(),
                    ..Upstream::NONE
                };
                let t = Transfer::none(EndReason::ConnectFailed);
                return self.close(&shared, local, upstream, &t, ByteTally::default());
            }
        };
        let upstream = Upstream {
            target: c.guard.backend().target.to_string(),
            attempts: c.attempts,
            connect: self.started.elapsed(),
        };
        // Before the target's first byte: the window it sees is this one.
        if let Err(e) = shared.socket_buffers.apply(&c.stream) {
            tracing::debug!(conn = self.id, error = %e, "cannot set upstream socket buffers");
        }
        let mut header = 0;
        if let Some(version) = self.app.proxy_protocol {
            let to = local.map_or_else(|| client.local_addr(), Ok);
            match send_proxy_header(to, &mut c.stream, self.client, version).await {
                Ok(n) => header = n,
                Err(e) => {
                    tracing::debug!(conn = self.id, error = %e, "sending PROXY header failed");
                    // Both: the target may hold part of a header, the client nothing.
                    arm_reset(&client);
                    arm_reset(&c.stream);
                    let t = Transfer::none(EndReason::TargetReset);
                    return self.close(&shared, local, upstream, &t, ByteTally::default());
                }
            }
        }
        let info = ConnInfo {
            id: self.id,
            app: balancer.app.clone(),
            listen_port: self.port,
            client: self.client,
            target: upstream.target.clone(),
            upstream: c.peer,
            idle_timeout: shared.idle_timeout,
            hard_stop: shared.hard_stop.clone(),
        };
        let mut tally = ByteTally::default();
        let sampler = shared
            .bytes_flush
            .and_then(|every| Some((Sampler::new(&client, &c.stream, header)?, every)));
        let carry = shared.plane.carry(client, c.stream, &info);
        let transfer = match sampler {
            Some((sampler, every)) => {
                live::carry_counting(carry, sampler, every, &self.app.metrics, &mut tally).await
            }
            None => carry.await,
        };
        drop(c.guard);
        self.close(&shared, local, upstream, &transfer, tally);
    }

    /// The one record per connection: metrics, the access log and the log
    /// line. `bytes_in` is client→target and `bytes_out` target→client, as
    /// seen from the client's side of the proxy (HAProxy's and Envoy's
    /// convention for "received"/"sent" by the listener).
    fn close(
        self,
        shared: &Shared,
        local: Option<SocketAddr>,
        upstream: Upstream,
        t: &Transfer,
        tally: ByteTally,
    ) {
        let lived = self.started.elapsed();
        self.app
            .metrics
            .finished(t, upstream.attempts, tally, lived.as_secs_f64());
        let target = if upstream.target.is_empty() {
            "-"
        } else {
            upstream.target.as_str()
        };
        let duration_ms = lived.as_millis() as u64;
        let connect_ms = upstream.connect.as_millis() as u64;
        if let Some(log) = &shared.access_log {
            log.record(&access_log::Entry {
                timestamp: access_log::rfc3339(SystemTime::now()),
                start: access_log::rfc3339(self.started_at),
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
            end = t.end.as_str(),
            "connection closed"
        );
    }
}

/// Writes the PROXY header before any client byte can reach the target
/// (the data plane starts only after this returns); returns its length.
/// `local`: the address the client connected to.
async fn send_proxy_header(
    local: io::Result<SocketAddr>,
    upstream: &mut TcpStream,
    peer: SocketAddr,
    version: ProxyProtocol,
) -> io::Result<u64> {
    use tokio::io::AsyncWriteExt;
    let local = local?;
    let header = proxy_protocol::header(version, peer, local);
    // A fresh socket's send buffer takes ~100 bytes at once; the timeout
    // only guards against a target that accepted and then froze.
    tokio::time::timeout(Duration::from_secs(5), upstream.write_all(&header))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "PROXY header write timed out"))??;
    Ok(header.len() as u64)
}

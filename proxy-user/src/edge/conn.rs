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
use super::handover::{MovedMeta, Moving};
use super::live::{self, Sampler};
use super::tracker::Tracked;
use super::{AppRuntime, Shared};
use crate::config::ProxyProtocol;
use crate::dataplane::{arm_reset, ConnInfo, EndReason, PairHold, Parking, Transfer};
use crate::ops::access_log;
use crate::ops::metrics::{ActiveConn, ByteTally};
use crate::upstream::connect;
use crate::upstream::proxy_protocol;

/// What a connection holds until it is closed.
/// (A connection moved here from another process holds permits only if
/// there was room: it is established and must not be refused.)
struct Held {
    _app_permit: Option<OwnedSemaphorePermit>,
    _global_permit: Option<OwnedSemaphorePermit>,
    _tracked: Tracked,
    _active: ActiveConn,
}

pub(super) struct Conn {
    id: u64,
    client: SocketAddr,
    port: u16,
    app: Arc<AppRuntime>,
    started: Instant,
    /// Processes that carried it before this one (an upgrade moved it).
    carried_by: Vec<u32>,
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
                _app_permit: Some(app_permit),
                _global_permit: Some(global_permit),
                _tracked: shared.tracker.track(),
                _active: app.metrics.open(),
            },
            app,
            started: Instant::now(),
            started_at: SystemTime::now(),
            carried_by: Vec::new(),
        }
    }

    /// A connection another process carried until now (`handover::resume`).
    pub(super) fn resumed(meta: &MovedMeta, app: Arc<AppRuntime>, shared: &Shared) -> Conn {
        let now = Instant::now();
        Conn {
            id: meta.id,
            client: meta.client,
            port: meta.port,
            _held: Held {
                _app_permit: app.permits.clone().try_acquire_owned().ok(),
                _global_permit: shared.global.clone().try_acquire_owned().ok(),
                _tracked: shared.tracker.track(),
                _active: app.metrics.open(),
            },
            app,
            started: now
                .checked_sub(Duration::from_millis(meta.age_ms))
                .unwrap_or(now),
            started_at: SystemTime::now()
                .checked_sub(Duration::from_millis(meta.age_ms))
                .unwrap_or(SystemTime::UNIX_EPOCH),
            carried_by: meta.carried_by.clone(),
        }
    }

    /// Carries on a connection moved here, to its close line.
    pub(super) async fn carry_resumed(self, m: Moving, shared: Arc<Shared>) {
        let info = ConnInfo {
            id: self.id,
            app: self.app.balancer.app.clone(),
            listen_port: self.port,
            client: self.client,
            target: m.meta.target.clone(),
            upstream: m.meta.upstream,
            idle_timeout: shared.idle_timeout,
            fin_timeouts: shared.fin_timeouts,
            hard_stop: shared.hard_stop.clone(),
        };
        let upstream = Upstream {
            target: m.meta.target.clone(),
            attempts: m.meta.attempts,
            connect: Duration::ZERO,
        };
        let local = m.client.local_addr().ok();
        if let Some(t) = self
            .carry(&shared, m.client, m.upstream, &info, m.meta, m.hold)
            .await
        {
            self.close(&shared, local, upstream, &t, ByteTally::default());
        }
    }

    /// Carries the bytes. On the userspace planes the connection may park
    /// for an upgrade and move to the new process: then None, and the new
    /// process writes the close line.
    async fn carry(
        &self,
        shared: &Arc<Shared>,
        mut client: TcpStream,
        mut upstream: TcpStream,
        info: &ConnInfo,
        mut meta: MovedMeta,
        hold: Option<PairHold>,
    ) -> Option<Transfer> {
        // The plane's future comes boxed: each layer that takes a future by
        // value (scope, carry_counting) would otherwise hold it twice (rustc
        // keeps the moved-from argument), and every idle connection's task
        // carried those copies: 21.7 KB per connection before.
        if !shared.plane.moves() {
            return Some(shared.plane.carry(client, upstream, info, [0, 0]).await);
        }
        // A fastpath pair moved here resumes from its ledger.
        let mut resume = meta.fastpath.take().zip(hold);
        loop {
            let parking = Parking::new(shared.handover.requests());
            let carry = match resume.take() {
                Some((ledger, hold)) => shared.plane.resume(client, upstream, info, ledger, hold),
                None => {
                    let prior = [meta.client_to_target, meta.target_to_client];
                    shared.plane.carry(client, upstream, info, prior)
                }
            };
            let t = parking.scope(carry).await;
            let Some(p) = parking.take() else {
                return Some(Transfer {
                    client_to_target: meta.client_to_target + t.client_to_target,
                    target_to_client: meta.target_to_client + t.target_to_client,
                    userspace_bytes: meta.userspace_bytes + t.userspace_bytes,
                    ..t
                });
            };
            meta.client_to_target += p.client_to_target;
            meta.target_to_client += p.target_to_client;
            meta.userspace_bytes += p.client_to_target + p.target_to_client;
            meta.age_ms = self.started.elapsed().as_millis() as u64;
            let mut out = meta.clone();
            out.carried_by = (self.carried_by.iter().copied())
                .chain([crate::ops::pid()])
                .collect();
            let (ledger, hold) = p.fastpath.unzip();
            out.fastpath = ledger;
            let moving = Moving {
                meta: out,
                app: self.app.clone(),
                client: p.client,
                upstream: p.upstream,
                hold,
            };
            match shared.handover.offer(Box::new(moving)) {
                Ok(()) => {
                    tracing::info!(
                        conn = self.id,
                        app = %self.app.balancer.app,
                        client = %self.client,
                        bytes_in = meta.client_to_target,
                        bytes_out = meta.target_to_client,
                        pid = crate::ops::pid(),
                        "connection handed over to the new process"
                    );
                    return None;
                }
                // Nobody takes it (any more): carry on here.
                Err(back) => {
                    let back = *back;
                    resume = back.meta.fastpath.zip(back.hold);
                    (client, upstream) = (back.client, back.upstream);
                }
            }
        }
    }

    /// Connects, carries and closes; the record is written on every path.
    pub(super) async fn serve(mut self, mut client: TcpStream, shared: Arc<Shared>) {
        // Interactive protocols through the proxy must not gain Nagle
        // delays; the upstream side is set where it is dialed. Both stay
        // set whichever plane carries them (or process, after an upgrade).
        let _ = client.set_nodelay(true);
        // The PROXY header and the per-client limits: refused clients are
        // counted there and get no close record, like those over a limit.
        // Admission and connect are boxed while they run: a task is as big
        // as its largest await, and theirs (1.5 and 1.8 KB) stayed in every
        // idle connection's task, which only needs 1.3 KB to carry.
        let Some(admitted) =
            Box::pin(admit_client(&mut client, self.client, &self.app, &shared)).await
        else {
            return;
        };
        self.client = admitted.addr;
        // The address the client connected to: only the access log and the
        // PROXY header use it, and a getsockname per connection is not free.
        let local = match (admitted.local, &shared.access_log) {
            (None, Some(_)) => client.local_addr().ok(),
            (local, _) => local,
        };
        let balancer = &self.app.balancer;
        let mut hard_stop = shared.hard_stop.clone();
        let connected = tokio::select! {
            r = Box::pin(connect::connect(balancer, &shared.policy, &shared.loop_guard)) => r,
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
            fin_timeouts: shared.fin_timeouts,
            hard_stop: shared.hard_stop.clone(),
        };
        let mut tally = ByteTally::default();
        let sampler = shared
            .bytes_flush
            .map(|every| (Sampler::new(&client, &c.stream, header), every));
        let meta = MovedMeta {
            id: self.id,
            app: balancer.app.to_string(),
            port: self.port,
            client: self.client,
            target: upstream.target.clone(),
            upstream: c.peer,
            attempts: upstream.attempts,
            client_to_target: 0,
            target_to_client: 0,
            userspace_bytes: 0,
            age_ms: 0,
            carried_by: Vec::new(),
            fastpath: None,
        };
        let carry = Box::pin(self.carry(&shared, client, c.stream, &info, meta, None));
        let transfer = match sampler {
            Some((sampler, every)) => {
                live::carry_counting(carry, sampler, every, &self.app.metrics, &mut tally).await
            }
            None => carry.await,
        };
        drop(c.guard);
        // None: handed over to a new process, which writes the close line.
        if let Some(transfer) = transfer {
            self.close(&shared, local, upstream, &transfer, tally);
        }
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
        let carried_by = self
            .carried_by
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
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
            promoted_ms = t.promoted_after.map(|d| d.as_millis() as u64),
            demoted = t.demoted,
            end = t.end.as_str(),
            pid = crate::ops::pid(),
            carried_by = %carried_by,
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

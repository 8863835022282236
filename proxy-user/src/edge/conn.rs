//! One client connection: admitted, connected to a target, carried, and
//! closed with one record. The `Conn` owns what the connection holds
//! (limit permits, its place in the drain tracker, the active gauge), so
//! whatever path it ends on releases all of it. A connection moved here by
//! an upgrade enters at `resume` and goes straight to carrying.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::admission::{admit, admit_client, resumed_slots, ClientSlots};
use super::handover::{MovedMeta, Moving};
use super::live::{self, Sampler};
use super::tracker::Tracked;
use super::{AppRuntime, Shared};
use crate::config::ProxyProtocol;
use crate::dataplane::{arm_reset, ConnInfo, EndReason, Transfer};
use crate::ops::metrics::{ActiveConn, ByteTally};
use crate::upstream::balancer::ActiveGuard;
use crate::upstream::connect;
use crate::upstream::proxy_protocol;

mod carry;
mod close;

use carry::Prior;

/// A client a listener accepted: let in if the connection limits have room
/// (else `admit` reset it), then served on a task of its own.
pub(super) fn spawn(
    sock: TcpStream,
    peer: SocketAddr,
    port: u16,
    app: &Arc<AppRuntime>,
    shared: &Arc<Shared>,
) {
    let Some(permits) = admit(&sock, peer, port, app, shared) else {
        return;
    };
    let conn = Conn::admitted(peer, port, app.clone(), shared, permits);
    let shared = shared.clone();
    tokio::spawn(Box::new(conn).serve(sock, shared));
}

/// Resumes a connection moved here (or given back to this process when
/// the successor could not take it): it counts against the limits as any
/// other (without being refused for them: it is already established), and
/// its close line continues the one it started.
pub fn resume(shared: &Arc<Shared>, moving: Moving) {
    spawn_resumed(shared, moving, true);
}

/// Like `resume`, for a connection the successor answered for and did not
/// take (its app is not in the new config, its map set was not adopted):
/// it stays in this process to its end. Offered again, it would only park
/// and come back until the handoff is over.
pub fn resume_here(shared: &Arc<Shared>, moving: Moving) {
    spawn_resumed(shared, moving, false);
}

fn spawn_resumed(shared: &Arc<Shared>, moving: Moving, parks: bool) {
    let mut conn = Conn::resumed(&moving.meta, moving.app.clone(), shared);
    conn.parks = parks;
    let shared = shared.clone();
    tokio::spawn(conn.carry_resumed(moving, shared));
}

/// What a connection holds until it is closed.
/// (A connection moved here from another process holds permits only if
/// there was room: it is established and must not be refused.)
struct Held {
    _app_permit: Option<OwnedSemaphorePermit>,
    _global_permit: Option<OwnedSemaphorePermit>,
    /// Set once the client's real address is known (`serve`).
    _client_slots: ClientSlots,
    _tracked: Tracked,
    _active: ActiveConn,
}

struct Conn {
    id: u64,
    client: SocketAddr,
    port: u16,
    /// Bytes of the client's PROXY header, read here and forwarded to
    /// nobody. The client socket's TCP counts them as received, so the
    /// fastpath's FIN ledger must count them too. (Beside `port`, in room
    /// the struct had anyway.)
    client_header: u32,
    /// False once a successor refused it: it is not offered again.
    parks: bool,
    /// Bytes of our PROXY header to the target: its socket's count of
    /// acknowledged bytes includes them (`live`), here and after a move.
    /// (We send no TLVs: at most 107 bytes, v1's longest. A byte, where
    /// the struct had room.)
    target_header: u8,
    app: Arc<AppRuntime>,
    started: Instant,
    /// Processes that carried it before this one (an upgrade moved it).
    carried_by: Vec<u32>,
    _held: Held,
}

/// Where the connection got to upstream: the target as configured (None:
/// it got to none), how many connect attempts it took, and how long they
/// took.
struct Upstream {
    target: Option<Arc<str>>,
    attempts: u32,
    connect: Duration,
}

impl Upstream {
    const NONE: Upstream = Upstream {
        target: None,
        attempts: 0,
        connect: Duration::ZERO,
    };
}

/// What the close line says of the connection's two ends: the address the
/// client connected to (where known: the client's PROXY header, or the
/// socket when the access log wants it) and where it got to upstream. It
/// moves with the connection at an upgrade, so the new process logs what
/// the first one would have.
struct Ends {
    local: Option<SocketAddr>,
    upstream: Upstream,
}

impl Conn {
    fn admitted(
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
            client_header: 0,
            parks: true,
            target_header: 0,
            _held: Held {
                _app_permit: Some(app_permit),
                _global_permit: Some(global_permit),
                _client_slots: ClientSlots::default(),
                _tracked: shared.tracker.track(),
                _active: app.metrics.open(),
            },
            app,
            started: Instant::now(),
            carried_by: Vec::new(),
        }
    }

    /// A connection another process carried until now (`resume`).
    fn resumed(meta: &MovedMeta, app: Arc<AppRuntime>, shared: &Shared) -> Conn {
        let now = Instant::now();
        // Given back to this process (the successor did not take it): it
        // was not carried anywhere else.
        let mut carried_by = meta.carried_by.clone();
        if carried_by.last() == Some(&crate::ops::pid()) {
            carried_by.pop();
        }
        Conn {
            id: meta.id,
            client: meta.client,
            port: meta.port,
            client_header: meta.client_header,
            parks: true,
            target_header: u8::try_from(meta.target_header).unwrap_or(u8::MAX),
            _held: Held {
                _app_permit: app.permits.clone().try_acquire_owned().ok(),
                _global_permit: shared.global.clone().try_acquire_owned().ok(),
                _client_slots: resumed_slots(meta.client.ip(), &app, shared),
                _tracked: shared.tracker.track(),
                _active: app.metrics.open(),
            },
            app,
            started: now
                .checked_sub(Duration::from_millis(meta.age_ms))
                .unwrap_or(now),
            carried_by,
        }
    }

    /// What the data plane is told about this connection.
    fn info(&self, shared: &Shared) -> ConnInfo {
        ConnInfo {
            id: self.id,
            rules: shared.rules.clone(),
        }
    }

    /// Sets up, carries and closes; the record is written on every path.
    ///
    /// A task is as big as its largest await, and the setup's (admission,
    /// connect, the PROXY header: 1.2 KB) would stay in every idle
    /// connection's task, which needs half of that to carry: so the setup
    /// runs boxed, and owns what it needs while it runs. The task's own
    /// future is an `async move` block, not an `async fn`: an async fn
    /// keeps each by-value argument twice (the argument and the local it
    /// moves to) for as long as it lives, and this block captures only the
    /// setup.
    fn serve(
        self: Box<Self>,
        client: TcpStream,
        shared: Arc<Shared>,
    ) -> impl Future<Output = ()> + Send {
        let set_up = Box::pin(self.set_up(client, shared));
        async move {
            // Taken apart: the sockets go into the carry, and a `Ready`
            // kept whole would keep room for them beside it.
            let Some(Ready {
                conn,
                shared,
                client,
                upstream,
                info,
                mut sampler,
                ends,
                guard,
            }) = set_up.await
            else {
                return;
            };
            let mut tally = ByteTally::default();
            let carry = Box::pin(conn.carry(
                &shared,
                client,
                upstream,
                &info,
                &ends,
                Prior::default(),
                None,
            ));
            let transfer = match (&mut sampler, &shared.flush_clock) {
                (Some(sampler), Some(clock)) => {
                    live::carry_counting(carry, sampler, clock, &conn.app.metrics, &mut tally).await
                }
                _ => carry.await,
            };
            drop(guard);
            match transfer {
                Ok(transfer) => (*conn).close(&shared, ends, &transfer, tally),
                // Handed over to a new process, which writes the close line
                // and counts the bytes from here on: this one counts its own.
                Err([c2t, t2c]) => tally.advance(&conn.app.metrics, c2t, t2c),
            }
        }
    }

    /// Admits the client (the PROXY header it may send, the per-client
    /// limits), connects to a target and sends our PROXY header if the app
    /// wants one. Gives back what it was given, for the carry; None: it
    /// was closed here (its record written, if it gets one).
    async fn set_up(
        mut self: Box<Self>,
        mut client: TcpStream,
        shared: Arc<Shared>,
    ) -> Option<Ready> {
        // The client socket came with TCP_NODELAY from its listener
        // (`listener::nodelay`); the upstream side is set where it is
        // dialed. Both stay set whichever plane carries them (or process,
        // after an upgrade).
        // Refused clients are counted in admission and get no close record,
        // like those over a limit. Their per-client slots go where the
        // connection keeps what it holds.
        let mut signals = shared.rules.signals.clone();
        let admitted = if self.app.accept_proxy.is_some() {
            // Reading the client's header can take its app's whole
            // `Timeout`: a hard stop must not wait for it, nor end it with a
            // FIN and no record when the process exits.
            let admitting = admit_client(&mut client, self.client, &self.app, &shared);
            tokio::select! {
                admitted = admitting => admitted,
                _ = signals.wait_for(|s| s.hard_stop) => {
                    let local = shared.access_log.as_ref().and_then(|_| client.local_addr().ok());
                    (*self).cut_before_the_target(&shared, &client, local);
                    return None;
                }
            }
        } else {
            admit_client(&mut client, self.client, &self.app, &shared).await
        }?;
        self.client = admitted.addr;
        self.client_header = admitted.header;
        self._held._client_slots = admitted.slots;
        // The address the client connected to: only the access log and the
        // PROXY header use it, and a getsockname per connection is not free.
        let local = match (admitted.local, &shared.access_log) {
            (None, Some(_)) => client.local_addr().ok(),
            (local, _) => local,
        };
        let balancer = &self.app.balancer;
        let connected = tokio::select! {
            r = connect::connect(balancer, &shared.policy, &shared.loop_guard) => r,
            _ = signals.wait_for(|s| s.hard_stop) => {
                (*self).cut_before_the_target(&shared, &client, local);
                return None;
            }
        };
        let mut c = match connected {
            Ok(c) => c,
            Err(failed) => {
                // At most one a second: with every target down, a client
                // flood would be a log flood (each still has its close line).
                if let Some(suppressed) = shared.connect_fail_log.check() {
                    tracing::warn!(conn = self.id, app = %balancer.app, port = self.port, client = %self.client, attempts = failed.attempts, error = %format!("{:#}", failed.last_error), suppressed, "all connect attempts failed, resetting client");
                }
                // RST: a clean EOF would pass for an empty session to a
                // protocol where the server speaks first.
                arm_reset(&client);
                let upstream = Upstream {
                    attempts: failed.attempts,
                    connect: self.started.elapsed(),
                    ..Upstream::NONE
                };
                let t = Transfer::none(EndReason::ConnectFailed);
                (*self).close(&shared, Ends { local, upstream }, &t, ByteTally::default());
                return None;
            }
        };
        let record = Upstream {
            target: Some(c.guard.backend().label.clone()),
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
            // A target that does not take the header holds it up to its
            // timeout: a hard stop ends it as it ends a connect.
            let sent = tokio::select! {
                r = send_proxy_header(to, &mut c.stream, self.client, version) => {
                    r.map_err(|e| {
                        tracing::debug!(conn = self.id, error = %e, "sending PROXY header failed");
                        EndReason::TargetReset
                    })
                }
                _ = signals.wait_for(|s| s.hard_stop) => Err(EndReason::DrainTimeout),
            };
            match sent {
                Ok(n) => {
                    header = n;
                    self.target_header = u8::try_from(n).unwrap_or(u8::MAX);
                }
                Err(end) => {
                    // Both: the target may hold part of a header, the client nothing.
                    arm_reset(&client);
                    arm_reset(&c.stream);
                    let t = Transfer::none(end);
                    let ends = Ends {
                        local,
                        upstream: record,
                    };
                    (*self).close(&shared, ends, &t, ByteTally::default());
                    return None;
                }
            }
        }
        Some(Ready {
            info: self.info(&shared),
            sampler: (shared.flush_clock.is_some())
                .then(|| Sampler::new(&client, &c.stream, header)),
            client,
            upstream: c.stream,
            ends: Ends {
                local,
                upstream: record,
            },
            guard: c.guard,
            conn: self,
            shared,
        })
    }
}

impl Conn {
    /// The drain deadline reached a connection before it had a target: the
    /// client gets a reset (a cut must look cut) and the close line says
    /// `drain_timeout`.
    fn cut_before_the_target(self, shared: &Shared, client: &TcpStream, local: Option<SocketAddr>) {
        arm_reset(client);
        let t = Transfer::none(EndReason::DrainTimeout);
        let ends = Ends {
            local,
            upstream: Upstream::NONE,
        };
        self.close(shared, ends, &t, ByteTally::default());
    }
}

/// A connection set up and about to be carried.
struct Ready {
    conn: Box<Conn>,
    shared: Arc<Shared>,
    client: TcpStream,
    upstream: TcpStream,
    /// What the data plane is told.
    info: ConnInfo,
    /// Reads the bytes moved while it is carried (`--bytes-flush-interval`).
    /// (Paced by `Shared::flush_clock`.)
    sampler: Option<Sampler>,
    ends: Ends,
    /// Keeps the target's active count for the connection's life.
    guard: ActiveGuard,
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

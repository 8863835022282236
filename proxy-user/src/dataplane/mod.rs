//! The data plane seam: how bytes move between a client and its upstream
//! once both sockets are connected. The control plane decides *where*; a
//! plane decides *how* (userspace copy, userspace splice(2), or the kernel
//! sockmap fastpath).

mod adaptive;
mod copy;
mod fastpath;
mod fin;
mod parking;
mod pool;
mod safepoint;
mod splice;
mod tcpinfo;
mod userspace;

pub use adaptive::Promotion;
pub use copy::CopyPlane;
#[cfg(test)]
pub use copy::DEFAULT_BUFFER;
pub use fastpath::Options as FastpathOptions;
pub use fastpath::{GivenSets, Ledger as FastLedger, PairHold, FDS_PER_SET};
pub use fin::FinTimeouts;
pub use parking::Parking;
#[cfg(test)]
pub use splice::DEFAULT_PIPE;
pub use userspace::arm_reset;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;

/// What a plane needs to know about the connection it carries. Every
/// connection's task holds one for its whole life, so it is two words: the
/// app, port, client and target stay with the owner (`Conn`), which is the
/// only one to read them, and what every connection shares is one `Rules`.
/// (The target and the upstream's address were 48 of the 120 bytes this
/// took, and only an upgrade's record read them.)
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Process-unique connection id, for correlating log lines.
    pub id: u64,
    pub rules: Arc<Rules>,
}

/// What the process applies to every connection alike. Built once; each
/// connection holds a reference, not a copy (64 bytes of every task).
#[derive(Debug)]
pub struct Rules {
    /// Close when neither direction moved a byte for this long; None = never.
    pub idle_timeout: Option<Duration>,
    /// Shorter limits once one side's FIN was passed on (`fin`).
    pub fin_timeouts: FinTimeouts,
    /// What the process asks of every connection (an upgrade's park, the
    /// drain deadline). Each waiter clones it.
    pub signals: watch::Receiver<Signals>,
}

/// What the process asks of its connections. One channel for both, so a
/// connection waits for either with one waiter (`safepoint::Asks`): two
/// were 300 bytes in every connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Signals {
    /// An upgrade: stop at the next safe point and hand the sockets over
    /// (honoured where the owner set up `Parking`). False again: run on.
    pub park: bool,
    /// The drain deadline passed: reset both sides now.
    pub hard_stop: bool,
}

/// How a connection ended; the `end` field of the per-connection log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// Both sides closed cleanly (FIN both ways).
    Closed,
    /// The client sent RST (or its socket failed); RST passed to the target.
    ClientReset,
    /// The target sent RST (or its socket failed); RST passed to the client.
    TargetReset,
    IdleTimeout,
    /// The target's FIN was passed to the client, then nothing moved for
    /// `--client-fin-timeout` (HAProxy's `timeout client-fin`).
    ClientFinTimeout,
    /// The client's FIN was passed to the target, then nothing moved for
    /// `--server-fin-timeout` (HAProxy's `timeout server-fin`).
    ServerFinTimeout,
    /// Still open when the drain timeout expired at shutdown.
    DrainTimeout,
    /// Every connect attempt failed; the client was closed.
    ConnectFailed,
    /// Rejected at accept: connection limit reached.
    Limit,
    /// An `AcceptProxyProtocol` app's client was reset for want of a good
    /// PROXY header (untrusted source, malformed, closed, too slow).
    ProxyHeader,
}

impl EndReason {
    pub const ALL: [EndReason; 10] = [
        EndReason::Closed,
        EndReason::ClientReset,
        EndReason::TargetReset,
        EndReason::IdleTimeout,
        EndReason::ClientFinTimeout,
        EndReason::ServerFinTimeout,
        EndReason::DrainTimeout,
        EndReason::ConnectFailed,
        EndReason::Limit,
        EndReason::ProxyHeader,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Closed => "closed",
            EndReason::ClientReset => "client_reset",
            EndReason::TargetReset => "target_reset",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::ClientFinTimeout => "client_fin_timeout",
            EndReason::ServerFinTimeout => "server_fin_timeout",
            EndReason::DrainTimeout => "drain_timeout",
            EndReason::ConnectFailed => "connect_failed",
            EndReason::Limit => "limit",
            EndReason::ProxyHeader => "proxy_header",
        }
    }
}

/// Result of carrying one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes read from the client and written to the target.
    pub client_to_target: u64,
    /// Bytes read from the target and written to the client.
    pub target_to_client: u64,
    pub end: EndReason,
    /// Payload bytes (both ways) that userspace read and wrote itself; the
    /// rest the kernel carried. Equal to the sum of both directions on the
    /// copy plane, near zero on the fastpath.
    pub userspace_bytes: u64,
    /// The plane that carried it last (`fastpath` once promoted).
    pub plane: Plane,
    /// `--mode auto`: how long the connection was carried in userspace
    /// before the kernel took it (None: never promoted).
    pub promoted_after: Option<Duration>,
    /// Directions the kernel handed back to userspace (0 to 2 in all), by
    /// why (`Demotion as usize`).
    pub demoted: [u8; Demotion::ALL.len()],
    /// The FIN ledger found bytes lost or duplicated; both sides were reset.
    pub lost: bool,
    /// Bytes of retransmitted segments the fastpath's verdict cut because
    /// they overlapped bytes already received (both ways).
    pub overlaps_cut: u64,
}

impl Transfer {
    /// A connection that never reached a data plane.
    pub fn none(end: EndReason) -> Transfer {
        Transfer {
            client_to_target: 0,
            target_to_client: 0,
            userspace_bytes: 0,
            end,
            plane: Plane::None,
            promoted_after: None,
            demoted: [0; Demotion::ALL.len()],
            lost: false,
            overlaps_cut: 0,
        }
    }

    /// The same, carried by `plane`.
    pub fn on(self, plane: Plane) -> Transfer {
        Transfer { plane, ..self }
    }
}

/// Which plane carried a connection: the `plane` field of the close line
/// and the `plane` label of `proxy_connections_plane_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Plane {
    Fastpath,
    Splice,
    Copy,
    /// The fastpath could not take the pair (install failed) and the copy
    /// pump carried it, so it doubles as the install-failure count.
    CopyFallback,
    /// Never reached a data plane: every connect failed, the PROXY header to
    /// the target could not be sent, or the drain deadline hit before the
    /// carry began (reading the client's header, connecting, sending ours).
    None,
}

impl Plane {
    pub const ALL: [Plane; 5] = [
        Plane::Fastpath,
        Plane::Splice,
        Plane::Copy,
        Plane::CopyFallback,
        Plane::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Plane::Fastpath => "fastpath",
            Plane::Splice => "splice",
            Plane::Copy => "copy",
            Plane::CopyFallback => "copy-fallback",
            Plane::None => "none",
        }
    }
}

/// Kernel buffer sizes of every proxied socket (`--socket-buffer`). A
/// reader slower than its sender leaves the difference queued in the
/// kernel: with autotuning that is up to tcp_wmem's max on the socket to the
/// reader plus tcp_rmem's max on the socket from the sender (about 10 MB per
/// slow reader here), which a few thousand slow readers turn into the whole
/// machine. A fixed size bounds it; the kernel doubles the value asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffers {
    /// None: kernel autotuning.
    pub size: Option<u32>,
}

impl SocketBuffers {
    pub fn apply(&self, sock: &impl std::os::fd::AsFd) -> std::io::Result<()> {
        if let Some(size) = self.size {
            let sock = socket2::SockRef::from(sock);
            sock.set_send_buffer_size(size as usize)?;
            sock.set_recv_buffer_size(size as usize)?;
        }
        Ok(())
    }
}

/// Why the kernel handed a direction of a pair back to userspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Demotion {
    /// Its receiver fell the in-flight bound behind (`--fastpath-inflight`).
    Bound,
    /// `--mode auto`: a promoted direction turned busy (more skbs per
    /// second than `--promote-segments-below`).
    Busy,
}

impl Demotion {
    pub const ALL: [Demotion; 2] = [Demotion::Bound, Demotion::Busy];

    pub fn as_str(self) -> &'static str {
        match self {
            Demotion::Bound => "bound",
            Demotion::Busy => "busy",
        }
    }
}

/// Which data plane to use, from `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Adaptive: connections start on splice(2) (else copy) and quiet ones move into the kernel fastpath where BPF loads (root); without BPF, splice (else copy) only.
    Auto,
    /// Kernel fastpath for every connection, or exit with the reason.
    Fastpath,
    /// Userspace copy only; never touches BPF.
    Copy,
    /// Userspace splice(2) through a pipe (zero-copy, as HAProxy's splice); never touches BPF.
    Splice,
}

pub enum DataPlane {
    Copy(copy::CopyPlane),
    Splice(splice::SplicePlane),
    // Boxed: its maps and program handles are large, and it exists once.
    Fastpath(Box<fastpath::FastpathPlane>),
    Adaptive(Box<adaptive::AdaptivePlane>),
}

impl DataPlane {
    /// `auto` is the adaptive plane where the fastpath loads (NOTES.md §2:
    /// splice wins bulk and churn, the kernel wins quiet and interactive
    /// connections), else splice(2), else copy.
    /// `pipe_size`: the splice plane's pipe per direction.
    pub fn select(
        mode: Mode,
        copy: copy::CopyPlane,
        pipe_size: usize,
        fastpath: fastpath::Options,
    ) -> anyhow::Result<DataPlane> {
        let load_fastpath =
            |copy: &copy::CopyPlane, options| fastpath::FastpathPlane::load(copy.clone(), options);
        let load_splice = || splice::SplicePlane::load(pipe_size, &copy).map(DataPlane::Splice);
        match mode {
            Mode::Copy => Ok(DataPlane::Copy(copy)),
            Mode::Splice => load_splice().map_err(|e| {
                e.context("--mode splice: cannot use splice(2) (use --mode copy to run without it)")
            }),
            // Forced: no promotion, so no direction leaves for being busy.
            Mode::Fastpath => load_fastpath(&copy, fastpath::Options { promotion: None, ..fastpath }).map(|p| DataPlane::Fastpath(Box::new(p))).map_err(|e| {
                e.context("--mode fastpath: cannot load the kernel fastpath (use --mode auto or --mode copy to run without it)")
            }),
            Mode::Auto => {
                let userspace = load_splice().or_else(|e| {
                    tracing::warn!(error = %format!("{e:#}"), "splice(2) unavailable; using userspace copy");
                    Ok::<_, anyhow::Error>(DataPlane::Copy(copy.clone()))
                })?;
                let Some(promotion) = fastpath.promotion else {
                    return Ok(userspace);
                };
                let fastpath = match load_fastpath(&copy, fastpath) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::info!(reason = %format!("{e:#}"), "kernel fastpath unavailable; --mode auto carries every connection in userspace");
                        return Ok(userspace);
                    }
                };
                let start = match userspace {
                    DataPlane::Splice(p) => adaptive::Start::Splice(p),
                    _ => adaptive::Start::Copy(copy),
                };
                Ok(DataPlane::Adaptive(Box::new(adaptive::AdaptivePlane {
                    start,
                    fastpath,
                    promotion,
                })))
            }
        }
    }

    /// The kernel fastpath, where this plane has one (`fastpath`, `auto`).
    fn fastpath(&self) -> Option<&fastpath::FastpathPlane> {
        match self {
            DataPlane::Fastpath(p) => Some(p),
            DataPlane::Adaptive(p) => Some(&p.fastpath),
            DataPlane::Copy(_) | DataPlane::Splice(_) => None,
        }
    }

    /// Whether moved fastpath pairs (and their map sets) can resume here.
    pub fn takes_fastpath(&self) -> bool {
        self.fastpath().is_some()
    }

    /// Upgrade, old process: every map set, its ring no longer read here.
    pub async fn give_map_sets(&self) -> Option<GivenSets> {
        match self.fastpath() {
            Some(p) => Some(p.give_sets().await),
            None => None,
        }
    }

    /// Upgrade, new process: adopts the old one's map sets (`FDS_PER_SET`
    /// fds each, in `ids` order); returns the ids adopted.
    pub fn adopt_map_sets(&self, ids: &[u32], fds: Vec<std::os::fd::OwnedFd>) -> Vec<u32> {
        self.fastpath()
            .map(|p| p.adopt_sets(ids, fds))
            .unwrap_or_default()
    }

    /// A moved fastpath pair can resume here: its set, kept while it lives.
    pub fn hold(&self, ledger: &FastLedger) -> Option<PairHold> {
        self.fastpath().and_then(|p| p.hold(ledger))
    }

    /// Upgrade, new process: every pair arrived; empty adopted sets go.
    pub fn settle(&self) {
        if let Some(p) = self.fastpath() {
            p.settle();
        }
    }

    /// Carries on a fastpath pair moved here (`hold` from `hold`). Boxed
    /// like `carry`, so the caller holds either behind one pointer.
    pub fn resume<'a>(
        &'a self,
        client: TcpStream,
        upstream: TcpStream,
        conn: &'a ConnInfo,
        ledger: FastLedger,
        hold: PairHold,
    ) -> Pin<Box<dyn Future<Output = Transfer> + Send + 'a>> {
        match self.fastpath() {
            Some(p) => Box::pin(p.resume(client, upstream, conn, ledger, hold)),
            None => {
                // `hold` came from a fastpath plane: this cannot happen.
                tracing::error!(
                    conn = conn.id,
                    "a fastpath pair reached a plane without the fastpath; resetting"
                );
                arm_reset(&client);
                arm_reset(&upstream);
                Box::pin(std::future::ready(Transfer::none(EndReason::ClientReset)))
            }
        }
    }

    /// The plane connections start on.
    pub fn plane(&self) -> Plane {
        match self {
            DataPlane::Copy(_) => Plane::Copy,
            DataPlane::Splice(_) => Plane::Splice,
            DataPlane::Fastpath(_) => Plane::Fastpath,
            DataPlane::Adaptive(p) => p.start.plane(),
        }
    }

    /// The plane's future, boxed at its own size: a connection's task holds
    /// it for the connection's life, and an enum of the planes' futures
    /// would be as large as the largest (the kernel planes': install,
    /// ledger, demotion), or a box inside a box for the kernel planes.
    /// `prior`: bytes each way that earlier processes carried (0 for a new
    /// connection): the kernel plane's FIN ledger must count them, since
    /// the sockets' own counters do.
    pub fn carry<'a>(
        &'a self,
        client: TcpStream,
        upstream: TcpStream,
        conn: &'a ConnInfo,
        prior: [u64; 2],
    ) -> Pin<Box<dyn Future<Output = Transfer> + Send + 'a>> {
        match self {
            DataPlane::Copy(p) => Box::pin(p.carry(client, upstream, conn)),
            DataPlane::Splice(p) => Box::pin(p.carry(client, upstream, conn)),
            DataPlane::Fastpath(p) => Box::pin(p.carry(client, upstream, conn, prior)),
            DataPlane::Adaptive(p) => Box::pin(p.carry(client, upstream, conn, prior)),
        }
    }
}

//! Kernel fastpath: the client socket and its upstream socket go into a BPF
//! socket map, and the `splice` stream verdict (proxy-ebpf) redirects each
//! received skb out of the peer. Userspace reads no payload while the kernel
//! keeps up; it steps in only where the kernel alone would be wrong:
//!
//! - **Install order.** Each direction starts in pass mode: bytes stay on the
//!   source socket and userspace forwards them. Userspace *arms* redirect only
//!   after reading the source dry, and the verdict accepts the arm only if no
//!   byte was passed since (`FlowControl::expect_passed`), so a redirected
//!   byte can never overtake one userspace still holds.
//! - **Backpressure.** Redirected skbs leave the source's receive accounting,
//!   so TCP's window never closes by itself. The verdict redirects only up to
//!   `limit` (bytes the peer's TCP has acknowledged plus the in-flight bound);
//!   it asks for more credit through a ring buffer before it runs out, and
//!   when none comes it falls back to pass mode, where the bytes wait in the
//!   source's receive queue and its window closes, exactly as with the copy
//!   plane. Userspace forwards those and re-arms when the peer has caught up.
//! - **Half-close.** A FIN still reaches userspace as EOF. The peer gets its
//!   FIN only after every byte redirected before it was handed to the peer's
//!   TCP: `tcpi_bytes_acked + SIOCOUTQ - baseline - userspace writes`.
//! - **Failure to install** (socket already half-closed, map full): the pair
//!   is carried in userspace; a byte is never dropped for it.
use std::{
    collections::HashMap,
    io,
    net::Shutdown,
    os::fd::AsRawFd,
    pin::pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, RingBuf, SockHash},
    programs::SkSkb,
    Ebpf,
};
use proxy_common::{FlowControl, FlowEvent, FlowState, MODE_PASS, MODE_REDIRECT};
use socket2::SockRef;
use tokio::{io::unix::AsyncFd, net::TcpStream, sync::Notify, time::Instant};

use super::{copy::CopyPlane, tcpinfo, ConnInfo, EndReason, Transfer};

/// Default bound on one direction's bytes inside the kernel (redirected but
/// not yet acknowledged by the receiver).
pub const DEFAULT_INFLIGHT_BOUND: u64 = 4 << 20;

/// How often a direction waiting for its peer to drain looks again.
const DRAIN_POLL: Duration = Duration::from_millis(1);

/// How long EOF may wait for passed bytes still in the kernel's backlog.
const PASSED_WAIT: Duration = Duration::from_secs(10);

pub struct SockmapPlane {
    maps: Mutex<Maps>,
    /// Wakes the direction whose source cookie the verdict reported.
    waiters: Arc<Mutex<HashMap<u64, Arc<Notify>>>>,
    fallback: CopyPlane,
    bound: u64,
    /// Owns the loaded program; dropping it would detach the verdict.
    _ebpf: Mutex<Ebpf>,
}

struct Maps {
    sockets: SockHash<MapData, u64>,
    control: BpfHashMap<MapData, u64, FlowControl>,
    state: BpfHashMap<MapData, u64, FlowState>,
}

impl SockmapPlane {
    /// Loads and attaches the verdict program and proves on a loopback pair
    /// that this kernel accepts sockets into the map. Must run inside tokio.
    pub fn load(fallback: CopyPlane, bound: u64) -> Result<Self> {
        raise_memlock_limit();
        let mut ebpf = Ebpf::load(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/proxy-ebpf.o"
        )))
        .map_err(|e| anyhow::Error::new(e).context(privilege_hint("loading the eBPF object")))?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_bpf_logger(logger)?,
            Err(e) => tracing::debug!(error = %e, "BPF program has no log buffer"),
        }
        let sockets: SockHash<MapData, u64> = take_map(&mut ebpf, "SOCKETS")?;
        let program: &mut SkSkb = ebpf
            .program_mut("splice")
            .context("the eBPF object has no `splice` program")?
            .try_into()
            .context("`splice` is not an sk_skb program")?;
        program.load().context(privilege_hint(
            "loading the stream verdict (verifier output above)",
        ))?;
        program
            .attach(sockets.fd())
            .context("attaching the stream verdict to the socket map")?;
        let control = take_map(&mut ebpf, "CONTROL")?;
        let state = take_map(&mut ebpf, "STATE")?;
        let events: RingBuf<MapData> = take_map(&mut ebpf, "EVENTS")?;

        let waiters = Arc::new(Mutex::new(HashMap::new()));
        let events = register(events).context("polling the flow event ring")?;
        tokio::spawn(dispatch_events(events, Arc::clone(&waiters)));

        let mut maps = Maps {
            sockets,
            control,
            state,
        };
        probe_insert(&mut maps)?;
        Ok(SockmapPlane {
            maps: Mutex::new(maps),
            waiters,
            fallback,
            bound,
            _ebpf: Mutex::new(ebpf),
        })
    }

    pub async fn carry(&self, client: TcpStream, upstream: TcpStream, conn: &ConnInfo) -> Transfer {
        for s in [&client, &upstream] {
            if let Err(e) = s.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY failed");
            }
        }
        match self.install(&client, &upstream) {
            Ok(pair) => {
                let transfer = self.splice(&pair, &client, &upstream, conn).await;
                self.uninstall(&pair);
                transfer
            }
            Err(e) => {
                tracing::warn!(conn = conn.id, error = %format!("{e:#}"),
                    "fastpath install failed; this connection stays on the copy plane");
                let mut transfer = self.fallback.carry(client, upstream, conn).await;
                transfer.plane = "copy-fallback";
                transfer
            }
        }
    }

    /// Puts both sockets in the map, every direction in pass mode. The client
    /// goes first: if it already sent FIN the insert fails and nothing is in
    /// the map yet, so the plain copy plane takes the whole connection.
    fn install(&self, client: &TcpStream, upstream: &TcpStream) -> Result<Pair> {
        let client_cookie = tcpinfo::cookie(client).context("SO_COOKIE of the client socket")?;
        let upstream_cookie =
            tcpinfo::cookie(upstream).context("SO_COOKIE of the upstream socket")?;
        let client_side = Side::new(client_cookie);
        let upstream_side = Side::new(upstream_cookie);
        {
            let mut waiters = lock(&self.waiters);
            waiters.insert(client_cookie, Arc::clone(&client_side.notify));
            waiters.insert(upstream_cookie, Arc::clone(&upstream_side.notify));
        }
        let mut pair = Pair {
            client: client_side,
            upstream: upstream_side,
            upstream_in_map: false,
        };
        let result = (|| -> Result<()> {
            let mut maps = lock(&self.maps);
            for (src, peer) in [
                (client_cookie, upstream_cookie),
                (upstream_cookie, client_cookie),
            ] {
                let control = FlowControl {
                    peer,
                    refill_at: u64::MAX,
                    ..FlowControl::default()
                };
                maps.control
                    .insert(src, control, 0)
                    .context("CONTROL map insert")?;
                maps.state
                    .insert(src, FlowState::default(), 0)
                    .context("STATE map insert")?;
            }
            maps.sockets
                .insert(client_cookie, client.as_raw_fd(), 0)
                .context("inserting the client socket into the socket map")?;
            Ok(())
        })();
        if let Err(e) = result {
            self.uninstall(&pair);
            return Err(e);
        }
        match lock(&self.maps)
            .sockets
            .insert(upstream_cookie, upstream.as_raw_fd(), 0)
        {
            Ok(()) => pair.upstream_in_map = true,
            // The client is in the map in pass mode; both directions are
            // then forwarded by userspace, which is correct, only slower.
            Err(e) => tracing::info!(error = %e,
                "upstream socket not accepted by the socket map; copying this pair in userspace"),
        }
        // Bytes that arrived before the insert sit in the plain receive queue,
        // unseen by the verdict. Setting SO_RCVLOWAT runs the socket's
        // data_ready now, which sweeps them through the verdict (pass mode),
        // so from here on every byte userspace reads was counted as passed.
        tcpinfo::sweep_receive_queue(client).context("sweeping the client socket")?;
        if pair.upstream_in_map {
            tcpinfo::sweep_receive_queue(upstream).context("sweeping the upstream socket")?;
        }
        pair.client.base = tcpinfo::handed(client)?.total;
        pair.upstream.base = tcpinfo::handed(upstream)?.total;
        Ok(pair)
    }

    fn uninstall(&self, pair: &Pair) {
        let mut waiters = lock(&self.waiters);
        let mut maps = lock(&self.maps);
        for side in [&pair.client, &pair.upstream] {
            waiters.remove(&side.cookie);
            // Closing the fd removes the socket from the socket map; the flow
            // maps are ours to clean. A missing key is not an error here.
            let _ = maps.control.remove(&side.cookie);
            let _ = maps.state.remove(&side.cookie);
            let _ = maps.sockets.remove(&side.cookie);
        }
    }

    fn state(&self, cookie: u64) -> io::Result<FlowState> {
        lock(&self.maps)
            .state
            .get(&cookie, 0)
            .map_err(|e| io::Error::other(format!("STATE lookup: {e}")))
    }

    fn set_control(&self, cookie: u64, control: FlowControl) -> io::Result<()> {
        lock(&self.maps)
            .control
            .insert(cookie, control, 0)
            .map_err(|e| io::Error::other(format!("CONTROL update: {e}")))
    }

    async fn splice(
        &self,
        pair: &Pair,
        client: &TcpStream,
        upstream: &TcpStream,
        conn: &ConnInfo,
    ) -> Transfer {
        let redirect = pair.upstream_in_map;
        let mut up = Direction::new(
            self,
            client,
            upstream,
            &pair.client,
            &pair.upstream,
            redirect,
            true,
        );
        let mut down = Direction::new(
            self,
            upstream,
            client,
            &pair.upstream,
            &pair.client,
            redirect,
            pair.upstream_in_map,
        );
        let start = Instant::now();
        let end = {
            let mut up_run = pin!(up.run());
            let mut down_run = pin!(down.run());
            let (mut up_done, mut down_done) = (false, false);
            let mut idle = IdleWatch::new(conn.idle_timeout);
            loop {
                let (result, from_client) = tokio::select! {
                    r = &mut up_run, if !up_done => { up_done = true; (r, true) }
                    r = &mut down_run, if !down_done => { down_done = true; (r, false) }
                    _ = idle.tick() => {
                        let moved = self.moved(pair);
                        if idle.is_idle(moved) {
                            break EndReason::IdleTimeout;
                        }
                        continue;
                    }
                    _ = conn.hard_stopped() => {
                        arm_reset(client);
                        arm_reset(upstream);
                        break EndReason::DrainTimeout;
                    }
                };
                let client_failed = match result {
                    DirEnd::Eof if up_done && down_done => break EndReason::Closed,
                    DirEnd::Eof => continue,
                    DirEnd::ReadFailed(e) => {
                        tracing::debug!(conn = conn.id, error = %e, from_client, "read failed");
                        from_client
                    }
                    DirEnd::WriteFailed(e) => {
                        tracing::debug!(conn = conn.id, error = %e, to_client = !from_client, "write failed");
                        !from_client
                    }
                };
                if client_failed {
                    arm_reset(upstream);
                    break EndReason::ClientReset;
                }
                arm_reset(client);
                break EndReason::TargetReset;
            }
        };
        let user = (up.user_bytes, down.user_bytes);
        let client_state = self.state(pair.client.cookie).unwrap_or_default();
        let upstream_state = self.state(pair.upstream.cookie).unwrap_or_default();
        tracing::debug!(
            conn = conn.id,
            user_c2t = user.0,
            user_t2c = user.1,
            kernel_c2t = client_state.redirected,
            kernel_t2c = upstream_state.redirected,
            fallbacks = client_state.fallbacks + upstream_state.fallbacks,
            elapsed_ms = start.elapsed().as_millis() as u64,
            "fastpath pair done"
        );
        Transfer {
            client_to_target: client_state.redirected + user.0,
            target_to_client: upstream_state.redirected + user.1,
            end,
            plane: if redirect {
                "fastpath"
            } else {
                "copy-fallback"
            },
        }
    }

    /// Bytes moved both ways so far, kernel and userspace: the idle signal.
    fn moved(&self, pair: &Pair) -> u64 {
        [pair.client.cookie, pair.upstream.cookie]
            .iter()
            .filter_map(|c| self.state(*c).ok())
            .map(|s| s.redirected + s.passed)
            .sum()
    }
}

/// One socket of an installed pair.
struct Side {
    cookie: u64,
    /// Bytes handed to this socket's TCP before the install (SYN included).
    base: u64,
    notify: Arc<Notify>,
}

impl Side {
    fn new(cookie: u64) -> Self {
        Side {
            cookie,
            base: 0,
            notify: Arc::new(Notify::new()),
        }
    }
}

struct Pair {
    client: Side,
    upstream: Side,
    upstream_in_map: bool,
}

#[derive(Debug)]
enum DirEnd {
    Eof,
    ReadFailed(io::Error),
    WriteFailed(io::Error),
}

/// One direction of a spliced pair: bytes arriving on `src` leave from `dst`.
struct Direction<'a> {
    plane: &'a SockmapPlane,
    src: &'a TcpStream,
    dst: &'a TcpStream,
    src_side: &'a Side,
    dst_side: &'a Side,
    /// False when the peer is not in the map: userspace forwards everything.
    may_redirect: bool,
    /// The source is in the map, so its bytes pass through the verdict.
    src_in_map: bool,
    /// Bytes userspace forwarded (pre-install bytes and pass-mode bytes).
    user_bytes: u64,
    /// The last arm request sent to the verdict.
    control: FlowControl,
    /// Redirected bytes already known to be handed to `dst`'s TCP.
    drained: u64,
    buf: Vec<u8>,
}

impl<'a> Direction<'a> {
    fn new(
        plane: &'a SockmapPlane,
        src: &'a TcpStream,
        dst: &'a TcpStream,
        src_side: &'a Side,
        dst_side: &'a Side,
        may_redirect: bool,
        src_in_map: bool,
    ) -> Self {
        Direction {
            plane,
            src,
            dst,
            src_side,
            dst_side,
            may_redirect,
            src_in_map,
            user_bytes: 0,
            control: FlowControl {
                peer: dst_side.cookie,
                refill_at: u64::MAX,
                ..FlowControl::default()
            },
            drained: 0,
            buf: Vec::new(),
        }
    }

    async fn run(&mut self) -> DirEnd {
        // No wait before the first pass: the source may hold pre-install bytes
        // and the direction has to be armed even if nothing more arrives.
        let mut refill_retry: Option<Instant> = None;
        loop {
            match self.forward_available().await {
                Ok(true) => {}
                Ok(false) => return self.finish().await,
                Err(end) => return end,
            }
            loop {
                let retry = async {
                    match refill_retry {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = self.src.readable() => {
                        if let Err(e) = r {
                            return DirEnd::ReadFailed(e);
                        }
                        break;
                    }
                    _ = self.src_side.notify.notified(), if self.may_redirect => {
                        refill_retry = self.refill();
                    }
                    _ = retry => {
                        refill_retry = self.refill();
                    }
                }
            }
        }
    }

    /// Reads the source dry, forwarding what it holds; then arms redirect.
    /// `Ok(false)` means the source sent FIN.
    async fn forward_available(&mut self) -> Result<bool, DirEnd> {
        let mut eof_deadline = None;
        loop {
            if self.buf.is_empty() {
                self.buf = vec![0; self.plane.fallback.buffer_size.max(1)];
            }
            match self.src.try_read(&mut self.buf) {
                Ok(0) => {
                    // EOF can overtake passed bytes the kernel still holds in
                    // the psock's backlog (tcp_bpf only looks at ingress_msg).
                    if self.src_in_map && self.passed_unread()? {
                        let deadline =
                            *eof_deadline.get_or_insert_with(|| Instant::now() + PASSED_WAIT);
                        if Instant::now() >= deadline {
                            return Err(DirEnd::ReadFailed(io::Error::other(
                                "passed bytes never reached the socket after FIN",
                            )));
                        }
                        tokio::time::sleep(DRAIN_POLL).await;
                        continue;
                    }
                    return Ok(false);
                }
                Ok(n) => {
                    self.wait_drained().await?;
                    write_all(self.dst, &self.buf[..n])
                        .await
                        .map_err(DirEnd::WriteFailed)?;
                    self.user_bytes += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.may_redirect {
                        let state = self
                            .plane
                            .state(self.src_side.cookie)
                            .map_err(DirEnd::ReadFailed)?;
                        if state.mode == MODE_PASS
                            && (state.fallbacks == 0 || std::env::var_os("REARM").is_some())
                        {
                            self.arm(&state);
                        }
                    }
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(DirEnd::ReadFailed(e)),
            }
        }
    }

    /// Whether the verdict passed bytes up that userspace has not read yet.
    /// Every byte read from a source in the map was passed by the verdict
    /// (the install swept older bytes through it), so the counts compare.
    fn passed_unread(&self) -> Result<bool, DirEnd> {
        let state = self
            .plane
            .state(self.src_side.cookie)
            .map_err(DirEnd::ReadFailed)?;
        Ok(state.passed > self.user_bytes)
    }

    /// The source sent FIN: pass it on once every redirected byte is out.
    async fn finish(&mut self) -> DirEnd {
        if let Err(end) = self.wait_drained().await {
            return end;
        }
        match SockRef::from(self.dst).shutdown(Shutdown::Write) {
            Ok(()) => DirEnd::Eof,
            Err(e) if e.kind() == io::ErrorKind::NotConnected => DirEnd::Eof,
            Err(e) => DirEnd::WriteFailed(e),
        }
    }

    /// Bytes the kernel redirected into `dst` that its TCP has acknowledged.
    fn delivered(&self) -> io::Result<u64> {
        let handed = tcpinfo::handed(self.dst)?;
        Ok(handed
            .acked
            .saturating_sub(self.dst_side.base)
            .saturating_sub(self.user_bytes))
    }

    /// Credit for the verdict: redirect until `dst` holds `bound` unacknowledged.
    fn credit(&self) -> io::Result<(u64, u64)> {
        let limit = self.delivered()? + self.plane.bound;
        Ok((limit, limit - self.plane.bound / 2))
    }

    fn arm(&mut self, state: &FlowState) {
        if !self.may_redirect {
            return;
        }
        let Ok((limit, refill_at)) = self.credit() else {
            return;
        };
        // Too little credit to be worth it: stay in pass mode, where the
        // source's own window holds the sender back; the next read retries.
        if limit < state.redirected + self.plane.bound / 4 {
            return;
        }
        self.control.arm += 1;
        // Everything userspace read was passed by the verdict; if the verdict
        // passed more since, it refuses this arm and userspace reads again.
        self.control.expect_passed = self.user_bytes;
        self.control.limit = limit;
        self.control.refill_at = refill_at;
        if let Err(e) = self.plane.set_control(self.src_side.cookie, self.control) {
            tracing::warn!(error = %e, "arming the fastpath failed; direction stays in userspace");
            self.may_redirect = false;
        }
    }

    /// The verdict is running out of credit: raise the limit as far as the
    /// receiver has caught up. Returns when to look again if it has not.
    fn refill(&mut self) -> Option<Instant> {
        let state = self.plane.state(self.src_side.cookie).ok()?;
        if state.mode != MODE_REDIRECT {
            return None;
        }
        let (limit, refill_at) = self.credit().ok()?;
        if limit > self.control.limit {
            self.control.limit = limit;
            self.control.refill_at = refill_at;
            if self
                .plane
                .set_control(self.src_side.cookie, self.control)
                .is_err()
            {
                return None;
            }
        }
        if state.redirected >= self.control.refill_at {
            // The receiver is behind: look again soon; if it stays behind the
            // verdict falls back to pass mode and the window closes.
            return Some(Instant::now() + DRAIN_POLL);
        }
        None
    }

    /// Waits until every byte the kernel redirected into `dst` so far has been
    /// handed to its TCP, so a userspace write or FIN cannot overtake it.
    async fn wait_drained(&mut self) -> Result<(), DirEnd> {
        if !self.may_redirect && self.control.arm == 0 {
            return Ok(());
        }
        let redirected = self
            .plane
            .state(self.src_side.cookie)
            .map_err(DirEnd::ReadFailed)?
            .redirected;
        while self.drained < redirected {
            let handed = tcpinfo::handed(self.dst).map_err(DirEnd::WriteFailed)?;
            self.drained = handed
                .total
                .saturating_sub(self.dst_side.base)
                .saturating_sub(self.user_bytes);
            if self.drained >= redirected {
                break;
            }
            if let Ok(Some(e)) = self.dst.take_error() {
                return Err(DirEnd::WriteFailed(e));
            }
            if handed.closed {
                return Err(DirEnd::WriteFailed(io::ErrorKind::ConnectionReset.into()));
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        Ok(())
    }
}

async fn write_all(dst: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        dst.writable().await?;
        match dst.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes the next close of this socket send RST instead of FIN.
fn arm_reset(sock: &TcpStream) {
    if let Err(e) = SockRef::from(sock).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "SO_LINGER 0 failed; peer will see FIN instead of RST");
    }
}

/// Idle detection from the counters: the kernel moves bytes userspace never sees.
struct IdleWatch {
    limit: Option<Duration>,
    last_moved: u64,
    since: Instant,
}

impl IdleWatch {
    fn new(limit: Option<Duration>) -> Self {
        IdleWatch {
            limit,
            last_moved: 0,
            since: Instant::now(),
        }
    }

    async fn tick(&self) {
        match self.limit {
            Some(limit) => {
                let every = (limit / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
                tokio::time::sleep(every).await
            }
            None => std::future::pending().await,
        }
    }

    fn is_idle(&mut self, moved: u64) -> bool {
        if moved != self.last_moved {
            self.last_moved = moved;
            self.since = Instant::now();
            return false;
        }
        self.limit
            .is_some_and(|limit| self.since.elapsed() >= limit)
    }
}

async fn dispatch_events(
    mut ring: AsyncFd<RingBuf<MapData>>,
    waiters: Arc<Mutex<HashMap<u64, Arc<Notify>>>>,
) {
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(guard) => guard,
            Err(e) => {
                tracing::error!(error = %e, "flow event ring failed; directions fall back to pass mode when out of credit");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<FlowEvent>() {
                continue;
            }
            // SAFETY: the verdict writes whole FlowEvent records; read_unaligned
            // makes no assumption about the ring's alignment.
            let event: FlowEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            if let Some(waiter) = lock(&waiters).get(&event.cookie) {
                waiter.notify_one();
            }
        }
        guard.clear_ready();
    }
}

fn spawn_bpf_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> Result<()> {
    let mut logger = register(logger).context("polling the BPF log ring")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

/// Proves the kernel takes an established TCP socket into the map, so that
/// `--mode auto` falls back at start rather than on every connection.
fn probe_insert(maps: &mut Maps) -> Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("probe: binding loopback")?;
    let probe = std::net::TcpStream::connect(listener.local_addr()?).context("probe: connect")?;
    let (accepted, _) = listener.accept().context("probe: accept")?;
    let key = tcpinfo::cookie(&probe)?;
    maps.sockets
        .insert(key, probe.as_raw_fd(), 0)
        .context("probe: this kernel refused a TCP socket in the socket map")?;
    maps.sockets
        .remove(&key)
        .context("probe: removing the probe socket")?;
    drop((probe, accepted));
    Ok(())
}

fn register<T: std::os::fd::AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its fd, and the AsyncFd owns `inner`, so the fd
    // stays open for as long as it is registered.
    unsafe { AsyncFd::register(inner) }.map_err(|e| e.into_parts().1)
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("the eBPF object has no map `{name}`"))?;
    T::try_from(map).with_context(|| format!("map `{name}` has an unexpected type"))
}

fn privilege_hint(what: &str) -> String {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        format!("{what} (not running as root: the fastpath needs CAP_BPF and CAP_NET_ADMIN)")
    } else {
        what.to_string()
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit; failure is only logged.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; newer kernels do not need it");
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves the maps consistent (each
    // update is one syscall), so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

//! Shared test harness: backends, the proxy as a subprocess, payload hashing.
#![allow(dead_code)]

pub mod seq;

use std::future::Future;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod generations;
pub mod streams;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub mod etcd;

/// Instantiates a data-path test once per data plane, `--mode auto`
/// included (its userspace stage, and the move into the kernel where a
/// test lasts long enough). Each test is an `async fn name(mode: &str)`.
/// To add a plane, add one `plane_mod!` line.
#[allow(unused_macros)]
macro_rules! planes {
    ($($name:ident),* $(,)?) => {
        plane_mod!(copy, "copy", $($name),*);
        plane_mod!(splice, "splice", $($name),*);
        plane_mod!(fastpath, "fastpath", $($name),*);
        plane_mod!(auto, "auto", $($name),*);
    };
}

#[allow(unused_macros)]
macro_rules! plane_mod {
    ($plane:ident, $mode:literal, $($name:ident),*) => {
        mod $plane {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($mode).await;
                }
            )*
        }
    };
}

pub const PROXY: &str = env!("CARGO_BIN_EXE_proxy");

/// Runs `fut` or panics after `secs`: no test may hang the suite.
pub async fn bounded<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {secs}s"),
    }
}

// ---------------------------------------------------------------- backends

/// An in-process TCP server. `kill()` closes the listener and every
/// connection, so new connects are refused like a dead process.
pub struct Backend {
    pub addr: SocketAddr,
    pub id: String,
    /// Connections open right now (including health probes, briefly).
    pub active: Arc<AtomicUsize>,
    pub accepted: Arc<AtomicUsize>,
    accept_task: AbortHandle,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Backend {
    /// Runs `handler` for every accepted connection (its output is ignored).
    ///
    /// Backends live on their own runtime (like a separate server process):
    /// a test hashing 1,000 payloads on its own runtime must not starve the
    /// backends' accept loops and overflow their accept queues.
    pub async fn with<F, Fut>(id: &str, handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
    {
        Backend::with_port(id, 0, handler).await
    }

    /// Like `with`, on a given port (0 = any): to bring a killed backend
    /// back at the same address.
    pub async fn with_port<F, Fut>(id: &str, port: u16, handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
    {
        let active = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let handler = Arc::new(handler);
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let task = {
            let (active, accepted, conns) = (active.clone(), accepted.clone(), conns.clone());
            backend_runtime().spawn(async move {
                // Deep backlog: bursts of 1,000 proxied connects.
                let sock = tokio::net::TcpSocket::new_v4().expect("socket");
                sock.set_reuseaddr(true).expect("SO_REUSEADDR");
                sock.bind(SocketAddr::from(([127, 0, 0, 1], port)))
                    .expect("bind backend");
                let listener: TcpListener = sock.listen(4096).expect("listen backend");
                let _ = addr_tx.send(listener.local_addr().expect("backend addr"));
                loop {
                    let Ok((sock, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    active.fetch_add(1, Ordering::SeqCst);
                    let (active, handler) = (active.clone(), handler.clone());
                    let h = tokio::spawn(async move {
                        let _g = DecOnDrop(active);
                        // Handlers may return a Result for `?`; the outcome
                        // is theirs to assert on, the server just moves on.
                        let _ = handler(sock).await;
                    });
                    conns.lock().unwrap().push(h.abort_handle());
                }
            })
        };
        let addr = addr_rx.await.expect("backend started");
        Backend {
            addr,
            id: id.to_string(),
            active,
            accepted,
            accept_task: task.abort_handle(),
            conns,
        }
    }

    /// Echoes every byte; on EOF from the client, finishes echoing and sends FIN.
    pub async fn echo(id: &str) -> Backend {
        Backend::with(id, |s| async move {
            let _ = echo_conn(s).await;
        })
        .await
    }

    /// Writes `id\n` first, then echoes.
    pub async fn identify(id: &str) -> Backend {
        Backend::identify_at(id, 0).await
    }

    pub async fn identify_at(id: &str, port: u16) -> Backend {
        let line = format!("{id}\n");
        Backend::with_port(id, port, move |mut s| {
            let line = line.clone();
            async move {
                if s.write_all(line.as_bytes()).await.is_ok() {
                    let _ = echo_conn(s).await;
                }
            }
        })
        .await
    }

    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    pub fn kill(&self) {
        self.accept_task.abort();
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    /// Kills and waits until connects are refused: task abort is
    /// asynchronous, and a listener alive for a few more ms would accept
    /// handshakes and then reset them.
    pub async fn kill_and_wait(&self) {
        self.kill();
        for _ in 0..500 {
            if TcpStream::connect(self.addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("backend {} still accepting after kill", self.id);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn backend_runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("backend")
            .enable_all()
            .build()
            .expect("backend runtime")
    })
}

struct DecOnDrop(Arc<AtomicUsize>);
impl Drop for DecOnDrop {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Echoes with reading and writing apart: a reader keeps reading
/// everything the peer sends while the writer waits on a slow peer, held
/// here without a bound (at most what one test sends).
///
/// A server that stops reading while its write waits can wedge for good
/// on this kernel: with its receive queue full, one more segment in the
/// window it advertised fails for memory, TCP retracts the window to zero
/// ("tcp: correct handling of extreme memory squeeze"), and from then on
/// every segment of the proxy's socket, pure ACKs included, carries a
/// sequence number past that window and is dropped (`TCP_INVALID_SEQUENCE`)
/// before its ACK is read. The echo never learns its bytes arrived, its
/// write never ends, and it never reads again. The same happened with a
/// 64 MiB bound on what the reader may hold, once the writer had waited
/// for that much. NOTES.md §2, "Socket buffers on the fastpath", has the
/// evidence; the proxy tests need a target that cannot wedge itself.
pub async fn echo_conn(s: TcpStream) -> std::io::Result<()> {
    const CHUNK: usize = 256 * 1024;
    let (mut r, mut w) = s.into_split();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    // Both halves in this task, not a spawned reader: a killed backend
    // (its connection tasks aborted) must close its sockets at once.
    let reading = async move {
        let tx = tx; // dropped at EOF, which ends the writer's loop
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            // A copy of what was read, not the whole read buffer: held
            // chunks cost what they carry.
            if tx.send(buf[..n].to_vec()).is_err() {
                return Ok(());
            }
        }
    };
    let writing = async {
        while let Some(buf) = rx.recv().await {
            w.write_all(&buf).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::try_join!(reading, writing)?;
    w.shutdown().await
}

/// A port nobody listens on (bound then released).
pub fn dead_target() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

// ------------------------------------------------------------------- proxy

pub struct AppSpec {
    pub name: String,
    pub ports: usize,
    pub targets: Vec<String>,
    pub balance: Option<&'static str>,
    pub proxy_protocol: Option<&'static str>,
    /// More fields of the app's config object, as is (`HealthCheck`...).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl AppSpec {
    pub fn new(name: &str, ports: usize, targets: Vec<String>) -> AppSpec {
        AppSpec {
            name: name.into(),
            ports,
            targets,
            balance: None,
            proxy_protocol: None,
            extra: serde_json::Map::new(),
        }
    }
}

/// A proxy under test: the real binary as a child process, or the same
/// server started in this process (`proxy_user::server::start`) on a
/// runtime of its own whose log goes to its own file. In-process is the
/// default for the userspace planes; the binary is used where a test needs
/// a process of its own (signals, rlimits, RSS, fds) or BPF.
pub struct Proxy {
    run: Run,
    /// ports[app][i]
    pub ports: Vec<Vec<u16>>,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
    /// The data plane every connection must have been carried by
    /// (checked when the proxy is dropped); None: not checked.
    mode: Option<String>,
}

enum Run {
    Child(Child),
    InProcess {
        rt: Option<tokio::runtime::Runtime>,
        handle: Arc<proxy_user::server::Handle>,
    },
}

fn scratch_path(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "proxy-test-{}-{}-{}-{what}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        fastrand::u32(..)
    ))
}

/// Free ports: bound together (so they are distinct), released just before use.
/// `n` distinct ports free now, for a proxy to listen on later. Picked
/// below the ephemeral range (32768-60999 here): a port the kernel handed
/// out for port 0 can be taken, between this check and the proxy's bind, by
/// an outgoing connection of a test running in parallel, and an upgrade test
/// once failed its first start that way. Below the range only another
/// explicit bind can take it.
pub fn free_ports(n: usize) -> Vec<u16> {
    let mut held: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    while held.len() < n {
        let port = fastrand::u16(20_000..32_000);
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

pub fn write_temp(what: &str, text: &str) -> PathBuf {
    let p = scratch_path(what);
    std::fs::write(&p, text).unwrap();
    p
}

pub fn config_json(apps: &[AppSpec], ports: &[Vec<u16>]) -> String {
    let apps: Vec<serde_json::Value> = apps
        .iter()
        .zip(ports)
        .map(|(a, p)| {
            let mut v = serde_json::json!({"Name": a.name, "Ports": p, "Targets": a.targets});
            if let Some(b) = a.balance {
                v["Balance"] = b.into();
            }
            if let Some(p) = a.proxy_protocol {
                v["ProxyProtocol"] = p.into();
            }
            for (k, x) in &a.extra {
                v[k] = x.clone();
            }
            v
        })
        .collect();
    serde_json::json!({ "Apps": apps }).to_string()
}

/// The flags every test proxy gets, before the test's own.
fn base_args(config: &std::path::Path, mode: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--config".to_string(), config.display().to_string()];
    if !extra.contains(&"--listen-address") {
        args.extend(["--listen-address".into(), "127.0.0.1".into()]);
    }
    for a in ["--mode", mode, "--log-format", "json"] {
        args.push(a.into());
    }
    args.extend(["--log-level".into(), LOG_LEVEL.into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

const LOG_LEVEL: &str = "info,proxy_user=debug";

/// Where a test proxy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Where {
    Child,
    InProcess,
}

impl Proxy {
    /// Starts a proxy for `apps` on free ports: in this process for the
    /// userspace planes, as a child for the fastpath (BPF programs belong to
    /// a process of their own).
    pub async fn start(mode: &str, apps: &[AppSpec], extra: &[&str]) -> Proxy {
        let at = if mode == "fastpath" || mode == "auto" {
            Where::Child
        } else {
            Where::InProcess
        };
        Proxy::launch(at, mode, apps, extra, None).await
    }

    /// The binary as a child process: for tests of signals, rlimits, RSS or
    /// fd counts.
    pub async fn spawn(mode: &str, apps: &[AppSpec], extra: &[&str]) -> Proxy {
        Proxy::launch(Where::Child, mode, apps, extra, None).await
    }

    /// `spawn` with RLIMIT_NOFILE set to `nofile` for the child.
    pub async fn spawn_with_nofile(
        mode: &str,
        apps: &[AppSpec],
        extra: &[&str],
        nofile: u64,
    ) -> Proxy {
        Proxy::launch(Where::Child, mode, apps, extra, Some(nofile)).await
    }

    /// Wraps a child started by a test's own command line.
    pub fn from_child(child: Child, log_path: PathBuf, config_path: PathBuf, mode: &str) -> Proxy {
        Proxy {
            run: Run::Child(child),
            ports: Vec::new(),
            log_path,
            config_path,
            mode: Some(mode.to_string()),
        }
    }

    async fn launch(
        at: Where,
        mode: &str,
        apps: &[AppSpec],
        extra: &[&str],
        nofile: Option<u64>,
    ) -> Proxy {
        let mut last_log = String::new();
        // Retry: a freed port can be taken by someone else before we bind.
        for _ in 0..5 {
            let all = free_ports(apps.iter().map(|a| a.ports).sum());
            let mut it = all.into_iter();
            let ports: Vec<Vec<u16>> = apps
                .iter()
                .map(|a| it.by_ref().take(a.ports).collect())
                .collect();
            let config_path = write_temp("config.json", &config_json(apps, &ports));
            let log_path = scratch_path("proxy.log");
            let args = base_args(&config_path, mode, extra);
            let started = match at {
                Where::Child => spawn_child(&args, &log_path, nofile).await,
                Where::InProcess => start_in_process(&args, &log_path).await,
            };
            match started {
                Ok(run) => {
                    return Proxy {
                        run,
                        ports,
                        log_path,
                        config_path,
                        mode: Some(mode.to_string()),
                    }
                }
                Err(log) => last_log = log,
            }
            if !last_log.contains("Address already in use") {
                break;
            }
        }
        panic!("proxy failed to start; log:\n{last_log}");
    }

    /// Waits up to 20 s for "proxy ready"; `Err(log)` if the proxy exited first.
    pub async fn wait_ready(&mut self) -> Result<(), String> {
        let Run::Child(child) = &mut self.run else {
            return Ok(()); // `start` returned: it is ready
        };
        wait_child_ready(child, &self.log_path).await
    }

    pub fn addr(&self, app: usize, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports[app][i]))
    }

    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Every JSON log line.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The per-connection "connection closed" lines.
    pub fn conn_lines(&self) -> Vec<serde_json::Value> {
        self.log_lines()
            .into_iter()
            .filter(|v| v["message"] == "connection closed")
            .collect()
    }

    /// Waits until at least `n` connection lines were logged.
    pub async fn wait_conn_lines(&self, n: usize, secs: u64) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let lines = self.conn_lines();
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs as a process of its own (fastpath, auto, `Proxy::spawn`).
    pub fn is_child(&self) -> bool {
        matches!(self.run, Run::Child(_))
    }

    pub fn pid(&self) -> i32 {
        match &self.run {
            Run::Child(child) => child.id() as i32,
            Run::InProcess { .. } => {
                panic!("an in-process proxy has no process of its own: use Proxy::spawn")
            }
        }
    }

    /// SIGHUP reloads either kind; other signals need a child.
    pub fn signal(&self, sig: i32) {
        match &self.run {
            Run::Child(child) => {
                // SAFETY: plain kill(2) on our own child.
                unsafe {
                    libc::kill(child.id() as i32, sig);
                }
            }
            Run::InProcess { rt, handle } if sig == libc::SIGHUP => {
                let handle = handle.clone();
                if let Some(rt) = rt {
                    rt.spawn(async move { handle.reload().await });
                }
            }
            Run::InProcess { .. } => {
                panic!("signal {sig} to an in-process proxy: use Proxy::spawn")
            }
        }
    }

    pub async fn wait_exit(&mut self, secs: u64) -> Option<ExitStatus> {
        let Run::Child(child) = &mut self.run else {
            panic!("an in-process proxy does not exit: use Proxy::spawn");
        };
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.run {
            Run::Child(child) => matches!(child.try_wait(), Ok(None)),
            Run::InProcess { .. } => true,
        }
    }

    /// Checks the planes at drop as if the proxy ran `--mode mode`: lets a
    /// test prove that the check fails on a proxy that used another plane.
    pub fn claim_mode(&mut self, mode: &str) {
        self.mode = Some(mode.to_string());
    }

    /// Every connection that reached a data plane was carried by the plane
    /// under test, so a test of one plane cannot pass on another. The
    /// fastpath hands a pair to the copy pump when a side ended (FIN or
    /// reset) before the install, which a short exchange usually does; any
    /// other install failure fails the check.
    fn check_planes(&self) {
        let Some(mode) = &self.mode else { return };
        let allowed: &[&str] = match mode.as_str() {
            "fastpath" => &["fastpath", "copy-fallback"],
            // Adaptive: splice until promoted; a promoted pair may fall back.
            "auto" => &["splice", "fastpath", "copy-fallback"],
            other => &[other][..],
        };
        let planes: Vec<String> = self
            .conn_lines()
            .iter()
            .filter_map(|l| l["plane"].as_str().map(str::to_string))
            .filter(|p| p != "none")
            .collect();
        for p in &planes {
            assert!(
                allowed.contains(&p.as_str()),
                "--mode {mode} carried a connection on plane {p:?}; log at {}",
                self.log_path.display()
            );
        }
        if mode == "fastpath" || mode == "auto" {
            let failed: Vec<String> = self
                .log_lines()
                .iter()
                .filter(|l| {
                    l["message"]
                        == "fastpath not installed; this connection stays on the copy plane"
                })
                .filter_map(|l| l["error"].as_str().map(str::to_string))
                .filter(|e| !e.contains("before the install"))
                .collect();
            assert!(failed.is_empty(), "fastpath installs failed: {failed:?}");
            // Userspace lost track of bytes the verdict passed: they still
            // arrive, but the FIN waits 10 s for ones it thinks are owed.
            let untracked = self
                .log_lines()
                .iter()
                .filter(|l| {
                    l["message"] == "read payload from a socket the verdict owns; forwarding it"
                        || l["message"].as_str().is_some_and(|m| {
                            m.starts_with("passed bytes never reached the receive queue")
                        })
                })
                .count();
            assert_eq!(
                untracked,
                0,
                "passed bytes read while the direction looked linked; log at {}",
                self.log_path.display()
            );
        }
    }
}

async fn spawn_child(
    args: &[String],
    log_path: &PathBuf,
    nofile: Option<u64>,
) -> Result<Run, String> {
    let log = std::fs::File::create(log_path).unwrap();
    let mut cmd = Command::new(PROXY);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(n) = nofile {
        set_rlimit(&mut cmd, libc::RLIMIT_NOFILE, n);
    }
    let mut child = cmd.spawn().expect("spawn proxy");
    match wait_child_ready(&mut child, log_path).await {
        Ok(()) => Ok(Run::Child(child)),
        Err(log) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(log)
        }
    }
}

/// Sets the child's `resource` limit (soft and hard) to `n` before it runs.
pub fn set_rlimit(cmd: &mut Command, resource: libc::__rlimit_resource_t, n: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(resource, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Waits up to 20 s for "proxy ready"; `Err(log)` if the child exited first.
async fn wait_child_ready(child: &mut Child, log_path: &std::path::Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = read_log(log_path);
        if log.contains("proxy ready") {
            return Ok(());
        }
        if let Ok(Some(_)) = child.try_wait() {
            return Err(log);
        }
        assert!(
            Instant::now() < deadline,
            "proxy not ready in 20s; log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The server on a runtime of its own (two workers, like the binary on our
/// machines), every thread of which logs JSON to `log_path`: a test reads
/// its proxy's log as it would a child's stderr.
async fn start_in_process(args: &[String], log_path: &PathBuf) -> Result<Run, String> {
    use clap::Parser;
    let cli = proxy_user::cli::Cli::try_parse_from(
        std::iter::once("proxy".to_string()).chain(args.iter().cloned()),
    )
    .map_err(|e| e.to_string())?;
    let log = std::fs::File::create(log_path).unwrap();
    let dispatch = proxy_user::logging::dispatch(cli.log_format, &cli.log_level, log)
        .map_err(|e| format!("{e:#}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("proxy")
        .enable_all()
        .on_thread_start(move || {
            // For the life of the thread, which ends with the runtime.
            std::mem::forget(tracing::dispatcher::set_default(&dispatch));
        })
        .build()
        .map_err(|e| e.to_string())?;
    let started = rt.spawn(proxy_user::server::start(cli.settings()));
    match started.await {
        Ok(Ok(handle)) => Ok(Run::InProcess {
            rt: Some(rt),
            handle: Arc::new(handle),
        }),
        Ok(Err(e)) => {
            rt.shutdown_background();
            Err(format!("{}\n{e:#}", read_log(log_path)))
        }
        Err(e) => {
            rt.shutdown_background();
            Err(format!("server start panicked: {e}"))
        }
    }
}

fn read_log(path: &std::path::Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if !std::thread::panicking() {
                self.check_planes();
            }
        }));
        match &mut self.run {
            Run::Child(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Run::InProcess { rt, .. } => {
                // Like SIGKILL: every task and socket of the server goes now.
                if let Some(rt) = rt.take() {
                    rt.shutdown_background();
                }
            }
        }
        let _ = std::fs::remove_file(&self.config_path);
        // PROXY_TEST_KEEP_LOGS=1 keeps every log, to read what passing runs did.
        let keep = std::env::var_os("PROXY_TEST_KEEP_LOGS").is_some();
        if !std::thread::panicking() && checked.is_ok() && !keep {
            let _ = std::fs::remove_file(&self.log_path);
        } else {
            eprintln!("proxy log kept at {}", self.log_path.display());
            print_tail(&self.log_path, 60);
        }
        if let Err(e) = checked {
            std::panic::resume_unwind(e);
        }
    }
}

/// The last `n` lines of a kept log, on stderr: CI shows a failed test's
/// output, not the files it leaves behind.
fn print_tail(path: &Path, n: usize) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    eprintln!(
        "--- last {} lines of {} ---",
        n.min(lines.len()),
        path.display()
    );
    for line in &lines[lines.len().saturating_sub(n)..] {
        eprintln!("{line}");
    }
    eprintln!("--- end of log ---");
}

// ---------------------------------------------------------------- payloads

/// 4 MiB of random bytes, made once per test binary.
fn random_block() -> &'static [u8] {
    static BLOCK: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BLOCK.get_or_init(|| {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        (0..(4usize << 20) / 8)
            .flat_map(|_| rng.u64(..).to_le_bytes())
            .collect()
    })
}

/// Deterministic pseudo-random data generated as it is sent: each chunk is
/// a slice of a random block at a random offset (memcpy speed even in
/// debug builds; never periodic, so reordering or duplication changes the SHA).
pub struct Payload {
    rng: fastrand::Rng,
    left: u64,
}

impl Payload {
    pub fn new(seed: u64, len: u64) -> Payload {
        Payload {
            rng: fastrand::Rng::with_seed(seed),
            left: len,
        }
    }

    /// Fills up to `buf.len()` bytes; returns how many (0 at the end).
    pub fn fill(&mut self, buf: &mut [u8]) -> usize {
        let block = random_block();
        let n = (buf.len() as u64)
            .min(self.left)
            .min(block.len() as u64 / 2) as usize;
        let off = self.rng.usize(..block.len() - n);
        buf[..n].copy_from_slice(&block[off..off + n]);
        self.left -= n as u64;
        n
    }
}

pub type Sha = [u8; 32];

/// Above this, hash with `openssl dgst` in a child process: the sha2 crate
/// in a debug test build runs at ~27 MiB/s, openssl at >1 GiB/s.
const EXTERNAL_HASH_MIN: u64 = 8 << 20;

/// SHA-256 over a stream, in-process for small payloads, via openssl for
/// big ones (falls back to in-process if openssl is missing).
pub enum StreamHasher {
    Lib(Sha256),
    Openssl(tokio::process::Child, tokio::process::ChildStdin),
}

impl StreamHasher {
    pub fn new(expected_len: u64) -> StreamHasher {
        if expected_len >= EXTERNAL_HASH_MIN {
            let child = tokio::process::Command::new("openssl")
                .args(["dgst", "-sha256", "-r"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn();
            if let Ok(mut child) = child {
                if let Some(stdin) = child.stdin.take() {
                    return StreamHasher::Openssl(child, stdin);
                }
            }
        }
        StreamHasher::Lib(Sha256::new())
    }

    pub async fn update(&mut self, data: &[u8]) {
        match self {
            StreamHasher::Lib(h) => h.update(data),
            StreamHasher::Openssl(_, stdin) => {
                stdin.write_all(data).await.expect("write to openssl")
            }
        }
    }

    pub async fn finish(self) -> Sha {
        match self {
            StreamHasher::Lib(h) => h.finalize().into(),
            StreamHasher::Openssl(child, stdin) => {
                drop(stdin);
                let out = child.wait_with_output().await.expect("openssl dgst");
                let text = String::from_utf8_lossy(&out.stdout);
                let hex = text.split_whitespace().next().expect("openssl output");
                let mut sha = [0u8; 32];
                for (i, b) in sha.iter_mut().enumerate() {
                    *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex digest");
                }
                sha
            }
        }
    }
}

pub fn sha_hex(s: &Sha) -> String {
    s.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends `len` generated bytes, then shuts down the write side. Returns the
/// SHA-256 of what was sent.
pub async fn send_payload<W: AsyncWrite + Unpin>(
    w: &mut W,
    seed: u64,
    len: u64,
    chunk: usize,
) -> std::io::Result<Sha> {
    let mut p = Payload::new(seed, len);
    let mut h = StreamHasher::new(len);
    let mut buf = vec![0u8; chunk];
    loop {
        let n = p.fill(&mut buf);
        if n == 0 {
            break;
        }
        h.update(&buf[..n]).await;
        w.write_all(&buf[..n]).await?;
    }
    w.shutdown().await?;
    Ok(h.finish().await)
}

/// Reads to EOF; returns (bytes, SHA-256). `expect` picks the hasher.
pub async fn recv_hash<R: AsyncRead + Unpin>(
    r: &mut R,
    expect: u64,
) -> std::io::Result<(u64, Sha)> {
    let mut h = StreamHasher::new(expect);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]).await;
    }
    Ok((total, h.finish().await))
}

/// Sends `len` bytes through `addr` to an echo backend and checks the SHA
/// of what came back against what was sent, both directions concurrently.
pub async fn echo_check(addr: SocketAddr, seed: u64, len: u64) -> Result<(), String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    echo_check_stream(s, seed, len).await
}

pub async fn echo_check_stream(s: TcpStream, seed: u64, len: u64) -> Result<(), String> {
    let (mut r, mut w) = s.into_split();
    let sender = tokio::spawn(async move { send_payload(&mut w, seed, len, 64 * 1024).await });
    let (got, got_sha) = recv_hash(&mut r, len)
        .await
        .map_err(|e| format!("recv: {e}"))?;
    let sent_sha = sender
        .await
        .map_err(|e| format!("sender task: {e}"))?
        .map_err(|e| format!("send: {e}"))?;
    if got != len || got_sha != sent_sha {
        return Err(format!(
            "echo mismatch: sent {len} bytes sha {}, got {got} bytes sha {}",
            sha_hex(&sent_sha),
            sha_hex(&got_sha)
        ));
    }
    Ok(())
}

/// Streams paced 8 KiB chunks until `stop` (at least 8), echoed back by
/// the backend; SHA-256 both ways must match. Returns the bytes sent.
pub async fn paced_echo(s: TcpStream, seed: u64, stop: Arc<AtomicBool>) -> Result<u64, String> {
    let (mut r, mut w) = s.into_split();
    let sender = tokio::spawn(async move {
        let mut p = Payload::new(seed, u64::MAX);
        let mut h = StreamHasher::new(0);
        let mut buf = vec![0u8; 8 * 1024];
        let mut sent = 0u64;
        let mut chunks = 0;
        while chunks < 8 || !stop.load(Ordering::Relaxed) {
            let n = p.fill(&mut buf);
            h.update(&buf[..n]).await;
            w.write_all(&buf[..n]).await?;
            sent += n as u64;
            chunks += 1;
            tokio::time::sleep(Duration::from_millis(20 + seed % 20)).await;
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>((sent, h.finish().await))
    });
    let mut h = StreamHasher::new(0);
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        let n = r.read(&mut buf).await.map_err(|e| format!("recv: {e}"))?;
        if n == 0 {
            break;
        }
        got += n as u64;
        h.update(&buf[..n]).await;
    }
    let (sent, sent_sha) = sender
        .await
        .map_err(|e| format!("sender: {e}"))?
        .map_err(|e| format!("send: {e}"))?;
    let got_sha = h.finish().await;
    if got != sent || got_sha != sent_sha {
        return Err(format!(
            "sent {sent} bytes sha {}, got {got} bytes sha {}",
            sha_hex(&sent_sha),
            sha_hex(&got_sha)
        ));
    }
    Ok(sent)
}

/// Seconds since midnight UTC of a JSON log line's timestamp, minus
/// `minus_ms` (to get a connection's start from its close line).
pub fn ts_secs(line: &serde_json::Value, minus_ms: u64) -> f64 {
    let ts = line["timestamp"].as_str().expect("timestamp");
    let time = ts
        .split('T')
        .nth(1)
        .expect("RFC 3339")
        .trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next().unwrap().parse().unwrap();
    let m: f64 = parts.next().unwrap().parse().unwrap();
    let s: f64 = parts.next().unwrap().parse().unwrap();
    h * 3600.0 + m * 60.0 + s - minus_ms as f64 / 1000.0
}

/// Connects through the proxy to an identify backend and reads its id line.
pub async fn read_id(s: &mut TcpStream) -> std::io::Result<String> {
    let mut id = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = s.read(&mut b).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before id",
            ));
        }
        if b[0] == b'\n' {
            break;
        }
        id.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&id).into_owned())
}

// ------------------------------------------------------------------- admin

/// The admin listener's address: the server's handle says it in-process,
/// a child's startup log line otherwise.
pub fn admin_addr(proxy: &Proxy) -> String {
    if let Run::InProcess { handle, .. } = &proxy.run {
        return handle
            .admin_addr()
            .expect("an admin address (start with --admin-address 127.0.0.1:0)")
            .to_string();
    }
    proxy
        .log_lines()
        .into_iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("admin listening"))
        })
        .and_then(|l| l["address"].as_str().map(str::to_string))
        .expect("admin address in log (start with --admin-address 127.0.0.1:0)")
}

/// Sends `request` as is; returns the whole response (status line, headers, body).
pub async fn http_raw(addr: &str, request: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(request).await?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await?;
    Ok(String::from_utf8_lossy(&resp).into_owned())
}

/// `GET path`; returns (status code, body).
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, "").await
}

/// `method path` with `headers` (each line ending in CRLF); returns
/// (status code, body).
pub async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &str,
) -> std::io::Result<(u16, String)> {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: proxy\r\n{headers}\r\n");
    let resp = http_raw(addr, req.as_bytes()).await?;
    let code = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// The value of one series (`name{labels}` exactly as rendered) in Prometheus text.
/// A client's moment of silence (after connecting, or after its first
/// bytes) in which `--mode fastpath` installs the pair. A client that sends
/// from its first moment is carried to its FIN by the pre-install copy and
/// ends on `copy-fallback`, which `check_planes` accepts: a test about the
/// kernel calls this, then asserts the plane.
pub async fn let_the_fastpath_install() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// The plane that carries, through `mode`, a connection that paused for
/// `let_the_fastpath_install` and is bulk or lives a second or two: auto
/// keeps it on splice (busy, or gone before two watch periods), every other
/// mode carries it itself.
pub fn unpromoted_plane(mode: &str) -> &str {
    if mode == "auto" {
        "splice"
    } else {
        mode
    }
}

pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// Kernel memory queued on the proxy's own TCP sockets: received but not
/// read (`r`) plus written but not yet acknowledged (`w`), from `ss -tmnp`.
/// The clients' and targets' sockets share the machine but not the bound.
pub fn proxy_socket_mem(pid: i32) -> u64 {
    let out = std::process::Command::new("ss")
        .args(["-tmnpH"])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let owner = format!("pid={pid},");
    let mut total = 0;
    let mut ours = false;
    for line in text.lines() {
        if let Some(mem) = line.trim().strip_prefix("skmem:(") {
            if ours {
                for field in mem.trim_end_matches(')').split(',') {
                    let digits = field.trim_start_matches(|c: char| c.is_ascii_alphabetic());
                    let name = &field[..field.len() - digits.len()];
                    if name == "r" || name == "w" {
                        total += digits.parse::<u64>().unwrap_or(0);
                    }
                }
            }
        } else {
            ours = line.contains(&owner);
        }
    }
    total
}

/// The next read of `s` must be a reset: a connection the proxy cut, told
/// apart from a FIN that would pass for the end of the stream.
pub async fn expect_reset(s: &mut TcpStream) {
    let read = s.read(&mut [0u8; 1]).await;
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the client should see a reset, got {read:?}"
    );
}

/// A client of app `app` at `addr`, whose target `target` leads back into
/// the proxy: the client gets a reset, the proxy makes no internal
/// connection (one close line, `connect_failed`), counts the attempt with
/// reason `loop`, and says why in its log. Returns the `/metrics` text.
pub async fn assert_refused_as_a_loop(
    proxy: &Proxy,
    addr: SocketAddr,
    app: &str,
    target: &str,
) -> String {
    let text = bounded(20, "connect through a loop", async {
        // The reset can come before connect() returns.
        let r = match TcpStream::connect(addr).await {
            Ok(mut s) => s.read(&mut [0u8; 1]).await,
            Err(e) => Err(e),
        };
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "client got {r:?}, not a reset"
        );
        proxy.wait_conn_lines(1, 5).await;
        // Time for internal connections to show, were there any.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let lines = proxy.conn_lines();
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert_eq!(lines[0]["end"], "connect_failed");
        let (_, text) = http_get(&admin_addr(proxy), "/metrics").await.unwrap();
        let looped = format!(
            r#"proxy_target_connect_failures_total{{app="{app}",target="{target}",reason="loop"}}"#
        );
        assert!(metric(&text, &looped) >= 1.0, "{text}");
        text
    })
    .await;
    let log = proxy.log();
    assert!(
        log.contains("connect attempt refused: the target is this proxy"),
        "{log}"
    );
    text
}

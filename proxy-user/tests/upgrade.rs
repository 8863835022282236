//! Upgrades through the real binary: `--handoff-socket` on the running
//! proxy, `--takeover` (or SIGUSR2) for the new one. Long-lived
//! sequence-checked streams and a new-connection load run throughout; no
//! connection may be refused or reset, no byte lost or reordered.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::streams::{long_stream, one_exchange, Load};
use common::*;

/// One proxy generation: its process, log and the flags it was started with.
struct Gen {
    proxy: Proxy,
}

struct Setup {
    mode: &'static str,
    config: PathBuf,
    handoff: PathBuf,
    addr: SocketAddr,
    extra: Vec<String>,
    _backend: Backend,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(&self.handoff);
    }
}

fn scratch(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "proxy-upgrade-{}-{}-{what}",
        std::process::id(),
        fastrand::u32(..)
    ))
}

impl Setup {
    async fn new(mode: &'static str) -> Setup {
        Setup::with(mode, &[]).await
    }

    /// `extra`: flags every generation gets.
    async fn with(mode: &'static str, extra: &[&str]) -> Setup {
        let backend = Backend::echo("echo").await;
        let port = free_ports(1)[0];
        let apps = [AppSpec::new("app", 1, vec![backend.target()])];
        let config = write_temp("config.json", &config_json(&apps, &[vec![port]]));
        Setup {
            mode,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            config,
            handoff: scratch("handoff.sock"),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _backend: backend,
        }
    }

    fn args(&self, config: &Path, takeover: bool) -> Vec<String> {
        let mut a: Vec<String> = [
            "--config",
            &config.display().to_string(),
            "--listen-address",
            "127.0.0.1",
            "--mode",
            self.mode,
            "--log-format",
            "json",
            "--log-level",
            "info",
            "--drain-timeout",
            "20s",
            "--handoff-socket",
            &self.handoff.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(self.extra.iter().cloned());
        if takeover {
            a.extend(["--takeover".into(), self.handoff.display().to_string()]);
        }
        a
    }

    /// Starts `bin`; returns once it logged "proxy ready" (Err(log) if it
    /// exited first).
    async fn launch(&self, bin: &Path, config: &Path, takeover: bool) -> Result<Gen, String> {
        let mut proxy = self.spawn(bin, config, takeover, &[]);
        proxy.wait_ready().await?;
        Ok(Gen { proxy })
    }

    /// Starts `bin` and returns at once.
    fn spawn(&self, bin: &Path, config: &Path, takeover: bool, extra: &[&str]) -> Proxy {
        self.spawn_env(bin, config, takeover, extra, &[])
    }

    fn spawn_env(
        &self,
        bin: &Path,
        config: &Path,
        takeover: bool,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Proxy {
        let log_path = scratch("proxy.log");
        let child = Command::new(bin)
            .args(self.args(config, takeover))
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("spawn proxy");
        // Not the config: generations share it (`Setup` removes it).
        Proxy::from_child(child, log_path, scratch("unused"), self.mode)
    }
}

/// A second binary to alternate with: a copy of the same build under
/// another path (a different build is not available to a test).
fn second_binary() -> PathBuf {
    let p = scratch("proxy-b");
    std::fs::copy(PROXY, &p).expect("copy the proxy binary");
    p
}

// ------------------------------------------------------------- the tests

/// Slow streams (1 KiB every 20 ms) and bulk ones (64 KiB every ms: they
/// are mostly mid-write when asked to park).
const STREAMS: u64 = 100;
const BULK: u64 = 4;
const LOAD_WORKERS: usize = 16;

fn slow(
    addr: SocketAddr,
    i: u64,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<u64, String>> {
    tokio::spawn(long_stream(
        addr,
        i,
        128,
        Duration::from_millis(20),
        stop.clone(),
    ))
}

/// `upgrades` handoffs in a row, alternating two binaries, under the
/// streams and the load. Returns the streams' total bytes.
async fn upgrades_in_a_row(mode: &'static str, upgrades: usize, extra: &[&str]) {
    let s = Setup::with(mode, extra).await;
    let first = s
        .launch(Path::new(PROXY), &s.config, false)
        .await
        .unwrap_or_else(|log| panic!("first proxy failed:\n{log}"));
    let bins = [second_binary(), PathBuf::from(PROXY)];
    let stop_streams = Arc::new(AtomicBool::new(false));
    let stop_load = Arc::new(AtomicBool::new(false));
    let mut streams: Vec<_> = (0..STREAMS)
        .map(|i| slow(s.addr, i + 1, &stop_streams))
        .collect();
    streams.extend((0..BULK).map(|i| {
        let (addr, stop) = (s.addr, stop_streams.clone());
        tokio::spawn(long_stream(
            addr,
            1000 + i,
            8192,
            Duration::from_millis(1),
            stop,
        ))
    }));
    let load = Load::start(s.addr, LOAD_WORKERS, stop_load.clone());
    let started = Instant::now();
    let mut cur = first;
    let mut exits = Vec::new();
    let mut moved = 0u64;
    let mut kept = Vec::new();
    for i in 0..upgrades {
        // Let the streams and the load run on each generation.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let next = s
            .launch(&bins[i % 2], &s.config, true)
            .await
            .unwrap_or_else(|log| panic!("upgrade {i}: new proxy failed:\n{log}"));
        let t = Instant::now();
        let status = cur.proxy.wait_exit(10).await;
        let log = cur.proxy.log();
        assert!(
            status.is_some_and(|st| st.success()),
            "upgrade {i}: old proxy did not exit cleanly within 10 s ({status:?}); log:\n{log}"
        );
        exits.push(t.elapsed());
        moved += log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["message"] == "handoff: done; the connections that did not move drain here"
            })
            .filter_map(|v| v["moved"].as_u64())
            .sum::<u64>();
        // Kept (exited) until the end: its log is checked at drop.
        kept.push(std::mem::replace(&mut cur, next).proxy);
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop_load.store(true, Ordering::Relaxed);
    let (ok, failures) = bounded(20, "load", load.finish()).await;
    stop_streams.store(true, Ordering::Relaxed);
    let mut bytes = 0u64;
    for st in streams {
        let r = bounded(20, "stream", st).await.expect("stream task");
        bytes += r.unwrap_or_else(|e| panic!("{e}; final log {}", cur.proxy.log_path.display()));
    }
    let secs = started.elapsed().as_secs_f64();
    let slowest = exits.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{mode}: {upgrades} upgrades in {secs:.1} s; {STREAMS}+{BULK} streams, {bytes} bytes checked; \
         {ok} new connections ({:.0}/s), {} failed; {moved} established connections moved; \
         old process gone at most {slowest:?} after the new one was ready",
        ok as f64 / secs,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "new connections failed: {:?}",
        &failures[..failures.len().min(10)]
    );
    let all = STREAMS + BULK;
    assert!(
        moved >= all * upgrades as u64,
        "only {moved} connections moved in {upgrades} upgrades"
    );
    // Every stream's one close line, written by the last process, names
    // every process that carried it (the load's connections are moved at
    // most once: accepted by a process in its last moments).
    let carried_all = |l: &serde_json::Value| {
        l["carried_by"]
            .as_str()
            .is_some_and(|c| c.split(',').count() == upgrades)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let long = loop {
        let long: Vec<_> = cur
            .proxy
            .conn_lines()
            .into_iter()
            .filter(|l| carried_all(l))
            .collect();
        if long.len() >= all as usize || Instant::now() > deadline {
            break long;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        long.len(),
        all as usize,
        "streams closed by the last process after {upgrades} moves"
    );
    assert!(long.iter().all(|l| l["end"] == "closed"));
    cur.proxy.signal(libc::SIGTERM);
    assert!(cur.proxy.wait_exit(10).await.is_some());
    let _ = std::fs::remove_file(&bins[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_upgrades_copy() {
    bounded(60, "upgrades", upgrades_in_a_row("copy", 20, &[])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_upgrades_splice() {
    bounded(60, "upgrades", upgrades_in_a_row("splice", 20, &[])).await;
}

/// sk_lookup: the steered socket moves, and the new program steers to it
/// before the old one is detached.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrades_with_sk_lookup_steering() {
    let f = upgrades_in_a_row("splice", 5, &["--steering", "sk_lookup"]);
    bounded(60, "upgrades", f).await;
}

/// Fastpath pairs do not move: they drain in the old process, whose close
/// lines name it, while the new one takes every new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fastpath_connections_drain_in_the_old_process() {
    bounded(60, "fastpath drain", fastpath_drain()).await;
}

async fn fastpath_drain() {
    let s = Setup::new("fastpath").await;
    let mut a = s
        .launch(Path::new(PROXY), &s.config, false)
        .await
        .unwrap_or_else(|log| panic!("first proxy failed:\n{log}"));
    let stop_streams = Arc::new(AtomicBool::new(false));
    let stop_load = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..10)
        .map(|i| slow(s.addr, i + 1, &stop_streams))
        .collect();
    let load = Load::start(s.addr, 4, stop_load.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = s
        .launch(Path::new(PROXY), &s.config, true)
        .await
        .unwrap_or_else(|log| panic!("new proxy failed:\n{log}"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        a.proxy.is_running(),
        "the old process left before its connections"
    );
    stop_load.store(true, Ordering::Relaxed);
    let (ok, failures) = bounded(20, "load", load.finish()).await;
    stop_streams.store(true, Ordering::Relaxed);
    for st in streams {
        bounded(20, "stream", st)
            .await
            .expect("stream task")
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(failures.is_empty(), "new connections failed: {failures:?}");
    assert!(ok > 0);
    assert!(a.proxy.wait_exit(10).await.is_some_and(|st| st.success()));
    let old_pid = a.proxy.pid() as u64;
    let drained = a
        .proxy
        .conn_lines()
        .into_iter()
        .filter(|l| l["pid"].as_u64() == Some(old_pid) && l["duration_ms"].as_u64() > Some(500))
        .count();
    assert_eq!(drained, 10, "the streams' close lines in the old process");
    drop(b);
}

async fn wait_log(p: &Proxy, what: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !p.log().contains(what) {
        assert!(
            Instant::now() < deadline,
            "no {what:?} in {}s; log:\n{}",
            secs,
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A new process that fails mid-handoff leaves the old one serving
/// everything: one rejects its config after receiving the sockets; one
/// hangs with them in hand (its --access-log FIFO has no reader) and is
/// killed. Then a good one takes over, and every stream completes.
async fn failed_successors(mode: &'static str) {
    let s = Setup::new(mode).await;
    let mut a = s
        .launch(Path::new(PROXY), &s.config, false)
        .await
        .unwrap_or_else(|log| panic!("first proxy failed:\n{log}"));
    let stop_streams = Arc::new(AtomicBool::new(false));
    let stop_load = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..20)
        .map(|i| slow(s.addr, i + 1, &stop_streams))
        .collect();
    let load = Load::start(s.addr, 4, stop_load.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;

    // 1. Bad config: it exits with the config error; the old one serves on.
    let bad = write_temp(
        "bad.json",
        r#"{"Apps":[{"Name":"x","Ports":[0],"Targets":[]}]}"#,
    );
    let log = match s.launch(Path::new(PROXY), &bad, true).await {
        Ok(_) => panic!("a proxy with a bad config took over"),
        Err(log) => log,
    };
    let _ = std::fs::remove_file(&bad);
    assert!(log.contains("problem"), "bad config not reported:\n{log}");
    wait_log(&a.proxy, "did not get ready; still serving", 10).await;
    assert!(a.proxy.is_running());

    // 2. Killed mid-handoff, holding every listening socket.
    let fifo = scratch("access.fifo");
    let c = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    // SAFETY: mkfifo on a path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut hung = s.spawn(
        Path::new(PROXY),
        &s.config,
        true,
        &["--access-log", &fifo.display().to_string()],
    );
    wait_log(&a.proxy, "handoff: successor connected", 10).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        hung.is_running(),
        "the hung successor exited:\n{}",
        hung.log()
    );
    hung.signal(libc::SIGKILL);
    assert!(hung.wait_exit(5).await.is_some());
    let _ = std::fs::remove_file(&fifo);
    let failures_logged = |p: &Proxy| p.log().matches("did not get ready; still serving").count();
    let deadline = Instant::now() + Duration::from_secs(10);
    while failures_logged(&a.proxy) < 2 {
        assert!(
            Instant::now() < deadline,
            "old proxy did not notice the kill:\n{}",
            a.proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(a.proxy.is_running());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 3. A good one takes over after all.
    let b = s
        .launch(Path::new(PROXY), &s.config, true)
        .await
        .unwrap_or_else(|log| panic!("good successor failed:\n{log}"));
    assert!(a.proxy.wait_exit(10).await.is_some_and(|st| st.success()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_load.store(true, Ordering::Relaxed);
    let (ok, failures) = bounded(20, "load", load.finish()).await;
    stop_streams.store(true, Ordering::Relaxed);
    for st in streams {
        bounded(20, "stream", st)
            .await
            .expect("stream task")
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(failures.is_empty(), "new connections failed: {failures:?}");
    assert!(ok > 0);
    drop(hung);
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_successor_leaves_the_old_one_serving() {
    bounded(60, "failed successors", failed_successors("splice")).await;
}

/// SIGUSR2 restarts the same binary through the same path; SIGUSR1 is
/// logged and ignored, never fatal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usr2_restarts_and_usr1_is_ignored() {
    let s = Setup::new("copy").await;
    let mut a = s
        .launch(Path::new(PROXY), &s.config, false)
        .await
        .unwrap_or_else(|log| panic!("first proxy failed:\n{log}"));
    a.proxy.signal(libc::SIGUSR1);
    wait_log(&a.proxy, "ignored", 5).await;
    one_exchange(s.addr, 1).await.unwrap();
    assert!(a.proxy.is_running(), "SIGUSR1 killed the proxy");

    let stop = Arc::new(AtomicBool::new(false));
    let stream = slow(s.addr, 7, &stop);
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.proxy.signal(libc::SIGUSR2);
    // The successor inherits stderr: both write to this log.
    assert!(
        a.proxy.wait_exit(15).await.is_some_and(|st| st.success()),
        "old proxy did not hand over; log:\n{}",
        a.proxy.log()
    );
    let log = a.proxy.log();
    let successor: i32 = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "SIGUSR2: started the new process; serving until it is ready")
        .and_then(|v| v["successor"].as_i64())
        .expect("successor pid logged") as i32;
    assert_eq!(log.matches("proxy ready").count(), 2, "log:\n{log}");
    for i in 0..20 {
        one_exchange(s.addr, 100 + i).await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    bounded(10, "stream", stream).await.unwrap().unwrap();
    // SAFETY: plain kill(2) of the successor this test caused.
    unsafe { libc::kill(successor, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY: signal 0 only checks that the process exists.
    while unsafe { libc::kill(successor, 0) } == 0 {
        assert!(Instant::now() < deadline, "successor did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `--check` / `-t` validates without binding: it passes while another
/// socket holds the config's port, and lists every problem of a bad file.
#[test]
fn check_validates_without_binding() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let good = write_temp(
        "good.json",
        &format!(r#"{{"Apps":[{{"Name":"a","Ports":[{port}],"Targets":["127.0.0.1:1"]}}]}}"#),
    );
    let out = Command::new(PROXY)
        .args(["--listen-address", "127.0.0.1", "--check"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("config ok"));
    let out = Command::new(PROXY)
        .args(["--listen-address", "127.0.0.1", "-t", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = write_temp(
        "bad.json",
        r#"{"Apps":[{"Name":"","Ports":[0],"Targets":["nope"]}]}"#,
    );
    let out = Command::new(PROXY)
        .arg("-t")
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("3 problems"), "every problem listed: {err}");
    let _ = std::fs::remove_file(&good);
    let _ = std::fs::remove_file(&bad);
}

/// systemd's view: READY with MAINPID at start, RELOADING then READY
/// around a reload, MAINPID of the new process on an upgrade (from both),
/// STOPPING at shutdown; all to $NOTIFY_SOCKET.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tells_systemd_each_state() {
    let s = Setup::new("copy").await;
    let path = scratch("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let next = || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let env = [("NOTIFY_SOCKET", path.as_path())];
    let mut a = s.spawn_env(Path::new(PROXY), &s.config, false, &[], &env);
    a.wait_ready().await.unwrap();
    assert_eq!(next(), format!("READY=1\nMAINPID={}", a.pid()));
    a.signal(libc::SIGHUP);
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(next(), "READY=1");
    let mut b = s.spawn_env(Path::new(PROXY), &s.config, true, &[], &env);
    b.wait_ready().await.unwrap();
    let mainpid = format!("MAINPID={}", b.pid());
    // The old one's MAINPID, then the new one's READY (in that order: the
    // old one says it before it stops accepting).
    assert_eq!(next(), mainpid);
    assert_eq!(next(), format!("READY=1\n{mainpid}"));
    assert!(a.wait_exit(10).await.is_some());
    b.signal(libc::SIGTERM);
    assert_eq!(next(), "STOPPING=1");
    assert!(b.wait_exit(10).await.is_some());
    let _ = std::fs::remove_file(&path);
}

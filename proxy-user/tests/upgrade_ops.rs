//! Operating upgrades through the real binary: a successor that fails
//! mid-handoff, SIGUSR2/SIGUSR1, and what systemd is told (`--check` is
//! tested in `deploy.rs`).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::generations::{scratch, wait_log, Setup};
use common::streams::{long_stream, one_exchange, Traffic};
use common::*;

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

/// A new process that fails mid-handoff leaves the old one serving
/// everything: one rejects its config after receiving the sockets; one
/// hangs with them in hand (its --access-log FIFO has no reader) and is
/// killed; the shared admin listener says ready all along (the hung one
/// used to answer part of the probes: not ready). Then a good one takes
/// over, and every stream completes.
async fn failed_successors(mode: &'static str) {
    let s = Setup::with(mode, &["--admin-address", "127.0.0.1:0"]).await;
    let mut a = s.first().await;
    let admin = admin_addr(&a.proxy);
    let traffic = Traffic::start(s.addr, 20, 0, 4);
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
    for _ in 0..40 {
        let (code, body) = http_get(&admin, "/readyz").await.unwrap();
        assert_eq!(code, 200, "/readyz while a successor hangs: {body}");
    }
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
    let seen = traffic.finish(&b.proxy.log_path).await;
    assert!(
        seen.failures.is_empty(),
        "new connections failed: {:?}",
        seen.failures
    );
    assert!(seen.ok > 0);
    drop(hung);
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_successor_leaves_the_old_one_serving() {
    bounded(60, "failed successors", failed_successors("splice")).await;
}

/// The same with fastpath pairs: they stay the old process's through both
/// failures, then move to the good successor (the old one exits at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_successor_leaves_the_old_one_serving_fastpath() {
    bounded(60, "failed successors", failed_successors("fastpath")).await;
}

/// A successor that dies after adopting the fastpath maps, before taking a
/// pair: every pair stays the old process's (it reads the rings again and
/// resumes the pairs it had stopped, from their ledgers), and every stream
/// completes exactly there. The listening sockets were the successor's by
/// then, so new connections wait for the next proxy (NOTES: "taker after
/// Ready"); this test has no load.
async fn successor_dies_after_the_maps() {
    let s = Setup::new("fastpath").await;
    let mut a = s.first().await;
    // Bulk at about 4 MiB/s: a gap in the ring's reading as the maps move
    // stays far from the 3 MiB bound (2.25 MiB or more of it left after the
    // last check: over half a second), and no reading at all crosses it
    // within the 1.5 s below.
    let traffic = Traffic::paced(s.addr, 20, 2, 512, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let die = [("PROXY_TEST_DIE_AFTER_MAPS", Path::new("1"))];
    let mut b = s.spawn_env(Path::new(PROXY), &s.config, true, &[], &die);
    assert!(
        b.wait_exit(10).await.is_some(),
        "the successor did not die:\n{}",
        b.log()
    );
    assert!(b.log().contains("dying mid-handoff"), "{}", b.log());
    wait_log(&a.proxy, "they carry on here", 10).await;
    // The streams run on in the old process for a while.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(a.proxy.is_running());
    let seen = traffic.finish(&a.proxy.log_path).await;
    assert!(seen.bytes > 0);
    let pid = a.proxy.pid() as u64;
    let lines = a.proxy.wait_conn_lines(22, 10).await;
    let here = lines
        .iter()
        .filter(|l| l["pid"].as_u64() == Some(pid) && l["end"] == "closed")
        .filter(|l| l["plane"] == "fastpath")
        .count();
    assert_eq!(
        here, 22,
        "streams closed by the old process; lines: {lines:?}"
    );
    // Still in the kernel: a pair whose ring nobody reads any more hits
    // its in-flight bound (the bulk streams, within a second) and leaves,
    // which would close just as cleanly.
    let demoted: Vec<_> = lines
        .iter()
        .filter(|l| l["demoted"].as_u64().expect("a close line's demoted") > 0)
        .collect();
    assert!(
        demoted.is_empty(),
        "pairs left the kernel after the failed handoff: {demoted:?}"
    );
    assert!(a.proxy.wait_exit(10).await.is_some_and(|st| st.success()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn successor_dying_after_the_fastpath_maps_leaves_the_pairs_in_the_old_one() {
    bounded(
        60,
        "successor dies after the maps",
        successor_dies_after_the_maps(),
    )
    .await;
}

/// An upgrade that changes `--mode` from a userspace plane to the fastpath:
/// the streams the old process carried move into the new one's kernel, and
/// its FIN ledger counts the bytes moved before (the sockets' counters do).
/// Without them every moved stream that carried bytes looked short at its
/// FIN and was reset: this failed on the code before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn userspace_streams_move_into_a_fastpath_process() {
    bounded(60, "splice to fastpath", async {
        let s = Setup::new("splice").await;
        let mut a = s.first().await;
        let traffic = Traffic::start(s.addr, 8, 0, 0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let b = s
            .launch_as("fastpath", &s.config)
            .await
            .unwrap_or_else(|log| panic!("the fastpath successor failed:\n{log}"));
        assert!(a.proxy.wait_exit(20).await.is_some_and(|st| st.success()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let seen = traffic.finish(&b.proxy.log_path).await;
        assert!(seen.bytes > 0);
        let lines = b.proxy.wait_conn_lines(8, 10).await;
        let kernel = lines.iter().filter(|l| l["plane"] == "fastpath").count();
        assert!(
            lines.len() == 8 && lines.iter().all(|l| l["end"] == "closed") && kernel == 8,
            "moved streams must close cleanly, in the kernel: {lines:?}"
        );
    })
    .await;
}

/// A successor slow to answer a batch: its `Took` comes after the old
/// process gave up waiting (5 s). The old process keeps the batch (and says
/// so, `Withdrawn`, if the link is still open), and the successor resumes
/// none of it; every stream runs on in the old process, exact. (The old
/// exchange passed this too: the old process closes the link a moment
/// after giving up, and a `Took` sent after that fails. The verdict closes
/// that moment, which a test cannot aim at.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_answer_moves_nothing() {
    bounded(60, "a late took", async {
        let s = Setup::new("splice").await;
        let a = s.first().await;
        let traffic = Traffic::start(s.addr, 8, 0, 0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let late = [("PROXY_TEST_TOOK_DELAY_MS", Path::new("6000"))];
        let mut b = s.spawn_env(Path::new(PROXY), &s.config, true, &[], &late);
        b.wait_ready()
            .await
            .unwrap_or_else(|log| panic!("the successor failed:\n{log}"));
        wait_log(&b, "handoff: resumed connections from the old process", 20).await;
        assert!(b.log().contains(r#""moved":0"#), "{}", b.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let seen = traffic.finish(&a.proxy.log_path).await;
        assert!(seen.bytes > 0);
        let kept = a.proxy.wait_conn_lines(8, 20).await;
        assert_eq!(kept.len(), 8, "{kept:?}");
        assert!(
            kept.iter().all(|l| l["end"] == "closed"),
            "the old process closes every stream cleanly: {kept:?}"
        );
        assert!(
            b.conn_lines().is_empty(),
            "the successor resumed connections it was told to leave: {:?}",
            b.conn_lines()
        );
    })
    .await;
}

/// The pid of the process SIGUSR2 started, from the old one's log.
fn usr2_successor(log: &str) -> i32 {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "SIGUSR2: started the new process; serving until it is ready")
        .and_then(|v| v["successor"].as_i64())
        .expect("successor pid logged") as i32
}

/// Stops a successor a test caused (not our child: SIGUSR2 started it).
async fn stop_successor(pid: i32) {
    // SAFETY: plain kill(2) of the successor this test caused.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY: signal 0 only checks that the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(Instant::now() < deadline, "successor did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGUSR2 restarts the same binary through the same path; SIGUSR1 is
/// logged and ignored, never fatal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usr2_restarts_and_usr1_is_ignored() {
    let s = Setup::new("copy").await;
    let mut a = s.first().await;
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
    let successor = usr2_successor(&log);
    assert_eq!(log.matches("proxy ready").count(), 2, "log:\n{log}");
    for i in 0..20 {
        one_exchange(s.addr, 100 + i).await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    bounded(10, "stream", stream).await.unwrap().unwrap();
    stop_successor(successor).await;
}

/// A proxy started by a bare name (the shell found it in PATH) upgrades
/// to the binary installed there since. Before, it took /proc/self/exe,
/// which names the replaced file as "PATH (deleted)", and could not start
/// the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usr2_finds_a_replaced_binary_through_path() {
    let s = Setup::new("copy").await;
    let dir = scratch("bin");
    std::fs::create_dir(&dir).unwrap();
    let installed = dir.join("proxy");
    std::fs::copy(PROXY, &installed).unwrap();
    let mut path = std::ffi::OsString::from(&dir);
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    let path = std::path::PathBuf::from(path);
    let mut old = s.spawn_env(
        Path::new("proxy"),
        &s.config,
        false,
        &[],
        &[("PATH", &path)],
    );
    old.wait_ready().await.unwrap();
    one_exchange(s.addr, 1).await.unwrap();

    // An install: a new file (a new inode) under the same name.
    std::fs::remove_file(&installed).unwrap();
    std::fs::copy(PROXY, &installed).unwrap();
    old.signal(libc::SIGUSR2);
    let handed_over = old.wait_exit(15).await.is_some_and(|st| st.success());
    let log = old.log();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(handed_over, "old proxy did not hand over; log:\n{log}");
    let successor = usr2_successor(&log);
    for i in 0..5 {
        one_exchange(s.addr, 100 + i).await.unwrap();
    }
    stop_successor(successor).await;
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

/// `len` bytes of `tag`'s sequence from offset `at` through an echo
/// target and back, checked.
async fn exchange(s: &mut tokio::net::TcpStream, tag: u64, at: u64, len: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sent = vec![0u8; len];
    common::seq::fill_at(tag, at, &mut sent);
    let (mut rd, mut wr) = s.split();
    let mut back = vec![0u8; len];
    let (w, r) = tokio::join!(wr.write_all(&sent), rd.read_exact(&mut back));
    w.unwrap();
    r.unwrap();
    assert!(back == sent, "the echo at {at} came back changed");
}

/// A fastpath pair moved by an upgrade is counted in `proxy_bytes_total`
/// once. The old process counted its bytes while it carried it (live, each
/// flush interval); the new one counts only the bytes after the move, live
/// too (a moved connection showed nothing until its close before). It
/// counted the kernel's bytes since the install again before: the record
/// said how much userspace had moved, and the pair's ledger carried the
/// rest uncounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moved_pair_is_metered_once() {
    bounded(60, "metered once", async {
        let flags = [
            "--admin-address",
            "127.0.0.1:0",
            "--bytes-flush-interval",
            "50ms",
        ];
        let s = Setup::with("fastpath", &flags).await;
        let mut a = s.first().await;
        let admin = admin_addr(&a.proxy);
        let series = r#"proxy_bytes_total{app="app",direction="client_to_target"}"#;
        let bytes_in = || async {
            let (code, text) = http_get(&admin, "/metrics").await.unwrap();
            assert_eq!(code, 200, "{text}");
            metric(&text, series) as u64
        };
        let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        // The kernel carries the first bytes too: the case this is about.
        let_the_fastpath_install().await;
        exchange(&mut conn, 7, 0, 200_000).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while bytes_in().await < 200_000 {
            assert!(
                Instant::now() < deadline,
                "the old process never counted the bytes"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let b = s
            .launch(Path::new(PROXY), &s.config, true)
            .await
            .unwrap_or_else(|log| panic!("the successor failed:\n{log}"));
        assert!(a.proxy.wait_exit(20).await.is_some_and(|st| st.success()));
        // The admin listener moved too: from here on it is the new process's.
        assert_eq!(
            bytes_in().await,
            0,
            "the new process counted the moved bytes"
        );
        exchange(&mut conn, 7, 200_000, 50_000).await;
        // Counted while it lives here too, as before the move.
        let deadline = Instant::now() + Duration::from_secs(5);
        while bytes_in().await < 50_000 {
            assert!(
                Instant::now() < deadline,
                "the new process never counted the live bytes"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(conn);
        let lines = b.proxy.wait_conn_lines(1, 10).await;
        assert_eq!(lines[0]["plane"], "fastpath", "{lines:?}");
        assert_eq!(lines[0]["bytes_in"], 250_000, "{lines:?}");
        assert_eq!(bytes_in().await, 50_000);
    })
    .await;
}

/// A connection the successor does not take (its app is not in the new
/// config) stays whole in the old process, offered once. Each process
/// numbers its connections from 1 and a moved one keeps its number, so
/// here the eight streams moved in from the first process and the second's
/// own eight on the app being dropped are numbered 1 to 8 twice. The old
/// process used to go by the ids the successor named and closed both
/// copies of a stream it left whenever its twin was in the same batch:
/// its client saw an early clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_the_successor_leaves_stays_whole() {
    bounded(60, "a connection left behind", async {
        let s = Setup::new("copy").await;
        let TwoApps {
            both,
            only_app,
            other_port,
        } = two_apps(&s);
        let launch = |config: std::path::PathBuf, takeover: bool| {
            let s = &s;
            async move {
                s.launch(Path::new(PROXY), &config, takeover)
                    .await
                    .unwrap_or_else(|log| panic!("a generation failed:\n{log}"))
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut first = launch(both.clone(), false).await;
        let moved: Vec<_> = (0..8).map(|i| slow(s.addr, i, &stop)).collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut second = launch(both, true).await;
        assert!(first
            .proxy
            .wait_exit(20)
            .await
            .is_some_and(|st| st.success()));
        let other_addr = SocketAddr::from(([127, 0, 0, 1], other_port));
        let left: Vec<_> = (0..8).map(|i| slow(other_addr, 100 + i, &stop)).collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let third = launch(only_app, true).await;
        // Both sets run on, one in each process.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        for m in moved {
            m.await.unwrap().expect("a stream the third process took");
        }
        for l in left {
            l.await.unwrap().expect("a stream the second process kept");
        }
        assert!(second
            .proxy
            .wait_exit(20)
            .await
            .is_some_and(|st| st.success()));
        let mine = second.proxy.pid() as u64;
        let lines = second.proxy.conn_lines();
        let kept: Vec<_> = lines.iter().filter(|l| l["app"] == "other").collect();
        assert_eq!(kept.len(), 8, "{lines:?}");
        for k in &kept {
            assert_eq!(k["end"], "closed", "{kept:?}");
            assert_eq!(k["pid"].as_u64(), Some(mine));
            assert!(
                k.get("carried_by").is_none_or(|c| c.is_null() || c == ""),
                "carried by no other process: {kept:?}"
            );
        }
        let handed = second
            .proxy
            .log_lines()
            .into_iter()
            .filter(|l| l["message"] == "connection handed over to the new process")
            .filter(|l| l["app"] == "other")
            .count();
        assert_eq!(handed, 0, "the kept stream was said to be handed over");
        let took = third.proxy.wait_conn_lines(8, 10).await;
        let closed = |l: &&serde_json::Value| l["app"] == "app" && l["end"] == "closed";
        assert_eq!(took.iter().filter(closed).count(), 8, "{took:?}");
    })
    .await;
}

/// An old process draining after a handoff (a stream on an app the new
/// config dropped stays with it, for a drain of 20 s) still stops at
/// two signals after a SIGHUP: the reload it cannot take while draining
/// used to hold the signal loop until the drain ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_does_not_hold_up_a_stop_while_draining() {
    bounded(60, "stop behind a reload", async {
        // Generations drain for 20 s (`Setup`).
        let s = Setup::new("copy").await;
        let TwoApps {
            both,
            only_app,
            other_port,
        } = two_apps(&s);
        let mut old = s
            .launch(Path::new(PROXY), &both, false)
            .await
            .unwrap_or_else(|log| panic!("first failed:\n{log}"));
        let stop = Arc::new(AtomicBool::new(false));
        let left = slow(SocketAddr::from(([127, 0, 0, 1], other_port)), 3, &stop);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _new = s
            .launch(Path::new(PROXY), &only_app, true)
            .await
            .unwrap_or_else(|log| panic!("successor failed:\n{log}"));
        wait_log(&old.proxy, "handoff: done", 10).await;
        old.proxy.signal(libc::SIGHUP);
        tokio::time::sleep(Duration::from_millis(200)).await;
        old.proxy.signal(libc::SIGTERM);
        tokio::time::sleep(Duration::from_millis(200)).await;
        old.proxy.signal(libc::SIGTERM);
        let exited = old.proxy.wait_exit(10).await;
        assert!(
            exited.is_some(),
            "still running 10 s after two stops:\n{}",
            old.proxy.log()
        );
        stop.store(true, Ordering::Relaxed);
        // The stream was cut by the second signal: a reset, not an end.
        assert!(left.await.unwrap().is_err());
    })
    .await;
}

/// Configs for a successor that drops an app: `both` has the setup's app
/// and "other" (on `other_port`, to the same backend), `only_app` the
/// setup's app alone.
struct TwoApps {
    both: std::path::PathBuf,
    only_app: std::path::PathBuf,
    other_port: u16,
}

fn two_apps(s: &Setup) -> TwoApps {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&s.config).unwrap()).unwrap();
    let app = config["Apps"][0].clone();
    let other_port = free_ports(1)[0];
    let mut other = app.clone();
    other["Name"] = "other".into();
    other["Ports"] = serde_json::json!([other_port]);
    TwoApps {
        both: write_temp(
            "both.json",
            &serde_json::json!({ "Apps": [app.clone(), other] }).to_string(),
        ),
        only_app: write_temp(
            "only-app.json",
            &serde_json::json!({ "Apps": [app] }).to_string(),
        ),
        other_port,
    }
}

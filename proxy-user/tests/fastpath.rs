//! What only the kernel fastpath must prove: that userspace really stays out
//! of the data path, that a slow receiver cannot make the kernel queue without
//! bound, and that installed pairs leave nothing behind. These run as root
//! (CI does); when BPF cannot load they fail with the proxy's reason.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::seq::{SeqCheck, SeqGen};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

planes!(slow_receiver_stays_bounded);

/// A 1 GiB upload with the in-flight bound above the transfer size, so the
/// direction is never demoted to userspace: the kernel carries every payload
/// byte and the close line says userspace copied none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fastpath_userspace_reads_no_payload_for_1gib() {
    let _alone = MEMORY_TEST.lock().await;
    const LEN: u64 = 1 << 30;
    // The backend greets first (one byte, carried before the install), then
    // hashes everything it receives and answers with the SHA-256.
    let sink = Backend::with("sink", |mut s: TcpStream| async move {
        s.write_all(b"!").await?;
        let (got, sha) = recv_hash(&mut s, LEN).await?;
        s.write_all(format!("{got} {}\n", sha_hex(&sha)).as_bytes())
            .await?;
        s.shutdown().await
    })
    .await;
    let proxy = Proxy::start(
        "fastpath",
        &[AppSpec::new("bulk", 1, vec![sink.target()])],
        // A 4 GiB bound needs autotuned buffers (fixed ones cap it).
        &["--fastpath-inflight", "4GiB", "--socket-buffer", "0"],
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
    let mut greeting = [0u8; 1];
    s.read_exact(&mut greeting).await.unwrap();
    // The greeting proves the upstream is connected; the install follows
    // within microseconds, before the first payload byte.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (mut r, mut w) = s.into_split();
    let sent = bounded(300, "paced 1 GiB upload", async move {
        let mut p = Payload::new(7, LEN);
        let mut h = StreamHasher::new(LEN);
        let mut buf = vec![0u8; 1 << 20];
        let start = Instant::now();
        let mut sent = 0u64;
        loop {
            let n = p.fill(&mut buf);
            if n == 0 {
                break;
            }
            h.update(&buf[..n]).await;
            w.write_all(&buf[..n]).await.unwrap();
            sent += n as u64;
            // Paced so the kernel's queue stays modest on a shared 2-core box.
            let due = Duration::from_secs_f64(sent as f64 / (300u64 << 20) as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        w.shutdown().await.unwrap();
        h.finish().await
    })
    .await;
    let mut answer = String::new();
    r.read_to_string(&mut answer).await.unwrap();
    assert_eq!(
        answer.trim(),
        format!("{LEN} {}", sha_hex(&sent)),
        "the sink must receive exactly what was sent"
    );

    let line = &proxy.wait_conn_lines(1, 10).await[0];
    assert_eq!(line["plane"], "fastpath", "{line}");
    assert_eq!(line["bytes_in"], LEN, "{line}");
    let userspace = line["userspace_bytes"].as_u64().expect("userspace_bytes");
    assert!(
        userspace <= 1,
        "userspace may copy at most the pre-install greeting, not the payload: {line}"
    );
}

/// A receiver reading at 10 MB/s while the sender pushes as fast as it can:
/// what sits in kernel memory must stay small (the unbounded prototype held
/// 360 MB for one connection), then the receiver speeds up and every byte of
/// 1 GiB must arrive, in order.
async fn slow_receiver_stays_bounded(mode: &str) {
    slow_receiver_bounded_with(mode, &[]).await
}

/// `--mode auto` with a connection moved into the kernel 50 ms in (no rate
/// is too high), so the slow receiver meets a promoted pair. The sink's
/// one-byte greeting is all that moves in the first 500 ms: a connection
/// moves only where neither direction holds bytes, which a flood from the
/// first moment leaves to chance (in practice to after the slow phase, so
/// the bound was measured on splice; and in one CI run of three, never),
/// and only after a period that carried something (one is enough here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_slow_receiver_stays_bounded() {
    let promote_early = [
        "--promote-after",
        "50ms",
        "--promote-below",
        "4GiB",
        "--promote-segments-below",
        "1000000000",
        "--promote-periods",
        "1",
    ];
    slow_receiver_bounded_with("auto", &promote_early).await
}

/// What the slow sink says first: one byte, so a connection that is
/// otherwise quiet carried something in its first watch period.
const GREETING: &[u8; 1] = b"+";

async fn slow_receiver_bounded_with(mode: &str, extra: &[&str]) {
    // MemAvailable is system-wide: the planes take turns, and this test binary
    // holds nothing else heavy while they run.
    let _alone = MEMORY_TEST.lock().await;
    const LEN: u64 = 1 << 30;
    const SLOW_PHASE: Duration = Duration::from_secs(4);
    let sink = Backend::with("slow-sink", |mut s: TcpStream| async move {
        s.write_all(GREETING).await?;
        let mut h = StreamHasher::new(LEN);
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        let start = Instant::now();
        loop {
            let slow = start.elapsed() < SLOW_PHASE;
            let want = if slow { 10 * 1024 } else { buf.len() };
            let n = s.read(&mut buf[..want]).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
            h.update(&buf[..n]).await;
            if slow {
                // 10 KiB per ms = 10 MB/s.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let sha = h.finish().await;
        s.write_all(format!("{total} {}\n", sha_hex(&sha)).as_bytes())
            .await?;
        s.shutdown().await
    })
    .await;
    let proxy = Proxy::start(mode, &[AppSpec::new("slow", 1, vec![sink.target()])], extra).await;
    let before = mem_available();
    let s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let mut greeting = [0u8; GREETING.len()];
    r.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, GREETING);
    let promotes = !extra.is_empty();
    if promotes || mode == "fastpath" {
        // Quiet but for the greeting, so that the promotion (or the
        // fastpath's install) finds both directions empty; a flood from
        // the first moment keeps a fastpath pair on its pre-install copy.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let sender = tokio::spawn(async move { send_payload(&mut w, 11, LEN, 256 * 1024).await });

    // MemAvailable while the receiver is slow. The median, not the minimum:
    // an unbounded queue grows the whole time (hundreds of MB per second),
    // while another process's passing allocation shows in a sample or two.
    let mut grew = Vec::new();
    // The proxy's own sockets, where a child runs it (the kernel planes):
    // exact, where MemAvailable also moves with every other process.
    let mut held = Vec::new();
    let child = proxy.is_child().then(|| proxy.pid());
    let start = Instant::now();
    while start.elapsed() < SLOW_PHASE {
        grew.push(before.saturating_sub(mem_available()) / 1024);
        if let Some(pid) = child {
            held.push(proxy_socket_mem(pid) >> 20);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    grew.sort_unstable();
    held.sort_unstable();
    if let (Some(median), Some(most)) = (held.get(held.len() / 2), held.last()) {
        eprintln!("{mode}: the proxy's sockets held {median} MiB (median), {most} MiB (most)");
        // The issue's bound for the kernel planes: at most 64 MiB.
        assert!(
            *most <= 64,
            "{mode}: the proxy's sockets held up to {most} MiB while the receiver read 10 MB/s"
        );
    }
    let grew_mib = grew[grew.len() / 2];
    let most_mib = grew[grew.len() - 1];
    eprintln!("{mode}: kernel memory grew by {grew_mib} MiB (median), {most_mib} MiB (most) during the slow phase");

    let sent = bounded(300, "1 GiB into a slow receiver", sender)
        .await
        .unwrap()
        .unwrap();
    let mut answer = String::new();
    r.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer.trim(), format!("{LEN} {}", sha_hex(&sent)));
    if mode == "fastpath" {
        let line = &proxy.wait_conn_lines(1, 10).await[0];
        assert_eq!(line["plane"], "fastpath", "the kernel carried it: {line}");
    }
    if promotes {
        let line = &proxy.wait_conn_lines(1, 10).await[0];
        // Before the flood began, so the slow phase ran on the fastpath.
        assert!(
            line["promoted_ms"].as_u64().is_some_and(|ms| ms < 500),
            "the pair must have moved into the kernel before the flood: {line}"
        );
    }
    // Socket buffers on three sockets (a few MiB each) plus the in-flight
    // bound fit easily; an unbounded queue grows by the sender's full rate
    // (hundreds of MB per second) and fails this.
    assert!(
        grew_mib < 96,
        "{mode}: kernel memory grew by {grew_mib} MiB (median sample) while the receiver read 10 MB/s"
    );
}

/// 100,000 short connections through the fastpath: afterwards the proxy's
/// socket and flow maps are empty and its fd count is back where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fastpath_leaves_nothing_after_100k_connections() {
    let _alone = MEMORY_TEST.lock().await;
    const CONNS: usize = 100_000;
    const PARALLEL: usize = 64;
    let echo = Backend::echo("echo").await;
    let mut proxy = Proxy::start(
        "fastpath",
        &[AppSpec::new("churn", 1, vec![echo.target()])],
        &[],
    )
    .await;
    let addr = proxy.addr(0, 0);
    let fds_before = fd_count(proxy.pid());
    bounded(600, "100k connections", async move {
        let mut workers = Vec::new();
        for w in 0..PARALLEL {
            workers.push(tokio::spawn(async move {
                for i in (w..CONNS).step_by(PARALLEL) {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    let msg = (i as u64).to_be_bytes();
                    s.write_all(&msg).await.unwrap();
                    // The echo before the FIN: a FIN sent with the first
                    // bytes reaches the proxy before its install, and the
                    // pair is never installed (nothing to leak).
                    let mut back = [0u8; 8];
                    s.read_exact(&mut back).await.unwrap();
                    assert_eq!(back, msg, "connection {i}");
                    s.shutdown().await.unwrap();
                    let mut rest = Vec::new();
                    s.read_to_end(&mut rest).await.unwrap();
                    assert!(
                        rest.is_empty(),
                        "connection {i}: {} bytes after the echo",
                        rest.len()
                    );
                }
            }));
        }
        for w in workers {
            w.await.unwrap();
        }
    })
    .await;
    let lines = proxy.wait_conn_lines(CONNS, 60).await;
    assert_eq!(lines.len(), CONNS);
    // Most pairs must have been installed, or "the maps are empty" says
    // nothing about uninstalls.
    let installed = lines.iter().filter(|l| l["plane"] == "fastpath").count();
    eprintln!("{installed} of {CONNS} connections ran on the fastpath");
    assert!(
        installed >= CONNS / 2,
        "only {installed} of {CONNS} connections ran on the fastpath"
    );
    // Close lines are written after the pair is uninstalled and both fds closed.
    let fds_after = fd_count(proxy.pid());
    assert!(
        fds_after <= fds_before + 2,
        "fds before {fds_before}, after {fds_after}: sockets leaked"
    );
    proxy.signal(libc::SIGTERM);
    proxy.wait_exit(30).await.expect("proxy exits on SIGTERM");
    let log = proxy.log();
    assert!(
        log.contains("fastpath maps empty"),
        "the proxy must report empty fastpath maps at exit; log tail: {}",
        &log[log.len().saturating_sub(2000)..]
    );
}

/// The kernel fastpath loads with what the service units grant it:
/// CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, with CAP_SYS_ADMIN dropped from
/// the bounding set (so even root lacks it after exec). Without CAP_PERFMON
/// too it refuses to start, and the verifier says why: the verdict reads
/// TCP sequence numbers with bpf_probe_read_kernel. (The units said
/// CAP_BPF and CAP_NET_ADMIN until session 20.)
#[tokio::test]
async fn fastpath_loads_with_the_capabilities_the_units_grant() {
    let port = free_ports(1)[0];
    let config = write_temp(
        "config.json",
        &format!(r#"{{"Apps":[{{"Name":"a","Ports":[{port}],"Targets":["127.0.0.1:1"]}}]}}"#),
    );
    // CAP_SYS_ADMIN; then CAP_PERFMON too.
    for (dropped, loads) in [(&[21][..], true), (&[21, 38][..], false)] {
        let log = write_temp("caps.log", "");
        let mut cmd = std::process::Command::new(PROXY);
        cmd.arg("--config")
            .arg(&config)
            .args(["--mode", "fastpath", "--listen-address", "127.0.0.1"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let caps = dropped.to_vec();
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                for &cap in &caps {
                    if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let (ready, exited) = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("proxy ready") {
                break (true, false);
            }
            if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                break (false, true);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let _ = child.kill();
        let _ = child.wait();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        if loads {
            assert!(
                ready,
                "without CAP_SYS_ADMIN the fastpath must load:\n{text}"
            );
        } else {
            assert!(
                exited && !ready && text.contains("bpf_probe_read"),
                "without CAP_PERFMON the fastpath must refuse, saying why:\n{text}"
            );
        }
    }
    let _ = std::fs::remove_file(&config);
}

/// Held by every test in this binary: each is heavy, and the memory test
/// reads a system-wide counter.
static MEMORY_TEST: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn mem_available() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("MemAvailable in /proc/meminfo")
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Without BPF privileges `--mode fastpath` refuses to start and says why,
/// and `--mode auto`, which never needs BPF, serves on splice(2) without a warning. (Dropping
/// root with setpriv is how CI, which runs as root, sees an unprivileged run.)
#[test]
fn mode_selection_without_bpf_privileges() {
    let ports = free_ports(1);
    let config = write_temp(
        "config.json",
        &format!(
            r#"{{"Apps":[{{"Name":"a","Ports":[{}],"Targets":["127.0.0.1:9"]}}]}}"#,
            ports[0]
        ),
    );
    let unprivileged = |mode: &str| {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(PROXY)
        .arg("--config")
        .arg(&config)
        .args(["--listen-address", "127.0.0.1", "--mode", mode]);
        cmd
    };

    let out = unprivileged("fastpath")
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "--mode fastpath must refuse to start: {stderr}"
    );
    assert!(
        stderr.contains("--mode fastpath") && stderr.contains("not running as root"),
        "the refusal must name the mode and the reason: {stderr}"
    );

    let auto = unprivileged("auto")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux)");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(auto.id() as i32, libc::SIGTERM) };
    let out = auto.wait_with_output().expect("proxy output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "--mode auto must run and drain cleanly: {stderr}"
    );
    assert!(
        !stderr.contains("WARN"),
        "auto must not warn without BPF: {stderr}"
    );
    assert!(
        stderr.contains("plane=\"splice\""),
        "auto must choose splice: {stderr}"
    );
}

/// The bench's bulk load: a sender as fast as it goes into a sink that reads
/// as fast as it can. The receiver falls the in-flight bound behind now and
/// then, so the verdict demotes the direction while bytes pour in, and
/// userspace may read passed bytes before it has seen the demotion. It must
/// count them (`Proxy`'s drop checks the log for untracked passed bytes):
/// left uncounted, the FIN waited 10 s for bytes it thought were still owed
/// (the bench's fastpath bulk, 1 to 4 runs in 20). Without the count this
/// failed its first run (the log check). Every stream is sequence-numbered
/// and checked by the sink, so a replay or duplicate with an exact byte
/// count fails here too: this is CI's only full-speed run through the
/// kernel (the short bench leaves the fastpath out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_speed_bulk_ends_at_its_fin() {
    const LEN: u64 = 512 << 20;
    const STREAMS: u64 = 24;
    // Heavy on kernel memory: not while a memory test reads MemAvailable
    // (splice's slow-receiver test once saw 119 MiB beside it).
    let _alone = MEMORY_TEST.lock().await;
    // The stream's tag is its first word (its byte offset 0 holds the tag);
    // the sink answers with the tag, the length and what its check found.
    let sink = Backend::with("seq-sink", |mut s: TcpStream| async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut head = [0u8; 8];
        let verdict = match s.read_exact(&mut head).await {
            Err(e) => format!("0 0 no first word: {e}"),
            Ok(_) => {
                let tag = u64::from_le_bytes(head);
                let mut check = SeqCheck::new(tag);
                check.feed(&head);
                loop {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    check.feed(&buf[..n]);
                }
                let got = check.received();
                let found = check.finish(got).err().unwrap_or_else(|| "ok".into());
                format!("{tag} {got} {found}")
            }
        };
        s.write_all(format!("{verdict}\n").as_bytes()).await?;
        s.shutdown().await
    })
    .await;
    let proxy = Proxy::start(
        "fastpath",
        &[AppSpec::new("bulk", 1, vec![sink.target()])],
        &[],
    )
    .await;
    for i in 0..STREAMS {
        let s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let tag = (i + 1) << 44;
        let sent = bounded(60, "a full-speed bulk stream", async move {
            let mut gen = SeqGen::new(tag, LEN);
            let mut buf = vec![0u8; 256 * 1024];
            // The first word, then a pause the pair installs in.
            let n = gen.fill(&mut buf[..8]);
            w.write_all(&buf[..n]).await.unwrap();
            let_the_fastpath_install().await;
            loop {
                let n = gen.fill(&mut buf);
                if n == 0 {
                    break;
                }
                w.write_all(&buf[..n]).await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        sent.await;
        let answer = bounded(5, "the sink's verdict after the FIN", async move {
            let mut answer = String::new();
            r.read_to_string(&mut answer).await.unwrap();
            answer
        })
        .await;
        assert_eq!(answer.trim(), format!("{tag} {LEN} ok"), "stream {i}");
    }
    // Through the kernel, as the bench's bulk is: installed (not left on the
    // copy fallback, which `Proxy`'s plane check allows), and demoted by the
    // bound at least once while bytes poured in.
    let lines = proxy.wait_conn_lines(STREAMS as usize, 10).await;
    assert_eq!(lines.len(), STREAMS as usize, "{lines:?}");
    let not_installed: Vec<_> = lines.iter().filter(|l| l["plane"] != "fastpath").collect();
    assert!(
        not_installed.is_empty(),
        "streams the kernel never carried: {not_installed:?}"
    );
    let demoted: u64 = lines.iter().filter_map(|l| l["demoted"].as_u64()).sum();
    assert!(demoted >= 1, "no direction was demoted: {lines:?}");
}

/// Both directions demoted behind a target that reads only between its
/// writes (a 64 KiB read, then its echo written out: a server with output
/// backpressure) and a client that reads slowly (about 2 MB/s for its
/// first 24 MiB) while it uploads flat out, at the default in-flight bound.
/// Each socket's psock queue then holds one direction's redirects and the
/// other's passed bytes; the echo must come back exact by sequence, with
/// both directions handed to userspace and a clean close.
///
/// It also prints how long the 40 MiB after the slow phase took, which the
/// default bound decides (a pause of seconds at 2x the buffers, NOTES §2,
/// session 24; not asserted: a wall clock). To compare bounds:
/// `COUPLED_INFLIGHT=4MiB COUPLED_RUNS=5 cargo test --release -p proxy-user
/// --test fastpath coupled -- --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coupled_target_behind_a_slow_reader_is_exact() {
    const LEN: u64 = 64 << 20;
    const SLOW: u64 = 24 << 20;
    let backend = Backend::with("alternating-echo", |mut s: TcpStream| async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return s.shutdown().await;
            }
            s.write_all(&buf[..n]).await?;
        }
    })
    .await;
    let inflight = std::env::var("COUPLED_INFLIGHT").ok();
    let runs: usize = std::env::var("COUPLED_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let mut extra = vec![];
    if let Some(bound) = &inflight {
        extra.extend(["--fastpath-inflight", bound.as_str()]);
    }
    let proxy = Proxy::start(
        "fastpath",
        &[AppSpec::new("coupled", 1, vec![backend.target()])],
        &extra,
    )
    .await;
    for run in 0..runs {
        let s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let tag = (run as u64 + 1) << 40;
        let_the_fastpath_install().await;
        let sender = tokio::spawn(async move {
            let mut gen = SeqGen::new(tag, LEN);
            let mut buf = vec![0u8; 128 * 1024];
            loop {
                let n = gen.fill(&mut buf);
                if n == 0 {
                    break;
                }
                w.write_all(&buf[..n]).await?;
            }
            w.shutdown().await
        });
        let after_slow = bounded(120, "the coupled echo", async {
            let mut check = SeqCheck::new(tag);
            let mut buf = vec![0u8; 64 * 1024];
            let mut sped_up = None;
            loop {
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                check.feed(&buf[..n]);
                if check.received() < SLOW {
                    tokio::time::sleep(Duration::from_millis(32)).await;
                } else if sped_up.is_none() {
                    sped_up = Some(Instant::now());
                }
            }
            check.finish(LEN).unwrap();
            sped_up.map(|t| t.elapsed())
        })
        .await;
        sender.await.unwrap().unwrap();
        eprintln!(
            "run {run}, bound {}: the {} MiB after the slow phase took {after_slow:?}",
            inflight.as_deref().unwrap_or("default"),
            (LEN - SLOW) >> 20
        );
    }
    let lines = proxy.wait_conn_lines(runs, 10).await;
    assert_eq!(lines.len(), runs, "{lines:?}");
    for line in &lines {
        assert_eq!(line["plane"], "fastpath", "{line}");
        assert_eq!(line["end"], "closed", "{line}");
        assert_eq!(line["demoted"], 2, "both directions handed over: {line}");
    }
}

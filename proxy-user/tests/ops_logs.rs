//! What an operator reads, through the real binary: JSON logs from the
//! first line, a short "proxy ready", `/config` as the file with its hash,
//! SIGHUP with an unchanged file, `--admin-address localhost:PORT`, and
//! `--no-connection-log`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

/// Every stderr line of a failed start is one JSON object.
fn json_lines(args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(PROXY).args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} started");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!text.trim().is_empty(), "{args:?}: nothing on stderr");
    text.lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {l}"))
        })
        .collect()
}

#[test]
fn json_logs_are_json_from_the_first_line() {
    let bad = write_temp(
        "bad.json",
        r#"{"Apps":[{"Name":"a","Ports":[0],"Targets":["h:1"]}]}"#,
    );
    let bad = bad.to_str().unwrap();
    let json = ["--log-format", "json"];
    for (args, want) in [
        (vec!["--config", bad], "Apps[0].Ports[0]"),
        (
            vec!["--config", bad, "--connect-timeout", "5"],
            "has no unit",
        ),
        (
            vec!["--config", bad, "--log-level", "info,=x=y"],
            "--log-level",
        ),
    ] {
        let args: Vec<&str> = json.iter().copied().chain(args).collect();
        let lines = json_lines(&args);
        let last = lines.last().unwrap();
        assert_eq!(last["level"], "ERROR", "{last}");
        assert!(last["timestamp"].as_str().unwrap().ends_with('Z'), "{last}");
        assert!(
            last["error"].as_str().unwrap().contains(want),
            "{want} in {last}"
        );
    }
    // Human logs keep the plain message.
    let out = Command::new(PROXY)
        .args(["--config", bad])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("proxy: error: "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_line_config_and_sighup() {
    let echo = Backend::echo("echo").await;
    let mut proxy = Proxy::spawn(
        "copy",
        &[AppSpec::new("many", 40, vec![echo.target()])],
        &["--admin-address", "localhost:0", "--watch-config", "0"],
    )
    .await;
    proxy.wait_ready().await.unwrap();
    let admin = admin_addr(&proxy);
    assert!(
        admin.starts_with("127.0.0.1:"),
        "localhost resolved to {admin}"
    );
    let ready = proxy
        .log_lines()
        .into_iter()
        .find(|l| l["message"] == "proxy ready")
        .unwrap();
    assert_eq!(ready["listeners"], 40);
    assert!(ready.get("listening").is_none(), "{ready}");
    // free_ports gives scattered ports: at most 16 ranges are listed.
    let ports = ready["ports"].as_str().unwrap();
    assert!(ports.len() < 200, "{ports}");

    // /config is the file as written, with its hash.
    let file = std::fs::read_to_string(&proxy.config_path).unwrap();
    let sha: String = Sha256::digest(file.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let resp = http_raw(&admin, b"GET /config HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert_eq!(body, file);
    assert!(head.contains(&format!("X-Config-Sha256: {sha}")), "{head}");
    let (_, m) = http_get(&admin, "/metrics").await.unwrap();
    assert_eq!(
        metric(&m, &format!(r#"proxy_config_info{{sha256="{sha}"}}"#)),
        1.0
    );

    // SIGHUP with the file as it is: no reload.
    let reloads = |m: &str| {
        (
            metric(m, "proxy_config_reloads_total"),
            metric(m, "proxy_config_reloads_unchanged_total"),
        )
    };
    proxy.signal(libc::SIGHUP);
    let metrics_until = |want: (f64, f64)| {
        let admin = admin.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (_, m) = http_get(&admin, "/metrics").await.unwrap();
                if reloads(&m) == want {
                    return m;
                }
                assert!(
                    Instant::now() < deadline,
                    "reloads {:?}, want {want:?}",
                    reloads(&m)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    metrics_until((0.0, 1.0)).await;
    assert!(proxy.log().contains("config unchanged; nothing to reload"));
    // A changed file is a reload, with its new hash.
    let changed = file.replace("\"many\"", "\"renamed\"");
    std::fs::write(&proxy.config_path, &changed).unwrap();
    proxy.signal(libc::SIGHUP);
    let m = metrics_until((1.0, 1.0)).await;
    let sha: String = Sha256::digest(changed.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        metric(&m, &format!(r#"proxy_config_info{{sha256="{sha}"}}"#)),
        1.0
    );
    assert_eq!(m.matches("proxy_config_info{").count(), 1, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connection_log_leaves_the_access_log_alone() {
    let echo = Backend::echo("echo").await;
    let access = write_temp("access.jsonl", "");
    let access_arg = access.display().to_string();
    let mut proxy = Proxy::spawn(
        "copy",
        &[AppSpec::new("web", 1, vec![echo.target()])],
        &["--access-log", &access_arg, "--no-connection-log"],
    )
    .await;
    proxy.wait_ready().await.unwrap();
    for i in 0..3 {
        echo_check(proxy.addr(0, 0), i, 1000).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&access).unwrap().lines().count() < 3 {
        assert!(Instant::now() < deadline, "access log lines missing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(proxy.conn_lines().is_empty(), "{}", proxy.log());
    // Without an access log the flag is refused: connections would go unlogged.
    let out = Command::new(PROXY)
        .arg("--no-connection-log")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--access-log"));
}

/// A port taken inside the ephemeral range: the error says what else may
/// hold it and how to reserve it.
#[test]
fn bind_failure_in_the_ephemeral_range_hints_at_reserved_ports() {
    // Port 0 picks from the ephemeral range.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let config = write_temp(
        "held.json",
        &format!(r#"{{"Apps":[{{"Name":"a","Ports":[{port}],"Targets":["127.0.0.1:1"]}}]}}"#),
    );
    let out = Command::new(PROXY)
        .args([
            "--listen-address",
            "127.0.0.1",
            "--mode",
            "copy",
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("net.ipv4.ip_local_reserved_ports={port}")),
        "{err}"
    );
}

/// `n` short connections through `addr`, 20 at a time.
async fn connections(addr: std::net::SocketAddr, n: u64) {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(20));
    let mut tasks = Vec::new();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let r = echo_check(addr, i, 100).await;
            drop(permit);
            r
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// An access log the proxy cannot write (a full disk): the lines it loses
/// are counted in `proxy_access_log_dropped_total`, as those it has no
/// queue room for; it counted none before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_access_log_counts_what_it_loses() {
    let echo = Backend::echo("echo").await;
    let proxy = Proxy::spawn(
        "copy",
        &[AppSpec::new("web", 1, vec![echo.target()])],
        &[
            "--access-log",
            "/dev/full",
            "--no-connection-log",
            "--admin-address",
            "127.0.0.1:0",
        ],
    )
    .await;
    // More lines than the writer's 64 KiB buffer holds.
    bounded(60, "connections", connections(proxy.addr(0, 0), 400)).await;
    let series = "proxy_access_log_dropped_total";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = http_get(&admin_addr(&proxy), "/metrics").await.unwrap();
        if metric(&text, series) > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no line counted as lost:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        proxy.log().contains("cannot write the access log"),
        "{}",
        proxy.log()
    );
}

/// The access log's last lines reach it before the process exits: the
/// close lines of the drain are the ones an operator wants most. The
/// writer thread used to die with the process, lines still queued. Here
/// the log is a FIFO whose reader starts reading only 0.5 s after the
/// SIGTERM (the exit waits up to 2 s for the queue; it took about 0.1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_access_log_lines_are_written_before_exit() {
    use std::io::Read;
    let echo = Backend::echo("echo").await;
    let fifo = std::env::temp_dir().join(format!(
        "access-fifo-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    let path = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    // SAFETY: a valid C string path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let reading = fifo.clone();
    let (go, start) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::open(&reading).unwrap();
        let _ = start.recv();
        let mut all = Vec::new();
        let _ = f.read_to_end(&mut all);
        all.iter().filter(|b| **b == b'\n').count()
    });
    let fifo_arg = fifo.display().to_string();
    let mut proxy = Proxy::spawn(
        "copy",
        &[AppSpec::new("web", 1, vec![echo.target()])],
        &["--access-log", &fifo_arg, "--no-connection-log"],
    )
    .await;
    // More lines than the pipe and the writer's buffer hold (~330 bytes each).
    let n = 1500;
    bounded(60, "connections", connections(proxy.addr(0, 0), n)).await;
    proxy.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    go.send(()).unwrap();
    assert!(proxy.wait_exit(20).await.is_some_and(|st| st.success()));
    let lines = reader.join().unwrap();
    let _ = std::fs::remove_file(&fifo);
    assert_eq!(lines as u64, n, "access log lines lost at exit");
}

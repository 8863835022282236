//! The admin listener: /metrics validity and exactness, /readyz, /targets,
//! /config, bad requests, and the --access-log file.

#[macro_use]
mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

planes!(metrics_pass_promtool, known_traffic_counts_exactly);

/// Pipes `text` into `promtool check metrics`; panics with promtool's
/// complaints, or with how to get promtool if it is missing.
async fn promtool_check(text: &str) {
    let child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot run promtool ({e}): install the Debian package `prometheus` \
             (apt-get install -y prometheus, or `cargo xtask setup`)"
        ),
    };
    let mut stdin = child.stdin.take().expect("promtool stdin");
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- metrics:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn metrics_pass_promtool(mode: &str) {
    let echo = Backend::echo("echo").await;
    let proxy = Proxy::start(
        mode,
        &[
            AppSpec::new("web", 1, vec![echo.target(), dead_target()]),
            AppSpec::new("gone", 1, vec!["bad.target.for.testing:6003".into()]),
        ],
        &["--admin-address", "127.0.0.1:0"],
    )
    .await;
    bounded(30, "promtool", async {
        // Every family gets samples: traffic, a failover, a connect failure.
        for i in 0..4 {
            echo_check(proxy.addr(0, 0), i, 5_000).await.unwrap();
        }
        // The proxy resets it at once (no target resolves), and the reset
        // can come before connect() returns: CI saw ECONNRESET here once.
        match TcpStream::connect(proxy.addr(1, 0)).await {
            Ok(mut s) => {
                let _ = s.read(&mut [0u8; 1]).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{mode}: connect: {e}"),
        }
        proxy.wait_conn_lines(5, 10).await;
        let (code, text) = http_get(&admin_addr(&proxy), "/metrics").await.unwrap();
        assert_eq!(code, 200);
        for family in [
            "proxy_target_connect_duration_seconds_bucket",
            "proxy_target_connect_failures_total",
            "proxy_connections_plane_total",
            "process_open_fds",
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(family), "{family} missing:\n{text}");
        }
        promtool_check(&text).await;
    })
    .await;
}

/// Reads everything the client sends, then answers with `2 * n + 7` bytes:
/// the two directions differ, so a swapped counter shows.
async fn reply_backend() -> Backend {
    Backend::with("reply", |mut s: TcpStream| async move {
        let mut n = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => break,
                Ok(k) => n += k as u64,
                Err(_) => return,
            }
        }
        let reply = vec![b'r'; (2 * n + 7) as usize];
        let _ = s.write_all(&reply).await;
        let _ = s.shutdown().await;
    })
    .await
}

async fn known_traffic_counts_exactly(mode: &str) {
    let backend = reply_backend().await;
    let access = std::env::temp_dir().join(format!(
        "proxy-test-access-{}-{mode}-{}.jsonl",
        std::process::id(),
        fastrand::u32(..)
    ));
    let access_arg = access.to_str().unwrap().to_string();
    let proxy = Proxy::start(
        mode,
        &[AppSpec::new("app", 2, vec![backend.target()])],
        &[
            "--admin-address",
            "127.0.0.1:0",
            "--access-log",
            &access_arg,
        ],
    )
    .await;
    const N: u64 = 8;
    let sizes: Vec<u64> = (0..N).map(|i| 1 + i * 37_777).collect();
    bounded(60, "known traffic", async {
        for (i, len) in sizes.iter().enumerate() {
            let mut s = TcpStream::connect(proxy.addr(0, i % 2)).await.unwrap();
            if mode == "fastpath" {
                // The counts below are then of bytes the kernel carried.
                let_the_fastpath_install().await;
            }
            let (mut r, mut w) = s.split();
            let send = async {
                let data = vec![b's'; *len as usize];
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let recv = async {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                got.len() as u64
            };
            let ((), got) = tokio::join!(send, recv);
            assert_eq!(got, 2 * len + 7, "reply size of connection {i}");
        }
        let lines = proxy.wait_conn_lines(N as usize, 10).await;
        assert_eq!(lines.len() as u64, N);
        let sent: u64 = sizes.iter().sum();
        let received: u64 = sizes.iter().map(|n| 2 * n + 7).sum();

        let (_, text) = http_get(&admin_addr(&proxy), "/metrics").await.unwrap();
        let v = |s: &str| metric(&text, s) as u64;
        assert_eq!(
            v(r#"proxy_bytes_total{app="app",direction="client_to_target"}"#),
            sent,
            "{text}"
        );
        assert_eq!(
            v(r#"proxy_bytes_total{app="app",direction="target_to_client"}"#),
            received
        );
        assert_eq!(v(r#"proxy_connections_accepted_total{app="app"}"#), N);
        assert_eq!(v(r#"proxy_connections_total{app="app",end="closed"}"#), N);
        assert_eq!(v(r#"proxy_connections_active{app="app"}"#), 0);
        // Per plane, exactly the close lines' planes; on the fastpath every
        // pair installed (the client waited for it).
        let allowed: &[&str] = match mode {
            "fastpath" => &["fastpath"],
            "auto" => &["splice", "fastpath", "copy-fallback"],
            other => &[other],
        };
        for plane in ["fastpath", "splice", "copy", "copy-fallback", "none"] {
            let logged = lines.iter().filter(|l| l["plane"] == plane).count() as u64;
            assert!(logged == 0 || allowed.contains(&plane), "{plane} on {mode}");
            let series = format!(r#"proxy_connections_plane_total{{app="app",plane="{plane}"}}"#);
            assert_eq!(v(&series), logged, "{series}");
        }
        let t = format!(r#"app="app",target="{}""#, backend.target());
        assert_eq!(v(&format!("proxy_target_connect_attempts_total{{{t}}}")), N);
        assert_eq!(
            v(&format!(
                "proxy_target_connect_duration_seconds_count{{{t}}}"
            )),
            N
        );
        assert_eq!(
            v(&format!(
                r#"proxy_target_connect_duration_seconds_bucket{{{t},le="+Inf"}}"#
            )),
            N
        );
        assert_eq!(v(&format!("proxy_target_active_connections{{{t}}}")), 0);

        // The access log has the same numbers, one JSON object per line.
        let deadline = Instant::now() + Duration::from_secs(5);
        let entries: Vec<serde_json::Value> = loop {
            let text = std::fs::read_to_string(&access).unwrap_or_default();
            let entries: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("access log line is JSON"))
                .collect();
            if entries.len() as u64 >= N || Instant::now() > deadline {
                break entries;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(entries.len() as u64, N);
        let fields = [
            "timestamp",
            "start",
            "conn",
            "app",
            "port",
            "client",
            "local",
            "connect_ms",
            "target",
            "attempts",
            "bytes_in",
            "bytes_out",
            "userspace_bytes",
            "duration_ms",
            "plane",
            "end",
        ];
        for e in &entries {
            let obj = e.as_object().unwrap();
            assert_eq!(obj.len(), fields.len(), "{e}");
            for f in fields {
                assert!(obj.contains_key(f), "{f} missing in {e}");
            }
            assert_eq!(e["app"], "app");
            let close = lines.iter().find(|l| l["conn"] == e["conn"]).unwrap();
            assert_eq!(e["plane"], close["plane"], "{e}");
            assert_eq!(e["bytes_in"], close["bytes_in"], "{e}");
            assert_eq!(e["end"], "closed");
            assert_eq!(e["target"], backend.target());
            let bytes_in = e["bytes_in"].as_u64().unwrap();
            assert!(sizes.contains(&bytes_in), "{e}");
            assert_eq!(e["bytes_out"].as_u64().unwrap(), 2 * bytes_in + 7);
            assert!(e["timestamp"].as_str().unwrap().ends_with('Z'));
            // Same key as the JSON log lines; start no later than close.
            assert!(e["start"].as_str().unwrap() <= e["timestamp"].as_str().unwrap());
            assert_eq!(
                e["local"],
                format!("127.0.0.1:{}", e["port"].as_u64().unwrap()),
                "{e}"
            );
            assert!(e["connect_ms"].as_u64().unwrap() <= e["duration_ms"].as_u64().unwrap());
        }
        let log_in: u64 = entries
            .iter()
            .map(|e| e["bytes_in"].as_u64().unwrap())
            .sum();
        assert_eq!(log_in, sent);
    })
    .await;
    let _ = std::fs::remove_file(&access);
}

/// From process start, /readyz is never 200 while a listener is not yet
/// accepting, and turns 503 again while draining (ports closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_follows_listeners() {
    let echo = Backend::echo("echo").await;
    // Many ports, so binding takes a while and the poller has a window.
    // One call, so the admin port is not one of the apps' (two calls can
    // hand out the same port: CI saw the proxy refuse to start that way).
    let mut ports = free_ports(201);
    let admin = format!("127.0.0.1:{}", ports.pop().expect("201 ports"));
    let config = write_temp(
        "config.json",
        &config_json(
            &[AppSpec::new("many", ports.len(), vec![echo.target()])],
            std::slice::from_ref(&ports),
        ),
    );
    let log_path = std::env::temp_dir().join(format!(
        "proxy-test-readyz-{}-{}.log",
        std::process::id(),
        fastrand::u32(..)
    ));
    let mut child = std::process::Command::new(PROXY)
        .arg("--config")
        .arg(&config)
        .args(["--listen-address", "127.0.0.1", "--mode", "copy"])
        .args(["--admin-address", &admin, "--drain-timeout", "20s"])
        .args(["--log-format", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("spawn proxy");
    let result = bounded(40, "readyz", async {
        let start = Instant::now();
        // Poll until ready. The admin listener opens only once the proxy is
        // ready, so the polls are refused until then and 503s are not
        // expected (counted, not failed: "not ready" is never a wrong
        // answer). What this checks is the other way round, below.
        let mut seen_503 = 0;
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "never ready; log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            match http_get(&admin, "/readyz").await {
                Ok((200, body)) => {
                    assert_eq!(body, "ready\n");
                    break;
                }
                Ok((503, _)) => seen_503 += 1,
                Ok((code, body)) => panic!("/readyz answered {code}: {body}"),
                Err(_) => tokio::time::sleep(Duration::from_micros(200)).await,
            }
        }
        // Ready means every listener accepts, right now.
        for p in &ports {
            TcpStream::connect(("127.0.0.1", *p))
                .await
                .unwrap_or_else(|e| panic!("/readyz said ready but port {p} refuses: {e}"));
        }
        eprintln!(
            "saw {seen_503} 503 answers before ready ({:?} after spawn)",
            start.elapsed()
        );
        let (code, body) = http_get(&admin, "/healthz").await.unwrap();
        assert_eq!((code, body.as_str()), (200, "ok\n"));

        // Drain: a held connection keeps the process alive after SIGTERM.
        let held = TcpStream::connect(("127.0.0.1", ports[0])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (code, _) = http_get(&admin, "/readyz").await.unwrap();
            if code == 503 {
                break;
            }
            assert!(Instant::now() < deadline, "/readyz still 200 after SIGTERM");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Liveness is not readiness: still alive while draining.
        assert_eq!(http_get(&admin, "/healthz").await.unwrap().0, 200);
        drop(held);
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&log_path);
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn targets_shows_killed_target_down_within_an_interval() {
    let a = Backend::identify("a").await;
    let b = Backend::identify("b").await;
    let mut proxy = Proxy::start(
        "copy",
        &[AppSpec::new("web", 1, vec![a.target(), b.target()])],
        &[
            "--admin-address",
            "127.0.0.1:0",
            "--health-interval",
            "200ms",
            "--health-fall",
            "1",
        ],
    )
    .await;
    let admin = admin_addr(&proxy);
    bounded(30, "targets", async {
        let targets = |body: &str| -> Vec<serde_json::Value> {
            let v: serde_json::Value = serde_json::from_str(body).expect("/targets is JSON");
            assert_eq!(v["apps"][0]["app"], "web", "{v}");
            v["apps"][0]["targets"].as_array().unwrap().clone()
        };
        let (code, body) = http_get(&admin, "/targets").await.unwrap();
        assert_eq!(code, 200);
        let ts = targets(&body);
        assert_eq!(ts.len(), 2);
        for t in &ts {
            assert_eq!(t["state"], "up", "{t}");
            for f in [
                "consecutive_successes",
                "consecutive_failures",
                "active_connections",
            ] {
                assert!(t[f].is_u64(), "{f} in {t}");
            }
        }

        b.kill_and_wait().await;
        let killed = Instant::now();
        let down = loop {
            let (_, body) = http_get(&admin, "/targets").await.unwrap();
            let ts = targets(&body);
            let tb = ts
                .iter()
                .find(|t| t["target"] == b.target())
                .unwrap()
                .clone();
            if tb["state"] == "down" {
                break tb;
            }
            assert!(killed.elapsed() < Duration::from_secs(3), "still up: {tb}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let took = killed.elapsed();
        // One interval, plus scheduling slack on a busy 2-core machine.
        assert!(
            took < Duration::from_millis(200 + 250),
            "down after {took:?}"
        );
        assert!(
            down["consecutive_failures"].as_u64().unwrap() >= 1,
            "{down}"
        );
        assert_eq!(down["transitions_down"], 1, "{down}");

        // /config follows a reload.
        let (_, before) = http_get(&admin, "/config").await.unwrap();
        let before: serde_json::Value = serde_json::from_str(&before).unwrap();
        assert_eq!(before["Apps"][0]["Targets"][1], b.target());
        let spec = [AppSpec::new("web", 1, vec![a.target()])];
        std::fs::write(&proxy.config_path, config_json(&spec, &proxy.ports)).unwrap();
        proxy.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, now) = http_get(&admin, "/config").await.unwrap();
            let now: serde_json::Value = serde_json::from_str(&now).unwrap();
            if now["Apps"][0]["Targets"].as_array().map(Vec::len) == Some(1) {
                break;
            }
            assert!(Instant::now() < deadline, "/config not reloaded: {now}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (_, text) = http_get(&admin, "/metrics").await.unwrap();
        assert_eq!(metric(&text, "proxy_config_reloads_total"), 1.0);
        assert!(proxy.is_running());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx() {
    let echo = Backend::echo("echo").await;
    let proxy = Proxy::start(
        "copy",
        &[AppSpec::new("web", 1, vec![echo.target()])],
        &["--admin-address", "127.0.0.1:0"],
    )
    .await;
    let admin = admin_addr(&proxy);
    bounded(20, "bad requests", async {
        let status = |resp: String| resp.lines().next().unwrap_or_default().to_string();
        let cases: [(&[u8], &str); 5] = [
            (b"GET /nope HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
            (
                b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                "HTTP/1.1 405 Method Not Allowed",
            ),
            (b"hello\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"GET /metrics SMTP\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"HEAD /healthz HTTP/1.1\r\n\r\n", "HTTP/1.1 200 OK"),
        ];
        for (req, want) in cases {
            let resp = http_raw(&admin, req).await.unwrap();
            assert_eq!(status(resp), want, "{}", String::from_utf8_lossy(req));
        }
        // An endless header is cut off, not buffered.
        let mut s = TcpStream::connect(admin.as_str()).await.unwrap();
        let junk = vec![b'x'; 64 * 1024];
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nX: ").await;
        let _ = s.write_all(&junk).await;
        let _ = s.shutdown().await;
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp).await;
        assert!(
            String::from_utf8_lossy(&resp).starts_with("HTTP/1.1 431"),
            "{}",
            String::from_utf8_lossy(&resp)
        );
        // The admin listener still serves.
        assert_eq!(http_get(&admin, "/healthz").await.unwrap().0, 200);
    })
    .await;
}

/// Hundreds of idle connections on the admin port (a scanner, a broken
/// client) must not starve liveness and readiness probes: an orchestrator
/// would restart a healthy proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_fast_beside_500_idle_admin_connections() {
    let echo = Backend::echo("echo").await;
    let proxy = Proxy::spawn(
        "copy",
        &[AppSpec::new("web", 1, vec![echo.target()])],
        &["--admin-address", "127.0.0.1:0"],
    )
    .await;
    let admin = admin_addr(&proxy);
    bounded(30, "idle admin connections", async {
        let mut idle = Vec::new();
        for _ in 0..500 {
            idle.push(TcpStream::connect(admin.as_str()).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for path in ["/healthz", "/readyz", "/healthz"] {
            let started = Instant::now();
            let (code, _) = http_get(&admin, path).await.unwrap();
            let took = started.elapsed();
            assert_eq!(code, 200, "{path}");
            assert!(took < Duration::from_millis(100), "{path} took {took:?}");
        }
        // And 200 that send a whole request, then neither read the answer
        // nor close: each held one of the 64 answering slots for the
        // lingering close's second, and the probe waited behind them.
        let mut asked = Vec::new();
        for _ in 0..200 {
            let mut s = TcpStream::connect(admin.as_str()).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            asked.push(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let (code, _) = http_get(&admin, "/healthz").await.unwrap();
        let took = started.elapsed();
        assert_eq!(code, 200);
        assert!(
            took < Duration::from_millis(500),
            "/healthz took {took:?} behind 200 asked"
        );
        drop(asked);
        drop(idle);
    })
    .await;
}

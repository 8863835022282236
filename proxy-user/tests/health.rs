//! Per-app health checks (`Apps[].HealthCheck`) through the real binary:
//! send/expect probes catch a target that accepts and hangs, and probes
//! carry the PROXY header when the app sends one.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const V2_LOCAL: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";

/// Answers `PONG` to `PING` after exactly `header`; closes on anything else.
async fn pong(mut s: TcpStream, header: &'static [u8]) {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        got.extend_from_slice(&buf[..n]);
        let head = header.len().min(got.len());
        if got[..head] != header[..head] {
            return;
        }
        if got[head..].windows(4).any(|w| w == b"PING") {
            let _ = s.write_all(b"+PONG\r\n").await;
            return;
        }
    }
}

/// Accepts and reads, never answers.
async fn hang(mut s: TcpStream) {
    let mut buf = [0u8; 1024];
    while let Ok(1..) = s.read(&mut buf).await {}
}

fn check(interval_ms: u64, timeout_ms: u64, fall: u32) -> serde_json::Value {
    serde_json::json!({
        "Interval": format!("{interval_ms}ms"), "Timeout": format!("{timeout_ms}ms"),
        "Rise": 1, "Fall": fall, "Send": "PING\r\n", "Expect": "+PONG"
    })
}

fn app(name: &str, targets: Vec<String>, check: Option<serde_json::Value>) -> AppSpec {
    let mut a = AppSpec::new(name, 1, targets);
    if let Some(c) = check {
        a.extra.insert("HealthCheck".into(), c);
    }
    a
}

/// (state, consecutive_successes) of `target` in `app`, from /targets.
async fn state(admin: &str, app: &str, target: &str) -> (String, u64) {
    let (_, body) = http_get(admin, "/targets").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let t = v["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["app"] == app)
        .and_then(|a| {
            a["targets"]
                .as_array()?
                .iter()
                .find(|t| t["target"] == target)
                .cloned()
        })
        .unwrap_or_else(|| panic!("{app}/{target} not in {body}"));
    (
        t["state"].as_str().unwrap().to_string(),
        t["consecutive_successes"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_target_is_marked_down_within_fall_times_interval() {
    let hanging = Backend::with("hang", hang).await;
    let healthy = Backend::with("pong", |s| pong(s, b"")).await;
    let (interval, timeout, fall) = (300, 200, 3);
    let mut proxy = Proxy::spawn(
        "copy",
        &[
            app(
                "web",
                vec![hanging.target(), healthy.target()],
                Some(check(interval, timeout, fall)),
            ),
            // The same hanging target behind connect-only probes: up, which
            // is why send/expect exists.
            app("tcp", vec![hanging.target()], None),
        ],
        &[
            "--admin-address",
            "127.0.0.1:0",
            "--health-interval",
            "300ms",
        ],
    )
    .await;
    proxy.wait_ready().await.unwrap();
    let started = Instant::now();
    let admin = admin_addr(&proxy);
    // The first probe comes within the first interval (random start), the
    // fall-th one (fall - 1) intervals later and fails after the timeout.
    let bound = Duration::from_millis(fall as u64 * interval + timeout);
    let took = bounded(20, "marked down", async {
        loop {
            if state(&admin, "web", &hanging.target()).await.0 == "down" {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Slack for scheduling on a loaded machine, not for the probes.
    assert!(
        took <= bound + Duration::from_millis(700),
        "marked down after {took:?}, bound {bound:?}"
    );
    let down_line = proxy
        .log_lines()
        .into_iter()
        .find(|l| l["message"] == "target is down" && l["app"] == "web")
        .expect("a 'target is down' line");
    let reason = down_line["reason"].as_str().unwrap();
    assert!(
        reason.contains("expect probes failed") && reason.contains("+PONG"),
        "{reason}"
    );
    // Meanwhile the answering target stays up, and so does the hanging one
    // where only connects are checked.
    assert_eq!(state(&admin, "web", &healthy.target()).await.0, "up");
    assert_eq!(state(&admin, "tcp", &hanging.target()).await.0, "up");
    // Clients of web go to the target that answers.
    for _ in 0..5 {
        let mut s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        s.write_all(b"PING\r\n").await.unwrap();
        let mut reply = String::new();
        bounded(5, "reply", s.read_to_string(&mut reply))
            .await
            .unwrap();
        assert_eq!(reply, "+PONG\r\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_send_the_proxy_header_when_the_app_does() {
    let v1 = Backend::with("v1", |s| pong(s, b"PROXY UNKNOWN\r\n")).await;
    let v2 = Backend::with("v2", |s| pong(s, V2_LOCAL)).await;
    let mut apps = vec![
        app("v1", vec![v1.target()], Some(check(100, 80, 2))),
        app("v2", vec![v2.target()], Some(check(100, 80, 2))),
        // The v2 target behind an app that sends no header: its probes fail.
        app("plain", vec![v2.target()], Some(check(100, 80, 2))),
    ];
    apps[0].proxy_protocol = Some("v1");
    apps[1].proxy_protocol = Some("v2");
    let mut proxy = Proxy::spawn("copy", &apps, &["--admin-address", "127.0.0.1:0"]).await;
    proxy.wait_ready().await.unwrap();
    let admin = admin_addr(&proxy);
    bounded(20, "probes", async {
        loop {
            let (v1_state, v1_ok) = state(&admin, "v1", &v1.target()).await;
            let (v2_state, v2_ok) = state(&admin, "v2", &v2.target()).await;
            let (plain, _) = state(&admin, "plain", &v2.target()).await;
            if v1_ok >= 5 && v2_ok >= 5 && plain == "down" {
                assert_eq!((v1_state.as_str(), v2_state.as_str()), ("up", "up"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

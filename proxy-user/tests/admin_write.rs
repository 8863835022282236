//! The admin write API through the real binary: taking a target out of
//! rotation (drain, disable) and back (enable), with the token from a file.

#[macro_use]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "d41d8cd98f00b204e9800998ecf8427e";

async fn post(admin: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    http_request(admin, "POST", path, &auth).await.unwrap()
}

/// A connection that reached its backend: 8 bytes echoed back.
async fn live(addr: std::net::SocketAddr, i: u64) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&i.to_be_bytes()).await.unwrap();
    let mut back = [0u8; 8];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(u64::from_be_bytes(back), i);
    s
}

fn target_entry(targets: &str, target: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(targets).unwrap();
    v["apps"][0]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == target)
        .cloned()
        .unwrap_or_else(|| panic!("{target} not in {targets}"))
}

/// A drained target gets no new connection, through a reload too, while
/// the 50 that were live finish byte-exact; enabled again, it gets new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drained_target_gets_no_new_connections_while_live_ones_finish() {
    let a = Backend::echo("a").await;
    let b = Backend::echo("b").await;
    let token = write_temp("token", &format!("{TOKEN}\n"));
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut spec = AppSpec::new("web", 1, vec![a.target(), b.target()]);
    spec.balance = Some("round_robin");
    let token_arg = token.display().to_string();
    let mut proxy = Proxy::spawn(
        "splice",
        &[spec],
        &[
            "--admin-address",
            "127.0.0.1:0",
            "--admin-token-file",
            &token_arg,
            // No probe during the test: a backend's accept count is clients only.
            "--health-interval",
            "1h",
        ],
    )
    .await;
    proxy.wait_ready().await.unwrap();
    let admin = admin_addr(&proxy);
    let addr = proxy.addr(0, 0);
    let drain_a = format!("/targets/web/{}/drain", a.target());
    bounded(50, "drain", async {
        let mut conns = Vec::new();
        for i in 0..50 {
            conns.push(live(addr, i).await);
        }
        assert!(
            a.active.load(Ordering::SeqCst) >= 20,
            "round robin put live connections on a"
        );

        // Refused without the token, or with a wrong one.
        assert_eq!(post(&admin, &drain_a, None).await.0, 401);
        assert_eq!(post(&admin, &drain_a, Some("wrong")).await.0, 401);
        let (code, body) = post(&admin, &drain_a, Some(TOKEN)).await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(r#""admin_state": "drain""#), "{body}");

        let before = a.accepted.load(Ordering::SeqCst);
        for i in 0..50 {
            echo_check(addr, 1000 + i, 10_000).await.unwrap();
        }
        assert_eq!(
            a.accepted.load(Ordering::SeqCst),
            before,
            "a drained target got new connections"
        );

        // A reload that rebuilds the app keeps the state.
        let reloads = |text: &str| metric(text, "proxy_config_reloads_total");
        let (_, m) = http_get(&admin, "/metrics").await.unwrap();
        let reloaded = reloads(&m);
        let mut spec = AppSpec::new("web", 1, vec![a.target(), b.target()]);
        spec.balance = Some("least_conn");
        std::fs::write(&proxy.config_path, config_json(&[spec], &proxy.ports)).unwrap();
        loop {
            let (_, m) = http_get(&admin, "/metrics").await.unwrap();
            if reloads(&m) > reloaded {
                let series = format!(
                    r#"proxy_target_admin_state{{app="web",target="{}",state="drain"}}"#,
                    a.target()
                );
                assert_eq!(metric(&m, &series), 1.0);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (_, targets) = http_get(&admin, "/targets").await.unwrap();
        assert_eq!(target_entry(&targets, &a.target())["admin_state"], "drain");
        assert_eq!(
            target_entry(&targets, &b.target())["admin_state"],
            "enabled"
        );
        for i in 0..20 {
            echo_check(addr, 2000 + i, 10_000).await.unwrap();
        }
        assert_eq!(
            a.accepted.load(Ordering::SeqCst),
            before,
            "drain did not survive the reload"
        );

        // The live ones finish, byte-exact, on both targets.
        let finishing: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, s)| tokio::spawn(echo_check_stream(s, 3000 + i as u64, 200_000)))
            .collect();
        for f in finishing {
            f.await.unwrap().unwrap();
        }

        // Disabled and enabled again: back in rotation.
        let path = |action: &str| format!("/targets/web/{}/{action}", a.target());
        assert_eq!(post(&admin, &path("disable"), Some(TOKEN)).await.0, 200);
        let (_, targets) = http_get(&admin, "/targets").await.unwrap();
        assert_eq!(
            target_entry(&targets, &a.target())["admin_state"],
            "disabled"
        );
        assert_eq!(post(&admin, &path("enable"), Some(TOKEN)).await.0, 200);
        for i in 0..10 {
            echo_check(addr, 4000 + i, 1_000).await.unwrap();
        }
        assert!(
            a.accepted.load(Ordering::SeqCst) > before,
            "an enabled target gets connections again"
        );
        assert_eq!(
            post(&admin, "/targets/web/nope:1/drain", Some(TOKEN))
                .await
                .0,
            404
        );
    })
    .await;
}

/// Without --admin-token-file the write API is off, whatever is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_off_without_a_token_file() {
    let a = Backend::echo("a").await;
    let proxy = Proxy::start(
        "copy",
        &[AppSpec::new("web", 1, vec![a.target()])],
        &["--admin-address", "127.0.0.1:0"],
    )
    .await;
    let admin = admin_addr(&proxy);
    let (code, body) = post(
        &admin,
        &format!("/targets/web/{}/drain", a.target()),
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("--admin-token-file"), "{body}");
}

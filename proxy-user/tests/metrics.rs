//! Prometheus metrics endpoint.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

planes!(metrics_count_connections_bytes_and_health);

async fn scrape(proxy: &Proxy) -> String {
    let (code, text) = http_get(&admin_addr(proxy), "/metrics").await.unwrap();
    assert_eq!(code, 200, "{text}");
    text
}

fn value(text: &str, series: &str) -> u64 {
    metric(text, series) as u64
}

async fn metrics_count_connections_bytes_and_health(mode: &str) {
    let echo = Backend::echo("echo").await;
    let dead = dead_target();
    let proxy = Proxy::start(
        mode,
        &[
            AppSpec::new("web", 1, vec![echo.target(), dead.clone()]),
            AppSpec::new("gone", 1, vec![dead_target()]),
        ],
        &[
            // The old name of --admin-address, kept as an alias.
            "--metrics-address",
            "127.0.0.1:0",
            "--health-interval",
            "100ms",
        ],
    )
    .await;
    bounded(30, "metrics", async {
        for i in 0..5 {
            echo_check(proxy.addr(0, 0), i, 10_000).await.unwrap();
        }
        // An app whose only target is dead: the client is reset, which
        // can come before connect() returns.
        if let Ok(mut s) = TcpStream::connect(proxy.addr(1, 0)).await {
            let mut b = [0u8; 1];
            assert!(matches!(s.read(&mut b).await, Ok(0) | Err(_)));
        }
        let held = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        // Let the connection lines land and probes run.
        proxy.wait_conn_lines(6, 5).await;
        tokio::time::sleep(Duration::from_millis(400)).await;

        let text = scrape(&proxy).await;
        assert_eq!(
            value(&text, r#"proxy_connections_total{app="web",end="closed"}"#),
            5
        );
        assert_eq!(
            value(
                &text,
                r#"proxy_connections_total{app="gone",end="connect_failed"}"#
            ),
            1
        );
        assert_eq!(value(&text, r#"proxy_connections_active{app="web"}"#), 1);
        assert_eq!(
            value(
                &text,
                r#"proxy_bytes_total{app="web",direction="client_to_target"}"#
            ),
            50_000
        );
        assert_eq!(
            value(
                &text,
                r#"proxy_bytes_total{app="web",direction="target_to_client"}"#
            ),
            50_000
        );
        let up = format!(r#"proxy_target_up{{app="web",target="{}"}}"#, echo.target());
        assert_eq!(value(&text, &up), 1);
        let down = format!(r#"proxy_target_up{{app="web",target="{dead}"}}"#);
        assert_eq!(value(&text, &down), 0);
        let active = format!(
            r#"proxy_target_active_connections{{app="web",target="{}"}}"#,
            echo.target()
        );
        assert_eq!(value(&text, &active), 1);
        drop(held);
    })
    .await;
}

/// An app a reload removes takes its series out of `/metrics`, and an
/// app of that name added later starts from 0. An app the reload keeps
/// keeps its counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_app_leaves_metrics() {
    let echo = Backend::echo("echo").await;
    let proxy = Proxy::start(
        "copy",
        &[
            AppSpec::new("kept", 1, vec![echo.target()]),
            AppSpec::new("gone", 1, vec![echo.target()]),
        ],
        &["--admin-address", "127.0.0.1:0"],
    )
    .await;
    let closed = |app: &str| format!(r#"proxy_connections_total{{app="{app}",end="closed"}}"#);
    bounded(30, "app removal", async {
        echo_check(proxy.addr(0, 0), 1, 1000).await.unwrap();
        echo_check(proxy.addr(1, 0), 2, 1000).await.unwrap();
        proxy.wait_conn_lines(2, 5).await;
        let text = scrape(&proxy).await;
        assert_eq!(value(&text, &closed("gone")), 1, "{text}");

        let kept = serde_json::json!({"Name": "kept", "Ports": [proxy.ports[0][0]], "Targets": [echo.target()]});
        let only_kept = serde_json::json!({ "Apps": [kept] });
        std::fs::write(&proxy.config_path, only_kept.to_string()).unwrap();
        proxy.signal(libc::SIGHUP);
        wait_for_log(&proxy, "config reloaded", 1).await;
        let text = scrape(&proxy).await;
        assert!(!text.contains(r#"app="gone""#), "{text}");
        assert_eq!(value(&text, &closed("kept")), 1, "{text}");

        let port = free_ports(1)[0];
        let back = serde_json::json!({"Apps": [kept, {"Name": "gone", "Ports": [port], "Targets": [echo.target()]}]});
        std::fs::write(&proxy.config_path, back.to_string()).unwrap();
        proxy.signal(libc::SIGHUP);
        wait_for_log(&proxy, "config reloaded", 2).await;
        let text = scrape(&proxy).await;
        assert!(text.contains(&format!("{} 0\n", closed("gone"))), "{text}");
        assert_eq!(value(&text, &closed("kept")), 1, "{text}");
    })
    .await;
}

async fn wait_for_log(proxy: &Proxy, needle: &str, count: usize) {
    for _ in 0..500 {
        if proxy.log().matches(needle).count() >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no {needle:?} in log:\n{}", proxy.log());
}

//! SIGHUP reload: config changes apply without dropping live connections;
//! a bad config is rejected and the running one stays.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::net::TcpStream;

planes!(
    sighup_reload_applies_without_dropping,
    bad_reload_keeps_running_config
);

async fn wait_log(proxy: &Proxy, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.log().matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in log:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn id_via(port: u16) -> std::io::Result<(String, TcpStream)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let id = read_id(&mut s).await?;
    Ok((id, s))
}

async fn sighup_reload_applies_without_dropping(mode: &str) {
    let a = Backend::identify("a").await;
    let b = Backend::identify("b").await;
    let c = Backend::identify("c").await;
    let proxy = Proxy::start(
        mode,
        &[
            AppSpec::new("one", 2, vec![a.target()]),
            AppSpec::new("two", 1, vec![c.target()]),
        ],
        &[],
    )
    .await;
    let (kept_port, dropped_port, two_port) =
        (proxy.ports[0][0], proxy.ports[0][1], proxy.ports[1][0]);
    bounded(60, "reload", async {
        let (id, live_kept) = id_via(kept_port).await.unwrap();
        assert_eq!(id, "a");
        let (id, live_dropped) = id_via(dropped_port).await.unwrap();
        assert_eq!(id, "a");

        // One: retargeted to b, loses a port, gains one. Two: unchanged.
        // Three: new app on a new port.
        let new = free_ports(2);
        let config = serde_json::json!({"Apps": [
            {"Name": "one", "Ports": [kept_port, new[0]], "Targets": [b.target()]},
            {"Name": "two", "Ports": [two_port], "Targets": [c.target()]},
            {"Name": "three", "Ports": [new[1]], "Targets": [c.target()], "Balance": "round_robin"},
        ]});
        std::fs::write(&proxy.config_path, config.to_string()).unwrap();
        proxy.signal(libc::SIGHUP);
        wait_log(&proxy, "config reloaded", 1).await;

        assert_eq!(
            id_via(kept_port).await.unwrap().0,
            "b",
            "kept port follows the new targets"
        );
        assert_eq!(
            id_via(new[0]).await.unwrap().0,
            "b",
            "added port serves its app"
        );
        assert_eq!(id_via(new[1]).await.unwrap().0, "c", "added app serves");
        assert_eq!(
            id_via(two_port).await.unwrap().0,
            "c",
            "unchanged app still serves"
        );
        assert!(
            TcpStream::connect(("127.0.0.1", dropped_port))
                .await
                .is_err(),
            "removed port still open"
        );

        // Connections made before the reload carry on, both directions intact.
        echo_check_stream(live_kept, 1, 1 << 20).await.unwrap();
        echo_check_stream(live_dropped, 2, 1 << 20).await.unwrap();
    })
    .await;
    let log = proxy.log();
    assert!(
        log.contains("app changed") && log.contains("listener closed"),
        "{log}"
    );
}

async fn bad_reload_keeps_running_config(mode: &str) {
    let a = Backend::identify("a").await;
    let proxy = Proxy::start(mode, &[AppSpec::new("one", 1, vec![a.target()])], &[]).await;
    let port = proxy.ports[0][0];
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    bounded(60, "bad reload", async {
        let (_, live) = id_via(port).await.unwrap();
        let bad_configs = [
            // Invalid: port out of range.
            serde_json::json!({"Apps": [{"Name": "one", "Ports": [port, 70000], "Targets": ["127.0.0.1:1"]}]}).to_string(),
            // Valid, but a new port cannot be bound: all or nothing.
            serde_json::json!({"Apps": [{"Name": "one", "Ports": [port], "Targets": ["127.0.0.1:1"]},
                                        {"Name": "two", "Ports": [taken_port], "Targets": ["127.0.0.1:1"]}]}).to_string(),
            "{ not json".to_string(),
        ];
        for (i, bad) in bad_configs.iter().enumerate() {
            std::fs::write(&proxy.config_path, bad).unwrap();
            proxy.signal(libc::SIGHUP);
            wait_log(&proxy, "config reload rejected", i + 1).await;
            // Still the old config: same target, no half-applied change.
            assert_eq!(id_via(port).await.unwrap().0, "a");
        }
        echo_check_stream(live, 3, 100_000).await.unwrap();
    })
    .await;
    let log = proxy.log();
    assert!(
        log.contains("Apps[0].Ports[1]") && log.contains(&taken_port.to_string()),
        "{log}"
    );
    drop(taken);
}

/// A valid config whose new port another process holds for now is tried
/// again until the port is free: nobody has to touch the file or send a
/// signal. It used to count as tried, so the same text (a re-save, the file
/// watch) did nothing, and the app was never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_taken_at_reload_is_bound_once_free() {
    let a = Backend::identify("a").await;
    let b = Backend::identify("b").await;
    let proxy = Proxy::start("copy", &[AppSpec::new("one", 1, vec![a.target()])], &[]).await;
    let port = proxy.ports[0][0];
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let later = taken.local_addr().unwrap().port();
    bounded(60, "a port free later", async {
        let config = serde_json::json!({"Apps": [
            {"Name": "one", "Ports": [port], "Targets": [a.target()]},
            {"Name": "two", "Ports": [later], "Targets": [b.target()]},
        ]});
        std::fs::write(&proxy.config_path, config.to_string()).unwrap();
        proxy.signal(libc::SIGHUP);
        wait_log(&proxy, "config reload rejected for now", 1).await;
        assert_eq!(id_via(port).await.unwrap().0, "a", "the old config serves");
        drop(taken);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match id_via(later).await {
                Ok((id, _)) => {
                    assert_eq!(id, "b");
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "{later} never served: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(proxy.log().contains("config reloaded"), "{}", proxy.log());
}

/// A config path turned into a FIFO is refused at once, by the file watch
/// and by SIGHUP alike; reading it used to block the reload for good, and
/// with it every later signal, SIGTERM included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_refuses_a_fifo_at_once_and_still_stops() {
    let a = Backend::identify("a").await;
    let mut proxy = Proxy::spawn("copy", &[AppSpec::new("one", 1, vec![a.target()])], &[]).await;
    let port = proxy.ports[0][0];
    std::fs::remove_file(&proxy.config_path).unwrap();
    let c = std::ffi::CString::new(proxy.config_path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo only reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    bounded(5, "reload onto a FIFO", async {
        wait_log(&proxy, "config reload rejected", 1).await;
        proxy.signal(libc::SIGHUP);
        wait_log(&proxy, "config reload rejected", 2).await;
    })
    .await;
    let log = proxy.log();
    assert!(
        log.contains("is a FIFO (named pipe), not a regular file")
            && log.contains("\"trigger\":\"file change\"")
            && log.contains("\"trigger\":\"SIGHUP\""),
        "{log}"
    );
    bounded(5, "still serving", async {
        assert_eq!(id_via(port).await.unwrap().0, "a");
    })
    .await;
    proxy.signal(libc::SIGTERM);
    assert!(
        proxy.wait_exit(5).await.is_some(),
        "still running 5 s after SIGTERM"
    );
}

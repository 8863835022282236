//! `--steering sk_lookup`: one listening socket serves every configured port
//! (ranges of any size) through a BPF sk_lookup program; reloads rewrite the
//! port map; without the privileges it exits with the reason. Each proxy
//! steers its own 127.0.0.x, so its ranges never catch other tests' traffic.

#[macro_use]
mod common;
mod steering_util;

use std::time::{Duration, Instant};

use common::*;
use steering_util::*;
use tokio::net::TcpStream;

planes!(two_apps_with_ranges_and_reload);

/// The ids of the BPF links the process holds to a network namespace
/// (sk_lookup attachments), from the fdinfo the kernel writes for each link.
fn netns_links(pid: i32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter(|info| info.lines().any(|l| l == "link_type:\tnetns"))
        .filter_map(|info| {
            let id = info.lines().find_map(|l| l.strip_prefix("link_id:\t"))?;
            Some(id.to_string())
        })
        .collect()
}

/// Sockets the process holds, from /proc (listeners and connections).
fn socket_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_ports_one_listener() {
    let a = Backend::identify("a").await;
    let b = Backend::identify("b").await;
    let ip = loopback_ip();
    let base = base_port();
    let wide = format!("{}-{}", base, base + 9_999);
    let config = serde_json::json!({"Apps": [
        {"Name": "wide", "Ports": [wide], "Targets": [a.target()]},
        {"Name": "single", "Ports": [base + 10_000], "Targets": [b.target()]},
    ]});
    let proxy = spawn_proxy(
        &config.to_string(),
        &[
            "--listen-address",
            &ip,
            "--steering",
            "sk_lookup",
            "--mode",
            "copy",
        ],
    )
    .await;
    let ready = proxy
        .log_lines()
        .into_iter()
        .find(|l| l["message"] == "proxy ready")
        .unwrap();
    assert_eq!(ready["steering"], "sk_lookup", "{ready}");
    assert_eq!(ready["ports"], 10_001, "{ready}");
    bounded(60, "10k ports", async {
        let mut sample: Vec<u16> = (0..50).map(|_| base + fastrand::u16(..10_000)).collect();
        sample.extend([base, base + 9_999]);
        for port in sample {
            let got = id_at(&format!("{ip}:{port}")).await;
            assert_eq!(got.unwrap(), "a", "port {port}");
        }
        assert_eq!(
            id_at(&format!("{ip}:{}", base + 10_000)).await.unwrap(),
            "b"
        );
        // Just outside the ranges: nobody listens there.
        assert!(TcpStream::connect(format!("{ip}:{}", base + 10_001))
            .await
            .is_err());
        if base > 1 {
            assert!(TcpStream::connect(format!("{ip}:{}", base - 1))
                .await
                .is_err());
        }
        // A few connections held open: the socket count stays tiny.
        let mut held = Vec::new();
        for i in 0..5 {
            let mut s = TcpStream::connect(format!("{ip}:{}", base + i * 1_000))
                .await
                .unwrap();
            assert_eq!(read_id(&mut s).await.unwrap(), "a");
            held.push(s);
        }
        let sockets = socket_fds(proxy.pid());
        assert!(
            sockets < 40,
            "10,001 ports should need one listening socket, the proxy holds {sockets} sockets"
        );
        for s in held {
            echo_check_stream(s, 9, 100_000).await.unwrap();
        }
    })
    .await;
}

async fn two_apps_with_ranges_and_reload(mode: &str) {
    let a = Backend::identify("a").await;
    let b = Backend::identify("b").await;
    let ip = loopback_ip();
    let base = base_port();
    let r = |from: u16, to: u16| format!("{}-{}", base + from, base + to);
    let config = serde_json::json!({"Apps": [
        {"Name": "x", "Ports": [r(0, 499), base + 1_000], "Targets": [a.target()]},
        {"Name": "y", "Ports": [r(500, 999)], "Targets": [b.target()]},
    ]});
    let proxy = spawn_proxy(
        &config.to_string(),
        &[
            "--listen-address",
            &ip,
            "--steering",
            "sk_lookup",
            "--mode",
            mode,
        ],
    )
    .await;
    let at = |off: u16| format!("{ip}:{}", base + off);
    let attached = bounded(60, "two apps", async {
        for off in [0, 1, 250, 499, 1_000] {
            assert_eq!(id_at(&at(off)).await.unwrap(), "a", "offset {off}");
        }
        for off in [500, 501, 750, 999] {
            assert_eq!(id_at(&at(off)).await.unwrap(), "b", "offset {off}");
        }
        let mut live_x = TcpStream::connect(at(1_000)).await.unwrap();
        assert_eq!(read_id(&mut live_x).await.unwrap(), "a");
        let mut live_y = TcpStream::connect(at(600)).await.unwrap();
        assert_eq!(read_id(&mut live_y).await.unwrap(), "b");

        // File change: x takes 500-599 from y, loses 1000; y gains 2000-2999.
        let config = serde_json::json!({"Apps": [
            {"Name": "x", "Ports": [r(0, 599)], "Targets": [a.target()]},
            {"Name": "y", "Ports": [r(600, 999), r(2_000, 2_999)], "Targets": [b.target()]},
        ]});
        let attached = netns_links(proxy.pid());
        assert_eq!(attached.len(), 1, "one sk_lookup link: {attached:?}");
        replace_config(&proxy, &config.to_string());
        // PORTS is rewritten entry by entry, so each port switches on its
        // own; every one must follow within the second.
        for (off, want) in [
            (550, "a"),
            (0, "a"),
            (599, "a"),
            (600, "b"),
            (999, "b"),
            (2_000, "b"),
            (2_999, "b"),
        ] {
            time_until_id(&at(off), want, Duration::from_secs(1)).await;
        }
        let removing = Instant::now();
        while TcpStream::connect(at(1_000)).await.is_ok() {
            assert!(
                removing.elapsed() < Duration::from_secs(1),
                "removed port still steered after 1 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Connections from before the reload carry on, both ways intact,
        // including one on the port that moved and one on the removed port.
        echo_check_stream(live_x, 1, 1 << 20).await.unwrap();
        echo_check_stream(live_y, 2, 1 << 20).await.unwrap();
        attached
    })
    .await;
    let log = proxy.log();
    assert!(log.contains("sk_lookup ports updated"), "{log}");
    // The reload rewrote the map: the program is still attached once, by
    // the same link.
    assert_eq!(netns_links(proxy.pid()), attached, "{log}");
}

/// A target on a steered port at the steered address would be steered
/// straight back into the proxy: sk_lookup picks our socket before any
/// listener is looked up. Validation refuses the address written out, so
/// this names it the way only a resolver reads it (`127.x` is 127.0.0.x to
/// inet_aton), on another port of the same range: the connect-time guard
/// knows every steered port and refuses it with reason `loop`, and no
/// internal connection is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_on_a_steered_port_is_refused_at_connect() {
    let ip = loopback_ip();
    let last = ip.rsplit('.').next().unwrap();
    let base = base_port();
    let target = format!("127.{last}:{}", base + 7);
    let config = serde_json::json!({"Apps": [
        {"Name": "self", "Ports": [format!("{}-{}", base, base + 9)], "Targets": [target]},
    ]});
    let proxy = spawn_proxy(
        &config.to_string(),
        &[
            "--listen-address",
            &ip,
            "--steering",
            "sk_lookup",
            "--mode",
            "copy",
            "--admin-address",
            "127.0.0.1:0",
        ],
    )
    .await;
    let addr = format!("{ip}:{base}").parse().unwrap();
    assert_refused_as_a_loop(&proxy, addr, "self", &target).await;
}

/// Port ranges beyond the per-listener bound are refused in listener mode,
/// with the way out in the message.
#[tokio::test]
async fn listener_mode_refuses_a_huge_range() {
    let config = write_temp(
        "config.json",
        r#"{"Apps":[{"Name":"a","Ports":["20000-29999"],"Targets":["127.0.0.1:1"]}]}"#,
    );
    let out = std::process::Command::new(PROXY)
        .arg("--config")
        .arg(&config)
        .args(["--mode", "copy", "--listen-address", "127.0.0.1"])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("10000 ports") && err.contains("--steering sk_lookup"),
        "{err}"
    );
}

/// Without CAP_BPF / CAP_NET_ADMIN (dropped from the bounding set, so even
/// root lacks them after exec) `--steering sk_lookup` exits with the reason.
#[tokio::test]
async fn sk_lookup_without_privileges_exits_with_reason() {
    use std::os::unix::process::CommandExt;
    let config = write_temp(
        "config.json",
        r#"{"Apps":[{"Name":"a","Ports":["20000-29999"],"Targets":["127.0.0.1:1"]}]}"#,
    );
    let mut cmd = std::process::Command::new(PROXY);
    cmd.arg("--config")
        .arg(&config)
        .args(["--mode", "copy", "--steering", "sk_lookup"])
        .args(["--listen-address", &loopback_ip()]);
    // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            for cap in [12, 21, 39] {
                // CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let _ = std::fs::remove_file(&config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--steering sk_lookup")
            && err.contains("CAP_NET_ADMIN")
            && err.contains("CAP_BPF"),
        "{err}"
    );
}

//! What ships next to the binary (deploy/): alert rules that promtool
//! accepts, a dashboard and rules that only name metrics the proxy
//! exports, a default config that passes `proxy --check`; and `--check`
//! itself: every problem, exit 1, and nothing bound.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use common::*;

fn deploy(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

const ALERTS: &str = "prometheus/l4-proxy-alerts.yml";
const DASHBOARD: &str = "grafana/l4-proxy-dashboard.json";

#[test]
fn alert_rules_pass_promtool() {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(deploy(ALERTS))
        .output()
        .expect("promtool (Debian package `prometheus`; `cargo xtask setup` installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `proxy_...` and `process_...` names in `text`; not one that follows a
/// `|`, an alternative in a label matcher's regex (`end!~"limit|proxy_header"`).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let starts_word = i == 0
            || !(bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b'|');
        if starts_word && (rest.starts_with("proxy_") || rest.starts_with("process_")) {
            let len = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(rest.len());
            names.insert(rest[..len].to_string());
            i += len;
        } else {
            i += 1;
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_name_only_exported_metrics() {
    let echo = Backend::echo("echo").await;
    let mut proxy = Proxy::spawn(
        "copy",
        &[AppSpec::new("web", 1, vec![echo.target()])],
        &["--admin-address", "127.0.0.1:0"],
    )
    .await;
    proxy.wait_ready().await.unwrap();
    echo_check(proxy.addr(0, 0), 1, 1000).await.unwrap();
    proxy.wait_conn_lines(1, 10).await;
    let (_, exposed) = http_get(&admin_addr(&proxy), "/metrics").await.unwrap();
    let series: BTreeSet<&str> = exposed
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for file in [ALERTS, DASHBOARD] {
        let text = std::fs::read_to_string(deploy(file)).unwrap();
        if file.ends_with(".json") {
            serde_json::from_str::<serde_json::Value>(&text).expect("dashboard is JSON");
        }
        let names = metric_names(&text);
        assert!(names.len() >= 10, "{file}: {names:?}");
        for name in names {
            assert!(
                series.contains(name.as_str()),
                "{file} names {name}, which /metrics does not have:\n{exposed}"
            );
        }
    }
}

#[test]
fn check_reports_every_problem_and_binds_nothing() {
    let out = Command::new(PROXY)
        .arg("--check")
        .arg(deploy("config.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(": config ok: 1 apps, 1 ports, 2 targets")
    );

    // A port someone holds is no problem for a check: nothing is bound.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let busy = write_temp(
        "busy.json",
        &format!(r#"{{"Apps":[{{"Name":"a","Ports":[{port}],"Targets":["127.0.0.1:1"]}}]}}"#),
    );
    let out = Command::new(PROXY)
        .args(["--listen-address", "127.0.0.1", "-t", "--config"])
        .arg(&busy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = write_temp(
        "bad.json",
        r#"{"Apps":[{"Name":"a b","Ports":[0],"Targets":["x"],"HealthCheck":{"Rise":0}}]}"#,
    );
    let out = Command::new(PROXY)
        .arg("--check")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "4 problems",
        "Apps[0].Name",
        "Apps[0].Ports[0]",
        "Apps[0].Targets[0]",
        "Apps[0].HealthCheck.Rise",
    ] {
        assert!(err.contains(want), "{want} in {err}");
    }
}

/// Every unit's `ExecStartPre` runs as systemd would run it (the binary
/// and the config swapped for the test's, the package's `$PROXY_OPTS`
/// from `deploy/default`) and passes: a unit whose check cannot even
/// parse its flags never starts. (`--check --config FILE` did that: its
/// FILE is a value of `--check`.) The units' flags are kept too, as the
/// check must validate with the flags the proxy runs with.
#[test]
fn the_units_exec_start_pre_passes() {
    let config = deploy("config.json");
    let default = std::fs::read_to_string(deploy("default")).unwrap();
    let opts = default
        .lines()
        .find_map(|l| l.strip_prefix("PROXY_OPTS="))
        .expect("PROXY_OPTS in deploy/default")
        .trim_matches('"')
        .to_string();
    for unit in ["systemd/proxy.service", "l4-proxy.service"] {
        let text = std::fs::read_to_string(deploy(unit)).unwrap();
        // Continuation lines joined, as systemd reads them.
        let joined = text.replace("\\\n", " ");
        let pre = joined
            .lines()
            .find_map(|l| l.strip_prefix("ExecStartPre="))
            .unwrap_or_else(|| panic!("{unit} has no ExecStartPre"));
        let line = pre
            .replace("${CONFIG}", &config.display().to_string())
            .replace("/etc/proxy/config.json", &config.display().to_string())
            .replace("$PROXY_OPTS", &opts);
        let mut words = line.split_whitespace();
        let bin = words.next().unwrap();
        assert!(bin.ends_with("/proxy"), "{unit}: {bin}");
        let out = Command::new(PROXY).args(words).output().unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("config ok"),
            "{unit}: `{line}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

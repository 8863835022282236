//! The binary's startup behaviour: config errors, help, bind failures.

mod common;

use std::process::Command;

use common::*;

fn run_with_config(text: &str) -> (bool, String) {
    let path = write_temp("bad.json", text);
    let out = Command::new(PROXY)
        .args([
            "--mode",
            "copy",
            "--listen-address",
            "127.0.0.1",
            "--config",
        ])
        .arg(&path)
        .output()
        .expect("run proxy");
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (
        out.status.success(),
        stderr.replace(path.to_str().unwrap(), "FILE"),
    )
}

/// Every kind of bad config exits non-zero naming the file, field and value.
#[test]
fn bad_configs_exit_nonzero_naming_the_field() {
    let cases: &[(&str, &[&str])] = &[
        (
            "{\"Apps\": [\n  {\"Name\": \"a\",,}\n]}",
            &["FILE", "invalid JSON", "line 2 column"],
        ),
        (
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:1"]},{"Name":"b","Ports":[2,3,70000],"Targets":["h:1"]}]}"#,
            &["FILE", "Apps[1].Ports[2]", "70000", "between 1 and 65535"],
        ),
        (
            r#"{"Apps":[{"Name":"a","Ports":[4000],"Targets":["h:1"]},{"Name":"b","Ports":[4000],"Targets":["h:1"]}]}"#,
            &["Apps[1].Ports[0]", "4000", "\"a\"", "\"b\""],
        ),
        (
            r#"{"Apps":[{"Name":"a","Ports":[4000]}]}"#,
            &["Apps[0].Targets", "missing"],
        ),
        (
            r#"{"Apps":[{"Name":"a","Ports":[4000],"Targets":[]}]}"#,
            &["Apps[0].Targets", "no targets"],
        ),
        (
            r#"{"Apps":[{"Name":"a","Ports":[4000],"Targets":["example.com"]}]}"#,
            &["Apps[0].Targets[0]", "example.com", "host:port"],
        ),
        (
            r#"{"Apps":[{"Name":"a","Ports":["1-5000"],"Targets":["h:1"]}]}"#,
            &["Apps[0].Ports[0]", "1024"],
        ),
        (r#"{"apps":[]}"#, &["unknown top-level field `apps`"]),
    ];
    for (text, needles) in cases {
        let (ok, stderr) = run_with_config(text);
        assert!(!ok, "accepted bad config {text}");
        for n in *needles {
            assert!(
                stderr.contains(n),
                "for {text}\nstderr: {stderr}\nmissing: {n}"
            );
        }
    }
}

#[test]
fn missing_config_file_is_named() {
    let out = Command::new(PROXY)
        .args(["--mode", "copy", "--config", "/nonexistent/dir/config.json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/dir/config.json"));
}

#[test]
fn help_opens_with_an_explanation_and_shows_defaults() {
    let out = Command::new(PROXY).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.starts_with("A Layer-4 TCP proxy."), "{help}");
    for flag in [
        "--config",
        "--listen-address",
        "--mode",
        "--connect-timeout",
        "--connect-attempts",
        "--connect-deadline",
        "--idle-timeout",
        "--health-interval",
        "--health-rise",
        "--health-fall",
        "--max-connections",
        "--max-connections-per-app",
        "--drain-timeout",
        "--copy-buffer",
        "--log-format",
        "--log-level",
    ] {
        assert!(help.contains(flag), "missing {flag}");
    }
    for default in [
        "[default: 2s]",
        "[default: 5s]",
        "[default: 30s]",
        "[default: 64KiB]",
        "[default: 10m]",
    ] {
        assert!(help.contains(default), "missing {default}");
    }
}

#[test]
fn bad_flag_values_are_rejected() {
    for args in [
        ["--connect-timeout", "5"],
        ["--copy-buffer", "1GiB"],
        ["--health-rise", "0"],
    ] {
        let out = Command::new(PROXY).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
    }
}

/// A port already taken fails startup, naming the app and the port.
#[test]
fn port_in_use_fails_startup_naming_app() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (ok, stderr) = run_with_config(&format!(
        r#"{{"Apps":[{{"Name":"busy","Ports":[{port}],"Targets":["127.0.0.1:1"]}}]}}"#
    ));
    assert!(!ok);
    assert!(
        stderr.contains("busy") && stderr.contains(&port.to_string()),
        "{stderr}"
    );
}

//! The binary's startup behaviour: config errors, help, bind failures,
//! config files that are no config, signals while starting.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The child, killed when the test ends however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    /// Waits up to `limit` for the exit; None if it is still running.
    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Starts the binary with stderr to a file (read with `read_stderr`);
/// `max_memory` caps its address space, so a regression that reads a
/// device without end fails the test instead of the machine.
fn start(args: &[&str], config: &Path, max_memory: Option<u64>) -> (Running, PathBuf) {
    let stderr = write_temp("stderr", "");
    let mut cmd = Command::new(PROXY);
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap());
    if let Some(bytes) = max_memory {
        set_rlimit(&mut cmd, libc::RLIMIT_AS, bytes);
    }
    (Running(cmd.spawn().expect("run proxy")), stderr)
}

fn read_stderr(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let _ = std::fs::remove_file(path);
    text
}

/// Runs the binary on `config` for at most `limit`: (exited non-zero,
/// stderr, time taken). A proxy still running then is killed, and counts
/// as not refused.
fn refused(config: &Path, limit: Duration, max_memory: Option<u64>) -> (bool, String, Duration) {
    let args = ["--mode", "copy", "--listen-address", "127.0.0.1"];
    let started = Instant::now();
    let (mut child, stderr) = start(&args, config, max_memory);
    let status = child.wait_exit(limit);
    let took = started.elapsed();
    drop(child);
    let refused = status.is_some_and(|s| !s.success());
    (refused, read_stderr(&stderr), took)
}

fn run_with_config(text: &str) -> (bool, String) {
    let path = write_temp("bad.json", text);
    let (refused, stderr, _) = refused(&path, Duration::from_secs(10), None);
    let _ = std::fs::remove_file(&path);
    (!refused, stderr.replace(path.to_str().unwrap(), "FILE"))
}

fn mkfifo(what: &str) -> PathBuf {
    let path = write_temp(what, "");
    std::fs::remove_file(&path).unwrap();
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo only reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    path
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
        "--client-fin-timeout",
        "--server-fin-timeout",
        "--health-interval",
        "--health-rise",
        "--health-fall",
        "--max-connections",
        "--max-connections-per-app",
        "--drain-timeout",
        "--copy-buffer",
        "--splice-pipe",
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
        "[default: 256KiB]",
        "[default: 10m]",
        "[default: 1m]",
    ] {
        assert!(help.contains(default), "missing {default}");
    }
}

#[test]
fn bad_flag_values_are_rejected() {
    for args in [
        ["--connect-timeout", "5"],
        ["--copy-buffer", "1GiB"],
        ["--splice-pipe", "1GiB"],
        ["--health-rise", "0"],
    ] {
        let out = Command::new(PROXY).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
    }
}

/// 0 means "never" for the idle and fin timeouts, but for these it would
/// make every connect, probe or first etcd read expire at once (every
/// target down, every client reset): refused, with the flag named.
#[test]
fn zero_where_it_would_expire_at_once_is_refused() {
    for flag in [
        "--connect-timeout",
        "--connect-deadline",
        "--health-interval",
        "--config-etcd-timeout",
    ] {
        let out = Command::new(PROXY).args([flag, "0"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} 0: {err}");
        assert!(
            err.contains(flag) && err.contains("would make it expire at once"),
            "{flag} 0: {err}"
        );
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

/// What is not a small regular file is refused at once, naming the file:
/// a FIFO used to block `open()` for good (SIGTERM ignored), /dev/zero to be
/// read until memory ran out.
#[test]
fn config_must_be_a_small_regular_file() {
    let fifo = mkfifo("config.fifo");
    let big = write_temp("big.json", "");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(17 << 20)
        .unwrap();
    let cases: [(&Path, &str); 3] = [
        (&fifo, "is a FIFO (named pipe), not a regular file"),
        (
            Path::new("/dev/zero"),
            "is a character device, not a regular file",
        ),
        (&big, "is over the size cap of 16 MiB"),
    ];
    for (path, why) in cases {
        let (refused, stderr, took) = refused(path, Duration::from_secs(5), Some(1 << 30));
        assert!(refused, "{} not refused; stderr: {stderr}", path.display());
        assert!(
            took < Duration::from_secs(1),
            "{} refused only after {took:?}",
            path.display()
        );
        assert!(
            stderr.contains(&format!("config file {} {why}", path.display())),
            "stderr: {stderr}"
        );
    }
    let _ = std::fs::remove_file(&fifo);
    let _ = std::fs::remove_file(&big);
}

/// Mistakes a proxy used to start with: duplicated keys (the last one won
/// silently), an app name that splits log lines, a target that is the
/// proxy itself. A URL as target used to be called an IPv6 address.
#[test]
fn config_mistakes_that_used_to_start_are_refused() {
    let ports = free_ports(2);
    let (p, q) = (ports[0], ports[1]);
    let cases: Vec<(String, Vec<String>)> = vec![
        (
            format!(r#"{{"Apps":[{{"Name":"a","Ports":[{p}],"Targets":["127.0.0.1:1"]}}],"Apps":[{{"Name":"b","Ports":[{q}],"Targets":["127.0.0.1:1"]}}]}}"#),
            vec!["FILE: top level: field `Apps` appears twice".into()],
        ),
        (
            format!(r#"{{"Apps":[{{"Name":"a","Ports":[{p}],"Targets":["127.0.0.1:1"],"Ports":[{q}]}}]}}"#),
            vec!["FILE: Apps[0]: field `Ports` appears twice".into()],
        ),
        (
            format!(r#"{{"Apps":[{{"Name":"a\nlevel=error forged","Ports":[{p}],"Targets":["127.0.0.1:1"]}}]}}"#),
            vec![
                "FILE: Apps[0].Name".into(),
                "character '\\n' (at 2)".into(),
                "letters, digits, '.', '_' and '-'".into(),
            ],
        ),
        (
            format!(r#"{{"Apps":[{{"Name":"a","Ports":[{p}],"Targets":["http://127.0.0.1:80"]}}]}}"#),
            vec![
                "FILE: Apps[0].Targets[0]".into(),
                "targets are host:port, without a scheme: write \"127.0.0.1:80\"".into(),
            ],
        ),
        (
            format!(r#"{{"Apps":[{{"Name":"a","Ports":[{p}],"Targets":["127.0.0.1:{p}"]}},{{"Name":"b","Ports":[{q}],"Targets":["localhost:{p}"]}}]}}"#),
            vec![
                "2 problems".into(),
                format!("FILE: Apps[0].Targets[0]: target \"127.0.0.1:{p}\" of app \"a\" is this proxy itself"),
                format!("FILE: Apps[1].Targets[0]: target \"localhost:{p}\" of app \"b\" is this proxy itself"),
                format!("port {p} of app \"a\" at Apps[0].Ports[0]"),
                "point the target at the backend".into(),
            ],
        ),
    ];
    for (text, needles) in &cases {
        let (ok, stderr) = run_with_config(text);
        assert!(!ok, "accepted bad config {text}");
        for n in needles {
            assert!(
                stderr.contains(n.as_str()),
                "for {text}\nstderr: {stderr}\nmissing: {n}"
            );
        }
    }
}

/// A stop signal while start-up waits (here: for the reader of an access
/// log FIFO) ends the process at once; it used to be swallowed until
/// start-up finished, which here is never.
#[test]
fn sigterm_while_starting_exits_promptly() {
    let fifo = mkfifo("access.fifo");
    let port = free_ports(1)[0];
    let config = write_temp(
        "config.json",
        &format!(r#"{{"Apps":[{{"Name":"a","Ports":[{port}],"Targets":["127.0.0.1:1"]}}]}}"#),
    );
    let fifo_arg = fifo.display().to_string();
    let args = [
        "--mode",
        "copy",
        "--listen-address",
        "127.0.0.1",
        "--access-log",
        &fifo_arg,
    ];
    let (mut child, stderr) = start(&args, &config, None);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.wait_exit(Duration::ZERO).is_none(),
        "exited before the signal: {}",
        read_stderr(&stderr)
    );
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = child.wait_exit(Duration::from_secs(2));
    let log = read_stderr(&stderr);
    assert!(
        status.is_some(),
        "still running 2 s after SIGTERM; log: {log}"
    );
    assert!(log.contains("stop signal during start-up"), "{log}");
    assert!(!log.contains("proxy ready"), "{log}");
    let _ = std::fs::remove_file(&fifo);
    let _ = std::fs::remove_file(&config);
}

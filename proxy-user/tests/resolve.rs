//! A resolver that stops answering. Every connect and every health probe
//! to a host-name target looks the name up, and glibc's lookup cannot be
//! cancelled: each used to hold a thread of the proxy's blocking pool until
//! the resolver's own timeout. Now a name has one lookup at a time, so the
//! threads stay few, the resolver is asked once, and clients fail over to
//! a target that works.
//!
//! The proxy runs in a mount namespace of its own, where /etc/resolv.conf
//! names a DNS server this test runs and never answers.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_resolver_is_asked_once_per_name() {
    let (server, queries) = silent_dns().await;
    let resolv = write_temp(
        "resolv.conf",
        &format!("nameserver {server}\noptions timeout:30 attempts:1\n"),
    );
    let good = Backend::echo("good").await;
    let port = free_ports(1)[0];
    let config = write_temp(
        "silent-dns.json",
        &format!(
            r#"{{"Apps":[{{"Name":"app","Ports":[{port}],"Targets":["stuck.name.test:80","{}"]}}]}}"#,
            good.target()
        ),
    );
    let log = write_temp("silent-dns.log", "");
    let mut cmd = Command::new(PROXY);
    cmd.arg("--config")
        .arg(&config)
        .args(["--listen-address", "127.0.0.1", "--mode", "copy"])
        .args(["--log-format", "json", "--admin-address", "127.0.0.1:0"])
        .args(["--health-interval", "100ms", "--connect-timeout", "200ms"])
        .stderr(std::fs::File::create(&log).unwrap());
    with_resolv_conf(&mut cmd, &resolv);
    let mut proxy = Proxy::from_child(cmd.spawn().unwrap(), log, config, "copy");
    proxy.wait_ready().await.expect("starts");
    let threads_at_start = threads(proxy.pid());

    // Probes every 100 ms, and clients meanwhile: before the change each
    // probe and each client that tried the name held a thread for 30 s.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let clients = bounded(60, "100 clients", async {
        let mut tasks = Vec::new();
        for i in 0..100u64 {
            tasks.push(tokio::spawn(echo_check(addr, i, 10_000)));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut failed = Vec::new();
        for t in tasks {
            if let Err(e) = t.await.unwrap() {
                failed.push(e);
            }
        }
        failed
    })
    .await;
    assert!(clients.is_empty(), "clients failed: {clients:?}");

    let threads_now = threads(proxy.pid());
    let asked = queries.load(Ordering::Relaxed);
    let log = proxy.log();
    // One lookup under way: its A and AAAA queries (glibc sends both).
    assert!(
        asked <= 2,
        "the resolver was asked {asked} times for one name; log:\n{log}"
    );
    assert!(
        threads_now <= threads_at_start + 2,
        "the proxy went from {threads_at_start} to {threads_now} threads; log:\n{log}"
    );
    // The name was tried and found wanting: the probes say why.
    assert!(
        log.contains("resolving stuck.name.test:80 timed out"),
        "{log}"
    );
}

/// A UDP server on port 53 of an address of its own in 127/8 that counts
/// the queries it gets and answers none.
async fn silent_dns() -> (std::net::IpAddr, Arc<AtomicUsize>) {
    let mut last = None;
    for _ in 0..20 {
        let (a, b, c) = (fastrand::u8(..), fastrand::u8(..), fastrand::u8(..));
        let ip = std::net::IpAddr::from([127, a.max(1), b, c.max(2)]);
        match tokio::net::UdpSocket::bind((ip, 53)).await {
            Ok(sock) => {
                let queries = Arc::new(AtomicUsize::new(0));
                let counted = queries.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1500];
                    while sock.recv_from(&mut buf).await.is_ok() {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                });
                return (ip, queries);
            }
            Err(e) => last = Some(e),
        }
    }
    panic!("no free port 53 in 127/8: {last:?}");
}

/// Runs the child in a mount namespace of its own whose /etc/resolv.conf
/// is `path`.
fn with_resolv_conf(cmd: &mut Command, path: &Path) {
    let source = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: unshare and mount are plain syscalls on memory prepared
    // before the fork; nothing else runs in the child here.
    unsafe {
        cmd.pre_exec(move || {
            let none = std::ptr::null();
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    none,
                    libc::MS_REC | libc::MS_PRIVATE,
                    none.cast(),
                ) != 0
                || libc::mount(
                    source.as_ptr(),
                    c"/etc/resolv.conf".as_ptr(),
                    none,
                    libc::MS_BIND,
                    none.cast(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

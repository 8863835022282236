//! Connection limits, app isolation and fd exhaustion.

#[macro_use]
mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

planes!(
    flood_on_one_app_does_not_starve_another,
    fifteen_thousand_idle_connections_leave_other_apps_served,
    recovers_from_fd_exhaustion
);

/// App A is flooded far past its per-app limit; app B is served normally
/// and A's backend never sees more than the limit.
async fn flood_on_one_app_does_not_starve_another(mode: &str) {
    let a = Backend::echo("a").await;
    let b = Backend::echo("b").await;
    let proxy = Proxy::start(
        mode,
        &[
            AppSpec::new("flooded", 1, vec![a.target()]),
            AppSpec::new("quiet", 1, vec![b.target()]),
        ],
        &["--max-connections-per-app", "20", "--max-connections", "60"],
    )
    .await;
    bounded(60, "flood", async {
        let mut flood = Vec::new();
        // The kernel completes every handshake; the proxy resets what is
        // over the limit, sometimes before connect() even returns.
        let mut reset_at_connect = 0;
        for _ in 0..200 {
            match TcpStream::connect(proxy.addr(0, 0)).await {
                Ok(s) => flood.push(s),
                Err(_) => reset_at_connect += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let live_a = a.active.load(Ordering::SeqCst);
        assert!(
            live_a <= 20 + 1,
            "flooded app's backend holds {live_a} > limit"
        );
        assert!(live_a >= 18, "limit too eager: only {live_a}");
        // The other app is unaffected.
        for i in 0..30 {
            echo_check(proxy.addr(1, 0), i, 50_000).await.unwrap();
        }
        // Rejected clients were told with a reset (README), not left
        // hanging, and not with a FIN, which would pass for an empty
        // session to a protocol where the server speaks first.
        let mut rejected = reset_at_connect;
        let mut kinds = std::collections::HashMap::<String, usize>::new();
        for s in flood.iter_mut() {
            let mut b = [0u8; 1];
            let r = tokio::time::timeout(Duration::from_millis(20), s.read(&mut b)).await;
            *kinds.entry(format!("{r:?}")).or_default() += 1;
            match r {
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => rejected += 1,
                Ok(Ok(0)) => panic!("a refused client got a FIN: {kinds:?}"),
                _ => {}
            }
        }
        assert!(
            rejected >= 170,
            "only {rejected} of 200 rejected: {kinds:?}"
        );
    })
    .await;
    let log = proxy.log();
    assert!(log.contains("connection limit reached"));
    // Rate-limited: not one warning per rejected connection.
    assert!(log.matches("connection limit reached").count() < 10);
}

/// The proxy runs out of file descriptors (RLIMIT_NOFILE 64), backs off
/// instead of spinning, and serves again once fds are free, without restart.
async fn recovers_from_fd_exhaustion(mode: &str) {
    let echo = Backend::echo("echo").await;
    let mut proxy = Proxy::spawn_with_nofile(
        mode,
        &[AppSpec::new("a", 1, vec![echo.target()])],
        // Above what 64 fds carry (the default would follow the fd limit):
        // this test is about running out of fds anyway.
        &["--health-interval", "10s", "--max-connections", "1000"],
        64,
    )
    .await;
    let pid = proxy.pid();
    bounded(60, "fd exhaustion", async {
        let mut held = Vec::new();
        for _ in 0..100 {
            // A client the proxy could not connect upstream for lack of fds
            // is reset, sometimes before connect() returns.
            match TcpStream::connect(proxy.addr(0, 0)).await {
                Ok(s) => held.push(s),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("{mode}: connect: {e}"),
            }
        }
        // Give the proxy time to hit EMFILE.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !proxy.log().contains("out of resources") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            proxy.log().contains("out of resources"),
            "never hit EMFILE: {}",
            proxy.log()
        );
        // Backing off, not spinning: CPU time stays low while exhausted.
        let cpu0 = cpu_ticks(pid);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let used = cpu_ticks(pid) - cpu0;
        assert!(
            used < 30,
            "proxy burned {used} ticks in 1s while out of fds"
        );
        drop(held);
        // Recovers: new connections are served again, same process.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match echo_check(proxy.addr(0, 0), 5, 100_000).await {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("not recovered after fds were freed: {e}"),
            }
        }
        for i in 0..20 {
            echo_check(proxy.addr(0, 0), i, 10_000).await.unwrap();
        }
    })
    .await;
    assert!(proxy.is_running());
    assert_eq!(proxy.pid(), pid);
    // Our fd shortage must not have marked the healthy target down.
    assert!(!proxy.log().contains("target is down"), "{}", proxy.log());
}

/// A health probe this proxy cannot make for lack of fds is no evidence
/// against its target, as a client's failed connect for that reason is
/// none either. Every fd is held on purpose, one per client, by clients
/// that owe a PROXY header (60 s to send it), so the shortage lasts while
/// probes run every 100 ms and two failures would mark a target down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_fd_shortage_marks_no_target_down() {
    let echo = Backend::echo("echo").await;
    let probed = AppSpec::new("probed", 1, vec![echo.target()]);
    let mut holder = AppSpec::new("holder", 1, vec![echo.target()]);
    holder.extra.insert(
        "AcceptProxyProtocol".into(),
        serde_json::json!({"TrustedSources": ["127.0.0.0/8"], "Timeout": "60s"}),
    );
    let mut proxy = Proxy::spawn_with_nofile(
        "copy",
        &[probed, holder],
        &[
            "--health-interval",
            "100ms",
            "--health-fall",
            "2",
            "--max-connections",
            "1000",
        ],
        64,
    )
    .await;
    let exhausted = |p: &Proxy| p.log().contains("accept failed: out of resources");
    bounded(60, "own fd shortage", async {
        let mut held = Vec::new();
        while !exhausted(&proxy) {
            assert!(held.len() < 64, "64 clients and no EMFILE: {}", proxy.log());
            held.push(TcpStream::connect(proxy.addr(1, 0)).await.unwrap());
            // Accepted (one more fd) or refused an fd (logged) before the next.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        // Every fd is taken and stays taken: probes run into it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !proxy.log().contains("health probe not made") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let log = proxy.log();
        assert!(
            log.contains("health probe not made: this proxy is out of resources"),
            "no probe ran into the shortage: {log}"
        );
        assert!(!log.contains("target is down"), "{log}");
        drop(held);
        // Served again, without a probe streak to wait for.
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = echo_check(proxy.addr(0, 0), 1, 10_000).await {
            assert!(Instant::now() < deadline, "not served again: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(proxy.is_running());
    assert!(!proxy.log().contains("target is down"), "{}", proxy.log());
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// With the default limits and RLIMIT_NOFILE 20,000, 15,000 idle clients
/// spread over three apps: fds never run out (the global limit follows the
/// fd limit and refuses with a reset), and a fourth app is still served.
async fn fifteen_thousand_idle_connections_leave_other_apps_served(mode: &str) {
    // The planes take turns: this process's own 20,000 fds hold one flood.
    static ONE_FLOOD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _alone = ONE_FLOOD.lock().await;
    // The flooded apps' targets never accept: the kernel completes each
    // handshake into the accept queue, so this process (RLIMIT_NOFILE 20,000
    // too, holding the 15,000 clients) spends no fd on the target side.
    let holders: Vec<tokio::net::TcpListener> = (0..3).map(|_| never_accepting()).collect();
    let quiet = Backend::echo("quiet").await;
    let apps: Vec<AppSpec> = holders
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let target = h.local_addr().unwrap().to_string();
            AppSpec::new(&format!("flooded{i}"), 1, vec![target])
        })
        .chain([AppSpec::new("quiet", 1, vec![quiet.target()])])
        .collect();
    let proxy = Proxy::spawn_with_nofile(mode, &apps, &[], 20_000).await;
    bounded(180, "15,000 idle connections", async {
        let mut idle = Vec::with_capacity(15_000);
        for i in 0..15_000 {
            // Refused ones may be reset before connect() returns.
            if let Ok(s) = TcpStream::connect(proxy.addr(i % 3, 0)).await {
                idle.push(s);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..20 {
            echo_check(proxy.addr(3, 0), i, 10_000)
                .await
                .unwrap_or_else(|e| panic!("{mode}: the quiet app is not served: {e}"));
        }
        drop(idle);
    })
    .await;
    let log = proxy.log();
    assert!(
        !log.contains("out of resources"),
        "{mode}: fds ran out under the default limits"
    );
    assert!(log.contains("connection limit reached"), "{mode}");
    drop(holders);
}

/// A listener with the deepest accept queue the kernel allows, never accepted from.
fn never_accepting() -> tokio::net::TcpListener {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    sock.listen(4096).unwrap()
}

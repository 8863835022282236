//! Benchmark, not an assertion: start time (spawn until "proxy ready") and
//! memory for 10,000 ports, one listening socket per port vs one socket and
//! sk_lookup. Runs in the suite (a few seconds); to see the numbers:
//!
//!     cargo test --release -p proxy-user --test steering_bench -- --nocapture

#[macro_use]
mod common;
mod steering_util;

use std::time::{Duration, Instant};

use common::*;
use steering_util::*;

const PORTS: u16 = 10_000;
const RUNS: usize = 3;

struct Sample {
    ready: Duration,
    rss_kib: u64,
    sockets: usize,
}

fn status_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn sockets(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

/// Why a run gave no sample.
enum Failed {
    /// The proxy did not start: a random port range can collide with
    /// another test's ports. Another run is tried.
    Start(String),
    /// It started and a port did not reach the target: a defect.
    Wrong(String),
}

async fn one(steering: &str, base: u16, target: &str) -> Result<Sample, Failed> {
    // Listener mode takes at most 1,024 ports per range entry: ten ranges.
    let ranges: Vec<String> = (0..PORTS / 1_000)
        .map(|i| format!("{}-{}", base + i * 1_000, base + i * 1_000 + 999))
        .collect();
    let config =
        serde_json::json!({"Apps": [{"Name": "bench", "Ports": ranges, "Targets": [target]}]});
    let ip = loopback_ip();
    let started = Instant::now();
    let proxy = spawn_proxy_result(
        &config.to_string(),
        &[
            "--listen-address",
            &ip,
            "--steering",
            steering,
            "--mode",
            "copy",
        ],
    )
    .await
    .map_err(Failed::Start)?;
    let ready = started.elapsed();
    // Settle: probes and allocator warm up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = proxy.pid();
    let port = base + fastrand::u16(..PORTS);
    let id = id_at(&format!("{ip}:{port}"))
        .await
        .map_err(|e| Failed::Wrong(format!("{steering}: port {port}: {e}")))?;
    if id != "t" {
        return Err(Failed::Wrong(format!(
            "{steering}: port {port} answered {id:?}, not the target"
        )));
    }
    Ok(Sample {
        ready,
        rss_kib: status_kib(pid, "VmRSS:"),
        sockets: sockets(pid),
    })
}

/// Like `spawn_proxy`, returning the log instead of panicking.
async fn spawn_proxy_result(config: &str, args: &[&str]) -> Result<Proxy, String> {
    let handle = tokio::spawn({
        let (config, args): (String, Vec<String>) =
            (config.into(), args.iter().map(|s| s.to_string()).collect());
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            spawn_proxy(&config, &args).await
        }
    });
    handle.await.map_err(|e| format!("{e}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn start_time_and_rss_10k_ports() {
    let t = Backend::identify("t").await;
    let mut results: Vec<(&str, Vec<Sample>)> = vec![("listeners", vec![]), ("sk_lookup", vec![])];
    bounded(120, "bench", async {
        for run in 0..RUNS {
            for (steering, samples) in results.iter_mut() {
                let base = 10_000 + fastrand::u16(..10_000);
                match one(steering, base, &t.target()).await {
                    Ok(s) => samples.push(s),
                    Err(Failed::Start(e)) => {
                        eprintln!("run {run} {steering}: did not start, skipped: {e}")
                    }
                    Err(Failed::Wrong(e)) => panic!("run {run}: {e}"),
                }
            }
        }
    })
    .await;
    eprintln!("{PORTS} ports, {RUNS} interleaved runs each, median (min-max):");
    eprintln!(
        "{:<10} {:>22} {:>22} {:>8}",
        "steering", "start until ready ms", "RSS MiB", "sockets"
    );
    for (steering, samples) in &results {
        if samples.is_empty() {
            eprintln!("{steering:<10} no successful run");
            continue;
        }
        let ms: Vec<f64> = samples
            .iter()
            .map(|s| s.ready.as_secs_f64() * 1e3)
            .collect();
        let mib: Vec<f64> = samples.iter().map(|s| s.rss_kib as f64 / 1024.0).collect();
        let range = |v: &[f64]| {
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
            format!("{:.1} ({:.1}-{:.1})", median(v.to_vec()), lo, hi)
        };
        eprintln!(
            "{steering:<10} {:>22} {:>22} {:>8}",
            range(&ms),
            range(&mib),
            samples[0].sockets
        );
    }
    assert!(
        results.iter().all(|(_, s)| !s.is_empty()),
        "each mode ran at least once"
    );
    // What the two modes are: a socket per port, or one socket for all.
    for (steering, samples) in &results {
        for s in samples {
            match *steering {
                "listeners" => assert!(
                    s.sockets >= PORTS as usize,
                    "listeners: {} sockets for {PORTS} ports",
                    s.sockets
                ),
                _ => assert!(
                    s.sockets < 100,
                    "sk_lookup: {} sockets for {PORTS} ports: one per port?",
                    s.sockets
                ),
            }
        }
    }
}

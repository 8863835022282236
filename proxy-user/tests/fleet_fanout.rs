//! How etcd's watch fans out, measured for NOTES §6 (ignored: minutes of
//! load, numbers only; run with
//! `cargo test --release -p proxy-user --test fleet_fanout -- --ignored --nocapture`).
//!
//! - N watchers, each on its own connection as N edges would be: time from
//!   a put to the last watcher seeing it, and etcd's RSS and CPU;
//! - N edges resyncing at once (etcd back after an outage): each reads the
//!   whole table of K apps;
//! - real proxy processes: a change served by all of them.

#[macro_use]
mod common;
mod fleet_util;

use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::*;
use etcd_client::{GetOptions, WatchOptions};
use fleet_util::*;
use serde_json::json;

fn etcd_cpu_rss(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .unwrap_or(0);
    (cpu / hz, rss)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn watch_fan_out() {
    let etcd = Etcd::start().await;
    let pid = etcd.pid().unwrap();
    let mut writer = etcd.client().await.unwrap();
    // A table of K apps, about the size of a real app entry each.
    const K: usize = 1000;
    for k in 0..K {
        let v = json!({"Ports": [10000 + k], "Targets": [format!("10.0.{}.{}:8080", k / 250, k % 250), "10.1.0.1:8080"]});
        writer
            .put(format!("{PREFIX}apps/app{k:04}"), v.to_string(), None)
            .await
            .unwrap();
    }
    println!("table: {K} apps; etcd RSS {} KiB", etcd_cpu_rss(pid).1);
    for n in [10usize, 100, 500] {
        let mut watchers = Vec::new();
        for _ in 0..n {
            let mut c = etcd.client().await.unwrap();
            let s = c
                .watch(PREFIX, Some(WatchOptions::new().with_prefix()))
                .await
                .unwrap();
            watchers.push((c, s));
        }
        let (cpu0, _) = etcd_cpu_rss(pid);
        let mut lat = Vec::new();
        for round in 0..20 {
            let t0 = Instant::now();
            writer
                .put(
                    format!("{PREFIX}apps/app0000"),
                    json!({"Ports":[10000],"Targets":[format!("10.9.9.{round}:80")]}).to_string(),
                    None,
                )
                .await
                .unwrap();
            let mut last = Duration::ZERO;
            for (_, s) in watchers.iter_mut() {
                loop {
                    let r = s.message().await.unwrap().unwrap();
                    if !r.events().is_empty() {
                        break;
                    }
                }
                last = last.max(t0.elapsed());
            }
            lat.push(last);
        }
        let (cpu1, rss) = etcd_cpu_rss(pid);
        let (p50, max) = p50_max(&lat);
        println!(
            "watchers {n:4}: put -> last watcher p50 {p50:.1} ms, max {max:.1} ms; etcd CPU {:.1} ms per change, RSS {rss} KiB",
            (cpu1 - cpu0) * 1000.0 / 20.0
        );
        // Everyone resyncs at once: a whole-table read per edge.
        let (cpu0, _) = etcd_cpu_rss(pid);
        let t0 = Instant::now();
        let reads = watchers.iter().map(|(c, _)| {
            let mut c = c.clone();
            async move {
                c.get(PREFIX, Some(GetOptions::new().with_prefix()))
                    .await
                    .unwrap()
                    .kvs()
                    .len()
            }
        });
        let got = futures_join(reads).await;
        assert!(got.iter().all(|g| *g == K));
        let (cpu1, _) = etcd_cpu_rss(pid);
        println!(
            "watchers {n:4}: all read the {K}-app table at once in {} ms (etcd CPU {:.0} ms)",
            t0.elapsed().as_millis(),
            (cpu1 - cpu0) * 1000.0
        );
    }
}

async fn futures_join<F: std::future::Future<Output = usize> + Send + 'static>(
    fs: impl Iterator<Item = F>,
) -> Vec<usize> {
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// M real proxy processes follow one change; p50 and max over 10 changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn proxies_follow_a_change() {
    const M: usize = 30;
    let b1 = Backend::identify("b1").await;
    let b2 = Backend::identify("b2").await;
    let port = free_ports(1)[0];
    let mut f = Fleet::start(M).await;
    f.put_app("x", json!({"Ports": [port], "Targets": [b1.target()]}))
        .await;
    for i in 0..M {
        f.start_proxy(i).await;
    }
    let mut took = Vec::new();
    for round in 0..10 {
        let (t, id) = if round % 2 == 0 {
            (&b2, "b2")
        } else {
            (&b1, "b1")
        };
        f.put_app("x", json!({"Ports": [port], "Targets": [t.target()]}))
            .await;
        let d = f
            .wait_all(10, "change", |i| async move {
                served_id(at(i, port)).await.as_deref() == Some(id)
            })
            .await;
        took.push(d.into_iter().max().unwrap());
    }
    let (p50, max) = p50_max(&took);
    println!("{M} proxy processes: a change served by all: p50 {p50:.1} ms, max {max:.1} ms");
}

/// One proxy holding a table of K apps: every revision rebuilds and
/// validates the whole table, so a change costs O(K) on every edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn big_table_change_cost() {
    const K: usize = 1000;
    let b1 = Backend::identify("b1").await;
    let b2 = Backend::identify("b2").await;
    let ports = free_ports(K);
    let mut f = Fleet::start(1).await;
    let mut c = f.client().await;
    for (k, p) in ports.iter().enumerate() {
        let v = json!({"Ports": [p], "Targets": [b1.target()]});
        c.put(format!("{PREFIX}apps/app{k:04}"), v.to_string(), None)
            .await
            .unwrap();
    }
    f.start_proxy(0).await;
    let pid = f.proxy(0).pid() as u32;
    let (cpu0, _) = etcd_cpu_rss(pid);
    let mut took = Vec::new();
    for round in 0..20 {
        let (t, id) = if round % 2 == 0 {
            (&b2, "b2")
        } else {
            (&b1, "b1")
        };
        let port = ports[round * 37 % K];
        let name = format!("app{:04}", round * 37 % K);
        f.put_app(&name, json!({"Ports": [port], "Targets": [t.target()]}))
            .await;
        let d = f
            .wait_all(10, "change", |i| async move {
                served_id(at(i, port)).await.as_deref() == Some(id)
            })
            .await;
        took.push(d[0]);
    }
    let (cpu1, rss) = etcd_cpu_rss(pid);
    let (p50, max) = p50_max(&took);
    println!(
        "proxy with {K} apps: a change served p50 {p50:.1} ms, max {max:.1} ms; proxy CPU {:.1} ms per change (probes included), RSS {rss} KiB",
        (cpu1 - cpu0) * 1000.0 / 20.0
    );
}

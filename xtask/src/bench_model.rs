//! What a bench run is made of: its defaults and options, where the
//! endpoints forward, and the endpoints themselves. Shared by the runner
//! (`bench`), the peers' setup (`bench_peers`) and the report's preamble
//! (`bench_about`), which import it and not each other.
use std::{fs, net::SocketAddr, path::PathBuf};

use crate::{root, sh::Background};

/// Defaults of a full run: 9 endpoints x 10 loads x 3 rounds take about 22
/// minutes (tester-go prints its estimate at the start).
pub const DURATION: &str = "3s";
pub const ROUNDS: u32 = 3;
pub const HOLD: &str = "15s";
/// idle-mostly first: its memory per connection is read in a fresh process
/// (each round restarts the proxies). `idle` is left out: after
/// idle-mostly in the same process it would read reused memory.
pub const LOADS: &str =
    "idle-mostly,bulk,iperf3-bulk,bidi,parallel,pingpong,sockperf-pp,rr50,churn,connrate";

/// One thing under test: a name for the table, its role for the verdict
/// (ours, peer, base), its two listening ports and its process.
pub struct Endpoint {
    pub name: &'static str,
    pub role: &'static str,
    pub port: u16,
    /// Ports of the extra routes, by `Targets::extra` name.
    pub routes: Vec<(&'static str, u16)>,
    pub process: Option<Background>,
    /// Config files and flags, quoted in results.md.
    pub about: Vec<(String, String)>,
}

impl Endpoint {
    /// The processes that do the proxying: nginx's master only supervises
    /// its workers, so CPU and memory are read from the workers.
    fn work_pids(&self) -> Vec<u32> {
        let Some(pid) = self.process.as_ref().map(|p| p.child.id()) else {
            return vec![];
        };
        if self.name != "nginx" {
            return vec![pid];
        }
        // The master listens before it forks: wait for both workers.
        let mut workers = vec![];
        for _ in 0..40 {
            let children =
                fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
            workers = children
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            if workers.len() >= NGINX_WORKERS {
                return workers;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        if workers.is_empty() {
            vec![pid]
        } else {
            workers
        }
    }

    pub fn arg(&self) -> String {
        let mut a = format!("{}=127.0.0.1:{},role={}", self.name, self.port, self.role);
        let pids: Vec<String> = self.work_pids().iter().map(u32::to_string).collect();
        if !pids.is_empty() {
            a += &format!(",pid={}", pids.join("+"));
        }
        for (name, p) in &self.routes {
            a += &format!(",{name}=127.0.0.1:{p}");
        }
        a
    }
}

/// nginx's workers: one per core, as the issue measured it.
pub const NGINX_WORKERS: usize = 2;

/// Our proxy's endpoints in the bench: name and the flags that select it.
pub const OUR_PLANES: [(&str, &[&str]); 4] = [
    // The default: adaptive (splice, quiet connections move into the kernel).
    ("auto", &["--mode", "auto"]),
    ("fastpath", &["--mode", "fastpath"]),
    ("splice", &["--mode", "splice"]),
    ("copy", &["--mode", "copy"]),
];

pub struct Options {
    pub duration: String,
    pub rounds: u32,
    /// How long idle-mostly holds its connections.
    pub hold: String,
    pub loads: String,
    /// Which of our planes (`OUR_PLANES` names) to measure.
    pub ours: &'static [&'static str],
    pub peers: bool,
    /// Where results.md, results.json and the charts go.
    pub out: PathBuf,
    /// The command line, quoted in results.md.
    pub command: String,
}

impl Options {
    /// What `cargo xtask test` runs: short, the default plane and the
    /// fallback only, its report under target/. Not the fastpath: on kernel
    /// 6.18 it rarely loses an skb in bulk (now detected and reset,
    /// NOTES.md), which would fail CI by chance; its correctness runs in the
    /// Rust suite and the tester's check and faults. No sockperf and no
    /// idle loads: they need more time than a test run should take.
    pub fn short() -> Options {
        Options {
            duration: "1s".into(),
            rounds: 1,
            hold: "1s".into(),
            loads: "bulk,pingpong,rr50,churn".into(),
            ours: &["splice", "copy"],
            peers: false,
            out: root().join("target/bench/report"),
            command: "cargo xtask test (its short comparison)".into(),
        }
    }

    pub fn wants(&self, load: &str) -> bool {
        self.loads.split(',').any(|l| l.trim() == load)
    }
}

/// Where every endpoint forwards: the bench backend, and each third-party
/// server on a route of its own.
pub struct Targets {
    pub bench: SocketAddr,
    pub extra: Vec<(&'static str, SocketAddr)>,
}

impl Endpoint {
    pub fn proxy(
        name: &'static str,
        role: &'static str,
        port: u16,
        routes: Vec<(&'static str, u16)>,
        process: Background,
        about: Vec<(String, String)>,
    ) -> Endpoint {
        Endpoint {
            name,
            role,
            port,
            routes,
            process: Some(process),
            about,
        }
    }
}

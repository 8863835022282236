//! A fleet for `fleet.rs`: one etcd, several proxy processes (each on its
//! own loopback address, as edges on separate machines would be), and the
//! probes the test measures them with.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::common::etcd::Etcd;
use crate::common::*;

pub const PREFIX: &str = "/fleet/";

pub struct Fleet {
    pub etcd: Etcd,
    pub proxies: Vec<Option<Proxy>>,
    pub admins: Vec<String>,
    pub caches: Vec<PathBuf>,
}

/// The address proxy `i` listens on.
pub fn ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + i as u8))
}

pub fn at(i: usize, port: u16) -> SocketAddr {
    SocketAddr::new(ip(i), port)
}

impl Fleet {
    /// etcd, and room for `n` proxies (started by `start_proxy`).
    pub async fn start(n: usize) -> Fleet {
        let etcd = Etcd::start().await;
        let caches = (0..n)
            .map(|i| etcd.dir.join(format!("cache-{i}.json")))
            .collect();
        Fleet {
            etcd,
            proxies: (0..n).map(|_| None).collect(),
            admins: vec![String::new(); n],
            caches,
        }
    }

    /// Starts (or restarts) proxy `i` from etcd, with its cache.
    pub async fn start_proxy(&mut self, i: usize) {
        let log_path = self
            .etcd
            .dir
            .join(format!("proxy-{i}-{}.log", fastrand::u32(..)));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(PROXY)
            .args([
                "--config-etcd",
                &self.etcd.url,
                "--config-etcd-prefix",
                PREFIX,
            ])
            .arg("--config-etcd-cache")
            .arg(&self.caches[i])
            .args(["--listen-address", &ip(i).to_string()])
            .args(["--admin-address", &format!("{}:0", ip(i))])
            .args(["--mode", "splice", "--log-format", "json"])
            .args(["--health-interval", "500ms"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn proxy");
        let unused = self.etcd.dir.join(format!("no-config-{i}"));
        let mut p = Proxy::from_child(child, log_path, unused, "splice");
        p.wait_ready()
            .await
            .unwrap_or_else(|log| panic!("proxy {i} exited at start:\n{log}"));
        self.admins[i] = admin_addr(&p);
        self.proxies[i] = Some(p);
    }

    pub fn proxy(&self, i: usize) -> &Proxy {
        self.proxies[i].as_ref().expect("proxy running")
    }

    pub fn kill_proxy(&mut self, i: usize) {
        // Proxy's drop kills the child (SIGKILL) and checks its planes.
        self.proxies[i] = None;
    }

    pub async fn client(&self) -> etcd_client::Client {
        self.etcd.client().await.expect("etcd client")
    }

    pub async fn put_app(&self, name: &str, value: serde_json::Value) {
        let key = format!("{PREFIX}apps/{name}");
        self.client()
            .await
            .put(key, value.to_string(), None)
            .await
            .expect("etcd put");
    }

    pub async fn del_app(&self, name: &str) {
        self.client()
            .await
            .delete(format!("{PREFIX}apps/{name}"), None)
            .await
            .expect("etcd delete");
    }

    pub async fn metric(&self, i: usize, series: &str) -> f64 {
        let (_, body) = http_get(&self.admins[i], "/metrics")
            .await
            .expect("/metrics");
        metric(&body, series)
    }

    pub async fn json(&self, i: usize, path: &str) -> serde_json::Value {
        let (code, body) = http_get(&self.admins[i], path).await.expect("admin");
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).expect("admin JSON")
    }

    /// Waits until `ok(i)` holds for every proxy; returns how long each took
    /// (panics after `secs`).
    pub async fn wait_all<F, Fut>(&self, secs: u64, what: &str, mut ok: F) -> Vec<Duration>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let t0 = Instant::now();
        let mut took = vec![None; self.proxies.len()];
        loop {
            for (i, t) in took.iter_mut().enumerate() {
                if t.is_none() && ok(i).await {
                    *t = Some(t0.elapsed());
                }
            }
            if took.iter().all(Option::is_some) {
                return took.into_iter().flatten().collect();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(secs),
                "{what}: not on every proxy within {secs}s (done: {took:?})"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The id an identify backend sends through `addr`; None if nothing
/// answers (refused, reset, no target).
pub async fn served_id(addr: SocketAddr) -> Option<String> {
    let s = tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await;
    let mut s = s.ok()?.ok()?;
    let id = tokio::time::timeout(Duration::from_millis(500), read_id(&mut s)).await;
    id.ok()?.ok()
}

/// A connection the proxy accepts on `addr` right now (the port listens).
pub async fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect(addr).await, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// `tester-go register`, built fresh so it matches this tree.
pub fn tester_go(dir: &std::path::Path) -> PathBuf {
    let out = dir.join("tester-go");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tester-go");
    let st = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(src)
        .status()
        .expect("go build (run `cargo xtask setup`)");
    assert!(st.success(), "go build tester-go failed");
    out
}

/// A target registered under a lease by its own process.
pub struct Registration(pub Child);

impl Registration {
    pub fn start(
        tester: &std::path::Path,
        etcd: &str,
        app: &str,
        target: &str,
        ttl: &str,
    ) -> Registration {
        let mut child = Command::new(tester)
            .args(["register", "--etcd", etcd, "--prefix", PREFIX, "--app", app])
            .args(["--target", target, "--ttl", ttl])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tester-go register");
        let mut line = String::new();
        let out = child.stdout.take().expect("stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).expect("read");
        assert!(line.starts_with("registered "), "register said {line:?}");
        Registration(child)
    }

    /// SIGKILL: no revoke, the lease has to expire.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.kill();
    }
}

/// p50 and max of `d`, in ms.
pub fn p50_max(d: &[Duration]) -> (f64, f64) {
    let mut ms: Vec<f64> = d.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    (ms[ms.len() / 2], ms[ms.len() - 1])
}

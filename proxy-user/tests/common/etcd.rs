//! A real etcd (Debian's etcd-server, installed by `cargo xtask setup`) on
//! free ports in a temp dir, for tests of the etcd config source. Killed
//! and its dir removed on drop.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_ports;

pub struct Etcd {
    child: Option<Child>,
    pub dir: PathBuf,
    pub url: String,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Etcd {
        let dir = std::env::temp_dir().join(format!(
            "proxy-test-etcd-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).expect("etcd temp dir");
        // Retry: a freed port can be taken before etcd binds it.
        for _ in 0..3 {
            let p = free_ports(2);
            let mut e = Etcd {
                child: None,
                dir: dir.clone(),
                url: format!("http://127.0.0.1:{}", p[0]),
                client_port: p[0],
                peer_port: p[1],
            };
            if e.run().await {
                return e;
            }
            e.kill();
        }
        panic!(
            "etcd did not start; log at {}",
            dir.join("etcd.log").display()
        );
    }

    /// Starts (again) on the same ports and data; true once it answers.
    pub async fn run(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .expect("etcd log");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &self.url])
            .args(["--advertise-client-urls", &self.url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd (run `cargo xtask setup` to install etcd-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false;
            }
            if let Ok(mut c) = self.client().await {
                if c.status().await.is_ok() {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub async fn client(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(3));
        etcd_client::Client::connect([self.url.as_str()], Some(opts)).await
    }

    /// The etcd process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no goodbye to its clients.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("etcd dir kept at {}", self.dir.display());
        }
    }
}

//! Proxy generations for upgrade tests: the real binary started with
//! `--handoff-socket`, its successors with `--takeover`, all on one config
//! and one echo backend.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{config_json, free_ports, write_temp, AppSpec, Backend, Proxy, PROXY};

/// One proxy generation: its process, log and the flags it was started with.
pub struct Gen {
    pub proxy: Proxy,
}

pub struct Setup {
    pub mode: &'static str,
    pub config: PathBuf,
    pub handoff: PathBuf,
    pub addr: SocketAddr,
    extra: Vec<String>,
    _backend: Backend,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(&self.handoff);
    }
}

pub fn scratch(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "proxy-upgrade-{}-{}-{what}",
        std::process::id(),
        fastrand::u32(..)
    ))
}

impl Setup {
    pub async fn new(mode: &'static str) -> Setup {
        Setup::with(mode, &[]).await
    }

    /// `extra`: flags every generation gets.
    pub async fn with(mode: &'static str, extra: &[&str]) -> Setup {
        let backend = Backend::echo("echo").await;
        let port = free_ports(1)[0];
        let apps = [AppSpec::new("app", 1, vec![backend.target()])];
        let config = write_temp("config.json", &config_json(&apps, &[vec![port]]));
        Setup {
            mode,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            config,
            handoff: scratch("handoff.sock"),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _backend: backend,
        }
    }

    fn args(&self, mode: &str, config: &Path, takeover: bool) -> Vec<String> {
        let mut a: Vec<String> = [
            "--config",
            &config.display().to_string(),
            "--listen-address",
            "127.0.0.1",
            "--mode",
            mode,
            "--log-format",
            "json",
            "--log-level",
            "info",
            "--drain-timeout",
            "20s",
            "--handoff-socket",
            &self.handoff.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(self.extra.iter().cloned());
        if takeover {
            a.extend(["--takeover".into(), self.handoff.display().to_string()]);
        }
        a
    }

    /// Starts `bin`; returns once it logged "proxy ready" (Err(log) if it
    /// exited first).
    pub async fn launch(&self, bin: &Path, config: &Path, takeover: bool) -> Result<Gen, String> {
        let mut proxy = self.spawn(bin, config, takeover, &[]);
        proxy.wait_ready().await?;
        Ok(Gen { proxy })
    }

    /// Like `launch`, a successor on another `--mode` (an upgrade that
    /// changes the plane).
    pub async fn launch_as(&self, mode: &'static str, config: &Path) -> Result<Gen, String> {
        let mut proxy = self.spawn_mode(mode, Path::new(PROXY), config, true, &[], &[]);
        proxy.wait_ready().await?;
        Ok(Gen { proxy })
    }

    /// The first generation (no takeover), or panic.
    pub async fn first(&self) -> Gen {
        self.launch(Path::new(PROXY), &self.config, false)
            .await
            .unwrap_or_else(|log| panic!("first proxy failed:\n{log}"))
    }

    /// Starts `bin` and returns at once.
    pub fn spawn(&self, bin: &Path, config: &Path, takeover: bool, extra: &[&str]) -> Proxy {
        self.spawn_env(bin, config, takeover, extra, &[])
    }

    pub fn spawn_env(
        &self,
        bin: &Path,
        config: &Path,
        takeover: bool,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Proxy {
        self.spawn_mode(self.mode, bin, config, takeover, extra, env)
    }

    fn spawn_mode(
        &self,
        mode: &'static str,
        bin: &Path,
        config: &Path,
        takeover: bool,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Proxy {
        let log_path = scratch("proxy.log");
        let child = Command::new(bin)
            .args(self.args(mode, config, takeover))
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("spawn proxy");
        // Not the config: generations share it (`Setup` removes it).
        Proxy::from_child(child, log_path, scratch("unused"), mode)
    }
}

/// A second binary to alternate with: a copy of the same build under
/// another path (a different build is not available to a test).
/// `proxy_build_info`'s `commit` of the second build `cargo xtask test`
/// compiles for the upgrade tests (xtask's `SECOND_BUILD_STAMP`).
pub const SECOND_BUILD_STAMP: &str = "upgrade-b";

/// Set by `cargo xtask test`: the second build's path.
pub const SECOND_BUILD_VAR: &str = "PROXY_UPGRADE_SECOND_BUILD";

/// A second binary to alternate with: the second build (a scratch copy,
/// removed by the caller) when xtask made one, else a copy of this build
/// (then `real` is false and both report the same build).
pub struct SecondBinary {
    pub path: PathBuf,
    pub real: bool,
}

pub fn second_binary() -> SecondBinary {
    let p = scratch("proxy-b");
    let (from, real) = match std::env::var_os(SECOND_BUILD_VAR) {
        Some(b) => (PathBuf::from(b), true),
        None => {
            eprintln!(
                "{SECOND_BUILD_VAR} unset: alternating two copies of one build \
                 (`cargo xtask test` builds a second one)"
            );
            (PathBuf::from(PROXY), false)
        }
    };
    std::fs::copy(&from, &p)
        .unwrap_or_else(|e| panic!("copying the proxy binary {}: {e}", from.display()));
    SecondBinary { path: p, real }
}

// ------------------------------------------------------------- the tests

pub async fn wait_log(p: &Proxy, what: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !p.log().contains(what) {
        assert!(
            Instant::now() < deadline,
            "no {what:?} in {}s; log:\n{}",
            secs,
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

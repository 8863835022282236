//! End to end: the Go tester's backends, the real proxy on a config, the
//! tester's `check` driving traffic through it.
use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{proxy_binary, root, sh::cmd, tester_binary};

/// `cargo xtask demo`: config.json as shipped, on its own ports.
pub fn demo(mode: &str) -> Result<()> {
    let config = root().join("config.json");
    run_check(&config, mode, &["--quick"])?;
    let log = proxy_log(mode);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let planes: Vec<String> = ["fastpath", "splice", "copy", "copy-fallback"]
        .iter()
        .map(|p| format!("{p}={}", text.matches(&format!("plane=\"{p}\"")).count()))
        .collect();
    println!(
        "demo: every app served, bytes verified (mode {mode}); connections by data plane: {}; proxy log: {}",
        planes.join(" "),
        log.display()
    );
    Ok(())
}

/// `cargo xtask test`: config.json's shape on free ports, so it runs beside
/// anything; then the tester's fault cases (it serves the targets itself).
pub fn check_config(mode: &str) -> Result<()> {
    let config = relocated_config()?;
    run_check(&config, mode, &[])?;
    run_faults(&config, mode)
}

fn run_faults(config: &Path, mode: &str) -> Result<()> {
    let mut proxy = start_proxy(config, mode)?;
    let faults = cmd(tester_binary())
        .args(["faults", "--config"])
        .arg(config)
        .args(["--proxy-host", "127.0.0.1", "--app", "five-thousand"])
        .run();
    let proxy_clean = proxy.stop(Duration::from_secs(10))?;
    faults.with_context(|| format!("tester faults through the proxy (mode {mode}) failed"))?;
    if !proxy_clean {
        bail!("the proxy (mode {mode}) did not exit cleanly on SIGTERM");
    }
    Ok(())
}

/// Where the proxy's own log goes: one line per connection is too much for a terminal.
fn proxy_log(mode: &str) -> std::path::PathBuf {
    root().join(format!("target/e2e/proxy-{mode}.log"))
}

fn start_proxy(config: &Path, mode: &str) -> Result<crate::sh::Background> {
    let log = proxy_log(mode);
    std::fs::create_dir_all(log.parent().context("log dir")?)?;
    let mut proxy = cmd(proxy_binary())
        .arg("--config")
        .arg(config)
        .args(["--listen-address", "127.0.0.1", "--mode", mode])
        .stderr(std::fs::File::create(&log)?)
        .spawn(Stdio::inherit())?;
    for port in ports(config)? {
        wait_listening(port, &mut proxy, "the proxy")?;
    }
    Ok(proxy)
}

fn run_check(config: &Path, mode: &str, check_args: &[&str]) -> Result<()> {
    let mut backends = cmd(tester_binary())
        .args(["backends", "--config"])
        .arg(config)
        .spawn(Stdio::piped())?;
    wait_ready(&mut backends)?;

    let mut proxy = start_proxy(config, mode)?;

    let checked = cmd(tester_binary())
        .args(["check", "--config"])
        .arg(config)
        .args(["--proxy-host", "127.0.0.1"])
        .args(check_args)
        .run();
    let proxy_clean = proxy.stop(Duration::from_secs(10))?;
    backends.stop(Duration::from_secs(5))?;
    checked.with_context(|| format!("tester check through the proxy (mode {mode}) failed"))?;
    if !proxy_clean {
        bail!("the proxy (mode {mode}) did not exit cleanly on SIGTERM");
    }
    Ok(())
}

pub fn wait_ready(backends: &mut crate::sh::Background) -> Result<()> {
    let stdout = backends.child.stdout.take().context("backends stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the backends' ready line")?;
    if !line.starts_with("ready") {
        bail!("tester backends did not start: {line:?}");
    }
    Ok(())
}

/// Waits until `process` accepts on loopback `port`, failing early if it exits.
pub fn wait_listening(port: u16, process: &mut crate::sh::Background, name: &str) -> Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let start = Instant::now();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Some(status) = process.child.try_wait()? {
            bail!("{name} exited ({status}) before listening on {addr}; its log is under target/");
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("{name} is not listening on {addr} after 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn ports(config: &Path) -> Result<Vec<u16>> {
    let json = read_config(config)?;
    let mut ports = Vec::new();
    for app in json["Apps"].as_array().context("Apps")? {
        for port in app["Ports"].as_array().context("Ports")? {
            ports.push(port.as_u64().context("port")? as u16);
        }
    }
    Ok(ports)
}

fn read_config(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// config.json with every listening port and every local target moved to a
/// free port; the unresolvable target stays as it is.
fn relocated_config() -> Result<std::path::PathBuf> {
    let mut json = read_config(&root().join("config.json"))?;
    use crate::ports::free_port;
    for app in json["Apps"].as_array_mut().context("Apps")? {
        for port in app["Ports"].as_array_mut().context("Ports")? {
            *port = free_port()?.into();
        }
        for target in app["Targets"].as_array_mut().context("Targets")? {
            let t = target.as_str().context("target")?.to_string();
            if t.starts_with("127.0.0.1:") {
                *target = format!("127.0.0.1:{}", free_port()?).into();
            }
        }
    }
    let dir = root().join("target/e2e");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("config-{}.json", std::process::id()));
    std::fs::write(&path, serde_json::to_vec_pretty(&json)?)?;
    Ok(path)
}

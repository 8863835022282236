//! `cargo xtask package`: a Debian package of the proxy, built by hand with
//! `dpkg-deb` from a staged tree (binary, systemd unit, default config and
//! `/etc/default` file as conffiles, man page, dashboard and alert rules),
//! then installed with `dpkg -i` into a scratch root, where the installed
//! `proxy --check` must pass on the installed config.
//!
//! Why dpkg-deb rather than cargo-deb: dpkg-deb is on every Debian machine,
//! while cargo-deb would be one more tool to download and compile (minutes
//! on our 2-core machines) to write the same dozen lines of `control`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::sh::cmd;
use crate::{proxy_binary, root};

pub const PACKAGE: &str = "l4-proxy";

/// Builds the .deb (the eBPF object must be built) and checks it
/// installs; returns its path. `stamp`: build the binary with the git
/// commit in `proxy_build_info` (a rebuild of proxy-user whenever the
/// commit changes, so `cargo xtask test` packages the binary it tested).
pub fn package(stamp: bool) -> Result<PathBuf> {
    let out = root().join("target/package");
    let stage = out.join("root");
    if stage.exists() {
        fs::remove_dir_all(&stage).context("clearing the staging tree")?;
    }
    let mut build = cmd("cargo")
        .args(["build", "--release", "-p", "proxy-user"])
        .dir(root());
    if stamp {
        let commit = cmd("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .dir(root())
            .output_string()
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        println!("xtask package: building the proxy with build_info commit={commit}");
        build = build.env("PROXY_GIT_COMMIT", commit);
    }
    build.run()?;
    let man = cmd("cargo")
        .args([
            "run",
            "-q",
            "--release",
            "-p",
            "proxy-user",
            "--example",
            "manpage",
        ])
        .dir(root())
        .output_string()?;

    let deploy = root().join("deploy");
    let files: [(PathBuf, &str, u32); 7] = [
        (proxy_binary(), "usr/bin/proxy", 0o755),
        (
            deploy.join("l4-proxy.service"),
            "lib/systemd/system/l4-proxy.service",
            0o644,
        ),
        (
            deploy.join("config.json"),
            "etc/l4-proxy/config.json",
            0o644,
        ),
        (deploy.join("default"), "etc/default/l4-proxy", 0o644),
        (
            deploy.join("grafana/l4-proxy-dashboard.json"),
            "usr/share/l4-proxy/grafana/l4-proxy-dashboard.json",
            0o644,
        ),
        (
            deploy.join("prometheus/l4-proxy-alerts.yml"),
            "usr/share/l4-proxy/prometheus/l4-proxy-alerts.yml",
            0o644,
        ),
        (
            root().join("README.md"),
            "usr/share/doc/l4-proxy/README.md",
            0o644,
        ),
    ];
    for (from, to, mode) in &files {
        install(from, &stage.join(to), *mode)?;
    }
    let man_path = stage.join("usr/share/man/man1/proxy.1");
    write(&man_path, &man, 0o644)?;
    cmd("gzip").args(["-9n"]).arg(&man_path).run()?;

    let version = crate_version()?;
    let arch = cmd("dpkg")
        .arg("--print-architecture")
        .output_string()?
        .trim()
        .to_string();
    let size_kib = cmd("du").args(["-sk"]).arg(&stage).output_string()?;
    let size_kib = size_kib.split_whitespace().next().unwrap_or("0");
    let control = format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: L4 proxy maintainers <root@localhost>\n\
         Installed-Size: {size_kib}\n\
         Depends: libc6\n\
         Section: net\n\
         Priority: optional\n\
         Description: Layer-4 TCP proxy with splice(2) and an eBPF sockmap fastpath\n \
         Proxies many apps on many ports (Fly's config.json format) with health checks,\n \
         failover, connection limits, PROXY protocol, reloads without dropped\n \
         connections, Prometheus metrics and an admin API. The l4-proxy service reads\n \
         /etc/l4-proxy/config.json and flags from /etc/default/l4-proxy; it is not\n \
         enabled on install: systemctl enable --now l4-proxy.\n"
    );
    write(&stage.join("DEBIAN/control"), &control, 0o644)?;
    write(
        &stage.join("DEBIAN/conffiles"),
        "/etc/l4-proxy/config.json\n/etc/default/l4-proxy\n",
        0o644,
    )?;
    let deb = out.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    cmd("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&stage)
        .arg(&deb)
        .run()?;
    verify(&deb, &out.join("scratch"))?;
    println!(
        "xtask package: {} (installs and passes proxy --check)",
        deb.display()
    );
    Ok(deb)
}

/// `dpkg -i` into an empty root of its own, then the installed binary
/// checks the installed config.
fn verify(deb: &Path, scratch: &Path) -> Result<()> {
    if scratch.exists() {
        fs::remove_dir_all(scratch).context("clearing the scratch root")?;
    }
    let admin = scratch.join("var/lib/dpkg");
    for dir in ["info", "updates"] {
        fs::create_dir_all(admin.join(dir))?;
    }
    for file in ["status", "available"] {
        fs::write(admin.join(file), "")?;
    }
    // libc6 is not in the empty root's database; it is on the host.
    cmd("dpkg")
        .arg(format!("--root={}", scratch.display()))
        .args(["--force-depends", "--force-script-chrootless", "-i"])
        .arg(deb)
        .run()
        .context("dpkg -i of the package into a scratch root")?;
    let status = fs::read_to_string(admin.join("status"))?;
    if !status.contains(&format!("Package: {PACKAGE}\n"))
        || !status.contains("Status: install ok installed")
    {
        bail!("dpkg does not list {PACKAGE} as installed:\n{status}");
    }
    let out = cmd(scratch.join("usr/bin/proxy"))
        .arg("--check")
        .arg(scratch.join("etc/l4-proxy/config.json"))
        .output_string()
        .context("the installed proxy --check on the installed config")?;
    println!("xtask package: installed proxy --check: {}", out.trim());
    for f in [
        "lib/systemd/system/l4-proxy.service",
        "usr/share/man/man1/proxy.1.gz",
        "etc/default/l4-proxy",
    ] {
        if !scratch.join(f).is_file() {
            bail!("{f} missing after dpkg -i");
        }
    }
    Ok(())
}

fn crate_version() -> Result<String> {
    let toml = fs::read_to_string(root().join("proxy-user/Cargo.toml"))?;
    toml.lines()
        .find_map(|l| {
            let v = l.strip_prefix("version = \"")?;
            Some(v.trim_end_matches('"').to_string())
        })
        .context("no version in proxy-user/Cargo.toml")
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write_bytes(to, &bytes, mode)
}

fn write(to: &Path, text: &str, mode: u32) -> Result<()> {
    write_bytes(to, text.as_bytes(), mode)
}

fn write_bytes(to: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir)?;
        // dpkg-deb refuses group- or world-writable control directories.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    }
    fs::write(to, bytes).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

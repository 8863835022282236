//! `cargo xtask package`: a Debian package of the proxy, built by hand with
//! `dpkg-deb` from a staged tree (binary, systemd unit, default config and
//! `/etc/default` file as conffiles, man page, dashboard and alert rules,
//! maintainer scripts), then installed with a plain `dpkg -i` into a clean
//! Debian 12 (`debroot`), where the installed `proxy --check` must pass on
//! the installed config and `dpkg --purge` must remove it again.
//!
//! Why dpkg-deb rather than cargo-deb: dpkg-deb is on every Debian machine,
//! while cargo-deb would be one more tool to download and compile (minutes
//! on our 2-core machines) to write the same dozen lines of `control`.
//! `Depends` comes from dpkg-shlibdeps, as in any Debian package, so it
//! names exactly the libraries the binary links.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::sh::cmd;
use crate::{build_proxy, debroot, proxy_binary, root};

pub const PACKAGE: &str = "l4-proxy";

/// Where the binary and its man page generator come from.
pub enum Build {
    /// Build both, with the git commit in `proxy_build_info` (a rebuild of
    /// proxy-user whenever the commit changes): `cargo xtask package`.
    Stamped,
    /// Reuse the binary and the man page generator `cargo xtask build`
    /// made, so `cargo xtask test` packages the binary it tested without
    /// compiling anything here. This step used to run `cargo build -p
    /// proxy-user` and `cargo run --example manpage` after the workspace
    /// tests: the example was built nowhere else, so it was compiled and
    /// linked here, and the build had to re-uplift its own binary over the
    /// workspace test's (proxy-common's empty `default` feature gave the
    /// workspace a feature set of its own, so proxy-user was compiled twice).
    Reuse,
}

fn manpage_binary() -> PathBuf {
    root().join("target/release/examples/manpage")
}

/// Builds the .deb (the eBPF object must be built) and checks it
/// installs; returns its path.
pub fn package(build: Build) -> Result<PathBuf> {
    let out = root().join("target/package");
    // dpkg-shlibdeps finds the package's files at debian/PACKAGE.
    let stage = out.join("debian").join(PACKAGE);
    if stage.exists() {
        fs::remove_dir_all(&stage).context("clearing the staging tree")?;
    }
    match build {
        Build::Stamped => {
            let commit = cmd("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .dir(root())
                .output_string()
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into());
            println!("xtask package: building the proxy with build_info commit={commit}");
            build_proxy().env("PROXY_GIT_COMMIT", commit).run()?;
        }
        Build::Reuse => {
            for f in [proxy_binary(), manpage_binary()] {
                if !f.is_file() {
                    bail!("{} is missing: `cargo xtask build` makes it", f.display());
                }
            }
        }
    }
    let man = cmd(manpage_binary()).output_string()?;

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
    // As dh_strip does: the release profile keeps debug info (for perf and
    // backtraces here), five sixths of the binary, and xz took a minute on it.
    cmd("strip")
        .arg("--strip-debug")
        .arg(stage.join("usr/bin/proxy"))
        .run()?;
    for script in ["postinst", "prerm", "postrm"] {
        install(
            &deploy.join("debian").join(script),
            &stage.join("DEBIAN").join(script),
            0o755,
        )?;
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
    let depends = shlib_depends(&out)?;
    let size_kib = cmd("du").args(["-sk"]).arg(&stage).output_string()?;
    let size_kib = size_kib.split_whitespace().next().unwrap_or("0");
    let control = format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: L4 proxy maintainers <root@localhost>\n\
         Installed-Size: {size_kib}\n\
         Depends: {depends}\n\
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
    verify(&deb, &out.join("debian-12"))?;
    println!(
        "xtask package: {} (installs on a clean Debian 12 and passes proxy --check)",
        deb.display()
    );
    Ok(deb)
}

/// The `Depends` of the staged binary, from dpkg-shlibdeps (in `out`, where
/// it finds debian/control and debian/PACKAGE).
fn shlib_depends(out: &Path) -> Result<String> {
    write(
        &out.join("debian/control"),
        &format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n"),
        0o644,
    )?;
    let vars = cmd("dpkg-shlibdeps")
        .args(["-O", "-e"])
        .arg(Path::new("debian").join(PACKAGE).join("usr/bin/proxy"))
        .dir(out)
        .output_string()
        .context("dpkg-shlibdeps on the staged binary")?;
    vars.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_string)
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {vars}"))
}

/// A plain `dpkg -i` (no force flags) into a fresh copy of a clean Debian
/// 12 without systemd, then the installed binary checks the installed
/// config, and `dpkg --purge` removes it all again.
fn verify(deb: &Path, at: &Path) -> Result<()> {
    debroot::fresh_copy(at)?;
    debroot::assert_no_systemd(at)?;
    let inside = "/tmp/l4-proxy.deb";
    fs::copy(deb, at.join(inside.trim_start_matches('/')))
        .context("copying the .deb into the clean root")?;
    debroot::run(at, &["dpkg", "-i", inside])
        .context("dpkg -i of the package on a clean Debian 12 (no force flags)")?;
    let status = debroot::output(at, &["dpkg-query", "-W", "-f=${Status}", PACKAGE])?;
    if status.trim() != "install ok installed" {
        bail!("dpkg says {PACKAGE} is `{}`, not installed", status.trim());
    }
    let config = format!("/etc/{PACKAGE}/config.json");
    let out = debroot::output(at, &["proxy", "--check", &config])
        .context("the installed proxy --check on the installed config")?;
    println!("xtask package: installed proxy --check: {}", out.trim());
    for f in [
        "lib/systemd/system/l4-proxy.service",
        "usr/share/man/man1/proxy.1.gz",
        "etc/default/l4-proxy",
    ] {
        if !at.join(f).is_file() {
            bail!("{f} missing after dpkg -i");
        }
    }
    let man = cmd("gzip")
        .arg("-dc")
        .arg(at.join("usr/share/man/man1/proxy.1.gz"))
        .output_string()?;
    if !man.contains(".TH proxy") || !man.contains("client\\-fin\\-timeout") {
        bail!(
            "the installed man page is not the proxy's: {}",
            man.lines().next().unwrap_or("")
        );
    }
    debroot::run(at, &["dpkg", "--purge", PACKAGE])
        .context("dpkg --purge of the package without systemd")?;
    if at.join("usr/bin/proxy").exists() || at.join("etc/l4-proxy").exists() {
        bail!("dpkg --purge left /usr/bin/proxy or /etc/l4-proxy behind");
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

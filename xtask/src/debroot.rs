//! A clean Debian 12 to install the package into: `debootstrap
//! --variant=minbase bookworm` (Essential and required packages only, no
//! systemd running, as in a container or chroot), built once and cached
//! under `target/`. Each check works on a fresh copy, so a package left
//! behind by an earlier run (or a failed one) never makes the next pass.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::root;
use crate::sh::cmd;

const SUITE: &str = "bookworm";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// The cached pristine root: built once, never installed into.
fn cache() -> PathBuf {
    root().join(format!("target/debian-root/{SUITE}-minbase"))
}

/// Marks a cache that debootstrap finished; a root without it is half-built.
const DONE: &str = ".xtask-debootstrap-done";

/// A fresh copy of the clean root at `at`, built first if not cached. Fails
/// (never skips) when it cannot be built, with the reason.
pub fn fresh_copy(at: &Path) -> Result<()> {
    let pristine = cache();
    if !pristine.join(DONE).is_file() {
        build(&pristine)?;
    }
    if at.exists() {
        fs::remove_dir_all(at).with_context(|| format!("clearing {}", at.display()))?;
    }
    let started = Instant::now();
    cmd("cp")
        .args(["-a", "--reflink=auto"])
        .arg(&pristine)
        .arg(at)
        .run()
        .context("copying the cached clean Debian root")?;
    println!(
        "xtask package: fresh copy of the clean Debian {SUITE} root in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn build(pristine: &Path) -> Result<()> {
    let mirror = std::env::var("DEBIAN_MIRROR").unwrap_or_else(|_| DEFAULT_MIRROR.into());
    let partial = pristine.with_extension("partial");
    if partial.exists() {
        fs::remove_dir_all(&partial).context("clearing a half-built Debian root")?;
    }
    if let Some(dir) = partial.parent() {
        fs::create_dir_all(dir)?;
    }
    println!(
        "xtask package: building a clean Debian {SUITE} root (debootstrap --variant=minbase, \
         from {mirror}; about 2 minutes, once: cached in {})",
        pristine.display()
    );
    let started = Instant::now();
    cmd("debootstrap")
        .args(["--variant=minbase", SUITE])
        .arg(&partial)
        .arg(&mirror)
        .run()
        .with_context(|| {
            format!(
                "cannot build the clean Debian {SUITE} root the package check installs into: \
                 debootstrap from {mirror} failed (no network? set DEBIAN_MIRROR to a reachable \
                 mirror); see its log in {}/debootstrap/debootstrap.log",
                partial.display()
            )
        })?;
    fs::write(partial.join(DONE), "")?;
    if pristine.exists() {
        fs::remove_dir_all(pristine)?;
    }
    fs::rename(&partial, pristine).context("moving the built Debian root into place")?;
    println!(
        "xtask package: clean Debian {SUITE} root built in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `chroot at program args...`, output inherited; failure is an error.
pub fn run(at: &Path, args: &[&str]) -> Result<()> {
    cmd("chroot").arg(at).args(args).env("LC_ALL", "C").run()
}

/// Like `run`, returning stdout.
pub fn output(at: &Path, args: &[&str]) -> Result<String> {
    cmd("chroot")
        .arg(at)
        .args(args)
        .env("LC_ALL", "C")
        .output_string()
}

/// Checks the root has no systemd running in it, so the maintainer
/// scripts are tried the way a container runs them.
pub fn assert_no_systemd(at: &Path) -> Result<()> {
    if at.join("run/systemd/system").exists() {
        bail!(
            "{} has /run/systemd/system: not the systemd-less root the check needs",
            at.display()
        );
    }
    Ok(())
}

//! `cargo xtask setup`: install what a fresh machine lacks, and nothing else.
//! Every step checks first, so a second run only checks and takes seconds.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

use crate::sh::{cmd, succeeds};

const BPF_LINKER_VERSION: &str = "0.13.0";

pub struct Needs {
    /// HAProxy and nginx, the peers `bench` measures against (the tests
    /// need neither).
    pub peers: bool,
}

pub fn setup(needs: Needs) -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    debian_package("go", &["golang-go"])?;
    // promtool validates the /metrics output in the tests.
    debian_package("promtool", &["prometheus"])?;
    // The fleet test starts its own etcd (never the system service) and
    // writes with etcdctl.
    server_package("etcd", &["etcd-server"], "etcd")?;
    debian_package("etcdctl", &["etcd-client"])?;
    // The etcd-client crate compiles etcd's .proto files when it builds;
    // they import protobuf's own (descriptor.proto...), which Debian ships
    // in libprotobuf-dev, only a recommendation of protobuf-compiler.
    install_unless(
        "command -v protoc && test -e /usr/include/google/protobuf/descriptor.proto",
        "`protoc` and protobuf's .proto includes",
        &["protobuf-compiler", "libprotobuf-dev"],
    )?;
    // The package check: a clean Debian 12 root to install into, and
    // dpkg-shlibdeps for the package's Depends.
    debian_package("debootstrap", &["debootstrap"])?;
    debian_package("dpkg-shlibdeps", &["dpkg-dev"])?;
    // Third-party clients the bench measures with, so its numbers do not
    // rest on tester-go alone: sockperf's ping-pong and iperf3's bulk. The
    // tester's own tests drive both, so the tests need them too.
    debian_package("sockperf", &["sockperf"])?;
    debian_package("iperf3", &["iperf3"])?;
    if needs.peers {
        server_package("haproxy", &["haproxy"], "haproxy")?;
        // nginx-core ships the stream module as a loadable module.
        server_package("nginx", &["nginx-core", "libnginx-mod-stream"], "nginx")?;
    }
    Ok(())
}

fn nightly_rust_src() -> Result<()> {
    if !succeeds(cmd("rustup").args(["run", "nightly", "rustc", "--version"])) {
        step("installing the nightly toolchain (the eBPF crate needs it)");
        cmd("rustup")
            .args(["toolchain", "install", "nightly", "--profile", "minimal"])
            .run()?;
    }
    let installed = cmd("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output_string()?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        step("adding rust-src to the nightly toolchain (build-std for bpfel-unknown-none)");
        cmd("rustup")
            .args(["component", "add", "rust-src", "--toolchain", "nightly"])
            .run()?;
    }
    Ok(())
}

/// bpf-linker must use the same LLVM as the nightly rustc that emits the
/// bitcode; Debian has no LLVM that new, but the nightly ships its own.
fn bpf_linker() -> Result<()> {
    let works = cmd("bpf-linker").arg("--version").output_string();
    if matches!(&works, Ok(v) if v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    let sysroot = cmd("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output_string()?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let libllvm = find_libllvm(&libdir)?;
    let major = llvm_major(&libllvm)?;
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly's {} (about a minute)",
        libllvm.display()
    ));
    let prefix = cache_dir()?.join("llvm-nightly");
    fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {} to {}", link.display(), libllvm.display()))?;
    cmd("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        // Found at run time without rustup's LD_LIBRARY_PATH.
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", libdir.display()),
        )
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .run()?;
    let version = cmd("bpf-linker").arg("--version").output_string()?;
    println!("xtask: {}", version.trim());
    Ok(())
}

fn find_libllvm(libdir: &Path) -> Result<PathBuf> {
    let entries = fs::read_dir(libdir).with_context(|| format!("reading {}", libdir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("libLLVM.so.") && name.ends_with("-nightly") {
            return Ok(path);
        }
    }
    bail!(
        "no libLLVM.so.*-nightly in {}: the nightly toolchain ships without LLVM?",
        libdir.display()
    )
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` -> 22, which picks bpf-linker's `llvm-22` feature.
fn llvm_major(libllvm: &Path) -> Result<u32> {
    let name = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    name.trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot read the LLVM major version from {name}"))
}

fn debian_package(binary: &str, packages: &[&str]) -> Result<()> {
    install_unless(
        &format!("command -v {binary}"),
        &format!("`{binary}`"),
        packages,
    )
}

/// A server the tests and the bench start themselves, on their own ports:
/// installed as `debian_package` does, and if it was installed here, its
/// system service disabled, so that a reboot does not start Debian's own
/// instance (nginx on :80, etcd on :2379). One that was there before is
/// the machine owner's, and stays as it was.
fn server_package(binary: &str, packages: &[&str], service: &str) -> Result<()> {
    let present = |b: &str| succeeds(cmd("sh").args(["-c", &format!("command -v {b}")]));
    let was_there = present(binary);
    debian_package(binary, packages)?;
    if !was_there && present("systemctl") {
        // Works without a running systemd (it only removes the links). A
        // failure is worth a warning, not a stop: the tests need the
        // binary, not the service's state.
        let disabled = cmd("systemctl").args(["disable", "--quiet", service]).run();
        if let Err(e) = disabled {
            step(&format!(
                "warning: could not disable the {service} service it installed ({e:#}); \
                 run `systemctl disable {service}`"
            ));
        }
    }
    Ok(())
}

/// Installs Debian's `packages` unless the shell test `present` passes;
/// `what` names what they bring, in messages.
fn install_unless(present: &str, what: &str, packages: &[&str]) -> Result<()> {
    if succeeds(cmd("sh").args(["-c", present])) {
        return Ok(());
    }
    let list = packages.join(" ");
    step(&format!("installing Debian's {list} (for {what})"));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} missing, and installing {list} needs root: run `apt-get install {list}`");
    }
    // Servers installed here are started by the bench on its own ports, never
    // as system services: policy-rc.d tells the package scripts so.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let installed = (|| {
        cmd("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()?;
        cmd("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()
    })();
    if own_policy {
        let _ = fs::remove_file(policy);
    }
    installed
}

fn cache_dir() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/proxy-xtask"))
}

fn step(what: &str) {
    println!("xtask setup: {what}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llvm_major_from_the_nightly_library_name() {
        let cases = [
            ("libLLVM.so.22.1-rust-1.97.0-nightly", 22),
            ("libLLVM.so.21-rust-1.93.0-nightly", 21),
        ];
        for (name, major) in cases {
            assert_eq!(llvm_major(Path::new(name)).unwrap(), major, "{name}");
        }
        assert!(llvm_major(Path::new("libLLVM.so.x")).is_err());
    }
}

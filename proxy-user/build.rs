//! Builds the eBPF object (proxy-ebpf) with the nightly toolchain and
//! bpf-linker, so that `cargo build` of the proxy always embeds a fresh one.
//! `cargo xtask setup` installs what this needs.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("proxy-user sits in the workspace");
    let ebpf_dir = root.join("proxy-ebpf");
    let target_dir = root.join("target").join("bpf");

    for watched in [
        "proxy-ebpf/src",
        "proxy-ebpf/Cargo.toml",
        "proxy-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }

    let mut cmd = Command::new("rustup");
    cmd.current_dir(&ebpf_dir)
        .args(["run", "nightly", "cargo", "build", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer (stable) cargo's settings must not leak into the nightly build.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "CARGO_MANIFEST_DIR",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("could not run rustup to build the eBPF object ({e}); run `cargo xtask setup`")
    });
    if !status.success() {
        panic!(
            "building the eBPF object failed (see above); `cargo xtask setup` installs \
             the nightly rust-src component and bpf-linker it needs"
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/proxy-ebpf");
    copy_into_out_dir(&object);
}

fn copy_into_out_dir(object: &Path) {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("proxy-ebpf.o");
    std::fs::copy(object, &out)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", object.display(), out.display()));
}

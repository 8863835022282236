//! Embeds the eBPF object (proxy-ebpf) that `cargo xtask build` compiles with
//! the nightly toolchain and bpf-linker. Building it is xtask's job, not this
//! script's: `cargo check`, `clippy` and editors then need only stable Rust.
//! Without the object the proxy still builds; `--mode fastpath` and
//! `--steering sk_lookup` then refuse to start and say how to get it.
use std::{env, path::PathBuf};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("proxy-user sits in the workspace");
    let object = match env::var_os("PROXY_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => root.join("target/bpf/bpfel-unknown-none/release/proxy-ebpf"),
    };
    println!("cargo:rerun-if-env-changed=PROXY_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("proxy-ebpf.o");
    if object.exists() {
        std::fs::copy(&object, &out)
            .unwrap_or_else(|e| panic!("copying {} to {}: {e}", object.display(), out.display()));
    } else {
        println!(
            "cargo:warning=no eBPF object at {}: built without the fastpath and sk_lookup steering (`cargo xtask build` builds it)",
            object.display()
        );
        std::fs::write(&out, b"").unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
    }
}

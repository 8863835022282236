//! Project tasks: `cargo xtask <task>`. A fresh machine needs only these.
mod bench;
mod e2e;
mod package;
mod setup;
mod sh;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::sh::cmd;

#[derive(Parser)]
#[command(about = "Build, run, demo and test the L4 proxy; installs what a fresh machine lacks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the nightly rust-src, bpf-linker (against the nightly's LLVM) and Go, if missing.
    Setup,
    /// Build the eBPF object (nightly), the proxy that embeds it (release) and the Go tester.
    Build,
    /// Build, then run the proxy with the given arguments (after `--`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The main job: serve config.json's targets, proxy them, drive and verify traffic, report.
    Demo {
        /// Data plane for the proxy: auto (= splice, else copy), splice, copy or fastpath.
        #[arg(long, default_value = "auto")]
        mode: String,
    },
    /// Everything CI runs: Rust tests, go vet/test, end-to-end checks on every data plane, the package.
    Test,
    /// Build the Debian package (target/package/l4-proxy_VERSION_ARCH.deb) and check that it installs
    /// with dpkg -i into a scratch root and that the installed `proxy --check` passes.
    Package,
    /// Direct vs our planes (fastpath, splice, copy) vs HAProxy vs nginx in one run; writes bench/results.md.
    Bench {
        /// Seconds per load per endpoint per round.
        #[arg(long, default_value = "2s")]
        duration: String,
        /// Interleaved rounds (medians are reported).
        #[arg(long, default_value_t = 2)]
        rounds: u32,
        /// Loads to run (tester-go compare --loads).
        #[arg(long, default_value = "bulk,bidi,parallel,pingpong,connrate,idle")]
        loads: String,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The chain of causes says what failed; a backtrace of xtask does not.
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let needs = setup::Needs { peers: false };
    match cli.task {
        Task::Setup => setup::setup(needs),
        Task::Build => build(),
        Task::Run { args } => {
            setup::setup(needs)?;
            build()?;
            cmd(proxy_binary()).args(args).run()
        }
        Task::Demo { mode } => {
            setup::setup(needs)?;
            build()?;
            e2e::demo(&mode)
        }
        Task::Test => {
            setup::setup(needs)?;
            build()?;
            test()
        }
        Task::Package => {
            setup::setup(needs)?;
            build_ebpf()?;
            package::package(true).map(drop)
        }
        Task::Bench {
            duration,
            rounds,
            loads,
        } => {
            setup::setup(setup::Needs { peers: true })?;
            build()?;
            bench::run(&bench::Options {
                duration,
                rounds,
                loads,
                ours: &["auto", "fastpath", "fastpath-parser", "splice", "copy"],
                peers: true,
                report: true,
            })
        }
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

pub fn proxy_binary() -> PathBuf {
    root().join("target/release/proxy")
}

pub fn tester_binary() -> PathBuf {
    root().join("target/tester-go")
}

fn build() -> Result<()> {
    println!("xtask: building the eBPF object (nightly, bpf-linker)");
    build_ebpf()?;
    println!("xtask: building the proxy (release), which embeds it");
    cmd("cargo")
        .args(["build", "--release", "-p", "proxy-user"])
        .dir(root())
        .run()?;
    println!("xtask: building the Go tester");
    cmd("go")
        .args(["build", "-o"])
        .arg(tester_binary())
        .arg(".")
        .dir(root().join("tester-go"))
        .run()
}

/// proxy-ebpf for `bpfel-unknown-none`, where proxy-user's build.rs looks
/// for it. Its own workspace, toolchain and target dir: the stable build's
/// settings must not leak into the nightly one.
fn build_ebpf() -> Result<()> {
    let mut c = cmd("rustup")
        .args(["run", "nightly", "cargo", "build", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(root().join("target/bpf"))
        .dir(root().join("proxy-ebpf"));
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
        c = c.env_remove(var);
    }
    c.run()
}

/// `proxy_build_info`'s `commit` of the second build (kept equal to
/// `SECOND_BUILD_STAMP` in proxy-user/tests/common/generations.rs).
const SECOND_BUILD_STAMP: &str = "upgrade-b";

/// A second, genuinely different build of the proxy for tests/upgrade.rs
/// to alternate with: stamped `SECOND_BUILD_STAMP`, in its own target dir
/// so that the main build's artifacts are not rebuilt (a different
/// `PROXY_GIT_COMMIT` in `target/release` would recompile proxy-user and
/// relink every test binary, twice per run). Without debuginfo: it is only
/// run. The first time compiles every dependency once more (minutes);
/// afterwards only proxy-user.
fn build_second() -> Result<PathBuf> {
    let dir = root().join("target/upgrade-b");
    println!("xtask test: building the second proxy build for the upgrade tests");
    cmd("cargo")
        .args(["build", "--release", "-p", "proxy-user", "--target-dir"])
        .arg(&dir)
        .env("PROXY_GIT_COMMIT", SECOND_BUILD_STAMP)
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .dir(root())
        .run()?;
    Ok(dir.join("release/proxy"))
}

fn test() -> Result<()> {
    let go = root().join("tester-go");
    let second = build_second()?;
    cmd("cargo")
        .args(["test", "--release", "--workspace"])
        .env("PROXY_UPGRADE_SECOND_BUILD", &second)
        .dir(root())
        .run()?;
    let unformatted = cmd("gofmt").args(["-l", "."]).dir(&go).output_string()?;
    if !unformatted.trim().is_empty() {
        anyhow::bail!("gofmt would change: {}", unformatted.trim());
    }
    cmd("go").args(["vet", "./..."]).dir(&go).run()?;
    cmd("go").args(["test", "./..."]).dir(&go).run()?;
    for mode in ["copy", "splice", "fastpath", "auto"] {
        e2e::check_config(mode)?;
    }
    println!("xtask test: the Debian package installs and checks its config");
    package::package(false)?;
    println!("xtask test: short data-plane comparison (numbers only; `cargo xtask bench` is the real one)");
    bench::run(&bench::Options::short())?;
    println!("xtask test: all passed");
    Ok(())
}

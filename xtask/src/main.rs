//! Project tasks: `cargo xtask <task>`. A fresh machine needs only these.
mod bench;
mod bench_about;
mod bench_model;
mod bench_peers;
mod debroot;
mod e2e;
mod package;
mod ports;
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
    /// with a plain dpkg -i on a clean Debian 12 (debootstrap minbase, cached under target/), that the
    /// installed `proxy --check` passes there, and that dpkg --purge removes it.
    Package {
        /// Package the binary `cargo xtask build` made, without building (its build_info commit is
        /// `unknown`), as `cargo xtask test` does.
        #[arg(long)]
        reuse: bool,
    },
    /// Direct vs our planes (auto, fastpath, splice, copy) vs HAProxy vs nginx in one interleaved run
    /// (about 20 minutes with the defaults); writes bench/results.md, results.json and SVG charts.
    Bench {
        /// Time per load per endpoint per round (shorter than the default marks a smoke run).
        #[arg(long, default_value = bench_model::DURATION)]
        duration: String,
        /// Interleaved rounds (medians and min-max are reported; fewer than the default marks a smoke run).
        #[arg(long, default_value_t = bench_model::ROUNDS)]
        rounds: u32,
        /// How long idle-mostly holds its 2,000 connections.
        #[arg(long, default_value = bench_model::HOLD)]
        hold: String,
        /// Loads to run (tester-go compare --loads).
        #[arg(long, default_value = bench_model::LOADS)]
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
        Task::Package { reuse: true } => {
            setup::setup(needs)?;
            package::package(package::Build::Reuse).map(drop)
        }
        Task::Package { reuse: false } => {
            setup::setup(needs)?;
            build_ebpf()?;
            package::package(package::Build::Stamped).map(drop)
        }
        Task::Bench {
            duration,
            rounds,
            hold,
            loads,
        } => {
            setup::setup(setup::Needs { peers: true })?;
            build()?;
            let command = format!(
                "cargo xtask bench --duration {duration} --rounds {rounds} --hold {hold} --loads {loads}"
            );
            bench::run(&bench_model::Options {
                duration,
                rounds,
                hold,
                loads,
                ours: &["auto", "fastpath", "splice", "copy"],
                peers: true,
                out: root().join("bench"),
                command,
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
    println!("xtask: building the proxy (release), which embeds it, and its man page generator");
    build_proxy().run()?;
    println!("xtask: building the Go tester");
    cmd("go")
        .args(["build", "-o"])
        .arg(tester_binary())
        .arg(".")
        .dir(root().join("tester-go"))
        .run()
}

/// The release proxy and its examples (the man page generator) in one
/// invocation: one feature resolution for both, so `cargo xtask test`
/// packages this binary and this man page without compiling again.
pub fn build_proxy() -> sh::Cmd {
    cmd("cargo")
        .args([
            "build",
            "--release",
            "-p",
            "proxy-user",
            "--bins",
            "--examples",
        ])
        .dir(root())
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
    println!("xtask test: the Debian package installs on a clean Debian 12 and checks its config");
    package::package(package::Build::Reuse)?;
    println!("xtask test: short data-plane comparison (numbers only; `cargo xtask bench` is the real one)");
    bench::run(&bench_model::Options::short())?;
    println!("xtask test: all passed");
    Ok(())
}

//! SIGUSR2: the running proxy starts its successor itself, nginx-style.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Starts the binary found at our own path now (so a newly installed
/// version runs; the same one is a plain restart) with our arguments plus
/// `--takeover PATH`, and logs how it ends if it fails. Returns its pid.
pub fn spawn(handoff: &Path) -> anyhow::Result<u32> {
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    // argv[0] names the installed file, as the shell or systemd found it: a
    // bare name is looked up in PATH again, as the shell did (spawn does
    // that for a name without a slash). /proc/self/exe would name the inode
    // we run from, which an install replaced: "/usr/bin/proxy (deleted)".
    let exe = if argv0.is_empty() {
        std::env::current_exe().context("locating this binary")?
    } else {
        PathBuf::from(&argv0)
    };
    let mut rest: Vec<OsString> = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        if a == "--takeover" {
            skip = true;
            continue;
        }
        if a.to_string_lossy().starts_with("--takeover=") {
            continue;
        }
        rest.push(a);
    }
    rest.push("--takeover".into());
    rest.push(handoff.as_os_str().to_owned());
    let mut child = tokio::process::Command::new(&exe)
        .args(&rest)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let pid = child.id().unwrap_or(0);
    tokio::spawn(async move {
        match child.wait().await {
            Ok(st) if !st.success() => {
                tracing::error!(successor = pid, status = %st, "the new process exited with an error; this one keeps serving")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(successor = pid, error = %e, "waiting for the new process"),
        }
    });
    Ok(pid)
}

//! SIGUSR2: the running proxy starts its successor itself, nginx-style.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Starts the binary found at our own path now (so a newly installed
/// version runs; the same one is a plain restart) with our arguments plus
/// `--takeover PATH`, and logs how it ends if it fails. Returns its pid.
pub fn spawn(handoff: &Path) -> anyhow::Result<u32> {
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    let exe = installed_path(&argv0)?;
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

/// The file to start: the one argv[0] names, as the shell or systemd found
/// it, so a newly installed version runs. A bare name is looked up in PATH
/// again, as the shell did. /proc/self/exe names the inode we run from,
/// which an install replaced ("/usr/bin/proxy (deleted)"), so it is the
/// fallback only: for a bare name PATH does not hold (`exec -a`, or a
/// supervisor that found us with a PATH of its own).
fn installed_path(argv0: &OsStr) -> anyhow::Result<PathBuf> {
    match named_file(argv0, std::env::var_os("PATH").as_deref()) {
        Some(p) => Ok(p),
        None => std::env::current_exe().context("locating this binary"),
    }
}

/// What `argv0` names: itself with a slash in it, else the first
/// executable file of that name in `path`'s directories.
fn named_file(argv0: &OsStr, path: Option<&OsStr>) -> Option<PathBuf> {
    let named = Path::new(argv0);
    if argv0.as_bytes().contains(&b'/') {
        return Some(named.to_path_buf());
    }
    if argv0.is_empty() {
        return None;
    }
    std::env::split_paths(path?)
        .map(|dir| dir.join(named))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_name_is_found_in_path_or_left_to_the_fallback() {
        let dir = std::env::temp_dir().join(format!("proxy-successor-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("proxy-under-test");
        std::fs::write(&exe, b"#!/bin/sh\n").unwrap();
        let plain = dir.join("not-executable");
        std::fs::write(&plain, b"").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths([Path::new("/nonexistent"), &dir]).unwrap();
        let find = |name: &str| named_file(OsStr::new(name), Some(&path));
        assert_eq!(find("proxy-under-test"), Some(exe.clone()));
        // Not there, or not executable: current_exe() is the fallback.
        assert_eq!(find("proxy-elsewhere"), None);
        assert_eq!(find("not-executable"), None);
        assert_eq!(find(""), None);
        assert_eq!(named_file(OsStr::new("proxy-under-test"), None), None);
        // A path is taken as written.
        assert_eq!(find("./bin/proxy"), Some(PathBuf::from("./bin/proxy")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

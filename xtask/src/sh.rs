//! Running commands: echo them, fail with the command line in the error.
use std::{
    ffi::OsStr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub struct Cmd(Command);

pub fn cmd(program: impl AsRef<OsStr>) -> Cmd {
    Cmd(Command::new(program))
}

pub fn succeeds(mut c: Cmd) -> bool {
    c.0.stdout(Stdio::null()).stderr(Stdio::null());
    c.0.status().map(|s| s.success()).unwrap_or(false)
}

impl Cmd {
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.0.arg(a);
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, a: I) -> Self {
        self.0.args(a);
        self
    }
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.0.env(k, v);
        self
    }
    pub fn env_remove(mut self, k: impl AsRef<OsStr>) -> Self {
        self.0.env_remove(k);
        self
    }
    pub fn stderr(mut self, to: impl Into<Stdio>) -> Self {
        self.0.stderr(to);
        self
    }
    pub fn dir(mut self, d: impl AsRef<std::path::Path>) -> Self {
        self.0.current_dir(d);
        self
    }
    fn describe(&self) -> String {
        let mut s = self.0.get_program().to_string_lossy().into_owned();
        for a in self.0.get_args() {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }
    /// Runs to completion with inherited output; an unsuccessful exit is an error.
    pub fn run(mut self) -> Result<()> {
        let line = self.describe();
        println!("$ {line}");
        let status = self
            .0
            .status()
            .with_context(|| format!("starting `{line}`"))?;
        if !status.success() {
            bail!("`{line}` failed ({status})");
        }
        Ok(())
    }
    pub fn output_string(mut self) -> Result<String> {
        let line = self.describe();
        let out = self
            .0
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("starting `{line}`"))?;
        if !out.status.success() {
            bail!("`{line}` failed ({})", out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
    /// Starts in the background; the returned guard stops it when dropped.
    pub fn spawn(mut self, stdout: Stdio) -> Result<Background> {
        let line = self.describe();
        println!("$ {line} &");
        let child = self
            .0
            .stdout(stdout)
            .spawn()
            .with_context(|| format!("starting `{line}`"))?;
        Ok(Background { child, line })
    }
}

/// A background process that is stopped (SIGTERM, then SIGKILL) when dropped,
/// so an error anywhere in a task never leaves a proxy or backend running.
pub struct Background {
    pub child: Child,
    line: String,
}

impl Background {
    /// SIGTERM, then wait up to `grace`, then SIGKILL. Returns whether it exited cleanly.
    pub fn stop(&mut self, grace: Duration) -> Result<bool> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status.success());
        }
        // SAFETY: kill with a pid we own; failure only means it already exited.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.success());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "xtask: `{}` ignored SIGTERM for {grace:?}; killing it",
            self.line
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(false)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(5));
    }
}

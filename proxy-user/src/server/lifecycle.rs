//! Process-level lifecycle: the signals we act on and the fd limit.

use anyhow::Context;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Raises the soft RLIMIT_NOFILE to the hard limit (as Go's runtime and
/// nginx's worker_rlimit_nofile do): the default soft limit of 1024 would
/// cap a proxy at ~500 connections. Returns the soft limit now in force.
// rlim_t is u64 here but narrower on some 32-bit targets.
#[allow(clippy::unnecessary_cast)]
pub fn raise_fd_limit() -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(raised.rlim_cur as u64);
        }
    }
    Ok(lim.rlim_cur as u64)
}

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// SIGHUP: reload the config file.
    Reload,
    /// SIGTERM/SIGINT: drain and exit.
    Shutdown(&'static str),
    /// SIGUSR2: start the binary anew with `--takeover` (an upgrade, or a
    /// restart with the same binary).
    Upgrade,
    /// SIGUSR1: logged and ignored (nginx reopens logs on it; SIGHUP does
    /// that here), rather than the default action, which kills.
    Ignored(&'static str),
}

/// SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2, registered at startup so a signal that
/// arrives before we wait on it is not fatal (the default action would kill
/// us mid-drain).
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    usr1: Signal,
    usr2: Signal,
}

impl Signals {
    pub fn register() -> anyhow::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot register SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("cannot register SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("cannot register SIGHUP handler")?,
            usr1: signal(SignalKind::user_defined1()).context("cannot register SIGUSR1 handler")?,
            usr2: signal(SignalKind::user_defined2()).context("cannot register SIGUSR2 handler")?,
        })
    }

    pub async fn next(&mut self) -> Request {
        tokio::select! {
            _ = self.term.recv() => Request::Shutdown("SIGTERM"),
            _ = self.int.recv() => Request::Shutdown("SIGINT"),
            _ = self.hup.recv() => Request::Reload,
            _ = self.usr1.recv() => Request::Ignored("SIGUSR1"),
            _ = self.usr2.recv() => Request::Upgrade,
        }
    }
}

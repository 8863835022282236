//! The binary's driver: a server run from signals (stop, reload, upgrade),
//! with systemd told each change; and `--check`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::lifecycle::{Request, Signals};
use super::{handoff, start, Handle, Settings, SECOND_SIGNAL_GRACE};
use crate::ops::sd_notify;

/// Runs a server until SIGTERM or SIGINT, then drains it; SIGHUP reloads.
/// A second stop signal during the drain exits the process at once.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    // Before anything can fail slowly: a SIGTERM during startup must not
    // hit the default action.
    let mut signals = Signals::register()?;
    let handoff_path = settings.handoff_socket.clone();
    let Some(server) = start_unless_stopped(settings, &mut signals).await? else {
        return Ok(());
    };
    // MAINPID too: after a takeover systemd must follow this process.
    sd_notify::notify(&format!("READY=1\nMAINPID={}", std::process::id()));
    // A signal that came while a reload waited.
    let mut next = None;
    let sig = loop {
        let request = match next.take() {
            Some(r) => r,
            None => tokio::select! {
                r = signals.next() => r,
                // Handed over to a new process and drained.
                () = server.finished() => return Ok(()),
            },
        };
        match request {
            Request::Shutdown(sig) => break sig,
            Request::Reload => {
                sd_notify::reloading();
                tokio::select! {
                    () = server.reload() => {}
                    () = server.finished() => return Ok(()),
                    // A server handing over or draining after a handoff
                    // takes no reload until it is done (up to the drain
                    // timeout): a stop must not wait behind it.
                    r = signals.next() => next = Some(r),
                }
                sd_notify::notify("READY=1");
            }
            Request::Upgrade => upgrade(handoff_path.as_deref()),
            Request::Ignored(sig) => {
                tracing::info!(signal = sig, "ignored (SIGHUP reloads the config and reopens --access-log; SIGUSR2 upgrades)")
            }
        }
    };
    sd_notify::notify("STOPPING=1");
    // A second signal means "now": do not wait for the drain. Live streams
    // are reset first (a FIN from exit would pass for their end), with a
    // short grace for their tasks to do it and log.
    let cut = server.cutter();
    let forced = Arc::new(AtomicBool::new(false));
    let second = forced.clone();
    tokio::spawn(async move {
        loop {
            if let Request::Shutdown(sig) = signals.next().await {
                tracing::warn!(
                    signal = sig,
                    "second signal, resetting live connections and exiting"
                );
                second.store(true, Ordering::SeqCst);
                cut.cut(SECOND_SIGNAL_GRACE).await;
                cut.flush_log().await;
                std::process::exit(1);
            }
        }
    });
    server.shutdown(sig).await;
    // The resets can finish the drain before the task above exits: a forced
    // stop still ends with a failure status.
    anyhow::ensure!(
        !forced.load(Ordering::SeqCst),
        "stopped by a second signal: live connections were reset"
    );
    Ok(())
}

/// SIGUSR2: starts the successor, which connects back to our handoff
/// socket; this process serves on until it says it is ready.
fn upgrade(handoff: Option<&std::path::Path>) {
    let Some(path) = handoff else {
        tracing::warn!(
            signal = "SIGUSR2",
            "ignored: upgrades need --handoff-socket PATH"
        );
        return;
    };
    match handoff::successor::spawn(path) {
        Ok(pid) => tracing::info!(
            successor = pid,
            "SIGUSR2: started the new process; serving until it is ready"
        ),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "SIGUSR2: cannot start the new process; still serving")
        }
    }
}

/// `start`, raced against the signals: a stop signal while starting (an
/// access log FIFO waiting for its reader, a slow config read) ends the
/// process now rather than once started; a SIGHUP reloads once started.
/// None: stopped before serving.
async fn start_unless_stopped(
    settings: Settings,
    signals: &mut Signals,
) -> anyhow::Result<Option<Handle>> {
    let starting = start(settings);
    tokio::pin!(starting);
    let mut reload = false;
    loop {
        tokio::select! {
            started = &mut starting => {
                let server = started?;
                if reload {
                    server.reload().await;
                }
                return Ok(Some(server));
            }
            request = signals.next() => match request {
                Request::Shutdown(sig) => {
                    tracing::warn!(signal = sig, "stop signal during start-up; exiting without serving");
                    return Ok(None);
                }
                Request::Reload => reload = true,
                Request::Upgrade => tracing::warn!(signal = "SIGUSR2", "ignored during start-up"),
                Request::Ignored(sig) => tracing::info!(signal = sig, "ignored"),
            },
        }
    }
}

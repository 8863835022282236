//! Reload on config file change: polls the file's identity and stamps
//! (device, inode, size, mtime, ctime) every `--watch-config` interval.
//!
//! Polling rather than inotify: it needs no extra fds or crates, follows a
//! path whose file is replaced by rename (editors, `mv`, Kubernetes
//! ConfigMap symlink swaps: the inode changes) as well as one rewritten in
//! place, and a quarter second is well inside "within a second". A change
//! is reported once the stamps held still for one more poll, so a file
//! caught half-written is not reloaded (and rejected) before the writer is
//! done. The reload itself skips content it has already tried, so one bad
//! file logs one error, however often it is touched (a valid one whose new
//! port is taken is tried again on a back-off of its own, `server::control`). Only `stat` happens
//! here, which never blocks; whatever the path now names (a FIFO, a
//! device) is refused by the reload's read (`config::file`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;

/// What identifies one version of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// The file's stamp now; None if it cannot be read (e.g. mid-rename).
pub fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// Watches `path` from `initial` (its stamp when the running config was
/// read); one message per settled change.
pub fn spawn(path: PathBuf, initial: Option<Stamp>, interval: Duration) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut applied = initial;
        let mut pending: Option<Stamp> = None;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = stamp(&path);
            if now.is_none() || now == applied {
                pending = None;
                continue;
            }
            if pending == now {
                applied = now;
                pending = None;
                // Full: a reload is already queued and will read the file.
                if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(()) {
                    return;
                }
            } else {
                pending = now;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_in_place_writes_and_renames_once_each() {
        let dir = std::env::temp_dir().join(format!("watch-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.json");
        std::fs::write(&path, "a").unwrap();
        let mut rx = spawn(path.clone(), stamp(&path), Duration::from_millis(20));
        let quiet = |rx: &mut mpsc::Receiver<()>| rx.try_recv().is_err();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(quiet(&mut rx), "no change, no report");

        std::fs::write(&path, "bb").unwrap();
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .unwrap();
        let tmp = dir.join("c.json.tmp");
        std::fs::write(&tmp, "cc").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(quiet(&mut rx), "one report per change");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

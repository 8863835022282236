//! `--access-log FILE`: the per-connection close line as JSON lines, one
//! object per connection, in a file of its own (in addition to the log).
//!
//! Lines go through a bounded queue to one writer thread: a connection task
//! never blocks on disk I/O, and if the disk stalls long enough to fill the
//! queue, lines are dropped and counted (`proxy_access_log_dropped_total`)
//! rather than stalling the proxy.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

/// Lines queued for the writer before new ones are dropped (~64k lines of
/// ~300 bytes: a few seconds of a very busy proxy, ~20 MB at worst).
const QUEUE: usize = 65_536;

/// One line. Field names are a stable interface (documented in README.md).
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// Close time, RFC 3339 UTC with milliseconds; the key the JSON log
    /// lines use too.
    pub timestamp: String,
    /// Accept time, same format.
    pub start: String,
    pub conn: u64,
    pub app: &'a str,
    pub port: u16,
    pub client: String,
    /// The address the client connected to (`-` if unknown).
    pub local: String,
    /// Accept to an established upstream connection, failovers included.
    pub connect_ms: u64,
    /// The target as configured, "-" if none was connected.
    pub target: &'a str,
    pub attempts: u32,
    /// client → target
    pub bytes_in: u64,
    /// target → client
    pub bytes_out: u64,
    pub userspace_bytes: u64,
    pub duration_ms: u64,
    pub plane: &'a str,
    pub end: &'a str,
}

enum Msg {
    Line(Vec<u8>),
    /// Wakes the writer to look at `AccessLog::reopen_asked`.
    Reopen,
    /// Everything queued before it is written and flushed: then it says so.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// A handle on the writer (cloned for whoever flushes it at exit).
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<Msg>,
    /// `proxy_access_log_dropped_total`.
    dropped: Counter,
    /// A SIGHUP asked for a reopen. A flag beside the queue, not only a
    /// message in it: with the queue full the message was dropped, and the
    /// writer went on writing into the file logrotate had moved away.
    reopen_asked: Arc<AtomicBool>,
}

impl AccessLog {
    /// Opens (creates, appends to) `path` now, so a bad path fails startup,
    /// and starts the writer thread; lines it has to drop count in `dropped`.
    /// A FIFO's open waits for its reader, so it runs on a blocking thread:
    /// start-up still answers signals.
    pub async fn open(path: &Path, dropped: Counter) -> anyhow::Result<AccessLog> {
        if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo()) {
            tracing::info!(path = %path.display(), "--access-log is a FIFO: waiting for its reader");
        }
        let owned = path.to_path_buf();
        let file = tokio::task::spawn_blocking(move || open_append(&owned))
            .await
            .with_context(|| format!("opening --access-log {} failed", path.display()))??;
        let (tx, rx) = sync_channel(QUEUE);
        let path = path.to_path_buf();
        let reopen_asked = Arc::new(AtomicBool::new(false));
        let asked = reopen_asked.clone();
        let lost = dropped.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(path, file, rx, &asked, &lost))
            .context("cannot start the access log thread")?;
        Ok(AccessLog {
            tx,
            dropped,
            reopen_asked,
        })
    }

    pub fn record(&self, entry: &Entry<'_>) {
        let Ok(mut line) = serde_json::to_vec(entry) else {
            return; // cannot happen: plain strings and numbers
        };
        line.push(b'\n');
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Line(line)) {
            self.dropped.inc();
        }
    }

    /// Waits up to `wait` for every line queued so far to reach the file:
    /// at exit, where the writer thread would otherwise die with the
    /// process and take the last close lines (the drain's, the ones an
    /// operator wants most) with it.
    pub async fn flush(&self, wait: Duration) {
        let (done, flushed) = tokio::sync::oneshot::channel();
        let tx = self.tx.clone();
        // A thread of its own: with the queue full, `send` waits for room.
        let sent = std::thread::Builder::new()
            .name("access-log-flush".into())
            .spawn(move || {
                let _ = tx.send(Msg::Flush(done));
            });
        if sent.is_err() || tokio::time::timeout(wait, flushed).await.is_err() {
            tracing::warn!(
                wait_ms = wait.as_millis() as u64,
                "access log: the lines still queued at exit were not all written in time"
            );
        }
    }

    /// Reopens the file by name (after logrotate moved it), on SIGHUP.
    pub fn reopen(&self) {
        self.reopen_asked.store(true, Ordering::Release);
        // Wakes an idle writer; a full queue means it is busy, and it looks
        // at the flag before its next line.
        let _ = self.tx.try_send(Msg::Reopen);
    }
}

fn open_append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open --access-log {}", path.display()))
}

/// Writes the queued lines; one it cannot write (the disk is full, the
/// file is gone) counts in `dropped`, as one the queue had no room for.
fn writer(
    path: PathBuf,
    file: File,
    rx: Receiver<Msg>,
    reopen_asked: &AtomicBool,
    dropped: &Counter,
) {
    let mut out = BufWriter::with_capacity(64 * 1024, file);
    let mut failed = false;
    let mut flushed = Vec::new();
    // Lines in `out` not flushed yet: a failed flush keeps them for the
    // next one, except the last, at exit, which loses them.
    let mut pending = 0u64;
    while let Ok(mut msg) = rx.recv() {
        loop {
            if reopen_asked.swap(false, Ordering::AcqRel) {
                // The old writer goes, with whatever it could not write.
                match out.flush() {
                    Ok(()) => pending = 0,
                    Err(_) => {
                        dropped.inc_by(std::mem::take(&mut pending));
                    }
                }
                match open_append(&path) {
                    Ok(f) => {
                        out = BufWriter::with_capacity(64 * 1024, f);
                        failed = false;
                    }
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "access log reopen failed; still writing to the old file")
                    }
                }
            }
            match msg {
                Msg::Line(line) => match out.write_all(&line) {
                    Ok(()) => pending += 1,
                    Err(e) => {
                        dropped.inc();
                        report(&mut failed, &path, &e);
                    }
                },
                Msg::Flush(done) => flushed.push(done),
                Msg::Reopen => {}
            }
            // Batch whatever is queued, then flush: lines reach the file
            // within one queue drain, without a syscall per line under load.
            match rx.try_recv() {
                Ok(next) => msg = next,
                Err(_) => break,
            }
        }
        match out.flush() {
            Ok(()) => {
                failed = false;
                pending = 0;
            }
            Err(e) => {
                report(&mut failed, &path, &e);
                if !flushed.is_empty() {
                    // The process is exiting: these will not be written.
                    dropped.inc_by(std::mem::take(&mut pending));
                }
            }
        }
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
    let _ = out.flush();
}

/// Logs a write error once until the next success, not once per line.
fn report(failed: &mut bool, path: &Path, e: &std::io::Error) {
    if !*failed {
        tracing::error!(path = %path.display(), error = %e, "cannot write the access log");
        *failed = true;
    }
}

/// `t` as RFC 3339 UTC with milliseconds, the access log's times.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    /// logrotate moved the file and the SIGHUP's wake-up message was lost
    /// to a full queue: the writer still reopens before its next line,
    /// which lands in the new file, not in the moved one.
    #[test]
    fn a_reopen_survives_a_full_queue() {
        let dir = std::env::temp_dir().join(format!("access-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, moved) = (dir.join("access.log"), dir.join("access.log.1"));
        let file = open_append(&path).unwrap();
        let (tx, rx) = sync_channel(4);
        let asked = Arc::new(AtomicBool::new(false));
        let writer_asked = asked.clone();
        let writer_path = path.clone();
        let writing = std::thread::spawn(move || {
            writer(writer_path, file, rx, &writer_asked, &Counter::default())
        });
        tx.send(Msg::Line(b"before\n".to_vec())).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read(&path).unwrap_or_default() != b"before\n" {
            assert!(
                std::time::Instant::now() < deadline,
                "first line never written"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::rename(&path, &moved).unwrap();
        // The flag, and no `Msg::Reopen`: as when the queue was full.
        asked.store(true, Ordering::Release);
        tx.send(Msg::Line(b"after\n".to_vec())).unwrap();
        drop(tx);
        writing.join().unwrap();
        assert_eq!(std::fs::read(&moved).unwrap(), b"before\n");
        assert_eq!(std::fs::read(&path).unwrap(), b"after\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789); // leap day
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.789Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000Z");
    }

    #[tokio::test]
    async fn writes_lines_and_reopens() {
        let dir = std::env::temp_dir().join(format!("access-log-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("a.log");
        let _ = std::fs::remove_file(&path);
        let log = AccessLog::open(&path, Counter::default()).await.unwrap();
        let entry = |conn| Entry {
            timestamp: rfc3339(SystemTime::now()),
            start: rfc3339(SystemTime::now()),
            conn,
            app: "a",
            port: 1,
            client: "127.0.0.1:2".into(),
            local: "127.0.0.1:1".into(),
            connect_ms: 1,
            target: "t:3",
            attempts: 1,
            bytes_in: 4,
            bytes_out: 5,
            userspace_bytes: 9,
            duration_ms: 6,
            plane: "copy",
            end: "closed",
        };
        log.record(&entry(1));
        // Rotate: move the file away, reopen, write again.
        let rotated = dir.join("a.log.1");
        let wait_for = |p: &Path, n: usize| {
            for _ in 0..200 {
                if std::fs::read_to_string(p).map_or(0, |s| s.lines().count()) >= n {
                    return std::fs::read_to_string(p).unwrap();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("{} did not get {n} lines", p.display());
        };
        wait_for(&path, 1);
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        log.record(&entry(2));
        let new = wait_for(&path, 1);
        let v: serde_json::Value = serde_json::from_str(new.trim()).unwrap();
        assert_eq!(v["conn"], 2);
        assert_eq!(v["bytes_out"], 5);
        assert_eq!(wait_for(&rotated, 1).lines().count(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

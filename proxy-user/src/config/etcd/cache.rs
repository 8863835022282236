//! The last good etcd config on local disk (`--config-etcd-cache`), so a
//! proxy restarted while etcd is unreachable still serves what it served.
//!
//! Written only after a config from etcd was validated and applied, so the
//! cache never holds a config this proxy rejected; replaced by rename, so a
//! crash mid-write leaves the previous cache whole.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// What the cache holds: the config text and the revision it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub revision: i64,
    pub prefix: String,
    pub text: String,
}

/// Numbers the writes, newest highest.
static NEXT_WRITE: AtomicU64 = AtomicU64::new(1);
/// Per cache path, the newest write done. Held across a write: writes of
/// one path run one at a time (they share a temp file), and one older than
/// what is on disk is skipped. A caller may stop waiting for a stalled write
/// (`source.rs` bounds it), which still runs on: without this, its late
/// bytes could land in the file a newer write had renamed into place.
static WRITTEN: Mutex<Option<HashMap<PathBuf, u64>>> = Mutex::new(None);

/// Writes `cached` to `path` atomically (temp file in the same directory,
/// fsync, rename), unless a newer write got there first.
pub async fn write(path: &Path, cached: &Cached) -> anyhow::Result<()> {
    let config: Value = serde_json::from_str(&cached.text).context("cached config is not JSON")?;
    let body = serde_json::to_vec_pretty(&json!({
        "Revision": cached.revision,
        "Prefix": cached.prefix,
        "Config": config,
    }))?;
    let path = path.to_path_buf();
    let this = NEXT_WRITE.fetch_add(1, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || write_if_newest(&path, &body, this).map(drop))
        .await
        .context("cache writer task failed")?
}

/// Write number `this` of `path`; false: skipped, a newer one was written.
fn write_if_newest(path: &Path, body: &[u8], this: u64) -> anyhow::Result<bool> {
    let mut written = WRITTEN.lock().unwrap_or_else(|p| p.into_inner());
    let newest = (written.get_or_insert_with(HashMap::new))
        .entry(path.to_path_buf())
        .or_insert(0);
    if *newest > this {
        return Ok(false);
    }
    write_now(path, body)?;
    *newest = this;
    Ok(true)
}

fn write_now(path: &Path, body: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = tmp_path(path);
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(body)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// Reads a cache written by `write`; errors name the file and the fix.
pub async fn read(path: &Path) -> anyhow::Result<Cached> {
    let text = crate::config::file::read(path).await?;
    let fix = "delete it; it is rewritten after the next config from etcd";
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("config cache {}: invalid JSON; {fix}", path.display()))?;
    let (Some(revision), Some(prefix), Some(config)) = (
        v.get("Revision").and_then(Value::as_i64),
        v.get("Prefix").and_then(Value::as_str),
        v.get("Config"),
    ) else {
        bail!(
            "config cache {}: needs Revision, Prefix and Config; {fix}",
            path.display()
        );
    };
    Ok(Cached {
        revision,
        prefix: prefix.to_string(),
        text: config.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips_and_refuses_junk() {
        let path = std::env::temp_dir().join(format!("etcd-cache-{}.json", std::process::id()));
        let c = Cached {
            revision: 42,
            prefix: "/p/".into(),
            text: r#"{"Apps":[]}"#.into(),
        };
        write(&path, &c).await.unwrap();
        assert_eq!(read(&path).await.unwrap(), c);
        std::fs::write(&path, r#"{"Revision":1}"#).unwrap();
        let e = format!("{:#}", read(&path).await.unwrap_err());
        assert!(e.contains("needs Revision, Prefix and Config"), "{e}");
        let _ = std::fs::remove_file(&path);
    }

    /// A write the caller stopped waiting for (a stalled disk) that runs
    /// after a newer one must not put its older table back.
    #[test]
    fn an_older_write_never_lands_after_a_newer_one() {
        let path =
            std::env::temp_dir().join(format!("etcd-cache-order-{}.json", std::process::id()));
        let (older, newer) = (
            NEXT_WRITE.fetch_add(1, Ordering::Relaxed),
            NEXT_WRITE.fetch_add(1, Ordering::Relaxed),
        );
        assert!(write_if_newest(&path, b"newer", newer).unwrap());
        assert!(!write_if_newest(&path, b"older", older).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"newer");
        let _ = std::fs::remove_file(&path);
    }
}

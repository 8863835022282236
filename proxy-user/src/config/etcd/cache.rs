//! The last good etcd config on local disk (`--config-etcd-cache`), so a
//! proxy restarted while etcd is unreachable still serves what it served.
//!
//! Written only after a config from etcd was validated and applied, so the
//! cache never holds a config this proxy rejected; replaced by rename, so a
//! crash mid-write leaves the previous cache whole.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// What the cache holds: the config text and the revision it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub revision: i64,
    pub prefix: String,
    pub text: String,
}

/// Writes `cached` to `path` atomically (temp file in the same directory,
/// fsync, rename).
pub async fn write(path: &Path, cached: &Cached) -> anyhow::Result<()> {
    let config: Value = serde_json::from_str(&cached.text).context("cached config is not JSON")?;
    let body = serde_json::to_vec_pretty(&json!({
        "Revision": cached.revision,
        "Prefix": cached.prefix,
        "Config": config,
    }))?;
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || write_now(&path, &body))
        .await
        .context("cache writer task failed")?
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
}

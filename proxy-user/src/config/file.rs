//! Reading the config file, at start and on every reload: a regular file of
//! bounded size, read in bounded time. A FIFO would block `open()` until a
//! writer comes, `/dev/zero` would be read until memory runs out and a
//! stalled network mount would hang the reload; each is refused with the
//! reason instead.

use std::fs::{Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

/// Far above any real config (10,000 ports as ranges are a few KiB), far
/// below what would hurt the proxy to hold twice (text and parsed).
pub const MAX_BYTES: u64 = 16 << 20;

/// A local file is read in microseconds; this only cuts a stalled mount.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the config file at `path` on a blocking thread, within
/// `READ_TIMEOUT`; every error names the file and the fix.
pub async fn read(path: &Path) -> anyhow::Result<String> {
    let owned = path.to_path_buf();
    let reading = tokio::task::spawn_blocking(move || read_now(&owned));
    match tokio::time::timeout(READ_TIMEOUT, reading).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(anyhow!(e).context(format!(
            "reading config file {} failed unexpectedly",
            path.display()
        ))),
        Err(_) => bail!(
            "config file {}: not read within {READ_TIMEOUT:?} (a stalled network mount?); put the config on a local filesystem",
            path.display()
        ),
    }
}

fn read_now(path: &Path) -> anyhow::Result<String> {
    let cannot = || format!("cannot read config file {}", path.display());
    // Checked before open(): open() itself blocks on a FIFO.
    let meta = std::fs::metadata(path).with_context(cannot)?;
    check(&meta, path)?;
    // Should a FIFO be swapped in after the check, O_NONBLOCK makes open()
    // return at once, and fstat below refuses it.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(cannot)?;
    check(&file.metadata().with_context(cannot)?, path)?;
    let mut bytes = Vec::new();
    // One byte over the cap tells a file that grew since fstat.
    file.take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(cannot)?;
    if bytes.len() as u64 > MAX_BYTES {
        bail!("{}", too_big(path));
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "config file {} is not UTF-8 text (bad byte at offset {}); save it as UTF-8 JSON",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// Regular files only (a symlink to one is followed), at most `MAX_BYTES`.
fn check(meta: &Metadata, path: &Path) -> anyhow::Result<()> {
    let kind = meta.file_type();
    let what = if kind.is_file() {
        None
    } else if kind.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_block_device() {
        Some("a block device")
    } else if kind.is_socket() {
        Some("a socket")
    } else if kind.is_dir() {
        Some("a directory")
    } else {
        Some("not a file")
    };
    if let Some(what) = what {
        bail!(
            "config file {} is {what}, not a regular file; point --config at a regular JSON file (a symlink to one is fine)",
            path.display()
        );
    }
    if meta.len() > MAX_BYTES {
        bail!("{}", too_big(path));
    }
    Ok(())
}

fn too_big(path: &Path) -> String {
    format!(
        "config file {} is over the size cap of 16 MiB ({MAX_BYTES} bytes); a real config is far smaller: check that --config names the right file (write many ports as ranges like \"8000-8999\")",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(what: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("config-file-{}-{what}", std::process::id()))
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_small_regular_file() {
        async fn err(p: &Path) -> String {
            format!("{:#}", read(p).await.unwrap_err())
        }
        let fifo = scratch("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = err(&fifo).await;
        assert!(
            e.contains("FIFO") && e.contains(fifo.to_str().unwrap()),
            "{e}"
        );
        let _ = std::fs::remove_file(&fifo);

        let e = err(Path::new("/dev/zero")).await;
        assert!(e.contains("/dev/zero is a character device"), "{e}");
        let e = err(&std::env::temp_dir()).await;
        assert!(e.contains("is a directory"), "{e}");

        let big = scratch("big.json");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_BYTES + 1)
            .unwrap();
        let e = err(&big).await;
        assert!(e.contains("over the size cap of 16 MiB"), "{e}");
        let _ = std::fs::remove_file(&big);

        let bin = scratch("latin1.json");
        std::fs::write(&bin, b"{\"Apps\":\xe9}").unwrap();
        let e = err(&bin).await;
        assert!(e.contains("not UTF-8") && e.contains("offset 8"), "{e}");
        let _ = std::fs::remove_file(&bin);
    }

    #[tokio::test]
    async fn reads_a_regular_file() {
        let ok = scratch("ok.json");
        std::fs::write(&ok, "{}").unwrap();
        assert_eq!(read(&ok).await.unwrap(), "{}");
        let _ = std::fs::remove_file(&ok);
    }
}

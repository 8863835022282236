//! `--handoff-socket PATH`: where a running proxy waits for its successor.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;

use super::wire::Link;

pub struct HandoffSocket {
    path: PathBuf,
    sock: AsyncFd<Socket>,
    /// (dev, inode) of the socket file we made: a path replaced since is
    /// not ours to remove.
    file: (u64, u64),
}

impl HandoffSocket {
    /// Binds `path`. A stale file (its process is gone) is replaced; one a
    /// live proxy listens on is refused: two proxies would fight over it.
    pub fn bind(path: &Path) -> anyhow::Result<HandoffSocket> {
        let what = || format!("--handoff-socket {}", path.display());
        if path.exists() {
            if Link::connect(path).is_ok() {
                bail!(
                    "{}: another proxy is listening there; start this one with --takeover {} to take over from it",
                    what(),
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("{}: removing the stale socket", what()))?;
        }
        let sock = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)
            .with_context(|| format!("{}: creating the socket", what()))?;
        let addr = SockAddr::unix(path).with_context(what)?;
        sock.bind(&addr)
            .with_context(|| format!("{}: cannot bind", what()))?;
        // Only the proxy's own user may hand a proxy its replacement.
        let _ = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        sock.listen(4).with_context(what)?;
        sock.set_nonblocking(true).with_context(what)?;
        let meta = std::fs::metadata(path).with_context(what)?;
        // SAFETY: the Socket owns its fd and is only closed when the
        // AsyncFd (which owns the Socket) is dropped.
        let sock = unsafe { AsyncFd::register(sock) }
            .map_err(|e| e.into_parts().1)
            .with_context(what)?;
        Ok(HandoffSocket {
            path: path.to_path_buf(),
            sock,
            file: (meta.dev(), meta.ino()),
        })
    }

    /// The next successor to connect.
    pub async fn accept(&self) -> std::io::Result<Link> {
        loop {
            let mut ready = self.sock.readable().await?;
            match ready.try_io(|s| s.get_ref().accept()) {
                Ok(Ok((sock, _))) => return Link::new(sock),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Stops listening and removes the path, if it is still ours.
    pub fn close(self) {
        let ours = std::fs::metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.file)
            .unwrap_or(false);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

//! Userspace copy data plane.
//!
//! Each direction is an independent pump: read from one socket, write all of
//! it to the other. EOF on one side becomes `shutdown(Write)` on the other
//! only after every byte read was written (half-close propagates per
//! direction); a reset becomes a reset (SO_LINGER 0 then close), so the peer
//! learns the stream was cut rather than seeing a clean end. Both belong to
//! the shared `userspace` supervisor.

use std::io;

use tokio::net::TcpStream;

use super::safepoint;
use super::userspace::{first_bytes, pass_fin, DirEnd, Pump, Tally};
use super::{ConnInfo, Plane, Transfer};

/// Default per-direction buffer. Measured on this 2-vCPU VM (release build,
/// loopback, 2 GB one way through the proxy, interleaved runs, noisy host):
/// proxy CPU per GB was ~0.90 s at 16 KiB, ~0.68 s at 64 KiB, ~0.65 s at
/// 128 KiB, ~0.62 s at 256 KiB; throughput medians 0.65 / 0.85 / 0.7 / 0.75
/// GB/s for one stream. 64 KiB gets most of the gain at a quarter of the
/// memory of 256 KiB (128 KiB vs 512 KiB per busy connection).
// The flag's default is written as text in cli.rs; a test holds the two equal.
#[cfg_attr(not(test), allow(dead_code))]
pub const DEFAULT_BUFFER: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct CopyPlane {
    /// Bytes per direction; allocated only once that direction has data (or
    /// its FIN), so idle connections cost no buffer memory until they speak.
    pub buffer_size: usize,
}

impl CopyPlane {
    pub async fn carry(&self, client: TcpStream, upstream: TcpStream, conn: &ConnInfo) -> Transfer {
        safepoint::carry(self, client, upstream, conn).await
    }
}

impl Pump for CopyPlane {
    const PLANE: Plane = Plane::Copy;

    async fn pump(&self, src: &TcpStream, dst: &TcpStream, t: Tally<'_>, _: &ConnInfo) -> DirEnd {
        pump(src, dst, self.buffer_size, t).await
    }
}

/// One direction: read into a buffer, write all of it out.
pub(super) async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    buf_size: usize,
    tally: Tally<'_>,
) -> DirEnd {
    if let Err(e) = first_bytes(src).await {
        return DirEnd::ReadFailed(e);
    }
    let mut buf = vec![0u8; buf_size.max(1)];
    loop {
        // Here and in `first_bytes` this direction holds nothing: where
        // `safepoint` may stop it.
        if let Err(e) = src.readable().await {
            return DirEnd::ReadFailed(e);
        }
        let n = match src.try_read(&mut buf) {
            Ok(0) => {
                // Everything read so far was written in full (write loop
                // below), so the FIN can follow it now.
                return pass_fin(dst);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return DirEnd::ReadFailed(e),
        };
        tally.read(n);
        let mut off = 0;
        while off < n {
            if let Err(e) = dst.writable().await {
                return DirEnd::WriteFailed(e);
            }
            match dst.try_write(&buf[off..n]) {
                Ok(m) => {
                    off += m;
                    tally.wrote(m);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return DirEnd::WriteFailed(e),
            }
        }
    }
}

//! Userspace copy data plane.
//!
//! Each direction is an independent pump: read from one socket, write all of
//! it to the other. EOF on one side becomes `shutdown(Write)` on the other
//! only after every byte read was written (half-close propagates per
//! direction); a reset becomes a reset (SO_LINGER 0 then close), so the peer
//! learns the stream was cut rather than seeing a clean end. Both belong to
//! the shared `userspace` supervisor.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;

use futures_util::FutureExt;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::pool::{give_back, take_buffer};
use super::safepoint;
use super::userspace::{readable, write_all_with, DirEnd, Pump, Tally};
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
    /// `safepoint::carry`'s future as is: a wrapper would keep a second
    /// copy of both sockets for the connection's life.
    pub fn carry<'a>(
        &'a self,
        client: TcpStream,
        upstream: TcpStream,
        conn: &'a ConnInfo,
    ) -> impl Future<Output = Transfer> + 'a {
        safepoint::carry(self, client, upstream, conn, [0, 0])
    }

    /// Like `carry`, after `before` bytes each way that another plane of
    /// this process moved first: they count as moved (the close line, and
    /// an upgrade's record if the connection parks).
    pub fn carry_after<'a>(
        &'a self,
        client: TcpStream,
        upstream: TcpStream,
        conn: &'a ConnInfo,
        before: [u64; 2],
    ) -> impl Future<Output = Transfer> + 'a {
        safepoint::carry(self, client, upstream, conn, before)
    }
}

impl Pump for CopyPlane {
    const PLANE: Plane = Plane::Copy;

    fn pump<'a>(
        &'a self,
        src: &'a TcpStream,
        dst: &'a TcpStream,
        t: Tally<'a>,
        _: &'a ConnInfo,
    ) -> impl Future<Output = DirEnd> + 'a {
        pump(src, dst, self.buffer_size, t)
    }
}

/// One direction: read into a buffer, write all of it out.
/// (An async block, as `splice::pump`.)
pub(super) fn pump<'a>(
    src: &'a TcpStream,
    dst: &'a TcpStream,
    buf_size: usize,
    tally: Tally<'a>,
) -> impl Future<Output = DirEnd> + 'a {
    async move {
        let size = buf_size.max(1);
        // Held only while the source has bytes: an idle direction holds no
        // buffer, and a new connection reuses one instead of zeroing a fresh one.
        let mut held: Option<Vec<u8>> = None;
        loop {
            // Between iterations this direction holds nothing (a held buffer
            // is empty): where `safepoint` may stop it.
            if let Err(e) = readable(src).await {
                if let Some(buf) = held {
                    give_back(buf);
                }
                return DirEnd::ReadFailed(e);
            }
            let mut buf = held.take().unwrap_or_else(|| take_buffer(size));
            let forwarded = match forward(src, dst, &mut buf, &tally) {
                Forward::Done(forwarded) => forwarded,
                Forward::Blocked(rest) => rest.await,
            };
            match forwarded {
                // A full read: more is likely waiting, keep the buffer.
                Forwarded::Some(n) if n == buf.len() => held = Some(buf),
                // A short read cleared readiness: the source is dry, and an
                // idle direction holds no buffer.
                Forwarded::Some(_) | Forwarded::Dry => give_back(buf),
                Forwarded::End(end) => {
                    give_back(buf);
                    return end;
                }
            }
        }
    }
}

/// What one `forward` did.
pub(super) enum Forwarded {
    /// Moved this many bytes (all of them written).
    Some(usize),
    /// Nothing to read right now; read readiness is cleared.
    Dry,
    /// The direction is over: the FIN was passed on, or an error.
    End(DirEnd),
}

/// One read from `src` into `buf` and all of it written to `dst`: nothing
/// is left in `buf` afterwards once it is `Done`, or once the `Blocked`
/// rest is awaited, so the caller may pause or hand over.
///
/// The read and the first writes happen here, without a future: most
/// messages are written whole at the first try. Only when `dst` is full
/// does the rest wait, in a boxed future: that future is the bulk of a
/// waiting direction, and an idle one never holds it. (Boxing every call,
/// as before, cost an allocation per message: two per round trip on rr50.)
pub(super) fn forward<'a>(
    src: &'a TcpStream,
    dst: &'a TcpStream,
    buf: &'a mut [u8],
    tally: &'a Tally<'_>,
) -> Forward<impl Future<Output = Forwarded> + 'a> {
    let fin_queued = fin_arrived(src);
    let n = match read_some(src, buf) {
        Ok(0) => {
            // Everything read so far was written in full (the writes
            // below), so the FIN can follow it now.
            return Forward::Done(Forwarded::End(tally.pass_fin(dst)));
        }
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Forward::Done(Forwarded::Dry),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
            return Forward::Done(Forwarded::Some(0))
        }
        Err(e) => return Forward::Done(Forwarded::End(DirEnd::ReadFailed(e))),
    };
    tally.read(n);
    // The source's FIN was in before this read, and the read emptied the
    // queue: the next read ends the direction (or fails), and the FIN (or
    // a reset) goes out right after these bytes. MSG_MORE holds them back
    // until then, so the FIN rides on their segment, as HAProxy's do: a
    // reply that ends its connection costs one segment and one ACK less
    // (NOTES §2, "The FIN on the last segment"). Between this write and
    // that read the pump awaits only `readable`, which read-closed keeps
    // ready; if a safepoint stopped it there (an upgrade, a promotion),
    // whoever reads next finds the FIN at once and shuts the socket,
    // which sends the bytes.
    let more = if fin_queued && n < buf.len() {
        libc::MSG_MORE
    } else {
        0
    };
    let read: &'a [u8] = &buf[..n];
    let mut written = 0;
    while written < n {
        match send(dst, &read[written..], more) {
            Ok(m) => {
                written += m;
                tally.wrote(m);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // `dst` is full: the rest waits for room, watching `src`.
                let rest = &read[written..];
                return Forward::Blocked(Box::pin(async move {
                    let sent = write_all_with(src, dst, rest, |b| {
                        let m = send(dst, b, more)?;
                        tally.wrote(m);
                        Ok(m)
                    });
                    match sent.await {
                        Ok(()) => Forwarded::Some(n),
                        Err(end) => Forwarded::End(end),
                    }
                }));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Forward::Done(Forwarded::End(DirEnd::WriteFailed(e))),
        }
    }
    Forward::Done(Forwarded::Some(n))
}

/// What `forward` did at once.
pub(super) enum Forward<F> {
    Done(Forwarded),
    /// `dst` is full: the rest of the read is written as this is awaited.
    Blocked(Pin<Box<F>>),
}

/// Whether `src`'s peer has sent its FIN, as the last readiness event
/// said. Read-closed is a final state, so a yes stays true. Not after an
/// error (a reset closes reading too): the next read would fail, and the
/// bytes held back would go with the reset it passes on, where before they
/// went out ahead of it. The error bit is reported only to an ERROR
/// interest: READABLE alone masks it. Once the FIN is in, a later reset
/// does not change what the next read says: 0, the end (tcp_recvmsg
/// checks SOCK_DONE before the error).
fn fin_arrived(src: &TcpStream) -> bool {
    matches!(
        src.ready(Interest::READABLE | Interest::ERROR).now_or_never(),
        Some(Ok(ready)) if ready.is_read_closed() && !ready.is_error()
    )
}

/// `send(2)` with `flags` (and MSG_NOSIGNAL, as every write here).
fn send(dst: &TcpStream, bytes: &[u8], flags: libc::c_int) -> io::Result<usize> {
    dst.try_io(Interest::WRITABLE, || {
        // SAFETY: bytes is a readable buffer of bytes.len() bytes.
        let n = unsafe {
            libc::send(
                dst.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                flags | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    })
}

/// Reads what `src` holds, up to `buf`'s length. A short read means TCP's
/// receive queue (and backlog) were empty when it returned (tcp_recvmsg
/// stops early only then, or at an urgent mark), so read readiness is
/// cleared right away: that saves the read that would only say EAGAIN, one
/// syscall in three on small messages. Tokio's own `poll_read` does the
/// same; its readiness ticks keep an event that arrived meanwhile.
fn read_some(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut short = None;
    let read = src.try_io(Interest::READABLE, || {
        // SAFETY: buf is a writable buffer of buf.len() bytes.
        let n = unsafe { libc::recv(src.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n > 0 && n < buf.len() {
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match short {
        Some(n) => Ok(n),
        None => read,
    }
}

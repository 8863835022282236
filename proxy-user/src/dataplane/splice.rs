//! Zero-copy userspace data plane: `splice(2)` socket → pipe → socket, the
//! way HAProxy's `option splice-*` does it.
//!
//! Userspace still decides every move (so half-close, resets, idle and drain
//! behave exactly as on the copy plane: same `supervise`), but the payload
//! pages go from one socket's receive queue to the other's send queue by
//! reference, never through a userspace buffer. A direction holds a pipe
//! only while a bulk burst goes through it: when its source runs dry the
//! (empty) pipe goes back to a per-thread shelf (`pool.rs`), so an idle
//! connection holds no pipe, and the next burst reuses one instead of
//! paying pipe2 + F_SETPIPE_SZ + two closes. A direction whose pipe cannot
//! be made (fd or pipe-memory limit) is carried by the copy pump instead,
//! and says so.
//!
//! Ordering: a direction fills its pipe from the source only when the pipe is
//! empty, and empties it into the destination before the next fill, so the
//! pipe never holds more than one read and nothing can overtake it; EOF is
//! passed on only with the pipe empty.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::Context;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::copy::{self, CopyPlane, Forward, Forwarded};
use super::pool::{self, Shelf};
use super::safepoint;
use super::userspace::{readable, writable, DirEnd, Pump, Tally};
use super::{ConnInfo, Plane, Transfer};

/// Default pipe per direction. A pipe holds page references only while a
/// burst goes through it, and goes back to the shelf empty, so its size
/// costs memory only under way (and behind a slow reader, at most this per
/// direction), never per idle connection. Measured against 64 KiB, the copy
/// buffer's size it used to share (`bench/profile/peers.sh cpu BIN:auto
/// LOAD 3s`, two alternating rounds, NOTES §2 "Every connection's task in a
/// smaller class"): bulk 2,275 and 2,300 against 2,036 and 1,992 MB/s, at
/// 286–301 against 381–391 µs of proxy CPU per MB; parallel 2,733 and
/// 2,556 against 2,444 and 2,501; bidi 2,225 and 2,252 against 2,091 and
/// 2,242; rr50 and churn unchanged.
// The flag's default is written as text in cli.rs; a test holds the two equal.
#[cfg_attr(not(test), allow(dead_code))]
pub const DEFAULT_PIPE: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct SplicePlane {
    /// Requested pipe capacity per direction (the kernel rounds up to a
    /// power-of-two number of pages and caps it at fs.pipe-max-size).
    pub pipe_size: usize,
    /// The copy pump's buffer, for a direction whose pipe cannot be made.
    pub fallback_buffer: usize,
}

impl SplicePlane {
    /// `pipe_size`: `--splice-pipe`; `copy`: the plane a direction falls
    /// back on. Proves on a loopback pair that splice(2) moves TCP bytes
    /// here (a seccomp filter or an exotic kernel could refuse it), so a
    /// refusal is a startup error rather than a reset on every connection.
    pub fn load(pipe_size: usize, copy: &CopyPlane) -> anyhow::Result<Self> {
        let plane = SplicePlane {
            pipe_size,
            fallback_buffer: copy.buffer_size,
        };
        probe(plane.pipe_size)
            .context("splice(2) of a TCP socket through a pipe failed on a loopback probe")?;
        Ok(plane)
    }

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
}

impl Pump for SplicePlane {
    const PLANE: Plane = Plane::Splice;

    fn pump<'a>(
        &'a self,
        src: &'a TcpStream,
        dst: &'a TcpStream,
        t: Tally<'a>,
        c: &'a ConnInfo,
    ) -> impl Future<Output = DirEnd> + 'a {
        pump(src, dst, self, t, c.id)
    }
}

/// The two ends of one direction's pipe.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Most bytes one fill asks for.
    size: usize,
    /// The size it was made for (the shelf's key).
    asked: usize,
}

impl Pipe {
    fn new(asked: usize) -> io::Result<Pipe> {
        let size = asked;
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let requested = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        // SAFETY: fcntl on an fd we own, with an integer argument.
        let size = match unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, requested) } {
            // The kernel rounds up to a power-of-two number of pages.
            n if n > 0 => n as usize,
            _ => {
                // A smaller pipe only means more calls per byte; not fatal
                // (an unprivileged process above fs.pipe-max-size gets EPERM).
                tracing::debug!(error = %io::Error::last_os_error(), size, "F_SETPIPE_SZ failed; default pipe size");
                // SAFETY: as above.
                match unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) } {
                    n if n > 0 => n as usize,
                    _ => 16 * 4096,
                }
            }
        };
        Ok(Pipe {
            read,
            write,
            size,
            asked,
        })
    }

    /// Moves what `src` holds (up to the pipe's size) into the empty pipe.
    /// `Ok(0)` is the source's FIN; `WouldBlock` clears its read readiness.
    fn fill(&self, src: &TcpStream) -> io::Result<usize> {
        src.try_io(Interest::READABLE, || {
            splice(src.as_raw_fd(), self.write.as_raw_fd(), self.size)
        })
    }

    /// Writes the `pending` bytes a fill from `src` left in the pipe into
    /// `dst`, reporting each partial write to `written`.
    async fn drain(
        &self,
        src: &TcpStream,
        dst: &TcpStream,
        mut pending: usize,
        mut written: impl FnMut(usize),
    ) -> Result<(), DirEnd> {
        while pending > 0 {
            writable(src, dst).await?;
            let drained = dst.try_io(Interest::WRITABLE, || {
                splice(self.read.as_raw_fd(), dst.as_raw_fd(), pending)
            });
            match drained {
                Ok(0) => return Err(DirEnd::WriteFailed(io::ErrorKind::WriteZero.into())),
                Ok(m) => {
                    pending -= m;
                    written(m);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(DirEnd::WriteFailed(e)),
            }
        }
        Ok(())
    }
}

/// The read that starts each burst. Larger than most requests and
/// replies; a read that fills it is taken for bulk.
const FIRST_READ: usize = 16 * 1024;

thread_local! {
    /// Empty pipes: only a pipe every fill of which was drained goes back,
    /// one that may hold bytes (a failed write) is dropped, so no byte can
    /// reach another connection.
    static PIPES: Shelf<Pipe> = const { Shelf::new() };
}

fn take_pipe(size: usize) -> io::Result<Pipe> {
    PIPES.with(|s| s.take(|p| p.asked == size, || Pipe::new(size)))
}

/// A pipe the kernel would not grow to its asked size (pipe-page limits
/// without root) is closed, not shelved: kept, it would serve later bursts
/// small, long after the pressure passed, and its pages count against the
/// limit meanwhile.
fn give_back(pipe: Pipe) {
    if pipe.size >= pipe.asked {
        PIPES.with(|s| s.give(pipe));
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain fds and null offsets (both ends are a socket or a pipe).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One byte across a loopback TCP pair: socket → pipe → socket.
fn probe(pipe_size: usize) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("binding a probe listener")?;
    let mut client = std::net::TcpStream::connect(listener.local_addr()?)
        .context("connecting the probe pair")?;
    let (server, _) = listener.accept().context("accepting the probe pair")?;
    client.write_all(b"p")?;
    let pipe = Pipe::new(pipe_size).context("creating a pipe")?;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match splice(server.as_raw_fd(), pipe.write.as_raw_fd(), 1) {
            Ok(1) => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(n) => anyhow::bail!("socket → pipe moved {n} bytes, expected 1"),
            Err(e) => return Err(anyhow::Error::new(e).context("socket → pipe")),
        }
    }
    // Back out of the accepted side, to the client.
    match splice(pipe.read.as_raw_fd(), server.as_raw_fd(), 1) {
        Ok(1) => {}
        Ok(n) => anyhow::bail!("pipe → socket moved {n} bytes, expected 1"),
        Err(e) => return Err(anyhow::Error::new(e).context("pipe → socket")),
    }
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut back = [0u8; 1];
    client
        .read_exact(&mut back)
        .context("reading the probe byte back")?;
    anyhow::ensure!(&back == b"p", "the probe byte came back changed");
    Ok(())
}

/// One direction. Each burst starts with a plain read into a small pooled
/// buffer (`copy::forward`): a request or a reply usually fits, and for a
/// few hundred bytes a read and a write cost less than two splices, and the
/// short read tells that the socket is dry without another call. A read
/// that fills the buffer means a bulk burst: it goes on through the pipe,
/// zero-copy, until the source runs dry. (HAProxy's `splice-auto` makes
/// the same split.)
///
/// An async block over its arguments, not an async fn, which would keep a
/// second copy of them (the tally's 32 bytes) in every waiting direction.
fn pump<'a>(
    src: &'a TcpStream,
    dst: &'a TcpStream,
    plane: &'a SplicePlane,
    tally: Tally<'a>,
    conn_id: u64,
) -> impl Future<Output = DirEnd> + 'a {
    async move {
        // A pipe held across an await other than the drain's is empty, so
        // `safepoint` stopping this direction there leaves nothing behind.
        let mut pipe: Option<Pipe> = None;
        let mut bulk = false;
        loop {
            if let Err(e) = readable(src).await {
                if let Some(p) = pipe {
                    give_back(p);
                }
                return DirEnd::ReadFailed(e);
            }
            if !bulk {
                let mut buf = pool::take_buffer(FIRST_READ);
                let forwarded = match copy::forward(src, dst, &mut buf, &tally) {
                    Forward::Done(forwarded) => forwarded,
                    Forward::Blocked(rest) => rest.await,
                };
                pool::give_back(buf);
                match forwarded {
                    // A full read: a bulk burst, which goes on through the pipe.
                    Forwarded::Some(n) => bulk = n == FIRST_READ,
                    Forwarded::Dry => {}
                    Forwarded::End(end) => return end,
                }
                continue;
            }
            let p = match pipe.take().map_or_else(|| take_pipe(plane.pipe_size), Ok) {
                Ok(p) => p,
                Err(e) => {
                    // Between fills nothing is in flight here, so the copy pump
                    // can take over at any point.
                    tracing::warn!(conn = conn_id, error = %e, "cannot create a splice pipe; this direction uses the copy pump");
                    return Box::pin(copy::pump(src, dst, plane.fallback_buffer, tally)).await;
                }
            };
            let pending = match p.fill(src) {
                Ok(0) => {
                    // The pipe is empty (drained below before every fill), so
                    // every byte read was handed on: the FIN may follow.
                    give_back(p);
                    return tally.pass_fin(dst);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The burst is over: the next one starts with a read, and
                    // an idle direction holds no pipe.
                    give_back(p);
                    bulk = false;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    pipe = Some(p);
                    continue;
                }
                Err(e) => {
                    give_back(p);
                    return DirEnd::ReadFailed(e);
                }
            };
            tally.read(pending);
            if let Err(end) = Box::pin(p.drain(src, dst, pending, |m| tally.wrote(m))).await {
                // It may still hold bytes: dropped, never given back.
                return end;
            }
            pipe = Some(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipe the kernel kept smaller than asked is not shelved as a full
    /// one: the next burst that asks for the size gets a pipe of it. (The
    /// refusal is played by lowering what the pipe thinks it got: as root,
    /// F_SETPIPE_SZ does not refuse.)
    #[test]
    fn a_pipe_smaller_than_asked_is_not_shelved() {
        let asked = 1 << 20;
        let mut small = Pipe::new(64 << 10).unwrap();
        small.asked = asked;
        assert!(small.size < asked);
        give_back(small);
        let next = take_pipe(asked).unwrap();
        assert!(
            next.size >= asked,
            "got a {}-byte pipe for {asked}: the small one came back off the shelf",
            next.size
        );
    }
}

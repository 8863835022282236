//! The handoff socket's messages: one `SOCK_SEQPACKET` datagram each, a
//! JSON body with up to `MAX_FDS` file descriptors riding along in
//! `SCM_RIGHTS`. Seqpacket keeps message boundaries, so the fds of a
//! message always arrive with that message. The calls block (with a
//! timeout set on the socket); the async side runs them on the blocking
//! pool.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{de::DeserializeOwned, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};

/// Fds per message: well under the kernel's SCM_MAX_FD (253).
pub const MAX_FDS: usize = 128;
/// Largest body we accept.
const MAX_BODY: usize = 256 << 10;

/// One end of a handoff connection.
pub struct Link {
    sock: Socket,
    /// The read timeout in force, in ms (0: none), so that a timeout
    /// names the wait instead of reading "Resource temporarily unavailable".
    wait_ms: AtomicU64,
}

/// Write timeout when reads have none.
const SEND_WAIT: Duration = Duration::from_secs(10);

/// A blocking call on a socket with a timeout returns EAGAIN when it fires.
fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl Link {
    pub fn new(sock: Socket) -> io::Result<Link> {
        sock.set_nonblocking(false)?;
        // Room for a batch of connection records in one datagram.
        let _ = sock.set_send_buffer_size(MAX_BODY * 2);
        Ok(Link {
            sock,
            wait_ms: AtomicU64::new(0),
        })
    }

    /// Connects to a running proxy's handoff socket.
    pub fn connect(path: &Path) -> anyhow::Result<Link> {
        let sock = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)
            .context("creating a unix seqpacket socket")?;
        let addr = SockAddr::unix(path).with_context(|| format!("{}", path.display()))?;
        sock.connect(&addr).with_context(|| {
            format!(
                "--takeover {}: cannot connect (is a proxy with --handoff-socket {0} running?)",
                path.display()
            )
        })?;
        Ok(Link::new(sock)?)
    }

    /// How long `recv` waits; None: for ever.
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)?;
        self.sock.set_write_timeout(t.or(Some(SEND_WAIT)))?;
        let ms = t.map_or(0, |t| t.as_millis().max(1) as u64);
        self.wait_ms.store(ms, Ordering::Relaxed);
        Ok(())
    }

    /// The read timeout in force, also the write timeout if there is one.
    fn wait(&self) -> Option<Duration> {
        match self.wait_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    pub fn send<M: Serialize>(&self, msg: &M, fds: &[RawFd]) -> anyhow::Result<()> {
        assert!(fds.len() <= MAX_FDS, "too many fds in one handoff message");
        let body = serde_json::to_vec(msg).context("encoding a handoff message")?;
        match send_raw(self.sock.as_raw_fd(), &body, fds) {
            Err(e) if timed_out(&e) => bail!(
                "sending a handoff message: the other process read nothing for {:?}",
                self.wait().unwrap_or(SEND_WAIT)
            ),
            r => r.context("sending a handoff message"),
        }
    }

    /// The next message and its fds; `Ok(None)` when the peer closed.
    pub fn recv<M: DeserializeOwned>(&self) -> anyhow::Result<Option<(M, Vec<OwnedFd>)>> {
        let got = match (recv_raw(self.sock.as_raw_fd()), self.wait()) {
            (Err(e), Some(wait)) if timed_out(&e) => {
                bail!("no handoff message within {wait:?}")
            }
            (r, _) => r.context("reading a handoff message")?,
        };
        let Some((body, fds)) = got else {
            return Ok(None);
        };
        let msg = serde_json::from_slice(&body).with_context(|| {
            format!(
                "unexpected handoff message {:?}",
                String::from_utf8_lossy(&body)
            )
        })?;
        Ok(Some((msg, fds)))
    }

    /// `recv` for a message that must come.
    /// `what` names the step, for the error.
    pub fn expect<M: DeserializeOwned>(&self, what: &str) -> anyhow::Result<(M, Vec<OwnedFd>)> {
        match self
            .recv()
            .with_context(|| format!("waiting for the other process {what}"))?
        {
            Some(m) => Ok(m),
            None => bail!("the other process closed the handoff socket before {what}"),
        }
    }
}

fn send_raw(sock: RawFd, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut control = vec![0u8; if fds.is_empty() { 0 } else { space }];
    let mut iov = libc::iovec {
        iov_base: body.as_ptr() as *mut libc::c_void,
        iov_len: body.len(),
    };
    // SAFETY: zeroed msghdr is a valid empty header; we fill its pointers
    // with buffers that outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = control.len() as _;
        // SAFETY: the control buffer is CMSG_SPACE(fd_bytes) long, so the
        // first header and its data fit.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(cmsg),
                fd_bytes as usize,
            );
        }
    }
    loop {
        // SAFETY: msg points at live buffers (above).
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

type Received = (Vec<u8>, Vec<OwnedFd>);

fn recv_raw(sock: RawFd) -> io::Result<Option<Received>> {
    let mut body = vec![0u8; MAX_BODY];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    let mut control = vec![0u8; space as usize];
    let mut iov = libc::iovec {
        iov_base: body.as_mut_ptr() as *mut libc::c_void,
        iov_len: body.len(),
    };
    // SAFETY: as in send_raw.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = control.len() as _;
    let n = loop {
        // SAFETY: msg points at live buffers; MSG_CMSG_CLOEXEC keeps the
        // fds out of anything we exec.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: walking the control buffer the kernel filled, with the
    // kernel's own macros; each SCM_RIGHTS fd is new and ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned((data as *const RawFd).add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "handoff message truncated",
        ));
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    body.truncate(n);
    Ok(Some((body, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn messages_carry_their_fds() {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        let (a, b) = (Link::new(a).unwrap(), Link::new(b).unwrap());
        let (mut r, w) = std::os::unix::net::UnixStream::pair().unwrap();
        a.send(&serde_json::json!({"n": 1}), &[w.as_raw_fd()])
            .unwrap();
        a.send(&serde_json::json!({"n": 2}), &[]).unwrap();
        drop(w);
        let (m, fds): (serde_json::Value, _) = b.expect("one").unwrap();
        assert_eq!(m["n"], 1);
        assert_eq!(fds.len(), 1);
        let mut w2 = std::os::unix::net::UnixStream::from(fds.into_iter().next().unwrap());
        w2.write_all(b"x").unwrap();
        drop(w2);
        let mut got = String::new();
        r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "x");
        let (m, fds): (serde_json::Value, _) = b.expect("two").unwrap();
        assert_eq!((m["n"].as_u64(), fds.len()), (Some(2), 0));
        drop(a);
        assert!(b.recv::<serde_json::Value>().unwrap().is_none());
    }

    /// A timeout says which step waited, and how long.
    #[test]
    fn a_timeout_names_the_step_and_the_wait() {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        let (_a, b) = (Link::new(a).unwrap(), Link::new(b).unwrap());
        b.set_timeout(Some(Duration::from_millis(50))).unwrap();
        let e = b
            .expect::<serde_json::Value>("adopting map sets")
            .unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "waiting for the other process adopting map sets: no handoff message within 50ms"
        );
    }
}

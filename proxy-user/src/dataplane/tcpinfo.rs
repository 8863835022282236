//! The few socket facts the data planes need that std and socket2 do not expose.
use std::{
    io, mem,
    os::fd::{AsRawFd, RawFd},
};

/// The kernel's socket cookie: a stable id for the socket, the key the BPF
/// maps use (the verdict program reads the same value with a helper).
pub fn cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: value and len are valid for the kernel to write a u64 into.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Runs the socket's data_ready callback if it has unread bytes: the kernel
/// does that whenever SO_RCVLOWAT is set (tcp_set_rcvlowat -> tcp_data_ready).
pub fn sweep_receive_queue(sock: &impl AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: passes a valid int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes ever handed to this socket's TCP (sent and acknowledged, plus still
/// queued), and the acknowledged part alone. Their difference is SIOCOUTQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handed {
    pub total: u64,
    pub acked: u64,
    /// The connection is gone (TCP_CLOSE): nothing queued will be sent.
    pub closed: bool,
}

/// `tcpi_state` values (include/net/tcp_states.h).
const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE: u8 = 7;

/// In TCP_ESTABLISHED: neither a FIN nor a reset has arrived.
pub fn is_established(sock: &impl AsRawFd) -> bool {
    tcp_info(sock.as_raw_fd()).is_ok_and(|(info, _)| info[0] == TCP_ESTABLISHED)
}

/// `tcpi_bytes_acked` sits at this offset of `struct tcp_info` (linux/tcp.h,
/// stable since 4.1); the libc crate's struct stops before it.
const TCPI_BYTES_ACKED_OFFSET: usize = 120;

/// `tcpi_bytes_received` follows `tcpi_bytes_acked`.
const TCPI_BYTES_RECEIVED_OFFSET: usize = 128;

/// Payload bytes this socket's TCP has received in order (RFC 4898
/// `HCThruOctetsReceived`): what the peer sent, whoever read it since.
pub fn bytes_received(sock: &impl AsRawFd) -> io::Result<u64> {
    let (info, len) = tcp_info(sock.as_raw_fd())?;
    if len < TCPI_BYTES_RECEIVED_OFFSET + 8 {
        return Err(io::Error::other(
            "kernel tcp_info has no tcpi_bytes_received",
        ));
    }
    Ok(read_u64(&info, TCPI_BYTES_RECEIVED_OFFSET))
}

/// `tcpi_data_segs_in` (linux/tcp.h, since 4.6): segments with payload.
const TCPI_DATA_SEGS_IN_OFFSET: usize = 152;

/// Segments with payload this socket has received: close to the number of
/// messages the peer sent when it writes small ones, which is what the
/// fastpath pays for (one kworker hop per skb). None once the socket left
/// ESTABLISHED (a FIN either way): its connection is ending, not one to
/// move into the kernel.
pub fn data_segs_in(fd: RawFd) -> io::Result<Option<u64>> {
    let (info, len) = tcp_info(fd)?;
    // tcpi_state, the struct's first byte.
    if info[0] != TCP_ESTABLISHED {
        return Ok(None);
    }
    if len < TCPI_DATA_SEGS_IN_OFFSET + 4 {
        return Err(io::Error::other("kernel tcp_info has no tcpi_data_segs_in"));
    }
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&info[TCPI_DATA_SEGS_IN_OFFSET..TCPI_DATA_SEGS_IN_OFFSET + 4]);
    Ok(Some(u32::from_ne_bytes(bytes).into()))
}

fn tcp_info(fd: libc::c_int) -> io::Result<([u8; 256], usize)> {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: info is a writable buffer of len bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info, len as usize))
}

fn read_u64(info: &[u8], offset: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&info[offset..offset + 8]);
    u64::from_ne_bytes(bytes)
}

/// Bytes still owed on this socket: received but not yet read (SIOCINQ), or
/// written but not yet acknowledged by the peer (SIOCOUTQ).
pub fn owed(sock: &impl AsRawFd) -> io::Result<u64> {
    let fd = sock.as_raw_fd();
    let (mut inq, mut outq): (libc::c_int, libc::c_int) = (0, 0);
    // SAFETY: SIOCINQ (= FIONREAD) and SIOCOUTQ each write one int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut inq) } != 0
        || unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(inq.max(0) as u64 + outq.max(0) as u64)
}

pub fn handed(sock: &impl AsRawFd) -> io::Result<Handed> {
    let fd = sock.as_raw_fd();
    let (info, len) = tcp_info(fd)?;
    if len < TCPI_BYTES_ACKED_OFFSET + 8 {
        return Err(io::Error::other("kernel tcp_info has no tcpi_bytes_acked"));
    }
    let acked = read_u64(&info, TCPI_BYTES_ACKED_OFFSET);
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Handed {
        total: acked + outq.max(0) as u64,
        acked,
        closed: info[0] == TCP_CLOSE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn cookie_is_stable_and_distinct() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        assert_eq!(cookie(&a).unwrap(), cookie(&a).unwrap());
        assert_ne!(cookie(&a).unwrap(), cookie(&b).unwrap());
    }

    /// Guards the tcpi_data_segs_in offset auto's promotion reads: one
    /// small message answered before the next is one data segment each.
    #[test]
    fn data_segs_in_counts_small_messages() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut b, _) = listener.accept().unwrap();
        a.set_nodelay(true).unwrap();
        b.set_nodelay(true).unwrap();
        let count = |s: &TcpStream| data_segs_in(s.as_raw_fd()).unwrap();
        let before = count(&b).expect("established");
        for _ in 0..50 {
            a.write_all(b"ping").unwrap();
            let mut got = [0u8; 4];
            b.read_exact(&mut got).unwrap();
            b.write_all(b"pong").unwrap();
            a.read_exact(&mut got).unwrap();
        }
        assert_eq!(count(&b).expect("established") - before, 50);
        // A FIN either way: no count, the connection is ending (auto then
        // never moves it into the kernel).
        a.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).unwrap();
        assert_eq!(count(&b), None, "the side that got the FIN");
        assert_eq!(count(&a), None, "the side that sent it");
    }

    /// Guards the hard-coded tcp_info offset against a kernel or libc surprise.
    #[test]
    fn handed_counts_written_bytes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut b, _) = listener.accept().unwrap();
        let before = handed(&a).unwrap();
        let payload = vec![7u8; 100_000];
        a.write_all(&payload).unwrap();
        let mut got = vec![0u8; payload.len()];
        b.read_exact(&mut got).unwrap();
        // Everything was received, so everything is handed; acked catches up.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let after = handed(&a).unwrap();
            assert_eq!(after.total - before.total, payload.len() as u64);
            if after.acked - before.acked == payload.len() as u64 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "acked never caught up: {after:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Guards the tcpi_bytes_received offset the fastpath's loss check
    /// adds up, and that the FIN counts one.
    #[test]
    fn received_counts_payload_and_fin() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut b, _) = listener.accept().unwrap();
        let payload = vec![7u8; 100_000];
        a.write_all(&payload).unwrap();
        let mut got = vec![0u8; payload.len()];
        b.read_exact(&mut got).unwrap();
        assert_eq!(bytes_received(&b).unwrap(), payload.len() as u64);
        drop(a);
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert_eq!(bytes_received(&b).unwrap(), payload.len() as u64 + 1);
    }
}

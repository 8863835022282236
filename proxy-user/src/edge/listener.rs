//! Listening sockets and the accept loop every listener runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use super::conn;
use super::{AppSlot, RateLimit, Shared};
use crate::dataplane::SocketBuffers;
use crate::upstream::dial::is_local_resource_error;

/// Backlog per listener: large enough to absorb bursts while we back off
/// from fd exhaustion, small enough not to hide a dead proxy for long.
const BACKLOG: u32 = 1024;

/// A listening socket on `addr`. Accepted sockets inherit `buffers`
/// (SO_SNDBUF/SO_RCVBUF), set before any handshake so the window they
/// advertise matches, and TCP_NODELAY (`nodelay`).
pub fn bind(addr: SocketAddr, buffers: SocketBuffers) -> anyhow::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("cannot create socket")?;
    // Restarting must not fail on the previous process's TIME_WAIT sockets.
    sock.set_reuseaddr(true)
        .context("cannot set SO_REUSEADDR")?;
    if addr.is_ipv6() {
        // `::` should take IPv4 clients too, whatever the sysctl default.
        socket2::SockRef::from(&sock)
            .set_only_v6(false)
            .context("cannot clear IPV6_V6ONLY")?;
    }
    buffers
        .apply(&sock)
        .context("cannot set the socket buffer sizes")?;
    nodelay(&sock)?;
    if let Err(e) = sock.bind(addr) {
        let hint = ephemeral_hint(&e, addr.port()).unwrap_or_default();
        return Err(anyhow::Error::new(e).context(format!("cannot bind {addr}{hint}")));
    }
    sock.listen(BACKLOG)
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Interactive protocols through the proxy must not gain Nagle delays.
/// Set on the listener, not on each accepted socket: Linux copies it into
/// every socket the listener accepts, which saves a setsockopt per
/// connection. Listeners handed over by an older process get it too.
pub fn nodelay(listener: &impl std::os::fd::AsFd) -> anyhow::Result<()> {
    socket2::SockRef::from(listener)
        .set_nodelay(true)
        .context("cannot set TCP_NODELAY on a listening socket")
}

/// A port taken inside the ephemeral range may be held by an outgoing
/// connection (ours to a target included) rather than by a listener: say
/// so, and how to keep such ports out of that range.
fn ephemeral_hint(e: &std::io::Error, port: u16) -> Option<String> {
    if e.raw_os_error() != Some(libc::EADDRINUSE) || port == 0 {
        return None;
    }
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = range.split_whitespace().map(|n| n.parse::<u16>());
    let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else {
        return None;
    };
    (lo..=hi).contains(&port).then(|| format!(
        " (port {port} is inside the ephemeral port range {lo}-{hi}, so an outgoing connection may hold it; \
         keep it for listeners with `sysctl -w net.ipv4.ip_local_reserved_ports={port}` or pick a port below {lo})"
    ))
}

/// Resolves a listen address like `0.0.0.0` or `::` with a port.
pub fn listen_addr(address: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let ip: std::net::IpAddr = address
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .with_context(|| format!("--listen-address {address:?} is not an IP address"))?;
    Ok(SocketAddr::new(ip, port))
}

pub async fn accept_loop(
    listener: TcpListener,
    port: u16,
    slot: AppSlot,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let label = format!("{} port {port}", slot.load().balancer.app);
    accept_until_stopped(&listener, &label, &shared, &mut stop, |sock, peer| {
        conn::spawn(sock, peer, port, &slot.load_full(), &shared)
    })
    .await;
    // Clients whose handshake the kernel already completed are served, not
    // reset: a reload that removes this port must not break them.
    while let Ok(Ok((sock, peer))) = tokio::time::timeout(Duration::ZERO, listener.accept()).await {
        conn::spawn(sock, peer, port, &slot.load_full(), &shared);
    }
    // Dropping the listener closes the port: new clients get refused
    // instead of queueing behind a proxy that is going away.
    drop(listener);
}

/// Accepts until `stop`, handing each connection to `on_accept`. Out of fds
/// or memory it backs off (100 ms doubling to 1 s) instead of spinning, and
/// recovers by itself when fds free up; other errors (a client gone before
/// the accept) are logged and skipped. `label` names the listener in logs.
pub(super) async fn accept_until_stopped(
    listener: &TcpListener,
    label: &str,
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
    mut on_accept: impl FnMut(TcpStream, SocketAddr),
) {
    let mut backoff = Duration::ZERO;
    let err_log = RateLimit::default();
    let mut accepting = shared.accepting.clone();
    tokio::select! {
        _ = stop.wait_for(|s| *s) => return,
        open = accepting.wait_for(|open| *open) => if open.is_err() { return },
    }
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((sock, peer)) => {
                backoff = Duration::ZERO;
                on_accept(sock, peer);
            }
            // Out of fds or memory: retrying at once would spin.
            Err(e) if is_local_resource_error(&e) => {
                shared.metrics.accept_resource_errors.inc();
                // The pending connection stays in the backlog; try again
                // once some fds may have been freed.
                backoff = (backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(1));
                if let Some(suppressed) = err_log.check() {
                    tracing::warn!(listener = label, error = %e, backoff_ms = backoff.as_millis() as u64, suppressed, "accept failed: out of resources, backing off");
                }
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
            Err(e) => {
                // ECONNABORTED and friends: that one client is gone, the
                // listener is fine.
                if let Some(suppressed) = err_log.check() {
                    tracing::debug!(listener = label, error = %e, suppressed, "accept failed, continuing");
                }
                // Unknown persistent errors must not spin a core.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-connection setsockopt is gone on the strength of Linux
    /// copying TCP_NODELAY from a listener into the sockets it accepts: if
    /// a kernel stopped doing that, clients would get Nagle delays.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let listener = bind(addr, SocketBuffers { size: None }).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "accepted socket lacks TCP_NODELAY"
        );
        assert!(
            !client.nodelay().unwrap(),
            "a plain socket has it: the check proves nothing"
        );
    }
}

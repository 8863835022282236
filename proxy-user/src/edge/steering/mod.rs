//! `--steering sk_lookup`: one listening socket for every configured port.
//!
//! The `steer` sk_lookup program (proxy-ebpf) is attached to this process's
//! network namespace. For a TCP connection whose destination port is in the
//! `PORTS` map (and whose destination address matches `--listen-address`, or
//! any address when that is unspecified), it assigns the proxy's one
//! listening socket (slot 0 of `STEER_SOCKET`) before the kernel's normal
//! listener lookup. The accepted socket keeps the original destination, so
//! `getsockname` names the port and with it the app. A reload rewrites
//! `PORTS` entry by entry; the program stays attached for the life of the
//! process (one attach, detached at exit or when this is dropped).
//!
//! Startup and memory do not grow with the port count: 10,000 ports are
//! 10,000 small map entries, not 10,000 sockets and accept tasks.
//!
//! Steering a port can take it from someone else, and be taken: a
//! listener already on it loses its connections to us (`conflicts`), and
//! an sk_lookup program attached before ours wins over us (`peers`,
//! `verify`, `probe`). Both are refused at startup with the ports named;
//! "proxy ready" means every port reaches this proxy.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use proxy_common::{
    SteerConfig, STEER_MATCH_ANY, STEER_MATCH_ANY4, STEER_MATCH_IP4, STEER_MATCH_IP6,
};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::conn;
use super::listener::accept_until_stopped;
use super::{AppRuntime, RateLimit, Shared};
use crate::dataplane::arm_reset;

mod conflicts;
mod peers;
mod probe;
mod program;
mod verify;

pub use conflicts::check_listeners;
pub use probe::Probes;
pub use program::{check_support, SkLookupSteering};
pub use verify::verify;

/// How connections find the proxy, from `--steering`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Steering {
    /// One listening socket per configured port.
    Listeners,
    /// One listening socket; an sk_lookup BPF program steers every configured port to it.
    #[value(name = "sk_lookup")]
    SkLookup,
}

/// Destination port -> app, swapped whole by a reload.
pub type PortTable = Arc<ArcSwap<HashMap<u16, Arc<AppRuntime>>>>;

/// Where the one listening socket binds and which destinations are steered,
/// from `--listen-address`: a specific address is both; an unspecified one
/// steers every local address to a socket on loopback.
pub fn addresses(listen: IpAddr, port: u16) -> (SocketAddr, SteerConfig) {
    match listen {
        IpAddr::V4(ip) if ip.is_unspecified() => (
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            SteerConfig {
                mode: STEER_MATCH_ANY4,
                ..Default::default()
            },
        ),
        IpAddr::V6(ip) if ip.is_unspecified() => (
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
            SteerConfig {
                mode: STEER_MATCH_ANY,
                ..Default::default()
            },
        ),
        IpAddr::V4(ip) => (
            SocketAddr::from((ip, port)),
            SteerConfig {
                mode: STEER_MATCH_IP4,
                ip4: u32::from_ne_bytes(ip.octets()),
                ..Default::default()
            },
        ),
        IpAddr::V6(ip) => {
            let o = ip.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (
                SocketAddr::from((ip, port)),
                SteerConfig {
                    mode: STEER_MATCH_IP6,
                    ip6: [word(0), word(4), word(8), word(12)],
                    ..Default::default()
                },
            )
        }
    }
}

/// Accepts on the one steered socket; the app is the one configured for the
/// port the client connected to. `probes` are this proxy's own checks.
pub async fn accept_loop(
    l: TcpListener,
    table: PortTable,
    probes: Arc<Probes>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let unknown_log = RateLimit::default();
    accept_until_stopped(&l, "sk_lookup", &shared, &mut stop, |sock, peer| {
        if probes.claim(peer) {
            arm_reset(&sock);
            return;
        }
        let port = match sock.local_addr() {
            Ok(a) => a.port(),
            Err(e) => {
                tracing::debug!(client = %peer, error = %e, "getsockname failed; dropping");
                return;
            }
        };
        match table.load().get(&port) {
            Some(app) => conn::spawn(sock, peer, port, app, &shared),
            None => {
                // Steered just before a reload removed its port, or
                // dialled to the listener's own port: refuse with RST.
                if let Some(suppressed) = unknown_log.check() {
                    tracing::debug!(port, client = %peer, suppressed, "no app for this port; refusing");
                }
                arm_reset(&sock);
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_listen_address() {
        let (bind, cfg) = addresses("0.0.0.0".parse().unwrap(), 0);
        assert_eq!(bind, "127.0.0.1:0".parse().unwrap());
        assert_eq!(cfg.mode, STEER_MATCH_ANY4);
        let (bind, cfg) = addresses("::".parse().unwrap(), 7);
        assert_eq!(bind, "[::1]:7".parse().unwrap());
        assert_eq!(cfg.mode, STEER_MATCH_ANY);
        let (bind, cfg) = addresses("127.0.0.9".parse().unwrap(), 0);
        assert_eq!(bind, "127.0.0.9:0".parse().unwrap());
        assert_eq!(cfg.mode, STEER_MATCH_IP4);
        // Network byte order, as the kernel's local_ip4 holds it.
        assert_eq!(cfg.ip4.to_ne_bytes(), [127, 0, 0, 9]);
        let (_, cfg) = addresses("::1".parse().unwrap(), 0);
        assert_eq!(cfg.mode, STEER_MATCH_IP6);
        assert_eq!(cfg.ip6[3].to_ne_bytes(), [0, 0, 0, 1]);
    }
}

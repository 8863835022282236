//! How many connections the fd limit can carry on the chosen plane.
//!
//! Every connection holds its client and upstream sockets; the splice plane
//! adds a pipe (two fds) per direction that has spoken. The global
//! connection limit is what keeps fds from running out: when they do, every
//! accept and connect fails, for every app at once, while the limit refuses
//! one client at a time with a reset and leaves the rest served.

use crate::dataplane::Plane;

/// The default limit when the fd limit allows it.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;

/// Fds the process needs besides connections: stdio, the runtime, the admin
/// listener and its clients, the access log, BPF maps and programs.
const RESERVED_FDS: u64 = 256;

/// Fds one connection can hold at most on `plane`.
pub fn fds_per_connection(plane: Plane) -> u64 {
    match plane {
        Plane::Splice => 6,
        _ => 2,
    }
}

/// The global connection limit: `asked` (`--max-connections`), or as many
/// as `nofile` carries on `plane` with `listeners` sockets open, at most
/// `DEFAULT_MAX_CONNECTIONS`. An asked limit the fds cannot carry is kept,
/// with a warning that says what would fit.
pub fn max_connections(asked: Option<u32>, plane: Plane, nofile: u64, listeners: usize) -> u32 {
    let per = fds_per_connection(plane);
    let spare = nofile.saturating_sub(RESERVED_FDS + listeners as u64);
    let fits = u32::try_from(spare / per).unwrap_or(u32::MAX).max(1);
    match asked {
        None => fits.min(DEFAULT_MAX_CONNECTIONS),
        Some(n) => {
            if n > fits {
                tracing::warn!(
                    max_connections = n,
                    fits,
                    nofile,
                    fds_per_connection = per,
                    plane = plane.as_str(),
                    "RLIMIT_NOFILE cannot carry --max-connections on this plane: fds will run out \
                     before the limit and every app will fail to accept; raise the fd limit \
                     (LimitNOFILE=) or lower --max-connections"
                );
            }
            n
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_limit_follows_the_fd_limit_and_the_plane() {
        assert_eq!(max_connections(None, Plane::Copy, 1 << 20, 10), 10_000);
        assert_eq!(max_connections(None, Plane::Copy, 20_000, 10), 9_867);
        assert_eq!(max_connections(None, Plane::Splice, 20_000, 10), 3_289);
        assert_eq!(max_connections(None, Plane::Fastpath, 20_000, 1), 9_871);
        assert_eq!(max_connections(None, Plane::Copy, 100, 10), 1);
        assert_eq!(
            max_connections(Some(50_000), Plane::Copy, 20_000, 10),
            50_000
        );
    }
}

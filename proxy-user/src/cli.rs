//! Command-line flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::config::etcd::EtcdSettings;
use crate::dataplane::{CopyPlane, FastpathOptions, FinTimeouts, Mode, Promotion, SocketBuffers};
use crate::edge::steering::Steering;
use crate::ops::logging::LogFormat;
use crate::server::Settings;
use crate::upstream::connect::ConnectPolicy;
use crate::upstream::probe::HealthConfig;

const LONG_ABOUT: &str = "\
A Layer-4 TCP proxy. It reads a config.json in Fly's format ({\"Apps\":[{\"Name\",\"Ports\",\"Targets\"}]}), \
listens on every port of every app, and forwards each accepted connection to one of that app's targets: \
least-connections by default, skipping targets that active health probes or failed connects marked down, \
failing over to another target when a connect fails. Bytes are carried by splice(2) through a pipe, a \
userspace copy loop, or the kernel sockmap fastpath: --mode auto (the default) starts every connection in \
userspace and moves the quiet, long-lived ones into the kernel where BPF loads; --mode fastpath|splice|copy \
forces one plane. Half-close and resets are passed through. \
SIGHUP, or any change to the config file (polled, see --watch-config), reloads it \
(validated and bound first; on any error the running config stays), without dropping live connections. \
With --config-etcd the app table comes from etcd instead (one key per app under --config-etcd-prefix, \
targets may register under leases) and every revision is applied the same way; --config-etcd-cache keeps \
the last good table for a start while etcd is unreachable. \
--steering sk_lookup serves every port (ranges like \"8000-8999\" of any size) from one socket via a BPF sk_lookup program. SIGTERM/SIGINT stop accepting and drain live connections; a second signal exits at once. \
One log line per connection is written to stderr when it closes.\n\n\
Upgrades and restarts without a refused connection: run with --handoff-socket PATH. Then either send SIGUSR2 \
(the proxy starts the binary at its own path again, a newly installed one if you replaced it, with the same \
arguments plus --takeover PATH), or start the new binary yourself with --takeover PATH. The new process receives \
every listening socket (and the sk_lookup socket) over PATH, reads and validates its config, binds what is new \
and only then tells the old one to stop accepting; established connections then move to it (copy and splice \
ones at a safe point, fastpath pairs with the BPF maps they live in); one the new process cannot take (its reader \
stopped reading, its app is not in the new config, or a fastpath pair and the new process runs no fastpath) \
drains in the old process, which then exits. If the new process \
fails to start, the old one never stopped serving. SIGUSR1 is logged and ignored. -t/--check validates a config \
file and exits (0 valid, 1 not): --check FILE, or -t for the --config file. Under systemd (Type=notify) READY, RELOADING, STOPPING and MAINPID are sent to \
$NOTIFY_SOCKET; see deploy/systemd/proxy.service in the repository.";

#[derive(Debug, Parser)]
#[command(name = "proxy", version, about = "Layer-4 TCP proxy", long_about = LONG_ABOUT)]
pub struct Cli {
    /// Config file in Fly's format.
    #[arg(long, default_value = "config.json")]
    pub config: PathBuf,

    /// Validate FILE as a config and exit without binding anything: exit 0 if it is valid, 1 with every
    /// problem otherwise.
    #[arg(long, value_name = "FILE")]
    pub check: Option<PathBuf>,

    /// Like --check, for the --config file (nginx's -t).
    #[arg(short = 't', long = "test-config", conflicts_with = "check")]
    pub test_config: bool,

    /// IP address to bind every listener on (`::` listens on IPv6 and IPv4).
    #[arg(long, default_value = "0.0.0.0")]
    pub listen_address: String,

    /// Data plane. auto (the default) is adaptive: every connection starts in userspace on splice(2)
    /// (copy where splice is refused), and one that stays light (some bytes, but at most
    /// --promote-below and --promote-segments-below per second) for --promote-periods periods of
    /// --promote-after moves into the kernel fastpath where BPF loads; a direction that turns bulk
    /// or backpressured comes back out, losslessly (NOTES.md §2). splice, copy and fastpath force one
    /// plane for every connection (splice and fastpath exit at start if they cannot work). Measured
    /// figures for each are in NOTES.md and `cargo xtask bench`.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,

    /// Timeout of one connect attempt to a target, DNS lookup included.
    #[arg(long, default_value = "2s", value_parser = parse_nonzero_duration)]
    pub connect_timeout: Duration,

    /// Connect attempts per client connection, each to a different target.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub connect_attempts: u32,

    /// Total time allowed for all connect attempts of one client connection.
    #[arg(long, default_value = "5s", value_parser = parse_nonzero_duration)]
    pub connect_deadline: Duration,

    /// Close a connection when no byte moved either way for this long (0 = never).
    // 10 min (nginx's proxy_timeout) rather than Envoy's 1 h: pooled DB/HTTP
    // clients send keepalives well inside 10 min, while fds held by clients
    // that vanished without FIN/RST are reclaimed 6x sooner.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Once the target's FIN was passed to the client, close when no byte moved either way for this long
    /// (0 = only --idle-timeout applies): a client that never closes its side, or vanished, stops
    /// holding the pair. Bytes still owed then get both sides a reset, as at the idle timeout. HAProxy's
    /// `timeout client-fin`.
    // 30 s: the target said all it had to say; a live client needs only to
    // read the rest and close (HAProxy's documented examples use 30 s).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub client_fin_timeout: Duration,

    /// Once the client's FIN was passed to the target, close when no byte moved either way for this long
    /// (0 = only --idle-timeout applies): a target that never answers or closes stops holding the pair.
    /// Bytes still owed then get both sides a reset. HAProxy's `timeout server-fin`.
    // Longer than the client side: after a client's FIN (`nc -N`, `ssh host
    // sort < file`) the target may still be working out its answer.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    pub server_fin_timeout: Duration,

    /// Interval between active TCP health probes of each target (at least 10ms); a probe gets at most this long, or --connect-timeout if shorter.
    #[arg(long, default_value = "2s", value_parser = parse_nonzero_duration)]
    pub health_interval: Duration,

    /// Consecutive successful probes before a down target is used again.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_rise: u32,

    /// Consecutive failed probes before an up target is taken out.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_fall: u32,

    /// Maximum concurrent client connections over all apps; beyond it new ones are reset. Default: as
    /// many as RLIMIT_NOFILE carries on the chosen plane (2 fds per connection, 6 on splice), at most
    /// 10000. Its last tenth is shared out equally between the apps, so a flood on some apps cannot
    /// take every slot.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,

    /// Maximum concurrent client connections per app, so one app's flood cannot starve the others.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_app: u32,

    /// Maximum concurrent connections from one client address over all apps (default: no limit); an
    /// app's MaxConnectionsPerClient limits it within that app. Behind a PROXY header the address is the header's.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_client: Option<u32>,

    /// On SIGTERM/SIGINT, how long live connections may finish before they are cut.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Userspace buffer per direction per connection (e.g. 16KiB, 64KiB, 256KiB): the copy plane's read
    /// buffer, held while a burst goes through; also used by a fastpath direction carried in userspace
    /// and by a splice direction whose pipe cannot be made.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub copy_buffer: usize,

    /// The splice plane's pipe per direction (splice and auto): the most one splice(2) moves. Held only
    /// while a burst goes through (an idle connection holds none), and behind a slow reader at most this
    /// per direction. The kernel rounds up to a power of two pages. Without root, above fs.pipe-max-size
    /// (1MiB) or over the user's pipe-page limits, the kernel refuses: the pipe stays at its default
    /// (64KiB, 8KiB past fs.pipe-user-pages-soft), and a debug line says so. 64KiB, the old size, costs
    /// a quarter more CPU per byte on bulk (NOTES.md §2).
    #[arg(long, default_value = "256KiB", value_parser = parse_size)]
    pub splice_pipe: usize,

    /// Kernel send and receive buffer of every proxied socket (the kernel doubles it), so a slow reader
    /// holds at most about 4x this in socket memory (on splice, plus up to one pipe per direction,
    /// --splice-pipe); 0 = kernel autotuning (up to tcp_wmem/tcp_rmem max,
    /// about 10 MB per slow reader). Raise it for fast clients far away: one connection's throughput
    /// is at most about this size per round trip.
    #[arg(long, default_value = "256KiB", value_parser = parse_socket_buffer)]
    pub socket_buffer: u32,

    /// Admin HTTP listener, e.g. 127.0.0.1:9100 (default: off): /metrics, /healthz, /readyz, /config, /targets.
    // `--metrics-address` was its name while it only served /metrics; kept
    // as an alias so existing command lines keep working.
    // A host name (localhost:9100) is resolved once, here; IPv4 first.
    #[arg(long, visible_alias = "metrics-address", value_parser = parse_admin_address)]
    pub admin_address: Option<std::net::SocketAddr>,

    /// File holding the token that turns on the admin write API (POST /targets/APP/TARGET/drain|disable|enable,
    /// with `Authorization: Bearer TOKEN`). Without it the write API is off. A file, never a flag value:
    /// argv is visible to every user.
    #[arg(long, value_name = "FILE", requires = "admin_address")]
    pub admin_token_file: Option<PathBuf>,

    /// Also write each connection's close line as one JSON object per line to this file (reopened on SIGHUP).
    #[arg(long)]
    pub access_log: Option<PathBuf>,

    /// Do not write the "connection closed" line to the log (stderr); the --access-log file still gets one per connection.
    #[arg(long, requires = "access_log")]
    pub no_connection_log: bool,

    /// How often live connections add the bytes they moved to proxy_bytes_total (0 = only when they close).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub bytes_flush_interval: Duration,

    /// Fastpath only: most bytes one direction may have inside the kernel (redirected, not yet acknowledged); the next skb and every one after it go through userspace instead. Default 3MiB: one and a half times the fastpath's socket buffers (--socket-buffer, raised to 2MiB on fastpath sockets), below what the peer's send buffer holds; at most three times them.
    #[arg(long, value_parser = parse_inflight)]
    pub fastpath_inflight: Option<u64>,

    /// --mode auto with BPF: the watch period. A period is light if the connection moved some bytes in it, but at most --promote-below and --promote-segments-below per second; after --promote-periods light periods with no busy one between them (a silent one neither counts nor breaks the run) it moves into the kernel fastpath; 0 = never, auto stays in userspace.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub promote_after: Duration,

    /// --mode auto with BPF: most bytes per second (both ways together) over --promote-after for a move into the kernel; busier connections stay on splice, which carries bulk best.
    #[arg(long, default_value = "1MiB", value_parser = parse_inflight)]
    pub promote_below: u64,

    /// --mode auto with BPF: most data segments per second (both sockets together) over --promote-after for a move into the kernel. The fastpath pays one kernel worker hop per skb, so connections busy with small messages (request/response at hundreds per second) stay on splice, where they run faster; see NOTES.md §2.
    #[arg(long, default_value_t = 200)]
    pub promote_segments_below: u64,

    /// --mode auto with BPF: light --promote-after periods a connection needs, with no busy period between them, to move into the kernel (a silent period neither counts nor breaks the run). One light period is weak evidence: a client that warms up with a few messages and then runs flat out would move in and straight back out, and a direction that left the kernel stays slower than one that never entered; see NOTES.md §2.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub promote_periods: u32,

    /// Tests only: the verdict drops one skb of each direction after this many redirected bytes (proves the FIN ledger and the checkers catch a kernel loss).
    #[arg(long, hide = true, default_value_t = 0)]
    pub fastpath_fault_drop_at: u64,

    /// Tests only: the fastpath waits this long before the copy that runs ahead of each install, so a test can have bytes waiting for that copy.
    #[arg(long, hide = true, default_value = "0s", value_parser = parse_duration)]
    pub fastpath_pre_install_delay: Duration,

    /// How connections reach the proxy: listeners = one listening socket per port; sk_lookup = one socket, and a BPF sk_lookup program steers every configured port to it (any range size; Linux >= 5.9, CAP_BPF + CAP_NET_ADMIN).
    #[arg(long, value_enum, default_value_t = Steering::Listeners)]
    pub steering: Steering,

    /// With --steering sk_lookup: port of the one listening socket (0 = any free port).
    #[arg(long, default_value_t = 0)]
    pub steering_port: u16,

    /// Poll the config file this often and reload when it changed (0 = reload on SIGHUP only).
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    pub watch_config: Duration,

    /// Wait for upgrades on this Unix socket: a new process started with `--takeover PATH` (or by
    /// SIGUSR2) takes over the listening sockets and established connections without refusing a client.
    #[arg(long, value_name = "PATH")]
    pub handoff_socket: Option<PathBuf>,

    /// Start by taking over from the proxy waiting on this --handoff-socket PATH (it serves until this
    /// one is ready; if this one fails, it goes on serving).
    #[arg(long, value_name = "PATH")]
    pub takeover: Option<PathBuf>,

    /// Read the app table from etcd instead of --config, e.g. http://127.0.0.1:2379 (comma-separated
    /// endpoints of one cluster). Each app is one key, <prefix>apps/<name>, holding that app's object
    /// in Fly's format ({"Ports":[...],"Targets":[...]}; Name may be left out); a target may register
    /// itself as <prefix>targets/<app>/<id> = "host:port" under a lease. Every change is validated
    /// and applied like a file change; a rejected one leaves the running config in place.
    #[arg(long, value_delimiter = ',')]
    pub config_etcd: Vec<String>,

    /// With --config-etcd: the key prefix of this fleet's table.
    #[arg(long, default_value = "/proxy/", value_parser = parse_prefix)]
    pub config_etcd_prefix: String,

    /// With --config-etcd: keep the last applied table in this file, and start from it when etcd
    /// does not answer at start (within --config-etcd-timeout).
    #[arg(long, requires = "config_etcd")]
    pub config_etcd_cache: Option<PathBuf>,

    /// With --config-etcd: how long the first read from etcd may take before the cache is used.
    #[arg(long, default_value = "3s", value_parser = parse_nonzero_duration)]
    pub config_etcd_timeout: Duration,

    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    /// Log filter in RUST_LOG syntax, e.g. `info` or `info,proxy_user::health=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
}

impl Cli {
    /// `--health-interval`, at least 10 ms: a tighter loop would be a
    /// probe storm, not a health check.
    fn health_interval(&self) -> Duration {
        self.health_interval.max(Duration::from_millis(10))
    }

    /// The file `--check`/`-t` asks to validate, if any.
    pub fn check_file(&self) -> Option<PathBuf> {
        match (&self.check, self.test_config) {
            (Some(file), _) => Some(file.clone()),
            (None, true) => Some(self.config.clone()),
            (None, false) => None,
        }
    }

    /// What the server needs from the flags, with the flags' own limits
    /// applied (a probe may not outlast its interval).
    pub fn settings(&self) -> Settings {
        Settings {
            config: self.config.clone(),
            listen_address: self.listen_address.clone(),
            mode: self.mode,
            copy: CopyPlane {
                buffer_size: self.copy_buffer,
            },
            splice_pipe: self.splice_pipe,
            fastpath: FastpathOptions {
                inflight: self.fastpath_inflight,
                socket_buffer: (self.socket_buffer > 0).then_some(self.socket_buffer),
                fault_drop_at: self.fastpath_fault_drop_at,
                pre_install_delay: (!self.fastpath_pre_install_delay.is_zero())
                    .then_some(self.fastpath_pre_install_delay),
                promotion: (!self.promote_after.is_zero()).then_some(Promotion {
                    after: self.promote_after,
                    below: self.promote_below,
                    segments_below: self.promote_segments_below,
                    periods: self.promote_periods,
                }),
            },
            connect: ConnectPolicy {
                timeout: self.connect_timeout,
                attempts: self.connect_attempts,
                deadline: self.connect_deadline,
            },
            idle_timeout: (!self.idle_timeout.is_zero()).then_some(self.idle_timeout),
            fin_timeouts: FinTimeouts {
                client: (!self.client_fin_timeout.is_zero()).then_some(self.client_fin_timeout),
                server: (!self.server_fin_timeout.is_zero()).then_some(self.server_fin_timeout),
            },
            health: HealthConfig {
                interval: self.health_interval(),
                rise: self.health_rise,
                fall: self.health_fall,
                // A probe slower than the interval would overlap the next one.
                timeout: self.connect_timeout.min(self.health_interval()),
            },
            socket_buffers: SocketBuffers {
                size: (self.socket_buffer > 0).then_some(self.socket_buffer),
            },
            max_connections: self.max_connections,
            max_per_app: self.max_connections_per_app as usize,
            max_per_client: self.max_connections_per_client.map(|n| n as usize),
            drain_timeout: self.drain_timeout,
            admin_address: self.admin_address,
            admin_token_file: self.admin_token_file.clone(),
            access_log: self.access_log.clone(),
            log_connections: !self.no_connection_log,
            bytes_flush: (!self.bytes_flush_interval.is_zero())
                .then(|| self.bytes_flush_interval.max(Duration::from_millis(10))),
            steering: self.steering,
            steering_port: self.steering_port,
            watch_config: self.watch_config,
            handoff_socket: self.handoff_socket.clone(),
            takeover: self.takeover.clone(),
            etcd: (!self.config_etcd.is_empty()).then(|| EtcdSettings {
                endpoints: self.config_etcd.clone(),
                prefix: self.config_etcd_prefix.clone(),
                cache: self.config_etcd_cache.clone(),
                start_timeout: self.config_etcd_timeout,
            }),
        }
    }
}

/// `127.0.0.1:9100`, `[::1]:9100` or `localhost:9100`: a name resolves to
/// its first IPv4 address if it has one (what `curl localhost:9100` tries
/// first), else its first address.
pub fn parse_admin_address(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let addrs: Vec<std::net::SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| {
            format!("{s:?} is not HOST:PORT, e.g. 127.0.0.1:9100 or localhost:9100 ({e})")
        })?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// Parses `500ms`, `2s`, `1.5s`, `10m`, `1h`, or `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{s:?} has no unit; write e.g. 500ms, 2s, 10m or 1h"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; write e.g. 500ms, 2s, 10m or 1h"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" | "sec" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("unknown unit {u:?} in {s:?}; use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// A duration where 0 would break everything it sets (every connect or
/// probe timing out at once), unlike the timeouts where 0 means "never".
pub fn parse_nonzero_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!(
            "{s:?} would make it expire at once; give a time like 500ms or 2s"
        )),
        d => Ok(d),
    }
}

/// A key prefix: absolute, ending in `/` (so `/proxy/` never matches the
/// keys of `/proxy2/`).
fn parse_prefix(s: &str) -> Result<String, String> {
    if !s.starts_with('/') || !s.ends_with('/') {
        return Err(format!(
            "{s:?}: write the prefix as a path that starts and ends with '/', e.g. /proxy/"
        ));
    }
    Ok(s.to_string())
}

/// Parses `65536`, `64KiB`, `64k`, `1MiB`, `1m` (1 KiB to 64 MiB).
pub fn parse_size(s: &str) -> Result<usize, String> {
    parse_size_within(s, 1 << 10, 64 << 20).map(|n| n as usize)
}

/// `0` (kernel autotuning) or a size from 4 KiB to 64 MiB.
pub fn parse_socket_buffer(s: &str) -> Result<u32, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    parse_size_within(s, 4 << 10, 64 << 20).map(|n| n as u32)
}

/// Like `parse_size`, for the fastpath's in-kernel bound (64 KiB to 4 GiB).
pub fn parse_inflight(s: &str) -> Result<u64, String> {
    parse_size_within(s, 64 << 10, 4 << 30)
}

fn parse_size_within(s: &str, min: u64, max: u64) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. 65536, 64KiB or 1MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        u => {
            return Err(format!(
                "unknown size unit {u:?} in {s:?}; use KiB, MiB or GiB"
            ))
        }
    };
    let size = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if !(min..=max).contains(&size) {
        return Err(format!(
            "{s:?} must be between {} and {}",
            human_size(min),
            human_size(max)
        ));
    }
    Ok(size)
}

fn human_size(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{}GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [
            ("0", Duration::ZERO),
            ("500ms", Duration::from_millis(500)),
            ("2s", Duration::from_secs(2)),
            ("1.5s", Duration::from_millis(1500)),
            ("10m", Duration::from_secs(600)),
            ("1h", Duration::from_secs(3600)),
            (" 3 s", Duration::from_secs(3)),
        ];
        for (s, d) in ok {
            assert_eq!(parse_duration(s), Ok(d), "{s}");
        }
        for bad in ["", "5", "s", "2x", "-1s", "1..5s", "ms"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("16k"), Ok(16384));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        for bad in ["", "12", "1GiB", "x", "99999999999999999999k"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should fail");
        }
        assert_eq!(parse_inflight("256MiB"), Ok(256 << 20));
        assert_eq!(parse_inflight("1GiB"), Ok(1 << 30));
        assert!(parse_inflight("1KiB")
            .unwrap_err()
            .contains("between 64KiB and 4GiB"));
    }

    #[test]
    fn admin_addresses() {
        assert_eq!(
            parse_admin_address("localhost:9100"),
            Ok("127.0.0.1:9100".parse().unwrap())
        );
        assert_eq!(
            parse_admin_address("[::1]:0"),
            Ok("[::1]:0".parse().unwrap())
        );
        assert!(parse_admin_address("localhost").is_err());
        assert!(parse_admin_address("9100").is_err());
    }

    #[test]
    fn defaults_match_the_measured_ones() {
        let cli = Cli::parse_from(["proxy"]);
        assert_eq!(cli.fastpath_inflight, None);
        assert_eq!(cli.copy_buffer, crate::dataplane::DEFAULT_BUFFER);
        assert_eq!(cli.splice_pipe, crate::dataplane::DEFAULT_PIPE);
    }

    #[test]
    fn etcd_flags() {
        let cli = Cli::parse_from(["proxy", "--config-etcd", "http://a:2379,http://b:2379"]);
        let etcd = cli.settings().etcd.expect("etcd source");
        assert_eq!(etcd.endpoints, ["http://a:2379", "http://b:2379"]);
        assert_eq!(etcd.prefix, "/proxy/");
        assert!(Cli::parse_from(["proxy"]).settings().etcd.is_none());
        for bad in ["proxy/", "/proxy", ""] {
            assert!(parse_prefix(bad).is_err(), "{bad:?}");
        }
        // A cache without etcd would never be read: refused.
        assert!(Cli::try_parse_from(["proxy", "--config-etcd-cache", "c.json"]).is_err());
    }

    #[test]
    fn check_flag() {
        let file = |args: &[&str]| Cli::parse_from(args).check_file();
        assert_eq!(file(&["proxy"]), None);
        assert_eq!(file(&["proxy", "-t"]), Some("config.json".into()));
        assert_eq!(
            file(&["proxy", "-t", "--config", "a.json"]),
            Some("a.json".into())
        );
        assert!(Cli::try_parse_from(["proxy", "-t", "--check", "b.json"]).is_err());
        assert_eq!(file(&["proxy", "--check", "b.json"]), Some("b.json".into()));
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

//! Resource usage of this process, read from /proc at each scrape, under
//! the names the official Prometheus clients use, so standard dashboards
//! work.
//!
//! Hand-made because prometheus-client has no process collector (other
//! clients do); a `Collector` reads the values when `/metrics` is asked
//! for, rather than a task refreshing gauges that nobody may read.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// This process's id, read once: close lines carry it, and getpid(2) per
/// connection showed in the syscall count of a churn load.
pub fn pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    /// `PROXY_GIT_COMMIT` at build time, `unknown` without it.
    commit: &'static str,
}

/// `proxy_build_info{version, commit} 1`: which build runs.
pub fn register_build_info(r: &mut Registry) {
    let build: Family<BuildLabels, Gauge> = crate::metric::registered(
        r,
        "proxy_build_info",
        "Always 1; the labels say which build is running",
    );
    build
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            commit: option_env!("PROXY_GIT_COMMIT").unwrap_or("unknown"),
        })
        .set(1);
}

#[derive(Debug)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    /// A value that cannot be read is left out rather than reported as 0.
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauges = [
            (
                "process_open_fds",
                "Open file descriptors (clients, upstreams, listeners, BPF maps).",
                open_fds(),
            ),
            ("process_max_fds", "Soft RLIMIT_NOFILE.", max_fds()),
            (
                "process_resident_memory_bytes",
                "Resident set size.",
                resident_bytes(),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                encode(&mut encoder, name, help, &ConstGauge::new(v))?;
            }
        }
        if let Some(t) = start_time() {
            let help = "Start time of the process since the Unix epoch, in seconds.";
            encode(
                &mut encoder,
                "process_start_time_seconds",
                help,
                &ConstGauge::new(t),
            )?;
        }
        if let Some(secs) = cpu_seconds() {
            // Registered without `_total`: the encoder appends it.
            let help = "User and system CPU time.";
            encode(
                &mut encoder,
                "process_cpu_seconds",
                help,
                &ConstCounter::new(secs),
            )?;
        }
        Ok(())
    }
}

fn encode(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let m = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(m)
}

fn open_fds() -> Option<u64> {
    let fds = std::fs::read_dir("/proc/self/fd").ok()?;
    // Minus one: the directory handle read_dir itself holds.
    Some((fds.count() as u64).saturating_sub(1))
}

fn max_fds() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass, nothing else.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim.rlim_cur)
}

fn resident_bytes() -> Option<u64> {
    // SAFETY: sysconf only reads a system constant.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page)
}

/// Clock ticks per second, for /proc/self/stat's times.
fn clock_ticks() -> Option<f64> {
    // SAFETY: sysconf only reads a system constant.
    match u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) {
        Ok(t @ 1..) => Some(t as f64),
        _ => None,
    }
}

/// Field `n` (1-based, as in proc(5)) of /proc/self/stat, `n` >= 3. Fields
/// are counted after the last ')' because the command name may contain
/// spaces.
fn stat_field(n: usize) -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

/// Boot time (`btime` in /proc/stat) plus the process's start in clock
/// ticks after boot (`starttime`, field 22), as the Go and Python clients
/// compute it.
fn start_time() -> Option<f64> {
    let btime: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
    Some(btime as f64 + stat_field(22)? as f64 / clock_ticks()?)
}

/// utime + stime (fields 14 and 15).
fn cpu_seconds() -> Option<f64> {
    Some((stat_field(14)? + stat_field(15)?) as f64 / clock_ticks()?)
}

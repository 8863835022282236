//! The one eBPF object (proxy-ebpf, built by `cargo xtask build`, embedded by build.rs) and what loading
//! any part of it takes: the fastpath's sk_skb programs and the steering
//! sk_lookup program both come through here.

use anyhow::{Context, Result};
use aya::{Ebpf, EbpfLoader};

/// The object as built for `bpfel-unknown-none`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf.o"));

/// Loads the object with `loader`'s map sizes. Kernels before 5.11 charge
/// BPF maps to RLIMIT_MEMLOCK, so that limit is lifted first (best effort).
pub fn load(loader: &mut EbpfLoader) -> Result<Ebpf> {
    anyhow::ensure!(
        !OBJECT.is_empty(),
        "this proxy was built without its eBPF object (build it with `cargo xtask build`)"
    );
    raise_memlock_limit();
    loader
        .load(OBJECT)
        .map_err(|e| anyhow::Error::new(e).context(privilege_hint("loading the eBPF object")))
}

/// Moves map `name` out of the object as a typed map.
pub fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("the eBPF object has no map `{name}`"))?;
    T::try_from(map).with_context(|| format!("map `{name}` has an unexpected type"))
}

/// `what`, plus the likely reason when we are not root.
pub fn privilege_hint(what: &str) -> String {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        format!("{what} (not running as root: the fastpath needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, sk_lookup steering CAP_BPF and CAP_NET_ADMIN)")
    } else {
        what.to_string()
    }
}

fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit; failure is only logged.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; newer kernels do not need it");
    }
}

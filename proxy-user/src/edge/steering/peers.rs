//! The sk_lookup programs attached to this network namespace before ours.
//!
//! The kernel runs them in attach order and keeps the first socket one
//! picks (a later program's `bpf_sk_assign` gets EEXIST), so each of them
//! wins over ours wherever it steers too. When one runs our own `steer`
//! code (same tag: the kernel hashes the instructions, map references
//! masked), its `PORTS` and `STEER_CONFIG` say exactly which of our ports
//! it takes, without sending it a single connection. Any other program,
//! or one we may not inspect (reading another process's programs needs
//! CAP_SYS_ADMIN), is `Foreign`: only probing shows what it takes.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use aya::programs::{loaded_programs, ProgramInfo};
use proxy_common::{
    SteerConfig, STEER_MATCH_ANY, STEER_MATCH_ANY4, STEER_MATCH_IP4, STEER_MATCH_IP6,
};

/// A program that runs before ours.
#[derive(Debug)]
pub enum Ahead {
    /// Our own code, in another process: the ports of ours it takes.
    Steer { id: u32, taken: BTreeSet<u16> },
    /// Anything else: what it takes is unknown.
    Foreign { id: u32, name: String },
}

/// Who owns our program, to tell it from the others.
#[derive(Debug, Clone, Copy)]
pub struct Ours {
    pub id: u32,
    pub tag: u64,
    pub config: SteerConfig,
}

/// The programs attached before `ours`, each with what it takes of `wanted`.
pub fn ahead(ours: &Ours, wanted: &BTreeSet<u16>) -> Result<Vec<Ahead>> {
    let attached = attached_sk_lookup_programs()?;
    let Some(pos) = attached.iter().position(|&id| id == ours.id) else {
        anyhow::bail!("our sk_lookup program is not attached to this network namespace");
    };
    let before = &attached[..pos];
    if before.is_empty() {
        return Ok(Vec::new());
    }
    let mut infos: Vec<ProgramInfo> = loaded_programs()
        .filter_map(|info| info.ok())
        .filter(|info| before.contains(&info.id()))
        .collect();
    let mut found = Vec::new();
    for &id in before {
        let info = infos
            .iter()
            .position(|i| i.id() == id)
            .map(|i| infos.swap_remove(i));
        let steer = info
            .as_ref()
            .filter(|i| i.tag() == ours.tag)
            .and_then(|i| read_steering(i).ok());
        found.push(match steer {
            Some((config, ports)) => Ahead::Steer {
                id,
                taken: if overlaps(&config, &ours.config) {
                    ports.intersection(wanted).copied().collect()
                } else {
                    BTreeSet::new()
                },
            },
            None => Ahead::Foreign {
                id,
                name: info
                    .as_ref()
                    .and_then(|i| i.name_as_str().map(str::to_string))
                    .unwrap_or_default(),
            },
        });
    }
    Ok(found)
}

/// Whether some destination address is steered under both configs.
fn overlaps(a: &SteerConfig, b: &SteerConfig) -> bool {
    let v4 =
        |c: &SteerConfig| matches!(c.mode, STEER_MATCH_ANY | STEER_MATCH_ANY4 | STEER_MATCH_IP4);
    let v6 = |c: &SteerConfig| matches!(c.mode, STEER_MATCH_ANY | STEER_MATCH_IP6);
    let any4 = |c: &SteerConfig| matches!(c.mode, STEER_MATCH_ANY | STEER_MATCH_ANY4);
    let any6 = |c: &SteerConfig| c.mode == STEER_MATCH_ANY;
    (v4(a) && v4(b) && (any4(a) || any4(b) || a.ip4 == b.ip4))
        || (v6(a) && v6(b) && (any6(a) || any6(b) || a.ip6 == b.ip6))
}

/// Another `steer`'s config and ports, read from its maps.
fn read_steering(info: &ProgramInfo) -> Result<(SteerConfig, BTreeSet<u16>)> {
    let mut config = None;
    let mut ports = None;
    for id in info.map_ids()?.context("the kernel gave no map ids")? {
        let map = MapData::from_id(id)?;
        match map.info()?.name_as_str() {
            Some("STEER_CONFIG") => {
                let array: Array<MapData, SteerConfig> = Map::from_map_data(map)?.try_into()?;
                config = Some(array.get(&0, 0)?);
            }
            Some("PORTS") => {
                let map: BpfHashMap<MapData, u32, u32> = Map::from_map_data(map)?.try_into()?;
                let keys: Result<BTreeSet<u32>, _> = map.keys().collect();
                ports = Some(
                    keys?
                        .into_iter()
                        .filter_map(|p| u16::try_from(p).ok())
                        .collect(),
                );
            }
            _ => {}
        }
    }
    Ok((
        config.context("no STEER_CONFIG map")?,
        ports.context("no PORTS map")?,
    ))
}

/// The leading fields of `union bpf_attr` for BPF_PROG_QUERY; the kernel
/// takes a shorter attr as zero-filled.
#[repr(C)]
struct ProgQuery {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// The ids of the sk_lookup programs attached to this network namespace,
/// in the order the kernel runs them. aya 0.14 has no query for netns
/// attachments, hence the raw bpf(2) call.
fn attached_sk_lookup_programs() -> Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_SK_LOOKUP: u32 = 36;
    // The kernel keeps at most 64 programs per netns attach type.
    let mut ids = [0u32; 64];
    let netns = File::open("/proc/self/ns/net").context("opening /proc/self/ns/net")?;
    let mut attr = ProgQuery {
        target_fd: netns.as_raw_fd() as u32,
        attach_type: BPF_SK_LOOKUP,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
    };
    // SAFETY: `attr` is a valid BPF_PROG_QUERY attr whose `prog_ids` points
    // at `prog_cnt` writable u32s; both outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut ProgQuery,
            std::mem::size_of::<ProgQuery>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("querying the network namespace's sk_lookup programs (BPF_PROG_QUERY)");
    }
    let count = (attr.prog_cnt as usize).min(ids.len());
    Ok(ids[..count].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: u32, ip4: u32, ip6: [u32; 4]) -> SteerConfig {
        SteerConfig { mode, ip4, ip6 }
    }

    #[test]
    fn overlap_follows_the_programs_address_match() {
        let any4 = cfg(STEER_MATCH_ANY4, 0, [0; 4]);
        let any = cfg(STEER_MATCH_ANY, 0, [0; 4]);
        let a = cfg(STEER_MATCH_IP4, 7, [0; 4]);
        let b = cfg(STEER_MATCH_IP4, 8, [0; 4]);
        let x = cfg(STEER_MATCH_IP6, 0, [0, 0, 0, 1]);
        let y = cfg(STEER_MATCH_IP6, 0, [0, 0, 0, 2]);
        for (p, q, both) in [
            (a, a, true),
            (a, b, false),
            (a, any4, true),
            (a, any, true),
            (a, x, false),
            (any4, x, false),
            (any4, any, true),
            (any, x, true),
            (x, x, true),
            (x, y, false),
        ] {
            assert_eq!(overlaps(&p, &q), both, "{p:?} {q:?}");
            assert_eq!(overlaps(&q, &p), both, "{q:?} {p:?}");
        }
    }
}

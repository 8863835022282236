//! "Proxy ready" means every configured port reaches this proxy.
//!
//! `PORTS` holding a port proves nothing by itself: every sk_lookup
//! program attached to the network namespace runs, in attach order, and
//! the first socket picked wins (a later `bpf_sk_assign` gets EEXIST). So
//! a program attached before ours (another proxy on the same address, or
//! a predecessor whose process is still going away after SIGKILL) takes
//! the ports it steers too. The check is exact, and costs little when
//! there is nothing to find:
//! - ours alone in the namespace: no program can take a port from it, so
//!   a sample of probes proves the plumbing (socket in `STEER_SOCKET`,
//!   `PORTS` filled) and the kernel's rules prove the rest;
//! - our own `steer` in another process: its maps name the ports it takes,
//!   every one, with no connection sent to it;
//! - any other program: its rules are unknown, so every port is probed.
//!
//! A taker that goes away within the wait (a killed predecessor does within
//! milliseconds) is waited for; one that stays makes the check fail,
//! naming the ports and what to do.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Result};
use tokio::time::Instant;

use super::conflicts::port_list;
use super::peers::{self, Ahead, Ours};
use super::probe::{round, sample, Miss, Probes, QUIET};

/// Between checks while other owners still hold ports: short at first (a
/// killed predecessor is gone within milliseconds), then doubling, so a
/// live foreign owner gets few stray probes.
const RETRY: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_millis(250);
/// Ports re-probed per check while waiting on a foreign program, so a live
/// other owner sees a handful of stray connections per check, not the
/// whole range again.
const RESAMPLE: usize = 8;

/// Checks that connections to every one of `ports` on `ip` reach the
/// accept loop that shares `probes`, waiting up to `wait` for programs
/// that take some of them to go.
pub async fn verify(
    ours: &Ours,
    probes: &Probes,
    ip: IpAddr,
    ports: &[u16],
    wait: Duration,
) -> Result<()> {
    let outcome = check(ours, probes, ip, ports, wait).await;
    probes.forget();
    let lost = outcome?;
    if lost.taken.is_empty() && lost.missed.is_empty() {
        return Ok(());
    }
    bail!("{}", refusal(ip, &lost, wait))
}

/// What is still lost when the wait ends.
#[derive(Default)]
struct Lost {
    /// By program id: ports other `steer` programs take.
    taken: BTreeMap<u32, BTreeSet<u16>>,
    /// Programs ahead of ours we cannot read: (id, name).
    foreign: Vec<(u32, String)>,
    /// Ports whose probes did not reach us.
    missed: BTreeMap<u16, Miss>,
}

async fn check(
    ours: &Ours,
    probes: &Probes,
    ip: IpAddr,
    ports: &[u16],
    wait: Duration,
) -> Result<Lost> {
    let deadline = Instant::now() + wait;
    let wanted: BTreeSet<u16> = ports.iter().copied().collect();
    // What the last check's probes missed; None before the first check.
    let mut last: Option<BTreeMap<u16, Miss>> = None;
    let mut retry = RETRY;
    loop {
        let mut lost = Lost::default();
        for a in peers::ahead(ours, &wanted)? {
            match a {
                Ahead::Steer { id, taken } if !taken.is_empty() => {
                    lost.taken.insert(id, taken);
                }
                Ahead::Steer { .. } => {}
                Ahead::Foreign { id, name } => lost.foreign.push((id, name)),
            }
        }
        let free: Vec<u16> = wanted
            .iter()
            .filter(|p| !lost.taken.values().any(|t| t.contains(p)))
            .copied()
            .collect();
        lost.missed = match &last {
            // Only probes can tell what a foreign program takes.
            None if !lost.foreign.is_empty() => round(probes, ip, &free).await?,
            Some(before) if !before.is_empty() => {
                let again: Vec<u16> = before.keys().take(RESAMPLE).copied().collect();
                if round(probes, ip, &again).await?.is_empty() {
                    let all: Vec<u16> = before.keys().copied().collect();
                    round(probes, ip, &all).await?
                } else {
                    before.clone()
                }
            }
            _ => round(probes, ip, &sample(&free)).await?,
        };
        let done = lost.taken.is_empty() && lost.missed.is_empty();
        if done || Instant::now() >= deadline {
            return Ok(lost);
        }
        if last.is_none() {
            tracing::info!(
                taken = lost.taken.values().map(BTreeSet::len).sum::<usize>(),
                missed = lost.missed.len(),
                wait_ms = wait.as_millis() as u64,
                "sk_lookup programs attached before ours take some of our ports; waiting for them to go"
            );
        }
        last = Some(lost.missed);
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// The reason, by who takes which ports.
fn refusal(ip: IpAddr, lost: &Lost, wait: Duration) -> String {
    let mut reasons: Vec<String> = lost
        .taken
        .iter()
        .map(|(id, ports)| {
            format!(
                "another proxy's sk_lookup program (BPF program id {id}, attached to this \
                 network namespace before ours) steers {} on {ip} too, and the first program to \
                 pick a socket wins: stop the other proxy (`bpftool prog show id {id}` names its \
                 process), or remove these ports from one of the two configs",
                port_list(ports)
            )
        })
        .collect();
    let mut kinds: BTreeMap<Miss, BTreeSet<u16>> = BTreeMap::new();
    for (&port, &miss) in &lost.missed {
        kinds.entry(miss).or_default().insert(port);
    }
    let foreign: Vec<String> = lost
        .foreign
        .iter()
        .map(|(id, name)| match name.as_str() {
            "" => format!("id {id}"),
            name => format!("id {id} `{name}`"),
        })
        .collect();
    let who = if foreign.is_empty() {
        "an sk_lookup program".to_string()
    } else {
        format!("another sk_lookup program ({})", foreign.join(", "))
    };
    let show = match lost.foreign.first() {
        Some((id, _)) => format!("`bpftool prog show id {id}`"),
        None => "`bpftool link show`".to_string(),
    };
    reasons.extend(kinds.iter().map(|(miss, ports)| {
        let ports = port_list(ports);
        match miss {
            Miss::Elsewhere => format!(
                "{who}, attached to this network namespace before ours, takes {ports} on \
                 {ip}, and the first program to pick a socket wins: stop its owner ({show} \
                 names the process), or remove these ports from this config"
            ),
            Miss::Refused => format!(
                "connections to {ports} on {ip} are refused although this proxy steers them \
                 (an sk_lookup program attached before ours may drop them)"
            ),
            Miss::NoAnswer => format!(
                "connections to {ports} on {ip} got no answer within {} ms",
                QUIET.as_millis()
            ),
        }
    }));
    format!(
        "after waiting {} ms: {}",
        wait.as_millis(),
        reasons.join("; ")
    )
}

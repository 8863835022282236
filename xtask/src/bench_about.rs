//! The top of bench/results.md: what kind of run it was, the machine, the
//! versions of everything measured, and the exact configs of every
//! endpoint, so a number can be read with what produced it.
use std::{fmt::Write as _, fs};

use crate::bench_model::{Endpoint, Options, Targets, DURATION, HOLD, ROUNDS};
use crate::sh::cmd;

/// Seconds in "3s", "500ms", "1m" (what Go's time.ParseDuration takes for
/// the values used here); None for anything else.
fn seconds(d: &str) -> Option<f64> {
    let d = d.trim();
    if let Some(v) = d.strip_suffix("ms") {
        return v.parse::<f64>().ok().map(|v| v / 1e3);
    }
    if let Some(v) = d.strip_suffix('s') {
        return v.parse().ok();
    }
    d.strip_suffix('m')
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v * 60.0)
}

/// Shorter or fewer than the defaults: only shows that the report renders.
pub fn is_smoke(opts: &Options) -> bool {
    let shorter = |got: &str, default: &str| match (seconds(got), seconds(default)) {
        (Some(g), Some(d)) => g < d,
        _ => true,
    };
    opts.rounds < ROUNDS || shorter(&opts.duration, DURATION) || shorter(&opts.hold, HOLD)
}

fn first_line(program: &str, args: &[&str]) -> String {
    // nginx -v prints on stderr: read both.
    let out = cmd("sh")
        .arg("-c")
        .arg(format!("{program} {} 2>&1", args.join(" ")))
        .output_string()
        .unwrap_or_default();
    let line = out
        .lines()
        .map(|l| l.trim())
        .find(|l| !l.is_empty())
        .unwrap_or("not installed");
    line.to_string()
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn proc_line(path: &str, key: &str) -> String {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or("")
        .trim_start_matches(key)
        .trim_start_matches(':')
        .trim()
        .to_string()
}

pub fn preamble(opts: &Options, endpoints: &[Endpoint], targets: &Targets) -> String {
    let mut md = String::new();
    let date = cmd("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output_string()
        .unwrap_or_default();
    let commit = cmd("git")
        .args(["describe", "--always", "--dirty"])
        .dir(crate::root())
        .output_string()
        .unwrap_or_default();
    if is_smoke(opts) {
        let _ = writeln!(
            md,
            "> **Smoke run, not a result.** Shorter than the defaults (`--duration {DURATION} --rounds {ROUNDS} --hold {HOLD}`), \
             and possibly on a busy machine: the numbers only show that the report renders.\n"
        );
    }
    let _ = writeln!(
        md,
        "Measured by `{}` on {}, commit {}. Load average at the start: {}.\n",
        opts.command,
        date.trim(),
        commit.trim(),
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let uname = cmd("uname").arg("-r").output_string().unwrap_or_default();
    let _ = writeln!(md, "## Machine\n\n| what | value |\n|---|---|");
    let rows = [
        ("kernel", uname.trim().to_string()),
        ("CPU", cpu_model()),
        ("cores", cores.to_string()),
        ("memory", proc_line("/proc/meminfo", "MemTotal")),
        ("HAProxy", first_line("haproxy", &["-v"])),
        ("nginx", first_line("nginx", &["-v"])),
        ("sockperf", first_line("sockperf", &["--version"])),
        ("iperf3", first_line("iperf3", &["--version"])),
        ("Go (tester-go)", first_line("go", &["version"])),
    ];
    for (k, v) in rows {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let _ = writeln!(
        md,
        "\n## Endpoints\n\nAll on loopback. `direct` is the bench backend (`tester-go backends --kind bench` on {}) with no proxy{}. \
         Every proxy forwards one port to that backend{}. Exact configs (ports change per run):\n",
        targets.bench,
        targets
            .extra
            .iter()
            .map(|(name, a)| format!(", the {name} server on {a}"))
            .collect::<String>(),
        if targets.extra.is_empty() {
            ""
        } else {
            " and one to each of those servers"
        }
    );
    let _ = writeln!(md, "| ours | command | config |\n|---|---|---|");
    for e in endpoints.iter().filter(|e| e.role == "ours") {
        for (command, config) in &e.about {
            let _ = writeln!(md, "| {} | `{command}` | `{config}` |", e.name);
        }
    }
    md.push('\n');
    for e in endpoints.iter().filter(|e| e.role == "peer") {
        for (title, body) in &e.about {
            let _ = writeln!(md, "{title}:\n\n```\n{}\n```\n", body.trim_end());
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_durations_and_smoke_runs() {
        let cases = [
            ("3s", Some(3.0)),
            ("500ms", Some(0.5)),
            ("1m", Some(60.0)),
            ("x", None),
        ];
        for (d, want) in cases {
            assert_eq!(seconds(d), want, "{d}");
        }
        let opts = |duration: &str, rounds, hold: &str| Options {
            duration: duration.into(),
            rounds,
            hold: hold.into(),
            loads: String::new(),
            ours: &[],
            peers: true,
            out: Default::default(),
            command: String::new(),
        };
        let smoke = [
            (DURATION, ROUNDS, HOLD, false),
            ("5s", 5, "20s", false),
            ("1s", ROUNDS, HOLD, true),
            (DURATION, 1, HOLD, true),
            (DURATION, ROUNDS, "2s", true),
            ("weird", ROUNDS, HOLD, true),
        ];
        for (d, r, h, want) in smoke {
            assert_eq!(is_smoke(&opts(d, r, h)), want, "{d} {r} {h}");
        }
    }
}

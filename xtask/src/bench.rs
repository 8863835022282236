//! `cargo xtask bench`: our data planes (fastpath with and without the stream
//! parser, splice, copy) against a direct connection, HAProxy (`mode tcp`,
//! with and without `option splice-auto`) and nginx `stream`, all forwarding
//! to the tester's bench backend, measured in one interleaved `tester-go
//! compare` run. Also the short comparison that `cargo xtask test` runs
//! (direct, splice, copy).
use std::{
    fmt::Write as _,
    fs,
    net::{SocketAddr, TcpListener},
    path::Path,
    process::Stdio,
};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{proxy_binary, root, sh::cmd, sh::Background, tester_binary};

/// One thing under test: a name for the table, its listening port and pid.
struct Endpoint {
    name: &'static str,
    port: u16,
    process: Option<Background>,
}

impl Endpoint {
    /// The process that does the proxying: nginx's master only supervises
    /// its (single) worker, so CPU and memory are read from the worker.
    fn work_pid(&self) -> Option<u32> {
        let pid = self.process.as_ref()?.child.id();
        if self.name != "nginx" {
            return Some(pid);
        }
        let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        children
            .split_whitespace()
            .next()?
            .parse()
            .ok()
            .or(Some(pid))
    }

    fn arg(&self) -> String {
        match self.work_pid() {
            Some(pid) => format!("{}=127.0.0.1:{},pid={pid}", self.name, self.port),
            None => format!("{}=127.0.0.1:{}", self.name, self.port),
        }
    }
}

/// Our proxy's endpoints in the bench: name and the flags that select it.
pub const OUR_PLANES: [(&str, &[&str]); 5] = [
    // The default: adaptive (splice, quiet connections move into the kernel).
    ("auto", &["--mode", "auto"]),
    ("fastpath", &["--mode", "fastpath"]),
    // Same fastpath with the stream parser attached: the comparison behind
    // --fastpath-parser's default (NOTES.md).
    (
        "fastpath-parser",
        &["--mode", "fastpath", "--fastpath-parser"],
    ),
    ("splice", &["--mode", "splice"]),
    ("copy", &["--mode", "copy"]),
];

pub struct Options {
    pub duration: String,
    pub rounds: u32,
    pub loads: String,
    /// Which of our planes (`OUR_PLANES` names) to measure.
    pub ours: &'static [&'static str],
    pub peers: bool,
    /// Write bench/results.{md,json} and the SVG charts.
    pub report: bool,
}

impl Options {
    /// What `cargo xtask test` runs: short, the default plane and the
    /// fallback only, printed not saved. Not the fastpath: on kernel 6.18 it
    /// rarely loses an skb in bulk (now detected and reset, NOTES.md), which
    /// would fail CI by chance; its correctness runs in the Rust suite and
    /// the tester's check and faults.
    pub fn short() -> Options {
        Options {
            duration: "1s".into(),
            rounds: 1,
            loads: "bulk,pingpong,connrate".into(),
            ours: &["splice", "copy"],
            peers: false,
            report: false,
        }
    }
}

pub fn run(opts: &Options) -> Result<()> {
    let work = root().join("target/bench");
    fs::create_dir_all(&work)?;
    let backend_port = free_port()?;
    let backend = SocketAddr::from(([127, 0, 0, 1], backend_port));

    // The backend first: a proxy whose health probe finds nothing there
    // marks its only target down and the first measured connection fails.
    let mut serving = cmd(tester_binary())
        .args([
            "backends",
            "--kind",
            "bench",
            "--listen",
            &backend.to_string(),
        ])
        .spawn(Stdio::piped())?;
    crate::e2e::wait_ready(&mut serving)?;

    let mut endpoints = vec![Endpoint {
        name: "direct",
        port: backend_port,
        process: None,
    }];
    for (name, args) in OUR_PLANES {
        if opts.ours.contains(&name) {
            endpoints.push(our_proxy(name, args, backend, &work)?);
        }
    }
    if opts.peers {
        endpoints.push(haproxy("haproxy", false, backend, &work)?);
        endpoints.push(haproxy("haproxy-splice", true, backend, &work)?);
        endpoints.push(nginx(backend, &work)?);
    }
    for e in &mut endpoints[1..] {
        let process = e.process.as_mut().expect("proxies are processes");
        crate::e2e::wait_listening(e.port, process, e.name)?;
    }

    let json_path = work.join("results.json");
    let md_path = work.join("results-table.md");
    // Only this run's results may be reported.
    for stale in [&json_path, &md_path] {
        let _ = fs::remove_file(stale);
    }
    let mut compare = cmd(tester_binary())
        .arg("compare")
        .args(["--loads", &opts.loads])
        .args(["--duration", &opts.duration])
        .args(["--rounds", &opts.rounds.to_string()])
        .arg("--json")
        .arg(&json_path)
        .arg("--markdown")
        .arg(&md_path);
    for e in &endpoints {
        compare = compare.args(["--endpoint", &e.arg()]);
    }
    let compared = compare.run();
    let rss: Vec<(String, u64)> = endpoints
        .iter()
        .filter_map(|e| Some((e.name.to_string(), rss_kib(e.work_pid()?).unwrap_or(0))))
        .collect();
    drop(endpoints);
    drop(serving);
    // A run with errors is still reported (the table has an errors column),
    // then fails: a data error must not hide the numbers, nor pass quietly.
    if opts.report && json_path.exists() {
        write_report(&json_path, &md_path, &rss)?;
    }
    compared?;
    Ok(())
}

/// Our proxy with `args` (its data plane) in front of `backend`.
fn our_proxy(
    name: &'static str,
    args: &[&str],
    backend: SocketAddr,
    work: &Path,
) -> Result<Endpoint> {
    let port = free_port()?;
    let config = work.join(format!("{name}.json"));
    let json = serde_json::json!({"Apps": [{"Name": "bench", "Ports": [port], "Targets": [backend.to_string()]}]});
    fs::write(&config, serde_json::to_vec_pretty(&json)?)?;
    let log = fs::File::create(work.join(format!("{name}.log")))?;
    let process = cmd(proxy_binary())
        .arg("--config")
        .arg(&config)
        .args(["--listen-address", "127.0.0.1"])
        .args(args)
        .args(["--log-level", "warn"])
        .stderr(log)
        .spawn(Stdio::null())?;
    Ok(Endpoint {
        name,
        port,
        process: Some(process),
    })
}

fn haproxy(name: &'static str, splice: bool, backend: SocketAddr, work: &Path) -> Result<Endpoint> {
    let port = free_port()?;
    let config = work.join(format!("{name}.cfg"));
    let splice = if splice {
        "    option splice-auto\n"
    } else {
        ""
    };
    fs::write(
        &config,
        format!(
            "global\n    maxconn 4000\n    nbthread 2\n\
             defaults\n    mode tcp\n{splice}    timeout connect 5s\n    timeout client 1m\n    timeout server 1m\n\
             frontend bench\n    bind 127.0.0.1:{port}\n    default_backend targets\n\
             backend targets\n    server s1 {backend}\n"
        ),
    )?;
    let log = fs::File::create(work.join(format!("{name}.log")))?;
    let process = cmd("haproxy")
        .args(["-db", "-f"])
        .arg(&config)
        .stderr(log)
        .spawn(Stdio::null())?;
    Ok(Endpoint {
        name,
        port,
        process: Some(process),
    })
}

fn nginx(backend: SocketAddr, work: &Path) -> Result<Endpoint> {
    let port = free_port()?;
    let prefix = work.join("nginx");
    fs::create_dir_all(prefix.join("logs"))?;
    let config = prefix.join("nginx.conf");
    // proxy_half_close: without it nginx truncates echoed data after a FIN.
    fs::write(
        &config,
        format!(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
             worker_processes 1;\npid {pid};\nerror_log {err} warn;\n\
             events {{ worker_connections 8000; }}\n\
             stream {{\n  server {{\n    listen 127.0.0.1:{port};\n    proxy_pass {backend};\n\
             \x20   proxy_buffer_size 64k;\n    proxy_half_close on;\n  }}\n}}\n",
            pid = prefix.join("nginx.pid").display(),
            err = prefix.join("logs/error.log").display(),
        ),
    )?;
    let process = cmd("nginx")
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&config)
        .args(["-g", "daemon off;"])
        .spawn(Stdio::null())?;
    Ok(Endpoint {
        name: "nginx",
        port,
        process: Some(process),
    })
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// bench/results.md: the tester's table, ratios against the best peer, RSS;
/// bench/results.json; one SVG bar chart per load.
fn write_report(json_path: &Path, md_path: &Path, rss: &[(String, u64)]) -> Result<()> {
    let out = root().join("bench");
    fs::create_dir_all(&out)?;
    let report: Value = serde_json::from_slice(&fs::read(json_path)?)
        .with_context(|| format!("reading {}", json_path.display()))?;
    let table = fs::read_to_string(md_path)?;
    let cells = report["results"].as_array().context("results")?;
    let loads: Vec<String> = report["loads"]
        .as_array()
        .context("loads")?
        .iter()
        .filter_map(|l| l.as_str().map(str::to_string))
        .collect();

    let mut md = String::new();
    let uname = cmd("uname").arg("-r").output_string().unwrap_or_default();
    let date = cmd("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output_string()
        .unwrap_or_default();
    writeln!(
        md,
        "# Benchmark results\n\nMeasured by `cargo xtask bench` on {} (kernel {}, {} cores), {} round(s) of {} s per load, interleaved. Medians; `(x)` is the ratio against `direct`.\n",
        date.trim(),
        uname.trim(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        report["rounds"],
        report["duration_s"]
    )?;
    md.push_str(&table);
    md.push_str("\n## Against the best peer\n\nRatio of each of our planes to the best of HAProxy and nginx for that load (>1 is better for throughput and rate, <1 is better for latency).\n\n| load | best peer | auto | fastpath | fastpath-parser | splice | copy |\n|---|---|---|---|---|---|---|\n");
    let peers = ["haproxy", "haproxy-splice", "nginx"];
    for load in &loads {
        let (metric, higher_better) = metric_of(load);
        let value = |endpoint: &str| -> Option<f64> {
            cells
                .iter()
                .find(|c| c["endpoint"] == endpoint && c["load"] == load.as_str())
                .and_then(|c| c[metric].as_f64())
                .filter(|v| *v > 0.0)
        };
        let best = peers
            .iter()
            .filter_map(|p| value(p).map(|v| (*p, v)))
            .reduce(|a, b| if (b.1 > a.1) == higher_better { b } else { a });
        let Some((best_name, best_value)) = best else {
            continue;
        };
        let ratio = |e: &str| {
            value(e)
                .map(|v| format!("{:.2}", v / best_value))
                .unwrap_or("-".into())
        };
        writeln!(
            md,
            "| {load} | {best_name} ({best_value:.2}) | {} | {} | {} | {} | {} |",
            ratio("auto"),
            ratio("fastpath"),
            ratio("fastpath-parser"),
            ratio("splice"),
            ratio("copy")
        )?;
    }
    md.push_str("\n## Proxy memory after the run\n\n| endpoint | RSS MiB |\n|---|---|\n");
    for (name, kib) in rss {
        writeln!(md, "| {name} | {:.1} |", *kib as f64 / 1024.0)?;
    }
    writeln!(
        md,
        "\nVerdict: {}",
        report["verdict"].as_str().unwrap_or("")
    )?;
    md.push_str("\nCharts: ");
    for load in &loads {
        let svg = chart(load, cells)?;
        let name = format!("{load}.svg");
        fs::write(out.join(&name), svg)?;
        write!(md, "[{load}]({name}) ")?;
    }
    md.push('\n');
    fs::write(out.join("results.md"), md)?;
    fs::copy(json_path, out.join("results.json"))?;
    println!("xtask bench: wrote bench/results.md, bench/results.json and bench/*.svg");
    Ok(())
}

/// Which median a load is judged on, and whether more is better.
fn metric_of(load: &str) -> (&'static str, bool) {
    match load {
        "pingpong" => ("median_p50_us", false),
        "connrate" => ("median_conns_per_s", true),
        "idle" => ("median_proxy_kib_per_conn", false),
        _ => ("median_gb_per_s", true),
    }
}

fn chart(load: &str, cells: &[Value]) -> Result<String> {
    let (metric, higher_better) = metric_of(load);
    let bars: Vec<(String, f64)> = cells
        .iter()
        .filter(|c| c["load"] == load)
        .filter_map(|c| Some((c["endpoint"].as_str()?.to_string(), c[metric].as_f64()?)))
        .collect();
    let max = bars
        .iter()
        .map(|b| b.1)
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let (w, row, left) = (640.0, 28.0, 130.0);
    let h = 40.0 + row * bars.len() as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"13\">\n\
         <text x=\"8\" y=\"20\" font-weight=\"bold\">{load}: {metric} ({})</text>\n",
        if higher_better { "higher is better" } else { "lower is better" }
    );
    for (i, (name, value)) in bars.iter().enumerate() {
        let y = 32.0 + row * i as f64;
        let bar = (w - left - 90.0) * value / max;
        let colour = match name.as_str() {
            "fastpath" => "#2b7bb9",
            "copy" => "#6aa84f",
            "splice" => "#8e7cc3",
            "direct" => "#999999",
            _ => "#e69138",
        };
        writeln!(
            svg,
            "<text x=\"8\" y=\"{ty}\">{name}</text><rect x=\"{left}\" y=\"{y}\" width=\"{bar:.1}\" height=\"20\" fill=\"{colour}\"/>\
             <text x=\"{tx:.1}\" y=\"{ty}\">{value:.2}</text>",
            ty = y + 15.0,
            tx = left + bar + 6.0,
        )?;
    }
    svg.push_str("</svg>\n");
    Ok(svg)
}

//! `cargo xtask bench`: our data planes (auto, fastpath, splice, copy)
//! against a direct connection, HAProxy (`mode
//! tcp`, with and without `option splice-auto`) and nginx `stream`, all
//! forwarding to the tester's bench backend and to the third-party servers
//! (`sockperf sr`, `iperf3 -s`),
//! measured in one interleaved `tester-go compare` run that writes
//! bench/results.md, results.json and the SVG charts. Also the short
//! comparison that `cargo xtask test` runs (direct, splice, copy).
use std::{fs, net::SocketAddr, path::Path, process::Stdio};

use anyhow::{Context, Result};

use crate::bench_model::{Endpoint, Options, Targets, OUR_PLANES};
use crate::ports::free_port;
use crate::{bench_about, proxy_binary, root, sh::cmd, tester_binary};

/// Every round starts the servers and proxies afresh and runs one round of
/// `tester-go compare` that continues the previous rounds' JSON: memory per
/// connection is then measured in a fresh process each round, not in what
/// an earlier round's 2,000 connections left in the allocator.
pub fn run(opts: &Options) -> Result<()> {
    let work = root().join("target/bench");
    fs::create_dir_all(&work)?;
    let json = work.join("rounds.json");
    // Only this run's results may be reported: no JSON to continue, no
    // chart of a load this run does not measure.
    let _ = fs::remove_file(&json);
    if let Ok(dir) = fs::read_dir(&opts.out) {
        for entry in dir.flatten() {
            if entry.path().extension().is_some_and(|e| e == "svg") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    let mut failed = None;
    for round in 0..opts.rounds {
        if let Err(e) = one_round(opts, round, &work, &json) {
            // A round with errors is still reported (every table has an
            // errors column); the run fails at the end, after all rounds.
            eprintln!("xtask bench: round {}: {e:#}", round + 1);
            failed = Some(e);
            if !json.exists() {
                break;
            }
        }
    }
    if let Some(e) = failed {
        return Err(e.context(format!("see {}/results.md", opts.out.display())));
    }
    println!(
        "xtask bench: wrote {}/results.md, results.json and the SVG charts",
        opts.out.display()
    );
    Ok(())
}

fn one_round(opts: &Options, round: u32, work: &Path, json: &Path) -> Result<()> {
    let backend = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    // The servers first: a proxy whose health probe finds nothing there
    // marks its only target down and the first measured connection fails.
    let mut serving = cmd(tester_binary())
        .args(["backends", "--kind", "bench", "--listen"])
        .arg(backend.to_string())
        .spawn(Stdio::piped())?;
    crate::e2e::wait_ready(&mut serving)?;
    // The third-party clients' servers, each on its own port.
    let mut servers = vec![];
    let mut extra = vec![];
    for (load, name, program, args) in THIRD_PARTY {
        if !opts.wants(load) {
            continue;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let log = fs::File::create(work.join(format!("{name}-server.log")))?;
        let mut server = cmd(program)
            .args(args)
            .arg(addr.port().to_string())
            .stderr(log.try_clone()?)
            .spawn(Stdio::from(log))
            .with_context(|| format!("starting {program} (cargo xtask setup installs it)"))?;
        crate::e2e::wait_listening(addr.port(), &mut server, program)?;
        servers.push(server);
        extra.push((name, addr));
    }
    let targets = Targets {
        bench: backend,
        extra,
    };
    let endpoints = start_endpoints(opts, &targets, work)?;

    let preamble = work.join("preamble.md");
    fs::write(&preamble, bench_about::preamble(opts, &endpoints, &targets))?;
    let mut compare = cmd(tester_binary())
        .arg("compare")
        .args(["--loads", &opts.loads])
        .args(["--duration", &opts.duration])
        .args(["--rounds", "1"])
        .args(["--hold", &opts.hold])
        .arg("--json")
        .arg(json)
        .arg("--report-dir")
        .arg(&opts.out)
        .arg("--preamble")
        .arg(&preamble);
    if round > 0 {
        compare = compare.arg("--continue").arg(json);
    }
    for e in &endpoints {
        compare = compare.args(["--endpoint", &e.arg()]);
    }
    let compared = compare.run();
    drop(endpoints);
    drop(servers);
    drop(serving);
    compared
}

fn start_endpoints(opts: &Options, targets: &Targets, work: &Path) -> Result<Vec<Endpoint>> {
    let mut endpoints = vec![Endpoint {
        name: "direct",
        role: "base",
        port: targets.bench.port(),
        routes: targets.extra.iter().map(|(n, a)| (*n, a.port())).collect(),
        process: None,
        about: vec![],
    }];
    for (name, args) in OUR_PLANES {
        if opts.ours.contains(&name) {
            endpoints.push(our_proxy(name, args, targets, work)?);
        }
    }
    if opts.peers {
        use crate::bench_peers::{haproxy, nginx};
        endpoints.push(haproxy("haproxy", false, targets, work)?);
        endpoints.push(haproxy("haproxy-splice", true, targets, work)?);
        endpoints.push(nginx(targets, work)?);
    }
    for e in &mut endpoints[1..] {
        let process = e.process.as_mut().expect("proxies are processes");
        crate::e2e::wait_listening(e.port, process, e.name)?;
        for (_, p) in &e.routes {
            crate::e2e::wait_listening(*p, process, e.name)?;
        }
    }
    Ok(endpoints)
}

/// The third-party clients' servers: the load that needs one, the route's
/// name (the `tester-go compare --endpoint` option), the server and its
/// arguments (the port follows).
const THIRD_PARTY: [(&str, &str, &str, &[&str]); 2] = [
    (
        "sockperf-pp",
        "sockperf",
        "sockperf",
        &["sr", "--tcp", "-i", "127.0.0.1", "-p"],
    ),
    (
        "iperf3-bulk",
        "iperf3",
        "iperf3",
        &["-s", "-B", "127.0.0.1", "-p"],
    ),
];

/// Our proxy with `args` (its data plane): app "bench" to the bench backend
/// and an app per third-party server.
fn our_proxy(
    name: &'static str,
    args: &[&str],
    targets: &Targets,
    work: &Path,
) -> Result<Endpoint> {
    let port = free_port()?;
    let mut apps = vec![
        serde_json::json!({"Name": "bench", "Ports": [port], "Targets": [targets.bench.to_string()]}),
    ];
    let mut routes = vec![];
    for (route, addr) in &targets.extra {
        let p = free_port()?;
        apps.push(serde_json::json!({"Name": route, "Ports": [p], "Targets": [addr.to_string()]}));
        routes.push((*route, p));
    }
    let config = work.join(format!("{name}.json"));
    let json = serde_json::to_string(&serde_json::json!({ "Apps": apps }))?;
    fs::write(&config, &json)?;
    let log = fs::File::create(work.join(format!("{name}.log")))?;
    let flags = ["--listen-address", "127.0.0.1"]
        .iter()
        .chain(args)
        .chain(&["--log-level", "warn"])
        .copied()
        .collect::<Vec<_>>();
    let process = cmd(proxy_binary())
        .arg("--config")
        .arg(&config)
        .args(&flags)
        .stderr(log)
        .spawn(Stdio::null())?;
    // Ours differ only in their flags: one table row each (bench_about).
    let about = vec![(
        format!("proxy --config {name}.json {}", flags.join(" ")),
        json,
    )];
    Ok(Endpoint::proxy(name, "ours", port, routes, process, about))
}

//! The peers `cargo xtask bench` measures against, configured as users run
//! them on a 2-core machine: HAProxy 2.6 `mode tcp` with `nbthread 2` (with
//! and without `option splice-auto`) and nginx `stream` with 2 workers.
//! Each forwards one port to the bench backend and one to each third-party
//! server. The exact files go into results.md.
use std::{fmt::Write as _, fs, path::Path, process::Stdio};

use anyhow::Result;

use crate::bench_model::{Endpoint, Targets, NGINX_WORKERS};
use crate::ports::free_port;
use crate::sh::cmd;

pub fn haproxy(
    name: &'static str,
    splice: bool,
    targets: &Targets,
    work: &Path,
) -> Result<Endpoint> {
    let port = free_port()?;
    let splice_line = if splice {
        "    option splice-auto\n"
    } else {
        ""
    };
    // maxconn: the idle loads hold 2,000 connections, and HAProxy sizes its
    // file-descriptor needs from it (within RLIMIT_NOFILE).
    let mut cfg = format!(
        "global\n    maxconn 4000\n    nbthread 2\n\
         defaults\n    mode tcp\n{splice_line}    timeout connect 5s\n    timeout client 1m\n    timeout server 1m\n\
         frontend bench\n    bind 127.0.0.1:{port}\n    default_backend targets\n\
         backend targets\n    server s1 {}\n",
        targets.bench
    );
    let mut routes = vec![];
    for (route, addr) in &targets.extra {
        let p = free_port()?;
        write!(
            cfg,
            "frontend {route}\n    bind 127.0.0.1:{p}\n    default_backend {route}\n\
             backend {route}\n    server s1 {addr}\n"
        )?;
        routes.push((*route, p));
    }
    let config = work.join(format!("{name}.cfg"));
    fs::write(&config, &cfg)?;
    let log = fs::File::create(work.join(format!("{name}.log")))?;
    let process = cmd("haproxy")
        .args(["-db", "-f"])
        .arg(&config)
        .stderr(log)
        .spawn(Stdio::null())?;
    let about = vec![
        (
            format!("{name}: command"),
            format!("haproxy -db -f {name}.cfg"),
        ),
        (format!("{name}.cfg"), cfg),
    ];
    Ok(Endpoint::proxy(name, "peer", port, routes, process, about))
}

pub fn nginx(targets: &Targets, work: &Path) -> Result<Endpoint> {
    let port = free_port()?;
    let prefix = work.join("nginx");
    fs::create_dir_all(prefix.join("logs"))?;
    let config = prefix.join("nginx.conf");
    // proxy_half_close: without it nginx truncates echoed data after a FIN.
    let mut servers = format!(
        "  server {{\n    listen 127.0.0.1:{port};\n    proxy_pass {};\n\
         \x20   proxy_buffer_size 64k;\n    proxy_half_close on;\n  }}\n",
        targets.bench
    );
    let mut routes = vec![];
    for (route, addr) in &targets.extra {
        let p = free_port()?;
        write!(
            servers,
            "  server {{\n    listen 127.0.0.1:{p};\n    proxy_pass {addr};\n\
             \x20   proxy_buffer_size 64k;\n    proxy_half_close on;\n  }}\n"
        )?;
        routes.push((*route, p));
    }
    let cfg = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         worker_processes {NGINX_WORKERS};\npid {pid};\nerror_log {err} warn;\n\
         events {{ worker_connections 8000; }}\n\
         stream {{\n{servers}}}\n",
        pid = prefix.join("nginx.pid").display(),
        err = prefix.join("logs/error.log").display(),
    );
    fs::write(&config, &cfg)?;
    let process = cmd("nginx")
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&config)
        .args(["-g", "daemon off;"])
        .spawn(Stdio::null())?;
    let about = vec![
        (
            "nginx: command".to_string(),
            "nginx -p PREFIX -c nginx.conf -g 'daemon off;'".to_string(),
        ),
        ("nginx.conf".to_string(), cfg),
    ];
    Ok(Endpoint::proxy(
        "nginx", "peer", port, routes, process, about,
    ))
}

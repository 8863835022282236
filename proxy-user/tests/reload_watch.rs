//! Hot reload under load and on config file change: 100 reloads while 200
//! connections stream SHA-checked data break none of them; a changed file
//! (no signal) is served within a second; a bad file is logged once and the
//! running config keeps serving.

#[macro_use]
mod common;
mod steering_util;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use steering_util::*;
use tokio::net::TcpStream;

planes!(
    hundred_reloads_under_200_streams_then_file_change,
    invalid_file_keeps_serving_and_logs_once
);

const STREAMS: usize = 200;
const RELOADS: usize = 100;

async fn hundred_reloads_under_200_streams_then_file_change(mode: &str) {
    let a = Backend::identify("a").await;
    let b = Backend::identify("b").await;
    let c = Backend::identify("c").await;
    let proxy = Proxy::start(
        mode,
        &[
            AppSpec::new("one", 2, vec![a.target()]),
            AppSpec::new("two", 1, vec![b.target()]),
        ],
        &[],
    )
    .await;
    let (p0, p1, q0) = (proxy.ports[0][0], proxy.ports[0][1], proxy.ports[1][0]);
    let extra = free_ports(2);
    let (at, bt, ct) = (a.target(), b.target(), c.target());
    // The storm cycles through these: ports added and removed (p1 carries
    // live streams), targets changed, apps added and removed.
    let variants: Vec<String> = vec![
        serde_json::json!({"Apps": [
            {"Name": "one", "Ports": [p0], "Targets": [bt]},
            {"Name": "two", "Ports": [q0, extra[0]], "Targets": [bt]}]}),
        serde_json::json!({"Apps": [
            {"Name": "one", "Ports": [p0, p1], "Targets": [at, ct], "Balance": "round_robin"},
            {"Name": "three", "Ports": [extra[1]], "Targets": [ct]}]}),
        serde_json::json!({"Apps": [
            {"Name": "one", "Ports": [p0, p1], "Targets": [at]},
            {"Name": "two", "Ports": [q0], "Targets": [bt]}]}),
    ]
    .into_iter()
    .map(|v| v.to_string())
    .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for wave in 0..STREAMS / 50 {
        let mut opened = Vec::new();
        for i in 0..50 {
            let n = wave * 50 + i;
            let port = if n % 2 == 0 { p0 } else { p1 };
            // Connected through the proxy (first byte from the target read)
            // before the storm: a client still in a listen backlog is not
            // a live connection yet.
            opened.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
                let id = read_id(&mut s).await?;
                Ok::<_, std::io::Error>((s, id))
            }));
        }
        for (i, o) in opened.into_iter().enumerate() {
            let (s, id) = o.await.unwrap().expect("connect through the proxy");
            assert_eq!(id, "a");
            let seed = (wave * 50 + i) as u64;
            tasks.push(tokio::spawn(paced_echo(s, seed, stop.clone())));
        }
    }
    let opened_in = started.elapsed();

    bounded(60, "reload storm", async {
        for i in 0..RELOADS {
            std::fs::write(&proxy.config_path, &variants[i % variants.len()]).unwrap();
            proxy.signal(libc::SIGHUP);
            wait_log(&proxy, "config reloaded", i + 1, 10).await;
        }
    })
    .await;
    let storm = started.elapsed() - opened_in;
    stop.store(true, Ordering::Relaxed);
    let mut broken = Vec::new();
    let mut bytes = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        match bounded(60, "stream", t).await.unwrap() {
            Ok(n) => bytes += n,
            Err(e) => broken.push(format!("stream {i}: {e}")),
        }
    }
    assert!(
        broken.is_empty(),
        "{} of {STREAMS} streams broke:\n{}",
        broken.len(),
        broken.join("\n")
    );
    let log = proxy.log();
    assert!(!log.contains("config reload rejected"), "{log}");
    eprintln!(
        "{mode}: {STREAMS} streams opened in {opened_in:?}, {RELOADS} reloads in {storm:?}, {bytes} bytes each way, none broken"
    );

    // A file change alone (no signal) is served within a second: editor
    // style (rename over), then rewritten in place.
    let addr = format!("127.0.0.1:{p0}");
    let to_c = serde_json::json!({"Apps": [{"Name": "one", "Ports": [p0, p1], "Targets": [ct]}]});
    replace_config(&proxy, &to_c.to_string());
    let took = time_until_id(&addr, "c", Duration::from_secs(1)).await;
    eprintln!("{mode}: renamed config served after {took:?}");
    let to_b = serde_json::json!({"Apps": [{"Name": "one", "Ports": [p0, p1], "Targets": [bt]}]});
    std::fs::write(&proxy.config_path, to_b.to_string()).unwrap();
    let took = time_until_id(&addr, "b", Duration::from_secs(1)).await;
    eprintln!("{mode}: rewritten config served after {took:?}");
    assert!(
        TcpStream::connect(("127.0.0.1", q0)).await.is_err(),
        "app two's port should be closed after the file change"
    );
    let log = proxy.log();
    assert!(log.contains(r#""trigger":"file change""#), "{log}");
}

async fn invalid_file_keeps_serving_and_logs_once(mode: &str) {
    let a = Backend::identify("a").await;
    let b = Backend::identify("b").await;
    let proxy = Proxy::start(mode, &[AppSpec::new("one", 1, vec![a.target()])], &[]).await;
    let port = proxy.ports[0][0];
    let addr = format!("127.0.0.1:{port}");
    bounded(30, "invalid file", async {
        let mut live = TcpStream::connect(&addr).await.unwrap();
        assert_eq!(read_id(&mut live).await.unwrap(), "a");
        let bad = serde_json::json!({"Apps": [{"Name": "one", "Ports": [port, 70000], "Targets": [b.target()]}]})
            .to_string();
        replace_config(&proxy, &bad);
        wait_log(&proxy, "config reload rejected", 1, 5).await;
        // Touched again with the same bad content: still one error.
        tokio::time::sleep(Duration::from_millis(600)).await;
        std::fs::write(&proxy.config_path, &bad).unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(id_at(&addr).await.unwrap(), "a", "the good config still serves");
        echo_check_stream(live, 7, 200_000).await.unwrap();

        let errors: Vec<_> = proxy
            .log_lines()
            .into_iter()
            .filter(|l| l["level"] == "ERROR")
            .collect();
        assert_eq!(errors.len(), 1, "exactly one error line: {errors:#?}");
        let e = &errors[0];
        assert_eq!(e["message"], "config reload rejected; still running the previous config", "{e}");
        let text = e["error"].as_str().unwrap_or_default();
        assert!(
            text.contains("Apps[0].Ports[1]") && text.contains("70000"),
            "the error names the field and value: {text}"
        );

        // Fixed: served within a second.
        let good = serde_json::json!({"Apps": [{"Name": "one", "Ports": [port], "Targets": [b.target()]}]});
        replace_config(&proxy, &good.to_string());
        time_until_id(&addr, "b", Duration::from_secs(1)).await;
    })
    .await;
}

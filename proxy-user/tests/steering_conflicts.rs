//! `--steering sk_lookup` next to other owners of its ports: a second
//! steering proxy, a listener-mode proxy, and a predecessor being killed.
//! Each proxy is the real binary; each test steers its own 127.0.0.x.

#[macro_use]
mod common;
mod steering_util;

use std::time::Duration;

use common::*;
use steering_util::*;

const STEER: [&str; 4] = ["--steering", "sk_lookup", "--mode", "copy"];

/// `STEER` on `ip`.
fn steer_args(ip: &str) -> Vec<&str> {
    let mut args = vec!["--listen-address", ip];
    args.extend(STEER);
    args
}

fn one_app(name: &str, ports: serde_json::Value, target: &Backend) -> String {
    serde_json::json!({"Apps": [{"Name": name, "Ports": ports, "Targets": [target.target()]}]})
        .to_string()
}

/// Two identify backends ("a" and "b"), a loopback address of the test's
/// own and a first port for its ranges.
struct Scene {
    a: Backend,
    b: Backend,
    ip: String,
    base: u16,
}

impl Scene {
    async fn new() -> Scene {
        Scene {
            a: Backend::identify("a").await,
            b: Backend::identify("b").await,
            ip: loopback_ip(),
            base: base_port(),
        }
    }
}

/// Starting a proxy that must refuse: its log (stderr included), or a panic
/// naming what answered if it came up instead.
async fn refused(config: &str, args: &[&str], probe: &str) -> String {
    refused_with(config, args, probe, |_| {}).await
}

async fn refused_with(
    config: &str,
    args: &[&str],
    probe: &str,
    setup: impl FnOnce(&mut std::process::Command),
) -> String {
    match try_spawn_proxy_with(config, args, setup).await {
        Err(log) => log,
        Ok(proxy) => {
            let answer = id_at(probe).await;
            panic!(
                "the proxy started instead of refusing ({probe} answers {answer:?}); log:\n{}",
                proxy.log()
            )
        }
    }
}

/// Finding 1: the first sk_lookup program attached to the network namespace
/// wins, so a second proxy on the same address and ports would say "proxy
/// ready" and get nothing. It must refuse, naming the ports and the way
/// out; the first keeps serving. Refused twice: once from the first one's
/// maps, once (without CAP_SYS_ADMIN, which reading another process's
/// programs needs) from probes. The same ports on another address are no
/// conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_steering_proxy_on_the_same_ports_refuses_to_start() {
    let Scene { a, b, ip, base } = Scene::new().await;
    let range = |from: u16, to: u16| format!("{}-{}", base + from, base + to);
    let first = spawn_proxy(
        &one_app("first", serde_json::json!([range(0, 999)]), &a),
        &steer_args(&ip),
    )
    .await;
    // Overlaps the first on 990-999 only.
    let second = one_app("second", serde_json::json!([range(990, 1_009)]), &b);
    let log = bounded(
        30,
        "second proxy",
        refused(&second, &steer_args(&ip), &format!("{ip}:{}", base + 995)),
    )
    .await;
    assert!(
        log.contains(&range(990, 999))
            && log.contains("sk_lookup program")
            && log.contains("stop the other proxy"),
        "the refusal should name ports {} and what to do:\n{log}",
        range(990, 999)
    );
    assert!(!log.contains(&format!("{}", base + 1_000)), "{log}");
    let log = bounded(
        30,
        "second proxy, probing",
        refused_with(
            &second,
            &steer_args(&ip),
            &format!("{ip}:{}", base + 995),
            |cmd| {
                use std::os::unix::process::CommandExt;
                // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
                unsafe {
                    cmd.pre_exec(|| {
                        // CAP_SYS_ADMIN, from the bounding set: gone after exec.
                        if libc::prctl(libc::PR_CAPBSET_DROP, 21, 0, 0, 0) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            },
        ),
    )
    .await;
    assert!(
        log.contains(&range(990, 999)) && log.contains("another sk_lookup program ("),
        "the probes should find ports {} taken:\n{log}",
        range(990, 999)
    );
    bounded(30, "first proxy", async {
        for off in [0, 990, 995, 999] {
            assert_eq!(id_at(&format!("{ip}:{}", base + off)).await.unwrap(), "a");
        }
    })
    .await;
    // Elsewhere the same ports are free: that one starts and serves.
    let other_ip = loopback_ip();
    let other = spawn_proxy(&second, &steer_args(&other_ip)).await;
    bounded(30, "other address", async {
        assert_eq!(
            id_at(&format!("{other_ip}:{}", base + 995)).await.unwrap(),
            "b"
        );
    })
    .await;
    drop((first, other));
}

/// Finding 2: sk_lookup runs before the kernel's own listener lookup, so a
/// steering proxy would silently take the traffic of a listener-mode proxy
/// already bound on one of its ports. It must refuse, naming the port; a
/// reload that would add such a port is rejected the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn steering_refuses_a_port_a_listener_proxy_holds() {
    let Scene { a, b, ip, base } = Scene::new().await;
    let held = base + 7;
    let listeners = spawn_proxy(
        &one_app("held", serde_json::json!([held]), &a),
        &[
            "--listen-address",
            &ip,
            "--steering",
            "listeners",
            "--mode",
            "copy",
        ],
    )
    .await;
    let wide = one_app(
        "wide",
        serde_json::json!([format!("{base}-{}", base + 99)]),
        &b,
    );
    let log = bounded(
        30,
        "steering proxy",
        refused(&wide, &steer_args(&ip), &format!("{ip}:{held}")),
    )
    .await;
    assert!(
        log.contains(&format!("port {held} ")) && log.contains("listening socket"),
        "the refusal should name port {held} and its listener:\n{log}"
    );
    bounded(30, "listener proxy", async {
        assert_eq!(id_at(&format!("{ip}:{held}")).await.unwrap(), "a");
    })
    .await;

    // Started next to it without the port, then reloaded to add it.
    let around = serde_json::json!([format!("{base}-{}", held - 1), held + 1]);
    let steering = spawn_proxy(&one_app("wide", around, &b), &steer_args(&ip)).await;
    replace_config(&steering, &wide);
    wait_log(&steering, "config reload rejected", 1, 10).await;
    let log = steering.log();
    assert!(
        log.contains(&format!("port {held} ")) && log.contains("listening socket"),
        "the rejected reload should name port {held}:\n{log}"
    );
    bounded(30, "after the reload", async {
        assert_eq!(id_at(&format!("{ip}:{held}")).await.unwrap(), "a");
        assert_eq!(id_at(&format!("{ip}:{base}")).await.unwrap(), "b");
    })
    .await;
    drop((listeners, steering));
}

/// Finding 3: "proxy ready" (and /readyz) must mean every configured port
/// reaches this proxy, also when it starts as its predecessor is being
/// SIGKILLed. 20 cycles on 10,000 ports; the kill lands anywhere from
/// before the successor attaches its program to after (the predecessor's
/// program, attached first, wins every lookup until the process is gone).
/// Each generation has its own backend, so an answer from the predecessor
/// is caught, not only refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_during_a_kill_is_ready_on_every_port() {
    let ip = loopback_ip();
    let base = base_port();
    let ports = format!("{base}-{}", base + 9_999);
    let mut failures = Vec::new();
    bounded(240, "20 restarts", async {
        let mut previous: Option<(Proxy, Backend)> = None;
        for cycle in 0..20 {
            let backend = Backend::identify(&format!("gen{cycle}")).await;
            let config = one_app("wide", serde_json::json!([ports]), &backend);
            let killer = previous.as_ref().map(|(p, _)| {
                let pid = p.pid();
                let delay = Duration::from_millis(fastrand::u64(..200));
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    // SAFETY: kill(2) on our own child, not reaped before
                    // `previous` is dropped below, so the pid is still its.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                })
            });
            let proxy = spawn_proxy(&config, &steer_args(&ip)).await;
            let mut sample: Vec<u16> = (0..20).map(|_| base + fastrand::u16(..10_000)).collect();
            sample.extend([base, base + 9_999]);
            for port in sample {
                let got =
                    tokio::time::timeout(Duration::from_secs(3), id_at(&format!("{ip}:{port}")))
                        .await;
                match got {
                    Ok(Ok(id)) if id == backend.id => {}
                    other => failures.push(format!("cycle {cycle} port {port}: {other:?}")),
                }
            }
            if let Some(k) = killer {
                k.await.unwrap();
            }
            // Reaps the predecessor; its log is checked like any proxy's.
            drop(previous.take());
            previous = Some((proxy, backend));
        }
    })
    .await;
    assert!(
        failures.is_empty(),
        "{} sampled ports did not reach the proxy that said \"proxy ready\":\n{}",
        failures.len(),
        failures.join("\n")
    );
}

//! Connecting to a target with failover.
//!
//! Each attempt resolves DNS afresh (targets can move) and is bounded by its
//! own timeout; failed targets are marked down and the next best untried one
//! is picked, all within one overall deadline so a client never waits longer
//! than `deadline` for its first byte of service.

use std::time::Duration;

use anyhow::anyhow;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::balancer::{ActiveGuard, Balancer};
use super::dial::{dial, FailureReason};
use super::health;
use super::loop_guard::LoopGuard;

#[derive(Debug, Clone, Copy)]
pub struct ConnectPolicy {
    /// Per attempt, DNS included.
    pub timeout: Duration,
    /// Attempts per client connection; each target is tried at most once.
    pub attempts: u32,
    /// Over all attempts.
    pub deadline: Duration,
}

#[derive(Debug)]
pub struct Connected {
    pub stream: TcpStream,
    /// Keeps the target's active count up for the connection's lifetime.
    pub guard: ActiveGuard,
    pub attempts: u32,
}

#[derive(Debug)]
pub struct ConnectFailed {
    pub attempts: u32,
    pub last_error: anyhow::Error,
}

pub async fn connect(
    balancer: &Balancer,
    policy: &ConnectPolicy,
    loops: &LoopGuard,
) -> Result<Connected, ConnectFailed> {
    let deadline = Instant::now() + policy.deadline;
    let max_attempts = policy.attempts.max(1) as usize;
    let mut tried: Vec<usize> = Vec::with_capacity(max_attempts);
    // Built only on failure: an eager error per connection cost an
    // allocation, and a backtrace capture under RUST_BACKTRACE=1 (3% of a
    // churn profile).
    let mut last_error: Option<anyhow::Error> = None;
    while tried.len() < max_attempts {
        let now = Instant::now();
        if now >= deadline {
            let reached = format!("connect deadline of {:?} reached", policy.deadline);
            last_error = Some(match last_error {
                Some(e) => e.context(reached),
                None => anyhow!(reached),
            });
            break;
        }
        let Some(idx) = balancer.pick(&tried) else {
            break; // every target tried once
        };
        tried.push(idx);
        let backend = &balancer.backends[idx];
        // Count the attempt as load, so concurrent picks spread out.
        let guard = backend.acquire();
        let budget = policy.timeout.min(deadline - now);
        let started = Instant::now();
        let result = dial(&backend.target, budget, loops).await;
        backend
            .stats
            .attempt(started.elapsed(), result.as_ref().err().map(|e| e.reason));
        match result {
            Ok((stream, _)) => {
                return Ok(Connected {
                    stream,
                    guard,
                    attempts: tried.len() as u32,
                })
            }
            Err(e) => {
                if e.reason == FailureReason::Loop {
                    // A config mistake rather than a flaky target: loud.
                    tracing::warn!(app = %balancer.app, target = %backend.target, reason = e.reason.as_str(), error = %format!("{:#}", e.err), "connect attempt refused: the target is this proxy");
                } else {
                    tracing::debug!(app = %balancer.app, target = %backend.target, error = %format!("{:#}", e.err), "connect attempt failed");
                }
                // A timeout on a budget cut short by the overall deadline
                // says little about the target; a full-length one does. The
                // first attempt always had all the time it could have (the
                // timeout, or the whole deadline if shorter; counting that
                // as cut short meant a deadline under the timeout never
                // marked a silent target down).
                let unfair_timeout = e.timed_out() && budget < policy.timeout && tried.len() > 1;
                if !e.is_local() && !unfair_timeout {
                    if let Some(t) = backend.health.passive_failure() {
                        health::log_transition(
                            &balancer.app,
                            &backend.target,
                            t,
                            &format!("connect failed: {:#}", e.err),
                        );
                    }
                }
                last_error = Some(e.err);
            }
        }
    }
    Err(ConnectFailed {
        attempts: tried.len() as u32,
        // Nothing tried: every target is out of rotation (drained or
        // disabled through the admin API); the config has at least one.
        last_error: last_error.unwrap_or_else(|| {
            anyhow!("no target to try: every target of the app is drained or disabled")
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_target, Balance};

    fn policy() -> ConnectPolicy {
        ConnectPolicy {
            timeout: Duration::from_secs(2),
            attempts: 3,
            deadline: Duration::from_secs(5),
        }
    }

    fn dead_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn fails_over_and_marks_failed_targets_down() {
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let targets = [
            parse_target(&format!("127.0.0.1:{}", dead_port())).unwrap(),
            parse_target("bad.target.for.testing:6003").unwrap(),
            parse_target(&good.local_addr().unwrap().to_string()).unwrap(),
        ];
        let b = Balancer::new("t", Balance::RoundRobin, &targets);
        let c = connect(&b, &policy(), &LoopGuard::default())
            .await
            .expect("the good target is reached");
        assert_eq!(c.stream.peer_addr().unwrap(), good.local_addr().unwrap());
        assert_eq!(c.guard.backend().active(), 1);
        // Whichever bad targets were tried are down; the good one is not.
        assert!(b.backends[2].health.is_up());
        let tried_bad = (c.attempts - 1) as usize;
        assert_eq!(
            b.backends[..2].iter().filter(|x| !x.health.is_up()).count(),
            tried_bad
        );
        drop(c);
        assert!(b.backends.iter().all(|x| x.active() == 0));
    }

    #[tokio::test]
    async fn bounded_by_attempts_and_reports_last_error() {
        let targets: Vec<_> = (0..5)
            .map(|_| parse_target(&format!("127.0.0.1:{}", dead_port())).unwrap())
            .collect();
        let b = Balancer::new("t", Balance::LeastConn, &targets);
        let err = connect(&b, &policy(), &LoopGuard::default())
            .await
            .unwrap_err();
        assert_eq!(err.attempts, 3);
        assert!(
            format!("{:#}", err.last_error).contains("refused"),
            "{:#}",
            err.last_error
        );
        assert_eq!(b.backends.iter().filter(|x| !x.health.is_up()).count(), 3);
    }

    /// With a connect deadline under the connect timeout, an attempt that
    /// times out on the whole deadline had all the time it could have: it
    /// counts against the target. It never did, so under such flags client
    /// traffic never marked a silent target down.
    #[tokio::test]
    async fn a_timeout_on_the_whole_deadline_counts() {
        use socket2::{Domain, Socket, Type};
        // A listener whose accept queue is full: further SYNs are dropped,
        // so a connect times out (as to a silent host).
        let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        l.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        l.listen(0).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let _queued = std::net::TcpStream::connect(addr).unwrap();
        let b = Balancer::new(
            "t",
            Balance::RoundRobin,
            &[parse_target(&addr.to_string()).unwrap()],
        );
        let policy = ConnectPolicy {
            timeout: Duration::from_secs(5),
            attempts: 1,
            deadline: Duration::from_millis(300),
        };
        let err = connect(&b, &policy, &LoopGuard::default())
            .await
            .unwrap_err();
        assert!(
            format!("{:#}", err.last_error).contains("timed out"),
            "{:#}",
            err.last_error
        );
        assert!(
            !b.backends[0].health.is_up(),
            "a full-length timeout did not count"
        );
    }

    /// A name resolving to one of our listeners fails with `loop` before
    /// any connection is made, and the next target is tried.
    #[tokio::test]
    async fn refuses_targets_that_resolve_to_us() {
        let ours = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = ours.local_addr().unwrap().port();
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let loops = LoopGuard::new(crate::config::Listen::new(
            "127.0.0.1".parse().unwrap(),
            Vec::new(),
        ));
        loops.set_ports([port]);
        let targets = [
            // Not an address to validation; inet_aton reads it as 127.0.0.1.
            parse_target(&format!("127.1:{port}")).unwrap(),
            parse_target(&good.local_addr().unwrap().to_string()).unwrap(),
        ];
        let b = Balancer::new("t", Balance::RoundRobin, &targets);
        let policy = ConnectPolicy {
            attempts: 1,
            ..policy()
        };
        let mut reasons = Vec::new();
        for _ in 0..2 {
            match connect(&b, &policy, &loops).await {
                Ok(c) => assert_eq!(c.stream.peer_addr().unwrap(), good.local_addr().unwrap()),
                Err(e) => reasons.push(format!("{:#}", e.last_error)),
            }
        }
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(
            reasons[0].contains("a listener of this proxy"),
            "{reasons:?}"
        );
        assert_eq!(b.backends[0].stats.failures(FailureReason::Loop), 1);
        assert!(!b.backends[0].health.is_up());
        let nothing = tokio::time::timeout(Duration::from_millis(50), ours.accept()).await;
        assert!(nothing.is_err(), "a connection reached our own listener");
    }
}

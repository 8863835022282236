//! What one health probe does, per app: a TCP connect, or a connect and a
//! short conversation (`HealthCheck.Send` / `Expect` in the config), with
//! the PROXY header first when the app sends one to its targets (a target
//! that requires the header would otherwise drop every probe).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::dial::dial;
use super::loop_guard::LoopGuard;
use super::proxy_protocol;
use crate::config::{App, ProxyProtocol, Target};

/// The `--health-*` flags: how targets are probed unless their app says
/// otherwise (`ProbeSpec::for_app`).
#[derive(Debug, Clone, Copy)]
pub struct HealthConfig {
    pub interval: Duration,
    /// Consecutive successful probes to mark a down target up.
    pub rise: u32,
    /// Consecutive failed probes to mark an up target down.
    pub fall: u32,
    pub timeout: Duration,
}

/// How an app's targets are probed: the `--health-*` flags, overridden by
/// the app's `HealthCheck` fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub interval: Duration,
    pub rise: u32,
    pub fall: u32,
    /// For the whole probe: connect, send, and the expected reply.
    pub timeout: Duration,
    send: Option<Arc<[u8]>>,
    expect: Option<Arc<[u8]>>,
    proxy_protocol: Option<ProxyProtocol>,
}

impl ProbeSpec {
    pub fn for_app(flags: HealthConfig, app: &App) -> ProbeSpec {
        let check = app.health.clone().unwrap_or_default();
        let interval = check.interval.unwrap_or(flags.interval);
        ProbeSpec {
            interval,
            rise: check.rise.unwrap_or(flags.rise),
            fall: check.fall.unwrap_or(flags.fall),
            // A probe slower than the interval would delay the next one.
            // Validation checks Timeout against an Interval written beside
            // it; one written alone meets the flag's interval only here.
            timeout: check.timeout.unwrap_or(flags.timeout).min(interval),
            send: check.send.map(Into::into),
            expect: check.expect.map(Into::into),
            proxy_protocol: app.proxy_protocol,
        }
    }

    /// What a probe checks, for log lines.
    pub fn kind(&self) -> &'static str {
        match (&self.send, &self.expect) {
            (_, Some(_)) => "expect",
            (Some(_), None) => "send",
            (None, None) => "connect",
        }
    }
}

/// Why a probe did not pass.
#[derive(Debug)]
pub enum ProbeFailure {
    /// The target refused, timed out, or answered wrongly: evidence
    /// against it.
    Target(anyhow::Error),
    /// This process could not make the probe (out of fds or memory): no
    /// evidence about the target, which must not be marked down for it,
    /// as the client path does not blame a target for our shortage.
    Ours(anyhow::Error),
}

/// One probe of `target`, bounded by `spec.timeout` as a whole.
pub async fn probe(
    target: &Target,
    spec: &ProbeSpec,
    guard: &LoopGuard,
) -> Result<(), ProbeFailure> {
    let end = Instant::now() + spec.timeout;
    let (mut stream, _) =
        dial(target, spec.timeout, guard)
            .await
            .map_err(|e| match e.is_local() {
                true => ProbeFailure::Ours(e.err),
                false => ProbeFailure::Target(e.err),
            })?;
    if spec.send.is_none() && spec.expect.is_none() && spec.proxy_protocol.is_none() {
        return Ok(());
    }
    tokio::time::timeout_at(end, converse(&mut stream, spec))
        .await
        .map_err(|_| match &spec.expect {
            Some(e) => anyhow!(
                "{target} did not answer {:?} within {:?}",
                String::from_utf8_lossy(e),
                spec.timeout
            ),
            None => anyhow!("{target}: sending the probe took over {:?}", spec.timeout),
        })
        .and_then(|r| r)
        .map_err(ProbeFailure::Target)
}

async fn converse(stream: &mut TcpStream, spec: &ProbeSpec) -> anyhow::Result<()> {
    let mut out = Vec::new();
    if let Some(v) = spec.proxy_protocol {
        out.extend(proxy_protocol::local_header(v));
    }
    if let Some(send) = &spec.send {
        out.extend_from_slice(send);
    }
    stream.write_all(&out).await?;
    let Some(expect) = &spec.expect else {
        return Ok(());
    };
    // The reply may arrive in pieces; a target that talks on without ever
    // saying it fails once this much arrived.
    let limit = crate::config::MAX_PROBE_BYTES * 4;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!(
                "closed after {} bytes without {:?}",
                got.len(),
                String::from_utf8_lossy(expect)
            );
        }
        got.extend_from_slice(&buf[..n]);
        if got.windows(expect.len()).any(|w| w == &expect[..]) {
            return Ok(());
        }
        if got.len() > limit {
            bail!(
                "no {:?} in the first {} bytes",
                String::from_utf8_lossy(expect),
                got.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Balance, HealthCheck};

    /// An app's `Timeout` written without an `Interval` may not outlast
    /// the flags' interval: a 30 s probe every 2 s took 90 s, not 6, to
    /// mark a silent target down with fall 3.
    #[test]
    fn a_probe_never_outlasts_its_interval() {
        let flags = HealthConfig {
            interval: Duration::from_secs(2),
            rise: 2,
            fall: 3,
            timeout: Duration::from_secs(2),
        };
        let app = |health| App {
            name: "a".into(),
            ports: vec![1],
            targets: Vec::new(),
            balance: Balance::default(),
            proxy_protocol: None,
            health,
            accept_proxy: None,
            max_per_client: None,
        };
        let cases = [
            (None, None, Duration::from_secs(2)),
            (None, Some(30), Duration::from_secs(2)),
            (None, Some(1), Duration::from_secs(1)),
            (Some(10), None, Duration::from_secs(2)),
            (Some(10), Some(8), Duration::from_secs(8)),
        ];
        for (interval, timeout, want) in cases {
            let check = HealthCheck {
                interval: interval.map(Duration::from_secs),
                timeout: timeout.map(Duration::from_secs),
                ..HealthCheck::default()
            };
            let spec = ProbeSpec::for_app(flags, &app(Some(check)));
            assert_eq!(
                spec.timeout, want,
                "Interval {interval:?} Timeout {timeout:?}"
            );
        }
    }
}

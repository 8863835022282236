//! Reading the prefix at one revision and following it: a consistent read
//! gives revision R, the watch starts at R+1, so no change falls between.
//! When the stream breaks (etcd down, compaction, partition) the task backs
//! off and starts over with a fresh read, which is how it resyncs: the
//! read's revision is the truth, whatever was missed.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;

use super::table::{self, Table};
use super::{EtcdMetrics, EtcdSettings};

/// The table at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: i64,
    /// Err: the keys do not form a table (a key's value is not an app);
    /// rejected like a config that fails validation.
    pub table: Result<Table, String>,
}

/// First back-off after a failure; doubled up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Kept short: after etcd comes back every proxy resyncs within this (plus
/// jitter, which spreads a fleet's reconnects).
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A read that takes longer means etcd is not answering.
const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest gRPC message taken from etcd: the whole table in one read, or
/// one revision's events in the watch. tonic's default of 4 MiB made a
/// table past it unreadable for good (reported as "etcd unreachable");
/// this is four times the largest config file the file source takes, for
/// the keys and the framing around the values.
const MAX_MESSAGE: usize = 4 * crate::config::file::MAX_BYTES as usize;

async fn connect(s: &EtcdSettings) -> anyhow::Result<Client> {
    // HTTP/2 pings notice a dead etcd on an idle watch within ~9 s even
    // when no RST arrives (a partition, a frozen host). Not more often:
    // etcd refuses pings closer than --grpc-keepalive-min-time (5 s by
    // default) and closes the connection, every 4 s with 1 s pings.
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_keep_alive(Duration::from_secs(6), Duration::from_secs(3))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    Client::connect(&s.endpoints, Some(opts))
        .await
        .with_context(|| format!("cannot connect to {}", s.describe()))
}

/// Every key under the prefix and the revision they were read at.
async fn read(
    client: &mut Client,
    s: &EtcdSettings,
) -> anyhow::Result<(BTreeMap<String, Vec<u8>>, i64)> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
    let get = kv.get(s.prefix.as_str(), Some(GetOptions::new().with_prefix()));
    let resp = tokio::time::timeout(READ_TIMEOUT, get)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {READ_TIMEOUT:?}"))?
        .with_context(|| format!("cannot read {}", s.describe()))?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let kvs = resp
        .kvs()
        .iter()
        .filter_map(|kv| Some((kv.key_str().ok()?.to_string(), kv.value().to_vec())))
        .collect();
    Ok((kvs, revision))
}

fn snapshot(s: &EtcdSettings, kvs: &BTreeMap<String, Vec<u8>>, revision: i64) -> Snapshot {
    Snapshot {
        revision,
        table: table::assemble(&s.prefix, kvs),
    }
}

/// The table as etcd has it now, within `start_timeout`.
pub async fn first(s: &EtcdSettings) -> anyhow::Result<Snapshot> {
    let reading = async {
        let mut client = connect(s).await?;
        let (kvs, revision) = read(&mut client, s).await?;
        Ok::<_, anyhow::Error>(snapshot(s, &kvs, revision))
    };
    tokio::time::timeout(s.start_timeout, reading)
        .await
        .map_err(|_| anyhow::anyhow!("{}: no answer within {:?}", s.describe(), s.start_timeout))?
}

/// Follows the prefix until the receiver is dropped; the receiver always
/// holds the newest table (None until the first read).
pub fn spawn(s: EtcdSettings, metrics: EtcdMetrics) -> watch::Receiver<Option<Snapshot>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut backoff = MIN_BACKOFF;
        let mut failures = 0u32;
        loop {
            let err = follow(&s, &tx, &metrics, &mut failures).await;
            if tx.is_closed() {
                return;
            }
            if metrics.connected.get() == 1 {
                metrics.disconnects.inc();
            }
            metrics.connected.set(0);
            if failures == 0 {
                // A streak of failures is reported once; its end is reported too.
                tracing::warn!(source = %s.describe(), error = %format!("{err:#}"), "etcd unreachable or watch lost; still serving the last good config, reconnecting with back-off");
                backoff = MIN_BACKOFF;
            } else {
                tracing::debug!(error = %format!("{err:#}"), attempt = failures, "etcd still unreachable");
            }
            failures += 1;
            let jitter = 0.8 + 0.4 * fastrand::f64();
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    });
    rx
}

/// One connection: read, then watch until it breaks. Always returns why.
async fn follow(
    s: &EtcdSettings,
    tx: &watch::Sender<Option<Snapshot>>,
    metrics: &EtcdMetrics,
    failures: &mut u32,
) -> anyhow::Error {
    match follow_once(s, tx, metrics, failures).await {
        Ok(()) => anyhow::anyhow!("watch stream ended"),
        Err(e) => e,
    }
}

async fn follow_once(
    s: &EtcdSettings,
    tx: &watch::Sender<Option<Snapshot>>,
    metrics: &EtcdMetrics,
    failures: &mut u32,
) -> anyhow::Result<()> {
    let mut client = connect(s).await?;
    let (mut kvs, mut revision) = read(&mut client, s).await?;
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut watcher = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
    let mut stream =
        tokio::time::timeout(READ_TIMEOUT, watcher.watch(s.prefix.as_str(), Some(opts)))
            .await
            .map_err(|_| anyhow::anyhow!("watch not created within {READ_TIMEOUT:?}"))?
            .context("cannot watch")?;
    metrics.connected.set(1);
    if *failures > 0 {
        tracing::info!(source = %s.describe(), revision, after_attempts = *failures, "etcd reachable again; resynced by a fresh read");
    }
    *failures = 0;
    let _ = tx.send(Some(snapshot(s, &kvs, revision)));
    while let Some(resp) = stream.message().await.context("watch stream broke")? {
        if resp.canceled() {
            bail!(
                "watch canceled by etcd ({}; compacted at revision {})",
                resp.cancel_reason(),
                resp.compact_revision()
            );
        }
        if resp.events().is_empty() {
            continue;
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let Ok(key) = kv.key_str() else { continue };
            match ev.event_type() {
                EventType::Put => kvs.insert(key.to_string(), kv.value().to_vec()),
                EventType::Delete => kvs.remove(key),
            };
            revision = revision.max(kv.mod_revision());
        }
        // Every event of one response (one transaction) applies at once.
        if let Some(h) = resp.header() {
            revision = revision.max(h.revision());
        }
        if tx.send(Some(snapshot(s, &kvs, revision))).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

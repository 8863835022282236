//! Where the config comes from: the file (the default), or etcd with a
//! local cache of the last good table. Both end in the same
//! validate-then-diff reload (`state::reload_text`).

use std::sync::Arc;

use anyhow::Context;
use serde_json::json;
use tokio::sync::watch;

use super::settings::Settings;
use super::state::{self, Outcome, State, Trigger};
use crate::config::etcd::{self, cache, EtcdMetrics, EtcdSettings, Snapshot};
use crate::config::{watch as config_watch, Config, Listen};
use crate::edge::Shared;
use crate::ops::admin::AdminState;

/// Longest the cache file's write (and fsync) may hold the control task.
const CACHE_WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The config to start with, validated.
pub(super) struct Initial {
    pub text: String,
    pub config: Config,
    pub listen: Listen,
    /// The file's stamp before it was read (file source only).
    pub stamp: Option<config_watch::Stamp>,
    /// Etcd source: the revision started from, and whether from the cache.
    pub etcd: Option<(i64, bool)>,
}

/// Reads and validates the config at start. With etcd: etcd first; if it
/// does not answer in time or its table is rejected, the cache file.
pub(super) async fn initial(settings: &Settings) -> anyhow::Result<Initial> {
    let Some(es) = &settings.etcd else {
        // Stamp before reading: a change in between is seen as a change.
        let stamp = config_watch::stamp(&settings.config);
        let text = crate::config::file::read(&settings.config).await?;
        let source = settings.config.display().to_string();
        let (config, listen) = settings.parse_config(&text, &source)?;
        return Ok(Initial {
            text,
            config,
            listen,
            stamp,
            etcd: None,
        });
    };
    let from_etcd = async {
        let snap = etcd::first(es).await?;
        let table = snap.table.map_err(anyhow::Error::msg)?;
        let source = format!("etcd {} revision {}", es.prefix, snap.revision);
        let (config, listen) = settings
            .parse_config(&table.text, &source)
            .map_err(|e| anyhow::anyhow!(etcd::table::name_keys(&format!("{e:#}"), &table.keys)))?;
        Ok::<_, anyhow::Error>(Initial {
            text: table.text,
            config,
            listen,
            stamp: None,
            etcd: Some((snap.revision, false)),
        })
    };
    let etcd_err = match from_etcd.await {
        Ok(initial) => {
            tracing::info!(source = %es.describe(), revision = initial.etcd.map_or(0, |e| e.0), "config read from etcd");
            return Ok(initial);
        }
        Err(e) => e,
    };
    let Some(path) = &es.cache else {
        return Err(etcd_err
            .context("no config from etcd at start, and no --config-etcd-cache to fall back on"));
    };
    let cached = cache::read(path).await.with_context(|| {
        format!("no config from etcd at start ({etcd_err:#}), and the cache cannot be used")
    })?;
    // A cache of another fleet's table must not be served as this one's.
    anyhow::ensure!(
        cached.prefix == es.prefix,
        "no config from etcd at start ({etcd_err:#}), and the cache {} holds prefix {} where --config-etcd-prefix is {}; point --config-etcd-cache at this prefix's cache",
        path.display(),
        cached.prefix,
        es.prefix
    );
    let source = format!(
        "config cache {} (etcd revision {})",
        path.display(),
        cached.revision
    );
    let (config, listen) = settings.parse_config(&cached.text, &source)?;
    tracing::warn!(
        source = %es.describe(),
        error = %format!("{etcd_err:#}"),
        cache = %path.display(),
        revision = cached.revision,
        "no config from etcd at start; serving the last good config from the cache file until etcd answers"
    );
    Ok(Initial {
        text: cached.text,
        config,
        listen,
        stamp: None,
        etcd: Some((cached.revision, true)),
    })
}

/// The etcd source of a running server.
pub(super) struct EtcdSource {
    settings: EtcdSettings,
    metrics: EtcdMetrics,
    pub(super) updates: watch::Receiver<Option<Snapshot>>,
    /// The text in force, and its revision.
    applied: (String, i64),
    /// Apps last reported as left out for having no target.
    empty: Vec<String>,
    /// Leased targets last reported as left out.
    skipped: Vec<String>,
    published: Arc<AdminState>,
}

impl EtcdSource {
    /// Starts the watch; `text` at `revision` is in force (`from_cache`:
    /// read from the cache file).
    pub(super) fn start(
        settings: EtcdSettings,
        metrics: EtcdMetrics,
        text: String,
        (revision, from_cache): (i64, bool),
        published: Arc<AdminState>,
    ) -> EtcdSource {
        let updates = etcd::spawn(settings.clone(), metrics.clone());
        let src = EtcdSource {
            settings,
            metrics,
            updates,
            applied: (text, revision),
            empty: Vec::new(),
            skipped: Vec::new(),
            published,
        };
        src.report(from_cache);
        src
    }

    /// The text in force: SIGHUP re-validates it (addresses may change).
    pub(super) fn current(&self) -> String {
        self.applied.0.clone()
    }

    fn report(&self, from_cache: bool) {
        let revision = self.applied.1;
        self.metrics.revision.set(revision);
        self.metrics.from_cache.set(i64::from(from_cache));
        self.published.publish_source(json!({
            "etcd": self.settings.endpoints,
            "prefix": self.settings.prefix,
            "revision": revision,
            "from_cache": from_cache,
        }));
    }

    /// Whether the newest table differs from the one in force: it was
    /// rejected, or could not be bound (SIGHUP and retries try it again).
    pub(super) fn newest_pending(&self) -> bool {
        match &*self.updates.borrow() {
            Some(Snapshot { table: Ok(t), .. }) => t.text != self.applied.0,
            _ => false,
        }
    }

    /// Applies the newest snapshot through the shared reload path.
    /// `trigger`: the etcd watch, or a retry after a failed bind.
    pub(super) async fn apply_newest(
        &mut self,
        state: &mut State,
        settings: &Settings,
        shared: &Arc<Shared>,
        trigger: Trigger,
    ) -> Outcome {
        let Some(snap) = self.updates.borrow_and_update().clone() else {
            return Outcome::Unchanged;
        };
        let keys = match &snap.table {
            Ok(t) => {
                if t.empty != self.empty {
                    if !t.empty.is_empty() {
                        tracing::warn!(apps = ?t.empty, "apps in etcd with no target (none written, no lease alive) are not served until one registers");
                    }
                    self.empty = t.empty.clone();
                }
                if t.skipped != self.skipped {
                    for why in t.skipped.iter().filter(|w| !self.skipped.contains(w)) {
                        tracing::warn!(error = %why, "etcd: a leased target is left out; every other change still applies");
                    }
                    self.skipped = t.skipped.clone();
                }
                if t.text == self.applied.0 {
                    // Same table at a newer revision (or after a resync):
                    // what is served is that revision.
                    if snap.revision != self.applied.1 || self.metrics.from_cache.get() == 1 {
                        self.applied.1 = snap.revision;
                        self.report(false);
                        tracing::debug!(
                            revision = snap.revision,
                            "etcd revision in force (config unchanged)"
                        );
                    }
                    return Outcome::Unchanged;
                }
                t.keys.clone()
            }
            Err(_) => Vec::new(),
        };
        let text = snap
            .table
            .clone()
            .map(|t| t.text)
            .map_err(anyhow::Error::msg);
        let source = format!("etcd {} revision {}", self.settings.prefix, snap.revision);
        let outcome = state::reload_text(state, settings, shared, trigger, text, &source, &keys);
        if outcome != Outcome::Applied {
            return outcome;
        }
        let Ok(table) = snap.table else {
            return outcome;
        };
        self.applied = (table.text, snap.revision);
        self.report(false);
        tracing::info!(revision = snap.revision, "serving etcd revision");
        if let Some(path) = &self.settings.cache {
            let cached = cache::Cached {
                revision: snap.revision,
                prefix: self.settings.prefix.clone(),
                text: self.applied.0.clone(),
            };
            // Bounded: this runs on the control task, and a stalled disk
            // must not hold up reloads, upgrades and the drain behind it.
            let written = tokio::time::timeout(CACHE_WRITE_WAIT, cache::write(path, &cached));
            let failed = match written.await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(_) => Some(format!(
                    "not written within {CACHE_WRITE_WAIT:?} (a stalled disk?)"
                )),
            };
            if let Some(error) = failed {
                tracing::warn!(error = %error, "cannot write the config cache; a restart while etcd is down would not find this config");
            }
        }
        outcome
    }
}

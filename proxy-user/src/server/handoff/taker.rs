//! The new process's side of a handoff (`--takeover PATH`).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::{TcpListener, TcpStream};

use super::wire::Link;
use super::Msg;
use crate::edge::conn;
use crate::edge::handover::Moving;
use crate::edge::{AppRuntime, Shared};

/// How long the giver may take to stop accepting after `Ready`: it only
/// closes its copies of the sockets, so seconds mean it is stuck; then we
/// serve beside it (both accepting is harmless).
const STOPPED_WAIT: Duration = Duration::from_secs(10);

/// Tests only: the taker dies right after adopting the fastpath maps, before
/// it takes a connection (the worst moment for the giver: its ring readers
/// stopped, its pairs stopped).
const DIE_AFTER_MAPS: &str = "PROXY_TEST_DIE_AFTER_MAPS";

/// Tests only: the taker waits this many milliseconds before it answers a
/// batch with `Took`, as a taker whose blocking threads are all busy would.
const TOOK_DELAY: &str = "PROXY_TEST_TOOK_DELAY_MS";

/// How long the giver's verdict on a `Took` may take: it answers at once,
/// or after giving up on a late one (its own wait is 5 s).
const VERDICT_WAIT: Duration = Duration::from_secs(15);

/// What the giver handed over, before this process is ready.
pub struct Takeover {
    link: Arc<Link>,
    /// The giver answers each `Took` (`Confirmed` or `Withdrawn`).
    confirms: bool,
    /// Listening sockets by port, as the giver had them.
    pub ports: HashMap<u16, TcpListener>,
    /// The sk_lookup socket (`--steering sk_lookup`).
    pub steer: Option<TcpListener>,
    /// The admin listener (`--admin-address`).
    pub admin: Option<TcpListener>,
}

fn listener(fd: OwnedFd) -> anyhow::Result<TcpListener> {
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)?;
    let l = TcpListener::from_std(l)?;
    l.local_addr()
        .context("a handed-over socket is not a TCP socket")?;
    crate::edge::listener::nodelay(&l)?;
    Ok(l)
}

impl Takeover {
    /// Connects to the running proxy at `path` and receives its listening
    /// sockets. Nothing changes for the giver until `commit`.
    pub async fn connect(path: &Path) -> anyhow::Result<Takeover> {
        let path = path.to_path_buf();
        let what = format!("--takeover {}", path.display());
        let (link, got, confirms) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let link = Link::connect(&path)?;
            link.set_timeout(Some(Duration::from_secs(10)))?;
            link.send(
                &Msg::Hello {
                    pid: crate::ops::pid(),
                },
                &[],
            )?;
            let mut got = Vec::new();
            loop {
                let (msg, fds) = link.expect("sending its listeners")?;
                let Msg::Listeners {
                    ports,
                    steer,
                    admin,
                    last,
                    confirms,
                } = msg
                else {
                    bail!("expected listeners, got {msg:?}");
                };
                if fds.len() != ports.len() + usize::from(steer) + usize::from(admin) {
                    bail!("{} ports but {} fds", ports.len(), fds.len());
                }
                got.push((ports, steer, admin, fds));
                if last {
                    return Ok((link, got, confirms));
                }
            }
        })
        .await
        .context("handoff task failed")?
        .with_context(|| what.clone())?;
        let mut t = Takeover {
            confirms,
            link: Arc::new(link),
            ports: HashMap::new(),
            steer: None,
            admin: None,
        };
        for (ports, steer, admin, fds) in got {
            let mut fds = fds.into_iter();
            for (port, fd) in ports.into_iter().zip(fds.by_ref()) {
                t.ports
                    .insert(port, listener(fd).with_context(|| what.clone())?);
            }
            if steer {
                if let Some(fd) = fds.next() {
                    t.steer = Some(listener(fd).with_context(|| what.clone())?);
                }
            }
            if admin {
                if let Some(fd) = fds.next() {
                    t.admin = Some(listener(fd).with_context(|| what.clone())?);
                }
            }
        }
        tracing::info!(
            ports = t.ports.len(),
            steer = t.steer.is_some(),
            "handoff: received the listening sockets"
        );
        Ok(t)
    }

    /// Everything fallible is done: tells the giver we are ready and waits
    /// until it stopped accepting. From here this process serves whatever
    /// happens to the giver (gone, or stuck: we serve beside it).
    /// `takes_fastpath`: moved fastpath pairs can resume here.
    pub async fn commit(self, takes_fastpath: bool) -> Taken {
        let link = self.link;
        let l = link.clone();
        let stopped = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            l.send(
                &Msg::Ready {
                    // Every plane takes moved connections: a userspace one
                    // stopped at a safe point (`Parking`), a fastpath pair
                    // with its map set (`fastpath::moving`). Still said: an
                    // older giver reads it.
                    takes_conns: true,
                    takes_fastpath,
                    awaits_confirm: true,
                },
                &[],
            )?;
            l.set_timeout(Some(STOPPED_WAIT))?;
            match l.expect("confirming it stopped accepting")?.0 {
                Msg::Stopped => Ok(()),
                other => bail!("expected stopped, got {other:?}"),
            }
        })
        .await;
        match stopped {
            Ok(Ok(())) => tracing::info!("handoff: the old process stopped accepting"),
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "handoff: the old process did not confirm it stopped; serving anyway")
            }
            Err(e) => tracing::warn!(error = %e, "handoff task failed; serving anyway"),
        }
        Taken {
            link,
            confirms: self.confirms,
        }
    }
}

/// After `commit`: the established connections still to come.
pub struct Taken {
    link: Arc<Link>,
    confirms: bool,
}

impl Taken {
    /// Resumes every connection the giver sends until its `Done`.
    pub async fn receive_conns(self, shared: Arc<Shared>, apps: HashMap<String, Arc<AppRuntime>>) {
        let mut moved = 0usize;
        loop {
            let l = self.link.clone();
            let next = tokio::task::spawn_blocking(move || {
                // Quiescing takes at most PARK_WAIT; a batch comes well within.
                l.set_timeout(Some(Duration::from_secs(30)))?;
                l.recv::<Msg>()
            })
            .await;
            let (msg, fds) = match next {
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), "handoff: reading moved connections failed");
                    break;
                }
                Err(_) => break,
            };
            let conns = match msg {
                Msg::Conns { conns } => conns,
                Msg::Maps { sets } => {
                    let adopted = shared.plane.adopt_map_sets(&sets, fds);
                    tracing::info!(
                        sets = sets.len(),
                        adopted = adopted.len(),
                        "handoff: adopted the old process's fastpath maps"
                    );
                    let l = self.link.clone();
                    let sent = tokio::task::spawn_blocking(move || {
                        l.send(&Msg::Adopted { sets: adopted }, &[])
                    })
                    .await;
                    if !matches!(sent, Ok(Ok(()))) {
                        tracing::warn!("handoff: the old process went away after sending its maps");
                        break;
                    }
                    if std::env::var_os(DIE_AFTER_MAPS).is_some() {
                        tracing::warn!("{DIE_AFTER_MAPS}: dying mid-handoff, as asked");
                        std::process::exit(3);
                    }
                    continue;
                }
                Msg::Done { moved } => {
                    tracing::info!(moved, "handoff: complete");
                    break;
                }
                other => {
                    tracing::warn!(msg = ?other, "handoff: unexpected message");
                    break;
                }
            };
            let mut resumed = Vec::new();
            let mut took = Vec::new();
            let mut at = Vec::new();
            let mut fds = fds.into_iter();
            for (i, meta) in conns.into_iter().enumerate() {
                let (Some(c), Some(u)) = (fds.next(), fds.next()) else {
                    break;
                };
                let Some(app) = apps.get(&meta.app) else {
                    tracing::info!(conn = meta.id, app = %meta.app, "handoff: a connection of an app not in this config; the old process keeps it");
                    continue;
                };
                // A fastpath pair needs its map set here.
                let hold = match &meta.fastpath {
                    Some(ledger) => match shared.plane.hold(ledger) {
                        Some(hold) => Some(hold),
                        None => {
                            tracing::warn!(conn = meta.id, set = ledger.set, "handoff: a fastpath pair whose map set was not adopted here; the old process keeps it");
                            continue;
                        }
                    },
                    None => None,
                };
                match (stream(c), stream(u)) {
                    (Ok(client), Ok(upstream)) => {
                        took.push(meta.id);
                        at.push(i as u32);
                        resumed.push(Moving {
                            meta,
                            app: app.clone(),
                            client,
                            upstream,
                            hold,
                        });
                    }
                    (c, u) => {
                        let e = c.err().or(u.err()).map(|e| e.to_string());
                        tracing::warn!(conn = meta.id, error = ?e, "handoff: cannot adopt a moved connection; the old process keeps it");
                    }
                }
            }
            if let Some(ms) = std::env::var(TOOK_DELAY).ok().and_then(|v| v.parse().ok()) {
                tracing::warn!("{TOOK_DELAY}: answering the batch after {ms} ms, as asked");
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let l = self.link.clone();
            let n = took.len();
            let confirms = self.confirms;
            let acked = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Msg>> {
                l.send(
                    &Msg::Took {
                        ids: took,
                        at: Some(at),
                    },
                    &[],
                )?;
                if !confirms {
                    return Ok(None);
                }
                l.set_timeout(Some(VERDICT_WAIT))?;
                Ok(l.recv::<Msg>()?.map(|(m, _)| m))
            })
            .await;
            let resume = match acked {
                Ok(Ok(None)) if !confirms => true,
                Ok(Ok(Some(Msg::Confirmed))) => true,
                Ok(Ok(Some(Msg::Withdrawn))) => {
                    tracing::warn!(
                        conns = n,
                        "handoff: the old process gave up waiting for our answer and keeps its last batch"
                    );
                    false
                }
                other => {
                    // It may carry them on: two processes would pump one
                    // stream. Leave them to it.
                    let got = match other {
                        Ok(Ok(m)) => format!("{m:?}"),
                        Ok(Err(e)) => format!("{e:#}"),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(
                        got,
                        "handoff: the old process did not confirm its last batch; not resuming it"
                    );
                    false
                }
            };
            if !resume {
                // Our copies close with `resumed`; the giver's keep the
                // sockets open.
                break;
            }
            moved += n;
            for m in resumed {
                conn::resume(&shared, m);
            }
        }
        shared.plane.settle();
        tracing::info!(moved, "handoff: resumed connections from the old process");
    }
}

fn stream(fd: OwnedFd) -> std::io::Result<TcpStream> {
    let s = std::net::TcpStream::from(fd);
    s.set_nonblocking(true)?;
    TcpStream::from_std(s)
}

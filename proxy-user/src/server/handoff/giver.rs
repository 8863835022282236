//! The running proxy's side of a handoff.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::wire::{Link, MAX_FDS};
use super::Msg;
use crate::dataplane::{GivenSets, FDS_PER_SET};
use crate::edge::conn;
use crate::edge::handover::{Moving, PARK_WAIT};
use crate::edge::Shared;

/// How long a successor may take from connecting to `Ready` (reading its
/// config, loading BPF, probing its ports). Past it the giver gives up on
/// it and serves on.
const READY_WAIT: Duration = Duration::from_secs(30);
/// Per message once the successor is ready.
const STEP_WAIT: Duration = Duration::from_secs(5);
/// Connections per `Conns` message.
const BATCH: usize = MAX_FDS / 2;

/// A successor that said `Ready`: from here on the giver stops serving.
pub struct Given {
    link: Arc<Link>,
    pub pid: u32,
    takes_conns: bool,
    takes_fastpath: bool,
    /// The successor waits for `Confirmed` or `Withdrawn` after each `Took`.
    confirm: bool,
}

async fn blocking<T: Send + 'static>(
    link: &Arc<Link>,
    f: impl FnOnce(&Link) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let link = link.clone();
    tokio::task::spawn_blocking(move || f(&link))
        .await
        .context("handoff task failed")?
}

/// Sends every listening socket (`listeners`: port and fd; `steer`: the
/// sk_lookup socket; `admin`: the admin listener) and waits for the successor's `Ready`. The fds stay
/// open and served here throughout: an error leaves this process as it
/// was. The caller keeps them open until this returns.
pub async fn give(
    link: Link,
    listeners: Vec<(u16, RawFd)>,
    steer: Option<RawFd>,
    admin: Option<RawFd>,
) -> anyhow::Result<Given> {
    let link = Arc::new(link);
    blocking(&link, move |l| {
        l.set_timeout(Some(STEP_WAIT))?;
        let pid = match l.expect("saying hello")?.0 {
            Msg::Hello { pid } => pid,
            other => bail!("expected hello, got {other:?}"),
        };
        tracing::info!(
            successor = pid,
            ports = listeners.len(),
            steer = steer.is_some(),
            "handoff: successor connected; sending listening sockets"
        );
        let chunks: Vec<&[(u16, RawFd)]> = if listeners.is_empty() {
            vec![&[]]
        } else {
            listeners.chunks(MAX_FDS - 1).collect()
        };
        let n = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            let last = i + 1 == n;
            let mut fds: Vec<RawFd> = chunk.iter().map(|(_, fd)| *fd).collect();
            let steer_here = steer.filter(|_| last);
            let admin_here = admin.filter(|_| last);
            fds.extend(steer_here);
            fds.extend(admin_here);
            l.send(
                &Msg::Listeners {
                    ports: chunk.iter().map(|(p, _)| *p).collect(),
                    steer: steer_here.is_some(),
                    admin: admin_here.is_some(),
                    last,
                    confirms: true,
                },
                &fds,
            )?;
        }
        l.set_timeout(Some(READY_WAIT))?;
        match l.expect("getting ready")?.0 {
            Msg::Ready {
                takes_conns,
                takes_fastpath,
                awaits_confirm,
            } => Ok((pid, takes_conns, takes_fastpath, awaits_confirm)),
            other => bail!("expected ready, got {other:?}"),
        }
    })
    .await
    .map(|(pid, takes_conns, takes_fastpath, confirm)| Given {
        link,
        pid,
        takes_conns,
        takes_fastpath,
        confirm,
    })
}

impl Given {
    /// After this process stopped accepting: says so, moves the
    /// established connections (fastpath pairs after their map sets) that
    /// reach a safe point within `PARK_WAIT`, and ends the exchange. Whatever does not move (or
    /// comes back) carries on here and drains.
    pub async fn finish(self, shared: &Arc<Shared>) {
        let link = self.link;
        if let Err(e) = blocking(&link, |l| l.send(&Msg::Stopped, &[])).await {
            tracing::warn!(error = %format!("{e:#}"), "handoff: successor gone after ready; draining here");
            return;
        }
        let mut moved = 0u64;
        if self.takes_conns {
            // The maps first: a fastpath pair's entries stay in them.
            let given = match self.takes_fastpath {
                true => give_map_sets(&link, shared).await,
                false => None,
            };
            let mut parked = shared.handover.start();
            let deadline = Instant::now() + PARK_WAIT;
            let mut ok = true;
            while ok && Instant::now() < deadline {
                let batch = next_batch(&mut parked, deadline).await;
                if batch.is_empty() {
                    if shared.tracker.live() == 0 {
                        break;
                    }
                    continue;
                }
                let (n, sent) = send_conns(&link, batch, shared, self.confirm).await;
                moved += n;
                ok = sent;
            }
            shared.handover.stop();
            // Parked before the stop, not sent yet.
            let mut rest = Vec::new();
            while let Ok(m) = parked.try_recv() {
                rest.push(m);
            }
            for chunk in chunked(rest) {
                if ok {
                    let (n, sent) = send_conns(&link, chunk, shared, self.confirm).await;
                    moved += n;
                    ok = sent;
                } else {
                    carry_on(chunk, shared, conn::resume);
                }
            }
            if !ok {
                // The successor is gone (or stuck): its readers of the
                // rings with it. The pairs that stayed need them here.
                if let Some(sets) = &given {
                    sets.restart(&[]);
                }
            }
        }
        let _ = blocking(&link, move |l| l.send(&Msg::Done { moved }, &[])).await;
        tracing::info!(
            successor = self.pid,
            moved,
            draining = shared.tracker.live(),
            "handoff: done; the connections that did not move drain here"
        );
    }
}

/// Sends every fastpath map set this process holds, its ring reader
/// stopped first (one reader at a time); reads again those the successor
/// did not adopt. None: no fastpath here, or the successor is gone.
async fn give_map_sets(link: &Arc<Link>, shared: &Arc<Shared>) -> Option<GivenSets> {
    let sets = shared.plane.give_map_sets().await?;
    let (ids, fds) = (sets.ids(), sets.fds());
    let per_msg = MAX_FDS / FDS_PER_SET;
    let sent = blocking(link, move |l| {
        l.set_timeout(Some(STEP_WAIT))?;
        let mut adopted = Vec::new();
        for (ids, fds) in ids.chunks(per_msg).zip(fds.chunks(per_msg * FDS_PER_SET)) {
            l.send(&Msg::Maps { sets: ids.to_vec() }, fds)?;
            match l.expect("adopting map sets")?.0 {
                Msg::Adopted { sets } => adopted.extend(sets),
                other => bail!("expected adopted, got {other:?}"),
            }
        }
        Ok(adopted)
    })
    .await;
    match sent {
        Ok(adopted) => {
            tracing::info!(
                sets = sets.len(),
                adopted = adopted.len(),
                "handoff: fastpath map sets sent"
            );
            sets.restart(&adopted);
            Some(sets)
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "handoff: successor did not adopt the fastpath maps; their pairs stay here");
            sets.restart(&[]);
            None
        }
    }
}

/// Up to `BATCH` parked connections: waits for the first (until
/// `deadline`, or a short tick so the caller can see the drain finish),
/// then takes what else is there.
async fn next_batch(
    parked: &mut mpsc::UnboundedReceiver<Moving>,
    deadline: Instant,
) -> Vec<Moving> {
    let tick = (Instant::now() + Duration::from_millis(20)).min(deadline);
    let mut batch = Vec::new();
    if let Ok(Some(m)) = tokio::time::timeout_at(tick, parked.recv()).await {
        batch.push(m);
        while batch.len() < BATCH {
            match parked.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
    }
    batch
}

fn chunked(mut all: Vec<Moving>) -> Vec<Vec<Moving>> {
    let mut out = Vec::new();
    while !all.is_empty() {
        let rest = all.split_off(all.len().min(BATCH));
        out.push(std::mem::replace(&mut all, rest));
    }
    out
}

/// Sends one batch; the connections the successor did not take (or all,
/// on an error) carry on here. Returns how many moved and whether the
/// link still works. `confirm`: the successor resumes the batch only on
/// our `Confirmed`, and closes its copies on `Withdrawn`: a `Took` that
/// comes after we gave up waiting then moves nothing, where it would have
/// had both processes pump the same sockets.
async fn send_conns(
    link: &Arc<Link>,
    batch: Vec<Moving>,
    shared: &Arc<Shared>,
    confirm: bool,
) -> (u64, bool) {
    let metas: Vec<_> = batch.iter().map(|m| m.meta.clone()).collect();
    let fds: Vec<RawFd> = batch
        .iter()
        .flat_map(|m| [m.client.as_raw_fd(), m.upstream.as_raw_fd()])
        .collect();
    // The fds stay open here (in `batch`) until the successor said which
    // it took: one it did not, or a successor that died before saying,
    // leaves them ours, intact.
    let took = blocking(link, move |l| {
        l.set_timeout(Some(STEP_WAIT))?;
        l.send(&Msg::Conns { conns: metas }, &fds)?;
        let answer = match l.expect("taking connections") {
            Ok((Msg::Took { ids, at }, _)) => Ok((ids, at)),
            Ok((other, _)) => Err(anyhow::anyhow!("expected took, got {other:?}")),
            Err(e) => Err(e),
        };
        if confirm {
            // Said before our copies close: until it hears this the
            // successor resumes nothing.
            let verdict = match &answer {
                Ok(_) => Msg::Confirmed,
                Err(_) => Msg::Withdrawn,
            };
            let said = l.send(&verdict, &[]);
            if answer.is_ok() {
                said.context("confirming the connections taken")?;
            }
        }
        answer
    })
    .await;
    let mut taken = vec![false; batch.len()];
    let ok = match took {
        Ok((_, Some(at))) => {
            for i in at {
                if let Some(t) = taken.get_mut(i as usize) {
                    *t = true;
                }
            }
            true
        }
        // An older successor: by id.
        Ok((ids, None)) => {
            for (t, m) in taken.iter_mut().zip(&batch) {
                *t = ids.contains(&m.meta.id);
            }
            true
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "handoff: successor did not take connections; they carry on here");
            false
        }
    };
    let (taken, kept): (Vec<_>, Vec<_>) = batch.into_iter().zip(taken).partition(|(_, t)| *t);
    let n = taken.len() as u64;
    for (m, _) in &taken {
        let [bytes_in, bytes_out] = m.meta.counted();
        tracing::info!(
            conn = m.meta.id,
            app = %m.meta.app,
            client = %m.meta.client,
            bytes_in,
            bytes_out,
            pid = crate::ops::pid(),
            "connection handed over to the new process"
        );
    }
    // Closing our copies: the successor's keep the sockets open.
    drop(taken);
    let kept: Vec<Moving> = kept.into_iter().map(|(m, _)| m).collect();
    // Left by a successor that answered: offered again, they would only
    // park and come back until the handoff ends.
    let resume = if ok { conn::resume_here } else { conn::resume };
    carry_on(kept, shared, resume);
    (n, ok)
}

/// Connections that did not move carry on here, each through `resume`.
fn carry_on(kept: Vec<Moving>, shared: &Arc<Shared>, resume: fn(&Arc<Shared>, Moving)) {
    for m in kept {
        resume(shared, m);
    }
}

//! Host-name lookups for targets: at most one in flight per name.
//!
//! getaddrinfo blocks and cannot be cancelled. tokio runs it on its blocking
//! pool, and a caller that gives up (its connect budget ran out) leaves the
//! thread waiting for glibc's own timeout: 10 s with a default resolv.conf.
//! With a resolver that stopped answering, every connect and every health
//! probe to a name target used to hold a thread of its own, hundreds within
//! seconds, and the pool's other users (config reads, the upgrade handoff)
//! queued behind them. So a name has one lookup at a time, and whoever
//! needs it meanwhile waits for that one's answer. Nothing is cached past
//! it: targets move, and the next connect after an answer asks again.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use tokio::sync::watch;

/// What one lookup found (shared by everyone who waited for it).
type Answer = Result<Arc<[SocketAddr]>, Arc<io::Error>>;

/// A lookup under way: its answer, once there is one.
type Lookup = watch::Receiver<Option<Answer>>;

/// The lookups under way, by name and port. Process-wide, as the resolver
/// it stands in front of is.
static IN_FLIGHT: LazyLock<Mutex<HashMap<(String, u16), Lookup>>> = LazyLock::new(Default::default);

/// The addresses `host` has now. An address literal is its own answer,
/// with no lookup and no allocation beyond the one address.
pub async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, Arc<io::Error>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let mut answer = joined(host, port);
    let got = match answer.wait_for(Option::is_some).await {
        Ok(got) => got.clone(),
        Err(_) => None,
    };
    match got {
        Some(Ok(addrs)) => Ok(addrs.to_vec()),
        Some(Err(e)) => Err(e),
        // Its runtime shut down under it.
        None => Err(Arc::new(io::Error::other(
            "the lookup's task ended without an answer",
        ))),
    }
}

/// The lookup of `host` under way, started here if there is none.
fn joined(host: &str, port: u16) -> Lookup {
    let key = (host.to_owned(), port);
    let (tx, rx) = {
        let mut in_flight = IN_FLIGHT.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(rx) = in_flight.get(&key) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        in_flight.insert(key.clone(), rx.clone());
        (tx, rx)
    };
    // Removed however the task ends, even dropped unpolled with its
    // runtime (so made before it, and outside the lock its drop takes): an
    // entry left behind would answer that name with nothing, forever.
    let done = Done(key);
    // A task of its own, not the first caller's future: the lookup goes on
    // (and is answered to the others) when the caller that started it gives up.
    tokio::spawn(async move {
        let (host, port) = &done.0;
        let found = tokio::net::lookup_host((host.as_str(), *port)).await;
        let _ = tx.send(Some(found.map(Iterator::collect).map_err(Arc::new)));
    });
    rx
}

/// Takes a finished lookup out of `IN_FLIGHT`, so the next caller asks anew.
struct Done((String, u16));

impl Drop for Done {
    fn drop(&mut self) {
        IN_FLIGHT
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_literal_is_its_own_answer() {
        let got = resolve("::1", 80).await.unwrap();
        assert_eq!(got, vec!["[::1]:80".parse().unwrap()]);
        assert!(!IN_FLIGHT.lock().unwrap().contains_key(&("::1".into(), 80)));
    }

    /// A caller that comes while a lookup is under way waits for its
    /// answer, and starts none of its own. (The lookup under way is played
    /// by an entry the test answers: a real one can finish before the
    /// second caller comes.)
    #[tokio::test]
    async fn a_caller_waits_for_the_lookup_under_way() {
        let key = ("under.way.test".to_string(), 82);
        let (tx, rx) = watch::channel(None);
        IN_FLIGHT.lock().unwrap().insert(key.clone(), rx);
        let waiting = tokio::spawn(resolve("under.way.test", 82));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "answered before the lookup was");
        let addr: SocketAddr = "192.0.2.7:82".parse().unwrap();
        tx.send(Some(Ok(Arc::from([addr])))).unwrap();
        assert_eq!(waiting.await.unwrap().unwrap(), vec![addr]);
        IN_FLIGHT.lock().unwrap().remove(&key);
    }

    /// Once a lookup answered, its entry is gone: the next caller asks anew.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_finished_lookup_is_taken_out() {
        let got = resolve("localhost", 81).await.unwrap();
        assert!(!got.is_empty());
        for _ in 0..100 {
            if !IN_FLIGHT
                .lock()
                .unwrap()
                .contains_key(&("localhost".into(), 81))
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the finished lookup was not taken out");
    }
}

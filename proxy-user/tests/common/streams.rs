//! Traffic for tests that change the proxy under live connections:
//! long-lived sequence-checked streams and a new-connection load, both
//! through an echo backend.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Word `k` of stream `seed`: sequence-checked, so a lost, duplicated or
/// reordered byte shows at its offset, and a byte from another stream
/// shows too. The seed takes the high 32 bits and `k` the low 32 (32 GiB
/// per stream): every bit of both must reach the word, or two streams
/// would send the same bytes and a swap between them would pass.
pub fn word(seed: u64, k: u64) -> [u8; 8] {
    assert!(
        seed <= u32::MAX as u64 && k <= u32::MAX as u64,
        "seed {seed} or word {k} past 32 bits"
    );
    (seed << 32 | k).to_le_bytes()
}

/// A long-lived stream through an echo backend: writes `words` words
/// every `pace` until `stop`, then FIN; reads back concurrently and checks
/// every word. Returns the bytes sent (= received and checked).
pub async fn long_stream(
    addr: SocketAddr,
    seed: u64,
    words: u64,
    pace: Duration,
    stop: Arc<AtomicBool>,
) -> Result<u64, String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("stream {seed}: connect: {e}"))?;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut k = 0u64;
        let mut buf = Vec::with_capacity(1024);
        while !stop.load(Ordering::Relaxed) {
            buf.clear();
            for _ in 0..words {
                buf.extend_from_slice(&word(seed, k));
                k += 1;
            }
            w.write_all(&buf).await?;
            tokio::time::sleep(pace).await;
        }
        w.shutdown().await?;
        Ok::<u64, std::io::Error>(k * 8)
    });
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = r
            .read(&mut buf)
            .await
            .map_err(|e| format!("stream {seed}: read after {got} bytes: {e}"))?;
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        let whole = pending.len() / 8 * 8;
        for chunk in pending[..whole].chunks(8) {
            let k = got / 8;
            if chunk != word(seed, k) {
                return Err(format!("stream {seed}: word {k} out of sequence"));
            }
            got += 8;
        }
        pending.drain(..whole);
    }
    let sent = writer
        .await
        .map_err(|e| format!("stream {seed}: writer: {e}"))?
        .map_err(|e| format!("stream {seed}: write: {e}"))?;
    if !pending.is_empty() || got != sent {
        return Err(format!(
            "stream {seed}: sent {sent} bytes, got back {got} (+{} partial)",
            pending.len()
        ));
    }
    Ok(sent)
}

/// New connections, one after another on each of `workers` tasks: connect,
/// 64 bytes each way, close. Counts successes; failures are kept.
pub struct Load {
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, workers: usize, stop: Arc<AtomicBool>) -> Load {
        assert!(workers < 256, "the worker goes in 8 bits of each seed");
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..workers)
            .map(|w| {
                let (ok, failures, stop) = (ok.clone(), failures.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        // Every connection its own seed, apart from the long
                        // streams' (small numbers): the top bit set, the
                        // worker in the next 8. One that gets another's
                        // bytes fails.
                        let seed = 1 << 31 | (w as u64) << 23 | (i & 0x7f_ffff);
                        match one_exchange(addr, seed).await {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                    }
                })
            })
            .collect();
        Load {
            ok,
            failures,
            tasks,
        }
    }

    pub async fn finish(self) -> (u64, Vec<String>) {
        for t in self.tasks {
            // A worker that panicked would otherwise count as one that
            // made no connection and saw no failure.
            t.await.expect("a load worker panicked");
        }
        let f = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), f)
    }
}

pub async fn one_exchange(addr: SocketAddr, seed: u64) -> Result<(), String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let msg: Vec<u8> = (0..8).flat_map(|k| word(seed, k)).collect();
    s.write_all(&msg).await.map_err(|e| format!("write: {e}"))?;
    s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut back = Vec::new();
    s.read_to_end(&mut back)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if back != msg {
        return Err(format!(
            "echo of {} bytes came back as {}",
            msg.len(),
            back.len()
        ));
    }
    Ok(())
}

/// Slow streams (1 KiB every 20 ms), bulk streams (64 KiB every ms: mostly
/// mid-write at any instant) and a new-connection load, all started at
/// once and stopped by `finish`.
pub struct Traffic {
    stop_streams: Arc<AtomicBool>,
    stop_load: Arc<AtomicBool>,
    streams: Vec<tokio::task::JoinHandle<Result<u64, String>>>,
    load: Load,
}

/// What `Traffic::finish` saw: stream bytes checked, new connections that
/// succeeded, and the failures.
pub struct Seen {
    pub bytes: u64,
    pub ok: u64,
    pub failures: Vec<String>,
}

impl Traffic {
    pub fn start(addr: SocketAddr, slow: u64, bulk: u64, workers: usize) -> Traffic {
        Traffic::paced(addr, slow, bulk, 8192, workers)
    }

    /// `start` with bulk streams of `bulk_words` 8-byte words a millisecond.
    pub fn paced(
        addr: SocketAddr,
        slow: u64,
        bulk: u64,
        bulk_words: u64,
        workers: usize,
    ) -> Traffic {
        let stop_streams = Arc::new(AtomicBool::new(false));
        let stop_load = Arc::new(AtomicBool::new(false));
        let mut streams: Vec<_> = (0..slow)
            .map(|i| {
                let stop = stop_streams.clone();
                tokio::spawn(long_stream(
                    addr,
                    i + 1,
                    128,
                    Duration::from_millis(20),
                    stop,
                ))
            })
            .collect();
        streams.extend((0..bulk).map(|i| {
            let stop = stop_streams.clone();
            tokio::spawn(long_stream(
                addr,
                1000 + i,
                bulk_words,
                Duration::from_millis(1),
                stop,
            ))
        }));
        let load = Load::start(addr, workers, stop_load.clone());
        Traffic {
            stop_streams,
            stop_load,
            streams,
            load,
        }
    }

    /// Stops the load, then the streams (each ends with its FIN and must
    /// get every byte back). Panics on a stream error, naming `log`.
    pub async fn finish(self, log: &std::path::Path) -> Seen {
        self.stop_load.store(true, Ordering::Relaxed);
        let (ok, failures) = super::bounded(20, "load", self.load.finish()).await;
        self.stop_streams.store(true, Ordering::Relaxed);
        let mut bytes = 0;
        for st in self.streams {
            let r = super::bounded(20, "stream", st).await.expect("stream task");
            bytes += r.unwrap_or_else(|e| panic!("{e}; log {}", log.display()));
        }
        Seen {
            bytes,
            ok,
            failures,
        }
    }
}

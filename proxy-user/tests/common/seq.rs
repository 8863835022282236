//! Sequence-numbered streams, and the load that drives them through a proxy.
//!
//! Every aligned 8-byte word of a stream holds `tag + its own byte offset`
//! (little endian). A checker therefore locates a loss, duplicate, replay or
//! reorder to the byte, and the word it found there says where those bytes
//! came from (which a SHA or a byte count cannot: a replay with an exact
//! count passes both). Tags differ per stream, so bytes of another stream
//! are told apart too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The byte at `off` of the stream tagged `tag`.
pub fn byte_at(tag: u64, off: u64) -> u8 {
    tag.wrapping_add(off & !7).to_le_bytes()[(off & 7) as usize]
}

/// Generates the stream tagged `tag`, `len` bytes long.
pub struct SeqGen {
    tag: u64,
    pos: u64,
    len: u64,
}

impl SeqGen {
    pub fn new(tag: u64, len: u64) -> SeqGen {
        SeqGen { tag, pos: 0, len }
    }

    /// Fills up to `buf.len()` bytes with the next part; 0 at the end.
    pub fn fill(&mut self, buf: &mut [u8]) -> usize {
        let n = (buf.len() as u64).min(self.len - self.pos) as usize;
        fill_at(self.tag, self.pos, &mut buf[..n]);
        self.pos += n as u64;
        n
    }
}

/// Writes the stream's bytes `[at, at + buf.len())` into `buf`.
pub fn fill_at(tag: u64, at: u64, buf: &mut [u8]) {
    let head = (((8 - (at & 7)) & 7) as usize).min(buf.len());
    for (i, b) in buf[..head].iter_mut().enumerate() {
        *b = byte_at(tag, at + i as u64);
    }
    let mut off = at + head as u64;
    let mut words = buf[head..].chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&tag.wrapping_add(off).to_le_bytes());
        off += 8;
    }
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b = byte_at(tag, off + i as u64);
    }
}

/// Checks a received stream piece by piece. The first difference is kept
/// (later bytes are only counted): it is where the stream went wrong.
pub struct SeqCheck {
    tag: u64,
    pos: u64,
    error: Option<String>,
    scratch: Vec<u8>,
}

impl SeqCheck {
    pub fn new(tag: u64) -> SeqCheck {
        SeqCheck {
            tag,
            pos: 0,
            error: None,
            scratch: Vec::new(),
        }
    }

    /// Bytes fed so far.
    pub fn received(&self) -> u64 {
        self.pos
    }

    /// Some byte fed so far was wrong.
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }

    pub fn feed(&mut self, data: &[u8]) {
        if self.error.is_none() {
            self.scratch.resize(data.len(), 0);
            fill_at(self.tag, self.pos, &mut self.scratch);
            if let Some(i) = data.iter().zip(&self.scratch).position(|(a, b)| a != b) {
                self.error = Some(self.describe(data, i));
            }
        }
        self.pos += data.len() as u64;
    }

    /// What is at the first wrong byte: bytes of this stream from another
    /// offset (loss, duplicate, replay, reorder), or foreign bytes. A loss
    /// of a length that is not a multiple of 8 shifts the stream's words off
    /// the receiver's alignment, so each of the next 8 positions is tried as
    /// the start of two words of this stream.
    fn describe(&self, data: &[u8], i: usize) -> String {
        let off = self.pos + i as u64;
        let word_at = |j: usize| {
            data.get(j..j + 8)
                .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
        };
        let ours = |w: u64| {
            let rel = w.wrapping_sub(self.tag);
            (rel < 1 << 40 && rel.is_multiple_of(8)).then_some(rel)
        };
        // Two words in a row, so that a mix of two words at a wrong
        // alignment is not taken for one.
        let found = (0..8).find_map(|d| {
            let from = ours(word_at(i + d)?)?;
            let next = word_at(i + d + 8).map_or(Some(from + 8), ours)?;
            (next == from + 8).then_some((off + d as u64, from))
        });
        match found {
            Some((at, from)) => {
                let kind = if from > at {
                    format!("{} bytes missing (a loss)", from - at)
                } else {
                    format!("{} bytes from earlier (a duplicate or replay)", at - from)
                };
                format!("wrong byte at offset {off}: offset {at} holds offset {from}: {kind}")
            }
            None => {
                // The first whole aligned word from the wrong byte on, if any.
                let skip = ((8 - (off & 7)) & 7) as usize;
                match word_at(i + skip) {
                    Some(w) => format!(
                        "wrong byte at offset {off}: offset {} holds {w:#018x}, not of this stream (zeros or foreign bytes)",
                        off + skip as u64
                    ),
                    None => format!("wrong byte at offset {off} (0x{:02x})", data[i]),
                }
            }
        }
    }

    /// At the end of the stream: the content was right and it was `len` long.
    pub fn finish(&self, len: u64) -> Result<(), String> {
        if let Some(e) = &self.error {
            return Err(format!("{e} (received {} of {len})", self.pos));
        }
        if self.pos != len {
            return Err(format!(
                "clean stream of the wrong length: {} bytes of {len}",
                self.pos
            ));
        }
        Ok(())
    }
}

/// Busy-loop threads, bounded in time, so the kernel's deferred work and the
/// proxy compete for the two cores as on a loaded host.
pub struct CpuHog {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuHog {
    pub fn new(threads: usize, at_most: Duration) -> CpuHog {
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + at_most;
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        for _ in 0..100_000 {
                            x = std::hint::black_box(
                                x.wrapping_mul(6364136223846793005).wrapping_add(1),
                            );
                        }
                    }
                })
            })
            .collect();
        CpuHog { stop, threads }
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------- the workload

/// What one stream does; the client says which in a 24-byte header
/// (kind, length, tag). The backend answers `!`, the client pauses and sends
/// `g`, and only then does the payload start: both sides quiet at once is
/// when the fastpath installs a pair (a sender that never pauses keeps it on
/// the pre-install copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Client sends, the backend checks and answers `OK` or `ERR ...`.
    Upload,
    /// The backend sends (the client half-closes first), the client checks.
    Download,
    /// The backend echoes what it gets; the client checks it while sending.
    Echo,
    /// An echo that turns: small round trips with pauses (light, so auto
    /// moves it into the kernel), then the bulk of the stream both ways at
    /// full speed (busy, so auto moves it back out), then round trips again.
    Turn,
}

impl Kind {
    pub fn code(self) -> u64 {
        self as u64
    }
    fn from_code(c: u64) -> Option<Kind> {
        [Kind::Upload, Kind::Download, Kind::Echo, Kind::Turn]
            .into_iter()
            .find(|k| k.code() == c)
    }
}

/// How a stream ended, as the client saw it.
#[derive(Debug)]
pub enum Outcome {
    Exact,
    /// Content or count wrong while the connection closed cleanly: the
    /// failure a proxy must never have.
    Silent(String),
    /// A reset, an error or a missing answer: the stream failed loudly.
    Loud(String),
}

/// The backend side: speaks the header protocol. `slow`: read pauses, so the
/// kernel's in-flight bound is hit with bytes still queued.
pub async fn seq_backend(mut s: TcpStream) -> std::io::Result<()> {
    let mut header = [0u8; 24];
    s.read_exact(&mut header).await?;
    let word =
        |i: usize| u64::from_le_bytes(header[i * 8..i * 8 + 8].try_into().unwrap_or_default());
    let (kind, len, tag) = (Kind::from_code(word(0)), word(1), word(2));
    let slow = tag & 1 == 1;
    s.write_all(b"!").await?;
    let mut go = [0u8; 1];
    s.read_exact(&mut go).await?;
    match kind {
        Some(Kind::Upload) => {
            let mut check = SeqCheck::new(tag);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                check.feed(&buf[..n]);
                if slow && check.received() < len / 2 {
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
            }
            let answer = match check.finish(len) {
                Ok(()) => "OK\n".to_string(),
                Err(e) => format!("ERR {e}\n"),
            };
            s.write_all(answer.as_bytes()).await?;
            s.shutdown().await
        }
        Some(Kind::Download) => {
            send_seq(&mut s, tag, len).await?;
            s.shutdown().await?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.map(|_| ())
        }
        Some(Kind::Echo | Kind::Turn) => {
            let mut buf = vec![0u8; 64 * 1024];
            let mut echoed = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).await?;
                echoed += n as u64;
                if slow && echoed < len / 2 {
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
            }
            s.shutdown().await
        }
        None => Ok(()),
    }
}

async fn send_seq<W: AsyncWriteExt + Unpin>(w: &mut W, tag: u64, len: u64) -> std::io::Result<()> {
    send_range(w, tag, 0, len).await
}

/// Sends the stream's bytes `[from, to)`.
async fn send_range<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    tag: u64,
    from: u64,
    to: u64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 128 * 1024];
    let mut at = from;
    while at < to {
        let n = (buf.len() as u64).min(to - at) as usize;
        fill_at(tag, at, &mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        at += n as u64;
    }
    Ok(())
}

/// Reads `r` to EOF through a checker; `slow` pauses like the backend does.
async fn recv_seq<R: AsyncReadExt + Unpin>(r: &mut R, tag: u64, len: u64, slow: bool) -> Outcome {
    recv_rest(r, SeqCheck::new(tag), len, slow).await
}

/// Round trips of a turning stream before and after its bulk, and their size.
const TURN_TRIPS: u64 = 12;
const TURN_MSG: u64 = 100;

/// How long a turning stream waits for its echo. Its client closes only
/// after the last echo, so a lost byte would otherwise hang it instead of
/// reaching the proxy's FIN ledger.
const TURN_STALL: Duration = Duration::from_secs(20);

/// One read of a turning stream's echo into `check`. `Err`: how the stream
/// failed (wrong bytes, an early EOF, a stall or an error).
async fn read_echo<R: AsyncReadExt + Unpin>(
    r: &mut R,
    check: &mut SeqCheck,
    buf: &mut [u8],
    len: u64,
) -> Result<(), Outcome> {
    let at = check.received();
    match tokio::time::timeout(TURN_STALL, r.read(buf)).await {
        Err(_) => Err(Outcome::Loud(format!("echo stalled at {at} of {len}"))),
        Ok(Err(e)) => Err(Outcome::Loud(format!("read failed after {at} bytes: {e}"))),
        Ok(Ok(0)) => Err(Outcome::Silent(
            check
                .finish(len)
                .err()
                .unwrap_or_else(|| "EOF before the last round trip".into()),
        )),
        Ok(Ok(n)) => {
            check.feed(&buf[..n]);
            if check.failed() {
                return Err(Outcome::Silent(check.finish(len).err().unwrap_or_default()));
            }
            Ok(())
        }
    }
}

/// After a turning stream went wrong and its client half-closed: wrong
/// bytes followed by a clean end are `Silent`, and by a reset (the FIN
/// ledger's answer to a loss) `Loud`, as for the other kinds, which read to
/// the end before they judge.
async fn settle<R: AsyncReadExt + Unpin>(r: &mut R, failed: Outcome) -> Outcome {
    let Outcome::Silent(what) = failed else {
        return failed;
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(TURN_STALL, r.read(&mut buf)).await {
            Ok(Ok(0)) => return Outcome::Silent(what),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Outcome::Loud(format!("{what}; then {e}")),
            Err(_) => return Outcome::Loud(format!("{what}; then no end")),
        }
    }
}

/// `n` round trips of `TURN_MSG` bytes of the stream, each echoed and checked
/// before the next, with pauses: a light load.
async fn round_trips(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    check: &mut SeqCheck,
    n: u64,
    len: u64,
) -> Result<(), Outcome> {
    let mut msg = vec![0u8; TURN_MSG as usize];
    let mut back = vec![0u8; msg.len()];
    for _ in 0..n {
        let end = check.received() + TURN_MSG;
        fill_at(check.tag, check.received(), &mut msg);
        w.write_all(&msg)
            .await
            .map_err(|e| Outcome::Loud(format!("send: {e}")))?;
        while check.received() < end {
            let want = (end - check.received()) as usize;
            read_echo(r, check, &mut back[..want], len).await?;
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    Ok(())
}

/// A `Kind::Turn` stream of `len` bytes: round trips, bulk, round trips.
async fn turn(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    len: u64,
    tag: u64,
    slow: bool,
) -> Outcome {
    let trips = TURN_TRIPS.min(len / TURN_MSG / 2);
    let bulk = len - 2 * trips * TURN_MSG;
    let mut check = SeqCheck::new(tag);
    if let Err(o) = round_trips(&mut r, &mut w, &mut check, trips, len).await {
        let _ = w.shutdown().await;
        return settle(&mut r, o).await;
    }
    let from = check.received();
    let sender =
        tokio::spawn(async move { send_range(&mut w, tag, from, from + bulk).await.map(|()| w) });
    let mut buf = vec![0u8; 64 * 1024];
    while check.received() < from + bulk {
        let want = (buf.len() as u64).min(from + bulk - check.received()) as usize;
        if let Err(o) = read_echo(&mut r, &mut check, &mut buf[..want], len).await {
            // Dropping the write half sends the FIN.
            sender.abort();
            let _ = sender.await;
            return settle(&mut r, o).await;
        }
        if slow && check.received() < from + bulk / 2 {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    let mut w = match sender.await {
        Ok(Ok(w)) => w,
        Ok(Err(e)) => return Outcome::Loud(format!("send: {e}")),
        Err(e) => return Outcome::Loud(format!("sender: {e}")),
    };
    let trips_after = round_trips(&mut r, &mut w, &mut check, trips, len).await;
    let _ = w.shutdown().await;
    if let Err(o) = trips_after {
        return settle(&mut r, o).await;
    }
    // Nothing may follow the last echo but the FIN.
    recv_rest(&mut r, check, len, false).await
}

/// Reads `r` to EOF into `check`, which may have seen some bytes already.
async fn recv_rest<R: AsyncReadExt + Unpin>(
    r: &mut R,
    mut check: SeqCheck,
    len: u64,
    slow: bool,
) -> Outcome {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => check.feed(&buf[..n]),
            Err(e) => {
                return Outcome::Loud(format!("read failed after {} bytes: {e}", check.received()))
            }
        }
        if slow && check.received() < len / 2 {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    match check.finish(len) {
        Ok(()) => Outcome::Exact,
        Err(e) => Outcome::Silent(e),
    }
}

/// One stream through `addr`. Tags with the low bit set have slow readers.
pub async fn run_stream(addr: std::net::SocketAddr, kind: Kind, len: u64, tag: u64) -> Outcome {
    let s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return Outcome::Loud(format!("connect: {e}")),
    };
    let (mut r, mut w) = s.into_split();
    let mut header = Vec::with_capacity(24);
    for v in [kind.code(), len, tag] {
        header.extend_from_slice(&v.to_le_bytes());
    }
    if let Err(e) = w.write_all(&header).await {
        return Outcome::Loud(format!("header: {e}"));
    }
    let mut greeting = [0u8; 1];
    if let Err(e) = r.read_exact(&mut greeting).await {
        return Outcome::Loud(format!("greeting: {e}"));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    if let Err(e) = w.write_all(b"g").await {
        return Outcome::Loud(format!("go: {e}"));
    }
    let slow = tag & 1 == 1;
    match kind {
        Kind::Upload => {
            if let Err(e) = send_seq(&mut w, tag, len).await {
                return Outcome::Loud(format!("send: {e}"));
            }
            let _ = w.shutdown().await;
            let mut answer = String::new();
            match r.read_to_string(&mut answer).await {
                Ok(_) if answer == "OK\n" => Outcome::Exact,
                Ok(_) if answer.starts_with("ERR") => Outcome::Silent(answer.trim().to_string()),
                // The backend was reset before it could answer.
                Ok(_) => Outcome::Loud(format!("no answer from the backend: {answer:?}")),
                Err(e) => Outcome::Loud(format!("answer: {e}")),
            }
        }
        Kind::Download => {
            let _ = w.shutdown().await;
            recv_seq(&mut r, tag, len, slow).await
        }
        Kind::Echo => {
            let sender = tokio::spawn(async move {
                let sent = send_seq(&mut w, tag, len).await;
                let _ = w.shutdown().await;
                sent
            });
            let got = recv_seq(&mut r, tag, len, slow).await;
            match sender.await {
                Ok(Err(e)) if matches!(got, Outcome::Exact) => Outcome::Loud(format!("send: {e}")),
                _ => got,
            }
        }
        Kind::Turn => turn(r, w, len, tag, slow).await,
    }
}

/// Totals of a stress run.
#[derive(Debug, Default)]
pub struct Tally {
    pub streams: usize,
    pub exact: usize,
    pub silent: Vec<String>,
    pub loud: Vec<String>,
    pub bytes: u64,
}

/// Runs `streams` streams, `parallel` at a time, of random kind and length
/// up to `max_len`, through `addr`.
pub async fn stress(
    addr: std::net::SocketAddr,
    streams: usize,
    parallel: usize,
    max_len: u64,
    seed: u64,
) -> Tally {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..parallel {
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut t = Tally::default();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= streams {
                    return t;
                }
                let mut rng = fastrand::Rng::with_seed(seed ^ (i as u64).wrapping_mul(0x9e37_79b9));
                let kind = [Kind::Upload, Kind::Download, Kind::Echo, Kind::Turn][rng.usize(..4)];
                let len = rng.u64(1..=max_len);
                // A distinct tag per stream; its low bit picks a slow reader.
                let tag = (seed << 48) ^ ((i as u64) << 41) ^ rng.u64(0..2);
                let outcome = run_stream(addr, kind, len, tag).await;
                t.streams += 1;
                t.bytes += len;
                match outcome {
                    Outcome::Exact => t.exact += 1,
                    Outcome::Silent(e) => t.silent.push(format!("{kind:?} {len}: {e}")),
                    Outcome::Loud(e) => t.loud.push(format!("{kind:?} {len}: {e}")),
                }
            }
        }));
    }
    let mut all = Tally::default();
    for w in workers {
        let t = w.await.expect("stress worker");
        all.streams += t.streams;
        all.exact += t.exact;
        all.bytes += t.bytes;
        all.silent.extend(t.silent);
        all.loud.extend(t.loud);
    }
    all
}

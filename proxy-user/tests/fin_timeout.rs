//! `--client-fin-timeout` and `--server-fin-timeout` (HAProxy's `timeout
//! client-fin` / `server-fin`), through the real binary on every plane: once
//! one side's FIN was passed on, the pair is closed after the fin timeout
//! with nothing moving, long before the idle timeout; cleanly when nothing
//! was owed, with a reset to both sides when bytes were. Each checks the
//! bytes that went through before, the close line's `end`, the
//! `proxy_connections_total{end=...}` counter and the timing (bounds far
//! wider than the timer's own slack, but well short of the idle timeout).

#[macro_use]
mod common;

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use common::seq::{SeqCheck, SeqGen};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

planes!(
    client_half_closes_and_target_never_answers,
    target_half_closes_and_client_never_closes,
    unread_answer_after_client_fin_gets_both_sides_reset,
);

/// The fin timeout under test; the other side's, and the idle timeout, are
/// far longer, so only the one under test can end the connection in time.
const FIN: Duration = Duration::from_secs(1);
/// Fired no later than this after the half-close: the idle timeout (8 s)
/// would take longer, so a proxy ignoring the fin timeout fails.
const LATEST: Duration = Duration::from_secs(6);
const LEN: u64 = 256 << 10;

/// `mode`'s flags, and how long a side waits before its first FIN so the
/// pair is in the kernel by then on the fastpath (installed at once) and on
/// auto (promoted after one 200 ms period that carried a little): a FIN
/// before the install keeps the pair in userspace, which the close line's
/// plane would then say.
fn setup(mode: &str, which: &str) -> (Vec<String>, Duration) {
    let mut args: Vec<String> = [
        "--idle-timeout",
        "8s",
        "--admin-address",
        "127.0.0.1:0",
        "--client-fin-timeout",
        "30s",
        "--server-fin-timeout",
        "30s",
    ]
    .map(String::from)
    .to_vec();
    let at = args.iter().position(|a| a == which).expect("a fin flag") + 1;
    args[at] = format!("{}ms", FIN.as_millis());
    let settle = match mode {
        "auto" => {
            args.extend(["--promote-after", "200ms", "--promote-periods", "1"].map(String::from));
            Duration::from_millis(900)
        }
        "fastpath" => Duration::from_millis(300),
        _ => Duration::ZERO,
    };
    (args, settle)
}

async fn spawn(mode: &str, target: &Backend, args: &[String]) -> Proxy {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proxy::spawn(mode, &[AppSpec::new("a", 1, vec![target.target()])], &args).await
}

/// How a read loop ended.
#[derive(Debug, PartialEq)]
enum Ending {
    Eof,
    Reset,
    Other(ErrorKind),
}

/// Reads `s` to its end, feeding `check`.
async fn read_to_end(s: &mut (impl AsyncReadExt + Unpin), check: &mut SeqCheck) -> Ending {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return Ending::Eof,
            Ok(n) => check.feed(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ending::Reset,
            Err(e) => return Ending::Other(e.kind()),
        }
    }
}

/// A health probe connects and closes at once; the proxy's client
/// connection stays open and silent.
async fn is_probe(s: &TcpStream) -> bool {
    let peeked = tokio::time::timeout(Duration::from_millis(200), s.peek(&mut [0u8; 1])).await;
    matches!(peeked, Ok(Ok(0) | Err(_)))
}

/// The close line (one connection), its end and the end's counter.
async fn ended(proxy: &Proxy, end: &str, mode: &str) -> serde_json::Value {
    let lines = proxy.wait_conn_lines(1, 10).await;
    assert_eq!(lines.len(), 1, "{mode}: one connection: {lines:?}");
    let line = lines[0].clone();
    assert_eq!(line["end"], end, "{mode}: {line}");
    if mode == "fastpath" || mode == "auto" {
        assert_eq!(
            line["plane"], "fastpath",
            "{mode}: the kernel must carry it: {line}"
        );
    }
    let (_, metrics) = http_get(&admin_addr(proxy), "/metrics").await.unwrap();
    for kind in ["client_fin_timeout", "server_fin_timeout"] {
        let series = format!(r#"proxy_connections_total{{app="a",end="{kind}"}}"#);
        let want = if kind == end { 1.0 } else { 0.0 };
        assert_eq!(metric(&metrics, &series), want, "{mode}: {series}");
    }
    line
}

fn assert_timely(waited: Duration, mode: &str) {
    assert!(
        waited >= FIN.mul_f32(0.9) && waited < LATEST,
        "{mode}: closed {waited:?} after the half-close (fin timeout {FIN:?}, idle 8 s)"
    );
}

/// The client uploads a sequence-numbered stream and half-closes; the
/// target reads it all, then neither answers nor closes. The client gets a
/// clean EOF after --server-fin-timeout.
async fn client_half_closes_and_target_never_answers(mode: &str) {
    let (args, settle) = setup(mode, "--server-fin-timeout");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let target = Backend::with("mute", move |mut s: TcpStream| {
        let tx = tx.clone();
        async move {
            let mut check = SeqCheck::new(7);
            let ending = read_to_end(&mut s, &mut check).await;
            if check.received() == 0 {
                return; // a health probe
            }
            let _ = tx.send((ending, check.finish(LEN)));
            // Holds its side open, silent, past every timeout under test.
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    })
    .await;
    let proxy = spawn(mode, &target, &args).await;
    let waited = bounded(30, "server-fin", async {
        let mut s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        let mut gen = SeqGen::new(7, LEN);
        let mut buf = vec![0u8; (LEN / 2) as usize];
        let n = gen.fill(&mut buf);
        s.write_all(&buf[..n]).await.unwrap();
        tokio::time::sleep(settle).await;
        let n = gen.fill(&mut buf);
        s.write_all(&buf[..n]).await.unwrap();
        s.shutdown().await.unwrap();
        let half_closed = Instant::now();
        let (ending, stream) = rx.recv().await.unwrap();
        assert_eq!(ending, Ending::Eof, "{mode}: the target sees the FIN");
        assert_eq!(stream, Ok(()), "{mode}: the upload arrives exact");
        let mut check = SeqCheck::new(0);
        let ending = read_to_end(&mut s, &mut check).await;
        assert_eq!(ending, Ending::Eof, "{mode}: nothing owed: a clean close");
        assert_eq!(check.received(), 0, "{mode}: the target sent nothing");
        half_closed.elapsed()
    })
    .await;
    assert_timely(waited, mode);
    let line = ended(&proxy, "server_fin_timeout", mode).await;
    assert_eq!(line["bytes_in"], LEN, "{mode}");
    assert_eq!(line["bytes_out"], 0, "{mode}");
}

/// The target sends a stream and half-closes; the client reads it all to
/// EOF, then neither sends nor closes. The target gets a clean EOF after
/// --client-fin-timeout.
async fn target_half_closes_and_client_never_closes(mode: &str) {
    let (args, settle) = setup(mode, "--client-fin-timeout");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let target = Backend::with("talker", move |s: TcpStream| {
        let tx = tx.clone();
        async move {
            if is_probe(&s).await {
                return;
            }
            let (mut r, mut w) = s.into_split();
            let mut gen = SeqGen::new(9, LEN);
            // A first small piece, then a pause: auto promotes only after a
            // period that carried something.
            let mut buf = vec![0u8; 1024];
            let n = gen.fill(&mut buf);
            w.write_all(&buf[..n]).await.unwrap();
            tokio::time::sleep(settle).await;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = gen.fill(&mut buf);
                if n == 0 {
                    break;
                }
                w.write_all(&buf[..n]).await.unwrap();
            }
            w.shutdown().await.unwrap();
            let mut check = SeqCheck::new(0);
            let ending = read_to_end(&mut r, &mut check).await;
            let _ = tx.send((ending, check.received(), Instant::now()));
        }
    })
    .await;
    let proxy = spawn(mode, &target, &args).await;
    let waited = bounded(30, "client-fin", async {
        let mut s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        let mut check = SeqCheck::new(9);
        let ending = read_to_end(&mut s, &mut check).await;
        let half_closed = Instant::now();
        assert_eq!(ending, Ending::Eof, "{mode}: the client sees the FIN");
        assert_eq!(
            check.finish(LEN),
            Ok(()),
            "{mode}: the download arrives exact"
        );
        // The client keeps `s` open and says nothing.
        let (ending, got, at) = rx.recv().await.unwrap();
        assert_eq!(ending, Ending::Eof, "{mode}: nothing owed: a clean close");
        assert_eq!(got, 0, "{mode}: the client sent nothing");
        drop(s);
        at.saturating_duration_since(half_closed)
    })
    .await;
    assert_timely(waited, mode);
    let line = ended(&proxy, "client_fin_timeout", mode).await;
    assert_eq!(line["bytes_in"], 0, "{mode}");
    assert_eq!(line["bytes_out"], LEN, "{mode}");
}

/// The client sends a request and half-closes; the target answers with far
/// more than the buffers on the way hold, and the client does not read it.
/// Nothing moves, so --server-fin-timeout fires with bytes still owed: the
/// client must see a reset, never a clean end of a cut answer.
async fn unread_answer_after_client_fin_gets_both_sides_reset(mode: &str) {
    const ANSWER: u64 = 32 << 20;
    let (args, settle) = setup(mode, "--server-fin-timeout");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let target = Backend::with("flood", move |mut s: TcpStream| {
        let tx = tx.clone();
        async move {
            let mut check = SeqCheck::new(3);
            read_to_end(&mut s, &mut check).await;
            if check.received() == 0 {
                return; // a health probe
            }
            let request = check.finish(8);
            let mut gen = SeqGen::new(5, ANSWER);
            let mut buf = vec![0u8; 64 * 1024];
            let written = loop {
                let n = gen.fill(&mut buf);
                if n == 0 {
                    break Ok(());
                }
                if let Err(e) = s.write_all(&buf[..n]).await {
                    break Err(e.kind());
                }
            };
            let _ = tx.send((request, written));
        }
    })
    .await;
    let proxy = spawn(mode, &target, &args).await;
    bounded(30, "owed at server-fin", async {
        let mut s = TcpStream::connect(proxy.addr(0, 0)).await.unwrap();
        let mut request = [0u8; 8];
        SeqGen::new(3, 8).fill(&mut request);
        // Half the request, then a pause: auto promotes only after a period
        // that carried something.
        s.write_all(&request[..4]).await.unwrap();
        tokio::time::sleep(settle).await;
        s.write_all(&request[4..]).await.unwrap();
        s.shutdown().await.unwrap();
        // Past the fin timeout with the answer unread.
        tokio::time::sleep(FIN * 3).await;
        let mut check = SeqCheck::new(5);
        let ending = read_to_end(&mut s, &mut check).await;
        assert!(
            check.received() < ANSWER,
            "{mode}: the whole answer fit; make it larger"
        );
        assert_eq!(
            ending,
            Ending::Reset,
            "{mode}: {} of {ANSWER} bytes then {ending:?}: a cut answer must end in a reset",
            check.received()
        );
        assert_eq!(
            check.finish(check.received()),
            Ok(()),
            "{mode}: what came is exact"
        );
        let (request, written) = rx.recv().await.unwrap();
        assert_eq!(request, Ok(()), "{mode}: the request arrives exact");
        assert!(written.is_err(), "{mode}: the target's writes must fail");
    })
    .await;
    let line = ended(&proxy, "server_fin_timeout", mode).await;
    assert_eq!(line["bytes_in"], 8, "{mode}");
}

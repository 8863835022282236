//! Just enough HTTP/1.1 for the admin endpoints: read one request head,
//! write one response, close.

use std::borrow::Cow;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest request head accepted; ours are one line plus a few headers.
const MAX_HEAD: usize = 8 * 1024;

pub(super) struct Response {
    pub(super) status: &'static str,
    pub(super) content_type: &'static str,
    pub(super) body: String,
    /// Extra header lines, each ending in CRLF (`Allow: ...`).
    pub(super) headers: Cow<'static, str>,
}

impl Response {
    pub(super) fn text(status: &'static str, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            headers: Cow::Borrowed(""),
        }
    }

    pub(super) fn json(v: &Value) -> Response {
        Response {
            status: "200 OK",
            content_type: "application/json",
            body: format!("{v:#}\n"),
            headers: Cow::Borrowed(""),
        }
    }

    pub(super) fn with_headers(mut self, headers: &'static str) -> Response {
        self.headers = Cow::Borrowed(headers);
        self
    }
}

/// Writes `resp` (only its head for a HEAD request) and closes.
pub(super) async fn respond(
    sock: &mut TcpStream,
    resp: &Response,
    head_only: bool,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.status,
        resp.content_type,
        resp.body.len()
    );
    out.push_str(&resp.headers);
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&resp.body);
    }
    sock.write_all(out.as_bytes()).await?;
    sock.shutdown().await?;
    // Lingering close: closing with unread request bytes (a body, an
    // oversized head) makes the kernel send RST, which can destroy the
    // response before the client reads it. Drain a bounded amount first.
    let mut sink = [0u8; 4096];
    let mut left = 1usize << 20;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(n @ 1..) = sock.read(&mut sink).await {
            left = left.saturating_sub(n);
            if left == 0 {
                break;
            }
        }
    })
    .await;
    Ok(())
}

pub(super) enum Head {
    Complete(Vec<u8>),
    TooLarge,
    /// The client closed before finishing its request: nothing to answer.
    Closed,
}

/// Reads up to the blank line ending the request head; a body, if any, is
/// ignored (no endpoint takes one).
pub(super) async fn read_head(sock: &TcpStream) -> std::io::Result<Head> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = find_end(&head) {
            head.truncate(end);
            return Ok(Head::Complete(head));
        }
        if head.len() > MAX_HEAD {
            return Ok(Head::TooLarge);
        }
        sock.readable().await?;
        let n = match sock.try_read(&mut buf) {
            Ok(0) => return Ok(Head::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        head.extend_from_slice(&buf[..n]);
    }
}

/// End of the head: CRLF CRLF, or bare LF LF from hand-typed requests.
fn find_end(b: &[u8]) -> Option<usize> {
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = b.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end() {
        assert_eq!(find_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(14));
        assert_eq!(find_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(find_end(b"GET / HTTP/1.1\r\n"), None);
    }
}

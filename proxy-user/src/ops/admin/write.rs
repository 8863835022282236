//! The admin write API: `POST /targets/APP/TARGET/ACTION` with ACTION one
//! of `drain`, `disable`, `enable` (see `upstream::rotation`).
//!
//! Off unless the proxy was started with `--admin-token-file`; then every
//! write must carry `Authorization: Bearer TOKEN`. The token comes from a
//! file, never from argv, where `ps` and shell history would show it.

use std::path::Path;

use anyhow::Context;
use serde_json::json;

use super::http::Response;
use super::AdminState;
use crate::upstream::rotation::RotationState;

/// Longest token file read; tokens are a few dozen bytes.
const MAX_TOKEN_FILE: u64 = 4096;

/// The shared secret that allows writes.
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Reads `--admin-token-file`: one token (surrounding whitespace, such
    /// as a final newline, ignored) of visible ASCII characters.
    pub fn read(path: &Path) -> anyhow::Result<Token> {
        let what = || format!("--admin-token-file {}", path.display());
        let meta = std::fs::metadata(path).with_context(what)?;
        anyhow::ensure!(
            meta.is_file(),
            "{}: not a regular file; write the token into a file readable only by the proxy's user",
            what()
        );
        anyhow::ensure!(
            meta.len() <= MAX_TOKEN_FILE,
            "{}: {} bytes, more than the {MAX_TOKEN_FILE} a token file may have",
            what(),
            meta.len()
        );
        let text = std::fs::read_to_string(path).with_context(what)?;
        let token = text.trim();
        anyhow::ensure!(
            !token.is_empty(),
            "{}: the file is empty; put a random token in it, e.g. `head -c 32 /dev/urandom | base64 > FILE`",
            what()
        );
        anyhow::ensure!(
            token.bytes().all(|b| b.is_ascii_graphic()),
            "{}: the token must be one word of visible ASCII characters (it goes into an HTTP header)",
            what()
        );
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "--admin-token-file is readable by other users; chmod 600 it");
        }
        Ok(Token(token.as_bytes().to_vec()))
    }

    #[cfg(test)]
    pub fn new(s: &str) -> Token {
        Token(s.as_bytes().to_vec())
    }

    /// Compares in time independent of where the first difference is.
    fn matches(&self, given: &[u8]) -> bool {
        let mut diff = self.0.len() ^ given.len();
        for (i, b) in self.0.iter().enumerate() {
            diff |= usize::from(b ^ given.get(i).copied().unwrap_or(0));
        }
        diff == 0
    }
}

/// The bearer token of the request head, if any.
fn bearer(head: &str) -> Option<&str> {
    head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("authorization") {
            return None;
        }
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then_some(token.trim())
    })
}

/// `%5B` and friends, for clients that escape the brackets of an IPv6 target.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            let hex = std::str::from_utf8(&hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// Whether `path` is one the write API serves (for the method check).
pub(super) fn is_write_path(path: &str) -> bool {
    path.starts_with("/targets/")
}

/// `POST /targets/APP/TARGET/ACTION`.
pub(super) fn post(head: &str, path: &str, state: &AdminState) -> Response {
    let Some(token) = &state.token else {
        return Response::text(
            "403 Forbidden",
            "the admin write API is off: start the proxy with --admin-token-file FILE\n",
        );
    };
    if !bearer(head).is_some_and(|t| token.matches(t.as_bytes())) {
        return Response::text(
            "401 Unauthorized",
            "send the token of --admin-token-file as `Authorization: Bearer TOKEN`\n",
        )
        .with_headers("WWW-Authenticate: Bearer\r\n");
    }
    let usage = "use POST /targets/APP/TARGET/ACTION, ACTION one of drain, disable, enable; \
                 TARGET as in the config, e.g. 127.0.0.1:8080 or [::1]:80\n";
    let rest = path.strip_prefix("/targets/").unwrap_or_default();
    let parts: Vec<Option<String>> = rest.split('/').map(percent_decode).collect();
    let [Some(app), Some(target), Some(action)] = &parts[..] else {
        return Response::text("400 Bad Request", usage);
    };
    let Some(to) = RotationState::from_action(action) else {
        return Response::text("400 Bad Request", usage);
    };
    let balancers = state.balancers.load();
    let Some(balancer) = balancers.iter().find(|b| &*b.app == app) else {
        return Response::text(
            "404 Not Found",
            format!("no app {app:?} in the config in force\n"),
        );
    };
    let Some(backend) = balancer
        .backends
        .iter()
        .find(|b| b.target.to_string() == *target)
    else {
        return Response::text(
            "404 Not Found",
            format!("app {app:?} has no target {target:?} (write it as in the config)\n"),
        );
    };
    let from = backend.rotation.set(to);
    tracing::info!(app = %app, target = %target, from = from.as_str(), to = to.as_str(), "target admin state set through the admin API");
    Response::json(&json!({
        "app": app,
        "target": target,
        "admin_state": to.as_str(),
        "previous": from.as_str(),
        "active_connections": backend.active(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_token_compare() {
        let head = "POST /x HTTP/1.1\r\nHost: a\r\nauthorization:  Bearer s3cret \r\n";
        assert_eq!(bearer(head), Some("s3cret"));
        assert_eq!(
            bearer("POST /x HTTP/1.1\r\nAuthorization: Basic eA=="),
            None
        );
        assert_eq!(bearer("POST /x HTTP/1.1\r\n"), None);
        let t = Token::new("s3cret");
        assert!(t.matches(b"s3cret"));
        for bad in ["", "s3cre", "s3cret!", "S3cret"] {
            assert!(!t.matches(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn percent() {
        assert_eq!(percent_decode("%5B::1%5D:80").as_deref(), Some("[::1]:80"));
        assert_eq!(percent_decode("a%2"), None);
        assert_eq!(percent_decode("%zz"), None);
    }
}

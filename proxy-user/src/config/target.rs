//! One `Targets` entry: `host:port` or `[v6addr]:port`, with a message for
//! each way it is commonly miswritten (a URL, an unbracketed IPv6 address,
//! characters no host name has).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::ports::check_port;
use super::Target;

const FIX: &str =
    "targets must be \"host:port\", e.g. \"127.0.0.1:8080\", \"app.internal:80\" or \"[::1]:80\"";

/// Parses `host:port` or `[v6addr]:port`.
pub fn parse_target(s: &str) -> Result<Target, String> {
    if s.trim().is_empty() {
        return Err(format!("target is empty; {FIX}"));
    }
    if s.chars().any(char::is_whitespace) {
        return Err(format!("target {s:?} contains whitespace; {FIX}"));
    }
    if let Some((scheme, rest)) = s.split_once("://") {
        let hostport = rest.split('/').next().unwrap_or_default();
        return Err(format!(
            "target {s:?} has a scheme ({scheme}://); targets are host:port, without a scheme: write {hostport:?}{}",
            if hostport.contains(':') { "" } else { " with its port, e.g. \"host:80\"" }
        ));
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((h, p)) = rest.split_once("]:") else {
            return Err(format!("target {s:?} is malformed; {FIX}"));
        };
        if !is_v6_literal(h) {
            return Err(format!(
                "target {s:?}: brackets are for IPv6 addresses, and {h:?} is not one; write \"[::1]:80\", or a host name without brackets"
            ));
        }
        (h, p)
    } else {
        let Some((h, p)) = s.rsplit_once(':') else {
            return Err(format!("target {s:?} has no port; {FIX}"));
        };
        if h.contains(':') {
            return Err(format!(
                "target {s:?} looks like an IPv6 address without brackets; write \"[addr]:port\""
            ));
        }
        if let Some(c) = h.chars().find(|c| !is_host_char(*c)) {
            return Err(format!(
                "target {s:?} has the character {c:?} in its host; a host is a DNS name (letters, digits, '.', '-', '_') or an IP address; {FIX}"
            ));
        }
        (h, p)
    };
    if host.is_empty() {
        return Err(format!("target {s:?} has an empty host; {FIX}"));
    }
    let port: u64 = port
        .parse()
        .map_err(|_| format!("target {s:?} has a bad port {port:?}; {FIX}"))?;
    let port = check_port(port, &port.to_string()).map_err(|e| format!("target {s:?}: {e}"))?;
    Ok(Target {
        host: host.to_string(),
        port,
    })
}

fn is_host_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

/// An IPv6 address, with an optional `%zone` (link-local scope).
fn is_v6_literal(h: &str) -> bool {
    let (addr, zone) = h.split_once('%').unwrap_or((h, "a"));
    addr.parse::<Ipv6Addr>().is_ok() && !zone.is_empty() && zone.chars().all(is_host_char)
}

impl Target {
    /// The addresses this target names without any lookup: an IP literal,
    /// or loopback for `localhost` (which every resolver maps there).
    /// Names are resolved at connect time only; the connect path checks
    /// what they resolve to.
    pub fn fixed_ips(&self) -> Vec<IpAddr> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return vec![ip];
        }
        if self
            .host
            .trim_end_matches('.')
            .eq_ignore_ascii_case("localhost")
        {
            return vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
        }
        Vec::new()
    }
}

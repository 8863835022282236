//! How an app takes its clients: `Apps[].AcceptProxyProtocol` (a PROXY
//! protocol v1 or v2 header in front of every connection, from trusted
//! sources only) and `Apps[].MaxConnectionsPerClient`.
//!
//! ```json
//! "AcceptProxyProtocol": {"TrustedSources": ["10.0.0.0/8", "192.0.2.7"], "Timeout": "3s"},
//! "MaxConnectionsPerClient": 100
//! ```

use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;

/// Time a trusted sender gets for its header when `Timeout` is left out.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// An address range, `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or range; write e.g. \"10.0.0.0/8\", \"192.0.2.7\" or \"2001:db8::/32\""))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        let cidr = Cidr { net, prefix };
        if cidr.mask(net) != net {
            return Err(format!(
                "{s:?} has bits set past /{prefix}; write the network address, e.g. \"{}/{prefix}\"",
                cidr.mask(net)
            ));
        }
        Ok(cidr)
    }

    fn mask(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(a) => {
                let m = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & m).into())
            }
            IpAddr::V6(a) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & m).into())
            }
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.net.is_ipv4() && self.mask(ip) == self.net
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptProxy {
    /// Connections from anywhere else are refused.
    pub trusted: Vec<Cidr>,
    /// For the whole header; a sender slower than this is cut.
    pub timeout: Duration,
}

impl AcceptProxy {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }
}

pub(super) fn parse_accept(v: &Value, at: &str, errors: &mut Vec<String>) -> Option<AcceptProxy> {
    let example = r#"{"TrustedSources": ["10.0.0.0/8"], "Timeout": "3s"}"#;
    let Some(obj) = v.as_object() else {
        errors.push(format!("{at}: must be an object like {example}, found {v}"));
        return None;
    };
    for key in obj.keys() {
        if key != "TrustedSources" && key != "Timeout" {
            errors.push(format!(
                "{at}: unknown field `{}`; expected TrustedSources or Timeout (case-sensitive)",
                key.escape_debug()
            ));
        }
    }
    let mut trusted = Vec::new();
    match obj.get("TrustedSources") {
        Some(Value::Array(list)) if !list.is_empty() => {
            for (i, s) in list.iter().enumerate() {
                match s.as_str().map(Cidr::parse) {
                    Some(Ok(c)) => trusted.push(c),
                    Some(Err(e)) => errors.push(format!("{at}.TrustedSources[{i}]: {e}")),
                    None => errors.push(format!(
                        "{at}.TrustedSources[{i}]: must be a string like \"10.0.0.0/8\", found {s}"
                    )),
                }
            }
        }
        _ => errors.push(format!(
            "{at}.TrustedSources: list the addresses or ranges of the load balancers that send the header, e.g. {example}; connections from anywhere else are refused"
        )),
    }
    let timeout = match obj.get("Timeout") {
        None => DEFAULT_HEADER_TIMEOUT,
        Some(t) => match t.as_str().map(|s| humantime::parse_duration(s.trim())) {
            Some(Ok(d)) if d >= Duration::from_millis(10) && d <= Duration::from_secs(60) => d,
            _ => {
                errors.push(format!(
                    "{at}.Timeout: {t} must be a duration from 10ms to 60s, e.g. \"3s\""
                ));
                DEFAULT_HEADER_TIMEOUT
            }
        },
    };
    Some(AcceptProxy { trusted, timeout })
}

pub(super) fn parse_per_client(v: &Value, at: &str, errors: &mut Vec<String>) -> Option<usize> {
    match v.as_u64() {
        Some(n @ 1..=1_000_000) => Some(n as usize),
        _ => {
            errors.push(format!(
                "{at}: {v} must be a whole number from 1 to 1000000 (connections one client address may hold)"
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let one = Cidr::parse("192.0.2.7").unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("2001:db8::/32")
            .unwrap()
            .contains("2001:db8::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.1/8")
            .unwrap_err()
            .contains("10.0.0.0/8"));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("ten").is_err());
    }

    #[test]
    fn accept_errors() {
        let mut errors = Vec::new();
        let v: Value =
            serde_json::from_str(r#"{"TrustedSources":[],"Timeout":"2m","X":1}"#).unwrap();
        parse_accept(&v, "A", &mut errors);
        let text = errors.join("\n");
        for want in [
            "A: unknown field `X`",
            "A.TrustedSources: list",
            "A.Timeout:",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
    }
}

//! One `Ports` entry (a port, or a range string "A-B"), and the port check
//! targets share.

use serde_json::Value;

/// One `Ports` entry: an integer, a string "N", or a string range "A-B".
pub(super) fn parse_port_entry(
    v: &Value,
    max_range: u32,
) -> Result<std::ops::RangeInclusive<u16>, String> {
    match v {
        Value::Number(n) => {
            let Some(p) = n.as_u64() else {
                return Err(format!(
                    "port {n} is not a whole number; use an integer between 1 and 65535"
                ));
            };
            let p = check_port(p, &n.to_string())?;
            Ok(p..=p)
        }
        Value::String(s) => {
            let s = s.trim();
            if let Some((a, b)) = s.split_once('-') {
                let a = parse_port_str(a.trim(), s)?;
                let b = parse_port_str(b.trim(), s)?;
                if a > b {
                    return Err(format!(
                        "range {s:?} is backwards; write the lower port first, e.g. \"{b}-{a}\""
                    ));
                }
                let count = u32::from(b) - u32::from(a) + 1;
                if count > max_range {
                    return Err(format!(
                        "range {s:?} covers {count} ports; at most {max_range} per range are allowed because each port gets its own listener; split it, narrow it, or run with --steering sk_lookup (one socket for any number of ports)"
                    ));
                }
                Ok(a..=b)
            } else {
                let p = parse_port_str(s, s)?;
                Ok(p..=p)
            }
        }
        other => Err(format!(
            "must be a port number or a \"A-B\" range string, found {other}"
        )),
    }
}

fn parse_port_str(s: &str, whole: &str) -> Result<u16, String> {
    let n: u64 = s.parse().map_err(|_| {
        format!("{whole:?} is not a port; use an integer 1-65535 or a range like \"6000-6010\"")
    })?;
    check_port(n, s)
}

pub(super) fn check_port(n: u64, shown: &str) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(format!(
            "port {shown} is out of range; use a port between 1 and 65535"
        )),
    }
}

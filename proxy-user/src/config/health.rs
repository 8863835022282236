//! `Apps[].HealthCheck`: an app's own probe settings, each field optional
//! (what is left out comes from the `--health-*` flags):
//!
//! ```json
//! "HealthCheck": {"Interval": "2s", "Timeout": "1s", "Rise": 2, "Fall": 3,
//!                 "Send": "PING\r\n", "Expect": "+PONG"}
//! ```
//!
//! Without `Send` and `Expect` a probe is a TCP connect. `Send` is written
//! after the connect (and after the PROXY header, when the app sends one);
//! with `Expect` the probe passes only once those bytes arrive within
//! `Timeout`, so a target that accepts and then hangs is marked down.

use std::time::Duration;

use serde_json::Value;

/// The fields of `HealthCheck`, for the unknown-field message.
const FIELDS: &[&str] = &["Interval", "Timeout", "Rise", "Fall", "Send", "Expect"];

/// Longest `Send` or `Expect`: probes are a line or two, and the reply is
/// read into a buffer of about this size.
pub const MAX_PROBE_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HealthCheck {
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub send: Option<Vec<u8>>,
    pub expect: Option<Vec<u8>>,
}

/// Parses `v` found at `at` (`Apps[0].HealthCheck`); problems go to `errors`.
pub(super) fn parse(v: &Value, at: &str, errors: &mut Vec<String>) -> Option<HealthCheck> {
    let example = r#"{"Interval": "2s", "Timeout": "1s", "Rise": 2, "Fall": 3, "Send": "PING\r\n", "Expect": "PONG"}"#;
    let obj = match v {
        Value::Null => return None,
        Value::Object(o) => o,
        v => {
            errors.push(format!("{at}: must be an object like {example}, found {v}"));
            return None;
        }
    };
    for key in obj.keys() {
        if !FIELDS.contains(&key.as_str()) {
            errors.push(format!(
                "{at}: unknown field `{}`; expected one of {} (case-sensitive)",
                key.escape_debug(),
                FIELDS.join(", ")
            ));
        }
    }
    let mut check = HealthCheck::default();
    let duration = |name: &str, errors: &mut Vec<String>| -> Option<Duration> {
        let v = obj.get(name)?;
        let parsed = v.as_str().map(|s| (s, humantime::parse_duration(s.trim())));
        match parsed {
            Some((_, Ok(d)))
                if d >= Duration::from_millis(10) && d <= Duration::from_secs(3600) =>
            {
                Some(d)
            }
            Some((s, Ok(_))) => {
                errors.push(format!(
                    "{at}.{name}: {s:?} is out of range; use 10ms to 1h"
                ));
                None
            }
            _ => {
                errors.push(format!(
                    "{at}.{name}: {v} is not a duration; write a string like \"500ms\", \"2s\" or \"1m\""
                ));
                None
            }
        }
    };
    check.interval = duration("Interval", errors);
    check.timeout = duration("Timeout", errors);
    if let (Some(i), Some(t)) = (check.interval, check.timeout) {
        if t > i {
            errors.push(format!(
                "{at}.Timeout: {t:?} is longer than the Interval {i:?}; a probe may not outlast its interval"
            ));
        }
    }
    let count = |name: &str, errors: &mut Vec<String>| -> Option<u32> {
        let v = obj.get(name)?;
        match v.as_u64() {
            Some(n @ 1..=100) => Some(n as u32),
            _ => {
                errors.push(format!(
                    "{at}.{name}: {v} must be a whole number from 1 to 100"
                ));
                None
            }
        }
    };
    check.rise = count("Rise", errors);
    check.fall = count("Fall", errors);
    let bytes = |name: &str, errors: &mut Vec<String>| -> Option<Vec<u8>> {
        let v = obj.get(name)?;
        match v.as_str() {
            Some(s) if !s.is_empty() && s.len() <= MAX_PROBE_BYTES => Some(s.as_bytes().to_vec()),
            _ => {
                errors.push(format!(
                    "{at}.{name}: must be a non-empty string of at most {MAX_PROBE_BYTES} bytes (JSON escapes such as \\r\\n work), found {v}"
                ));
                None
            }
        }
    };
    check.send = bytes("Send", errors);
    check.expect = bytes("Expect", errors);
    Some(check)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> (Option<HealthCheck>, Vec<String>) {
        let mut errors = Vec::new();
        let v: Value = serde_json::from_str(s).unwrap();
        (parse(&v, "Apps[0].HealthCheck", &mut errors), errors)
    }

    #[test]
    fn fields_and_errors() {
        let (c, e) = parse_str(
            r#"{"Interval":"300ms","Timeout":"0.2s","Rise":1,"Fall":3,"Send":"PING\r\n","Expect":"PONG"}"#,
        );
        assert!(e.is_empty(), "{e:?}");
        let c = c.unwrap();
        assert_eq!(c.interval, Some(Duration::from_millis(300)));
        assert_eq!(c.send.as_deref(), Some(&b"PING\r\n"[..]));
        assert_eq!(parse_str("{}"), (Some(HealthCheck::default()), vec![]));
        let (_, e) = parse_str(
            r#"{"Interval":"1s","Timeout":"2s","Rise":0,"Fall":"3","Send":"","Expect":1,"Port":1}"#,
        );
        let text = e.join("\n");
        for want in [
            "Apps[0].HealthCheck: unknown field `Port`",
            "Apps[0].HealthCheck.Timeout: 2s is longer than the Interval 1s",
            "Apps[0].HealthCheck.Rise: 0 must be",
            "Apps[0].HealthCheck.Fall: \"3\" must be",
            "Apps[0].HealthCheck.Send: must be a non-empty string",
            "Apps[0].HealthCheck.Expect: must be",
        ] {
            assert!(text.contains(want), "{want} in:\n{text}");
        }
        let (_, e) = parse_str(r#"{"Interval":"2"}"#);
        assert!(e[0].contains("is not a duration"), "{e:?}");
        let (_, e) = parse_str("[1]");
        assert!(e[0].contains("must be an object"), "{e:?}");
    }
}

//! Loading and validating `config.json` (Fly's format).
//!
//! Validation is done in one pure pass over the parsed JSON before anything
//! is bound or spawned, so a later hot reload can call `Config::load` and
//! reject a bad file without disturbing the running proxy. Every problem is
//! reported with its field path (`Apps[1].Ports[2]`), the bad value and a fix.

use std::collections::HashMap;
use std::fmt;

use serde_json::Value;

pub mod watch;

/// Largest port range accepted in one entry with one listener per port, so
/// a typo like `"1-65535"` must not silently open 65k sockets.
pub const MAX_RANGE_PORTS: u32 = 1024;

/// With `--steering sk_lookup` a port is a map entry, not a socket: any
/// range is fine.
pub const ANY_RANGE: u32 = 65_535;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub apps: Vec<App>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    pub name: String,
    pub ports: Vec<u16>,
    pub targets: Vec<Target>,
    pub balance: Balance,
    /// Send a PROXY protocol header to targets so they see the real client.
    pub proxy_protocol: Option<ProxyProtocol>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    V1,
    V2,
}

/// An upstream as written in the config. Resolved at connect time, never at
/// load time: targets may move and DNS may be down when we start.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Power of two random choices, pick the one with fewer active connections.
    #[default]
    LeastConn,
    RoundRobin,
    Random,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::LeastConn => "least_conn",
            Balance::RoundRobin => "round_robin",
            Balance::Random => "random",
        }
    }
}

const APP_FIELDS: &[&str] = &["Name", "Ports", "Targets", "Balance", "ProxyProtocol"];

impl Config {
    /// Parses config text; `source` names the file in error messages.
    #[cfg(test)]
    pub fn parse(text: &str, source: &str) -> anyhow::Result<Config> {
        Config::parse_with(text, source, MAX_RANGE_PORTS)
    }

    /// Like `parse`, allowing port ranges of up to `max_range` ports each.
    pub fn parse_with(text: &str, source: &str, max_range: u32) -> anyhow::Result<Config> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "{source}: invalid JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            )
        })?;
        let mut errors = Vec::new();
        let config = validate(&value, &mut errors, max_range);
        if errors.is_empty() {
            if let Some(config) = config {
                return Ok(config);
            }
        }
        let n = errors.len();
        let list = errors
            .iter()
            .map(|e| format!("  {source}: {e}"))
            .collect::<Vec<_>>()
            .join("\n");
        anyhow::bail!(
            "{source}: {n} problem{} in config:\n{list}",
            if n == 1 { "" } else { "s" }
        )
    }

    /// Every (app index, port) pair, in config order.
    pub fn listeners(&self) -> impl Iterator<Item = (usize, u16)> + '_ {
        self.apps
            .iter()
            .enumerate()
            .flat_map(|(i, app)| app.ports.iter().map(move |p| (i, *p)))
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn validate(root: &Value, errors: &mut Vec<String>, max_range: u32) -> Option<Config> {
    let Some(obj) = root.as_object() else {
        errors.push(format!(
            "top level must be an object like {{\"Apps\": [...]}}, found {}",
            type_name(root)
        ));
        return None;
    };
    for key in obj.keys() {
        if key != "Apps" {
            errors.push(format!(
                "unknown top-level field `{key}`; the only field is `Apps` (field names are case-sensitive)"
            ));
        }
    }
    let Some(apps_v) = obj.get("Apps") else {
        errors.push("missing field `Apps`; add \"Apps\": [ {\"Name\": ..., \"Ports\": [...], \"Targets\": [...]} ]".into());
        return None;
    };
    let Some(apps_arr) = apps_v.as_array() else {
        errors.push(format!(
            "Apps: must be an array of apps, found {}",
            type_name(apps_v)
        ));
        return None;
    };
    if apps_arr.is_empty() {
        errors.push("Apps: is empty; add at least one app".into());
    }

    let mut apps = Vec::new();
    // port -> (app name, field path) of its first use, to name both apps on a clash.
    let mut port_owner: HashMap<u16, (String, String)> = HashMap::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, app_v) in apps_arr.iter().enumerate() {
        let at = format!("Apps[{i}]");
        let Some(app_obj) = app_v.as_object() else {
            errors.push(format!(
                "{at}: must be an object, found {}",
                type_name(app_v)
            ));
            continue;
        };
        for key in app_obj.keys() {
            if !APP_FIELDS.contains(&key.as_str()) {
                errors.push(format!(
                    "{at}: unknown field `{key}`; expected one of {} (case-sensitive)",
                    APP_FIELDS.join(", ")
                ));
            }
        }
        let name = match app_obj.get("Name") {
            None => {
                errors.push(format!(
                    "{at}.Name: missing field; add \"Name\": \"my-app\""
                ));
                format!("#{i}")
            }
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(v) => {
                errors.push(format!("{at}.Name: must be a non-empty string, found {v}"));
                format!("#{i}")
            }
        };
        if let Some(prev) = names.insert(name.clone(), i) {
            errors.push(format!(
                "{at}.Name: app name {name:?} is also used by Apps[{prev}]; app names must be unique"
            ));
        }
        let balance = match app_obj.get("Balance") {
            None => Balance::default(),
            Some(Value::String(s)) => match s.as_str() {
                "least_conn" => Balance::LeastConn,
                "round_robin" => Balance::RoundRobin,
                "random" => Balance::Random,
                other => {
                    errors.push(format!(
                        "{at}.Balance: unknown policy {other:?}; use \"least_conn\", \"round_robin\" or \"random\""
                    ));
                    Balance::default()
                }
            },
            Some(v) => {
                errors.push(format!(
                    "{at}.Balance: must be a string (\"least_conn\", \"round_robin\" or \"random\"), found {v}"
                ));
                Balance::default()
            }
        };

        let proxy_protocol = match app_obj.get("ProxyProtocol") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "v1" => Some(ProxyProtocol::V1),
            Some(Value::String(s)) if s == "v2" => Some(ProxyProtocol::V2),
            Some(v) => {
                errors.push(format!(
                    "{at}.ProxyProtocol: {v} is not a PROXY protocol version; use \"v1\" or \"v2\", or leave it out"
                ));
                None
            }
        };

        let mut ports = Vec::new();
        match app_obj.get("Ports") {
            None => errors.push(format!("{at}.Ports: missing field; add \"Ports\": [5000]")),
            Some(Value::Array(list)) => {
                if list.is_empty() {
                    errors.push(format!("{at}.Ports: is empty; list at least one port"));
                }
                for (j, pv) in list.iter().enumerate() {
                    let pat = format!("{at}.Ports[{j}]");
                    match parse_port_entry(pv, max_range) {
                        Ok(range) => {
                            for port in range {
                                if let Some((owner, owner_at)) = port_owner.get(&port) {
                                    if *owner == name {
                                        errors.push(format!(
                                            "{pat}: port {port} is listed twice in app {name:?} (first at {owner_at}); remove one"
                                        ));
                                    } else {
                                        errors.push(format!(
                                            "{pat}: port {port} of app {name:?} is already used by app {owner:?} ({owner_at}); a port can belong to one app only"
                                        ));
                                    }
                                } else {
                                    port_owner.insert(port, (name.clone(), pat.clone()));
                                    ports.push(port);
                                }
                            }
                        }
                        Err(msg) => errors.push(format!("{pat}: {msg}")),
                    }
                }
            }
            Some(v) => errors.push(format!(
                "{at}.Ports: must be an array of ports like [5001, \"6000-6010\"], found {}",
                type_name(v)
            )),
        }

        let mut targets = Vec::new();
        match app_obj.get("Targets") {
            None => errors.push(format!(
                "{at}.Targets: missing field; add \"Targets\": [\"host:port\"]"
            )),
            Some(Value::Array(list)) => {
                if list.is_empty() {
                    errors.push(format!(
                        "{at}.Targets: no targets; list at least one \"host:port\""
                    ));
                }
                for (j, tv) in list.iter().enumerate() {
                    let tat = format!("{at}.Targets[{j}]");
                    match tv {
                        Value::String(s) => match parse_target(s) {
                            Ok(t) => {
                                if targets.contains(&t) {
                                    errors.push(format!(
                                        "{tat}: target {s:?} is listed twice; remove one"
                                    ));
                                } else {
                                    targets.push(t);
                                }
                            }
                            Err(msg) => errors.push(format!("{tat}: {msg}")),
                        },
                        v => {
                            errors.push(format!("{tat}: must be a \"host:port\" string, found {v}"))
                        }
                    }
                }
            }
            Some(v) => errors.push(format!(
                "{at}.Targets: must be an array of \"host:port\" strings, found {}",
                type_name(v)
            )),
        }

        apps.push(App {
            name,
            ports,
            targets,
            balance,
            proxy_protocol,
        });
    }
    Some(Config { apps })
}

/// One `Ports` entry: an integer, a string "N", or a string range "A-B".
fn parse_port_entry(v: &Value, max_range: u32) -> Result<std::ops::RangeInclusive<u16>, String> {
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

fn check_port(n: u64, shown: &str) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(format!(
            "port {shown} is out of range; use a port between 1 and 65535"
        )),
    }
}

/// Parses `host:port` or `[v6addr]:port`.
pub fn parse_target(s: &str) -> Result<Target, String> {
    let fix = "targets must be \"host:port\", e.g. \"127.0.0.1:8080\", \"app.internal:80\" or \"[::1]:80\"";
    if s.trim().is_empty() {
        return Err(format!("target is empty; {fix}"));
    }
    if s.chars().any(char::is_whitespace) {
        return Err(format!("target {s:?} contains whitespace; {fix}"));
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((h, p)) = rest.split_once("]:") else {
            return Err(format!("target {s:?} is malformed; {fix}"));
        };
        (h, p)
    } else {
        let Some((h, p)) = s.rsplit_once(':') else {
            return Err(format!("target {s:?} has no port; {fix}"));
        };
        if h.contains(':') {
            return Err(format!(
                "target {s:?} looks like an IPv6 address without brackets; write \"[addr]:port\""
            ));
        }
        (h, p)
    };
    if host.is_empty() {
        return Err(format!("target {s:?} has an empty host; {fix}"));
    }
    let port: u64 = port
        .parse()
        .map_err(|_| format!("target {s:?} has a bad port {port:?}; {fix}"))?;
    let port = check_port(port, &port.to_string()).map_err(|e| format!("target {s:?}: {e}"))?;
    Ok(Target {
        host: host.to_string(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Config {
        Config::parse(text, "test.json").expect("config should be valid")
    }

    #[test]
    fn parses_fly_example() {
        let c = ok(
            r#"{"Apps":[{"Name":"five-thousand","Ports":[5001,5200],"Targets":["127.0.0.1:15001","bad.target.for.testing:6003"]}]}"#,
        );
        assert_eq!(c.apps.len(), 1);
        let app = &c.apps[0];
        assert_eq!(app.name, "five-thousand");
        assert_eq!(app.ports, vec![5001, 5200]);
        assert_eq!(app.targets[1].host, "bad.target.for.testing");
        assert_eq!(app.targets[1].port, 6003);
        assert_eq!(app.balance, Balance::LeastConn);
    }

    #[test]
    fn parses_repo_config_json() {
        let text = include_str!("../../../config.json");
        let c = Config::parse(text, "config.json").expect("repo config.json is valid");
        assert_eq!(c.apps.len(), 3);
        assert_eq!(c.listeners().count(), 12);
    }

    #[test]
    fn string_ports_ranges_balance_and_v6() {
        let c = ok(
            r#"{"Apps":[{"Name":"a","Ports":["7000","7001-7003",7010],"Targets":["[::1]:80","h:1"],"Balance":"round_robin"}]}"#,
        );
        assert_eq!(c.apps[0].ports, vec![7000, 7001, 7002, 7003, 7010]);
        assert_eq!(c.apps[0].targets[0].host, "::1");
        assert_eq!(c.apps[0].targets[0].to_string(), "[::1]:80");
        assert_eq!(c.apps[0].balance, Balance::RoundRobin);
        assert_eq!(c.apps[0].proxy_protocol, None);
        let c = ok(r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:1"],"ProxyProtocol":"v2"}]}"#);
        assert_eq!(c.apps[0].proxy_protocol, Some(ProxyProtocol::V2));
    }

    #[test]
    fn rejects_each_kind_of_bad_config() {
        // (config text, substrings the error must contain)
        let cases: &[(&str, &[&str])] = &[
            (
                r#"{"Apps": [}"#,
                &["test.json", "invalid JSON", "line 1 column"],
            ),
            (r#"[]"#, &["top level must be an object"]),
            (r#"{}"#, &["missing field `Apps`"]),
            (
                r#"{"Apps":[], "Extra": 1}"#,
                &["unknown top-level field `Extra`", "Apps: is empty"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Targets":["h:1"]}]}"#,
                &["Apps[0].Ports: missing field"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[1]}]}"#,
                &["Apps[0].Targets: missing field"],
            ),
            (
                r#"{"Apps":[{"Ports":[1],"Targets":["h:1"]}]}"#,
                &["Apps[0].Name: missing field"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:1"],"Colour":1}]}"#,
                &["Apps[0]: unknown field `Colour`"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[1,2,70000],"Targets":["h:1"]}]}"#,
                &["Apps[0].Ports[2]", "70000", "between 1 and 65535"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[0],"Targets":["h:1"]}]}"#,
                &["Apps[0].Ports[0]", "port 0 is out of range"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[-5],"Targets":["h:1"]}]}"#,
                &["Apps[0].Ports[0]", "-5"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[1.5],"Targets":["h:1"]}]}"#,
                &["Apps[0].Ports[0]", "whole number"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":["x"],"Targets":["h:1"]}]}"#,
                &["Apps[0].Ports[0]", "\"x\" is not a port"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":["10-2000"],"Targets":["h:1"]}]}"#,
                &["Apps[0].Ports[0]", "1991 ports", "1024"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":["20-10"],"Targets":["h:1"]}]}"#,
                &["backwards"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[],"Targets":["h:1"]}]}"#,
                &["Apps[0].Ports: is empty"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":["h:1"]},{"Name":"b","Ports":[6,5],"Targets":["h:1"]}]}"#,
                &[
                    "Apps[1].Ports[1]",
                    "port 5",
                    "app \"b\"",
                    "app \"a\"",
                    "Apps[0].Ports[0]",
                ],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[5,"4-6"],"Targets":["h:1"]}]}"#,
                &["Apps[0].Ports[1]", "listed twice"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":[]}]}"#,
                &["Apps[0].Targets: no targets"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":[""]}]}"#,
                &["Apps[0].Targets[0]", "empty", "host:port"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":["nohost"]}]}"#,
                &["Apps[0].Targets[0]", "no port"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":[":80"]}]}"#,
                &["empty host"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":["h:99999"]}]}"#,
                &["Apps[0].Targets[0]", "99999"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":["h:http"]}]}"#,
                &["bad port \"http\""],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":["::1:80"]}]}"#,
                &["without brackets"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":[80]}]}"#,
                &["Apps[0].Targets[0]", "must be a \"host:port\" string"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":["h:1"],"Balance":"fastest"}]}"#,
                &["Apps[0].Balance", "fastest"],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":["h:1"],"ProxyProtocol":"v3"}]}"#,
                &["Apps[0].ProxyProtocol", "v3", "\"v1\" or \"v2\""],
            ),
            (
                r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":["h:1"]},{"Name":"a","Ports":[6],"Targets":["h:1"]}]}"#,
                &["Apps[1].Name", "unique"],
            ),
        ];
        for (text, needles) in cases {
            let err = match Config::parse(text, "test.json") {
                Ok(c) => panic!("config {text} should be rejected, got {c:?}"),
                Err(e) => format!("{e:#}"),
            };
            for needle in *needles {
                assert!(
                    err.contains(needle),
                    "error for {text}\n  was: {err}\n  missing: {needle}"
                );
            }
        }
    }

    #[test]
    fn steering_accepts_large_ranges() {
        let text = r#"{"Apps":[{"Name":"a","Ports":["10000-19999"],"Targets":["h:1"]},{"Name":"b","Ports":["1-9999",20000],"Targets":["h:1"]}]}"#;
        let err = format!("{:#}", Config::parse(text, "t.json").unwrap_err());
        assert!(
            err.contains("10000 ports") && err.contains("--steering sk_lookup"),
            "{err}"
        );
        let c = Config::parse_with(text, "t.json", ANY_RANGE).unwrap();
        assert_eq!(c.listeners().count(), 20_000);
        assert!(Config::parse_with(
            r#"{"Apps":[{"Name":"a","Ports":["1-65535"],"Targets":["h:1"]}]}"#,
            "t.json",
            ANY_RANGE
        )
        .is_ok());
    }

    #[test]
    fn reports_all_problems_at_once() {
        let err = Config::parse(
            r#"{"Apps":[{"Name":"a","Ports":[0],"Targets":["x"]}]}"#,
            "f.json",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("2 problems"), "{err}");
    }
}

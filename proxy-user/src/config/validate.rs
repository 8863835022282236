//! The one validation pass over the parsed JSON: every problem is collected
//! with its field path (`Apps[1].Ports[2]`), the bad value and a fix, so a
//! user sees all of them at once.

use std::collections::HashMap;

use serde_json::Value;

use super::{App, Balance, Config, ProxyProtocol, Target};

const APP_FIELDS: &[&str] = &["Name", "Ports", "Targets", "Balance", "ProxyProtocol"];

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

pub(super) fn validate(root: &Value, errors: &mut Vec<String>, max_range: u32) -> Option<Config> {
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

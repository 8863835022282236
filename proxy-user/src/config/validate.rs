//! The one validation pass over the parsed JSON: every problem is collected
//! with its field path (`Apps[1].Ports[2]`), the bad value and a fix, so a
//! user sees all of them at once.

use std::collections::HashMap;

use serde_json::Value;

use super::ports::parse_port_entry;
use super::target::parse_target;
use super::{App, Balance, Config, Context, ProxyProtocol, Target};

const APP_FIELDS: &[&str] = &[
    "Name",
    "Ports",
    "Targets",
    "Balance",
    "ProxyProtocol",
    "HealthCheck",
    "AcceptProxyProtocol",
    "MaxConnectionsPerClient",
];

pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(super) fn validate(root: &Value, errors: &mut Vec<String>, ctx: &Context) -> Option<Config> {
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
                "unknown top-level field `{}`; the only field is `Apps` (field names are case-sensitive)",
                key.escape_debug()
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
    if apps_arr.is_empty() && !ctx.allow_no_apps {
        errors.push("Apps: is empty; add at least one app".into());
    }

    let mut apps = Vec::new();
    // port -> (app name, field path) of its first use, to name both apps on a clash.
    let mut port_owner: HashMap<u16, (String, String)> = HashMap::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    // (field path, app name, target) of every target, for the loop check.
    let mut all_targets: Vec<(String, String, Target)> = Vec::new();
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
                    "{at}: unknown field `{}`; expected one of {} (case-sensitive)",
                    key.escape_debug(),
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
            Some(Value::String(s)) => {
                if let Err(msg) = check_name(s) {
                    errors.push(format!("{at}.Name: {msg}"));
                }
                s.clone()
            }
            Some(v) => {
                errors.push(format!(
                    "{at}.Name: must be a string like \"my-app\", found {v}"
                ));
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

        let health = app_obj
            .get("HealthCheck")
            .and_then(|v| super::health::parse(v, &format!("{at}.HealthCheck"), errors));
        let accept_proxy = app_obj.get("AcceptProxyProtocol").and_then(|v| {
            super::accept::parse_accept(v, &format!("{at}.AcceptProxyProtocol"), errors)
        });
        let max_per_client = app_obj.get("MaxConnectionsPerClient").and_then(|v| {
            super::accept::parse_per_client(v, &format!("{at}.MaxConnectionsPerClient"), errors)
        });

        let mut ports = Vec::new();
        match app_obj.get("Ports") {
            None => errors.push(format!("{at}.Ports: missing field; add \"Ports\": [5000]")),
            Some(Value::Array(list)) => {
                if list.is_empty() {
                    errors.push(format!("{at}.Ports: is empty; list at least one port"));
                }
                for (j, pv) in list.iter().enumerate() {
                    let pat = format!("{at}.Ports[{j}]");
                    match parse_port_entry(pv, ctx.max_range) {
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
                                    all_targets.push((tat, name.clone(), t.clone()));
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
            health,
            accept_proxy,
            max_per_client,
        });
    }
    check_loops(&all_targets, &port_owner, ctx, errors);
    Some(Config { apps })
}

/// Longest app name: a DNS label, as Fly app names are.
const NAME_MAX: usize = 63;

/// App names go into log lines and metric labels: a newline or a quote
/// there splits or forges a line.
fn check_name(name: &str) -> Result<(), String> {
    let allowed = format!("app names may use letters, digits, '.', '_' and '-', 1 to {NAME_MAX} of them, e.g. \"my-app\"");
    if name.is_empty() {
        return Err(format!("app name is empty; {allowed}"));
    }
    if let Some((i, c)) = name
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "app name {name:?} has the character {c:?} (at {}); {allowed}",
            i + 1
        ));
    }
    if name.len() > NAME_MAX {
        return Err(format!(
            "app name {name:?} is {} characters long; {allowed}",
            name.len()
        ));
    }
    Ok(())
}

/// A target that names one of our own listeners by address turns each
/// client into an endless chain of connections through the proxy. Names
/// are not resolved here (targets resolve at connect time); the connect
/// path refuses those that resolve to us.
fn check_loops(
    targets: &[(String, String, Target)],
    port_owner: &HashMap<u16, (String, String)>,
    ctx: &Context,
    errors: &mut Vec<String>,
) {
    for (at, app, target) in targets {
        let owner = match port_owner.get(&target.port) {
            Some((name, pat)) => format!("port {} of app {name:?} at {pat}", target.port),
            None if ctx.extra_ports.contains(&target.port) => {
                format!("--steering-port {}", target.port)
            }
            None => continue,
        };
        let ips = target.fixed_ips();
        if ips.iter().any(|ip| ctx.listen.reaches_us(*ip)) {
            errors.push(format!(
                "{at}: target \"{target}\" of app {app:?} is this proxy itself (--listen-address {}, {owner}), so every connection would loop back into the proxy; point the target at the backend, not at the proxy",
                ctx.listen.ip()
            ));
        }
    }
}

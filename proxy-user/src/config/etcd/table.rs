//! The keys under the prefix to the config text in Fly's format.
//!
//! One key per app (`<prefix>apps/<name>`, the app's JSON object) and one
//! per leased target (`<prefix>targets/<app>/<id>`, `"host:port"`). Per-app
//! keys rather than one key holding the whole table: writers of different
//! apps never race on one document (no read-modify-write), a change is a
//! watch event the size of one app rather than of the whole table, the
//! table is not capped by etcd's request size (1.5 MiB), and a target can
//! carry its own lease, so its death removes exactly that target. Writers
//! that need several apps to change at once put them in one transaction:
//! its events share one revision and are applied together.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::config::target::parse_target;
use crate::config::validate::type_name;
use crate::config::Target;

/// The config of one revision, ready for the same validation a file gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// `{"Apps":[...]}`, apps in key order.
    pub text: String,
    /// The key each `Apps[i]` came from, so errors can name it.
    pub keys: Vec<String>,
    /// Apps left out for having no target at all (none written, no lease
    /// alive): an app whose every target died is not served rather than
    /// blocking every other change.
    pub empty: Vec<String>,
    /// Leased targets left out, each a message naming its key and the
    /// fix. A registration is written by a backend, not by whoever owns
    /// the table: one that cannot be served (a malformed value or key) is
    /// left out rather than rejecting the table, which would freeze every
    /// app on every proxy until the lease ran out.
    pub skipped: Vec<String>,
}

/// Builds the table from every key under `prefix` (key -> value bytes).
/// Errors name the key and the fix; keys of other shapes are ignored.
pub fn assemble(prefix: &str, kvs: &BTreeMap<String, Vec<u8>>) -> Result<Table, String> {
    let apps_at = format!("{prefix}apps/");
    let targets_at = format!("{prefix}targets/");
    let mut leased: BTreeMap<&str, Vec<(&str, Target)>> = BTreeMap::new();
    let mut skipped = Vec::new();
    for (key, value) in kvs.range(targets_at.clone()..) {
        let Some(rest) = key.strip_prefix(&targets_at) else {
            break;
        };
        let Some((app, _id)) = rest.split_once('/') else {
            skipped.push(format!(
                "etcd key {key}: a leased target's key is {targets_at}<app>/<id>; left out until it is"
            ));
            continue;
        };
        let Ok(target) = std::str::from_utf8(value) else {
            skipped.push(format!(
                "etcd key {key}: value is not UTF-8; write the target as \"host:port\"; left out until it is"
            ));
            continue;
        };
        let target = target.trim();
        let parsed = match parse_target(target) {
            Err(e) => {
                skipped.push(format!(
                    "etcd key {key}: {e}; left out until it is rewritten"
                ));
                continue;
            }
            // A bind address, not one to connect to (a backend that
            // registered what it listens on): Linux connects it to the
            // proxy's own loopback, and on one of the proxy's ports
            // validation refuses it as a loop, which rejected the table.
            Ok(t) if t.fixed_ips().iter().any(|ip| ip.is_unspecified()) => {
                skipped.push(format!(
                    "etcd key {key}: {target:?} is a bind address; register the address the proxies reach the backend at"
                ));
                continue;
            }
            Ok(t) => t,
        };
        leased.entry(app).or_default().push((target, parsed));
    }
    let mut apps = Vec::new();
    let mut keys = Vec::new();
    let mut empty = Vec::new();
    for (key, value) in kvs.range(apps_at.clone()..) {
        let Some(name) = key.strip_prefix(&apps_at) else {
            break;
        };
        let mut app: Value = serde_json::from_slice(value).map_err(|e| {
            format!("etcd key {key}: invalid JSON ({e}); write one app object like {{\"Ports\":[8080],\"Targets\":[\"10.0.0.1:80\"]}}")
        })?;
        let Some(obj) = app.as_object_mut() else {
            return Err(format!(
                "etcd key {key}: must be one app object {{\"Ports\":[...],\"Targets\":[...]}}, found {}",
                type_name(&app)
            ));
        };
        name_from_key(obj, name, key)?;
        if let Some(extra) = leased.remove(name) {
            // Another type is left as written: validation reports it.
            if let Value::Array(list) = obj
                .entry("Targets")
                .or_insert_with(|| Value::Array(Vec::new()))
            {
                merge_leased(list, extra);
            }
        }
        let no_targets = match obj.get("Targets") {
            None => true,
            Some(Value::Array(list)) => list.is_empty(),
            Some(_) => false,
        };
        if no_targets {
            empty.push(name.to_string());
            continue;
        }
        apps.push(app);
        keys.push(key.clone());
    }
    let text = serde_json::json!({ "Apps": apps }).to_string();
    Ok(Table {
        text,
        keys,
        empty,
        skipped,
    })
}

/// Adds an app's leased targets (as written, and as parsed when they were
/// read) to its list, each at most once. A target listed and leased, or leased twice, is
/// normal: a backend that restarts registers under a new lease while its
/// old one still runs out. Validation refuses a target listed twice, so a
/// repeat here would reject the whole table.
fn merge_leased(list: &mut Vec<Value>, leased: Vec<(&str, Target)>) {
    let mut have: Vec<_> = (list.iter())
        .filter_map(|v| parse_target(v.as_str()?).ok())
        .collect();
    for (target, parsed) in leased {
        if !have.contains(&parsed) {
            have.push(parsed);
            list.push(Value::String(target.to_string()));
        }
    }
}

/// The key names the app: `Name` may be left out, but must not disagree.
fn name_from_key(obj: &mut Map<String, Value>, name: &str, key: &str) -> Result<(), String> {
    match obj.get("Name") {
        None => {
            obj.insert("Name".into(), Value::String(name.to_string()));
            Ok(())
        }
        Some(Value::String(n)) if n == name => Ok(()),
        Some(other) => Err(format!(
            "etcd key {key}: Name {other} differs from the key's app name {name:?}; drop Name or make them equal"
        )),
    }
}

/// Appends which key each app named in `error` came from.
pub fn name_keys(error: &str, keys: &[String]) -> String {
    let mut out = error.to_string();
    let named: Vec<String> = keys
        .iter()
        .enumerate()
        .filter(|(i, _)| error.contains(&format!("Apps[{i}]")))
        .map(|(i, k)| format!("Apps[{i}] is etcd key {k}"))
        .collect();
    if !named.is_empty() {
        out.push_str(&format!("\n  ({})", named.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvs(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn apps_in_key_order_with_leased_targets_merged() {
        let t = assemble(
            "/p/",
            &kvs(&[
                ("/p/apps/b", r#"{"Ports":[2],"Targets":["h:2"]}"#),
                ("/p/apps/a", r#"{"Name":"a","Ports":[1]}"#),
                ("/p/targets/a/x1", "h:10"),
                ("/p/targets/b/x2", " h:20\n"),
                ("/p/targets/gone/x3", "h:30"),
                ("/p/other", "ignored"),
                ("/q/apps/c", "not ours"),
            ]),
        )
        .unwrap();
        assert_eq!(
            t.text,
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:10"]},{"Name":"b","Ports":[2],"Targets":["h:2","h:20"]}]}"#
        );
        assert_eq!(t.keys, ["/p/apps/a", "/p/apps/b"]);
        assert!(t.empty.is_empty());
    }

    #[test]
    fn an_app_without_any_target_is_left_out() {
        let t = assemble(
            "/p/",
            &kvs(&[
                ("/p/apps/a", r#"{"Ports":[1]}"#),
                ("/p/apps/b", r#"{"Ports":[2],"Targets":["h:1"]}"#),
            ]),
        )
        .unwrap();
        assert_eq!(t.empty, ["a"]);
        assert_eq!(t.keys, ["/p/apps/b"]);
    }

    #[test]
    fn bad_values_name_the_key() {
        let table = [
            (r#"{"Ports":"#, "etcd key /p/apps/a: invalid JSON"),
            ("[1]", "etcd key /p/apps/a: must be one app object"),
            (
                r#"{"Name":"b","Ports":[1],"Targets":["h:1"]}"#,
                "differs from the key's app name",
            ),
        ];
        for (value, want) in table {
            let e = assemble("/p/", &kvs(&[("/p/apps/a", value)])).unwrap_err();
            assert!(e.starts_with(want) || e.contains(want), "{value}: {e}");
        }
    }

    /// Registrations are the backends', not the table owner's: a bad one
    /// is left out (and said), a repeated one served once, and neither
    /// rejects the table (which froze every app until the lease ran out).
    #[test]
    fn leases_never_reject_the_table() {
        let t = assemble(
            "/p/",
            &kvs(&[
                ("/p/apps/a", r#"{"Ports":[1],"Targets":["h:1"]}"#),
                ("/p/apps/b", r#"{"Ports":[2]}"#),
                ("/p/targets/a", "h:9"),
                ("/p/targets/a/dup-of-static", "h:1"),
                ("/p/targets/a/no-port", "10.0.0.1"),
                ("/p/targets/a/bind-address", "0.0.0.0:80"),
                ("/p/targets/a/bind-address-v6", "[::]:80"),
                ("/p/targets/b/old-lease", "h:2"),
                ("/p/targets/b/new-lease", " h:2 "),
                ("/p/targets/b/other", "h:3"),
            ]),
        )
        .unwrap();
        assert_eq!(
            t.text,
            r#"{"Apps":[{"Name":"a","Ports":[1],"Targets":["h:1"]},{"Name":"b","Ports":[2],"Targets":["h:2","h:3"]}]}"#
        );
        assert_eq!(t.skipped.len(), 4, "{:?}", t.skipped);
        assert!(t.skipped[0].contains("/p/targets/a:") && t.skipped[0].contains("<app>/<id>"));
        let said =
            |key: &str, why: &str| t.skipped.iter().any(|s| s.contains(key) && s.contains(why));
        assert!(said("/p/targets/a/no-port", "no port"), "{:?}", t.skipped);
        assert!(
            said("/p/targets/a/bind-address:", "bind address"),
            "{:?}",
            t.skipped
        );
        assert!(
            said("/p/targets/a/bind-address-v6", "bind address"),
            "{:?}",
            t.skipped
        );
    }

    #[test]
    fn errors_say_which_key_an_app_came_from() {
        let keys = vec!["/p/apps/a".to_string(), "/p/apps/b".to_string()];
        let e = name_keys("x: Apps[1].Ports[0]: bad", &keys);
        assert!(e.ends_with("(Apps[1] is etcd key /p/apps/b)"), "{e}");
        assert_eq!(name_keys("no app", &keys), "no app");
    }
}

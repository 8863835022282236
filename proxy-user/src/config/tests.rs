//! Config parsing and validation, one case per kind of mistake.
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
            &[
                "test.json",
                "invalid JSON at line 1 column 11: expected value; fix the syntax",
            ],
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
        // Duplicate keys: serde_json alone keeps the last one silently.
        (
            r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":["h:1"]}],"Apps":[]}"#,
            &["top level: field `Apps` appears twice", "keep one"],
        ),
        (
            r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":["h:1"]},{"Name":"b","Ports":[6],"Targets":["h:1"],"Targets":["h:2"]}]}"#,
            &["Apps[1]: field `Targets` appears twice"],
        ),
        // App names: what goes into every log line and metric label.
        (
            "{\"Apps\":[{\"Name\":\"a\\nb\",\"Ports\":[5],\"Targets\":[\"h:1\"]}]}",
            &[
                "Apps[0].Name",
                "\"a\\nb\"",
                "character '\\n' (at 2)",
                "letters, digits, '.', '_' and '-'",
            ],
        ),
        (
            r#"{"Apps":[{"Name":"my \"app\"","Ports":[5],"Targets":["h:1"]}]}"#,
            &["Apps[0].Name", "character ' ' (at 3)"],
        ),
        (
            r#"{"Apps":[{"Name":"","Ports":[5],"Targets":["h:1"]}]}"#,
            &["Apps[0].Name", "app name is empty"],
        ),
        (
            r#"{"Apps":[{"Name":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","Ports":[5],"Targets":["h:1"]}]}"#,
            &["Apps[0].Name", "64 characters long", "1 to 63"],
        ),
        (
            r#"{"Apps":[{"Name":5,"Ports":[5],"Targets":["h:1"]}]}"#,
            &["Apps[0].Name", "must be a string"],
        ),
        // Targets: a URL, and characters no host name has.
        (
            r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":["http://127.0.0.1:80/x"]}]}"#,
            &[
                "Apps[0].Targets[0]",
                "has a scheme (http://)",
                "without a scheme",
                "write \"127.0.0.1:80\"",
            ],
        ),
        (
            r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":["tcp://backend"]}]}"#,
            &["without a scheme", "\"backend\" with its port"],
        ),
        (
            r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":["a\"b:80"]}]}"#,
            &["Apps[0].Targets[0]", "character '\"' in its host"],
        ),
        (
            r#"{"Apps":[{"Name":"a","Ports":[5],"Targets":["[backend]:80"]}]}"#,
            &["Apps[0].Targets[0]", "brackets are for IPv6"],
        ),
        // Self-loops: a target that is one of our listeners (0.0.0.0 here).
        (
            r#"{"Apps":[{"Name":"a","Ports":[5000],"Targets":["127.0.0.1:5000"]}]}"#,
            &[
                "Apps[0].Targets[0]",
                "target \"127.0.0.1:5000\" of app \"a\" is this proxy itself",
                "port 5000 of app \"a\" at Apps[0].Ports[0]",
                "loop",
            ],
        ),
        (
            r#"{"Apps":[{"Name":"a","Ports":[5000],"Targets":["h:1"]},{"Name":"b","Ports":[6000],"Targets":["h:1","localhost:5000"]}]}"#,
            &["Apps[1].Targets[1]", "app \"b\"", "port 5000 of app \"a\""],
        ),
        (
            r#"{"Apps":[{"Name":"a","Ports":["4990-5010"],"Targets":["[::ffff:127.0.0.2]:5005"]}]}"#,
            &[
                "Apps[0].Targets[0]",
                "Apps[0].Ports[0]",
                "this proxy itself",
            ],
        ),
        (
            r#"{"Apps":[{"Name":"a","Ports":[5000],"Targets":["0.0.0.0:5000"]}]}"#,
            &["Apps[0].Targets[0]", "this proxy itself"],
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
    let steering = Context {
        max_range: ANY_RANGE,
        ..Context::default()
    };
    let c = Config::parse_with(text, "t.json", &steering).unwrap();
    assert_eq!(c.listeners().count(), 20_000);
    assert!(Config::parse_with(
        r#"{"Apps":[{"Name":"a","Ports":["1-65535"],"Targets":["h:1"]}]}"#,
        "t.json",
        &steering
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

#[test]
fn no_apps_is_an_error_unless_allowed() {
    let err = format!(
        "{:#}",
        Config::parse(r#"{"Apps":[]}"#, "f.json").unwrap_err()
    );
    assert!(err.contains("Apps: is empty"), "{err}");
    let etcd = Context {
        allow_no_apps: true,
        ..Context::default()
    };
    let c = Config::parse_with(r#"{"Apps":[]}"#, "etcd", &etcd).unwrap();
    assert!(c.apps.is_empty());
}

/// Which targets are the proxy itself depends on where it listens.
#[test]
fn self_loops_follow_the_listen_address() {
    let on = |ip: &str, host: &[&str], extra: &[u16]| Context {
        listen: Listen::new(
            ip.parse().unwrap(),
            host.iter().map(|h| h.parse().unwrap()).collect(),
        ),
        extra_ports: extra.to_vec(),
        ..Context::default()
    };
    let app = |target: &str| {
        format!(r#"{{"Apps":[{{"Name":"a","Ports":[5000],"Targets":["{target}"]}}]}}"#)
    };
    // (target, context, is a loop)
    let cases = [
        ("127.0.0.1:5000", on("127.0.0.1", &[], &[]), true),
        ("127.0.0.2:5000", on("127.0.0.1", &[], &[]), false),
        ("127.0.0.1:5001", on("0.0.0.0", &[], &[]), false),
        ("[::1]:5000", on("0.0.0.0", &[], &[]), false),
        ("[::1]:5000", on("::", &[], &[]), true),
        ("10.1.2.3:5000", on("0.0.0.0", &["10.1.2.3"], &[]), true),
        ("10.1.2.3:5000", on("127.0.0.1", &["10.1.2.3"], &[]), false),
        ("10.1.2.3:5000", on("10.1.2.3", &[], &[]), true),
        ("LOCALHOST.:5000", on("::1", &[], &[]), true),
        ("localhost:5000", on("10.1.2.3", &[], &[]), false),
        // Names are resolved at connect time, where the guard checks them.
        ("backend:5000", on("0.0.0.0", &[], &[]), false),
        ("127.0.0.1:7000", on("0.0.0.0", &[], &[7000]), true),
    ];
    for (target, ctx, looped) in cases {
        let got = Config::parse_with(&app(target), "t.json", &ctx);
        match (got, looped) {
            (Ok(_), false) => {}
            (Err(e), true) => {
                let e = format!("{e:#}");
                assert!(e.contains("is this proxy itself"), "{target}: {e}");
                if ctx.extra_ports.contains(&7000) {
                    assert!(e.contains("--steering-port 7000"), "{e}");
                }
            }
            (got, _) => panic!("{target} on {:?}: {got:?}", ctx.listen),
        }
    }
}

#[test]
fn duplicate_keys_are_reported_with_other_problems() {
    let err = format!(
        "{:#}",
        Config::parse(
            r#"{"Apps":[{"Name":"a","Name":"b","Ports":[0],"Targets":["h:1"]}]}"#,
            "f.json"
        )
        .unwrap_err()
    );
    assert!(err.contains("2 problems"), "{err}");
    assert!(
        err.contains("f.json: Apps[0]: field `Name` appears twice"),
        "{err}"
    );
    assert!(err.contains("Apps[0].Ports[0]"), "{err}");
}

use super::*;

const GOOD: &str = r#"
[runtime]
threads = 2
shutdown_grace = "5s"

[timeouts]
connect = "500ms"
client_idle = "2m"

[access_log]
format = "json"

[[listeners]]
name = "web"
bind = "127.0.0.1:8080"
trusted_proxies = ["10.0.0.0/8", "::1"]

[[listeners.routes]]
host = "Shop.Example:8080"
pool = "shop"

[[listeners.routes]]
path_prefix = "/api"
pool = "api"

[pools.shop]
algorithm = "least_conn"
backends = [
  { name = "app-1", address = "127.0.0.1:9001", weight = 3 },
  { name = "app-2", address = "127.0.0.1:9002", state = "draining" },
]

[pools.api]
backends = [{ address = "127.0.0.1:9101" }]
"#;

fn errors(src: &str) -> Vec<String> {
    match parse(src, "t.toml") {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.to_string().lines().map(str::to_string).collect(),
    }
}

#[test]
fn resolves_a_full_config() {
    let c = parse(GOOD, "t.toml").unwrap();
    assert_eq!(c.threads, 2);
    assert_eq!(c.shutdown_grace, Duration::from_secs(5));
    assert_eq!(c.timeouts.connect, Duration::from_millis(500));
    assert_eq!(c.timeouts.client_idle, Duration::from_secs(120));
    assert_eq!(c.timeouts.backend_response, Timeouts::default().backend_response);
    assert_eq!(c.access_log.format, LogFormat::Json);
    let names: Vec<&str> = c.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["api", "shop"]);
    let shop = &c.pools[1];
    assert_eq!(shop.algorithm, Algorithm::LeastConn);
    assert_eq!(shop.backends[0].weight, 3);
    assert_eq!(shop.backends[1].state, AdminState::Draining);
    // A backend without a name is named by its address.
    assert_eq!(c.pools[0].backends[0].name, "127.0.0.1:9101");
    let l = &c.listeners[0];
    assert_eq!(l.routes[0].host.as_deref(), Some("shop.example"));
    assert_eq!(l.routes[0].to, crate::config::RouteTo::Pool(1));
    assert_eq!(l.routes[1].path_prefix, "/api");
    assert!(l.trusted_proxies[0].contains("10.1.2.3".parse().unwrap()));
    assert!(!l.trusted_proxies[0].contains("11.1.2.3".parse().unwrap()));
    assert!(l.trusted_proxies[1].contains("::1".parse().unwrap()));
}

#[test]
fn address_without_port_is_located() {
    let src = "[[listeners]]\nbind = \"127.0.0.1:8080\"\npool = \"shop\"\n\n[pools.shop]\nbackends = [\n  { name = \"app-2\", address = \"10.0.0.2\" },\n]\n";
    assert_eq!(
        errors(src),
        ["t.toml:7:31: pool \"shop\": backend \"app-2\": address \"10.0.0.2\" has no port: expected host:port like 10.0.0.2:8080"]
    );
}

#[test]
fn unknown_keys_are_errors_with_location() {
    let src = "[[listeners]]\nbind = \"127.0.0.1:8080\"\npool = \"shop\"\nbindd = 3\n\n[pools.shop]\nbackends = [{ address = \"127.0.0.1:1\" }]\n";
    let e = errors(src);
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("t.toml:4:1: "), "{e:?}");
    assert!(e[0].contains("unknown field `bindd`"), "{e:?}");
}

#[test]
fn state_dir_is_optional_and_never_empty() {
    assert_eq!(parse(GOOD, "t.toml").unwrap().state_dir, None);
    let with = GOOD.replace("threads = 2\n", "threads = 2\nstate_dir = \"/var/lib/tether\"\n");
    assert_eq!(parse(&with, "t.toml").unwrap().state_dir, Some(std::path::PathBuf::from("/var/lib/tether")));
    let empty = GOOD.replace("threads = 2\n", "threads = 2\nstate_dir = \"\"\n");
    let e = errors(&empty);
    assert!(e[0].starts_with("t.toml:4:13: runtime.state_dir: must not be empty"), "{e:?}");
}

#[test]
fn type_errors_name_the_key() {
    let src = "[runtime]\nthreads = \"two\"\n";
    let e = errors(src);
    assert!(e[0].starts_with("t.toml:2:11: key `threads`"), "{e:?}");
}

#[test]
fn every_semantic_error_is_reported_at_once() {
    let src = r#"[timeouts]
connect = "3 parsecs"

[[listeners]]
bind = "localhost"
pool = "nope"

[pools.shop]
algorithm = "fastest"
backends = [
  { name = "a", address = "127.0.0.1:1", weight = 0 },
  { name = "a", address = "127.0.0.1:2" },
  { name = "b", address = "127.0.0.1:99999" },
  { name = "c", address = "127.0.0.1:3", state = "sleeping" },
]
"#;
    let e = errors(src);
    let expect = [
        "t.toml:2:11: timeouts.connect: \"3 parsecs\" is not a duration",
        "t.toml:9:13: pool \"shop\": algorithm \"fastest\" is not known",
        "t.toml:11:51: pool \"shop\": backend \"a\": weight 0 is out of range: expected 1 to 1000",
        "t.toml:12:3: pool \"shop\": backend \"a\": the name is used twice",
        "t.toml:13:27: pool \"shop\": backend \"b\": address \"127.0.0.1:99999\" has a bad port",
        "t.toml:14:50: pool \"shop\": backend \"c\": state \"sleeping\" is not known",
        "t.toml:5:8: listener \"listener-1\": bind \"localhost\" is not an IP address and port",
        "t.toml:6:8: listener \"listener-1\": pool \"nope\" is not defined (pools: \"shop\")",
    ];
    assert_eq!(e.len(), expect.len(), "{e:#?}");
    for (got, want) in e.iter().zip(expect) {
        assert!(got.starts_with(want), "got {got:?}\nwant {want:?}");
    }
}

#[test]
fn empty_config_says_what_is_missing() {
    let e = errors("");
    assert!(e.iter().any(|l| l.contains("no pools")));
    assert!(e.iter().any(|l| l.contains("no listeners")));
}

#[test]
fn durations() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43200)));
    assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
    for bad in ["", "5", "ms", "1.5s", "-1s", "5 weeks"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}

const STICKY: &str = r#"[[listeners]]
bind = "127.0.0.1:8080"
pool = "shop"

[pools.shop]
backends = [{ name = "a", address = "127.0.0.1:1" }]

[pools.shop.affinity]
keys = ["cookie", "app_cookie:JSESSIONID", "header:X-User", "query:sid", "client_ip"]
mapping = "hash"
on_unavailable = "strict"
max_sessions_factor = 1.25
drain_timeout = "10m"
ipv4_prefix = 24

[pools.shop.affinity.cookie]
name = "srv"
idle_timeout = "20m"
absolute_timeout = "none"
same_site = "strict"
max_age = "1h"
keys = ["AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="]

[pools.shop.affinity.table]
capacity = 5000
idle_timeout = "5m"
"#;

#[test]
fn resolves_affinity() {
    let c = parse(STICKY, "t.toml").unwrap();
    let a = c.pools[0].affinity.as_ref().unwrap();
    assert_eq!(
        a.keys,
        [
            KeySource::Cookie,
            KeySource::AppCookie("JSESSIONID".into()),
            KeySource::Header("x-user".into()),
            KeySource::Query("sid".into()),
            KeySource::ClientIp
        ]
    );
    assert_eq!(a.mapping, Mapping::Hash);
    assert_eq!(a.on_unavailable, OnUnavailable::Strict);
    assert_eq!(a.max_sessions_factor, Some(1.25));
    assert_eq!(a.drain_timeout, Some(Duration::from_secs(600)));
    assert_eq!((a.ipv4_prefix, a.ipv6_prefix), (24, 64));
    assert_eq!(a.repin_header, "tether-session-repinned");
    assert_eq!(a.cookie.name, "srv");
    assert_eq!(a.cookie.idle_timeout, Duration::from_secs(1200));
    assert_eq!(a.cookie.absolute_timeout, None);
    assert_eq!(a.cookie.max_age, Some(Duration::from_secs(3600)));
    assert_eq!(a.cookie.same_site, SameSite::Strict);
    assert_eq!(a.table, TableConfig { capacity: 5000, idle_timeout: Duration::from_secs(300) });
}

#[test]
fn affinity_errors_are_located() {
    let bad = STICKY
        .replace("\"client_ip\"]", "\"client_ip\", \"ip_hash\"]")
        .replace("max_sessions_factor = 1.25", "max_sessions_factor = 0.5")
        .replace("AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=", "c2hvcnQ=");
    let e = errors(&bad);
    assert!(
        e.iter().any(|l| l.starts_with("t.toml:9:87: pool \"shop\": affinity: key \"ip_hash\" is not known")),
        "{e:#?}"
    );
    assert!(
        e.iter()
            .any(|l| l
                .starts_with("t.toml:12:23: pool \"shop\": affinity: max_sessions_factor 0.5 must be at least 1.0")),
        "{e:#?}"
    );
    assert!(e.iter().any(|l| l.starts_with("t.toml:22:9: pool \"shop\": affinity: cookie.keys[0]:")), "{e:#?}");
    let no_cookie_key = STICKY.replace("keys = [\"cookie\", ", "keys = [");
    let e = errors(&no_cookie_key);
    assert!(e.iter().any(|l| l.contains("a [cookie] section is set but \"cookie\" is not among the keys")), "{e:#?}");
}

#[test]
fn minimal_affinity_is_the_default() {
    // `keys` is the one key an affinity table must have.
    let src = "[[listeners]]\nbind = \"127.0.0.1:8080\"\npool = \"x\"\n\n[pools.x]\nbackends = [{ address = \"127.0.0.1:1\" }]\n\n[pools.x.affinity]\nkeys = [\"cookie\"]\n";
    let c = parse(src, "t.toml").unwrap();
    assert_eq!(c.pools[0].affinity, Some(Affinity::default()));
    let with_sections = format!("{src}\n[pools.x.affinity.cookie]\n\n[pools.x.affinity.table]\n");
    let c = parse(&with_sections, "t.toml").unwrap();
    assert_eq!(c.pools[0].affinity, Some(Affinity::default()));
}

#[test]
fn affinity_without_keys_is_an_error() {
    let src = "[[listeners]]\nbind = \"127.0.0.1:8080\"\npool = \"x\"\n\n[pools.x]\nbackends = [{ address = \"127.0.0.1:1\" }]\n\n[pools.x.affinity]\n";
    let e = errors(src);
    assert!(e[0].contains("missing field `keys`"), "{e:?}");
}

#[test]
fn range_and_choice_messages_keep_their_wording() {
    let src = format!(
        "[runtime]\nthreads = 0\n\n[access_log]\nformat = \"xml\"\n\n{}retry_budget = 1.5\n\n[pools.shop.affinity]\nkeys = [\"cookie\"]\nmapping = \"Hash\"\n\n[pools.shop.affinity.cookie]\nsame_site = \"sideways\"\n",
        &STICKY[..STICKY.find("\n[pools.shop.affinity]").unwrap() + 1]
    );
    assert_eq!(
        errors(&src),
        [
            "t.toml:2:11: runtime.threads: 0 is out of range: expected 1 to 1024",
            "t.toml:5:10: access_log.format: \"xml\" is not a format: expected \"text\", \"json\" or \"off\"",
            "t.toml:18:11: pool \"shop\": affinity: mapping \"Hash\" is not known: expected \"table\" or \"hash\"",
            "t.toml:21:13: pool \"shop\": affinity: cookie.same_site \"sideways\" is not known: expected \"Lax\", \"Strict\" or \"None\"",
            // Pool-level numbers are checked after the affinity section.
            "t.toml:14:16: pool \"shop\": retry_budget 1.5 is out of range: expected 0.0 to 1.0",
        ]
    );
    // SameSite is read ignoring case; the other choices are not.
    let ok = STICKY.replace("same_site = \"strict\"", "same_site = \"NONE\"");
    let c = parse(&ok, "t.toml").unwrap();
    assert_eq!(c.pools[0].affinity.as_ref().unwrap().cookie.same_site, SameSite::None);
}

#[test]
fn limits_and_upgrades_have_defaults_and_ranges() {
    let base = "[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[pools.p]\nbackends = [{ name = \"a\", address = \"127.0.0.1:1\" }]\n";
    let c = parse(base, "t.toml").unwrap();
    assert_eq!(c.limits, Limits::default());
    assert_eq!(c.pools[0].upgrades, ["websocket"]);
    let src = format!(
        "[limits]\nmax_client_connections = 500\nmax_connections_per_ip = 20\nh2_max_concurrent_streams = 64\nmax_request_head = 16384\nmax_request_target = 2048\nmax_request_body = 0\n{}upgrades = [\"WebSocket\", \"h2c\"]\n",
        base
    );
    let c = parse(&src, "t.toml").unwrap();
    assert_eq!(
        c.limits,
        Limits {
            max_client_connections: 500,
            max_connections_per_ip: Some(20),
            h2_max_concurrent_streams: 64,
            max_request_head: 16384,
            max_request_target: 2048,
            max_request_body: Some(0),
        }
    );
    assert_eq!(c.pools[0].upgrades, ["websocket", "h2c"]);
    let e =
        parse(&format!("[limits]\nh2_max_concurrent_streams = 0\n{base}upgrades = [\"a b\"]\n"), "t.toml").unwrap_err();
    let e = e.to_string();
    assert!(e.contains("limits.h2_max_concurrent_streams: 0 is out of range: expected 1 to 10000"), "{e}");
    assert!(e.contains("pool \"p\": upgrades: \"a b\" is not a protocol token"), "{e}");
    // The request size limits: each bad value is reported at its line.
    let e = parse(
        &format!("[limits]\nmax_request_head = 100\nmax_request_target = 70000\nmax_request_body = -1\n{base}"),
        "t.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("t.toml:2:20: limits.max_request_head: 100 is out of range: expected 1024 to 1048576"), "{e}");
    assert!(e.contains("t.toml:3:22: limits.max_request_target: 70000 is out of range: expected 64 to 65534"), "{e}");
    assert!(
        e.contains("t.toml:4:20: limits.max_request_body: -1 is out of range: expected 0 to 9223372036854775807"),
        "{e}"
    );
}

/// A pool with Tether's cookie whose `[cookie]` section is `cookie`.
fn with_cookie(cookie: &str) -> String {
    format!(
        "[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[pools.p]\nbackends = [{{ name = \"a\", address = \"127.0.0.1:1\" }}]\n[pools.p.affinity]\nkeys = [\"cookie\"]\n[pools.p.affinity.cookie]\n{cookie}"
    )
}

const KEY_1: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
const KEY_2: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

#[test]
fn cookie_keys_come_from_a_file_or_the_environment() {
    let dir = std::env::temp_dir().join(format!("tether-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys");
    std::fs::write(&file, format!("{KEY_1}\n{KEY_2}\n")).unwrap();
    let c = parse(&with_cookie(&format!("keys_file = \"{}\"\n", file.display())), "t.toml").unwrap();
    let keys: Vec<&str> = c.pools[0].affinity.as_ref().unwrap().cookie.keys.iter().map(|k| &**k).collect();
    assert_eq!(keys, [KEY_1, KEY_2]);

    std::env::set_var("TETHER_TEST_COOKIE_KEYS", format!("{KEY_2}, {KEY_1}"));
    let c = parse(&with_cookie("keys_env = \"TETHER_TEST_COOKIE_KEYS\"\n"), "t.toml").unwrap();
    let keys: Vec<&str> = c.pools[0].affinity.as_ref().unwrap().cookie.keys.iter().map(|k| &**k).collect();
    assert_eq!(keys, [KEY_2, KEY_1]);

    // A bad key is named by its place, never shown.
    std::fs::write(&file, format!("{KEY_1}\nnot-a-key-but-a-secret\n")).unwrap();
    let e = parse(&with_cookie(&format!("keys_file = \"{}\"\n", file.display())), "t.toml").unwrap_err().to_string();
    assert!(e.contains("key 2:") && !e.contains("not-a-key-but-a-secret"), "{e}");
    let e = parse(&with_cookie("keys_env = \"TETHER_TEST_NO_SUCH_VARIABLE\"\n"), "t.toml").unwrap_err().to_string();
    assert!(e.contains("the environment variable TETHER_TEST_NO_SUCH_VARIABLE is not set"), "{e}");
    let e =
        parse(&with_cookie(&format!("keys = [\"{KEY_1}\"]\nkeys_env = \"X\"\n")), "t.toml").unwrap_err().to_string();
    assert!(e.contains("set only one of keys, keys_file and keys_env"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn secrets_stay_out_of_debug_output() {
    let c = parse(&with_cookie(&format!("keys = [\"{KEY_1}\"]\nclock_skew = \"2m\"\n")), "t.toml").unwrap();
    let cookie = &c.pools[0].affinity.as_ref().unwrap().cookie;
    assert_eq!(cookie.clock_skew, Duration::from_secs(120));
    let shown = format!("{c:?}");
    assert!(!shown.contains(KEY_1) && shown.contains("Secret(..)"), "{shown}");
}

#[test]
fn cookie_token_version_is_1_by_default_or_2() {
    let version = |cookie: &str| parse(&with_cookie(cookie), "t.toml").unwrap().pools[0].affinity.clone().unwrap();
    assert_eq!(version("").cookie.token_version, TokenVersion::V1);
    assert_eq!(version("token_version = 1\n").cookie.token_version, TokenVersion::V1);
    assert_eq!(version("token_version = 2\n").cookie.token_version, TokenVersion::V2);
    // The value sits on line 9, column 17 of `with_cookie`'s file.
    for bad in ["0", "3", "-1"] {
        assert_eq!(
            errors(&with_cookie(&format!("token_version = {bad}\n"))),
            [format!("t.toml:9:17: pool \"p\": affinity: cookie.token_version {bad} is out of range: expected 1 to 2")]
        );
    }
    for bad in ["\"x\"", "\"2\"", "2.0"] {
        let e = errors(&with_cookie(&format!("token_version = {bad}\n")));
        assert!(e.len() == 1 && e[0].starts_with("t.toml:9:17: key `token_version`"), "{bad}: {e:?}");
    }
}

#[test]
fn the_admin_token_comes_from_a_file_or_the_environment() {
    let base = "[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[pools.p]\nbackends = [{ name = \"a\", address = \"127.0.0.1:1\" }]\n";
    let file = std::env::temp_dir().join(format!("tether-admin-token-{}", std::process::id()));
    std::fs::write(&file, "a-token-read-from-a-file\n").unwrap();
    let c = parse(&format!("[admin]\ntoken_file = \"{}\"\n{base}", file.display()), "t.toml").unwrap();
    assert_eq!(c.admin.as_ref().unwrap().token.as_deref(), Some("a-token-read-from-a-file"));
    assert!(!format!("{c:?}").contains("a-token-read-from-a-file"));
    std::env::set_var("TETHER_TEST_ADMIN_TOKEN", "a-token-from-the-environment");
    let c = parse(&format!("[admin]\ntoken_env = \"TETHER_TEST_ADMIN_TOKEN\"\n{base}"), "t.toml").unwrap();
    assert_eq!(c.admin.as_ref().unwrap().token.as_deref(), Some("a-token-from-the-environment"));
    let e = parse(&format!("[admin]\ntoken = \"x\"\ntoken_env = \"X\"\n{base}"), "t.toml").unwrap_err().to_string();
    assert!(e.contains("admin: set only one of token, token_file and token_env"), "{e}");
    std::fs::write(&file, "short\n").unwrap();
    let e = parse(&format!("[admin]\ntoken_file = \"{}\"\n{base}", file.display()), "t.toml").unwrap_err().to_string();
    assert!(e.contains("admin.token: must be at least 16 characters") && !e.contains("short\n"), "{e}");
    let _ = std::fs::remove_file(&file);
}

#[test]
fn the_retired_http1_switch_is_an_unknown_key() {
    // `http1 = "hyper"` chose hyper's HTTP/1 server while Tether's own codec replaced it;
    // that server is gone, and a config that still names it is told so, not obeyed.
    let cfg = "[[listeners]]\nhttp1 = \"hyper\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[pools.p]\nbackends = [{ name = \"a\", address = \"127.0.0.1:1\" }]\n";
    let e = errors(cfg);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("t.toml:2:") && e[0].contains("http1"), "{e:?}");
}

#[test]
fn the_access_log_session_key_is_a_located_32_byte_key() {
    let with = |line: &str| {
        format!("[access_log]\nformat = \"json\"\n{line}\n[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[pools.p]\nbackends = [{{ name = \"a\", address = \"127.0.0.1:1\" }}]\n")
    };
    let key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    let cfg = parse(&with(&format!("session_key = \"{key}\"")), "t.toml").unwrap();
    assert_eq!(cfg.access_log.session_key.as_deref(), Some(key));
    assert!(format!("{:?}", cfg.access_log).contains("Secret(..)"), "the key stays out of Debug output");
    assert_eq!(parse(&with(""), "t.toml").unwrap().access_log.session_key, None);
    let e = errors(&with("session_key = \"c2hvcnQ=\""));
    assert!(e.len() == 1 && e[0].starts_with("t.toml:3:15: access_log.session_key:"), "{e:#?}");
}

const DNS_POOL: &str = "[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"web\"\n[pools.web]\n";

#[test]
fn dns_sources_resolve_with_defaults() {
    let src = format!(
        "[dns]\nresolvers = [\"127.0.0.1:5353\", \"::1\"]\ntimeout = \"500ms\"\n{DNS_POOL}\
         [[pools.web.dns]]\nname = \"app.default.svc.cluster.local.\"\nport = 8080\n\
         [[pools.web.dns]]\nname = \"_http._tcp.app.example\"\ntype = \"srv\"\ninterval = \"1s\"\nmax_connections = 10\n\
         [[pools.web.dns]]\nname = \"app.example\"\nport = 8080\ntype = \"a+aaaa\"\nweight = 3\n"
    );
    let c = parse(&src, "t.toml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.dns.resolvers, ["127.0.0.1:5353".parse().unwrap(), "[::1]:53".parse().unwrap()]);
    assert_eq!(c.dns.timeout, Duration::from_millis(500));
    let p = &c.pools[0];
    assert!(p.backends.is_empty());
    assert_eq!(p.dns.len(), 3);
    assert_eq!(
        p.dns[0],
        DnsSource {
            name: "app.default.svc.cluster.local.".into(),
            port: Some(8080),
            kind: DnsKind::A,
            interval: Duration::from_secs(5),
            weight: 1,
            max_connections: None,
        }
    );
    assert_eq!((p.dns[1].kind, p.dns[1].port, p.dns[1].max_connections), (DnsKind::Srv, None, Some(10)));
    assert_eq!((p.dns[2].kind, p.dns[2].weight), (DnsKind::Both, 3));
    assert!(p.resolvers.is_empty(), "the pool uses [dns]'s resolvers");
    // A pool's own resolvers.
    let own = src.replace("[pools.web]\n", "[pools.web]\nresolvers = [\"10.0.0.53\"]\n");
    let c = parse(&own, "t.toml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.pools[0].resolvers, ["10.0.0.53:53".parse().unwrap()]);
    // Without [dns], the system's resolvers (an empty list) and a 2s timeout.
    let c = parse(&format!("{DNS_POOL}[[pools.web.dns]]\nname = \"a.b\"\nport = 1\n"), "t.toml").unwrap();
    assert_eq!(c.dns, Dns::default());
}

#[test]
fn dns_errors_are_located() {
    let src = format!(
        "[dns]\nresolvers = [\"resolver.example\"]\ntimeout = \"0s\"\n{DNS_POOL}\
         [[pools.web.dns]]\nname = \"bad..name\"\nport = 80\n\
         [[pools.web.dns]]\nname = \"app.example\"\n\
         [[pools.web.dns]]\nname = \"_x._tcp.app\"\ntype = \"srv\"\nport = 80\nweight = 2\n\
         [[pools.web.dns]]\nname = \"app.example\"\nport = 80\ntype = \"mx\"\ninterval = \"10ms\"\n\
         [[pools.web.dns]]\nname = \"twice.example\"\nport = 80\n\
         [[pools.web.dns]]\nname = \"TWICE.example.\"\nport = 80\n"
    );
    let e = errors(&src);
    let expected = [
        "t.toml:2:14: dns.resolvers: \"resolver.example\" is not an IP address, or IP address and port, like 127.0.0.1:53",
        "t.toml:3:11: dns.timeout: must be greater than zero",
        "t.toml:9:8: pool \"web\": dns[0] \"bad..name\": name is not a DNS name (labels of letters, digits, - and _, up to 63 bytes each, 253 in all)",
        "t.toml:12:8: pool \"web\": dns[1] \"app.example\": no port: set port = 8080 (the port of the addresses found)",
        "t.toml:16:8: pool \"web\": dns[2] \"_x._tcp.app\": port: SRV records carry their own port; leave it out",
        "t.toml:17:10: pool \"web\": dns[2] \"_x._tcp.app\": weight: SRV records carry their own weights; leave it out",
        "t.toml:21:8: pool \"web\": dns[3] \"app.example\": type \"mx\" is not known: expected \"a\", \"aaaa\", \"a+aaaa\" or \"srv\"",
        "t.toml:22:12: pool \"web\": dns[3] \"app.example\": interval: 10ms is too short: at least 100ms",
        "t.toml:27:8: pool \"web\": dns \"TWICE.example.\": the same name, type and port are listed twice",
    ];
    assert_eq!(e, expected, "{e:#?}");
    // A pool's resolvers: checked the same way, and only with DNS sources.
    let e = errors(&format!("{DNS_POOL}resolvers = [\"x\"]\n[[pools.web.dns]]\nname = \"a.b\"\nport = 1\n"));
    assert_eq!(
        e,
        ["t.toml:5:14: pool \"web\": resolvers: \"x\" is not an IP address, or IP address and port, like 127.0.0.1:53"]
    );
    let e = errors(&format!("{DNS_POOL}resolvers = [\"127.0.0.1\"]\nbackends = [{{ address = \"127.0.0.1:1\" }}]\n"));
    assert_eq!(e, ["t.toml:5:13: pool \"web\": resolvers: the pool has no [[pools.web.dns]] sources to resolve"]);
    // A pool with neither backends nor DNS sources.
    let e = errors(DNS_POOL);
    assert!(e.iter().any(|l| l.contains("no backends: list backends or add [[pools.web.dns]]")), "{e:?}");
}

const TCP_POOLS: &str = "[pools.db]\nbackends = [{ address = \"127.0.0.1:5432\" }]\n\
                         [pools.web]\nbackends = [{ address = \"127.0.0.1:8080\" }]\n";

#[test]
fn tcp_listeners_resolve_with_sni_routes() {
    let src = format!(
        "[[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"db\"\nidle_timeout = \"5m\"\n\
         [[listeners.sni_routes]]\nnames = [\"Shop.Example.\", \"*.shop.example\"]\npool = \"web\"\n{TCP_POOLS}"
    );
    let c = parse(&src, "t.toml").unwrap();
    let tcp = c.listeners[0].tcp.as_ref().expect("a tcp listener");
    assert!(c.listeners[0].routes.is_empty() && c.listeners[0].tls.is_none());
    assert_eq!(tcp.default_pool, Some(0));
    assert_eq!(tcp.idle_timeout, Some(std::time::Duration::from_secs(300)));
    assert_eq!(
        tcp.sni,
        [SniRoute { name: "shop.example".into(), pool: 1 }, SniRoute { name: "*.shop.example".into(), pool: 1 }]
    );
    // Exact names, then the longest wildcard, then the default; a wildcard needs a label
    // of its own before the suffix.
    assert_eq!(tcp.route(Some("shop.example")), Some(1));
    assert_eq!(tcp.route(Some("eu.shop.example")), Some(1));
    assert_eq!(tcp.route(Some("a.b.shop.example")), Some(1));
    assert_eq!(tcp.route(Some("xshop.example")), Some(0));
    assert_eq!(tcp.route(Some(".shop.example")), Some(0));
    assert_eq!(tcp.route(None), Some(0));
    let longest = TcpListener {
        sni: vec![SniRoute { name: "*.example".into(), pool: 1 }, SniRoute { name: "*.eu.example".into(), pool: 2 }],
        default_pool: None,
        idle_timeout: None,
    };
    assert_eq!(longest.route(Some("a.eu.example")), Some(2));
    assert_eq!(longest.route(Some("a.us.example")), Some(1));
    assert_eq!(longest.route(Some("example")), None);
    // An http listener has no tcp part.
    assert!(parse(GOOD, "t.toml").unwrap().listeners.iter().all(|l| l.tcp.is_none()));
}

#[test]
fn tcp_listener_errors_are_located() {
    let src = format!(
        "[[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\n\
         trusted_proxies = [\"10.0.0.0/8\"]\n\
         [[listeners.routes]]\npool = \"web\"\n\
         [[listeners.sni_routes]]\nnames = [\"bad name\", \"a.example\", \"A.example\"]\npool = \"web\"\n\
         [[listeners.sni_routes]]\nnames = []\npool = \"nope\"\n{TCP_POOLS}"
    );
    let e = errors(&src);
    let expected = [
        "t.toml:6:1: listener \"edge\": routes is not for protocol = \"tcp\" (route by server name with [[listeners.sni_routes]])",
        "t.toml:5:20: listener \"edge\": trusted_proxies is not for protocol = \"tcp\"",
        "t.toml:9:10: listener \"edge\": sni_routes name \"bad name\" is not a DNS name or a *. wildcard",
        "t.toml:9:35: listener \"edge\": sni_routes name \"a.example\" is routed twice",
        "t.toml:13:8: listener \"edge\": pool \"nope\" is not defined (pools: \"db\", \"web\")",
        "t.toml:12:9: listener \"edge\": an sni_route needs at least one name",
    ];
    assert_eq!(e, expected, "{e:#?}");
    // TLS versions are for terminating TLS, which a tcp listener does not.
    let e = errors(&format!(
        "[[listeners]]\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"web\"\ntls_versions = [\"1.3\"]\n{TCP_POOLS}"
    ));
    assert_eq!(e, ["t.toml:5:16: listener \"listener-1\": tls_versions is not for protocol = \"tcp\""]);
    // A tcp listener needs somewhere to send connections.
    let e = errors(&format!("[[listeners]]\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\n{TCP_POOLS}"));
    assert_eq!(
        e,
        ["t.toml:2:8: listener \"listener-1\": no pool: set `pool = \"NAME\"` or add [[listeners.sni_routes]]"]
    );
    // The tcp keys on an http listener.
    let e = errors(&format!(
        "[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"web\"\nidle_timeout = \"1m\"\n\
         [[listeners.sni_routes]]\nnames = [\"a.example\"]\npool = \"web\"\n{TCP_POOLS}"
    ));
    assert_eq!(
        e,
        [
            "t.toml:7:8: listener \"listener-1\": sni_routes are for protocol = \"tcp\"",
            "t.toml:4:16: listener \"listener-1\": idle_timeout is for protocol = \"tcp\" (HTTP connections use [timeouts] client_idle)",
        ]
    );
    // A pool behind a tcp listener can key sessions only by the client IP.
    let e = errors(&format!(
        "[[listeners]]\nname = \"db\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"db\"\n{TCP_POOLS}\
         [pools.db.affinity]\nkeys = [\"client_ip\", \"header:x-user\"]\n"
    ));
    assert_eq!(
        e,
        ["t.toml:5:8: listener \"db\": pool \"db\" keys sessions by header, which a TCP connection does not carry: a pool behind a tcp listener may only use client_ip keys"]
    );
    let c = parse(
        &format!(
            "[[listeners]]\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"db\"\n{TCP_POOLS}[pools.db.affinity]\nkeys = [\"client_ip\"]\nmapping = \"hash\"\n"
        ),
        "t.toml",
    );
    assert!(c.is_ok(), "{c:?}");
}

/// Two pools with the same cookie chain (v2 tokens) and a third without affinity; the
/// listener's routes are `ROUTES`.
const SPLIT: &str = r#"
[[listeners]]
name = "web"
bind = "127.0.0.1:8080"
ROUTES

[pools.blue]
backends = [{ address = "127.0.0.1:9001" }]
[pools.blue.affinity]
keys = ["cookie", "header:x-user"]
[pools.blue.affinity.cookie]
token_version = 2

[pools.green]
backends = [{ address = "127.0.0.1:9002" }]
[pools.green.affinity]
keys = ["cookie", "header:x-user"]
[pools.green.affinity.cookie]
token_version = 2

[pools.plain]
backends = [{ address = "127.0.0.1:9003" }]
"#;

fn split_config(routes: &str) -> String {
    SPLIT.replace("ROUTES", routes)
}

#[test]
fn a_route_may_split_between_pools() {
    let src = split_config(
        "[[listeners.routes]]\npath_prefix = \"/shop\"\nsplit = [{ pool = \"blue\", weight = 90 }, { pool = \"green\", weight = 0 }]\n\
         [[listeners.routes]]\nname = \"canary\"\nsplit = [{ pool = \"green\", weight = 1000 }]",
    );
    let c = parse(&src, "t.toml").unwrap();
    let names: Vec<&str> = c.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["blue", "green", "plain"]);
    let routes = &c.listeners[0].routes;
    let RouteTo::Split(s) = &routes[0].to else { panic!("{routes:?}") };
    assert_eq!(s.name, "web-1");
    assert_eq!(s.members, [SplitMember { pool: 0, weight: 90 }, SplitMember { pool: 1, weight: 0 }]);
    let RouteTo::Split(s) = &routes[1].to else { panic!("{routes:?}") };
    assert_eq!(s.name, "canary");
    assert_eq!(
        c.splits().map(|(l, s)| (l, s.name.as_str())).collect::<Vec<_>>(),
        [("web", "web-1"), ("web", "canary")]
    );
}

#[test]
fn split_errors_are_located() {
    let cases = [
        // Unknown pool, duplicate, weight out of range.
        (
            "[[listeners.routes]]\nsplit = [{ pool = \"blue\", weight = 1 }, { pool = \"blue\", weight = 2 }, { pool = \"red\", weight = 1 }, { pool = \"green\", weight = 1001 }]",
            vec![
                "t.toml:6:50: listener \"web\": split \"web-1\": pool \"blue\" is named twice",
                "t.toml:6:81: listener \"web\": pool \"red\" is not defined",
                "t.toml:6:129: listener \"web\": split \"web-1\": pool \"green\" weight 1001 is out of range: expected 0 to 1000",
            ],
        ),
        ("[[listeners.routes]]\npath_prefix = \"/\"", vec!["t.toml:5:1: listener \"web\": a route needs pool = \"NAME\" or split"]),
        (
            "[[listeners.routes]]\npool = \"blue\"\nsplit = [{ pool = \"green\", weight = 1 }]",
            vec!["t.toml:6:8: listener \"web\": a route has either pool or split, not both"],
        ),
        (
            "[[listeners.routes]]\nsplit = [{ pool = \"blue\", weight = 0 }, { pool = \"green\", weight = 0 }]",
            vec!["t.toml:6:9: listener \"web\": split \"web-1\": every weight is 0"],
        ),
        ("[[listeners.routes]]\nsplit = []", vec!["t.toml:6:9: listener \"web\": split \"web-1\": lists no pool"]),
        (
            "[[listeners.routes]]\nsplit = [{ pool = \"blue\", weight = 1 }, { pool = \"plain\", weight = 1 }]",
            vec!["t.toml:6:50: listener \"web\": split \"web-1\": pool \"plain\" has no affinity, unlike pool \"blue\"'s"],
        ),
        (
            "[[listeners.routes]]\nname = \"a\"\nsplit = [{ pool = \"blue\", weight = 1 }]\n[[listeners.routes]]\nname = \"a\"\npath_prefix = \"/x\"\nsplit = [{ pool = \"green\", weight = 1 }]",
            vec!["t.toml:9:8: listener \"web\": split name \"a\" is used twice"],
        ),
        (
            "[[listeners.routes]]\nname = \"a b\"\nsplit = [{ pool = \"blue\", weight = 1 }]",
            vec!["t.toml:6:8: listener \"web\": split name \"a b\" must be printable ASCII"],
        ),
        (
            "[[listeners.routes]]\nname = \"a\"\npool = \"blue\"",
            vec!["t.toml:6:8: listener \"web\": a route's name is for a split"],
        ),
        (
            "[[listeners.routes]]\nsplit = [{ pool = \"blue\" }]",
            vec!["t.toml:6:10: key `split`: missing field `weight`"],
        ),
    ];
    for (routes, expected) in cases {
        let e = errors(&split_config(routes));
        for want in expected {
            assert!(e.iter().any(|l| l.starts_with(want)), "{routes}\nwanted {want}\n{e:#?}");
        }
    }
    // The pools must share the key chain, the cookie name, and issue version 2 tokens.
    let routes = "[[listeners.routes]]\nsplit = [{ pool = \"blue\", weight = 1 }, { pool = \"green\", weight = 1 }]";
    for (change, want) in [
        (
            (
                "keys = [\"cookie\", \"header:x-user\"]\n[pools.green.affinity.cookie]",
                "keys = [\"cookie\"]\n[pools.green.affinity.cookie]",
            ),
            "pool \"green\" has other affinity keys than pool \"blue\"'s",
        ),
        (
            ("[pools.green.affinity.cookie]\n", "[pools.green.affinity.cookie]\nname = \"other\"\n"),
            "pool \"green\" has another cookie name than pool \"blue\"'s",
        ),
        (
            ("[pools.green.affinity.cookie]\ntoken_version = 2", "[pools.green.affinity.cookie]\ntoken_version = 1"),
            "pool \"green\" issues version 1 tokens, which record no pool",
        ),
        (
            ("[pools.green.affinity]\n", "[pools.green.affinity]\nmapping = \"hash\"\n"),
            "pool \"green\" has another affinity mapping than pool \"blue\"'s",
        ),
    ] {
        let src = split_config(routes).replace(change.0, change.1);
        assert_ne!(src, split_config(routes), "{change:?} changed nothing");
        let e = errors(&src);
        let want = format!("t.toml:6:50: listener \"web\": split \"web-1\": {want}");
        assert!(e.iter().any(|l| l.starts_with(&want)), "wanted {want}\n{e:#?}");
    }
}

/// A config with `[stores.fleet]` (its body `store`), and pools `tab` (a table-mapped
/// header) and `tok` (Tether's cookie only), each affinity with `tab_extra`/`tok_extra`.
fn with_store(top: &str, store: &str, tab_extra: &str, tok_extra: &str) -> String {
    format!(
        "{top}\n[stores.fleet]\n{store}\n[[listeners]]\nbind = \"127.0.0.1:8080\"\npool = \"tab\"\n\n\
         [pools.tab]\nbackends = [{{ address = \"127.0.0.1:9001\" }}]\n[pools.tab.affinity]\nkeys = [\"header:x-user\"]\n{tab_extra}\n\
         [pools.tok]\nbackends = [{{ address = \"127.0.0.1:9002\" }}]\n[pools.tok.affinity]\nkeys = [\"cookie\"]\n{tok_extra}\n"
    )
}

#[test]
fn stores_resolve_and_pools_share_through_them() {
    std::env::set_var("TETHER_TEST_STORE_KEY", KEY_1);
    std::env::set_var("TETHER_TEST_STORE_PASSWORD", " secret \n");
    let store = "address = \"redis.internal:6380\"\nuser = \"tether\"\npassword_env = \"TETHER_TEST_STORE_PASSWORD\"\n\
                 key_env = \"TETHER_TEST_STORE_KEY\"\ndatabase = 3\nprefix = \"prod\"\ntimeout = \"10ms\"\n";
    let c = parse(&with_store("store = \"fleet\"", store, "", ""), "t.toml").unwrap();
    let s = &c.stores[0];
    assert_eq!(
        (s.name.as_str(), s.address.as_str(), s.database, s.prefix.as_str()),
        ("fleet", "redis.internal:6380", 3, "prod")
    );
    assert_eq!(s.password.as_deref(), Some("secret"));
    assert_eq!(s.user.as_deref(), Some("tether"));
    assert_eq!(s.timeout, Duration::from_millis(10));
    assert_eq!((s.flush_interval, s.miss_ttl), (Duration::from_millis(250), Duration::from_secs(2)));
    assert!(!format!("{s:?}").contains("secret"), "{s:?}");
    let store_of = |c: &Config, pool: &str| {
        c.pools.iter().find(|p| p.name == pool).unwrap().affinity.as_ref().unwrap().store.clone()
    };
    // The top-level store goes to pools with table-mapped keys only.
    assert_eq!(store_of(&c, "tab").as_deref(), Some("fleet"));
    assert_eq!(store_of(&c, "tok"), None);
    // Without it, only a pool that names the store uses it; "none" opts out.
    let key = "address = \"127.0.0.1:6379\"\nkey_env = \"TETHER_TEST_STORE_KEY\"\n";
    let c = parse(&with_store("", key, "store = \"fleet\"\n", ""), "t.toml").unwrap();
    assert_eq!(store_of(&c, "tab").as_deref(), Some("fleet"));
    let c = parse(&with_store("store = \"fleet\"", key, "store = \"none\"\n", ""), "t.toml").unwrap();
    assert_eq!(store_of(&c, "tab"), None);
}

#[test]
fn store_mistakes_are_located_errors() {
    std::env::set_var("TETHER_TEST_STORE_KEY2", KEY_1);
    let key = "key_env = \"TETHER_TEST_STORE_KEY2\"\n";
    let cases: Vec<(String, &str)> = vec![
        (with_store("", &format!("address = \"nohost\"\n{key}"), "", ""), "is not HOST:PORT"),
        (with_store("", &format!("address = \"h:0\"\n{key}"), "", ""), "is not HOST:PORT"),
        (
            with_store("", &format!("address = \"h:1\"\nca_file = \"ca.pem\"\n{key}"), "", ""),
            "ca_file is for tls = true",
        ),
        (
            with_store("", &format!("address = \"h:1\"\ntls = true\nca_file = \"/no/ca.pem\"\n{key}"), "", ""),
            "ca_file: cannot read /no/ca.pem",
        ),
        (with_store("", "address = \"h:1\"\n", "", ""), "set key_file or key_env"),
        (with_store("", "address = \"h:1\"\nkey_env = \"TETHER_TEST_NO_SUCH_VARIABLE\"\n", "", ""), "is not set"),
        (with_store("", "address = \"h:1\"\nkey_file = \"/no/such/file\"\n", "", ""), "cannot read /no/such/file"),
        (with_store("", &format!("address = \"h:1\"\nuser = \"u\"\n{key}"), "", ""), "user is set without"),
        (
            with_store("", &format!("address = \"h:1\"\npassword = \"inline\"\n{key}"), "", ""),
            "unknown field `password`",
        ),
        (with_store("", &format!("address = \"h:1\"\nprefix = \"a b\"\n{key}"), "", ""), "prefix: must be a word"),
        (
            with_store("", &format!("address = \"h:1\"\ntimeout = \"0s\"\n{key}"), "", ""),
            "timeout: must be greater than zero",
        ),
        (
            with_store("store = \"other\"", &format!("address = \"h:1\"\n{key}"), "", ""),
            "store \"other\" is not a [stores.NAME]",
        ),
        (with_store("", &format!("address = \"h:1\"\n{key}"), "store = \"other\"\n", ""), "is not a [stores.NAME]"),
        (
            with_store("", &format!("address = \"h:1\"\n{key}"), "", "store = \"fleet\"\n"),
            "no table-mapped key to share",
        ),
    ];
    for (src, want) in cases {
        let e = errors(&src);
        assert!(e.iter().any(|l| l.contains(want) && l.starts_with("t.toml:")), "{want}: {e:?}\n{src}");
    }
    std::env::set_var("TETHER_TEST_STORE_BADKEY", "not base64!");
    let e = errors(&with_store("", "address = \"h:1\"\nkey_env = \"TETHER_TEST_STORE_BADKEY\"\n", "", ""));
    assert!(e.iter().any(|l| l.contains("stores.fleet: key:") && !l.contains("not base64!")), "{e:?}");
}

/// A pool "x" with `keys` and `mapping` and the given `[pools.x.affinity.rebalance]` body.
fn with_rebalance(keys: &str, mapping: &str, body: &str) -> String {
    format!(
        "[[listeners]]\nbind = \"127.0.0.1:8080\"\npool = \"x\"\n\n[pools.x]\nbackends = [{{ address = \"127.0.0.1:1\" }}]\n\n[pools.x.affinity]\nkeys = {keys}\nmapping = \"{mapping}\"\n\n[pools.x.affinity.rebalance]\n{body}"
    )
}

#[test]
fn rebalance_is_off_by_default_and_resolves_with_defaults() {
    let rebalance_of = |src: &str| parse(src, "t.toml").unwrap().pools[0].affinity.as_ref().unwrap().rebalance;
    let off = "[[listeners]]\nbind = \"127.0.0.1:8080\"\npool = \"x\"\n\n[pools.x]\nbackends = [{ address = \"127.0.0.1:1\" }]\n\n[pools.x.affinity]\nkeys = [\"cookie\"]\n";
    assert_eq!(rebalance_of(off), None);
    assert_eq!(rebalance_of(&with_rebalance("[\"cookie\"]", "table", "")), Some(Rebalance::default()));
    let set = with_rebalance("[\"header:x-user\"]", "table", "factor = 1.2\nidle = \"300ms\"\nmax_per_second = 2\n");
    assert_eq!(
        rebalance_of(&set),
        Some(Rebalance { factor: 1.2, idle: Duration::from_millis(300), max_per_second: 2 })
    );
    // A chain with a pinned key besides hashed ones rebalances the pinned sessions.
    assert!(rebalance_of(&with_rebalance("[\"cookie\", \"client_ip\"]", "hash", "")).is_some());
}

#[test]
fn rebalance_mistakes_are_located_errors() {
    let cases = [
        (
            with_rebalance("[\"cookie\"]", "table", "factor = 1.0\n"),
            "t.toml:13:10: pool \"x\": affinity: rebalance: factor 1 must be over 1.0",
        ),
        (with_rebalance("[\"cookie\"]", "table", "factor = 0.5\n"), "rebalance: factor 0.5 must be over 1.0"),
        (with_rebalance("[\"cookie\"]", "table", "factor = nan\n"), "rebalance: factor NaN must be over 1.0"),
        (
            with_rebalance("[\"cookie\"]", "table", "idle = \"0s\"\n"),
            "t.toml:13:8: pool \"x\": affinity: rebalance: idle: must be greater than zero",
        ),
        (with_rebalance("[\"cookie\"]", "table", "idle = \"soon\"\n"), "rebalance: idle:"),
        (
            with_rebalance("[\"cookie\"]", "table", "max_per_second = 0\n"),
            "rebalance: max_per_second 0 is out of range: expected 1 to 100000",
        ),
        (with_rebalance("[\"cookie\"]", "table", "rate = 3\n"), "unknown field `rate`"),
        (
            with_rebalance("[\"header:x-user\", \"client_ip\"]", "hash", ""),
            "rebalance: the key chain has only hashed keys, which have no pin to move",
        ),
        (
            with_rebalance("[\"cookie\"]\non_unavailable = \"strict\"", "table", ""),
            "rebalance moves sessions, which a pool with on_unavailable = \"strict\" never does",
        ),
    ];
    for (src, want) in cases {
        let e = errors(&src);
        assert!(e.iter().any(|l| l.contains(want) && l.starts_with("t.toml:")), "{want}: {e:?}\n{src}");
    }
}

#[test]
fn proxy_protocol_settings_resolve() {
    let src = r#"
[[listeners]]
name = "edge"
bind = "127.0.0.1:8080"
pool = "web"
proxy_protocol = "required"
proxy_protocol_from = ["10.0.0.0/8", "::1"]

[[listeners]]
name = "plain"
bind = "127.0.0.1:8081"
protocol = "tcp"
pool = "web"
proxy_protocol = "optional"
proxy_protocol_from = ["127.0.0.1"]

[[listeners]]
name = "off"
bind = "127.0.0.1:8082"
pool = "web"

[pools.web]
send_proxy_protocol = "v2"
backends = [{ address = "127.0.0.1:9001" }]

[pools.other]
send_proxy_protocol = "v1"
backends = [{ address = "127.0.0.1:9002" }]
"#;
    let c = parse(src, "t.toml").unwrap();
    let edge = c.listeners[0].proxy_protocol.as_ref().unwrap();
    assert!(edge.required);
    assert!(edge.trusts("10.1.2.3".parse().unwrap()) && edge.trusts("::1".parse().unwrap()));
    assert!(!edge.trusts("11.1.2.3".parse().unwrap()));
    let plain = c.listeners[1].proxy_protocol.as_ref().unwrap();
    assert!(!plain.required && plain.trusts("::ffff:127.0.0.1".parse().unwrap()));
    assert_eq!(c.listeners[2].proxy_protocol, None);
    let version = |name: &str| c.pools.iter().find(|p| p.name == name).unwrap().send_proxy_protocol;
    assert_eq!(version("web"), Some(crate::proxy_header::Version::V2));
    assert_eq!(version("other"), Some(crate::proxy_header::Version::V1));
}

#[test]
fn proxy_protocol_mistakes_are_located_errors() {
    let listener = |keys: &str| {
        format!("[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:8080\"\npool = \"web\"\n{keys}\n[pools.web]\nbackends = [{{ address = \"127.0.0.1:9001\" }}]\n")
    };
    for (src, want) in [
        (
            listener("proxy_protocol = \"always\"\nproxy_protocol_from = [\"10.0.0.0/8\"]\n"),
            "t.toml:5:18: listener \"l\": proxy_protocol \"always\" is not known: expected \"off\", \"optional\" or \"required\"",
        ),
        (
            listener("proxy_protocol = \"required\"\n"),
            "t.toml:5:18: listener \"l\": proxy_protocol needs proxy_protocol_from, the addresses trusted to send it",
        ),
        (
            listener("proxy_protocol = \"optional\"\nproxy_protocol_from = []\n"),
            "t.toml:6:23: listener \"l\": proxy_protocol_from is empty: no source could send the header",
        ),
        (
            listener("proxy_protocol_from = [\"10.0.0.0/8\"]\n"),
            "t.toml:5:23: listener \"l\": proxy_protocol_from is set but proxy_protocol is off",
        ),
        (
            listener("proxy_protocol = \"required\"\nproxy_protocol_from = [\"10.0.0.0/33\"]\n"),
            "t.toml:6:24: listener \"l\": proxy_protocol_from: \"10.0.0.0/33\": prefix length must be 0 to 32",
        ),
        (
            listener("").replace("backends", "send_proxy_protocol = \"v3\"\nbackends"),
            "t.toml:7:23: pool \"web\": send_proxy_protocol \"v3\" is not known: expected \"v1\" or \"v2\"",
        ),
    ] {
        assert_eq!(errors(&src), [want], "{src}");
    }
}

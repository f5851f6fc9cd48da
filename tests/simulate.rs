//! `tether simulate`: golden runs worked out by hand, reproducibility, located errors in
//! scenario files, the command end to end, its HTML report in a real browser, and the
//! replay of a real Tether's access log.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tether::simulate::{self, report::StrategyReport, Report};

fn run(src: &str, seed: Option<u64>) -> Report {
    let sc = simulate::scenario::parse(src, "test.toml", None).unwrap_or_else(|e| panic!("{e}"));
    simulate::run(&sc, seed, &mut |_, _| {})
}

fn verdict(s: &StrategyReport, label: &str) -> u64 {
    let (v, _) = tether::affinity::verdict::Verdict::ALL.iter().find(|(_, l)| *l == label).unwrap();
    s.verdicts[v.index()]
}

fn moves(s: &StrategyReport, label: &str) -> u64 {
    let (v, _) = tether::affinity::verdict::Verdict::ALL.iter().find(|(_, l)| *l == label).unwrap();
    s.moves[v.index()]
}

/// Three backends a, b, c with round robin and Tether's cookie; six clients.
const THREE: &str = r#"
[simulate]
duration = "5s"
sample = "1s"

[workload]
clients = 6
ramp = "0s"
requests_per_session = 1000
think_time = "1s"

[[events]]
at = "2500ms"
action = "fail"
backend = "b"

[pools.rr]
retries = 1
backends = [
  { name = "a", address = "10.0.0.1:80" },
  { name = "b", address = "10.0.0.2:80" },
  { name = "c", address = "10.0.0.3:80" },
]
[pools.rr.affinity]
keys = ["cookie"]
"#;

/// Worked by hand. Every client starts at t=0 (no ramp) and sends a request each second,
/// t = 0, 1, 2, 3, 4, 5 s (the end is included): 36 requests. Clients at the same moment
/// go in client order, and round robin over [a, b, c] starts at a, so at t=0 the six new
/// sessions go a, b, c, a, b, c: clients 0 and 3 on a, 1 and 4 on b, 2 and 5 on c (six
/// picks, so the cursor is at 6).
///
/// b fails at 2.5 s. At t=3 s client 1's cookie names b. Without health checks Tether
/// still thinks b is up: the request is sent, the connect is refused, and `failover`
/// picks another backend with the cursor at 6 (6 mod 3 = a); client 4 follows with the
/// cursor at 7, which is b's turn, excluded: a turn of an ineligible backend goes to the
/// position a hash of the cursor spreads it to (`balance::spread`, SplitMix64's
/// finaliser: spread(7) mod 3 = 0, a), not to the next one, c. With a check every second
/// and fall = 1, the check at t=3 s (checks run before the requests of the same moment)
/// marks b down, and `decide` re-places both sessions with the same picks. Either way:
/// exactly clients 1 and 4 move, both to a, both with `repin:down`, to a backend they had
/// not used; the others never move. Requests: a serves clients 0 and 3 six times and
/// clients 1 and 4 three times (18), b six (clients 1 and 4 at 0, 1, 2 s), c twelve.
/// Verdicts: 6 new, 2 repin:down, 28 hit.
#[test]
fn golden_three_backends_round_robin_one_fails() {
    let with_checks = THREE.replace(
        "[pools.rr.affinity]",
        "[pools.rr.health]\ncheck = \"tcp\"\ninterval = \"1s\"\nfall = 1\nrise = 1\n[pools.rr.affinity]",
    );
    for (what, src) in [("failover, no checks", THREE), ("health checks", &with_checks)] {
        let r = run(src, None);
        let s = &r.strategies[0];
        assert_eq!(s.requests, 36, "{what}");
        assert_eq!(s.sessions, 6, "{what}");
        assert_eq!((verdict(s, "new"), verdict(s, "hit"), verdict(s, "repin:down")), (6, 28, 2), "{what}");
        assert_eq!(moves(s, "repin:down"), 2, "{what}");
        assert_eq!(s.moved(), 2, "{what}");
        assert_eq!((s.broken, s.broken_silently, s.unfamiliar), (2, 0, 2), "{what}");
        assert_eq!((s.failed, s.refused), (0, 0), "{what}");
        // The last sample (5 s) holds the sessions after the moves of t=3 s.
        let last = s.samples.last().unwrap();
        assert_eq!(last.t_ms, 5000);
        let on: Vec<(&str, u32)> = last.sessions_per_backend.iter().map(|(n, c)| (n.as_str(), *c)).collect();
        assert_eq!(on, [("a", 4), ("b", 0), ("c", 2)], "{what}");
        // The sample at 3 s is taken before that moment's requests: still two each.
        let at3 = s.samples.iter().find(|p| p.t_ms == 3000).unwrap();
        assert!(at3.sessions_per_backend.iter().all(|(_, c)| *c == 2), "{what}: {at3:?}");
        assert_eq!(s.events, [(2500, "b fails".to_string())]);
    }
}

/// Worked by hand. Six clients, three requests each (t = 0, 1, 2 s), then away for an
/// hour. b (clients 1 and 4) is drained at 0.5 s: draining keeps existing sessions, so
/// nothing moves and b serves both to their end. Their last requests are at t=2 s, so the
/// housekeeping tick of t=3 s (ticks run before the requests of the same moment) is the
/// first to see b without a session in progress: empty after 3 - 0.5 = 2.5 s. Tether's
/// own count keeps a token session for the cookie idle timeout after its last request
/// (2 s here; the stamp is whole seconds, and an entry expires once more than 2 s old):
/// last seen at second 2, still counted at 4, gone at 5: 4.5 s after the drain.
#[test]
fn golden_drain_empties_when_sessions_end() {
    let src = r#"
[simulate]
duration = "5s"
sample = "1s"
[workload]
clients = 6
ramp = "0s"
requests_per_session = 3
think_time = "1s"
away_time = "1h"
[[events]]
at = "500ms"
action = "drain"
backend = "b"
[pools.rr]
backends = [
  { name = "a", address = "10.0.0.1:80" },
  { name = "b", address = "10.0.0.2:80" },
  { name = "c", address = "10.0.0.3:80" },
]
[pools.rr.affinity]
keys = ["cookie"]
[pools.rr.affinity.cookie]
idle_timeout = "2s"
"#;
    let r = run(src, None);
    let s = &r.strategies[0];
    assert_eq!((s.requests, s.sessions, s.moved(), s.broken), (18, 6, 0, 0));
    assert_eq!((verdict(s, "new"), verdict(s, "hit")), (6, 12));
    assert_eq!(s.drains.len(), 1);
    let d = &s.drains[0];
    assert_eq!((d.backend.as_str(), d.at_ms), ("b", 500));
    assert_eq!(d.empty_after_ms, Some(2500));
    assert_eq!(d.counted_empty_after_ms, Some(4500));
}

/// Worked by hand. The application's own session cookie, learned from its `Set-Cookie`:
/// six clients, three requests each (t = 0, 1, 2 s). At t=0 no client has the cookie, so
/// the key chain finds nothing and round robin places them a, b, c, a, b, c (`new`); each
/// backend answers with a new JSESSIONID, which Tether learns and pins. At t=1 s all six
/// carry their cookie: six `hit`s. b fails at 1.5 s (no health checks): at t=2 s clients
/// 1 and 4 are sent to b, refused, and `failover` re-points their pins, both to a (cursor
/// 6; cursor 7 is b's turn, which goes where spread(7) lands, a, as in the golden test
/// above), with `repin:down`; the new backends, not knowing the
/// session, set new cookies (learned too). So: 18 requests, 6 new, 10 hit, 2 repin:down,
/// two sessions broken (not silently) onto backends they had not used.
#[test]
fn golden_app_cookie_is_learned_and_repinned() {
    let src = r#"
[simulate]
duration = "2s"
sample = "1s"
[workload]
clients = 6
ramp = "0s"
requests_per_session = 3
think_time = "1s"
app_cookie = "JSESSIONID"
[[events]]
at = "1500ms"
action = "fail"
backend = "b"
[pools.app]
backends = [
  { name = "a", address = "10.0.0.1:80" },
  { name = "b", address = "10.0.0.2:80" },
  { name = "c", address = "10.0.0.3:80" },
]
[pools.app.affinity]
keys = ["app_cookie:JSESSIONID"]
mapping = "table"
"#;
    let r = run(src, None);
    let s = &r.strategies[0];
    assert_eq!((s.requests, s.sessions), (18, 6));
    assert_eq!((verdict(s, "new"), verdict(s, "hit"), verdict(s, "repin:down")), (6, 10, 2));
    assert_eq!((s.moved(), s.broken, s.broken_silently, s.unfamiliar), (2, 2, 0, 2));
}

/// A scenario exercising the random draws: p2c (the balancer's `random_below`), service
/// times, exponential think and session lengths (the workload's generator), hashing with
/// bounded load, a failure, a weight change and a reload.
const RANDOM: &str = r#"
[simulate]
duration = "3m"
seed = 11
strategies = ["p2c", "header_bounded"]
[workload]
clients = 300
ramp = "20s"
requests_per_session = "exp(15)"
think_time = "exp(2s)"
away_time = "exp(20s)"
service_time = "exp(40ms)"
header = "X-User"
[[events]]
at = "1m"
action = "fail"
backend = "b"
[[events]]
at = "2m"
action = "recover"
backend = "b"
[[events]]
at = "150s"
action = "weight"
backend = "c"
weight = 3
[[events]]
at = "160s"
action = "reload"
[pools.p2c]
algorithm = "p2c"
backends = [
  { name = "a", address = "10.0.0.1:80" },
  { name = "b", address = "10.0.0.2:80" },
  { name = "c", address = "10.0.0.3:80" },
  { name = "d", address = "10.0.0.4:80" },
]
[pools.p2c.health]
check = "tcp"
interval = "2s"
[pools.p2c.affinity]
keys = ["cookie"]
[pools.header_bounded]
backends = [
  { name = "a", address = "10.0.0.1:80" },
  { name = "b", address = "10.0.0.2:80" },
  { name = "c", address = "10.0.0.3:80" },
  { name = "d", address = "10.0.0.4:80" },
]
[pools.header_bounded.health]
check = "tcp"
interval = "2s"
[pools.header_bounded.affinity]
keys = ["header:X-User"]
mapping = "hash"
max_sessions_factor = 1.25
"#;

#[test]
fn same_seed_same_report_other_seed_another() {
    let a = run(RANDOM, None);
    let b = run(RANDOM, None);
    assert_eq!(a, b, "two runs with one seed differ");
    assert_eq!(a.table(), b.table());
    assert_eq!(a.html(), b.html());
    assert_eq!(a.seed, 11);
    assert!(a.strategies.iter().all(|s| s.requests > 10_000), "too small to mean anything");
    let c = run(RANDOM, Some(12));
    assert_eq!(c.seed, 12);
    assert_ne!(a.strategies[0].requests, c.strategies[0].requests, "another seed, the same workload");
    assert_ne!(a.strategies[0].samples, c.strategies[0].samples);
}

/// The strategies see the same clients: the same requests in the same order, whatever
/// each does with them (none fails or is refused here).
#[test]
fn every_strategy_gets_the_same_workload() {
    let r = run(RANDOM, None);
    let [p2c, hashed] = &r.strategies[..] else { panic!("two strategies") };
    assert_eq!((p2c.failed, p2c.refused, hashed.failed, hashed.refused), (0, 0, 0, 0));
    assert_eq!(p2c.requests, hashed.requests);
    assert_eq!(p2c.sessions, hashed.sessions);
    // The cookie strategy only moves sessions with a re-pin; the hashed one moves some back
    // silently when b returns.
    assert_eq!(p2c.broken_silently, 0);
    assert!(p2c.broken > 0 && hashed.broken > 0);
}

// === located errors ===

/// A scenario that is fine; the error tests break one line of it.
const GOOD: &str = r#"[simulate]
duration = "10m"

[workload]
clients = 100

[[events]]
at = "5m"
action = "fail"
backend = "a"

[pools.web]
backends = [{ name = "a", address = "10.0.0.1:80" }, { name = "b", address = "10.0.0.2:80" }]
[pools.web.affinity]
keys = ["cookie"]
"#;

fn check_error(from: &str, to: &str, expected: &str) {
    assert!(GOOD.contains(from), "{from}");
    let src = GOOD.replacen(from, to, 1);
    let err = simulate::scenario::parse(&src, "s.toml", None).expect_err("the scenario must be refused").to_string();
    assert_eq!(err, expected, "for {to:?}");
}

#[test]
fn a_good_scenario_parses() {
    let sc = simulate::scenario::parse(GOOD, "s.toml", None).unwrap();
    assert_eq!((sc.duration_ms, sc.sample_ms, sc.seed, sc.workload.clients), (600_000, 2000, 1, 100));
    assert_eq!(sc.strategies.len(), 1);
    assert_eq!(sc.strategies[0].config.pools[0].backends.len(), 2);
}

#[test]
fn scenario_errors_say_file_line_and_key() {
    // The simulator's own values, checked by the simulator.
    check_error(
        "duration = \"10m\"",
        "duration = \"10 minutes\"",
        "s.toml:2:12: \"10 minutes\" is not a duration: expected a number and a unit, like \"500ms\", \"30s\", \"5m\", \"12h\" or \"1d\"",
    );
    check_error(
        "duration = \"10m\"",
        "duration = \"400d\"",
        "s.toml:2:12: `duration` must be more than 0 and at most 365d",
    );
    check_error("clients = 100", "clients = 0", "s.toml:5:11: `clients` must be 1 to 4000000, not 0");
    check_error(
        "clients = 100",
        "clients = 100\nthink_time = \"normal(3s)\"",
        "s.toml:6:14: \"normal(3s)\" is not a distribution: expected \"5s\", \"exp(5s)\" or \"uniform(1s, 10s)\"",
    );
    check_error("backend = \"a\"", "backend = \"z\"", "s.toml:10:11: pool \"web\" has no backend \"z\" at this point");
    check_error(
        "action = \"fail\"",
        "action = \"explode\"",
        "s.toml:9:10: unknown action \"explode\": expected \"fail\", \"recover\", \"drain\", \"enable\", \"disable\", \"remove\", \"add\", \"weight\", \"reload\" or \"split_weight\"",
    );
    check_error("at = \"5m\"", "at = \"11m\"", "s.toml:8:6: this event is after the end of the run (`duration`)");
    // serde's errors, located and naming the key, as `tether check` reports them.
    check_error("clients = 100", "clients = 100\nclient = 3", "s.toml:6:1: unknown field `client`, expected one of `clients`, `clients_per_ip`, `ramp`, `requests_per_session`, `think_time`, `request_rate`, `away_time`, `service_time`, `header`, `app_cookie`, `replay`, `pool`, `session_idle`");
    check_error(
        "clients = 100",
        "clients = \"many\"",
        "s.toml:5:11: key `clients`: invalid type: string \"many\", expected i64",
    );
    // The pool is a Tether config: `config` checks it, and its errors point at the
    // scenario's own lines.
    check_error(
        "[pools.web.affinity]",
        "algorithm = \"fastest\"\n[pools.web.affinity]",
        "s.toml:14:13: pool \"web\": algorithm \"fastest\" is not known: expected \"round_robin\", \"least_conn\", \"p2c\" or \"random\"",
    );
    check_error(
        "keys = [\"cookie\"]",
        "keys = [\"cookies\"]",
        "s.toml:15:9: pool \"web\": affinity: key \"cookies\" is not known: expected \"cookie\", \"app_cookie:NAME\", \"header:NAME\", \"query:NAME\" or \"client_ip\"",
    );
}

/// A pool whose backends come from DNS cannot be simulated as it is (the simulator looks
/// nothing up): it is refused, not run without those backends.
#[test]
fn a_pool_with_dns_sources_is_refused() {
    let src = GOOD.replacen(
        "[pools.web.affinity]",
        "[[pools.web.dns]]\nname = \"app.example\"\nport = 80\n[pools.web.affinity]",
        1,
    );
    let err = simulate::scenario::parse(&src, "s.toml", None).expect_err("the scenario must be refused").to_string();
    assert!(err.contains("pool \"web\" takes backends from DNS, which the simulator does not look up"), "{err}");
}

/// `[simulate] config = "..."` takes the pools of an existing Tether config (listeners and
/// all, as `tether check` reads it), relative to the scenario's directory.
#[test]
fn a_scenario_can_take_its_pools_from_a_config_file() {
    let dir = temp_dir("config");
    std::fs::write(
        dir.join("tether.toml"),
        "[[listeners]]\nbind = \"127.0.0.1:8080\"\npool = \"web\"\n\n[pools.web]\nalgorithm = \"least_conn\"\n\
         backends = [{ name = \"a\", address = \"10.0.0.1:80\" }, { name = \"b\", address = \"10.0.0.2:80\" }]\n\
         [pools.web.affinity]\nkeys = [\"client_ip\"]\n",
    )
    .unwrap();
    let scenario = dir.join("s.toml");
    std::fs::write(
        &scenario,
        "[simulate]\nduration = \"1m\"\nconfig = \"tether.toml\"\n[workload]\nclients = 50\nrequest_rate = 25\n",
    )
    .unwrap();
    let sc = simulate::scenario::load(&scenario).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sc.strategies.len(), 1);
    assert_eq!(sc.strategies[0].name, "web");
    assert_eq!(sc.strategies[0].config.pools[0].algorithm, tether::config::Algorithm::LeastConn);
    // 50 clients at 25 requests a second in all: each thinks 2 s on average.
    assert_eq!(sc.workload.think_ms, simulate::scenario::Dist::Exp(2000.0));
    let r = simulate::run(&sc, None, &mut |_, _| {});
    assert_eq!(r.strategies[0].keys, "client_ip (table)");
    assert!(r.strategies[0].requests > 0);

    // An error in the referenced config is reported in that file.
    std::fs::write(dir.join("tether.toml"), "[pools.web]\nalgorithm = 3\n").unwrap();
    let err = simulate::scenario::load(&scenario).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:2:13: ", dir.join("tether.toml").display())), "{err}");
    // Both a config and pools of its own: which would it be?
    std::fs::write(
        &scenario,
        "[simulate]\nduration = \"1m\"\nconfig = \"tether.toml\"\n[workload]\nclients = 5\n[pools.x]\n",
    )
    .unwrap();
    let err = simulate::scenario::load(&scenario).unwrap_err().to_string();
    assert_eq!(err, format!("{}:3:10: `config` and `[pools]` in one scenario: keep one of them", scenario.display()));
    let _ = std::fs::remove_dir_all(dir);
}

// === the command ===

use common::Tether;

fn tether() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tether"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-simulate-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_command_prints_a_table_and_writes_a_self_contained_report() {
    let dir = temp_dir("cli");
    let html = dir.join("drain.html");
    let out = tether()
        .args(["simulate", "examples/simulate/drain.toml", "--html"])
        .arg(&html)
        .current_dir(root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for want in ["seed 7, 1000 clients, 20m simulated", "strategy", "cookie", "ip_table", "drains (time to empty"] {
        assert!(stdout.contains(want), "{want:?} missing from:\n{stdout}");
    }
    assert!(stdout.contains(&format!("HTML report: {}", html.display())), "{stdout}");
    // Not a terminal: no progress line.
    assert!(!String::from_utf8_lossy(&out.stderr).contains("simulating"));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("class=\"line\""));
    for external in ["src=", "href=", "<script", "@import", "url("] {
        assert!(!page.contains(external), "the report refers to something outside it: {external}");
    }
    // Same seed, same table; --seed changes it.
    let again = tether().args(["simulate", "examples/simulate/drain.toml"]).current_dir(root()).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&again.stdout), stdout.split("\nHTML report:").next().unwrap());
    let other = tether()
        .args(["simulate", "examples/simulate/drain.toml", "--seed", "8"])
        .current_dir(root())
        .output()
        .unwrap();
    let other = String::from_utf8_lossy(&other.stdout);
    assert!(other.contains("seed 8,") && other.lines().nth(5) != stdout.lines().nth(5), "{other}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_command_reports_located_errors_and_fails() {
    let dir = temp_dir("bad");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, GOOD.replace("clients = 100", "clients = -5")).unwrap();
    let out = tether().arg("simulate").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim(), format!("{}:5:11: `clients` must be 1 to 4000000, not -5", bad.display()));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn every_example_scenario_is_valid() {
    let mut checked = Vec::new();
    for e in std::fs::read_dir(root().join("examples/simulate")).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "toml") {
            simulate::scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
            checked.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    checked.sort();
    assert_eq!(checked, ["canary.toml", "drain.toml", "failure_at_peak.toml", "rebalance.toml", "replay.toml"]);
}

/// The canary example, as docs/simulate.md shows it: Tether's cookie keeps every session in
/// its pool through the weight changes; the hashed header moves some.
#[test]
fn the_canary_example_changes_no_sessions_pool_by_cookie() {
    let sc = simulate::scenario::load(&root().join("examples/simulate/canary.toml")).unwrap();
    let r = simulate::run(&sc, None, &mut |_, _| {});
    let split = |name: &str| r.strategies.iter().find(|s| s.name == name).unwrap().split.clone().unwrap();
    let (cookie, hashed) = (split("release"), split("release_hashed"));
    assert_eq!((cookie.pool_changes, cookie.sessions_changed_pool), (0, 0));
    assert!(hashed.sessions_changed_pool > 0);
    // From 20 minutes on, the canary at 0 takes no new session.
    for s in [&cookie, &hashed] {
        let last = s.segments.last().unwrap();
        assert_eq!((last.from_ms, last.sessions[1]), (20 * 60_000, 0));
        assert!(last.sessions[0] > 0);
    }
}

// === the report in a browser ===

/// The HTML report in headless Chromium: every chart is laid out and every line of it has
/// drawn geometry (`tests/simulate/check.mjs`); a screenshot goes to
/// `target/simulate-report.png`. Needs what `.ci/setup` installs.
#[test]
fn the_html_report_renders_its_charts_in_a_browser() {
    let node_path = root().join("target/pw/node_modules");
    assert!(
        node_path.join("playwright-core").exists() && Path::new("/usr/bin/chromium").exists(),
        "the report test needs Chromium and playwright-core: run .ci/setup first"
    );
    let report = run(RANDOM, None);
    let dir = temp_dir("browser");
    let html = dir.join("report.html");
    std::fs::write(&html, report.html()).unwrap();
    let screenshot = root().join("target/simulate-report.png");
    let _ = std::fs::remove_file(&screenshot);
    let out = Command::new("node")
        .arg(root().join("tests/simulate/check.mjs"))
        .arg(&html)
        .arg(&screenshot)
        .env("NODE_PATH", &node_path)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "browser check failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // Three charts over all strategies, and one per strategy of its backends.
    let charts: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("CHART ")).collect();
    let ids: Vec<&str> = charts.iter().map(|c| c.split(' ').next().unwrap()).collect();
    assert_eq!(ids, ["requests-imbalance", "sessions-imbalance", "broken", "backends-0", "backends-1"], "{stdout}");
    let paths: Vec<Vec<&str>> =
        stdout.lines().filter_map(|l| l.strip_prefix("PATH ")).map(|l| l.split(' ').collect()).collect();
    // Two strategies on each of the first three charts, four backends on each of the last two.
    assert_eq!(paths.len(), 2 * 3 + 4 * 2, "{stdout}");
    for p in &paths {
        let (points, width): (usize, f64) = (p[2].parse().unwrap(), p[3].parse().unwrap());
        assert!(points >= 2 && width > 100.0, "a line that did not draw: {p:?}");
    }
    // The imbalance lines move (a failure and a reload happen): some height somewhere.
    assert!(paths.iter().filter(|p| p[0] == "requests-imbalance").any(|p| p[4].parse::<f64>().unwrap() > 1.0));
    assert!(screenshot.exists(), "no screenshot");
    let _ = std::fs::remove_dir_all(dir);
}

// === replaying a real Tether's access log ===

/// The cookie key of the replay test's Tether (and so of its simulated pools).
const REPLAY_KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

/// One Tether worker (so one round robin cursor per pool, taken in request order), the
/// JSON access log at `log`, a pool `web` with Tether's cookie and a pool `plain` without
/// affinity (its requests belong to no session), both round robin over the same backends.
fn replay_config(backends: &[common::DemoBackend], log: &Path) -> String {
    let list: Vec<String> =
        backends.iter().map(|b| format!("{{ name = \"{}\", address = \"{}\" }}", b.name, b.address)).collect();
    let list = list.join(", ");
    format!(
        "[runtime]\nthreads = 1\n\n[access_log]\nformat = \"json\"\npath = \"{}\"\n\n\
         [[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\npool = \"web\"\n\n\
         [[listeners]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\npool = \"plain\"\n\n\
         [pools.web]\nalgorithm = \"round_robin\"\nbackends = [{list}]\n\
         [pools.web.affinity]\nkeys = [\"cookie\"]\n[pools.web.affinity.cookie]\nkeys = [\"{REPLAY_KEY}\"]\n\n\
         [pools.plain]\nalgorithm = \"round_robin\"\nbackends = [{list}]\n",
        log.display()
    )
}

/// A browser: keeps the cookies responses set (none, for one that refuses cookies).
#[derive(Default)]
struct Browser {
    cookies: Vec<(String, String)>,
    refuses_cookies: bool,
}

impl Browser {
    fn without_cookies() -> Browser {
        Browser { refuses_cookies: true, ..Browser::default() }
    }

    /// One GET on `c`; the backend that answered.
    async fn get(&mut self, c: &mut common::Client) -> String {
        let mut req = http::Request::get("/").header("host", c.addr.to_string());
        if !self.cookies.is_empty() {
            let jar: Vec<String> = self.cookies.iter().map(|(n, v)| format!("{n}={v}")).collect();
            req = req.header("cookie", jar.join("; "));
        }
        let resp = c.request(req.body(Full::<Bytes>::default()).unwrap()).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        if !self.refuses_cookies {
            for v in resp.headers.get_all("set-cookie") {
                let (name, value) = v.to_str().unwrap().split(';').next().unwrap().split_once('=').unwrap();
                self.cookies.retain(|(n, _)| n != name);
                self.cookies.push((name.to_string(), value.to_string()));
            }
        }
        resp.backend()
    }
}

/// The lines of a JSON access log, parsed.
fn log_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// Waits until `path` holds `n` lines, then stops Tether gracefully.
async fn stop_after_lines(mut t: common::Tether, path: &Path, n: usize) {
    let enough = || log_lines(path).len() >= n;
    common::wait_until(&format!("{n} lines in {}", path.display()), Duration::from_secs(10), enough).await;
    t.signal("TERM");
    assert!(t.wait_exit(Duration::from_secs(10)).success(), "{}", t.log());
    assert_eq!(log_lines(path).len(), n, "one line per request");
}

fn replay(dir: &Path, log: &str, pool: &str) -> Report {
    let scenario = dir.join(format!("replay-{pool}.toml"));
    std::fs::write(
        &scenario,
        format!("[simulate]\nconfig = \"tether.toml\"\n\n[workload]\nreplay = \"{log}\"\npool = \"{pool}\"\n"),
    )
    .unwrap();
    let sc = simulate::scenario::load(&scenario).unwrap_or_else(|e| panic!("{e}"));
    simulate::run(&sc, None, &mut |_, _| {})
}

/// Issue 14's replay test. A real Tether (one worker, round robin, Tether's cookie in pool
/// `web`; pool `plain` without affinity) serves real clients, twice: the first run makes
/// sessions, the second, whose log is replayed, sees two of them return with their cookies
/// (sessions open before its log began), two new sessions of several requests, a client
/// that keeps no cookie (a new session every request), and requests to `plain`, which
/// belong to no session. Its log, replayed by the simulator through the same pools, must
/// give (a) the logged backend for every request that hit an existing session, and (b),
/// since the run used round robin, the logged backend for every request, first requests
/// of sessions and sessionless ones included. A copy of the log with two backends changed
/// is replayed too, and must be found out: the comparison is not blind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_real_tethers_log_sends_every_request_where_tether_did() {
    let backends = common::backends(3).await;
    let dir = common::Scratch::new();
    let (first_log, second_log) = (dir.0.join("access-1.log"), dir.0.join("access-2.log"));

    // The first run: sessions a and b are made (and c, which will not return).
    let t = Tether::start(&replay_config(&backends, &first_log));
    let (mut web, mut plain) = (common::Client::connect(t.addrs[0]).await, common::Client::connect(t.addrs[1]).await);
    // a, b and c; c will not return.
    let mut first: [Browser; 3] = Default::default();
    for k in [0, 1, 2, 0, 1] {
        first[k].get(&mut web).await;
    }
    let [mut a, mut b, _] = first;
    plain.get("/").await;
    stop_after_lines(t, &first_log, 6).await;

    // The second run, same config and keys: its log is the one replayed.
    let config = replay_config(&backends, &second_log);
    std::fs::write(dir.0.join("tether.toml"), &config).unwrap();
    let t = Tether::start(&config);
    let (mut web, mut plain) = (common::Client::connect(t.addrs[0]).await, common::Client::connect(t.addrs[1]).await);
    let (mut d, mut e, mut anon) = (Browser::default(), Browser::default(), Browser::without_cookies());
    let mut seen = Vec::new();
    let steps = ["a", "d", "plain", "anon", "d", "b", "e", "plain", "a", "anon", "e", "d", "plain", "a"];
    for who in &steps {
        let backend = match *who {
            "a" => a.get(&mut web).await,
            "b" => b.get(&mut web).await,
            "d" => d.get(&mut web).await,
            "e" => e.get(&mut web).await,
            "anon" => anon.get(&mut web).await,
            _ => plain.get("/").await.backend(),
        };
        seen.push((*who, backend));
    }
    stop_after_lines(t, &second_log, steps.len()).await;

    // The log says what the clients saw, in the order they saw it.
    let lines = log_lines(&second_log);
    let logged: Vec<(&str, &str)> =
        lines.iter().map(|l| (l["pool"].as_str().unwrap(), l["backend"].as_str().unwrap())).collect();
    let expected: Vec<(&str, &str)> =
        seen.iter().map(|(who, b)| (if *who == "plain" { "plain" } else { "web" }, b.as_str())).collect();
    assert_eq!(logged, expected);
    let verdicts: Vec<&str> = lines.iter().map(|l| l["affinity"].as_str().unwrap()).collect();
    let web_lines = lines.iter().filter(|l| l["pool"] == "web").count() as u64;
    let hits = verdicts.iter().filter(|v| **v == "hit").count() as u64;
    // a and b return (4 hits), d and e hit after their first request (3), anon never does.
    assert_eq!((web_lines, hits), (11, 7), "{verdicts:?}");
    assert!(lines.iter().filter(|l| l["pool"] == "plain").all(|l| l["session"].is_null()));
    // Round robin over three backends spread the new sessions and the plain requests.
    let backends_used = |pool: &str| {
        let mut v: Vec<&str> = logged.iter().filter(|(p, _)| *p == pool).map(|(_, b)| *b).collect();
        v.sort_unstable();
        v.dedup();
        v.len()
    };
    assert_eq!((backends_used("web"), backends_used("plain")), (3, 3));

    // The replay of pool web: its strategy is the logged run.
    let report = replay(&dir.0, "access-2.log", "web");
    let web = report.strategies.iter().find(|s| s.name == "web").unwrap();
    let r = web.replay.as_ref().unwrap();
    assert!(r.matches_log);
    assert_eq!((r.counts.lines, r.counts.requests, r.counts.other_pool, r.counts.unparsable), (14, 11, 3, 0));
    assert_eq!(r.seeded, 2, "a and b were open before the log began");
    assert_eq!(r.hits_compared, hits);
    assert_eq!(r.hits_same_backend, r.hits_compared, "(a) a hit on an existing session went elsewhere");
    assert_eq!(r.compared, web_lines);
    assert_eq!(r.same_backend, r.compared, "(b) round robin: a request went elsewhere");
    assert_eq!(web.requests, web_lines);
    // The other strategy replays the same requests but is not the logged run.
    let other = report.strategies.iter().find(|s| s.name == "plain").unwrap();
    assert_eq!((other.requests, other.replay.as_ref().unwrap().matches_log), (web_lines, false));

    // The replay of pool plain: requests of no session, by round robin.
    let report = replay(&dir.0, "access-2.log", "plain");
    let plain = report.strategies.iter().find(|s| s.name == "plain").unwrap();
    let r = plain.replay.as_ref().unwrap();
    assert_eq!((r.counts.requests, r.counts.sessionless), (3, 3));
    assert_eq!((r.compared, r.same_backend), (3, 3), "(b) a request of no session went elsewhere");

    // The command says so too.
    let out = tether().arg("simulate").arg(dir.0.join("replay-web.toml")).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.contains("replay of access-2.log (pool web)"), "{table}");
    assert!(table.contains("same backend as logged for 11 of 11 requests (100.0%), and for 7 of the 7"), "{table}");

    // Not blind: the log with a's last hit and d's first request moved to other backends.
    let other_backend = |b: &str| if b == "app-1" { "app-2" } else { "app-1" };
    let mut changed = 0;
    let mut lines = lines;
    let last_a = seen.iter().rposition(|(w, _)| *w == "a").unwrap();
    let first_d = seen.iter().position(|(w, _)| *w == "d").unwrap();
    for k in [last_a, first_d] {
        let b = lines[k]["backend"].as_str().unwrap().to_string();
        lines[k]["backend"] = other_backend(&b).into();
        changed += 1;
    }
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.0.join("perturbed.log"), text).unwrap();
    let report = replay(&dir.0, "perturbed.log", "web");
    let r = report.strategies.iter().find(|s| s.name == "web").unwrap().replay.clone().unwrap();
    assert_eq!(changed, 2);
    assert_eq!((r.compared, r.same_backend), (11, 9), "both changed lines found out");
    assert_eq!((r.hits_compared, r.hits_same_backend), (7, 6), "the changed hit found out");
}

/// A replay names a Tether JSON access log; anything else is a located error, and lines
/// that are not requests are counted, not fatal.
#[test]
fn a_replay_takes_a_tether_json_log_or_says_where_it_is_not_one() {
    let dir = temp_dir("replay-errors");
    let scenario = |body: &str| {
        let p = dir.join("s.toml");
        std::fs::write(
            &p,
            format!(
                "[simulate]\n\n[workload]\n{body}\n\n[pools.web]\nbackends = [{{ name = \"a\", address = \"10.0.0.1:80\" }}]\n"
            ),
        )
        .unwrap();
        simulate::scenario::load(&p).map_err(|e| e.to_string())
    };
    let at = |what: &str| format!("{}:{what}", dir.join("s.toml").display());
    std::fs::write(dir.join("text.log"), "2026-12-04T10:00:00.000Z 127.0.0.1:5 web \"GET / HTTP/1.1\" 200 pool=web\n")
        .unwrap();
    assert_eq!(
        scenario("replay = \"text.log\"").unwrap_err(),
        at(&format!(
            "4:10: {} is not a Tether JSON access log: none of its first 1 lines is JSON (a text log? set access_log.format = \"json\" for replays)",
            dir.join("text.log").display()
        ))
    );
    std::fs::write(dir.join("other.json"), "{\"level\":\"info\",\"msg\":\"hello\"}\n").unwrap();
    let err = scenario("replay = \"other.json\"").unwrap_err();
    assert!(err.starts_with(&at("4:10: ")) && err.contains("has Tether's fields"), "{err}");
    let err = scenario("replay = \"missing.log\"").unwrap_err();
    assert!(err.starts_with(&at("4:10: cannot read the access log")), "{err}");
    assert_eq!(
        scenario("replay = \"other.json\"\nclients = 5").unwrap_err().lines().last().unwrap(),
        at("5:11: `clients` and `replay` in one workload: a replay's clients are the log's sessions")
    );
    let err = scenario("clients = 5\npool = \"web\"").unwrap_err();
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        [at("1:1: `duration` is missing: how long to simulate"), at("5:8: `pool` is for replays: it needs `replay`")]
    );
    let err = scenario("replay = \"other.json\"\nthink_time = \"1s\"").unwrap_err();
    assert!(err.contains(&at("5:14: `think_time` is for synthetic clients")), "{err}");

    // A log with junk in it: counted, replayed around.
    let good = "{\"time\":\"2026-12-04T10:00:00.000Z\",\"status\":200,\"pool\":\"web\",\"backend\":\"a\",\"affinity\":\"-\",\"session\":null,\"total_ms\":1.0}";
    let later = good.replace("10:00:00.000Z", "10:00:02.500Z");
    std::fs::write(dir.join("mixed.log"), format!("{good}\n\u{0}garbage\n{{}}\n{later}\n")).unwrap();
    let sc = scenario("replay = \"mixed.log\"").unwrap();
    assert_eq!(sc.duration_ms, 2501, "up to the last line");
    let r = simulate::run(&sc, None, &mut |_, _| {});
    assert_eq!(r.replay.as_deref(), Some("mixed.log (pool web)"), "the pool of the first request");
    let s = &r.strategies[0];
    let rep = s.replay.as_ref().unwrap();
    assert_eq!((rep.counts.lines, rep.counts.requests, rep.counts.unparsable), (4, 2, 2));
    assert_eq!((s.requests, rep.compared, rep.same_backend), (2, 2, 2));
    let _ = std::fs::remove_dir_all(dir);
}

/// Worked by hand: a session idle for longer than `session_idle` is forgotten, and when its
/// next line is a `hit` it was still open at the logged Tether: it is pinned again where
/// the log says, not placed anew. Session s: new at 0 s (round robin's first turn: a), a
/// hit at 1 s; idle from 1 s, so over at 61 s; a hit on b at 10 min (the logged Tether had
/// moved it, say, before a restart of this log's window). Session t: new at 2 s (second
/// turn: b). Every request goes where the log says; s is opened twice (seeded the second
/// time), t once.
#[test]
fn an_idle_session_is_forgotten_and_seeded_again_where_the_log_says() {
    let dir = temp_dir("replay-idle");
    let line = |time: &str, backend: &str, verdict: &str, session: &str| {
        format!(
            "{{\"time\":\"2026-12-04T10:{time}Z\",\"status\":200,\"pool\":\"web\",\"backend\":\"{backend}\",\"affinity\":\"{verdict}\",\"session\":\"{session}\",\"total_ms\":3.2}}\n"
        )
    };
    let s = "00000000000000a1";
    let t = "00000000000000b2";
    let log = [
        line("00:00.000", "a", "new", s),
        line("00:01.000", "a", "hit", s),
        line("00:02.000", "b", "new", t),
        line("10:00.000", "b", "hit", s),
    ]
    .concat();
    std::fs::write(dir.join("access.log"), log).unwrap();
    std::fs::write(
        dir.join("s.toml"),
        "[simulate]\nsample = \"1s\"\n[workload]\nreplay = \"access.log\"\nsession_idle = \"1m\"\n\
         [pools.web]\nbackends = [{ name = \"a\", address = \"10.0.0.1:80\" }, { name = \"b\", address = \"10.0.0.2:80\" }, { name = \"c\", address = \"10.0.0.3:80\" }]\n\
         [pools.web.affinity]\nkeys = [\"cookie\"]\n",
    )
    .unwrap();
    let sc = simulate::scenario::load(&dir.join("s.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sc.duration_ms, 600_001);
    let r = simulate::run(&sc, None, &mut |_, _| {});
    let web = &r.strategies[0];
    let rep = web.replay.as_ref().unwrap();
    assert_eq!((web.requests, web.sessions, rep.seeded), (4, 3, 1));
    assert_eq!((rep.compared, rep.same_backend, rep.hits_compared, rep.hits_same_backend), (4, 4, 2, 2));
    assert_eq!((verdict(web, "new"), verdict(web, "hit")), (2, 2));
    // s was over at 61 s: nothing moved while it was in progress.
    assert_eq!((web.moved(), web.broken), (0, 0));
    // In progress at 30 s: s on a, t on b; at 5 min: none.
    let at = |ms: u64| r.strategies[0].samples.iter().find(|p| p.t_ms == ms).unwrap().sessions_per_backend.clone();
    let on = |v: Vec<(String, u32)>| v.into_iter().map(|(_, n)| n).collect::<Vec<_>>();
    assert_eq!(on(at(30_000)), [1, 1, 0]);
    assert_eq!(on(at(300_000)), [0, 0, 0]);
    let _ = std::fs::remove_dir_all(dir);
}

/// Worked by hand. Rebalancing on or off is a strategy like any other: three pools of the
/// same config but for `[affinity.rebalance]`. Six clients send a request every 2 s (t = 0,
/// 2, 4, 6, 8 s); round robin places them a, b, a, b, a, b (clients 0, 2, 4 on a; 1, 3, 5
/// on b). Backend c is added at 500 ms. At t=2 s the mean is 6/3 = 2 and factor 1.2 makes
/// 2.4 the most a backend may keep: a holds 3, so client 0, idle since t=0 (2 s, more than
/// `idle` = 1 s), moves to c (0 sessions, 1 after, within the mean); then b holds 3, so
/// client 1 moves to c (1, then 2: still within the mean). Now a and b hold 2 each, within
/// 2.4: nobody else moves, then or later. So 30 requests: 6 new, 2 repin:rebalance, 22
/// hit; two sessions moved, both told, by the sample at 3 s. Without rebalancing, or with
/// `idle` = 3 s (every client asks every 2 s, and the simulator tells the pool of each
/// request, so none is ever idle that long), nobody moves and c gets nothing.
#[test]
fn golden_rebalancing_moves_idle_sessions_to_an_added_backend() {
    let pool = |name: &str, rebalance: &str| {
        format!(
            "[pools.{name}]\nbackends = [\n  {{ name = \"a\", address = \"10.0.0.1:80\" }},\n  {{ name = \"b\", address = \"10.0.0.2:80\" }},\n]\n[pools.{name}.affinity]\nkeys = [\"cookie\"]\n{rebalance}\n"
        )
    };
    let src = format!(
        r#"
[simulate]
duration = "9s"
sample = "1s"
[workload]
clients = 6
ramp = "0s"
requests_per_session = 1000
think_time = "2s"
[[events]]
at = "500ms"
action = "add"
backend = "c"
address = "10.0.0.3:80"
{}{}{}"#,
        pool("sticky", ""),
        pool("rebalanced", "[pools.rebalanced.affinity.rebalance]\nfactor = 1.2\nidle = \"1s\"\n"),
        pool("busy", "[pools.busy.affinity.rebalance]\nfactor = 1.2\nidle = \"3s\"\n"),
    );
    let r = run(&src, None);
    let at = |s: &StrategyReport, t_ms: u64| {
        let sample = s.samples.iter().find(|x| x.t_ms == t_ms).unwrap();
        let on = |b: &str| sample.sessions_per_backend.iter().find(|(n, _)| n == b).map_or(0, |(_, k)| *k);
        (on("a"), on("b"), on("c"))
    };
    let rebalanced = r.strategies.iter().find(|s| s.name == "rebalanced").unwrap();
    assert_eq!(rebalanced.requests, 30);
    assert_eq!(
        (verdict(rebalanced, "new"), verdict(rebalanced, "repin:rebalance"), verdict(rebalanced, "hit")),
        (6, 2, 22)
    );
    assert_eq!((moves(rebalanced, "repin:rebalance"), rebalanced.broken, rebalanced.broken_silently), (2, 2, 0));
    assert_eq!((at(rebalanced, 3000), at(rebalanced, 9000)), ((2, 2, 2), (2, 2, 2)));
    for name in ["sticky", "busy"] {
        let s = r.strategies.iter().find(|s| s.name == name).unwrap();
        assert_eq!((verdict(s, "new"), verdict(s, "hit"), s.moved(), s.broken), (6, 24, 0, 0), "{name}");
        assert_eq!(at(s, 9000), (3, 3, 0), "{name}");
    }
}

// === traffic splits ===

/// Two splits of a blue and a green pool (one backend each) at 50/50: one by Tether's
/// cookie, one by a hashed header; green goes to weight 0 at 17 s.
fn split_scenario(green_to_zero_at: &str) -> String {
    let pool = |name: &str, backend: &str, affinity: &str| {
        format!(
            "[pools.{name}]\nbackends = [{{ name = \"{backend}\", address = \"10.0.0.1:80\" }}]\n[pools.{name}.affinity]\n{}\n",
            affinity.replace("POOL", name)
        )
    };
    let cookie = "keys = [\"cookie\"]\n[pools.POOL.affinity.cookie]\ntoken_version = 2";
    let hashed = "keys = [\"header:X-User\"]\nmapping = \"hash\"";
    format!(
        r#"
[simulate]
duration = "60s"
sample = "5s"
seed = 3
strategies = ["by_cookie", "by_hash"]
[workload]
clients = 400
ramp = "0s"
requests_per_session = 5
think_time = "1s"
away_time = "1s"
header = "X-User"
[[events]]
at = "{green_to_zero_at}"
action = "split_weight"
pool = "green"
weight = 0
[[events]]
at = "{green_to_zero_at}"
action = "split_weight"
pool = "green_h"
weight = 0
[[listeners]]
bind = "127.0.0.1:8080"
[[listeners.routes]]
name = "by_cookie"
split = [{{ pool = "blue", weight = 50 }}, {{ pool = "green", weight = 50 }}]
[[listeners.routes]]
path_prefix = "/h/"
name = "by_hash"
split = [{{ pool = "blue_h", weight = 50 }}, {{ pool = "green_h", weight = 50 }}]
{}{}{}{}"#,
        pool("blue", "b1", cookie),
        pool("green", "g1", cookie),
        pool("blue_h", "b1", hashed),
        pool("green_h", "g1", hashed),
    )
}

/// Worked by hand. 400 clients start at t=0 (no ramp); a session is 5 requests a second
/// apart, then the client is away 1 s, so every client starts sessions at 0, 5, 10, ... 60 s
/// (13 each, the one at 60 s cut to its first request by the end): 5200 sessions and
/// 400 x (12 x 5 + 1) = 24 400 requests. Green goes to weight 0 at 17 s, between the
/// sessions of 15 s (requests at 15 to 19 s) and those of 20 s.
///
/// With the cookie: the 1600 sessions of 0 to 15 s pick a pool by weight, each green with
/// chance 1/2 (within 4.5 standard deviations of 800); from 17 s, the 3600 new sessions
/// (20 to 60 s) all go blue, and green gets exactly the rest of its sessions of 15 s: 3
/// requests each (17, 18, 19 s), however many there were (the sample at 20 s counts them:
/// it holds the requests of 15 to 19 s). No session ever changes pool.
///
/// With a hashed header, each client's pool is its hash's, so a client's sessions stay in
/// one pool while the weights stay; at 17 s green takes no key, and its sessions of 15 s
/// move to blue mid-session: exactly those sessions change pool, once each.
#[test]
fn golden_split_weight_to_zero_shifts_only_new_sessions() {
    let r = run(&split_scenario("17s"), None);
    let [cookie, hashed] = &r.strategies[..] else { panic!("two strategies") };
    for s in [cookie, hashed] {
        assert_eq!((s.sessions, s.requests, s.failed, s.refused), (5200, 24_400, 0, 0), "{}", s.name);
    }
    let split = cookie.split.as_ref().expect("a split strategy has its split's report");
    assert_eq!(split.pools, ["blue", "green"]);
    assert_eq!(split.segments.iter().map(|x| x.from_ms).collect::<Vec<_>>(), [0, 17_000]);
    let (before, after) = (&split.segments[0], &split.segments[1]);
    assert_eq!(before.sessions.iter().sum::<u64>(), 1600);
    let sd = (1600.0f64 * 0.25).sqrt();
    assert!((before.sessions[1] as f64 - 800.0).abs() <= 4.5 * sd, "green's sessions: {:?}", before.sessions);
    assert_eq!(after.sessions, [3600, 0], "a pool at weight 0 takes no new session");
    let green_at_15 = cookie.samples.iter().find(|x| x.t_ms == 20_000).unwrap().pool_sessions[1];
    assert!(green_at_15 > 0, "some sessions of 15 s in green");
    assert_eq!(after.requests[1], 3 * green_at_15, "green keeps exactly its sessions in progress");
    assert_eq!(split.requests.iter().sum::<u64>(), 24_400);
    assert_eq!(split.sessions, [before.sessions[0] + 3600, before.sessions[1]]);
    assert_eq!((split.pool_changes, split.sessions_changed_pool), (0, 0));
    assert_eq!((cookie.moved(), cookie.broken), (0, 0));

    let split = hashed.split.as_ref().unwrap();
    let green_at_15 = hashed.samples.iter().find(|x| x.t_ms == 20_000).unwrap().pool_sessions[1];
    assert!(green_at_15 > 0);
    assert_eq!(split.segments[1].requests[1], 0, "a hashed key keeps nothing at weight 0");
    assert_eq!((split.pool_changes, split.sessions_changed_pool), (green_at_15, green_at_15));
    assert_eq!(split.segments[1].sessions, [3600, 0]);
    // The clients' share of green within the binomial tolerance, every session the same.
    let sd = (400.0f64 * 0.25).sqrt();
    assert!((green_at_15 as f64 - 200.0).abs() <= 4.5 * sd, "{green_at_15} of 400 clients hash to green");
    assert_eq!(split.segments[0].sessions[1], 4 * green_at_15);
}

/// A split's table shows each pool's new sessions and requests between events, and the
/// sessions that changed pool; the HTML report charts both per pool.
#[test]
fn the_report_shows_a_split_per_pool() {
    let r = run(&split_scenario("17s"), None);
    let table = r.table();
    assert!(table.contains("traffic split by_cookie: 0 sessions changed pool (0 requests"), "{table}");
    let line = table.lines().find(|l| l.trim_start().starts_with("17s")).expect("a row from the event");
    assert!(line.contains("3600 100.0%") && line.contains("0   0.0%"), "{line}");
    let html = r.html();
    for id in ["split-sessions-0", "split-requests-0", "split-sessions-1", "split-requests-1"] {
        assert!(html.contains(&format!("id=\"{id}\"")), "{id}");
    }
    // The same seed, the same split.
    assert_eq!(run(&split_scenario("17s"), None), r);
}

/// A split's two charts per split strategy in headless Chromium: laid out, with a line
/// drawn for each pool.
#[test]
fn the_html_report_renders_a_splits_charts_in_a_browser() {
    let node_path = root().join("target/pw/node_modules");
    assert!(
        node_path.join("playwright-core").exists() && Path::new("/usr/bin/chromium").exists(),
        "the report test needs Chromium and playwright-core: run .ci/setup first"
    );
    let report = run(&split_scenario("17s"), None);
    let dir = temp_dir("browser-split");
    let html = dir.join("report.html");
    std::fs::write(&html, report.html()).unwrap();
    let screenshot = root().join("target/simulate-split-report.png");
    let _ = std::fs::remove_file(&screenshot);
    let out = Command::new("node")
        .arg(root().join("tests/simulate/check.mjs"))
        .arg(&html)
        .arg(&screenshot)
        .env("NODE_PATH", &node_path)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "browser check failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let charts: Vec<&str> =
        stdout.lines().filter_map(|l| l.strip_prefix("CHART ")).map(|c| c.split(' ').next().unwrap()).collect();
    assert_eq!(
        &charts[charts.len() - 4..],
        ["split-sessions-0", "split-requests-0", "split-sessions-1", "split-requests-1"],
        "{stdout}"
    );
    let paths: Vec<Vec<&str>> =
        stdout.lines().filter_map(|l| l.strip_prefix("PATH ")).map(|l| l.split(' ').collect()).collect();
    for id in &charts[charts.len() - 4..] {
        let lines: Vec<&Vec<&str>> = paths.iter().filter(|p| p[0] == *id).collect();
        assert_eq!(lines.len(), 2, "one line per pool on {id}: {stdout}");
        for p in lines {
            let (points, width): (usize, f64) = (p[2].parse().unwrap(), p[3].parse().unwrap());
            assert!(points >= 2 && width > 100.0, "a line that did not draw: {p:?}");
        }
    }
    assert!(screenshot.exists(), "no screenshot");
    let _ = std::fs::remove_dir_all(dir);
}

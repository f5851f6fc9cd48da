//! `PoolAffinity::decide` and `failover` as a table: every key kind against every state a
//! session's backend can be in, for pools that re-pin and pools that are strict, with
//! table and hash mapping, and bounded load. Each row is one line. No sockets, no config
//! file: the pool comes from the shared fixture, and time is passed in.

#[path = "support/fixture.rs"]
mod fixture;

use std::time::Duration;

use http::{HeaderMap, Uri};
use tether::affinity::keys::{h1_set_cookies, http_set_cookies};
use tether::affinity::token::{KeyRing, Token, Version};
use tether::affinity::verdict::{Reason, Verdict};
use tether::affinity::{Decision, Target};
use tether::config::{AdminState, CheckKind, Health, KeySource, Mapping, OnUnavailable, TokenVersion};

use fixture::{affinity, client, h1_request, header, Fixture};

/// A key kind and the mapping it uses.
#[derive(Debug, Clone, Copy)]
enum Key {
    Cookie,
    AppCookie,
    HeaderTable,
    HeaderHash,
    QueryTable,
    IpTable,
    IpHash,
}

/// What happens to the session's backend between the first request and the next.
#[derive(Debug, Clone, Copy)]
enum State {
    Up,
    Down,
    Draining,
    /// Draining for longer than `drain_timeout`.
    DrainExpired,
    Disabled,
    /// A reload removed it.
    Removed,
}

/// What the next request must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// The same backend, verdict `hit`.
    Stay,
    /// Another backend, with this verdict.
    Move(Verdict),
    /// A hashed key whose backend is gone simply hashes elsewhere: a `hit` there.
    Rehash,
    /// Refused (strict pool): the 503 the proxy answers, for this reason.
    Refuse(Reason),
}

use Expect::*;
use Key::*;
use State::*;

const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

#[rustfmt::skip]
const ROWS: &[(Key, State, bool, Expect)] = &[
    // key          state          strict  expect
    (Cookie,        Up,            false,  Stay),
    (Cookie,        Draining,      false,  Stay),
    (Cookie,        DrainExpired,  false,  Move(Verdict::Repin(Reason::Drained))),
    (Cookie,        Down,          false,  Move(Verdict::Repin(Reason::Down))),
    (Cookie,        Disabled,      false,  Move(Verdict::Repin(Reason::Disabled))),
    (Cookie,        Removed,       false,  Move(Verdict::Repin(Reason::Removed))),
    (Cookie,        Up,            true,   Stay),
    (Cookie,        Draining,      true,   Stay),
    (Cookie,        DrainExpired,  true,   Refuse(Reason::Drained)),
    (Cookie,        Down,          true,   Refuse(Reason::Down)),
    (Cookie,        Disabled,      true,   Refuse(Reason::Disabled)),
    (Cookie,        Removed,       true,   Refuse(Reason::Removed)),
    (AppCookie,     Up,            false,  Stay),
    (AppCookie,     Draining,      false,  Stay),
    (AppCookie,     DrainExpired,  false,  Move(Verdict::Repin(Reason::Drained))),
    (AppCookie,     Down,          false,  Move(Verdict::Repin(Reason::Down))),
    (AppCookie,     Disabled,      false,  Move(Verdict::Repin(Reason::Disabled))),
    (AppCookie,     Removed,       false,  Move(Verdict::Repin(Reason::Removed))),
    (AppCookie,     Down,          true,   Refuse(Reason::Down)),
    (AppCookie,     Removed,       true,   Refuse(Reason::Removed)),
    (HeaderTable,   Up,            false,  Stay),
    (HeaderTable,   Draining,      false,  Stay),
    (HeaderTable,   DrainExpired,  false,  Move(Verdict::Repin(Reason::Drained))),
    (HeaderTable,   Down,          false,  Move(Verdict::Repin(Reason::Down))),
    (HeaderTable,   Disabled,      false,  Move(Verdict::Repin(Reason::Disabled))),
    (HeaderTable,   Removed,       false,  Move(Verdict::Repin(Reason::Removed))),
    (HeaderTable,   Down,          true,   Refuse(Reason::Down)),
    (HeaderTable,   Disabled,      true,   Refuse(Reason::Disabled)),
    (HeaderHash,    Up,            false,  Stay),
    (HeaderHash,    Draining,      false,  Stay),
    (HeaderHash,    DrainExpired,  false,  Move(Verdict::Repin(Reason::Drained))),
    (HeaderHash,    Down,          false,  Move(Verdict::Repin(Reason::Down))),
    (HeaderHash,    Disabled,      false,  Move(Verdict::Repin(Reason::Disabled))),
    (HeaderHash,    Removed,       false,  Rehash),
    (HeaderHash,    Up,            true,   Stay),
    (HeaderHash,    Down,          true,   Refuse(Reason::Down)),
    (HeaderHash,    DrainExpired,  true,   Refuse(Reason::Drained)),
    (HeaderHash,    Removed,       true,   Rehash),
    (QueryTable,    Up,            false,  Stay),
    (QueryTable,    Down,          false,  Move(Verdict::Repin(Reason::Down))),
    (QueryTable,    Disabled,      true,   Refuse(Reason::Disabled)),
    (IpTable,       Up,            false,  Stay),
    (IpTable,       Draining,      false,  Stay),
    (IpTable,       Down,          false,  Move(Verdict::Repin(Reason::Down))),
    (IpTable,       Removed,       false,  Move(Verdict::Repin(Reason::Removed))),
    (IpTable,       Down,          true,   Refuse(Reason::Down)),
    (IpHash,        Up,            false,  Stay),
    (IpHash,        Disabled,      false,  Move(Verdict::Repin(Reason::Disabled))),
    (IpHash,        Disabled,      true,   Refuse(Reason::Disabled)),
];

/// The pool's key chain for a key kind.
fn pool_for(key: Key, strict: bool) -> Fixture {
    let (keys, mapping) = match key {
        Cookie => (vec![KeySource::Cookie], Mapping::Table),
        AppCookie => (vec![KeySource::AppCookie("JSESSIONID".into())], Mapping::Table),
        HeaderTable => (vec![KeySource::Header("x-user".into())], Mapping::Table),
        HeaderHash => (vec![KeySource::Header("x-user".into())], Mapping::Hash),
        QueryTable => (vec![KeySource::Query("sid".into())], Mapping::Table),
        IpTable => (vec![KeySource::ClientIp], Mapping::Table),
        IpHash => (vec![KeySource::ClientIp], Mapping::Hash),
    };
    let mut a = affinity(keys, mapping);
    a.drain_timeout = Some(DRAIN_TIMEOUT);
    if strict {
        a.on_unavailable = OnUnavailable::Strict;
    }
    Fixture::new(a)
}

/// Which parser reads a row's requests and responses: hyper's (`HeaderMap` and `Uri`), or
/// Tether's HTTP/1 codec over raw bytes. `shape` varies how the bytes are written.
#[derive(Debug, Clone, Copy)]
enum Via {
    Http,
    H1 { shape: usize },
}

/// Decides a request given as a header map and URI, read through `via`. As HTTP/1 bytes,
/// field names are not in the map's lower case; with an odd `shape` the target is in
/// absolute form, names are upper case and each cookie pair has a `Cookie` field of its own.
fn decide_via(f: &Fixture, via: Via, headers: &HeaderMap, uri: &Uri, now: u64) -> Decision {
    let Via::H1 { shape } = via else { return f.decide(headers, uri, client(), now) };
    let odd = shape % 2 == 1;
    let target = if odd { format!("http://shop.example{uri}") } else { uri.to_string() };
    let mut fields = Vec::new();
    for (name, value) in headers {
        let value = value.to_str().unwrap();
        let name = if odd {
            name.as_str().to_ascii_uppercase()
        } else {
            name.as_str().split('-').map(|w| w[..1].to_ascii_uppercase() + &w[1..]).collect::<Vec<_>>().join("-")
        };
        if odd && name == "COOKIE" {
            fields.extend(value.split("; ").map(|pair| (name.clone(), pair.to_string())));
        } else {
            fields.push((name, value.to_string()));
        }
    }
    let fields: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    f.decide_h1(&h1_request(&target, &fields), client(), now)
}

/// The backend at index `backend` answered with `Set-Cookie: set_cookie`; Tether learns
/// from it, through `via`.
fn learn_via(f: &Fixture, via: Via, set_cookie: &str, backend: usize) {
    match via {
        Via::Http => {
            let mut response = HeaderMap::new();
            response.insert(http::header::SET_COOKIE, set_cookie.parse().unwrap());
            f.affinity.learn(http_set_cookies(&response), backend);
        }
        Via::H1 { .. } => {
            let text = format!(
                "HTTP/1.1 200 OK\r\nset-cookie: theme=dark\r\nContent-Length: 0\r\nSET-COOKIE: {set_cookie}\r\n\r\n"
            );
            let head = tether::h1::response::parse(text.as_bytes(), 64 * 1024, false).unwrap().unwrap();
            f.affinity.learn(h1_set_cookies(text.as_bytes(), &head), backend);
        }
    }
}

/// Starts a session as a client would, and returns the request that carries it and the
/// name of the backend it is pinned to.
fn start_session(f: &Fixture, key: Key, now: u64) -> (HeaderMap, Uri, String) {
    start_session_via(f, key, now, Via::Http)
}

fn start_session_via(f: &Fixture, key: Key, now: u64, via: Via) -> (HeaderMap, Uri, String) {
    let uri = Uri::from_static("/shop?sid=s-7731");
    let (headers, first) = match key {
        Cookie => {
            let first = decide_via(f, via, &HeaderMap::new(), &uri, now);
            assert_eq!(first.verdict, Verdict::New);
            (header("cookie", f.cookie_header(&first).to_str().unwrap()), first)
        }
        AppCookie => {
            // The application on app-2 set its session cookie; Tether learned it.
            learn_via(f, via, "JSESSIONID=abc123; Path=/", 1);
            let h = header("cookie", "JSESSIONID=abc123");
            let first = decide_via(f, via, &h, &uri, now);
            (h, first)
        }
        HeaderTable | HeaderHash => {
            let h = header("x-user", "user-48213");
            let first = decide_via(f, via, &h, &uri, now);
            (h, first)
        }
        QueryTable | IpTable | IpHash => (HeaderMap::new(), decide_via(f, via, &HeaderMap::new(), &uri, now)),
    };
    let home = f.target_name(&first).expect("the first request has a backend").to_string();
    (headers, uri, home)
}

fn health() -> Health {
    Health {
        check: CheckKind::Tcp,
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        rise: 1,
        fall: 1,
        eject_after: 0,
        eject_time: Duration::from_secs(1),
        max_ejected: 0.5,
    }
}

/// Puts the session's backend into `state`; returns the pool the next request sees and
/// the time it comes at.
fn apply(f: Fixture, state: State, home: &str, now: u64) -> (Fixture, u64) {
    let i = f.backends.iter().position(|b| b.name == home).unwrap();
    let b = &f.backends[i];
    match state {
        Up => {}
        Down => b.record_check(&health(), Err("refused")),
        Draining => b.set_admin_state(AdminState::Draining),
        DrainExpired => {
            b.set_admin_state(AdminState::Draining);
            let later = b.draining_since() + DRAIN_TIMEOUT.as_millis() as u64 + 1;
            return (f, later.max(now));
        }
        Disabled => b.set_admin_state(AdminState::Disabled),
        Removed => return (f.reloaded_without(i), now),
    }
    (f, now)
}

fn check(f: &Fixture, d: &Decision, home: &str, expect: Expect) -> Result<(), String> {
    let to = f.target_name(d);
    let ok = match expect {
        Stay => d.verdict == Verdict::Hit && to == Some(home),
        Rehash => d.verdict == Verdict::Hit && to.is_some_and(|t| t != home),
        Move(v) => d.verdict == v && to.is_some_and(|t| t != home),
        Refuse(r) => d.verdict == Verdict::Repin(r) && d.target == Target::Strict(r),
    };
    ok.then_some(()).ok_or_else(|| format!("got {:?} to {to:?} (home {home})", d.verdict))
}

/// What two runs of a row can be compared by: everything of the decision but the random
/// parts of a token (its session id and stamps).
type Outcome = (Verdict, Option<String>, Target, bool, bool, Option<tether::affinity::Pin>, Option<u64>);

/// One row, its requests read through `via`: the outcome, or why it is not the expected one.
fn run_row(key: Key, state: State, strict: bool, expect: Expect, via: Via) -> Result<Outcome, String> {
    let now = tether::time::unix_millis();
    let f = pool_for(key, strict);
    let (headers, uri, home) = start_session_via(&f, key, now, via);
    let (f, at) = apply(f, state, &home, now);
    let d = decide_via(&f, via, &headers, &uri, at);
    check(&f, &d, &home, expect)?;
    // A moved token session keeps its id and gets a token for its new backend.
    if let (Cookie, Move(_)) = (key, expect) {
        assert!(d.issue.is_some() && d.session.is_some(), "{key:?} / {state:?}: moved without a new token");
    }
    let to = f.target_name(&d).map(str::to_string);
    Ok((d.verdict, to, d.target, d.issue.is_some(), d.session.is_some(), d.key, d.hash))
}

#[test]
fn every_key_kind_in_every_backend_state() {
    let mut failures = Vec::new();
    for &(key, state, strict, expect) in ROWS {
        if let Err(e) = run_row(key, state, strict, expect, Via::Http) {
            failures.push(format!("{key:?} / {state:?} / strict={strict}: expected {expect:?}, {e}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} rows failed:\n{}", failures.len(), ROWS.len(), failures.join("\n"));
}

/// The same table with every request written as raw HTTP/1.1 bytes and read by Tether's
/// own codec (`h1::request::parse`, `H1Keys`), and the app's `Set-Cookie` read from
/// a response head of the codec: each row must get its expected outcome, and the very same
/// decision as through hyper's types.
#[test]
fn every_row_decides_the_same_from_http1_bytes() {
    let mut failures = Vec::new();
    for (shape, &(key, state, strict, expect)) in ROWS.iter().enumerate() {
        let row = format!("{key:?} / {state:?} / strict={strict} / shape {shape}");
        let h1 = run_row(key, state, strict, expect, Via::H1 { shape });
        let http = run_row(key, state, strict, expect, Via::Http);
        match (h1, http) {
            (Ok(a), Ok(b)) if a == b => {}
            (Ok(a), Ok(b)) => failures.push(format!("{row}: h1 decided {a:?}, hyper's types {b:?}")),
            (Err(e), _) => failures.push(format!("{row}: expected {expect:?} over h1, {e}")),
            (_, Err(e)) => failures.push(format!("{row}: expected {expect:?} over hyper's types, {e}")),
        }
    }
    assert!(failures.is_empty(), "{} of {} rows failed:\n{}", failures.len(), ROWS.len(), failures.join("\n"));
}

#[rustfmt::skip]
const TOKEN_AGES: &[(&str, u64, u64, Verdict, bool)] = &[
    // what                           idle s  age s    verdict on the next request  Set-Cookie?
    ("fresh",                         10,     10,      Verdict::Hit,                false),
    ("idle over a quarter of 30 min", 500,    500,     Verdict::Hit,                true),
    ("idle over 30 min",              1_801,  1_801,   Verdict::Expired,            true),
    ("older than 12 h, still active", 10,     43_201,  Verdict::Expired,            true),
];

/// Token time comes from the caller's clock: a request `idle` seconds after the token's
/// last-seen stamp, and `age` seconds after it was issued.
#[test]
fn token_idle_and_absolute_timeouts() {
    for &(what, idle, age, verdict, set_cookie) in TOKEN_AGES {
        let f = Fixture::new(fixture::cookie());
        let uri = Uri::from_static("/");
        let issued_at = tether::time::unix_millis();
        let first = f.decide(&HeaderMap::new(), &uri, client(), issued_at);
        // Keep the session active (a request every 1,000 s) until `idle` seconds before
        // `at`, then come back at `at`, `age` seconds after the token was issued.
        let at = issued_at + age * 1000;
        let last_active = at - idle * 1000;
        let mut headers = header("cookie", f.cookie_header(&first).to_str().unwrap());
        let mut t = issued_at;
        while t < last_active {
            t = (t + 1_000_000).min(last_active);
            let d = f.decide(&headers, &uri, client(), t);
            assert_eq!(d.verdict, Verdict::Hit, "{what}: keeping the session active");
            if d.issue.is_some() {
                headers = header("cookie", f.cookie_header(&d).to_str().unwrap());
            }
        }
        let d = f.decide(&headers, &uri, client(), at);
        assert_eq!(d.verdict, verdict, "{what}");
        assert_eq!(d.issue.is_some(), set_cookie, "{what}: Set-Cookie");
        if let Some(t) = &d.issue {
            assert_eq!(t.last_seen, at / 1000, "{what}: a new or refreshed token is stamped now");
        }
    }
}

#[test]
fn bounded_load_places_new_sessions_under_the_cap() {
    let mut a = fixture::cookie();
    a.max_sessions_factor = Some(1.25);
    let f = Fixture::new(a);
    f.backends[0].set_sessions(10);
    // The cap is ceil(1.25 * 11 / 3) = 5: app-1 takes no new session until others catch up.
    for n in 0..8 {
        let d = f.decide(&HeaderMap::new(), &Uri::from_static("/"), client(), tether::time::unix_millis());
        assert_eq!(d.verdict, Verdict::New);
        assert_ne!(f.target_name(&d), Some("app-1"), "new session {n} went over the cap");
    }
    // A session already on app-1 stays there: bounded load only steers placement.
    let mut a = fixture::cookie();
    a.max_sessions_factor = Some(1.25);
    let f = Fixture::new(a);
    let now = tether::time::unix_millis();
    let first = f.decide(&HeaderMap::new(), &Uri::from_static("/"), client(), now);
    let home = f.target_name(&first).unwrap().to_string();
    let i = f.backends.iter().position(|b| b.name == home).unwrap();
    f.backends[i].set_sessions(100);
    let d =
        f.decide(&header("cookie", f.cookie_header(&first).to_str().unwrap()), &Uri::from_static("/"), client(), now);
    assert_eq!((d.verdict, f.target_name(&d)), (Verdict::Hit, Some(home.as_str())));
}

#[test]
fn bounded_load_moves_a_hashed_key_off_an_overloaded_backend() {
    let mut a = affinity(vec![KeySource::Header("x-user".into())], Mapping::Hash);
    a.max_sessions_factor = Some(1.25);
    let f = Fixture::new(a);
    let (h, uri, now) = (header("x-user", "user-48213"), Uri::from_static("/"), tether::time::unix_millis());
    let first = f.decide(&h, &uri, client(), now);
    let home = first.backend().unwrap();
    for _ in 0..10 {
        f.backends[home].acquire();
    }
    let d = f.decide(&h, &uri, client(), now);
    assert_eq!(d.verdict, Verdict::Overload);
    assert!(d.backend().is_some_and(|i| i != home), "{d:?}");
}

#[test]
fn failover_repins_unless_strict() {
    for strict in [false, true] {
        for key in [Cookie, HeaderTable, HeaderHash] {
            let f = pool_for(key, strict);
            let now = tether::time::unix_millis();
            let (headers, uri, home) = start_session(&f, key, now);
            let mut d = f.decide(&headers, &uri, client(), now);
            let failed = d.backend().unwrap();
            assert_eq!(f.target_name(&d), Some(home.as_str()));
            let moved = f.failover(&mut d, failed, now);
            if strict {
                assert_eq!(moved, None, "{key:?}: a strict pool does not move a session that was home");
                continue;
            }
            let to = moved.expect("another backend takes it");
            assert_ne!(to, failed);
            assert_eq!((d.verdict, d.target), (Verdict::Repin(Reason::Down), Target::Use(to)), "{key:?}");
            assert_eq!(d.issue.is_some(), matches!(key, Cookie), "{key:?}: a moved token session gets a new token");
        }
    }
}

/// A token stamped ahead of this instance's clock (another instance's clock runs fast, or
/// this one stepped back) is trusted within `cookie.clock_skew`, and counts as absent
/// beyond it.
#[test]
fn tokens_from_a_clock_ahead_are_trusted_within_the_skew() {
    let mut a = fixture::cookie();
    a.cookie.clock_skew = Duration::from_secs(300);
    let f = Fixture::new(a);
    let uri = Uri::from_static("/");
    let issued_at = tether::time::unix_millis();
    let first = f.decide(&HeaderMap::new(), &uri, client(), issued_at);
    let headers = header("cookie", f.cookie_header(&first).to_str().unwrap());
    let behind = |secs: u64| f.decide(&headers, &uri, client(), issued_at - secs * 1000);
    let d = behind(290);
    assert_eq!((d.verdict, f.target_name(&d)), (Verdict::Hit, f.target_name(&first)));
    assert_eq!(behind(310).verdict, Verdict::Expired);
}

/// Changing a pool's table settings (capacity, idle timeout) or the cookie idle timeout
/// on reload used to start empty tables: every learned pin was lost.
#[test]
fn a_reload_with_new_table_settings_keeps_learned_pins() {
    for key in [HeaderTable, AppCookie, IpTable] {
        let f = pool_for(key, false);
        let now = tether::time::unix_millis();
        let (headers, uri, home) = start_session(&f, key, now);
        let mut cfg = f.affinity.cfg.clone();
        cfg.table.capacity = 50_000;
        cfg.table.idle_timeout = Duration::from_secs(600);
        cfg.cookie.idle_timeout = Duration::from_secs(600);
        let f = f.reloaded_with(&cfg);
        let d = f.decide(&headers, &uri, client(), now);
        assert_eq!((d.verdict, f.target_name(&d)), (Verdict::Hit, Some(home.as_str())), "{key:?}");
    }
}

/// Each kind of table-mapped key has its own table: a flood of new `?sid=` values cannot
/// push out an application's session just learned from its `Set-Cookie`, nor a header key
/// placed once and not yet seen again (both would be the first to go in a shared table).
#[test]
fn a_flood_of_one_kind_of_key_leaves_the_other_kinds_alone() {
    let keys = vec![
        KeySource::AppCookie("JSESSIONID".into()),
        KeySource::Header("x-user".into()),
        KeySource::Query("sid".into()),
    ];
    let mut a = affinity(keys, Mapping::Table);
    // 64 a shard (16 shards): room for the 20 keys of each kind however the table's random
    // seed spreads them (at 4 a shard, five of them landing in one shard happened), and
    // still ten times over for the flood.
    a.table.capacity = 1024;
    let f = Fixture::new(a);
    let now = tether::time::unix_millis();
    let root = Uri::from_static("/");
    for n in 0..20 {
        let mut response = HeaderMap::new();
        response.insert(http::header::SET_COOKIE, format!("JSESSIONID=s{n}; Path=/").parse().unwrap());
        f.affinity.learn(http_set_cookies(&response), n % 3);
    }
    let users: Vec<_> = (0..20)
        .map(|n| {
            let h = header("x-user", &format!("user-{n}"));
            let home = f.decide(&h, &root, client(), now).backend();
            (h, home)
        })
        .collect();
    for n in 0..10_000 {
        let uri: Uri = format!("/?sid=flood-{n}").parse().unwrap();
        f.decide(&HeaderMap::new(), &uri, client(), now);
    }
    for n in 0..20 {
        let d = f.decide(&header("cookie", &format!("JSESSIONID=s{n}")), &root, client(), now);
        assert_eq!((d.verdict, d.backend()), (Verdict::Hit, Some(n % 3)), "session s{n}");
    }
    for (n, (h, home)) in users.iter().enumerate() {
        let d = f.decide(h, &root, client(), now);
        assert_eq!((d.verdict, d.backend()), (Verdict::Hit, *home), "user-{n}");
    }
}

/// A session's cookie sealed by hand with the fixture's key: `version`, pinned to backend
/// `backend` of pool "p", recording `pool`, last seen `age` seconds before `now_ms`.
fn sealed_cookie(f: &Fixture, version: Version, backend: usize, pool: Option<u64>, now_ms: u64, age: u64) -> HeaderMap {
    let ring = KeyRing::from_base64([fixture::KEY]).unwrap();
    let now = now_ms / 1000;
    let t = Token { backend: f.affinity.ids[backend], pool, session: [9; 16], issued: now - age, last_seen: now - age };
    let sealed = ring.seal_as(version, &t);
    assert_eq!(sealed.as_str().len(), version.str_len());
    header("cookie", &format!("lang=en; tether={sealed}"))
}

/// A version 2 token records its pool; one of another pool counts as absent (`invalid`)
/// even when it names a backend of this pool, and the new session's token records this
/// pool. Version 1 tokens record none and stay valid.
#[test]
fn a_v2_token_of_another_pool_is_invalid() {
    let now = tether::time::unix_millis();
    let uri = Uri::from_static("/");
    let (p, q) = (tether::affinity::pool_id("p"), tether::affinity::pool_id("q"));
    assert_ne!(p, q);
    for issuing in [TokenVersion::V1, TokenVersion::V2] {
        let mut a = fixture::cookie();
        a.cookie.token_version = issuing;
        let f = Fixture::new(a);
        let d = f.decide(&sealed_cookie(&f, Version::V2, 2, Some(q), now, 0), &uri, client(), now);
        assert_eq!(d.verdict, Verdict::Invalid, "issuing {issuing:?}");
        assert_eq!(d.issue.map(|t| t.pool), Some(Some(p)), "the new session's token is this pool's");
        // The same token in this pool, or with no pool recorded, keeps its backend.
        for (version, pool) in [(Version::V2, Some(p)), (Version::V2, None), (Version::V1, Some(q))] {
            let d = f.decide(&sealed_cookie(&f, version, 2, pool, now, 0), &uri, client(), now);
            assert_eq!((d.verdict, d.backend()), (Verdict::Hit, Some(2)), "{version:?} {pool:?}");
        }
    }
}

/// The rollout: a pool opens both versions whichever it issues, and a refreshed cookie is
/// sealed in the version the pool issues.
#[test]
fn both_token_versions_hit_and_refresh_into_the_issued_one() {
    let now = tether::time::unix_millis();
    let uri = Uri::from_static("/");
    for issuing in [TokenVersion::V1, TokenVersion::V2] {
        let mut a = fixture::cookie();
        a.cookie.token_version = issuing;
        let f = Fixture::new(a);
        for presented in [Version::V1, Version::V2] {
            // Fresh: a hit without Set-Cookie.
            let d = f.decide(&sealed_cookie(&f, presented, 1, None, now, 0), &uri, client(), now);
            assert_eq!((d.verdict, d.backend(), d.issue.is_some()), (Verdict::Hit, Some(1), false));
            // Idle for more than a quarter of the idle timeout: refreshed, same backend.
            let d = f.decide(&sealed_cookie(&f, presented, 1, None, now, 1000), &uri, client(), now);
            assert_eq!((d.verdict, d.backend()), (Verdict::Hit, Some(1)), "{issuing:?} {presented:?}");
            let refreshed = f.cookie_header(&d);
            let value = refreshed.to_str().unwrap().split("tether=").nth(1).unwrap();
            assert_eq!(value.len(), issuing.str_len(), "{issuing:?} refreshing {presented:?}");
            let d = f.decide(&header("cookie", refreshed.to_str().unwrap()), &uri, client(), now);
            assert_eq!((d.verdict, d.backend()), (Verdict::Hit, Some(1)));
        }
    }
}

/// A pool of three that rebalances (factor 1.2, idle 300 ms, `rate` moves a second), with
/// app-3 disabled while 30 sessions of `key` are placed on app-1 and app-2 (about 15 each:
/// round robin gives a disabled backend's turns to positions spread by a hash).
/// Returns the pool and each session's request headers.
fn rebalancing_pool(key: Key, rate: u32, now: u64) -> (Fixture, Vec<HeaderMap>) {
    let mut cfg = pool_for(key, false).affinity.cfg.clone();
    cfg.rebalance =
        Some(tether::config::Rebalance { factor: 1.2, idle: Duration::from_millis(300), max_per_second: rate });
    let f = Fixture::new(cfg);
    f.backends[2].set_admin_state(AdminState::Disabled);
    let sessions: Vec<HeaderMap> = (0..30)
        .map(|n| {
            let d = match key {
                HeaderTable => f.decide(&header("x-user", &format!("user-{n}")), &Uri::from_static("/"), client(), now),
                _ => f.decide(&HeaderMap::new(), &Uri::from_static("/"), client(), now),
            };
            assert_eq!(d.verdict, Verdict::New);
            let activity = &f.affinity.rebalancer().expect("the pool rebalances").activity;
            let id = u128::from_le_bytes(d.identity().unwrap());
            activity.begin(id, now, Duration::from_millis(300));
            activity.end(id, now + 5, true);
            match key {
                HeaderTable => header("x-user", &format!("user-{n}")),
                _ => header("cookie", f.cookie_header(&d).to_str().unwrap()),
            }
        })
        .collect();
    f.affinity.recount_sessions(&f.backends);
    let counts: Vec<u32> = f.backends.iter().map(|b| b.sessions()).collect();
    assert!(counts[0] >= 13 && counts[1] >= 13 && counts[0] + counts[1] == 30 && counts[2] == 0, "{counts:?}");
    f.backends[2].set_admin_state(AdminState::Enabled);
    (f, sessions)
}

#[test]
fn rebalancing_moves_idle_sessions_until_the_factor_holds_and_never_active_ones() {
    for key in [Cookie, HeaderTable] {
        let now = tether::time::unix_millis();
        let (f, sessions) = rebalancing_pool(key, 1000, now);
        let activity = &f.affinity.rebalancer().unwrap().activity;
        let uri = Uri::from_static("/");
        // Sessions 0 to 9 are active: 0 to 4 have a request in flight since long ago, 5 to
        // 9 made one 100 ms ago. They must stay, however unbalanced the pool.
        let homes: Vec<usize> = sessions.iter().map(|h| f.decide(h, &uri, client(), now).backend().unwrap()).collect();
        for h in &sessions[..5] {
            let d = f.decide(h, &uri, client(), now);
            activity.begin(u128::from_le_bytes(d.identity().unwrap()), now + 10, Duration::from_millis(300));
        }
        let later = now + 1000;
        for h in &sessions[5..10] {
            let id = u128::from_le_bytes(f.decide(h, &uri, client(), now).identity().unwrap());
            activity.begin(id, later - 100, Duration::from_millis(300));
            activity.end(id, later - 100, true);
        }
        let mut moved = 0;
        for (n, h) in sessions.iter().enumerate() {
            let d = f.decide(h, &uri, client(), later);
            if n < 10 {
                assert_eq!((d.verdict, d.backend()), (Verdict::Hit, Some(homes[n])), "{key:?}: active session {n}");
            } else if d.verdict == Verdict::Repin(Reason::Rebalance) {
                assert_eq!(f.target_name(&d), Some("app-3"), "{key:?}: session {n}");
                moved += 1;
            } else {
                assert_eq!((d.verdict, d.backend()), (Verdict::Hit, Some(homes[n])), "{key:?}: session {n}");
            }
        }
        // The mean is 10, so 12 is the most a backend may hold: three move off each.
        assert_eq!(moved, 6, "{key:?}");
        assert_eq!(f.backends.iter().map(|b| b.sessions()).collect::<Vec<_>>(), [12, 12, 6], "{key:?}");
        // The counts the next recount finds agree, and the moved sessions stay moved.
        f.affinity.recount_sessions(&f.backends);
        assert_eq!(f.backends.iter().map(|b| b.sessions()).collect::<Vec<_>>(), [12, 12, 6], "{key:?}");
    }
}

#[test]
fn rebalancing_moves_at_most_its_rate() {
    let now = tether::time::unix_millis();
    let (f, sessions) = rebalancing_pool(Cookie, 2, now);
    let uri = Uri::from_static("/");
    let moves_at = |t: u64| {
        sessions.iter().filter(|h| f.decide(h, &uri, client(), t).verdict == Verdict::Repin(Reason::Rebalance)).count()
    };
    // A burst of two, then two a second.
    assert_eq!(moves_at(now + 1000), 2);
    assert_eq!(moves_at(now + 1100), 0);
    assert_eq!(moves_at(now + 1600), 1);
    assert_eq!(moves_at(now + 2600), 2);
}

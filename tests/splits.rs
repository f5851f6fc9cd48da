//! Traffic splits (`split`): a real Tether in front of two pools of real demo backends,
//! `blue` and `green`, under live sticky clients. Weights move to 0 and back through the
//! admin API and through reloads; no session of Tether's cookie or of a table-mapped key
//! changes pool, hashed keys move only off a pool whose weight went down, and new sessions
//! follow the weights within a binomial bound for the sample's size.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use serde_json::Value;

const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

/// How the clients keep their sessions.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Sticky {
    /// Tether's cookie, version 2 tokens.
    Cookie,
    /// `X-User`, table-mapped.
    Table,
    /// `X-User`, hashed.
    Hashed,
    /// The demo app's own session cookie, learned from its `Set-Cookie`.
    AppCookie,
    /// The client's address (from `X-Forwarded-For`, the test being a trusted proxy),
    /// table-mapped.
    ClientIp,
}

impl Sticky {
    fn affinity(self) -> String {
        match self {
            Sticky::Cookie => format!("keys = [\"cookie\"]\n[AFF.cookie]\nkeys = [\"{KEY}\"]\ntoken_version = 2\n"),
            Sticky::Table => "keys = [\"header:x-user\"]\n".into(),
            Sticky::Hashed => "keys = [\"header:x-user\"]\nmapping = \"hash\"\n".into(),
            Sticky::AppCookie => "keys = [\"app_cookie:demo_visitor\"]\n".into(),
            Sticky::ClientIp => "keys = [\"client_ip\"]\n".into(),
        }
    }
}

/// Two pools of two demo backends each, split by `weights` (blue, green) on the one route.
fn split_config(sticky: Sticky, b: &[DemoBackend], weights: (u32, u32)) -> String {
    let mut s = format!(
        "{ADMIN}\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n\n\
         [[listeners.routes]]\nname = \"release\"\n\
         split = [{{ pool = \"blue\", weight = {} }}, {{ pool = \"green\", weight = {} }}]\n",
        weights.0, weights.1
    );
    for (pool, members) in [("blue", &b[..2]), ("green", &b[2..])] {
        s.push_str(&format!("\n[pools.{pool}]\nbackends = [\n"));
        for m in members {
            s.push_str(&format!("  {{ name = \"{}\", address = \"{}\" }},\n", m.name, m.address));
        }
        let affinity = sticky.affinity().replace("AFF", &format!("pools.{pool}.affinity"));
        s.push_str(&format!("]\n[pools.{pool}.affinity]\n{affinity}"));
    }
    s
}

async fn pools_of_backends() -> Vec<DemoBackend> {
    let mut v = Vec::new();
    for name in ["blue-1", "blue-2", "green-1", "green-2"] {
        v.push(DemoBackend::start(name, "127.0.0.1:0".parse().unwrap()).await.unwrap());
    }
    v
}

/// One client's session: its key, and where it was served.
#[derive(Debug, Clone)]
struct Session {
    user: String,
    /// The client's address, for `Sticky::ClientIp`.
    ip: String,
    cookie: Option<String>,
    backend: String,
}

impl Session {
    fn new(user: String) -> Session {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + NEXT.fetch_add(1, Ordering::Relaxed)).to_string();
        Session { user, ip, cookie: None, backend: String::new() }
    }

    fn pool(&self) -> &str {
        self.backend.split('-').next().unwrap_or("")
    }
}

/// One request of `s` (its cookie or its header), on a connection of its own; keeps the
/// cookie Tether sets and where the request was served.
async fn visit(addr: SocketAddr, sticky: Sticky, s: &mut Session) {
    let mut r = Request::get("/").header("host", addr.to_string());
    let cookie = match sticky {
        Sticky::Cookie => "tether",
        Sticky::AppCookie => "demo_visitor",
        _ => "",
    };
    match (sticky, &s.cookie) {
        (Sticky::Cookie | Sticky::AppCookie, Some(c)) => r = r.header("cookie", format!("{cookie}={c}")),
        (Sticky::Cookie | Sticky::AppCookie, None) => {}
        (Sticky::Table | Sticky::Hashed, _) => r = r.header("x-user", &s.user),
        (Sticky::ClientIp, _) => r = r.header("x-forwarded-for", &s.ip),
    }
    let resp = Client::connect(addr).await.request(r.body(Full::default()).unwrap()).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let prefix = format!("{cookie}=");
    let mut ours = resp.headers.get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()?.strip_prefix(&*prefix));
    if let Some(v) = ours.next_back().filter(|_| !cookie.is_empty()) {
        s.cookie = Some(v.split(';').next().unwrap().to_string());
    }
    s.backend = resp.backend();
    assert!(s.pool() == "blue" || s.pool() == "green", "served by {:?}", s.backend);
}

/// `n` new sessions, each after its first request.
async fn open(addr: SocketAddr, sticky: Sticky, tag: &str, n: usize) -> Vec<Session> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut s = Session::new(format!("{tag}-{i}"));
        visit(addr, sticky, &mut s).await;
        if sticky == Sticky::Cookie || sticky == Sticky::AppCookie {
            assert!(s.cookie.is_some(), "a new session gets its cookie");
        }
        out.push(s);
    }
    out
}

/// Whether `k` of `n` is the share `p` within 4.5 standard deviations of a binomial
/// sample of that size (a false alarm about once in 150 000 runs), plus one for rounding.
fn within(k: usize, n: usize, p: f64) -> bool {
    let sd = (p * (1.0 - p) * n as f64).sqrt();
    (k as f64 - p * n as f64).abs() <= 4.5 * sd + 1.0
}

fn share_of(sessions: &[Session], pool: &str) -> usize {
    sessions.iter().filter(|s| s.pool() == pool).count()
}

/// Every session once more; returns the sessions that changed pool (as `user: from ->
/// to`), and checks that those that kept their pool kept their backend too.
async fn revisit(addr: SocketAddr, sticky: Sticky, sessions: &mut [Session]) -> Vec<String> {
    let mut moved = Vec::new();
    for s in sessions.iter_mut() {
        let before = s.backend.clone();
        visit(addr, sticky, s).await;
        if s.backend.split('-').next() != before.split('-').next() {
            moved.push(format!("{}: {before} -> {}", s.user, s.backend));
        } else {
            assert_eq!(s.backend, before, "{} kept its pool but changed backend", s.user);
        }
    }
    moved
}

/// Counts one request of each session in `served`, by the pool that served it.
fn count(sessions: &[Session], served: &mut HashMap<String, u64>) {
    for s in sessions {
        *served.entry(s.pool().to_string()).or_default() += 1;
    }
}

async fn call(admin: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut c = Client::connect(admin).await;
    let r = Request::builder().method(method).uri(path).header("host", admin.to_string());
    let resp = c.request(r.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await;
    (resp.status.as_u16(), serde_json::from_slice(&resp.body).unwrap_or(Value::Null))
}

async fn set_weights(admin: SocketAddr, blue: u32, green: u32) {
    let body = format!("{{\"weights\": {{\"blue\": {blue}, \"green\": {green}}}}}");
    let (status, v) = call(admin, "PUT", "/api/splits/release/weights", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["weights"], serde_json::json!({ "blue": blue, "green": green }));
}

/// The split's requests per pool as the admin API counts them.
async fn split_requests(admin: SocketAddr) -> HashMap<String, u64> {
    let v = admin_json(admin, "/api/splits").await;
    let split = &v["splits"][0];
    assert_eq!(split["name"], "release");
    split["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["pool"].as_str().unwrap().to_string(), p["requests"].as_u64().unwrap()))
        .collect()
}

/// A pool's live sessions as the admin API's split listing shows them.
async fn live_sessions(admin: SocketAddr, pool: &str) -> u64 {
    let v = admin_json(admin, "/api/splits").await;
    let pools = v["splits"][0]["pools"].as_array().unwrap().clone();
    pools.iter().find(|p| p["pool"] == pool).unwrap()["live_sessions"].as_u64().unwrap()
}

/// The scenario every kind of stickiness goes through: 50/50, green to 0 by the admin
/// API, back by a reload, blue to 0 by a reload, then 90/10.
async fn weights_move_under_live_sessions(sticky: Sticky) {
    let b = pools_of_backends().await;
    let t = Tether::start(&split_config(sticky, &b, (50, 50)));
    let (addr, admin) = (t.addr(), t.admin());
    let mut served = HashMap::<String, u64>::new();

    // 50/50: new sessions split evenly, and stay where they were put.
    let n = 120;
    let mut sessions = open(addr, sticky, "a", n).await;
    count(&sessions, &mut served);
    assert!(within(share_of(&sessions, "green"), n, 0.5), "green took {} of {n}", share_of(&sessions, "green"));
    assert_eq!(revisit(addr, sticky, &mut sessions).await, Vec::<String>::new());
    count(&sessions, &mut served);
    let green_before: Vec<String> = sessions.iter().filter(|s| s.pool() == "green").map(|s| s.user.clone()).collect();
    assert!(!green_before.is_empty());

    // Green to 0 through the admin API: green's sessions stay (a hashed key cannot: it
    // moves to blue, and only green's keys move); no new session goes to green.
    set_weights(admin, 50, 0).await;
    let moved = revisit(addr, sticky, &mut sessions).await;
    count(&sessions, &mut served);
    if sticky == Sticky::Hashed {
        let mut expected: Vec<String> = green_before.iter().map(|u| u.to_string()).collect();
        let mut got: Vec<String> = moved.iter().map(|m| m.split(':').next().unwrap().to_string()).collect();
        expected.sort();
        got.sort();
        assert_eq!(got, expected, "hashed keys move off green, and only they");
    } else {
        assert_eq!(moved, Vec::<String>::new(), "no session changes pool when green goes to weight 0");
    }
    let fresh = open(addr, sticky, "b", n).await;
    count(&fresh, &mut served);
    assert_eq!(share_of(&fresh, "green"), 0, "a new session went to green at weight 0");
    if sticky != Sticky::Hashed {
        // What green still holds at weight 0, as the admin API shows it (sessions are
        // recounted once a second).
        let want = green_before.len() as u64;
        wait_until_async("the API counts green's live sessions", Duration::from_secs(5), || async move {
            live_sessions(admin, "green").await == want
        })
        .await;
    }

    // The file changes green's weight (the admin API's 0 was set over 50, so the file's
    // new value wins): 0 for blue, 100 for green. Every session stays in its pool.
    reload(&t, &split_config(sticky, &b, (0, 100)), "config reloaded").await;
    assert!(t.log().contains("reload: split \"release\": blue 0, green 100 (was blue 50, green 50)"), "{}", t.log());
    let mut all: Vec<Session> = sessions.into_iter().chain(fresh).collect();
    let moved = revisit(addr, sticky, &mut all).await;
    count(&all, &mut served);
    if sticky == Sticky::Hashed {
        // Blue at 0 now: every key is green's.
        assert!(all.iter().all(|s| s.pool() == "green"), "blue at weight 0 kept a hashed key");
    } else {
        assert_eq!(moved, Vec::<String>::new(), "no session changes pool when blue goes to weight 0");
        // And the sessions green kept at weight 0 are still green's.
        for u in &green_before {
            assert_eq!(all.iter().find(|s| &s.user == u).unwrap().pool(), "green", "{u}");
        }
    }
    let fresh = open(addr, sticky, "c", n).await;
    count(&fresh, &mut served);
    assert_eq!(share_of(&fresh, "blue"), 0, "a new session went to blue at weight 0");

    // 90/10 by a reload: new sessions follow; old ones stay.
    reload(&t, &split_config(sticky, &b, (90, 10)), "config reloaded").await;
    let moved = revisit(addr, sticky, &mut all).await;
    count(&all, &mut served);
    if sticky == Sticky::Hashed {
        // Keys move only to blue, whose weight went up.
        assert!(moved.iter().all(|m| m.contains(": green-") && m.contains("-> blue-")), "{moved:?}");
    } else {
        assert_eq!(moved, Vec::<String>::new());
    }
    let m = 300;
    let fresh = open(addr, sticky, "d", m).await;
    count(&fresh, &mut served);
    let green = share_of(&fresh, "green");
    assert!(within(green, m, 0.1), "green took {green} of {m} new sessions at weight 10 of 100");

    // The admin API counted every request where it went.
    let counted = split_requests(admin).await;
    assert_eq!(counted, served, "the split's request counts");
    let metrics = get(admin, "/metrics").await.text();
    for (pool, n) in &served {
        let line = format!("tether_split_requests_total{{listener=\"web\",route=\"release\",pool=\"{pool}\"}} {n}");
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
    }
    assert!(metrics.contains("tether_split_weight{listener=\"web\",route=\"release\",pool=\"green\"} 10"), "{metrics}");
}

#[tokio::test]
async fn cookie_sessions_keep_their_pool_while_weights_move() {
    weights_move_under_live_sessions(Sticky::Cookie).await;
}

#[tokio::test]
async fn table_mapped_sessions_keep_their_pool_while_weights_move() {
    weights_move_under_live_sessions(Sticky::Table).await;
}

#[tokio::test]
async fn hashed_keys_move_only_the_share_a_weight_change_must() {
    weights_move_under_live_sessions(Sticky::Hashed).await;
}

#[tokio::test]
async fn app_cookie_sessions_keep_their_pool_while_weights_move() {
    weights_move_under_live_sessions(Sticky::AppCookie).await;
}

#[tokio::test]
async fn client_ip_sessions_keep_their_pool_while_weights_move() {
    weights_move_under_live_sessions(Sticky::ClientIp).await;
}

/// The split's weights as the admin API shows them, by pool.
async fn weights(admin: SocketAddr) -> Vec<(String, u64)> {
    let v = admin_json(admin, "/api/splits").await;
    v["splits"][0]["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["pool"].as_str().unwrap().to_string(), p["weight"].as_u64().unwrap()))
        .collect()
}

fn pair(blue: u64, green: u64) -> Vec<(String, u64)> {
    vec![("blue".into(), blue), ("green".into(), green)]
}

#[tokio::test]
async fn admin_weights_are_checked_and_last_until_the_file_changes_them() {
    let b = pools_of_backends().await;
    let t = Tether::start(&split_config(Sticky::Table, &b, (50, 50)));
    let admin = t.admin();
    let path = "/api/splits/release/weights";
    for (method, path, body, status) in [
        ("PUT", "/api/splits/nope/weights", "{\"weights\": {\"blue\": 1}}", 404),
        ("DELETE", "/api/splits/nope/weights", "", 404),
        ("PUT", path, "{\"weights\": {\"red\": 1}}", 400),
        ("PUT", path, "{\"weights\": {\"blue\": 1001}}", 400),
        ("PUT", path, "{\"weights\": {\"blue\": -1}}", 400),
        ("PUT", path, "{\"weights\": {}}", 400),
        ("PUT", path, "{\"weight\": 3}", 400),
        ("PUT", path, "not json", 400),
        ("PUT", path, "{\"weights\": {\"blue\": 0, \"green\": 0}}", 409),
    ] {
        let (got, v) = call(admin, method, path, body).await;
        assert_eq!(got, status, "{method} {path} {body}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    // Nothing of those changed anything.
    assert_eq!(weights(admin).await, pair(50, 50));
    // One pool's weight alone; the other keeps its own.
    let (status, v) = call(admin, "PUT", path, "{\"weights\": {\"green\": 0}}").await;
    assert_eq!((status, &v["weights"]), (200, &serde_json::json!({ "blue": 50, "green": 0 })));
    // Blue to 0 as well would leave no pool for a new session.
    let (status, _) = call(admin, "PUT", path, "{\"weights\": {\"blue\": 0}}").await;
    assert_eq!(status, 409);
    assert_eq!(weights(admin).await, pair(50, 0));

    // A reload that does not change the split keeps the API's weights...
    let unchanged = split_config(Sticky::Table, &b, (50, 50))
        .replace("[pools.blue]", "[timeouts]\nconnect = \"2s\"\n\n[pools.blue]");
    reload(&t, &unchanged, "config reloaded").await;
    assert_eq!(weights(admin).await, pair(50, 0));
    // ... a config with errors changes nothing ...
    let broken = split_config(Sticky::Table, &b, (50, 50)).replace("weight = 50 }]", "weight = 5000 }]");
    reload(&t, &broken, "reload rejected").await;
    assert!(t.log().contains("pool \"green\" weight 5000 is out of range"), "{}", t.log());
    assert_eq!(weights(admin).await, pair(50, 0));
    // ... and one that changes blue's weight keeps green's, which the file did not change.
    reload(&t, &split_config(Sticky::Table, &b, (70, 50)), "config reloaded").await;
    assert_eq!(weights(admin).await, pair(70, 0));
    // The file changes green: the file wins.
    reload(&t, &split_config(Sticky::Table, &b, (70, 30)), "config reloaded").await;
    assert_eq!(weights(admin).await, pair(70, 30));
    // DELETE gives the file's weights back.
    call(admin, "PUT", path, "{\"weights\": {\"blue\": 1, \"green\": 2}}").await;
    assert_eq!(weights(admin).await, pair(1, 2));
    let (status, v) = call(admin, "DELETE", path, "").await;
    assert_eq!((status, &v["weights"]), (200, &serde_json::json!({ "blue": 70, "green": 30 })));
    assert_eq!(weights(admin).await, pair(70, 30));
}

#[tokio::test]
async fn a_session_whose_pool_leaves_the_split_is_a_new_one() {
    let b = pools_of_backends().await;
    let t = Tether::start(&split_config(Sticky::Cookie, &b, (1, 1)));
    let addr = t.addr();
    let mut sessions = open(addr, Sticky::Cookie, "a", 40).await;
    let green: Vec<usize> = (0..sessions.len()).filter(|i| sessions[*i].pool() == "green").collect();
    assert!(!green.is_empty() && green.len() < sessions.len(), "both pools have sessions");
    // Green leaves the split (the pool itself stays configured).
    let without_green = split_config(Sticky::Cookie, &b, (1, 1)).replace(", { pool = \"green\", weight = 1 }", "");
    assert_ne!(without_green, split_config(Sticky::Cookie, &b, (1, 1)));
    reload(&t, &without_green, "config reloaded").await;
    let moved = revisit(addr, Sticky::Cookie, &mut sessions).await;
    let mut expected: Vec<String> = green.iter().map(|i| sessions[*i].user.clone()).collect();
    let mut got: Vec<String> = moved.iter().map(|m| m.split(':').next().unwrap().to_string()).collect();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "exactly green's sessions moved");
    assert!(sessions.iter().all(|s| s.pool() == "blue"));
    // They are blue's now, and stay when green comes back.
    reload(&t, &split_config(Sticky::Cookie, &b, (1, 1)), "config reloaded").await;
    assert_eq!(revisit(addr, Sticky::Cookie, &mut sessions).await, Vec::<String>::new());
}

#[tokio::test]
async fn a_version_1_token_from_before_the_split_finds_its_pool_by_its_backend() {
    let b = pools_of_backends().await;
    // Before: the route goes to green alone, whose tokens are version 1.
    let split = split_config(Sticky::Cookie, &b, (100, 0));
    let before = split
        .replace("split = [{ pool = \"blue\", weight = 100 }, { pool = \"green\", weight = 0 }]", "pool = \"green\"")
        .replace("name = \"release\"\n", "")
        .replace("token_version = 2", "token_version = 1");
    let t = Tether::start(&before);
    let addr = t.addr();
    let mut sessions = open(addr, Sticky::Cookie, "v1", 10).await;
    assert!(sessions.iter().all(|s| s.pool() == "green"));
    // After: a split that gives green no new session; the version 1 tokens still go there.
    reload(&t, &split, "config reloaded").await;
    assert_eq!(revisit(addr, Sticky::Cookie, &mut sessions).await, Vec::<String>::new());
    assert_eq!(share_of(&open(addr, Sticky::Cookie, "new", 20).await, "green"), 0);
}

#[tokio::test]
async fn http2_requests_are_split_and_stay_in_their_pool() {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let b = pools_of_backends().await;
    let t = Tether::start(&split_config(Sticky::Cookie, &b, (1, 1)));
    let (addr, admin) = (t.addr(), t.admin());
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut send = async |cookie: Option<&str>| -> (String, Option<String>) {
        let mut r = Request::get(format!("http://{addr}/"));
        if let Some(c) = cookie {
            r = r.header("cookie", format!("tether={c}"));
        }
        h2.ready().await.unwrap();
        let resp = h2.send_request(r.body(Full::<Bytes>::default()).unwrap()).await.unwrap();
        let backend = resp.headers().get("x-backend").unwrap().to_str().unwrap().to_string();
        let cookie = resp
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok()?.strip_prefix("tether="))
            .map(|v| v.split(';').next().unwrap().to_string())
            .next_back();
        resp.into_body().collect().await.unwrap();
        (backend, cookie)
    };
    let mut clients = Vec::new();
    for _ in 0..40 {
        let (backend, cookie) = send(None).await;
        clients.push((backend, cookie.expect("a new session gets Tether's cookie")));
    }
    let greens = clients.iter().filter(|(b, _)| b.starts_with("green")).count();
    assert!(within(greens, 40, 0.5), "green took {greens} of 40");
    set_weights(admin, 0, 1).await;
    for (backend, cookie) in &clients {
        assert_eq!(&send(Some(cookie)).await.0, backend, "an HTTP/2 session changed backend");
    }
    for _ in 0..20 {
        assert!(send(None).await.0.starts_with("green"), "a new HTTP/2 session went to blue at weight 0");
    }
}

#[tokio::test]
async fn a_warm_restart_keeps_the_split_table_and_the_admin_weights() {
    let b = pools_of_backends().await;
    let scratch = Scratch::new();
    let config = format!(
        "[runtime]\nstate_dir = \"{}\"\n{}",
        scratch.0.join("state").display(),
        split_config(Sticky::Table, &b, (50, 50))
    );
    let mut t = Tether::start(&config);
    let mut sessions = open(t.addr(), Sticky::Table, "a", 60).await;
    let greens = share_of(&sessions, "green");
    assert!(greens > 0 && greens < sessions.len(), "both pools have sessions");
    set_weights(t.admin(), 50, 0).await;
    t.signal("TERM");
    t.wait_log("warm restart: saved").await;
    assert!(t.wait_exit(Duration::from_secs(20)).success(), "{}", t.log());

    // Started again: the API's weights are back, green keeps its sessions at weight 0 (a
    // split that had forgotten its table would place them all in blue), and takes no
    // new one.
    let t = Tether::start(&config);
    assert!(t.log().contains("warm restart: restored"), "{}", t.log());
    assert_eq!(weights(t.admin()).await, pair(50, 0));
    assert_eq!(revisit(t.addr(), Sticky::Table, &mut sessions).await, Vec::<String>::new());
    assert_eq!(share_of(&sessions, "green"), greens);
    assert_eq!(share_of(&open(t.addr(), Sticky::Table, "b", 40).await, "green"), 0);
}

#[tokio::test]
async fn tether_check_counts_splits_and_locates_their_errors() {
    let b = pools_of_backends().await;
    let scratch = Scratch::new();
    let check = |text: &str| {
        let path = scratch.write("tether.toml", text);
        let out = std::process::Command::new(bin()).arg("check").arg("-c").arg(&path).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = check(&split_config(Sticky::Cookie, &b, (90, 10)));
    assert!(ok && out.contains("ok (1 listeners, 2 pools, 4 backends, 1 splits)"), "{out}");
    // Version 1 tokens in a split pool: refused, at the pool's place in the split.
    let v1 = split_config(Sticky::Cookie, &b, (90, 10)).replacen("token_version = 2", "token_version = 1", 1);
    let (ok, out) = check(&v1);
    assert!(!ok, "{out}");
    assert!(
        out.contains("tether.toml:11:19: listener \"web\": split \"release\": pool \"blue\" issues version 1 tokens, which record no pool: set token_version = 2 in [pools.blue.affinity.cookie]"),
        "{out}"
    );
    let (ok, out) = check(&split_config(Sticky::Table, &b, (0, 0)));
    assert!(!ok && out.contains("split \"release\": every weight is 0"), "{out}");
}

#[tokio::test]
async fn the_admin_api_explains_where_a_key_goes_without_learning_it() {
    let b = pools_of_backends().await;
    let config = split_config(Sticky::Cookie, &b, (1, 1))
        .replace("keys = [\"cookie\"]", "keys = [\"cookie\", \"header:x-user\"]");
    let t = Tether::start(&config);
    let (addr, admin) = (t.addr(), t.admin());
    // A session that sent its header first, and got Tether's cookie.
    let r = Request::get("/").header("host", addr.to_string()).header("x-user", "ada");
    let resp = Client::connect(addr).await.request(r.body(Full::default()).unwrap()).await;
    let token = resp.headers.get_all("set-cookie").iter().find_map(|v| {
        let v = v.to_str().ok()?.strip_prefix("tether=")?;
        Some(v.split(';').next()?.to_string())
    });
    let token = token.expect("Tether's cookie");
    let pool = resp.backend().split('-').next().unwrap().to_string();
    let explain = async |query: &str| call(admin, "GET", &format!("/api/splits/release/sessions?{query}"), "").await;

    let (status, v) = explain("key=ada&kind=header").await;
    assert_eq!((status, v["pool"].as_str(), v["kind"].as_str()), (200, Some(&*pool), Some("header")), "{v}");
    assert!(v["why"].as_str().unwrap().contains("the split's table keeps it in"), "{v}");
    for query in [format!("key={token}&kind=cookie"), format!("key={token}")] {
        let (status, v) = explain(&query).await;
        assert_eq!((status, v["pool"].as_str(), v["kind"].as_str()), (200, Some(&*pool), Some("cookie")), "{v}");
        assert!(v["why"].as_str().unwrap().contains("the token records"), "{v}");
    }
    // Unknown keys lead nowhere yet, and asking does not learn them.
    let learned = admin_json(admin, "/api/splits").await["splits"][0]["learned_keys"].clone();
    let (status, v) = explain("key=bob&kind=header").await;
    assert_eq!((status, &v["pool"]), (200, &Value::Null), "{v}");
    assert!(v["why"].as_str().unwrap().contains("has not seen it"), "{v}");
    let (status, v) = explain("key=not-a-token&kind=cookie").await;
    assert_eq!((status, &v["pool"]), (200, &Value::Null), "{v}");
    assert_eq!(admin_json(admin, "/api/splits").await["splits"][0]["learned_keys"], learned);
    // Errors: a kind the chain lacks, no key, no such split.
    assert_eq!(explain("key=10.0.0.1&kind=client_ip").await.0, 400);
    assert_eq!(explain("kind=header").await.0, 400);
    assert_eq!(call(admin, "GET", "/api/splits/nope/sessions?key=ada", "").await.0, 404);
}

/// Clients that keep sending requests, each on its own session, while the weights flip
/// under them (by the admin API and by reloads): none of them ever changes pool.
async fn clients_keep_their_pool_while_weights_flip_under_them(sticky: Sticky) {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::Arc;
    let b = pools_of_backends().await;
    let t = Tether::start(&split_config(sticky, &b, (50, 50)));
    let (addr, admin) = (t.addr(), t.admin());
    let sessions = open(addr, sticky, "live", 24).await;
    assert!(share_of(&sessions, "green") > 0 && share_of(&sessions, "blue") > 0);
    let stop = Arc::new(AtomicBool::new(false));
    let served: Arc<Vec<AtomicU64>> = Arc::new(sessions.iter().map(|_| AtomicU64::new(0)).collect());
    let mut clients = Vec::new();
    for (i, mut s) in sessions.into_iter().enumerate() {
        let (stop, served) = (stop.clone(), served.clone());
        clients.push(tokio::spawn(async move {
            let first = s.backend.clone();
            while !stop.load(Ordering::Relaxed) {
                visit(addr, sticky, &mut s).await;
                if s.backend != first {
                    return Some(format!("{}: {first} -> {}", s.user, s.backend));
                }
                served[i].fetch_add(1, Ordering::Relaxed);
            }
            None
        }));
    }
    // Each step waits until every client has been served twice since it (or one has
    // stopped, having seen its session move: the assertion below says which).
    let every_client_served = async |clients: &[tokio::task::JoinHandle<Option<String>>]| {
        let since: Vec<u64> = served.iter().map(|n| n.load(Ordering::Relaxed)).collect();
        wait_until("every client was served twice more", Duration::from_secs(20), || {
            clients.iter().any(|c| c.is_finished())
                || served.iter().zip(&since).all(|(n, s)| n.load(Ordering::Relaxed) >= s + 2)
        })
        .await;
    };
    every_client_served(&clients).await;
    set_weights(admin, 0, 100).await;
    every_client_served(&clients).await;
    set_weights(admin, 100, 0).await;
    every_client_served(&clients).await;
    reload(&t, &split_config(sticky, &b, (0, 100)), "config reloaded").await;
    every_client_served(&clients).await;
    reload(&t, &split_config(sticky, &b, (50, 50)), "config reloaded").await;
    every_client_served(&clients).await;
    stop.store(true, Ordering::Relaxed);
    let mut moved = Vec::new();
    for c in clients {
        moved.extend(c.await.expect("a client failed"));
    }
    assert_eq!(moved, Vec::<String>::new(), "sessions changed backend while the weights flipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_cookie_clients_keep_their_pool_while_weights_flip() {
    clients_keep_their_pool_while_weights_flip_under_them(Sticky::Cookie).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_table_mapped_clients_keep_their_pool_while_weights_flip() {
    clients_keep_their_pool_while_weights_flip_under_them(Sticky::Table).await;
}

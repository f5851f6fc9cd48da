//! Warm restarts without Redis (`runtime.state_dir`): a Tether stopped gracefully and
//! started again on the same config keeps every learned session and every admin override;
//! a damaged state file is reported and ignored; an entry whose idle timeout ran out while
//! Tether was down does not come back.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use serde_json::Value;

/// A pool of `b` that persists on the demo app's own session cookie and on a table-mapped
/// header, new sessions placed at random (so that a restarted Tether that forgot its
/// tables would not place them again as before), with its state saved in `state_dir`.
fn warm_config(b: &[DemoBackend], state_dir: &Path, idle: &str) -> String {
    let refs: Vec<&DemoBackend> = b.iter().collect();
    let extra = format!("[runtime]\nstate_dir = \"{}\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n", state_dir.display());
    format!(
        "{}\n[pools.web.affinity]\nkeys = [\"app_cookie:demo_visitor\", \"header:x-user\"]\nmapping = \"table\"\n\n\
         [pools.web.affinity.table]\nidle_timeout = \"{idle}\"\n",
        config("random", &refs, &[], &extra)
    )
}

async fn call(admin: SocketAddr, method: &str, path: &str) -> (u16, Value) {
    call_with(admin, method, path, "").await
}

async fn call_with(admin: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut c = Client::connect(admin).await;
    let r = Request::builder().method(method).uri(path).header("host", admin.to_string());
    let resp = c.request(r.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await;
    (resp.status.as_u16(), serde_json::from_slice(&resp.body).unwrap_or(Value::Null))
}

/// Where the admin API says `key` (of `kind`) is pinned: `None` when it is not in the table.
async fn pinned(admin: SocketAddr, kind: &str, key: &str) -> Option<String> {
    let (s, v) = call(admin, "GET", &format!("/api/pools/web/sessions?key={key}&kind={kind}")).await;
    assert_eq!(s, 200, "{v}");
    v["backend"].as_str().map(str::to_string)
}

/// A request as a client with the app's cookie `visitor` or the header `user` sends it.
fn request(visitor: Option<&str>, user: Option<&str>) -> Request<Full<Bytes>> {
    let mut r = Request::get("/").header("host", "shop.example");
    if let Some(v) = visitor {
        r = r.header("cookie", format!("demo_visitor={v}"));
    }
    if let Some(u) = user {
        r = r.header("x-user", u);
    }
    r.body(Full::default()).unwrap()
}

/// The demo app's session id from a response's `Set-Cookie`.
fn visitor_of(r: &Resp) -> String {
    r.headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.strip_prefix("demo_visitor=")?.split(';').next().map(str::to_string))
        .next()
        .expect("the demo app sets demo_visitor on a first visit")
}

/// Stops `t` with SIGTERM and waits for it to save its state and exit.
async fn stop(mut t: Tether) {
    t.signal("TERM");
    t.wait_log("warm restart: saved").await;
    assert!(t.wait_exit(Duration::from_secs(20)).success(), "{}", t.log());
}

fn backend<'a>(pools: &'a Value, name: &str) -> &'a Value {
    pools["backends"].as_array().unwrap().iter().find(|b| b["name"] == name).unwrap()
}

fn admin_state(pools: &Value, name: &str) -> String {
    backend(pools, name)["admin_state"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_learned_sessions_and_the_drain() {
    let b = backends(3).await;
    let scratch = Scratch::new();
    // Not there yet: the first shutdown makes it.
    let dir = Scratch(scratch.0.join("state"));
    let cfg = warm_config(&b, &dir.0, "1h");

    let first = Tether::start(&cfg);
    first.wait_log("warm restart: no state file (a first start)").await;
    let admin = first.admin();
    // 30 clients of the app's cookie and 30 of a header, each learned on some backend.
    let mut cookie_home = Vec::new();
    let mut header_home = Vec::new();
    let mut c = Client::connect(first.addr()).await;
    for _ in 0..30 {
        let r = c.request(request(None, None)).await;
        cookie_home.push((visitor_of(&r), r.backend()));
    }
    for i in 0..30 {
        let user = format!("user-{i}");
        let r = c.request(request(None, Some(&user))).await;
        header_home.push((user, r.backend()));
    }
    for (v, home) in &cookie_home {
        assert_eq!(&c.request(request(Some(v), None)).await.backend(), home, "not learned: {v}");
    }
    let (s, v) = call(admin, "POST", "/api/pools/web/backends/app-1/drain").await;
    assert_eq!((s, v["admin_state"].as_str()), (200, Some("draining")), "{v}");
    let drain_began = backend(&admin_json(admin, "/api/pools/web").await, "app-1")["draining_since_ms"].clone();
    assert!(drain_began.is_u64(), "{drain_began}");
    drop(c);
    stop(first).await;
    assert!(dir.0.join("tether.state.json").exists());

    let second = Tether::start(&cfg);
    second.wait_log("warm restart: restored").await;
    let admin = second.admin();
    let pools = admin_json(admin, "/api/pools/web").await;
    assert_eq!(admin_state(&pools, "app-1"), "draining", "{}", second.log());
    // The drain's timeout runs from when it began, not from the restart.
    assert_eq!(backend(&pools, "app-1")["draining_since_ms"], drain_began);
    // Every session comes back to its backend, asked in another order than it was learned
    // in; the drain keeps app-1's sessions (it refuses only new ones).
    let mut c = Client::connect(second.addr()).await;
    for (v, home) in cookie_home.iter().rev() {
        assert_eq!(pinned(admin, "app_cookie", v).await.as_deref(), Some(home.as_str()), "{}", second.log());
        assert_eq!(&c.request(request(Some(v), None)).await.backend(), home, "session {v} moved");
    }
    for (u, home) in header_home.iter().rev() {
        assert_eq!(pinned(admin, "header", u).await.as_deref(), Some(home.as_str()));
        assert_eq!(&c.request(request(None, Some(u))).await.backend(), home, "session {u} moved");
    }
    // The drain is in force: no new session goes to app-1.
    for i in 0..30 {
        let r = c.request(request(None, Some(&format!("new-{i}")))).await;
        assert_ne!(r.backend(), "app-1", "a drained backend took a new session after the restart");
    }
    drop(c);
    stop(second).await;
}

/// A state file is used once. A start that restored it sets it aside; after a crash
/// (SIGKILL: nothing saved) the next start restores nothing, and in particular not the
/// drain the file held, which was lifted through the API in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_is_used_once_so_a_crash_does_not_bring_back_old_state() {
    let b = backends(3).await;
    let scratch = Scratch::new();
    let dir = Scratch(scratch.0.join("state"));
    let cfg = warm_config(&b, &dir.0, "1h");
    let first = Tether::start(&cfg);
    first.wait_log("warm restart: no state file (a first start)").await;
    let (s, v) = call(first.admin(), "POST", "/api/pools/web/backends/app-1/drain").await;
    assert_eq!((s, v["admin_state"].as_str()), (200, Some("draining")), "{v}");
    stop(first).await;

    let mut second = Tether::start(&cfg);
    second.wait_log("warm restart: restored").await;
    let admin = second.admin();
    assert_eq!(admin_state(&admin_json(admin, "/api/pools/web").await, "app-1"), "draining");
    assert!(!dir.0.join("tether.state.json").exists(), "a restored state file is set aside");
    assert!(dir.0.join("tether.state.json.restored").exists());
    let (s, v) = call(admin, "POST", "/api/pools/web/backends/app-1/enable").await;
    assert_eq!((s, v["admin_state"].as_str()), (200, Some("enabled")), "{v}");
    second.signal("KILL");
    assert!(!second.wait_exit(Duration::from_secs(10)).success());

    let third = Tether::start(&cfg);
    third.wait_log("warm restart: no state file (a first start)").await;
    let pools = admin_json(third.admin(), "/api/pools/web").await;
    assert_eq!(admin_state(&pools, "app-1"), "enabled", "the crashed run's change was undone:\n{}", third.log());
    stop(third).await;
}

#[tokio::test]
async fn a_damaged_state_file_is_reported_and_ignored() {
    let b = backends(2).await;
    let dir = Scratch::new();
    let cfg = warm_config(&b, &dir.0, "1h");
    // A well-formed file of another Tether, whose only pool this config does not have.
    let other_pools = format!(
        "{{\"format\": \"tether-state\", \"version\": 1, \"written_unix_ms\": 0, \"pools\": [{{\"name\": \"shop\", \
         \"id\": \"{:016x}\", \"backends\": [], \"tables\": {{}}}}], \"overrides\": []}}",
        tether::affinity::pool_id("shop")
    );
    for (junk, says) in [
        ("{\"format\": \"tether-state\", \"version\": 1, \"pools\": [", "damaged"),
        ("\u{0}\u{1}garbage\u{ff}", "damaged"),
        ("{\"format\": \"something-else\", \"version\": 1, \"written_unix_ms\": 0, \"pools\": [], \"overrides\": []}", "not this Tether's"),
        (other_pools.as_str(), "written for pools shop"),
        (
            "{\"format\": \"tether-state\", \"version\": 1, \"written_unix_ms\": 0, \"pools\": [{\"name\": \"web\", \
             \"id\": \"0000000000000001\", \"backends\": [], \"tables\": {}}], \"overrides\": []}",
            "identity of another name",
        ),
        ("{\"format\": \"tether-state\", \"version\": 99, \"written_unix_ms\": 0, \"pools\": [], \"overrides\": []}", "not this Tether's"),
    ] {
        dir.write("tether.state.json", junk);
        let t = Tether::start(&cfg);
        t.wait_log("warm restart: state file ignored").await;
        assert!(t.log().contains(says), "{junk:?}:\n{}", t.log());
        assert_eq!(t.log().matches("state file ignored").count(), 1, "one line");
        let r = get(t.addr(), "/").await;
        assert_eq!(r.status, 200, "{}", t.log());
    }
}

#[tokio::test]
async fn entries_idle_past_their_timeout_while_stopped_are_not_restored() {
    let b = backends(2).await;
    let dir = Scratch::new();
    let cfg = warm_config(&b, &dir.0, "10m");
    let first = Tether::start(&cfg);
    let mut c = Client::connect(first.addr()).await;
    for user in ["fresh", "stale"] {
        c.request(request(None, Some(user))).await;
    }
    drop(c);
    stop(first).await;

    // Make "stale" last seen 11 minutes ago, as if Tether had been down that long: its
    // 10-minute idle timeout ran out meanwhile. "fresh" was last seen a minute ago.
    let path = dir.0.join("tether.state.json");
    let mut state: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let header_key =
        |user: &str| format!("{:032x}", tether::affinity::hash::key_hash128("web", "header", user.as_bytes()));
    let entries = state["pools"][0]["tables"]["header"].as_array_mut().unwrap();
    assert_eq!(entries.len(), 2, "{entries:?}");
    for e in entries.iter_mut() {
        let age = if e[0] == header_key("stale") { 11 * 60 } else { 60 };
        e[2] = Value::from(now - age);
    }
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();

    let second = Tether::start(&cfg);
    second.wait_log("warm restart: restored").await;
    let admin = second.admin();
    assert!(pinned(admin, "header", "fresh").await.is_some(), "{}", second.log());
    assert_eq!(pinned(admin, "header", "stale").await, None, "an expired entry came back:\n{}", second.log());
    assert!(second.log().contains("1 expired while stopped"), "{}", second.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_config_no_longer_has_is_dropped_not_misapplied() {
    let b = backends(3).await;
    let dir = Scratch::new();
    let first = Tether::start(&warm_config(&b, &dir.0, "1h"));
    let admin = first.admin();
    let mut c = Client::connect(first.addr()).await;
    let mut home = Vec::new();
    for i in 0..30 {
        let user = format!("user-{i}");
        home.push((user.clone(), c.request(request(None, Some(&user))).await.backend()));
    }
    for name in ["app-1", "app-2", "app-3"] {
        assert!(home.iter().any(|(_, h)| h == name), "no session on {name}: {home:?}");
    }
    assert_eq!(call(admin, "POST", "/api/pools/web/backends/app-1/drain").await.0, 200);
    assert_eq!(call_with(admin, "PUT", "/api/pools/web/backends/app-2/weight", "{\"weight\": 5}").await.0, 200);
    assert_eq!(call(admin, "POST", "/api/pools/web/backends/app-3/disable").await.0, 200);
    drop(c);
    stop(first).await;

    // app-1 is gone from the file, app-2's weight was changed in the file since (so the
    // file's value wins, as on a reload), app-3 is as it was.
    let cfg = warm_config(&b, &dir.0, "1h")
        .replace(
            &format!("name = \"app-1\", address = \"{}\"", b[0].address),
            &format!("name = \"app-9\", address = \"{}\"", b[0].address),
        )
        .replace("weight = 1 },\n  { name = \"app-3\"", "weight = 3 },\n  { name = \"app-3\"");
    assert!(cfg.contains("app-9") && cfg.contains("weight = 3"), "{cfg}");
    let second = Tether::start(&cfg);
    second.wait_log("warm restart: restored").await;
    let admin = second.admin();
    let pools = admin_json(admin, "/api/pools/web").await;
    assert_eq!(admin_state(&pools, "app-9"), "enabled", "an override moved to another backend");
    assert_eq!(backend(&pools, "app-2")["weight"], 3, "{pools}");
    assert_eq!(admin_state(&pools, "app-3"), "disabled", "{}", second.log());
    for (user, was) in &home {
        let (_, v) = call(admin, "GET", &format!("/api/pools/web/sessions?key={user}&kind=header")).await;
        let why = v["why"].as_str().unwrap();
        match was.as_str() {
            "app-1" => assert!(why.contains("not in the stick table"), "a pin to a removed backend came back: {v}"),
            // Disabled: still pinned there, not available now.
            "app-3" => assert!(why.contains("\"app-3\""), "{v}"),
            _ => assert_eq!(v["backend"].as_str(), Some(was.as_str()), "{v}"),
        }
    }
    assert!(!second.log().contains(" 0 of pools or backends no longer configured"), "{}", second.log());
}

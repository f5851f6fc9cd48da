//! Session persistence through the real balancer: every key type keeps 1000 clients on
//! their backends over shared keep-alive connections; tokens that cannot be trusted count
//! as absent; keys rotate; instances agree; sessions move when their backend goes, and
//! drain, strict mode and bounded load behave.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use http::Request;
use http_body_util::Full;
use tether::affinity::token::{KeyRing, Token};

const KEY_A: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
const KEY_B: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

fn sticky(b: &[DemoBackend], algorithm: &str, weights: &[u32], affinity: &str) -> String {
    let refs: Vec<&DemoBackend> = b.iter().collect();
    format!("{}\n[pools.web.affinity]\n{affinity}\n", config(algorithm, &refs, weights, ""))
}

fn cookie_affinity(keys: &[&str], extra: &str) -> String {
    let keys: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
    format!("keys = [\"cookie\"]\n{extra}\n[pools.web.affinity.cookie]\nkeys = [{}]\n", keys.join(", "))
}

/// One simulated client: its cookie jar and what it sends.
#[derive(Default, Clone)]
struct Visitor {
    jar: HashMap<String, String>,
    headers: Vec<(String, String)>,
    query: String,
}

impl Visitor {
    fn request(&self, path: &str) -> Request<Full<bytes::Bytes>> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let uri = if self.query.is_empty() { path.to_string() } else { format!("{path}{sep}{}", self.query) };
        let mut r = Request::get(uri).header("host", "shop.example");
        if !self.jar.is_empty() {
            let cookie: Vec<String> = self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
            r = r.header("cookie", cookie.join("; "));
        }
        for (k, v) in &self.headers {
            r = r.header(k.as_str(), v.as_str());
        }
        r.body(Full::default()).unwrap()
    }

    /// Keeps every cookie the response sets, as a browser would.
    fn store(&mut self, r: &Resp) {
        for v in r.headers.get_all("set-cookie") {
            let v = v.to_str().unwrap();
            let (name, value) = v.split(';').next().unwrap().split_once('=').unwrap();
            self.jar.insert(name.trim().to_string(), value.trim().to_string());
        }
    }

    async fn visit(&mut self, c: &mut Client, path: &str) -> Resp {
        let r = c.request(self.request(path)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        self.store(&r);
        r
    }
}

/// 1000 clients, five requests each, interleaved over eight shared keep-alive
/// connections: every client must stay on its first backend, and first placements must
/// spread within 15% of fair.
async fn thousand_clients_stay(t: &Tether, make: impl Fn(usize) -> Visitor) -> HashMap<String, usize> {
    let mut conns = Vec::new();
    for _ in 0..8 {
        conns.push(Client::connect(t.addr()).await);
    }
    let mut visitors: Vec<Visitor> = (0..1000).map(make).collect();
    let mut home: Vec<String> = vec![String::new(); visitors.len()];
    for round in 0..5 {
        // The eight connections carry their clients at the same time; a client uses a
        // different connection each round.
        let mut by_conn: Vec<Vec<(usize, &mut Visitor)>> = (0..8).map(|_| Vec::new()).collect();
        for (i, v) in visitors.iter_mut().enumerate() {
            by_conn[(i + round) % 8].push((i, v));
        }
        let rounds = conns.iter_mut().zip(by_conn).map(|(c, clients)| async move {
            let mut seen = Vec::with_capacity(clients.len());
            for (i, v) in clients {
                let r = v.visit(c, "/").await;
                seen.push((i, r.backend(), r.text()));
            }
            seen
        });
        let seen: Vec<_> = futures_util::future::join_all(rounds).await.into_iter().flatten().collect();
        assert_eq!(seen.len(), 1000, "round {round}");
        for (i, backend, text) in seen {
            if round == 0 {
                home[i] = backend;
            } else {
                assert_eq!(backend, home[i], "client {i} moved in round {round}: {text}");
            }
        }
    }
    let mut spread = HashMap::new();
    for h in &home {
        *spread.entry(h.clone()).or_insert(0) += 1;
    }
    for (b, n) in &spread {
        assert!((283..=383).contains(n), "{b} got {n} of 1000 new clients: {spread:?}");
    }
    assert_eq!(spread.len(), 3, "{spread:?}");
    spread
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_keeps_1000_clients() {
    let b = backends(3).await;
    let t = Tether::start(&sticky(&b, "random", &[], &cookie_affinity(&[KEY_A], "")));
    thousand_clients_stay(&t, |_| Visitor::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_cookie_is_learned_and_keeps_1000_clients() {
    let b = backends(3).await;
    // The demo backends set their own `demo_visitor` cookie; Tether learns it.
    let t = Tether::start(&sticky(&b, "round_robin", &[], "keys = [\"app_cookie:demo_visitor\"]"));
    let mut c = Client::connect(t.addr()).await;
    let mut v = Visitor::default();
    v.visit(&mut c, "/").await;
    for n in 2..6 {
        let r = v.visit(&mut c, "/").await;
        // The backend's own counter proves the visitor never left it.
        assert!(r.text().contains(&format!("visit number {n} ")), "{}", r.text());
    }
    thousand_clients_stay(&t, |_| Visitor::default()).await;
}

#[tokio::test]
async fn app_cookie_in_path_parameter_and_query() {
    let b = backends(3).await;
    let t = Tether::start(&sticky(&b, "round_robin", &[], "keys = [\"app_cookie:demo_visitor\"]"));
    let mut c = Client::connect(t.addr()).await;
    let mut v = Visitor::default();
    let home = v.visit(&mut c, "/").await.backend();
    let id = v.jar["demo_visitor"].clone();
    // Without the cookie, the id in a ;param or query still finds the backend.
    for path in [format!("/;demo_visitor={id}"), format!("/cart;DEMO_VISITOR={id}?x=1"), format!("/?demo_visitor={id}")]
    {
        for _ in 0..3 {
            let r = c.request(Request::get(path.as_str()).header("host", "x").body(Full::default()).unwrap()).await;
            assert_eq!(r.backend(), home, "{path}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_keys_keep_1000_clients_by_table_and_by_hash() {
    for mapping in ["table", "hash"] {
        let b = backends(3).await;
        let t = Tether::start(&sticky(
            &b,
            "round_robin",
            &[],
            &format!("keys = [\"header:x-user\"]\nmapping = \"{mapping}\""),
        ));
        thousand_clients_stay(&t, |i| Visitor {
            headers: vec![("x-user".into(), format!("user-{i}"))],
            ..Default::default()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_keys_keep_1000_clients_by_table_and_by_hash() {
    for mapping in ["table", "hash"] {
        let b = backends(3).await;
        let t =
            Tether::start(&sticky(&b, "round_robin", &[], &format!("keys = [\"query:sid\"]\nmapping = \"{mapping}\"")));
        thousand_clients_stay(&t, |i| Visitor { query: format!("sid=s{i}"), ..Default::default() }).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_keeps_1000_clients_behind_a_trusted_proxy() {
    for mapping in ["table", "hash"] {
        let b = backends(3).await;
        let cfg = sticky(&b, "round_robin", &[], &format!("keys = [\"client_ip\"]\nmapping = \"{mapping}\""))
            .replace("pool = \"web\"\n", "pool = \"web\"\ntrusted_proxies = [\"127.0.0.0/8\", \"192.168.0.0/16\"]\n");
        let t = Tether::start(&cfg);
        // The client is the first untrusted address from the right: 192.168.x.x are proxies.
        thousand_clients_stay(&t, |i| Visitor {
            headers: vec![("x-forwarded-for".into(), format!("10.{}.{}.7, 192.168.1.1", i / 250, i % 250))],
            ..Default::default()
        })
        .await;
    }
}

#[tokio::test]
async fn client_ip_mask_groups_a_network() {
    let b = backends(3).await;
    let cfg = sticky(&b, "round_robin", &[], "keys = [\"client_ip\"]\nipv4_prefix = 24")
        .replace("pool = \"web\"\n", "pool = \"web\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n");
    let t = Tether::start(&cfg);
    let mut c = Client::connect(t.addr()).await;
    let mut homes = std::collections::HashSet::new();
    for host in 1..30 {
        let v =
            Visitor { headers: vec![("x-forwarded-for".into(), format!("203.0.113.{host}"))], ..Default::default() };
        homes.insert(c.request(v.request("/")).await.backend());
    }
    assert_eq!(homes.len(), 1, "one /24 should share one backend: {homes:?}");
}

/// The affinity verdicts of the access log, once it has exactly `n` lines.
async fn verdicts(t: &Tether, n: usize) -> Vec<String> {
    let lines = t.wait_access_lines(n).await;
    assert_eq!(lines.len(), n, "{lines:#?}");
    lines
        .iter()
        .map(|l| l.split(" affinity=").nth(1).expect("a verdict").split_whitespace().next().unwrap().to_string())
        .collect()
}

/// Unix seconds now, by the clock Tether stamps its tokens with.
fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Opens a cookie Tether sealed with `key`.
fn open(cookie: &str, key: &str) -> Token {
    KeyRing::from_base64([key]).unwrap().open(cookie).expect("Tether's cookie opens with its key")
}

/// Opens a cookie, lets `change` rewrite the token and seals it again: the cookie Tether
/// would have made at another time.
fn reseal(cookie: &str, key: &str, change: impl FnOnce(&mut Token)) -> String {
    let ring = KeyRing::from_base64([key]).unwrap();
    let mut token = ring.open(cookie).expect("Tether's cookie opens with its key");
    change(&mut token);
    ring.seal(&token).to_string()
}

/// The cookie as if Tether had made it `secs` seconds ago: the client's clock, moved
/// instead of waited for.
fn age(cookie: &str, key: &str, secs: u64) -> String {
    reseal(cookie, key, |t| {
        t.issued -= secs;
        t.last_seen -= secs;
    })
}

/// The value of Tether's cookie if the response sets it.
fn set_token(r: &Resp) -> Option<String> {
    r.headers
        .get_all("set-cookie")
        .iter()
        .find_map(|v| Some(v.to_str().ok()?.strip_prefix("tether=")?.split(';').next()?.to_string()))
}

#[tokio::test]
async fn cookie_attributes_stripping_and_set_cookie_economy() {
    let b = backends(3).await;
    let t = Tether::start(&sticky(&b, "round_robin", &[], &cookie_affinity(&[KEY_A], "")));
    let mut c = Client::connect(t.addr()).await;
    let mut v = Visitor::default();
    let r = v.visit(&mut c, "/").await;
    let set: Vec<&str> = r.headers.get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).collect();
    let ours = set.iter().find(|s| s.starts_with("tether=")).expect("Tether set its cookie");
    assert!(ours.ends_with("; Path=/; HttpOnly; SameSite=Lax"), "{ours}");
    assert!(!ours.contains("Max-Age") && !ours.contains("Secure") && !ours.contains("Domain"), "{ours}");
    assert_eq!(r.headers["cache-control"], "private");
    // The token holds no address and no backend name.
    let token = &v.jar["tether"];
    for b in &b {
        assert!(!token.contains(&b.name) && !token.contains(&b.address.port().to_string()));
    }
    // Later requests: the cookie is stripped before the backend, and not set again.
    for _ in 0..3 {
        let r = v.visit(&mut c, "/headers").await;
        assert!(!r.text().contains("tether="), "Tether's cookie reached the backend:\n{}", r.text());
        assert!(r.text().contains("demo_visitor="), "the app's own cookie must pass:\n{}", r.text());
        assert!(r.headers.get_all("set-cookie").iter().all(|v| !v.to_str().unwrap().starts_with("tether=")));
    }
}

#[tokio::test]
async fn cookie_attributes_are_configurable() {
    let b = backends(1).await;
    let extra = "[pools.web.affinity.cookie]\nname = \"srv\"\ndomain = \"shop.example\"\npath = \"/app\"\nsame_site = \"None\"\nmax_age = \"2h\"\nhttp_only = false\nkeys = [\"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\"]\n";
    let t = Tether::start(&sticky(&b, "round_robin", &[], &format!("keys = [\"cookie\"]\n{extra}")));
    let r = get(t.addr(), "/").await;
    let set = r
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|s| s.starts_with("srv="))
        .unwrap();
    for part in ["Domain=shop.example", "Path=/app", "SameSite=None", "Secure", "Max-Age=7200"] {
        assert!(set.contains(part), "{part} missing: {set}");
    }
    assert!(!set.contains("HttpOnly"), "{set}");
}

#[tokio::test]
async fn untrusted_tokens_count_as_absent() {
    let b = backends(3).await;
    let t = Tether::start(&sticky(&b, "round_robin", &[], &cookie_affinity(&[KEY_A], "")));
    let mut c = Client::connect(t.addr()).await;
    let mut v = Visitor::default();
    v.visit(&mut c, "/").await;
    let good = v.jar["tether"].clone();
    let mut flipped = good.clone().into_bytes();
    flipped[40] = if flipped[40] == b'A' { b'B' } else { b'A' };
    let forged = [
        String::from_utf8(flipped).unwrap(),
        good[..good.len() - 10].to_string(),
        "not-a-token".to_string(),
        String::new(),
        format!("{good}x"),
    ];
    for bad in &forged {
        let mut w = Visitor::default();
        w.jar.insert("tether".into(), bad.clone());
        let r = w.visit(&mut c, "/").await;
        // A fresh, valid session replaces it.
        assert!(w.jar["tether"] != *bad && w.jar["tether"].len() > 50, "{bad:?} was not replaced");
        assert!(r.headers.get("tether-error").is_none());
    }
    let v = verdicts(&t, 1 + forged.len()).await;
    assert_eq!(v[0], "new");
    assert!(v[1..].iter().all(|x| x == "invalid"), "{v:?}");
}

#[tokio::test]
async fn expired_tokens_count_as_absent() {
    let b = backends(3).await;
    let extra = "[pools.web.affinity.cookie]\nidle_timeout = \"30m\"\nkeys = [\"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\"]\n";
    let t = Tether::start(&sticky(&b, "round_robin", &[], &format!("keys = [\"cookie\"]\n{extra}")));
    let mut c = Client::connect(t.addr()).await;
    let mut v = Visitor::default();
    v.visit(&mut c, "/").await;
    let first = open(&v.jar["tether"], KEY_A);
    // Last seen 31 minutes ago: idle for longer than the 30 minute idle timeout.
    let expired = age(&v.jar["tether"], KEY_A, 31 * 60);
    v.jar.insert("tether".into(), expired.clone());
    let before = unix_now();
    let r = v.visit(&mut c, "/").await;
    let after = unix_now();
    let new = set_token(&r).expect("an expired token must be replaced");
    assert_ne!(new, expired, "an expired token must be replaced");
    // The replacement is a new session, issued now.
    let new = open(&new, KEY_A);
    assert_ne!(new.session, first.session);
    assert!((before..=after).contains(&new.issued) && new.last_seen == new.issued, "{new:?} at {before}..={after}");
    assert_eq!(verdicts(&t, 2).await, ["new", "expired"]);
}

#[tokio::test]
async fn key_rotation_keeps_sessions_and_dropped_keys_end_them() {
    let b = backends(3).await;
    let t = Tether::start(&sticky(&b, "round_robin", &[], &cookie_affinity(&[KEY_A], "")));
    let mut c = Client::connect(t.addr()).await;
    let mut visitors = vec![Visitor::default(); 6];
    let mut homes = Vec::new();
    for v in visitors.iter_mut() {
        homes.push(v.visit(&mut c, "/").await.backend());
    }
    // Rotate: B seals from now on, A still opens.
    reload(&t, &sticky(&b, "round_robin", &[], &cookie_affinity(&[KEY_B, KEY_A], "")), "config reloaded").await;
    for (v, home) in visitors.iter_mut().zip(&homes) {
        assert_eq!(v.visit(&mut c, "/").await.backend(), *home);
    }
    let old_token = visitors[0].jar["tether"].clone();
    let mut fresh = Visitor::default();
    fresh.visit(&mut c, "/").await;
    // Drop A: tokens sealed with A are no longer trusted; B's still are.
    reload(&t, &sticky(&b, "round_robin", &[], &cookie_affinity(&[KEY_B], "")), "config reloaded").await;
    let fresh_home = fresh.visit(&mut c, "/").await.backend();
    let mut again = fresh.clone();
    assert_eq!(again.visit(&mut c, "/").await.backend(), fresh_home);
    let mut stale = Visitor::default();
    stale.jar.insert("tether".into(), old_token);
    stale.visit(&mut c, "/").await;
    let v = verdicts(&t, 6 + 6 + 1 + 3).await;
    assert!(v[6..12].iter().all(|x| x == "hit"), "rotation moved sessions: {v:?}");
    assert_eq!(v[13..], ["hit", "hit", "invalid"], "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_agree_on_tokens_headers_and_client_ips() {
    let b = backends(3).await;
    let refs: Vec<&DemoBackend> = b.iter().collect();
    let base = config("round_robin", &refs, &[], "")
        .replace("pool = \"web\"\n", "pool = \"web\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n");
    let cookie = format!(
        "{base}\n[pools.web.affinity]\nkeys = [\"cookie\"]\n[pools.web.affinity.cookie]\nkeys = [\"{KEY_A}\"]\n"
    );
    let hashed =
        format!("{base}\n[pools.web.affinity]\nkeys = [\"header:x-user\", \"client_ip\"]\nmapping = \"hash\"\n");
    for cfg in [&cookie, &hashed] {
        let one = Tether::start(cfg);
        let two = Tether::start(cfg);
        let mut c1 = Client::connect(one.addr()).await;
        let mut c2 = Client::connect(two.addr()).await;
        for i in 0..60 {
            let mut v = Visitor::default();
            if cfg == &hashed {
                v.headers = if i % 2 == 0 {
                    vec![("x-user".into(), format!("u{i}"))]
                } else {
                    vec![("x-forwarded-for".into(), format!("198.51.100.{i}"))]
                };
            }
            let first = v.visit(&mut c1, "/").await.backend();
            let mut on_two = v.clone();
            assert_eq!(on_two.visit(&mut c2, "/").await.backend(), first, "instance two disagrees for client {i}");
        }
    }
}

#[tokio::test]
async fn a_dead_backend_repins_its_sessions_once_with_the_header() {
    let b = backends(3).await;
    let t = Tether::start(&sticky(&b, "round_robin", &[], &cookie_affinity(&[KEY_A], "")));
    let mut c = Client::connect(t.addr()).await;
    let mut visitors = vec![Visitor::default(); 12];
    let mut homes = Vec::new();
    for v in visitors.iter_mut() {
        homes.push(v.visit(&mut c, "/").await.backend());
    }
    b[0].stop();
    for (i, v) in visitors.iter_mut().enumerate() {
        let r = v.visit(&mut c, "/headers").await;
        let moved = homes[i] == "app-1";
        assert_eq!(
            r.text().contains("tether-session-repinned: down"),
            moved,
            "client {i} from {}:\n{}",
            homes[i],
            r.text()
        );
        assert!(r.backend() != "app-1");
        if !moved {
            assert_eq!(r.backend(), homes[i]);
        }
        let new_home = r.backend();
        // Re-pinned once: from now on it is a plain hit on the new backend.
        for _ in 0..3 {
            let r = v.visit(&mut c, "/headers").await;
            assert_eq!(r.backend(), new_home);
            assert!(!r.text().contains("tether-session-repinned"));
        }
    }
    let repins = verdicts(&t, 12 * 5).await.iter().filter(|v| *v == "repin:down").count();
    assert_eq!(repins, homes.iter().filter(|h| *h == "app-1").count());
}

#[tokio::test]
async fn clients_cannot_forge_the_repin_header() {
    let b = backends(1).await;
    let t = Tether::start(&sticky(&b, "round_robin", &[], &cookie_affinity(&[KEY_A], "")));
    let mut v = Visitor { headers: vec![("tether-session-repinned".into(), "down".into())], ..Default::default() };
    let r = v.visit(&mut Client::connect(t.addr()).await, "/headers").await;
    assert!(!r.text().contains("tether-session-repinned"), "{}", r.text());
}

#[tokio::test]
async fn strict_mode_answers_503_instead_of_moving() {
    let b = backends(2).await;
    let t = Tether::start(&sticky(&b, "round_robin", &[], &cookie_affinity(&[KEY_A], "on_unavailable = \"strict\"")));
    let mut c = Client::connect(t.addr()).await;
    let mut v = Visitor::default();
    let home = v.visit(&mut c, "/").await.backend();
    let refs: Vec<String> = b.iter().map(|x| x.name.clone()).collect();
    let i = refs.iter().position(|n| *n == home).unwrap();
    let disabled = sticky(&b, "round_robin", &[], &cookie_affinity(&[KEY_A], "on_unavailable = \"strict\"")).replace(
        &format!("name = \"{home}\", address = \"{}\", weight = 1", b[i].address),
        &format!("name = \"{home}\", address = \"{}\", weight = 1, state = \"disabled\"", b[i].address),
    );
    reload(&t, &disabled, "config reloaded").await;
    let r = c.request(v.request("/")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["tether-error"], "session-unavailable");
    assert!(r.text().contains("disabled"), "{}", r.text());
    // A new client still gets the other backend.
    assert_eq!(Visitor::default().visit(&mut c, "/").await.status, 200);
}

fn with_state(cfg: &str, b: &DemoBackend, state: &str) -> String {
    cfg.replace(
        &format!("name = \"{}\", address = \"{}\", weight = 1", b.name, b.address),
        &format!("name = \"{}\", address = \"{}\", weight = 1, state = \"{state}\"", b.name, b.address),
    )
}

#[tokio::test]
async fn draining_keeps_old_sessions_takes_no_new_ones_and_reports_them() {
    let b = backends(3).await;
    let cfg = sticky(&b, "round_robin", &[], &cookie_affinity(&[KEY_A], ""));
    let t = Tether::start(&cfg);
    let mut c = Client::connect(t.addr()).await;
    let mut visitors = vec![Visitor::default(); 9];
    let mut homes = Vec::new();
    for v in visitors.iter_mut() {
        homes.push(v.visit(&mut c, "/").await.backend());
    }
    reload(&t, &with_state(&cfg, &b[0], "draining"), "config reloaded").await;
    for _ in 0..3 {
        for (v, home) in visitors.iter_mut().zip(&homes) {
            assert_eq!(v.visit(&mut c, "/").await.backend(), *home, "a draining backend must keep its sessions");
        }
    }
    for _ in 0..30 {
        assert_ne!(
            Visitor::default().visit(&mut c, "/").await.backend(),
            "app-1",
            "a draining backend took a new session"
        );
    }
    // The sweep reports how many sessions are still pinned to the draining backend.
    t.wait_log("draining: 3 sessions still pinned pool=web backend=app-1").await;
}

#[tokio::test]
async fn drain_timeout_moves_the_remaining_sessions() {
    let b = backends(2).await;
    let cfg = sticky(&b, "round_robin", &[], &cookie_affinity(&[KEY_A], "drain_timeout = \"1s\""));
    let t = Tether::start(&cfg);
    let mut c = Client::connect(t.addr()).await;
    let mut v = Visitor::default();
    while v.visit(&mut c, "/").await.backend() != "app-1" {
        v = Visitor::default();
    }
    let draining_from = Instant::now();
    reload(&t, &with_state(&cfg, &b[0], "draining"), "config reloaded").await;
    assert_eq!(v.visit(&mut c, "/").await.backend(), "app-1");
    // The session stays on app-1 until the 1 s drain timeout has passed, then moves.
    let (addr, moved) = (t.addr(), Arc::new(Mutex::new(None)));
    wait_until_async("the session moves off the drained backend", Duration::from_secs(10), || {
        let (mut v, moved) = (v.clone(), moved.clone());
        async move {
            let r = v.visit(&mut Client::connect(addr).await, "/headers").await;
            let gone = r.backend() != "app-1";
            if gone {
                *moved.lock().unwrap() = Some(r);
            }
            gone
        }
    })
    .await;
    assert!(draining_from.elapsed() >= Duration::from_secs(1), "moved before the drain timeout");
    let r = moved.lock().unwrap().take().unwrap();
    assert_eq!(r.backend(), "app-2");
    assert!(r.text().contains("tether-session-repinned: drained"), "{}", r.text());
}

#[tokio::test]
async fn bounded_load_caps_new_sessions() {
    let b = backends(3).await;
    // Weighted random would send 80% of new sessions to app-3; the cap allows 1.25x the mean.
    let t = Tether::start(&sticky(&b, "random", &[1, 1, 8], &cookie_affinity(&[KEY_A], "max_sessions_factor = 1.25")));
    let mut c = Client::connect(t.addr()).await;
    let mut counts: HashMap<String, u64> = HashMap::new();
    for n in 1..=300u64 {
        let r = Visitor::default().visit(&mut c, "/").await;
        *counts.entry(r.backend()).or_insert(0) += 1;
        let k = counts[&r.backend()];
        let cap = ((1.25 * n as f64) / 3.0).ceil() as u64;
        assert!(k <= cap, "{} has {k} of {n} sessions, over the cap of {cap}: {counts:?}", r.backend());
    }
    assert!(counts["app-3"] >= 120, "the heavy backend should still fill up to its cap: {counts:?}");
}

#[tokio::test]
async fn idle_timeout_slides_and_absolute_timeout_does_not() {
    let b = backends(3).await;
    let sliding = "[pools.web.affinity.cookie]\nidle_timeout = \"30m\"\nkeys = [\"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\"]\n";
    let t = Tether::start(&sticky(&b, "round_robin", &[], &format!("keys = [\"cookie\"]\n{sliding}")));
    let mut c = Client::connect(t.addr()).await;
    let mut v = Visitor::default();
    let home = v.visit(&mut c, "/").await.backend();
    let session = open(&v.jar["tether"], KEY_A).session;
    // Each visit comes 20 minutes after the last, more than a quarter of the idle timeout:
    // the stamp is refreshed every time, so the session outlives the 30 minute idle
    // timeout twice over.
    for _ in 0..3 {
        let aged = age(&v.jar["tether"], KEY_A, 20 * 60);
        v.jar.insert("tether".into(), aged.clone());
        let before = unix_now();
        let r = v.visit(&mut c, "/").await;
        let after = unix_now();
        assert_eq!(r.backend(), home);
        let refreshed = open(&set_token(&r).expect("the last-seen stamp was not refreshed"), KEY_A);
        assert!((before..=after).contains(&refreshed.last_seen), "{refreshed:?} at {before}..={after}");
        assert_eq!(refreshed.issued, open(&aged, KEY_A).issued, "a refresh must not move the issue time");
        assert_eq!(refreshed.session, session);
    }
    assert!(unix_now() - open(&v.jar["tether"], KEY_A).issued >= 60 * 60);
    // Seen 5 minutes ago, less than a quarter of the idle timeout: a hit, and no new cookie.
    let aged = age(&v.jar["tether"], KEY_A, 5 * 60);
    v.jar.insert("tether".into(), aged);
    let r = v.visit(&mut c, "/").await;
    assert_eq!(r.backend(), home);
    assert_eq!(set_token(&r), None, "a token seen recently needs no refresh");
    assert_eq!(verdicts(&t, 5).await, ["new", "hit", "hit", "hit", "hit"]);

    let fixed = "[pools.web.affinity.cookie]\nidle_timeout = \"30m\"\nabsolute_timeout = \"1h\"\nkeys = [\"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\"]\n";
    let t = Tether::start(&sticky(&b, "round_robin", &[], &format!("keys = [\"cookie\"]\n{fixed}")));
    let mut c = Client::connect(t.addr()).await;
    let mut v = Visitor::default();
    let home = v.visit(&mut c, "/").await.backend();
    // 20 and 40 minutes in: hits whose refreshed cookies keep the issue time.
    for _ in 0..2 {
        let aged = age(&v.jar["tether"], KEY_A, 20 * 60);
        v.jar.insert("tether".into(), aged.clone());
        let r = v.visit(&mut c, "/").await;
        assert_eq!(r.backend(), home);
        let refreshed = open(&set_token(&r).expect("the last-seen stamp was not refreshed"), KEY_A);
        assert_eq!(refreshed.issued, open(&aged, KEY_A).issued, "the absolute timeout must not slide");
    }
    // 25 minutes later the session is 65 minutes old: past the 1 h absolute timeout,
    // though it was seen within the idle timeout.
    let aged = age(&v.jar["tether"], KEY_A, 25 * 60);
    let token = open(&aged, KEY_A);
    assert!(unix_now() - token.issued > 60 * 60 && unix_now() - token.last_seen < 30 * 60, "{token:?}");
    v.jar.insert("tether".into(), aged.clone());
    let r = v.visit(&mut c, "/").await;
    assert_ne!(set_token(&r).expect("an expired token must be replaced"), aged);
    // Issued 61 minutes ago and seen just now: expired all the same.
    let stale = reseal(&v.jar["tether"], KEY_A, |t| {
        t.issued = unix_now() - 61 * 60;
        t.last_seen = unix_now();
    });
    v.jar.insert("tether".into(), stale.clone());
    let r = v.visit(&mut c, "/").await;
    assert_ne!(set_token(&r).expect("an expired token must be replaced"), stale);
    assert_eq!(verdicts(&t, 5).await, ["new", "hit", "hit", "expired", "expired"]);
}

/// The access log gives each session a pseudonym (`session`): the same in every line of
/// one session, its first request (no cookie yet) included; another for another session;
/// the same in another process with the same `access_log.session_key` (so a fleet's logs
/// agree). No line shows the token or the session id it carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_sessions_by_pseudonym() {
    let b = backends(2).await;
    let refs: Vec<&DemoBackend> = b.iter().collect();
    let log = format!("[access_log]\nformat = \"json\"\nsession_key = \"{KEY_B}\"\n");
    let cfg = format!(
        "{}\n[pools.web.affinity]\n{}\n",
        config("round_robin", &refs, &[], &log),
        cookie_affinity(&[KEY_A], "")
    );
    let t = Tether::start(&cfg);
    let mut c = Client::connect(t.addr()).await;
    let (mut one, mut two) = (Visitor::default(), Visitor::default());
    for _ in 0..3 {
        one.visit(&mut c, "/").await;
    }
    for _ in 0..2 {
        two.visit(&mut c, "/").await;
    }
    let lines = t.wait_access_lines(5).await;
    let session =
        |l: &str| serde_json::from_str::<serde_json::Value>(l).unwrap()["session"].as_str().map(str::to_string);
    let s: Vec<String> = lines.iter().map(|l| session(l).unwrap_or_else(|| panic!("no session: {l}"))).collect();
    assert!(s.iter().all(|p| p.len() == 16 && p.bytes().all(|b| b.is_ascii_hexdigit())), "{s:?}");
    assert!(s[0] == s[1] && s[1] == s[2], "one session, one pseudonym: {s:?}");
    assert!(s[3] == s[4] && s[3] != s[0], "another session, another pseudonym: {s:?}");
    let token = one.jar["tether"].clone();
    let id: String = open(&token, KEY_A).session.iter().map(|b| format!("{b:02x}")).collect();
    for l in &lines {
        assert!(!l.contains(&token) && !l.contains(&id), "the log shows the session: {l}");
    }

    // Another process with the same keys names the same session the same way.
    let t2 = Tether::start(&cfg);
    let mut c2 = Client::connect(t2.addr()).await;
    one.visit(&mut c2, "/").await;
    let l2 = t2.wait_access_lines(1).await;
    assert_eq!(session(&l2[0]).as_deref(), Some(s[0].as_str()), "{l2:?}");
}

//! Sessions shared through Redis (`[stores.NAME]`): a real `redis-server` on loopback and
//! three Tether processes sharing it, in front of the same three demo backends. Clients
//! whose every request goes to a random instance stay on one backend; Redis killed mid-run
//! costs no request and no session; what was learned while it was away reaches the other
//! instances once it is back; an unpin on one instance is dropped by the others. Requests
//! go over HTTP/1.1 or HTTP/2 at random, so both data paths are exercised.
//!
//! Without `redis-server` on the PATH these tests fail under CI (`CI` set) and are skipped,
//! saying so, elsewhere (`.ci/setup` installs it).

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;

/// A `redis-server` on a loopback port, without persistence.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    /// Starts one on a free port, or `None` (outside CI) when none is installed.
    async fn start() -> Option<Redis> {
        let installed = Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_ok();
        if !installed {
            assert!(std::env::var_os("CI").is_none(), "redis-server is not installed: .ci/setup installs it");
            eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server; CI installs it)");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Some(Redis::on(port).await)
    }

    /// Starts one on `port` and waits until it answers PING.
    async fn on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let r = Redis { child, port };
        wait_until_async("redis-server answers PING", Duration::from_secs(10), || r.pings()).await;
        r
    }

    async fn pings(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else { return false };
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").await.is_ok() && s.read_exact(&mut buf).await.is_ok() && &buf == b"+PONG\r\n"
    }

    /// Freezes (`STOP`) or thaws (`CONT`) the server: its sockets stay open, nothing answers.
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(ok.success());
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three pools, one per kind of key, each placing new sessions at random (so an instance
/// that did not know a session would most often place it elsewhere), all sharing through
/// the store `fleet`; chosen by host.
fn fleet_config(b: &[DemoBackend], redis_port: u16, key_file: &std::path::Path) -> String {
    let mut s = format!(
        "store = \"fleet\"\n\n[stores.fleet]\naddress = \"127.0.0.1:{redis_port}\"\nprefix = \"test\"\nkey_file = \"{}\"\n\
         timeout = \"200ms\"\nflush_interval = \"100ms\"\n\n{ADMIN}\n\
         [[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
        key_file.display()
    );
    for pool in ["cookie", "header", "ip"] {
        s.push_str(&format!("[[listeners.routes]]\nhost = \"{pool}.test\"\npool = \"{pool}\"\n"));
    }
    for (pool, key) in [("cookie", "app_cookie:demo_visitor"), ("header", "header:x-user"), ("ip", "client_ip")] {
        s.push_str(&format!("\n[pools.{pool}]\nalgorithm = \"random\"\nbackends = [\n"));
        for d in b {
            s.push_str(&format!("  {{ name = \"{}\", address = \"{}\" }},\n", d.name, d.address));
        }
        s.push_str(&format!("]\n[pools.{pool}.affinity]\nkeys = [\"{key}\"]\nmapping = \"table\"\n"));
    }
    s
}

/// Three instances, the demo backends and Redis, or `None` when the test is skipped.
struct Fleet {
    redis: Redis,
    tethers: Vec<Tether>,
    _backends: Vec<DemoBackend>,
    _scratch: Scratch,
}

impl Fleet {
    async fn start() -> Option<Fleet> {
        let redis = Redis::start().await?;
        let backends = backends(3).await;
        let scratch = Scratch::new();
        let key = scratch.write("store.key", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n");
        let cfg = fleet_config(&backends, redis.port, &key);
        // The third runs two worker threads: requests on workers, Redis on the control plane.
        let tethers: Vec<Tether> = (0..3)
            .map(|i| if i == 2 { Tether::start_with(&cfg, &["--threads", "2"]) } else { Tether::start(&cfg) })
            .collect();
        let f = Fleet { redis, tethers, _backends: backends, _scratch: scratch };
        for t in &f.tethers {
            wait_until_async("every instance reports its store up", Duration::from_secs(10), || store_up(t.admin()))
                .await;
        }
        Some(f)
    }

    fn random(&self) -> &Tether {
        &self.tethers[(rand() % 3) as usize]
    }
}

fn rand() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // Each `RandomState` of a thread is keyed anew: a fresh draw per call.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish()
}

/// The value of metric `name` (with its labels written as in the text) on `admin`.
async fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
    let text = get(admin, "/metrics").await.text();
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn store_up(admin: SocketAddr) -> bool {
    metric(admin, "tether_store_up{store=\"fleet\"}").await == Some(1.0)
}

/// A request to pool `pool` (by host) as one client of that pool's kind of key.
fn request(pool: &str, client: &Visitor) -> Request<Full<Bytes>> {
    let mut r = Request::get("/").header("host", format!("{pool}.test"));
    match client {
        Visitor::Cookie(Some(v)) => r = r.header("cookie", format!("demo_visitor={v}")),
        Visitor::Cookie(None) => {}
        Visitor::Header(u) => r = r.header("x-user", u.as_str()),
        Visitor::Ip(ip) => r = r.header("x-forwarded-for", ip.as_str()),
    }
    r.body(Full::default()).unwrap()
}

/// A client, by the key it carries.
#[derive(Debug, Clone)]
enum Visitor {
    /// The demo app's session cookie, once it has one.
    Cookie(Option<String>),
    Header(String),
    Ip(String),
}

impl Visitor {
    fn pool(&self) -> &'static str {
        match self {
            Visitor::Cookie(_) => "cookie",
            Visitor::Header(_) => "header",
            Visitor::Ip(_) => "ip",
        }
    }
}

/// `req` over an HTTP/2 prior-knowledge connection, its host as the URI's authority.
async fn h2(addr: SocketAddr, req: Request<Full<Bytes>>) -> Resp {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    let (mut parts, body) = req.into_parts();
    let host = parts.headers.remove("host").unwrap();
    parts.uri = format!("http://{}/", host.to_str().unwrap()).parse().unwrap();
    let r = sender.send_request(Request::from_parts(parts, body)).await.unwrap();
    let (parts, body) = r.into_parts();
    Resp { status: parts.status, headers: parts.headers, body: body.collect().await.unwrap().to_bytes() }
}

fn visitor_of(r: &Resp) -> Option<String> {
    r.headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.strip_prefix("demo_visitor=")?.split(';').next().map(str::to_string))
        .next()
}

/// One request of `c` to `t`, over HTTP/1.1 or (one time in two) HTTP/2: the backend
/// that served it. Fails the test on any error.
async fn visit(t: &Tether, c: &mut Visitor) -> String {
    let req = request(c.pool(), c);
    let r = if rand().is_multiple_of(2) {
        Client::connect(t.addr()).await.request(req).await
    } else {
        h2(t.addr(), req).await
    };
    assert_eq!(r.status, 200, "{}", r.text());
    if let (Visitor::Cookie(None), Some(v)) = (&*c, visitor_of(&r)) {
        *c = Visitor::Cookie(Some(v));
    }
    r.backend()
}

/// `n` clients of each kind, each with its first request sent to instance `first` (or a
/// random one), with the backend that served it.
async fn new_clients(f: &Fleet, n: usize, tag: &str, first: Option<usize>) -> Vec<(Visitor, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        for mut c in [
            Visitor::Cookie(None),
            Visitor::Header(format!("{tag}-user-{i}")),
            Visitor::Ip(format!("10.{}.{}.{}", tag.len(), i / 250, i % 250 + 1)),
        ] {
            let t = first.map_or_else(|| f.random(), |k| &f.tethers[k]);
            let home = visit(t, &mut c).await;
            assert!(!home.is_empty());
            out.push((c, home));
        }
    }
    out
}

/// Sends each client's next `rounds` requests, each to a random instance (or every
/// instance in turn with `each_instance`), and checks each stays on its backend.
async fn stays(f: &Fleet, clients: &mut [(Visitor, String)], rounds: usize, each_instance: bool) {
    for round in 0..rounds {
        for (c, home) in clients.iter_mut() {
            let t = if each_instance { &f.tethers[round % 3] } else { f.random() };
            let got = visit(t, c).await;
            assert_eq!(&got, home, "{c:?} moved, on round {round} (instance {})", t.addr());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_random_instances_keep_their_backend() {
    let Some(f) = Fleet::start().await else { return };
    let mut clients = new_clients(&f, 20, "a", None).await;
    stays(&f, &mut clients, 8, false).await;
    // The sessions went through Redis: lookups that found them, and new pins written.
    let mut hits = 0.0;
    let mut ops = 0.0;
    for t in &f.tethers {
        hits += metric(t.admin(), "tether_store_lookups_total{store=\"fleet\",result=\"hit\"}").await.unwrap();
        ops += metric(t.admin(), "tether_store_operations_total{store=\"fleet\"}").await.unwrap();
    }
    // Every client's key is found in Redis by at least one other instance (each visited
    // all three, most likely; at least one other for sure over 8 random rounds is not
    // certain, so the bound is loose but not zero).
    assert!(hits >= clients.len() as f64 / 2.0, "lookup hits {hits}");
    eprintln!(
        "{} sessions, {} requests: {ops} Redis operations in all ({:.2} per session, {:.3} per request, health checks not counted)",
        clients.len(),
        clients.len() * 9,
        ops / clients.len() as f64,
        ops / (clients.len() * 9) as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_back_costs_no_request_and_no_session() {
    let Some(mut f) = Fleet::start().await else { return };
    let mut before = new_clients(&f, 10, "b", None).await;
    // Every client seen by every instance before Redis goes.
    stays(&f, &mut before, 3, true).await;

    // Killed while clients keep coming: no request fails, none moves.
    let noticed = std::sync::atomic::AtomicBool::new(false);
    let load = async {
        let mut rounds = 0;
        while !noticed.load(std::sync::atomic::Ordering::Relaxed) || rounds < 2 {
            stays(&f, &mut before, 1, false).await;
            rounds += 1;
        }
    };
    let outage = async {
        f.redis.signal("KILL");
        for t in &f.tethers {
            wait_until_async("every instance sees its store down", Duration::from_secs(10), || async {
                metric(t.admin(), "tether_store_up{store=\"fleet\"}").await == Some(0.0)
            })
            .await;
        }
        noticed.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    tokio::join!(load, outage);
    f.redis.kill();
    let pool = admin_json(f.tethers[1].admin(), "/api/pools/header").await;
    assert_eq!(pool["store"]["up"], false, "{pool}");
    // Every request is answered, every session learned before stays where it was.
    stays(&f, &mut before, 4, false).await;
    // Sessions learned while Redis is away, each on instance 0.
    let mut meanwhile = new_clients(&f, 10, "meanwhile", Some(0)).await;
    let down = f.tethers[0].log();
    assert_eq!(down.matches("stopped answering").count() + down.matches("is down").count(), 1, "{down}");

    f.redis = Redis::on(f.redis.port).await;
    for t in &f.tethers {
        wait_until_async("every instance reports its store up again", Duration::from_secs(15), || store_up(t.admin()))
            .await;
    }
    // Instance 0 wrote back what it learned meanwhile.
    let admin = f.tethers[0].admin();
    wait_until_async("instance 0's write-back is done", Duration::from_secs(10), || async {
        metric(admin, "tether_store_queued_writes{store=\"fleet\"}").await == Some(0.0)
    })
    .await;
    let pool = admin_json(f.tethers[1].admin(), "/api/pools/header").await;
    assert_eq!((&pool["store"]["name"], &pool["store"]["up"]), (&"fleet".into(), &true.into()), "{pool}");
    // The others dropped nothing they knew, and a session
    // only instance 0 had learned while Redis was away is found by the others.
    stays(&f, &mut meanwhile, 6, false).await;
    stays(&f, &mut before, 3, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpin_on_one_instance_is_dropped_by_the_others_within_a_second() {
    let Some(f) = Fleet::start().await else { return };
    let mut c = Visitor::Header("unpin-me".into());
    let home = visit(&f.tethers[0], &mut c).await;
    for t in &f.tethers[1..] {
        assert_eq!(visit(t, &mut c).await, home);
    }
    let pinned = |admin: SocketAddr| async move {
        admin_json(admin, "/api/pools/header/sessions?key=unpin-me&kind=header").await["backend"]
            .as_str()
            .map(String::from)
    };
    for t in &f.tethers {
        assert_eq!(pinned(t.admin()).await.as_deref(), Some(home.as_str()));
    }
    let r = admin_call(f.tethers[1].admin(), "DELETE", "/api/pools/header/sessions?key=unpin-me&kind=header").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let start = Instant::now();
    for t in [&f.tethers[0], &f.tethers[2]] {
        let admin = t.admin();
        wait_until_async("the other instances drop the unpinned key", Duration::from_secs(1), || async move {
            pinned(admin).await.is_none()
        })
        .await;
    }
    assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());
}

async fn admin_call(admin: SocketAddr, method: &str, path: &str) -> Resp {
    let req = Request::builder().method(method).uri(path).header("host", admin.to_string());
    Client::connect(admin).await.request(req.body(Full::default()).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moved_by_one_instance_moves_on_all_of_them() {
    let Some(f) = Fleet::start().await else { return };
    let mut c = Visitor::Header("mover".into());
    let home = visit(&f.tethers[0], &mut c).await;
    for t in &f.tethers[1..] {
        assert_eq!(visit(t, &mut c).await, home);
    }
    // Only instance 0 is told: its next request for the session moves it (repin), and
    // the move reaches the others through Redis.
    let r = admin_call(f.tethers[0].admin(), "POST", &format!("/api/pools/header/backends/{home}/disable")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let moved = visit(&f.tethers[0], &mut c).await;
    assert_ne!(moved, home);
    for t in &f.tethers[1..] {
        // Where the backend is still enabled, only the shared move can take the session off it.
        let mut c = c.clone();
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < Duration::from_secs(1) {
            last = visit(t, &mut c).await;
            if last == moved {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(last, moved, "instance {} still sends the moved session to its old backend", t.addr());
    }
    let received =
        metric(f.tethers[2].admin(), "tether_store_moves_total{store=\"fleet\",direction=\"received\"}").await;
    assert!(received >= Some(1.0), "{received:?}");
}

/// The number of requests that waited on Redis, summed over the instances.
async fn waits(f: &Fleet) -> f64 {
    let mut n = 0.0;
    for t in &f.tethers {
        n += metric(t.admin(), "tether_store_wait_duration_seconds_count{store=\"fleet\"}").await.unwrap();
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_makes_no_known_session_wait_and_fails_nothing() {
    let Some(f) = Fleet::start().await else { return };
    let mut known = new_clients(&f, 5, "c", None).await;
    stays(&f, &mut known, 3, true).await;

    // Frozen: connections stay open and nothing answers.
    f.redis.signal("STOP");
    let before = waits(&f).await;
    stays(&f, &mut known, 3, false).await;
    assert_eq!(waits(&f).await, before, "a request for a known session waited on Redis");
    // New sessions wait at most the store's timeout, then are placed here; every request
    // is answered.
    let mut fresh = new_clients(&f, 3, "frozen", Some(1)).await;
    assert!(waits(&f).await > before);
    let admin = f.tethers[1].admin();
    wait_until_async("instance 1 counts Redis timeouts", Duration::from_secs(5), || async move {
        metric(admin, "tether_store_errors_total{store=\"fleet\",kind=\"timeout\"}").await > Some(0.0)
    })
    .await;
    wait_until_async("instance 1 sees its store down", Duration::from_secs(10), || async move {
        metric(admin, "tether_store_up{store=\"fleet\"}").await == Some(0.0)
    })
    .await;
    // Down: new keys no longer wait at all.
    let down = metric(admin, "tether_store_wait_duration_seconds_count{store=\"fleet\"}").await;
    let mut later = new_clients(&f, 3, "later", Some(1)).await;
    assert_eq!(metric(admin, "tether_store_wait_duration_seconds_count{store=\"fleet\"}").await, down);

    f.redis.signal("CONT");
    for t in &f.tethers {
        wait_until_async("every instance reports its store up again", Duration::from_secs(15), || store_up(t.admin()))
            .await;
    }
    wait_until_async("instance 1's write-back is done", Duration::from_secs(10), || async move {
        metric(admin, "tether_store_queued_writes{store=\"fleet\"}").await == Some(0.0)
    })
    .await;
    stays(&f, &mut later, 4, false).await;
    stays(&f, &mut fresh, 4, false).await;
    stays(&f, &mut known, 2, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_bring_the_store_in_and_out_and_a_bad_one_changes_nothing() {
    let Some(f) = Fleet::start().await else { return };
    let t = &f.tethers[2];
    let shared = std::fs::read_to_string(&t.config).unwrap();
    let store_of = || async { admin_json(t.admin(), "/api/pools/header").await["store"].clone() };

    // Without the top-level `store`, the pools share nothing (the store stays configured).
    let alone = shared.replacen("store = \"fleet\"\n", "", 1);
    assert_ne!(alone, shared);
    reload(t, &alone, "config reloaded").await;
    assert!(store_of().await.is_null(), "{}", store_of().await);

    // Sessions learned elsewhere meanwhile are found once the store is back.
    let mut clients = new_clients(&f, 5, "reload", Some(0)).await;
    reload(t, &shared, "config reloaded").await;
    assert_eq!(store_of().await["up"], true);
    for (c, home) in clients.iter_mut() {
        assert_eq!(&visit(t, c).await, home, "{c:?}");
    }

    // A config the resolver refuses leaves the running one, store and all.
    let bad = shared.replacen("prefix = \"test\"\n", "prefix = \"test\"\nca_file = \"ca.pem\"\n", 1);
    assert_ne!(bad, shared);
    reload(t, &bad, "reload rejected, the running config stays in force").await;
    assert!(t.log().contains("ca_file is for tls = true"), "{}", t.log());
    assert_eq!(store_of().await["up"], true);
    stays(&f, &mut clients, 2, false).await;
}

/// Backend `name` of pool `pool` as instance `admin` reports it.
async fn backend_state(admin: SocketAddr, pool: &str, name: &str) -> serde_json::Value {
    let v = admin_json(admin, &format!("/api/pools/{pool}")).await;
    v["backends"].as_array().unwrap().iter().find(|b| b["name"] == name).cloned().unwrap()
}

async fn admin_send(admin: SocketAddr, method: &str, path: &str, body: &str) -> (StatusCode, serde_json::Value) {
    let req = Request::builder().method(method).uri(path).header("host", admin.to_string());
    let r = Client::connect(admin).await.request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await;
    (r.status, serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_reach_every_instance_and_outlive_restarts() {
    let Some(mut f) = Fleet::start().await else { return };
    let admins: Vec<SocketAddr> = f.tethers.iter().map(|t| t.admin()).collect();
    // A drain through the first instance: the others drain it within a second, from the
    // same moment (so its drain_timeout ends at the same time everywhere).
    let (status, v) = admin_send(admins[0], "POST", "/api/pools/cookie/backends/app-2/drain", "").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["fleet"], "shared");
    let since = v["draining_since_ms"].as_u64().expect("a drain start");
    let start = std::time::Instant::now();
    for &a in &admins[1..] {
        wait_until_async("the drain reaches every instance", Duration::from_secs(1), || async {
            backend_state(a, "cookie", "app-2").await["admin_state"] == "draining"
        })
        .await;
        assert_eq!(backend_state(a, "cookie", "app-2").await["draining_since_ms"].as_u64(), Some(since));
    }
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    // A weight through the second, a disable through the third.
    let (status, v) = admin_send(admins[1], "PUT", "/api/pools/header/backends/app-3/weight", "{\"weight\": 7}").await;
    assert_eq!((status, &v["fleet"]), (StatusCode::OK, &serde_json::json!("shared")), "{v}");
    let (status, _) = admin_send(admins[2], "POST", "/api/pools/ip/backends/app-1/disable", "").await;
    assert_eq!(status, 200);
    for &a in &admins {
        wait_until_async("every change reaches every instance", Duration::from_secs(2), || async {
            backend_state(a, "header", "app-3").await["weight"] == 7
                && backend_state(a, "ip", "app-1").await["admin_state"] == "disabled"
                && backend_state(a, "cookie", "app-2").await["admin_state"] == "draining"
        })
        .await;
    }
    // The fleet lists its instances.
    let v = admin_json(admins[0], "/api/fleet").await;
    assert_eq!(v["store"], "fleet");
    let listed = v["instances"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{v}");
    assert_eq!(listed.iter().filter(|i| i["this"] == true).count(), 1, "{v}");

    // An instance started now, and one restarted, apply what the fleet did.
    let cfg = std::fs::read_to_string(&f.tethers[0].config).unwrap();
    let late = Tether::start(&cfg);
    f.tethers[1].signal("KILL");
    f.tethers[1] = Tether::start(&cfg);
    for t in [&late, &f.tethers[1]] {
        let a = t.admin();
        wait_until_async("a new instance applies the fleet's actions", Duration::from_secs(5), || async {
            backend_state(a, "cookie", "app-2").await["admin_state"] == "draining"
                && backend_state(a, "header", "app-3").await["weight"] == 7
                && backend_state(a, "ip", "app-1").await["admin_state"] == "disabled"
        })
        .await;
        assert_eq!(backend_state(a, "cookie", "app-2").await["draining_since_ms"].as_u64(), Some(since));
    }
    // Enabled again through the late one: everyone follows.
    let (status, v) = admin_send(late.admin(), "POST", "/api/pools/cookie/backends/app-2/enable", "").await;
    assert_eq!((status, &v["fleet"]), (StatusCode::OK, &serde_json::json!("shared")));
    let admins: Vec<SocketAddr> = f.tethers.iter().map(|t| t.admin()).collect();
    for &a in &admins {
        wait_until_async("the enable reaches every instance", Duration::from_secs(2), || async {
            backend_state(a, "cookie", "app-2").await["admin_state"] == "enabled"
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_made_while_redis_is_down_is_shared_when_it_returns() {
    let Some(mut f) = Fleet::start().await else { return };
    let admins: Vec<SocketAddr> = f.tethers.iter().map(|t| t.admin()).collect();
    let port = f.redis.port;
    f.redis.kill();
    wait_until_async("the instance sees Redis down", Duration::from_secs(10), || async { !store_up(admins[0]).await })
        .await;
    let (status, v) = admin_send(admins[0], "POST", "/api/pools/header/backends/app-1/drain", "").await;
    assert_eq!(status, 200);
    assert!(v["fleet"].as_str().unwrap().starts_with("pending: "), "{v}");
    // Applied here at once, and nowhere else while Redis is away.
    assert_eq!(backend_state(admins[0], "header", "app-1").await["admin_state"], "draining");
    assert_eq!(backend_state(admins[1], "header", "app-1").await["admin_state"], "enabled");
    f.redis = Redis::on(port).await;
    for &a in &admins {
        wait_until_async("the pending drain reaches every instance", Duration::from_secs(15), || async {
            backend_state(a, "header", "app-1").await["admin_state"] == "draining"
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_backends_sessions_are_counted_once_over_the_fleet_and_one_shot_clients_not_at_all() {
    let Some(f) = Fleet::start().await else { return };
    // Thirty clients (ten of each kind of key) that come back, each to every instance in
    // turn; thirty more that make one request and are never seen again.
    let mut returning = new_clients(&f, 10, "back", None).await;
    stays(&f, &mut returning, 3, true).await;
    let _one_shot = new_clients(&f, 10, "once", None).await;
    let mut want: std::collections::HashMap<(String, String), u64> = Default::default();
    for (c, home) in &returning {
        *want.entry((c.pool().to_string(), home.clone())).or_default() += 1;
    }
    let counted = |v: &serde_json::Value| -> std::collections::HashMap<(String, String), u64> {
        v["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["sessions"].as_u64() != Some(0))
            .map(|s| {
                let key = (s["pool"].as_str().unwrap().to_string(), s["backend"].as_str().unwrap().to_string());
                (key, s["sessions"].as_u64().unwrap())
            })
            .collect()
    };
    // Every instance reports the same fleet-wide counts: each returning client once.
    for t in &f.tethers {
        let admin = t.admin();
        let last = std::sync::Mutex::new(serde_json::Value::Null);
        let found = poll_until_async(Duration::from_secs(5), || async {
            let v = admin_json(admin, "/api/fleet").await;
            let ok = counted(&v) == want;
            *last.lock().unwrap() = v;
            ok
        })
        .await;
        assert!(found, "want {want:?}, got {}", last.lock().unwrap());
    }
}

/// `examples/fleet.sh` in its checking mode: Redis, three demo backends and three Tethers
/// started by the script, a session kept through all three instances, a drain shared.
#[test]
fn the_fleet_example_starts_a_fleet_that_shares_sessions_and_drains() {
    let installed = Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_ok();
    if !installed {
        assert!(std::env::var_os("CI").is_none(), "redis-server is not installed: .ci/setup installs it");
        eprintln!("SKIPPED: redis-server is not installed");
        return;
    }
    // The script's ports shifted to a range that is free now (its defaults are 8081-8083,
    // 9101-9103, 9981-9983 and 6390).
    let free = |base: u16| {
        [6390, 8081, 8082, 8083, 9101, 9102, 9103, 9981, 9982, 9983]
            .iter()
            .all(|p| TcpListener::bind(("127.0.0.1", p + base)).is_ok())
    };
    let base = (0..50).map(|i| 20_000 + ((rand() % 200) as u16) * 100 + i).find(|b| free(*b)).expect("free ports");
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("examples/fleet.sh"))
        .env("FLEET_CHECK", "1")
        .env("TETHER", bin())
        .env("BASE", base.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fleet.sh failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("stayed on app-"), "{stdout}");
    assert!(stdout.contains("reached instances 2 and 3"), "{stdout}");
    assert!(stdout.contains("the fleet lists 3 instances"), "{stdout}");
}

/// A CA and a certificate it signs for `names`, written as PEM files: (CA, cert, key).
fn tls_files(
    scratch: &Scratch,
    tag: &str,
    names: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    (
        scratch.write(&format!("{tag}-ca.pem"), &ca.pem()),
        scratch.write(&format!("{tag}.pem"), &cert.pem()),
        scratch.write(&format!("{tag}.key"), &key.serialize_pem()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_shared_through_a_redis_that_speaks_tls() {
    let installed = Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_ok();
    if !installed {
        assert!(std::env::var_os("CI").is_none(), "redis-server is not installed: .ci/setup installs it");
        return;
    }
    let scratch = Scratch::new();
    let (ca, cert, key) = tls_files(&scratch, "redis", &["127.0.0.1"]);
    let (other_ca, _, _) = tls_files(&scratch, "other", &["127.0.0.1"]);
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // Redis on TLS only: its plain port off.
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--tls-ca-cert-file")
        .arg(&ca)
        .args(["--tls-auth-clients", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _redis = Kill(&mut child);
    let backends = backends(3).await;
    let store_key = scratch.write("store.key", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n");
    let with_ca = |ca: &std::path::Path| {
        fleet_config(&backends, port, &store_key).replacen(
            "prefix = \"test\"\n",
            &format!("prefix = \"test\"\ntls = true\nca_file = \"{}\"\n", ca.display()),
            1,
        )
    };
    let t: Vec<Tether> = (0..2).map(|_| Tether::start(&with_ca(&ca))).collect();
    for t in &t {
        wait_until_async("the store is up over TLS", Duration::from_secs(10), || store_up(t.admin())).await;
    }
    // A session learned on one instance keeps its backend on the other.
    for i in 0..10 {
        let mut c = Visitor::Header(format!("tls-user-{i}"));
        let home = visit(&t[0], &mut c).await;
        for _ in 0..3 {
            assert_eq!(visit(&t[1], &mut c).await, home, "{c:?}");
        }
    }
    // An instance that trusts another CA does not talk to this Redis, and says so.
    let stranger = Tether::start(&with_ca(&other_ca));
    stranger.wait_log("is down").await;
    assert!(!store_up(stranger.admin()).await);
}

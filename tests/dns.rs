//! Backends from DNS through the real balancer: a small DNS server written for the test
//! answers on loopback UDP from a zone the test changes; a real Tether resolves a pool's
//! backends through it every 200 ms. The answers name real demo backends (on 127.0.0.2,
//! .3 and .4, one port, as a Kubernetes headless Service names pods). Addresses join with
//! slow start and take new sessions while sticky clients stay; a vanished address drains
//! (its sessions stay, new ones go elsewhere) and is removed after `drain_timeout`; a
//! reload keeps it all; a server that stops answering, fails or says NXDOMAIN leaves the
//! last good set serving.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::Request;
use http_body_util::Full;

// === the test's DNS server ===

/// How the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Answer,
    /// Reads queries and never answers (a resolver that is down).
    Silent,
    /// Answers every query with SERVFAIL.
    ServFail,
}

/// What the server knows: A records and SRV records (port, target) by lower-case name.
struct Zone {
    a: HashMap<String, Vec<Ipv4Addr>>,
    srv: HashMap<String, Vec<(u16, String)>>,
    mode: Mode,
}

/// A DNS server on loopback UDP, answering from a zone the test changes as it runs.
struct DnsServer {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    stop: Arc<AtomicBool>,
}

impl DnsServer {
    fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = socket.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone { a: HashMap::new(), srv: HashMap::new(), mode: Mode::Answer }));
        let stop = Arc::new(AtomicBool::new(false));
        let (z, s) = (zone.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
                let reply = answer(&buf[..n], &z.lock().unwrap());
                if let Some(reply) = reply {
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        DnsServer { addr, zone, stop }
    }

    fn set_a(&self, name: &str, ips: &[Ipv4Addr]) {
        self.zone.lock().unwrap().a.insert(name.to_string(), ips.to_vec());
    }

    fn set_srv(&self, name: &str, targets: &[(u16, &str)]) {
        let targets = targets.iter().map(|(p, t)| (*p, t.to_string())).collect();
        self.zone.lock().unwrap().srv.insert(name.to_string(), targets);
    }

    fn forget(&self, name: &str) {
        self.zone.lock().unwrap().a.remove(name);
    }

    fn mode(&self, mode: Mode) {
        self.zone.lock().unwrap().mode = mode;
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn push_name(p: &mut Vec<u8>, name: &str) {
    for label in name.split('.').filter(|l| !l.is_empty()) {
        p.push(label.len() as u8);
        p.extend_from_slice(label.as_bytes());
    }
    p.push(0);
}

fn push_record(p: &mut Vec<u8>, owner: Option<&str>, rtype: u16, data: &[u8]) {
    match owner {
        // A pointer to the question's name, at offset 12.
        None => p.extend_from_slice(&[0xc0, 12]),
        Some(n) => push_name(p, n),
    }
    p.extend_from_slice(&rtype.to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    p.extend_from_slice(&5u32.to_be_bytes());
    p.extend_from_slice(&(data.len() as u16).to_be_bytes());
    p.extend_from_slice(data);
}

/// The reply to one query, written independently of Tether's own DNS code.
fn answer(q: &[u8], zone: &Zone) -> Option<Vec<u8>> {
    if q.len() < 12 || zone.mode == Mode::Silent {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*q.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let end = i + 4;
    let mut p = q.get(..end)?.to_vec();
    let name = labels.join(".");
    let (mut answers, mut additionals) = (0u16, 0u16);
    let mut records = Vec::new();
    let mut extra = Vec::new();
    let mut rcode = 0u8;
    if zone.mode == Mode::ServFail {
        rcode = 2;
    } else if qtype == 1 && zone.a.contains_key(&name) {
        for ip in &zone.a[&name] {
            push_record(&mut records, None, 1, &ip.octets());
            answers += 1;
        }
    } else if qtype == 33 && zone.srv.contains_key(&name) {
        for (port, target) in &zone.srv[&name] {
            let mut data = vec![0, 10, 0, 1];
            data.extend_from_slice(&port.to_be_bytes());
            push_name(&mut data, target);
            push_record(&mut records, None, 33, &data);
            answers += 1;
            for ip in zone.a.get(target).into_iter().flatten() {
                push_record(&mut extra, Some(target), 1, &ip.octets());
                additionals += 1;
            }
        }
    } else if !zone.a.contains_key(&name) && !zone.srv.contains_key(&name) {
        rcode = 3;
    }
    // QR, the query's RD, RA; the response code.
    p[2] = 0x80 | (q[2] & 0x01);
    p[3] = 0x80 | rcode;
    p[6..8].copy_from_slice(&answers.to_be_bytes());
    p[8..10].copy_from_slice(&[0, 0]);
    p[10..12].copy_from_slice(&additionals.to_be_bytes());
    p.extend_from_slice(&records);
    p.extend_from_slice(&extra);
    Some(p)
}

// === helpers ===

/// Demo backends on 127.0.0.2, .3, ... all on one port, as A records name them.
async fn backends_on_one_port(n: u8) -> (u16, Vec<DemoBackend>) {
    for _ in 0..20 {
        let first = DemoBackend::start("app-1", "127.0.0.2:0".parse().unwrap()).await.unwrap();
        let port = first.address.port();
        let mut all = vec![first];
        for i in 2..=n {
            let addr = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 1 + i), port));
            match DemoBackend::start(&format!("app-{i}"), addr).await {
                Ok(b) => all.push(b),
                Err(_) => break,
            }
        }
        if all.len() == usize::from(n) {
            return (port, all);
        }
    }
    panic!("no port free on 127.0.0.2 to 127.0.0.{}", n + 1);
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// A client with its own cookie jar for Tether's cookie.
#[derive(Default, Clone)]
struct Sticky {
    cookie: Option<String>,
    backend: String,
}

impl Sticky {
    /// One request; keeps the cookie Tether sets and returns the demo backend that answered.
    async fn visit(&mut self, addr: SocketAddr) -> String {
        let mut r = Request::get("/").header("host", "app.test");
        if let Some(c) = &self.cookie {
            r = r.header("cookie", c.as_str());
        }
        let resp = Client::connect(addr).await.request(r.body(Full::default()).unwrap()).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        for v in resp.headers.get_all("set-cookie") {
            let v = v.to_str().unwrap();
            if v.starts_with("tether=") {
                self.cookie = Some(v.split(';').next().unwrap().to_string());
            }
        }
        self.backend = resp.backend();
        self.backend.clone()
    }
}

/// The pool's backends as the admin API shows them: name -> (admin state, health).
async fn pool_backends(admin: SocketAddr) -> BTreeMap<String, (String, String)> {
    let v = admin_json(admin, "/api/pools/web").await;
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let s = |k: &str| b[k].as_str().unwrap().to_string();
            (s("name"), (s("admin_state"), s("health")))
        })
        .collect()
}

/// Waits until the admin API shows exactly `want` (name, admin state) for the pool.
async fn wait_backends(admin: SocketAddr, want: &[(&str, &str)]) {
    let want: BTreeMap<String, String> = want.iter().map(|(n, s)| (n.to_string(), s.to_string())).collect();
    let what = format!("the pool's backends are {want:?}");
    wait_until_async(&what, Duration::from_secs(10), || {
        let want = want.clone();
        async move {
            let got: BTreeMap<String, String> =
                pool_backends(admin).await.into_iter().map(|(n, (s, _))| (n, s)).collect();
            got == want
        }
    })
    .await;
}

/// A counter or gauge of `/metrics` whose line contains every one of `labels`.
async fn metric(admin: SocketAddr, name: &str, labels: &[&str]) -> f64 {
    let text = get(admin, "/metrics").await.text();
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_metric(admin: SocketAddr, name: &str, labels: &[&str], at_least: f64) {
    let what = format!("{name}{labels:?} reaches {at_least}");
    wait_until_async(&what, Duration::from_secs(10), || async move { metric(admin, name, labels).await >= at_least })
        .await;
}

fn config(dns: SocketAddr, port: u16, interval: &str) -> String {
    format!(
        r#"{ADMIN}
[dns]
resolvers = ["{dns}"]
timeout = "200ms"

[[listeners]]
name = "web"
bind = "127.0.0.1:0"
pool = "web"

[pools.web]
slow_start = "1s"

[[pools.web.dns]]
name = "App.Test."
port = {port}
interval = "{interval}"

[pools.web.affinity]
keys = ["cookie"]
drain_timeout = "3s"
"#
    )
}

// === the tests ===

#[tokio::test]
async fn dns_backends_join_drain_and_outlive_failed_lookups() {
    let (port, demo) = backends_on_one_port(3).await;
    assert_eq!(demo.len(), 3);
    let dns = DnsServer::start();
    dns.set_a("app.test", &[ip(2), ip(3)]);
    let t = Tether::start(&config(dns.addr, port, "200ms"));
    let admin = t.admin();
    let name = |last: u8| format!("app.test@127.0.0.{last}:{port}");
    let (n2, n3, n4) = (name(2), name(3), name(4));

    // The first answer is the pool, before the first request.
    wait_backends(admin, &[(&n2, "enabled"), (&n3, "enabled")]).await;
    let mut clients = vec![Sticky::default(); 24];
    let mut first = BTreeSet::new();
    for c in &mut clients {
        first.insert(c.visit(t.addr()).await);
    }
    assert_eq!(first, BTreeSet::from(["app-1".to_string(), "app-2".to_string()]), "both addresses serve");

    // A new address joins; sticky clients keep their backends, new sessions reach it once
    // its slow start lets them.
    dns.set_a("app.test", &[ip(2), ip(3), ip(4)]);
    wait_backends(admin, &[(&n2, "enabled"), (&n3, "enabled"), (&n4, "enabled")]).await;
    for c in &mut clients {
        let before = c.backend.clone();
        assert_eq!(c.visit(t.addr()).await, before, "a sticky client moved when an address joined");
    }
    let addr = t.addr();
    wait_until_async("a new session lands on the new address", Duration::from_secs(10), || async move {
        Sticky::default().visit(addr).await == "app-3"
    })
    .await;

    // A reload keeps the DNS backends, their sessions and their counters.
    let requests = |v: &serde_json::Value, n: &str| {
        v["backends"].as_array().unwrap().iter().find(|b| b["name"] == n).unwrap()["requests"].as_u64().unwrap()
    };
    let before = requests(&admin_json(admin, "/api/pools/web").await, &n2);
    assert!(before > 0);
    reload(&t, &config(dns.addr, port, "250ms"), "config reloaded").await;
    assert!(t.log().contains("dns source app.test/a:"), "the reload names the changed source:\n{}", t.log());
    wait_backends(admin, &[(&n2, "enabled"), (&n3, "enabled"), (&n4, "enabled")]).await;
    assert!(requests(&admin_json(admin, "/api/pools/web").await, &n2) >= before, "the reload made a new backend");
    for c in &mut clients {
        let before = c.backend.clone();
        assert_eq!(c.visit(t.addr()).await, before, "a sticky client moved on reload");
    }

    // 127.0.0.2 leaves the answer: its backend drains. Its sessions still reach it, new
    // sessions do not.
    dns.set_a("app.test", &[ip(3), ip(4)]);
    wait_backends(admin, &[(&n2, "draining"), (&n3, "enabled"), (&n4, "enabled")]).await;
    let draining_seen = Instant::now();
    let on_app1 = clients.iter().filter(|c| c.backend == "app-1").count();
    assert!(on_app1 > 0, "no client was on app-1");
    for c in clients.iter_mut().filter(|c| c.backend == "app-1") {
        assert_eq!(c.visit(t.addr()).await, "app-1", "a session left its draining backend before drain_timeout");
    }
    for _ in 0..30 {
        assert_ne!(Sticky::default().visit(t.addr()).await, "app-1", "a new session went to a draining backend");
    }
    assert!(draining_seen.elapsed() < Duration::from_secs(2), "the checks above took too long to mean anything");

    // After drain_timeout (3s) it is removed, not before; its clients move on.
    wait_backends(admin, &[(&n3, "enabled"), (&n4, "enabled")]).await;
    let drained = draining_seen.elapsed();
    assert!(drained >= Duration::from_millis(2500), "removed after {drained:?}, before drain_timeout");
    t.wait_log("dns: drained backend removed: drain_timeout is over").await;
    for c in clients.iter_mut().filter(|c| c.backend == "app-1") {
        assert_ne!(c.visit(t.addr()).await, "app-1", "a session stayed on a removed backend");
    }

    // The DNS server stops answering: lookups time out, the last good set stays, requests
    // keep succeeding, and the failure is logged once, however many lookups fail.
    let source = format!("source=\"app.test/a:{port}\"");
    dns.mode(Mode::Silent);
    wait_metric(admin, "tether_dns_lookups_total", &[&source, "result=\"timeout\""], 3.0).await;
    assert_eq!(metric(admin, "tether_dns_up", &[&source]).await, 0.0);
    let pool = admin_json(admin, "/api/pools/web").await;
    assert_eq!(pool["dns"][0]["source"], format!("app.test/a:{port}"), "{pool}");
    assert_eq!(pool["dns"][0]["last_lookup"], "timeout", "{pool}");
    assert_eq!(pool["dns"][0]["backends"], 2, "{pool}");
    assert_eq!(t.log().matches("dns: lookup failed: no name server answered in time").count(), 1, "{}", t.log());
    wait_backends(admin, &[(&n3, "enabled"), (&n4, "enabled")]).await;
    for c in &mut clients {
        let before = c.backend.clone();
        assert_eq!(c.visit(t.addr()).await, before, "a sticky client moved while DNS was down");
    }

    // SERVFAIL, then NXDOMAIN: the same.
    dns.mode(Mode::ServFail);
    wait_metric(admin, "tether_dns_lookups_total", &[&source, "result=\"servfail\""], 2.0).await;
    dns.mode(Mode::Answer);
    dns.forget("app.test");
    wait_metric(admin, "tether_dns_lookups_total", &[&source, "result=\"nxdomain\""], 2.0).await;
    wait_backends(admin, &[(&n3, "enabled"), (&n4, "enabled")]).await;
    for c in &mut clients {
        assert_eq!(c.visit(t.addr()).await, c.backend.clone(), "a sticky client moved on a failed lookup");
    }

    // Answers again: up, with the same set.
    dns.set_a("app.test", &[ip(3), ip(4)]);
    wait_metric(admin, "tether_dns_up", &[&source], 1.0).await;
    t.wait_log("dns: lookups succeed again").await;
    wait_backends(admin, &[(&n3, "enabled"), (&n4, "enabled")]).await;
}

#[tokio::test]
async fn an_address_back_before_its_drain_ends_is_enabled_again() {
    let (port, _demo) = backends_on_one_port(2).await;
    let dns = DnsServer::start();
    dns.set_a("app.test", &[ip(2), ip(3)]);
    let t = Tether::start(&config(dns.addr, port, "200ms"));
    let admin = t.admin();
    let (n2, n3) = (format!("app.test@127.0.0.2:{port}"), format!("app.test@127.0.0.3:{port}"));
    wait_backends(admin, &[(&n2, "enabled"), (&n3, "enabled")]).await;
    // Sessions on both, so that a drain has something to keep.
    let mut clients = vec![Sticky::default(); 8];
    for c in &mut clients {
        c.visit(t.addr()).await;
    }
    dns.set_a("app.test", &[ip(3)]);
    wait_backends(admin, &[(&n2, "draining"), (&n3, "enabled")]).await;
    let back = Instant::now();
    dns.set_a("app.test", &[ip(2), ip(3)]);
    wait_backends(admin, &[(&n2, "enabled"), (&n3, "enabled")]).await;
    t.wait_log("dns: backend is back in the answer: enabled again").await;
    // Enabled by its return, well within drain_timeout (3s), not removed and found anew.
    assert!(back.elapsed() < Duration::from_secs(2), "enabled only after {:?}", back.elapsed());
    assert!(!t.log().contains("drained backend removed"), "{}", t.log());
    for c in &mut clients {
        let before = c.backend.clone();
        assert_eq!(c.visit(t.addr()).await, before, "a session moved although its address came back");
    }
}

#[tokio::test]
async fn srv_records_name_backends_with_their_own_ports() {
    let demo = backends(2).await;
    let dns = DnsServer::start();
    dns.set_a("node-1.app.test", &[Ipv4Addr::LOCALHOST]);
    dns.set_a("node-2.app.test", &[Ipv4Addr::LOCALHOST]);
    dns.set_srv(
        "_http._tcp.app.test",
        &[(demo[0].address.port(), "node-1.app.test"), (demo[1].address.port(), "node-2.app.test")],
    );
    // The global resolver is a port nobody serves; the pool names its own, the test's.
    let text = format!(
        "{ADMIN}\n[dns]\nresolvers = [\"127.0.0.1:9\"]\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\npool = \"web\"\n\n[pools.web]\nresolvers = [\"{}\"]\n\n[[pools.web.dns]]\nname = \"_http._tcp.app.test\"\ntype = \"srv\"\ninterval = \"200ms\"\n",
        dns.addr
    );
    let t = Tether::start(&text);
    let admin = t.admin();
    let name = |b: &DemoBackend| format!("_http._tcp.app.test@{}", b.address);
    let (n1, n2) = (name(&demo[0]), name(&demo[1]));
    wait_backends(admin, &[(&n1, "enabled"), (&n2, "enabled")]).await;
    let mut seen = BTreeSet::new();
    for _ in 0..8 {
        seen.insert(get(t.addr(), "/").await.backend());
    }
    assert_eq!(seen, BTreeSet::from(["app-1".to_string(), "app-2".to_string()]));
    // Without affinity, a vanished target has no sessions to keep: it goes once idle.
    dns.set_srv("_http._tcp.app.test", &[(demo[1].address.port(), "node-2.app.test")]);
    wait_backends(admin, &[(&n2, "enabled")]).await;
    for _ in 0..8 {
        assert_eq!(get(t.addr(), "/").await.backend(), "app-2");
    }
}

#[tokio::test]
async fn a_new_address_ramps_up_under_slow_start() {
    let (port, _demo) = backends_on_one_port(2).await;
    let dns = DnsServer::start();
    dns.set_a("app.test", &[ip(2)]);
    // A day of slow start: a backend that joined a second ago takes a new session with a
    // chance of about 1 in 86 400 per pick.
    let text = config(dns.addr, port, "200ms").replace("slow_start = \"1s\"", "slow_start = \"1d\"");
    let t = Tether::start(&text);
    let admin = t.admin();
    let (n2, n3) = (format!("app.test@127.0.0.2:{port}"), format!("app.test@127.0.0.3:{port}"));
    wait_backends(admin, &[(&n2, "enabled")]).await;
    dns.set_a("app.test", &[ip(2), ip(3)]);
    wait_backends(admin, &[(&n3, "enabled"), (&n2, "enabled")]).await;
    for _ in 0..40 {
        assert_eq!(Sticky::default().visit(t.addr()).await, "app-1", "a new address took new sessions at full share");
    }
}

const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

#[tokio::test]
async fn two_instances_derive_the_same_identities_from_dns() {
    // Two Tethers with the same config (cookie key included) resolve the same name: a
    // cookie issued by one keeps its backend on the other, as it would after a restart.
    // Placement is random, so that two instances placing anew cannot agree by chance
    // (round robin would, request for request).
    let (port, _demo) = backends_on_one_port(2).await;
    let dns = DnsServer::start();
    dns.set_a("app.test", &[ip(2), ip(3)]);
    let text = format!("{}\n[pools.web.affinity.cookie]\nkeys = [\"{KEY}\"]\n", config(dns.addr, port, "200ms"))
        .replace("slow_start = \"1s\"", "algorithm = \"random\"");
    let one = Tether::start(&text);
    let two = Tether::start(&text);
    let (n2, n3) = (format!("app.test@127.0.0.2:{port}"), format!("app.test@127.0.0.3:{port}"));
    for t in [&one, &two] {
        wait_backends(t.admin(), &[(&n2, "enabled"), (&n3, "enabled")]).await;
    }
    let mut seen = BTreeSet::new();
    for _ in 0..16 {
        let mut c = Sticky::default();
        let first = c.visit(one.addr()).await;
        seen.insert(first.clone());
        assert_eq!(c.visit(two.addr()).await, first, "the other instance placed the session anew");
    }
    assert_eq!(seen.len(), 2, "every session went to one backend: {seen:?}");
}

#[tokio::test]
async fn health_checks_end_the_drain_of_a_vanished_address_that_is_down() {
    let (port, demo) = backends_on_one_port(2).await;
    let dns = DnsServer::start();
    dns.set_a("app.test", &[ip(2), ip(3)]);
    let text = config(dns.addr, port, "200ms").replace("drain_timeout = \"3s\"", "drain_timeout = \"1h\"")
        + "\n[pools.web.health]\ncheck = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"100ms\"\nfall = 1\nrise = 1\n";
    let t = Tether::start(&text);
    let admin = t.admin();
    let (n2, n3) = (format!("app.test@127.0.0.2:{port}"), format!("app.test@127.0.0.3:{port}"));
    wait_backends(admin, &[(&n2, "enabled"), (&n3, "enabled")]).await;

    // The admin API acts on a DNS backend like on any other.
    let post = |action: &str| {
        Request::post(format!("/api/pools/web/backends/{n3}/{action}"))
            .header("host", admin.to_string())
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(Client::connect(admin).await.request(post("drain")).await.status, 200);
    wait_backends(admin, &[(&n2, "enabled"), (&n3, "draining")]).await;
    assert_eq!(Client::connect(admin).await.request(post("enable")).await.status, 200);
    wait_backends(admin, &[(&n2, "enabled"), (&n3, "enabled")]).await;

    let mut clients = vec![Sticky::default(); 8];
    for c in &mut clients {
        c.visit(t.addr()).await;
    }
    assert!(clients.iter().any(|c| c.backend == "app-1"), "no session on app-1");
    // The pod behind 127.0.0.2 goes away, and so does its address: its sessions have
    // nowhere to stay, so the drain ends long before drain_timeout.
    demo[0].stop();
    dns.set_a("app.test", &[ip(3)]);
    wait_backends(admin, &[(&n3, "enabled")]).await;
    t.wait_log("dns: drained backend removed: health checks find it down").await;
    for c in &mut clients {
        assert_eq!(c.visit(t.addr()).await, "app-2");
    }
}

// Two runtime threads: waiting for the first Tether to exit blocks one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_restart_brings_back_pins_to_dns_backends() {
    // Table-mapped keys placed at random: only the saved table can place them as before.
    // The DNS sources are resolved before the state file is read, so the restored pins
    // find their backends.
    let (port, _demo) = backends_on_one_port(2).await;
    let dns = DnsServer::start();
    dns.set_a("app.test", &[ip(2), ip(3)]);
    let state = Scratch::new();
    let text = format!("[runtime]\nstate_dir = \"{}\"\n{}", state.0.display(), config(dns.addr, port, "200ms"))
        .replace("slow_start = \"1s\"", "algorithm = \"random\"")
        .replace("keys = [\"cookie\"]", "keys = [\"header:x-user\"]");
    let user = |t: &Tether, i: usize| {
        let addr = t.addr();
        async move {
            let r = Request::get("/").header("host", "app.test").header("x-user", format!("u{i}"));
            let resp = Client::connect(addr).await.request(r.body(Full::default()).unwrap()).await;
            assert_eq!(resp.status, 200);
            resp.backend()
        }
    };
    let mut t = Tether::start(&text);
    let mut before = Vec::new();
    for i in 0..16 {
        before.push(user(&t, i).await);
    }
    assert_eq!(before.iter().collect::<BTreeSet<_>>().len(), 2, "every user went to one backend: {before:?}");
    t.signal("TERM");
    assert!(t.wait_exit(Duration::from_secs(20)).success(), "{}", t.log());
    let t = Tether::start(&text);
    for (i, b) in before.iter().enumerate() {
        assert_eq!(&user(&t, i).await, b, "user u{i} was placed anew after the restart:\n{}", t.log());
    }
}

#[tokio::test]
async fn a_reload_without_the_source_drops_its_backends() {
    let (port, _demo) = backends_on_one_port(2).await;
    let dns = DnsServer::start();
    dns.set_a("app.test", &[ip(2), ip(3)]);
    let text = config(dns.addr, port, "200ms");
    let t = Tether::start(&text);
    let admin = t.admin();
    let (n2, n3) = (format!("app.test@127.0.0.2:{port}"), format!("app.test@127.0.0.3:{port}"));
    wait_backends(admin, &[(&n2, "enabled"), (&n3, "enabled")]).await;
    let source = format!("source=\"app.test/a:{port}\"");
    wait_metric(admin, "tether_dns_lookups_total", &[&source, "result=\"ok\""], 1.0).await;
    // The file lists the second address as a static backend instead.
    let dns_section = format!("[[pools.web.dns]]\nname = \"App.Test.\"\nport = {port}\ninterval = \"200ms\"\n");
    assert!(text.contains(&dns_section));
    let static_only =
        text.replace(&dns_section, &format!("backends = [{{ name = \"static\", address = \"127.0.0.3:{port}\" }}]\n"));
    reload(&t, &static_only, "config reloaded").await;
    assert!(t.log().contains(&format!("dns source app.test/a:{port} removed")), "{}", t.log());
    wait_backends(admin, &[("static", "enabled")]).await;
    assert!(!get(admin, "/metrics").await.text().contains(&source), "the removed source is still in the metrics");
    assert_eq!(Sticky::default().visit(t.addr()).await, "app-2");
}

//! Rebalancing idle sessions (`[pools.NAME.affinity.rebalance]`): a real Tether in front of
//! backends of the test's own that echo each request's head and can hold a request until
//! the test lets it go. Forty sticky sessions on two backends; a third is added by reload;
//! idle sessions, and only idle ones, move to it until no backend holds more than the
//! factor times the mean, each with the re-pin header saying `rebalance`, at a bounded rate.
//! A session with a request in flight (HTTP/1 or HTTP/2) or an open tunnel is active
//! however long ago its request began.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

/// A backend that answers every request with its head as the body and `x-backend: NAME`,
/// holds a request for `/hold` until [`release`](Self::release), and switches a request
/// for `/tunnel` to a tunnel that echoes what it gets until the client closes it.
struct EchoBackend {
    name: String,
    addr: SocketAddr,
    /// Requests for `/hold` waiting to be let go.
    held: Arc<AtomicUsize>,
    release: watch::Sender<bool>,
}

impl EchoBackend {
    async fn start(name: &str) -> EchoBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = Arc::new(AtomicUsize::new(0));
        let (release, _) = watch::channel(false);
        let (name_, held_, release_) = (name.to_string(), held.clone(), release.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(echo(s, name_.clone(), held_.clone(), release_.subscribe()));
            }
        });
        EchoBackend { name: name.to_string(), addr, held, release }
    }

    fn release(&self) {
        self.release.send_replace(true);
    }
}

/// One backend connection: requests without bodies, answered in order.
async fn echo(mut s: TcpStream, name: String, held: Arc<AtomicUsize>, mut release: watch::Receiver<bool>) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head: Vec<u8> = buf.drain(..end).collect();
        if head.starts_with(b"GET /tunnel") {
            let switch = format!(
                "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\nx-backend: {name}\r\n\r\n"
            );
            if s.write_all(switch.as_bytes()).await.is_err() {
                return;
            }
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            return;
        }
        if head.starts_with(b"GET /hold") {
            held.fetch_add(1, Ordering::SeqCst);
            let _ = release.wait_for(|go| *go).await;
            held.fetch_sub(1, Ordering::SeqCst);
        }
        let answer = format!("HTTP/1.1 200 OK\r\nx-backend: {name}\r\ncontent-length: {}\r\n\r\n", head.len());
        if s.write_all(answer.as_bytes()).await.is_err() || s.write_all(&head).await.is_err() {
            return;
        }
    }
}

/// How the sessions stay on their backend.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Sticky {
    /// Tether's cookie.
    Cookie,
    /// `X-User`, table-mapped.
    Table,
}

fn rebalance_config(sticky: Sticky, backends: &[&EchoBackend], rebalance: &str) -> String {
    let keys = match sticky {
        Sticky::Cookie => format!("keys = [\"cookie\"]\n[pools.web.affinity.cookie]\nkeys = [\"{KEY}\"]\n"),
        Sticky::Table => "keys = [\"header:x-user\"]\n".to_string(),
    };
    let members: Vec<(&str, SocketAddr)> = backends.iter().map(|b| (b.name.as_str(), b.addr)).collect();
    format!(
        "{}\n[pools.web.affinity]\n{keys}\n[pools.web.affinity.rebalance]\n{rebalance}\n",
        pool_of(&members, "algorithm = \"round_robin\"", ADMIN)
    )
}

/// One sticky client.
#[derive(Debug, Clone)]
struct Session {
    n: usize,
    sticky: Sticky,
    /// Tether's cookie, `tether=...`, once it has one.
    cookie: Option<String>,
    /// The backend its first request went to.
    home: String,
}

/// What a request of a session got.
#[derive(Debug)]
struct Seen {
    backend: String,
    /// The re-pin header's value, as the backend received it.
    repinned: Option<String>,
}

impl Session {
    /// The field that carries the session, as a header line.
    fn key_field(&self) -> String {
        match (self.sticky, &self.cookie) {
            (Sticky::Cookie, Some(cookie)) => format!("cookie: {cookie}\r\n"),
            (Sticky::Cookie, None) => String::new(),
            (Sticky::Table, _) => format!("x-user: user-{}\r\n", self.n),
        }
    }

    /// Opens a WebSocket-style tunnel of the session through Tether, and the backend it
    /// reached; the tunnel stays open while the stream does.
    async fn tunnel(&self, addr: SocketAddr) -> (TcpStream, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /tunnel HTTP/1.1\r\nhost: shop.example\r\nconnection: upgrade\r\nupgrade: websocket\r\n{}\r\n",
            self.key_field()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(s.read(&mut byte).await.unwrap(), 1, "tunnel head: {}", String::from_utf8_lossy(&head));
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let backend = values(&head, "x-backend").pop().unwrap_or_default();
        // The tunnel carries bytes both ways.
        s.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
        (s, backend)
    }

    /// A request of the session over HTTP/2 for `path`.
    async fn visit_h2(&self, addr: SocketAddr, path: &str) -> Seen {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let mut req = Request::get(format!("http://shop.example{path}"));
        match (self.sticky, &self.cookie) {
            (Sticky::Cookie, Some(cookie)) => req = req.header("cookie", cookie),
            (Sticky::Cookie, None) => {}
            (Sticky::Table, _) => req = req.header("x-user", format!("user-{}", self.n)),
        }
        let r = sender.send_request(req.body(Full::<Bytes>::default()).unwrap()).await.unwrap();
        let backend = r.headers().get("x-backend").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let text = String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        let repinned = text
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("tether-session-repinned: ").map(str::to_string));
        Seen { backend, repinned }
    }

    async fn visit(&mut self, c: &mut Client, path: &str) -> Seen {
        let mut req = Request::get(path).header("host", "shop.example");
        match (self.sticky, &self.cookie) {
            (Sticky::Cookie, Some(cookie)) => req = req.header("cookie", cookie),
            (Sticky::Cookie, None) => {}
            (Sticky::Table, _) => req = req.header("x-user", format!("user-{}", self.n)),
        }
        let r = c.request(req.body(Full::<Bytes>::default()).unwrap()).await;
        assert_eq!(r.status, 200, "session {}: {}", self.n, r.text());
        if let Some(set) = r.headers.get_all("set-cookie").iter().find_map(|v| v.to_str().ok()?.strip_prefix("tether="))
        {
            self.cookie = Some(format!("tether={}", set.split(';').next().unwrap()));
        }
        let repinned = r
            .text()
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("tether-session-repinned: ").map(str::to_string));
        Seen { backend: r.backend(), repinned }
    }
}

/// Sessions per backend as the admin API shows them.
async fn sessions(admin: SocketAddr) -> HashMap<String, u64> {
    let v = admin_json(admin, "/api/pools/web").await;
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["name"].as_str().unwrap().to_string(), b["sessions"].as_u64().unwrap()))
        .collect()
}

/// The `repin:rebalance` verdicts `/metrics` counts, over all backends.
async fn rebalance_verdicts(admin: SocketAddr) -> u64 {
    let text = get(admin, "/metrics").await.text();
    text.lines()
        .filter(|l| l.starts_with("tether_affinity_outcomes") && l.contains("outcome=\"repin:rebalance\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Starts 40 sessions on app-1 and app-2 (20 each, round robin) and waits until the
/// housekeeping's recount agrees.
async fn forty_sessions(t: &Tether, sticky: Sticky) -> Vec<Session> {
    let mut c = Client::connect(t.addr()).await;
    let mut all = Vec::new();
    for n in 0..40 {
        let mut s = Session { n, sticky, cookie: None, home: String::new() };
        s.home = s.visit(&mut c, "/").await.backend;
        all.push(s);
    }
    let on = |home: &str| all.iter().filter(|s| s.home == home).count();
    assert_eq!((on("app-1"), on("app-2")), (20, 20));
    let admin = t.admin();
    wait_until_async("the recount finds 20 sessions on each backend", Duration::from_secs(10), || async move {
        let s = sessions(admin).await;
        s.get("app-1") == Some(&20) && s.get("app-2") == Some(&20)
    })
    .await;
    all
}

#[tokio::test]
async fn idle_sessions_and_only_idle_ones_move_to_a_new_backend_until_the_factor_holds() {
    for sticky in [Sticky::Cookie, Sticky::Table] {
        let b =
            [EchoBackend::start("app-1").await, EchoBackend::start("app-2").await, EchoBackend::start("app-3").await];
        // Idle after 1 s: the active sessions ask every 50 ms, far within it even on a
        // busy machine.
        let rebalance = "factor = 1.2\nidle = \"1s\"\nmax_per_second = 1000\n";
        let t = Tether::start(&rebalance_config(sticky, &[&b[0], &b[1]], rebalance));
        let admin = t.admin();
        let mut all = forty_sessions(&t, sticky).await;

        // Per old backend: one session holds an HTTP/1 request in flight, one an HTTP/2
        // request, one an open tunnel; four are active.
        let mut by_home: HashMap<String, Vec<usize>> = HashMap::new();
        for s in &all {
            by_home.entry(s.home.clone()).or_default().push(s.n);
        }
        let holding: Vec<usize> = by_home.values().map(|v| v[0]).collect();
        let holding_h2: Vec<usize> = by_home.values().map(|v| v[1]).collect();
        let tunneling: Vec<usize> = by_home.values().map(|v| v[2]).collect();
        let active: Vec<usize> = by_home.values().flat_map(|v| v[3..7].to_vec()).collect();
        let mut holds = Vec::new();
        for &n in &holding {
            let (mut s, addr) = (all[n].clone(), t.addr());
            holds.push(tokio::spawn(async move { s.visit(&mut Client::connect(addr).await, "/hold").await }));
        }
        for &n in &holding_h2 {
            let (s, addr) = (all[n].clone(), t.addr());
            holds.push(tokio::spawn(async move { s.visit_h2(addr, "/hold").await }));
        }
        let mut tunnels = Vec::new();
        for &n in &tunneling {
            let (stream, backend) = all[n].tunnel(t.addr()).await;
            assert_eq!(backend, all[n].home, "{sticky:?}: tunnel {n}");
            tunnels.push(stream);
        }
        wait_until("the held requests reached their backends", Duration::from_secs(10), || {
            b[0].held.load(Ordering::SeqCst) == 2 && b[1].held.load(Ordering::SeqCst) == 2
        })
        .await;
        let stop = Arc::new(AtomicBool::new(false));
        let mut loops = Vec::new();
        for &n in &active {
            let (mut s, addr, stop) = (all[n].clone(), t.addr(), stop.clone());
            loops.push(tokio::spawn(async move {
                let mut c = Client::connect(addr).await;
                let mut seen = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    seen.push(s.visit(&mut c, "/").await);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (s, seen)
            }));
        }

        let mut next = rebalance_config(sticky, &[&b[0], &b[1], &b[2]], rebalance);
        next.push('\n');
        reload(&t, &next, "config reloaded").await;
        // Idleness is time: the idle sessions' one request was well over a second ago
        // once this has passed.
        tokio::time::sleep(Duration::from_millis(1500)).await;

        // A session whose request is still in flight, or whose tunnel is open, stays,
        // however long ago it began.
        let mut c = Client::connect(t.addr()).await;
        for &n in holding.iter().chain(&holding_h2).chain(&tunneling) {
            let seen = all[n].visit(&mut c, "/").await;
            assert_eq!((seen.backend.as_str(), seen.repinned), (all[n].home.as_str(), None), "{sticky:?}: busy {n}");
        }
        // The idle ones, one request each.
        let busy: Vec<usize> = [&holding, &holding_h2, &tunneling, &active].into_iter().flatten().copied().collect();
        let mut moved = Vec::new();
        for s in all.iter_mut().filter(|s| !busy.contains(&s.n)) {
            let seen = s.visit(&mut c, "/").await;
            if seen.backend == s.home {
                assert_eq!(seen.repinned, None, "{sticky:?}: session {} stayed", s.n);
                continue;
            }
            assert_eq!(
                (seen.backend.as_str(), seen.repinned.as_deref()),
                ("app-3", Some("rebalance")),
                "{sticky:?}: session {} from {}",
                s.n,
                s.home
            );
            moved.push(s.n);
        }
        // The mean is 40/3, so 16 is the most a backend may keep at factor 1.2: four
        // move off each old backend, and no more.
        assert_eq!(moved.len(), 8, "{sticky:?}: {moved:?}");
        for home in ["app-1", "app-2"] {
            assert_eq!(moved.iter().filter(|n| all[**n].home == home).count(), 4, "{sticky:?}: {moved:?}");
        }
        // A moved session stays moved, and is told so only once.
        for &n in &moved {
            let seen = all[n].visit(&mut c, "/").await;
            assert_eq!((seen.backend.as_str(), seen.repinned), ("app-3", None), "{sticky:?}: moved {n}");
        }

        stop.store(true, Ordering::SeqCst);
        for l in loops {
            let (s, seen) = l.await.unwrap();
            assert!(seen.len() >= 10, "{sticky:?}: active {} made only {} requests", s.n, seen.len());
            for r in seen {
                assert_eq!((r.backend.as_str(), r.repinned), (s.home.as_str(), None), "{sticky:?}: active {}", s.n);
            }
        }
        drop(tunnels);
        b[0].release();
        b[1].release();
        for (h, &n) in holds.into_iter().zip(holding.iter().chain(&holding_h2)) {
            let seen = h.await.unwrap();
            assert_eq!((seen.backend.as_str(), seen.repinned), (all[n].home.as_str(), None), "{sticky:?}: held {n}");
        }

        assert_eq!(rebalance_verdicts(admin).await, 8, "{sticky:?}");
        wait_until_async("the recount finds 16, 16 and 8 sessions", Duration::from_secs(10), || async move {
            let s = sessions(admin).await;
            (s["app-1"], s["app-2"], s["app-3"]) == (16, 16, 8)
        })
        .await;
        assert!(t.log().contains("affinity: rebalance: moved a session idle for"), "{}", t.log());
        let pool = admin_json(admin, "/api/pools/web").await;
        assert_eq!(pool["rebalance"]["idle_ms"], 1000, "{pool}");
    }
}

#[tokio::test]
async fn sessions_move_no_faster_than_max_per_second() {
    let b = [EchoBackend::start("app-1").await, EchoBackend::start("app-2").await, EchoBackend::start("app-3").await];
    let rebalance = "factor = 1.2\nidle = \"300ms\"\nmax_per_second = 2\n";
    let t = Tether::start(&rebalance_config(Sticky::Cookie, &[&b[0], &b[1]], rebalance));
    let mut all = forty_sessions(&t, Sticky::Cookie).await;
    reload(&t, &rebalance_config(Sticky::Cookie, &[&b[0], &b[1], &b[2]], rebalance), "config reloaded").await;
    tokio::time::sleep(Duration::from_millis(600)).await;

    // Every session not yet moved asks again whenever it has been idle for 350 ms (a
    // request makes it active again) until eight have moved: a burst of two, then two a
    // second.
    let mut c = Client::connect(t.addr()).await;
    let start = Instant::now();
    let mut asked: Vec<Option<Instant>> = vec![None; all.len()];
    let mut moves: Vec<Duration> = Vec::new();
    while moves.len() < 8 && start.elapsed() < Duration::from_secs(30) {
        let mut any = false;
        for s in all.iter_mut().filter(|s| s.home != "app-3") {
            if asked[s.n].is_some_and(|at| at.elapsed() < Duration::from_millis(350)) {
                continue;
            }
            any = true;
            let seen = s.visit(&mut c, "/").await;
            asked[s.n] = Some(Instant::now());
            if seen.backend == "app-3" {
                moves.push(start.elapsed());
                s.home = seen.backend;
            }
        }
        if !any {
            // Waiting for sessions to be idle again is waiting for time to pass.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(moves.len(), 8, "{moves:?}");
    for (k, at) in moves.iter().enumerate() {
        // Move k (from 0) needs k + 1 tokens: two in the burst, the rest at two a second.
        let earliest = Duration::from_millis((k.saturating_sub(1) as u64) * 500);
        assert!(*at + Duration::from_millis(50) >= earliest, "move {k} at {at:?}: {moves:?}");
    }
}

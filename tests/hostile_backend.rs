//! Issue 11: what clients can do to backends through Tether, and what Tether tells clients
//! about its backends. A broken or slow upload is the client's fault and never counts
//! against a backend's health; nor do Tether's own local errors; a stale pooled connection
//! is retried under the `max_connections` slot it holds; only the pool's allowed upgrades
//! are tunnelled; and error bodies name pool and backend but never what the OS said.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// Passive checks that eject a backend after two strikes, even the only one of its pool.
const EJECT_AFTER_2: &str =
    "[pools.web.health]\ncheck = \"tcp\"\ninterval = \"1m\"\neject_after = 2\neject_time = \"1m\"\nmax_ejected = 1.0\n";

/// The admin API's view of pool `web` (asked with `Host: localhost`, which any version of
/// the admin listener answers).
async fn admin_pool(admin: SocketAddr) -> serde_json::Value {
    let req = http::Request::get("/api/pools/web").header("host", "localhost").body(Default::default()).unwrap();
    let r = Client::connect(admin).await.request(req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    serde_json::from_slice(&r.body).unwrap()
}

/// Requests in flight to backend `app-1` of pool `web`.
async fn in_flight_1(admin: SocketAddr) -> u64 {
    admin_pool(admin).await["backends"][0]["in_flight"].as_u64().unwrap()
}

/// The admin API's health of backend `name` of pool `web`: "up" or "down".
async fn health(t: &Tether, name: &str) -> String {
    let v = admin_pool(t.admin()).await;
    let b = v["backends"].as_array().unwrap().iter().find(|b| b["name"] == name).expect("backend in the pool");
    b["health"].as_str().unwrap().to_string()
}

/// Asserts the backend is still up, and that a good request still reaches it.
async fn assert_not_ejected(t: &Tether, name: &str) {
    assert_eq!(health(t, name).await, "up", "{name} was ejected:\n{}", t.log());
    assert!(!t.log().contains("backend is DOWN"), "{}", t.log());
    let r = get(t.addr(), "/status?code=200").await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Reads one HTTP/1.1 response with a `Content-Length` body from `s`.
async fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let len: usize = text[..head_end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                .unwrap_or(0);
            if buf.len() >= head_end + 4 + len {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await.expect("response in time");
        let n = n.unwrap();
        assert!(n > 0, "connection closed mid-response: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

// === 1. a malformed request body is the client's fault ===

/// Reproduction (0e0209b): `POST` with `Transfer-Encoding: chunked` and a chunk size that
/// is not hex was answered `502 backend-error` and struck the backend; two of them ejected
/// it.
#[tokio::test]
async fn malformed_chunked_body_is_a_400_and_no_strike() {
    let b = backends(1).await;
    let t = Tether::start(&(pool_of(&[("app-1", b[0].address)], "", ADMIN) + EJECT_AFTER_2));
    let mut answers = Vec::new();
    for _ in 0..3 {
        let req =
            b"POST /sleep?ms=2000 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n";
        answers.push(raw(t.addr(), req, Duration::from_secs(5)).await);
    }
    assert_not_ejected(&t, "app-1").await;
    for out in answers {
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        assert!(out.to_ascii_lowercase().contains("tether-error: bad-request-body"), "{out}");
        assert!(out.contains("pool \"web\""), "{out}");
    }
}

// === 2. clients cannot get a healthy backend ejected ===

/// Reproduction (0e0209b): uploads that break off (the client half-closes after 10 of 100
/// bytes) each counted as a backend failure; with `eject_after = 2` the backend was
/// ejected ("backend is DOWN").
#[tokio::test]
async fn aborted_uploads_do_not_eject_the_backend() {
    let b = backends(1).await;
    let t = Tether::start(&(pool_of(&[("app-1", b[0].address)], "", ADMIN) + EJECT_AFTER_2));
    let mut answers = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(t.addr()).await.unwrap();
        s.write_all(b"POST /sleep?ms=2000 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        answers.push(String::from_utf8_lossy(&out).into_owned());
    }
    // Each of them was settled (its access log line written) before health is looked at.
    t.wait_access_lines(4).await;
    assert_not_ejected(&t, "app-1").await;
    for out in answers {
        // The client half-closed: it may still read the answer, or see the connection close.
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 400"), "{out}");
    }
}

/// Reproduction (0e0209b): an upload slower than `backend_response` was a `504` and a
/// strike against the backend, which never had the whole request; two ejected it.
#[tokio::test]
async fn slow_uploads_are_a_408_and_do_not_eject_the_backend() {
    let b = backends(1).await;
    let cfg = pool_of(&[("app-1", b[0].address)], "", &format!("{ADMIN}[timeouts]\nbackend_response = \"300ms\"\n"));
    let t = Tether::start(&(cfg + EJECT_AFTER_2));
    let mut answers = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(t.addr()).await.unwrap();
        // 10 of 100 bytes, and then nothing while Tether waits.
        s.write_all(b"POST /sleep?ms=5000 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789").await.unwrap();
        answers.push(read_response(&mut s).await);
    }
    assert_not_ejected(&t, "app-1").await;
    for out in answers {
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
        assert!(out.to_ascii_lowercase().contains("tether-error: request-body-timeout"), "{out}");
    }
}

/// Reproduction (0e0209b): with Tether out of file descriptors (`prlimit` lowers its
/// `RLIMIT_NOFILE` below the descriptors it has open), every connect fails with EMFILE,
/// and each one counted against the backend; two ejected it.
#[tokio::test]
async fn local_connect_errors_do_not_eject_the_backend() {
    let b = backends(1).await;
    let t = Tether::start(&(pool_of(&[("app-1", b[0].address)], "", ADMIN) + EJECT_AFTER_2));
    let admin = t.admin();
    // The client connection is accepted before the limit; no backend connection exists yet.
    let pid = t.child.id().to_string();
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    let client_port = s.local_addr().unwrap().port();
    wait_until("tether accepted the connection", Duration::from_secs(5), || accepted(&pid, client_port)).await;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft: String = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        .unwrap();
    let prlimit = |soft: &str| {
        let ok =
            std::process::Command::new("prlimit").arg(format!("--pid={pid}")).arg(format!("--nofile={soft}:")).status();
        assert!(ok.unwrap().success(), "prlimit failed");
    };
    prlimit("1");
    let mut answers = Vec::new();
    for _ in 0..3 {
        s.write_all(b"GET /status?code=200 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        answers.push(read_response(&mut s).await);
    }
    prlimit(&soft);
    t.wait_log("Too many open files").await;
    let v = admin_pool(admin).await;
    assert_eq!(v["backends"][0]["health"], "up", "{v}\n{}", t.log());
    assert_not_ejected(&t, "app-1").await;
    for out in answers {
        assert!(out.starts_with("HTTP/1.1 502"), "{out}");
        assert!(!out.contains("os error") && !out.contains("Too many open files"), "internals shown: {out}");
    }
}

/// Whether process `pid` has accepted the connection from local port `client_port` (the
/// socket is one of its file descriptors, not just in its listener's queue).
fn accepted(pid: &str, client_port: u16) -> bool {
    let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
    let inode = tcp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let remote_port = u16::from_str_radix(f[2].rsplit(':').next()?, 16).ok()?;
        (remote_port == client_port && f[9] != "0").then(|| f[9].to_string())
    });
    let Some(inode) = inode else { return false };
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|l| l.to_string_lossy() == want)
}

// === 3. a stale pooled connection under max_connections = 1 ===

/// A backend that answers every request on a connection with `200 ok` and keeps it open,
/// until told to close all of them; it counts the connections it accepted.
struct ClosingBackend {
    address: SocketAddr,
    accepted: Arc<AtomicUsize>,
    close: watch::Sender<u32>,
    closed: mpsc::UnboundedReceiver<()>,
}

impl ClosingBackend {
    async fn start() -> ClosingBackend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (close, close_rx) = watch::channel(0u32);
        let (closed_tx, closed) = mpsc::unbounded_channel();
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let mut close_rx = close_rx.clone();
                close_rx.mark_unchanged();
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        tokio::select! {
                            _ = close_rx.changed() => break,
                            n = s.read(&mut chunk) => {
                                let Ok(n @ 1..) = n else { return };
                                buf.extend_from_slice(&chunk[..n]);
                                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                    buf.drain(..end + 4);
                                    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
                                }
                            }
                        }
                    }
                    drop(s);
                    let _ = closed_tx.send(());
                });
            }
        });
        ClosingBackend { address, accepted, close, closed }
    }

    /// Closes every open connection and waits until it is closed.
    async fn close_all(&mut self, open: usize) {
        self.close.send_modify(|n| *n += 1);
        for _ in 0..open {
            self.closed.recv().await.unwrap();
        }
    }
}

/// The state letter of a process (`T` when stopped).
fn process_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit(')').next().unwrap().trim().chars().next().unwrap()
}

/// Reproduction (0e0209b): with `max_connections = 1`, a request that found its pooled
/// connection closed kept its slot while waiting for another, so it waited out
/// `queue_timeout` and got `503 queue-timeout`. To make the connection stale for certain,
/// Tether is stopped (SIGSTOP) while the client's next request arrives and, after it, the
/// backend's FIN: resumed, Tether reads the request first and sends it on the pooled
/// connection before it sees that connection close.
#[tokio::test]
async fn stale_connection_with_max_connections_1_is_retried_under_its_slot() {
    let mut backend = ClosingBackend::start().await;
    let cfg = pool_of(&[("app-1", backend.address)], "queue_timeout = \"1s\"", ADMIN)
        .replace("\" },", "\", max_connections = 1 },");
    let t = Tether::start(&cfg);
    let admin = t.admin();
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(req).await.unwrap();
    let out = read_response(&mut s).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // The request has ended: its connection is pooled and its slot given back.
    wait_until_async(
        "the first request has ended",
        Duration::from_secs(5),
        || async move { in_flight_1(admin).await == 0 },
    )
    .await;
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 1);

    let pid = t.child.id();
    t.signal("STOP");
    wait_until("tether is stopped", Duration::from_secs(5), || process_state(pid) == 'T').await;
    s.write_all(req).await.unwrap();
    backend.close_all(1).await;
    t.signal("CONT");

    let out = read_response(&mut s).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}\n{}", t.log());
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 2, "sent again on a new connection");
}

/// A pooled backend connection on which bytes arrived that nobody asked for (a second
/// response, sent while it was idle) is never used again: the next request goes on a new
/// connection and gets its own answer, not those bytes. (The native path checks an idle
/// socket's readiness as tokio's reactor last saw it, and peeks only when it is marked.)
#[tokio::test]
async fn unasked_bytes_on_an_idle_pooled_connection_are_never_taken_as_a_response() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    // `poison` tells the first connection to send its unasked bytes; `poisoned` says they
    // have been written (on loopback: they are in Tether's receive queue).
    let (poison, poison_rx) = watch::channel(false);
    let (poisoned_tx, mut poisoned) = mpsc::unbounded_channel();
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst);
            let (mut poison_rx, poisoned_tx) = (poison_rx.clone(), poisoned_tx.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    tokio::select! {
                        _ = poison_rx.changed(), if n == 0 => {
                            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil").await.unwrap();
                            let _ = poisoned_tx.send(());
                        }
                        r = s.read(&mut chunk) => {
                            let Ok(r @ 1..) = r else { return };
                            buf.extend_from_slice(&chunk[..r]);
                            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                buf.drain(..end + 4);
                                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
                            }
                        }
                    }
                }
            });
        }
    });
    let t = Tether::start(&pool_of(&[("app-1", address)], "", ADMIN));
    let admin = t.admin();
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(req).await.unwrap();
    let out = read_response(&mut s).await;
    assert!(out.ends_with("\r\n\r\nok"), "{out}");
    wait_until_async(
        "the first request has ended",
        Duration::from_secs(5),
        || async move { in_flight_1(admin).await == 0 },
    )
    .await;

    poison.send_replace(true);
    poisoned.recv().await.unwrap();
    for _ in 0..3 {
        s.write_all(req).await.unwrap();
        let out = read_response(&mut s).await;
        assert!(out.ends_with("\r\n\r\nok"), "got the unasked bytes: {out}\n{}", t.log());
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "the poisoned connection was dropped, one new one opened");
}

// === 4. only the pool's upgrades are tunnelled ===

/// Reproduction (0e0209b): `Connection: Upgrade` with `Upgrade: foo/1, h2c` went to the
/// backend as an upgrade (its `Upgrade` and `Connection: upgrade` intact) although the
/// pool allows only `websocket`.
#[tokio::test]
async fn upgrade_the_pool_does_not_allow_is_forwarded_as_a_plain_request() {
    let b = backends(1).await;
    let req = b"GET /headers HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: foo/1, h2c\r\n\r\n";

    let t = Tether::start(&pool_of(&[("app-1", b[0].address)], "", ""));
    let out = raw(t.addr(), req, Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let seen = out.to_ascii_lowercase();
    assert!(!seen.contains("\nupgrade:"), "the backend saw an upgrade header:\n{out}");
    assert!(!seen.contains("\nconnection: upgrade"), "the backend saw an upgrade header:\n{out}");
    drop(t);

    // Allowed, the upgrade goes through, offering the backend only what the pool allows.
    let t = Tether::start(&pool_of(&[("app-1", b[0].address)], "upgrades = [\"foo\"]", ""));
    let out = raw(t.addr(), req, Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let seen = out.to_ascii_lowercase();
    assert!(seen.contains("\nupgrade: foo/1\n"), "{out}");
    assert!(seen.contains("\nconnection: upgrade\n"), "{out}");
}

// === 5. error bodies reveal no internals ===

/// Reproduction (0e0209b): the body of a refused connect said "connect failed: Connection
/// refused (os error 111)", and that of a backend that hung up carried hyper's cause chain
/// ("connection closed before message completed").
#[tokio::test]
async fn error_bodies_name_pool_and_backend_but_no_os_or_hyper_error() {
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let rude = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rude_addr = rude.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = rude.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
        }
    });
    let t = Tether::start(&pool_of(&[("gone", gone)], "", ""));
    let r = get(t.addr(), "/").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.text(), "502 Bad Gateway: pool \"web\": could not connect to backend \"gone\"\n");
    // The detail is in the log.
    t.wait_log("Connection refused").await;
    drop(t);

    let t = Tether::start(&pool_of(&[("rude", rude_addr)], "", ""));
    let r = get(t.addr(), "/").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.text(), "502 Bad Gateway: pool \"web\": backend \"rude\" failed before responding\n");
    t.wait_log("backend failed: ").await;
}

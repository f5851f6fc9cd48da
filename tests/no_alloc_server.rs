//! A keep-alive HTTP/1 request whose session is found by Tether's cookie allocates nothing
//! in the balancer: the real server runs in this process on a thread of its own (one
//! current-thread runtime, as `threads = 1` runs it) in front of a real demo backend on
//! another thread, and a plain blocking client on the test's thread sends thousands of
//! requests over one connection. The counting allocator counts per thread, so only the
//! server thread's allocations are read: by a task spawned onto its runtime.
//!
//! The control runs the same load with the access log on, whose line is a `String` made on
//! the server thread per request: there the counter must see at least one allocation per
//! request, which proves it counts the server thread's allocations at all.

#[path = "support/alloc.rs"]
mod alloc;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;

use tether::demo::DemoBackend;
use tether::server::Server;

/// Requests measured per run, after the warm-up.
const REQUESTS: u64 = 5000;
/// Requests sent before counting: buffers, pooled heads, the token cache and the backend
/// connection pool fill up on the first few.
const WARM_UP: u64 = 200;

/// A running balancer on its own thread, and a way to read that thread's allocations.
struct InProcess {
    addrs: Vec<SocketAddr>,
    runtime: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    fn start(config: &str) -> InProcess {
        let config = tether::config::parse(config, "test.toml").expect("config");
        let (tx, rx) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let handle = rt.handle().clone();
            rt.block_on(async move {
                let server = Server::start(config, None, vec![tokio::runtime::Handle::current()]).await.expect("start");
                let addrs = server.addresses.iter().map(|(_, a)| *a).collect();
                tx.send((addrs, handle)).unwrap();
                let _ = stopped.await;
                server.control.shutdown().await;
            });
        });
        let (addrs, runtime) = rx.recv().expect("server started");
        InProcess { addrs, runtime, stop: Some(stop), thread: Some(thread) }
    }

    /// The server thread's allocations so far, read on that thread. The channel's one slot
    /// is allocated here, so sending the count allocates nothing over there.
    fn allocations(&self) -> u64 {
        let (tx, rx) = mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let _ = tx.send(alloc::allocations());
        });
        rx.recv().unwrap()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A demo backend on a runtime of its own thread (its allocations are not the server's).
fn backend() -> SocketAddr {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let b = DemoBackend::start("a", "127.0.0.1:0".parse().unwrap()).await.unwrap();
            tx.send(b.address).unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv().unwrap()
}

/// `log`: the access log's section (`format = "off"` for none).
fn config(backend: SocketAddr, log: &str) -> String {
    format!(
        "[access_log]\n{log}\n\n\
         [[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\npool = \"web\"\n\n\
         [pools.web]\nbackends = [{{ name = \"a\", address = \"{backend}\" }}]\n\n\
         [pools.web.affinity]\nkeys = [\"cookie\"]\n\n\
         [pools.web.affinity.cookie]\nkeys = [\"YmVuY2gta2V5LWJlbmNoLWtleS1iZW5jaC1rZXktMzI=\"]\n"
    )
}

/// A blocking keep-alive client that reads each response by its Content-Length.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        Client { stream, buf: Vec::with_capacity(64 * 1024) }
    }

    /// Sends `request` and returns the response's head.
    fn exchange(&mut self, request: &[u8]) -> String {
        self.stream.write_all(request).unwrap();
        self.buf.clear();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().unwrap())
                    })
                    .expect("the demo backend's responses have a Content-Length");
                while self.buf.len() < end + 4 + length {
                    let n = self.stream.read(&mut chunk).unwrap();
                    assert!(n > 0, "connection closed mid-body");
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                assert_eq!(self.buf.len(), end + 4 + length, "no bytes beyond the response");
                return head;
            }
            let n = self.stream.read(&mut chunk).unwrap();
            assert!(n > 0, "connection closed before a response: {:?}", String::from_utf8_lossy(&self.buf));
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The server thread's allocations over `REQUESTS` keep-alive cookie hits, with the
/// access log section `log`, after a warm-up.
fn allocations_per_run(log: &str) -> u64 {
    let tether = InProcess::start(&config(backend(), log));
    let mut client = Client::connect(tether.addrs[0]);
    let first = client.exchange(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n");
    let cookie = first
        .lines()
        .filter_map(|l| l.strip_prefix("set-cookie: ").or_else(|| l.strip_prefix("Set-Cookie: ")))
        .find(|c| c.starts_with("tether="))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("a new session gets Tether's cookie: {first}"))
        .to_string();
    let request = format!("GET /cart HTTP/1.1\r\nHost: shop\r\nUser-Agent: test\r\nCookie: {cookie}\r\n\r\n");
    let request = request.as_bytes();
    let hit = |head: &str| {
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(!head.to_ascii_lowercase().contains("set-cookie: tether"), "a hit sets no cookie: {head}");
    };
    for _ in 0..WARM_UP {
        hit(&client.exchange(request));
    }
    let before = tether.allocations();
    for _ in 0..REQUESTS {
        hit(&client.exchange(request));
    }
    tether.allocations() - before
}

#[test]
fn a_keep_alive_cookie_hit_allocates_nothing_on_the_native_path() {
    let n = allocations_per_run("format = \"off\"");
    // Not one per request (it measures 0): the margin is for the once-a-second housekeeping,
    // which runs on the same thread while the requests flow.
    assert!(n < REQUESTS / 100, "{n} allocations in {REQUESTS} requests on the native path");
    eprintln!("native path: {n} allocations in {REQUESTS} keep-alive cookie hits");
}

#[test]
fn control_the_counter_sees_the_server_threads_allocations() {
    let dir = std::env::temp_dir().join(format!("tether-no-alloc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let n = allocations_per_run(&format!("format = \"json\"\npath = \"{}\"", log.display()));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(n >= REQUESTS, "an access log line is a String per request, yet the counter saw only {n} in {REQUESTS}");
    eprintln!("with the access log: {n} allocations in {REQUESTS} keep-alive cookie hits");
}

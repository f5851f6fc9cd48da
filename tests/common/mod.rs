//! What the integration tests share: the real `tether` binary started on loopback, real
//! backend servers, and a small HTTP client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub use tether::demo::DemoBackend;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A scratch directory for one test, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "tether-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `tether run` process.
pub struct Tether {
    pub child: Child,
    /// Listener addresses in config order.
    pub addrs: Vec<SocketAddr>,
    pub log: Arc<Mutex<String>>,
    pub stdout: Arc<Mutex<String>>,
    pub config: PathBuf,
    pub scratch: Scratch,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tether")
}

impl Tether {
    /// Starts Tether with `config` and waits until all its listeners are bound.
    pub fn start(config: &str) -> Tether {
        Tether::start_with(config, &[])
    }

    pub fn start_with(config: &str, args: &[&str]) -> Tether {
        let scratch = Scratch::new();
        let path = scratch.write("tether.toml", config);
        let listeners = config.matches("[[listeners]]").count();
        let mut child = Command::new(bin())
            .arg("run")
            .arg("-c")
            .arg(&path)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tether");
        let log = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            let err = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    if line.contains("admin listening on") {
                        // The admin listener is not one of the traffic listeners.
                    } else if let Some(rest) = line.split("listening on ").nth(1) {
                        let addr: SocketAddr = rest.split_whitespace().next().unwrap().parse().unwrap();
                        let _ = tx.send(addr);
                    }
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        {
            let stdout = stdout.clone();
            let out = child.stdout.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let mut l = stdout.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let mut addrs = Vec::new();
        while addrs.len() < listeners {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(a) => addrs.push(a),
                Err(_) => {
                    let _ = child.kill();
                    panic!("tether did not start:\n{}", log.lock().unwrap());
                }
            }
        }
        Tether { child, addrs, log, stdout, config: path, scratch }
    }

    /// The admin listener's address, from the log.
    pub fn admin(&self) -> SocketAddr {
        let found = || {
            self.log()
                .lines()
                .find_map(|l| l.split("admin listening on ").nth(1)?.split_whitespace().next()?.parse().ok())
        };
        if !poll_until_blocking(Duration::from_secs(5), || found().is_some()) {
            panic!("no admin listener in the log:\n{}", self.log());
        }
        found().unwrap()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit, or panics after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let mut status = None;
        if !poll_until_blocking(limit, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        }) {
            panic!("tether did not exit within {limit:?}:\n{}", self.log());
        }
        status.unwrap()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str) {
        if !poll_until(Duration::from_secs(10), || self.log().contains(needle)).await {
            panic!("log never said {needle:?}:\n{}", self.log());
        }
    }

    /// Waits until the log contains `needle` `n` times or more.
    pub async fn wait_log_count(&self, needle: &str, n: usize) {
        if !poll_until(Duration::from_secs(10), || self.log().matches(needle).count() >= n).await {
            panic!("log never said {needle:?} {n} times:\n{}", self.log());
        }
    }

    /// Waits until at least `n` access log lines have been written, and returns them all.
    pub async fn wait_access_lines(&self, n: usize) -> Vec<String> {
        if !poll_until(Duration::from_secs(10), || self.access_lines().len() >= n).await {
            panic!("wanted {n} access log lines, got {:?}", self.access_lines());
        }
        self.access_lines()
    }

    /// The access log lines written to standard output so far.
    pub fn access_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().lines().map(str::to_string).collect()
    }

    /// Resident set size of the process, in KiB, and its peak.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap()
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Tether {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `n` demo backends named `app-1`..`app-n` on free loopback ports.
pub async fn backends(n: usize) -> Vec<DemoBackend> {
    let mut v = Vec::new();
    for i in 1..=n {
        v.push(DemoBackend::start(&format!("app-{i}"), "127.0.0.1:0".parse().unwrap()).await.unwrap());
    }
    v
}

/// A config with one listener on a free port in front of one pool `web`.
pub fn config(algorithm: &str, backends: &[&DemoBackend], weights: &[u32], extra: &str) -> String {
    let mut s = format!("{extra}\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\npool = \"web\"\n\n[pools.web]\nalgorithm = \"{algorithm}\"\nbackends = [\n");
    for (i, b) in backends.iter().enumerate() {
        let w = weights.get(i).copied().unwrap_or(1);
        s.push_str(&format!("  {{ name = \"{}\", address = \"{}\", weight = {w} }},\n", b.name, b.address));
    }
    s.push_str("]\n");
    s
}

/// A response read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn backend(&self) -> String {
        self.headers.get("x-backend").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
    }
}

/// One HTTP/1.1 keep-alive connection.
pub struct Client {
    sender: http1::SendRequest<Full<Bytes>>,
    pub addr: SocketAddr,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        Client { sender, addr }
    }

    pub async fn get(&mut self, path: &str) -> Resp {
        self.request(Request::get(path).header("host", self.addr.to_string()).body(Full::default()).unwrap()).await
    }

    pub async fn request(&mut self, req: Request<Full<Bytes>>) -> Resp {
        self.try_request(req).await.expect("request failed")
    }

    pub async fn try_request(&mut self, req: Request<Full<Bytes>>) -> Result<Resp, hyper::Error> {
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Resp { status: parts.status, headers: parts.headers, body })
    }
}

/// One GET on a new connection.
pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    Client::connect(addr).await.get(path).await
}

/// Sends raw bytes on a new connection and reads until the peer closes or `limit` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A demo backend in its own process, so a test can SIGKILL it.
pub struct BackendProcess {
    pub name: String,
    pub address: SocketAddr,
    child: Child,
}

impl BackendProcess {
    pub fn start(name: &str) -> BackendProcess {
        let mut child = Command::new(bin())
            .args(["backend", "--name", name])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = BufReader::new(child.stderr.take().unwrap());
        let address = err
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.split("listening on ").nth(1)?.split_whitespace().next()?.parse().ok())
            .expect("backend said where it listens");
        BackendProcess { name: name.to_string(), address, child }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A config with one listener in front of pool `web` of the given backends.
pub fn pool_of(backends: &[(&str, SocketAddr)], pool_extra: &str, extra: &str) -> String {
    let mut s = format!("{extra}\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\npool = \"web\"\n\n[pools.web]\n{pool_extra}\nbackends = [\n");
    for (name, addr) in backends {
        s.push_str(&format!("  {{ name = \"{name}\", address = \"{addr}\" }},\n"));
    }
    s.push_str("]\n");
    s
}

/// Rewrites the config file and reloads with SIGHUP, waiting for the log to say so.
pub async fn reload(t: &Tether, config: &str, expect: &str) {
    let before = t.log().matches(expect).count();
    std::fs::write(&t.config, config).unwrap();
    t.signal("HUP");
    if !poll_until(Duration::from_secs(5), || t.log().matches(expect).count() > before).await {
        panic!("reload did not log {expect:?}:\n{}", t.log());
    }
}

/// How often the waits below look at their condition.
const POLL: Duration = Duration::from_millis(10);

/// Looks at `condition` every 10 ms until it holds (true) or `timeout` passes (false).
pub async fn poll_until<F: FnMut() -> bool>(timeout: Duration, mut condition: F) -> bool {
    poll_until_async(timeout, || std::future::ready(condition())).await
}

/// [`poll_until`] for a condition that has to await something, such as an HTTP request.
pub async fn poll_until_async<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if condition().await {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `condition` holds, looking every 10 ms; panics naming `what` if it still
/// does not after `timeout`. Tests wait for what they need to see, never for a fixed time.
pub async fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, condition: F) {
    if !poll_until(timeout, condition).await {
        panic!("waited {timeout:?} in vain until {what}");
    }
}

/// [`wait_until`] for a condition that has to await something, such as an HTTP request.
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    if !poll_until_async(timeout, condition).await {
        panic!("waited {timeout:?} in vain until {what}");
    }
}

/// [`poll_until`] for code that is not async (it blocks the thread between looks).
pub fn poll_until_blocking<F: FnMut() -> bool>(timeout: Duration, mut condition: F) -> bool {
    let start = Instant::now();
    loop {
        if condition() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// An admin listener on a free loopback port, to put in a config's top-level `extra`.
pub const ADMIN: &str = "[admin]\nbind = \"127.0.0.1:0\"\n";

/// A GET on the admin API, as JSON.
pub async fn admin_json(admin: SocketAddr, path: &str) -> serde_json::Value {
    let r = get(admin, path).await;
    assert_eq!(r.status, 200, "GET {path} on the admin listener: {}", r.text());
    serde_json::from_slice(&r.body).unwrap()
}

/// Requests in flight to `backend` of `pool`, as Tether counts them (the admin API's
/// `in_flight`: charged when the request is given to the backend, until it ends).
pub async fn in_flight(admin: SocketAddr, pool: &str, backend: &str) -> u64 {
    let v = admin_json(admin, &format!("/api/pools/{pool}")).await;
    let b = v["backends"].as_array().unwrap().iter().find(|b| b["name"] == backend).expect("backend in the pool");
    b["in_flight"].as_u64().unwrap()
}

/// Requests in flight to all backends of `pool` together.
pub async fn pool_in_flight(admin: SocketAddr, pool: &str) -> u64 {
    let v = admin_json(admin, &format!("/api/pools/{pool}")).await;
    v["backends"].as_array().unwrap().iter().map(|b| b["in_flight"].as_u64().unwrap()).sum()
}

/// Waits until Tether has `n` (or more) requests in flight to `backend` of `pool`.
pub async fn wait_in_flight(admin: SocketAddr, pool: &str, backend: &str, n: u64) {
    let what = format!("{n} requests are in flight to {pool}/{backend}");
    wait_until_async(&what, Duration::from_secs(10), || async move { in_flight(admin, pool, backend).await >= n })
        .await;
}

/// A WebSocket server on a free loopback port that answers every text message with
/// `echo: ` and the message.
pub async fn websocket_backend() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else { return };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() {
                        let reply = format!("echo: {}", m.to_text().unwrap());
                        if ws.send(tokio_tungstenite::tungstenite::Message::text(reply)).await.is_err() {
                            return;
                        }
                    } else if m.is_close() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// The request headers the demo backend's `/headers` reports, as (name, value).
pub fn header_lines(text: &str) -> Vec<(String, String)> {
    text.lines().skip(2).filter_map(|l| l.split_once(": ")).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The values of header `name` in a `/headers` report.
pub fn values(text: &str, name: &str) -> Vec<String> {
    header_lines(text).into_iter().filter(|(k, _)| k == name).map(|(_, v)| v).collect()
}

/// What a [`RecordingBackend`] saw on one connection.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    /// Every byte received, as received.
    pub bytes: Vec<u8>,
    /// The requests it read whole, in order.
    pub requests: Vec<RecordedRequest>,
    /// Why it stopped reading: what was not strictly HTTP/1.1 (it then closed the
    /// connection without answering).
    pub malformed: Option<String>,
    /// The connection has ended (either side closed it).
    pub closed: bool,
}

/// One request a [`RecordingBackend`] read whole.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The request line and header lines, without the final empty line.
    pub head: String,
    /// The body, de-chunked when it came chunked.
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The values of header `name` (any case), in order.
    pub fn header(&self, name: &str) -> Vec<String> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    /// The request line.
    pub fn line(&self) -> &str {
        self.head.split("\r\n").next().unwrap_or("")
    }
}

/// A strict HTTP/1.1 server on a raw socket that records the exact bytes it receives per
/// connection and answers every request it reads whole with the same raw `answer`. It
/// accepts only what RFC 9112 allows a proxy to send (CRLF line ends, token methods and
/// header names, no control characters, one `Host`, at most one valid `Content-Length`,
/// `Transfer-Encoding` exactly `chunked` and never with `Content-Length`, a well-formed
/// chunked body); anything else is recorded as `malformed` and the connection closed.
pub struct RecordingBackend {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<Mutex<Recorded>>>>>,
}

impl RecordingBackend {
    /// Answers each request with `answer` and keeps the connection open.
    pub async fn start(answer: &[u8]) -> RecordingBackend {
        RecordingBackend::start_with(answer, false).await
    }

    /// Answers each request with `answer`, then closes the connection when `close`.
    pub async fn start_with(answer: &[u8], close: bool) -> RecordingBackend {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<Arc<Mutex<Recorded>>>>> = Arc::default();
        let answer: Arc<[u8]> = answer.into();
        let all = conns.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else { return };
                let rec = Arc::new(Mutex::new(Recorded::default()));
                all.lock().unwrap().push(rec.clone());
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    let mut buf = vec![0u8; 16 * 1024];
                    'conn: loop {
                        loop {
                            match strict_request(&pending) {
                                Ok(Some((req, used))) => {
                                    pending.drain(..used);
                                    rec.lock().unwrap().requests.push(req);
                                    if s.write_all(&answer).await.is_err() || close {
                                        break 'conn;
                                    }
                                }
                                Ok(None) => break,
                                Err(why) => {
                                    rec.lock().unwrap().malformed = Some(why);
                                    break 'conn;
                                }
                            }
                        }
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                rec.lock().unwrap().bytes.extend_from_slice(&buf[..n]);
                                pending.extend_from_slice(&buf[..n]);
                            }
                        }
                    }
                    drop(s);
                    rec.lock().unwrap().closed = true;
                });
            }
        });
        RecordingBackend { addr, conns }
    }

    /// What each connection so far saw, in the order they were accepted.
    pub fn connections(&self) -> Vec<Recorded> {
        self.conns.lock().unwrap().iter().map(|c| c.lock().unwrap().clone()).collect()
    }

    /// Every request read whole, over all connections.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.connections().into_iter().flat_map(|c| c.requests).collect()
    }

    /// Waits until every connection so far has ended.
    pub async fn wait_all_closed(&self) {
        wait_until("every backend connection is closed", Duration::from_secs(10), || {
            self.connections().iter().all(|c| c.closed)
        })
        .await;
    }
}

/// One strictly valid request at the start of `b`: `Ok(None)` while it is incomplete, with
/// the bytes it took.
fn strict_request(b: &[u8]) -> Result<Option<(RecordedRequest, usize)>, String> {
    let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") else {
        return match b.iter().position(|&c| c == b'\n') {
            Some(i) if i == 0 || b[i - 1] != b'\r' => Err("bare LF in the head".into()),
            _ => Ok(None),
        };
    };
    let head = &b[..end];
    if let Some(c) = head.iter().find(|&&c| (c < 0x20 && c != b'\r' && c != b'\n' && c != b'\t') || c == 0x7f) {
        return Err(format!("control character {c:#04x} in the head"));
    }
    let head = std::str::from_utf8(head).map_err(|_| "head is not UTF-8".to_string())?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("");
    let parts: Vec<&str> = line.split(' ').collect();
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if parts.len() != 3 || parts[0].is_empty() || !parts[0].chars().all(tchar) || parts[2] != "HTTP/1.1" {
        return Err(format!("bad request line {line:?}"));
    }
    if !(parts[1].starts_with('/') || (parts[0] == "OPTIONS" && parts[1] == "*")) || parts[1].contains(['\t', '#']) {
        return Err(format!("a proxy sends origin-form targets, not {:?}", parts[1]));
    }
    let (mut hosts, mut lengths, mut codings) = (0, Vec::new(), Vec::new());
    for l in lines {
        if l.contains('\n') || l.contains('\r') {
            return Err(format!("bare CR or LF in {l:?}"));
        }
        let Some((name, value)) = l.split_once(':') else { return Err(format!("header line without colon {l:?}")) };
        if name.is_empty() || !name.chars().all(tchar) {
            return Err(format!("bad header name {name:?}"));
        }
        let value = value.trim_matches([' ', '\t']);
        match name.to_ascii_lowercase().as_str() {
            "host" => hosts += 1,
            "content-length" => lengths.push(value.to_string()),
            "transfer-encoding" => codings.push(value.to_string()),
            _ => {}
        }
    }
    if hosts != 1 {
        return Err(format!("{hosts} Host headers"));
    }
    let start = end + 4;
    let (body, used) = match (&lengths[..], &codings[..]) {
        ([], []) => (Vec::new(), start),
        ([n], []) => {
            if n.is_empty() || !n.bytes().all(|c| c.is_ascii_digit()) || n.len() > 15 {
                return Err(format!("bad Content-Length {n:?}"));
            }
            let n: usize = n.parse().unwrap();
            if b.len() < start + n {
                return Ok(None);
            }
            (b[start..start + n].to_vec(), start + n)
        }
        ([], [te]) if te == "chunked" => match strict_chunked(&b[start..])? {
            Some((body, used)) => (body, start + used),
            None => return Ok(None),
        },
        _ => return Err(format!("framing Content-Length {lengths:?}, Transfer-Encoding {codings:?}")),
    };
    Ok(Some((RecordedRequest { head: head.to_string(), body }, used)))
}

/// A strictly valid chunked body (extensions allowed, trailers allowed) at the start of
/// `b`, de-chunked, with the bytes it took; `Ok(None)` while incomplete.
fn strict_chunked(b: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(eol) = b[at..].windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
        let line = std::str::from_utf8(&b[at..at + eol]).map_err(|_| "chunk line is not UTF-8".to_string())?;
        let size = line.split(';').next().unwrap_or("");
        if size.is_empty() || size.len() > 15 || !size.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("bad chunk size line {line:?}"));
        }
        let size = usize::from_str_radix(size, 16).unwrap();
        at += eol + 2;
        if size == 0 {
            // Trailer fields, then the empty line.
            loop {
                let Some(eol) = b[at..].windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
                let line = &b[at..at + eol];
                at += eol + 2;
                if line.is_empty() {
                    return Ok(Some((body, at)));
                }
                if !line.contains(&b':') {
                    return Err(format!("bad trailer line {:?}", String::from_utf8_lossy(line)));
                }
            }
        }
        if b.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&b[at..at + size]);
        if &b[at + size..at + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        at += size + 2;
    }
}

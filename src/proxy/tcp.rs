//! Layer 4: a `tcp` listener's connections, forwarded whole to a backend of a pool, and
//! the relay that carries bytes both ways (also what a WebSocket tunnel runs on after its
//! `101`).
//!
//! A connection's steps:
//! 1. `route`: on a listener with `sni_routes`, the client's first bytes are read (within
//!    `request_header`) until they hold a whole TLS ClientHello, whose server name picks
//!    the pool (`tls::client_hello`; TLS is not terminated, the bytes go on to the backend
//!    as they came). Anything else (no ClientHello in time, another protocol, no name)
//!    goes to the listener's default pool. Without `sni_routes` nothing is read first, so
//!    protocols where the server speaks first (SMTP, MySQL) work.
//! 2. `decide`: with affinity, the pool's key chain, of which a TCP connection carries only
//!    the client IP (config refuses other keys on a pool behind a tcp listener); without,
//!    the pool's algorithm.
//! 3. `connect`: a `max_connections` slot (held for the connection's life), then a connect
//!    within `timeouts.connect` (with the pool's PROXY protocol header first, if it sends
//!    one); a failed connect counts against the backend's passive health and moves the
//!    connection (and its session) to another backend, within the pool's `retries` and
//!    retry budget.
//! 4. `relay`: bytes both ways; a side that ends its sending (FIN) has it passed on while
//!    the other direction goes on; the connection closes when both directions have ended,
//!    when either side fails, when nothing moves either way for the idle timeout, or when
//!    the backend's drain is over (`drain_timeout`: see `Backend::cut`).
//! 5. One access-log line when it ends: method `TCP`, the server name as the target (`-`
//!    without one), status 200 once a backend took it (502 when none could be reached, 503
//!    when there was none to try), bytes each way, duration.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use super::native::buffers::Buf;
use super::native::io::ClientIo;
use crate::access_log::Record;
use crate::affinity::keys::RequestKeys;
use crate::affinity::{Decision, Target};
use crate::backend::health::passive_failure;
use crate::backend::Backend;
use crate::config::TcpListener;
use crate::pool::{NoSlot, Pool};
use crate::state::{ConnPermit, Shared};
use crate::tls::client_hello::{self, Hello};
use crate::upstream::BackendConn;

/// A connection accepted on a `tcp` listener.
pub struct TcpConn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// The address the client connected to, for PROXY protocol headers to backends.
    pub local: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    pub listener: Arc<str>,
    /// Held for the connection's life: shutdown waits for it (up to `shutdown_grace`).
    pub _shutdown: watch::Receiver<bool>,
    /// The connection's place under `[limits]`.
    pub _permit: ConnPermit,
}

/// What the access log says of a connection.
struct Line {
    start_millis: u64,
    started: Instant,
    server_name: Option<String>,
    pool: Option<Arc<str>>,
    backend: Option<Arc<Backend>>,
    verdict: crate::affinity::verdict::Verdict,
    session: Option<u64>,
    status: u16,
    error: Option<&'static str>,
    connected: Option<Duration>,
    up: u64,
    down: u64,
}

/// Serves one connection of a `tcp` listener until it closes.
pub async fn serve(mut conn: TcpConn, tcp: TcpListener) {
    let mut line = Line {
        start_millis: crate::time::unix_millis(),
        started: Instant::now(),
        server_name: None,
        pool: None,
        backend: None,
        verdict: crate::affinity::verdict::Verdict::Off,
        session: None,
        status: 0,
        error: None,
        connected: None,
        up: 0,
        down: 0,
    };
    let mut early = Buf::take();
    forward(&mut conn, &tcp, &mut early, &mut line).await;
    if let Some(b) = &line.backend {
        b.release();
        b.count(line.verdict);
    }
    let shared = &conn.shared;
    if shared.access_log.enabled() {
        shared.access_log.write(&Record {
            start_millis: line.start_millis,
            client: conn.peer,
            listener: &conn.listener,
            method: "TCP",
            uri: line.server_name.as_deref().unwrap_or("-"),
            version: "-",
            status: line.status,
            pool: line.pool.as_deref(),
            backend: line.backend.as_ref().map(|b| b.name.as_str()),
            upstream: line.connected,
            total: line.started.elapsed(),
            bytes_in: line.up,
            bytes_out: line.down,
            error: line.error,
            affinity: line.verdict.as_str(),
            session: line.session,
        });
    }
}

/// Routes, decides, connects and relays; what happened is left in `line`.
async fn forward(conn: &mut TcpConn, tcp: &TcpListener, early: &mut Buf, line: &mut Line) {
    let timeouts = conn.shared.snapshot.load().config.timeouts;
    if !tcp.sni.is_empty() {
        line.server_name = match server_name(&mut conn.stream, early, timeouts.request_header).await {
            Ok(name) => name,
            Err(e) => {
                line.error = Some(e);
                return;
            }
        };
    }
    // The snapshot is held only until the backend is chosen and connected: a long
    // connection keeps its backend (an `Arc`), not a whole old config.
    let snap = conn.shared.snapshot.load_full();
    let Some(pool) = tcp.route(line.server_name.as_deref()).and_then(|p| snap.pools.get(p)) else {
        line.status = 503;
        line.error = Some("no-route");
        return;
    };
    line.pool = Some(pool.name.clone());
    let ip = crate::net::canonical(conn.peer.ip());
    let now_ms = crate::time::unix_millis();
    let mut decision = match &pool.affinity {
        Some(a) => a.decide(&pool.group(), &NoKeys, ip, now_ms),
        None => Decision::plain(pool.group().pick(None)),
    };
    line.verdict = decision.verdict;
    line.session = conn.shared.access_log.pseudonym(decision.identity());
    // The connection is its session's request in flight until it closes.
    let _active = pool.affinity.as_ref().and_then(|a| a.begin(&decision, now_ms));
    pool.note_session(&decision);
    let mut index = match decision.target {
        Target::Use(i) => i,
        Target::Strict(_) => {
            line.status = 503;
            line.error = Some("session-unavailable");
            return;
        }
        Target::NoBackend => {
            line.status = 503;
            line.error = Some("no-backend");
            return;
        }
    };
    pool.retry_budget.deposit(pool.config.retry_budget);
    let mut moves_left = pool.config.retries.max(1);
    let connect_started = Instant::now();
    let (backend_stream, _slot) = loop {
        let backend = pool.backends[index].clone();
        charge(line, &backend);
        let slot = match pool.slot(index).await {
            Ok(slot) => slot,
            Err(e) => {
                line.status = 503;
                line.error = Some(match e {
                    NoSlot::QueueFull => "queue-full",
                    NoSlot::QueueTimeout => "queue-timeout",
                });
                return;
            }
        };
        let header = super::proxy_header(pool, conn.peer, conn.local);
        match pool.upstreams[index].connect(header.as_ref().map(|h| h.as_bytes())).await {
            Ok(s) => {
                backend.passive_success();
                break (s, slot);
            }
            Err(error) => {
                tracing::warn!(pool = %pool.name, backend = %backend.name, address = %backend.address_text, "{error}");
                if error.is_backend_fault() {
                    passive_failure(&pool.backends, index, pool.config.health.as_ref(), &error.to_string());
                }
                match moves_left.checked_sub(1).and_then(|left| Some((left, move_from(pool, index, &mut decision)?))) {
                    Some((left, next)) => {
                        moves_left = left;
                        index = next;
                        line.verdict = decision.verdict;
                    }
                    None => {
                        line.status = 502;
                        line.error = Some("connect-failed");
                        return;
                    }
                }
            }
        }
    };
    line.connected = Some(connect_started.elapsed());
    line.status = 200;
    let Some(backend) = line.backend.clone() else { return };
    let idle = tcp.idle_timeout.unwrap_or(timeouts.tunnel_idle);
    drop(snap);
    let mut backend_stream = backend_stream;
    let relayed = relay(&mut conn.stream, &mut backend_stream, early.filled(), idle, &backend.cut).await;
    line.up = relayed.up;
    line.down = relayed.down;
    line.error = relayed.end.label();
}

fn move_from(pool: &Pool, from: usize, decision: &mut Decision) -> Option<usize> {
    pool.move_from(from, decision, crate::time::unix_millis())
}

/// Charges the connection to `backend` (its in-flight count is up until the end),
/// releasing the one tried before.
fn charge(line: &mut Line, backend: &Arc<Backend>) {
    if line.backend.as_ref().is_some_and(|b| Arc::ptr_eq(b, backend)) {
        return;
    }
    if let Some(old) = line.backend.replace(backend.clone()) {
        old.release();
    }
    backend.acquire();
}

/// Reads the client's first bytes into `early` until they are a whole TLS ClientHello
/// (its server name), plainly not one, or `limit` passes (no name either way).
async fn server_name(stream: &mut TcpStream, early: &mut Buf, limit: Duration) -> Result<Option<String>, &'static str> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match client_hello::read(early.filled()) {
            Hello::Whole { server_name } => return Ok(server_name),
            Hello::NotTls => return Ok(None),
            Hello::Partial if early.spare().is_empty() => return Ok(None),
            Hello::Partial => {}
        }
        match tokio::time::timeout_at(deadline, stream.read(early.spare())).await {
            Err(_) => return Ok(None),
            Ok(Ok(0)) => return Err("client-closed"),
            Ok(Ok(n)) => early.end += n,
            Ok(Err(_)) => return Err("client-failed"),
        }
    }
}

/// A TCP connection carries no cookie, header, path or query: only the client IP, which
/// `decide` takes beside the request.
struct NoKeys;

impl RequestKeys for NoKeys {
    fn cookie(&self, _: &str) -> Option<&str> {
        None
    }
    fn header(&self, _: &str) -> Option<&[u8]> {
        None
    }
    fn path(&self) -> &str {
        "/"
    }
    fn query(&self) -> Option<&str> {
        None
    }
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides ended their sending.
    Closed,
    /// A read or write failed (a reset, most often) on the client's side.
    ClientFailed,
    /// A read or write failed on the backend's side.
    BackendFailed,
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// The backend's drain ended (`drain_timeout`) while the connection was open.
    Drained,
}

impl End {
    /// The access log's `error` label; `None` for a connection that ended normally.
    pub fn label(self) -> Option<&'static str> {
        match self {
            End::Closed => None,
            End::ClientFailed => Some("client-failed"),
            End::BackendFailed => Some("backend-failed"),
            End::Idle => Some("idle-timeout"),
            End::Drained => Some("drained"),
        }
    }
}

/// What a relay carried, and how it ended.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes from the client to the backend (`early` included).
    pub up: u64,
    /// Bytes from the backend to the client.
    pub down: u64,
    pub end: End,
}

/// Carries bytes both ways between `client` and `backend` until both have ended their
/// sending (each end passed on to the other side as it happens), either fails, nothing
/// moves either way for `idle`, or `cut` is notified. `early` (bytes the client sent
/// before the relay began) goes to the backend first.
pub async fn relay<C: ClientIo>(
    client: &mut C,
    backend: &mut BackendConn,
    early: &[u8],
    idle: Duration,
    cut: &Notify,
) -> Relayed {
    // Registered before anything else, so a cut notified from here on is not missed.
    let cut = cut.notified();
    let mut cut = std::pin::pin!(cut);
    cut.as_mut().enable();
    let started = tokio::time::Instant::now();
    // Milliseconds since `started` when bytes last moved.
    let last = AtomicU64::new(0);
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let end = {
        let (client_read, client_write) = client.halves();
        let (backend_read, backend_write) = backend.split();
        let upward = async {
            if !early.is_empty() {
                let mut w = backend_write;
                if w.write_all(early).await.is_err() || w.flush().await.is_err() {
                    return Err(End::BackendFailed);
                }
                up.fetch_add(early.len() as u64, Ordering::Relaxed);
                pipe(client_read, w, &up, &last, started, (End::ClientFailed, End::BackendFailed)).await
            } else {
                pipe(client_read, backend_write, &up, &last, started, (End::ClientFailed, End::BackendFailed)).await
            }
        };
        let downward = pipe(backend_read, client_write, &down, &last, started, (End::BackendFailed, End::ClientFailed));
        let both = async {
            match tokio::try_join!(upward, downward) {
                Ok(_) => End::Closed,
                Err(e) => e,
            }
        };
        let quiet = async {
            loop {
                let since = Duration::from_millis(last.load(Ordering::Relaxed));
                let until = started + since + idle;
                if tokio::time::Instant::now() >= until {
                    return;
                }
                tokio::time::sleep_until(until).await;
            }
        };
        tokio::select! {
            end = both => end,
            _ = quiet => End::Idle,
            _ = cut => End::Drained,
        }
    };
    Relayed { up: up.into_inner(), down: down.into_inner(), end }
}

/// Copies from `from` to `to` until `from` ends, then ends `to`'s sending. `faults` is
/// (what a failed read is, what a failed write is).
async fn pipe<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut from: R,
    mut to: W,
    count: &AtomicU64,
    last: &AtomicU64,
    started: tokio::time::Instant,
    faults: (End, End),
) -> Result<(), End> {
    let mut buf = Buf::take();
    loop {
        let n = match from.read(buf.spare()).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => return Err(faults.0),
        };
        last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        if to.write_all(&buf.spare()[..n]).await.is_err() || to.flush().await.is_err() {
            return Err(faults.1);
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    // The end of this direction: the other side is told (FIN); the other direction goes
    // on until its own end.
    let _ = to.shutdown().await;
    Ok(())
}

//! One client connection: serve it with hyper and enforce the client-side timeouts.
//!
//! hyper's own `header_read_timeout` needs a timer, also fires on idle keep-alive
//! connections and cannot tell the two apart, so Tether keeps a small state machine per
//! connection instead. [`Timed`] wraps the socket and notices the first byte of a new
//! request; the request handler marks when a request is being served and when its
//! response has ended. The connection task sleeps until the current deadline:
//!
//! ```text
//!  accept ──► Head ──(head complete)──► Busy ──(last response ends)──► Idle
//!              ▲  deadline: request_header      no deadline              │ deadline: client_idle
//!              └──────────────(first byte of the next request)───────────┘
//! ```
//!
//! A connection whose head deadline passes is closed at once (the client is dribbling);
//! one whose idle deadline passes is shut down gracefully. HTTP/2 connections never enter
//! `Head`: frames arrive on them at any time, so only the idle deadline applies.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::Shared;
use crate::config::Timeouts;

const HEAD: u8 = 0;
const BUSY: u8 = 1;
const IDLE: u8 = 2;

/// The timing state of one client connection, shared by its socket wrapper, its
/// connection task and the requests it carries.
#[derive(Debug)]
pub struct ConnState {
    phase: AtomicU8,
    /// Requests being served (more than one only on HTTP/2).
    active: AtomicU32,
    /// The current deadline, in milliseconds since `epoch`.
    deadline: AtomicU64,
    h2: AtomicBool,
    epoch: Instant,
    request_header: Duration,
    client_idle: Duration,
}

enum Check {
    HeadTimeout,
    IdleTimeout,
    Wait(Instant),
}

impl ConnState {
    fn new(timeouts: &Timeouts) -> ConnState {
        let s = ConnState {
            phase: AtomicU8::new(HEAD),
            active: AtomicU32::new(0),
            deadline: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            epoch: Instant::now(),
            request_header: timeouts.request_header,
            client_idle: timeouts.client_idle,
        };
        s.set_deadline(Instant::now() + s.request_header);
        s
    }

    fn set_deadline(&self, at: Instant) {
        self.deadline.store(at.duration_since(self.epoch).as_millis() as u64, Ordering::Relaxed);
    }

    fn deadline(&self) -> Instant {
        self.epoch + Duration::from_millis(self.deadline.load(Ordering::Relaxed))
    }

    /// Bytes arrived from the client.
    fn on_read(&self) {
        if self.phase.load(Ordering::Relaxed) == IDLE && !self.h2.load(Ordering::Relaxed) {
            self.phase.store(HEAD, Ordering::Relaxed);
            self.set_deadline(Instant::now() + self.request_header);
        }
    }

    /// The connection speaks HTTP/2: frames come at any time, only idleness is timed.
    fn set_h2(&self) {
        self.h2.store(true, Ordering::Relaxed);
        self.phase.store(IDLE, Ordering::Relaxed);
        self.set_deadline(Instant::now() + self.client_idle);
    }

    /// A request head has been read and its handling starts.
    pub fn begin(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.phase.store(BUSY, Ordering::Relaxed);
    }

    /// A response has been sent whole (or abandoned).
    pub fn end(&self) {
        if self.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.set_deadline(Instant::now() + self.client_idle);
            self.phase.store(IDLE, Ordering::Relaxed);
        }
    }

    fn check(&self, now: Instant) -> Check {
        let phase = self.phase.load(Ordering::Relaxed);
        if phase == BUSY {
            // Nothing to enforce while a request is served; look again later.
            return Check::Wait(now + self.client_idle.min(self.request_header));
        }
        let deadline = self.deadline();
        if now < deadline {
            Check::Wait(deadline)
        } else if phase == HEAD {
            Check::HeadTimeout
        } else {
            Check::IdleTimeout
        }
    }
}

/// A client socket that reports reads to its [`ConnState`].
pub struct Timed {
    io: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Timed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.on_read();
        }
        r
    }
}

impl AsyncWrite for Timed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What a request handler knows about the connection it came on.
#[derive(Debug)]
pub struct ConnCx {
    pub shared: Arc<Shared>,
    /// The listener's name, which finds its routes in the current snapshot.
    pub listener_name: Arc<str>,
    pub peer: SocketAddr,
    /// The peer's IP, ready for `X-Forwarded-For`.
    pub peer_ip: HeaderValue,
    pub state: Arc<ConnState>,
    pub stats: Arc<super::ListenerStats>,
    /// Held while anything of this connection lives (its requests, an upgraded tunnel),
    /// so that shutdown waits for it.
    _shutdown: watch::Receiver<bool>,
}

/// The HTTP server settings for client connections, shared by all of them.
#[derive(Debug)]
pub struct Protocols {
    pub h1: http1::Builder,
    pub h2: http2::Builder<TokioExecutor>,
}

impl Protocols {
    pub fn new() -> Protocols {
        let mut h1 = http1::Builder::new();
        h1.keep_alive(true).max_buf_size(64 * 1024);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.max_concurrent_streams(256);
        Protocols { h1, h2 }
    }
}

impl Default for Protocols {
    fn default() -> Self {
        Protocols::new()
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits for the client's first bytes and tells HTTP/2 prior knowledge from HTTP/1 by
/// peeking at them. Nothing is allocated for a connection before it speaks, so idle
/// connections that never send stay cheap. `None`: the client left.
async fn sniff(stream: &TcpStream) -> Option<bool> {
    let mut buf = [0u8; 24];
    loop {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if !H2_PREFACE.starts_with(&buf[..n]) {
            return Some(false);
        }
        if n == H2_PREFACE.len() {
            return Some(true);
        }
        // A preface split across packets: wait for the rest.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Serves one client connection until it closes, times out, or shutdown is asked for and
/// its requests have finished. Holding `shutdown` keeps the server waiting for this
/// connection at shutdown.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    listener_name: Arc<str>,
    shared: Arc<Shared>,
    protocols: Arc<Protocols>,
    stats: Arc<super::ListenerStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    stats.connections.fetch_add(1, Ordering::Relaxed);
    struct Open(Arc<super::ListenerStats>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let _open = Open(stats.clone());
    let timeouts = shared.snapshot.load().config.timeouts;
    let h2 = tokio::select! {
        r = sniff(&stream) => match r {
            Some(h2) => h2,
            None => return,
        },
        _ = tokio::time::sleep(timeouts.request_header) => {
            tracing::debug!(%peer, "closing connection: nothing received within {:?}", timeouts.request_header);
            return;
        }
        _ = shutdown.changed() => return,
    };
    let state = Arc::new(ConnState::new(&timeouts));
    if h2 {
        state.set_h2();
    }
    let ip = crate::config::canonical(peer.ip()).to_string();
    let cx = Arc::new(ConnCx {
        shared,
        listener_name,
        peer,
        peer_ip: HeaderValue::from_str(&ip).unwrap_or(HeaderValue::from_static("unknown")),
        state: state.clone(),
        stats,
        _shutdown: shutdown.clone(),
    });
    let io = TokioIo::new(Timed { io: stream, state: state.clone() });
    let service = service_fn(move |req| super::http::handle(req, cx.clone()));
    if h2 {
        let conn = protocols.h2.serve_connection(io, service);
        drive(conn, |c| c.graceful_shutdown(), &state, shutdown, peer, timeouts.request_header).await;
    } else {
        let conn = protocols.h1.serve_connection(io, service).with_upgrades();
        drive(conn, |c| c.graceful_shutdown(), &state, shutdown, peer, timeouts.request_header).await;
    }
}

/// Runs a hyper connection to its end while enforcing the connection's deadlines and
/// the shutdown signal.
async fn drive<F, G>(
    conn: F,
    graceful: G,
    state: &ConnState,
    mut shutdown: watch::Receiver<bool>,
    peer: SocketAddr,
    request_header: Duration,
) where
    F: std::future::Future<Output = Result<(), hyper::Error>>,
    G: Fn(Pin<&mut F>),
{
    let mut conn = std::pin::pin!(conn);
    let sleep = tokio::time::sleep_until(state.deadline());
    let mut sleep = std::pin::pin!(sleep);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, "client connection ended: {e}");
                }
                return;
            }
            _ = shutdown.changed(), if !closing => {
                closing = true;
                graceful(conn.as_mut());
            }
            _ = &mut sleep => match state.check(Instant::now()) {
                Check::Wait(at) => sleep.as_mut().reset(at),
                Check::HeadTimeout => {
                    tracing::debug!(%peer, "closing connection: request head not received within {request_header:?}");
                    return;
                }
                Check::IdleTimeout => {
                    if closing {
                        return;
                    }
                    closing = true;
                    graceful(conn.as_mut());
                    // Give an HTTP/2 client a moment to see GOAWAY before the socket goes.
                    sleep.as_mut().reset(Instant::now() + Duration::from_secs(1));
                }
            }
        }
    }
}

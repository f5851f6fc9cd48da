//! What the data path knows of one client connection: its timing state machine, the
//! socket wrapper that feeds it, and the context every request on it carries.
//!
//! hyper's own `header_read_timeout` needs a timer, also fires on idle keep-alive
//! connections and cannot tell the two apart, so Tether keeps a small state machine per
//! connection instead. [`Timed`] wraps the socket and notices the first byte of a new
//! request; the request handler marks when a request is being served and when its
//! response has ended. The connection task (`conn`) sleeps until the current deadline:
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
//!
//! In any phase, [`Timed`] also notes when a write to the client started waiting (the
//! client stopped reading and the socket's send buffer is full) and forgets it when a
//! write makes progress. A connection whose write has waited longer than `client_send` is
//! closed at once: a client that never reads its response cannot hold the connection, the
//! request and its backend slot for ever.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Timeouts;
use crate::state::{ConnPermit, ListenerStats, Shared};

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
    /// Since when a write to the client has been waiting, in milliseconds since `epoch`
    /// plus one; 0 while no write waits.
    write_blocked: AtomicU64,
    epoch: Instant,
    request_header: Duration,
    client_idle: Duration,
    client_send: Duration,
}

pub(super) enum Check {
    HeadTimeout,
    IdleTimeout,
    /// A write to the client has waited longer than `client_send`.
    SendTimeout,
    Wait(Instant),
}

impl ConnState {
    pub(super) fn new(timeouts: &Timeouts) -> ConnState {
        let s = ConnState {
            phase: AtomicU8::new(HEAD),
            active: AtomicU32::new(0),
            deadline: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            write_blocked: AtomicU64::new(0),
            epoch: Instant::now(),
            request_header: timeouts.request_header,
            client_idle: timeouts.client_idle,
            client_send: timeouts.client_send,
        };
        s.set_deadline(Instant::now() + s.request_header);
        s
    }

    pub(super) fn set_deadline(&self, at: Instant) {
        self.deadline.store(at.duration_since(self.epoch).as_millis() as u64, Ordering::Relaxed);
    }

    pub(super) fn deadline(&self) -> Instant {
        self.epoch + Duration::from_millis(self.deadline.load(Ordering::Relaxed))
    }

    /// Bytes arrived from the client.
    pub(super) fn on_read(&self) {
        if self.phase.load(Ordering::Relaxed) == IDLE && !self.h2.load(Ordering::Relaxed) {
            self.phase.store(HEAD, Ordering::Relaxed);
            self.set_deadline(Instant::now() + self.request_header);
        }
    }

    /// The connection speaks HTTP/2: frames come at any time, only idleness is timed.
    pub(super) fn set_h2(&self) {
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

    /// A write to the client could not go on: note when, unless a write already waits.
    fn on_write_blocked(&self) {
        if self.write_blocked.load(Ordering::Relaxed) == 0 {
            let since = Instant::now().saturating_duration_since(self.epoch).as_millis() as u64;
            self.write_blocked.store(since + 1, Ordering::Relaxed);
        }
    }

    /// A write to the client made progress (or failed): nothing waits any more.
    fn on_write_progress(&self) {
        if self.write_blocked.load(Ordering::Relaxed) != 0 {
            self.write_blocked.store(0, Ordering::Relaxed);
        }
    }

    /// When the write waiting now runs out of `client_send`; `None` when none waits.
    pub(super) fn send_deadline(&self) -> Option<Instant> {
        match self.write_blocked.load(Ordering::Relaxed) {
            0 => None,
            since => Some(self.epoch + Duration::from_millis(since - 1) + self.client_send),
        }
    }

    pub(super) fn check(&self, now: Instant) -> Check {
        let send = self.send_deadline();
        if send.is_some_and(|at| now >= at) {
            return Check::SendTimeout;
        }
        let phase = self.phase.load(Ordering::Relaxed);
        let next = if phase == BUSY {
            // No deadline of its own while a request is served: look again in a while
            // (the phase may change), and no later than a write that starts waiting
            // meanwhile could run out of `client_send`.
            now + self.client_idle.min(self.request_header).min(self.client_send)
        } else {
            let deadline = self.deadline();
            if now >= deadline {
                return if phase == HEAD { Check::HeadTimeout } else { Check::IdleTimeout };
            }
            deadline
        };
        Check::Wait(send.map_or(next, |at| at.min(next)))
    }
}

/// A client socket that reports reads to its [`ConnState`].
pub struct Timed<S> {
    pub(super) io: S,
    pub(super) state: Arc<ConnState>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Timed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.on_read();
        }
        r
    }
}

impl<S> Timed<S> {
    /// Notes whether a write to the client waits or went on (see [`ConnState::check`]).
    fn track<T>(&self, r: Poll<io::Result<T>>, progress: impl FnOnce(&T) -> bool) -> Poll<io::Result<T>> {
        match &r {
            Poll::Pending => self.state.on_write_blocked(),
            Poll::Ready(Ok(v)) if !progress(v) => {}
            Poll::Ready(_) => self.state.on_write_progress(),
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Timed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.track(r, |&n| n > 0)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.track(r, |&n| n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.track(r, |_| true)
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
    /// The address the client connected to, for PROXY protocol headers to backends.
    pub local: Option<SocketAddr>,
    /// The peer's IP, ready for `X-Forwarded-For`.
    pub peer_ip: HeaderValue,
    /// The connection came over TLS, terminated by Tether: `X-Forwarded-Proto` is `https`
    /// and Tether's cookie `Secure` (unless the pool says otherwise).
    pub tls: bool,
    pub state: Arc<ConnState>,
    pub stats: Arc<ListenerStats>,
    /// Held while anything of this connection lives (its requests, an upgraded tunnel),
    /// so that shutdown waits for it.
    pub(super) _shutdown: watch::Receiver<bool>,
    /// This connection's place under `[limits]`, given back when the last holder drops.
    pub(super) _permit: ConnPermit,
}

/// How long a connection accepted before shutdown (or a binary upgrade) began still gets
/// to send its first request once it has begun: the client connected while Tether was
/// accepting and is sending, so closing it unread would fail that request (with a reset,
/// when its bytes are already here). A client that has not sent within this is closed.
pub(crate) const LAST_CALL: Duration = Duration::from_secs(1);

/// `fut` (the wait for a new connection's first bytes or its TLS handshake), or `None`
/// once `wait` passes. Shutdown does not end the wait: it shortens it to [`LAST_CALL`].
pub(crate) async fn first_request<F: std::future::Future>(
    fut: F,
    wait: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<F::Output> {
    let mut stopping = *shutdown.borrow();
    let now = Instant::now();
    let deadline = if stopping { now + wait.min(LAST_CALL) } else { now + wait };
    let sleep = tokio::time::sleep_until(deadline);
    tokio::pin!(fut, sleep);
    loop {
        tokio::select! {
            r = &mut fut => return Some(r),
            _ = &mut sleep => return None,
            _ = shutdown.changed(), if !stopping => {
                stopping = true;
                let last = Instant::now() + LAST_CALL;
                if last < sleep.deadline() {
                    sleep.as_mut().reset(last);
                }
            }
        }
    }
}

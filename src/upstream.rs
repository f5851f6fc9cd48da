//! Connections to one backend: connect with a deadline, and keep idle keep-alive
//! sockets for reuse, one stack per worker. Both of Tether's request paths (HTTP/1 on the
//! native codec, and HTTP/2 from clients through `proxy::backside`) speak HTTP/1.1 to
//! backends over these sockets. A pool's snapshot keeps one `Upstream` per backend beside
//! it, carried across reloads with the backend.
//!
//! This module does not choose backends and does not retry across backends: the proxy's
//! request flow does. It also holds the client's request body as the HTTP/2 path streams
//! it ([`RequestBody`]), with the state that tells a failed upload from a failed backend.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{tcp, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_rustls::client::TlsStream;

use crate::config::Timeouts;
use crate::tls::backend::BackendTls;

/// Idle connections kept per backend and worker. Beyond
/// this a finished connection is closed. It is sized for a few hundred concurrent clients
/// per backend, the load where reusing connections matters most; idle connections cost a
/// socket and about 10 KiB each.
pub const MAX_IDLE: usize = 512;

/// An error of a body Tether streams: the peer's, or a wait for its next piece that went
/// on too long.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
pub struct Upstream {
    address: SocketAddr,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// The pool's TLS to its backends (`None`: plain TCP).
    tls: Option<Arc<BackendTls>>,
    /// Shared HTTP/2 connections, for a pool that speaks HTTP/2 to its backends: at most
    /// this many streams each (`None`: the pool speaks HTTP/1.1).
    h2_streams: Option<u32>,
    h2: Mutex<Vec<H2Conn>>,
    /// Idle connections: plain sockets, most recent last, one
    /// stack per worker (`worker::index`). A socket is registered with the reactor of the
    /// runtime that opened it, so it goes back to, and is taken again from, its own
    /// worker's stack only; each stack's lock is taken by one thread and never contended.
    idle: Box<[IdleStack]>,
}

/// One worker's idle sockets, on a cache line of its own so that workers
/// taking and putting back connections to the same backend do not share one.
#[derive(Debug, Default)]
#[repr(align(64))]
struct IdleStack(Mutex<Vec<(BackendConn, Instant)>>);

/// Why a connection to a backend could not be made. No byte of the request was sent, so
/// the request may always go to another backend.
#[derive(Debug)]
pub enum ConnectError {
    Timeout(Duration),
    Io(io::Error),
    /// The TLS handshake failed (the certificate did not verify, no protocol in common).
    Tls(io::Error),
}

impl ConnectError {
    /// The backend's fault (it refused, reset, did not answer in time, or is unreachable),
    /// as opposed to Tether's own (out of file descriptors, ports or memory), which must not
    /// count against the backend's health.
    pub fn is_backend_fault(&self) -> bool {
        match self {
            ConnectError::Timeout(_) | ConnectError::Tls(_) => true,
            ConnectError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
                    | io::ErrorKind::NetworkDown
            ),
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Timeout(d) => write!(f, "connect timed out after {d:?}"),
            ConnectError::Io(e) => write!(f, "connect failed: {e}"),
            ConnectError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
        }
    }
}

// === impl Upstream ===

impl Upstream {
    pub fn new(address: SocketAddr, timeouts: &Timeouts, tls: Option<Arc<BackendTls>>) -> Upstream {
        Upstream {
            address,
            connect_timeout: timeouts.connect,
            idle_timeout: timeouts.backend_idle,
            tls,
            h2_streams: None,
            h2: Mutex::new(Vec::new()),
            idle: (0..crate::worker::count()).map(|_| IdleStack::default()).collect(),
        }
    }

    /// An idle socket that is still open and has nothing unread, most
    /// recently used first. One the backend closed, or that it sent something on while
    /// idle, or that has been idle for `backend_idle`, is dropped.
    pub fn take_idle(&self) -> Option<BackendConn> {
        let now = Instant::now();
        loop {
            let (mut stream, since) = self.idle_stack().lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            if now.duration_since(since) < self.idle_timeout && stream.quiet() {
                return Some(stream);
            }
        }
    }

    /// Whether connections are TLS (and so cannot be handed to anything that needs a plain socket).
    pub fn tls(&self) -> Option<&Arc<BackendTls>> {
        self.tls.as_ref()
    }

    /// Keeps a socket whose last response was read to the end.
    pub fn put_back(&self, stream: BackendConn) {
        let mut idle = self.idle_stack().lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((stream, Instant::now()));
        }
    }

    /// The idle stack of the worker this runs on (the first one off the workers).
    fn idle_stack(&self) -> &Mutex<Vec<(BackendConn, Instant)>> {
        let stacks = &self.idle;
        &stacks.get(crate::worker::index()).unwrap_or(&stacks[0]).0
    }

    /// Opens a new connection to the backend within the connect timeout, its TLS
    /// handshake included. A `proxy_header` (PROXY protocol) is written whole as its first
    /// bytes within the same timeout, before any TLS: a backend that expects one has not
    /// accepted the connection until it has it.
    pub async fn connect(&self, proxy_header: Option<&[u8]>) -> Result<BackendConn, ConnectError> {
        let deadline = Instant::now() + self.connect_timeout;
        let open = async {
            let mut stream = TcpStream::connect(self.address).await?;
            if let Some(header) = proxy_header {
                tokio::io::AsyncWriteExt::write_all(&mut stream, header).await?;
            }
            Ok::<_, io::Error>(stream)
        };
        let stream = match tokio::time::timeout_at(deadline, open).await {
            Err(_) => return Err(ConnectError::Timeout(self.connect_timeout)),
            Ok(Err(e)) => return Err(ConnectError::Io(e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let Some(tls) = &self.tls else { return Ok(BackendConn::Plain(stream)) };
        let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
        match tokio::time::timeout_at(deadline, connector.connect(tls.name_for(self.address.ip()), stream)).await {
            Err(_) => Err(ConnectError::Timeout(self.connect_timeout)),
            Ok(Err(e)) => Err(ConnectError::Tls(e)),
            Ok(Ok(s)) => Ok(BackendConn::Tls(Box::new(s))),
        }
    }
}

/// A request body as an HTTP/2 backend connection takes it.
pub type H2Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// One shared HTTP/2 connection to a backend.
#[derive(Debug)]
struct H2Conn {
    sender: http2::SendRequest<H2Body>,
    /// Streams open on it now.
    streams: Arc<AtomicU32>,
    /// When its last stream ended (or it was opened).
    since: Instant,
}

/// A stream's place on a shared HTTP/2 connection, given back when dropped (when the
/// response has been read to its end, or abandoned).
#[derive(Debug)]
pub struct H2Stream(Arc<AtomicU32>);

impl Drop for H2Stream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

impl Upstream {
    /// This upstream speaks HTTP/2 to its backend, `max_streams` streams per connection.
    pub fn with_http2(mut self, max_streams: u32) -> Upstream {
        self.h2_streams = Some(max_streams.max(1));
        self
    }

    /// Whether requests go to the backend over HTTP/2.
    pub fn is_http2(&self) -> bool {
        self.h2_streams.is_some()
    }

    /// A stream on a shared HTTP/2 connection: the open connection with the fewest streams
    /// that has room for one more (`true`: reused), else a new connection. Connections
    /// closed by the backend (or after a GOAWAY) and ones idle for `backend_idle` are
    /// dropped on the way.
    pub async fn h2_stream(&self, fresh: bool) -> Result<(http2::SendRequest<H2Body>, H2Stream, bool), ConnectError> {
        let max = self.h2_streams.unwrap_or(1);
        if !fresh {
            let now = Instant::now();
            let mut conns = self.h2.lock().unwrap_or_else(|e| e.into_inner());
            conns.retain(|c| {
                !c.sender.is_closed()
                    && (c.streams.load(Ordering::Acquire) > 0 || now.duration_since(c.since) < self.idle_timeout)
            });
            let best = conns
                .iter_mut()
                .filter(|c| c.streams.load(Ordering::Acquire) < max)
                .min_by_key(|c| c.streams.load(Ordering::Acquire));
            if let Some(c) = best {
                c.streams.fetch_add(1, Ordering::AcqRel);
                c.since = now;
                return Ok((c.sender.clone(), H2Stream(c.streams.clone()), true));
            }
        }
        let sender = self.h2_connect().await?;
        let streams = Arc::new(AtomicU32::new(1));
        let kept = H2Conn { sender: sender.clone(), streams: streams.clone(), since: Instant::now() };
        self.h2.lock().unwrap_or_else(|e| e.into_inner()).push(kept);
        Ok((sender, H2Stream(streams), false))
    }

    /// A new HTTP/2 connection of its own (a health check's, or one to share): connected,
    /// `h2` agreed by ALPN over TLS, the connection's task spawned. It closes when the
    /// last clone of its sender is dropped.
    pub async fn h2_connect(&self) -> Result<http2::SendRequest<H2Body>, ConnectError> {
        let conn = self.connect(None).await?;
        if let BackendConn::Tls(s) = &conn {
            if s.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(ConnectError::Tls(io::Error::other("the backend did not agree to HTTP/2 (ALPN h2)")));
            }
        }
        let mut builder = http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            // A connection that stops answering pings is closed, so requests stop going to it.
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10));
        let (sender, connection) =
            match tokio::time::timeout(self.connect_timeout, builder.handshake(hyper_util::rt::TokioIo::new(conn)))
                .await
            {
                Err(_) => return Err(ConnectError::Timeout(self.connect_timeout)),
                Ok(Err(e)) => return Err(ConnectError::Io(io::Error::other(e))),
                Ok(Ok(c)) => c,
            };
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("HTTP/2 backend connection ended: {e}");
            }
        });
        Ok(sender)
    }
}

/// A connection to a backend: a plain socket, or TLS over one (boxed: the TLS state is
/// large, and plain connections should not carry its size).
#[derive(Debug)]
pub enum BackendConn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// The reading half of a [`BackendConn`], borrowed.
pub enum ReadHalf<'a> {
    Plain(tcp::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>),
}

/// The writing half of a [`BackendConn`], borrowed.
pub enum WriteHalf<'a> {
    Plain(tcp::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>),
}

impl BackendConn {
    /// Both directions at once (a request body may stream up while the response streams down).
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        match self {
            BackendConn::Plain(s) => {
                let (r, w) = s.split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            BackendConn::Tls(s) => {
                let (r, w) = tokio::io::split(&mut **s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }

    /// Whether the connection is usable for another request: see [`quiet`]. A TLS one is
    /// also read once without waiting, so records that arrived while it was idle (a TLS
    /// 1.3 session ticket is harmless; `close_notify` or data is not) are taken in.
    pub fn quiet(&mut self) -> bool {
        match self {
            BackendConn::Plain(s) => quiet(s),
            BackendConn::Tls(s) => {
                let mut byte = [0u8; 1];
                let mut buf = tokio::io::ReadBuf::new(&mut byte);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                matches!(Pin::new(&mut **s).poll_read(&mut cx, &mut buf), Poll::Pending)
            }
        }
    }
}

macro_rules! delegate_io {
    ($ty:ident $(<$lt:lifetime>)?) => {
        impl$(<$lt>)? AsyncRead for $ty$(<$lt>)? {
            fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_read(cx, buf),
                    $ty::Tls(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }
    };
}

macro_rules! delegate_write {
    ($ty:ident $(<$lt:lifetime>)?) => {
        impl$(<$lt>)? AsyncWrite for $ty$(<$lt>)? {
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    $ty::Tls(s) => Pin::new(s).poll_write(cx, buf),
                }
            }

            fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    $ty::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    $ty::Plain(s) => s.is_write_vectored(),
                    $ty::Tls(s) => s.is_write_vectored(),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_flush(cx),
                    $ty::Tls(s) => Pin::new(s).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_shutdown(cx),
                    $ty::Tls(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
        }
    };
}

delegate_io!(BackendConn);
delegate_io!(ReadHalf<'a>);
delegate_write!(BackendConn);
delegate_write!(WriteHalf<'a>);

/// An idle socket is usable when reading it would block: it is neither closed nor holding
/// bytes nobody asked for.
///
/// Most of the time this costs no system call. Both request paths read a response with
/// tokio's `AsyncRead`, which forgets a socket's read readiness when a read comes back
/// short (or would block); after that, only an edge from epoll (bytes or a FIN arrived)
/// sets it again. `try_io` runs its `MSG_PEEK` only on a socket marked readable (and
/// clears a stale mark when the peek would block); one whose mark is clear has had
/// nothing arrive since its last response, as far as the reactor has seen. Something that
/// arrived after the reactor last looked is caught as before: a closed socket fails the
/// request while it is whole in the write buffer and it is sent again on a fresh one.
fn quiet(stream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let peek = || {
        let mut byte = [0u8; 1];
        // SAFETY: `byte` is valid for writes of one byte, and the descriptor is open
        // while `stream` is borrowed.
        let n =
            unsafe { libc::recv(stream.as_raw_fd(), byte.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n)
        }
    };
    matches!(stream.try_io(tokio::io::Interest::READABLE, peek), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// A request body as it goes to a backend: the client's, streamed, or none for a request
/// sent again after a broken connection.
#[derive(Debug)]
pub enum RequestBody {
    /// The client's body, with how reading it went when there is a body at all.
    Stream(ClientBody),
    Empty,
}

/// The client's body as the backend connection reads it.
#[derive(Debug)]
pub struct ClientBody {
    body: Incoming,
    /// How reading it went, for a body with something to read.
    state: Option<Arc<BodyState>>,
    /// The wait for its next piece, bounded by `client_body`.
    stall: Stall,
    /// Bytes it may still carry (`limits.max_request_body`); `u64::MAX`: no limit.
    allowed: u64,
}

impl RequestBody {
    /// The client's body. A body with something to read gets a [`BodyState`], shared with
    /// the caller, so that a failed send can be blamed on the client or the backend. Each
    /// wait for its next piece lasts at most `client_body`: after that the body fails, as
    /// the client's fault. A body that carries more than `max` bytes fails as soon as it
    /// does, before the piece that passes the limit is sent ([`BodyState::too_large`]).
    pub fn client(body: Incoming, client_body: Duration, max: Option<u64>) -> (RequestBody, Option<Arc<BodyState>>) {
        let state = (!body.is_end_stream()).then(|| Arc::new(BodyState::default()));
        let stall = Stall::new(client_body);
        let allowed = max.unwrap_or(u64::MAX);
        (RequestBody::Stream(ClientBody { body, state: state.clone(), stall, allowed }), state)
    }
}

/// A wait for the next piece of a streamed body that may last at most `limit`. The timer
/// is made the first time the body has to wait, so a body that keeps flowing (or none at
/// all) never allocates one, and it is restarted, not made again, for each later wait.
#[derive(Debug)]
pub struct Stall {
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// The timer runs for the current wait (no frame since it was started).
    armed: bool,
}

impl Stall {
    pub fn new(limit: Duration) -> Stall {
        Stall { limit, timer: None, armed: false }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// A piece arrived: the next wait is timed afresh.
    pub fn arrived(&mut self) {
        self.armed = false;
    }

    /// The body has nothing yet: `Ready` once this wait has lasted `limit`, else `Pending`
    /// with `cx` woken when it will have.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.armed {
            self.armed = true;
            let deadline = Instant::now() + self.limit;
            match &mut self.timer {
                Some(t) => t.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        match &mut self.timer {
            Some(t) => t.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

/// No next piece of a body within its limit.
#[derive(Debug)]
pub struct BodyTimeout {
    pub from: &'static str,
    pub after: Duration,
}

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nothing more of the {} body within {:?}", self.from, self.after)
    }
}

impl std::error::Error for BodyTimeout {}

/// A request body that carried more than `limits.max_request_body`.
#[derive(Debug)]
pub struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client's request body is larger than limits.max_request_body")
    }
}

impl std::error::Error for BodyTooLarge {}

/// How reading a client's request body went, as seen by the connection that sends it to a
/// backend: how the proxy tells a broken or late upload (the client's fault) from a broken
/// or late backend.
#[derive(Debug, Default)]
pub struct BodyState(AtomicU8);

const READING: u8 = 0;
const WAITING: u8 = 1;
const DONE: u8 = 2;
const FAILED: u8 = 3;
const TOO_LARGE: u8 = 4;

impl BodyState {
    /// Reading the client's body failed (malformed chunked encoding, a client that went
    /// away mid-upload, a client that sent nothing more within `client_body`, ...).
    pub fn failed(&self) -> bool {
        matches!(self.0.load(Ordering::Relaxed), FAILED | TOO_LARGE)
    }

    /// The body failed because it carried more than `limits.max_request_body`.
    pub fn too_large(&self) -> bool {
        self.0.load(Ordering::Relaxed) == TOO_LARGE
    }

    /// The whole body was read and handed to the backend connection.
    pub fn done(&self) -> bool {
        self.0.load(Ordering::Relaxed) == DONE
    }

    /// The backend connection asked for more of the body and the client has not sent it
    /// yet: whatever is late now is late because of the client.
    pub fn waiting_on_client(&self) -> bool {
        self.0.load(Ordering::Relaxed) == WAITING
    }

    fn set(&self, v: u8) {
        self.0.store(v, Ordering::Relaxed);
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let c = match self.get_mut() {
            RequestBody::Stream(c) => c,
            RequestBody::Empty => return Poll::Ready(None),
        };
        let Some(state) = &c.state else {
            // Nothing to read: no state to keep and no wait to bound.
            return Pin::new(&mut c.body).poll_frame(cx).map_err(Into::into);
        };
        match Pin::new(&mut c.body).poll_frame(cx) {
            Poll::Pending => {
                if c.stall.poll_expired(cx).is_ready() {
                    state.set(FAILED);
                    let e = BodyTimeout { from: "client's request", after: c.stall.limit() };
                    return Poll::Ready(Some(Err(e.into())));
                }
                state.set(WAITING);
                Poll::Pending
            }
            Poll::Ready(None) => {
                state.set(DONE);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                state.set(FAILED);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                c.stall.arrived();
                if let Some(d) = frame.data_ref() {
                    let n = d.len() as u64;
                    if n > c.allowed {
                        state.set(TOO_LARGE);
                        return Poll::Ready(Some(Err(BodyTooLarge.into())));
                    }
                    c.allowed -= n;
                }
                state.set(if c.body.is_end_stream() { DONE } else { READING });
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Stream(c) => c.body.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Stream(c) => c.body.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_backends_connect_failures_are_its_fault() {
        let os = |n| ConnectError::Io(io::Error::from_raw_os_error(n));
        // ECONNREFUSED, ECONNRESET, EHOSTUNREACH, ENETUNREACH: the backend or its network.
        for n in [111, 104, 113, 101] {
            assert!(os(n).is_backend_fault(), "os error {n}");
        }
        assert!(ConnectError::Timeout(Duration::from_secs(1)).is_backend_fault());
        // EMFILE, ENFILE, EADDRNOTAVAIL, ENOBUFS, ENOMEM: Tether's own host.
        for n in [24, 23, 99, 105, 12] {
            assert!(!os(n).is_backend_fault(), "os error {n}");
        }
    }

    #[tokio::test]
    async fn a_native_connection_is_reused_only_on_the_worker_that_made_it() {
        // More workers than one only ever add stacks, so other tests may see this too.
        crate::worker::set_count(2);
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = Upstream::new(backend.local_addr().unwrap(), &Timeouts::default(), None);
        let stream = upstream.connect(None).await.unwrap();
        let _accepted = backend.accept().await.unwrap();
        // This test's thread plays worker 1, then worker 0 (the index is the thread's own).
        crate::worker::set_index(1);
        upstream.put_back(stream);
        crate::worker::set_index(0);
        assert!(upstream.take_idle().is_none(), "worker 0 took worker 1's connection");
        crate::worker::set_index(1);
        assert!(upstream.take_idle().is_some(), "worker 1 lost its own connection");
        assert!(upstream.take_idle().is_none());
        crate::worker::set_index(0);
    }
}

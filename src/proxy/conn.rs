//! One client connection: tell HTTP/1.1 from h2c; hand HTTP/1.1 to the native path
//! ([`super::native::conn`]) and serve h2c with hyper's HTTP/2 server, enforcing its
//! deadlines (kept by [`client::ConnState`](super::client::ConnState)) and the shutdown
//! signal.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::HeaderValue;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::client::{Check, ConnCx, ConnState, Timed};
use crate::config::{Limits, Timeouts};
use crate::state::{ConnPermit, ListenerStats, Shared};

/// The HTTP/2 server settings for client connections, shared by all of them.
///
/// HTTP/2 is bounded so that one client cannot hold much: `limits.h2_max_concurrent_streams`
/// streams per connection, at most 256 KiB queued for sending per stream
/// (hyper: 400 KiB), and receive windows of 256 KiB per stream and 1 MiB per connection
/// (hyper: 1 MiB each). hyper's 16 KiB limit on a header list is kept.
#[derive(Debug)]
pub struct Protocols {
    pub h2: http2::Builder<TokioExecutor>,
    /// The concurrent stream limit `h2` was built with; a connection made under another
    /// (after a reload changed `[limits]`) uses a copy of `h2` with its own.
    h2_streams: u32,
}

/// Bytes hyper may queue for sending on one HTTP/2 stream.
const H2_MAX_SEND_BUF: usize = 256 * 1024;
/// How much a client may send on one HTTP/2 stream, and on a connection, before Tether reads it.
const H2_STREAM_WINDOW: u32 = 256 * 1024;
const H2_CONN_WINDOW: u32 = 1024 * 1024;

impl Protocols {
    /// The settings for `limits`; a connection made after a reload changed the stream
    /// limit uses a copy of `h2` with the new one.
    pub fn with_limits(limits: &Limits) -> Protocols {
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_send_buf_size(H2_MAX_SEND_BUF)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONN_WINDOW);
        Protocols { h2, h2_streams: limits.h2_max_concurrent_streams }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits for the client's first bytes and tells HTTP/2 prior knowledge from HTTP/1 by
/// peeking at them. Nothing is allocated for a connection before it speaks, so idle
/// connections that never send stay cheap. `None`: the client left.
///
/// A client that sent part of the preface and stopped is waited for without polling: the
/// peek runs inside `try_io`, so when it sees only part of the preface the socket's
/// readiness is cleared as of *before* the peek, and the next wake-up is new data (or the
/// client closing). The caller's `request_header` deadline bounds the wait.
async fn sniff(stream: &TcpStream) -> Option<bool> {
    loop {
        let ready = stream.ready(Interest::READABLE).await.ok()?;
        match stream.try_io(Interest::READABLE, || peek_preface(stream)) {
            Ok(found) => return found,
            // Nothing yet, or a preface split across packets: wait for more, unless the
            // client has closed its side and the preface can never complete.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if ready.is_read_closed() {
                    return None;
                }
            }
            Err(_) => return None,
        }
    }
}

/// Peeks at the client's first bytes: `Some(true)` the HTTP/2 preface, `Some(false)`
/// anything else, `None` the client left; `WouldBlock` nothing or only part of the
/// preface yet.
fn peek_preface(stream: &TcpStream) -> io::Result<Option<bool>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let n = super::peek(stream, &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if !H2_PREFACE.starts_with(&buf[..n]) {
        return Ok(Some(false));
    }
    if n == H2_PREFACE.len() {
        return Ok(Some(true));
    }
    Err(io::ErrorKind::WouldBlock.into())
}

/// A client connection as the accept loop hands it over: the socket, the client's
/// address, and its place under `[limits]` (held as long as anything of it lives).
#[derive(Debug)]
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub permit: ConnPermit,
}

/// Serves one client connection until it closes, times out, or shutdown is asked for and
/// its requests have finished. Holding `shutdown` keeps the server waiting for this
/// connection at shutdown.
pub async fn serve(
    accepted: Accepted,
    listener_name: Arc<str>,
    shared: Arc<Shared>,
    protocols: Arc<Protocols>,
    stats: Arc<ListenerStats>,
    shutdown: watch::Receiver<bool>,
) {
    let Accepted { stream, mut peer, permit } = accepted;
    stats.connections.fetch_add(1, Ordering::Relaxed);
    struct Open(Arc<ListenerStats>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let _open = Open(stats.clone());
    let (timeouts, tls, tcp, proxy_protocol, sends_proxy) = {
        let snapshot = shared.snapshot.load();
        let l = snapshot.config.listeners.iter().find(|l| *l.name == *listener_name);
        let sends_proxy = snapshot.config.pools.iter().any(|p| p.send_proxy_protocol.is_some());
        (
            snapshot.config.timeouts,
            l.and_then(|l| l.tls.clone()),
            l.and_then(|l| l.tcp.clone()),
            l.and_then(|l| l.proxy_protocol.clone()),
            sends_proxy,
        )
    };
    // The address the client connected to, for PROXY protocol headers to backends: the
    // one a header from the proxy in front carries, else the socket's own (a system call
    // made only while some pool sends headers).
    let mut local = None;
    if let Some(pp) = proxy_protocol {
        let mut stop = shutdown.clone();
        let read = Box::pin(proxy_in(&stream, &pp, peer, tcp.is_some(), timeouts.request_header, &mut stop)).await;
        match read {
            ProxyIn::Peer { source, destination } => {
                peer = source.unwrap_or(peer);
                local = destination;
            }
            ProxyIn::Refused(why) => {
                tracing::debug!(%peer, listener = %listener_name, "closing connection: PROXY protocol: {why}");
                stats.proxy_protocol_refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
            ProxyIn::Gone => return,
        }
    }
    if local.is_none() && sends_proxy {
        local = stream.local_addr().ok();
    }
    if let Some(tcp) = tcp {
        let conn = super::tcp::TcpConn {
            stream,
            peer,
            local,
            shared,
            listener: listener_name,
            _shutdown: shutdown,
            _permit: permit,
        };
        // Boxed, as TLS below: a relay's state is not what HTTP connections should pay for.
        return Box::pin(super::tcp::serve(conn, tcp)).await;
    }
    let conn = Conn { peer, local, shared, listener_name, stats, shutdown, permit };
    if let Some(tls) = tls {
        // Boxed: a handshake and a TLS stream are large, and a task is as big as its
        // largest state, so inline they would make every plain connection pay for them.
        return Box::pin(serve_tls(stream, tls, conn, protocols, timeouts)).await;
    }
    let mut shutdown = conn.shutdown.clone();
    // Shutdown does not close a new connection before its first request (see
    // `client::first_request`).
    let h2 = match super::client::first_request(sniff(&stream), timeouts.request_header, &mut shutdown).await {
        Some(Some(h2)) => h2,
        Some(None) => return,
        None => {
            tracing::debug!(%peer, "closing connection: nothing received in time");
            return;
        }
    };
    if !h2 {
        return super::native::conn::serve(conn.native(stream)).await;
    }
    // Boxed: hyper's connection is a large future, and a task is as big as its largest
    // state, so inline it would make every native-path connection pay for it too.
    Box::pin(serve_h2(stream, false, conn, &protocols)).await;
}

/// What the PROXY protocol step found at the start of a connection.
enum ProxyIn {
    /// Serve it: with the client address a header carried (`None`: the socket's peer),
    /// and the address the client connected to, when the header said.
    Peer { source: Option<SocketAddr>, destination: Option<SocketAddr> },
    /// Close it and count it: a header that is malformed, late, or from a source not
    /// trusted to send one, or none where one is required.
    Refused(&'static str),
    /// The client left, sent nothing in time on an HTTP listener, or Tether is shutting down.
    Gone,
}

/// Reads a PROXY protocol header at the start of a connection on a listener with
/// `proxy_protocol` on, within `request_header`, and only its bytes: they are peeked at
/// until [`proxy_header::parse`](crate::proxy_header::parse) has a verdict, then exactly
/// the header is read, so what follows (a ClientHello, an HTTP request) is still the
/// socket's for the steps after. A partial header is waited on by readiness, as `sniff`
/// does, never polled.
///
/// From a trusted source a header is taken (`optional`: or its absence); from anyone else
/// a connection that begins with one is refused, and one that does not is served with
/// its own address. A `tcp` listener whose client sends nothing in time (a protocol in
/// which the server speaks first) goes on without a header, unless one is required.
async fn proxy_in(
    stream: &TcpStream,
    pp: &crate::config::ProxyProtocol,
    peer: SocketAddr,
    tcp: bool,
    within: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> ProxyIn {
    use crate::proxy_header::Parsed;
    let trusted = pp.trusts(peer.ip());
    let mut buf = super::native::buffers::Buf::take();
    // Shutdown shortens the wait to `LAST_CALL` rather than ending it, as for a new
    // connection's first request (`client::first_request`).
    let mut stopping = *shutdown.borrow();
    let within = if stopping { within.min(super::client::LAST_CALL) } else { within };
    let deadline = tokio::time::sleep(within);
    tokio::pin!(deadline);
    let mut seen = 0;
    let mut peek = Box::pin(peek_header(stream, buf.spare(), &mut seen));
    let peeked = loop {
        tokio::select! {
            r = &mut peek => break r,
            _ = &mut deadline => {
                drop(peek);
                if seen > 0 {
                    return ProxyIn::Refused("no whole header within request_header");
                }
                if trusted && pp.required {
                    return ProxyIn::Refused("no header within request_header");
                }
                if !tcp {
                    tracing::debug!(%peer, "closing connection: nothing received within {within:?}");
                    return ProxyIn::Gone;
                }
                return ProxyIn::Peer { source: None, destination: None };
            }
            _ = shutdown.changed(), if !stopping => {
                stopping = true;
                let last = tokio::time::Instant::now() + super::client::LAST_CALL;
                if last < deadline.deadline() {
                    deadline.as_mut().reset(last);
                }
            }
        }
    };
    drop(peek);
    let Some(verdict) = peeked else { return ProxyIn::Gone };
    match verdict {
        Parsed::NotProxy if trusted && pp.required => ProxyIn::Refused("no header from a trusted source"),
        Parsed::NotProxy => ProxyIn::Peer { source: None, destination: None },
        Parsed::Partial => ProxyIn::Gone,
        Parsed::Invalid(why) => ProxyIn::Refused(why),
        Parsed::Whole { .. } if !trusted => ProxyIn::Refused("header from a source not in proxy_protocol_from"),
        Parsed::Whole { len, source, destination } => match take(stream, &mut buf.spare()[..len]) {
            Ok(()) => ProxyIn::Peer { source, destination },
            Err(_) => ProxyIn::Gone,
        },
    }
}

/// Peeks at the connection's first bytes (at most a header's worth) until they hold a
/// verdict on a PROXY header; `seen` is how many there were at the last look. `None`: the
/// client left, or the socket failed.
async fn peek_header(stream: &TcpStream, buf: &mut [u8], seen: &mut usize) -> Option<crate::proxy_header::Parsed> {
    use crate::proxy_header::{parse, Parsed, MAX};
    let buf = &mut buf[..MAX];
    loop {
        let ready = stream.ready(Interest::READABLE).await.ok()?;
        let looked = stream.try_io(Interest::READABLE, || {
            let n = super::peek(stream, buf)?;
            if n == 0 {
                return Ok(None);
            }
            *seen = n;
            match parse(&buf[..n]) {
                // Wait for more: readiness is cleared as of before this peek.
                Parsed::Partial => Err(io::ErrorKind::WouldBlock.into()),
                v => Ok(Some(v)),
            }
        });
        match looked {
            Ok(v) => return v,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if ready.is_read_closed() {
                    return None;
                }
            }
            Err(_) => return None,
        }
    }
}

/// Reads exactly `buf.len()` bytes that a peek has already seen in the socket's receive
/// queue, so the read cannot come up short or wait.
fn take(stream: &TcpStream, buf: &mut [u8]) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match stream.try_read(&mut buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A client connection once accepted: what serving it needs besides its stream.
struct Conn {
    peer: SocketAddr,
    /// The address the client connected to, for PROXY protocol headers to backends.
    local: Option<SocketAddr>,
    shared: Arc<Shared>,
    listener_name: Arc<str>,
    stats: Arc<ListenerStats>,
    shutdown: watch::Receiver<bool>,
    permit: ConnPermit,
}

impl Conn {
    /// The native HTTP/1 path's view of the connection.
    fn native<S>(self, stream: S) -> super::native::conn::Client<S> {
        let peer_ip = crate::net::canonical(self.peer.ip()).to_string().into_boxed_str();
        super::native::conn::Client {
            stream,
            peer: self.peer,
            shared: self.shared,
            local: self.local,
            listener: self.listener_name,
            stats: self.stats,
            peer_ip,
            own_backend: None,
            shutdown: self.shutdown,
            _permit: self.permit,
        }
    }
}

/// Terminates TLS (the handshake within `request_header`), then serves what ALPN chose:
/// HTTP/2 for `h2`, HTTP/1.1 on the native path otherwise.
async fn serve_tls(
    stream: TcpStream,
    tls: Arc<crate::tls::ServerTls>,
    conn: Conn,
    protocols: Arc<Protocols>,
    timeouts: Timeouts,
) {
    let mut shutdown = conn.shutdown.clone();
    let accept = tokio_rustls::TlsAcceptor::from(tls.config.clone()).accept(stream);
    let stream = match super::client::first_request(accept, timeouts.request_header, &mut shutdown).await {
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            tracing::debug!(peer = %conn.peer, "TLS handshake failed: {e}");
            conn.stats.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
            return;
        }
        None => {
            tracing::debug!(peer = %conn.peer, "closing connection: no TLS handshake in time");
            return;
        }
    };
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        serve_h2(stream, true, conn, &protocols).await;
    } else {
        super::native::conn::serve(conn.native(stream)).await;
    }
}

/// Serves an HTTP/2 connection with hyper's server until it ends.
async fn serve_h2<S>(stream: S, tls: bool, conn: Conn, protocols: &Protocols)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (timeouts, limits) = {
        let snapshot = conn.shared.snapshot.load();
        (snapshot.config.timeouts, snapshot.config.limits)
    };
    let state = Arc::new(ConnState::new(&timeouts));
    state.set_h2();
    let ip = crate::net::canonical(conn.peer.ip()).to_string();
    let (peer, shutdown) = (conn.peer, conn.shutdown.clone());
    let cx = Arc::new(ConnCx {
        shared: conn.shared,
        listener_name: conn.listener_name,
        peer,
        local: conn.local,
        peer_ip: HeaderValue::from_str(&ip).unwrap_or(HeaderValue::from_static("unknown")),
        tls,
        state: state.clone(),
        stats: conn.stats,
        _shutdown: conn.shutdown,
        _permit: conn.permit,
    });
    let io = TokioIo::new(Timed { io: stream, state: state.clone() });
    let service = service_fn(move |req| super::request::handle(req, cx.clone()));
    let own;
    let h2 = if limits.h2_max_concurrent_streams == protocols.h2_streams {
        &protocols.h2
    } else {
        let mut b = protocols.h2.clone();
        b.max_concurrent_streams(limits.h2_max_concurrent_streams);
        own = b;
        &own
    };
    let conn = h2.serve_connection(io, service);
    drive(conn, |c| c.graceful_shutdown(), &state, shutdown, peer, &timeouts).await;
}

/// Runs a hyper connection to its end while enforcing the connection's deadlines and
/// the shutdown signal. Returning drops the connection, and with it the socket and any
/// response being sent (whose `Outcome` then ends the request).
async fn drive<F, G>(
    conn: F,
    graceful: G,
    state: &ConnState,
    mut shutdown: watch::Receiver<bool>,
    peer: SocketAddr,
    timeouts: &Timeouts,
) where
    F: std::future::Future<Output = Result<(), hyper::Error>>,
    G: Fn(Pin<&mut F>),
{
    let mut conn = std::pin::pin!(conn);
    let sleep = tokio::time::sleep_until(state.deadline());
    let mut sleep = std::pin::pin!(sleep);
    let mut closing = false;
    loop {
        // The connection is polled in this task, so a write that starts waiting is seen
        // here at once: the poll then ends early (`None`) and the timer is brought forward
        // to when the wait runs out of `client_send`.
        let waiting = state.send_deadline().is_some();
        let polled = std::future::poll_fn(|cx| match conn.as_mut().poll(cx) {
            Poll::Ready(r) => Poll::Ready(Some(r)),
            Poll::Pending if !waiting && state.send_deadline().is_some() => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        });
        tokio::select! {
            r = polled => match r {
                Some(r) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "client connection ended: {e}");
                    }
                    return;
                }
                None => {
                    if let Some(at) = state.send_deadline().filter(|at| *at < sleep.deadline()) {
                        sleep.as_mut().reset(at);
                    }
                }
            },
            _ = shutdown.changed(), if !closing => {
                closing = true;
                graceful(conn.as_mut());
            }
            _ = &mut sleep => match state.check(Instant::now()) {
                Check::Wait(at) => sleep.as_mut().reset(at),
                Check::HeadTimeout => {
                    tracing::debug!(%peer, "closing connection: request head not received within {:?}", timeouts.request_header);
                    return;
                }
                Check::SendTimeout => {
                    tracing::debug!(%peer, "closing connection: the client read nothing of its response for {:?}", timeouts.client_send);
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

//! One client connection: tell HTTP/1.1 from h2c, serve it with hyper, and enforce its
//! deadlines (kept by [`client::ConnState`](super::client::ConnState)) and the shutdown
//! signal.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::client::{Check, ConnCx, ConnState, Timed};
use crate::state::{ListenerStats, Shared};

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
    stats: Arc<ListenerStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    stats.connections.fetch_add(1, Ordering::Relaxed);
    struct Open(Arc<ListenerStats>);
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
    let ip = crate::net::canonical(peer.ip()).to_string();
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
    let service = service_fn(move |req| super::request::handle(req, cx.clone()));
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

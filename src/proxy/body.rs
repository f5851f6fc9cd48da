//! The response body Tether sends to a client, and the [`Outcome`] that settles a request
//! when that body ends.
//!
//! A request is finished when hyper drops the response body: after its last byte was
//! written, or when the client went away. Dropping the [`Outcome`] then does everything a
//! finished request owes, in one place and exactly once: the backend's in-flight count goes
//! down, a backend connection whose response was read to the end goes back to the idle
//! pool, the client connection's idle timer starts, and the access log line is written.
//!
//! A backend's body that sends nothing more for `backend_body` ends with an error: hyper
//! then closes the client's connection (its response is cut short), and the backend's
//! connection is dropped, never pooled.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::backside::Backside;
use super::client::ConnCx;
use super::refusal::LateFailure;
use crate::access_log::Record;
use crate::affinity::rebalance::Active;
use crate::affinity::verdict::Verdict;
use crate::backend::Backend;
use crate::upstream::{BodyTimeout, BoxError, H2Stream, Stall};
use hyper::body::Incoming;

/// What is known about a request while it is served; settled on drop.
#[derive(Debug)]
pub struct Outcome {
    pub cx: Arc<ConnCx>,
    pub started: Instant,
    pub start_millis: u64,
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub status: u16,
    pub pool: Option<Arc<str>>,
    pub backend: Option<Arc<Backend>>,
    pub upstream: Option<Duration>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub error: Option<&'static str>,
    pub verdict: Verdict,
    /// The session's pseudonym in the access log, when it is on.
    pub session: Option<u64>,
    /// The request was sent again to another backend after a broken connection.
    pub retried: bool,
    /// A `max_connections` slot, held until the response ends.
    pub slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The session's request in flight, for a pool that rebalances idle sessions.
    pub active: Option<Active>,
}

impl Outcome {
    pub fn new(cx: Arc<ConnCx>, method: Method, uri: Uri, version: Version) -> Outcome {
        cx.state.begin();
        cx.stats.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let start_millis = if cx.shared.access_log.enabled() { crate::time::unix_millis() } else { 0 };
        Outcome {
            cx,
            started: Instant::now(),
            start_millis,
            method,
            uri,
            version,
            status: 0,
            pool: None,
            backend: None,
            upstream: None,
            bytes_in: 0,
            bytes_out: 0,
            error: None,
            verdict: Verdict::Off,
            session: None,
            retried: false,
            slot: None,
            active: None,
        }
    }

    /// Charges the request to `backend` (its in-flight count goes up until drop).
    pub fn set_backend(&mut self, backend: &Arc<Backend>) {
        if let Some(old) = self.backend.replace(backend.clone()) {
            old.release();
        }
        backend.acquire();
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if let Some(b) = &self.backend {
            b.release();
            b.count(self.verdict);
            b.metrics.record(self.status, self.started.elapsed());
        }
        self.cx.state.end();
        let log = &self.cx.shared.access_log;
        if log.enabled() {
            log.write(&Record {
                start_millis: self.start_millis,
                client: self.cx.peer,
                listener: &self.cx.listener_name,
                method: self.method.as_str(),
                uri: &self.uri.to_string(),
                version: crate::access_log::version(self.version),
                status: self.status,
                pool: self.pool.as_deref(),
                backend: self.backend.as_ref().map(|b| b.name.as_str()),
                upstream: self.upstream,
                total: self.started.elapsed(),
                bytes_in: self.bytes_in,
                bytes_out: self.bytes_out,
                error: self.error,
                affinity: self.verdict.as_str(),
                session: self.session,
            });
        }
    }
}

/// A response body: the backend's, streamed, or one Tether wrote itself.
#[derive(Debug)]
pub struct ProxyBody {
    inner: Inner,
    outcome: Option<Outcome>,
}

#[derive(Debug)]
enum Inner {
    /// The backend's body, each wait for its next piece bounded by `backend_body`.
    Backend(Box<Backside>, Stall),
    /// An HTTP/2 backend's body (trailers included), and the stream's place on its
    /// shared connection, given back when the body ends.
    H2 {
        body: Incoming,
        _stream: H2Stream,
        stall: Stall,
    },
    Full(Option<Bytes>),
}

impl ProxyBody {
    /// The backend's body, each wait for its next piece lasting at most `backend_body`.
    pub fn backend(back: Backside, outcome: Outcome, backend_body: Duration) -> ProxyBody {
        let mut b =
            ProxyBody { inner: Inner::Backend(Box::new(back), Stall::new(backend_body)), outcome: Some(outcome) };
        b.settle_if_read();
        b
    }

    /// An HTTP/2 backend's body, each wait for its next frame lasting at most `backend_body`.
    pub fn h2(body: Incoming, stream: H2Stream, outcome: Outcome, backend_body: Duration) -> ProxyBody {
        ProxyBody {
            inner: Inner::H2 { body, _stream: stream, stall: Stall::new(backend_body) },
            outcome: Some(outcome),
        }
    }

    pub fn full(data: Bytes, outcome: Option<Outcome>) -> ProxyBody {
        let data = if data.is_empty() { None } else { Some(data) };
        ProxyBody { inner: Inner::Full(data), outcome }
    }

    /// Ends the request on a failed body (`label` in the access log): the backend's
    /// connection is closed, never pooled.
    fn failed(&mut self, label: &'static str, e: BoxError) -> BoxError {
        if let Some(o) = &mut self.outcome {
            o.error = Some(label);
        }
        tracing::debug!("response body failed: {e}");
        self.inner = Inner::Full(None);
        self.outcome = None;
        e
    }

    /// Once the backend's body has been read to its end, its connection goes back to the
    /// idle stack at once (if it is in step), even before the last piece is written.
    fn settle_if_read(&mut self) {
        if matches!(&self.inner, Inner::Backend(b, _) if b.is_end()) {
            if let Inner::Backend(b, _) = std::mem::replace(&mut self.inner, Inner::Full(None)) {
                b.settle();
            }
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.inner {
            Inner::Full(data) => {
                let frame = data.take().map(|d| {
                    if let Some(o) = &mut this.outcome {
                        o.bytes_out += d.len() as u64;
                    }
                    Ok(Frame::data(d))
                });
                if frame.is_none() {
                    // The request ends here.
                    this.outcome = None;
                }
                Poll::Ready(frame)
            }
            Inner::Backend(back, stall) => match back.poll_data(cx) {
                Poll::Pending => {
                    if stall.poll_expired(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let e = BodyTimeout { from: "backend's response", after: stall.limit() };
                    Poll::Ready(Some(Err(this.failed(LateFailure::BackendBody.label(), e.into()))))
                }
                Poll::Ready(Ok(Some(d))) => {
                    stall.arrived();
                    if let Some(o) = &mut this.outcome {
                        o.bytes_out += d.len() as u64;
                    }
                    this.settle_if_read();
                    Poll::Ready(Some(Ok(Frame::data(d))))
                }
                Poll::Ready(Ok(None)) => {
                    this.settle_if_read();
                    this.outcome = None;
                    Poll::Ready(None)
                }
                Poll::Ready(Err(label)) => Poll::Ready(Some(Err(this.failed(label, label.into())))),
            },
            Inner::H2 { body, stall, .. } => match Pin::new(body).poll_frame(cx) {
                Poll::Pending => {
                    if stall.poll_expired(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let e = BodyTimeout { from: "backend's response", after: stall.limit() };
                    Poll::Ready(Some(Err(this.failed(LateFailure::BackendBody.label(), e.into()))))
                }
                Poll::Ready(Some(Ok(frame))) => {
                    stall.arrived();
                    if let (Some(d), Some(o)) = (frame.data_ref(), &mut this.outcome) {
                        o.bytes_out += d.len() as u64;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(None) => {
                    this.inner = Inner::Full(None);
                    this.outcome = None;
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Err(e))) => {
                    let label = LateFailure::BackendBody.label();
                    Poll::Ready(Some(Err(this.failed(label, e.into()))))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(d) => d.is_none(),
            Inner::Backend(b, _) => b.is_end(),
            Inner::H2 { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Backend(b, _) => b.remaining().map_or_else(SizeHint::default, SizeHint::with_exact),
            Inner::H2 { body, .. } => body.size_hint(),
        }
    }
}

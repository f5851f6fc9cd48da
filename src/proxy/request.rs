//! One request, start to end, as named steps: [`route`] it to a pool, [`decide`] its
//! backend, [`send`] it (acquiring a `max_connections` slot, a connection, and moving to
//! another backend where that is safe), then [`respond`]. Any step may refuse with a
//! [`Refusal`]; [`reply`] is the one place that turns a refusal into a response.
//!
//! The request body is never read here: it streams to the backend as hyper's `Incoming`,
//! and the response streams back in a [`ProxyBody`]. What a request owes when it ends
//! (in-flight count, pooled connection, access log) is settled by its [`Outcome`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::backside::{poll_exchange, write_head, Backside, Framing, HeadFail, Upload, UploadError};
use super::body::{Outcome, ProxyBody};
use super::client::ConnCx;
use super::native::buffers::{Buf, Work};
use super::refusal::Refusal;
use super::rewrite;
use crate::affinity::{Decision, HttpKeys, Target};
use crate::backend::health::passive_failure;
use crate::backend::Backend;
use crate::config::Timeouts;
use crate::pool::{Pool, Routes, Snapshot};
use crate::upstream::{BackendConn, BodyState, ConnectError, H2Body, H2Stream, RequestBody};

/// Set on every response Tether writes itself, so a client can tell it from the backend's.
pub static TETHER_ERROR: HeaderName = HeaderName::from_static("tether-error");

/// Attempts on stale pooled connections before a fresh one is opened.
const STALE_RETRIES: usize = 2;

/// The hyper service: every request gets a response, never an error.
pub async fn handle(req: Request<Incoming>, cx: Arc<ConnCx>) -> Result<Response<ProxyBody>, Infallible> {
    let snapshot = cx.shared.snapshot.load_full();
    let mut out = Outcome::new(cx.clone(), req.method().clone(), req.uri().clone(), req.version());
    Ok(match forward(req, &snapshot, &cx, &mut out).await {
        Ok(Forwarded { response, back }) => respond(response, back, out, &snapshot.config.timeouts),
        Err(refusal) => reply(out, refusal),
    })
}

/// A backend's response head, with what it takes to stream it.
struct Forwarded {
    response: Response<()>,
    back: Back,
}

/// Where the rest of a backend's response comes from.
enum Back {
    /// An HTTP/1.1 backend connection.
    H1(Backside),
    /// A stream on a shared HTTP/2 backend connection.
    H2(Incoming, H2Stream),
}

/// Route, decide, rewrite, send; on the response, passive health and persistence.
async fn forward(
    mut req: Request<Incoming>,
    snap: &Snapshot,
    cx: &Arc<ConnCx>,
    out: &mut Outcome,
) -> Result<Forwarded, Refusal> {
    let (routes, pool, host) = route(&req, snap, cx)?;
    out.pool = Some(pool.name.clone());
    // A body whose length is known (`Content-Length`) is refused before anything is sent;
    // a chunked one as soon as it passes the limit (`RequestBody`).
    if let Some(limit) = snap.config.limits.max_request_body {
        if req.body().size_hint().lower() > limit {
            return Err(Refusal::BodyTooLarge { limit });
        }
    }
    let trusted = routes.trusted_proxies.iter().any(|c| c.contains(crate::net::canonical(cx.peer.ip())));
    let now_ms = if pool.affinity.is_some() { crate::time::unix_millis() } else { 0 };
    if let Some(wait) = shared_lookup(pool, routes, cx, &req, trusted) {
        wait.await;
    }
    let mut decision = decide(pool, routes, cx, &req, trusted, now_ms);
    out.verdict = decision.verdict;
    out.session = cx.shared.access_log.pseudonym(decision.identity());
    out.active = pool.affinity.as_ref().and_then(|a| a.begin(&decision, now_ms));
    pool.note_session(&decision);
    // Read before the rewrite replaces an untrusted client's X-Forwarded-Proto.
    let https = cx.tls || rewrite::forwarded_https(req.headers(), trusted);
    // `TE: trailers` is hop-by-hop, but an HTTP/2 backend needs to know the client takes
    // trailers (gRPC servers insist on it), so it is passed on to one.
    let te_trailers = rewrite::asks_for_trailers(req.headers());
    rewrite::request(&mut req, cx, host, trusted);
    if let Some(a) = &pool.affinity {
        rewrite::for_affinity(req.headers_mut(), a, decision.verdict);
    }
    out.bytes_in = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
    let index = match decision.target {
        Target::Use(i) => i,
        Target::Strict(reason) => return Err(Refusal::SessionUnavailable(reason)),
        Target::NoBackend => return Err(Refusal::NoBackend),
    };
    pool.retry_budget.deposit(pool.config.retry_budget);
    if pool.upstreams[index].is_http2() {
        if te_trailers {
            req.headers_mut().insert(header::TE, HeaderValue::from_static("trailers"));
        }
        let (parts, body) = req.into_parts();
        let replay = pool.config.retries > 0 && is_idempotent(&parts.method) && body.is_end_stream();
        let mut attempt = Attempt::new(pool, &parts, index, now_ms, replay);
        let (body, body_state) =
            RequestBody::client(body, snap.config.timeouts.client_body, snap.config.limits.max_request_body);
        attempt.body = body_state;
        attempt.max_body = snap.config.limits.max_request_body.unwrap_or(u64::MAX);
        let (response, stream) = send_h2(parts, body, &mut attempt, &mut decision, out, &snap.config.timeouts).await?;
        let (head, body) = response.into_parts();
        let response = Response::from_parts(head, ());
        let back = Back::H2(body, stream);
        return finish(response, back, attempt.index, pool, routes, &decision, https).await;
    }
    let (mut parts, body) = req.into_parts();
    let framing = Framing::of(&parts.method, &parts.headers, &body);
    // Only an idempotent request without a body can be sent again after a connection
    // that broke before its response: its head is written again from `parts`, so nothing
    // is copied for the chance.
    let replay = pool.config.retries > 0 && is_idempotent(&parts.method) && body.is_end_stream();
    let mut attempt = Attempt::new(pool, &parts, index, now_ms, replay);
    let (body, body_state) =
        RequestBody::client(body, snap.config.timeouts.client_body, snap.config.limits.max_request_body);
    attempt.body = body_state;
    attempt.max_body = snap.config.limits.max_request_body.unwrap_or(u64::MAX);
    attempt.proxy_header = super::proxy_header(pool, cx.peer, cx.local);
    let upload = Upload::new(body, framing);
    let max_head = snap.config.limits.max_request_head as usize;
    let back =
        send(&mut parts, upload, framing, &mut attempt, &mut decision, out, &snap.config.timeouts, max_head).await?;
    let index = attempt.index;
    let Some(response) = back.response_head(out.version) else {
        return Err(Refusal::BackendFailed { backend: pool.backends[index].name.clone() });
    };
    finish(response, Back::H1(back), index, pool, routes, &decision, https).await
}

/// The backend's response head: passive health, persistence, HSTS.
async fn finish(
    mut response: Response<()>,
    back: Back,
    index: usize,
    pool: &Pool,
    routes: &Routes,
    decision: &Decision,
    https: bool,
) -> Result<Forwarded, Refusal> {
    let status = response.status().as_u16();
    if status >= 500 {
        let why = format!("status {status}");
        passive_failure(&pool.backends, index, pool.config.health.as_ref(), &why);
    } else {
        pool.backends[index].passive_success();
    }
    if let Some(a) = &pool.affinity {
        if let Some(link) = &pool.shared {
            let learned = if a.learns() {
                a.learn_new(crate::affinity::keys::http_set_cookies(response.headers()), index)
            } else {
                Vec::new()
            };
            if let Some(wait) = link.after(&pool.backends, decision, &learned, index) {
                wait.await;
            }
        }
        rewrite::persist(response.headers_mut(), a, decision, index, https);
    }
    if let Some(hsts) = routes.hsts.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
        response.headers_mut().entry(header::STRICT_TRANSPORT_SECURITY).or_insert(hsts);
    }
    Ok(Forwarded { response, back })
}

/// Step 1: what can be proxied at all, and the pool it goes to (by host, then path).
fn route<'s>(
    req: &Request<Incoming>,
    snap: &'s Snapshot,
    cx: &ConnCx,
) -> Result<(&'s Routes, &'s Pool, Option<HeaderValue>), Refusal> {
    if req.method() == Method::CONNECT {
        return Err(Refusal::ConnectUnsupported);
    }
    let uri = req.uri();
    // RFC 9112 section 3.2: the authority form is for CONNECT only, the asterisk form for
    // OPTIONS only.
    if uri.scheme().is_none() && uri.authority().is_some() {
        return Err(Refusal::BadRequest("an authority-form request target is only for CONNECT"));
    }
    let asterisk = uri.path() == "*" && uri.authority().is_none();
    if asterisk && req.method() != Method::OPTIONS {
        return Err(Refusal::BadRequest("an asterisk-form request target is only for OPTIONS"));
    }
    let limit = snap.config.limits.max_request_target;
    if target_len(uri) > limit as usize {
        return Err(Refusal::TargetTooLong { limit });
    }
    transfer_coding(req.headers())?;
    let host = rewrite::host_of(req).map_err(Refusal::BadRequest)?;
    let routes = snap.listener(&cx.listener_name).ok_or(Refusal::NoListener)?;
    if let Some(port) = routes.redirect_to_https {
        let host = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("");
        let target = uri.path_and_query().map_or("/", |p| p.as_str());
        let target = if target.starts_with('/') { target } else { "/" };
        return Err(Refusal::https_redirect(host, port, target));
    }
    let host_name = host.as_ref().and_then(|h| h.to_str().ok()).map_or("", crate::net::strip_port);
    // `OPTIONS *` asks about the server as a whole: it goes where `/` goes.
    let path = if asterisk { "/" } else { uri.path() };
    let Some(to) = routes.route(host_name, path) else {
        return Err(Refusal::NoRoute { host: host_name.to_string(), path: path.to_string() });
    };
    let client_ip = || {
        let trusted = routes.trusted_proxies.iter().any(|c| c.contains(crate::net::canonical(cx.peer.ip())));
        rewrite::client_ip(cx.peer.ip(), req.headers(), &routes.trusted_proxies, trusted)
    };
    let pool = snap.pool_of(to, &HttpKeys::new(req.headers(), req.uri()), client_ip);
    Ok((routes, pool, host))
}

/// The length of the request target as the client sent it (for HTTP/2, of its scheme,
/// authority and path together).
fn target_len(uri: &Uri) -> usize {
    uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len())
}

/// A request's transfer codings must be `chunked` alone. hyper has already refused a list
/// whose final coding is not `chunked` (RFC 9112 section 6.3); `chunked` applied twice is
/// malformed (section 7), and any other coding is one Tether does not implement (section
/// 6.1: 501), since it would be lost on the way to the backend.
fn transfer_coding(headers: &HeaderMap) -> Result<(), Refusal> {
    if !headers.contains_key(header::TRANSFER_ENCODING) {
        return Ok(());
    }
    let (mut chunked, mut other) = (0, false);
    for coding in headers.get_all(header::TRANSFER_ENCODING).iter().flat_map(|v| v.as_bytes().split(|&c| c == b',')) {
        let coding = coding.trim_ascii();
        if coding.eq_ignore_ascii_case(b"chunked") {
            chunked += 1;
        } else if !coding.is_empty() {
            other = true;
        }
    }
    if chunked > 1 {
        return Err(Refusal::BadRequest("the chunked transfer coding is applied more than once"));
    }
    if other {
        return Err(Refusal::UnsupportedTransferCoding);
    }
    Ok(())
}

/// Step 2, first half, for a pool that shares its pins (`store`): the table keys the
/// request carries that this instance does not know, looked up in the shared store.
fn shared_lookup(
    pool: &Pool,
    routes: &Routes,
    cx: &ConnCx,
    req: &Request<Incoming>,
    trusted: bool,
) -> Option<crate::store::Wait> {
    let (link, a) = (pool.shared.as_ref()?, pool.affinity.as_ref()?);
    let client = rewrite::client_ip(cx.peer.ip(), req.headers(), &routes.trusted_proxies, trusted);
    link.before(a, &pool.backends, &a.table_pins(&HttpKeys::new(req.headers(), req.uri()), client))
}

/// Step 2: the backend, by the pool's affinity or, without one, its balancer.
fn decide(pool: &Pool, routes: &Routes, cx: &ConnCx, req: &Request<Incoming>, trusted: bool, now_ms: u64) -> Decision {
    match &pool.affinity {
        Some(a) => {
            let client = rewrite::client_ip(cx.peer.ip(), req.headers(), &routes.trusted_proxies, trusted);
            a.decide(&pool.group(), &HttpKeys::new(req.headers(), req.uri()), client, now_ms)
        }
        None => Decision::plain(pool.group().pick(None)),
    }
}

/// Where a request is in its attempts to reach a backend.
struct Attempt<'p> {
    pool: &'p Pool,
    /// The backend being tried.
    index: usize,
    /// Moves to another backend still allowed (the pool's `retries`, at least one for a
    /// failed connect).
    moves_left: u32,
    /// Pooled connections found closed so far on this backend.
    stale: usize,
    /// An idempotent request without a body: it can be sent again after a connection that
    /// broke before any response byte.
    replay: bool,
    /// How reading the client's body went, for a request with one: a send that failed
    /// because of it is the client's fault, not the backend's.
    body: Option<Arc<BodyState>>,
    now_ms: u64,
    /// The request has no `Host` (HTTP/1.0 allows that); each backend it goes to gets
    /// its own address as `Host`, so that what it receives is valid HTTP/1.1.
    no_host: bool,
    /// `limits.max_request_body`, for the refusal of a body found to be over it.
    max_body: u64,
    /// The PROXY protocol header the pool sends first on each connection, for this
    /// request's client connection.
    proxy_header: Option<crate::proxy_header::Header>,
}

impl<'p> Attempt<'p> {
    fn new(pool: &'p Pool, parts: &http::request::Parts, index: usize, now_ms: u64, replay: bool) -> Attempt<'p> {
        let no_host = !parts.headers.contains_key(header::HOST);
        Attempt {
            pool,
            index,
            moves_left: pool.config.retries.max(1),
            stale: 0,
            replay,
            body: None,
            now_ms,
            no_host,
            max_body: u64::MAX,
            proxy_header: None,
        }
    }

    fn backend(&self) -> &'p Arc<Backend> {
        &self.pool.backends[self.index]
    }

    /// Moves to another backend, within the pool's retries and retry budget, re-pinning
    /// the session there; `false` when there is none to move to.
    fn move_on(&mut self, decision: &mut Decision, out: &mut Outcome) -> bool {
        if self.moves_left == 0 {
            return false;
        }
        let Some(next) = self.pool.move_from(self.index, decision, self.now_ms) else { return false };
        self.moves_left -= 1;
        self.index = next;
        self.stale = 0;
        // The old backend's `max_connections` slot goes back before the new one is waited for.
        out.slot = None;
        out.verdict = decision.verdict;
        true
    }

    /// A connect to the current backend failed: a strike against it when it was its fault,
    /// and the request moves to another (`Ok`, its headers saying why) or is refused.
    fn connect_failed(
        &mut self,
        error: ConnectError,
        decision: &mut Decision,
        out: &mut Outcome,
        headers: &mut HeaderMap,
    ) -> Result<(), Refusal> {
        let (pool, backend) = (self.pool, self.backend());
        tracing::warn!(pool = %pool.name, backend = %backend.name, address = %backend.address_text, "{error}");
        if error.is_backend_fault() {
            passive_failure(&pool.backends, self.index, pool.config.health.as_ref(), &error.to_string());
        }
        if self.move_on(decision, out) {
            self.rewrite_moved(headers, decision);
            return Ok(());
        }
        Err(Refusal::Connect { backend: backend.name.clone(), error })
    }

    /// The request headers after a move: the re-pin header says why.
    fn rewrite_moved(&self, headers: &mut HeaderMap, decision: &Decision) {
        if let Some(a) = &self.pool.affinity {
            rewrite::for_affinity(headers, a, decision.verdict);
        }
    }
}

/// Step 3: send to the chosen backend, moving to another where nothing of the request
/// has reached the first (a failed connect) or the request can be sent again whole (an
/// idempotent request without a body whose connection broke before any response byte).
/// A pooled connection found closed before anything of the client's body was taken gets
/// the request again on a fresh connection to the same backend, under the slot it holds.
///
/// Only the backend's own faults count towards passive ejection: a refused, reset or
/// timed-out connect, a connection it broke, a malformed response head, or no answer
/// within `backend_response` after it had the whole request. A client body that failed
/// or is late, and Tether's own errors (out of file descriptors or ports), do not.
// The request's parts and body, its framing, where it is in its attempts, the decision
// to re-pin, the outcome to charge, the deadlines and the head limit: each is a separate
// piece of the caller's state.
#[allow(clippy::too_many_arguments)]
async fn send(
    parts: &mut http::request::Parts,
    mut upload: Upload,
    framing: Framing,
    attempt: &mut Attempt<'_>,
    decision: &mut Decision,
    out: &mut Outcome,
    timeouts: &Timeouts,
    max_head: usize,
) -> Result<Backside, Refusal> {
    let pool = attempt.pool;
    let is_head = parts.method == Method::HEAD;
    let mut work = Work::take();
    loop {
        let backend = attempt.backend();
        out.set_backend(backend);
        if attempt.no_host {
            if let Ok(host) = HeaderValue::from_str(&backend.address_text) {
                parts.headers.insert(header::HOST, host);
            }
        }
        // After a stale connection the slot already held is this backend's; a move to
        // another backend gave the old one back.
        if out.slot.is_none() {
            out.slot = pool.slot(attempt.index).await.map_err(|e| Refusal::of_slot(e, pool, attempt.index))?;
        }
        let header = attempt.proxy_header;
        let (mut conn, reused) = match connection(pool, attempt.index, attempt.stale >= STALE_RETRIES, header).await {
            Ok(c) => c,
            Err(error) => {
                attempt.connect_failed(error, decision, out, &mut parts.headers)?;
                continue;
            }
        };
        work.out.clear();
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        write_head(&mut work.out, &parts.method, target, &parts.headers, framing);
        upload.begin(&work.out);
        let mut rbuf = Buf::take();
        let sent = Instant::now();
        let response = &mut work.response;
        let exchange = std::future::poll_fn(|cx| {
            poll_exchange(cx, &mut conn, &mut upload, &mut rbuf, response, max_head, is_head)
        });
        let fail = match tokio::time::timeout(timeouts.backend_response, exchange).await {
            Ok(Ok(())) => {
                out.upstream = Some(sent.elapsed());
                // A connection that began with a PROXY protocol header is this request's
                // alone: it is closed after it, never pooled.
                let upstream = header.is_none().then(|| pool.upstreams[attempt.index].clone());
                return Ok(Backside::new(conn, work, rbuf, upload, upstream));
            }
            Err(_) => return Err(timed_out(attempt, timeouts.backend_response)),
            Ok(Err(fail)) => fail,
        };
        if reused && fail.is_stale() && !upload.touched() && rbuf.filled().is_empty() {
            // The pooled connection had closed: the request goes again on a fresh one.
            attempt.stale += 1;
            continue;
        }
        // The connection is dropped here, never pooled: after a failed exchange its
        // framing is lost.
        drop(conn);
        broke(attempt, decision, out, &fail, &mut parts.headers)?;
        upload = Upload::new(RequestBody::Empty, framing);
    }
}

/// Step 3 for a pool that speaks HTTP/2 to its backends: the request goes as a stream on
/// a shared connection (`Upstream::h2_stream`), with the same moves as over HTTP/1.1: a
/// failed connect moves to another backend; a request the connection did not take (it
/// was closing) goes again on a fresh one; one that broke before its response moves only
/// when it can be sent again whole.
async fn send_h2(
    mut parts: http::request::Parts,
    body: RequestBody,
    attempt: &mut Attempt<'_>,
    decision: &mut Decision,
    out: &mut Outcome,
    timeouts: &Timeouts,
) -> Result<(Response<Incoming>, H2Stream), Refusal> {
    use http_body_util::BodyExt;
    let pool = attempt.pool;
    let health = pool.config.health.as_ref();
    let scheme = if pool.config.tls.is_some() { http::uri::Scheme::HTTPS } else { http::uri::Scheme::HTTP };
    let host = parts.headers.remove(header::HOST);
    let mut body: H2Body = body.boxed_unsync();
    loop {
        let backend = attempt.backend();
        out.set_backend(backend);
        if out.slot.is_none() {
            out.slot = pool.slot(attempt.index).await.map_err(|e| Refusal::of_slot(e, pool, attempt.index))?;
        }
        let upstream = &pool.upstreams[attempt.index];
        let (mut sender, stream, reused) = match upstream.h2_stream(attempt.stale >= STALE_RETRIES).await {
            Ok(s) => s,
            Err(error) => {
                attempt.connect_failed(error, decision, out, &mut parts.headers)?;
                continue;
            }
        };
        // HTTP/2 names the authority in `:authority`, not `Host`; without one from the
        // client, the backend's address.
        let authority = host.as_ref().and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok());
        let authority = authority.or_else(|| http::uri::Authority::try_from(backend.address_text.as_str()).ok());
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(scheme.clone());
        uri.authority = authority;
        uri.path_and_query =
            parts.uri.path_and_query().cloned().or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
        let mut req = Request::new(std::mem::replace(&mut body, RequestBody::Empty.boxed_unsync()));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() =
            Uri::from_parts(uri).map_err(|_| Refusal::BadRequest("the request target cannot be sent over HTTP/2"))?;
        *req.version_mut() = http::Version::HTTP_2;
        *req.headers_mut() = parts.headers.clone();
        let sent = Instant::now();
        let fail = match tokio::time::timeout(timeouts.backend_response, sender.try_send_request(req)).await {
            Err(_) => return Err(timed_out(attempt, timeouts.backend_response)),
            Ok(Ok(response)) => {
                out.upstream = Some(sent.elapsed());
                return Ok((response, stream));
            }
            Ok(Err(mut e)) => {
                if let Some(req) = e.take_message() {
                    // The connection did not take the request (it was closing): nothing
                    // of it was sent, so it goes again, on a fresh connection if this was
                    // a shared one.
                    body = req.into_body();
                    attempt.stale += usize::from(reused);
                    if reused {
                        continue;
                    }
                }
                e.into_error()
            }
        };
        drop(stream);
        let body_state = attempt.body.as_deref();
        if body_state.is_some_and(BodyState::too_large) {
            return Err(Refusal::BodyTooLarge { limit: attempt.max_body });
        }
        if body_state.is_some_and(BodyState::failed) {
            tracing::info!(pool = %pool.name, backend = %backend.name, "request body failed");
            return Err(Refusal::BadRequestBody);
        }
        let why = format!("HTTP/2: {fail}");
        tracing::warn!(pool = %pool.name, backend = %backend.name, "backend failed: {why}");
        passive_failure(&pool.backends, attempt.index, health, &why);
        if attempt.replay && attempt.move_on(decision, out) {
            out.retried = true;
            attempt.rewrite_moved(&mut parts.headers, decision);
            body = RequestBody::Empty.boxed_unsync();
            continue;
        }
        return Err(Refusal::BackendFailed { backend: backend.name.clone() });
    }
}

/// No response head within `backend_response`: whose fault that is decides the answer,
/// and whether it is a strike against the backend.
fn timed_out(attempt: &Attempt<'_>, after: Duration) -> Refusal {
    let (pool, backend) = (attempt.pool, attempt.backend());
    match attempt.body.as_deref() {
        Some(b) if b.too_large() => Refusal::BodyTooLarge { limit: attempt.max_body },
        Some(b) if b.failed() => Refusal::BadRequestBody,
        Some(b) if b.waiting_on_client() => {
            tracing::info!(pool = %pool.name, backend = %backend.name, "request body still arriving after {after:?}");
            Refusal::RequestBodyTimeout { after }
        }
        Some(b) if !b.done() => {
            // The backend is not reading the body: late, but it never had the whole
            // request, so this is no strike against it.
            tracing::warn!(pool = %pool.name, backend = %backend.name, "no response within {after:?}, request body not fully sent");
            Refusal::BackendTimeout { backend: backend.name.clone(), after }
        }
        _ => {
            tracing::warn!(pool = %pool.name, backend = %backend.name, "no response within {after:?}");
            passive_failure(&pool.backends, attempt.index, pool.config.health.as_ref(), "response timeout");
            Refusal::BackendTimeout { backend: backend.name.clone(), after }
        }
    }
}

/// The exchange failed before a response head. A client body that failed is the client's
/// fault; otherwise it is a strike against the backend, and a request that can be sent
/// again moves to another backend (`Ok`: its headers say why).
fn broke(
    attempt: &mut Attempt<'_>,
    decision: &mut Decision,
    out: &mut Outcome,
    fail: &HeadFail,
    headers: &mut HeaderMap,
) -> Result<(), Refusal> {
    let (pool, backend) = (attempt.pool, attempt.backend());
    let body = attempt.body.as_deref();
    if body.is_some_and(BodyState::too_large) {
        tracing::info!(pool = %pool.name, backend = %backend.name, "request body over limits.max_request_body");
        return Err(Refusal::BodyTooLarge { limit: attempt.max_body });
    }
    if body.is_some_and(BodyState::failed) || matches!(fail, HeadFail::Upload(UploadError::Client)) {
        tracing::info!(pool = %pool.name, backend = %backend.name, "request body failed");
        return Err(Refusal::BadRequestBody);
    }
    let why = fail.describe();
    tracing::warn!(pool = %pool.name, backend = %backend.name, "backend failed: {why}");
    if body.is_some_and(BodyState::waiting_on_client) {
        // It gave up on a client that was slow to send its body: not the backend's fault,
        // so no strike (and no replay: there was a body).
        return Err(Refusal::BackendFailed { backend: backend.name.clone() });
    }
    passive_failure(&pool.backends, attempt.index, pool.config.health.as_ref(), &why);
    if attempt.replay && attempt.move_on(decision, out) {
        out.retried = true;
        attempt.rewrite_moved(headers, decision);
        return Ok(());
    }
    Err(Refusal::BackendFailed { backend: backend.name.clone() })
}

/// A pooled native connection to backend `i` (`true`: reused), or a new one when there is
/// none or `fresh`. A pool that sends PROXY protocol `header`s never shares a connection:
/// each request of an HTTP/2 client gets a new one, with the header first.
async fn connection(
    pool: &Pool,
    i: usize,
    fresh: bool,
    header: Option<crate::proxy_header::Header>,
) -> Result<(BackendConn, bool), ConnectError> {
    let upstream = &pool.upstreams[i];
    if let Some(header) = header {
        return upstream.connect(Some(header.as_bytes())).await.map(|s| (s, false));
    }
    if !fresh {
        if let Some(s) = upstream.take_idle() {
            return Ok((s, true));
        }
    }
    upstream.connect(None).await.map(|s| (s, false))
}

/// RFC 9110 section 9.2.2.
fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// Step 4: the backend's response becomes the client's, streamed. HTTP/2 has no
/// upgrades (Tether does not offer extended CONNECT), so a `101` answers a request that
/// asked for none: a broken backend.
fn respond(response: Response<()>, back: Back, mut out: Outcome, timeouts: &Timeouts) -> Response<ProxyBody> {
    out.status = response.status().as_u16();
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return reply(out, Refusal::UnaskedSwitch);
    }
    let (parts, ()) = response.into_parts();
    let body = match back {
        Back::H1(back) => ProxyBody::backend(back, out, timeouts.backend_body),
        Back::H2(body, stream) => ProxyBody::h2(body, stream, out, timeouts.backend_body),
    };
    Response::from_parts(parts, body)
}

/// A response Tether writes itself: plain text naming what went wrong, marked with
/// `Tether-Error` so nobody mistakes it for the application's.
pub fn reply(mut out: Outcome, refusal: Refusal) -> Response<ProxyBody> {
    let status = refusal.status();
    let msg = refusal.message(out.pool.as_deref().unwrap_or(""));
    out.status = status.as_u16();
    out.error = Some(refusal.label());
    let body = format!("{} {}: {msg}\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
    let mut r = Response::new(ProxyBody::full(Bytes::from(body), Some(out)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(TETHER_ERROR.clone(), HeaderValue::from_static(refusal.label()));
    if let Some(location) = refusal.location().and_then(|l| HeaderValue::from_str(l).ok()) {
        h.insert(header::LOCATION, location);
    }
    if status.is_client_error() || status == StatusCode::NOT_IMPLEMENTED {
        // After a request Tether could not make sense of, the connection's framing is not
        // to be trusted either.
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

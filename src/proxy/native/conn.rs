//! One client HTTP/1 connection on the native path, from its first request to its close.
//!
//! A connection waiting for its next request holds its socket and nothing else: no buffer,
//! no parsed head. When bytes arrive it takes a [`Buf`] and a [`Work`] from its thread's
//! free lists, reads the head, and runs the request's steps (route, decide, send with
//! moves to another backend, respond), then gives both back. The task's own state is
//! small because everything large lives in those pooled objects.
//!
//! Every wait has a deadline: the head (`request_header` from its first byte), the next
//! request (`client_idle`), each piece of a request body (`client_body`), the response head
//! (`backend_response` from when the request was sent whole), each piece of a response
//! body (`backend_body`), each write to the client (`client_send`) and a tunnel
//! (`tunnel_idle`).

mod h2;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::buffers::{Buf, InSlot, Parts, Work};
use super::head::{self, RequestEdits, ResponseEdits};
use super::io::ClientIo;
use crate::access_log::Record;
use crate::affinity::keys::H1Keys;
use crate::affinity::rebalance::Active;
use crate::affinity::verdict::Verdict;
use crate::affinity::{cookies, Decision, PoolAffinity, Target};
use crate::backend::health::passive_failure;
use crate::backend::Backend;
use crate::config::{Limits, Timeouts};
use crate::h1::chunked::Decoder;
use crate::h1::request::{self, Body, Method, RequestHead};
use crate::h1::response::{self, ResponseHead};
use crate::h1::Known;
use crate::pool::{Pool, Routes, Snapshot};
use crate::proxy::client::first_request;
use crate::proxy::refusal::Refusal;
use crate::proxy::rewrite;
use crate::proxy::tcp::relay;
use crate::state::{ConnPermit, ListenerStats, Shared};
use crate::upstream::{BackendConn, ConnectError};

/// What a connection carries from request to request: its stream (a plain socket, or TLS
/// that Tether terminates) and what requests need of it.
pub struct Client<S = TcpStream> {
    pub stream: S,
    pub peer: SocketAddr,
    /// The address the client connected to, for PROXY protocol headers to backends.
    pub local: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    pub listener: Arc<str>,
    pub stats: Arc<ListenerStats>,
    /// The client's address as `X-Forwarded-For` gets it.
    pub peer_ip: Box<str>,
    /// The idle backend connection this client connection owns: one that began with a
    /// PROXY protocol header naming this client, so it serves no other (it never enters
    /// the shared idle stacks). Its next request to the same backend reuses it. Boxed: an
    /// idle client connection of a pool that sends no header carries one pointer for it.
    pub own_backend: Option<Box<(Arc<Backend>, BackendConn)>>,
    pub shutdown: watch::Receiver<bool>,
    pub _permit: ConnPermit,
}

/// Attempts on stale pooled connections before a fresh one is opened.
const STALE_RETRIES: u32 = 2;

/// How a request left the connection.
enum After {
    KeepAlive,
    Close,
}

/// Serves the connection until the client closes it, a deadline passes, or shutdown.
/// `first`: bytes the caller already knows are waiting (the protocol sniff saw them).
pub async fn serve<S: ClientIo>(mut client: Client<S>) {
    let mut carry: Option<Buf> = None;
    let mut first = true;
    // One timer for the connection's waits between requests, moved on before each: a
    // deadline that only moves later is extended in place (no lock, no trip through the
    // timer wheel) until it fires, where a new `sleep` per request registered a timer and
    // removed it again every time.
    let idle = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(idle);
    loop {
        let timeouts = client.shared.snapshot.load().config.timeouts;
        if carry.is_none() && first {
            // A new connection's first request is served even when shutdown comes first
            // (within `LAST_CALL`): its client connected while Tether accepted.
            let ready = first_request(client.stream.readable(), timeouts.request_header, &mut client.shutdown);
            if !matches!(ready.await, Some(Ok(()))) {
                return;
            }
        } else if carry.is_none() {
            // Wait for the next request without holding anything. An idle keep-alive
            // connection closes at shutdown: between requests, a client retries.
            idle.as_mut().reset(tokio::time::Instant::now() + timeouts.client_idle);
            tokio::select! {
                r = client.stream.readable() => if r.is_err() { return },
                _ = &mut idle => return,
                _ = client.shutdown.changed() => return,
            }
        }
        first = false;
        let mut buf = carry.take().unwrap_or_else(Buf::take);
        let mut work = Work::take();
        match InSlot::new(request(&mut client, &mut buf, &mut work)).await {
            After::KeepAlive if *client.shutdown.borrow() => return,
            After::KeepAlive => {
                if !buf.filled().is_empty() {
                    // A pipelined request: its bytes are already here.
                    carry = Some(buf);
                }
            }
            After::Close => {
                let _ = client.stream.shutdown().await;
                return;
            }
        }
    }
}

/// Reads one request head, then serves the request.
async fn request<S: ClientIo>(client: &mut Client<S>, buf: &mut Buf, work: &mut Work) -> After {
    let snap = client.shared.snapshot.load_full();
    let (timeouts, limits) = (snap.config.timeouts, snap.config.limits);
    let codec =
        request::Limits { max_head: limits.max_request_head as usize, max_target: limits.max_request_target as usize };
    let deadline = Instant::now() + timeouts.request_header;
    buf.compact();
    loop {
        match request::parse_into(buf.filled(), &codec, &mut work.request) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                let refusal = Refusal::of_head(e, &limits);
                client.stats.requests.fetch_add(1, Ordering::Relaxed);
                log_refused_head(client, buf.filled(), e, &refusal);
                refuse(client, work, None, &refusal, true, &timeouts).await;
                return After::Close;
            }
        }
        if buf.spare().is_empty() {
            buf.grow(codec.max_head + 1);
        }
        match tokio::time::timeout_at(deadline, client.stream.read(buf.spare())).await {
            Ok(Ok(0)) | Ok(Err(_)) => return After::Close,
            Ok(Ok(n)) => buf.end += n,
            Err(_) => {
                tracing::debug!(peer = %client.peer, "closing connection: request head not received within {:?}", timeouts.request_header);
                return After::Close;
            }
        }
    }
    client.stats.requests.fetch_add(1, Ordering::Relaxed);
    let mut ex = Exchange::new(client, &snap);
    let after = ex.run(buf, work).await;
    ex.finish();
    after
}

/// Logs a request whose head was refused, when its request line could be read and the
/// head is not malformed as a whole (a syntax error is answered before there is a request
/// to log).
fn log_refused_head<S>(client: &Client<S>, bytes: &[u8], e: request::Error, refusal: &Refusal) {
    use request::Error;
    let log = &client.shared.access_log;
    if !log.enabled() || matches!(e, Error::Syntax | Error::BareLf | Error::HeadTooLarge | Error::Version) {
        return;
    }
    let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default().strip_suffix(b"\r").unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else { return };
    let text = |b| std::str::from_utf8(b).unwrap_or("-");
    log.write(&Record {
        start_millis: crate::time::unix_millis(),
        client: client.peer,
        listener: &client.listener,
        method: text(method),
        uri: text(target),
        version: text(version),
        status: refusal.status().as_u16(),
        pool: None,
        backend: None,
        upstream: None,
        total: Duration::ZERO,
        bytes_in: 0,
        bytes_out: 0,
        error: Some(refusal.label()),
        affinity: "-",
        session: None,
    });
}

/// Writes a refusal to the client.
async fn refuse<S: ClientIo>(
    client: &mut Client<S>,
    work: &mut Work,
    pool: Option<&str>,
    refusal: &Refusal,
    close: bool,
    timeouts: &Timeouts,
) {
    let status = refusal.status();
    let close = close || status.is_client_error() || status == http::StatusCode::NOT_IMPLEMENTED;
    work.out.clear();
    head::write_refusal(
        &mut work.out,
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        refusal.label(),
        &refusal.message(pool.unwrap_or("")),
        refusal.location(),
        close,
    );
    let send = async {
        client.stream.write_all(&work.out).await?;
        client.stream.flush().await
    };
    let _ = tokio::time::timeout(timeouts.client_send, send).await;
}

/// One request in flight: what it owes when it ends (the backend's in-flight count, its
/// counters and latency, the access log line) is settled by [`Exchange::finish`].
struct Exchange<'c, S> {
    client: &'c mut Client<S>,
    snap: &'c Snapshot,
    started: Instant,
    status: u16,
    pool: Option<Arc<str>>,
    backend: Option<Arc<Backend>>,
    verdict: Verdict,
    /// The session's pseudonym in the access log, when it is on.
    session: Option<u64>,
    /// The session's request in flight, for a pool that rebalances idle sessions.
    active: Option<Active>,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    error: Option<&'static str>,
    /// For the access log, when it is on: when the request started, and its request line
    /// (copied, since the buffer it came in is reused for the body).
    log: Option<(u64, String)>,
    version: &'static str,
    upstream: Option<Duration>,
    bytes_in: u64,
    bytes_out: u64,
}

/// What the steps of a request can end in besides a response: a refusal.
type Step<T> = Result<T, Refusal>;

impl<'c, S: ClientIo> Exchange<'c, S> {
    fn new(client: &'c mut Client<S>, snap: &'c Snapshot) -> Exchange<'c, S> {
        Exchange {
            client,
            snap,
            started: Instant::now(),
            status: 0,
            pool: None,
            backend: None,
            verdict: Verdict::Off,
            session: None,
            active: None,
            slot: None,
            error: None,
            log: None,
            version: "HTTP/1.1",
            upstream: None,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    /// Notes the request line for the access log, when it is on.
    fn note(&mut self, data: &[u8], head: &RequestHead) {
        if !self.client.shared.access_log.enabled() {
            return;
        }
        let mut line = String::with_capacity(16 + head.target.len());
        line.push_str(std::str::from_utf8(head.method_name.of(data)).unwrap_or("-"));
        line.push(' ');
        line.push_str(std::str::from_utf8(head.target.of(data)).unwrap_or("-"));
        self.log = Some((crate::time::unix_millis(), line));
        self.version = if head.minor == 0 { "HTTP/1.0" } else { "HTTP/1.1" };
        self.bytes_in = match head.body {
            Body::Length(n) => n,
            _ => 0,
        };
    }

    /// A connect to the attempt's backend failed: a strike against it when it was its
    /// fault, then a move to another backend (`Ok`; the old one's slot given back) or the
    /// refusal.
    fn connect_failed(
        &mut self,
        pool: &Pool,
        attempt: &mut Attempt,
        decision: &mut Decision,
        error: ConnectError,
    ) -> Step<()> {
        let backend = &pool.backends[attempt.index];
        tracing::warn!(pool = %pool.name, backend = %backend.name, address = %backend.address_text, "{error}");
        if error.is_backend_fault() {
            passive_failure(&pool.backends, attempt.index, pool.config.health.as_ref(), &error.to_string());
        }
        if attempt.move_on(pool, decision) {
            self.slot = None;
            self.verdict = decision.verdict;
            return Ok(());
        }
        Err(Refusal::Connect { backend: backend.name.clone(), error })
    }

    /// Charges the request to `backend`: its in-flight count is up until the end.
    fn charge(&mut self, backend: &Arc<Backend>) {
        if self.backend.as_ref().is_some_and(|b| Arc::ptr_eq(b, backend)) {
            return;
        }
        if let Some(old) = self.backend.replace(backend.clone()) {
            old.release();
        }
        backend.acquire();
    }

    fn finish(self) {
        if let Some(b) = &self.backend {
            b.release();
            b.count(self.verdict);
            b.metrics.record(self.status, self.started.elapsed());
        }
        if let Some((start_millis, line)) = &self.log {
            let (method, uri) = line.split_once(' ').unwrap_or((line, ""));
            self.client.shared.access_log.write(&Record {
                start_millis: *start_millis,
                client: self.client.peer,
                listener: &self.client.listener,
                method,
                uri,
                version: self.version,
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

    async fn run(&mut self, buf: &mut Buf, work: &mut Work) -> After {
        let timeouts = self.snap.config.timeouts;
        match self.forward(buf, &mut *work).await {
            Ok(after) => after,
            Err(refusal) => {
                let status = refusal.status();
                self.status = status.as_u16();
                self.error = Some(refusal.label());
                let pool = self.pool.clone();
                // A request without a body that Tether refuses for its own reasons leaves
                // the connection in step; after anything else (a body not read, a request
                // Tether could not make sense of) the framing of what follows is unknown.
                let head = &work.request;
                let in_step = head.body == Body::None
                    && head.keep_alive
                    && !status.is_client_error()
                    && status != http::StatusCode::NOT_IMPLEMENTED;
                refuse(self.client, work, pool.as_deref(), &refusal, !in_step, &timeouts).await;
                if in_step {
                    buf.start = work.request.len;
                    return After::KeepAlive;
                }
                After::Close
            }
        }
    }

    /// Route, decide, send (with moves to another backend), respond.
    async fn forward(&mut self, buf: &mut Buf, work: &mut Parts) -> Step<After> {
        let snap = self.snap;
        let limits = snap.config.limits;
        let timeouts = snap.config.timeouts;
        let head = &work.request;
        let data = buf.bytes();
        self.note(data, head);
        let (routes, pool) = route(snap, &self.client.listener, data, head, self.client.peer.ip())?;
        self.pool = Some(pool.name.clone());
        if let (Some(max), Body::Length(n)) = (limits.max_request_body, head.body) {
            if n > max {
                return Err(Refusal::BodyTooLarge { limit: max });
            }
        }
        let trusted = routes.trusted_proxies.iter().any(|c| c.contains(crate::net::canonical(self.client.peer.ip())));
        let now_ms = if pool.affinity.is_some() { crate::time::unix_millis() } else { 0 };
        let mut decision = match &pool.affinity {
            Some(a) => {
                let xff = head.fields.values(data, Known::XForwardedFor);
                let ip = rewrite::client_ip_from(self.client.peer.ip(), xff, &routes.trusted_proxies, trusted);
                if let Some(link) = &pool.shared {
                    // Keys this instance does not know are asked of the shared store first.
                    if let Some(wait) = link.before(a, &pool.backends, &a.table_pins(&H1Keys::new(data, head), ip)) {
                        wait.await;
                    }
                }
                a.decide(&pool.group(), &H1Keys::new(data, head), ip, now_ms)
            }
            None => Decision::plain(pool.group().pick(None)),
        };
        self.verdict = decision.verdict;
        self.session = self.client.shared.access_log.pseudonym(decision.identity());
        self.active = pool.affinity.as_ref().and_then(|a| a.begin(&decision, now_ms));
        pool.note_session(&decision);
        let index = match decision.target {
            Target::Use(i) => i,
            Target::Strict(reason) => return Err(Refusal::SessionUnavailable(reason)),
            Target::NoBackend => return Err(Refusal::NoBackend),
        };
        let https = S::TLS || (trusted && forwarded_https(data, head));
        let upgrade = head.upgrade && head::wants_upgrade(data, head, &pool.config.upgrades);
        pool.retry_budget.deposit(pool.config.retry_budget);
        if head.expect_continue && head.body != Body::None {
            // Tether answers the expectation itself, as NGINX does.
            let _ = write(&mut self.client.stream, b"HTTP/1.1 100 Continue\r\n\r\n", timeouts.client_send).await;
        }
        if pool.upstreams[index].is_http2() {
            // Boxed: its state is large, and HTTP/1.1 pools should not carry its size.
            return Box::pin(self.forward_h2(buf, work, routes, pool, decision, index, trusted, https)).await;
        }

        let proxy_header = crate::proxy::proxy_header(pool, self.client.peer, self.client.local);
        let mut attempt = Attempt { index, moves_left: pool.config.retries.max(1), stale: 0 };
        loop {
            let backend = &pool.backends[attempt.index];
            self.charge(backend);
            if self.slot.is_none() {
                self.slot = pool.slot(attempt.index).await.map_err(|e| Refusal::of_slot(e, pool, attempt.index))?;
            }
            // The request as the backend gets it: its head, and the body bytes already here.
            let data = buf.bytes();
            let head = &work.request;
            work.out.clear();
            let edits = RequestEdits {
                client_ip: &self.client.peer_ip,
                trusted,
                tls: S::TLS,
                default_host: &backend.address_text,
                own_cookie: pool.affinity.as_ref().and_then(|a| a.cookie_name()),
                repin_header: pool.affinity.as_ref().map(|a| a.cfg.repin_header.as_str()),
                repin: decision.verdict.reason(),
                upgrade: upgrade.then_some(&pool.config.upgrades[..]),
            };
            head::write_request(&mut work.out, data, head, &edits);
            let mut decoder = Decoder::new();
            let (taken, complete) = first_body_bytes(&data[head.len..], head.body, &mut decoder, &limits)?;
            work.out.extend_from_slice(&data[head.len..head.len + taken]);
            let body_end = head.len + taken;

            let fresh = attempt.stale >= STALE_RETRIES;
            let own = &mut self.client.own_backend;
            let (mut conn, reused) = match connection(pool, attempt.index, fresh, proxy_header, own).await {
                Ok(c) => c,
                Err(error) => {
                    self.connect_failed(pool, &mut attempt, &mut decision, error)?;
                    continue;
                }
            };
            let sent = async {
                conn.write_all(&work.out).await?;
                conn.flush().await
            };
            if let Err(e) = sent.await {
                if reused {
                    attempt.stale += 1;
                    continue;
                }
                tracing::warn!(pool = %pool.name, backend = %backend.name, "backend failed: {e}");
                passive_failure(&pool.backends, attempt.index, pool.config.health.as_ref(), &e.to_string());
                return Err(Refusal::BackendFailed { backend: backend.name.clone() });
            }
            let (method, keep_alive, minor, body) = (head.method, head.keep_alive, head.minor, head.body);
            let left = match body {
                Body::Length(n) => n - (body_end - head.len) as u64,
                _ => 0,
            };
            if complete {
                buf.start = body_end;
            }

            // The response head, while the rest of the body (if any) streams from the
            // client beside it: a backend may answer before it has read the whole body, or
            // stream its answer while it reads. Until the head arrives, all of it is bounded
            // by `backend_response`.
            let mut rbuf = Buf::take();
            let max_head = limits.max_request_head as usize;
            let sent = Instant::now();
            let waiting = AtomicBool::new(false);
            let (sent, status, res_keep_alive, close) = {
                let (mut client_read, mut client_write) = self.client.stream.halves();
                let (mut backend_read, mut backend_write) = conn.split();
                let upload = async {
                    match body {
                        _ if complete => Ok(()),
                        Body::Length(_) => {
                            copy_length(&mut client_read, &mut backend_write, left, buf, timeouts.client_body, &waiting)
                                .await
                        }
                        _ => {
                            let max = limits.max_request_body;
                            copy_chunked(
                                &mut client_read,
                                &mut backend_write,
                                &mut decoder,
                                buf,
                                timeouts.client_body,
                                max,
                                &waiting,
                            )
                            .await
                        }
                    }
                };
                let mut upload = std::pin::pin!(upload);
                let mut uploaded = complete;
                let got = {
                    let head_read = read_response(
                        &mut backend_read,
                        &mut rbuf,
                        &mut work.response,
                        max_head,
                        method == Method::Head,
                    );
                    let mut head_read = std::pin::pin!(head_read);
                    let timer = tokio::time::sleep_until(sent + timeouts.backend_response);
                    let mut timer = std::pin::pin!(timer);
                    loop {
                        tokio::select! {
                            r = &mut upload, if !uploaded => {
                                uploaded = true;
                                if let Err(r) = r {
                                    return Err(match r {
                                        Refusal::BackendFailed { .. } => Refusal::BackendFailed { backend: backend.name.clone() },
                                        r => r,
                                    });
                                }
                            }
                            g = &mut head_read => break g,
                            _ = &mut timer => break Err(ReadFail::Timeout),
                        }
                    }
                };
                self.upstream = Some(sent.elapsed());
                let replayable = complete && body == Body::None;
                match got {
                    Ok(()) => {}
                    Err(ReadFail::Closed) if reused && replayable && rbuf.filled().is_empty() => {
                        attempt.stale += 1;
                        continue;
                    }
                    Err(ReadFail::Timeout) => {
                        let after = timeouts.backend_response;
                        if !uploaded && waiting.load(Ordering::Relaxed) {
                            tracing::info!(pool = %pool.name, backend = %backend.name, "request body still arriving after {after:?}");
                            return Err(Refusal::RequestBodyTimeout { after });
                        }
                        if uploaded {
                            // The backend had the whole request: a strike against it.
                            tracing::warn!(pool = %pool.name, backend = %backend.name, "no response within {after:?}");
                            passive_failure(
                                &pool.backends,
                                attempt.index,
                                pool.config.health.as_ref(),
                                "response timeout",
                            );
                        } else {
                            tracing::warn!(pool = %pool.name, backend = %backend.name, "no response within {after:?}, request body not fully sent");
                        }
                        return Err(Refusal::BackendTimeout { backend: backend.name.clone(), after });
                    }
                    Err(why) => {
                        tracing::warn!(pool = %pool.name, backend = %backend.name, "backend failed: {}", why.describe());
                        passive_failure(&pool.backends, attempt.index, pool.config.health.as_ref(), why.describe());
                        if replayable
                            && method.is_idempotent()
                            && pool.config.retries > 0
                            && attempt.move_on(pool, &mut decision)
                        {
                            self.slot = None;
                            self.verdict = decision.verdict;
                            continue;
                        }
                        return Err(Refusal::BackendFailed { backend: backend.name.clone() });
                    }
                }
                let res = &work.response;
                if res.status >= 500 {
                    let why = format!("status {}", res.status);
                    passive_failure(&pool.backends, attempt.index, pool.config.health.as_ref(), &why);
                } else {
                    backend.passive_success();
                }
                self.status = res.status;
                if res.status == 101 && !upgrade {
                    return Err(Refusal::UnaskedSwitch);
                }
                // Persistence: the app's cookie learned, Tether's cookie issued.
                let rdata = rbuf.bytes();
                let mut set_cookie = None;
                if let Some(a) = &pool.affinity {
                    match &pool.shared {
                        None if a.learns() => a.learn(res.fields.values(rdata, Known::SetCookie), attempt.index),
                        None => {}
                        // New pins reach the shared store before the response does.
                        Some(link) => {
                            let learned = if a.learns() {
                                a.learn_new(res.fields.values(rdata, Known::SetCookie), attempt.index)
                            } else {
                                Vec::new()
                            };
                            if let Some(wait) = link.after(&pool.backends, &decision, &learned, attempt.index) {
                                wait.await;
                            }
                        }
                    }
                    set_cookie = issued_cookie(a, &decision, https);
                }
                let dechunk = res.body == response::Body::Chunked && minor == 0;
                let close =
                    !keep_alive || *self.client.shutdown.borrow() || res.body == response::Body::UntilClose || dechunk;
                work.out.clear();
                let edits = ResponseEdits {
                    set_cookie: set_cookie.as_deref(),
                    close,
                    dechunk,
                    client_minor: minor,
                    date: None,
                    hsts: routes.hsts.as_deref(),
                };
                head::write_response(&mut work.out, rdata, res, &edits);
                rbuf.start = res.len;
                let (status, res_keep_alive, res_body) = (res.status, res.keep_alive, res.body);
                let head_len = work.out.len() as u64;
                let mut written = 0;
                let download = send_response(
                    &mut client_write,
                    &mut backend_read,
                    &mut rbuf,
                    &mut work.out,
                    res_body,
                    &timeouts,
                    dechunk,
                    &mut written,
                );
                let mut upload_failed = false;
                let sent = if uploaded {
                    download.await
                } else {
                    let mut download = std::pin::pin!(download);
                    loop {
                        tokio::select! {
                            r = &mut upload, if !uploaded => {
                                uploaded = true;
                                if r.is_err() {
                                    // The client's body failed while the response was
                                    // under way: the response is cut short.
                                    upload_failed = true;
                                    break Err("bad-request-body");
                                }
                            }
                            d = &mut download => break d,
                        }
                    }
                };
                self.bytes_out = written.saturating_sub(head_len);
                if !uploaded || upload_failed {
                    // The response ended before the request body did, or the body failed after
                    // the response had begun: neither connection is in step any more.
                    self.error = Some(if upload_failed { "bad-request-body" } else { "response-before-body" });
                    return Ok(After::Close);
                }
                (sent, status, res_keep_alive, close)
            };
            return match sent {
                Ok(_) if status == 101 => {
                    let backend = pool.backends[attempt.index].clone();
                    let mut conn = conn;
                    let cut = &backend.cut;
                    let relayed =
                        relay(&mut self.client.stream, &mut conn, buf.filled(), timeouts.tunnel_idle, cut).await;
                    self.bytes_in += relayed.up;
                    self.bytes_out += relayed.down;
                    if let Some(label) = relayed.end.label() {
                        tracing::debug!(backend = %backend.name, "tunnel closed: {label}");
                    }
                    Ok(After::Close)
                }
                Ok(whole) => {
                    if whole && res_keep_alive {
                        if proxy_header.is_some() {
                            self.client.own_backend = Some(Box::new((pool.backends[attempt.index].clone(), conn)));
                        } else {
                            pool.upstreams[attempt.index].put_back(conn);
                        }
                    }
                    Ok(if close { After::Close } else { After::KeepAlive })
                }
                Err(label) => {
                    self.error = Some(label);
                    Ok(After::Close)
                }
            };
        }
    }
}

/// The body bytes that came with the head: how many of `available` belong to this
/// request, and whether that is all of its body. A chunked body's framing is checked.
fn first_body_bytes(available: &[u8], body: Body, decoder: &mut Decoder, limits: &Limits) -> Step<(usize, bool)> {
    match body {
        Body::None => Ok((0, true)),
        Body::Length(n) => {
            let take = available.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            Ok((take, take as u64 == n))
        }
        Body::Chunked => {
            let mut at = 0;
            while at < available.len() && !decoder.is_done() {
                let s = decoder.step(&available[at..]).map_err(|_| Refusal::BadRequestBody)?;
                at += s.consumed;
            }
            if let Some(max) = limits.max_request_body {
                if decoder.data_len() > max {
                    return Err(Refusal::BodyTooLarge { limit: max });
                }
            }
            Ok((at, decoder.is_done()))
        }
    }
}

/// The `Set-Cookie` value of a token the decision issues, `Secure` when the client came
/// over HTTPS through a trusted proxy (unless the pool says otherwise).
fn issued_cookie(a: &PoolAffinity, d: &Decision, https: bool) -> Option<String> {
    let t = d.issue.as_ref()?;
    let mut cookie = a.set_cookie(t);
    if https && a.cfg.cookie.secure.is_none() && !cookies::has_attribute(&cookie, "Secure") {
        cookie.push_str("; Secure");
    }
    Some(cookie)
}

/// Where a request is in its attempts to reach a backend.
struct Attempt {
    index: usize,
    moves_left: u32,
    stale: u32,
}

impl Attempt {
    fn move_on(&mut self, pool: &Pool, decision: &mut Decision) -> bool {
        if self.moves_left == 0 {
            return false;
        }
        let Some(next) = pool.move_from(self.index, decision, crate::time::unix_millis()) else { return false };
        self.moves_left -= 1;
        self.index = next;
        self.stale = 0;
        true
    }
}

/// A pooled connection to backend `i` (`true`: reused), or a new one.
///
/// A pool that sends PROXY protocol `header`s pools nothing: the client connection's
/// `own` connection is reused when it goes to the same backend and is still quiet;
/// otherwise (it is dropped) a new one is opened with the header first.
async fn connection(
    pool: &Pool,
    i: usize,
    fresh: bool,
    header: Option<crate::proxy_header::Header>,
    own: &mut Option<Box<(Arc<Backend>, BackendConn)>>,
) -> Result<(BackendConn, bool), ConnectError> {
    let upstream = &pool.upstreams[i];
    if let Some(header) = header {
        if let Some((backend, mut conn)) = own.take().map(|b| *b) {
            if !fresh && Arc::ptr_eq(&backend, &pool.backends[i]) && conn.quiet() {
                return Ok((conn, true));
            }
        }
        return upstream.connect(Some(header.as_bytes())).await.map(|s| (s, false));
    }
    if !fresh {
        if let Some(s) = upstream.take_idle() {
            return Ok((s, true));
        }
    }
    upstream.connect(None).await.map(|s| (s, false))
}

/// Step 1: the listener's routes and the pool, by host then path.
fn route<'s>(
    snap: &'s Snapshot,
    listener: &str,
    data: &[u8],
    head: &RequestHead,
    peer: std::net::IpAddr,
) -> Result<(&'s Routes, &'s Pool), Refusal> {
    if head.method == Method::Connect {
        return Err(Refusal::ConnectUnsupported);
    }
    let routes = snap.listener(listener).ok_or(Refusal::NoListener)?;
    let host = head.host.map_or(&b""[..], |h| h.of(data));
    let host = std::str::from_utf8(host).unwrap_or("");
    if let Some(port) = routes.redirect_to_https {
        if host.is_empty() {
            return Err(Refusal::BadRequest("a redirect to HTTPS needs the request's Host"));
        }
        let target = match head.form {
            request::Target::Absolute { path, .. } => path.of(data),
            request::Target::Asterisk => b"/",
            _ => head.target.of(data),
        };
        let target = std::str::from_utf8(target).ok().filter(|t| t.starts_with('/')).unwrap_or("/");
        return Err(Refusal::https_redirect(host, port, target));
    }
    let host = crate::net::strip_port(host);
    let path = path_of(data, head);
    match routes.route(host, path) {
        Some(to) => {
            let client_ip = || {
                let trusted = routes.trusted_proxies.iter().any(|c| c.contains(crate::net::canonical(peer)));
                let xff = head.fields.values(data, Known::XForwardedFor);
                rewrite::client_ip_from(peer, xff, &routes.trusted_proxies, trusted)
            };
            Ok((routes, snap.pool_of(to, &H1Keys::new(data, head), client_ip)))
        }
        None => Err(Refusal::NoRoute { host: host.to_string(), path: path.to_string() }),
    }
}

/// The path of the request target, without the query (`/` for `*` and an empty path).
fn path_of<'b>(data: &'b [u8], head: &RequestHead) -> &'b str {
    let target = match head.form {
        request::Target::Absolute { path, .. } => path.of(data),
        request::Target::Asterisk => b"/",
        _ => head.target.of(data),
    };
    let end = target.iter().position(|b| *b == b'?').unwrap_or(target.len());
    match std::str::from_utf8(&target[..end]) {
        Ok("") | Err(_) => "/",
        Ok(p) => p,
    }
}

/// The client reached the trusted proxy in front of Tether over HTTPS.
fn forwarded_https(data: &[u8], head: &RequestHead) -> bool {
    head.fields.values(data, Known::XForwardedProto).next().is_some_and(|v| {
        let first = v.split(|b| *b == b',').next().unwrap_or_default();
        first.trim_ascii().eq_ignore_ascii_case(b"https")
    })
}

/// Why a response head could not be read.
#[derive(Debug)]
pub enum ReadFail {
    Closed,
    Timeout,
    Io,
    Malformed(response::Error),
}

impl ReadFail {
    pub fn describe(&self) -> &'static str {
        match self {
            ReadFail::Closed => "connection closed before a response",
            ReadFail::Timeout => "response timeout",
            ReadFail::Io => "connection broke before a response",
            ReadFail::Malformed(e) => e.describe(),
        }
    }
}

/// Reads a final response head (1xx heads before it other than 101 are skipped: Tether
/// answered `Expect` itself).
async fn read_response<R: AsyncRead + Unpin>(
    conn: &mut R,
    rbuf: &mut Buf,
    into: &mut ResponseHead,
    max_head: usize,
    is_head: bool,
) -> Result<(), ReadFail> {
    std::future::poll_fn(|cx| poll_response_head(cx, conn, rbuf, into, max_head, is_head)).await
}

/// Reads a final response head into `head` as bytes arrive (interim 1xx heads other than
/// 101 are skipped). The HTTP/2 path reads its responses with it too.
pub fn poll_response_head<R: AsyncRead + Unpin>(
    cx: &mut std::task::Context<'_>,
    conn: &mut R,
    rbuf: &mut Buf,
    head: &mut ResponseHead,
    max_head: usize,
    is_head: bool,
) -> std::task::Poll<Result<(), ReadFail>> {
    use std::task::Poll;
    loop {
        match response::parse_into(rbuf.filled(), max_head, is_head, head) {
            Ok(true) if (100..200).contains(&head.status) && head.status != 101 => {
                rbuf.start += head.len;
                rbuf.compact();
                continue;
            }
            Ok(true) => return Poll::Ready(Ok(())),
            Ok(false) => {}
            Err(e) => return Poll::Ready(Err(ReadFail::Malformed(e))),
        }
        if rbuf.spare().is_empty() {
            rbuf.grow(max_head + 1);
        }
        let mut read = tokio::io::ReadBuf::new(rbuf.spare());
        match std::task::ready!(std::pin::Pin::new(&mut *conn).poll_read(cx, &mut read)) {
            Ok(()) if read.filled().is_empty() => return Poll::Ready(Err(ReadFail::Closed)),
            Ok(()) => rbuf.end += read.filled().len(),
            Err(_) => return Poll::Ready(Err(ReadFail::Io)),
        }
    }
}

/// Reads the next piece of the request body within `client_body`, noting in `waiting`
/// while it waits (a response timeout during that wait is the client's fault).
async fn read_body<R: AsyncRead + Unpin>(
    from: &mut R,
    into: &mut [u8],
    idle: Duration,
    waiting: &AtomicBool,
) -> Step<usize> {
    waiting.store(true, Ordering::Relaxed);
    let r = tokio::time::timeout(idle, from.read(into)).await;
    waiting.store(false, Ordering::Relaxed);
    match r {
        Ok(Ok(0)) | Ok(Err(_)) => Err(Refusal::BadRequestBody),
        Ok(Ok(n)) => Ok(n),
        Err(_) => Err(Refusal::RequestBodyTimeout { after: idle }),
    }
}

/// Copies the rest of a body of known length from the client to the backend.
async fn copy_length<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    from: &mut R,
    to: &mut W,
    mut left: u64,
    buf: &mut Buf,
    idle: Duration,
    waiting: &AtomicBool,
) -> Step<()> {
    buf.clear();
    while left > 0 {
        let room = buf.spare();
        let want = room.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = read_body(from, &mut room[..want], idle, waiting).await?;
        if to.write_all(&buf.spare()[..n]).await.is_err() || to.flush().await.is_err() {
            return Err(Refusal::BackendFailed { backend: String::new() });
        }
        left -= n as u64;
    }
    Ok(())
}

/// Copies the rest of a chunked body from the client to the backend, as received, checking
/// its framing and the body limit. Bytes after the body stay in `buf` (a pipelined
/// request).
async fn copy_chunked<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    from: &mut R,
    to: &mut W,
    decoder: &mut Decoder,
    buf: &mut Buf,
    idle: Duration,
    max: Option<u64>,
    waiting: &AtomicBool,
) -> Step<()> {
    buf.clear();
    while !decoder.is_done() {
        let n = read_body(from, buf.spare(), idle, waiting).await?;
        buf.end += n;
        let mut at = buf.start;
        let end = buf.end;
        while at < end && !decoder.is_done() {
            let step = decoder.step(&buf.bytes()[at..end]).map_err(|_| Refusal::BadRequestBody)?;
            at += step.consumed;
        }
        if let Some(max) = max {
            if decoder.data_len() > max {
                return Err(Refusal::BodyTooLarge { limit: max });
            }
        }
        if to.write_all(&buf.bytes()[buf.start..at]).await.is_err() || to.flush().await.is_err() {
            return Err(Refusal::BackendFailed { backend: String::new() });
        }
        buf.start = at;
        if buf.start == buf.end {
            buf.clear();
        }
    }
    Ok(())
}

/// Sends the response head in `out` and the body after it: `Ok(true)` when the backend's
/// response was read to its end (its connection may be reused), `Err` with the failure's
/// label when it broke off.
// Both directions' streams, both buffers, the framing and the counter: each is a
// separate borrow of the caller's state, so a struct would only rename them.
#[allow(clippy::too_many_arguments)]
async fn send_response<W: AsyncWrite + Unpin, R: AsyncRead + Unpin>(
    client: &mut W,
    conn: &mut R,
    rbuf: &mut Buf,
    out: &mut Vec<u8>,
    body: response::Body,
    timeouts: &Timeouts,
    dechunk: bool,
    written: &mut u64,
) -> Result<bool, &'static str> {
    let head_len = out.len() as u64;
    let send = timeouts.client_send;
    let idle = timeouts.backend_body;
    match body {
        response::Body::None => {
            write_counted(client, out, send, written).await?;
            Ok(rbuf.filled().is_empty())
        }
        response::Body::Length(n) => {
            let mut left = n;
            let extra = rbuf.filled().len() as u64 > n;
            let here = (rbuf.filled().len() as u64).min(left) as usize;
            out.extend_from_slice(&rbuf.filled()[..here]);
            left -= here as u64;
            write_counted(client, out, send, written).await?;
            rbuf.clear();
            while left > 0 {
                let room = rbuf.spare();
                let want = room.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = read(conn, &mut room[..want], idle).await?;
                left -= n as u64;
                write_counted(client, &rbuf.spare()[..n], send, written).await?;
            }
            Ok(!extra)
        }
        response::Body::Chunked => {
            let mut decoder = Decoder::new();
            // The first pieces go out with the head.
            let mut at = rbuf.start;
            let end = rbuf.end;
            let data = rbuf.bytes();
            while at < end && !decoder.is_done() {
                let step = decoder.step(&data[at..end]).map_err(|_| "backend-body-error")?;
                if dechunk {
                    out.extend_from_slice(&data[at..end][step.data.clone()]);
                } else {
                    out.extend_from_slice(&data[at..at + step.consumed]);
                }
                at += step.consumed;
            }
            let extra = at < end;
            write_counted(client, out, send, written).await?;
            rbuf.clear();
            while !decoder.is_done() {
                rbuf.clear();
                let n = read(conn, rbuf.spare(), idle).await?;
                rbuf.end = n;
                let mut at = 0;
                out.clear();
                while at < n && !decoder.is_done() {
                    let data = rbuf.bytes();
                    let step = decoder.step(&data[at..n]).map_err(|_| "backend-body-error")?;
                    if dechunk {
                        out.extend_from_slice(&data[at..n][step.data.clone()]);
                    } else {
                        out.extend_from_slice(&data[at..at + step.consumed]);
                    }
                    at += step.consumed;
                }
                write_counted(client, out, send, written).await?;
                if at < n {
                    return Ok(false);
                }
            }
            // The access log counts body bytes, not chunk framing.
            *written = head_len + decoder.data_len();
            Ok(!extra)
        }
        response::Body::UntilClose => {
            out.extend_from_slice(rbuf.filled());
            write_counted(client, out, send, written).await?;
            rbuf.clear();
            loop {
                match tokio::time::timeout(idle, conn.read(rbuf.spare())).await {
                    Ok(Ok(0)) => return Ok(false),
                    Ok(Ok(n)) => {
                        let piece = &rbuf.spare()[..n];
                        write_counted(client, piece, send, written).await?;
                    }
                    Ok(Err(_)) | Err(_) => return Err("backend-body-error"),
                }
            }
        }
    }
}

async fn read<R: AsyncRead + Unpin>(conn: &mut R, into: &mut [u8], idle: Duration) -> Result<usize, &'static str> {
    match tokio::time::timeout(idle, conn.read(into)).await {
        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => Err("backend-body-error"),
        Ok(Ok(n)) => Ok(n),
    }
}

async fn write_counted<W: AsyncWrite + Unpin>(
    stream: &mut W,
    bytes: &[u8],
    limit: Duration,
    count: &mut u64,
) -> Result<(), &'static str> {
    write(stream, bytes, limit).await?;
    *count += bytes.len() as u64;
    Ok(())
}

async fn write<W: AsyncWrite + Unpin>(stream: &mut W, bytes: &[u8], limit: Duration) -> Result<(), &'static str> {
    // Flushed: over TLS, the last records of a write that met a full socket wait in
    // the TLS state until a flush (or the next write) sends them.
    let send = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    };
    match tokio::time::timeout(limit, send).await {
        Ok(Ok(())) => Ok(()),
        _ => Err("client-gone"),
    }
}

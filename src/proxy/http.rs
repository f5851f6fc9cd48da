//! One request, start to end: route it, pick a backend, rewrite its headers, forward it
//! and hand back the response (or an error a client can understand).
//!
//! The request body is never read here: it streams to the backend as hyper's `Incoming`,
//! and the response streams back in a [`ProxyBody`]. What a request owes when it ends
//! (in-flight count, pooled connection, access log) is settled by its [`Outcome`].

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::body::{Outcome, ProxyBody, RequestBody};
use super::conn::ConnCx;
use super::upstream::{ConnectError, Sender};
use crate::affinity::{cookies, Decision, PoolAffinity, Verdict};
use crate::config::OnUnavailable;
use crate::pool::{Backend, Pool, Snapshot};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// Set on every response Tether writes itself, so a client can tell it from the backend's.
pub static TETHER_ERROR: HeaderName = HeaderName::from_static("tether-error");

/// Attempts on stale pooled connections before a fresh one is opened.
const STALE_RETRIES: usize = 2;

/// The hyper service: every request gets a response, never an error.
pub async fn handle(req: Request<Incoming>, cx: Arc<ConnCx>) -> Result<Response<ProxyBody>, Infallible> {
    let snapshot = cx.shared.snapshot.load_full();
    let out = Outcome::new(cx.clone(), req.method().clone(), req.uri().clone(), req.version());
    Ok(proxy(req, &snapshot, &cx, out).await)
}

async fn proxy(mut req: Request<Incoming>, snap: &Snapshot, cx: &Arc<ConnCx>, mut out: Outcome) -> Response<ProxyBody> {
    if req.method() == Method::CONNECT {
        return reply(
            out,
            StatusCode::METHOD_NOT_ALLOWED,
            "connect-unsupported",
            "CONNECT is not supported: Tether is a reverse proxy".into(),
        );
    }
    let host = match host_of(&req) {
        Ok(h) => h,
        Err(msg) => return reply(out, StatusCode::BAD_REQUEST, "bad-request", msg.into()),
    };
    let Some(routes) = snap.listener(&cx.listener_name) else {
        return reply(out, StatusCode::SERVICE_UNAVAILABLE, "no-listener", "this listener was removed".into());
    };
    let host_name = host.as_ref().and_then(|h| h.to_str().ok()).map_or("", strip_port);
    let Some(pool_index) = routes.route(host_name, req.uri().path()) else {
        let msg = format!("no route for host \"{host_name}\" and path \"{}\"", req.uri().path());
        return reply(out, StatusCode::NOT_FOUND, "no-route", msg);
    };
    let pool = &snap.pools[pool_index];
    out.pool = Some(pool.name.clone());

    let upgrade = wants_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let trusted = {
        let ip = crate::config::canonical(cx.peer.ip());
        routes.trusted_proxies.iter().any(|c| c.contains(ip))
    };
    let now_ms = if pool.affinity.is_some() { crate::time::unix_millis() } else { 0 };
    let mut decision = match &pool.affinity {
        Some(a) => {
            let client = client_ip(cx, req.headers(), &routes.trusted_proxies, trusted);
            a.decide(pool, req.headers(), req.uri(), client, now_ms)
        }
        None => Decision::plain(pool.pick(None)),
    };
    out.verdict = decision.verdict;
    rewrite_request(&mut req, cx, host, trusted, upgrade);
    if let Some(a) = &pool.affinity {
        rewrite_for_affinity(req.headers_mut(), a, decision.verdict);
    }
    out.bytes_in = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);

    let Some(mut index) = decision.backend else {
        if let (Some(a), Verdict::Repin(_)) = (&pool.affinity, decision.verdict) {
            if a.cfg.on_unavailable == OnUnavailable::Strict {
                let msg = format!(
                    "pool \"{}\": the session's backend is unavailable ({}) and this pool does not move sessions",
                    pool.name,
                    decision.verdict.reason().unwrap_or("")
                );
                return reply(out, StatusCode::SERVICE_UNAVAILABLE, "session-unavailable", msg);
            }
        }
        let msg = format!("pool \"{}\": no backend is available", pool.name);
        return reply(out, StatusCode::SERVICE_UNAVAILABLE, "no-backend", msg);
    };
    let timeouts = snap.config.timeouts;
    pool.retry_budget.deposit(pool.config.retry_budget);
    // Moves to another backend: after a failed connect (nothing was sent), and for an
    // idempotent request without a body, after a connection that broke before any
    // response byte. Such a request is kept so it can be sent again.
    let mut moves_left = pool.config.retries.max(1);
    let replay = (pool.config.retries > 0 && is_idempotent(req.method()) && req.body().is_end_stream())
        .then(|| (req.method().clone(), req.uri().clone(), req.headers().clone()));
    let mut req = req.map(RequestBody::Stream);
    let mut stale = 0;
    loop {
        let backend = &pool.backends[index];
        out.set_backend(backend);
        if let Some(slots) = &backend.slots {
            if slots.available_permits() == 0
                && backend.waiting.load(std::sync::atomic::Ordering::Relaxed) >= pool.config.max_queue
            {
                let msg = format!(
                    "pool \"{}\": backend \"{}\" is at max_connections and its queue of {} is full",
                    pool.name, backend.name, pool.config.max_queue
                );
                return reply(out, StatusCode::SERVICE_UNAVAILABLE, "queue-full", msg);
            }
            backend.waiting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let waited = tokio::time::timeout(pool.config.queue_timeout, slots.clone().acquire_owned()).await;
            backend.waiting.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            match waited {
                Ok(Ok(permit)) => out.slot = Some(permit),
                _ => {
                    let msg = format!(
                        "pool \"{}\": backend \"{}\" is at max_connections and no slot freed within {:?}",
                        pool.name, backend.name, pool.config.queue_timeout
                    );
                    return reply(out, StatusCode::SERVICE_UNAVAILABLE, "queue-timeout", msg);
                }
            }
        }
        let fresh = stale >= STALE_RETRIES;
        let mut sender = match sender_for(backend, fresh).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(pool = %pool.name, backend = %backend.name, address = %backend.address_text, "{e}");
                crate::health::passive_failure(pool, index, &e.to_string());
                if let Some(next) = move_on(pool, &mut decision, index, now_ms, &mut moves_left) {
                    index = next;
                    out.verdict = decision.verdict;
                    if let Some(a) = &pool.affinity {
                        rewrite_for_affinity(req.headers_mut(), a, decision.verdict);
                    }
                    continue;
                }
                return connect_failed(out, pool, backend, e);
            }
        };
        let sent = Instant::now();
        let response = match tokio::time::timeout(timeouts.backend_response, sender.try_send_request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(mut e)) => match e.take_message() {
                // The pooled connection closed before the request went out: send it again.
                Some(r) => {
                    req = r;
                    stale += 1;
                    continue;
                }
                None => {
                    let e = e.into_error();
                    tracing::warn!(pool = %pool.name, backend = %backend.name, "backend failed: {e}");
                    crate::health::passive_failure(pool, index, &cause(&e));
                    if let Some((method, uri, headers)) = &replay {
                        if let Some(next) = move_on(pool, &mut decision, index, now_ms, &mut moves_left) {
                            index = next;
                            out.verdict = decision.verdict;
                            out.retried = true;
                            req = Request::new(RequestBody::Empty);
                            *req.method_mut() = method.clone();
                            *req.uri_mut() = uri.clone();
                            *req.headers_mut() = headers.clone();
                            if let Some(a) = &pool.affinity {
                                rewrite_for_affinity(req.headers_mut(), a, decision.verdict);
                            }
                            stale = 0;
                            continue;
                        }
                    }
                    let msg = format!("pool \"{}\": backend \"{}\" failed: {}", pool.name, backend.name, cause(&e));
                    return reply(out, StatusCode::BAD_GATEWAY, "backend-error", msg);
                }
            },
            Err(_) => {
                tracing::warn!(pool = %pool.name, backend = %backend.name, "no response within {:?}", timeouts.backend_response);
                crate::health::passive_failure(pool, index, "response timeout");
                let msg = format!(
                    "pool \"{}\": backend \"{}\" did not answer within {:?}",
                    pool.name, backend.name, timeouts.backend_response
                );
                return reply(out, StatusCode::GATEWAY_TIMEOUT, "backend-timeout", msg);
            }
        };
        out.upstream = Some(sent.elapsed());
        if response.status().is_server_error() {
            crate::health::passive_failure(pool, index, &format!("status {}", response.status().as_u16()));
        } else {
            crate::health::passive_success(backend);
        }
        let mut response = response;
        if let Some(a) = &pool.affinity {
            persist(response.headers_mut(), a, &decision, index);
        }
        return respond(response, sender, client_upgrade, out);
    }
}

/// Picks the backend a failed request moves to, within the pool's retries and retry
/// budget, re-pinning its session there.
fn move_on(pool: &Pool, decision: &mut Decision, failed: usize, now_ms: u64, moves_left: &mut u32) -> Option<usize> {
    if *moves_left == 0 || !pool.retry_budget.withdraw() {
        return None;
    }
    let next = match &pool.affinity {
        Some(a) => a.failover(pool, decision, failed, now_ms),
        None => pool.pick(Some(failed)),
    };
    if next.is_some() {
        *moves_left -= 1;
        pool.retry_budget.retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    next
}

/// RFC 9110 section 9.2.2.
fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// Turns the backend's response into the client's.
fn respond(
    mut response: Response<Incoming>,
    sender: Sender,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    mut out: Outcome,
) -> Response<ProxyBody> {
    out.status = response.status().as_u16();
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client) = client_upgrade {
            let backend = hyper::upgrade::on(&mut response);
            strip_hop_by_hop(response.headers_mut(), true);
            let (parts, _) = response.into_parts();
            tokio::spawn(tunnel(client, backend, out));
            return Response::from_parts(parts, ProxyBody::empty(None));
        }
        // A 101 to a request that asked for no upgrade is a broken backend.
        let msg = "the backend switched protocols without being asked".to_string();
        return reply(out, StatusCode::BAD_GATEWAY, "backend-error", msg);
    }
    strip_hop_by_hop(response.headers_mut(), false);
    out.sender = Some(sender);
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, ProxyBody::stream(body, out))
}

/// Copies bytes both ways between an upgraded client and backend until either side ends.
async fn tunnel(client: hyper::upgrade::OnUpgrade, backend: hyper::upgrade::OnUpgrade, mut out: Outcome) {
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!("upgrade failed: {e}");
            out.error = Some("upgrade-failed");
            return;
        }
    };
    let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
    match tokio::io::copy_bidirectional(&mut client, &mut backend).await {
        Ok((from_client, from_backend)) => {
            out.bytes_in += from_client;
            out.bytes_out += from_backend;
        }
        Err(e) => {
            tracing::debug!("tunnel ended: {e}");
            out.error = Some("tunnel-error");
        }
    }
}

/// The address a client-IP key uses: the peer, or, when the peer is a trusted proxy, the
/// first address in `X-Forwarded-For` (read from the right) that is not a trusted proxy.
fn client_ip(cx: &ConnCx, headers: &HeaderMap, trusted_proxies: &[crate::config::Cidr], trusted: bool) -> IpAddr {
    let peer = crate::config::canonical(cx.peer.ip());
    if !trusted {
        return peer;
    }
    let mut last = peer;
    let values = headers.get_all(&X_FORWARDED_FOR).iter().rev().filter_map(|v| v.to_str().ok());
    for entry in values.flat_map(|v| v.rsplit(',')) {
        let Ok(ip) = entry.trim().parse::<IpAddr>() else { return last };
        let ip = crate::config::canonical(ip);
        if !trusted_proxies.iter().any(|c| c.contains(ip)) {
            return ip;
        }
        last = ip;
    }
    last
}

/// Request changes for a pool with affinity: Tether's cookie never reaches the backend,
/// and the re-pin header is Tether's alone to set.
fn rewrite_for_affinity(headers: &mut HeaderMap, a: &PoolAffinity, verdict: Verdict) {
    if let Some(name) = a.cookie_name() {
        if crate::affinity::cookie_value(headers, name).is_some() {
            let kept: Vec<HeaderValue> = headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| match v.to_str().ok().and_then(|s| cookies::strip_cookie(s, name)) {
                    None => Some(v.clone()),
                    Some(rest) if rest.is_empty() => None,
                    Some(rest) => HeaderValue::from_str(&rest).ok(),
                })
                .collect();
            headers.remove(header::COOKIE);
            for v in kept {
                headers.append(header::COOKIE, v);
            }
        }
    }
    let repin = a.cfg.repin_header.as_str();
    headers.remove(repin);
    if let Some(reason) = verdict.reason() {
        if let Ok(name) = HeaderName::from_bytes(repin.as_bytes()) {
            headers.insert(name, HeaderValue::from_static(reason));
        }
    }
}

/// Response changes for a pool with affinity: learn the application's session cookie,
/// and set Tether's when the session is new, moved, or due for a fresh idle stamp.
fn persist(headers: &mut HeaderMap, a: &PoolAffinity, d: &Decision, backend: usize) {
    if a.learns() {
        a.learn(headers, backend);
    }
    if let Some(t) = &d.issue {
        if let Ok(v) = HeaderValue::from_str(&a.set_cookie(t)) {
            headers.append(header::SET_COOKIE, v);
            // A shared cache must not hand one client's session cookie to another.
            if !headers.contains_key(header::CACHE_CONTROL) {
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
            }
        }
    }
}

async fn sender_for(backend: &Backend, fresh: bool) -> Result<Sender, ConnectError> {
    if !fresh {
        if let Some(s) = backend.upstream.take_idle().await {
            return Ok(s);
        }
    }
    backend.upstream.connect().await
}

fn connect_failed(out: Outcome, pool: &Pool, backend: &Backend, e: ConnectError) -> Response<ProxyBody> {
    let (status, kind) = match e {
        ConnectError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "connect-timeout"),
        _ => (StatusCode::BAD_GATEWAY, "connect-failed"),
    };
    let msg = format!("pool \"{}\": backend \"{}\": {e}", pool.name, backend.name);
    reply(out, status, kind, msg)
}

/// The innermost cause of a hyper error, which says what actually happened.
fn cause(e: &hyper::Error) -> String {
    let mut source: &dyn std::error::Error = e;
    while let Some(s) = source.source() {
        source = s;
    }
    if std::ptr::addr_eq(source, e) {
        e.to_string()
    } else {
        format!("{e}: {source}")
    }
}

/// A response Tether writes itself: plain text naming what went wrong, marked with
/// `Tether-Error` so nobody mistakes it for the application's.
pub fn reply(mut out: Outcome, status: StatusCode, kind: &'static str, msg: String) -> Response<ProxyBody> {
    out.status = status.as_u16();
    out.error = Some(kind);
    out.sender = None;
    let body = format!("{} {}: {msg}\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
    let mut r = Response::new(ProxyBody::full(Bytes::from(body), Some(out)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(TETHER_ERROR.clone(), HeaderValue::from_static(kind));
    if status.is_client_error() {
        // After a request Tether could not make sense of, the connection's framing is not
        // to be trusted either.
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// The host a request is for, as it should reach the backend in `Host`. The authority of
/// an absolute URI (HTTP/1.1 absolute-form, HTTP/2 `:authority`) wins over `Host`, as
/// RFC 9112 section 3.2.2 says. HTTP/1.1 requires exactly one `Host`.
fn host_of(req: &Request<Incoming>) -> Result<Option<HeaderValue>, &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    if let Some(a) = req.uri().authority() {
        return HeaderValue::from_str(a.as_str()).map(Some).map_err(|_| "bad authority");
    }
    match first {
        Some(h) if h.to_str().is_ok_and(|s| !s.is_empty() && !s.contains(['/', ' ', '\\', '@'])) => Ok(Some(h.clone())),
        Some(_) => Err("malformed Host header"),
        None if req.version() == Version::HTTP_11 => Err("HTTP/1.1 request without a Host header"),
        None => Ok(None),
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(host, |(h, _)| h);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && has_token(req.headers(), &header::CONNECTION, "upgrade")
}

fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Prepares a client's request for the backend: HTTP/1.1 in origin-form, hop-by-hop
/// headers removed, `Host` kept, forwarding headers set.
fn rewrite_request(req: &mut Request<Incoming>, cx: &ConnCx, host: Option<HeaderValue>, trusted: bool, upgrade: bool) {
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = Uri::try_from(pq).unwrap_or_else(|_| Uri::from_static("/"));
    }
    *req.version_mut() = Version::HTTP_11;
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);

    // X-Forwarded-For: a trusted proxy's list is extended; anyone else's is replaced, so a
    // client cannot choose the address a backend believes it has.
    let xff = match (trusted, headers.contains_key(&X_FORWARDED_FOR)) {
        (true, true) => {
            let mut joined = Vec::with_capacity(64);
            for v in headers.get_all(&X_FORWARDED_FOR) {
                if !joined.is_empty() {
                    joined.extend_from_slice(b", ");
                }
                joined.extend_from_slice(v.as_bytes());
            }
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(cx.peer_ip.as_bytes());
            HeaderValue::from_bytes(&joined).unwrap_or_else(|_| cx.peer_ip.clone())
        }
        _ => cx.peer_ip.clone(),
    };
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    if let Some(h) = &host {
        if !(trusted && headers.contains_key(&X_FORWARDED_HOST)) {
            headers.insert(X_FORWARDED_HOST.clone(), h.clone());
        }
    }
    match host {
        Some(h) => {
            headers.insert(header::HOST, h);
        }
        None => {
            // HTTP/1.0 without Host: the backend needs one on HTTP/1.1.
            headers.remove(header::HOST);
        }
    }
}

/// Removes the headers that belong to one connection and must not be forwarded (RFC 9110
/// section 7.6.1): `Connection` and every header it names, `Keep-Alive`,
/// `Proxy-Connection`, `TE`, `Transfer-Encoding` and `Upgrade`. For an upgrade that goes
/// through, `Connection: upgrade` and `Upgrade` are kept.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of these: one pass over the names is cheaper than six
    // hash lookups (callgrind showed `HeaderMap::remove` at 2% of all instructions).
    let hop = |n: &HeaderName| {
        n == header::CONNECTION
            || n == header::TE
            || n == header::TRANSFER_ENCODING
            || n == header::UPGRADE
            || n == KEEP_ALIVE
            || n == PROXY_CONNECTION
    };
    if !headers.keys().any(hop) {
        if upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let mut named: Vec<HeaderName> = Vec::new();
        for v in headers.get_all(header::CONNECTION) {
            let Ok(v) = v.to_str() else { continue };
            for token in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if token.eq_ignore_ascii_case("upgrade") || token.eq_ignore_ascii_case("close") {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    // Never let a client strip what Tether itself sets or relies on.
                    if name != header::HOST && name != X_FORWARDED_FOR {
                        named.push(name);
                    }
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TE);
    headers.remove(header::TRANSFER_ENCODING);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_connection_named_and_fixed_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret, close"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn keeps_upgrade_headers_for_an_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
    }

    #[test]
    fn connection_cannot_strip_host() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("host"));
        h.insert(header::HOST, HeaderValue::from_static("shop.example"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.contains_key(header::HOST));
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("shop.example:8080"), "shop.example");
        assert_eq!(strip_port("shop.example"), "shop.example");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}

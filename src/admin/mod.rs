//! The admin listener: a JSON API to see and act on pools and backends, Prometheus
//! metrics, and a live dashboard. It has its own socket, never shared with traffic
//! listeners, and is plain HTTP/1.1.
//!
//! Authorization: with `admin.token` set, every write needs `Authorization: Bearer TOKEN`;
//! bound off loopback (which config allows only with a token), reads need it too. The
//! token and bind address are read from `Control` for every request, so a reload that
//! changes them applies at once.
//!
//! Web pages: a page of another site must not act through a browser that can reach this
//! listener. A `Host` that is not a loopback name or address, nor the address the
//! connection came in on, is answered 421 (DNS rebinding: a page of `evil.example` whose
//! name now points to 127.0.0.1); a write whose `Origin` is not this listener's, or that a
//! browser calls `cross-site` or `same-site`, is answered 403 (form posts need no CORS
//! preflight). Every answer forbids framing.

pub mod metrics;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::affinity::explain::KeyError;
use crate::affinity::verdict::Verdict;
use crate::backend::Backend;
use crate::config::{self, AdminState};
use crate::control::{BackendAction, Control, ReloadError, SplitError};
use crate::net;
use crate::pool::{Pool, Snapshot};

const DASHBOARD: &str = include_str!("dashboard.html");

/// Accepts admin connections until shutdown or until `stopped` says this listener was
/// replaced (a reload moved it) or removed.
pub async fn serve(listener: TcpListener, control: Arc<Control>, mut stopped: watch::Receiver<bool>) {
    let mut shutdown = control.shutdown_signal();
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.changed() => return,
            _ = stopped.changed() => {
                if let Ok(a) = listener.local_addr() {
                    tracing::info!(listener = "admin", "admin listener on {a} closed");
                }
                return;
            }
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("admin accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // The address this connection came in on is one of the names the Host may give.
        let local = stream.local_addr().ok();
        let control = control.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let control = control.clone();
                async move { Ok::<_, Infallible>(respond(req, &control, local).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

type Reply = Response<Full<Bytes>>;

fn json_reply(status: StatusCode, v: &Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(serde_json::to_vec_pretty(v).unwrap_or_default())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn error(status: StatusCode, msg: impl Into<String>) -> Reply {
    json_reply(status, &json!({ "error": msg.into() }))
}

fn authorized(req: &Request<Incoming>, cfg: &config::Admin) -> bool {
    let Some(token) = &cfg.token else { return true };
    let Some(got) = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let Some(got) = got.strip_prefix("Bearer ") else { return false };
    // Compare in constant time: the length leaks, the contents do not.
    got.len() == token.len() && got.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Splits a path into percent-decoded segments.
fn segments(path: &str) -> Vec<String> {
    path.split('/').filter(|s| !s.is_empty()).map(percent_decode).collect()
}

/// Decodes `%XX` escapes and `+`, byte by byte: anything that is not a valid escape is
/// kept as it is, and bytes that are not UTF-8 become U+FFFD. Never panics.
fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `host` (a `Host` header or a URI's authority) names this listener: `localhost`,
/// a loopback address, the configured bind address or the address the connection came in
/// on, with or without a port. Any other name may be a DNS-rebinding page's.
fn host_allowed(host: &str, bind: Option<SocketAddr>, local: Option<SocketAddr>) -> bool {
    let host = host.trim();
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, "")) => (ip, None),
            Some((ip, tail)) => match tail.strip_prefix(':') {
                Some(p) => (ip, Some(p)),
                None => return false,
            },
            None => return false,
        },
        None => match host.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return false,
            None => (host, None),
        },
    };
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return false;
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let Ok(ip) = name.parse::<IpAddr>() else { return false };
    let ip = net::canonical(ip);
    let known = |a: Option<SocketAddr>| a.is_some_and(|a| !a.ip().is_unspecified() && net::canonical(a.ip()) == ip);
    ip.is_loopback() || known(bind) || known(local)
}

/// Whether every `Host` header and the URI's authority (if any) name this listener. A
/// request with neither (HTTP/1.0) cannot come from a browser page and passes.
fn hosts_allowed<B>(req: &Request<B>, bind: Option<SocketAddr>, local: Option<SocketAddr>) -> bool {
    let headers = req.headers().get_all(header::HOST).iter();
    let from_headers = headers.map(|v| v.to_str().is_ok_and(|h| host_allowed(h, bind, local)));
    let from_uri = req.uri().authority().map(|a| host_allowed(a.as_str(), bind, local));
    from_headers.chain(from_uri).all(|ok| ok)
}

/// Why a write must be refused as coming from another site's page, if it must: a browser
/// says so in `Sec-Fetch-Site`, or the page's `Origin` is not this listener's.
fn cross_site<B>(req: &Request<B>) -> Option<&'static str> {
    let site = req.headers().get("sec-fetch-site").map(HeaderValue::as_bytes);
    if site.is_some_and(|s| s.eq_ignore_ascii_case(b"cross-site") || s.eq_ignore_ascii_case(b"same-site")) {
        return Some("the browser says this write comes from another site's page");
    }
    let origin = req.headers().get(header::ORIGIN)?;
    let host = req.uri().authority().map(|a| a.as_str()).or_else(|| {
        let h = req.headers().get(header::HOST)?;
        h.to_str().ok()
    });
    match (origin.to_str(), host) {
        (Ok(origin), Some(host)) if same_origin(origin, host) => None,
        _ => Some("the Origin of this write is not the admin listener"),
    }
}

/// Whether `origin` (`scheme://host[:port]`) is the origin of a page served as `host`.
fn same_origin(origin: &str, host: &str) -> bool {
    let (authority, default_port) = if let Some(a) = origin.strip_prefix("http://") {
        (a, "80")
    } else if let Some(a) = origin.strip_prefix("https://") {
        (a, "443")
    } else {
        return false; // "null" (a sandboxed or file page) and anything else
    };
    let strip_default = |a: &str| -> String {
        let a = a.to_ascii_lowercase();
        match a.strip_suffix(default_port).and_then(|r| r.strip_suffix(':')) {
            Some(r) if !r.is_empty() && (r.ends_with(']') || !r.contains(':')) => r.to_string(),
            _ => a,
        }
    };
    strip_default(authority) == strip_default(host.trim())
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

/// One admin request, answered with headers that forbid framing the answer.
async fn respond(req: Request<Incoming>, control: &Control, local: Option<SocketAddr>) -> Reply {
    let mut r = handle(req, control, local).await;
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("frame-ancestors 'none'"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    r
}

/// One admin request: the host it names, where a write comes from, authorization, then
/// the endpoint its method and path name.
async fn handle(req: Request<Incoming>, control: &Control, local: Option<SocketAddr>) -> Reply {
    // The settings in force now: a reload may have changed the token since this
    // connection opened.
    let Some(cfg) = control.admin_config() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the admin listener was removed from the config");
    };
    if !hosts_allowed(&req, Some(cfg.bind), local) {
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            "this admin listener answers only to Host localhost, a loopback address or its own address",
        );
    }
    let write = req.method() != Method::GET && req.method() != Method::HEAD;
    if write {
        if let Some(why) = cross_site(&req) {
            return error(StatusCode::FORBIDDEN, format!("{why}: writes are refused from other sites' pages"));
        }
    }
    let cfg = &*cfg;
    if (write || !cfg.bind.ip().is_loopback()) && !authorized(&req, cfg) {
        let mut r = error(StatusCode::UNAUTHORIZED, "this needs Authorization: Bearer <admin.token>");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let path = segments(req.uri().path());
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    let method = req.method().clone();
    match (&method, p.as_slice()) {
        (&Method::GET, []) => page(DASHBOARD, "text/html; charset=utf-8"),
        (&Method::GET, ["metrics"]) => {
            page(metrics::render(&control.shared), "application/openmetrics-text; version=1.0.0; charset=utf-8")
        }
        (&Method::GET, ["api", "pools"]) => {
            let snap = control.shared.snapshot.load_full();
            let dns = control.shared.dns.all();
            let pools: Vec<Value> = snap.pools.iter().map(|p| pool_json(p, &dns)).collect();
            json_reply(StatusCode::OK, &json!({ "time_ms": crate::time::unix_millis(), "pools": pools }))
        }
        (&Method::GET, ["api", "pools", pool]) => match control.shared.snapshot.load_full().pool(pool) {
            Some(p) => json_reply(StatusCode::OK, &pool_json(p, &control.shared.dns.all())),
            None => error(StatusCode::NOT_FOUND, format!("no pool \"{pool}\"")),
        },
        (&Method::POST, ["api", "pools", pool, "backends", backend, action]) => {
            let state = match *action {
                "drain" => AdminState::Draining,
                "enable" => AdminState::Enabled,
                "disable" => AdminState::Disabled,
                other => {
                    let msg = format!("no action \"{other}\": expected drain, enable or disable");
                    return error(StatusCode::NOT_FOUND, msg);
                }
            };
            act(control, pool, backend, BackendAction::State(state)).await
        }
        (&Method::PUT, ["api", "pools", pool, "backends", backend, "weight"]) => {
            let (pool, backend) = (pool.to_string(), backend.to_string());
            set_weight(control, &pool, &backend, req).await
        }
        (&Method::GET | &Method::DELETE, ["api", "pools", pool, "sessions"]) => {
            sessions(control, &req, pool, method == Method::DELETE)
        }
        (&Method::GET, ["api", "splits"]) => {
            let snap = control.shared.snapshot.load_full();
            json_reply(StatusCode::OK, &json!({ "time_ms": crate::time::unix_millis(), "splits": splits_json(&snap) }))
        }
        (&Method::PUT, ["api", "splits", split, "weights"]) => {
            let split = split.to_string();
            set_split_weights(control, &split, req).await
        }
        (&Method::DELETE, ["api", "splits", split, "weights"]) => split_reply(control.split_reset(split)),
        (&Method::GET, ["api", "splits", split, "sessions"]) => split_session(control, &req, split),
        (&Method::POST, ["api", "reload"]) => reload(control),
        (&Method::GET, ["api", "fleet"]) => fleet(control).await,
        (_, ["api", ..]) | (_, ["metrics"]) => {
            error(StatusCode::NOT_FOUND, format!("no such endpoint: {} {}", method, req.uri().path()))
        }
        _ => error(StatusCode::NOT_FOUND, "not found: the dashboard is at /, the API under /api/, metrics at /metrics"),
    }
}

/// `GET /api/fleet`: the fleet's store and the instances it has seen recently.
async fn fleet(control: &Control) -> Reply {
    let snap = control.shared.snapshot.load_full();
    let Some(f) = crate::fleet::store(&snap) else {
        return json_reply(StatusCode::OK, &json!({ "store": null, "instances": [] }));
    };
    let now = crate::time::unix_millis();
    let (instances, error) = match f.instances().await {
        Ok(list) => (list, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let me = f.instance_id();
    let instances: Vec<Value> = instances
        .iter()
        .map(|i| {
            json!({
                "id": i.id,
                "host": i.host,
                "pid": i.pid,
                "seen_ms_ago": now.saturating_sub(i.seen_ms),
                "this": i.id == me,
            })
        })
        .collect();
    // Each backend's distinct sessions over the fleet, within its pool's window.
    let mut sessions = Vec::new();
    for p in &snap.pools {
        let Some((_, window)) = &p.fleet else { continue };
        let names: Vec<(String, String)> = p.backends.iter().map(|b| (p.name.to_string(), b.name.clone())).collect();
        if let Ok(counts) = f.fleet_sessions(&names, *window).await {
            for ((pool, backend), n) in names.into_iter().zip(counts) {
                sessions.push(json!({ "pool": pool, "backend": backend, "sessions": n, "window_s": window.as_secs() }));
            }
        }
    }
    json_reply(
        StatusCode::OK,
        &json!({
            "store": f.cfg.name,
            "up": f.is_up(),
            "instance": me,
            "instances": instances,
            "sessions": sessions,
            "error": error,
        }),
    )
}

fn page(body: impl Into<Bytes>, content_type: &'static str) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// `PUT .../weight` with `{"weight": N}`.
async fn set_weight(control: &Control, pool: &str, backend: &str, req: Request<Incoming>) -> Reply {
    let body = match Limited::new(req.into_body(), 4096).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::BAD_REQUEST, "the body must be at most 4 KiB of JSON"),
    };
    let weight = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v.get("weight")?.as_u64());
    match weight {
        Some(w) if (1..=u64::from(config::MAX_WEIGHT)).contains(&w) => {
            act(control, pool, backend, BackendAction::Weight(w as u32)).await
        }
        _ => error(
            StatusCode::BAD_REQUEST,
            format!("expected a JSON body like {{\"weight\": 3}} with a weight from 1 to {}", config::MAX_WEIGHT),
        ),
    }
}

/// `PUT /api/splits/NAME/weights` with `{"weights": {"POOL": N, ...}}`: the pools named
/// take those weights, the others keep theirs.
async fn set_split_weights(control: &Control, split: &str, req: Request<Incoming>) -> Reply {
    let body = match Limited::new(req.into_body(), 4096).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::BAD_REQUEST, "the body must be at most 4 KiB of JSON"),
    };
    let usage = format!(
        "expected a JSON body like {{\"weights\": {{\"blue\": 90, \"green\": 10}}}} with weights from 0 to {}",
        config::MAX_SPLIT_WEIGHT
    );
    let Some(given) = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v.get("weights")?.as_object().cloned())
    else {
        return error(StatusCode::BAD_REQUEST, usage);
    };
    let mut weights = Vec::new();
    for (pool, w) in given {
        match w.as_u64().filter(|w| *w <= u64::from(config::MAX_SPLIT_WEIGHT)) {
            Some(w) => weights.push((pool, w as u32)),
            None => return error(StatusCode::BAD_REQUEST, format!("pool \"{pool}\": {usage}")),
        }
    }
    if weights.is_empty() {
        return error(StatusCode::BAD_REQUEST, usage);
    }
    split_reply(control.split_weights(split, &weights))
}

/// The split's weights after a change, or why there was none: a split that does not exist
/// is 404, a pool it does not have or a weight out of range 400, weights that would all be
/// 0 a conflict (409).
fn split_reply(r: Result<Vec<(String, u32)>, SplitError>) -> Reply {
    match r {
        Ok(weights) => {
            let weights: serde_json::Map<String, Value> = weights.into_iter().map(|(p, w)| (p, json!(w))).collect();
            json_reply(StatusCode::OK, &json!({ "weights": weights }))
        }
        Err(e) => {
            let status = match e {
                SplitError::NoSplit(_) => StatusCode::NOT_FOUND,
                SplitError::NotInSplit { .. } | SplitError::TooHeavy { .. } => StatusCode::BAD_REQUEST,
                SplitError::AllZero(_) => StatusCode::CONFLICT,
            };
            error(status, e.to_string())
        }
    }
}

/// `GET /api/splits/NAME/sessions?key=VALUE[&kind=KIND]`: the pool a session key leads to
/// in the split now, and why.
fn split_session(control: &Control, req: &Request<Incoming>, split: &str) -> Reply {
    let Some(key) = query_param(req, "key") else {
        return error(
            StatusCode::BAD_REQUEST,
            "give the affinity key as ?key=VALUE (and optionally &kind=cookie|app_cookie|header|query|client_ip)",
        );
    };
    let kind = query_param(req, "kind");
    let snap = control.shared.snapshot.load_full();
    let Some(s) = snap.split(split) else {
        return error(StatusCode::NOT_FOUND, format!("no split \"{split}\""));
    };
    let affinity = |p: usize| snap.pools.get(p)?.affinity.as_ref();
    match s.explain(affinity, kind.as_deref(), &key, crate::time::unix_millis()) {
        Ok(found) => json_reply(
            StatusCode::OK,
            &json!({ "split": split, "key": key, "kind": found.kind, "pool": found.pool.as_deref(), "why": found.why }),
        ),
        Err(e) => key_error(&e),
    }
}

/// Every split: where it is (listener, host, path prefix), and per pool its weight,
/// requests, the sessions it placed there, and the pool's live sessions.
fn splits_json(snap: &Snapshot) -> Vec<Value> {
    let mut out = Vec::new();
    for l in &snap.config.listeners {
        for r in &l.routes {
            let config::RouteTo::Split(s) = &r.to else { continue };
            let Some(live) = snap.split(&s.name) else { continue };
            let pools: Vec<Value> = live
                .members
                .iter()
                .map(|m| {
                    // The pool's live sessions as its backends count them (from every
                    // route to it): what a pool at weight 0 still holds.
                    let live: u64 =
                        snap.pools.get(m.pool).map_or(0, |p| p.backends.iter().map(|b| u64::from(b.sessions())).sum());
                    json!({
                        "pool": &*m.name,
                        "weight": m.weight,
                        "requests": m.stats.requests.load(std::sync::atomic::Ordering::Relaxed),
                        "sessions": m.stats.sessions.load(std::sync::atomic::Ordering::Relaxed),
                        "live_sessions": live,
                    })
                })
                .collect();
            out.push(json!({
                "name": s.name, "listener": l.name, "host": r.host, "path_prefix": r.path_prefix,
                "learned_keys": live.store.table.len(), "pools": pools,
            }));
        }
    }
    out
}

/// `GET` explains where a session key leads; `DELETE` forgets a learned pin.
fn sessions(control: &Control, req: &Request<Incoming>, pool: &str, unpin: bool) -> Reply {
    let Some(key) = query_param(req, "key") else {
        return error(
            StatusCode::BAD_REQUEST,
            "give the affinity key as ?key=VALUE (and optionally &kind=cookie|app_cookie|header|query|client_ip)",
        );
    };
    let kind = query_param(req, "kind");
    let snap = control.shared.snapshot.load_full();
    let Some(p) = snap.pool(pool) else {
        return error(StatusCode::NOT_FOUND, format!("no pool \"{pool}\""));
    };
    let Some(a) = &p.affinity else {
        return error(StatusCode::CONFLICT, format!("pool \"{pool}\" has no affinity"));
    };
    let found = match a.explain(&p.backends, kind.as_deref(), &key, crate::time::unix_millis()) {
        Ok(f) => f,
        Err(e) => return key_error(&e),
    };
    if unpin {
        return match a.unpin_pin(found.kind, &key) {
            Ok((pin, here)) => {
                // A shared pin is forgotten by the whole fleet, even when this instance
                // had no copy of it.
                if let (Some(link), Some(pin)) = (&p.shared, pin) {
                    link.forget(pin);
                }
                if here {
                    json_reply(StatusCode::OK, &json!({ "unpinned": true, "kind": found.kind, "key": key }))
                } else {
                    error(StatusCode::NOT_FOUND, format!("no {} session for that key", found.kind))
                }
            }
            Err(e) => key_error(&e),
        };
    }
    json_reply(
        StatusCode::OK,
        &json!({
            "pool": pool, "key": key, "kind": found.kind,
            "backend": found.backend.and_then(|i| p.backends.get(i)).map(|b| b.name.clone()),
            "why": found.why,
        }),
    )
}

fn reload(control: &Control) -> Reply {
    match control.reload() {
        Ok(changes) => json_reply(StatusCode::OK, &json!({ "reloaded": true, "changes": changes })),
        Err(e) => {
            // Nothing to re-read is a conflict with how Tether was started; a file that
            // cannot be applied is unprocessable.
            let status = match e {
                ReloadError::NotFromFile => StatusCode::CONFLICT,
                ReloadError::Invalid(_) | ReloadError::Listener(_) => StatusCode::UNPROCESSABLE_ENTITY,
            };
            let text = e.to_string();
            json_reply(
                status,
                &json!({ "reloaded": false, "error": "the config was rejected; the running one stays in force", "errors": text.lines().collect::<Vec<_>>() }),
            )
        }
    }
}

/// A bad key is the caller's mistake (400); a key whose kind holds no pin to remove is a
/// request that conflicts with how that kind works (409).
fn key_error(e: &KeyError) -> Reply {
    let status = match e {
        KeyError::NotAnIp(_) | KeyError::NoSuchKind(_) => StatusCode::BAD_REQUEST,
        KeyError::TokenPin | KeyError::Stateless => StatusCode::CONFLICT,
    };
    error(status, e.to_string())
}

/// An admin action on a backend, applied here and shared with the fleet; the reply's
/// `fleet` says which (`local`, `shared`, or `pending: WHY` while Redis does not answer).
async fn act(control: &Control, pool: &str, backend: &str, action: BackendAction) -> Reply {
    match crate::fleet::act(control, pool, backend, action).await {
        Ok((b, shared)) => {
            let snap = control.shared.snapshot.load_full();
            let mut v = backend_json(snap.pool(pool), &b);
            v["fleet"] = Value::String(shared.describe());
            json_reply(StatusCode::OK, &v)
        }
        // Both errors say the pool or backend does not exist.
        Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
    }
}

/// A pool, its backends, and its DNS sources with the result of their last lookup
/// (`dns`: the stats of every pool's sources, by (pool, source key)).
fn pool_json(p: &Pool, dns: &[((String, String), crate::dns::SourceStats)]) -> Value {
    let affinity = p.affinity.as_ref().map(|a| a.cfg.keys.iter().map(|k| k.kind()).collect::<Vec<_>>().join(","));
    let sources: Vec<Value> = p
        .config
        .dns
        .iter()
        .map(|s| {
            let key = s.key();
            let stats = dns.iter().find(|((pool, k), _)| **pool == *p.name && *k == key).map(|(_, st)| st);
            json!({
                "source": key,
                "interval_ms": s.interval.as_millis() as u64,
                "last_lookup": stats.and_then(|st| st.last),
                "backends": stats.map_or(0, |st| st.backends),
                "lookups": stats.map(|st| st.lookups.clone()).unwrap_or_default(),
            })
        })
        .collect();
    json!({
        "name": &*p.name,
        "algorithm": p.config.algorithm.as_str(),
        "affinity": affinity,
        "dns": sources,
        // Moving idle sessions off backends over `factor` times the mean; null when off.
        "rebalance": p.affinity.as_ref().and_then(|a| a.cfg.rebalance).map(|r| json!({
            "factor": r.factor, "idle_ms": r.idle.as_millis() as u64, "max_per_second": r.max_per_second,
        })),
        // The shared store this pool's pins go through, and whether Redis answers.
        "store": p.shared.as_ref().map(|l| json!({
            "name": l.fleet.cfg.name, "up": l.fleet.is_up(), "queued_writes": l.fleet.queued(),
        })),
        "backends": p.backends.iter().map(|b| backend_json(Some(p), b)).collect::<Vec<_>>(),
    })
}

fn backend_json(p: Option<&Pool>, b: &Arc<Backend>) -> Value {
    let weight = p.and_then(|p| p.config.backends.iter().find(|c| c.name == b.name)).map_or(1, |c| c.weight);
    let state = b.admin_state();
    let hits = b.verdicts[Verdict::Hit.index()].load(std::sync::atomic::Ordering::Relaxed);
    json!({
        "name": b.name,
        "address": b.address_text,
        "weight": weight,
        "health": if b.is_healthy() { "up" } else { "down" },
        "admin_state": state.as_str(),
        "in_flight": b.load(),
        "requests": b.requests.load(std::sync::atomic::Ordering::Relaxed),
        "requests_per_second": b.metrics.rate_milli.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1000.0,
        "sessions": b.sessions(),
        "affinity_hits": hits,
        "draining_since_ms": (state == AdminState::Draining).then(|| b.draining_since()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decode_works_on_bytes_and_never_panics() {
        assert_eq!(percent_decode("%e4%b8%ad"), "中");
        assert_eq!(percent_decode("a%2Fb+c"), "a/b c");
        // A '%' followed by a multi-byte character: kept as it is, no slicing inside it.
        assert_eq!(percent_decode("%a中"), "%a中");
        assert_eq!(percent_decode("%中"), "%中");
        assert_eq!(percent_decode("中%"), "中%");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
        // Every string of these pieces, up to three long, decodes without a panic.
        let pieces = ["%", "a", "4", "中", "é", "+", "%e4", "\u{10348}"];
        for x in pieces {
            for y in pieces {
                for z in pieces {
                    let _ = percent_decode(&format!("{x}{y}{z}"));
                }
            }
        }
    }

    #[test]
    fn only_loopback_and_own_addresses_are_hosts() {
        let bind: Option<SocketAddr> = "127.0.0.1:9901".parse().ok();
        let public: Option<SocketAddr> = "10.0.0.5:9901".parse().ok();
        let any: Option<SocketAddr> = "0.0.0.0:9901".parse().ok();
        for ok in ["localhost", "LocalHost:9901", "localhost.", "127.0.0.1", "127.0.0.1:9901", "[::1]", "[::1]:80"] {
            assert!(host_allowed(ok, bind, None), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9901",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.5",
            "0.0.0.0",
            "[::]",
            "::1",
            "[::1",
            "[::1]x",
            "localhost:http",
            "localhost:99999",
            "",
        ] {
            assert!(!host_allowed(bad, bind, None), "{bad}");
        }
        // Bound off loopback: its own address is a host; an unspecified bind is not.
        assert!(host_allowed("10.0.0.5:9901", public, None));
        assert!(!host_allowed("0.0.0.0:9901", any, None));
        assert!(host_allowed("10.0.0.5:9901", any, public));
    }

    #[test]
    fn same_origin_compares_scheme_host_and_port() {
        assert!(same_origin("http://127.0.0.1:9901", "127.0.0.1:9901"));
        assert!(same_origin("http://LOCALHOST:9901", "localhost:9901"));
        assert!(same_origin("http://localhost", "localhost:80"));
        assert!(same_origin("http://[::1]:80", "[::1]"));
        assert!(!same_origin("http://127.0.0.1:8080", "127.0.0.1:9901"));
        assert!(!same_origin("http://evil.example", "127.0.0.1:9901"));
        assert!(!same_origin("null", "127.0.0.1:9901"));
        assert!(!same_origin("http://127.0.0.1:9901.evil.example", "127.0.0.1:9901"));
    }
}

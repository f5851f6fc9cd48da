//! The admin listener: a JSON API to see and act on pools and backends, Prometheus
//! metrics, and a live dashboard. It has its own socket, never shared with traffic
//! listeners, and is plain HTTP/1.1.
//!
//! Authorization: with `admin.token` set, every write needs `Authorization: Bearer TOKEN`;
//! bound off loopback (which config allows only with a token), reads need it too.

pub mod metrics;

use std::convert::Infallible;
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
use crate::control::{BackendAction, Control, ReloadError};
use crate::pool::Pool;

const DASHBOARD: &str = include_str!("dashboard.html");

/// Accepts admin connections until shutdown.
pub async fn serve(
    listener: TcpListener,
    control: Arc<Control>,
    cfg: config::Admin,
    mut shutdown: watch::Receiver<bool>,
) {
    let cfg = Arc::new(cfg);
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.changed() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("admin accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (control, cfg) = (control.clone(), cfg.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let (control, cfg) = (control.clone(), cfg.clone());
                async move { Ok::<_, Infallible>(handle(req, &control, &cfg).await) }
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

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

/// One admin request: authorization, then the endpoint its method and path name.
async fn handle(req: Request<Incoming>, control: &Control, cfg: &config::Admin) -> Reply {
    let write = req.method() != Method::GET && req.method() != Method::HEAD;
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
            let pools: Vec<Value> = snap.pools.iter().map(pool_json).collect();
            json_reply(StatusCode::OK, &json!({ "time_ms": crate::time::unix_millis(), "pools": pools }))
        }
        (&Method::GET, ["api", "pools", pool]) => match control.shared.snapshot.load_full().pool(pool) {
            Some(p) => json_reply(StatusCode::OK, &pool_json(p)),
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
            act(control, pool, backend, BackendAction::State(state))
        }
        (&Method::PUT, ["api", "pools", pool, "backends", backend, "weight"]) => {
            let (pool, backend) = (pool.to_string(), backend.to_string());
            set_weight(control, &pool, &backend, req).await
        }
        (&Method::GET | &Method::DELETE, ["api", "pools", pool, "sessions"]) => {
            sessions(control, &req, pool, method == Method::DELETE)
        }
        (&Method::POST, ["api", "reload"]) => reload(control),
        (_, ["api", ..]) | (_, ["metrics"]) => {
            error(StatusCode::NOT_FOUND, format!("no such endpoint: {} {}", method, req.uri().path()))
        }
        _ => error(StatusCode::NOT_FOUND, "not found: the dashboard is at /, the API under /api/, metrics at /metrics"),
    }
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
            act(control, pool, backend, BackendAction::Weight(w as u32))
        }
        _ => error(
            StatusCode::BAD_REQUEST,
            format!("expected a JSON body like {{\"weight\": 3}} with a weight from 1 to {}", config::MAX_WEIGHT),
        ),
    }
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
        return match a.unpin(found.kind, &key) {
            Ok(true) => json_reply(StatusCode::OK, &json!({ "unpinned": true, "kind": found.kind, "key": key })),
            Ok(false) => error(StatusCode::NOT_FOUND, format!("no {} session for that key", found.kind)),
            Err(e) => key_error(&e),
        };
    }
    json_reply(
        StatusCode::OK,
        &json!({
            "pool": pool, "key": key, "kind": found.kind,
            "backend": found.backend.map(|i| p.backends[i].name.clone()),
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

fn act(control: &Control, pool: &str, backend: &str, action: BackendAction) -> Reply {
    match control.backend_action(pool, backend, action) {
        Ok(b) => {
            let snap = control.shared.snapshot.load_full();
            json_reply(StatusCode::OK, &backend_json(snap.pool(pool), &b))
        }
        // Both errors say the pool or backend does not exist.
        Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
    }
}

fn pool_json(p: &Pool) -> Value {
    let affinity = p.affinity.as_ref().map(|a| a.cfg.keys.iter().map(|k| k.kind()).collect::<Vec<_>>().join(","));
    json!({
        "name": &*p.name,
        "algorithm": p.config.algorithm.as_str(),
        "affinity": affinity,
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

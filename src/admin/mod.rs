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

use crate::affinity::Verdict;
use crate::config::{self, AdminState};
use crate::pool::{Backend, Pool};
use crate::server::{BackendAction, Control};

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
        (&Method::GET, []) => {
            let mut r = Response::new(Full::new(Bytes::from_static(DASHBOARD.as_bytes())));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            r
        }
        (&Method::GET, ["metrics"]) => {
            let mut r = Response::new(Full::new(Bytes::from(metrics::render(&control.shared))));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        (&Method::GET, ["api", "pools"]) => {
            let snap = control.shared.snapshot.load_full();
            let pools: Vec<Value> = snap.pools.iter().map(pool_json).collect();
            json_reply(StatusCode::OK, &json!({ "time_ms": crate::time::unix_millis(), "pools": pools }))
        }
        (&Method::GET, ["api", "pools", pool]) => {
            let snap = control.shared.snapshot.load_full();
            match snap.pools.iter().find(|p| &*p.name == *pool) {
                Some(p) => json_reply(StatusCode::OK, &pool_json(p)),
                None => error(StatusCode::NOT_FOUND, format!("no pool \"{pool}\"")),
            }
        }
        (&Method::POST, ["api", "pools", pool, "backends", backend, action]) => {
            let state = match *action {
                "drain" => AdminState::Draining,
                "enable" => AdminState::Enabled,
                "disable" => AdminState::Disabled,
                other => {
                    return error(
                        StatusCode::NOT_FOUND,
                        format!("no action \"{other}\": expected drain, enable or disable"),
                    )
                }
            };
            act(control, pool, backend, BackendAction::State(state))
        }
        (&Method::PUT, ["api", "pools", pool, "backends", backend, "weight"]) => {
            let (pool, backend) = (pool.to_string(), backend.to_string());
            let body = match Limited::new(req.into_body(), 4096).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return error(StatusCode::BAD_REQUEST, "the body must be at most 4 KiB of JSON"),
            };
            let weight = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v.get("weight")?.as_u64());
            match weight {
                Some(w) if (1..=u64::from(config::MAX_WEIGHT)).contains(&w) => {
                    act(control, &pool, &backend, BackendAction::Weight(w as u32))
                }
                _ => error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "expected a JSON body like {{\"weight\": 3}} with a weight from 1 to {}",
                        config::MAX_WEIGHT
                    ),
                ),
            }
        }
        (&Method::GET | &Method::DELETE, ["api", "pools", pool, "sessions"]) => {
            let Some(key) = query_param(&req, "key") else {
                return error(StatusCode::BAD_REQUEST, "give the affinity key as ?key=VALUE (and optionally &kind=cookie|app_cookie|header|query|client_ip)");
            };
            let kind = query_param(&req, "kind");
            let snap = control.shared.snapshot.load_full();
            let Some(p) = snap.pools.iter().find(|p| &*p.name == *pool) else {
                return error(StatusCode::NOT_FOUND, format!("no pool \"{pool}\""));
            };
            let Some(a) = &p.affinity else {
                return error(StatusCode::CONFLICT, format!("pool \"{pool}\" has no affinity"));
            };
            let found = match a.explain(p, kind.as_deref(), &key, crate::time::unix_millis()) {
                Ok(f) => f,
                Err(e) => return error(StatusCode::BAD_REQUEST, e),
            };
            if method == Method::DELETE {
                return match a.unpin(found.kind, &key) {
                    Ok(true) => {
                        json_reply(StatusCode::OK, &json!({ "unpinned": true, "kind": found.kind, "key": key }))
                    }
                    Ok(false) => error(StatusCode::NOT_FOUND, format!("no {} session for that key", found.kind)),
                    Err(e) => error(StatusCode::CONFLICT, e),
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
        (&Method::POST, ["api", "reload"]) => match control.reload() {
            Ok(changes) => json_reply(StatusCode::OK, &json!({ "reloaded": true, "changes": changes })),
            Err(e) => json_reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({ "reloaded": false, "error": "the config was rejected; the running one stays in force", "errors": e.lines().collect::<Vec<_>>() }),
            ),
        },
        (_, ["api", ..]) | (_, ["metrics"]) => {
            error(StatusCode::NOT_FOUND, format!("no such endpoint: {} {}", method, req.uri().path()))
        }
        _ => error(StatusCode::NOT_FOUND, "not found: the dashboard is at /, the API under /api/, metrics at /metrics"),
    }
}

fn act(control: &Control, pool: &str, backend: &str, action: BackendAction) -> Reply {
    match control.backend_action(pool, backend, action) {
        Ok(()) => {
            let snap = control.shared.snapshot.load_full();
            let p = snap.pools.iter().find(|p| &*p.name == pool).expect("the pool was just found");
            let b = p.backends.iter().find(|b| b.name == backend).expect("the backend was just found");
            json_reply(StatusCode::OK, &backend_json(p, b))
        }
        Err(e) => error(StatusCode::NOT_FOUND, e),
    }
}

fn pool_json(p: &Pool) -> Value {
    let affinity = p.affinity.as_ref().map(|a| a.cfg.keys.iter().map(|k| k.kind()).collect::<Vec<_>>().join(","));
    json!({
        "name": &*p.name,
        "algorithm": p.config.algorithm.as_str(),
        "affinity": affinity,
        "backends": p.backends.iter().map(|b| backend_json(p, b)).collect::<Vec<_>>(),
    })
}

fn backend_json(p: &Pool, b: &Arc<Backend>) -> Value {
    let weight = p.config.backends.iter().find(|c| c.name == b.name).map_or(1, |c| c.weight);
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

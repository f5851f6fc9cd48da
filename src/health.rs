//! Active health checks: one supervisor task wakes every 100 ms, starts the checks that
//! are due (each on its own connection, never counted as traffic, jittered so they do not
//! march in step) and ends passive ejections whose time is up. What a result does to a
//! backend's health is the backend's own state machine (`crate::backend::health`).

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::backend::Backend;
use crate::config::{CheckKind, Health};
use crate::proxy_header::{Header, Version};
use crate::state::Shared;
use crate::time::unix_millis;
use crate::upstream::{ConnectError, Upstream};
use bytes::Bytes;

/// Why an active check failed.
#[derive(Debug)]
pub enum ProbeError {
    Connect(ConnectError),
    Send(io::Error),
    Read(io::Error),
    Timeout(Duration),
    NotHttp,
    Status(u16),
    /// The body did not contain the expected text.
    Body(String),
    /// The HTTP/2 exchange failed.
    Http2(String),
    /// A gRPC health check's answer was not SERVING.
    Grpc(String),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::Connect(e) => write!(f, "{e}"),
            ProbeError::Send(e) => write!(f, "send: {e}"),
            ProbeError::Read(e) => write!(f, "read: {e}"),
            ProbeError::Timeout(d) => write!(f, "no answer within {d:?}"),
            ProbeError::NotHttp => f.write_str("not an HTTP response"),
            ProbeError::Status(s) => write!(f, "status {s}"),
            ProbeError::Body(want) => write!(f, "body does not contain {want:?}"),
            ProbeError::Http2(e) => write!(f, "HTTP/2: {e}"),
            ProbeError::Grpc(e) => write!(f, "gRPC health: {e}"),
        }
    }
}

/// Runs the checks and ends ejections, until shutdown.
pub async fn supervise(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        let now = unix_millis();
        let snapshot = shared.snapshot.load_full();
        for pool in &snapshot.pools {
            for b in &pool.backends {
                b.end_ejection_if_due(now);
            }
            let Some(cfg) = &pool.config.health else {
                pool.backends.iter().for_each(|b| b.forget_checks());
                continue;
            };
            let proxy = pool.config.send_proxy_protocol;
            for (b, upstream) in pool.backends.iter().zip(&pool.upstreams).filter(|(b, _)| b.health.claim_check(now)) {
                let (b, upstream, cfg) = (b.clone(), upstream.clone(), cfg.clone());
                tokio::spawn(async move {
                    let result = probe(&b, &upstream, &cfg, proxy).await;
                    b.record_check(&cfg, result);
                    // ±10% jitter so checks of many backends do not march in step.
                    let base = cfg.interval.as_millis() as u64;
                    let jitter = crate::random::random_below((base / 5).max(1) as usize) as u64;
                    b.health.check_done(unix_millis() + base - base / 10 + jitter);
                });
            }
        }
    }
}

/// One check on its own connection, made the way the pool's requests reach the backend
/// (over TLS and HTTP/2 when the pool's are). To a pool that sends the PROXY protocol, the
/// check sends a header too (one that names no client: v1 `UNKNOWN`, v2 `LOCAL`), since
/// such backends refuse connections without one.
async fn probe(b: &Backend, upstream: &Upstream, cfg: &Health, proxy: Option<Version>) -> Result<(), ProbeError> {
    match tokio::time::timeout(cfg.timeout, probe_inner(b, upstream, cfg, proxy)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout(cfg.timeout)),
    }
}

async fn probe_inner(b: &Backend, upstream: &Upstream, cfg: &Health, proxy: Option<Version>) -> Result<(), ProbeError> {
    if upstream.is_http2() {
        return probe_h2(b, upstream, cfg).await;
    }
    let header = proxy.map(Header::local);
    let mut stream = upstream.connect(header.as_ref().map(|h| h.as_bytes())).await.map_err(ProbeError::Connect)?;
    let CheckKind::Http { method, path, host, expect_status, expect_body } = &cfg.check else {
        return Ok(());
    };
    let host = host.as_deref().unwrap_or(&b.address_text);
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tether-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(ProbeError::Send)?;
    // Read the whole (short) answer: the connection closes after it.
    let mut answer = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(n) => n,
            // A TLS backend that closes without `close_notify`: what it sent is its answer.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !answer.is_empty() => 0,
            Err(e) => return Err(ProbeError::Read(e)),
        };
        if n == 0 || answer.len() > 64 * 1024 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    let status: u16 = text
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|s| s.parse().ok())
        .ok_or(ProbeError::NotHttp)?;
    if !expect_status.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status)) {
        return Err(ProbeError::Status(status));
    }
    if let Some(want) = expect_body {
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        if !body.contains(want.as_str()) {
            return Err(ProbeError::Body(want.clone()));
        }
    }
    Ok(())
}

/// A check of a backend the pool speaks HTTP/2 to, on an HTTP/2 connection of its own:
/// the HTTP check as a stream, or the gRPC health-checking protocol.
async fn probe_h2(b: &Backend, upstream: &Upstream, cfg: &Health) -> Result<(), ProbeError> {
    use http_body_util::BodyExt;
    let mut sender = upstream.h2_connect().await.map_err(ProbeError::Connect)?;
    let scheme = if upstream.tls().is_some() { "https" } else { "http" };
    let (request, body) = match &cfg.check {
        // The connection, its TLS and HTTP/2 preface made: that is the check.
        CheckKind::Tcp => return Ok(()),
        CheckKind::Http { method, path, host, .. } => {
            let host = host.as_deref().unwrap_or(&b.address_text);
            (http::Request::builder().method(method.as_str()).uri(format!("{scheme}://{host}{path}")), Bytes::new())
        }
        CheckKind::Grpc { service } => {
            let request = http::Request::post(format!("{scheme}://{}/grpc.health.v1.Health/Check", b.address_text))
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header(http::header::TE, "trailers");
            (request, grpc_health_request(service))
        }
    };
    let request = request
        .header(http::header::USER_AGENT, "tether-health-check")
        .body(http_body_util::Full::new(body).map_err(|never| match never {}).boxed_unsync())
        .map_err(|e| ProbeError::Http2(e.to_string()))?;
    let response = sender.send_request(request).await.map_err(|e| ProbeError::Http2(e.to_string()))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    // Bounded: a check's answer is short, and one that is not must not take memory.
    let limited = http_body_util::Limited::new(response.into_body(), 64 * 1024);
    let collected = limited.collect().await.map_err(|e| ProbeError::Http2(e.to_string()))?;
    let trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    match &cfg.check {
        CheckKind::Http { expect_status, expect_body, .. } => {
            if !expect_status.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status)) {
                return Err(ProbeError::Status(status));
            }
            if let Some(want) = expect_body {
                if !String::from_utf8_lossy(&body).contains(want.as_str()) {
                    return Err(ProbeError::Body(want.clone()));
                }
            }
            Ok(())
        }
        CheckKind::Grpc { .. } => {
            if status != 200 {
                return Err(ProbeError::Status(status));
            }
            // `grpc-status` is a trailer, or a header of a response that has only headers.
            let grpc_status =
                trailers.as_ref().and_then(|t| t.get("grpc-status")).or_else(|| headers.get("grpc-status"));
            match grpc_status.map(|v| v.as_bytes()) {
                Some(b"0") => {}
                Some(other) => return Err(ProbeError::Grpc(format!("grpc-status {}", String::from_utf8_lossy(other)))),
                None => return Err(ProbeError::Grpc("no grpc-status".into())),
            }
            match grpc_health_status(&body) {
                Some(1) => Ok(()),
                Some(s) => Err(ProbeError::Grpc(
                    match s {
                        0 => "UNKNOWN",
                        2 => "NOT_SERVING",
                        3 => "SERVICE_UNKNOWN",
                        _ => "an unknown status",
                    }
                    .into(),
                )),
                None => Err(ProbeError::Grpc("not a HealthCheckResponse".into())),
            }
        }
        CheckKind::Tcp => Ok(()),
    }
}

/// A gRPC message (uncompressed, length-prefixed) holding `HealthCheckRequest { service }`.
fn grpc_health_request(service: &str) -> Bytes {
    let mut message = Vec::with_capacity(service.len() + 3);
    if !service.is_empty() {
        // Field 1, length-delimited: the length as a varint, then the name.
        message.push(0x0a);
        let mut n = service.len();
        while n >= 0x80 {
            message.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        message.push(n as u8);
        message.extend_from_slice(service.as_bytes());
    }
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    Bytes::from(framed)
}

/// The `status` of a framed `HealthCheckResponse` (0 when absent, as protobuf's default);
/// `None` when the bytes are not one uncompressed message.
fn grpc_health_status(framed: &[u8]) -> Option<u64> {
    let (&[flag, l0, l1, l2, l3], message) = framed.split_first_chunk::<5>()?;
    if flag != 0 || u32::from_be_bytes([l0, l1, l2, l3]) as usize != message.len() {
        return None;
    }
    let mut status = 0;
    let mut rest = message;
    while let Some((&key, tail)) = rest.split_first() {
        let (value, tail) = varint(tail)?;
        match key {
            // Field 1, varint: the status.
            0x08 => status = value,
            // Another varint field: skipped.
            k if k & 7 == 0 => {}
            _ => return None,
        }
        rest = tail;
    }
    Some(status)
}

/// A protobuf varint at the start of `bytes`, and what follows it.
fn varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_health_messages_are_framed_and_read() {
        assert_eq!(&grpc_health_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(&grpc_health_request("shop")[..], &[0, 0, 0, 0, 6, 0x0a, 4, b's', b'h', b'o', b'p']);
        let long = "s".repeat(200);
        assert_eq!(&grpc_health_request(&long)[5..8], &[0x0a, 0xc8, 0x01]);
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(1));
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
        // An empty message is the default status, UNKNOWN.
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 0]), Some(0));
        // Compressed, cut short, a length that does not match, a field of another type.
        assert_eq!(grpc_health_status(&[1, 0, 0, 0, 2, 0x08, 1]), None);
        assert_eq!(grpc_health_status(&[0, 0, 0]), None);
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 3, 0x08, 1]), None);
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 2, 0x0a, 0]), None);
        assert_eq!(grpc_health_status(&[0, 0, 0, 0, 2, 0x08, 0x80]), None);
    }
}

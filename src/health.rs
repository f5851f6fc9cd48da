//! Active health checks: one supervisor task wakes every 100 ms, starts the checks that
//! are due (each on its own connection, never counted as traffic, jittered so they do not
//! march in step) and ends passive ejections whose time is up. What a result does to a
//! backend's health is the backend's own state machine (`crate::backend::health`).

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::backend::Backend;
use crate::config::{CheckKind, Health};
use crate::proxy_header::{Header, Version};
use crate::state::Shared;
use crate::time::unix_millis;

/// Why an active check failed.
#[derive(Debug)]
pub enum ProbeError {
    Connect(io::Error),
    Send(io::Error),
    Read(io::Error),
    Timeout(Duration),
    NotHttp,
    Status(u16),
    /// The body did not contain the expected text.
    Body(String),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::Connect(e) => write!(f, "connect: {e}"),
            ProbeError::Send(e) => write!(f, "send: {e}"),
            ProbeError::Read(e) => write!(f, "read: {e}"),
            ProbeError::Timeout(d) => write!(f, "no answer within {d:?}"),
            ProbeError::NotHttp => f.write_str("not an HTTP response"),
            ProbeError::Status(s) => write!(f, "status {s}"),
            ProbeError::Body(want) => write!(f, "body does not contain {want:?}"),
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
            for b in pool.backends.iter().filter(|b| b.health.claim_check(now)) {
                let (b, cfg) = (b.clone(), cfg.clone());
                tokio::spawn(async move {
                    let result = probe(&b, &cfg, proxy).await;
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

/// One check on its own connection. To a pool that sends the PROXY protocol, the check
/// sends a header too (one that names no client: v1 `UNKNOWN`, v2 `LOCAL`), since such
/// backends refuse connections without one.
async fn probe(b: &Backend, cfg: &Health, proxy: Option<Version>) -> Result<(), ProbeError> {
    match tokio::time::timeout(cfg.timeout, probe_inner(b, cfg, proxy)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout(cfg.timeout)),
    }
}

async fn probe_inner(b: &Backend, cfg: &Health, proxy: Option<Version>) -> Result<(), ProbeError> {
    let mut stream = TcpStream::connect(b.address).await.map_err(ProbeError::Connect)?;
    if let Some(version) = proxy {
        stream.write_all(Header::local(version).as_bytes()).await.map_err(ProbeError::Send)?;
    }
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
        let n = stream.read(&mut buf).await.map_err(ProbeError::Read)?;
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

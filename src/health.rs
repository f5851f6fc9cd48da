//! Health: active checks, passive outlier ejection, and the retry budget.
//!
//! A backend's health is the conjunction of two things: its active checks pass (after
//! `rise` successes; fail after `fall` failures) and it is not ejected by passive checks
//! (`eject_after` consecutive connect failures or 5xx, for an ejection time that doubles
//! on each repeated ejection, never more than `max_ejected` of a pool at once). Every
//! change is logged once, with its reason, and counted.
//!
//! Checks run off the request path: one supervisor task wakes every 100 ms, starts the
//! checks that are due (each on its own connection, never counted as traffic, jittered so
//! they do not march in step) and ends ejections whose time is up.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::{CheckKind, Health};
use crate::pool::{Backend, Pool};
use crate::proxy::Shared;
use crate::time::unix_millis;

/// The health bookkeeping of one backend.
#[derive(Debug, Default)]
pub struct BackendHealth {
    /// Active checks say down.
    check_down: AtomicBool,
    ok_streak: AtomicU32,
    fail_streak: AtomicU32,
    /// Unix ms until which passive checks keep the backend out; 0: not ejected.
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    passive_fails: AtomicU32,
    /// Unix ms when the backend last came up (0: up since start), for slow start.
    up_since: AtomicU64,
    /// Health transitions, for metrics.
    pub transitions: AtomicU64,
    next_check: AtomicU64,
    checking: AtomicBool,
}

impl BackendHealth {
    pub fn up_since(&self) -> u64 {
        self.up_since.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) != 0
    }
}

/// Recomputes a backend's combined health and logs the transition, if any.
fn settle(pool: &str, b: &Backend, why: &str) {
    let h = &b.health;
    let healthy = !h.check_down.load(Ordering::Relaxed) && !h.is_ejected();
    if b.set_healthy(healthy) {
        h.transitions.fetch_add(1, Ordering::Relaxed);
        if healthy {
            h.up_since.store(unix_millis(), Ordering::Relaxed);
            tracing::warn!(pool, backend = %b.name, address = %b.address_text, "backend is UP: {why}");
        } else {
            tracing::warn!(pool, backend = %b.name, address = %b.address_text, "backend is DOWN: {why}");
        }
    }
}

/// Records the result of one active check.
pub fn record_check(pool: &str, b: &Backend, cfg: &Health, result: Result<(), String>) {
    let h = &b.health;
    match result {
        Ok(()) => {
            h.fail_streak.store(0, Ordering::Relaxed);
            let ok = h.ok_streak.fetch_add(1, Ordering::Relaxed) + 1;
            if h.check_down.load(Ordering::Relaxed) && ok >= cfg.rise {
                h.check_down.store(false, Ordering::Relaxed);
                // Passing checks also end an ejection early.
                if h.ejected_until.swap(0, Ordering::Relaxed) != 0 {
                    h.passive_fails.store(0, Ordering::Relaxed);
                }
                settle(pool, b, &format!("{ok} checks passed"));
            } else if h.is_ejected() && ok >= cfg.rise {
                h.ejected_until.store(0, Ordering::Relaxed);
                h.passive_fails.store(0, Ordering::Relaxed);
                settle(pool, b, &format!("ejection ended early: {ok} checks passed"));
            }
        }
        Err(e) => {
            h.ok_streak.store(0, Ordering::Relaxed);
            let fails = h.fail_streak.fetch_add(1, Ordering::Relaxed) + 1;
            if !h.check_down.load(Ordering::Relaxed) && fails >= cfg.fall {
                h.check_down.store(true, Ordering::Relaxed);
                settle(pool, b, &format!("{fails} checks failed, last: {e}"));
            }
        }
    }
}

/// A request to backend `i` failed to connect, or the backend answered 5xx.
pub fn passive_failure(pool: &Pool, i: usize, why: &str) {
    let Some(cfg) = &pool.config.health else { return };
    if cfg.eject_after == 0 {
        return;
    }
    let b = &pool.backends[i];
    let h = &b.health;
    let fails = h.passive_fails.fetch_add(1, Ordering::Relaxed) + 1;
    if fails < cfg.eject_after || h.is_ejected() {
        return;
    }
    let ejected = pool.backends.iter().filter(|o| o.health.is_ejected()).count();
    if (ejected + 1) as f64 > cfg.max_ejected * pool.backends.len() as f64 {
        tracing::debug!(pool = %pool.name, backend = %b.name, "not ejected: max_ejected reached");
        return;
    }
    let n = h.ejections.fetch_add(1, Ordering::Relaxed).min(6);
    let time = cfg.eject_time * (1 << n);
    h.ejected_until.store(unix_millis() + time.as_millis() as u64, Ordering::Relaxed);
    settle(&pool.name, b, &format!("ejected for {time:?} after {fails} consecutive failures, last: {why}"));
}

/// A request to the backend succeeded.
pub fn passive_success(b: &Backend) {
    // Read first: the common case writes nothing, so the cache line stays shared.
    if b.health.passive_fails.load(Ordering::Relaxed) != 0 {
        b.health.passive_fails.store(0, Ordering::Relaxed);
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
                let until = b.health.ejected_until.load(Ordering::Relaxed);
                if until != 0 && now >= until {
                    b.health.ejected_until.store(0, Ordering::Relaxed);
                    b.health.passive_fails.store(0, Ordering::Relaxed);
                    settle(&pool.name, b, "ejection time is over");
                }
            }
            let Some(cfg) = &pool.config.health else {
                // Checks were removed from the config: whatever they said no longer holds.
                for b in &pool.backends {
                    if b.health.check_down.swap(false, Ordering::Relaxed) {
                        settle(&pool.name, b, "health checks removed");
                    }
                }
                continue;
            };
            for b in &pool.backends {
                let h = &b.health;
                if now < h.next_check.load(Ordering::Relaxed) || h.checking.swap(true, Ordering::Relaxed) {
                    continue;
                }
                let (b, cfg, name) = (b.clone(), cfg.clone(), pool.name.clone());
                tokio::spawn(async move {
                    let result = probe(&b, &cfg).await;
                    record_check(&name, &b, &cfg, result);
                    // ±10% jitter so checks of many backends do not march in step.
                    let base = cfg.interval.as_millis() as u64;
                    let jitter = crate::balance::random_below((base / 5).max(1) as usize) as u64;
                    b.health.next_check.store(unix_millis() + base - base / 10 + jitter, Ordering::Relaxed);
                    b.health.checking.store(false, Ordering::Relaxed);
                });
            }
        }
    }
}

/// One check on its own connection.
async fn probe(b: &Backend, cfg: &Health) -> Result<(), String> {
    match tokio::time::timeout(cfg.timeout, probe_inner(b, cfg)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", cfg.timeout)),
    }
}

async fn probe_inner(b: &Backend, cfg: &Health) -> Result<(), String> {
    let mut stream = TcpStream::connect(b.address).await.map_err(|e| format!("connect: {e}"))?;
    let CheckKind::Http { method, path, host, expect_status, expect_body } = &cfg.check else {
        return Ok(());
    };
    let host = host.as_deref().unwrap_or(&b.address_text);
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tether-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
    // Read the whole (short) answer: the connection closes after it.
    let mut answer = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
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
        .ok_or_else(|| "not an HTTP response".to_string())?;
    if !expect_status.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status)) {
        return Err(format!("status {status}"));
    }
    if let Some(want) = expect_body {
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        if !body.contains(want.as_str()) {
            return Err(format!("body does not contain {want:?}"));
        }
    }
    Ok(())
}

/// Retries may be at most a share of requests, so that in an outage they cannot multiply
/// the load. Every request deposits its share of a retry; a retry withdraws a whole one.
#[derive(Debug)]
pub struct RetryBudget {
    /// In thousandths of a retry.
    balance: AtomicI64,
    /// Requests moved to another backend, for metrics.
    pub retries: AtomicU64,
}

/// A burst of retries always allowed, so a quiet pool can still retry.
const BUDGET_FLOOR: i64 = 10_000;
const BUDGET_CAP: i64 = 1_000_000;

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget { balance: AtomicI64::new(BUDGET_FLOOR), retries: AtomicU64::new(0) }
    }
}

impl RetryBudget {
    pub fn deposit(&self, share: f64) {
        let add = (share * 1000.0) as i64;
        if add > 0 && self.balance.load(Ordering::Relaxed) < BUDGET_CAP {
            self.balance.fetch_add(add, Ordering::Relaxed);
        }
    }

    pub fn withdraw(&self) -> bool {
        let ok = self.balance.fetch_sub(1000, Ordering::Relaxed) >= 1000;
        if !ok {
            self.balance.fetch_add(1000, Ordering::Relaxed);
        }
        ok
    }

    /// Tops the balance up to the floor, once a second.
    pub fn refill(&self) {
        let b = self.balance.load(Ordering::Relaxed);
        if b < BUDGET_FLOOR {
            self.balance.fetch_add((BUDGET_FLOOR - b) / 10, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AdminState, Timeouts};

    fn backend() -> Backend {
        let cfg = crate::config::Backend {
            name: "b".into(),
            address: "127.0.0.1:1".parse().unwrap(),
            weight: 1,
            state: AdminState::Enabled,
            max_connections: None,
        };
        Backend::new("p", &cfg, &Timeouts::default())
    }

    fn health(rise: u32, fall: u32) -> Health {
        Health {
            check: CheckKind::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise,
            fall,
            eject_after: 0,
            eject_time: Duration::from_secs(1),
            max_ejected: 0.5,
        }
    }

    #[test]
    fn fall_and_rise_thresholds() {
        let b = backend();
        let cfg = health(2, 3);
        let fail = || Err("refused".to_string());
        record_check("p", &b, &cfg, fail());
        record_check("p", &b, &cfg, fail());
        assert!(b.is_healthy(), "down after 2 of 3 failures");
        record_check("p", &b, &cfg, Ok(()));
        record_check("p", &b, &cfg, fail());
        record_check("p", &b, &cfg, fail());
        assert!(b.is_healthy(), "a success in between resets the count");
        record_check("p", &b, &cfg, fail());
        assert!(!b.is_healthy(), "3 consecutive failures take it down");
        assert_eq!(b.health.transitions.load(Ordering::Relaxed), 1);
        record_check("p", &b, &cfg, Ok(()));
        assert!(!b.is_healthy(), "up after 1 of 2 successes");
        record_check("p", &b, &cfg, fail());
        record_check("p", &b, &cfg, Ok(()));
        assert!(!b.is_healthy(), "a failure in between resets the count");
        record_check("p", &b, &cfg, Ok(()));
        assert!(b.is_healthy());
        assert!(b.health.up_since() > 0, "slow start begins when a backend comes up");
        assert_eq!(b.health.transitions.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn slow_start_ramps_the_chance_of_new_work() {
        let b = backend();
        let cfg = health(1, 1);
        assert!(b.warm(unix_millis(), Duration::from_secs(10)), "up since start: no ramp");
        record_check("p", &b, &cfg, Err("down".into()));
        record_check("p", &b, &cfg, Ok(()));
        let up = b.health.up_since();
        let share = |at: u64| (0..10_000).filter(|_| b.warm(at, Duration::from_secs(10))).count() as f64 / 10_000.0;
        assert!(share(up) < 0.01);
        let half = share(up + 5_000);
        assert!((0.45..0.55).contains(&half), "{half}");
        assert_eq!(share(up + 10_000), 1.0);
    }

    #[test]
    fn budget_allows_the_share_and_a_floor() {
        let b = RetryBudget { balance: AtomicI64::new(0), retries: AtomicU64::new(0) };
        for _ in 0..100 {
            b.deposit(0.2);
        }
        let mut granted = 0;
        while b.withdraw() {
            granted += 1;
        }
        assert_eq!(granted, 20);
        let b = RetryBudget::default();
        let mut granted = 0;
        while b.withdraw() {
            granted += 1;
        }
        assert_eq!(granted, 10);
    }
}

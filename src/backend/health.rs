//! A backend's health state machine. Health is the conjunction of two things: active
//! checks pass (up after `rise` successes, down after `fall` failures) and passive checks
//! have not ejected it (`eject_after` consecutive failures, for an ejection time that
//! doubles on each repeated ejection, never more than `max_ejected` of a pool at once).
//! Every change of the combined health is logged once, with its reason, and counted.
//!
//! This module only keeps the books; `crate::health` runs the checks and the clock.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use super::Backend;
use crate::config::Health;
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
    /// Unix ms when the next active check is due.
    next_check: AtomicU64,
    /// An active check is running.
    checking: AtomicBool,
}

impl BackendHealth {
    pub fn up_since(&self) -> u64 {
        self.up_since.load(Ordering::Relaxed)
    }

    /// A backend that joins a running pool (a new address from DNS) ramps up under slow
    /// start as one that has just come up at `now_ms`.
    pub fn joined_at(&self, now_ms: u64) {
        self.up_since.store(now_ms.max(1), Ordering::Relaxed);
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) != 0
    }

    /// Claims the next active check if it is due at `now_ms`; the claim holds until
    /// [`check_done`](Self::check_done).
    pub fn claim_check(&self, now_ms: u64) -> bool {
        now_ms >= self.next_check.load(Ordering::Relaxed) && !self.checking.swap(true, Ordering::Relaxed)
    }

    /// The claimed check finished; the next one is due at `next_ms`.
    pub fn check_done(&self, next_ms: u64) {
        self.next_check.store(next_ms, Ordering::Relaxed);
        self.checking.store(false, Ordering::Relaxed);
    }
}

impl Backend {
    /// Recomputes the combined health and logs the transition, if any.
    fn settle(&self, why: &str) {
        let h = &self.health;
        let healthy = !h.check_down.load(Ordering::Relaxed) && !h.is_ejected();
        if self.set_healthy(healthy) {
            h.transitions.fetch_add(1, Ordering::Relaxed);
            if healthy {
                h.up_since.store(unix_millis(), Ordering::Relaxed);
                tracing::warn!(pool = %self.pool, backend = %self.name, address = %self.address_text, "backend is UP: {why}");
            } else {
                tracing::warn!(pool = %self.pool, backend = %self.name, address = %self.address_text, "backend is DOWN: {why}");
            }
        }
    }

    /// Records the result of one active check.
    pub fn record_check(&self, cfg: &Health, result: Result<(), impl Display>) {
        let h = &self.health;
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
                    self.settle(&format!("{ok} checks passed"));
                } else if h.is_ejected() && ok >= cfg.rise {
                    h.ejected_until.store(0, Ordering::Relaxed);
                    h.passive_fails.store(0, Ordering::Relaxed);
                    self.settle(&format!("ejection ended early: {ok} checks passed"));
                }
            }
            Err(e) => {
                h.ok_streak.store(0, Ordering::Relaxed);
                let fails = h.fail_streak.fetch_add(1, Ordering::Relaxed) + 1;
                if !h.check_down.load(Ordering::Relaxed) && fails >= cfg.fall {
                    h.check_down.store(true, Ordering::Relaxed);
                    self.settle(&format!("{fails} checks failed, last: {e}"));
                }
            }
        }
    }

    /// Active checks were removed from the config: whatever they said no longer holds.
    pub fn forget_checks(&self) {
        if self.health.check_down.swap(false, Ordering::Relaxed) {
            self.settle("health checks removed");
        }
    }

    /// Ends an ejection whose time is over at `now_ms`.
    pub fn end_ejection_if_due(&self, now_ms: u64) {
        let h = &self.health;
        let until = h.ejected_until.load(Ordering::Relaxed);
        if until != 0 && now_ms >= until {
            h.ejected_until.store(0, Ordering::Relaxed);
            h.passive_fails.store(0, Ordering::Relaxed);
            self.settle("ejection time is over");
        }
    }

    /// A request to this backend succeeded.
    pub fn passive_success(&self) {
        // Read first: the common case writes nothing, so the cache line stays shared.
        if self.health.passive_fails.load(Ordering::Relaxed) != 0 {
            self.health.passive_fails.store(0, Ordering::Relaxed);
        }
    }
}

/// A request to `backends[i]` failed through the backend's own fault: a refused, reset or
/// timed-out connect, a connection it broke, no answer in time after it had the whole
/// request, or a 5xx. Callers never report a client's fault (a broken or slow request
/// body) or Tether's own (EMFILE, EADDRNOTAVAIL on connect), so clients cannot get a
/// healthy backend ejected. `backends` is its whole pool: at most `max_ejected` of it is
/// ejected.
pub fn passive_failure(backends: &[Arc<Backend>], i: usize, cfg: Option<&Health>, why: &str) {
    let Some(cfg) = cfg else { return };
    if cfg.eject_after == 0 {
        return;
    }
    let b = &backends[i];
    let h = &b.health;
    let fails = h.passive_fails.fetch_add(1, Ordering::Relaxed) + 1;
    if fails < cfg.eject_after || h.is_ejected() {
        return;
    }
    let ejected = backends.iter().filter(|o| o.health.is_ejected()).count();
    if (ejected + 1) as f64 > cfg.max_ejected * backends.len() as f64 {
        tracing::debug!(pool = %b.pool, backend = %b.name, "not ejected: max_ejected reached");
        return;
    }
    let n = h.ejections.fetch_add(1, Ordering::Relaxed).min(6);
    let time = cfg.eject_time * (1 << n);
    h.ejected_until.store(unix_millis() + time.as_millis() as u64, Ordering::Relaxed);
    b.settle(&format!("ejected for {time:?} after {fails} consecutive failures, last: {why}"));
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{AdminState, CheckKind};

    fn backend() -> Backend {
        let cfg = crate::config::Backend {
            name: "b".into(),
            address: "127.0.0.1:1".parse().unwrap(),
            weight: 1,
            state: AdminState::Enabled,
            max_connections: None,
        };
        Backend::new("p", &cfg)
    }

    fn health(rise: u32, fall: u32) -> Health {
        Health {
            check: CheckKind::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise,
            fall,
            eject_after: 2,
            eject_time: Duration::from_secs(1),
            max_ejected: 0.5,
        }
    }

    fn fail() -> Result<(), &'static str> {
        Err("refused")
    }

    const OK: Result<(), &str> = Ok(());

    #[test]
    fn fall_and_rise_thresholds() {
        let b = backend();
        let cfg = health(2, 3);
        b.record_check(&cfg, fail());
        b.record_check(&cfg, fail());
        assert!(b.is_healthy(), "down after 2 of 3 failures");
        b.record_check(&cfg, OK);
        b.record_check(&cfg, fail());
        b.record_check(&cfg, fail());
        assert!(b.is_healthy(), "a success in between resets the count");
        b.record_check(&cfg, fail());
        assert!(!b.is_healthy(), "3 consecutive failures take it down");
        assert_eq!(b.health.transitions.load(Ordering::Relaxed), 1);
        b.record_check(&cfg, OK);
        assert!(!b.is_healthy(), "up after 1 of 2 successes");
        b.record_check(&cfg, fail());
        b.record_check(&cfg, OK);
        assert!(!b.is_healthy(), "a failure in between resets the count");
        b.record_check(&cfg, OK);
        assert!(b.is_healthy());
        assert!(b.health.up_since() > 0, "slow start begins when a backend comes up");
        assert_eq!(b.health.transitions.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn slow_start_ramps_the_chance_of_new_work() {
        let b = backend();
        let cfg = health(1, 1);
        assert!(b.warm(unix_millis(), Duration::from_secs(10)), "up since start: no ramp");
        b.record_check(&cfg, Err("down"));
        b.record_check(&cfg, OK);
        let up = b.health.up_since();
        let share = |at: u64| (0..10_000).filter(|_| b.warm(at, Duration::from_secs(10))).count() as f64 / 10_000.0;
        assert!(share(up) < 0.01);
        let half = share(up + 5_000);
        assert!((0.45..0.55).contains(&half), "{half}");
        assert_eq!(share(up + 10_000), 1.0);
    }

    #[test]
    fn passive_ejection_respects_max_ejected_and_ends_on_time() {
        let pool: Vec<Arc<Backend>> = (0..2).map(|_| Arc::new(backend())).collect();
        let cfg = health(1, 1);
        passive_failure(&pool, 0, Some(&cfg), "status 502");
        assert!(pool[0].is_healthy(), "one failure of eject_after = 2");
        pool[0].passive_success();
        passive_failure(&pool, 0, Some(&cfg), "status 502");
        assert!(pool[0].is_healthy(), "a success in between resets the count");
        passive_failure(&pool, 0, Some(&cfg), "status 502");
        assert!(!pool[0].is_healthy() && pool[0].health.is_ejected());
        passive_failure(&pool, 1, Some(&cfg), "status 502");
        passive_failure(&pool, 1, Some(&cfg), "status 502");
        assert!(pool[1].is_healthy(), "max_ejected = 0.5 of two backends keeps the second in");
        pool[0].end_ejection_if_due(unix_millis());
        assert!(!pool[0].is_healthy(), "the ejection lasts eject_time");
        pool[0].end_ejection_if_due(unix_millis() + 1_001);
        assert!(pool[0].is_healthy());
        passive_failure(&pool, 1, None, "no health config");
        assert!(pool[1].is_healthy(), "without health settings nothing is ejected");
    }
}

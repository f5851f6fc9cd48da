//! A backend as every other layer sees it: a value with an identity (pool and name), an
//! address, an admin state, a health state machine ([`health`]) and counters. It is shared
//! by `Arc` between snapshots, so its state outlives reloads that keep its identity and
//! address. It holds no connections: those belong to the data path.
//!
//! [`Group`] is a pool's backends with the rules for choosing among them (balancer, slow
//! start, panic mode): what placement needs, without the rest of the pool.

pub mod health;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::affinity::verdict::{Verdict, VERDICTS};
use crate::balance::Balancer;
use crate::config::{self, AdminState};

/// One server of a pool, shared by every snapshot that contains it.
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    pub pool: String,
    pub address: SocketAddr,
    /// The address as text for headers and logs, formatted once.
    pub address_text: String,
    pub max_connections: Option<u32>,
    /// Requests sent to this backend whose response has not finished.
    in_flight: AtomicU32,
    /// Requests sent, for metrics.
    pub requests: AtomicU64,
    admin: AtomicU8,
    healthy: AtomicBool,
    /// Unix milliseconds when the backend last started draining.
    draining_since: AtomicU64,
    /// Live sessions pinned here: recounted by the once-a-second sweep, bumped at placement.
    sessions: AtomicU32,
    /// Requests by affinity verdict ([`Verdict::index`]).
    pub verdicts: [AtomicU64; VERDICTS],
    pub health: health::BackendHealth,
    pub metrics: BackendMetrics,
    /// `max_connections`: a slot per request in flight; waiting requests queue here.
    pub slots: Option<Arc<tokio::sync::Semaphore>>,
    /// Requests waiting for a slot.
    pub waiting: AtomicU32,
    /// Notified when the backend's drain is over (`drain_timeout`): relays to it (TCP
    /// connections, WebSocket tunnels) close, so it can really be removed.
    pub cut: tokio::sync::Notify,
}

// === impl Backend ===

impl Backend {
    pub fn new(pool: &str, cfg: &config::Backend) -> Backend {
        Backend {
            name: cfg.name.clone(),
            pool: pool.to_string(),
            address: cfg.address,
            address_text: cfg.address.to_string(),
            max_connections: cfg.max_connections,
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            admin: AtomicU8::new(cfg.state as u8),
            healthy: AtomicBool::new(true),
            draining_since: AtomicU64::new(if cfg.state == AdminState::Draining {
                crate::time::unix_millis()
            } else {
                0
            }),
            sessions: AtomicU32::new(0),
            verdicts: Default::default(),
            health: Default::default(),
            metrics: Default::default(),
            waiting: AtomicU32::new(0),
            slots: cfg.max_connections.map(|n| Arc::new(tokio::sync::Semaphore::new(n as usize))),
            cut: tokio::sync::Notify::new(),
        }
    }

    pub fn admin_state(&self) -> AdminState {
        match self.admin.load(Ordering::Relaxed) {
            x if x == AdminState::Draining as u8 => AdminState::Draining,
            x if x == AdminState::Disabled as u8 => AdminState::Disabled,
            _ => AdminState::Enabled,
        }
    }

    pub fn set_admin_state(&self, state: AdminState) {
        self.set_admin_state_at(state, crate::time::unix_millis());
    }

    /// [`set_admin_state`](Self::set_admin_state) at `now_ms` (Unix milliseconds): a drain
    /// that starts now is stamped with it. The simulator passes its simulated time.
    pub fn set_admin_state_at(&self, state: AdminState, now_ms: u64) {
        let old = self.admin.swap(state as u8, Ordering::Relaxed);
        if state == AdminState::Draining && old != AdminState::Draining as u8 {
            self.draining_since.store(now_ms, Ordering::Relaxed);
        }
    }

    /// Restamps a drain already under way as begun at `now_ms`: for a backend built
    /// draining from a config (stamped with the wall clock) in simulated time.
    pub fn restamp_drain(&self, now_ms: u64) {
        if self.admin_state() == AdminState::Draining {
            self.draining_since.store(now_ms, Ordering::Relaxed);
        }
    }

    /// Draining for `timeout` or longer at `now_ms`: its sessions go elsewhere and what is
    /// still open to it is closed.
    pub fn drain_over(&self, timeout: Duration, now_ms: u64) -> bool {
        self.admin_state() == AdminState::Draining
            && now_ms.saturating_sub(self.draining_since()) >= timeout.as_millis() as u64
    }

    /// Unix milliseconds when the current drain began.
    pub fn draining_since(&self) -> u64 {
        self.draining_since.load(Ordering::Relaxed)
    }

    pub fn sessions(&self) -> u32 {
        self.sessions.load(Ordering::Relaxed)
    }

    pub fn set_sessions(&self, n: u32) -> u32 {
        self.sessions.swap(n, Ordering::Relaxed)
    }

    /// A new session was placed here (counted at once so bounded load sees it).
    pub fn add_session(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// A session moved away (counted at once so the next decision sees it; the recount
    /// corrects any drift).
    pub fn remove_session(&self) {
        let _ = self.sessions.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    pub fn count(&self, v: Verdict) {
        self.verdicts[v.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Sets the combined health (active checks and passive ejection); true if it changed.
    fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    /// May take new sessions and requests that belong to no session.
    pub fn accepts_new(&self) -> bool {
        self.is_healthy() && self.admin_state() == AdminState::Enabled
    }

    /// A request was sent to this backend.
    pub fn acquire(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// A request sent to this backend has ended.
    pub fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Slow start: a backend that came up less than `window` ago takes new work with a
    /// probability that grows from 0 to 1 over the window.
    pub fn warm(&self, now_ms: u64, window: Duration) -> bool {
        let since = self.health.up_since();
        if since == 0 {
            return true;
        }
        let elapsed = now_ms.saturating_sub(since);
        let window = window.as_millis() as u64;
        elapsed >= window || (crate::random::random_below(window as usize) as u64) < elapsed
    }

    /// Requests in flight.
    pub fn load(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Latency histogram bounds, in microseconds (exported in seconds).
pub const LATENCY_BOUNDS_US: [u64; 13] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Responses and their latency, per backend, for metrics.
#[derive(Debug, Default)]
pub struct BackendMetrics {
    /// Requests per second over the last second, in thousandths; set by [`Self::sample_rate`].
    pub rate_milli: AtomicU64,
    /// The request count at the last sample.
    last_requests: AtomicU64,
    /// By status class: index 1 for 1xx ... 5 for 5xx.
    pub responses: [AtomicU64; 6],
    /// Non-cumulative bucket counts; the last one is +Inf.
    pub latency_buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    pub latency_sum_us: AtomicU64,
}

impl BackendMetrics {
    pub fn record(&self, status: u16, total: Duration) {
        self.responses[usize::from(status / 100).min(5)].fetch_add(1, Ordering::Relaxed);
        let us = total.as_micros() as u64;
        let i = LATENCY_BOUNDS_US.iter().position(|b| us <= *b).unwrap_or(LATENCY_BOUNDS_US.len());
        self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Sets the request rate from the request count now and the time since the last sample.
    pub fn sample_rate(&self, requests: u64, elapsed: Duration) {
        let before = self.last_requests.swap(requests, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64().max(0.001);
        let rate = (requests.saturating_sub(before) as f64 / secs * 1000.0) as u64;
        self.rate_milli.store(rate, Ordering::Relaxed);
    }
}

/// A pool's backends and the rules for choosing among them, borrowed from the pool for
/// one decision.
#[derive(Debug, Clone, Copy)]
pub struct Group<'a> {
    pub backends: &'a [Arc<Backend>],
    pub balancer: &'a Balancer,
    /// Ramp new work onto a backend that just came up over this long.
    pub slow_start: Option<Duration>,
    /// With no healthy backend, use any enabled one rather than none.
    pub panic_mode: bool,
}

impl Group<'_> {
    /// Picks a backend for new work (a request without a session, or a new session),
    /// skipping `exclude` (a backend that just failed).
    #[inline]
    pub fn pick(&self, exclude: Option<usize>) -> Option<usize> {
        let backends = self.backends;
        let load = |i: usize| backends[i].load();
        let open = |i: usize| Some(i) != exclude && backends[i].accepts_new();
        let picked = match self.slow_start {
            Some(window) => {
                let now = crate::time::unix_millis();
                self.balancer.pick(|i| open(i) && backends[i].warm(now, window), load)
            }
            None => None,
        };
        picked.or_else(|| self.balancer.pick(open, load)).or_else(|| {
            // Panic mode: with no healthy backend, any enabled one is better than nothing.
            let enabled = |i: usize| Some(i) != exclude && backends[i].admin_state() == AdminState::Enabled;
            if self.panic_mode {
                self.balancer.pick(enabled, load)
            } else {
                None
            }
        })
    }
}

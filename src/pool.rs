//! Runtime state of pools and backends, and the snapshot that requests read.
//!
//! A [`Snapshot`] is an immutable picture of the routing state (routes, pools, their
//! balancer tables) built from a [`Config`] and swapped in whole through an `ArcSwap`; a
//! request loads it once and uses it to the end, so a reload never changes the ground
//! under a request in flight. What must outlive a snapshot lives in [`Backend`], shared by
//! `Arc` between snapshots: its counters, admin state, health and its pool of idle
//! connections. A backend keeps its `Backend` across a reload as long as its identity (pool
//! and name) and address stay the same.
//!
//! This module decides nothing about where a request goes; it only holds the facts.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use crate::affinity::{PoolAffinity, Verdict, VERDICTS};
use crate::balance::Balancer;
use crate::config::{self, AdminState, Config};
use crate::proxy::upstream::Upstream;

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
    pub in_flight: AtomicU32,
    /// Requests sent, for metrics.
    pub requests: AtomicU64,
    admin: AtomicU8,
    healthy: AtomicBool,
    /// Unix milliseconds when the backend last started draining.
    draining_since: AtomicU64,
    /// Live sessions pinned here: recounted by the affinity sweep, bumped at placement.
    sessions: AtomicU32,
    /// Requests by affinity verdict ([`Verdict::index`]).
    pub verdicts: [AtomicU64; VERDICTS],
    /// Health: see `crate::health`.
    pub health: crate::health::BackendHealth,
    pub metrics: BackendMetrics,
    /// `max_connections`: a slot per request in flight; waiting requests queue here.
    pub slots: Option<Arc<tokio::sync::Semaphore>>,
    /// Requests waiting for a slot.
    pub waiting: AtomicU32,
    pub upstream: Upstream,
}

// === impl Backend ===

impl Backend {
    pub fn new(pool: &str, cfg: &config::Backend, timeouts: &config::Timeouts) -> Backend {
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
            upstream: Upstream::new(cfg.address, timeouts),
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
        let old = self.admin.swap(state as u8, Ordering::Relaxed);
        if state == AdminState::Draining && old != AdminState::Draining as u8 {
            self.draining_since.store(crate::time::unix_millis(), Ordering::Relaxed);
        }
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

    pub fn count(&self, v: Verdict) {
        self.verdicts[v.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Sets the combined health (active checks and passive ejection); true if it changed.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    /// May take new sessions and requests that belong to no session.
    pub fn accepts_new(&self) -> bool {
        self.is_healthy() && self.admin_state() == AdminState::Enabled
    }

    /// May keep serving sessions already pinned to it (draining still counts).
    pub fn accepts_existing(&self) -> bool {
        self.is_healthy() && self.admin_state() != AdminState::Disabled
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
    pub fn warm(&self, now_ms: u64, window: std::time::Duration) -> bool {
        let since = self.health.up_since();
        if since == 0 {
            return true;
        }
        let elapsed = now_ms.saturating_sub(since);
        let window = window.as_millis() as u64;
        elapsed >= window || (crate::balance::random_below(window as usize) as u64) < elapsed
    }

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
    /// Requests per second over the last second, in thousandths; set by the sweep.
    pub rate_milli: AtomicU64,
    /// The request count at the last sweep.
    pub last_requests: AtomicU64,
    /// By status class: index 1 for 1xx ... 5 for 5xx.
    pub responses: [AtomicU64; 6],
    /// Non-cumulative bucket counts; the last one is +Inf.
    pub latency_buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    pub latency_sum_us: AtomicU64,
}

impl BackendMetrics {
    pub fn record(&self, status: u16, total: std::time::Duration) {
        self.responses[usize::from(status / 100).min(5)].fetch_add(1, Ordering::Relaxed);
        let us = total.as_micros() as u64;
        let i = LATENCY_BOUNDS_US.iter().position(|b| us <= *b).unwrap_or(LATENCY_BOUNDS_US.len());
        self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// A pool as one snapshot sees it.
#[derive(Debug)]
pub struct Pool {
    pub name: Arc<str>,
    pub backends: Vec<Arc<Backend>>,
    pub balancer: Balancer,
    pub affinity: Option<PoolAffinity>,
    pub config: config::Pool,
    /// Shared by every snapshot of this pool, so the budget survives reloads.
    pub retry_budget: Arc<crate::health::RetryBudget>,
}

impl Pool {
    /// Picks a backend for a request that belongs to no session, skipping `exclude` (a
    /// backend that just failed to connect).
    pub fn pick(&self, exclude: Option<usize>) -> Option<usize> {
        let backends = &self.backends;
        let load = |i: usize| backends[i].load();
        let picked = match self.config.slow_start {
            Some(window) => {
                let now = crate::time::unix_millis();
                self.balancer
                    .pick(|i| Some(i) != exclude && backends[i].accepts_new() && backends[i].warm(now, window), load)
            }
            None => None,
        };
        picked.or_else(|| self.balancer.pick(|i| Some(i) != exclude && backends[i].accepts_new(), load)).or_else(|| {
            // Panic mode: with no healthy backend, any enabled one is better than nothing.
            let enabled = |i: usize| Some(i) != exclude && backends[i].admin_state() == AdminState::Enabled;
            if self.config.panic_mode {
                self.balancer.pick(enabled, load)
            } else {
                None
            }
        })
    }
}

/// A listener's routes, most specific first.
#[derive(Debug)]
pub struct Routes {
    pub listener: String,
    pub trusted_proxies: Vec<config::Cidr>,
    routes: Vec<config::Route>,
}

impl Routes {
    /// The pool index for a request's host (lower-case, no port) and path.
    pub fn route(&self, host: &str, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .find(|r| {
                r.host.as_deref().is_none_or(|h| h.eq_ignore_ascii_case(host)) && path.starts_with(&r.path_prefix)
            })
            .map(|r| r.pool)
    }
}

/// Everything a request needs, swapped whole on reload.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub pools: Vec<Pool>,
    pub listeners: Vec<Routes>,
}

impl Snapshot {
    /// Builds a snapshot, reusing from `previous` every backend whose pool, name and address
    /// are unchanged so that its state carries over.
    pub fn build(config: Arc<Config>, previous: Option<&Snapshot>) -> Snapshot {
        let pools = config
            .pools
            .iter()
            .map(|p| {
                let backends: Vec<Arc<Backend>> = p
                    .backends
                    .iter()
                    .map(|b| {
                        let old = previous
                            .and_then(|s| s.backend(&p.name, &b.name))
                            .filter(|o| o.address == b.address && o.max_connections == b.max_connections);
                        match old {
                            Some(o) => {
                                o.set_admin_state(b.state);
                                o.clone()
                            }
                            None => Arc::new(Backend::new(&p.name, b, &config.timeouts)),
                        }
                    })
                    .collect();
                let weights: Vec<u32> = p.backends.iter().map(|b| b.weight).collect();
                let old_affinity = previous
                    .and_then(|s| s.pools.iter().find(|o| *o.name == *p.name))
                    .and_then(|o| o.affinity.as_ref());
                let affinity = p.affinity.as_ref().map(|a| PoolAffinity::build(p, a, old_affinity));
                let old_pool = previous.and_then(|s| s.pools.iter().find(|o| *o.name == *p.name));
                let retry_budget = old_pool.map_or_else(Default::default, |o| o.retry_budget.clone());
                Pool {
                    name: Arc::from(p.name.as_str()),
                    backends,
                    balancer: Balancer::new(p.algorithm, &weights),
                    affinity,
                    config: p.clone(),
                    retry_budget,
                }
            })
            .collect();
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let mut routes = l.routes.clone();
                // Host-specific routes before catch-alls, longer prefixes before shorter;
                // the sort is stable so equal routes keep the order they were written in.
                routes.sort_by_key(|r| (r.host.is_none(), std::cmp::Reverse(r.path_prefix.len())));
                Routes { listener: l.name.clone(), trusted_proxies: l.trusted_proxies.clone(), routes }
            })
            .collect();
        Snapshot { config, pools, listeners }
    }

    pub fn backend(&self, pool: &str, name: &str) -> Option<&Arc<Backend>> {
        self.pools.iter().find(|p| &*p.name == pool)?.backends.iter().find(|b| b.name == name)
    }

    pub fn listener(&self, name: &str) -> Option<&Routes> {
        self.listeners.iter().find(|l| l.listener == name)
    }
}

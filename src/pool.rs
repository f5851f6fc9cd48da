//! Runtime state of pools and backends, and the snapshot that requests read.
//!
//! A [`Snapshot`] is an immutable picture of the routing state (routes, pools, their
//! balancer tables) built from a [`Config`] and swapped in whole through an `ArcSwap`; a
//! request loads it once and uses it to the end, so a reload never changes the ground
//! under a request in flight. What must outlive a snapshot is shared by `Arc` between
//! snapshots: each [`Backend`] (counters, admin state, health), its [`Upstream`] (idle
//! connections, kept beside the backend rather than in it), the pool's affinity store and
//! retry budget. A backend keeps them across a reload as long as its identity (pool and
//! name), address and `max_connections` stay the same.
//!
//! This module decides nothing about where a request goes; it holds the facts, and its
//! two steps shared by both data paths (`move_from`, `slot`) ask the pool's affinity or
//! balancer and its backends' limits.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

use crate::affinity::{Decision, PoolAffinity, RequestKeys};
use crate::backend::{Backend, Group};
use crate::balance::Balancer;
use crate::config::{self, Config};
use crate::retry::RetryBudget;
use crate::split::Split;
use crate::store::{Fleet, Link};
use crate::upstream::Upstream;

/// Why a request got no `max_connections` slot of its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// The backend is at its limit and `max_queue` requests already wait.
    QueueFull,
    /// No slot freed within `queue_timeout`.
    QueueTimeout,
}

/// A pool as one snapshot sees it.
#[derive(Debug)]
pub struct Pool {
    pub name: Arc<str>,
    pub backends: Vec<Arc<Backend>>,
    /// Connections to each backend, by backend index.
    pub upstreams: Vec<Arc<Upstream>>,
    pub balancer: Balancer,
    pub affinity: Option<PoolAffinity>,
    pub config: config::Pool,
    /// Shared by every snapshot of this pool, so the budget survives reloads.
    pub retry_budget: Arc<RetryBudget>,
    /// The store this pool shares its learned pins through (`affinity.store`).
    pub shared: Option<Link>,
    /// The fleet's store (the file's top-level `store`), for a pool with affinity: where
    /// its sessions are counted over the whole fleet, within the window (the pool's
    /// longest session idle timeout).
    pub fleet: Option<(Arc<Fleet>, std::time::Duration)>,
}

impl Pool {
    /// The backends and the rules for choosing among them, for one decision.
    /// A request whose session came back to its backend counts toward that backend's
    /// sessions over the fleet (when the pool has a fleet store).
    pub fn note_session(&self, d: &Decision) {
        let Some((fleet, window)) = &self.fleet else { return };
        if d.verdict != crate::affinity::verdict::Verdict::Hit {
            return;
        }
        if let (Some(id), Some(i)) = (d.identity(), d.backend()) {
            if let Some(b) = self.backends.get(i) {
                fleet.seen(b, id, *window);
            }
        }
    }

    pub fn group(&self) -> Group<'_> {
        Group {
            backends: &self.backends,
            balancer: &self.balancer,
            slow_start: self.config.slow_start,
            panic_mode: self.config.panic_mode,
        }
    }

    /// Where a request goes after backend `from` failed it: another backend, the session
    /// re-pinned there by the pool's affinity, within the pool's retry budget (a move is
    /// counted as a retry). `None`: the budget is spent or there is nowhere to go.
    pub fn move_from(&self, from: usize, decision: &mut Decision, now_ms: u64) -> Option<usize> {
        if !self.retry_budget.withdraw() {
            return None;
        }
        let next = match &self.affinity {
            Some(a) => a.failover(&self.group(), decision, from, now_ms),
            None => self.group().pick(Some(from)),
        }?;
        self.retry_budget.retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(next)
    }

    /// A `max_connections` slot of backend `i`, when it has a limit (`None` when it has
    /// none), waited for within the pool's `max_queue` and `queue_timeout`.
    pub async fn slot(&self, i: usize) -> Result<Option<OwnedSemaphorePermit>, NoSlot> {
        let backend = &self.backends[i];
        let Some(slots) = &backend.slots else { return Ok(None) };
        if slots.available_permits() == 0 && backend.waiting.load(Ordering::Relaxed) >= self.config.max_queue {
            return Err(NoSlot::QueueFull);
        }
        backend.waiting.fetch_add(1, Ordering::Relaxed);
        let waited = tokio::time::timeout(self.config.queue_timeout, slots.clone().acquire_owned()).await;
        backend.waiting.fetch_sub(1, Ordering::Relaxed);
        match waited {
            Ok(Ok(permit)) => Ok(Some(permit)),
            _ => Err(NoSlot::QueueTimeout),
        }
    }

    fn build(p: &config::Pool, config: &Config, previous: Option<&Snapshot>, stores: &[Arc<Fleet>]) -> Pool {
        let old_pool = previous.and_then(|s| s.pool(&p.name));
        // Connections follow the timeouts and the pool's TLS: when either changes, new ones.
        let same_timeouts = previous.is_some_and(|s| s.config.timeouts == config.timeouts)
            && old_pool.is_some_and(|o| o.config.tls == p.tls && o.config.protocol == p.protocol);
        let (backends, upstreams) = p
            .backends
            .iter()
            .map(|b| {
                let old = old_pool
                    .and_then(|o| {
                        let i = o.backends.iter().position(|ob| ob.name == b.name)?;
                        Some((&o.backends[i], &o.upstreams[i]))
                    })
                    .filter(|(o, _)| o.address == b.address && o.max_connections == b.max_connections);
                match old {
                    Some((backend, upstream)) => {
                        backend.set_admin_state(b.state);
                        let upstream =
                            if same_timeouts { upstream.clone() } else { Arc::new(new_upstream(b.address, config, p)) };
                        (backend.clone(), upstream)
                    }
                    None => (Arc::new(Backend::new(&p.name, b)), Arc::new(new_upstream(b.address, config, p))),
                }
            })
            .unzip();
        let weights: Vec<u32> = p.backends.iter().map(|b| b.weight).collect();
        let affinity = p.affinity.as_ref().map(|a| {
            let members: Vec<(&str, u32)> = p.backends.iter().map(|b| (b.name.as_str(), b.weight)).collect();
            PoolAffinity::build(&p.name, &members, a, old_pool.and_then(|o| o.affinity.as_ref()))
        });
        let shared = affinity.as_ref().and_then(|a: &PoolAffinity| {
            let fleet = stores.iter().find(|f| Some(&f.cfg.name) == a.cfg.store.as_ref())?;
            Some(fleet.link(&p.name, &a.store, &a.cfg.table))
        });
        let fleet = affinity.as_ref().and_then(|a: &PoolAffinity| {
            let fleet = stores.iter().find(|f| Some(&f.cfg.name) == config.store.as_ref())?;
            let cookie = a.cfg.keys.contains(&config::KeySource::Cookie).then_some(a.cfg.cookie.idle_timeout);
            let window = cookie.unwrap_or_default().max(a.cfg.table.idle_timeout);
            Some((fleet.clone(), window))
        });
        Pool {
            name: Arc::from(p.name.as_str()),
            backends,
            upstreams,
            balancer: Balancer::new(p.algorithm, &weights),
            affinity,
            config: p.clone(),
            retry_budget: old_pool.map_or_else(Default::default, |o| o.retry_budget.clone()),
            shared,
            fleet,
        }
    }
}

/// A listener's routes, most specific first.
#[derive(Debug)]
pub struct Routes {
    pub listener: String,
    pub trusted_proxies: Vec<crate::net::Cidr>,
    /// Every request is redirected to `https://` on this port.
    pub redirect_to_https: Option<u16>,
    /// `Strict-Transport-Security` for responses that have none.
    pub hsts: Option<Box<str>>,
    routes: Vec<Route>,
}

/// One route as a snapshot holds it.
#[derive(Debug)]
struct Route {
    host: Option<String>,
    path_prefix: String,
    to: To,
}

/// Where a route goes, as a snapshot holds it.
#[derive(Debug)]
enum To {
    Pool(usize),
    Split(Split),
}

/// Where a request's route sends it: one pool (by index), or a split that chooses one
/// ([`Snapshot::pool_of`]).
#[derive(Debug, Clone, Copy)]
pub enum Routed<'s> {
    Pool(usize),
    Split(&'s Split),
}

impl Routes {
    /// Where a request for a host (lower-case, no port) and path goes.
    pub fn route(&self, host: &str, path: &str) -> Option<Routed<'_>> {
        self.routes
            .iter()
            .find(|r| {
                r.host.as_deref().is_none_or(|h| h.eq_ignore_ascii_case(host)) && path.starts_with(&r.path_prefix)
            })
            .map(|r| match &r.to {
                To::Pool(p) => Routed::Pool(*p),
                To::Split(s) => Routed::Split(s),
            })
    }

    /// The listener's splits.
    pub fn splits(&self) -> impl Iterator<Item = &Split> {
        self.routes.iter().filter_map(|r| match &r.to {
            To::Split(s) => Some(s),
            To::Pool(_) => None,
        })
    }

    /// The listener's splits, to change (the simulator puts them on simulated time).
    pub fn splits_mut(&mut self) -> impl Iterator<Item = &mut Split> {
        self.routes.iter_mut().filter_map(|r| match &mut r.to {
            To::Split(s) => Some(s),
            To::Pool(_) => None,
        })
    }
}

/// Everything a request needs, swapped whole on reload.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    /// The shared stores (`[stores.NAME]`), kept from snapshot to snapshot while their
    /// settings stay.
    pub stores: Vec<Arc<Fleet>>,
    pub pools: Vec<Pool>,
    pub listeners: Vec<Routes>,
}

impl Snapshot {
    /// Builds a snapshot, reusing from `previous` every backend whose pool, name and address
    /// are unchanged so that its state carries over.
    pub fn build(config: Arc<Config>, previous: Option<&Snapshot>) -> Snapshot {
        let old_stores = previous.map_or(&[][..], |s| &s.stores[..]);
        let stores: Vec<Arc<Fleet>> = config.stores.iter().map(|s| Fleet::reuse_or_start(s, old_stores)).collect();
        let pools = config.pools.iter().map(|p| Pool::build(p, &config, previous, &stores)).collect();
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let mut routes: Vec<Route> = l
                    .routes
                    .iter()
                    .map(|r| Route {
                        host: r.host.clone(),
                        path_prefix: r.path_prefix.clone(),
                        to: match &r.to {
                            config::RouteTo::Pool(p) => To::Pool(*p),
                            config::RouteTo::Split(s) => {
                                let old = previous.and_then(|p| p.split(&s.name));
                                To::Split(Split::build(s, &config.pools, old))
                            }
                        },
                    })
                    .collect();
                // Host-specific routes before catch-alls, longer prefixes before shorter;
                // the sort is stable so equal routes keep the order they were written in.
                routes.sort_by_key(|r| (r.host.is_none(), std::cmp::Reverse(r.path_prefix.len())));
                Routes {
                    listener: l.name.clone(),
                    trusted_proxies: l.trusted_proxies.clone(),
                    redirect_to_https: l.redirect_to_https,
                    hsts: l.hsts.as_deref().map(Box::from),
                    routes,
                }
            })
            .collect();
        Snapshot { config, stores, pools, listeners }
    }

    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| &*p.name == name)
    }

    pub fn backend(&self, pool: &str, name: &str) -> Option<&Arc<Backend>> {
        self.pool(pool)?.backends.iter().find(|b| b.name == name)
    }

    pub fn listener(&self, name: &str) -> Option<&Routes> {
        self.listeners.iter().find(|l| l.listener == name)
    }

    /// The split named `name`, on any listener.
    pub fn split(&self, name: &str) -> Option<&Split> {
        self.listeners.iter().flat_map(Routes::splits).find(|s| &*s.name == name)
    }

    /// The pool a routed request goes to: the route's, or the one its split chooses
    /// for the request's session (see `split`). `client_ip` is asked only when the
    /// split's key chain reads the client's address.
    pub fn pool_of<R: RequestKeys + ?Sized>(
        &self,
        to: Routed<'_>,
        request: &R,
        client_ip: impl FnOnce() -> IpAddr,
    ) -> &Pool {
        let i = match to {
            Routed::Pool(i) => i,
            Routed::Split(s) => {
                s.choose(|p| self.pools.get(p)?.affinity.as_ref(), request, client_ip, crate::time::unix_millis())
            }
        };
        &self.pools[i]
    }
}

/// The connections of one backend of pool `p`, as its settings say to make them.
fn new_upstream(address: std::net::SocketAddr, config: &Config, p: &config::Pool) -> Upstream {
    let upstream = Upstream::new(address, &config.timeouts, p.tls.clone());
    match p.protocol {
        config::BackendProtocol::Http1 => upstream,
        config::BackendProtocol::Http2 { max_streams } => upstream.with_http2(max_streams),
    }
}

//! Backends from DNS, kept up to date: every `[[pools.NAME.dns]]` source is looked up on
//! its interval by a task of its own on the control plane's runtime (never on a worker,
//! never on the request path), and again at once after every reload. A successful answer
//! goes to `Control::dns_update`, which rebuilds the snapshot the way a reload does when
//! the set changed; a failed or empty one (timeout, SERVFAIL, NXDOMAIN, no records)
//! changes nothing, so the last good set stays, and is logged once per change of state
//! and counted (`tether_dns_lookups_total`).
//!
//! Once a second, vanished addresses whose drain is over are removed: when the pool's
//! `drain_timeout` has passed since they left the answer, when health checks find them
//! down, or when they hold no session and no request any more (not in a pool with
//! hash-mapped keys, whose sessions are in no table and so not counted: there only
//! `drain_timeout` or health ends the drain).
//!
//! The TTL of the records is not used: the source's `interval` is the period. Asking a
//! resolver more often than the TTL costs one cached answer; asking less often than the
//! operator chose would keep a stale set through a rolling update.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{self, Config, DnsSource};
use crate::control::Control;
use crate::dns::client::{LookupError, Resolver};

/// Every DNS source of `config`, with its pool's name and the resolver it is asked
/// through: the pool's `resolvers`, else `[dns]`'s, else the system's.
fn sources(config: &Config) -> Vec<(String, DnsSource, Resolver)> {
    if config.pools.iter().all(|p| p.dns.is_empty()) {
        return Vec::new();
    }
    let global = if config.dns.resolvers.is_empty() {
        crate::dns::client::system_servers()
    } else {
        config.dns.resolvers.clone()
    };
    let mut out = Vec::new();
    for p in &config.pools {
        let servers = if p.resolvers.is_empty() { global.clone() } else { p.resolvers.clone() };
        let resolver = Resolver { servers, timeout: config.dns.timeout };
        out.extend(p.dns.iter().map(|s| (p.name.clone(), s.clone(), resolver.clone())));
    }
    out
}

/// Looks every source up once, together, and applies the answers without slow start: the
/// set a Tether starts with, before its listeners open (bounded by the resolvers'
/// timeouts). A source that fails here starts empty and is retried on its interval.
pub async fn first_round(control: &Arc<Control>) {
    let config = control.file_config();
    let mut lookups = JoinSet::new();
    for (pool, source, resolver) in sources(&config) {
        lookups.spawn(async move {
            let result = resolver.lookup(&source).await;
            (pool, source, result)
        });
    }
    while let Some(done) = lookups.join_next().await {
        if let Ok((pool, source, result)) = done {
            apply(control, &pool, &source, result, false);
        }
    }
}

/// Keeps every pool's DNS sources resolved until shutdown; after a reload, starts over
/// with the sources the new config has (each looked up at once).
pub async fn run(control: Arc<Control>, mut shutdown: watch::Receiver<bool>) {
    let mut reloads = control.dns_reloads();
    // The first round at start already looked every source up.
    let mut first = true;
    loop {
        reloads.borrow_and_update();
        let config = control.file_config();
        let mut watchers = JoinSet::new();
        for (pool, source, resolver) in sources(&config) {
            watchers.spawn(watch_source(control.clone(), resolver, pool, source, first));
        }
        first = false;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                changed = reloads.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Dropping the set aborts the watchers of the old sources.
                    break;
                }
                _ = tick.tick(), if !watchers.is_empty() => expire(&control),
            }
        }
    }
}

/// Looks `source` up every interval (the first time after one interval when `wait_first`)
/// and applies each answer.
async fn watch_source(control: Arc<Control>, resolver: Resolver, pool: String, source: DnsSource, wait_first: bool) {
    if wait_first {
        tokio::time::sleep(source.interval).await;
    }
    loop {
        let result = resolver.lookup(&source).await;
        apply(&control, &pool, &source, result, true);
        tokio::time::sleep(source.interval).await;
    }
}

/// Applies one lookup's result and logs what changed, or a failure once per change of
/// state.
fn apply(
    control: &Control,
    pool: &str,
    source: &DnsSource,
    result: Result<Vec<(std::net::SocketAddr, u32)>, LookupError>,
    slow_start: bool,
) {
    let key = crate::dns::source_key(source);
    match result {
        Ok(found) => {
            // A lookup that was under way when a reload removed its source is dropped.
            let Some((change, count)) = control.dns_update(pool, source, &found, slow_start) else { return };
            let before = control.shared.dns.record(pool, source, "ok", count);
            if before.is_some_and(|b| b != "ok") {
                tracing::info!(pool, source = %key, "dns: lookups succeed again: {} addresses", found.len());
            }
            for name in &change.added {
                tracing::info!(pool, source = %key, backend = %name, "dns: backend joins");
            }
            for name in &change.returned {
                tracing::info!(pool, source = %key, backend = %name, "dns: backend is back in the answer: enabled again");
            }
            for name in &change.vanished {
                tracing::info!(pool, source = %key, backend = %name, "dns: backend left the answer: draining");
            }
        }
        Err(_) if !control.dns_has_source(pool, source) => {}
        Err(e) => {
            let count = control.dns_count(pool, source);
            let before = control.shared.dns.record(pool, source, e.label(), count);
            if before != Some(e.label()) {
                tracing::warn!(pool, source = %key, "dns: lookup failed: {e}; keeping the last good set ({count} backends)");
            }
        }
    }
}

/// Removes the vanished backends whose drain is over (see the module's documentation).
fn expire(control: &Control) {
    let vanished = control.dns_vanished();
    if vanished.is_empty() {
        return;
    }
    let snapshot = control.shared.snapshot.load_full();
    let now = crate::time::unix_millis();
    let mut gone: Vec<(String, String, &'static str)> = Vec::new();
    for (pool, name, since) in vanished {
        let Some(p) = snapshot.pool(&pool) else { continue };
        let Some(b) = p.backends.iter().find(|b| b.name == name) else {
            gone.push((pool, name, "no longer in the pool"));
            continue;
        };
        let affinity = p.config.affinity.as_ref();
        let drain_timeout = affinity.and_then(|a: &config::Affinity| a.drain_timeout);
        // Hash-mapped keys are in no table, so their sessions are not counted: such a pool
        // drains until drain_timeout (or health), never on a count of zero.
        let counted = affinity.is_none_or(|a| {
            a.mapping == config::Mapping::Table
                || a.keys.iter().all(|k| matches!(k, config::KeySource::Cookie | config::KeySource::AppCookie(_)))
        });
        let why = if drain_timeout.is_some_and(|d| now.saturating_sub(since) >= d.as_millis() as u64) {
            "drain_timeout is over"
        } else if !b.is_healthy() {
            "health checks find it down"
        } else if counted && b.sessions() == 0 && b.load() == 0 {
            "no sessions or requests left"
        } else {
            continue;
        };
        gone.push((pool, name, why));
    }
    for (pool, name, why) in gone {
        tracing::info!(pool = %pool, backend = %name, "dns: drained backend removed: {why}");
        control.dns_remove(&pool, std::slice::from_ref(&name));
    }
}

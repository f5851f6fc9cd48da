//! `GET /metrics`: Prometheus text format, encoded by `prometheus-client` from Tether's
//! own atomics at scrape time, so the request path pays for no label lookups.

use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::affinity::verdict::Verdict;
use crate::backend::LATENCY_BOUNDS_US;
use crate::config::AdminState;
use crate::pool::Snapshot;
use crate::state::Shared;

/// Renders every metric of a running Tether.
pub fn render(shared: &std::sync::Arc<Shared>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(shared.clone())));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[derive(Debug)]
struct Scrape(std::sync::Arc<Shared>);

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, rows: &[(Labels<'_>, u64)]) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, rows: &[(Labels<'_>, i64)]) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

const CLASSES: [&str; 6] = ["other", "1xx", "2xx", "3xx", "4xx", "5xx"];

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let snap = self.0.snapshot.load_full();
        listeners(&mut e, &self.0)?;
        backends(&mut e, &snap)?;
        latency(&mut e, &snap)?;
        pools(&mut e, &snap)?;
        splits(&mut e, &snap)?;
        dns(&mut e, &self.0)?;
        stores(&mut e, &snap)?;
        {
            // No labels: `tether_access_log_dropped_total 0`, not `..._total{} 0`.
            let m = e.encode_descriptor(
                "tether_access_log_dropped",
                "Access log lines dropped because the log writer had fallen behind.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(self.0.access_log.dropped()).encode(m)?;
        }
        gauge(
            &mut e,
            "tether_uptime_seconds",
            "Seconds since Tether started.",
            &[(vec![], self.0.started.elapsed().as_secs() as i64)],
        )?;
        Ok(())
    }
}

fn listeners(e: &mut DescriptorEncoder<'_>, shared: &Shared) -> std::fmt::Result {
    let listeners = shared.all_listener_stats();
    let rows: Vec<_> =
        listeners.iter().map(|(n, s)| (vec![("listener", n.as_str())], s.requests.load(Ordering::Relaxed))).collect();
    counter(e, "tether_listener_requests", "Requests received, by listener.", &rows)?;
    let rows: Vec<_> =
        listeners.iter().map(|(n, s)| (vec![("listener", n.as_str())], s.accepted.load(Ordering::Relaxed))).collect();
    counter(e, "tether_listener_connections_accepted", "Client connections accepted, by listener.", &rows)?;
    let rows: Vec<_> = listeners
        .iter()
        .map(|(n, s)| (vec![("listener", n.as_str())], s.connections.load(Ordering::Relaxed)))
        .collect();
    gauge(e, "tether_listener_connections_open", "Client connections open, by listener.", &rows)?;
    let workers: Vec<(String, u64)> =
        shared.accepted_by_worker().into_iter().enumerate().map(|(i, n)| (i.to_string(), n)).collect();
    let rows: Vec<_> = workers.iter().map(|(i, n)| (vec![("worker", i.as_str())], *n)).collect();
    counter(e, "tether_worker_connections_accepted", "Client connections accepted, by worker thread.", &rows)?;
    let rows: Vec<_> = listeners
        .iter()
        .map(|(n, s)| (vec![("listener", n.as_str())], s.tls_handshake_failures.load(Ordering::Relaxed)))
        .collect();
    counter(e, "tether_tls_handshake_failures", "TLS handshakes that failed, by listener.", &rows)?;
    let rows: Vec<_> = listeners
        .iter()
        .map(|(n, s)| (vec![("listener", n.as_str())], s.proxy_protocol_refused.load(Ordering::Relaxed)))
        .collect();
    let help = "Connections closed for their PROXY protocol header (missing, malformed or untrusted), by listener.";
    counter(e, "tether_proxy_protocol_refused", help, &rows)?;
    let snapshot = shared.snapshot.load();
    let mut rows = Vec::new();
    for l in &snapshot.config.listeners {
        for c in l.tls.iter().flat_map(|t| &t.certificates) {
            rows.push((vec![("listener", l.name.as_str()), ("certificate", c.source.as_str())], c.not_after));
        }
    }
    gauge(
        e,
        "tether_tls_certificate_expiry_seconds",
        "When each loaded certificate expires (notAfter), in seconds since the Unix epoch.",
        &rows,
    )?;
    Ok(())
}

/// Per-backend counters and gauges, one row per backend (and label value).
fn backends(e: &mut DescriptorEncoder<'_>, snap: &Snapshot) -> std::fmt::Result {
    let mut requests = Vec::new();
    let mut in_flight = Vec::new();
    let mut healthy = Vec::new();
    let mut admin = Vec::new();
    let mut transitions = Vec::new();
    let mut sessions = Vec::new();
    let mut verdicts = Vec::new();
    for pool in &snap.pools {
        for b in &pool.backends {
            let base = || vec![("pool", &*pool.name), ("backend", b.name.as_str())];
            for (i, class) in CLASSES.iter().enumerate().skip(1) {
                let mut l = base();
                l.push(("class", class));
                requests.push((l, b.metrics.responses[i].load(Ordering::Relaxed)));
            }
            in_flight.push((base(), i64::from(b.load())));
            healthy.push((base(), i64::from(b.is_healthy())));
            for s in [AdminState::Enabled, AdminState::Draining, AdminState::Disabled] {
                let mut l = base();
                l.push(("state", s.as_str()));
                admin.push((l, i64::from(b.admin_state() == s)));
            }
            transitions.push((base(), b.health.transitions.load(Ordering::Relaxed)));
            sessions.push((base(), i64::from(b.sessions())));
            if pool.affinity.is_some() {
                // Every verdict but `Off`, which a pool with affinity never gives.
                for (i, (_, label)) in Verdict::ALL.iter().enumerate().skip(1) {
                    let mut l = base();
                    l.push(("outcome", label));
                    verdicts.push((l, b.verdicts[i].load(Ordering::Relaxed)));
                }
            }
        }
    }
    counter(e, "tether_backend_responses", "Responses to requests sent to a backend, by status class.", &requests)?;
    gauge(e, "tether_backend_in_flight", "Requests in flight to a backend.", &in_flight)?;
    gauge(e, "tether_backend_healthy", "1 when the backend is healthy (checks pass, not ejected).", &healthy)?;
    gauge(e, "tether_backend_admin_state", "The backend's admin state (1 for the current one).", &admin)?;
    counter(e, "tether_backend_health_transitions", "Health changes of a backend.", &transitions)?;
    gauge(e, "tether_backend_sessions", "Live sessions pinned to a backend.", &sessions)?;
    counter(
        e,
        "tether_affinity_outcomes",
        "Requests by affinity outcome, by the backend that served them.",
        &verdicts,
    )?;

    Ok(())
}

/// The request-duration histogram of every backend.
fn latency(e: &mut DescriptorEncoder<'_>, snap: &Snapshot) -> std::fmt::Result {
    let mut m = e.encode_descriptor(
        "tether_backend_request_duration_seconds",
        "Time from request head to the end of the response, by backend.",
        None,
        MetricType::Histogram,
    )?;
    for pool in &snap.pools {
        for b in &pool.backends {
            let mut cumulative = 0;
            let mut buckets = Vec::with_capacity(LATENCY_BOUNDS_US.len() + 1);
            for (i, bound) in LATENCY_BOUNDS_US.iter().enumerate() {
                cumulative += b.metrics.latency_buckets[i].load(Ordering::Relaxed);
                buckets.push((*bound as f64 / 1e6, cumulative));
            }
            cumulative += b.metrics.latency_buckets[LATENCY_BOUNDS_US.len()].load(Ordering::Relaxed);
            buckets.push((f64::MAX, cumulative));
            let sum = b.metrics.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let labels = vec![("pool", &*pool.name), ("backend", b.name.as_str())];
            m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(sum, cumulative, &buckets, None)?;
        }
    }
    Ok(())
}

/// The shared stores (`[stores.NAME]`): whether Redis answers, what was sent and what
/// came of it, and how long requests waited on it.
fn stores(e: &mut DescriptorEncoder<'_>, snap: &Snapshot) -> std::fmt::Result {
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let mut up = Vec::new();
    let mut queued = Vec::new();
    let mut ops = Vec::new();
    let mut lookups = Vec::new();
    let mut errors = Vec::new();
    let mut pins = Vec::new();
    let mut moves = Vec::new();
    let mut flushed = Vec::new();
    let mut dropped = Vec::new();
    for f in &snap.stores {
        let name = f.cfg.name.as_str();
        let s = &f.stats;
        up.push((vec![("store", name)], i64::from(f.is_up())));
        queued.push((vec![("store", name)], f.queued() as i64));
        ops.push((vec![("store", name)], n(&s.operations)));
        for (result, c) in [("hit", &s.lookup_hits), ("miss", &s.lookup_misses), ("skipped", &s.lookups_skipped)] {
            lookups.push((vec![("store", name), ("result", result)], n(c)));
        }
        for (kind, c) in [("error", &s.errors), ("timeout", &s.timeouts)] {
            errors.push((vec![("store", name), ("kind", kind)], n(c)));
        }
        for (result, c) in [("written", &s.pins_written), ("lost", &s.pins_lost)] {
            pins.push((vec![("store", name), ("result", result)], n(c)));
        }
        for (way, c) in [("sent", &s.moves_sent), ("received", &s.moves_received)] {
            moves.push((vec![("store", name), ("direction", way)], n(c)));
        }
        flushed.push((vec![("store", name)], n(&s.flushed)));
        dropped.push((vec![("store", name)], n(&s.dropped)));
    }
    gauge(e, "tether_store_up", "1 while the shared store's Redis answers.", &up)?;
    gauge(e, "tether_store_queued_writes", "Pins and refreshes waiting to be written to Redis.", &queued)?;
    counter(e, "tether_store_operations", "Redis commands sent (each command of a pipeline counts).", &ops)?;
    counter(e, "tether_store_lookups", "Keys unknown here looked up in Redis before decide, by result.", &lookups)?;
    counter(e, "tether_store_errors", "Redis commands or pipelines that failed or ran out of time.", &errors)?;
    counter(
        e,
        "tether_store_new_pins",
        "New pins written with SET NX; lost: another instance's pin was first.",
        &pins,
    )?;
    counter(e, "tether_store_moves", "Pins moved or unpinned, told to or heard from the other instances.", &moves)?;
    counter(e, "tether_store_flushed", "Refreshes and write-backs sent by the periodic flush.", &flushed)?;
    counter(e, "tether_store_dropped", "Writes dropped because the queue for Redis was full.", &dropped)?;
    let mut m = e.encode_descriptor(
        "tether_store_wait_duration_seconds",
        "How long requests waited on Redis (lookups before decide, new pins before the response).",
        None,
        MetricType::Histogram,
    )?;
    for f in &snap.stores {
        let mut cumulative = 0;
        let mut buckets = Vec::new();
        for (i, bound) in crate::store::LATENCY_BUCKETS_US.iter().enumerate() {
            cumulative += n(&f.stats.latency[i]);
            buckets.push((*bound as f64 / 1e6, cumulative));
        }
        cumulative += n(&f.stats.latency[crate::store::LATENCY_BUCKETS_US.len()]);
        buckets.push((f64::MAX, cumulative));
        let sum = n(&f.stats.latency_sum_us) as f64 / 1e6;
        let labels = vec![("store", f.cfg.name.as_str())];
        m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(sum, cumulative, &buckets, None)?;
    }
    Ok(())
}

/// Lookups of each DNS source (`source` reads `NAME/TYPE:PORT`), whether its last one
/// succeeded, and the backends it gives its pool.
fn dns(e: &mut DescriptorEncoder<'_>, shared: &Shared) -> std::fmt::Result {
    let all = shared.dns.all();
    let mut lookups = Vec::new();
    let mut up = Vec::new();
    let mut backends = Vec::new();
    for ((pool, source), s) in &all {
        let base = || vec![("pool", pool.as_str()), ("source", source.as_str())];
        for (result, n) in &s.lookups {
            let mut l = base();
            l.push(("result", result));
            lookups.push((l, *n));
        }
        up.push((base(), i64::from(s.last == Some("ok"))));
        backends.push((base(), s.backends as i64));
    }
    counter(
        e,
        "tether_dns_lookups",
        "Lookups of a pool's DNS source, by result (ok, timeout, servfail, nxdomain, empty, ...).",
        &lookups,
    )?;
    gauge(e, "tether_dns_up", "1 when the last lookup of a DNS source succeeded (else the last good set stays).", &up)?;
    gauge(e, "tether_dns_backends", "Backends a DNS source gives its pool, draining ones included.", &backends)?;
    Ok(())
}

/// Per pool of each traffic split (`route` is the split's name): requests, sessions the
/// split placed there, and the weight.
fn splits(e: &mut DescriptorEncoder<'_>, snap: &Snapshot) -> std::fmt::Result {
    let (mut requests, mut sessions, mut weights) = (Vec::new(), Vec::new(), Vec::new());
    for l in &snap.listeners {
        for s in l.splits() {
            for m in &s.members {
                let labels = vec![("listener", l.listener.as_str()), ("route", &*s.name), ("pool", &*m.name)];
                requests.push((labels.clone(), m.stats.requests.load(Ordering::Relaxed)));
                sessions.push((labels.clone(), m.stats.sessions.load(Ordering::Relaxed)));
                weights.push((labels, i64::from(m.weight)));
            }
        }
    }
    counter(e, "tether_split_requests", "Requests a traffic split sent to a pool.", &requests)?;
    counter(e, "tether_split_sessions", "New sessions a traffic split placed in a pool by weight.", &sessions)?;
    gauge(e, "tether_split_weight", "A pool's weight in a traffic split.", &weights)?;
    Ok(())
}

fn pools(e: &mut DescriptorEncoder<'_>, snap: &Snapshot) -> std::fmt::Result {
    let rows: Vec<_> =
        snap.pools.iter().map(|p| (vec![("pool", &*p.name)], p.retry_budget.retries.load(Ordering::Relaxed))).collect();
    counter(e, "tether_pool_retries", "Requests moved to another backend after a failure.", &rows)?;
    let mut size = Vec::new();
    let mut evictions = Vec::new();
    let mut expirations = Vec::new();
    let mut rejections = Vec::new();
    for p in &snap.pools {
        if let Some(a) = &p.affinity {
            let s = a.store.pin_stats();
            size.push((vec![("pool", &*p.name)], s.entries as i64));
            evictions.push((vec![("pool", &*p.name)], s.evictions));
            expirations.push((vec![("pool", &*p.name)], s.expirations));
            rejections.push((vec![("pool", &*p.name)], s.rejections));
        }
    }
    gauge(e, "tether_stick_table_entries", "Entries in a pool's stick table.", &size)?;
    counter(e, "tether_stick_table_evictions", "Stick-table entries evicted for room.", &evictions)?;
    counter(e, "tether_stick_table_expirations", "Stick-table entries expired.", &expirations)?;
    counter(
        e,
        "tether_stick_table_rejections",
        "New keys not learned because the table was full of established sessions.",
        &rejections,
    )?;
    Ok(())
}

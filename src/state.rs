//! What every part of a running Tether shares: the routing snapshot, the access log,
//! per-listener counters and the client connection counts the `[limits]` apply to. Built
//! once at start; the snapshot inside is swapped on reload.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::access_log::AccessLog;
use crate::pool::Snapshot;

/// What every connection and request of a running Tether shares.
#[derive(Debug)]
pub struct Shared {
    /// The routing state; swapped whole on reload, loaded once per request.
    pub snapshot: ArcSwap<Snapshot>,
    pub access_log: AccessLog,
    pub started: std::time::Instant,
    /// Traffic per listener name, kept across reloads.
    listener_stats: Mutex<HashMap<String, Arc<ListenerStats>>>,
    /// Client connections open, over all listeners and per client IP; kept across reloads.
    pub connections: Arc<ConnCounts>,
    /// Client connections accepted by each worker (`worker::index`), over all listeners.
    worker_accepted: Box<[AtomicU64]>,
    /// Lookups of the pools' DNS sources, for metrics.
    pub dns: crate::dns::Stats,
}

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub requests: AtomicU64,
    pub connections: AtomicI64,
    pub accepted: AtomicU64,
    /// TLS handshakes that failed (on `https` listeners).
    pub tls_handshake_failures: AtomicU64,
    /// Connections closed for their PROXY protocol header: missing where required,
    /// malformed, late, or sent by a source not trusted to send one.
    pub proxy_protocol_refused: AtomicU64,
}

impl Shared {
    pub fn new(snapshot: Snapshot, access_log: AccessLog) -> Shared {
        Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            access_log,
            started: std::time::Instant::now(),
            listener_stats: Default::default(),
            connections: Arc::new(ConnCounts::new()),
            worker_accepted: (0..crate::worker::count()).map(|_| AtomicU64::new(0)).collect(),
            dns: Default::default(),
        }
    }

    /// Counts a connection accepted by worker `worker`.
    pub fn worker_accepted(&self, worker: usize) {
        if let Some(n) = self.worker_accepted.get(worker) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Client connections each worker accepted so far, by worker index, for metrics.
    pub fn accepted_by_worker(&self) -> Vec<u64> {
        self.worker_accepted.iter().map(|n| n.load(Ordering::Relaxed)).collect()
    }

    /// The counters of listener `name`, made on first use.
    pub fn listener_stats(&self, name: &str) -> Arc<ListenerStats> {
        let mut m = self.listener_stats.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(name.to_string()).or_default().clone()
    }

    /// Every listener's counters, for metrics.
    pub fn all_listener_stats(&self) -> Vec<(String, Arc<ListenerStats>)> {
        let m = self.listener_stats.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// The client connections open, counted for `[limits]`: all of them, and per client IP.
/// A connection is counted from its accept until its [`ConnPermit`] drops (which an
/// upgraded tunnel holds too).
#[derive(Debug)]
pub struct ConnCounts {
    total: AtomicU32,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    /// Accept loops waiting for a connection to close.
    waiting: AtomicUsize,
    room: Notify,
    epoch: Instant,
    /// When each cap was last logged (milliseconds since `epoch`, plus one), and how
    /// often it was hit since.
    global_logged: AtomicU64,
    global_hits: AtomicU64,
    per_ip_logged: AtomicU64,
    per_ip_hits: AtomicU64,
}

/// Why a connection may not be opened now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// `max_client_connections`: wait for a connection to close.
    Global,
    /// `max_connections_per_ip`: refuse this connection.
    PerIp,
}

impl ConnCounts {
    fn new() -> ConnCounts {
        ConnCounts {
            total: AtomicU32::new(0),
            per_ip: Mutex::new(HashMap::new()),
            waiting: AtomicUsize::new(0),
            room: Notify::new(),
            epoch: Instant::now(),
            global_logged: AtomicU64::new(0),
            global_hits: AtomicU64::new(0),
            per_ip_logged: AtomicU64::new(0),
            per_ip_hits: AtomicU64::new(0),
        }
    }

    /// Client connections open over all listeners.
    pub fn total(&self) -> u32 {
        self.total.load(Ordering::SeqCst)
    }

    /// Counts a new connection from `ip` when both caps allow it. Connections are counted
    /// per IP only while a per-IP cap is set (no lock or hash per connection otherwise); a
    /// cap a reload turns on counts the connections opened from then on.
    pub fn try_open(
        self: &Arc<Self>,
        ip: IpAddr,
        max_total: u32,
        max_per_ip: Option<u32>,
    ) -> Result<ConnPermit, OverLimit> {
        self.total
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max_total).then_some(n + 1))
            .map_err(|_| OverLimit::Global)?;
        let Some(max) = max_per_ip else {
            return Ok(ConnPermit { counts: self.clone(), ip: None });
        };
        let ip = crate::net::canonical(ip);
        let mut m = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            if *n == 0 {
                m.remove(&ip);
            }
            drop(m);
            self.release_total();
            return Err(OverLimit::PerIp);
        }
        *n += 1;
        Ok(ConnPermit { counts: self.clone(), ip: Some(ip) })
    }

    /// Waits until fewer than `max_total` connections are open, or `limit` passes (the
    /// cap may change on reload; the caller looks again).
    pub async fn wait_for_room(&self, max_total: u32, limit: std::time::Duration) {
        let notified = self.room.notified();
        let mut notified = std::pin::pin!(notified);
        self.waiting.fetch_add(1, Ordering::SeqCst);
        notified.as_mut().enable();
        if self.total() >= max_total {
            let _ = tokio::time::timeout(limit, notified).await;
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    fn release_total(&self) {
        self.total.fetch_sub(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.room.notify_waiters();
        }
    }

    /// Whether a hit of `cap` should be logged now (at most once a second per cap), and
    /// how many hits the line stands for.
    pub fn log_hit(&self, cap: OverLimit) -> Option<u64> {
        let (logged, hits) = match cap {
            OverLimit::Global => (&self.global_logged, &self.global_hits),
            OverLimit::PerIp => (&self.per_ip_logged, &self.per_ip_hits),
        };
        hits.fetch_add(1, Ordering::Relaxed);
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = logged.load(Ordering::Relaxed);
        if last != 0 && now < last + 1000 {
            return None;
        }
        logged.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).ok()?;
        Some(hits.swap(0, Ordering::Relaxed))
    }
}

/// One counted client connection; dropping it gives its place back.
#[derive(Debug)]
pub struct ConnPermit {
    counts: Arc<ConnCounts>,
    /// The client IP it is counted under, when a per-IP cap was set.
    ip: Option<IpAddr>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut m = self.counts.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        }
        self.counts.release_total();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn permits_count_connections_over_all_and_per_ip() {
        let c = Arc::new(ConnCounts::new());
        let a1 = c.try_open(ip("10.0.0.1"), 3, Some(2)).unwrap();
        // An IPv4-mapped IPv6 peer is the same client.
        let a2 = c.try_open(ip("::ffff:10.0.0.1"), 3, Some(2)).unwrap();
        assert_eq!(c.try_open(ip("10.0.0.1"), 3, Some(2)).unwrap_err(), OverLimit::PerIp);
        assert_eq!(c.total(), 2, "a refused connection gives its place back");
        let b1 = c.try_open(ip("10.0.0.2"), 3, Some(2)).unwrap();
        assert_eq!(c.try_open(ip("10.0.0.3"), 3, Some(2)).unwrap_err(), OverLimit::Global);
        drop(a1);
        assert_eq!(c.total(), 2);
        let a3 = c.try_open(ip("10.0.0.1"), 3, None).unwrap();
        assert_eq!(
            c.per_ip.lock().unwrap().get(&ip("10.0.0.1")),
            Some(&1),
            "without a per-IP cap nothing is counted per IP"
        );
        drop((a2, a3, b1));
        assert_eq!(c.total(), 0);
        assert!(c.per_ip.lock().unwrap().is_empty(), "no entry is kept for a client with no connection");
    }

    #[tokio::test]
    async fn a_closing_connection_wakes_a_waiting_accept_loop() {
        let c = Arc::new(ConnCounts::new());
        let p = c.try_open(ip("10.0.0.1"), 1, None).unwrap();
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.wait_for_room(1, std::time::Duration::from_secs(60)).await })
        };
        while c.waiting.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        drop(p);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert!(c.try_open(ip("10.0.0.1"), 1, None).is_ok());
    }

    #[test]
    fn a_cap_is_logged_at_most_once_a_second() {
        let c = ConnCounts::new();
        assert_eq!(c.log_hit(OverLimit::PerIp), Some(1));
        assert_eq!(c.log_hit(OverLimit::PerIp), None);
        assert_eq!(c.log_hit(OverLimit::Global), Some(1), "each cap on its own");
    }
}

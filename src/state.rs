//! What every part of a running Tether shares: the routing snapshot, the access log and
//! per-listener counters. Built once at start; the snapshot inside is swapped on reload.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

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
}

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub requests: AtomicU64,
    pub connections: AtomicI64,
    pub accepted: AtomicU64,
}

impl Shared {
    pub fn new(snapshot: Snapshot, access_log: AccessLog) -> Shared {
        Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            access_log,
            started: std::time::Instant::now(),
            listener_stats: Default::default(),
        }
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

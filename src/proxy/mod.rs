//! The data path: client connections in, requests forwarded, responses streamed back.
//!
//! - [`conn`] serves one client connection (HTTP/1.1 or h2c) and enforces the client-side
//!   timeouts: request-header read and keep-alive idle.
//! - [`http`] handles one request: route, pick a backend, rewrite headers, forward, and
//!   turn failures into responses a client can understand.
//! - [`body`] streams a response back and, when it ends, settles the request: connection
//!   back to the pool, in-flight count down, access log line written.
//! - [`upstream`] holds the connections to one backend.

pub mod body;
pub mod conn;
pub mod http;
pub mod upstream;

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
    pub listener_stats: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<ListenerStats>>>,
}

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub requests: std::sync::atomic::AtomicU64,
    pub connections: std::sync::atomic::AtomicI64,
    pub accepted: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub fn listener_stats(&self, name: &str) -> std::sync::Arc<ListenerStats> {
        let mut m = self.listener_stats.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(name.to_string()).or_default().clone()
    }
}

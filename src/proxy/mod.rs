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
}

//! The data path: client connections in, requests forwarded, responses streamed back.
//!
//! - [`conn`] serves one client connection (HTTP/1.1 or h2c); [`client`] holds what a
//!   request knows of it and the state machine behind the client-side
//!   timeouts: request-header read and keep-alive idle.
//! - [`request`] takes one request through its steps: route, decide, send (with moves to
//!   another backend), respond.
//! - [`rewrite`] changes headers on the way through.
//! - [`refusal`] is every way a request can fail in Tether's hands, with its status and
//!   label.
//! - [`tcp`] serves a `tcp` listener's connection (routed by TLS server name, forwarded
//!   whole) and holds the relay that also carries WebSocket tunnels.
//! - [`body`] streams a response back and, when it ends, settles the request: connection
//!   back to the pool, in-flight count down, access log line written.

pub mod backside;
pub mod body;
pub mod client;
pub mod conn;
pub mod native;
pub mod refusal;
pub mod request;
pub mod rewrite;
pub mod tcp;

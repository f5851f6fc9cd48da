//! Tether: an HTTP load balancer whose speciality is session persistence.
//!
//! The crate is a library with a thin binary (`main.rs`) so that integration tests and
//! benches reach the same code the binary runs. Modules are layered: each depends only on
//! modules of its own layer or below (`tests/layers.rs` checks it). See ARCHITECTURE.md.

// Primitives and configuration.
pub mod config;
pub mod h1;
pub(crate) mod line_writer;
pub(crate) mod net;
pub mod proxy_header;
pub(crate) mod random;
pub mod sd_notify;
pub mod time;
pub mod tls;
pub(crate) mod worker;

// Building blocks.
pub(crate) mod access_log;
pub mod backend;
pub mod balance;
pub mod dns;
pub(crate) mod retry;
pub(crate) mod upstream;

// Policy: where a request goes, and keeping that state right.
pub mod affinity;
pub(crate) mod health;
pub(crate) mod housekeeping;
pub(crate) mod pool;
pub(crate) mod split;
pub(crate) mod state;
pub(crate) mod store;

// The data path.
pub(crate) mod listener;
pub(crate) mod proxy;

// Changing and watching a running Tether.
pub(crate) mod admin;
pub(crate) mod control;
pub(crate) mod discovery;
pub(crate) mod fleet;
pub(crate) mod upgrade;
pub(crate) mod warm;

// Simulation of the policy code (above it, beside the data path, which it never uses).
pub mod simulate;

// Entry points.
pub mod cli;
pub mod demo;
pub mod server;

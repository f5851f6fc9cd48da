//! Tether: an HTTP load balancer whose speciality is session persistence.
//!
//! The crate is a library with a thin binary (`main.rs`) so that integration tests and
//! benches reach the same code the binary runs. See ARCHITECTURE.md for the module map.

pub mod access_log;
pub mod admin;
pub mod affinity;
pub mod balance;
pub mod cli;
pub mod config;
pub mod demo;
pub mod health;
pub mod pool;
pub mod proxy;
pub mod server;
pub mod time;

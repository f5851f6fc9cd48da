//! The native HTTP/1 path: client connections and backend connections on Tether's own
//! codec ([`crate::h1`]); every HTTP/1 client connection is served here.
//!
//! - [`conn`] serves one client connection: read a head, route, decide, send, respond.
//! - [`buffers`] are the per-thread free lists of buffers and per-request parts that a
//!   connection holds only while it works.
//! - [`head`] writes the request head a backend gets and the response head a client gets,
//!   from the received heads' byte ranges with Tether's edits.

pub mod buffers;
pub mod conn;
pub mod head;
pub mod io;

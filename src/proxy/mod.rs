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

/// The PROXY protocol header `pool` sends first on a backend connection for a client
/// connection from `client` to `local` (`None`: the pool sends none). `local` is unknown
/// only for a connection accepted before a reload made some pool send headers; its
/// header then names the unspecified address of the client's family.
pub(crate) fn proxy_header(
    pool: &crate::pool::Pool,
    client: std::net::SocketAddr,
    local: Option<std::net::SocketAddr>,
) -> Option<crate::proxy_header::Header> {
    let version = pool.config.send_proxy_protocol?;
    let local = local.unwrap_or_else(|| {
        let unspecified: std::net::IpAddr = match client {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        };
        std::net::SocketAddr::new(unspecified, 0)
    });
    Some(crate::proxy_header::write(version, client, local))
}

/// Copies the first bytes waiting on the socket into `buf` without taking them; 0: the
/// client closed its side. `WouldBlock` when there are none.
pub(crate) fn peek(stream: &tokio::net::TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes, and the descriptor is
        // open for as long as `stream` is borrowed.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(stream),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

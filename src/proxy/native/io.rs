//! What the native path needs of a client connection, for a plain TCP socket and for TLS
//! that Tether terminates.

use std::future::Future;
use std::io;

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::tcp;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A client connection the native path serves.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read<'a>: AsyncRead + Unpin + Send
    where
        Self: 'a;
    type Write<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;

    /// Requests arrive over TLS that Tether terminates.
    const TLS: bool;

    /// Both directions at once (a body may stream up while the response streams down).
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);

    /// Resolves when a read may give bytes, without taking a buffer: an idle connection
    /// holds only its socket (and, over TLS, the TLS state).
    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send;
}

impl ClientIo for TcpStream {
    type Read<'a> = tcp::ReadHalf<'a>;
    type Write<'a> = tcp::WriteHalf<'a>;
    const TLS: bool = false;

    fn halves(&mut self) -> (tcp::ReadHalf<'_>, tcp::WriteHalf<'_>) {
        self.split()
    }

    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::readable(self)
    }
}

impl ClientIo for TlsStream<TcpStream> {
    type Read<'a> = ReadHalf<&'a mut TlsStream<TcpStream>>;
    type Write<'a> = WriteHalf<&'a mut TlsStream<TcpStream>>;
    const TLS: bool = true;

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        tokio::io::split(self)
    }

    async fn readable(&mut self) -> io::Result<()> {
        let (tcp, tls) = self.get_mut();
        // Records already received may hold the next request (pipelined, or read with the
        // last one): then there is no socket readiness to wait for.
        let state = tls.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() {
            return Ok(());
        }
        tcp.readable().await
    }
}

//! Traffic listeners: binding a socket and the loop that accepts its connections and
//! hands each to the data path. Opening and closing listeners by name is `control`'s.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::proxy::conn::Protocols;
use crate::state::Shared;

/// Binds a listening socket (`SO_REUSEADDR`, a backlog of 4096).
pub fn bind(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = if address.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(4096)
}

/// Accepts connections until shutdown or until `stopped` says this listener is closed.
pub async fn accept_loop(
    listener: TcpListener,
    name: Arc<str>,
    shared: Arc<Shared>,
    protocols: Arc<Protocols>,
    mut shutdown: watch::Receiver<bool>,
    mut stopped: watch::Receiver<bool>,
) {
    let stats = shared.listener_stats(&name);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => return,
            _ = stopped.changed() => {
                tracing::info!(listener = %name, "listener closed");
                return;
            }
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                stats.accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                let conn = crate::proxy::conn::serve(
                    stream,
                    peer,
                    name.clone(),
                    shared.clone(),
                    protocols.clone(),
                    stats.clone(),
                    shutdown.clone(),
                );
                tokio::spawn(conn);
            }
            Err(e) if out_of_resources(&e) => {
                // Out of file descriptors or memory: retrying at once would spin. Pause so
                // that finishing connections can free some.
                tracing::warn!(listener = %name, "accept failed: {e}; pausing accepts for 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => tracing::debug!(listener = %name, "accept failed: {e}"),
        }
    }
}

fn out_of_resources(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM on Linux.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

//! Traffic listeners: binding a listener's sockets (one per worker) and the loop that
//! accepts a socket's connections and hands each to the data path, on the worker the
//! socket belongs to. Opening and closing listeners by name is `control`'s.
//!
//! The accept loop applies `[limits]`: at `max_client_connections` open connections (over
//! all listeners) it stops accepting until one closes, so the kernel's backlog holds the
//! rest; a connection over `max_connections_per_ip` is closed at once. Each cap is logged
//! at most once a second.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::proxy::conn::{Accepted, Protocols};
use crate::state::{ConnPermit, OverLimit, Shared};

/// How long an accept loop at the connection cap waits before it looks at the cap again
/// (a reload may have raised it); a closing connection wakes it sooner.
const RECHECK: Duration = Duration::from_secs(1);

/// Connections the kernel queues for each listening socket before they are accepted.
const BACKLOG: u32 = 4096;

/// Binds a listening socket (`SO_REUSEADDR`, a backlog of 4096) on the current runtime.
pub fn bind(address: SocketAddr) -> io::Result<TcpListener> {
    socket_on(address, false)?.listen(BACKLOG)
}

/// A socket bound to `address` with `SO_REUSEADDR`, and `SO_REUSEPORT` when `reuseport`.
fn socket_on(address: SocketAddr, reuseport: bool) -> io::Result<TcpSocket> {
    let socket = if address.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    if reuseport {
        socket.set_reuseport(true)?;
    }
    socket.bind(address)?;
    Ok(socket)
}

/// Binds one listening socket on `address` for each worker runtime, each registered with
/// its worker's reactor, all on the same port (the system's choice for port 0). One worker
/// gets one plain socket, as [`bind`] makes it.
///
/// Several workers get `SO_REUSEPORT` sockets, among which the kernel spreads incoming
/// connections. `SO_REUSEPORT` would also let a process of the same user that set it
/// join a port silently, both ways round, so the address is first bound by a probe socket
/// without it: that bind fails with `EADDRINUSE` when any other socket holds the port.
/// The probe is closed before the workers' sockets are bound (it would conflict with
/// them), which leaves a window of a few system calls in which another `SO_REUSEPORT`
/// socket of the same user could bind the port unnoticed; one without `SO_REUSEPORT`
/// taking it then makes these binds fail, which is the error wanted. Either every socket
/// is bound or none is.
pub fn bind_for_workers(address: SocketAddr, workers: &[Handle]) -> io::Result<Vec<TcpListener>> {
    if workers.len() <= 1 {
        let _runtime = workers.first().map(Handle::enter);
        return Ok(vec![bind(address)?]);
    }
    let probe = socket_on(address, false)?;
    let address = probe.local_addr()?;
    drop(probe);
    let mut sockets = Vec::with_capacity(workers.len());
    for worker in workers {
        let socket = socket_on(address, true)?;
        let _runtime = worker.enter();
        sockets.push(socket.listen(BACKLOG)?);
    }
    Ok(sockets)
}

/// Accepts connections until shutdown or until `stopped` says this listener is closed.
/// It runs on the worker `listener` belongs to, and so does every connection it accepts:
/// `tokio::spawn` puts a task on the runtime it is called from.
pub async fn accept_loop(
    listener: TcpListener,
    name: Arc<str>,
    shared: Arc<Shared>,
    protocols: Arc<Protocols>,
    mut shutdown: watch::Receiver<bool>,
    mut stopped: watch::Receiver<bool>,
) {
    let stats = shared.listener_stats(&name);
    let worker = crate::worker::index();
    loop {
        // At the global cap, leave new connections in the backlog until one closes.
        let max = shared.snapshot.load().config.limits.max_client_connections;
        if shared.connections.total() >= max {
            log_cap(&shared, &name, OverLimit::Global, None);
            let room = shared.connections.wait_for_room(max, RECHECK);
            if unless_stopped(&name, &mut shutdown, &mut stopped, room).await.is_none() {
                return;
            }
            continue;
        }
        let Some(accepted) = unless_stopped(&name, &mut shutdown, &mut stopped, listener.accept()).await else {
            return;
        };
        match accepted {
            Ok((stream, peer)) => {
                stats.accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                shared.worker_accepted(worker);
                let place = admit(&shared, &name, peer);
                let Some(place) = unless_stopped(&name, &mut shutdown, &mut stopped, place).await else { return };
                let Some(permit) = place else {
                    // Over the per-IP cap: closed at once.
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let conn = crate::proxy::conn::serve(
                    Accepted { stream, peer, permit },
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

/// `fut`'s result, unless Tether shuts down or this listener is stopped first (`None`).
async fn unless_stopped<T>(
    name: &str,
    shutdown: &mut watch::Receiver<bool>,
    stopped: &mut watch::Receiver<bool>,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        _ = shutdown.changed() => None,
        _ = stopped.changed() => {
            tracing::info!(listener = %name, "listener closed");
            None
        }
        r = fut => Some(r),
    }
}

/// A connection's place under `[limits]`: `None` when its client IP is over the per-IP
/// cap (the connection is closed at once). When another listener took the last place
/// since the accept loop looked, this waits for one to close.
async fn admit(shared: &Shared, name: &str, peer: SocketAddr) -> Option<ConnPermit> {
    loop {
        let limits = shared.snapshot.load().config.limits;
        match shared.connections.try_open(peer.ip(), limits.max_client_connections, limits.max_connections_per_ip) {
            Ok(p) => return Some(p),
            Err(OverLimit::PerIp) => {
                log_cap(shared, name, OverLimit::PerIp, Some(peer));
                return None;
            }
            Err(OverLimit::Global) => {
                log_cap(shared, name, OverLimit::Global, None);
                shared.connections.wait_for_room(limits.max_client_connections, RECHECK).await;
            }
        }
    }
}

/// Logs that a connection cap was hit, at most once a second per cap.
fn log_cap(shared: &Shared, name: &str, cap: OverLimit, peer: Option<SocketAddr>) {
    let Some(hits) = shared.connections.log_hit(cap) else { return };
    let limits = shared.snapshot.load().config.limits;
    match cap {
        OverLimit::Global => tracing::warn!(
            listener = %name,
            "limits.max_client_connections ({}) reached: accepts paused until a connection closes (paused {hits} times since last said)",
            limits.max_client_connections
        ),
        OverLimit::PerIp => tracing::warn!(
            listener = %name,
            "limits.max_connections_per_ip ({}) reached: closed a connection from {} ({hits} refused since last said)",
            limits.max_connections_per_ip.unwrap_or(0),
            peer.map(|p| crate::net::canonical(p.ip()).to_string()).unwrap_or_default()
        ),
    }
}

fn out_of_resources(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM on Linux.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

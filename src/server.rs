//! A running Tether: the runtime, the listeners and their accept loops, signals, reload
//! and graceful shutdown.
//!
//! Shutdown uses one `watch` channel. Every accept loop, client connection and upgraded
//! tunnel holds a receiver; shutdown sends `true` (accept loops stop, connections finish
//! their requests and close) and then waits, up to the grace period, for the channel's
//! last receiver to go.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::access_log::AccessLog;
use crate::config::{self, Config};
use crate::pool::Snapshot;
use crate::proxy::conn::Protocols;
use crate::proxy::Shared;

/// Builds the runtime the config asks for: one thread runs everything on the calling
/// thread with no work stealing, which is the fastest setting per core.
pub fn runtime(threads: usize) -> io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
}

/// A started Tether, listening.
pub struct Server {
    pub shared: Arc<Shared>,
    /// Each listener's name and the address it is bound to.
    pub addresses: Vec<(String, SocketAddr)>,
    source: Option<PathBuf>,
    shutdown: watch::Sender<bool>,
}

impl Server {
    /// Binds every listener and starts accepting. `source` is the file to re-read on
    /// SIGHUP.
    pub async fn start(config: Config, source: Option<PathBuf>) -> anyhow::Result<Server> {
        let access_log = AccessLog::open(&config.access_log).context("cannot open the access log")?;
        let config = Arc::new(config);
        let snapshot = Snapshot::build(config.clone(), None);
        let shared = Arc::new(Shared { snapshot: ArcSwap::from_pointee(snapshot), access_log });
        let (shutdown, _) = watch::channel(false);

        let protocols = Arc::new(Protocols::new());

        let mut addresses = Vec::new();
        for (index, l) in config.listeners.iter().enumerate() {
            let listener = bind(l.bind).with_context(|| format!("listener \"{}\": cannot bind {}", l.name, l.bind))?;
            let address = listener.local_addr()?;
            tracing::info!(listener = %l.name, "listening on {address}");
            addresses.push((l.name.clone(), address));
            let name: Arc<str> = Arc::from(l.name.as_str());
            tokio::spawn(accept_loop(listener, index, name, shared.clone(), protocols.clone(), shutdown.subscribe()));
        }
        tokio::spawn(sweep_sessions(shared.clone(), shutdown.subscribe()));
        Ok(Server { shared, addresses, source, shutdown })
    }

    /// Serves until SIGTERM or SIGINT, reloading on SIGHUP, then shuts down gracefully.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
                _ = hup.recv() => self.reload(),
            }
        }
        self.shutdown().await;
        Ok(())
    }

    /// Re-reads the config file; a config with errors is rejected and the running one stays.
    pub fn reload(&self) {
        let Some(path) = &self.source else {
            tracing::warn!("reload asked, but this config was not read from a file");
            return;
        };
        let config = match config::load(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("reload rejected, the running config stays in force:\n{e}");
                return;
            }
        };
        let old = self.shared.snapshot.load_full();
        let same_listeners = config.listeners.len() == old.config.listeners.len()
            && config.listeners.iter().zip(&old.config.listeners).all(|(a, b)| a.bind == b.bind && a.name == b.name);
        if !same_listeners {
            tracing::warn!(
                "reload: adding, removing or rebinding listeners needs a restart for now; kept the old ones"
            );
            return;
        }
        let snapshot = Snapshot::build(Arc::new(config), Some(&old));
        self.shared.snapshot.store(Arc::new(snapshot));
        tracing::info!(path = %path.display(), "config reloaded");
    }

    /// Stops accepting, lets requests in flight finish within the grace period, returns.
    pub async fn shutdown(self) {
        let grace = self.shared.snapshot.load().config.shutdown_grace;
        let _ = self.shutdown.send(true);
        tracing::info!("no longer accepting; waiting up to {grace:?} for open connections to finish");
        match tokio::time::timeout(grace, self.shutdown.closed()).await {
            Ok(()) => tracing::info!("all connections finished; bye"),
            Err(_) => tracing::warn!(
                "grace period of {grace:?} is over; closing {} connections still open",
                self.shutdown.receiver_count()
            ),
        }
    }
}

/// Once a second, off the request path: drop expired affinity entries, recount the
/// sessions pinned to each backend, and report the progress of drains.
async fn sweep_sessions(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut reported: std::collections::HashMap<(Arc<str>, String), u32> = std::collections::HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        let snapshot = shared.snapshot.load_full();
        for pool in &snapshot.pools {
            let Some(a) = &pool.affinity else { continue };
            let counts = a.store.sweep();
            for (b, id) in pool.backends.iter().zip(&a.ids) {
                let n = counts.get(id).copied().unwrap_or(0) as u32;
                b.set_sessions(n);
                let key = (pool.name.clone(), b.name.clone());
                if b.admin_state() != crate::config::AdminState::Draining {
                    reported.remove(&key);
                } else if reported.get(&key) != Some(&n) {
                    tracing::info!(pool = %pool.name, backend = %b.name, "draining: {n} sessions still pinned");
                    reported.insert(key, n);
                }
            }
        }
    }
}

fn bind(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = if address.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(4096)
}

async fn accept_loop(
    listener: TcpListener,
    index: usize,
    name: Arc<str>,
    shared: Arc<Shared>,
    protocols: Arc<Protocols>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let conn = crate::proxy::conn::serve(
                    stream,
                    peer,
                    index,
                    name.clone(),
                    shared.clone(),
                    protocols.clone(),
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

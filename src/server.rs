//! A running Tether: the runtime, the listeners and their accept loops, signals, reload
//! and graceful shutdown.
//!
//! Shutdown uses one `watch` channel. Every accept loop, client connection and upgraded
//! tunnel holds a receiver; shutdown sends `true` (accept loops stop, connections finish
//! their requests and close) and then waits, up to the grace period, for the channel's
//! last receiver to go.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::access_log::AccessLog;
use crate::config::{self, AdminState, Config};
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
    pub control: Arc<Control>,
    pub shared: Arc<Shared>,
    /// Each listener's name and the address it was bound to at start.
    pub addresses: Vec<(String, SocketAddr)>,
    /// The admin listener's address, when the config has `[admin]`.
    pub admin_address: Option<SocketAddr>,
    /// SIGTERM, SIGINT and SIGHUP, caught from before the first listener opens so that
    /// a signal sent as soon as Tether says it listens is never missed.
    signals: [tokio::signal::unix::Signal; 3],
}

/// What changes a running Tether: reloads and the admin API's backend actions. Both end
/// in a new snapshot swapped in whole.
pub struct Control {
    pub shared: Arc<Shared>,
    source: Option<PathBuf>,
    shutdown: watch::Sender<bool>,
    protocols: Arc<Protocols>,
    /// Open listeners by name: their configured address and the switch that stops them.
    listeners: Mutex<HashMap<String, (SocketAddr, watch::Sender<bool>)>>,
    /// The config as the file says it; the snapshot's config is this plus `overrides`.
    file_config: Mutex<Arc<Config>>,
    /// Admin API changes by (pool, backend), kept across reloads until the file changes
    /// that backend.
    overrides: Mutex<HashMap<(String, String), Override>>,
    /// Serialises reloads and admin actions.
    changing: Mutex<()>,
}

/// An admin API change to one backend, with the file's values it was made over.
#[derive(Debug, Clone)]
struct Override {
    state: Option<AdminState>,
    weight: Option<u32>,
    file_state: AdminState,
    file_weight: u32,
}

/// What the admin API can do to a backend.
#[derive(Debug, Clone, Copy)]
pub enum BackendAction {
    State(AdminState),
    Weight(u32),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Server {
    /// Binds every listener and starts accepting. `source` is the file to re-read on
    /// SIGHUP.
    pub async fn start(config: Config, source: Option<PathBuf>) -> anyhow::Result<Server> {
        use tokio::signal::unix::{signal, SignalKind};
        let signals =
            [signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?, signal(SignalKind::hangup())?];
        let access_log = AccessLog::open(&config.access_log).context("cannot open the access log")?;
        let config = Arc::new(config);
        let snapshot = Snapshot::build(config.clone(), None);
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            access_log,
            started: std::time::Instant::now(),
            listener_stats: Default::default(),
        });
        let (shutdown, _) = watch::channel(false);
        let control = Arc::new(Control {
            shared: shared.clone(),
            source,
            shutdown,
            protocols: Arc::new(Protocols::new()),
            listeners: Default::default(),
            file_config: Mutex::new(config.clone()),
            overrides: Default::default(),
            changing: Mutex::new(()),
        });
        let mut addresses = Vec::new();
        for l in &config.listeners {
            addresses.push((l.name.clone(), control.open_listener(l)?));
        }
        let admin_address = match &config.admin {
            Some(a) => {
                let listener = bind(a.bind).with_context(|| format!("admin: cannot bind {}", a.bind))?;
                let address = listener.local_addr()?;
                tracing::info!(listener = "admin", "admin listening on {address} (dashboard, API, metrics)");
                tokio::spawn(crate::admin::serve(listener, control.clone(), a.clone(), control.shutdown.subscribe()));
                Some(address)
            }
            None => None,
        };
        tokio::spawn(sweep_sessions(shared.clone(), control.shutdown.subscribe()));
        tokio::spawn(crate::health::supervise(shared.clone(), control.shutdown.subscribe()));
        Ok(Server { control, shared, addresses, admin_address, signals })
    }

    /// Serves until SIGTERM or SIGINT, reloading on SIGHUP, then shuts down gracefully.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        let Server { control, signals, .. } = self;
        let [mut term, mut int, mut hup] = signals;
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
                _ = hup.recv() => { let _ = control.reload(); }
            }
        }
        control.shutdown().await;
        Ok(())
    }

    pub fn reload(&self) -> Result<Vec<String>, String> {
        self.control.reload()
    }
}

impl Control {
    fn open_listener(&self, l: &config::Listener) -> anyhow::Result<SocketAddr> {
        let listener = bind(l.bind).with_context(|| format!("listener \"{}\": cannot bind {}", l.name, l.bind))?;
        let address = listener.local_addr()?;
        tracing::info!(listener = %l.name, "listening on {address}");
        let (stop, stopped) = watch::channel(false);
        let name: Arc<str> = Arc::from(l.name.as_str());
        tokio::spawn(accept_loop(
            listener,
            name,
            self.shared.clone(),
            self.protocols.clone(),
            self.shutdown.subscribe(),
            stopped,
        ));
        lock(&self.listeners).insert(l.name.clone(), (l.bind, stop));
        Ok(address)
    }

    /// The file's config with the admin API's changes applied.
    fn effective(&self, file: &Config) -> Config {
        let overrides = lock(&self.overrides);
        let mut c = file.clone();
        for p in &mut c.pools {
            for b in &mut p.backends {
                if let Some(o) = overrides.get(&(p.name.clone(), b.name.clone())) {
                    if let Some(s) = o.state {
                        b.state = s;
                    }
                    if let Some(w) = o.weight {
                        b.weight = w;
                    }
                }
            }
        }
        c
    }

    /// Re-reads the config file and swaps it in. A config with errors is rejected, with
    /// its located errors, and the running one stays in force. Returns what changed.
    pub fn reload(&self) -> Result<Vec<String>, String> {
        let _one_at_a_time = lock(&self.changing);
        let Some(path) = &self.source else {
            tracing::warn!("reload asked, but this config was not read from a file");
            return Err("this config was not read from a file".into());
        };
        let config = match config::load(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("reload rejected, the running config stays in force:\n{e}");
                return Err(e.to_string());
            }
        };
        let old = self.shared.snapshot.load_full();
        // Listeners first: if a new one cannot be bound, nothing changes.
        let mut opened = Vec::new();
        let open = lock(&self.listeners).clone();
        for l in &config.listeners {
            if open.get(&l.name).is_some_and(|(bind, _)| *bind == l.bind) {
                continue;
            }
            if let Some((_, stop)) = open.get(&l.name) {
                let _ = stop.send(true);
            }
            match self.open_listener(l) {
                Ok(_) => opened.push(l.name.clone()),
                Err(e) => {
                    for name in &opened {
                        if let Some((_, stop)) = lock(&self.listeners).remove(name) {
                            let _ = stop.send(true);
                        }
                    }
                    tracing::error!("reload rejected, the running config stays in force: {e:#}");
                    return Err(format!("{e:#}"));
                }
            }
        }
        lock(&self.listeners).retain(|name, (_, stop)| {
            let keep = config.listeners.iter().any(|l| &l.name == name);
            if !keep {
                let _ = stop.send(true);
            }
            keep
        });
        // An admin change lasts until the file itself changes that backend.
        lock(&self.overrides).retain(|(pool, backend), o| {
            let now = config
                .pools
                .iter()
                .find(|p| &p.name == pool)
                .and_then(|p| p.backends.iter().find(|b| &b.name == backend));
            now.is_some_and(|b| b.state == o.file_state && b.weight == o.file_weight)
        });
        let file_old = lock(&self.file_config).clone();
        let changes = diff(&file_old, &config);
        let config = Arc::new(config);
        *lock(&self.file_config) = config.clone();
        let snapshot = Snapshot::build(Arc::new(self.effective(&config)), Some(&old));
        self.shared.snapshot.store(Arc::new(snapshot));
        for c in &changes {
            tracing::info!("reload: {c}");
        }
        tracing::info!(path = %path.display(), changes = changes.len(), "config reloaded");
        Ok(changes)
    }

    /// Applies an admin action to a backend at once; it outlives reloads until the file
    /// changes that backend. `Err` when the pool or backend is unknown.
    pub fn backend_action(&self, pool: &str, backend: &str, action: BackendAction) -> Result<(), String> {
        let _one_at_a_time = lock(&self.changing);
        let file = lock(&self.file_config).clone();
        let p = file.pools.iter().find(|p| p.name == pool).ok_or_else(|| format!("no pool \"{pool}\""))?;
        let b = p
            .backends
            .iter()
            .find(|b| b.name == backend)
            .ok_or_else(|| format!("pool \"{pool}\" has no backend \"{backend}\""))?;
        {
            let mut overrides = lock(&self.overrides);
            let o = overrides.entry((pool.to_string(), backend.to_string())).or_insert(Override {
                state: None,
                weight: None,
                file_state: b.state,
                file_weight: b.weight,
            });
            match action {
                BackendAction::State(s) => o.state = Some(s),
                BackendAction::Weight(w) => o.weight = Some(w),
            }
        }
        let old = self.shared.snapshot.load_full();
        let snapshot = Snapshot::build(Arc::new(self.effective(&file)), Some(&old));
        self.shared.snapshot.store(Arc::new(snapshot));
        tracing::info!(pool, backend, "admin: {action:?}");
        Ok(())
    }

    /// Stops accepting, lets requests in flight finish within the grace period, returns.
    pub async fn shutdown(&self) {
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

/// What a reload changes, one line per listener, pool or backend, in words.
pub fn diff(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for l in &new.listeners {
        match old.listeners.iter().find(|o| o.name == l.name) {
            None => out.push(format!("listener \"{}\" added on {}", l.name, l.bind)),
            Some(o) if o.bind != l.bind => {
                out.push(format!("listener \"{}\" moved from {} to {}", l.name, o.bind, l.bind))
            }
            Some(o) if o != l => out.push(format!("listener \"{}\": routes or trusted proxies changed", l.name)),
            Some(_) => {}
        }
    }
    for o in &old.listeners {
        if !new.listeners.iter().any(|l| l.name == o.name) {
            out.push(format!("listener \"{}\" removed", o.name));
        }
    }
    for p in &new.pools {
        let Some(o) = old.pools.iter().find(|o| o.name == p.name) else {
            out.push(format!("pool \"{}\" added with {} backends", p.name, p.backends.len()));
            continue;
        };
        for b in &p.backends {
            match o.backends.iter().find(|ob| ob.name == b.name) {
                None => out.push(format!("pool \"{}\": backend \"{}\" added ({})", p.name, b.name, b.address)),
                Some(ob) if ob != b => {
                    let mut what = Vec::new();
                    if ob.address != b.address {
                        what.push(format!("address {} -> {}", ob.address, b.address));
                    }
                    if ob.weight != b.weight {
                        what.push(format!("weight {} -> {}", ob.weight, b.weight));
                    }
                    if ob.state != b.state {
                        what.push(format!("state {} -> {}", ob.state.as_str(), b.state.as_str()));
                    }
                    if ob.max_connections != b.max_connections {
                        what.push(format!("max_connections {:?} -> {:?}", ob.max_connections, b.max_connections));
                    }
                    out.push(format!("pool \"{}\": backend \"{}\": {}", p.name, b.name, what.join(", ")));
                }
                Some(_) => {}
            }
        }
        for ob in &o.backends {
            if !p.backends.iter().any(|b| b.name == ob.name) {
                out.push(format!("pool \"{}\": backend \"{}\" removed", p.name, ob.name));
            }
        }
        let settings = |x: &config::Pool| {
            (
                x.algorithm,
                x.affinity.clone(),
                x.health.clone(),
                x.retries,
                x.slow_start,
                x.panic_mode,
                x.queue_timeout,
                x.max_queue,
            )
        };
        if settings(o) != settings(p) || o.retry_budget != p.retry_budget {
            out.push(format!("pool \"{}\": settings changed", p.name));
        }
    }
    for o in &old.pools {
        if !new.pools.iter().any(|p| p.name == o.name) {
            out.push(format!("pool \"{}\" removed", o.name));
        }
    }
    if old.timeouts != new.timeouts {
        out.push("timeouts changed (new connections use them)".into());
    }
    if old.threads != new.threads || old.access_log != new.access_log {
        out.push("runtime.threads and access_log changes take effect at the next restart".into());
    }
    out
}

/// Once a second, off the request path: drop expired affinity entries, recount the
/// sessions pinned to each backend, and report the progress of drains.
async fn sweep_sessions(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut reported: std::collections::HashMap<(Arc<str>, String), u32> = std::collections::HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tick = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        let snapshot = shared.snapshot.load_full();
        let elapsed = last_tick.elapsed().as_secs_f64().max(0.001);
        last_tick = std::time::Instant::now();
        for pool in &snapshot.pools {
            pool.retry_budget.refill();
            for b in &pool.backends {
                let now = b.requests.load(std::sync::atomic::Ordering::Relaxed);
                let before = b.metrics.last_requests.swap(now, std::sync::atomic::Ordering::Relaxed);
                let rate = (now.saturating_sub(before) as f64 / elapsed * 1000.0) as u64;
                b.metrics.rate_milli.store(rate, std::sync::atomic::Ordering::Relaxed);
            }
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

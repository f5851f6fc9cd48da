//! Changing a running Tether: reloads (the file re-read, applied as a diff), the admin
//! API's backend actions (kept as overrides over the file's config), opening and closing
//! listeners by name, and graceful shutdown. Every change ends in a new snapshot swapped
//! in whole.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::sync::watch;

use crate::backend::Backend;
use crate::config::{self, AdminState, Config, ConfigError};
use crate::listener;
use crate::pool::Snapshot;
use crate::proxy::conn::Protocols;
use crate::state::Shared;

/// Why a reload did not happen; the running config stays in force.
#[derive(Debug)]
pub enum ReloadError {
    /// The config was not read from a file (the demo), so there is nothing to re-read.
    NotFromFile,
    /// The file has errors, each located.
    Invalid(ConfigError),
    /// A listener of the new config could not be bound.
    Listener(String),
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReloadError::NotFromFile => f.write_str("this config was not read from a file"),
            ReloadError::Invalid(e) => write!(f, "{e}"),
            ReloadError::Listener(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for ReloadError {}

/// Why an admin action could not be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionError {
    NoPool(String),
    NoBackend { pool: String, backend: String },
}

impl fmt::Display for ActionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActionError::NoPool(p) => write!(f, "no pool \"{p}\""),
            ActionError::NoBackend { pool, backend } => write!(f, "pool \"{pool}\" has no backend \"{backend}\""),
        }
    }
}

impl std::error::Error for ActionError {}

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

impl Control {
    /// A control for a Tether that starts with `config`, read from `source` (reloads
    /// re-read it). Opens no listener yet.
    pub fn new(shared: Arc<Shared>, config: Arc<Config>, source: Option<PathBuf>) -> Control {
        let (shutdown, _) = watch::channel(false);
        Control {
            shared,
            source,
            shutdown,
            protocols: Arc::new(Protocols::new()),
            listeners: Default::default(),
            file_config: Mutex::new(config),
            overrides: Default::default(),
            changing: Mutex::new(()),
        }
    }

    /// A receiver that sees shutdown; holding it keeps shutdown waiting for its holder.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Binds listener `l` and starts accepting on it; returns the address it got.
    pub(crate) fn open_listener(&self, l: &config::Listener) -> anyhow::Result<SocketAddr> {
        let listener =
            listener::bind(l.bind).with_context(|| format!("listener \"{}\": cannot bind {}", l.name, l.bind))?;
        let address = listener.local_addr()?;
        tracing::info!(listener = %l.name, "listening on {address}");
        let (stop, stopped) = watch::channel(false);
        let name: Arc<str> = Arc::from(l.name.as_str());
        tokio::spawn(listener::accept_loop(
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
    pub fn reload(&self) -> Result<Vec<String>, ReloadError> {
        let _one_at_a_time = lock(&self.changing);
        let Some(path) = &self.source else {
            tracing::warn!("reload asked, but this config was not read from a file");
            return Err(ReloadError::NotFromFile);
        };
        let config = match config::load(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("reload rejected, the running config stays in force:\n{e}");
                return Err(ReloadError::Invalid(e));
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
                    return Err(ReloadError::Listener(format!("{e:#}")));
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
    /// changes that backend. Returns the backend as the new snapshot has it.
    pub fn backend_action(
        &self,
        pool: &str,
        backend: &str,
        action: BackendAction,
    ) -> Result<Arc<Backend>, ActionError> {
        let _one_at_a_time = lock(&self.changing);
        let file = lock(&self.file_config).clone();
        let p = file.pools.iter().find(|p| p.name == pool).ok_or_else(|| ActionError::NoPool(pool.to_string()))?;
        let b = p
            .backends
            .iter()
            .find(|b| b.name == backend)
            .ok_or_else(|| ActionError::NoBackend { pool: pool.to_string(), backend: backend.to_string() })?;
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
        let changed = snapshot.backend(pool, backend).expect("the file config has this backend").clone();
        self.shared.snapshot.store(Arc::new(snapshot));
        tracing::info!(pool, backend, "admin: {action:?}");
        Ok(changed)
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
        match old.pools.iter().find(|o| o.name == p.name) {
            None => out.push(format!("pool \"{}\" added with {} backends", p.name, p.backends.len())),
            Some(o) => diff_pool(o, p, &mut out),
        }
    }
    for o in &old.pools {
        if !new.pools.iter().any(|p| p.name == o.name) {
            out.push(format!("pool \"{}\" removed", o.name));
        }
    }
    if old.limits != new.limits {
        out.push("limits changed (new connections use them)".into());
    }
    if old.timeouts != new.timeouts {
        out.push("timeouts changed (new connections use them)".into());
    }
    if old.threads != new.threads || old.access_log != new.access_log {
        out.push("runtime.threads and access_log changes take effect at the next restart".into());
    }
    out
}

/// What changed in one pool kept by a reload.
fn diff_pool(o: &config::Pool, p: &config::Pool, out: &mut Vec<String>) {
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
    // Everything but the backends and the name.
    let settings = |x: &config::Pool| config::Pool { name: String::new(), backends: Vec::new(), ..x.clone() };
    if settings(o) != settings(p) {
        out.push(format!("pool \"{}\": settings changed", p.name));
    }
}

//! Changing a running Tether: reloads (the file re-read, applied as a diff), the admin
//! API's backend actions (kept as overrides over the file's config), opening and closing
//! listeners by name, and graceful shutdown. Every change ends in a new snapshot swapped
//! in whole.
//!
//! A traffic listener is one socket per worker runtime, each accepted on its own worker
//! (see `listener::bind_for_workers`); its name and address decide whether a reload keeps
//! all of them (and so their accept queues) or binds a new set. Control itself runs on the
//! control plane's runtime, as does the admin listener, a single socket.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwapOption;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
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

/// Sockets a reload has bound but not yet serves: each new or moved listener's, one per
/// worker.
struct Bound<'c> {
    listeners: Vec<(&'c config::Listener, Vec<(TcpListener, usize)>)>,
    admin: Option<(SocketAddr, TcpListener)>,
}

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
    /// The worker runtimes traffic is served on, by worker index: a listener has a socket
    /// on each.
    workers: Vec<Handle>,
    /// Open listeners by name.
    listeners: Mutex<HashMap<String, Open>>,
    /// The config as the file says it; the snapshot's config is this plus `overrides`.
    file_config: Mutex<Arc<Config>>,
    /// Admin API changes by (pool, backend), kept across reloads until the file changes
    /// that backend.
    overrides: Mutex<HashMap<(String, String), Override>>,
    /// Admin API changes to split weights by (split, pool), kept across reloads until the
    /// file changes that pool's weight in that split.
    split_overrides: Mutex<HashMap<(String, String), SplitOverride>>,
    /// The backends the pools' DNS sources name now, vanished ones (draining) included;
    /// snapshots are built from the file's config plus these plus `overrides`.
    dns: Mutex<crate::dns::Members>,
    /// Bumped by every reload, so that `discovery` re-resolves with the new sources.
    dns_reloads: watch::Sender<u64>,
    /// Serialises reloads and admin actions.
    changing: Mutex<()>,
    /// Held while this instance's admin actions and the fleet's are brought together
    /// (`fleet`): an action and its share are one step, and a read of the fleet's state
    /// never lands between them.
    pub fleet_step: tokio::sync::Mutex<()>,
    /// Admin actions not yet shared with the fleet (Redis was down), by pool and backend.
    pub fleet_pending: Mutex<Vec<(String, String)>>,
    /// The admin listener's settings as the file says them now. The admin API reads them
    /// for every request, so a token changed by a reload applies at once.
    admin: ArcSwapOption<config::Admin>,
    /// The open admin listener.
    admin_listener: Mutex<Option<Open>>,
    /// Starts serving the admin API on a bound socket until the switch says stop (set by
    /// the server, which knows the admin module; control sits below it).
    admin_server: Mutex<Option<AdminServer>>,
}

/// An open listener: its configured address, the switch that stops it (the accept loops of
/// all its sockets), and a duplicate of each socket's descriptor, which a binary upgrade
/// hands the new process (`upgrade`). The duplicates go when the listener is stopped, so
/// that a closed listener's socket is really closed.
struct Open {
    bind: SocketAddr,
    stop: watch::Sender<bool>,
    fds: Vec<OwnedFd>,
}

/// A listening socket handed to a new process by a binary upgrade: its listener's name
/// (`None` for the admin listener), configured address, and a duplicate of its descriptor.
pub struct HandedSocket {
    pub listener: Option<String>,
    pub bind: SocketAddr,
    pub fd: OwnedFd,
}

/// Serves the admin API on a bound listener until the receiver sees `true`.
pub type AdminServer = Box<dyn Fn(TcpListener, watch::Receiver<bool>) + Send + Sync>;

/// An admin API change to one backend, with the file's values it was made over.
#[derive(Debug, Clone)]
struct Override {
    state: Option<AdminState>,
    weight: Option<u32>,
    file_state: AdminState,
    file_weight: u32,
}

/// An admin API weight for one pool of a split, with the file's weight it was set over.
#[derive(Debug, Clone, Copy)]
struct SplitOverride {
    weight: u32,
    file_weight: u32,
}

/// Why split weights could not be set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitError {
    NoSplit(String),
    NotInSplit {
        split: String,
        pool: String,
    },
    /// Every weight of the split would be 0: new sessions would have no pool.
    AllZero(String),
    /// Above [`config::MAX_SPLIT_WEIGHT`].
    TooHeavy {
        pool: String,
        weight: u32,
    },
}

impl fmt::Display for SplitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SplitError::NoSplit(s) => write!(f, "no split \"{s}\""),
            SplitError::NotInSplit { split, pool } => write!(f, "split \"{split}\" has no pool \"{pool}\""),
            SplitError::AllZero(s) => {
                write!(f, "split \"{s}\": every weight would be 0, so a new session would have no pool to go to")
            }
            SplitError::TooHeavy { pool, weight } => {
                write!(
                    f,
                    "pool \"{pool}\": weight {weight} is out of range: expected 0 to {}",
                    config::MAX_SPLIT_WEIGHT
                )
            }
        }
    }
}

impl std::error::Error for SplitError {}

/// An admin override as a warm restart saves it (`warm`): the backend by pool and name,
/// what the admin API set, and the file's values it was set over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedOverride {
    pub pool: String,
    pub backend: String,
    pub state: Option<AdminState>,
    pub weight: Option<u32>,
    pub file_state: AdminState,
    pub file_weight: u32,
}

/// An admin API split weight as a warm restart saves it (`warm`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedSplitOverride {
    pub split: String,
    pub pool: String,
    pub weight: u32,
    pub file_weight: u32,
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
    /// re-read it), serving traffic on `workers` (at least one). Opens no listener yet.
    /// Whether every worker runtime runs a task it is given within `within`: what the
    /// systemd watchdog is told (a worker stuck in a loop or a blocking call serves nothing,
    /// however well the control plane does).
    pub async fn workers_answer(&self, within: Duration) -> bool {
        let answers = self.workers.iter().map(|w| w.spawn(async {}));
        let all = async {
            for a in answers {
                if a.await.is_err() {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(within, all).await.unwrap_or(false)
    }

    pub fn new(shared: Arc<Shared>, config: Arc<Config>, source: Option<PathBuf>, workers: Vec<Handle>) -> Control {
        assert!(!workers.is_empty(), "a Tether needs at least one worker runtime");
        let (shutdown, _) = watch::channel(false);
        let admin = ArcSwapOption::new(config.admin.clone().map(Arc::new));
        Control {
            shared,
            source,
            shutdown,
            protocols: Arc::new(Protocols::with_limits(&config.limits)),
            workers,
            listeners: Default::default(),
            file_config: Mutex::new(config),
            overrides: Default::default(),
            split_overrides: Default::default(),
            dns: Default::default(),
            dns_reloads: watch::channel(0).0,
            changing: Mutex::new(()),
            fleet_step: tokio::sync::Mutex::new(()),
            fleet_pending: Mutex::new(Vec::new()),
            admin,
            admin_listener: Mutex::new(None),
            admin_server: Mutex::new(None),
        }
    }

    /// The admin listener's settings in force now (`None`: the config has no `[admin]`).
    pub fn admin_config(&self) -> Option<Arc<config::Admin>> {
        self.admin.load_full()
    }

    /// Opens the admin listener the config asks for, served by `server` (also on every
    /// later reload that moves it). Returns the address it got.
    /// `handed` is the admin socket a binary upgrade handed over, with the address it was
    /// configured with: used instead of binding when the config still says that address,
    /// else closed.
    pub fn start_admin(
        &self,
        server: AdminServer,
        handed: Option<(SocketAddr, std::net::TcpListener)>,
    ) -> anyhow::Result<Option<SocketAddr>> {
        let _one_at_a_time = lock(&self.changing);
        *lock(&self.admin_server) = Some(server);
        let Some(cfg) = self.admin_config() else { return Ok(None) };
        let listener = match handed {
            Some((bind, socket)) if bind == cfg.bind => {
                socket.set_nonblocking(true)?;
                TcpListener::from_std(socket)?
            }
            _ => bind_admin(cfg.bind)?,
        };
        Ok(Some(self.serve_admin(cfg.bind, listener)?))
    }

    /// Hands a bound admin socket to the admin server; stops the previous one, if any.
    fn serve_admin(&self, bind: SocketAddr, listener: TcpListener) -> anyhow::Result<SocketAddr> {
        let address = listener.local_addr()?;
        let fds = listener.as_fd().try_clone_to_owned().into_iter().collect();
        let (stop, stopped) = watch::channel(false);
        if let Some(serve) = lock(&self.admin_server).as_ref() {
            serve(listener, stopped);
        }
        tracing::info!(listener = "admin", "admin listening on {address} (dashboard, API, metrics)");
        if let Some(old) = lock(&self.admin_listener).replace(Open { bind, stop, fds }) {
            let _ = old.stop.send(true);
        }
        Ok(address)
    }

    /// A receiver that sees shutdown; holding it keeps shutdown waiting for its holder.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Binds listener `l` and starts accepting on it; returns the address it got.
    /// `handed`: the sockets a binary upgrade handed over for a listener of this name and
    /// configured address, used as they are (the same sockets, so their accept queues are
    /// shared with the old process) instead of binding new ones.
    pub(crate) fn open_listener(
        &self,
        l: &config::Listener,
        handed: Option<Vec<std::net::TcpListener>>,
    ) -> anyhow::Result<SocketAddr> {
        let sockets = match handed {
            Some(handed) if !handed.is_empty() => self.adopt(handed)?,
            _ => self.bind_listener(l)?,
        };
        self.serve_listener(l, sockets)
    }

    /// Registers handed-over sockets with the worker runtimes, the i-th with worker i
    /// (round the workers again when there are more sockets than workers: every socket is
    /// accepted on, none is closed with connections in its queue).
    fn adopt(&self, handed: Vec<std::net::TcpListener>) -> anyhow::Result<Vec<(TcpListener, usize)>> {
        let mut sockets = Vec::with_capacity(handed.len());
        for (i, socket) in handed.into_iter().enumerate() {
            let worker = i % self.workers.len();
            let _runtime = self.workers[worker].enter();
            socket.set_nonblocking(true)?;
            sockets.push((TcpListener::from_std(socket)?, worker));
        }
        Ok(sockets)
    }

    /// Every open listening socket (traffic listeners' and the admin listener's), for a
    /// binary upgrade to hand over. A socket whose descriptor cannot be duplicated is left
    /// out (the new process binds that listener anew).
    pub fn handover_sockets(&self) -> Vec<HandedSocket> {
        let mut out = Vec::new();
        for (name, open) in lock(&self.listeners).iter() {
            for fd in &open.fds {
                if let Ok(fd) = fd.try_clone() {
                    out.push(HandedSocket { listener: Some(name.clone()), bind: open.bind, fd });
                }
            }
        }
        if let Some(open) = lock(&self.admin_listener).as_ref() {
            for fd in &open.fds {
                if let Ok(fd) = fd.try_clone() {
                    out.push(HandedSocket { listener: None, bind: open.bind, fd });
                }
            }
        }
        out
    }

    /// Starts accepting on `sockets`, bound for `l` (one per worker, in worker order), under
    /// `l`'s name, each on its own worker; a listener of the same name that was open is
    /// stopped.
    fn serve_listener(&self, l: &config::Listener, sockets: Vec<(TcpListener, usize)>) -> anyhow::Result<SocketAddr> {
        let address = sockets.first().context("no socket bound")?.0.local_addr()?;
        if sockets.len() > 1 {
            tracing::info!(listener = %l.name, "listening on {address} (a socket on each of {} workers)", sockets.len());
        } else {
            tracing::info!(listener = %l.name, "listening on {address}");
        }
        let (stop, stopped) = watch::channel(false);
        let name: Arc<str> = Arc::from(l.name.as_str());
        let mut fds = Vec::with_capacity(sockets.len());
        for (socket, worker) in sockets {
            if let Ok(fd) = socket.as_fd().try_clone_to_owned() {
                fds.push(fd);
            }
            self.workers[worker].spawn(listener::accept_loop(
                socket,
                name.clone(),
                self.shared.clone(),
                self.protocols.clone(),
                self.shutdown.subscribe(),
                stopped.clone(),
            ));
        }
        if let Some(old) = lock(&self.listeners).insert(l.name.clone(), Open { bind: l.bind, stop, fds }) {
            let _ = old.stop.send(true);
        }
        Ok(address)
    }

    /// The file's config with the backends its pools' DNS sources name now added to
    /// each pool (after the file's own).
    fn sourced(&self, file: &Config) -> Config {
        let dns = lock(&self.dns);
        let mut c = file.clone();
        for p in &mut c.pools {
            let found = dns.backends(p);
            p.backends.extend(found);
        }
        c
    }

    /// The file's config with the DNS sources' backends and the admin API's changes
    /// applied.
    fn effective(&self, file: &Config) -> Config {
        let mut c = self.sourced(file);
        let overrides = lock(&self.overrides);
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
        drop(overrides);
        apply_split_overrides(&mut c, &lock(&self.split_overrides));
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
        // Sockets first: every listener that is new or moves, and the admin listener if it
        // moves, is bound before anything is stopped. If one bind fails, the sockets bound
        // so far are dropped unused and every running listener keeps serving.
        let bound = self.bind_new(&config)?;
        // Every bind succeeded: from here on nothing fails.
        self.switch_listeners(&config, bound);
        let changes = self.apply(config);
        for c in &changes {
            tracing::info!("reload: {c}");
        }
        tracing::info!(path = %path.display(), changes = changes.len(), "config reloaded");
        Ok(changes)
    }

    /// Binds the sockets `config` needs that are not open yet.
    fn bind_new<'c>(&self, config: &'c Config) -> Result<Bound<'c>, ReloadError> {
        let open: HashMap<String, SocketAddr> =
            lock(&self.listeners).iter().map(|(name, o)| (name.clone(), o.bind)).collect();
        let mut listeners = Vec::new();
        for l in &config.listeners {
            if open.get(&l.name) == Some(&l.bind) {
                continue;
            }
            listeners.push((l, self.bind_listener(l).map_err(reject)?));
        }
        let admin_open = lock(&self.admin_listener).as_ref().map(|o| o.bind);
        let has_admin_server = lock(&self.admin_server).is_some();
        let admin = match config.admin.as_ref().map(|a| a.bind) {
            Some(bind) if has_admin_server && admin_open != Some(bind) => {
                Some((bind, bind_admin(bind).map_err(reject)?))
            }
            _ => None,
        };
        Ok(Bound { listeners, admin })
    }

    /// Serves the new sockets (each stops the listener it replaces) and stops the
    /// listeners `config` no longer has.
    fn switch_listeners(&self, config: &Config, bound: Bound<'_>) {
        for (l, sockets) in bound.listeners {
            if let Err(e) = self.serve_listener(l, sockets) {
                tracing::warn!(listener = %l.name, "{e:#}");
            }
        }
        lock(&self.listeners).retain(|name, open| {
            let keep = config.listeners.iter().any(|l| &l.name == name);
            if !keep {
                let _ = open.stop.send(true);
            }
            keep
        });
        self.admin.store(config.admin.clone().map(Arc::new));
        if let Some((bind, socket)) = bound.admin {
            if let Err(e) = self.serve_admin(bind, socket) {
                tracing::warn!(listener = "admin", "{e:#}");
            }
        } else if config.admin.is_none() {
            if let Some(open) = lock(&self.admin_listener).take() {
                let _ = open.stop.send(true);
            }
        }
    }

    /// Makes `config` the file's config: keeps the admin overrides it does not change,
    /// swaps in a snapshot built from it, and returns what changed.
    fn apply(&self, config: Config) -> Vec<String> {
        // DNS sources the file no longer has take their backends with them.
        lock(&self.dns).retain_sources(&config);
        self.shared.dns.retain_sources(&config);
        self.retain_overrides(&config);
        let file_old = lock(&self.file_config).clone();
        let changes = diff(&file_old, &config);
        let config = Arc::new(config);
        *lock(&self.file_config) = config.clone();
        let old = self.shared.snapshot.load_full();
        let snapshot = Snapshot::build(Arc::new(self.effective(&config)), Some(&old));
        self.shared.snapshot.store(Arc::new(snapshot));
        // Every reload re-resolves the DNS sources at once.
        self.dns_reloads.send_modify(|n| *n += 1);
        changes
    }

    /// Keeps the admin overrides whose backend `file` (with the DNS sources' backends)
    /// still has with the state and weight they were made over: an admin change lasts
    /// until the file (or DNS) changes that backend.
    fn retain_overrides(&self, file: &Config) {
        let sourced = self.sourced(file);
        lock(&self.overrides).retain(|(pool, backend), o| {
            let now = sourced
                .pools
                .iter()
                .find(|p| &p.name == pool)
                .and_then(|p| p.backends.iter().find(|b| &b.name == backend));
            now.is_some_and(|b| b.state == o.file_state && b.weight == o.file_weight)
        });
        retain_split_overrides(file, &mut lock(&self.split_overrides));
    }

    /// The config as the file says it (without DNS backends or admin changes).
    pub fn file_config(&self) -> Arc<Config> {
        lock(&self.file_config).clone()
    }

    /// Sees every reload (the value counts them).
    pub fn dns_reloads(&self) -> watch::Receiver<u64> {
        self.dns_reloads.subscribe()
    }

    /// Applies a successful lookup of `source` of `pool`: new addresses join (under slow
    /// start when `slow_start`, as a backend that just came up), vanished ones drain,
    /// returning ones are enabled again; the snapshot is rebuilt if anything changed, as a
    /// reload would (sessions, stick tables, counters and health of the backends kept).
    /// Returns the change and how many backends the source gives now; `None` when a
    /// reload removed or changed the source while it was being looked up (nothing changes).
    pub fn dns_update(
        &self,
        pool: &str,
        source: &config::DnsSource,
        found: &[(SocketAddr, u32)],
        slow_start: bool,
    ) -> Option<(crate::dns::Change, usize)> {
        let _one_at_a_time = lock(&self.changing);
        let file = lock(&self.file_config).clone();
        if !has_source(&file, pool, source) {
            return None;
        }
        let (change, count) = {
            let mut dns = lock(&self.dns);
            let change = dns.update(pool, source, found, crate::time::unix_millis());
            (change, dns.count(pool, source))
        };
        if !change.is_empty() {
            self.retain_overrides(&file);
            let joined = if slow_start { change.added.as_slice() } else { &[] };
            self.rebuild(&file, pool, joined);
        }
        Some((change, count))
    }

    /// Whether the file's config has `source` in `pool` (exactly: a reload that changed
    /// its interval or weight made it another).
    pub fn dns_has_source(&self, pool: &str, source: &config::DnsSource) -> bool {
        has_source(&lock(&self.file_config), pool, source)
    }

    /// Removes vanished DNS backends of `pool` for good (their drain is over).
    pub fn dns_remove(&self, pool: &str, names: &[String]) {
        let _one_at_a_time = lock(&self.changing);
        let file = lock(&self.file_config).clone();
        let removed = {
            let mut dns = lock(&self.dns);
            names.iter().filter(|n| dns.remove(pool, n)).count()
        };
        if removed > 0 {
            self.retain_overrides(&file);
            self.rebuild(&file, pool, &[]);
        }
    }

    /// How many backends `source` of `pool` gives now, vanished ones included.
    pub fn dns_count(&self, pool: &str, source: &config::DnsSource) -> usize {
        lock(&self.dns).count(pool, source)
    }

    /// Every vanished DNS backend: (pool, name, Unix ms it left the answer).
    pub fn dns_vanished(&self) -> Vec<(String, String, u64)> {
        lock(&self.dns).vanished()
    }

    /// Builds and swaps in a snapshot of `file` with the current DNS backends and
    /// overrides; the backends of `pool` named in `joined` start their slow start now.
    fn rebuild(&self, file: &Config, pool: &str, joined: &[String]) {
        let old = self.shared.snapshot.load_full();
        let snapshot = Snapshot::build(Arc::new(self.effective(file)), Some(&old));
        let now = crate::time::unix_millis();
        for name in joined {
            if let Some(b) = snapshot.backend(pool, name) {
                b.health.joined_at(now);
            }
        }
        self.shared.snapshot.store(Arc::new(snapshot));
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
        let sourced = self.sourced(&file);
        let p = sourced.pools.iter().find(|p| p.name == pool).ok_or_else(|| ActionError::NoPool(pool.to_string()))?;
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
        // The snapshot is built from the file that has this backend, so it is there.
        let Some(changed) = snapshot.backend(pool, backend).cloned() else {
            return Err(ActionError::NoBackend { pool: pool.to_string(), backend: backend.to_string() });
        };
        self.shared.snapshot.store(Arc::new(snapshot));
        tracing::info!(pool, backend, "admin: {action:?}");
        Ok(changed)
    }

    /// Sets weights of a split's pools at once (each `(pool, weight)`); they outlive
    /// reloads until the file changes that pool's weight in the split. Returns the
    /// split's weights now, by pool.
    pub fn split_weights(&self, split: &str, weights: &[(String, u32)]) -> Result<Vec<(String, u32)>, SplitError> {
        let _one_at_a_time = lock(&self.changing);
        let file = lock(&self.file_config).clone();
        let (_, s) = file.splits().find(|(_, s)| s.name == split).ok_or_else(|| SplitError::NoSplit(split.into()))?;
        let pool_name = |m: &config::SplitMember| file.pools.get(m.pool).map_or("", |p| p.name.as_str());
        for (pool, weight) in weights {
            if !s.members.iter().any(|m| pool_name(m) == pool) {
                return Err(SplitError::NotInSplit { split: split.into(), pool: pool.clone() });
            }
            if *weight > config::MAX_SPLIT_WEIGHT {
                return Err(SplitError::TooHeavy { pool: pool.clone(), weight: *weight });
            }
        }
        {
            let mut overrides = lock(&self.split_overrides);
            let mut after = overrides.clone();
            for (pool, weight) in weights {
                let file_weight = s.members.iter().find(|m| pool_name(m) == pool).map_or(0, |m| m.weight);
                after.insert((split.to_string(), pool.clone()), SplitOverride { weight: *weight, file_weight });
            }
            let total: u32 = s
                .members
                .iter()
                .map(|m| after.get(&(split.to_string(), pool_name(m).to_string())).map_or(m.weight, |o| o.weight))
                .sum();
            if total == 0 {
                return Err(SplitError::AllZero(split.into()));
            }
            *overrides = after;
        }
        let effective = self.effective(&file);
        let now = split_weights_of(&effective, split);
        let old = self.shared.snapshot.load_full();
        self.shared.snapshot.store(Arc::new(Snapshot::build(Arc::new(effective), Some(&old))));
        tracing::info!(split, "admin: split weights {now:?}");
        Ok(now)
    }

    /// Drops the admin API's weights of a split: the file's apply again. Returns the
    /// split's weights now, by pool.
    pub fn split_reset(&self, split: &str) -> Result<Vec<(String, u32)>, SplitError> {
        let _one_at_a_time = lock(&self.changing);
        let file = lock(&self.file_config).clone();
        if !file.splits().any(|(_, s)| s.name == split) {
            return Err(SplitError::NoSplit(split.into()));
        }
        lock(&self.split_overrides).retain(|(s, _), _| s != split);
        let effective = self.effective(&file);
        let now = split_weights_of(&effective, split);
        let old = self.shared.snapshot.load_full();
        self.shared.snapshot.store(Arc::new(Snapshot::build(Arc::new(effective), Some(&old))));
        tracing::info!(split, "admin: split weights back to the file's {now:?}");
        Ok(now)
    }

    /// The admin API's split weights in force, for a warm restart to save.
    pub fn saved_split_overrides(&self) -> Vec<SavedSplitOverride> {
        let mut out: Vec<SavedSplitOverride> = lock(&self.split_overrides)
            .iter()
            .map(|((split, pool), o)| SavedSplitOverride {
                split: split.clone(),
                pool: pool.clone(),
                weight: o.weight,
                file_weight: o.file_weight,
            })
            .collect();
        out.sort_by(|a, b| (&a.split, &a.pool).cmp(&(&b.split, &b.pool)));
        out
    }

    /// Re-applies split weights a warm restart saved, by the rule reloads keep them by
    /// (the file still has the pool in the split at the weight they were set over, and
    /// they leave some weight above 0). Returns how many apply; the snapshot is rebuilt
    /// once if any does.
    pub fn restore_split_overrides(&self, saved: Vec<SavedSplitOverride>) -> usize {
        if saved.is_empty() {
            return 0;
        }
        let _one_at_a_time = lock(&self.changing);
        let file = lock(&self.file_config).clone();
        let applied = {
            let mut overrides = lock(&self.split_overrides);
            for s in saved {
                overrides.insert((s.split, s.pool), SplitOverride { weight: s.weight, file_weight: s.file_weight });
            }
            retain_split_overrides(&file, &mut overrides);
            overrides.len()
        };
        if applied > 0 {
            let old = self.shared.snapshot.load_full();
            let snapshot = Snapshot::build(Arc::new(self.effective(&file)), Some(&old));
            self.shared.snapshot.store(Arc::new(snapshot));
        }
        applied
    }

    /// The admin overrides in force, for a warm restart to save.
    pub fn saved_overrides(&self) -> Vec<SavedOverride> {
        let mut out: Vec<SavedOverride> = lock(&self.overrides)
            .iter()
            .map(|((pool, backend), o)| SavedOverride {
                pool: pool.clone(),
                backend: backend.clone(),
                state: o.state,
                weight: o.weight,
                file_state: o.file_state,
                file_weight: o.file_weight,
            })
            .collect();
        out.sort_by(|a, b| (&a.pool, &a.backend).cmp(&(&b.pool, &b.backend)));
        out
    }

    /// The admin override on one backend, if any.
    pub fn override_of(&self, pool: &str, backend: &str) -> Option<SavedOverride> {
        self.saved_overrides().into_iter().find(|o| o.pool == pool && o.backend == backend)
    }

    /// Applies the fleet's overrides (each with the Unix milliseconds its drain began) by
    /// the rule reloads keep them by, those that differ from this instance's only; a drain
    /// keeps the start the instance that made it gave it, so its timeout ends at the same
    /// moment everywhere. Returns those applied; the snapshot is rebuilt once if any was.
    pub fn apply_shared_overrides(&self, shared: Vec<(SavedOverride, Option<u64>)>) -> Vec<SavedOverride> {
        let current = self.saved_overrides();
        let changed: Vec<(SavedOverride, Option<u64>)> = shared
            .into_iter()
            .filter(|(s, _)| {
                let here = current.iter().find(|c| c.pool == s.pool && c.backend == s.backend);
                here.is_none_or(|c| c.state != s.state || c.weight != s.weight)
            })
            .collect();
        self.restore_overrides(changed)
    }

    /// Re-applies overrides a warm restart saved, by the rule reloads keep them by: only to
    /// a backend the file still has, with the state and weight the override was made over
    /// (a file that changed them since wins). Each comes with the Unix milliseconds its drain
    /// began, if it drains: the drain keeps that start, so its `drain_timeout` runs from
    /// then. Returns those applied; the snapshot is rebuilt once if any was.
    pub fn restore_overrides(&self, saved: Vec<(SavedOverride, Option<u64>)>) -> Vec<SavedOverride> {
        let _one_at_a_time = lock(&self.changing);
        let file = lock(&self.file_config).clone();
        let sourced = self.sourced(&file);
        let mut applied = Vec::new();
        let mut since = Vec::new();
        {
            let mut overrides = lock(&self.overrides);
            for (s, drain_ms) in saved {
                let still = sourced
                    .pools
                    .iter()
                    .find(|p| p.name == s.pool)
                    .and_then(|p| p.backends.iter().find(|b| b.name == s.backend))
                    .is_some_and(|b| b.state == s.file_state && b.weight == s.file_weight);
                if !still || (s.state.is_none() && s.weight.is_none()) {
                    continue;
                }
                let o =
                    Override { state: s.state, weight: s.weight, file_state: s.file_state, file_weight: s.file_weight };
                overrides.insert((s.pool.clone(), s.backend.clone()), o);
                since.push(drain_ms);
                applied.push(s);
            }
        }
        if !applied.is_empty() {
            let old = self.shared.snapshot.load_full();
            let snapshot = Snapshot::build(Arc::new(self.effective(&file)), Some(&old));
            for (o, ms) in applied.iter().zip(since) {
                if let (Some(ms), Some(b)) = (ms, snapshot.backend(&o.pool, &o.backend)) {
                    b.restamp_drain(ms);
                }
            }
            self.shared.snapshot.store(Arc::new(snapshot));
        }
        applied
    }

    /// Binds the sockets of traffic listener `l`, one per worker.
    fn bind_listener(&self, l: &config::Listener) -> anyhow::Result<Vec<(TcpListener, usize)>> {
        let sockets = listener::bind_for_workers(l.bind, &self.workers)
            .with_context(|| format!("listener \"{}\": cannot bind {}", l.name, l.bind))?;
        Ok(sockets.into_iter().enumerate().map(|(worker, s)| (s, worker)).collect())
    }

    /// Stops accepting, lets requests in flight finish within the grace period, returns.
    pub async fn shutdown(&self) {
        let grace = self.shared.snapshot.load().config.shutdown_grace;
        let _ = self.shutdown.send(true);
        // The descriptors kept for an upgrade go too, so that each socket closes once its
        // accept loop ends: new connections are refused, not queued unanswered (after an
        // upgrade the new process holds the sockets open).
        for open in lock(&self.listeners).values_mut() {
            open.fds.clear();
        }
        if let Some(open) = lock(&self.admin_listener).as_mut() {
            open.fds.clear();
        }
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

fn has_source(config: &Config, pool: &str, source: &config::DnsSource) -> bool {
    config.pools.iter().any(|p| p.name == pool && p.dns.contains(source))
}

/// A reload that could not bind a socket: logged, and nothing changed.
fn reject(e: anyhow::Error) -> ReloadError {
    tracing::error!("reload rejected, the running config stays in force: {e:#}");
    ReloadError::Listener(format!("{e:#}"))
}

/// Binds the admin listener's socket.
fn bind_admin(bind: SocketAddr) -> anyhow::Result<TcpListener> {
    listener::bind(bind).with_context(|| format!("admin: cannot bind {bind}"))
}

/// Sets the weights the admin API gave splits' pools.
fn apply_split_overrides(c: &mut Config, overrides: &HashMap<(String, String), SplitOverride>) {
    if overrides.is_empty() {
        return;
    }
    let names: Vec<String> = c.pools.iter().map(|p| p.name.clone()).collect();
    for l in &mut c.listeners {
        for r in &mut l.routes {
            let config::RouteTo::Split(s) = &mut r.to else { continue };
            for m in &mut s.members {
                let pool = names.get(m.pool).cloned().unwrap_or_default();
                if let Some(o) = overrides.get(&(s.name.clone(), pool)) {
                    m.weight = o.weight;
                }
            }
        }
    }
}

/// Keeps the split weights the admin API set whose split still has the pool at the weight
/// they were set over; drops a split's when they would leave it with every weight 0 (the
/// file moved the other pools to 0), so the file's weights apply.
fn retain_split_overrides(file: &Config, overrides: &mut HashMap<(String, String), SplitOverride>) {
    let file_weight = |split: &str, pool: &str| {
        let (_, s) = file.splits().find(|(_, s)| s.name == split)?;
        s.members.iter().find(|m| file.pools.get(m.pool).is_some_and(|p| p.name == pool)).map(|m| m.weight)
    };
    overrides.retain(|(split, pool), o| file_weight(split, pool) == Some(o.file_weight));
    for (_, s) in file.splits() {
        let total: u32 = s
            .members
            .iter()
            .map(|m| {
                let pool = file.pools.get(m.pool).map_or("", |p| p.name.as_str());
                overrides.get(&(s.name.clone(), pool.to_string())).map_or(m.weight, |o| o.weight)
            })
            .sum();
        if total == 0 {
            tracing::warn!(split = %s.name, "the admin API's split weights would leave every weight at 0; the file's apply");
            overrides.retain(|(split, _), _| *split != s.name);
        }
    }
}

/// The weights of split `name` in `c`, by pool.
pub fn split_weights_of(c: &Config, name: &str) -> Vec<(String, u32)> {
    c.splits()
        .find(|(_, s)| s.name == name)
        .map(|(_, s)| s.members.iter().filter_map(|m| Some((c.pools.get(m.pool)?.name.clone(), m.weight))).collect())
        .unwrap_or_default()
}

/// What a reload changes, one line per listener, pool or backend, in words.
pub fn diff(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    diff_admin(old.admin.as_ref(), new.admin.as_ref(), &mut out);
    for l in &new.listeners {
        match old.listeners.iter().find(|o| o.name == l.name) {
            None => out.push(format!("listener \"{}\" added on {}", l.name, l.bind)),
            Some(o) if o.bind != l.bind => {
                out.push(format!("listener \"{}\" moved from {} to {}", l.name, o.bind, l.bind))
            }
            Some(o) if o.tls != l.tls => {
                if o.tls.as_ref().map(|t| &t.certificates) != l.tls.as_ref().map(|t| &t.certificates) {
                    let n = l.tls.as_ref().map_or(0, |t| t.certificates.len());
                    out.push(format!("listener \"{}\": TLS certificates changed ({n} loaded)", l.name));
                } else {
                    out.push(format!("listener \"{}\": TLS settings changed", l.name));
                }
                if o.routes != l.routes || o.trusted_proxies != l.trusted_proxies {
                    out.push(format!("listener \"{}\": routes or trusted proxies changed", l.name));
                }
            }
            Some(o) if *o != (config::Listener { proxy_protocol: o.proxy_protocol.clone(), ..l.clone() }) => {
                out.push(format!("listener \"{}\": routes or trusted proxies changed", l.name))
            }
            Some(_) => {}
        }
        // Read by each connection when it is accepted, so new connections follow it.
        if old.listeners.iter().any(|o| o.name == l.name && o.proxy_protocol != l.proxy_protocol) {
            let now = match &l.proxy_protocol {
                None => "off",
                Some(p) if p.required => "required",
                Some(_) => "optional",
            };
            out.push(format!("listener \"{}\": proxy_protocol changed (now {now}, for new connections)", l.name));
        }
    }
    for o in &old.listeners {
        if !new.listeners.iter().any(|l| l.name == o.name) {
            out.push(format!("listener \"{}\" removed", o.name));
        }
    }
    diff_splits(old, new, &mut out);
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

/// Splits added, removed, or whose pools or weights changed.
fn diff_splits(old: &Config, new: &Config, out: &mut Vec<String>) {
    let weights = |c: &Config, s: &config::Split| {
        let each: Vec<String> = s
            .members
            .iter()
            .map(|m| format!("{} {}", c.pools.get(m.pool).map_or("?", |p| p.name.as_str()), m.weight))
            .collect();
        each.join(", ")
    };
    for (listener, s) in new.splits() {
        match old.splits().find(|(_, o)| o.name == s.name) {
            None => out.push(format!("split \"{}\" added on listener \"{listener}\": {}", s.name, weights(new, s))),
            Some((_, o)) if weights(old, o) != weights(new, s) => {
                out.push(format!("split \"{}\": {} (was {})", s.name, weights(new, s), weights(old, o)))
            }
            Some(_) => {}
        }
    }
    for (_, o) in old.splits() {
        if !new.splits().any(|(_, s)| s.name == o.name) {
            out.push(format!("split \"{}\" removed", o.name));
        }
    }
}

/// What changed in the admin listener. The token itself is never written out.
fn diff_admin(old: Option<&config::Admin>, new: Option<&config::Admin>, out: &mut Vec<String>) {
    match (old, new) {
        (None, None) => {}
        (None, Some(n)) => out.push(format!("admin listener added on {}", n.bind)),
        (Some(_), None) => out.push("admin listener removed".into()),
        (Some(o), Some(n)) => {
            if o.bind != n.bind {
                out.push(format!("admin listener moved from {} to {}", o.bind, n.bind));
            }
            match (&o.token, &n.token) {
                (None, Some(_)) => out.push("admin token set".into()),
                (Some(_), None) => out.push("admin token removed".into()),
                (Some(a), Some(b)) if a != b => out.push("admin token changed".into()),
                _ => {}
            }
        }
    }
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
    for d in &p.dns {
        if !o.dns.iter().any(|od| crate::dns::source_key(od) == crate::dns::source_key(d)) {
            out.push(format!("pool \"{}\": dns source {} added", p.name, crate::dns::source_key(d)));
        }
    }
    for od in &o.dns {
        match p.dns.iter().find(|d| crate::dns::source_key(od) == crate::dns::source_key(d)) {
            None => out.push(format!("pool \"{}\": dns source {} removed", p.name, crate::dns::source_key(od))),
            Some(d) if d != od => {
                out.push(format!("pool \"{}\": dns source {} changed", p.name, crate::dns::source_key(od)))
            }
            Some(_) => {}
        }
    }
    // Rebalancing said by name: turning it on is a decision an operator looks for.
    let rebalance = |x: &config::Pool| x.affinity.as_ref().and_then(|a| a.rebalance);
    let said = |r: config::Rebalance| {
        format!("factor {}, idle {:?}, at most {} moves a second", r.factor, r.idle, r.max_per_second)
    };
    match (rebalance(o), rebalance(p)) {
        (None, Some(r)) => out.push(format!("pool \"{}\": rebalancing idle sessions on ({})", p.name, said(r))),
        (Some(_), None) => out.push(format!("pool \"{}\": rebalancing idle sessions off", p.name)),
        (Some(a), Some(b)) if a != b => out.push(format!("pool \"{}\": rebalancing now {}", p.name, said(b))),
        _ => {}
    }
    // Everything but the backends, the DNS sources and the name.
    let settings =
        |x: &config::Pool| config::Pool { name: String::new(), backends: Vec::new(), dns: Vec::new(), ..x.clone() };
    if settings(o) != settings(p) {
        out.push(format!("pool \"{}\": settings changed", p.name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(admin: &str) -> Config {
        let text = format!(
            "{admin}\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\npool = \"web\"\n\n[pools.web]\nbackends = [{{ name = \"a\", address = \"127.0.0.1:1\" }}]\n"
        );
        config::parse(&text, "test.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    const A: &str = "first-admin-token-0123";
    const B: &str = "second-admin-token-4567";

    #[test]
    fn diff_reports_admin_changes_without_the_token() {
        let on = |bind: &str, token: &str| config(&format!("[admin]\nbind = \"{bind}\"\ntoken = \"{token}\"\n"));
        let changes = diff(&on("127.0.0.1:9901", A), &on("127.0.0.1:9901", B));
        assert_eq!(changes, ["admin token changed"]);
        let changes = diff(&on("127.0.0.1:9901", A), &on("127.0.0.2:9902", A));
        assert_eq!(changes, ["admin listener moved from 127.0.0.1:9901 to 127.0.0.2:9902"]);
        let changes = diff(&on("127.0.0.1:9901", A), &on("127.0.0.2:9902", B));
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(changes.iter().all(|c| !c.contains(A) && !c.contains(B)), "{changes:?}");

        let none = config("");
        let open = config("[admin]\nbind = \"127.0.0.1:9901\"\n");
        assert_eq!(diff(&none, &open), ["admin listener added on 127.0.0.1:9901"]);
        assert_eq!(diff(&open, &none), ["admin listener removed"]);
        assert_eq!(diff(&open, &on("127.0.0.1:9901", A)), ["admin token set"]);
        assert_eq!(diff(&on("127.0.0.1:9901", A), &open), ["admin token removed"]);
        assert!(diff(&open, &open).is_empty());
    }

    #[test]
    fn diff_says_when_rebalancing_turns_on_off_or_changes() {
        let with = |rebalance: &str| config(&format!("\n[pools.web.affinity]\nkeys = [\"cookie\"]\n{rebalance}"));
        let off = with("");
        let on = with("[pools.web.affinity.rebalance]\nfactor = 1.2\nidle = \"1s\"\n");
        let faster = with("[pools.web.affinity.rebalance]\nfactor = 1.2\nidle = \"1s\"\nmax_per_second = 50\n");
        let changes = diff(&off, &on);
        assert!(
            changes.contains(
                &"pool \"web\": rebalancing idle sessions on (factor 1.2, idle 1s, at most 20 moves a second)"
                    .to_string()
            ),
            "{changes:?}"
        );
        assert!(diff(&on, &off).contains(&"pool \"web\": rebalancing idle sessions off".to_string()));
        let changes = diff(&on, &faster);
        assert!(
            changes.iter().any(|c| c.ends_with("rebalancing now factor 1.2, idle 1s, at most 50 moves a second")),
            "{changes:?}"
        );
        assert!(diff(&on, &on).is_empty());
    }
}

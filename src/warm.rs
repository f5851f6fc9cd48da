//! Warm restarts without Redis: with `runtime.state_dir`, graceful shutdown saves what a
//! Tether learned (every pool's stick tables: app-cookie, header, query and client-IP pins
//! and the token sessions; every traffic split's table of table-mapped keys) and the admin
//! API's overrides (drain, enable, disable, weight; split weights)
//! to one file, and start-up reads them back, so restarting or upgrading one instance
//! loses no learned session and no drain.
//!
//! The file is JSON (`tether.state.json`), written whole to a temporary file, flushed to
//! disk and renamed over the old one, so a reader sees the old file or the new one, never
//! half of one. It names what it belongs to: a format tag and version, and every pool and
//! backend by name with its identity hash (`affinity::pool_id`, `hash::backend_id`); an
//! entry refers to a backend by its place in its pool's list. Entries carry the wall-clock
//! second they were last seen, since a stick table's ticks mean nothing to another
//! process: at start an entry comes back with the idle time it has left, and one whose idle
//! timeout ran out while Tether was down does not come back.
//!
//! What it deliberately does not do: it never fails a start. A missing file is a first
//! start; an unreadable, damaged, truncated or foreign file is one line in the log and is
//! ignored. Entries of pools or backends the config no longer has are dropped, as are
//! overrides of a backend whose state or weight the file changed since (the rule reloads
//! keep overrides by). It saves nothing when a process dies without a graceful shutdown:
//! the file then still holds the last graceful shutdown's state, which is read, aged by the
//! wall clock, at the next start.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::affinity::{self, hash};
use crate::config::AdminState;
use crate::control::{Control, SavedOverride, SavedSplitOverride};
use crate::pool::Snapshot;

/// The file's name in `state_dir`.
pub const FILE_NAME: &str = "tether.state.json";
/// What the `format` field says, so that any other JSON file is told apart at once.
const FORMAT: &str = "tether-state";
/// Bumped when the layout changes; a file of another version is ignored, not guessed at.
const VERSION: u32 = 1;

/// The file as written.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: String,
    version: u32,
    /// When it was written, in Unix milliseconds (for the log line that reads it back).
    written_unix_ms: u64,
    pools: Vec<SavedPool>,
    overrides: Vec<OverrideRecord>,
    /// Traffic splits' key tables (left out when there is none, so a file of a config
    /// without splits is what it was before splits).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    splits: Vec<SavedSplit>,
    /// The admin API's split weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    split_overrides: Vec<SplitOverrideRecord>,
}

/// A split's table of table-mapped keys: each entry's "backend" is the index of its pool
/// in `pools`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedSplit {
    name: String,
    pools: Vec<String>,
    entries: Vec<SavedEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitOverrideRecord {
    split: String,
    pool: String,
    weight: u32,
    file_weight: u32,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedPool {
    name: String,
    /// `affinity::pool_id(name)` in hex: a file whose identities do not match their names
    /// was not written by this format's rules.
    id: String,
    backends: Vec<SavedBackend>,
    /// By table name (`affinity::Store::TABLES`).
    tables: HashMap<String, Vec<SavedEntry>>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedBackend {
    name: String,
    /// `hash::backend_id(pool, name)` in hex.
    id: String,
}

/// One table entry: the key (32 hex digits), the backend's index in its pool's
/// `backends`, the Unix second it was last seen, and whether it was found again after it
/// was stored (an established session, which the table's admission rule protects).
#[derive(Debug, Serialize, Deserialize)]
struct SavedEntry(String, usize, u64, bool);

/// An admin override as it is written down: in the state file, and in a fleet's admin
/// hash in Redis (`fleet`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OverrideRecord {
    pool: String,
    backend: String,
    state: Option<String>,
    weight: Option<u32>,
    file_state: String,
    file_weight: u32,
    /// When the drain began (Unix milliseconds), for an override that drains: the drain's
    /// timeout keeps running from then, not from the restart.
    draining_since_ms: Option<u64>,
}

impl OverrideRecord {
    /// `o`, with its drain's start as `snapshot`'s backend has it.
    pub(crate) fn of(o: SavedOverride, snapshot: &Snapshot) -> OverrideRecord {
        let draining_since_ms = (o.state == Some(AdminState::Draining))
            .then(|| snapshot.backend(&o.pool, &o.backend).map(|b| b.draining_since()))
            .flatten();
        OverrideRecord {
            pool: o.pool,
            backend: o.backend,
            state: o.state.map(|s| s.as_str().to_string()),
            weight: o.weight,
            file_state: o.file_state.as_str().to_string(),
            file_weight: o.file_weight,
            draining_since_ms,
        }
    }

    /// The override, with its drain's start; `None` when a state is not one Tether knows.
    pub(crate) fn saved(&self) -> Option<(SavedOverride, Option<u64>)> {
        let saved = SavedOverride {
            pool: self.pool.clone(),
            backend: self.backend.clone(),
            state: match &self.state {
                Some(s) => Some(admin_state(s)?),
                None => None,
            },
            weight: self.weight,
            file_state: admin_state(&self.file_state)?,
            file_weight: self.file_weight,
        };
        Some((saved, self.draining_since_ms))
    }
}

/// Why a state file was not used.
#[derive(Debug)]
pub enum LoadError {
    Read(io::Error),
    /// Not JSON of this layout: damaged, truncated or some other file.
    Damaged(serde_json::Error),
    /// Another format or version.
    Foreign(String),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Read(e) => write!(f, "cannot be read: {e}"),
            LoadError::Damaged(e) => write!(f, "is damaged or not a Tether state file: {e}"),
            LoadError::Foreign(why) => write!(f, "is not this Tether's: {why}"),
        }
    }
}

/// What a restore brought back, for the log and the tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Restored {
    pub entries: usize,
    /// Entries whose idle timeout ran out while Tether was down.
    pub expired: usize,
    /// Entries of pools or backends the config no longer has, or of a pool without
    /// affinity now.
    pub dropped: usize,
    pub overrides: usize,
}

/// The state file's path in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Where a state file goes once it has been restored and Tether has started: kept for a
/// look, but never read again.
pub fn used_path(dir: &Path) -> PathBuf {
    dir.join(format!("{FILE_NAME}.restored"))
}

/// Sets the restored state file aside ([`used_path`]). A state file is used once: after a
/// crash, which saves nothing, the next start must not bring back what the last graceful
/// shutdown saved (an override changed through the API since, for one), so it starts
/// without learned state, as after a first start. Called only once Tether has started, so
/// that a start that fails (a listener that cannot bind) leaves the file for the next one.
pub fn set_aside(dir: &Path) {
    let (from, to) = (path(dir), used_path(dir));
    match fs::rename(&from, &to) {
        Ok(()) => tracing::debug!(path = %to.display(), "warm restart: the state file is set aside"),
        Err(e) => tracing::warn!(
            path = %from.display(),
            "warm restart: the state file could not be set aside ({e}): a start after a crash would restore it again"
        ),
    }
}

// === saving ===

/// Writes the running Tether's learned tables and admin overrides to `dir`, atomically.
/// Logs the outcome; a failure is logged, never fatal (the process is stopping anyway).
pub fn save(control: &Control, dir: &Path) {
    let file = state_of(control);
    let (entries, overrides) = counts(&file);
    let target = path(dir);
    match write_atomically(&target, &file) {
        Ok(()) => tracing::info!(
            path = %target.display(),
            "warm restart: saved {entries} table entries and {overrides} admin overrides"
        ),
        Err(e) => tracing::error!(path = %target.display(), "warm restart: cannot save the state file: {e}"),
    }
}

/// The running Tether's learned tables and admin overrides, as the state file holds them.
fn state_of(control: &Control) -> StateFile {
    let snapshot = control.shared.snapshot.load_full();
    let mut file = collect(&snapshot, control.saved_overrides());
    file.splits = collect_splits(&snapshot);
    file.split_overrides = control
        .saved_split_overrides()
        .into_iter()
        .map(|o| SplitOverrideRecord { split: o.split, pool: o.pool, weight: o.weight, file_weight: o.file_weight })
        .collect();
    file
}

/// Table entries and admin overrides in `file`, for the log.
fn counts(file: &StateFile) -> (usize, usize) {
    let entries: usize = file.pools.iter().flat_map(|p| p.tables.values()).map(Vec::len).sum::<usize>()
        + file.splits.iter().map(|s| s.entries.len()).sum::<usize>();
    (entries, file.overrides.len() + file.split_overrides.len())
}

/// The state file's content for the running Tether, as bytes: what a binary upgrade hands
/// the new process (`upgrade`) instead of writing a file.
pub fn to_bytes(control: &Control) -> Vec<u8> {
    // Serialising plain structs of strings and numbers cannot fail; an empty answer
    // would be refused by the reader as damaged, never misread.
    serde_json::to_vec(&state_of(control)).unwrap_or_default()
}

/// Restores state given as bytes ([`to_bytes`] of another process), as [`restore`] does
/// a file. An error says why nothing was restored.
pub fn restore_bytes(control: &Control, bytes: &[u8]) -> Result<Restored, LoadError> {
    let file: StateFile = serde_json::from_slice(bytes).map_err(LoadError::Damaged)?;
    check(&file)?;
    let restored = apply(control, &file);
    tracing::info!(
        "upgrade: restored {} table entries and {} admin overrides handed over by the old process \
         ({} expired, {} of pools or backends no longer configured)",
        restored.entries,
        restored.overrides,
        restored.expired,
        restored.dropped,
    );
    Ok(restored)
}

/// The state of `snapshot` as the file holds it.
fn collect(snapshot: &Snapshot, overrides: Vec<SavedOverride>) -> StateFile {
    let now_ms = crate::time::unix_millis();
    let now_secs = now_ms / 1000;
    let mut pools = Vec::new();
    for p in &snapshot.pools {
        let backends: Vec<SavedBackend> = p
            .backends
            .iter()
            .map(|b| SavedBackend { name: b.name.clone(), id: hex64(hash::backend_id(&p.name, &b.name)) })
            .collect();
        let index: HashMap<u64, usize> =
            p.backends.iter().enumerate().map(|(i, b)| (hash::backend_id(&p.name, &b.name), i)).collect();
        let mut tables = HashMap::new();
        if let Some(a) = &p.affinity {
            for (name, entries) in a.store.export() {
                let saved: Vec<SavedEntry> = entries
                    .iter()
                    .filter_map(|e| {
                        // A pin to a backend removed by a reload: nothing to restore it to.
                        let i = *index.get(&e.backend)?;
                        Some(SavedEntry(
                            format!("{:032x}", e.key),
                            i,
                            now_secs.saturating_sub(u64::from(e.idle_secs)),
                            e.established,
                        ))
                    })
                    .collect();
                if !saved.is_empty() {
                    tables.insert(name.to_string(), saved);
                }
            }
        }
        pools.push(SavedPool { name: p.name.to_string(), id: hex64(affinity::pool_id(&p.name)), backends, tables });
    }
    let overrides = overrides.into_iter().map(|o| OverrideRecord::of(o, snapshot)).collect();
    StateFile {
        format: FORMAT.into(),
        version: VERSION,
        written_unix_ms: now_ms,
        pools,
        overrides,
        splits: Vec::new(),
        split_overrides: Vec::new(),
    }
}

/// Every split's key table, entries naming their pool by place in the split's list.
fn collect_splits(snapshot: &Snapshot) -> Vec<SavedSplit> {
    let now_secs = crate::time::unix_millis() / 1000;
    let mut out = Vec::new();
    for s in snapshot.listeners.iter().flat_map(|l| l.splits()) {
        let entries: Vec<SavedEntry> = s
            .store
            .table
            .export()
            .iter()
            .filter_map(|e| {
                let i = s.members.iter().position(|m| m.id == e.backend)?;
                let last_seen = now_secs.saturating_sub(u64::from(e.idle_secs));
                Some(SavedEntry(format!("{:032x}", e.key), i, last_seen, e.established))
            })
            .collect();
        if !entries.is_empty() {
            let pools = s.members.iter().map(|m| m.name.to_string()).collect();
            out.push(SavedSplit { name: s.name.to_string(), pools, entries });
        }
    }
    out
}

/// Writes `file` to a temporary file beside `target`, flushes it to disk, renames it over
/// `target` and flushes the directory, so that a crash at any point leaves the old file or
/// the new one whole.
fn write_atomically(target: &Path, file: &StateFile) -> io::Result<()> {
    let dir = target.parent().unwrap_or(Path::new("."));
    let tmp = target.with_extension("json.tmp");
    let bytes = serde_json::to_vec(file).map_err(io::Error::other)?;
    let write = || -> io::Result<()> {
        // A directory that is not there yet is made (systemd's StateDirectory= makes it
        // beforehand; a hand-run Tether may not have).
        fs::create_dir_all(dir)?;
        let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, target)?;
        // The rename itself is durable only once the directory is.
        fs::File::open(dir)?.sync_all()
    };
    let result = write();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

// === restoring ===

/// Reads the state file in `dir` and restores what still applies into `control`'s
/// snapshot. Never fails: a missing file is a first start (logged as such), anything
/// wrong with it is one line in the log and the file is ignored.
pub fn restore(control: &Control, dir: &Path) -> Option<Restored> {
    let target = path(dir);
    let file = match load(&target) {
        Ok(Some(file)) => file,
        Ok(None) => {
            tracing::info!(path = %target.display(), "warm restart: no state file (a first start)");
            return None;
        }
        Err(e) => {
            tracing::warn!(path = %target.display(), "warm restart: state file ignored: it {e}");
            return None;
        }
    };
    let snapshot = control.shared.snapshot.load_full();
    if !file.pools.is_empty() && !file.pools.iter().any(|p| snapshot.pool(&p.name).is_some()) {
        let names: Vec<&str> = file.pools.iter().map(|p| p.name.as_str()).collect();
        tracing::warn!(
            path = %target.display(),
            "warm restart: state file ignored: it is not this Tether's: it was written for pools {}, none of which this config has",
            names.join(", ")
        );
        return None;
    }
    let restored = apply(control, &file);
    let age = crate::time::unix_millis().saturating_sub(file.written_unix_ms) / 1000;
    tracing::info!(
        path = %target.display(),
        "warm restart: restored {} table entries and {} admin overrides from a state file written {age}s ago \
         ({} expired while stopped, {} of pools or backends no longer configured)",
        restored.entries,
        restored.overrides,
        restored.expired,
        restored.dropped,
    );
    Some(restored)
}

/// The file at `path`: `None` when there is none, an error when it cannot be used.
fn load(path: &Path) -> Result<Option<StateFile>, LoadError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LoadError::Read(e)),
    };
    let file: StateFile = serde_json::from_slice(&bytes).map_err(LoadError::Damaged)?;
    check(&file)?;
    Ok(Some(file))
}

/// Refuses a file of another format or version, or whose identities do not match the
/// names they are written beside.
fn check(file: &StateFile) -> Result<(), LoadError> {
    if file.format != FORMAT {
        return Err(LoadError::Foreign(format!("its format is \"{}\", not \"{FORMAT}\"", file.format)));
    }
    if file.version != VERSION {
        return Err(LoadError::Foreign(format!("it is version {}, this Tether reads version {VERSION}", file.version)));
    }
    for p in &file.pools {
        if p.id != hex64(affinity::pool_id(&p.name)) {
            return Err(LoadError::Foreign(format!("pool \"{}\" has an identity of another name", p.name)));
        }
        for b in &p.backends {
            if b.id != hex64(hash::backend_id(&p.name, &b.name)) {
                return Err(LoadError::Foreign(format!(
                    "pool \"{}\": backend \"{}\" has an identity of another name",
                    p.name, b.name
                )));
            }
        }
    }
    Ok(())
}

/// Puts what `file` holds into the running snapshot's tables and the control's overrides.
fn apply(control: &Control, file: &StateFile) -> Restored {
    let mut restored = Restored::default();
    let now_secs = crate::time::unix_millis() / 1000;
    let snapshot = control.shared.snapshot.load_full();
    for saved in &file.pools {
        let count: usize = saved.tables.values().map(Vec::len).sum();
        let Some(pool) = snapshot.pool(&saved.name) else {
            restored.dropped += count;
            continue;
        };
        let Some(a) = &pool.affinity else {
            restored.dropped += count;
            continue;
        };
        // Each saved backend's identity, if the pool still has a backend of that name.
        let ids: Vec<Option<u64>> = saved
            .backends
            .iter()
            .map(|b| pool.backends.iter().any(|now| now.name == b.name).then(|| hash::backend_id(&pool.name, &b.name)))
            .collect();
        for (table_name, entries) in &saved.tables {
            let Some(table) = a.store.table_named(table_name) else {
                restored.dropped += entries.len();
                continue;
            };
            for SavedEntry(key, backend, last_seen, established) in entries {
                let (Ok(key), Some(Some(backend))) = (u128::from_str_radix(key, 16), ids.get(*backend)) else {
                    restored.dropped += 1;
                    continue;
                };
                let idle = u32::try_from(now_secs.saturating_sub(*last_seen)).unwrap_or(u32::MAX);
                if table.import(key, *backend, idle, *established) {
                    restored.entries += 1;
                } else {
                    restored.expired += 1;
                }
            }
        }
    }
    for saved in &file.splits {
        let Some(split) = snapshot.split(&saved.name) else {
            restored.dropped += saved.entries.len();
            continue;
        };
        // Each saved pool's identity, if the split still has it.
        let ids: Vec<Option<u64>> =
            saved.pools.iter().map(|p| split.members.iter().find(|m| &*m.name == p).map(|m| m.id)).collect();
        for SavedEntry(key, pool, last_seen, established) in &saved.entries {
            let (Ok(key), Some(Some(pool))) = (u128::from_str_radix(key, 16), ids.get(*pool)) else {
                restored.dropped += 1;
                continue;
            };
            let idle = u32::try_from(now_secs.saturating_sub(*last_seen)).unwrap_or(u32::MAX);
            if split.store.table.import(key, *pool, idle, *established) {
                restored.entries += 1;
            } else {
                restored.expired += 1;
            }
        }
    }
    let split_overrides = file
        .split_overrides
        .iter()
        .map(|o| SavedSplitOverride {
            split: o.split.clone(),
            pool: o.pool.clone(),
            weight: o.weight,
            file_weight: o.file_weight,
        })
        .collect();
    restored.overrides += control.restore_split_overrides(split_overrides);
    // A drain keeps the start it had: its `drain_timeout` runs from then.
    let wanted = file.overrides.iter().filter_map(OverrideRecord::saved).collect();
    restored.overrides += control.restore_overrides(wanted).len();
    restored
}

fn admin_state(s: &str) -> Option<AdminState> {
    [AdminState::Enabled, AdminState::Draining, AdminState::Disabled].into_iter().find(|a| a.as_str() == s)
}

fn hex64(x: u64) -> String {
    format!("{x:016x}")
}

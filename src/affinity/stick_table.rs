//! Sharded stick table: affinity key hash → backend id, with idle expiry
//! and LRU eviction.
//!
//! Keys are 128-bit hashes computed by the caller (see
//! [`key_hash128`](super::hash::key_hash128)); the raw key is never stored.
//! The table is split into a power-of-two number of shards selected by the
//! key's top bits. Each shard is a `Mutex` around:
//!
//! * a slab (`Vec`) of fixed-size entries linked into an intrusive doubly
//!   linked LRU list by `u32` indices (no per-entry allocation; freed slots
//!   are reused through a free list);
//! * an index (`hashbrown::HashTable<u32>`) holding only slot numbers; it
//!   hashes and compares through the slab, so the key is stored once.
//!
//! Memory is about 40 bytes per entry in the slab plus 5–10 bytes per entry
//! in the index. Nothing is pre-sized at construction: shards grow on demand
//! up to their share of the capacity (slab growth is clamped to it).
//!
//! Time is a coarse [`Tick`]: whole seconds since the table's [`Clock`]
//! epoch, passed in by the caller so tests can advance it freely.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hashbrown::HashTable;

const NIL: u32 = u32::MAX;
/// Entries removed per lock acquisition by [`StickTable::sweep`].
const SWEEP_BATCH: usize = 4096;
/// Upper bound on the shard count.
const MAX_SHARDS: usize = 1 << 16;

/// A coarse timestamp: whole seconds since a [`Clock`]'s epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tick(u32);

impl Tick {
    /// The tick `secs` seconds after the epoch.
    pub const fn from_secs(secs: u32) -> Self {
        Tick(secs)
    }
}

/// Converts `Instant`s into [`Tick`]s relative to a fixed epoch, or reads simulated time.
#[derive(Clone, Debug)]
pub struct Clock {
    epoch: Instant,
    /// The epoch on the coarse monotonic clock ([`coarse_nanos`]), which `now` reads.
    coarse_epoch: u64,
    /// Simulated time in whole seconds since the epoch, set by its owner (the simulator);
    /// `None` for the real clock. One predictable branch on the real path.
    manual: Option<Arc<AtomicU32>>,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// A clock whose epoch is now.
    pub fn new() -> Self {
        Clock { epoch: Instant::now(), coarse_epoch: coarse_nanos(), manual: None }
    }

    /// A clock that reads `seconds` (since its epoch) instead of the system's clock, so
    /// that whoever holds `seconds` drives time: the simulator.
    pub fn manual(seconds: Arc<AtomicU32>) -> Self {
        Clock { epoch: Instant::now(), coarse_epoch: coarse_nanos(), manual: Some(seconds) }
    }

    /// The current tick, from the coarse monotonic clock (the same clock `Instant` reads,
    /// as of the kernel's last timer interrupt: at most a few milliseconds behind, which a
    /// tick of a second does not see).
    pub fn now(&self) -> Tick {
        match &self.manual {
            Some(secs) => Self::simulated(secs),
            None => Tick(
                u32::try_from(coarse_nanos().saturating_sub(self.coarse_epoch) / 1_000_000_000).unwrap_or(u32::MAX),
            ),
        }
    }

    /// A clock whose epoch is up to `secs` seconds ago (less on a host up for less than
    /// that: the monotonic clock starts at boot), so that a table on it can hold entries
    /// last seen before it was made: a warm restart's, which keep their remaining idle
    /// time ([`StickTable::import`]). Ticks still count whole seconds, as [`new`](Self::new)'s.
    pub fn backdated(secs: u32) -> Self {
        let instant = Instant::now();
        let coarse = coarse_nanos();
        let back = u64::from(secs).min(coarse / 1_000_000_000);
        let (epoch, back) = match instant.checked_sub(Duration::from_secs(back)) {
            Some(epoch) => (epoch, back),
            None => (instant, 0),
        };
        Clock { epoch, coarse_epoch: coarse - back * 1_000_000_000, manual: None }
    }

    /// Out of line and cold, so the real clock's path compiles as it did before the seam
    /// (plus one test of `manual`).
    #[cold]
    #[inline(never)]
    fn simulated(secs: &AtomicU32) -> Tick {
        Tick(secs.load(Relaxed))
    }

    /// The tick of `instant` (0 if before the epoch; saturates after ~136
    /// years).
    pub fn at(&self, instant: Instant) -> Tick {
        let secs = instant.saturating_duration_since(self.epoch).as_secs();
        Tick(u32::try_from(secs).unwrap_or(u32::MAX))
    }
}

/// Nanoseconds on the kernel's coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`): a read of
/// the time of the last timer interrupt from the vDSO, a few nanoseconds against about 20
/// for `Instant::now`, which reads the TSC and scales it. Every table hit reads the clock.
#[cfg(target_os = "linux")]
fn coarse_nanos() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid `timespec` for the call to write.
    let mut rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if rc != 0 {
        // SAFETY: as above. (A kernel without the coarse clock: the fine one, same base.)
        rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    }
    debug_assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) cannot fail");
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

#[cfg(not(target_os = "linux"))]
fn coarse_nanos() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A table's seed for its shard and index hashes: from the system's random source, or
/// without it from the clock, which still makes seeds differ by process.
fn random_seed() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    })
}

/// One entry as [`StickTable::export`] lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exported {
    pub key: u128,
    pub backend: u64,
    /// Seconds since it was last seen.
    pub idle_secs: u32,
    /// Found again after it was stored (the admission rule's established session).
    pub established: bool,
}

/// A snapshot of the table's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StickStats {
    /// Entries currently stored (including idle ones not yet swept).
    pub entries: usize,
    /// `get` calls that found a live entry.
    pub hits: u64,
    /// `get` calls that found nothing or an expired entry.
    pub misses: u64,
    /// Live entries dropped to make room (capacity pressure).
    pub evictions: u64,
    /// Idle entries removed (by `get`, `sweep`, or when reclaimed by
    /// `insert` at capacity).
    pub expirations: u64,
    /// New keys not stored because the table was full of established sessions.
    pub rejections: u64,
}

impl std::ops::AddAssign for StickStats {
    /// The counters of two tables together.
    fn add_assign(&mut self, o: StickStats) {
        self.entries += o.entries;
        self.hits += o.hits;
        self.misses += o.misses;
        self.evictions += o.evictions;
        self.expirations += o.expirations;
        self.rejections += o.rejections;
    }
}

#[derive(Clone, Copy)]
struct Entry {
    key_lo: u64,
    key_hi: u64,
    backend: u64,
    last_seen: u32,
    prev: u32,
    next: u32,
    /// Found again after it was inserted: an established session, not a one-off key.
    seen_again: bool,
}

impl Entry {
    fn key(&self) -> u128 {
        (u128::from(self.key_hi) << 64) | u128::from(self.key_lo)
    }
}

/// A keyed hash of a key, for the shard choice and the index. Keys are fixed-seed hashes
/// that any client can compute for the values it sends; mixing in a per-table random seed
/// means a client cannot aim a flood of keys at one shard or one index bucket.
fn index_hash(key: u128, seed: u64) -> u64 {
    // A folded 64x64->128 multiply of the seeded halves (as wyhash and foldhash do).
    let a = (key as u64) ^ seed;
    let b = ((key >> 64) as u64) ^ seed.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
    let m = u128::from(a) * u128::from(b);
    (m as u64) ^ ((m >> 64) as u64)
}

/// Entries looked at, from the least recently used end, for one that may make room.
const ADMISSION_SCAN: usize = 8;

struct ShardInner {
    index: HashTable<u32>,
    slab: Vec<Entry>,
    /// Head of the free list (linked through `next`).
    free: u32,
    /// Most recently used.
    head: u32,
    /// Least recently used.
    tail: u32,
    len: u32,
    /// Entries per backend, kept as entries come and go, so that counting sessions per
    /// backend never walks the table. Keyed by the backend id, which is already a hash.
    per_backend: HashTable<(u64, u32)>,
    /// The table's seed for [`index_hash`].
    seed: u64,
    /// Lookups that found a live entry, and those that did not: counted under the lock
    /// the lookup holds anyway, so a hit makes no atomic read-modify-write of its own.
    hits: u64,
    misses: u64,
}

impl ShardInner {
    fn new(seed: u64) -> Self {
        ShardInner {
            seed,
            index: HashTable::new(),
            slab: Vec::new(),
            free: NIL,
            head: NIL,
            tail: NIL,
            len: 0,
            per_backend: HashTable::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// One more entry for `backend`.
    fn count_in(&mut self, backend: u64) {
        match self.per_backend.find_mut(backend, |(b, _)| *b == backend) {
            Some((_, n)) => *n += 1,
            None => {
                self.per_backend.insert_unique(backend, (backend, 1), |(b, _)| *b);
            }
        }
    }

    /// One entry fewer for `backend`.
    fn count_out(&mut self, backend: u64) {
        if let Ok(mut found) = self.per_backend.find_entry(backend, |(b, _)| *b == backend) {
            let n = &mut found.get_mut().1;
            *n -= 1;
            if *n == 0 {
                found.remove();
            }
        }
    }

    fn find(&self, key: u128) -> Option<u32> {
        let slab = &self.slab;
        self.index.find(index_hash(key, self.seed), |&s| slab[s as usize].key() == key).copied()
    }

    fn unlink(&mut self, slot: u32) {
        let Entry { prev, next, .. } = self.slab[slot as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.slab[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slab[next as usize].prev = prev;
        }
    }

    fn push_front(&mut self, slot: u32) {
        let old_head = self.head;
        {
            let e = &mut self.slab[slot as usize];
            e.prev = NIL;
            e.next = old_head;
        }
        if old_head == NIL {
            self.tail = slot;
        } else {
            self.slab[old_head as usize].prev = slot;
        }
        self.head = slot;
    }

    fn touch(&mut self, slot: u32) {
        if self.head != slot {
            self.unlink(slot);
            self.push_front(slot);
        }
    }

    /// Removes the entry in `slot` from the list and the index and frees
    /// the slot. Returns its backend.
    fn remove_slot(&mut self, slot: u32) -> u64 {
        self.unlink(slot);
        let entry = self.slab[slot as usize];
        if let Ok(found) = self.index.find_entry(index_hash(entry.key(), self.seed), |&s| s == slot) {
            found.remove();
        }
        let e = &mut self.slab[slot as usize];
        e.next = self.free;
        e.prev = NIL;
        self.free = slot;
        self.len -= 1;
        self.count_out(entry.backend);
        entry.backend
    }

    /// Stores a new entry (the key must be absent and a slot available
    /// within `cap`) at the front of the list.
    fn add(&mut self, key: u128, backend: u64, now: u32, cap: u32, seen_again: bool) {
        let entry = Entry {
            key_lo: key as u64,
            key_hi: (key >> 64) as u64,
            backend,
            last_seen: now,
            prev: NIL,
            next: NIL,
            seen_again,
        };
        let slot = if self.free != NIL {
            let slot = self.free;
            self.free = self.slab[slot as usize].next;
            self.slab[slot as usize] = entry;
            slot
        } else {
            let len = self.slab.len();
            if len == self.slab.capacity() {
                // Grow geometrically, but never beyond the shard's share.
                let target = (len * 2).max(16).min(cap as usize).max(len + 1);
                self.slab.reserve_exact(target - len);
            }
            self.slab.push(entry);
            len as u32
        };
        self.push_front(slot);
        let (slab, seed) = (&self.slab, self.seed);
        self.index.insert_unique(index_hash(key, seed), slot, |&s| index_hash(slab[s as usize].key(), seed));
        self.len += 1;
        self.count_in(backend);
    }
}

#[repr(align(64))]
struct Shard {
    inner: Mutex<ShardInner>,
    len: AtomicUsize,
    evictions: AtomicU64,
    expirations: AtomicU64,
    rejections: AtomicU64,
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, ShardInner> {
        // Operations never leave a shard half-updated short of an
        // allocation failure, so a poisoned lock is safe to reuse.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Sharded, capacity-bounded map from 128-bit key hashes to backend ids,
/// with idle expiry and LRU eviction. See the module documentation.
pub struct StickTable {
    shards: Box<[Shard]>,
    shard_bits: u32,
    shard_cap: u32,
    idle_secs: u32,
    clock: Clock,
    /// Random per table: see [`index_hash`].
    seed: u64,
}

impl std::fmt::Debug for StickTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StickTable")
            .field("shards", &self.shards.len())
            .field("shard_cap", &self.shard_cap)
            .field("idle_secs", &self.idle_secs)
            .field("len", &self.len())
            .finish()
    }
}

impl StickTable {
    /// A table holding at most about `capacity` entries (each of the
    /// `shards` shards holds `ceil(capacity / shards)`; `shards` is rounded
    /// up to a power of two, at least 1). Entries unused for longer than
    /// `idle_timeout` (whole seconds; sub-second parts are dropped) are
    /// treated as absent.
    pub fn new(capacity: usize, idle_timeout: Duration, shards: usize) -> Self {
        Self::with_clock(capacity, idle_timeout, shards, Clock::new(), random_seed())
    }

    /// [`new`](Self::new) on a clock backdated by the idle timeout
    /// ([`Clock::backdated`]): a table that can [`import`](Self::import) entries seen up
    /// to an idle timeout before it was made, with the idle time they have left.
    pub fn with_history(capacity: usize, idle_timeout: Duration, shards: usize) -> Self {
        let idle = u32::try_from(idle_timeout.as_secs()).unwrap_or(u32::MAX);
        Self::with_clock(capacity, idle_timeout, shards, Clock::backdated(idle.saturating_add(1)), random_seed())
    }

    /// [`new`](Self::new) with the clock and the seed given: the simulator's table, whose
    /// time is simulated and whose shard and index hashes are the same on every run.
    pub fn with_clock(capacity: usize, idle_timeout: Duration, shards: usize, clock: Clock, seed: u64) -> Self {
        let shards = shards.clamp(1, MAX_SHARDS).next_power_of_two();
        let shard_cap = capacity.div_ceil(shards).clamp(1, (NIL - 1) as usize) as u32;
        let shard_bits = shards.trailing_zeros();
        let shards = (0..shards)
            .map(|_| Shard {
                inner: Mutex::new(ShardInner::new(seed)),
                len: AtomicUsize::new(0),
                evictions: AtomicU64::new(0),
                expirations: AtomicU64::new(0),
                rejections: AtomicU64::new(0),
            })
            .collect();
        StickTable {
            shards,
            shard_bits,
            shard_cap,
            idle_secs: u32::try_from(idle_timeout.as_secs()).unwrap_or(u32::MAX),
            clock,
            seed,
        }
    }

    /// Now, by the table's clock (its epoch is the table's creation).
    pub fn now(&self) -> Tick {
        self.clock.now()
    }

    /// Maximum number of entries (the per-shard share times shard count).
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.shard_cap as usize * self.shards.len()
    }

    fn shard(&self, key: u128) -> &Shard {
        // A hash of its own (another seed), so that the keys of one shard do not share the
        // bits the shard's index uses.
        let i = index_hash(key, !self.seed).checked_shr(64 - self.shard_bits).unwrap_or(0);
        &self.shards[i as usize]
    }

    fn expired(&self, last_seen: u32, now: Tick) -> bool {
        now.0.saturating_sub(last_seen) > self.idle_secs
    }

    /// Looks up `key` at time `now`. A live entry is refreshed (moved to the
    /// front, last-seen set to `now`); an entry idle longer than the idle
    /// timeout is removed and reported as absent.
    pub fn get(&self, key: u128, now: Tick) -> Option<u64> {
        let shard = self.shard(key);
        let mut g = shard.lock();
        let Some(slot) = g.find(key) else {
            g.misses += 1;
            return None;
        };
        let last_seen = g.slab[slot as usize].last_seen;
        if self.expired(last_seen, now) {
            g.remove_slot(slot);
            g.misses += 1;
            shard.len.store(g.len as usize, Relaxed);
            shard.expirations.fetch_add(1, Relaxed);
            return None;
        }
        let e = &mut g.slab[slot as usize];
        e.last_seen = last_seen.max(now.0);
        e.seen_again = true;
        let backend = e.backend;
        g.touch(slot);
        g.hits += 1;
        Some(backend)
    }

    /// The backend of a live `key` at `now`, without refreshing it or counting a hit or a
    /// miss: for a look that is not a request's (the shared store checking whether a key is
    /// known before `decide` looks it up).
    pub fn peek(&self, key: u128, now: Tick) -> Option<u64> {
        let g = self.shard(key).lock();
        let slot = g.find(key)?;
        let e = &g.slab[slot as usize];
        (!self.expired(e.last_seen, now)).then_some(e.backend)
    }

    /// Maps `key` to `backend` at time `now` (replacing any existing
    /// mapping) and makes it most recently used. When the key's shard is
    /// full, its least recently used entry is dropped first.
    pub fn insert(&self, key: u128, backend: u64, now: Tick) {
        self.insert_as(key, backend, now, false);
    }

    /// [`insert`](Self::insert), with whether a new entry counts as already established.
    fn insert_as(&self, key: u128, backend: u64, now: Tick, established: bool) {
        let shard = self.shard(key);
        let mut g = shard.lock();
        if let Some(slot) = g.find(key) {
            let e = &mut g.slab[slot as usize];
            let old = std::mem::replace(&mut e.backend, backend);
            e.last_seen = e.last_seen.max(now.0);
            // Stored again (re-pinned, learned again): the key is in use.
            e.seen_again = true;
            g.touch(slot);
            if old != backend {
                g.count_out(old);
                g.count_in(backend);
            }
            return;
        }
        if g.len >= self.shard_cap {
            // Admission: a new key takes the place of an idle entry or of a key that was
            // never seen again, looking a few entries in from the least recently used end;
            // it never pushes out an established session. A flood of one-off keys only
            // churns among itself.
            let mut victim = None;
            let mut cur = g.tail;
            for _ in 0..ADMISSION_SCAN {
                if cur == NIL {
                    break;
                }
                let e = &g.slab[cur as usize];
                if self.expired(e.last_seen, now) || !e.seen_again {
                    victim = Some((cur, self.expired(e.last_seen, now)));
                    break;
                }
                cur = e.prev;
            }
            let Some((slot, idle)) = victim else {
                shard.rejections.fetch_add(1, Relaxed);
                return;
            };
            g.remove_slot(slot);
            if idle {
                shard.expirations.fetch_add(1, Relaxed);
            } else {
                shard.evictions.fetch_add(1, Relaxed);
            }
        }
        g.add(key, backend, now.0, self.shard_cap, established);
        shard.len.store(g.len as usize, Relaxed);
    }

    /// Removes `key`, returning its backend if it was present (expired or
    /// not).
    pub fn remove(&self, key: u128) -> Option<u64> {
        let shard = self.shard(key);
        let mut g = shard.lock();
        let slot = g.find(key)?;
        let backend = g.remove_slot(slot);
        shard.len.store(g.len as usize, Relaxed);
        Some(backend)
    }

    /// Removes entries idle longer than the timeout at `now`, walking each
    /// shard's LRU list from the tail in batches (the lock is released
    /// between batches). Returns the number removed. Meant to run
    /// periodically off the request path.
    pub fn sweep(&self, now: Tick) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            loop {
                let mut g = shard.lock();
                let mut batch = 0;
                while batch < SWEEP_BATCH && g.tail != NIL {
                    let tail = g.tail;
                    if !self.expired(g.slab[tail as usize].last_seen, now) {
                        break;
                    }
                    g.remove_slot(tail);
                    batch += 1;
                }
                shard.len.store(g.len as usize, Relaxed);
                drop(g);
                shard.expirations.fetch_add(batch as u64, Relaxed);
                removed += batch;
                if batch < SWEEP_BATCH {
                    break;
                }
            }
        }
        removed
    }

    /// Number of stored entries (including idle ones not yet swept).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len.load(Relaxed)).sum()
    }

    /// Whether the table stores no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of the counters (not atomic across shards; each shard's lookups are
    /// read under its lock).
    pub fn stats(&self) -> StickStats {
        let mut st = StickStats::default();
        for s in self.shards.iter() {
            st.entries += s.len.load(Relaxed);
            let g = s.lock();
            st.hits += g.hits;
            st.misses += g.misses;
            drop(g);
            st.evictions += s.evictions.load(Relaxed);
            st.expirations += s.expirations.load(Relaxed);
            st.rejections += s.rejections.load(Relaxed);
        }
        st
    }

    /// Inserts every entry of this table into `to`, least recently used first so that
    /// `to` keeps their order; their idle clocks start again in `to`. Walks the whole table
    /// one shard at a time: for reloads that change a table's settings, off the request path.
    pub fn copy_into(&self, to: &StickTable) {
        let mut entries: Vec<(u32, u128, u64, bool)> = Vec::with_capacity(self.len());
        for shard in self.shards.iter() {
            let g = shard.lock();
            let mut cur = g.tail;
            while cur != NIL {
                let e = &g.slab[cur as usize];
                entries.push((e.last_seen, e.key(), e.backend, e.seen_again));
                cur = e.prev;
            }
        }
        // One order over all shards: the two tables place keys in shards differently.
        entries.sort_by_key(|e| e.0);
        let now = to.now();
        for (_, key, backend, seen_again) in entries {
            to.insert_as(key, backend, now, seen_again);
        }
    }

    /// Every live entry (not idle longer than the timeout), least recently used first, with
    /// how long it has been idle: what a warm restart saves. Walks the whole table one
    /// shard at a time, off the request path.
    pub fn export(&self) -> Vec<Exported> {
        let now = self.now();
        let mut entries = Vec::with_capacity(self.len());
        for shard in self.shards.iter() {
            let g = shard.lock();
            let mut cur = g.tail;
            while cur != NIL {
                let e = &g.slab[cur as usize];
                if !self.expired(e.last_seen, now) {
                    entries.push(Exported {
                        key: e.key(),
                        backend: e.backend,
                        idle_secs: now.0.saturating_sub(e.last_seen),
                        established: e.seen_again,
                    });
                }
                cur = e.prev;
            }
        }
        // One order over all shards, the least recently used (most idle) first.
        entries.sort_by_key(|e| std::cmp::Reverse(e.idle_secs));
        entries
    }

    /// Stores an entry as if last seen `idle_secs` ago, so that it expires when it would
    /// have; an entry already idle longer than the timeout is not stored. Returns whether
    /// it was. Import least recently used first (as [`export`](Self::export) lists them):
    /// each becomes the most recently used. How far back an entry can be dated is bounded
    /// by the table's clock (see [`with_history`](Self::with_history)); older is dated
    /// at the clock's epoch, and so lives a little longer.
    pub fn import(&self, key: u128, backend: u64, idle_secs: u32, established: bool) -> bool {
        if idle_secs > self.idle_secs {
            return false;
        }
        let now = self.now();
        self.insert_as(key, backend, Tick(now.0.saturating_sub(idle_secs)), established);
        true
    }

    /// Entries per backend id (idle entries not yet swept included: sweep first for live
    /// counts). Reads each shard's running counts: cheap at any table size.
    pub fn sessions_per_backend(&self) -> HashMap<u64, usize> {
        let mut counts = HashMap::new();
        for shard in self.shards.iter() {
            let g = shard.lock();
            for &(backend, n) in g.per_backend.iter() {
                *counts.entry(backend).or_insert(0) += n as usize;
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const HOUR: Duration = Duration::from_secs(3600);

    fn t(secs: u32) -> Tick {
        Tick::from_secs(secs)
    }

    /// Spreads small integers over the whole key space (and all shards).
    fn k(i: u64) -> u128 {
        let x = u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
        x ^ (x >> 61)
    }

    /// Checks the list/index/free-list invariants of every shard.
    fn check_invariants(table: &StickTable) {
        let mut total = 0;
        for shard in table.shards.iter() {
            let g = shard.lock();
            let mut n = 0u32;
            let mut prev = NIL;
            let mut cur = g.head;
            while cur != NIL {
                let e = g.slab[cur as usize];
                assert_eq!(e.prev, prev);
                assert_eq!(g.find(e.key()), Some(cur));
                prev = cur;
                cur = e.next;
                n += 1;
            }
            assert_eq!(g.tail, prev);
            assert_eq!(n, g.len);
            assert_eq!(g.index.len(), g.len as usize);
            assert!(g.len <= table.shard_cap);
            assert!(g.slab.capacity() <= table.shard_cap as usize);
            let mut free = 0;
            let mut cur = g.free;
            while cur != NIL {
                free += 1;
                cur = g.slab[cur as usize].next;
            }
            assert_eq!(free + g.len as usize, g.slab.len());
            assert_eq!(shard.len.load(Relaxed), g.len as usize);
            // The running per-backend counts match a walk of the entries.
            let mut walked: HashMap<u64, u32> = HashMap::new();
            let mut cur = g.head;
            while cur != NIL {
                *walked.entry(g.slab[cur as usize].backend).or_insert(0) += 1;
                cur = g.slab[cur as usize].next;
            }
            let kept: HashMap<u64, u32> = g.per_backend.iter().copied().collect();
            assert_eq!(kept, walked);
            total += g.len as usize;
        }
        assert_eq!(total, table.len());
    }

    #[test]
    fn insert_get_remove() {
        let table = StickTable::new(100, HOUR, 4);
        assert!(table.is_empty());
        table.insert(k(1), 10, t(0));
        table.insert(k(2), 20, t(0));
        assert_eq!(table.get(k(1), t(1)), Some(10));
        assert_eq!(table.get(k(2), t(1)), Some(20));
        assert_eq!(table.get(k(3), t(1)), None);
        table.insert(k(1), 11, t(2));
        assert_eq!(table.get(k(1), t(2)), Some(11));
        assert_eq!(table.len(), 2);
        assert_eq!(table.remove(k(1)), Some(11));
        assert_eq!(table.remove(k(1)), None);
        assert_eq!(table.get(k(1), t(2)), None);
        assert_eq!(table.len(), 1);
        check_invariants(&table);
    }

    #[test]
    fn eviction_takes_one_off_keys_before_established_sessions() {
        let table = StickTable::new(3, HOUR, 1);
        table.insert(k(1), 1, t(0));
        table.insert(k(2), 2, t(0));
        table.insert(k(3), 3, t(0));
        // 1 comes back: an established session. Order, least recent first: 2, 3, 1.
        assert_eq!(table.get(k(1), t(1)), Some(1));
        table.insert(k(4), 4, t(2));
        assert_eq!(table.get(k(2), t(2)), None, "2, never seen again and least recently used, made room");
        // 3 is stored again (re-pinned): established too. Order: 4, 3 (with 1 before them).
        table.insert(k(3), 33, t(3));
        table.insert(k(5), 5, t(3));
        assert_eq!(table.get(k(4), t(3)), None, "4 was the one-off key");
        assert_eq!(table.get(k(1), t(3)), Some(1), "the established session stays");
        assert_eq!(table.get(k(3), t(3)), Some(33));
        assert_eq!(table.get(k(5), t(3)), Some(5));
        // Now every entry is established: a new key is not admitted.
        table.insert(k(6), 6, t(4));
        assert_eq!(table.get(k(6), t(4)), None);
        let st = table.stats();
        assert_eq!((st.evictions, st.rejections, st.expirations, st.entries), (2, 1, 0, 3));
        // An idle entry always makes room.
        table.insert(k(7), 7, t(4 + 3601));
        assert_eq!(table.get(k(7), t(4 + 3601)), Some(7));
        check_invariants(&table);
    }

    #[test]
    fn a_flood_of_one_off_keys_keeps_established_sessions() {
        let table = StickTable::new(1_000, HOUR, 4);
        for i in 0..500 {
            table.insert(k(i), i % 3, t(0));
            assert_eq!(table.get(k(i), t(0)), Some(i % 3));
        }
        for i in 1_000..200_000 {
            table.insert(k(i), 0, t(1));
        }
        for i in 0..500 {
            assert_eq!(table.get(k(i), t(1)), Some(i % 3), "established session {i} was pushed out");
        }
        check_invariants(&table);
    }

    #[test]
    fn capacity_is_per_shard_share() {
        let table = StickTable::new(1000, HOUR, 3);
        assert_eq!(table.shards.len(), 4);
        assert_eq!(table.capacity(), 1000);
        for i in 0..10_000 {
            table.insert(k(i), i, t(0));
        }
        assert!(table.len() <= 1000);
        assert!(table.len() > 900, "keys spread over all shards");
        assert_eq!(table.stats().evictions, 10_000 - table.len() as u64);
        // The most recent keys survive.
        for i in 9_900..10_000 {
            assert_eq!(table.get(k(i), t(0)), Some(i));
        }
        check_invariants(&table);
    }

    #[test]
    fn idle_expiry_on_get() {
        let table = StickTable::new(100, Duration::from_secs(10), 2);
        table.insert(k(1), 1, t(0));
        table.insert(k(2), 2, t(0));
        // Exactly the timeout is still alive and refreshes last-seen.
        assert_eq!(table.get(k(1), t(10)), Some(1));
        assert_eq!(table.get(k(1), t(20)), Some(1));
        assert_eq!(table.get(k(2), t(11)), None);
        assert_eq!(table.len(), 1);
        assert_eq!(table.get(k(1), t(31)), None);
        assert!(table.is_empty());
        let st = table.stats();
        assert_eq!((st.hits, st.misses, st.expirations), (2, 2, 2));
        check_invariants(&table);
    }

    #[test]
    fn insert_at_capacity_reclaims_idle_tail_as_expiration() {
        let table = StickTable::new(2, Duration::from_secs(10), 1);
        table.insert(k(1), 1, t(0));
        table.insert(k(2), 2, t(15));
        table.insert(k(3), 3, t(15));
        let st = table.stats();
        assert_eq!((st.evictions, st.expirations), (0, 1));
        table.insert(k(4), 4, t(15));
        assert_eq!(table.stats().evictions, 1);
    }

    #[test]
    fn sweep_removes_only_expired() {
        let table = StickTable::new(20_000, Duration::from_secs(10), 4);
        for i in 0..10_000 {
            table.insert(k(i), i % 7, t(0));
        }
        for i in 10_000..15_000 {
            table.insert(k(i), i % 7, t(5));
        }
        // Refresh some old ones.
        for i in 0..1_000 {
            assert_eq!(table.get(k(i), t(8)), Some(i % 7));
        }
        assert_eq!(table.sweep(t(10)), 0);
        assert_eq!(table.sweep(t(11)), 9_000);
        assert_eq!(table.len(), 6_000);
        assert_eq!(table.stats().expirations, 9_000);
        check_invariants(&table);
        assert_eq!(table.sweep(t(16)), 5_000);
        assert_eq!(table.sweep(t(100)), 1_000);
        assert!(table.is_empty());
        check_invariants(&table);
        // Freed slots are reused without growing the slab.
        let slab_before: usize = table.shards.iter().map(|s| s.lock().slab.len()).sum();
        for i in 0..15_000 {
            table.insert(k(i + 50_000), 1, t(100));
        }
        let slab_after: usize = table.shards.iter().map(|s| s.lock().slab.len()).sum();
        assert!(slab_after <= slab_before + 1_000, "{slab_before} -> {slab_after}");
        check_invariants(&table);
    }

    #[test]
    fn hits_and_misses() {
        let table = StickTable::new(10, HOUR, 1);
        table.insert(k(1), 1, t(0));
        for _ in 0..5 {
            table.get(k(1), t(0));
        }
        for i in 2..5 {
            table.get(k(i), t(0));
        }
        let st = table.stats();
        assert_eq!((st.hits, st.misses, st.entries), (5, 3, 1));
    }

    #[test]
    fn copy_into_keeps_entries_and_their_order() {
        let from = StickTable::new(1_000, HOUR, 4);
        for i in 0..300 {
            from.insert(k(i), i % 3, t(0));
        }
        // Touch the first 100 so that they are the most recently used.
        for i in 0..100 {
            assert_eq!(from.get(k(i), t(1)), Some(i % 3));
        }
        let to = StickTable::new(200, HOUR, 4);
        from.copy_into(&to);
        check_invariants(&to);
        assert_eq!(to.len(), 200, "a smaller table keeps what fits");
        for i in 0..100 {
            assert_eq!(to.get(k(i), to.now()), Some(i % 3), "recently used entry {i} was dropped");
        }
    }

    #[test]
    fn export_then_import_keeps_remaining_idle_time() {
        let idle = Duration::from_secs(60);
        let secs_a = Arc::new(AtomicU32::new(100));
        let from = StickTable::with_clock(100, idle, 4, Clock::manual(secs_a.clone()), 1);
        from.insert(k(1), 7, t(50));
        from.insert(k(2), 8, t(95));
        assert_eq!(from.get(k(2), t(95)), Some(8));
        from.insert(k(3), 9, t(10)); // idle 90 s at 100: not exported
        let out = from.export();
        assert_eq!(
            out,
            [
                Exported { key: k(1), backend: 7, idle_secs: 50, established: false },
                Exported { key: k(2), backend: 8, idle_secs: 5, established: true },
            ]
        );
        let secs_b = Arc::new(AtomicU32::new(1_000));
        let to = StickTable::with_clock(100, idle, 4, Clock::manual(secs_b.clone()), 2);
        for e in &out {
            assert!(to.import(e.key, e.backend, e.idle_secs, e.established));
        }
        assert!(!to.import(k(4), 1, 61, true), "an entry idle past the timeout is not stored");
        check_invariants(&to);
        assert_eq!(to.export(), out, "order, idle times and admission state are kept");
        // k(1) had 10 s left, k(2) 55 s.
        assert_eq!(to.get(k(1), t(1_010)), Some(7));
        assert_eq!(to.get(k(2), t(1_011)), Some(8));
        assert_eq!(to.get(k(1), t(1_071)), None);
    }

    #[test]
    fn a_table_with_history_dates_imports_before_its_creation() {
        let table = StickTable::with_history(10, HOUR, 1);
        assert!(table.import(k(1), 3, 3_000, true));
        let out = table.export();
        assert_eq!(out.len(), 1);
        // The host may have been up for less than an hour; otherwise the age is kept.
        assert!(out[0].idle_secs >= 3_000 || out[0].idle_secs == table.now().0, "{out:?}");
    }

    #[test]
    fn sessions_per_backend() {
        let table = StickTable::new(10_000, HOUR, 8);
        for i in 0..3_000 {
            table.insert(k(i), i % 3, t(0));
        }
        let per = table.sessions_per_backend();
        assert_eq!(per.len(), 3);
        assert!(per.values().all(|&n| n == 1_000));
        for i in (0..3_000).step_by(3) {
            assert_eq!(table.remove(k(i)), Some(0));
        }
        let per = table.sessions_per_backend();
        assert_eq!(per.get(&0), None);
        assert_eq!(per[&1] + per[&2], 2_000);
        // Re-pointing a key moves its count; evictions and expiry take theirs away.
        table.insert(k(1), 2, t(0));
        let per = table.sessions_per_backend();
        assert_eq!((per[&1], per[&2]), (999, 1_001));
        check_invariants(&table);
        table.sweep(t(3 * 3600));
        assert!(table.sessions_per_backend().is_empty());
        let small = StickTable::new(16, HOUR, 1);
        for i in 0..100 {
            small.insert(k(i), i % 2, t(0));
        }
        assert_eq!(small.sessions_per_backend().values().sum::<usize>(), 16);
        check_invariants(&small);
    }

    #[test]
    fn the_real_clock_counts_seconds_since_its_epoch() {
        // An epoch 5.5 s ago on the coarse clock: 5 whole seconds have passed.
        let mut clock = Clock::new();
        clock.coarse_epoch -= 5_500_000_000;
        assert_eq!(clock.now(), t(5));
        // The coarse clock moves with the monotonic one.
        let (a, i) = (coarse_nanos(), Instant::now());
        let b = coarse_nanos();
        assert!(b >= a);
        assert!(i.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn clock_ticks() {
        let clock = Clock::new();
        assert_eq!(clock.now(), t(0));
        let later = Instant::now() + Duration::from_secs(5);
        assert_eq!(clock.at(later), t(5));
    }

    #[test]
    fn a_manual_clock_reads_what_its_owner_sets() {
        let secs = Arc::new(AtomicU32::new(0));
        let table = StickTable::with_clock(100, Duration::from_secs(10), 1, Clock::manual(secs.clone()), 7);
        table.insert(k(1), 5, table.now());
        assert_eq!(table.now(), t(0));
        secs.store(10, Relaxed);
        // Idle for exactly the timeout: still there, and refreshed.
        assert_eq!(table.get(k(1), table.now()), Some(5));
        secs.store(21, Relaxed);
        assert_eq!(table.now(), t(21));
        assert_eq!(table.get(k(1), table.now()), None);
    }

    #[test]
    fn shard_selection_uses_all_shards() {
        let table = StickTable::new(1 << 16, HOUR, 16);
        for i in 0..16_000 {
            table.insert(k(i), 0, t(0));
        }
        for s in table.shards.iter() {
            let n = s.len.load(Relaxed);
            assert!((800..1200).contains(&n), "{n}");
        }
        // A single shard also works (no shift overflow).
        let one = StickTable::new(10, HOUR, 0);
        one.insert(u128::MAX, 1, t(0));
        assert_eq!(one.get(u128::MAX, t(0)), Some(1));
    }

    #[test]
    fn concurrent_smoke() {
        let table = Arc::new(StickTable::new(200_000, Duration::from_secs(30), 8));
        let threads: Vec<_> = (0..4u64)
            .map(|tid| {
                let table = Arc::clone(&table);
                std::thread::spawn(move || {
                    let base = tid * 1_000_000;
                    for round in 0..3u32 {
                        for i in 0..10_000 {
                            table.insert(k(base + i), base + i, t(round));
                        }
                        for i in 0..10_000 {
                            assert_eq!(table.get(k(base + i), t(round)), Some(base + i));
                        }
                        for i in (0..10_000).step_by(10) {
                            assert_eq!(table.remove(k(base + i)), Some(base + i));
                        }
                    }
                })
            })
            .collect();
        // A maintenance thread running beside the workers.
        let maint = {
            let table = Arc::clone(&table);
            std::thread::spawn(move || {
                for _ in 0..50 {
                    table.sweep(t(2));
                    let _ = table.sessions_per_backend();
                    let _ = table.stats();
                }
            })
        };
        for th in threads {
            th.join().unwrap();
        }
        maint.join().unwrap();
        assert_eq!(table.len(), 4 * 9_000);
        let st = table.stats();
        assert_eq!(st.hits, 4 * 3 * 10_000);
        assert_eq!(st.evictions + st.expirations, 0);
        check_invariants(&table);
    }
}

//! Learned pins shared by a fleet through Redis (`[stores.NAME]`; see ARCHITECTURE.md,
//! "Shared sessions").
//!
//! A [`Fleet`] is one Redis server: its connection (a multiplexed one for commands, a
//! second for pub/sub), kept by tasks on the control plane's runtime, and the queues the
//! data path fills. A pool that shares its pins holds a [`Link`] to it. What a request
//! does with it is two steps, each a boxed future only when there is something to wait
//! for (so a request whose keys are known here awaits nothing and allocates nothing):
//!
//! - [`Link::before`], before `decide`: a table key the request carries that the pool's
//!   table does not know (and that Redis was not asked about within `miss_ttl`) is looked
//!   up, within `timeout`, and imported into the table when Redis knows it. A known key
//!   only has its refresh queued, at most once a quarter of its idle timeout.
//! - [`Link::after`], before the response head goes out: a pin the request created is
//!   written with `SET NX GET` (the first instance's pin wins: a loser adopts the winner's
//!   backend for the key's next requests), a pin it moved with `SET` and a message on
//!   `PREFIX:moved`, within `timeout`; what does not make it is queued for write-back.
//!
//! Redis keys are `PREFIX:POOL:KIND:HEX`, `HEX` the pin's 128-bit hash encrypted with
//! AES-256 under the store's key: no session id, header value or address reaches Redis,
//! and nobody without the key can tell which key a name stands for. Values are backend
//! names, whose identity survives reloads. Every key carries the pool's table idle timeout
//! as its expiry.

mod admin;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin as Pinned;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, IntoConnectionInfo, RedisConnectionInfo, Value};

use crate::affinity::verdict::Verdict;
use crate::affinity::{self, hash, Decision, Pin, PinKind, PoolAffinity, Target};
use crate::backend::Backend;
use crate::config;

/// A step of a request that waits on Redis.
pub type Wait = Pinned<Box<dyn Future<Output = ()> + Send>>;

/// Queued writes, refresh stamps and remembered misses are kept in this many shards, by
/// key, each under its own lock.
const SHARDS: usize = 16;
/// At most this many writes wait for Redis (per shard); more are dropped and counted.
const MAX_QUEUED: usize = 50_000 / SHARDS;
/// At most this many misses are remembered (per shard). Refresh stamps are bounded by
/// the tables of the pools linked (`Fleet::stamps_cap`): a key without a stamp is never
/// refreshed, so there must be room for every live pin.
const MAX_REMEMBERED: usize = 400_000 / SHARDS;
/// At most this many writes go out in one flush.
const MAX_PER_FLUSH: usize = 4096;
/// How long a flush or a health check may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(1);
/// Reconnection backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Latency buckets (upper bounds, microseconds) of requests' waits on Redis.
pub const LATENCY_BUCKETS_US: [u64; 8] = [250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000];

/// A write owed to Redis.
#[derive(Debug, Clone)]
struct Write {
    pool: Arc<str>,
    kind: PinKind,
    key: u128,
    backend: Arc<str>,
    ttl_ms: u64,
    /// A move (overwrite and tell the others), else a pin that only fills in a gap.
    moved: bool,
    /// An unpin (delete and tell the others; a move with no backend).
    forget: bool,
}

#[derive(Debug, Default)]
struct Shard {
    /// Writes waiting for the next flush, by key (the latest wins).
    writes: HashMap<u128, Write>,
    /// Keys whose refresh went out, with when the next is due (ms on the fleet's clock).
    refreshed: HashMap<u128, u64>,
    /// Keys Redis did not know, with until when that is believed (ms).
    misses: HashMap<u128, u64>,
    /// Sessions seen coming back since the last flush, by backend identity (see
    /// `admin::Seen`).
    seen: HashMap<u64, admin::Seen>,
}

/// What the store counts, read by `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Redis commands sent for sessions (a pipeline counts each of its commands; the
    /// health check's PING once a second is not counted).
    pub operations: AtomicU64,
    /// Lookups before `decide`, by what came of them.
    pub lookup_hits: AtomicU64,
    pub lookup_misses: AtomicU64,
    /// Lookups not asked because Redis is down.
    pub lookups_skipped: AtomicU64,
    /// Commands or pipelines that failed or ran out of time.
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
    /// New pins written (`SET NX`), and how many found another instance's pin first.
    pub pins_written: AtomicU64,
    pub pins_lost: AtomicU64,
    /// Moves written and told, and moves heard from other instances.
    pub moves_sent: AtomicU64,
    pub moves_received: AtomicU64,
    /// Refreshes and write-backs sent by the flush.
    pub flushed: AtomicU64,
    /// Writes dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Requests' waits on Redis: count by [`LATENCY_BUCKETS_US`] (one more for above), and
    /// the sum in microseconds.
    pub latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    pub latency_sum_us: AtomicU64,
}

impl Stats {
    fn waited(&self, since: Instant) {
        let us = since.elapsed().as_micros() as u64;
        let i = LATENCY_BUCKETS_US.iter().position(|b| us <= *b).unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[i].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(us, Relaxed);
    }
}

/// One Redis server and what Tether keeps about it.
pub struct Fleet {
    pub cfg: config::Store,
    cipher: aes::Aes256,
    /// Names this process in `moved` messages, so it skips its own.
    instance: u64,
    epoch: Instant,
    /// The command connection while Redis is up.
    conn: ArcSwapOption<MultiplexedConnection>,
    up: AtomicBool,
    shards: [Mutex<Shard>; SHARDS],
    /// Refresh stamps kept per shard at most: room for every pin the linked pools' tables
    /// can hold.
    stamps_cap: std::sync::atomic::AtomicUsize,
    /// The pools sharing through this store, by name: where `moved` messages land.
    pools: Mutex<HashMap<String, Weak<affinity::Store>>>,
    /// Woken when a request sees Redis fail, so the health check runs at once.
    suspect: Arc<tokio::sync::Notify>,
    /// Woken when the fleet's admin state may have changed (see `admin_changes`).
    admin_changed: tokio::sync::Notify,
    /// How this instance is listed in `PREFIX:instances`.
    member: String,
    pub stats: Stats,
    /// Dropped with the fleet: its tasks end.
    _stop: tokio::sync::watch::Sender<()>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("store", &self.cfg.name).field("up", &self.is_up()).finish()
    }
}

impl Fleet {
    /// A store for `cfg`, its tasks started on the current Tokio runtime (the control
    /// plane's). Outside a runtime (a config check) nothing is started.
    pub fn start(cfg: &config::Store) -> Arc<Fleet> {
        let key = affinity::token::Key::from_base64(&cfg.key).map(|k| k.bytes()).unwrap_or([0; 32]);
        let (stop, stopped) = tokio::sync::watch::channel(());
        let instance = u64::from_le_bytes(rand_bytes());
        let fleet = Arc::new(Fleet {
            cfg: cfg.clone(),
            cipher: aes::Aes256::new(&key.into()),
            instance,
            admin_changed: tokio::sync::Notify::new(),
            member: admin::member(instance),
            epoch: Instant::now(),
            conn: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            shards: std::array::from_fn(|_| Mutex::new(Shard::default())),
            stamps_cap: std::sync::atomic::AtomicUsize::new(MAX_REMEMBERED),
            pools: Mutex::new(HashMap::new()),
            suspect: Arc::new(tokio::sync::Notify::new()),
            stats: Stats::default(),
            _stop: stop,
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(keep_connected(Arc::downgrade(&fleet), stopped.clone()));
            tokio::spawn(listen_for_moves(Arc::downgrade(&fleet), stopped.clone()));
            tokio::spawn(flush_regularly(Arc::downgrade(&fleet), stopped));
        }
        fleet
    }

    /// The fleet to use for `cfg`: `previous`'s when its settings are the same.
    pub fn reuse_or_start(cfg: &config::Store, previous: &[Arc<Fleet>]) -> Arc<Fleet> {
        match previous.iter().find(|f| f.cfg == *cfg) {
            Some(f) => f.clone(),
            None => Fleet::start(cfg),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Writes waiting for Redis.
    pub fn queued(&self) -> usize {
        self.shards.iter().map(|s| lock(s).writes.len()).sum()
    }

    /// The pool `pool`'s link to this store, its pins kept in `store` (whose tables `table`
    /// sizes), each expiring after the table's idle timeout in Redis.
    pub fn link(self: &Arc<Fleet>, pool: &str, store: &Arc<affinity::Store>, table: &config::TableConfig) -> Link {
        lock(&self.pools).insert(pool.to_string(), Arc::downgrade(store));
        // Room for a stamp for every pin of the pool's tables (one per kind of key).
        let pins = table.capacity.saturating_mul(PinKind::ALL.len());
        self.stamps_cap.fetch_max(pins / SHARDS + 1024, Relaxed);
        let ttl_ms = table.idle_timeout.as_millis().max(1000) as u64;
        Link { fleet: self.clone(), pool: Arc::from(pool), ttl_ms, refresh_ms: (ttl_ms / 4).max(1000) }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn shard(&self, key: u128) -> MutexGuard<'_, Shard> {
        lock(&self.shards[(key as usize) % SHARDS])
    }

    /// The name of a pin in Redis.
    fn redis_key(&self, pool: &str, kind: PinKind, key: u128) -> String {
        let mut block = key.to_le_bytes().into();
        self.cipher.encrypt_block(&mut block);
        let bytes: [u8; 16] = block.into();
        format!("{}:{pool}:{}:{:032x}", self.cfg.prefix, kind.name(), u128::from_be_bytes(bytes))
    }

    /// The pin hash behind the hex part of a Redis key.
    fn pin_of_hex(&self, hex: &str) -> Option<u128> {
        let v = u128::from_str_radix(hex, 16).ok().filter(|_| hex.len() == 32)?;
        let mut block = v.to_be_bytes().into();
        self.cipher.decrypt_block(&mut block);
        Some(u128::from_le_bytes(block.into()))
    }

    fn channel(&self) -> String {
        format!("{}:moved", self.cfg.prefix)
    }

    /// A request saw Redis fail: note it, and let the health check look now.
    fn failed(&self, timed_out: bool) {
        if timed_out {
            self.stats.timeouts.fetch_add(1, Relaxed);
        } else {
            self.stats.errors.fetch_add(1, Relaxed);
        }
        self.suspect.notify_one();
    }

    /// Notes that `key`'s expiry in Redis is fresh until `due`; `false` when there is no
    /// room (the stamp table is full: the key's refresh waits for room).
    fn stamp(&self, key: u128, due: u64) -> bool {
        let mut s = self.shard(key);
        if s.refreshed.len() >= self.stamps_cap.load(Relaxed) && !s.refreshed.contains_key(&key) {
            return false;
        }
        s.refreshed.insert(key, due);
        true
    }

    fn queue(&self, w: Write) {
        let mut s = self.shard(w.key);
        if s.writes.len() >= MAX_QUEUED && !s.writes.contains_key(&w.key) {
            self.stats.dropped.fetch_add(1, Relaxed);
            return;
        }
        // A move queued for a key is not undone by a later refresh of it; a pin placed
        // after a queued unpin is a move (a `SET NX` would find the unpinned one).
        let mut w = w;
        if let Some(old) = s.writes.get(&w.key) {
            if old.moved && !old.forget && !w.moved && *old.backend == *w.backend {
                return;
            }
            if old.forget && !w.moved {
                w.moved = true;
            }
        }
        s.writes.insert(w.key, w);
    }

    fn open(&self) -> redis::RedisResult<redis::Client> {
        let (host, port) = self.cfg.address.rsplit_once(':').unwrap_or((&self.cfg.address, "6379"));
        let port: u16 = port.parse().unwrap_or(6379);
        let mut settings = RedisConnectionInfo::default().set_db(self.cfg.database);
        if let Some(user) = &self.cfg.user {
            settings = settings.set_username(user);
        }
        if let Some(password) = &self.cfg.password {
            settings = settings.set_password(&**password);
        }
        let host = host.trim_matches(|c| c == '[' || c == ']');
        let Some(ca) = &self.cfg.tls else {
            return redis::Client::open((host, port).into_connection_info()?.set_redis_settings(settings));
        };
        // TLS: Redis's certificate is verified for HOST (a name or an IP address), against
        // the store's CA file or the system's CAs.
        let addr = redis::ConnectionAddr::TcpTls { host: host.to_string(), port, insecure: false, tls_params: None };
        let info = addr.into_connection_info()?.set_redis_settings(settings);
        let root_cert = (!ca.is_empty()).then(|| ca.clone());
        redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls: None, root_cert })
    }
}

/// A pool's link to its store.
#[derive(Debug, Clone)]
pub struct Link {
    pub fleet: Arc<Fleet>,
    pool: Arc<str>,
    ttl_ms: u64,
    /// How often a known key's expiry in Redis is pushed back.
    refresh_ms: u64,
}

impl Link {
    /// Before `decide`: whether a table key of the request (`pins`, from
    /// [`PoolAffinity::table_pins`]) must be looked up in Redis first. Keys known here only
    /// have their refresh queued when it is due; the first known key ends the look.
    pub fn before(&self, a: &PoolAffinity, backends: &[Arc<Backend>], pins: &[Option<Pin>; 4]) -> Option<Wait> {
        let fleet = &self.fleet;
        let mut ask: Vec<Pin> = Vec::new();
        let now = fleet.now_ms();
        for pin in pins.iter().flatten() {
            let t = a.store.table(pin.kind);
            if let Some(id) = t.peek(pin.key, t.now()) {
                self.refresh(a, backends, *pin, id, now);
                break;
            }
            let mut s = fleet.shard(pin.key);
            match s.misses.get(&pin.key) {
                Some(until) if *until > now => continue,
                Some(_) => {
                    s.misses.remove(&pin.key);
                }
                None => {}
            }
            drop(s);
            ask.push(*pin);
        }
        if ask.is_empty() {
            return None;
        }
        let Some(conn) = fleet.conn.load_full().filter(|_| fleet.is_up()) else {
            fleet.stats.lookups_skipped.fetch_add(ask.len() as u64, Relaxed);
            return None;
        };
        let (fleet, store, pool, refresh_ms) = (fleet.clone(), a.store.clone(), self.pool.clone(), self.refresh_ms);
        let known: Vec<u64> = a.ids.clone();

        Some(Box::pin(async move {
            let mut pipe = redis::pipe();
            for pin in &ask {
                pipe.cmd("GET").arg(fleet.redis_key(&pool, pin.kind, pin.key));
            }
            fleet.stats.operations.fetch_add(ask.len() as u64, Relaxed);
            let mut conn = (*conn).clone();
            let start = Instant::now();
            let answer =
                tokio::time::timeout(fleet.cfg.timeout, pipe.query_async::<Vec<Option<String>>>(&mut conn)).await;
            fleet.stats.waited(start);
            let names = match answer {
                Ok(Ok(names)) => names,
                Ok(Err(_)) => return fleet.failed(false),
                Err(_) => return fleet.failed(true),
            };
            let now = fleet.now_ms();
            for (pin, name) in ask.iter().zip(names) {
                let found = name.and_then(|n| {
                    let id = hash::backend_id(&pool, &n);
                    known.contains(&id).then_some(id)
                });
                match found {
                    Some(id) => {
                        fleet.stats.lookup_hits.fetch_add(1, Relaxed);
                        let t = store.table(pin.kind);
                        t.insert(pin.key, id, t.now());
                        // Its expiry was just set by the instance that wrote it.
                        fleet.stamp(pin.key, now + refresh_ms);
                    }
                    None => {
                        fleet.stats.lookup_misses.fetch_add(1, Relaxed);
                        let mut s = fleet.shard(pin.key);
                        if s.misses.len() < MAX_REMEMBERED {
                            s.misses.insert(pin.key, now + fleet.cfg.miss_ttl.as_millis() as u64);
                        }
                    }
                }
            }
        }))
    }

    /// Queues a known key's refresh if none went out within a quarter of its idle timeout.
    fn refresh(&self, a: &PoolAffinity, backends: &[Arc<Backend>], pin: Pin, id: u64, now: u64) {
        if self.fleet.shard(pin.key).refreshed.get(&pin.key).is_some_and(|due| *due > now) {
            return;
        }
        if !self.fleet.stamp(pin.key, now + self.refresh_ms) {
            return;
        }
        let Some(i) = a.index_of(id) else { return };
        self.fleet.queue(self.write(pin, &backends[i].name, false));
    }

    fn write(&self, pin: Pin, backend: &str, moved: bool) -> Write {
        Write {
            pool: self.pool.clone(),
            kind: pin.kind,
            key: pin.key,
            backend: Arc::from(backend),
            ttl_ms: self.ttl_ms,
            moved,
            forget: false,
        }
    }

    /// Before the response head goes out: the pins this request created (placed by
    /// `decide` or `failover`, or `learned` from the response) are written to Redis,
    /// waited for within `timeout`; moved ones are told to the other instances. While
    /// Redis is down they are queued for write-back and nothing waits.
    pub fn after(&self, backends: &[Arc<Backend>], d: &Decision, learned: &[Pin], backend: usize) -> Option<Wait> {
        let placed = match (d.key, d.target, d.verdict) {
            (Some(pin), Target::Use(i), v) if v != Verdict::Hit => Some((pin, i, matches!(v, Verdict::Repin(_)))),
            _ => None,
        };
        if placed.is_none() && learned.is_empty() {
            return None;
        }
        let mut writes: Vec<Write> = Vec::new();
        if let Some((pin, i, moved)) = placed {
            writes.push(self.write(pin, &backends[i].name, moved));
        }
        writes.extend(learned.iter().map(|pin| self.write(*pin, &backends[backend].name, false)));
        let fleet = &self.fleet;
        let now = fleet.now_ms();
        for w in &mut writes {
            let mut s = fleet.shard(w.key);
            s.misses.remove(&w.key);
            // An unpin of the key still queued: this pin replaces it, told to the others.
            if s.writes.get(&w.key).is_some_and(|q| q.forget) {
                s.writes.remove(&w.key);
                w.moved = true;
            }
            drop(s);
            fleet.stamp(w.key, now + self.refresh_ms);
        }
        let Some(conn) = fleet.conn.load_full().filter(|_| fleet.is_up()) else {
            for w in writes {
                fleet.queue(w);
            }
            return None;
        };
        let fleet = fleet.clone();
        Some(Box::pin(async move {
            let mut pipe = redis::pipe();
            let mut ops = 0;
            for w in &writes {
                let key = fleet.redis_key(&w.pool, w.kind, w.key);
                if w.moved {
                    pipe.cmd("SET").arg(&key).arg(&*w.backend).arg("PX").arg(w.ttl_ms);
                    pipe.cmd("PUBLISH").arg(fleet.channel()).arg(moved_message(fleet.instance, &w.pool, w.kind, &key));
                    ops += 2;
                } else {
                    pipe.cmd("SET").arg(&key).arg(&*w.backend).arg("NX").arg("GET").arg("PX").arg(w.ttl_ms);
                    ops += 1;
                }
            }
            fleet.stats.operations.fetch_add(ops, Relaxed);
            let mut conn = (*conn).clone();
            let start = Instant::now();
            let answer = tokio::time::timeout(fleet.cfg.timeout, pipe.query_async::<Vec<Value>>(&mut conn)).await;
            fleet.stats.waited(start);
            let replies = match answer {
                Ok(Ok(replies)) => replies,
                Ok(Err(_)) | Err(_) => {
                    fleet.failed(answer.is_err());
                    for w in writes {
                        fleet.queue(w);
                    }
                    return;
                }
            };
            let mut replies = replies.into_iter();
            for w in &writes {
                if w.moved {
                    fleet.stats.moves_sent.fetch_add(1, Relaxed);
                    replies.next();
                    replies.next();
                    continue;
                }
                fleet.stats.pins_written.fetch_add(1, Relaxed);
                // `SET NX GET` answers the value already there: another instance pinned
                // the key first, and its pin wins.
                if let Some(name) = earlier_pin(replies.next()).filter(|n| **n != *w.backend) {
                    fleet.adopt(w, &name);
                }
            }
        }))
    }

    /// An unpin through the admin API: the key is deleted from Redis and every instance
    /// drops its copy. Sent from a task of its own (on the caller's runtime), or queued
    /// while Redis is down (or when sending it fails).
    pub fn forget(&self, pin: Pin) {
        let fleet = self.fleet.clone();
        let unpin = Write { forget: true, ..self.write(pin, "", true) };
        let conn = fleet.conn.load_full().filter(|_| fleet.is_up());
        let Some(conn) = conn.filter(|_| tokio::runtime::Handle::try_current().is_ok()) else {
            fleet.queue(unpin);
            return;
        };
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let key = fleet.redis_key(&pool, pin.kind, pin.key);
            let mut pipe = redis::pipe();
            pipe.cmd("DEL").arg(&key).ignore();
            pipe.cmd("PUBLISH").arg(fleet.channel()).arg(moved_message(fleet.instance, &pool, pin.kind, &key)).ignore();
            fleet.stats.operations.fetch_add(2, Relaxed);
            let mut conn = (*conn).clone();
            match tokio::time::timeout(CONTROL_TIMEOUT, pipe.query_async::<()>(&mut conn)).await {
                Ok(Ok(())) => {
                    fleet.stats.moves_sent.fetch_add(1, Relaxed);
                }
                r => {
                    fleet.failed(r.is_err());
                    fleet.queue(unpin);
                }
            }
        });
    }
}

/// `INSTANCE POOL KIND KEY`: a pin moved or forgotten.
fn moved_message(instance: u64, pool: &str, kind: PinKind, key: &str) -> String {
    format!("{instance:016x} {pool} {} {}", kind.name(), key.rsplit(':').next().unwrap_or(""))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn rand_bytes() -> [u8; 8] {
    let mut b = [0u8; 8];
    // A failed draw leaves zeros: the instance id only tells own messages from others'.
    let _ = getrandom::fill(&mut b);
    b
}

/// Waits `d`, or less when the fleet is dropped; `false` then.
async fn pause(stopped: &mut tokio::sync::watch::Receiver<()>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        r = stopped.changed() => r.is_ok(),
    }
}

/// Connects, checks Redis once a second (at once when a request saw it fail), and
/// reconnects with backoff; logs each change of state once.
async fn keep_connected(fleet: Weak<Fleet>, mut stopped: tokio::sync::watch::Receiver<()>) {
    let mut backoff = BACKOFF_MIN;
    let mut was_up: Option<bool> = None;
    loop {
        let Some(f) = fleet.upgrade() else { return };
        let up = match f.conn.load_full() {
            Some(conn) => {
                let mut conn = (*conn).clone();
                let ping = redis::cmd("PING");
                let up = matches!(
                    tokio::time::timeout(CONTROL_TIMEOUT, ping.query_async::<String>(&mut conn)).await,
                    Ok(Ok(_))
                );
                if up {
                    f.heartbeat(&mut conn).await;
                }
                up
            }
            None => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONTROL_TIMEOUT))
                    .set_response_timeout(Some(CONTROL_TIMEOUT));
                let connected = match f.open() {
                    Ok(client) => client.get_multiplexed_async_connection_with_config(&config).await,
                    Err(e) => Err(e),
                };
                match connected {
                    Ok(mut conn) => {
                        f.heartbeat(&mut conn).await;
                        f.conn.store(Some(Arc::new(conn)));
                        true
                    }
                    Err(e) => {
                        if was_up != Some(false) {
                            tracing::warn!(
                                "store {}: Redis at {} is down: {e}; serving from the local tables",
                                f.cfg.name,
                                f.cfg.address
                            );
                        }
                        false
                    }
                }
            }
        };
        if !up {
            f.conn.store(None);
        }
        f.up.store(up, Relaxed);
        if up && was_up != Some(true) {
            tracing::info!("store {}: Redis at {} is up", f.cfg.name, f.cfg.address);
            backoff = BACKOFF_MIN;
            // What was learned meanwhile goes out now.
            flush(&f).await;
        } else if !up && was_up == Some(true) {
            tracing::warn!(
                "store {}: Redis at {} stopped answering; serving from the local tables",
                f.cfg.name,
                f.cfg.address
            );
        }
        was_up = Some(up);
        let wait = if up { Duration::from_secs(1) } else { backoff };
        if !up {
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        let suspect = f.suspect.clone();
        drop(f);
        tokio::select! {
            _ = suspect.notified() => {}
            go_on = pause(&mut stopped, wait) => if !go_on { return },
        }
    }
}

/// Refreshes and write-backs go out every `flush_interval`, as one pipeline.
async fn flush_regularly(fleet: Weak<Fleet>, mut stopped: tokio::sync::watch::Receiver<()>) {
    loop {
        let Some(f) = fleet.upgrade() else { return };
        let every = f.cfg.flush_interval;
        if f.is_up() {
            flush(&f).await;
        }
        f.sweep();
        drop(f);
        if !pause(&mut stopped, every).await {
            return;
        }
    }
}

impl Fleet {
    /// Forgets refresh stamps and misses whose time is over.
    fn sweep(&self) {
        let now = self.now_ms();
        for s in &self.shards {
            let mut s = lock(s);
            s.refreshed.retain(|_, due| *due > now);
            s.misses.retain(|_, until| *until > now);
        }
    }
}

/// Sends the queued writes: a pin that fills a gap with `SET NX GET` and its expiry pushed
/// back with `PEXPIRE` (so a refresh also restores a key Redis lost), a move with `SET`
/// and its message. A pin that finds another instance's already there adopts it (the
/// first pin wins, also for what was learned while Redis was away). On failure the writes
/// are queued again.
async fn flush(f: &Arc<Fleet>) {
    let Some(conn) = f.conn.load_full() else { return };
    f.flush_seen(&conn).await;
    // At most MAX_PER_FLUSH writes a flush: what Redis gets from one instance is bounded
    // (16,384 writes a second at the default interval); the rest waits for the next.
    let mut writes = Vec::new();
    for s in &f.shards {
        let mut s = lock(s);
        let keys: Vec<u128> = s.writes.keys().take(MAX_PER_FLUSH / SHARDS).copied().collect();
        writes.extend(keys.iter().filter_map(|k| s.writes.remove(k)));
    }
    if writes.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    let mut ops = 0;
    for w in &writes {
        let key = f.redis_key(&w.pool, w.kind, w.key);
        if w.forget {
            pipe.cmd("DEL").arg(&key).ignore();
            pipe.cmd("PUBLISH").arg(f.channel()).arg(moved_message(f.instance, &w.pool, w.kind, &key)).ignore();
        } else if w.moved {
            pipe.cmd("SET").arg(&key).arg(&*w.backend).arg("PX").arg(w.ttl_ms).ignore();
            pipe.cmd("PUBLISH").arg(f.channel()).arg(moved_message(f.instance, &w.pool, w.kind, &key)).ignore();
        } else {
            pipe.cmd("SET").arg(&key).arg(&*w.backend).arg("NX").arg("GET").arg("PX").arg(w.ttl_ms);
            pipe.cmd("PEXPIRE").arg(&key).arg(w.ttl_ms).ignore();
        }
        ops += 2;
    }
    f.stats.operations.fetch_add(ops, Relaxed);
    let mut conn = (*conn).clone();
    match tokio::time::timeout(CONTROL_TIMEOUT, pipe.query_async::<Vec<Value>>(&mut conn)).await {
        Ok(Ok(replies)) => {
            f.stats.flushed.fetch_add(writes.len() as u64, Relaxed);
            let mut replies = replies.into_iter();
            for w in writes.iter().filter(|w| !w.moved) {
                if let Some(name) = earlier_pin(replies.next()).filter(|n| **n != *w.backend) {
                    f.adopt(w, &name);
                }
            }
        }
        r => {
            f.failed(r.is_err());
            for w in writes {
                f.queue(w);
            }
        }
    }
}

/// The backend name a `SET NX GET` found already set, if any.
fn earlier_pin(reply: Option<Value>) -> Option<String> {
    match reply {
        Some(Value::BulkString(b)) => String::from_utf8(b).ok(),
        Some(Value::SimpleString(s)) => Some(s),
        _ => None,
    }
}

impl Fleet {
    /// Another instance's pin for `w`'s key came first: it replaces the local one. A name
    /// this pool does not have is taken as its identity anyway; `decide` sees a removed
    /// backend and places the session anew.
    fn adopt(&self, w: &Write, name: &str) {
        let Some(store) = lock(&self.pools).get(&*w.pool).and_then(Weak::upgrade) else { return };
        self.stats.pins_lost.fetch_add(1, Relaxed);
        let t = store.table(w.kind);
        t.insert(w.key, hash::backend_id(&w.pool, name), t.now());
    }
}

/// Listens on `PREFIX:moved` and drops the local copy of each pin another instance moved
/// or forgot; reconnects with backoff.
async fn listen_for_moves(fleet: Weak<Fleet>, mut stopped: tokio::sync::watch::Receiver<()>) {
    use futures_util::StreamExt;
    let mut backoff = BACKOFF_MIN;
    loop {
        let Some(f) = fleet.upgrade() else { return };
        let (channel, admin) = (f.channel(), f.admin_channel());
        let subscribed = async {
            let client = f.open()?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            pubsub.subscribe(&admin).await?;
            redis::RedisResult::Ok(pubsub)
        };
        let pubsub = tokio::time::timeout(CONTROL_TIMEOUT, subscribed).await;
        if let Ok(Ok(pubsub)) = pubsub {
            backoff = BACKOFF_MIN;
            // Changes made while this instance was not listening are read now.
            f.admin_changed.notify_one();
            drop(f);
            let mut messages = pubsub.into_on_message();
            loop {
                let msg = tokio::select! {
                    m = messages.next() => m,
                    r = stopped.changed() => if r.is_err() { return } else { continue },
                };
                let Some(msg) = msg else { break };
                let Some(f) = fleet.upgrade() else { return };
                if msg.get_channel_name() == admin {
                    // From another instance (each message names its sender).
                    if msg.get_payload_bytes() != f.instance_id().as_bytes() {
                        f.admin_changed.notify_one();
                    }
                } else {
                    f.moved(msg.get_payload_bytes());
                }
            }
        } else {
            drop(f);
        }
        if !pause(&mut stopped, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

impl Fleet {
    /// A `moved` message: another instance's pin for the key changed; the local copy goes
    /// (the next request looks the key up again).
    fn moved(&self, payload: &[u8]) {
        let Ok(text) = std::str::from_utf8(payload) else { return };
        let mut parts = text.split(' ');
        let (Some(instance), Some(pool), Some(kind), Some(hex), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        if u64::from_str_radix(instance, 16).ok() == Some(self.instance) {
            return;
        }
        let (Some(kind), Some(key)) = (PinKind::named(kind), self.pin_of_hex(hex)) else { return };
        let store = lock(&self.pools).get(pool).and_then(Weak::upgrade);
        if let Some(store) = store {
            self.stats.moves_received.fetch_add(1, Relaxed);
            store.table(kind).remove(key);
            let mut s = self.shard(key);
            s.misses.remove(&key);
            s.refreshed.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Arc<Fleet> {
        let cfg = config::Store {
            name: "s".into(),
            address: "127.0.0.1:1".into(),
            tls: None,
            user: None,
            password: None,
            database: 0,
            prefix: "t".into(),
            key: config::Secret::new("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="),
            timeout: Duration::from_millis(25),
            flush_interval: Duration::from_millis(250),
            miss_ttl: Duration::from_secs(2),
        };
        Fleet::start(&cfg)
    }

    #[test]
    fn redis_keys_hide_the_pin_and_come_back_to_it() {
        let f = fleet();
        let pin = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210u128;
        let key = f.redis_key("web", PinKind::Header, pin);
        assert!(key.starts_with("t:web:header:"), "{key}");
        let hex = key.rsplit(':').next().unwrap();
        assert_eq!(hex.len(), 32);
        assert!(!hex.contains("0123456789abcdef") && !hex.contains("fedcba9876543210"), "{hex}");
        assert_eq!(f.pin_of_hex(hex), Some(pin));
        assert_eq!(f.pin_of_hex("zz"), None);
        assert_eq!(f.pin_of_hex(&hex[1..]), None);
    }

    #[test]
    fn the_write_queue_and_the_refresh_stamps_are_bounded() {
        let f = fleet();
        let write = |key: u128, moved: bool| Write {
            pool: Arc::from("web"),
            kind: PinKind::Header,
            key,
            backend: Arc::from("a"),
            ttl_ms: 1000,
            moved,
            forget: false,
        };
        // Keys of one shard (the shard is the key modulo SHARDS).
        for i in 0..=MAX_QUEUED as u128 {
            f.queue(write(i * SHARDS as u128, false));
        }
        assert_eq!(f.queued(), MAX_QUEUED);
        assert_eq!(f.stats.dropped.load(Relaxed), 1);
        // A key already queued is updated in place, even when full; a refresh does not undo
        // a queued move.
        f.queue(write(0, true));
        f.queue(write(0, false));
        assert!(f.shard(0).writes[&0].moved);
        assert_eq!(f.stats.dropped.load(Relaxed), 1);
        // A pin placed after a queued unpin goes out as a move.
        f.queue(Write { forget: true, ..write(16, true) });
        f.queue(write(16, false));
        let w = f.shard(16).writes[&16].clone();
        assert!(w.moved && !w.forget, "{w:?}");
        let cap = f.stamps_cap.load(Relaxed);
        for i in 0..cap as u128 {
            assert!(f.stamp(i * SHARDS as u128, 1));
        }
        assert!(!f.stamp(cap as u128 * SHARDS as u128, 1));
        assert!(f.stamp(0, 2), "a key with a stamp gets a new one");
    }

    #[test]
    fn moved_messages_that_do_not_parse_change_nothing() {
        let f = fleet();
        for bad in [&b""[..], b"x", b"\xff\xfe", b"1 web header", b"1 web nokind 00", b"1 web header 00 extra"] {
            f.moved(bad);
        }
        assert_eq!(f.stats.moves_received.load(Relaxed), 0);
    }
}

//! Session persistence: which backend a request's session belongs to.
//!
//! The building blocks know nothing of sockets or hyper: [`token`] seals Tether's cookie,
//! [`stick_table`] remembers learned keys, [`maglev`] hashes keys to backends consistently,
//! [`hash`] gives every instance the same fixed-seed hashes, [`cookies`] reads and writes
//! cookie headers, [`verdict`] names what became of a session. This module puts them
//! together into one decision per request ([`PoolAffinity::decide`]), one move when the
//! chosen backend fails ([`PoolAffinity::failover`]) and one step per response
//! ([`PoolAffinity::learn`]). It works on a pool's [`Group`] of backends, not on the pool,
//! so it can be tested with a few backends and no config file; [`explain`] answers the
//! admin API's "where does this key go". In a pool that rebalances, `decide` also moves an
//! idle session off a backend holding more than its share ([`rebalance`] knows which
//! sessions are idle, and bounds the rate).
//!
//! What must outlive a config snapshot (the stick table, the table of live token
//! sessions) is a [`Store`], carried from snapshot to snapshot by pool name.

pub(crate) mod cookies;
pub(crate) mod explain;
pub mod hash;
pub mod keys;
pub(crate) mod maglev;
pub mod rebalance;
pub mod stick_table;
pub mod token;
pub mod verdict;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::HeaderMap;

use crate::backend::{Backend, Group};
use crate::config::{self, AdminState, KeySource, Mapping, OnUnavailable};
use cookies::CookieAttrs;
pub use keys::{H1Keys, HttpKeys, RequestKeys};
use maglev::Maglev;
use rebalance::{Active, Rebalancer};
use stick_table::StickTable;
use token::{KeyRing, Token, TokenString, Version};
use verdict::{Reason, Verdict};

/// A pool's persistence state that survives reloads.
///
/// Every kind of table-mapped key has a pin table of its own, each with the configured
/// capacity: application session ids learned from backends, and header, query and
/// client-IP keys taken at first sight. Clients sending new keys of one kind cannot crowd
/// out the pins of another, and within a table the admission rule keeps one-off keys from
/// pushing out established ones.
#[derive(Debug)]
pub struct Store {
    /// By [`PinKind`].
    pins: [StickTable; PinKind::ALL.len()],
    /// Token sessions seen within the cookie idle timeout, to count sessions per backend.
    pub sessions: StickTable,
}

/// The kinds of key that are pinned in a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinKind {
    /// An application's session id, learned from its `Set-Cookie`.
    AppCookie,
    Header,
    Query,
    ClientIp,
}

impl PinKind {
    pub const ALL: [PinKind; 4] = [PinKind::AppCookie, PinKind::Header, PinKind::Query, PinKind::ClientIp];

    /// Its table's name (as in [`Store::TABLES`]).
    pub fn name(self) -> &'static str {
        Store::TABLES[self as usize]
    }

    /// The kind whose table is named `name`.
    pub fn named(name: &str) -> Option<PinKind> {
        PinKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The table kind of a key source, if it is ever table-mapped.
    fn of(key: &KeySource) -> Option<PinKind> {
        match key {
            KeySource::Cookie => None,
            KeySource::AppCookie(_) => Some(PinKind::AppCookie),
            KeySource::Header(_) => Some(PinKind::Header),
            KeySource::Query(_) => Some(PinKind::Query),
            KeySource::ClientIp => Some(PinKind::ClientIp),
        }
    }
}

/// A key in one of a pool's pin tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    pub key: u128,
    pub kind: PinKind,
}

impl Store {
    fn new(cfg: &config::Affinity) -> Store {
        // With history: a warm restart imports entries last seen before the table was
        // made, with the idle time they have left (`warm`).
        Store::with_tables(cfg, |_, capacity, idle| StickTable::with_history(capacity, idle, 16))
    }

    /// The store [`new`](Self::new) makes, on `clock` and with table seeds derived from
    /// `seed`: the simulator's, whose time is simulated and whose runs repeat exactly.
    pub fn simulated(cfg: &config::Affinity, clock: &stick_table::Clock, seed: u64) -> Store {
        Store::with_tables(cfg, |i, capacity, idle| {
            StickTable::with_clock(capacity, idle, 16, clock.clone(), seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        })
    }

    /// The four pin tables and the token session table, sized by `cfg`; `table(i,
    /// capacity, idle_timeout)` makes the `i`-th (1 to 4 the pin tables, 5 the sessions).
    fn with_tables(cfg: &config::Affinity, table: impl Fn(u64, usize, Duration) -> StickTable) -> Store {
        Store {
            pins: [1, 2, 3, 4].map(|i| table(i, cfg.table.capacity, cfg.table.idle_timeout)),
            sessions: table(5, cfg.table.capacity.max(100_000), cfg.cookie.idle_timeout),
        }
    }

    /// The table a kind of key is pinned in.
    pub fn table(&self, kind: PinKind) -> &StickTable {
        &self.pins[kind as usize]
    }

    fn insert(&self, pin: Pin, backend: u64) {
        let t = self.table(pin.kind);
        t.insert(pin.key, backend, t.now());
    }

    /// The counters of all pin tables together.
    pub fn pin_stats(&self) -> stick_table::StickStats {
        let mut sum = stick_table::StickStats::default();
        for t in &self.pins {
            sum += t.stats();
        }
        sum
    }

    /// A store with `cfg`'s table settings that starts with `old`'s pins and sessions (a
    /// smaller capacity keeps the most recently used; idle clocks start again).
    fn carried_over(old: &Store, cfg: &config::Affinity) -> Store {
        let new = Store::new(cfg);
        for (from, to) in old.pins.iter().zip(&new.pins) {
            from.copy_into(to);
        }
        old.sessions.copy_into(&new.sessions);
        tracing::info!(
            "affinity: table settings changed; {} pins and {} sessions carried over",
            new.pin_stats().entries,
            new.sessions.len()
        );
        new
    }

    /// The names of the store's tables, as [`export`](Self::export) and
    /// [`table_named`](Self::table_named) know them: the pin tables by kind, then the token
    /// sessions.
    pub const TABLES: [&'static str; 5] = ["app_cookie", "header", "query", "client_ip", "sessions"];

    /// A table by its name in [`TABLES`](Self::TABLES).
    pub fn table_named(&self, name: &str) -> Option<&StickTable> {
        let i = Self::TABLES.iter().position(|t| *t == name)?;
        Some(self.pins.get(i).unwrap_or(&self.sessions))
    }

    /// Every table's live entries by table name (see [`StickTable::export`]): what a warm
    /// restart saves. Empty tables are left out.
    pub fn export(&self) -> Vec<(&'static str, Vec<stick_table::Exported>)> {
        Self::TABLES
            .iter()
            .filter_map(|name| {
                let entries = self.table_named(name)?.export();
                (!entries.is_empty()).then_some((*name, entries))
            })
            .collect()
    }

    /// Drops expired entries and returns the live sessions per backend identity.
    fn sweep(&self) -> HashMap<u64, usize> {
        let mut counts = HashMap::new();
        for t in self.pins.iter().chain([&self.sessions]) {
            t.sweep(t.now());
            for (b, n) in t.sessions_per_backend() {
                *counts.entry(b).or_insert(0) += n;
            }
        }
        counts
    }
}

/// A pool's affinity as one snapshot sees it.
#[derive(Debug)]
pub struct PoolAffinity {
    pub cfg: config::Affinity,
    pub store: Arc<Store>,
    /// `Some` exactly when the key chain has `cookie`.
    keyring: Option<Arc<KeyRing>>,
    pool: Arc<str>,
    /// [`pool_id`] of `pool`: what version 2 tokens record.
    pool_id: u64,
    /// The token version this pool issues (it opens every version).
    issue_version: Version,
    /// Backend identity hashes, by backend index.
    pub ids: Vec<u64>,
    by_id: IdIndex,
    maglev: Option<Maglev>,
    attrs: CookieAttrs,
    /// `Some` exactly when `cfg.rebalance` is: the sessions' activity and the move budget,
    /// carried from the previous snapshot while it had rebalancing on.
    rebalancer: Option<Arc<Rebalancer>>,
}

/// Backend indexes by identity hash, for the lookup every hit makes: a sorted list
/// searched by halves. A pool has from a few backends to a few hundred; std's `HashMap`
/// (SipHash) cost about 20 ns a lookup, this a few.
#[derive(Debug)]
struct IdIndex(Box<[(u64, usize)]>);

impl IdIndex {
    fn new(ids: &[u64]) -> IdIndex {
        let mut v: Vec<(u64, usize)> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        v.sort_unstable();
        IdIndex(v.into())
    }

    fn get(&self, id: &u64) -> Option<&usize> {
        let at = self.0.binary_search_by_key(id, |e| e.0).ok()?;
        Some(&self.0[at].1)
    }
}

/// The decision for one request: where it goes and what that does to its session.
#[derive(Debug)]
pub struct Decision {
    pub target: Target,
    pub verdict: Verdict,
    /// A token to set on the response.
    pub issue: Option<Token>,
    /// The session id of a token session, kept when the session moves.
    pub session: Option<[u8; 16]>,
    /// The pin of a table session, re-pointed when the session moves.
    pub key: Option<Pin>,
    /// The hash of a hashed key, to find the next backend when the session moves.
    pub hash: Option<u64>,
}

/// What the request must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Go to this backend (by index in the group). The verdict says whether the session
    /// stayed, is new, or moved here (and why).
    Use(usize),
    /// The session's backend cannot serve it and the pool is `strict`: refuse.
    Strict(Reason),
    /// No backend can take the request.
    NoBackend,
}

impl Decision {
    /// What identifies the request's session, as 16 bytes for the access log's pseudonym
    /// (`AccessLog::pseudonym`): the session id of Tether's token (the one the request
    /// carried, or the one issued to it), else the hash of its table key (which names the
    /// pool, the key's kind and value), else its hashed key's hash (tagged, so it is never
    /// read as the others). `None` for a request of no session.
    pub fn identity(&self) -> Option<[u8; 16]> {
        if let Some(s) = self.issue.as_ref().map(|t| t.session).or(self.session) {
            return Some(s);
        }
        if let Some(pin) = self.key {
            return Some(pin.key.to_le_bytes());
        }
        let h = self.hash?;
        let mut id = [0xffu8; 16];
        id[..8].copy_from_slice(&h.to_le_bytes());
        Some(id)
    }

    /// A request of a pool without affinity, placed by the balancer.
    pub fn plain(backend: Option<usize>) -> Decision {
        Decision::to(backend.map_or(Target::NoBackend, Target::Use), Verdict::Off)
    }

    fn to(target: Target, verdict: Verdict) -> Decision {
        Decision { target, verdict, issue: None, session: None, key: None, hash: None }
    }

    fn refused(reason: Reason) -> Decision {
        Decision::to(Target::Strict(reason), Verdict::Repin(reason))
    }

    /// The backend to use, if any.
    pub fn backend(&self) -> Option<usize> {
        match self.target {
            Target::Use(i) => Some(i),
            _ => None,
        }
    }
}

/// A request [`PoolAffinity::begin_at`] counted in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Began {
    id: u128,
    recorded: bool,
}

/// The identity rebalancing tracks a decided session by: its token's session id or its
/// table key (as [`Decision::identity`] gives them); `None` for a hashed key or no session.
fn pinned_identity(d: &Decision) -> Option<u128> {
    let id = d.issue.as_ref().map(|t| t.session).or(d.session).or(d.key.map(|pin| pin.key.to_le_bytes()))?;
    Some(u128::from_le_bytes(id))
}

/// The key ring used when a pool configures none: made once per process.
fn generated_ring() -> Arc<KeyRing> {
    static RING: OnceLock<Arc<KeyRing>> = OnceLock::new();
    RING.get_or_init(|| {
        tracing::warn!(
            "affinity: no cookie keys configured, generated one for this process; sessions will not survive a \
             restart and instances will not recognise each other's cookies: set cookie.keys in every pool that uses cookies"
        );
        Arc::new(KeyRing::generate().expect("the system random source works"))
    })
    .clone()
}

/// The identity a version 2 token records for the pool named `pool`: a fixed-seed hash of
/// the name, so every instance agrees; never 0, which a token uses for "no pool".
pub fn pool_id(pool: &str) -> u64 {
    hash::key_hash(pool, "pool", b"").max(1)
}

fn secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}

impl PoolAffinity {
    /// Builds the pool's affinity for a snapshot, keeping `previous` state when given.
    /// `members` are the pool's backends (name, weight) in order.
    pub fn build(
        pool: &str,
        members: &[(&str, u32)],
        cfg: &config::Affinity,
        previous: Option<&PoolAffinity>,
    ) -> PoolAffinity {
        let store = match previous {
            Some(p) if p.cfg.table == cfg.table && p.cfg.cookie.idle_timeout == cfg.cookie.idle_timeout => {
                p.store.clone()
            }
            // New table settings: new tables, holding what the old ones had learned.
            Some(p) => Arc::new(Store::carried_over(&p.store, cfg)),
            None => Arc::new(Store::new(cfg)),
        };
        // Only pools with a cookie key seal or open tokens.
        let keyring = cfg.keys.contains(&KeySource::Cookie).then(|| {
            if cfg.cookie.keys.is_empty() {
                generated_ring()
            } else {
                Arc::new(KeyRing::from_base64(&cfg.cookie.keys).expect("keys were checked by config"))
            }
        });
        let ids: Vec<u64> = members.iter().map(|(name, _)| hash::backend_id(pool, name)).collect();
        let by_id = IdIndex::new(&ids);
        let hashed = cfg.mapping == Mapping::Hash
            && cfg.keys.iter().any(|k| matches!(k, KeySource::Header(_) | KeySource::Query(_) | KeySource::ClientIp));
        let maglev = hashed.then(|| {
            let weighted: Vec<(u64, u32)> = ids.iter().zip(members).map(|(id, (_, w))| (*id, *w)).collect();
            Maglev::new(&weighted)
        });
        let c = &cfg.cookie;
        let attrs = CookieAttrs {
            name: c.name.clone(),
            domain: c.domain.clone(),
            path: c.path.clone(),
            same_site: c.same_site,
            // No TLS listeners yet: Secure only when asked for.
            secure: c.secure.unwrap_or(false),
            http_only: c.http_only,
            max_age: c.max_age.map(|d| d.as_secs()),
        };
        let rebalancer = cfg.rebalance.map(|_| {
            match previous.and_then(|p| p.rebalancer.clone()) {
                Some(r) => r,
                // As many sessions as the token session table holds.
                None => Arc::new(Rebalancer::new(cfg.table.capacity.max(100_000))),
            }
        });
        PoolAffinity {
            cfg: cfg.clone(),
            store,
            keyring,
            pool: Arc::from(pool),
            pool_id: pool_id(pool),
            issue_version: c.token_version,
            ids,
            by_id,
            maglev,
            attrs,
            rebalancer,
        }
    }

    pub fn cookie_name(&self) -> Option<&str> {
        self.keyring.is_some().then_some(self.attrs.name.as_str())
    }

    fn strict(&self) -> bool {
        self.cfg.on_unavailable == OnUnavailable::Strict
    }

    /// Whether the backend with identity `id` may keep serving its sessions.
    fn available(&self, backends: &[Arc<Backend>], id: u64, now_ms: u64) -> Result<usize, Reason> {
        let &i = self.by_id.get(&id).ok_or(Reason::Removed)?;
        let b = &backends[i];
        if !b.is_healthy() {
            return Err(Reason::Down);
        }
        match b.admin_state() {
            AdminState::Disabled => Err(Reason::Disabled),
            AdminState::Draining => match self.cfg.drain_timeout {
                Some(t) if b.drain_over(t, now_ms) => Err(Reason::Drained),
                _ => Ok(i),
            },
            AdminState::Enabled => Ok(i),
        }
    }

    /// Decides where a request goes: the first key of the chain that the request carries
    /// and that leads somewhere decides. `now_ms` is wall-clock Unix milliseconds.
    ///
    /// `request` is what the chain reads of the request: [`HttpKeys`] for a request
    /// hyper parsed, [`H1Keys`] for a head of Tether's own codec.
    pub fn decide<R: RequestKeys + ?Sized>(
        &self,
        group: &Group<'_>,
        request: &R,
        client_ip: IpAddr,
        now_ms: u64,
    ) -> Decision {
        // Why a session is new: no key, or a token that was refused on the way.
        let mut why_new = Verdict::New;
        for key in &self.cfg.keys {
            // `None`: the request does not carry this key, or carries a token that does
            // not open or has expired; the next key decides.
            let decided = match key {
                KeySource::Cookie => self.by_token(group, request, now_ms, &mut why_new),
                KeySource::AppCookie(name) => self.by_app_cookie(group, request, name, now_ms),
                _ => self.by_key(group, key, request, client_ip, why_new, now_ms),
            };
            if let Some(d) = decided {
                return d;
            }
        }
        self.place(group, why_new, None, None, now_ms)
    }

    /// The session's backend cannot serve it now: a strict pool refuses; otherwise the
    /// session is placed anew, keeping its token session id or re-pointing its table key.
    fn gone(
        &self,
        group: &Group<'_>,
        reason: Reason,
        session: Option<[u8; 16]>,
        learn: Option<Pin>,
        now_ms: u64,
    ) -> Decision {
        if self.strict() {
            return Decision::refused(reason);
        }
        self.place(group, Verdict::Repin(reason), session, learn, now_ms)
    }

    /// Tether's own cookie: a token that opens and has not expired pins the session.
    ///
    /// A version 2 token records the pool its session belongs to; one whose pool is not
    /// this one counts as absent, like a token that does not open (verdict `invalid`).
    /// Version 1 tokens record no pool and are taken as this pool's. (A traffic split
    /// routes by the recorded pool before this runs: `split`.)
    ///
    /// The three key lookups stay out of line: inlined into `decide`, their loop-invariant
    /// setup (IP masks, timeout divisions) is hoisted above the key loop and paid on every
    /// request, whichever key it carries (callgrind: +2% to +20% instructions per decide).
    #[inline(never)]
    fn by_token<R: RequestKeys + ?Sized>(
        &self,
        group: &Group<'_>,
        request: &R,
        now_ms: u64,
        why_new: &mut Verdict,
    ) -> Option<Decision> {
        let (value, ring) = (request.cookie(&self.attrs.name)?, self.keyring.as_ref()?);
        let token = match ring.open(value) {
            Ok(t) if t.pool.is_none_or(|p| p == self.pool_id) => t,
            _ => {
                *why_new = Verdict::Invalid;
                return None;
            }
        };
        let (now, c) = (now_ms / 1000, &self.cfg.cookie);
        if token.check(now, secs(c.idle_timeout), c.absolute_timeout.map(secs), c.clock_skew.as_secs()).is_err() {
            *why_new = Verdict::Expired;
            return None;
        }
        match self.available(group.backends, token.backend, now_ms) {
            Ok(i) => {
                if let Some(j) = self.rebalanced(group, i, u128::from_le_bytes(token.session), now_ms) {
                    let issue = self.issue_token(self.ids[j], now_ms, Some(token.session));
                    let moved = Decision::to(Target::Use(j), Verdict::Repin(Reason::Rebalance));
                    return Some(Decision { issue, session: Some(token.session), ..moved });
                }
                self.track(&token);
                // Refresh the idle stamp once a quarter of the idle timeout has passed,
                // so a busy client does not get a Set-Cookie on every response.
                let stale = now.saturating_sub(token.last_seen) > secs(c.idle_timeout) / 4;
                let issue = stale.then_some(Token { last_seen: now, pool: Some(self.pool_id), ..token });
                let hit = Decision::to(Target::Use(i), Verdict::Hit);
                Some(Decision { issue, session: Some(token.session), ..hit })
            }
            Err(reason) => Some(self.gone(group, reason, Some(token.session), None, now_ms)),
        }
    }

    /// The application's session id, learned from its `Set-Cookie`. An id this table has
    /// not learned (yet) says nothing: later keys may know the client.
    #[inline(never)]
    fn by_app_cookie<R: RequestKeys + ?Sized>(
        &self,
        group: &Group<'_>,
        request: &R,
        name: &str,
        now_ms: u64,
    ) -> Option<Decision> {
        let value = app_session(request, name)?;
        let k = Pin { key: hash::key_hash128(&self.pool, "app_cookie", value.as_bytes()), kind: PinKind::AppCookie };
        match self.lookup_table(group.backends, k, now_ms)? {
            Ok(i) => Some(self.table_hit(group, i, k, now_ms)),
            Err(reason) => Some(self.gone(group, reason, None, Some(k), now_ms)),
        }
    }

    /// A header, query parameter or client address: hashed with Maglev, or mapped in the
    /// stick table (where a key seen for the first time is learned at placement, with the
    /// verdict `why_new`).
    #[inline(never)]
    fn by_key<R: RequestKeys + ?Sized>(
        &self,
        group: &Group<'_>,
        key: &KeySource,
        request: &R,
        client_ip: IpAddr,
        why_new: Verdict,
        now_ms: u64,
    ) -> Option<Decision> {
        let mut ip_buf = [0u8; 16];
        let value: &[u8] = match key {
            KeySource::Header(name) => match request.header(name) {
                Some(v) if !v.is_empty() => v,
                _ => return None,
            },
            KeySource::Query(name) => match request.query().and_then(|q| cookies::find_query_param(q, name)) {
                Some(v) if !v.is_empty() => v.as_bytes(),
                _ => return None,
            },
            _ => masked_ip(client_ip, self.cfg.ipv4_prefix, self.cfg.ipv6_prefix, &mut ip_buf),
        };
        if let Some(m) = &self.maglev {
            return Some(self.hashed(group.backends, m, hash::key_hash(&self.pool, key.kind(), value), now_ms));
        }
        let kind = PinKind::of(key).expect("by_key is for header, query and client-IP keys");
        let k = Pin { key: hash::key_hash128(&self.pool, key.kind(), value), kind };
        Some(match self.lookup_table(group.backends, k, now_ms) {
            Some(Ok(i)) => self.table_hit(group, i, k, now_ms),
            Some(Err(reason)) => self.gone(group, reason, None, Some(k), now_ms),
            // Seen for the first time: placed, and learned.
            None => self.place(group, why_new, None, Some(k), now_ms),
        })
    }

    /// A table key found pinned to backend `i`, which can serve it: a hit, or a move when
    /// rebalancing moves it.
    fn table_hit(&self, group: &Group<'_>, i: usize, k: Pin, now_ms: u64) -> Decision {
        if let Some(j) = self.rebalanced(group, i, k.key, now_ms) {
            self.store.insert(k, self.ids[j]);
            return Decision { key: Some(k), ..Decision::to(Target::Use(j), Verdict::Repin(Reason::Rebalance)) };
        }
        Decision { key: Some(k), ..Decision::to(Target::Use(i), Verdict::Hit) }
    }

    /// Where session `session`, found on backend `from` (which can serve it), moves when
    /// the pool rebalances and all of this holds: `from` is enabled and holds more than
    /// `factor` times the mean of the sessions of backends that take new sessions; another
    /// such backend would hold no more than the mean with one more (the least loaded is
    /// chosen); the session is idle (nothing in flight, no request within `idle`); and the
    /// pool's move budget has a token. The session counts follow at once, so moves stop as
    /// soon as the factor holds, without waiting for the next recount.
    fn rebalanced(&self, group: &Group<'_>, from: usize, session: u128, now_ms: u64) -> Option<usize> {
        let rb = self.rebalancer.as_ref()?;
        let r = self.cfg.rebalance.as_ref()?;
        let backends = group.backends;
        if backends[from].admin_state() != AdminState::Enabled {
            return None;
        }
        let (mut total, mut eligible, mut least) = (0u64, 0u64, None::<(u32, usize)>);
        for (i, b) in backends.iter().enumerate().filter(|(_, b)| b.accepts_new()) {
            let n = b.sessions();
            total += u64::from(n);
            eligible += 1;
            if i != from && least.is_none_or(|(m, _)| n < m) {
                least = Some((n, i));
            }
        }
        let mean = total as f64 / eligible.max(1) as f64;
        let (least_sessions, to) = least?;
        if f64::from(backends[from].sessions()) <= r.factor * mean || f64::from(least_sessions) + 1.0 > mean {
            return None;
        }
        let idle_ms = rb.activity.idle_for(session, now_ms, r.idle)?;
        if !rb.bucket.take(r.max_per_second, now_ms) {
            return None;
        }
        backends[from].remove_session();
        backends[to].add_session();
        if rb.may_log(now_ms) {
            tracing::info!(
                pool = %self.pool,
                from = %backends[from].name,
                to = %backends[to].name,
                "affinity: rebalance: moved a session idle for {:.1}s from a backend holding {} sessions (mean {mean:.1})",
                idle_ms as f64 / 1000.0,
                backends[from].sessions() + 1,
            );
        }
        Some(to)
    }

    /// Counts a request of the decided session in flight, until the guard drops, when the
    /// pool rebalances (so that an active session is never moved); `None` otherwise, at the
    /// cost of one branch. Sessions of hashed keys are not tracked: they never move.
    pub fn begin(&self, d: &Decision, now_ms: u64) -> Option<Active> {
        let (r, rb) = (self.cfg.rebalance.as_ref()?, self.rebalancer.as_ref()?);
        Some(Active::begin(&rb.activity, pinned_identity(d)?, now_ms, r.idle))
    }

    /// [`begin`](Self::begin) without a guard, for the simulator, whose time is simulated:
    /// give the answer back to [`end_at`](Self::end_at) when the request ends.
    pub fn begin_at(&self, d: &Decision, now_ms: u64) -> Option<Began> {
        let (r, rb) = (self.cfg.rebalance.as_ref()?, self.rebalancer.as_ref()?);
        let id = pinned_identity(d)?;
        Some(Began { id, recorded: rb.activity.begin(id, now_ms, r.idle) })
    }

    /// The request [`begin_at`](Self::begin_at) began has ended at `now_ms`.
    pub fn end_at(&self, began: Began, now_ms: u64) {
        if let Some(rb) = &self.rebalancer {
            rb.activity.end(began.id, now_ms, began.recorded);
        }
    }

    /// The pool's rebalancing state, when it rebalances.
    pub fn rebalancer(&self) -> Option<&Rebalancer> {
        self.rebalancer.as_deref()
    }

    /// Places a session anew with the pool's algorithm, within the bounded-load cap: learns
    /// its table key, counts it, and issues its token (keeping a moved session's id).
    fn place(
        &self,
        group: &Group<'_>,
        verdict: Verdict,
        session: Option<[u8; 16]>,
        learn: Option<Pin>,
        now_ms: u64,
    ) -> Decision {
        let Some(i) = self.place_index(group) else {
            return Decision::to(Target::NoBackend, verdict);
        };
        let id = self.ids[i];
        if let Some(pin) = learn {
            self.store.insert(pin, id);
        }
        group.backends[i].add_session();
        let issue = self.issue_token(id, now_ms, session);
        Decision { issue, session, key: learn, ..Decision::to(Target::Use(i), verdict) }
    }

    /// The backend a new session goes to: under the bounded-load cap if one is set and any
    /// backend is under it, else wherever the pool's algorithm says.
    fn place_index(&self, group: &Group<'_>) -> Option<usize> {
        let backends = group.backends;
        if let Some(factor) = self.cfg.max_sessions_factor {
            let (mut total, mut eligible) = (0u64, 0usize);
            for b in backends.iter().filter(|b| b.accepts_new()) {
                total += u64::from(b.sessions());
                eligible += 1;
            }
            let cap = maglev::bounded_cap(total, eligible, factor);
            let under_cap = |i: usize| backends[i].accepts_new() && u64::from(backends[i].sessions()) < cap;
            let picked = group.balancer.pick(under_cap, |i| backends[i].load());
            if picked.is_some() {
                return picked;
            }
        }
        group.pick(None)
    }

    /// A token for a session pinned to backend `id`, when the pool uses Tether's cookie.
    fn issue_token(&self, id: u64, now_ms: u64, session: Option<[u8; 16]>) -> Option<Token> {
        self.keyring.as_ref()?;
        let mut t = Token::issue(id, now_ms / 1000).expect("the system random source works");
        t.pool = Some(self.pool_id);
        if let Some(s) = session {
            t.session = s;
        }
        self.track(&t);
        Some(t)
    }

    /// Moves a request whose backend failed before it got any of the request to another
    /// backend, and re-pins its session there. `None`: no other backend can take it (or
    /// the pool is strict and the session was where it belonged).
    pub fn failover(&self, group: &Group<'_>, d: &mut Decision, failed: usize, now_ms: u64) -> Option<usize> {
        if self.strict() && d.verdict == Verdict::Hit {
            return None;
        }
        let i = match (d.hash, &self.maglev) {
            (Some(h), Some(m)) => {
                m.lookup_with(h, |i| i != failed && self.available(group.backends, self.ids[i], now_ms).is_ok())?
            }
            _ => group.pick(Some(failed))?,
        };
        if matches!(d.verdict, Verdict::Hit | Verdict::Overload) {
            d.verdict = Verdict::Repin(Reason::Down);
        }
        let id = self.ids[i];
        if let Some(pin) = d.key {
            self.store.insert(pin, id);
        }
        if let Some(t) = self.issue_token(id, now_ms, d.session) {
            d.issue = Some(t);
        }
        if d.hash.is_none() {
            group.backends[i].add_session();
        }
        d.target = Target::Use(i);
        Some(i)
    }

    fn lookup_table(&self, backends: &[Arc<Backend>], pin: Pin, now_ms: u64) -> Option<Result<usize, Reason>> {
        let t = self.store.table(pin.kind);
        let id = t.get(pin.key, t.now())?;
        Some(self.available(backends, id, now_ms))
    }

    /// A hashed key: its Maglev backend if available and under the bounded-load cap, else
    /// the next one in its table (or a refusal, for a strict pool whose backend is gone).
    fn hashed(&self, backends: &[Arc<Backend>], m: &Maglev, h: u64, now_ms: u64) -> Decision {
        let cap = self.cfg.max_sessions_factor.map(|f| {
            let total: u64 = backends.iter().map(|b| u64::from(b.load())).sum();
            maglev::bounded_cap(total, backends.len(), f)
        });
        let under_cap = |i: usize| cap.is_none_or(|c| u64::from(backends[i].load()) < c);
        let verdict = match m.lookup(h).map(|i| self.available(backends, self.ids[i], now_ms)) {
            Some(Ok(i)) if under_cap(i) => {
                return Decision { hash: Some(h), ..Decision::to(Target::Use(i), Verdict::Hit) }
            }
            Some(Ok(_)) => Verdict::Overload,
            Some(Err(reason)) if self.strict() => return Decision::refused(reason),
            Some(Err(reason)) => Verdict::Repin(reason),
            None => Verdict::New,
        };
        let backend = m.lookup_with(h, |i| self.available(backends, self.ids[i], now_ms).is_ok() && under_cap(i));
        Decision { hash: Some(h), ..Decision::to(backend.map_or(Target::NoBackend, Target::Use), verdict) }
    }

    fn track(&self, t: &Token) {
        let k = u128::from_le_bytes(t.session);
        let now = self.store.sessions.now();
        if self.store.sessions.get(k, now) != Some(t.backend) {
            self.store.sessions.insert(k, t.backend, now);
        }
    }

    /// The `Set-Cookie` value for a token, sealed in the version this pool issues
    /// (`cookie.token_version`).
    pub fn set_cookie(&self, t: &Token) -> String {
        let ring = self.keyring.as_ref().expect("tokens are issued only by pools with a cookie key");
        let sealed: TokenString = ring.seal_as(self.issue_version, t);
        self.attrs.render(sealed.as_str())
    }

    /// Learns the application's session cookie from a backend's response, given the
    /// values of its `Set-Cookie` fields ([`keys::http_set_cookies`] for a response hyper
    /// parsed, [`keys::h1_set_cookies`] for one of Tether's codec). A value that is not
    /// text (see [`keys::header_text`]) is skipped.
    pub fn learn<'v>(&self, set_cookies: impl IntoIterator<Item = &'v [u8]>, backend: usize) {
        for v in set_cookies {
            let Some((n, value)) = keys::header_text(v).and_then(cookies::set_cookie_name_value) else { continue };
            if value.is_empty() {
                continue;
            }
            // Every app_cookie key of that name (the pin does not depend on the name).
            for key in &self.cfg.keys {
                if matches!(key, KeySource::AppCookie(name) if name == n) {
                    let k = hash::key_hash128(&self.pool, "app_cookie", value.as_bytes());
                    self.store.insert(Pin { key: k, kind: PinKind::AppCookie }, self.ids[backend]);
                }
            }
        }
    }

    /// The token `value` holds if it opens with this pool's key ring and has not expired
    /// by this pool's cookie timeouts: what a traffic split reads to find a session's pool
    /// before a pool is chosen (`split`). Whether its pool is this one is not asked.
    pub fn open_token(&self, value: &str, now_ms: u64) -> Option<Token> {
        let token = self.keyring.as_ref()?.open(value).ok()?;
        let (now, c) = (now_ms / 1000, &self.cfg.cookie);
        token.check(now, secs(c.idle_timeout), c.absolute_timeout.map(secs), c.clock_skew.as_secs()).ok()?;
        Some(token)
    }

    /// [`learn`](Self::learn), giving back the pins that were not already pinned to
    /// `backend`: what a shared store must hear of (a backend that sets its cookie again on
    /// every response costs it nothing).
    pub fn learn_new<'v>(&self, set_cookies: impl IntoIterator<Item = &'v [u8]>, backend: usize) -> Vec<Pin> {
        let mut new = Vec::new();
        let id = self.ids[backend];
        let t = self.store.table(PinKind::AppCookie);
        for v in set_cookies {
            let Some((n, value)) = keys::header_text(v).and_then(cookies::set_cookie_name_value) else { continue };
            if value.is_empty() || !self.cfg.keys.iter().any(|k| matches!(k, KeySource::AppCookie(name) if name == n)) {
                continue;
            }
            let pin =
                Pin { key: hash::key_hash128(&self.pool, "app_cookie", value.as_bytes()), kind: PinKind::AppCookie };
            if t.peek(pin.key, t.now()) != Some(id) {
                self.store.insert(pin, id);
                new.push(pin);
            }
        }
        new
    }

    /// The table pins a request carries, in the order of the key chain, up to the first key
    /// that decides whether or not a table knows it (Tether's cookie or a hash-mapped key
    /// the request carries, or a table-mapped header, query or client IP, which is placed
    /// when unknown; an unknown application cookie lets the chain go on): what a shared
    /// store looks up before [`decide`](Self::decide) when this instance does not know
    /// them. No allocation.
    pub fn table_pins<R: RequestKeys + ?Sized>(&self, request: &R, client_ip: IpAddr) -> [Option<Pin>; 4] {
        let mut pins = [None; 4];
        let mut n = 0;
        for key in &self.cfg.keys {
            let mut ip_buf = [0u8; 16];
            let value: Option<&[u8]> = match key {
                KeySource::Cookie if self.keyring.is_some() && request.cookie(&self.attrs.name).is_some() => break,
                KeySource::Cookie => None,
                KeySource::AppCookie(name) => app_session(request, name).map(str::as_bytes),
                KeySource::Header(name) => request.header(name),
                KeySource::Query(name) => {
                    request.query().and_then(|q| cookies::find_query_param(q, name)).map(str::as_bytes)
                }
                KeySource::ClientIp => {
                    Some(masked_ip(client_ip, self.cfg.ipv4_prefix, self.cfg.ipv6_prefix, &mut ip_buf))
                }
            };
            let Some(value) = value.filter(|v| !v.is_empty()) else { continue };
            if self.maglev.is_some() && !matches!(key, KeySource::AppCookie(_)) {
                break;
            }
            let Some(kind) = PinKind::of(key) else { continue };
            if n < pins.len() {
                pins[n] = Some(Pin { key: hash::key_hash128(&self.pool, key.kind(), value), kind });
                n += 1;
            }
            if kind != PinKind::AppCookie {
                break;
            }
        }
        pins
    }

    /// The index of the backend with identity `id` in this snapshot.
    pub fn index_of(&self, id: u64) -> Option<usize> {
        self.by_id.get(&id).copied()
    }

    /// The pool's name.
    pub fn pool_name(&self) -> &str {
        &self.pool
    }

    /// Whether responses need [`learn`](Self::learn).
    pub fn learns(&self) -> bool {
        self.cfg.keys.iter().any(|k| matches!(k, KeySource::AppCookie(_)))
    }

    /// Drops expired entries and sets each backend's count of live sessions (what bounded
    /// load and drains go by). Returns nothing: the counts live in the backends.
    pub fn recount_sessions(&self, backends: &[Arc<Backend>]) {
        let counts = self.store.sweep();
        for (b, id) in backends.iter().zip(&self.ids) {
            b.set_sessions(counts.get(id).copied().unwrap_or(0) as u32);
        }
    }
}

/// The value of cookie `name` in any of the request's `Cookie` headers.
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    keys::cookie_in(headers.get_all(http::header::COOKIE).iter().map(|v| v.as_bytes()), name)
}

/// An application session id: its cookie, a `;name=` path parameter (as servlet
/// containers write `;jsessionid=`), or a query parameter of the same name.
pub(crate) fn app_session<'a, R: RequestKeys + ?Sized>(request: &'a R, name: &str) -> Option<&'a str> {
    request
        .cookie(name)
        .or_else(|| cookies::find_path_param(request.path(), name))
        .or_else(|| request.query().and_then(|q| cookies::find_query_param(q, name)))
        .filter(|v| !v.is_empty())
}

/// The client address with the configured prefix kept, as bytes to hash.
pub(crate) fn masked_ip(ip: IpAddr, v4: u8, v6: u8, buf: &mut [u8; 16]) -> &[u8] {
    match crate::net::canonical(ip) {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(v4)).unwrap_or(0);
            buf[..4].copy_from_slice(&(u32::from(a) & mask).to_be_bytes());
            &buf[..4]
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(v6)).unwrap_or(0);
            buf.copy_from_slice(&(u128::from(a) & mask).to_be_bytes());
            &buf[..]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_index_finds_every_backend_and_nothing_else() {
        let ids: Vec<u64> = (0..50u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
        let index = IdIndex::new(&ids);
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(index.get(id), Some(&i));
        }
        assert_eq!(index.get(&1), None);
        assert_eq!(IdIndex::new(&[]).get(&0), None);
    }

    #[test]
    fn table_pins_stop_at_the_key_that_decides() {
        let pins_of = |keys: Vec<KeySource>, mapping: Mapping, headers: &[(&str, &str)]| {
            let cfg = config::Affinity { keys, mapping, ..config::Affinity::default() };
            let a = PoolAffinity::build("web", &[("a", 1), ("b", 1)], &cfg, None);
            let mut h = HeaderMap::new();
            for (n, v) in headers {
                h.append(http::HeaderName::from_bytes(n.as_bytes()).unwrap(), v.parse().unwrap());
            }
            let uri: http::Uri = "/?q=1".parse().unwrap();
            let pins = a.table_pins(&HttpKeys::new(&h, &uri), "10.0.0.1".parse().unwrap());
            pins.iter().flatten().map(|p| p.kind).collect::<Vec<_>>()
        };
        let (app, header, ip) =
            (KeySource::AppCookie("sid".into()), KeySource::Header("x-user".into()), KeySource::ClientIp);
        let chain = vec![app.clone(), header.clone(), ip.clone()];
        // An application cookie lets the chain go on (unknown, it decides nothing); a
        // table-mapped header decides: the client IP after it is not looked up.
        let all = [("cookie", "sid=s1"), ("x-user", "u1")];
        assert_eq!(pins_of(chain.clone(), Mapping::Table, &all), [PinKind::AppCookie, PinKind::Header]);
        assert_eq!(pins_of(chain.clone(), Mapping::Table, &[("x-user", "u1")]), [PinKind::Header]);
        assert_eq!(pins_of(chain.clone(), Mapping::Table, &[]), [PinKind::ClientIp]);
        // Hash-mapped keys have no pin and decide.
        assert_eq!(pins_of(chain, Mapping::Hash, &all), [PinKind::AppCookie]);
        // Tether's cookie, when the request carries one, decides before any table.
        let with_token = vec![KeySource::Cookie, header];
        assert_eq!(pins_of(with_token.clone(), Mapping::Table, &[("cookie", "tether=x"), ("x-user", "u1")]), []);
        assert_eq!(pins_of(with_token, Mapping::Table, &[("x-user", "u1")]), [PinKind::Header]);
    }

    #[test]
    fn masks_keep_the_prefix() {
        let mut a = [0u8; 16];
        let mut b = [0u8; 16];
        let x = masked_ip("10.1.2.3".parse().unwrap(), 24, 64, &mut a).to_vec();
        let y = masked_ip("10.1.2.200".parse().unwrap(), 24, 64, &mut b).to_vec();
        assert_eq!(x, y);
        let y = masked_ip("10.1.3.3".parse().unwrap(), 24, 64, &mut b).to_vec();
        assert_ne!(x, y);
        let x = masked_ip("2001:db8::1".parse().unwrap(), 32, 64, &mut a).to_vec();
        let y = masked_ip("2001:db8::ffff:1".parse().unwrap(), 32, 64, &mut b).to_vec();
        assert_eq!(x, y);
    }
}

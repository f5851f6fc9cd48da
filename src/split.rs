//! Traffic splits: a route that shares its requests between pools by weight (canary and
//! blue-green releases) without moving a sticky session from one pool to another.
//!
//! A split runs before any pool is chosen, so it reads the key chain its pools share (the
//! config makes them share one: same keys, mapping, client-IP prefixes and cookie name) and
//! finds the session's pool with the first key the request carries that says something:
//!
//! - **Tether's cookie**: a token that opens with a member pool's key ring and has not
//!   expired names its pool (version 2 tokens record it; a version 1 token's backend
//!   identity, a hash of pool and backend name, is looked up among the pools' backends).
//!   A token of a pool that is not in the split says nothing: the next key decides.
//! - **An application's cookie**: its value learned in one of the member pools' tables.
//! - **A header, query parameter or client address**, table-mapped: the split's own stick
//!   table remembers each key's pool (idle expiry like the pools' tables); a key it does
//!   not know, or whose pool left the split, is placed by weight and learned.
//! - The same keys **hashed**: weighted rendezvous hashing of the key over the member
//!   pools, so a weight change moves only the share of keys it must (and a pool at weight
//!   0 takes none).
//!
//! A request with none of those is a new session: it picks a pool at random by weight.
//! A session found in a pool stays there whatever that pool's weight is, 0 included, until
//! it expires or its pool leaves the split. The pool's own affinity then places the
//! session on one of its backends, as on any route.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::affinity::explain::KeyError;
use crate::affinity::stick_table::{Clock, StickTable};
use crate::affinity::{self, cookies, hash, PinKind, PoolAffinity, RequestKeys};
use crate::config::{self, KeySource, Mapping};

/// Requests and new sessions of one pool of a split; kept across reloads while the split
/// (by name) keeps the pool.
#[derive(Debug, Default)]
pub struct MemberStats {
    /// Requests the split sent to the pool.
    pub requests: AtomicU64,
    /// Sessions the split placed in the pool by weight (table keys seen for the first
    /// time, requests of no session). Hashed keys are not counted: a stateless hash cannot
    /// tell a new key from an old one.
    pub sessions: AtomicU64,
}

/// What a split keeps across reloads (carried by the split's name): the pool of each
/// table-mapped key, and its counters.
#[derive(Debug)]
pub struct SplitStore {
    /// Table-mapped keys (header, query, client IP) by hash, each to its pool's
    /// [`affinity::pool_id`].
    pub table: StickTable,
    /// The table's settings: a reload that changes them makes a new table.
    capacity: usize,
    idle: Duration,
    stats: Mutex<HashMap<String, Arc<MemberStats>>>,
}

impl SplitStore {
    fn new(capacity: usize, idle: Duration) -> SplitStore {
        SplitStore { table: StickTable::with_history(capacity, idle, 16), capacity, idle, stats: Mutex::default() }
    }

    /// The counters of pool `name`, made on first use.
    fn stats(&self, name: &str) -> Arc<MemberStats> {
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.entry(name.to_string()).or_default().clone()
    }
}

/// One pool of a split as a snapshot sees it.
#[derive(Debug)]
pub struct Member {
    /// Index into the snapshot's pools.
    pub pool: usize,
    pub name: Arc<str>,
    /// [`affinity::pool_id`] of the name: what tokens and the split's table record.
    pub id: u64,
    pub weight: u32,
    pub stats: Arc<MemberStats>,
}

/// A split as one snapshot sees it.
#[derive(Debug)]
pub struct Split {
    pub name: Arc<str>,
    pub members: Vec<Member>,
    /// The sum of the weights (greater than 0: the config refuses a split whose weights
    /// are all 0).
    total: u64,
    /// The key chain the split reads: its pools' (empty when they have no affinity).
    keys: Vec<KeySource>,
    mapping: Mapping,
    cookie: Option<String>,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    pub store: Arc<SplitStore>,
}

/// Where a raw key value leads in a split, for the admin API.
#[derive(Debug)]
pub struct Explained {
    /// The kind of key that decided (`"none"` when none did).
    pub kind: &'static str,
    pub pool: Option<Arc<str>>,
    pub why: String,
}

/// A raw key value as a request carrying it as one key of the chain (and nothing else).
struct Raw<'v> {
    cookie: Option<(&'v str, &'v str)>,
    header: Option<(&'v str, &'v str)>,
    query: Option<String>,
}

impl<'v> Raw<'v> {
    fn new(key: &'v KeySource, token_cookie: Option<&'v str>, value: &'v str) -> Raw<'v> {
        let mut raw = Raw { cookie: None, header: None, query: None };
        match key {
            KeySource::Cookie => raw.cookie = token_cookie.map(|name| (name, value)),
            KeySource::AppCookie(name) => raw.cookie = Some((name, value)),
            KeySource::Header(name) => raw.header = Some((name, value)),
            KeySource::Query(name) => raw.query = Some(format!("{name}={value}")),
            KeySource::ClientIp => {}
        }
        raw
    }
}

impl RequestKeys for Raw<'_> {
    fn cookie(&self, name: &str) -> Option<&str> {
        self.cookie.filter(|(n, _)| *n == name).map(|(_, v)| v)
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.header.filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_bytes())
    }
    fn path(&self) -> &str {
        "/"
    }
    fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }
}

/// Where a request's session is, as far as the split can tell before it picks a pool.
enum Found {
    /// In this member (by index in `members`).
    Member(usize),
    /// A table-mapped key the split does not know (or whose pool left): place and learn.
    Learn(u128),
    /// A hashed key.
    Hashed(u64),
    /// No key: a new session.
    Nothing,
}

impl Split {
    /// Builds the split `cfg` over `pools` (the config's, by the indexes `cfg` uses),
    /// keeping `previous`'s table and counters when given.
    pub fn build(cfg: &config::Split, pools: &[config::Pool], previous: Option<&Split>) -> Split {
        let affinity = cfg.members.first().and_then(|m| pools.get(m.pool)).and_then(|p| p.affinity.as_ref());
        let member_tables = cfg.members.iter().filter_map(|m| pools.get(m.pool)?.affinity.as_ref().map(|a| &a.table));
        let capacity = member_tables.clone().map(|t| t.capacity).max().unwrap_or(1024);
        let idle = member_tables.map(|t| t.idle_timeout).max().unwrap_or(Duration::from_secs(1800));
        let store = match previous {
            Some(p) if p.store.capacity == capacity && p.store.idle == idle => p.store.clone(),
            Some(p) => {
                let store = SplitStore::new(capacity, idle);
                p.store.table.copy_into(&store.table);
                let stats = p.store.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
                *store.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
                Arc::new(store)
            }
            None => Arc::new(SplitStore::new(capacity, idle)),
        };
        let members: Vec<Member> = cfg
            .members
            .iter()
            .filter_map(|m| {
                let name = &pools.get(m.pool)?.name;
                Some(Member {
                    pool: m.pool,
                    name: Arc::from(name.as_str()),
                    id: affinity::pool_id(name),
                    weight: m.weight,
                    stats: store.stats(name),
                })
            })
            .collect();
        Split {
            name: Arc::from(cfg.name.as_str()),
            total: members.iter().map(|m| u64::from(m.weight)).sum(),
            members,
            keys: affinity.map_or_else(Vec::new, |a| a.keys.clone()),
            mapping: affinity.map_or(Mapping::Table, |a| a.mapping),
            cookie: affinity.filter(|a| a.keys.contains(&KeySource::Cookie)).map(|a| a.cookie.name.clone()),
            ipv4_prefix: affinity.map_or(32, |a| a.ipv4_prefix),
            ipv6_prefix: affinity.map_or(64, |a| a.ipv6_prefix),
            store,
        }
    }

    /// The pool (index into the snapshot's pools) a request goes to. `affinity(i)` is
    /// pool `i`'s affinity; `client_ip` is asked only when the key chain reads it;
    /// `now_ms` is wall-clock Unix milliseconds (token expiry).
    pub fn choose<'a, R: RequestKeys + ?Sized>(
        &self,
        affinity: impl Fn(usize) -> Option<&'a PoolAffinity>,
        request: &R,
        client_ip: impl FnOnce() -> IpAddr,
        now_ms: u64,
    ) -> usize {
        let m = match self.find(&affinity, request, client_ip, now_ms) {
            Found::Member(m) => m,
            Found::Hashed(h) => self.rendezvous(h),
            Found::Learn(pin) => {
                let m = self.by_weight();
                let t = &self.store.table;
                t.insert(pin, self.members[m].id, t.now());
                self.members[m].stats.sessions.fetch_add(1, Ordering::Relaxed);
                m
            }
            Found::Nothing => {
                let m = self.by_weight();
                if !self.keys.is_empty() {
                    self.members[m].stats.sessions.fetch_add(1, Ordering::Relaxed);
                }
                m
            }
        };
        let member = &self.members[m];
        member.stats.requests.fetch_add(1, Ordering::Relaxed);
        member.pool
    }

    /// The first key of the chain the request carries that says where its session is.
    fn find<'a, R: RequestKeys + ?Sized>(
        &self,
        affinity: &impl Fn(usize) -> Option<&'a PoolAffinity>,
        request: &R,
        client_ip: impl FnOnce() -> IpAddr,
        now_ms: u64,
    ) -> Found {
        let mut client_ip = Some(client_ip);
        for key in &self.keys {
            if let Some(found) = self.find_key(key, affinity, request, &mut client_ip, now_ms) {
                return found;
            }
        }
        Found::Nothing
    }

    /// What one key of the chain says of the request: `None` when the request does not
    /// carry it, or carries a token or application cookie that leads to no member.
    fn find_key<'a, R: RequestKeys + ?Sized>(
        &self,
        key: &KeySource,
        affinity: &impl Fn(usize) -> Option<&'a PoolAffinity>,
        request: &R,
        client_ip: &mut Option<impl FnOnce() -> IpAddr>,
        now_ms: u64,
    ) -> Option<Found> {
        let mut ip_buf = [0u8; 16];
        let value: &[u8] = match key {
            KeySource::Cookie => return self.by_token(affinity, request, now_ms).map(Found::Member),
            KeySource::AppCookie(name) => {
                let value = affinity::app_session(request, name)?;
                let learned = self.members.iter().position(|m| {
                    let Some(a) = affinity(m.pool) else { return false };
                    let t = a.store.table(PinKind::AppCookie);
                    t.get(hash::key_hash128(&m.name, "app_cookie", value.as_bytes()), t.now()).is_some()
                });
                return learned.map(Found::Member);
            }
            KeySource::Header(name) => request.header(name).filter(|v| !v.is_empty())?,
            KeySource::Query(name) => {
                let v = request.query().and_then(|q| cookies::find_query_param(q, name))?;
                Some(v.as_bytes()).filter(|v| !v.is_empty())?
            }
            KeySource::ClientIp => {
                let ip = client_ip.take()?;
                affinity::masked_ip(ip(), self.ipv4_prefix, self.ipv6_prefix, &mut ip_buf)
            }
        };
        if self.mapping == Mapping::Hash {
            return Some(Found::Hashed(hash::key_hash(&self.name, key.kind(), value)));
        }
        let pin = hash::key_hash128(&self.name, key.kind(), value);
        let t = &self.store.table;
        Some(match t.get(pin, t.now()).and_then(|id| self.members.iter().position(|m| m.id == id)) {
            Some(m) => Found::Member(m),
            None => Found::Learn(pin),
        })
    }

    /// Where a raw key value leads in this split now, and why, for the admin API; `kind`
    /// narrows the key chain (without it, the value is tried as each key in turn).
    /// Learns nothing: a key the split has not seen stays unseen (a known key's idle time
    /// is refreshed by the lookup, as by a request).
    pub fn explain<'a>(
        &self,
        affinity: impl Fn(usize) -> Option<&'a PoolAffinity>,
        kind: Option<&str>,
        value: &str,
        now_ms: u64,
    ) -> Result<Explained, KeyError> {
        if let Some(k) = kind {
            if !self.keys.iter().any(|key| key.kind() == k) {
                return Err(KeyError::NoSuchKind(k.to_string()));
            }
        }
        for key in self.keys.iter().filter(|key| kind.is_none_or(|k| key.kind() == k)) {
            let raw = Raw::new(key, self.cookie.as_deref(), value);
            let ip = match key {
                KeySource::ClientIp => match value.parse::<IpAddr>() {
                    Ok(ip) => Some(ip),
                    Err(_) if kind.is_some() => return Err(KeyError::NotAnIp(value.to_string())),
                    Err(_) => continue,
                },
                _ => None,
            };
            let mut client_ip = ip.map(|ip| move || ip);
            let pool = |m: usize| Some(self.members[m].name.clone());
            let explained = match self.find_key(key, &affinity, &raw, &mut client_ip, now_ms) {
                Some(Found::Member(m)) => {
                    let how = match key {
                        KeySource::Cookie => "the token records",
                        KeySource::AppCookie(_) => "it was learned in",
                        _ => "the split's table keeps it in",
                    };
                    let weight = self.members[m].weight;
                    Explained {
                        kind: key.kind(),
                        pool: pool(m),
                        why: format!("{how} pool \"{}\" (weight {weight})", self.members[m].name),
                    }
                }
                Some(Found::Hashed(h)) => {
                    let m = self.rendezvous(h);
                    let why = format!("it hashes to pool \"{}\" at the weights now", self.members[m].name);
                    Explained { kind: key.kind(), pool: pool(m), why }
                }
                Some(Found::Learn(_)) => Explained {
                    kind: key.kind(),
                    pool: None,
                    why: "the split has not seen it: its next request picks a pool by weight".into(),
                },
                Some(Found::Nothing) | None if kind.is_some() => Explained {
                    kind: key.kind(),
                    pool: None,
                    why: match key {
                        KeySource::Cookie => {
                            "not a live token of a pool in this split: its next request is a new session"
                        }
                        _ => "no pool of the split has learned it",
                    }
                    .into(),
                },
                Some(Found::Nothing) | None => continue,
            };
            return Ok(explained);
        }
        Ok(Explained {
            kind: "none",
            pool: None,
            why: "no key of the split's chain leads anywhere with it: its next request picks a pool by weight".into(),
        })
    }

    /// The member whose pool the request's token belongs to: the pool a version 2 token
    /// records, or the pool holding a version 1 token's backend. `None`: no token, one no
    /// member's key ring opens, an expired one, or one of a pool not in the split.
    fn by_token<'a, R: RequestKeys + ?Sized>(
        &self,
        affinity: &impl Fn(usize) -> Option<&'a PoolAffinity>,
        request: &R,
        now_ms: u64,
    ) -> Option<usize> {
        let value = request.cookie(self.cookie.as_deref()?)?;
        // Pools with the same keys open the same tokens: the first that opens it says.
        let token = self.members.iter().find_map(|m| affinity(m.pool)?.open_token(value, now_ms))?;
        match token.pool {
            Some(id) => self.members.iter().position(|m| m.id == id),
            None => self.members.iter().position(|m| affinity(m.pool).is_some_and(|a| a.ids.contains(&token.backend))),
        }
    }

    /// The split on the simulator's terms: a fresh store whose table reads `clock`
    /// (simulated seconds) and hashes with `seed`, so a simulated run is reproducible.
    /// Reloads built on it keep it (`build` keeps a previous store with the same settings).
    pub fn simulated(&mut self, clock: &Clock, seed: u64) {
        let (capacity, idle) = (self.store.capacity, self.store.idle);
        let store = SplitStore {
            table: StickTable::with_clock(capacity, idle, 16, clock.clone(), seed),
            capacity,
            idle,
            stats: Mutex::default(),
        };
        for m in &mut self.members {
            m.stats = store.stats(&m.name);
        }
        self.store = Arc::new(store);
    }

    /// Drops the expired entries of the split's key table (housekeeping, once a second).
    pub fn sweep(&self) {
        let t = &self.store.table;
        t.sweep(t.now());
    }

    /// A member at random, each with the chance its weight gives it.
    fn by_weight(&self) -> usize {
        let total = usize::try_from(self.total).unwrap_or(usize::MAX).max(1);
        let mut r = crate::random::random_below(total) as u64;
        for (i, m) in self.members.iter().enumerate() {
            if r < u64::from(m.weight) {
                return i;
            }
            r -= u64::from(m.weight);
        }
        // Only when every weight is 0, which the config refuses.
        0
    }

    /// Weighted rendezvous hashing: each member scores `weight / -ln(u)`, `u` in (0, 1)
    /// a hash of the key and the pool, and the highest wins. A member's chance is its share
    /// of the weights, and changing one weight moves only keys to or from that member.
    fn rendezvous(&self, h: u64) -> usize {
        let mut best = (0, f64::NEG_INFINITY);
        for (i, m) in self.members.iter().enumerate().filter(|(_, m)| m.weight > 0) {
            let x = mix(h ^ m.id);
            let u = ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = f64::from(m.weight) / -u.ln();
            if score > best.1 {
                best = (i, score);
            }
        }
        best.0
    }
}

/// SplitMix64's finaliser: every bit of the input moves every bit of the output.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(weights: &[u32]) -> Split {
        let store = Arc::new(SplitStore::new(1024, Duration::from_secs(60)));
        let members = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let name = format!("pool-{i}");
                Member {
                    pool: i,
                    id: affinity::pool_id(&name),
                    stats: store.stats(&name),
                    name: Arc::from(name.as_str()),
                    weight: *w,
                }
            })
            .collect();
        Split {
            name: Arc::from("s"),
            members,
            total: weights.iter().map(|w| u64::from(*w)).sum(),
            keys: Vec::new(),
            mapping: Mapping::Hash,
            cookie: None,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            store,
        }
    }

    #[test]
    fn rendezvous_moves_only_the_keys_a_weight_change_must() {
        let keys: Vec<u64> = (0..20_000u64).map(|k| hash::key_hash("s", "header", &k.to_le_bytes())).collect();
        let before = split(&[50, 50, 100]);
        let after = split(&[50, 0, 100]);
        let back = split(&[50, 50, 100]);
        let mut counts = [0usize; 3];
        for &k in &keys {
            let (b, a) = (before.rendezvous(k), after.rendezvous(k));
            counts[b] += 1;
            // A key moves only off the member whose weight went to 0.
            if b != 1 {
                assert_eq!(a, b, "a key of an unchanged pool moved");
            } else {
                assert_ne!(a, 1, "a pool at weight 0 kept a key");
            }
            assert_eq!(back.rendezvous(k), b, "weights back, keys back");
        }
        // Shares within 4.5 standard deviations of the weights' (1/4, 1/4, 1/2).
        let n = keys.len() as f64;
        for (c, p) in counts.iter().zip([0.25, 0.25, 0.5]) {
            let sd = (p * (1.0 - p) / n).sqrt();
            assert!((*c as f64 / n - p).abs() <= 4.5 * sd, "share {} for weight share {p}", *c as f64 / n);
        }
    }

    /// A request that carries only Tether's cookie.
    struct WithCookie(String);

    impl RequestKeys for WithCookie {
        fn cookie(&self, name: &str) -> Option<&str> {
            (name == "tether").then_some(self.0.as_str())
        }
        fn header(&self, _: &str) -> Option<&[u8]> {
            None
        }
        fn path(&self) -> &str {
            "/"
        }
        fn query(&self) -> Option<&str> {
            None
        }
    }

    #[test]
    fn a_token_goes_to_its_pool_even_at_weight_0_until_it_expires() {
        use crate::affinity::token::{KeyRing, Token, Version};
        const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
        let cfg = config::Affinity {
            cookie: config::CookieConfig {
                keys: vec![config::Secret::new(KEY)],
                token_version: Version::V2,
                idle_timeout: Duration::from_secs(60),
                ..Default::default()
            },
            ..Default::default()
        };
        let affinities: Vec<PoolAffinity> =
            (0..2).map(|i| PoolAffinity::build(&format!("pool-{i}"), &[("b", 1)], &cfg, None)).collect();
        let mut s = split(&[1, 0]);
        s.keys = vec![KeySource::Cookie];
        s.cookie = Some("tether".into());
        let ring = KeyRing::from_base64([KEY]).unwrap();
        let now_ms = 1_800_000_000_000u64;
        let token = |pool: &str, version: Version| {
            let mut t = Token::issue(hash::backend_id(pool, "b"), now_ms / 1000).unwrap();
            t.pool = (version == Version::V2).then(|| affinity::pool_id(pool));
            WithCookie(ring.seal_as(version, &t).as_str().to_string())
        };
        let choose = |r: &WithCookie, at: u64| s.choose(|p| affinities.get(p), r, || IpAddr::from([127, 0, 0, 1]), at);
        // Pool 1 is at weight 0: only a session already there goes there.
        assert_eq!(choose(&token("pool-1", Version::V2), now_ms), 1);
        assert_eq!(choose(&token("pool-0", Version::V2), now_ms), 0);
        // A version 1 token records no pool: its backend's identity names it.
        assert_eq!(choose(&token("pool-1", Version::V1), now_ms), 1);
        // Expired, of a pool not in the split, or not a token: a new session, by weight.
        assert_eq!(choose(&token("pool-1", Version::V2), now_ms + 61_000), 0);
        assert_eq!(choose(&token("pool-9", Version::V2), now_ms), 0);
        assert_eq!(choose(&WithCookie("not-a-token".into()), now_ms), 0);
        let requests: Vec<u64> = s.members.iter().map(|m| m.stats.requests.load(Ordering::Relaxed)).collect();
        let sessions: Vec<u64> = s.members.iter().map(|m| m.stats.sessions.load(Ordering::Relaxed)).collect();
        assert_eq!((requests, sessions), (vec![4, 2], vec![3, 0]));
    }

    #[test]
    fn a_lower_weight_moves_only_the_share_it_must() {
        // 50/50 to 50/25: green's share goes from 1/2 to 1/3, so 1/6 of all keys move, all
        // from green to blue.
        let keys: Vec<u64> = (0..30_000u64).map(|k| hash::key_hash("s", "query", &k.to_le_bytes())).collect();
        let (before, after) = (split(&[50, 50]), split(&[50, 25]));
        let mut moved = 0usize;
        for &k in &keys {
            let (b, a) = (before.rendezvous(k), after.rendezvous(k));
            if a != b {
                assert_eq!((b, a), (1, 0), "a key moved the wrong way");
                moved += 1;
            }
        }
        let (n, p) = (keys.len() as f64, 1.0 / 6.0);
        let sd = (p * (1.0 - p) / n).sqrt();
        assert!((moved as f64 / n - p).abs() <= 4.5 * sd, "{moved} of {n} keys moved");
    }

    #[test]
    fn by_weight_never_picks_a_zero_weight() {
        let s = split(&[0, 3, 0, 1]);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[s.by_weight()] += 1;
        }
        assert_eq!(counts[0] + counts[2], 0);
        let p: f64 = 0.75;
        let sd = (p * (1.0 - p) / 4000.0).sqrt();
        assert!((counts[1] as f64 / 4000.0 - p).abs() <= 4.5 * sd, "{counts:?}");
    }
}

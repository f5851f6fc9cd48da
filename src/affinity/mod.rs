//! Session persistence: which backend a request's session belongs to.
//!
//! The building blocks know nothing of sockets or hyper: [`token`] seals Tether's cookie,
//! [`stick_table`] remembers learned keys, [`maglev`] hashes keys to backends consistently,
//! [`hash`] gives every instance the same fixed-seed hashes, [`cookies`] reads and writes
//! cookie headers. This module puts them together into one decision per request
//! ([`PoolAffinity::decide`]) and one step per response ([`PoolAffinity::learn`]).
//!
//! What must outlive a config snapshot (the stick table, the table of live token
//! sessions) is a [`Store`], carried from snapshot to snapshot by pool name.

pub mod cookies;
pub mod hash;
pub mod maglev;
pub mod stick_table;
pub mod token;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{HeaderMap, Uri};

use crate::config::{self, AdminState, KeySource, Mapping, OnUnavailable};
use crate::pool::Pool;
use cookies::CookieAttrs;
use maglev::Maglev;
use stick_table::StickTable;
use token::{KeyRing, Token, TokenString};

/// What became of a request's session: logged and counted for every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The pool has no affinity.
    Off,
    /// The session's backend served it.
    Hit,
    /// No session key: a new session was placed.
    New,
    /// The session's backend could not serve it; the session moved.
    Repin(Reason),
    /// A token was presented but had expired: a new session was placed.
    Expired,
    /// A token was presented but could not be opened (forged, truncated, unknown key).
    Invalid,
    /// A hashed key's backend was over its bounded-load cap; the next one took it.
    Overload,
}

/// Why a session could not stay on its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Down,
    Disabled,
    Removed,
    Drained,
}

pub const VERDICTS: usize = 10;

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Off => "-",
            Verdict::Hit => "hit",
            Verdict::New => "new",
            Verdict::Repin(r) => match r {
                Reason::Down => "repin:down",
                Reason::Disabled => "repin:disabled",
                Reason::Removed => "repin:removed",
                Reason::Drained => "repin:drained",
            },
            Verdict::Expired => "expired",
            Verdict::Invalid => "invalid",
            Verdict::Overload => "overload",
        }
    }

    /// A dense index for per-backend counters.
    pub fn index(self) -> usize {
        match self {
            Verdict::Off => 0,
            Verdict::Hit => 1,
            Verdict::New => 2,
            Verdict::Repin(Reason::Down) => 3,
            Verdict::Repin(Reason::Disabled) => 4,
            Verdict::Repin(Reason::Removed) => 5,
            Verdict::Repin(Reason::Drained) => 6,
            Verdict::Expired => 7,
            Verdict::Invalid => 8,
            Verdict::Overload => 9,
        }
    }

    pub fn reason(self) -> Option<&'static str> {
        match self {
            Verdict::Repin(_) => Some(&self.as_str()["repin:".len()..]),
            _ => None,
        }
    }
}

/// A pool's persistence state that survives reloads.
#[derive(Debug)]
pub struct Store {
    /// Learned keys (app cookies; header, query and client-IP keys in table mode).
    pub table: StickTable,
    /// Token sessions seen within the cookie idle timeout, to count sessions per backend.
    pub sessions: StickTable,
}

impl Store {
    fn new(cfg: &config::Affinity) -> Store {
        Store {
            table: StickTable::new(cfg.table.capacity, cfg.table.idle_timeout, 16),
            sessions: StickTable::new(cfg.table.capacity.max(100_000), cfg.cookie.idle_timeout, 16),
        }
    }

    /// Drops expired entries and returns the live sessions per backend identity.
    pub fn sweep(&self) -> HashMap<u64, usize> {
        self.table.sweep(self.table.now());
        self.sessions.sweep(self.sessions.now());
        let mut counts = self.sessions.sessions_per_backend();
        for (b, n) in self.table.sessions_per_backend() {
            *counts.entry(b).or_insert(0) += n;
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
    /// Backend identity hashes, by backend index.
    pub ids: Vec<u64>,
    by_id: HashMap<u64, usize>,
    maglev: Option<Maglev>,
    attrs: CookieAttrs,
}

/// The decision for one request.
#[derive(Debug)]
pub struct Decision {
    /// The backend to use; `None` when there is none (503).
    pub backend: Option<usize>,
    pub verdict: Verdict,
    /// A token to set on the response.
    pub issue: Option<Token>,
    /// The session id of a token session, kept when the session moves.
    pub session: Option<[u8; 16]>,
    /// The stick-table key of a table session, re-pointed when the session moves.
    pub key: Option<u128>,
    /// The hash of a hashed key, to find the next backend when the session moves.
    pub hash: Option<u64>,
}

impl Decision {
    pub fn plain(backend: Option<usize>) -> Decision {
        Decision { backend, verdict: Verdict::Off, issue: None, session: None, key: None, hash: None }
    }

    fn to(backend: Option<usize>, verdict: Verdict) -> Decision {
        Decision { backend, verdict, issue: None, session: None, key: None, hash: None }
    }
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

fn secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}

impl PoolAffinity {
    /// Builds the pool's affinity for a snapshot, keeping `previous` state when given.
    pub fn build(pool: &config::Pool, cfg: &config::Affinity, previous: Option<&PoolAffinity>) -> PoolAffinity {
        let store = match previous {
            Some(p) if p.cfg.table == cfg.table && p.cfg.cookie.idle_timeout == cfg.cookie.idle_timeout => {
                p.store.clone()
            }
            _ => Arc::new(Store::new(cfg)),
        };
        // Only pools with a cookie key seal or open tokens.
        let keyring = cfg.keys.contains(&KeySource::Cookie).then(|| {
            if cfg.cookie.keys.is_empty() {
                generated_ring()
            } else {
                Arc::new(KeyRing::from_base64(&cfg.cookie.keys).expect("keys were checked by config"))
            }
        });
        let ids: Vec<u64> = pool.backends.iter().map(|b| hash::backend_id(&pool.name, &b.name)).collect();
        let by_id = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let hashed = cfg.mapping == Mapping::Hash
            && cfg.keys.iter().any(|k| matches!(k, KeySource::Header(_) | KeySource::Query(_) | KeySource::ClientIp));
        let maglev = hashed.then(|| {
            let weighted: Vec<(u64, u32)> = ids.iter().zip(&pool.backends).map(|(id, b)| (*id, b.weight)).collect();
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
        PoolAffinity {
            cfg: cfg.clone(),
            store,
            keyring,
            pool: Arc::from(pool.name.as_str()),
            ids,
            by_id,
            maglev,
            attrs,
        }
    }

    pub fn cookie_name(&self) -> Option<&str> {
        self.cfg.keys.contains(&KeySource::Cookie).then_some(self.attrs.name.as_str())
    }

    /// Whether the backend with identity `id` may keep serving its sessions.
    fn available(&self, pool: &Pool, id: u64, now_ms: u64) -> Result<usize, Reason> {
        let &i = self.by_id.get(&id).ok_or(Reason::Removed)?;
        let b = &pool.backends[i];
        if !b.is_healthy() {
            return Err(Reason::Down);
        }
        match b.admin_state() {
            AdminState::Disabled => Err(Reason::Disabled),
            AdminState::Draining => match self.cfg.drain_timeout {
                Some(t) if now_ms.saturating_sub(b.draining_since()) >= t.as_millis() as u64 => Err(Reason::Drained),
                _ => Ok(i),
            },
            AdminState::Enabled => Ok(i),
        }
    }

    /// Places a new session with the pool's algorithm, within the bounded-load cap.
    fn place(&self, pool: &Pool) -> Option<usize> {
        let backends = &pool.backends;
        if let Some(factor) = self.cfg.max_sessions_factor {
            let (mut total, mut eligible) = (0u64, 0usize);
            for b in backends.iter().filter(|b| b.accepts_new()) {
                total += u64::from(b.sessions());
                eligible += 1;
            }
            let cap = maglev::bounded_cap(total, eligible, factor);
            let picked = pool
                .balancer
                .pick(|i| backends[i].accepts_new() && u64::from(backends[i].sessions()) < cap, |i| backends[i].load());
            if picked.is_some() {
                return picked;
            }
        }
        pool.pick(None)
    }

    /// Decides where a request goes. `now_ms` is wall-clock Unix milliseconds.
    pub fn decide(&self, pool: &Pool, headers: &HeaderMap, uri: &Uri, client_ip: IpAddr, now_ms: u64) -> Decision {
        let now = now_ms / 1000;
        let mut why_new = Verdict::New;
        let mut repin: Option<Reason> = None;
        let mut session: Option<[u8; 16]> = None;
        let mut learn: Option<u128> = None;
        let strict = self.cfg.on_unavailable == OnUnavailable::Strict;
        let wants_cookie = self.cookie_name().is_some();
        'chain: for key in &self.cfg.keys {
            match key {
                KeySource::Cookie => {
                    let Some(value) = cookie_value(headers, &self.attrs.name) else { continue };
                    let Some(ring) = &self.keyring else { continue };
                    let token = match ring.open(value) {
                        Ok(t) => t,
                        Err(_) => {
                            why_new = Verdict::Invalid;
                            continue;
                        }
                    };
                    let c = &self.cfg.cookie;
                    if token.check(now, secs(c.idle_timeout), c.absolute_timeout.map(secs)).is_err() {
                        why_new = Verdict::Expired;
                        continue;
                    }
                    match self.available(pool, token.backend, now_ms) {
                        Ok(i) => {
                            self.track(&token);
                            // Refresh the idle stamp once a quarter of the idle timeout has passed,
                            // so a busy client does not get a Set-Cookie on every response.
                            let stale = now.saturating_sub(token.last_seen) > secs(c.idle_timeout) / 4;
                            let issue = stale.then_some(Token { last_seen: now, ..token });
                            return Decision {
                                issue,
                                session: Some(token.session),
                                ..Decision::to(Some(i), Verdict::Hit)
                            };
                        }
                        Err(reason) => {
                            if strict {
                                return Decision::to(None, Verdict::Repin(reason));
                            }
                            repin = Some(reason);
                            session = Some(token.session);
                            break 'chain;
                        }
                    }
                }
                KeySource::AppCookie(name) => {
                    let Some(value) = app_session(headers, uri, name) else { continue };
                    let k = hash::key_hash128(&self.pool, "app_cookie", value.as_bytes());
                    match self.lookup_table(pool, k, now_ms) {
                        Some(Ok(i)) => return Decision { key: Some(k), ..Decision::to(Some(i), Verdict::Hit) },
                        Some(Err(reason)) => {
                            if strict {
                                return Decision::to(None, Verdict::Repin(reason));
                            }
                            repin = Some(reason);
                            learn = Some(k);
                            break 'chain;
                        }
                        // An id this table has not learned (yet): later keys may know the client.
                        None => continue,
                    }
                }
                KeySource::Header(_) | KeySource::Query(_) | KeySource::ClientIp => {
                    let mut ip_buf = [0u8; 16];
                    let value: &[u8] = match key {
                        KeySource::Header(name) => match headers.get(name.as_str()) {
                            Some(v) if !v.is_empty() => v.as_bytes(),
                            _ => continue,
                        },
                        KeySource::Query(name) => match uri.query().and_then(|q| cookies::find_query_param(q, name)) {
                            Some(v) if !v.is_empty() => v.as_bytes(),
                            _ => continue,
                        },
                        _ => masked_ip(client_ip, self.cfg.ipv4_prefix, self.cfg.ipv6_prefix, &mut ip_buf),
                    };
                    let kind = key.kind();
                    if let Some(m) = &self.maglev {
                        return self.hashed(pool, m, hash::key_hash(&self.pool, kind, value), now_ms, strict);
                    }
                    let k = hash::key_hash128(&self.pool, kind, value);
                    match self.lookup_table(pool, k, now_ms) {
                        Some(Ok(i)) => return Decision { key: Some(k), ..Decision::to(Some(i), Verdict::Hit) },
                        Some(Err(reason)) => {
                            if strict {
                                return Decision::to(None, Verdict::Repin(reason));
                            }
                            repin = Some(reason);
                        }
                        None => {}
                    }
                    learn = Some(k);
                    break 'chain;
                }
            }
        }
        let verdict = repin.map_or(why_new, Verdict::Repin);
        let Some(i) = self.place(pool) else {
            return Decision::to(None, verdict);
        };
        let id = self.ids[i];
        if let Some(k) = learn {
            self.store.table.insert(k, id, self.store.table.now());
        }
        pool.backends[i].add_session();
        let issue = wants_cookie.then(|| {
            let mut t = Token::issue(id, now).expect("the system random source works");
            if let Some(s) = session {
                t.session = s;
            }
            self.track(&t);
            t
        });
        Decision { issue, session, key: learn, ..Decision::to(Some(i), verdict) }
    }

    /// Moves a request whose backend refused the connection to another backend, and
    /// re-pins its session there. `None`: no other backend can take it.
    pub fn failover(&self, pool: &Pool, d: &mut Decision, failed: usize, now_ms: u64) -> Option<usize> {
        if self.cfg.on_unavailable == OnUnavailable::Strict && d.verdict == Verdict::Hit {
            return None;
        }
        let i = match (d.hash, &self.maglev) {
            (Some(h), Some(m)) => {
                m.lookup_with(h, |i| i != failed && self.available(pool, self.ids[i], now_ms).is_ok())?
            }
            _ => pool.pick(Some(failed))?,
        };
        if matches!(d.verdict, Verdict::Hit | Verdict::Overload) {
            d.verdict = Verdict::Repin(Reason::Down);
        }
        let id = self.ids[i];
        if let Some(k) = d.key {
            self.store.table.insert(k, id, self.store.table.now());
        }
        if self.cookie_name().is_some() {
            let mut t = Token::issue(id, now_ms / 1000).expect("the system random source works");
            if let Some(s) = d.session {
                t.session = s;
            }
            self.track(&t);
            d.issue = Some(t);
        }
        if d.hash.is_none() {
            pool.backends[i].add_session();
        }
        d.backend = Some(i);
        Some(i)
    }

    fn lookup_table(&self, pool: &Pool, key: u128, now_ms: u64) -> Option<Result<usize, Reason>> {
        let id = self.store.table.get(key, self.store.table.now())?;
        Some(self.available(pool, id, now_ms))
    }

    fn hashed(&self, pool: &Pool, m: &Maglev, h: u64, now_ms: u64, strict: bool) -> Decision {
        let backends = &pool.backends;
        let cap = self.cfg.max_sessions_factor.map(|f| {
            let total: u64 = backends.iter().map(|b| u64::from(b.load())).sum();
            maglev::bounded_cap(total, backends.len(), f)
        });
        let under_cap = |i: usize| cap.is_none_or(|c| u64::from(backends[i].load()) < c);
        let primary = m.lookup(h);
        let verdict = match primary.map(|i| self.available(pool, self.ids[i], now_ms)) {
            Some(Ok(i)) if under_cap(i) => return Decision { hash: Some(h), ..Decision::to(Some(i), Verdict::Hit) },
            Some(Ok(_)) => Verdict::Overload,
            Some(Err(reason)) => Verdict::Repin(reason),
            None => Verdict::New,
        };
        if strict && matches!(verdict, Verdict::Repin(_)) {
            return Decision::to(None, verdict);
        }
        let backend = m.lookup_with(h, |i| self.available(pool, self.ids[i], now_ms).is_ok() && under_cap(i));
        Decision { hash: Some(h), ..Decision::to(backend, verdict) }
    }

    fn track(&self, t: &Token) {
        let k = u128::from_le_bytes(t.session);
        let now = self.store.sessions.now();
        if self.store.sessions.get(k, now) != Some(t.backend) {
            self.store.sessions.insert(k, t.backend, now);
        }
    }

    /// The `Set-Cookie` value for a token.
    pub fn set_cookie(&self, t: &Token) -> String {
        let ring = self.keyring.as_ref().expect("tokens are issued only by pools with a cookie key");
        let sealed: TokenString = ring.seal(t);
        self.attrs.render(sealed.as_str())
    }

    /// Learns the application's session cookie from a backend's response.
    pub fn learn(&self, response: &HeaderMap, backend: usize) {
        for key in &self.cfg.keys {
            let KeySource::AppCookie(name) = key else { continue };
            for v in response.get_all(http::header::SET_COOKIE) {
                let Ok(v) = v.to_str() else { continue };
                match cookies::set_cookie_name_value(v) {
                    Some((n, value)) if n == name && !value.is_empty() => {
                        let k = hash::key_hash128(&self.pool, "app_cookie", value.as_bytes());
                        self.store.table.insert(k, self.ids[backend], self.store.table.now());
                    }
                    _ => {}
                }
            }
        }
    }

    /// Whether responses need [`learn`](Self::learn).
    pub fn learns(&self) -> bool {
        self.cfg.keys.iter().any(|k| matches!(k, KeySource::AppCookie(_)))
    }
}

/// Where an affinity key leads, for the admin API.
#[derive(Debug)]
pub struct Explained {
    pub kind: &'static str,
    pub backend: Option<usize>,
    pub why: String,
}

impl PoolAffinity {
    /// A raw key value as the bytes the request path hashes: client IPs are masked.
    fn key_bytes<'a>(&self, kind: &KeySource, value: &'a str, buf: &'a mut [u8; 16]) -> Result<&'a [u8], String> {
        match kind {
            KeySource::ClientIp => {
                let ip: IpAddr = value.parse().map_err(|_| format!("\"{value}\" is not an IP address"))?;
                Ok(masked_ip(ip, self.cfg.ipv4_prefix, self.cfg.ipv6_prefix, buf))
            }
            _ => Ok(value.as_bytes()),
        }
    }

    /// The stick-table key of a raw key value of a table-mapped kind.
    fn table_key(&self, kind: &KeySource, value: &str) -> Result<u128, String> {
        let mut buf = [0u8; 16];
        Ok(hash::key_hash128(&self.pool, kind.kind(), self.key_bytes(kind, value, &mut buf)?))
    }

    fn hash_key(&self, kind: &KeySource, value: &str) -> Result<u64, String> {
        let mut buf = [0u8; 16];
        Ok(hash::key_hash(&self.pool, kind.kind(), self.key_bytes(kind, value, &mut buf)?))
    }

    fn describe(&self, pool: &Pool, id: u64, now_ms: u64, what: &str) -> (Option<usize>, String) {
        match self.available(pool, id, now_ms) {
            Ok(i) => (Some(i), format!("{what} pins it to backend \"{}\"", pool.backends[i].name)),
            Err(r) => {
                let name = self
                    .by_id
                    .get(&id)
                    .map_or("a removed backend".to_string(), |i| format!("backend \"{}\"", pool.backends[*i].name));
                (
                    None,
                    format!(
                        "{what} pins it to {name}, which is unavailable ({}); its next request re-pins",
                        Verdict::Repin(r).reason().unwrap_or("")
                    ),
                )
            }
        }
    }

    /// Which backend `value` leads to now, and why; `kind` narrows the key chain.
    pub fn explain(&self, pool: &Pool, kind: Option<&str>, value: &str, now_ms: u64) -> Result<Explained, String> {
        let mut matched_kind = false;
        for k in &self.cfg.keys {
            if kind.is_some_and(|want| want != k.kind()) {
                continue;
            }
            matched_kind = true;
            let explicit = kind.is_some();
            match k {
                KeySource::Cookie => match self
                    .keyring
                    .as_ref()
                    .map_or(Err(token::OpenError::Malformed), |r| r.open(value))
                {
                    Err(e) if explicit => {
                        return Ok(Explained { kind: "cookie", backend: None, why: format!("not a valid token: {e}") })
                    }
                    Err(_) => continue,
                    Ok(t) => {
                        let c = &self.cfg.cookie;
                        if let Err(e) = t.check(now_ms / 1000, secs(c.idle_timeout), c.absolute_timeout.map(secs)) {
                            return Ok(Explained {
                                kind: "cookie",
                                backend: None,
                                why: format!("the token has expired ({e}); its next request starts a new session"),
                            });
                        }
                        let (backend, why) = self.describe(pool, t.backend, now_ms, "the token");
                        return Ok(Explained { kind: "cookie", backend, why });
                    }
                },
                _ if self.maglev.is_some() && !matches!(k, KeySource::AppCookie(_)) => {
                    let h = self.hash_key(k, value)?;
                    let m = self.maglev.as_ref().expect("checked");
                    let backend = m.lookup_with(h, |i| self.available(pool, self.ids[i], now_ms).is_ok());
                    let primary = m.lookup(h).map(|i| pool.backends[i].name.clone()).unwrap_or_default();
                    let why = format!(
                        "Maglev hashing maps it to \"{primary}\"{}",
                        if backend.map(|i| pool.backends[i].name.clone()) == Some(primary.clone()) {
                            String::new()
                        } else {
                            ", which is unavailable, so it goes to the next in the table".to_string()
                        }
                    );
                    return Ok(Explained { kind: k.kind(), backend, why });
                }
                _ => {
                    let key = self.table_key(k, value)?;
                    match self.store.table.get(key, self.store.table.now()) {
                        Some(id) => {
                            let (backend, why) = self.describe(pool, id, now_ms, "the stick table");
                            return Ok(Explained { kind: k.kind(), backend, why });
                        }
                        None if explicit => {
                            return Ok(Explained {
                                kind: k.kind(),
                                backend: None,
                                why: "not in the stick table: its next request is placed as a new session".into(),
                            })
                        }
                        None => continue,
                    }
                }
            }
        }
        if let (Some(k), false) = (kind, matched_kind) {
            return Err(format!("this pool has no key of kind \"{k}\""));
        }
        Ok(Explained { kind: "none", backend: None, why: "no session in this pool matches that key".into() })
    }

    /// Forgets a learned session. Tokens and hashed keys hold no state to forget.
    pub fn unpin(&self, kind: &str, value: &str) -> Result<bool, String> {
        if kind == "cookie" {
            return Err("a token carries its own pin and cannot be unpinned: drain or disable its backend, or drop its key from the ring".into());
        }
        let Some(k) = self.cfg.keys.iter().find(|k| k.kind() == kind) else {
            return Ok(false);
        };
        if self.maglev.is_some() && !matches!(k, KeySource::AppCookie(_)) {
            return Err("hashed keys are stateless: there is no pin to remove".into());
        }
        Ok(self.store.table.remove(self.table_key(k, value)?).is_some())
    }
}

/// The value of cookie `name` in any of the request's `Cookie` headers.
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| cookies::find_cookie(v, name))
}

/// An application session id: its cookie, a `;name=` path parameter (as servlet
/// containers write `;jsessionid=`), or a query parameter of the same name.
fn app_session<'a>(headers: &'a HeaderMap, uri: &'a Uri, name: &str) -> Option<&'a str> {
    cookie_value(headers, name)
        .or_else(|| cookies::find_path_param(uri.path(), name))
        .or_else(|| uri.query().and_then(|q| cookies::find_query_param(q, name)))
        .filter(|v| !v.is_empty())
}

/// The client address with the configured prefix kept, as bytes to hash.
fn masked_ip(ip: IpAddr, v4: u8, v6: u8, buf: &mut [u8; 16]) -> &[u8] {
    match config::canonical(ip) {
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

    #[test]
    fn verdict_labels() {
        assert_eq!(Verdict::Repin(Reason::Down).as_str(), "repin:down");
        assert_eq!(Verdict::Repin(Reason::Drained).reason(), Some("drained"));
        assert_eq!(Verdict::Hit.reason(), None);
    }
}

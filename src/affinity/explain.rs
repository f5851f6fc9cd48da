//! The admin API's view of affinity: where a raw key value leads now and why, and
//! forgetting a learned pin. Off the request path; allocations are fine here.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use super::verdict::Verdict;
use super::{hash, masked_ip, secs, token, Pin, PinKind, PoolAffinity};
use crate::backend::Backend;
use crate::config::KeySource;

/// Why a key cannot be looked up or unpinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// A client-IP key that is not an IP address.
    NotAnIp(String),
    /// The pool's key chain has no key of this kind.
    NoSuchKind(String),
    /// Tokens carry their own pin.
    TokenPin,
    /// Hashed keys have no pin to remove.
    Stateless,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::NotAnIp(v) => write!(f, "\"{v}\" is not an IP address"),
            KeyError::NoSuchKind(k) => write!(f, "this pool has no key of kind \"{k}\""),
            KeyError::TokenPin => f.write_str(
                "a token carries its own pin and cannot be unpinned: drain or disable its backend, or drop its key from the ring",
            ),
            KeyError::Stateless => f.write_str("hashed keys are stateless: there is no pin to remove"),
        }
    }
}

impl std::error::Error for KeyError {}

/// Where an affinity key leads, for the admin API.
#[derive(Debug)]
pub struct Explained {
    pub kind: &'static str,
    pub backend: Option<usize>,
    pub why: String,
}

impl PoolAffinity {
    /// A raw key value as the bytes the request path hashes: client IPs are masked.
    fn key_bytes<'a>(&self, kind: &KeySource, value: &'a str, buf: &'a mut [u8; 16]) -> Result<&'a [u8], KeyError> {
        match kind {
            KeySource::ClientIp => {
                let ip: IpAddr = value.parse().map_err(|_| KeyError::NotAnIp(value.to_string()))?;
                Ok(masked_ip(ip, self.cfg.ipv4_prefix, self.cfg.ipv6_prefix, buf))
            }
            _ => Ok(value.as_bytes()),
        }
    }

    /// The stick-table key of a raw key value of a table-mapped kind.
    fn table_key(&self, kind: &KeySource, value: &str) -> Result<u128, KeyError> {
        let mut buf = [0u8; 16];
        Ok(hash::key_hash128(&self.pool, kind.kind(), self.key_bytes(kind, value, &mut buf)?))
    }

    fn hash_key(&self, kind: &KeySource, value: &str) -> Result<u64, KeyError> {
        let mut buf = [0u8; 16];
        Ok(hash::key_hash(&self.pool, kind.kind(), self.key_bytes(kind, value, &mut buf)?))
    }

    fn describe(&self, backends: &[Arc<Backend>], id: u64, now_ms: u64, what: &str) -> (Option<usize>, String) {
        match self.available(backends, id, now_ms) {
            Ok(i) => (Some(i), format!("{what} pins it to backend \"{}\"", backends[i].name)),
            Err(r) => {
                let name = self
                    .by_id
                    .get(&id)
                    .map_or("a removed backend".to_string(), |i| format!("backend \"{}\"", backends[*i].name));
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

    /// Where a token leads; `None` when it does not open and the caller did not ask for
    /// tokens explicitly (the value may be another kind of key).
    fn explain_token(&self, backends: &[Arc<Backend>], value: &str, explicit: bool, now_ms: u64) -> Option<Explained> {
        let opened = self.keyring.as_ref().map_or(Err(token::OpenError::Malformed), |r| r.open(value));
        let t = match opened {
            Err(e) if explicit => {
                return Some(Explained { kind: "cookie", backend: None, why: format!("not a valid token: {e}") })
            }
            Err(_) => return None,
            // A version 2 token of another pool counts as absent here (see `by_token`).
            Ok(t) if t.pool.is_some_and(|p| p != self.pool_id) => {
                let why = "a token of another pool: its next request here starts a new session".to_string();
                return explicit.then_some(Explained { kind: "cookie", backend: None, why });
            }
            Ok(t) => t,
        };
        let c = &self.cfg.cookie;
        let checked =
            t.check(now_ms / 1000, secs(c.idle_timeout), c.absolute_timeout.map(secs), c.clock_skew.as_secs());
        if let Err(e) = checked {
            let why = format!("the token has expired ({e}); its next request starts a new session");
            return Some(Explained { kind: "cookie", backend: None, why });
        }
        let (backend, why) = self.describe(backends, t.backend, now_ms, "the token");
        Some(Explained { kind: "cookie", backend, why })
    }

    /// Which backend `value` leads to now, and why; `kind` narrows the key chain.
    pub fn explain(
        &self,
        backends: &[Arc<Backend>],
        kind: Option<&str>,
        value: &str,
        now_ms: u64,
    ) -> Result<Explained, KeyError> {
        let mut matched_kind = false;
        for k in &self.cfg.keys {
            if kind.is_some_and(|want| want != k.kind()) {
                continue;
            }
            matched_kind = true;
            let explicit = kind.is_some();
            match k {
                KeySource::Cookie => match self.explain_token(backends, value, explicit, now_ms) {
                    Some(found) => return Ok(found),
                    None => continue,
                },
                _ if self.maglev.is_some() && !matches!(k, KeySource::AppCookie(_)) => {
                    let h = self.hash_key(k, value)?;
                    let m = self.maglev.as_ref().expect("checked");
                    let backend = m.lookup_with(h, |i| self.available(backends, self.ids[i], now_ms).is_ok());
                    let primary = m.lookup(h).map(|i| backends[i].name.clone()).unwrap_or_default();
                    let why = format!(
                        "Maglev hashing maps it to \"{primary}\"{}",
                        if backend.map(|i| backends[i].name.clone()) == Some(primary.clone()) {
                            String::new()
                        } else {
                            ", which is unavailable, so it goes to the next in the table".to_string()
                        }
                    );
                    return Ok(Explained { kind: k.kind(), backend, why });
                }
                _ => {
                    let key = self.table_key(k, value)?;
                    let Some(kind) = PinKind::of(k) else { continue };
                    let t = self.store.table(kind);
                    match t.get(key, t.now()) {
                        Some(id) => {
                            let (backend, why) = self.describe(backends, id, now_ms, "the stick table");
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
            return Err(KeyError::NoSuchKind(k.to_string()));
        }
        Ok(Explained { kind: "none", backend: None, why: "no session in this pool matches that key".into() })
    }

    /// Forgets a learned session. Tokens and hashed keys hold no state to forget.
    pub fn unpin(&self, kind: &str, value: &str) -> Result<bool, KeyError> {
        Ok(self.unpin_pin(kind, value)?.1)
    }

    /// [`unpin`](Self::unpin), also giving the pin the key is stored under (for a shared
    /// store to forget it too), whether or not it was pinned here.
    pub fn unpin_pin(&self, kind: &str, value: &str) -> Result<(Option<Pin>, bool), KeyError> {
        if kind == "cookie" {
            return Err(KeyError::TokenPin);
        }
        let Some(k) = self.cfg.keys.iter().find(|k| k.kind() == kind) else {
            return Ok((None, false));
        };
        if self.maglev.is_some() && !matches!(k, KeySource::AppCookie(_)) {
            return Err(KeyError::Stateless);
        }
        let Some(kind) = PinKind::of(k) else { return Ok((None, false)) };
        let pin = Pin { key: self.table_key(k, value)?, kind };
        Ok((Some(pin), self.store.table(kind).remove(pin.key).is_some()))
    }
}

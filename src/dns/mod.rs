//! Backends from DNS: a small stub resolver ([`wire`], [`client`]) and the books of what
//! each pool's DNS sources named ([`Members`]), with the lookup counters ([`Stats`]).
//!
//! A resolved address becomes a backend named `NAME@ADDRESS` (the DNS name as written,
//! lower case, and the socket address), so its identity (`hash::backend_id(pool, name)`)
//! is the same on every instance of a fleet and after a restart, and the sessions pinned to
//! it survive re-resolution and reloads. An address that leaves the answer is not dropped:
//! it is marked vanished (its backend drains) until `discovery` removes it; one that comes
//! back before then is enabled again. Nothing here runs on its own: `discovery` asks the
//! resolver on the control plane's runtime and `control` builds the snapshots.

pub mod client;
pub mod wire;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use crate::config::{self, AdminState, DnsSource};

/// The backend name of `address` found through `source`.
pub fn backend_name(source: &DnsSource, address: SocketAddr) -> String {
    format!("{}@{address}", source.normalised_name())
}

/// What tells one source from another in a pool ([`DnsSource::key`]).
pub fn source_key(source: &DnsSource) -> String {
    source.key()
}

/// One address a source named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub address: SocketAddr,
    pub weight: u32,
    /// Unix ms when it left the answer; `None` while DNS still names it.
    pub vanished_ms: Option<u64>,
}

/// What one lookup's answer changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Change {
    pub added: Vec<String>,
    pub vanished: Vec<String>,
    /// Vanished before, named again: enabled again.
    pub returned: Vec<String>,
    pub reweighted: Vec<String>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.vanished.is_empty() && self.returned.is_empty() && self.reweighted.is_empty()
    }
}

/// Every pool's DNS-sourced backends: per (pool, source key), the members by backend name.
#[derive(Debug, Default)]
pub struct Members {
    sets: BTreeMap<(String, String), BTreeMap<String, Member>>,
}

impl Members {
    /// Takes a successful lookup's addresses (with weights) for `source` of `pool` at
    /// `now_ms`: new addresses join, missing ones are marked vanished (once), vanished ones
    /// named again return.
    pub fn update(&mut self, pool: &str, source: &DnsSource, found: &[(SocketAddr, u32)], now_ms: u64) -> Change {
        let set = self.sets.entry((pool.to_string(), source_key(source))).or_default();
        let mut change = Change::default();
        for &(address, weight) in found {
            let name = backend_name(source, address);
            match set.get_mut(&name) {
                Some(m) => {
                    if m.vanished_ms.take().is_some() {
                        change.returned.push(name.clone());
                    }
                    if m.weight != weight {
                        m.weight = weight;
                        change.reweighted.push(name);
                    }
                }
                None => {
                    set.insert(name.clone(), Member { address, weight, vanished_ms: None });
                    change.added.push(name);
                }
            }
        }
        for (name, m) in set.iter_mut() {
            if m.vanished_ms.is_none() && !found.iter().any(|(a, _)| backend_name(source, *a) == *name) {
                m.vanished_ms = Some(now_ms);
                change.vanished.push(name.clone());
            }
        }
        change
    }

    /// Removes a vanished member for good; true if it was there.
    pub fn remove(&mut self, pool: &str, name: &str) -> bool {
        self.sets.iter_mut().filter(|((p, _), _)| p == pool).any(|(_, set)| set.remove(name).is_some())
    }

    /// Forgets the sources `config` no longer has (their backends go, as a reload drops a
    /// backend removed from the file).
    pub fn retain_sources(&mut self, config: &config::Config) {
        self.sets.retain(|(pool, key), _| {
            config.pools.iter().any(|p| &p.name == pool && p.dns.iter().any(|s| source_key(s) == *key))
        });
    }

    /// Every vanished member: (pool, backend name, Unix ms it vanished).
    pub fn vanished(&self) -> Vec<(String, String, u64)> {
        let mut out = Vec::new();
        for ((pool, _), set) in &self.sets {
            for (name, m) in set {
                if let Some(at) = m.vanished_ms {
                    out.push((pool.clone(), name.clone(), at));
                }
            }
        }
        out
    }

    /// Whether `name` of `pool` came from DNS.
    pub fn contains(&self, pool: &str, name: &str) -> bool {
        self.sets.iter().any(|((p, _), set)| p == pool && set.contains_key(name))
    }

    /// How many members `source` of `pool` has, vanished ones included.
    pub fn count(&self, pool: &str, source: &DnsSource) -> usize {
        self.sets.get(&(pool.to_string(), source_key(source))).map_or(0, BTreeMap::len)
    }

    /// The backends `pool`'s DNS sources give it, in the order of its sources, each
    /// source's by name; a vanished one is draining. A name the pool already has (a static
    /// backend, or an earlier source) is left out.
    pub fn backends(&self, pool: &config::Pool) -> Vec<config::Backend> {
        let mut out: Vec<config::Backend> = Vec::new();
        for source in &pool.dns {
            let Some(set) = self.sets.get(&(pool.name.clone(), source_key(source))) else { continue };
            for (name, m) in set {
                if pool.backends.iter().chain(out.iter()).any(|b| &b.name == name) {
                    continue;
                }
                out.push(config::Backend {
                    name: name.clone(),
                    address: m.address,
                    weight: m.weight,
                    state: if m.vanished_ms.is_some() { AdminState::Draining } else { AdminState::Enabled },
                    max_connections: source.max_connections,
                });
            }
        }
        out
    }
}

/// Lookup counters of one source, for metrics and logs.
#[derive(Debug, Default, Clone)]
pub struct SourceStats {
    /// Lookups by result label (`ok`, or a [`client::LookupError::label`]).
    pub lookups: BTreeMap<&'static str, u64>,
    /// The last lookup's result label; `None` before the first.
    pub last: Option<&'static str>,
    /// Backends the source gives its pool now, vanished ones included.
    pub backends: usize,
}

/// The lookup counters of every source, by (pool, source key).
#[derive(Debug, Default)]
pub struct Stats {
    sources: Mutex<BTreeMap<(String, String), SourceStats>>,
}

impl Stats {
    /// Counts one lookup of `source` of `pool` with its result label; returns the label
    /// of the lookup before (`None`: the first), so that a change of state is logged once.
    pub fn record(
        &self,
        pool: &str,
        source: &DnsSource,
        result: &'static str,
        backends: usize,
    ) -> Option<&'static str> {
        let mut all = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let s = all.entry((pool.to_string(), source_key(source))).or_default();
        *s.lookups.entry(result).or_default() += 1;
        s.backends = backends;
        s.last.replace(result)
    }

    /// Forgets the sources `config` no longer has.
    pub fn retain_sources(&self, config: &config::Config) {
        let mut all = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|(pool, key), _| {
            config.pools.iter().any(|p| &p.name == pool && p.dns.iter().any(|s| source_key(s) == *key))
        });
    }

    /// Every source's counters.
    pub fn all(&self) -> Vec<((String, String), SourceStats)> {
        let all = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DnsKind;
    use std::time::Duration;

    fn source() -> DnsSource {
        DnsSource {
            name: "App.Svc.".into(),
            port: Some(8080),
            kind: DnsKind::A,
            interval: Duration::from_secs(5),
            weight: 1,
            max_connections: Some(7),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_join_vanish_and_return_by_name() {
        let s = source();
        let mut m = Members::default();
        let a = addr("10.0.0.1:8080");
        let b = addr("10.0.0.2:8080");
        let c = m.update("web", &s, &[(a, 1), (b, 1)], 1000);
        assert_eq!(c.added, ["app.svc@10.0.0.1:8080", "app.svc@10.0.0.2:8080"]);
        // The same answer again changes nothing.
        assert!(m.update("web", &s, &[(b, 1), (a, 1)], 2000).is_empty());
        // b leaves the answer: it vanishes once, stamped when it was first missed.
        let c = m.update("web", &s, &[(a, 1)], 3000);
        assert_eq!(c.vanished, ["app.svc@10.0.0.2:8080"]);
        assert!(m.update("web", &s, &[(a, 1)], 4000).is_empty());
        assert_eq!(m.vanished(), [("web".to_string(), "app.svc@10.0.0.2:8080".to_string(), 3000)]);
        // It comes back before it was removed: enabled again.
        let c = m.update("web", &s, &[(a, 1), (b, 3)], 5000);
        assert_eq!(c.returned, ["app.svc@10.0.0.2:8080"]);
        assert_eq!(c.reweighted, ["app.svc@10.0.0.2:8080"]);
        assert!(m.vanished().is_empty());
        // Removed for good once vanished and done.
        m.update("web", &s, &[(a, 1)], 6000);
        assert!(m.remove("web", "app.svc@10.0.0.2:8080"));
        assert!(!m.contains("web", "app.svc@10.0.0.2:8080"));
        assert!(m.contains("web", "app.svc@10.0.0.1:8080"));
    }

    #[test]
    fn backends_are_draining_when_vanished_and_never_shadow_a_static_name() {
        let s = source();
        let mut m = Members::default();
        m.update("web", &s, &[(addr("10.0.0.1:8080"), 2), (addr("10.0.0.2:8080"), 2)], 1);
        m.update("web", &s, &[(addr("10.0.0.1:8080"), 2)], 2);
        let pool = config::parse(
            "[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"web\"\n[pools.web]\nbackends = [{ name = \"app.svc@10.0.0.1:8080\", address = \"127.0.0.1:1\" }]\n[[pools.web.dns]]\nname = \"App.Svc.\"\nport = 8080\n",
            "t.toml",
        )
        .unwrap()
        .pools
        .remove(0);
        let got = m.backends(&pool);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].name, "app.svc@10.0.0.2:8080");
        assert_eq!(got[0].state, AdminState::Draining);
        assert_eq!(got[0].weight, 2);
        assert_eq!(got[0].max_connections, None);
    }
}

//! One `decide` fixture, shared by the benches, the allocation tests and the decision
//! table: a pool "p" of three backends (app-1, app-2, app-3) with the given affinity, built
//! in code: no config file, no sockets. Include it with
//! `#[path = ".../support/fixture.rs"] mod fixture;`.
#![allow(dead_code)]

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Uri};
use tether::affinity::{Decision, H1Keys, HttpKeys, PoolAffinity, RequestKeys};
use tether::backend::{Backend, Group};
use tether::balance::Balancer;
use tether::config::{self, AdminState, Affinity, Algorithm, KeySource, Mapping};

/// The cookie key every fixture pool seals its tokens with.
pub const KEY: &str = "c2Vzc2lvbi1wZXJzaXN0ZW5jZS10ZXN0LWtleS0zMmI=";

/// The backends' names, by index.
pub const NAMES: [&str; 3] = ["app-1", "app-2", "app-3"];

/// A pool's backends, balancer and affinity.
pub struct Fixture {
    pub backends: Vec<Arc<Backend>>,
    pub balancer: Balancer,
    pub affinity: PoolAffinity,
}

impl Fixture {
    /// Three backends of weight 1, round robin.
    pub fn new(affinity: Affinity) -> Fixture {
        Fixture::with(affinity, Algorithm::RoundRobin, &[1, 1, 1])
    }

    pub fn with(affinity: Affinity, algorithm: Algorithm, weights: &[u32; 3]) -> Fixture {
        let backends = NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let cfg = config::Backend {
                    name: name.to_string(),
                    address: format!("127.0.0.1:{}", 9001 + i).parse().unwrap(),
                    weight: weights[i],
                    state: AdminState::Enabled,
                    max_connections: None,
                };
                Arc::new(Backend::new("p", &cfg))
            })
            .collect();
        let members: Vec<(&str, u32)> = NAMES.iter().copied().zip(weights.iter().copied()).collect();
        Fixture {
            backends,
            balancer: Balancer::new(algorithm, weights),
            affinity: PoolAffinity::build("p", &members, &affinity, None),
        }
    }

    pub fn group(&self) -> Group<'_> {
        Group { backends: &self.backends, balancer: &self.balancer, slow_start: None, panic_mode: false }
    }

    /// A request as hyper parses it.
    pub fn decide(&self, headers: &HeaderMap, uri: &Uri, ip: IpAddr, now_ms: u64) -> Decision {
        self.decide_keys(&HttpKeys::new(headers, uri), ip, now_ms)
    }

    pub fn decide_keys(&self, request: &impl RequestKeys, ip: IpAddr, now_ms: u64) -> Decision {
        self.affinity.decide(&self.group(), request, ip, now_ms)
    }

    /// A request as raw HTTP/1.1 bytes (see [`h1_request`]), parsed by Tether's codec.
    pub fn decide_h1(&self, request: &[u8], ip: IpAddr, now_ms: u64) -> Decision {
        let head = parse_h1(request);
        self.decide_keys(&H1Keys::new(request, &head), ip, now_ms)
    }

    pub fn failover(&self, d: &mut Decision, failed: usize, now_ms: u64) -> Option<usize> {
        self.affinity.failover(&self.group(), d, failed, now_ms)
    }

    /// The `Cookie` header a browser sends back after the response to `d`.
    pub fn cookie_header(&self, d: &Decision) -> HeaderValue {
        let set_cookie = self.affinity.set_cookie(d.issue.as_ref().expect("the decision issues a token"));
        let pair = set_cookie.split(';').next().unwrap();
        assert!(pair.starts_with("tether="), "{set_cookie}");
        HeaderValue::from_str(&format!("lang=en; {pair}")).unwrap()
    }
}

/// An affinity with this key chain and otherwise the defaults, sealing with [`KEY`].
pub fn affinity(keys: Vec<KeySource>, mapping: Mapping) -> Affinity {
    let mut a = Affinity { keys, mapping, ..Affinity::default() };
    a.cookie.keys = vec![tether::config::Secret::new(KEY)];
    a
}

/// Tether's cookie alone.
pub fn cookie() -> Affinity {
    affinity(vec![KeySource::Cookie], Mapping::Table)
}

pub fn client() -> IpAddr {
    "198.51.100.23".parse().unwrap()
}

/// One header, `name: value`.
pub fn header(name: &'static str, value: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(name, HeaderValue::from_str(value).unwrap());
    h
}

/// A GET request for `target` as HTTP/1.1 bytes: the request line, `Host`, then `fields`
/// in order, as written (no case changes).
pub fn h1_request(target: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut text = format!("GET {target} HTTP/1.1\r\nHost: shop.example\r\n");
    for (name, value) in fields {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    text.into_bytes()
}

/// A request head that Tether's codec must accept whole.
pub fn parse_h1(request: &[u8]) -> tether::h1::request::RequestHead {
    tether::h1::request::parse(request, &tether::h1::request::Limits::default())
        .expect("a valid request head")
        .expect("a complete request head")
}

impl Fixture {
    /// The same pool after a reload that removed backend `removed`: the affinity store
    /// carries over, as it does across real reloads.
    pub fn reloaded_without(&self, removed: usize) -> Fixture {
        let keep: Vec<usize> = (0..self.backends.len()).filter(|&i| i != removed).collect();
        let backends: Vec<Arc<Backend>> = keep.iter().map(|&i| self.backends[i].clone()).collect();
        let members: Vec<(&str, u32)> = backends.iter().map(|b| (b.name.as_str(), 1)).collect();
        let weights = vec![1; backends.len()];
        Fixture {
            balancer: Balancer::new(Algorithm::RoundRobin, &weights),
            affinity: PoolAffinity::build("p", &members, &self.affinity.cfg, Some(&self.affinity)),
            backends,
        }
    }

    /// The name of the backend a decision sends the request to.
    pub fn target_name(&self, d: &Decision) -> Option<&str> {
        d.backend().map(|i| self.backends[i].name.as_str())
    }
}

impl Fixture {
    /// The same pool after a reload that changed its affinity settings to `cfg`.
    pub fn reloaded_with(&self, cfg: &Affinity) -> Fixture {
        let members: Vec<(&str, u32)> = self.backends.iter().map(|b| (b.name.as_str(), 1)).collect();
        Fixture {
            backends: self.backends.clone(),
            balancer: Balancer::new(Algorithm::RoundRobin, &vec![1; self.backends.len()]),
            affinity: PoolAffinity::build("p", &members, cfg, Some(&self.affinity)),
        }
    }
}

//! One strategy's run: synthetic clients send requests in simulated time through Tether's
//! own `decide`, `failover` and `learn` over a real [`Snapshot`] built from the strategy's
//! config, while the timeline fails, drains, adds and removes backends.
//!
//! A split strategy's snapshot holds the split's pools and the route that splits between
//! them: each request first goes through the split's own `choose` (its key table on the
//! same manual clock, its weighted pick drawing from the reseeded `random_below`), then the
//! chosen pool's `decide`; a `split_weight` event is a reload with the new weight, which
//! keeps the split's table as a real reload does.
//!
//! Time is simulated: every call into Tether gets `now_ms` (a fixed epoch plus simulated
//! milliseconds), the affinity tables read a `Clock::manual` the loop advances, drains
//! are stamped with simulated time, and the once-a-second housekeeping (`recount_sessions`,
//! the retry budget's refill) and the active health checks (`record_check`) are run by the
//! loop on simulated seconds. Randomness is seeded: the workload draws from [`Rng`], and the
//! balancer's draws (`random`, `p2c`) from `random::random_below`, reseeded for the run.
//!
//! A replay (`[workload] replay`) runs the same loop over the requests of an access log
//! ([`Reader`]) instead of synthetic clients: each of the log's sessions is a client, found
//! by its pseudonym, and the strategy named like the logged pool is compared with the log.
//!
//! What it does not model: slow start (its ramp reads the wall clock; it is turned off and
//! the report says so), passive ejection (its ejection time reads the wall clock), queues
//! for `max_connections`, and the network: a request takes `service_time` at its backend.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::affinity::stick_table::Clock;
use crate::affinity::token::Token;
use crate::affinity::verdict::{Verdict, VERDICTS};
use crate::affinity::{Began, Decision, RequestKeys, Store, Target};
use crate::backend::{Backend, Group};
use crate::config::{AdminState, Config};
use crate::pool::Snapshot;

use super::replay::{Reader, Request};
use super::report::{DrainReport, ReplayReport, Sample, SplitReport, SplitSegment, StrategyReport};
use super::scenario::{Action, Dist, Scenario, Strategy, MAX_BACKENDS};

/// Simulated time starts at this Unix time (2027-01-15T08:00:00Z), so tokens carry
/// plausible stamps.
pub const EPOCH_MS: u64 = 1_800_000_000_000;

/// No backend (a client between sessions, or before its first request).
const NONE: u16 = u16::MAX;

/// No pool yet (a split strategy's client before the first request of its session).
const NO_POOL: u16 = u16::MAX;

/// SplitMix64: small, fast, and good enough for workload draws (not for secrets).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 53 bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn draw(&mut self, d: Dist) -> f64 {
        match d {
            Dist::Fixed(x) => x,
            _ => d.at(self.unit()),
        }
    }
}

/// A request a rebalancing pool counts in flight, with the pool's index.
type PoolBegan = (usize, Began);

/// One simulated client.
#[derive(Debug)]
struct Client {
    /// Tether's token, as the client's `Cookie` sends it.
    token: Option<Box<str>>,
    /// The application's session cookie value and the backend (sim id) that set it.
    app: Option<(Box<str>, u16)>,
    /// Requests left in the current session; 0 between sessions.
    left: u32,
    /// The backend (sim id) of the session's last request.
    last: u16,
    /// Backends (sim ids) the session has used.
    used: u128,
    /// The session has already been counted as broken.
    broken: bool,
    /// The backend holding the client's request, while it is in flight.
    in_flight: Option<Arc<Backend>>,
    /// The request in flight as a rebalancing pool counts it (`PoolAffinity::begin_at`),
    /// with the pool's index.
    began: Option<PoolBegan>,
    /// The pool (index) of the session's last request, in a split strategy.
    pool: u16,
    /// The session has already been counted as having changed pool.
    changed_pool: bool,
}

/// What a simulated request shows `decide`: Tether's cookie and the app's, the id header.
struct SimRequest<'a> {
    token_name: &'a str,
    token: Option<&'a str>,
    app_name: &'a str,
    app: Option<&'a str>,
    header_name: &'a str,
    header: &'a [u8],
}

impl RequestKeys for SimRequest<'_> {
    fn cookie(&self, name: &str) -> Option<&str> {
        if name == self.token_name {
            self.token
        } else if name == self.app_name {
            self.app
        } else {
            None
        }
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        (!self.header.is_empty() && name.eq_ignore_ascii_case(self.header_name)).then_some(self.header)
    }

    fn path(&self) -> &str {
        "/"
    }

    fn query(&self) -> Option<&str> {
        None
    }
}

/// Heap entries: time in ms, client index and whether the entry ends a request in flight,
/// packed in one `u64` so the heap compares integers (ties go to the lower client).
const CLIENT_BITS: u32 = 23;

fn pack(t: u64, client: usize, done: bool) -> u64 {
    (t << (CLIENT_BITS + 1)) | ((client as u64) << 1) | u64::from(done)
}

fn unpack(x: u64) -> (u64, usize, bool) {
    (x >> (CLIENT_BITS + 1), ((x >> 1) & ((1 << CLIENT_BITS) - 1)) as usize, x & 1 == 1)
}

/// The state of one strategy's run.
struct Sim<'a> {
    sc: &'a Scenario,
    config: Config,
    snapshot: Snapshot,
    /// Simulated whole seconds, what the affinity tables' clock reads.
    secs: Arc<AtomicU32>,
    rng: Rng,
    clients: Vec<Client>,
    header_values: Vec<Box<str>>,
    heap: BinaryHeap<Reverse<u64>>,
    /// Every backend the run has seen, as (pool, backend) names; its index is the
    /// backend's sim id.
    names: Vec<(String, String)>,
    /// How the report names each sim id: the backend's name, or `pool/backend` in a split.
    labels: Vec<String>,
    /// Sim id by pool index, then by index in that pool.
    sim_of: Vec<Vec<u16>>,
    /// Whether the strategy is a split (its route's split chooses each request's pool).
    split: bool,
    /// A split's requests and new sessions per pool in the current sample interval.
    interval_pools: Vec<(u64, u64)>,
    /// By sim id: the backend refuses connections (a `fail` event).
    dead: Vec<bool>,
    /// By sim id: sessions in progress whose last request went there.
    active_on: Vec<u32>,
    /// By sim id: requests in the current sample interval.
    interval_requests: Vec<u64>,
    next_app_id: u64,
    out: StrategyReport,
    next_sample: u64,
    /// The Unix time of simulated time 0.
    epoch_ms: u64,
    strategy: String,
    // A replay's state: the clients are the log's sessions, each in a slot of `clients`
    // while it is in progress, found by its pseudonym.
    sessions: HashMap<u64, u32, BuildHasherDefault<Pseudonyms>>,
    /// By slot: the session's pseudonym and when it was last seen (simulated ms).
    pseudonyms: Vec<(u64, u64)>,
    free_slots: Vec<u32>,
    /// Replayed requests in flight, by slot, and the free slots.
    flights: Vec<Option<(Arc<Backend>, Option<PoolBegan>)>>,
    free_flights: Vec<u32>,
    /// Requests of no session so far (each gets an address of its own).
    sessionless: u64,
}

/// Pseudonyms are already the output of a block cipher: they are their own hash.
#[derive(Default)]
struct Pseudonyms(u64);

impl Hasher for Pseudonyms {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).rotate_left(5);
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = x;
    }
}

/// A replay's heap entries: time, slot, and whether the entry ends a request in flight
/// (else it looks whether a session has gone idle). More slots than a synthetic run has
/// clients: a day's log can hold millions of sessions in progress.
const REPLAY_BITS: u32 = 26;

fn pack_replay(t: u64, slot: usize, done: bool) -> u64 {
    (t << (REPLAY_BITS + 1)) | ((slot as u64) << 1) | u64::from(done)
}

fn unpack_replay(x: u64) -> (u64, usize, bool) {
    (x >> (REPLAY_BITS + 1), ((x >> 1) & ((1 << REPLAY_BITS) - 1)) as usize, x & 1 == 1)
}

/// Runs one strategy over the scenario's workload and timeline with `seed`, calling
/// `progress` with the simulated time now and then.
pub fn run(sc: &Scenario, strategy: &Strategy, seed: u64, progress: &mut dyn FnMut(u64)) -> StrategyReport {
    let mut sim = Sim::new(sc, strategy, seed);
    sim.run(progress);
    sim.out
}

impl<'a> Sim<'a> {
    fn new(sc: &'a Scenario, strategy: &Strategy, seed: u64) -> Sim<'a> {
        crate::random::reseed(seed);
        // Tether's cookie: every request opens its client's token. A running Tether spreads
        // its clients over its workers' open caches; this one thread holds them all, so its
        // cache gets room for them (for a replay, whose sessions are not known ahead, 64K).
        // It answers exactly what decrypting would: only the speed changes.
        let mut affinities = strategy.config.pools.iter().filter_map(|p| p.affinity.as_ref());
        if affinities.any(|a| a.keys.contains(&crate::config::KeySource::Cookie)) {
            let sessions = if sc.workload.replay.is_some() { 1 << 16 } else { sc.workload.clients as usize };
            crate::affinity::token::size_open_cache(sessions.min(1 << 18));
        }
        let mut config = (*strategy.config).clone();
        let mut notes = Vec::new();
        if config.pools.iter_mut().any(|p| p.slow_start.take().is_some()) {
            notes.push("slow_start is not simulated (its ramp reads the wall clock): off in this run".to_string());
        }
        if config.pools.iter().any(|p| p.health.as_ref().is_some_and(|h| h.eject_after > 0)) {
            notes.push(
                "passive ejection is not simulated (its ejection time reads the wall clock): requests to a failed \
                 backend move, but it is not ejected"
                    .to_string(),
            );
        }
        if config.pools.iter().any(|p| p.backends.iter().any(|b| b.max_connections.is_some())) {
            notes.push("max_connections queues are not simulated".to_string());
        }
        let secs = Arc::new(AtomicU32::new(0));
        let clock = Clock::manual(secs.clone());
        let mut snapshot = Snapshot::build(Arc::new(config.clone()), None);
        for a in snapshot.pools.iter_mut().filter_map(|p| p.affinity.as_mut()) {
            a.store = Arc::new(Store::simulated(&a.cfg, &clock, seed));
        }
        // A split's table on simulated time too (a seed of its own, as each pool table's).
        for s in snapshot.listeners.iter_mut().flat_map(|l| l.splits_mut()) {
            s.simulated(&clock, seed ^ 0x5b1f_7e11_0000_0000);
        }
        let split = snapshot.listeners.iter().any(|l| l.splits().next().is_some());
        // A replay runs at the log's own times, so that its tokens carry them.
        let epoch_ms = sc.workload.replay.as_ref().map_or(EPOCH_MS, |r| r.first_ms);
        for b in snapshot.pools.iter().flat_map(|p| &p.backends) {
            b.restamp_drain(epoch_ms);
        }
        let w = &sc.workload;
        let mut rng = Rng::new(seed);
        let mut heap = BinaryHeap::with_capacity(w.clients as usize * 2);
        let clients = (0..w.clients as usize)
            .map(|c| {
                let start = (rng.unit() * w.ramp_ms as f64) as u64;
                heap.push(Reverse(pack(start, c, false)));
                Client::empty()
            })
            .collect();
        let header_values = match &w.header {
            Some(_) => (0..w.clients).map(|c| format!("user-{c}").into_boxed_str()).collect(),
            None => Vec::new(),
        };
        let pool = &snapshot.pools[0];
        let keys = match &pool.affinity {
            Some(a) => describe_keys(&a.cfg),
            None => "none".into(),
        };
        // A split's pools may each have their own algorithm.
        let mut algorithms: Vec<String> = Vec::new();
        for p in &snapshot.pools {
            let a = format!("{:?}", p.config.algorithm).to_lowercase();
            if !algorithms.contains(&a) {
                algorithms.push(a);
            }
        }
        let n_pools = snapshot.pools.len();
        let out = StrategyReport {
            name: strategy.name.clone(),
            keys,
            algorithm: algorithms.join("/"),
            notes,
            replay: w.replay.as_ref().map(|_| ReplayReport::default()),
            split: split.then(|| SplitReport {
                pools: snapshot.pools.iter().map(|p| p.name.to_string()).collect(),
                requests: vec![0; n_pools],
                sessions: vec![0; n_pools],
                segments: vec![SplitSegment { from_ms: 0, requests: vec![0; n_pools], sessions: vec![0; n_pools] }],
                ..SplitReport::default()
            }),
            ..StrategyReport::default()
        };
        let mut sim = Sim {
            sc,
            config,
            snapshot,
            secs,
            rng,
            clients,
            header_values,
            heap,
            names: Vec::new(),
            labels: Vec::new(),
            sim_of: Vec::new(),
            split,
            interval_pools: vec![(0, 0); n_pools],
            dead: Vec::new(),
            active_on: Vec::new(),
            interval_requests: Vec::new(),
            next_app_id: 1,
            out,
            next_sample: sc.sample_ms,
            epoch_ms,
            strategy: strategy.name.clone(),
            sessions: HashMap::default(),
            pseudonyms: Vec::new(),
            free_slots: Vec::new(),
            flights: Vec::new(),
            free_flights: Vec::new(),
            sessionless: 0,
        };
        sim.map_backends();
        sim
    }

    /// Gives every backend of the current pools its sim id (new names get new ids).
    fn map_backends(&mut self) {
        let mut sim_of = Vec::new();
        for pool in &self.snapshot.pools {
            let mut ids = Vec::new();
            for b in &pool.backends {
                let id = match self.names.iter().position(|(p, n)| **p == *pool.name && *n == b.name) {
                    Some(i) => i,
                    None => {
                        assert!(
                            self.names.len() < MAX_BACKENDS,
                            "checked by the scenario: at most {MAX_BACKENDS} backends"
                        );
                        self.names.push((pool.name.to_string(), b.name.clone()));
                        self.labels.push(if self.split { format!("{}/{}", pool.name, b.name) } else { b.name.clone() });
                        self.dead.push(false);
                        self.active_on.push(0);
                        self.interval_requests.push(0);
                        self.names.len() - 1
                    }
                };
                ids.push(id as u16);
            }
            sim_of.push(ids);
        }
        self.sim_of = sim_of;
    }

    /// The pool (index) a request goes to: the split's choice (Tether's `Split::choose`)
    /// in a split strategy, else the strategy's one pool.
    fn choose_pool(&self, req: &SimRequest<'_>, ip: IpAddr, now_ms: u64) -> usize {
        let Some(split) = self.snapshot.listeners.first().and_then(|l| l.splits().next()) else { return 0 };
        split.choose(|p| self.snapshot.pools.get(p)?.affinity.as_ref(), req, || ip, now_ms)
    }

    /// A split strategy's bookkeeping of a request of client `c` sent to pool `p`: per
    /// pool, the request and (on the session's first request, `new_session`) the session,
    /// and whether the session changed pool.
    fn account_pool(&mut self, c: Option<usize>, p: usize, new_session: bool) {
        let Some(out) = self.out.split.as_mut() else { return };
        out.requests[p] += 1;
        self.interval_pools[p].0 += 1;
        let segment = out.segments.last_mut().expect("a split report starts with a segment");
        segment.requests[p] += 1;
        if new_session {
            out.sessions[p] += 1;
            segment.sessions[p] += 1;
            self.interval_pools[p].1 += 1;
        }
        let Some(client) = c.map(|c| &mut self.clients[c]) else { return };
        let p = p as u16;
        if client.pool != NO_POOL && client.pool != p {
            out.pool_changes += 1;
            if !client.changed_pool {
                client.changed_pool = true;
                out.sessions_changed_pool += 1;
            }
        }
        client.pool = p;
    }

    fn run(&mut self, progress: &mut dyn FnMut(u64)) {
        let end = self.sc.duration_ms;
        // Each pool's active checks on its own interval.
        let health: Vec<Option<crate::config::Health>> =
            self.snapshot.pools.iter().map(|p| p.config.health.clone()).collect();
        let check_every: Vec<u64> =
            health.iter().map(|h| h.as_ref().map_or(u64::MAX, |h| (h.interval.as_millis() as u64).max(1))).collect();
        let mut next_checks = check_every.clone();
        let (mut next_second, mut next_event) = (1000u64, 0usize);
        let mut handled = 0u64;
        let mut reader = match &self.sc.workload.replay {
            None => None,
            Some(r) => match Reader::open(r, end) {
                Ok(reader) => Some(reader),
                Err(e) => {
                    // Read when the scenario was checked, gone since: said, not fatal.
                    self.out.notes.push(format!("the access log could not be read: {e}"));
                    None
                }
            },
        };
        let replaying = self.sc.workload.replay.is_some();
        loop {
            // A replay's heap entries are packed with more slot bits than a synthetic run's.
            let heap_time = |x: u64| if replaying { unpack_replay(x).0 } else { unpack(x).0 };
            let mut next_client = self.heap.peek().map_or(u64::MAX, |r| heap_time(r.0));
            if let Some(r) = reader.as_mut() {
                next_client = next_client.min(r.peek_time().unwrap_or(u64::MAX));
            }
            let event_at = self.sc.events.get(next_event).map_or(u64::MAX, |e| e.at_ms);
            let next_check = next_checks.iter().copied().min().unwrap_or(u64::MAX);
            let tick = next_second.min(next_check).min(event_at).min(self.next_sample);
            if tick <= next_client {
                if tick > end {
                    break;
                }
                self.set_time(tick);
                if event_at == tick {
                    self.apply(next_event, tick);
                    next_event += 1;
                } else if next_check == tick {
                    let p = next_checks.iter().position(|&n| n == tick).expect("the earliest check");
                    self.health_checks(p, health[p].as_ref().expect("checks are scheduled only with a [health]"));
                    next_checks[p] += check_every[p];
                } else if next_second == tick {
                    self.housekeeping(tick);
                    next_second += 1000;
                } else {
                    self.sample(tick);
                    self.next_sample += self.sc.sample_ms;
                }
                continue;
            }
            if next_client > end {
                break;
            }
            if let Some(r) = reader.as_mut() {
                // Requests in flight end, and idle sessions leave, before the requests of
                // the same moment.
                let from_heap = self.heap.peek().is_some_and(|h| heap_time(h.0) <= next_client);
                self.set_time(next_client);
                if from_heap {
                    let Reverse(x) = self.heap.pop().expect("peeked");
                    let (t, slot, done) = unpack_replay(x);
                    if done {
                        self.flight_done(slot, t);
                    } else {
                        self.session_idle(slot, t);
                    }
                } else {
                    let q = r.next_request().expect("peeked");
                    self.replay_request(&q, r);
                    handled += 1;
                    if handled & 0xffff == 0 {
                        progress(q.t_ms);
                    }
                }
                continue;
            }
            if replaying {
                break;
            }
            let Reverse(x) = self.heap.pop().expect("peeked");
            let (t, c, done) = unpack(x);
            self.set_time(t);
            if done {
                self.done(c, t);
            } else {
                self.request(c, t);
                handled += 1;
                if handled & 0xffff == 0 {
                    progress(t);
                }
            }
        }
        progress(end);
        self.out.duration_ms = end;
        if let Some(r) = reader.as_mut() {
            // What is left of the log starts after the end: counted, not replayed.
            while r.next_request().is_some() {}
        }
        if let (Some(r), Some(out)) = (reader, self.out.replay.as_mut()) {
            out.counts = r.counts;
            // Requests the run did not reach: what is left of the log after the end.
            if let Some(e) = &out.counts.read_error {
                self.out.notes.push(format!("reading the access log failed, the replay stopped there: {e}"));
            }
        }
        // Token session ids come from the system's random source (see ARCHITECTURE.md,
        // "The simulator"); they only decide which entries a full table drops.
        for a in self.snapshot.pools.iter().filter_map(|p| p.affinity.as_ref()) {
            let (pins, sessions) = (a.store.pin_stats(), a.store.sessions.stats());
            let dropped = sessions.evictions + sessions.rejections;
            if dropped > 0 {
                self.out.notes.push(format!(
                    "the table of token sessions was full ({dropped} dropped): Tether's session counts, and what bounded load and drain times read of them, may differ from run to run"
                ));
            }
            if pins.evictions + pins.rejections > 0 {
                self.out.notes.push(format!(
                    "a pin table was full: {} pins evicted, {} new keys not learned (table.capacity)",
                    pins.evictions, pins.rejections
                ));
            }
        }
    }

    fn set_time(&self, t: u64) {
        self.secs.store((t / 1000) as u32, Ordering::Relaxed);
    }

    /// One request of client `c` at simulated time `t`.
    fn request(&mut self, c: usize, t: u64) {
        let now_ms = self.epoch_ms + t;
        let sc = self.sc;
        let w = &sc.workload;
        let new_session = self.clients[c].left == 0;
        if new_session {
            let n = self.rng.draw(w.requests_per_session).round().max(1.0);
            let client = &mut self.clients[c];
            // A new browser session: no cookies.
            *client = Client { left: n.min(f64::from(u32::MAX)) as u32, ..Client::empty() };
            self.out.sessions += 1;
        }
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + c as u32 / w.clients_per_ip));
        let client = &self.clients[c];
        // A split's pools share one cookie name (the config requires it).
        let req = SimRequest {
            token_name: self.snapshot.pools[0].affinity.as_ref().and_then(|a| a.cookie_name()).unwrap_or(""),
            token: client.token.as_deref(),
            app_name: w.app_cookie.as_deref().unwrap_or(""),
            app: client.app.as_ref().map(|(v, _)| &**v),
            header_name: w.header.as_deref().unwrap_or(""),
            header: self.header_values.get(c).map_or(&[], |h| h.as_bytes()),
        };
        let p = if self.split { self.choose_pool(&req, ip, now_ms) } else { 0 };
        let pool = &self.snapshot.pools[p];
        let group = Group {
            backends: &pool.backends,
            balancer: &pool.balancer,
            slow_start: None,
            panic_mode: pool.config.panic_mode,
        };
        pool.retry_budget.deposit(pool.config.retry_budget);
        let mut d = match &pool.affinity {
            Some(a) => a.decide(&group, &req, ip, now_ms),
            None => Decision::plain(group.pick(None)),
        };
        // A backend that fails refuses connections: the proxy moves the request (and
        // re-pins its session) as it would, within `retries` and the retry budget.
        let target = self.past_dead(p, &mut d, now_ms);
        self.account_pool(Some(c), p, new_session);
        let pool = &self.snapshot.pools[p];
        let left = {
            let client = &mut self.clients[c];
            client.left -= 1;
            client.left
        };
        let think = if left == 0 { w.away_ms } else { w.think_ms };
        let Some(i) = target else {
            if matches!(d.target, Target::Use(_)) {
                self.out.failed += 1;
            } else {
                self.out.refused += 1;
            }
            self.out.verdicts[d.verdict.index()] += 1;
            // A session whose last request failed has ended all the same.
            let client = &mut self.clients[c];
            if left == 0 && client.last != NONE {
                self.active_on[usize::from(client.last)] -= 1;
                client.last = NONE;
            }
            self.end_request(c, t, None, think);
            return;
        };
        let b = self.sim_of[p][i];
        self.out.requests += 1;
        self.out.verdicts[d.verdict.index()] += 1;
        self.interval_requests[usize::from(b)] += 1;
        let backend = pool.backends[i].clone();
        backend.acquire();
        backend.count(d.verdict);
        if let (Some(token), Some(a)) = (&d.issue, &pool.affinity) {
            let set_cookie = a.set_cookie(token);
            let value = set_cookie.split(';').next().and_then(|nv| nv.split_once('=')).map_or("", |(_, v)| v);
            self.clients[c].token = Some(value.into());
        }
        // The application sets its session cookie when the session is new to it.
        if let Some(name) = &w.app_cookie {
            if self.clients[c].app.as_ref().is_none_or(|(_, by)| *by != b) {
                let id = format!("s{}", self.next_app_id);
                self.next_app_id += 1;
                if let Some(a) = &pool.affinity {
                    let set_cookie = format!("{name}={id}; Path=/");
                    a.learn([set_cookie.as_bytes()], i);
                }
                self.clients[c].app = Some((id.into(), b));
            }
        }
        // A pool that rebalances sees the request in flight until it ends.
        let began = pool.affinity.as_ref().and_then(|a| a.begin_at(&d, now_ms)).map(|g| (p, g));
        self.account(c, b, d.verdict, left == 0);
        self.clients[c].began = began;
        self.end_request(c, t, Some(backend), think);
    }

    /// The session bookkeeping of a request of client `c` served by `b` (sim id).
    fn account(&mut self, c: usize, b: u16, verdict: Verdict, last_of_session: bool) {
        let client = &mut self.clients[c];
        let bit = 1u128 << b;
        if client.last != NONE && client.last != b {
            self.out.moves[verdict.index()] += 1;
            if !client.broken {
                client.broken = true;
                self.out.broken += 1;
                if !matches!(verdict, Verdict::Repin(_) | Verdict::Overload) {
                    self.out.broken_silently += 1;
                }
            }
            if client.used & bit == 0 {
                self.out.unfamiliar += 1;
            }
            self.active_on[usize::from(client.last)] -= 1;
            self.active_on[usize::from(b)] += 1;
        } else if client.last == NONE {
            self.active_on[usize::from(b)] += 1;
        }
        client.last = b;
        client.used |= bit;
        if last_of_session {
            self.active_on[usize::from(b)] -= 1;
            client.last = NONE;
        }
    }

    /// Schedules what follows a request: its end at its backend (when requests take
    /// time), then the client's next request after `think` (or `away_time`).
    fn end_request(&mut self, c: usize, t: u64, backend: Option<Arc<Backend>>, think: Dist) {
        let service = self.rng.draw(self.sc.workload.service_ms) as u64;
        match backend {
            Some(b) if service > 0 => {
                self.clients[c].in_flight = Some(b);
                self.heap.push(Reverse(pack(t + service, c, true)));
            }
            other => {
                if let Some(b) = other {
                    b.release();
                }
                let began = self.clients[c].began.take();
                self.end_began(began, t);
                let next = t + service + self.rng.draw(think) as u64;
                self.heap.push(Reverse(pack(next, c, false)));
            }
        }
    }

    /// Client `c`'s request ended at its backend at `t`.
    fn done(&mut self, c: usize, t: u64) {
        if let Some(b) = self.clients[c].in_flight.take() {
            b.release();
        }
        let began = self.clients[c].began.take();
        self.end_began(began, t);
        let think = if self.clients[c].left == 0 { self.sc.workload.away_ms } else { self.sc.workload.think_ms };
        let next = t + self.rng.draw(think) as u64;
        self.heap.push(Reverse(pack(next, c, false)));
    }

    /// The decision's backend in pool `p`, or, where it has failed (refusing connections),
    /// the one the proxy moves the request to (re-pinning its session) within `retries`.
    fn past_dead(&self, p: usize, d: &mut Decision, now_ms: u64) -> Option<usize> {
        let pool = &self.snapshot.pools[p];
        let mut target = d.backend();
        let mut moves = 0;
        while let Some(i) = target {
            if !self.dead[usize::from(self.sim_of[p][i])] {
                break;
            }
            target = if moves < pool.config.retries { pool.move_from(i, d, now_ms) } else { None };
            moves += 1;
        }
        target
    }

    /// One replayed request: the log's `q`, of its session (if any), at its logged time.
    fn replay_request(&mut self, q: &Request, reader: &Reader) {
        let t = q.t_ms;
        let now_ms = self.epoch_ms + t;
        let sc = self.sc;
        let w = &sc.workload;
        // Whether this request opens its session here (for a split's new sessions).
        let mut opened = false;
        let slot = match q.session {
            None => None,
            Some(p) => match self.sessions.get(&p) {
                Some(&slot) => {
                    self.pseudonyms[slot as usize].1 = t;
                    Some(slot as usize)
                }
                None => {
                    opened = true;
                    self.open_session(p, q, reader)
                }
            },
        };
        // What the request shows the key chain, made from its pseudonym only: an address
        // per session (each request of no session one of its own) and, for header keys,
        // the pseudonym as the header's value.
        let ip = match q.session {
            Some(p) => IpAddr::V4(Ipv4Addr::from(p as u32)),
            None => {
                self.sessionless += 1;
                // In the top 64 bits, which an IPv6 prefix of /64 keeps.
                let n = u128::from(self.sessionless & 0xffff_ffff_ffff);
                IpAddr::V6(Ipv6Addr::from((0xfd00u128 << 112) | (n << 64)))
            }
        };
        let mut hex = [0u8; 16];
        let header: &[u8] = match (q.session, &w.header) {
            (Some(p), Some(_)) => {
                for (k, h) in hex.iter_mut().enumerate() {
                    *h = b"0123456789abcdef"[(p >> (60 - 4 * k) & 0xf) as usize];
                }
                &hex
            }
            _ => &[],
        };
        let client = slot.map(|c| &self.clients[c]);
        let req = SimRequest {
            token_name: self.snapshot.pools[0].affinity.as_ref().and_then(|a| a.cookie_name()).unwrap_or(""),
            token: client.and_then(|c| c.token.as_deref()),
            app_name: w.app_cookie.as_deref().unwrap_or(""),
            app: client.and_then(|c| c.app.as_ref().map(|(v, _)| &**v)),
            header_name: w.header.as_deref().unwrap_or(""),
            header,
        };
        let p = if self.split { self.choose_pool(&req, ip, now_ms) } else { 0 };
        let pool = &self.snapshot.pools[p];
        let group = Group {
            backends: &pool.backends,
            balancer: &pool.balancer,
            slow_start: None,
            panic_mode: pool.config.panic_mode,
        };
        pool.retry_budget.deposit(pool.config.retry_budget);
        let mut d = match &pool.affinity {
            Some(a) => a.decide(&group, &req, ip, now_ms),
            None => Decision::plain(group.pick(None)),
        };
        let target = self.past_dead(p, &mut d, now_ms);
        if self.split {
            self.account_pool(slot, p, opened);
        }
        let pool = &self.snapshot.pools[p];
        // The logged run's strategy against the log: the same backend?
        if let (true, Some(logged)) = (reader.pool_name(q.pool) == self.strategy, q.backend) {
            let same = target.is_some_and(|i| pool.backends[i].name == reader.backend_name(logged));
            let r = self.out.replay.as_mut().expect("a replay has its report");
            r.matches_log = true;
            r.compared += 1;
            r.same_backend += u64::from(same);
            if q.verdict == Some(Verdict::Hit) {
                r.hits_compared += 1;
                r.hits_same_backend += u64::from(same);
            }
        }
        self.out.verdicts[d.verdict.index()] += 1;
        let Some(i) = target else {
            if matches!(d.target, Target::Use(_)) {
                self.out.failed += 1;
            } else {
                self.out.refused += 1;
            }
            return;
        };
        let b = self.sim_of[p][i];
        self.out.requests += 1;
        self.interval_requests[usize::from(b)] += 1;
        let backend = pool.backends[i].clone();
        backend.acquire();
        backend.count(d.verdict);
        if let (Some(token), Some(a), Some(c)) = (&d.issue, &pool.affinity, slot) {
            let set_cookie = a.set_cookie(token);
            let value = set_cookie.split(';').next().and_then(|nv| nv.split_once('=')).map_or("", |(_, v)| v);
            self.clients[c].token = Some(value.into());
        }
        // The application sets its session cookie when the session is new to it (a
        // request of no session is new to it every time).
        if let Some(name) = &w.app_cookie {
            if slot.is_none_or(|c| self.clients[c].app.as_ref().is_none_or(|(_, by)| *by != b)) {
                let id = format!("s{}", self.next_app_id);
                self.next_app_id += 1;
                if let Some(a) = &pool.affinity {
                    let set_cookie = format!("{name}={id}; Path=/");
                    a.learn([set_cookie.as_bytes()], i);
                }
                if let Some(c) = slot {
                    self.clients[c].app = Some((id.into(), b));
                }
            }
        }
        let began = pool.affinity.as_ref().and_then(|a| a.begin_at(&d, now_ms)).map(|g| (p, g));
        if let Some(c) = slot {
            self.account(c, b, d.verdict, false);
        }
        // In flight for as long as the log says it took.
        if q.service_ms == 0 {
            backend.release();
            self.end_began(began, t);
            return;
        }
        let f = match self.free_flights.pop() {
            Some(f) => f as usize,
            None if self.flights.len() < 1 << REPLAY_BITS => {
                self.flights.push(None);
                self.flights.len() - 1
            }
            None => {
                backend.release();
                self.end_began(began, t);
                return;
            }
        };
        self.flights[f] = Some((backend, began));
        self.heap.push(Reverse(pack_replay(t + u64::from(q.service_ms), f, true)));
    }

    /// A session the replay has not seen (or has forgotten): a slot, and, when the log
    /// shows it already open (its first line here a `hit`), its pin where the log says.
    /// `None` when every slot is taken (the request is replayed without a session).
    fn open_session(&mut self, p: u64, q: &Request, reader: &Reader) -> Option<usize> {
        let slot = match self.free_slots.pop() {
            Some(s) => s as usize,
            None if self.clients.len() < 1 << REPLAY_BITS => {
                self.clients.push(Client::empty());
                self.pseudonyms.push((0, 0));
                self.clients.len() - 1
            }
            None => return None,
        };
        let idle = self.sc.workload.replay.as_ref().expect("replaying").session_idle_ms;
        self.clients[slot] = Client::empty();
        self.pseudonyms[slot] = (p, q.t_ms);
        self.sessions.insert(p, slot as u32);
        self.heap.push(Reverse(pack_replay(q.t_ms + idle, slot, false)));
        self.out.sessions += 1;
        if let (Some(Verdict::Hit), Some(logged)) = (q.verdict, q.backend) {
            self.seed(slot, reader.backend_name(logged), q.t_ms);
        }
        Some(slot)
    }

    /// Pins the session in `slot` to the backend named `name`, as it was before the log
    /// began: Tether's token for it (sealed with this strategy's keys, as its Tether would
    /// have issued it), and the application's cookie set by it. Keys Tether maps in a
    /// table or hashes are not seeded: their first request here places them.
    fn seed(&mut self, slot: usize, name: &str, t: u64) {
        // In a split, the first of its pools with a backend of that name.
        let Some((p, i)) = self
            .snapshot
            .pools
            .iter()
            .enumerate()
            .find_map(|(p, pool)| Some((p, pool.backends.iter().position(|b| b.name == name)?)))
        else {
            return;
        };
        let pool = &self.snapshot.pools[p];
        let b = self.sim_of[p][i];
        let mut seeded = false;
        if let Some(a) = pool.affinity.as_ref().filter(|a| a.cookie_name().is_some()) {
            if let Ok(mut token) = Token::issue(a.ids[i], (self.epoch_ms + t) / 1000) {
                token.pool = Some(crate::affinity::pool_id(&pool.config.name));
                let set_cookie = a.set_cookie(&token);
                let value = set_cookie.split(';').next().and_then(|nv| nv.split_once('=')).map_or("", |(_, v)| v);
                self.clients[slot].token = Some(value.into());
                let sessions = &a.store.sessions;
                sessions.insert(u128::from_le_bytes(token.session), token.backend, sessions.now());
                seeded = true;
            }
        }
        if let Some(cookie) = &self.sc.workload.app_cookie {
            let id = format!("s{}", self.next_app_id);
            self.next_app_id += 1;
            if let Some(a) = pool.affinity.as_ref().filter(|a| a.learns()) {
                a.learn([format!("{cookie}={id}; Path=/").as_bytes()], i);
                seeded = true;
            }
            self.clients[slot].app = Some((id.into(), b));
        }
        if seeded {
            let client = &mut self.clients[slot];
            client.pool = p as u16;
            client.last = b;
            client.used = 1u128 << b;
            self.active_on[usize::from(b)] += 1;
            self.out.replay.as_mut().expect("a replay has its report").seeded += 1;
        }
    }

    /// A replayed request in flight ended at `t`.
    fn flight_done(&mut self, f: usize, t: u64) {
        if let Some((b, began)) = self.flights[f].take() {
            b.release();
            self.end_began(began, t);
        }
        self.free_flights.push(f as u32);
    }

    /// A request a rebalancing pool counted in flight ended at `t`.
    fn end_began(&self, began: Option<PoolBegan>, t: u64) {
        let Some((p, began)) = began else { return };
        if let Some(a) = self.snapshot.pools.get(p).and_then(|p| p.affinity.as_ref()) {
            a.end_at(began, self.epoch_ms + t);
        }
    }

    /// The session in `slot` may have gone idle at `t`: if so it is no longer in progress,
    /// and forgotten (its next line, if any, opens it anew).
    fn session_idle(&mut self, slot: usize, t: u64) {
        let idle = self.sc.workload.replay.as_ref().expect("replaying").session_idle_ms;
        let (p, last) = self.pseudonyms[slot];
        if last + idle > t {
            self.heap.push(Reverse(pack_replay(last + idle, slot, false)));
            return;
        }
        let client = &mut self.clients[slot];
        if client.last != NONE {
            self.active_on[usize::from(client.last)] -= 1;
        }
        *client = Client::empty();
        self.sessions.remove(&p);
        self.free_slots.push(slot as u32);
    }

    /// What housekeeping does once a second, on simulated seconds; and whether drained
    /// backends have emptied.
    fn housekeeping(&mut self, t: u64) {
        for pool in &self.snapshot.pools {
            if let Some(a) = &pool.affinity {
                a.recount_sessions(&pool.backends);
            }
            pool.retry_budget.refill();
        }
        for s in self.snapshot.listeners.iter().flat_map(|l| l.splits()) {
            s.sweep();
        }
        for d in self.out.drains.iter_mut().filter(|d| d.empty_after_ms.is_none() || d.counted_empty_after_ms.is_none())
        {
            let id = self.labels.iter().position(|n| *n == d.backend).expect("drained backends have ids");
            // A backend removed before it emptied is never counted empty.
            let Some((p, k)) = self
                .sim_of
                .iter()
                .enumerate()
                .find_map(|(p, ids)| Some((p, ids.iter().position(|&x| usize::from(x) == id)?)))
            else {
                continue;
            };
            if d.empty_after_ms.is_none() && self.active_on[id] == 0 {
                d.empty_after_ms = Some(t - d.at_ms);
            }
            let backend = &self.snapshot.pools[p].backends[k];
            if d.counted_empty_after_ms.is_none() && backend.sessions() == 0 {
                d.counted_empty_after_ms = Some(t - d.at_ms);
            }
        }
    }

    /// Pool `p`'s active checks: a failed backend refuses them.
    fn health_checks(&self, p: usize, health: &crate::config::Health) {
        for (b, &id) in self.snapshot.pools[p].backends.iter().zip(&self.sim_of[p]) {
            let result = if self.dead[usize::from(id)] { Err("connection refused (simulated)") } else { Ok(()) };
            b.record_check(health, result);
        }
    }

    /// Applies timeline event `k` at `t`. An event naming a backend acts on each backend of
    /// that name (in a split, each of its pools may have one).
    fn apply(&mut self, k: usize, t: u64) {
        let now_ms = self.epoch_ms + t;
        let sc = self.sc;
        let action = &sc.events[k].action;
        self.out.events.push((t, action.label()));
        match action {
            Action::Fail(n) | Action::Recover(n) => {
                for (i, _) in self.names.iter().enumerate().filter(|(_, (_, b))| b == n) {
                    self.dead[i] = matches!(action, Action::Fail(_));
                }
            }
            Action::State(n, state) => {
                // Kept in the config too, as `control` keeps admin actions over reloads.
                for b in self.config.pools.iter_mut().flat_map(|p| &mut p.backends).filter(|b| b.name == *n) {
                    b.state = *state;
                }
                for (p, pool) in self.snapshot.pools.iter().enumerate() {
                    for (b, &id) in pool.backends.iter().zip(&self.sim_of[p]).filter(|(b, _)| b.name == *n) {
                        b.set_admin_state_at(*state, now_ms);
                        if *state == AdminState::Draining {
                            let backend = self.labels[usize::from(id)].clone();
                            self.out.drains.push(DrainReport { backend, at_ms: t, ..DrainReport::default() });
                        }
                    }
                }
            }
            Action::Remove(n) => {
                for p in &mut self.config.pools {
                    p.backends.retain(|b| b.name != *n);
                }
                self.reload();
            }
            Action::Add(b) => {
                // The scenario refuses `add` for a split: a one-pool strategy's pool.
                self.config.pools[0].backends.push(b.clone());
                self.reload();
                let pool = &self.config.pools[0].name;
                if let Some(i) = self.names.iter().position(|(p, x)| p == pool && *x == b.name) {
                    self.dead[i] = false;
                }
            }
            Action::Weight(n, w) => {
                for b in self.config.pools.iter_mut().flat_map(|p| &mut p.backends).filter(|b| b.name == *n) {
                    b.weight = *w;
                }
                self.reload();
            }
            Action::Reload => self.reload(),
            Action::SplitWeight(pool, w) => {
                let Some(p) = self.config.pools.iter().position(|x| x.name == *pool) else { return };
                let route = self.config.listeners.iter_mut().flat_map(|l| &mut l.routes).next();
                let Some(crate::config::Route { to: crate::config::RouteTo::Split(split), .. }) = route else { return };
                for m in split.members.iter_mut().filter(|m| m.pool == p) {
                    m.weight = *w;
                }
                self.reload();
            }
        }
        // A split's counts start a new segment at each moment with events.
        if let Some(out) = self.out.split.as_mut().filter(|o| o.segments.last().is_some_and(|s| s.from_ms != t)) {
            let n = out.pools.len();
            out.segments.push(SplitSegment { from_ms: t, requests: vec![0; n], sessions: vec![0; n] });
        }
    }

    /// A reload: a new snapshot from the (changed) config, built on the current one as
    /// `control` builds it, so backends, their state, the affinity stores and a split's
    /// table carry over.
    fn reload(&mut self) {
        let next = Snapshot::build(Arc::new(self.config.clone()), Some(&self.snapshot));
        self.snapshot = next;
        self.map_backends();
    }

    /// Closes the sample interval ending at `t`. In a split, imbalance is within a pool
    /// (the pools' shares are the weights'): the largest of the pools'.
    fn sample(&mut self, t: u64) {
        let ratio = |values: &mut dyn Iterator<Item = f64>| {
            let (mut max, mut sum, mut n) = (0f64, 0f64, 0f64);
            for v in values {
                max = max.max(v);
                sum += v;
                n += 1.0;
            }
            if sum > 0.0 {
                max / (sum / n)
            } else {
                0.0
            }
        };
        let (mut requests, mut sessions) = (0f64, 0f64);
        let mut per_backend: Vec<(String, u32)> = Vec::new();
        for (pool, ids) in self.snapshot.pools.iter().zip(&self.sim_of) {
            let serving: Vec<usize> = pool
                .backends
                .iter()
                .zip(ids)
                .filter(|(b, &id)| {
                    !self.dead[usize::from(id)] && b.is_healthy() && b.admin_state() == AdminState::Enabled
                })
                .map(|(_, &id)| usize::from(id))
                .collect();
            requests = requests.max(ratio(&mut serving.iter().map(|&i| self.interval_requests[i] as f64)));
            sessions = sessions.max(ratio(&mut serving.iter().map(|&i| f64::from(self.active_on[i]))));
            per_backend
                .extend(ids.iter().map(|&id| (self.labels[usize::from(id)].clone(), self.active_on[usize::from(id)])));
        }
        let (pool_requests, pool_sessions) =
            if self.split { self.interval_pools.iter().copied().unzip() } else { (Vec::new(), Vec::new()) };
        self.out.samples.push(Sample {
            t_ms: t,
            requests_imbalance: requests,
            sessions_imbalance: sessions,
            broken: self.out.broken,
            sessions_per_backend: per_backend,
            pool_requests,
            pool_sessions,
        });
        self.interval_requests.iter_mut().for_each(|x| *x = 0);
        self.interval_pools.iter_mut().for_each(|x| *x = (0, 0));
    }
}

impl Client {
    fn empty() -> Client {
        Client {
            token: None,
            app: None,
            left: 0,
            last: NONE,
            used: 0,
            broken: false,
            in_flight: None,
            began: None,
            pool: NO_POOL,
            changed_pool: false,
        }
    }
}

/// A pool's key chain as its config writes it, with the mapping where it matters.
fn describe_keys(cfg: &crate::config::Affinity) -> String {
    use crate::config::{KeySource, Mapping};
    let keys: Vec<String> = cfg
        .keys
        .iter()
        .map(|k| match k {
            KeySource::Cookie => "cookie".to_string(),
            KeySource::AppCookie(n) => format!("app_cookie:{n}"),
            KeySource::Header(n) => format!("header:{n}"),
            KeySource::Query(n) => format!("query:{n}"),
            KeySource::ClientIp => "client_ip".to_string(),
        })
        .collect();
    let mapped = cfg.keys.iter().any(|k| matches!(k, KeySource::Header(_) | KeySource::Query(_) | KeySource::ClientIp));
    let mut s = keys.join(", ");
    if mapped {
        s.push_str(if cfg.mapping == Mapping::Hash { " (hash)" } else { " (table)" });
    }
    if let Some(f) = cfg.max_sessions_factor {
        s.push_str(&format!(", bounded {f}"));
    }
    s
}

/// The labels of [`Verdict::ALL`], for reports.
pub fn verdict_labels() -> [&'static str; VERDICTS] {
    Verdict::ALL.map(|(_, l)| l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_round_trips_and_orders_by_time() {
        for (t, c, d) in [(0, 0, false), (5, 3, true), (1 << 38, (1 << CLIENT_BITS) - 1, false)] {
            assert_eq!(unpack(pack(t, c, d)), (t, c, d));
        }
        assert!(pack(1, (1 << CLIENT_BITS) - 1, true) < pack(2, 0, false));
        // A replay's: a year of milliseconds and 2^26 slots.
        for (t, slot, d) in [(0, 0, true), (60_000, 3, false), (365 * 86_400_000, (1 << REPLAY_BITS) - 1, true)] {
            assert_eq!(unpack_replay(pack_replay(t, slot, d)), (t, slot, d));
        }
        assert!(pack_replay(1, (1 << REPLAY_BITS) - 1, true) < pack_replay(2, 0, false));
    }

    #[test]
    fn rng_is_seeded() {
        let a: Vec<u64> = {
            let mut r = Rng::new(3);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(3);
            (0..4).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        // SplitMix64's published first output for seed 0.
        assert_eq!(Rng::new(0).next_u64(), 0xe220_a839_7b1d_cdaf);
        let mut r = Rng::new(9);
        assert!((0..1000).map(|_| r.unit()).all(|u| (0.0..1.0).contains(&u)));
    }
}

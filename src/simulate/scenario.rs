//! The scenario file: a workload, a timeline of events, and the strategies to compare.
//!
//! A scenario is one TOML file. Its `[simulate]`, `[workload]` and `[[events]]` tables are
//! the simulator's; everything else is a Tether config (`[pools.NAME]` and the rest), read
//! by `config::parse` exactly as `tether check` reads it: each pool is one strategy, so a
//! strategy is exactly what Tether would run, and so is each traffic split of its
//! listeners' routes (named by the route's `name`), with its pools. Or `[simulate] config =
//! "tether.toml"` takes the pools and splits of an existing config file instead.
//!
//! Errors are `config::ConfigError`s, located by file, line and column like `tether
//! check`'s: the config part is parsed from a copy of the file whose simulator tables are
//! blanked line for line (so config errors point at the scenario's own lines), and the
//! simulator part through `config::from_toml`, which locates serde's errors the same way.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{self, AdminState, Config, ConfigError, Located};

pub use super::replay::Replay;

/// Backends a run can know of (every name the timeline ever adds included): the engine
/// keeps the set of backends a session has used as a 128-bit mask.
pub const MAX_BACKENDS: usize = 128;

/// The longest run: a year, well within what the engine's event times hold.
const MAX_DURATION_MS: u64 = 365 * 86_400_000;

/// The simulator's own top-level tables; every other table belongs to the Tether config.
const SIM_TABLES: [&str; 3] = ["simulate", "workload", "events"];

// === the file as written ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    simulate: Spanned<SimulateFile>,
    workload: Spanned<WorkloadFile>,
    #[serde(default)]
    events: Vec<EventFile>,
    // The Tether config's tables: read by `config::parse`, not here (serde only checks
    // that they are there, so that they are not unknown keys).
    #[allow(dead_code)]
    runtime: Option<serde::de::IgnoredAny>,
    #[allow(dead_code)]
    timeouts: Option<serde::de::IgnoredAny>,
    #[allow(dead_code)]
    access_log: Option<serde::de::IgnoredAny>,
    #[allow(dead_code)]
    limits: Option<serde::de::IgnoredAny>,
    #[allow(dead_code)]
    admin: Option<serde::de::IgnoredAny>,
    #[allow(dead_code)]
    listeners: Option<serde::de::IgnoredAny>,
    pools: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimulateFile {
    duration: Option<Spanned<String>>,
    sample: Option<Spanned<String>>,
    seed: Option<Spanned<i64>>,
    strategies: Option<Vec<Spanned<String>>>,
    config: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadFile {
    clients: Option<Spanned<i64>>,
    clients_per_ip: Option<Spanned<i64>>,
    ramp: Option<Spanned<String>>,
    requests_per_session: Option<Spanned<Text>>,
    think_time: Option<Spanned<String>>,
    request_rate: Option<Spanned<f64>>,
    away_time: Option<Spanned<String>>,
    service_time: Option<Spanned<String>>,
    header: Option<Spanned<String>>,
    app_cookie: Option<Spanned<String>>,
    replay: Option<Spanned<String>>,
    pool: Option<Spanned<String>>,
    session_idle: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventFile {
    at: Spanned<String>,
    action: Spanned<String>,
    backend: Option<Spanned<String>>,
    weight: Option<Spanned<i64>>,
    address: Option<Spanned<String>>,
    /// The pool whose weight a `split_weight` event sets.
    pool: Option<Spanned<String>>,
}

/// A number or a text: `requests_per_session = 20` and `= "exp(20)"` both read.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Text {
    Int(i64),
    Float(f64),
    Str(String),
}

// === the resolved scenario ===

/// A checked scenario, ready to run.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The file's name, as given.
    pub file: String,
    pub duration_ms: u64,
    pub sample_ms: u64,
    /// The seed written in the file (1 when it says none); `--seed` overrides it.
    pub seed: u64,
    pub workload: Workload,
    pub events: Vec<Event>,
    pub strategies: Vec<Strategy>,
}

/// One strategy: a Tether config holding exactly one pool (and no listeners), or a
/// split: its pools, in the split's order, and one listener whose one route is the split.
#[derive(Debug, Clone)]
pub struct Strategy {
    pub name: String,
    pub config: Arc<Config>,
}

impl Strategy {
    /// The split a split strategy runs (member `k` is pool `k` of its config).
    pub fn split(&self) -> Option<&config::Split> {
        self.config.splits().next().map(|(_, s)| s)
    }
}

/// Synthetic clients. Each client runs sessions one after the other: a session is a number
/// of requests separated by think times; between sessions the client is away. A client
/// keeps its address and its header value for the whole run, and starts every session
/// without cookies (a browser-session cookie, the default `max_age`).
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub clients: u32,
    /// Clients behind one address (a NAT or a corporate proxy).
    pub clients_per_ip: u32,
    /// Clients start uniformly over this long.
    pub ramp_ms: u64,
    pub requests_per_session: Dist,
    pub think_ms: Dist,
    pub away_ms: Dist,
    /// How long a backend holds each request (what `least_conn` and `p2c` see).
    pub service_ms: Dist,
    /// A header carrying the client's id (`user-N`), for `header:NAME` keys.
    pub header: Option<String>,
    /// The application's session cookie: a backend sets a new one on the first request of
    /// a session it does not know (as a servlet container without session replication).
    pub app_cookie: Option<String>,
    /// Requests replayed from an access log instead of synthetic clients (`clients` is 0
    /// and the distributions are not used).
    pub replay: Option<Replay>,
}

/// A distribution of durations (milliseconds) or counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dist {
    Fixed(f64),
    /// Exponential with this mean.
    Exp(f64),
    Uniform(f64, f64),
}

impl Dist {
    pub fn mean(self) -> f64 {
        match self {
            Dist::Fixed(x) | Dist::Exp(x) => x,
            Dist::Uniform(a, b) => (a + b) / 2.0,
        }
    }

    /// A draw, given a uniform `u` in [0, 1).
    pub fn at(self, u: f64) -> f64 {
        match self {
            Dist::Fixed(x) => x,
            Dist::Exp(mean) => -mean * (1.0 - u).ln(),
            Dist::Uniform(a, b) => a + (b - a) * u,
        }
    }
}

/// Something that happens to a strategy's pool at a moment of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub at_ms: u64,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// The backend stops answering: connects are refused until it recovers. Tether notices
    /// through its active health checks (when the pool has them) and moves the requests
    /// it sends there meanwhile to another backend (`failover`, within `retries`).
    Fail(String),
    Recover(String),
    /// An admin state change, as the admin API makes it.
    State(String, AdminState),
    /// A reload without the backend.
    Remove(String),
    /// A reload with a new backend.
    Add(config::Backend),
    /// A reload with the backend's weight changed.
    Weight(String, u32),
    /// A reload of the same config.
    Reload,
    /// A reload with this pool's weight in the split changed (0 to 1000), as the admin
    /// API's `PUT /api/splits/NAME/weights` or an edited file makes it. Strategies that
    /// are not splits, or whose split lacks the pool, are not changed.
    SplitWeight(String, u32),
}

impl Action {
    /// How the report names the event.
    pub fn label(&self) -> String {
        match self {
            Action::Fail(b) => format!("{b} fails"),
            Action::Recover(b) => format!("{b} recovers"),
            Action::State(b, s) => format!("{b} {}", state_name(*s)),
            Action::Remove(b) => format!("{b} removed"),
            Action::Add(b) => format!("{} added", b.name),
            Action::Weight(b, w) => format!("{b} weight {w}"),
            Action::Reload => "reload".to_string(),
            Action::SplitWeight(p, w) => format!("split weight {p} {w}"),
        }
    }
}

fn state_name(s: AdminState) -> &'static str {
    match s {
        AdminState::Enabled => "enabled",
        AdminState::Draining => "draining",
        AdminState::Disabled => "disabled",
    }
}

// === reading ===

/// Reads and checks a scenario file.
pub fn load(path: &Path) -> Result<Scenario, ConfigError> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        errors: vec![Located { line: 0, column: 0, message: format!("cannot read: {e}") }],
    })?;
    parse(&src, &file, path.parent())
}

/// Parses and checks scenario text; `file` names it in errors, `dir` is where a referenced
/// config is looked for.
pub fn parse(src: &str, file: &str, dir: Option<&Path>) -> Result<Scenario, ConfigError> {
    let parsed: File = config::from_toml(src, file)?;
    let mut errors = Vec::new();
    let fail = |errors: Vec<Located>| ConfigError { file: file.to_string(), errors };

    let sim = parsed.simulate.get_ref();
    let config = match &sim.config {
        Some(path) => {
            if parsed.pools.is_some() {
                errors.push(at(src, path.span(), "`config` and `[pools]` in one scenario: keep one of them".into()));
                return Err(fail(errors));
            }
            let p = dir.unwrap_or(Path::new(".")).join(path.get_ref());
            config::load(&p)?
        }
        None => {
            let Some(text) = config_text(src) else {
                let span = parsed.simulate.span();
                return Err(fail(vec![at(
                    src,
                    span,
                    "no strategy to simulate: add a `[pools.NAME]` table for each".into(),
                )]));
            };
            config::parse(&text, file)?
        }
    };
    // A simulated Tether is one process: nothing is shared, and no Redis is ever reached.
    let mut config = config;
    config.stores.clear();
    for a in config.pools.iter_mut().filter_map(|p| p.affinity.as_mut()) {
        a.store = None;
    }

    // A replayed log is read (its first and last times) before the duration, which it
    // gives when the scenario does not.
    let replay = replay(src, &parsed.workload, dir, &mut errors);
    let duration_ms = match (&sim.duration, &replay) {
        (Some(d), _) => duration(src, d, &mut errors).filter(|&d| d > 0 && d <= MAX_DURATION_MS).unwrap_or_else(|| {
            if errors.is_empty() {
                errors.push(at(src, d.span(), "`duration` must be more than 0 and at most 365d".into()));
            }
            0
        }),
        // Up to the log's last line, so that it is replayed too.
        (None, Some(r)) => (r.last_ms - r.first_ms + 1).min(MAX_DURATION_MS),
        (None, None) => {
            if parsed.workload.get_ref().replay.is_none() {
                errors.push(at(src, parsed.simulate.span(), "`duration` is missing: how long to simulate".into()));
            }
            0
        }
    };
    let sample_ms = match &sim.sample {
        Some(s) => duration(src, s, &mut errors).unwrap_or(0),
        None => (duration_ms / 300).max(1000),
    };
    if let Some(s) = sim.sample.as_ref().filter(|_| sample_ms == 0) {
        errors.push(at(src, s.span(), "`sample` must be at least 1ms".into()));
    }
    let seed = match &sim.seed {
        Some(s) if *s.get_ref() < 0 => {
            errors.push(at(src, s.span(), "`seed` must be 0 or more".into()));
            0
        }
        Some(s) => *s.get_ref() as u64,
        None => 1,
    };

    let strategies = strategies(src, sim, &config, parsed.simulate.span(), &mut errors);
    let mut workload = workload(src, &parsed.workload, &mut errors);
    workload.replay = replay;
    let events = events(src, &parsed.events, &strategies, duration_ms, &mut errors);
    if !errors.is_empty() {
        return Err(fail(errors));
    }
    Ok(Scenario { file: file.to_string(), duration_ms, sample_ms, seed, workload, events, strategies })
}

/// `src` with the lines of the simulator's tables emptied, line numbers kept: what
/// remains is the Tether config, for `config::parse`.
fn blank_sim_tables(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut in_sim = false;
    for line in src.split_inclusive('\n') {
        if let Some(root) = table_root(line) {
            in_sim = SIM_TABLES.contains(&root.as_str());
        }
        if in_sim {
            out.push_str(if line.ends_with("\r\n") {
                "\r\n"
            } else if line.ends_with('\n') {
                "\n"
            } else {
                ""
            });
        } else {
            out.push_str(line);
        }
    }
    out
}

/// The Tether config of a scenario: its text without the simulator's tables, plus a
/// listener when it has none (a config needs one; a simulation has no use for it). The
/// listener goes after the last line, so errors keep pointing at the scenario's lines.
/// `None` when the scenario has no pool.
fn config_text(src: &str) -> Option<String> {
    let mut text = blank_sim_tables(src);
    let headers: Vec<&str> = src.lines().map(str::trim).filter(|l| table_root(l).is_some()).collect();
    let first_pool = headers.iter().find_map(|h| {
        let name = h.trim_start_matches('[').split(']').next()?.trim();
        let rest = name.strip_prefix("pools.")?;
        Some(rest.split('.').next()?.trim().trim_matches('"').to_string())
    })?;
    if !headers.iter().any(|h| table_root(h).as_deref() == Some("listeners")) {
        text.push_str(&format!("\n[[listeners]]\nbind = \"127.0.0.1:1\"\npool = \"{first_pool}\"\n"));
    }
    Some(text)
}

/// The first key of a table header line (`[a.b]` or `[[a.b]]`), if the line is one.
fn table_root(line: &str) -> Option<String> {
    let t = line.trim();
    let inner =
        t.strip_prefix("[[").and_then(|r| r.split_once("]]")).or_else(|| t.strip_prefix('[')?.split_once(']'))?;
    let (name, rest) = inner;
    let rest = rest.trim();
    if !(rest.is_empty() || rest.starts_with('#')) {
        return None;
    }
    let first = name.split('.').next()?.trim().trim_matches('"');
    let ok = !first.is_empty() && first.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    ok.then(|| first.to_string())
}

fn at(src: &str, span: Range<usize>, message: String) -> Located {
    config::locate(src, span, message)
}

fn duration(src: &str, s: &Spanned<String>, errors: &mut Vec<Located>) -> Option<u64> {
    match config::parse_duration(s.get_ref()) {
        Ok(d) => Some(d.as_millis() as u64),
        Err(e) => {
            errors.push(at(src, s.span(), e));
            None
        }
    }
}

fn strategies(
    src: &str,
    sim: &SimulateFile,
    config: &Config,
    table: Range<usize>,
    errors: &mut Vec<Located>,
) -> Vec<Strategy> {
    let one = |p: &config::Pool| {
        let mut c = config.clone();
        c.listeners.clear();
        c.pools = vec![p.clone()];
        Strategy { name: p.name.clone(), config: Arc::new(c) }
    };
    let splits: Vec<(&config::Listener, &config::Route, &config::Split)> = config
        .listeners
        .iter()
        .flat_map(|l| {
            l.routes.iter().filter_map(move |r| match &r.to {
                config::RouteTo::Split(s) => Some((l, r, s)),
                config::RouteTo::Pool(_) => None,
            })
        })
        .collect();
    // A split: its pools (in the split's order, so member `k` is pool `k`) and one
    // listener with the one route, which is all `Snapshot::build` needs to build it.
    let split = |(l, r, s): &(&config::Listener, &config::Route, &config::Split)| {
        let mut c = config.clone();
        c.pools = s.members.iter().map(|m| config.pools[m.pool].clone()).collect();
        let members = s.members.iter().enumerate().map(|(k, m)| config::SplitMember { pool: k, weight: m.weight });
        let split = config::Split { name: s.name.clone(), members: members.collect() };
        let route = config::Route { to: config::RouteTo::Split(split), ..(*r).clone() };
        c.listeners = vec![config::Listener { routes: vec![route], tcp: None, ..(*l).clone() }];
        Strategy { name: s.name.clone(), config: Arc::new(c) }
    };
    let Some(names) = &sim.strategies else {
        if config.pools.is_empty() {
            errors.push(at(src, table, "no strategy to simulate: add a `[pools.NAME]` table for each".into()));
        }
        return config.pools.iter().map(one).chain(splits.iter().map(split)).collect();
    };
    let mut out = Vec::new();
    for n in names {
        // A pool's name first, then a split's (a route's `name`).
        if let Some(p) = config.pools.iter().find(|p| p.name == *n.get_ref()) {
            out.push(one(p));
        } else if let Some(s) = splits.iter().find(|(_, _, s)| s.name == *n.get_ref()) {
            out.push(split(s));
        } else {
            errors.push(at(
                src,
                n.span(),
                format!("strategy \"{}\" is neither a pool nor a split of the config", n.get_ref()),
            ));
        }
    }
    if names.is_empty() {
        errors.push(at(src, table, "`strategies` is empty".into()));
    }
    out
}

fn workload(src: &str, w: &Spanned<WorkloadFile>, errors: &mut Vec<Located>) -> Workload {
    let (span, w) = (w.span(), w.get_ref());
    let replaying = w.replay.is_some();
    let clients = match &w.clients {
        Some(c) if replaying => {
            errors.push(at(
                src,
                c.span(),
                "`clients` and `replay` in one workload: a replay's clients are the log's sessions".into(),
            ));
            0
        }
        Some(c) => {
            let n = *c.get_ref();
            if !(1..=4_000_000).contains(&n) {
                errors.push(at(src, c.span(), format!("`clients` must be 1 to 4000000, not {n}")));
            }
            n
        }
        None if replaying => 0,
        None => {
            errors.push(at(
                src,
                span.clone(),
                "`clients` is missing: how many synthetic clients (or `replay` a log)".into(),
            ));
            1
        }
    };
    if replaying {
        // What only synthetic clients have: a replay takes it from the log.
        let synthetic: [(&str, Option<Range<usize>>); 7] = [
            ("clients_per_ip", w.clients_per_ip.as_ref().map(|x| x.span())),
            ("ramp", w.ramp.as_ref().map(|x| x.span())),
            ("requests_per_session", w.requests_per_session.as_ref().map(|x| x.span())),
            ("think_time", w.think_time.as_ref().map(|x| x.span())),
            ("request_rate", w.request_rate.as_ref().map(|x| x.span())),
            ("away_time", w.away_time.as_ref().map(|x| x.span())),
            ("service_time", w.service_time.as_ref().map(|x| x.span())),
        ];
        for (key, s) in synthetic {
            if let Some(s) = s {
                errors.push(at(
                    src,
                    s,
                    format!("`{key}` is for synthetic clients: a replay takes its requests from the log"),
                ));
            }
        }
    } else {
        for (key, s) in
            [("pool", w.pool.as_ref().map(|x| x.span())), ("session_idle", w.session_idle.as_ref().map(|x| x.span()))]
        {
            if let Some(s) = s {
                errors.push(at(src, s, format!("`{key}` is for replays: it needs `replay`")));
            }
        }
    }
    let clients_per_ip = w.clients_per_ip.as_ref().map_or(1, |c| *c.get_ref());
    if let Some(c) = w.clients_per_ip.as_ref().filter(|_| !(1..=65_536).contains(&clients_per_ip)) {
        errors.push(at(src, c.span(), format!("`clients_per_ip` must be 1 to 65536, not {clients_per_ip}")));
    }
    let ms = |s: &Option<Spanned<String>>, default: &str, errors: &mut Vec<Located>| match s {
        Some(s) => dist(s.get_ref(), true).unwrap_or_else(|e| {
            errors.push(at(src, s.span(), e));
            Dist::Fixed(0.0)
        }),
        None => dist(default, true).expect("defaults parse"),
    };
    let think = match (&w.think_time, &w.request_rate) {
        (Some(t), Some(_)) => {
            errors.push(at(src, t.span(), "`think_time` and `request_rate` both given: keep one".into()));
            Dist::Fixed(0.0)
        }
        (None, Some(r)) if r.get_ref().is_nan() || *r.get_ref() <= 0.0 => {
            errors.push(at(src, r.span(), "`request_rate` must be more than 0".into()));
            Dist::Fixed(0.0)
        }
        // Every client thinks between requests, so `clients / rate` seconds on average
        // keeps the pool at `rate` while every client is in a session.
        (None, Some(r)) => Dist::Exp(clients.max(1) as f64 * 1000.0 / r.get_ref()),
        (t, None) => ms(t, "exp(5s)", errors),
    };
    let requests = match &w.requests_per_session {
        None => Dist::Exp(20.0),
        Some(t) => {
            let parsed = match t.get_ref() {
                Text::Int(n) => Ok(Dist::Fixed(*n as f64)),
                Text::Float(x) => Ok(Dist::Fixed(*x)),
                Text::Str(s) => dist(s, false),
            };
            match parsed {
                Ok(d) if d.mean() >= 1.0 && !matches!(d, Dist::Uniform(a, _) if a < 1.0) => d,
                Ok(_) => {
                    errors.push(at(src, t.span(), "`requests_per_session` must be at least 1".into()));
                    Dist::Fixed(1.0)
                }
                Err(e) => {
                    errors.push(at(src, t.span(), e));
                    Dist::Fixed(1.0)
                }
            }
        }
    };
    let name = |s: &Option<Spanned<String>>, what: &str, errors: &mut Vec<Located>| {
        let s = s.as_ref()?;
        let ok =
            !s.get_ref().is_empty() && s.get_ref().bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !ok {
            errors.push(at(src, s.span(), format!("`{what}` must be a {what} name, like \"X-User\"")));
        }
        Some(s.get_ref().clone())
    };
    let _ = span;
    Workload {
        clients: if replaying { 0 } else { clients.clamp(1, 4_000_000) as u32 },
        clients_per_ip: clients_per_ip.clamp(1, 65_536) as u32,
        ramp_ms: match &w.ramp {
            Some(r) => duration(src, r, errors).unwrap_or(0),
            None => 60_000,
        },
        requests_per_session: requests,
        think_ms: think,
        away_ms: ms(&w.away_time, "exp(10m)", errors),
        service_ms: ms(&w.service_time, "0ms", errors),
        header: name(&w.header, "header", errors).map(|h| h.to_ascii_lowercase()),
        app_cookie: name(&w.app_cookie, "cookie", errors),
        replay: None,
    }
}

/// The log a workload replays, read far enough to know it is one of Tether's JSON access
/// logs and when it starts and ends.
fn replay(src: &str, w: &Spanned<WorkloadFile>, dir: Option<&Path>, errors: &mut Vec<Located>) -> Option<Replay> {
    let w = w.get_ref();
    let file = w.replay.as_ref()?;
    let session_idle_ms = match &w.session_idle {
        Some(s) => match duration(src, s, errors) {
            Some(d) if d == 0 || d > MAX_DURATION_MS => {
                errors.push(at(src, s.span(), "`session_idle` must be at least 1ms and at most 365d".into()));
                return None;
            }
            Some(d) => d,
            None => return None,
        },
        None => 30 * 60_000,
    };
    let pool = w.pool.as_ref().map(|p| p.get_ref().clone());
    if file.get_ref().is_empty() {
        errors.push(at(src, file.span(), "`replay` names no file".into()));
        return None;
    }
    let path = dir.unwrap_or(Path::new(".")).join(file.get_ref());
    match super::replay::probe(&path) {
        Ok((first_ms, last_ms, first_pool)) => Some(Replay {
            path,
            shown: file.get_ref().clone(),
            pool: pool.or(first_pool),
            first_ms,
            last_ms,
            session_idle_ms,
        }),
        Err(e) => {
            errors.push(at(src, file.span(), e));
            None
        }
    }
}

/// `"5s"`, `"exp(5s)"`, `"uniform(1s, 10s)"` (durations, in ms) or `"20"`, `"exp(20)"`,
/// `"uniform(5, 50)"` (counts).
fn dist(s: &str, durations: bool) -> Result<Dist, String> {
    let value = |v: &str| -> Result<f64, String> {
        if durations {
            config::parse_duration(v).map(|d| d.as_millis() as f64)
        } else {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| format!("\"{}\" is not a count", v.trim()))
        }
    };
    let expected = || {
        let x = if durations { "5s" } else { "20" };
        let y = if durations { "uniform(1s, 10s)" } else { "uniform(5, 50)" };
        format!("\"{s}\" is not a distribution: expected \"{x}\", \"exp({x})\" or \"{y}\"")
    };
    let s = s.trim();
    let Some((kind, args)) = s.strip_suffix(')').and_then(|r| r.split_once('(')) else {
        return value(s).map(Dist::Fixed).map_err(|e| format!("{e} ({})", expected()));
    };
    match (kind.trim(), args.split(',').collect::<Vec<_>>().as_slice()) {
        ("exp", [m]) => value(m).map(Dist::Exp),
        ("uniform", [a, b]) => {
            let (a, b) = (value(a)?, value(b)?);
            if a > b {
                return Err(format!("\"{s}\": the low end is above the high end"));
            }
            Ok(Dist::Uniform(a, b))
        }
        _ => Err(expected()),
    }
}

fn events(
    src: &str,
    events: &[EventFile],
    strategies: &[Strategy],
    duration_ms: u64,
    errors: &mut Vec<Located>,
) -> Vec<Event> {
    // The backends of each strategy's pools as the timeline changes them, to check names
    // (a split's pools may share a name: an event acts on each backend of that name).
    let mut members: Vec<Vec<String>> = strategies
        .iter()
        .map(|s| s.config.pools.iter().flat_map(|p| p.backends.iter().map(|b| b.name.clone())).collect())
        .collect();
    // Each split strategy's weights by pool name, as the timeline changes them.
    let mut weights: Vec<Vec<(String, u32)>> = strategies
        .iter()
        .map(|s| {
            let members = s.split().map_or(&[][..], |sp| &sp.members[..]);
            members.iter().map(|m| (s.config.pools[m.pool].name.clone(), m.weight)).collect()
        })
        .collect();
    // Every name a strategy ever has, for the engine's limit on backends.
    let mut seen: Vec<Vec<String>> = members.clone();
    for s in strategies {
        // Backends from DNS are found by looking names up, which a simulation does not do:
        // it would silently run without them.
        if let Some(p) = s.config.pools.iter().find(|p| !p.dns.is_empty()) {
            let msg = format!(
                "pool \"{}\" takes backends from DNS, which the simulator does not look up: list them in `backends` (and add or remove them with events)",
                p.name
            );
            errors.push(Located { line: 0, column: 0, message: msg });
        }
    }
    for (s, names) in strategies.iter().zip(&seen) {
        if names.len() > MAX_BACKENDS {
            let msg =
                format!("pool \"{}\" has {} backends: the simulator takes at most {MAX_BACKENDS}", s.name, names.len());
            errors.push(Located { line: 0, column: 0, message: msg });
        }
    }
    let mut out = Vec::new();
    let mut last = 0;
    for e in events {
        let Some(at_ms) = duration(src, &e.at, errors) else { continue };
        if at_ms < last {
            errors.push(at(src, e.at.span(), "events must be in time order".into()));
        }
        if at_ms > duration_ms && duration_ms > 0 {
            errors.push(at(src, e.at.span(), "this event is after the end of the run (`duration`)".into()));
        }
        last = at_ms;
        let backend = || -> Result<&Spanned<String>, Located> {
            e.backend
                .as_ref()
                .ok_or_else(|| at(src, e.action.span(), format!("`{}` needs `backend`", e.action.get_ref())))
        };
        if let (Some(p), false) = (&e.pool, e.action.get_ref() == "split_weight") {
            errors.push(at(src, p.span(), "`pool` is for `split_weight` events".into()));
            continue;
        }
        let action = match e.action.get_ref().as_str() {
            "reload" => Ok(Action::Reload),
            "split_weight" => split_weight(src, e),
            "fail" => backend().map(|b| Action::Fail(b.get_ref().clone())),
            "recover" => backend().map(|b| Action::Recover(b.get_ref().clone())),
            "drain" => backend().map(|b| Action::State(b.get_ref().clone(), AdminState::Draining)),
            "enable" => backend().map(|b| Action::State(b.get_ref().clone(), AdminState::Enabled)),
            "disable" => backend().map(|b| Action::State(b.get_ref().clone(), AdminState::Disabled)),
            "remove" => backend().map(|b| Action::Remove(b.get_ref().clone())),
            "weight" => backend().and_then(|b| match &e.weight {
                Some(w) if (1..=1000).contains(w.get_ref()) => Ok(Action::Weight(b.get_ref().clone(), *w.get_ref() as u32)),
                Some(w) => Err(at(src, w.span(), format!("`weight` must be 1 to 1000, not {}", w.get_ref()))),
                None => Err(at(src, e.action.span(), "`weight` needs `weight`".into())),
            }),
            "add" => backend().and_then(|b| {
                let Some(addr) = &e.address else {
                    return Err(at(src, e.action.span(), "`add` needs `address`".into()));
                };
                let address = addr.get_ref().parse().map_err(|_| {
                    at(src, addr.span(), format!("\"{}\" is not an address like \"10.0.0.11:8080\"", addr.get_ref()))
                })?;
                let weight = match &e.weight {
                    Some(w) if (1..=1000).contains(w.get_ref()) => *w.get_ref() as u32,
                    Some(w) => return Err(at(src, w.span(), format!("`weight` must be 1 to 1000, not {}", w.get_ref()))),
                    None => 1,
                };
                let name = b.get_ref().clone();
                Ok(Action::Add(config::Backend { name, address, weight, state: AdminState::Enabled, max_connections: None }))
            }),
            other => Err(at(
                src,
                e.action.span(),
                format!(
                    "unknown action \"{other}\": expected \"fail\", \"recover\", \"drain\", \"enable\", \"disable\", \"remove\", \"add\", \"weight\", \"reload\" or \"split_weight\""
                ),
            )),
        };
        let action = match action {
            Ok(a) => a,
            Err(l) => {
                errors.push(l);
                continue;
            }
        };
        if let Action::SplitWeight(pool, weight) = &action {
            let span = e.pool.as_ref().map_or(e.action.span(), |p| p.span());
            let mut any = false;
            for (s, w) in strategies.iter().zip(&mut weights) {
                let Some(k) = w.iter().position(|(p, _)| p == pool) else { continue };
                any = true;
                w[k].1 = *weight;
                if w.iter().all(|(_, w)| *w == 0) {
                    let msg = format!("this would leave every pool of split \"{}\" at weight 0", s.name);
                    errors.push(at(src, e.weight.as_ref().map_or(span.clone(), |w| w.span()), msg));
                }
            }
            if !any {
                errors.push(at(src, span, format!("no split strategy has a pool \"{pool}\"")));
            }
            out.push(Event { at_ms, action });
            continue;
        }
        // Every strategy's pools must have (or, for `add`, not have) the backend.
        for (k, (s, names)) in strategies.iter().zip(&mut members).enumerate() {
            let span = e.backend.as_ref().map_or(e.action.span(), |b| b.span());
            if let (Action::Add(_), Some(_)) = (&action, s.split()) {
                let msg = format!(
                    "strategy \"{}\" is a split: `add` is not simulated for splits (list the backend in its pool)",
                    s.name
                );
                errors.push(at(src, span, msg));
                break;
            }
            let (name, must_exist) = match &action {
                Action::Reload | Action::SplitWeight(..) => continue,
                Action::Add(b) => (&b.name, false),
                Action::Fail(n)
                | Action::Recover(n)
                | Action::State(n, _)
                | Action::Remove(n)
                | Action::Weight(n, _) => (n, true),
            };
            let exists = names.contains(name);
            if exists != must_exist {
                let msg = if must_exist && s.split().is_some() {
                    format!("split \"{}\" has no backend \"{name}\" in any of its pools at this point", s.name)
                } else if must_exist {
                    format!("pool \"{}\" has no backend \"{name}\" at this point", s.name)
                } else {
                    format!("pool \"{}\" already has a backend \"{name}\"", s.name)
                };
                errors.push(at(src, span, msg));
                break;
            }
            if let Action::Add(b) = &action {
                let seen = &mut seen[k];
                if !seen.contains(&b.name) {
                    seen.push(b.name.clone());
                }
                if seen.len() > MAX_BACKENDS {
                    errors.push(at(
                        src,
                        span,
                        format!("pool \"{}\" would have had more than {MAX_BACKENDS} backends", s.name),
                    ));
                    break;
                }
            }
            match &action {
                Action::Add(b) => names.push(b.name.clone()),
                Action::Remove(n) => names.retain(|x| x != n),
                _ => {}
            }
        }
        out.push(Event { at_ms, action });
    }
    out
}

/// A `split_weight` event: `pool` and `weight` (0 to 1000), nothing else.
fn split_weight(src: &str, e: &EventFile) -> Result<Action, Located> {
    if let Some(b) = &e.backend {
        return Err(at(src, b.span(), "`split_weight` takes `pool` and `weight`, not `backend`".into()));
    }
    let Some(pool) = &e.pool else {
        return Err(at(src, e.action.span(), "`split_weight` needs `pool`".into()));
    };
    let max = i64::from(config::MAX_SPLIT_WEIGHT);
    match &e.weight {
        Some(w) if (0..=max).contains(w.get_ref()) => {
            Ok(Action::SplitWeight(pool.get_ref().clone(), *w.get_ref() as u32))
        }
        Some(w) => Err(at(src, w.span(), format!("`weight` must be 0 to {max}, not {}", w.get_ref()))),
        None => Err(at(src, e.action.span(), "`split_weight` needs `weight`".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_roots() {
        assert_eq!(table_root("[workload]\n").as_deref(), Some("workload"));
        assert_eq!(table_root("  [[events]] # x").as_deref(), Some("events"));
        assert_eq!(table_root("[pools.web.affinity]").as_deref(), Some("pools"));
        assert_eq!(table_root("[\"pools\".x]").as_deref(), Some("pools"));
        assert_eq!(table_root("[1, 2],"), None);
        assert_eq!(table_root("keys = [\"a\"]"), None);
    }

    #[test]
    fn blanking_keeps_line_numbers() {
        let src = "[simulate]\nduration = \"1m\"\n[pools.a]\nbackends = []\n[[events]]\nat = \"1s\"\n";
        let b = blank_sim_tables(src);
        assert_eq!(b, "\n\n[pools.a]\nbackends = []\n\n\n");
    }

    /// A scenario with a split strategy; the error tests break one line of it.
    const SPLIT: &str = r#"[simulate]
duration = "10m"
strategies = ["release"]
[workload]
clients = 10
[[events]]
at = "5m"
action = "split_weight"
pool = "canary"
weight = 0
[[listeners]]
bind = "127.0.0.1:8080"
[[listeners.routes]]
name = "release"
split = [{ pool = "stable", weight = 90 }, { pool = "canary", weight = 10 }]
[pools.other]
backends = [{ name = "o", address = "10.0.9.1:80" }]
[pools.canary]
backends = [{ name = "c", address = "10.0.1.1:80" }]
[pools.stable]
backends = [{ name = "s", address = "10.0.0.1:80" }, { name = "c", address = "10.0.0.2:80" }]
"#;

    fn split_error(from: &str, to: &str, expected: &str) {
        assert!(SPLIT.contains(from), "{from}");
        let src = SPLIT.replacen(from, to, 1);
        let err = parse(&src, "s.toml", None).expect_err("must be refused").to_string();
        assert_eq!(err, expected, "for {to:?}");
    }

    #[test]
    fn a_split_strategy_holds_its_pools_in_the_splits_order() {
        let sc = parse(SPLIT, "s.toml", None).unwrap();
        let [s] = &sc.strategies[..] else { panic!("one strategy") };
        let names: Vec<&str> = s.config.pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["stable", "canary"]);
        let split = s.split().expect("a split strategy");
        let members: Vec<(usize, u32)> = split.members.iter().map(|m| (m.pool, m.weight)).collect();
        assert_eq!((split.name.as_str(), members), ("release", vec![(0, 90), (1, 10)]));
        assert_eq!(sc.events[0].action, Action::SplitWeight("canary".into(), 0));
        assert_eq!(sc.events[0].action.label(), "split weight canary 0");
        // Without `strategies`: every pool, then every split.
        let all = parse(&SPLIT.replace("strategies = [\"release\"]\n", ""), "s.toml", None).unwrap();
        let names: Vec<&str> = all.strategies.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["canary", "other", "stable", "release"]);
        assert!(all.strategies[0].split().is_none());
    }

    #[test]
    fn split_events_are_checked_where_they_are_written() {
        split_error(
            "pool = \"canary\"\nweight",
            "pool = \"beta\"\nweight",
            "s.toml:9:8: no split strategy has a pool \"beta\"",
        );
        split_error("weight = 0", "weight = 1001", "s.toml:10:10: `weight` must be 0 to 1000, not 1001");
        split_error("weight = 0", "", "s.toml:8:10: `split_weight` needs `weight`");
        split_error("pool = \"canary\"\nweight", "weight", "s.toml:8:10: `split_weight` needs `pool`");
        split_error(
            "pool = \"canary\"\nweight",
            "backend = \"c\"\npool = \"canary\"\nweight",
            "s.toml:9:11: `split_weight` takes `pool` and `weight`, not `backend`",
        );
        split_error(
            "weight = 90 }, { pool = \"canary\", weight = 10 }]",
            "weight = 0 }, { pool = \"canary\", weight = 0 }]",
            "s.toml:15:9: listener \"listener-1\": split \"release\": every weight is 0, so a new session has no pool to go to",
        );
        split_error(
            "action = \"split_weight\"\npool = \"canary\"\nweight = 0",
            "action = \"split_weight\"\npool = \"stable\"\nweight = 0\n[[events]]\nat = \"6m\"\naction = \"split_weight\"\npool = \"canary\"\nweight = 0",
            "s.toml:15:10: this would leave every pool of split \"release\" at weight 0",
        );
        split_error(
            "action = \"split_weight\"\npool = \"canary\"\nweight = 0",
            "action = \"drain\"\npool = \"canary\"",
            "s.toml:9:8: `pool` is for `split_weight` events",
        );
        split_error(
            "action = \"split_weight\"\npool = \"canary\"\nweight = 0",
            "action = \"add\"\nbackend = \"n\"\naddress = \"10.0.0.9:80\"",
            "s.toml:9:11: strategy \"release\" is a split: `add` is not simulated for splits (list the backend in its pool)",
        );
        split_error(
            "strategies = [\"release\"]",
            "strategies = [\"relase\"]",
            "s.toml:3:15: strategy \"relase\" is neither a pool nor a split of the config\ns.toml:9:8: no split strategy has a pool \"canary\"",
        );
        // A backend event acts on a backend of that name in any pool of the split.
        let both = SPLIT
            .replace("action = \"split_weight\"\npool = \"canary\"\nweight = 0", "action = \"fail\"\nbackend = \"c\"");
        assert_eq!(parse(&both, "s.toml", None).unwrap().events[0].action, Action::Fail("c".into()));
        split_error(
            "action = \"split_weight\"\npool = \"canary\"\nweight = 0",
            "action = \"fail\"\nbackend = \"o\"",
            "s.toml:9:11: split \"release\" has no backend \"o\" in any of its pools at this point",
        );
    }

    #[test]
    fn distributions() {
        assert_eq!(dist("5s", true), Ok(Dist::Fixed(5000.0)));
        assert_eq!(dist("exp(250ms)", true), Ok(Dist::Exp(250.0)));
        assert_eq!(dist("uniform(1s, 3s)", true), Ok(Dist::Uniform(1000.0, 3000.0)));
        assert_eq!(dist("exp(20)", false), Ok(Dist::Exp(20.0)));
        assert!(dist("uniform(3s, 1s)", true).is_err());
        assert!(dist("normal(1s)", true).is_err());
        assert!(dist("5 parsecs", true).is_err());
        assert_eq!(Dist::Exp(10.0).at(0.0), 0.0);
        assert_eq!(Dist::Uniform(2.0, 4.0).at(0.5), 3.0);
    }
}

//! Configuration: read a TOML file, check it, and resolve it into a [`Config`].
//!
//! Two stages, as ripgrep does with its flags: [`file`] mirrors the file for serde, then
//! [`resolve`] validates every value and produces the plain, typed [`Config`] that the rest
//! of Tether uses. Every error carries the file, line and column of the offending key or
//! value and says what was expected; all errors of a file are reported at once. Only this
//! module knows TOML. It does not open sockets or resolve names beyond `host:port` lookups.

mod file;

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

// === resolved types ===

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Worker threads; 1 runs a single-threaded runtime, which is the fastest per core.
    pub threads: usize,
    /// How long in-flight requests may take to finish after SIGTERM or SIGINT.
    pub shutdown_grace: Duration,
    pub timeouts: Timeouts,
    pub access_log: AccessLog,
    /// The admin listener; `None` when the file has no `[admin]`.
    pub admin: Option<Admin>,
    pub listeners: Vec<Listener>,
    pub pools: Vec<Pool>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub bind: SocketAddr,
    /// Bearer token: writes need it when set; everything needs it off loopback.
    pub token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// TCP connect to a backend.
    pub connect: Duration,
    /// From the first byte of a request head to its end; a client dribbling its headers is cut off.
    pub request_header: Duration,
    /// How long a client keep-alive connection may sit with no request.
    pub client_idle: Duration,
    /// From sending a request to a backend to receiving its response head.
    pub backend_response: Duration,
    /// How long an idle pooled connection to a backend is kept for reuse.
    pub backend_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        // The defaults follow common practice: NGINX uses 60s for proxy_read_timeout and
        // client_header_timeout; connect is kept short because a backend that takes longer
        // than a few seconds to accept is better skipped for another one.
        Timeouts {
            connect: Duration::from_secs(3),
            request_header: Duration::from_secs(10),
            client_idle: Duration::from_secs(60),
            backend_response: Duration::from_secs(60),
            backend_idle: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AccessLog {
    pub format: LogFormat,
    /// `None` writes to standard output.
    pub path: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Off,
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub name: String,
    pub bind: SocketAddr,
    pub trusted_proxies: Vec<Cidr>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Lower-case host without port; `None` matches any host.
    pub host: Option<String>,
    pub path_prefix: String,
    /// Index into [`Config::pools`].
    pub pool: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: String,
    pub algorithm: Algorithm,
    pub backends: Vec<Backend>,
    /// Session persistence; `None` balances every request on its own.
    pub affinity: Option<Affinity>,
    /// Active checks (`None`: none) and passive checks.
    pub health: Option<Health>,
    pub retries: u32,
    pub retry_budget: f64,
    pub queue_timeout: Duration,
    pub max_queue: u32,
    pub slow_start: Option<Duration>,
    pub panic_mode: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub check: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Consecutive connect failures or 5xx that eject a backend; 0 turns passive checks off.
    pub eject_after: u32,
    pub eject_time: Duration,
    pub max_ejected: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CheckKind {
    Tcp,
    Http {
        method: String,
        path: String,
        host: Option<String>,
        expect_status: Vec<(u16, u16)>,
        expect_body: Option<String>,
    },
}

/// How a pool keeps sessions on a backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Affinity {
    /// The key chain: the first key present in a request decides.
    pub keys: Vec<KeySource>,
    /// How header, query and client-IP keys map to a backend.
    pub mapping: Mapping,
    pub on_unavailable: OnUnavailable,
    /// Lower-case name of the header that tells a backend a session moved, and why.
    pub repin_header: String,
    /// Bounded load: no backend takes new sessions beyond this factor times the mean.
    pub max_sessions_factor: Option<f64>,
    /// How long a draining backend keeps its sessions before they re-pin.
    pub drain_timeout: Option<Duration>,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    pub cookie: CookieConfig,
    pub table: TableConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Tether's own sealed cookie.
    Cookie,
    /// An application's session cookie, learned from its `Set-Cookie`.
    AppCookie(String),
    /// A request header (lower-case name).
    Header(String),
    Query(String),
    ClientIp,
}

impl KeySource {
    /// The kind as it is written in the config and hashed into keys.
    pub fn kind(&self) -> &'static str {
        match self {
            KeySource::Cookie => "cookie",
            KeySource::AppCookie(_) => "app_cookie",
            KeySource::Header(_) => "header",
            KeySource::Query(_) => "query",
            KeySource::ClientIp => "client_ip",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Learned in the stick table on first sight.
    Table,
    /// Stateless consistent hashing (Maglev).
    Hash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnavailable {
    /// Move the session to another backend and tell it so.
    Repin,
    /// Answer 503 rather than move the session.
    Strict,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CookieConfig {
    pub name: String,
    pub idle_timeout: Duration,
    pub absolute_timeout: Option<Duration>,
    pub domain: Option<String>,
    pub path: String,
    pub same_site: crate::affinity::cookies::SameSite,
    /// `None`: `Secure` exactly on TLS listeners.
    pub secure: Option<bool>,
    pub http_only: bool,
    /// `None`: a browser-session cookie.
    pub max_age: Option<Duration>,
    /// Base64 keys, checked; the first seals. Empty: Tether generates one at start.
    pub keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TableConfig {
    pub capacity: usize,
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
    LeastConn,
    P2c,
    Random,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::LeastConn => "least_conn",
            Algorithm::P2c => "p2c",
            Algorithm::Random => "random",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    /// The backend's identity: it survives reloads and restarts.
    pub name: String,
    pub address: SocketAddr,
    pub weight: u32,
    pub state: AdminState,
    /// Connections (requests in flight) at most; more wait in a queue. `None`: no limit.
    pub max_connections: Option<u32>,
}

/// What an operator allows a backend to take, independent of its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    Enabled,
    Draining,
    Disabled,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Enabled => "enabled",
            AdminState::Draining => "draining",
            AdminState::Disabled => "disabled",
        }
    }
}

/// The largest weight a backend may have. Weights expand into a round-robin sequence whose
/// length is their sum divided by their gcd, so a bound keeps that table small.
pub const MAX_WEIGHT: u32 = 1000;

/// An IP network such as `10.0.0.0/8`, used for trusted proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr =
            addr.trim().parse().map_err(|_| format!("\"{s}\" is not an IP address or network like 10.0.0.0/8"))?;
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("\"{s}\": prefix length must be 0 to {max}")),
            },
        };
        Ok(Cidr { addr, prefix })
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) are treated as the IPv4 address they carry,
/// so a dual-stack listener matches the same networks as an IPv4 one.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

// === errors ===

/// One problem in a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Everything wrong with one config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub errors: Vec<Located>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if e.line == 0 {
                write!(f, "{}: {}", self.file, e.message)?;
            } else {
                write!(f, "{}:{}:{}: {}", self.file, e.line, e.column, e.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// === loading ===

/// Reads and resolves a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        errors: vec![Located { line: 0, column: 0, message: format!("cannot read: {e}") }],
    })?;
    parse(&src, &file)
}

/// Parses and resolves config text; `file` is only used in error messages.
pub fn parse(src: &str, file: &str) -> Result<Config, ConfigError> {
    let parsed: file::File = toml::from_str(src).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let mut message = e.message().trim().to_string();
        if let Some(key) = key_at(src, span.start) {
            if !message.contains(&key) {
                message = format!("key `{key}`: {message}");
            }
        }
        ConfigError { file: file.to_string(), errors: vec![locate(src, span, message)] }
    })?;
    let mut r = Resolver { src, errors: Vec::new() };
    let config = r.resolve(parsed);
    if r.errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError { file: file.to_string(), errors: r.errors })
    }
}

/// The key written on the line of `offset`, if that line reads `key = ...`, so that serde's
/// type errors (which carry only a span) can name the key too.
fn key_at(src: &str, offset: usize) -> Option<String> {
    let start = src[..offset.min(src.len())].rfind('\n').map_or(0, |i| i + 1);
    let line = src[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_start_matches('{').trim();
    let ok = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"'));
    ok.then(|| key.to_string())
}

fn locate(src: &str, span: Range<usize>, message: String) -> Located {
    let offset = span.start.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |i| offset - i - 1) + 1;
    Located { line, column, message }
}

/// Parses a duration such as `500ms`, `30s`, `5m`, `12h` or `1d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let expected = || {
        format!("\"{s}\" is not a duration: expected a number and a unit, like \"500ms\", \"30s\", \"5m\", \"12h\" or \"1d\"")
    };
    let n: u64 = digits.parse().map_err(|_| expected())?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86400)),
        _ => return Err(expected()),
    };
    Ok(d)
}

struct Resolver<'a> {
    src: &'a str,
    errors: Vec<Located>,
}

impl Resolver<'_> {
    fn error<T>(&mut self, at: &Spanned<T>, message: String) {
        self.errors.push(locate(self.src, at.span(), message));
    }

    fn duration(&mut self, v: &Option<Spanned<String>>, key: &str, default: Duration) -> Duration {
        let Some(v) = v else { return default };
        match parse_duration(v.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.error(v, format!("{key}: must be greater than zero"));
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.error(v, format!("{key}: {e}"));
                default
            }
        }
    }

    fn resolve(&mut self, f: file::File) -> Config {
        let threads = match &f.runtime.threads {
            None => 1,
            Some(t) if (1..=1024).contains(t.get_ref()) => *t.get_ref() as usize,
            Some(t) => {
                self.error(t, format!("runtime.threads: {} is out of range: expected 1 to 1024", t.get_ref()));
                1
            }
        };
        let shutdown_grace =
            self.duration(&f.runtime.shutdown_grace, "runtime.shutdown_grace", Duration::from_secs(30));
        let d = Timeouts::default();
        let t = &f.timeouts;
        let timeouts = Timeouts {
            connect: self.duration(&t.connect, "timeouts.connect", d.connect),
            request_header: self.duration(&t.request_header, "timeouts.request_header", d.request_header),
            client_idle: self.duration(&t.client_idle, "timeouts.client_idle", d.client_idle),
            backend_response: self.duration(&t.backend_response, "timeouts.backend_response", d.backend_response),
            backend_idle: self.duration(&t.backend_idle, "timeouts.backend_idle", d.backend_idle),
        };
        let access_log = self.access_log(&f.access_log);
        let admin = f.admin.as_ref().map(|a| self.admin(a));

        let pool_names: Vec<&String> = f.pools.keys().collect();
        let mut pools = Vec::new();
        for (name, pool) in &f.pools {
            pools.push(self.pool(name, pool));
        }
        if f.pools.is_empty() {
            self.errors.push(Located {
                line: 1,
                column: 1,
                message: "no pools: add at least one [pools.NAME] with backends".into(),
            });
        }
        if f.listeners.is_empty() {
            self.errors.push(Located {
                line: 1,
                column: 1,
                message: "no listeners: add at least one [[listeners]] with a bind address".into(),
            });
        }
        let mut listeners = Vec::new();
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        for (i, l) in f.listeners.iter().enumerate() {
            let listener = self.listener(i, l, &pool_names);
            if !names.insert(listener.name.clone()) {
                let at = l.name.as_ref().unwrap_or(&l.bind);
                self.error(at, format!("listener \"{}\": the name is used twice", listener.name));
            }
            if listener.bind.port() != 0 && !binds.insert(listener.bind) {
                self.error(&l.bind, format!("listener \"{}\": bind {} is used twice", listener.name, listener.bind));
            }
            listeners.push(listener);
        }
        Config { threads, shutdown_grace, timeouts, access_log, admin, listeners, pools }
    }

    fn admin(&mut self, a: &Spanned<file::Admin>) -> Admin {
        let f = a.get_ref();
        let bind = match &f.bind {
            None => SocketAddr::from(([127, 0, 0, 1], 9901)),
            Some(b) => match b.get_ref().parse::<SocketAddr>() {
                Ok(addr) => addr,
                Err(_) => {
                    self.error(
                        b,
                        format!("admin.bind \"{}\" is not an IP address and port like 127.0.0.1:9901", b.get_ref()),
                    );
                    SocketAddr::from(([127, 0, 0, 1], 9901))
                }
            },
        };
        let token = match &f.token {
            Some(t) if t.get_ref().len() < 16 => {
                self.error(t, "admin.token: must be at least 16 characters".into());
                None
            }
            t => t.as_ref().map(|t| t.get_ref().clone()),
        };
        if !bind.ip().is_loopback() && token.is_none() {
            let at = f.bind.as_ref().map_or(a.span(), |b| b.span());
            self.errors.push(locate(
                self.src,
                at,
                format!("admin.bind {bind} is not a loopback address: set admin.token so the admin API is not open to the network"),
            ));
        }
        Admin { bind, token }
    }

    fn access_log(&mut self, a: &file::AccessLog) -> AccessLog {
        let format = match &a.format {
            None => LogFormat::Text,
            Some(v) => {
                match v.get_ref().as_str() {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    "off" => LogFormat::Off,
                    other => {
                        self.error(v, format!("access_log.format: \"{other}\" is not a format: expected \"text\", \"json\" or \"off\""));
                        LogFormat::Text
                    }
                }
            }
        };
        let path = match &a.path {
            None => None,
            Some(p) if p.get_ref() == "-" => None,
            Some(p) if p.get_ref().is_empty() => {
                self.error(p, "access_log.path: must not be empty (use \"-\" for standard output)".into());
                None
            }
            Some(p) => Some(p.get_ref().clone()),
        };
        AccessLog { format, path }
    }

    fn listener(&mut self, i: usize, l: &file::Listener, pools: &[&String]) -> Listener {
        let name = l.name.as_ref().map_or_else(|| format!("listener-{}", i + 1), |n| n.get_ref().clone());
        let bind = match l.bind.get_ref().parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.error(
                    &l.bind,
                    format!(
                        "listener \"{name}\": bind \"{}\" is not an IP address and port like 127.0.0.1:8080",
                        l.bind.get_ref()
                    ),
                );
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        };
        if let Some(p) = &l.protocol {
            if p.get_ref() != "http" {
                self.error(
                    p,
                    format!(
                        "listener \"{name}\": protocol \"{}\" is not supported yet: expected \"http\"",
                        p.get_ref()
                    ),
                );
            }
        }
        let mut trusted_proxies = Vec::new();
        for t in &l.trusted_proxies {
            match Cidr::parse(t.get_ref()) {
                Ok(c) => trusted_proxies.push(c),
                Err(e) => self.error(t, format!("listener \"{name}\": trusted_proxies: {e}")),
            }
        }
        let mut routes = Vec::new();
        for r in &l.routes {
            let pool = self.pool_ref(&name, &r.pool, pools);
            let host = r.host.as_ref().map(|h| h.get_ref().trim().to_ascii_lowercase());
            if let (Some(h), Some(raw)) = (&host, &r.host) {
                if h.is_empty() || h.contains(['/', ' ']) {
                    self.error(raw, format!("listener \"{name}\": route host \"{h}\" is not a host name"));
                }
            }
            let path_prefix = match &r.path_prefix {
                None => "/".to_string(),
                Some(p) if p.get_ref().starts_with('/') => p.get_ref().clone(),
                Some(p) => {
                    self.error(
                        p,
                        format!("listener \"{name}\": route path_prefix \"{}\" must start with /", p.get_ref()),
                    );
                    "/".to_string()
                }
            };
            routes.push(Route { host: host.map(|h| strip_port(&h).to_string()), path_prefix, pool });
        }
        if let Some(p) = &l.pool {
            let pool = self.pool_ref(&name, p, pools);
            routes.push(Route { host: None, path_prefix: "/".into(), pool });
        }
        if routes.is_empty() {
            self.error(
                &l.bind,
                format!("listener \"{name}\": no routes: set `pool = \"NAME\"` or add [[listeners.routes]]"),
            );
        }
        Listener { name, bind, trusted_proxies, routes }
    }

    fn pool_ref(&mut self, listener: &str, p: &Spanned<String>, pools: &[&String]) -> usize {
        match pools.iter().position(|n| *n == p.get_ref()) {
            Some(i) => i,
            None => {
                let known: Vec<String> = pools.iter().map(|n| format!("\"{n}\"")).collect();
                self.error(
                    p,
                    format!(
                        "listener \"{listener}\": pool \"{}\" is not defined (pools: {})",
                        p.get_ref(),
                        known.join(", ")
                    ),
                );
                0
            }
        }
    }

    fn pool(&mut self, name: &str, p: &Spanned<file::Pool>) -> Pool {
        let algorithm = match &p.get_ref().algorithm {
            None => Algorithm::RoundRobin,
            Some(a) => match a.get_ref().as_str() {
                "round_robin" => Algorithm::RoundRobin,
                "least_conn" => Algorithm::LeastConn,
                "p2c" => Algorithm::P2c,
                "random" => Algorithm::Random,
                other => {
                    self.error(
                        a,
                        format!("pool \"{name}\": algorithm \"{other}\" is not known: expected \"round_robin\", \"least_conn\", \"p2c\" or \"random\""),
                    );
                    Algorithm::RoundRobin
                }
            },
        };
        let mut backends: Vec<Backend> = Vec::new();
        for b in &p.get_ref().backends {
            let Some(backend) = self.backend(name, b) else { continue };
            if backends.iter().any(|o| o.name == backend.name) {
                self.error(b, format!("pool \"{name}\": backend \"{}\": the name is used twice", backend.name));
                continue;
            }
            backends.push(backend);
        }
        if p.get_ref().backends.is_empty() {
            self.error(p, format!("pool \"{name}\": no backends"));
        }
        let affinity = p.get_ref().affinity.as_ref().map(|a| self.affinity(name, a));
        let f = p.get_ref();
        let health = f.health.as_ref().map(|h| self.health(name, h));
        let retries = match &f.retries {
            None => 1,
            Some(r) if (0..=5).contains(r.get_ref()) => *r.get_ref() as u32,
            Some(r) => {
                self.error(r, format!("pool \"{name}\": retries {} is out of range: expected 0 to 5", r.get_ref()));
                1
            }
        };
        let retry_budget = match &f.retry_budget {
            None => 0.2,
            Some(r) if (0.0..=1.0).contains(r.get_ref()) => *r.get_ref(),
            Some(r) => {
                self.error(
                    r,
                    format!("pool \"{name}\": retry_budget {} is out of range: expected 0.0 to 1.0", r.get_ref()),
                );
                0.2
            }
        };
        let queue_timeout =
            self.duration(&f.queue_timeout, &format!("pool \"{name}\": queue_timeout"), Duration::from_secs(5));
        let slow_start = f
            .slow_start
            .as_ref()
            .map(|_| self.duration(&f.slow_start, &format!("pool \"{name}\": slow_start"), Duration::ZERO));
        let max_queue = match &f.max_queue {
            None => 1000,
            Some(q) if (0..=1_000_000).contains(q.get_ref()) => *q.get_ref() as u32,
            Some(q) => {
                self.error(
                    q,
                    format!("pool \"{name}\": max_queue {} is out of range: expected 0 to 1000000", q.get_ref()),
                );
                1000
            }
        };
        let panic_mode = f.panic_mode.as_ref().is_some_and(|p| *p.get_ref());
        Pool {
            name: name.to_string(),
            algorithm,
            backends,
            affinity,
            health,
            retries,
            retry_budget,
            queue_timeout,
            max_queue,
            slow_start,
            panic_mode,
        }
    }

    fn health(&mut self, pool: &str, h: &Spanned<file::Health>) -> Health {
        let at = format!("pool \"{pool}\": health");
        let f = h.get_ref();
        let int = |r: &mut Self, v: &Option<Spanned<i64>>, key: &str, default: u32, min: i64| -> u32 {
            match v {
                None => default,
                Some(x) if (min..=1000).contains(x.get_ref()) => *x.get_ref() as u32,
                Some(x) => {
                    r.error(x, format!("{at}: {key} {} is out of range: expected {min} to 1000", x.get_ref()));
                    default
                }
            }
        };
        let rise = int(self, &f.rise, "rise", 2, 1);
        let fall = int(self, &f.fall, "fall", 3, 1);
        let eject_after = int(self, &f.eject_after, "eject_after", 5, 0);
        let interval = self.duration(&f.interval, &format!("{at}: interval"), Duration::from_secs(2));
        let timeout = self.duration(&f.timeout, &format!("{at}: timeout"), Duration::from_secs(1));
        let eject_time = self.duration(&f.eject_time, &format!("{at}: eject_time"), Duration::from_secs(10));
        let max_ejected = match &f.max_ejected {
            None => 0.5,
            Some(m) if (0.0..=1.0).contains(m.get_ref()) => *m.get_ref(),
            Some(m) => {
                self.error(m, format!("{at}: max_ejected {} is out of range: expected 0.0 to 1.0", m.get_ref()));
                0.5
            }
        };
        let kind = f.check.as_ref().map_or("http", |c| c.get_ref().as_str());
        let check = match kind {
            "tcp" => CheckKind::Tcp,
            "http" => {
                let method = f.method.as_ref().map_or("GET".to_string(), |m| m.get_ref().to_ascii_uppercase());
                if let Some(m) =
                    f.method.as_ref().filter(|_| method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()))
                {
                    self.error(m, format!("{at}: method \"{method}\" is not an HTTP method"));
                }
                let path = match &f.path {
                    None => "/".to_string(),
                    Some(p) if p.get_ref().starts_with('/') && !p.get_ref().contains([' ', '\r', '\n']) => {
                        p.get_ref().clone()
                    }
                    Some(p) => {
                        self.error(p, format!("{at}: path \"{}\" must start with / and have no spaces", p.get_ref()));
                        "/".to_string()
                    }
                };
                let host = f.host.as_ref().map(|h| h.get_ref().clone());
                let expect_status = match &f.expect_status {
                    None => vec![(200, 399)],
                    Some(s) => match parse_statuses(s.get_ref()) {
                        Some(v) => v,
                        None => {
                            self.error(s, format!("{at}: expect_status \"{}\" is not a list of statuses like \"200-399\" or \"200,204\"", s.get_ref()));
                            vec![(200, 399)]
                        }
                    },
                };
                let expect_body = f.expect_body.as_ref().map(|b| b.get_ref().clone());
                CheckKind::Http { method, path, host, expect_status, expect_body }
            }
            other => {
                let c = f.check.as_ref().expect("a kind other than the default was written");
                self.error(c, format!("{at}: check \"{other}\" is not known: expected \"http\" or \"tcp\""));
                CheckKind::Tcp
            }
        };
        if timeout > interval {
            let msg = format!("{at}: timeout {timeout:?} is longer than the interval {interval:?}");
            match &f.timeout {
                Some(t) => self.error(t, msg),
                None => self.error(h, msg),
            }
        }
        Health { check, interval, timeout, rise, fall, eject_after, eject_time, max_ejected }
    }

    fn affinity(&mut self, pool: &str, a: &Spanned<file::Affinity>) -> Affinity {
        let at = format!("pool \"{pool}\": affinity");
        let f = a.get_ref();
        let mut keys: Vec<KeySource> = Vec::new();
        for k in f.keys.get_ref() {
            let raw = k.get_ref().trim();
            let (kind, arg) = match raw.split_once(':') {
                Some((kind, arg)) => (kind.trim(), Some(arg.trim())),
                None => (raw, None),
            };
            let key = match (kind, arg) {
                ("cookie", None) => Some(KeySource::Cookie),
                ("client_ip", None) => Some(KeySource::ClientIp),
                ("app_cookie", Some(n)) if is_token(n) => Some(KeySource::AppCookie(n.to_string())),
                ("header", Some(n)) if http::HeaderName::from_bytes(n.as_bytes()).is_ok() => {
                    Some(KeySource::Header(n.to_ascii_lowercase()))
                }
                ("query", Some(n)) if !n.is_empty() && !n.contains(['&', '=', ' ', '#']) => {
                    Some(KeySource::Query(n.to_string()))
                }
                _ => None,
            };
            match key {
                Some(key) if keys.contains(&key) => self.error(k, format!("{at}: key \"{raw}\" is listed twice")),
                Some(key) => keys.push(key),
                None => self.error(
                    k,
                    format!("{at}: key \"{raw}\" is not known: expected \"cookie\", \"app_cookie:NAME\", \"header:NAME\", \"query:NAME\" or \"client_ip\""),
                ),
            }
        }
        if f.keys.get_ref().is_empty() {
            self.error(&f.keys, format!("{at}: keys is empty: list at least one key, like [\"cookie\"]"));
        }
        let mapping = match &f.mapping {
            None => Mapping::Table,
            Some(m) => match m.get_ref().as_str() {
                "table" => Mapping::Table,
                "hash" => Mapping::Hash,
                other => {
                    self.error(m, format!("{at}: mapping \"{other}\" is not known: expected \"table\" or \"hash\""));
                    Mapping::Table
                }
            },
        };
        let on_unavailable = match &f.on_unavailable {
            None => OnUnavailable::Repin,
            Some(m) => match m.get_ref().as_str() {
                "repin" => OnUnavailable::Repin,
                "strict" => OnUnavailable::Strict,
                other => {
                    self.error(
                        m,
                        format!("{at}: on_unavailable \"{other}\" is not known: expected \"repin\" or \"strict\""),
                    );
                    OnUnavailable::Repin
                }
            },
        };
        let repin_header = match &f.repin_header {
            None => "tether-session-repinned".to_string(),
            Some(h) if http::HeaderName::from_bytes(h.get_ref().as_bytes()).is_ok() => h.get_ref().to_ascii_lowercase(),
            Some(h) => {
                self.error(h, format!("{at}: repin_header \"{}\" is not a header name", h.get_ref()));
                "tether-session-repinned".to_string()
            }
        };
        let max_sessions_factor = match &f.max_sessions_factor {
            None => None,
            Some(v) if v.get_ref().is_finite() && *v.get_ref() >= 1.0 => Some(*v.get_ref()),
            Some(v) => {
                self.error(v, format!("{at}: max_sessions_factor {} must be at least 1.0 (1.25 lets a backend take 25% more than the mean)", v.get_ref()));
                None
            }
        };
        let drain_timeout = f
            .drain_timeout
            .as_ref()
            .map(|_| self.duration(&f.drain_timeout, &format!("{at}: drain_timeout"), Duration::ZERO));
        let ipv4_prefix = self.prefix(&f.ipv4_prefix, 32, &at, "ipv4_prefix");
        let ipv6_prefix = self.prefix(&f.ipv6_prefix, 128, &at, "ipv6_prefix").min(128);
        let ipv6_prefix = if f.ipv6_prefix.is_none() { 64 } else { ipv6_prefix };
        let cookie = self.cookie(&at, f.cookie.as_ref());
        if let Some(c) = &f.cookie {
            if !keys.contains(&KeySource::Cookie) {
                self.error(c, format!("{at}: a [cookie] section is set but \"cookie\" is not among the keys"));
            }
        }
        let table = match &f.table {
            None => TableConfig { capacity: 100_000, idle_timeout: Duration::from_secs(30 * 60) },
            Some(t) => {
                let t = t.get_ref();
                let capacity = match &t.capacity {
                    None => 100_000,
                    Some(c) if (1..=100_000_000).contains(c.get_ref()) => *c.get_ref() as usize,
                    Some(c) => {
                        self.error(
                            c,
                            format!("{at}: table.capacity {} is out of range: expected 1 to 100000000", c.get_ref()),
                        );
                        100_000
                    }
                };
                let idle_timeout =
                    self.duration(&t.idle_timeout, &format!("{at}: table.idle_timeout"), Duration::from_secs(30 * 60));
                TableConfig { capacity, idle_timeout }
            }
        };
        Affinity {
            keys,
            mapping,
            on_unavailable,
            repin_header,
            max_sessions_factor,
            drain_timeout,
            ipv4_prefix,
            ipv6_prefix,
            cookie,
            table,
        }
    }

    fn prefix(&mut self, v: &Option<Spanned<i64>>, max: i64, at: &str, key: &str) -> u8 {
        match v {
            None => max as u8,
            Some(p) if (1..=max).contains(p.get_ref()) => *p.get_ref() as u8,
            Some(p) => {
                self.error(p, format!("{at}: {key} {} is out of range: expected 1 to {max}", p.get_ref()));
                max as u8
            }
        }
    }

    fn cookie(&mut self, at: &str, c: Option<&Spanned<file::Cookie>>) -> CookieConfig {
        use crate::affinity::cookies::SameSite;
        let mut cfg = CookieConfig {
            name: "tether".into(),
            idle_timeout: Duration::from_secs(30 * 60),
            absolute_timeout: Some(Duration::from_secs(12 * 3600)),
            domain: None,
            path: "/".into(),
            same_site: SameSite::Lax,
            secure: None,
            http_only: true,
            max_age: None,
            keys: Vec::new(),
        };
        let Some(c) = c else { return cfg };
        let c = c.get_ref();
        if let Some(n) = &c.name {
            if is_token(n.get_ref()) {
                cfg.name = n.get_ref().clone();
            } else {
                self.error(
                    n,
                    format!(
                        "{at}: cookie.name \"{}\" is not a cookie name (letters, digits and !#$%&'*+-.^_`|~)",
                        n.get_ref()
                    ),
                );
            }
        }
        cfg.idle_timeout = self.duration(&c.idle_timeout, &format!("{at}: cookie.idle_timeout"), cfg.idle_timeout);
        if let Some(a) = &c.absolute_timeout {
            cfg.absolute_timeout = match a.get_ref().as_str() {
                "none" => None,
                _ => Some(self.duration(
                    &c.absolute_timeout,
                    &format!("{at}: cookie.absolute_timeout"),
                    Duration::from_secs(12 * 3600),
                )),
            };
        }
        if let Some(d) = &c.domain {
            if d.get_ref().is_empty() || d.get_ref().contains([';', ' ', ',', '/']) {
                self.error(d, format!("{at}: cookie.domain \"{}\" is not a domain", d.get_ref()));
            } else {
                cfg.domain = Some(d.get_ref().clone());
            }
        }
        if let Some(p) = &c.path {
            if p.get_ref().starts_with('/') && !p.get_ref().contains([';', ' ']) {
                cfg.path = p.get_ref().clone();
            } else {
                self.error(
                    p,
                    format!("{at}: cookie.path \"{}\" must start with / and have no ; or spaces", p.get_ref()),
                );
            }
        }
        if let Some(s) = &c.same_site {
            cfg.same_site = match s.get_ref().to_ascii_lowercase().as_str() {
                "lax" => SameSite::Lax,
                "strict" => SameSite::Strict,
                "none" => SameSite::None,
                _ => {
                    self.error(
                        s,
                        format!(
                            "{at}: cookie.same_site \"{}\" is not known: expected \"Lax\", \"Strict\" or \"None\"",
                            s.get_ref()
                        ),
                    );
                    SameSite::Lax
                }
            };
        }
        cfg.secure = c.secure.as_ref().map(|s| *s.get_ref());
        cfg.http_only = c.http_only.as_ref().is_none_or(|h| *h.get_ref());
        if let Some(m) = &c.max_age {
            cfg.max_age = match m.get_ref().as_str() {
                "session" => None,
                _ => Some(self.duration(&c.max_age, &format!("{at}: cookie.max_age"), Duration::from_secs(3600))),
            };
        }
        for (i, k) in c.keys.iter().enumerate() {
            match crate::affinity::token::Key::from_base64(k.get_ref()) {
                Ok(_) => cfg.keys.push(k.get_ref().clone()),
                Err(e) => self.error(k, format!("{at}: cookie.keys[{i}]: {e}")),
            }
        }
        cfg
    }

    fn backend(&mut self, pool: &str, b: &Spanned<file::Backend>) -> Option<Backend> {
        let b = b.get_ref();
        let raw = b.address.get_ref();
        let name = b.name.as_ref().map_or_else(|| raw.clone(), |n| n.get_ref().clone());
        if let Some(n) = &b.name {
            if n.get_ref().trim().is_empty() {
                self.error(n, format!("pool \"{pool}\": backend name must not be empty"));
            }
        }
        let address = match resolve_address(raw) {
            Ok(a) => Some(a),
            Err(e) => {
                self.error(&b.address, format!("pool \"{pool}\": backend \"{name}\": address \"{raw}\" {e}"));
                None
            }
        };
        let weight = match &b.weight {
            None => 1,
            Some(w) if (1..=i64::from(MAX_WEIGHT)).contains(w.get_ref()) => *w.get_ref() as u32,
            Some(w) => {
                self.error(
                    w,
                    format!(
                        "pool \"{pool}\": backend \"{name}\": weight {} is out of range: expected 1 to {MAX_WEIGHT}",
                        w.get_ref()
                    ),
                );
                1
            }
        };
        let state = match &b.state {
            None => AdminState::Enabled,
            Some(s) => match s.get_ref().as_str() {
                "enabled" => AdminState::Enabled,
                "draining" => AdminState::Draining,
                "disabled" => AdminState::Disabled,
                other => {
                    self.error(
                        s,
                        format!("pool \"{pool}\": backend \"{name}\": state \"{other}\" is not known: expected \"enabled\", \"draining\" or \"disabled\""),
                    );
                    AdminState::Enabled
                }
            },
        };
        let max_connections = match &b.max_connections {
            None => None,
            Some(m) if (1..=1_000_000).contains(m.get_ref()) => Some(*m.get_ref() as u32),
            Some(m) => {
                self.error(m, format!("pool \"{pool}\": backend \"{name}\": max_connections {} is out of range: expected 1 to 1000000", m.get_ref()));
                None
            }
        };
        Some(Backend { name, address: address?, weight, state, max_connections })
    }
}

/// Parses `"200-399"`, `"200,204,300-302"` into inclusive ranges.
fn parse_statuses(s: &str) -> Option<Vec<(u16, u16)>> {
    let mut v = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u16, u16) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
        if !(100..=599).contains(&a) || !(100..=599).contains(&b) || a > b {
            return None;
        }
        v.push((a, b));
    }
    Some(v)
}

/// An RFC 9110 token, which is what a cookie name must be.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Resolves `host:port` once, at load time; the error completes a sentence that starts
/// with the address.
fn resolve_address(raw: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = raw.parse::<SocketAddr>() {
        return Ok(a);
    }
    if raw.parse::<IpAddr>().is_ok() || !raw.contains(':') {
        return Err("has no port: expected host:port like 10.0.0.2:8080".into());
    }
    let (_, port) = raw.rsplit_once(':').unwrap_or((raw, ""));
    if port.parse::<u16>().is_err() {
        return Err(format!("has a bad port \"{port}\": expected 1 to 65535"));
    }
    match raw.to_socket_addrs() {
        Ok(mut addrs) => addrs.next().ok_or_else(|| "resolves to no address".to_string()),
        Err(e) => Err(format!("cannot be resolved: {e}")),
    }
}

#[cfg(test)]
mod tests;

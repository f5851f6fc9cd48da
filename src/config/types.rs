//! The resolved configuration: plain, validated types that the rest of Tether uses.
//!
//! Nothing here knows TOML; [`super::parse`] builds these from the file. Where a key may be
//! left out of the file, the `Default` impls below are the values it then takes.

use std::net::SocketAddr;
use std::time::Duration;

pub use crate::affinity::token::Version as TokenVersion;
use crate::net::Cidr;

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Worker threads; 1 runs a single-threaded runtime, which is the fastest per core, and
    /// N >= 2 runs N single-threaded runtimes with a socket each per listener (see
    /// `server::Runtimes`).
    pub threads: usize,
    /// How long in-flight requests may take to finish after SIGTERM or SIGINT.
    pub shutdown_grace: Duration,
    /// Where graceful shutdown saves the learned session tables and the admin overrides,
    /// and start-up reads them back (`runtime.state_dir`; `None`: nothing is saved). See
    /// `warm`.
    pub state_dir: Option<std::path::PathBuf>,
    pub timeouts: Timeouts,
    pub access_log: AccessLog,
    pub limits: Limits,
    /// The admin listener; `None` when the file has no `[admin]`.
    pub admin: Option<Admin>,
    /// How backends from DNS are looked up (`[dns]`).
    pub dns: Dns,
    /// Redis servers that share learned pins (`[stores.NAME]`), by name.
    pub stores: Vec<Store>,
    /// The file's top-level `store`: the fleet's store, through which pools share their
    /// pins by default and the instances share admin actions (`fleet`).
    pub store: Option<String>,
    pub listeners: Vec<Listener>,
    pub pools: Vec<Pool>,
}

/// `[stores.NAME]`: a Redis server through which the instances of a fleet share the pins
/// they learn (see `store`).
#[derive(Debug, Clone, PartialEq)]
pub struct Store {
    pub name: String,
    /// `HOST:PORT`, resolved when connecting.
    pub address: String,
    /// TLS to Redis, verifying its certificate for HOST against these PEM CA certificates
    /// (empty: the system's); `None`: plain TCP.
    pub tls: Option<Vec<u8>>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub database: i64,
    /// The start of every key and channel (`PREFIX:pool:kind:HASH`, `PREFIX:moved`).
    pub prefix: String,
    /// 32 bytes, base64: the AES-256 key turning a pin's hash into its name in Redis.
    pub key: Secret,
    /// The longest a request waits for a lookup or a new pin.
    pub timeout: Duration,
    /// Refreshes and write-backs go out this often, in one pipeline.
    pub flush_interval: Duration,
    /// A key Redis did not know is not asked for again for this long.
    pub miss_ttl: Duration,
}

/// `[dns]`: the name servers `[[pools.NAME.dns]]` sources are resolved through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns {
    /// Asked in order; empty: the `nameserver`s of /etc/resolv.conf, read when a lookup
    /// starts.
    pub resolvers: Vec<SocketAddr>,
    /// The wait for one server's answer (over UDP, and again for a TCP retry).
    pub timeout: Duration,
}

impl Default for Dns {
    fn default() -> Self {
        Dns { resolvers: Vec::new(), timeout: Duration::from_secs(2) }
    }
}

/// One `[[pools.NAME.dns]]` entry: backends named by a DNS name, re-resolved every
/// `interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSource {
    /// The name as written (compared without case and trailing dot).
    pub name: String,
    /// The backends' port for A and AAAA; `None` for SRV, whose records carry it.
    pub port: Option<u16>,
    pub kind: DnsKind,
    pub interval: Duration,
    /// Each address's weight (SRV records carry their own).
    pub weight: u32,
    pub max_connections: Option<u32>,
}

impl DnsSource {
    /// The name as it is asked and compared: lower case, without the root's trailing dot.
    pub fn normalised_name(&self) -> String {
        self.name.strip_suffix('.').unwrap_or(&self.name).to_ascii_lowercase()
    }

    /// What tells one source from another in a pool, `NAME/TYPE:PORT`: the name asked,
    /// what is asked for, and the port (interval, weight and limits may change without
    /// making it a new source).
    pub fn key(&self) -> String {
        let port = self.port.map_or(String::new(), |p| format!(":{p}"));
        format!("{}/{}{port}", self.normalised_name(), self.kind.as_str())
    }
}

/// What a DNS source asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsKind {
    A,
    Aaaa,
    /// A and AAAA, both.
    Both,
    Srv,
}

impl DnsKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DnsKind::A => "a",
            DnsKind::Aaaa => "aaaa",
            DnsKind::Both => "a+aaaa",
            DnsKind::Srv => "srv",
        }
    }
}

/// What one process, or one client, may hold (`[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Client connections open at once, over all listeners; more wait in the backlog.
    pub max_client_connections: u32,
    /// Client connections one client IP may have open at once; `None`: no limit (and no
    /// per-IP counting). A limit a reload turns on counts connections opened after it.
    pub max_connections_per_ip: Option<u32>,
    /// Concurrent streams a client may open on one HTTP/2 connection.
    pub h2_max_concurrent_streams: u32,
    /// Bytes an HTTP/1 request head (request line and header lines) may take; a longer
    /// one is answered 431.
    pub max_request_head: u32,
    /// Bytes a request target (the URI as sent) may take; a longer one is answered 414.
    pub max_request_target: u32,
    /// Bytes a request body may carry; a larger one is answered 413. `None`: no limit.
    pub max_request_body: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_client_connections: 100_000,
            max_connections_per_ip: None,
            h2_max_concurrent_streams: 100,
            max_request_head: 64 * 1024,
            // 8 KiB is what NGINX and Apache allow a request line; 16 KiB leaves room for
            // the long query strings some applications use (and which tests/hostile_headers.rs
            // sends through with the defaults).
            max_request_target: 16 * 1024,
            max_request_body: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub bind: SocketAddr,
    /// Bearer token: writes need it when set; everything needs it off loopback.
    pub token: Option<Secret>,
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
    /// The longest wait for the next piece of a request body from the client.
    pub client_body: Duration,
    /// The longest a client may leave a response unread (Tether's write waits that long).
    pub client_send: Duration,
    /// The longest wait for the next piece of a response body from the backend.
    pub backend_body: Duration,
    /// How long an upgraded connection (WebSocket) may carry nothing either way.
    pub tunnel_idle: Duration,
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
            client_body: Duration::from_secs(60),
            client_send: Duration::from_secs(60),
            backend_body: Duration::from_secs(60),
            tunnel_idle: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AccessLog {
    pub format: LogFormat,
    /// `None` writes to standard output.
    pub path: Option<String>,
    /// The key (32 bytes, base64, as cookie keys) of the pseudonyms lines give sessions
    /// (`session=`); `None`: a random key for each process.
    pub session_key: Option<Secret>,
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
    /// `protocol = "https"`: TLS is terminated with these certificates.
    pub tls: Option<std::sync::Arc<crate::tls::ServerTls>>,
    /// Every request is answered `308` to `https://` on this port (`redirect_to_https`).
    pub redirect_to_https: Option<u16>,
    /// The `Strict-Transport-Security` value added to responses that have none.
    pub hsts: Option<String>,
    /// `protocol = "tcp"`: connections are forwarded whole to a pool (then `routes` is
    /// empty).
    pub tcp: Option<TcpListener>,
    /// PROXY protocol headers read from trusted sources (`proxy_protocol`); `None`: off.
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// A listener's PROXY protocol settings: connections from `from` may (`required`: must)
/// begin with a header, whose source address is then the client's; a header from
/// anyone else is refused.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyProtocol {
    pub required: bool,
    pub from: Vec<Cidr>,
}

impl ProxyProtocol {
    /// Whether `ip` may send a header.
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        self.from.iter().any(|c| c.contains(ip))
    }
}

/// What a `tcp` listener does with a connection.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpListener {
    /// Pools by the server name of a TLS ClientHello (`sni_routes`): exact names first,
    /// then the longest wildcard. Empty: the client's bytes are not waited for.
    pub sni: Vec<SniRoute>,
    /// Index into [`Config::pools`] for a connection no SNI route takes (`pool`).
    pub default_pool: Option<usize>,
    /// A connection carrying nothing either way this long is closed; `None`:
    /// `timeouts.tunnel_idle`.
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniRoute {
    /// Lower-case, without a trailing dot; `*.example.com` matches any name with one or
    /// more labels before `example.com`.
    pub name: String,
    pub pool: usize,
}

impl TcpListener {
    /// The pool for a connection whose ClientHello asked for `name` (lower-case), or that
    /// named none: an exact route, else the longest matching wildcard, else the default.
    pub fn route(&self, name: Option<&str>) -> Option<usize> {
        let Some(name) = name else { return self.default_pool };
        if let Some(r) = self.sni.iter().find(|r| r.name == name) {
            return Some(r.pool);
        }
        self.sni
            .iter()
            .filter(|r| {
                r.name.strip_prefix('*').is_some_and(|suffix| name.len() > suffix.len() && name.ends_with(suffix))
            })
            .max_by_key(|r| r.name.len())
            .map(|r| r.pool)
            .or(self.default_pool)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Lower-case host without port; `None` matches any host.
    pub host: Option<String>,
    pub path_prefix: String,
    pub to: RouteTo,
}

/// Where a route sends its requests.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteTo {
    /// One pool, by index into [`Config::pools`].
    Pool(usize),
    /// A traffic split between pools (see `split`).
    Split(Split),
}

/// A traffic split: a new session picks one of the pools by weight; a session stays in
/// the pool it was given while the weights change (see `split`).
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// Unique among the config's splits: what the admin API and the metrics call it.
    pub name: String,
    /// At least one, each pool once, weights 0 to [`MAX_SPLIT_WEIGHT`], not all 0.
    pub members: Vec<SplitMember>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SplitMember {
    /// Index into [`Config::pools`].
    pub pool: usize,
    pub weight: u32,
}

/// The largest weight of a split's pool (weights are shares: 0 takes no new session).
pub const MAX_SPLIT_WEIGHT: u32 = 1000;

impl Config {
    /// Every split of every listener's routes, with its listener's name.
    pub fn splits(&self) -> impl Iterator<Item = (&str, &Split)> {
        self.listeners.iter().flat_map(|l| {
            l.routes.iter().filter_map(move |r| match &r.to {
                RouteTo::Split(s) => Some((l.name.as_str(), s)),
                RouteTo::Pool(_) => None,
            })
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: String,
    pub algorithm: Algorithm,
    /// The backends the file lists (those from DNS are added by `control`).
    pub backends: Vec<Backend>,
    /// Sources of further backends, from DNS (`[[pools.NAME.dns]]`).
    pub dns: Vec<DnsSource>,
    /// The name servers this pool's DNS sources are asked; empty: `[dns]`'s.
    pub resolvers: Vec<SocketAddr>,
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
    /// Lower-case `Upgrade` protocol tokens a client may switch to (default: `websocket`).
    pub upgrades: Vec<String>,
    /// A PROXY protocol header, of this version, first on every backend connection
    /// (`send_proxy_protocol`); such a connection serves one client connection only.
    pub send_proxy_protocol: Option<crate::proxy_header::Version>,
    /// TLS to the backends (`None`: plain TCP).
    pub tls: Option<std::sync::Arc<crate::tls::backend::BackendTls>>,
    /// What the pool speaks to its backends.
    pub protocol: BackendProtocol,
}

/// What a pool speaks to its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendProtocol {
    Http1,
    /// HTTP/2 (`h2` by ALPN over TLS, `h2c` with prior knowledge without), on connections
    /// shared by requests, at most `max_streams` at once each.
    Http2 {
        max_streams: u32,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub check: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Consecutive faults of the backend (refused or reset connects, broken connections,
    /// response timeouts, 5xx) that eject it; 0 turns passive checks off.
    pub eject_after: u32,
    pub eject_time: Duration,
    pub max_ejected: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CheckKind {
    Tcp,
    /// The gRPC health-checking protocol (`grpc.health.v1.Health/Check`) for `service`,
    /// over the pool's HTTP/2.
    Grpc {
        service: String,
    },
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
    /// The `[stores.NAME]` this pool shares its learned pins through.
    pub store: Option<String>,
    /// Moving idle sessions off backends that hold more than their share; `None`: never.
    pub rebalance: Option<Rebalance>,
}

/// `[pools.NAME.affinity.rebalance]`: when and how fast idle sessions move to the least
/// loaded backend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rebalance {
    /// A backend is over when its sessions exceed this factor times the mean (over 1.0).
    pub factor: f64,
    /// A session with no request in flight and none for this long may move.
    pub idle: Duration,
    /// Moves per second in the pool, at most (a token bucket with a burst of as many).
    pub max_per_second: u32,
}

impl Default for Rebalance {
    fn default() -> Self {
        Rebalance { factor: 1.5, idle: Duration::from_secs(30), max_per_second: 20 }
    }
}

impl Default for Affinity {
    /// The affinity of a pool whose `[pools.NAME.affinity]` sets only `keys = ["cookie"]`.
    fn default() -> Self {
        Affinity {
            keys: vec![KeySource::Cookie],
            mapping: Mapping::Table,
            on_unavailable: OnUnavailable::Repin,
            repin_header: "tether-session-repinned".into(),
            max_sessions_factor: None,
            drain_timeout: None,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            cookie: CookieConfig::default(),
            table: TableConfig::default(),
            store: None,
            rebalance: None,
        }
    }
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
    pub(crate) fn kind(&self) -> &'static str {
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
    pub same_site: SameSite,
    /// `None`: `Secure` exactly on TLS listeners.
    pub secure: Option<bool>,
    pub http_only: bool,
    /// `None`: a browser-session cookie.
    pub max_age: Option<Duration>,
    /// Base64 keys, checked; the first seals. Empty: Tether generates one at start.
    pub keys: Vec<Secret>,
    /// Token stamps up to this far in the future are trusted.
    pub clock_skew: Duration,
    /// The token format issued; every format is opened (a fleet moves to a new one in two
    /// phases: first every instance opens it, then they issue it).
    pub token_version: TokenVersion,
}

impl Default for CookieConfig {
    fn default() -> Self {
        CookieConfig {
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
            clock_skew: Duration::from_secs(300),
            token_version: TokenVersion::V1,
        }
    }
}

/// A value that must not appear in logs or `Debug` output: cookie keys, the admin token.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::ops::Deref for Secret {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Secret {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The `SameSite` cookie attribute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SameSite {
    #[default]
    Lax,
    Strict,
    /// Sent cross-site; browsers require `Secure` with it, so rendering
    /// forces `Secure`.
    None,
}

impl SameSite {
    /// The attribute value as it is written in a `Set-Cookie` header.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
            SameSite::None => "None",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TableConfig {
    pub capacity: usize,
    pub idle_timeout: Duration,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig { capacity: 100_000, idle_timeout: Duration::from_secs(30 * 60) }
    }
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
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AdminState::Enabled => "enabled",
            AdminState::Draining => "draining",
            AdminState::Disabled => "disabled",
        }
    }
}

/// The largest weight a backend may have. Weights expand into a round-robin sequence whose
/// length is their sum divided by their gcd, so a bound keeps that table small.
pub(crate) const MAX_WEIGHT: u32 = 1000;

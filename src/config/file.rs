//! The configuration file as it is written: serde types that mirror the TOML one to one.
//!
//! Nothing here is validated beyond what serde checks (types, unknown keys); values that
//! need checking are wrapped in [`Spanned`] so that `resolve` can point at the exact line
//! and column when it rejects them. The rest of Tether never sees these types: it uses the
//! resolved [`crate::config::Config`].

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// The `[stores.NAME]` every pool with table-mapped keys shares its pins through,
    /// unless its affinity names another (or `"none"`).
    pub store: Option<Spanned<String>>,
    #[serde(default)]
    pub runtime: Runtime,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub access_log: AccessLog,
    #[serde(default)]
    pub limits: Limits,
    pub admin: Option<Spanned<Admin>>,
    /// `[dns]`: the name servers backends from DNS are resolved through.
    #[serde(default)]
    pub dns: Dns,
    /// `[stores.NAME]`: Redis servers that share learned pins across a fleet.
    #[serde(default)]
    pub stores: BTreeMap<String, Spanned<Store>>,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Keyed by pool name; a `BTreeMap` so that iteration (and so error order) is stable.
    #[serde(default)]
    pub pools: BTreeMap<String, Spanned<Pool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    pub threads: Option<Spanned<i64>>,
    pub shutdown_grace: Option<Spanned<String>>,
    pub state_dir: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    pub connect: Option<Spanned<String>>,
    pub request_header: Option<Spanned<String>>,
    pub client_idle: Option<Spanned<String>>,
    pub backend_response: Option<Spanned<String>>,
    pub backend_idle: Option<Spanned<String>>,
    pub client_body: Option<Spanned<String>>,
    pub client_send: Option<Spanned<String>>,
    pub backend_body: Option<Spanned<String>>,
    pub tunnel_idle: Option<Spanned<String>>,
}

/// `[limits]`: what one process, or one client, may hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_client_connections: Option<Spanned<i64>>,
    pub max_connections_per_ip: Option<Spanned<i64>>,
    pub h2_max_concurrent_streams: Option<Spanned<i64>>,
    pub max_request_head: Option<Spanned<i64>>,
    pub max_request_target: Option<Spanned<i64>>,
    pub max_request_body: Option<Spanned<i64>>,
}

/// `[admin]`: the admin listener (API, metrics, dashboard).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub bind: Option<Spanned<String>>,
    pub token: Option<Spanned<String>>,
    /// A file holding the token, re-read on reload.
    pub token_file: Option<Spanned<String>>,
    /// An environment variable holding the token.
    pub token_env: Option<Spanned<String>>,
}

/// `[dns]`: how backends from DNS are looked up.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// Name servers, `IP` or `IP:PORT`; default: the `nameserver`s of /etc/resolv.conf.
    pub resolvers: Option<Spanned<Vec<Spanned<String>>>>,
    /// The wait for one server's answer.
    pub timeout: Option<Spanned<String>>,
}

/// `[stores.NAME]`: a Redis server sharing learned pins between the instances of a fleet.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    /// `HOST:PORT`.
    pub address: Spanned<String>,
    /// Speak TLS to Redis.
    pub tls: Option<Spanned<bool>>,
    /// With `tls`: PEM CA certificates Redis's certificate is verified against (default:
    /// the system's).
    pub ca_file: Option<Spanned<String>>,
    pub user: Option<Spanned<String>>,
    /// A file holding the password (never inline).
    pub password_file: Option<Spanned<String>>,
    /// An environment variable holding the password.
    pub password_env: Option<Spanned<String>>,
    pub database: Option<Spanned<i64>>,
    /// The start of every Redis key and channel of this fleet.
    pub prefix: Option<Spanned<String>>,
    /// The key (32 bytes, base64) that keys the hashes naming sessions in Redis.
    pub key_file: Option<Spanned<String>>,
    pub key_env: Option<Spanned<String>>,
    /// How long a request waits for Redis to answer a lookup or a new pin.
    pub timeout: Option<Spanned<String>>,
    /// How often refreshes and write-backs go out, as one pipeline.
    pub flush_interval: Option<Spanned<String>>,
    /// How long a key Redis does not know is not asked for again.
    pub miss_ttl: Option<Spanned<String>>,
}

/// `[[pools.NAME.dns]]`: backends named by a DNS name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSource {
    pub name: Spanned<String>,
    /// The backends' port, for A and AAAA (SRV records carry their own).
    pub port: Option<Spanned<i64>>,
    /// "a", "aaaa", "a+aaaa" or "srv".
    #[serde(rename = "type")]
    pub kind: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub weight: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    pub format: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub session_key: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: Option<Spanned<String>>,
    pub bind: Spanned<String>,
    pub protocol: Option<Spanned<String>>,
    /// Shorthand for one catch-all route to this pool.
    pub pool: Option<Spanned<String>>,
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    #[serde(default)]
    pub routes: Vec<Spanned<Route>>,
    /// Answer every request with a redirect to HTTPS on this port (an `http` listener).
    pub redirect_to_https: Option<Spanned<u16>>,
    /// `Strict-Transport-Security` for every response (an `https` listener).
    pub hsts: Option<Spanned<String>>,
    /// For `protocol = "https"`: ask clients for certificates, verified against these CAs
    /// (PEM).
    pub client_ca: Option<Spanned<String>>,
    /// `"required"` (the default with `client_ca`) or `"optional"`.
    pub client_certificates: Option<Spanned<String>>,
    /// For `protocol = "https"`: the secret (32 bytes, base64) session tickets are sealed
    /// with, shared by a fleet so that resumption works on any instance; from a file or an
    /// environment variable, never inline.
    pub session_ticket_key_file: Option<Spanned<String>>,
    pub session_ticket_key_env: Option<Spanned<String>>,
    /// For `protocol = "https"`: the TLS versions accepted, of `"1.2"` and `"1.3"` (both
    /// by default).
    pub tls_versions: Option<Spanned<Vec<Spanned<String>>>>,
    /// For `protocol = "https"`: the certificates, chosen by SNI; the first is the default.
    #[serde(default)]
    pub certificates: Vec<Spanned<CertificateFiles>>,
    /// For `protocol = "tcp"`: a connection carrying nothing either way this long is closed.
    pub idle_timeout: Option<Spanned<String>>,
    /// For `protocol = "tcp"`: pools chosen by the server name of a TLS ClientHello, read
    /// without terminating TLS.
    #[serde(default)]
    pub sni_routes: Vec<SniRoute>,
    /// `"off"` (the default), `"optional"` or `"required"`: whether connections from
    /// `proxy_protocol_from` begin with a PROXY protocol header.
    pub proxy_protocol: Option<Spanned<String>>,
    /// The sources trusted to send a PROXY protocol header (addresses and networks).
    pub proxy_protocol_from: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniRoute {
    /// Exact names and `*.` wildcards.
    pub names: Spanned<Vec<Spanned<String>>>,
    pub pool: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM certificate chain, leaf first.
    pub cert: Spanned<String>,
    /// PEM private key.
    pub key: Spanned<String>,
    /// The SNI names it is for (default: every DNS name it covers).
    #[serde(default)]
    pub names: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub host: Option<Spanned<String>>,
    pub path_prefix: Option<Spanned<String>>,
    /// The one pool this route goes to; or else `split`.
    pub pool: Option<Spanned<String>>,
    /// A traffic split: pools and their weights.
    pub split: Option<Spanned<Vec<Spanned<SplitMember>>>>,
    /// A split's name (the admin API's and metrics'); default `LISTENER-N`.
    pub name: Option<Spanned<String>>,
}

/// One pool of a split: `{ pool = "blue", weight = 90 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitMember {
    pub pool: Spanned<String>,
    pub weight: Spanned<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub algorithm: Option<Spanned<String>>,
    #[serde(default)]
    pub backends: Vec<Spanned<Backend>>,
    /// Backends from DNS, re-resolved on an interval.
    #[serde(default)]
    pub dns: Vec<Spanned<DnsSource>>,
    /// Name servers for this pool's DNS sources, instead of `[dns]`'s.
    pub resolvers: Option<Spanned<Vec<Spanned<String>>>>,
    pub affinity: Option<Spanned<Affinity>>,
    pub health: Option<Spanned<Health>>,
    /// Retries of idempotent requests on another backend after a failed connection.
    pub retries: Option<Spanned<i64>>,
    /// The share of requests that may be retries, so retries cannot multiply an outage.
    pub retry_budget: Option<Spanned<f64>>,
    /// How long a request may wait for a backend connection slot (see max_connections).
    pub queue_timeout: Option<Spanned<String>>,
    /// How many requests may wait for a slot per backend; more get 503 at once.
    pub max_queue: Option<Spanned<i64>>,
    /// Ramp a backend's share of new sessions up over this long after it comes up.
    pub slow_start: Option<Spanned<String>>,
    /// With every backend down: false answers 503, true sends to all of them anyway.
    pub panic_mode: Option<Spanned<bool>>,
    /// Protocols a client may upgrade to (`Upgrade:` tokens); default `["websocket"]`.
    pub upgrades: Option<Vec<Spanned<String>>>,
    /// `"v1"` or `"v2"`: a PROXY protocol header first on every backend connection.
    pub send_proxy_protocol: Option<Spanned<String>>,
    /// TLS to the backends (`[pools.NAME.tls]`).
    pub tls: Option<Spanned<PoolTls>>,
    /// What the pool speaks to its backends: "http1" (default) or "http2".
    pub protocol: Option<Spanned<String>>,
    /// Streams per HTTP/2 backend connection before another is opened.
    pub max_streams: Option<Spanned<i64>>,
}

/// `[pools.NAME.tls]`: the pool reaches its backends over TLS.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolTls {
    /// The name sent as SNI and verified in the backends' certificates (default: each
    /// backend's IP address is verified).
    pub server_name: Option<Spanned<String>>,
    /// PEM CA certificates to verify against (default: the system's).
    pub ca_file: Option<Spanned<String>>,
    /// Take any certificate.
    pub insecure_skip_verify: Option<Spanned<bool>>,
}

/// `[pools.NAME.health]`: active and passive health checks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// "http" or "tcp".
    pub check: Option<Spanned<String>>,
    pub method: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    /// Status codes and ranges, like "200-399" or "200,204".
    pub expect_status: Option<Spanned<String>>,
    pub expect_body: Option<Spanned<String>>,
    /// The service a gRPC health check asks about (default "": the server as a whole).
    pub service: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
    /// Passive checks: eject after this many consecutive failures (0: never).
    pub eject_after: Option<Spanned<i64>>,
    pub eject_time: Option<Spanned<String>>,
    pub max_ejected: Option<Spanned<f64>>,
}

/// `[pools.NAME.affinity]`: how sessions stay on a backend.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Affinity {
    /// The key chain, first present wins: "cookie", "app_cookie:NAME", "header:NAME",
    /// "query:NAME", "client_ip".
    pub keys: Spanned<Vec<Spanned<String>>>,
    /// For header, query and client_ip keys: "table" or "hash".
    pub mapping: Option<Spanned<String>>,
    /// "repin" or "strict".
    pub on_unavailable: Option<Spanned<String>>,
    pub repin_header: Option<Spanned<String>>,
    pub max_sessions_factor: Option<Spanned<f64>>,
    pub drain_timeout: Option<Spanned<String>>,
    pub ipv4_prefix: Option<Spanned<i64>>,
    pub ipv6_prefix: Option<Spanned<i64>>,
    pub cookie: Option<Spanned<Cookie>>,
    pub table: Option<Spanned<Table>>,
    /// The `[stores.NAME]` to share learned pins through, or `"none"`.
    pub store: Option<Spanned<String>>,
    pub rebalance: Option<Spanned<Rebalance>>,
}

/// `[pools.NAME.affinity.rebalance]`: moving idle sessions to backends with fewer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rebalance {
    /// A backend is over when its sessions exceed this factor times the mean.
    pub factor: Option<Spanned<f64>>,
    /// How long a session must have been idle to move.
    pub idle: Option<Spanned<String>>,
    /// Moves per second, at most.
    pub max_per_second: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cookie {
    pub name: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub absolute_timeout: Option<Spanned<String>>,
    pub domain: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub same_site: Option<Spanned<String>>,
    pub secure: Option<Spanned<bool>>,
    pub http_only: Option<Spanned<bool>>,
    /// "session" (a browser-session cookie, the default) or a duration.
    pub max_age: Option<Spanned<String>>,
    pub keys: Option<Spanned<Vec<Spanned<String>>>>,
    /// A file holding the keys (whitespace- or comma-separated), re-read on reload.
    pub keys_file: Option<Spanned<String>>,
    /// An environment variable holding the keys.
    pub keys_env: Option<Spanned<String>>,
    /// How far in the future a token's stamps may lie (clocks of a fleet disagree).
    pub clock_skew: Option<Spanned<String>>,
    /// The token format to issue: 1 (the default) or 2. Both are always opened.
    pub token_version: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    pub capacity: Option<Spanned<i64>>,
    pub idle_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: Option<Spanned<String>>,
    pub address: Spanned<String>,
    pub weight: Option<Spanned<i64>>,
    pub state: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<i64>>,
}

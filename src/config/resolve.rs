//! Resolving: check every value of a parsed [`file::File`] and build the [`Config`].
//!
//! The [`Resolver`] does not stop at the first problem: it records a located error, carries
//! on with a fallback (usually the default) so that the checks after it still run, and
//! returns the config only if nothing was wrong. Defaults come from the `Default` impls in
//! [`super::types`] where there is one.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use super::file;
use super::types::{
    AccessLog, Admin, AdminState, Affinity, Algorithm, Backend, BackendProtocol, CheckKind, Config, CookieConfig, Dns,
    DnsKind, DnsSource, Health, KeySource, Limits, Listener, LogFormat, Mapping, OnUnavailable, Pool, ProxyProtocol,
    Rebalance, Route, RouteTo, SameSite, Secret, SniRoute, Split, SplitMember, Store, TableConfig, TcpListener,
    Timeouts, MAX_SPLIT_WEIGHT, MAX_WEIGHT,
};
use super::{locate, parse_duration, Located};
use crate::net::{strip_port, Cidr};
use crate::proxy_header::Version;

const LOG_FORMATS: &[(&str, LogFormat)] =
    &[("text", LogFormat::Text), ("json", LogFormat::Json), ("off", LogFormat::Off)];
const ALGORITHMS: &[(&str, Algorithm)] = &[
    ("round_robin", Algorithm::RoundRobin),
    ("least_conn", Algorithm::LeastConn),
    ("p2c", Algorithm::P2c),
    ("random", Algorithm::Random),
];
const ADMIN_STATES: &[(&str, AdminState)] =
    &[("enabled", AdminState::Enabled), ("draining", AdminState::Draining), ("disabled", AdminState::Disabled)];
/// Health check kinds: whether the check is HTTP.
const CHECKS: &[(&str, Check)] = &[("http", Check::Http), ("tcp", Check::Tcp), ("grpc", Check::Grpc)];

/// The kinds of active check, as `check` names them.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Check {
    Http,
    Tcp,
    Grpc,
}
const DNS_KINDS: &[(&str, DnsKind)] =
    &[("a", DnsKind::A), ("aaaa", DnsKind::Aaaa), ("a+aaaa", DnsKind::Both), ("srv", DnsKind::Srv)];
const MAPPINGS: &[(&str, Mapping)] = &[("table", Mapping::Table), ("hash", Mapping::Hash)];
const ON_UNAVAILABLE: &[(&str, OnUnavailable)] = &[("repin", OnUnavailable::Repin), ("strict", OnUnavailable::Strict)];
/// Matched ignoring ASCII case, as browsers read the attribute.
const SAME_SITE: &[(&str, SameSite)] =
    &[("Lax", SameSite::Lax), ("Strict", SameSite::Strict), ("None", SameSite::None)];

/// Resolves a parsed file whose text is `src`: the config, or every error in it.
pub(super) fn resolve(src: &str, f: &file::File) -> Result<Config, Vec<Located>> {
    let mut r = Resolver { src, errors: Vec::new() };
    let config = r.config(f);
    if r.errors.is_empty() {
        Ok(config)
    } else {
        Err(r.errors)
    }
}

struct Resolver<'a> {
    src: &'a str,
    errors: Vec<Located>,
}

// === checking one value ===

impl Resolver<'_> {
    fn error<T>(&mut self, at: &Spanned<T>, message: String) {
        self.errors.push(locate(self.src, at.span(), message));
    }

    /// Something missing from the whole file, reported at its start.
    fn missing(&mut self, message: &str) {
        self.errors.push(Located { line: 1, column: 1, message: message.into() });
    }

    /// A duration greater than zero; `default` when unset or wrong.
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

    /// A number in `range`; `default` when unset or out of range. See [`Self::in_range`].
    fn ranged<T>(&mut self, v: &Option<Spanned<T>>, label: &str, range: RangeInclusive<T>, default: T) -> T
    where
        T: Copy + PartialOrd + fmt::Display + fmt::Debug,
    {
        let Some(v) = v else { return default };
        self.in_range(v, label, range).unwrap_or(default)
    }

    /// `v` if it is in `range`; otherwise reports `{label} {v} is out of range: expected
    /// {start} to {end}` and gives `None`. The bounds are printed with `Debug` so that float
    /// bounds read `0.0 to 1.0` while integer ones read `1 to 1000`.
    fn in_range<T>(&mut self, v: &Spanned<T>, label: &str, range: RangeInclusive<T>) -> Option<T>
    where
        T: Copy + PartialOrd + fmt::Display + fmt::Debug,
    {
        let x = *v.get_ref();
        if range.contains(&x) {
            return Some(x);
        }
        self.error(v, format!("{label} {x} is out of range: expected {:?} to {:?}", range.start(), range.end()));
        None
    }

    /// A string that must be one of `choices`; `default` when unset or unknown. An unknown
    /// value is reported as `{label} "{v}" is not known: expected "a", "b" or "c"`.
    fn choice<T: Copy>(&mut self, v: &Option<Spanned<String>>, label: &str, choices: &[(&str, T)], default: T) -> T {
        let Some(v) = v else { return default };
        self.lookup(v, choices, |a, b| a == b, |v, list| format!("{label} \"{v}\" is not known: expected {list}"))
            .unwrap_or(default)
    }

    /// What `v` names among `choices`, compared with `same`. Anything else is reported with
    /// the message `complaint(v, list)`, where `list` reads `"a", "b" or "c"`, and gives `None`.
    fn lookup<T: Copy>(
        &mut self,
        v: &Spanned<String>,
        choices: &[(&str, T)],
        same: fn(&str, &str) -> bool,
        complaint: impl FnOnce(&str, &str) -> String,
    ) -> Option<T> {
        let found = choices.iter().find(|(name, _)| same(v.get_ref(), name)).map(|&(_, t)| t);
        if found.is_none() {
            let message = complaint(v.get_ref(), &either(choices));
            self.error(v, message);
        }
        found
    }
}

/// The names of `choices` quoted and listed as error messages list them: `"a", "b" or "c"`.
fn either<T>(choices: &[(&str, T)]) -> String {
    let quoted: Vec<String> = choices.iter().map(|(name, _)| format!("\"{name}\"")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

// === the file, its listeners and the global sections ===

impl Resolver<'_> {
    fn config(&mut self, f: &file::File) -> Config {
        let threads = self.ranged(&f.runtime.threads, "runtime.threads:", 1..=1024, 1) as usize;
        let shutdown_grace =
            self.duration(&f.runtime.shutdown_grace, "runtime.shutdown_grace", Duration::from_secs(30));
        let state_dir = self.state_dir(&f.runtime.state_dir);
        let timeouts = self.timeouts(&f.timeouts);
        let access_log = self.access_log(&f.access_log);
        let limits = self.limits(&f.limits);
        let admin = f.admin.as_ref().map(|a| self.admin(a));
        let dns = self.dns(&f.dns);
        let stores: Vec<Store> = f.stores.iter().map(|(name, s)| self.store(name, s)).collect();
        let mut pools: Vec<Pool> = f.pools.iter().map(|(name, pool)| self.pool(name, pool)).collect();
        let store = self.pool_stores(f, &mut pools);
        if f.pools.is_empty() {
            self.missing("no pools: add at least one [pools.NAME] with backends");
        }
        if f.listeners.is_empty() {
            self.missing("no listeners: add at least one [[listeners]] with a bind address");
        }
        let pool_names: Vec<&String> = f.pools.keys().collect();
        let listeners = self.listeners(&f.listeners, &pool_names);
        self.tcp_pools(&f.listeners, &listeners, &pools);
        self.split_pools(&f.listeners, &listeners, &pools);
        Config {
            threads,
            shutdown_grace,
            state_dir,
            timeouts,
            access_log,
            limits,
            admin,
            dns,
            stores,
            store,
            listeners,
            pools,
        }
    }

    /// `[stores.NAME]`: a Redis server. The password and the hashing key come from a file
    /// or an environment variable, never from the config itself.
    fn store(&mut self, name: &str, s: &Spanned<file::Store>) -> Store {
        let at = format!("stores.{name}");
        let f = s.get_ref();
        let address = f.address.get_ref().trim().to_string();
        let port_ok = address
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
        if !port_ok {
            self.error(&f.address, format!("{at}: address \"{address}\" is not HOST:PORT, like 127.0.0.1:6379"));
        }
        let tls = match (f.tls.as_ref().is_some_and(|t| *t.get_ref()), &f.ca_file) {
            (false, Some(ca)) => {
                self.error(ca, format!("{at}: ca_file is for tls = true"));
                None
            }
            (false, None) => None,
            (true, None) => Some(Vec::new()),
            (true, Some(ca)) => match std::fs::read(ca.get_ref()) {
                Ok(pem) if crate::tls::backend::roots(&pem).is_ok() => Some(pem),
                Ok(_) => {
                    self.error(ca, format!("{at}: ca_file {} holds no PEM certificate", ca.get_ref()));
                    None
                }
                Err(e) => {
                    self.error(ca, format!("{at}: ca_file: cannot read {}: {}", ca.get_ref(), e.kind()));
                    None
                }
            },
        };
        let user = f.user.as_ref().map(|u| u.get_ref().clone());
        if let Some(u) = f.user.as_ref().filter(|u| u.get_ref().is_empty() || u.get_ref().contains(char::is_whitespace))
        {
            self.error(u, format!("{at}: user: must be a name without spaces"));
        }
        let password = self.store_secret(s, &at, "password", &f.password_file, &f.password_env);
        if password.is_none() && user.is_some() {
            self.error(s, format!("{at}: user is set without password_file or password_env"));
        }
        let key = match self.store_secret(s, &at, "key", &f.key_file, &f.key_env) {
            Some(k) => match crate::affinity::token::Key::from_base64(&k) {
                Ok(_) => k,
                Err(e) => {
                    let place = f.key_file.as_ref().or(f.key_env.as_ref()).expect("a key was read from one");
                    self.error(place, format!("{at}: key: {e}"));
                    k
                }
            },
            None => {
                if f.key_file.is_none() && f.key_env.is_none() {
                    self.error(
                        s,
                        format!("{at}: set key_file or key_env: the key (32 bytes, base64) that hashes session keys before they reach Redis"),
                    );
                }
                Secret::new(String::new())
            }
        };
        let database = self.ranged(&f.database, &format!("{at}: database"), 0..=1_000_000, 0);
        let prefix = match &f.prefix {
            None => "tether".to_string(),
            Some(p)
                if p.get_ref().is_empty() || p.get_ref().contains(|c: char| c.is_whitespace() || c.is_control()) =>
            {
                self.error(p, format!("{at}: prefix: must be a word without spaces"));
                String::new()
            }
            Some(p) => p.get_ref().clone(),
        };
        let timeout = self.duration(&f.timeout, &format!("{at}: timeout"), Duration::from_millis(25));
        let flush_interval =
            self.duration(&f.flush_interval, &format!("{at}: flush_interval"), Duration::from_millis(250));
        let miss_ttl = self.duration(&f.miss_ttl, &format!("{at}: miss_ttl"), Duration::from_secs(2));
        Store {
            name: name.to_string(),
            address,
            tls,
            user,
            password,
            database,
            prefix,
            key,
            timeout,
            flush_interval,
            miss_ttl,
        }
    }

    /// A store's secret from its `_file` or its `_env`, not both; `None` when neither is set
    /// (or it cannot be read, reported).
    fn store_secret<T>(
        &mut self,
        s: &Spanned<T>,
        at: &str,
        what: &str,
        file: &Option<Spanned<String>>,
        env: &Option<Spanned<String>>,
    ) -> Option<Secret> {
        match (file, env) {
            (Some(_), Some(_)) => {
                self.error(s, format!("{at}: set only one of {what}_file and {what}_env"));
                None
            }
            (Some(path), None) => match std::fs::read_to_string(path.get_ref()) {
                Ok(text) if !text.trim().is_empty() => Some(Secret::new(text.trim())),
                Ok(_) => {
                    self.error(path, format!("{at}: {what}_file: {} is empty", path.get_ref()));
                    None
                }
                Err(e) => {
                    self.error(path, format!("{at}: {what}_file: cannot read {}: {}", path.get_ref(), e.kind()));
                    None
                }
            },
            (None, Some(var)) => match std::env::var(var.get_ref()) {
                Ok(text) if !text.trim().is_empty() => Some(Secret::new(text.trim())),
                _ => {
                    self.error(var, format!("{at}: {what}_env: the environment variable {} is not set", var.get_ref()));
                    None
                }
            },
            (None, None) => None,
        }
    }

    /// Which store each pool shares its pins through: its affinity's `store` (a name, or
    /// `"none"`), else the file's top-level `store` when the pool has table-mapped keys.
    /// Returns the top-level store, when it names one of the file's.
    fn pool_stores(&mut self, f: &file::File, pools: &mut [Pool]) -> Option<String> {
        let known = |name: &str| f.stores.contains_key(name);
        let default = match &f.store {
            Some(s) if known(s.get_ref()) => Some(s.get_ref().clone()),
            Some(s) => {
                self.error(s, format!("store \"{}\" is not a [stores.NAME] of this file", s.get_ref()));
                None
            }
            None => None,
        };
        for (pool, (_, file_pool)) in pools.iter_mut().zip(&f.pools) {
            let Some(a) = pool.affinity.as_mut() else { continue };
            let shares = a.keys.iter().any(|k| match k {
                KeySource::Cookie => false,
                KeySource::AppCookie(_) => true,
                _ => a.mapping == Mapping::Table,
            });
            let named = file_pool.get_ref().affinity.as_ref().and_then(|fa| fa.get_ref().store.as_ref());
            a.store = match named {
                Some(n) if n.get_ref() == "none" => None,
                Some(n) if !known(n.get_ref()) => {
                    self.error(
                        n,
                        format!(
                            "pool \"{}\": affinity: store \"{}\" is not a [stores.NAME] of this file",
                            pool.name,
                            n.get_ref()
                        ),
                    );
                    None
                }
                Some(n) if !shares => {
                    self.error(n, format!("pool \"{}\": affinity: store: the pool has no table-mapped key to share (app_cookie, or header, query or client_ip with mapping = \"table\")", pool.name));
                    None
                }
                Some(n) => Some(n.get_ref().clone()),
                None => default.clone().filter(|_| shares),
            };
        }
        default
    }

    /// `[dns]`: resolvers as `IP` (port 53) or `IP:PORT`, and the timeout.
    fn dns(&mut self, d: &file::Dns) -> Dns {
        let mut dns = Dns::default();
        if let Some(list) = &d.resolvers {
            dns.resolvers = self.resolvers("dns.resolvers", list, "to use /etc/resolv.conf");
        }
        dns.timeout = self.duration(&d.timeout, "dns.timeout", dns.timeout);
        dns
    }

    /// A list of name servers, each `IP` (port 53) or `IP:PORT`; not empty.
    fn resolvers(&mut self, label: &str, list: &Spanned<Vec<Spanned<String>>>, instead: &str) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        for r in list.get_ref() {
            let raw = r.get_ref().trim();
            let parsed =
                raw.parse::<SocketAddr>().ok().or_else(|| raw.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)));
            match parsed {
                Some(a) if a.port() != 0 => out.push(a),
                _ => self.error(
                    r,
                    format!("{label}: \"{raw}\" is not an IP address, or IP address and port, like 127.0.0.1:53"),
                ),
            }
        }
        if list.get_ref().is_empty() {
            self.error(list, format!("{label}: is empty (leave it out {instead})"));
        }
        out
    }

    fn limits(&mut self, l: &file::Limits) -> Limits {
        let d = Limits::default();
        let max = i64::from(u32::MAX);
        Limits {
            max_client_connections: self.ranged(
                &l.max_client_connections,
                "limits.max_client_connections:",
                1..=max,
                i64::from(d.max_client_connections),
            ) as u32,
            max_connections_per_ip: l
                .max_connections_per_ip
                .as_ref()
                .and_then(|v| self.in_range(v, "limits.max_connections_per_ip:", 1..=max))
                .map(|n| n as u32),
            h2_max_concurrent_streams: self.ranged(
                &l.h2_max_concurrent_streams,
                "limits.h2_max_concurrent_streams:",
                1..=10_000,
                i64::from(d.h2_max_concurrent_streams),
            ) as u32,
            max_request_head: self.ranged(
                &l.max_request_head,
                "limits.max_request_head:",
                1024..=1024 * 1024,
                i64::from(d.max_request_head),
            ) as u32,
            // hyper answers 414 itself above 65534 bytes.
            max_request_target: self.ranged(
                &l.max_request_target,
                "limits.max_request_target:",
                64..=65_534,
                i64::from(d.max_request_target),
            ) as u32,
            max_request_body: l
                .max_request_body
                .as_ref()
                .and_then(|v| self.in_range(v, "limits.max_request_body:", 0..=i64::MAX))
                .map(|n| n as u64),
        }
    }

    fn timeouts(&mut self, t: &file::Timeouts) -> Timeouts {
        let d = Timeouts::default();
        Timeouts {
            connect: self.duration(&t.connect, "timeouts.connect", d.connect),
            request_header: self.duration(&t.request_header, "timeouts.request_header", d.request_header),
            client_idle: self.duration(&t.client_idle, "timeouts.client_idle", d.client_idle),
            backend_response: self.duration(&t.backend_response, "timeouts.backend_response", d.backend_response),
            backend_idle: self.duration(&t.backend_idle, "timeouts.backend_idle", d.backend_idle),
            client_body: self.duration(&t.client_body, "timeouts.client_body", d.client_body),
            client_send: self.duration(&t.client_send, "timeouts.client_send", d.client_send),
            backend_body: self.duration(&t.backend_body, "timeouts.backend_body", d.backend_body),
            tunnel_idle: self.duration(&t.tunnel_idle, "timeouts.tunnel_idle", d.tunnel_idle),
        }
    }

    fn admin(&mut self, a: &Spanned<file::Admin>) -> Admin {
        let f = a.get_ref();
        let fallback = SocketAddr::from(([127, 0, 0, 1], 9901));
        let bind = match &f.bind {
            None => fallback,
            Some(b) => b.get_ref().parse::<SocketAddr>().unwrap_or_else(|_| {
                let message =
                    format!("admin.bind \"{}\" is not an IP address and port like 127.0.0.1:9901", b.get_ref());
                self.error(b, message);
                fallback
            }),
        };
        let token = self.admin_token(a);
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

    /// The admin token, from exactly one of `token`, `token_file` or `token_env`.
    fn admin_token(&mut self, a: &Spanned<file::Admin>) -> Option<Secret> {
        let f = a.get_ref();
        let given = [f.token.is_some(), f.token_file.is_some(), f.token_env.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            self.errors.push(locate(
                self.src,
                a.span(),
                "admin: set only one of token, token_file and token_env".into(),
            ));
            return None;
        }
        let (token, at) = if let Some(t) = &f.token {
            (t.get_ref().clone(), t)
        } else if let Some(path) = &f.token_file {
            match std::fs::read_to_string(path.get_ref()) {
                Ok(text) => (text.trim().to_string(), path),
                Err(e) => {
                    self.error(path, format!("admin.token_file: cannot read {}: {}", path.get_ref(), e.kind()));
                    return None;
                }
            }
        } else if let Some(var) = &f.token_env {
            match std::env::var(var.get_ref()) {
                Ok(text) => (text.trim().to_string(), var),
                Err(_) => {
                    self.error(var, format!("admin.token_env: the environment variable {} is not set", var.get_ref()));
                    return None;
                }
            }
        } else {
            return None;
        };
        if token.len() < 16 {
            self.error(at, "admin.token: must be at least 16 characters".into());
            return None;
        }
        Some(Secret::new(token))
    }

    /// `runtime.state_dir`: a directory path, not empty. Whether it exists is checked when
    /// it is used (at start and at shutdown), not here: `tether check` may run elsewhere.
    fn state_dir(&mut self, v: &Option<Spanned<String>>) -> Option<std::path::PathBuf> {
        let v = v.as_ref()?;
        if v.get_ref().is_empty() {
            self.error(v, "runtime.state_dir: must not be empty (leave it out to save no state)".into());
            return None;
        }
        Some(std::path::PathBuf::from(v.get_ref()))
    }

    fn access_log(&mut self, a: &file::AccessLog) -> AccessLog {
        let format = match &a.format {
            None => LogFormat::Text,
            Some(v) => self
                .lookup(
                    v,
                    LOG_FORMATS,
                    |a, b| a == b,
                    |v, list| format!("access_log.format: \"{v}\" is not a format: expected {list}"),
                )
                .unwrap_or(LogFormat::Text),
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
        let session_key =
            a.session_key.as_ref().and_then(|k| match crate::affinity::token::Key::from_base64(k.get_ref()) {
                Ok(_) => Some(Secret::new(k.get_ref().clone())),
                Err(e) => {
                    self.error(k, format!("access_log.session_key: {e}"));
                    None
                }
            });
        AccessLog { format, path, session_key }
    }

    /// The listeners, each checked, then their names and bind addresses checked for repeats.
    fn listeners(&mut self, ls: &[file::Listener], pools: &[&String]) -> Vec<Listener> {
        let mut listeners = Vec::new();
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        for (i, l) in ls.iter().enumerate() {
            let listener = self.listener(i, l, pools);
            if !names.insert(listener.name.clone()) {
                let at = l.name.as_ref().unwrap_or(&l.bind);
                self.error(at, format!("listener \"{}\": the name is used twice", listener.name));
            }
            if listener.bind.port() != 0 && !binds.insert(listener.bind) {
                self.error(&l.bind, format!("listener \"{}\": bind {} is used twice", listener.name, listener.bind));
            }
            listeners.push(listener);
        }
        listeners
    }

    fn listener(&mut self, i: usize, l: &file::Listener, pools: &[&String]) -> Listener {
        let name = l.name.as_ref().map_or_else(|| format!("listener-{}", i + 1), |n| n.get_ref().clone());
        let bind = l.bind.get_ref().parse::<SocketAddr>().unwrap_or_else(|_| {
            let message = format!(
                "listener \"{name}\": bind \"{}\" is not an IP address and port like 127.0.0.1:8080",
                l.bind.get_ref()
            );
            self.error(&l.bind, message);
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        let (https, tcp) = match l.protocol.as_ref().map(|p| (p, p.get_ref().as_str())) {
            None | Some((_, "http")) => (false, false),
            Some((_, "https")) => (true, false),
            Some((_, "tcp")) => (false, true),
            Some((p, other)) => {
                self.error(
                    p,
                    format!("listener \"{name}\": protocol \"{other}\" is not known: expected \"http\", \"https\" or \"tcp\""),
                );
                (false, false)
            }
        };
        let proxy_protocol = self.proxy_protocol(&name, l);
        if tcp {
            let tcp = self.tcp_listener(&name, l, pools);
            return Listener {
                name,
                bind,
                trusted_proxies: Vec::new(),
                routes: Vec::new(),
                tls: None,
                redirect_to_https: None,
                hsts: None,
                tcp: Some(tcp),
                proxy_protocol,
            };
        }
        for r in &l.sni_routes {
            self.error(&r.pool, format!("listener \"{name}\": sni_routes are for protocol = \"tcp\""));
        }
        if let Some(t) = &l.idle_timeout {
            self.error(t, format!("listener \"{name}\": idle_timeout is for protocol = \"tcp\" (HTTP connections use [timeouts] client_idle)"));
        }
        let tls = self.listener_tls(&name, l, https);
        let redirect_to_https = l.redirect_to_https.as_ref().and_then(|p| {
            if https {
                self.error(p, format!("listener \"{name}\": redirect_to_https is for an http listener"));
                return None;
            }
            Some(*p.get_ref())
        });
        let hsts = l.hsts.as_ref().and_then(|h| {
            let v = h.get_ref();
            if !https {
                self.error(h, format!("listener \"{name}\": hsts is for an https listener (browsers ignore it over http)"));
                return None;
            }
            let valid = v.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) && v.to_ascii_lowercase().contains("max-age=");
            if !valid {
                self.error(h, format!("listener \"{name}\": hsts \"{v}\" is not a Strict-Transport-Security value like \"max-age=31536000; includeSubDomains\""));
                return None;
            }
            Some(v.clone())
        });
        let mut trusted_proxies = Vec::new();
        for t in &l.trusted_proxies {
            match Cidr::parse(t.get_ref()) {
                Ok(c) => trusted_proxies.push(c),
                Err(e) => self.error(t, format!("listener \"{name}\": trusted_proxies: {e}")),
            }
        }
        let routes = self.routes(&name, l, pools);
        Listener { name, bind, trusted_proxies, routes, tls, redirect_to_https, hsts, tcp: None, proxy_protocol }
    }

    /// `proxy_protocol` and its trusted sources, `proxy_protocol_from`, which it needs
    /// (a header from anyone would let anyone choose their address).
    fn proxy_protocol(&mut self, name: &str, l: &file::Listener) -> Option<ProxyProtocol> {
        let label = format!("listener \"{name}\": proxy_protocol");
        let required = self.choice(
            &l.proxy_protocol,
            &label,
            &[("off", None), ("optional", Some(false)), ("required", Some(true))],
            None,
        );
        let mut from = Vec::new();
        for c in l.proxy_protocol_from.iter().flat_map(|list| list.get_ref()) {
            match Cidr::parse(c.get_ref()) {
                Ok(c) => from.push(c),
                Err(e) => self.error(c, format!("{label}_from: {e}")),
            }
        }
        match (required, &l.proxy_protocol, &l.proxy_protocol_from) {
            (Some(_), Some(at), None) => {
                self.error(at, format!("{label} needs proxy_protocol_from, the addresses trusted to send it"));
            }
            (Some(_), _, Some(list)) if list.get_ref().is_empty() => {
                self.error(list, format!("{label}_from is empty: no source could send the header"));
            }
            (None, off, Some(list)) if off.as_ref().is_none_or(|v| v.get_ref() == "off") => {
                self.error(list, format!("{label}_from is set but proxy_protocol is off"));
            }
            _ => {}
        }
        required.map(|required| ProxyProtocol { required, from })
    }

    /// A `tcp` listener: its SNI routes and default pool; the keys of HTTP listeners are
    /// errors on it.
    fn tcp_listener(&mut self, name: &str, l: &file::Listener, pools: &[&String]) -> TcpListener {
        let not_tcp = |key: &str| format!("listener \"{name}\": {key} is not for protocol = \"tcp\"");
        if let Some(r) = l.routes.first() {
            let message = format!("{} (route by server name with [[listeners.sni_routes]])", not_tcp("routes"));
            self.error(r, message);
        }
        if let Some(t) = l.trusted_proxies.first() {
            self.error(t, not_tcp("trusted_proxies"));
        }
        if let Some(t) = &l.redirect_to_https {
            self.error(t, not_tcp("redirect_to_https"));
        }
        if let Some(t) = &l.hsts {
            self.error(t, not_tcp("hsts"));
        }
        if let Some(t) = l.certificates.first() {
            self.error(
                t,
                format!("{} (TLS passes through it; terminate TLS with protocol = \"https\")", not_tcp("certificates")),
            );
        }
        if let Some(t) = &l.client_ca {
            self.error(t, not_tcp("client_ca"));
        }
        if let Some(t) = l.session_ticket_key_file.as_ref().or(l.session_ticket_key_env.as_ref()) {
            self.error(t, not_tcp("session tickets"));
        }
        if let Some(t) = &l.tls_versions {
            self.error(t, not_tcp("tls_versions"));
        }
        let default_pool = l.pool.as_ref().map(|p| self.pool_ref(name, p, pools));
        let mut sni = Vec::new();
        let mut seen = HashSet::new();
        for r in &l.sni_routes {
            let pool = self.pool_ref(name, &r.pool, pools);
            if r.names.get_ref().is_empty() {
                self.error(&r.names, format!("listener \"{name}\": an sni_route needs at least one name"));
            }
            for n in r.names.get_ref() {
                let raw = n.get_ref().trim();
                let lower = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
                let body = lower.strip_prefix("*.").unwrap_or(&lower);
                let valid = !body.is_empty()
                    && body.split('.').all(|label| {
                        !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    });
                if !valid {
                    self.error(
                        n,
                        format!("listener \"{name}\": sni_routes name \"{raw}\" is not a DNS name or a *. wildcard"),
                    );
                    continue;
                }
                if !seen.insert(lower.clone()) {
                    self.error(n, format!("listener \"{name}\": sni_routes name \"{lower}\" is routed twice"));
                    continue;
                }
                sni.push(SniRoute { name: lower, pool });
            }
        }
        if default_pool.is_none() && l.sni_routes.is_empty() {
            self.error(
                &l.bind,
                format!("listener \"{name}\": no pool: set `pool = \"NAME\"` or add [[listeners.sni_routes]]"),
            );
        }
        let idle_timeout = l.idle_timeout.as_ref().map(|t| {
            self.duration(&Some(t.clone()), &format!("listener \"{name}\": idle_timeout"), Duration::from_secs(3600))
        });
        TcpListener { sni, default_pool, idle_timeout }
    }

    /// A pool a `tcp` listener forwards to may key sessions only by what a connection
    /// carries: its client IP.
    fn tcp_pools(&mut self, files: &[file::Listener], listeners: &[Listener], pools: &[Pool]) {
        for (f, l) in files.iter().zip(listeners) {
            let Some(tcp) = &l.tcp else { continue };
            let mut used: Vec<usize> = tcp.sni.iter().map(|r| r.pool).chain(tcp.default_pool).collect();
            used.sort_unstable();
            used.dedup();
            for p in used.into_iter().filter_map(|i| pools.get(i)) {
                if p.protocol != BackendProtocol::Http1 {
                    let at = f.pool.as_ref().unwrap_or(&f.bind);
                    let message = format!(
                        "listener \"{}\": pool \"{}\" speaks protocol = \"http2\": a tcp listener passes bytes through, so its pools speak no HTTP",
                        l.name, p.name
                    );
                    self.error(at, message);
                }
                if p.tls.is_some() {
                    let at = f.pool.as_ref().unwrap_or(&f.bind);
                    let message = format!(
                        "listener \"{}\": pool \"{}\" has [pools.{}.tls]: a tcp listener passes bytes through as they are, so its pools reach backends in plain TCP",
                        l.name, p.name, p.name
                    );
                    self.error(at, message);
                }
                let Some(a) = &p.affinity else { continue };
                if let Some(k) = a.keys.iter().find(|k| **k != KeySource::ClientIp) {
                    let at = f.pool.as_ref().unwrap_or(&f.bind);
                    let message = format!(
                        "listener \"{}\": pool \"{}\" keys sessions by {}, which a TCP connection does not carry: a pool behind a tcp listener may only use client_ip keys",
                        l.name,
                        p.name,
                        k.kind()
                    );
                    self.error(at, message);
                }
            }
        }
    }

    /// The fleet's session-ticket secret: `Some(None)` when the listener has none, `None`
    /// (the error reported) when its setting is wrong.
    fn ticket_secret(&mut self, name: &str, l: &file::Listener) -> Option<Option<[u8; 32]>> {
        let at = format!("listener \"{name}\"");
        let (file, env) = (&l.session_ticket_key_file, &l.session_ticket_key_env);
        let Some(text) = self.store_secret(&l.bind, &at, "session_ticket_key", file, env) else {
            return if file.is_some() || env.is_some() { None } else { Some(None) };
        };
        match crate::affinity::token::Key::from_base64(&text) {
            Ok(k) => Some(Some(k.bytes())),
            Err(e) => {
                let place = file.as_ref().or(env.as_ref()).expect("a secret was read from one");
                self.error(place, format!("{at}: session_ticket_key: {e}"));
                None
            }
        }
    }

    /// The TLS versions an `https` listener accepts; `None` (the error reported) when its
    /// `tls_versions` names none or one that is not known.
    fn tls_versions(&mut self, name: &str, l: &file::Listener) -> Option<crate::tls::Versions> {
        let Some(list) = &l.tls_versions else {
            return Some(crate::tls::Versions::ALL);
        };
        let mut versions = crate::tls::Versions { tls12: false, tls13: false };
        let mut ok = true;
        for v in list.get_ref() {
            match v.get_ref().as_str() {
                "1.2" => versions.tls12 = true,
                "1.3" => versions.tls13 = true,
                other => {
                    let message = format!(
                        "listener \"{name}\": tls_versions: \"{other}\" is not supported: expected \"1.2\" or \"1.3\""
                    );
                    self.error(v, message);
                    ok = false;
                }
            }
        }
        if ok && !versions.tls12 && !versions.tls13 {
            self.error(list, format!("listener \"{name}\": tls_versions needs at least one of \"1.2\" and \"1.3\""));
            ok = false;
        }
        ok.then_some(versions)
    }

    /// Client certificate verification: `Some(None)` when the listener asks for none, `None`
    /// (the error reported) when its settings are wrong.
    fn client_auth(&mut self, name: &str, l: &file::Listener) -> Option<Option<crate::tls::ClientAuth>> {
        let required = match l.client_certificates.as_ref().map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "required")) => true,
            Some((_, "optional")) => false,
            Some((m, other)) => {
                let message = format!("listener \"{name}\": client_certificates \"{other}\" is not known: expected \"required\" or \"optional\"");
                self.error(m, message);
                return None;
            }
        };
        let Some(ca) = &l.client_ca else {
            if let Some(m) = &l.client_certificates {
                self.error(m, format!("listener \"{name}\": client_certificates needs client_ca"));
                return None;
            }
            return Some(None);
        };
        let pem = match std::fs::read(ca.get_ref()) {
            Ok(pem) => pem,
            Err(e) => {
                self.error(ca, format!("listener \"{name}\": cannot read {}: {}", ca.get_ref(), e.kind()));
                return None;
            }
        };
        match crate::tls::ClientAuth::load(&pem, required) {
            Ok(auth) => Some(Some(auth)),
            Err(e) => {
                self.error(ca, format!("listener \"{name}\": client_ca {} {e}", ca.get_ref()));
                None
            }
        }
    }

    /// An `https` listener's certificates, each read and checked (the key belongs to the
    /// certificate, the names are covered); `None` for `http`.
    fn listener_tls(&mut self, name: &str, l: &file::Listener, https: bool) -> Option<Arc<crate::tls::ServerTls>> {
        if !https {
            if let Some(c) = l.certificates.first() {
                self.error(c, format!("listener \"{name}\": certificates are only for protocol = \"https\""));
            }
            if let Some(c) = &l.client_ca {
                self.error(c, format!("listener \"{name}\": client_ca is only for protocol = \"https\""));
            }
            if let Some(k) = l.session_ticket_key_file.as_ref().or(l.session_ticket_key_env.as_ref()) {
                self.error(k, format!("listener \"{name}\": session tickets are only for protocol = \"https\""));
            }
            if let Some(v) = &l.tls_versions {
                self.error(v, format!("listener \"{name}\": tls_versions are only for protocol = \"https\""));
            }
            return None;
        }
        if l.certificates.is_empty() {
            self.error(
                &l.bind,
                format!("listener \"{name}\": protocol \"https\" needs at least one [[listeners.certificates]]"),
            );
            return None;
        }
        let mut loaded = Vec::new();
        for c in &l.certificates {
            let files = c.get_ref();
            fn read(path: &Spanned<String>) -> Result<Vec<u8>, (&Spanned<String>, std::io::ErrorKind)> {
                std::fs::read(path.get_ref()).map_err(|e| (path, e.kind()))
            }
            let (chain, key) = match (read(&files.cert), read(&files.key)) {
                (Ok(chain), Ok(key)) => (chain, key),
                (Err((path, e)), _) | (_, Err((path, e))) => {
                    self.error(path, format!("listener \"{name}\": cannot read {}: {e}", path.get_ref()));
                    continue;
                }
            };
            let names: Vec<String> = files.names.iter().map(|n| n.get_ref().clone()).collect();
            match crate::tls::Certificate::load(files.cert.get_ref(), &chain, &key, &names) {
                Ok(cert) => {
                    if cert.not_after < crate::time::unix_millis() as i64 / 1000 {
                        tracing::warn!(listener = %name, certificate = %files.cert.get_ref(), "the certificate has expired; it is served anyway");
                    }
                    loaded.push(cert);
                }
                Err(e) if e.starts_with("key: ") => {
                    self.error(&files.key, format!("listener \"{name}\": {}: {}", files.key.get_ref(), &e[5..]))
                }
                Err(e) if e.starts_with("does not cover") && !files.names.is_empty() => {
                    self.error(&files.names[0], format!("listener \"{name}\": {} {e}", files.cert.get_ref()))
                }
                Err(e) => self.error(&files.cert, format!("listener \"{name}\": {} {e}", files.cert.get_ref())),
            }
        }
        if loaded.len() != l.certificates.len() {
            return None;
        }
        let client_auth = self.client_auth(name, l)?;
        let ticket_secret = self.ticket_secret(name, l)?;
        let versions = self.tls_versions(name, l)?;
        match crate::tls::ServerTls::new(loaded, client_auth, ticket_secret, versions) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => {
                self.error(&l.bind, format!("listener \"{name}\": TLS: {e}"));
                None
            }
        }
    }

    /// The routes of listener `name`: its `[[listeners.routes]]`, then its `pool` shorthand.
    fn routes(&mut self, name: &str, l: &file::Listener, pools: &[&String]) -> Vec<Route> {
        let mut routes: Vec<Route> = l.routes.iter().enumerate().map(|(i, r)| self.route(name, i, r, pools)).collect();
        if let Some(p) = &l.pool {
            let pool = self.pool_ref(name, p, pools);
            routes.push(Route { host: None, path_prefix: "/".into(), to: RouteTo::Pool(pool) });
        }
        if routes.is_empty() {
            self.error(
                &l.bind,
                format!("listener \"{name}\": no routes: set `pool = \"NAME\"` or add [[listeners.routes]]"),
            );
        }
        routes
    }

    /// Route `i` (from 0) of listener `name`.
    fn route(&mut self, name: &str, i: usize, route: &Spanned<file::Route>, pools: &[&String]) -> Route {
        let r = route.get_ref();
        let to = match (&r.pool, &r.split) {
            (Some(p), None) => {
                if let Some(n) = &r.name {
                    self.error(
                        n,
                        format!("listener \"{name}\": a route's name is for a split (this route has one pool)"),
                    );
                }
                RouteTo::Pool(self.pool_ref(name, p, pools))
            }
            (None, Some(split)) => RouteTo::Split(self.split(name, i, r, split, pools)),
            (Some(p), Some(_)) => {
                self.error(p, format!("listener \"{name}\": a route has either pool or split, not both"));
                RouteTo::Pool(0)
            }
            (None, None) => {
                self.error(
                    route,
                    format!("listener \"{name}\": a route needs pool = \"NAME\" or split = [{{ pool = \"NAME\", weight = N }}, ...]"),
                );
                RouteTo::Pool(0)
            }
        };
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
                self.error(p, format!("listener \"{name}\": route path_prefix \"{}\" must start with /", p.get_ref()));
                "/".to_string()
            }
        };
        Route { host: host.map(|h| strip_port(&h).to_string()), path_prefix, to }
    }

    /// A route's `split`: each pool known and named once, weights in range, not all 0.
    /// Whether its pools can share sessions is checked once every pool is resolved
    /// ([`Self::split_pools`]).
    fn split(
        &mut self,
        listener: &str,
        i: usize,
        r: &file::Route,
        split: &Spanned<Vec<Spanned<file::SplitMember>>>,
        pools: &[&String],
    ) -> Split {
        let name = match &r.name {
            Some(n) if n.get_ref().is_empty() || !n.get_ref().bytes().all(|b| b.is_ascii_graphic() && b != b'/') => {
                self.error(
                    n,
                    format!(
                        "listener \"{listener}\": split name \"{}\" must be printable ASCII without spaces or /",
                        n.get_ref()
                    ),
                );
                format!("{listener}-{}", i + 1)
            }
            Some(n) => n.get_ref().clone(),
            None => format!("{listener}-{}", i + 1),
        };
        let label = format!("listener \"{listener}\": split \"{name}\"");
        let mut members: Vec<SplitMember> = Vec::new();
        for m in split.get_ref() {
            let m = m.get_ref();
            let pool = self.pool_ref(listener, &m.pool, pools);
            let weight = self.in_range(
                &m.weight,
                &format!("{label}: pool \"{}\" weight", m.pool.get_ref()),
                0..=i64::from(MAX_SPLIT_WEIGHT),
            );
            if members.iter().any(|x| x.pool == pool) && pools.contains(&m.pool.get_ref()) {
                self.error(&m.pool, format!("{label}: pool \"{}\" is named twice", m.pool.get_ref()));
                continue;
            }
            members.push(SplitMember { pool, weight: weight.unwrap_or(1) as u32 });
        }
        if split.get_ref().is_empty() {
            self.error(split, format!("{label}: lists no pool"));
        } else if split.get_ref().iter().all(|m| *m.get_ref().weight.get_ref() == 0) {
            self.error(split, format!("{label}: every weight is 0, so a new session has no pool to go to"));
        }
        Split { name, members }
    }

    /// The splits' pools must find a session's pool with one key chain: the same
    /// affinity keys, mapping, client-IP prefixes and cookie name in each (or no affinity
    /// in any), and a cookie key issues version 2 tokens, which record their pool. Split
    /// names are unique.
    fn split_pools(&mut self, ls: &[file::Listener], listeners: &[Listener], pools: &[Pool]) {
        let mut names = HashSet::new();
        for (fl, l) in ls.iter().zip(listeners) {
            for (fr, r) in fl.routes.iter().zip(&l.routes) {
                let (RouteTo::Split(split), Some(fsplit)) = (&r.to, &fr.get_ref().split) else { continue };
                let at = fr.get_ref().name.as_ref().map_or(fr.span(), |n| n.span());
                if !names.insert(split.name.clone()) {
                    let message = format!("listener \"{}\": split name \"{}\" is used twice", l.name, split.name);
                    self.errors.push(locate(self.src, at, message));
                }
                let label = format!("listener \"{}\": split \"{}\"", l.name, split.name);
                let Some(first) = split.members.first().and_then(|m| pools.get(m.pool)) else { continue };
                for (m, fm) in split.members.iter().zip(fsplit.get_ref()) {
                    let Some(p) = pools.get(m.pool) else { continue };
                    let fm = fm.get_ref();
                    if let Some(why) = split_mismatch(first, p) {
                        self.error(&fm.pool, format!("{label}: pool \"{}\" {why} pool \"{}\"'s: the pools of a split must share one key chain", p.name, first.name));
                    }
                    let v1 = p.affinity.as_ref().is_some_and(|a| {
                        a.keys.contains(&KeySource::Cookie) && a.cookie.token_version == super::types::TokenVersion::V1
                    });
                    if v1 {
                        self.error(&fm.pool, format!("{label}: pool \"{}\" issues version 1 tokens, which record no pool: set token_version = 2 in [pools.{}.affinity.cookie]", p.name, p.name));
                    }
                }
            }
        }
    }

    /// The index of the pool a listener names.
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
}

/// How pool `p`'s affinity differs from `first`'s in what a split reads to find a
/// session's pool, in words (`None`: it does not).
fn split_mismatch(first: &Pool, p: &Pool) -> Option<&'static str> {
    match (&first.affinity, &p.affinity) {
        (None, None) => None,
        (Some(_), None) => Some("has no affinity, unlike"),
        (None, Some(_)) => Some("has affinity, unlike"),
        (Some(a), Some(b)) if a.keys != b.keys => Some("has other affinity keys than"),
        (Some(a), Some(b)) if a.mapping != b.mapping => Some("has another affinity mapping than"),
        (Some(a), Some(b)) if (a.ipv4_prefix, a.ipv6_prefix) != (b.ipv4_prefix, b.ipv6_prefix) => {
            Some("has other client IP prefixes than")
        }
        (Some(a), Some(b)) if a.keys.contains(&KeySource::Cookie) && a.cookie.name != b.cookie.name => {
            Some("has another cookie name than")
        }
        _ => None,
    }
}

// === pools and their backends ===

impl Resolver<'_> {
    fn pool(&mut self, name: &str, p: &Spanned<file::Pool>) -> Pool {
        let f = p.get_ref();
        let algorithm =
            self.choice(&f.algorithm, &format!("pool \"{name}\": algorithm"), ALGORITHMS, Algorithm::RoundRobin);
        let backends = self.backends(name, p);
        let dns = self.dns_sources(name, &f.dns);
        let resolvers = match &f.resolvers {
            None => Vec::new(),
            Some(list) => {
                let label = format!("pool \"{name}\": resolvers");
                if f.dns.is_empty() {
                    self.error(list, format!("{label}: the pool has no [[pools.{name}.dns]] sources to resolve"));
                }
                self.resolvers(&label, list, "to use [dns]'s")
            }
        };
        let affinity = f.affinity.as_ref().map(|a| self.affinity(name, a));
        let health = f.health.as_ref().map(|h| self.health(name, h));
        let retries = self.ranged(&f.retries, &format!("pool \"{name}\": retries"), 0..=5, 1) as u32;
        let retry_budget = self.ranged(&f.retry_budget, &format!("pool \"{name}\": retry_budget"), 0.0..=1.0, 0.2);
        let queue_timeout =
            self.duration(&f.queue_timeout, &format!("pool \"{name}\": queue_timeout"), Duration::from_secs(5));
        let slow_start = f
            .slow_start
            .as_ref()
            .map(|_| self.duration(&f.slow_start, &format!("pool \"{name}\": slow_start"), Duration::ZERO));
        let max_queue = self.ranged(&f.max_queue, &format!("pool \"{name}\": max_queue"), 0..=1_000_000, 1000) as u32;
        let panic_mode = f.panic_mode.as_ref().is_some_and(|p| *p.get_ref());
        let upgrades = self.upgrades(name, f.upgrades.as_deref());
        let http2 = self.choice(
            &f.protocol,
            &format!("pool \"{name}\": protocol"),
            &[("http1", false), ("http2", true)],
            false,
        );
        let protocol = if http2 {
            let max_streams =
                self.ranged(&f.max_streams, &format!("pool \"{name}\": max_streams"), 1..=10_000, 100) as u32;
            BackendProtocol::Http2 { max_streams }
        } else {
            if let Some(m) = &f.max_streams {
                self.error(m, format!("pool \"{name}\": max_streams is for protocol = \"http2\""));
            }
            BackendProtocol::Http1
        };
        if let (false, Some(Health { check: CheckKind::Grpc { .. }, .. })) = (http2, &health) {
            let at = f.health.as_ref().and_then(|h| h.get_ref().check.as_ref());
            let message =
                format!("pool \"{name}\": health: check = \"grpc\" needs protocol = \"http2\" (gRPC is HTTP/2)");
            match at {
                Some(c) => self.error(c, message),
                None => self.error(p, message),
            }
        }
        let alpn: &[&[u8]] = if http2 { &[b"h2"] } else { &[b"http/1.1"] };
        let tls = f.tls.as_ref().and_then(|t| self.pool_tls(name, t, alpn));
        let send_proxy_protocol = self.choice(
            &f.send_proxy_protocol,
            &format!("pool \"{name}\": send_proxy_protocol"),
            &[("v1", Some(Version::V1)), ("v2", Some(Version::V2))],
            None,
        );
        if let (true, Some(at)) = (http2, f.send_proxy_protocol.as_ref().filter(|_| send_proxy_protocol.is_some())) {
            // A PROXY header describes one client connection; HTTP/2 backend connections
            // are shared by the requests of many.
            let message = format!("pool \"{name}\": send_proxy_protocol is for protocol = \"http1\": HTTP/2 backend connections are shared by many clients' requests, and a PROXY header names one client");
            self.error(at, message);
        }
        Pool {
            name: name.to_string(),
            algorithm,
            backends,
            dns,
            resolvers,
            affinity,
            health,
            retries,
            retry_budget,
            queue_timeout,
            max_queue,
            slow_start,
            panic_mode,
            upgrades,
            send_proxy_protocol,
            tls,
            protocol,
        }
    }

    /// A pool's TLS to its backends: the CA file read (or the system's bundle), the server
    /// name checked. `None` when a setting is wrong (the error reported).
    fn pool_tls(
        &mut self,
        name: &str,
        t: &Spanned<file::PoolTls>,
        alpn: &[&[u8]],
    ) -> Option<Arc<crate::tls::backend::BackendTls>> {
        use crate::tls::backend::{self, Verify};
        let f = t.get_ref();
        let skip = f.insecure_skip_verify.as_ref().filter(|s| *s.get_ref());
        let verify = match (&f.ca_file, skip) {
            (Some(_), Some(s)) => {
                self.error(s, format!("pool \"{name}\": tls: insecure_skip_verify and ca_file exclude each other"));
                return None;
            }
            (None, Some(_)) => {
                tracing::warn!(pool = %name, "tls: insecure_skip_verify: backend certificates are not verified");
                Verify::Nothing
            }
            (Some(ca), None) => {
                let pem = match std::fs::read(ca.get_ref()) {
                    Ok(pem) => pem,
                    Err(e) => {
                        self.error(ca, format!("pool \"{name}\": tls: cannot read {}: {}", ca.get_ref(), e.kind()));
                        return None;
                    }
                };
                match backend::roots(&pem) {
                    Ok(cas) => Verify::Roots(cas),
                    Err(e) => {
                        self.error(ca, format!("pool \"{name}\": tls: ca_file {} {e}", ca.get_ref()));
                        return None;
                    }
                }
            }
            (None, None) => {
                let from_env = std::env::var("SSL_CERT_FILE").ok();
                let found = from_env
                    .iter()
                    .map(String::as_str)
                    .chain(backend::SYSTEM_ROOTS)
                    .find_map(|path| Some((path, std::fs::read(path).ok()?)));
                match found.map(|(path, pem)| (path, backend::roots(&pem))) {
                    Some((_, Ok(cas))) => Verify::Roots(cas),
                    Some((path, Err(e))) => {
                        self.error(
                            t,
                            format!("pool \"{name}\": tls: the system's CA bundle {path} {e}; name a ca_file"),
                        );
                        return None;
                    }
                    None => {
                        let message = format!(
                            "pool \"{name}\": tls: no system CA bundle found (looked in {}); name a ca_file",
                            backend::SYSTEM_ROOTS.join(", ")
                        );
                        self.error(t, message);
                        return None;
                    }
                }
            }
        };
        let server_name = f.server_name.as_ref();
        match backend::BackendTls::new(server_name.map(|s| s.get_ref().as_str()), verify, alpn) {
            Ok(tls) => Some(Arc::new(tls)),
            Err(e) => {
                match server_name {
                    Some(s) if e.contains("is not a DNS name") => {
                        self.error(s, format!("pool \"{name}\": tls: server_name {e}"))
                    }
                    _ => self.error(t, format!("pool \"{name}\": tls: {e}")),
                }
                None
            }
        }
    }

    /// The `Upgrade` protocols a pool lets clients switch to: tokens, lower-cased.
    fn upgrades(&mut self, name: &str, list: Option<&[Spanned<String>]>) -> Vec<String> {
        let Some(list) = list else { return vec!["websocket".to_string()] };
        let mut out = Vec::new();
        for v in list {
            let t = v.get_ref();
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b)) {
                self.error(v, format!("pool \"{name}\": upgrades: \"{t}\" is not a protocol token"));
            } else {
                out.push(t.to_ascii_lowercase());
            }
        }
        out
    }

    /// The pool's backends; one with a wrong address or a name used before is left out.
    fn backends(&mut self, name: &str, p: &Spanned<file::Pool>) -> Vec<Backend> {
        let mut backends: Vec<Backend> = Vec::new();
        for b in &p.get_ref().backends {
            let Some(backend) = self.backend(name, b) else { continue };
            if backends.iter().any(|o| o.name == backend.name) {
                self.error(b, format!("pool \"{name}\": backend \"{}\": the name is used twice", backend.name));
                continue;
            }
            backends.push(backend);
        }
        if p.get_ref().backends.is_empty() && p.get_ref().dns.is_empty() {
            self.error(p, format!("pool \"{name}\": no backends: list backends or add [[pools.{name}.dns]]"));
        }
        backends
    }

    /// The pool's `[[pools.NAME.dns]]` sources, each checked; the same name, type and port
    /// twice is an error.
    fn dns_sources(&mut self, pool: &str, list: &[Spanned<file::DnsSource>]) -> Vec<DnsSource> {
        let mut out: Vec<DnsSource> = Vec::new();
        for (i, d) in list.iter().enumerate() {
            let Some(source) = self.dns_source(pool, i, d) else { continue };
            if out.iter().any(|o| o.key() == source.key()) {
                let message =
                    format!("pool \"{pool}\": dns \"{}\": the same name, type and port are listed twice", source.name);
                self.error(&d.get_ref().name, message);
                continue;
            }
            out.push(source);
        }
        out
    }

    fn dns_source(&mut self, pool: &str, i: usize, d: &Spanned<file::DnsSource>) -> Option<DnsSource> {
        let f = d.get_ref();
        let name = f.name.get_ref().trim().to_string();
        let at = format!("pool \"{pool}\": dns[{i}] \"{name}\"");
        let name_ok = is_dns_name(&name);
        if !name_ok {
            self.error(
                &f.name,
                format!("{at}: name is not a DNS name (labels of letters, digits, - and _, up to 63 bytes each, 253 in all)"),
            );
        }
        let kind = self.choice(&f.kind, &format!("{at}: type"), DNS_KINDS, DnsKind::A);
        let port = match (&f.port, kind) {
            (Some(p), DnsKind::Srv) => {
                self.error(p, format!("{at}: port: SRV records carry their own port; leave it out"));
                None
            }
            (Some(p), _) => self.in_range(p, &format!("{at}: port"), 1..=65535).map(|p| p as u16),
            (None, DnsKind::Srv) => None,
            (None, _) => {
                self.error(&f.name, format!("{at}: no port: set port = 8080 (the port of the addresses found)"));
                None
            }
        };
        if let (Some(w), DnsKind::Srv) = (&f.weight, kind) {
            self.error(w, format!("{at}: weight: SRV records carry their own weights; leave it out"));
        }
        let weight = self.ranged(&f.weight, &format!("{at}: weight"), 1..=i64::from(MAX_WEIGHT), 1) as u32;
        let interval = self.duration(&f.interval, &format!("{at}: interval"), Duration::from_secs(5));
        if let Some(v) = &f.interval {
            if interval < Duration::from_millis(100) {
                self.error(v, format!("{at}: interval: {interval:?} is too short: at least 100ms"));
            }
        }
        let max_connections = match &f.max_connections {
            None => None,
            Some(m) => self.in_range(m, &format!("{at}: max_connections"), 1..=1_000_000).map(|m| m as u32),
        };
        if !name_ok || (port.is_none() && kind != DnsKind::Srv) {
            return None;
        }
        Some(DnsSource { name, port, kind, interval, weight, max_connections })
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
        let at = format!("pool \"{pool}\": backend \"{name}\"");
        let address = match resolve_address(raw) {
            Ok(a) => Some(a),
            Err(e) => {
                self.error(&b.address, format!("{at}: address \"{raw}\" {e}"));
                None
            }
        };
        let weight = self.ranged(&b.weight, &format!("{at}: weight"), 1..=i64::from(MAX_WEIGHT), 1) as u32;
        let state = self.choice(&b.state, &format!("{at}: state"), ADMIN_STATES, AdminState::Enabled);
        let max_connections = match &b.max_connections {
            None => None,
            Some(m) => self.in_range(m, &format!("{at}: max_connections"), 1..=1_000_000).map(|m| m as u32),
        };
        Some(Backend { name, address: address?, weight, state, max_connections })
    }

    fn health(&mut self, pool: &str, h: &Spanned<file::Health>) -> Health {
        let at = format!("pool \"{pool}\": health");
        let f = h.get_ref();
        let rise = self.ranged(&f.rise, &format!("{at}: rise"), 1..=1000, 2) as u32;
        let fall = self.ranged(&f.fall, &format!("{at}: fall"), 1..=1000, 3) as u32;
        let eject_after = self.ranged(&f.eject_after, &format!("{at}: eject_after"), 0..=1000, 5) as u32;
        let interval = self.duration(&f.interval, &format!("{at}: interval"), Duration::from_secs(2));
        let timeout = self.duration(&f.timeout, &format!("{at}: timeout"), Duration::from_secs(1));
        let eject_time = self.duration(&f.eject_time, &format!("{at}: eject_time"), Duration::from_secs(10));
        let max_ejected = self.ranged(&f.max_ejected, &format!("{at}: max_ejected"), 0.0..=1.0, 0.5);
        let check = self.check(&at, f);
        if timeout > interval {
            let msg = format!("{at}: timeout {timeout:?} is longer than the interval {interval:?}");
            match &f.timeout {
                Some(t) => self.error(t, msg),
                None => self.error(h, msg),
            }
        }
        Health { check, interval, timeout, rise, fall, eject_after, eject_time, max_ejected }
    }

    /// The active check; HTTP unless the file says otherwise.
    fn check(&mut self, at: &str, f: &file::Health) -> CheckKind {
        let kind = match &f.check {
            None => Check::Http,
            // An unknown kind falls back to tcp, so that the HTTP settings are not checked too.
            Some(c) => {
                let complaint = |v: &str, list: &str| format!("{at}: check \"{v}\" is not known: expected {list}");
                self.lookup(c, CHECKS, |a, b| a == b, complaint).unwrap_or(Check::Tcp)
            }
        };
        if let Some(s) = f.service.as_ref().filter(|_| kind != Check::Grpc) {
            self.error(s, format!("{at}: service is for check = \"grpc\""));
        }
        match kind {
            Check::Http => self.http_check(at, f),
            Check::Tcp => CheckKind::Tcp,
            Check::Grpc => {
                CheckKind::Grpc { service: f.service.as_ref().map(|s| s.get_ref().clone()).unwrap_or_default() }
            }
        }
    }

    fn http_check(&mut self, at: &str, f: &file::Health) -> CheckKind {
        let method = f.method.as_ref().map_or("GET".to_string(), |m| m.get_ref().to_ascii_uppercase());
        if let Some(m) =
            f.method.as_ref().filter(|_| method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()))
        {
            self.error(m, format!("{at}: method \"{method}\" is not an HTTP method"));
        }
        let path = match &f.path {
            None => "/".to_string(),
            Some(p) if p.get_ref().starts_with('/') && !p.get_ref().contains([' ', '\r', '\n']) => p.get_ref().clone(),
            Some(p) => {
                self.error(p, format!("{at}: path \"{}\" must start with / and have no spaces", p.get_ref()));
                "/".to_string()
            }
        };
        let host = f.host.as_ref().map(|h| h.get_ref().clone());
        let expect_status = match &f.expect_status {
            None => vec![(200, 399)],
            Some(s) => parse_statuses(s.get_ref()).unwrap_or_else(|| {
                let message = format!(
                    "{at}: expect_status \"{}\" is not a list of statuses like \"200-399\" or \"200,204\"",
                    s.get_ref()
                );
                self.error(s, message);
                vec![(200, 399)]
            }),
        };
        let expect_body = f.expect_body.as_ref().map(|b| b.get_ref().clone());
        CheckKind::Http { method, path, host, expect_status, expect_body }
    }
}

// === session affinity ===

impl Resolver<'_> {
    fn affinity(&mut self, pool: &str, a: &Spanned<file::Affinity>) -> Affinity {
        let at = format!("pool \"{pool}\": affinity");
        let f = a.get_ref();
        let d = Affinity::default();
        let keys = self.keys(&at, &f.keys);
        let mapping = self.choice(&f.mapping, &format!("{at}: mapping"), MAPPINGS, d.mapping);
        let on_unavailable =
            self.choice(&f.on_unavailable, &format!("{at}: on_unavailable"), ON_UNAVAILABLE, d.on_unavailable);
        let repin_header = match &f.repin_header {
            None => d.repin_header.clone(),
            Some(h) if http::HeaderName::from_bytes(h.get_ref().as_bytes()).is_ok() => h.get_ref().to_ascii_lowercase(),
            Some(h) => {
                self.error(h, format!("{at}: repin_header \"{}\" is not a header name", h.get_ref()));
                d.repin_header.clone()
            }
        };
        let max_sessions_factor = match &f.max_sessions_factor {
            None => d.max_sessions_factor,
            Some(v) if v.get_ref().is_finite() && *v.get_ref() >= 1.0 => Some(*v.get_ref()),
            Some(v) => {
                self.error(v, format!("{at}: max_sessions_factor {} must be at least 1.0 (1.25 lets a backend take 25% more than the mean)", v.get_ref()));
                d.max_sessions_factor
            }
        };
        let drain_timeout = f
            .drain_timeout
            .as_ref()
            .map(|_| self.duration(&f.drain_timeout, &format!("{at}: drain_timeout"), Duration::ZERO));
        let ipv4_prefix = self.ranged(&f.ipv4_prefix, &format!("{at}: ipv4_prefix"), 1..=32, i64::from(d.ipv4_prefix));
        let ipv6_prefix = self.ranged(&f.ipv6_prefix, &format!("{at}: ipv6_prefix"), 1..=128, i64::from(d.ipv6_prefix));
        let cookie = self.cookie(&at, f.cookie.as_ref());
        if let Some(c) = &f.cookie {
            if !keys.contains(&KeySource::Cookie) {
                self.error(c, format!("{at}: a [cookie] section is set but \"cookie\" is not among the keys"));
            }
        }
        let table = self.table(&at, f.table.as_ref());
        let rebalance = f.rebalance.as_ref().map(|r| self.rebalance(&at, r, &keys, mapping));
        if let (Some(r), OnUnavailable::Strict) = (&f.rebalance, on_unavailable) {
            // A strict pool is one whose application cannot take a session moved to
            // another backend; moving idle ones would break it all the same.
            self.error(
                r,
                format!("{at}: rebalance moves sessions, which a pool with on_unavailable = \"strict\" never does"),
            );
        }
        Affinity {
            keys,
            mapping,
            on_unavailable,
            repin_header,
            max_sessions_factor,
            drain_timeout,
            ipv4_prefix: ipv4_prefix as u8,
            ipv6_prefix: ipv6_prefix as u8,
            cookie,
            table,
            store: None,
            rebalance,
        }
    }

    /// `[affinity.rebalance]`. Rebalancing moves a session by re-pinning it, so the chain
    /// needs a key that is pinned: Tether's cookie or a table-mapped key (a hashed key has
    /// no pin to move; its backend is wherever the hash says).
    fn rebalance(&mut self, at: &str, r: &Spanned<file::Rebalance>, keys: &[KeySource], mapping: Mapping) -> Rebalance {
        let at = format!("{at}: rebalance");
        let f = r.get_ref();
        let d = Rebalance::default();
        let factor = match &f.factor {
            None => d.factor,
            Some(v) if v.get_ref().is_finite() && *v.get_ref() > 1.0 && *v.get_ref() <= 100.0 => *v.get_ref(),
            Some(v) => {
                let message = format!(
                    "{at}: factor {} must be over 1.0 and at most 100 (1.5 moves sessions off a backend holding 50% more than the mean)",
                    v.get_ref()
                );
                self.error(v, message);
                d.factor
            }
        };
        let idle = self.duration(&f.idle, &format!("{at}: idle"), d.idle);
        let max_per_second = self.ranged(&f.max_per_second, &format!("{at}: max_per_second"), 1..=100_000, 20) as u32;
        let pinned = keys.iter().any(|k| match k {
            KeySource::Cookie | KeySource::AppCookie(_) => true,
            KeySource::Header(_) | KeySource::Query(_) | KeySource::ClientIp => mapping == Mapping::Table,
        });
        if !pinned {
            self.error(
                r,
                format!("{at}: the key chain has only hashed keys, which have no pin to move: add \"cookie\" or use mapping = \"table\""),
            );
        }
        Rebalance { factor, idle, max_per_second }
    }

    /// The key chain, in order, without repeats; it must not be empty.
    fn keys(&mut self, at: &str, list: &Spanned<Vec<Spanned<String>>>) -> Vec<KeySource> {
        let mut keys: Vec<KeySource> = Vec::new();
        for k in list.get_ref() {
            let raw = k.get_ref().trim();
            match key_source(raw) {
                Some(key) if keys.contains(&key) => self.error(k, format!("{at}: key \"{raw}\" is listed twice")),
                Some(key) => keys.push(key),
                None => self.error(
                    k,
                    format!("{at}: key \"{raw}\" is not known: expected \"cookie\", \"app_cookie:NAME\", \"header:NAME\", \"query:NAME\" or \"client_ip\""),
                ),
            }
        }
        if list.get_ref().is_empty() {
            self.error(list, format!("{at}: keys is empty: list at least one key, like [\"cookie\"]"));
        }
        keys
    }

    fn cookie(&mut self, at: &str, c: Option<&Spanned<file::Cookie>>) -> CookieConfig {
        let mut cfg = CookieConfig::default();
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
        self.cookie_scope(at, c, &mut cfg);
        cfg.secure = c.secure.as_ref().map(|s| *s.get_ref());
        cfg.http_only = c.http_only.as_ref().is_none_or(|h| *h.get_ref());
        if let Some(m) = &c.max_age {
            cfg.max_age = match m.get_ref().as_str() {
                "session" => None,
                _ => Some(self.duration(&c.max_age, &format!("{at}: cookie.max_age"), Duration::from_secs(3600))),
            };
        }
        cfg.keys = self.cookie_keys(at, c);
        cfg.clock_skew = self.duration(&c.clock_skew, &format!("{at}: cookie.clock_skew"), cfg.clock_skew);
        // Every version this build opens may be issued: 1 (the default) or 2.
        let version = self.ranged(&c.token_version, &format!("{at}: cookie.token_version"), 1..=2, 1);
        cfg.token_version =
            u8::try_from(version).ok().and_then(super::types::TokenVersion::from_number).unwrap_or(cfg.token_version);
        cfg
    }

    /// The cookie keys, from exactly one of `keys`, `keys_file` or `keys_env`, each checked.
    fn cookie_keys(&mut self, at: &str, c: &file::Cookie) -> Vec<Secret> {
        let given = [c.keys.is_some(), c.keys_file.is_some(), c.keys_env.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            let at_span = c.keys_file.as_ref().or(c.keys_env.as_ref()).map(|v| v.span()).unwrap_or_default();
            self.errors.push(locate(
                self.src,
                at_span,
                format!("{at}: cookie: set only one of keys, keys_file and keys_env"),
            ));
            return Vec::new();
        }
        let (raw, span, what): (Vec<String>, _, String) = if let Some(list) = &c.keys {
            let mut keys = Vec::new();
            for (i, k) in list.get_ref().iter().enumerate() {
                match crate::affinity::token::Key::from_base64(k.get_ref()) {
                    Ok(_) => keys.push(Secret::new(k.get_ref().clone())),
                    Err(e) => self.error(k, format!("{at}: cookie.keys[{i}]: {e}")),
                }
            }
            return keys;
        } else if let Some(path) = &c.keys_file {
            match std::fs::read_to_string(path.get_ref()) {
                Ok(text) => (split_keys(&text), path.span(), format!("cookie.keys_file {}", path.get_ref())),
                Err(e) => {
                    self.error(path, format!("{at}: cookie.keys_file: cannot read {}: {}", path.get_ref(), e.kind()));
                    return Vec::new();
                }
            }
        } else if let Some(var) = &c.keys_env {
            match std::env::var(var.get_ref()) {
                Ok(text) => (split_keys(&text), var.span(), format!("cookie.keys_env {}", var.get_ref())),
                Err(_) => {
                    let message =
                        format!("{at}: cookie.keys_env: the environment variable {} is not set", var.get_ref());
                    self.error(var, message);
                    return Vec::new();
                }
            }
        } else {
            return Vec::new();
        };
        if raw.is_empty() {
            self.errors.push(locate(self.src, span.clone(), format!("{at}: {what} holds no key")));
        }
        let mut keys = Vec::new();
        for (i, k) in raw.into_iter().enumerate() {
            // The error names the key's place, never the key.
            match crate::affinity::token::Key::from_base64(&k) {
                Ok(_) => keys.push(Secret::new(k)),
                Err(e) => self.errors.push(locate(self.src, span.clone(), format!("{at}: {what}: key {}: {e}", i + 1))),
            }
        }
        keys
    }

    /// Where the browser sends the cookie: its `Domain`, `Path` and `SameSite`.
    fn cookie_scope(&mut self, at: &str, c: &file::Cookie, cfg: &mut CookieConfig) {
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
            let complaint =
                |v: &str, list: &str| format!("{at}: cookie.same_site \"{v}\" is not known: expected {list}");
            cfg.same_site = self.lookup(s, SAME_SITE, str::eq_ignore_ascii_case, complaint).unwrap_or(cfg.same_site);
        }
    }

    fn table(&mut self, at: &str, t: Option<&Spanned<file::Table>>) -> TableConfig {
        let d = TableConfig::default();
        let Some(t) = t else { return d };
        let t = t.get_ref();
        let capacity =
            self.ranged(&t.capacity, &format!("{at}: table.capacity"), 1..=100_000_000, d.capacity as i64) as usize;
        let idle_timeout = self.duration(&t.idle_timeout, &format!("{at}: table.idle_timeout"), d.idle_timeout);
        TableConfig { capacity, idle_timeout }
    }
}

/// One entry of an affinity key chain, such as `cookie` or `header:X-User`.
fn key_source(raw: &str) -> Option<KeySource> {
    let (kind, arg) = match raw.split_once(':') {
        Some((kind, arg)) => (kind.trim(), Some(arg.trim())),
        None => (raw, None),
    };
    match (kind, arg) {
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

/// Keys as a file or variable holds them: separated by whitespace or commas.
fn split_keys(text: &str) -> Vec<String> {
    text.split(|c: char| c.is_whitespace() || c == ',').filter(|k| !k.is_empty()).map(str::to_string).collect()
}

/// A name that can be asked of DNS: dotted labels (a trailing dot allowed) of letters,
/// digits, `-` and `_` (SRV names start with `_service._proto`), 1 to 63 bytes each, at
/// most 253 in all.
fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// An RFC 9110 token, which is what a cookie name must be.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
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

//! How a request and a response change on their way through: the request leaves in
//! HTTP/1.1 origin-form with hop-by-hop headers removed, `Host` kept and forwarding
//! headers set; with affinity, Tether's own cookie and re-pin header are Tether's alone, and
//! the response is where sessions persist. Pure header work: no I/O, no decisions.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri, Version};
use hyper::body::Incoming;

use super::client::ConnCx;
use crate::affinity::verdict::Verdict;
use crate::affinity::{self, cookies, Decision, PoolAffinity};
use crate::net::{canonical, Cidr};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The host a request is for, as it should reach the backend in `Host`. The authority of
/// an absolute URI (HTTP/1.1 absolute-form, HTTP/2 `:authority`) wins over `Host`, as
/// RFC 9112 section 3.2.2 says. HTTP/1.1 requires exactly one `Host`.
pub fn host_of(req: &Request<Incoming>) -> Result<Option<HeaderValue>, &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    if let Some(a) = req.uri().authority() {
        return HeaderValue::from_str(a.as_str()).map(Some).map_err(|_| "bad authority");
    }
    match first {
        Some(h) if h.to_str().is_ok_and(|s| !s.is_empty() && !s.contains(['/', ' ', '\\', '@'])) => Ok(Some(h.clone())),
        Some(_) => Err("malformed Host header"),
        None if req.version() == Version::HTTP_11 => Err("HTTP/1.1 request without a Host header"),
        None => Ok(None),
    }
}

/// The comma-separated tokens of every `name` header, trimmed, empty ones skipped.
fn tokens<'h>(headers: &'h HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'h str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// `token` (`name` or `name/version`) is allowed by an entry naming it exactly, or by an
/// entry naming its protocol without a version.
#[cfg(test)]
fn allows(allowed: &[String], token: &str) -> bool {
    let name = token.split('/').next().unwrap_or(token);
    allowed.iter().any(|a| a.eq_ignore_ascii_case(token) || (!a.contains('/') && a.eq_ignore_ascii_case(name)))
}

/// Leaves only allowed protocols in `Upgrade`, so a backend cannot pick one the pool does
/// not allow from a list that also names an allowed one. The native path does this as it
/// writes the head; this is the reference its unit tests compare with (HTTP/2 has no
/// upgrades).
#[cfg(test)]
pub fn keep_allowed_upgrades(headers: &mut HeaderMap, allowed: &[String]) {
    if tokens(headers, &header::UPGRADE).all(|t| allows(allowed, t)) {
        return;
    }
    let kept: Vec<&str> = tokens(headers, &header::UPGRADE).filter(|t| allows(allowed, t)).collect();
    if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
        headers.insert(header::UPGRADE, v);
    }
}

/// Forwarding headers a backend may believe. From a client that is not a trusted proxy, each
/// of them, under any spelling a CGI-style backend reads as the same variable (`_` for
/// `-`, any case), is removed or replaced.
const FORWARDING: [&str; 5] = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip"];

/// Whether header name `name` is `canonical` (lower case, with `-`) when `_` is read as
/// `-` and case is ignored, as CGI-style backends read names (`X_Real_IP` is `x-real-ip`).
fn same_name(name: &str, canonical: &str) -> bool {
    let fold = |b: u8| if b == b'_' { b'-' } else { b.to_ascii_lowercase() };
    name.len() == canonical.len() && name.bytes().zip(canonical.bytes()).all(|(a, b)| fold(a) == fold(b))
}

/// Removes every header whose name `hit` matches. One pass over the names and no
/// allocation when none does, which is nearly always.
fn remove_names(headers: &mut HeaderMap, hit: impl Fn(&HeaderName) -> bool) {
    if !headers.keys().any(&hit) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|n| hit(n)).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

/// Whether the client's `TE` says it takes trailers.
pub fn asks_for_trailers(headers: &HeaderMap) -> bool {
    headers.get_all(header::TE).iter().flat_map(|v| v.as_bytes().split(|&b| b == b',')).any(|t| {
        t.trim_ascii().split(|&b| b == b';').next().is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
    })
}

/// Prepares a client's request for the backend: HTTP/1.1 in origin-form, hop-by-hop
/// headers removed, HTTP/2 cookie crumbs joined, `Host` kept, forwarding headers set.
pub fn request(req: &mut Request<Incoming>, cx: &ConnCx, host: Option<HeaderValue>, trusted: bool) {
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = Uri::try_from(pq).unwrap_or_else(|_| Uri::from_static("/"));
    }
    let h2 = req.version() == Version::HTTP_2;
    *req.version_mut() = Version::HTTP_11;
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, false);
    if h2 {
        join_cookie_crumbs(headers);
    }
    if !trusted {
        // A client that is not a trusted proxy chooses none of the forwarding headers, under
        // any spelling: `X_Forwarded_For` or `x-real-ip` would otherwise reach a backend
        // that reads them as its client's address.
        remove_names(headers, |n| FORWARDING.iter().any(|f| same_name(n.as_str(), f)));
    }

    // X-Forwarded-For: a trusted proxy's list is extended; anyone else's is replaced, so a
    // client cannot choose the address a backend believes it has.
    let xff = match (trusted, headers.contains_key(&X_FORWARDED_FOR)) {
        (true, true) => {
            let mut joined = Vec::with_capacity(64);
            for v in headers.get_all(&X_FORWARDED_FOR) {
                if !joined.is_empty() {
                    joined.extend_from_slice(b", ");
                }
                joined.extend_from_slice(v.as_bytes());
            }
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(cx.peer_ip.as_bytes());
            HeaderValue::from_bytes(&joined).unwrap_or_else(|_| cx.peer_ip.clone())
        }
        _ => cx.peer_ip.clone(),
    };
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        let proto = if cx.tls { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    }
    if let Some(h) = &host {
        if !(trusted && headers.contains_key(&X_FORWARDED_HOST)) {
            headers.insert(X_FORWARDED_HOST.clone(), h.clone());
        }
    }
    match host {
        Some(h) => {
            headers.insert(header::HOST, h);
        }
        None => {
            // HTTP/1.0 without Host: the backend needs one on HTTP/1.1.
            headers.remove(header::HOST);
        }
    }
}

/// HTTP/2 lets a client split `Cookie` into one field per cookie ("crumbs"); an HTTP/1
/// backend expects one line, so the crumbs are joined with "; " (RFC 9113 section 8.2.3).
fn join_cookie_crumbs(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    if crumbs.next().is_none() || crumbs.next().is_none() {
        return;
    }
    let mut joined = Vec::with_capacity(256);
    for v in headers.get_all(header::COOKIE) {
        if v.is_empty() {
            continue;
        }
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// Whether the client reached the trusted proxy in front of Tether over HTTPS: the peer is
/// a trusted proxy and the first entry of its `X-Forwarded-Proto` is `https`. From anyone
/// else the header means nothing (and is replaced by `http`).
pub fn forwarded_https(headers: &HeaderMap, trusted: bool) -> bool {
    trusted
        && headers
            .get(&X_FORWARDED_PROTO)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"))
}

/// Removes the headers that belong to one connection and must not be forwarded (RFC 9110
/// section 7.6.1): `Connection` and every header it names, `Keep-Alive`,
/// `Proxy-Connection`, `TE`, `Transfer-Encoding` and `Upgrade`. For an upgrade that goes
/// through, `Connection: upgrade` and `Upgrade` are kept.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of these: one pass over the names is cheaper than six
    // hash lookups (callgrind showed `HeaderMap::remove` at 2% of all instructions).
    let hop = |n: &HeaderName| {
        n == header::CONNECTION
            || n == header::TE
            || n == header::TRANSFER_ENCODING
            || n == header::UPGRADE
            || n == KEEP_ALIVE
            || n == PROXY_CONNECTION
    };
    if !headers.keys().any(hop) {
        if upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let mut named: Vec<HeaderName> = Vec::new();
        for token in tokens(headers, &header::CONNECTION) {
            if token.eq_ignore_ascii_case("upgrade") || token.eq_ignore_ascii_case("close") {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                // Never let a client strip what Tether itself sets or relies on.
                if name != header::HOST && name != X_FORWARDED_FOR {
                    named.push(name);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TE);
    headers.remove(header::TRANSFER_ENCODING);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// The address a client-IP key uses: the peer, or, when the peer is a trusted proxy, the
/// first address in `X-Forwarded-For` (read from the right) that is not a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted_proxies: &[Cidr], trusted: bool) -> IpAddr {
    let xff = headers.get_all(&X_FORWARDED_FOR).iter().map(HeaderValue::as_bytes);
    client_ip_from(peer, xff, trusted_proxies, trusted)
}

/// [`client_ip`] over the values of the request's `X-Forwarded-For` fields, in the order
/// received (for a head of Tether's own codec: `fields.values(buf, Known::XForwardedFor)`).
/// A value that is not text (see [`affinity::keys::header_text`]) is skipped.
///
/// The answer is that of reading the entries from the right, in one pass from the left
/// (no allocation, any iterator): the rightmost entry that is not a trusted proxy's
/// address decides. An address is the client; an entry that is not an address means
/// the entry to its right (a trusted proxy), or the peer when it is the last. With no
/// such entry, all are trusted proxies and the leftmost is the client (the peer when
/// there are none).
pub fn client_ip_from<'v>(
    peer: IpAddr,
    forwarded_for: impl IntoIterator<Item = &'v [u8]>,
    trusted_proxies: &[Cidr],
    trusted: bool,
) -> IpAddr {
    let peer = canonical(peer);
    if !trusted {
        return peer;
    }
    // The leftmost entry, while every entry so far is a trusted proxy's address.
    let mut leftmost: Option<IpAddr> = None;
    // The rightmost entry so far that stops a right-to-left reading, and what it answers.
    let mut stop: Option<Stop> = None;
    let values = forwarded_for.into_iter().filter_map(affinity::keys::header_text);
    for entry in values.flat_map(|v| v.split(',')) {
        match entry.trim().parse::<IpAddr>().map(canonical) {
            Err(_) => stop = Some(Stop::NotAnAddress { right: None }),
            Ok(ip) if !trusted_proxies.iter().any(|c| c.contains(ip)) => stop = Some(Stop::Client(ip)),
            Ok(ip) => match &mut stop {
                Some(Stop::NotAnAddress { right: right @ None }) => *right = Some(ip),
                Some(_) => {}
                None => {
                    leftmost.get_or_insert(ip);
                }
            },
        }
    }
    match stop {
        Some(Stop::Client(ip)) => ip,
        Some(Stop::NotAnAddress { right }) => right.unwrap_or(peer),
        None => leftmost.unwrap_or(peer),
    }
}

/// An `X-Forwarded-For` entry where reading from the right stops.
enum Stop {
    /// The address of a client that is not a trusted proxy.
    Client(IpAddr),
    /// Not an address: the answer is the (trusted) entry to its right, if any.
    NotAnAddress { right: Option<IpAddr> },
}

/// Request changes for a pool with affinity: Tether's cookie never reaches the backend,
/// and the re-pin header is Tether's alone to set.
pub fn for_affinity(headers: &mut HeaderMap, a: &PoolAffinity, verdict: Verdict) {
    if let Some(name) = a.cookie_name() {
        if affinity::cookie_value(headers, name).is_some() {
            let kept: Vec<HeaderValue> = headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| match v.to_str().ok().and_then(|s| cookies::strip_cookie(s, name)) {
                    None => Some(v.clone()),
                    Some(rest) if rest.is_empty() => None,
                    Some(rest) => HeaderValue::from_str(&rest).ok(),
                })
                .collect();
            headers.remove(header::COOKIE);
            for v in kept {
                headers.append(header::COOKIE, v);
            }
        }
    }
    // Under any spelling a CGI-style backend reads as the same name.
    let repin = a.cfg.repin_header.as_str();
    remove_names(headers, |n| same_name(n.as_str(), repin));
    if let Some(reason) = verdict.reason() {
        if let Ok(name) = HeaderName::from_bytes(repin.as_bytes()) {
            headers.insert(name, HeaderValue::from_static(reason));
        }
    }
}

/// Response changes for a pool with affinity: learn the application's session cookie,
/// and set Tether's when the session is new, moved, or due for a fresh idle stamp. For a
/// request that came over HTTPS (see [`forwarded_https`]) Tether's cookie carries `Secure`
/// unless the pool's `cookie.secure` says otherwise.
pub fn persist(headers: &mut HeaderMap, a: &PoolAffinity, d: &Decision, backend: usize, https: bool) {
    if a.learns() {
        a.learn(affinity::keys::http_set_cookies(headers), backend);
    }
    if let Some(t) = &d.issue {
        let mut cookie = a.set_cookie(t);
        if https && a.cfg.cookie.secure.is_none() && !cookies::has_attribute(&cookie, "Secure") {
            cookie.push_str("; Secure");
        }
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            headers.append(header::SET_COOKIE, v);
            private_to_shared_caches(headers);
        }
    }
}

/// A shared cache must not hand one client's session cookie to another. Tether keeps
/// issuing its cookie (so stickiness works) and makes the response private instead: a
/// response without `Cache-Control` gets `private`; one that is neither `private` nor
/// `no-store` (for instance `public, max-age=600`, `s-maxage=60` or a bare `max-age`,
/// which a shared cache may store) has `public` and `s-maxage` removed and `private`
/// added, its other directives kept. A browser may still cache it; a CDN may not.
fn private_to_shared_caches(headers: &mut HeaderMap) {
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
        return;
    }
    let directives =
        || headers.get_all(header::CACHE_CONTROL).iter().filter_map(|v| v.to_str().ok()).flat_map(cache_directives);
    let name = |d: &str| d.split('=').next().unwrap_or("").trim().to_ascii_lowercase();
    // A qualified `private="field"` leaves the rest of the response shareable.
    if directives().any(|d| d.eq_ignore_ascii_case("private") || d.eq_ignore_ascii_case("no-store")) {
        return;
    }
    let mut out = String::from("private");
    for d in directives() {
        if !matches!(name(d).as_str(), "public" | "s-maxage" | "private") {
            out.push_str(", ");
            out.push_str(d);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&out) {
        headers.insert(header::CACHE_CONTROL, v);
    }
}

/// The directives of one `Cache-Control` value, trimmed, empty ones skipped; a comma inside
/// a quoted string (`no-cache="a, b"`) does not split.
fn cache_directives(v: &str) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    v.split(move |c| {
        if c == '"' {
            quoted = !quoted;
        }
        c == ',' && !quoted
    })
    .map(str::trim)
    .filter(|d| !d.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `client_ip` as it read `X-Forwarded-For` before it took any iterator: values
    /// reversed, entries from the right, stopping at the first that is not a trusted proxy.
    fn client_ip_from_the_right(peer: IpAddr, values: &[&[u8]], trusted_proxies: &[Cidr]) -> IpAddr {
        let mut last = canonical(peer);
        let values = values.iter().rev().filter_map(|v| std::str::from_utf8(v).ok().filter(|s| s.is_ascii()));
        for entry in values.flat_map(|v| v.rsplit(',')) {
            let Ok(ip) = entry.trim().parse::<IpAddr>() else { return last };
            let ip = canonical(ip);
            if !trusted_proxies.iter().any(|c| c.contains(ip)) {
                return ip;
            }
            last = ip;
        }
        last
    }

    #[test]
    fn forwarded_for_read_in_one_pass_answers_as_read_from_the_right() {
        let proxies = [Cidr::parse("10.0.0.0/8").unwrap(), Cidr::parse("192.0.2.0/24").unwrap()];
        let peer: IpAddr = "10.9.9.9".parse().unwrap();
        // Trusted proxies, clients, an IPv4-mapped trusted address, and entries that are
        // not addresses (garbage, empty, a port, not text).
        let entries: [&[u8]; 9] = [
            b"10.1.1.1",
            b" 10.2.2.2 ",
            b"203.0.113.7",
            b"2001:db8::5",
            b"::ffff:192.0.2.9",
            b"junk",
            b"",
            b"1.2.3.4:80",
            b"\xff",
        ];
        let mut checked = 0;
        // Every list of up to three entries, as one value and split into two values.
        let mut lists: Vec<Vec<&[u8]>> = vec![vec![]];
        for _ in 0..3 {
            let longer: Vec<Vec<&[u8]>> = lists
                .iter()
                .filter(|l| l.len() == lists.iter().map(Vec::len).max().unwrap())
                .flat_map(|l| entries.iter().map(move |e| [l.clone(), vec![*e]].concat()))
                .collect();
            lists.extend(longer);
        }
        for list in &lists {
            let joined = list.join(&b","[..]);
            let mut splits = vec![vec![joined.as_slice()]];
            for at in 1..list.len() {
                let (a, b) = list.split_at(at);
                splits.push(vec![a.join(&b","[..]).leak(), b.join(&b","[..]).leak()]);
            }
            for values in &splits {
                let want = client_ip_from_the_right(peer, values, &proxies);
                let got = client_ip_from(peer, values.iter().copied(), &proxies, true);
                assert_eq!(got, want, "{:?}", values.iter().map(|v| String::from_utf8_lossy(v)).collect::<Vec<_>>());
                assert_eq!(client_ip_from(peer, values.iter().copied(), &proxies, false), peer);
                checked += 1;
            }
        }
        assert!(checked > 1000, "{checked}");
        // Through a header map, as the HTTP/2 path reads it.
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1, 203.0.113.7"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.1.1.1"));
        assert_eq!(client_ip(peer, &h, &proxies, true), "203.0.113.7".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(peer, &h, &proxies, false), peer);
    }

    #[test]
    fn strips_connection_named_and_fixed_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret, close"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn keeps_upgrade_headers_for_an_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
    }

    #[test]
    fn connection_cannot_strip_host() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("host"));
        h.insert(header::HOST, HeaderValue::from_static("shop.example"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.contains_key(header::HOST));
    }

    #[test]
    fn header_names_match_with_underscores_and_any_case() {
        assert!(same_name("x_forwarded_for", "x-forwarded-for"));
        assert!(same_name("X_Real-IP", "x-real-ip"));
        assert!(same_name("tether_session_repinned", "Tether-Session-Repinned"));
        assert!(!same_name("x-forwarded-fo", "x-forwarded-for"));
        assert!(!same_name("x.forwarded.for", "x-forwarded-for"));
    }

    #[test]
    fn forwarding_headers_go_under_every_spelling() {
        let mut h = HeaderMap::new();
        for name in ["forwarded", "x_forwarded_for", "x_forwarded_host", "x-real-ip", "x_real_ip", "x-app"] {
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("6.6.6.6"));
        }
        remove_names(&mut h, |n| FORWARDING.iter().any(|f| same_name(n.as_str(), f)));
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-app"]);
    }

    #[test]
    fn cookie_crumbs_become_one_line() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        join_cookie_crumbs(&mut h);
        let all: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3"]);
        // One line stays as it is.
        join_cookie_crumbs(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
    }

    fn cache_control_after(values: &[&'static str]) -> String {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::CACHE_CONTROL, HeaderValue::from_static(v));
        }
        private_to_shared_caches(&mut h);
        let all: Vec<_> = h.get_all(header::CACHE_CONTROL).iter().map(|v| v.to_str().unwrap()).collect();
        all.join(" | ")
    }

    #[test]
    fn a_response_with_tethers_cookie_is_private() {
        assert_eq!(cache_control_after(&[]), "private");
        assert_eq!(cache_control_after(&["public, max-age=600"]), "private, max-age=600");
        assert_eq!(cache_control_after(&["max-age=60, S-MaxAge=600"]), "private, max-age=60");
        assert_eq!(cache_control_after(&["Public", "must-revalidate"]), "private, must-revalidate");
        assert_eq!(cache_control_after(&["max-age=60"]), "private, max-age=60");
        assert_eq!(cache_control_after(&["public, no-cache=\"a, b\""]), "private, no-cache=\"a, b\"");
        assert_eq!(cache_control_after(&["private=\"x\", public"]), "private");
        // Already kept out of shared caches: left alone.
        assert_eq!(cache_control_after(&["private, max-age=60"]), "private, max-age=60");
        assert_eq!(cache_control_after(&["no-store"]), "no-store");
    }

    #[test]
    fn tethers_cookie_is_secure_behind_a_trusted_https_proxy() {
        let cfg = crate::config::Affinity::default();
        let a = PoolAffinity::build("web", &[("app-1", 1)], &cfg, None);
        let set_cookie = |https: bool, a: &PoolAffinity| {
            let mut d = Decision::plain(Some(0));
            d.issue = Some(crate::affinity::token::Token::issue(a.ids[0], 1_800_000_000).unwrap());
            let mut h = HeaderMap::new();
            persist(&mut h, a, &d, 0, https);
            h.get(header::SET_COOKIE).unwrap().to_str().unwrap().to_string()
        };
        assert!(!cookies::has_attribute(&set_cookie(false, &a), "Secure"));
        let secure = set_cookie(true, &a);
        assert!(secure.ends_with("; Secure") && secure.matches("Secure").count() == 1, "{secure}");
        // `cookie.secure = false` is the operator's word; SameSite=None carries Secure once.
        let mut off = cfg.clone();
        off.cookie.secure = Some(false);
        let a = PoolAffinity::build("web", &[("app-1", 1)], &off, None);
        assert!(!cookies::has_attribute(&set_cookie(true, &a), "Secure"));
        let mut none = cfg.clone();
        none.cookie.same_site = crate::config::SameSite::None;
        let a = PoolAffinity::build("web", &[("app-1", 1)], &none, None);
        assert_eq!(set_cookie(true, &a).matches("Secure").count(), 1);
    }

    #[test]
    fn https_is_believed_only_from_trusted_proxies() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("HTTPS, http"));
        assert!(forwarded_https(&h, true));
        assert!(!forwarded_https(&h, false));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        assert!(!forwarded_https(&h, true));
    }
}

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

pub fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && has_token(req.headers(), &header::CONNECTION, "upgrade")
}

fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Prepares a client's request for the backend: HTTP/1.1 in origin-form, hop-by-hop
/// headers removed, `Host` kept, forwarding headers set.
pub fn request(req: &mut Request<Incoming>, cx: &ConnCx, host: Option<HeaderValue>, trusted: bool, upgrade: bool) {
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = Uri::try_from(pq).unwrap_or_else(|_| Uri::from_static("/"));
    }
    *req.version_mut() = Version::HTTP_11;
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);

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
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
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
        for v in headers.get_all(header::CONNECTION) {
            let Ok(v) = v.to_str() else { continue };
            for token in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
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
    let peer = canonical(peer);
    if !trusted {
        return peer;
    }
    let mut last = peer;
    let values = headers.get_all(&X_FORWARDED_FOR).iter().rev().filter_map(|v| v.to_str().ok());
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
    let repin = a.cfg.repin_header.as_str();
    headers.remove(repin);
    if let Some(reason) = verdict.reason() {
        if let Ok(name) = HeaderName::from_bytes(repin.as_bytes()) {
            headers.insert(name, HeaderValue::from_static(reason));
        }
    }
}

/// Response changes for a pool with affinity: learn the application's session cookie,
/// and set Tether's when the session is new, moved, or due for a fresh idle stamp.
pub fn persist(headers: &mut HeaderMap, a: &PoolAffinity, d: &Decision, backend: usize) {
    if a.learns() {
        a.learn(headers, backend);
    }
    if let Some(t) = &d.issue {
        if let Ok(v) = HeaderValue::from_str(&a.set_cookie(t)) {
            headers.append(header::SET_COOKIE, v);
            // A shared cache must not hand one client's session cookie to another.
            if !headers.contains_key(header::CACHE_CONTROL) {
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

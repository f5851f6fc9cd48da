//! The heads the native path writes: the request head a backend gets
//! ([`write_request`]), the response head a client gets ([`write_response`]) and the
//! responses Tether writes itself ([`write_refusal`]).
//!
//! A received head is never rebuilt into a map: its field lines are copied as byte ranges
//! of the receive buffer, in the order they came, minus the ones Tether removes, and
//! Tether's own fields follow them. The edits are those of today's path (`rewrite` and
//! `request::respond`), on bytes:
//!
//! - hop-by-hop fields go (`Connection` and every field it names, `Keep-Alive`,
//!   `Proxy-Connection`, `TE`, `Upgrade` unless the upgrade goes through, and the
//!   framing fields, which Tether writes anew);
//! - from a client that is not a trusted proxy, every forwarding field under any spelling
//!   a CGI-style backend reads as the same name (`X_Forwarded_For`, `x-real-ip`, ...);
//! - Tether's cookie and a client's own re-pin header;
//! - `Host`, `X-Forwarded-*`, the re-pin header and the framing are Tether's.
//!
//! Writers only append to `out`, a buffer the caller reuses: nothing else is allocated.

use crate::affinity::cookies::{find_cookie_bytes, segments};
use crate::h1::request::{Body, RequestHead, Target};
use crate::h1::response::{self, ResponseHead};
use crate::h1::{is_text, Field, Known};

// same list as rewrite::FORWARDING
/// Forwarding fields a backend may believe: from a client that is not a trusted proxy,
/// each is removed under any spelling (`_` for `-`, any case).
const FORWARDING: [&str; 5] = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip"];

/// What Tether changes in a request head on its way to a backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestEdits<'a> {
    /// The client's address as `X-Forwarded-For` carries it (IPv4-mapped IPv6 as IPv4).
    pub client_ip: &'a str,
    /// The client is a trusted proxy: its `X-Forwarded-For` is extended, its
    /// `X-Forwarded-Proto` and `X-Forwarded-Host` kept, its other forwarding fields kept.
    /// Anyone else's are removed under every spelling and replaced by Tether's.
    pub trusted: bool,
    /// The client reached Tether over TLS: Tether's `X-Forwarded-Proto` is `https`.
    pub tls: bool,
    /// `Host` for a request without one (HTTP/1.0): the backend's address, so that what a
    /// backend receives is valid HTTP/1.1.
    pub default_host: &'a str,
    /// The name of Tether's cookie, when the pool issues one: removed from `Cookie`.
    pub own_cookie: Option<&'a str>,
    /// The pool's re-pin header name, when it has affinity: a client's is removed under
    /// any spelling; Tether's is written when `repin` says why the session moved.
    pub repin_header: Option<&'a str>,
    /// The re-pin reason (`down`, `drained`, ...) to send in `repin_header`.
    pub repin: Option<&'a str>,
    /// The pool's allowed upgrade protocols, when the request is an upgrade that goes
    /// through (see [`wants_upgrade`]); `None` forwards it as a plain request, without
    /// its upgrade fields.
    pub upgrade: Option<&'a [String]>,
}

/// What Tether changes in a response head on its way to a client.
#[derive(Debug, Clone, Copy)]
pub struct ResponseEdits<'a> {
    /// Tether's `Set-Cookie` value (persistence), added after the backend's; the response
    /// is then kept out of shared caches (`Cache-Control` made `private`), as
    /// `rewrite::persist` does.
    pub set_cookie: Option<&'a str>,
    /// The client connection closes after this response: `Connection: close`.
    pub close: bool,
    /// A chunked body that the caller de-chunks for the client (an HTTP/1.0 client cannot
    /// read chunked): no `Transfer-Encoding`, and `Connection: close`, since the body is
    /// then delimited by closing the connection.
    pub dechunk: bool,
    /// The client's HTTP minor version. An HTTP/1.0 client (`0`) on a connection kept
    /// open gets `Connection: keep-alive` (it assumes close otherwise), and never
    /// `Transfer-Encoding`.
    pub client_minor: u8,
    /// A `Date` value to add when the backend sent none (RFC 9110 section 6.6.1, as hyper
    /// does today); `None` adds nothing.
    pub date: Option<&'a [u8]>,
    /// A `Strict-Transport-Security` value to add when the backend sent none.
    pub hsts: Option<&'a str>,
}

/// Whether a request asks to upgrade (`Connection: upgrade` on HTTP/1.1, and `Upgrade`)
/// to a protocol in `allowed` (`name` or `name/version`), as `rewrite::wants_upgrade`
/// decides. Any other upgrade request goes to the backend as a plain request.
pub fn wants_upgrade(buf: &[u8], head: &RequestHead, allowed: &[String]) -> bool {
    head.upgrade && upgrade_tokens(buf, head.fields.iter().as_slice()).any(|t| allows(allowed, t))
}

/// Appends the request head a backend gets for `head` (parsed from `buf`): the request
/// line in origin form and HTTP/1.1, `Host` first, the client's fields in order without
/// the ones Tether removes, then Tether's: `X-Forwarded-For`, `-Proto`, `-Host`, the
/// re-pin header, the upgrade fields and the framing.
pub fn write_request(out: &mut Vec<u8>, buf: &[u8], head: &RequestHead, edits: &RequestEdits<'_>) {
    // The request line.
    out.extend_from_slice(head.method_name.of(buf));
    out.push(b' ');
    match head.form {
        Target::Absolute { path, .. } => {
            let path = path.of(buf);
            if !path.starts_with(b"/") {
                out.push(b'/');
            }
            out.extend_from_slice(path);
        }
        Target::Origin | Target::Asterisk | Target::Authority => out.extend_from_slice(head.target.of(buf)),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");

    // Host first, as user agents send it (RFC 9112 section 3.2).
    let host = head.host.map(|h| h.of(buf));
    line(out, b"Host", host.unwrap_or(edits.default_host.as_bytes()));

    let fields = head.fields.iter().as_slice();
    let named = connection_names_fields(buf, fields);
    let kept = |f: &Field| request_keeps(buf, fields, f, edits, named);
    let own_cookie = edits.own_cookie.filter(|c| !c.is_empty());
    let trailer = head.body == Body::Chunked;
    for f in fields.iter().filter(|f| kept(f)) {
        match f.known {
            Known::XForwardedFor if edits.trusted => {} // joined into Tether's below
            Known::Trailer if !trailer => {}
            Known::Cookie if own_cookie.is_some() => {
                cookie_without(out, f.name.of(buf), f.value.of(buf), own_cookie.unwrap_or_default())
            }
            _ => line(out, f.name.of(buf), f.value.of(buf)),
        }
    }

    // X-Forwarded-For: a trusted proxy's list is extended; anyone else's was removed.
    out.extend_from_slice(b"X-Forwarded-For: ");
    if edits.trusted {
        let start = out.len();
        for f in fields.iter().filter(|f| f.known == Known::XForwardedFor) {
            if out.len() > start {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(f.value.of(buf));
        }
        if fields.iter().any(|f| f.known == Known::XForwardedFor) {
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(edits.client_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    let present = |known: Known| edits.trusted && fields.iter().any(|f| f.known == known && kept(f));
    if !present(Known::XForwardedProto) {
        out.extend_from_slice(if edits.tls { b"X-Forwarded-Proto: https\r\n" } else { b"X-Forwarded-Proto: http\r\n" });
    }
    if let Some(h) = host {
        if !present(Known::XForwardedHost) {
            line(out, b"X-Forwarded-Host", h);
        }
    }
    if let (Some(name), Some(reason)) = (edits.repin_header, edits.repin) {
        line(out, name.as_bytes(), reason.as_bytes());
    }
    if let Some(allowed) = edits.upgrade {
        if upgrade_tokens(buf, fields).any(|t| allows(allowed, t)) {
            out.extend_from_slice(b"Connection: upgrade\r\nUpgrade: ");
            let mut first = true;
            for t in upgrade_tokens(buf, fields).filter(|t| allows(allowed, t)) {
                if !first {
                    out.extend_from_slice(b", ");
                }
                first = false;
                out.extend_from_slice(t);
            }
            out.extend_from_slice(b"\r\n");
        }
    }
    match head.body {
        Body::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            put_u64(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Body::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        // An explicit `Content-Length: 0` stays, as it does today (hyper forwards it).
        Body::None if fields.iter().any(|f| f.known == Known::ContentLength) => {
            out.extend_from_slice(b"Content-Length: 0\r\n")
        }
        Body::None => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Whether a client's field survives to the backend (before Tether's changes to `Cookie`
/// and the joining of a trusted `X-Forwarded-For`). `named`: the head's `Connection` fields
/// may name fields to remove ([`connection_names_fields`]).
fn request_keeps(buf: &[u8], fields: &[Field], f: &Field, edits: &RequestEdits<'_>, named: bool) -> bool {
    // Host is written first. Trailer, hop-by-hop to `h1`, is kept here and written only
    // with a chunked body, whose trailers go as they came (today's path keeps it too).
    if f.known == Known::Host || (f.known.is_hop_by_hop() && f.known != Known::Trailer) {
        return false;
    }
    let name = f.name.of(buf);
    if !edits.trusted && FORWARDING.iter().any(|c| same_name(name, c)) {
        return false;
    }
    if edits.repin_header.is_some_and(|r| same_name(name, r)) {
        return false;
    }
    // A client may name hop-by-hop fields in Connection, but never X-Forwarded-For (nor
    // Host, written above), which Tether sets or relies on.
    !(named && f.known != Known::XForwardedFor && named_in_connection(buf, fields, name))
}

/// Whether the head's Connection fields may name a field to remove: they have an option
/// other than `close` and `upgrade` (Tether's to act on) and `keep-alive` (which names
/// only `Keep-Alive`, a field removed as hop-by-hop anyway). The usual `Connection:
/// keep-alive` names none, so the fields are not each looked up in it.
fn connection_names_fields(buf: &[u8], fields: &[Field]) -> bool {
    fields.iter().filter(|f| f.known == Known::Connection).flat_map(|f| list(f.value.of(buf))).any(|t| {
        !t.eq_ignore_ascii_case(b"close")
            && !t.eq_ignore_ascii_case(b"upgrade")
            && !t.eq_ignore_ascii_case(b"keep-alive")
    })
}

/// Whether `name` is one of the options of the head's Connection fields (`close` and
/// `upgrade` name no field: they are Tether's to act on).
fn named_in_connection(buf: &[u8], fields: &[Field], name: &[u8]) -> bool {
    fields
        .iter()
        .filter(|f| f.known == Known::Connection)
        .flat_map(|f| list(f.value.of(buf)))
        .filter(|t| !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"upgrade"))
        .any(|t| t.eq_ignore_ascii_case(name))
}

/// The tokens of the head's Upgrade fields. A value with bytes outside visible ASCII is
/// skipped whole, as today's path (`HeaderValue::to_str`) skips it.
fn upgrade_tokens<'b>(buf: &'b [u8], fields: &'b [Field]) -> impl Iterator<Item = &'b [u8]> + 'b {
    fields
        .iter()
        .filter(|f| f.known == Known::Upgrade)
        .map(move |f| f.value.of(buf))
        .filter(|v| is_text(v))
        .flat_map(list)
}

/// `token` (`name` or `name/version`) is allowed by an entry naming it exactly, or by an
/// entry naming its protocol without a version (as `rewrite::allows`).
fn allows(allowed: &[String], token: &[u8]) -> bool {
    let name = token.split(|b| *b == b'/').next().unwrap_or(token);
    allowed.iter().any(|a| {
        let a = a.as_bytes();
        a.eq_ignore_ascii_case(token) || (!a.contains(&b'/') && a.eq_ignore_ascii_case(name))
    })
}

/// Writes a `Cookie` field without cookie `own`: unchanged when it does not carry it,
/// else its other pairs joined by `"; "`, or nothing when none is left (as
/// `cookies::strip_cookie` does). A value that is not visible ASCII is left whole, as
/// today's path leaves it.
fn cookie_without(out: &mut Vec<u8>, name: &[u8], value: &[u8], own: &str) {
    let own = own.as_bytes();
    if !is_text(value) || find_cookie_bytes(value, own).is_none() {
        line(out, name, value);
        return;
    }
    // One pass: the other cookies are written as they are found; a field left empty is
    // taken back whole.
    let start = out.len();
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    let first = out.len();
    for segment in segments(value).map(trim_ows) {
        if segment.is_empty() || cookie_name(segment) == Some(own) {
            continue;
        }
        if out.len() > first {
            out.extend_from_slice(b"; ");
        }
        out.extend_from_slice(segment);
    }
    if out.len() == first {
        out.truncate(start);
    } else {
        out.extend_from_slice(b"\r\n");
    }
}

/// The trimmed name of a `name=value` cookie segment; `None` without `=`.
fn cookie_name(segment: &[u8]) -> Option<&[u8]> {
    let eq = segment.iter().position(|b| *b == b'=')?;
    Some(trim_ows(&segment[..eq]))
}

/// Appends the response head a client gets for `head` (parsed from `buf`): the status
/// line in HTTP/1.1, the backend's fields in order without hop-by-hop ones, then
/// Tether's: its `Set-Cookie` (and `Cache-Control: private` when the backend had none),
/// `Date` when missing, `Connection`, and the framing.
///
/// Framing for the client:
/// - no body (HEAD, 1xx, 204, 304): none written; a response to HEAD keeps the
///   backend's `Content-Length` (unless `Transfer-Encoding` was there), as hyper does;
/// - `Length(n)`: `Content-Length: n`;
/// - `Chunked`: `Transfer-Encoding` with the backend's codings (ending in `chunked`),
///   the bytes forwarded as received; with `edits.dechunk`, none and `Connection: close`;
/// - `UntilClose`: `Connection: close`, and the backend's codings (none of them a final
///   `chunked`) in `Transfer-Encoding` for an HTTP/1.1 client.
pub fn write_response(out: &mut Vec<u8>, buf: &[u8], head: &ResponseHead, edits: &ResponseEdits<'_>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    put_u64(out, u64::from(head.status));
    out.push(b' ');
    out.extend_from_slice(head.reason.of(buf));
    out.extend_from_slice(b"\r\n");

    let fields = head.fields.iter().as_slice();
    let http10 = edits.client_minor == 0;
    let switching = head.status == 101;
    let interim = (100..200).contains(&head.status) && !switching;
    let has_te = fields.iter().any(|f| f.known == Known::TransferEncoding);
    // A response to HEAD says how long the body would have been.
    let keep_length = head.body == response::Body::None
        && !has_te
        && !head.drop_length
        && !(100..200).contains(&head.status)
        && head.status != 204
        && head.status != 304;
    let chunked_out = head.body == response::Body::Chunked && !edits.dechunk && !http10;
    debug_assert!(
        !(http10 && head.body == response::Body::Chunked && !edits.dechunk),
        "a chunked body to an HTTP/1.0 client must be de-chunked"
    );
    let named = connection_names_fields(buf, fields);
    // Tether's cookie makes the response private to shared caches.
    let private = edits.set_cookie.is_some();
    let cache_control = |f: &&Field| f.known == Known::Other && f.name.of(buf).eq_ignore_ascii_case(b"cache-control");
    let rewrite_cache = private && !fields.iter().filter(cache_control).any(|f| leaves_private(f.value.of(buf)));
    let mut cache_written = false;
    let mut has_date = false;
    let mut has_hsts = false;
    for f in fields {
        let name = f.name.of(buf);
        let keep = match f.known {
            Known::Upgrade => switching,
            Known::ContentLength => keep_length,
            Known::Trailer => chunked_out,
            k if k.is_hop_by_hop() => false,
            _ => !(named && f.known != Known::XForwardedFor && named_in_connection(buf, fields, name)),
        };
        if !keep {
            continue;
        }
        if rewrite_cache && cache_control(&f) {
            if !cache_written {
                cache_written = true;
                write_private_cache_control(out, buf, fields, name);
            }
            continue;
        }
        // Only looked for when there is something to add.
        has_date |= edits.date.is_some() && f.known == Known::Other && name.eq_ignore_ascii_case(b"date");
        has_hsts |=
            edits.hsts.is_some() && f.known == Known::Other && name.eq_ignore_ascii_case(b"strict-transport-security");
        line(out, name, f.value.of(buf));
    }

    if let Some(cookie) = edits.set_cookie {
        line(out, b"Set-Cookie", cookie.as_bytes());
        if !fields.iter().any(|f| cache_control(&f)) {
            out.extend_from_slice(b"Cache-Control: private\r\n");
        }
    }
    if let (false, Some(date)) = (has_date || interim, edits.date) {
        line(out, b"Date", date);
    }
    if let (false, Some(hsts)) = (has_hsts || interim, edits.hsts) {
        line(out, b"Strict-Transport-Security", hsts.as_bytes());
    }
    let close_delimited =
        head.body == response::Body::UntilClose || (head.body == response::Body::Chunked && !chunked_out);
    if switching {
        out.extend_from_slice(b"Connection: upgrade\r\n");
    } else if interim {
    } else if edits.close || close_delimited {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    match head.body {
        _ if switching => {}
        response::Body::None => {}
        response::Body::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            put_u64(out, n);
            out.extend_from_slice(b"\r\n");
        }
        response::Body::Chunked if chunked_out => write_codings(out, buf, fields),
        response::Body::Chunked => {}
        response::Body::UntilClose => {
            // Codings whose last is a (misplaced) `chunked` would have the client decode a
            // chunked body that is not one: such a body goes as it came, unlabelled.
            let last_chunked = codings(buf, fields).last().is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
            if !http10 && has_te && !last_chunked {
                write_codings(out, buf, fields);
            }
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// The transfer codings of the head's Transfer-Encoding fields, in order.
fn codings<'b>(buf: &'b [u8], fields: &'b [Field]) -> impl Iterator<Item = &'b [u8]> + 'b {
    fields.iter().filter(|f| f.known == Known::TransferEncoding).flat_map(move |f| list(f.value.of(buf)))
}

/// `Transfer-Encoding` with the backend's codings as one list.
fn write_codings(out: &mut Vec<u8>, buf: &[u8], fields: &[Field]) {
    out.extend_from_slice(b"Transfer-Encoding: ");
    for (i, c) in codings(buf, fields).enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(c);
    }
    out.extend_from_slice(b"\r\n");
}

/// A `Cache-Control` value that already keeps the response out of shared caches: one of
/// its directives is exactly `private` or `no-store` (a qualified `private="x"` is not).
fn leaves_private(value: &[u8]) -> bool {
    is_text(value)
        && cache_directives(value).any(|d| d.eq_ignore_ascii_case(b"private") || d.eq_ignore_ascii_case(b"no-store"))
}

/// One `Cache-Control` field in place of all of them: `private`, then every directive but
/// `public`, `s-maxage` and `private` (as `rewrite::private_to_shared_caches`).
fn write_private_cache_control(out: &mut Vec<u8>, buf: &[u8], fields: &[Field], name: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": private");
    let values = fields
        .iter()
        .filter(|f| f.known == Known::Other && f.name.of(buf).eq_ignore_ascii_case(b"cache-control"))
        .map(|f| f.value.of(buf))
        .filter(|v| is_text(v));
    for d in values.flat_map(cache_directives) {
        let dname = trim_ows(d.split(|b| *b == b'=').next().unwrap_or_default());
        let drop = [&b"public"[..], b"s-maxage", b"private"].iter().any(|n| dname.eq_ignore_ascii_case(n));
        if !drop {
            out.extend_from_slice(b", ");
            out.extend_from_slice(d);
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// The directives of one `Cache-Control` value, trimmed, empty ones skipped; a comma
/// inside a quoted string does not split.
fn cache_directives(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut quoted = false;
    v.split(move |b| {
        if *b == b'"' {
            quoted = !quoted;
        }
        *b == b',' && !quoted
    })
    .map(trim_ows)
    .filter(|d| !d.is_empty())
}

/// Appends a response Tether writes itself, as `request::reply` makes it: plain text
/// `"{status} {reason}: {message}\n"`, marked with `Tether-Error: {label}`, never cached,
/// with `Location` when it redirects, and with `Connection: close` when `close`.
pub fn write_refusal(
    out: &mut Vec<u8>,
    status: u16,
    reason: &str,
    label: &str,
    message: &str,
    location: Option<&str>,
    close: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    put_u64(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: text/plain; charset=utf-8\r\nCache-Control: no-store\r\nTether-Error: ");
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(l) = location {
        line(out, b"Location", l.as_bytes());
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"Content-Length: ");
    put_u64(out, (decimal_len(u64::from(status)) + 1 + reason.len() + 2 + message.len() + 1) as u64);
    out.extend_from_slice(b"\r\n\r\n");
    put_u64(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(message.as_bytes());
    out.push(b'\n');
}

/// `name: value` and CRLF.
pub(crate) fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal, without formatting machinery.
pub(crate) fn put_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// How many decimal digits `n` has.
fn decimal_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

/// Whether header name `name` is `canonical` when `_` is read as `-` and case is
/// ignored, as CGI-style backends read names (as `rewrite::same_name`).
fn same_name(name: &[u8], canonical: &str) -> bool {
    let fold = |b: u8| if b == b'_' { b'-' } else { b.to_ascii_lowercase() };
    name.len() == canonical.len() && name.iter().zip(canonical.bytes()).all(|(a, b)| fold(*a) == fold(b))
}

fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| *b != b' ' && *b != b'\t').unwrap_or(s.len());
    let end = s.iter().rposition(|b| *b != b' ' && *b != b'\t').map_or(start, |e| e + 1);
    &s[start..end]
}

/// The elements of a comma-separated list, trimmed, empty ones skipped.
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b',').map(trim_ows).filter(|e| !e.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::affinity::verdict::{Reason, Verdict};
    use crate::affinity::{Decision, PoolAffinity};
    use crate::h1::request::{self, Limits};
    use crate::proxy::rewrite;
    use http::header::{HeaderMap, HeaderName, HeaderValue};

    const IP: &str = "10.0.0.9";

    fn edits() -> RequestEdits<'static> {
        RequestEdits {
            client_ip: IP,
            trusted: false,
            tls: false,
            default_host: "10.1.1.1:8080",
            own_cookie: Some("tether"),
            repin_header: Some("tether-session-repinned"),
            repin: None,
            upgrade: None,
        }
    }

    fn parsed(text: &[u8]) -> RequestHead {
        match request::parse(text, &Limits::default()) {
            Ok(Some(h)) => h,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(text)),
        }
    }

    /// The head written for `text`, re-parsed: its request line and its fields.
    fn written(text: &str, e: &RequestEdits<'_>) -> (String, Vec<(String, String)>, RequestHead) {
        let head = parsed(text.as_bytes());
        let mut out = b"leftover".to_vec();
        write_request(&mut out, text.as_bytes(), &head, e);
        assert!(out.starts_with(b"leftover"), "appends only");
        let out = &out[b"leftover".len()..];
        let again = parsed(out);
        assert_eq!(again.len, out.len(), "one whole head");
        let line_end = out.windows(2).position(|w| w == b"\r\n").unwrap();
        let request_line = String::from_utf8(out[..line_end].to_vec()).unwrap();
        (request_line, pairs(out, again.fields.iter()), again)
    }

    fn pairs<'f>(buf: &[u8], fields: impl Iterator<Item = &'f Field>) -> Vec<(String, String)> {
        let text = |s: &[u8]| String::from_utf8_lossy(s).into_owned();
        fields.map(|f| (text(f.name.of(buf)), text(f.value.of(buf)))).collect()
    }

    fn names(fields: &[(String, String)]) -> Vec<&str> {
        fields.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn get<'f>(fields: &'f [(String, String)], name: &str) -> Vec<&'f str> {
        fields.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    #[test]
    fn a_plain_request_keeps_its_fields_in_order() {
        let text =
            "GET /a?b=1 HTTP/1.1\r\nHost: shop.example\r\nAccept: */*\r\nX-App: 1\r\nExpect: 100-continue\r\n\r\n";
        let (line, f, head) = written(text, &edits());
        assert_eq!(line, "GET /a?b=1 HTTP/1.1");
        assert_eq!(
            f,
            [
                ("Host", "shop.example"),
                ("Accept", "*/*"),
                ("X-App", "1"),
                ("Expect", "100-continue"),
                ("X-Forwarded-For", IP),
                ("X-Forwarded-Proto", "http"),
                ("X-Forwarded-Host", "shop.example"),
            ]
            .map(|(n, v)| (n.to_string(), v.to_string()))
        );
        assert_eq!(head.body, Body::None);
    }

    #[test]
    fn an_untrusted_client_chooses_no_forwarding_field() {
        let text = "GET / HTTP/1.1\r\nX-Forwarded-For: 6.6.6.6\r\nHost: shop\r\nx_forwarded_for: 6.6.6.7\r\n\
                    Forwarded: for=6.6.6.8\r\nX-Real-IP: 6.6.6.9\r\nX_Real_Ip: 6.6.6.10\r\nX-Forwarded-Proto: https\r\n\
                    X-FORWARDED-HOST: evil\r\nx_forwarded_proto: https\r\nX-Forwarded-Fo: kept\r\n\r\n";
        let (_, f, _) = written(text, &edits());
        assert_eq!(names(&f), ["Host", "X-Forwarded-Fo", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"]);
        assert_eq!(get(&f, "x-forwarded-for"), [IP]);
        assert_eq!(get(&f, "x-forwarded-proto"), ["http"]);
        assert_eq!(get(&f, "x-forwarded-host"), ["shop"]);
    }

    #[test]
    fn a_trusted_proxy_is_extended() {
        let text = "GET / HTTP/1.1\r\nHost: shop\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: https\r\n\
                    x-forwarded-for: 2.2.2.2, 3.3.3.3\r\nX-Forwarded-Host: front.example\r\nX_Real_IP: 1.1.1.1\r\n\r\n";
        let e = RequestEdits { trusted: true, ..edits() };
        let (_, f, _) = written(text, &e);
        assert_eq!(names(&f), ["Host", "X-Forwarded-Proto", "X-Forwarded-Host", "X_Real_IP", "X-Forwarded-For"]);
        assert_eq!(get(&f, "x-forwarded-for"), ["1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9"]);
        assert_eq!(get(&f, "x-forwarded-proto"), ["https"]);
        assert_eq!(get(&f, "x-forwarded-host"), ["front.example"]);
        // Without forwarding fields of its own, a trusted proxy gets Tether's.
        let (_, f, _) = written("GET / HTTP/1.1\r\nHost: shop\r\n\r\n", &e);
        assert_eq!(get(&f, "x-forwarded-for"), [IP]);
        assert_eq!(get(&f, "x-forwarded-proto"), ["http"]);
        assert_eq!(get(&f, "x-forwarded-host"), ["shop"]);
    }

    #[test]
    fn tethers_cookie_never_reaches_the_backend() {
        let cookie_after = |cookies: &[&str]| {
            let lines: String = cookies.iter().map(|c| format!("Cookie: {c}\r\n")).collect();
            let text = format!("GET / HTTP/1.1\r\nHost: a\r\n{lines}X-After: 1\r\n\r\n");
            let (_, f, _) = written(&text, &edits());
            assert_eq!(names(&f).last(), Some(&"X-Forwarded-Host"));
            get(&f, "cookie").iter().map(|s| s.to_string()).collect::<Vec<_>>()
        };
        assert_eq!(cookie_after(&["tether=abc; a=1; b=2"]), ["a=1; b=2"]);
        assert_eq!(cookie_after(&["a=1; tether=abc; b=2"]), ["a=1; b=2"]);
        assert_eq!(cookie_after(&["a=1;b=2 ; tether=\"abc\""]), ["a=1; b=2"]);
        assert!(cookie_after(&["tether=abc"]).is_empty());
        assert!(cookie_after(&[" tether = abc ; ;"]).is_empty());
        assert_eq!(cookie_after(&["tether=abc", "a=1"]), ["a=1"]);
        // Untouched (not even re-spaced) when Tether's cookie is not in the line.
        assert_eq!(cookie_after(&["a=1;b=2", "tether=x; c=3"]), ["a=1;b=2", "c=3"]);
        assert_eq!(cookie_after(&["tethers=1; xtether=2"]), ["tethers=1; xtether=2"]);
        assert_eq!(cookie_after(&["Tether=1"]), ["Tether=1"]);
        // Without a cookie of Tether's, Cookie goes as it came.
        let text = "GET / HTTP/1.1\r\nHost: a\r\nCookie: tether=abc\r\n\r\n";
        let (_, f, _) = written(text, &RequestEdits { own_cookie: None, ..edits() });
        assert_eq!(get(&f, "cookie"), ["tether=abc"]);
    }

    #[test]
    fn the_repin_header_is_tethers_alone() {
        let text = "GET / HTTP/1.1\r\nHost: a\r\nTether-Session-Repinned: forged\r\ntether_session_repinned: x\r\n\r\n";
        let (_, f, _) = written(text, &edits());
        assert!(get(&f, "tether-session-repinned").is_empty());
        let (_, f, _) = written(text, &RequestEdits { repin: Some("down"), ..edits() });
        assert_eq!(get(&f, "tether-session-repinned"), ["down"]);
        assert_eq!(names(&f).last(), Some(&"tether-session-repinned"));
        // Without affinity, nothing is Tether's to remove.
        let (_, f, _) = written(text, &RequestEdits { repin_header: None, ..edits() });
        assert_eq!(get(&f, "tether-session-repinned"), ["forged"]);
    }

    #[test]
    fn hop_by_hop_fields_go() {
        let text = "POST / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret, close, host, x-forwarded-for\r\n\
                    X-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n\
                    Upgrade: websocket\r\nConnection: x-other\r\nX-Other: 2\r\nX-Kept: yes\r\nTrailer: X-Sum\r\n\
                    Content-Length: 3\r\n\r\n";
        let (_, f, head) = written(text, &RequestEdits { trusted: true, ..edits() });
        assert_eq!(
            names(&f),
            ["Host", "X-Kept", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Content-Length"]
        );
        assert_eq!(head.body, Body::Length(3));
        assert!(head.keep_alive, "the client's close is not the backend connection's");
        // A trusted proxy's X-Forwarded-For cannot be named away.
        let text = "GET / HTTP/1.1\r\nHost: a\r\nConnection: X-Forwarded-For, X-Forwarded-Proto\r\n\
                    X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: https\r\n\r\n";
        let (_, f, _) = written(text, &RequestEdits { trusted: true, ..edits() });
        assert_eq!(get(&f, "x-forwarded-for"), ["1.1.1.1, 10.0.0.9"]);
        assert_eq!(get(&f, "x-forwarded-proto"), ["http"]);
        // Trailer stays with a chunked body, whose trailers go as they came.
        let text = "POST / HTTP/1.1\r\nHost: a\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (_, f, _) = written(text, &edits());
        assert_eq!(get(&f, "trailer"), ["X-Sum"]);
    }

    #[test]
    fn targets_become_origin_form() {
        let line = |target: &str| written(&format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n"), &edits()).0;
        assert_eq!(line("http://Example.com:81/p?q"), "GET /p?q HTTP/1.1");
        assert_eq!(line("http://h"), "GET / HTTP/1.1");
        assert_eq!(line("https://h?q=1"), "GET /?q=1 HTTP/1.1");
        assert_eq!(line("/a%20b?c"), "GET /a%20b?c HTTP/1.1");
        let (_, f, _) = written("GET http://Example.com:81/p HTTP/1.1\r\nHost: other\r\n\r\n", &edits());
        assert_eq!(get(&f, "host"), ["Example.com:81"]);
        assert_eq!(get(&f, "x-forwarded-host"), ["Example.com:81"]);
        let (line, _, _) = written("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", &edits());
        assert_eq!(line, "OPTIONS * HTTP/1.1");
    }

    #[test]
    fn http10_without_host_gets_the_backends_address() {
        let (line, f, _) = written("GET /x HTTP/1.0\r\nConnection: keep-alive\r\nX-A: 1\r\n\r\n", &edits());
        assert_eq!(line, "GET /x HTTP/1.1");
        assert_eq!(names(&f), ["Host", "X-A", "X-Forwarded-For", "X-Forwarded-Proto"]);
        assert_eq!(get(&f, "host"), ["10.1.1.1:8080"]);
        let (_, f, _) = written("GET /x HTTP/1.0\r\nHost: shop\r\n\r\n", &edits());
        assert_eq!(get(&f, "host"), ["shop"]);
        assert_eq!(get(&f, "x-forwarded-host"), ["shop"]);
    }

    #[test]
    fn upgrades_only_to_allowed_protocols() {
        let allowed = ["websocket".to_string()];
        let text = "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: h2c, WebSocket\r\n\
                    Sec-WebSocket-Key: k\r\n\r\n";
        let head = parsed(text.as_bytes());
        assert!(wants_upgrade(text.as_bytes(), &head, &allowed));
        assert!(!wants_upgrade(text.as_bytes(), &head, &["h3".to_string()]));
        let (_, f, again) = written(text, &RequestEdits { upgrade: Some(&allowed), ..edits() });
        assert_eq!(get(&f, "connection"), ["upgrade"]);
        assert_eq!(get(&f, "upgrade"), ["WebSocket"]);
        assert!(again.upgrade);
        assert_eq!(get(&f, "sec-websocket-key"), ["k"]);
        // Not allowed, or not asked for with Connection: a plain request.
        let (_, f, again) = written(text, &edits());
        assert!(get(&f, "connection").is_empty() && get(&f, "upgrade").is_empty() && !again.upgrade);
        let plain = "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n";
        assert!(!wants_upgrade(plain.as_bytes(), &parsed(plain.as_bytes()), &allowed));
        let ten = "GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
        assert!(!wants_upgrade(ten.as_bytes(), &parsed(ten.as_bytes()), &allowed));
        // A versioned entry allows that version only; a bare one every version.
        let v = "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: proto/2\r\n\r\n";
        let head = parsed(v.as_bytes());
        assert!(wants_upgrade(v.as_bytes(), &head, &["proto".to_string()]));
        assert!(wants_upgrade(v.as_bytes(), &head, &["PROTO/2".to_string()]));
        assert!(!wants_upgrade(v.as_bytes(), &head, &["proto/1".to_string()]));
    }

    #[test]
    fn framing_is_tethers() {
        let body = |text: &str| {
            let (_, f, again) = written(text, &edits());
            (get(&f, "content-length").join("|"), get(&f, "transfer-encoding").join("|"), again.body)
        };
        let cl = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n";
        assert_eq!(body(cl), ("5".into(), "".into(), Body::Length(5)));
        let te = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n";
        assert_eq!(body(te), ("".into(), "chunked".into(), Body::Chunked));
        let zero = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(body(zero), ("0".into(), "".into(), Body::None));
        let none = "POST / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(body(none), ("".into(), "".into(), Body::None));
        let big = "PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551\r\n\r\n";
        assert_eq!(body(big).0, "18446744073709551");
    }

    // === today's path, for comparison ===

    /// Lower-case name and value pairs, sorted: a multiset of field lines.
    fn multiset(fields: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
        let mut v: Vec<_> = fields.into_iter().map(|(n, v)| (n.to_ascii_lowercase(), v)).collect();
        v.sort();
        v
    }

    fn map_of(buf: &[u8], fields: &[Field]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for f in fields {
            let name = HeaderName::from_bytes(f.name.of(buf)).unwrap();
            h.append(name, HeaderValue::from_bytes(f.value.of(buf)).unwrap());
        }
        h
    }

    fn map_pairs(h: &HeaderMap) -> Vec<(String, String)> {
        h.iter().map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect()
    }

    /// What today's path sends a backend for `text`. `rewrite::request` needs a live
    /// `Request<Incoming>` and `ConnCx`, so its steps are done here as it does them (the
    /// hop-by-hop, upgrade and affinity steps are today's functions themselves), and
    /// hyper's client framing as `set_length` does it: the client's `Content-Length`
    /// kept, `Transfer-Encoding: chunked` for a chunked body.
    fn today_request(text: &str, trusted: bool, allowed: &[String], a: &PoolAffinity, verdict: Verdict) -> HeaderMap {
        let buf = text.as_bytes();
        let head = parsed(buf);
        let fields = head.fields.iter().as_slice();
        let mut h = map_of(buf, fields);
        let upgrade = wants_upgrade(buf, &head, allowed);
        let host = head.host.map(|s| HeaderValue::from_bytes(s.of(buf)).unwrap());
        rewrite::strip_hop_by_hop(&mut h, upgrade);
        if !trusted {
            let drop: Vec<HeaderName> =
                h.keys().filter(|n| FORWARDING.iter().any(|f| same_name(n.as_str().as_bytes(), f))).cloned().collect();
            for n in drop {
                h.remove(n);
            }
        }
        let xff = if trusted && h.contains_key("x-forwarded-for") {
            let mut joined = Vec::new();
            for v in h.get_all("x-forwarded-for") {
                if !joined.is_empty() {
                    joined.extend_from_slice(b", ");
                }
                joined.extend_from_slice(v.as_bytes());
            }
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(IP.as_bytes());
            HeaderValue::from_bytes(&joined).unwrap()
        } else {
            HeaderValue::from_static(IP)
        };
        h.insert("x-forwarded-for", xff);
        if !(trusted && h.contains_key("x-forwarded-proto")) {
            h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        }
        if let Some(host) = &host {
            if !(trusted && h.contains_key("x-forwarded-host")) {
                h.insert("x-forwarded-host", host.clone());
            }
        }
        match host {
            Some(host) => h.insert(http::header::HOST, host),
            // `send` gives a request without Host the backend's address.
            None => h.insert(http::header::HOST, HeaderValue::from_static("10.1.1.1:8080")),
        };
        if upgrade {
            rewrite::keep_allowed_upgrades(&mut h, allowed);
        }
        rewrite::for_affinity(&mut h, a, verdict);
        if head.body == Body::Chunked {
            h.insert(http::header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
        h
    }

    #[test]
    fn requests_match_todays_path() {
        let a = PoolAffinity::build("web", &[("app-1", 1)], &crate::config::Affinity::default(), None);
        let own = a.cookie_name().unwrap().to_string();
        let allowed = ["websocket".to_string()];
        let heads = [
            "GET /a HTTP/1.1\r\nHost: shop\r\nAccept: */*\r\n\r\n".to_string(),
            format!("GET / HTTP/1.1\r\nHost: shop\r\nCookie: {own}=abc; a=1\r\nCookie: b=2; {own}=x\r\n\r\n"),
            format!("GET / HTTP/1.1\r\nHost: shop\r\nCookie: {own}=abc\r\nCookie: c=1;d=2\r\n\r\n"),
            "GET / HTTP/1.1\r\nHost: shop\r\nX-Forwarded-For: 1.1.1.1\r\nx-forwarded-for: 2.2.2.2\r\n\
             X_Forwarded_For: 3\r\nForwarded: for=x\r\nX-Real-IP: 4\r\nX-Forwarded-Proto: https\r\n\
             X-Forwarded-Host: front\r\nx_forwarded_host: f\r\n\r\n"
                .to_string(),
            "POST /p HTTP/1.1\r\nHost: shop\r\nConnection: close, X-A, keep-alive\r\nX-A: 1\r\nX-B: 2\r\n\
             Keep-Alive: 5\r\nTE: trailers\r\nProxy-Connection: x\r\nContent-Length: 7\r\n\r\n"
                .to_string(),
            "POST /p HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: chunked\r\nX-B: 2\r\n\r\n".to_string(),
            "POST /p HTTP/1.1\r\nHost: shop\r\nContent-Length: 0\r\n\r\n".to_string(),
            "GET http://Shop.example:81/q?x HTTP/1.1\r\nHost: other\r\n\r\n".to_string(),
            "GET /old HTTP/1.0\r\nUser-Agent: old\r\n\r\n".to_string(),
            "GET /ws HTTP/1.1\r\nHost: shop\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n"
                .to_string(),
            "GET /ws HTTP/1.1\r\nHost: shop\r\nConnection: Upgrade\r\nUpgrade: h2c, websocket/13\r\n\r\n".to_string(),
            "GET /ws HTTP/1.1\r\nHost: shop\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n".to_string(),
            "GET / HTTP/1.1\r\nHost: shop\r\ntether-session-repinned: forged\r\nTether_Session_Repinned: f\r\n\r\n"
                .to_string(),
            "GET / HTTP/1.1\r\nHost: shop\r\nConnection: X-Forwarded-For, X-Forwarded-Proto, Host\r\n\
             X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: https\r\n\r\n"
                .to_string(),
        ];
        let verdicts = [Verdict::Hit, Verdict::Repin(Reason::Down)];
        for text in &heads {
            for trusted in [false, true] {
                for verdict in verdicts {
                    let head = parsed(text.as_bytes());
                    let upgrade = wants_upgrade(text.as_bytes(), &head, &allowed);
                    let e = RequestEdits {
                        client_ip: IP,
                        trusted,
                        tls: false,
                        default_host: "10.1.1.1:8080",
                        own_cookie: Some(&own),
                        repin_header: Some(&a.cfg.repin_header),
                        repin: verdict.reason(),
                        upgrade: upgrade.then_some(&allowed[..]),
                    };
                    let (_, native, _) = written(text, &e);
                    let today = today_request(text, trusted, &allowed, &a, verdict);
                    assert_eq!(
                        multiset(native),
                        multiset(map_pairs(&today)),
                        "{text:?}, trusted {trusted}, {verdict:?}"
                    );
                }
            }
        }
    }

    // === responses ===

    fn response(text: &str, is_head: bool) -> ResponseHead {
        response::parse(text.as_bytes(), 64 * 1024, is_head).unwrap().unwrap()
    }

    fn res_edits() -> ResponseEdits<'static> {
        ResponseEdits { set_cookie: None, close: false, dechunk: false, client_minor: 1, date: None, hsts: None }
    }

    /// The head written for a backend's `text`, re-parsed as the client would parse it.
    fn res_written(text: &str, is_head: bool, e: &ResponseEdits<'_>) -> (String, Vec<(String, String)>, ResponseHead) {
        let head = response(text, is_head);
        let mut out = Vec::new();
        write_response(&mut out, text.as_bytes(), &head, e);
        let again = response::parse(&out, 64 * 1024, is_head).unwrap().unwrap();
        assert_eq!(again.len, out.len(), "one whole head");
        let line_end = out.windows(2).position(|w| w == b"\r\n").unwrap();
        let status_line = String::from_utf8(out[..line_end].to_vec()).unwrap();
        (status_line, pairs(&out, again.fields.iter()), again)
    }

    #[test]
    fn response_framing() {
        let e = res_edits();
        // Length.
        let (line, f, again) = res_written("HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 5\r\n\r\n", false, &e);
        assert_eq!(line, "HTTP/1.1 200 OK");
        assert_eq!(names(&f), ["X-A", "Content-Length"]);
        assert_eq!((again.body, again.keep_alive), (response::Body::Length(5), true));
        // Transfer-Encoding and Content-Length: framed by the former, the latter dropped.
        let (_, f, again) = res_written(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n",
            false,
            &e,
        );
        assert_eq!(names(&f), ["Trailer", "Transfer-Encoding"]);
        assert_eq!(get(&f, "transfer-encoding"), ["chunked"]);
        assert_eq!(again.body, response::Body::Chunked);
        // Other codings before the final chunked are passed on.
        let (_, f, again) =
            res_written("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", false, &e);
        assert_eq!(get(&f, "transfer-encoding"), ["gzip, chunked"]);
        assert_eq!(again.body, response::Body::Chunked);
        // Codings without a final chunked: delimited by the close, labelled as they came.
        let (_, f, again) =
            res_written("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 9\r\n\r\n", false, &e);
        assert_eq!(get(&f, "transfer-encoding"), ["gzip"]);
        assert_eq!(get(&f, "connection"), ["close"]);
        assert!(get(&f, "content-length").is_empty());
        assert_eq!((again.body, again.keep_alive), (response::Body::UntilClose, false));
        // `chunked` misplaced: delimited by the close, and not labelled chunked.
        let (_, f, again) = res_written("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", false, &e);
        assert!(get(&f, "transfer-encoding").is_empty());
        assert_eq!(again.body, response::Body::UntilClose);
        // Neither: delimited by the close.
        let (_, f, again) = res_written("HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n", false, &e);
        assert_eq!(names(&f), ["X-A", "Connection"]);
        assert_eq!(again.body, response::Body::UntilClose);
    }

    #[test]
    fn responses_without_a_body() {
        let e = res_edits();
        // A response to HEAD says how long the body would have been.
        let (_, f, again) = res_written("HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n", true, &e);
        assert_eq!(get(&f, "content-length"), ["42"]);
        assert_eq!(again.body, response::Body::None);
        let (_, f, _) =
            res_written("HTTP/1.1 200 OK\r\nContent-Length: 42\r\nTransfer-Encoding: chunked\r\n\r\n", true, &e);
        assert!(get(&f, "content-length").is_empty() && get(&f, "transfer-encoding").is_empty());
        // 304 and 204: no framing at all (as hyper sends them).
        let (line, f, _) =
            res_written("HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 42\r\n\r\n", false, &e);
        assert_eq!(line, "HTTP/1.1 304 Not Modified");
        assert_eq!(names(&f), ["ETag"]);
        let (_, f, _) = res_written("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", false, &e);
        assert!(f.is_empty());
    }

    #[test]
    fn connection_and_hop_by_hop() {
        let text = "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
                    Upgrade: h2c\r\nProxy-Connection: x\r\nX-Kept: 2\r\nContent-Length: 0\r\n\r\n";
        let (_, f, again) = res_written(text, false, &res_edits());
        assert_eq!(names(&f), ["X-Kept", "Content-Length"]);
        assert!(again.keep_alive);
        let (_, f, again) = res_written(text, false, &ResponseEdits { close: true, ..res_edits() });
        assert_eq!(names(&f), ["X-Kept", "Connection", "Content-Length"]);
        assert_eq!(get(&f, "connection"), ["close"]);
        assert!(!again.keep_alive);
        // An HTTP/1.0 client kept open is told so.
        let (_, f, _) = res_written(text, false, &ResponseEdits { client_minor: 0, ..res_edits() });
        assert_eq!(get(&f, "connection"), ["keep-alive"]);
    }

    #[test]
    fn an_http10_client_never_gets_chunked() {
        let text = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n";
        let e = ResponseEdits { client_minor: 0, dechunk: true, ..res_edits() };
        let (line, f, again) = res_written(text, false, &e);
        assert_eq!(line, "HTTP/1.1 200 OK");
        assert_eq!(names(&f), ["Connection"]);
        assert_eq!(get(&f, "connection"), ["close"]);
        assert_eq!(again.body, response::Body::UntilClose);
        // Nor Transfer-Encoding at all.
        let (_, f, _) = res_written("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false, &e);
        assert_eq!(names(&f), ["Connection"]);
        // An HTTP/1.1 client may ask for a de-chunked body too.
        let (_, f, _) = res_written(text, false, &ResponseEdits { dechunk: true, ..res_edits() });
        assert_eq!(names(&f), ["Connection"]);
    }

    #[test]
    fn switching_protocols() {
        let text = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                    Sec-WebSocket-Accept: x\r\n\r\n";
        let (line, f, again) = res_written(text, false, &res_edits());
        assert_eq!(line, "HTTP/1.1 101 Switching Protocols");
        assert_eq!(names(&f), ["Upgrade", "Sec-WebSocket-Accept", "Connection"]);
        assert_eq!(get(&f, "connection"), ["upgrade"]);
        assert_eq!(again.body, response::Body::None);
    }

    #[test]
    fn set_cookie_makes_the_response_private() {
        let cookie = "tether=tok; Path=/; HttpOnly; SameSite=Lax";
        let e = ResponseEdits { set_cookie: Some(cookie), ..res_edits() };
        let cache = |lines: &str| {
            let text = format!("HTTP/1.1 200 OK\r\nSet-Cookie: app=1\r\n{lines}Content-Length: 0\r\n\r\n");
            let (_, f, _) = res_written(&text, false, &e);
            assert_eq!(get(&f, "set-cookie"), ["app=1", cookie]);
            get(&f, "cache-control").join(" | ")
        };
        assert_eq!(cache(""), "private");
        assert_eq!(cache("Cache-Control: public, max-age=600\r\n"), "private, max-age=600");
        assert_eq!(
            cache("cache-control: max-age=60, S-MaxAge=600\r\nCache-Control: Public, must-revalidate\r\n"),
            "private, max-age=60, must-revalidate"
        );
        assert_eq!(cache("Cache-Control: public, no-cache=\"a, b\"\r\n"), "private, no-cache=\"a, b\"");
        assert_eq!(cache("Cache-Control: private=\"x\", public\r\n"), "private");
        assert_eq!(cache("Cache-Control: private, max-age=60\r\n"), "private, max-age=60");
        assert_eq!(cache("Cache-Control: no-store\r\nCache-Control: public\r\n"), "no-store | public");
        // Without Tether's cookie, Cache-Control is the backend's.
        let (_, f, _) =
            res_written("HTTP/1.1 200 OK\r\nCache-Control: public\r\nContent-Length: 0\r\n\r\n", false, &res_edits());
        assert_eq!(get(&f, "cache-control"), ["public"]);
    }

    #[test]
    fn date_is_added_when_missing() {
        let e = ResponseEdits { date: Some(b"Sun, 29 Nov 2026 16:00:00 GMT"), ..res_edits() };
        let (_, f, _) = res_written("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false, &e);
        assert_eq!(get(&f, "date"), ["Sun, 29 Nov 2026 16:00:00 GMT"]);
        let (_, f, _) = res_written("HTTP/1.1 200 OK\r\nDATE: then\r\nContent-Length: 0\r\n\r\n", false, &e);
        assert_eq!(get(&f, "date"), ["then"]);
    }

    /// The HTTP/2 path's client head (`backside::client_head`, then `persist`) on the
    /// backend's head, compared without the framing fields, which hyper's server writes on
    /// its own (checked above).
    #[test]
    fn responses_match_the_http2_paths() {
        let a = PoolAffinity::build("web", &[("app-1", 1)], &crate::config::Affinity::default(), None);
        let heads = [
            "HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 5\r\nSet-Cookie: app=1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nCache-Control: public, max-age=9\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nConnection: x-hop, keep-alive\r\nX-Hop: 1\r\n\r\n",
            "HTTP/1.1 404 Not Found\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\nTE: x\r\nUpgrade: h2c\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nCache-Control: public\r\nContent-Length: 0\r\n\r\n",
        ];
        let framing = ["content-length", "transfer-encoding", "connection", "date"];
        for text in heads {
            for issue in [false, true] {
                let head = response(text, false);
                let client = crate::proxy::backside::client_head(text.as_bytes(), &head, http::Version::HTTP_11);
                let mut today = client.unwrap().into_parts().0.headers;
                let mut d = Decision::plain(Some(0));
                d.issue = issue.then(|| crate::affinity::token::Token::issue(a.ids[0], 1_800_000_000).unwrap());
                rewrite::persist(&mut today, &a, &d, 0, false);
                // The token's nonce is random: Tether's cookie is the one `persist` added.
                let cookie = issue.then(|| {
                    let last = today.get_all(http::header::SET_COOKIE).iter().next_back().unwrap();
                    last.to_str().unwrap().to_string()
                });
                let codings = today.get(http::header::TRANSFER_ENCODING).cloned();
                let e = ResponseEdits { set_cookie: cookie.as_deref(), ..res_edits() };
                let (_, native, _) = res_written(text, false, &e);
                let without = |v: Vec<(String, String)>| {
                    multiset(v).into_iter().filter(|(n, _)| !framing.contains(&n.as_str())).collect::<Vec<_>>()
                };
                assert_eq!(without(native.clone()), without(map_pairs(&today)), "{text:?}, issue {issue}");
                // Codings today's path passes on are the native path's before its final chunked.
                if let Some(c) = codings {
                    let te = get(&native, "transfer-encoding").join("");
                    assert_eq!(te, format!("{}, chunked", c.to_str().unwrap()), "{text:?}");
                }
            }
        }
    }

    #[test]
    fn refusals_are_exact() {
        let mut out = b"x".to_vec();
        write_refusal(&mut out, 503, "Service Unavailable", "no-backend", "pool web has no backend", None, false);
        let expected = "xHTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
                        Cache-Control: no-store\r\nTether-Error: no-backend\r\nContent-Length: 49\r\n\r\n\
                        503 Service Unavailable: pool web has no backend\n";
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        let mut out = Vec::new();
        write_refusal(&mut out, 400, "Bad Request", "bad-request", "malformed request head", None, true);
        let expected = "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\
                        Cache-Control: no-store\r\nTether-Error: bad-request\r\nConnection: close\r\n\
                        Content-Length: 40\r\n\r\n400 Bad Request: malformed request head\n";
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        // The length is the body's, whatever the status and reason.
        for (status, reason) in [(599, ""), (421, "Misdirected Request"), (1000, "x")] {
            let mut out = Vec::new();
            write_refusal(&mut out, status, reason, "l", "m", None, false);
            let text = String::from_utf8(out).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.ends_with(&format!("Content-Length: {}", body.len())), "{text:?}");
            assert_eq!(body, format!("{status} {reason}: m\n"));
        }
    }

    #[test]
    fn numbers() {
        for n in [0, 7, 10, 99, 100, 12345, u64::MAX] {
            let mut out = Vec::new();
            put_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
            assert_eq!(decimal_len(n), n.to_string().len());
        }
    }
}

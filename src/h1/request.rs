//! A request head: parsed, checked, and its body's framing decided (RFC 9112 sections 3,
//! 6 and 7; RFC 9110 section 7.2 for Host).

use super::fields::{self, Known};
use super::{has_bare_lf, head_has_bare_lf, Fields, Span, MAX_FIELDS};

/// How large a request head, and its target, may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The whole head, request line to the empty line, in bytes.
    pub max_head: usize,
    /// The request target, in bytes.
    pub max_target: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_head: 64 * 1024, max_target: 8 * 1024 }
    }
}

/// The request methods Tether treats specially; others are [`Method::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Trace,
    Connect,
    Patch,
    Other,
}

impl Method {
    fn of(m: &[u8]) -> Method {
        match m {
            b"GET" => Method::Get,
            b"HEAD" => Method::Head,
            b"POST" => Method::Post,
            b"PUT" => Method::Put,
            b"DELETE" => Method::Delete,
            b"OPTIONS" => Method::Options,
            b"TRACE" => Method::Trace,
            b"CONNECT" => Method::Connect,
            b"PATCH" => Method::Patch,
            _ => Method::Other,
        }
    }

    /// Idempotent (RFC 9110 section 9.2.2): may be sent again after a connection broke.
    pub fn is_idempotent(self) -> bool {
        matches!(self, Method::Get | Method::Head | Method::Put | Method::Delete | Method::Options | Method::Trace)
    }
}

/// The form of a request target (RFC 9112 section 3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `/path?query`
    Origin,
    /// `http://authority/path?query`: `path` is empty when the URI has none.
    Absolute { authority: Span, path: Span },
    /// `host:port`, with CONNECT only.
    Authority,
    /// `*`, with OPTIONS only.
    Asterisk,
}

/// How the body that follows a head is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
}

/// A parsed request head. Every range is into the buffer it was parsed from.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: Method,
    pub method_name: Span,
    /// The request target as received.
    pub target: Span,
    pub form: Target,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub minor: u8,
    pub fields: Fields,
    /// The authority the request is for: the target's in absolute form (the Host field is
    /// then ignored, RFC 9112 section 3.2.2), else the Host field's. `None` only for an
    /// HTTP/1.0 request without Host.
    pub host: Option<Span>,
    pub body: Body,
    /// The client wants the connection kept open after this request.
    pub keep_alive: bool,
    /// The client asks to switch protocols (`Connection: upgrade` and `Upgrade`).
    pub upgrade: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// Bytes of the head, through its empty line: the body starts here.
    pub len: usize,
}

impl Default for RequestHead {
    /// An empty `GET` head, a placeholder for pooled storage.
    fn default() -> Self {
        RequestHead {
            method: Method::Get,
            method_name: Span::default(),
            target: Span::default(),
            form: Target::Origin,
            minor: 1,
            fields: Fields::default(),
            host: None,
            body: Body::None,
            keep_alive: true,
            upgrade: false,
            expect_continue: false,
            len: 0,
        }
    }
}

/// Why a request head was refused. Each maps to the status the client is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Not HTTP/1.x syntax: the request line or a field line is malformed.
    Syntax,
    /// A line ends in LF without CR.
    BareLf,
    /// A version other than HTTP/1.0 or HTTP/1.1.
    Version,
    /// The head is over `max_head`, or has more than [`MAX_FIELDS`] fields.
    HeadTooLarge,
    /// The target is over `max_target`.
    TargetTooLong,
    /// A target that is not valid for its method, or has bytes outside visible ASCII.
    BadTarget,
    /// HTTP/1.1 without Host, several Host fields, or a Host that is no authority.
    BadHost,
    BadContentLength,
    /// Transfer-Encoding on HTTP/1.0, empty, or not ending in a single `chunked`.
    BadTransferEncoding,
    /// A transfer coding other than `chunked`.
    UnsupportedCoding,
}

impl Error {
    /// The status a client is answered with.
    pub fn status(self) -> u16 {
        match self {
            Error::HeadTooLarge => 431,
            Error::TargetTooLong => 414,
            Error::Version => 505,
            Error::UnsupportedCoding => 501,
            _ => 400,
        }
    }

    /// What was wrong, for the refusal's body and the log.
    pub fn describe(self) -> &'static str {
        match self {
            Error::Syntax => "malformed request head",
            Error::BareLf => "a line of the request head ends in LF without CR",
            Error::Version => "HTTP version not supported",
            Error::HeadTooLarge => "request head too large",
            Error::TargetTooLong => "request target too long",
            Error::BadTarget => "invalid request target",
            Error::BadHost => "missing, repeated or invalid Host",
            Error::BadContentLength => "invalid Content-Length",
            Error::BadTransferEncoding => "invalid Transfer-Encoding",
            Error::UnsupportedCoding => "transfer coding other than chunked",
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// Parses the request head at the start of `buf`: `Ok(None)` while it is incomplete and
/// still within the limits.
pub fn parse(buf: &[u8], limits: &Limits) -> Result<Option<RequestHead>, Error> {
    let mut head = RequestHead::default();
    Ok(parse_into(buf, limits, &mut head)?.then_some(head))
}

/// [`parse`] into a head the caller keeps (pooled storage: nothing of the size of a head
/// is built or copied on the way). `Ok(false)` while the head is incomplete; `into` is
/// meaningful only after `Ok(true)`.
pub fn parse_into(buf: &[u8], limits: &Limits, into: &mut RequestHead) -> Result<bool, Error> {
    let mut headers = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return partial(buf, limits).map(|()| false),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::HeadTooLarge),
        Err(httparse::Error::Version) => return Err(if names_a_version(buf) { Error::Version } else { Error::Syntax }),
        Err(_) => return Err(if has_bare_lf(buf) { Error::BareLf } else { Error::Syntax }),
    };
    if len > limits.max_head {
        return Err(Error::HeadTooLarge);
    }
    if head_has_bare_lf(&buf[..len], req.headers) {
        return Err(Error::BareLf);
    }
    let (Some(method_name), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(Error::Syntax);
    };
    if path.len() > limits.max_target {
        return Err(Error::TargetTooLong);
    }
    let method = Method::of(method_name.as_bytes());
    let target = Span::within(buf, path.as_bytes());
    let form = target_form(buf, path.as_bytes(), method)?;
    let fields = &mut into.fields;
    fields.fill(buf, req.headers);

    let host = match form {
        Target::Absolute { authority, .. } => {
            // The Host field, if any, is ignored, but it must still be a single one.
            if fields.values(buf, Known::Host).nth(1).is_some() {
                return Err(Error::BadHost);
            }
            Some(authority)
        }
        _ => {
            let mut hosts = fields.iter().filter(|f| f.known == Known::Host);
            let host = hosts.next().map(|f| f.value);
            if hosts.next().is_some() || (host.is_none() && minor == 1) {
                return Err(Error::BadHost);
            }
            host
        }
    };
    if let Some(h) = host {
        if !is_authority(h.of(buf)) {
            return Err(Error::BadHost);
        }
    }

    let body = framing(buf, fields, minor)?;
    let options = fields::options(fields.values(buf, Known::Connection));
    // Transfer-Encoding with Content-Length: framed by the former alone, and the
    // connection closes after the response (RFC 9112 section 6.3, point 3), so whatever a
    // different reading would have made of the bytes after the body is never read.
    let both = body == Body::Chunked && fields.values(buf, Known::ContentLength).next().is_some();
    let keep_alive = !options.close && !both && (minor == 1 || options.keep_alive);
    let upgrade = minor == 1 && options.upgrade && fields.values(buf, Known::Upgrade).next().is_some();
    let expect_continue =
        minor == 1 && fields.values(buf, Known::Expect).any(|v| v.eq_ignore_ascii_case(b"100-continue"));
    into.method = method;
    into.method_name = Span::within(buf, method_name.as_bytes());
    into.target = target;
    into.form = form;
    into.minor = minor;
    into.host = host;
    into.body = body;
    into.keep_alive = keep_alive;
    into.upgrade = upgrade;
    into.expect_continue = expect_continue;
    into.len = len;
    Ok(true)
}

/// The request line ends in a well-formed version (`HTTP/` digit `.` digit) that is just
/// not one Tether speaks: 505. Anything else where the version should be (a space in the
/// target, say) is a malformed request: 400.
fn names_a_version(buf: &[u8]) -> bool {
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|b| *b == b' ');
    let (Some(_), Some(_), Some(v), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    matches!(v, [b'H', b'T', b'T', b'P', b'/', major, b'.', minor] if major.is_ascii_digit() && minor.is_ascii_digit())
}

/// An incomplete head: fine while within the limits. A request line that has not ended
/// by the time it is longer than any allowed target can be is refused as 414 at once.
fn partial(buf: &[u8], limits: &Limits) -> Result<(), Error> {
    // The method, two spaces and "HTTP/1.1\r\n" around the target.
    const LINE_OVERHEAD: usize = 32;
    let line_ended = buf.contains(&b'\n');
    if !line_ended && buf.len() > limits.max_target + LINE_OVERHEAD {
        return Err(Error::TargetTooLong);
    }
    if buf.len() >= limits.max_head {
        return Err(if line_ended { Error::HeadTooLarge } else { Error::TargetTooLong });
    }
    Ok(())
}

/// The target's form, checked against the method: visible ASCII only, `*` only with
/// OPTIONS, authority form only (and always) with CONNECT, absolute form only for
/// `http` and `https` without user information.
fn target_form(buf: &[u8], t: &[u8], method: Method) -> Result<Target, Error> {
    if !t.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(Error::BadTarget);
    }
    if method == Method::Connect {
        return if is_authority(t) && !t.is_empty() && !t.contains(&b'/') {
            Ok(Target::Authority)
        } else {
            Err(Error::BadTarget)
        };
    }
    match t {
        [b'/', ..] if is_path_and_query(t) => Ok(Target::Origin),
        [b'/', ..] => Err(Error::BadTarget),
        b"*" if method == Method::Options => Ok(Target::Asterisk),
        _ => {
            let rest = strip_prefix_ignore_case(t, b"http://")
                .or_else(|| strip_prefix_ignore_case(t, b"https://"))
                .ok_or(Error::BadTarget)?;
            let end = rest.iter().position(|b| matches!(b, b'/' | b'?' | b'#')).unwrap_or(rest.len());
            let authority = &rest[..end];
            let path = &rest[end..];
            if authority.is_empty() || !is_authority(authority) || !(path.is_empty() || is_path_and_query(path)) {
                return Err(Error::BadTarget);
            }
            Ok(Target::Absolute { authority: Span::within(buf, authority), path: Span::within(buf, path) })
        }
    }
}

/// A path with an optional query, of the characters RFC 3986 allows there, and `"`, `{`,
/// `}`, `|`, `[`, `]`, `\` and `^` in the path, which clients send unencoded (JSON in a
/// path) and which the `http` crate accepts too. No fragment: a request target has none.
fn is_path_and_query(t: &[u8]) -> bool {
    let (path, query) = match t.iter().position(|b| *b == b'?') {
        Some(q) => (&t[..q], &t[q + 1..]),
        None => (t, &[][..]),
    };
    path.iter().all(|b| matches!(b, 0x21 | 0x22 | 0x24..=0x3B | 0x3D | 0x40..=0x5F | 0x61..=0x7E))
        && query.iter().all(|b| matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x7E))
}

fn strip_prefix_ignore_case<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)).then(|| &s[prefix.len()..])
}

/// `host [":" port]` (RFC 3986 section 3.2.2: a reg-name, an IPv4 address or a
/// bracketed IPv6 literal; a port of at most 65535). An empty value is allowed (RFC 9110
/// section 7.2, a target without authority).
fn is_authority(a: &[u8]) -> bool {
    let (host, port) = if let Some(rest) = a.strip_prefix(b"[") {
        let Some(close) = rest.iter().position(|b| *b == b']') else { return false };
        let literal = &rest[..close];
        if literal.is_empty() || !literal.iter().all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.')) {
            return false;
        }
        match &rest[close + 1..] {
            [] => return true,
            [b':', port @ ..] => (&[][..], port),
            _ => return false,
        }
    } else {
        match a.iter().position(|b| *b == b':') {
            Some(colon) => (&a[..colon], &a[colon + 1..]),
            None => (a, &[][..]),
        }
    };
    is_reg_name(host) && port.len() <= 5 && port.iter().all(u8::is_ascii_digit) && {
        port.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0')) <= 65535
    }
}

/// RFC 3986 reg-name: unreserved and sub-delims characters. Percent-encoding, which RFC
/// 3986 also allows, is refused: no DNS name needs it, and the `http` crate refuses it too.
fn is_reg_name(h: &[u8]) -> bool {
    h.iter().all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(b))
}

/// The request body's framing (RFC 9112 section 6.3, points 3 to 6).
fn framing(buf: &[u8], fields: &Fields, minor: u8) -> Result<Body, Error> {
    let has_te = fields.values(buf, Known::TransferEncoding).next().is_some();
    // An invalid Content-Length is an error even beside Transfer-Encoding, which frames the
    // body then: a peer that reads it differently must not get the chance (and hyper
    // refuses it too; the differential fuzz target found the difference).
    let length =
        fields::content_length(fields.values(buf, Known::ContentLength)).map_err(|()| Error::BadContentLength)?;
    if has_te {
        if minor == 0 {
            return Err(Error::BadTransferEncoding);
        }
        let c = fields::codings(fields.values(buf, Known::TransferEncoding));
        if c.empty || !c.chunked_last || c.chunked_misplaced {
            return Err(Error::BadTransferEncoding);
        }
        if c.other {
            return Err(Error::UnsupportedCoding);
        }
        return Ok(Body::Chunked);
    }
    Ok(match length {
        None | Some(0) => Body::None,
        Some(n) => Body::Length(n),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> RequestHead {
        match parse(text.as_bytes(), &Limits::default()) {
            Ok(Some(h)) => h,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    fn err(text: &str) -> Error {
        match parse(text.as_bytes(), &Limits::default()) {
            Err(e) => e,
            other => panic!("{text:?} should be refused: {other:?}"),
        }
    }

    #[test]
    fn a_plain_get() {
        let text = "GET /a?b=1 HTTP/1.1\r\nHost: example.com:8080\r\nCookie: x=1\r\n\r\nrest";
        let h = ok(text);
        let buf = text.as_bytes();
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.target.of(buf), b"/a?b=1");
        assert_eq!(h.form, Target::Origin);
        assert_eq!(h.host.unwrap().of(buf), b"example.com:8080");
        assert_eq!(h.body, Body::None);
        assert!(h.keep_alive && !h.upgrade && !h.expect_continue);
        assert_eq!(&buf[h.len..], b"rest");
        let f: Vec<_> = h.fields.iter().map(|f| (f.known, f.name.of(buf), f.value.of(buf))).collect();
        assert_eq!(f, vec![(Known::Host, &b"Host"[..], &b"example.com:8080"[..]), (Known::Cookie, b"Cookie", b"x=1")]);
    }

    #[test]
    fn incomplete_heads_wait() {
        for text in
            ["", "GET", "GET / HTTP/1.1\r\n", "GET / HTTP/1.1\r\nHost: a\r\n", "GET / HTTP/1.1\r\nHost: a\r\n\r"]
        {
            assert!(parse(text.as_bytes(), &Limits::default()).unwrap().is_none(), "{text:?}");
        }
    }

    #[test]
    fn framing_by_length_and_chunked() {
        assert_eq!(ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n").body, Body::Length(5));
        assert_eq!(ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n").body, Body::Length(5));
        assert_eq!(ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n").body, Body::None);
        assert_eq!(ok("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").body, Body::Chunked);
        assert_eq!(ok("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n").body, Body::Chunked);
        assert_eq!(
            err("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            Error::BadContentLength
        );
        assert_eq!(err("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n"), Error::BadContentLength);
        assert_eq!(err("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5 5\r\n\r\n"), Error::BadContentLength);
        let both = ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!((both.body, both.keep_alive), (Body::Chunked, false));
        assert_eq!(
            err("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Error::BadContentLength
        );
        assert_eq!(
            err("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Error::BadTransferEncoding
        );
        assert_eq!(err("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"), Error::BadTransferEncoding);
        assert_eq!(err("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n"), Error::BadTransferEncoding);
        assert_eq!(
            err("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            Error::BadTransferEncoding
        );
        assert_eq!(
            err("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Error::UnsupportedCoding
        );
        assert_eq!(
            err("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Error::BadTransferEncoding
        );
        assert_eq!(err("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,\r\n\r\n"), Error::BadTransferEncoding);
        assert_eq!(
            err("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked;x=1\r\n\r\n"),
            Error::BadTransferEncoding
        );
        assert_eq!(
            err("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n"),
            Error::BadTransferEncoding
        );
    }

    #[test]
    fn line_syntax() {
        assert_eq!(err("GET / HTTP/1.1\nHost: a\n\n"), Error::BareLf);
        assert_eq!(err("GET / HTTP/1.1\r\nHost: a\n\r\n"), Error::BareLf);
        assert_eq!(err("GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n folded\r\n\r\n"), Error::Syntax);
        assert_eq!(err("GET / HTTP/1.1\r\nHost : a\r\n\r\n"), Error::Syntax);
        assert_eq!(err("GET / HTTP/1.1\r\nHost: a\0b\r\n\r\n"), Error::Syntax);
        assert_eq!(err("GET / HTTP/1.1\r\nHost: a\x7fb\r\n\r\n"), Error::Syntax);
        assert_eq!(err("GET / HTTP/1.1\r\nX\x01: a\r\n\r\n"), Error::Syntax);
        assert_eq!(err("G(T / HTTP/1.1\r\nHost: a\r\n\r\n"), Error::Syntax);
        assert_eq!(err("GET / HTTP/2.0\r\nHost: a\r\n\r\n"), Error::Version);
        assert_eq!(err("GET /a b HTTP/1.1\r\nHost: a\r\n\r\n"), Error::Syntax);
        assert_eq!(err("GET / HTTP/1.x\r\nHost: a\r\n\r\n"), Error::Syntax);
        assert_eq!(err("GET / HTTP/1.1\rHost: a\r\n\r\n"), Error::Syntax);
    }

    #[test]
    fn hosts_and_targets() {
        assert_eq!(err("GET / HTTP/1.1\r\n\r\n"), Error::BadHost);
        assert_eq!(err("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), Error::BadHost);
        assert_eq!(err("GET / HTTP/1.1\r\nHost: a b\r\n\r\n"), Error::BadHost);
        assert_eq!(err("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"), Error::BadHost);
        assert!(ok("GET / HTTP/1.0\r\n\r\n").host.is_none());
        let text = "GET http://Example.com:81/p?q HTTP/1.1\r\nHost: other\r\n\r\n";
        let h = ok(text);
        let Target::Absolute { authority, path } = h.form else { panic!("{:?}", h.form) };
        assert_eq!(authority.of(text.as_bytes()), b"Example.com:81");
        assert_eq!(path.of(text.as_bytes()), b"/p?q");
        assert_eq!(h.host, Some(authority));
        assert_eq!(err("GET http://u@h/ HTTP/1.1\r\nHost: h\r\n\r\n"), Error::BadTarget);
        assert_eq!(err("GET ftp://h/ HTTP/1.1\r\nHost: h\r\n\r\n"), Error::BadTarget);
        assert_eq!(err("GET * HTTP/1.1\r\nHost: h\r\n\r\n"), Error::BadTarget);
        assert_eq!(ok("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n").form, Target::Asterisk);
        assert_eq!(ok("CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n").form, Target::Authority);
        assert_eq!(err("CONNECT / HTTP/1.1\r\nHost: h\r\n\r\n"), Error::BadTarget);
        assert_eq!(err("GET h:443 HTTP/1.1\r\nHost: h\r\n\r\n"), Error::BadTarget);
        assert_eq!(err("GET /\u{e9} HTTP/1.1\r\nHost: h\r\n\r\n"), Error::BadTarget);
        for target in ["/a<b", "/a>b", "/a`b", "/a#frag", "/a?b<c", "/a?b\"c", "/a?b#c", "http://h/a<b"] {
            let text = format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n");
            assert_eq!(err(&text), Error::BadTarget, "{target}");
        }
        for target in ["/a{\"b\":1}", "/a|b^c[d]", "/a?b=/c?d&e=%20'f'", "http://h", "http://h?q", "http://h/p"] {
            ok(&format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n"));
        }
        for host in ["a.example", "a.example:80", "[::1]:8080", "[::1]", "10.0.0.1:1", "", "a:"] {
            assert!(is_authority(host.as_bytes()), "{host}");
        }
        for host in
            ["a%20b", "a%2", "a%zz", "a:b", "a:1:2", "a:65536", "[::1", "[]", "[::1]x", "a b", "a/b", "a@b", "[v1.x]"]
        {
            assert!(!is_authority(host.as_bytes()), "{host}");
        }
    }

    #[test]
    fn connection_options() {
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!ok("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(ok("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").upgrade);
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n").upgrade);
        assert!(ok("PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n").expect_continue);
    }

    #[test]
    fn limits() {
        let limits = Limits { max_head: 200, max_target: 50 };
        let long_target = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(60));
        assert_eq!(parse(long_target.as_bytes(), &limits).unwrap_err(), Error::TargetTooLong);
        // A target still arriving is refused once it cannot fit.
        let arriving = format!("GET /{}", "a".repeat(100));
        assert_eq!(parse(arriving.as_bytes(), &limits).unwrap_err(), Error::TargetTooLong);
        let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "b".repeat(200));
        assert_eq!(parse(big.as_bytes(), &limits).unwrap_err(), Error::HeadTooLarge);
        assert_eq!(parse(&big.as_bytes()[..200], &limits).unwrap_err(), Error::HeadTooLarge);
        assert!(parse(&big.as_bytes()[..199], &limits).unwrap().is_none());
        let many: String = (0..=MAX_FIELDS).map(|i| format!("X-{i}: 1\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
        assert_eq!(err(&many), Error::HeadTooLarge);
        assert_eq!(Error::HeadTooLarge.status(), 431);
        assert_eq!(Error::TargetTooLong.status(), 414);
        assert_eq!(Error::UnsupportedCoding.status(), 501);
    }
}

//! A response head from a backend: parsed, checked, and its body's framing decided (RFC
//! 9112 section 6.3, points 1 to 7). A response Tether cannot frame with certainty is an
//! error (the client gets 502), never guessed at.

use super::fields::{self, Known};
use super::{head_has_bare_lf, Fields, Span, MAX_FIELDS};

/// How a response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Body {
    /// No body: a response to HEAD, 1xx, 204 or 304.
    #[default]
    None,
    Length(u64),
    Chunked,
    /// Until the backend closes the connection.
    UntilClose,
}

#[derive(Debug, Clone, Default)]
pub struct ResponseHead {
    pub status: u16,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub minor: u8,
    pub reason: Span,
    pub fields: Fields,
    pub body: Body,
    /// The backend connection may carry another request after this response.
    pub keep_alive: bool,
    /// Content-Length must not be forwarded: Transfer-Encoding frames the body.
    pub drop_length: bool,
    /// Bytes of the head: the body starts here.
    pub len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Not an HTTP/1.x response head, or a line ending in bare LF.
    Syntax,
    /// Over the head size limit, or more than [`MAX_FIELDS`] fields.
    TooLarge,
    /// Content-Length values that are invalid or disagree.
    BadContentLength,
    /// Transfer-Encoding in an HTTP/1.0 response.
    BadTransferEncoding,
}

impl Error {
    pub fn describe(self) -> &'static str {
        match self {
            Error::Syntax => "malformed response head",
            Error::TooLarge => "response head too large",
            Error::BadContentLength => "invalid Content-Length in response",
            Error::BadTransferEncoding => "Transfer-Encoding in an HTTP/1.0 response",
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// Parses the response head at the start of `buf`, to a request that was `head` (a HEAD
/// request) or not: `Ok(None)` while incomplete and within `max_head`.
pub fn parse(buf: &[u8], max_head: usize, head: bool) -> Result<Option<ResponseHead>, Error> {
    let mut parsed = ResponseHead::default();
    Ok(parse_into(buf, max_head, head, &mut parsed)?.then_some(parsed))
}

/// [`parse`] into a head the caller keeps. `Ok(false)` while the head is incomplete;
/// `into` is meaningful only after `Ok(true)`.
pub fn parse_into(buf: &[u8], max_head: usize, head: bool, into: &mut ResponseHead) -> Result<bool, Error> {
    let mut headers = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_FIELDS];
    let mut res = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_response_with_uninit_headers(&mut res, buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => return Err(Error::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(false),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::TooLarge),
        Err(_) => return Err(Error::Syntax),
    };
    if len > max_head {
        return Err(Error::TooLarge);
    }
    if head_has_bare_lf(&buf[..len], res.headers) {
        return Err(Error::Syntax);
    }
    let (Some(status), Some(minor)) = (res.code, res.version) else { return Err(Error::Syntax) };
    if !(100..=999).contains(&status) {
        return Err(Error::Syntax);
    }
    let reason = res.reason.map_or(Span { start: len as u32, end: len as u32 }, |r| Span::within(buf, r.as_bytes()));
    let fields = &mut into.fields;
    fields.fill(buf, res.headers);

    let options = fields::options(fields.values(buf, Known::Connection));
    let mut keep_alive = !options.close && (minor == 1 || options.keep_alive);
    let has_te = fields.values(buf, Known::TransferEncoding).next().is_some();
    let has_length = fields.values(buf, Known::ContentLength).next().is_some();
    let mut drop_length = false;
    let body = if head || (100..200).contains(&status) || status == 204 || status == 304 {
        Body::None
    } else if has_te {
        if minor == 0 {
            return Err(Error::BadTransferEncoding);
        }
        drop_length = has_length;
        let c = fields::codings(fields.values(buf, Known::TransferEncoding));
        if c.chunked_last && !c.chunked_misplaced {
            Body::Chunked
        } else {
            keep_alive = false;
            Body::UntilClose
        }
    } else {
        match fields::content_length(fields.values(buf, Known::ContentLength)) {
            Ok(Some(n)) => Body::Length(n),
            Ok(None) => {
                keep_alive = false;
                Body::UntilClose
            }
            Err(()) => return Err(Error::BadContentLength),
        }
    };
    into.status = status;
    into.minor = minor;
    into.reason = reason;
    into.body = body;
    into.keep_alive = keep_alive;
    into.drop_length = drop_length;
    into.len = len;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> ResponseHead {
        parse(text.as_bytes(), 64 * 1024, false).unwrap().unwrap()
    }

    #[test]
    fn framing() {
        let text = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        let h = ok(text);
        assert_eq!((h.status, h.minor, h.body, h.keep_alive), (200, 1, Body::Length(5), true));
        assert_eq!(h.reason.of(text.as_bytes()), b"OK");
        assert_eq!(&text.as_bytes()[h.len..], b"hello");
        assert_eq!(ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").body, Body::Chunked);
        let h = ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n");
        assert_eq!((h.body, h.drop_length), (Body::Chunked, true));
        let h = ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert_eq!((h.body, h.keep_alive), (Body::UntilClose, false));
        let h = ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n");
        assert_eq!((h.body, h.keep_alive), (Body::UntilClose, false));
        let h = ok("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((h.body, h.keep_alive), (Body::UntilClose, false));
        assert_eq!(ok("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n").body, Body::None);
        assert_eq!(ok("HTTP/1.1 304 Not Modified\r\n\r\n").body, Body::None);
        assert_eq!(ok("HTTP/1.1 101 Switching Protocols\r\n\r\n").body, Body::None);
        let head = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 1024, true).unwrap().unwrap();
        assert_eq!(head.body, Body::None);
        assert!(!ok("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n").keep_alive);
        assert!(ok("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n").keep_alive);
        assert!(!ok("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n").keep_alive);
        assert_eq!(ok("HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n").body, Body::Length(0));
        assert!(ok("HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n").reason.is_empty());
    }

    #[test]
    fn errors() {
        let err = |t: &str| parse(t.as_bytes(), 1024, false).unwrap_err();
        assert_eq!(err("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"), Error::BadContentLength);
        assert_eq!(err("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"), Error::BadContentLength);
        assert_eq!(err("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"), Error::BadTransferEncoding);
        assert_eq!(err("HTTP/1.1 200 OK\nContent-Length: 0\n\n"), Error::Syntax);
        assert_eq!(err("HTTP/1.1 200 OK\r\nX: 1\r\n folded\r\n\r\n"), Error::Syntax);
        assert_eq!(err("HTTP/1.1 20 OK\r\n\r\n"), Error::Syntax);
        assert_eq!(err("HTTP/2 200 OK\r\n\r\n"), Error::Syntax);
        assert_eq!(err("garbage\r\n\r\n"), Error::Syntax);
        assert_eq!(err(&format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(1024))), Error::TooLarge);
        assert!(parse(b"HTTP/1.1 200 OK\r\n", 1024, false).unwrap().is_none());
    }
}

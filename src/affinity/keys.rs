//! What [`PoolAffinity::decide`](super::PoolAffinity::decide) reads of a request, behind
//! one small trait, so the policy does not care which parser read the request:
//! [`HttpKeys`] reads `http`'s `HeaderMap` and `Uri` (the hyper data path),
//! [`H1Keys`] reads a head parsed by Tether's own codec ([`h1::request::parse`])
//! straight from its receive buffer. `decide` is generic over the trait (monomorphised,
//! no `dyn`), and neither implementation allocates.
//!
//! Both read a field value the way `http::HeaderValue::to_str` does: text only when every
//! byte is visible ASCII or a tab ([`header_text`]); any other value, and so every value
//! that is not UTF-8, counts as absent where text is needed (cookies). A header key is
//! hashed as the bytes received, as it always was.

use http::{HeaderMap, Uri};

use super::cookies;
use crate::h1::{self, request::RequestHead, request::Target, Known};

/// What the key chain reads of a request.
pub trait RequestKeys {
    /// The value of cookie `name` (unquoted) in the first `Cookie` field that has it: every
    /// `Cookie` field is searched, in order; fields that are not text are skipped.
    fn cookie(&self, name: &str) -> Option<&str>;
    /// The value of the first field named `name` (any case), as received.
    fn header(&self, name: &str) -> Option<&[u8]>;
    /// The target's path: `/` for an absolute-form target without one.
    fn path(&self) -> &str;
    /// The target's query, without the `?`; `None` when the target has no `?`.
    fn query(&self) -> Option<&str>;
}

/// A field value as text, as `http::HeaderValue::to_str` reads it: only when every byte
/// is visible ASCII (0x20 to 0x7E) or a horizontal tab.
#[inline]
pub fn header_text(value: &[u8]) -> Option<&str> {
    // Visible ASCII is UTF-8.
    if h1::is_text(value) {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// The value of cookie `name` in the first of `fields` (`Cookie` field values) that has it;
/// a field that is not text is skipped whole. The search runs on bytes, and the value
/// found becomes a `str` without a second look at its bytes: the field's were all
/// checked to be visible ASCII or tab.
#[inline]
pub fn cookie_in<'a>(fields: impl Iterator<Item = &'a [u8]>, name: &str) -> Option<&'a str> {
    let v = fields.filter(|v| h1::is_text(v)).find_map(|v| cookies::find_cookie_bytes(v, name.as_bytes()))?;
    debug_assert!(std::str::from_utf8(v).is_ok());
    // SAFETY: `v` is part of a field value `is_text` accepted: every byte is ASCII
    // (0x20 to 0x7E, or a tab), and ASCII is UTF-8.
    Some(unsafe { std::str::from_utf8_unchecked(v) })
}

/// A request as hyper parsed it: its header map and URI.
#[derive(Debug, Clone, Copy)]
pub struct HttpKeys<'a> {
    pub headers: &'a HeaderMap,
    pub uri: &'a Uri,
}

impl<'a> HttpKeys<'a> {
    pub fn new(headers: &'a HeaderMap, uri: &'a Uri) -> Self {
        HttpKeys { headers, uri }
    }
}

impl RequestKeys for HttpKeys<'_> {
    #[inline]
    fn cookie(&self, name: &str) -> Option<&str> {
        super::cookie_value(self.headers, name)
    }

    #[inline]
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.get(name).map(|v| v.as_bytes())
    }

    #[inline]
    fn path(&self) -> &str {
        self.uri.path()
    }

    #[inline]
    fn query(&self) -> Option<&str> {
        self.uri.query()
    }
}

/// A request head parsed by [`h1::request::parse`], and the buffer it was parsed from.
#[derive(Debug, Clone, Copy)]
pub struct H1Keys<'a> {
    pub buf: &'a [u8],
    pub head: &'a RequestHead,
}

impl<'a> H1Keys<'a> {
    /// `head` must have been parsed from `buf`.
    pub fn new(buf: &'a [u8], head: &'a RequestHead) -> Self {
        H1Keys { buf, head }
    }

    /// The path and query part of the target: the whole of an origin-form target, the
    /// part after the authority of an absolute-form one.
    fn path_and_query(&self) -> &'a [u8] {
        match self.head.form {
            Target::Absolute { path, .. } => path.of(self.buf),
            _ => self.head.target.of(self.buf),
        }
    }
}

impl RequestKeys for H1Keys<'_> {
    #[inline]
    fn cookie(&self, name: &str) -> Option<&str> {
        cookie_in(self.head.fields.values(self.buf, Known::Cookie), name)
    }

    #[inline]
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.head.fields.get(self.buf, name)
    }

    fn path(&self) -> &str {
        match self.head.form {
            // `*` and `host:port` have no path part; as `http::Uri` reads them.
            Target::Asterisk => "*",
            Target::Authority => "",
            Target::Origin | Target::Absolute { .. } => {
                let t = self.path_and_query();
                let path = t.iter().position(|&b| b == b'?').map_or(t, |q| &t[..q]);
                // The codec admits only visible ASCII in a target.
                match std::str::from_utf8(path) {
                    Ok("") => "/",
                    Ok(p) => p,
                    Err(_) => "/",
                }
            }
        }
    }

    fn query(&self) -> Option<&str> {
        match self.head.form {
            Target::Origin | Target::Absolute { .. } => {
                let t = self.path_and_query();
                let q = t.iter().position(|&b| b == b'?')?;
                std::str::from_utf8(&t[q + 1..]).ok()
            }
            Target::Asterisk | Target::Authority => None,
        }
    }
}

/// The `Set-Cookie` values of a response parsed by [`h1::response::parse`], for
/// [`PoolAffinity::learn`](super::PoolAffinity::learn).
pub fn h1_set_cookies<'b>(buf: &'b [u8], head: &'b h1::response::ResponseHead) -> impl Iterator<Item = &'b [u8]> {
    head.fields.iter().filter(|f| f.known == Known::SetCookie).map(move |f| f.value.of(buf))
}

/// The `Set-Cookie` values of a response as hyper parsed it.
pub fn http_set_cookies(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers.get_all(http::header::SET_COOKIE).iter().map(|v| v.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h1::request::{parse, Limits};

    fn head(text: &str) -> RequestHead {
        parse(text.as_bytes(), &Limits::default()).expect("valid").expect("complete")
    }

    /// Runs `f` over the h1 keys of `text`.
    fn with_h1<R>(text: &str, f: impl FnOnce(&H1Keys<'_>) -> R) -> R {
        let h = head(text);
        f(&H1Keys::new(text.as_bytes(), &h))
    }

    #[test]
    fn cookie_in_a_later_cookie_field() {
        let text =
            "GET / HTTP/1.1\r\nHost: a\r\nCookie: lang=en\r\nX: 1\r\ncookie: sid=abc; t=1\r\nCOOKIE: sid=later\r\n\r\n";
        with_h1(text, |k| {
            assert_eq!(k.cookie("sid"), Some("abc"));
            assert_eq!(k.cookie("lang"), Some("en"));
            assert_eq!(k.cookie("t"), Some("1"));
            assert_eq!(k.cookie("x"), None);
            // Not a Cookie field.
            assert_eq!(k.cookie("X"), None);
        });
    }

    #[test]
    fn header_names_in_any_case() {
        let text = "GET / HTTP/1.1\r\nHost: a\r\nX-USER: first\r\nx-user: second\r\n\r\n";
        with_h1(text, |k| {
            assert_eq!(k.header("x-user"), Some(&b"first"[..]));
            assert_eq!(k.header("X-User"), Some(&b"first"[..]));
            assert_eq!(k.header("x-users"), None);
            assert_eq!(k.header("host"), Some(&b"a"[..]));
        });
    }

    #[test]
    fn origin_form_path_and_query() {
        with_h1("GET /shop;jsessionid=9?sid=1&b=2 HTTP/1.1\r\nHost: a\r\n\r\n", |k| {
            assert_eq!(k.path(), "/shop;jsessionid=9");
            assert_eq!(k.query(), Some("sid=1&b=2"));
        });
        with_h1("GET /a HTTP/1.1\r\nHost: a\r\n\r\n", |k| assert_eq!((k.path(), k.query()), ("/a", None)));
        with_h1("GET /a? HTTP/1.1\r\nHost: a\r\n\r\n", |k| assert_eq!((k.path(), k.query()), ("/a", Some(""))));
        with_h1("GET /a?b?c HTTP/1.1\r\nHost: a\r\n\r\n", |k| assert_eq!(k.query(), Some("b?c")));
    }

    #[test]
    fn absolute_form_path_and_query() {
        let text = "GET http://example.com:81/p;jsessionid=7?sid=x HTTP/1.1\r\nHost: other\r\n\r\n";
        with_h1(text, |k| {
            assert_eq!(k.path(), "/p;jsessionid=7");
            assert_eq!(k.query(), Some("sid=x"));
        });
        // No path: `/`, as `http::Uri` has it.
        with_h1("GET http://example.com HTTP/1.1\r\nHost: x\r\n\r\n", |k| {
            assert_eq!((k.path(), k.query()), ("/", None));
        });
        with_h1("GET http://example.com?sid=q HTTP/1.1\r\nHost: x\r\n\r\n", |k| {
            assert_eq!((k.path(), k.query()), ("/", Some("sid=q")));
        });
    }

    #[test]
    fn other_forms_as_http_reads_them() {
        for (text, target) in [
            ("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", "*"),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", "a:443"),
            ("GET http://example.com HTTP/1.1\r\nHost: x\r\n\r\n", "http://example.com"),
            ("GET http://example.com/?x=1 HTTP/1.1\r\nHost: x\r\n\r\n", "http://example.com/?x=1"),
        ] {
            let uri: Uri = target.parse().unwrap();
            let h = HeaderMap::new();
            let http = HttpKeys::new(&h, &uri);
            with_h1(text, |k| assert_eq!((k.path(), k.query()), (http.path(), http.query()), "{target}"));
        }
    }

    #[test]
    fn values_that_are_not_text_are_absent() {
        let mut text =
            b"GET / HTTP/1.1\r\nHost: a\r\nCookie: sid=\xff\xfe\r\nCookie: sid=caf\xc3\xa9; b=2\r\n".to_vec();
        text.extend_from_slice(b"Cookie: sid=ok\r\nX-User: \xe9t\xe9\r\n\r\n");
        let h = parse(&text, &Limits::default()).unwrap().unwrap();
        let k = H1Keys::new(&text, &h);
        // The fields that are not text (not UTF-8, or UTF-8 beyond ASCII) are skipped.
        assert_eq!(k.cookie("sid"), Some("ok"));
        assert_eq!(k.cookie("b"), None);
        // A header key is hashed as received, as the hyper path does.
        assert_eq!(k.header("x-user"), Some(&b"\xe9t\xe9"[..]));
        assert_eq!(header_text(b"a\tb ~"), Some("a\tb ~"));
        assert_eq!(header_text(b"caf\xc3\xa9"), None);
        assert_eq!(header_text(b"\xff"), None);
        assert_eq!(header_text(b"a\x7f"), None);
    }

    #[test]
    fn set_cookies_of_an_h1_response() {
        let text =
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nContent-Length: 0\r\nset-cookie: JSESSIONID=x; Path=/\r\n\r\n";
        let h = h1::response::parse(text, 64 * 1024, false).unwrap().unwrap();
        let v: Vec<&[u8]> = h1_set_cookies(text, &h).collect();
        assert_eq!(v, [&b"a=1"[..], b"JSESSIONID=x; Path=/"]);
    }
}

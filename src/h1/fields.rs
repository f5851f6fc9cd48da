//! Header fields as byte ranges, the fields Tether acts on known by name, and the list
//! values it reads (Content-Length, Transfer-Encoding, Connection).

/// Fields a head may carry; more is answered 431 (a request) or 502 (a response). HAProxy
/// allows 101 by default, NGINX about as many in its default buffers.
pub const MAX_FIELDS: usize = 100;

/// A byte range of the buffer a head was parsed from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    /// The bytes of this range in `buf`, the buffer the head was parsed from.
    #[inline]
    pub fn of<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.start as usize..self.end as usize]
    }

    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The range of `part`, a subslice of `buf`. An empty `part` need not point into
    /// `buf` (`httparse` gives a static `""` for an empty reason phrase): its range is
    /// then empty at the start.
    pub(super) fn within(buf: &[u8], part: &[u8]) -> Span {
        let start = (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
        if part.is_empty() && start > buf.len() {
            return Span::default();
        }
        debug_assert!(start + part.len() <= buf.len());
        Span { start: start as u32, end: (start + part.len()) as u32 }
    }
}

/// The fields whose meaning Tether acts on; every other name is [`Known::Other`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Known {
    #[default]
    Other,
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    KeepAlive,
    ProxyConnection,
    Te,
    Trailer,
    Upgrade,
    Expect,
    Cookie,
    SetCookie,
    Forwarded,
    XForwardedFor,
    XForwardedHost,
    XForwardedProto,
}

impl Known {
    /// What a field name is, compared without regard to case.
    pub fn of(name: &[u8]) -> Known {
        let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
        match name.len() {
            2 if is("te") => Known::Te,
            4 if is("host") => Known::Host,
            6 if is("cookie") => Known::Cookie,
            6 if is("expect") => Known::Expect,
            7 if is("upgrade") => Known::Upgrade,
            7 if is("trailer") => Known::Trailer,
            9 if is("forwarded") => Known::Forwarded,
            10 if is("connection") => Known::Connection,
            10 if is("keep-alive") => Known::KeepAlive,
            10 if is("set-cookie") => Known::SetCookie,
            14 if is("content-length") => Known::ContentLength,
            15 if is("x-forwarded-for") => Known::XForwardedFor,
            16 if is("x-forwarded-host") => Known::XForwardedHost,
            16 if is("proxy-connection") => Known::ProxyConnection,
            17 if is("transfer-encoding") => Known::TransferEncoding,
            17 if is("x-forwarded-proto") => Known::XForwardedProto,
            _ => Known::Other,
        }
    }

    /// Hop-by-hop: meant for the next hop only and never forwarded as received (RFC 9110
    /// section 7.6.1, and `Proxy-Connection` and `Keep-Alive` of older clients). The
    /// framing fields are among them: Tether writes its own.
    pub fn is_hop_by_hop(self) -> bool {
        matches!(
            self,
            Known::Connection
                | Known::KeepAlive
                | Known::ProxyConnection
                | Known::Te
                | Known::Trailer
                | Known::Upgrade
                | Known::TransferEncoding
                | Known::ContentLength
        )
    }
}

/// One field line: its name and its value, without surrounding whitespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Field {
    pub name: Span,
    pub value: Span,
    pub known: Known,
}

/// The field lines of a head, in order, as ranges of its buffer.
#[derive(Clone)]
pub struct Fields {
    len: u8,
    items: [Field; MAX_FIELDS],
}

const _: () = assert!(MAX_FIELDS <= u8::MAX as usize);

impl Default for Fields {
    fn default() -> Self {
        Fields { len: 0, items: [Field::default(); MAX_FIELDS] }
    }
}

impl std::fmt::Debug for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Fields {
    pub fn iter(&self) -> std::slice::Iter<'_, Field> {
        self.items[..self.len as usize].iter()
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fills from `httparse`'s parsed headers of `buf`.
    pub(super) fn fill(&mut self, buf: &[u8], headers: &[httparse::Header<'_>]) {
        debug_assert!(headers.len() <= MAX_FIELDS);
        for (slot, h) in self.items.iter_mut().zip(headers) {
            let name = Span::within(buf, h.name.as_bytes());
            *slot = Field { name, value: Span::within(buf, h.value), known: Known::of(h.name.as_bytes()) };
        }
        self.len = headers.len() as u8;
    }

    /// The values of every field of kind `known`.
    pub fn values<'b>(&self, buf: &'b [u8], known: Known) -> impl Iterator<Item = &'b [u8]> + use<'b, '_> {
        self.iter().filter(move |f| f.known == known).map(move |f| f.value.of(buf))
    }

    /// The first value of a field named `name` (any case).
    pub fn get<'b>(&self, buf: &'b [u8], name: &str) -> Option<&'b [u8]> {
        self.iter().find(|f| f.name.of(buf).eq_ignore_ascii_case(name.as_bytes())).map(|f| f.value.of(buf))
    }
}

/// A field value that is text as `http::HeaderValue::to_str` reads it: every byte
/// visible ASCII (0x20 to 0x7E) or a horizontal tab. Branch-free, so the compiler checks
/// many bytes at a time (a value is usually all text, and then every byte is looked at
/// anyway).
#[inline]
pub fn is_text(v: &[u8]) -> bool {
    v.iter().fold(true, |ok, &b| ok & (((0x20..0x7f).contains(&b)) | (b == b'\t')))
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if !is_ows(*first) {
            break;
        }
        s = rest;
    }
    while let [rest @ .., last] = s {
        if !is_ows(*last) {
            break;
        }
        s = rest;
    }
    s
}

/// The elements of a comma-separated list value (RFC 9110 section 5.6.1), trimmed, empty
/// ones skipped as the RFC asks.
pub(super) fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b',').map(trim_ows).filter(|e| !e.is_empty())
}

/// The body length that all Content-Length values agree on: each is digits only (no sign,
/// no spaces inside), a value may be a list of equal numbers (RFC 9110 section 8.6), and
/// several fields must agree too. `Err` for anything else, including overflow.
pub(super) fn content_length<'b>(values: impl Iterator<Item = &'b [u8]>) -> Result<Option<u64>, ()> {
    let mut found: Option<u64> = None;
    for value in values {
        let mut any = false;
        for element in value.split(|b| *b == b',').map(trim_ows) {
            let n = digits(element).ok_or(())?;
            if found.is_some_and(|f| f != n) {
                return Err(());
            }
            found = Some(n);
            any = true;
        }
        if !any {
            return Err(());
        }
    }
    Ok(found)
}

/// A decimal number of 1 to 19 digits (anything longer might overflow a `u64`).
fn digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// What the Transfer-Encoding fields of a message say, read as one list.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Codings {
    /// The last coding is exactly `chunked`.
    pub chunked_last: bool,
    /// `chunked` appears other than as the last coding, or with parameters.
    pub chunked_misplaced: bool,
    /// A coding other than `chunked` appears.
    pub other: bool,
    /// No coding at all (only empty list elements).
    pub empty: bool,
}

pub(super) fn codings<'b>(values: impl Iterator<Item = &'b [u8]>) -> Codings {
    let mut c = Codings { empty: true, ..Codings::default() };
    for value in values {
        for coding in value.split(|b| *b == b',').map(trim_ows) {
            if coding.is_empty() {
                // An empty element is no coding, but after `chunked` it means `chunked` is
                // not the last thing said: "chunked," is refused, as hyper refuses it.
                c.chunked_last = false;
                continue;
            }
            if c.chunked_last {
                // Something follows a `chunked`.
                c.chunked_misplaced = true;
            }
            c.empty = false;
            let name = trim_ows(coding.split(|b| *b == b';').next().unwrap_or_default());
            if name.eq_ignore_ascii_case(b"chunked") {
                if name.len() != coding.len() {
                    c.chunked_misplaced = true;
                }
                c.chunked_last = true;
            } else {
                c.chunked_last = false;
                c.other = true;
            }
        }
    }
    c
}

/// The connection options Tether acts on, from the Connection fields.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Options {
    pub close: bool,
    pub keep_alive: bool,
    pub upgrade: bool,
}

pub(super) fn options<'b>(values: impl Iterator<Item = &'b [u8]>) -> Options {
    let mut o = Options::default();
    for value in values {
        for token in list(value) {
            if token.eq_ignore_ascii_case(b"close") {
                o.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                o.keep_alive = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                o.upgrade = true;
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_names_in_any_case() {
        assert_eq!(Known::of(b"Content-Length"), Known::ContentLength);
        assert_eq!(Known::of(b"TRANSFER-ENCODING"), Known::TransferEncoding);
        assert_eq!(Known::of(b"x-forwarded-for"), Known::XForwardedFor);
        assert_eq!(Known::of(b"Te"), Known::Te);
        assert_eq!(Known::of(b"Content-Lengthx"), Known::Other);
        assert_eq!(Known::of(b"Content_Length"), Known::Other);
    }

    #[test]
    fn content_length_values() {
        let one = |v: &[u8]| content_length([v].into_iter());
        assert_eq!(one(b"0"), Ok(Some(0)));
        assert_eq!(one(b"42"), Ok(Some(42)));
        assert_eq!(one(b"42, 42"), Ok(Some(42)));
        assert_eq!(one(b"42, 43"), Err(()));
        assert_eq!(one(b"+42"), Err(()));
        assert_eq!(one(b"-1"), Err(()));
        assert_eq!(one(b"4 2"), Err(()));
        assert_eq!(one(b"0x10"), Err(()));
        assert_eq!(one(b""), Err(()));
        assert_eq!(one(b","), Err(()));
        assert_eq!(one(b"42,"), Err(()));
        assert_eq!(one(b"9999999999999999999"), Ok(Some(9_999_999_999_999_999_999)));
        assert_eq!(one(b"99999999999999999999"), Err(()));
        assert_eq!(content_length([&b"5"[..], b"5"].into_iter()), Ok(Some(5)));
        assert_eq!(content_length([&b"5"[..], b"6"].into_iter()), Err(()));
        assert_eq!(content_length(std::iter::empty()), Ok(None));
    }

    #[test]
    fn transfer_codings() {
        let one = |v: &[u8]| codings([v].into_iter());
        assert!(one(b"chunked").chunked_last);
        assert!(one(b"CHUNKED").chunked_last);
        let c = one(b"gzip, chunked");
        assert!(c.chunked_last && c.other && !c.chunked_misplaced);
        let c = one(b"chunked, gzip");
        assert!(!c.chunked_last && c.chunked_misplaced);
        let c = one(b"chunked, chunked");
        assert!(c.chunked_last && c.chunked_misplaced);
        let c = one(b"chunked;q=1");
        assert!(c.chunked_misplaced);
        assert!(one(b" , ").empty);
        assert!(one(b", chunked").chunked_last);
        assert!(!one(b"chunked,").chunked_last);
        assert!(!codings([&b"chunked"[..], b""].into_iter()).chunked_last);
        let c = codings([&b"gzip"[..], b"chunked"].into_iter());
        assert!(c.chunked_last && c.other);
    }

    #[test]
    fn connection_options() {
        let o = options([&b"keep-alive, Upgrade"[..]].into_iter());
        assert!(o.keep_alive && o.upgrade && !o.close);
        assert!(options([&b"foo"[..], b"CLOSE"].into_iter()).close);
        assert!(!options([&b"closed"[..]].into_iter()).close);
    }
}

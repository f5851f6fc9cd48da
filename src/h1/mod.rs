//! Tether's HTTP/1.1 wire format (RFC 9112): request and response heads with the framing
//! of the body that follows them, and the chunked transfer coding. No I/O and no
//! allocation: a parsed head is byte ranges ([`Span`]s) into the caller's buffer, so it can
//! live in pooled per-request state beside that buffer, and the data path forwards a
//! head by copying ranges with its own edits rather than building a map.
//!
//! The syntax of a head (method and field-name tokens, field-value bytes, the version) is
//! checked by `httparse`, the field's standard parser; this module adds what a proxy
//! must decide on top of it, more strictly than a server would, because two parsers that
//! disagree about where a message ends are how requests are smuggled:
//!
//! - Line ends are CRLF only. A bare LF anywhere in a head or in chunked framing is an
//!   error (RFC 9112 section 2.2 allows accepting it; a proxy that did would read framing
//!   differently from a backend that does not). Obsolete line folding is an error.
//! - A request's body is framed by Transfer-Encoding when it has one, and a request that
//!   also has Content-Length closes its connection after the response (section 6.3, point
//!   3), so nothing after its body is ever read as a request. An HTTP/1.0 request with
//!   Transfer-Encoding, a Transfer-Encoding whose last coding is not `chunked` (400), and
//!   any coding but `chunked` (501, section 6.1) are refused. Content-Length must be
//!   digits only; several values must all be equal.
//! - A response with Transfer-Encoding is framed by it alone and its Content-Length is
//!   dropped; one whose Transfer-Encoding does not end in `chunked` runs until the
//!   backend closes. Differing Content-Length values in a response are an error.
//! - Limits: a head longer than the limit is 431 (or 414 when it is the request target
//!   that is too long), more than [`MAX_FIELDS`] fields 431.

pub mod chunked;
mod fields;
pub mod request;
pub mod response;

pub use fields::{is_text, Field, Fields, Known, Span, MAX_FIELDS};

/// Whether a head that `httparse` accepted whole has a line ending in a bare LF. It ends
/// each line at an LF, with or without a CR before it, and refuses a CR without LF, so
/// only the ends of lines need looking at: the start line's (scanned: it is short, and
/// empty lines may come before it), each field line's (just after its value and any
/// whitespace after it), and the empty line that ends the head. Debug builds (the tests
/// and the fuzz targets) check the answer against a scan of every byte.
fn head_has_bare_lf(head: &[u8], fields: &[httparse::Header<'_>]) -> bool {
    let fast = line_ends_bare(head, fields);
    debug_assert_eq!(fast, has_bare_lf(head), "{:?}", String::from_utf8_lossy(head));
    fast
}

fn line_ends_bare(head: &[u8], fields: &[httparse::Header<'_>]) -> bool {
    let Some(first) = head.iter().position(|b| *b != b'\r' && *b != b'\n') else { return has_bare_lf(head) };
    let Some(eol) = head[first..].iter().position(|b| *b == b'\n') else { return has_bare_lf(head) };
    // Only CRs and LFs come before `first`, and the start line's one LF is at
    // `first + eol` (`eol >= 1`: `head[first]` is neither).
    if has_bare_lf(&head[..first]) || head[first + eol - 1] != b'\r' {
        return true;
    }
    let base = head.as_ptr() as usize;
    for h in fields {
        let at = (h.value.as_ptr() as usize).wrapping_sub(base);
        if at > head.len() {
            // An empty value that does not point into the head: look at every byte.
            return has_bare_lf(head);
        }
        let mut i = at + h.value.len();
        while i < head.len() && (head[i] == b' ' || head[i] == b'\t') {
            i += 1;
        }
        if head.get(i) != Some(&b'\r') {
            return true;
        }
    }
    !head.ends_with(b"\r\n")
}

/// Finds a bare LF (one not preceded by CR) in `head`.
fn has_bare_lf(head: &[u8]) -> bool {
    let mut prev = 0u8;
    for &b in head {
        if b == b'\n' && prev != b'\r' {
            return true;
        }
        prev = b;
    }
    false
}

//! Issue 10: hostile framing. Each case is sent raw over a socket to a real Tether in front
//! of a strict backend that records the exact bytes it receives (`RecordingBackend`), and
//! asserts what the client gets (RFC 9112 sections 2 to 7, RFC 9110), that nothing
//! malformed reaches the backend as something else, and that no second (smuggled) request
//! ever reaches it. Only observable behaviour is tested, so the suite holds for any HTTP/1
//! implementation behind Tether's listener. Every refusal carries `Tether-Error: <label>`
//! (`every_refused_head_carries_tether_error`).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the recording backends answer unless a case says otherwise.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// How long a case waits for anything it expects; reached only when a case fails.
const WAIT: Duration = Duration::from_secs(10);

/// One response as the client read it.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    /// The values of header `name` (any case).
    fn header(&self, name: &str) -> Vec<String> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }
}

/// Reads one response from `s`, framed as RFC 9112 section 6.3 says (chunked, by
/// `Content-Length`, or until the connection closes); `None` when the connection closed
/// before a whole head.
async fn read_reply(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Reply> {
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if fill(s, buf).await == 0 {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end + 4);
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status code");
    let mut r = Reply { status, head, body: Vec::new() };
    let chunked = r.header("transfer-encoding").last().is_some_and(|te| te.to_ascii_lowercase().ends_with("chunked"));
    if chunked {
        loop {
            let eol = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                assert!(fill(s, buf).await > 0, "closed inside a chunked body: {r:?}");
            };
            let line = String::from_utf8_lossy(&buf[..eol]).into_owned();
            let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).expect("chunk size");
            buf.drain(..eol + 2);
            if size == 0 {
                // No trailers are expected: the empty line ends the body.
                while buf.len() < 2 {
                    assert!(fill(s, buf).await > 0, "closed after the last chunk: {r:?}");
                }
                assert_eq!(&buf[..2], b"\r\n", "trailers or garbage after the last chunk");
                buf.drain(..2);
                return Some(r);
            }
            while buf.len() < size + 2 {
                assert!(fill(s, buf).await > 0, "closed inside a chunk: {r:?}");
            }
            r.body.extend_from_slice(&buf[..size]);
            assert_eq!(&buf[size..size + 2], b"\r\n");
            buf.drain(..size + 2);
        }
    }
    if let Some(n) = r.header("content-length").first() {
        let n: usize = n.parse().expect("a valid Content-Length");
        while buf.len() < n {
            assert!(fill(s, buf).await > 0, "closed {} bytes into a {n} byte body: {r:?}", buf.len());
        }
        r.body = buf.drain(..n).collect();
        return Some(r);
    }
    // Delimited by the connection closing.
    while fill(s, buf).await > 0 {}
    r.body = std::mem::take(buf);
    Some(r)
}

/// Reads more of `s` into `buf`: the bytes read, 0 when the peer closed.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    let mut chunk = [0u8; 16 * 1024];
    let n = tokio::time::timeout(WAIT, s.read(&mut chunk)).await.expect("the peer answered in time").unwrap_or(0);
    buf.extend_from_slice(&chunk[..n]);
    n
}

/// Waits until Tether closes `s` and returns whatever came after the response.
async fn rest_until_closed(s: &mut TcpStream, mut buf: Vec<u8>) -> Vec<u8> {
    while fill(s, &mut buf).await > 0 {}
    buf
}

/// Sends `bytes` on a new connection and reads one response.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> (Reply, TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    let r = read_reply(&mut s, &mut buf).await.unwrap_or_else(|| panic!("no response to {:?}", show(bytes)));
    (r, s, buf)
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Everything a backend received, over all its connections.
fn received(b: &RecordingBackend) -> usize {
    b.connections().iter().map(|c| c.bytes.len()).sum()
}

/// Whatever happened, the backend never saw anything but strictly valid requests, and
/// never one the client smuggled in a body.
fn assert_backend_clean(b: &RecordingBackend) {
    for c in b.connections() {
        assert!(c.malformed.is_none(), "the backend got a malformed request: {:?}\n{}", c.malformed, show(&c.bytes));
        assert!(
            !c.requests.iter().any(|r| r.line().contains("smuggled")),
            "a smuggled request reached the backend:\n{}",
            show(&c.bytes)
        );
    }
}

/// A refusal: the client gets `status` (with `Tether-Error: label` when Tether wrote it,
/// `None` for today's hyper-written ones) and the connection closes after it, with no
/// second response; the backend gets nothing at all.
async fn assert_refused(t: &Tether, b: &RecordingBackend, name: &str, bytes: &[u8], status: u16, label: Option<&str>) {
    let before = received(b);
    let (r, mut s, buf) = exchange(t.addr(), bytes).await;
    assert_eq!(r.status, status, "{name}: {r:?}");
    if let Some(label) = label {
        assert_eq!(r.header("tether-error"), [label], "{name}: {r:?}");
    }
    let rest = rest_until_closed(&mut s, buf).await;
    assert!(rest.is_empty(), "{name}: more after the refusal: {}", show(&rest));
    assert_eq!(
        received(b),
        before,
        "{name}: bytes reached the backend:\n{}",
        show(&b.connections().last().unwrap().bytes)
    );
    assert_backend_clean(b);
}

/// An accepted request: the client gets the backend's 200, and the backend got exactly
/// one new request, which is returned.
async fn assert_forwarded(t: &Tether, b: &RecordingBackend, name: &str, bytes: &[u8]) -> RecordedRequest {
    let before = b.requests().len();
    let (r, _, _) = exchange(t.addr(), bytes).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]), "{name}: {r:?}");
    let requests = b.requests();
    assert_eq!(requests.len(), before + 1, "{name}: {:?}", &requests[before..]);
    assert_backend_clean(b);
    requests[before].clone()
}

fn start(b: &RecordingBackend, extra: &str) -> Tether {
    Tether::start(&pool_of(&[("app-1", b.addr)], "", extra))
}

// === Content-Length and Transfer-Encoding (RFC 9112 section 6) ===

/// Requests whose framing today's HTTP/1 server (hyper) refuses before Tether sees them:
/// 400, and nothing reaches the backend. Also the input of
/// `every_refused_head_carries_tether_error`.
const FRAMING_400: &[(&str, &[u8])] = &[
    // Section 6.3 item 5: differing Content-Length values are unrecoverable.
    ("differing Content-Length", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
    ("Content-Length list", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\n\r\nabcd"),
    // RFC 9110 section 8.6: Content-Length = 1*DIGIT.
    ("Content-Length with +", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc"),
    ("negative Content-Length", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\nabc"),
    ("Content-Length with inner space", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1 3\r\n\r\nabc"),
    ("hex Content-Length", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x3\r\n\r\nabc"),
    ("empty Content-Length", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\nabc"),
    (
        "overflowing Content-Length",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\nabc",
    ),
    // Section 6.3 item 4: a request whose final coding is not chunked is a 400.
    ("Transfer-Encoding: gzip", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    (
        "Transfer-Encoding: chunked, gzip",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ),
    (
        "Transfer-Encoding: identity",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ),
    (
        "Transfer-Encoding: chunked;q=1",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked;q=1\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ),
    ("empty Transfer-Encoding", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    (
        "Transfer-Encoding with a vertical tab",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \x0bchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ),
    (
        "chunked then gzip on two lines",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ),
    (
        "Transfer-Encoding with a space before the colon",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ),
    (
        "Content-Length and Transfer-Encoding: gzip",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    ),
    // Section 6.1: HTTP/1.0 has no Transfer-Encoding; a 1.0 message with one is faulty.
    ("HTTP/1.0 chunked", b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
];

#[tokio::test]
async fn malformed_framing_is_a_400_and_reaches_no_backend() {
    let b = RecordingBackend::start(OK).await;
    let t = start(&b, "");
    for (name, bytes) in FRAMING_400 {
        assert_refused(&t, &b, name, bytes, 400, None).await;
    }
    // The same Tether forwards a good request: the refusals were about the requests.
    assert_forwarded(&t, &b, "control", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc").await;
}

#[tokio::test]
async fn identical_repeated_content_lengths_are_one() {
    // Accepted, not refused: RFC 9110 section 8.6 lets a recipient take identical repeated
    // values as one, and only differing ones make the framing ambiguous (RFC 9112 section
    // 6.3 item 5). The backend gets one Content-Length and exactly the body.
    let b = RecordingBackend::start(OK).await;
    let t = start(&b, "");
    let req = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc";
    let got = assert_forwarded(&t, &b, "identical Content-Length", req).await;
    assert_eq!(got.header("content-length"), ["3"], "{got:?}");
    assert_eq!(got.body, b"abc");
}

#[tokio::test]
async fn content_length_and_chunked_are_framed_by_chunked_and_the_connection_closed() {
    // RFC 9112 section 6.3 item 3: Transfer-Encoding overrides Content-Length; a server
    // may reject the request or frame it by Transfer-Encoding and close the connection
    // after responding. Either way, what follows the chunked body (here a request the
    // Content-Length would have hidden in the body, and one after it) never reaches the
    // backend as a request.
    let b = RecordingBackend::start(OK).await;
    let t = start(&b, "");
    let req = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let (r, mut s, buf) = exchange(t.addr(), req).await;
    let rest = rest_until_closed(&mut s, buf).await;
    assert!(rest.is_empty(), "a second response: {}", show(&rest));
    let requests = b.requests();
    match r.status {
        400 => assert_eq!(received(&b), 0, "{}", show(&b.connections()[0].bytes)),
        200 => {
            assert_eq!(requests.len(), 1, "{requests:?}");
            assert_eq!(requests[0].body, b"abc");
            assert!(requests[0].header("content-length").iter().all(|n| n == "3"), "{requests:?}");
        }
        _ => panic!("{r:?}"),
    }
    assert_backend_clean(&b);
}

#[tokio::test]
async fn transfer_codings_other_than_chunked_are_not_implemented() {
    // The final coding is chunked, so the framing is sound, but Tether forwards only
    // chunked: another coding would be lost on the way (the backend would take gzip data
    // for the body). RFC 9112 section 6.1: 501. `chunked` twice is malformed (section 7:
    // a sender MUST NOT apply chunked more than once): 400. Both close the connection.
    let b = RecordingBackend::start(OK).await;
    let t = start(&b, "");
    // After a refused request nothing more on its connection is read, not even what
    // would follow the body.
    let body = "3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    for (te, status, label) in [
        ("gzip, chunked", 501, "transfer-coding-unsupported"),
        ("deflate,chunked", 501, "transfer-coding-unsupported"),
        ("chunked, chunked", 400, "bad-request"),
    ] {
        let req = format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {te}\r\n\r\n{body}");
        assert_refused(&t, &b, te, req.as_bytes(), status, Some(label)).await;
    }
    // Whitespace around the coding, its case and empty list elements are allowed.
    for te in ["  chunked", "CHUNKED", ", chunked"] {
        let req = format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {te}\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
        let got = assert_forwarded(&t, &b, te, req.as_bytes()).await;
        assert_eq!(got.body, b"abc", "{te}");
    }
}

// === chunked bodies (RFC 9112 section 7) ===

#[tokio::test]
async fn bad_chunk_sizes_are_a_400_and_no_request_reaches_the_backend() {
    let b = RecordingBackend::start(OK).await;
    let t = start(&b, "");
    for (name, chunks) in [
        ("non-hex", "zz\r\nabc\r\n0\r\n\r\n"),
        ("overflowing", "fffffffffffffffff1\r\nabc\r\n0\r\n\r\n"),
        ("negative", "-3\r\nabc\r\n0\r\n\r\n"),
        ("0x prefix", "0x3\r\nabc\r\n0\r\n\r\n"),
        ("data longer than its size", "3\r\nabcX\r\n0\r\n\r\n"),
        ("bare LF in chunk lines", "3\nabc\n0\n\n"),
    ] {
        let req = format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n");
        let (r, mut s, buf) = exchange(t.addr(), req.as_bytes()).await;
        assert_eq!(r.status, 400, "{name}: {r:?}");
        assert_eq!(r.header("tether-error"), ["bad-request-body"], "{name}: {r:?}");
        let rest = rest_until_closed(&mut s, buf).await;
        assert!(rest.is_empty(), "{name}: {}", show(&rest));
        // The head may have gone out before the body failed; no request was completed,
        // and that backend connection is closed, never used again.
        assert!(b.requests().is_empty(), "{name}: {:?}", b.requests());
        b.wait_all_closed().await;
        assert_backend_clean(&b);
    }
}

#[tokio::test]
async fn chunk_extensions_and_trailers_never_break_the_framing() {
    // Extensions may be forwarded or dropped, trailers likewise; the backend gets the
    // exact body in valid framing and no request made of either.
    let b = RecordingBackend::start(OK).await;
    let t = start(&b, "");
    for (name, chunks) in [
        ("extensions", "3;name=\"v\\\"al\";flag\r\nabc\r\n2;x=1\r\nde\r\n0;last\r\n\r\n"),
        ("trailers", "3\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\nGET: /smuggled\r\n\r\n"),
        ("extension looking like a request", "5;GET /smuggled HTTP/1.1\r\nabcde\r\n0\r\n\r\n"),
    ] {
        let req = format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}");
        let got = assert_forwarded(&t, &b, name, req.as_bytes()).await;
        assert_eq!(got.body, b"abcde", "{name}");
    }
}

#[tokio::test]
async fn a_chunked_body_malformed_half_way_is_a_400_and_closes_the_backend_connection() {
    // The head and a first chunk have reached the backend when the body turns out to be
    // malformed: the client gets 400 (it was its body), and the backend connection, which
    // holds half a request, is closed rather than reused.
    let b = RecordingBackend::start(OK).await;
    let t = start(&b, "");
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n").await.unwrap();
    wait_until("the first chunk reached the backend", WAIT, || {
        b.connections().iter().any(|c| c.bytes.windows(5).any(|w| w == b"hello"))
    })
    .await;
    s.write_all(b"zz\r\nworld\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let r = read_reply(&mut s, &mut buf).await.expect("a response");
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.header("tether-error"), ["bad-request-body"], "{r:?}");
    let rest = rest_until_closed(&mut s, buf).await;
    assert!(rest.is_empty(), "{}", show(&rest));
    b.wait_all_closed().await;
    assert!(b.requests().is_empty(), "{:?}", b.requests());
    assert_eq!(b.connections().len(), 1);
    assert_backend_clean(&b);
    // A new request gets a new backend connection.
    assert_forwarded(&t, &b, "after", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(b.connections().len(), 2);
}

// === the request head (RFC 9112 sections 2 to 5) ===

/// Heads refused with 400 (by hyper itself on its path). Also the input of
/// `every_refused_head_carries_tether_error`.
const HEAD_400: &[(&str, &[u8])] = &[
    // Section 2.2: a bare CR is rejected (or replaced with SP).
    ("bare CR", b"GET / HTTP/1.1\r\nHost: x\rX-A: 1\r\n\r\n"),
    // Section 5.2: obs-fold is rejected with 400 (or replaced with SP).
    ("obs-fold with space", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n 2\r\n\r\n"),
    ("obs-fold with tab", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\tTransfer-Encoding: chunked\r\n\r\n"),
    // Section 2.2: whitespace between the start line and the first field.
    ("space before the first field", b"GET / HTTP/1.1\r\n Host: x\r\n\r\n"),
    // RFC 9110 section 5.5: no CTL but HTAB in a value; names are tokens.
    ("NUL in a value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"),
    ("DEL in a value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n"),
    ("SOH in a value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n"),
    ("ESC in a value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x1bb\r\n\r\n"),
    ("NUL in a name", b"GET / HTTP/1.1\r\nHost: x\r\nX-\x00A: ab\r\n\r\n"),
    ("DEL in a name", b"GET / HTTP/1.1\r\nHost: x\r\nX-\x7fA: ab\r\n\r\n"),
    ("SOH in a name", b"GET / HTTP/1.1\r\nHost: x\r\nX-\x01A: ab\r\n\r\n"),
    // Section 5.1: whitespace between a field name and the colon MUST be a 400.
    ("space before the colon", b"GET / HTTP/1.1\r\nHost: x\r\nX-A : ab\r\n\r\n"),
    ("tab before the colon", b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length\t: 3\r\n\r\nabc"),
    ("line without a colon", b"GET / HTTP/1.1\r\nHost: x\r\nX-A ab\r\n\r\n"),
    // RFC 9110 section 9.1: a method is a token.
    ("method with a parenthesis", b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("method with NUL", b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("method with DEL", b"GE\x7fT / HTTP/1.1\r\nHost: x\r\n\r\n"),
    // Section 3: one SP between the parts of the request line, none inside the target.
    ("space in the target", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("two spaces after the method", b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("NUL in the target", b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("no version", b"GET /\r\nHost: x\r\n\r\n"),
];

#[tokio::test]
async fn malformed_heads_are_a_400_and_reach_no_backend() {
    let b = RecordingBackend::start(OK).await;
    let t = start(&b, "");
    for (name, bytes) in HEAD_400 {
        assert_refused(&t, &b, name, bytes, 400, None).await;
    }
    assert_forwarded(&t, &b, "control", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
}

#[tokio::test]
async fn field_values_with_tabs_and_token_methods_are_forwarded_as_sent() {
    let b = RecordingBackend::start(OK).await;
    let t = start(&b, "");
    let got = assert_forwarded(&t, &b, "tab", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\tb\r\n\r\n").await;
    assert_eq!(got.header("x-a"), ["a\tb"], "{got:?}");
    // Methods are case-sensitive tokens: `get` is another method than `GET`, not an error.
    let got = assert_forwarded(&t, &b, "lower-case method", b"get / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(got.line(), "get / HTTP/1.1");
}

#[tokio::test]
async fn bare_lf_line_ends_are_refused_or_read_as_crlf() {
    // RFC 9112 section 2.2: a recipient MAY take a bare LF as a line end. Either way the
    // backend gets CRLF lines and the fields the client meant, never a field that hides
    // another (`Host: x\nX-A: 1` is two fields, not a Host with an LF in it).
    let b = RecordingBackend::start(OK).await;
    let t = start(&b, "");
    for (name, bytes) in [
        ("bare LF everywhere", &b"GET / HTTP/1.1\nHost: x\nX-A: 1\n\n"[..]),
        ("bare LF in one line", &b"GET / HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n"[..]),
    ] {
        let before = b.requests().len();
        let (r, _, _) = exchange(t.addr(), bytes).await;
        match r.status {
            400 => assert_eq!(b.requests().len(), before, "{name}"),
            200 => {
                let requests = b.requests();
                assert_eq!(requests.len(), before + 1, "{name}");
                let got = &requests[before];
                assert_eq!((got.header("host"), got.header("x-a")), (vec!["x".to_string()], vec!["1".to_string()]));
            }
            _ => panic!("{name}: {r:?}"),
        }
        assert_backend_clean(&b);
    }
}

#[tokio::test]
async fn request_targets_in_every_form() {
    // RFC 9112 section 3.2.
    let b = RecordingBackend::start(OK).await;
    let t = start(&b, "");
    // Origin form.
    let got = assert_forwarded(&t, &b, "origin", b"GET /p?q=1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(got.line(), "GET /p?q=1 HTTP/1.1");
    // Absolute form: the target's authority is the host, whatever Host says (3.2.2), and
    // the backend gets the origin form.
    let got =
        assert_forwarded(&t, &b, "absolute", b"GET http://abs.example/p?q=1 HTTP/1.1\r\nHost: other\r\n\r\n").await;
    assert_eq!(got.line(), "GET /p?q=1 HTTP/1.1");
    assert_eq!(got.header("host"), ["abs.example"], "{got:?}");
    // Asterisk form, only for OPTIONS (3.2.4): forwarded as it is.
    let got = assert_forwarded(&t, &b, "asterisk", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(got.line(), "OPTIONS * HTTP/1.1");
    assert_refused(&t, &b, "GET *", b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400, Some("bad-request")).await;
    // Authority form, only for CONNECT (3.2.3), which a reverse proxy refuses.
    let connect = b"CONNECT abs.example:443 HTTP/1.1\r\nHost: abs.example:443\r\n\r\n";
    assert_refused(&t, &b, "CONNECT", connect, 405, Some("connect-unsupported")).await;
    let get = b"GET abs.example:443 HTTP/1.1\r\nHost: abs.example:443\r\n\r\n";
    assert_refused(&t, &b, "GET in authority form", get, 400, Some("bad-request")).await;
}

#[tokio::test]
async fn host_rules() {
    // RFC 9112 section 3.2: an HTTP/1.1 request without Host, or with more than one (even
    // the same twice), is a 400.
    let b = RecordingBackend::start(OK).await;
    let t = start(&b, "");
    for (name, bytes) in [
        ("no Host", &b"GET / HTTP/1.1\r\n\r\n"[..]),
        ("two Hosts", b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
        ("the same Host twice", b"GET / HTTP/1.1\r\nHost: x\r\nHost: x\r\n\r\n"),
        ("a Host list", b"GET / HTTP/1.1\r\nHost: x, y\r\n\r\n"),
    ] {
        assert_refused(&t, &b, name, bytes, 400, Some("bad-request")).await;
    }
    // HTTP/1.0 may leave Host out; the backend still gets valid HTTP/1.1, which has
    // exactly one Host.
    let got = assert_forwarded(&t, &b, "HTTP/1.0 without Host", b"GET /p HTTP/1.0\r\n\r\n").await;
    assert_eq!(got.line(), "GET /p HTTP/1.1");
    assert_eq!(got.header("host").len(), 1, "{got:?}");
}

// === limits ===

#[tokio::test]
async fn heads_over_max_request_head_are_a_431() {
    let b = RecordingBackend::start(OK).await;
    // The default (64 KiB). Each head is 36 bytes and its padding.
    let max = tether::config::Limits::default().max_request_head as usize;
    let t = start(&b, "");
    let head = |pad: usize| format!("GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n", "a".repeat(pad));
    assert_refused(&t, &b, "a head over the default", head(max).as_bytes(), 431, None).await;
    assert_forwarded(&t, &b, "a head at the default", head(max - 36).as_bytes()).await;
    // A configured limit.
    let t = start(&b, "[limits]\nmax_request_head = 4096\n");
    assert_refused(&t, &b, "5000 byte head", head(5000).as_bytes(), 431, None).await;
    assert_forwarded(&t, &b, "3000 byte head", head(3000).as_bytes()).await;
}

#[tokio::test]
async fn targets_over_max_request_target_are_a_414() {
    let b = RecordingBackend::start(OK).await;
    let target = |len: usize| format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(len - 1));
    // The default.
    let max = tether::config::Limits::default().max_request_target as usize;
    let t = start(&b, "");
    assert_refused(&t, &b, "a target over the default", target(max + 1).as_bytes(), 414, Some("target-too-long")).await;
    assert_forwarded(&t, &b, "a target at the default", target(max).as_bytes()).await;
    // A configured limit, in any form of target.
    let t = start(&b, "[limits]\nmax_request_target = 100\n");
    assert_refused(&t, &b, "101 byte target", target(101).as_bytes(), 414, Some("target-too-long")).await;
    let absolute = format!("GET http://x/{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100));
    assert_refused(&t, &b, "long absolute target", absolute.as_bytes(), 414, Some("target-too-long")).await;
    assert_forwarded(&t, &b, "100 byte target", target(100).as_bytes()).await;
}

#[tokio::test]
async fn bodies_over_max_request_body_are_a_413() {
    let b = RecordingBackend::start(OK).await;
    let t = start(&b, "[limits]\nmax_request_body = 10\n");
    // By Content-Length: refused from the head alone, before any of it is sent on (the
    // client has not even sent the body).
    let head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n";
    assert_refused(&t, &b, "Content-Length over the limit", head, 413, Some("body-too-large")).await;
    let got =
        assert_forwarded(&t, &b, "at the limit", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789")
            .await;
    assert_eq!(got.body, b"0123456789");
    let got = assert_forwarded(
        &t,
        &b,
        "chunked at the limit",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n01234\r\n5\r\n56789\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(got.body, b"0123456789");
    // Chunked: as soon as the limit is passed, before the body ends; the backend
    // connection, which has half a request, is closed.
    let b = RecordingBackend::start(OK).await;
    let t = start(&b, "[limits]\nmax_request_body = 10\n");
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n01234567\r\n").await.unwrap();
    wait_until("the first chunk reached the backend", WAIT, || {
        b.connections().iter().any(|c| c.bytes.windows(8).any(|w| w == b"01234567"))
    })
    .await;
    s.write_all(b"8\r\n89abcdef\r\n").await.unwrap();
    let mut buf = Vec::new();
    let r = read_reply(&mut s, &mut buf).await.expect("a response before the body ended");
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.header("tether-error"), ["body-too-large"], "{r:?}");
    let rest = rest_until_closed(&mut s, buf).await;
    assert!(rest.is_empty(), "{}", show(&rest));
    b.wait_all_closed().await;
    assert!(b.requests().is_empty(), "{:?}", b.requests());
    let sent = show(&b.connections()[0].bytes);
    assert!(!sent.contains("89abcdef"), "the piece over the limit went on: {sent}");
    assert_backend_clean(&b);
}

// === responses (RFC 9112 section 6.3, the backend's side) ===

/// Sends one GET through a Tether in front of a backend that answers `response` and then
/// closes its connection.
async fn through(response: &[u8]) -> (Reply, TcpStream, Vec<u8>, Tether, RecordingBackend) {
    let b = RecordingBackend::start_with(response, true).await;
    let t = start(&b, "");
    let (r, s, buf) = exchange(t.addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    (r, s, buf, t, b)
}

#[tokio::test]
async fn malformed_responses_are_a_502() {
    for (name, response) in [
        ("bad status code", &b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok"[..]),
        ("not HTTP", b"hello there\r\n\r\n"),
        ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\nContent-Length: 2\r\n\r\nok"),
        ("NUL in a value", b"HTTP/1.1 200 OK\r\nX-A: 1\x002\r\nContent-Length: 2\r\n\r\nok"),
        ("space before the colon", b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok"),
        ("differing Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"),
        ("Content-Length with +", b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok"),
    ] {
        let (r, _, _, _t, _b) = through(response).await;
        assert_eq!(r.status, 502, "{name}: {r:?}");
        assert_eq!(r.header("tether-error"), ["backend-error"], "{name}: {r:?}");
    }
}

#[tokio::test]
async fn a_response_with_chunked_and_content_length_is_framed_by_chunked() {
    // The Content-Length (50) is wrong; a client that read it would wait for 48 more
    // bytes, or take the next response for them.
    let (r, mut s, mut buf, _t, _b) =
        through(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
            .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header("content-length").is_empty(), "the client got the backend's Content-Length: {r:?}");
    assert_eq!(r.body, b"ok");
    // The client's connection is still framed right: the next response reads cleanly.
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let r = read_reply(&mut s, &mut buf).await.expect("a second response");
    assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]), "{r:?}");
}

#[tokio::test]
async fn a_response_whose_codings_do_not_end_in_chunked_is_delimited_by_the_close() {
    // RFC 9112 section 6.3 item 4: the backend's body runs until it closes. The client
    // gets all of it, framed so that its connection stays in step (here: chunked, or a
    // close), and told which codings the body still carries.
    for (te, kept) in [("gzip", "gzip"), ("chunked, gzip", "chunked, gzip")] {
        let response = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\nthe whole body, until the close");
        let (r, mut s, mut buf, _t, _b) = through(response.as_bytes()).await;
        assert_eq!(r.status, 200, "{te}: {r:?}");
        assert_eq!(show(&r.body), "the whole body, until the close", "{te}: {r:?}");
        assert!(r.header("content-length").is_empty(), "{te}: {r:?}");
        let codings = r.header("transfer-encoding").join(", ");
        assert!(codings == kept || codings == format!("{kept}, chunked"), "{te}: {r:?}");
        if codings.ends_with("chunked") {
            // Still in step: a second request gets a clean second response.
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
            let r = read_reply(&mut s, &mut buf).await.expect("a second response");
            assert_eq!(show(&r.body), "the whole body, until the close", "{te}: {r:?}");
        }
    }
}

#[tokio::test]
async fn identical_repeated_content_lengths_in_a_response_are_one() {
    let (r, _, _, _t, _b) = through(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok").await;
    assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]), "{r:?}");
    assert_eq!(r.header("content-length"), ["2"], "{r:?}");
}

// === what hyper's HTTP/1 server could not do ===

/// hyper's HTTP/1 server, which Tether used before its own codec, answered these parse
/// errors itself (its `Server::on_error` wrote a bare status with no way to add a header).
#[tokio::test]
async fn every_refused_head_carries_tether_error() {
    let b = RecordingBackend::start(OK).await;
    let cfg = pool_of(&[("app-1", b.addr)], "", "[limits]\nmax_request_head = 4096\n");
    let t = Tether::start(&cfg);
    let long_head = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n", "a".repeat(5000));
    let cases = FRAMING_400.iter().chain(HEAD_400).map(|(name, bytes)| (*name, bytes.to_vec(), 400));
    for (name, bytes, status) in cases.chain([("long head", long_head.into_bytes(), 431)]) {
        let (r, _, _) = exchange(t.addr(), &bytes).await;
        assert_eq!(r.status, status, "{name}: {r:?}");
        assert_eq!(r.header("tether-error").len(), 1, "{name}: no Tether-Error: {r:?}");
    }
    assert_eq!(received(&b), 0);
}

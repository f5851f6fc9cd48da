//! The backend side of a request that arrives as an `http::Request` (HTTP/2 from
//! clients), on the native path's sockets and codec: the same idle stacks
//! (`Upstream::take_native`), the same response parser (`h1::response`) and chunked
//! decoder, so a backend sees one HTTP/1.1 client whatever protocol its clients speak.
//!
//! - [`write_head`] writes the backend's request head from the request's (already
//!   rewritten) header map, with Tether's framing ([`Framing`]): a body of known length
//!   gets `Content-Length`, any other body is sent chunked.
//! - [`Upload`] sends the head and then streams the client's body, polled beside the wait
//!   for the response head ([`poll_exchange`]) and, when the backend answers before it has
//!   the whole body, beside the response body, as the native HTTP/1 path does.
//! - [`Backside`] is the connection once the response head is in: it turns the response
//!   body into frames (by length, chunked, or until the backend closes) and gives the
//!   socket back to its worker's idle stack when the response was read exactly to its end
//!   after a request sent whole.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::native::buffers::{Buf, Work};
use super::native::conn::{poll_response_head, ReadFail};
use super::native::head::line;
use crate::h1::chunked::Decoder;
use crate::h1::response::{self, ResponseHead};
use crate::h1::Known;
use crate::upstream::{BackendConn, RequestBody, Upstream};

/// How a request body goes to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body, and nothing said about one.
    None,
    Length(u64),
    Chunked,
}

impl Framing {
    /// The framing of `body`: its exact length when the client said it (`Content-Length`,
    /// which hyper and h2 hold the body to), chunked otherwise. An empty body of a method
    /// that usually carries one, or one the client gave a length of 0, is `Length(0)`, so
    /// a backend does not wait for a body that will not come.
    pub fn of(method: &Method, headers: &HeaderMap, body: &impl Body) -> Framing {
        if body.is_end_stream() {
            let says_empty = headers.contains_key(header::CONTENT_LENGTH)
                || matches!(*method, Method::POST | Method::PUT | Method::PATCH);
            return if says_empty { Framing::Length(0) } else { Framing::None };
        }
        match body.size_hint().exact() {
            Some(n) => Framing::Length(n),
            None => Framing::Chunked,
        }
    }
}

/// Writes the backend's request head: the method, the origin-form target, HTTP/1.1, every
/// field of `headers` but the framing ones (Tether writes its own, from `framing`).
/// `headers` has been through `rewrite::request`: no hop-by-hop field is left, and a
/// `HeaderValue` holds no CR, LF or NUL, so nothing here can split the head.
pub fn write_head(out: &mut Vec<u8>, method: &Method, target: &str, headers: &HeaderMap, framing: Framing) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(if target.is_empty() { b"/" } else { target.as_bytes() });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            super::native::head::put_u64(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => line(out, b"transfer-encoding", b"chunked"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Why sending the request body stopped.
#[derive(Debug)]
pub enum UploadError {
    /// The client's body failed (see its `BodyState` for how): the client's fault.
    Client,
    /// Writing to the backend failed.
    Backend(io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpState {
    /// Sending the body's frames as they come.
    Body,
    /// The body has ended; what is pending is the last of it.
    Last,
    Done,
}

/// The request as it goes to the backend: its head, then its body, written as the
/// client sends it.
#[derive(Debug)]
pub struct Upload {
    body: RequestBody,
    chunked: bool,
    /// Bytes to write before the next frame is asked for.
    pending: Vec<u8>,
    at: usize,
    state: UpState,
    /// A frame of the body has been taken: the request can no longer be sent again.
    touched: bool,
}

impl Upload {
    pub fn new(body: RequestBody, framing: Framing) -> Upload {
        let state = if body.is_end_stream() { UpState::Last } else { UpState::Body };
        let chunked = framing == Framing::Chunked;
        Upload { body, chunked, pending: Vec::new(), at: 0, state, touched: false }
    }

    /// Starts (or starts again, on a fresh connection) with `head`. Only an upload that
    /// has taken nothing of its body yet may start again.
    pub fn begin(&mut self, head: &[u8]) {
        debug_assert!(!self.touched);
        self.pending.clear();
        self.pending.extend_from_slice(head);
        self.at = 0;
        if self.state == UpState::Done {
            self.state = UpState::Last;
        }
        if self.state == UpState::Last && self.chunked {
            self.pending.extend_from_slice(b"0\r\n\r\n");
        }
    }

    /// Something of the client's body has gone: the request cannot be sent again.
    pub fn touched(&self) -> bool {
        self.touched
    }

    /// The head and the whole body have been written.
    pub fn is_done(&self) -> bool {
        self.state == UpState::Done
    }

    /// Writes what is pending and takes the body's next frames while the backend takes
    /// them: `Ready(Ok)` once everything is written.
    pub fn poll(&mut self, cx: &mut Context<'_>, conn: &mut BackendConn) -> Poll<Result<(), UploadError>> {
        loop {
            while self.at < self.pending.len() {
                match ready!(Pin::new(&mut *conn).poll_write(cx, &self.pending[self.at..])) {
                    Ok(0) => return Poll::Ready(Err(UploadError::Backend(io::ErrorKind::WriteZero.into()))),
                    Ok(n) => self.at += n,
                    Err(e) => return Poll::Ready(Err(UploadError::Backend(e))),
                }
            }
            // Over TLS, records may still wait in the TLS state after a write met a full socket.
            if let Err(e) = ready!(Pin::new(&mut *conn).poll_flush(cx)) {
                return Poll::Ready(Err(UploadError::Backend(e)));
            }
            self.pending.clear();
            self.at = 0;
            match self.state {
                UpState::Done => return Poll::Ready(Ok(())),
                UpState::Last => {
                    self.state = UpState::Done;
                    continue;
                }
                UpState::Body => {}
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => {
                    self.state = UpState::Last;
                    if self.chunked {
                        self.pending.extend_from_slice(b"0\r\n\r\n");
                    }
                }
                Some(Err(_)) => return Poll::Ready(Err(UploadError::Client)),
                Some(Ok(frame)) => {
                    self.touched = true;
                    // Trailers have no place in a body framed by length, and an HTTP/1
                    // backend rarely reads them: they are not forwarded.
                    let Ok(data) = frame.into_data() else { continue };
                    if data.is_empty() {
                        continue;
                    }
                    if self.chunked {
                        put_hex(&mut self.pending, data.len());
                        self.pending.extend_from_slice(b"\r\n");
                        self.pending.extend_from_slice(&data);
                        self.pending.extend_from_slice(b"\r\n");
                    } else {
                        self.pending.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// Appends `n` in lower-case hex (a chunk size), without formatting machinery.
fn put_hex(out: &mut Vec<u8>, n: usize) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(n >> (i * 4)) & 0xf]);
    }
}

/// Why no response head came.
#[derive(Debug)]
pub enum HeadFail {
    Upload(UploadError),
    Read(ReadFail),
}

impl HeadFail {
    pub fn describe(&self) -> String {
        match self {
            HeadFail::Upload(UploadError::Client) => "the client's request body failed".into(),
            HeadFail::Upload(UploadError::Backend(e)) => format!("writing the request failed: {e}"),
            HeadFail::Read(r) => r.describe().into(),
        }
    }

    /// The connection was found closed: on a pooled connection before anything of the
    /// request was taken, the request goes again on a fresh one.
    pub fn is_stale(&self) -> bool {
        matches!(self, HeadFail::Upload(UploadError::Backend(_)) | HeadFail::Read(ReadFail::Closed | ReadFail::Io))
    }
}

/// Sends the request and reads the response head, both at once: a backend may answer
/// before it has read the whole body.
pub fn poll_exchange(
    cx: &mut Context<'_>,
    conn: &mut BackendConn,
    upload: &mut Upload,
    rbuf: &mut Buf,
    head: &mut ResponseHead,
    max_head: usize,
    is_head: bool,
) -> Poll<Result<(), HeadFail>> {
    if !upload.is_done() {
        if let Poll::Ready(Err(e)) = upload.poll(cx, conn) {
            return Poll::Ready(Err(HeadFail::Upload(e)));
        }
    }
    poll_response_head(cx, conn, rbuf, head, max_head, is_head).map_err(HeadFail::Read)
}

/// How much of the response body is still to come.
#[derive(Debug)]
enum Rest {
    Length(u64),
    Chunked(Decoder),
    UntilClose,
    Ended,
}

/// A backend connection whose response head has been read.
#[derive(Debug)]
pub struct Backside {
    pub conn: BackendConn,
    /// The response head (in `work.response`), and the bytes read after it in `rbuf`.
    pub work: Work,
    pub rbuf: Buf,
    pub upload: Upload,
    rest: Rest,
    /// The backend's connections, where `conn` goes back when its response is read to the
    /// end; `None`: it is closed then (it began with a PROXY protocol header for one
    /// client).
    upstream: Option<Arc<Upstream>>,
}

impl Backside {
    pub fn new(
        conn: BackendConn,
        work: Work,
        mut rbuf: Buf,
        upload: Upload,
        upstream: Option<Arc<Upstream>>,
    ) -> Backside {
        let head = &work.response;
        rbuf.start += head.len;
        let rest = match head.body {
            response::Body::None => Rest::Ended,
            response::Body::Length(0) => Rest::Ended,
            response::Body::Length(n) => Rest::Length(n),
            response::Body::Chunked => Rest::Chunked(Decoder::new()),
            response::Body::UntilClose => Rest::UntilClose,
        };
        Backside { conn, work, rbuf, upload, rest, upstream }
    }

    /// The client's response head (see [`client_head`]).
    pub fn response_head(&self, client: Version) -> Option<http::Response<()>> {
        client_head(self.rbuf.bytes(), &self.work.response, client)
    }

    /// The body has no more to give.
    pub fn is_end(&self) -> bool {
        matches!(self.rest, Rest::Ended)
    }

    /// Bytes of the body still to come, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self.rest {
            Rest::Length(n) => Some(n),
            Rest::Ended => Some(0),
            _ => None,
        }
    }

    /// The next piece of the body (`Ok(None)` at its end), keeping the upload going.
    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, &'static str>> {
        if !self.upload.is_done() {
            if let Poll::Ready(Err(e)) = self.upload.poll(cx, &mut self.conn) {
                return Poll::Ready(Err(match e {
                    UploadError::Client => "bad-request-body",
                    UploadError::Backend(_) => "backend-body-error",
                }));
            }
        }
        loop {
            match &mut self.rest {
                Rest::Ended => return Poll::Ready(Ok(None)),
                Rest::Length(left) => {
                    if !self.rbuf.filled().is_empty() {
                        let have = self.rbuf.filled();
                        let n = have.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                        let piece = Bytes::copy_from_slice(&have[..n]);
                        self.rbuf.start += n;
                        *left -= n as u64;
                        if *left == 0 {
                            self.rest = Rest::Ended;
                        }
                        return Poll::Ready(Ok(Some(piece)));
                    }
                }
                Rest::Chunked(decoder) => {
                    let mut piece = None;
                    while !self.rbuf.filled().is_empty() && !decoder.is_done() && piece.is_none() {
                        let have = self.rbuf.filled();
                        let step = decoder.step(have).map_err(|_| "backend-body-error")?;
                        if !step.data.is_empty() {
                            piece = Some(Bytes::copy_from_slice(&have[step.data.clone()]));
                        }
                        self.rbuf.start += step.consumed;
                    }
                    if decoder.is_done() {
                        self.rest = Rest::Ended;
                    }
                    if piece.is_some() {
                        return Poll::Ready(Ok(piece));
                    }
                    if matches!(self.rest, Rest::Ended) {
                        continue;
                    }
                }
                Rest::UntilClose => {
                    if !self.rbuf.filled().is_empty() {
                        let piece = Bytes::copy_from_slice(self.rbuf.filled());
                        self.rbuf.clear();
                        return Poll::Ready(Ok(Some(piece)));
                    }
                }
            }
            // Nothing buffered: read more.
            self.rbuf.clear();
            let mut read = ReadBuf::new(self.rbuf.spare());
            match ready!(Pin::new(&mut self.conn).poll_read(cx, &mut read)) {
                Ok(()) if read.filled().is_empty() => {
                    if matches!(self.rest, Rest::UntilClose) {
                        self.rest = Rest::Ended;
                        return Poll::Ready(Ok(None));
                    }
                    return Poll::Ready(Err("backend-body-error"));
                }
                Ok(()) => self.rbuf.end += read.filled().len(),
                Err(_) => return Poll::Ready(Err("backend-body-error")),
            }
        }
    }

    /// Gives the connection back to its worker's idle stack when it is in step: the
    /// response read exactly to its end, after the request went whole, and the backend
    /// keeps it open. Anything else closes it.
    pub fn settle(self) {
        let reusable = matches!(self.rest, Rest::Ended)
            && self.upload.is_done()
            && self.rbuf.filled().is_empty()
            && self.work.response.keep_alive
            && self.work.response.body != response::Body::UntilClose;
        if let (true, Some(upstream)) = (reusable, self.upstream) {
            upstream.put_back(self.conn);
        }
    }
}

/// The client's response head: the backend's status and fields, without hop-by-hop
/// fields (and those `Connection` names) and with the framing the body now has. For an
/// HTTP/1 client (`client` below HTTP/2), transfer codings other than a final `chunked`
/// are passed on; HTTP/2 has no transfer codings. `None` for a status `http` cannot
/// hold.
pub fn client_head(data: &[u8], head: &ResponseHead, client: Version) -> Option<http::Response<()>> {
    let mut r = http::Response::new(());
    *r.status_mut() = StatusCode::from_u16(head.status).ok()?;
    let upgrade = head.status == 101;
    let named: Vec<&[u8]> = head
        .fields
        .values(data, Known::Connection)
        .flat_map(|v| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .collect();
    let headers = r.headers_mut();
    headers.reserve(head.fields.len());
    for f in head.fields.iter() {
        let keep = match f.known {
            Known::Upgrade => upgrade,
            Known::ContentLength => !head.drop_length && !matches!(head.body, response::Body::Length(_)),
            k => !k.is_hop_by_hop(),
        };
        let name = f.name.of(data);
        if !keep || named.iter().any(|n| n.eq_ignore_ascii_case(name)) && f.known != Known::Upgrade {
            continue;
        }
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(f.value.of(data))) else {
            continue;
        };
        headers.append(name, value);
    }
    if let response::Body::Length(n) = head.body {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if client < Version::HTTP_2 {
        if let Some(codings) = unapplied_codings(data, head) {
            headers.insert(header::TRANSFER_ENCODING, codings);
        }
    }
    Some(r)
}

/// The transfer codings of a response still applied to the body after Tether has taken
/// off a final `chunked` (`None` when there are none).
fn unapplied_codings(data: &[u8], head: &ResponseHead) -> Option<HeaderValue> {
    let mut codings: Vec<&[u8]> = head
        .fields
        .values(data, Known::TransferEncoding)
        .flat_map(|v| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty())
        .collect();
    if codings.last().is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")) {
        codings.pop();
    }
    if codings.is_empty() {
        return None;
    }
    HeaderValue::from_bytes(&codings.join(&b", "[..])).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: Method, target: &str, fields: &[(&str, &str)], framing: Framing) -> String {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        let mut out = Vec::new();
        write_head(&mut out, &method, target, &h, framing);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn heads_carry_tethers_framing_only() {
        let h = head(
            Method::POST,
            "/a?b=1",
            &[("host", "x"), ("content-length", "99"), ("transfer-encoding", "gzip"), ("cookie", "a=1")],
            Framing::Length(5),
        );
        assert_eq!(h, "POST /a?b=1 HTTP/1.1\r\nhost: x\r\ncookie: a=1\r\ncontent-length: 5\r\n\r\n");
        let h = head(Method::PUT, "/", &[("host", "x")], Framing::Chunked);
        assert_eq!(h, "PUT / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n");
        let h = head(Method::GET, "", &[("host", "x"), ("a", "1"), ("a", "2")], Framing::None);
        assert_eq!(h, "GET / HTTP/1.1\r\nhost: x\r\na: 1\r\na: 2\r\n\r\n");
        // Every head written parses back as one request with that framing.
        let parsed = crate::h1::request::parse(h.as_bytes(), &Default::default()).unwrap().unwrap();
        assert_eq!(parsed.len, h.len());
    }

    #[test]
    fn chunk_sizes_are_hex() {
        for n in [0usize, 1, 9, 10, 15, 16, 255, 256, 16384, 0xdead_beef, usize::MAX] {
            let mut out = Vec::new();
            put_hex(&mut out, n);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{n:x}"));
        }
    }

    #[test]
    fn framing_follows_what_the_body_says() {
        use http_body_util::{Empty, Full, StreamBody};
        let none = HeaderMap::new();
        let mut cl0 = HeaderMap::new();
        cl0.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        assert_eq!(Framing::of(&Method::GET, &none, &Empty::<Bytes>::new()), Framing::None);
        assert_eq!(Framing::of(&Method::GET, &cl0, &Empty::<Bytes>::new()), Framing::Length(0));
        assert_eq!(Framing::of(&Method::POST, &none, &Empty::<Bytes>::new()), Framing::Length(0));
        assert_eq!(Framing::of(&Method::POST, &none, &Full::new(Bytes::from_static(b"abc"))), Framing::Length(3));
        let stream =
            StreamBody::new(futures_util::stream::iter(Vec::<Result<http_body::Frame<Bytes>, io::Error>>::new()));
        assert_eq!(Framing::of(&Method::POST, &none, &stream), Framing::Chunked);
    }
}

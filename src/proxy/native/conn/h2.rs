//! HTTP/1 clients of a pool that speaks HTTP/2 to its backends. The request head is
//! written as it would be for an HTTP/1.1 backend (every one of Tether's edits applied
//! once, in `head::write_request`) and read back as HTTP/2 headers; the body goes as data
//! frames, de-chunked; the response comes back as HTTP/1.1: its length kept when it has
//! one, else chunked for HTTP/1.1 clients (trailers in the chunked trailer section) and
//! delimited by close for HTTP/1.0 ones. Upgrades are not offered (a WebSocket over HTTP/2
//! needs extended CONNECT, which Tether does not speak to backends).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{issued_cookie, read_body, write, After, Attempt, Exchange, Step, STALE_RETRIES};
use crate::affinity::Decision;
use crate::backend::health::passive_failure;
use crate::h1::chunked::Decoder;
use crate::h1::request::{Body, Method};
use crate::pool::{Pool, Routes};
use crate::proxy::native::buffers::{Buf, Parts};
use crate::proxy::native::head::{self, RequestEdits};
use crate::proxy::native::io::ClientIo;
use crate::proxy::refusal::Refusal;
use crate::upstream::{BoxError, H2Body};

/// A piece of the client's body on its way to the HTTP/2 request: data, or the end.
enum Piece {
    Data(Bytes),
    End,
}

/// A request body fed from the client's connection by the request's own task. A feed that
/// stops without its end (the client's body broke off, or the request was given up) is
/// an error, so the backend's stream is reset rather than ended as if whole.
struct Fed {
    pieces: mpsc::Receiver<Piece>,
    hint: SizeHint,
    ended: bool,
}

impl HttpBody for Fed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match std::task::ready!(self.pieces.poll_recv(cx)) {
            Some(Piece::Data(d)) => Poll::Ready(Some(Ok(Frame::data(d)))),
            Some(Piece::End) => {
                self.ended = true;
                Poll::Ready(None)
            }
            None => Poll::Ready(Some(Err("the client's request body broke off".into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

/// What an HTTP/2 backend must not get from an HTTP/1.1 head: the connection's own fields
/// (RFC 9113 section 8.2.2) and `Host` (the authority goes as `:authority`).
fn connection_specific(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::TE
        || name == header::HOST
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// The HTTP/2 request for the HTTP/1.1 head in `out` (as written for a backend), its
/// authority the `Host` there (else `fallback`).
fn request_from(out: &[u8], https: bool, fallback: &str) -> Step<http::request::Builder> {
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut parsed = httparse::Request::new(&mut fields);
    match parsed.parse(out) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(Refusal::BadRequest("the request cannot be sent over HTTP/2")),
    }
    let (Some(method), Some(path)) = (parsed.method, parsed.path) else {
        return Err(Refusal::BadRequest("the request cannot be sent over HTTP/2"));
    };
    let host = parsed.headers.iter().find(|f| f.name.eq_ignore_ascii_case("host")).map(|f| f.value);
    let authority = host.and_then(|h| http::uri::Authority::try_from(h).ok());
    let authority = authority.or_else(|| http::uri::Authority::try_from(fallback).ok());
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(if https { http::uri::Scheme::HTTPS } else { http::uri::Scheme::HTTP });
    uri.authority = authority;
    uri.path_and_query = Some(
        http::uri::PathAndQuery::try_from(if path.starts_with('/') { path } else { "/" })
            .map_err(|_| Refusal::BadRequest("the request target cannot be sent over HTTP/2"))?,
    );
    let uri = http::Uri::from_parts(uri).map_err(|_| Refusal::BadRequest("the request cannot be sent over HTTP/2"))?;
    let mut builder = http::Request::builder().method(method).uri(uri).version(http::Version::HTTP_2);
    for f in parsed.headers.iter() {
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(f.name.as_bytes()), HeaderValue::from_bytes(f.value))
        else {
            continue;
        };
        if !connection_specific(&name) {
            builder = builder.header(name, value);
        }
    }
    Ok(builder)
}

impl<S: ClientIo> Exchange<'_, S> {
    /// Steps 3 and 4 for a pool that speaks HTTP/2: send on a shared connection (moving to
    /// another backend when a connect fails, or when a request without a body broke
    /// before its response), then the response written as HTTP/1.1 while the client's
    /// body, if it is still coming, streams beside it.
    // The request's buffers, where it goes, and what decide and the listener said of it.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn forward_h2(
        &mut self,
        buf: &mut Buf,
        work: &mut Parts,
        routes: &Routes,
        pool: &Pool,
        mut decision: Decision,
        index: usize,
        trusted: bool,
        https: bool,
    ) -> Step<After> {
        let limits = self.snap.config.limits;
        let timeouts = self.snap.config.timeouts;
        let (method, keep_alive, minor, body) =
            (work.request.method, work.request.keep_alive, work.request.minor, work.request.body);
        let head_len = work.request.len;
        let replayable = body == Body::None && method.is_idempotent() && pool.config.retries > 0;
        let backend_tls = pool.config.tls.is_some();
        let mut attempt = Attempt { index, moves_left: pool.config.retries.max(1), stale: 0 };
        loop {
            let backend = &pool.backends[attempt.index];
            self.charge(backend);
            if self.slot.is_none() {
                self.slot = pool.slot(attempt.index).await.map_err(|e| Refusal::of_slot(e, pool, attempt.index))?;
            }
            work.out.clear();
            let edits = RequestEdits {
                client_ip: &self.client.peer_ip,
                trusted,
                tls: S::TLS,
                default_host: &backend.address_text,
                own_cookie: pool.affinity.as_ref().and_then(|a| a.cookie_name()),
                repin_header: pool.affinity.as_ref().map(|a| a.cfg.repin_header.as_str()),
                repin: decision.verdict.reason(),
                upgrade: None,
            };
            head::write_request(&mut work.out, buf.bytes(), &work.request, &edits);
            let builder = request_from(&work.out, backend_tls, &backend.address_text)?;
            let upstream = &pool.upstreams[attempt.index];
            let (mut sender, stream, reused) = match upstream.h2_stream(attempt.stale >= STALE_RETRIES).await {
                Ok(s) => s,
                Err(error) => {
                    self.connect_failed(pool, &mut attempt, &mut decision, error)?;
                    continue;
                }
            };
            let (tx, pieces) = mpsc::channel::<Piece>(2);
            let hint = match body {
                Body::None => SizeHint::with_exact(0),
                Body::Length(n) => SizeHint::with_exact(n),
                Body::Chunked => SizeHint::default(),
            };
            let fed: H2Body = if body == Body::None {
                http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync()
            } else {
                Fed { pieces, hint, ended: false }.boxed_unsync()
            };
            let request =
                builder.body(fed).map_err(|_| Refusal::BadRequest("the request cannot be sent over HTTP/2"))?;
            let sent = Instant::now();
            let waiting = AtomicBool::new(false);
            let mut uploaded = body == Body::None;
            // What follows the head in `buf` is the body's start, then (once the body is
            // taken) the next request's.
            buf.start = head_len;
            let (mut client_read, mut client_write) = self.client.stream.halves();
            let upload = feed(&mut client_read, body, buf, &limits, &timeouts, &waiting, tx);
            let mut upload = std::pin::pin!(upload);
            let exchange = sender.try_send_request(request);
            let timer = tokio::time::sleep_until(sent + timeouts.backend_response);
            let got = {
                let mut exchange = std::pin::pin!(exchange);
                let mut timer = std::pin::pin!(timer);
                loop {
                    tokio::select! {
                        r = &mut upload, if !uploaded => {
                            uploaded = true;
                            r?;
                        }
                        g = &mut exchange => break Some(g),
                        _ = &mut timer => break None,
                    }
                }
            };
            self.upstream = Some(sent.elapsed());
            let response = match got {
                None => {
                    let after = timeouts.backend_response;
                    if !uploaded && waiting.load(Ordering::Relaxed) {
                        tracing::info!(pool = %pool.name, backend = %backend.name, "request body still arriving after {after:?}");
                        return Err(Refusal::RequestBodyTimeout { after });
                    }
                    tracing::warn!(pool = %pool.name, backend = %backend.name, "no response within {after:?}");
                    if uploaded {
                        passive_failure(&pool.backends, attempt.index, pool.config.health.as_ref(), "response timeout");
                    }
                    return Err(Refusal::BackendTimeout { backend: backend.name.clone(), after });
                }
                Some(Err(mut e)) => {
                    if e.take_message().is_some() && reused && replayable {
                        // A closing shared connection did not take it: again, on a fresh one.
                        attempt.stale += 1;
                        continue;
                    }
                    let why = format!("HTTP/2: {}", e.into_error());
                    tracing::warn!(pool = %pool.name, backend = %backend.name, "backend failed: {why}");
                    passive_failure(&pool.backends, attempt.index, pool.config.health.as_ref(), &why);
                    if replayable && attempt.move_on(pool, &mut decision) {
                        self.slot = None;
                        self.verdict = decision.verdict;
                        continue;
                    }
                    return Err(Refusal::BackendFailed { backend: backend.name.clone() });
                }
                Some(Ok(response)) => response,
            };

            // The response: passive health, persistence, then the head and body as HTTP/1.1.
            let (head, mut body) = response.into_parts();
            let status = head.status.as_u16();
            if status >= 500 {
                passive_failure(
                    &pool.backends,
                    attempt.index,
                    pool.config.health.as_ref(),
                    &format!("status {status}"),
                );
            } else {
                backend.passive_success();
            }
            self.status = status;
            let mut set_cookie = None;
            if let Some(a) = &pool.affinity {
                let cookies = crate::affinity::keys::http_set_cookies(&head.headers);
                match &pool.shared {
                    None if a.learns() => a.learn(cookies, attempt.index),
                    None => {}
                    Some(link) => {
                        let learned = if a.learns() { a.learn_new(cookies, attempt.index) } else { Vec::new() };
                        if let Some(wait) = link.after(&pool.backends, &decision, &learned, attempt.index) {
                            wait.await;
                        }
                    }
                }
                set_cookie = issued_cookie(a, &decision, https);
            }
            let no_body = method == Method::Head || status < 200 || status == 204 || status == 304;
            let length = head.headers.contains_key(header::CONTENT_LENGTH);
            let framing = if no_body || length {
                Framing::AsIs
            } else if minor == 1 {
                Framing::Chunked
            } else {
                Framing::UntilClose
            };
            let close = !keep_alive || *self.client.shutdown.borrow() || framing == Framing::UntilClose;
            work.out.clear();
            write_head(
                &mut work.out,
                minor,
                &head.headers,
                head.status,
                set_cookie.as_deref(),
                routes.hsts.as_deref(),
                framing,
                close,
            );
            let mut written = 0;
            let download =
                download(&mut client_write, &mut body, &mut work.out, framing, no_body, &timeouts, &mut written);
            let mut upload_failed = false;
            let result = if uploaded {
                download.await
            } else {
                let mut download = std::pin::pin!(download);
                loop {
                    tokio::select! {
                        r = &mut upload, if !uploaded => {
                            uploaded = true;
                            if r.is_err() {
                                // The client's body failed while the response was under
                                // way: the response is cut short.
                                upload_failed = true;
                                break Err("bad-request-body");
                            }
                        }
                        d = &mut download => break d,
                    }
                }
            };
            drop(stream);
            self.bytes_out = written;
            if let Err(label) = result {
                self.error = Some(label);
                return Ok(After::Close);
            }
            if !uploaded || upload_failed {
                // The response ended before the request body did: the connection is not
                // in step any more.
                self.error = Some(if upload_failed { "bad-request-body" } else { "response-before-body" });
                return Ok(After::Close);
            }
            return Ok(if close { After::Close } else { After::KeepAlive });
        }
    }
}

/// How a response from an HTTP/2 backend is framed for an HTTP/1 client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// As the backend's head says: its `Content-Length`, or no body at all.
    AsIs,
    Chunked,
    /// An HTTP/1.0 client and no length: the body ends when the connection closes.
    UntilClose,
}

/// Writes the head in `out`, then the body's data as it comes (each piece within
/// `backend_body`, each write within `client_send`); chunked, with the trailers in the
/// trailer section, when `framing` says so. `written` counts body bytes.
async fn download<W: AsyncWrite + Unpin>(
    client: &mut W,
    body: &mut hyper::body::Incoming,
    out: &mut Vec<u8>,
    framing: Framing,
    no_body: bool,
    timeouts: &crate::config::Timeouts,
    written: &mut u64,
) -> Result<(), &'static str> {
    let late = crate::proxy::refusal::LateFailure::BackendBody.label();
    write(client, out, timeouts.client_send).await?;
    let mut trailers: Option<HeaderMap> = None;
    loop {
        let frame = match tokio::time::timeout(timeouts.backend_body, body.frame()).await {
            Err(_) => return Err(late),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                tracing::debug!("HTTP/2 response body failed: {e}");
                return Err(late);
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                continue;
            }
        };
        if no_body || data.is_empty() {
            continue;
        }
        out.clear();
        if framing == Framing::Chunked {
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            out.extend_from_slice(&data);
            out.extend_from_slice(b"\r\n");
        } else {
            out.extend_from_slice(&data);
        }
        write(client, out, timeouts.client_send).await?;
        *written += data.len() as u64;
    }
    if framing == Framing::Chunked {
        out.clear();
        out.extend_from_slice(b"0\r\n");
        for (name, value) in trailers.iter().flatten() {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        write(client, out, timeouts.client_send).await?;
    }
    Ok(())
}

/// The client's response head: the backend's fields (none of them the connection's own),
/// Tether's cookie and HSTS, and the framing for an HTTP/1.`minor` client.
#[allow(clippy::too_many_arguments)]
fn write_head(
    out: &mut Vec<u8>,
    minor: u8,
    headers: &HeaderMap,
    status: http::StatusCode,
    set_cookie: Option<&str>,
    hsts: Option<&str>,
    framing: Framing,
    close: bool,
) {
    out.extend_from_slice(if minor == 0 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if connection_specific(name) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(c) = set_cookie {
        out.extend_from_slice(b"set-cookie: ");
        out.extend_from_slice(c.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(h) = hsts.filter(|_| !headers.contains_key(header::STRICT_TRANSPORT_SECURITY)) {
        out.extend_from_slice(b"strict-transport-security: ");
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if minor == 0 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Feeds the client's body to `tx`: the bytes that came with the head, then the rest as
/// it arrives (each piece within `client_body`), de-chunked and within
/// `max_request_body`, then its end. `buf` holds the body's first bytes from its
/// `start`; bytes after the body stay there (a pipelined request).
#[allow(clippy::too_many_arguments)]
async fn feed<R: AsyncRead + Unpin>(
    from: &mut R,
    body: Body,
    buf: &mut Buf,
    limits: &crate::config::Limits,
    timeouts: &crate::config::Timeouts,
    waiting: &AtomicBool,
    tx: mpsc::Sender<Piece>,
) -> Step<()> {
    let gone = || Refusal::BackendFailed { backend: String::new() };
    match body {
        Body::None => {}
        Body::Length(n) => {
            let mut left = n;
            let first = buf.filled().len().min(usize::try_from(n).unwrap_or(usize::MAX));
            if first > 0 {
                tx.send(Piece::Data(Bytes::copy_from_slice(&buf.filled()[..first]))).await.map_err(|_| gone())?;
                left -= first as u64;
            }
            buf.start += first;
            if left > 0 {
                buf.clear();
            }
            while left > 0 {
                let room = buf.spare();
                let want = room.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let got = read_body(from, &mut room[..want], timeouts.client_body, waiting).await?;
                tx.send(Piece::Data(Bytes::copy_from_slice(&buf.spare()[..got]))).await.map_err(|_| gone())?;
                left -= got as u64;
            }
        }
        Body::Chunked => {
            let mut decoder = Decoder::new();
            loop {
                let mut at = buf.start;
                let end = buf.end;
                while at < end && !decoder.is_done() {
                    let step = decoder.step(&buf.bytes()[at..end]).map_err(|_| Refusal::BadRequestBody)?;
                    if let Some(max) = limits.max_request_body {
                        if decoder.data_len() > max {
                            return Err(Refusal::BodyTooLarge { limit: max });
                        }
                    }
                    if !step.data.is_empty() {
                        let data = Bytes::copy_from_slice(&buf.bytes()[at + step.data.start..at + step.data.end]);
                        tx.send(Piece::Data(data)).await.map_err(|_| gone())?;
                    }
                    at += step.consumed;
                }
                buf.start = at;
                if decoder.is_done() {
                    break;
                }
                buf.clear();
                let got = read_body(from, buf.spare(), timeouts.client_body, waiting).await?;
                buf.end += got;
            }
        }
    }
    tx.send(Piece::End).await.map_err(|_| gone())
}

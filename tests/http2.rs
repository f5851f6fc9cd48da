//! HTTP/2 from clients, to HTTP/1.1 backends on Tether's own backend side
//! (`proxy::backside`): framing both ways, pooled sockets shared with the HTTP/1 path,
//! stickiness, moves to another backend, and every failure answered as on HTTP/1.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

type H2Body = BoxBody<Bytes, Infallible>;

/// An HTTP/2 prior-knowledge connection to Tether.
async fn h2(addr: SocketAddr) -> SendRequest<H2Body> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    sender
}

fn full(b: &'static [u8]) -> H2Body {
    Full::new(Bytes::from_static(b)).boxed()
}

/// A body sent in `pieces`, with no length known in advance.
fn streamed(pieces: &[&'static [u8]]) -> H2Body {
    let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> =
        pieces.iter().map(|p| Ok(http_body::Frame::data(Bytes::from_static(p)))).collect();
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

async fn send(s: &mut SendRequest<H2Body>, req: Request<H2Body>) -> Resp {
    s.ready().await.unwrap();
    let r: Response<hyper::body::Incoming> = s.send_request(req).await.unwrap();
    let (parts, body) = r.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Resp { status: parts.status, headers: parts.headers, body }
}

fn get(t: &Tether, path: &str) -> Request<H2Body> {
    Request::get(format!("http://{}{path}", t.addr())).body(full(b"")).unwrap()
}

#[tokio::test]
async fn request_bodies_reach_the_backend_framed_by_length_or_chunked() {
    let b = RecordingBackend::start(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let t = Tether::start(&pool_of(&[("rec", b.addr)], "", ""));
    let mut s = h2(t.addr()).await;
    let url = format!("http://{}/up", t.addr());
    let with_length = Request::post(&url).header("content-length", "7").body(full(b"h2 body")).unwrap();
    assert_eq!(send(&mut s, with_length).await.status, 200);
    let without = Request::put(&url).body(streamed(&[b"one ", b"two ", b"three"])).unwrap();
    assert_eq!(send(&mut s, without).await.status, 200);
    let empty = Request::get(&url).body(full(b"")).unwrap();
    assert_eq!(send(&mut s, empty).await.status, 200);

    let reqs = b.requests();
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    // The strict backend accepted all three: valid HTTP/1.1, one framing each.
    assert!(b.connections().iter().all(|c| c.malformed.is_none()), "{:?}", b.connections());
    assert_eq!(reqs[0].line(), "POST /up HTTP/1.1");
    assert_eq!(reqs[0].header("content-length"), ["7"]);
    assert!(reqs[0].header("transfer-encoding").is_empty());
    assert_eq!(reqs[0].body, b"h2 body");
    assert_eq!(reqs[1].line(), "PUT /up HTTP/1.1");
    assert_eq!(reqs[1].header("transfer-encoding"), ["chunked"]);
    assert!(reqs[1].header("content-length").is_empty());
    assert_eq!(reqs[1].body, b"one two three");
    assert!(reqs[2].header("content-length").is_empty() && reqs[2].header("transfer-encoding").is_empty());
    assert_eq!(reqs[2].header("host"), [t.addr().to_string()]);
    // One backend connection carried all three, one after another.
    assert_eq!(b.connections().len(), 1);
}

#[tokio::test]
async fn responses_of_every_framing_reach_the_client_whole() {
    let answers: [(&[u8], bool, &str); 4] = [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello", false, "hello"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n",
            false,
            "abcde",
        ),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", true, "until the end"),
        (b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", false, ""),
    ];
    for (answer, close, body) in answers {
        let b = RecordingBackend::start_with(answer, close).await;
        let t = Tether::start(&pool_of(&[("rec", b.addr)], "", ""));
        let mut s = h2(t.addr()).await;
        for _ in 0..2 {
            let r = send(&mut s, get(&t, "/")).await;
            assert_eq!(r.body, body.as_bytes(), "{}", String::from_utf8_lossy(answer));
            assert!(r.headers.get("transfer-encoding").is_none() && r.headers.get("connection").is_none());
            if r.status == 200 && !close && answer.starts_with(b"HTTP/1.1 200 OK\r\nContent-Length") {
                assert_eq!(r.headers["content-length"], "5");
            }
        }
        // A response read to its end leaves its connection for the next request; one
        // delimited by the close cannot.
        assert_eq!(b.connections().len(), if close { 2 } else { 1 }, "{}", String::from_utf8_lossy(answer));
    }
}

#[tokio::test]
async fn a_backend_socket_serves_http1_and_http2_clients_in_turn() {
    let b = RecordingBackend::start(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let t = Tether::start(&pool_of(&[("rec", b.addr)], "", ""));
    let mut h1 = Client::connect(t.addr()).await;
    let mut s = h2(t.addr()).await;
    for _ in 0..3 {
        assert_eq!(h1.get("/one").await.status, 200);
        assert_eq!(send(&mut s, get(&t, "/two")).await.status, 200);
    }
    let lines: Vec<String> = b.requests().iter().map(|r| r.line().to_string()).collect();
    assert_eq!(lines.len(), 6, "{lines:?}");
    assert_eq!(b.connections().len(), 1, "both paths take from one idle stack");
}

#[tokio::test]
async fn an_http2_session_stays_on_its_backend() {
    let b = backends(3).await;
    let cfg = format!(
        "{}\n[pools.web.affinity]\nkeys = [\"cookie\"]\n[pools.web.affinity.cookie]\nkeys = [\"{KEY}\"]\n",
        config("round_robin", &[&b[0], &b[1], &b[2]], &[], "")
    );
    let t = Tether::start(&cfg);
    let mut s = h2(t.addr()).await;
    let first = send(&mut s, get(&t, "/")).await;
    let backend = first.backend();
    let cookie = first
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
        .find(|c| c.starts_with("tether="))
        .expect("Tether's cookie on a new session");
    for _ in 0..6 {
        // HTTP/2 clients may split cookies into crumbs; the session is found either way.
        let req = Request::get(format!("http://{}/", t.addr()))
            .header("cookie", "a=1")
            .header("cookie", cookie.as_str())
            .body(full(b""))
            .unwrap();
        let r = send(&mut s, req).await;
        assert_eq!(r.backend(), backend);
        let issued = r.headers.get_all("set-cookie").iter().any(|v| v.to_str().unwrap().starts_with("tether="));
        assert!(!issued, "an existing session gets no new cookie");
    }
    // Without the cookie each request is a new session, and round robin spreads them.
    let mut fresh = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let r = send(&mut s, get(&t, "/")).await;
        assert!(r.headers.get_all("set-cookie").iter().any(|v| v.to_str().unwrap().starts_with("tether=")));
        fresh.insert(r.backend());
    }
    assert!(fresh.len() > 1, "{fresh:?}");
}

#[tokio::test]
async fn failures_are_answered_and_moved_as_on_http1() {
    // A dead address first: the connect fails, the request moves to the live backend.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let b = backends(1).await;
    let t = Tether::start(&pool_of(&[("dead", dead), ("live", b[0].address)], "retries = 1\n", ""));
    let mut s = h2(t.addr()).await;
    for _ in 0..4 {
        let r = send(&mut s, get(&t, "/")).await;
        assert_eq!((r.status.as_u16(), r.backend().as_str()), (200, "app-1"));
    }
    drop(t);

    // A backend that closes without answering: an idempotent request without a body goes
    // to the next backend; a POST with one cannot be sent again and is a 502.
    let mute = RecordingBackend::start_with(b"", true).await;
    let t = Tether::start(&pool_of(&[("mute", mute.addr), ("live", b[0].address)], "retries = 1\n", ""));
    let mut s = h2(t.addr()).await;
    let r = send(&mut s, get(&t, "/")).await;
    assert_eq!((r.status.as_u16(), r.backend().as_str()), (200, "app-1"));
    let post = |t: &Tether| Request::post(format!("http://{}/", t.addr())).body(full(b"data")).unwrap();
    let mut codes = Vec::new();
    for _ in 0..2 {
        let r = send(&mut s, post(&t)).await;
        codes.push(r.status.as_u16());
        if r.status == 502 {
            assert_eq!(r.headers["tether-error"], "backend-error");
        }
    }
    assert!(codes.contains(&502), "{codes:?}");
    drop(t);

    // A malformed response head is a 502, never passed on.
    let bad = RecordingBackend::start(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx").await;
    let t = Tether::start(&pool_of(&[("bad", bad.addr)], "", ""));
    let r = send(&mut h2(t.addr()).await, get(&t, "/")).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.headers["tether-error"], "backend-error");
    drop(t);

    // No response head within backend_response is a 504.
    let t = Tether::start(&pool_of(&[("app-1", b[0].address)], "", "[timeouts]\nbackend_response = \"200ms\"\n"));
    let r = send(&mut h2(t.addr()).await, get(&t, "/sleep?ms=3000")).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.headers["tether-error"], "backend-timeout");
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_with_413() {
    let b = RecordingBackend::start(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let t = Tether::start(&pool_of(&[("rec", b.addr)], "", "[limits]\nmax_request_body = 10\n"));
    let mut s = h2(t.addr()).await;
    let url = format!("http://{}/", t.addr());
    let announced = Request::post(&url).header("content-length", "20").body(full(b"01234567890123456789")).unwrap();
    let r = send(&mut s, announced).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.headers["tether-error"], "body-too-large");
    let streamed = Request::post(&url).body(streamed(&[b"0123456", b"789012345"])).unwrap();
    let r = send(&mut s, streamed).await;
    assert_eq!(r.status, 413);
    // Nothing over the limit reached the backend as a whole request.
    assert!(b.requests().iter().all(|r| r.body.len() <= 10), "{:?}", b.requests());
    // Within the limit, the same connection still works.
    let fine = Request::post(&url).body(full(b"small")).unwrap();
    assert_eq!(send(&mut s, fine).await.status, 200);
    assert_eq!(b.requests().last().unwrap().body, b"small");
}

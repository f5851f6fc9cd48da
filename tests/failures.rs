//! Errors a client can understand, timeouts, bad input and graceful shutdown.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// An address where nothing listens.
fn dead_address() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn pool_config(addresses: &[(&str, String)], extra: &str) -> String {
    let mut s =
        format!("{extra}\n[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"shop\"\n[pools.shop]\nbackends = [\n");
    for (name, addr) in addresses {
        s.push_str(&format!("  {{ name = \"{name}\", address = \"{addr}\" }},\n"));
    }
    s.push_str("]\n");
    s
}

#[tokio::test]
async fn refused_connection_is_a_502_naming_the_pool() {
    let t = Tether::start(&pool_config(&[("gone", dead_address().to_string())], ""));
    let r = get(t.addr(), "/").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.headers["tether-error"], "connect-failed");
    assert!(r.text().contains("pool \"shop\""), "{}", r.text());
    assert!(r.text().contains("backend \"gone\""), "{}", r.text());
}

#[tokio::test]
async fn connect_failure_is_retried_once_on_another_backend() {
    let b = backends(1).await;
    let t =
        Tether::start(&pool_config(&[("gone", dead_address().to_string()), ("app-1", b[0].address.to_string())], ""));
    let mut c = Client::connect(t.addr()).await;
    for _ in 0..10 {
        let r = c.get("/").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.backend(), "app-1");
    }
}

#[tokio::test]
async fn no_eligible_backend_is_a_503() {
    let b = backends(1).await;
    let cfg = pool_config(&[("app-1", b[0].address.to_string())], "").replace("\" },", "\", state = \"disabled\" },");
    let t = Tether::start(&cfg);
    let r = get(t.addr(), "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["tether-error"], "no-backend");
    assert!(r.text().contains("pool \"shop\": no backend is available"), "{}", r.text());
}

#[tokio::test]
async fn slow_backend_response_is_a_504() {
    let b = backends(1).await;
    let t = Tether::start(&pool_config(
        &[("app-1", b[0].address.to_string())],
        "[timeouts]\nbackend_response = \"300ms\"\n",
    ));
    let start = Instant::now();
    let r = get(t.addr(), "/sleep?ms=10000").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.headers["tether-error"], "backend-timeout");
    // Not before the 300 ms timeout, and long before the backend's 10 s answer.
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(5), "{took:?}");
    // A fast request on the same backend is not affected.
    assert_eq!(get(t.addr(), "/sleep?ms=10").await.status, 200);
}

#[tokio::test]
async fn backend_that_hangs_up_is_a_502() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    let t = Tether::start(&pool_config(&[("rude", addr.to_string())], ""));
    let r = get(t.addr(), "/").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.headers["tether-error"], "backend-error");
}

#[tokio::test]
async fn connect_timeout_is_a_504() {
    // A listener that never accepts with the smallest backlog: once its queue is full the
    // kernel drops further SYNs, so a connect hangs.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            fillers.push(s);
        }
    }
    let t = Tether::start(&pool_config(&[("stuck", addr.to_string())], "[timeouts]\nconnect = \"300ms\"\n"));
    let start = Instant::now();
    let r = get(t.addr(), "/").await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.headers["tether-error"], "connect-timeout");
    // Not before the 300 ms connect timeout, and long before the kernel would give up on
    // the SYN (over a minute).
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(10), "{took:?}");
    drop(listener);
}

#[tokio::test]
async fn dribbled_request_head_is_cut_off() {
    let b = backends(1).await;
    let t = Tether::start(&pool_config(
        &[("app-1", b[0].address.to_string())],
        "[timeouts]\nrequest_header = \"500ms\"\nclient_idle = \"10s\"\n",
    ));
    // Timed from before the connection exists, so no deadline of Tether's can start earlier.
    let start = Instant::now();
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut closed_after = None;
    // A header line every 200 ms, for up to 8 s (the idle timeout is 10 s).
    for i in 0..40 {
        if s.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes()).await.is_err() {
            closed_after = Some(start.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_after = Some(start.elapsed());
                break;
            }
            Ok(Ok(n)) => panic!("unexpected answer: {}", String::from_utf8_lossy(&buf[..n])),
            Err(_) => {}
        }
    }
    let closed_after = closed_after.expect("the dribbling client was never cut off");
    // Cut off by the 500 ms header timeout (its deadline is kept in whole milliseconds),
    // which dribbling does not extend; not by the 10 s idle timeout.
    assert!(closed_after >= Duration::from_millis(490) && closed_after < Duration::from_secs(5), "{closed_after:?}");
}

#[tokio::test]
async fn idle_keep_alive_is_closed_but_not_by_the_header_timeout() {
    let b = backends(1).await;
    let t = Tether::start(&pool_config(
        &[("app-1", b[0].address.to_string())],
        "[timeouts]\nrequest_header = \"300ms\"\nclient_idle = \"1200ms\"\n",
    ));
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    let req = b"GET /status?code=204 HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(req).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 204"));
    // Idle for longer than the header timeout: the connection must still be usable. (This
    // sleep is the test's subject: a client that says nothing for a while.)
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The idle deadline starts when this answer has gone out, so after `start`.
    let start = Instant::now();
    s.write_all(req).await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 204"), "{}", String::from_utf8_lossy(&buf[..n]));
    // Then idle past the idle timeout: Tether closes it.
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "connection should have been closed");
    // Not before the 1200 ms idle timeout (less the deadline's millisecond rounding), and
    // so not by the 300 ms header timeout.
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(1190), "{waited:?}");
}

#[tokio::test]
async fn malformed_requests_get_4xx_and_never_reach_a_backend() {
    let b = backends(1).await;
    let t = Tether::start(&pool_config(&[("app-1", b[0].address.to_string())], ADMIN));
    let cases: [(&[u8], &str); 4] = [
        (b"GET / HTTP/1.1\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", "400"),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", "405"),
    ];
    for (req, status) in cases {
        let out = raw(t.addr(), req, Duration::from_secs(2)).await;
        assert!(out.starts_with(&format!("HTTP/1.1 {status}")), "{:?} got {out:?}", String::from_utf8_lossy(req));
    }
    // None of them was forwarded: the access log has no backend for any of them. The line
    // without a colon is an HTTP syntax error, answered before there is a request to log.
    let lines = t.wait_access_lines(3).await;
    assert_eq!(lines.len(), 3, "{lines:#?}");
    for line in lines {
        assert!(line.contains("backend=-"), "forwarded: {line}");
    }
    // And the backend's own count, which covers all four.
    let pool = admin_json(t.admin(), "/api/pools/shop").await;
    assert_eq!(pool["backends"][0]["requests"], 0, "{pool}");
}

#[tokio::test]
async fn conflicting_framing_cannot_smuggle_a_request() {
    let b = backends(1).await;
    let t = Tether::start(&pool_config(&[("app-1", b[0].address.to_string())], ""));
    // Content-Length says the body is "0\r\n\r" and the rest a second request; chunked
    // framing says the body is empty. Transfer-Encoding wins (RFC 9112 section 6.3), the
    // Content-Length is dropped, and the connection is closed after the response, so the
    // tail is never read as a request.
    let req = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let out = raw(t.addr(), req, Duration::from_secs(2)).await;
    assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // Tether closed the connection after one response, so one line is all there will be.
    let lines = t.wait_access_lines(1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("\"POST /echo HTTP/1.1\" 200") && lines[0].contains("bytes_out=0"), "{lines:?}");
}

#[tokio::test]
async fn access_log_json_has_every_field() {
    let b = backends(1).await;
    let t = Tether::start(&pool_config(&[("app-1", b[0].address.to_string())], "[access_log]\nformat = \"json\"\n"));
    let mut c = Client::connect(t.addr()).await;
    let req = Request::post("/echo?q=1").header("host", "x").body(Full::new(Bytes::from_static(b"12345"))).unwrap();
    assert_eq!(c.request(req).await.status, 200);
    let lines = t.wait_access_lines(1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["client"].as_str().unwrap().split(':').next(), Some("127.0.0.1"));
    assert_eq!(v["method"], "POST");
    assert_eq!(v["uri"], "/echo?q=1");
    assert_eq!(v["status"], 200);
    assert_eq!(v["pool"], "shop");
    assert_eq!(v["backend"], "app-1");
    assert!(v["upstream_ms"].as_f64().unwrap() > 0.0);
    assert!(v["total_ms"].as_f64().unwrap() >= v["upstream_ms"].as_f64().unwrap());
    assert_eq!(v["bytes_in"], 5);
    assert_eq!(v["bytes_out"], 5);
    assert!(v["time"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn sigterm_lets_requests_in_flight_finish() {
    let b = backends(1).await;
    let mut t = Tether::start(&pool_config(
        &[("app-1", b[0].address.to_string())],
        &format!("{ADMIN}[runtime]\nshutdown_grace = \"10s\"\n"),
    ));
    let addr = t.addr();
    let slow = tokio::spawn(async move { get(addr, "/sleep?ms=1000").await });
    wait_in_flight(t.admin(), "shop", "app-1", 1).await;
    t.signal("TERM");
    t.wait_log("no longer accepting").await;
    // No new connections once shutdown has begun.
    wait_until_async("the listener refuses connections after SIGTERM", Duration::from_secs(5), || async move {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().contains("slept 1000 ms"));
    let status = t.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
    assert!(t.log().contains("all connections finished"), "{}", t.log());
}

#[tokio::test]
async fn shutdown_grace_period_bounds_the_wait() {
    let b = backends(1).await;
    let mut t = Tether::start(&pool_config(
        &[("app-1", b[0].address.to_string())],
        &format!("{ADMIN}[runtime]\nshutdown_grace = \"300ms\"\n"),
    ));
    let addr = t.addr();
    let _slow = tokio::spawn(async move {
        Client::connect(addr)
            .await
            .try_request(Request::get("/sleep?ms=10000").header("host", "x").body(Full::default()).unwrap())
            .await
            .is_ok()
    });
    wait_in_flight(t.admin(), "shop", "app-1", 1).await;
    let start = Instant::now();
    t.signal("INT");
    let status = t.wait_exit(Duration::from_secs(5));
    assert!(status.success());
    // The grace period passed, and Tether did not wait for the backend's 10 s answer.
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(5), "{took:?}");
    assert!(t.log().contains("grace period of 300ms is over"), "{}", t.log());
}

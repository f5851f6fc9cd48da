//! Issue 11: what a hostile or careless client (or backend) puts in headers must not reach
//! where it can do harm: forwarding headers under other spellings, HTTP/2 cookie crumbs an
//! HTTP/1 backend reads as one cookie, an access log that grows without bound, a session
//! cookie without `Secure` behind an HTTPS proxy, a session cookie in a shared cache.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The header names the backend got that read as `canonical` to a CGI-style backend
/// (`_` for `-`, any case).
fn spellings_of(text: &str, canonical: &str) -> Vec<String> {
    header_lines(text)
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.replace('_', "-").eq_ignore_ascii_case(canonical) && k != canonical)
        .collect()
}

fn trusting(cfg: String) -> String {
    cfg.replace("pool = \"web\"\n", "pool = \"web\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n")
}

fn sticky(cfg: String) -> String {
    format!("{cfg}\n[pools.web.affinity]\nkeys = [\"cookie\"]\n[pools.web.affinity.cookie]\nkeys = [\"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\"]\n")
}

#[tokio::test]
async fn an_http10_request_without_host_does_not_forward_the_clients_x_forwarded_host() {
    // Reproduction: `GET /headers HTTP/1.0` with `X-Forwarded-Host: evil.example` and no
    // Host reached the backend with `x-forwarded-host: evil.example`: Tether set its own
    // only when it had a host, and left the client's in place otherwise.
    let b = backends(1).await;
    let t = Tether::start(&config("round_robin", &[&b[0]], &[], ""));
    let out = raw(
        t.addr(),
        b"GET /headers HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\nX_Forwarded_Host: evil.example\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"), "{out}");
    let text = out.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    assert!(text.starts_with("GET /headers HTTP/1.1\n"), "{out}");
    assert!(values(text, "x-forwarded-host").is_empty(), "{text}");
    assert!(spellings_of(text, "x-forwarded-host").is_empty(), "{text}");
    assert_eq!(values(text, "x-forwarded-for"), ["127.0.0.1"], "{text}");
}

#[tokio::test]
async fn untrusted_clients_cannot_forward_under_other_spellings() {
    // Reproduction: a client that is not a trusted proxy sent `Forwarded: for=6.6.6.6`,
    // `X-Real-IP: 6.6.6.6`, `X_Forwarded_For: 6.6.6.6`, `X_Forwarded_Host`,
    // `X_Forwarded_Proto` and `X_Real_IP`; all reached the backend, where a CGI-style
    // app reads `X_Forwarded_For` as HTTP_X_FORWARDED_FOR, the client's chosen address.
    let b = backends(1).await;
    let t = Tether::start(&config("round_robin", &[&b[0]], &[], ""));
    let mut c = Client::connect(t.addr()).await;
    let req = Request::get("/headers")
        .header("host", "shop.example")
        .header("Forwarded", "for=6.6.6.6;proto=https;host=evil.example")
        .header("X-Real-IP", "6.6.6.6")
        .header("X_Forwarded_For", "6.6.6.6")
        .header("X_Forwarded_Host", "evil.example")
        .header("X_Forwarded_Proto", "https")
        .header("X_Real_IP", "6.6.6.6")
        .header("x_forwarded-FOR", "6.6.6.6")
        .header("x-app_id", "kept")
        .body(Full::default())
        .unwrap();
    let text = c.request(req).await.text();
    for canonical in ["x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip", "forwarded"] {
        assert!(spellings_of(&text, canonical).is_empty(), "another spelling of {canonical} was forwarded:\n{text}");
    }
    assert!(values(&text, "forwarded").is_empty(), "{text}");
    assert!(values(&text, "x-real-ip").is_empty(), "{text}");
    assert_eq!(values(&text, "x-forwarded-for"), ["127.0.0.1"], "{text}");
    assert_eq!(values(&text, "x-forwarded-proto"), ["http"], "{text}");
    assert_eq!(values(&text, "x-forwarded-host"), ["shop.example"], "{text}");
    assert!(!text.contains("6.6.6.6") && !text.contains("evil.example"), "{text}");
    // Other headers with underscores are the application's business.
    assert_eq!(values(&text, "x-app_id"), ["kept"], "{text}");
}

#[tokio::test]
async fn trusted_proxies_keep_their_forwarding_headers() {
    // Not a reproduction: today's behaviour for trusted proxies, which the fix keeps.
    let b = backends(1).await;
    let t = Tether::start(&trusting(config("round_robin", &[&b[0]], &[], "")));
    let mut c = Client::connect(t.addr()).await;
    let req = Request::get("/headers")
        .header("host", "shop.example")
        .header("forwarded", "for=203.0.113.7;proto=https")
        .header("x-real-ip", "203.0.113.7")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .body(Full::default())
        .unwrap();
    let text = c.request(req).await.text();
    assert_eq!(values(&text, "forwarded"), ["for=203.0.113.7;proto=https"], "{text}");
    assert_eq!(values(&text, "x-real-ip"), ["203.0.113.7"], "{text}");
    assert_eq!(values(&text, "x-forwarded-for"), ["203.0.113.7, 127.0.0.1"], "{text}");
    assert_eq!(values(&text, "x-forwarded-proto"), ["https"], "{text}");
}

#[tokio::test]
async fn a_clients_repin_header_is_dropped_under_any_spelling() {
    // Reproduction: with affinity, a client's `Tether_Session_Repinned: down` reached the
    // backend (only the exact configured name was removed), so a CGI-style app read
    // HTTP_TETHER_SESSION_REPINNED as if Tether had moved the session. Same for a
    // configured `repin_header = "X-Session-Moved"` sent as `X_Session_Moved`.
    let b = backends(1).await;
    let cfg = sticky(config("round_robin", &[&b[0]], &[], ""));
    let custom = cfg.replace("keys = [\"cookie\"]\n", "keys = [\"cookie\"]\nrepin_header = \"X-Session-Moved\"\n");
    for (cfg, sent, canonical) in
        [(cfg, "Tether_Session_Repinned", "tether-session-repinned"), (custom, "X_Session_Moved", "x-session-moved")]
    {
        let t = Tether::start(&cfg);
        let mut c = Client::connect(t.addr()).await;
        let req = Request::get("/headers")
            .header("host", "shop.example")
            .header(sent, "down")
            .header(canonical, "down")
            .body(Full::default())
            .unwrap();
        let text = c.request(req).await.text();
        assert!(values(&text, canonical).is_empty(), "{text}");
        assert!(spellings_of(&text, canonical).is_empty(), "{sent} was forwarded:\n{text}");
    }
}

#[tokio::test]
async fn http2_cookie_crumbs_reach_an_http1_backend_as_one_line() {
    // Reproduction: an h2c client sending `cookie: a=1` and `cookie: b=2` as two fields
    // (as HTTP/2 clients do) made Tether send two `Cookie` lines to the HTTP/1.1 backend,
    // which many servers read as the first one only.
    let b = backends(1).await;
    let t = Tether::start(&config("round_robin", &[&b[0]], &[], ""));
    let stream = TcpStream::connect(t.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("http://{}/headers", t.addr()))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Full::default())
        .unwrap();
    let r = sender.send_request(req).await.unwrap();
    assert_eq!(r.status(), 200);
    let text = String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.starts_with("GET /headers HTTP/1.1\n"), "{text}");
    assert_eq!(values(&text, "cookie"), ["a=1; b=2"], "{text}");
}

#[tokio::test]
async fn the_access_log_bounds_uris_and_counts_dropped_lines() {
    // Reproduction: a request for a 10 KiB URI was logged with all of it (up to 64 KiB
    // per queued line, in an unbounded queue), and /metrics had no
    // `tether_access_log_dropped_total` to say when lines are lost.
    let b = backends(1).await;
    let t = Tether::start(&config("round_robin", &[&b[0]], &[], ADMIN));
    let long = format!("/status?code=200&pad={}", "x".repeat(10 * 1024));
    let r = Client::connect(t.addr()).await.get(&long).await;
    assert_eq!(r.status, 200);
    let lines = t.wait_access_lines(1).await;
    let line = lines.iter().find(|l| l.contains("/status?code=200&pad=")).expect("the request's line");
    assert!(line.len() < 4096 + 400, "a {} byte line", line.len());
    assert!(line.contains("xxx... HTTP/1.1\""), "{}", &line[line.len() - 300..]);
    let admin = t.admin();
    let req = Request::get("/metrics").header("host", admin.to_string()).body(Full::default()).unwrap();
    let r = Client::connect(admin).await.request(req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let metrics = r.text();
    assert!(
        metrics.lines().any(|l| l == "tether_access_log_dropped_total 0"),
        "{}",
        metrics.lines().filter(|l| l.contains("access_log")).collect::<Vec<_>>().join("\n")
    );
}

/// The `Set-Cookie` of Tether's own cookie on a response, if any.
fn tether_cookie(r: &Resp) -> Option<String> {
    r.headers.get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_string()).find(|c| c.starts_with("tether="))
}

#[tokio::test]
async fn tethers_cookie_is_secure_behind_a_trusted_https_proxy() {
    // Reproduction: behind a trusted TLS-terminating proxy (`X-Forwarded-Proto: https`)
    // and with `cookie.secure` unset, Tether's `Set-Cookie` had no `Secure`, so a browser
    // would send the session cookie over plain HTTP too.
    let b = backends(1).await;
    let t = Tether::start(&sticky(trusting(config("round_robin", &[&b[0]], &[], ""))));
    let mut c = Client::connect(t.addr()).await;
    let req = Request::get("/")
        .header("host", "shop.example")
        .header("x-forwarded-proto", "https")
        .body(Full::default())
        .unwrap();
    let cookie = tether_cookie(&c.request(req).await).expect("a new session gets Tether's cookie");
    assert!(cookie.split(';').any(|a| a.trim().eq_ignore_ascii_case("secure")), "{cookie}");
}

#[tokio::test]
async fn an_untrusted_x_forwarded_proto_does_not_make_the_cookie_secure() {
    // Not a reproduction: the other half of the rule above, true before and after.
    let b = backends(1).await;
    let t = Tether::start(&sticky(config("round_robin", &[&b[0]], &[], "")));
    let mut c = Client::connect(t.addr()).await;
    let req = Request::get("/")
        .header("host", "shop.example")
        .header("x-forwarded-proto", "https")
        .body(Full::default())
        .unwrap();
    let cookie = tether_cookie(&c.request(req).await).expect("a new session gets Tether's cookie");
    assert!(!cookie.to_ascii_lowercase().contains("secure"), "{cookie}");
}

/// A backend that answers every request on a connection with `cache_control`.
async fn cacheable_backend(cache_control: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                loop {
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        let body = "cached page";
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nCache-Control: {cache_control}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_shared_cache_may_not_store_a_response_carrying_tethers_cookie() {
    // Reproduction: the backend answered `Cache-Control: public, max-age=600` (or with
    // `s-maxage`); Tether added its session cookie and left the response public, so a
    // CDN could store it and hand the session to every later visitor.
    for (backend_says, client_gets) in
        [("public, max-age=600", "private, max-age=600"), ("s-maxage=600, max-age=60", "private, max-age=60")]
    {
        let addr = cacheable_backend(backend_says).await;
        let t = Tether::start(&sticky(pool_of(&[("app-1", addr)], "", "")));
        let r = get(t.addr(), "/").await;
        assert_eq!(r.status, 200);
        assert!(tether_cookie(&r).is_some(), "{:?}", r.headers);
        let cc: Vec<_> = r.headers.get_all("cache-control").iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(cc, [client_gets], "backend said {backend_says:?}");
    }
}

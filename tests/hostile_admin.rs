//! Issue 11: a failed reload must not close a listener, the admin API must not obey other
//! sites' pages (cross-site writes, DNS rebinding, framing), its token and bind address
//! change on reload, and no input may panic it.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

const TOKEN_A: &str = "first-admin-token-0123";
const TOKEN_B: &str = "second-admin-token-4567";

/// One request on a new connection to the admin listener, with the given headers (no
/// `Host` is added: give one). Connection errors are returned, not panicked on.
async fn send(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Result<Resp, String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut r = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = sender.send_request(r.body(Full::<Bytes>::default()).unwrap()).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = http_body_util::BodyExt::collect(body).await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Resp { status: parts.status, headers: parts.headers, body })
}

async fn call(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
    send(addr, method, path, headers).await.unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// The admin state of backend `name` of pool `web`, asked the way a local tool asks.
async fn admin_state(admin: SocketAddr, name: &str) -> String {
    let host = admin.to_string();
    let r = call(admin, "GET", "/api/pools/web", &[("host", &host)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let b = v["backends"].as_array().unwrap().iter().find(|b| b["name"] == name).unwrap().clone();
    b["admin_state"].as_str().unwrap().to_string()
}

/// The address of the last "admin listening on" line of the log.
fn last_admin_address(t: &Tether) -> Option<SocketAddr> {
    t.log().lines().rev().find_map(|l| l.split("admin listening on ").nth(1)?.split_whitespace().next()?.parse().ok())
}

fn one_pool(b: &[DemoBackend], admin: &str) -> String {
    let refs: Vec<&DemoBackend> = b.iter().collect();
    config("round_robin", &refs, &[], admin)
}

// Reproduction (item 1): listener "web" on a free port; the config moves it to a port
// another socket holds; SIGHUP. Before the fix the log says "reload rejected, the running
// config stays in force" and then "listener closed", and the old port refuses
// connections: the old socket was stopped before the new one was bound.
#[tokio::test]
async fn failed_reload_keeps_a_moved_listener_serving() {
    let b = backends(1).await;
    let cfg = one_pool(&b, "");
    let t = Tether::start(&cfg);
    let old = t.addr();
    assert_eq!(get(old, "/").await.status, 200);

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap();
    let moved = cfg.replacen("bind = \"127.0.0.1:0\"", &format!("bind = \"{busy_port}\""), 1);
    assert_ne!(moved, cfg);
    reload(&t, &moved, "reload rejected, the running config stays in force").await;
    // The listener's accept loop stops asynchronously: a second rejected reload is a
    // barrier after which an old-code stop would have long taken effect.
    reload(&t, &moved, "reload rejected, the running config stays in force").await;
    for i in 0..3 {
        let r = send(old, "GET", "/", &[("host", "test.local")]).await;
        assert!(r.as_ref().is_ok_and(|r| r.status == 200), "request {i} to the old port after a failed reload: {r:?}");
    }
    assert!(!t.log().contains("listener closed"), "a failed reload closed a listener:\n{}", t.log());
    drop(busy);

    // A move that can bind: the new address serves, then the old one stops.
    let elsewhere = cfg.replacen("bind = \"127.0.0.1:0\"", "bind = \"127.0.0.2:0\"", 1);
    reload(&t, &elsewhere, "config reloaded").await;
    let new: SocketAddr = t
        .log()
        .lines()
        .rev()
        .find_map(|l| l.split("listening on 127.0.0.2:").nth(1)?.split_whitespace().next()?.parse::<u16>().ok())
        .map(|p| SocketAddr::from(([127, 0, 0, 2], p)))
        .expect("the moved listener logged its address");
    assert_eq!(get(new, "/").await.status, 200);
    wait_until_async("the old port of a moved listener refuses connections", Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(old).await.is_err()
    })
    .await;
}

// Reproduction (item 2, cross-site writes): no admin.token; a page on evil.example posts a
// form to http://127.0.0.1:9901/api/pools/web/backends/app-1/drain. The browser sends
// `Origin: http://evil.example` (and `Sec-Fetch-Site: cross-site`) and needs no CORS
// preflight; before the fix Tether answers 200 and drains the backend.
#[tokio::test]
async fn other_sites_pages_cannot_write() {
    let b = backends(2).await;
    let t = Tether::start(&one_pool(&b, ADMIN));
    let admin = t.admin();
    let host = admin.to_string();
    let drain = "/api/pools/web/backends/app-1/drain";
    let form = ("content-type", "application/x-www-form-urlencoded");
    for headers in [
        vec![("host", host.as_str()), ("origin", "http://evil.example"), form],
        vec![("host", host.as_str()), ("origin", "null"), form],
        vec![("host", host.as_str()), ("sec-fetch-site", "cross-site"), form],
        vec![("host", host.as_str()), ("sec-fetch-site", "same-site"), form],
        // Another port of the same host is another origin.
        vec![("host", host.as_str()), ("origin", "http://127.0.0.1:1"), form],
    ] {
        let r = call(admin, "POST", drain, &headers).await;
        assert_eq!(r.status, 403, "{headers:?}: {}", r.text());
        assert_eq!(admin_state(admin, "app-1").await, "enabled", "{headers:?} drained app-1");
    }
    for path in ["/api/reload", "/api/pools/web/backends/app-2/disable"] {
        let r = call(admin, "POST", path, &[("host", &host), ("origin", "http://evil.example")]).await;
        assert_eq!(r.status, 403, "POST {path}: {}", r.text());
    }
    assert!(!t.log().contains("config reloaded") && !t.log().contains("reload rejected"), "{}", t.log());
    assert_eq!(admin_state(admin, "app-2").await, "enabled");

    // The dashboard's own fetches are same-origin, and tools send no Origin: both work.
    let own = format!("http://{admin}");
    let r = call(admin, "POST", drain, &[("host", &host), ("origin", &own), ("sec-fetch-site", "same-origin")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call(admin, "POST", "/api/pools/web/backends/app-1/enable", &[("host", "localhost")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

// Reproduction (item 2, DNS rebinding): evil.example's page, after its name is rebound to
// 127.0.0.1, reads http://evil.example:9901/api/pools with `Host: evil.example:9901`; before
// the fix Tether answers 200 (loopback reads never need the token, even with one set), so
// the page reads pools, metrics and session lookups.
#[tokio::test]
async fn rebinding_hosts_are_misdirected() {
    let b = backends(1).await;
    let t = Tether::start(&one_pool(&b, &format!("{ADMIN}token = \"{TOKEN_A}\"\n")));
    let admin = t.admin();
    let evil = format!("evil.example:{}", admin.port());
    for path in ["/", "/api/pools", "/api/pools/web", "/metrics", "/api/pools/web/sessions?key=ada&kind=client_ip"] {
        for host in [evil.as_str(), "evil.example", "127.0.0.1.evil.example", "localhost.evil.example:1"] {
            let r = call(admin, "GET", path, &[("host", host)]).await;
            assert_eq!(r.status, 421, "GET {path} with Host {host}: {}", r.text());
        }
        let r = call(admin, "GET", path, &[("host", &evil), ("authorization", &format!("Bearer {TOKEN_A}"))]).await;
        assert_eq!(r.status, 421, "GET {path} with a token and Host {evil}");
    }
    // A write with the right token but a rebinding host is refused too.
    let r =
        call(admin, "POST", "/api/reload", &[("host", &evil), ("authorization", &format!("Bearer {TOKEN_A}"))]).await;
    assert_eq!(r.status, 421, "{}", r.text());

    let port = admin.port();
    for host in [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_string(),
        format!("localhost:{port}"),
        "LOCALHOST".to_string(),
        format!("[::1]:{port}"),
        "[::1]".to_string(),
    ] {
        let r = call(admin, "GET", "/api/pools", &[("host", &host)]).await;
        assert_eq!(r.status, 200, "Host {host}: {}", r.text());
    }
}

// Reproduction (item 2, framing): any admin page can be put in an <iframe> by another
// site (clickjacking the dashboard's buttons); before the fix no answer carries
// `Content-Security-Policy: frame-ancestors 'none'` or `X-Frame-Options`.
#[tokio::test]
async fn every_admin_answer_forbids_framing() {
    let b = backends(1).await;
    let t = Tether::start(&one_pool(&b, &format!("{ADMIN}token = \"{TOKEN_A}\"\n")));
    let admin = t.admin();
    let host = admin.to_string();
    for (method, path, host) in [
        ("GET", "/", host.as_str()),
        ("GET", "/api/pools", host.as_str()),
        ("GET", "/metrics", host.as_str()),
        ("GET", "/nowhere", host.as_str()),
        ("POST", "/api/reload", host.as_str()), // 401
        ("GET", "/api/pools", "evil.example"),  // 421
    ] {
        let r = call(admin, method, path, &[("host", host)]).await;
        let csp = r.headers.get("content-security-policy").and_then(|v| v.to_str().ok());
        assert_eq!(csp, Some("frame-ancestors 'none'"), "{method} {path} ({}): {:?}", r.status, r.headers);
        let xfo = r.headers.get("x-frame-options").and_then(|v| v.to_str().ok());
        assert_eq!(xfo, Some("DENY"), "{method} {path} ({})", r.status);
    }
}

// Reproduction (item 2, reloadable token): start with admin.token A, change it to B, send
// SIGHUP. Before the fix the reload logs no admin change and B is refused (401) while A
// still works until a restart.
#[tokio::test]
async fn a_rotated_token_applies_on_reload() {
    let b = backends(1).await;
    let with = |token: &str| one_pool(&b, &format!("{ADMIN}token = \"{token}\"\n"));
    let t = Tether::start(&with(TOKEN_A));
    let admin = t.admin();
    let host = admin.to_string();
    let drain = "/api/pools/web/backends/app-1/drain";
    let bearer = |t: &str| format!("Bearer {t}");
    let r = call(admin, "POST", drain, &[("host", &host), ("authorization", &bearer(TOKEN_A))]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // A keep-alive connection opened before the reload sees the new token too.
    let mut kept = Client::connect(admin).await;

    reload(&t, &with(TOKEN_B), "config reloaded").await;
    assert!(t.log().contains("reload: admin token changed"), "{}", t.log());
    assert!(!t.log().contains(TOKEN_A) && !t.log().contains(TOKEN_B), "a token was logged:\n{}", t.log());
    let enable = "/api/pools/web/backends/app-1/enable";
    let r = call(admin, "POST", enable, &[("host", &host), ("authorization", &bearer(TOKEN_A))]).await;
    assert_eq!(r.status, 401, "the old token still works: {}", r.text());
    let r = call(admin, "POST", enable, &[("host", &host), ("authorization", &bearer(TOKEN_B))]).await;
    assert_eq!(r.status, 200, "the new token is refused: {}", r.text());
    let req = |token: &str| {
        Request::post(drain).header("host", &host).header("authorization", bearer(token)).body(Full::default()).unwrap()
    };
    assert_eq!(kept.request(req(TOKEN_A)).await.status, 401);
    assert_eq!(kept.request(req(TOKEN_B)).await.status, 200);
}

// Reproduction (item 2, reloadable bind): move [admin] bind from 127.0.0.1:0 to
// 127.0.0.2:0 and send SIGHUP. Before the fix nothing happens: the diff does not mention
// the admin listener and it stays where it was until a restart.
#[tokio::test]
async fn a_moved_admin_listener_is_rebound() {
    let b = backends(1).await;
    let cfg = one_pool(&b, ADMIN);
    let t = Tether::start(&cfg);
    let old = t.admin();
    // The admin bind comes first in the file, before the listener's.
    let moved = cfg.replacen("bind = \"127.0.0.1:0\"", "bind = \"127.0.0.2:0\"", 1);
    reload(&t, &moved, "config reloaded").await;
    assert!(
        t.log().contains("reload: admin listener moved from 127.0.0.1:0 to 127.0.0.2:0"),
        "the diff does not say the admin listener moved:\n{}",
        t.log()
    );
    let new = last_admin_address(&t).unwrap();
    assert_eq!(new.ip().to_string(), "127.0.0.2", "{}", t.log());
    let r = call(new, "GET", "/api/pools", &[("host", &new.to_string())]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until_async("the old admin address refuses connections", Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(old).await.is_err()
    })
    .await;

    // A move to an address that cannot be bound is rejected and the admin listener stays.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = busy.local_addr().unwrap();
    let bad = cfg.replacen("bind = \"127.0.0.1:0\"", &format!("bind = \"{taken}\""), 1);
    reload(&t, &bad, "reload rejected, the running config stays in force").await;
    drop(busy);
    let r = call(new, "GET", "/api/pools", &[("host", &new.to_string())]).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

// Reproduction (item 3): `printf 'GET /%%a\xe4\xb8\xad HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n' |
// nc 127.0.0.1 9901`: before the fix percent_decode slices the path between the bytes of
// '中' and panics, and the connection closes without an answer.
#[tokio::test]
async fn raw_utf8_in_the_path_does_not_panic() {
    let b = backends(1).await;
    let t = Tether::start(&one_pool(&b, ADMIN));
    let admin = t.admin();
    for target in
        [&b"/%a\xe4\xb8\xad"[..], b"/api/pools/%\xe4\xb8\xad", b"/api/pools/web/sessions?key=%a\xe4\xb8\xad&kind=%"]
    {
        let mut req = b"GET ".to_vec();
        req.extend_from_slice(target);
        req.extend_from_slice(b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        let answer = raw(admin, &req, Duration::from_secs(5)).await;
        let shown = String::from_utf8_lossy(target);
        assert!(answer.starts_with("HTTP/1.1 4"), "GET {shown}: {answer:?}\n{}", t.log());
    }
    assert!(!t.log().contains("panicked"), "{}", t.log());
}

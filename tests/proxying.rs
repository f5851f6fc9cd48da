//! Forwarding: headers, streaming bodies, HTTP/2 from clients, WebSocket upgrades.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn request_headers_are_rewritten_for_the_backend() {
    let b = backends(1).await;
    let t = Tether::start(&config("round_robin", &[&b[0]], &[], ""));
    let mut c = Client::connect(t.addr()).await;
    let req = Request::get("/headers?x=1")
        .header("host", "Shop.Example:8443")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .header("x-app", "kept")
        .body(Full::default())
        .unwrap();
    let r = c.request(req).await;
    let text = r.text();
    assert!(text.starts_with("GET /headers?x=1 HTTP/1.1\n"), "{text}");
    // Host is preserved; hop-by-hop headers and the ones Connection names are gone.
    assert_eq!(values(&text, "host"), ["Shop.Example:8443"]);
    for gone in ["connection", "x-private", "keep-alive", "proxy-connection", "te"] {
        assert!(values(&text, gone).is_empty(), "{gone} was forwarded:\n{text}");
    }
    assert_eq!(values(&text, "x-app"), ["kept"]);
    // The client is not a trusted proxy: its forwarding headers are replaced, not trusted.
    assert_eq!(values(&text, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(values(&text, "x-forwarded-proto"), ["http"]);
    assert_eq!(values(&text, "x-forwarded-host"), ["Shop.Example:8443"]);
}

#[tokio::test]
async fn trusted_proxies_have_their_forwarding_headers_extended() {
    let b = backends(1).await;
    let cfg = config("round_robin", &[&b[0]], &[], "")
        .replace("pool = \"web\"\n", "pool = \"web\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n");
    let t = Tether::start(&cfg);
    let mut c = Client::connect(t.addr()).await;
    let req = Request::get("/headers")
        .header("host", "shop.example")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-for", "10.0.0.1")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "www.shop.example")
        .body(Full::default())
        .unwrap();
    let text = c.request(req).await.text();
    assert_eq!(values(&text, "x-forwarded-for"), ["203.0.113.7, 10.0.0.1, 127.0.0.1"], "{text}");
    assert_eq!(values(&text, "x-forwarded-proto"), ["https"]);
    assert_eq!(values(&text, "x-forwarded-host"), ["www.shop.example"]);
}

/// A backend that answers every request with hop-by-hop headers it should not pass on.
async fn chatty_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                let body = "hello";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: x-hop, keep-alive\r\nX-Hop: 1\r\nKeep-Alive: timeout=9\r\nX-App: 2\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(resp.as_bytes()).await.unwrap();
            });
        }
    });
    addr
}

#[tokio::test]
async fn response_hop_by_hop_headers_are_removed() {
    let addr = chatty_backend().await;
    let cfg = format!(
        "[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[pools.p]\nbackends = [{{ address = \"{addr}\" }}]\n"
    );
    let t = Tether::start(&cfg);
    let r = get(t.addr(), "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello");
    assert!(r.headers.get("x-hop").is_none(), "{:?}", r.headers);
    assert!(r.headers.get("keep-alive").is_none(), "{:?}", r.headers);
    assert_eq!(r.headers.get("x-app").unwrap(), "2");
}

#[tokio::test]
async fn routes_by_host_and_path_prefix() {
    let b = backends(3).await;
    let cfg = format!(
        r#"[[listeners]]
bind = "127.0.0.1:0"
[[listeners.routes]]
host = "admin.example"
pool = "admin"
[[listeners.routes]]
path_prefix = "/api/"
pool = "api"
[[listeners.routes]]
pool = "www"

[pools.www]
backends = [{{ name = "app-1", address = "{}" }}]
[pools.api]
backends = [{{ name = "app-2", address = "{}" }}]
[pools.admin]
backends = [{{ name = "app-3", address = "{}" }}]
"#,
        b[0].address, b[1].address, b[2].address
    );
    let t = Tether::start(&cfg);
    let mut c = Client::connect(t.addr()).await;
    let mut get_with_host = async |host: &str, path: &str| {
        let req = Request::get(path).header("host", host).body(Full::default()).unwrap();
        c.request(req).await.backend()
    };
    assert_eq!(get_with_host("www.example", "/").await, "app-1");
    assert_eq!(get_with_host("www.example", "/api/cart").await, "app-2");
    assert_eq!(get_with_host("ADMIN.example:8080", "/api/cart").await, "app-3");
    assert_eq!(get_with_host("www.example", "/apix").await, "app-1");
}

/// A request body of `n` bytes, made as it is sent.
struct Upload {
    left: u64,
}

impl http_body::Body for Upload {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(256 * 1024);
        self.left -= n;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![b'u'; n as usize])))))
    }
}

const MIB_100: u64 = 100 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_100_mib_both_ways_without_buffering() {
    let b = backends(1).await;
    let t = Tether::start(&config("round_robin", &[&b[0]], &[], "[access_log]\nformat = \"off\"\n"));
    let (rss_before, _) = t.memory_kib();

    // Download: the backend generates 100 MiB; count it as it arrives.
    let stream = TcpStream::connect(t.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("/bytes?n={MIB_100}")).header("host", "x").body(Full::default()).unwrap();
    let mut body = sender.send_request(req).await.unwrap().into_body();
    let mut got = 0u64;
    while let Some(f) = body.frame().await {
        got += f.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(got, MIB_100);

    // Upload: 100 MiB sent chunked to /echo, which streams it straight back.
    let stream = TcpStream::connect(t.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Upload>(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::post("/echo").header("host", "x").body(Upload { left: MIB_100 }).unwrap();
    let mut body = sender.send_request(req).await.unwrap().into_body();
    let mut got = 0u64;
    while let Some(f) = body.frame().await {
        got += f.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(got, MIB_100);

    // Had either body been buffered whole, Tether's peak memory would have grown by 100 MiB.
    let (_, peak) = t.memory_kib();
    assert!(peak < rss_before + 40 * 1024, "peak RSS {peak} KiB, started at {rss_before} KiB");
}

#[tokio::test]
async fn http2_prior_knowledge_clients_are_served() {
    let b = backends(2).await;
    let t = Tether::start(&config("round_robin", &[&b[0], &b[1]], &[], ""));
    let stream = TcpStream::connect(t.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut seen = Vec::new();
    for _ in 0..4 {
        let req = Request::get(format!("http://{}/headers", t.addr())).body(Full::default()).unwrap();
        let r = sender.send_request(req).await.unwrap();
        assert_eq!(r.status(), 200);
        seen.push(r.headers()["x-backend"].to_str().unwrap().to_string());
        let text = String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        // The backend gets HTTP/1.1 with a Host taken from :authority.
        assert!(text.starts_with("GET /headers HTTP/1.1\n"), "{text}");
        assert_eq!(values(&text, "host"), [t.addr().to_string()]);
    }
    assert_eq!(seen, ["app-1", "app-2", "app-1", "app-2"]);
    // A POST with a body over HTTP/2 reaches the backend whole.
    let req =
        Request::post(format!("http://{}/echo", t.addr())).body(Full::new(Bytes::from_static(b"h2 body"))).unwrap();
    let r = sender.send_request(req).await.unwrap();
    assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "h2 body");
}

#[tokio::test]
async fn websocket_is_tunnelled_both_ways() {
    let addr = websocket_backend().await;
    let cfg = format!(
        "[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"ws\"\n[pools.ws]\nbackends = [{{ address = \"{addr}\" }}]\n"
    );
    let t = Tether::start(&cfg);
    let stream = TcpStream::connect(t.addr()).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{}/chat", t.addr()), stream).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..5 {
        ws.send(tokio_tungstenite::tungstenite::Message::text(format!("hi {i}"))).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(m.to_text().unwrap(), format!("echo: hi {i}"));
    }
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn keep_alive_connections_are_reused_to_backends() {
    let b = backends(1).await;
    let t = Tether::start(&config("round_robin", &[&b[0]], &[], ""));
    let mut c = Client::connect(t.addr()).await;
    let mut peers = std::collections::HashSet::new();
    for _ in 0..50 {
        let text = c.get("/headers").await.text();
        let peer = text.lines().nth(1).unwrap().to_string();
        peers.insert(peer);
    }
    // Sequential requests reuse one pooled backend connection (a second may appear if a
    // connection was not yet marked ready when the next request came).
    assert!(peers.len() <= 2, "{} backend connections for 50 sequential requests", peers.len());
}

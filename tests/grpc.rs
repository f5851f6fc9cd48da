//! Pools that speak HTTP/2 to their backends (`protocol = "http2"`): a gRPC-style
//! backend that streams both ways and ends with trailers, reached through Tether over
//! h2c and over TLS (ALPN `h2`), with affinity on a metadata key, shared connections with
//! a stream limit, and health checks over HTTP/2 and by the gRPC health protocol.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

type Body = BoxBody<Bytes, Infallible>;

/// A gRPC-style HTTP/2 backend. `/echo.Echo/Stream` echoes each data frame as it comes
/// and ends with trailers (`grpc-status: 0`, and the `x-user` it was sent as
/// `x-echo-user`); `/grpc.health.v1.Health/Check` answers SERVING (or NOT_SERVING when
/// `serving` is false). Every response names the backend in `x-backend`.
struct GrpcBackend {
    name: &'static str,
    address: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Requests it has seen, with their `te` and `:authority`.
    seen: Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl GrpcBackend {
    async fn start(name: &'static str, tls: Option<Arc<rustls::ServerConfig>>, serving: bool) -> GrpcBackend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = l.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (count, log) = (connections.clone(), seen.clone());
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let (log, acceptor) = (log.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(name, serving, req, log.clone()));
                    let http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    match acceptor {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(s), service).await;
                        }
                        Some(a) => {
                            let Ok(s) = a.accept(s).await else { return };
                            let _ = http.serve_connection(TokioIo::new(s), service).await;
                        }
                    }
                });
            }
        });
        GrpcBackend { name, address, connections, seen }
    }
}

async fn handle(
    name: &'static str,
    serving: bool,
    req: Request<Incoming>,
    seen: Arc<std::sync::Mutex<Vec<(String, String)>>>,
) -> Result<Response<Body>, Infallible> {
    let te = req.headers().get("te").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let authority = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
    seen.lock().unwrap().push((te, authority));
    let user = req.headers().get("x-user").cloned();
    let path = req.uri().path().to_string();
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let mut body = req.into_body();
    match path.as_str() {
        "/grpc.health.v1.Health/Check" => {
            tokio::spawn(async move {
                while body.frame().await.is_some() {}
                // HealthCheckResponse { status: SERVING (1) or NOT_SERVING (2) }, framed.
                let status = if serving { 1 } else { 2 };
                let _ = tx.send(Ok(Frame::data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status])))).await;
                let _ = tx.send(Ok(Frame::trailers(trailers("0", None)))).await;
            });
        }
        "/slow" => {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"slow")))).await;
            });
        }
        _ => {
            tokio::spawn(async move {
                while let Some(Ok(frame)) = body.frame().await {
                    if let Ok(d) = frame.into_data() {
                        if tx.send(Ok(Frame::data(d))).await.is_err() {
                            return;
                        }
                    }
                }
                let _ = tx.send(Ok(Frame::trailers(trailers("0", user)))).await;
            });
        }
    }
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let mut response = Response::new(StreamBody::new(stream).boxed());
    response.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
    response.headers_mut().insert("x-backend", HeaderValue::from_static(name));
    Ok(response)
}

fn trailers(status: &str, user: Option<HeaderValue>) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_str(status).unwrap());
    t.insert("grpc-message", HeaderValue::from_static("done"));
    if let Some(u) = user {
        t.insert("x-echo-user", u);
    }
    t
}

/// An HTTP/2 prior-knowledge client connection.
async fn h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    sender
}

fn pool_config(backends: &[&GrpcBackend], pool_extra: &str, extra: &str) -> String {
    let list: Vec<String> =
        backends.iter().map(|b| format!("{{ name = \"{}\", address = \"{}\" }}", b.name, b.address)).collect();
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\npool = \"grpc\"\n\
         [pools.grpc]\nprotocol = \"http2\"\nbackends = [{}]\n{pool_extra}\n{extra}",
        list.join(", ")
    )
}

/// A bidirectional stream through Tether: each message is echoed before the next is
/// sent, then the trailers arrive. Returns the backend's name and the trailers.
async fn echo_stream(
    sender: &mut hyper::client::conn::http2::SendRequest<Body>,
    addr: SocketAddr,
    user: &str,
) -> (String, HeaderMap) {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let req = Request::post(format!("http://{addr}/echo.Echo/Stream"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-user", user)
        .body(StreamBody::new(stream).boxed())
        .unwrap();
    tx.send(Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x03one")))).await.unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let backend = response.headers()["x-backend"].to_str().unwrap().to_string();
    let mut body = response.into_body();
    // The first message comes back while the request is still open: both ways stream.
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"\0\0\0\0\x03one");
    tx.send(Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x03two")))).await.unwrap();
    let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&second[..], b"\0\0\0\0\x03two");
    drop(tx);
    let trailers = loop {
        let frame = body.frame().await.expect("trailers").unwrap();
        if let Ok(t) = frame.into_trailers() {
            break t;
        }
    };
    (backend, trailers)
}

#[tokio::test]
async fn grpc_streams_both_ways_with_trailers_and_sticks_by_metadata_over_h2c() {
    let b1 = GrpcBackend::start("grpc-1", None, true).await;
    let b2 = GrpcBackend::start("grpc-2", None, true).await;
    let affinity = "[pools.grpc.affinity]\nkeys = [\"header:x-user\"]\n";
    let t = Tether::start(&pool_config(&[&b1, &b2], "", affinity));
    let mut sender = h2(t.addr()).await;
    let mut homes = std::collections::HashMap::new();
    for round in 0..3 {
        for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
            let (backend, trailers) = echo_stream(&mut sender, t.addr(), user).await;
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(trailers["grpc-message"], "done");
            assert_eq!(trailers["x-echo-user"], user, "the backend had the metadata");
            let home = homes.entry(user).or_insert_with(|| backend.clone());
            assert_eq!(*home, backend, "{user} stays on its backend (round {round})");
        }
    }
    let used: std::collections::HashSet<_> = homes.values().collect();
    assert_eq!(used.len(), 2, "six users spread over both backends: {homes:?}");
    // The backend saw `te: trailers` and an :authority.
    let seen = b1.seen.lock().unwrap().clone();
    assert!(seen.iter().all(|(te, authority)| te == "trailers" && !authority.is_empty()), "{seen:?}");
}

#[tokio::test]
async fn backend_connections_are_shared_up_to_max_streams() {
    let b = GrpcBackend::start("grpc-1", None, true).await;
    let t = Tether::start(&pool_config(&[&b], "max_streams = 2", ""));
    // One after another: one connection carries them all.
    let mut sender = h2(t.addr()).await;
    for user in ["a", "b", "c", "d"] {
        echo_stream(&mut sender, t.addr(), user).await;
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 1, "sequential requests share one connection");
    // Six at once, at most two streams a connection: at least three connections.
    let mut waits = Vec::new();
    for _ in 0..6 {
        let mut s = sender.clone();
        let addr = t.addr();
        waits.push(tokio::spawn(async move {
            let req = Request::get(format!("http://{addr}/slow")).body(Full::new(Bytes::new()).boxed()).unwrap();
            let r = s.send_request(req).await.unwrap();
            r.into_body().collect().await.unwrap().to_bytes()
        }));
    }
    for w in waits {
        assert_eq!(&w.await.unwrap()[..], b"slow");
    }
    let n = b.connections.load(Ordering::SeqCst);
    assert!((3..=7).contains(&n), "six concurrent streams at two per connection took {n} connections in all");
}

#[tokio::test]
async fn grpc_over_tls_with_alpn_h2() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["grpc.internal".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let server = |alpn: &[&[u8]]| {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone(), CertificateDer::from(ca.der().to_vec())],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    };
    let b = GrpcBackend::start("grpc-1", Some(server(&[b"h2"])), true).await;
    let scratch = Scratch::new();
    let ca_file = scratch.write("ca.pem", &ca.pem());
    let tls = format!("[pools.grpc.tls]\nserver_name = \"grpc.internal\"\nca_file = \"{}\"\n", ca_file.display());
    let t = Tether::start(&pool_config(&[&b], "", &tls));
    let mut sender = h2(t.addr()).await;
    let (backend, trailers) = echo_stream(&mut sender, t.addr(), "alice").await;
    assert_eq!(backend, "grpc-1");
    assert_eq!(trailers["grpc-status"], "0");
    // The backend saw the `https` scheme's authority over TLS.
    assert!(b.seen.lock().unwrap().iter().all(|(_, a)| !a.is_empty()));

    // A TLS backend that does not speak ALPN cannot be known to speak HTTP/2: it is not used.
    let old = GrpcBackend::start("grpc-1", Some(server(&[])), true).await;
    let t = Tether::start(&pool_config(&[&old], "", &tls));
    let mut sender = h2(t.addr()).await;
    let req = Request::get(format!("http://{}/", t.addr())).body(Full::new(Bytes::new()).boxed()).unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 502);
    t.wait_log("did not agree to HTTP/2").await;
}

#[tokio::test]
async fn health_checks_speak_http2_and_the_grpc_health_protocol() {
    let up = GrpcBackend::start("grpc-1", None, true).await;
    let not_serving = GrpcBackend::start("grpc-2", None, false).await;
    let checks = [
        "[pools.grpc.health]\ncheck = \"grpc\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 1\nfall = 1\n",
        // An HTTP check over HTTP/2: both answer 200 to any path.
        "[pools.grpc.health]\ncheck = \"http\"\npath = \"/grpc.health.v1.Health/Check\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 1\nfall = 1\n",
    ];
    for (i, check) in checks.iter().enumerate() {
        let t = Tether::start(&pool_config(&[&up, &not_serving], "", check));
        let admin = t.admin();
        let want = if i == 0 { "down" } else { "up" };
        let state = |v: &serde_json::Value, name: &str| {
            let backends = v["pools"][0]["backends"].as_array().unwrap().clone();
            backends.into_iter().find(|b| b["name"] == name).unwrap()["health"].clone()
        };
        wait_until_async(&format!("check {i}: grpc-1 up, grpc-2 {want}"), Duration::from_secs(10), || async {
            let v = admin_json(admin, "/api/pools").await;
            state(&v, "grpc-1") == "up" && state(&v, "grpc-2") == want
        })
        .await;
        if i == 0 {
            // A service name is sent in the request; the log says why a backend is down.
            t.wait_log("NOT_SERVING").await;
        }
    }
}

/// Sends `request` on `s` and reads one response whole: by its length, or chunked to the
/// end of its trailer section, or to the connection's close.
async fn exchange(s: &mut TcpStream, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let lower = head.to_ascii_lowercase();
            if lower.contains("transfer-encoding: chunked") {
                if body.starts_with("0\r\n") && body.ends_with("\r\n\r\n")
                    || body.contains("\r\n0\r\n") && body.ends_with("\r\n\r\n")
                {
                    return text;
                }
            } else if let Some(n) =
                lower.lines().find_map(|l| l.strip_prefix("content-length: ")?.trim().parse::<usize>().ok())
            {
                if body.len() >= n {
                    return text;
                }
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        if n == 0 {
            return String::from_utf8_lossy(&got).to_string();
        }
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn http1_clients_reach_an_http2_pool() {
    let b1 = GrpcBackend::start("grpc-1", None, true).await;
    let b2 = GrpcBackend::start("grpc-2", None, true).await;
    let affinity = "[pools.grpc.affinity]\nkeys = [\"header:x-user\"]\n";
    let t = Tether::start(&pool_config(&[&b1, &b2], "", &format!("{affinity}[access_log]\nformat = \"json\"\n")));
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    // A body of known length, echoed back chunked (the backend gave no length), with the
    // backend's trailers in the trailer section.
    let r = exchange(
        &mut s,
        b"POST /echo.Echo/Stream HTTP/1.1\r\nHost: shop\r\nX-User: alice\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    let lower = r.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked\r\n"), "{r}");
    assert!(
        r.ends_with("\r\n\r\n5\r\nhello\r\n0\r\ngrpc-status: 0\r\ngrpc-message: done\r\nx-echo-user: alice\r\n\r\n"),
        "{r:?}"
    );
    let home = r.lines().find_map(|l| l.strip_prefix("x-backend: ")).unwrap().to_string();
    // On the same connection: a chunked body, de-chunked for the backend and echoed.
    let r = exchange(
        &mut s,
        b"POST /echo.Echo/Stream HTTP/1.1\r\nHost: shop\r\nX-User: alice\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
    )
    .await;
    assert!(r.contains("\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n") || r.contains("\r\n7\r\nabcdefg\r\n0\r\n"), "{r:?}");
    assert!(r.contains(&format!("x-backend: {home}\r\n")), "alice stays on {home}: {r}");
    // Several users spread over both backends and each sticks.
    let mut homes = std::collections::HashMap::new();
    for _ in 0..2 {
        for user in ["bob", "carol", "dave", "erin", "frank", "grace"] {
            let req = format!("GET /x HTTP/1.1\r\nHost: shop\r\nX-User: {user}\r\n\r\n");
            let r = exchange(&mut s, req.as_bytes()).await;
            assert!(r.starts_with("HTTP/1.1 200"), "{r}");
            let b = r.lines().find_map(|l| l.strip_prefix("x-backend: ")).unwrap().to_string();
            assert_eq!(homes.entry(user).or_insert_with(|| b.clone()), &b);
        }
    }
    assert_eq!(homes.values().collect::<std::collections::HashSet<_>>().len(), 2, "{homes:?}\n{:#?}", t.access_lines());
    // Two requests in one write (pipelined): both answered, in order.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let two = b"GET /x HTTP/1.1\r\nHost: shop\r\nX-User: bob\r\n\r\nGET /y HTTP/1.1\r\nHost: shop\r\nX-User: carol\r\n\r\n";
        s.write_all(two).await.unwrap();
        let mut got = String::new();
        let mut buf = [0u8; 4096];
        while !got.contains("x-echo-user: carol\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "closed after {got:?}");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let bob = got.find("x-echo-user: bob").expect("bob's answer");
        assert!(bob < got.find("x-echo-user: carol").unwrap(), "{got}");
    }
    // An HTTP/1.0 client: no chunking, the body ends with the connection.
    let mut old = TcpStream::connect(t.addr()).await.unwrap();
    let r = exchange(&mut old, b"POST /echo.Echo/Stream HTTP/1.0\r\nHost: shop\r\nContent-Length: 3\r\n\r\nxyz").await;
    assert!(r.starts_with("HTTP/1.0 200 OK\r\n"), "{r}");
    assert!(!r.to_ascii_lowercase().contains("transfer-encoding"), "{r}");
    assert!(r.ends_with("\r\n\r\nxyz"), "{r:?}");
}

#[tokio::test]
async fn tethers_cookie_keeps_http1_and_http2_clients_on_one_http2_backend() {
    let b1 = GrpcBackend::start("grpc-1", None, true).await;
    let b2 = GrpcBackend::start("grpc-2", None, true).await;
    let t = Tether::start(&pool_config(&[&b1, &b2], "", "[pools.grpc.affinity]\nkeys = [\"cookie\"]\n"));
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    for _ in 0..4 {
        let first = exchange(&mut s, b"GET /x HTTP/1.1\r\nHost: shop\r\n\r\n").await;
        let cookie = first
            .lines()
            .find_map(|l| l.strip_prefix("set-cookie: "))
            .expect("Tether's cookie on a new session")
            .split(';')
            .next()
            .unwrap()
            .to_string();
        let home = first.lines().find_map(|l| l.strip_prefix("x-backend: ")).unwrap().to_string();
        for _ in 0..3 {
            let req = format!("GET /x HTTP/1.1\r\nHost: shop\r\nCookie: {cookie}\r\n\r\n");
            let r = exchange(&mut s, req.as_bytes()).await;
            assert!(r.contains(&format!("x-backend: {home}\r\n")), "{r}");
            assert!(!r.contains("set-cookie"), "a hit issues no new cookie: {r}");
        }
        // The same session from an HTTP/2 client.
        let mut sender = h2(t.addr()).await;
        let req = Request::get(format!("http://{}/x", t.addr()))
            .header("cookie", &cookie)
            .body(Full::new(Bytes::new()).boxed());
        let r = sender.send_request(req.unwrap()).await.unwrap();
        assert_eq!(r.headers()["x-backend"], home.as_str());
    }
}

#[test]
fn the_protocol_and_its_checks_are_checked_with_the_config() {
    let scratch = Scratch::new();
    let base =
        "[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[pools.p]\nbackends = [{ address = \"127.0.0.1:1\" }]\n";
    let cases = [
        (
            "protocol = \"http3\"\n",
            "t.toml:6:12: pool \"p\": protocol \"http3\" is not known: expected \"http1\" or \"http2\"",
        ),
        ("max_streams = 10\n", "t.toml:6:15: pool \"p\": max_streams is for protocol = \"http2\""),
        ("protocol = \"http2\"\nmax_streams = 0\n", "t.toml:7:15: pool \"p\": max_streams"),
        (
            "[pools.p.health]\ncheck = \"grpc\"\n",
            "t.toml:7:9: pool \"p\": health: check = \"grpc\" needs protocol = \"http2\"",
        ),
        (
            "protocol = \"http2\"\n[pools.p.health]\ncheck = \"http\"\nservice = \"shop\"\n",
            "t.toml:9:11: pool \"p\": health: service is for check = \"grpc\"",
        ),
    ];
    for (extra, expected) in cases {
        let path = scratch.write("t.toml", &format!("{base}{extra}"));
        let out = std::process::Command::new(bin()).arg("check").arg("-c").arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra}");
        assert!(err.contains(expected), "{extra}: {err}");
    }
    let ok = format!(
        "{base}protocol = \"http2\"\nmax_streams = 50\n[pools.p.health]\ncheck = \"grpc\"\nservice = \"shop\"\n"
    );
    let path = scratch.write("t.toml", &ok);
    let out = std::process::Command::new(bin()).arg("check").arg("-c").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_proxy_protocol_header_cannot_go_on_shared_http2_connections() {
    let scratch = Scratch::new();
    let src = "[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[pools.p]\nprotocol = \"http2\"\nsend_proxy_protocol = \"v2\"\nbackends = [{ address = \"127.0.0.1:1\" }]\n";
    let path = scratch.write("t.toml", src);
    let out = std::process::Command::new(bin()).arg("check").arg("-c").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("t.toml:6:23: pool \"p\": send_proxy_protocol is for protocol = \"http1\""), "{err}");
}

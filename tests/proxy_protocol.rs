//! The PROXY protocol, through the real `tether` binary on loopback: headers in (v1 and
//! v2, on http and tcp listeners) whose address becomes the client's for
//! `X-Forwarded-For`, `client_ip` affinity and the access log; headers refused where
//! required and missing, malformed, or sent by a source not trusted to send them; and
//! headers out (v1 and v2, to HTTP and TCP backends), where a backend connection serves
//! only the client connection it was opened for, and health checks send one too.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tether::proxy_header::{self, Parsed, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(10);

/// The address the tests' headers carry, as a proxy in front would write it.
const CLIENT: &str = "203.0.113.7:4444";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// What a [`Backend`] saw on one connection.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// The PROXY header it began with: `None` none, `Some(None)` one without addresses
    /// (`LOCAL`, `UNKNOWN`), `Some(Some((source, destination)))`.
    header: Option<Option<(SocketAddr, SocketAddr)>>,
    requests: usize,
}

/// A backend that reads a PROXY protocol header if the connection begins with one (with
/// Tether's own parser), then either answers HTTP/1.1 requests (heads only, keep-alive)
/// with what it knows of the connection, or echoes bytes after a line naming the source.
/// With `strict`, a connection without a header is closed unanswered, as servers that
/// expect the protocol do.
struct Backend {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Seen>>>,
}

impl Backend {
    async fn http(name: &str, strict: bool) -> Backend {
        Backend::start(name, strict, false).await
    }

    async fn echo(name: &str) -> Backend {
        Backend::start(name, true, true).await
    }

    async fn start(name: &str, strict: bool, echo: bool) -> Backend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let all = conns.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let id = {
                    let mut all = all.lock().unwrap();
                    all.push(Seen::default());
                    all.len() - 1
                };
                tokio::spawn(serve(s, name.clone(), id, all.clone(), strict, echo));
            }
        });
        Backend { addr, conns }
    }

    fn seen(&self) -> Vec<Seen> {
        self.conns.lock().unwrap().clone()
    }
}

async fn serve(mut s: TcpStream, name: String, id: usize, all: Arc<Mutex<Vec<Seen>>>, strict: bool, echo: bool) {
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 8192];
    // The header, if the connection begins with one.
    let header = loop {
        match proxy_header::parse(&pending) {
            Parsed::Partial => match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            },
            Parsed::NotProxy => break None,
            Parsed::Invalid(_) => return,
            Parsed::Whole { len, source, destination } => {
                pending.drain(..len);
                break Some(source.zip(destination));
            }
        }
    };
    all.lock().unwrap()[id].header = header;
    if strict && header.is_none() {
        return;
    }
    let source = match header {
        Some(Some((src, dst))) => format!("{src} dest={dst}"),
        Some(None) => "local".to_string(),
        None => "none".to_string(),
    };
    if echo {
        let _ = s.write_all(format!("{name} source={source}\n").as_bytes()).await;
        let _ = s.write_all(&pending).await;
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            if s.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
        return;
    }
    loop {
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
            pending.drain(..end + 4);
            all.lock().unwrap()[id].requests += 1;
            let xff = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for"))
                .map_or("-".to_string(), |(_, v)| v.trim().to_string());
            let body = format!("backend={name} conn={id} source={source} xff={xff}");
            let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            let close = head.to_ascii_lowercase().contains("\r\nconnection: close");
            if s.write_all(answer.as_bytes()).await.is_err() || close {
                return;
            }
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends `GET /` on `s` and reads the response's body (the backend's report).
async fn get_on(s: &mut TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    read_response(s).await.unwrap_or_else(|| panic!("no response"))
}

/// One response with a `Content-Length`: its body; `None` when the connection closed first.
async fn read_response(s: &mut TcpStream) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize =
                head.lines().find_map(|l| l.strip_prefix("content-length:")).unwrap().trim().parse().unwrap();
            if got.len() >= end + 4 + len {
                return Some(String::from_utf8_lossy(&got[end + 4..end + 4 + len]).into_owned());
            }
        }
        match tokio::time::timeout(LIMIT, s.read(&mut buf)).await.expect("a response in time") {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A field of a backend's report: `source=` gives `203.0.113.7:4444`.
fn field(report: &str, name: &str) -> String {
    report.split(' ').find_map(|w| w.strip_prefix(&format!("{name}="))).unwrap_or_default().to_string()
}

/// Reads until the peer closes, within `LIMIT`: what it sent.
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(LIMIT, s.read_to_end(&mut out)).await.expect("the connection closed in time");
    out
}

fn listener(protocol: &str, listener_extra: &str, pool: &str, backends: &[&Backend], extra: &str) -> String {
    let mut s = format!(
        "{extra}\n[[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\nprotocol = \"{protocol}\"\npool = \"web\"\n{listener_extra}\n\n[pools.web]\n{pool}\nbackends = [\n"
    );
    for (i, b) in backends.iter().enumerate() {
        s.push_str(&format!("  {{ name = \"b{i}\", address = \"{}\" }},\n", b.addr));
    }
    s.push_str("]\n");
    s
}

const REQUIRED: &str = "proxy_protocol = \"required\"\nproxy_protocol_from = [\"127.0.0.0/8\"]";
const OPTIONAL: &str = "proxy_protocol = \"optional\"\nproxy_protocol_from = [\"127.0.0.0/8\"]";

async fn metric(admin: SocketAddr, name: &str) -> String {
    let text = get(admin, "/metrics").await.text();
    text.lines().filter(|l| l.starts_with(name)).collect::<Vec<_>>().join("\n")
}

#[tokio::test]
async fn an_http_listener_takes_the_client_address_from_v1_and_v2_headers() {
    let b = Backend::http("b0", false).await;
    let t = Tether::start(&listener("http", REQUIRED, "", &[&b], "[access_log]\nformat = \"json\""));
    for version in [Version::V1, Version::V2] {
        let mut s = TcpStream::connect(t.addr()).await.unwrap();
        let header = proxy_header::write(version, addr(CLIENT), addr("192.0.2.1:80"));
        // The header and the request in one write: the request's bytes must not be
        // taken with the header.
        let mut first = header.as_bytes().to_vec();
        first.extend_from_slice(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
        s.write_all(&first).await.unwrap();
        let report = read_response(&mut s).await.expect("a response");
        assert_eq!(field(&report, "xff"), "203.0.113.7", "{version:?}: {report}");
        // The connection's next request is still the carried client's.
        let report = get_on(&mut s).await;
        assert_eq!(field(&report, "xff"), "203.0.113.7", "{version:?}: {report}");
    }
    let lines = t.wait_access_lines(4).await;
    assert!(lines.iter().all(|l| l.contains("\"client\":\"203.0.113.7:4444\"")), "{lines:?}");
}

#[tokio::test]
async fn client_ip_affinity_keys_on_the_carried_address() {
    let backends =
        [Backend::http("b0", false).await, Backend::http("b1", false).await, Backend::http("b2", false).await];
    let pool = "[pools.web.affinity]\nkeys = [\"client_ip\"]\nmapping = \"table\"\n";
    let cfg = listener("http", REQUIRED, "", &backends.iter().collect::<Vec<_>>(), "");
    let t = Tether::start(&format!("{cfg}{pool}"));
    let mut pinned: HashMap<String, String> = HashMap::new();
    for round in 0..3 {
        for host in 1..=12 {
            let client = format!("198.51.100.{host}:5000");
            let mut s = TcpStream::connect(t.addr()).await.unwrap();
            s.write_all(proxy_header::write(Version::V2, addr(&client), t.addr()).as_bytes()).await.unwrap();
            let report = get_on(&mut s).await;
            assert_eq!(field(&report, "xff"), format!("198.51.100.{host}"), "{report}");
            let backend = field(&report, "backend");
            let first = pinned.entry(client.clone()).or_insert_with(|| backend.clone());
            assert_eq!(*first, backend, "{client} moved in round {round}");
        }
    }
    // All twelve come from 127.0.0.1: only the carried addresses can spread them.
    let used: HashSet<&String> = pinned.values().collect();
    assert!(used.len() >= 2, "twelve carried addresses all on one backend: {pinned:?}");
}

#[tokio::test]
async fn a_required_header_that_is_missing_or_malformed_closes_the_connection_unanswered() {
    let b = Backend::http("b0", false).await;
    let t = Tether::start(&listener("http", REQUIRED, "", &[&b], "[admin]\nbind = \"127.0.0.1:0\""));
    for first in [
        &b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"[..],
        b"PROXY TCP4 203.0.113.7 192.0.2.1 4444\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0bGET / HTTP/1.1\r\nHost: t\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(t.addr()).await.unwrap();
        s.write_all(first).await.unwrap();
        let answer = until_closed(&mut s).await;
        assert!(answer.is_empty(), "{:?} got {:?}", first.escape_ascii().to_string(), String::from_utf8_lossy(&answer));
    }
    assert!(b.seen().is_empty(), "{:?}", b.seen());
    assert_eq!(
        metric(t.admin(), "tether_proxy_protocol_refused_total").await,
        "tether_proxy_protocol_refused_total{listener=\"edge\"} 3"
    );
}

#[tokio::test]
async fn a_header_from_an_untrusted_source_is_refused() {
    let b = Backend::http("b0", false).await;
    let untrusted = "proxy_protocol = \"optional\"\nproxy_protocol_from = [\"10.0.0.0/8\"]";
    let t = Tether::start(&listener("http", untrusted, "", &[&b], "[admin]\nbind = \"127.0.0.1:0\""));
    for version in [Version::V1, Version::V2] {
        let mut s = TcpStream::connect(t.addr()).await.unwrap();
        let mut first = proxy_header::write(version, addr(CLIENT), t.addr()).as_bytes().to_vec();
        first.extend_from_slice(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
        s.write_all(&first).await.unwrap();
        let answer = until_closed(&mut s).await;
        assert!(answer.is_empty(), "{version:?}: {:?}", String::from_utf8_lossy(&answer));
    }
    assert!(b.seen().is_empty(), "{:?}", b.seen());
    // Without a header it is served, with its own address.
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    assert_eq!(field(&get_on(&mut s).await, "xff"), "127.0.0.1");
    assert_eq!(
        metric(t.admin(), "tether_proxy_protocol_refused_total").await,
        "tether_proxy_protocol_refused_total{listener=\"edge\"} 2"
    );
}

#[tokio::test]
async fn an_optional_header_may_be_left_out_by_a_trusted_source() {
    let b = Backend::http("b0", false).await;
    let t = Tether::start(&listener("http", OPTIONAL, "", &[&b], ""));
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    assert_eq!(field(&get_on(&mut s).await, "xff"), "127.0.0.1");
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    s.write_all(proxy_header::write(Version::V1, addr(CLIENT), t.addr()).as_bytes()).await.unwrap();
    assert_eq!(field(&get_on(&mut s).await, "xff"), "203.0.113.7");
}

#[tokio::test]
async fn a_tcp_listener_passes_the_carried_address_on_in_its_own_header() {
    // In with one version, out with the other: the backend's header names the client
    // the proxy in front named, and the bytes after the header reach it unchanged.
    for (inbound, outbound) in [(Version::V1, "v2"), (Version::V2, "v1")] {
        let b = Backend::echo("e0").await;
        let pool = format!("send_proxy_protocol = \"{outbound}\"");
        let t = Tether::start(&listener("tcp", REQUIRED, &pool, &[&b], "[access_log]\nformat = \"json\""));
        let mut s = TcpStream::connect(t.addr()).await.unwrap();
        let mut first = proxy_header::write(inbound, addr(CLIENT), addr("192.0.2.1:443")).as_bytes().to_vec();
        first.extend_from_slice(b"hello");
        s.write_all(&first).await.unwrap();
        let mut want = b"e0 source=203.0.113.7:4444 dest=192.0.2.1:443\nhello".to_vec();
        let mut got = vec![0u8; want.len()];
        tokio::time::timeout(LIMIT, s.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want), "{inbound:?} in, {outbound} out");
        s.write_all(b" again").await.unwrap();
        want = b" again".to_vec();
        let mut got = vec![0u8; want.len()];
        tokio::time::timeout(LIMIT, s.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(got, want);
        drop(s);
        let lines = t.wait_access_lines(1).await;
        assert!(lines[0].contains("\"client\":\"203.0.113.7:4444\""), "{lines:?}");
    }
}

#[tokio::test]
async fn a_tcp_pool_sends_the_real_client_first_without_a_header_in() {
    let b = Backend::echo("e0").await;
    let t = Tether::start(&listener("tcp", "", "send_proxy_protocol = \"v1\"", &[&b], ""));
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(b"ping").await.unwrap();
    let want = format!("e0 source={me} dest={}\nping", t.addr());
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(LIMIT, s.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&got), want);
}

#[tokio::test]
async fn an_http_backend_connection_with_a_header_serves_only_its_client_connection() {
    for version in ["v1", "v2"] {
        let b = Backend::http("b0", true).await;
        let t = Tether::start(&listener("http", "", &format!("send_proxy_protocol = \"{version}\""), &[&b], ""));
        let mut first = TcpStream::connect(t.addr()).await.unwrap();
        let mut second = TcpStream::connect(t.addr()).await.unwrap();
        let (me1, me2) = (first.local_addr().unwrap(), second.local_addr().unwrap());
        // Interleaved: a connection shared between clients would show up here.
        let mut reports = Vec::new();
        for _ in 0..3 {
            reports.push((me1, get_on(&mut first).await));
            reports.push((me2, get_on(&mut second).await));
        }
        for (me, report) in &reports {
            assert_eq!(field(report, "source"), me.to_string(), "{version}: {report}");
            assert_eq!(field(report, "dest"), t.addr().to_string(), "{version}: {report}");
        }
        // Each client connection kept one backend connection for its three requests.
        let conn_of = |me: SocketAddr| -> HashSet<String> {
            reports.iter().filter(|(m, _)| *m == me).map(|(_, r)| field(r, "conn")).collect()
        };
        assert_eq!(conn_of(me1).len(), 1, "{version}: {reports:?}");
        assert_eq!(conn_of(me2).len(), 1, "{version}: {reports:?}");
        assert_ne!(conn_of(me1), conn_of(me2), "{version}: {reports:?}");
        let seen = b.seen();
        assert_eq!(seen.len(), 2, "{version}: {seen:?}");
        assert!(seen.iter().all(|c| c.header.is_some_and(|h| h.is_some()) && c.requests == 3), "{seen:?}");
        // A client that leaves takes its backend connection with it: the next client
        // gets a new one, with its own header.
        drop(first);
        let mut third = TcpStream::connect(t.addr()).await.unwrap();
        let report = get_on(&mut third).await;
        assert_eq!(field(&report, "source"), third.local_addr().unwrap().to_string());
        assert_eq!(field(&report, "conn"), "2", "{version}: {report}");
    }
}

#[tokio::test]
async fn http2_clients_get_a_backend_connection_with_a_header_per_request() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let b = Backend::http("b0", true).await;
    let t = Tether::start(&listener("http", "", "send_proxy_protocol = \"v2\"", &[&b], ""));
    let stream = TcpStream::connect(t.addr()).await.unwrap();
    let me = stream.local_addr().unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut conns = HashSet::new();
    for _ in 0..2 {
        let req = http::Request::get(format!("http://{}/", t.addr())).body(Empty::<bytes::Bytes>::new()).unwrap();
        let res = sender.send_request(req).await.unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let report = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(field(&report, "source"), me.to_string(), "{report}");
        conns.insert(field(&report, "conn"));
    }
    assert_eq!(conns.len(), 2, "{conns:?}");
    assert!(b.seen().iter().all(|c| c.header.is_some_and(|h| h.is_some())), "{:?}", b.seen());
}

#[tokio::test]
async fn health_checks_send_a_header_to_a_pool_that_sends_them() {
    for version in ["v1", "v2"] {
        // A backend that closes connections without a header: a check without one fails.
        let b = Backend::http("b0", true).await;
        let pool = format!("send_proxy_protocol = \"{version}\"");
        let cfg = listener("http", "", &pool, &[&b], "[admin]\nbind = \"127.0.0.1:0\"");
        let health =
            "[pools.web.health]\ncheck = \"http\"\npath = \"/\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 1\n";
        let t = Tether::start(&format!("{cfg}{health}"));
        // Checks are connections whose header names no client (v1 UNKNOWN, v2 LOCAL).
        wait_until("three answered checks", LIMIT, || {
            b.seen().iter().filter(|c| c.header == Some(None) && c.requests == 1).count() >= 3
        })
        .await;
        assert_eq!(
            metric(t.admin(), "tether_backend_healthy").await,
            "tether_backend_healthy{pool=\"web\",backend=\"b0\"} 1",
            "{version}"
        );
    }
}

#[tokio::test]
async fn an_https_listener_reads_the_header_before_the_handshake() {
    use rustls::pki_types::{CertificateDer, ServerName};
    let b = Backend::http("b0", false).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["shop.example".to_string()]).unwrap().self_signed(&key).unwrap();
    let scratch = Scratch::new();
    let cert_path = scratch.write("cert.pem", &cert.pem());
    let key_path = scratch.write("key.pem", &key.serialize_pem());
    let certificates = format!(
        "{REQUIRED}\n[[listeners.certificates]]\ncert = \"{}\"\nkey = \"{}\"",
        cert_path.display(),
        key_path.display()
    );
    let t = Tether::start(&listener("https", &certificates, "", &[&b], ""));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(cert.der().to_vec())).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    for version in [Version::V1, Version::V2] {
        let mut s = TcpStream::connect(t.addr()).await.unwrap();
        s.write_all(proxy_header::write(version, addr(CLIENT), t.addr()).as_bytes()).await.unwrap();
        let name = ServerName::try_from("shop.example").unwrap();
        let mut tls = tokio::time::timeout(LIMIT, connector.connect(name, s)).await.unwrap().expect("handshake");
        tls.write_all(b"GET / HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(LIMIT, tls.read_to_string(&mut out)).await.unwrap();
        let report = out.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        assert_eq!(field(report, "xff"), "203.0.113.7", "{version:?}: {out}");
    }
}

#[tokio::test]
async fn a_reload_turns_the_header_on_for_new_connections() {
    let b = Backend::http("b0", false).await;
    let t = Tether::start(&listener("http", "", "", &[&b], ""));
    let mut before = TcpStream::connect(t.addr()).await.unwrap();
    assert_eq!(field(&get_on(&mut before).await, "xff"), "127.0.0.1");
    reload(&t, &listener("http", REQUIRED, "", &[&b], ""), "listener \"edge\": proxy_protocol changed (now required")
        .await;
    // The listener kept its socket; new connections must now send a header.
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    assert!(until_closed(&mut s).await.is_empty());
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    s.write_all(proxy_header::write(Version::V1, addr(CLIENT), t.addr()).as_bytes()).await.unwrap();
    assert_eq!(field(&get_on(&mut s).await, "xff"), "203.0.113.7");
    // A connection accepted before the reload goes on as it began.
    assert_eq!(field(&get_on(&mut before).await, "xff"), "127.0.0.1");
}

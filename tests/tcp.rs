//! `tcp` listeners: connections forwarded whole to a pool, through the real `tether`
//! binary, to real servers on loopback. Balancing, FIN passed on in each direction,
//! client-IP stickiness across reconnections (clients on several loopback addresses),
//! TLS passthrough routed by the ClientHello's server name (a real rustls client and
//! server: the handshake is end to end, Tether only reads the name), a killed backend
//! whose pinned clients re-pin on their next connection, a drain that keeps pinned clients
//! until `drain_timeout` and then closes what is still open (a WebSocket tunnel too), the
//! idle timeout, and the access log line of each connection.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(10);

/// A server that greets every connection with `NAME\n`, then echoes what it reads with
/// `NAME:` before it; when the client ends its sending, it answers `NAME:bye` and closes.
struct Echo {
    name: String,
    address: SocketAddr,
    task: JoinHandle<()>,
}

impl Echo {
    async fn start(name: &str) -> Echo {
        Echo::on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    async fn on(name: &str, address: SocketAddr) -> Echo {
        let l = TcpListener::bind(address).await.unwrap();
        let address = l.local_addr().unwrap();
        let me = name.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else { return };
                let me = me.clone();
                tokio::spawn(async move {
                    if s.write_all(format!("{me}\n").as_bytes()).await.is_err() {
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) => {
                                let _ = s.write_all(format!("{me}:bye").as_bytes()).await;
                                return;
                            }
                            Ok(n) => {
                                let mut out = format!("{me}:").into_bytes();
                                out.extend_from_slice(&buf[..n]);
                                if s.write_all(&out).await.is_err() {
                                    return;
                                }
                            }
                            Err(_) => return,
                        }
                    }
                });
            }
        });
        Echo { name: name.to_string(), address, task }
    }

    /// Stops accepting and closes the listening socket (connects are refused).
    fn kill(&self) {
        self.task.abort();
    }
}

fn tcp_config(pool_extra: &str, backends: &[&Echo], listener_extra: &str, extra: &str) -> String {
    let mut s = format!(
        "{extra}\n[[listeners]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"tcp\"\n{listener_extra}\n\n[pools.tcp]\nbackends = [\n"
    );
    for b in backends {
        s.push_str(&format!("  {{ name = \"{}\", address = \"{}\" }},\n", b.name, b.address));
    }
    s.push_str("]\n");
    s.push_str(pool_extra);
    s
}

/// Connects to `to` from loopback address `from` (127.0.0.X: every 127/8 address is
/// local), so one test has many client IPs.
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from, 0)).unwrap();
    s.connect(to).await.unwrap()
}

/// The greeting line a connection gets: the backend's name.
async fn greeting(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match tokio::time::timeout(LIMIT, s.read(&mut byte)).await.expect("a greeting in time") {
            Ok(1) if byte[0] == b'\n' => return String::from_utf8(line).unwrap(),
            Ok(1) => line.push(byte[0]),
            other => panic!("connection ended before its greeting ({other:?}): {:?}", String::from_utf8_lossy(&line)),
        }
    }
}

/// Which backend a new connection from `from` reaches.
async fn backend_for(from: IpAddr, to: SocketAddr) -> String {
    let mut s = connect_from(from, to).await;
    greeting(&mut s).await
}

/// Everything `s` sends until it ends (or fails), within the limit.
async fn read_to_end(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(LIMIT, s.read_to_end(&mut out)).await.expect("the connection ends in time");
    String::from_utf8_lossy(&out).into_owned()
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

#[tokio::test]
async fn connections_are_balanced_and_each_end_is_passed_on() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let t = Tether::start(&tcp_config("algorithm = \"round_robin\"", &[&a, &b], "", ""));
    let mut seen = HashMap::new();
    for _ in 0..6 {
        let mut s = TcpStream::connect(t.addr()).await.unwrap();
        let name = greeting(&mut s).await;
        s.write_all(b"ping").await.unwrap();
        // The client ends its sending: the backend sees the end, answers and closes, and
        // the answer still comes back over the half-open connection.
        s.shutdown().await.unwrap();
        let rest = read_to_end(&mut s).await;
        assert_eq!(rest, format!("{name}:ping{name}:bye"));
        *seen.entry(name).or_insert(0) += 1;
    }
    assert_eq!(seen.get("a"), Some(&3), "{seen:?}");
    assert_eq!(seen.get("b"), Some(&3), "{seen:?}");

    // A backend that ends first: its end reaches the client, whose sending still works
    // until it ends too.
    let quitter = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let q_addr = quitter.local_addr().unwrap();
    let got = tokio::spawn(async move {
        let (mut s, _) = quitter.accept().await.unwrap();
        s.write_all(b"early").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        rest
    });
    let t2 = Tether::start(&format!(
        "[[listeners]]\nname = \"q\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"q\"\n[pools.q]\nbackends = [{{ name = \"q\", address = \"{q_addr}\" }}]\n"
    ));
    let mut s = TcpStream::connect(t2.addr()).await.unwrap();
    let mut first = [0u8; 5];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"early");
    assert_eq!(tokio::time::timeout(LIMIT, s.read(&mut [0u8; 8])).await.unwrap().unwrap(), 0, "the backend's end");
    s.write_all(b"after the backend's end").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(tokio::time::timeout(LIMIT, got).await.unwrap().unwrap(), b"after the backend's end");
}

#[tokio::test]
async fn each_connection_gets_an_access_log_line_with_bytes_both_ways() {
    let a = Echo::start("a").await;
    let t = Tether::start(&tcp_config("", &[&a], "", "[access_log]\nformat = \"json\""));
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    greeting(&mut s).await;
    s.write_all(b"12345").await.unwrap();
    s.shutdown().await.unwrap();
    let rest = read_to_end(&mut s).await;
    assert_eq!(rest, "a:12345a:bye");
    let lines = t.wait_access_lines(1).await;
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["method"], "TCP", "{v}");
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["pool"], "tcp", "{v}");
    assert_eq!(v["backend"], "a", "{v}");
    assert_eq!(v["bytes_in"], 5, "{v}");
    assert_eq!(v["bytes_out"], ("a\n".len() + rest.len()) as u64, "{v}");
    assert!(v.get("error").is_none_or(|e| e.is_null()), "{v}");
}

#[tokio::test]
async fn a_client_ip_keeps_its_backend_across_connections() {
    let echoes = [Echo::start("a").await, Echo::start("b").await, Echo::start("c").await];
    let refs: Vec<&Echo> = echoes.iter().collect();
    for mapping in ["table", "hash"] {
        let pool = format!("[pools.tcp.affinity]\nkeys = [\"client_ip\"]\nmapping = \"{mapping}\"\n");
        let t = Tether::start(&tcp_config(&pool, &refs, "", ""));
        let mut first = HashMap::new();
        for round in 0..4 {
            for last in 2..14u8 {
                let got = backend_for(ip(last), t.addr()).await;
                let pinned = first.entry(last).or_insert_with(|| got.clone());
                assert_eq!(*pinned, got, "{mapping}: client 127.0.0.{last} moved in round {round}");
            }
        }
        let used: HashSet<&String> = first.values().collect();
        assert!(used.len() >= 2, "{mapping}: twelve clients all on one backend: {first:?}");
    }
}

#[tokio::test]
async fn a_killed_backend_costs_its_clients_one_move_on_their_next_connection() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let pool = "retries = 1\n[pools.tcp.affinity]\nkeys = [\"client_ip\"]\n[pools.tcp.health]\neject_after = 1\neject_time = \"1m\"\n";
    let t = Tether::start(&tcp_config(pool, &[&a, &b], "", "[access_log]\nformat = \"json\""));
    // Find a client pinned to `a`.
    let mut on_a = None;
    for last in 2..20u8 {
        if backend_for(ip(last), t.addr()).await == "a" {
            on_a = Some(last);
            break;
        }
    }
    let client = ip(on_a.expect("some client on a"));
    assert_eq!(backend_for(client, t.addr()).await, "a");
    a.kill();
    // The next connection cannot reach `a`: it moves to `b` at once (no failure for the
    // client) and stays there.
    for _ in 0..3 {
        assert_eq!(backend_for(client, t.addr()).await, "b");
    }
    let moved = || t.access_lines().iter().any(|l| l.contains("\"affinity\":\"repin:"));
    if !poll_until(LIMIT, moved).await {
        panic!("the move is not logged as a re-pin:\n{}", t.access_lines().join("\n"));
    }
}

#[tokio::test]
async fn a_drained_backend_keeps_pinned_clients_until_its_drain_timeout_then_closes_them() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let pool = "[pools.tcp.affinity]\nkeys = [\"client_ip\"]\ndrain_timeout = \"2s\"\n";
    let config = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n[access_log]\nformat = \"json\"\n{}",
        tcp_config(pool, &[&a, &b], "", "")
    );
    let t = Tether::start(&config);
    let mut pinned = None;
    let mut other = None;
    for last in 2..30u8 {
        match backend_for(ip(last), t.addr()).await.as_str() {
            "a" if pinned.is_none() => pinned = Some(ip(last)),
            "b" if other.is_none() => other = Some(ip(last)),
            _ => {}
        }
    }
    let (pinned, other) = (pinned.unwrap(), other.unwrap());
    let mut open = connect_from(pinned, t.addr()).await;
    assert_eq!(greeting(&mut open).await, "a");

    let admin = t.admin();
    let status = raw(
        admin,
        b"POST /api/pools/tcp/backends/a/drain HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        LIMIT,
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    // During the drain: the open connection works, the pinned client's new connections
    // still reach `a`, and a client of `b` stays on `b`.
    open.write_all(b"x").await.unwrap();
    let mut echo = [0u8; 3];
    open.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"a:x");
    assert_eq!(backend_for(pinned, t.addr()).await, "a");
    assert_eq!(backend_for(other, t.addr()).await, "b");
    // At the drain timeout, what is still open to `a` is closed...
    let rest = read_to_end(&mut open).await;
    assert_eq!(rest, "", "closed by Tether, not ended by the backend");
    // ...and the pinned client's next connection goes elsewhere.
    assert_eq!(backend_for(pinned, t.addr()).await, "b");
    // The closed connection's line says why (the log is written by a thread of its own).
    let drained =
        || t.access_lines().iter().any(|l| l.contains("\"backend\":\"a\"") && l.contains("\"error\":\"drained\""));
    if !poll_until(LIMIT, drained).await {
        panic!("no access log line says drained:\n{}", t.access_lines().join("\n"));
    }
}

#[tokio::test]
async fn a_websocket_tunnel_to_a_drained_backend_is_closed_at_the_drain_timeout() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let ws = websocket_backend().await;
    let config = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n{}[pools.web.affinity]\nkeys = [\"cookie\"]\ndrain_timeout = \"1s\"\n",
        pool_of(&[("ws", ws)], "", "")
    );
    let t = Tether::start(&config);
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/chat", t.addr())).await.unwrap();
    socket.send(Message::text("hi")).await.unwrap();
    let reply = socket.next().await.unwrap().unwrap();
    assert_eq!(reply.to_text().unwrap(), "echo: hi");
    let status = raw(
        t.admin(),
        b"POST /api/pools/web/backends/ws/drain HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        LIMIT,
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    // Still open during the drain...
    socket.send(Message::text("still")).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap().to_text().unwrap(), "echo: still");
    // ...and closed once it is over.
    let end = tokio::time::timeout(LIMIT, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the tunnel was not closed at the drain timeout");
}

#[tokio::test]
async fn a_connection_that_carries_nothing_is_closed_at_the_idle_timeout() {
    let a = Echo::start("a").await;
    let t = Tether::start(&tcp_config("", &[&a], "idle_timeout = \"300ms\"", "[access_log]\nformat = \"json\""));
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    greeting(&mut s).await;
    // Traffic keeps it open past the timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.write_all(b"k").await.unwrap();
        let mut echo = [0u8; 3];
        s.read_exact(&mut echo).await.unwrap();
    }
    // ...silence closes it.
    assert_eq!(read_to_end(&mut s).await, "");
    let lines = t.wait_access_lines(1).await;
    assert!(lines[0].contains("\"error\":\"idle-timeout\""), "{}", lines[0]);
}

// --- TLS passthrough ---

struct TlsBackend {
    address: SocketAddr,
    cert: CertificateDer<'static>,
}

/// A TLS server with a certificate for `names` that answers every connection with its
/// `name` and the server name it saw, then closes.
async fn tls_backend(name: &'static str, names: &[&str]) -> TlsBackend {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let der = cert.der().clone();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], PrivateKeyDer::try_from(key.serialize_der()).unwrap())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else { return };
                let sni = tls.get_ref().1.server_name().unwrap_or("-").to_string();
                let _ = tls.write_all(format!("{name} {sni}").as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    TlsBackend { address, cert: der }
}

/// Connects through `via` with TLS for `server_name`, trusting only `trusted`, and
/// returns what the server says.
async fn tls_hello(via: SocketAddr, server_name: &str, trusted: &[&CertificateDer<'static>]) -> String {
    tls_over(TcpStream::connect(via).await.unwrap(), server_name, trusted).await
}

#[tokio::test]
async fn tls_passes_through_routed_by_server_name() {
    let shop = tls_backend("shop-1", &["shop.example"]).await;
    let tenants = tls_backend("tenants-1", &["*.tenants.example"]).await;
    let fallback = Echo::start("fallback").await;
    let config = format!(
        "[access_log]\nformat = \"json\"\n\
         [[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"fallback\"\n\
         [[listeners.sni_routes]]\nnames = [\"shop.example\"]\npool = \"shop\"\n\
         [[listeners.sni_routes]]\nnames = [\"*.tenants.example\"]\npool = \"tenants\"\n\
         [pools.shop]\nbackends = [{{ name = \"shop-1\", address = \"{}\" }}]\n\
         [pools.tenants]\nbackends = [{{ name = \"tenants-1\", address = \"{}\" }}]\n\
         [pools.fallback]\nbackends = [{{ name = \"fallback\", address = \"{}\" }}]\n",
        shop.address, tenants.address, fallback.address
    );
    let t = Tether::start(&config);
    // The handshake is the backend's own (its certificate, verified by the client).
    assert_eq!(tls_hello(t.addr(), "shop.example", &[&shop.cert]).await, "shop-1 shop.example");
    assert_eq!(tls_hello(t.addr(), "Acme.Tenants.Example", &[&tenants.cert]).await, "tenants-1 acme.tenants.example");
    // Not TLS at all, or a name no route takes: the default pool.
    let mut plain = TcpStream::connect(t.addr()).await.unwrap();
    plain.write_all(b"hello\n").await.unwrap();
    assert_eq!(greeting(&mut plain).await, "fallback");
    let mut other = TcpStream::connect(t.addr()).await.unwrap();
    // A ClientHello for another name goes to the fallback, bytes unchanged.
    let hello = client_hello_bytes("elsewhere.example").await;
    other.write_all(&hello).await.unwrap();
    assert_eq!(greeting(&mut other).await, "fallback");
    let mut echoed = vec![0u8; "fallback:".len() + hello.len()];
    other.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed["fallback:".len()..], &hello[..], "the ClientHello reached the backend as sent");
    drop((plain, other));
    let lines = t.wait_access_lines(4).await;
    assert!(
        lines.iter().any(|l| l.contains("\"uri\":\"shop.example\"") && l.contains("\"pool\":\"shop\"")),
        "{lines:?}"
    );
}

#[tokio::test]
async fn a_passthrough_pool_keeps_each_client_on_its_backend() {
    let backends = [
        tls_backend("shop-1", &["shop.example"]).await,
        tls_backend("shop-2", &["shop.example"]).await,
        tls_backend("shop-3", &["shop.example"]).await,
    ];
    let mut config = String::from(
        "[[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\n\
         [[listeners.sni_routes]]\nnames = [\"shop.example\"]\npool = \"shop\"\n\
         [pools.shop.affinity]\nkeys = [\"client_ip\"]\n[pools.shop]\nbackends = [\n",
    );
    for (i, b) in backends.iter().enumerate() {
        config.push_str(&format!("  {{ name = \"shop-{}\", address = \"{}\" }},\n", i + 1, b.address));
    }
    config.push_str("]\n");
    let t = Tether::start(&config);
    let trusted: Vec<&CertificateDer<'static>> = backends.iter().map(|b| &b.cert).collect();
    let mut first: HashMap<u8, String> = HashMap::new();
    for _round in 0..3 {
        for last in 2..10u8 {
            let s = connect_from(ip(last), t.addr()).await;
            let got = tls_over(s, "shop.example", &trusted).await;
            let pinned = first.entry(last).or_insert_with(|| got.clone());
            assert_eq!(*pinned, got, "client 127.0.0.{last} moved");
        }
    }
    let used: HashSet<&String> = first.values().collect();
    assert!(used.len() >= 2, "all clients on one backend: {first:?}");
}

/// TLS for `server_name` over an open connection; what the server says.
async fn tls_over(s: TcpStream, server_name: &str, trusted: &[&CertificateDer<'static>]) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for c in trusted {
        roots.add((*c).clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    let mut tls = tokio::time::timeout(LIMIT, connector.connect(name, s)).await.unwrap().expect("handshake");
    let mut out = String::new();
    let _ = tokio::time::timeout(LIMIT, tls.read_to_string(&mut out)).await.unwrap();
    out
}

/// The first flight a real rustls client sends for `server_name`: captured from a local
/// socket pair.
async fn client_hello_bytes(server_name: &str) -> Vec<u8> {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let name = server_name.to_string();
    tokio::spawn(async move {
        let s = TcpStream::connect(addr).await.unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let _ = connector.connect(ServerName::try_from(name).unwrap(), s).await;
    });
    let (mut s, _) = l.accept().await.unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    let mut n = 0;
    // One read may not hold all of it: read until a whole record is there.
    while n < 5 || n < 5 + u16::from_be_bytes([buf[3], buf[4]]) as usize {
        let got = s.read(&mut buf[n..]).await.unwrap();
        assert!(got > 0);
        n += got;
    }
    buf.truncate(n);
    buf
}

#[tokio::test]
async fn max_connections_holds_a_slot_for_each_open_connection() {
    let a = Echo::start("a").await;
    let t = Tether::start(&tcp_config("max_queue = 0\n", &[&a], "", "[access_log]\nformat = \"json\""));
    let config = std::fs::read_to_string(&t.config).unwrap().replace(
        &format!("{{ name = \"a\", address = \"{}\" }}", a.address),
        &format!("{{ name = \"a\", address = \"{}\", max_connections = 1 }}", a.address),
    );
    reload(&t, &config, "config reloaded").await;
    let mut first = TcpStream::connect(t.addr()).await.unwrap();
    assert_eq!(greeting(&mut first).await, "a");
    // The one slot is held while the first connection is open: the second is closed.
    let mut second = TcpStream::connect(t.addr()).await.unwrap();
    assert_eq!(read_to_end(&mut second).await, "");
    let full = || t.access_lines().iter().any(|l| l.contains("\"error\":\"queue-full\""));
    if !poll_until(LIMIT, full).await {
        panic!("no queue-full line:\n{}", t.access_lines().join("\n"));
    }
    // Once it closes, the slot is free again.
    drop(first);
    // (The slot is given back when Tether sees the close: a connection made before that
    // is closed too, so try until one gets through.)
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut third = loop {
        let mut s = TcpStream::connect(t.addr()).await.unwrap();
        let mut b = [0u8; 2];
        if matches!(tokio::time::timeout(LIMIT, s.read_exact(&mut b)).await, Ok(Ok(_))) && &b == b"a\n" {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "the slot was not given back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    third.write_all(b"z").await.unwrap();
    let mut echo = [0u8; 3];
    third.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"a:z");
}

#[tokio::test]
async fn shutdown_lets_open_connections_finish_and_refuses_new_ones() {
    let a = Echo::start("a").await;
    let mut t = Tether::start(&tcp_config("", &[&a], "", "[runtime]\nshutdown_grace = \"20s\""));
    let mut open = TcpStream::connect(t.addr()).await.unwrap();
    assert_eq!(greeting(&mut open).await, "a");
    t.signal("TERM");
    let addr = t.addr();
    let refused = poll_until_async(LIMIT, || async move { TcpStream::connect(addr).await.is_err() }).await;
    assert!(refused, "the listener still accepts after SIGTERM");
    // The open connection still carries bytes both ways...
    open.write_all(b"late").await.unwrap();
    let mut echo = [0u8; 6];
    open.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"a:late");
    // ...and once it ends, Tether exits without waiting out the grace period.
    open.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut open).await, "a:bye");
    let status = tokio::task::spawn_blocking(move || t.wait_exit(Duration::from_secs(10))).await.unwrap();
    assert!(status.success(), "{status:?}");
}

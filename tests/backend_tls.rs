//! Pools that reach their backends over TLS (`[pools.NAME.tls]`): real rustls backends
//! with certificates from a test CA, verified by name or by IP address, refused when they
//! do not verify, reused while kept alive, checked by health checks over TLS, and bodies
//! large enough to fill the sockets both ways.

mod common;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tether::demo::DemoBackend;
use tokio::net::TcpStream;

/// A test CA: certificates it signs, and its own in PEM for a pool's `ca_file`.
struct Ca {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca { key, cert }
    }

    fn write(&self, scratch: &Scratch, file: &str) -> PathBuf {
        scratch.write(file, &self.cert.pem())
    }

    /// A server configuration with a certificate for `names` (DNS names or IP addresses).
    fn server(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let chain = vec![cert.der().clone(), CertificateDer::from(self.cert.der().to_vec())];
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, PrivateKeyDer::try_from(key.serialize_der()).unwrap())
            .unwrap();
        Arc::new(config)
    }
}

async fn tls_backends(ca: &Ca, names: &[&str], n: usize) -> Vec<DemoBackend> {
    let mut v = Vec::new();
    for i in 1..=n {
        let b = DemoBackend::start_tls(&format!("app-{i}"), "127.0.0.1:0".parse().unwrap(), ca.server(names)).await;
        v.push(b.unwrap());
    }
    v
}

/// One listener in front of pool `web` with `backends`, cookie affinity, and `tls` as the
/// pool's `[pools.web.tls]` body (`None`: no TLS).
fn config(backends: &[&DemoBackend], tls: Option<&str>, extra: &str) -> String {
    let list: Vec<String> =
        backends.iter().map(|b| format!("{{ name = \"{}\", address = \"{}\" }}", b.name, b.address)).collect();
    let mut s = format!(
        "[access_log]\nformat = \"json\"\n[admin]\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\npool = \"web\"\n\
         [pools.web]\nbackends = [{}]\n{extra}\n\
         [pools.web.affinity]\nkeys = [\"cookie\"]\n",
        list.join(", ")
    );
    if let Some(tls) = tls {
        s.push_str(&format!("[pools.web.tls]\n{tls}\n"));
    }
    s
}

fn cookie_of(r: &Resp) -> String {
    let c = r.headers.get("set-cookie").expect("a session cookie").to_str().unwrap();
    c.split(';').next().unwrap().to_string()
}

/// The backend's view of the connection a request came on (`peer: ADDRESS`).
fn peer_line(r: &Resp) -> String {
    r.text().lines().find(|l| l.starts_with("peer: ")).expect("a peer line").to_string()
}

#[tokio::test]
async fn requests_reach_backends_over_tls_verified_against_the_pools_ca() {
    let ca = Ca::new("Test CA");
    let b = tls_backends(&ca, &["api.internal"], 2).await;
    let scratch = Scratch::new();
    let ca_file = ca.write(&scratch, "ca.pem");
    let tls = format!("server_name = \"api.internal\"\nca_file = \"{}\"", ca_file.display());
    let t = Tether::start(&config(&[&b[0], &b[1]], Some(&tls), ""));

    // HTTP/1: a session sticks, over one kept-alive TLS connection to its backend.
    let mut c = Client::connect(t.addr()).await;
    let first = c.get("/headers").await;
    assert_eq!(first.status, 200, "{}", first.text());
    let cookie = cookie_of(&first);
    let backend = first.backend();
    let mut peers = Vec::new();
    for _ in 0..5 {
        let req = Request::get("/headers").header("host", "shop").header("cookie", &cookie).body(Full::default());
        let r = c.request(req.unwrap()).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.backend(), backend, "the session stays on its backend");
        // The backend sees X-Forwarded-Proto for the client's side (plain HTTP here).
        assert!(r.text().contains("x-forwarded-proto: http\n"), "{}", r.text());
        peers.push(peer_line(&r));
    }
    peers.dedup();
    assert_eq!(peers.len(), 1, "one TLS connection to the backend is reused: {peers:?}");

    // HTTP/2 from the client: the same pool, the same session.
    let stream = TcpStream::connect(t.addr()).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = Request::get(format!("http://{}/", t.addr())).header("cookie", &cookie);
        let body: BoxBody<Bytes, Infallible> = Full::new(Bytes::new()).boxed();
        let r = h2.send_request(req.body(body).unwrap()).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-backend"], backend.as_str());
        r.into_body().collect().await.unwrap();
    }
}

#[tokio::test]
async fn large_bodies_go_both_ways_over_tls() {
    let ca = Ca::new("Test CA");
    let b = tls_backends(&ca, &["api.internal"], 1).await;
    let scratch = Scratch::new();
    let tls = format!("server_name = \"api.internal\"\nca_file = \"{}\"", ca.write(&scratch, "ca.pem").display());
    let t = Tether::start(&config(&[&b[0]], Some(&tls), ""));
    // Several MiB each way: enough to fill socket buffers, so writes that meet a full
    // socket leave TLS records waiting, which must still go out.
    let body: Vec<u8> = (0..6 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut c = Client::connect(t.addr()).await;
    for _ in 0..2 {
        let req = Request::post("/echo").header("host", "shop").body(Full::new(Bytes::from(body.clone())));
        let r = c.request(req.unwrap()).await;
        assert_eq!(r.status, 200);
        assert!(r.body == body, "the echo came back whole ({} of {} bytes)", r.body.len(), body.len());
    }
    let r = c.get("/bytes?n=9000000").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 9_000_000);

    // The same over HTTP/2 from the client.
    let stream = TcpStream::connect(t.addr()).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::post(format!("http://{}/echo", t.addr()));
    let sent: BoxBody<Bytes, Infallible> = Full::new(Bytes::from(body.clone())).boxed();
    let r = h2.send_request(req.body(sent).unwrap()).await.unwrap();
    assert_eq!(r.status(), 200);
    let got = r.into_body().collect().await.unwrap().to_bytes();
    assert!(got == body, "the HTTP/2 echo came back whole ({} of {} bytes)", got.len(), body.len());
}

#[tokio::test]
async fn a_backend_whose_certificate_does_not_verify_is_not_used() {
    let ca = Ca::new("Test CA");
    let other = Ca::new("Another CA");
    let b = tls_backends(&ca, &["api.internal"], 1).await;
    let scratch = Scratch::new();
    let ca_file = ca.write(&scratch, "ca.pem");
    let other_file = other.write(&scratch, "other.pem");
    let cases = [
        // The certificate is not for this name.
        (format!("server_name = \"billing.internal\"\nca_file = \"{}\"", ca_file.display()), 502),
        // Not signed by the CA the pool trusts.
        (format!("server_name = \"api.internal\"\nca_file = \"{}\"", other_file.display()), 502),
        // No name: the backend's IP address is verified, which this certificate lacks.
        (format!("ca_file = \"{}\"", ca_file.display()), 502),
        // Verification off (by the key that says so): any certificate is taken.
        ("insecure_skip_verify = true".to_string(), 200),
    ];
    for (tls, status) in cases {
        let t = Tether::start(&config(&[&b[0]], Some(&tls), ""));
        let r = get(t.addr(), "/").await;
        assert_eq!(r.status, status, "{tls}: {}", r.text());
        if status == 502 {
            assert_eq!(r.headers["tether-error"], "connect-failed", "{tls}");
            t.wait_log("TLS handshake failed").await;
        }
    }
    // A plain pool in front of a TLS backend does not get a response either.
    let t = Tether::start(&config(&[&b[0]], None, ""));
    assert_eq!(get(t.addr(), "/").await.status, 502);
}

#[tokio::test]
async fn a_certificate_for_the_backends_ip_address_verifies_without_a_server_name() {
    let ca = Ca::new("Test CA");
    let b = tls_backends(&ca, &["127.0.0.1"], 1).await;
    let scratch = Scratch::new();
    let tls = format!("ca_file = \"{}\"", ca.write(&scratch, "ca.pem").display());
    let t = Tether::start(&config(&[&b[0]], Some(&tls), ""));
    let r = get(t.addr(), "/").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.backend(), "app-1");
}

#[tokio::test]
async fn health_checks_follow_the_pools_tls() {
    let ca = Ca::new("Test CA");
    let secure = tls_backends(&ca, &["api.internal"], 1).await;
    // A backend in plain HTTP: it cannot answer a TLS health check.
    let plain = DemoBackend::start("plain", "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let scratch = Scratch::new();
    let tls = format!("server_name = \"api.internal\"\nca_file = \"{}\"", ca.write(&scratch, "ca.pem").display());
    let health = "[pools.web.health]\ncheck = \"http\"\npath = \"/status\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 1\nfall = 1\n";
    let t = Tether::start(&format!("{}{health}", config(&[&secure[0], &plain], Some(&tls), "")));
    let admin = t.admin();
    let state = |v: &serde_json::Value, name: &str| {
        v["pools"][0]["backends"].as_array().unwrap().iter().find(|b| b["name"] == name).unwrap()["health"].clone()
    };
    wait_until_async("the plain backend is down and the TLS one up", Duration::from_secs(10), || async {
        let v = admin_json(admin, "/api/pools").await;
        state(&v, "plain") == "down" && state(&v, "app-1") == "up"
    })
    .await;
    // Every request goes to the backend that passes its checks.
    for _ in 0..4 {
        assert_eq!(get(t.addr(), "/").await.backend(), "app-1");
    }
}

#[tokio::test]
async fn a_reload_that_changes_the_pools_tls_makes_new_connections() {
    let ca = Ca::new("Test CA");
    let b = tls_backends(&ca, &["api.internal"], 1).await;
    let scratch = Scratch::new();
    let ca_file = ca.write(&scratch, "ca.pem");
    let wrong = format!("server_name = \"billing.internal\"\nca_file = \"{}\"", ca_file.display());
    let right = format!("server_name = \"api.internal\"\nca_file = \"{}\"", ca_file.display());
    let t = Tether::start(&config(&[&b[0]], Some(&wrong), ""));
    assert_eq!(get(t.addr(), "/").await.status, 502);
    reload(&t, &config(&[&b[0]], Some(&right), ""), "reloaded").await;
    assert_eq!(get(t.addr(), "/").await.status, 200);
    // And back to plain TCP: the kept TLS connections are not used for it.
    reload(&t, &config(&[&b[0]], None, ""), "reloaded").await;
    assert_eq!(get(t.addr(), "/").await.status, 502);
}

#[tokio::test]
async fn the_ca_file_and_the_server_name_are_checked_with_the_config() {
    let scratch = Scratch::new();
    let not_pem = scratch.write("not.pem", "hello\n");
    let cases = [
        ("ca_file = \"/nonexistent/ca.pem\"", "pool \"web\": tls: cannot read /nonexistent/ca.pem"),
        (&*format!("ca_file = \"{}\"", not_pem.display()), "holds no certificate"),
        ("server_name = \"not a name\"", "tls: server_name \"not a name\" is not a DNS name or IP address"),
        ("insecure_skip_verify = true\nca_file = \"x.pem\"", "insecure_skip_verify and ca_file exclude each other"),
        ("verify = false", "unknown field `verify`"),
    ];
    for (tls, expected) in cases {
        let path = scratch.write("t.toml", &config(&[], Some(tls), ""));
        let out = std::process::Command::new(bin()).arg("check").arg("-c").arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{tls}");
        assert!(err.contains("t.toml:") && err.contains(expected), "{tls}: {err}");
    }
    // A pool behind a tcp listener passes bytes through; TLS to its backends is refused.
    let tcp = "[[listeners]]\nname = \"raw\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"db\"\n\
               [pools.db]\nbackends = [{ name = \"db-1\", address = \"127.0.0.1:5432\" }]\n\
               [pools.db.tls]\ninsecure_skip_verify = true\n";
    let path = scratch.write("tcp.toml", tcp);
    let out = std::process::Command::new(bin()).arg("check").arg("-c").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tcp.toml:5:") && err.contains("[pools.db.tls]"), "{err}");
}

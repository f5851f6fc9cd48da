//! TLS termination on `https` listeners, with real TLS clients (rustls through
//! tokio-rustls, and curl): certificates chosen by SNI, ALPN to HTTP/2 or HTTP/1.1,
//! `X-Forwarded-Proto: https` and a `Secure` cookie, located errors for bad
//! certificates, and a reload with a broken certificate that keeps the old one serving.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

/// A self-signed certificate for `names`, written as `NAME.pem` and `NAME.key`.
struct Cert {
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

fn cert(dir: &Scratch, file: &str, names: &[&str]) -> Cert {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.not_after = rcgen::date_time_ymd(2031, 5, 17);
    let c = params.self_signed(&key).unwrap();
    Cert {
        cert: dir.write(&format!("{file}.pem"), &c.pem()),
        key: dir.write(&format!("{file}.key"), &key.serialize_pem()),
        der: c.der().clone(),
    }
}

fn https_config(backends: &[&DemoBackend], certs: &[&Cert], cookie: bool) -> String {
    let mut s =
        String::from("[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\npool = \"web\"\nprotocol = \"https\"\n");
    for c in certs {
        s.push_str(&format!(
            "[[listeners.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
            c.cert.display(),
            c.key.display()
        ));
    }
    s.push_str("\n[pools.web]\nbackends = [\n");
    for b in backends {
        s.push_str(&format!("  {{ name = \"{}\", address = \"{}\" }},\n", b.name, b.address));
    }
    s.push_str("]\n");
    if cookie {
        s.push_str(&format!(
            "[pools.web.affinity]\nkeys = [\"cookie\"]\n[pools.web.affinity.cookie]\nkeys = [\"{KEY}\"]\n"
        ));
    }
    s
}

/// Accepts any certificate: the tests check which one was served themselves.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client connection to `addr` asking for `sni`, offering `alpn`; with `roots`, the
/// certificate is verified against them, else anything is accepted.
async fn connect(addr: SocketAddr, sni: &str, alpn: &[&[u8]], roots: Option<&[&Cert]>) -> TlsStream<TcpStream> {
    connect_with(addr, sni, client_config(alpn, roots)).await
}

async fn connect_with(addr: SocketAddr, sni: &str, config: Arc<rustls::ClientConfig>) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap()
}

fn client_config(alpn: &[&[u8]], roots: Option<&[&Cert]>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder =
        rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().unwrap();
    let mut config = match roots {
        Some(roots) => {
            let mut store = rustls::RootCertStore::empty();
            for c in roots {
                store.add(c.der.clone()).unwrap();
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
        None => builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyCert(provider))).with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

fn served(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

/// One HTTP/1.1 request over `tls`, read until the connection closes.
async fn get_h1(mut tls: TlsStream<TcpStream>, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn https_serves_http1_and_http2_with_secure_sessions() {
    let dir = Scratch::new();
    let shop = cert(&dir, "shop", &["shop.example"]);
    let b = backends(2).await;
    let t = Tether::start(&https_config(&[&b[0], &b[1]], &[&shop], true));

    // HTTP/1.1 (ALPN), verified against the certificate's own root.
    let tls = connect(t.addr(), "shop.example", &[b"http/1.1"], Some(&[&shop])).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let text = get_h1(tls, "/headers").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let lower = text.to_ascii_lowercase();
    assert!(lower.contains("x-forwarded-proto: https"), "the backend is told the client used https: {text}");
    let cookie =
        lower.lines().find(|l| l.starts_with("set-cookie: tether=")).expect("a new session's cookie").to_string();
    assert!(cookie.contains("; secure"), "{cookie}");

    // HTTP/2 (ALPN h2) on the same listener: the session sticks, over TLS.
    let tls = connect(t.addr(), "shop.example", &[b"h2", b"http/1.1"], Some(&[&shop])).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let first =
        sender.send_request(Request::get("https://shop.example/headers").body(Full::default()).unwrap()).await.unwrap();
    assert_eq!(first.status(), 200);
    let backend = first.headers()["x-backend"].to_str().unwrap().to_string();
    let token = first
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("tether="))
        .expect("a new session's cookie");
    assert!(token.contains("; Secure"), "{token}");
    let body = String::from_utf8(first.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(body.to_ascii_lowercase().contains("x-forwarded-proto: https"), "{body}");
    let token = token.split(';').next().unwrap().to_string();
    for _ in 0..4 {
        let req = Request::get("https://shop.example/").header("cookie", token.as_str()).body(Full::default()).unwrap();
        let r = sender.send_request(req).await.unwrap();
        assert_eq!(r.headers()["x-backend"], backend.as_str());
    }

    // curl, as an operator would: HTTP/2 negotiated over TLS. It runs off this thread,
    // which also runs the demo backends.
    let url = format!("https://{}/", t.addr());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sk", "--http2", "-o", "/dev/null", "-w", "%{http_version} %{http_code}"])
            .arg(url)
            .output()
            .expect("curl is installed by .ci/setup")
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200", "{}", t.log());
}

#[tokio::test]
async fn sessions_resume_over_tls13_and_tls12() {
    let dir = Scratch::new();
    let shop = cert(&dir, "shop", &["shop.example"]);
    let b = backends(1).await;
    let t = Tether::start(&https_config(&[&b[0]], &[&shop], false));
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut store = rustls::RootCertStore::empty();
        store.add(shop.der.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth();
        // One config, so one session store: the second connection offers what the first
        // was given.
        let config = Arc::new(config);
        let first = connect_with(t.addr(), "shop.example", config.clone()).await;
        assert_eq!(first.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Full));
        assert!(get_h1(first, "/").await.starts_with("HTTP/1.1 200"));
        let second = connect_with(t.addr(), "shop.example", config).await;
        assert_eq!(second.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed), "{version:?}");
        assert!(get_h1(second, "/").await.starts_with("HTTP/1.1 200"));
    }
}

#[tokio::test]
async fn sni_chooses_the_certificate() {
    let dir = Scratch::new();
    let default = cert(&dir, "default", &["shop.example"]);
    let wild = cert(&dir, "wild", &["*.api.example"]);
    let exact = cert(&dir, "exact", &["v2.api.example"]);
    let b = backends(1).await;
    let t = Tether::start(&https_config(&[&b[0]], &[&default, &wild, &exact], false));
    for (sni, want) in [
        ("shop.example", &default),
        ("v1.api.example", &wild),
        ("V2.API.example", &exact),
        ("a.v1.api.example", &default),
        ("elsewhere.example", &default),
    ] {
        let tls = connect(t.addr(), sni, &[b"http/1.1"], None).await;
        assert!(served(&tls) == want.der, "{sni} got the wrong certificate");
        assert!(get_h1(tls, "/").await.starts_with("HTTP/1.1 200"), "{sni}");
    }
    // A client that verifies gets a certificate valid for the name it asked for.
    let tls = connect(t.addr(), "v9.api.example", &[b"http/1.1"], Some(&[&wild])).await;
    assert!(get_h1(tls, "/").await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn bad_certificates_are_located_errors_and_a_reload_keeps_the_running_ones() {
    let dir = Scratch::new();
    let shop = cert(&dir, "shop", &["shop.example"]);
    let other = cert(&dir, "other", &["other.example"]);
    let b = backends(1).await;

    // A key that belongs to another certificate: `tether check` names the file's line.
    let mismatched = Cert { cert: shop.cert.clone(), key: other.key.clone(), der: shop.der.clone() };
    let cfg = https_config(&[&b[0]], &[&mismatched], false);
    let path = dir.write("bad.toml", &cfg);
    let out = std::process::Command::new(bin()).arg("check").arg("-c").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let key_line = cfg.lines().position(|l| l.starts_with("key = ")).unwrap() + 1;
    assert!(
        err.contains(&format!("bad.toml:{key_line}:")) && err.contains("does not belong to the certificate"),
        "{err}"
    );
    // Names it does not cover, and a protocol without certificates.
    let named = https_config(&[&b[0]], &[&shop], false).replace("key = ", "names = [\"www.example\"]\nkey = ");
    let out =
        std::process::Command::new(bin()).arg("check").arg("-c").arg(dir.write("n.toml", &named)).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not cover the name \"www.example\""));
    let bare = https_config(&[&b[0]], &[], false);
    let out =
        std::process::Command::new(bin()).arg("check").arg("-c").arg(dir.write("b.toml", &bare)).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs at least one [[listeners.certificates]]"));

    // Running: replacing the certificate with a broken file and reloading keeps the old one.
    let t = Tether::start(&https_config(&[&b[0]], &[&shop], false));
    let tls = connect(t.addr(), "shop.example", &[b"http/1.1"], Some(&[&shop])).await;
    assert!(get_h1(tls, "/").await.starts_with("HTTP/1.1 200"));
    std::fs::write(&shop.cert, "not a certificate").unwrap();
    reload(&t, &https_config(&[&b[0]], &[&shop], false), "reload rejected").await;
    let tls = connect(t.addr(), "shop.example", &[b"http/1.1"], Some(&[&shop])).await;
    assert!(served(&tls) == shop.der);
    assert!(get_h1(tls, "/").await.starts_with("HTTP/1.1 200"));
    // A good new certificate at the same path is taken by the next reload.
    let renewed = cert(&dir, "shop", &["shop.example"]);
    reload(&t, &https_config(&[&b[0]], &[&renewed], false), "TLS certificates changed").await;
    let tls = connect(t.addr(), "shop.example", &[b"http/1.1"], Some(&[&renewed])).await;
    assert!(served(&tls) == renewed.der);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_is_closed_and_counted() {
    let dir = Scratch::new();
    let shop = cert(&dir, "shop", &["shop.example"]);
    let b = backends(1).await;
    let cfg = https_config(&[&b[0]], &[&shop], false);
    let t = Tether::start(&format!("{ADMIN}[timeouts]\nrequest_header = \"300ms\"\n{cfg}"));
    // Half a ClientHello record header, then nothing.
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    // Plain HTTP on the TLS port is a failed handshake, and counted.
    let text = raw(t.addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Duration::from_secs(5)).await;
    assert!(!text.contains("200 OK"), "{text}");
    let admin = t.admin();
    wait_until_async("the failed handshake is counted", Duration::from_secs(5), || async move {
        get(admin, "/metrics").await.text().contains("tether_tls_handshake_failures_total{listener=\"web\"} 1")
    })
    .await;
    // The certificate's expiry is in the metrics (notAfter 2031-05-17T00:00:00Z).
    let metrics = get(admin, "/metrics").await.text();
    let line = metrics.lines().find(|l| l.starts_with("tether_tls_certificate_expiry_seconds{")).unwrap();
    assert!(line.contains(&format!("certificate=\"{}\"", shop.cert.display())), "{line}");
    assert!(line.ends_with(" 1936742400"), "{line}");
}

#[tokio::test]
async fn http_redirects_to_https_and_https_says_hsts() {
    let dir = Scratch::new();
    let shop = cert(&dir, "shop", &["shop.example"]);
    let b = backends(1).await;
    let http = |port: u16| {
        format!(
            "[[listeners]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\npool = \"web\"\nredirect_to_https = {port}\n\n\
             [pools.web]\nbackends = [{{ name = \"app-1\", address = \"{}\" }}]\n",
            b[0].address
        )
    };
    let t = Tether::start(&http(8443));
    let text =
        raw(t.addr(), b"GET /cart?item=3 HTTP/1.1\r\nHost: shop.example:8080\r\n\r\n", Duration::from_secs(2)).await;
    assert!(text.starts_with("HTTP/1.1 308 Permanent Redirect\r\n"), "{text}");
    assert!(text.contains("\r\nLocation: https://shop.example:8443/cart?item=3\r\n"), "{text}");
    assert!(text.contains("\r\nTether-Error: https-redirect\r\n"), "{text}");
    // The redirect keeps the connection: a second request on it is answered too.
    let two =
        b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\nGET /x HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n";
    let text = raw(t.addr(), two, Duration::from_secs(2)).await;
    assert_eq!(text.matches("HTTP/1.1 308").count(), 2, "{text}");
    drop(t);
    let t = Tether::start(&http(443));
    let r = get(t.addr(), "/a").await;
    assert_eq!(r.status, 308);
    assert_eq!(r.headers["location"], format!("https://{}/a", t.addr().ip()));

    // HSTS on every response that has none of its own, over HTTP/1.1 and HTTP/2.
    let own = RecordingBackend::start(
        b"HTTP/1.1 200 OK\r\nStrict-Transport-Security: max-age=1\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    let mut cfg = https_config(&[&b[0]], &[&shop], false)
        .replace("protocol = \"https\"\n", "protocol = \"https\"\nhsts = \"max-age=600\"\n");
    cfg = cfg.replace(
        &format!("  {{ name = \"app-1\", address = \"{}\" }},\n", b[0].address),
        &format!(
            "  {{ name = \"app-1\", address = \"{}\" }},\n  {{ name = \"own\", address = \"{}\" }},\n",
            b[0].address, own.addr
        ),
    );
    let t = Tether::start(&cfg);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let tls = connect(t.addr(), "shop.example", &[b"http/1.1"], None).await;
        let text = get_h1(tls, "/").await.to_ascii_lowercase();
        let hsts: Vec<&str> = text.lines().filter(|l| l.starts_with("strict-transport-security:")).collect();
        seen.push(hsts.join("|"));
    }
    seen.sort();
    assert_eq!(seen, ["strict-transport-security: max-age=1", "strict-transport-security: max-age=600"]);
    let tls = connect(t.addr(), "shop.example", &[b"h2"], None).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let r =
            sender.send_request(Request::get("https://shop.example/").body(Full::default()).unwrap()).await.unwrap();
        seen.push(
            r.headers()
                .get_all("strict-transport-security")
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
                .join("|"),
        );
    }
    seen.sort();
    assert_eq!(seen, ["max-age=1", "max-age=600"]);

    // Each key on the wrong kind of listener is a located error.
    let wrong = https_config(&[&b[0]], &[&shop], false)
        .replace("protocol = \"https\"\n", "protocol = \"https\"\nredirect_to_https = 443\n");
    let out =
        std::process::Command::new(bin()).arg("check").arg("-c").arg(dir.write("r.toml", &wrong)).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("r.toml:6:21: listener \"web\": redirect_to_https is for an http listener"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wrong = http(443).replace("redirect_to_https = 443\n", "hsts = \"max-age=1\"\n");
    let out =
        std::process::Command::new(bin()).arg("check").arg("-c").arg(dir.write("h.toml", &wrong)).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("hsts is for an https listener"));
}

/// A CA, and a client certificate it signed: (CA PEM path, client chain, client key).
fn client_pki(dir: &Scratch) -> (PathBuf, Vec<CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "Tether test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "client-1");
    params.extended_key_usages.push(rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    let client = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    (dir.write("ca.pem", &ca_cert.pem()), vec![client.der().clone()], key)
}

/// An HTTP/1.1 GET over TLS with an optional client certificate: the status line, or
/// the error that ended the exchange.
async fn with_client_cert(
    addr: SocketAddr,
    server: &Cert,
    client: Option<(Vec<CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>)>,
) -> String {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut store = rustls::RootCertStore::empty();
    store.add(server.der.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store);
    let config = match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("shop.example").unwrap();
    let mut tls = match tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await {
        Ok(t) => t,
        Err(e) => return format!("handshake: {e}"),
    };
    if let Err(e) = tls.write_all(b"GET / HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n").await {
        return format!("write: {e}");
    }
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await {
        Ok(Ok(_)) if !out.is_empty() => String::from_utf8_lossy(&out).lines().next().unwrap_or("").to_string(),
        Ok(Ok(_)) => "closed".into(),
        Ok(Err(e)) => format!("read: {e}"),
        Err(_) => "timeout".into(),
    }
}

#[tokio::test]
async fn client_certificates_are_verified_when_asked_for() {
    let dir = Scratch::new();
    let shop = cert(&dir, "shop", &["shop.example"]);
    // Another CA's client first (its ca.pem is then overwritten by the trusted one).
    let (_, stranger_chain, stranger_key) = client_pki(&dir);
    let (ca, chain, key) = client_pki(&dir);
    let b = backends(1).await;
    let base = https_config(&[&b[0]], &[&shop], false);
    let with = |mode: &str| {
        base.replace(
            "protocol = \"https\"\n",
            &format!("protocol = \"https\"\nclient_ca = \"{}\"\n{mode}", ca.display()),
        )
    };
    let t = Tether::start(&with(""));
    assert_eq!(with_client_cert(t.addr(), &shop, Some((chain.clone(), key.clone_key()))).await, "HTTP/1.1 200 OK");
    let without = with_client_cert(t.addr(), &shop, None).await;
    assert!(!without.starts_with("HTTP/1.1"), "a client without a certificate got in: {without}");
    let stranger = with_client_cert(t.addr(), &shop, Some((stranger_chain.clone(), stranger_key.clone_key()))).await;
    assert!(!stranger.starts_with("HTTP/1.1"), "a certificate of another CA got in: {stranger}");
    drop(t);

    let t = Tether::start(&with("client_certificates = \"optional\"\n"));
    assert_eq!(with_client_cert(t.addr(), &shop, None).await, "HTTP/1.1 200 OK");
    assert_eq!(with_client_cert(t.addr(), &shop, Some((chain, key))).await, "HTTP/1.1 200 OK");
    let stranger = with_client_cert(t.addr(), &shop, Some((stranger_chain, stranger_key))).await;
    assert!(!stranger.starts_with("HTTP/1.1"), "a certificate of another CA got in: {stranger}");

    let bad = with("client_certificates = \"sometimes\"\n");
    let out = std::process::Command::new(bin()).arg("check").arg("-c").arg(dir.write("m.toml", &bad)).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("client_certificates \"sometimes\" is not known"));
}

/// Two instances with the same session-ticket secret resume each other's sessions; one
/// with another secret does not (a full handshake, and the request is served all the same).
#[tokio::test]
async fn a_fleet_with_one_ticket_secret_resumes_sessions_on_any_instance() {
    let dir = Scratch::new();
    let shop = cert(&dir, "shop", &["shop.example"]);
    let b = backends(1).await;
    let secret = dir.write("tickets.key", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n");
    let other = dir.write("other.key", "HxwdHhkaGxwVFhcYERITFA0ODxAJCgsMBQYHCAECAwQ=\n");
    let with_secret = |path: &PathBuf| {
        https_config(&[&b[0]], &[&shop], false).replace(
            "protocol = \"https\"\n",
            &format!("protocol = \"https\"\nsession_ticket_key_file = \"{}\"\n", path.display()),
        )
    };
    let (a, a2) = (Tether::start(&with_secret(&secret)), Tether::start(&with_secret(&secret)));
    let stranger = Tether::start(&with_secret(&other));
    let plain = Tether::start(&https_config(&[&b[0]], &[&shop], false));
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let fresh = || {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut store = rustls::RootCertStore::empty();
            store.add(shop.der.clone()).unwrap();
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(store)
                .with_no_client_auth();
            Arc::new(config)
        };
        // A full handshake on the first instance; the ticket it gives resumes on the second.
        let config = fresh();
        let first = connect_with(a.addr(), "shop.example", config.clone()).await;
        assert_eq!(first.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Full));
        assert!(get_h1(first, "/").await.starts_with("HTTP/1.1 200"));
        let second = connect_with(a2.addr(), "shop.example", config.clone()).await;
        assert_eq!(second.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed), "{version:?}");
        assert!(get_h1(second, "/").await.starts_with("HTTP/1.1 200"));
        // Another secret, or none (this process's own keys): a full handshake, served.
        for t in [&stranger, &plain] {
            let config = fresh();
            let first = connect_with(a.addr(), "shop.example", config.clone()).await;
            assert!(get_h1(first, "/").await.starts_with("HTTP/1.1 200"));
            let elsewhere = connect_with(t.addr(), "shop.example", config).await;
            assert_eq!(elsewhere.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Full), "{version:?}");
            assert!(get_h1(elsewhere, "/").await.starts_with("HTTP/1.1 200"));
        }
    }
    // The secret is checked with the config.
    let short = dir.write("short.key", "AAEC\n");
    let path = dir.write("bad.toml", &with_secret(&short));
    let out = std::process::Command::new(bin()).arg("check").arg("-c").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:6:27: listener \"web\": session_ticket_key:"), "{err}");
}

/// A client of `versions` offering `suites` in that order, accepting any certificate.
fn client_of(
    versions: &[&'static rustls::SupportedProtocolVersion],
    suites: &[rustls::SupportedCipherSuite],
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: suites.to_vec(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    });
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    Arc::new(config)
}

#[tokio::test]
async fn the_listener_chooses_aes_128_first_and_takes_only_its_tls_versions() {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let dir = Scratch::new();
    let shop = cert(&dir, "shop", &["shop.example"]);
    let b = backends(1).await;
    let both = https_config(&[&b[0]], &[&shop], false);
    let t = Tether::start(&both);
    let suite = |tls: &TlsStream<TcpStream>| tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
    // Clients that list AES-256 first (as OpenSSL, curl and browsers do) get AES-128 with
    // SHA-256, whose handshake costs less; a client offering only AES-256 still gets it.
    let tls13_first = [cs::TLS13_AES_256_GCM_SHA384, cs::TLS13_CHACHA20_POLY1305_SHA256, cs::TLS13_AES_128_GCM_SHA256];
    let tls = connect_with(t.addr(), "shop.example", client_of(&[&rustls::version::TLS13], &tls13_first)).await;
    assert_eq!(suite(&tls), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    assert!(get_h1(tls, "/").await.starts_with("HTTP/1.1 200"));
    let only256 = client_of(&[&rustls::version::TLS13], &[cs::TLS13_AES_256_GCM_SHA384]);
    let tls = connect_with(t.addr(), "shop.example", only256).await;
    assert_eq!(suite(&tls), rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
    let tls12_first = [
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ];
    let tls = connect_with(t.addr(), "shop.example", client_of(&[&rustls::version::TLS12], &tls12_first)).await;
    assert_eq!(suite(&tls), rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256);
    assert!(get_h1(tls, "/").await.starts_with("HTTP/1.1 200"));

    // `tls_versions`: a TLS 1.3-only listener refuses a TLS 1.2 client, and a TLS 1.2-only
    // one negotiates 1.2 with a client that offers both. Each is taken by a reload.
    let all_suites = rustls::crypto::aws_lc_rs::DEFAULT_CIPHER_SUITES;
    let with = |versions: &str| {
        both.replace("protocol = \"https\"\n", &format!("protocol = \"https\"\ntls_versions = {versions}\n"))
    };
    reload(&t, &with("[\"1.3\"]"), "TLS settings changed").await;
    let tcp = TcpStream::connect(t.addr()).await.unwrap();
    let name = ServerName::try_from("shop.example").unwrap();
    let refused =
        tokio_rustls::TlsConnector::from(client_of(&[&rustls::version::TLS12], all_suites)).connect(name, tcp).await;
    assert!(refused.is_err(), "a TLS 1.2 client was served by a TLS 1.3-only listener");
    let tls = connect_with(
        t.addr(),
        "shop.example",
        client_of(&[&rustls::version::TLS13, &rustls::version::TLS12], all_suites),
    )
    .await;
    assert_eq!(tls.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    reload(&t, &with("[\"1.2\"]"), "TLS settings changed").await;
    let tls = connect_with(
        t.addr(),
        "shop.example",
        client_of(&[&rustls::version::TLS13, &rustls::version::TLS12], all_suites),
    )
    .await;
    assert_eq!(tls.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    assert!(get_h1(tls, "/").await.starts_with("HTTP/1.1 200"));

    // Located errors.
    for (versions, says) in
        [("[\"1.3\", \"1.1\"]", "tls_versions: \"1.1\" is not supported"), ("[]", "tls_versions needs at least one of")]
    {
        let cfg = with(versions);
        let path = dir.write("v.toml", &cfg);
        let out = std::process::Command::new(bin()).arg("check").arg("-c").arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let line = cfg.lines().position(|l| l.starts_with("tls_versions")).unwrap() + 1;
        assert!(!out.status.success() && err.contains(&format!("v.toml:{line}:")) && err.contains(says), "{err}");
    }
    let plain = both.replace("protocol = \"https\"\n", "tls_versions = [\"1.3\"]\n");
    let out =
        std::process::Command::new(bin()).arg("check").arg("-c").arg(dir.write("p.toml", &plain)).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls_versions are only for protocol = \"https\""));
}

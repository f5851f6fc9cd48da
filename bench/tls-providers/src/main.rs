//! Server-side cost of TLS with each rustls crypto provider, in memory (no sockets), one
//! thread: full TLS 1.3 handshakes (ECDSA P-256 certificate, as the bench uses; the
//! provider's preferred key exchange and cipher suite) and bulk records (16 KiB of
//! plaintext each way per round). Only the server's calls are timed.
//!
//!     cargo run --release --manifest-path bench/tls-providers/Cargo.toml

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

const HANDSHAKES: u32 = 3000;
const ROUNDS: u32 = 20_000;
const RECORD: usize = 16 * 1024;

fn main() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["lb.test".to_string()]).unwrap().self_signed(&key).unwrap();
    let der: CertificateDer<'static> = cert.der().clone();
    let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    for (name, provider) in [
        ("ring", rustls::crypto::ring::default_provider()),
        ("aws-lc-rs", rustls::crypto::aws_lc_rs::default_provider()),
    ] {
        let provider = Arc::new(provider);
        let server = Arc::new(
            ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![der.clone()], key_der.clone_key())
                .unwrap(),
        );
        let mut roots = RootCertStore::empty();
        roots.add(der.clone()).unwrap();
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.resumption = rustls::client::Resumption::disabled();
        let client = Arc::new(client);

        // Warm up, then full handshakes.
        for _ in 0..100 {
            handshake(&server, &client);
        }
        let mut server_time = Duration::ZERO;
        for _ in 0..HANDSHAKES {
            server_time += handshake(&server, &client).2;
        }
        let per = server_time / HANDSHAKES;
        // Bulk: one connection, records both ways.
        let (mut s, mut c, _) = handshake(&server, &client);
        let suite = s.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
        let kx = s.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name())).unwrap_or_default();
        let data = vec![7u8; RECORD];
        let mut buf = vec![0u8; RECORD];
        let mut wire = Vec::with_capacity(RECORD + 1024);
        let mut bulk = Duration::ZERO;
        for _ in 0..ROUNDS {
            // Client to server: the server decrypts.
            c.writer().write_all(&data).unwrap();
            wire.clear();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            let t = Instant::now();
            let mut input = &wire[..];
            while !input.is_empty() {
                s.read_tls(&mut input).unwrap();
                s.process_new_packets().unwrap();
            }
            let mut got = 0;
            while got < RECORD {
                got += s.reader().read(&mut buf[got..]).unwrap();
            }
            // Server to client: the server encrypts.
            s.writer().write_all(&buf).unwrap();
            wire.clear();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
            bulk += t.elapsed();
            let mut input = &wire[..];
            while !input.is_empty() {
                c.read_tls(&mut input).unwrap();
                c.process_new_packets().unwrap();
            }
            let mut got = 0;
            while got < RECORD {
                got += c.reader().read(&mut buf[got..]).unwrap();
            }
        }
        let bytes = 2.0 * (ROUNDS as f64) * (RECORD as f64);
        println!(
            "{name:10} {suite} {kx}: full handshake {:.0} µs server CPU ({:.0}/s); bulk {:.0} MB/s server encrypt+decrypt",
            per.as_secs_f64() * 1e6,
            1.0 / per.as_secs_f64(),
            bytes / bulk.as_secs_f64() / 1e6
        );
    }
}

/// One full handshake in memory: the connections, and the time spent in server calls.
fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> (ServerConnection, ClientConnection, Duration) {
    let mut s = ServerConnection::new(server.clone()).unwrap();
    let mut c = ClientConnection::new(client.clone(), ServerName::try_from("lb.test").unwrap()).unwrap();
    let mut wire = Vec::new();
    let mut spent = Duration::ZERO;
    while s.is_handshaking() || c.is_handshaking() {
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let t = Instant::now();
        if !wire.is_empty() {
            s.read_tls(&mut &wire[..]).unwrap();
            s.process_new_packets().unwrap();
        }
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        spent += t.elapsed();
        if !wire.is_empty() {
            c.read_tls(&mut &wire[..]).unwrap();
            c.process_new_packets().unwrap();
        }
    }
    (s, c, spent)
}

//! TLS termination: certificates loaded and checked, chosen by SNI, and the rustls server
//! configuration a listener's handshakes use.
//!
//! A listener's certificates are loaded when its config is (at start and on every reload):
//! a certificate that cannot be read, a key that does not match it, or a name it does not
//! cover is a config error, so a reload with a broken certificate leaves the running one
//! serving. An expired certificate is loaded (a restart must not fail on it) and reported.
//!
//! The crypto provider is aws-lc-rs, chosen by measurement (see ARCHITECTURE.md, "TLS").
//! Handshakes offer TLS 1.3 and 1.2 (or the one `tls_versions` names) with the cipher
//! suites in the listener's order, ALPN `h2` and `http/1.1`, and resume sessions both
//! ways: stateful (a cache of 256 sessions per listener config) and by tickets whose keys
//! rotate.

pub mod backend;
pub mod client_hello;
pub mod der;
pub mod tickets;

use std::collections::HashMap;
use std::sync::Arc;

use rustls::crypto::aws_lc_rs as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// One certificate with its key, as a listener serves it.
#[derive(Debug)]
pub struct Certificate {
    /// The names it is chosen for by SNI: the configured ones, or else every DNS name it
    /// covers; lower-case, `*.` for a wildcard.
    pub names: Vec<String>,
    /// `notAfter`, in seconds since the Unix epoch.
    pub not_after: i64,
    /// Where it came from (the certificate file), for reports.
    pub source: String,
    key: Arc<CertifiedKey>,
}

impl PartialEq for Certificate {
    /// The same chain for the same names (a reload that reads unchanged files is no change).
    fn eq(&self, other: &Certificate) -> bool {
        self.names == other.names && self.key.cert == other.key.cert
    }
}

impl Certificate {
    /// Loads a PEM certificate chain (leaf first) and its PEM private key. `names`, when
    /// given, must each be covered by the certificate.
    pub fn load(source: &str, chain_pem: &[u8], key_pem: &[u8], names: &[String]) -> Result<Certificate, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("is not a PEM certificate chain: {e}"))?;
        let Some(leaf) = chain.first() else {
            return Err("holds no certificate (expected PEM \"BEGIN CERTIFICATE\")".into());
        };
        let Some(info) = der::leaf(leaf) else {
            return Err("holds a certificate Tether cannot read".into());
        };
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("key: is not a PEM private key: {e}"))?;
        let signing = provider::default_provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("key: cannot be used: {e}"))?;
        let key = CertifiedKey::new(chain, signing);
        key.keys_match().map_err(|_| "key: does not belong to the certificate".to_string())?;
        let names = if names.is_empty() {
            info.names.clone()
        } else {
            let names: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
            if let Some(n) = names.iter().find(|n| !info.names.iter().any(|c| covers(c, n))) {
                return Err(format!(
                    "does not cover the name \"{n}\" (it covers: {})",
                    if info.names.is_empty() { "no DNS name".to_string() } else { info.names.join(", ") }
                ));
            }
            names
        };
        Ok(Certificate { names, not_after: info.not_after, source: source.to_string(), key: Arc::new(key) })
    }
}

/// Whether certificate name `pattern` (`a.example` or `*.example`) covers `name` (which
/// may itself be a wildcard, matched as written).
pub fn covers(pattern: &str, name: &str) -> bool {
    if pattern.eq_ignore_ascii_case(name) {
        return true;
    }
    match (pattern.strip_prefix("*."), name.split_once('.')) {
        (Some(suffix), Some((label, rest))) => !label.is_empty() && label != "*" && rest.eq_ignore_ascii_case(suffix),
        _ => false,
    }
}

/// Client certificates a listener asks for: verified against these CA certificates.
#[derive(Debug, PartialEq)]
pub struct ClientAuth {
    pub cas: Vec<CertificateDer<'static>>,
    /// A client without a certificate is refused (else it is let in, and one with a
    /// certificate that does not verify is still refused).
    pub required: bool,
}

impl ClientAuth {
    /// The CA certificates of a PEM file.
    pub fn load(cas_pem: &[u8], required: bool) -> Result<ClientAuth, String> {
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cas_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("is not a PEM certificate file: {e}"))?;
        if cas.is_empty() {
            return Err("holds no certificate (expected PEM \"BEGIN CERTIFICATE\")".into());
        }
        Ok(ClientAuth { cas, required })
    }
}

/// The TLS versions a listener accepts (`tls_versions`): 1.2 and 1.3 unless the config
/// names fewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versions {
    pub tls12: bool,
    pub tls13: bool,
}

impl Versions {
    pub const ALL: Versions = Versions { tls12: true, tls13: true };

    /// rustls' list, the newest first; empty when neither is on.
    fn list(self) -> Vec<&'static rustls::SupportedProtocolVersion> {
        let mut v = Vec::new();
        if self.tls13 {
            v.push(&rustls::version::TLS13);
        }
        if self.tls12 {
            v.push(&rustls::version::TLS12);
        }
        v
    }
}

/// A listener's TLS: its certificates and the rustls configuration built on them.
#[derive(Debug)]
pub struct ServerTls {
    pub certificates: Vec<Certificate>,
    pub client_auth: Option<ClientAuth>,
    pub versions: Versions,
    /// The fleet's session-ticket secret (`session_ticket_key_file` or `_env`), when one is
    /// configured: see `tickets`.
    pub ticket_secret: Option<[u8; 32]>,
    pub config: Arc<rustls::ServerConfig>,
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &ServerTls) -> bool {
        self.certificates == other.certificates
            && self.client_auth == other.client_auth
            && self.ticket_secret == other.ticket_secret
            && self.versions == other.versions
    }
}

impl ServerTls {
    /// The configuration for `certificates`; the first is the default, served to clients
    /// that send no SNI name or one no certificate is for.
    pub fn new(
        certificates: Vec<Certificate>,
        client_auth: Option<ClientAuth>,
        ticket_secret: Option<[u8; 32]>,
        versions: Versions,
    ) -> Result<ServerTls, String> {
        let resolver = Arc::new(BySni::new(&certificates).ok_or("no certificate")?);
        let provider = Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: SERVER_SUITES.to_vec(),
            ..provider::default_provider()
        });
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions.list())
            .map_err(|e| e.to_string())?;
        let builder = match &client_auth {
            None => builder.with_no_client_auth(),
            Some(auth) => {
                let mut roots = rustls::RootCertStore::empty();
                for ca in &auth.cas {
                    roots.add(ca.clone()).map_err(|e| format!("client_ca: {e}"))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = if auth.required { verifier } else { verifier.allow_unauthenticated() };
                builder.with_client_cert_verifier(verifier.build().map_err(|e| format!("client_ca: {e}"))?)
            }
        };
        let mut config = builder.with_cert_resolver(resolver);
        // The server's order, not the client's: OpenSSL, curl and most browsers list
        // AES-256 first, and on this project's machine its SHA-384 key schedule took a
        // fifth of the CPU of a new connection (see ARCHITECTURE.md, "TLS").
        config.ignore_client_order = true;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.ticketer = match ticket_secret {
            // Shared by every instance with the same secret.
            Some(secret) => Arc::new(tickets::SharedTickets::new(secret)),
            // This process's own, with random keys that rotate.
            None => provider::Ticketer::new().map_err(|e| e.to_string())?,
        };
        Ok(ServerTls { certificates, client_auth, versions, ticket_secret, config: Arc::new(config) })
    }
}

/// The cipher suites a listener offers, in the order it chooses them. AES-128-GCM with
/// SHA-256 comes first in both versions: SHA-256 runs on the CPU's SHA extensions where
/// SHA-384 does not (a TLS 1.3 handshake hashes its transcript and derives every secret
/// with the suite's hash), and AES-128 takes fewer rounds than AES-256 for every record.
/// AES-256 and ChaCha20 stay for clients that offer nothing else.
const SERVER_SUITES: &[rustls::SupportedCipherSuite] = &[
    provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
    provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
    provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    provider::cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    provider::cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    provider::cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// Chooses a certificate by the client's SNI name: an exact name first, then a wildcard
/// for the name's parent, then the default.
#[derive(Debug)]
struct BySni {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl BySni {
    fn new(certificates: &[Certificate]) -> Option<BySni> {
        let default = certificates.first()?.key.clone();
        let (mut exact, mut wildcard) = (HashMap::new(), HashMap::new());
        for c in certificates {
            for n in &c.names {
                // The first certificate listed for a name wins.
                match n.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_string()).or_insert_with(|| c.key.clone()),
                    None => exact.entry(n.clone()).or_insert_with(|| c.key.clone()),
                };
            }
        }
        Some(BySni { exact, wildcard, default })
    }

    fn choose(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else { return self.default.clone() };
        let name = name.to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return k.clone();
        }
        if let Some(k) = name.split_once('.').and_then(|(_, parent)| self.wildcard.get(parent)) {
            return k.clone();
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.choose(hello.server_name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generated(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names).unwrap().self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn names_are_covered_exactly_or_by_one_wildcard_label() {
        assert!(covers("shop.example", "SHOP.example"));
        assert!(covers("*.example", "shop.example"));
        assert!(!covers("*.example", "a.shop.example"));
        assert!(!covers("*.example", "example"));
        assert!(!covers("*.example", "*.example.org"));
        assert!(covers("*.example", "*.example"));
        assert!(!covers("shop.example", "*.example"));
    }

    #[test]
    fn a_certificate_loads_with_its_key_and_names() {
        let (cert, key) = generated(&["shop.example", "*.cdn.example"]);
        let c = Certificate::load("c.pem", cert.as_bytes(), key.as_bytes(), &[]).unwrap();
        assert_eq!(c.names, ["shop.example", "*.cdn.example"]);
        let c = Certificate::load("c.pem", cert.as_bytes(), key.as_bytes(), &["img.cdn.example".into()]).unwrap();
        assert_eq!(c.names, ["img.cdn.example"]);
        let e = Certificate::load("c.pem", cert.as_bytes(), key.as_bytes(), &["other.example".into()]).unwrap_err();
        assert!(e.contains("does not cover the name \"other.example\""), "{e}");
        let (_, other_key) = generated(&["shop.example"]);
        let e = Certificate::load("c.pem", cert.as_bytes(), other_key.as_bytes(), &[]).unwrap_err();
        assert_eq!(e, "key: does not belong to the certificate");
        let e = Certificate::load("c.pem", key.as_bytes(), key.as_bytes(), &[]).unwrap_err();
        assert!(e.contains("holds no certificate"), "{e}");
        let e = Certificate::load("c.pem", cert.as_bytes(), cert.as_bytes(), &[]).unwrap_err();
        assert!(e.starts_with("key: "), "{e}");
    }

    #[test]
    fn sni_chooses_exact_then_wildcard_then_the_default() {
        let load = |names: &[&str]| {
            let (cert, key) = generated(names);
            Certificate::load("c.pem", cert.as_bytes(), key.as_bytes(), &[]).unwrap()
        };
        let certs = vec![load(&["default.example"]), load(&["*.shop.example"]), load(&["www.shop.example"])];
        let ders: Vec<_> = certs.iter().map(|c| c.key.cert[0].clone()).collect();
        let sni = BySni::new(&certs).unwrap();
        let pick = |name: Option<&str>| ders.iter().position(|d| *d == sni.choose(name).cert[0]).unwrap();
        assert_eq!(pick(Some("WWW.shop.example")), 2);
        assert_eq!(pick(Some("api.shop.example")), 1);
        assert_eq!(pick(Some("a.b.shop.example")), 0);
        assert_eq!(pick(Some("elsewhere.example")), 0);
        assert_eq!(pick(None), 0);
        assert!(ServerTls::new(certs, None, None, Versions::ALL).is_ok());
        assert!(ServerTls::new(Vec::new(), None, None, Versions::ALL).is_err());
    }
}

//! TLS to backends: the rustls client configuration a pool's connections use, and the
//! name each backend's certificate is verified against.
//!
//! A pool's settings are turned into one [`BackendTls`] when its config is loaded, so every
//! connection of the pool shares one configuration and with it one session cache: a new
//! connection to a backend resumes the last session with it (TLS 1.3 tickets, TLS 1.2
//! session ids) instead of a full handshake.

use std::net::IpAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::aws_lc_rs as provider;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Where Linux distributions keep their bundle of trusted CA certificates (Debian and
/// Ubuntu, Fedora and RHEL, openSUSE, Alpine), in the order they are tried. `SSL_CERT_FILE`
/// comes first when set, as for OpenSSL.
pub const SYSTEM_ROOTS: [&str; 5] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// What a backend's certificate is verified against.
#[derive(Debug, Clone, PartialEq)]
pub enum Verify {
    /// These CA certificates (a pool's `ca_file`, or the system's bundle).
    Roots(Vec<CertificateDer<'static>>),
    /// Nothing: any certificate is taken (`insecure_skip_verify`). The handshake's own
    /// signatures are still checked, so the connection is encrypted, but to whoever answers.
    Nothing,
}

/// A pool's TLS to its backends.
#[derive(Debug)]
pub struct BackendTls {
    /// The name sent as SNI and verified in each backend's certificate; `None`: each
    /// backend's IP address is verified instead (and no SNI is sent).
    pub server_name: Option<ServerName<'static>>,
    pub verify: Verify,
    /// Protocols offered by ALPN, most preferred first.
    pub alpn: Vec<Vec<u8>>,
    pub config: Arc<rustls::ClientConfig>,
}

impl PartialEq for BackendTls {
    /// The same settings (a reload that reads an unchanged CA file is no change).
    fn eq(&self, other: &BackendTls) -> bool {
        self.server_name == other.server_name && self.verify == other.verify && self.alpn == other.alpn
    }
}

/// The CA certificates of a PEM file.
pub fn roots(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("is not a PEM certificate file: {e}"))?;
    if cas.is_empty() {
        return Err("holds no certificate (expected PEM \"BEGIN CERTIFICATE\")".into());
    }
    Ok(cas)
}

impl BackendTls {
    /// The configuration for `server_name` (a DNS name or an IP address; `None`: each
    /// backend's address), verifying as `verify` says, offering `alpn`.
    pub fn new(server_name: Option<&str>, verify: Verify, alpn: &[&[u8]]) -> Result<BackendTls, String> {
        let server_name = match server_name {
            None => None,
            Some(n) => Some(
                ServerName::try_from(n.to_string()).map_err(|_| format!("\"{n}\" is not a DNS name or IP address"))?,
            ),
        };
        let provider = Arc::new(provider::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?;
        let mut config = match &verify {
            Verify::Roots(cas) => {
                let mut roots = rustls::RootCertStore::empty();
                // A system bundle may hold a certificate webpki cannot use; the rest still count.
                let (added, _) = roots.add_parsable_certificates(cas.iter().cloned());
                if added == 0 {
                    return Err("no usable CA certificate".into());
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Verify::Nothing => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider.signature_verification_algorithms)))
                .with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(BackendTls { server_name, verify, alpn: config.alpn_protocols.clone(), config: Arc::new(config) })
    }

    /// The name to verify for a backend at `ip`.
    pub fn name_for(&self, ip: IpAddr) -> ServerName<'static> {
        self.server_name.clone().unwrap_or(ServerName::IpAddress(ip.into()))
    }
}

/// Takes any certificate, but still checks that the peer holds its key.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

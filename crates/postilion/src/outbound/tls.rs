//! TLS for outgoing SMTP: two client configurations, one that checks nothing about the
//! server's certificate (opportunistic TLS, RFC 7435: encryption against passive observers,
//! better than plaintext) and one that verifies it against the system's trust store plus an
//! optional CA file.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tracing::warn;

/// The two client configurations, built once at start-up.
pub struct ClientTls {
    pub any_certificate: Arc<ClientConfig>,
    /// `None` when no trust anchor could be loaded at all.
    pub verified: Option<Arc<ClientConfig>>,
}

impl ClientTls {
    pub fn new(ca_file: Option<&Path>) -> anyhow::Result<ClientTls> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = || {
            ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .context("selecting TLS versions")
        };
        let any_certificate = builder()?
            .dangerous()
            .with_custom_certificate_verifier(any_cert::AnyCertificate::new(&provider))
            .with_no_client_auth();
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            warn!(%error, "skipping part of the system's CA certificates");
        }
        let (_added, _ignored) = roots.add_parsable_certificates(native.certs);
        if let Some(path) = ca_file {
            for certificate in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading CA certificates from {}", path.display()))?
            {
                let certificate = certificate
                    .with_context(|| format!("parsing CA certificates in {}", path.display()))?;
                roots
                    .add(certificate)
                    .with_context(|| format!("adding a CA certificate from {}", path.display()))?;
            }
        }
        let verified = (!roots.is_empty())
            .then(|| builder().map(|b| b.with_root_certificates(roots).with_no_client_auth()))
            .transpose()?;
        Ok(ClientTls {
            any_certificate: Arc::new(any_certificate),
            verified: verified.map(Arc::new),
        })
    }
}

/// The negotiated protocol version and cipher suite, for logs.
pub fn describe(connection: &rustls::ClientConnection) -> String {
    let version = match connection.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "TLS".to_string(),
    };
    match connection.negotiated_cipher_suite() {
        Some(suite) => format!("{version} {:?}", suite.suite()),
        None => version,
    }
}

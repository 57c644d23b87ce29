//! TLS client configuration for STARTTLS and implicit TLS.
//!
//! FOR BENCHMARKING ONLY: the certificate verifier below accepts any server certificate, whoever
//! it names and whoever signed it, so that the tool works against test servers with self-signed
//! certificates. It offers no protection against an attacker in the middle and must never be
//! used to send real mail.

use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

/// A connector using the aws-lc-rs provider and a verifier that accepts any certificate.
pub fn connector() -> anyhow::Result<TlsConnector> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = any_cert::AnyCertificate::new(&provider);
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The name to present in the handshake for the host part of `server` (`host:port` or
/// `[v6]:port`): an IP address (no SNI is sent) or a DNS name.
pub fn server_name(server: &str) -> anyhow::Result<ServerName<'static>> {
    let host = match server.rsplit_once(':') {
        Some((host, _port)) => host,
        None => server,
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    ServerName::try_from(host.to_owned())
        .map_err(|error| anyhow::anyhow!("{host:?} is not a valid TLS server name: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        assert!(matches!(server_name("127.0.0.1:2525").unwrap(), ServerName::IpAddress(_)));
        assert!(matches!(server_name("[::1]:465").unwrap(), ServerName::IpAddress(_)));
        assert!(matches!(server_name("mx.example:25").unwrap(), ServerName::DnsName(_)));
        assert!(server_name("bad name:25").is_err());
    }

    #[test]
    fn connector_builds() {
        connector().unwrap();
    }
}

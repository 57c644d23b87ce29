//! TLS server configuration: certificates from PEM files, or a self-signed certificate
//! generated on first start and kept under the data directory.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Builds the acceptor's configuration: TLS 1.2 and 1.3 only, no client certificates.
pub fn server_config(
    certificate: Option<&Path>,
    private_key: Option<&Path>,
    data_dir: &Path,
    hostname: &str,
) -> anyhow::Result<Arc<ServerConfig>> {
    let (cert_path, key_path) = match (certificate, private_key) {
        (Some(cert), Some(key)) => (cert.to_path_buf(), key.to_path_buf()),
        (None, None) => self_signed(data_dir, hostname)?,
        _ => bail!("tls.certificate and tls.private_key must be given together"),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("reading certificates from {}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificates in {}", cert_path.display()))?;
    if chain.is_empty() {
        bail!("no certificate found in {}", cert_path.display());
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading private key from {}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("selecting TLS versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| {
            format!("certificate {} does not match key {}", cert_path.display(), key_path.display())
        })?;
    Ok(Arc::new(config))
}

/// Returns the paths of the kept self-signed certificate, generating it when missing.
fn self_signed(data_dir: &Path, hostname: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = data_dir.join("tls");
    let cert_path = dir.join("self-signed-cert.pem");
    let key_path = dir.join("self-signed-key.pem");
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting mode of {}", dir.display()))?;
    let mut names = vec![hostname.to_string()];
    if hostname != "localhost" {
        names.push("localhost".into());
    }
    let generated = rcgen::generate_simple_self_signed(names)
        .context("generating a self-signed certificate")?;
    write_private(&key_path, generated.signing_key.serialize_pem().as_bytes())?;
    write_private(&cert_path, generated.cert.pem().as_bytes())?;
    Ok((cert_path, key_path))
}

fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents).with_context(|| format!("writing {}", path.display()))?;
    file.sync_all().with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

/// The negotiated protocol version and cipher suite, for Received and logs.
pub fn describe(connection: &rustls::ServerConnection) -> (String, String) {
    let version = match connection.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "TLS".to_string(),
    };
    let cipher = connection
        .negotiated_cipher_suite()
        .map(|suite| format!("{:?}", suite.suite()))
        .unwrap_or_else(|| "unknown".into());
    (version, cipher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_generated_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        server_config(None, None, dir.path(), "mx.test").unwrap();
        let key = dir.path().join("tls/self-signed-key.pem");
        let first = fs::read(&key).unwrap();
        assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(dir.path().join("tls")).unwrap().permissions().mode() & 0o777,
            0o700
        );
        server_config(None, None, dir.path(), "mx.test").unwrap();
        assert_eq!(fs::read(&key).unwrap(), first, "kept across restarts");
    }

    #[test]
    fn configured_pem_files_are_used_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "mx.test").unwrap();
        server_config(Some(&cert), Some(&key), dir.path(), "x").unwrap();
        assert!(server_config(Some(&key), Some(&key), dir.path(), "x").is_err());
        assert!(server_config(Some(&cert), None, dir.path(), "x").is_err());
    }
}

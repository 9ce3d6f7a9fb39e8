//! TLS for the `vncgate-tls` proxy: a throwaway certificate made at the start of a run, the
//! PEM files `vncgate serve --tls-cert --tls-key` reads, and the client configuration that
//! trusts that certificate and nothing else.
//!
//! The client is rustls with ring, as vncgate-loadtest's `wss://` dialer and the gateway
//! itself. Session resumption is off: every connection of the upgrades point pays a full
//! handshake (key exchange and certificate signature), which is what a viewer arriving for
//! the first time costs the gateway, and the figure the issue asks for ("handshakes per
//! second"). A browser that comes back within a ticket's lifetime resumes, and costs less.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::client::Resumption;
use rustls_pki_types::CertificateDer;

/// Names the certificate is valid for: the bench dials `127.0.0.1` (an IP address SAN, so
/// no SNI is sent); `localhost` for a person trying the files by hand.
pub const SUBJECT_ALT_NAMES: [&str; 2] = ["127.0.0.1", "localhost"];

/// How the client reaches a `wss://` target: its rustls configuration, and the PEM file of
/// the one certificate it trusts (vncgate-loadtest's idle mode, used by the idle point,
/// takes a CA file rather than a configuration).
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    pub ca_pem: PathBuf,
}

/// A certificate and key written as PEM files, and a client that trusts only it.
#[derive(Debug, Clone)]
pub struct BenchCert {
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    pub client: ClientTls,
}

/// Makes a self-signed ECDSA P-256 certificate for [`SUBJECT_ALT_NAMES`] (rcgen's default
/// key type; what most public certificates are today) and writes `DIR/cert.pem` and
/// `DIR/key.pem`, replacing older ones.
pub fn generate(dir: &Path) -> Result<BenchCert, String> {
    let names: Vec<String> = SUBJECT_ALT_NAMES.iter().map(|&s| s.to_owned()).collect();
    let ck = rcgen::generate_simple_self_signed(names).map_err(|e| format!("rcgen: {e}"))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let cert_pem = dir.join("cert.pem");
    let key_pem = dir.join("key.pem");
    for (path, text) in [
        (&cert_pem, ck.cert.pem()),
        (&key_pem, ck.signing_key.serialize_pem()),
    ] {
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let config = client_config(ck.cert.der().clone())?;
    Ok(BenchCert {
        cert_pem: cert_pem.clone(),
        key_pem,
        client: ClientTls {
            config,
            ca_pem: cert_pem,
        },
    })
}

/// A rustls client (ring, TLS 1.2 and 1.3, no resumption, no ALPN) whose only root is
/// `cert`.
pub fn client_config(cert: CertificateDer<'static>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    roots
        .add(cert)
        .map_err(|e| format!("unusable certificate: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    pub(crate) fn tempdir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("vncgate-bench-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn writes_a_pem_pair_the_client_trusts_and_nothing_else() {
        let d = tempdir("gen");
        let c = generate(&d).unwrap();
        assert_eq!(c.cert_pem, d.join("cert.pem"));
        assert_eq!(c.client.ca_pem, c.cert_pem);
        let chain: Vec<_> = CertificateDer::pem_file_iter(&c.cert_pem)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(chain.len(), 1);
        assert!(matches!(
            PrivateKeyDer::from_pem_file(&c.key_pem).unwrap(),
            PrivateKeyDer::Pkcs8(_)
        ));
        // A second run replaces the pair with a new one.
        let again = generate(&d).unwrap();
        let chain2: Vec<_> = CertificateDer::pem_file_iter(&again.cert_pem)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_ne!(chain, chain2);
        let _ = std::fs::remove_dir_all(&d);
    }
}

//! TLS on the browser leg (`--tls-cert FILE --tls-key FILE`): the certificate store and the
//! rustls server configuration. The per-connection adapter that drives rustls over a worker's
//! non-blocking socket is [`crate::server::tls`].
//!
//! One [`Certs`] serves every worker. It answers each ClientHello with the certificate
//! loaded last, so a reload (SIGHUP, or the files changing on disk) reaches the next
//! handshake while live sessions keep the keys they negotiated. A reload that fails (a
//! missing file, a key that does not match the certificate, a half-written pair) keeps the
//! old certificate and says why; the next change of either file tries again.
//!
//! TLS 1.2 and 1.3 only, ALPN `http/1.1` (a WebSocket upgrade is HTTP/1.1), ring as the
//! provider, chosen explicitly so nothing depends on a process-wide default. Kernel TLS,
//! which would let the relay splice again, is not used: this kind of host offers no `tls`
//! upper-layer protocol to test it on.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, version};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::metrics as m;

/// How often the watcher looks at the certificate files.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// The certificate and key files, and the pair loaded from them last.
pub struct Certs {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// What the files looked like at the last load attempt, successful or not.
    seen: Mutex<(Stamp, Stamp)>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// A file's identity and version: a replaced file (new inode, as `mv` and Kubernetes'
/// symlink swaps make) or a rewritten one (new size or mtime) both count as changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Option<(u64, u64, u64, SystemTime)>);

impl Stamp {
    fn of(path: &Path) -> Stamp {
        use std::os::unix::fs::MetadataExt as _;
        Stamp(std::fs::metadata(path).ok().map(|m| {
            (
                m.dev(),
                m.ino(),
                m.len(),
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            )
        }))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 RSA or
/// SEC1 EC), and checks that the key is the leaf's.
pub fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "--tls-cert {}: no CERTIFICATE block in the file",
            cert.display()
        ));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "--tls-key {}: {e} (expected a PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block)",
            key.display()
        )
    })?;
    CertifiedKey::from_der(chain, der, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "--tls-key {} is not the key of the certificate in --tls-cert {}",
            key.display(),
            cert.display()
        ),
        e => format!("--tls-key {}: {e}", key.display()),
    })
}

impl Certs {
    /// Loads the pair once; an error here stops startup.
    pub fn open(cert: PathBuf, key: PathBuf) -> Result<Arc<Certs>, String> {
        let provider = provider();
        let seen = (Stamp::of(&cert), Stamp::of(&key));
        let ck = load(&cert, &key, &provider)?;
        Ok(Arc::new(Certs {
            cert,
            key,
            provider,
            current: RwLock::new(Arc::new(ck)),
            seen: Mutex::new(seen),
        }))
    }

    /// The pair the next handshake gets.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads the files again and, when they make a valid pair, serves it from the next
    /// handshake on. `why` says what asked (`sighup`, `file_changed`), for the log line.
    pub fn reload(&self, why: &'static str) -> Result<(), String> {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) =
            (Stamp::of(&self.cert), Stamp::of(&self.key));
        let r = load(&self.cert, &self.key, &self.provider);
        let result = if r.is_ok() { "ok" } else { "failed" };
        metrics::counter!(m::CONFIG_RELOADS, "result" => result).increment(1);
        match r {
            Ok(ck) => {
                let chain = ck.cert.len();
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
                tracing::info!(cert = %self.cert.display(), chain, trigger = why, "TLS certificate reloaded; new connections get it");
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, trigger = why, "TLS certificate reload failed; keeping the previous certificate");
                Err(e)
            }
        }
    }

    /// Whether either file changed since the last load attempt.
    fn changed(&self) -> bool {
        let now = (Stamp::of(&self.cert), Stamp::of(&self.key));
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) != now
    }

    /// Watches the two files and reloads when either changes. A pair written one file at a
    /// time fails once (the key does not match yet) and loads at the second change.
    pub fn watch(self: &Arc<Self>) -> std::io::Result<()> {
        let certs = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("vncgate-tls-watch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(WATCH_INTERVAL);
                    let Some(c) = certs.upgrade() else { return };
                    if c.changed() {
                        let _ = c.reload("file_changed");
                    }
                }
            })
            .map(drop)
    }

    /// The rustls configuration every worker's connections use.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, String> {
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&version::TLS13, &version::TLS12])
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vncgate-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_by_name() {
        let d = tempdir("mismatch");
        let (c1, _) = pair(&d, "a");
        let (_, k2) = pair(&d, "b");
        let e = load(&c1, &k2, &provider()).unwrap_err();
        assert!(e.contains("is not the key of the certificate"), "{e}");
    }

    #[test]
    fn a_file_without_a_certificate_is_refused() {
        let d = tempdir("empty");
        let (_, k) = pair(&d, "a");
        let e = load(&k, &k, &provider()).unwrap_err();
        assert!(e.contains("no CERTIFICATE block"), "{e}");
        let missing = d.join("nope.crt");
        let e = load(&missing, &k, &provider()).unwrap_err();
        assert!(e.contains("nope.crt"), "{e}");
    }

    #[test]
    fn a_failed_reload_keeps_the_served_certificate() {
        let d = tempdir("reload");
        let (c, k) = pair(&d, "a");
        let certs = Certs::open(c.clone(), k.clone()).unwrap();
        let before = certs.current().cert[0].clone();
        // The certificate replaced, its key not yet: the pair does not match.
        let (c2, k2) = pair(&d, "b");
        std::fs::copy(&c2, &c).unwrap();
        assert!(certs.changed());
        assert!(certs.reload("test").is_err());
        assert_eq!(certs.current().cert[0], before);
        assert!(!certs.changed());
        // Then the key: the new pair is served.
        std::fs::copy(&k2, &k).unwrap();
        certs.reload("test").unwrap();
        assert_ne!(certs.current().cert[0], before);
    }
}

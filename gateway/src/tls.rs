//! Optional TLS (`wss://`, `https://`) with rustls: a certificate chain and key from PEM
//! files, reloaded on SIGHUP or when either file changes, without touching open
//! connections (each keeps the certificate it was made with; new handshakes get the new
//! one). rustls' defaults: TLS 1.2 and 1.3 only, AEAD suites with forward secrecy.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        crypto::ring,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::{ClientHello, ResolvesServerCert},
        sign::CertifiedKey,
    },
};

/// How often the files are checked for changes (besides SIGHUP).
const WATCH_PERIOD: Duration = Duration::from_secs(2);

/// The certificate and key files, and the key pair made from them.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// Modification times of the files as last loaded.
    loaded: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate", cert.display()));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let signing =
        ring::sign::any_supported_type(&key_der).map_err(|e| format!("{}: {e}", key.display()))?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match()
        .map_err(|e| format!("{} does not match {}: {e}", key.display(), cert.display()))?;
    Ok(pair)
}

impl Reloading {
    /// Loads the files again if they changed (or `force`); a bad pair keeps the old one.
    fn reload(&self, force: bool) -> Result<bool, String> {
        let stamps = (modified(&self.cert), modified(&self.key));
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if !force && *loaded == stamps {
            return Ok(false);
        }
        let pair = load(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(pair);
        *loaded = stamps;
        Ok(true)
    }
}

/// The TLS side of the listener.
pub struct Tls {
    acceptor: TlsAcceptor,
    files: Arc<Reloading>,
}

impl Tls {
    pub fn new(cert: &Path, key: &Path) -> Result<Self, String> {
        let stamps = (modified(cert), modified(key));
        let files = Arc::new(Reloading {
            current: RwLock::new(Arc::new(load(cert, key)?)),
            cert: cert.to_owned(),
            key: key.to_owned(),
            loaded: Mutex::new(stamps),
        });
        let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(files.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            files,
        })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Reloads on SIGHUP and when the files change, until the process ends.
    pub fn watch(&self) {
        let files = self.files.clone();
        tokio::spawn(async move {
            let mut hup = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::hangup(),
            ) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "no SIGHUP handler: TLS files reload on change only");
                    None
                }
            };
            let mut tick = tokio::time::interval(WATCH_PERIOD);
            loop {
                let force = tokio::select! {
                    _ = tick.tick() => false,
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
                };
                match files.reload(force) {
                    Ok(true) => {
                        tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
                        crate::metrics::tls_reload("ok");
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS reload failed; keeping the current certificate");
                        crate::metrics::tls_reload("error");
                    }
                }
            }
        });
    }
}

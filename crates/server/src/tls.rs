//! TLS for `tls` and `wss` listeners: rustls (ring provider) over tokio-rustls, TLS 1.2 and 1.3
//! only, certificates from PEM files, optional client certificates checked against a CA
//! (mutual TLS), and reloading without a restart.
//!
//! A listener holds a [`TlsConfig`]: the current `rustls::ServerConfig` behind a lock, taken
//! afresh for each accepted connection. [`TlsConfig::reload`] builds a new one from the files
//! and swaps it in only if every file loads; a broken certificate leaves the old one serving.
//! The server reloads on SIGHUP and when a file's modification time changes.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

use crate::config::{CertIdentity, ListenerConfig, ListenerProtocol};

/// A problem with one of a listener's TLS files, naming the config key it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFileError {
    /// `cert`, `key` or `client_ca`.
    pub key: &'static str,
    pub message: String,
}

impl std::fmt::Display for TlsFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    require_client_cert: bool,
    alpn: Vec<Vec<u8>>,
}

impl Files {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }
}

/// A listener's TLS settings, reloadable.
pub struct TlsConfig {
    files: Files,
    current: RwLock<Arc<ServerConfig>>,
    /// Modification times the current config was loaded from.
    loaded: RwLock<Vec<Option<SystemTime>>>,
    pub identity: CertIdentity,
}

fn read(path: &Path, key: &'static str) -> Result<Vec<u8>, TlsFileError> {
    fs::read(path).map_err(|e| TlsFileError {
        key,
        message: format!("cannot read {}: {e}", path.display()),
    })
}

fn certificates(
    path: &Path,
    key: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let pem = read(path, key)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsFileError {
            key,
            message: format!("{} is not a PEM certificate file: {e}", path.display()),
        })?;
    if certs.is_empty() {
        return Err(TlsFileError {
            key,
            message: format!("{} holds no certificate", path.display()),
        });
    }
    Ok(certs)
}

fn build(files: &Files) -> Result<ServerConfig, TlsFileError> {
    let provider = Arc::new(default_provider());
    let chain = certificates(&files.cert, "cert")?;
    let key_pem = read(&files.key, "key")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsFileError {
        key: "key",
        message: format!(
            "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
            files.key.display()
        ),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsFileError {
            key: "cert",
            message: format!("TLS setup: {e}"),
        })?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(path, "client_ca")? {
                roots.add(cert).map_err(|e| TlsFileError {
                    key: "client_ca",
                    message: format!("{}: unusable CA certificate: {e}", path.display()),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if files.require_client_cert {
                verifier.build()
            } else {
                verifier.allow_unauthenticated().build()
            };
            let verifier = verifier.map_err(|e| TlsFileError {
                key: "client_ca",
                message: format!("{}: {e}", path.display()),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsFileError {
            key: "key",
            message: format!(
                "{} does not go with {}: {e}",
                files.key.display(),
                files.cert.display()
            ),
        })?;
    config.alpn_protocols = files.alpn.clone();
    Ok(config)
}

fn mtimes(files: &Files) -> Vec<Option<SystemTime>> {
    files
        .paths()
        .map(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

impl TlsConfig {
    /// Loads a `tls` or `wss` listener's files; `Ok(None)` for other protocols.
    pub fn load(listener: &ListenerConfig) -> Result<Option<Arc<TlsConfig>>, TlsFileError> {
        let alpn: Vec<Vec<u8>> = match listener.protocol {
            // MQTT's registered ALPN id; a WebSocket client speaks HTTP/1.1 first.
            ListenerProtocol::Tls => vec![b"mqtt".to_vec()],
            ListenerProtocol::Wss => vec![b"http/1.1".to_vec()],
            _ => return Ok(None),
        };
        let (Some(cert), Some(key)) = (&listener.cert, &listener.key) else {
            return Err(TlsFileError {
                key: if listener.cert.is_none() {
                    "cert"
                } else {
                    "key"
                },
                message: format!("required for a {} listener", listener.protocol),
            });
        };
        let files = Files {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: listener.client_ca.clone(),
            require_client_cert: listener.require_client_cert,
            alpn,
        };
        let loaded = mtimes(&files);
        let config = build(&files)?;
        Ok(Some(Arc::new(TlsConfig {
            files,
            current: RwLock::new(Arc::new(config)),
            loaded: RwLock::new(loaded),
            identity: listener.cert_identity,
        })))
    }

    /// The config for a new connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// Builds a new config from the files and puts it in service; on any error the old one
    /// stays and the error is returned.
    pub fn reload(&self) -> Result<(), TlsFileError> {
        let loaded = mtimes(&self.files);
        let config = build(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        Ok(())
    }

    /// Whether a file changed since the current config was loaded (or since the last failed
    /// attempt, so a broken file is reported once, not on every check).
    pub fn changed(&self) -> bool {
        let now = mtimes(&self.files);
        let mut loaded = self.loaded.write().unwrap_or_else(|e| e.into_inner());
        if *loaded == now {
            return false;
        }
        *loaded = now;
        true
    }

    pub fn cert_path(&self) -> &Path {
        &self.files.cert
    }
}

/// The name a verified client certificate gives its holder, by `identity`.
pub fn certificate_identity(cert: &CertificateDer<'_>, identity: CertIdentity) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    match identity {
        CertIdentity::None => None,
        CertIdentity::Cn => parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        CertIdentity::San => {
            let san = parsed.subject_alternative_name().ok()??;
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::DNSName(n) | GeneralName::RFC822Name(n) => Some((*n).to_owned()),
                _ => None,
            })
        }
    }
}

/// A client's TLS settings (a bridge dialling a remote broker): the remote's certificate must
/// chain to `ca_file`'s certificates, or with none to the Mozilla roots built in
/// (`webpki-roots`); `cert` and `key` are a client certificate for mutual TLS.
pub fn client_config(
    ca_file: Option<&Path>,
    cert_key: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsFileError> {
    let provider = Arc::new(default_provider());
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in certificates(path, "ca_file")? {
                roots.add(cert).map_err(|e| TlsFileError {
                    key: "ca_file",
                    message: format!("{}: unusable CA certificate: {e}", path.display()),
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsFileError {
            key: "ca_file",
            message: format!("TLS setup: {e}"),
        })?
        .with_root_certificates(roots);
    match cert_key {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key_path)) => {
            let chain = certificates(cert, "cert")?;
            let key_pem = read(key_path, "key")?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsFileError {
                key: "key",
                message: format!(
                    "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                    key_path.display()
                ),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsFileError {
                    key: "key",
                    message: format!(
                        "{} does not go with {}: {e}",
                        key_path.display(),
                        cert.display()
                    ),
                })
        }
    }
}

//! TLS certificates reload on SIGHUP in the real `petrel` binary: the new certificate is served
//! at once, and a broken one is refused with a log line while the previous one stays.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// A self-signed certificate for localhost, written as `server.pem` / `server.key` in `dir`;
/// returns a client config that trusts exactly it.
fn new_certificate(dir: &Path) -> Arc<ClientConfig> {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

async fn handshake(addr: std::net::SocketAddr, config: Arc<ClientConfig>) -> bool {
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let name = ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .is_ok()
}

async fn wait_for_log(broker: &Broker, needle: &str, count: usize) {
    let started = Instant::now();
    while broker.log().matches(needle).count() < count {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "no {needle:?} in the log after SIGHUP:\n{}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_a_broken_one_keeps_the_old() {
    let _machine = light().await;
    let dir = std::env::temp_dir().join(format!("petrel-sighup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let first = new_certificate(&dir);
    let keys = format!(
        "protocol = \"tls\"\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.join("server.pem").display(),
        dir.join("server.key").display()
    );
    let broker = Broker::start(&keys);
    assert!(handshake(broker.addr, first.clone()).await);

    let second = new_certificate(&dir);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(broker.pid() as i32, libc::SIGHUP) };
    wait_for_log(&broker, "TLS certificate reloaded", 1).await;
    assert!(broker.log().contains("SIGHUP"));
    assert!(
        handshake(broker.addr, second.clone()).await,
        "new certificate served"
    );
    assert!(
        !handshake(broker.addr, first).await,
        "old certificate retired"
    );

    std::fs::write(dir.join("server.pem"), "garbage").unwrap();
    unsafe { libc::kill(broker.pid() as i32, libc::SIGHUP) };
    wait_for_log(&broker, "TLS certificate not reloaded", 1).await;
    assert!(
        handshake(broker.addr, second).await,
        "the previous certificate stays in service"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

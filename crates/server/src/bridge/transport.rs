//! Dialling a bridge's remote broker: TCP, TLS, WebSocket or WebSocket over TLS.

use std::io;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;

use super::link::BoxIo;
use crate::config::{BridgeConfig, BridgeTransport};

/// Opens the stream MQTT runs over; the caller bounds the time it may take.
pub(crate) async fn dial(
    config: &BridgeConfig,
    tls: Option<Arc<ClientConfig>>,
) -> io::Result<BoxIo> {
    let (host, port) = config
        .host_port()
        .ok_or_else(|| io::Error::other("address is not host:port"))?;
    let tcp = TcpStream::connect((host, port)).await?;
    // MQTT packets are small and latency-sensitive.
    tcp.set_nodelay(true)?;
    let tls_stream = |tcp: TcpStream| async {
        let tls = tls.ok_or_else(|| io::Error::other("no TLS settings"))?;
        let name = config.server_name.as_deref().unwrap_or(host).to_owned();
        let name = ServerName::try_from(name)
            .map_err(|e| io::Error::other(format!("server name: {e}")))?;
        TlsConnector::from(tls).connect(name, tcp).await
    };
    let url = |scheme: &str| {
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        format!("{scheme}://{host}:{port}{}", config.path)
    };
    Ok(match config.transport {
        BridgeTransport::Tcp => Box::new(tcp),
        BridgeTransport::Tls => Box::new(tls_stream(tcp).await?),
        BridgeTransport::Ws => Box::new(crate::ws::connect(tcp, &url("ws")).await?),
        BridgeTransport::Wss => {
            let tls = tls_stream(tcp).await?;
            Box::new(crate::ws::connect(tls, &url("wss")).await?)
        }
    })
}

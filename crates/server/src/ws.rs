//! MQTT over WebSocket (`ws` and `wss` listeners): the HTTP/1.1 upgrade on the listener's path
//! with the `mqtt` / `mqttv3.1` subprotocols, then a byte stream over binary frames so the
//! one connection driver serves it like TCP.
//!
//! MQTT packets may be split across frames or several may share one frame: the driver sees
//! only bytes. Pings are answered by tungstenite (a ping is not an MQTT packet and moves no
//! keepalive), a close frame ends the stream, and a text frame is a protocol error [MQTT-6.0.0-1].
//!
//! Bounds (issue 20): the write side holds at most two frames of `WRITE_CHUNK` and a control
//! frame (`max_write_buffer_size`); a pong that cannot be written stops reading, as the driver
//! stops reading a TCP client whose output does not drain, so a client that pings and never
//! reads fills its own socket, not our memory. A message or frame larger than the packet limit
//! (plus slack) ends the connection. Before CONNECT, the bytes read since the last data message
//! (what tungstenite holds of a message being assembled, or pings) are held to
//! `max_connect_size` (plus slack) and counted against the partial-input budget (`input.rs`),
//! so fragments that never end cost no more than an incomplete CONNECT does over TCP.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;

use crate::input::InputShare;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Subprotocols MQTT over WebSocket uses (§6): `mqtt` for 3.1.1 and 5.0, `mqttv3.1` for 3.1.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// What the upgrade request told us.
pub struct Upgrade {
    /// The first address of `X-Forwarded-For`, when the listener trusts it.
    pub forwarded_for: Option<IpAddr>,
}

/// Answers the HTTP upgrade on `path`. Another path gets 404; the subprotocol chosen is the
/// first of the client's that MQTT uses.
pub async fn accept<S>(
    stream: S,
    path: &str,
    trust_forwarded: bool,
    max_message: usize,
    before_connect: PreAuth,
) -> Result<(WsStream<S>, Upgrade), io::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut upgrade = Upgrade {
        forwarded_for: None,
    };
    // The callback's signature is tungstenite's; its error type is its HTTP response.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        if request.uri().path() != path {
            let mut refusal = ErrorResponse::new(Some(format!(
                "no MQTT endpoint at {}",
                request.uri().path()
            )));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            return Err(refusal);
        }
        let offered = request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .find(|p| SUBPROTOCOLS.contains(p));
        if let Some(chosen) = offered {
            response.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(match chosen {
                    "mqttv3.1" => "mqttv3.1",
                    _ => "mqtt",
                }),
            );
        }
        if trust_forwarded {
            upgrade.forwarded_for = request
                .headers()
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .and_then(|first| first.trim().parse().ok());
        }
        Ok(response)
    };
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(max_message);
    config.max_frame_size = Some(max_message);
    // Small buffers: an idle WebSocket connection should cost little more than a TCP one.
    config.read_buffer_size = 4 * 1024;
    bound_writes(&mut config);
    let stream = Metered {
        inner: stream,
        pre_auth: Some(before_connect),
        since_message: 0,
    };
    let mut ws = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config))
        .await
        .map_err(io::Error::other)?;
    // The upgrade request is answered; what counts from here is frames.
    ws.get_mut().message_done();
    Ok((
        WsStream {
            inner: ws,
            pending: Bytes::new(),
            reply_owed: false,
        },
        upgrade,
    ))
}

/// Largest binary frame written: a longer write goes out as several frames (MQTT does not care
/// where frames split), so the write buffer's bound does not depend on the packet size.
const WRITE_CHUNK: usize = 64 * 1024;

/// Room in the write buffer for a pong or close frame beside data (a control frame carries at
/// most 125 bytes [RFC 6455 5.5]).
const CONTROL_ROOM: usize = 256;

/// Writes go out at once (`write_buffer_size` 0), and what the socket does not take waits in a
/// buffer of at most two chunks and a control frame. Past that tungstenite keeps one owed pong
/// (a newer ping replaces it) instead of queueing one per ping.
fn bound_writes(config: &mut WebSocketConfig) {
    config.write_buffer_size = 0;
    config.max_write_buffer_size = 2 * WRITE_CHUNK + CONTROL_ROOM;
}

/// A WebSocket connection as a byte stream: reads yield the payloads of binary frames in
/// order, writes go out as binary frames.
pub struct WsStream<S> {
    inner: WebSocketStream<Metered<S>>,
    /// The unread rest of the last binary message.
    pending: Bytes,
    /// A ping or close was read, so tungstenite owes a reply that may still be unwritten:
    /// nothing more is read until it is flushed.
    reply_owed: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.reply_owed {
                // Backpressure: a peer that does not read our pongs is not read either (the
                // flush registers this task for when the socket takes more).
                ready!(Pin::new(&mut self.inner).poll_flush(cx)).map_err(io::Error::other)?;
                self.reply_owed = false;
            }
            match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                // End of stream or a close frame: EOF.
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(data))) => {
                    self.inner.get_mut().message_done();
                    self.pending = data;
                }
                // Answered (pong) by tungstenite itself; not MQTT.
                Some(Ok(Message::Ping(_))) => self.reply_owed = true,
                Some(Ok(Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket frame: MQTT uses binary frames [MQTT-6.0.0-1]",
                    )))
                }
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Waits until what the socket did not take is written, so at most one chunk waits.
        ready!(Pin::new(&mut self.inner).poll_ready(cx)).map_err(io::Error::other)?;
        let chunk = &buf[..buf.len().min(WRITE_CHUNK)];
        Pin::new(&mut self.inner)
            .start_send(Message::Binary(Bytes::copy_from_slice(chunk)))
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(chunk.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner)
            .poll_flush(cx)
            .map_err(io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner)
            .poll_close(cx)
            .map_err(io::Error::other)
    }
}

/// The client side (a bridge): the upgrade to `url` (ws:// or wss://, for the Host header and
/// path) over `stream`, offering the `mqtt` subprotocol, then the same byte stream.
pub(crate) async fn connect<S>(stream: S, url: &str) -> io::Result<WsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().map_err(io::Error::other)?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
    let mut config = WebSocketConfig::default();
    bound_writes(&mut config);
    // Our own connection to a broker we chose: not held to the clients' pre-CONNECT limits.
    let stream = Metered {
        inner: stream,
        pre_auth: None,
        since_message: 0,
    };
    let (ws, response) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .map_err(io::Error::other)?;
    let chosen = response.headers().get("sec-websocket-protocol");
    if chosen.is_some_and(|p| p != "mqtt") {
        return Err(io::Error::other(format!(
            "the server chose the WebSocket subprotocol {chosen:?}, not mqtt"
        )));
    }
    Ok(WsStream {
        inner: ws,
        pending: Bytes::new(),
        reply_owed: false,
    })
}

/// The pre-authentication bounds of a WebSocket connection's input.
pub struct PreAuth {
    /// This layer's part of the partial-input budget; it learns from the driver's share when
    /// the connection is authenticated.
    pub share: InputShare,
    /// Most bytes read since the last data message before CONNECT completes.
    pub max_connect: usize,
    /// The broker-wide budget (`max_partial_input_total`).
    pub budget: usize,
}

/// The socket under tungstenite, counting what is read before CONNECT: tungstenite buffers a
/// frame and a fragmented message whole before it yields anything, so this is where their
/// size can be refused while they arrive.
pub struct Metered<S> {
    inner: S,
    /// Until the connection is authenticated (then dropped, giving its share back).
    pre_auth: Option<PreAuth>,
    /// Bytes read since the last data message came out.
    since_message: usize,
}

impl<S> Metered<S> {
    /// A data message came out: what was read up to it has left tungstenite's buffers.
    fn message_done(&mut self) {
        self.since_message = 0;
        if let Some(pre) = &mut self.pre_auth {
            let _ = pre.share.hold(0, pre.budget);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let read = buf.filled().len() - before;
        let this = &mut *self;
        if let Some(pre) = &mut this.pre_auth {
            if pre.share.is_authenticated() {
                this.pre_auth = None;
            } else {
                this.since_message += read;
                if this.since_message > pre.max_connect {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "WebSocket input before CONNECT larger than mqtt.max_connect_size",
                    )));
                }
                if pre.share.hold(this.since_message, pre.budget).is_err() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::OutOfMemory,
                        "the partial input budget (mqtt.max_partial_input_total) is spent",
                    )));
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

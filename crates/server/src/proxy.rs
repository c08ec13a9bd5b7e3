//! The PROXY protocol (HAProxy's v1 text and v2 binary headers, parsed by the `ppp` crate):
//! a load balancer in front of the broker sends the client's real address before anything
//! else on the connection. Bytes read past the header (the start of a TLS handshake or of
//! CONNECT) are handed on through [`Prefixed`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use ppp::v1;
use ppp::v2;
use ppp::{HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::config::ProxyProtocol;
use crate::input::InputShare;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes; v2 carries a 16-bit length after 16 fixed bytes.
const MAX_HEADER: usize = 16 + 65_535;

/// A stream that first yields bytes already read from it.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    offset: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed {
            prefix,
            offset: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.offset < self.prefix.len() {
            let rest = &self.prefix[self.offset..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.offset += n;
            if self.offset == self.prefix.len() {
                self.prefix = Vec::new();
                self.offset = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
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
}

/// Whether `data` could still become a PROXY header (it is a prefix of, or starts with, one
/// of the two signatures).
fn may_be_header(data: &[u8]) -> bool {
    let matches = |sig: &[u8]| {
        let n = data.len().min(sig.len());
        data[..n] == sig[..n]
    };
    matches(V1_PREFIX) || matches(V2_SIGNATURE)
}

/// Reads the PROXY header, if `mode` expects one. Returns the client's address from it (or
/// `None`: no header in `optional` mode, or a LOCAL / UNKNOWN header) and the stream with
/// whatever was read past the header put back. The header being read (up to 64 KiB with v2
/// TLVs) counts against the partial-input budget (`input`, `budget`) like an incomplete
/// CONNECT, since its sender is not authenticated either.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: S,
    mode: ProxyProtocol,
    input: &mut InputShare,
    budget: usize,
) -> io::Result<(Option<SocketAddr>, Prefixed<S>)> {
    let read = read_metered(stream, mode, input, budget).await;
    let _ = input.hold(0, budget);
    read
}

async fn read_metered<S: AsyncRead + Unpin>(
    mut stream: S,
    mode: ProxyProtocol,
    input: &mut InputShare,
    budget: usize,
) -> io::Result<(Option<SocketAddr>, Prefixed<S>)> {
    let mut buf: Vec<u8> = Vec::with_capacity(256);
    loop {
        if !may_be_header(&buf) {
            if mode == ProxyProtocol::Required {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "no PROXY protocol header on a listener that requires one",
                ));
            }
            return Ok((None, Prefixed::new(buf, stream)));
        }
        if buf.len() >= V1_PREFIX.len().min(V2_SIGNATURE.len()) {
            let parsed = HeaderResult::parse(&buf);
            if !parsed.is_incomplete() {
                let (addr, len) = match parsed {
                    HeaderResult::V1(Ok(h)) => (v1_source(&h), h.header.len()),
                    HeaderResult::V2(Ok(h)) => (v2_source(&h), h.len()),
                    HeaderResult::V1(Err(e)) => return Err(invalid(format!("PROXY v1: {e}"))),
                    HeaderResult::V2(Err(e)) => return Err(invalid(format!("PROXY v2: {e}"))),
                };
                let rest = buf.split_off(len);
                return Ok((addr, Prefixed::new(rest, stream)));
            }
        }
        if buf.len() >= MAX_HEADER {
            return Err(invalid("PROXY header too long".to_owned()));
        }
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during the PROXY header",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if input.hold(buf.capacity(), budget).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "the partial input budget (mqtt.max_partial_input_total) is spent",
            ));
        }
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn v1_source(h: &v1::Header<'_>) -> Option<SocketAddr> {
    match h.addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        v1::Addresses::Unknown => None,
    }
}

fn v2_source(h: &v2::Header<'_>) -> Option<SocketAddr> {
    if h.command == v2::Command::Local {
        return None; // a health check by the balancer itself: the real peer is the balancer
    }
    match h.addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        v2::Addresses::IPv6(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        v2::Addresses::Unix(_) | v2::Addresses::Unspecified => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn run(input: &[u8], mode: ProxyProtocol) -> io::Result<(Option<SocketAddr>, Vec<u8>)> {
        let budget = crate::input::InputBudget::new();
        let mut share = InputShare::new(budget);
        let (addr, mut rest) = read_header(input, mode, &mut share, usize::MAX).await?;
        let mut after = Vec::new();
        rest.read_to_end(&mut after).await?;
        Ok((addr, after))
    }

    #[tokio::test]
    async fn v1_header_gives_the_source_and_keeps_what_follows() {
        let got = run(
            b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 1883\r\n\x10\x0c",
            ProxyProtocol::Required,
        )
        .await
        .unwrap();
        assert_eq!(got.0, Some("10.1.2.3:40000".parse().unwrap()));
        assert_eq!(got.1, b"\x10\x0c");
    }

    #[tokio::test]
    async fn v2_header_gives_the_source() {
        let mut input = V2_SIGNATURE.to_vec();
        input.extend([0x21, 0x11, 0, 12]); // v2 PROXY, TCP over IPv4, 12 address bytes
        input.extend([192, 0, 2, 7, 10, 0, 0, 1]);
        input.extend(50000u16.to_be_bytes());
        input.extend(1883u16.to_be_bytes());
        input.extend(b"\x10rest");
        let got = run(&input, ProxyProtocol::Required).await.unwrap();
        assert_eq!(got.0, Some("192.0.2.7:50000".parse().unwrap()));
        assert_eq!(got.1, b"\x10rest");
    }

    #[tokio::test]
    async fn missing_header_is_refused_when_required_and_passed_through_when_optional() {
        let connect = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01a";
        assert!(run(connect, ProxyProtocol::Required).await.is_err());
        let got = run(connect, ProxyProtocol::Optional).await.unwrap();
        assert_eq!(got, (None, connect.to_vec()));
    }

    #[tokio::test]
    async fn malformed_header_is_refused() {
        assert!(run(b"PROXY TCP4 nonsense\r\n", ProxyProtocol::Optional)
            .await
            .is_err());
    }
}

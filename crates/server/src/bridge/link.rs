//! One MQTT connection of a bridge, as a client: packets read and written with petrel's codec
//! over any byte stream (TCP, TLS, WebSocket, or the in-memory pipe to the local broker).
//!
//! Reads and writes are separate halves so that the relay can wait on both at once: it never
//! blocks on a write while the peer waits for it to read.

use std::io;

use bytes::{Buf, BytesMut};
use petrel_codec::{DecodeError, Packet, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

/// A byte stream a bridge speaks MQTT over.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

pub(crate) type BoxIo = Box<dyn Io>;

/// The reading half: whole packets, decoded.
pub(crate) struct Reader {
    half: ReadHalf<BoxIo>,
    buf: BytesMut,
    pub version: ProtocolVersion,
    /// The largest packet accepted from the peer.
    pub max_packet: u32,
}

/// The writing half: packets are encoded into `buf` and written as the peer takes them.
pub(crate) struct Writer {
    half: WriteHalf<BoxIo>,
    pub buf: BytesMut,
    pub version: ProtocolVersion,
    /// The largest packet the peer accepts (its Maximum Packet Size).
    pub max_packet: u32,
    /// Written since the last flush.
    unflushed: bool,
}

/// Why reading stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    Io(io::Error),
    Closed,
    Malformed(DecodeError),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "read failed: {e}"),
            ReadError::Closed => f.write_str("connection closed"),
            ReadError::Malformed(e) => write!(f, "malformed packet: {e}"),
        }
    }
}

pub(crate) fn split(stream: BoxIo, version: ProtocolVersion) -> (Reader, Writer) {
    let (r, w) = tokio::io::split(stream);
    (
        Reader {
            half: r,
            buf: BytesMut::new(),
            version,
            max_packet: petrel_codec::MAX_REMAINING_LENGTH as u32 + 5,
        },
        Writer {
            half: w,
            buf: BytesMut::new(),
            version,
            max_packet: u32::MAX,
            unflushed: false,
        },
    )
}

impl Reader {
    /// The next packet. Cancel-safe: what was read stays in the buffer.
    pub async fn packet(&mut self) -> Result<Packet, ReadError> {
        loop {
            match petrel_codec::decode(&mut self.buf, self.version, self.max_packet) {
                Ok(Some(packet)) => return Ok(packet),
                Ok(None) => {}
                Err(e) => return Err(ReadError::Malformed(e)),
            }
            self.buf.reserve(8 * 1024);
            match self.half.read_buf(&mut self.buf).await {
                Ok(0) => return Err(ReadError::Closed),
                Ok(_) => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }
}

impl Writer {
    /// Encodes `packet` for writing; false (and nothing queued) when it exceeds the peer's
    /// Maximum Packet Size or cannot be encoded.
    pub fn queue(&mut self, packet: &Packet) -> bool {
        if petrel_codec::encoded_len(packet, self.version) > self.max_packet as usize {
            return false;
        }
        petrel_codec::encode(packet, self.version, &mut self.buf).is_ok()
    }

    /// Whether there is something to write or flush.
    pub fn pending(&self) -> bool {
        !self.buf.is_empty() || self.unflushed
    }

    /// Writes some of what is queued, or flushes once all is written. Cancel-safe: each
    /// step records what it did only once done.
    pub async fn write_some(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            if self.unflushed {
                self.half.flush().await?;
                self.unflushed = false;
                // An idle link holds no write buffer.
                self.buf = BytesMut::new();
            }
            return Ok(());
        }
        let n = self.half.write(&self.buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.buf.advance(n);
        self.unflushed = true;
        Ok(())
    }

    /// Writes and flushes everything queued.
    pub async fn write_all(&mut self) -> io::Result<()> {
        while self.pending() {
            self.write_some().await?;
        }
        Ok(())
    }

    /// Ends the stream after writing what is queued (bounded by the caller).
    pub async fn close(&mut self) {
        let _ = self.write_all().await;
        let _ = self.half.shutdown().await;
    }
}

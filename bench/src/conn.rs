//! One client's TcpStream during setup: CONNECT/CONNACK and batched SUBSCRIBE/SUBACK, one
//! packet at a time. The measured phases take the stream and its read buffer apart and drive
//! them in publisher.rs / subscriber.rs instead.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use petrel_codec::{
    decode, Connect, Packet, PacketId, Properties, ProtocolVersion, QoS, ReasonCode, Subscribe,
    SubscriptionOptions, TopicFilter, MAX_REMAINING_LENGTH,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::error::BenchError;
use crate::template::{client_id, encode_once};
use crate::RunCtx;

/// The largest packet we accept from a broker: anything MQTT can express. The benchmark
/// trusts the broker under test with its memory.
pub const MAX_INBOUND: u32 = MAX_REMAINING_LENGTH as u32 + 5;

/// Bytes of filters per SUBSCRIBE: many filters per packet, yet far below any broker's
/// maximum packet size (petrel's default is 1 MiB, and a v5 CONNACK may announce less).
const SUBSCRIBE_BODY_BYTES: usize = 32 * 1024;

/// Upper bound on filters per SUBSCRIBE, so one SUBACK stays small too.
const SUBSCRIBE_FILTERS: usize = 2_000;

/// SUBSCRIBE packets sent before waiting for the first SUBACK: enough to keep the broker busy,
/// few enough that neither side's socket buffer fills with unread acks.
const SUBSCRIBES_IN_FLIGHT: usize = 4;

pub struct Conn {
    pub stream: TcpStream,
    /// Bytes read past the last decoded packet; handed on to the measured phase.
    pub rbuf: BytesMut,
    pub version: ProtocolVersion,
    /// From a v5 CONNACK: QoS 1/2 publishes the broker takes unacknowledged (§3.2.2.3.3).
    pub receive_max: u16,
    /// From a v5 CONNACK: the largest packet the broker accepts (§3.2.2.3.6).
    pub max_packet: u32,
    /// The client id, for errors.
    pub name: String,
}

impl Conn {
    /// TCP connect to the broker at `addr` (nodelay), CONNECT with a clean session, and an
    /// accepting CONNACK.
    pub async fn open(
        ctx: &RunCtx,
        addr: SocketAddr,
        name: &str,
        keep_alive: u16,
    ) -> Result<Conn, BenchError> {
        let stream = bounded(ctx, name, tcp_connect(ctx, addr))
            .await?
            .map_err(|e| BenchError::io(format!("{name}: connecting to {addr}"), e))?;
        stream
            .set_nodelay(true)
            .map_err(|e| BenchError::io(format!("{name}: TCP_NODELAY"), e))?;
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(256),
            version: ctx.version,
            receive_max: u16::MAX,
            max_packet: u32::MAX,
            name: name.to_string(),
        };
        let mut properties = Properties::default();
        // Client ids are unique per run, so a persistent session starts empty all the same.
        let clean_start = !ctx.persistent || ctx.version.is_v5();
        if ctx.persistent && ctx.version.is_v5() {
            properties.session_expiry_interval = Some(3600);
        }
        let connect = Connect {
            protocol: ctx.version,
            clean_start,
            keep_alive,
            properties,
            client_id: client_id(name)?,
            will: None,
            username: None,
            password: None,
            bridge: false,
        };
        let bytes = encode_once(&Packet::Connect(Box::new(connect)), ctx.version)?;
        conn.send(ctx, &bytes).await?;
        match conn.recv(ctx).await? {
            Packet::ConnAck(ack) if ack.reason == ReasonCode::SUCCESS => {
                if let Some(m) = ack.properties.receive_maximum {
                    conn.receive_max = m;
                }
                if let Some(m) = ack.properties.maximum_packet_size {
                    conn.max_packet = m;
                }
                Ok(conn)
            }
            Packet::ConnAck(ack) => {
                Err(BenchError::refused(format!("{name}: CONNECT"), ack.reason))
            }
            other => Err(BenchError::Unexpected {
                what: format!("{name}: waiting for CONNACK"),
                packet: other.name(),
            }),
        }
    }

    pub async fn send(&mut self, ctx: &RunCtx, bytes: &[u8]) -> Result<(), BenchError> {
        bounded(ctx, &self.name, self.stream.write_all(bytes))
            .await?
            .map_err(|e| BenchError::io(format!("{}: writing", self.name), e))
    }

    /// The next packet from the broker.
    pub async fn recv(&mut self, ctx: &RunCtx) -> Result<Packet, BenchError> {
        loop {
            match decode(&mut self.rbuf, self.version, MAX_INBOUND) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(source) => {
                    return Err(BenchError::Malformed {
                        what: self.name.clone(),
                        source,
                    })
                }
            }
            self.rbuf.reserve(4096);
            let n = bounded(ctx, &self.name, self.stream.read_buf(&mut self.rbuf))
                .await?
                .map_err(|e| BenchError::io(format!("{}: reading", self.name), e))?;
            if n == 0 {
                return Err(BenchError::Closed {
                    what: self.name.clone(),
                });
            }
        }
    }

    /// Subscribes to every filter, packing many into each SUBSCRIBE and keeping a few packets
    /// in flight; returns once every SUBACK granted every filter.
    pub async fn subscribe(
        &mut self,
        ctx: &RunCtx,
        filters: &[String],
        qos: QoS,
    ) -> Result<(), BenchError> {
        let packets = subscribe_packets(filters, qos, self.max_packet)?;
        let mut next_id: u16 = 1;
        let mut outstanding = std::collections::VecDeque::new();
        let mut pending = packets.into_iter();
        loop {
            while outstanding.len() < SUBSCRIBES_IN_FLIGHT {
                let Some(mut sub) = pending.next() else {
                    break;
                };
                sub.packet_id = PacketId::new(next_id).unwrap_or(PacketId::MIN);
                next_id = next_id.checked_add(1).unwrap_or(1);
                let bytes = encode_once(&Packet::Subscribe(sub.clone()), self.version)?;
                self.send(ctx, &bytes).await?;
                outstanding.push_back((sub.packet_id, sub.filters.len()));
            }
            let Some((id, count)) = outstanding.pop_front() else {
                return Ok(());
            };
            match self.recv(ctx).await? {
                Packet::SubAck(ack) if ack.packet_id == id && ack.reasons.len() == count => {
                    if let Some(bad) = ack.reasons.iter().find(|r| r.0 >= 0x80) {
                        return Err(BenchError::refused(
                            format!("{}: SUBSCRIBE", self.name),
                            *bad,
                        ));
                    }
                }
                other => {
                    return Err(BenchError::Unexpected {
                        what: format!("{}: waiting for SUBACK {id}", self.name),
                        packet: other.name(),
                    })
                }
            }
        }
    }

    /// The stream and whatever was read past the last packet.
    pub fn into_parts(self) -> (TcpStream, BytesMut) {
        (self.stream, self.rbuf)
    }
}

/// Splits `filters` into SUBSCRIBE packets (packet ids filled in when sent).
pub fn subscribe_packets(
    filters: &[String],
    qos: QoS,
    max_packet: u32,
) -> Result<Vec<Subscribe>, BenchError> {
    // Fixed header (5) + packet id (2) + empty properties (1) leave the rest for filters.
    let budget = SUBSCRIBE_BODY_BYTES.min((max_packet as usize).saturating_sub(8));
    let mut packets = Vec::new();
    let mut current: Vec<(TopicFilter, SubscriptionOptions)> = Vec::new();
    let mut bytes = 0;
    for f in filters {
        let filter = TopicFilter::new(f)
            .map_err(|e| BenchError::Usage(format!("topic filter {f:?}: {e}")))?;
        let cost = 2 + f.len() + 1;
        if !current.is_empty() && (bytes + cost > budget || current.len() >= SUBSCRIBE_FILTERS) {
            packets.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push((filter, SubscriptionOptions::new(qos)));
        bytes += cost;
    }
    if !current.is_empty() {
        packets.push(current);
    }
    Ok(packets
        .into_iter()
        .map(|filters| Subscribe {
            packet_id: PacketId::MIN,
            properties: Properties::default(),
            filters,
        })
        .collect())
}

/// Loopback addresses our client sockets are spread over when the broker is on 127.0.0.0/8.
///
/// Linux picks connect()'s ephemeral ports from one half of the range (one parity) and only
/// then the other; once about 14,000 sockets from one source address hold that half, every
/// further connect scans it first and the load generator, not the broker, sets the
/// connection rate. With 8 source addresses each keeps a short search up to ~110,000 clients.
const LOOPBACK_SOURCES: u32 = 8;

/// A TCP connection to `addr`; from 127.0.0.1..=127.0.0.8 in turn when it is on loopback.
async fn tcp_connect(ctx: &RunCtx, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(target) = addr else {
        return TcpStream::connect(addr).await;
    };
    if !target.ip().is_loopback() {
        return TcpStream::connect(addr).await;
    }
    let n = ctx.connects.fetch_add(1, Ordering::Relaxed) % LOOPBACK_SOURCES;
    let source = Ipv4Addr::new(127, 0, 0, 1 + n as u8);
    let socket = TcpSocket::new_v4()?;
    crate::sys::bind_address_no_port(&socket)?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(addr).await
}

/// `fut`, unless the run's deadline comes first.
pub async fn bounded<T>(
    ctx: &RunCtx,
    what: &str,
    fut: impl Future<Output = T>,
) -> Result<T, BenchError> {
    tokio::time::timeout_at(ctx.deadline, fut)
        .await
        .map_err(|_| BenchError::Timeout {
            what: what.to_string(),
        })
}

/// Best-effort DISCONNECT before a client goes away, so brokers log a normal disconnection.
pub async fn say_goodbye(stream: &mut TcpStream, version: ProtocolVersion) {
    if let Ok(bytes) = encode_once(
        &Packet::Disconnect(petrel_codec::Disconnect::default()),
        version,
    ) {
        let _ = tokio::time::timeout(GOODBYE_WAIT, stream.write_all(&bytes)).await;
        await_close(stream).await;
    }
}

/// How long a client waits for the broker to close after DISCONNECT.
const GOODBYE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads (and discards) until the broker closes the connection, or [`GOODBYE_WAIT`] passes.
///
/// After DISCONNECT the broker closes first [MQTT-3.14.4-1], so the TIME_WAIT state lands on
/// its side of each connection rather than on one of our ephemeral ports: closing first from
/// here would leave thousands of ports in TIME_WAIT after `connections` and slow down the
/// kernel's port search in the next run's connects.
pub async fn await_close(stream: &mut TcpStream) {
    let _ = tokio::time::timeout(GOODBYE_WAIT, async {
        let mut sink = [0u8; 4096];
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

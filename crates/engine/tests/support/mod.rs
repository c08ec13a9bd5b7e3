//! An in-memory client for driving one engine [`Connection`] the way the server's driver does,
//! with no socket and no clock.
//!
//! ```text
//!  test ──Packet──▶ encode ──bytes──▶ decode (connection's version) ──▶ handle_packet(now, _)
//!  test ◀─Packet─── decode (client's version) ◀── output() ◀── poll_deliver until Pending
//! ```
//!
//! Every packet crosses the real codec in both directions, so a test reads like a transcript of
//! what would be on the wire. Time is whatever `Instant` the test passes in: take
//! `let t0 = Instant::now()` once and step it with `t0 + secs(n)`; nothing here sleeps.

// Each integration test file compiles this module on its own and uses a subset of it.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use petrel_codec::{
    ConnAck, Connect, LastWill, MqttString, Packet, PacketId, Properties, ProtocolVersion, PubAck,
    Publish, QoS, ReasonCode, SubAck, Subscribe, SubscriptionOptions, TopicFilter, TopicName,
};
use petrel_engine::{Broker, CloseReason, Connection, Limits};

/// The listener's connect timeout in every test: the deadline a fresh connection starts with.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Upper bound on `poll_deliver` calls in one `deliver`: a loop that never reaches `Pending`
/// is an engine bug, and a test should fail on it rather than hang.
const MAX_POLLS: usize = 10_000;

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn broker(limits: Limits) -> Arc<Broker> {
    Arc::new(Broker::new(limits))
}

/// Counts wake-ups, so a test can check that the engine wakes the task it should (a subscriber
/// when a message is queued, a displaced connection on takeover). A counting waker rather than
/// `Waker::noop()` also keeps the harness within the workspace's `rust-version` (1.80).
#[derive(Default)]
struct WakeCount(AtomicUsize);

impl Wake for WakeCount {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// One client and the broker-side `Connection` serving it.
pub struct Peer {
    pub conn: Connection,
    /// The version this client speaks: the one its CONNECT announced (3.1.1 until then). Broker
    /// output is decoded with it, which matters for a CONNACK refusal written after the engine
    /// has already left the connected state.
    pub version: ProtocolVersion,
    wakes: Arc<WakeCount>,
    /// Bytes the broker wrote that the test has not read yet.
    rx: BytesMut,
    /// The latest time this client acted at: what `deliver` and `close` pass as `now` unless
    /// a test gives one (`deliver_at`, `close_at`).
    pub clock: Instant,
}

impl Peer {
    /// A connection accepted at `now`, before any packet.
    pub fn new(broker: &Arc<Broker>, now: Instant) -> Peer {
        Peer {
            conn: Connection::new(broker.clone(), "test-peer".to_owned(), now, CONNECT_TIMEOUT),
            version: ProtocolVersion::V3_1_1,
            wakes: Arc::default(),
            rx: BytesMut::new(),
            clock: now,
        }
    }

    /// A connection that sent `connect` at `now` and was accepted; the CONNACK is consumed.
    pub fn connect(broker: &Arc<Broker>, now: Instant, connect: Connect) -> Peer {
        let mut peer = Peer::new(broker, now);
        peer.send_connect(now, connect).expect("CONNECT accepted");
        match peer.written().as_slice() {
            [Packet::ConnAck(ack)] if ack.reason == ReasonCode::SUCCESS => {}
            other => panic!("expected one successful CONNACK, got {other:?}"),
        }
        peer
    }

    /// The client sends CONNECT at `now`; the result is the engine's, the CONNACK (if any) is
    /// left in the output for `written`.
    pub fn send_connect(&mut self, now: Instant, connect: Connect) -> Result<(), CloseReason> {
        self.send(now, Packet::Connect(Box::new(connect)))
    }

    /// The client sends `packet` at `now`: encoded in the client's version, decoded the way the
    /// driver decodes (connection's version and packet size limit), then handled.
    pub fn send(&mut self, now: Instant, packet: Packet) -> Result<(), CloseReason> {
        if let Packet::Connect(c) = &packet {
            self.version = c.protocol;
        }
        self.clock = self.clock.max(now);
        let mut wire = BytesMut::new();
        petrel_codec::encode(&packet, self.version, &mut wire).expect("client packet encodes");
        let decoded =
            petrel_codec::decode(&mut wire, self.conn.version(), self.conn.max_packet_size())
                .expect("client packet decodes")
                .expect("client packet is complete");
        assert!(wire.is_empty(), "one packet was encoded, so one is decoded");
        self.conn.handle_packet(now, decoded)
    }

    /// Runs `poll_deliver` until it is `Pending`, collecting what it writes; returns the close
    /// reason if it reports one.
    pub fn deliver(&mut self) -> Result<(), CloseReason> {
        self.deliver_at(self.clock)
    }

    /// `deliver` at a given time (message expiry is judged then).
    pub fn deliver_at(&mut self, now: Instant) -> Result<(), CloseReason> {
        self.clock = self.clock.max(now);
        let waker = Waker::from(self.wakes.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..MAX_POLLS {
            match self.conn.poll_deliver(&mut cx, now) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Ok(())) => self.take_output(),
                Poll::Ready(Err(reason)) => return Err(reason),
            }
        }
        panic!("poll_deliver never returned Pending in {MAX_POLLS} polls");
    }

    /// Packets already in the output, without polling for deliveries: what a handler wrote
    /// directly (CONNACK, acks, SUBACK, PINGRESP, DISCONNECT).
    pub fn written(&mut self) -> Vec<Packet> {
        self.take_output();
        let mut packets = Vec::new();
        loop {
            match petrel_codec::decode(&mut self.rx, self.version, u32::MAX) {
                Ok(Some(p)) => packets.push(p),
                Ok(None) => break,
                Err(e) => panic!(
                    "broker wrote a malformed packet: {e} ({:02x?})",
                    &self.rx[..]
                ),
            }
        }
        assert!(
            self.rx.is_empty(),
            "broker wrote a partial packet: {:02x?}",
            &self.rx[..]
        );
        packets
    }

    /// Everything the client would read now: delivers queued messages, then decodes the output.
    pub fn recv(&mut self) -> Vec<Packet> {
        self.deliver().expect("connection still owns its session");
        self.written()
    }

    /// The driver ends the connection for `reason`; returns what the broker wrote while closing.
    pub fn close(&mut self, reason: &CloseReason) -> Vec<Packet> {
        self.close_at(reason, self.clock)
    }

    /// `close` at a given time (session expiry and will delay count from it).
    pub fn close_at(&mut self, reason: &CloseReason, now: Instant) -> Vec<Packet> {
        self.clock = self.clock.max(now);
        self.conn.close(reason, now);
        self.written()
    }

    /// Everything the client would read at `now`.
    pub fn recv_at(&mut self, now: Instant) -> Vec<Packet> {
        self.deliver_at(now)
            .expect("connection still owns its session");
        self.written()
    }

    /// Sends SUBSCRIBE for one filter and asserts the SUBACK grants `qos`. Retained messages it
    /// releases stay queued until the next `recv`.
    pub fn subscribe(&mut self, now: Instant, packet_id: u16, filter: &str, qos: QoS) {
        self.subscribe_with(now, packet_id, filter, SubscriptionOptions::new(qos));
    }

    pub fn subscribe_with(
        &mut self,
        now: Instant,
        packet_id: u16,
        filter: &str,
        options: SubscriptionOptions,
    ) {
        self.send(now, subscribe_with(packet_id, filter, options))
            .expect("SUBSCRIBE accepted");
        assert_eq!(
            self.written(),
            [suback(packet_id, &[ReasonCode(options.qos as u8)])]
        );
    }

    /// What the driver does while the connection is paused by flow control: asks whether it
    /// may read again. True when the pause is over (or there was none).
    pub fn resume(&mut self, now: Instant) -> bool {
        let waker = Waker::from(self.wakes.clone());
        let mut cx = Context::from_waker(&waker);
        self.conn.poll_resume(&mut cx, now).is_ready()
    }

    /// How many times the engine has woken this connection's task.
    pub fn wakes(&self) -> usize {
        self.wakes.0.load(Ordering::SeqCst)
    }

    fn take_output(&mut self) {
        let out = self.conn.output();
        self.rx.extend_from_slice(out);
        out.clear();
    }
}

// Packet builders. Ids are plain `u16` in tests; 0 means "no packet id" for QoS 0.

pub fn pid(n: u16) -> PacketId {
    PacketId::new(n).expect("packet ids in tests are non-zero")
}

pub fn topic(name: &str) -> TopicName {
    TopicName::new(name).expect("valid topic name")
}

/// A 3.1.1 CONNECT.
pub fn connect(client_id: &str, clean: bool, keep_alive: u16) -> Connect {
    connect_version(ProtocolVersion::V3_1_1, client_id, clean, keep_alive)
}

/// A 5.0 CONNECT with no properties.
pub fn connect_v5(client_id: &str, clean_start: bool, keep_alive: u16) -> Connect {
    connect_version(ProtocolVersion::V5, client_id, clean_start, keep_alive)
}

pub fn connect_version(
    protocol: ProtocolVersion,
    client_id: &str,
    clean: bool,
    keep_alive: u16,
) -> Connect {
    Connect {
        protocol,
        clean_start: clean,
        keep_alive,
        properties: Properties::default(),
        client_id: MqttString::new(client_id).expect("valid client id"),
        will: None,
        username: None,
        password: None,
        bridge: false,
    }
}

pub fn will(topic_name: &str, payload: &str, qos: QoS, retain: bool) -> LastWill {
    LastWill {
        topic: topic(topic_name),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos,
        retain,
        properties: Properties::default(),
    }
}

/// A PUBLISH as either side writes it: DUP and RETAIN clear, no properties.
pub fn publish(topic_name: &str, payload: &str, qos: QoS, packet_id: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic(topic_name),
        packet_id: PacketId::new(packet_id),
        properties: Properties::default(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
    })
}

/// The same PUBLISH with RETAIN set.
pub fn retained(packet: Packet) -> Packet {
    match packet {
        Packet::Publish(p) => Packet::Publish(Publish { retain: true, ..p }),
        other => panic!("retained() takes a PUBLISH, not {}", other.name()),
    }
}

/// The same PUBLISH with DUP set: a redelivery [MQTT-3.3.1-1].
pub fn dup(packet: Packet) -> Packet {
    match packet {
        Packet::Publish(p) => Packet::Publish(Publish { dup: true, ..p }),
        other => panic!("dup() takes a PUBLISH, not {}", other.name()),
    }
}

pub fn subscribe(packet_id: u16, filter: &str, qos: QoS) -> Packet {
    subscribe_with(packet_id, filter, SubscriptionOptions::new(qos))
}

pub fn subscribe_with(packet_id: u16, filter: &str, options: SubscriptionOptions) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: pid(packet_id),
        properties: Properties::default(),
        filters: vec![(TopicFilter::new(filter).expect("valid filter"), options)],
    })
}

pub fn suback(packet_id: u16, reasons: &[ReasonCode]) -> Packet {
    Packet::SubAck(SubAck {
        packet_id: pid(packet_id),
        properties: Properties::default(),
        reasons: reasons.to_vec(),
    })
}

/// A successful 3.1.1 CONNACK.
pub fn connack(session_present: bool) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present,
        reason: ReasonCode::SUCCESS,
        properties: Properties::default(),
    })
}

pub fn puback(id: u16) -> Packet {
    Packet::PubAck(PubAck::new(pid(id)))
}

pub fn pubrec(id: u16) -> Packet {
    Packet::PubRec(PubAck::new(pid(id)))
}

pub fn pubrel(id: u16) -> Packet {
    Packet::PubRel(PubAck::new(pid(id)))
}

pub fn pubcomp(id: u16) -> Packet {
    Packet::PubComp(PubAck::new(pid(id)))
}

/// What the server's housekeeping task does at `now`: runs the broker's due timers (session
/// expiry, delayed wills). Returns the next deadline.
pub fn run_timers(broker: &Arc<Broker>, now: Instant) -> Option<Instant> {
    let wakes: Arc<WakeCount> = Arc::default();
    let waker = Waker::from(wakes);
    let mut cx = Context::from_waker(&waker);
    broker.poll_timers(&mut cx, now)
}

/// A PUBLISH with v5 properties.
pub fn publish_props(
    topic_name: &str,
    payload: &[u8],
    qos: QoS,
    packet_id: u16,
    properties: Properties,
) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: if topic_name.is_empty() {
            TopicName::default()
        } else {
            topic(topic_name)
        },
        packet_id: PacketId::new(packet_id),
        properties,
        payload: Bytes::copy_from_slice(payload),
    })
}

/// Builds a property set in one expression: `props(|p| p.topic_alias = Some(1))`.
pub fn props(f: impl FnOnce(&mut petrel_codec::PropertySet)) -> Properties {
    let mut p = Properties::default();
    f(&mut p);
    p
}

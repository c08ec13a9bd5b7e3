//! Packet sequences driven into the session engine.
//!
//! The first byte picks the protocol version; the second the starting state: whether the
//! connection has already sent a valid CONNECT (so the rest lands in the connected state
//! rather than before CONNECT), clean or persistent session, keep alive, and whether another
//! client is subscribed to `#` (so that what this one publishes is routed and queued). The rest
//! is the client's byte stream, decoded and handled packet by packet as the driver does, with
//! virtual time moving 1 ms per packet and deliveries polled after each.
//!
//! Beyond "never panics": once both connections are closed the broker holds no connection
//! state (no connection counted, no session left but persistent ones, nothing in the queues of
//! sessions that ended).

use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use petrel_codec::ProtocolVersion;
use petrel_engine::stats::Stats;
use petrel_engine::{Broker, CloseReason, Connection, Limits};

use crate::decode::version_of;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Packets handled from one input at most.
const MAX_PACKETS: usize = 256;

/// A CONNECT for client id `id` in `version`.
fn connect_bytes(version: ProtocolVersion, id: &str, clean: bool, keep_alive: u16) -> Vec<u8> {
    let mut body = match version {
        ProtocolVersion::V3_1 => vec![0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3],
        ProtocolVersion::V3_1_1 => vec![0, 4, b'M', b'Q', b'T', b'T', 4],
        ProtocolVersion::V5 => vec![0, 4, b'M', b'Q', b'T', b'T', 5],
    };
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if version == ProtocolVersion::V5 {
        // Session Expiry Interval 60 s when persistent.
        if clean {
            body.push(0);
        } else {
            body.extend_from_slice(&[5, 0x11, 0, 0, 0, 60]);
        }
    }
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut out = vec![0x10, body.len() as u8];
    out.extend_from_slice(&body);
    out
}

struct Client {
    conn: Connection,
    input: BytesMut,
    closed: bool,
}

impl Client {
    fn new(broker: &Arc<Broker>, now: Instant) -> Client {
        Client {
            conn: Connection::new(broker.clone(), "fuzz".to_owned(), now, CONNECT_TIMEOUT),
            input: BytesMut::new(),
            closed: false,
        }
    }

    /// Handles every whole packet in `input`, as the driver does; closes on an error.
    fn feed(&mut self, bytes: &[u8], now: &mut Instant, budget: &mut usize) {
        if self.closed {
            return;
        }
        self.input.extend_from_slice(bytes);
        while !self.input.is_empty() && *budget > 0 && !self.conn.is_paused() {
            *budget -= 1;
            *now += Duration::from_millis(1);
            let version = self.conn.version();
            let max = self.conn.max_packet_size();
            let result = match petrel_codec::decode(&mut self.input, version, max) {
                Ok(Some(packet)) => self.conn.handle_packet(*now, packet),
                Ok(None) => break,
                Err(e) => Err(self.conn.handle_decode_error(e)),
            };
            if let Err(reason) = result {
                self.close(&reason, *now);
                return;
            }
            self.deliver(*now);
        }
    }

    fn deliver(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..64 {
            match self.conn.poll_deliver(&mut cx, now) {
                Poll::Ready(Ok(())) => {
                    // The client reads everything it is sent.
                    self.conn.output().clear();
                }
                Poll::Ready(Err(reason)) => return self.close(&reason, now),
                Poll::Pending => break,
            }
        }
        self.conn.output().clear();
    }

    fn close(&mut self, reason: &CloseReason, now: Instant) {
        if !self.closed {
            self.conn.close(reason, now);
            self.conn.output().clear();
            self.closed = true;
        }
    }
}

pub fn session(data: &[u8]) {
    let [selector, state, stream @ ..] = data else {
        return;
    };
    let version = version_of(*selector);
    let connected = state & 1 != 0;
    let clean = state & 2 == 0;
    let other = state & 4 != 0;
    let keep_alive = [0u16, 1, 60, 65535][usize::from(state >> 3 & 3)];

    let broker = Arc::new(Broker::new(Limits {
        max_queued_messages: 64,
        max_inflight: 8,
        ..Limits::default()
    }));
    let t0 = Instant::now();
    let mut now = t0;
    let mut budget = MAX_PACKETS;

    let mut watcher = other.then(|| {
        let mut w = Client::new(&broker, now);
        let mut setup = connect_bytes(ProtocolVersion::V3_1_1, "watcher", true, 0);
        // SUBSCRIBE "#" QoS 2.
        setup.extend_from_slice(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'#', 0x02]);
        let mut unlimited = usize::MAX;
        w.feed(&setup, &mut now, &mut unlimited);
        assert!(!w.closed, "the watcher's setup is valid");
        w
    });

    let mut client = Client::new(&broker, now);
    if connected {
        let mut unlimited = usize::MAX;
        client.feed(
            &connect_bytes(version, "fuzz", clean, keep_alive),
            &mut now,
            &mut unlimited,
        );
        assert!(!client.closed, "a valid CONNECT is accepted");
    }
    // The stream in a few chunks, with the timers run between them.
    for chunk in stream.chunks(97) {
        client.feed(chunk, &mut now, &mut budget);
        if let Err(reason) = client.conn.handle_timeout(now) {
            client.close(&reason, now);
        }
        if let Some(w) = &mut watcher {
            w.deliver(now);
        }
    }
    client.close(&CloseReason::PeerClosed, now);
    if let Some(w) = &mut watcher {
        w.deliver(now);
        w.close(&CloseReason::PeerClosed, now);
    }

    // Nothing is left of the connections: none counted, and only a persistent session of the
    // fuzzed client may remain (offline).
    assert_eq!(Stats::get(&broker.stats.connections_current), 0);
    let by_version: u64 = broker
        .stats
        .connections_by_version
        .iter()
        .map(Stats::get)
        .sum();
    assert_eq!(by_version, 0, "per-version connection counts return to 0");
    let (live, offline) = broker.session_counts();
    assert_eq!(live, 0, "no session is left attached");
    assert!(offline <= 1, "{offline} offline sessions");
    if offline == 0 {
        let (queued, bytes) = broker.queued_totals();
        assert_eq!(
            (queued, bytes),
            (0, 0),
            "queues of ended sessions are released"
        );
    }
    // Session expiry and delayed wills run; whatever they end releases its queue. (A session
    // may never expire: 3.x Clean Session 0, or a v5 interval of 0xFFFFFFFF.)
    let mut cx = Context::from_waker(Waker::noop());
    broker.poll_timers(&mut cx, t0 + Duration::from_secs(86_400 * 365 * 200));
    if broker.session_counts() == (0, 0) {
        assert_eq!(
            broker.queued_totals(),
            (0, 0),
            "queues of ended sessions are released"
        );
    }
}

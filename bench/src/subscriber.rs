//! One subscriber: a task owning one TcpStream that decodes every delivery with the codec,
//! acknowledges QoS 1 (PUBACK) and QoS 2 (PUBREC, then PUBCOMP for each PUBREL), and checks
//! each message's stamp against a bitmap per publisher: a first sighting counts as received
//! (and gives a latency sample), a second as a duplicate, anything outside the plan as
//! unexpected. The acks of one read go out in one write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use petrel_codec::{decode, Packet, QoS, ReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conn::{say_goodbye, Conn, MAX_INBOUND};
use crate::error::BenchError;
use crate::template::{AckKind, Acks, Stamp};
use crate::RunCtx;

/// Once every publisher has finished, a subscriber that hears nothing for this long stops
/// waiting for messages that are not coming (QoS 0 drops, or a broker that lost QoS 1/2
/// messages) and reports them lost, instead of sitting out the whole timeout.
pub const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// How often the idle rule is checked: a timer per read would cost more than it saves.
const TICK: Duration = Duration::from_millis(50);
/// Read buffer space kept free: deliveries arrive in bulk.
const READ_SPARE: usize = 128 * 1024;

pub struct SubscriberPlan {
    /// Publisher ids this subscriber expects: `pub_base .. pub_base + pubs`.
    pub pub_base: u32,
    pub pubs: u32,
    /// Sequence numbers of each publisher are below this.
    pub per_pub: u32,
    /// Distinct messages that should arrive.
    pub expected: u64,
    /// Count only messages delivered with the retain flag (the retained scenario).
    pub retained_only: bool,
    /// Bytes written before anything else (the retained scenario's SUBSCRIBE, sent when the
    /// clock starts).
    pub initial: BytesMut,
    /// Set by the flow once every publisher has finished; arms [`DRAIN_IDLE`].
    pub publishers_done: Arc<AtomicBool>,
}

pub struct SubStats {
    pub received: u64,
    pub duplicates: u64,
    /// Messages with no stamp, or a stamp outside the plan.
    pub unexpected: u64,
    pub first_rx_ns: Option<u64>,
    /// Arrival of the last message counted as received.
    pub last_rx_ns: Option<u64>,
    /// End-to-end latency of first deliveries, in nanoseconds.
    pub latency: Histogram<u64>,
    pub timed_out: bool,
    pub error: Option<String>,
}

impl SubStats {
    fn new() -> SubStats {
        SubStats {
            received: 0,
            duplicates: 0,
            unexpected: 0,
            first_rx_ns: None,
            last_rx_ns: None,
            latency: new_histogram(),
            timed_out: false,
            error: None,
        }
    }
}

/// Nanoseconds from 1 µs to one hour at three significant digits (about 200 KiB).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 3_600_000_000_000, 3)
        .expect("constant histogram bounds are valid")
}

/// Runs until every expected message arrived (and every QoS 2 flow completed), the drain rule
/// fires, the deadline passes or an error; then says DISCONNECT.
pub async fn run(ctx: Arc<RunCtx>, conn: Conn, plan: SubscriberPlan) -> SubStats {
    let name = conn.name.clone();
    let version = conn.version;
    let (mut stream, mut rbuf) = conn.into_parts();
    let mut stats = SubStats::new();
    match drive(&ctx, &mut stream, &mut rbuf, plan, &name, &mut stats).await {
        Ok(()) => {}
        Err(BenchError::Timeout { .. }) => stats.timed_out = true,
        Err(e) => stats.error = Some(e.to_string()),
    }
    say_goodbye(&mut stream, version).await;
    stats
}

async fn drive(
    ctx: &RunCtx,
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
    plan: SubscriberPlan,
    name: &str,
    stats: &mut SubStats,
) -> Result<(), BenchError> {
    let (mut rd, mut wr) = stream.split();
    let acks = Acks::new(ctx.version);
    let mut seen = Seen::new(plan.pubs, plan.per_pub);
    // QoS 2 deliveries whose PUBREL has not come yet, by packet id.
    let mut awaiting_rel = vec![false; 65_536].into_boxed_slice();
    let mut awaiting_rel_count: u32 = 0;
    let mut wbuf = plan.initial;
    let mut last_activity_ns = ctx.now_ns();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = tokio::time::sleep_until(ctx.deadline);
    tokio::pin!(deadline);

    loop {
        if stats.received >= plan.expected && awaiting_rel_count == 0 && wbuf.is_empty() {
            return Ok(());
        }
        if rbuf.capacity() - rbuf.len() < READ_SPARE / 2 {
            rbuf.reserve(READ_SPARE);
        }
        tokio::select! {
            biased;
            read = rd.read_buf(rbuf) => {
                match read {
                    Ok(0) => return Err(BenchError::Closed { what: name.to_string() }),
                    Err(e) => return Err(BenchError::io(format!("{name}: reading"), e)),
                    Ok(_) => {}
                }
                // One clock read per socket read: everything in this read arrived together.
                let now_ns = ctx.now_ns();
                last_activity_ns = now_ns;
                let before = stats.received;
                loop {
                    let packet = match decode(rbuf, ctx.version, MAX_INBOUND) {
                        Ok(Some(p)) => p,
                        Ok(None) => break,
                        Err(source) => {
                            return Err(BenchError::Malformed { what: name.to_string(), source })
                        }
                    };
                    match packet {
                        Packet::Publish(p) => {
                            let counted = !plan.retained_only || p.retain;
                            match Stamp::read(&p.payload).filter(|_| counted) {
                                Some(stamp) => {
                                    match seen.insert(stamp.publisher.wrapping_sub(plan.pub_base), stamp.seq) {
                                        Some(true) => {
                                            stats.received += 1;
                                            stats.first_rx_ns.get_or_insert(now_ns);
                                            stats.last_rx_ns = Some(now_ns);
                                            let _ = stats.latency.record(
                                                now_ns.saturating_sub(stamp.sent_ns).max(1_000),
                                            );
                                        }
                                        Some(false) => stats.duplicates += 1,
                                        None => stats.unexpected += 1,
                                    }
                                }
                                None => stats.unexpected += 1,
                            }
                            if let Some(id) = p.packet_id.map(|id| id.get()) {
                                match p.qos {
                                    QoS::AtLeastOnce => acks.append(&mut wbuf, AckKind::PubAck, id),
                                    QoS::ExactlyOnce => {
                                        let slot = &mut awaiting_rel[usize::from(id)];
                                        if !*slot {
                                            *slot = true;
                                            awaiting_rel_count += 1;
                                        }
                                        acks.append(&mut wbuf, AckKind::PubRec, id);
                                    }
                                    QoS::AtMostOnce => {}
                                }
                            }
                        }
                        Packet::PubRel(rel) => {
                            let id = rel.packet_id.get();
                            let slot = &mut awaiting_rel[usize::from(id)];
                            if *slot {
                                *slot = false;
                                awaiting_rel_count -= 1;
                            }
                            // Always answered, even for an id we forgot [MQTT-4.3.3-11].
                            acks.append(&mut wbuf, AckKind::PubComp, id);
                        }
                        Packet::SubAck(ack) => {
                            if let Some(bad) = ack.reasons.iter().find(|r| r.0 >= 0x80) {
                                return Err(BenchError::refused(format!("{name}: SUBSCRIBE"), *bad));
                            }
                        }
                        Packet::PingResp => {}
                        Packet::Disconnect(d) => {
                            let reason = if d.reason == ReasonCode::SUCCESS {
                                ReasonCode::UNSPECIFIED_ERROR
                            } else {
                                d.reason
                            };
                            return Err(BenchError::refused(format!("{name}: DISCONNECT"), reason));
                        }
                        other => {
                            return Err(BenchError::Unexpected {
                                what: format!("{name}: subscribed"),
                                packet: other.name(),
                            })
                        }
                    }
                }
                ctx.progress.add(stats.received - before);
            }
            written = wr.write(&wbuf), if !wbuf.is_empty() => {
                match written {
                    Ok(0) => return Err(BenchError::Closed { what: name.to_string() }),
                    Ok(n) => wbuf.advance(n),
                    Err(e) => return Err(BenchError::io(format!("{name}: writing"), e)),
                }
            }
            _ = tick.tick() => {
                let idle = ctx.now_ns().saturating_sub(last_activity_ns);
                if plan.publishers_done.load(Ordering::Acquire)
                    && idle >= DRAIN_IDLE.as_nanos() as u64
                    && wbuf.is_empty()
                {
                    return Ok(());
                }
            }
            _ = &mut deadline => return Err(BenchError::Timeout { what: name.to_string() }),
        }
    }
}

/// One bit per (publisher, sequence) this subscriber may receive.
struct Seen {
    bits: Vec<u64>,
    pubs: u32,
    per_pub: u32,
    words_per_pub: usize,
}

impl Seen {
    fn new(pubs: u32, per_pub: u32) -> Seen {
        let words_per_pub = (per_pub as usize).div_ceil(64);
        Seen {
            bits: vec![0; words_per_pub * pubs as usize],
            pubs,
            per_pub,
            words_per_pub,
        }
    }

    /// `Some(true)` the first time, `Some(false)` for a repeat, `None` outside the plan.
    fn insert(&mut self, publisher: u32, seq: u32) -> Option<bool> {
        if publisher >= self.pubs || seq >= self.per_pub {
            return None;
        }
        let word = publisher as usize * self.words_per_pub + (seq / 64) as usize;
        let mask = 1u64 << (seq % 64);
        let w = &mut self.bits[word];
        let new = *w & mask == 0;
        *w |= mask;
        Some(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_tells_first_repeat_and_stray() {
        let mut s = Seen::new(2, 100);
        assert_eq!(s.insert(1, 99), Some(true));
        assert_eq!(s.insert(1, 99), Some(false));
        assert_eq!(s.insert(0, 99), Some(true));
        assert_eq!(s.insert(2, 0), None);
        assert_eq!(s.insert(0, 100), None);
    }
}

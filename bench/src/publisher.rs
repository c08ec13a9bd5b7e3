//! One publisher: a task owning one TcpStream, writing PUBLISH packets copied from templates in
//! batches of up to [`WRITE_HIGH`] bytes per write, and reading acks on the same task.
//!
//! QoS 1/2 keep at most `inflight` messages unacknowledged (further ones wait, which is what
//! paces a QoS 1/2 publisher to the broker); QoS 2 answers each PUBREC with PUBREL and frees the
//! slot on PUBCOMP. With a [`Pace`], message k is due at an absolute time computed from the
//! run's start, so a late wake-up sends everything that fell due in one batch instead of
//! drifting.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use petrel_codec::{decode, Packet, QoS, ReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conn::{say_goodbye, Conn, MAX_INBOUND};
use crate::error::BenchError;
use crate::template::{AckKind, Acks, PublishTemplate, Stamp};
use crate::RunCtx;

/// Refill the write buffer once less than this is waiting: the socket never runs dry while we
/// copy the next batch.
const WRITE_LOW: usize = 16 * 1024;
/// Stop filling past this: one write's worth, large enough to amortise the syscall over
/// hundreds of small PUBLISH packets.
const WRITE_HIGH: usize = 64 * 1024;
/// Read buffer space kept free for acks.
const READ_SPARE: usize = 16 * 1024;

pub struct PublisherPlan {
    /// Goes into every stamp; subscribers track sequences per id.
    pub id: u32,
    /// Message k is a copy of `templates[k % len]`.
    pub templates: Arc<[PublishTemplate]>,
    pub count: u32,
    pub qos: QoS,
    pub inflight: u16,
    pub pace: Option<Pace>,
    /// Count completed flows on the progress bar (when nobody subscribes to count deliveries).
    pub progress: bool,
}

/// A fixed-rate schedule shared by `stride` publishers: the run's j-th message is due at
/// `t0 + j / rate`, and publisher `offset` sends messages j = offset, offset + stride, ...
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub t0_ns: u64,
    /// Messages per second over all publishers of the schedule.
    pub rate: u64,
    pub stride: u32,
    pub offset: u32,
}

impl Pace {
    fn due_ns(&self, k: u32) -> u64 {
        let j = u128::from(k) * u128::from(self.stride) + u128::from(self.offset);
        self.t0_ns + (j * 1_000_000_000 / u128::from(self.rate.max(1))) as u64
    }

    /// How many of this publisher's messages are due at `now_ns`.
    fn due_count(&self, now_ns: u64) -> u32 {
        let Some(elapsed) = now_ns.checked_sub(self.t0_ns) else {
            return 0;
        };
        let j = u128::from(elapsed) * u128::from(self.rate) / 1_000_000_000;
        let offset = u128::from(self.offset);
        if j < offset {
            return 0;
        }
        ((j - offset) / u128::from(self.stride.max(1)) + 1).min(u128::from(u32::MAX)) as u32
    }
}

#[derive(Debug, Default)]
pub struct PubStats {
    /// Messages put on the wire (copied into the write buffer; all written unless timed out).
    pub sent: u64,
    /// QoS 1/2 flows completed (PUBACK, or PUBCOMP).
    pub acked: u64,
    /// Acks with a failure reason code (v5 only).
    pub rejected: u64,
    pub first_send_ns: Option<u64>,
    /// Everything written and, for QoS 1/2, acknowledged.
    pub done_ns: Option<u64>,
    /// When the publisher stopped: `done_ns`, or the timeout or error that ended it.
    pub end_ns: u64,
    pub timed_out: bool,
    pub error: Option<String>,
}

/// Runs the plan to completion, the deadline, or an error, then says DISCONNECT.
pub async fn run(ctx: Arc<RunCtx>, conn: Conn, plan: PublisherPlan) -> PubStats {
    let name = conn.name.clone();
    let version = conn.version;
    let limit = plan.inflight.min(conn.receive_max).max(1);
    let (mut stream, mut rbuf) = conn.into_parts();
    let mut stats = PubStats::default();
    match drive(
        &ctx,
        &mut stream,
        &mut rbuf,
        &plan,
        limit,
        &name,
        &mut stats,
    )
    .await
    {
        Ok(()) => {}
        Err(BenchError::Timeout { .. }) => stats.timed_out = true,
        Err(e) => stats.error = Some(e.to_string()),
    }
    stats.end_ns = stats.done_ns.unwrap_or_else(|| ctx.now_ns());
    say_goodbye(&mut stream, version).await;
    stats
}

async fn drive(
    ctx: &RunCtx,
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
    plan: &PublisherPlan,
    limit: u16,
    name: &str,
    stats: &mut PubStats,
) -> Result<(), BenchError> {
    let (mut rd, mut wr) = stream.split();
    let acks = Acks::new(ctx.version);
    let largest = plan.templates.iter().map(|t| t.len()).max().unwrap_or(0);
    let mut wbuf = BytesMut::with_capacity(WRITE_HIGH + largest);
    let mut window = Window::new(limit);
    let confirmed = plan.qos != QoS::AtMostOnce;
    let mut next: u32 = 0;
    let deadline = tokio::time::sleep_until(ctx.deadline);
    tokio::pin!(deadline);
    let pace_wake = tokio::time::sleep_until(ctx.deadline);
    tokio::pin!(pace_wake);

    loop {
        let mut waiting_for_schedule = false;
        if wbuf.len() < WRITE_LOW && next < plan.count {
            let now_ns = ctx.now_ns();
            let mut room = plan.count - next;
            if let Some(pace) = &plan.pace {
                room = room.min(pace.due_count(now_ns).saturating_sub(next));
                waiting_for_schedule = room == 0;
            }
            if confirmed {
                room = room.min(window.free());
                // A full window waits for acks, not for the clock.
                waiting_for_schedule &= window.free() > 0;
            }
            if room > 0 && stats.first_send_ns.is_none() {
                stats.first_send_ns = Some(now_ns);
            }
            while room > 0 && wbuf.len() < WRITE_HIGH {
                let packet_id = if confirmed { window.take() } else { 0 };
                let stamp = Stamp {
                    publisher: plan.id,
                    seq: next,
                    sent_ns: now_ns,
                };
                let template = &plan.templates[next as usize % plan.templates.len()];
                template.append(&mut wbuf, packet_id, &stamp);
                next += 1;
                room -= 1;
            }
            stats.sent = u64::from(next);
            if waiting_for_schedule {
                if let Some(pace) = &plan.pace {
                    pace_wake.as_mut().reset(ctx.at_ns(pace.due_ns(next)));
                }
            }
        }
        if next == plan.count && wbuf.is_empty() && window.outstanding == 0 {
            stats.done_ns = Some(ctx.now_ns());
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
                let before = stats.acked;
                loop {
                    let packet = match decode(rbuf, ctx.version, MAX_INBOUND) {
                        Ok(Some(p)) => p,
                        Ok(None) => break,
                        Err(source) => {
                            return Err(BenchError::Malformed { what: name.to_string(), source })
                        }
                    };
                    handle(packet, &mut window, &acks, &mut wbuf, stats, name)?;
                }
                if plan.progress {
                    ctx.progress.add(stats.acked - before);
                }
            }
            written = wr.write(&wbuf), if !wbuf.is_empty() => {
                match written {
                    Ok(0) => return Err(BenchError::Closed { what: name.to_string() }),
                    Ok(n) => wbuf.advance(n),
                    Err(e) => return Err(BenchError::io(format!("{name}: writing"), e)),
                }
            }
            _ = &mut pace_wake, if waiting_for_schedule => {}
            _ = &mut deadline => return Err(BenchError::Timeout { what: name.to_string() }),
        }
    }
}

fn handle(
    packet: Packet,
    window: &mut Window,
    acks: &Acks,
    wbuf: &mut BytesMut,
    stats: &mut PubStats,
    name: &str,
) -> Result<(), BenchError> {
    let unknown = |packet: &'static str, id: u16| BenchError::Unexpected {
        what: format!("{name}: packet id {id} not awaiting it"),
        packet,
    };
    match packet {
        Packet::PubAck(ack) => {
            let id = ack.packet_id.get();
            if !window.release(id, AWAIT_ACK) {
                return Err(unknown("PUBACK", id));
            }
            stats.acked += 1;
            stats.rejected += u64::from(ack.reason.0 >= 0x80);
        }
        Packet::PubRec(ack) => {
            let id = ack.packet_id.get();
            if ack.reason.0 >= 0x80 {
                // A refused QoS 2 message ends here [MQTT-4.3.3]: no PUBREL.
                if !window.release(id, AWAIT_ACK) {
                    return Err(unknown("PUBREC", id));
                }
                stats.acked += 1;
                stats.rejected += 1;
            } else {
                if !window.advance(id, AWAIT_ACK, AWAIT_COMP) {
                    return Err(unknown("PUBREC", id));
                }
                acks.append(wbuf, AckKind::PubRel, id);
            }
        }
        Packet::PubComp(ack) => {
            let id = ack.packet_id.get();
            if !window.release(id, AWAIT_COMP) {
                return Err(unknown("PUBCOMP", id));
            }
            stats.acked += 1;
        }
        Packet::PingResp => {}
        Packet::Disconnect(d) => {
            return Err(BenchError::refused(
                format!("{name}: DISCONNECT while publishing"),
                if d.reason == ReasonCode::SUCCESS {
                    ReasonCode::UNSPECIFIED_ERROR
                } else {
                    d.reason
                },
            ))
        }
        other => {
            return Err(BenchError::Unexpected {
                what: format!("{name}: publishing"),
                packet: other.name(),
            })
        }
    }
    Ok(())
}

const FREE: u8 = 0;
/// Sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
const AWAIT_ACK: u8 = 1;
/// PUBREL sent; waiting for PUBCOMP.
const AWAIT_COMP: u8 = 2;

/// Packet ids in use, one byte of state per id: a flat table beats a map at 64 K entries and
/// makes every ack an index.
struct Window {
    state: Box<[u8]>,
    cursor: u16,
    outstanding: u32,
    limit: u32,
}

impl Window {
    fn new(limit: u16) -> Window {
        Window {
            state: vec![FREE; 65_536].into_boxed_slice(),
            cursor: 0,
            outstanding: 0,
            limit: u32::from(limit),
        }
    }

    fn free(&self) -> u32 {
        self.limit.saturating_sub(self.outstanding)
    }

    /// The next free id after the last one handed out; never 0 [MQTT-2.3.1-1]. Terminates
    /// because at most 65,535 ids are outstanding.
    fn take(&mut self) -> u16 {
        loop {
            self.cursor = self.cursor.wrapping_add(1);
            let slot = &mut self.state[usize::from(self.cursor)];
            if self.cursor != 0 && *slot == FREE {
                *slot = AWAIT_ACK;
                self.outstanding += 1;
                return self.cursor;
            }
        }
    }

    fn advance(&mut self, id: u16, from: u8, to: u8) -> bool {
        let slot = &mut self.state[usize::from(id)];
        if *slot != from {
            return false;
        }
        *slot = to;
        true
    }

    fn release(&mut self, id: u16, from: u8) -> bool {
        if !self.advance(id, from, FREE) {
            return false;
        }
        self.outstanding -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_spreads_publishers_over_one_schedule() {
        // 1000 msg/s over 4 publishers: publisher 1 sends global messages 1, 5, 9, ...
        let p = Pace {
            t0_ns: 1_000,
            rate: 1_000,
            stride: 4,
            offset: 1,
        };
        assert_eq!(p.due_ns(0), 1_000 + 1_000_000);
        assert_eq!(p.due_ns(2), 1_000 + 9_000_000);
        assert_eq!(p.due_count(0), 0);
        assert_eq!(p.due_count(1_000 + 999_999), 0);
        assert_eq!(p.due_count(1_000 + 1_000_000), 1);
        assert_eq!(p.due_count(1_000 + 9_000_000), 3);
    }

    #[test]
    fn window_reuses_ids_only_when_free() {
        let mut w = Window::new(2);
        let a = w.take();
        let b = w.take();
        assert_ne!(a, b);
        assert_eq!(w.free(), 0);
        assert!(!w.release(a, AWAIT_COMP));
        assert!(w.advance(a, AWAIT_ACK, AWAIT_COMP));
        assert!(w.release(a, AWAIT_COMP));
        assert!(!w.release(a, AWAIT_COMP));
        assert_eq!(w.free(), 1);
    }
}

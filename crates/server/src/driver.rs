//! The per-connection driver: the only place where a socket meets the engine.
//!
//! One task per connection runs one loop around a hand-written `poll` that, in each pass,
//! writes pending output, checks for shutdown, moves queued messages into the output, reads the
//! socket and checks the one timer. Polling all of them on a single `&mut` stream avoids
//! splitting it (no extra allocation or lock per connection) and works for any
//! `AsyncRead + AsyncWrite` transport, so TLS and WebSocket streams will reuse it unchanged.
//!
//! Memory at rest: an idle connection holds no read or write buffer. Reads land in a stack
//! buffer and are copied into a heap buffer only while a packet is being assembled; the write
//! buffer is released once flushed.

use std::future::{poll_fn, Future};
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use petrel_engine::connection::OUT_HIGH_WATER;
use petrel_engine::stats::Stats;
use petrel_engine::{CloseReason, Connection};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use crate::input::InputShare;

/// Bytes read per `poll_read` into the stack buffer.
const READ_CHUNK: usize = 16 * 1024;

/// How long the final flush (a CONNACK refusal, a v5 DISCONNECT) may take before the socket
/// is dropped anyway: a peer that stopped reading must not hold the task.
const CLOSE_FLUSH_LIMIT: Duration = Duration::from_secs(2);

/// In a drain, how long after the delivery deadline the DISCONNECT and close may take: the
/// server has budgeted this much of the grace period for it.
pub(crate) const DRAIN_CLOSE: Duration = Duration::from_millis(500);

enum Event {
    Read,
    /// A flow-control pause ended.
    Resumed,
    Delivered,
    Timer,
    Eof,
    IoError,
    Shutdown,
    /// Draining for a shutdown: everything sendable is written.
    Drained,
    Closed(CloseReason),
}

/// Runs a connection to its end. `slot` (the listener's connection permit) is released when
/// the connection is gone; `input` is this connection's part of the partial-input budget.
pub(crate) async fn drive<S, G>(
    mut stream: S,
    mut conn: Connection,
    shutdown: CancellationToken,
    slot: G,
    mut input: InputShare,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    G: Send,
{
    let mut rbuf = BytesMut::new();
    let far_future = || tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let first = conn
        .deadline()
        .map_or_else(far_future, tokio::time::Instant::from_std);
    let mut sleep = pin!(tokio::time::sleep_until(first));
    let mut cancelled = pin!(shutdown.cancelled());
    // Set once the server shuts down: the connection keeps running until what is queued for
    // the client is written, or until then at the latest.
    let mut drain_until: Option<tokio::time::Instant> = None;

    let reason = 'conn: loop {
        let draining = drain_until.is_some();
        let event = poll_fn(|cx| {
            poll_event(
                cx,
                &mut stream,
                &mut conn,
                &mut rbuf,
                sleep.as_mut(),
                cancelled.as_mut(),
                draining,
            )
        })
        .await;
        match event {
            Event::Read | Event::Resumed => {}
            Event::Delivered => continue,
            Event::Timer => {
                if drain_until.is_some_and(|t| t <= tokio::time::Instant::now()) {
                    break CloseReason::ServerShutdown;
                }
                if let Err(reason) = conn.handle_timeout(Instant::now()) {
                    break reason;
                }
                // Packets arrived since the timer was set: sleep until the moved deadline.
                let next = conn
                    .deadline()
                    .map_or_else(far_future, tokio::time::Instant::from_std);
                sleep
                    .as_mut()
                    .reset(drain_until.map_or(next, |t| t.min(next)));
            }
            Event::Eof => break CloseReason::PeerClosed,
            Event::IoError => break CloseReason::IoError,
            Event::Shutdown => {
                // Only a client that is connected has anything to drain.
                let until = conn
                    .broker()
                    .drain_deadline()
                    .map(tokio::time::Instant::from_std)
                    .filter(|t| *t > tokio::time::Instant::now());
                match until {
                    Some(until) if conn.is_connected() => {
                        drain_until = Some(until);
                        if until < sleep.deadline() {
                            sleep.as_mut().reset(until);
                        }
                        continue;
                    }
                    _ => break CloseReason::ServerShutdown,
                }
            }
            Event::Drained => break CloseReason::ServerShutdown,
            Event::Closed(reason) => break reason,
        }
        // Read, resumed after a flow-control pause, or a timer that may have ended one:
        // handle every complete packet buffered, unless a PUBLISH pauses the client again.
        let now = Instant::now();
        while !rbuf.is_empty() && !conn.is_paused() {
            match petrel_codec::decode(&mut rbuf, conn.version(), conn.max_packet_size()) {
                Ok(Some(packet)) => {
                    if let Err(reason) = conn.handle_packet(now, packet) {
                        break 'conn reason;
                    }
                }
                Ok(None) => break,
                Err(error @ petrel_codec::DecodeError::PacketTooLarge { .. })
                    if !conn.is_connected() =>
                {
                    // Before authentication the lower limit applies (`max_connect_size`):
                    // refused from the fixed header, in the client's version if it got that far.
                    tracing::debug!(peer = conn.peer(), %error, "packet too large before CONNECT completed");
                    let version = petrel_codec::connect_version(&rbuf);
                    break 'conn conn.refuse_oversized_connect(version, error);
                }
                Err(error) => {
                    tracing::debug!(peer = conn.peer(), client_id = conn.client_id().unwrap_or(""), %error, "malformed packet");
                    break 'conn conn.handle_decode_error(error);
                }
            }
        }
        if rbuf.is_empty() && rbuf.capacity() > 0 {
            rbuf = BytesMut::new();
        } else if let Some(total) = packet_len(&rbuf) {
            // The rest of a packet whose size the header gave (decode has checked it against
            // the limit): room for all of it at once, not a buffer doubled (and copied) as it
            // arrives, so the memory held, and counted below, is the packet's size.
            if total > rbuf.capacity() {
                rbuf.reserve(total - rbuf.len());
            }
        }
        // What is left is the start of one packet: count it against the broker-wide budget
        // (`input.rs`), which sheds connections that are not authenticated yet once it is
        // spent, and those with keep alive 0 (no deadline) past twice it.
        let authenticated = conn.is_connected();
        if authenticated {
            input.set_authenticated();
        }
        if rbuf.capacity() != input.held() {
            let limit = conn.broker().limits().max_partial_input_total;
            let cap = match (authenticated, conn.deadline()) {
                (false, _) => limit,
                (true, None) => limit.saturating_mul(2),
                (true, Some(_)) => usize::MAX,
            };
            if input.hold(rbuf.capacity(), cap).is_err() {
                Stats::add(&conn.broker().stats.partial_input_shed, 1);
                tracing::debug!(peer = conn.peer(), held = rbuf.len(), authenticated, "closing a connection: the partial input budget (mqtt.max_partial_input_total) is spent");
                break 'conn CloseReason::IoError;
            }
        }
        // CONNECT may have replaced the connect deadline with an earlier keepalive one, and a
        // pause brings its own.
        if let Some(deadline) = conn.deadline() {
            let deadline = tokio::time::Instant::from_std(deadline);
            if deadline < sleep.deadline() {
                sleep.as_mut().reset(deadline);
            }
        }
    };

    match &reason {
        CloseReason::ConnectTimeout => {
            tracing::debug!(
                peer = conn.peer(),
                "no complete CONNECT before the connect timeout"
            );
        }
        CloseReason::Violation(v) if !conn.is_connected() => {
            tracing::info!(peer = conn.peer(), rule = %v, "closing connection before CONNECT: protocol violation");
        }
        _ => {}
    }
    conn.close(&reason, Instant::now());
    // Final flush (a CONNACK refusal, a v5 DISCONNECT), bounded by the same timer so the task
    // carries no second one: a peer that stopped reading must not hold it.
    let out = std::mem::take(conn.output());
    let mut flush_by = tokio::time::Instant::now() + CLOSE_FLUSH_LIMIT;
    if let Some(until) = drain_until {
        flush_by = flush_by.min(until + DRAIN_CLOSE);
    }
    sleep.as_mut().reset(flush_by);
    tokio::select! {
        _ = async {
            if !out.is_empty() {
                stream.write_all(&out).await?;
            }
            stream.shutdown().await
        } => {}
        _ = sleep => {}
    }
    drop(input);
    drop(slot);
}

fn poll_event<S>(
    cx: &mut Context<'_>,
    stream: &mut S,
    conn: &mut Connection,
    rbuf: &mut BytesMut,
    sleep: Pin<&mut Sleep>,
    cancelled: Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
    draining: bool,
) -> Poll<Event>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // 1. Write whatever is pending: all packets produced since the last pass go out in as few
    //    writes as the socket allows.
    let mut wrote = false;
    while !conn.output().is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, conn.output()) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Event::IoError),
            Poll::Ready(Ok(n)) => {
                conn.output().advance(n);
                Stats::add(&conn.broker().stats.bytes_sent, n as u64);
                wrote = true;
            }
            Poll::Pending => break,
        }
    }
    if wrote && conn.output().is_empty() {
        if let Poll::Ready(Err(_)) = Pin::new(&mut *stream).poll_flush(cx) {
            return Poll::Ready(Event::IoError);
        }
        *conn.output() = BytesMut::new();
    }

    // 2. Server shutdown.
    if !draining && cancelled.poll(cx).is_ready() {
        return Poll::Ready(Event::Shutdown);
    }

    // 3 and 4 only while the output is below its high-water mark: a peer that does not read
    //    is not fed more, and its further requests wait in its own socket buffer.
    if conn.output().len() < OUT_HIGH_WATER {
        match conn.poll_deliver(cx, Instant::now()) {
            Poll::Ready(Ok(())) => return Poll::Ready(Event::Delivered),
            Poll::Ready(Err(reason)) => return Poll::Ready(Event::Closed(reason)),
            // Drained once nothing is left to write, nor waits for the store to be written.
            Poll::Pending if draining && conn.output().is_empty() && !conn.holds_output() => {
                return Poll::Ready(Event::Drained)
            }
            Poll::Pending => {}
        }
        // A client paused by flow control is not read: its data waits in its socket buffer
        //    and, once that fills, in the client itself.
        // The same while the authenticator decides on CONNECT.
        if conn.is_paused() {
            match conn.poll_resume(cx, Instant::now()) {
                Poll::Ready(Ok(())) => return Poll::Ready(Event::Resumed),
                Poll::Ready(Err(reason)) => return Poll::Ready(Event::Closed(reason)),
                Poll::Pending => return poll_timer(cx, conn, sleep),
            }
        }
        match poll_read(cx, stream, rbuf) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Event::Eof),
            Poll::Ready(Ok(n)) => {
                Stats::add(&conn.broker().stats.bytes_received, n as u64);
                return Poll::Ready(Event::Read);
            }
            Poll::Ready(Err(e)) => {
                // The WebSocket layer refuses growth past the partial-input budget with
                // this kind.
                if e.kind() == std::io::ErrorKind::OutOfMemory {
                    Stats::add(&conn.broker().stats.partial_input_shed, 1);
                }
                return Poll::Ready(Event::IoError);
            }
            Poll::Pending => {}
        }
    }

    poll_timer(cx, conn, sleep)
}

/// 5. The one deadline: connect timeout, then 1.5 × keepalive (or a flow-control check).
fn poll_timer(cx: &mut Context<'_>, conn: &Connection, sleep: Pin<&mut Sleep>) -> Poll<Event> {
    if conn.deadline().is_some() && sleep.poll(cx).is_ready() {
        return Poll::Ready(Event::Timer);
    }
    Poll::Pending
}

/// The whole size of the packet that starts `buf`, once its fixed header is in.
fn packet_len(buf: &[u8]) -> Option<usize> {
    let (remaining, varint) = petrel_codec::wire::parse_varint(buf.get(1..)?).ok()??;
    Some(1 + varint + remaining as usize)
}

/// Reads into `rbuf` without holding heap memory while idle: with no partial packet buffered
/// the read goes to the stack and only what arrived is copied to the heap.
fn poll_read<S: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    stream: &mut S,
    rbuf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    if !rbuf.is_empty() {
        // Assembling a packet: read straight into the heap buffer.
        if rbuf.capacity() == rbuf.len() {
            rbuf.reserve(READ_CHUNK);
        }
        return tokio_util::io::poll_read_buf(Pin::new(stream), cx, rbuf);
    }
    let mut stack = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
    let mut buf = ReadBuf::uninit(&mut stack);
    match Pin::new(stream).poll_read(cx, &mut buf) {
        Poll::Ready(Ok(())) => {
            let filled = buf.filled();
            rbuf.extend_from_slice(filled);
            Poll::Ready(Ok(filled.len()))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

//! A `rumqttc` client driven the way an application drives it, but observable by a test.
//!
//! Each [`Peer`] runs its `EventLoop` in its own task and forwards every event into a channel,
//! so a test can publish from one peer while reading another's events, and can wait for a
//! specific event with a time bound. The loop stops at the first connection error instead of
//! reconnecting (rumqttc reconnects on the next `poll`), so "the broker dropped this client" is
//! an observable, final event, and aborting the task drops the socket without DISCONNECT.
//!
//! Included with `#[path = "common/rumqttc_util.rs"] mod rumqttc_util;` by the rumqttc tests.

#![allow(dead_code)] // each test binary uses a different subset
#![allow(clippy::result_large_err)] // rumqttc's own error type is large; tests only inspect it

use std::net::SocketAddr;
use std::time::Duration;

use petrel_tests::PROMPT;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, LastWill, MqttOptions, Outgoing,
    Publish, QoS, SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long to watch for something that must *not* happen when no sentinel message can prove
/// it sooner.
pub const QUIET: Duration = Duration::from_millis(300);

/// 3.1.1 options for `client_id` against `addr`: keepalive 60 s, the given clean session flag.
pub fn options(addr: SocketAddr, client_id: &str, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    o.set_clean_session(clean);
    o.set_keep_alive(Duration::from_secs(60));
    // Large enough for every test payload; rumqttc's default is 10 KiB.
    o.set_max_packet_size(256 * 1024, 256 * 1024);
    o
}

/// `options` with a last will.
pub fn options_with_will(
    addr: SocketAddr,
    client_id: &str,
    clean: bool,
    will: LastWill,
) -> MqttOptions {
    let mut o = options(addr, client_id, clean);
    o.set_last_will(will);
    o
}

pub fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => panic!("no QoS {n}"),
    }
}

/// `QoS` is only `PartialOrd` in rumqttc.
pub fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) {
        a
    } else {
        b
    }
}

type Polled = Result<Event, ConnectionError>;

/// One connected rumqttc client.
pub struct Peer {
    pub client: AsyncClient,
    pub name: String,
    /// From CONNACK.
    pub session_present: bool,
    events: mpsc::UnboundedReceiver<Polled>,
    task: JoinHandle<()>,
    /// Events read while waiting for something else, handed out again in order.
    stash: std::collections::VecDeque<Event>,
}

impl Peer {
    /// Connects with the defaults of [`options`].
    pub async fn connect(addr: SocketAddr, client_id: &str, clean: bool) -> Peer {
        Peer::connect_with(options(addr, client_id, clean)).await
    }

    /// Connects and waits for a successful CONNACK.
    pub async fn connect_with(opts: MqttOptions) -> Peer {
        let name = opts.client_id();
        let (client, eventloop) = AsyncClient::new(opts, 1024);
        let (tx, mut events) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(eventloop, tx));
        let first = tokio::time::timeout(PROMPT, events.recv())
            .await
            .unwrap_or_else(|_| panic!("{name}: no CONNACK within {PROMPT:?}"))
            .unwrap_or_else(|| panic!("{name}: event loop ended before CONNACK"));
        let session_present = match first {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                assert_eq!(
                    ack.code,
                    rumqttc::ConnectReturnCode::Success,
                    "{name}: CONNACK refused"
                );
                ack.session_present
            }
            other => panic!("{name}: expected CONNACK, got {other:?}"),
        };
        Peer {
            client,
            name,
            session_present,
            events,
            task,
            stash: Default::default(),
        }
    }

    /// A PUBLISH already received, if any, without waiting (other events are dropped).
    pub fn try_publish(&mut self) -> Option<Publish> {
        while let Some(e) = self.stash.pop_front() {
            if let Event::Incoming(Incoming::Publish(p)) = e {
                return Some(p);
            }
        }
        while let Ok(polled) = self.events.try_recv() {
            match polled {
                Ok(Event::Incoming(Incoming::Publish(p))) => return Some(p),
                Ok(_) => {}
                Err(e) => panic!("{}: connection error: {e}", self.name),
            }
        }
        None
    }

    /// The next event, or `Err` with the connection error that ended the loop.
    async fn next_event_within(&mut self, wait: Duration) -> Option<Polled> {
        if let Some(e) = self.stash.pop_front() {
            return Some(Ok(e));
        }
        match tokio::time::timeout(wait, self.events.recv()).await {
            Err(_) => None,
            Ok(Some(polled)) => Some(polled),
            Ok(None) => panic!("{}: event loop already ended", self.name),
        }
    }

    /// Waits for the first event `pick` accepts, keeping the ones it skips (except pings) for
    /// later reads. Panics on timeout or connection error.
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&Event) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + PROMPT;
        let mut skipped = std::collections::VecDeque::new();
        let found = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event_within(left).await {
                None => panic!(
                    "{}: no {what} within {PROMPT:?} (skipped {skipped:?})",
                    self.name
                ),
                Some(Err(e)) => panic!(
                    "{}: connection error while waiting for {what}: {e}",
                    self.name
                ),
                Some(Ok(e)) => {
                    if let Some(t) = pick(&e) {
                        break t;
                    }
                    if !is_ping(&e) {
                        skipped.push_back(e);
                    }
                }
            }
        };
        skipped.extend(self.stash.drain(..));
        self.stash = skipped;
        found
    }

    /// Subscribes and returns the granted QoS from SUBACK.
    pub async fn subscribe(&mut self, filter: &str, q: QoS) -> QoS {
        self.client
            .subscribe(filter, q)
            .await
            .expect("queue SUBSCRIBE");
        let codes = self
            .wait_for("SUBACK", |e| match e {
                Event::Incoming(Incoming::SubAck(ack)) => Some(ack.return_codes.clone()),
                _ => None,
            })
            .await;
        match codes.as_slice() {
            [SubscribeReasonCode::Success(granted)] => *granted,
            other => panic!("{}: SUBSCRIBE {filter:?} refused: {other:?}", self.name),
        }
    }

    pub async fn unsubscribe(&mut self, filter: &str) {
        self.client
            .unsubscribe(filter)
            .await
            .expect("queue UNSUBSCRIBE");
        self.wait_for("UNSUBACK", |e| match e {
            Event::Incoming(Incoming::UnsubAck(_)) => Some(()),
            _ => None,
        })
        .await;
    }

    /// Queues a PUBLISH without waiting for anything.
    pub async fn publish(&self, topic: &str, q: QoS, retain: bool, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, q, retain, payload.into())
            .await
            .expect("queue PUBLISH");
    }

    /// Publishes and waits until the QoS flow is complete: written (QoS 0), PUBACK (QoS 1) or
    /// PUBCOMP (QoS 2). Meant for a peer that only publishes, one message at a time.
    pub async fn publish_confirmed(
        &mut self,
        topic: &str,
        q: QoS,
        retain: bool,
        payload: impl Into<Vec<u8>>,
    ) {
        self.publish(topic, q, retain, payload).await;
        let what = format!("completion of {q:?} PUBLISH to {topic:?}");
        self.wait_for(&what, |e| match (q, e) {
            (QoS::AtMostOnce, Event::Outgoing(Outgoing::Publish(_)))
            | (QoS::AtLeastOnce, Event::Incoming(Incoming::PubAck(_)))
            | (QoS::ExactlyOnce, Event::Incoming(Incoming::PubComp(_))) => Some(()),
            _ => None,
        })
        .await;
    }

    /// The next PUBLISH received.
    pub async fn next_publish(&mut self) -> Publish {
        self.wait_for("PUBLISH", |e| match e {
            Event::Incoming(Incoming::Publish(p)) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    /// The next `n` PUBLISH packets received, within `wait` in total.
    pub async fn collect_publishes(&mut self, n: usize, wait: Duration) -> Vec<Publish> {
        let mut got = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + wait;
        while got.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event_within(left).await {
                None => panic!(
                    "{}: only {} of {n} PUBLISH within {wait:?}",
                    self.name,
                    got.len()
                ),
                Some(Err(e)) => panic!(
                    "{}: connection error after {} of {n} PUBLISH: {e}",
                    self.name,
                    got.len()
                ),
                Some(Ok(Event::Incoming(Incoming::Publish(p)))) => got.push(p),
                Some(Ok(_)) => {}
            }
        }
        got
    }

    /// PUBLISH packets received up to and including the first one on `sentinel_topic`. The
    /// sentinel is published after whatever is under test, on the same path, so when it arrives
    /// everything before it has arrived too: "nothing else came" without a fixed sleep.
    pub async fn publishes_until(&mut self, sentinel_topic: &str) -> Vec<Publish> {
        let mut got = Vec::new();
        loop {
            let p = self.next_publish().await;
            let done = p.topic == sentinel_topic;
            got.push(p);
            if done {
                return got;
            }
        }
    }

    /// Asserts no PUBLISH arrives for `wait` and the connection stays up.
    pub async fn expect_no_publish(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event_within(left).await {
                None => return,
                Some(Err(e)) => panic!("{}: connection error: {e}", self.name),
                Some(Ok(Event::Incoming(Incoming::Publish(p)))) => {
                    panic!("{}: expected no PUBLISH, got {p:?}", self.name)
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Waits for the event loop to end with a connection error (the broker closed the
    /// connection) and returns that error.
    pub async fn expect_dropped(&mut self) -> ConnectionError {
        let deadline = tokio::time::Instant::now() + PROMPT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event_within(left).await {
                None => panic!(
                    "{}: broker did not close the connection within {PROMPT:?}",
                    self.name
                ),
                Some(Err(e)) => return e,
                Some(Ok(_)) => {}
            }
        }
    }

    /// Sends DISCONNECT and waits until the broker has closed the connection, so everything the
    /// broker does on a disconnect (detach, will decision) has happened when this returns.
    pub async fn disconnect(mut self) {
        self.client.disconnect().await.expect("queue DISCONNECT");
        self.wait_for("DISCONNECT written", |e| match e {
            Event::Outgoing(Outgoing::Disconnect) => Some(()),
            _ => None,
        })
        .await;
        self.expect_dropped().await;
    }

    /// Drops the TCP connection without DISCONNECT, the way a crashed client or a lost network
    /// does.
    pub async fn kill(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn is_ping(e: &Event) -> bool {
    matches!(
        e,
        Event::Outgoing(Outgoing::PingReq) | Event::Incoming(Incoming::PingResp)
    )
}

async fn run(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Polled>) {
    loop {
        let polled = eventloop.poll().await;
        let failed = polled.is_err();
        if tx.send(polled).is_err() || failed {
            return;
        }
    }
}

/// Polls `cond` until it holds or `PROMPT` passes: for broker-side effects (counters, session
/// registry) that follow a socket event with no packet to wait for.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PROMPT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {PROMPT:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

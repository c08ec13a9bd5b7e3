//! The soak's load: steady publishers and subscribers and what they counted, the retainer of
//! rotating retained messages, and the churners.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::client::{will_topic, Client, Ev, Spec};
use crate::SETTLE;

/// Each steady publisher sends one message per tick: 50 msg/s.
pub const TICK: Duration = Duration::from_millis(20);
/// Steady payloads: an 8-byte sequence number, then filler.
pub const PAYLOAD: usize = 128;
/// Topics the retainer rotates over; half of them hold a message at any time.
pub const RETAINED_TOPICS: usize = 16;
/// Session Expiry Interval of the churners' MQTT 5 persistent sessions.
pub const EXPIRY: u32 = 5;
/// What churners whose sessions are resumed subscribe at. Not QoS 2: rumqttc keeps its side of
/// a QoS 2 receive only in the `EventLoop` it made, so a new client resuming the session gets the
/// broker's PUBREL retransmission [MQTT-4.4.0-1] for a packet id it never saw and drops the
/// connection ("unsolicited ack"). QoS 2 is soaked on the steady and the clean clients.
pub const RESUMED_QOS: u8 = 1;

/// What one steady publisher got through.
#[derive(Default)]
pub struct Sent {
    /// Sequence numbers 0..published were handed to the client.
    pub published: AtomicU64,
    /// Flows completed: written (QoS 0), PUBACK (QoS 1), PUBCOMP (QoS 2).
    pub acked: AtomicU64,
    /// Acknowledged with an MQTT 5 failure reason code.
    pub refused: AtomicU64,
}

/// A steady publisher's message `seq` goes to `soak/steady/q{qos}/{seq % SLICES}`: the steady
/// clients with clean sessions take every slice, the persistent sessions only slice 0. What a
/// persistent session queues is written to the disk store, whose memtables grow with every write
/// until fjall flushes them (16 MiB per partition): at a twenty-fifth of the traffic that growth
/// stays small beside what the memory check looks for.
pub const SLICES: u64 = 25;

pub fn steady_topic(qos: u8, seq: u64) -> String {
    format!("soak/steady/q{qos}/{}", seq % SLICES)
}

/// All of a steady publisher's slices.
pub fn steady_filter(qos: u8) -> String {
    format!("soak/steady/q{qos}/#")
}

/// Publishes at QoS `qos`, one message per `TICK`, until `stop`; then waits for every flow it
/// started to complete. Returns the client, still connected.
pub async fn steady_publisher(
    mut c: Client,
    qos: u8,
    sent: Arc<Sent>,
    stop: CancellationToken,
) -> Result<Client, String> {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut done = 0u64;
    let mut draining_since = None;
    loop {
        tokio::select! {
            _ = tick.tick(), if !stop.is_cancelled() => {
                let mut payload = vec![0x5a; PAYLOAD];
                payload[..8].copy_from_slice(&seq.to_be_bytes());
                c.publish(&steady_topic(qos, seq), qos, false, payload).await?;
                seq += 1;
                sent.published.store(seq, Ordering::Relaxed);
            }
            _ = stop.cancelled(), if draining_since.is_none() => {
                draining_since = Some(Instant::now());
            }
            ev = c.events.recv() => match ev {
                Some(Ev::Written) if qos == 0 => done += 1,
                Some(Ev::Acked { ok }) if qos > 0 => {
                    done += 1;
                    sent.acked.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        sent.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Ev::Closed(e)) => return Err(format!("{}: connection lost: {e}", c.id)),
                None => return Err(format!("{}: event loop gone", c.id)),
                Some(_) => {}
            },
            _ = tokio::time::sleep(Duration::from_millis(200)), if draining_since.is_some() => {}
        }
        if qos == 0 {
            sent.acked.store(done, Ordering::Relaxed);
        }
        if let Some(since) = draining_since {
            if done == seq {
                return Ok(c);
            }
            if since.elapsed() > SETTLE {
                return Err(format!(
                    "{}: {} of {seq} QoS {qos} flows incomplete {SETTLE:?} after the load stopped",
                    c.id,
                    seq - done
                ));
            }
        }
    }
}

/// What one steady subscriber received: per publisher QoS, how often each sequence number came.
#[derive(Default)]
pub struct Tally {
    /// Subscribed to slice 0 only (a persistent session).
    pub slice0: bool,
    pub counts: [Vec<u32>; 3],
    /// Delivered at another QoS than min(published, granted), or unreadable.
    pub wrong: Vec<String>,
}

impl Tally {
    pub fn record(&mut self, topic: &str, qos: u8, payload: &[u8], granted: u8) {
        let Some((q, slice)) = topic
            .strip_prefix("soak/steady/q")
            .and_then(|rest| rest.split_once('/'))
            .and_then(|(q, slice)| Some((q.parse::<u8>().ok()?, slice.parse::<u64>().ok()?)))
            .filter(|(q, _)| *q <= 2)
        else {
            self.wrong.push(format!("unexpected topic {topic}"));
            return;
        };
        if qos != q.min(granted) {
            self.wrong
                .push(format!("{topic} delivered at QoS {qos}, granted {granted}"));
        }
        let Some(seq) = payload
            .get(..8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
        else {
            self.wrong
                .push(format!("{topic}: {}-byte payload", payload.len()));
            return;
        };
        if seq % SLICES != slice {
            self.wrong.push(format!("message {seq} on {topic}"));
        }
        let counts = &mut self.counts[usize::from(q)];
        let seq = seq as usize;
        if counts.len() <= seq {
            counts.resize(seq + 1, 0);
        }
        counts[seq] += 1;
    }

    /// The sequence numbers among 0..published this subscriber should get.
    pub fn expected(&self, published: u64) -> impl Iterator<Item = u64> {
        let step = if self.slice0 { SLICES } else { 1 };
        (0..published).step_by(step as usize)
    }

    /// (missing, duplicated) among the messages 0..published of publisher QoS `q`.
    pub fn gaps(&self, q: u8, published: u64) -> (u64, u64) {
        let counts = &self.counts[usize::from(q)];
        let mut missing = 0;
        let mut duplicated = 0;
        for seq in self.expected(published) {
            match counts.get(seq as usize).copied().unwrap_or(0) {
                0 => missing += 1,
                1 => {}
                _ => duplicated += 1,
            }
        }
        (missing, duplicated)
    }
}

/// Reads until `stop`, tallying the steady messages (or, for the will watcher, the payloads).
pub async fn steady_subscriber(
    mut c: Client,
    granted: u8,
    tally: Arc<Mutex<Tally>>,
    wills: Option<Arc<Mutex<HashMap<String, u32>>>>,
    stop: CancellationToken,
) -> Result<Client, String> {
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => return Ok(c),
            ev = c.events.recv() => ev,
        };
        match ev {
            Some(Ev::Publish {
                topic,
                qos,
                payload,
            }) => match &wills {
                Some(wills) => {
                    let id = String::from_utf8_lossy(&payload).into_owned();
                    if topic != will_topic(&id) {
                        return Err(format!("will {id:?} on {topic}"));
                    }
                    *wills.lock().unwrap().entry(id).or_default() += 1;
                }
                None => tally.lock().unwrap().record(&topic, qos, &payload, granted),
            },
            Some(Ev::Closed(e)) => return Err(format!("{}: connection lost: {e}", c.id)),
            None => return Err(format!("{}: event loop gone", c.id)),
            Some(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The retainer and the churners.

/// Every 100 ms sets the retained message of one topic and clears the one half the rotation
/// away, so eight topics hold a message at any time. Returns the client and what each topic
/// should hold now.
pub async fn retainer(
    mut c: Client,
    stop: CancellationToken,
) -> Result<(Client, BTreeMap<String, Vec<u8>>), String> {
    let mut state = BTreeMap::new();
    let mut published = 0u64;
    let mut acked = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut step = 0usize;
    while !stop.is_cancelled() {
        tokio::select! {
            _ = tick.tick() => {
                let set = format!("soak/retained/{}", step % RETAINED_TOPICS);
                let clear = format!("soak/retained/{}", (step + RETAINED_TOPICS / 2) % RETAINED_TOPICS);
                let payload = format!("r{step}").into_bytes();
                c.publish(&set, 1, true, payload.clone()).await?;
                c.publish(&clear, 1, true, Vec::new()).await?;
                state.insert(set, payload);
                state.remove(&clear);
                published += 2;
                step += 1;
            }
            _ = stop.cancelled() => {}
            ev = c.events.recv() => match ev {
                Some(Ev::Acked { ok: true }) => acked += 1,
                Some(Ev::Acked { ok: false }) => return Err("retained message refused".into()),
                Some(Ev::Closed(e)) => return Err(format!("retainer: connection lost: {e}")),
                None => return Err("retainer: event loop gone".into()),
                Some(_) => {}
            },
        }
    }
    while acked < published {
        acked += 1;
        c.wait_for("retained PUBACK", |e| match e {
            Ev::Acked { ok: true } => Some(()),
            _ => None,
        })
        .await?;
    }
    Ok((c, state))
}

/// What the churners did, for the checks and the summary.
#[derive(Default)]
pub struct Churn {
    pub connections: AtomicU64,
    /// PUBLISH packets the churners received.
    pub received: AtomicU64,
    /// MQTT 5 persistent sessions left to expire.
    pub expiring: AtomicU64,
    /// Clients with a will that vanished (will expected) or disconnected (none expected).
    pub vanished_with_will: Mutex<HashSet<String>>,
    pub left_with_will: Mutex<HashSet<String>>,
    /// 3.1.1 persistent client ids used: their sessions stay.
    pub pool: Mutex<HashSet<String>>,
    pub failures: Mutex<Vec<String>>,
}

/// One churner: connects, does one of six things, leaves; again until `stop`.
pub async fn churner(addr: SocketAddr, w: usize, churn: Arc<Churn>, stop: CancellationToken) {
    let mut k = 0usize;
    while !stop.is_cancelled() {
        let id = format!("soak-c{w}-{k}");
        if let Err(e) = churn_once(addr, w, k, &id, &churn).await {
            churn.failures.lock().unwrap().push(e);
        }
        k += 1;
    }
}

async fn churn_once(
    addr: SocketAddr,
    w: usize,
    k: usize,
    id: &str,
    churn: &Churn,
) -> Result<(), String> {
    let linger = Duration::from_millis(200 + (k % 3) as u64 * 100);
    let round = k / 6;
    let received = match (w + k) % 6 {
        // 3.1.1, clean: takes the retained messages and QoS 0, publishes at each QoS, leaves.
        0 => {
            let mut c = connect_counted(addr, &Spec::new(id, false), churn).await?;
            c.subscribe("soak/retained/#", 1).await?;
            c.subscribe(&steady_filter(0), 0).await?;
            for qos in 0..=2 {
                c.publish(&format!("soak/churn/{w}"), qos, false, vec![qos; 32])
                    .await?;
            }
            c.linger(linger).await?;
            c.disconnect().await?
        }
        // MQTT 5 with a will: vanishes (will expected) or disconnects (none), in turn.
        1 => {
            let spec = Spec {
                will: true,
                ..Spec::new(id, true)
            };
            let mut c = connect_counted(addr, &spec, churn).await?;
            c.subscribe(&steady_filter(1), 1).await?;
            c.linger(linger).await?;
            if round.is_multiple_of(2) {
                churn
                    .vanished_with_will
                    .lock()
                    .unwrap()
                    .insert(id.to_string());
                c.vanish().await
            } else {
                churn.left_with_will.lock().unwrap().insert(id.to_string());
                c.disconnect().await?
            }
        }
        // 3.1.1 with a will, says goodbye: no will.
        2 => {
            let spec = Spec {
                will: true,
                ..Spec::new(id, false)
            };
            let mut c = connect_counted(addr, &spec, churn).await?;
            c.subscribe(&steady_filter(2), 2).await?;
            c.linger(linger).await?;
            churn.left_with_will.lock().unwrap().insert(id.to_string());
            c.disconnect().await?
        }
        // MQTT 5 persistent session with a short expiry: leaves (either way), comes back within
        // the expiry to its session and what was queued, leaves for good; the session expires.
        // Sessions that are resumed take QoS 2 messages at QoS 1 (`RESUMED_QOS`).
        3 => {
            let spec = Spec {
                clean: false,
                expiry: EXPIRY,
                ..Spec::new(id, true)
            };
            let mut c = connect_counted(addr, &spec, churn).await?;
            c.subscribe(&steady_topic(1, 0), 1).await?;
            c.subscribe(&steady_topic(2, 0), RESUMED_QOS).await?;
            let mut got = if round.is_multiple_of(2) {
                c.disconnect().await?
            } else {
                c.vanish().await
            };
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut c = connect_counted(addr, &spec, churn).await?;
            if !c.session_present {
                return Err(format!("{id}: session gone 1 s into its {EXPIRY} s expiry"));
            }
            c.linger(linger).await?;
            got += c.disconnect().await?;
            churn.expiring.fetch_add(1, Ordering::Relaxed);
            got
        }
        // 3.1.1 persistent session, one client id per churner: takes what queued while it was away.
        4 => {
            let pool_id = format!("soak-pool-{w}");
            let spec = Spec {
                clean: false,
                ..Spec::new(pool_id.clone(), false)
            };
            let mut c = connect_counted(addr, &spec, churn).await?;
            churn.pool.lock().unwrap().insert(pool_id);
            c.subscribe(&steady_topic(2, 0), RESUMED_QOS).await?;
            c.linger(linger).await?;
            if round.is_multiple_of(2) {
                c.disconnect().await?
            } else {
                c.vanish().await
            }
        }
        // 3.1.1 with a will, publishes at QoS 2 and vanishes: will expected.
        _ => {
            let spec = Spec {
                will: true,
                ..Spec::new(id, false)
            };
            let mut c = connect_counted(addr, &spec, churn).await?;
            c.publish(&format!("soak/churn/{w}"), 2, false, vec![2; 32])
                .await?;
            c.linger(linger).await?;
            churn
                .vanished_with_will
                .lock()
                .unwrap()
                .insert(id.to_string());
            c.vanish().await
        }
    };
    churn.received.fetch_add(received, Ordering::Relaxed);
    Ok(())
}

async fn connect_counted(addr: SocketAddr, spec: &Spec, churn: &Churn) -> Result<Client, String> {
    churn.connections.fetch_add(1, Ordering::Relaxed);
    Client::connect(addr, spec).await
}

//! A rumqttc client, MQTT 3.1.1 or 5.0, the way the soak drives it: its event loop runs in its own
//! task and stops at the first connection error instead of reconnecting, so a lost connection is
//! an event the soak sees; both versions' events are reduced to the few the soak needs.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::PROMPT;

/// What the soak needs to see of either protocol version's events.
#[derive(Debug)]
pub enum Ev {
    ConnAck {
        session_present: bool,
        accepted: bool,
    },
    /// Granted QoS per filter, `None` where refused.
    SubAck(Vec<Option<u8>>),
    Publish {
        topic: String,
        qos: u8,
        payload: bytes::Bytes,
    },
    /// A PUBLISH written to the broker (for QoS 0 the end of its flow).
    Written,
    /// PUBACK or PUBCOMP: the broker has the message; `ok` unless it refused it (MQTT 5).
    Acked { ok: bool },
    /// The event loop ended: the connection is gone.
    Closed(String),
}

/// How one client connects.
#[derive(Clone)]
pub struct Spec {
    pub id: String,
    pub v5: bool,
    pub clean: bool,
    /// MQTT 5 Session Expiry Interval; 0 for none.
    pub expiry: u32,
    /// A will on `soak/will/{id}` with the client id as payload.
    pub will: bool,
}

impl Spec {
    pub fn new(id: impl Into<String>, v5: bool) -> Spec {
        Spec {
            id: id.into(),
            v5,
            clean: true,
            expiry: 0,
            will: false,
        }
    }
}

/// What a test asks of a client, either version.
enum Request {
    Subscribe(String, u8),
    /// Topic, QoS, retain, payload.
    Publish(String, u8, bool, Vec<u8>),
    Disconnect,
}

enum Handle {
    V3(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// One connected client; its event loop runs in its own task (aborted on drop, which closes the
/// socket without DISCONNECT) and stops at the first connection error instead of reconnecting.
pub struct Client {
    pub id: String,
    handle: Handle,
    pub events: mpsc::UnboundedReceiver<Ev>,
    task: JoinHandle<()>,
    pub session_present: bool,
    /// PUBLISH packets received while waiting for something else.
    pub received: u64,
}

pub fn will_topic(id: &str) -> String {
    format!("soak/will/{id}")
}

impl Client {
    pub async fn connect(addr: SocketAddr, spec: &Spec) -> Result<Client, String> {
        let (tx, events) = mpsc::unbounded_channel();
        let host = addr.ip().to_string();
        let (handle, task) = if spec.v5 {
            use rumqttc::v5::mqttbytes::{v5::LastWill, QoS};
            let mut o = rumqttc::v5::MqttOptions::new(&spec.id, host, addr.port());
            o.set_clean_start(spec.clean)
                .set_keep_alive(Duration::from_secs(30));
            if spec.expiry > 0 {
                o.set_session_expiry_interval(Some(spec.expiry));
            }
            if spec.will {
                let will = LastWill::new(
                    will_topic(&spec.id),
                    spec.id.clone(),
                    QoS::AtLeastOnce,
                    false,
                    None,
                );
                o.set_last_will(will);
            }
            let (client, el) = rumqttc::v5::AsyncClient::new(o, 64);
            (Handle::V5(client), tokio::spawn(run_v5(el, tx)))
        } else {
            let mut o = rumqttc::MqttOptions::new(&spec.id, host, addr.port());
            o.set_clean_session(spec.clean)
                .set_keep_alive(Duration::from_secs(30));
            if spec.will {
                let will = rumqttc::LastWill::new(
                    will_topic(&spec.id),
                    spec.id.clone(),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                );
                o.set_last_will(will);
            }
            let (client, el) = rumqttc::AsyncClient::new(o, 64);
            (Handle::V3(client), tokio::spawn(run_v3(el, tx)))
        };
        let mut c = Client {
            id: spec.id.clone(),
            handle,
            events,
            task,
            session_present: false,
            received: 0,
        };
        let (present, accepted) = c
            .wait_for("CONNACK", |e| match e {
                Ev::ConnAck {
                    session_present,
                    accepted,
                } => Some((*session_present, *accepted)),
                _ => None,
            })
            .await?;
        if !accepted {
            return Err(format!("{}: CONNACK refused", c.id));
        }
        c.session_present = present;
        Ok(c)
    }

    /// The first event `pick` takes, within `PROMPT`; PUBLISH packets on the way are counted.
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&Ev) -> Option<T>,
    ) -> Result<T, String> {
        let deadline = tokio::time::Instant::now() + PROMPT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return Err(format!("{}: no {what} within {PROMPT:?}", self.id)),
                Ok(None) => return Err(format!("{}: event loop gone before {what}", self.id)),
                Ok(Some(ev)) => {
                    if let Some(t) = pick(&ev) {
                        return Ok(t);
                    }
                    match ev {
                        Ev::Publish { .. } => self.received += 1,
                        Ev::Closed(e) => {
                            return Err(format!("{}: connection lost before {what}: {e}", self.id))
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Hands `req` to the event loop; if the loop is gone, says why (its last event).
    async fn request(&mut self, what: &str, req: Request) -> Result<(), String> {
        let sent = match (&self.handle, req) {
            (Handle::V3(c), Request::Subscribe(f, q)) => c.subscribe(f, v3_qos(q)).await,
            (Handle::V3(c), Request::Publish(t, q, r, p)) => c.publish(t, v3_qos(q), r, p).await,
            (Handle::V3(c), Request::Disconnect) => c.disconnect().await,
            (Handle::V5(c), req) => {
                let sent = match req {
                    Request::Subscribe(f, q) => c.subscribe(f, v5_qos(q)).await,
                    Request::Publish(t, q, r, p) => c.publish(t, v5_qos(q), r, p).await,
                    Request::Disconnect => c.disconnect().await,
                };
                // The v5 error type is another one; only whether it failed matters here.
                return match sent {
                    Ok(()) => Ok(()),
                    Err(_) => Err(self.gone(what)),
                };
            }
        };
        sent.map_err(|_| self.gone(what))
    }

    /// Why the event loop ended, from the events it left.
    fn gone(&mut self, what: &str) -> String {
        while let Ok(ev) = self.events.try_recv() {
            if let Ev::Closed(e) = ev {
                return format!("{}: connection lost before {what}: {e}", self.id);
            }
        }
        format!("{}: event loop gone before {what}", self.id)
    }

    /// Subscribes and checks the broker granted `qos`.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> Result<(), String> {
        self.request("SUBSCRIBE", Request::Subscribe(filter.to_string(), qos))
            .await?;
        let granted = self
            .wait_for("SUBACK", |e| match e {
                Ev::SubAck(codes) => Some(codes.clone()),
                _ => None,
            })
            .await?;
        if granted != [Some(qos)] {
            return Err(format!(
                "{}: SUBSCRIBE {filter} QoS {qos}: {granted:?}",
                self.id
            ));
        }
        Ok(())
    }

    pub async fn publish(
        &mut self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), String> {
        self.request(
            "PUBLISH",
            Request::Publish(topic.to_string(), qos, retain, payload),
        )
        .await
    }

    /// Reads for `period`, counting PUBLISH packets; a lost connection is an error.
    pub async fn linger(&mut self, period: Duration) -> Result<(), String> {
        let until = tokio::time::Instant::now() + period;
        loop {
            match tokio::time::timeout_at(until, self.events.recv()).await {
                Err(_) => return Ok(()),
                Ok(Some(Ev::Publish { .. })) => self.received += 1,
                Ok(Some(Ev::Closed(e))) => {
                    return Err(format!("{}: connection lost: {e}", self.id))
                }
                Ok(None) => return Err(format!("{}: event loop gone", self.id)),
                Ok(Some(_)) => {}
            }
        }
    }

    /// Sends DISCONNECT and waits until the broker has closed the connection, so the broker has
    /// done all it does on a disconnect (session detached, will discarded) when this returns.
    pub async fn disconnect(mut self) -> Result<u64, String> {
        self.request("DISCONNECT", Request::Disconnect).await?;
        let deadline = tokio::time::Instant::now() + PROMPT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => {
                    return Err(format!(
                        "{}: still connected {PROMPT:?} after DISCONNECT",
                        self.id
                    ))
                }
                Ok(None) | Ok(Some(Ev::Closed(_))) => return Ok(self.received),
                Ok(Some(Ev::Publish { .. })) => self.received += 1,
                Ok(Some(_)) => {}
            }
        }
    }

    /// Drops the socket without DISCONNECT, as a crashed client or a lost network does.
    pub async fn vanish(mut self) -> u64 {
        self.task.abort();
        let _ = (&mut self.task).await;
        self.received
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn v3_qos(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn v5_qos(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

async fn run_v3(mut el: rumqttc::EventLoop, tx: mpsc::UnboundedSender<Ev>) {
    use rumqttc::{ConnectReturnCode, Event, Incoming, Outgoing, SubscribeReasonCode};
    loop {
        let ev = match el.poll().await {
            Err(e) => {
                let _ = tx.send(Ev::Closed(e.to_string()));
                return;
            }
            Ok(Event::Incoming(Incoming::ConnAck(a))) => Ev::ConnAck {
                session_present: a.session_present,
                accepted: a.code == ConnectReturnCode::Success,
            },
            Ok(Event::Incoming(Incoming::SubAck(a))) => Ev::SubAck(
                a.return_codes
                    .iter()
                    .map(|c| match c {
                        SubscribeReasonCode::Success(q) => Some(*q as u8),
                        SubscribeReasonCode::Failure => None,
                    })
                    .collect(),
            ),
            Ok(Event::Incoming(Incoming::Publish(p))) => Ev::Publish {
                topic: p.topic,
                qos: p.qos as u8,
                payload: p.payload,
            },
            Ok(Event::Incoming(Incoming::PubAck(_) | Incoming::PubComp(_))) => {
                Ev::Acked { ok: true }
            }
            Ok(Event::Outgoing(Outgoing::Publish(_))) => Ev::Written,
            Ok(_) => continue,
        };
        if tx.send(ev).is_err() {
            return;
        }
    }
}

async fn run_v5(mut el: rumqttc::v5::EventLoop, tx: mpsc::UnboundedSender<Ev>) {
    use rumqttc::v5::mqttbytes::v5::{
        ConnectReturnCode, Packet, PubAckReason, PubCompReason, SubscribeReasonCode,
    };
    use rumqttc::v5::Event;
    use rumqttc::Outgoing;
    loop {
        let ev = match el.poll().await {
            Err(e) => {
                let _ = tx.send(Ev::Closed(e.to_string()));
                return;
            }
            Ok(Event::Incoming(Packet::ConnAck(a))) => Ev::ConnAck {
                session_present: a.session_present,
                accepted: a.code == ConnectReturnCode::Success,
            },
            Ok(Event::Incoming(Packet::SubAck(a))) => Ev::SubAck(
                a.return_codes
                    .iter()
                    .map(|c| match c {
                        SubscribeReasonCode::Success(q) => Some(*q as u8),
                        _ => None,
                    })
                    .collect(),
            ),
            Ok(Event::Incoming(Packet::Publish(p))) => Ev::Publish {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                qos: p.qos as u8,
                payload: p.payload,
            },
            Ok(Event::Incoming(Packet::PubAck(a))) => Ev::Acked {
                ok: matches!(
                    a.reason,
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                ),
            },
            Ok(Event::Incoming(Packet::PubComp(a))) => Ev::Acked {
                ok: a.reason == PubCompReason::Success,
            },
            Ok(Event::Outgoing(Outgoing::Publish(_))) => Ev::Written,
            Ok(_) => continue,
        };
        if tx.send(ev).is_err() {
            return;
        }
    }
}

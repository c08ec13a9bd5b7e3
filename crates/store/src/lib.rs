//! # petrel-store: what survives a restart
//!
//! A [`DiskStore`] implements the engine's [`Store`] hooks over an embedded fjall keyspace (an
//! LSM tree with a write-ahead journal; ARCHITECTURE.md has the measurements behind choosing
//! it over redb). At start, [`DiskStore::open`] reads everything back for
//! `Broker::restore`.
//!
//! ```text
//! partition       key                           value (first byte: record version, 1)
//! meta            "format"                      "petrel-store 1"
//! sessions        client id                     expiry interval u32, offline-until ms u64
//! subscriptions   client id, 0x00, filter       options byte, subscription id u32
//! retained        topic                         expires-at ms u64, the message as a v5 PUBLISH
//! ```
//!
//! Times are wall-clock milliseconds since the Unix epoch (0: none), so a session's expiry
//! keeps counting while the broker is down. A record that does not decode stops the start
//! with its partition and key named: stored data is never dropped silently.
//!
//! Durability of each write follows [`Fsync`]: `Always` syncs the journal after every change,
//! `Every` from a background thread at an interval, `Never` only hands writes to the OS (they
//! survive a crash of the process, not of the machine).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use fjall::{Config, Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode};
use petrel_codec::{
    Packet, Properties, ProtocolVersion, PublishExtra, PublishRef, QoS, RetainHandling,
    SubscriptionOptions, TopicFilter,
};
use petrel_engine::message::Message;
use petrel_engine::session::Subscription;
use petrel_engine::store::{Store, StoredSession};

/// The on-disk format this build writes and reads.
pub const FORMAT: &str = "petrel-store 1";
const RECORD_VERSION: u8 = 1;

/// When writes reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// After every change.
    Always,
    /// At most this long after a change.
    Every(Duration),
    /// Left to the OS: safe if the process dies, not if the machine does.
    Never,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store in {dir}: {source}")]
    Open {
        dir: PathBuf,
        #[source]
        source: fjall::Error,
    },
    #[error(
        "the store in {dir} has format {found:?}; this petrel reads {FORMAT:?}. \
         Use the petrel version that wrote it, or move the directory away to start empty"
    )]
    Format { dir: PathBuf, found: String },
    #[error(
        "the store in {dir} is damaged: {partition} record {key:?}: {why}. petrel does not \
         discard stored data; move the directory away to start empty, or restore a backup"
    )]
    Corrupt {
        dir: PathBuf,
        partition: &'static str,
        key: String,
        why: String,
    },
    #[error("cannot read the store in {dir}: {source}")]
    Read {
        dir: PathBuf,
        #[source]
        source: fjall::Error,
    },
}

/// What a store held at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub sessions: Vec<StoredSession>,
    pub retained: Vec<Message>,
}

pub struct DiskStore {
    keyspace: Keyspace,
    sessions: PartitionHandle,
    subscriptions: PartitionHandle,
    retained: PartitionHandle,
    fsync: Fsync,
    stop: Arc<AtomicBool>,
    syncer: Option<std::thread::JoinHandle<()>>,
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An engine instant as wall-clock milliseconds (0 for none).
fn to_wall(at: Option<Instant>) -> u64 {
    let Some(at) = at else { return 0 };
    let now = Instant::now();
    let wall = SystemTime::now();
    let wall = if at >= now {
        wall + (at - now)
    } else {
        wall - (now - at)
    };
    unix_ms(wall).max(1)
}

/// Wall-clock milliseconds as an engine instant (`None` for 0).
fn from_wall(ms: u64) -> Option<Instant> {
    if ms == 0 {
        return None;
    }
    let now_ms = unix_ms(SystemTime::now());
    let now = Instant::now();
    Some(if ms >= now_ms {
        now + Duration::from_millis(ms - now_ms)
    } else {
        now.checked_sub(Duration::from_millis(now_ms - ms))
            .unwrap_or(now)
    })
}

fn options_byte(o: SubscriptionOptions) -> u8 {
    (o.qos as u8)
        | (u8::from(o.no_local) << 2)
        | (u8::from(o.retain_as_published) << 3)
        | ((o.retain_handling as u8) << 4)
}

fn options_from(byte: u8) -> Option<SubscriptionOptions> {
    let mut o = SubscriptionOptions::new(QoS::from_u8(byte & 0x03)?);
    o.no_local = byte & 0x04 != 0;
    o.retain_as_published = byte & 0x08 != 0;
    o.retain_handling = match (byte >> 4) & 0x03 {
        0 => RetainHandling::OnSubscribe,
        1 => RetainHandling::OnNewSubscription,
        2 => RetainHandling::Never,
        _ => return None,
    };
    Some(o)
}

fn subscription_key(client_id: &str, filter: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(client_id.len() + 1 + filter.len());
    k.extend_from_slice(client_id.as_bytes());
    // MQTT strings never contain U+0000 [MQTT-1.5.4-2]: a safe separator.
    k.push(0);
    k.extend_from_slice(filter.as_bytes());
    k
}

fn session_prefix(client_id: &str) -> Vec<u8> {
    let mut k = client_id.as_bytes().to_vec();
    k.push(0);
    k
}

fn session_record(expiry_interval: u32, offline_until: u64) -> [u8; 13] {
    let mut v = [0u8; 13];
    v[0] = RECORD_VERSION;
    v[1..5].copy_from_slice(&expiry_interval.to_be_bytes());
    v[5..13].copy_from_slice(&offline_until.to_be_bytes());
    v
}

/// A retained message: its expiry and the message as a v5 PUBLISH frame (QoS, retain flag,
/// topic, properties and payload in the codec's own format).
fn message_record(message: &Message) -> Vec<u8> {
    let mut frame = BytesMut::new();
    let publish = PublishRef {
        dup: false,
        qos: message.qos,
        retain: true,
        topic: &message.topic,
        packet_id: (message.qos != QoS::AtMostOnce).then_some(petrel_codec::PacketId::MIN),
        properties: &message.properties,
        extra: PublishExtra::default(),
        payload: &message.payload,
    };
    // A message that came in within the packet size limit always re-encodes.
    let _ = publish.encode(ProtocolVersion::V5, &mut frame);
    let mut v = Vec::with_capacity(9 + frame.len());
    v.push(RECORD_VERSION);
    v.extend_from_slice(&to_wall(message.expires_at).to_be_bytes());
    v.extend_from_slice(&frame);
    v
}

fn decode_message(value: &[u8]) -> Result<Message, String> {
    if value.len() < 9 || value[0] != RECORD_VERSION {
        return Err(format!("unknown record version {:?}", value.first()));
    }
    let expires = u64::from_be_bytes(value[1..9].try_into().map_err(|_| "short record")?);
    let mut frame = BytesMut::from(&value[9..]);
    let packet = petrel_codec::decode(&mut frame, ProtocolVersion::V5, u32::MAX)
        .map_err(|e| format!("stored PUBLISH does not decode: {e}"))?
        .ok_or("stored PUBLISH is truncated")?;
    let Packet::Publish(p) = packet else {
        return Err("stored record is not a PUBLISH".to_owned());
    };
    let mut m = Message::new(
        p.topic,
        p.payload,
        p.qos,
        true,
        if p.properties.is_empty() {
            Properties::default()
        } else {
            p.properties
        },
        0,
    );
    m.expires_at = from_wall(expires);
    Ok(m)
}

impl DiskStore {
    /// Opens (or creates) the store in `dir` and reads back what it holds.
    pub fn open(dir: &Path, fsync: Fsync) -> Result<(DiskStore, Loaded), StoreError> {
        let open_err = |source| StoreError::Open {
            dir: dir.to_owned(),
            source,
        };
        let keyspace = Config::new(dir).open().map_err(open_err)?;
        let part = |name: &str| {
            keyspace
                .open_partition(name, PartitionCreateOptions::default())
                .map_err(open_err)
        };
        let meta = part("meta")?;
        let sessions = part("sessions")?;
        let subscriptions = part("subscriptions")?;
        let retained = part("retained")?;
        let read_err = |source| StoreError::Read {
            dir: dir.to_owned(),
            source,
        };
        match meta.get("format").map_err(read_err)? {
            Some(found) if &*found != FORMAT.as_bytes() => {
                return Err(StoreError::Format {
                    dir: dir.to_owned(),
                    found: String::from_utf8_lossy(&found).into_owned(),
                })
            }
            Some(_) => {}
            None => {
                meta.insert("format", FORMAT).map_err(open_err)?;
                keyspace.persist(PersistMode::SyncAll).map_err(open_err)?;
            }
        }

        let corrupt = |partition: &'static str, key: &[u8], why: String| StoreError::Corrupt {
            dir: dir.to_owned(),
            partition,
            key: String::from_utf8_lossy(key).into_owned(),
            why,
        };
        let mut loaded = Loaded::default();
        let mut by_client = std::collections::HashMap::new();
        for item in sessions.iter() {
            let (key, value) = item.map_err(read_err)?;
            if value.len() != 13 || value[0] != RECORD_VERSION {
                return Err(corrupt("sessions", &key, "bad session record".into()));
            }
            let client_id = std::str::from_utf8(&key)
                .map_err(|_| corrupt("sessions", &key, "client id is not UTF-8".into()))?
                .to_owned();
            let expiry = u32::from_be_bytes(value[1..5].try_into().unwrap_or_default());
            let until = u64::from_be_bytes(value[5..13].try_into().unwrap_or_default());
            by_client.insert(client_id.clone(), loaded.sessions.len());
            loaded.sessions.push(StoredSession {
                client_id,
                expiry_interval: expiry,
                expires_at: from_wall(until),
                subscriptions: Vec::new(),
            });
        }
        for item in subscriptions.iter() {
            let (key, value) = item.map_err(read_err)?;
            let Some(split) = key.iter().position(|&b| b == 0) else {
                return Err(corrupt("subscriptions", &key, "no separator".into()));
            };
            let (client, filter) = (&key[..split], &key[split + 1..]);
            let bad = |why: &str| corrupt("subscriptions", &key, why.to_owned());
            if value.len() != 6 || value[0] != RECORD_VERSION {
                return Err(bad("bad subscription record"));
            }
            let options = options_from(value[1]).ok_or_else(|| bad("bad options"))?;
            let id = u32::from_be_bytes(value[2..6].try_into().unwrap_or_default());
            let filter = std::str::from_utf8(filter)
                .ok()
                .and_then(|f| TopicFilter::new(f).ok())
                .ok_or_else(|| bad("invalid topic filter"))?;
            let client = std::str::from_utf8(client).map_err(|_| bad("client id is not UTF-8"))?;
            // Subscriptions of a session with no record are left from a session removed in
            // the same instant as a crash; the session is gone, so are they.
            if let Some(&i) = by_client.get(client) {
                loaded.sessions[i]
                    .subscriptions
                    .push((filter, Subscription { options, id }));
            }
        }
        for item in retained.iter() {
            let (key, value) = item.map_err(read_err)?;
            let message = decode_message(&value).map_err(|why| corrupt("retained", &key, why))?;
            loaded.retained.push(message);
        }

        let stop = Arc::new(AtomicBool::new(false));
        let syncer = match fsync {
            Fsync::Every(interval) => {
                let keyspace = keyspace.clone();
                let stop = stop.clone();
                Some(std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(interval);
                        if let Err(e) = keyspace.persist(PersistMode::SyncData) {
                            tracing::error!(error = %e, "store: journal sync failed");
                        }
                    }
                }))
            }
            _ => None,
        };
        Ok((
            DiskStore {
                keyspace,
                sessions,
                subscriptions,
                retained,
                fsync,
                stop,
                syncer,
            },
            loaded,
        ))
    }

    /// Bytes the store takes on disk.
    pub fn disk_space(&self) -> u64 {
        self.keyspace.disk_space()
    }

    /// Makes a change as durable as the policy asks.
    fn written(&self, what: &str, result: fjall::Result<()>) {
        let result = result.and_then(|()| match self.fsync {
            Fsync::Always => self.keyspace.persist(PersistMode::SyncData),
            Fsync::Never => self.keyspace.persist(PersistMode::Buffer),
            Fsync::Every(_) => self.keyspace.persist(PersistMode::Buffer),
        });
        if let Err(e) = result {
            tracing::error!(error = %e, what, "store: write failed; the change lives in memory only");
        }
    }

    fn remove_session(&self, client_id: &str) -> fjall::Result<()> {
        let mut batch = self.keyspace.batch();
        batch.remove(&self.sessions, client_id.as_bytes());
        for item in self.subscriptions.prefix(session_prefix(client_id)) {
            let (key, _) = item?;
            batch.remove(&self.subscriptions, key);
        }
        batch.commit()
    }
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.syncer.take() {
            let _ = t.join();
        }
        let _ = self.keyspace.persist(PersistMode::SyncAll);
    }
}

impl Store for DiskStore {
    fn session_opened(&self, client_id: &str, expiry_interval: u32) {
        let result = if expiry_interval == 0 {
            self.remove_session(client_id)
        } else {
            // Connected: the expiry starts when the client leaves.
            self.sessions
                .insert(client_id.as_bytes(), session_record(expiry_interval, 0))
        };
        self.written("session", result);
    }

    fn session_offline(&self, client_id: &str, expires_at: Option<Instant>) {
        let result = match self.sessions.get(client_id.as_bytes()) {
            Ok(Some(v)) if v.len() == 13 => {
                let expiry = u32::from_be_bytes(v[1..5].try_into().unwrap_or_default());
                self.sessions.insert(
                    client_id.as_bytes(),
                    session_record(expiry, to_wall(expires_at)),
                )
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        self.written("session", result);
    }

    fn session_removed(&self, client_id: &str) {
        let result = self.remove_session(client_id);
        self.written("session", result);
    }

    fn subscription_added(&self, client_id: &str, filter: &TopicFilter, sub: Subscription) {
        let mut v = [0u8; 6];
        v[0] = RECORD_VERSION;
        v[1] = options_byte(sub.options);
        v[2..6].copy_from_slice(&sub.id.to_be_bytes());
        let result = self
            .subscriptions
            .insert(subscription_key(client_id, filter), v);
        self.written("subscription", result);
    }

    fn subscription_removed(&self, client_id: &str, filter: &TopicFilter) {
        let result = self
            .subscriptions
            .remove(subscription_key(client_id, filter));
        self.written("subscription", result);
    }

    fn retained_set(&self, message: &Message) {
        let result = self
            .retained
            .insert(message.topic.as_bytes(), message_record(message));
        self.written("retained message", result);
    }

    fn retained_cleared(&self, topic: &str) {
        let result = self.retained.remove(topic.as_bytes());
        self.written("retained message", result);
    }
}

/// Bytes of a retained message as stored, for tests and tools.
pub fn encode_retained(message: &Message) -> Bytes {
    Bytes::from(message_record(message))
}

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
//! messages        message id u64                as retained: one record however many queues
//! queue           client id, 0x00, seq u64      message id, QoS, retain, subscription ids
//! inflight        client id, 0x00, seq u64      1 sent / 2 PUBREC received, packet id u16
//! inbound         client id, 0x00, packet id    (QoS 2 received, PUBREL not yet)
//! ```
//!
//! A QoS 1/2 message for a persistent session is written once to `messages` and referenced
//! from each session's `queue`; the last reference deleted deletes it. Every write takes a
//! durability token; one commit thread makes everything written so far durable at once (group
//! commit) and the broker holds the publisher's PUBACK/PUBREC until its token is covered.
//!
//! Times are wall-clock milliseconds since the Unix epoch (0: none), so a session's expiry
//! keeps counting while the broker is down. A record that does not decode stops the start
//! with its partition and key named: stored data is never dropped silently.
//!
//! Durability follows [`Fsync`]: `Always` syncs the journal before a token counts as durable,
//! `Every` hands writes to the OS before it counts and syncs at an interval, `Never` only
//! hands them to the OS (they survive a crash of the process, not of the machine).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use fjall::{Config, Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode};
use petrel_codec::{LastWill, PacketId};
use petrel_codec::{
    Packet, Properties, ProtocolVersion, PublishExtra, PublishRef, QoS, RetainHandling,
    SubscriptionOptions, TopicFilter,
};
use petrel_engine::message::Message;
use petrel_engine::session::{Delivery, Subscription};
use petrel_engine::store::{Store, StoredDelivery, StoredSession, StoredStage};

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
    #[error("cannot start the store's commit thread: {0}")]
    Thread(String),
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

/// Lock stripes for message reference counts.
const REF_STRIPES: usize = 64;

fn stripe(id: u64) -> usize {
    (id % REF_STRIPES as u64) as usize
}

/// Durability tokens and the group commit: every write takes the next token; one thread
/// makes everything written so far durable in one go and advances `durable`, waking whoever
/// waits for a token it covers. Under load many writes share one sync.
struct Commit {
    written: AtomicU64,
    durable: AtomicU64,
    waiters: Mutex<Vec<(u64, Waker)>>,
    kick: Mutex<bool>,
    kicked: Condvar,
    stop: AtomicBool,
}

pub struct DiskStore {
    keyspace: Keyspace,
    sessions: PartitionHandle,
    subscriptions: PartitionHandle,
    retained: PartitionHandle,
    messages: PartitionHandle,
    queue: PartitionHandle,
    inflight: PartitionHandle,
    inbound: PartitionHandle,
    wills: PartitionHandle,
    /// References from queue entries to each stored message, in stripes by message id. A
    /// message's record is inserted and deleted under its stripe's lock, so it is never
    /// deleted while a new reference to it is being written; different messages do not
    /// contend.
    refs: Vec<Mutex<HashMap<u64, u32>>>,
    next_message: AtomicU64,
    commit: Arc<Commit>,
    committer: Option<std::thread::JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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

/// `client id, 0x00, suffix`: MQTT strings never contain U+0000 [MQTT-1.5.4-2], so the
/// separator keeps one client's keys together and apart from every other's.
fn client_key(client_id: &str, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(client_id.len() + 1 + suffix.len());
    k.extend_from_slice(client_id.as_bytes());
    k.push(0);
    k.extend_from_slice(suffix);
    k
}

fn split_client_key(key: &[u8]) -> Option<(&str, &[u8])> {
    let split = key.iter().position(|&b| b == 0)?;
    let client = std::str::from_utf8(&key[..split]).ok()?;
    Some((client, &key[split + 1..]))
}

fn session_record(expiry_interval: u32, offline_until: u64) -> [u8; 13] {
    let mut v = [0u8; 13];
    v[0] = RECORD_VERSION;
    v[1..5].copy_from_slice(&expiry_interval.to_be_bytes());
    v[5..13].copy_from_slice(&offline_until.to_be_bytes());
    v
}

/// A message: its expiry and the message as a v5 PUBLISH frame (QoS, retain flag, topic,
/// properties and payload in the codec's own format).
fn message_record(message: &Message) -> Vec<u8> {
    publish_record(
        message.expires_at,
        message.qos,
        message.retain,
        &message.topic,
        &message.properties,
        &message.payload,
    )
}

/// The record layout shared by messages and wills: a time (wall-clock ms, 0 for none), then
/// the message as a v5 PUBLISH frame.
fn publish_record(
    at: Option<Instant>,
    qos: QoS,
    retain: bool,
    topic: &str,
    properties: &Properties,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = BytesMut::new();
    let publish = PublishRef {
        dup: false,
        qos,
        retain,
        topic,
        packet_id: (qos != QoS::AtMostOnce).then_some(PacketId::MIN),
        properties,
        extra: PublishExtra::default(),
        payload,
    };
    // A message that came in within the packet size limit always re-encodes.
    let _ = publish.encode(ProtocolVersion::V5, &mut frame);
    let mut v = Vec::with_capacity(9 + frame.len());
    v.push(RECORD_VERSION);
    v.extend_from_slice(&to_wall(at).to_be_bytes());
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
        p.retain,
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

/// A will waiting for its delay: when it is due, then the will as a v5 PUBLISH frame (its
/// Will Delay Interval left out: a PUBLISH may not carry one).
fn will_record(at: Instant, will: &LastWill) -> Vec<u8> {
    let mut properties = will.properties.clone();
    if properties.will_delay_interval.is_some() {
        properties.will_delay_interval = None;
    }
    publish_record(
        Some(at),
        will.qos,
        will.retain,
        &will.topic,
        &properties,
        &will.payload,
    )
}

fn decode_will(value: &[u8]) -> Result<(Instant, LastWill), String> {
    let message = decode_message(value)?;
    let at = message.expires_at.unwrap_or_else(Instant::now);
    // The record's time is when the will is due; the message's own expiry travels in its
    // properties and starts when the will is published.
    let properties = message.properties;
    Ok((
        at,
        LastWill {
            topic: message.topic,
            payload: message.payload,
            qos: message.qos,
            retain: message.retain,
            properties,
        },
    ))
}

/// A queue entry: the stored message it is, and how it goes to this session.
fn entry_record(message_id: u64, d: &Delivery) -> Vec<u8> {
    let ids = d.subscription_ids();
    let mut v = Vec::with_capacity(12 + 4 * ids.len());
    v.push(RECORD_VERSION);
    v.extend_from_slice(&message_id.to_be_bytes());
    v.push(d.qos as u8);
    v.push(u8::from(d.retain));
    v.push(u8::try_from(ids.len()).unwrap_or(u8::MAX));
    for id in ids.iter().take(usize::from(u8::MAX)) {
        v.extend_from_slice(&id.to_be_bytes());
    }
    v
}

struct Entry {
    message_id: u64,
    qos: QoS,
    retain: bool,
    subscription_ids: Vec<u32>,
}

fn decode_entry(v: &[u8]) -> Option<Entry> {
    if v.len() < 12 || v[0] != RECORD_VERSION {
        return None;
    }
    let n = usize::from(v[11]);
    if v.len() != 12 + 4 * n {
        return None;
    }
    Some(Entry {
        message_id: u64::from_be_bytes(v[1..9].try_into().ok()?),
        qos: QoS::from_u8(v[9]).filter(|q| *q != QoS::AtMostOnce)?,
        retain: v[10] != 0,
        subscription_ids: v[12..]
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    })
}

/// The in-flight state of a queue entry: 1 = sent with the packet id, 2 = PUBREC received.
fn stage_record(stage: u8, packet_id: u16) -> [u8; 4] {
    let id = packet_id.to_be_bytes();
    [RECORD_VERSION, stage, id[0], id[1]]
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
        let messages = part("messages")?;
        let queue = part("queue")?;
        let inflight = part("inflight")?;
        let inbound = part("inbound")?;
        let wills = part("wills")?;
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
        let mut by_client: HashMap<String, usize> = HashMap::new();
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
                deliveries: Vec::new(),
                inbound_qos2: Vec::new(),
                pending_will: None,
            });
        }
        // Records of a session with no session record belong to a session removed as the
        // broker died: it is gone, so are they.
        for item in subscriptions.iter() {
            let (key, value) = item.map_err(read_err)?;
            let bad = |why: &str| corrupt("subscriptions", &key, why.to_owned());
            let (client, filter) = split_client_key(&key).ok_or_else(|| bad("no separator"))?;
            if value.len() != 6 || value[0] != RECORD_VERSION {
                return Err(bad("bad subscription record"));
            }
            let options = options_from(value[1]).ok_or_else(|| bad("bad options"))?;
            let id = u32::from_be_bytes(value[2..6].try_into().unwrap_or_default());
            let filter = std::str::from_utf8(filter)
                .ok()
                .and_then(|f| TopicFilter::new(f).ok())
                .ok_or_else(|| bad("invalid topic filter"))?;
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
        for item in inbound.iter() {
            let (key, _) = item.map_err(read_err)?;
            let (client, id) = split_client_key(&key)
                .filter(|(_, id)| id.len() == 2)
                .ok_or_else(|| corrupt("inbound", &key, "bad key".into()))?;
            if let Some(&i) = by_client.get(client) {
                loaded.sessions[i]
                    .inbound_qos2
                    .push(u16::from_be_bytes([id[0], id[1]]));
            }
        }
        for item in wills.iter() {
            let (key, value) = item.map_err(read_err)?;
            let client = std::str::from_utf8(&key)
                .map_err(|_| corrupt("wills", &key, "client id is not UTF-8".into()))?;
            let (at, will) = decode_will(&value).map_err(|why| corrupt("wills", &key, why))?;
            if let Some(&i) = by_client.get(client) {
                loaded.sessions[i].pending_will = Some((at, will));
            }
        }
        let mut stages: HashMap<Vec<u8>, StoredStage> = HashMap::new();
        for item in inflight.iter() {
            let (key, v) = item.map_err(read_err)?;
            let pid = if v.len() == 4 && v[0] == RECORD_VERSION {
                u16::from_be_bytes([v[2], v[3]])
            } else {
                0
            };
            let stage = match (v.get(1), pid) {
                (_, 0) => return Err(corrupt("inflight", &key, "bad record".into())),
                (Some(1), pid) => StoredStage::Published(pid),
                (Some(2), pid) => StoredStage::Released(pid),
                _ => return Err(corrupt("inflight", &key, "bad stage".into())),
            };
            stages.insert(key.to_vec(), stage);
        }
        let mut stored_messages: HashMap<u64, Arc<Message>> = HashMap::new();
        let mut max_id = 0;
        for item in messages.iter() {
            let (key, value) = item.map_err(read_err)?;
            let id = <[u8; 8]>::try_from(&*key)
                .map(u64::from_be_bytes)
                .map_err(|_| corrupt("messages", &key, "bad key".into()))?;
            let message = decode_message(&value).map_err(|why| corrupt("messages", &key, why))?;
            let _ = message.store_id.set(id);
            max_id = max_id.max(id);
            stored_messages.insert(id, Arc::new(message));
        }
        let mut refs: HashMap<u64, u32> = HashMap::new();
        for item in queue.iter() {
            let (key, value) = item.map_err(read_err)?;
            let bad = |why: &str| corrupt("queue", &key, why.to_owned());
            let (client, seq) = split_client_key(&key)
                .filter(|(_, s)| s.len() == 8)
                .ok_or_else(|| bad("bad key"))?;
            let seq = u64::from_be_bytes(seq.try_into().map_err(|_| bad("bad key"))?);
            let entry = decode_entry(&value).ok_or_else(|| bad("bad queue entry"))?;
            let message = stored_messages
                .get(&entry.message_id)
                .cloned()
                .ok_or_else(|| bad("refers to a message that is not stored"))?;
            let Some(&i) = by_client.get(client) else {
                continue;
            };
            *refs.entry(entry.message_id).or_insert(0) += 1;
            loaded.sessions[i].deliveries.push(StoredDelivery {
                seq,
                message,
                qos: entry.qos,
                retain: entry.retain,
                subscription_ids: entry.subscription_ids,
                stage: stages.remove(&*key).unwrap_or(StoredStage::Queued),
            });
        }
        // Keys are ordered, so each session's deliveries are in queue order already.

        // Messages no queue entry refers to were left by a crash between deleting the last
        // reference and the message itself: nothing can deliver them, so they go.
        let orphans: Vec<u64> = stored_messages
            .keys()
            .filter(|id| !refs.contains_key(id))
            .copied()
            .collect();
        if !orphans.is_empty() {
            let mut batch = keyspace.batch();
            for id in &orphans {
                batch.remove(&messages, id.to_be_bytes());
            }
            batch.commit().map_err(open_err)?;
            tracing::info!(
                count = orphans.len(),
                "store: removed messages no queue refers to"
            );
        }

        let commit = Arc::new(Commit {
            written: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            waiters: Mutex::new(Vec::new()),
            kick: Mutex::new(false),
            kicked: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let committer = {
            let keyspace = keyspace.clone();
            let commit = commit.clone();
            std::thread::Builder::new()
                .name("petrel-store-commit".into())
                .spawn(move || run_commits(&keyspace, &commit, fsync))
                .map_err(|e| StoreError::Thread(e.to_string()))?
        };
        Ok((
            DiskStore {
                keyspace,
                sessions,
                subscriptions,
                retained,
                messages,
                queue,
                inflight,
                inbound,
                wills,
                refs: {
                    let mut stripes: Vec<HashMap<u64, u32>> =
                        (0..REF_STRIPES).map(|_| HashMap::new()).collect();
                    for (id, n) in refs {
                        stripes[stripe(id)].insert(id, n);
                    }
                    stripes.into_iter().map(Mutex::new).collect()
                },
                next_message: AtomicU64::new(max_id + 1),
                commit,
                committer: Some(committer),
            },
            loaded,
        ))
    }

    /// Bytes the store takes on disk.
    pub fn disk_space(&self) -> u64 {
        self.keyspace.disk_space()
    }

    /// Hands a change to the group commit; returns its durability token.
    fn written(&self, what: &str, result: fjall::Result<()>) -> u64 {
        if let Err(e) = result {
            tracing::error!(error = %e, what, "store: write failed; the change lives in memory only");
        }
        let token = self.commit.written.fetch_add(1, Ordering::AcqRel) + 1;
        *lock(&self.commit.kick) = true;
        self.commit.kicked.notify_one();
        token
    }

    fn remove_session(&self, client_id: &str) -> fjall::Result<()> {
        let prefix = client_key(client_id, &[]);
        let mut batch = self.keyspace.batch();
        batch.remove(&self.sessions, client_id.as_bytes());
        batch.remove(&self.wills, client_id.as_bytes());
        for (partition, _) in [
            (&self.subscriptions, ()),
            (&self.inflight, ()),
            (&self.inbound, ()),
        ] {
            for item in partition.prefix(&prefix) {
                let (key, _) = item?;
                batch.remove(partition, key);
            }
        }
        let mut messages = Vec::new();
        for item in self.queue.prefix(&prefix) {
            let (key, value) = item?;
            if let Some(entry) = decode_entry(&value) {
                messages.push(entry.message_id);
            }
            batch.remove(&self.queue, key);
        }
        batch.commit()?;
        for id in messages {
            let mut refs = lock(&self.refs[stripe(id)]);
            let mut batch = self.keyspace.batch();
            self.unref(&mut refs, &mut batch, id);
            batch.commit()?;
        }
        Ok(())
    }

    /// Drops one reference to a stored message, deleting it with the last.
    fn unref(&self, refs: &mut HashMap<u64, u32>, batch: &mut fjall::Batch, id: u64) {
        if let Some(n) = refs.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                refs.remove(&id);
                batch.remove(&self.messages, id.to_be_bytes());
            }
        }
    }
}

/// The group commit thread: waits for writes, makes all of them durable at once (fsync, or a
/// flush to the OS), then tells the waiters. With `Every`, syncs to disk at that interval and
/// only flushes to the OS in between.
fn run_commits(keyspace: &Keyspace, commit: &Commit, fsync: Fsync) {
    let mut last_sync = Instant::now();
    loop {
        {
            let mut kick = lock(&commit.kick);
            while !*kick && !commit.stop.load(Ordering::Acquire) {
                let wait = match fsync {
                    Fsync::Every(interval) => interval,
                    _ => Duration::from_secs(1),
                };
                kick = commit
                    .kicked
                    .wait_timeout(kick, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                if matches!(fsync, Fsync::Every(i) if last_sync.elapsed() >= i) {
                    break;
                }
            }
            *kick = false;
        }
        let target = commit.written.load(Ordering::Acquire);
        let mode = match fsync {
            Fsync::Always => PersistMode::SyncData,
            Fsync::Never => PersistMode::Buffer,
            Fsync::Every(interval) => {
                if last_sync.elapsed() >= interval {
                    last_sync = Instant::now();
                    PersistMode::SyncData
                } else {
                    PersistMode::Buffer
                }
            }
        };
        if let Err(e) = keyspace.persist(mode) {
            tracing::error!(error = %e, "store: journal sync failed; acknowledgements wait");
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        commit.durable.fetch_max(target, Ordering::AcqRel);
        let ready: Vec<Waker> = {
            let mut waiters = lock(&commit.waiters);
            let durable = commit.durable.load(Ordering::Acquire);
            let (done, waiting): (Vec<_>, Vec<_>) =
                waiters.drain(..).partition(|(t, _)| *t <= durable);
            *waiters = waiting;
            done.into_iter().map(|(_, w)| w).collect()
        };
        ready.into_iter().for_each(Waker::wake);
        if commit.stop.load(Ordering::Acquire) {
            let _ = keyspace.persist(PersistMode::SyncAll);
            return;
        }
    }
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        self.commit.stop.store(true, Ordering::Release);
        *lock(&self.commit.kick) = true;
        self.commit.kicked.notify_one();
        if let Some(t) = self.committer.take() {
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
            .insert(client_key(client_id, filter.as_bytes()), v);
        self.written("subscription", result);
    }

    fn subscription_removed(&self, client_id: &str, filter: &TopicFilter) {
        let result = self
            .subscriptions
            .remove(client_key(client_id, filter.as_bytes()));
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

    fn enqueued(&self, client_id: &str, seq: u64, delivery: &Delivery) -> u64 {
        let message = &delivery.message;
        let id = *message
            .store_id
            .get_or_init(|| self.next_message.fetch_add(1, Ordering::Relaxed));
        let result = {
            let mut refs = lock(&self.refs[stripe(id)]);
            let mut batch = self.keyspace.batch();
            let n = refs.entry(id).or_insert(0);
            if *n == 0 {
                batch.insert(&self.messages, id.to_be_bytes(), message_record(message));
            }
            *n += 1;
            batch.insert(
                &self.queue,
                client_key(client_id, &seq.to_be_bytes()),
                entry_record(id, delivery),
            );
            batch.commit()
        };
        self.written("queued message", result)
    }

    fn sent(&self, client_id: &str, seq: u64, packet_id: u16) {
        let result = self.inflight.insert(
            client_key(client_id, &seq.to_be_bytes()),
            stage_record(1, packet_id),
        );
        self.written("in-flight message", result);
    }

    fn released(&self, client_id: &str, seq: u64) {
        let key = client_key(client_id, &seq.to_be_bytes());
        let result = match self.inflight.get(&key) {
            Ok(Some(v)) if v.len() == 4 => self
                .inflight
                .insert(key, stage_record(2, u16::from_be_bytes([v[2], v[3]]))),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        self.written("in-flight message", result);
    }

    fn dequeued(&self, client_id: &str, seq: u64, message: &Message) {
        let key = client_key(client_id, &seq.to_be_bytes());
        let result = match message.store_id.get() {
            Some(&id) => {
                let mut refs = lock(&self.refs[stripe(id)]);
                let mut batch = self.keyspace.batch();
                batch.remove(&self.queue, key.clone());
                batch.remove(&self.inflight, key);
                self.unref(&mut refs, &mut batch, id);
                batch.commit()
            }
            None => {
                let mut batch = self.keyspace.batch();
                batch.remove(&self.queue, key.clone());
                batch.remove(&self.inflight, key);
                batch.commit()
            }
        };
        self.written("delivered message", result);
    }

    fn inbound_qos2(&self, client_id: &str, packet_id: u16, present: bool) -> u64 {
        let key = client_key(client_id, &packet_id.to_be_bytes());
        let result = if present {
            self.inbound.insert(key, [RECORD_VERSION])
        } else {
            self.inbound.remove(key)
        };
        self.written("QoS 2 packet id", result)
    }

    fn will_pending(&self, client_id: &str, will: Option<(Instant, &LastWill)>) {
        let result = match will {
            Some((at, will)) => self
                .wills
                .insert(client_id.as_bytes(), will_record(at, will)),
            None => self.wills.remove(client_id.as_bytes()),
        };
        self.written("pending will", result);
    }

    fn durable(&self) -> u64 {
        self.commit.durable.load(Ordering::Acquire)
    }

    fn wait_durable(&self, token: u64, waker: &Waker) -> bool {
        let mut waiters = lock(&self.commit.waiters);
        if self.commit.durable.load(Ordering::Acquire) >= token {
            return false;
        }
        if !waiters
            .iter()
            .any(|(t, w)| *t == token && w.will_wake(waker))
        {
            waiters.push((token, waker.clone()));
        }
        true
    }
}

/// Bytes of a retained message as stored, for tests and tools.
pub fn encode_retained(message: &Message) -> Bytes {
    Bytes::from(message_record(message))
}

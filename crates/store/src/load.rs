//! Reading a store back at start. Every record is decoded; one that does not decode stops the
//! start with its partition and key named. Records that a crash can leave unreachable — a
//! message no queue entry refers to, records of a session whose session record is gone —
//! are deleted, since nothing could ever deliver or resume them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use fjall::Keyspace;
use petrel_codec::TopicFilter;
use petrel_engine::message::Message;
use petrel_engine::session::Subscription;
use petrel_engine::store::{StoredDelivery, StoredSession, StoredStage};

use crate::changes::Part;
use crate::record::unseal;
use crate::record::{
    decode_entry, decode_message, decode_session, decode_will, from_wall, options_from,
    split_client_key, RECORD_VERSION,
};
use crate::{Loaded, Parts, StoreError};

/// A partition's records in key order, each checked against its checksum; the first that
/// does not read (or whose checksum fails) ends the iteration with an error naming it, or
/// the last key that did read.
pub(crate) struct Records<'a> {
    dir: &'a Path,
    part: Part,
    legacy: bool,
    inner: Box<dyn DoubleEndedIterator<Item = fjall::Result<fjall::KvPair>> + 'a>,
    last: Option<Vec<u8>>,
    failed: bool,
}

impl<'a> Records<'a> {
    pub(crate) fn new(dir: &'a Path, parts: &'a Parts, part: Part, legacy: bool) -> Self {
        Records {
            dir,
            part,
            legacy,
            inner: Box::new(parts.get(part).iter()),
            last: None,
            failed: false,
        }
    }
}

impl Iterator for Records<'_> {
    type Item = Result<(fjall::Slice, Vec<u8>), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let after = |last: &Option<Vec<u8>>| match last {
            Some(k) => format!("after key {:?}", String::from_utf8_lossy(k)),
            None => "from its first record".to_owned(),
        };
        // fjall 2 panics on some damaged segment bytes (an assert in its block decoder).
        let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.inner.next()));
        let item = match next {
            Ok(next) => next?,
            Err(_) => {
                self.failed = true;
                return Some(Err(StoreError::Panicked {
                    dir: self.dir.to_owned(),
                    what: format!(
                        "partition {} {} (a segment file in partitions/{}/segments)",
                        self.part.name(),
                        after(&self.last),
                        self.part.name()
                    ),
                }));
            }
        };
        let item = match item {
            Ok(item) => item,
            Err(source) => {
                self.failed = true;
                return Some(Err(StoreError::Segment {
                    dir: self.dir.to_owned(),
                    partition: self.part.name(),
                    after: after(&self.last),
                    source,
                }));
            }
        };
        let (key, value) = item;
        match unseal(self.part.name(), &key, &value, self.legacy) {
            Ok(record) => {
                let record = record.to_vec();
                self.last = Some(key.to_vec());
                Some(Ok((key, record)))
            }
            Err(why) => {
                self.failed = true;
                Some(Err(StoreError::Corrupt {
                    dir: self.dir.to_owned(),
                    partition: self.part.name(),
                    raw_key: key.to_vec(),
                    location: String::new(),
                    why,
                }))
            }
        }
    }
}

/// What the start needs besides the sessions: each stored message's reference count and the
/// highest message id in use.
pub(crate) struct Read {
    pub loaded: Loaded,
    pub refs: HashMap<u64, u32>,
    pub max_message_id: u64,
}

pub(crate) fn read(
    dir: &Path,
    keyspace: &Keyspace,
    parts: &Parts,
    legacy: bool,
) -> Result<Read, StoreError> {
    let corrupt = |partition: &'static str, key: &[u8], why: String| StoreError::Corrupt {
        dir: dir.to_owned(),
        partition,
        raw_key: key.to_vec(),
        location: String::new(),
        why,
    };
    // Every record of a partition, its checksum verified: `(key, record)`.
    let records = |part: Part| Records::new(dir, parts, part, legacy);
    let mut loaded = Loaded::default();
    // Keys of records that belong to no session: deleted below.
    let mut unreachable: Vec<(Part, Vec<u8>)> = Vec::new();
    let mut by_client: HashMap<String, usize> = HashMap::new();
    for item in records(Part::Sessions) {
        let (key, value) = item?;
        let (expiry, until, login) =
            decode_session(&value).map_err(|why| corrupt("sessions", &key, why))?;
        let client_id = std::str::from_utf8(&key)
            .map_err(|_| corrupt("sessions", &key, "client id is not UTF-8".into()))?
            .to_owned();
        by_client.insert(client_id.clone(), loaded.sessions.len());
        loaded.sessions.push(StoredSession {
            client_id,
            login,
            expiry_interval: expiry,
            expires_at: from_wall(until),
            subscriptions: Vec::new(),
            deliveries: Vec::new(),
            inbound_qos2: Vec::new(),
            pending_will: None,
        });
    }
    for item in records(Part::Subscriptions) {
        let (key, value) = item?;
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
        match by_client.get(client) {
            Some(&i) => loaded.sessions[i]
                .subscriptions
                .push((filter, Subscription { options, id })),
            None => unreachable.push((Part::Subscriptions, key.to_vec())),
        }
    }
    for item in records(Part::Retained) {
        let (key, value) = item?;
        let message = decode_message(&value).map_err(|why| corrupt("retained", &key, why))?;
        loaded.retained.push(message);
    }
    for item in records(Part::Inbound) {
        let (key, _) = item?;
        let (client, id) = split_client_key(&key)
            .filter(|(_, id)| id.len() == 2)
            .ok_or_else(|| corrupt("inbound", &key, "bad key".into()))?;
        match by_client.get(client) {
            Some(&i) => loaded.sessions[i]
                .inbound_qos2
                .push(u16::from_be_bytes([id[0], id[1]])),
            None => unreachable.push((Part::Inbound, key.to_vec())),
        }
    }
    for item in records(Part::Wills) {
        let (key, value) = item?;
        let client = std::str::from_utf8(&key)
            .map_err(|_| corrupt("wills", &key, "client id is not UTF-8".into()))?;
        let (at, will) = decode_will(&value).map_err(|why| corrupt("wills", &key, why))?;
        match by_client.get(client) {
            Some(&i) => loaded.sessions[i].pending_will = Some((at, will)),
            None => unreachable.push((Part::Wills, key.to_vec())),
        }
    }
    let mut stages: HashMap<Vec<u8>, StoredStage> = HashMap::new();
    for item in records(Part::Inflight) {
        let (key, v) = item?;
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
    let mut max_message_id = 0;
    for item in records(Part::Messages) {
        let (key, value) = item?;
        let id = <[u8; 8]>::try_from(&*key)
            .map(u64::from_be_bytes)
            .map_err(|_| corrupt("messages", &key, "bad key".into()))?;
        let message = decode_message(&value).map_err(|why| corrupt("messages", &key, why))?;
        let _ = message.store_id.set(id);
        max_message_id = max_message_id.max(id);
        stored_messages.insert(id, Arc::new(message));
    }
    let mut refs: HashMap<u64, u32> = HashMap::new();
    for item in records(Part::Queue) {
        let (key, value) = item?;
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
            unreachable.push((Part::Queue, key.to_vec()));
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
    // Keys are ordered, so each session's deliveries are in queue order already. A stage
    // left over had its queue entry deleted.
    unreachable.extend(stages.into_keys().map(|k| (Part::Inflight, k)));
    unreachable.extend(
        stored_messages
            .keys()
            .filter(|id| !refs.contains_key(id))
            .map(|id| (Part::Messages, id.to_be_bytes().to_vec())),
    );
    if !unreachable.is_empty() {
        let mut batch = keyspace.batch();
        for (part, key) in &unreachable {
            batch.remove(parts.get(*part), key.clone());
        }
        batch.commit().map_err(|source| StoreError::Open {
            dir: dir.to_owned(),
            source,
        })?;
        tracing::info!(
            count = unreachable.len(),
            "store: removed records that no session or queue refers to"
        );
    }
    Ok(Read {
        loaded,
        refs,
        max_message_id,
    })
}

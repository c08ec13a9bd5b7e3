//! The write-behind buffer: changes waiting for the commit thread, newest per key.
//!
//! Hooks record a change here and return at once; the commit thread takes everything
//! recorded so far as one group and writes it as one fjall batch. Within a group only the last
//! change to a key matters, and a delete that follows a put of a key that held nothing
//! cancels both: a QoS 1 message its subscriber acknowledged before the group was taken is
//! never written at all, and its publisher's PUBACK still waits for the group that covered it.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

use petrel_engine::message::Message;

use crate::record::message_record;

/// The partition a change goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Part {
    Sessions,
    Subscriptions,
    Retained,
    Messages,
    Queue,
    Inflight,
    Inbound,
    Wills,
}

impl Part {
    /// Partitions keyed `client id, 0x00, ...`, where a removed session leaves records.
    pub(crate) const PER_CLIENT: [Part; 4] = [
        Part::Subscriptions,
        Part::Queue,
        Part::Inflight,
        Part::Inbound,
    ];
}

pub(crate) enum Value {
    Bytes(Vec<u8>),
    /// A stored message, encoded by the commit thread only if it is still wanted then.
    Message(Arc<Message>),
}

impl Value {
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            Value::Bytes(b) => b.clone(),
            Value::Message(m) => message_record(m),
        }
    }

    /// The stored bytes, for values that are stored as given.
    pub(crate) fn bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            Value::Message(_) => None,
        }
    }
}

pub(crate) enum Change {
    /// `fresh`: once the group being written now has landed, the key holds nothing, so the
    /// put can be forgotten instead of followed by a delete.
    Put {
        value: Value,
        fresh: bool,
    },
    Delete,
}

pub(crate) type Key = (Part, Vec<u8>);

#[derive(Default)]
pub(crate) struct Changes {
    map: HashMap<Key, Change, foldhash::fast::RandomState>,
}

impl Changes {
    /// `fresh` as the caller knows it: whether the key holds nothing now. A key already
    /// changed here keeps what its first change knew.
    fn put(&mut self, key: Key, value: Value, fresh: bool) {
        match self.map.entry(key) {
            Entry::Occupied(mut e) => {
                let fresh = matches!(e.get(), Change::Put { fresh: true, .. });
                *e.get_mut() = Change::Put { value, fresh };
            }
            Entry::Vacant(e) => {
                e.insert(Change::Put { value, fresh });
            }
        }
    }

    fn delete(&mut self, key: Key) {
        match self.map.entry(key) {
            Entry::Occupied(e) if matches!(e.get(), Change::Put { fresh: true, .. }) => {
                e.remove();
            }
            Entry::Occupied(mut e) => *e.get_mut() = Change::Delete,
            Entry::Vacant(e) => {
                e.insert(Change::Delete);
            }
        }
    }

    pub(crate) fn get(&self, part: Part, key: &[u8]) -> Option<&Change> {
        // Looking up by a borrowed tuple needs an owned key; these lookups are off the
        // message path (session removal), so the copy is acceptable.
        self.map.get(&(part, key.to_vec()))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Key, &Change)> {
        self.map.iter()
    }
}

/// The buffer in two generations. The commit thread writes only the older one, so every
/// change waits at least one round (a journal write and sync) before it is written: time
/// for a subscriber to acknowledge a message, which cancels it. Without the wait, the
/// publishers' next messages, sent the moment the last round released their PUBACKs, would
/// be taken by the very next round before any subscriber could answer.
///
/// A key lives in one generation: a later change to a key in the older one is made there,
/// so it is written no later than the change it supersedes (a change written earlier than
/// its token requires is still safe; one written later would break the promise made by
/// that earlier token).
#[derive(Default)]
pub(crate) struct Buffer {
    young: Changes,
    aged: Changes,
}

impl Buffer {
    /// The generation that holds `key`; if neither does, the younger unless `older_by_default`.
    fn holding(&mut self, key: &Key, older_by_default: bool) -> &mut Changes {
        let aged = self.aged.map.contains_key(key)
            || (older_by_default && !self.young.map.contains_key(key));
        if aged {
            &mut self.aged
        } else {
            &mut self.young
        }
    }

    pub(crate) fn put(&mut self, part: Part, key: Vec<u8>, value: Value, fresh: bool) {
        let key = (part, key);
        self.holding(&key, false).put(key, value, fresh);
    }

    pub(crate) fn delete(&mut self, part: Part, key: Vec<u8>) {
        let key = (part, key);
        self.holding(&key, false).delete(key);
    }

    /// A delete that goes with the next group (when its key is not in the younger
    /// generation): removing a session deletes its records in one group, so a crash cannot
    /// leave half a session.
    pub(crate) fn delete_soon(&mut self, part: Part, key: Vec<u8>) {
        let key = (part, key);
        self.holding(&key, true).delete(key);
    }

    pub(crate) fn get(&self, part: Part, key: &[u8]) -> Option<&Change> {
        self.young
            .get(part, key)
            .or_else(|| self.aged.get(part, key))
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Key, &Change)> {
        self.young.iter().chain(self.aged.iter())
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.young.is_empty() && self.aged.is_empty()
    }

    /// Takes the older generation for writing; the younger one ages.
    pub(crate) fn rotate(&mut self) -> Changes {
        let aged = std::mem::take(&mut self.young);
        std::mem::replace(&mut self.aged, aged)
    }

    /// Takes everything, for the last round.
    pub(crate) fn take_all(&mut self) -> Changes {
        let mut all = std::mem::take(&mut self.aged);
        for (key, change) in std::mem::take(&mut self.young).map {
            all.map.insert(key, change);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(b: &[u8]) -> Value {
        Value::Bytes(b.to_vec())
    }

    fn state(c: &Buffer, key: &[u8]) -> Option<Option<Vec<u8>>> {
        c.get(Part::Queue, key).map(|c| match c {
            Change::Put { value, .. } => Some(value.encode()),
            Change::Delete => None,
        })
    }

    #[test]
    fn a_fresh_put_and_its_delete_cancel() {
        let mut c = Buffer::default();
        c.put(Part::Queue, b"k".to_vec(), bytes(b"v"), true);
        c.put(Part::Queue, b"k".to_vec(), bytes(b"w"), false);
        c.delete(Part::Queue, b"k".to_vec());
        assert!(c.is_empty());
    }

    #[test]
    fn a_put_over_a_stored_key_leaves_a_delete() {
        let mut c = Buffer::default();
        c.put(Part::Queue, b"k".to_vec(), bytes(b"v"), false);
        c.delete(Part::Queue, b"k".to_vec());
        assert_eq!(state(&c, b"k"), Some(None));
    }

    #[test]
    fn a_put_after_a_delete_is_not_fresh() {
        let mut c = Buffer::default();
        c.delete(Part::Queue, b"k".to_vec());
        c.put(Part::Queue, b"k".to_vec(), bytes(b"v"), true);
        assert_eq!(state(&c, b"k"), Some(Some(b"v".to_vec())));
        c.delete(Part::Queue, b"k".to_vec());
        // The stored value must still go.
        assert_eq!(state(&c, b"k"), Some(None));
    }

    #[test]
    fn partitions_are_apart() {
        let mut c = Buffer::default();
        c.put(Part::Queue, b"k".to_vec(), bytes(b"v"), true);
        c.delete(Part::Inflight, b"k".to_vec());
        assert_eq!(c.iter().count(), 2);
        assert_eq!(state(&c, b"k"), Some(Some(b"v".to_vec())));
    }

    #[test]
    fn a_change_waits_one_rotation_and_cancels_across_generations() {
        let mut c = Buffer::default();
        c.put(Part::Queue, b"a".to_vec(), bytes(b"1"), true);
        c.put(Part::Queue, b"b".to_vec(), bytes(b"2"), true);
        // The first rotation writes nothing: both changes only age.
        assert!(c.rotate().is_empty());
        // Acknowledged while aged: cancelled there, never written.
        c.delete(Part::Queue, b"a".to_vec());
        c.put(Part::Queue, b"c".to_vec(), bytes(b"3"), true);
        let written = c.rotate();
        assert_eq!(written.len(), 1);
        assert!(written.get(Part::Queue, b"b").is_some());
        // c aged meanwhile and is written by the next rotation.
        assert!(c.rotate().get(Part::Queue, b"c").is_some());
        assert!(c.is_empty());
    }

    #[test]
    fn a_later_change_to_an_aged_key_is_written_with_it() {
        let mut c = Buffer::default();
        c.put(Part::Sessions, b"s".to_vec(), bytes(b"online"), false);
        c.rotate();
        c.put(Part::Sessions, b"s".to_vec(), bytes(b"offline"), false);
        let written = c.rotate();
        assert!(
            matches!(written.get(Part::Sessions, b"s"), Some(Change::Put { value, .. }) if value.encode() == b"offline")
        );
        assert!(c.rotate().is_empty());
    }

    #[test]
    fn deletes_soon_join_the_older_generation() {
        let mut c = Buffer::default();
        c.put(Part::Queue, b"young".to_vec(), bytes(b"1"), false);
        c.delete_soon(Part::Queue, b"young".to_vec());
        c.delete_soon(Part::Queue, b"stored".to_vec());
        let written = c.rotate();
        assert!(matches!(
            written.get(Part::Queue, b"stored"),
            Some(Change::Delete)
        ));
        assert!(written.get(Part::Queue, b"young").is_none());
        assert!(matches!(
            c.rotate().get(Part::Queue, b"young"),
            Some(Change::Delete)
        ));
    }

    #[test]
    fn take_all_keeps_the_newest_change() {
        let mut c = Buffer::default();
        c.put(Part::Queue, b"k".to_vec(), bytes(b"old"), false);
        c.rotate();
        c.delete(Part::Queue, b"k".to_vec());
        c.put(Part::Queue, b"k".to_vec(), bytes(b"new"), false);
        let all = c.take_all();
        assert_eq!(all.len(), 1);
        assert!(
            matches!(all.get(Part::Queue, b"k"), Some(Change::Put { value, .. }) if value.encode() == b"new")
        );
    }
}

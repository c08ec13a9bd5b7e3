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
    pub(crate) fn put(&mut self, part: Part, key: Vec<u8>, value: Value, fresh: bool) {
        match self.map.entry((part, key)) {
            Entry::Occupied(mut e) => {
                let fresh = matches!(e.get(), Change::Put { fresh: true, .. });
                *e.get_mut() = Change::Put { value, fresh };
            }
            Entry::Vacant(e) => {
                e.insert(Change::Put { value, fresh });
            }
        }
    }

    pub(crate) fn delete(&mut self, part: Part, key: Vec<u8>) {
        match self.map.entry((part, key)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(b: &[u8]) -> Value {
        Value::Bytes(b.to_vec())
    }

    fn state(c: &Changes, key: &[u8]) -> Option<Option<Vec<u8>>> {
        c.get(Part::Queue, key).map(|c| match c {
            Change::Put { value, .. } => Some(value.encode()),
            Change::Delete => None,
        })
    }

    #[test]
    fn a_fresh_put_and_its_delete_cancel() {
        let mut c = Changes::default();
        c.put(Part::Queue, b"k".to_vec(), bytes(b"v"), true);
        c.put(Part::Queue, b"k".to_vec(), bytes(b"w"), false);
        c.delete(Part::Queue, b"k".to_vec());
        assert!(c.is_empty());
    }

    #[test]
    fn a_put_over_a_stored_key_leaves_a_delete() {
        let mut c = Changes::default();
        c.put(Part::Queue, b"k".to_vec(), bytes(b"v"), false);
        c.delete(Part::Queue, b"k".to_vec());
        assert_eq!(state(&c, b"k"), Some(None));
    }

    #[test]
    fn a_put_after_a_delete_is_not_fresh() {
        let mut c = Changes::default();
        c.delete(Part::Queue, b"k".to_vec());
        c.put(Part::Queue, b"k".to_vec(), bytes(b"v"), true);
        assert_eq!(state(&c, b"k"), Some(Some(b"v".to_vec())));
        c.delete(Part::Queue, b"k".to_vec());
        // The stored value must still go.
        assert_eq!(state(&c, b"k"), Some(None));
    }

    #[test]
    fn partitions_are_apart() {
        let mut c = Changes::default();
        c.put(Part::Queue, b"k".to_vec(), bytes(b"v"), true);
        c.delete(Part::Inflight, b"k".to_vec());
        assert_eq!(c.len(), 2);
        assert_eq!(state(&c, b"k"), Some(Some(b"v".to_vec())));
    }
}

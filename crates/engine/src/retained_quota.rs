//! Who set each retained message, for `max_retained_per_client`: the broker-wide bounds keep
//! the retained store's memory in check, and this keeps one client from taking all of it. A
//! client is its login (user name or certificate identity), or for an anonymous client its
//! address, never its client id, which it could change at will.
//!
//! Kept only while the limit is set (it costs a copy of each topic name), so a limit switched
//! on by a reload counts the retained messages set from then on. A message belongs to the
//! client that last set it; a replacement by another client moves it to that client, and a
//! clear, an expiry or an operator's removal frees it. Changes from other nodes of a cluster
//! free a topic but belong to no client here.

use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct Setters {
    by_topic: HashMap<Box<str>, Arc<str>>,
    counts: HashMap<Arc<str>, usize>,
}

impl Setters {
    /// Whether `client_id` may set a retained message on `topic` with at most `limit` of its
    /// own (0: no limit). Replacing one of its own always may.
    pub fn allows(&self, client_id: &str, topic: &str, limit: usize) -> bool {
        if limit == 0 || self.by_topic.get(topic).is_some_and(|c| &**c == client_id) {
            return true;
        }
        self.counts.get(client_id).copied().unwrap_or(0) < limit
    }

    /// The retained message of `topic` changed or went: it belongs to no one now.
    pub fn forget(&mut self, topic: &str) {
        if let Some(client) = self.by_topic.remove(topic) {
            if let Some(n) = self.counts.get_mut(&client) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(&client);
                }
            }
        }
    }

    /// `client_id` set the retained message of `topic`.
    pub fn note(&mut self, topic: &str, client_id: &str) {
        self.forget(topic);
        let client: Arc<str> = match self.counts.get_key_value(client_id) {
            Some((c, _)) => c.clone(),
            None => client_id.into(),
        };
        *self.counts.entry(client.clone()).or_default() += 1;
        self.by_topic.insert(topic.into(), client);
    }

    /// The limit was switched off: nothing to keep.
    pub fn clear(&mut self) {
        self.by_topic = HashMap::new();
        self.counts = HashMap::new();
    }

    pub fn is_empty(&self) -> bool {
        self.by_topic.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_is_held_to_its_own_count() {
        let mut s = Setters::default();
        assert!(s.allows("a", "t/1", 2));
        s.note("t/1", "a");
        s.note("t/2", "a");
        assert!(!s.allows("a", "t/3", 2), "a has two");
        assert!(s.allows("a", "t/1", 2), "replacing its own");
        assert!(s.allows("b", "t/3", 2));
        // b replaces one of a's: it is b's now, and a has room again.
        s.note("t/2", "b");
        assert!(s.allows("a", "t/3", 2));
        s.forget("t/1");
        s.forget("t/2");
        assert!(s.is_empty());
        assert!(s.counts.is_empty());
        assert!(s.allows("a", "t/9", 0), "0: no limit");
    }
}

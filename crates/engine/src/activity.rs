//! Message counts per topic, for operators' "top topics by rate": kept only while someone
//! watches (the dashboard asks every second), so an unwatched broker pays one relaxed load
//! per PUBLISH and holds nothing.
//!
//! Bounded: at most [`MAX_TOPICS`] topics are counted by name; messages on further topics
//! are counted under [`OTHER`]. Counts sit in a few sharded maps so that publishers on
//! different threads rarely meet on one lock.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Topics counted by name at most; the rest go under [`OTHER`].
pub const MAX_TOPICS: usize = 10_000;

/// The name under which topics past [`MAX_TOPICS`] are counted.
pub const OTHER: &str = "(other topics)";

const SHARDS: usize = 8;

/// Messages and payload bytes seen on one topic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub messages: u64,
    pub bytes: u64,
}

pub struct TopicActivity {
    watched: AtomicBool,
    /// Topics counted by name, in all shards.
    topics: AtomicUsize,
    hasher: RandomState,
    /// Messages and bytes on topics past [`MAX_TOPICS`].
    other: Mutex<Counts>,
    shards: [Mutex<HashMap<Box<str>, Counts>>; SHARDS],
}

impl Default for TopicActivity {
    fn default() -> Self {
        TopicActivity {
            watched: AtomicBool::new(false),
            topics: AtomicUsize::new(0),
            hasher: RandomState::new(),
            other: Mutex::default(),
            shards: Default::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TopicActivity {
    /// Starts (or keeps) counting.
    pub fn watch(&self) {
        self.watched.store(true, Ordering::Relaxed);
    }

    /// Stops counting and forgets the counts.
    pub fn unwatch(&self) {
        self.watched.store(false, Ordering::Relaxed);
        for shard in &self.shards {
            lock(shard).clear();
        }
        *lock(&self.other) = Counts::default();
        self.topics.store(0, Ordering::Relaxed);
    }

    pub fn is_watched(&self) -> bool {
        self.watched.load(Ordering::Relaxed)
    }

    /// Counts one message of `bytes` payload on `topic`, if someone watches.
    pub fn record(&self, topic: &str, bytes: usize) {
        if !self.is_watched() {
            return;
        }
        let shard = &self.shards[self.hasher.hash_one(topic) as usize % SHARDS];
        let mut map = lock(shard);
        let mut other;
        let counts = match map.get_mut(topic) {
            Some(c) => c,
            None if self.topics.fetch_add(1, Ordering::Relaxed) < MAX_TOPICS => {
                map.entry(topic.into()).or_default()
            }
            None => {
                self.topics.fetch_sub(1, Ordering::Relaxed);
                drop(map);
                other = lock(&self.other);
                &mut *other
            }
        };
        counts.messages += 1;
        counts.bytes += bytes as u64;
    }

    /// The counts so far, by topic.
    pub fn snapshot(&self) -> Vec<(Box<str>, Counts)> {
        let mut all = Vec::new();
        for shard in &self.shards {
            all.extend(lock(shard).iter().map(|(k, v)| (k.clone(), *v)));
        }
        let other = *lock(&self.other);
        if other.messages > 0 {
            all.push((OTHER.into(), other));
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_while_watched_and_stays_bounded() {
        let a = TopicActivity::default();
        a.record("x", 10);
        assert!(a.snapshot().is_empty(), "nothing is kept while unwatched");
        a.watch();
        a.record("x", 10);
        a.record("x", 5);
        a.record("y", 1);
        let mut snap = a.snapshot();
        snap.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            snap,
            vec![
                (
                    "x".into(),
                    Counts {
                        messages: 2,
                        bytes: 15
                    }
                ),
                (
                    "y".into(),
                    Counts {
                        messages: 1,
                        bytes: 1
                    }
                ),
            ]
        );
        for i in 0..MAX_TOPICS + 50 {
            a.record(&format!("t/{i}"), 1);
        }
        let snap = a.snapshot();
        assert_eq!(
            snap.len(),
            MAX_TOPICS + 1,
            "named topics are capped, plus the rest"
        );
        let other = snap.iter().find(|(k, _)| &**k == OTHER).unwrap().1;
        assert_eq!(other.messages, 52);
        a.unwatch();
        assert!(a.snapshot().is_empty());
    }
}

//! The retained-message store: at most one value per topic name, found by topic filter when a
//! client subscribes.
//!
//! Structure: a trie with one node per topic level (the name split on `/`), children keyed by
//! level. A node that holds a value also holds its full topic name, so a match hands the name
//! to the caller without rebuilding it from levels.
//!
//! Why a trie: a subscription to `sensors/+/temp` or `sensors/#` must visit only the retained
//! topics under `sensors`, not every retained message in the broker. Literal filter levels are
//! one hash lookup; `+` visits the children of one node; `#` visits one subtree.
//!
//! As in the subscription index, peers choose the depth, so match, insert, remove and `Drop`
//! are loops, never recursion over the trie.

use std::collections::HashMap;

/// Maps of the tries hash with foldhash: seeded per map from a per-process random seed, so
/// peer-chosen levels cannot be aimed at collisions ahead of time, and several times faster
/// than SipHash on the short keys topic levels are.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::fmt;

use crate::topic_index::{split_first_level, InlineStack};

/// Retained values keyed by topic name.
pub struct RetainedTrie<V> {
    /// Stands for the empty prefix. It never holds a value, because every topic name has at
    /// least one level, and it is never pruned.
    root: Node<V>,
    /// Number of stored values, kept so `len` does not walk the trie.
    len: usize,
}

struct Node<V> {
    /// Peer-chosen strings, so the default collision-resistant hasher is kept.
    children: Map<Box<str>, Node<V>>,
    /// The value retained on the topic ending at this node, with that topic's full name.
    retained: Option<(Box<str>, V)>,
}

impl<V> Node<V> {
    fn new() -> Self {
        Node {
            children: Map::default(),
            retained: None,
        }
    }

    fn report(&self, f: &mut impl FnMut(&str, &V)) {
        if let Some((topic, value)) = &self.retained {
            f(topic, value);
        }
    }
}

/// The derived drop would recurse once per level, and a deep enough chain would overflow the
/// stack. Children are detached into a worklist instead, so each node is dropped as a leaf.
impl<V> Drop for Node<V> {
    fn drop(&mut self) {
        if self.children.is_empty() {
            return;
        }
        let mut pending: Vec<Node<V>> = std::mem::take(&mut self.children).into_values().collect();
        while let Some(mut node) = pending.pop() {
            pending.extend(std::mem::take(&mut node.children).into_values());
        }
    }
}

/// One unit of work in a match.
enum Visit<'t, 'f, V> {
    /// `node` matched the filter up to `rest` (`None` once the whole filter is consumed).
    /// `at_root` marks the root, where the `$` rule applies to wildcards.
    Filter {
        node: &'t Node<V>,
        rest: Option<&'f str>,
        at_root: bool,
    },
    /// Everything at and below `node` matches (a `#` was reached).
    Subtree(&'t Node<V>),
}

/// Entries kept inline by the match stack; a `+` or `#` over a wide subtree spills to the heap,
/// which is acceptable because this runs once per SUBSCRIBE, not per PUBLISH.
const MATCH_STACK_INLINE: usize = 16;

impl<V> RetainedTrie<V> {
    pub fn new() -> Self {
        RetainedTrie {
            root: Node::new(),
            len: 0,
        }
    }

    /// Stores `value` as the retained message of `topic`, returning the one it replaces.
    pub fn insert(&mut self, topic: &str, value: V) -> Option<V> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.entry(level.into()).or_insert_with(Node::new);
        }
        match &mut node.retained {
            Some((_, stored)) => Some(std::mem::replace(stored, value)),
            slot @ None => {
                *slot = Some((topic.into(), value));
                self.len += 1;
                None
            }
        }
    }

    /// Removes the retained message of `topic`, pruning nodes left with neither a value nor
    /// children so memory returns when messages are cleared.
    pub fn remove(&mut self, topic: &str) -> Option<V> {
        // First pass, read-only: check the value exists and find the highest edge whose whole
        // subtree becomes empty without it.
        let mut node = &self.root;
        // Start of the trailing run of nodes with no value and only the one child on our path.
        let mut run_start: Option<usize> = None;
        let mut run_above_target: Option<usize> = None;
        let mut target_edge = 0;
        for (edge, level) in topic.split('/').enumerate() {
            node = node.children.get(level)?;
            run_above_target = run_start;
            let passthrough = node.retained.is_none() && node.children.len() == 1;
            run_start = if passthrough {
                run_start.or(Some(edge))
            } else {
                None
            };
            target_edge = edge;
        }
        node.retained.as_ref()?;
        let cut = if node.children.is_empty() {
            Some(run_above_target.unwrap_or(target_edge))
        } else {
            None
        };

        // Second pass: take the value out, detaching the dead subtree if there is one.
        let mut levels = topic.split('/');
        let (_, value) = match cut {
            None => {
                let mut node = &mut self.root;
                for level in levels {
                    node = node.children.get_mut(level)?;
                }
                node.retained.take()?
            }
            Some(cut) => {
                let mut parent = &mut self.root;
                for level in levels.by_ref().take(cut) {
                    parent = parent.children.get_mut(level)?;
                }
                let mut detached = parent.children.remove(levels.next()?)?;
                let mut node = &mut detached;
                for level in levels {
                    node = node.children.get_mut(level)?;
                }
                node.retained.take()?
                // `detached` is dropped here, iteratively (see `Drop for Node`).
            }
        };
        self.len -= 1;
        Some(value)
    }

    pub fn get(&self, topic: &str) -> Option<&V> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.retained.as_ref().map(|(_, value)| value)
    }

    /// Calls `f(topic, &value)` for every retained topic matched by `filter`, in no particular
    /// order. Wildcards follow the subscription rules: `+` is one level, `#` is the parent level
    /// and everything below, and a filter whose first level is `+` or `#` does not match topics
    /// beginning with `$` [MQTT-4.7.2-1].
    ///
    /// `filter` must already be valid; for an invalid one (`#` not last) levels after the `#`
    /// are ignored.
    pub fn for_each_match(&self, filter: &str, mut f: impl FnMut(&str, &V)) {
        let mut stack: InlineStack<Visit<'_, '_, V>, MATCH_STACK_INLINE> = InlineStack::new();
        stack.push(Visit::Filter {
            node: &self.root,
            rest: Some(filter),
            at_root: true,
        });
        while let Some(visit) = stack.pop() {
            let (node, rest, at_root) = match visit {
                Visit::Subtree(node) => {
                    node.report(&mut f);
                    for child in node.children.values() {
                        stack.push(Visit::Subtree(child));
                    }
                    continue;
                }
                Visit::Filter {
                    node,
                    rest,
                    at_root,
                } => (node, rest, at_root),
            };
            let Some(rest) = rest else {
                node.report(&mut f);
                continue;
            };
            // The `$` rule: at the root, wildcards skip children (first levels) starting with `$`.
            let visible = |level: &str| !(at_root && level.starts_with('$'));
            let (level, rest) = split_first_level(rest);
            match level {
                "#" => {
                    // The parent level matches too; the root never holds a value.
                    node.report(&mut f);
                    for (level, child) in &node.children {
                        if visible(level) {
                            stack.push(Visit::Subtree(child));
                        }
                    }
                }
                "+" => {
                    for (level, child) in &node.children {
                        if visible(level) {
                            stack.push(Visit::Filter {
                                node: child,
                                rest,
                                at_root: false,
                            });
                        }
                    }
                }
                _ => {
                    if let Some(child) = node.children.get(level) {
                        stack.push(Visit::Filter {
                            node: child,
                            rest,
                            at_root: false,
                        });
                    }
                }
            }
        }
    }

    /// Calls `f(topic, &value)` for every retained message, `$` topics included.
    pub fn for_each(&self, mut f: impl FnMut(&str, &V)) {
        let mut stack: InlineStack<Visit<'_, '_, V>, MATCH_STACK_INLINE> = InlineStack::new();
        stack.push(Visit::Subtree(&self.root));
        while let Some(visit) = stack.pop() {
            if let Visit::Subtree(node) = visit {
                node.report(&mut f);
                for child in node.children.values() {
                    stack.push(Visit::Subtree(child));
                }
            }
        }
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Trie nodes including the root; for tests of pruning.
    #[cfg(test)]
    fn node_count(&self) -> usize {
        let mut count = 0;
        let mut pending = vec![&self.root];
        while let Some(node) = pending.pop() {
            count += 1;
            pending.extend(node.children.values());
        }
        count
    }
}

impl<V> Default for RetainedTrie<V> {
    fn default() -> Self {
        Self::new()
    }
}

/// Shallow on purpose: a derived `Debug` would print (and recurse through) the whole trie.
impl<V> fmt::Debug for RetainedTrie<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetainedTrie")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic_index::filter_matches;
    use proptest::prelude::*;

    /// Topics retained in every table case.
    const STORED: &[&str] = &[
        "sport",
        "sport/tennis",
        "sport/tennis/player1",
        "sport/tennis/player1/ranking",
        "sport/golf",
        "sport/",
        "/finance",
        "a//b",
        "$SYS/broker/uptime",
        "$SYS",
        "$",
        "a/$b",
    ];

    /// (case, filter, topics it must return)
    const MATCH_CASES: &[(&str, &str, &[&str])] = &[
        ("literal", "sport/tennis", &["sport/tennis"]),
        ("literal with no retained value", "sport/football", &[]),
        ("intermediate level without a value", "a", &[]),
        ("empty level is a level", "a//b", &["a//b"]),
        ("leading empty level", "/finance", &["/finance"]),
        (
            "+ one level [MQTT-4.7.1-3]",
            "sport/+",
            &["sport/", "sport/golf", "sport/tennis"],
        ),
        (
            "+ in the middle [MQTT-4.7.1-3]",
            "sport/+/player1",
            &["sport/tennis/player1"],
        ),
        (
            "+ first level matches the empty level [MQTT-4.7.1-3]",
            "+/finance",
            &["/finance"],
        ),
        (
            "# includes the parent level [MQTT-4.7.1-2]",
            "sport/tennis/#",
            &[
                "sport/tennis",
                "sport/tennis/player1",
                "sport/tennis/player1/ranking",
            ],
        ),
        (
            "+/# [MQTT-4.7.1-2]",
            "+/tennis/#",
            &[
                "sport/tennis",
                "sport/tennis/player1",
                "sport/tennis/player1/ranking",
            ],
        ),
        (
            "# skips $ topics [MQTT-4.7.2-1]",
            "#",
            &[
                "/finance",
                "a/$b",
                "a//b",
                "sport",
                "sport/",
                "sport/golf",
                "sport/tennis",
                "sport/tennis/player1",
                "sport/tennis/player1/ranking",
            ],
        ),
        ("+ skips $ topics [MQTT-4.7.2-1]", "+", &["sport"]),
        ("+/+ skips $ topics [MQTT-4.7.2-1]", "+/broker/+", &[]),
        (
            "$SYS/# [MQTT-4.7.2-1]",
            "$SYS/#",
            &["$SYS", "$SYS/broker/uptime"],
        ),
        (
            "$SYS/+/x [MQTT-4.7.2-1]",
            "$SYS/+/uptime",
            &["$SYS/broker/uptime"],
        ),
        ("$ literal [MQTT-4.7.2-1]", "$", &["$"]),
        (
            "$ after the first level is ordinary [MQTT-4.7.2-1]",
            "+/+",
            &["/finance", "a/$b", "sport/", "sport/golf", "sport/tennis"],
        ),
    ];

    fn matched(trie: &RetainedTrie<String>, filter: &str) -> Vec<String> {
        let mut found = Vec::new();
        trie.for_each_match(filter, |topic, value| {
            assert_eq!(topic, value, "callback gets the stored topic");
            found.push(topic.to_owned());
        });
        found.sort_unstable();
        found
    }

    #[test]
    fn matching_rules() {
        let mut trie = RetainedTrie::new();
        for topic in STORED {
            trie.insert(topic, topic.to_string());
        }
        for &(case, filter, want) in MATCH_CASES {
            assert_eq!(matched(&trie, filter), want, "{case}: {filter:?}");
            let reference: Vec<&str> = {
                let mut topics: Vec<&str> = STORED
                    .iter()
                    .copied()
                    .filter(|topic| filter_matches(filter, topic))
                    .collect();
                topics.sort_unstable();
                topics
            };
            assert_eq!(
                reference, want,
                "reference matcher disagrees with the table: {case}"
            );
        }
    }

    #[test]
    fn insert_replaces_and_get_reads() {
        let mut trie = RetainedTrie::new();
        assert_eq!(trie.insert("a/b", 1), None);
        assert_eq!(trie.insert("a/b", 2), Some(1));
        assert_eq!(trie.get("a/b"), Some(&2));
        assert_eq!(trie.get("a"), None, "intermediate level");
        assert_eq!(trie.get("a/b/c"), None);
        assert_eq!(trie.get("a/+"), None, "wildcards are literal in get");
        assert_eq!(trie.len(), 1);
    }

    #[test]
    fn remove_prunes_only_nodes_that_became_empty() {
        let mut trie = RetainedTrie::new();
        trie.insert("a/b", 1);
        trie.insert("a/b/c/d", 2);
        trie.insert("a/x", 3);
        // root, a, b, c, d, x
        assert_eq!(trie.node_count(), 6);

        assert_eq!(trie.remove("a/b/c"), None, "no value there");
        assert_eq!(trie.remove("a/b/c/d/e"), None, "below the deepest node");
        assert_eq!(trie.node_count(), 6);

        assert_eq!(trie.remove("a/b/c/d"), Some(2));
        assert_eq!(trie.node_count(), 4, "c and d pruned, b keeps its value");
        assert_eq!(trie.remove("a/b"), Some(1));
        assert_eq!(trie.node_count(), 3, "b pruned, a kept for x");
        assert_eq!(trie.remove("a/b"), None, "already gone");
        assert_eq!(trie.remove("a/x"), Some(3));
        assert_eq!(trie.node_count(), 1);
        assert!(trie.is_empty());
    }

    #[test]
    fn remove_keeps_a_node_that_still_has_children() {
        let mut trie = RetainedTrie::new();
        trie.insert("a", 1);
        trie.insert("a/b", 2);
        assert_eq!(trie.remove("a"), Some(1));
        assert_eq!(trie.node_count(), 3);
        assert_eq!(trie.get("a/b"), Some(&2));
    }

    /// Depth is peer-chosen; recursion over the trie would overflow the stack.
    #[test]
    fn very_deep_topics_do_not_overflow_the_stack() {
        let deep = "a/".repeat(60_000) + "z";
        let mut trie = RetainedTrie::new();
        trie.insert(&deep, 1);
        trie.insert("a", 2);
        let mut found = 0;
        trie.for_each_match("#", |_, _| found += 1);
        assert_eq!(found, 2);
        let deep_filter = "+/".repeat(60_000) + "+";
        trie.for_each_match(&deep_filter, |_, _| found += 1);
        assert_eq!(found, 3);
        assert_eq!(trie.remove("a"), Some(2));
        drop(trie);
    }

    fn topic() -> impl Strategy<Value = String> {
        let level = prop::sample::select(vec!["", "a", "b", "$SYS", "$"]);
        prop::collection::vec(level, 1..5).prop_map(|levels| levels.join("/"))
    }

    /// Valid filters only: `+` anywhere as a whole level, `#` only last.
    fn filter() -> impl Strategy<Value = String> {
        let level = prop::sample::select(vec!["", "a", "b", "$SYS", "+"]);
        (prop::collection::vec(level, 0..5), any::<bool>()).prop_map(|(mut levels, hash)| {
            if hash || levels.is_empty() {
                levels.push("#");
            }
            levels.join("/")
        })
    }

    proptest! {
        #[test]
        fn trie_agrees_with_the_reference_matcher(
            stored in prop::collection::vec((topic(), any::<bool>()), 0..24),
            filters in prop::collection::vec(filter(), 1..8),
        ) {
            let mut trie = RetainedTrie::new();
            for (topic, _) in &stored {
                trie.insert(topic, topic.clone());
            }
            // Clear some, as an empty retained PUBLISH would.
            for (topic, clear) in &stored {
                if *clear {
                    trie.remove(topic);
                }
            }
            let mut kept: Vec<String> = stored
                .iter()
                .filter(|(topic, _)| !stored.iter().any(|(t, clear)| t == topic && *clear))
                .map(|(topic, _)| topic.clone())
                .collect();
            kept.sort_unstable();
            kept.dedup();
            prop_assert_eq!(trie.len(), kept.len());
            for filter in &filters {
                let want: Vec<String> =
                    kept.iter().filter(|topic| filter_matches(filter, topic)).cloned().collect();
                prop_assert_eq!(matched(&trie, filter), want, "filter {:?}", filter);
            }
            for topic in &kept {
                prop_assert_eq!(trie.remove(topic), Some(topic.clone()));
            }
            prop_assert!(trie.is_empty());
            prop_assert_eq!(trie.node_count(), 1);
        }

        /// Unvalidated input (wildcards in names, `#` not last in filters) must not panic.
        #[test]
        fn arbitrary_input_never_panics(
            ops in prop::collection::vec(("[a+#/$]{0,8}", any::<bool>()), 0..16),
            filters in prop::collection::vec("[a+#/$]{0,8}", 0..8),
        ) {
            let mut trie = RetainedTrie::new();
            for (topic, insert) in &ops {
                if *insert {
                    trie.insert(topic, ());
                } else {
                    trie.remove(topic);
                }
            }
            for filter in &filters {
                trie.for_each_match(filter, |_, _| {});
                let _ = trie.get(filter);
            }
            for (topic, _) in &ops {
                trie.remove(topic);
            }
            prop_assert!(trie.is_empty());
            prop_assert_eq!(trie.node_count(), 1);
        }
    }
}

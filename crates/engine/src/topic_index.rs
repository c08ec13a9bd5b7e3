//! The subscription index: which sessions want a PUBLISH on a given topic name.
//!
//! Structure: a trie with one node per topic-filter level (the filter split on `/`). A node
//! holds the subscribers whose filter ends exactly there, its literal children in a `HashMap`
//! keyed by level, and two separate slots for the `+` and `#` children.
//!
//! Why this shape: matching runs for every PUBLISH, so its cost must depend on the topic's
//! depth and on the number of matching filters, not on the total number of subscriptions. At
//! each topic level the matcher does one hash lookup for the literal child and follows the `+`
//! slot directly; the wildcards never go through the hash map, and a `#` child is reported
//! without descending any further. The walk uses an inline stack, so a match on an ordinary
//! topic allocates nothing.
//!
//! Depth is chosen by peers (a filter may have tens of thousands of levels), so nothing here
//! recurses over the trie: matching, insertion, removal and `Drop` are all loops.
//!
//! Wildcard rules (MQTT 3.1.1 and 5.0 §4.7): `+` matches exactly one level, which may be empty;
//! `#` matches its parent level and any number of child levels; levels may be empty; and a
//! filter whose first level is a wildcard does not match a topic name beginning with `$`
//! [MQTT-4.7.2-1].

use std::collections::HashMap;

/// Maps of the tries hash with foldhash: seeded per map from a per-process random seed, so
/// peer-chosen levels cannot be aimed at collisions ahead of time, and several times faster
/// than SipHash on the short keys topic levels are.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::fmt;
use std::hash::Hash;

/// Subscriptions keyed by (topic filter, session key), matched against topic names.
///
/// `K` is a small session handle; `V` is whatever the caller needs at delivery time
/// (granted QoS, v5 subscription options, subscription identifier).
pub struct SubscriptionIndex<K, V> {
    /// Stands for the empty prefix; it never holds subscribers itself because every filter has
    /// at least one level, and it is never pruned.
    root: Node<K, V>,
    /// Number of (filter, key) pairs, kept so `len` does not walk the trie.
    len: usize,
}

struct Node<K, V> {
    /// Literal levels (peer-chosen strings: the map's hasher is randomly seeded).
    children: Map<Box<str>, Node<K, V>>,
    /// The `+` child, outside `children` so matching reaches it without hashing. Boxed to keep
    /// nodes that have no wildcard child small.
    plus: Option<Box<Node<K, V>>>,
    /// The `#` child. Only its subscribers are ever matched, since `#` is the last level of a
    /// valid filter; children under it can exist only if the caller skipped validation, and
    /// are then unreachable by matching but still removable.
    hash: Option<Box<Node<K, V>>>,
    /// Sessions whose filter ends at this node. A map rather than a vector because one filter
    /// can have a very large number of subscribers (a broadcast topic), and subscribe and
    /// unsubscribe must stay O(1) for each of them.
    subscribers: Map<K, V>,
}

impl<K, V> Node<K, V> {
    fn new() -> Self {
        Node {
            children: Map::default(),
            plus: None,
            hash: None,
            subscribers: Map::default(),
        }
    }

    fn child(&self, level: &str) -> Option<&Node<K, V>> {
        match level {
            "+" => self.plus.as_deref(),
            "#" => self.hash.as_deref(),
            _ => self.children.get(level),
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<K, V>> {
        match level {
            "+" => self.plus.as_deref_mut(),
            "#" => self.hash.as_deref_mut(),
            _ => self.children.get_mut(level),
        }
    }

    fn child_or_insert(&mut self, level: &str) -> &mut Node<K, V> {
        match level {
            "+" => self.plus.get_or_insert_with(|| Box::new(Node::new())),
            "#" => self.hash.get_or_insert_with(|| Box::new(Node::new())),
            _ => self.children.entry(level.into()).or_insert_with(Node::new),
        }
    }

    fn take_child(&mut self, level: &str) -> Option<Node<K, V>> {
        match level {
            "+" => self.plus.take().map(|node| *node),
            "#" => self.hash.take().map(|node| *node),
            _ => self.children.remove(level),
        }
    }

    fn child_count(&self) -> usize {
        self.children.len() + usize::from(self.plus.is_some()) + usize::from(self.hash.is_some())
    }

    fn has_children(&self) -> bool {
        self.child_count() != 0
    }

    /// Moves every child into `out`, leaving this node a leaf.
    fn take_children_into(&mut self, out: &mut Vec<Node<K, V>>) {
        out.extend(std::mem::take(&mut self.children).into_values());
        out.extend(self.plus.take().map(|node| *node));
        out.extend(self.hash.take().map(|node| *node));
    }
}

/// The derived drop would recurse once per level, and a peer can build a chain of tens of
/// thousands of levels; that would overflow a task's stack. Children are detached into a
/// worklist instead, so each node is dropped as a leaf.
impl<K, V> Drop for Node<K, V> {
    fn drop(&mut self) {
        if !self.has_children() {
            return;
        }
        let mut pending = Vec::new();
        self.take_children_into(&mut pending);
        while let Some(mut node) = pending.pop() {
            node.take_children_into(&mut pending);
        }
    }
}

impl<K: Copy + Eq + Hash, V> SubscriptionIndex<K, V> {
    pub fn new() -> Self {
        SubscriptionIndex {
            root: Node::new(),
            len: 0,
        }
    }

    /// Adds or replaces the subscription of `key` to `filter`; returns the previous value for
    /// (key, filter) if any.
    ///
    /// `filter` must already be valid (wildcards only as whole levels, `#` last); an invalid one
    /// is stored without panicking but may never match.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.child_or_insert(level);
        }
        let previous = node.subscribers.insert(key, value);
        if previous.is_none() {
            self.len += 1;
        }
        previous
    }

    /// Removes the subscription of `key` to `filter`; returns its value if it existed.
    ///
    /// Nodes left with no subscribers and no children are pruned, so memory returns after
    /// unsubscribe and stale levels do not slow matching down.
    pub fn remove(&mut self, filter: &str, key: K) -> Option<V> {
        // First pass, read-only: find the subscription and the highest edge whose whole
        // subtree becomes empty once it is gone. Nothing is changed if the subscription does
        // not exist.
        let mut node = &self.root;
        // Index of the edge above the trailing run of nodes that have no subscribers and only
        // the one child on our path: the run that dies with the target.
        let mut run_start: Option<usize> = None;
        let mut run_above_target: Option<usize> = None;
        let mut target_edge = 0;
        for (edge, level) in filter.split('/').enumerate() {
            node = node.child(level)?;
            run_above_target = run_start;
            let passthrough = node.subscribers.is_empty() && node.child_count() == 1;
            run_start = if passthrough {
                run_start.or(Some(edge))
            } else {
                None
            };
            target_edge = edge;
        }
        if !node.subscribers.contains_key(&key) {
            return None;
        }
        let target_empties = node.subscribers.len() == 1 && !node.has_children();
        let cut = if target_empties {
            Some(run_above_target.unwrap_or(target_edge))
        } else {
            None
        };

        // Second pass: take the subscription out, detaching the dead subtree if there is one.
        let mut levels = filter.split('/');
        let value = match cut {
            None => {
                let mut node = &mut self.root;
                for level in levels {
                    node = node.child_mut(level)?;
                }
                node.subscribers.remove(&key)?
            }
            Some(cut) => {
                let mut parent = &mut self.root;
                for level in levels.by_ref().take(cut) {
                    parent = parent.child_mut(level)?;
                }
                let mut detached = parent.take_child(levels.next()?)?;
                let mut node = &mut detached;
                for level in levels {
                    node = node.child_mut(level)?;
                }
                node.subscribers.remove(&key)?
                // `detached` is dropped here, iteratively (see `Drop for Node`).
            }
        };
        self.len -= 1;
        Some(value)
    }

    /// Calls `f(key, &value)` once for each subscription whose filter matches `topic` (a topic
    /// name, no wildcards). A key subscribed with several matching filters is reported once per
    /// matching filter; merging the overlaps is the caller's policy (MQTT 5 allows either).
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(K, &V)) {
        let (first, rest) = split_first_level(topic);
        let mut stack: InlineStack<(&Node<K, V>, Option<&str>), MATCH_STACK_INLINE> =
            InlineStack::new();

        // The root is handled apart because of the `$` rule [MQTT-4.7.2-1]: filters whose first
        // level is a wildcard do not see topics beginning with `$`.
        if !topic.starts_with('$') {
            if let Some(hash) = &self.root.hash {
                report(hash, &mut f);
            }
            if let Some(plus) = &self.root.plus {
                stack.push((plus, rest));
            }
        }
        if let Some(child) = self.root.children.get(first) {
            stack.push((child, rest));
        }

        // Each entry is a node whose filter prefix matched the topic so far, with the rest of
        // the topic (`None` once every level has been consumed).
        while let Some((node, rest)) = stack.pop() {
            // `#` matches the parent level as well as any number of children.
            if let Some(hash) = &node.hash {
                report(hash, &mut f);
            }
            match rest {
                None => report(node, &mut f),
                Some(rest) => {
                    let (level, rest) = split_first_level(rest);
                    if let Some(plus) = &node.plus {
                        stack.push((plus, rest));
                    }
                    if let Some(child) = node.children.get(level) {
                        stack.push((child, rest));
                    }
                }
            }
        }
    }

    /// Number of (filter, key) subscriptions.
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
            pending.extend(node.plus.as_deref());
            pending.extend(node.hash.as_deref());
        }
        count
    }
}

impl<K: Copy + Eq + Hash, V> Default for SubscriptionIndex<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

/// Shallow on purpose: a derived `Debug` would print (and recurse through) the whole trie.
impl<K, V> fmt::Debug for SubscriptionIndex<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionIndex")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

fn report<K: Copy, V>(node: &Node<K, V>, f: &mut impl FnMut(K, &V)) {
    for (key, value) in &node.subscribers {
        f(*key, value);
    }
}

/// Splits off the first `/`-separated level; the rest is `None` when there is no separator
/// (so "a/" gives ("a", Some("")), an empty last level, and "a" gives ("a", None)).
pub(crate) fn split_first_level(s: &str) -> (&str, Option<&str>) {
    // A byte scan: '/' is ASCII, so the split is always on a character boundary, and topic
    // levels are short enough that a plain loop beats the general `str` searcher.
    match s.bytes().position(|b| b == b'/') {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}

/// Entries kept inline by the matcher's stack. The stack holds at most about one entry per
/// topic level, so this covers any realistic topic without touching the heap; deeper topics
/// spill into a `Vec`.
const MATCH_STACK_INLINE: usize = 16;

/// A LIFO stack whose first `N` entries live inline (on the caller's stack frame), spilling to
/// the heap only past that. Keeps the per-publish match free of allocation.
pub(crate) struct InlineStack<T, const N: usize> {
    inline: [Option<T>; N],
    inline_len: usize,
    /// Entries pushed while `inline` was full. Non-empty only when `inline` is full, so popping
    /// from here first keeps LIFO order.
    spill: Vec<T>,
}

impl<T, const N: usize> InlineStack<T, N> {
    pub(crate) fn new() -> Self {
        InlineStack {
            inline: std::array::from_fn(|_| None),
            inline_len: 0,
            spill: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, item: T) {
        match self.inline.get_mut(self.inline_len) {
            Some(slot) => {
                *slot = Some(item);
                self.inline_len += 1;
            }
            None => self.spill.push(item),
        }
    }

    pub(crate) fn pop(&mut self) -> Option<T> {
        if let Some(item) = self.spill.pop() {
            return Some(item);
        }
        self.inline_len = self.inline_len.checked_sub(1)?;
        self.inline.get_mut(self.inline_len)?.take()
    }
}

/// The reference matcher: does topic filter `filter` match topic name `topic`?
///
/// Written for obviousness, not speed; the index, the retained store and the fuzz targets are
/// checked against it. `filter` is assumed valid (wildcards only as whole levels, `#` last);
/// for an invalid one the answer is unspecified, but it never panics.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    // [MQTT-4.7.2-1]: a filter starting with a wildcard does not match a `$` topic.
    let first_level = filter.split('/').next().unwrap_or("");
    if topic.starts_with('$') && (first_level == "+" || first_level == "#") {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            // `#` matches whatever is left, including nothing (the parent level).
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// (case, filter, topic, matches)
    const MATCH_CASES: &[(&str, &str, &str, bool)] = &[
        ("literal equal", "a/b", "a/b", true),
        ("literal differs", "a/b", "a/c", false),
        ("topic longer than filter", "a", "a/b", false),
        ("topic shorter than filter", "a/b", "a", false),
        ("levels are case sensitive", "A", "a", false),
        (
            "level is not a prefix",
            "sport/tennis",
            "sport/tenni",
            false,
        ),
        // Single-level wildcard [MQTT-4.7.1-3], §4.7.1.3.
        (
            "+ matches one level [MQTT-4.7.1-3]",
            "sport/+",
            "sport/tennis",
            true,
        ),
        (
            "+ does not match two levels [MQTT-4.7.1-3]",
            "sport/+",
            "sport/tennis/x",
            false,
        ),
        (
            "+ does not match the parent level [MQTT-4.7.1-3]",
            "sport/+",
            "sport",
            false,
        ),
        (
            "+ matches an empty last level [MQTT-4.7.1-3]",
            "sport/+",
            "sport/",
            true,
        ),
        (
            "+ matches an empty first level [MQTT-4.7.1-3]",
            "+/finance",
            "/finance",
            true,
        ),
        (
            "+/+ matches /finance [MQTT-4.7.1-3]",
            "+/+",
            "/finance",
            true,
        ),
        ("/+ matches /finance [MQTT-4.7.1-3]", "/+", "/finance", true),
        (
            "+ does not match /finance [MQTT-4.7.1-3]",
            "+",
            "/finance",
            false,
        ),
        ("+ in the middle [MQTT-4.7.1-3]", "a/+/c", "a/b/c", true),
        (
            "+ in the middle, empty level [MQTT-4.7.1-3]",
            "a/+/c",
            "a//c",
            true,
        ),
        ("+ only [MQTT-4.7.1-3]", "+", "a", true),
        // Multi-level wildcard [MQTT-4.7.1-2], §4.7.1.2.
        ("# matches everything [MQTT-4.7.1-2]", "#", "a/b/c", true),
        (
            "# matches the parent level [MQTT-4.7.1-2]",
            "sport/#",
            "sport",
            true,
        ),
        (
            "# matches one child [MQTT-4.7.1-2]",
            "sport/#",
            "sport/tennis",
            true,
        ),
        (
            "# matches many children [MQTT-4.7.1-2]",
            "sport/tennis/#",
            "sport/tennis/p1/rank",
            true,
        ),
        (
            "# matches an empty child [MQTT-4.7.1-2]",
            "sport/#",
            "sport/",
            true,
        ),
        (
            "# does not match a sibling [MQTT-4.7.1-2]",
            "sport/tennis/#",
            "sport/golf",
            false,
        ),
        (
            "# does not match above its parent [MQTT-4.7.1-2]",
            "sport/tennis/#",
            "sport",
            false,
        ),
        ("+/# matches one level [MQTT-4.7.1-2]", "+/#", "a", true),
        (
            "+/# matches many levels [MQTT-4.7.1-2]",
            "+/#",
            "a/b/c",
            true,
        ),
        // Empty levels (§4.7.3: adjacent separators make a zero-length level).
        ("empty middle level is a level", "a//b", "a//b", true),
        ("empty middle level is not skipped", "a//b", "a/b", false),
        ("leading separator makes an empty level", "/a", "/a", true),
        ("leading separator is significant", "/a", "a", false),
        ("trailing separator is significant", "a/", "a", false),
        ("empty topic equals empty filter", "", "", true),
        // `$` topics [MQTT-4.7.2-1].
        (
            "# does not match $SYS [MQTT-4.7.2-1]",
            "#",
            "$SYS/uptime",
            false,
        ),
        ("# does not match $ alone [MQTT-4.7.2-1]", "#", "$", false),
        (
            "+/x does not match $SYS/x [MQTT-4.7.2-1]",
            "+/uptime",
            "$SYS/uptime",
            false,
        ),
        (
            "+/# does not match $SYS [MQTT-4.7.2-1]",
            "+/#",
            "$SYS/a",
            false,
        ),
        ("+ does not match $SYS [MQTT-4.7.2-1]", "+", "$SYS", false),
        (
            "$SYS/# matches $SYS/a/b [MQTT-4.7.2-1]",
            "$SYS/#",
            "$SYS/broker/uptime",
            true,
        ),
        ("$SYS/# matches $SYS [MQTT-4.7.2-1]", "$SYS/#", "$SYS", true),
        (
            "$SYS/+/x matches $SYS/a/x [MQTT-4.7.2-1]",
            "$SYS/+/x",
            "$SYS/a/x",
            true,
        ),
        (
            "$ later in the topic is ordinary [MQTT-4.7.2-1]",
            "+/$b",
            "a/$b",
            true,
        ),
        (
            "# matches $ after the first level [MQTT-4.7.2-1]",
            "a/#",
            "a/$b",
            true,
        ),
        (
            "$ inside the first level is ordinary [MQTT-4.7.2-1]",
            "#",
            "a$b",
            true,
        ),
    ];

    fn matched_keys(
        index: &SubscriptionIndex<u32, &'static str>,
        topic: &str,
    ) -> Vec<(u32, &'static str)> {
        let mut found = Vec::new();
        index.for_each_match(topic, |key, filter| found.push((key, *filter)));
        found.sort_unstable();
        found
    }

    #[test]
    fn matching_rules() {
        for &(case, filter, topic, expected) in MATCH_CASES {
            assert_eq!(
                filter_matches(filter, topic),
                expected,
                "reference matcher: {case}: {filter:?} vs {topic:?}"
            );
            let mut index = SubscriptionIndex::new();
            index.insert(filter, 7, filter);
            let want = if expected { vec![(7, filter)] } else { vec![] };
            assert_eq!(
                matched_keys(&index, topic),
                want,
                "index: {case}: {filter:?} vs {topic:?}"
            );
        }
    }

    #[test]
    fn overlapping_filters_are_reported_once_each() {
        let mut index = SubscriptionIndex::new();
        for filter in ["a/b", "a/+", "+/b", "#", "a/#", "a/b/#"] {
            index.insert(filter, 1, filter);
        }
        index.insert("a/b", 2, "a/b");
        index.insert("a/c", 3, "a/c");
        assert_eq!(
            matched_keys(&index, "a/b"),
            vec![
                (1, "#"),
                (1, "+/b"),
                (1, "a/#"),
                (1, "a/+"),
                (1, "a/b"),
                (1, "a/b/#"),
                (2, "a/b"),
            ]
        );
        assert_eq!(
            matched_keys(&index, "a/c"),
            vec![(1, "#"), (1, "a/#"), (1, "a/+"), (3, "a/c")]
        );
    }

    #[test]
    fn insert_replaces_the_value_of_the_same_key_and_filter() {
        let mut index = SubscriptionIndex::new();
        assert_eq!(index.insert("a/+", 1, "qos0"), None);
        assert_eq!(index.insert("a/+", 1, "qos1"), Some("qos0"));
        assert_eq!(index.insert("a/+", 2, "qos2"), None);
        assert_eq!(index.len(), 2);
        assert_eq!(matched_keys(&index, "a/x"), vec![(1, "qos1"), (2, "qos2")]);
    }

    #[test]
    fn remove_of_a_missing_subscription_changes_nothing() {
        let mut index = SubscriptionIndex::new();
        index.insert("a/b", 1, "a/b");
        assert_eq!(index.remove("a/b", 2), None, "other key");
        assert_eq!(index.remove("a", 1), None, "prefix of the filter");
        assert_eq!(index.remove("a/b/c", 1), None, "extension of the filter");
        assert_eq!(index.remove("a/+", 1), None, "wildcard is not a literal");
        assert_eq!(index.len(), 1);
        assert_eq!(index.node_count(), 3);
        assert_eq!(matched_keys(&index, "a/b"), vec![(1, "a/b")]);
    }

    #[test]
    fn remove_prunes_only_nodes_that_became_empty() {
        let mut index = SubscriptionIndex::new();
        index.insert("a/b", 1, "a/b");
        index.insert("a/b/c/d", 1, "a/b/c/d");
        index.insert("a/+/#", 2, "a/+/#");
        // root, a, b, c, d, +, #
        assert_eq!(index.node_count(), 7);

        assert_eq!(index.remove("a/b/c/d", 1), Some("a/b/c/d"));
        assert_eq!(
            index.node_count(),
            5,
            "c and d pruned, b kept for its subscriber"
        );
        assert_eq!(index.remove("a/b", 1), Some("a/b"));
        assert_eq!(index.node_count(), 4, "b pruned, a kept for its + child");
        assert_eq!(index.remove("a/+/#", 2), Some("a/+/#"));
        assert_eq!(index.node_count(), 1);
        assert!(index.is_empty());
    }

    #[test]
    fn removing_everything_returns_to_the_bare_root() {
        let filters = [
            "#", "+", "a", "a/b", "a/+/c", "a/#", "/", "//", "", "$SYS/#", "+/+/+",
        ];
        let mut index = SubscriptionIndex::new();
        for (key, filter) in filters.iter().enumerate() {
            index.insert(filter, key, ());
            index.insert(filter, key + 100, ());
        }
        assert_eq!(index.len(), filters.len() * 2);
        for (key, filter) in filters.iter().enumerate() {
            assert_eq!(index.remove(filter, key), Some(()));
            assert_eq!(index.remove(filter, key + 100), Some(()));
        }
        assert!(index.is_empty());
        assert_eq!(index.node_count(), 1);
    }

    /// A peer can subscribe to a filter with tens of thousands of levels; recursion over the
    /// trie would overflow the stack in match, remove or drop.
    #[test]
    fn very_deep_filters_do_not_overflow_the_stack() {
        let deep = "a/".repeat(60_000) + "#";
        let deep_plus = "+/".repeat(60_000) + "a";
        let mut index = SubscriptionIndex::new();
        index.insert(&deep, 1, ());
        index.insert(&deep_plus, 2, ());
        index.insert(&deep_plus, 3, ());
        let topic = "a/".repeat(60_000) + "a";
        let mut keys = Vec::new();
        index.for_each_match(&topic, |key, _| keys.push(key));
        keys.sort_unstable();
        assert_eq!(keys, vec![1, 2, 3]);
        assert_eq!(index.remove(&deep_plus, 2), Some(()));
        assert_eq!(index.remove(&deep, 1), Some(()));
        drop(index); // still holds the deep `+` chain for key 3
    }

    #[test]
    fn inline_stack_is_lifo_across_the_spill() {
        let mut stack: InlineStack<u32, 2> = InlineStack::new();
        for i in 0..5 {
            stack.push(i);
        }
        assert_eq!(stack.pop(), Some(4));
        stack.push(9);
        let rest: Vec<u32> = std::iter::from_fn(|| stack.pop()).collect();
        assert_eq!(rest, vec![9, 3, 2, 1, 0]);
    }

    /// Levels chosen to collide often, with the cases the rules single out: empty levels,
    /// `$` levels, and a level that looks like a wildcard only in a filter.
    fn topic_level() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["", "a", "b", "$SYS", "$"])
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(topic_level(), 1..5).prop_map(|levels| levels.join("/"))
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

    /// The subscriptions matching `topic` by the reference matcher, as sorted (key, filter).
    fn reference_matches(subs: &[(String, u8)], topic: &str) -> Vec<(u8, String)> {
        let mut want: Vec<(u8, String)> = subs
            .iter()
            .filter(|(filter, _)| filter_matches(filter, topic))
            .map(|(filter, key)| (*key, filter.clone()))
            .collect();
        want.sort_unstable();
        want.dedup();
        want
    }

    fn index_matches(index: &SubscriptionIndex<u8, String>, topic: &str) -> Vec<(u8, String)> {
        let mut got = Vec::new();
        index.for_each_match(topic, |key, filter| got.push((key, filter.clone())));
        got.sort_unstable();
        got
    }

    proptest! {
        #[test]
        fn index_agrees_with_the_reference_matcher(
            subs in prop::collection::vec((filter(), 0u8..4), 0..24),
            topics in prop::collection::vec(topic(), 1..8),
        ) {
            let mut index = SubscriptionIndex::new();
            for (filter, key) in &subs {
                index.insert(filter, *key, filter.clone());
            }
            for topic in &topics {
                prop_assert_eq!(index_matches(&index, topic), reference_matches(&subs, topic), "topic {:?}", topic);
            }
        }

        #[test]
        fn remove_leaves_exactly_the_rest(
            subs in prop::collection::vec((filter(), 0u8..4, any::<bool>()), 0..24),
            topics in prop::collection::vec(topic(), 1..8),
        ) {
            let mut index = SubscriptionIndex::new();
            for (filter, key, _) in &subs {
                index.insert(filter, *key, filter.clone());
            }
            let mut kept = Vec::new();
            for (filter, key, keep) in &subs {
                if *keep {
                    kept.push((filter.clone(), *key));
                } else {
                    // A duplicate (filter, key) may already be gone.
                    index.remove(filter, *key);
                }
            }
            // Removal of a duplicate may have taken a pair that is also in `kept`; re-add them.
            for (filter, key) in &kept {
                index.insert(filter, *key, filter.clone());
            }
            let mut distinct = kept.clone();
            distinct.sort_unstable();
            distinct.dedup();
            prop_assert_eq!(index.len(), distinct.len());
            for topic in &topics {
                prop_assert_eq!(index_matches(&index, topic), reference_matches(&kept, topic), "topic {:?}", topic);
            }
            for (filter, key) in &distinct {
                prop_assert!(index.remove(filter, *key).is_some());
            }
            prop_assert!(index.is_empty());
            prop_assert_eq!(index.node_count(), 1);
        }

        /// Unvalidated input (wildcards inside levels, `#` not last) must not panic.
        #[test]
        fn arbitrary_input_never_panics(
            ops in prop::collection::vec(("[a+#/$]{0,8}", 0u8..3, any::<bool>()), 0..16),
            topics in prop::collection::vec("[a+#/$]{0,8}", 0..8),
        ) {
            let mut index = SubscriptionIndex::new();
            for (filter, key, insert) in &ops {
                if *insert {
                    index.insert(filter, *key, ());
                } else {
                    index.remove(filter, *key);
                }
            }
            for topic in &topics {
                index.for_each_match(topic, |_, _| {});
                let _ = filter_matches(topic, topic);
            }
            for (filter, key, _) in &ops {
                index.remove(filter, *key);
            }
            prop_assert!(index.is_empty());
            prop_assert_eq!(index.node_count(), 1);
        }
    }
}

//! What the other nodes are interested in, as this node learns it from the interest bucket:
//! which nodes have ordinary subscriptions matching a topic, and which shared groups (on any
//! node) match it. QoS 1/2 messages go to exactly those nodes and groups through JetStream;
//! for QoS 0 it only says whether anyone at all is interested (NATS subject interest does
//! the rest).
//!
//! Keys in the bucket (see [`crate::names`]):
//! - `o.<node>.<filter>`: `node` has at least one ordinary subscription with `filter`;
//! - `g.<group>.<node>`: `node` has members of shared group `group` (a hash of share name
//!   and filter); the value is `share NUL filter`.

use std::collections::{HashMap, HashSet};

use petrel_codec::TopicFilter;
use petrel_engine::topic_index::SubscriptionIndex;

use crate::names;

/// A shared group somewhere in the cluster.
pub(crate) struct Group {
    pub share: Box<str>,
    pub filter: TopicFilter,
    nodes: HashSet<u32>,
}

#[derive(Default)]
pub(crate) struct RemoteInterest {
    ids: HashMap<Box<str>, u32>,
    names: Vec<Box<str>>,
    ordinary: SubscriptionIndex<u32, ()>,
    /// (filter, node) pairs present, to apply repeats and deletes exactly.
    present: HashSet<(TopicFilter, u32)>,
    groups: HashMap<u64, Group>,
    group_index: SubscriptionIndex<u64, ()>,
}

/// Where a QoS 1/2 message goes.
#[derive(Default, Debug, PartialEq, Eq)]
pub(crate) struct Targets {
    pub nodes: Vec<Box<str>>,
    pub groups: Vec<u64>,
}

impl RemoteInterest {
    fn id(&mut self, node: &str) -> u32 {
        if let Some(&id) = self.ids.get(node) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(node.into());
        self.ids.insert(node.into(), id);
        id
    }

    /// Applies one bucket entry: `value` is `None` for a delete. Returns false for a key it
    /// does not understand.
    pub fn apply(&mut self, key: &str, value: Option<&[u8]>) -> bool {
        if let Some(rest) = key.strip_prefix("o.") {
            let Some((node, filter)) = rest.split_once('.') else {
                return false;
            };
            let Some(filter) = names::decode_filter(filter) else {
                return false;
            };
            let id = self.id(node);
            match value {
                Some(_) => {
                    if self.present.insert((filter.clone(), id)) {
                        self.ordinary.insert(&filter, id, ());
                    }
                }
                None => {
                    if self.present.remove(&(filter.clone(), id)) {
                        self.ordinary.remove(&filter, id);
                    }
                }
            }
            true
        } else if let Some(rest) = key.strip_prefix("g.") {
            let Some((hash, node)) = rest.split_once('.') else {
                return false;
            };
            let Ok(hash) = u64::from_str_radix(hash, 16) else {
                return false;
            };
            let id = self.id(node);
            match value {
                Some(value) => {
                    if !self.groups.contains_key(&hash) {
                        let Some((share, filter)) = names::decode_group(value) else {
                            return false;
                        };
                        self.group_index.insert(&filter, hash, ());
                        self.groups.insert(
                            hash,
                            Group {
                                share,
                                filter,
                                nodes: HashSet::new(),
                            },
                        );
                    }
                    if let Some(group) = self.groups.get_mut(&hash) {
                        group.nodes.insert(id);
                    }
                }
                None => {
                    if let Some(group) = self.groups.get_mut(&hash) {
                        group.nodes.remove(&id);
                        if group.nodes.is_empty() {
                            self.group_index.remove(&group.filter, hash);
                            self.groups.remove(&hash);
                        }
                    }
                }
            }
            true
        } else {
            false
        }
    }

    /// The nodes other than `me` with an ordinary subscription matching `topic`, and every
    /// shared group matching it.
    pub fn targets(&self, topic: &str, me: &str) -> Targets {
        let me = self.ids.get(me).copied();
        let mut targets = Targets::default();
        let mut nodes = Vec::new();
        self.ordinary.for_each_match(topic, |id, _| {
            if Some(id) != me && !nodes.contains(&id) {
                nodes.push(id);
            }
        });
        targets.nodes = nodes
            .into_iter()
            .map(|id| self.names[id as usize].clone())
            .collect();
        self.group_index
            .for_each_match(topic, |hash, _| targets.groups.push(hash));
        targets
    }

    /// The shared groups known cluster-wide: share name, filter and how many nodes have
    /// members.
    pub fn groups(&self) -> Vec<(String, String, usize)> {
        let mut groups: Vec<_> = self
            .groups
            .values()
            .map(|g| (g.share.to_string(), g.filter.to_string(), g.nodes.len()))
            .collect();
        groups.sort();
        groups
    }

    /// How many (filter, node) pairs of ordinary interest other nodes than `me` have, and
    /// how many shared groups there are cluster-wide.
    pub fn counts(&self, me: &str) -> (usize, usize) {
        let me = self.ids.get(me).copied();
        let remote = self.present.iter().filter(|(_, n)| Some(*n) != me).count();
        (remote, self.groups.len())
    }

    /// Forgets everything a node announced (it is gone). Returns the keys to delete.
    pub fn keys_of(&self, node: &str) -> Vec<String> {
        let Some(&id) = self.ids.get(node) else {
            return Vec::new();
        };
        let mut keys: Vec<String> = self
            .present
            .iter()
            .filter(|(_, n)| *n == id)
            .map(|(f, _)| names::ordinary_key(node, f))
            .collect();
        for (hash, group) in &self.groups {
            if group.nodes.contains(&id) {
                keys.push(names::group_key(*hash, node));
            }
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }

    #[test]
    fn targets_are_the_other_nodes_with_a_matching_filter_once_each() {
        let mut t = RemoteInterest::default();
        assert!(t.apply(&names::ordinary_key("a", &f("x/+")), Some(b"")));
        assert!(t.apply(&names::ordinary_key("a", &f("x/#")), Some(b"")));
        assert!(t.apply(&names::ordinary_key("b", &f("x/y")), Some(b"")));
        assert!(t.apply(&names::ordinary_key("c", &f("z")), Some(b"")));
        let mut nodes = t.targets("x/y", "b").nodes;
        nodes.sort();
        assert_eq!(nodes, vec!["a".into()]);
        // Counted for operators: the other nodes' pairs.
        assert_eq!(t.counts("a"), (2, 0));
        assert_eq!(t.counts("b"), (3, 0));
        let mut nodes = t.targets("x/y", "c").nodes;
        nodes.sort();
        assert_eq!(nodes, vec!["a".into(), "b".into()]);
        // `#` at the top does not match `$` topics.
        t.apply(&names::ordinary_key("c", &f("#")), Some(b""));
        assert!(t.targets("$x/y", "a").nodes.is_empty());
        // A delete removes exactly that node's filter.
        t.apply(&names::ordinary_key("a", &f("x/+")), None);
        let mut nodes = t.targets("x/y", "b").nodes;
        nodes.sort();
        assert_eq!(nodes, vec!["a".into(), "c".into()]);
        t.apply(&names::ordinary_key("a", &f("x/#")), None);
        assert_eq!(t.targets("x/y", "b").nodes, vec!["c".into()]);
    }

    #[test]
    fn a_group_lasts_while_some_node_has_members() {
        let mut t = RemoteInterest::default();
        let hash = names::group_hash("g", &f("s/+"));
        let value = names::group_value("g", &f("s/+"));
        t.apply(&names::group_key(hash, "a"), Some(&value));
        t.apply(&names::group_key(hash, "b"), Some(&value));
        assert_eq!(t.targets("s/1", "a").groups, vec![hash]);
        t.apply(&names::group_key(hash, "a"), None);
        assert_eq!(t.targets("s/1", "a").groups, vec![hash]);
        assert_eq!(t.groups(), vec![("g".into(), "s/+".into(), 1)]);
        t.apply(&names::group_key(hash, "b"), None);
        assert!(t.targets("s/1", "a").groups.is_empty());
        assert_eq!(t.keys_of("a"), Vec::<String>::new());
        assert_eq!(t.counts("a"), (0, 0));
    }

    #[test]
    fn foreign_keys_are_refused() {
        let mut t = RemoteInterest::default();
        assert!(!t.apply("x.y", Some(b"")));
        assert!(!t.apply("o.nodeonly", Some(b"")));
        assert!(!t.apply("g.zz.a", Some(b"")));
    }
}

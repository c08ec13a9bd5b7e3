//! Topic filters and names from arbitrary bytes, through the parser and both tries, checked
//! against the reference matcher (`petrel_engine::topic_index::filter_matches`).
//!
//! Input: strings separated by 0xFF bytes (invalid in UTF-8, so never inside a string). Each
//! string is offered both as a filter and as a topic name; the parser decides which it may be.
//! Every valid filter is subscribed (one session key per filter) and every valid name retained;
//! then for each name, the subscription index must return exactly the filters the reference
//! matcher says match it, and for each filter the retained trie exactly the names that match.
//! A few filters are then unsubscribed (chosen by the input) and the check runs again.

use std::collections::BTreeSet;

use petrel_codec::{TopicFilter, TopicName};
use petrel_engine::retained::RetainedTrie;
use petrel_engine::topic_index::{filter_matches, SubscriptionIndex};

/// Strings taken from one input at most: enough for interesting tries, small enough that the
/// quadratic reference check stays fast.
const MAX_STRINGS: usize = 48;

pub fn topics(data: &[u8]) {
    let strings: Vec<String> = data
        .split(|&b| b == 0xff)
        .take(MAX_STRINGS)
        .filter_map(|s| std::str::from_utf8(s).ok())
        .map(str::to_owned)
        .collect();
    let filters: BTreeSet<String> = strings
        .iter()
        .filter(|s| TopicFilter::new(s).is_ok())
        .cloned()
        .collect();
    let names: BTreeSet<String> = strings
        .iter()
        .filter(|s| TopicName::new(s).is_ok())
        .cloned()
        .collect();
    for name in &names {
        assert!(
            !name.contains(['+', '#']),
            "a topic name with a wildcard was accepted: {name:?}"
        );
    }

    let mut index = SubscriptionIndex::new();
    for (key, filter) in filters.iter().enumerate() {
        assert!(index.insert(filter, key, filter.clone()).is_none());
    }
    assert_eq!(index.len(), filters.len());
    let mut retained = RetainedTrie::new();
    for name in &names {
        retained.insert(name, name.clone());
    }
    assert_eq!(retained.len(), names.len());

    check(&index, &retained, &filters, &names);

    // Unsubscribe every filter whose position the input's last byte selects, and check again.
    let stride = usize::from(data.last().copied().unwrap_or(1) % 4) + 1;
    let mut kept = filters.clone();
    for (key, filter) in filters.iter().enumerate() {
        if key % stride == 0 {
            assert_eq!(index.remove(filter, key).as_ref(), Some(filter));
            assert!(index.remove(filter, key).is_none(), "removed twice");
            kept.remove(filter);
        }
    }
    assert_eq!(index.len(), kept.len());
    check(&index, &retained, &kept, &names);
}

fn check(
    index: &SubscriptionIndex<usize, String>,
    retained: &RetainedTrie<String>,
    filters: &BTreeSet<String>,
    names: &BTreeSet<String>,
) {
    for name in names {
        let mut got = BTreeSet::new();
        index.for_each_match(name, |_, filter| {
            assert!(
                got.insert(filter.clone()),
                "{filter:?} matched {name:?} twice"
            );
        });
        let want: BTreeSet<String> = filters
            .iter()
            .filter(|f| filter_matches(f, name))
            .cloned()
            .collect();
        assert_eq!(got, want, "subscriptions matching {name:?}");
    }
    for filter in filters {
        let mut got = BTreeSet::new();
        retained.for_each_match(filter, |topic, value| {
            assert_eq!(topic, value);
            assert!(got.insert(topic.to_owned()), "{topic:?} returned twice");
        });
        let want: BTreeSet<String> = names
            .iter()
            .filter(|n| filter_matches(filter, n))
            .cloned()
            .collect();
        assert_eq!(got, want, "retained messages matching {filter:?}");
    }
}

//! Shared subscriptions (§4.8.2): `$share/{group}/{filter}`. Every session subscribed with the
//! same group name and filter is a member of one [`SharedGroup`]; each matching message goes
//! to one member, chosen in turn among the members that are connected.
//!
//! The groups sit in their own subscription index (keyed by group, not by session), so a
//! publish matches a group once however many members it has, and the choice of member costs
//! one short lock on the group.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use petrel_codec::TopicFilter;

use crate::broker::Subscriber;
use crate::message::SessionId;

/// The parts of a `$share/{group}/{filter}` filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedFilter<'a> {
    pub group: &'a str,
    pub filter: TopicFilter,
}

/// Why a `$share/` filter is not a valid shared subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedFilterError {
    /// The share name is empty or holds `+` or `#` [MQTT-4.8.2-2], or no filter follows it
    /// [MQTT-4.8.2-1].
    Malformed,
}

/// Splits a shared subscription filter; `Ok(None)` for an ordinary filter.
pub fn parse(filter: &str) -> Result<Option<SharedFilter<'_>>, SharedFilterError> {
    let Some(rest) = filter.strip_prefix("$share/") else {
        return Ok(None);
    };
    let Some((group, filter)) = rest.split_once('/') else {
        return Err(SharedFilterError::Malformed);
    };
    if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
        return Err(SharedFilterError::Malformed);
    }
    let filter = TopicFilter::new(filter).map_err(|_| SharedFilterError::Malformed)?;
    Ok(Some(SharedFilter { group, filter }))
}

/// One share group on one filter and its members.
pub struct SharedGroup {
    /// Key in the shared index; unique for the broker's lifetime.
    pub key: u64,
    pub name: Box<str>,
    /// The filter messages are matched against (without the `$share/{group}/` prefix).
    pub filter: TopicFilter,
    members: Mutex<Vec<Subscriber>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for SharedGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedGroup")
            .field("name", &self.name)
            .field("filter", &self.filter)
            .finish()
    }
}

impl SharedGroup {
    pub fn new(key: u64, name: &str, filter: TopicFilter) -> SharedGroup {
        SharedGroup {
            key,
            name: name.into(),
            filter,
            members: Mutex::new(Vec::new()),
            next: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Subscriber>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds or replaces a member's subscription. Returns whether it was already a member.
    pub fn join(&self, member: Subscriber) -> bool {
        let mut members = self.lock();
        match members
            .iter_mut()
            .find(|m| m.session.id == member.session.id)
        {
            Some(existing) => {
                *existing = member;
                true
            }
            None => {
                members.push(member);
                false
            }
        }
    }

    /// Removes a member. Returns whether it was one, and whether the group is now empty.
    pub fn leave(&self, session: SessionId) -> (bool, bool) {
        let mut members = self.lock();
        let before = members.len();
        members.retain(|m| m.session.id != session);
        (members.len() != before, members.is_empty())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The member the next message goes to: members take turns; one with a client connected
    /// is preferred over one whose session is offline (whose queue would only grow), and
    /// `exclude` (a member giving messages back) is never chosen.
    pub fn pick(&self, exclude: Option<SessionId>) -> Option<Subscriber> {
        let members = self.lock();
        let n = members.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut fallback = None;
        for i in 0..n {
            let m = &members[(start + i) % n];
            if Some(m.session.id) == exclude {
                continue;
            }
            if m.session.is_connected() {
                return Some(m.clone());
            }
            if fallback.is_none() {
                fallback = Some(m);
            }
        }
        // Given-back messages only go to a connected member; new ones may queue offline.
        if exclude.is_some() {
            return None;
        }
        fallback.cloned()
    }
}

/// Registry entry type: groups by (name, filter).
pub type GroupKey = (Box<str>, TopicFilter);

/// A handle to the group a shared subscription of a session belongs to.
pub type GroupRef = Arc<SharedGroup>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_share_names_and_filters() {
        assert_eq!(parse("a/b"), Ok(None));
        assert_eq!(
            parse("$share/g/a/+"),
            Ok(Some(SharedFilter {
                group: "g",
                filter: TopicFilter::new("a/+").unwrap()
            }))
        );
        assert_eq!(
            parse("$share/g/#"),
            Ok(Some(SharedFilter {
                group: "g",
                filter: TopicFilter::new("#").unwrap()
            }))
        );
        for bad in [
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/#/a",
            "$share/g/",
        ] {
            assert_eq!(parse(bad), Err(SharedFilterError::Malformed), "{bad}");
        }
        // Only the exact prefix is special.
        assert_eq!(parse("$sharex/g/a"), Ok(None));
        assert_eq!(parse("$SHARE/g/a"), Ok(None));
    }
}

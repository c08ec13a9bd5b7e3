//! Topic authorization: which topics a client may publish to and which it may subscribe to
//! (and so receive from).
//!
//! An [`Acl`] is a list of rules, each naming who it is for (a user, a client id, a
//! certificate identity, anonymous clients, or everyone), what it allows (publish, subscribe
//! or both) and on which topic filters; `%u` and `%c` in a filter stand for the client's user
//! name and client id. Rules only allow: what no rule allows is denied. At CONNECT the rules
//! that apply to the client are compiled into a [`ClientAcl`] of plain filters, so checks on
//! the message path take no lock and do no substitution.
//!
//! A subscription is allowed when one allowed filter covers it (every topic it can match is
//! allowed), refused when no allowed filter overlaps it, and otherwise allowed with a guard:
//! each message it would deliver is checked against the allowed filters that overlap it. So
//! `#` from a client allowed `sensors/+/temp` receives exactly the temperatures. No client
//! publishes under `$SYS/`, whatever the rules say: those topics are the broker's.

use std::collections::HashMap;
use std::sync::Arc;

use petrel_codec::TopicFilter;

use crate::topic_index::filter_matches;

/// What a rule allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Publish,
    Subscribe,
    Both,
}

impl Access {
    fn publish(self) -> bool {
        matches!(self, Access::Publish | Access::Both)
    }

    fn subscribe(self) -> bool {
        matches!(self, Access::Subscribe | Access::Both)
    }
}

/// Whom a rule is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// Clients logged in with this user name (or whose certificate identity serves as one).
    User(String),
    ClientId(String),
    /// Clients whose verified client certificate names this identity.
    Certificate(String),
    /// Clients with no user name and no certificate.
    Anonymous,
    Everyone,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub principal: Principal,
    pub access: Access,
    /// Topic filters, with `%u` (user name) and `%c` (client id) substituted per client.
    pub topics: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("rule {rule}, topic {topic:?}: {why}")]
pub struct AclError {
    /// The rule's position, from 1.
    pub rule: usize,
    pub topic: String,
    pub why: String,
}

/// Who a connected client is, as far as the rules care.
#[derive(Clone, Copy, Debug)]
pub struct Identity<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub certificate: Option<&'a str>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    rules: Vec<Rule>,
    /// Client ids reserved for some logins, and who holds each (see [`Acl::bind`]).
    bindings: HashMap<String, Vec<Principal>>,
}

impl Acl {
    /// Checks every filter (with its placeholders filled by a sample value).
    pub fn new(rules: Vec<Rule>) -> Result<Acl, AclError> {
        for (i, rule) in rules.iter().enumerate() {
            for topic in &rule.topics {
                let sample = topic.replace("%u", "u").replace("%c", "c");
                let err = |why: String| AclError {
                    rule: i + 1,
                    topic: topic.clone(),
                    why,
                };
                TopicFilter::new(&sample).map_err(|e| err(e.to_string()))?;
                if sample.starts_with("$share/") {
                    return Err(err(
                        "a rule names topics, not share groups: write the filter without \
                         $share/{group}/"
                            .into(),
                    ));
                }
                // `%u` must be a whole level, or a user name could widen the filter.
                for level in topic.split('/') {
                    if (level.contains("%u") && level != "%u")
                        || (level.contains("%c") && level != "%c")
                    {
                        return Err(err("%u and %c must each be a whole level".into()));
                    }
                }
            }
        }
        Ok(Acl {
            rules,
            bindings: HashMap::new(),
        })
    }

    /// Reserves `client_id` for the logins `holders` names (users, certificate identities,
    /// or anonymous clients): only they may connect with it, they may open each other's
    /// sessions under it, and `client_id` rules for it apply to them alone. A client id is
    /// chosen by the client, so without a binding it proves nothing: a `client_id` rule for an
    /// id that is not bound applies to no one. `Everyone` holds nothing and is ignored.
    pub fn bind(&mut self, client_id: String, holders: Vec<Principal>) {
        let holders = holders
            .into_iter()
            .filter(|p| !matches!(p, Principal::Everyone | Principal::ClientId(_)));
        self.bindings.entry(client_id).or_default().extend(holders);
    }

    /// Whether `who` may use its client id: `None` when the id is not bound to anyone (the
    /// session-ownership rule alone then decides), otherwise whether `who` holds it.
    pub fn may_use_client_id(&self, who: Identity<'_>) -> Option<bool> {
        let holders = self.bindings.get(who.client_id)?;
        Some(holders.iter().any(|p| holds(p, who)))
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The filters that apply to one client.
    pub fn for_client(&self, who: Identity<'_>) -> ClientAcl {
        // A certificate identity serves as the user name of a client that gave none.
        let username = who.username.or(who.certificate);
        let mut acl = ClientAcl::default();
        for rule in &self.rules {
            let applies = match &rule.principal {
                // Only a login that holds the id gets what a rule grants to it.
                Principal::ClientId(c) => {
                    who.client_id == c && self.may_use_client_id(who) == Some(true)
                }
                other => holds(other, who),
            };
            if !applies {
                continue;
            }
            for topic in &rule.topics {
                let Some(filter) = substitute(topic, username, who.client_id) else {
                    continue;
                };
                if rule.access.publish() {
                    acl.publish.push(filter.clone());
                }
                if rule.access.subscribe() {
                    acl.subscribe.push(filter);
                }
            }
        }
        acl
    }
}

/// Whether `who` is what `principal` names (a client id names no login: see [`Acl::bind`]).
fn holds(principal: &Principal, who: Identity<'_>) -> bool {
    // A certificate identity serves as the user name of a client that gave none.
    let username = who.username.or(who.certificate);
    match principal {
        Principal::User(u) => username == Some(u.as_str()),
        Principal::ClientId(_) => false,
        Principal::Certificate(c) => who.certificate == Some(c.as_str()),
        Principal::Anonymous => who.username.is_none() && who.certificate.is_none(),
        Principal::Everyone => true,
    }
}

/// Fills `%u` and `%c`. A value that is empty or holds `/`, `+` or `#` would make the filter
/// reach other levels or become a wildcard, so such a filter does not apply to this client
/// (nor does one with `%u` for a client without a user name).
fn substitute(topic: &str, username: Option<&str>, client_id: &str) -> Option<TopicFilter> {
    let safe = |v: &str| !v.is_empty() && !v.contains(['/', '+', '#']);
    let mut levels = Vec::new();
    for level in topic.split('/') {
        levels.push(match level {
            "%u" => username.filter(|u| safe(u))?,
            "%c" => Some(client_id).filter(|c| safe(c))?,
            other => other,
        });
    }
    TopicFilter::new(&levels.join("/")).ok()
}

/// What one client may do, compiled from the rules that apply to it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientAcl {
    publish: Vec<TopicFilter>,
    subscribe: Vec<TopicFilter>,
}

/// The outcome of checking a subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every topic the filter can match is allowed.
    Allowed,
    /// Some are: deliver only topics these filters match.
    Guarded(Arc<[TopicFilter]>),
    Denied,
}

impl ClientAcl {
    pub fn may_publish(&self, topic: &str) -> bool {
        !is_sys(topic) && self.publish.iter().any(|f| filter_matches(f, topic))
    }

    /// Whether a message on `topic` may reach this client (retained messages included).
    pub fn may_receive(&self, topic: &str) -> bool {
        self.subscribe.iter().any(|f| filter_matches(f, topic))
    }

    /// Checks a subscription's filter (for a shared subscription, the filter after
    /// `$share/{group}/`).
    pub fn subscription(&self, filter: &str) -> Verdict {
        if self.subscribe.iter().any(|p| covers(p, filter)) {
            return Verdict::Allowed;
        }
        let overlapping: Vec<TopicFilter> = self
            .subscribe
            .iter()
            .filter(|p| overlaps(p, filter))
            .cloned()
            .collect();
        if overlapping.is_empty() {
            Verdict::Denied
        } else {
            Verdict::Guarded(overlapping.into())
        }
    }
}

/// Whether `topic` is one of the broker's own `$SYS` topics, which clients never publish to.
pub fn is_sys(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}

fn wildcard(level: &str) -> bool {
    level == "+" || level == "#"
}

/// Whether a filter's first level can only match `$` topics, only other topics, or both are
/// ruled out by [MQTT-4.7.2-1]: a wildcard first level never matches a `$` topic.
fn dollar_apart(a: &str, b: &str) -> bool {
    let (a, b) = (first_level(a), first_level(b));
    (wildcard(a) && b.starts_with('$')) || (wildcard(b) && a.starts_with('$'))
}

fn first_level(filter: &str) -> &str {
    filter.split('/').next().unwrap_or("")
}

/// Whether every topic `filter` matches is matched by `pattern`.
pub fn covers(pattern: &str, filter: &str) -> bool {
    if dollar_apart(pattern, filter) {
        return false;
    }
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            // `#` also matches the parent level: `a/#` covers `a`.
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(pl), Some(fl)) if pl == fl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some topic is matched by both filters.
pub fn overlaps(a: &str, b: &str) -> bool {
    if dollar_apart(a, b) {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(l), Some(r)) if l == r => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule(principal: Principal, access: Access, topics: &[&str]) -> Rule {
        Rule {
            principal,
            access,
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    fn who<'a>(client_id: &'a str, username: Option<&'a str>) -> Identity<'a> {
        Identity {
            client_id,
            username,
            certificate: None,
        }
    }

    const COVERS: &[(&str, &str, bool)] = &[
        ("#", "a/b", true),
        ("#", "#", true),
        ("a/#", "a", true),
        ("a/#", "a/+/c", true),
        ("a/+", "a/b", true),
        ("a/+", "a/+", true),
        ("a/+", "a/#", false),
        ("a/+", "a/b/c", false),
        ("a/b", "a/+", false),
        ("a/b", "a/b", true),
        ("a/b", "a", false),
        ("+/b", "a/b", true),
        ("#", "$SYS/x", false),
        ("+/x", "$SYS/x", false),
        ("$SYS/#", "$SYS/broker/uptime", true),
    ];

    #[test]
    fn coverage_table() {
        for (pattern, filter, expected) in COVERS {
            assert_eq!(
                covers(pattern, filter),
                *expected,
                "{pattern} covers {filter}"
            );
        }
    }

    const OVERLAPS: &[(&str, &str, bool)] = &[
        ("sensors/+/temp", "#", true),
        ("sensors/+/temp", "sensors/k/+", true),
        ("sensors/+/temp", "sensors/k/hum", false),
        ("a/b", "a/b/#", true),
        ("a/b/c", "a/b", false),
        ("#", "$SYS/#", false),
        ("$SYS/#", "+/broker", false),
        ("+", "+", true),
    ];

    #[test]
    fn overlap_table() {
        for (a, b, expected) in OVERLAPS {
            assert_eq!(overlaps(a, b), *expected, "{a} overlaps {b}");
            assert_eq!(overlaps(b, a), *expected, "{b} overlaps {a}");
        }
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("+".to_owned()),
            Just("$s".to_owned()),
        ]
    }

    fn filter() -> impl Strategy<Value = String> {
        (prop::collection::vec(level(), 1..4), any::<bool>()).prop_map(|(mut levels, hash)| {
            if hash {
                levels.push("#".into());
            }
            levels.join("/")
        })
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(prop_oneof![Just("a"), Just("b"), Just("$s")], 1..5)
            .prop_map(|l| l.join("/"))
    }

    proptest! {
        /// Checked against the reference matcher over small topics: a filter that covers
        /// another matches everything it matches; filters that do not overlap share no topic.
        #[test]
        fn covers_and_overlaps_agree_with_matching(p in filter(), f in filter(), t in topic()) {
            if covers(&p, &f) && filter_matches(&f, &t) {
                prop_assert!(filter_matches(&p, &t), "{p} covers {f} but not {t}");
            }
            if filter_matches(&p, &t) && filter_matches(&f, &t) {
                prop_assert!(overlaps(&p, &f), "{p} and {f} both match {t}");
            }
        }
    }

    #[test]
    fn rules_apply_by_user_client_certificate_and_anonymity() {
        let mut acl = Acl::new(vec![
            rule(
                Principal::User("alice".into()),
                Access::Both,
                &["home/%u/#"],
            ),
            rule(
                Principal::ClientId("dev-1".into()),
                Access::Publish,
                &["devices/%c/up"],
            ),
            rule(
                Principal::Certificate("gw".into()),
                Access::Subscribe,
                &["gw/#"],
            ),
            rule(Principal::Anonymous, Access::Subscribe, &["public/#"]),
            rule(Principal::Everyone, Access::Subscribe, &["news"]),
        ])
        .unwrap();
        // Unbound, a client id proves nothing: its rule grants no one anything.
        let unbound = acl.for_client(who("dev-1", None));
        assert!(!unbound.may_publish("devices/dev-1/up"));
        acl.bind("dev-1".into(), vec![Principal::Anonymous]);
        let alice = acl.for_client(who("x", Some("alice")));
        assert!(alice.may_publish("home/alice/light"));
        assert!(!alice.may_publish("home/bob/light"));
        assert!(alice.may_receive("news") && !alice.may_receive("public/x"));
        let device = acl.for_client(who("dev-1", None));
        assert!(device.may_publish("devices/dev-1/up"));
        assert!(!device.may_publish("devices/dev-2/up"));
        assert!(device.may_receive("public/x"), "no user name: anonymous");
        let impostor = acl.for_client(who("dev-1", Some("mallory")));
        assert!(
            !impostor.may_publish("devices/dev-1/up"),
            "a login that does not hold the id gets nothing from its rule"
        );
        let gateway = acl.for_client(Identity {
            client_id: "g",
            username: None,
            certificate: Some("gw"),
        });
        assert!(gateway.may_receive("gw/a") && !gateway.may_receive("public/x"));
        assert!(!gateway.may_publish("gw/a"), "subscribe only");
    }

    #[test]
    fn a_bound_client_id_is_for_its_holders_only() {
        let mut acl = Acl::new(Vec::new()).unwrap();
        acl.bind(
            "plant-7".into(),
            vec![
                Principal::User("ops".into()),
                Principal::Certificate("plc-7".into()),
            ],
        );
        let id = |client_id, username, certificate| Identity {
            client_id,
            username,
            certificate,
        };
        assert_eq!(acl.may_use_client_id(id("free", Some("x"), None)), None);
        assert_eq!(
            acl.may_use_client_id(id("plant-7", Some("ops"), None)),
            Some(true)
        );
        assert_eq!(
            acl.may_use_client_id(id("plant-7", None, Some("plc-7"))),
            Some(true)
        );
        assert_eq!(
            acl.may_use_client_id(id("plant-7", Some("bob"), None)),
            Some(false)
        );
        assert_eq!(
            acl.may_use_client_id(id("plant-7", None, None)),
            Some(false)
        );
    }

    #[test]
    fn placeholders_never_widen_a_filter() {
        let acl = Acl::new(vec![rule(
            Principal::Everyone,
            Access::Both,
            &["u/%u/#", "c/%c"],
        )])
        .unwrap();
        for bad in ["a/b", "+", "#", ""] {
            let c = acl.for_client(who(bad, Some(bad)));
            assert!(!c.may_publish(&format!("u/{bad}/x")), "user {bad:?}");
            assert!(!c.may_publish("u/a/b/x") && !c.may_publish("c/a/b"));
        }
        let anonymous = acl.for_client(who("me", None));
        assert!(!anonymous.may_publish("u//x"), "%u without a user name");
        assert!(anonymous.may_publish("c/me"));
    }

    #[test]
    fn subscriptions_are_allowed_guarded_or_denied() {
        let acl = Acl::new(vec![rule(
            Principal::Everyone,
            Access::Subscribe,
            &["sensors/+/temp", "public/#"],
        )])
        .unwrap();
        let c = acl.for_client(who("c", None));
        assert_eq!(c.subscription("public/a/b"), Verdict::Allowed);
        assert_eq!(c.subscription("sensors/k/temp"), Verdict::Allowed);
        assert_eq!(c.subscription("sensors/k/hum"), Verdict::Denied);
        assert_eq!(c.subscription("private/#"), Verdict::Denied);
        match c.subscription("#") {
            Verdict::Guarded(filters) => assert_eq!(filters.len(), 2),
            other => panic!("{other:?}"),
        }
        match c.subscription("sensors/#") {
            Verdict::Guarded(filters) => {
                assert_eq!(&*filters, &[TopicFilter::new("sensors/+/temp").unwrap()])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sys_topics_are_read_only() {
        let acl = Acl::new(vec![rule(
            Principal::Everyone,
            Access::Both,
            &["#", "$SYS/#"],
        )])
        .unwrap();
        let c = acl.for_client(who("c", None));
        assert!(!c.may_publish("$SYS/broker/uptime"));
        assert!(c.may_receive("$SYS/broker/uptime"));
        assert!(c.may_publish("a"));
    }

    #[test]
    fn bad_rules_are_refused_with_their_place() {
        let err = Acl::new(vec![
            rule(Principal::Everyone, Access::Both, &["ok"]),
            rule(Principal::Everyone, Access::Both, &["a/#/b"]),
        ])
        .unwrap_err();
        assert_eq!(err.rule, 2);
        assert_eq!(err.topic, "a/#/b");
        assert!(Acl::new(vec![rule(Principal::Everyone, Access::Both, &["x%u/a"])]).is_err());
        assert!(Acl::new(vec![rule(
            Principal::Everyone,
            Access::Both,
            &["$share/g/a"]
        )])
        .is_err());
    }
}

//! The topic ↔ subject mapping against the MQTT matcher the engine uses: one to one, always a
//! valid NATS subject, and NATS matching of the filter's subjects is MQTT matching (for topics
//! not starting with `$`, whose rule each node applies itself).

use petrel_cluster::subject::{filter_subjects, subject_topic, topic_subject};
use petrel_engine::topic_index::filter_matches;
use proptest::prelude::*;

/// NATS subject matching: `*` one token, `>` one or more at the end.
fn nats_matches(pattern: &str, subject: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let s: Vec<&str> = subject.split('.').collect();
    for (i, token) in p.iter().enumerate() {
        match *token {
            ">" => return s.len() > i,
            "*" => {
                if i >= s.len() {
                    return false;
                }
            }
            t => {
                if s.get(i) != Some(&t) {
                    return false;
                }
            }
        }
    }
    p.len() == s.len()
}

/// What NATS accepts as a published subject: non-empty tokens without white space, `.`
/// inside tokens, `*` or `>`.
fn valid_subject(subject: &str) -> bool {
    subject
        .split('.')
        .all(|t| !t.is_empty() && t != "*" && t != ">" && t.bytes().all(|b| b.is_ascii_graphic()))
}

fn level() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-c]{1,2}", "[a-c. %$é*>]{1,3}",]
}

fn topic() -> impl Strategy<Value = String> {
    prop::collection::vec(level(), 1..5).prop_map(|levels| levels.join("/"))
}

fn filter() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(prop_oneof![level(), Just("+".to_owned())], 1..5),
        any::<bool>(),
    )
        .prop_map(|(mut levels, hash)| {
            if hash {
                levels.push("#".to_owned());
            }
            levels.join("/")
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn topics_round_trip_as_valid_subjects(t in topic()) {
        let subject = topic_subject("petrel.m", &t);
        prop_assert!(valid_subject(&subject), "{subject}");
        prop_assert_eq!(subject_topic("petrel.m", &subject), Some(t));
    }

    #[test]
    fn nats_matches_what_mqtt_matches(f in filter(), t in topic()) {
        prop_assume!(!t.starts_with('$'));
        let subject = topic_subject("petrel.m", &t);
        let nats = filter_subjects("petrel.m", &f).iter().any(|p| nats_matches(p, &subject));
        prop_assert_eq!(nats, filter_matches(&f, &t), "filter {:?} topic {:?}", f, t);
    }
}

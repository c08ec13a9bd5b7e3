//! Topic authorization driven in memory: what the ACL refuses is refused with the right code
//! for each protocol version, and nothing it forbids leaks to a subscriber, whichever way a
//! client tries: wildcards, shared subscriptions, topic aliases, retained messages, a will,
//! `$SYS`, or messages queued before the rules changed.

mod support;

use std::sync::Arc;
use std::time::Instant;

use petrel_codec::{MqttString, Packet, PubAck, QoS, ReasonCode};
use petrel_engine::acl::{Access, Acl, Principal, Rule};
use petrel_engine::stats::Stats;
use petrel_engine::{Broker, Limits};
use support::*;

fn rule(principal: Principal, access: Access, topics: &[&str]) -> Rule {
    Rule {
        principal,
        access,
        topics: topics.iter().map(|t| (*t).to_owned()).collect(),
    }
}

/// "spy" may use `public/#` only; "admin" may do anything; user "alice" has her home.
fn guarded_broker() -> Arc<Broker> {
    let broker = broker(Limits::default());
    broker.set_acl(Some(with_ids_bound(
        Acl::new(vec![
            rule(
                Principal::ClientId("spy".into()),
                Access::Both,
                &["public/#"],
            ),
            rule(
                Principal::ClientId("admin".into()),
                Access::Both,
                &["#", "$SYS/#"],
            ),
            rule(
                Principal::User("alice".into()),
                Access::Both,
                &["home/%u/#"],
            ),
        ])
        .unwrap(),
    )));
    broker
}

/// The rules, with each client id a rule names bound to anonymous clients (the clients of
/// these tests give no user name): a `client_id` rule applies only to a login that holds it.
fn with_ids_bound(mut acl: Acl) -> Acl {
    let ids: Vec<String> = acl
        .rules()
        .iter()
        .filter_map(|r| match &r.principal {
            Principal::ClientId(id) => Some(id.clone()),
            _ => None,
        })
        .collect();
    for id in ids {
        acl.bind(id, vec![Principal::Anonymous]);
    }
    acl
}

fn as_user(mut c: petrel_codec::Connect, user: &str) -> petrel_codec::Connect {
    c.username = Some(MqttString::new(user).unwrap());
    c
}

fn suback_reasons(packets: Vec<Packet>) -> Vec<ReasonCode> {
    match packets.as_slice() {
        [Packet::SubAck(ack)] => ack.reasons.clone(),
        other => panic!("expected one SUBACK, got {other:?}"),
    }
}

fn topics(packets: Vec<Packet>) -> Vec<String> {
    packets
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p.topic.to_string()),
            _ => None,
        })
        .collect()
}

/// A client of the admin kind that sees everything, to prove nothing was routed.
fn witness(broker: &Arc<Broker>, now: Instant) -> Peer {
    let mut w = Peer::connect(broker, now, connect("admin", true, 0));
    w.subscribe(now, 1, "#", QoS::AtLeastOnce);
    w
}

#[test]
fn a_refused_publish_gets_0x87_in_v5_and_is_acknowledged_and_dropped_in_3_1_1() {
    let t0 = Instant::now();
    let broker = guarded_broker();
    let mut w = witness(&broker, t0);

    let mut v5 = Peer::connect(&broker, t0, connect_v5("spy", true, 0));
    let _ = v5.written();
    v5.send(t0, publish("secret/a", "x", QoS::AtLeastOnce, 1))
        .unwrap();
    v5.send(t0, publish("secret/b", "x", QoS::ExactlyOnce, 2))
        .unwrap();
    v5.send(t0, publish("secret/c", "x", QoS::AtMostOnce, 0))
        .unwrap();
    assert_eq!(
        v5.written(),
        [
            Packet::PubAck(PubAck::with_reason(pid(1), ReasonCode::NOT_AUTHORIZED)),
            Packet::PubRec(PubAck::with_reason(pid(2), ReasonCode::NOT_AUTHORIZED)),
        ]
    );

    let mut v311 = Peer::connect(&broker, t0, connect("spy", true, 0));
    let _ = v311.written();
    v311.send(t0, publish("secret/d", "x", QoS::AtLeastOnce, 1))
        .unwrap();
    assert_eq!(v311.written(), [puback(1)], "3.1.1 cannot say no");
    // Allowed topics still go through.
    v311.send(t0, publish("public/e", "x", QoS::AtLeastOnce, 2))
        .unwrap();
    assert_eq!(v311.written(), [puback(2)]);

    assert_eq!(topics(w.recv()), ["public/e"]);
    assert_eq!(Stats::get(&broker.stats.denied_publish), 4);
}

#[test]
fn a_refused_subscription_gets_0x87_in_v5_and_0x80_in_3_1_1() {
    let t0 = Instant::now();
    let broker = guarded_broker();
    let mut v5 = Peer::connect(&broker, t0, connect_v5("spy", true, 0));
    let _ = v5.written();
    v5.send(t0, subscribe(1, "secret/#", QoS::AtLeastOnce))
        .unwrap();
    assert_eq!(suback_reasons(v5.written()), [ReasonCode::NOT_AUTHORIZED]);
    let mut v311 = Peer::connect(&broker, t0, connect("spy", true, 0));
    let _ = v311.written();
    v311.send(t0, subscribe(1, "secret/#", QoS::AtLeastOnce))
        .unwrap();
    assert_eq!(
        suback_reasons(v311.written()),
        [ReasonCode::UNSPECIFIED_ERROR]
    );
    assert_eq!(Stats::get(&broker.stats.denied_subscribe), 2);
}

#[test]
fn wildcards_reach_only_what_the_acl_allows() {
    let t0 = Instant::now();
    let broker = guarded_broker();
    let mut spy = Peer::connect(&broker, t0, connect_v5("spy", true, 0));
    let _ = spy.written();
    // `#` and `+/secret` overlap public/# and are allowed, guarded; a shared subscription
    // must be covered outright.
    for (id, filter) in [(1, "#"), (2, "+/secret"), (3, "+/+/+")] {
        spy.send(t0, subscribe(id, filter, QoS::AtLeastOnce))
            .unwrap();
        assert_eq!(
            suback_reasons(spy.written()),
            [ReasonCode::GRANTED_QOS_1],
            "{filter}"
        );
    }
    spy.send(t0, subscribe(4, "$share/g/#", QoS::AtLeastOnce))
        .unwrap();
    assert_eq!(suback_reasons(spy.written()), [ReasonCode::NOT_AUTHORIZED]);

    let mut admin = Peer::connect(&broker, t0, connect("admin", true, 0));
    let _ = admin.written();
    for t in ["private/secret", "public/secret", "a/b/c", "public/b/c"] {
        admin.send(t0, publish(t, "x", QoS::AtMostOnce, 0)).unwrap();
    }
    assert_eq!(topics(spy.recv()), ["public/secret", "public/b/c"]);
    // Filtered when routed, not queued and dropped later.
    assert_eq!(Stats::get(&broker.stats.dropped_not_authorized), 0);
}

#[test]
fn retained_messages_are_replayed_only_where_allowed() {
    let t0 = Instant::now();
    let broker = guarded_broker();
    let mut admin = Peer::connect(&broker, t0, connect("admin", true, 0));
    let _ = admin.written();
    for t in ["private/plan", "public/news"] {
        admin
            .send(t0, retained(publish(t, "kept", QoS::AtMostOnce, 0)))
            .unwrap();
    }
    let mut spy = Peer::connect(&broker, t0, connect("spy", true, 0));
    let _ = spy.written();
    spy.send(t0, subscribe(1, "#", QoS::AtMostOnce)).unwrap();
    let got = spy.recv();
    assert_eq!(topics(got), ["public/news"]);
    assert_eq!(Stats::get(&broker.stats.dropped_not_authorized), 0);
}

#[test]
fn a_topic_alias_cannot_carry_a_publish_past_the_acl() {
    let t0 = Instant::now();
    let broker = guarded_broker();
    let mut w = witness(&broker, t0);
    let mut spy = Peer::connect(&broker, t0, connect_v5("spy", true, 0));
    let _ = spy.written();
    let aliased = |topic: &str, alias: u16, id: u16| {
        publish_props(
            topic,
            b"x",
            QoS::AtLeastOnce,
            id,
            props(|p| p.topic_alias = Some(alias)),
        )
    };
    // Naming a forbidden topic with an alias is refused, and so is using the alias later.
    spy.send(t0, aliased("secret/x", 1, 1)).unwrap();
    spy.send(t0, aliased("", 1, 2)).unwrap();
    // An alias set on an allowed topic works.
    spy.send(t0, aliased("public/x", 2, 3)).unwrap();
    spy.send(t0, aliased("", 2, 4)).unwrap();
    assert_eq!(
        spy.written(),
        [
            Packet::PubAck(PubAck::with_reason(pid(1), ReasonCode::NOT_AUTHORIZED)),
            Packet::PubAck(PubAck::with_reason(pid(2), ReasonCode::NOT_AUTHORIZED)),
            puback(3),
            puback(4),
        ]
    );
    assert_eq!(topics(w.recv()), ["public/x", "public/x"]);
}

#[test]
fn a_will_on_a_forbidden_topic_refuses_the_connection() {
    let t0 = Instant::now();
    let broker = guarded_broker();
    let mut c = connect_v5("spy", true, 0);
    c.will = Some(will("secret/will", "bye", QoS::AtMostOnce, false));
    let mut v5 = Peer::new(&broker, t0);
    assert!(v5.send_connect(t0, c).is_err());
    match v5.written().as_slice() {
        [Packet::ConnAck(ack)] => assert_eq!(ack.reason, ReasonCode::NOT_AUTHORIZED),
        other => panic!("{other:?}"),
    }
    let mut c = connect("spy", true, 0);
    c.will = Some(will("secret/will", "bye", QoS::AtMostOnce, false));
    let mut v311 = Peer::new(&broker, t0);
    assert!(v311.send_connect(t0, c).is_err());
    match v311.written().as_slice() {
        // 3.1.1 return code 5: not authorized.
        [Packet::ConnAck(ack)] => assert_eq!(ack.reason, ReasonCode::NOT_AUTHORIZED),
        other => panic!("{other:?}"),
    }
    let mut c = connect("spy", true, 0);
    c.will = Some(will("public/will", "bye", QoS::AtMostOnce, false));
    let mut ok = Peer::new(&broker, t0);
    ok.send_connect(t0, c).unwrap();
    assert_eq!(ok.written(), [connack(false)]);
}

#[test]
fn user_placeholders_give_each_user_their_own_topics() {
    let t0 = Instant::now();
    let broker = guarded_broker();
    let mut alice = Peer::connect(&broker, t0, as_user(connect_v5("c1", true, 0), "alice"));
    let _ = alice.written();
    alice
        .send(t0, publish("home/alice/light", "on", QoS::AtLeastOnce, 1))
        .unwrap();
    alice
        .send(t0, publish("home/bob/light", "on", QoS::AtLeastOnce, 2))
        .unwrap();
    let acks: Vec<ReasonCode> = alice
        .written()
        .into_iter()
        .map(|p| match p {
            Packet::PubAck(a) => a.reason,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        acks,
        [
            ReasonCode::NO_MATCHING_SUBSCRIBERS,
            ReasonCode::NOT_AUTHORIZED
        ]
    );
    // A client with no rule at all may do nothing.
    let mut nobody = Peer::connect(&broker, t0, connect_v5("nobody", true, 0));
    let _ = nobody.written();
    nobody
        .send(t0, subscribe(1, "home/alice/#", QoS::AtMostOnce))
        .unwrap();
    assert_eq!(
        suback_reasons(nobody.written()),
        [ReasonCode::NOT_AUTHORIZED]
    );
}

#[test]
fn sys_topics_are_never_published_by_clients() {
    let t0 = Instant::now();
    let broker = guarded_broker();
    let mut admin = Peer::connect(&broker, t0, connect_v5("admin", true, 0));
    let _ = admin.written();
    admin
        .send(t0, publish("$SYS/broker/uptime", "0", QoS::AtLeastOnce, 1))
        .unwrap();
    assert_eq!(
        admin.written(),
        [Packet::PubAck(PubAck::with_reason(
            pid(1),
            ReasonCode::NOT_AUTHORIZED
        ))]
    );
}

#[test]
fn messages_queued_before_the_rules_changed_are_checked_as_they_are_sent() {
    let t0 = Instant::now();
    let broker = broker(Limits::default());
    // No ACL yet: a persistent subscriber to everything goes offline with messages queued.
    let mut sub = Peer::connect(&broker, t0, connect("spy", false, 0));
    sub.subscribe(t0, 1, "#", QoS::AtLeastOnce);
    sub.close(&petrel_engine::CloseReason::PeerClosed);
    let mut publ = Peer::connect(&broker, t0, connect("pub", true, 0));
    let _ = publ.written();
    for (i, t) in ["private/a", "public/b"].iter().enumerate() {
        let id = u16::try_from(i + 1).unwrap();
        publ.send(t0, publish(t, "x", QoS::AtLeastOnce, id))
            .unwrap();
    }
    // Now the rules arrive: the spy may read public/# only; the publisher (connected all
    // along, and held to the new rules too) may publish anywhere.
    broker.set_acl(Some(with_ids_bound(
        Acl::new(vec![
            rule(
                Principal::ClientId("spy".into()),
                Access::Subscribe,
                &["public/#"],
            ),
            rule(Principal::ClientId("pub".into()), Access::Publish, &["#"]),
        ])
        .unwrap(),
    )));
    let mut sub = Peer::new(&broker, t0);
    sub.send_connect(t0, connect("spy", false, 0)).unwrap();
    assert_eq!(sub.written(), [connack(true)]);
    assert_eq!(topics(sub.recv()), ["public/b"]);
    assert_eq!(Stats::get(&broker.stats.dropped_not_authorized), 1);
    // And the old `#` subscription is held to the rules for new messages too.
    publ.send(t0, publish("private/c", "x", QoS::AtLeastOnce, 3))
        .unwrap();
    publ.send(t0, publish("public/d", "x", QoS::AtLeastOnce, 4))
        .unwrap();
    assert_eq!(topics(sub.recv()), ["public/d"]);
}

#[test]
fn without_an_acl_everything_but_sys_publishing_is_allowed() {
    let t0 = Instant::now();
    let broker = broker(Limits::default());
    let mut c = Peer::connect(&broker, t0, connect_v5("c", true, 0));
    let _ = c.written();
    c.subscribe(t0, 1, "#", QoS::AtMostOnce);
    c.send(t0, publish("any/topic", "x", QoS::AtMostOnce, 0))
        .unwrap();
    assert_eq!(topics(c.recv()), ["any/topic"]);
    c.send(t0, publish("$SYS/fake", "x", QoS::AtLeastOnce, 1))
        .unwrap();
    assert_eq!(
        c.written(),
        [Packet::PubAck(PubAck::with_reason(
            pid(1),
            ReasonCode::NOT_AUTHORIZED
        ))]
    );
}

#[test]
fn a_new_acl_applies_to_clients_already_connected() {
    let t0 = Instant::now();
    let broker = broker(Limits::default());
    let allow = |topics: &[&str]| {
        Some(with_ids_bound(
            Acl::new(vec![rule(
                Principal::ClientId("c".into()),
                Access::Both,
                topics,
            )])
            .unwrap(),
        ))
    };
    broker.set_acl(allow(&["a/#"]));
    let mut c = Peer::connect(&broker, t0, connect_v5("c", true, 0));
    c.subscribe(t0, 1, "#", QoS::AtMostOnce);
    c.send(t0, publish("a/1", "x", QoS::AtLeastOnce, 1))
        .unwrap();
    assert_eq!(topics(c.recv()), ["a/1"]);
    // Reloaded: a/# is no longer allowed, b/# is.
    broker.set_acl(allow(&["b/#"]));
    c.send(t0, publish("a/2", "x", QoS::AtLeastOnce, 2))
        .unwrap();
    c.send(t0, publish("b/1", "x", QoS::AtLeastOnce, 3))
        .unwrap();
    let written = c.recv();
    assert!(written.contains(&Packet::PubAck(PubAck::with_reason(
        pid(2),
        ReasonCode::NOT_AUTHORIZED
    ))));
    // The old `#` subscription was guarded by a/# when it was made: b/1 is not delivered
    // through it until the client subscribes again, and nothing on a/ is.
    assert_eq!(topics(written), Vec::<String>::new());
    c.subscribe(t0, 2, "#", QoS::AtMostOnce);
    c.send(t0, publish("b/2", "x", QoS::AtMostOnce, 0)).unwrap();
    assert_eq!(topics(c.recv()), ["b/2"]);
}

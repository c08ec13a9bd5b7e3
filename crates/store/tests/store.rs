//! The disk store on its own: what goes in comes back after a reopen, exactly; a damaged or
//! foreign store stops the start with a clear error; and the format-1 golden store in
//! `tests/golden/` still reads.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use petrel_codec::{
    MqttString, Properties, QoS, RetainHandling, SubscriptionOptions, TopicFilter, TopicName,
};
use petrel_engine::message::Message;
use petrel_engine::session::{Delivery, DeliveryExtra, Subscription};
use petrel_engine::store::{Store, StoredStage};
use petrel_store::{DiskStore, Fsync, StoreError};
use std::sync::Arc;

struct Dir(PathBuf);

impl Dir {
    fn new(label: &str) -> Dir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "petrel-store-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sub(qos: QoS, id: u32) -> Subscription {
    let mut options = SubscriptionOptions::new(qos);
    options.no_local = true;
    options.retain_as_published = true;
    options.retain_handling = RetainHandling::Never;
    Subscription { options, id }
}

fn retained_message(topic: &str, payload: &str, expiry: Option<u32>) -> Message {
    let mut props = Properties::default();
    props.content_type = Some(MqttString::new("text/plain").unwrap());
    props
        .user_properties
        .push((MqttString::new("k").unwrap(), MqttString::new("v").unwrap()));
    props.message_expiry_interval = expiry;
    Message::new(
        TopicName::new(topic).unwrap(),
        Bytes::from(payload.to_owned()),
        QoS::AtLeastOnce,
        true,
        props,
        7,
    )
    .with_expiry_from(Instant::now())
}

fn filter(f: &str) -> TopicFilter {
    TopicFilter::new(f).unwrap()
}

/// Writes a known set of state into `dir`.
fn fill(dir: &Path) {
    let (store, loaded) = DiskStore::open(dir, Fsync::Always).unwrap();
    assert!(loaded.sessions.is_empty() && loaded.retained.is_empty());
    store.session_opened("alice", u32::MAX, None);
    store.subscription_added("alice", &filter("a/+"), sub(QoS::AtLeastOnce, 3));
    store.subscription_added(
        "alice",
        &filter("$share/g/jobs/#"),
        sub(QoS::ExactlyOnce, 0),
    );
    store.session_opened("bob", 3600, None);
    store.subscription_added("bob", &filter("b"), sub(QoS::AtMostOnce, 0));
    // Far in the future, so that the golden store written from this stays valid.
    store.session_offline(
        "bob",
        3600,
        Some(Instant::now() + Duration::from_secs(100 * 365 * 86_400)),
        None,
    );
    // A session that ends with its connection leaves nothing, whether its records reached
    // the disk (carol) or were still waiting for the commit thread (erin).
    store.session_opened("carol", 60, None);
    store.subscription_added("carol", &filter("c"), sub(QoS::AtMostOnce, 0));
    store.flush();
    store.session_opened("carol", 0, None);
    store.session_opened("erin", 60, None);
    store.subscription_added("erin", &filter("e"), sub(QoS::AtMostOnce, 0));
    store.session_opened("erin", 0, None);
    // A removed session takes its subscriptions.
    store.session_opened("dave", 60, None);
    store.subscription_added("dave", &filter("d"), sub(QoS::AtMostOnce, 0));
    store.session_removed("dave");
    store.subscription_removed("alice", &filter("a/+"));
    store.subscription_added("alice", &filter("a/+"), sub(QoS::AtLeastOnce, 4));
    // Alice's queue: one message shared with bob (stored once), one sent, one past PUBREC;
    // one delivered; an inbound QoS 2 id awaiting PUBREL.
    let shared = Arc::new(retained_message("q/shared", "to both", None));
    let own = Arc::new(retained_message("q/own", "alice only", Some(3600)));
    let gone = Arc::new(retained_message("q/gone", "acknowledged", None));
    let delivery = |m: &Arc<Message>, qos| {
        let mut d = Delivery::new(m.clone(), qos, false, 10);
        d.extra = Some(Box::new(DeliveryExtra {
            subscription_ids: vec![4],
            group: None,
        }));
        d
    };
    store.enqueued("alice", 1, &delivery(&shared, QoS::AtLeastOnce));
    store.enqueued("bob", 1, &delivery(&shared, QoS::AtLeastOnce));
    store.enqueued("alice", 2, &delivery(&own, QoS::ExactlyOnce));
    store.enqueued("alice", 3, &delivery(&gone, QoS::AtLeastOnce));
    store.sent("alice", 1, 11);
    store.sent("alice", 2, 12);
    store.sent("alice", 3, 13);
    // Landed before the rest, so the next changes overwrite and delete stored records.
    store.flush();
    store.released("alice", 2, 12);
    store.dequeued("alice", 3, &gone, QoS::AtLeastOnce);
    store.inbound_qos2("alice", 77, true);
    store.inbound_qos2("alice", 78, true);
    store.inbound_qos2("alice", 78, false);
    store.retained_set(&retained_message("r/1", "one", None));
    store.retained_set(&retained_message("r/2", "two", Some(3600)));
    store.retained_set(&retained_message("r/3", "gone", None));
    store.retained_cleared("r/3");
}

fn check(dir: &Path) {
    let (_store, mut loaded) = DiskStore::open(dir, Fsync::Never).unwrap();
    loaded
        .sessions
        .sort_by(|a, b| a.client_id.cmp(&b.client_id));
    let ids: Vec<&str> = loaded
        .sessions
        .iter()
        .map(|s| s.client_id.as_str())
        .collect();
    assert_eq!(ids, ["alice", "bob"]);
    let alice = &loaded.sessions[0];
    assert_eq!(alice.expiry_interval, u32::MAX);
    assert_eq!(
        alice.expires_at, None,
        "was connected: its interval starts at restart"
    );
    let mut subs: Vec<(String, Subscription)> = alice
        .subscriptions
        .iter()
        .map(|(f, s)| (f.as_str().to_owned(), *s))
        .collect();
    subs.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        subs,
        [
            ("$share/g/jobs/#".to_owned(), sub(QoS::ExactlyOnce, 0)),
            ("a/+".to_owned(), sub(QoS::AtLeastOnce, 4)),
        ]
    );
    let queue: Vec<(u64, String, QoS, StoredStage, Vec<u32>)> = alice
        .deliveries
        .iter()
        .map(|d| {
            (
                d.seq,
                String::from_utf8_lossy(&d.message.payload).into_owned(),
                d.qos,
                d.stage,
                d.subscription_ids.clone(),
            )
        })
        .collect();
    assert_eq!(
        queue,
        [
            (
                1,
                "to both".to_owned(),
                QoS::AtLeastOnce,
                StoredStage::Published(11),
                vec![4]
            ),
            (
                2,
                "alice only".to_owned(),
                QoS::ExactlyOnce,
                StoredStage::Released(12),
                vec![4]
            ),
        ]
    );
    assert!(alice.deliveries[1].message.expires_at.is_some());
    assert_eq!(alice.inbound_qos2, [77]);
    let bob = &loaded.sessions[1];
    assert_eq!(bob.deliveries.len(), 1);
    assert_eq!(bob.deliveries[0].stage, StoredStage::Queued);
    assert!(
        Arc::ptr_eq(&bob.deliveries[0].message, &alice.deliveries[0].message),
        "one stored message, shared"
    );
    assert_eq!(bob.expiry_interval, 3600);
    let left = bob
        .expires_at
        .expect("offline session has an expiry")
        .saturating_duration_since(Instant::now());
    assert!(left > Duration::from_secs(3500), "{left:?}");

    loaded.retained.sort_by(|a, b| a.topic.cmp(&b.topic));
    let topics: Vec<&str> = loaded.retained.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(topics, ["r/1", "r/2"]);
    let two = &loaded.retained[1];
    assert_eq!(&two.payload[..], b"two");
    assert_eq!(two.qos, QoS::AtLeastOnce);
    assert!(two.retain);
    assert_eq!(two.properties.content_type.as_deref(), Some("text/plain"));
    assert_eq!(two.properties.user_properties.len(), 1);
    assert!(two.expires_at.is_some(), "expiry kept");
    assert_eq!(loaded.retained[0].expires_at, None);
}

#[test]
fn what_goes_in_comes_back_after_a_reopen() {
    let dir = Dir::new("roundtrip");
    fill(&dir.0);
    check(&dir.0);
}

#[test]
fn the_last_reference_deletes_a_stored_message_and_removed_sessions_take_their_queue() {
    let dir = Dir::new("refs");
    {
        let (store, _) = DiskStore::open(&dir.0, Fsync::Never).unwrap();
        store.session_opened("a", 60, None);
        store.session_opened("b", 60, None);
        let m = Arc::new(retained_message("t", "x", None));
        for client in ["a", "b"] {
            store.enqueued(
                client,
                1,
                &Delivery::new(m.clone(), QoS::AtLeastOnce, false, 1),
            );
        }
        store.flush();
        store.dequeued("a", 1, &m, QoS::AtLeastOnce);
        store.session_removed("b");
    }
    let keyspace = fjall::Config::new(&dir.0).open().unwrap();
    for partition in ["messages", "queue", "inflight"] {
        let p = keyspace
            .open_partition(partition, Default::default())
            .unwrap();
        assert_eq!(p.len().unwrap(), 0, "{partition} is empty");
    }
}

#[test]
fn a_store_of_another_format_is_refused() {
    let dir = Dir::new("format");
    fill(&dir.0);
    {
        let keyspace = fjall::Config::new(&dir.0).open().unwrap();
        let meta = keyspace.open_partition("meta", Default::default()).unwrap();
        meta.insert("format", "petrel-store 99").unwrap();
        keyspace.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    match DiskStore::open(&dir.0, Fsync::Never) {
        Err(StoreError::Format { found, .. }) => assert_eq!(found, "petrel-store 99"),
        other => panic!("expected a format error, got {:?}", other.err()),
    }
}

#[test]
fn a_damaged_record_stops_the_start_and_names_it() {
    let dir = Dir::new("corrupt");
    fill(&dir.0);
    {
        let keyspace = fjall::Config::new(&dir.0).open().unwrap();
        let retained = keyspace
            .open_partition("retained", Default::default())
            .unwrap();
        retained.insert("r/1", [1u8, 0, 0]).unwrap();
        keyspace.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let err = DiskStore::open(&dir.0, Fsync::Never)
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(text.contains("retained record \"r/1\""), "{text}");
    assert!(text.contains("journal file"), "where it is: {text}");
    assert!(text.contains("does not discard stored data"), "{text}");
    // Nothing was dropped: the data is still there for a repair.
    let keyspace = fjall::Config::new(&dir.0).open().unwrap();
    let retained = keyspace
        .open_partition("retained", Default::default())
        .unwrap();
    assert_eq!(retained.len().unwrap(), 2);
}

/// The golden stores: one written by each format and kept as a tarball (fjall preallocates its
/// journal as a 32 MiB sparse file, which compresses to almost nothing); `cargo test -p
/// petrel-store -- --ignored write_golden` writes the current format's. Every later version
/// must read them all.
fn golden(format: u32) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/format-{format}.tar.gz"))
}

/// The format this build writes, as in `FORMAT`.
fn current_format() -> u32 {
    petrel_store::FORMAT
        .strip_prefix("petrel-store ")
        .and_then(|n| n.parse().ok())
        .expect("FORMAT is \"petrel-store N\"")
}

fn tar(args: &[&std::ffi::OsStr]) {
    let status = std::process::Command::new("tar")
        .args(args)
        .status()
        .expect("run tar");
    assert!(status.success(), "tar {args:?} failed");
}

#[test]
fn the_format_1_golden_store_still_reads() {
    golden_store_reads(1);
}

/// Format 2: every record in a checked envelope.
#[test]
fn the_format_2_golden_store_still_reads() {
    golden_store_reads(2);
}

fn golden_store_reads(format: u32) {
    let dir = Dir::new("golden");
    std::fs::create_dir_all(&dir.0).unwrap();
    tar(&[
        "-xzf".as_ref(),
        golden(format).as_os_str(),
        "-C".as_ref(),
        dir.0.as_os_str(),
    ]);
    {
        // What the tarball holds: format 2 and later seal every record (version byte 0x81).
        let keyspace = fjall::Config::new(&dir.0).open().unwrap();
        let retained = keyspace
            .open_partition("retained", Default::default())
            .unwrap();
        for item in retained.iter() {
            let (_, value) = item.unwrap();
            assert_eq!(value[0] == 0x81, format >= 2, "format {format}");
        }
    }
    let (_store, loaded) = DiskStore::open(&dir.0, Fsync::Never).unwrap();
    let mut ids: Vec<&str> = loaded
        .sessions
        .iter()
        .map(|s| s.client_id.as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["alice", "bob"]);
    let mut topics: Vec<&str> = loaded.retained.iter().map(|m| m.topic.as_str()).collect();
    topics.sort_unstable();
    assert_eq!(topics, ["r/1", "r/2"]);
    drop(loaded);
    check(&dir.0);
}

#[test]
#[ignore = "writes tests/golden/format-N.tar.gz for the current format"]
fn write_golden() {
    let dir = Dir::new("golden-write");
    fill(&dir.0);
    let golden = golden(current_format());
    std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
    tar(&[
        "--sparse".as_ref(),
        "-czf".as_ref(),
        golden.as_os_str(),
        "-C".as_ref(),
        dir.0.as_os_str(),
        ".".as_ref(),
    ]);
}

#[test]
fn churning_sessions_leave_nothing_behind() {
    let dir = Dir::new("churn");
    let (store, _) = DiskStore::open(&dir.0, Fsync::Never).unwrap();
    let baseline = store.disk_space();
    for round in 0..5_000u64 {
        let client = format!("client-{round}");
        store.session_opened(&client, 60, None);
        store.subscription_added(&client, &filter("churn/+"), sub(QoS::AtLeastOnce, 0));
        let m = Arc::new(retained_message("churn/x", "payload", None));
        store.enqueued(
            &client,
            1,
            &Delivery::new(m.clone(), QoS::AtLeastOnce, false, 7),
        );
        store.sent(&client, 1, 1);
        store.inbound_qos2(&client, 5, true);
        store.session_offline(&client, 60, Some(Instant::now()), None);
        // On disk before it goes, so that removing it deletes records, not buffered changes.
        store.flush();
        // Expired: the broker removes it.
        store.session_removed(&client);
    }
    drop(store);
    let keyspace = fjall::Config::new(&dir.0).open().unwrap();
    for partition in [
        "sessions",
        "subscriptions",
        "messages",
        "queue",
        "inflight",
        "inbound",
    ] {
        let p = keyspace
            .open_partition(partition, Default::default())
            .unwrap();
        assert_eq!(
            p.len().unwrap(),
            0,
            "{partition}: records left by removed sessions"
        );
    }
    // 5,000 sessions came and went; what is left on disk is the journal and tombstones, a
    // small fraction of what they wrote, not a growing file.
    let space = keyspace.disk_space();
    println!("disk space: {baseline} B empty, {space} B after 5,000 sessions came and went");
    assert!(
        space < 64 * 1024 * 1024,
        "{space} bytes on disk after churn"
    );
}

/// A group (`Store::together`) lands whole: while one is being recorded the commit thread
/// does not rotate the buffer, so nothing recorded in it becomes durable before the group's
/// last change can. Without that, a QoS 2 packet id could land without the queue entries of
/// its message (lost after a crash) or they without it (delivered twice).
#[test]
fn a_group_of_changes_lands_together() {
    let dir = Dir::new("together");
    let (store, _) = DiskStore::open(&dir.0, Fsync::Never).unwrap();
    store.session_opened("g", 60, None);
    for round in 0..5u16 {
        let mut tokens = (0, 0);
        store.together(&mut || {
            let first = store.inbound_qos2("g", round * 2 + 1, true);
            // Rounds go on meanwhile: other clients' changes keep the commit thread busy.
            let started = Instant::now();
            while started.elapsed() < Duration::from_millis(30) {
                store.session_opened("other", 60, None);
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(
                store.durable() < first,
                "round {round}: part of a group became durable while it was being recorded"
            );
            tokens = (first, store.inbound_qos2("g", round * 2 + 2, true));
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.durable() < tokens.1 {
            assert!(Instant::now() < deadline, "the group never became durable");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A session's owner (user name, certificate identity) comes back with it, so that after a
/// restart only that login may resume it; a record without one (an older store) reads as
/// owner unknown.
#[test]
fn a_sessions_owner_survives_a_reopen() {
    use petrel_engine::auth::Login;
    let dir = Dir::new("owner");
    let bob = Login {
        username: Some("bob".into()),
        certificate: None,
    };
    let device = Login {
        username: Some("ops".into()),
        certificate: Some("plc-7 ✓".into()),
    };
    {
        let (store, _) = DiskStore::open(&dir.0, Fsync::Never).unwrap();
        store.session_opened("bob-phone", 600, Some(&bob));
        store.session_opened("plc", 600, Some(&device));
        store.session_offline("plc", 600, None, Some(&device));
        store.session_opened("legacy", 600, None);
        store.flush();
    }
    let (_store, loaded) = DiskStore::open(&dir.0, Fsync::Never).unwrap();
    let owner = |id: &str| {
        loaded
            .sessions
            .iter()
            .find(|s| s.client_id == id)
            .map(|s| s.login.clone())
            .unwrap()
    };
    assert_eq!(owner("bob-phone"), Some(bob));
    assert_eq!(owner("plc"), Some(device));
    assert_eq!(owner("legacy"), None);
}

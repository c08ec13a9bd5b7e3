//! A damaged store (issue 20, item 3): a byte flipped in the middle of the journal or in a
//! data segment stops the start naming the file and offset (or the record), with the files
//! left exactly as they were; a torn tail, as a crash mid-write leaves, is dropped; `check`
//! and `salvage` find every damaged record and keep every other.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use petrel_codec::{Properties, QoS, TopicName};
use petrel_engine::message::Message;
use petrel_engine::session::Delivery;
use petrel_engine::store::Store;
use petrel_store::{DiskStore, Fsync, StoreError};

struct Dir(PathBuf);

impl Dir {
    fn new(label: &str) -> Dir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "petrel-damage-{label}-{}-{}",
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

const RETAINED: usize = 60;
const QUEUED: usize = 60;

fn message(topic: &str, payload: String, retain: bool) -> Message {
    Message::new(
        TopicName::new(topic).unwrap(),
        Bytes::from(payload),
        QoS::AtLeastOnce,
        retain,
        Properties::default(),
        1,
    )
    .with_expiry_from(Instant::now())
}

/// A store of sessions, queued and retained messages, one change per journal batch (each
/// followed by a flush), so that damage to one batch costs one change.
fn fill(dir: &Path) {
    let (store, _) = DiskStore::open(dir, Fsync::Never).unwrap();
    store.session_opened("sub", 3600, None);
    store.session_offline("sub", 3600, None, None);
    store.flush();
    for i in 0..RETAINED {
        store.retained_set(&message(&format!("r/{i}"), format!("retained {i}"), true));
        store.flush();
    }
    for i in 0..QUEUED {
        let m = Arc::new(message("q", format!("queued {i}"), false));
        store.enqueued(
            "sub",
            i as u64 + 1,
            &Delivery::new(m, QoS::AtLeastOnce, false, 1),
        );
        store.flush();
    }
}

/// Every file of a store and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path(), std::fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

fn differences(a: &BTreeMap<PathBuf, Vec<u8>>, b: &BTreeMap<PathBuf, Vec<u8>>) -> Vec<String> {
    let mut out = Vec::new();
    for (p, bytes) in a {
        match b.get(p) {
            None => out.push(format!("{} removed", p.display())),
            Some(c) if c != bytes => out.push(format!(
                "{} changed ({} -> {} bytes)",
                p.display(),
                bytes.len(),
                c.len()
            )),
            _ => {}
        }
    }
    out.extend(
        b.keys()
            .filter(|p| !a.contains_key(*p))
            .map(|p| format!("{} added", p.display())),
    );
    out
}

fn journal(dir: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("journals"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.pop().expect("a journal file")
}

/// The journal's written length (fjall preallocates zeros after it).
fn used(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).unwrap() + 1
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x55;
    std::fs::write(path, bytes).unwrap();
}

/// Payloads the store gives back: retained and queued.
fn payloads(dir: &Path) -> (Vec<String>, Vec<String>) {
    let (_store, loaded) = DiskStore::open(dir, Fsync::Never).unwrap();
    let text = |m: &Message| String::from_utf8(m.payload.to_vec()).unwrap();
    let retained = loaded.retained.iter().map(text).collect();
    let queued = loaded
        .sessions
        .iter()
        .flat_map(|s| s.deliveries.iter().map(|d| text(&d.message)))
        .collect();
    (retained, queued)
}

fn assert_all_intact(retained: &[String], queued: &[String]) {
    for r in retained {
        let n: usize = r.strip_prefix("retained ").unwrap().parse().unwrap();
        assert!(n < RETAINED, "{r}");
    }
    for q in queued {
        let n: usize = q.strip_prefix("queued ").unwrap().parse().unwrap();
        assert!(n < QUEUED, "{q}");
    }
}

#[test]
fn a_byte_flipped_mid_journal_stops_the_start_naming_the_file_and_changes_nothing() {
    let dir = Dir::new("mid-journal");
    fill(&dir.0);
    let file = journal(&dir.0);
    let at = used(&std::fs::read(&file).unwrap()) / 2;
    flip(&file, at);
    let before = snapshot(&dir.0);
    let err = DiskStore::open(&dir.0, Fsync::Never)
        .err()
        .expect("a damaged journal is refused");
    let StoreError::Journal {
        file: named,
        offset,
        ..
    } = &err
    else {
        panic!("expected a journal error, got {err}");
    };
    println!("start refused: {err}");
    assert_eq!(named, &file, "{err}");
    // The batch holding the flipped byte: within one batch of it.
    assert!(offset.abs_diff(at as u64) < 200, "{err}");
    assert!(err.to_string().contains(&file.display().to_string()));
    let after = snapshot(&dir.0);
    assert!(
        after == before,
        "the files changed: {:?}",
        differences(&before, &after)
    );

    // check names it, and salvage keeps every batch but the damaged one.
    let report = petrel_store::check(&dir.0).unwrap();
    assert!(!report.is_sound());
    println!("check: {:#?}", report.damage);
    assert_eq!(report.damage.len(), 1, "{:?}", report.damage);
    assert!(report.damage[0].contains(&file.display().to_string()));
    let out = Dir::new("mid-journal-out");
    let salvaged = petrel_store::salvage(&dir.0, &out.0).unwrap();
    assert_eq!(salvaged.damage, report.damage);
    assert!(
        snapshot(&dir.0) == before,
        "check or salvage changed the store"
    );
    let (retained, queued) = payloads(&out.0);
    assert_all_intact(&retained, &queued);
    // One change lost: a retained message, or a queued one (its message and queue entry).
    assert!(retained.len() + queued.len() >= RETAINED + QUEUED - 1);
    assert!(petrel_store::check(&out.0).unwrap().is_sound());
}

#[test]
fn a_torn_tail_is_dropped_and_the_rest_starts() {
    let dir = Dir::new("torn");
    fill(&dir.0);
    let file = journal(&dir.0);
    let bytes = std::fs::read(&file).unwrap();
    // A crash mid-write: the last batch's end never reached the disk.
    std::fs::write(&file, &bytes[..used(&bytes) - 7]).unwrap();
    let report = petrel_store::check(&dir.0).unwrap();
    assert!(report.is_sound(), "{:?}", report.damage);
    let torn = report.torn.expect("reported");
    assert_eq!(torn.file, file);
    assert!(!torn.items.is_empty(), "names what it drops");
    let (retained, queued) = payloads(&dir.0);
    assert_all_intact(&retained, &queued);
    assert_eq!(retained.len(), RETAINED);
    assert_eq!(
        queued.len(),
        QUEUED - 1,
        "the last change, unfinished, is gone"
    );
}

/// Moves everything from the journal into segments, as fjall does once a memtable fills.
fn flush_to_segments(dir: &Path) {
    let keyspace = fjall::Config::new(dir).open().unwrap();
    for name in ["sessions", "retained", "messages", "queue"] {
        let p = keyspace.open_partition(name, Default::default()).unwrap();
        p.rotate_memtable_and_wait().unwrap();
        assert!(p.segment_count() > 0, "{name} has a segment");
    }
}

fn segment(dir: &Path, partition: &str) -> PathBuf {
    let segments = dir.join("partitions").join(partition).join("segments");
    std::fs::read_dir(segments)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

#[test]
fn a_byte_flipped_in_a_segment_stops_the_start_and_is_never_delivered() {
    let dir = Dir::new("segment");
    fill(&dir.0);
    flush_to_segments(&dir.0);
    let file = segment(&dir.0, "retained");
    let bytes = std::fs::read(&file).unwrap();
    // The first data block: a 30-byte header (its data length at 22..26), then the data.
    let len = u32::from_be_bytes(bytes[22..26].try_into().unwrap()) as usize;
    flip(&file, 30 + len / 2);
    let before = snapshot(&dir.0);
    let err = DiskStore::open(&dir.0, Fsync::Never)
        .err()
        .expect("a damaged segment is refused");
    let text = err.to_string();
    println!("start refused: {text}");
    assert!(text.contains("retained"), "{text}");
    if let StoreError::Corrupt { .. } = err {
        assert!(
            text.contains(&format!("segment file {}", file.display())),
            "names the segment file: {text}"
        );
    }
    assert!(
        matches!(
            err,
            StoreError::Corrupt { .. } | StoreError::Segment { .. } | StoreError::Panicked { .. }
        ),
        "{text}"
    );
    let after = snapshot(&dir.0);
    assert!(
        after == before,
        "the files changed: {:?}",
        differences(&before, &after)
    );

    let report = petrel_store::check(&dir.0).unwrap();
    println!("check: {:#?}", report.damage);
    assert!(!report.is_sound());
    assert!(
        report.damage.iter().all(|d| d.contains("retained")),
        "{:?}",
        report.damage
    );
    let out = Dir::new("segment-out");
    petrel_store::salvage(&dir.0, &out.0).unwrap();
    assert!(
        snapshot(&dir.0) == before,
        "check or salvage changed the store"
    );
    let (retained, queued) = payloads(&out.0);
    assert_all_intact(&retained, &queued);
    assert_eq!(queued.len(), QUEUED, "other partitions are whole");
    assert!(!retained.is_empty() && retained.len() < RETAINED);
}

/// Bytes that reach an `assert!` in fjall's block decoder (a block header's compression
/// byte): the panic is caught and the start refused like any other damage.
#[test]
fn damage_that_panics_inside_fjall_stops_the_start_with_a_message() {
    let dir = Dir::new("panic");
    fill(&dir.0);
    flush_to_segments(&dir.0);
    let file = segment(&dir.0, "retained");
    // Block header: "LSM" magic (4 bytes), compression tag (0: none, 1: lz4) and its
    // parameter, which must be 0 for both.
    flip(&file, 5);
    let before = snapshot(&dir.0);
    let err = DiskStore::open(&dir.0, Fsync::Never)
        .err()
        .expect("a damaged segment is refused");
    println!("start refused: {err}");
    let after = snapshot(&dir.0);
    assert!(
        after == before,
        "the files changed: {:?}",
        differences(&before, &after)
    );
    let report = petrel_store::check(&dir.0).unwrap();
    println!("check: {:#?}", report.damage);
    assert!(!report.is_sound());
}

#[test]
fn salvage_will_not_write_over_a_store() {
    let dir = Dir::new("salvage-src");
    fill(&dir.0);
    let other = Dir::new("salvage-dst");
    fill(&other.0);
    let before = snapshot(&other.0);
    assert!(petrel_store::salvage(&dir.0, &other.0).is_err());
    assert!(petrel_store::salvage(&dir.0, &dir.0.join("inside")).is_err());
    assert!(snapshot(&other.0) == before);
}

//! # petrel-store: what survives a restart
//!
//! A [`DiskStore`] implements the engine's [`Store`] hooks over an embedded fjall keyspace (an
//! LSM tree with a write-ahead journal; ARCHITECTURE.md has the measurements behind choosing
//! it over redb). At start, [`DiskStore::open`] reads everything back for
//! `Broker::restore`.
//!
//! ```text
//! partition       key                           record (first byte: record version, 1)
//! meta            "format"                      "petrel-store 2" (not enveloped)
//! sessions        client id                     expiry interval u32, offline-until ms u64
//! subscriptions   client id, 0x00, filter       options byte, subscription id u32
//! retained        topic                         expires-at ms u64, the message as a v5 PUBLISH
//! messages        message id u64                as retained: one record however many queues
//! queue           client id, 0x00, seq u64      message id, QoS, retain, subscription ids
//! inflight        client id, 0x00, seq u64      1 sent / 2 PUBREC received, packet id u16
//! inbound         client id, 0x00, packet id    (QoS 2 received, PUBREL not yet)
//! ```
//!
//! Every value but meta's is stored in a checked envelope (`record.rs`): 0x81, an xxh3-64 of
//! partition, key and record, then the record; a store of format 1 (no envelope) still reads.
//! The journal is checked before fjall reads it (`journal.rs`), every checksum when the store
//! is loaded; `check.rs` is `petrel store check` / `salvage`.
//!
//! A QoS 1/2 message for a persistent session is written once to `messages` and referenced
//! from each session's `queue`; the last reference deleted deletes it.
//!
//! ```text
//! hook (connection task) --record--> changes.rs (pending, newest per key)
//!                                          |  taken as one group per round
//!                                          v
//!                                    commit.rs thread --batch--> fjall journal --sync
//!                                          |
//!                                          +--> durable token advances, waiting PUBACKs go
//! ```
//!
//! Hooks only record a change and return its durability token; the commit thread writes all
//! changes recorded so far as one batch and syncs once (group commit), and the broker holds
//! the publisher's PUBACK/PUBREC until its token is covered. A message delivered and
//! acknowledged before its round is cancelled in the buffer and never written.
//!
//! Lock order: `Shared::state`, then `Shared::waiters`; the commit thread never holds `state`
//! while it writes or syncs.
//!
//! Times are wall-clock milliseconds since the Unix epoch (0: none), so a session's expiry
//! keeps counting while the broker is down. A record that does not decode or whose checksum
//! fails stops the start with its partition and key named, and damage in the journal with its
//! file and offset; the files are left as they were. Stored data is never dropped silently:
//! the one exception, a torn last journal write from a crash, is logged.
//!
//! Durability follows [`Fsync`]: `Always` syncs the journal before a token counts as durable,
//! `Every` hands writes to the OS before it counts and syncs at an interval, `Never` only
//! hands them to the OS (they survive a crash of the process, not of the machine).

mod changes;
mod check;
mod commit;
mod journal;
mod load;
mod record;

pub use check::{check, salvage, Report};
pub use journal::TornTail;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fjall::{Config, Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode};
use petrel_codec::{LastWill, QoS, TopicFilter};
use petrel_engine::auth::Login;
use petrel_engine::message::Message;
use petrel_engine::session::{Delivery, Subscription};
use petrel_engine::store::{Store, StoredSession};

use changes::{Change, Part, Value};
use commit::{Shared, State};
use record::{
    client_key, decode_entry, entry_record, message_record, options_byte, session_record,
    stage_record, to_wall, unseal, will_record, RECORD_VERSION,
};

/// The on-disk format this build writes and reads: format 2 puts every record in a checked
/// envelope (`record.rs`).
pub const FORMAT: &str = "petrel-store 2";

/// The format before checksums, still read: its records are taken as they are, and the store
/// is marked as format 2 holding format-1 records (meta key `legacy`) after a good start.
pub const FORMAT_1: &str = "petrel-store 1";

/// When writes reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// After every change.
    Always,
    /// At most this long after a change.
    Every(Duration),
    /// Left to the OS: safe if the process dies, not if the machine does.
    Never,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store in {dir}: {source}")]
    Open {
        dir: PathBuf,
        #[source]
        source: fjall::Error,
    },
    #[error(
        "the store in {dir} has format {found:?}; this petrel reads {FORMAT:?}. \
         Use the petrel version that wrote it, or move the directory away to start empty"
    )]
    Format { dir: PathBuf, found: String },
    #[error(
        "the store in {dir} is damaged: {partition} record {:?} ({location}): {why}. petrel \
         does not discard stored data and changed nothing; `petrel store check` lists the \
         damage, `petrel store salvage` copies every record that reads into a new store, or \
         restore a backup",
        String::from_utf8_lossy(.raw_key)
    )]
    Corrupt {
        dir: PathBuf,
        partition: &'static str,
        /// The key as stored (shown lossily as text).
        raw_key: Vec<u8>,
        /// Where the record is stored, as near as can be known: its journal batch, or the
        /// partition's segment files.
        location: String,
        why: String,
    },
    #[error("cannot start the store's commit thread: {0}")]
    Thread(String),
    #[error("cannot read the store in {dir}: {source}")]
    Read {
        dir: PathBuf,
        #[source]
        source: fjall::Error,
    },
    #[error(
        "the store in {dir} is damaged: partition {partition} does not read {after}: {source} \
         (a segment file in {dir}/partitions/{partition}/segments). petrel changed nothing; \
         `petrel store check` lists the damage, `petrel store salvage` copies every record that \
         reads into a new store"
    )]
    Segment {
        dir: PathBuf,
        partition: &'static str,
        /// Where the read stopped: "after key ..." or "from its first record".
        after: String,
        #[source]
        source: fjall::Error,
    },
    #[error(
        "the store is damaged: journal file {file}, offset {offset}: {why}. petrel changed \
         nothing; `petrel store check` lists the damage, `petrel store salvage` copies every \
         record that reads into a new store"
    )]
    Journal {
        file: PathBuf,
        offset: u64,
        why: String,
    },
    #[error("the store is damaged: reading {what} in {dir} panicked inside fjall (its files do not hold what fjall wrote). petrel changed nothing; `petrel store check` and `petrel store salvage` are the way out")]
    Panicked { dir: PathBuf, what: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a store held at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub sessions: Vec<StoredSession>,
    pub retained: Vec<Message>,
}

/// The partitions, by [`Part`].
#[derive(Clone)]
pub(crate) struct Parts([PartitionHandle; 8]);

impl Parts {
    const NAMES: [(Part, &'static str); 8] = [
        (Part::Sessions, "sessions"),
        (Part::Subscriptions, "subscriptions"),
        (Part::Retained, "retained"),
        (Part::Messages, "messages"),
        (Part::Queue, "queue"),
        (Part::Inflight, "inflight"),
        (Part::Inbound, "inbound"),
        (Part::Wills, "wills"),
    ];

    pub(crate) fn get(&self, part: Part) -> &PartitionHandle {
        &self.0[part as usize]
    }
}

impl Part {
    /// The partition's name: part of each record's checksum.
    pub(crate) fn name(self) -> &'static str {
        Parts::NAMES[self as usize].1
    }
}

pub struct DiskStore {
    keyspace: Keyspace,
    parts: Parts,
    shared: Arc<Shared>,
    /// Ids for stored messages; restored past the highest id in use.
    next_message: std::sync::atomic::AtomicU64,
    committer: Option<std::thread::JoinHandle<()>>,
    /// The store holds format-1 records, which have no checksum.
    legacy: bool,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DiskStore {
    /// Opens (or creates) the store in `dir` and reads back what it holds. The journal is
    /// checked before fjall reads it and every record's checksum when it is loaded; damage
    /// stops the start with nothing written, except a torn tail (the unfinished last write of
    /// a crash), which is dropped and logged.
    pub fn open(dir: &Path, fsync: Fsync) -> Result<(DiskStore, Loaded), StoreError> {
        let journal = journal::scan(dir)?;
        if let Some(torn) = &journal.torn {
            tracing::warn!(
                file = %torn.file.display(),
                offset = torn.offset,
                bytes = torn.bytes,
                items = torn.items.len(),
                dropped = %torn.items.join(", "),
                "store: the journal ends in a batch a crash left unfinished; dropped it (with \
                 fsync = \"always\" none of its changes had been acknowledged)"
            );
            journal::drop_torn(torn)?;
        }
        // fjall writes as it opens (it trims its journal's preallocated zeros and creates
        // missing partitions): a start refused after that puts the files back as they were.
        let partitions_before = partition_dirs(dir);
        let verified = verified(dir);
        let (format, legacy, read) = match verified {
            // Verified without fjall's threads; opened again with them to serve.
            Ok((keyspace, parts, meta, format, legacy, read)) => {
                drop((keyspace, parts, meta));
                (format, legacy, read)
            }
            Err(mut e) => {
                journal::restore_sizes(&journal);
                if let StoreError::Corrupt {
                    partition,
                    raw_key,
                    location,
                    ..
                } = &mut e
                {
                    *location = locate(dir, partition, raw_key);
                }
                for created in partition_dirs(dir).difference(&partitions_before) {
                    let _ = std::fs::remove_dir_all(dir.join("partitions").join(created));
                }
                return Err(e);
            }
        };
        let (keyspace, parts, meta, _) = caught(dir, "the keyspace", || opened(dir, true))?;
        let open_err = |source| StoreError::Open {
            dir: dir.to_owned(),
            source,
        };
        // Marked only after everything read: a failed start writes nothing.
        if format.as_deref() != Some(FORMAT) {
            let mut batch = keyspace.batch();
            batch.insert(&meta, "format", FORMAT);
            if legacy {
                batch.insert(&meta, "legacy", "format 1 records without checksums");
            }
            batch.commit().map_err(open_err)?;
            keyspace.persist(PersistMode::SyncAll).map_err(open_err)?;
        }
        let shared = Arc::new(Shared::new(read.refs));
        let committer = {
            let (keyspace, parts, shared) = (keyspace.clone(), parts.clone(), shared.clone());
            std::thread::Builder::new()
                .name("petrel-store-commit".into())
                .spawn(move || commit::run(&shared, &keyspace, &parts, fsync))
                .map_err(|e| StoreError::Thread(e.to_string()))?
        };
        Ok((
            DiskStore {
                keyspace,
                parts,
                shared,
                next_message: (read.max_message_id + 1).into(),
                committer: Some(committer),
                legacy,
            },
            read.loaded,
        ))
    }

    /// Bytes the store takes on disk.
    pub fn disk_space(&self) -> u64 {
        self.keyspace.disk_space()
    }

    /// Records a change for the commit thread; returns its durability token.
    fn change(&self, f: impl FnOnce(&mut State)) -> u64 {
        let mut st = lock(&self.shared.state);
        f(&mut st);
        st.written += 1;
        let token = st.written;
        self.shared.nudge(&mut st);
        token
    }

    /// A key's value as it will be once everything recorded so far has landed: the buffer
    /// first, then the group being written, then the disk. `Some(None)`: it holds something
    /// that is not stored as given (a message not yet encoded).
    fn current(&self, st: &State, part: Part, key: &[u8]) -> fjall::Result<Option<Vec<u8>>> {
        let found = st
            .pending
            .get(part, key)
            .or_else(|| st.writing.as_deref().and_then(|w| w.get(part, key)));
        {
            match found {
                Some(Change::Put { value, .. }) => {
                    return Ok(Some(value.bytes().map(<[u8]>::to_vec).unwrap_or_default()))
                }
                Some(Change::Delete) => return Ok(None),
                None => {}
            }
        }
        let Some(stored) = self.parts.get(part).get(key)? else {
            return Ok(None);
        };
        match unseal(part.name(), key, &stored, self.legacy) {
            Ok(record) => Ok(Some(record.to_vec())),
            Err(why) => {
                // Read back at run time: what was checked at start changed since. Treated as
                // present but unreadable, so nothing is decoded from it.
                tracing::error!(partition = part.name(), key = %String::from_utf8_lossy(key), why, "store: a stored record is damaged");
                Ok(Some(Vec::new()))
            }
        }
    }

    /// Forgets everything stored for a client: its session record, will, subscriptions,
    /// queue, in-flight stages and inbound QoS 2 ids. Nothing to do (the common case: a
    /// session that was never persistent) costs one lookup.
    fn remove_session(&self, client_id: &str) -> fjall::Result<()> {
        let mut st = lock(&self.shared.state);
        // Every record of a client is written after its session record and removed with
        // it (and at start), so without one there is nothing to remove.
        if self
            .current(&st, Part::Sessions, client_id.as_bytes())?
            .is_none()
        {
            return Ok(());
        }
        let prefix = client_key(client_id, &[]);
        let mut keys: Vec<(Part, Vec<u8>)> = vec![
            (Part::Sessions, client_id.as_bytes().to_vec()),
            (Part::Wills, client_id.as_bytes().to_vec()),
        ];
        for part in Part::PER_CLIENT {
            for item in self.parts.get(part).prefix(&prefix) {
                let (key, _) = item?;
                keys.push((part, key.to_vec()));
            }
        }
        let writing = st.writing.as_deref().into_iter().flat_map(|w| w.iter());
        keys.extend(
            st.pending
                .iter()
                .chain(writing)
                .filter(|((part, key), _)| {
                    Part::PER_CLIENT.contains(part) && key.starts_with(&prefix)
                })
                .map(|(key, _)| key.clone()),
        );
        keys.sort_unstable();
        keys.dedup();
        for (part, key) in keys {
            if part == Part::Queue {
                if let Some(entry) = self
                    .current(&st, part, &key)?
                    .and_then(|v| decode_entry(&v))
                {
                    unref(&mut st, entry.message_id);
                }
            }
            st.pending.delete_soon(part, key);
        }
        self.shared.nudge(&mut st);
        Ok(())
    }

    fn removed(&self, client_id: &str) -> u64 {
        if let Err(e) = self.remove_session(client_id) {
            tracing::error!(error = %e, client_id, "store: cannot read a session's records to remove them");
        }
        self.change(|_| {})
    }
}

/// Drops one reference to a stored message, deleting it with the last.
fn unref(st: &mut State, id: u64) {
    if let Some(n) = st.refs.get_mut(&id) {
        *n -= 1;
        if *n == 0 {
            st.refs.remove(&id);
            st.pending.delete(Part::Messages, id.to_be_bytes().to_vec());
        }
    }
}

/// Whether `dir` can hold a store, without opening one (a broker may be using it): an existing
/// directory petrel can create files in, or a path to be made below such a directory. Leaves
/// nothing behind (a probe file is created and removed). For `--check-config`.
pub fn check_dir(dir: &Path) -> Result<(), StoreError> {
    let problem = |path: &Path, kind, why: String| StoreError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(kind, why),
    };
    // The directory itself, or the nearest ancestor that exists (a start creates the rest).
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    if !existing.is_dir() {
        return Err(problem(
            existing,
            std::io::ErrorKind::NotADirectory,
            if existing == dir {
                "not a directory".to_owned()
            } else {
                format!("not a directory, so {} cannot be created", dir.display())
            },
        ));
    }
    let probe = existing.join(format!(".petrel-probe-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(problem(
            existing,
            e.kind(),
            format!("cannot create files here: {e}"),
        )),
    }
}

/// Where a record is stored: the journal batch that wrote it last, if that batch holds the
/// damaged bytes; else the partition's segment files (a journal whose batches were flushed
/// may remain, and its copy is then intact).
fn locate(dir: &Path, partition: &str, key: &[u8]) -> String {
    let mut intact = String::new();
    if let Some((file, offset, value)) = journal::locate(dir, partition, key) {
        if unseal(partition, key, &value, false).is_err() {
            return format!(
                "written by the batch at offset {offset} of journal file {}",
                file.display()
            );
        }
        intact = format!(
            "; an intact copy is still in journal file {}, batch at offset {offset}",
            file.display()
        );
    }
    let segments = dir.join("partitions").join(partition).join("segments");
    let mut files: Vec<String> = std::fs::read_dir(&segments)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().display().to_string()))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let place = match files.len() {
        0 => format!("in {}", segments.display()),
        1 => format!("in segment file {}", files[0]),
        _ => format!("in one of the segment files {}", files.join(", ")),
    };
    place + &intact
}

/// The partition directories of a store.
fn partition_dirs(dir: &Path) -> std::collections::BTreeSet<std::ffi::OsString> {
    std::fs::read_dir(dir.join("partitions"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.file_name()))
                .collect()
        })
        .unwrap_or_default()
}

type Verified = (
    Keyspace,
    Parts,
    PartitionHandle,
    Option<String>,
    bool,
    load::Read,
);

/// Opens the keyspace and reads every record, checked. On an error every handle is closed
/// (fjall's threads joined) by the time it returns.
fn verified(dir: &Path) -> Result<Verified, StoreError> {
    let (keyspace, parts, meta, format) = caught(dir, "the keyspace", || opened(dir, false))?;
    let legacy = match format.as_deref() {
        Some(FORMAT) => meta_legacy(dir, &meta)?,
        Some(FORMAT_1) => true,
        Some(found) => {
            return Err(StoreError::Format {
                dir: dir.to_owned(),
                found: found.to_owned(),
            })
        }
        None => false,
    };
    let read = caught(dir, "the records", || {
        load::read(dir, &keyspace, &parts, legacy)
    })?;
    Ok((keyspace, parts, meta, format, legacy, read))
}

/// The keyspace and its partitions, opened (fjall recovers its journal here), and the format
/// the store declares.
/// Segment files fjall keeps open at once (its default is 900). The server's descriptor plan
/// (`reserved_descriptors`, 64 by default) must cover the store's files, so that the store
/// cannot take the descriptors set aside for client connections; a segment not in the cache
/// is opened again when read, which only loading at start does much of.
pub const MAX_OPEN_FILES: usize = 32;

type Opened = (Keyspace, Parts, PartitionHandle, Option<String>);

/// `threads`: with fjall's background threads (flushes, compactions). Without them, opening
/// writes nothing but what recovery itself does (trimming the journal's preallocated zeros,
/// creating missing partitions), which a refused start undoes; with them, a flush may start at
/// once and turn journals into segments.
fn opened(dir: &Path, threads: bool) -> Result<Opened, StoreError> {
    let open_err = |source| StoreError::Open {
        dir: dir.to_owned(),
        source,
    };
    let config = || Config::new(dir).max_open_files(MAX_OPEN_FILES);
    let keyspace = if threads {
        config().open()
    } else {
        // fjall's own way to open without its threads (hidden, used by its tests); pinned to
        // fjall 2.11 in Cargo.toml with the journal format journal.rs reads.
        Keyspace::create_or_recover(config())
    }
    .map_err(open_err)?;
    let part = |name: &str| {
        keyspace
            .open_partition(name, PartitionCreateOptions::default())
            .map_err(open_err)
    };
    let meta = part("meta")?;
    let mut handles = Vec::with_capacity(Parts::NAMES.len());
    for (i, (p, name)) in Parts::NAMES.iter().enumerate() {
        debug_assert_eq!(*p as usize, i);
        handles.push(part(name)?);
    }
    let parts = Parts(
        handles
            .try_into()
            .unwrap_or_else(|_| unreachable!("one handle per partition")),
    );
    let format = meta
        .get("format")
        .map_err(|source| StoreError::Read {
            dir: dir.to_owned(),
            source,
        })?
        .map(|f| String::from_utf8_lossy(&f).into_owned());
    Ok((keyspace, parts, meta, format))
}

fn meta_legacy(dir: &Path, meta: &PartitionHandle) -> Result<bool, StoreError> {
    meta.contains_key("legacy")
        .map_err(|source| StoreError::Read {
            dir: dir.to_owned(),
            source,
        })
}

/// Runs `f`, turning a panic into an error: fjall 2 `assert!`s on some damaged bytes (a
/// compression tag, for one), and a damaged store must stop the start with a message, not a
/// crash.
pub(crate) fn caught<T>(
    dir: &Path,
    what: &str,
    f: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(StoreError::Panicked {
            dir: dir.to_owned(),
            what: what.to_owned(),
        })
    })
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.shared.state);
            st.stop = true;
            self.shared.nudge(&mut st);
            self.shared.kick.notify_one();
        }
        if let Some(t) = self.committer.take() {
            let _ = t.join();
        }
        let counts = &self.shared.counts;
        tracing::info!(
            queued = counts.enqueued.load(Ordering::Relaxed),
            written = counts.queue_writes.load(Ordering::Relaxed),
            groups = counts.rounds.load(Ordering::Relaxed),
            "store closed: of the deliveries queued for persistent sessions, those not written \
             were acknowledged before their group"
        );
    }
}

impl Store for DiskStore {
    fn session_opened(&self, client_id: &str, expiry_interval: u32, login: Option<&Login>) -> u64 {
        if expiry_interval == 0 {
            return self.removed(client_id);
        }
        // Connected: the expiry starts when the client leaves.
        let record = session_record(expiry_interval, 0, login);
        self.change(|st| {
            st.pending.put(
                Part::Sessions,
                client_id.as_bytes().to_vec(),
                Value::Bytes(record),
                false,
            )
        })
    }

    fn session_offline(
        &self,
        client_id: &str,
        expiry_interval: u32,
        expires_at: Option<Instant>,
        login: Option<&Login>,
    ) {
        let record = session_record(expiry_interval, to_wall(expires_at), login);
        self.change(|st| {
            st.pending.put(
                Part::Sessions,
                client_id.as_bytes().to_vec(),
                Value::Bytes(record),
                false,
            );
        });
    }

    fn session_removed(&self, client_id: &str) {
        self.removed(client_id);
    }

    fn subscription_added(&self, client_id: &str, filter: &TopicFilter, sub: Subscription) -> u64 {
        let mut v = vec![0u8; 6];
        v[0] = RECORD_VERSION;
        v[1] = options_byte(sub.options);
        v[2..6].copy_from_slice(&sub.id.to_be_bytes());
        let key = client_key(client_id, filter.as_bytes());
        self.change(|st| {
            st.pending
                .put(Part::Subscriptions, key, Value::Bytes(v), false)
        })
    }

    fn subscription_removed(&self, client_id: &str, filter: &TopicFilter) {
        let key = client_key(client_id, filter.as_bytes());
        self.change(|st| st.pending.delete(Part::Subscriptions, key));
    }

    fn retained_set(&self, message: &Message) -> u64 {
        let (key, value) = (message.topic.as_bytes().to_vec(), message_record(message));
        self.change(|st| {
            st.pending
                .put(Part::Retained, key, Value::Bytes(value), false)
        })
    }

    fn retained_cleared(&self, topic: &str) -> u64 {
        let key = topic.as_bytes().to_vec();
        self.change(|st| st.pending.delete(Part::Retained, key))
    }

    fn enqueued(&self, client_id: &str, seq: u64, delivery: &Delivery) -> u64 {
        self.shared.counts.enqueued.fetch_add(1, Ordering::Relaxed);
        let message = &delivery.message;
        let id = *message
            .store_id
            .get_or_init(|| self.next_message.fetch_add(1, Ordering::Relaxed));
        let (key, entry) = (
            client_key(client_id, &seq.to_be_bytes()),
            entry_record(id, delivery),
        );
        self.change(|st| {
            let n = st.refs.entry(id).or_insert(0);
            *n += 1;
            if *n == 1 {
                // Message ids are never reused, and sequence numbers only after the
                // session's earlier records were deleted: both keys hold nothing.
                st.pending.put(
                    Part::Messages,
                    id.to_be_bytes().to_vec(),
                    Value::Message(message.clone()),
                    true,
                );
            }
            st.pending.put(Part::Queue, key, Value::Bytes(entry), true);
        })
    }

    fn sent(&self, client_id: &str, seq: u64, packet_id: u16) -> u64 {
        let key = client_key(client_id, &seq.to_be_bytes());
        let stage = stage_record(1, packet_id).to_vec();
        self.change(|st| {
            st.pending
                .put(Part::Inflight, key, Value::Bytes(stage), true)
        })
    }

    fn together(&self, f: &mut dyn FnMut()) {
        let _group = self
            .shared
            .groups
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f();
    }

    fn released(&self, client_id: &str, seq: u64, packet_id: u16) -> u64 {
        let key = client_key(client_id, &seq.to_be_bytes());
        let stage = stage_record(2, packet_id).to_vec();
        self.change(|st| {
            st.pending
                .put(Part::Inflight, key, Value::Bytes(stage), false)
        })
    }

    fn dequeued(&self, client_id: &str, seq: u64, message: &Message, qos: QoS) {
        let key = client_key(client_id, &seq.to_be_bytes());
        self.change(|st| {
            // Only a QoS 2 delivery records its in-flight stage.
            if qos == QoS::ExactlyOnce {
                st.pending.delete(Part::Inflight, key.clone());
            }
            st.pending.delete(Part::Queue, key);
            if let Some(&id) = message.store_id.get() {
                unref(st, id);
            }
        });
    }

    fn inbound_qos2(&self, client_id: &str, packet_id: u16, present: bool) -> u64 {
        let key = client_key(client_id, &packet_id.to_be_bytes());
        self.change(|st| {
            if present {
                // The engine records an id only while it is not already awaiting PUBREL.
                let value = Value::Bytes(vec![RECORD_VERSION]);
                st.pending.put(Part::Inbound, key, value, true);
            } else {
                st.pending.delete(Part::Inbound, key);
            }
        })
    }

    fn metrics(&self) -> Option<petrel_engine::store::StoreMetrics> {
        let counts = &self.shared.counts;
        let (sum, rounds, buckets) = counts.latency.snapshot();
        Some(petrel_engine::store::StoreMetrics {
            disk_bytes: self.disk_space(),
            enqueued: counts.enqueued.load(std::sync::atomic::Ordering::Relaxed),
            queue_writes: counts
                .queue_writes
                .load(std::sync::atomic::Ordering::Relaxed),
            rounds,
            round_seconds_sum: sum,
            round_seconds_buckets: buckets,
        })
    }

    fn will_pending(&self, client_id: &str, will: Option<(Instant, &LastWill)>) {
        let key = client_id.as_bytes().to_vec();
        let record = will.map(|(at, will)| will_record(at, will));
        self.change(|st| match record {
            Some(record) => st
                .pending
                .put(Part::Wills, key, Value::Bytes(record), false),
            None => st.pending.delete(Part::Wills, key),
        });
    }

    fn durable(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire)
    }

    fn wait_durable(&self, token: u64, waker: &Waker) -> bool {
        let mut waiters = lock(&self.shared.waiters);
        if self.shared.durable.load(Ordering::Acquire) >= token {
            return false;
        }
        if !waiters
            .iter()
            .any(|(t, w)| *t == token && w.will_wake(waker))
        {
            waiters.push((token, waker.clone()));
        }
        true
    }

    fn flush(&self) {
        let target = {
            let mut st = lock(&self.shared.state);
            st.sync_requested = true;
            self.shared.nudge(&mut st);
            st.written
        };
        let mut waiters = lock(&self.shared.waiters);
        while self.shared.synced.load(Ordering::Acquire) < target {
            if !matches!(&self.committer, Some(t) if !t.is_finished()) {
                return;
            }
            waiters = self
                .shared
                .landed
                .wait_timeout(waiters, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Bytes of a retained message as stored, for tests and tools.
pub fn encode_retained(message: &Message) -> Bytes {
    Bytes::from(message_record(message))
}

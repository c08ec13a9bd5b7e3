//! `petrel store check` and `petrel store salvage`: the way out of a damaged store.
//!
//! Both leave the store they read exactly as it was. fjall cannot open a keyspace without
//! writing to it (it trims and syncs its journal, and may flush), so the store is first copied,
//! and only the copy is opened. On the copy:
//!
//! 1. each journal file is cut down to its batches that read whole (`journal::keep_valid`):
//!    a damaged batch costs that batch, not the journal after it;
//! 2. every record of every partition is read and its checksum verified; a record that fails
//!    is logged and left out; a stretch of a segment that does not read at all is stepped over
//!    by reading the partition again from its far end;
//! 3. the records that read go into a new store, which is then opened as a start would open
//!    it: a record the start would refuse (it does not decode, or a queue entry refers to a
//!    message that was lost) is logged and removed, until the start succeeds.
//!
//! `check` builds that new store in a scratch directory and throws it away; `salvage` keeps it.
//! Either way the report lists every record that was lost, and nothing else is.

use std::path::{Path, PathBuf};

use fjall::{Config, PartitionCreateOptions, PersistMode};

use crate::changes::Part;
use crate::record::{seal, unseal};
use crate::{caught, journal, DiskStore, Fsync, Parts, StoreError, FORMAT, FORMAT_1};

/// What a check or a salvage found.
#[derive(Debug, Default)]
pub struct Report {
    /// Records that read and were kept.
    pub records: u64,
    /// The unfinished last write of a crash: a start drops it silently (and logs it).
    pub torn: Option<journal::TornTail>,
    /// One line per record (or journal stretch) that cannot be read: what a start refuses.
    pub damage: Vec<String>,
}

impl Report {
    /// Whether a start would accept the store as it is.
    pub fn is_sound(&self) -> bool {
        self.damage.is_empty()
    }
}

/// Checks the store in `dir` as a start would, and further: every damaged record is listed,
/// not only the first. `dir` is not modified; a copy of it is made under the system's
/// temporary directory (`TMPDIR`) and removed afterwards.
pub fn check(dir: &Path) -> Result<Report, StoreError> {
    let scratch = Scratch::new(&std::env::temp_dir(), "check")?;
    let out = scratch.0.join("salvaged");
    examine(dir, &scratch.0, &out)
}

/// Copies every record of the store in `dir` that reads into a new store in `into`, which must
/// not hold a store (it may be missing or an empty directory). `dir` is not modified; a copy of
/// it is made next to `into` and removed afterwards.
pub fn salvage(dir: &Path, into: &Path) -> Result<Report, StoreError> {
    let refuse = |why: &str| StoreError::Io {
        path: into.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, why.to_owned()),
    };
    match std::fs::read_dir(into) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(refuse(
                    "not empty: the salvaged store goes into a new or empty directory",
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(StoreError::Io {
                path: into.to_owned(),
                source,
            })
        }
    }
    let (from, to) = (absolute(dir), absolute(into));
    if to.starts_with(&from) || from.starts_with(&to) {
        return Err(refuse(
            "the salvaged store cannot go inside the store it reads",
        ));
    }
    let parent = to.parent().unwrap_or(Path::new("."));
    let scratch = Scratch::new(parent, "salvage")?;
    let report = examine(dir, &scratch.0, into);
    if report.is_err() {
        // Nothing half-written is left where a store is expected.
        let _ = std::fs::remove_dir_all(into);
    }
    report
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p)
        .or_else(|_| std::path::absolute(p))
        .unwrap_or_else(|_| p.to_owned())
}

/// A directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(parent: &Path, what: &str) -> Result<Scratch, StoreError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = parent.join(format!(
            ".petrel-store-{what}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Scratch(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies a directory tree, files only (a store holds nothing else).
fn copy_tree(from: &Path, to: &Path) -> Result<(), StoreError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io { path, source }
    };
    std::fs::create_dir_all(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().map_err(io(&src))?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(io(&src))?;
        }
    }
    Ok(())
}

fn examine(dir: &Path, scratch: &Path, out: &Path) -> Result<Report, StoreError> {
    if !dir.join("version").is_file() {
        return Err(StoreError::Io {
            path: dir.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no store here (no fjall `version` file)",
            ),
        });
    }
    let mut report = Report::default();
    // What a start would do with the journal as it is.
    match journal::scan(dir) {
        Ok(j) => report.torn = j.torn,
        Err(StoreError::Journal { .. }) => {} // listed by keep_valid below
        Err(e) => return Err(e),
    }
    let copy = scratch.join("copy");
    copy_tree(dir, &copy)?;
    // Lines name the store's own files, not the copy's.
    let cut = journal::keep_valid(&copy)?
        .into_iter()
        .map(|line| line.replace(&copy.display().to_string(), &dir.display().to_string()));
    // A torn tail is what a start drops on its own: not damage.
    if report.torn.is_none() {
        report.damage.extend(cut);
    }
    let (keyspace, parts, meta, format) =
        caught(&copy, "the keyspace", || crate::opened(&copy, false))?;
    let legacy = match format.as_deref() {
        Some(FORMAT) => crate::meta_legacy(&copy, &meta)?,
        Some(FORMAT_1) => true,
        Some(found) => {
            return Err(StoreError::Format {
                dir: dir.to_owned(),
                found: found.to_owned(),
            })
        }
        None => false,
    };
    let open_err = |source| StoreError::Open {
        dir: out.to_owned(),
        source,
    };
    let target = Config::new(out).open().map_err(open_err)?;
    for (part, name) in Parts::NAMES {
        let into = target
            .open_partition(name, PartitionCreateOptions::default())
            .map_err(open_err)?;
        let mut batch = target.batch();
        let mut n = 0;
        let from = parts.get(part);
        let mut keep = |key: &[u8], record: &[u8], batch: &mut fjall::Batch| {
            batch.insert(&into, key.to_vec(), seal(name, key, record));
            n += 1;
        };
        let result = caught(&copy, name, || {
            let (copy_name, dir_name) = (copy.display().to_string(), dir.display().to_string());
            let locate =
                |key: &[u8]| crate::locate(&copy, name, key).replace(&copy_name, &dir_name);
            read_all(
                from,
                part,
                legacy,
                &locate,
                &mut report,
                &mut batch,
                &mut keep,
            );
            Ok(())
        });
        if let Err(e) = result {
            report.damage.push(format!("partition {name}: {e}"));
        }
        batch.commit().map_err(open_err)?;
        report.records += n;
    }
    let meta_out = target
        .open_partition("meta", PartitionCreateOptions::default())
        .map_err(open_err)?;
    meta_out.insert("format", FORMAT).map_err(open_err)?;
    target.persist(PersistMode::SyncAll).map_err(open_err)?;
    drop((meta_out, target, keyspace, parts, meta));
    // Open it as a start would; what the start refuses is removed, one record at a time.
    loop {
        match DiskStore::open(out, Fsync::Never) {
            Ok(_) => break,
            Err(StoreError::Corrupt {
                partition,
                raw_key,
                why,
                ..
            }) => {
                report.damage.push(format!(
                    "partition {partition}, record {:?}: {why}",
                    String::from_utf8_lossy(&raw_key)
                ));
                report.records = report.records.saturating_sub(1);
                let keyspace = Config::new(out).open().map_err(open_err)?;
                let p = keyspace
                    .open_partition(partition, PartitionCreateOptions::default())
                    .map_err(open_err)?;
                p.remove(raw_key).map_err(open_err)?;
                keyspace.persist(PersistMode::SyncAll).map_err(open_err)?;
            }
            Err(e) => return Err(e),
        }
    }
    for line in &report.damage {
        tracing::warn!("store: cannot be read: {line}");
    }
    Ok(report)
}

/// Reads every record of one partition, keeping those whose checksum holds. A stretch that
/// does not read is stepped over by reading back from the partition's far end down to the
/// last key that read.
fn read_all(
    from: &fjall::PartitionHandle,
    part: Part,
    legacy: bool,
    locate: &dyn Fn(&[u8]) -> String,
    report: &mut Report,
    batch: &mut fjall::Batch,
    keep: &mut impl FnMut(&[u8], &[u8], &mut fjall::Batch),
) {
    let name = part.name();
    let mut last: Option<Vec<u8>> = None;
    let mut one =
        |key: &[u8], value: &[u8], report: &mut Report, batch: &mut fjall::Batch| match unseal(
            name, key, value, legacy,
        ) {
            Ok(record) => keep(key, record, batch),
            Err(why) => report.damage.push(format!(
                "partition {name}, record {:?} ({}): {why}",
                String::from_utf8_lossy(key),
                locate(key)
            )),
        };
    // fjall 2 panics on some damaged bytes (an assert in its block decoder): that ends a
    // pass like a read error does.
    let mut failed: Option<String> = None;
    let forward = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for item in from.iter() {
            match item {
                Ok((key, value)) => {
                    one(&key, &value, report, batch);
                    last = Some(key.to_vec());
                }
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
    }));
    if forward.is_err() {
        failed = Some("fjall panicked reading it".to_owned());
    }
    let Some(e) = failed else { return };
    let after = last
        .as_deref()
        .map_or("from its first record".to_owned(), |k| {
            format!("after key {:?}", String::from_utf8_lossy(k))
        });
    let mut first_back: Option<Vec<u8>> = None;
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for item in from.iter().rev() {
            match item {
                Ok((key, value)) => {
                    if last.as_deref().is_some_and(|l| *key <= *l) {
                        break;
                    }
                    one(&key, &value, report, batch);
                    first_back = Some(key.to_vec());
                }
                Err(_) => break,
            }
        }
    }));
    let until = first_back.as_deref().map_or("to its end".to_owned(), |k| {
        format!("up to key {:?}", String::from_utf8_lossy(k))
    });
    report.damage.push(format!(
        "partition {name}: the records {after} {until} do not read ({e}): a damaged segment \
         file in partitions/{name}/segments"
    ));
}

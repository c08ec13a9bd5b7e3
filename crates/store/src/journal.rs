//! Checking fjall's journal before fjall reads it.
//!
//! fjall 2.x recovers its journal in one mode only (`RecoveryMode::TolerateCorruptTail`, and
//! the setting is not even read): any entry that does not decode ends the journal there, and
//! fjall truncates the file at that point. That is right for a crash mid-write, which can only
//! damage the last batch, but a byte flipped in the middle of the journal then silently cuts
//! off every batch after it, on disk, for good. (Some damage also reaches an `assert!` in
//! fjall's decoder and panics.) So the store reads each journal file itself first, read-only,
//! and tells the two apart:
//!
//! - a damaged batch followed by nothing but zeros (fjall preallocates the file) or by bytes
//!   that hold no complete, checksummed batch is a torn tail: it is dropped (truncated, as
//!   fjall would) and logged with what it held;
//! - a damaged batch followed by a valid batch, or damage in any file but the last (a sealed
//!   journal was synced before the next one began), is corruption: the start stops naming the
//!   file and offset, and nothing is written.
//!
//! The layout read here is fjall 2's journal format (`fjall::journal::marker`, disk format
//! V2: the keyspace's `version` file says which, and fjall refuses another):
//!
//! ```text
//! start  0x01, item count u32, seqno u64, compression 0x00 0x00
//! item   0x02, value type u8 (0..=2), partition len u8, partition, key len u16, key,
//!        value len u32, value
//! end    0x03, xxh3-64 of the batch's item bytes u64, "FJL" 0x02
//! ```
//!
//! (all integers big-endian). The store's tests (`tests/damage.rs`, the golden stores) read
//! journals fjall wrote through this, so a change of fjall's format shows up as a failing
//! test, not as a store refused in the field; Cargo.toml pins fjall to 2.11.

use std::path::{Path, PathBuf};

use crate::StoreError;

const START: u8 = 1;
const ITEM: u8 = 2;
const END: u8 = 3;
const MAGIC: &[u8; 4] = b"FJL\x02";

/// A batch that reads whole and matches its checksum.
struct Batch<'a> {
    end: usize,
    seqno: u64,
    items: Vec<ItemRef<'a>>,
}

/// Where and why a batch does not read.
struct Broken {
    /// The offset of the first byte that is not what the format allows (as near as it can
    /// be known: a wrong checksum names the batch's end marker).
    at: usize,
    why: &'static str,
}

/// A batch that reads whole but does not fit the journal: never a torn write.
const OUT_OF_ORDER: &str =
    "sequence number does not rise (this batch's or the one before is damaged)";

pub(crate) struct ItemRef<'a> {
    pub partition: &'a str,
    pub key: &'a [u8],
    pub value: &'a [u8],
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, why: &'static str) -> Result<&'a [u8], Broken> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(Broken { at: self.pos, why }),
        }
    }

    fn byte(&mut self, why: &'static str) -> Result<u8, Broken> {
        Ok(self.take(1, why)?[0])
    }

    fn be<const N: usize>(&mut self, why: &'static str) -> Result<[u8; N], Broken> {
        let s = self.take(N, why)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
}

/// One item; `Err` at its first bad byte.
fn item<'a>(c: &mut Cursor<'a>) -> Result<ItemRef<'a>, Broken> {
    let at = c.pos;
    if c.byte("the file ends inside a batch")? != ITEM {
        return Err(Broken {
            at,
            why: "expected an item",
        });
    }
    let vt_at = c.pos;
    if c.byte("the file ends inside an item")? > 2 {
        return Err(Broken {
            at: vt_at,
            why: "unknown value type",
        });
    }
    let len = usize::from(c.byte("the file ends inside an item")?);
    let name_at = c.pos;
    let partition =
        std::str::from_utf8(c.take(len, "the file ends inside an item")?).map_err(|_| Broken {
            at: name_at,
            why: "partition name is not UTF-8",
        })?;
    let len = usize::from(u16::from_be_bytes(c.be("the file ends inside an item")?));
    let key = c.take(len, "the file ends inside an item")?;
    let len = u32::from_be_bytes(c.be("the file ends inside an item")?);
    let value = c.take(
        usize::try_from(len).unwrap_or(usize::MAX),
        "the file ends inside an item",
    )?;
    Ok(ItemRef {
        partition,
        key,
        value,
    })
}

/// The batch that starts at `pos`, whole and checksummed.
fn batch(buf: &[u8], pos: usize) -> Result<Batch<'_>, Broken> {
    let mut c = Cursor { buf, pos };
    if c.byte("the file ends inside a batch")? != START {
        return Err(Broken {
            at: pos,
            why: "expected the start of a batch",
        });
    }
    let count = u32::from_be_bytes(c.be("the file ends inside a batch")?);
    let seqno = u64::from_be_bytes(c.be("the file ends inside a batch")?);
    let compression_at = c.pos;
    if c.be::<2>("the file ends inside a batch")? != [0, 0] {
        return Err(Broken {
            at: compression_at,
            why: "unknown compression",
        });
    }
    let items_at = c.pos;
    // No allocation sized by what the file claims: items are pushed as they read.
    let mut items = Vec::new();
    for _ in 0..count {
        items.push(item(&mut c)?);
    }
    let items_end = c.pos;
    if c.byte("the file ends inside a batch")? != END {
        return Err(Broken {
            at: items_end,
            why: "more items than the batch's count",
        });
    }
    let expected = u64::from_be_bytes(c.be("the file ends inside a batch")?);
    let magic_at = c.pos;
    if c.take(4, "the file ends inside a batch")? != MAGIC {
        return Err(Broken {
            at: magic_at,
            why: "bad end-of-batch marker",
        });
    }
    if xxhash_rust::xxh3::xxh3_64(&buf[items_at..items_end]) != expected {
        return Err(Broken {
            at: items_end,
            why: "checksum mismatch: the batch's bytes changed after it was written",
        });
    }
    Ok(Batch {
        end: c.pos,
        seqno,
        items,
    })
}

/// What a crash left at the end of the last journal: a batch that did not finish.
#[derive(Debug)]
pub struct TornTail {
    pub file: PathBuf,
    pub offset: u64,
    /// Bytes from `offset` up to the zeros fjall preallocated (or the end of the file).
    pub bytes: u64,
    /// `partition/key` of each item of the batch that can still be read.
    pub items: Vec<String>,
}

impl std::fmt::Display for TornTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: an incomplete last batch at offset {} ({} bytes",
            self.file.display(),
            self.offset,
            self.bytes
        )?;
        if self.items.is_empty() {
            write!(f, ", no readable item)")
        } else {
            write!(f, "; items: {})", self.items.join(", "))
        }
    }
}

/// What the journal holds.
#[derive(Debug, Default)]
pub struct Journal {
    pub batches: u64,
    pub items: u64,
    pub torn: Option<TornTail>,
    /// Each file's length as found (after a torn tail was cut), to undo fjall's trimming of
    /// the zeros it preallocated when a start is refused.
    sizes: Vec<(PathBuf, u64)>,
}

/// The journal files of a store in `dir`, oldest first. A file fjall would not recognise is
/// an error here (fjall panics on it).
fn files(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let folder = dir.join("journals");
    let io = |source: std::io::Error| StoreError::Io {
        path: folder.clone(),
        source,
    };
    let entries = match std::fs::read_dir(&folder) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // As fjall: macOS litter is ignored.
        if name == ".DS_Store" || name.starts_with("._") {
            continue;
        }
        let id = name
            .strip_suffix(".sealed")
            .unwrap_or(&name)
            .parse::<u64>()
            .ok()
            .filter(|_| entry.file_type().is_ok_and(|t| t.is_file()));
        let Some(id) = id else {
            return Err(StoreError::Journal {
                file: entry.path(),
                offset: 0,
                why: "not a journal file (fjall cannot open a store holding it)".into(),
            });
        };
        files.push((id, entry.path()));
    }
    files.sort();
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

/// Reads every journal file of the store in `dir`. Corruption is an error naming the file and
/// offset; a torn tail is returned for the caller to drop (or report).
pub fn scan(dir: &Path) -> Result<Journal, StoreError> {
    let files = files(dir)?;
    let mut journal = Journal::default();
    let mut seqno: Option<u64> = None;
    for (i, path) in files.iter().enumerate() {
        let last = i + 1 == files.len();
        let buf = std::fs::read(path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        journal.sizes.push((path.clone(), buf.len() as u64));
        // Where the zeros fjall preallocated begin.
        let used = buf.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
        let mut pos = 0;
        while pos < used {
            // fjall numbers batches under the journal's lock, so sequence numbers rise from
            // one batch to the next; the one field the batch checksum does not cover is
            // checked that way (a damaged number that still rises goes unnoticed).
            let read = batch(&buf, pos).and_then(|b| match seqno {
                Some(prev) if b.seqno <= prev => Err(Broken {
                    at: pos + 5,
                    why: OUT_OF_ORDER,
                }),
                _ => Ok(b),
            });
            match read {
                Ok(b) => {
                    seqno = Some(b.seqno);
                    journal.batches += 1;
                    journal.items += b.items.len() as u64;
                    pos = b.end;
                }
                Err(broken) => {
                    let corrupt = |why: String| StoreError::Journal {
                        file: path.clone(),
                        offset: broken.at as u64,
                        why,
                    };
                    if broken.why == OUT_OF_ORDER {
                        return Err(corrupt(OUT_OF_ORDER.to_owned()));
                    }
                    if !last {
                        return Err(corrupt(format!(
                            "{} (in a sealed journal, which a crash cannot leave unfinished)",
                            broken.why
                        )));
                    }
                    if let Some(next) =
                        (pos + 1..used).find(|&q| buf[q] == START && batch(&buf, q).is_ok())
                    {
                        return Err(corrupt(format!(
                            "{}; a valid batch follows at offset {next}, so this is not an \
                             unfinished last write but damage in the middle of the journal \
                             (the batch at offset {pos} is the first that does not read)",
                            broken.why
                        )));
                    }
                    if let Some(size) = journal.sizes.last_mut() {
                        size.1 = pos as u64;
                    }
                    journal.torn = Some(TornTail {
                        file: path.clone(),
                        offset: pos as u64,
                        bytes: (used - pos) as u64,
                        items: readable_items(&buf[..used], pos),
                    });
                    break;
                }
            }
        }
    }
    Ok(journal)
}

/// The journal batch that last wrote `key` in `partition`, if one still holds it: (file,
/// offset of the batch, the value it wrote). For naming where a damaged record lies; batches
/// that do not read are skipped.
pub(crate) fn locate(dir: &Path, partition: &str, key: &[u8]) -> Option<(PathBuf, u64, Vec<u8>)> {
    let mut found = None;
    for path in files(dir).ok()? {
        let Ok(buf) = std::fs::read(&path) else {
            continue;
        };
        let mut pos = 0;
        while let Ok(b) = batch(&buf, pos) {
            if let Some(i) = b
                .items
                .iter()
                .rev()
                .find(|i| i.partition == partition && i.key == key)
            {
                found = Some((path.clone(), pos as u64, i.value.to_vec()));
            }
            pos = b.end;
        }
    }
    found
}

/// For salvage, on a copy of a store: rewrites each journal file to hold only its batches
/// that read whole (in order, sequence numbers rising), and returns what was cut, one line
/// per damaged stretch.
pub(crate) fn keep_valid(dir: &Path) -> Result<Vec<String>, StoreError> {
    let mut damage = Vec::new();
    let mut seqno: Option<u64> = None;
    for path in files(dir)? {
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let buf = std::fs::read(&path).map_err(io)?;
        let used = buf.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
        let mut kept = Vec::with_capacity(used);
        let mut pos = 0;
        while pos < used {
            let read = batch(&buf, pos).and_then(|b| match seqno {
                Some(prev) if b.seqno <= prev => Err(Broken {
                    at: pos + 5,
                    why: OUT_OF_ORDER,
                }),
                _ => Ok(b),
            });
            match read {
                Ok(b) => {
                    seqno = Some(b.seqno);
                    kept.extend_from_slice(&buf[pos..b.end]);
                    pos = b.end;
                }
                Err(broken) => {
                    let next = (pos + 1..used)
                        .find(|&q| buf[q] == START && batch(&buf, q).is_ok())
                        .unwrap_or(used);
                    let items = readable_items(&buf[..used], pos);
                    damage.push(format!(
                        "journal file {}, offset {}: {}; dropped bytes {pos}..{next} (a batch \
                         whose items cannot be trusted{})",
                        path.display(),
                        broken.at,
                        broken.why,
                        if items.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", items.join(", "))
                        }
                    ));
                    pos = next;
                }
            }
        }
        if kept.len() != used {
            std::fs::write(&path, &kept).map_err(io)?;
        }
    }
    Ok(damage)
}

/// The items of the batch at `pos` that still read, as `partition/key`.
fn readable_items(buf: &[u8], pos: usize) -> Vec<String> {
    let mut c = Cursor { buf, pos };
    let header = c.byte("").ok() == Some(START)
        && c.be::<4>("").is_ok()
        && c.be::<8>("").is_ok()
        && c.be::<2>("").is_ok();
    let mut out = Vec::new();
    if header {
        while let Ok(i) = item(&mut c) {
            out.push(format!(
                "{}/{}",
                i.partition,
                String::from_utf8_lossy(i.key).escape_debug()
            ));
        }
    }
    out
}

/// Gives back the zeros fjall trimmed from the journal files (a sparse extension: the same
/// bytes). Only what it trimmed: a file shorter than it was is extended, nothing else.
pub(crate) fn restore_sizes(journal: &Journal) {
    for (path, size) in &journal.sizes {
        let Ok(file) = std::fs::OpenOptions::new().write(true).open(path) else {
            continue;
        };
        if file.metadata().is_ok_and(|m| m.len() < *size) {
            let _ = file.set_len(*size).and_then(|()| file.sync_all());
        }
    }
}

/// Drops a torn tail: truncates its file where the batch began, as fjall would have.
pub fn drop_torn(torn: &TornTail) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: torn.file.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&torn.file)
        .map_err(io)?;
    file.set_len(torn.offset).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_batch(items: &[(&str, &[u8], &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (p, k, v) in items {
            body.push(ITEM);
            body.push(0);
            body.push(p.len() as u8);
            body.extend_from_slice(p.as_bytes());
            body.extend_from_slice(&(k.len() as u16).to_be_bytes());
            body.extend_from_slice(k);
            body.extend_from_slice(&(v.len() as u32).to_be_bytes());
            body.extend_from_slice(v);
        }
        let mut out = vec![START];
        out.extend_from_slice(&(items.len() as u32).to_be_bytes());
        out.extend_from_slice(&7u64.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&body);
        out.push(END);
        out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_be_bytes());
        out.extend_from_slice(MAGIC);
        out
    }

    #[test]
    fn a_huge_claimed_length_is_damage_not_an_allocation() {
        let mut b = encode_batch(&[("queue", b"k", b"v")]);
        // The value length of the one item.
        let at = b.len() - 13 - 1 - 4;
        b[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        let broken = batch(&b, 0).err().expect("damaged");
        assert_eq!(broken.at, at + 4);
    }

    #[test]
    fn every_single_byte_flip_of_a_batch_is_caught() {
        let b = encode_batch(&[("queue", b"key", b"value"), ("retained", b"t", b"x")]);
        for i in 0..b.len() {
            if (5..13).contains(&i) {
                // The sequence number: checked across batches by `scan`.
                continue;
            }
            let mut d = b.clone();
            d[i] ^= 0x40;
            assert!(batch(&d, 0).is_err(), "flip at {i} not caught");
        }
    }
}

//! fjall vs redb under the workload petrel's durable store sees: each QoS 1 message is written
//! once (message record + one queue entry per offline subscriber), made durable, and deleted
//! again shortly after, when the subscriber acknowledges it.
//!
//! `cargo run --release -- [messages]` in bench/storage; prints one line per engine and mode.

use std::path::Path;
use std::time::Instant;

const PAYLOAD: usize = 100;
const SUBSCRIBERS: u64 = 4;
/// How far deletes trail inserts (messages in flight between publish and acknowledgement).
const LAG: u64 = 1_000;

fn key(session: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&session.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            let m = e.metadata().unwrap();
            total += if m.is_dir() { dir_size(&e.path()) } else { m.len() };
        }
    }
    total
}

trait Engine {
    /// Writes messages `from..to` with their queue entries and deletes those `LAG` behind, in
    /// one durable (or not) commit.
    fn batch(&mut self, from: u64, to: u64, durable: bool);
}

struct Fjall {
    keyspace: fjall::Keyspace,
    messages: fjall::PartitionHandle,
    queues: fjall::PartitionHandle,
}

impl Engine for Fjall {
    fn batch(&mut self, from: u64, to: u64, durable: bool) {
        let mut b = self.keyspace.batch();
        let payload = [7u8; PAYLOAD];
        for seq in from..to {
            b.insert(&self.messages, seq.to_be_bytes(), payload);
            for s in 0..SUBSCRIBERS {
                b.insert(&self.queues, key(s, seq), seq.to_be_bytes());
            }
            if seq >= LAG {
                let old = seq - LAG;
                b.remove(&self.messages, old.to_be_bytes());
                for s in 0..SUBSCRIBERS {
                    b.remove(&self.queues, key(s, old));
                }
            }
        }
        b.commit().unwrap();
        if durable {
            self.keyspace.persist(fjall::PersistMode::SyncData).unwrap();
        }
    }
}

const MESSAGES: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("messages");
const QUEUES: redb::TableDefinition<&[u8; 16], u64> = redb::TableDefinition::new("queues");

struct Redb {
    db: redb::Database,
}

impl Engine for Redb {
    fn batch(&mut self, from: u64, to: u64, durable: bool) {
        let mut tx = self.db.begin_write().unwrap();
        tx.set_durability(if durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        });
        {
            let mut messages = tx.open_table(MESSAGES).unwrap();
            let mut queues = tx.open_table(QUEUES).unwrap();
            let payload = [7u8; PAYLOAD];
            for seq in from..to {
                messages.insert(seq, &payload[..]).unwrap();
                for s in 0..SUBSCRIBERS {
                    queues.insert(&key(s, seq), seq).unwrap();
                }
                if seq >= LAG {
                    let old = seq - LAG;
                    messages.remove(old).unwrap();
                    for s in 0..SUBSCRIBERS {
                        queues.remove(&key(s, old)).unwrap();
                    }
                }
            }
        }
        tx.commit().unwrap();
    }
}

fn run(name: &str, engine: &mut dyn Engine, dir: &Path, total: u64, batch: u64, durable: bool) {
    let started = Instant::now();
    let mut seq = 0;
    while seq < total {
        let to = (seq + batch).min(total);
        engine.batch(seq, to, durable);
        seq = to;
    }
    let took = started.elapsed();
    println!(
        "{name:6} batch {batch:4} {:9} {:>10.0} msg/s  disk {:>8} KiB after {total} messages",
        if durable { "fsync" } else { "no fsync" },
        total as f64 / took.as_secs_f64(),
        dir_size(dir) / 1024
    );
}

fn main() {
    let total: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().unwrap())
        .unwrap_or(20_000);
    let root = std::env::temp_dir().join(format!("petrel-storage-compare-{}", std::process::id()));
    for (batch, durable) in [(1, true), (16, true), (128, true), (128, false)] {
        let total = if batch == 1 { total / 10 } else { total };
        let dir = root.join(format!("fjall-{batch}-{durable}"));
        let keyspace = fjall::Config::new(&dir).open().unwrap();
        let messages = keyspace
            .open_partition("messages", Default::default())
            .unwrap();
        let queues = keyspace.open_partition("queues", Default::default()).unwrap();
        let mut f = Fjall {
            keyspace,
            messages,
            queues,
        };
        run("fjall", &mut f, &dir, total, batch, durable);
        drop(f);

        let dir = root.join(format!("redb-{batch}-{durable}"));
        std::fs::create_dir_all(&dir).unwrap();
        let db = redb::Database::create(dir.join("db.redb")).unwrap();
        let mut r = Redb { db };
        run("redb", &mut r, &dir, total, batch, durable);
    }
    let _ = std::fs::remove_dir_all(&root);
}

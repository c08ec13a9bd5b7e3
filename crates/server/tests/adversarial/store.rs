//! A damaged store (issue 20, item 3), against the real binary: a store with queued messages,
//! retained messages and sessions is written by petrel, stopped, and damaged on disk.
//!
//! - one byte flipped in the middle of the journal: the start fails naming the journal file
//!   and offset, and every file is byte-identical afterwards (before: petrel started without
//!   a word and truncated the journal, losing everything after the flipped byte);
//! - one byte flipped in a data segment (inside a retained message's payload): the start fails
//!   naming the partition and record (before: a subscriber received the altered payload);
//! - the journal's tail cut as a crash mid-write leaves it: the start succeeds and logs what
//!   it dropped;
//! - `petrel store check` names the damage and exits non-zero; `petrel store salvage` copies
//!   everything but the damaged records into a new store that starts and delivers them intact;
//! - `--check-config` refuses an unusable `storage.dir`, naming the key (item 11).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

const PROMPT: Duration = Duration::from_secs(5);
const RETAINED: usize = 100;
const QUEUED: usize = 100;

/// A temporary directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Scratch {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "petrel-adv-store-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn storage(dir: &Path) -> String {
    format!(
        "[storage]\ndir = \"{}\"\nfsync = \"always\"\n",
        dir.display()
    )
}

/// A payload that does not compress (fjall compresses segment blocks with lz4), so that its
/// bytes appear as they are in a segment and a flip can be aimed at one.
fn payload(kind: &str, i: usize) -> String {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let token: String = (0..24)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b"abcdefghijklmnopqrstuvwxyz234567"[(x % 32) as usize])
        })
        .collect();
    format!("{kind} {i} {token}")
}

fn connect_persistent(client_id: &str) -> Vec<u8> {
    let mut c = connect_v311(client_id, 60);
    c[9] = 0x00; // Clean Session 0
    c
}

/// Writes a store: two persistent sessions (one with QUEUED messages waiting for it),
/// RETAINED retained messages; then stops petrel with SIGTERM.
async fn build_store(dir: &Path) {
    let mut broker = Broker::start_with("", &storage(dir));
    for (id, filter) in [("keeper", "q/#"), ("idle", "other/#")] {
        let mut s = RawClient::connect(broker.addr).await;
        s.send(&connect_persistent(id)).await;
        s.expect(&CONNACK_ACCEPTED, PROMPT).await;
        s.send(&subscribe(1, filter, 1)).await;
        s.expect(&suback(1, 1), PROMPT).await;
    }
    let mut p = RawClient::connected(broker.addr, "publisher", 60).await;
    for i in 0..RETAINED {
        let id = (i + 1) as u16;
        let mut packet = publish(&format!("r/{i}"), 1, id, payload("retained", i).as_bytes());
        packet[0] |= 0x01;
        p.send(&packet).await;
        p.expect(&puback(id), PROMPT).await;
    }
    for i in 0..QUEUED {
        let id = (i + 1) as u16;
        p.send(&publish(
            &format!("q/{i}"),
            1,
            id,
            payload("queued", i).as_bytes(),
        ))
        .await;
        p.expect(&puback(id), PROMPT).await;
    }
    drop(p);
    assert!(broker.terminate().success());
}

/// What a restarted broker gives back: the retained messages a new subscriber gets and the
/// messages queued for "keeper", as payloads.
async fn delivered(dir: &Path) -> (Vec<String>, Vec<String>) {
    let broker = Broker::start_with("", &storage(dir));
    let mut got = Vec::new();
    for (id, filter, persistent) in [("fresh", Some("r/#"), false), ("keeper", None, true)] {
        let mut s = RawClient::connect(broker.addr).await;
        if persistent {
            s.send(&connect_persistent(id)).await;
            s.expect(&[0x20, 0x02, 0x01, 0x00], PROMPT).await;
        } else {
            s.send(&connect_v311(id, 60)).await;
            s.expect(&CONNACK_ACCEPTED, PROMPT).await;
        }
        if let Some(filter) = filter {
            s.send(&subscribe(1, filter, 1)).await;
        }
        let mut payloads = Vec::new();
        while let Ok(packet) = s.packet(Duration::from_millis(1500)).await {
            if packet[0] & 0xf0 == 0x30 {
                payloads.push(String::from_utf8_lossy(publish_payload(&packet)).into_owned());
                if (packet[0] >> 1) & 0x03 > 0 {
                    s.send(&puback(publish_packet_id(&packet))).await;
                }
            }
        }
        got.push(payloads);
    }
    let queued = got.pop().unwrap();
    let retained = got.pop().unwrap();
    (retained, queued)
}

/// Every payload is one that was published, byte for byte.
fn assert_intact(retained: &[String], queued: &[String]) {
    let known: Vec<String> = (0..RETAINED)
        .map(|i| payload("retained", i))
        .chain((0..QUEUED).map(|i| payload("queued", i)))
        .collect();
    for p in retained.iter().chain(queued) {
        assert!(known.contains(p), "an altered payload was delivered: {p:?}");
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

fn journal(dir: &Path) -> PathBuf {
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(dir.join("journals"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| Some((p.file_name()?.to_str()?.parse().ok()?, p)))
        .collect();
    files.sort();
    files.pop().expect("a journal file").1
}

/// The journal's written length (fjall preallocates zeros after it).
fn used(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1)
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x55;
    std::fs::write(path, bytes).unwrap();
}

/// Runs petrel with `args` to its end (at most 60 s): status, stdout, stderr.
fn petrel(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_petrel"));
    command
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    dies_with_test(&mut command);
    let child = command.spawn().expect("spawn petrel");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.expect("petrel ran"),
        Err(_) => {
            // SAFETY: kill(2) on our own child, not yet reaped (the waiter still waits).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("petrel {args:?} did not finish in 60 s");
        }
    };
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts petrel on `dir`; `Err(log)` if it exits, `Ok(log)` if it comes up listening (it is
/// then killed): a damaged store must give `Err`.
fn try_start(dir: &Path) -> Result<String, String> {
    let scratch = Scratch::new("config");
    let config = scratch.0.join("petrel.toml");
    let addr = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        &config,
        format!("[[listeners]]\nbind = \"{addr}\"\n\n{}", storage(dir)),
    )
    .unwrap();
    let log = scratch.0.join("petrel.log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_petrel"));
    command
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    dies_with_test(&mut command);
    let mut child = command.spawn().expect("spawn petrel");
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Ok(Some(_)) = child.try_wait() {
            return Err(std::fs::read_to_string(&log).unwrap_or_default());
        }
        if text.contains("listening") {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(text);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "petrel neither started nor exited in 30 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `store check` and `store salvage` on a damaged store: check fails naming `names`; salvage
/// leaves DIR as it was and makes a store that starts and delivers all but at most `lost`
/// messages, each intact.
async fn check_and_salvage(dir: &Path, names: &str, lost: usize) {
    let before = snapshot(dir);
    let (ok, out, err) = petrel(&["store".as_ref(), "check".as_ref(), dir.as_os_str()]);
    println!("store check:\n{out}{err}");
    assert!(!ok, "check passed a damaged store:\n{out}{err}");
    assert!(err.contains(names), "check does not name {names}:\n{err}");
    let into = Scratch::new("salvaged");
    let new_dir = into.0.join("store");
    let (ok, out, err) = petrel(&[
        "store".as_ref(),
        "salvage".as_ref(),
        dir.as_os_str(),
        "--into".as_ref(),
        new_dir.as_os_str(),
    ]);
    println!("store salvage:\n{out}{err}");
    assert!(ok, "salvage failed:\n{out}{err}");
    assert!(out.contains(names), "salvage does not list {names}:\n{out}");
    assert!(
        snapshot(dir) == before,
        "check or salvage changed the store"
    );
    // The login secret beside the store comes along, so SCRAM challenges stay the same.
    assert_eq!(
        std::fs::read(new_dir.join("auth.secret")).ok(),
        std::fs::read(dir.join("auth.secret")).ok(),
        "the login secret was not carried into the salvaged store"
    );
    assert!(dir.join("auth.secret").exists());
    let (ok, out, err) = petrel(&["store".as_ref(), "check".as_ref(), new_dir.as_os_str()]);
    assert!(ok, "the salvaged store is not sound:\n{out}{err}");
    let (retained, queued) = delivered(&new_dir).await;
    assert_intact(&retained, &queued);
    println!(
        "salvaged store delivers {} retained and {} queued messages",
        retained.len(),
        queued.len()
    );
    assert!(
        retained.len() + queued.len() + lost >= RETAINED + QUEUED,
        "salvage lost more than the damaged records: {} retained, {} queued",
        retained.len(),
        queued.len()
    );
}

/// Where to flip a byte in the middle of the journal: inside a batch's data (which fjall's
/// batch checksum catches, though its error names no file), or on the first byte of a batch
/// (which fjall took for the end of the journal: it truncated the file there and started).
fn mid_journal(bytes: &[u8], batch_start: bool) -> usize {
    let middle = used(bytes) / 2;
    if !batch_start {
        return middle;
    }
    // A batch ends with "FJL" 2; the next one starts right after.
    let end = bytes[middle..]
        .windows(4)
        .position(|w| w == b"FJL\x02")
        .expect("a batch after the middle");
    middle + end + 4
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_flipped_mid_journal_stops_the_start_and_changes_no_file() {
    let _machine = light().await;
    for batch_start in [false, true] {
        let dir = Scratch::new("mid-journal");
        let store = dir.0.join("store");
        build_store(&store).await;
        let file = journal(&store);
        let at = mid_journal(&std::fs::read(&file).unwrap(), batch_start);
        flip(&file, at);
        let before = snapshot(&store);
        let log = try_start(&store).expect_err("petrel started on a damaged journal");
        println!("{log}");
        assert!(
            log.contains(&file.display().to_string()) && log.contains("offset"),
            "the error does not name the journal file and offset:\n{log}"
        );
        assert!(
            snapshot(&store) == before,
            "a refused start changed the files"
        );
        // Each publish waited for its PUBACK, so one journal batch holds at most one message.
        check_and_salvage(&store, &file.display().to_string(), 1).await;
    }
}

/// Moves everything from the journal into segments, as fjall does once a memtable fills.
fn flush_to_segments(dir: &Path) {
    let keyspace = fjall::Config::new(dir).open().unwrap();
    for name in [
        "sessions",
        "subscriptions",
        "retained",
        "messages",
        "queue",
        "meta",
    ] {
        let p = keyspace.open_partition(name, Default::default()).unwrap();
        p.rotate_memtable_and_wait().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_flipped_in_a_segment_is_never_delivered() {
    let _machine = light().await;
    let dir = Scratch::new("segment");
    let store = dir.0.join("store");
    build_store(&store).await;
    flush_to_segments(&store);
    // Aim at one retained message's payload, where it sits in the segment.
    let target = payload("retained", RETAINED / 2);
    let token = target.rsplit(' ').next().unwrap().as_bytes();
    let segments = store.join("partitions/retained/segments");
    let (file, at) = std::fs::read_dir(&segments)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find_map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            let at = bytes.windows(token.len()).position(|w| w == token)?;
            Some((p, at + token.len() / 2))
        })
        .expect("the payload sits in a retained segment");
    flip(&file, at);
    let before = snapshot(&store);
    match try_start(&store) {
        Err(log) => {
            println!("{log}");
            assert!(
                log.contains("retained") && log.contains(&format!("r/{}", RETAINED / 2)),
                "the error does not name the partition and record:\n{log}"
            );
            assert!(
                log.contains(&file.display().to_string()),
                "the error does not name the segment file:\n{log}"
            );
        }
        Ok(_) => {
            let (retained, queued) = delivered(&store).await;
            assert_intact(&retained, &queued);
            panic!("petrel started on a damaged segment");
        }
    }
    assert!(
        snapshot(&store) == before,
        "a refused start changed the files"
    );
    check_and_salvage(&store, &format!("r/{}", RETAINED / 2), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_journal_tail_starts_and_says_what_it_dropped() {
    let _machine = light().await;
    let dir = Scratch::new("torn");
    let store = dir.0.join("store");
    build_store(&store).await;
    let file = journal(&store);
    let bytes = std::fs::read(&file).unwrap();
    // A crash mid-write: the end of the last batch never reached the disk.
    std::fs::write(&file, &bytes[..used(&bytes) - 6]).unwrap();
    let (ok, out, err) = petrel(&["store".as_ref(), "check".as_ref(), store.as_os_str()]);
    assert!(
        ok,
        "a torn tail is what a crash leaves, not damage:\n{out}{err}"
    );
    assert!(out.contains("torn tail"), "{out}");
    let log = try_start(&store).expect("petrel starts after a torn tail");
    let line = log
        .lines()
        .find(|l| l.contains("unfinished"))
        .unwrap_or_else(|| panic!("no log line says what was dropped:\n{log}"));
    println!("{line}");
    assert!(line.contains(&file.display().to_string()) && line.contains("dropped"));
    let (retained, queued) = delivered(&store).await;
    assert_intact(&retained, &queued);
    assert_eq!(retained.len(), RETAINED);
    assert!(queued.len() + 1 >= QUEUED, "{} queued", queued.len());
}

#[test]
fn check_config_refuses_an_unusable_storage_dir() {
    let dir = Scratch::new("check-config");
    let file = dir.0.join("not-a-directory");
    std::fs::write(&file, "x").unwrap();
    let mut bad_dirs = vec![file.clone(), file.join("below-a-file")];
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // root writes anywhere: an unwritable directory is only one to others.
        use std::os::unix::fs::PermissionsExt;
        let locked = dir.0.join("read-only");
        std::fs::create_dir(&locked).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o500)).unwrap();
        bad_dirs.push(locked.clone());
        bad_dirs.push(locked.join("store"));
    }
    for bad in bad_dirs {
        let config = dir.0.join("petrel.toml");
        std::fs::write(
            &config,
            format!("[storage]\nmode = \"disk\"\ndir = \"{}\"\n", bad.display()),
        )
        .unwrap();
        let (ok, out, err) = petrel(&["--check-config".as_ref(), config.as_os_str()]);
        assert!(
            !ok,
            "--check-config passed storage.dir = {}:\n{out}",
            bad.display()
        );
        assert!(err.contains("storage.dir"), "does not name the key:\n{err}");
    }
    // An empty directory, or one yet to be made below a writable one, is usable.
    let config = dir.0.join("petrel.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\nmode = \"disk\"\ndir = \"{}\"\n",
            dir.0.join("new/store").display()
        ),
    )
    .unwrap();
    let (ok, out, err) = petrel(&["--check-config".as_ref(), config.as_os_str()]);
    assert!(ok, "{out}{err}");
}

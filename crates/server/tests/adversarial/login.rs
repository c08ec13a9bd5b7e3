//! Attacks on login (issue 20, items 4, 5, 6, 11): floods of password guesses, guessing
//! which user names exist (by time, by SCRAM salt), SCRAM guessing past the lockout, and
//! logs a brute force fills.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use petrel_engine::scram::client as scram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::{light, Broker};

/// A directory for one test's files, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("petrel-login-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test directory");
        Dir(dir)
    }

    /// A password file with these users (argon2id, as `petrel passwd` writes them).
    fn password_file(&self, users: &[(&str, &str)]) -> PathBuf {
        let mut text = String::new();
        for (user, password) in users {
            let hash = petrel_server::passwords::hash(password.as_bytes()).expect("hash");
            text.push_str(&format!("{user}:{hash}\n"));
        }
        let path = self.0.join("passwords");
        std::fs::write(&path, text).expect("write the password file");
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return;
        }
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// A 3.1.1 CONNECT with a user name and password.
fn connect_login(client_id: &str, user: &str, password: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xC2, 0x00, 0x00];
    string(client_id.as_bytes(), &mut body);
    string(user.as_bytes(), &mut body);
    string(password.as_bytes(), &mut body);
    packet(0x10, &body)
}

/// Authentication Method and Data properties.
fn auth_properties(data: &[u8]) -> Vec<u8> {
    let mut props = vec![0x15];
    string(b"SCRAM-SHA-256", &mut props);
    props.push(0x16);
    string(data, &mut props);
    let mut out = Vec::new();
    remaining_length(props.len(), &mut out);
    out.extend_from_slice(&props);
    out
}

/// A v5 CONNECT that starts SCRAM-SHA-256 with `data` (client-first).
fn connect_scram(client_id: &str, data: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x00];
    body.extend(auth_properties(data.as_bytes()));
    string(client_id.as_bytes(), &mut body);
    packet(0x10, &body)
}

/// AUTH continue with `data` (client-final).
fn auth_continue(data: &str) -> Vec<u8> {
    let mut body = vec![0x18];
    body.extend(auth_properties(data.as_bytes()));
    packet(0xF0, &body)
}

/// A connection to `addr` from `source` (another loopback address: another client address
/// as far as the broker's per-address limits go).
async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind((source, 0).into())
        .expect("bind a loopback source address");
    let stream = socket.connect(addr).await.expect("connect to petrel");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// Reads one packet (first byte and body); `None` if the broker closed or `wait` passed.
async fn read_packet(stream: &mut TcpStream, wait: Duration) -> Option<(u8, Vec<u8>)> {
    tokio::time::timeout(wait, async {
        let first = stream.read_u8().await.ok()?;
        let mut len = 0usize;
        for shift in (0..28).step_by(7) {
            let b = stream.read_u8().await.ok()?;
            len |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; len];
        stream.read_exact(&mut body).await.ok()?;
        Some((first, body))
    })
    .await
    .ok()
    .flatten()
}

/// The CONNACK return code (3.1.1) or reason code (v5) a CONNECT gets; `None` for no answer.
async fn login(stream: &mut TcpStream, connect: &[u8], wait: Duration) -> Option<u8> {
    stream.write_all(connect).await.ok()?;
    match read_packet(stream, wait).await? {
        (0x20, body) if body.len() >= 2 => Some(body[1]),
        _ => None,
    }
}

/// The Authentication Data of an AUTH or CONNACK body (v5), after `skip` fixed bytes.
fn authentication_data(body: &[u8], skip: usize) -> Option<Vec<u8>> {
    let mut i = skip;
    let mut len = 0usize;
    for shift in (0..28).step_by(7) {
        let b = *body.get(i)?;
        i += 1;
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
    }
    let end = i + len;
    while i < end {
        let id = body[i];
        i += 1;
        match id {
            0x15 | 0x16 | 0x1F => {
                let n = usize::from(u16::from_be_bytes([body[i], body[i + 1]]));
                let value = body[i + 2..i + 2 + n].to_vec();
                i += 2 + n;
                if id == 0x16 {
                    return Some(value);
                }
            }
            _ => return None,
        }
    }
    None
}

/// The server-first message petrel answers `user`'s client-first with.
async fn scram_challenge(addr: SocketAddr, user: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&connect_scram("salt-probe", &scram::first(user, "nonce")))
        .await
        .expect("send");
    let (first, body) = read_packet(&mut s, Duration::from_secs(10))
        .await
        .expect("a challenge");
    assert_eq!(first, 0xF0, "AUTH for {user}, got {first:#x} {body:?}");
    String::from_utf8(authentication_data(&body, 1).expect("data")).expect("utf-8")
}

/// The salt and iteration count of a server-first message.
fn salt_of(server_first: &str) -> String {
    server_first[server_first.find(",s=").expect("salt")..].to_owned()
}

/// A whole SCRAM-SHA-256 login: the CONNACK reason code (0x87 when refused at once).
async fn scram_login(addr: SocketAddr, user: &str, password: &str) -> u8 {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&connect_scram("scram", &scram::first(user, "nonce")))
        .await
        .expect("send");
    let (first, body) = read_packet(&mut s, Duration::from_secs(10))
        .await
        .expect("an answer to CONNECT");
    if first == 0x20 {
        return body[1];
    }
    let server_first = String::from_utf8(authentication_data(&body, 1).expect("data")).unwrap();
    let (last, _) = scram::last(user, "nonce", password, &server_first);
    s.write_all(&auth_continue(&last)).await.expect("send");
    let (first, body) = read_packet(&mut s, Duration::from_secs(10))
        .await
        .expect("an answer to AUTH");
    assert_eq!(first, 0x20, "CONNACK");
    body[1]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Item 4: 400 concurrent wrong passwords from one address against `max_failed_logins = 10`
/// verify at most 10 hashes, the broker's memory stays within `auth.hash_memory`, and a user
/// from another address logs in meanwhile. Before: all 400 were verified (2.8 GB) and the
/// other user timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_password_flood_from_one_address_is_bounded_and_others_still_log_in() {
    let _machine = crate::support::heavy().await;
    const FLOOD: usize = 400;
    const BUDGET_MIB: u64 = 64;
    let dir = Dir::new("flood");
    let file = dir.password_file(&[("alice", "right"), ("bob", "bobs")]);
    let broker = Broker::start_with(
        "",
        &format!(
            "[auth]\nallow_anonymous = false\nmax_failed_logins = 10\n\
             hash_memory = {}\npassword_file = \"{}\"\n\
             [storage]\nmode = \"memory\"\n",
            BUDGET_MIB << 20,
            file.display()
        ),
    );
    let addr = broker.addr;
    let base = broker.rss_kib();

    // Memory, sampled while the flood lasts.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (pid, stop) = (broker.pid(), stop.clone());
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(kib) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("VmRSS:"))
                            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
                    })
                {
                    peak = peak.max(kib);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };

    // Every connection first, then every CONNECT at once.
    let mut streams = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        streams.push(connect_from([127, 0, 0, 1], addr).await);
    }
    let mut flood = tokio::task::JoinSet::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        flood.spawn(async move {
            login(
                &mut s,
                &connect_login(&format!("guess{i}"), "alice", "wrong"),
                Duration::from_secs(30),
            )
            .await
        });
    }
    // bob, from another address, while the flood is being checked.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let mut s = connect_from([127, 0, 0, 2], addr).await;
    let bob = login(
        &mut s,
        &connect_login("bob", "bob", "bobs"),
        Duration::from_secs(30),
    )
    .await;
    let bob_took = started.elapsed();

    let mut codes = std::collections::BTreeMap::<Option<u8>, usize>::new();
    while let Some(code) = flood.join_next().await {
        *codes.entry(code.expect("flood task")).or_default() += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().expect("sampler");
    let growth_mib = peak.saturating_sub(base) / 1024;
    println!(
        "flood of {FLOOD}: answers {codes:?}; bob logged in with {bob:?} after {bob_took:?}; \
         peak RSS growth {growth_mib} MiB"
    );
    let verified = codes.get(&Some(4)).copied().unwrap_or(0);
    assert!(
        verified <= 10,
        "{verified} wrong passwords verified (bad user name or password), limit 10: {codes:?}"
    );
    assert_eq!(codes.get(&None), None, "every guess is answered: {codes:?}");
    assert_eq!(bob, Some(0), "bob logs in from another address");
    assert!(
        bob_took < Duration::from_secs(5),
        "bob waited {bob_took:?} behind the flood"
    );
    assert!(
        growth_mib < BUDGET_MIB,
        "peak RSS grew {growth_mib} MiB under the flood, budget {BUDGET_MIB} MiB"
    );
}

/// Item 4: guesses are counted before they are verified: 100 concurrent wrong passwords from
/// one address against `max_failed_logins = 10` verify at most 10, even with the per-address
/// queue opened wide. Before: the limit was checked first and a failure counted only after
/// its hash, so all 100 were verified.
#[tokio::test]
async fn concurrent_guesses_are_counted_before_they_are_verified() {
    let _machine = crate::support::heavy().await;
    let dir = Dir::new("counted");
    let file = dir.password_file(&[("alice", "right")]);
    let broker = Broker::start_with(
        "",
        &format!(
            "[auth]\nallow_anonymous = false\nmax_failed_logins = 10\n\
             {}password_file = \"{}\"\n\
             [storage]\nmode = \"memory\"\n",
            OPEN_QUEUES,
            file.display()
        ),
    );
    let mut streams = Vec::new();
    for _ in 0..100 {
        streams.push(connect_from([127, 0, 0, 1], broker.addr).await);
    }
    let mut guesses = tokio::task::JoinSet::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        guesses.spawn(async move {
            let connect = connect_login(&format!("g{i}"), "alice", "wrong");
            login(&mut s, &connect, Duration::from_secs(30)).await
        });
    }
    let mut codes = std::collections::BTreeMap::<Option<u8>, usize>::new();
    while let Some(code) = guesses.join_next().await {
        *codes.entry(code.expect("guess task")).or_default() += 1;
    }
    println!("100 concurrent guesses: {codes:?}");
    assert!(
        codes.get(&Some(4)).copied().unwrap_or(0) <= 10,
        "more than 10 verified: {codes:?}"
    );
    assert_eq!(
        codes.get(&Some(5)).copied().unwrap_or(0) + codes.get(&Some(4)).copied().unwrap_or(0),
        100,
        "the rest refused as locked out: {codes:?}"
    );
}

/// The per-address and broker-wide queues opened wide, to see the failed-login count alone.
const OPEN_QUEUES: &str = "max_pending_logins = 1000\nmax_pending_logins_per_address = 1000\n";

/// Item 6: a refusal takes as long for a name that does not exist as for one that does, for
/// password-file users and for `[[auth.users]]`. Before: 0.04 ms unknown, 26 ms file user,
/// 0.5 ms config user (release build).
#[tokio::test]
async fn login_time_does_not_tell_which_user_names_exist() {
    let _machine = crate::support::heavy().await;
    let dir = Dir::new("timing");
    let file = dir.password_file(&[("alice", "right")]);
    // The file and config users together, then config users alone.
    let both = Broker::start_with(
        "",
        &format!(
            "[auth]\nallow_anonymous = false\nmax_failed_logins = 1000\n\
             password_file = \"{}\"\n\
             [[auth.users]]\nname = \"carol\"\npassword = \"right\"\n\
             [storage]\nmode = \"memory\"\n",
            file.display()
        ),
    );
    let config_only = Broker::start_with(
        "",
        "[auth]\nallow_anonymous = false\nmax_failed_logins = 1000\n\
         [[auth.users]]\nname = \"carol\"\npassword = \"right\"\n\
         [storage]\nmode = \"memory\"\n",
    );
    async fn refusal_time(addr: SocketAddr, user: &str) -> Duration {
        let mut times = Vec::new();
        for i in 0..5 {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).unwrap();
            let connect = connect_login(&format!("t{i}"), user, "wrong");
            let started = Instant::now();
            let code = login(&mut s, &connect, Duration::from_secs(30)).await;
            times.push(started.elapsed());
            assert_eq!(code, Some(4), "{user}: bad user name or password");
        }
        median(times)
    }
    for (what, addr, known) in [
        ("password file", both.addr, "alice"),
        ("config users beside a password file", both.addr, "carol"),
        ("config users", config_only.addr, "carol"),
    ] {
        let known_time = refusal_time(addr, known).await;
        let unknown_time = refusal_time(addr, "nobody").await;
        println!("{what}: {known} refused in {known_time:?}, an unknown name in {unknown_time:?}");
        // Generous slack for a loaded machine; before the fix the unknown name was refused
        // 10 to 600 times faster.
        assert!(
            unknown_time * 2 >= known_time && known_time * 2 >= unknown_time,
            "{what}: {known} refused in {known_time:?}, an unknown name in {unknown_time:?}"
        );
    }
}

/// Item 5: SCRAM-SHA-256 failures count toward `max_failed_logins`, and a locked-out address
/// cannot log in by SCRAM or by password. Before: SCRAM guesses were not counted, and a right
/// SCRAM proof was accepted from a locked-out address.
#[tokio::test]
async fn scram_guesses_count_and_a_locked_out_address_cannot_log_in() {
    let _machine = light().await;
    let broker = Broker::start_with(
        "",
        "[auth]\nallow_anonymous = false\nmax_failed_logins = 3\n\
         [[auth.users]]\nname = \"alice\"\npassword = \"right\"\n\
         [storage]\nmode = \"memory\"\n",
    );
    assert_eq!(scram_login(broker.addr, "alice", "right").await, 0x00);
    for _ in 0..3 {
        assert_eq!(
            scram_login(broker.addr, "alice", "wrong").await,
            0x86,
            "bad user name or password"
        );
    }
    assert_eq!(
        scram_login(broker.addr, "alice", "right").await,
        0x87,
        "locked out: not authorized, even with the right proof"
    );
    let mut s = TcpStream::connect(broker.addr).await.expect("connect");
    assert_eq!(
        login(
            &mut s,
            &connect_login("p", "alice", "right"),
            Duration::from_secs(10)
        )
        .await,
        Some(5),
        "nor by password"
    );
    // Another address is not locked out.
    let mut s = connect_from([127, 0, 0, 2], broker.addr).await;
    assert_eq!(
        login(
            &mut s,
            &connect_login("q", "alice", "right"),
            Duration::from_secs(10)
        )
        .await,
        Some(0)
    );
}

/// Item 5: the salt SCRAM shows for a name that does not exist is not a public function of
/// the name, and, like a real user's, it is the same across connections and restarts (disk
/// mode keeps the secret in the store's directory; memory mode derives it from the users).
/// Before: the fake salt was SHA-256 of the name, and a real user's salt changed at every
/// restart, so either told the two apart.
#[tokio::test]
async fn scram_salts_do_not_tell_which_users_exist_across_restarts() {
    let _machine = light().await;
    let dir = Dir::new("salts");
    let store = dir.0.join("store");
    let auth = "[auth]\nallow_anonymous = false\n\
                [[auth.users]]\nname = \"alice\"\npassword = \"right\"\n";
    for storage in [
        format!(
            "[storage]\nmode = \"disk\"\ndir = \"{}\"\n",
            store.display()
        ),
        "[storage]\nmode = \"memory\"\n".to_owned(),
    ] {
        let tables = format!("{auth}{storage}");
        let mut salts = Vec::new();
        for _start in 0..2 {
            let mut broker = Broker::start_with("", &tables);
            let alice = salt_of(&scram_challenge(broker.addr, "alice").await);
            let mallory = salt_of(&scram_challenge(broker.addr, "mallory").await);
            assert_eq!(
                salt_of(&scram_challenge(broker.addr, "mallory").await),
                mallory,
                "stable across connections"
            );
            assert_eq!(alice.len(), mallory.len(), "{alice} vs {mallory}");
            broker.terminate();
            salts.push((alice, mallory));
        }
        println!("{storage}: {salts:?}");
        assert_eq!(
            salts[0], salts[1],
            "{storage}: the same salts after a restart"
        );
        use sha2::Digest as _;
        let public = base64::engine::general_purpose::STANDARD
            .encode(&sha2::Sha256::digest(b"petrel-unknown-user:mallory")[..16]);
        assert!(
            !salts[0].1.contains(&public),
            "the fake salt is not SHA-256 of the name"
        );
    }
    if let Ok(meta) = std::fs::metadata(store.join("auth.secret")) {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    } else {
        panic!("disk mode keeps the secret in the store's directory");
    }
}

/// Item 11: a brute force does not write a log line per guess: the first few failures per
/// address are logged, and the first refusal once it is locked out; the rest are summed up.
/// Before: one INFO line per failed login and per refusal.
#[tokio::test]
async fn a_brute_force_writes_a_few_log_lines_not_one_per_guess() {
    let _machine = light().await;
    let broker = Broker::start_with(
        "",
        "[auth]\nallow_anonymous = false\nmax_failed_logins = 20\n\
         [[auth.users]]\nname = \"alice\"\npassword = \"right\"\n\
         [storage]\nmode = \"memory\"\n",
    );
    for i in 0..40 {
        let mut s = TcpStream::connect(broker.addr).await.expect("connect");
        let code = login(
            &mut s,
            &connect_login(&format!("g{i}"), "alice", &format!("guess{i}")),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(code, if i < 20 { Some(4) } else { Some(5) });
    }
    let log = broker.log();
    let lines = log
        .lines()
        .filter(|l| l.contains(" INFO ") && l.contains("refused"))
        .count();
    println!("{lines} INFO lines about refused logins for 40 guesses");
    assert!(lines <= 5, "{lines} lines for 40 guesses:\n{log}");
}

/// Item 11: a configuration reload (SIGHUP) does not lift lockouts: the failed-login table
/// outlives the authenticator it was made for. Before: every reload started the counts over.
#[tokio::test]
async fn a_reload_does_not_lift_a_lockout() {
    let _machine = light().await;
    let broker = Broker::start_with(
        "",
        "[auth]\nallow_anonymous = false\nmax_failed_logins = 2\n\
         [[auth.users]]\nname = \"alice\"\npassword = \"right\"\n\
         [storage]\nmode = \"memory\"\n",
    );
    async fn code(addr: SocketAddr, password: &str) -> Option<u8> {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        login(
            &mut s,
            &connect_login("r", "alice", password),
            Duration::from_secs(10),
        )
        .await
    }
    assert_eq!(code(broker.addr, "wrong").await, Some(4));
    assert_eq!(code(broker.addr, "wrong").await, Some(4));
    assert_eq!(code(broker.addr, "right").await, Some(5), "locked out");
    let pid = i32::try_from(broker.pid()).expect("pid");
    // SAFETY: kill(2) with a child's pid and a signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !broker.log().contains("configuration reloaded") {
        assert!(
            Instant::now() < deadline,
            "no reload logged:\n{}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        code(broker.addr, "right").await,
        Some(5),
        "still locked out after the reload"
    );
}

//! The `petrel` binary from the outside: flags, config files, exit codes, signals and logs.
//!
//! Every test runs the real executable as a child process. A [`Petrel`] guard owns the child and
//! kills it when dropped, so a failing assertion never leaves a broker running. Sockets are plain
//! blocking `std::net` streams with read timeouts; every wait in this file is bounded.
//!
//! Listeners bind a port picked by binding `127.0.0.1:0` and dropping the socket, so tests can
//! run in parallel on a shared machine. Only `no_arguments_listens_on_1883` touches a fixed
//! port, and it skips itself when that port is taken.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long a broker has to start listening. Generous: a debug build on a loaded CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a command that should end on its own (bad config, `--help`, a signal) may take.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a socket read waits for the broker.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Transcripts
// ---------------------------------------------------------------------------------------------

/// CONNECT v3.1.1, clean session, keep alive 60, client id "a".
const CONNECT_A: &str = "10 0d 00 04 4d 51 54 54 04 02 00 3c 00 01 61";
/// CONNACK v3.1.1: session present 0, return code 0 (accepted).
const CONNACK_OK: &str = "20 02 00 00";
/// CONNECT v5, clean start, keep alive 60, no properties, client id "b".
const CONNECT_V5_B: &str = "10 0e 00 04 4d 51 54 54 05 02 00 3c 00 00 01 62";
/// SUBSCRIBE packet id 1, filter "#" QoS 0.
const SUBSCRIBE_ALL: &str = "82 06 00 01 00 01 23 00";
/// SUBACK packet id 1, granted QoS 0.
const SUBACK_ALL: &str = "90 03 00 01 00";

// ---------------------------------------------------------------------------------------------
// The child process
// ---------------------------------------------------------------------------------------------

static SPAWNED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A running `petrel` with its stdout and stderr collected by background threads.
struct Petrel {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Petrel {
    /// Starts `petrel ARGS` with `RUST_LOG=rust_log`, so an inherited RUST_LOG cannot hide the
    /// lines a test looks for.
    fn spawn<I, S>(args: I, rust_log: &str) -> Petrel
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        // A directory of its own: a run with the default `[storage]` keeps its data in
        // ./petrel-data, which must neither litter the source tree nor outlive the test.
        let cwd = std::env::temp_dir().join(format!(
            "petrel-cli-{}-{}",
            std::process::id(),
            SPAWNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&cwd).expect("temp dir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_petrel"))
            .args(&args)
            .current_dir(&cwd)
            .env("RUST_LOG", rust_log)
            .env_remove("RUST_LOG_STYLE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start petrel {args:?}: {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().expect("piped stdout"), stdout.clone()),
            collect(child.stderr.take().expect("piped stderr"), stderr.clone()),
        ];
        Petrel {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    /// Runs `petrel ARGS` to completion; panics if it is still running after [`EXIT_TIMEOUT`].
    fn run<I, S>(args: I) -> Finished
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut petrel = Petrel::spawn(args, "info");
        let status = petrel.wait_exit(EXIT_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "petrel still running after {EXIT_TIMEOUT:?}; stderr:\n{}",
                petrel.stderr()
            )
        });
        petrel.finish(status)
    }

    fn pid(&self) -> libc::pid_t {
        libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t")
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; it has not been reaped while `self` lives.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(
            rc,
            0,
            "kill({}, {signal}): {}",
            self.pid(),
            io::Error::last_os_error()
        );
    }

    /// Polls until the process has exited or `timeout` passes.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) => return None,
                Err(e) => panic!("waiting for petrel: {e}"),
            }
        }
    }

    /// Connects to `addr` as soon as the broker listens there. Panics, with the broker's stderr,
    /// if it exits first or does not listen within [`START_TIMEOUT`].
    fn connect_when_listening(&mut self, addr: SocketAddr) -> TcpStream {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "petrel exited with {status} before listening on {addr}; stderr:\n{}",
                    self.stderr()
                );
            }
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(stream) => {
                    stream
                        .set_read_timeout(Some(READ_TIMEOUT))
                        .expect("set_read_timeout");
                    stream.set_nodelay(true).expect("set_nodelay");
                    return stream;
                }
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!(
                    "petrel not listening on {addr} after {START_TIMEOUT:?} ({e}); stderr:\n{}",
                    self.stderr()
                ),
            }
        }
    }

    /// Waits until stderr contains `needle`, for at most `timeout`.
    fn wait_for_stderr(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.stderr().contains(needle) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.stderr().contains(needle)
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr lock")).into_owned()
    }

    /// After the process has exited: joins the readers so the output is complete.
    fn finish(mut self, status: ExitStatus) -> Finished {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let text = |buf: &Arc<Mutex<Vec<u8>>>| {
            String::from_utf8_lossy(&buf.lock().expect("output lock")).into_owned()
        };
        Finished {
            status,
            stdout: text(&self.stdout),
            stderr: text(&self.stderr),
        }
    }
}

impl Drop for Petrel {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn collect<R: Read + Send + 'static>(mut from: R, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = from.read(&mut chunk) {
            if n == 0 {
                break;
            }
            into.lock()
                .expect("output lock")
                .extend_from_slice(&chunk[..n]);
        }
    })
}

/// What an exited `petrel` left behind.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

// ---------------------------------------------------------------------------------------------
// Files and ports
// ---------------------------------------------------------------------------------------------

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("petrel-cli-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback address whose port was free a moment ago.
fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr")
}

/// A config file with one listener on `addr`, and `extra` appended.
fn config_on(dir: &TempDir, addr: SocketAddr, extra: &str) -> PathBuf {
    dir.write(
        "petrel.toml",
        &format!("[[listeners]]\nbind = \"{addr}\"\nconnect_timeout = \"5s\"\n{extra}"),
    )
}

/// Starts petrel with `config` and returns it with a first connected (not yet MQTT) socket.
fn start(config: &Path, addr: SocketAddr, rust_log: &str) -> (Petrel, TcpStream) {
    let mut petrel = Petrel::spawn([OsString::from("--config"), config.into()], rust_log);
    let stream = petrel.connect_when_listening(addr);
    (petrel, stream)
}

// ---------------------------------------------------------------------------------------------
// Bytes on the wire
// ---------------------------------------------------------------------------------------------

fn hex(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|_| panic!("bad hex byte {b:?}")))
        .collect()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn send(stream: &mut TcpStream, transcript: &str) {
    stream.write_all(&hex(transcript)).expect("send to petrel");
}

/// Reads exactly the bytes of `transcript`.
fn expect(stream: &mut TcpStream, transcript: &str) {
    let want = hex(transcript);
    let mut got = vec![0u8; want.len()];
    stream
        .read_exact(&mut got)
        .unwrap_or_else(|e| panic!("expected {transcript}: {e}"));
    assert_eq!(to_hex(&got), to_hex(&want));
}

/// A CONNECT v3.1.1 with clean session, keep alive 60, and optionally a QoS 0 will.
fn connect_v311(client_id: &str, will: Option<(&str, &[u8])>) -> Vec<u8> {
    let mut body = hex("00 04 4d 51 54 54 04");
    body.push(if will.is_some() { 0x06 } else { 0x02 });
    body.extend_from_slice(&[0x00, 0x3c]);
    push_str(&mut body, client_id.as_bytes());
    if let Some((topic, message)) = will {
        push_str(&mut body, topic.as_bytes());
        push_str(&mut body, message);
    }
    frame(0x10, &body)
}

/// A QoS 0 PUBLISH v3.1.1. The topic is not checked: tests send invalid ones on purpose.
fn publish_qos0(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    push_str(&mut body, topic.as_bytes());
    body.extend_from_slice(payload);
    frame(0x30, &body)
}

fn push_str(out: &mut Vec<u8>, s: &[u8]) {
    let len = u16::try_from(s.len()).expect("string fits u16");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s);
}

fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// One packet: the first fixed-header byte and the body. `None` at a clean EOF.
fn read_packet(stream: &mut TcpStream) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut first = [0u8; 1];
    if stream.read(&mut first)? == 0 {
        return Ok(None);
    }
    let mut len = 0usize;
    for shift in [0, 7, 14, 21] {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte)?;
        len |= usize::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok(Some((first[0], body)))
}

/// Every packet until the broker closes the connection. Panics if it does not within
/// [`READ_TIMEOUT`]. A reset counts as a close: the broker may drop a socket with unread data.
fn read_until_eof(stream: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut packets = Vec::new();
    loop {
        match read_packet(stream) {
            Ok(Some(packet)) => packets.push(packet),
            Ok(None) => return packets,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return packets,
            Err(e) => panic!(
                "no EOF from petrel (got {} packets first): {e}",
                packets.len()
            ),
        }
    }
}

/// The topic of a PUBLISH body.
fn publish_topic(body: &[u8]) -> String {
    let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    String::from_utf8_lossy(&body[2..2 + len]).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------------------------

#[test]
fn help_exits_zero_and_documents_config() {
    let out = Petrel::run(["--help"]);
    assert!(
        out.status.success(),
        "--help: {}\n{}",
        out.status,
        out.stderr
    );
    for flag in [
        "--config",
        "--check-config",
        "print-default-config",
        "passwd",
        "--shutdown-grace",
    ] {
        assert!(
            out.stdout.contains(flag),
            "--help lacks {flag}:\n{}",
            out.stdout
        );
    }
}

#[test]
fn no_arguments_listens_on_1883() {
    let addr: SocketAddr = "127.0.0.1:1883".parse().expect("address");
    match TcpListener::bind(addr) {
        Ok(probe) => drop(probe),
        Err(e) => {
            eprintln!("SKIPPED no_arguments_listens_on_1883: {addr} is not free here ({e})");
            return;
        }
    }
    let mut petrel = Petrel::spawn(Vec::<OsString>::new(), "info");
    let mut client = petrel.connect_when_listening(addr);
    send(&mut client, CONNECT_A);
    expect(&mut client, CONNACK_OK);
}

#[test]
fn config_file_listener_accepts_connect() {
    let dir = TempDir::new("accepts-connect");
    let addr = free_addr();
    let config = config_on(&dir, addr, "[mqtt]\nmax_inflight = 8\n");
    let (mut petrel, mut client) = start(&config, addr, "info");
    send(&mut client, CONNECT_A);
    expect(&mut client, CONNACK_OK);
    assert!(
        petrel.wait_for_stderr("listening", READ_TIMEOUT),
        "no 'listening' log line:\n{}",
        petrel.stderr()
    );
    assert!(petrel.wait_exit(Duration::ZERO).is_none(), "petrel exited");
}

/// One config that must stop petrel at start.
struct BadConfig {
    name: &'static str,
    /// The file's text; `None` for a file that does not exist.
    contents: Option<String>,
    /// The line the error must point at, as `FILE:LINE: `.
    line: Option<usize>,
    /// What else stderr must contain: the key and the problem.
    fragments: &'static [&'static str],
}

#[test]
fn bad_config_stops_the_start_naming_file_line_and_key() {
    let dir = TempDir::new("bad-config");
    let bind = free_addr();
    let cases = [
        BadConfig {
            name: "unknown key",
            contents: Some("[mqtt]\nmax_inflights = 3\n".to_owned()),
            line: Some(2),
            fragments: &["unknown key 'max_inflights' in [mqtt]"],
        },
        BadConfig {
            name: "bad duration",
            contents: Some(format!(
                "[[listeners]]\nbind = \"{bind}\"\nconnect_timeout = \"10 parsecs\"\n"
            )),
            line: Some(3),
            fragments: &["listeners[0].connect_timeout: ", "\"10 parsecs\""],
        },
        BadConfig {
            name: "zero timeout",
            contents: Some(format!(
                "[[listeners]]\nbind = \"{bind}\"\nconnect_timeout = \"0s\"\n"
            )),
            line: Some(3),
            fragments: &["listeners[0].connect_timeout: must be greater than zero"],
        },
        BadConfig {
            name: "missing file",
            contents: None,
            line: None,
            fragments: &["cannot read config file"],
        },
        BadConfig {
            name: "storage dir under a file",
            contents: Some(format!(
                "[[listeners]]\nbind = \"{bind}\"\n\n[storage]\ndir = {:?}\n",
                dir.write("a-file", "").join("store").display().to_string()
            )),
            line: None,
            fragments: &["storage.dir: ", "not a directory"],
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let name = case.name;
        let path = match &case.contents {
            Some(text) => dir.write(&format!("case{i}.toml"), text),
            None => dir.0.join("does-not-exist.toml"),
        };
        let out = Petrel::run([OsString::from("--config"), path.clone().into()]);
        assert!(
            !out.status.success(),
            "{name}: petrel started (exit {})",
            out.status
        );
        let place = match case.line {
            Some(line) => format!("{}:{line}: ", path.display()),
            None => format!("{}: ", path.display()),
        };
        assert!(
            out.stderr.contains(&place),
            "{name}: stderr lacks {place:?}:\n{}",
            out.stderr
        );
        for fragment in case.fragments {
            assert!(
                out.stderr.contains(fragment),
                "{name}: stderr lacks {fragment:?}:\n{}",
                out.stderr
            );
        }
    }
}

#[test]
fn check_config_reports_ok_or_fails_with_one() {
    let dir = TempDir::new("check-config");
    let addr = free_addr();
    let good = config_on(&dir, addr, "[mqtt]\nmax_inflight = 4\n");
    let out = Petrel::run([
        OsString::from("--check-config"),
        "--config".into(),
        good.into(),
    ]);
    assert!(
        out.status.success(),
        "good file: {}\n{}",
        out.status,
        out.stderr
    );
    assert!(out.stdout.contains("OK"), "stdout: {:?}", out.stdout);
    // Checking must not start a broker.
    assert!(
        TcpListener::bind(addr).is_ok(),
        "--check-config bound {addr}"
    );

    let bad = dir.write("bad.toml", "[mqtt]\nmax_inflight = 0\n");
    let out = Petrel::run([
        OsString::from("--check-config"),
        "--config".into(),
        bad.clone().into(),
    ]);
    assert_eq!(out.status.code(), Some(1), "bad file: {}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("{}:2: mqtt.max_inflight", bad.display())),
        "stderr: {}",
        out.stderr
    );
    assert!(!out.stdout.contains("OK"), "stdout: {:?}", out.stdout);
}

#[test]
fn check_config_takes_the_file_as_its_value() {
    let dir = TempDir::new("check-config-value");
    let addr = free_addr();
    let good = config_on(&dir, addr, "[mqtt]\nmax_inflight = 4\n");
    let bad = dir.write(
        "bad.toml",
        "[mqtt]\nmax_inflight = 4\n\n[storage]\nfsync = \"sometimes\"\n",
    );

    // `--check-config FILE`, and the older `--config FILE --check-config` in either order.
    for args in [
        vec![OsString::from("--check-config"), good.clone().into()],
        vec![
            "--config".into(),
            good.clone().into(),
            "--check-config".into(),
        ],
        vec![
            "--check-config".into(),
            good.clone().into(),
            "--config".into(),
            good.clone().into(),
        ],
    ] {
        let out = Petrel::run(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", out.stderr);
        assert_eq!(out.stdout, "configuration OK\n", "{args:?}");
    }
    assert!(
        TcpListener::bind(addr).is_ok(),
        "--check-config bound {addr}"
    );

    for args in [
        vec![OsString::from("--check-config"), bad.clone().into()],
        vec![
            "--config".into(),
            bad.clone().into(),
            "--check-config".into(),
        ],
    ] {
        let out = Petrel::run(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", out.stderr);
        let expected = format!("{}:5: storage.fsync: unknown value", bad.display());
        assert!(out.stderr.contains(&expected), "{args:?}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{args:?}: stdout {:?}", out.stdout);
    }

    // Usage errors (status 2): no file at all, or two different ones.
    let out = Petrel::run(["--check-config"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("--check-config needs a FILE"),
        "{}",
        out.stderr
    );
    let out = Petrel::run([
        OsString::from("--check-config"),
        good.clone().into(),
        "--config".into(),
        bad.clone().into(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("different files"), "{}", out.stderr);
}

#[test]
fn printed_default_config_passes_check_config() {
    let out = Petrel::run(["print-default-config"]);
    assert!(out.status.success(), "{}\n{}", out.status, out.stderr);
    assert!(out.stdout.contains("[[listeners]]"), "{}", out.stdout);
    assert!(out.stdout.contains("[mqtt]"), "{}", out.stdout);
    // The flag of earlier versions still works, hidden from --help, and prints the same.
    let flag = Petrel::run(["--print-default-config"]);
    assert!(flag.status.success(), "{}\n{}", flag.status, flag.stderr);
    assert_eq!(flag.stdout, out.stdout);

    let dir = TempDir::new("default-config");
    // --check-config binds the admin address; brokers of other tests may hold the default.
    let text = out
        .stdout
        .replace("127.0.0.1:9183", &free_addr().to_string());
    let path = dir.write("default.toml", &text);
    let checked = Petrel::run([OsString::from("--check-config"), path.into()]);
    assert!(
        checked.status.success(),
        "printed default config fails --check-config: {}\n{}",
        checked.status,
        checked.stderr
    );
    assert_eq!(checked.stdout, "configuration OK\n");
}

#[test]
fn dist_example_config_passes_check_config() {
    // dist/petrel.toml is what the systemd unit and the container image start with. The
    // check reads the files it names, so they are made here (an empty password file is a
    // valid one), in a copy whose /etc/petrel paths point at them.
    let dir = TempDir::new("dist-config");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/petrel.toml"),
    )
    .expect("dist/petrel.toml");
    dir.write("passwords", "");
    let text = text
        .replace("/etc/petrel/", &format!("{}/", dir.0.display()))
        // --check-config binds the admin address; brokers of other tests may hold the default.
        .replace("127.0.0.1:9183", &free_addr().to_string());
    let path = dir.write("petrel.toml", &text);
    let out = Petrel::run([OsString::from("--check-config"), path.clone().into()]);
    assert!(
        out.status.success(),
        "{} fails --check-config: {}\n{}",
        path.display(),
        out.status,
        out.stderr
    );
    assert_eq!(out.stdout, "configuration OK\n");
}

// ---------------------------------------------------------------------------------------------
// Start-up failures
// ---------------------------------------------------------------------------------------------

#[test]
fn taken_port_fails_naming_the_address() {
    let dir = TempDir::new("bind-failure");
    let held = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = held.local_addr().expect("local_addr");
    let config = config_on(&dir, addr, "");
    let out = Petrel::run([OsString::from("--config"), config.into()]);
    drop(held);
    assert!(!out.status.success(), "petrel started on a taken port");
    assert!(
        out.stderr.contains(&addr.to_string()),
        "stderr does not name {addr}:\n{}",
        out.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------------

/// A signal closes every client and ends the process with 0. A client the shutdown closes has
/// its will published [MQTT-3.1.2-8] (`drain.rs` checks that it arrives); a subscriber still
/// connected may get it or be closed first, and gets nothing else.
fn signal_shuts_down_cleanly(signal: libc::c_int, name: &str) {
    let dir = TempDir::new(&format!("shutdown-{name}"));
    let addr = free_addr();
    let config = config_on(&dir, addr, "");
    let (mut petrel, mut subscriber) = start(&config, addr, "info");

    subscriber
        .write_all(&connect_v311("sub", None))
        .expect("send");
    expect(&mut subscriber, CONNACK_OK);
    send(&mut subscriber, SUBSCRIBE_ALL);
    expect(&mut subscriber, SUBACK_ALL);

    // Control: wills work on this broker, so the check below is not vacuous. A client that
    // drops its socket without DISCONNECT has its will published.
    let mut dropped = TcpStream::connect(addr).expect("connect");
    dropped
        .write_all(&connect_v311("w0", Some(("will/control", b"gone"))))
        .expect("send");
    dropped
        .set_read_timeout(Some(READ_TIMEOUT))
        .expect("timeout");
    expect(&mut dropped, CONNACK_OK);
    drop(dropped);
    let (kind, body) = read_packet(&mut subscriber)
        .expect("read")
        .expect("subscriber closed before the control will arrived");
    assert_eq!(kind & 0xf0, 0x30, "expected PUBLISH, got {kind:#04x}");
    assert_eq!(publish_topic(&body), "will/control");

    let mut plain = TcpStream::connect(addr).expect("connect");
    plain.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
    send(&mut plain, CONNECT_A);
    expect(&mut plain, CONNACK_OK);

    let mut with_will = TcpStream::connect(addr).expect("connect");
    with_will
        .set_read_timeout(Some(READ_TIMEOUT))
        .expect("timeout");
    with_will
        .write_all(&connect_v311(
            "w1",
            Some(("will/shutdown", b"closed by the shutdown")),
        ))
        .expect("send");
    expect(&mut with_will, CONNACK_OK);

    let mut v5 = TcpStream::connect(addr).expect("connect");
    v5.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
    send(&mut v5, CONNECT_V5_B);
    let (kind, body) = read_packet(&mut v5).expect("read").expect("CONNACK");
    assert_eq!(
        (kind, body.get(1)),
        (0x20, Some(&0x00)),
        "v5 CONNACK {body:?}"
    );

    petrel.signal(signal);

    assert_eq!(read_until_eof(&mut plain), vec![], "plain client");
    assert_eq!(read_until_eof(&mut with_will), vec![], "client with a will");
    // A v5 client is told why: DISCONNECT with reason 0x8B, server shutting down.
    let v5_packets = read_until_eof(&mut v5);
    assert!(
        matches!(v5_packets.as_slice(), [(0xe0, body)] if body.first() == Some(&0x8b)),
        "{name}: v5 client got {v5_packets:?}, not DISCONNECT 0x8B"
    );
    let topics: Vec<String> = read_until_eof(&mut subscriber)
        .iter()
        .filter(|(kind, _)| kind & 0xf0 == 0x30)
        .map(|(_, body)| publish_topic(body))
        .collect();
    assert!(
        topics.iter().all(|t| t == "will/shutdown"),
        "{name}: subscriber received PUBLISH during shutdown on {topics:?}"
    );

    let status = petrel.wait_exit(EXIT_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "{name}: petrel still running {EXIT_TIMEOUT:?} after the signal; stderr:\n{}",
            petrel.stderr()
        )
    });
    let out = petrel.finish(status);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{name}: exit status {}; stderr:\n{}",
        out.status,
        out.stderr
    );
    assert!(
        out.stderr.contains(name),
        "{name} not logged:\n{}",
        out.stderr
    );
}

#[test]
fn sigterm_closes_clients_and_exits_zero() {
    signal_shuts_down_cleanly(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_closes_clients_and_exits_zero() {
    signal_shuts_down_cleanly(libc::SIGINT, "SIGINT");
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_packet_log_names_client_and_rule_but_not_payload() {
    let dir = TempDir::new("logs");
    let addr = free_addr();
    let config = config_on(&dir, addr, "");
    let (mut petrel, mut client) = start(&config, addr, "debug");
    client
        .write_all(&connect_v311("log-client-7", None))
        .expect("send");
    expect(&mut client, CONNACK_OK);
    // A valid round trip first, so that the routing and delivery paths log what they log at
    // debug too: SUBSCRIBE id 1 "s/t" QoS 0, then PUBLISH QoS 0 to it, delivered back.
    send(&mut client, "82 08 00 01 00 03 73 2f 74 00");
    expect(&mut client, "90 03 00 01 00");
    let valid = publish_qos0("s/t", b"SECRETPAYLOAD-delivered");
    client.write_all(&valid).expect("send");
    expect(&mut client, &to_hex(&valid));
    // PUBLISH QoS 0 to "a/+": a wildcard in a topic name [MQTT-3.3.2-2].
    client
        .write_all(&publish_qos0("a/+", b"SECRETPAYLOAD"))
        .expect("send");
    assert_eq!(read_until_eof(&mut client), vec![], "v3.1.1 gets no reply");

    assert!(
        petrel.wait_for_stderr("MQTT-3.3.2-2", READ_TIMEOUT),
        "no log names the rule:\n{}",
        petrel.stderr()
    );
    petrel.signal(libc::SIGTERM);
    let status = petrel
        .wait_exit(EXIT_TIMEOUT)
        .expect("petrel exits on SIGTERM");
    let log = petrel.finish(status).stderr;
    let rule_lines: Vec<&str> = log.lines().filter(|l| l.contains("MQTT-3.3.2-2")).collect();
    assert!(
        rule_lines.iter().any(|l| l.contains("log-client-7")),
        "the line naming the rule does not name the client:\n{log}"
    );
    assert!(!log.contains("SECRETPAYLOAD"), "payload logged:\n{log}");
}

// ---------------------------------------------------------------------------------------------
// Password files
// ---------------------------------------------------------------------------------------------

/// `petrel passwd ARGS` with `input` on standard input.
fn passwd(args: &[&OsString], input: &str) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_petrel"))
        .arg("passwd")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start petrel passwd");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .expect("write the password");
    let out = child.wait_with_output().expect("petrel passwd exits");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A 3.1.1 CONNECT, clean session, with a user name and password.
fn connect_login(client_id: &str, user: &str, password: &str) -> Vec<u8> {
    let mut body = hex("00 04 4d 51 54 54 04 c2 00 3c");
    push_str(&mut body, client_id.as_bytes());
    push_str(&mut body, user.as_bytes());
    push_str(&mut body, password.as_bytes());
    frame(0x10, &body)
}

/// CONNACK return code for one login attempt on a fresh connection.
fn login_code(addr: SocketAddr, user: &str, password: &str) -> u8 {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
    s.write_all(&connect_login("c", user, password))
        .expect("send CONNECT");
    let (kind, body) = read_packet(&mut s)
        .expect("read CONNACK")
        .expect("a CONNACK, not EOF");
    assert_eq!(kind, 0x20, "CONNACK");
    body[1]
}

#[test]
fn passwd_keeps_a_password_file_the_broker_logs_in_against() {
    let dir = TempDir::new("passwd");
    let file: OsString = dir.0.join("passwords").into();
    let (ok, err) = passwd(&[&file, &"alice".into(), &"--stdin".into()], "s3cret\n");
    assert!(ok, "{err}");
    assert!(err.contains("added \"alice\""), "{err}");
    let (ok, err) = passwd(&[&file, &"bob".into(), &"--stdin".into()], "hunter2\n");
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("alice:$argon2id$"), "{text}");
    assert!(!text.contains("s3cret"), "no password in the file");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "readable by its owner only");

    let addr = free_addr();
    let config = config_on(
        &dir,
        addr,
        &format!(
            "[auth]\nallow_anonymous = false\nmax_failed_logins = 3\npassword_file = \"{}\"\n\
             [storage]\nmode = \"memory\"\n",
            Path::new(&file).display()
        ),
    );
    let (_petrel, first) = start(&config, addr, "info");
    drop(first);
    assert_eq!(login_code(addr, "alice", "s3cret"), 0, "accepted");
    assert_eq!(
        login_code(addr, "alice", "s3cret"),
        0,
        "again, from the cache"
    );
    // bob's first login, with SUBSCRIBE sent right behind CONNECT: while the hash is checked
    // nothing more is read, then both are answered in order.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    let mut both = connect_login("b", "bob", "hunter2");
    both.extend(hex(SUBSCRIBE_ALL));
    s.write_all(&both).unwrap();
    expect(&mut s, CONNACK_OK);
    expect(&mut s, SUBACK_ALL);
    drop(s);
    assert_eq!(
        login_code(addr, "alice", "wrong"),
        4,
        "bad user name or password"
    );
    assert_eq!(login_code(addr, "mallory", "x"), 4, "unknown user");
    // No user name and anonymous access off: not authorized.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s.write_all(&connect_v311("anon", None)).unwrap();
    let (_, body) = read_packet(&mut s).unwrap().unwrap();
    assert_eq!(body[1], 5);
    // Three failures from this address in the minute: now even the right password is
    // refused, without being checked.
    assert_eq!(login_code(addr, "bob", "hunter2"), 5, "rate limited");

    let (ok, err) = passwd(&[&file, &"bob".into(), &"--delete".into()], "");
    assert!(ok, "{err}");
    let (ok, err) = passwd(&[&file, &"bob".into(), &"--delete".into()], "");
    assert!(!ok && err.contains("no user \"bob\""), "{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("bob:") && text.contains("alice:"), "{text}");
}

#[test]
fn a_bad_password_file_stops_the_start_naming_the_line() {
    let dir = TempDir::new("badpasswd");
    let file = dir.write("passwords", "# users\nalice:plaintext\n");
    let addr = free_addr();
    let config = config_on(
        &dir,
        addr,
        &format!("[auth]\npassword_file = \"{}\"\n", file.display()),
    );
    let done = Petrel::run([OsString::from("--config"), config.into()]);
    assert!(!done.status.success());
    assert!(
        done.stderr.contains("auth.password_file:")
            && done
                .stderr
                .contains("passwords:2: user \"alice\": not a hash"),
        "{}",
        done.stderr
    );
}

/// A password, ACL or token file that cannot be used stops the start (and `--check-config`)
/// with one message: the configuration file, the key, the file, and its cause said once.
#[test]
fn an_unusable_auth_file_is_reported_once_naming_the_config_file() {
    let dir = TempDir::new("authfiles");
    let bad_acl = dir.write("acl.toml", "[[rules]]\nbogus = 1\n");
    for (what, extra, cause) in [
        (
            "password file",
            "[auth]\npassword_file = \"/nonexistent/passwords\"\n".to_owned(),
            "No such file or directory",
        ),
        (
            "ACL file",
            "[auth]\nacl_file = \"/nonexistent/acl.toml\"\n".to_owned(),
            "No such file or directory",
        ),
        (
            "ACL file line",
            format!("[auth]\nacl_file = \"{}\"\n", bad_acl.display()),
            "acl.toml:2: unknown field `bogus`",
        ),
        (
            "token file",
            "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"/nonexistent/token\"\n".to_owned(),
            "No such file or directory",
        ),
    ] {
        let config = config_on(&dir, free_addr(), &extra);
        for check in [false, true] {
            let mut args = vec![OsString::from("--config"), config.clone().into()];
            if check {
                args.push("--check-config".into());
            }
            let done = Petrel::run(args);
            assert!(!done.status.success(), "{what}");
            let line = done
                .stderr
                .lines()
                .find(|l| l.starts_with("petrel: "))
                .unwrap_or_else(|| panic!("{what}: no error line in {}", done.stderr));
            assert!(
                line.contains(&format!("{}: ", config.display())),
                "{what} (check {check}): names the configuration file: {line}"
            );
            assert_eq!(
                line.matches(cause).count(),
                1,
                "{what} (check {check}): the cause once: {line}"
            );
        }
    }
}

#[test]
fn sighup_reloads_passwords_and_acl_and_refuses_a_broken_file() {
    let dir = TempDir::new("reload");
    let file: OsString = dir.0.join("passwords").into();
    let (ok, err) = passwd(&[&file, &"alice".into(), &"--stdin".into()], "one\n");
    assert!(ok, "{err}");
    let acl = dir.write(
        "acl.toml",
        "[[rules]]\neveryone = true\naccess = \"both\"\ntopics = [\"#\"]\n",
    );
    let addr = free_addr();
    let config = config_on(
        &dir,
        addr,
        &format!(
            "[auth]\nallow_anonymous = false\npassword_file = \"{}\"\nacl_file = \"{}\"\n\
             [storage]\nmode = \"memory\"\n",
            Path::new(&file).display(),
            acl.display()
        ),
    );
    let (petrel, first) = start(&config, addr, "info");
    drop(first);
    // A client that stays connected through the reloads.
    let mut stays = TcpStream::connect(addr).unwrap();
    stays.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stays
        .write_all(&connect_login("stays", "alice", "one"))
        .unwrap();
    expect(&mut stays, CONNACK_OK);
    assert_eq!(login_code(addr, "alice", "one"), 0);

    // alice's password changes and bob arrives; the ACL now allows ok/# only.
    let (ok, err) = passwd(&[&file, &"alice".into(), &"--stdin".into()], "two\n");
    assert!(ok, "{err}");
    let (ok, err) = passwd(&[&file, &"bob".into(), &"--stdin".into()], "three\n");
    assert!(ok, "{err}");
    std::fs::write(
        &acl,
        "[[rules]]\neveryone = true\naccess = \"both\"\ntopics = [\"ok/#\"]\n",
    )
    .unwrap();
    // And topics may have two levels at most now.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n[mqtt]\nmax_topic_levels = 2\n")).unwrap();
    petrel.signal(libc::SIGHUP);
    assert!(
        petrel.wait_for_stderr("configuration reloaded", EXIT_TIMEOUT),
        "{}",
        petrel.stderr()
    );
    assert_eq!(login_code(addr, "alice", "one"), 4, "old password");
    assert_eq!(login_code(addr, "alice", "two"), 0);
    assert_eq!(login_code(addr, "bob", "three"), 0);
    // The connected client is still there, under the new rules: "no/#" reaches nothing
    // they allow.
    send(&mut stays, "82 09 00 01 00 04 6e 6f 2f 23 00");
    expect(&mut stays, "90 03 00 01 80");
    // "ok/a/b" is allowed by the ACL but deeper than the new limit.
    send(&mut stays, "82 0b 00 04 00 06 6f 6b 2f 61 2f 62 00");
    expect(&mut stays, "90 03 00 04 80");

    // A broken ACL file: refused whole, the rules and users in service stay.
    std::fs::write(&acl, "[[rules]]\neveryone = true\naccess = \"sometimes\"\n").unwrap();
    petrel.signal(libc::SIGHUP);
    assert!(
        petrel.wait_for_stderr("configuration not reloaded", EXIT_TIMEOUT),
        "{}",
        petrel.stderr()
    );
    assert!(
        petrel.stderr().contains("acl.toml:3"),
        "{}",
        petrel.stderr()
    );
    assert_eq!(login_code(addr, "bob", "three"), 0);
    send(&mut stays, "82 08 00 02 00 03 6f 6b 31 00");
    expect(&mut stays, "90 03 00 02 80");
    send(&mut stays, "82 08 00 03 00 03 6f 6b 2f 00");
    expect(&mut stays, "90 03 00 03 00");
}

/// An `[admin]` table in the file is a promise: an admin listener that cannot start stops the
/// broker, naming the key. Without the table the default admin address is best-effort.
#[test]
fn an_admin_listener_that_cannot_start_stops_the_broker_when_configured() {
    let dir = TempDir::new("admin-start");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port to take");
    let taken_addr = taken.local_addr().unwrap();
    let mqtt = free_addr();
    let cases = [
        (
            format!("[[listeners]]\nbind = \"{mqtt}\"\n\n[admin]\nbind = \"{taken_addr}\"\n"),
            vec!["admin.bind".to_owned(), taken_addr.to_string()],
        ),
        (
            format!(
                "[[listeners]]\nbind = \"{mqtt}\"\n\n[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
                dir.0.join("no-such-token").display()
            ),
            vec!["admin.token_file".to_owned(), "no-such-token".to_owned()],
        ),
    ];
    for (i, (text, fragments)) in cases.iter().enumerate() {
        let path = dir.write(&format!("admin{i}.toml"), text);
        let out = Petrel::run([OsString::from("--config"), path.into()]);
        assert!(!out.status.success(), "case {i}: petrel started");
        for fragment in fragments {
            assert!(
                out.stderr.contains(fragment.as_str()),
                "case {i}: stderr lacks {fragment:?}:\n{}",
                out.stderr
            );
        }
    }
    drop(taken);
}

/// `--check-config` reads the files the configuration names, as a start would: a broken
/// password file, ACL file or admin token file fails the check, naming the key.
#[test]
fn check_config_reads_the_files_the_configuration_names() {
    let dir = TempDir::new("check-config-files");
    let passwords = dir.write("passwords", "alice:not-a-hash\n");
    let acl = dir.write(
        "acl.toml",
        "[[rules]]\nuser = \"a\"\naccess = \"sideways\"\ntopics = [\"x\"]\n",
    );
    let cases = [
        (
            format!("[auth]\npassword_file = \"{}\"\n", passwords.display()),
            "auth.password_file",
        ),
        (
            format!("[auth]\nacl_file = \"{}\"\n", acl.display()),
            "auth.acl_file",
        ),
        (
            format!(
                "[admin]\ntoken_file = \"{}\"\n",
                dir.0.join("missing-token").display()
            ),
            "admin.token_file",
        ),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.write(&format!("c{i}.toml"), text);
        let out = Petrel::run([OsString::from("--check-config"), path.into()]);
        assert_eq!(out.status.code(), Some(1), "{key}: {}", out.stderr);
        assert!(out.stderr.contains(key), "{key}: stderr: {}", out.stderr);
        assert!(
            !out.stdout.contains("OK"),
            "{key}: stdout: {:?}",
            out.stdout
        );
    }
}

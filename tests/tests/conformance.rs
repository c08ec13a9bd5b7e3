//! The conformance corpus (`tests/conformance/*.toml`, format in its README.md) run against
//! an in-process broker over real TCP: each case is a transcript of bytes sent and bytes
//! expected, named by the normative statement it checks. Expectations come from the OASIS
//! specifications, not from petrel; where petrel disagrees, the case carries `known_failure`,
//! is reported, and does not fail the suite (a known failure that starts passing does, so the
//! mark is removed).
//!
//! Every case runs on its own broker (cases may reuse client ids and topics), several at a
//! time; all run even when some fail, and the test fails at the end with the list.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_tests::{hex, to_hex, TestBroker};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one step may wait for the broker: past the 1.5 s a keep alive of 1 s allows,
/// with room for a loaded CI machine.
const STEP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `expect_nothing` listens.
const QUIET: Duration = Duration::from_millis(300);
/// Cases in flight at once (each with its own broker).
const PARALLEL: usize = 16;

// ------------------------------------------------------------------------------------------
// The corpus format
// ------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    case: Vec<RawCase>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    version: String,
    #[serde(default)]
    preset: Option<String>,
    #[serde(default)]
    note: Option<String>,
    #[serde(default)]
    known_failure: Option<String>,
    steps: Vec<String>,
}

/// Broker configurations a case may ask for, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Preset {
    /// Embedded defaults: anonymous clients admitted.
    Default,
    /// `allow_anonymous = false`, one user `alice` with password `secret`.
    Auth,
    /// Receive Maximum 2 and Topic Alias Maximum 2.
    Limits,
}

impl Preset {
    fn parse(name: &str) -> Option<Preset> {
        match name {
            "default" => Some(Preset::Default),
            "auth" => Some(Preset::Auth),
            "limits" => Some(Preset::Limits),
            _ => None,
        }
    }

    async fn start(self) -> TestBroker {
        match self {
            Preset::Default => TestBroker::start().await,
            Preset::Auth => {
                TestBroker::start_toml(
                    "[auth]\nallow_anonymous = false\n\
                     [[auth.users]]\nname = \"alice\"\npassword = \"secret\"\n",
                )
                .await
            }
            Preset::Limits => {
                TestBroker::start_toml("[mqtt]\nreceive_maximum = 2\ntopic_alias_maximum = 2\n")
                    .await
            }
        }
    }
}

/// One expected byte; `None` (written `??`) matches any byte.
type Pattern = Vec<Option<u8>>;

#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// Switch to (opening on first use) the named connection. Cases start on `a`.
    Client(String),
    Send(Vec<u8>),
    /// Exactly these bytes next.
    Expect(Pattern),
    /// One packet next: its first byte equals, and its body starts with, the pattern (after
    /// the first byte, the remaining length is skipped). Pattern bytes past the end of the
    /// body must be `00`: MQTT 5 lets a sender omit a 0x00 reason code and an empty
    /// property block.
    ExpectPacket(Pattern),
    /// The broker closes the connection, after the given packet if any.
    ExpectClose(Option<Pattern>),
    /// The broker closes the connection, optionally after the given packet (the
    /// specification says MAY).
    ExpectCloseMaybe(Pattern),
    /// Nothing arrives, and the connection stays open, for a short while.
    ExpectNothing,
    /// Close this connection without DISCONNECT.
    Drop,
}

#[derive(Debug)]
struct Case {
    file: String,
    name: String,
    version: String,
    preset: Preset,
    known_failure: Option<String>,
    /// Why the expectation is what it is, shown with a failure.
    note: Option<String>,
    /// Each step with its text, for reports.
    steps: Vec<(Step, String)>,
}

fn parse_pattern(text: &str) -> Result<Pattern, String> {
    let mut out = Vec::new();
    for token in text.split_whitespace() {
        // Tokens are bytes ("4d"), or runs of bytes ("4d5154").
        if !token.len().is_multiple_of(2) {
            return Err(format!("odd number of hex digits in {token:?}"));
        }
        for pair in token.as_bytes().chunks(2) {
            let pair = std::str::from_utf8(pair).map_err(|_| format!("not hex: {token:?}"))?;
            if pair == "??" {
                out.push(None);
            } else {
                let byte = u8::from_str_radix(pair, 16)
                    .map_err(|_| format!("not a hex byte: {pair:?} in {token:?}"))?;
                out.push(Some(byte));
            }
        }
    }
    Ok(out)
}

fn parse_step(text: &str) -> Result<Step, String> {
    let text = text.trim();
    let (verb, rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    let rest = rest.trim();
    let bytes = |rest: &str| -> Result<Pattern, String> {
        let p = parse_pattern(rest)?;
        if p.is_empty() {
            return Err(format!("`{verb}` needs hex bytes"));
        }
        Ok(p)
    };
    let none = |step: Step| -> Result<Step, String> {
        if rest.is_empty() {
            Ok(step)
        } else {
            Err(format!("`{verb}` takes no argument"))
        }
    };
    match verb {
        "client" => {
            if rest.is_empty() || rest.contains(char::is_whitespace) {
                return Err("`client` needs one name".into());
            }
            Ok(Step::Client(rest.to_string()))
        }
        "send" => {
            let p = bytes(rest)?;
            p.iter()
                .map(|b| b.ok_or_else(|| "`??` is only for expectations".to_string()))
                .collect::<Result<Vec<u8>, _>>()
                .map(Step::Send)
        }
        "expect" => Ok(Step::Expect(bytes(rest)?)),
        "expect_packet" => Ok(Step::ExpectPacket(bytes(rest)?)),
        "expect_close" if rest.is_empty() => Ok(Step::ExpectClose(None)),
        "expect_close" => Ok(Step::ExpectClose(Some(bytes(rest)?))),
        "expect_close_maybe" => Ok(Step::ExpectCloseMaybe(bytes(rest)?)),
        "expect_nothing" => none(Step::ExpectNothing),
        "drop" => none(Step::Drop),
        "" => Err("empty step".into()),
        other => Err(format!(
            "unknown step `{other}` (send, expect, expect_packet, expect_close, \
             expect_close_maybe, expect_nothing, client, drop)"
        )),
    }
}

/// Parses one corpus file; errors name the file, the case and the step.
fn parse_corpus(file: &str, text: &str) -> Result<Vec<Case>, String> {
    let raw: RawFile = toml::from_str(text).map_err(|e| format!("{file}: {e}"))?;
    let mut cases = Vec::new();
    for (i, c) in raw.case.into_iter().enumerate() {
        let at = format!("{file}: case {} {:?}", i + 1, c.name);
        if c.name.trim().is_empty() {
            return Err(format!("{at}: empty name"));
        }
        if !["3.1", "3.1.1", "5.0"].contains(&c.version.as_str()) {
            return Err(format!(
                "{at}: version {:?} is not 3.1, 3.1.1 or 5.0",
                c.version
            ));
        }
        let preset_name = c.preset.as_deref().unwrap_or("default");
        let preset = Preset::parse(preset_name).ok_or_else(|| {
            format!("{at}: unknown preset {preset_name:?} (default, auth, limits)")
        })?;
        if c.steps.is_empty() {
            return Err(format!("{at}: no steps"));
        }
        if matches!(&c.known_failure, Some(k) if k.trim().is_empty()) {
            return Err(format!("{at}: known_failure must say what differs"));
        }
        let mut steps = Vec::new();
        for (n, text) in c.steps.iter().enumerate() {
            let step =
                parse_step(text).map_err(|e| format!("{at}: step {} `{text}`: {e}", n + 1))?;
            steps.push((step, text.clone()));
        }
        cases.push(Case {
            file: file.to_string(),
            name: c.name,
            version: c.version,
            preset,
            known_failure: c.known_failure,
            note: c.note,
            steps,
        });
    }
    Ok(cases)
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance")
}

/// Every `*.toml` file of the corpus, in name order; panics with the parser's message.
fn load_corpus() -> Vec<Case> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("tests/conformance exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut all = Vec::new();
    let mut names = BTreeSet::new();
    for path in files {
        let file = path
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .to_string();
        let text = std::fs::read_to_string(&path).expect("readable corpus file");
        let cases = parse_corpus(&file, &text).unwrap_or_else(|e| panic!("{e}"));
        for c in &cases {
            assert!(
                names.insert(c.name.clone()),
                "{file}: case name {:?} appears twice in the corpus",
                c.name
            );
        }
        all.extend(cases);
    }
    all
}

// ------------------------------------------------------------------------------------------
// Running a case
// ------------------------------------------------------------------------------------------

struct Conn {
    stream: Option<TcpStream>,
    /// Bytes read but not yet matched.
    buf: Vec<u8>,
}

enum Read {
    Data,
    Closed,
    TimedOut,
}

impl Conn {
    /// Reads more bytes into `buf` before `deadline`.
    async fn fill(&mut self, deadline: Instant) -> Result<Read, String> {
        let Some(stream) = self.stream.as_mut() else {
            return Err("this connection was dropped by the case".into());
        };
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Err(_) => Ok(Read::TimedOut),
            Ok(Ok(0)) => Ok(Read::Closed),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(Read::Data)
            }
            // A reset after the broker closed with unread input is a close.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(Read::Closed),
            Ok(Err(e)) => Err(format!("read failed: {e}")),
        }
    }

    async fn take(&mut self, n: usize) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while self.buf.len() < n {
            match self.fill(deadline).await? {
                Read::Data => {}
                Read::Closed => {
                    return Err(format!(
                        "connection closed; got only [{}]",
                        to_hex(&self.buf)
                    ))
                }
                Read::TimedOut => {
                    return Err(format!(
                        "nothing more within {STEP_TIMEOUT:?}; got only [{}]",
                        to_hex(&self.buf)
                    ))
                }
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// One whole packet (first byte, remaining length, body), or `None` on a close before
    /// its first byte.
    async fn packet(&mut self) -> Result<Option<(u8, Vec<u8>)>, String> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while self.buf.is_empty() {
            match self.fill(deadline).await? {
                Read::Data => {}
                Read::Closed => return Ok(None),
                Read::TimedOut => {
                    return Err(format!("no packet and no close within {STEP_TIMEOUT:?}"))
                }
            }
        }
        let mut len = 0usize;
        let mut i = 1;
        loop {
            while self.buf.len() <= i {
                if !matches!(self.fill(deadline).await?, Read::Data) {
                    return Err(format!("incomplete packet [{}]", to_hex(&self.buf)));
                }
            }
            let b = self.buf[i];
            len |= usize::from(b & 0x7f) << (7 * (i - 1));
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            if i > 4 {
                return Err(format!("bad remaining length in [{}]", to_hex(&self.buf)));
            }
        }
        let all = self.take(i + len).await?;
        Ok(Some((all[0], all[i..].to_vec())))
    }

    async fn expect_eof(&mut self) -> Result<(), String> {
        if !self.buf.is_empty() {
            return Err(format!("expected a close, got [{}]", to_hex(&self.buf)));
        }
        match self.fill(Instant::now() + STEP_TIMEOUT).await? {
            Read::Closed => Ok(()),
            Read::Data => Err(format!("expected a close, got [{}]", to_hex(&self.buf))),
            Read::TimedOut => Err(format!("connection still open after {STEP_TIMEOUT:?}")),
        }
    }
}

fn show(p: &[Option<u8>]) -> String {
    p.iter()
        .map(|b| b.map_or("??".to_string(), |b| format!("{b:02x}")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn matches_exact(p: &[Option<u8>], got: &[u8]) -> bool {
    p.len() == got.len() && p.iter().zip(got).all(|(p, g)| p.is_none_or(|p| p == *g))
}

/// First byte equal, body starting with the rest; pattern bytes past the body's end must
/// be 00 (omitted reason code / property length).
fn matches_packet(p: &[Option<u8>], first: u8, body: &[u8]) -> bool {
    let Some((head, rest)) = p.split_first() else {
        return false;
    };
    if head.is_some_and(|h| h != first) {
        return false;
    }
    rest.iter().enumerate().all(|(i, p)| match body.get(i) {
        Some(g) => p.is_none_or(|p| p == *g),
        None => matches!(p, Some(0)),
    })
}

fn packet_hex(first: u8, body: &[u8]) -> String {
    let mut all = vec![first];
    all.extend_from_slice(body);
    format!("{} (body after the remaining length)", to_hex(&all))
}

async fn run_step(
    step: &Step,
    conns: &mut HashMap<String, Conn>,
    current: &mut String,
    addr: std::net::SocketAddr,
) -> Result<(), String> {
    if let Step::Client(name) = step {
        *current = name.clone();
    }
    if !conns.contains_key(current.as_str()) {
        let stream = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect failed: {e}"))?;
        stream.set_nodelay(true).ok();
        conns.insert(
            current.clone(),
            Conn {
                stream: Some(stream),
                buf: Vec::new(),
            },
        );
    }
    let conn = conns.get_mut(current.as_str()).expect("inserted above");
    match step {
        Step::Client(_) => Ok(()),
        Step::Send(bytes) => {
            let Some(stream) = conn.stream.as_mut() else {
                return Err("this connection was dropped by the case".into());
            };
            stream
                .write_all(bytes)
                .await
                .map_err(|e| format!("send failed: {e}"))
        }
        Step::Expect(p) => {
            let got = conn.take(p.len()).await?;
            if matches_exact(p, &got) {
                Ok(())
            } else {
                Err(format!("expected [{}], got [{}]", show(p), to_hex(&got)))
            }
        }
        Step::ExpectPacket(p) => match conn.packet().await? {
            Some((first, body)) if matches_packet(p, first, &body) => Ok(()),
            Some((first, body)) => Err(format!(
                "expected a packet [{}], got [{}]",
                show(p),
                packet_hex(first, &body)
            )),
            None => Err(format!("expected a packet [{}], got a close", show(p))),
        },
        Step::ExpectClose(None) => conn.expect_eof().await,
        Step::ExpectClose(Some(p)) => match conn.packet().await? {
            Some((first, body)) if matches_packet(p, first, &body) => conn.expect_eof().await,
            Some((first, body)) => Err(format!(
                "expected [{}] then a close, got [{}]",
                show(p),
                packet_hex(first, &body)
            )),
            None => Err(format!(
                "expected [{}] before the close, got a close without it",
                show(p)
            )),
        },
        Step::ExpectCloseMaybe(p) => match conn.packet().await? {
            None => Ok(()),
            Some((first, body)) if matches_packet(p, first, &body) => conn.expect_eof().await,
            Some((first, body)) => Err(format!(
                "expected a close (optionally after [{}]), got [{}]",
                show(p),
                packet_hex(first, &body)
            )),
        },
        Step::ExpectNothing => {
            if !conn.buf.is_empty() {
                return Err(format!("expected nothing, got [{}]", to_hex(&conn.buf)));
            }
            match conn.fill(Instant::now() + QUIET).await? {
                Read::TimedOut => Ok(()),
                Read::Data => Err(format!("expected nothing, got [{}]", to_hex(&conn.buf))),
                Read::Closed => Err("expected nothing, but the connection closed".into()),
            }
        }
        Step::Drop => {
            conn.stream = None;
            Ok(())
        }
    }
}

/// Runs one case on a fresh broker; `Err` names the failing step.
async fn run_case(case: &Case) -> Result<(), String> {
    let broker = case.preset.start().await;
    let mut conns = HashMap::new();
    let mut current = "a".to_string();
    let mut result = Ok(());
    for (n, (step, text)) in case.steps.iter().enumerate() {
        if let Err(e) = run_step(step, &mut conns, &mut current, broker.addr).await {
            result = Err(format!("step {} `{text}` (client {current}): {e}", n + 1));
            break;
        }
    }
    drop(conns);
    drop(broker);
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_corpus() {
    let started = Instant::now();
    let cases: Vec<Arc<Case>> = load_corpus().into_iter().map(Arc::new).collect();
    let permits = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let mut tasks = Vec::new();
    for case in &cases {
        let case = case.clone();
        let permits = permits.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore open");
            let t = Instant::now();
            let r = run_case(&case).await;
            (r, t.elapsed())
        }));
    }
    let mut failures = Vec::new();
    let mut unexpected_passes = Vec::new();
    let mut known = 0;
    let mut report = String::new();
    for (case, task) in cases.iter().zip(tasks) {
        let (result, took) = task.await.expect("case task panicked");
        let label = format!("{} [{}] {}", case.file, case.version, case.name);
        let result = result.map_err(|e| match &case.note {
            Some(note) => format!("{e}\n    note: {note}"),
            None => e,
        });
        match (&result, &case.known_failure) {
            (Ok(()), None) => writeln!(report, "ok      {label} ({took:.0?})"),
            (Err(e), None) => {
                failures.push(format!("{label}\n    {e}"));
                writeln!(report, "FAIL    {label}\n    {e}")
            }
            (Err(e), Some(why)) => {
                known += 1;
                writeln!(report, "known   {label}\n    {e}\n    known failure: {why}")
            }
            (Ok(()), Some(why)) => {
                unexpected_passes.push(format!("{label} (marked: {why})"));
                writeln!(report, "PASSES  {label} — remove its known_failure mark")
            }
        }
        .expect("write to String");
    }
    println!("{report}");
    println!(
        "conformance: {} cases, {} failed, {} known failures, {} unexpected passes, {:.1?}",
        cases.len(),
        failures.len(),
        known,
        unexpected_passes.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty() && unexpected_passes.is_empty(),
        "conformance failures:\n  {}\nknown failures that now pass:\n  {}",
        failures.join("\n  "),
        unexpected_passes.join("\n  ")
    );
}

// ------------------------------------------------------------------------------------------
// The corpus itself
// ------------------------------------------------------------------------------------------

/// `[MQTT-3.3.2-2]`-style statement ids, or `[MQTT-3.1.2.11.2]` section references for rules
/// the specification states without a number.
fn spec_ids(name: &str) -> Vec<&str> {
    let mut ids = Vec::new();
    let mut rest = name;
    while let Some(start) = rest.find("[MQTT-") {
        let tail = &rest[start + 6..];
        let Some(end) = tail.find(']') else { break };
        let id = &tail[..end];
        if !id.is_empty()
            && id.starts_with(|c: char| c.is_ascii_digit())
            && id
                .chars()
                .all(|c| c.is_ascii_digit() || c == '.' || c == '-')
        {
            ids.push(id);
        }
        rest = &tail[end..];
    }
    ids
}

#[test]
fn every_case_names_a_spec_statement() {
    let cases = load_corpus();
    assert!(cases.len() >= 80, "only {} cases", cases.len());
    let missing: Vec<String> = cases
        .iter()
        .filter(|c| spec_ids(&c.name).is_empty())
        .map(|c| format!("{}: {:?}", c.file, c.name))
        .collect();
    assert!(
        missing.is_empty(),
        "cases without a [MQTT-x.y.z-n] id in their name:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn spec_ids_are_recognised() {
    assert_eq!(spec_ids("topic with + [MQTT-3.3.2-2]"), vec!["3.3.2-2"]);
    assert_eq!(spec_ids("a [MQTT-1.5.4-1] b [MQTT-3.1.2.11.2]").len(), 2);
    assert!(spec_ids("no id").is_empty());
    assert!(spec_ids("bad [MQTT-]").is_empty());
    assert!(spec_ids("bad [MQTT-x]").is_empty());
}

#[test]
fn parser_reads_every_step_kind() {
    let text = r#"
        [[case]]
        name = "all steps [MQTT-1.2.3-4]"
        version = "5.0"
        preset = "limits"
        steps = ["send c0 00", "expect d000", "expect_packet 20 ?? 00", "expect_close",
                 "expect_close e0 81", "expect_close_maybe 20 00 81", "expect_nothing",
                 "client b", "drop"]
    "#;
    let cases = parse_corpus("x.toml", text).expect("valid");
    let steps: Vec<&Step> = cases[0].steps.iter().map(|(s, _)| s).collect();
    assert_eq!(cases[0].preset, Preset::Limits);
    assert_eq!(
        steps,
        vec![
            &Step::Send(vec![0xc0, 0]),
            &Step::Expect(vec![Some(0xd0), Some(0)]),
            &Step::ExpectPacket(vec![Some(0x20), None, Some(0)]),
            &Step::ExpectClose(None),
            &Step::ExpectClose(Some(vec![Some(0xe0), Some(0x81)])),
            &Step::ExpectCloseMaybe(vec![Some(0x20), Some(0), Some(0x81)]),
            &Step::ExpectNothing,
            &Step::Client("b".into()),
            &Step::Drop,
        ]
    );
    // Omitted zero reason code and property length match, other omissions do not.
    assert!(matches_packet(
        &[Some(0x40), Some(0), Some(3), Some(0)],
        0x40,
        &[0, 3]
    ));
    assert!(!matches_packet(
        &[Some(0x40), Some(0), Some(3), Some(0x10)],
        0x40,
        &[0, 3]
    ));
    assert!(matches_exact(&[Some(1), None], &[1, 9]));
    assert!(!matches_exact(&[Some(1), None], &[1]));
    assert_eq!(hex("c0 00"), vec![0xc0, 0]);
}

#[test]
fn parser_rejects_malformed_corpus_with_file_case_and_step() {
    let case = |steps: &str| {
        format!("[[case]]\nname = \"c [MQTT-1.1.1-1]\"\nversion = \"3.1.1\"\nsteps = [{steps}]\n")
    };
    let bad: Vec<(String, &str)> = vec![
        (
            case(r#""send 10 0""#),
            "step 1 `send 10 0`: odd number of hex digits",
        ),
        (
            case(r#""send c0 00", "expect zz""#),
            "step 2 `expect zz`: not a hex byte",
        ),
        (
            case(r#""sned c0 00""#),
            "step 1 `sned c0 00`: unknown step `sned`",
        ),
        (
            case(r#""send ?? 00""#),
            "step 1 `send ?? 00`: `??` is only for expectations",
        ),
        (
            case(r#""expect""#),
            "step 1 `expect`: `expect` needs hex bytes",
        ),
        (
            case(r#""expect_nothing 00""#),
            "`expect_nothing` takes no argument",
        ),
        (case(r#""client""#), "`client` needs one name"),
        (case(""), "no steps"),
        (
            case(r#""send c0 00""#).replace("3.1.1", "4"),
            "version \"4\" is not 3.1, 3.1.1 or 5.0",
        ),
        (
            case(r#""send c0 00""#) + "preset = \"huge\"\n",
            "unknown preset \"huge\"",
        ),
        (
            case(r#""send c0 00""#) + "known_failure = \" \"\n",
            "known_failure must say what differs",
        ),
        (
            case(r#""send c0 00""#) + "colour = 1\n",
            "unknown field `colour`",
        ),
        (
            "[[case]]\nname = \"n [MQTT-1-1]\"\n".to_string(),
            "missing field",
        ),
    ];
    for (text, wanted) in bad {
        let err = parse_corpus("bad.toml", &text).expect_err(&text);
        assert!(err.starts_with("bad.toml: "), "no file in {err:?}");
        assert!(err.contains(wanted), "{err:?} does not say {wanted:?}");
        if wanted.starts_with("step") || wanted.contains("needs") || wanted.contains("takes") {
            assert!(
                err.contains("case 1 \"c [MQTT-1.1.1-1]\""),
                "no case in {err:?}"
            );
        }
    }
}

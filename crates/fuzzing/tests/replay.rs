//! Replays every input the fuzzers kept (`fuzz/corpus/<target>/`) through the same checks, on
//! stable Rust: CI runs them as ordinary tests. The conformance corpus's packets
//! (`tests/conformance/`) and the codec's malformed transcripts seed `decode` and `session`
//! too, when present.

use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

fn inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    files
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read a corpus file");
            (p, bytes)
        })
        .collect()
}

#[test]
fn every_kept_input_passes_its_check() {
    let mut total = 0;
    for (target, check) in petrel_fuzzing::TARGETS {
        let dir = corpus_dir(target);
        let inputs = inputs(&dir);
        assert!(
            !inputs.is_empty(),
            "no corpus for {target} in {}: run the fuzzer and commit what it keeps",
            dir.display()
        );
        for (path, bytes) in &inputs {
            let outcome = std::panic::catch_unwind(|| check(bytes));
            assert!(
                outcome.is_ok(),
                "{target} fails on {} (replay: cargo +nightly fuzz run {target} {})",
                path.display(),
                path.display()
            );
        }
        println!("{target}: {} inputs", inputs.len());
        total += inputs.len();
    }
    assert!(total > 0);
}

/// Hand-picked inputs that each check must get right, so the replay means something even
/// with an empty corpus.
#[test]
fn known_inputs() {
    // decode: a 3.1.1 CONNECT, and a PUBLISH whose remaining length runs past the data.
    petrel_fuzzing::decode(&[
        1, 0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'a',
    ]);
    petrel_fuzzing::decode(&[2, 0x30, 0xff, 0xff, 0xff, 0x7f]);
    // topics: filters and names with wildcards, empty levels and a $ topic.
    let strings = [
        "a/+/c", "a/b/c", "#", "$SYS/x", "+/x", "a//c", "a/#", "", "/",
    ];
    let mut data = Vec::new();
    for s in strings {
        data.extend_from_slice(s.as_bytes());
        data.push(0xff);
    }
    petrel_fuzzing::topics(&data);
    // session: connected v5 persistent client with a watcher, publishing QoS 1 and 2.
    let mut data = vec![2, 0b0000_0111];
    data.extend_from_slice(&[0x32, 0x07, 0, 1, b't', 0, 1, 0, b'x']);
    data.extend_from_slice(&[0x34, 0x07, 0, 1, b't', 0, 2, 0, b'y']);
    data.extend_from_slice(&[0x62, 0x03, 0, 2, 0]);
    petrel_fuzzing::session(&data);
}

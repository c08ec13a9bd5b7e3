//! `petrel store check DIR` and `petrel store salvage DIR --into NEW_DIR`: the operator's way
//! out of a damaged store (the work is in `petrel_store::check`). Neither modifies DIR.
//!
//! `check` exits 0 when a start would accept the store (a torn tail, which a start drops on
//! its own, is reported but sound), 1 with one line per damaged record otherwise. `salvage`
//! exits 0 once NEW_DIR holds a sound store of every record that reads, each record that does
//! not read listed on stderr; a start on NEW_DIR then restores it.

use std::io::Write;
use std::path::Path;

use petrel_store::Report;

/// What a command prints and whether it succeeded.
pub struct Outcome {
    pub text: String,
    pub ok: bool,
}

fn describe(report: &Report, out: &mut String) {
    use std::fmt::Write;
    if let Some(torn) = &report.torn {
        let _ = writeln!(
            out,
            "torn tail (dropped at start, as after a crash; never acknowledged): {torn}"
        );
    }
    for line in &report.damage {
        let _ = writeln!(out, "damaged: {line}");
    }
}

/// `petrel store check DIR`.
pub fn check(dir: &Path) -> Outcome {
    match petrel_store::check(dir) {
        Ok(report) => {
            let mut text = String::new();
            describe(&report, &mut text);
            let ok = report.is_sound();
            text.push_str(&if ok {
                format!("store {} is sound: {} records\n", dir.display(), report.records)
            } else {
                format!(
                    "store {} is damaged: {} records read, {} damaged (listed above); a start \
                     refuses it. `petrel store salvage {} --into NEW_DIR` copies the {} that read\n",
                    dir.display(),
                    report.records,
                    report.damage.len(),
                    dir.display(),
                    report.records
                )
            });
            Outcome { text, ok }
        }
        Err(e) => Outcome {
            text: format!("cannot check the store in {}: {e}\n", dir.display()),
            ok: false,
        },
    }
}

/// `petrel store salvage DIR --into NEW_DIR`.
pub fn salvage(dir: &Path, into: &Path) -> Outcome {
    match petrel_store::salvage(dir, into) {
        Ok(report) => {
            let mut text = String::new();
            describe(&report, &mut text);
            // The login secret lives beside the store (auth_secret.rs): carried across, so
            // the salvaged store serves the same SCRAM challenges as before.
            let secret = dir.join(crate::auth_secret::FILE_NAME);
            if secret.exists() {
                if let Err(e) = copy_private(&secret, &into.join(crate::auth_secret::FILE_NAME)) {
                    text.push_str(&format!(
                        "could not copy {}: {e}; a new login secret will be made at start\n",
                        secret.display()
                    ));
                }
            }
            text.push_str(&format!(
                "salvaged {} records from {} into {}; {} could not be read (listed above). {} is \
                 unchanged\n",
                report.records,
                dir.display(),
                into.display(),
                report.damage.len(),
                dir.display()
            ));
            Outcome { text, ok: true }
        }
        Err(e) => Outcome {
            text: format!("cannot salvage the store in {}: {e}\n", dir.display()),
            ok: false,
        },
    }
}

/// Copies a file readable by its owner only (0600) from `from` to `to`.
fn copy_private(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = std::fs::read(from)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    file.write_all(&bytes)?;
    file.sync_all()
}

/// Prints an outcome to stderr (stdout for a sound check), as a process exit status.
pub fn print(outcome: &Outcome) -> std::process::ExitCode {
    let written = if outcome.ok {
        std::io::stdout().lock().write_all(outcome.text.as_bytes())
    } else {
        std::io::stderr().lock().write_all(outcome.text.as_bytes())
    };
    match (written, outcome.ok) {
        (Ok(()), true) => std::process::ExitCode::SUCCESS,
        _ => std::process::ExitCode::FAILURE,
    }
}

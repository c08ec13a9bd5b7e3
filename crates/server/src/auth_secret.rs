//! The broker's authentication secret: 32 bytes that SCRAM-SHA-256 derives the fake salts of
//! unknown user names from (and the salts of `[[auth.users]]` given a clear-text password),
//! so that a challenge does not tell whether a user exists, now or across restarts.
//!
//! With `storage.mode = "disk"` the secret is a file in the store's directory,
//! `auth.secret`, created at the first start (mode 0600) and kept with the store. With
//! `storage.mode = "memory"` petrel writes no files, so the secret is derived from what the
//! configuration already holds that an attacker does not know: the `[[auth.users]]` passwords
//! and SCRAM keys and the password file's hashes. It stays the same across restarts as long
//! as those do; changing a user changes every derived salt (which tells an observer only that
//! the configuration changed). With no such material there is no SCRAM user to tell apart
//! from an unknown one.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::{Config, StorageMode};

/// The file name in `storage.dir`.
pub const FILE_NAME: &str = "auth.secret";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a petrel authentication secret ({len} bytes, expected 32)")]
    Invalid { path: PathBuf, len: usize },
    #[error("no randomness for a new authentication secret: {0}")]
    Randomness(getrandom::Error),
}

/// Whether a missing secret file may be created (a start) or not (`--check-config`, which
/// changes nothing on disk: it uses a throwaway secret instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Create {
    Yes,
    No,
}

/// The secret for `config`, read from (or created in) the store's directory in disk mode,
/// derived from the configuration in memory mode.
pub fn load(config: &Config, create: Create) -> Result<[u8; 32], SecretError> {
    match config.storage.mode {
        StorageMode::Disk => from_file(&config.storage.dir.join(FILE_NAME), create),
        StorageMode::Memory => Ok(from_config(config)),
    }
}

fn from_file(path: &Path, create: Create) -> Result<[u8; 32], SecretError> {
    let io = |error| SecretError::Io {
        path: path.to_owned(),
        error,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let len = bytes.len();
            bytes.try_into().map_err(|_| SecretError::Invalid {
                path: path.to_owned(),
                len,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            getrandom::getrandom(&mut secret).map_err(SecretError::Randomness)?;
            if create == Create::No {
                return Ok(secret);
            }
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            // Written beside and renamed, so a crash never leaves half a secret; readable by
            // its owner only.
            let tmp = path.with_extension("secret.tmp");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            file.write_all(&secret).map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&tmp, path).map_err(io)?;
            Ok(secret)
        }
        Err(e) => Err(io(e)),
    }
}

fn from_config(config: &Config) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"petrel authentication secret, memory mode\0");
    for user in &config.auth.users {
        for part in [
            user.name.as_str(),
            user.password.as_deref().unwrap_or(""),
            user.scram_sha256.as_deref().unwrap_or(""),
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
    }
    if let Some(path) = &config.auth.password_file {
        // Unreadable here means unreadable for the authenticator too, which reports it.
        if let Ok(text) = std::fs::read(path) {
            h.update((text.len() as u64).to_be_bytes());
            h.update(text);
        }
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_created_once_private_and_read_back() {
        let dir = std::env::temp_dir().join(format!("petrel-secret-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("store").join(FILE_NAME);
        let throwaway = from_file(&path, Create::No).unwrap();
        assert!(!path.exists(), "a check creates nothing");
        let first = from_file(&path, Create::Yes).unwrap();
        assert_ne!(first, throwaway);
        assert_eq!(from_file(&path, Create::Yes).unwrap(), first);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, b"short").unwrap();
        let err = from_file(&path, Create::Yes).unwrap_err().to_string();
        assert!(
            err.contains("auth.secret: not a petrel authentication secret"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn memory_mode_derives_it_from_the_users() {
        let mut config = Config::default();
        let empty = from_config(&config);
        config.auth.users.push(crate::config::UserConfig {
            name: "alice".into(),
            password: Some("secret".into()),
            scram_sha256: None,
        });
        let alice = from_config(&config);
        assert_ne!(alice, empty);
        assert_eq!(from_config(&config.clone()), alice, "stable");
        config.auth.users[0].password = Some("other".into());
        assert_ne!(from_config(&config), alice);
    }
}

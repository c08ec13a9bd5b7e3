//! Password files (`[auth] password_file`): one `user:hash` line per user, the hash a PHC
//! string. petrel writes argon2id (`petrel passwd`); it also verifies `$pbkdf2-sha512$` and
//! `$pbkdf2-sha256$` PHC strings and bcrypt (`$2b$`, `$2a$`, `$2y$`), so users can move from
//! other brokers with their hashes.
//!
//! ```text
//! # petrel password file
//! alice:$argon2id$v=19$m=19456,t=2,p=1$...$...
//! ```
//!
//! Verifying a slow hash takes tens of milliseconds of CPU, so it runs on the blocking pool,
//! never on a connection task, and a client whose password was verified once is checked
//! against a keyed digest of it afterwards (the cache holds no password). Failed logins are
//! counted per client address; past `max_failed_logins` a minute the address is refused
//! without verifying anything.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use petrel_engine::auth::{AuthDecision, AuthOutcome, Authenticator, Credentials, EnhancedAuth};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// A password file's users and their hashes, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    entries: Vec<(String, String)>,
}

/// Which algorithm a stored hash names, if one this build verifies.
fn scheme(hash: &str) -> Option<&'static str> {
    if hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$") {
        return hash.parse::<bcrypt::HashParts>().ok().map(|_| "bcrypt");
    }
    let parsed = PasswordHash::new(hash).ok()?;
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return None;
    }
    match parsed.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => Some("argon2"),
        "pbkdf2-sha512" | "pbkdf2-sha256" => Some("pbkdf2"),
        _ => None,
    }
}

/// Whether `password` matches `hash`. Constant-time comparison is the hash crates' own.
pub fn verify(hash: &str, password: &[u8]) -> bool {
    match scheme(hash) {
        Some("bcrypt") => bcrypt::verify(password, hash).unwrap_or(false),
        Some("argon2") => PasswordHash::new(hash)
            .map(|h| {
                argon2::Argon2::default()
                    .verify_password(password, &h)
                    .is_ok()
            })
            .unwrap_or(false),
        Some("pbkdf2") => PasswordHash::new(hash)
            .map(|h| pbkdf2::Pbkdf2.verify_password(password, &h).is_ok())
            .unwrap_or(false),
        _ => false,
    }
}

/// An argon2id PHC string for `password` with a fresh random salt (argon2's recommended
/// parameters: 19 MiB, 2 passes).
pub fn hash(password: &[u8]) -> Result<String, password_hash::Error> {
    let salt = SaltString::generate(&mut password_hash::rand_core::OsRng);
    Ok(argon2::Argon2::default()
        .hash_password(password, &salt)?
        .to_string())
}

impl PasswordFile {
    pub fn load(path: &Path) -> Result<PasswordFile, PasswordFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| PasswordFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        PasswordFile::parse(path, &text)
    }

    /// A file that does not exist yet reads as empty (for `petrel passwd` creating one).
    pub fn load_or_empty(path: &Path) -> Result<PasswordFile, PasswordFileError> {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PasswordFile::default()),
            _ => PasswordFile::load(path),
        }
    }

    pub fn parse(path: &Path, text: &str) -> Result<PasswordFile, PasswordFileError> {
        let mut entries: Vec<(String, String)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let invalid = |message: String| PasswordFileError::Invalid {
                path: path.to_owned(),
                line: n + 1,
                message,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(invalid("expected user:hash".into()));
            };
            if user.is_empty() {
                return Err(invalid("empty user name".into()));
            }
            if scheme(hash).is_none() {
                return Err(invalid(format!(
                    "user {user:?}: not a hash petrel verifies (argon2, pbkdf2-sha512, \
                     pbkdf2-sha256 PHC strings, or bcrypt)"
                )));
            }
            if entries.iter().any(|(u, _)| u == user) {
                return Err(invalid(format!("user {user:?} appears twice")));
            }
            entries.push((user.to_owned(), hash.to_owned()));
        }
        Ok(PasswordFile { entries })
    }

    pub fn get(&self, user: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, h)| h.as_str())
    }

    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(u, _)| u.as_str())
    }

    /// Adds the user or replaces its hash.
    pub fn set(&mut self, user: &str, hash: String) {
        match self.entries.iter_mut().find(|(u, _)| u == user) {
            Some(entry) => entry.1 = hash,
            None => self.entries.push((user.to_owned(), hash)),
        }
    }

    /// Removes the user; false if it was not there.
    pub fn remove(&mut self, user: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(u, _)| u != user);
        self.entries.len() != before
    }

    pub fn to_text(&self) -> String {
        let mut out = String::from("# petrel password file: user:hash (see `petrel passwd`)\n");
        for (user, hash) in &self.entries {
            out.push_str(user);
            out.push(':');
            out.push_str(hash);
            out.push('\n');
        }
        out
    }
}

/// Logins that failed, per client address, in one-minute windows.
pub struct FailedLogins {
    limit: u32,
    window: Duration,
    by_address: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// Addresses tracked at most; past it the oldest windows are forgotten first.
const MAX_TRACKED: usize = 100_000;

impl FailedLogins {
    pub fn new(limit: u32) -> FailedLogins {
        FailedLogins {
            limit,
            window: Duration::from_secs(60),
            by_address: Mutex::new(HashMap::new()),
        }
    }

    fn address(peer: &str) -> Option<IpAddr> {
        peer.parse::<SocketAddr>()
            .map(|a| a.ip())
            .or_else(|_| peer.parse::<IpAddr>())
            .ok()
    }

    /// Whether `peer` is past its failures for this window.
    pub fn blocked(&self, peer: &str, now: Instant) -> bool {
        let Some(ip) = FailedLogins::address(peer) else {
            return false;
        };
        let map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&ip)
            .is_some_and(|(start, n)| now.duration_since(*start) < self.window && *n >= self.limit)
    }

    pub fn record(&self, peer: &str, decision: AuthDecision, now: Instant) {
        if decision == AuthDecision::Allow {
            return;
        }
        let Some(ip) = FailedLogins::address(peer) else {
            return;
        };
        let mut map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            let window = self.window;
            map.retain(|_, (start, _)| now.duration_since(*start) < window);
            if map.len() >= MAX_TRACKED {
                map.clear();
            }
        }
        let entry = map.entry(ip).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

/// Verified logins, as keyed digests of user and password: a reconnecting client costs one
/// SHA-256, not another slow hash.
struct Verified {
    key: [u8; 32],
    digests: Mutex<HashMap<String, [u8; 32]>>,
}

/// Users kept at most; past it the cache starts over.
const MAX_VERIFIED: usize = 10_000;

impl Verified {
    fn digest(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update(user.as_bytes());
        h.update([0]);
        h.update(password);
        h.finalize().into()
    }

    fn knows(&self, user: &str, password: &[u8]) -> bool {
        let digest = self.digest(user, password);
        let map = self.digests.lock().unwrap_or_else(|e| e.into_inner());
        map.get(user).is_some_and(|d| {
            // Constant-time enough: both are digests under a secret key.
            d.iter()
                .zip(digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
        })
    }

    fn remember(&self, user: &str, password: &[u8]) {
        let digest = self.digest(user, password);
        let mut map = self.digests.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_VERIFIED {
            map.clear();
        }
        map.insert(user.to_owned(), digest);
    }
}

/// The authenticator for a password file, in front of the users named in the config (which
/// also serve MQTT 5 SCRAM), with failed logins limited per address.
pub struct FileAuthenticator {
    file: Arc<PasswordFile>,
    /// Config users, anonymous access and certificate logins.
    rest: Box<dyn Authenticator>,
    /// The names of the config users, so that the hook is asked only about others.
    config_users: std::collections::HashSet<String>,
    /// Decides on user names neither the file nor the config knows.
    hook: Option<Arc<crate::auth_hook::HttpHook>>,
    failed: Arc<FailedLogins>,
    verified: Arc<Verified>,
}

impl FileAuthenticator {
    pub fn new(
        file: Option<PasswordFile>,
        rest: Box<dyn Authenticator>,
        max_failed_logins: u32,
    ) -> FileAuthenticator {
        FileAuthenticator::with_hook(file, rest, Default::default(), None, max_failed_logins)
    }

    pub fn with_hook(
        file: Option<PasswordFile>,
        rest: Box<dyn Authenticator>,
        config_users: std::collections::HashSet<String>,
        hook: Option<Arc<crate::auth_hook::HttpHook>>,
        max_failed_logins: u32,
    ) -> FileAuthenticator {
        let mut key = [0u8; 32];
        // Without randomness the cache key is fixed: the digests still hold no password.
        let _ = getrandom::getrandom(&mut key);
        FileAuthenticator {
            file: Arc::new(file.unwrap_or_default()),
            rest,
            config_users,
            hook,
            failed: Arc::new(FailedLogins::new(max_failed_logins)),
            verified: Arc::new(Verified {
                key,
                digests: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl Authenticator for FileAuthenticator {
    fn authenticate(&self, credentials: &Credentials<'_>) -> AuthDecision {
        // Only reached by callers that cannot wait; the broker uses `check`.
        match (credentials.username, credentials.password) {
            (Some(user), Some(password)) if self.file.get(user.as_str()).is_some() => {
                let hash = self.file.get(user.as_str()).unwrap_or_default();
                if verify(hash, password) {
                    AuthDecision::Allow
                } else {
                    AuthDecision::BadCredentials
                }
            }
            _ => self.rest.authenticate(credentials),
        }
    }

    fn check(&self, credentials: &Credentials<'_>) -> AuthOutcome {
        let now = Instant::now();
        let peer = credentials.peer;
        if self.failed.blocked(peer, now) {
            tracing::info!(
                peer,
                "login refused: too many failed logins from this address"
            );
            return AuthOutcome::Decided(AuthDecision::NotAuthorized);
        }
        let in_file = credentials
            .username
            .and_then(|u| self.file.get(u.as_str()).map(|h| (u.as_str(), h)));
        let Some((user, hash)) = in_file else {
            if let (Some(hook), Some(user)) = (&self.hook, credentials.username) {
                if !self.config_users.contains(user.as_str()) {
                    let outcome = match hook.ask(
                        credentials.client_id,
                        user.as_str(),
                        credentials.password.unwrap_or_default(),
                        peer,
                        credentials.certificate_identity,
                    ) {
                        Ok(decision) => AuthOutcome::Decided(decision),
                        Err(pending) => AuthOutcome::Pending(pending),
                    };
                    return self.counted(peer, outcome);
                }
            }
            let outcome = self.rest.check(credentials);
            return self.counted(peer, outcome);
        };
        let Some(password) = credentials.password else {
            self.failed.record(peer, AuthDecision::BadCredentials, now);
            return AuthOutcome::Decided(AuthDecision::BadCredentials);
        };
        if self.verified.knows(user, password) {
            return AuthOutcome::Decided(AuthDecision::Allow);
        }
        let (user, hash, password) = (user.to_owned(), hash.to_owned(), password.to_vec());
        let (verified, failed, peer) =
            (self.verified.clone(), self.failed.clone(), peer.to_owned());
        // The slow hash runs on the blocking pool; the connection waits for it within its
        // connect deadline.
        let work = tokio::task::spawn_blocking(move || {
            let ok = verify(&hash, &password);
            if ok {
                verified.remember(&user, &password);
            }
            ok
        });
        AuthOutcome::Pending(Box::pin(async move {
            let decision = match work.await {
                Ok(true) => AuthDecision::Allow,
                _ => AuthDecision::BadCredentials,
            };
            failed.record(&peer, decision, Instant::now());
            decision
        }))
    }

    fn enhanced(&self) -> Option<&dyn EnhancedAuth> {
        self.rest.enhanced()
    }
}

impl FileAuthenticator {
    fn counted(&self, peer: &str, outcome: AuthOutcome) -> AuthOutcome {
        match outcome {
            AuthOutcome::Decided(decision) => {
                self.failed.record(peer, decision, Instant::now());
                AuthOutcome::Decided(decision)
            }
            AuthOutcome::Pending(pending) => {
                let (failed, peer) = (self.failed.clone(), peer.to_owned());
                AuthOutcome::Pending(Box::pin(async move {
                    let decision = pending.await;
                    failed.record(&peer, decision, Instant::now());
                    decision
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2_hashes_verify_and_wrong_passwords_do_not() {
        let h = hash(b"s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify(&h, b"s3cret"));
        assert!(!verify(&h, b"s3cret "));
    }

    #[test]
    fn pbkdf2_sha512_and_bcrypt_hashes_from_other_brokers_verify() {
        use pbkdf2::password_hash::PasswordHasher as _;
        let salt = SaltString::generate(&mut password_hash::rand_core::OsRng);
        let pbkdf2 = pbkdf2::Pbkdf2
            .hash_password_customized(
                b"migrated",
                Some(pbkdf2::Algorithm::Pbkdf2Sha512.ident()),
                None,
                pbkdf2::Params {
                    rounds: 1000,
                    output_length: 64,
                },
                &salt,
            )
            .unwrap()
            .to_string();
        assert!(pbkdf2.starts_with("$pbkdf2-sha512$"), "{pbkdf2}");
        assert!(verify(&pbkdf2, b"migrated"));
        assert!(!verify(&pbkdf2, b"other"));
        let bcrypt = bcrypt::hash(b"migrated", 4).unwrap();
        assert!(verify(&bcrypt, b"migrated"));
        assert!(!verify(&bcrypt, b"other"));
    }

    #[test]
    fn a_bad_line_is_named() {
        let err = PasswordFile::parse(Path::new("pw"), "# users\nalice:$argon2id$nonsense\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("pw:2: user \"alice\": not a hash"), "{err}");
        let err = PasswordFile::parse(Path::new("pw"), "bob\n")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "pw:1: expected user:hash");
        let h = hash(b"x").unwrap();
        let err = PasswordFile::parse(Path::new("pw"), &format!("a:{h}\na:{h}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("appears twice"), "{err}");
    }

    #[test]
    fn the_file_round_trips_through_set_and_remove() {
        let mut f = PasswordFile::default();
        f.set("alice", hash(b"a").unwrap());
        f.set("bob", hash(b"b").unwrap());
        f.set("alice", hash(b"a2").unwrap());
        assert!(f.remove("bob"));
        assert!(!f.remove("bob"));
        let back = PasswordFile::parse(Path::new("pw"), &f.to_text()).unwrap();
        assert_eq!(back.users().collect::<Vec<_>>(), ["alice"]);
        assert!(verify(back.get("alice").unwrap(), b"a2"));
    }

    #[test]
    fn failures_past_the_limit_block_the_address_for_the_window() {
        let limits = FailedLogins::new(3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(!limits.blocked("10.0.0.1:5000", t0));
            limits.record("10.0.0.1:5000", AuthDecision::BadCredentials, t0);
        }
        assert!(
            limits.blocked("10.0.0.1:6000", t0),
            "any port of that address"
        );
        assert!(!limits.blocked("10.0.0.2:5000", t0));
        assert!(!limits.blocked("10.0.0.1:5000", t0 + Duration::from_secs(61)));
    }
}

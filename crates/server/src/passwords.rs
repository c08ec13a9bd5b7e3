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
//! Verifying a slow hash takes tens of milliseconds of CPU (and argon2id 19 MiB), so it runs
//! on the blocking pool, never on a connection task, through the bounds of
//! [`crate::login_guard`]; a client whose password was verified once is checked against a
//! keyed digest of it afterwards (the cache holds no password). Login attempts are counted
//! per client address before anything is verified; past `max_failed_logins` a minute the
//! address is refused without verifying anything. A name the file does not hold is verified
//! against a dummy hash of the same cost, so the time a refusal takes does not tell which
//! names exist.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use petrel_codec::ReasonCode;
use petrel_engine::auth::{
    AuthDecision, AuthExchange, AuthOutcome, AuthStep, Authenticator, Credentials, EnhancedAuth,
};
use sha2::{Digest, Sha256};

use crate::login_guard::{Attempt, FailedLogins, HashGate, LoginState};

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

/// A hash of the same algorithm and cost as `model`, of a random password: what a login
/// with a name the file does not hold is verified against, so that it takes as long as a
/// known user's. Falls back to `model` itself (which no wrong password matches either).
fn dummy_like(model: &str) -> String {
    let mut random = [0u8; 32];
    let _ = getrandom::getrandom(&mut random);
    let made = match scheme(model) {
        Some("bcrypt") => model
            .parse::<bcrypt::HashParts>()
            .ok()
            .and_then(|parts| bcrypt::hash(random, parts.get_cost()).ok()),
        Some("argon2") => PasswordHash::new(model).ok().and_then(|h| {
            let algorithm = argon2::Algorithm::try_from(h.algorithm).ok()?;
            let version = argon2::Version::try_from(h.version.unwrap_or(0x13)).ok()?;
            let params = argon2::Params::try_from(&h).ok()?;
            let salt = SaltString::generate(&mut password_hash::rand_core::OsRng);
            argon2::Argon2::new(algorithm, version, params)
                .hash_password(&random, &salt)
                .ok()
                .map(|h| h.to_string())
        }),
        Some("pbkdf2") => PasswordHash::new(model).ok().and_then(|h| {
            let params = pbkdf2::Params::try_from(&h).ok()?;
            let salt = SaltString::generate(&mut password_hash::rand_core::OsRng);
            pbkdf2::Pbkdf2
                .hash_password_customized(&random, Some(h.algorithm), None, params, &salt)
                .ok()
                .map(|h| h.to_string())
        }),
        _ => None,
    };
    made.unwrap_or_else(|| model.to_owned())
}

/// The memory one check of `hash` is charged, in KiB: argon2's `m` parameter and a quarter
/// more for the thread that runs it and the allocator's slack (so that the budget bounds
/// what the process really grows by: 24 MiB at petrel's 19 MiB); bcrypt and pbkdf2 need
/// little memory, so they are charged 1 MiB (which still bounds how many run at once).
/// What a check that needs little memory (bcrypt, pbkdf2, SCRAM's PBKDF2) is charged.
const SMALL_HASH_KIB: u32 = 1024;

fn memory_cost_kib(hash: &str) -> u32 {
    const SMALL: u32 = SMALL_HASH_KIB;
    if scheme(hash) != Some("argon2") {
        return SMALL;
    }
    PasswordHash::new(hash)
        .ok()
        .and_then(|h| argon2::Params::try_from(&h).ok())
        .map_or(SMALL, |p| {
            let m = p.m_cost();
            m.saturating_add(m / 4).max(SMALL)
        })
}

impl PasswordFile {
    /// The hash most of the file's users have the parameters of (`$alg$v$params`), if any.
    fn typical(&self) -> Option<&str> {
        // What precedes the salt: `$2b$12` for bcrypt (salt and hash are one field),
        // `$argon2id$v=19$m=19456,t=2,p=1` for a PHC string (salt and hash are two).
        let shape = |h: &str| -> String {
            let fields: Vec<&str> = h.split('$').collect();
            let tail = if scheme(h) == Some("bcrypt") { 1 } else { 2 };
            fields[..fields.len().saturating_sub(tail)].join("$")
        };
        let mut counts: HashMap<String, (usize, &str)> = HashMap::new();
        for (_, hash) in &self.entries {
            counts.entry(shape(hash)).or_insert((0, hash)).0 += 1;
        }
        counts
            .into_values()
            .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)))
            .map(|(_, h)| h)
    }
}

/// How many logins may be checked at once, and how often one address may fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginLimits {
    /// Login attempts one address may make in a minute that do not succeed.
    pub max_failed_logins: u32,
    /// Bytes all password hash checks running at once may use.
    pub hash_memory: u64,
    /// Logins admitted for a hash check (waiting or running), broker-wide.
    pub max_pending: usize,
    /// The same, per client address.
    pub max_pending_per_address: u32,
}

impl LoginLimits {
    /// Only a failed-login limit: the defaults for the rest.
    pub fn failed(max_failed_logins: u32) -> LoginLimits {
        LoginLimits {
            max_failed_logins,
            hash_memory: 64 << 20,
            max_pending: 64,
            max_pending_per_address: 1,
        }
    }
}

/// The authenticator for a password file, in front of the users named in the config (which
/// also serve MQTT 5 SCRAM), with login attempts limited per address and hash checks bounded
/// by [`HashGate`].
pub struct FileAuthenticator {
    file: Arc<PasswordFile>,
    /// A hash like the file's users', for names the file does not hold; `None` when the file
    /// has no users.
    dummy: Option<Arc<str>>,
    /// Config users, anonymous access and certificate logins (shared with the checks on the
    /// blocking pool).
    rest: Arc<dyn Authenticator>,
    /// The names of the config users, so that the hook is asked only about others.
    config_users: std::collections::HashSet<String>,
    /// Decides on user names neither the file nor the config knows.
    hook: Option<Arc<crate::auth_hook::HttpHook>>,
    failed: Arc<FailedLogins>,
    gate: Arc<HashGate>,
    verified: Arc<Verified>,
}

impl FileAuthenticator {
    pub fn new(
        file: Option<PasswordFile>,
        rest: Box<dyn Authenticator>,
        max_failed_logins: u32,
    ) -> FileAuthenticator {
        FileAuthenticator::with_hook(
            file,
            rest,
            Default::default(),
            None,
            LoginLimits::failed(max_failed_logins),
            &LoginState::default(),
        )
    }

    pub fn with_hook(
        file: Option<PasswordFile>,
        rest: Box<dyn Authenticator>,
        config_users: std::collections::HashSet<String>,
        hook: Option<Arc<crate::auth_hook::HttpHook>>,
        limits: LoginLimits,
        state: &LoginState,
    ) -> FileAuthenticator {
        let mut key = [0u8; 32];
        // Without randomness the cache key is fixed: the digests still hold no password.
        let _ = getrandom::getrandom(&mut key);
        let file = file.unwrap_or_default();
        let dummy = file.typical().map(|h| Arc::from(dummy_like(h)));
        FileAuthenticator {
            file: Arc::new(file),
            dummy,
            rest: Arc::from(rest),
            config_users,
            hook,
            failed: state.failed(limits.max_failed_logins),
            gate: state.gate(
                limits.hash_memory,
                limits.max_pending,
                limits.max_pending_per_address,
            ),
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
        // Counted before anything is verified: however many CONNECTs an address sends at
        // once, at most `max_failed_logins` of them are checked in a window.
        let Some(attempt) = self.failed.begin(peer, now) else {
            self.failed.log_locked_out(peer, now);
            return AuthOutcome::Decided(AuthDecision::NotAuthorized);
        };
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
                    return counted(attempt, outcome);
                }
            }
            let (Some(_), Some(_)) = (credentials.username, credentials.password) else {
                // Anonymous, certificate, or a name without a password: nothing to hash.
                return counted(attempt, self.rest.check(credentials));
            };
            // A config user's PBKDF2 (or an unknown name's dummy one) on the blocking pool,
            // and, when there is a password file, a dummy hash like its users': a name the
            // file does not hold costs what one it holds does.
            let (rest, owned, dummy) = (
                self.rest.clone(),
                OwnedCredentials::from(credentials),
                self.dummy.clone(),
            );
            let cost = dummy.as_deref().map_or(SMALL_HASH_KIB, memory_cost_kib);
            return self.hashed(attempt, peer, cost, move || {
                if let Some(dummy) = &dummy {
                    let _ = verify(dummy, &owned.password);
                }
                rest.authenticate(&owned.borrow())
            });
        };
        let Some(password) = credentials.password else {
            attempt.finish(AuthDecision::BadCredentials);
            return AuthOutcome::Decided(AuthDecision::BadCredentials);
        };
        if self.verified.knows(user, password) {
            attempt.finish(AuthDecision::Allow);
            return AuthOutcome::Decided(AuthDecision::Allow);
        }
        // What a config user's (or an unknown name's) PBKDF2 costs, when there are config
        // users, so the two sources cannot be told apart by time either.
        let rest = (!self.config_users.is_empty()).then(|| self.rest.clone());
        let (verified, owned, hash) = (
            self.verified.clone(),
            OwnedCredentials::from(credentials),
            hash.to_owned(),
        );
        self.hashed(attempt, peer, memory_cost_kib(&hash), move || {
            if let Some(rest) = rest {
                let _ = rest.authenticate(&owned.borrow());
            }
            let password = owned.password.as_slice();
            if verify(&hash, password) {
                verified.remember(owned.username.as_str(), password);
                AuthDecision::Allow
            } else {
                AuthDecision::BadCredentials
            }
        })
    }

    fn enhanced(&self) -> Option<&dyn EnhancedAuth> {
        self.rest.enhanced().map(|_| self as &dyn EnhancedAuth)
    }
}

impl FileAuthenticator {
    /// Runs `check` (password hashing) through the gate, charged `cost_kib` of the memory
    /// budget, on the blocking pool. Refused as busy, without checking, when the gate has no
    /// room for the address or the broker.
    fn hashed(
        &self,
        attempt: Attempt,
        peer: &str,
        cost_kib: u32,
        check: impl FnOnce() -> AuthDecision + Send + 'static,
    ) -> AuthOutcome {
        let ticket = match self.gate.admit(peer) {
            Ok(ticket) => ticket,
            Err(full) => {
                self.gate.log_busy(peer, full);
                attempt.finish(AuthDecision::Busy);
                return AuthOutcome::Decided(AuthDecision::Busy);
            }
        };
        AuthOutcome::Pending(Box::pin(async move {
            let decision = ticket
                .verify(cost_kib, check)
                .await
                .unwrap_or(AuthDecision::BadCredentials);
            attempt.finish(decision);
            decision
        }))
    }
}

/// CONNECT's credentials, owned, for a check on the blocking pool.
struct OwnedCredentials {
    client_id: String,
    username: petrel_codec::MqttString,
    password: Vec<u8>,
    peer: String,
    certificate_identity: Option<String>,
}

impl OwnedCredentials {
    /// Only built for credentials with a user name and a password.
    fn from(c: &Credentials<'_>) -> OwnedCredentials {
        OwnedCredentials {
            client_id: c.client_id.to_owned(),
            username: c.username.cloned().unwrap_or_default(),
            password: c.password.unwrap_or_default().to_vec(),
            peer: c.peer.to_owned(),
            certificate_identity: c.certificate_identity.map(str::to_owned),
        }
    }

    fn borrow(&self) -> Credentials<'_> {
        Credentials {
            client_id: &self.client_id,
            username: Some(&self.username),
            password: Some(&self.password),
            peer: &self.peer,
            certificate_identity: self.certificate_identity.as_deref(),
        }
    }
}

/// An outcome whose decision also settles `attempt`.
fn counted(attempt: Attempt, outcome: AuthOutcome) -> AuthOutcome {
    match outcome {
        AuthOutcome::Decided(decision) => {
            attempt.finish(decision);
            AuthOutcome::Decided(decision)
        }
        AuthOutcome::Pending(pending) => AuthOutcome::Pending(Box::pin(async move {
            let decision = pending.await;
            attempt.finish(decision);
            decision
        })),
    }
}

impl EnhancedAuth for FileAuthenticator {
    /// The config users' exchange (SCRAM-SHA-256), under the same failed-login limit as
    /// passwords: a locked-out address is refused (0x87) at its first message, and an
    /// exchange counts as an attempt from its start until it succeeds.
    fn start_exchange(&self, method: &str, peer: &str) -> Option<Box<dyn AuthExchange>> {
        let inner = self.rest.enhanced()?.start_exchange(method, peer)?;
        let now = Instant::now();
        match self.failed.begin(peer, now) {
            Some(attempt) => Some(Box::new(CountedExchange {
                inner,
                attempt: Some(attempt),
            })),
            None => {
                self.failed.log_locked_out(peer, now);
                Some(Box::new(LockedOut))
            }
        }
    }
}

/// An exchange whose outcome settles its counted attempt.
struct CountedExchange {
    inner: Box<dyn AuthExchange>,
    attempt: Option<Attempt>,
}

impl AuthExchange for CountedExchange {
    fn step(&mut self, client_data: &[u8]) -> AuthStep {
        let step = self.inner.step(client_data);
        let decision = match &step {
            AuthStep::Continue(_) => return step,
            AuthStep::Success(_) => AuthDecision::Allow,
            AuthStep::Failure(code) if *code == ReasonCode::BAD_USER_NAME_OR_PASSWORD => {
                AuthDecision::BadCredentials
            }
            AuthStep::Failure(_) => AuthDecision::NotAuthorized,
        };
        if let Some(attempt) = self.attempt.take() {
            attempt.finish(decision);
        }
        step
    }

    fn user(&self) -> Option<&str> {
        self.inner.user()
    }
}

/// The exchange a locked-out address gets: refused at once, nothing verified.
struct LockedOut;

impl AuthExchange for LockedOut {
    fn step(&mut self, _: &[u8]) -> AuthStep {
        AuthStep::Failure(ReasonCode::NOT_AUTHORIZED)
    }

    fn user(&self) -> Option<&str> {
        None
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
    fn unknown_names_are_checked_against_a_hash_of_the_same_cost() {
        let argon = hash(b"a").unwrap();
        let dummy = dummy_like(&argon);
        assert_ne!(dummy, argon, "a hash of its own");
        let params = |h: &str| argon2::Params::try_from(&PasswordHash::new(h).unwrap()).unwrap();
        assert_eq!(params(&dummy), params(&argon));
        assert!(!verify(&dummy, b"a"));
        assert_eq!(memory_cost_kib(&dummy), 19_456 + 19_456 / 4);
        let bcrypt = bcrypt::hash(b"b", 5).unwrap();
        let dummy = dummy_like(&bcrypt);
        assert_ne!(dummy, bcrypt);
        assert_eq!(
            dummy.parse::<bcrypt::HashParts>().unwrap().get_cost(),
            5,
            "{dummy}"
        );
        assert_eq!(memory_cost_kib(&dummy), 1024);
        // The file's typical hash is the most common shape: two bcrypt cost 4, one cost 5.
        let mut f = PasswordFile::default();
        f.set("x", bcrypt::hash(b"x", 5).unwrap());
        f.set("y", bcrypt::hash(b"y", 4).unwrap());
        f.set("z", bcrypt::hash(b"z", 4).unwrap());
        let typical = f.typical().unwrap();
        assert_eq!(typical.parse::<bcrypt::HashParts>().unwrap().get_cost(), 4);
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
}

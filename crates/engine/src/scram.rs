//! SCRAM-SHA-256 (RFC 5802, RFC 7677), the server side, as an MQTT 5 enhanced authentication
//! method (§4.12): the client proves it knows the password without sending it, and the
//! server proves it holds the user's keys.
//!
//! ```text
//! CONNECT  auth method "SCRAM-SHA-256", data  n,,n=user,r=cnonce
//! AUTH 18  data  r=cnonce+snonce,s=salt,i=iterations
//! AUTH 18  data  c=biws,r=cnonce+snonce,p=proof
//! CONNACK  data  v=server-signature              (or CONNACK 0x86 on a wrong proof)
//! ```
//!
//! The primitives (SHA-256, HMAC, PBKDF2, base64, the random nonce) come from RustCrypto and
//! `getrandom`; this module is only the message handling. Channel binding is not offered
//! (gs2 header `n` or `y`). An unknown user gets a well-formed challenge with a salt derived
//! from the name with a secret ([`FakeCredentials`]), and fails at the proof like a wrong
//! password, so the exchange does not tell which user names exist: without the secret the
//! salt cannot be told from a real one, and with a secret that outlives restarts it is as
//! stable as a real one.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use petrel_codec::ReasonCode;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::auth::{AuthExchange, AuthStep};

/// The MQTT Authentication Method name.
pub const METHOD: &str = "SCRAM-SHA-256";

/// PBKDF2 iterations for credentials derived here (RFC 7677's minimum).
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// Bounds on what a stored credential may ask for: a typo must not make every login take
/// minutes.
const MAX_ITERATIONS: u32 = 1_000_000;

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail here.
    let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable_hmac());
    mac.update(data);
    mac.finalize().into_bytes().into()
}

#[cold]
fn unreachable_hmac() -> HmacSha256 {
    HmacSha256::new_from_slice(&[0u8; 32]).expect("a 32-byte HMAC key")
}

/// What the server keeps for one user: the salt, the iteration count, and the two keys
/// derived from the salted password (never the password).
#[derive(Clone, PartialEq, Eq)]
pub struct ScramCredentials {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl fmt::Debug for ScramCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are secrets: enough to tell two credentials apart in a test, no more.
        f.debug_struct("ScramCredentials")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl ScramCredentials {
    /// Derives the keys for `password` with `salt` and `iterations`.
    pub fn from_password(password: &[u8], salt: &[u8], iterations: u32) -> ScramCredentials {
        let salted = salted_password(password, salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        ScramCredentials {
            salt: salt.to_vec(),
            iterations,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// Credentials for `password` with a fresh random 16-byte salt.
    pub fn generate(password: &[u8]) -> Result<ScramCredentials, getrandom::Error> {
        let mut salt = [0u8; 16];
        getrandom::getrandom(&mut salt)?;
        Ok(ScramCredentials::from_password(
            password,
            &salt,
            DEFAULT_ITERATIONS,
        ))
    }

    /// Whether `password` is the one these credentials were derived from: what checking a
    /// CONNECT user name and password costs (one PBKDF2).
    pub fn verify_password(&self, password: &[u8]) -> bool {
        let salted = salted_password(password, &self.salt, self.iterations);
        let stored: [u8; 32] = Sha256::digest(hmac(&salted, b"Client Key")).into();
        bool::from(stored.ct_eq(&self.stored_key))
    }

    /// Parses the textual form `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`
    /// (base64; the form PostgreSQL also uses).
    pub fn parse(text: &str) -> Result<ScramCredentials, String> {
        let rest = text
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or("must start with \"SCRAM-SHA-256$\"")?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or("expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>")?;
        let (iterations, salt) = params
            .split_once(':')
            .ok_or("expected <iterations>:<salt> after \"SCRAM-SHA-256$\"")?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| format!("iteration count {iterations:?} is not a number"))?;
        if !(1..=MAX_ITERATIONS).contains(&iterations) {
            return Err(format!(
                "iteration count must be between 1 and {MAX_ITERATIONS} (got {iterations})"
            ));
        }
        let salt = B64
            .decode(salt)
            .map_err(|e| format!("salt is not base64: {e}"))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or("expected <StoredKey>:<ServerKey> after the salt")?;
        let key = |name: &str, text: &str| -> Result<[u8; 32], String> {
            let bytes = B64
                .decode(text)
                .map_err(|e| format!("{name} is not base64: {e}"))?;
            bytes
                .try_into()
                .map_err(|b: Vec<u8>| format!("{name} must be 32 bytes (got {})", b.len()))
        };
        Ok(ScramCredentials {
            salt,
            iterations,
            stored_key: key("StoredKey", stored)?,
            server_key: key("ServerKey", server)?,
        })
    }
}

impl fmt::Display for ScramCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// Credentials for user names that do not exist, derived from the name with a secret: the
/// same salt for the same name every time (as a real user's), unpredictable without the
/// secret, and the iteration count most real users have. Also the dummy a CONNECT password
/// of an unknown user is checked against, so that it costs the same PBKDF2.
pub struct FakeCredentials {
    secret: [u8; 32],
    iterations: u32,
}

impl FakeCredentials {
    pub fn new(secret: [u8; 32], users: &HashMap<String, ScramCredentials>) -> FakeCredentials {
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for c in users.values() {
            *counts.entry(c.iterations).or_default() += 1;
        }
        let iterations = counts
            .into_iter()
            .max_by_key(|&(iterations, n)| (n, iterations))
            .map_or(DEFAULT_ITERATIONS, |(iterations, _)| iterations);
        FakeCredentials { secret, iterations }
    }

    /// What `user` would have if it existed. Its keys are not derived from any password
    /// (no proof can match them by more than chance).
    pub fn for_user(&self, user: &str) -> ScramCredentials {
        let salt = derive(&self.secret, "fake salt", user)[..16].to_vec();
        ScramCredentials {
            salt,
            iterations: self.iterations,
            stored_key: derive(&self.secret, "fake stored key", user),
            server_key: derive(&self.secret, "fake server key", user),
        }
    }
}

/// A value derived from `secret` for `label` and `name` (HMAC-SHA-256): salts and keys that
/// are stable for a name and unpredictable without the secret.
pub fn derive(secret: &[u8; 32], label: &str, name: &str) -> [u8; 32] {
    let mut data = Vec::with_capacity(label.len() + 1 + name.len());
    data.extend_from_slice(label.as_bytes());
    data.push(0);
    data.extend_from_slice(name.as_bytes());
    hmac(secret, &data)
}

fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
    out
}

enum State {
    ClientFirst,
    ClientFinal {
        /// `n,,` (or `y,,`) as the client sent it: `c=` must repeat it.
        gs2_header: String,
        client_first_bare: String,
        server_first: String,
        nonce: String,
        /// Fake ones for an unknown user: the proof then fails like a wrong password.
        credentials: ScramCredentials,
        known: bool,
    },
    Done,
}

/// One SCRAM-SHA-256 exchange with one client.
pub struct ScramExchange {
    users: Arc<HashMap<String, ScramCredentials>>,
    fake: Arc<FakeCredentials>,
    state: State,
    /// The user name of the client-first message; proven once the exchange succeeds.
    user: Option<String>,
    proven: bool,
}

impl ScramExchange {
    pub fn new(
        users: Arc<HashMap<String, ScramCredentials>>,
        fake: Arc<FakeCredentials>,
    ) -> ScramExchange {
        ScramExchange {
            users,
            fake,
            state: State::ClientFirst,
            user: None,
            proven: false,
        }
    }

    fn client_first(&mut self, message: &str) -> Result<AuthStep, &'static str> {
        // gs2-header: channel binding flag, optional authzid, then the bare message.
        let (flag, rest) = message.split_once(',').ok_or("no gs2 header")?;
        if flag != "n" && flag != "y" {
            return Err("channel binding is not supported");
        }
        let (authzid, bare) = rest.split_once(',').ok_or("no gs2 header")?;
        if !authzid.is_empty() {
            return Err("authorization identity is not supported");
        }
        let gs2_header = format!("{flag},{authzid},");
        let mut user = None;
        let mut client_nonce = None;
        for attribute in bare.split(',') {
            match attribute.split_once('=') {
                Some(("n", v)) => user = Some(decode_saslname(v)?),
                Some(("r", v))
                    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic() && b != b',') =>
                {
                    client_nonce = Some(v)
                }
                Some(("m", _)) => return Err("mandatory extension not supported"),
                _ => {}
            }
        }
        let user = user.ok_or("no user name")?;
        let client_nonce = client_nonce.ok_or("no valid client nonce")?;
        let mut random = [0u8; 18];
        getrandom::getrandom(&mut random).map_err(|_| "no randomness for the server nonce")?;
        let nonce = format!("{client_nonce}{}", B64.encode(random));
        self.user = Some(user.clone());
        let (credentials, known) = match self.users.get(&user) {
            Some(c) => (c.clone(), true),
            None => (self.fake.for_user(&user), false),
        };
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&credentials.salt),
            credentials.iterations
        );
        let reply = server_first.clone().into_bytes();
        self.state = State::ClientFinal {
            gs2_header,
            client_first_bare: bare.to_owned(),
            server_first,
            nonce,
            credentials,
            known,
        };
        Ok(AuthStep::Continue(reply))
    }

    fn client_final(&mut self, message: &str) -> Result<AuthStep, &'static str> {
        let State::ClientFinal {
            gs2_header,
            client_first_bare,
            server_first,
            nonce,
            credentials,
            known,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err("exchange already finished");
        };
        let (without_proof, proof) = message.rsplit_once(",p=").ok_or("no proof")?;
        let mut channel = None;
        let mut echoed_nonce = None;
        for attribute in without_proof.split(',') {
            match attribute.split_once('=') {
                Some(("c", v)) => channel = Some(v),
                Some(("r", v)) => echoed_nonce = Some(v),
                _ => {}
            }
        }
        if channel != Some(B64.encode(gs2_header.as_bytes()).as_str()) {
            return Err("channel binding data does not match the gs2 header");
        }
        if echoed_nonce != Some(nonce.as_str()) {
            return Err("nonce does not match");
        }
        let proof = B64.decode(proof).map_err(|_| "proof is not base64")?;
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&credentials.stored_key, auth_message.as_bytes());
        if proof.len() != 32 {
            return Ok(AuthStep::Failure(ReasonCode::BAD_USER_NAME_OR_PASSWORD));
        }
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key
            .iter_mut()
            .zip(proof.iter().zip(client_signature.iter()))
        {
            *k = p ^ s;
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        // An unknown user's fake keys take the same steps, and fail even by chance.
        if !bool::from(stored.ct_eq(&credentials.stored_key)) || !known {
            return Ok(AuthStep::Failure(ReasonCode::BAD_USER_NAME_OR_PASSWORD));
        }
        let server_signature = hmac(&credentials.server_key, auth_message.as_bytes());
        Ok(AuthStep::Success(Some(
            format!("v={}", B64.encode(server_signature)).into_bytes(),
        )))
    }
}

/// `=2C` and `=3D` stand for `,` and `=` in a SCRAM user name (RFC 5802 §5.1).
fn decode_saslname(name: &str) -> Result<String, &'static str> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i + 1..i + 3) {
            Some("2C") => out.push(','),
            Some("3D") => out.push('='),
            _ => return Err("bad escape in the user name"),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    if out.is_empty() {
        return Err("empty user name");
    }
    Ok(out)
}

impl AuthExchange for ScramExchange {
    fn step(&mut self, client_data: &[u8]) -> AuthStep {
        let Ok(message) = std::str::from_utf8(client_data) else {
            self.state = State::Done;
            return AuthStep::Failure(ReasonCode::MALFORMED_PACKET);
        };
        let result = match self.state {
            State::ClientFirst => self.client_first(message),
            State::ClientFinal { .. } => self.client_final(message),
            State::Done => Err("exchange already finished"),
        };
        let step = result.unwrap_or_else(|why| {
            tracing::debug!(why, "SCRAM-SHA-256 exchange refused");
            self.state = State::Done;
            AuthStep::Failure(ReasonCode::NOT_AUTHORIZED)
        });
        self.proven = matches!(step, AuthStep::Success(_));
        step
    }

    fn user(&self) -> Option<&str> {
        self.user.as_deref().filter(|_| self.proven)
    }
}

/// The client side of the exchange, for tests and tools: what a client computes from the
/// password and the server's challenge.
pub mod client {
    use super::*;

    /// The client-first message for `user` with `nonce`.
    pub fn first(user: &str, nonce: &str) -> String {
        let name = user.replace('=', "=3D").replace(',', "=2C");
        format!("n,,n={name},r={nonce}")
    }

    /// The client-final message answering `server_first`, and the server signature the
    /// server must then send (`v=...`).
    pub fn last(user: &str, nonce: &str, password: &str, server_first: &str) -> (String, String) {
        let mut combined = "";
        let mut salt = Vec::new();
        let mut iterations = 0;
        for attribute in server_first.split(',') {
            match attribute.split_once('=') {
                Some(("r", v)) => combined = v,
                Some(("s", v)) => salt = B64.decode(v).unwrap_or_default(),
                Some(("i", v)) => iterations = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        let salted = salted_password(password.as_bytes(), &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c=biws,r={combined}");
        let auth_message = format!(
            "{},{server_first},{without_proof}",
            &first(user, nonce)[3..]
        );
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature.iter())
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hmac(&salted, b"Server Key");
        let server_signature = hmac(&server_key, auth_message.as_bytes());
        (
            format!("{without_proof},p={}", B64.encode(proof)),
            format!("v={}", B64.encode(server_signature)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(user: &str, password: &str) -> Arc<HashMap<String, ScramCredentials>> {
        let mut users = HashMap::new();
        users.insert(
            user.to_owned(),
            ScramCredentials::from_password(password.as_bytes(), b"0123456789abcdef", 4096),
        );
        Arc::new(users)
    }

    fn exchange(users: Arc<HashMap<String, ScramCredentials>>) -> ScramExchange {
        exchange_with(users, [7; 32])
    }

    fn exchange_with(
        users: Arc<HashMap<String, ScramCredentials>>,
        secret: [u8; 32],
    ) -> ScramExchange {
        let fake = Arc::new(FakeCredentials::new(secret, &users));
        ScramExchange::new(users, fake)
    }

    fn challenge(ex: &mut ScramExchange, user: &str) -> String {
        let AuthStep::Continue(first) = ex.step(client::first(user, "abc").as_bytes()) else {
            panic!("a challenge for {user}");
        };
        String::from_utf8(first).unwrap()
    }

    /// The salt and iterations of a challenge (the nonce differs every time).
    fn salt_of(first: &str) -> &str {
        &first[first.find(",s=").unwrap()..]
    }

    #[test]
    fn unknown_users_get_salts_that_are_stable_and_secret() {
        let users = store("alice", "secret");
        let mallory = salt_of(&challenge(&mut exchange(users.clone()), "mallory")).to_owned();
        assert_eq!(
            salt_of(&challenge(&mut exchange(users.clone()), "mallory")),
            mallory,
            "the same secret, the same salt (as after a restart)"
        );
        assert_ne!(
            salt_of(&challenge(
                &mut exchange_with(users.clone(), [8; 32]),
                "mallory"
            )),
            mallory,
            "the salt depends on the secret, not only on the name"
        );
        let old_public_salt = B64.encode(&Sha256::digest(b"petrel-unknown-user:mallory")[..16]);
        assert!(!mallory.contains(&old_public_salt), "{mallory}");
        assert!(
            mallory.ends_with(",i=4096"),
            "alice's iteration count: {mallory}"
        );
        assert_ne!(salt_of(&challenge(&mut exchange(users), "eve")), mallory);
    }

    /// RFC 7677 §3's example exchange, replayed against the server side.
    #[test]
    fn rfc7677_test_vector() {
        let mut users = HashMap::new();
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        users.insert(
            "user".to_owned(),
            ScramCredentials::from_password(b"pencil", &salt, 4096),
        );
        let mut ex = exchange(Arc::new(users));
        let AuthStep::Continue(first) = ex.step(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO") else {
            panic!("expected a challenge");
        };
        let first = String::from_utf8(first).unwrap();
        assert!(first.starts_with("r=rOprNGfwEbeRWgbNEkqO"));
        assert!(first.ends_with(",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"));
        // The RFC's server nonce differs from ours, so compute the client's answer for ours.
        let (last, want) = client::last("user", "rOprNGfwEbeRWgbNEkqO", "pencil", &first);
        assert_eq!(ex.user(), None, "not proven before the proof");
        assert_eq!(
            ex.step(last.as_bytes()),
            AuthStep::Success(Some(want.into_bytes()))
        );
        assert_eq!(
            ex.user(),
            Some("user"),
            "the proven name is the client-first's"
        );

        // And the RFC's own numbers for its own nonce: the client proof and server signature.
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let (last, v) = client::last("user", "rOprNGfwEbeRWgbNEkqO", "pencil", server_first);
        assert_eq!(
            last,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert_eq!(v, "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    #[test]
    fn wrong_password_and_unknown_user_fail_alike() {
        for (user, password) in [("alice", "wrong"), ("mallory", "secret")] {
            let mut ex = exchange(store("alice", "secret"));
            let AuthStep::Continue(first) = ex.step(client::first(user, "abc").as_bytes()) else {
                panic!("a challenge even for {user}");
            };
            let first = String::from_utf8(first).unwrap();
            let (last, _) = client::last(user, "abc", password, &first);
            assert_eq!(
                ex.step(last.as_bytes()),
                AuthStep::Failure(ReasonCode::BAD_USER_NAME_OR_PASSWORD),
                "{user}"
            );
        }
    }

    #[test]
    fn tampered_messages_are_refused() {
        let mut ex = exchange(store("alice", "secret"));
        assert_eq!(
            ex.step(b"p=tls-unique,,n=alice,r=x"),
            AuthStep::Failure(ReasonCode::NOT_AUTHORIZED)
        );
        let mut ex = exchange(store("alice", "secret"));
        let AuthStep::Continue(first) = ex.step(client::first("alice", "abc").as_bytes()) else {
            panic!("challenge");
        };
        let first = String::from_utf8(first).unwrap();
        let (last, _) = client::last("alice", "abc", "secret", &first);
        let replaced_nonce = last.replace("r=abc", "r=xyz");
        assert_eq!(
            ex.step(replaced_nonce.as_bytes()),
            AuthStep::Failure(ReasonCode::NOT_AUTHORIZED)
        );
        assert_eq!(
            ex.step(last.as_bytes()),
            AuthStep::Failure(ReasonCode::NOT_AUTHORIZED),
            "an exchange does not restart after a failure"
        );
    }

    #[test]
    fn credentials_round_trip_through_text_and_check_passwords() {
        let c = ScramCredentials::generate(b"secret").unwrap();
        let text = c.to_string();
        assert!(text.starts_with("SCRAM-SHA-256$4096:"));
        assert_eq!(ScramCredentials::parse(&text).unwrap(), c);
        assert!(c.verify_password(b"secret"));
        assert!(!c.verify_password(b"Secret"));
        for bad in [
            "md5$abc",
            "SCRAM-SHA-256$x:AAAA$AAAA:AAAA",
            "SCRAM-SHA-256$0:AAAA$AAAA:AAAA",
            "SCRAM-SHA-256$4096:AAAA$AAAA:AAAA",
            "SCRAM-SHA-256$4096:AAAA",
        ] {
            assert!(ScramCredentials::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn user_names_with_escapes() {
        assert_eq!(decode_saslname("a=2Cb=3Dc").unwrap(), "a,b=c");
        assert!(decode_saslname("a=2").is_err());
        assert!(decode_saslname("").is_err());
    }
}

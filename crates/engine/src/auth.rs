//! Authentication behind a trait, so the connection state machine does not care where
//! credentials are checked (a password file, an HTTP hook, a certificate).

use std::future::Future;
use std::pin::Pin;

use petrel_codec::{MqttString, ReasonCode};

/// What a connecting client presents.
pub struct Credentials<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a MqttString>,
    /// The raw password bytes; never logged.
    pub password: Option<&'a [u8]>,
    /// The peer's address as text, for rate limits and logs.
    pub peer: &'a str,
    /// The name from a client certificate the transport verified (mutual TLS), if any.
    pub certificate_identity: Option<&'a str>,
}

/// Who a client proved to be: the user name it logged in with and the identity its verified
/// client certificate names (either, both or neither: anonymous). A session belongs to the
/// login that made it, so a client id alone never opens another user's session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Login {
    pub username: Option<String>,
    pub certificate: Option<String>,
}

impl std::fmt::Display for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.username, &self.certificate) {
            (Some(u), Some(c)) => write!(f, "user {u:?} with certificate {c:?}"),
            (Some(u), None) => write!(f, "user {u:?}"),
            (None, Some(c)) => write!(f, "certificate {c:?}"),
            (None, None) => f.write_str("anonymous"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthDecision {
    Allow,
    /// Wrong user name or password (v5 0x86, 3.1.1 return code 4).
    BadCredentials,
    /// Known but not allowed to connect (v5 0x87, 3.1.1 return code 5).
    NotAuthorized,
    /// Not checked: too many logins are being checked already (v5 0x89 Server busy, 3.1.1
    /// return code 3 Server unavailable). Nothing was verified, so nothing is learnt.
    Busy,
}

impl AuthDecision {
    pub fn reason_code(self) -> ReasonCode {
        match self {
            AuthDecision::Allow => ReasonCode::SUCCESS,
            AuthDecision::BadCredentials => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            AuthDecision::NotAuthorized => ReasonCode::NOT_AUTHORIZED,
            AuthDecision::Busy => ReasonCode::SERVER_BUSY,
        }
    }
}

/// A decision that takes time: a slow password hash computed off the connection's task, a
/// remote identity service. The connection reads nothing more meanwhile and gives up at its
/// connect deadline (dropping the future).
pub type PendingDecision = Pin<Box<dyn Future<Output = AuthDecision> + Send>>;

pub enum AuthOutcome {
    Decided(AuthDecision),
    Pending(PendingDecision),
}

pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, credentials: &Credentials<'_>) -> AuthDecision;

    /// What CONNECT's credentials get: decided now (the default: [`Self::authenticate`]) or
    /// later.
    fn check(&self, credentials: &Credentials<'_>) -> AuthOutcome {
        AuthOutcome::Decided(self.authenticate(credentials))
    }

    /// The enhanced authentication (MQTT 5 AUTH exchanges) this authenticator offers, if any.
    fn enhanced(&self) -> Option<&dyn EnhancedAuth> {
        None
    }
}

/// Accepts every client: the embedded default on a loopback listener. Later configuration
/// replaces it with a password file or hook.
pub struct AllowAll;

impl Authenticator for AllowAll {
    fn authenticate(&self, _: &Credentials<'_>) -> AuthDecision {
        AuthDecision::Allow
    }
}

/// One step of an enhanced authentication exchange (§4.12).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthStep {
    /// Send this Authentication Data to the client in AUTH 0x18 and wait for its answer.
    Continue(Vec<u8>),
    /// Authenticated; the data (if any) goes to the client with the CONNACK (or AUTH 0x00).
    Success(Option<Vec<u8>>),
    /// Refused with this reason code.
    Failure(ReasonCode),
}

/// The server side of one enhanced authentication exchange, fed the client's Authentication
/// Data from CONNECT and then from each AUTH packet.
pub trait AuthExchange: Send {
    fn step(&mut self, client_data: &[u8]) -> AuthStep;

    /// The user name the exchange proved, once it has succeeded. The client then is that
    /// user (in topic rules and as its sessions' owner), whatever its CONNECT's User Name
    /// field says; `None` for a method that proves no name. No default: a wrapper that
    /// forgot to pass it on would let a client name any user it liked.
    fn user(&self) -> Option<&str>;
}

/// An [`Authenticator`] that also offers enhanced authentication methods.
pub trait EnhancedAuth {
    /// An exchange for `method` with the client at `peer` (its address, for rate limits),
    /// or `None` when it is not offered (CONNACK 0x8C).
    fn start_exchange(&self, method: &str, peer: &str) -> Option<Box<dyn AuthExchange>>;
}

/// Users with SCRAM-SHA-256 credentials: checks CONNECT user name and password against them,
/// and runs the SCRAM-SHA-256 enhanced authentication exchange for MQTT 5 clients. Passwords
/// themselves are never kept, only the salted keys RFC 5802 derives from them.
///
/// Neither path tells which user names exist: an unknown name's password is checked against
/// a dummy credential of the same cost, and its SCRAM challenge carries a salt derived from
/// the name with a secret (see [`crate::scram::FakeCredentials`]).
pub struct UserStore {
    users: std::sync::Arc<std::collections::HashMap<String, crate::scram::ScramCredentials>>,
    allow_anonymous: bool,
    fake: std::sync::Arc<crate::scram::FakeCredentials>,
}

impl UserStore {
    /// A store whose unknown users get credentials derived with `secret` (keep it stable
    /// across restarts, and private, so that they look like real ones).
    pub fn new(
        users: std::collections::HashMap<String, crate::scram::ScramCredentials>,
        allow_anonymous: bool,
        secret: [u8; 32],
    ) -> UserStore {
        let fake = crate::scram::FakeCredentials::new(secret, &users);
        UserStore {
            users: std::sync::Arc::new(users),
            allow_anonymous,
            fake: std::sync::Arc::new(fake),
        }
    }
}

impl Authenticator for UserStore {
    fn authenticate(&self, credentials: &Credentials<'_>) -> AuthDecision {
        let Some(user) = credentials.username else {
            // A client certificate verified against the listener's CA is a login.
            if credentials.certificate_identity.is_some() {
                return AuthDecision::Allow;
            }
            return if self.allow_anonymous {
                AuthDecision::Allow
            } else {
                AuthDecision::NotAuthorized
            };
        };
        let Some(password) = credentials.password else {
            return AuthDecision::BadCredentials;
        };
        match self.users.get(user.as_str()) {
            Some(stored) if stored.verify_password(password) => AuthDecision::Allow,
            Some(_) => AuthDecision::BadCredentials,
            None => {
                // The same PBKDF2 a known user costs, so the time does not tell.
                let _ = self.fake.for_user(user.as_str()).verify_password(password);
                AuthDecision::BadCredentials
            }
        }
    }

    fn enhanced(&self) -> Option<&dyn EnhancedAuth> {
        Some(self)
    }
}

impl EnhancedAuth for UserStore {
    fn start_exchange(&self, method: &str, _peer: &str) -> Option<Box<dyn AuthExchange>> {
        (method == crate::scram::METHOD).then(|| {
            Box::new(crate::scram::ScramExchange::new(
                self.users.clone(),
                self.fake.clone(),
            )) as _
        })
    }
}

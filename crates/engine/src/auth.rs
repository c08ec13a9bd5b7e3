//! Authentication behind a trait, so the connection state machine does not care where
//! credentials are checked (a password file, an HTTP hook, a certificate).

use petrel_codec::{MqttString, ReasonCode};

/// What a connecting client presents.
pub struct Credentials<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a MqttString>,
    /// The raw password bytes; never logged.
    pub password: Option<&'a [u8]>,
    /// The peer's address as text, for rate limits and logs.
    pub peer: &'a str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthDecision {
    Allow,
    /// Wrong user name or password (v5 0x86, 3.1.1 return code 4).
    BadCredentials,
    /// Known but not allowed to connect (v5 0x87, 3.1.1 return code 5).
    NotAuthorized,
}

impl AuthDecision {
    pub fn reason_code(self) -> ReasonCode {
        match self {
            AuthDecision::Allow => ReasonCode::SUCCESS,
            AuthDecision::BadCredentials => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            AuthDecision::NotAuthorized => ReasonCode::NOT_AUTHORIZED,
        }
    }
}

pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, credentials: &Credentials<'_>) -> AuthDecision;
}

/// Accepts every client: the embedded default on a loopback listener. Later configuration
/// replaces it with a password file or hook.
pub struct AllowAll;

impl Authenticator for AllowAll {
    fn authenticate(&self, _: &Credentials<'_>) -> AuthDecision {
        AuthDecision::Allow
    }
}

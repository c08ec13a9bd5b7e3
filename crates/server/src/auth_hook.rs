//! The HTTP authentication hook (`[auth.http]`), for users whose identities live in a service
//! of their own. For a client whose user name petrel does not know itself, it POSTs JSON to
//! the configured URL:
//!
//! ```json
//! {"client_id": "c1", "username": "alice", "password": "…", "peer": "10.0.0.7:50412",
//!  "certificate_identity": null}
//! ```
//!
//! A 2xx answer admits the client; 401 and 403 refuse it (bad credentials, not authorized);
//! anything else — another status, no answer within `timeout`, a connection error — refuses
//! it as not authorized and is logged: the hook failing never lets a client in, and never
//! holds a CONNECT past the listener's connect deadline (the connection gives up then).
//! Answers are remembered for `cache_ttl` (as a keyed digest of the credentials, never the
//! password) in a cache of at most `cache_size` entries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use petrel_engine::auth::{AuthDecision, PendingDecision};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// `[auth.http]`.
#[derive(Debug, Clone)]
pub struct HookConfig {
    pub url: String,
    pub timeout: Duration,
    pub cache_ttl: Duration,
    pub cache_size: usize,
}

#[derive(Serialize)]
struct Request<'a> {
    client_id: &'a str,
    username: &'a str,
    /// Lossy UTF-8: MQTT passwords are binary, JSON strings are not.
    password: String,
    peer: &'a str,
    certificate_identity: Option<&'a str>,
}

pub struct HttpHook {
    config: HookConfig,
    client: reqwest::Client,
    key: [u8; 32],
    cache: Mutex<HashMap<[u8; 32], (Instant, AuthDecision)>>,
}

impl HttpHook {
    pub fn new(config: HookConfig) -> Result<HttpHook, String> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let mut key = [0u8; 32];
        let _ = getrandom::getrandom(&mut key);
        Ok(HttpHook {
            config,
            client,
            key,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn digest(&self, client_id: &str, username: &str, password: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.key);
        for part in [client_id.as_bytes(), username.as_bytes(), password] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.finalize().into()
    }

    fn cached(&self, digest: &[u8; 32], now: Instant) -> Option<AuthDecision> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(digest)
            .filter(|(at, _)| now.duration_since(*at) < self.config.cache_ttl)
            .map(|(_, d)| *d)
    }

    fn remember(&self, digest: [u8; 32], decision: AuthDecision, now: Instant) {
        if self.config.cache_size == 0 || self.config.cache_ttl.is_zero() {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.config.cache_size {
            let ttl = self.config.cache_ttl;
            cache.retain(|_, (at, _)| now.duration_since(*at) < ttl);
            if cache.len() >= self.config.cache_size {
                cache.clear();
            }
        }
        cache.insert(digest, (now, decision));
    }

    /// Asks the service, or answers from the cache.
    pub fn ask(
        self: &Arc<Self>,
        client_id: &str,
        username: &str,
        password: &[u8],
        peer: &str,
        certificate_identity: Option<&str>,
    ) -> Result<AuthDecision, PendingDecision> {
        let now = Instant::now();
        let digest = self.digest(client_id, username, password);
        if let Some(decision) = self.cached(&digest, now) {
            return Ok(decision);
        }
        let body = match serde_json::to_vec(&Request {
            client_id,
            username,
            password: String::from_utf8_lossy(password).into_owned(),
            peer,
            certificate_identity,
        }) {
            Ok(b) => b,
            Err(_) => return Ok(AuthDecision::NotAuthorized),
        };
        let hook = self.clone();
        let request = self
            .client
            .post(&self.config.url)
            .header("content-type", "application/json")
            .body(body);
        Err(Box::pin(async move {
            let decision = match request.send().await {
                Ok(response) => match response.status().as_u16() {
                    200..=299 => AuthDecision::Allow,
                    401 => AuthDecision::BadCredentials,
                    403 => AuthDecision::NotAuthorized,
                    status => {
                        tracing::warn!(url = %hook.config.url, status, "authentication hook answered with an unexpected status; login refused");
                        return AuthDecision::NotAuthorized;
                    }
                },
                Err(e) => {
                    tracing::warn!(url = %hook.config.url, error = %e, "authentication hook failed; login refused");
                    return AuthDecision::NotAuthorized;
                }
            };
            // Only answers the service gave are remembered, not its failures.
            hook.remember(digest, decision, Instant::now());
            decision
        }))
    }
}

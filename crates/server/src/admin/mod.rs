//! The operations listener: an HTTP server (axum) on its own address, loopback by default.
//!
//! ```text
//! GET  /                   the dashboard (one embedded page; asks for the token)
//! GET  /healthz            the process serves                          (no token)
//! GET  /readyz             listeners accept clients; 503 while draining (no token)
//! GET  /metrics            Prometheus text          (token if metrics_require_token)
//! GET  /api/v1/openapi.json  the API's OpenAPI description             (no token)
//! /api/v1/...              the JSON API (api.rs)          Authorization: Bearer <token>
//! ```
//!
//! Everything the handlers read comes from the engine's lock-free counters or a short hold
//! of one lock at a time; nothing here touches a connection's task.

mod api;
mod metrics;
mod serve;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use petrel_engine::Broker;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::AdminConfig;
use crate::listener::ListenerStats;
use crate::server::Reloader;

/// The OpenAPI description of the JSON API, served as is and checked against the routes in
/// tests.
pub const OPENAPI: &str = include_str!("openapi.json");

const DASHBOARD: &str = include_str!("dashboard.html");

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin.token_file: cannot read {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error("admin.token_file: {0} holds no token on its first line")]
    EmptyTokenFile(String),
    #[error("cannot listen on {addr} (admin.bind): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the handlers share.
pub(crate) struct Admin {
    broker: Arc<Broker>,
    pub(crate) bridges: Vec<Arc<crate::bridge::BridgeStatus>>,
    /// Cluster mode: membership and the fabric's figures.
    pub(crate) cluster: Option<Arc<petrel_cluster::Cluster>>,
    token: String,
    metrics_require_token: bool,
    registry: Registry,
    /// Set once the server runs; `None` when it was started without a config file.
    reloader: std::sync::OnceLock<Option<Arc<Reloader>>>,
    /// The samples rates are computed from.
    rates: std::sync::Mutex<api::Rates>,
}

/// The operations listener, bound and not yet serving.
pub struct AdminServer {
    listener: TcpListener,
    admin: Arc<Admin>,
    bounds: serve::Bounds,
}

/// The token from the configuration: given, read from a file, or made up (and logged).
pub(crate) fn token_from(config: &AdminConfig) -> Result<(String, bool), AdminError> {
    if let Some(path) = &config.token_file {
        let text = std::fs::read_to_string(path).map_err(|source| AdminError::TokenFile {
            path: path.display().to_string(),
            source,
        })?;
        let token = text.lines().next().unwrap_or("").trim().to_owned();
        if token.is_empty() {
            return Err(AdminError::EmptyTokenFile(path.display().to_string()));
        }
        return Ok((token, false));
    }
    if !config.token.is_empty() {
        return Ok((config.token.clone(), false));
    }
    let mut bytes = [0u8; 24];
    // No randomness means no token anyone could guess either: refuse every API call.
    if getrandom::getrandom(&mut bytes).is_err() {
        return Ok((String::new(), false));
    }
    let token = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok((token, true))
}

impl AdminServer {
    pub async fn bind(
        config: &AdminConfig,
        broker: Arc<Broker>,
        listeners: Vec<Arc<ListenerStats>>,
        bridges: Vec<Arc<crate::bridge::BridgeStatus>>,
        cluster: Option<Arc<petrel_cluster::Cluster>>,
    ) -> Result<AdminServer, AdminError> {
        let (token, generated) = token_from(config)?;
        let listener = TcpListener::bind(config.bind)
            .await
            .map_err(|source| AdminError::Bind {
                addr: config.bind,
                source,
            })?;
        let addr = listener.local_addr().unwrap_or(config.bind);
        if generated {
            tracing::info!(%addr, "admin listener: dashboard at http://{addr}/#token={token} (a token made for this run; set [admin] token or token_file to keep one)");
        } else {
            tracing::info!(%addr, "admin listener: metrics, API and dashboard");
        }
        let admin = Arc::new(Admin {
            registry: metrics::registry(
                broker.clone(),
                listeners,
                bridges.clone(),
                cluster.clone(),
            ),
            bridges,
            cluster,
            broker,
            token,
            metrics_require_token: config.metrics_require_token,
            reloader: std::sync::OnceLock::new(),
            rates: std::sync::Mutex::new(api::Rates::default()),
        });
        let bounds = serve::Bounds {
            max_connections: config.max_connections,
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
        };
        Ok(AdminServer {
            listener,
            admin,
            bounds,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Connections it serves at once: descriptors the MQTT listeners do not get.
    pub fn max_connections(&self) -> usize {
        self.bounds.max_connections
    }

    /// Serves until `shutdown`; `/readyz` turns 503 as soon as the broker drains.
    pub async fn run(self, reloader: Option<Arc<Reloader>>, shutdown: CancellationToken) {
        let _ = self.admin.reloader.set(reloader);
        let app = router(self.admin);
        serve::serve(self.listener, app, self.bounds, shutdown).await;
    }
}

fn router(admin: Arc<Admin>) -> Router {
    let api = api::routes().layer(middleware::from_fn_with_state(admin.clone(), require_token));
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/openapi.json", get(openapi))
        .merge(api)
        .with_state(admin)
}

async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:",
            ),
        ],
        Html(DASHBOARD),
    )
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(admin): State<Arc<Admin>>) -> Response {
    if admin.broker.is_shutting_down() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "status": "draining" })),
        )
            .into_response()
    } else {
        axum::Json(serde_json::json!({ "status": "ready" })).into_response()
    }
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn metrics_text(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Response {
    if admin.metrics_require_token && !admin.authorized(&headers) {
        return unauthorized();
    }
    let admin2 = admin.clone();
    // Reading /proc and walking the session registry is blocking work.
    let text = tokio::task::spawn_blocking(move || metrics::render(&admin2.registry))
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(serde_json::json!({ "error": "a valid token is required (Authorization: Bearer <token>)" })),
    )
        .into_response()
}

impl Admin {
    /// Whether the request carries the token, compared in constant time.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        let (a, b) = (given.trim().as_bytes(), self.token.as_bytes());
        !b.is_empty()
            && a.len() == b.len()
            && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

async fn require_token(State(admin): State<Arc<Admin>>, request: Request, next: Next) -> Response {
    if !admin.authorized(request.headers()) {
        return unauthorized();
    }
    next.run(request).await
}

/// The admin table in force: the configured one, or the default when the file has none.
pub fn effective(config: Option<&AdminConfig>) -> (AdminConfig, bool) {
    match config {
        Some(c) => (c.clone(), true),
        None => (AdminConfig::default(), false),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use axum::body::Body;
    use axum::http::{Method, Request};
    use tower::ServiceExt;

    use super::*;

    fn admin() -> Arc<Admin> {
        let broker = Arc::new(Broker::new(petrel_engine::Limits::default()));
        let admin = Admin {
            registry: metrics::registry(broker.clone(), Vec::new(), Vec::new(), None),
            broker,
            bridges: Vec::new(),
            cluster: None,
            token: "t0k".into(),
            metrics_require_token: false,
            reloader: std::sync::OnceLock::new(),
            rates: std::sync::Mutex::new(api::Rates::default()),
        };
        let _ = admin.reloader.set(None);
        Arc::new(admin)
    }

    /// (method, path) of every operation the OpenAPI document describes.
    fn documented() -> BTreeSet<(String, String)> {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let mut ops = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in ["get", "post", "put", "delete", "patch"] {
                if item.get(method).is_some() {
                    ops.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        ops
    }

    /// Asks the router itself which methods each documented path (and a few undocumented
    /// guesses) answers, so a route added without its description fails here.
    #[tokio::test]
    async fn every_route_is_described_in_the_openapi_document_and_nothing_else_is() {
        let app = router(admin());
        let mut paths: BTreeSet<String> = documented().into_iter().map(|(_, p)| p).collect();
        for guess in [
            "/api/v1/sessions",
            "/api/v1/clients/{client_id}/kick",
            "/api/v1/topics",
            "/api/v1/config",
            "/api/v1/subscriptions",
            "/api",
        ] {
            paths.insert(guess.to_owned());
        }
        let mut served = BTreeSet::new();
        for path in &paths {
            let uri = path.replace("{client_id}", "some%2Fclient");
            for method in [
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::PATCH,
            ] {
                let request = Request::builder()
                    .method(method.clone())
                    .uri(format!("{uri}?filter=a/b"))
                    .header("authorization", "Bearer t0k")
                    .body(Body::empty())
                    .unwrap();
                let response = app.clone().oneshot(request).await.unwrap();
                let status = response.status();
                // 404 from the router has no body; a handler's 404 explains itself.
                let body = axum::body::to_bytes(response.into_body(), 1 << 20)
                    .await
                    .unwrap();
                let routed = status != StatusCode::METHOD_NOT_ALLOWED
                    && !(status == StatusCode::NOT_FOUND && body.is_empty());
                if routed {
                    served.insert((method.as_str().to_owned(), path.clone()));
                }
            }
        }
        assert_eq!(served, documented());
    }

    #[tokio::test]
    async fn the_api_refuses_requests_without_the_token() {
        let app = router(admin());
        for (auth, expected) in [
            (None, StatusCode::UNAUTHORIZED),
            (Some("Bearer wrong"), StatusCode::UNAUTHORIZED),
            (Some("Bearer t0"), StatusCode::UNAUTHORIZED),
            (Some("Basic t0k"), StatusCode::UNAUTHORIZED),
            (Some("Bearer t0k"), StatusCode::OK),
        ] {
            let mut request = Request::builder().uri("/api/v1/overview");
            if let Some(auth) = auth {
                request = request.header("authorization", auth);
            }
            let response = app
                .clone()
                .oneshot(request.body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(response.status(), expected, "{auth:?}");
        }
        // Health, readiness, metrics and the description are open (metrics by default).
        for path in [
            "/healthz",
            "/readyz",
            "/metrics",
            "/api/v1/openapi.json",
            "/",
        ] {
            let response = app
                .clone()
                .oneshot(Request::builder().uri(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{path}");
        }
    }

    #[test]
    fn an_empty_token_admits_nobody() {
        let mut a = Arc::try_unwrap(admin()).ok().unwrap();
        a.token = String::new();
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert!(!a.authorized(&headers));
    }
}

//! The JSON API under `/api/v1` (described in openapi.json). Every route needs the token.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::Engine as _;
use petrel_codec::{ProtocolVersion, RetainHandling};
use petrel_engine::broker::{Kicked, SessionSummary};
use petrel_engine::stats::Stats;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::Admin;

/// Most items one list returns.
const MAX_LIMIT: usize = 10_000;
/// Payload bytes shown per retained message.
const PAYLOAD_PREVIEW: usize = 1024;
/// Top topics returned at most.
const MAX_TOP: usize = 100;
/// The dashboard stops being counted for after this long without a request for topics.
const WATCH_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

pub(super) fn routes() -> Router<Arc<Admin>> {
    Router::new()
        .route("/api/v1/overview", get(overview))
        .route("/api/v1/topics/top", get(top_topics))
        .route("/api/v1/clients", get(clients))
        .route("/api/v1/clients/{client_id}", get(client))
        .route(
            "/api/v1/clients/{client_id}/subscriptions",
            get(subscriptions),
        )
        .route("/api/v1/clients/{client_id}/disconnect", post(disconnect))
        .route("/api/v1/sessions/{client_id}", delete(delete_session))
        .route("/api/v1/retained", get(retained).delete(delete_retained))
        .route("/api/v1/reload", post(reload))
        .route("/api/v1/bridges", get(bridges))
        .route("/api/v1/cluster", get(cluster))
        .route(
            "/api/v1/redirect",
            get(redirect_status).put(redirect).delete(stop_redirect),
        )
}

#[derive(Deserialize)]
struct RedirectRequest {
    server_reference: String,
}

fn redirect_view(admin: &Admin, moved: Option<usize>) -> serde_json::Value {
    let to = admin.broker.redirect();
    let mut view = json!({
        "redirecting": to.is_some(),
        "server_reference": to.as_ref().map(|s| s.as_str()),
    });
    if let Some(moved) = moved {
        view["clients_told"] = json!(moved);
    }
    view
}

async fn redirect_status(State(admin): State<Arc<Admin>>) -> Json<serde_json::Value> {
    Json(redirect_view(&admin, None))
}

/// Drains this server: connected clients are told to use `server_reference` (v5 DISCONNECT
/// 0x9C with a Server Reference; 3.x clients are closed) and new ones are sent there.
async fn redirect(
    State(admin): State<Arc<Admin>>,
    body: Result<Json<RedirectRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(body)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "a JSON body {\"server_reference\": \"host:port\"} is required",
        );
    };
    let to = body.server_reference.trim();
    let Ok(to) = petrel_codec::MqttString::new(to) else {
        return error(
            StatusCode::BAD_REQUEST,
            "server_reference is not a valid MQTT string",
        );
    };
    if to.is_empty() {
        return error(StatusCode::BAD_REQUEST, "server_reference is empty");
    }
    tracing::info!(server_reference = %to, "redirecting clients to another server (admin API)");
    let moved = admin.broker.set_redirect(Some(to));
    Json(redirect_view(&admin, Some(moved))).into_response()
}

async fn stop_redirect(State(admin): State<Arc<Admin>>) -> Json<serde_json::Value> {
    admin.broker.set_redirect(None);
    tracing::info!("serving clients again (redirect lifted)");
    Json(redirect_view(&admin, None))
}

/// Cluster mode: membership, per-node figures and this node's traffic with the others.
async fn cluster(State(admin): State<Arc<Admin>>) -> Json<serde_json::Value> {
    let Some(cluster) = &admin.cluster else {
        return Json(json!({ "enabled": false }));
    };
    let status = cluster.status();
    let s = cluster.stats();
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let mut view = serde_json::to_value(&status).unwrap_or_else(|_| json!({}));
    if let Some(map) = view.as_object_mut() {
        map.insert("enabled".into(), json!(true));
        map.insert(
            "messages".into(),
            json!({
                "sent_core": get(&s.sent_core),
                "sent_durable": get(&s.sent_durable),
                "received_core": get(&s.received_core),
                "received_durable": get(&s.received_durable),
                "dropped": get(&s.dropped_core),
                "dropped_too_large": get(&s.dropped_too_large),
                "retries": get(&s.retries),
                "retained_sent": get(&s.retained_sent),
                "retained_received": get(&s.retained_received),
            }),
        );
    }
    Json(view)
}

#[derive(Serialize)]
struct BridgeView {
    name: String,
    address: String,
    transport: &'static str,
    version: &'static str,
    remote_client_id: String,
    local_client_id: String,
    state: &'static str,
    connected_since_ms: Option<u64>,
    connects: u64,
    failures: u64,
    messages_out: u64,
    messages_in: u64,
    dropped: u64,
    queued: usize,
    last_error: Option<String>,
}

/// Every configured bridge, with its link state and what it carried.
async fn bridges(State(admin): State<Arc<Admin>>) -> Json<serde_json::Value> {
    let now = Instant::now();
    let list: Vec<BridgeView> = admin
        .bridges
        .iter()
        .map(|b| {
            let local_client_id = b.local_client_id();
            let queued = admin
                .broker
                .session(&local_client_id)
                .map_or(0, |s| admin.broker.summarize(&s, now).queued);
            BridgeView {
                name: b.name.clone(),
                address: b.address.clone(),
                transport: b.transport,
                version: b.version,
                remote_client_id: b.remote_client_id.clone(),
                local_client_id,
                state: b.state().as_str(),
                connected_since_ms: b.connected_at_ms(),
                connects: Stats::get(&b.connects),
                failures: Stats::get(&b.failures),
                messages_out: Stats::get(&b.forwarded_out),
                messages_in: Stats::get(&b.forwarded_in),
                dropped: Stats::get(&b.dropped),
                queued,
                last_error: b.last_error(),
            }
        })
        .collect();
    Json(json!({ "bridges": list }))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn version_name(v: ProtocolVersion) -> &'static str {
    match v {
        ProtocolVersion::V3_1 => "3.1",
        ProtocolVersion::V3_1_1 => "3.1.1",
        ProtocolVersion::V5 => "5.0",
    }
}

/// Per-topic counts as read at one moment.
type TopicCounts = Vec<(Box<str>, petrel_engine::activity::Counts)>;

/// The samples rates are computed from: the last two readings of the counters.
#[derive(Default)]
pub(super) struct Rates {
    last: Option<Sample>,
    /// The rates from the last two samples at least `MIN_SPAN` apart.
    current: Option<(Sample, Sample)>,
    /// Topic counts at the last two topic samples.
    topics: Option<(Instant, TopicCounts)>,
    topic_rates: Vec<TopicRate>,
    last_topic_request: Option<Instant>,
}

#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    messages_in: u64,
    messages_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    connects: u64,
}

/// Rates are taken over at least this span, so that two dashboards polling do not make
/// them jumpy.
const MIN_SPAN: std::time::Duration = std::time::Duration::from_millis(900);

#[derive(Serialize, Clone)]
struct TopicRate {
    topic: String,
    messages_per_second: f64,
    bytes_per_second: f64,
    messages: u64,
}

#[derive(Serialize)]
struct Overview {
    version: &'static str,
    uptime_seconds: u64,
    connections: u64,
    connections_by_version: serde_json::Value,
    sessions_live: usize,
    sessions_offline: usize,
    subscriptions: usize,
    retained_messages: usize,
    queued_messages: usize,
    queued_bytes: usize,
    messages_received: u64,
    messages_sent: u64,
    bytes_received: u64,
    bytes_sent: u64,
    messages_dropped: u64,
    connects: u64,
    messages_received_per_second: f64,
    messages_sent_per_second: f64,
    bytes_received_per_second: f64,
    bytes_sent_per_second: f64,
    connects_per_second: f64,
    draining: bool,
}

async fn overview(State(admin): State<Arc<Admin>>) -> Json<Overview> {
    let b = &admin.broker;
    let s = &b.stats;
    let get = Stats::get;
    let now = Instant::now();
    let sample = Sample {
        at: now,
        messages_in: get(&s.messages_received),
        messages_out: get(&s.messages_sent),
        bytes_in: get(&s.bytes_received),
        bytes_out: get(&s.bytes_sent),
        connects: get(&s.connections_total),
    };
    let (mi, mo, bi, bo, cps) = {
        let mut rates = admin.rates.lock().unwrap_or_else(|e| e.into_inner());
        match rates.last {
            Some(last) if now.duration_since(last.at) >= MIN_SPAN => {
                rates.current = Some((last, sample));
                rates.last = Some(sample);
            }
            None => rates.last = Some(sample),
            _ => {}
        }
        match rates.current {
            Some((a, b)) => {
                let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
                let r = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
                (
                    r(a.messages_in, b.messages_in),
                    r(a.messages_out, b.messages_out),
                    r(a.bytes_in, b.bytes_in),
                    r(a.bytes_out, b.bytes_out),
                    r(a.connects, b.connects),
                )
            }
            None => (0.0, 0.0, 0.0, 0.0, 0.0),
        }
    };
    let (live, offline) = b.session_counts();
    let (queued, queued_bytes) = b.queued_totals();
    let dropped = [
        &s.dropped_outbox_full,
        &s.dropped_queue_full,
        &s.dropped_broker_queue_full,
        &s.dropped_offline_qos0,
        &s.messages_expired,
        &s.dropped_too_large,
        &s.dropped_not_authorized,
        &s.dropped_inbound_rate,
    ]
    .iter()
    .map(|c| get(c))
    .sum();
    Json(Overview {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: b.uptime_ms() / 1000,
        connections: get(&s.connections_current),
        connections_by_version: json!({
            "3.1": get(&s.connections_by_version[0]),
            "3.1.1": get(&s.connections_by_version[1]),
            "5.0": get(&s.connections_by_version[2]),
        }),
        sessions_live: live,
        sessions_offline: offline,
        subscriptions: b.subscription_count(),
        retained_messages: b.retained_count(),
        queued_messages: queued,
        queued_bytes,
        messages_received: sample.messages_in,
        messages_sent: sample.messages_out,
        bytes_received: sample.bytes_in,
        bytes_sent: sample.bytes_out,
        messages_dropped: dropped,
        connects: sample.connects,
        messages_received_per_second: mi,
        messages_sent_per_second: mo,
        bytes_received_per_second: bi,
        bytes_sent_per_second: bo,
        connects_per_second: cps,
        draining: b.is_shutting_down(),
    })
}

#[derive(Deserialize)]
struct TopQuery {
    limit: Option<usize>,
}

/// Top topics by message rate. The first request turns per-topic counting on (it costs a
/// lock per PUBLISH while on); it turns itself off when nobody asked for half a minute.
async fn top_topics(State(admin): State<Arc<Admin>>, Query(q): Query<TopQuery>) -> Response {
    let limit = q.limit.unwrap_or(10).clamp(1, MAX_TOP);
    let activity = &admin.broker.activity;
    let now = Instant::now();
    let mut rates = admin.rates.lock().unwrap_or_else(|e| e.into_inner());
    rates.last_topic_request = Some(now);
    if !activity.is_watched() {
        activity.watch();
        spawn_unwatch(admin.clone());
    }
    let due = stale(rates.topics.as_ref().map(|(at, _)| *at), now, MIN_SPAN);
    if due {
        let snapshot = activity.snapshot();
        if let Some((then, before)) = rates.topics.take() {
            let secs = now.duration_since(then).as_secs_f64().max(1e-3);
            let before: std::collections::HashMap<&str, petrel_engine::activity::Counts> =
                before.iter().map(|(k, v)| (&**k, *v)).collect();
            let mut list: Vec<TopicRate> = snapshot
                .iter()
                .map(|(topic, c)| {
                    let b = before.get(&**topic).copied().unwrap_or_default();
                    TopicRate {
                        topic: topic.to_string(),
                        messages_per_second: c.messages.saturating_sub(b.messages) as f64 / secs,
                        bytes_per_second: c.bytes.saturating_sub(b.bytes) as f64 / secs,
                        messages: c.messages,
                    }
                })
                .collect();
            list.sort_by(|a, b| {
                b.messages_per_second
                    .total_cmp(&a.messages_per_second)
                    .then(b.messages.cmp(&a.messages))
            });
            list.truncate(MAX_TOP);
            rates.topic_rates = list;
        }
        rates.topics = Some((now, snapshot));
    }
    let topics: Vec<TopicRate> = rates.topic_rates.iter().take(limit).cloned().collect();
    Json(json!({ "topics": topics })).into_response()
}

/// Whether `at` is unset or at least `span` before `now`.
fn stale(at: Option<Instant>, now: Instant, span: std::time::Duration) -> bool {
    at.is_none_or_before(now, span)
}

trait Before {
    fn is_none_or_before(&self, now: Instant, span: std::time::Duration) -> bool;
}

impl Before for Option<Instant> {
    fn is_none_or_before(&self, now: Instant, span: std::time::Duration) -> bool {
        match self {
            None => true,
            Some(t) => now.saturating_duration_since(*t) >= span,
        }
    }
}

/// Turns per-topic counting off once nobody asks for it.
fn spawn_unwatch(admin: Arc<Admin>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(WATCH_IDLE / 2).await;
            let mut rates = admin.rates.lock().unwrap_or_else(|e| e.into_inner());
            if stale(rates.last_topic_request, Instant::now(), WATCH_IDLE) {
                admin.broker.activity.unwatch();
                rates.topics = None;
                rates.topic_rates.clear();
                return;
            }
        }
    });
}

#[derive(Serialize)]
struct ClientJson {
    client_id: String,
    connected: bool,
    address: Option<String>,
    protocol_version: Option<&'static str>,
    keep_alive: Option<u16>,
    /// Seconds since the Unix epoch.
    connected_since: Option<u64>,
    session_expiry_interval: Option<u32>,
    expires_in: Option<u64>,
    inflight: usize,
    queued: usize,
    subscriptions: usize,
}

fn client_json(admin: &Admin, s: SessionSummary) -> ClientJson {
    let client = s.client.as_ref();
    let now_ms = admin.broker.uptime_ms();
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    ClientJson {
        client_id: s.client_id.to_string(),
        connected: s.connected,
        address: client.map(|c| c.peer.to_string()),
        protocol_version: client.map(|c| version_name(c.version)),
        keep_alive: client.map(|c| c.keep_alive),
        connected_since: client
            .map(|c| wall.saturating_sub(now_ms.saturating_sub(c.connected_at_ms)) / 1000),
        session_expiry_interval: s.expiry_interval,
        expires_in: s.expires_in,
        inflight: s.inflight,
        queued: s.queued,
        subscriptions: s.subscriptions,
    }
}

#[derive(Deserialize)]
struct ClientsQuery {
    /// Substring of the client id or address.
    search: Option<String>,
    /// connected (default), offline or all.
    state: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

async fn clients(State(admin): State<Arc<Admin>>, Query(q): Query<ClientsQuery>) -> Response {
    let state = q.state.unwrap_or_else(|| "connected".to_owned());
    if !matches!(state.as_str(), "connected" | "offline" | "all") {
        return error(
            StatusCode::BAD_REQUEST,
            "state must be connected, offline or all",
        );
    }
    let limit = q.limit.unwrap_or(100).min(MAX_LIMIT);
    let offset = q.offset.unwrap_or(0);
    let search = q.search.unwrap_or_default().to_lowercase();
    let now = Instant::now();
    let admin2 = admin.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut matched: Vec<ClientJson> = admin2
            .broker
            .sessions()
            .iter()
            .filter(|s| match state.as_str() {
                "connected" => s.is_connected(),
                "offline" => !s.is_connected(),
                _ => true,
            })
            .map(|s| admin2.broker.summarize(s, now))
            .map(|s| client_json(&admin2, s))
            .filter(|c| {
                search.is_empty()
                    || c.client_id.to_lowercase().contains(&search)
                    || c.address
                        .as_deref()
                        .is_some_and(|a| a.to_lowercase().contains(&search))
            })
            .collect();
        matched.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        let total = matched.len();
        let page: Vec<ClientJson> = matched.into_iter().skip(offset).take(limit).collect();
        json!({ "total": total, "clients": page })
    })
    .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "listing failed"),
    }
}

#[derive(Serialize)]
struct SubscriptionJson {
    filter: String,
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    retain_handling: u8,
    subscription_identifier: Option<u32>,
}

fn subscriptions_of(admin: &Admin, client_id: &str) -> Option<Vec<SubscriptionJson>> {
    let session = admin.broker.session(client_id)?;
    let st = session.lock();
    let mut subs: Vec<SubscriptionJson> = st
        .subscriptions
        .iter()
        .map(|(filter, s)| SubscriptionJson {
            filter: filter.to_string(),
            qos: s.options.qos as u8,
            no_local: s.options.no_local,
            retain_as_published: s.options.retain_as_published,
            retain_handling: match s.options.retain_handling {
                RetainHandling::OnSubscribe => 0,
                RetainHandling::OnNewSubscription => 1,
                RetainHandling::Never => 2,
            },
            subscription_identifier: (s.id != 0).then_some(s.id),
        })
        .collect();
    subs.sort_by(|a, b| a.filter.cmp(&b.filter));
    Some(subs)
}

async fn client(State(admin): State<Arc<Admin>>, Path(client_id): Path<String>) -> Response {
    let Some(session) = admin.broker.session(&client_id) else {
        return error(StatusCode::NOT_FOUND, "no session with this client id");
    };
    let summary = admin.broker.summarize(&session, Instant::now());
    let subs = subscriptions_of(&admin, &client_id).unwrap_or_default();
    let mut value = serde_json::to_value(client_json(&admin, summary)).unwrap_or_default();
    value["subscription_list"] = serde_json::to_value(subs).unwrap_or_default();
    Json(value).into_response()
}

async fn subscriptions(State(admin): State<Arc<Admin>>, Path(client_id): Path<String>) -> Response {
    match subscriptions_of(&admin, &client_id) {
        Some(subs) => Json(json!({ "subscriptions": subs })).into_response(),
        None => error(StatusCode::NOT_FOUND, "no session with this client id"),
    }
}

async fn disconnect(State(admin): State<Arc<Admin>>, Path(client_id): Path<String>) -> Response {
    match admin.broker.kick(&client_id, false, Instant::now()) {
        Kicked::Disconnected => Json(json!({ "result": "disconnected" })).into_response(),
        Kicked::NotConnected => error(StatusCode::CONFLICT, "the client is not connected"),
        Kicked::NotFound | Kicked::Deleted => {
            error(StatusCode::NOT_FOUND, "no session with this client id")
        }
    }
}

async fn delete_session(
    State(admin): State<Arc<Admin>>,
    Path(client_id): Path<String>,
) -> Response {
    match admin.broker.kick(&client_id, true, Instant::now()) {
        Kicked::Disconnected => {
            Json(json!({ "result": "disconnected; the session ends with the connection" }))
                .into_response()
        }
        Kicked::Deleted => Json(json!({ "result": "deleted" })).into_response(),
        Kicked::NotFound | Kicked::NotConnected => {
            error(StatusCode::NOT_FOUND, "no session with this client id")
        }
    }
}

#[derive(Deserialize)]
struct RetainedQuery {
    filter: Option<String>,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct RetainedJson {
    topic: String,
    qos: u8,
    payload_size: usize,
    /// The payload as text when it is UTF-8 (first 1 KiB).
    payload_utf8: Option<String>,
    /// Otherwise its first 1 KiB in base64.
    payload_base64: Option<String>,
}

fn checked_filter(filter: Option<String>) -> Result<String, Box<Response>> {
    let Some(filter) = filter else {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "filter is required (e.g. filter=%23 for every topic)",
        )));
    };
    if petrel_codec::TopicFilter::new(&filter).is_err() {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "filter is not a valid MQTT topic filter",
        )));
    }
    Ok(filter)
}

async fn retained(State(admin): State<Arc<Admin>>, Query(q): Query<RetainedQuery>) -> Response {
    let filter = match checked_filter(Some(q.filter.unwrap_or_else(|| "#".into()))) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let limit = q.limit.unwrap_or(100).min(MAX_LIMIT);
    let mut list: Vec<RetainedJson> = admin
        .broker
        .retained_list(&filter, limit)
        .iter()
        .map(|m| {
            let preview = &m.payload[..m.payload.len().min(PAYLOAD_PREVIEW)];
            let text = std::str::from_utf8(preview).ok().map(str::to_owned);
            RetainedJson {
                topic: m.topic.to_string(),
                qos: m.qos as u8,
                payload_size: m.payload.len(),
                payload_base64: text
                    .is_none()
                    .then(|| base64::engine::general_purpose::STANDARD.encode(preview)),
                payload_utf8: text,
            }
        })
        .collect();
    list.sort_by(|a, b| a.topic.cmp(&b.topic));
    Json(json!({ "messages": list })).into_response()
}

async fn delete_retained(
    State(admin): State<Arc<Admin>>,
    Query(q): Query<RetainedQuery>,
) -> Response {
    let filter = match checked_filter(q.filter) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let removed = admin.broker.retained_remove(&filter);
    tracing::info!(filter, removed, "retained messages deleted by an operator");
    Json(json!({ "removed": removed })).into_response()
}

async fn reload(State(admin): State<Arc<Admin>>) -> Response {
    let Some(Some(reloader)) = admin.reloader.get().cloned() else {
        return error(
            StatusCode::CONFLICT,
            "the broker was started without a configuration file",
        );
    };
    match tokio::task::spawn_blocking(move || reloader.reload("admin API")).await {
        Ok(Ok(done)) => Json(json!({
            "result": "reloaded",
            "restart_needed": done.restart_needed,
        }))
        .into_response(),
        Ok(Err(e)) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "reload failed"),
    }
}

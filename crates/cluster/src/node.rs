//! One petrel node's membership of a cluster: the NATS connection, the JetStream stream and
//! buckets it shares with the other nodes, and the tasks that move messages both ways.
//!
//! ```text
//!  engine ──Fabric calls──▶ NatsFabric ──Command──▶ forwarder task
//!                                                     ├─ QoS 0: publish petrel.m.<topic>
//!                                                     ├─ QoS 1/2: JetStream petrel.n.<node> /
//!                                                     │           petrel.g.<group>, token acked
//!                                                     ├─ interest: NATS subscriptions here,
//!                                                     │            bucket keys (kv task)
//!                                                     └─ retained: bucket (kv task), token acked
//!  NATS ──▶ subscription tasks ──▶ Broker::route_remote / route_group
//!  JetStream ──▶ node and group consumers ──▶ route, ack once the local store has it
//!  buckets ──▶ watches ──▶ interest table, retained messages, members
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, consumer, kv, stream};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use petrel_codec::{Properties, QoS, TopicFilter, TopicName};
use petrel_engine::auth::Login;
use petrel_engine::broker::NotOwner;
use petrel_engine::message::Message;
use petrel_engine::record::decode_message;
use petrel_engine::Broker;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::fabric::{Acks, Command, FabricStats, NatsFabric};
use crate::interest::RemoteInterest;
use crate::wire::wall_ms;
use crate::{handover, names, subject, wire};

/// How a node joins its cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// NATS servers to connect to (`nats://host:port`); any one is enough to join.
    pub servers: Vec<String>,
    /// This node's id: unique in the cluster and the same across its restarts (its durable
    /// consumer and its keys carry it).
    pub node_id: String,
    /// JetStream replicas for the stream and buckets (1 for a single NATS server, 3 for a
    /// three-server NATS cluster).
    pub replicas: usize,
    /// How long to try to reach NATS at start before giving up.
    pub connect_timeout: Duration,
    /// How often the node writes its heartbeat, and after how long without one another
    /// node counts it as gone.
    pub heartbeat: Duration,
    pub node_timeout: Duration,
    /// Bound on the bytes the message stream keeps (QoS 1/2 copies waiting for a node).
    pub stream_max_bytes: i64,
}

/// A node as the membership bucket shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: String,
    /// Wall-clock milliseconds when written, and when the node started.
    pub at_ms: u64,
    pub started_ms: u64,
    pub connections: u64,
    pub sessions: u64,
    pub messages_received: u64,
    pub messages_sent: u64,
    /// Messages sent to and received from other nodes, per second over the last beat.
    pub cross_out_per_second: f64,
    pub cross_in_per_second: f64,
    /// Totals since start.
    pub cross_out: u64,
    pub cross_in: u64,
}

/// A member and whether it is alive (heartbeat within the node timeout).
#[derive(Clone, Debug, Serialize)]
pub struct Member {
    #[serde(flatten)]
    pub heartbeat: Heartbeat,
    pub alive: bool,
    /// Milliseconds since its last heartbeat.
    pub last_seen_ms: u64,
}

/// The cluster as this node sees it.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    pub node: String,
    pub nats_connected: bool,
    pub nats_server: String,
    pub members: Vec<Member>,
    /// Other nodes' ordinary filters and the shared groups known cluster-wide.
    pub remote_filters: usize,
    pub groups: Vec<SharedGroupStatus>,
}

/// A shared group and how many nodes have members of it.
#[derive(Clone, Debug, Serialize)]
pub struct SharedGroupStatus {
    pub share: String,
    pub filter: String,
    pub nodes: usize,
}

pub struct Cluster {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

pub(crate) struct Inner {
    config: ClusterConfig,
    broker: Arc<Broker>,
    client: Client,
    js: jetstream::Context,
    fabric: Arc<NatsFabric>,
    interest: Arc<RwLock<RemoteInterest>>,
    members: Mutex<HashMap<String, Heartbeat>>,
    sessions: kv::Store,
    wills: kv::Store,
    /// Recently routed core messages by origin, to route one that arrives through several
    /// overlapping subscriptions once.
    seen: Mutex<Seen>,
    core_seq: AtomicU64,
    /// Sessions that moved to another node lately, to forward what was still on its way
    /// here for them.
    moved: Mutex<Vec<Moved>>,
    /// Client ids this node is claiming now: one claim per id at a time here, and a takeover
    /// request for one of them is answered "busy" (the asker retries), so that no CONNECT
    /// can slip through the window in which the key says this node but the session's owner
    /// has not yet agreed.
    claiming: Mutex<HashSet<String>>,
    boot: u64,
    started_ms: u64,
}

/// Removes a client id from `Inner::claiming` when its claim ends, however it ends (done,
/// timed out, or dropped with its connection).
struct Claiming<'a> {
    set: &'a Mutex<HashSet<String>>,
    client_id: String,
}

impl Drop for Claiming<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.client_id);
    }
}

/// Which (origin, number) pairs were routed lately: a bounded window.
#[derive(Default)]
struct Seen {
    set: HashSet<(Box<str>, u64)>,
    order: VecDeque<(Box<str>, u64)>,
}

const SEEN_WINDOW: usize = 65_536;

/// Records in `moved` that `client_id`'s session (`state`) went to `node` (see
/// `Inner::remember_moved`).
fn remember_moved(
    moved: &mut Vec<Moved>,
    client_id: &str,
    node: &str,
    state: &petrel_engine::store::StoredSession,
) {
    let filters = state
        .subscriptions
        .iter()
        .map(|(f, _)| f.clone())
        .filter(|f| !f.starts_with("$share/"))
        .collect();
    let now = Instant::now();
    moved.retain(|m| m.until > now && m.client_id != client_id);
    moved.push(Moved {
        client_id: client_id.to_owned(),
        node: node.to_owned(),
        filters,
        until: now + MOVED_FORWARD,
    });
}

/// `take_over`'s error when the node holding the session refused the login asking for it.
const REFUSED_BY_OWNER: &str = "the session belongs to another login";

/// An owner check's answer.
enum Check {
    Allowed,
    Refused,
    Busy,
}

/// `take_over`'s error when the node asked is claiming the client id itself.
const BUSY: &str = "that node is claiming the client id itself";

impl Seen {
    /// True the first time a pair is seen (within the window).
    fn first(&mut self, origin: &str, seq: u64) -> bool {
        let key: (Box<str>, u64) = (origin.into(), seq);
        if !self.set.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > SEEN_WINDOW {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// A session handed over to `node`: for a while, QoS 1/2 messages that reach this node for
/// its filters (sent before the other nodes learned of the move) are forwarded to it.
struct Moved {
    client_id: String,
    node: String,
    filters: Vec<TopicFilter>,
    until: Instant,
}

/// How long a moved session's messages are forwarded: longer than interest takes to travel.
const MOVED_FORWARD: Duration = Duration::from_secs(30);

/// How long after its last local subscription went the other nodes are told a filter's
/// interest ended.
const WITHDRAW_AFTER: Duration = Duration::from_secs(3);

/// What a NATS message carries besides one MQTT message's record: the frame's header (node
/// name, number, a moved session's client id) and the NATS headers (message id).
const FRAME_ROOM: usize = 8 * 1024;

/// Commands the forwarder takes at once before it sends the batches they made: bounds a
/// batch's wait and the other commands' delay under load.
const BATCH_COMMANDS: usize = 1024;

/// The forwarder's QoS 1/2 copies on their way to JetStream.
struct Copies {
    /// Token → copies (subjects) not stored yet; the token is acknowledged at 0.
    left: HashMap<u64, usize>,
    /// The batch being filled for each subject.
    open: HashMap<String, wire::Batch>,
    /// Batches being stored; each yields its tokens once JetStream has it.
    stores: FuturesUnordered<futures_util::future::BoxFuture<'static, Vec<u64>>>,
    /// The largest batch, in bytes.
    limit: usize,
}

impl Copies {
    /// One copy of `token` is stored; the last one acknowledges it.
    fn stored(&mut self, fabric: &NatsFabric, token: u64) {
        if let Some(left) = self.left.get_mut(&token) {
            *left -= 1;
            if *left == 0 {
                self.left.remove(&token);
                fabric.acks.complete(token);
            }
        }
    }
}

/// What the node's key-value writer does, in order.
enum KvOp {
    Interest {
        key: String,
        value: Option<Bytes>,
    },
    Will {
        key: String,
        value: Option<Bytes>,
    },
    Retain {
        token: u64,
        message: Arc<Message>,
    },
    /// Deletes the keys this node left from an earlier run that it has not written since.
    Reconcile(Vec<String>),
}

impl Cluster {
    /// Connects to NATS, makes sure the stream and buckets exist, loads the interest table
    /// and the retained messages, and makes `broker` a node of the cluster. Clients should
    /// be served only after this returns.
    pub async fn start(config: ClusterConfig, broker: Arc<Broker>) -> Result<Cluster, String> {
        if !names::valid_node_id(&config.node_id) {
            return Err(format!(
                "cluster.node_id {:?}: use 1 to 64 of A-Z a-z 0-9 - _",
                config.node_id
            ));
        }
        let stats = Arc::new(FabricStats::default());
        let events = stats.clone();
        let options = async_nats::ConnectOptions::new()
            .name(format!("petrel {}", config.node_id))
            .connection_timeout(config.connect_timeout)
            .max_reconnects(None)
            // Room for bursts of QoS 0 from other nodes; past it the NATS client drops them
            // (slow consumer), counted below.
            .subscription_capacity(1 << 17)
            .event_callback(move |event| {
                let events = events.clone();
                async move {
                    match event {
                        async_nats::Event::SlowConsumer(_) => {
                            events.slow_consumer.fetch_add(1, Ordering::Relaxed);
                        }
                        other => tracing::info!(event = %other, "NATS connection"),
                    }
                }
            });
        let client = tokio::time::timeout(
            config.connect_timeout,
            async_nats::connect_with_options(config.servers.clone(), options),
        )
        .await
        .map_err(|_| format!("cluster.nats: no server of {:?} answered", config.servers))?
        .map_err(|e| format!("cluster.nats {:?}: {e}", config.servers))?;
        let js = jetstream::new(client.clone());
        let replicas = config.replicas.max(1);
        let stream = get_or_create_stream(
            &js,
            stream::Config {
                name: names::STREAM.to_owned(),
                subjects: names::STREAM_SUBJECTS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                max_bytes: config.stream_max_bytes,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            },
        )
        .await?;
        let interest_kv = bucket(&js, names::INTEREST_BUCKET, replicas, Duration::ZERO).await?;
        let retained_kv = bucket(&js, names::RETAINED_BUCKET, replicas, Duration::ZERO).await?;
        let sessions_kv = bucket(&js, names::SESSIONS_BUCKET, replicas, Duration::ZERO).await?;
        let wills_kv = bucket(&js, names::WILLS_BUCKET, replicas, Duration::ZERO).await?;
        let nodes_kv = bucket(&js, names::NODES_BUCKET, replicas, config.node_timeout * 20).await?;

        let max_payload = client.server_info().max_payload;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let interest = Arc::new(RwLock::new(RemoteInterest::default()));
        let fabric = Arc::new(NatsFabric {
            node: config.node_id.clone().into(),
            interest: interest.clone(),
            commands,
            next_token: AtomicU64::new(1),
            acks: Arc::new(Acks::default()),
            core_queued: Arc::new(AtomicUsize::new(0)),
            room: crate::fabric::Room::default(),
            stats,
            owned: Mutex::new(HashSet::new()),
            runner: std::sync::OnceLock::new(),
            max_packet: u32::try_from(max_payload.saturating_sub(FRAME_ROOM)).unwrap_or(u32::MAX),
        });
        let inner = Arc::new(Inner {
            config: config.clone(),
            broker: broker.clone(),
            client,
            js,
            fabric: fabric.clone(),
            interest: interest.clone(),
            members: Mutex::new(HashMap::new()),
            sessions: sessions_kv,
            wills: wills_kv,
            seen: Mutex::new(Seen::default()),
            core_seq: AtomicU64::new(1),
            moved: Mutex::new(Vec::new()),
            claiming: Mutex::new(HashSet::new()),
            boot: broker_nonce(),
            started_ms: wall_ms(),
        });

        let _ = fabric.runner.set(Arc::downgrade(&inner));
        let mut tasks = Vec::new();
        let takeovers = inner
            .client
            .subscribe(names::takeover_subject(&config.node_id))
            .await
            .map_err(|e| format!("cluster takeover subscription: {e}"))?;
        tasks.push(tokio::spawn(inner.clone().serve_takeovers(takeovers)));
        let owner_checks = inner
            .client
            .subscribe(names::owner_check_subject(&config.node_id))
            .await
            .map_err(|e| format!("cluster owner-check subscription: {e}"))?;
        tasks.push(tokio::spawn(inner.clone().serve_owner_checks(owner_checks)));
        // The interest table and the retained messages are loaded before clients come.
        let (loaded, interest_task) = watch(interest_kv.clone(), {
            let interest = interest.clone();
            move |entry: kv::Entry| {
                let value = matches!(entry.operation, kv::Operation::Put).then_some(&entry.value);
                interest
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .apply(&entry.key, value.map(|v| &v[..]));
            }
        })
        .await?;
        tasks.push(interest_task);
        let _ = loaded.await;
        let (loaded, retained_task) = watch(retained_kv.clone(), {
            let inner = inner.clone();
            move |entry: kv::Entry| inner.retained_changed(entry)
        })
        .await?;
        tasks.push(retained_task);
        let _ = loaded.await;
        let (_, nodes_task) = watch(nodes_kv.clone(), {
            let inner = inner.clone();
            move |entry: kv::Entry| {
                if let (kv::Operation::Put, Ok(beat)) = (
                    entry.operation,
                    serde_json::from_slice::<Heartbeat>(&entry.value),
                ) {
                    inner.lock_members().insert(entry.key, beat);
                } else {
                    inner.lock_members().remove(&entry.key);
                }
            }
        })
        .await?;
        tasks.push(nodes_task);

        // Keys this node wrote in an earlier run: what the restored sessions still want is
        // written again below, the rest is deleted.
        let stale = interest
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys_of(&config.node_id);
        let (kv_tx, kv_rx) = mpsc::unbounded_channel();
        tasks.push(tokio::spawn(inner.clone().kv_writer(
            kv_rx,
            interest_kv,
            retained_kv,
        )));
        broker.set_fabric(fabric.clone());
        tasks.push(tokio::spawn(inner.clone().forwarder(
            command_rx,
            kv_tx.clone(),
            stream.clone(),
        )));
        let _ = kv_tx.send(KvOp::Reconcile(stale));
        let consumer = durable_consumer(
            &stream,
            &names::node_consumer(&config.node_id),
            &names::node_subject(&config.node_id),
        )
        .await?;
        inner.reconcile_pending_wills().await;
        // Sessions this node kept across its death whose clients went on elsewhere meanwhile:
        // their messages go after them before the backlog is read.
        inner.return_stale_sessions().await;
        tasks.push(tokio::spawn(inner.clone().consume(consumer, None)));
        tasks.push(tokio::spawn(inner.clone().heartbeat(nodes_kv)));
        // Wills this node's previous run left (it died with those clients connected), then
        // those of nodes found dead from now on.
        inner.publish_orphaned_wills(&config.node_id).await;
        tasks.push(tokio::spawn(inner.clone().watch_for_dead_nodes()));
        tracing::info!(node = %config.node_id, servers = ?config.servers, "joined the cluster");
        Ok(Cluster { inner, tasks })
    }

    pub fn stats(&self) -> &FabricStats {
        &self.inner.fabric.stats
    }

    pub fn node_id(&self) -> &str {
        &self.inner.config.node_id
    }

    pub fn status(&self) -> ClusterStatus {
        let now = wall_ms();
        let timeout = self.inner.config.node_timeout.as_millis() as u64;
        let mut members: Vec<Member> = self
            .inner
            .lock_members()
            .values()
            .map(|beat| {
                let last_seen_ms = now.saturating_sub(beat.at_ms);
                Member {
                    heartbeat: beat.clone(),
                    alive: last_seen_ms <= timeout,
                    last_seen_ms,
                }
            })
            .collect();
        members.sort_by(|a, b| a.heartbeat.node.cmp(&b.heartbeat.node));
        let interest = self
            .inner
            .interest
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let (remote_filters, _) = interest.counts(&self.inner.config.node_id);
        let groups = interest
            .groups()
            .into_iter()
            .map(|(share, filter, nodes)| SharedGroupStatus {
                share,
                filter,
                nodes,
            })
            .collect();
        drop(interest);
        ClusterStatus {
            node: self.inner.config.node_id.clone(),
            nats_connected: matches!(
                self.inner.client.connection_state(),
                async_nats::connection::State::Connected
            ),
            nats_server: self.inner.client.server_info().host,
            members,
            remote_filters,
            groups,
        }
    }

    /// Sends what is queued for NATS and stops (the broker has stopped serving).
    pub async fn shutdown(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.client.flush()).await;
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn broker_nonce() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(SystemTime::now())
}

async fn get_or_create_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, String> {
    let name = config.name.clone();
    js.get_or_create_stream(config).await.map_err(|e| {
        format!("JetStream stream {name}: {e} (is JetStream enabled on the NATS server?)")
    })
}

/// A key-value bucket, made if missing. The bucket's stream is made here with the key-value
/// conventions (`KV_<bucket>` on `$KV.<bucket>.>`, one value per key, rollups, no deletes of
/// single messages, direct gets): the client library's own call first asks for account
/// details in a form NATS 2.9 does not answer with.
async fn bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    max_age: Duration,
) -> Result<kv::Store, String> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    let created = js
        .get_or_create_stream(stream::Config {
            name: format!("KV_{name}"),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            max_age,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await;
    if let Err(e) = created {
        return Err(format!("JetStream bucket {name}: {e}"));
    }
    js.get_key_value(name)
        .await
        .map_err(|e| format!("JetStream bucket {name}: {e}"))
}

const ACK_WAIT: Duration = Duration::from_secs(5);

async fn durable_consumer(
    stream: &stream::Stream,
    name: &str,
    subject: &str,
) -> Result<consumer::Consumer<consumer::pull::Config>, String> {
    stream
        .get_or_create_consumer(
            name,
            consumer::pull::Config {
                durable_name: Some(name.to_owned()),
                filter_subject: subject.to_owned(),
                ack_policy: consumer::AckPolicy::Explicit,
                // A node that dies holding messages it has not stored gets them again this
                // long after (acknowledged as soon as the local store has them).
                ack_wait: ACK_WAIT,
                max_ack_pending: 20_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("JetStream consumer {name}: {e}"))
}

/// Watches every key of `kv` from its current values on, calling `apply` for each entry.
/// The receiver is told once the current values are all applied.
async fn watch(
    kv: kv::Store,
    mut apply: impl FnMut(kv::Entry) + Send + 'static,
) -> Result<(tokio::sync::oneshot::Receiver<()>, JoinHandle<()>), String> {
    let empty = kv
        .status()
        .await
        .map_err(|e| format!("bucket status: {e}"))?
        .values()
        == 0;
    let mut entries = kv
        .watch_with_history(">")
        .await
        .map_err(|e| format!("bucket watch: {e}"))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    if empty {
        let _ = tx.take().map(|tx| tx.send(()));
    }
    let task = tokio::spawn(async move {
        while let Some(entry) = entries.next().await {
            match entry {
                Ok(entry) => {
                    let caught_up = entry.delta == 0;
                    apply(entry);
                    if caught_up {
                        let _ = tx.take().map(|tx| tx.send(()));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cluster bucket watch"),
            }
        }
        tracing::warn!("cluster bucket watch ended");
    });
    Ok((rx, task))
}

/// A local filter's NATS subscriptions and how many local subscriptions use it.
struct LocalFilter {
    count: usize,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for LocalFilter {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

impl Inner {
    /// Makes this node the owner of `client_id`'s session in the sessions bucket (compare and
    /// set on the key's revision, so of two nodes claiming at once one wins and the other
    /// takes it from the winner), then has the previous owner close its client and hand the
    /// session over. Bounded in time: if NATS or the old node does not answer, the client
    /// goes on here without the old state (logged).
    ///
    /// The old node hands the session over only to its owner or to a login the ACL grants
    /// the client id (`login`, `granted`); otherwise it answers [`handover::REFUSED`], this
    /// node gives the key back, and the claim returns false (the CONNECT is refused). While
    /// the old node cannot be asked, ownership cannot be checked: the client goes on here
    /// with a new session, and what the old node kept for the id reaches it only through the
    /// client's ACL (ARCHITECTURE.md, known gaps).
    pub(crate) async fn claim(
        self: Arc<Self>,
        client_id: String,
        clean_start: bool,
        login: Login,
        granted: bool,
    ) -> bool {
        let key = names::session_key(&client_id);
        let me = self.config.node_id.clone();
        let work = async {
            // One claim of this id at a time on this node: a second CONNECT waits for the
            // first to settle, then sees where the key really points.
            let _claiming = loop {
                let inserted = self
                    .claiming
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(client_id.clone());
                if inserted {
                    break Claiming {
                        set: &self.claiming,
                        client_id: client_id.clone(),
                    };
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            for _ in 0..8 {
                let entry = self.sessions.entry(&key).await.map_err(|e| e.to_string())?;
                let (owner, revision) = match &entry {
                    Some(e) if e.operation == kv::Operation::Put => (
                        Some(String::from_utf8_lossy(&e.value).into_owned()),
                        Some(e.revision),
                    ),
                    _ => (None, None),
                };
                if owner.as_deref() == Some(me.as_str()) {
                    return Ok(true);
                }
                let request = serde_json::to_vec(&handover::TakeoverRequest {
                    client_id: client_id.clone(),
                    clean_start,
                    node: me.clone(),
                    login: Some((login.username.clone(), login.certificate.clone())),
                    granted,
                })
                .unwrap_or_default();
                // The owner says first whether this login may have the session; only then is
                // the key moved, so a refused claim never points it away from the session.
                if let Some(owner) = &owner {
                    match self.check_owner(owner, Bytes::from(request.clone())).await {
                        Check::Refused => {
                            tracing::debug!(client_id, %login, node = owner, "connection refused: the client id's session on another node belongs to another login");
                            return Ok(false);
                        }
                        Check::Busy => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        Check::Allowed => {}
                    }
                }
                let value = Bytes::from(me.clone().into_bytes());
                let written = match revision {
                    Some(revision) => self
                        .sessions
                        .update(&key, value, revision)
                        .await
                        .map_err(|e| e.to_string()),
                    None => self
                        .sessions
                        .create(&key, value)
                        .await
                        .map_err(|e| e.to_string()),
                };
                let Ok(mine) = written else {
                    // Another node changed the key meanwhile: look again.
                    continue;
                };
                let Some(owner) = owner else {
                    return Ok(true);
                };
                match self.take_over(&owner, Bytes::from(request)).await {
                    Err(why) if why == REFUSED_BY_OWNER => {
                        // The session stays where it is, and so does the key.
                        self.give_back(&key, &owner, mine).await;
                        tracing::debug!(client_id, %login, node = owner, "connection refused: the client id's session on another node belongs to another login");
                        return Ok(false);
                    }
                    Err(why) if why == BUSY => {
                        // That node is claiming the id itself: look again once it settled.
                        self.give_back(&key, &owner, mine).await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Ok(None) => {}
                    Ok(Some(parts)) => match handover::decode(&parts) {
                        Ok(stored) => {
                            tracing::debug!(
                                client_id,
                                from = owner,
                                parts = parts.len(),
                                deliveries = stored.deliveries.len(),
                                "session taken over from another node"
                            );
                            self.broker.adopt(stored, Instant::now());
                        }
                        Err(why) => {
                            tracing::warn!(
                                client_id,
                                from = owner,
                                why,
                                "a handed-over session does not decode; it starts anew here"
                            )
                        }
                    },
                    Err(why) => {
                        tracing::warn!(client_id, from = owner, why, "the node that held the session did not hand it over; it starts anew here")
                    }
                }
                return Ok(true);
            }
            Err("the session key kept changing".to_owned())
        };
        match tokio::time::timeout(Duration::from_secs(10), work).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return false,
            Ok(Err(e)) => {
                tracing::warn!(client_id, error = %e, "claiming a client id in the cluster failed; serving it here")
            }
            Err(_) => tracing::warn!(
                client_id,
                "claiming a client id in the cluster timed out; serving it here"
            ),
        }
        self.fabric
            .owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client_id);
        true
    }

    /// Asks `owner` whether the login in `request` may have the session (see
    /// [`Inner::serve_owner_checks`]). A node that does not answer (an older one, or one that
    /// is gone) leaves it to the takeover request, which checks again.
    async fn check_owner(&self, owner: &str, request: Bytes) -> Check {
        let asked = self
            .client
            .request(names::owner_check_subject(owner), request);
        match tokio::time::timeout(Duration::from_secs(3), asked).await {
            Ok(Ok(reply)) if &reply.payload[..] == handover::REFUSED => Check::Refused,
            Ok(Ok(reply)) if &reply.payload[..] == handover::BUSY => Check::Busy,
            _ => Check::Allowed,
        }
    }

    /// Answers other nodes' owner checks: "refused" when this node holds the client id's
    /// session for another login, "busy" while it is claiming the id itself, allowed
    /// (empty) otherwise. Changes nothing.
    async fn serve_owner_checks(self: Arc<Self>, mut requests: async_nats::Subscriber) {
        while let Some(msg) = requests.next().await {
            let Some(reply) = msg.reply else { continue };
            let Ok(request) = serde_json::from_slice::<handover::TakeoverRequest>(&msg.payload)
            else {
                continue;
            };
            let claiming = self
                .claiming
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&request.client_id);
            let answer = if claiming {
                handover::BUSY
            } else {
                let (username, certificate) = request.login.unwrap_or_default();
                let login = Login {
                    username,
                    certificate,
                };
                let allowed = self.broker.may_hand_over(
                    &request.client_id,
                    &login,
                    request.granted,
                    Instant::now(),
                );
                if allowed {
                    &b""[..]
                } else {
                    handover::REFUSED
                }
            };
            let _ = self.client.publish(reply, Bytes::from_static(answer)).await;
        }
    }

    /// Points the session key back at `owner` if it still points here (at revision `mine`,
    /// or a later one this node wrote): a claim that did not go through leaves the key as
    /// it found it.
    async fn give_back(&self, key: &str, owner: &str, mine: u64) {
        let me = self.config.node_id.as_bytes();
        let back = || Bytes::from(owner.to_owned().into_bytes());
        if self.sessions.update(key, back(), mine).await.is_ok() {
            return;
        }
        match self.sessions.entry(key).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put && &e.value[..] == me => {
                if let Err(err) = self.sessions.update(key, back(), e.revision).await {
                    tracing::warn!(key, error = %err, "cannot give a session key back");
                }
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(key, error = %err, "cannot give a session key back"),
        }
    }

    /// Asks `owner` for a session (`request`: a [`handover::TakeoverRequest`]) and gathers
    /// the parts of its answer. `None`: it had none.
    async fn take_over(&self, owner: &str, request: Bytes) -> Result<Option<Vec<Bytes>>, String> {
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| e.to_string())?;
        self.client
            .publish_with_reply(names::takeover_subject(owner), inbox, request)
            .await
            .map_err(|e| e.to_string())?;
        let gathered = async {
            let mut parts = Vec::new();
            loop {
                // Each part within 3 s: a long queue takes as long as it needs.
                let reply = tokio::time::timeout(Duration::from_secs(3), replies.next())
                    .await
                    .map_err(|_| format!("no answer within 3 s after {} parts", parts.len()))?
                    .ok_or("the reply subscription ended")?;
                if reply.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                    return Err("it is not connected to NATS".to_owned());
                }
                if reply.payload.is_empty() {
                    return Ok(None);
                }
                if &reply.payload[..] == handover::REFUSED {
                    return Err(REFUSED_BY_OWNER.to_owned());
                }
                if &reply.payload[..] == handover::BUSY {
                    return Err(BUSY.to_owned());
                }
                let (_, count) = handover::part_of(&reply.payload)?;
                parts.push(reply.payload);
                if parts.len() >= count as usize {
                    return Ok(Some(parts));
                }
            }
        }
        .await;
        let _ = replies.unsubscribe().await;
        gathered
    }

    /// Publishes the wills `node` left (it died with their clients connected), each exactly
    /// once cluster-wide: a node takes a will by deleting its key at the revision it read,
    /// which only one node can do, and then publishes it (after its Will Delay Interval).
    async fn publish_orphaned_wills(self: &Arc<Self>, node: &str) {
        let keys: Vec<String> = match self.wills.keys().await {
            Ok(keys) => keys.filter_map(|k| async move { k.ok() }).collect().await,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the cluster's wills");
                return;
            }
        };
        // This node's own pending wills that its store kept are its own to publish (see
        // `reconcile_pending_wills`).
        let own: HashSet<String> = if node == self.config.node_id {
            self.broker
                .pending_wills()
                .into_iter()
                .map(|(client_id, _, _)| client_id)
                .collect()
        } else {
            HashSet::new()
        };
        let mut published = 0;
        for key in keys
            .into_iter()
            .filter(|k| names::will_node(k) == Some(node))
        {
            let Ok(Some(entry)) = self.wills.entry(&key).await else {
                continue;
            };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            let pending = names::pending_will_client(&key);
            if let Some(client_id) = &pending {
                // Taken by another node already, or this node's own.
                if entry.value.is_empty() || own.contains(client_id) {
                    continue;
                }
                // Taken by marking it so: the node, should it come back, knows it is done.
                if self
                    .wills
                    .update(&key, Bytes::new(), entry.revision)
                    .await
                    .is_err()
                {
                    continue;
                }
            } else if self
                .wills
                .delete_expect_revision(&key, Some(entry.revision))
                .await
                .is_err()
            {
                // Another node took it.
                continue;
            }
            let decoded = match pending {
                Some(_) => wire::decode_pending_will(&entry.value).map(|(will, due)| {
                    (will, Duration::from_millis(due.saturating_sub(wall_ms())))
                }),
                None => wire::decode_will(&entry.value)
                    .map(|(will, delay)| (will, Duration::from_secs(u64::from(delay)))),
            };
            match decoded {
                Ok((will, wait)) => {
                    published += 1;
                    let broker = self.broker.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        broker.publish_orphaned_will(will, Instant::now());
                    });
                }
                Err(why) => {
                    tracing::warn!(key, why, "a will in the cluster bucket does not decode")
                }
            }
        }
        if published > 0 {
            tracing::info!(
                node,
                published,
                "published the wills of clients of a node that died"
            );
        }
    }

    /// At start: the pending wills of offline sessions this node's store kept. One another
    /// node took while this node was down (its key marked taken) is dropped here; the others
    /// are this node's again (claimed at the revision read, so a node taking it right now
    /// and this one cannot both publish it) or written anew.
    async fn reconcile_pending_wills(&self) {
        let me = &self.config.node_id;
        let mut dropped = 0;
        for (client_id, due, will) in self.broker.pending_wills() {
            let key = names::pending_will_key(me, &client_id);
            let value = wire::encode_pending_will(due, &will);
            let ours = match self.wills.entry(&key).await {
                Ok(Some(e)) if e.operation == kv::Operation::Put && e.value.is_empty() => false,
                Ok(Some(e)) if e.operation == kv::Operation::Put => {
                    self.wills.update(&key, value, e.revision).await.is_ok()
                }
                Ok(_) => {
                    if let Err(e) = self.wills.put(&key, value).await {
                        tracing::warn!(client_id, error = %e, "cannot record a pending will in the cluster");
                    }
                    true
                }
                Err(e) => {
                    tracing::warn!(client_id, error = %e, "cannot read a pending will's key; keeping it");
                    true
                }
            };
            if !ours {
                self.broker.drop_pending_will(&client_id);
                let _ = self.wills.delete(&key).await;
                dropped += 1;
            }
        }
        if dropped > 0 {
            tracing::info!(
                dropped,
                "pending wills another node published while this one was down were dropped"
            );
        }
    }

    /// Looks for nodes whose heartbeat stopped and publishes their clients' wills.
    async fn watch_for_dead_nodes(self: Arc<Self>) {
        let timeout = self.config.node_timeout.as_millis() as u64;
        // Each dead run of a node (by its start time) is handled once.
        let mut handled: HashSet<(String, u64)> = HashSet::new();
        let mut interval = tokio::time::interval(self.config.heartbeat);
        loop {
            interval.tick().await;
            let now = wall_ms();
            let dead: Vec<(String, u64)> = self
                .lock_members()
                .values()
                .filter(|b| b.node != self.config.node_id && now.saturating_sub(b.at_ms) > timeout)
                .map(|b| (b.node.clone(), b.started_ms))
                .filter(|d| !handled.contains(d))
                .collect();
            for (node, started) in dead {
                tracing::warn!(
                    node,
                    "cluster node stopped sending heartbeats; taking over its clients' wills"
                );
                self.publish_orphaned_wills(&node).await;
                handled.insert((node, started));
            }
        }
    }

    /// At start: a persistent session restored from this node's store whose client id is now
    /// owned by another node (the client connected there while this node was down) is handed
    /// over to it: its queued and in-flight messages go there as copies for that session, and
    /// what JetStream kept for this node while it was down follows (as for a session that
    /// moved). The client sees them once it subscribes there again.
    async fn return_stale_sessions(self: &Arc<Self>) {
        let me = self.config.node_id.clone();
        for session in self.broker.sessions() {
            let client_id = session.client_id.to_string();
            if client_id.starts_with(petrel_engine::connection::INTERNAL_CLIENT_PREFIX) {
                continue;
            }
            let Ok(Some(entry)) = self.sessions.entry(names::session_key(&client_id)).await else {
                continue;
            };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            let owner = String::from_utf8_lossy(&entry.value).into_owned();
            if owner == me {
                continue;
            }
            // The client is already there: nothing to check (its login was, when it connected).
            let Ok(Some(state)) = self
                .broker
                .hand_over(&client_id, false, None, Instant::now())
            else {
                continue;
            };
            self.remember_moved(&client_id, &owner, &state);
            let count = state.deliveries.len();
            for (i, d) in state.deliveries.iter().enumerate() {
                let frame = wire::encode(&me, d.seq, Some(&client_id), &d.message);
                let id = format!("{me}-{:x}-stale-{client_id}-{i}", self.boot);
                self.clone()
                    .store_copy(Vec::new(), names::node_subject(&owner), id, frame)
                    .await;
            }
            tracing::info!(
                client_id,
                to = owner,
                messages = count,
                "a session kept across this node's restart went to the node its client uses now"
            );
        }
    }

    /// Notes that `client_id`'s session (`state`) went to `node`: for `MOVED_FORWARD`, what
    /// arrives here for its ordinary filters is forwarded there.
    fn remember_moved(
        &self,
        client_id: &str,
        node: &str,
        state: &petrel_engine::store::StoredSession,
    ) {
        let mut moved = self.moved.lock().unwrap_or_else(|e| e.into_inner());
        remember_moved(&mut moved, client_id, node, state);
    }

    /// Sends a copy of `message` (stream sequence `seq` here) to each session that moved
    /// away lately and has a filter matching it, and waits until JetStream has the copies:
    /// the original is acknowledged only after.
    /// `seq` and `index`: the JetStream sequence of the message (batch) it came in, and its
    /// place there.
    async fn forward_to_moved(self: &Arc<Self>, message: &Arc<Message>, seq: u64, index: usize) {
        let targets: Vec<(String, String)> = {
            let mut moved = self.moved.lock().unwrap_or_else(|e| e.into_inner());
            if moved.is_empty() {
                return;
            }
            let now = Instant::now();
            moved.retain(|m| m.until > now);
            moved
                .iter()
                .filter(|m| {
                    m.filters
                        .iter()
                        .any(|f| petrel_engine::topic_index::filter_matches(f, &message.topic))
                })
                .map(|m| (m.node.clone(), m.client_id.clone()))
                .collect()
        };
        for (node, client_id) in targets {
            let frame = wire::encode(&self.config.node_id, seq, Some(&client_id), message);
            let id = format!("{}-fwd-{seq}-{index}-{client_id}", self.config.node_id);
            self.clone()
                .store_copy(Vec::new(), names::node_subject(&node), id, frame)
                .await;
        }
    }

    /// Requests from other nodes for a session this node holds: its client is closed as
    /// taken over and the session goes to the asking node.
    async fn serve_takeovers(self: Arc<Self>, mut requests: async_nats::Subscriber) {
        let max_payload = self.client.server_info().max_payload.max(64 * 1024);
        while let Some(msg) = requests.next().await {
            let Ok(request) = serde_json::from_slice::<handover::TakeoverRequest>(&msg.payload)
            else {
                continue;
            };
            if self
                .claiming
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&request.client_id)
            {
                // This node is claiming the id itself: the asker looks again shortly.
                if let Some(reply) = msg.reply {
                    let _ = self
                        .client
                        .publish(reply, Bytes::from_static(handover::BUSY))
                        .await;
                }
                continue;
            }
            let login = request.login.clone().map(|(username, certificate)| Login {
                username,
                certificate,
            });
            let claimant = login.as_ref().map(|l| (l, request.granted));
            // The session leaves and its forwarding starts under one hold of `moved`: a message
            // routed here meanwhile either lands in the queue that moves, or finds the record
            // (`forward_to_moved` takes the lock after routing) and follows the session.
            let handed = {
                let mut moved = self.moved.lock().unwrap_or_else(|e| e.into_inner());
                let handed = self.broker.hand_over(
                    &request.client_id,
                    request.clean_start,
                    claimant,
                    Instant::now(),
                );
                if let Ok(Some(state)) = &handed {
                    remember_moved(&mut moved, &request.client_id, &request.node, state);
                }
                handed
            };
            let state = match handed {
                Ok(state) => state,
                Err(NotOwner) => {
                    // Another login's session: it stays here, its client connected.
                    tracing::debug!(
                        client_id = request.client_id,
                        from = request.node,
                        "takeover refused: the session belongs to another login"
                    );
                    if let Some(reply) = msg.reply {
                        let _ = self
                            .client
                            .publish(reply, Bytes::from_static(handover::REFUSED))
                            .await;
                    }
                    continue;
                }
            };
            self.fabric
                .owned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&request.client_id);
            let parts = match &state {
                Some(state) => {
                    let (parts, left_out) = handover::encode(state, max_payload - 1024);
                    if left_out > 0 {
                        tracing::warn!(client_id = request.client_id, to = request.node, left_out, "messages of a handed-over session larger than a NATS message may be were dropped");
                    }
                    parts
                }
                None => vec![Bytes::new()],
            };
            tracing::debug!(
                client_id = request.client_id,
                to = request.node,
                moved = state.is_some(),
                "client id taken over by another node"
            );
            if let Some(reply) = msg.reply {
                for part in parts {
                    let _ = self.client.publish(reply.clone(), part).await;
                }
            }
        }
    }

    fn lock_members(&self) -> std::sync::MutexGuard<'_, HashMap<String, Heartbeat>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn retained_changed(&self, entry: kv::Entry) {
        let Some(topic) = names::retained_topic(&entry.key) else {
            return;
        };
        let message = match entry.operation {
            kv::Operation::Put => match decode_message(&entry.value) {
                Ok(m) => m,
                Err(why) => {
                    tracing::warn!(
                        topic,
                        why,
                        "a retained message in the cluster bucket does not decode"
                    );
                    return;
                }
            },
            _ => {
                let Ok(topic) = TopicName::new(&topic) else {
                    return;
                };
                Message::new(
                    topic,
                    Bytes::new(),
                    QoS::AtMostOnce,
                    true,
                    Properties::default(),
                    0,
                )
            }
        };
        self.fabric
            .stats
            .retained_received
            .fetch_add(1, Ordering::Relaxed);
        self.broker.retain_remote(&Arc::new(message));
    }

    /// Takes the engine's commands in order: sends messages, and keeps this node's NATS
    /// subscriptions and consumers in step with its local interest. QoS 1/2 copies queued
    /// together go to JetStream as one batch per subject (see [`wire::Batch`]).
    async fn forwarder(
        self: Arc<Self>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        kv: mpsc::UnboundedSender<KvOp>,
        stream: stream::Stream,
    ) {
        let mut filters: HashMap<TopicFilter, LocalFilter> = HashMap::new();
        let mut groups: HashMap<u64, LocalFilter> = HashMap::new();
        let mut copies = Copies {
            left: HashMap::new(),
            open: HashMap::new(),
            stores: FuturesUnordered::new(),
            // Room for the NATS headers (the message id).
            limit: self.client.server_info().max_payload.saturating_sub(1024),
        };
        loop {
            tokio::select! {
                command = commands.recv() => {
                    let Some(command) = command else { break };
                    let mut next = Some(command);
                    let mut taken = 0;
                    while let Some(command) = next.take() {
                        match command {
                            Command::Durable { token, targets, message } => {
                                self.batch(&mut copies, token, &targets, &message);
                            }
                            other => {
                                // What came before it goes first.
                                self.send_batches(&mut copies);
                                self.command(other, &mut filters, &mut groups, &kv, &stream).await;
                            }
                        }
                        taken += 1;
                        if taken < BATCH_COMMANDS {
                            next = commands.try_recv().ok();
                        }
                    }
                    self.send_batches(&mut copies);
                }
                Some(tokens) = copies.stores.next(), if !copies.stores.is_empty() => {
                    for token in tokens {
                        copies.stored(&self.fabric, token);
                    }
                }
            }
        }
    }

    /// Adds one QoS 1/2 message to the batch of each subject it goes to.
    fn batch(
        self: &Arc<Self>,
        copies: &mut Copies,
        token: u64,
        targets: &crate::interest::Targets,
        message: &Message,
    ) {
        let subjects: Vec<String> = targets
            .nodes
            .iter()
            .map(|n| names::node_subject(n))
            .chain(targets.groups.iter().map(|g| names::group_subject(*g)))
            .collect();
        let record = petrel_engine::record::message_record(message);
        if wire::Batch::header_len(&self.config.node_id) + wire::Batch::ENTRY_HEADER + record.len()
            > copies.limit
        {
            // Only a message whose topic alias hid a long topic can outgrow the packet size
            // limit the fabric set; it cannot cross, and its acknowledgement must not wait
            // forever.
            self.fabric
                .stats
                .dropped_too_large
                .fetch_add(subjects.len() as u64, Ordering::Relaxed);
            tracing::error!(
                topic = %message.topic,
                bytes = record.len(),
                "a QoS 1/2 message is larger than a NATS message may be; not sent to other nodes"
            );
            self.fabric.acks.complete(token);
            return;
        }
        copies.left.insert(token, subjects.len());
        for subject in subjects {
            let full = copies
                .open
                .get(&subject)
                .is_some_and(|b| b.len() + wire::Batch::ENTRY_HEADER + record.len() > copies.limit);
            if full {
                if let Some(batch) = copies.open.remove(&subject) {
                    self.send_batch(copies, subject.clone(), batch);
                }
            }
            copies
                .open
                .entry(subject)
                .or_insert_with(|| wire::Batch::new(&self.config.node_id))
                .push(token, &record);
        }
    }

    fn send_batches(self: &Arc<Self>, copies: &mut Copies) {
        let open: Vec<(String, wire::Batch)> = copies.open.drain().collect();
        for (subject, batch) in open {
            self.send_batch(copies, subject, batch);
        }
    }

    fn send_batch(self: &Arc<Self>, copies: &mut Copies, subject: String, batch: wire::Batch) {
        let (frame, tokens) = batch.finish();
        // The same id on every try, so that JetStream keeps one.
        let id = format!(
            "{}-{:x}-{}-{subject}",
            self.config.node_id, self.boot, tokens[0]
        );
        copies.stores.push(Box::pin(
            self.clone().store_copy(tokens, subject, id, frame),
        ));
    }

    /// Every command but a QoS 1/2 message.
    async fn command(
        self: &Arc<Self>,
        command: Command,
        filters: &mut HashMap<TopicFilter, LocalFilter>,
        groups: &mut HashMap<u64, LocalFilter>,
        kv: &mpsc::UnboundedSender<KvOp>,
        stream: &stream::Stream,
    ) {
        match command {
            Command::Core(message) => {
                self.fabric.core_queued.fetch_sub(1, Ordering::SeqCst);
                self.fabric.room.drained(&self.fabric.core_queued);
                let seq = self.core_seq.fetch_add(1, Ordering::Relaxed);
                let subject = subject::topic_subject(names::CORE_PREFIX, &message.topic);
                let frame = wire::encode(&self.config.node_id, seq, None, &message);
                if self.client.publish(subject, frame).await.is_ok() {
                    self.fabric.stats.sent_core.fetch_add(1, Ordering::Relaxed);
                }
            }
            Command::Durable { .. } => {}
            Command::Will { key, value } => {
                let _ = kv.send(KvOp::Will { key, value });
            }
            Command::Retain { token, message } => {
                let _ = kv.send(KvOp::Retain { token, message });
            }
            Command::Interest { filter, added } => {
                self.local_interest(filters, kv, filter, added).await;
            }
            Command::Withdraw(filter) => {
                // Unless a subscription came back meanwhile.
                if !filters.contains_key(&filter) {
                    let _ = kv.send(KvOp::Interest {
                        key: names::ordinary_key(&self.config.node_id, &filter),
                        value: None,
                    });
                }
            }
            Command::Group {
                share,
                filter,
                present,
            } => {
                self.local_group(groups, kv, stream, share, filter, present)
                    .await;
            }
        }
    }

    /// Stores one batch of QoS 1/2 copies in JetStream, trying again until it is stored
    /// (the same message id each time, so JetStream keeps one). Returns their tokens.
    async fn store_copy(
        self: Arc<Self>,
        tokens: Vec<u64>,
        subject: String,
        id: String,
        frame: Bytes,
    ) -> Vec<u64> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            let result = match self
                .js
                .publish_with_headers(subject.clone(), headers, frame.clone())
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(()) => {
                    self.fabric
                        .stats
                        .sent_durable
                        .fetch_add(tokens.len() as u64, Ordering::Relaxed);
                    return tokens;
                }
                Err(e) => {
                    self.fabric.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(subject, error = %e, "storing messages in JetStream failed; trying again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn local_interest(
        self: &Arc<Self>,
        filters: &mut HashMap<TopicFilter, LocalFilter>,
        kv: &mpsc::UnboundedSender<KvOp>,
        filter: TopicFilter,
        added: bool,
    ) {
        if added {
            if let Some(local) = filters.get_mut(&filter) {
                local.count += 1;
                return;
            }
            let mut tasks = Vec::new();
            for subject in subject::filter_subjects(names::CORE_PREFIX, &filter) {
                match self.client.subscribe(subject.clone()).await {
                    Ok(sub) => tasks.push(tokio::spawn(self.clone().receive_core(sub, None))),
                    Err(e) => tracing::warn!(subject, error = %e, "cluster subscription failed"),
                }
            }
            let _ = kv.send(KvOp::Interest {
                key: names::ordinary_key(&self.config.node_id, &filter),
                value: Some(Bytes::new()),
            });
            filters.insert(filter, LocalFilter { count: 1, tasks });
        } else if let Some(local) = filters.get_mut(&filter) {
            local.count -= 1;
            if local.count == 0 {
                filters.remove(&filter);
                // The other nodes are told a little later: a session that just moved to
                // another node has its messages forwarded from here until they know where
                // it went (see `forward_to_moved`).
                let commands = self.fabric.commands.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(WITHDRAW_AFTER).await;
                    let _ = commands.send(Command::Withdraw(filter));
                });
            }
        }
    }

    async fn local_group(
        self: &Arc<Self>,
        groups: &mut HashMap<u64, LocalFilter>,
        kv: &mpsc::UnboundedSender<KvOp>,
        stream: &stream::Stream,
        share: Box<str>,
        filter: TopicFilter,
        present: bool,
    ) {
        let hash = names::group_hash(&share, &filter);
        let key = names::group_key(hash, &self.config.node_id);
        if !present {
            if groups.remove(&hash).is_some() {
                let _ = kv.send(KvOp::Interest { key, value: None });
            }
            return;
        }
        if groups.contains_key(&hash) {
            return;
        }
        let mut tasks = Vec::new();
        let route = Some((share.clone(), filter.clone()));
        for subject in subject::filter_subjects(names::CORE_PREFIX, &filter) {
            match self
                .client
                .queue_subscribe(subject.clone(), names::group_queue(hash))
                .await
            {
                Ok(sub) => tasks.push(tokio::spawn(self.clone().receive_core(sub, route.clone()))),
                Err(e) => tracing::warn!(subject, error = %e, "cluster subscription failed"),
            }
        }
        match durable_consumer(
            stream,
            &names::group_consumer(hash),
            &names::group_subject(hash),
        )
        .await
        {
            Ok(consumer) => tasks.push(tokio::spawn(self.clone().consume(consumer, route))),
            Err(e) => tracing::warn!(error = %e, "shared group consumer"),
        }
        let _ = kv.send(KvOp::Interest {
            key,
            value: Some(Bytes::from(names::group_value(&share, &filter))),
        });
        groups.insert(hash, LocalFilter { count: 1, tasks });
    }

    /// QoS 0 messages from a NATS subscription: for this node's ordinary subscribers, or
    /// (`group`) for one member of a local shared group.
    async fn receive_core(
        self: Arc<Self>,
        mut sub: async_nats::Subscriber,
        group: Option<(Box<str>, TopicFilter)>,
    ) {
        while let Some(msg) = sub.next().await {
            let frame = match wire::decode(&msg.payload) {
                Ok(frame) => frame,
                Err(why) => {
                    tracing::warn!(subject = %msg.subject, why, "a cluster message does not decode");
                    continue;
                }
            };
            match &group {
                None => {
                    // Our own publishes come back to us (shared groups need the echo): the
                    // local subscribers already have them.
                    if frame.origin == self.config.node_id
                        || !self
                            .seen
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .first(&frame.origin, frame.seq)
                    {
                        continue;
                    }
                    self.fabric
                        .stats
                        .received_core
                        .fetch_add(1, Ordering::Relaxed);
                    self.broker.route_remote(&Arc::new(frame.message));
                }
                Some((share, filter)) => {
                    if frame.origin != self.config.node_id {
                        self.fabric
                            .stats
                            .received_core
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    self.broker
                        .route_group(share, filter, &Arc::new(frame.message));
                }
            }
        }
    }

    /// QoS 1/2 messages from a durable consumer (this node's, or a shared group's): routed,
    /// then acknowledged to JetStream once the local store has the deliveries, so a node that
    /// dies before that gets them again. Routing does not wait for the store: what was routed
    /// waits in `unacked`, in order, and is acknowledged as the store catches up.
    async fn consume(
        self: Arc<Self>,
        consumer: consumer::Consumer<consumer::pull::Config>,
        group: Option<(Box<str>, TopicFilter)>,
    ) {
        let mut backoff = Duration::from_millis(100);
        let mut unacked: VecDeque<(u64, jetstream::Message)> = VecDeque::new();
        let store = self.broker.store();
        loop {
            // Short pulls with heartbeats: after a NATS server or stream leader is lost, a
            // stalled pull is noticed within seconds and a new one is made.
            let pull = consumer
                .stream()
                .max_messages_per_batch(500)
                .expires(Duration::from_secs(5))
                .heartbeat(Duration::from_secs(1))
                .messages()
                .await;
            let mut messages = match pull {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster consumer");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            loop {
                let waiting = unacked.front().map_or(0, |(token, _)| *token);
                let next = tokio::select! {
                    () = durable(store, waiting), if !unacked.is_empty() => {
                        ack_durable(store, &mut unacked).await;
                        continue;
                    }
                    next = messages.next() => next,
                };
                let message = match next {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        // Missed heartbeats, a lost leader: pull anew.
                        tracing::debug!(error = %e, "cluster consumer; pulling again");
                        break;
                    }
                    None => {
                        tracing::warn!("cluster consumer stream ended; reopening");
                        break;
                    }
                };
                if let Some(token) = self.route_copies(&message, group.as_ref()).await {
                    unacked.push_back((token, message));
                    ack_durable(store, &mut unacked).await;
                }
            }
        }
    }

    /// Routes what one JetStream message holds (one frame, or a batch). Returns the store
    /// token its acknowledgement waits for; `None` if it was answered already (refused, or
    /// handed back for later or for another node).
    async fn route_copies(
        self: &Arc<Self>,
        message: &jetstream::Message,
        group: Option<&(Box<str>, TopicFilter)>,
    ) -> Option<u64> {
        let frames = match wire::decode_any(&message.payload) {
            Ok(frames) => frames,
            Err(why) => {
                tracing::warn!(why, "a cluster message does not decode; dropped");
                let _ = message.ack().await;
                return None;
            }
        };
        let nak = || message.ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(100))));
        let count = frames.len() as u64;
        let mut token = 0;
        let stream_seq = message.info().map_or(0, |i| i.stream_sequence);
        let mut frames = frames.into_iter().enumerate();
        while let Some((index, frame)) = frames.next() {
            let message_arc = Arc::new(frame.message);
            let routed = match (group, &frame.target) {
                (None, Some(target)) => match self.broker.deliver_to(target, &message_arc) {
                    Some(routed) => routed,
                    // Forwarded for a session that is still on its way here (the claim has
                    // not brought it yet): again shortly, for a while.
                    None if message.info().is_ok_and(|i| i.delivered < 50) => {
                        let _ = nak().await;
                        return None;
                    }
                    None => petrel_engine::broker::Routed::none(),
                },
                (None, None) => {
                    let routed = self.broker.route_remote(&message_arc);
                    self.forward_to_moved(&message_arc, stream_seq, index).await;
                    routed
                }
                (Some((share, filter)), _) => {
                    match self.broker.route_group(share, filter, &message_arc) {
                        Some(routed) => routed,
                        // No member here any more: another node's turn.
                        None if index == 0 => {
                            let _ = nak().await;
                            return None;
                        }
                        // The last member left within the batch: the rest goes back to the
                        // group's subject for another node.
                        None => {
                            let mut rest = wire::Batch::new(&frame.origin);
                            rest.push(
                                frame.seq,
                                &petrel_engine::record::message_record(&message_arc),
                            );
                            for (_, f) in frames.by_ref() {
                                rest.push(
                                    f.seq,
                                    &petrel_engine::record::message_record(&f.message),
                                );
                            }
                            let (bytes, _) = rest.finish();
                            let id = format!("{}-rest-{stream_seq}-{index}", self.config.node_id);
                            let subject = names::group_subject(names::group_hash(share, filter));
                            self.clone()
                                .store_copy(Vec::new(), subject, id, bytes)
                                .await;
                            self.fabric
                                .stats
                                .received_durable
                                .fetch_add(index as u64, Ordering::Relaxed);
                            return Some(token);
                        }
                    }
                }
            };
            token = token.max(routed.token);
        }
        self.fabric
            .stats
            .received_durable
            .fetch_add(count, Ordering::Relaxed);
        Some(token)
    }

    /// Writes interest keys and retained messages in the order asked.
    async fn kv_writer(
        self: Arc<Self>,
        mut ops: mpsc::UnboundedReceiver<KvOp>,
        interest: kv::Store,
        retained: kv::Store,
    ) {
        let mut written: HashSet<String> = HashSet::new();
        while let Some(op) = ops.recv().await {
            match op {
                KvOp::Will { key, value } => {
                    // A will whose delete finds it gone was claimed by a node that thought
                    // this one dead: nothing to retry.
                    let result = match value {
                        Some(v) => self
                            .wills
                            .put(&key, v)
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string()),
                        None => self.wills.delete(&key).await.map_err(|e| e.to_string()),
                    };
                    if let Err(e) = result {
                        tracing::warn!(key, error = %e, "cluster will write failed");
                    }
                }
                KvOp::Interest { key, value } => {
                    let mut backoff = Duration::from_millis(50);
                    loop {
                        let result = match &value {
                            Some(v) => interest
                                .put(&key, v.clone())
                                .await
                                .map(|_| ())
                                .map_err(|e| e.to_string()),
                            None => interest.delete(&key).await.map_err(|e| e.to_string()),
                        };
                        match result {
                            Ok(()) => break,
                            Err(e) => {
                                tracing::warn!(key, error = %e, "cluster interest write failed; trying again");
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(Duration::from_secs(2));
                            }
                        }
                    }
                    if value.is_some() {
                        written.insert(key);
                    } else {
                        written.remove(&key);
                    }
                }
                KvOp::Reconcile(stale) => {
                    for key in stale.into_iter().filter(|k| !written.contains(k)) {
                        if let Err(e) = interest.delete(&key).await {
                            tracing::warn!(key, error = %e, "removing stale cluster interest");
                        }
                    }
                }
                KvOp::Retain { token, message } => {
                    let key = names::retained_key(&message.topic);
                    let mut backoff = Duration::from_millis(50);
                    loop {
                        let result = if message.payload.is_empty() {
                            retained.delete(&key).await.map_err(|e| e.to_string())
                        } else {
                            retained
                                .put(
                                    &key,
                                    Bytes::from(petrel_engine::record::message_record(&message)),
                                )
                                .await
                                .map(|_| ())
                                .map_err(|e| e.to_string())
                        };
                        match result {
                            Ok(()) => break,
                            Err(e) => {
                                tracing::warn!(key, error = %e, "cluster retained write failed; trying again");
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(Duration::from_secs(2));
                            }
                        }
                    }
                    self.fabric
                        .stats
                        .retained_sent
                        .fetch_add(1, Ordering::Relaxed);
                    self.fabric.acks.complete(token);
                }
            }
        }
    }

    /// Writes this node's heartbeat (membership and its figures) every beat.
    async fn heartbeat(self: Arc<Self>, nodes: kv::Store) {
        let mut last = (Instant::now(), 0u64, 0u64);
        let mut interval = tokio::time::interval(self.config.heartbeat);
        loop {
            interval.tick().await;
            let s = &self.fabric.stats;
            let out = s.sent_core.load(Ordering::Relaxed) + s.sent_durable.load(Ordering::Relaxed);
            let inn = s.received_core.load(Ordering::Relaxed)
                + s.received_durable.load(Ordering::Relaxed);
            let secs = last.0.elapsed().as_secs_f64().max(0.001);
            let stats = &self.broker.stats;
            let beat = Heartbeat {
                node: self.config.node_id.clone(),
                at_ms: wall_ms(),
                started_ms: self.started_ms,
                connections: stats.connections_current.load(Ordering::Relaxed),
                sessions: self.broker.session_count() as u64,
                messages_received: stats.messages_received.load(Ordering::Relaxed),
                messages_sent: stats.messages_sent.load(Ordering::Relaxed),
                cross_out_per_second: (out - last.1) as f64 / secs,
                cross_in_per_second: (inn - last.2) as f64 / secs,
                cross_out: out,
                cross_in: inn,
            };
            last = (Instant::now(), out, inn);
            if let Ok(value) = serde_json::to_vec(&beat) {
                if let Err(e) = nodes.put(&self.config.node_id, Bytes::from(value)).await {
                    tracing::debug!(error = %e, "cluster heartbeat");
                }
            }
        }
    }
}

/// Resolves once the store has made `token` durable.
async fn durable(store: &dyn petrel_engine::store::Store, token: u64) {
    std::future::poll_fn(|cx| {
        if store.wait_durable(token, cx.waker()) {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
}

/// Acknowledges to JetStream, in order, the messages whose deliveries the store has made
/// durable.
async fn ack_durable(
    store: &dyn petrel_engine::store::Store,
    unacked: &mut VecDeque<(u64, jetstream::Message)>,
) {
    let durable = store.durable();
    while unacked.front().is_some_and(|(token, _)| *token <= durable) {
        if let Some((_, message)) = unacked.pop_front() {
            let _ = message.ack().await;
        }
    }
}

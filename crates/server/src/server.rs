//! Assembling a broker from configuration: bind every listener, then serve until shut down.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use petrel_codec::QoS;
use petrel_engine::auth::{AllowAll, Authenticator, UserStore};
use petrel_engine::scram::ScramCredentials;
use petrel_engine::store::{Store, Volatile};
use petrel_engine::{Broker, Limits};
use petrel_store::{DiskStore, Fsync};

use crate::login_guard::LoginState;
use crate::passwords::{FileAuthenticator, LoginLimits, PasswordFile};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{
    AuthConfig, Config, FsyncPolicy, ListenerProtocol, MqttConfig, QueueOverflow, StorageMode,
};
use crate::listener::{BindError, Listener};
use crate::tls::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("authentication secret: {0}")]
    Secret(#[from] crate::auth_secret::SecretError),
    #[error("cannot listen on {addr} (listeners[{index}].bind)")]
    Bind {
        addr: SocketAddr,
        index: usize,
        source: std::io::Error,
    },
    #[error("storage.dir: {0}")]
    Store(#[from] petrel_store::StoreError),
    #[error("auth.http: {0}")]
    Hook(String),
    #[error("auth.password_file: {0}")]
    Passwords(#[from] crate::passwords::PasswordFileError),
    #[error("auth.acl_file: {0}")]
    Acl(#[from] crate::acl_file::AclFileError),
    #[error("{0}")]
    Admin(#[from] crate::admin::AdminError),
    #[error("{0}")]
    Bridge(#[from] crate::bridge::BridgeError),
    #[error("cluster: {0}")]
    Cluster(String),
    #[error("reserved_descriptors: {0}")]
    Descriptors(String),
    #[error("listeners[{index}].{key}: {message}")]
    Listener {
        index: usize,
        key: &'static str,
        message: String,
    },
}

/// Raises the open file limit and shares it out (`descriptors.rs`); logs where it lowered
/// `max_connections`.
fn share_descriptors(
    config: &Config,
    admin: Option<&crate::admin::AdminServer>,
) -> Result<crate::descriptors::Plan, ServerError> {
    let needs = crate::descriptors::Needs {
        max_connections: config.max_connections,
        reserved_descriptors: config.reserved_descriptors,
        admin_connections: admin.map_or(0, |a| a.max_connections()),
        listener_reserves: config
            .listeners
            .iter()
            .map(|l| l.reserved_connections.min(l.max_connections))
            .collect(),
    };
    let plan = crate::descriptors::plan(crate::descriptors::raise_limit(), &needs)
        .map_err(ServerError::Descriptors)?;
    if plan.connections < config.max_connections {
        tracing::info!(
            open_file_limit = plan.limit,
            max_connections = plan.connections,
            configured = config.max_connections,
            "client connections held to what the open file limit leaves (reserved_descriptors, admin.max_connections and the listener sockets kept apart)"
        );
    }
    Ok(plan)
}

/// Listeners reachable from other machines while clients may connect without a login.
pub fn exposed_without_login(config: &Config) -> Vec<(usize, SocketAddr)> {
    if !config.auth.allow_anonymous {
        return Vec::new();
    }
    config
        .listeners
        .iter()
        .enumerate()
        .filter(|(_, l)| l.protocol != ListenerProtocol::Unix && !l.bind.ip().is_loopback())
        .map(|(i, l)| (i, l.bind))
        .collect()
}

/// The engine's limits from the `[mqtt]` table.
pub fn limits_from(config: &MqttConfig) -> Limits {
    Limits {
        max_packet_size: config.max_packet_size,
        max_connect_size: config.max_connect_size,
        max_partial_input_total: config.max_partial_input_total,
        max_inflight: config.max_inflight,
        max_queued_messages: config.max_queued_messages,
        max_queued_bytes: config.max_queued_bytes,
        max_queued_messages_total: config.max_queued_messages_total,
        max_queued_bytes_total: config.max_queued_bytes_total,
        max_topic_length: config.max_topic_length,
        max_topic_levels: config.max_topic_levels,
        max_subscriptions_per_client: config.max_subscriptions_per_client,
        max_retained_messages: config.max_retained_messages,
        max_retained_bytes: config.max_retained_bytes,
        max_retained_per_client: config.max_retained_per_client,
        max_inbound_messages_per_second: config.max_inbound_messages_per_second,
        max_inbound_bytes_per_second: config.max_inbound_bytes_per_second,
        outbox_bytes: config.outbox_bytes,
        flow_control_timeout: config.flow_control_timeout,
        flow_control_window: config.flow_control_window,
        slow_consumer_disconnect: config.slow_consumer_disconnect,
        max_client_id_len: config.max_client_id_len,
        allow_empty_client_id: config.allow_empty_client_id,
        retain_available: config.retain_available,
        max_keepalive: config.max_keepalive,
        receive_maximum: config.receive_maximum,
        topic_alias_maximum: config.topic_alias_maximum,
        maximum_qos: match config.maximum_qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        },
        wildcard_subscriptions: config.wildcard_subscriptions,
        subscription_identifiers: config.subscription_identifiers,
        shared_subscriptions: config.shared_subscriptions,
        max_session_expiry: config.max_session_expiry_interval,
        check_payload_format: config.check_payload_format,
        response_information: (!config.response_information.is_empty())
            .then(|| config.response_information.clone()),
        strict_v31_client_id: config.strict_v31_client_id,
        drop_oldest: config.queue_overflow == QueueOverflow::DropOldest,
    }
}

/// Runs the broker's timers (session expiry, delayed wills) until shutdown: sleeps until the
/// earliest deadline, and is woken by the broker when an earlier one is added.
async fn housekeeping(broker: Arc<Broker>, shutdown: CancellationToken) {
    let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);
    let mut sleep = std::pin::pin!(tokio::time::sleep_until(far()));
    let mut cancelled = std::pin::pin!(shutdown.cancelled());
    std::future::poll_fn(|cx| loop {
        if cancelled.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(());
        }
        let next = broker.poll_timers(cx, std::time::Instant::now());
        let at = next.map_or_else(far, tokio::time::Instant::from_std);
        if sleep.deadline() != at {
            sleep.as_mut().reset(at);
        }
        if sleep.as_mut().poll(cx).is_pending() {
            return std::task::Poll::Pending;
        }
    })
    .await
}

/// Who may connect, from the `[auth]` table: everyone when it lists no users and allows
/// anonymous clients; otherwise a user store that checks CONNECT passwords and offers the
/// MQTT 5 SCRAM-SHA-256 exchange. `secret` ([`crate::auth_secret`]) makes SCRAM salts stable
/// across restarts: the fake ones of unknown names, and those of users given a password.
/// Failed-login counts and the hash gate come from `logins`, so that a reload keeps them.
pub fn authenticator_from(
    auth: &AuthConfig,
    secret: [u8; 32],
    logins: &LoginState,
) -> Result<Box<dyn Authenticator>, ServerError> {
    let file = auth
        .password_file
        .as_deref()
        .map(PasswordFile::load)
        .transpose()?;
    if auth.users.is_empty() && auth.allow_anonymous && file.is_none() && auth.http.is_none() {
        return Ok(Box::new(AllowAll));
    }
    let hook = match &auth.http {
        Some(h) => Some(Arc::new(
            crate::auth_hook::HttpHook::new(crate::auth_hook::HookConfig {
                url: h.url.clone(),
                timeout: h.timeout,
                cache_ttl: h.cache_ttl,
                cache_size: h.cache_size,
            })
            .map_err(ServerError::Hook)?,
        )),
        None => None,
    };
    let mut users = HashMap::new();
    for user in &auth.users {
        let credentials = match (&user.password, &user.scram_sha256) {
            // The salt is derived, not drawn: a user's challenge must not change at a restart
            // when an unknown name's does not.
            (Some(password), _) => ScramCredentials::from_password(
                password.as_bytes(),
                &petrel_engine::scram::derive(&secret, "user salt", &user.name)[..16],
                petrel_engine::scram::DEFAULT_ITERATIONS,
            ),
            // Validated when the config was loaded.
            (None, Some(text)) => match ScramCredentials::parse(text) {
                Ok(c) => c,
                Err(_) => continue,
            },
            (None, None) => continue,
        };
        users.insert(user.name.clone(), credentials);
    }
    let users = Box::new(UserStore::new(users, auth.allow_anonymous, secret));
    // The password file in front of the config's users, and login attempts limited per
    // address for both.
    let config_users = auth.users.iter().map(|u| u.name.clone()).collect();
    Ok(Box::new(FileAuthenticator::with_hook(
        file,
        users,
        config_users,
        hook,
        LoginLimits {
            max_failed_logins: auth.max_failed_logins,
            hash_memory: auth.hash_memory,
            max_pending: auth.max_pending_logins,
            max_pending_per_address: auth.max_pending_logins_per_address,
        },
        logins,
    )))
}

/// Loads the files a configuration names (password file, ACL file, the admin token file) and
/// checks that `storage.dir` can hold a store, as a start would, without starting anything:
/// what `--check-config` adds to parsing.
pub fn check_files(config: &Config) -> Result<(), ServerError> {
    if config.storage.mode == StorageMode::Disk {
        petrel_store::check_dir(&config.storage.dir)?;
    }
    let secret = crate::auth_secret::load(config, crate::auth_secret::Create::No)?;
    authenticator_from(&config.auth, secret, &LoginState::default())?;
    if let Some(path) = &config.auth.acl_file {
        crate::acl_file::load(path)?;
    }
    if let Some(admin) = config.admin.as_ref().filter(|a| a.enabled) {
        crate::admin::token_from(admin)?;
    }
    for (i, bridge) in config.bridges.iter().enumerate() {
        crate::bridge::Bridge::prepare(i, bridge)?;
    }
    crate::listener::check_addresses(config)?;
    Ok(())
}

/// Reloads authentication, authorization and limits from the configuration file: the
/// `[auth]` users, its password file, its ACL file and its `[mqtt]` limits. Connected clients
/// stay connected (their ACL follows the new rules from their next packet). A configuration
/// with an error is refused whole: the one in service stays. Changes elsewhere in the file
/// are reported as waiting for a restart. SIGHUP and the admin API both use it.
pub struct Reloader {
    broker: Arc<Broker>,
    path: PathBuf,
    /// The configuration in service, to tell what a reload changed.
    running: std::sync::Mutex<Config>,
    /// Failed-login counts and the hash gate, carried from one authenticator to the next.
    logins: Arc<LoginState>,
}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The file also changed settings that only a restart applies (listeners, storage...).
    pub restart_needed: bool,
}

impl Reloader {
    pub fn new(
        broker: Arc<Broker>,
        path: PathBuf,
        running: Config,
        logins: Arc<LoginState>,
    ) -> Reloader {
        Reloader {
            broker,
            path,
            running: std::sync::Mutex::new(running),
            logins,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reloads now; `why` names the trigger in the log ("SIGHUP", "admin API").
    pub fn reload(&self, why: &str) -> Result<Reloaded, String> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        match reload_auth(&self.broker, &self.path, &self.logins) {
            Ok(config) => {
                let mut rest = config.clone();
                rest.auth = running.auth.clone();
                rest.mqtt = running.mqtt.clone();
                let restart_needed = rest != *running;
                if restart_needed {
                    tracing::warn!(config = %self.path.display(), why, "configuration reloaded: users, password file, ACL and [mqtt] limits; other changes (listeners, [storage], [admin]) take effect at the next start");
                } else {
                    tracing::info!(config = %self.path.display(), why, "configuration reloaded: users, password file, ACL and [mqtt] limits");
                }
                running.auth = config.auth;
                running.mqtt = config.mqtt;
                Ok(Reloaded { restart_needed })
            }
            Err(e) => {
                tracing::error!(config = %self.path.display(), why, error = %e, "configuration not reloaded; the one in service stays");
                Err(e)
            }
        }
    }
}

/// Reloads the configuration on each SIGHUP until shutdown.
async fn reload_on_sighup(reloader: Arc<Reloader>, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; configuration reload is off");
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hangup.recv() => {}
        }
        let reloader = reloader.clone();
        // Reading password and ACL files is blocking work.
        let _ = tokio::task::spawn_blocking(move || reloader.reload("SIGHUP")).await;
    }
}

/// Reads the config file again and puts its authentication, ACL and `[mqtt]` limits in
/// service, all or none.
pub fn reload_auth(broker: &Broker, path: &Path, logins: &LoginState) -> Result<Config, String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let secret = crate::auth_secret::load(&config, crate::auth_secret::Create::Yes)
        .map_err(|e| format!("authentication secret: {e}"))?;
    let authenticator =
        authenticator_from(&config.auth, secret, logins).map_err(|e| e.to_string())?;
    let acl = config
        .auth
        .acl_file
        .as_deref()
        .map(crate::acl_file::load)
        .transpose()
        .map_err(|e| format!("auth.acl_file: {e}"))?;
    broker.set_authenticator(authenticator);
    broker.set_acl(acl);
    broker.set_limits(limits_from(&config.mqtt));
    Ok(config)
}

/// The part of the grace period kept for connection tasks to end after their close.
const DRAIN_SLACK: Duration = Duration::from_millis(250);

/// How often certificate files are checked for changes.
const TLS_WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Reloads TLS certificates on SIGHUP and when their files change. A file that does not load
/// is logged and the certificate in service stays.
async fn reload_tls(configs: Vec<Arc<TlsConfig>>, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).ok();
    let reload = |tls: &TlsConfig, why: &str| match tls.reload() {
        Ok(()) => {
            tracing::info!(cert = %tls.cert_path().display(), why, "TLS certificate reloaded")
        }
        Err(e) => {
            tracing::error!(cert = %tls.cert_path().display(), why, error = %e, "TLS certificate not reloaded; the previous one stays in service")
        }
    };
    loop {
        let sighup = async {
            match hangup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sighup => {
                for tls in &configs {
                    tls.changed();
                    reload(tls, "SIGHUP");
                }
            }
            _ = tokio::time::sleep(TLS_WATCH_INTERVAL) => {
                for tls in &configs {
                    if tls.changed() {
                        reload(tls, "file changed");
                    }
                }
            }
        }
    }
}

/// A broker with its listeners bound, not yet serving.
pub struct Server {
    broker: Arc<Broker>,
    listeners: Vec<Listener>,
    /// How the process's descriptors are shared out between the listeners.
    descriptors: crate::descriptors::Plan,
    /// The file the configuration came from: SIGHUP reads it again.
    config_path: Option<PathBuf>,
    /// The configuration in service, to tell a reload what changed.
    config: Config,
    /// The operations listener, if it runs.
    admin: Option<crate::admin::AdminServer>,
    /// The bridges to other brokers, started by `run`.
    bridges: Vec<crate::bridge::Bridge>,
    /// Cluster mode: this node's membership of the cluster.
    cluster: Option<Arc<petrel_cluster::Cluster>>,
    /// Failed-login counts and the hash gate, kept by configuration reloads.
    logins: Arc<LoginState>,
}

impl Server {
    /// Binds every listener of `config`; fails naming the listener that could not bind.
    pub async fn bind(config: &Config) -> Result<Server, ServerError> {
        // The secret lives in the store's directory: an unusable one is named as such.
        if config.storage.mode == StorageMode::Disk {
            petrel_store::check_dir(&config.storage.dir)?;
        }
        let secret = crate::auth_secret::load(config, crate::auth_secret::Create::Yes)?;
        let logins = Arc::new(LoginState::default());
        let authenticator = authenticator_from(&config.auth, secret, &logins)?;
        let mut server = Server::bind_with(config, authenticator).await?;
        server.logins = logins;
        Ok(server)
    }

    pub async fn bind_with(
        config: &Config,
        authenticator: Box<dyn Authenticator>,
    ) -> Result<Server, ServerError> {
        let (store, loaded): (Box<dyn Store>, _) = match config.storage.mode {
            StorageMode::Memory => (Box::new(Volatile), None),
            StorageMode::Disk => {
                let fsync = match config.storage.fsync {
                    FsyncPolicy::Always => Fsync::Always,
                    FsyncPolicy::EveryMs => Fsync::Every(config.storage.fsync_interval),
                    FsyncPolicy::Never => Fsync::Never,
                };
                let (store, loaded) = DiskStore::open(&config.storage.dir, fsync)?;
                (Box::new(store), Some(loaded))
            }
        };
        let acl = config
            .auth
            .acl_file
            .as_deref()
            .map(crate::acl_file::load)
            .transpose()?;
        let broker = Arc::new(Broker::with_parts(
            limits_from(&config.mqtt),
            authenticator,
            store,
        ));
        if let Some(acl) = acl {
            tracing::info!(rules = acl.rules().len(), "topic authorization on");
            broker.set_acl(Some(acl));
        }
        if let Some(loaded) = loaded {
            let (sessions, retained) = (loaded.sessions.len(), loaded.retained.len());
            broker.restore(loaded.sessions, loaded.retained, std::time::Instant::now());
            tracing::info!(dir = %config.storage.dir.display(), sessions, retained, "store opened; persistent sessions and retained messages restored");
        }
        // Joined before any client is served: the restored subscriptions are announced, and
        // the cluster's retained messages and interest are loaded.
        let cluster = if config.cluster.enabled() {
            let c = &config.cluster;
            let cluster = petrel_cluster::Cluster::start(
                petrel_cluster::ClusterConfig {
                    servers: c.nats.clone(),
                    node_id: c.effective_node_id(),
                    replicas: c.replicas,
                    connect_timeout: c.connect_timeout,
                    heartbeat: c.heartbeat,
                    node_timeout: c.node_timeout,
                    stream_max_bytes: i64::try_from(c.stream_max_bytes).unwrap_or(i64::MAX),
                },
                broker.clone(),
            )
            .await
            .map_err(ServerError::Cluster)?;
            Some(Arc::new(cluster))
        } else {
            None
        };
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for (index, lc) in config.listeners.iter().enumerate() {
            let listener = Listener::bind(lc).await.map_err(|e| match e {
                BindError::Io(source) if lc.protocol == ListenerProtocol::Unix => {
                    ServerError::Listener {
                        index,
                        key: "socket",
                        message: format!(
                            "cannot listen on {}: {source}",
                            lc.socket
                                .as_deref()
                                .unwrap_or(std::path::Path::new(""))
                                .display()
                        ),
                    }
                }
                BindError::Io(source) => ServerError::Bind {
                    addr: lc.bind,
                    index,
                    source,
                },
                BindError::Tls(e) => ServerError::Listener {
                    index,
                    key: e.key,
                    message: e.message,
                },
                BindError::Mode(text) => ServerError::Listener {
                    index,
                    key: "socket_mode",
                    message: format!("{text:?} is not an octal mode such as \"0660\""),
                },
            })?;
            listeners.push(listener);
        }
        // Secure by default: an open door to the network is the operator's explicit choice.
        for (index, addr) in exposed_without_login(config) {
            tracing::warn!(
                %addr,
                "listeners[{index}] accepts connections from the network and \
                 auth.allow_anonymous is true: anyone who can reach it can connect without a \
                 login. Set allow_anonymous = false with [[auth.users]], or bind to 127.0.0.1"
            );
        }
        let bridges = config
            .bridges
            .iter()
            .enumerate()
            .map(|(i, b)| crate::bridge::Bridge::prepare(i, b))
            .collect::<Result<Vec<_>, _>>()?;
        let admin = {
            let (admin_config, explicit) = crate::admin::effective(config.admin.as_ref());
            if admin_config.enabled {
                let stats = listeners.iter().map(|l| l.stats.clone()).collect();
                let bridge_status = bridges.iter().map(|b| b.status.clone()).collect();
                match crate::admin::AdminServer::bind(
                    &admin_config,
                    broker.clone(),
                    stats,
                    bridge_status,
                    cluster.clone(),
                )
                .await
                {
                    Ok(a) => Some(a),
                    // The default listener is a convenience: a second broker on the same
                    // machine runs without it rather than not at all.
                    Err(crate::admin::AdminError::Bind { addr, source }) if !explicit => {
                        tracing::warn!(%addr, error = %source, "admin listener not started (the default address is taken); configure [admin] bind to have one");
                        None
                    }
                    Err(e) => return Err(e.into()),
                }
            } else {
                None
            }
        };
        let descriptors = share_descriptors(config, admin.as_ref())?;
        Ok(Server {
            broker,
            listeners,
            descriptors,
            config_path: None,
            config: config.clone(),
            admin,
            bridges,
            cluster,
            logins: Default::default(),
        })
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// The file the configuration was read from: SIGHUP reloads the users, password file and
    /// ACL from it (and TLS certificates, as without one).
    pub fn reload_from(mut self, path: PathBuf) -> Server {
        self.config_path = Some(path);
        self
    }

    /// The operations listener's address, if it runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// The bound addresses, in configuration order (resolves port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` is cancelled; then drains: stops accepting, lets each connected
    /// client receive what is queued for it for up to `grace`, closes every connection (v5
    /// clients get DISCONNECT 0x8B; wills are published as for any close the client did not
    /// ask for), flushes the store, and returns.
    pub async fn run(self, shutdown: CancellationToken, grace: Duration) {
        let tracker = TaskTracker::new();
        let mut accept_tasks = Vec::new();
        // Session expiry and delayed wills run on the broker's own clock, also while no
        // client is active.
        let housekeeping = tokio::spawn(housekeeping(self.broker.clone(), shutdown.clone()));
        let sys_topics = tokio::spawn(crate::sys_topics::run(
            self.broker.clone(),
            self.config.sys_interval,
            shutdown.clone(),
        ));
        let tls: Vec<Arc<TlsConfig>> = self
            .listeners
            .iter()
            .filter_map(|l| l.tls.clone())
            .collect();
        let reloader = (!tls.is_empty()).then(|| tokio::spawn(reload_tls(tls, shutdown.clone())));
        let config_reload = self.config_path.clone().map(|path| {
            Arc::new(Reloader::new(
                self.broker.clone(),
                path,
                self.config.clone(),
                self.logins.clone(),
            ))
        });
        let config_reloader = config_reload
            .clone()
            .map(|r| tokio::spawn(reload_on_sighup(r, shutdown.clone())));
        // The admin listener outlives the drain (readyz says "draining"), and stops with it.
        let admin_stop = CancellationToken::new();
        let admin = self
            .admin
            .map(|a| tokio::spawn(a.run(config_reload.clone(), admin_stop.clone())));
        let (total, reserves) = self.descriptors.semaphores();
        let input = crate::input::InputBudget::new();
        // Listeners and connections stop on their own token, cancelled only once the drain
        // deadline is set: a connection that saw the shutdown first would find no deadline
        // and close without draining.
        let connections = CancellationToken::new();
        for (listener, reserved) in self.listeners.into_iter().zip(reserves) {
            tracing::info!(addr = %listener.describe(), protocol = %listener.config.protocol, "listening");
            accept_tasks.push(tokio::spawn(listener.run(
                self.broker.clone(),
                (reserved, total.clone()),
                input.clone(),
                connections.clone(),
                tracker.clone(),
            )));
        }
        for bridge in self.bridges {
            tracing::info!(bridge = %bridge.status.name, remote = %bridge.status.address, "bridge starting");
            tracker.spawn(bridge.run(self.broker.clone(), connections.clone(), tracker.clone()));
        }
        shutdown.cancelled().await;
        // Connected clients get until then to receive what is queued for them; the final
        // DISCONNECT and close are bounded separately (the driver's close flush limit).
        let drain_started = std::time::Instant::now();
        // The whole drain fits the grace period: delivery, then the closes, then a moment for
        // the tasks to end.
        let deliver_for = grace.saturating_sub(crate::driver::DRAIN_CLOSE + DRAIN_SLACK);
        self.broker.begin_drain(drain_started + deliver_for);
        connections.cancel();
        for task in accept_tasks {
            let _ = task.await;
        }
        let _ = housekeeping.await;
        let _ = sys_topics.await;
        if let Some(reloader) = reloader {
            let _ = reloader.await;
        }
        if let Some(reloader) = config_reloader {
            let _ = reloader.await;
        }
        tracker.close();
        let limit = grace.saturating_sub(drain_started.elapsed());
        if tokio::time::timeout(limit, tracker.wait()).await.is_err() {
            tracing::warn!(
                remaining = tracker.len(),
                "connections still open after the shutdown grace period"
            );
        }
        admin_stop.cancel();
        if let Some(admin) = admin {
            // Open HTTP keep-alive connections (a dashboard) get a moment, not a veto.
            let abort = admin.abort_handle();
            if tokio::time::timeout(Duration::from_secs(1), admin)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        // What the connections changed last (sessions gone offline, acknowledgements) is
        // on disk before the process exits.
        let broker = self.broker.clone();
        let _ = tokio::task::spawn_blocking(move || broker.store().flush()).await;
        if let Some(cluster) = self.cluster {
            cluster.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_network_listener_open_to_anonymous_clients_is_reported() {
        let config = Config::from_toml_str(
            "[[listeners]]\nbind = \"0.0.0.0:1883\"\n\n\
             [[listeners]]\nbind = \"127.0.0.1:1884\"\n\n\
             [[listeners]]\nbind = \"[::1]:1885\"\n\n\
             [[listeners]]\nbind = \"[::]:1886\"\n",
            "t.toml",
        )
        .unwrap();
        let exposed: Vec<usize> = exposed_without_login(&config)
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(exposed, [0, 3]);
        let closed = Config::from_toml_str(
            "[[listeners]]\nbind = \"0.0.0.0:1883\"\n\n[auth]\nallow_anonymous = false\n\n\
             [[auth.users]]\nname = \"a\"\npassword = \"b\"\n",
            "t.toml",
        )
        .unwrap();
        assert!(exposed_without_login(&closed).is_empty());
    }
}

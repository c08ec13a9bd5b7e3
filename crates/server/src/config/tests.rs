//! Tests of the configuration: defaults, the full example, and one case per error.
use super::*;

const ORIGIN: &str = "petrel.toml";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(text, ORIGIN)
}

#[test]
fn empty_document_gives_defaults() {
    for text in ["", "\n\n", "# only a comment\n"] {
        assert_eq!(parse(text).unwrap(), Config::default(), "{text:?}");
    }
}

#[test]
fn defaults_are_valid_and_as_documented() {
    let config = Config::default();
    config.validate().unwrap();
    assert_eq!(config.listeners.len(), 1);
    assert_eq!(config.listeners[0].bind, "127.0.0.1:1883".parse().unwrap());
    assert_eq!(config.listeners[0].protocol, ListenerProtocol::Tcp);
    assert_eq!(config.listeners[0].connect_timeout, Duration::from_secs(10));
    assert_eq!(config.listeners[0].max_connections, 100_000);
    assert_eq!(config.mqtt.max_packet_size, 1_048_576);
    assert_eq!(config.mqtt.max_queued_bytes, 67_108_864);
}

#[test]
fn full_example_parses() {
    let text = r#"
sys_interval = "5s"
shutdown_grace = "30s"

[[listeners]]
protocol = "tcp"
bind = "0.0.0.0:1883"
connect_timeout = "500ms"
max_connections = 50000

[[listeners]]
bind = "[::1]:1884"
connect_timeout = "1m"

[mqtt]
max_packet_size = 268435460
max_inflight = 65535
max_queued_messages = 10
max_queued_bytes = 4096
max_queued_messages_total = 100
max_queued_bytes_total = 40960
max_topic_length = 100
max_topic_levels = 5
max_subscriptions_per_client = 7
max_retained_messages = 500
max_retained_bytes = 65536
max_retained_per_client = 50
max_inbound_messages_per_second = 50
max_inbound_bytes_per_second = 5000
outbox_bytes = 2048
flow_control_timeout = "250ms"
flow_control_window = "10s"
slow_consumer_disconnect = true
max_client_id_len = 23
retain_available = false
allow_empty_client_id = false
max_keepalive = 300
receive_maximum = 20
topic_alias_maximum = 0
maximum_qos = 1
wildcard_subscriptions = false
subscription_identifiers = false
shared_subscriptions = false
max_session_expiry_interval = 3600
check_payload_format = false
response_information = ""
strict_v31_client_id = false
queue_overflow = "drop_oldest"

[auth]
allow_anonymous = false
acl_file = "acl.toml"
password_file = "passwords"
max_failed_logins = 3
hash_memory = 33554432
max_pending_logins = 16
max_pending_logins_per_address = 3

[[auth.users]]
name = "alice"
password = "secret"

[[auth.users]]
name = "bob"
scram_sha256 = "SCRAM-SHA-256$4096:c29tZSBzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="

[auth.http]
url = "http://127.0.0.1:9/auth"
timeout = "500ms"
cache_ttl = "0s"
cache_size = 5

[admin]
bind = "127.0.0.1:9200"
token = "s3cret"
metrics_require_token = true
"#;
    let config = parse(text).unwrap();
    assert_eq!(
        config,
        Config {
            max_connections: 100_000,
            reserved_descriptors: 64,
            sys_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            bridges: Vec::new(),
            cluster: ClusterConfig::default(),
            admin: Some(AdminConfig {
                enabled: true,
                bind: "127.0.0.1:9200".parse().unwrap(),
                token: "s3cret".into(),
                token_file: None,
                metrics_require_token: true,
                ..AdminConfig::default()
            }),
            storage: StorageConfig::default(),
            listeners: vec![
                ListenerConfig {
                    protocol: ListenerProtocol::Tcp,
                    bind: "0.0.0.0:1883".parse().unwrap(),
                    connect_timeout: Duration::from_millis(500),
                    max_connections: 50_000,
                    backlog: 1024,
                    ..ListenerConfig::default()
                },
                ListenerConfig {
                    protocol: ListenerProtocol::Tcp,
                    bind: "[::1]:1884".parse().unwrap(),
                    connect_timeout: Duration::from_secs(60),
                    max_connections: 100_000,
                    backlog: 1024,
                    ..ListenerConfig::default()
                },
            ],
            mqtt: MqttConfig {
                max_packet_size: 268_435_460,
                max_inflight: 65_535,
                max_queued_messages: 10,
                max_queued_bytes: 4096,
                max_queued_messages_total: 100,
                max_queued_bytes_total: 40960,
                max_topic_length: 100,
                max_topic_levels: 5,
                max_subscriptions_per_client: 7,
                max_retained_messages: 500,
                max_retained_bytes: 65536,
                max_retained_per_client: 50,
                max_inbound_messages_per_second: 50,
                max_inbound_bytes_per_second: 5000,
                outbox_bytes: 2048,
                flow_control_timeout: Duration::from_millis(250),
                flow_control_window: Duration::from_secs(10),
                slow_consumer_disconnect: true,
                max_client_id_len: 23,
                retain_available: false,
                allow_empty_client_id: false,
                max_keepalive: 300,
                receive_maximum: 20,
                topic_alias_maximum: 0,
                maximum_qos: 1,
                wildcard_subscriptions: false,
                subscription_identifiers: false,
                shared_subscriptions: false,
                max_session_expiry_interval: 3600,
                check_payload_format: false,
                response_information: String::new(),
                strict_v31_client_id: false,
                queue_overflow: QueueOverflow::DropOldest,
                ..MqttConfig::default()
            },
            auth: AuthConfig {
                allow_anonymous: false,
                acl_file: Some("acl.toml".into()),
                password_file: Some("passwords".into()),
                max_failed_logins: 3,
                hash_memory: 32 << 20,
                max_pending_logins: 16,
                max_pending_logins_per_address: 3,
                http: Some(HttpAuthConfig {
                    url: "http://127.0.0.1:9/auth".into(),
                    timeout: Duration::from_millis(500),
                    cache_ttl: Duration::ZERO,
                    cache_size: 5,
                }),
                users: vec![
                    UserConfig {
                        name: "alice".into(),
                        password: Some("secret".into()),
                        scram_sha256: None,
                    },
                    UserConfig {
                        name: "bob".into(),
                        password: None,
                        scram_sha256: Some("SCRAM-SHA-256$4096:c29tZSBzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()),
                    },
                ],
            },
        }
    );
}

#[test]
fn partial_tables_keep_other_defaults() {
    let config = parse("[mqtt]\nmax_inflight = 8\n").unwrap();
    assert_eq!(config.mqtt.max_inflight, 8);
    assert_eq!(config.listeners, Config::default().listeners);
    let defaults = MqttConfig::default();
    assert_eq!(
        config.mqtt,
        MqttConfig {
            max_inflight: 8,
            ..defaults
        }
    );
}

#[test]
fn listeners_on_port_zero_may_share_an_address() {
    let text = "[[listeners]]\nbind = \"127.0.0.1:0\"\n[[listeners]]\nbind = \"127.0.0.1:0\"\n";
    assert_eq!(parse(text).unwrap().listeners.len(), 2);
}

/// Each case: a document, then fragments the error's `Display` must
/// contain: `file:line:`, the key, and what is wrong.
#[test]
fn invalid_documents_name_file_line_and_key() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "unknown key at the top level",
            "[mqtt]\nmax_inflight = 4\n\n[mqttt]\n",
            &["petrel.toml:4: ", "unknown key 'mqttt' at the top level", "`listeners`"],
        ),
        (
            "unknown key in [mqtt]",
            "[mqtt]\nmax_inflight = 4\n\nmax_inflights = 5\n",
            &["petrel.toml:4: ", "unknown key 'max_inflights' in [mqtt]", "`max_inflight`"],
        ),
        (
            "unknown key in a listener",
            "[[listeners]]\nbind = \"127.0.0.1:1883\"\nport = 1883\n",
            &["petrel.toml:3: ", "unknown key 'port' in listeners[0]", "`bind`"],
        ),
        (
            "wrong type",
            "[mqtt]\nretain_available = \"yes\"\n",
            &["petrel.toml:2: mqtt.retain_available: ", "invalid type"],
        ),
        (
            "table given a scalar",
            "mqtt = 5\n",
            &["petrel.toml:1: mqtt: ", "expected an [mqtt] table"],
        ),
        (
            "bad duration",
            "[[listeners]]\nconnect_timeout = \"10 parsecs\"\n",
            &[
                "petrel.toml:2: listeners[0].connect_timeout: ",
                "invalid duration \"10 parsecs\"",
            ],
        ),
        (
            "duration as a bare number",
            "[[listeners]]\nconnect_timeout = 10\n",
            &["petrel.toml:2: listeners[0].connect_timeout: ", "expected a duration"],
        ),
        (
            "admin listener on an MQTT listener's address",
            "[[listeners]]\nbind = \"127.0.0.1:1883\"\n\n[admin]\nbind = \"127.0.0.1:1883\"\n",
            &["petrel.toml:5: admin.bind: address 127.0.0.1:1883 is already used by listeners[0]"],
        ),
        (
            "admin token with white space",
            "[admin]\ntoken = \"two words\"\n",
            &["petrel.toml:2: admin.token: may not contain white space"],
        ),
        (
            "admin token and token file",
            "[admin]\ntoken = \"t\"\ntoken_file = \"/etc/petrel/token\"\n",
            &["petrel.toml:3: admin.token_file: give token or token_file, not both"],
        ),
        (
            "unknown key in [admin]",
            "[admin]\nport = 9183\n",
            &["petrel.toml:2: ", "unknown key 'port' in [admin]"],
        ),
        (
            "bad sys_interval",
            "sys_interval = \"often\"\n",
            &["petrel.toml:1: sys_interval: ", "invalid duration"],
        ),
        (
            "zero timeout",
            "[[listeners]]\nbind = \"127.0.0.1:1883\"\nconnect_timeout = \"0s\"\n",
            &["petrel.toml:3: listeners[0].connect_timeout: must be greater than zero"],
        ),
        (
            "zero max_connections",
            "[[listeners]]\nmax_connections = 0\n",
            &["petrel.toml:2: listeners[0].max_connections: must be at least 1 (got 0)"],
        ),
        (
            "negative max_connections",
            "[[listeners]]\nmax_connections = -1\n",
            &["petrel.toml:2: listeners[0].max_connections: must be at least 1 (got -1)"],
        ),
        (
            "max_inflight zero",
            "[mqtt]\nmax_inflight = 0\n",
            &["petrel.toml:2: mqtt.max_inflight: must be between 1 and 65535 (got 0)"],
        ),
        (
            "max_inflight past u16",
            "[mqtt]\n\nmax_inflight = 70000\n",
            &["petrel.toml:3: mqtt.max_inflight: must be between 1 and 65535 (got 70000)"],
        ),
        (
            "max_packet_size too small",
            "[mqtt]\nmax_packet_size = 15\n",
            &["petrel.toml:2: mqtt.max_packet_size: must be between 16 and 268435460"],
        ),
        (
            "max_packet_size past the MQTT maximum",
            "[mqtt]\nmax_packet_size = 268435461\n",
            &["petrel.toml:2: mqtt.max_packet_size: must be between 16 and 268435460"],
        ),
        (
            "max_client_id_len zero",
            "[mqtt]\nmax_client_id_len = 0\n",
            &["petrel.toml:2: mqtt.max_client_id_len: must be between 1 and 65535"],
        ),
        (
            "max_queued_messages zero",
            "[mqtt]\nmax_queued_messages = 0\n",
            &["petrel.toml:2: mqtt.max_queued_messages: must be at least 1"],
        ),
        (
            "max_queued_bytes zero",
            "[mqtt]\nmax_queued_bytes = 0\n",
            &["petrel.toml:2: mqtt.max_queued_bytes: must be at least 1"],
        ),
        (
            "outbox_bytes zero",
            "[mqtt]\noutbox_bytes = 0\n",
            &["petrel.toml:2: mqtt.outbox_bytes: must be at least 1"],
        ),
        (
            "bad flow-control timeout",
            "[mqtt]\nflow_control_timeout = \"soon\"\n",
            &[
                "petrel.toml:2: mqtt.flow_control_timeout: ",
                "invalid duration \"soon\"",
            ],
        ),
        (
            "tls listener without a certificate",
            "[[listeners]]\nprotocol = \"tls\"\n",
            &["petrel.toml:1: listeners[0].cert: required for a tls listener"],
        ),
        (
            "certificate file missing",
            "[[listeners]]\nprotocol = \"wss\"\ncert = \"/nonexistent/server.pem\"\nkey = \"/nonexistent/server.key\"\n",
            &["petrel.toml:3: listeners[0].cert: cannot read /nonexistent/server.pem"],
        ),
        (
            "certificate on a tcp listener",
            "[[listeners]]\ncert = \"a.pem\"\n",
            &["petrel.toml:2: listeners[0].cert: applies only to tls and wss listeners, not tcp"],
        ),
        (
            "client cert required without a CA",
            "[[listeners]]\nprotocol = \"tls\"\nrequire_client_cert = true\n",
            &["listeners[0].", "cert"],
        ),
        (
            "handshake timeout longer than connect timeout",
            "[[listeners]]\nconnect_timeout = \"2s\"\nhandshake_timeout = \"5s\"\n",
            &["petrel.toml:3: listeners[0].handshake_timeout: must be greater than zero and at most connect_timeout"],
        ),
        (
            "unix listener without a socket path",
            "[[listeners]]\nprotocol = \"unix\"\n",
            &["petrel.toml:1: listeners[0].socket: required for a unix listener"],
        ),
        (
            "bad socket mode",
            "[[listeners]]\nprotocol = \"unix\"\nsocket = \"/tmp/x.sock\"\nsocket_mode = \"rwx\"\n",
            &["petrel.toml:4: listeners[0].socket_mode: \"rwx\" is not an octal mode"],
        ),
        (
            "websocket path without a slash",
            "[[listeners]]\nprotocol = \"ws\"\npath = \"mqtt\"\n",
            &["petrel.toml:3: listeners[0].path: must start with '/'"],
        ),
        (
            "x-forwarded-for on a tcp listener",
            "[[listeners]]\ntrust_x_forwarded_for = true\n",
            &["petrel.toml:2: listeners[0].trust_x_forwarded_for: applies only to ws and wss listeners"],
        ),
        (
            "unknown proxy protocol mode",
            "[[listeners]]\nproxy_protocol = \"sometimes\"\n",
            &["petrel.toml:2: listeners[0].proxy_protocol: ", "sometimes"],
        ),
        (
            "user with both password and keys",
            "[[auth.users]]\nname = \"a\"\npassword = \"x\"\nscram_sha256 = \"y\"\n",
            &["petrel.toml:3: auth.users[0].password: give exactly one of password and scram_sha256"],
        ),
        (
            "user with neither",
            "[[auth.users]]\nname = \"a\"\n",
            &["petrel.toml:1: auth.users[0].password: give exactly one of password and scram_sha256"],
        ),
        (
            "user defined twice",
            "[[auth.users]]\nname = \"a\"\npassword = \"x\"\n[[auth.users]]\nname = \"a\"\npassword = \"y\"\n",
            &["petrel.toml:5: auth.users[1].name: user \"a\" is already defined by auth.users[0]"],
        ),
        (
            "bad SCRAM keys",
            "[[auth.users]]\nname = \"a\"\nscram_sha256 = \"SCRAM-SHA-256$0:AAAA$AAAA:AAAA\"\n",
            &["petrel.toml:3: auth.users[0].scram_sha256: iteration count must be between 1 and 1000000 (got 0)"],
        ),
        (
            "nobody could connect",
            "[auth]\nallow_anonymous = false\n",
            &["petrel.toml:2: auth.allow_anonymous: is false but no [[auth.users]], password_file or client certificates are configured"],
        ),
        (
            "unknown user key",
            "[[auth.users]]\nname = \"a\"\npasswd = \"x\"\n",
            &["passwd"],
        ),
        (
            "maximum_qos 3",
            "[mqtt]\nmaximum_qos = 3\n",
            &["petrel.toml:2: mqtt.maximum_qos: must be between 0 and 2 (got 3)"],
        ),
        (
            "receive_maximum zero",
            "[mqtt]\nreceive_maximum = 0\n",
            &["petrel.toml:2: mqtt.receive_maximum: must be between 1 and 65535 (got 0)"],
        ),
        (
            "topic_alias_maximum too large",
            "[mqtt]\ntopic_alias_maximum = 70000\n",
            &["petrel.toml:2: mqtt.topic_alias_maximum: must be between 0 and 65535 (got 70000)"],
        ),
        (
            "session expiry beyond 32 bits",
            "[mqtt]\nmax_session_expiry_interval = 4294967296\n",
            &["petrel.toml:2: mqtt.max_session_expiry_interval: must be between 0 and 4294967295"],
        ),
        (
            "shared_subscriptions not a boolean",
            "[mqtt]\nshared_subscriptions = 1\n",
            &["petrel.toml:2: mqtt.shared_subscriptions: ", "invalid type"],
        ),
        (
            "negative max_keepalive",
            "[mqtt]\nmax_keepalive = -5\n",
            &["petrel.toml:2: mqtt.max_keepalive: must be between 0 and 65535 (got -5)"],
        ),
        (
            "dotted key out of range",
            "mqtt.max_inflight = 0\n",
            &["petrel.toml:1: mqtt.max_inflight: must be between 1 and 65535"],
        ),
        (
            "duplicate bind",
            "[[listeners]]\nbind = \"0.0.0.0:1883\"\n\n[[listeners]]\nbind = \"0.0.0.0:1883\"\n",
            &[
                "petrel.toml:5: listeners[1].bind: ",
                "address 0.0.0.0:1883 is already used by listeners[0]",
            ],
        ),
        (
            "duplicate default bind points at the second table",
            "[[listeners]]\n\n[[listeners]]\nmax_connections = 5\n",
            &["petrel.toml:3: listeners[1].bind: ", "already used by listeners[0]"],
        ),
        (
            "bad bind address",
            "[[listeners]]\nbind = \"localhost:1883\"\n",
            &["petrel.toml:2: listeners[0].bind: ", "invalid address \"localhost:1883\""],
        ),
        (
            "bad protocol",
            "[[listeners]]\nprotocol = \"udp\"\n",
            &["petrel.toml:2: listeners[0].protocol: ", "unknown value `udp`", "`tcp`"],
        ),
        (
            "empty listeners array",
            "# no sockets\nlisteners = []\n",
            &["petrel.toml:2: listeners: at least one listener is required"],
        ),
        (
            "syntax error",
            "[mqtt]\nmax_inflight = = 3\n",
            &["petrel.toml:2: invalid TOML"],
        ),
        (
            "duplicate key",
            "[mqtt]\nmax_inflight = 3\nmax_inflight = 4\n",
            &["petrel.toml:3: invalid TOML at 'max_inflight': duplicate key"],
        ),
        (
            "string for an integer",
            "[mqtt]\nmax_inflight = \"many\"\n",
            &["petrel.toml:2: mqtt.max_inflight: must be an integer between 1 and 65535, not a string"],
        ),
        (
            "integer past i64 for an unbounded field",
            "[mqtt]\nmax_queued_bytes = 99999999999999999999\n",
            &["petrel.toml:2: mqtt.max_queued_bytes: is too large"],
        ),
    ];
    for (name, text, fragments) in cases {
        let err = match parse(text) {
            Ok(config) => panic!("{name}: parsed to {config:?}"),
            Err(err) => err.to_string(),
        };
        for fragment in *fragments {
            assert!(err.contains(fragment), "{name}: {err:?} lacks {fragment:?}");
        }
        assert!(!err.contains('\n'), "{name}: {err:?} spans lines");
    }
}

#[test]
fn validate_without_a_file_names_the_key() {
    let mut config = Config::default();
    config.mqtt.max_inflight = 0;
    let err = config.validate().unwrap_err();
    assert!(
        matches!(&err, ConfigError::Invalid { line: None, key, .. } if key == "mqtt.max_inflight")
    );
    assert_eq!(
        err.to_string(),
        "<config>: mqtt.max_inflight: must be between 1 and 65535 (got 0)"
    );

    let config = Config {
        listeners: Vec::new(),
        ..Config::default()
    };
    assert!(config
        .validate()
        .unwrap_err()
        .to_string()
        .contains("listeners: at least one"));
}

#[test]
fn every_numeric_setting_has_bounds_reachable_from_the_document() {
    for (key, _, _) in Config::default().numeric_settings() {
        assert!(bounds_for(&key).is_some(), "{key}");
    }
}

#[test]
fn default_config_toml_round_trips() {
    let text = default_config_toml();
    // The printed file spells out [admin], which makes it explicit.
    let expected = Config {
        admin: Some(AdminConfig::default()),
        ..Config::default()
    };
    assert_eq!(parse(&text).unwrap(), expected);
    // Every key is spelled out, not left to its default.
    let root = DeTable::parse(&text).unwrap();
    let listener = root.get_ref()["listeners"].get_ref().as_array().unwrap()[0].get_ref();
    assert_eq!(listener.as_table().unwrap().len(), 13);
    assert_eq!(
        root.get_ref()["mqtt"].get_ref().as_table().unwrap().len(),
        35
    );
    assert_eq!(
        root.get_ref()["auth"].get_ref().as_table().unwrap().len(),
        5
    );
}

#[test]
fn load_reads_a_file_and_reports_a_missing_one() {
    let dir = std::env::temp_dir().join(format!("petrel-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("petrel.toml");
    std::fs::write(&path, "[mqtt]\nmax_inflight = 0\n").unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:2: mqtt.max_inflight", path.display())),
        "{err}"
    );

    std::fs::write(&path, "[mqtt]\nmax_inflight = 7\n").unwrap();
    assert_eq!(Config::load(&path).unwrap().mqtt.max_inflight, 7);

    let missing = dir.join("missing.toml");
    let err = Config::load(&missing).unwrap_err();
    assert!(matches!(err, ConfigError::Io { .. }));
    assert!(err.to_string().contains("missing.toml"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A bridge's mistakes stop the start naming the key.
#[test]
fn invalid_bridges_name_the_key() {
    let bridge =
        |body: &str| format!("[[bridges]]\nname = \"b\"\naddress = \"127.0.0.1:1883\"\n{body}");
    let topic = "[[bridges.topics]]\nfilter = \"a/#\"\n";
    let cases: Vec<(String, &str)> =
        vec![
        (format!("[[bridges]]\naddress = \"h:1\"\n{topic}"), "bridges[0].name: is required"),
        (
            format!("[[bridges]]\nname = \"a b\"\naddress = \"h:1\"\n{topic}"),
            "bridges[0].name: \"a b\": only letters",
        ),
        (
            format!("{}\n{}", bridge(topic), bridge(topic)),
            "bridges[1].name: \"b\" is already the name of bridges[0]",
        ),
        (
            format!("[[bridges]]\nname = \"b\"\naddress = \"nohost\"\n{topic}"),
            "bridges[0].address: \"nohost\" is not \"host:port\"",
        ),
        (bridge(""), "bridges[0].topics: at least one"),
        (
            bridge("[[bridges.topics]]\nfilter = \"a/#/b\"\n"),
            "bridges[0].topics[0].filter: \"a/#/b\"",
        ),
        (
            bridge("[[bridges.topics]]\nfilter = \"$share/g/a\"\n"),
            "bridges[0].topics[0].filter: a bridge cannot take a shared subscription",
        ),
        (
            bridge("[[bridges.topics]]\nfilter = \"a\"\nprefix = \"x/+/\"\n"),
            "bridges[0].topics[0].prefix: \"x/+/\": no wildcards",
        ),
        (
            bridge("[[bridges.topics]]\nfilter = \"a\"\nqos = 3\n"),
            "bridges[0].topics[0].qos: 3 is not 0, 1 or 2",
        ),
        (
            bridge(&format!("ca_file = \"ca.pem\"\n{topic}")),
            "bridges[0].ca_file: only for the tls and wss transports, not tcp",
        ),
        (
            bridge(&format!("transport = \"tls\"\ncert = \"c.pem\"\n{topic}")),
            "bridges[0].key: cert and key go together",
        ),
        (
            bridge(&format!("reconnect_delay = \"5s\"\nreconnect_delay_max = \"1s\"\n{topic}")),
            "bridges[0].reconnect_delay_max: must be at least reconnect_delay",
        ),
        (
            bridge(&format!("keepalive = \"1500ms\"\n{topic}")),
            "bridges[0].keepalive: whole seconds",
        ),
        (
            bridge(&format!("version = \"3.1.1\"\npassword = \"p\"\n{topic}")),
            "bridges[0].username: MQTT 3.1.1 sends a password only with a user name",
        ),
        (
            bridge(&format!("transport = \"udp\"\n{topic}")),
            "bridges[0].transport: unknown value `udp`, expected one of `tcp`, `tls`, `ws`, `wss`",
        ),
    ];
    for (text, expected) in cases {
        let err = parse(&text).expect_err(&text).to_string();
        assert!(
            err.contains(expected),
            "{text}\n--> {err}\nexpected: {expected}"
        );
    }
    let ok = parse(&bridge(topic)).expect("a minimal bridge");
    assert_eq!(ok.bridges[0].remote_client_id(), "petrel-b");
    assert_eq!(ok.bridges[0].topics[0].qos, 1);
}

/// The `[cluster]` table's mistakes stop the start naming the key; without `nats` the
/// broker is a single node.
#[test]
fn invalid_cluster_settings_name_the_key() {
    let cluster = |body: &str| format!("[cluster]\nnats = [\"nats://127.0.0.1:4222\"]\n{body}");
    let cases = [
        (
            cluster("node_id = \"a.b\""),
            "cluster.node_id: \"a.b\": use 1 to 64",
        ),
        (cluster("replicas = 0"), "cluster.replicas: must be 1 to 5"),
        (
            cluster("heartbeat = \"1s\"\nnode_timeout = \"1500ms\""),
            "cluster.node_timeout: must be at least twice heartbeat",
        ),
        (
            cluster("heartbeat = \"0s\""),
            "cluster.heartbeat: must be greater than zero",
        ),
        (
            "[cluster]\nnats = [\"nats://a:1\", \"nats:// b\"]\n".to_owned(),
            "cluster.nats[1]: \"nats:// b\" is not a NATS server address",
        ),
        (
            cluster("stream_max_bytes = 1000"),
            "cluster.stream_max_bytes: must be at least 1 MiB",
        ),
        (cluster("nodes = 3"), "unknown key 'nodes' in [cluster]"),
    ];
    for (text, expected) in cases {
        let err = parse(&text).expect_err(&text).to_string();
        assert!(
            err.contains(expected),
            "{text}\n--> {err}\nexpected: {expected}"
        );
    }
    let single = parse("").unwrap();
    assert!(!single.cluster.enabled());
    let on = parse(&cluster("node_id = \"edge-1\"")).unwrap();
    assert!(on.cluster.enabled());
    assert_eq!(on.cluster.effective_node_id(), "edge-1");
    let default_id = parse(&cluster("")).unwrap().cluster.effective_node_id();
    assert!(
        petrel_cluster::names::valid_node_id(&default_id),
        "{default_id:?}"
    );
}

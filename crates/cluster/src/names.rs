//! The names petrel gives things in NATS: subjects, the stream and its consumers, buckets and
//! their keys. Node ids are checked to be one subject token (`[A-Za-z0-9_-]`), so they fit
//! every one of these.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use petrel_codec::TopicFilter;

/// QoS 0 messages: `petrel.m.<topic>` ([`crate::subject`]); nodes subscribe to their filters.
pub const CORE_PREFIX: &str = "petrel.m";
/// The stream of QoS 1/2 messages on their way to a node or a shared group.
pub const STREAM: &str = "PETREL_MESSAGES";
pub const STREAM_SUBJECTS: [&str; 2] = ["petrel.n.*", "petrel.g.*"];
/// Interest: which node subscribes to what (see [`crate::interest`]).
pub const INTEREST_BUCKET: &str = "PETREL_INTEREST";
/// Retained messages: key [`retained_key`], value the message record.
pub const RETAINED_BUCKET: &str = "PETREL_RETAINED";
/// Membership: key the node id, value its heartbeat.
pub const NODES_BUCKET: &str = "PETREL_NODES";
/// Which node holds each client id's session: key [`session_key`], value the node id.
pub const SESSIONS_BUCKET: &str = "PETREL_SESSIONS";

/// Wills of connected clients (key [`will_key`]) and of offline sessions waiting for their
/// delay (key [`pending_will_key`]), for the case their node dies.
pub const WILLS_BUCKET: &str = "PETREL_WILLS";

/// A connection's will: the node it is on, the client id, the connection.
pub fn will_key(node: &str, client_id: &str, connection: u64) -> String {
    format!(
        "w.{node}.{}.{connection}",
        URL_SAFE_NO_PAD.encode(client_id.as_bytes())
    )
}

/// An offline session's will waiting for its delay: the node it is on and the client id.
/// Its value is the will and when it is due; an empty value marks one another node took.
pub fn pending_will_key(node: &str, client_id: &str) -> String {
    format!("p.{node}.{}", URL_SAFE_NO_PAD.encode(client_id.as_bytes()))
}

/// The node a will key (connected or pending) belongs to.
pub fn will_node(key: &str) -> Option<&str> {
    key.strip_prefix("w.")
        .or_else(|| key.strip_prefix("p."))?
        .split('.')
        .next()
}

/// The client id of a pending will's key; `None` for other keys.
pub fn pending_will_client(key: &str) -> Option<String> {
    let (_, client) = key.strip_prefix("p.")?.split_once('.')?;
    String::from_utf8(URL_SAFE_NO_PAD.decode(client).ok()?).ok()
}

pub fn session_key(client_id: &str) -> String {
    format!("s.{}", URL_SAFE_NO_PAD.encode(client_id.as_bytes()))
}

/// Where a node takes requests to give up a client id's session.
pub fn takeover_subject(node: &str) -> String {
    format!("petrel.node.{node}.takeover")
}

/// Where a node asks `node`, before claiming a client id from it, whether the login
/// connecting may have that id's session: asked first, so that a claim another login's
/// session refuses never moves the session key at all.
pub fn owner_check_subject(node: &str) -> String {
    format!("petrel.node.{node}.owner")
}

/// Whether `id` can name a node.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Where QoS 1/2 messages for `node`'s ordinary subscribers go.
pub fn node_subject(node: &str) -> String {
    format!("petrel.n.{node}")
}

/// The durable consumer `node` reads its messages with.
pub fn node_consumer(node: &str) -> String {
    format!("node-{node}")
}

/// Where QoS 1/2 messages for shared group `hash` go; its members' nodes share one consumer.
pub fn group_subject(hash: u64) -> String {
    format!("petrel.g.{hash:016x}")
}

pub fn group_consumer(hash: u64) -> String {
    format!("group-{hash:016x}")
}

/// The NATS queue group QoS 0 messages for shared group `hash` are balanced in.
pub fn group_queue(hash: u64) -> String {
    format!("g{hash:016x}")
}

/// A shared group's name in NATS: FNV-1a (64 bits) over share name, NUL, filter — the same
/// on every node and every build.
pub fn group_hash(share: &str, filter: &TopicFilter) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in share.bytes().chain([0]).chain(filter.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

pub fn ordinary_key(node: &str, filter: &TopicFilter) -> String {
    format!("o.{node}.{}", URL_SAFE_NO_PAD.encode(filter.as_bytes()))
}

pub fn decode_filter(token: &str) -> Option<TopicFilter> {
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    TopicFilter::new(std::str::from_utf8(&bytes).ok()?).ok()
}

pub fn group_key(hash: u64, node: &str) -> String {
    format!("g.{hash:016x}.{node}")
}

pub fn group_value(share: &str, filter: &TopicFilter) -> Vec<u8> {
    let mut v = Vec::with_capacity(share.len() + 1 + filter.len());
    v.extend_from_slice(share.as_bytes());
    v.push(0);
    v.extend_from_slice(filter.as_bytes());
    v
}

pub fn decode_group(value: &[u8]) -> Option<(Box<str>, TopicFilter)> {
    let split = value.iter().position(|&b| b == 0)?;
    let share = std::str::from_utf8(&value[..split]).ok()?;
    let filter = TopicFilter::new(std::str::from_utf8(&value[split + 1..]).ok()?).ok()?;
    Some((share.into(), filter))
}

/// A retained message's key: its topic, base64url (every byte of a topic fits a key so).
pub fn retained_key(topic: &str) -> String {
    format!("t.{}", URL_SAFE_NO_PAD.encode(topic.as_bytes()))
}

pub fn retained_topic(key: &str) -> Option<String> {
    let bytes = URL_SAFE_NO_PAD.decode(key.strip_prefix("t.")?).ok()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for f in ["a/+/#", "#", "/", "é/ü", "$SYS/x"] {
            let filter = TopicFilter::new(f).unwrap();
            let key = ordinary_key("n1", &filter);
            let token = key.strip_prefix("o.n1.").unwrap();
            assert!(!token.contains('.'));
            assert_eq!(decode_filter(token).unwrap(), filter);
            let (share, back) = decode_group(&group_value("s", &filter)).unwrap();
            assert_eq!((&*share, back), ("s", filter));
        }
        for t in ["a/b", "/", "x y.z"] {
            assert_eq!(retained_topic(&retained_key(t)).as_deref(), Some(t));
        }
    }

    #[test]
    fn group_hashes_differ_by_share_and_filter() {
        let f = |s: &str| TopicFilter::new(s).unwrap();
        assert_ne!(group_hash("a", &f("b/c")), group_hash("a/b", &f("c")));
        assert_ne!(group_hash("a", &f("x")), group_hash("b", &f("x")));
        assert_eq!(group_hash("a", &f("x")), group_hash("a", &f("x")));
        // Fixed across builds: nodes of different versions must agree.
        // FNV-1a 64 of the bytes NUL, `#`, worked out independently.
        assert_eq!(group_hash("", &f("#")), 0x0832_a507_b4eb_a134);
    }

    #[test]
    fn node_ids_are_one_token() {
        assert!(valid_node_id("node-1_a"));
        for bad in ["", "a.b", "a b", "a*", "a>", &"x".repeat(65)] {
            assert!(!valid_node_id(bad), "{bad:?}");
        }
    }
}

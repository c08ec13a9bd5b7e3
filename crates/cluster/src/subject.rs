//! MQTT topic names and filters as NATS subjects, reversibly.
//!
//! A topic's levels become a subject's tokens under a prefix (`topic_subject("m", "a/b")` is
//! `m.a.b`). NATS tokens may not be empty nor contain `.`, `*`, `>` or white space, and are
//! best kept to ASCII, while an MQTT level may be empty (`a//b`, `/a`) and hold any UTF-8 but
//! the wildcards. So each level is escaped: bytes outside `A-Z a-z 0-9 - _ $ : @ = !` are
//! written `%XX` (hex, upper case), and an empty level is the token `%` alone (a `%` is
//! otherwise always followed by two hex digits). The mapping is one to one, and a token is
//! never `*` or `>`.
//!
//! A filter becomes the subjects whose union NATS matches: `+` is `*`, and `#` is `>` — which
//! in NATS needs at least one more token, while MQTT's `a/#` also matches `a` itself
//! [MQTT-4.7.1-2] — so `a/#` is the two subjects `m.a` and `m.a.>`. What NATS matches is then
//! exactly what MQTT matches, except for the `$` rule (a filter starting with a wildcard does
//! not match topics starting with `$` [MQTT-4.7.2-1]): NATS is only the interest filter, and
//! each node matches what it receives against its own subscriptions anyway.

/// Bytes a token carries as they are.
fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'$' | b':' | b'@' | b'=' | b'!')
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_level(out: &mut String, level: &str) {
    if level.is_empty() {
        out.push('%');
        return;
    }
    for &b in level.as_bytes() {
        if plain(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
}

/// The subject of topic name `topic` under `prefix` (itself a valid subject, e.g. `petrel.m`).
pub fn topic_subject(prefix: &str, topic: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + topic.len() + 8);
    out.push_str(prefix);
    for level in topic.split('/') {
        out.push('.');
        push_level(&mut out, level);
    }
    out
}

/// The topic name a subject made by [`topic_subject`] under `prefix` stands for; `None` for a
/// subject it cannot have made.
pub fn subject_topic(prefix: &str, subject: &str) -> Option<String> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let mut bytes = Vec::with_capacity(rest.len());
    for (i, token) in rest.split('.').enumerate() {
        if i > 0 {
            bytes.push(b'/');
        }
        if token == "%" {
            continue;
        }
        let mut t = token.bytes();
        while let Some(b) = t.next() {
            match b {
                b'%' => {
                    let hi = hex_value(t.next()?)?;
                    let lo = hex_value(t.next()?)?;
                    bytes.push(hi << 4 | lo);
                }
                b if plain(b) => bytes.push(b),
                _ => return None,
            }
        }
        if token.is_empty() {
            return None;
        }
    }
    String::from_utf8(bytes).ok()
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The subjects that together match, in NATS, the topics filter `filter` matches in MQTT
/// (but for the `$` rule, see the module doc): one, or two for a filter ending in `#`.
pub fn filter_subjects(prefix: &str, filter: &str) -> Vec<String> {
    let mut out = String::with_capacity(prefix.len() + filter.len() + 8);
    out.push_str(prefix);
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        match *level {
            "#" if i == levels.len() - 1 => {
                let multi = format!("{out}.>");
                // `#` alone matches every topic, and every topic has a level: `prefix.>`.
                return if i == 0 {
                    vec![multi]
                } else {
                    vec![out, multi]
                };
            }
            "+" => out.push_str(".*"),
            level => {
                out.push('.');
                push_level(&mut out, level);
            }
        }
    }
    vec![out]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_tokens() {
        assert_eq!(topic_subject("m", "a/b"), "m.a.b");
        assert_eq!(topic_subject("m", "a//b"), "m.a.%.b");
        assert_eq!(topic_subject("m", "/"), "m.%.%");
        assert_eq!(topic_subject("m", "a.b c"), "m.a%2Eb%20c");
        assert_eq!(topic_subject("m", "$SYS/x"), "m.$SYS.x");
        assert_eq!(topic_subject("m", "é"), "m.%C3%A9");
        assert_eq!(subject_topic("m", "m.a.%.b").as_deref(), Some("a//b"));
        assert_eq!(subject_topic("m", "m.%C3%A9").as_deref(), Some("é"));
        assert_eq!(subject_topic("m", "x.a"), None);
        assert_eq!(subject_topic("m", "m.a%2"), None);
        assert_eq!(subject_topic("m", "m.a..b"), None);
    }

    #[test]
    fn filters_map_to_subjects() {
        assert_eq!(filter_subjects("m", "a/+/c"), ["m.a.*.c"]);
        assert_eq!(filter_subjects("m", "a/#"), ["m.a", "m.a.>"]);
        assert_eq!(filter_subjects("m", "#"), ["m.>"]);
        assert_eq!(filter_subjects("m", "+/#"), ["m.*", "m.*.>"]);
        assert_eq!(filter_subjects("m", "a//#"), ["m.a.%", "m.a.%.>"]);
    }
}

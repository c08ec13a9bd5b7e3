//! Validated string types (§1.5.4, §4.7). Each wraps the `Bytes` slice it was decoded from, so
//! holding a topic or client id costs a refcount, not a copy.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

use bytes::Bytes;

use crate::error::DecodeError;

/// A UTF-8 string as MQTT defines it: well-formed UTF-8 (which excludes the surrogate range),
/// no U+0000, at most 65,535 bytes.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct MqttString(Bytes);

impl MqttString {
    /// Validates bytes read off the wire.
    pub fn from_bytes(bytes: Bytes) -> Result<MqttString, DecodeError> {
        validate_utf8(&bytes)?;
        Ok(MqttString(bytes))
    }

    /// Builds a string from text the program holds (configuration, generated ids).
    pub fn new(text: &str) -> Result<MqttString, DecodeError> {
        if text.len() > usize::from(u16::MAX) {
            return Err(DecodeError::Truncated);
        }
        if text.contains('\0') {
            return Err(DecodeError::NullCharacter);
        }
        Ok(MqttString(Bytes::copy_from_slice(text.as_bytes())))
    }

    pub const fn from_static(text: &'static str) -> MqttString {
        MqttString(Bytes::from_static(text.as_bytes()))
    }

    pub fn as_str(&self) -> &str {
        // SAFETY-free: validated at construction, so this cannot fail; fall back to "" rather
        // than panic to keep the no-panic rule absolute.
        std::str::from_utf8(&self.0).unwrap_or("")
    }

    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn validate_utf8(bytes: &[u8]) -> Result<(), DecodeError> {
    // `from_utf8` rejects overlong forms and encoded surrogates (U+D800..U+DFFF) [MQTT-1.5.4-1].
    let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)?;
    if text.as_bytes().contains(&0) {
        return Err(DecodeError::NullCharacter);
    }
    Ok(())
}

impl Deref for MqttString {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for MqttString {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl Hash for MqttString {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl fmt::Debug for MqttString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for MqttString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A topic name: what a PUBLISH is sent to. No wildcards [MQTT-3.3.2-2]. Non-empty
/// [MQTT-4.7.3-1], except inside a v5 PUBLISH that names its topic by alias only (§3.3.2.3.4):
/// the PUBLISH decoder enforces that one exception.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicName(MqttString);

impl TopicName {
    pub fn from_string(s: MqttString) -> Result<TopicName, DecodeError> {
        if s.as_bytes().iter().any(|&b| b == b'+' || b == b'#') {
            return Err(DecodeError::WildcardInTopicName);
        }
        Ok(TopicName(s))
    }

    /// A non-empty topic name from program text.
    pub fn new(text: &str) -> Result<TopicName, DecodeError> {
        if text.is_empty() {
            return Err(DecodeError::EmptyTopicName);
        }
        TopicName::from_string(MqttString::new(text)?)
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn as_mqtt_string(&self) -> &MqttString {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the topic is reserved for the server (§4.7.2): wildcards at the first level do
    /// not match it.
    pub fn is_system(&self) -> bool {
        self.0.as_bytes().first() == Some(&b'$')
    }
}

impl Deref for TopicName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A topic filter: what a SUBSCRIBE asks for. Non-empty; `+` and `#` only as a whole level and
/// `#` only as the last level [MQTT-4.7.1-2] [MQTT-4.7.1-3].
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicFilter(MqttString);

impl TopicFilter {
    pub fn from_string(s: MqttString) -> Result<TopicFilter, DecodeError> {
        validate_filter(s.as_str())?;
        Ok(TopicFilter(s))
    }

    pub fn new(text: &str) -> Result<TopicFilter, DecodeError> {
        TopicFilter::from_string(MqttString::new(text)?)
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn as_mqtt_string(&self) -> &MqttString {
        &self.0
    }

    pub fn has_wildcards(&self) -> bool {
        self.0.as_bytes().iter().any(|&b| b == b'+' || b == b'#')
    }
}

fn validate_filter(filter: &str) -> Result<(), DecodeError> {
    if filter.is_empty() {
        return Err(DecodeError::EmptyTopicFilter);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        match level {
            "+" => {}
            "#" if last => {}
            _ if level.contains(['+', '#']) => return Err(DecodeError::InvalidTopicFilter),
            _ => {}
        }
    }
    Ok(())
}

impl Deref for TopicFilter {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_rules() {
        let cases: &[(&str, &[u8], Option<DecodeError>)] = &[
            ("plain ascii", b"a/b", None),
            ("multibyte", "ä/€/𝄞".as_bytes(), None),
            (
                "U+0000 [MQTT-1.5.4-2]",
                b"a\0b",
                Some(DecodeError::NullCharacter),
            ),
            (
                "surrogate D800 [MQTT-1.5.4-1]",
                b"\xED\xA0\x80",
                Some(DecodeError::InvalidUtf8),
            ),
            (
                "overlong slash [MQTT-1.5.4-1]",
                b"\xC0\xAF",
                Some(DecodeError::InvalidUtf8),
            ),
            (
                "truncated sequence",
                b"\xE2\x82",
                Some(DecodeError::InvalidUtf8),
            ),
        ];
        for (name, bytes, want) in cases {
            let got = MqttString::from_bytes(Bytes::copy_from_slice(bytes)).err();
            assert_eq!(&got, want, "{name}");
        }
    }

    #[test]
    fn topic_filter_rules() {
        let cases: &[(&str, bool)] = &[
            ("sport/tennis/#", true),
            ("#", true),
            ("+", true),
            ("+/tennis/#", true),
            ("sport/+/player1", true),
            ("/+", true),
            ("a//b", true),
            ("$SYS/#", true),
            ("sport/tennis#", false),          // [MQTT-4.7.1-2]
            ("sport/tennis/#/ranking", false), // [MQTT-4.7.1-2]
            ("sport+", false),                 // [MQTT-4.7.1-3]
            ("", false),                       // [MQTT-4.7.3-1]
        ];
        for (filter, ok) in cases {
            assert_eq!(TopicFilter::new(filter).is_ok(), *ok, "{filter:?}");
        }
    }

    #[test]
    fn topic_name_rules() {
        assert!(TopicName::new("a/b").is_ok());
        assert_eq!(TopicName::new("a/+"), Err(DecodeError::WildcardInTopicName));
        assert_eq!(TopicName::new("a/#"), Err(DecodeError::WildcardInTopicName));
        assert_eq!(TopicName::new(""), Err(DecodeError::EmptyTopicName));
        assert!(TopicName::new("$SYS/x").unwrap().is_system());
    }
}

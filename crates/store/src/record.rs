//! Record layouts: how each partition's keys and values are laid out on disk (the table is in
//! `lib.rs`; messages take the engine's portable form, `petrel_engine::record`). Every value starts with its record version, so a later format can tell them
//! apart; a change to any layout here is a new format and a new golden store.

use std::time::Instant;

use petrel_codec::LastWill;
use petrel_codec::QoS;
use petrel_engine::auth::Login;
use petrel_engine::session::Delivery;

pub(crate) use petrel_engine::record::{
    decode_message, from_wall, message_record, options_byte, options_from, publish_record, to_wall,
    RECORD_VERSION,
};

/// `client id, 0x00, suffix`: MQTT strings never contain U+0000 [MQTT-1.5.4-2], so the
/// separator keeps one client's keys together and apart from every other's.
pub(crate) fn client_key(client_id: &str, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(client_id.len() + 1 + suffix.len());
    k.extend_from_slice(client_id.as_bytes());
    k.push(0);
    k.extend_from_slice(suffix);
    k
}

pub(crate) fn split_client_key(key: &[u8]) -> Option<(&str, &[u8])> {
    let split = key.iter().position(|&b| b == 0)?;
    let client = std::str::from_utf8(&key[..split]).ok()?;
    Some((client, &key[split + 1..]))
}

/// `version, expiry interval (u32), offline until (u64 wall-clock ms, 0: connected)`, then
/// who owns the session: the user name and the certificate identity, each a presence byte and,
/// when present, a u16 length and the UTF-8 bytes. A record of 13 bytes (written before owners
/// were kept) has no owner; the first login to resume it becomes its owner.
pub(crate) fn session_record(
    expiry_interval: u32,
    offline_until: u64,
    login: Option<&Login>,
) -> Vec<u8> {
    let mut v = Vec::with_capacity(13 + 6);
    v.push(RECORD_VERSION);
    v.extend_from_slice(&expiry_interval.to_be_bytes());
    v.extend_from_slice(&offline_until.to_be_bytes());
    if let Some(login) = login {
        for name in [&login.username, &login.certificate] {
            match name.as_deref() {
                // MQTT strings and certificate names fit a u16 length; a longer one is cut
                // at a character boundary rather than written with a wrong length.
                Some(name) => {
                    let mut end = name.len().min(usize::from(u16::MAX));
                    while !name.is_char_boundary(end) {
                        end -= 1;
                    }
                    v.push(1);
                    v.extend_from_slice(&(end as u16).to_be_bytes());
                    v.extend_from_slice(&name.as_bytes()[..end]);
                }
                None => v.push(0),
            }
        }
    }
    v
}

/// A session record's expiry interval, offline-until time and owner (see [`session_record`]).
pub(crate) fn decode_session(value: &[u8]) -> Result<(u32, u64, Option<Login>), String> {
    if value.len() < 13 || value[0] != RECORD_VERSION {
        return Err("bad session record".into());
    }
    let expiry = u32::from_be_bytes(value[1..5].try_into().unwrap_or_default());
    let until = u64::from_be_bytes(value[5..13].try_into().unwrap_or_default());
    if value.len() == 13 {
        return Ok((expiry, until, None));
    }
    let mut rest = &value[13..];
    let mut name = || -> Result<Option<String>, String> {
        let (&present, tail) = rest.split_first().ok_or("session owner cut short")?;
        rest = tail;
        match present {
            0 => Ok(None),
            1 => {
                if rest.len() < 2 {
                    return Err("session owner cut short".into());
                }
                let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let bytes = rest.get(2..2 + len).ok_or("session owner cut short")?;
                rest = &rest[2 + len..];
                String::from_utf8(bytes.to_vec())
                    .map(Some)
                    .map_err(|_| "session owner is not UTF-8".into())
            }
            _ => Err("bad session owner".into()),
        }
    };
    let login = Login {
        username: name()?,
        certificate: name()?,
    };
    if !rest.is_empty() {
        return Err("bytes after the session record".into());
    }
    Ok((expiry, until, Some(login)))
}

/// A will waiting for its delay: when it is due, then the will as a v5 PUBLISH frame (its
/// Will Delay Interval left out: a PUBLISH may not carry one).
pub(crate) fn will_record(at: Instant, will: &LastWill) -> Vec<u8> {
    let mut properties = will.properties.clone();
    if properties.will_delay_interval.is_some() {
        properties.will_delay_interval = None;
    }
    publish_record(
        Some(at),
        will.qos,
        will.retain,
        &will.topic,
        &properties,
        &will.payload,
    )
}

pub(crate) fn decode_will(value: &[u8]) -> Result<(Instant, LastWill), String> {
    let message = decode_message(value)?;
    let at = message.expires_at.unwrap_or_else(Instant::now);
    // The record's time is when the will is due; the message's own expiry travels in its
    // properties and starts when the will is published.
    let properties = message.properties;
    Ok((
        at,
        LastWill {
            topic: message.topic,
            payload: message.payload,
            qos: message.qos,
            retain: message.retain,
            properties,
        },
    ))
}

/// A queue entry: the stored message it is, and how it goes to this session.
pub(crate) fn entry_record(message_id: u64, d: &Delivery) -> Vec<u8> {
    let ids = d.subscription_ids();
    let mut v = Vec::with_capacity(12 + 4 * ids.len());
    v.push(RECORD_VERSION);
    v.extend_from_slice(&message_id.to_be_bytes());
    v.push(d.qos as u8);
    v.push(u8::from(d.retain));
    v.push(u8::try_from(ids.len()).unwrap_or(u8::MAX));
    for id in ids.iter().take(usize::from(u8::MAX)) {
        v.extend_from_slice(&id.to_be_bytes());
    }
    v
}

pub(crate) struct Entry {
    pub message_id: u64,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
}

pub(crate) fn decode_entry(v: &[u8]) -> Option<Entry> {
    if v.len() < 12 || v[0] != RECORD_VERSION {
        return None;
    }
    let n = usize::from(v[11]);
    if v.len() != 12 + 4 * n {
        return None;
    }
    Some(Entry {
        message_id: u64::from_be_bytes(v[1..9].try_into().ok()?),
        qos: QoS::from_u8(v[9]).filter(|q| *q != QoS::AtMostOnce)?,
        retain: v[10] != 0,
        subscription_ids: v[12..]
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    })
}

/// The in-flight state of a queue entry: 1 = sent with the packet id, 2 = PUBREC received.
pub(crate) fn stage_record(stage: u8, packet_id: u16) -> [u8; 4] {
    let id = packet_id.to_be_bytes();
    [RECORD_VERSION, stage, id[0], id[1]]
}

/// The record version of the checked envelope, written since store format 2: every value is
/// `0x81, xxh3-64 of (partition, key, record), record`, where the record keeps its own
/// version byte. The checksum covers the key too, so a flipped byte in either is caught when
/// the record is read, whatever fjall checked on the way (its segment reads do not verify
/// their block checksums). 0x81 stays clear of the small versions the records inside use.
pub(crate) const CHECKED: u8 = 0x81;

fn checksum(partition: &str, key: &[u8], record: &[u8]) -> [u8; 8] {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(partition.as_bytes());
    h.update(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_be_bytes());
    h.update(key);
    h.update(record);
    h.digest().to_be_bytes()
}

/// A record as stored: in its checked envelope.
pub(crate) fn seal(partition: &str, key: &[u8], record: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + record.len());
    v.push(CHECKED);
    v.extend_from_slice(&checksum(partition, key, record));
    v.extend_from_slice(record);
    v
}

/// The record inside a stored value, once its checksum matches. `legacy`: the store was
/// written by format 1, whose records have no envelope and are taken as they are.
pub(crate) fn unseal<'a>(
    partition: &str,
    key: &[u8],
    value: &'a [u8],
    legacy: bool,
) -> Result<&'a [u8], String> {
    match value.first() {
        Some(&CHECKED) if value.len() >= 9 => {
            let (sum, record) = value[1..].split_at(8);
            if sum == checksum(partition, key, record) {
                Ok(record)
            } else {
                Err(
                    "checksum mismatch: the record's key or value changed after it was written"
                        .to_owned(),
                )
            }
        }
        Some(&RECORD_VERSION) if legacy => Ok(value),
        Some(v) => Err(format!(
            "not a checked record (version byte {v:#04x}, {} bytes)",
            value.len()
        )),
        None => Err("empty record".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flipped_byte_of_a_sealed_record_or_its_key_is_caught() {
        let record = session_record(60, 1234, None);
        let sealed = seal("sessions", b"client", &record);
        assert_eq!(
            unseal("sessions", b"client", &sealed, false),
            Ok(&record[..])
        );
        for i in 0..sealed.len() {
            for bit in 0..8 {
                let mut d = sealed.clone();
                d[i] ^= 1 << bit;
                assert!(
                    unseal("sessions", b"client", &d, false).is_err(),
                    "{i}/{bit}"
                );
            }
        }
        assert!(unseal("sessions", b"clienu", &sealed, false).is_err());
        assert!(unseal("queue", b"client", &sealed, false).is_err());
        // A format-1 record reads only from a format-1 store.
        assert!(unseal("sessions", b"client", &record, true).is_ok());
        assert!(unseal("sessions", b"client", &record, false).is_err());
    }
}

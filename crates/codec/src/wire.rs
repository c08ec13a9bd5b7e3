//! Primitive field readers and writers (§1.5): integers, variable byte integers, strings and
//! binary data. Readers take a `Bytes` cursor and slice from it, so strings and payloads share
//! the read buffer instead of being copied.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::strings::MqttString;

pub(crate) fn read_u8(buf: &mut Bytes) -> Result<u8, DecodeError> {
    if buf.remaining() < 1 {
        return Err(DecodeError::Truncated);
    }
    Ok(buf.get_u8())
}

pub(crate) fn read_u16(buf: &mut Bytes) -> Result<u16, DecodeError> {
    if buf.remaining() < 2 {
        return Err(DecodeError::Truncated);
    }
    Ok(buf.get_u16())
}

pub(crate) fn read_u32(buf: &mut Bytes) -> Result<u32, DecodeError> {
    if buf.remaining() < 4 {
        return Err(DecodeError::Truncated);
    }
    Ok(buf.get_u32())
}

/// Reads a variable byte integer (§1.5.5) from a complete buffer.
pub(crate) fn read_varint(buf: &mut Bytes) -> Result<u32, DecodeError> {
    match parse_varint(buf)? {
        Some((value, used)) => {
            buf.advance(used);
            Ok(value)
        }
        None => Err(DecodeError::Truncated),
    }
}

/// Parses a variable byte integer at the start of `bytes` without consuming it: `Ok(None)` when
/// more bytes are needed, the value and its length otherwise. Used for the fixed header, where
/// running out of bytes means "wait for more" rather than "malformed".
pub fn parse_varint(bytes: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&b) = bytes.get(i) else {
            return Ok(None);
        };
        value |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            // A last byte of 0 after others: the value fits in fewer bytes.
            if i > 0 && b == 0 {
                return Err(DecodeError::NonMinimalVarInt);
            }
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::MalformedVarInt)
}

pub(crate) fn read_binary(buf: &mut Bytes) -> Result<Bytes, DecodeError> {
    let len = usize::from(read_u16(buf)?);
    if buf.remaining() < len {
        return Err(DecodeError::Truncated);
    }
    Ok(buf.split_to(len))
}

pub(crate) fn read_string(buf: &mut Bytes) -> Result<MqttString, DecodeError> {
    MqttString::from_bytes(read_binary(buf)?)
}

pub fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub fn write_varint(buf: &mut BytesMut, mut value: usize) {
    loop {
        let mut byte = (value & 0x7f) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

/// Writes a two-byte length and the bytes. Callers guarantee `data.len() <= 65535`: every
/// string or binary field comes from a decoded packet or a validated constructor.
pub(crate) fn write_binary(buf: &mut BytesMut, data: &[u8]) {
    debug_assert!(data.len() <= usize::from(u16::MAX));
    buf.put_u16(data.len() as u16);
    buf.put_slice(data);
}

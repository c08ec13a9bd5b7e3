//! Arbitrary bytes to the decoder, as a peer could send them.
//!
//! The first byte picks the protocol version; the rest is the byte stream, decoded packet after
//! packet until the decoder wants more bytes or refuses the input. Beyond "never panics", every
//! packet the decoder accepts is the oracle for a round trip: it must encode, to exactly
//! `encoded_len` bytes, decode back to an equal packet, and every strict prefix of that
//! encoding must be "need more bytes".

use bytes::BytesMut;
use petrel_codec::{decode as decode_packet, encode, encoded_len, Packet, ProtocolVersion};

/// A typical broker limit; large enough that the size check is not all the fuzzer meets.
const MAX_PACKET: u32 = 1 << 20;

pub fn decode(data: &[u8]) {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let version = version_of(selector);
    let mut buf = BytesMut::from(stream);
    loop {
        let before = buf.clone();
        match decode_packet(&mut buf, version, MAX_PACKET) {
            Ok(Some(packet)) => {
                assert!(buf.len() < before.len(), "Ok(Some) consumed nothing");
                round_trip(&packet, version);
            }
            Ok(None) => {
                assert_eq!(buf, before, "Ok(None) consumed bytes");
                break;
            }
            Err(_) => break,
        }
    }
}

pub(crate) fn version_of(selector: u8) -> ProtocolVersion {
    match selector % 3 {
        0 => ProtocolVersion::V3_1,
        1 => ProtocolVersion::V3_1_1,
        _ => ProtocolVersion::V5,
    }
}

fn round_trip(packet: &Packet, version: ProtocolVersion) {
    let mut wire = BytesMut::new();
    encode(packet, version, &mut wire).expect("a decoded packet encodes");
    assert_eq!(
        wire.len(),
        encoded_len(packet, version),
        "encoded_len disagrees"
    );
    let mut again = wire.clone();
    let decoded = decode_packet(&mut again, version, u32::MAX)
        .expect("a re-encoded packet decodes")
        .expect("a re-encoded packet is complete");
    assert_eq!(&decoded, packet, "packet changed in a round trip");
    assert!(again.is_empty(), "re-encoded packet not fully consumed");
    for len in 0..wire.len() {
        let mut prefix = BytesMut::from(&wire[..len]);
        let got = decode_packet(&mut prefix, version, u32::MAX);
        assert!(matches!(got, Ok(None)), "prefix of {len} bytes: {got:?}");
        assert_eq!(prefix.len(), len, "Ok(None) consumed bytes");
    }
}

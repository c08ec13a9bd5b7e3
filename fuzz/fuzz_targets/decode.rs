//! Arbitrary bytes to the decoder, every protocol version, with a round-trip oracle
//! (`petrel_fuzzing::decode`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| petrel_fuzzing::decode(data));

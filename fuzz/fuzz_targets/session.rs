//! Packet sequences into the session engine, the first bytes choosing version and state
//! (`petrel_fuzzing::session`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| petrel_fuzzing::session(data));

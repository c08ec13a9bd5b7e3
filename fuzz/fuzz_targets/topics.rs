//! Topic filters and names through the parser and both tries, against the reference matcher
//! (`petrel_fuzzing::topics`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| petrel_fuzzing::topics(data));

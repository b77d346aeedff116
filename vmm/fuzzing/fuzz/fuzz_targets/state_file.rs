#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::state::state_file(data));

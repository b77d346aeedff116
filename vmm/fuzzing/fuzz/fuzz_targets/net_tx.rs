#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::net::net_tx(data));

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::blk::blk_request(data));

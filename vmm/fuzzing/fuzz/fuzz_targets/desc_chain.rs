#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::desc::desc_chain(data));

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::vhost_user::vhost_user(data));

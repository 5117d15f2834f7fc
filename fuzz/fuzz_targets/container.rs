#![no_main]

// Body: ckptkit::fuzzing::container_bytes (replayed by tests/fuzz_regressions.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| ckptkit::fuzzing::container_bytes(data));

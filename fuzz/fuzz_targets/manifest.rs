#![no_main]

// Body: ckptkit::fuzzing::manifest_bytes (replayed by tests/fuzz_regressions.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| ckptkit::fuzzing::manifest_bytes(data));

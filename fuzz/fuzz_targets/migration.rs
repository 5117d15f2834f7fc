#![no_main]

// Body: ckptkit::fuzzing::migration (replayed by tests/fuzz_regressions.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| ckptkit::fuzzing::migration(data));

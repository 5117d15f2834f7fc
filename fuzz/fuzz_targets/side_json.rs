#![no_main]

// Body: ckptkit::fuzzing::side_json (replayed by tests/fuzz_regressions.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| ckptkit::fuzzing::side_json(data));

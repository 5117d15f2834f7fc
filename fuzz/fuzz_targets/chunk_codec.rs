#![no_main]

// Body: ckptkit::fuzzing::chunk_codec (replayed by tests/fuzz_regressions.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| ckptkit::fuzzing::chunk_codec(data));

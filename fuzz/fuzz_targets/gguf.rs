#![no_main]

// Body: ckptkit::fuzzing::gguf_bytes (replayed by tests/fuzz_regressions.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| ckptkit::fuzzing::gguf_bytes(data));

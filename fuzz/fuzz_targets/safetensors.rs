#![no_main]

// Body: ckptkit::fuzzing::safetensors_bytes (replayed by tests/fuzz_regressions.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| ckptkit::fuzzing::safetensors_bytes(data));

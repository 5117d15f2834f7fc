#![no_main]

// Body: ckptkit::fuzzing::writer_ops (replayed by tests/fuzz_regressions.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| ckptkit::fuzzing::writer_ops(data));

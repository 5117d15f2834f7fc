#![no_main]

// Body: ckptkit::fuzzing::layout_detect (replayed by tests/fuzz_regressions.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| ckptkit::fuzzing::layout_detect(data));

//! The `--json` of every command is serde of the library's report: the
//! same fields (README, "JSON output"), the same values.

mod common;

use std::collections::BTreeSet;

use ckptkit::migrate::{check, convert, inspect, verify, ConvertOptions};
use common::cli::{run, run_ok, s};
use serde_json::Value;

fn int8_case(f: &str) -> std::path::PathBuf {
    common::cli::root()
        .join("tests/fixtures/int8/ct-bf16-int-channel")
        .join(f)
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .expect("a JSON object")
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn stdout_json(o: &std::process::Output) -> Value {
    serde_json::from_slice(&o.stdout).expect("one JSON object on stdout")
}

fn lib<T: serde::Serialize>(r: &T) -> Value {
    serde_json::to_value(r).unwrap()
}

#[test]
fn convert_json_is_the_summary() {
    let d = tempfile::tempdir().unwrap();
    let input = int8_case("float.safetensors");
    let (a, b) = (
        d.path().join("a.safetensors"),
        d.path().join("b.safetensors"),
    );
    let opts = ConvertOptions::default()
        .target(ckptkit::migrate::Target::parse("int8:ct").unwrap())
        .output_hash(true);
    let mut want = lib(&convert(&input, &a, &opts).unwrap());
    let mut got = stdout_json(&run_ok(&[
        "convert",
        s(&input),
        s(&b),
        "--to",
        "int8:ct",
        "--json",
    ]));
    assert_eq!(
        keys(&got),
        set(&[
            "output",
            "tensors",
            "layers",
            "bytes_in",
            "bytes_out",
            "seconds",
            "dry_run",
            "lossless",
            "blake3",
            "losses",
            "plan",
            "input_verified",
            "input_unchecked",
            "warnings",
            "carried",
            "skipped",
        ])
    );
    // same bytes written (the hash of the output), same plan
    assert_eq!(got["blake3"], want["blake3"]);
    assert_eq!(
        want["blake3"].as_str().unwrap(),
        blake3::hash(&std::fs::read(&a).unwrap()).to_hex().as_str()
    );
    for v in [&mut want, &mut got] {
        let o = v.as_object_mut().unwrap();
        o.remove("seconds");
        o.remove("output");
    }
    assert_eq!(got, want);
    // a dry run: nothing written, nothing read, no hash
    let dry = stdout_json(&run_ok(&[
        "convert",
        s(&input),
        s(&d.path().join("c.safetensors")),
        "--to",
        "int8:ct",
        "--dry-run",
        "--json",
    ]));
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["blake3"], Value::Null);
    assert_eq!(dry["input_verified"], false);
    assert!(!d.path().join("c.safetensors").exists());
}

#[test]
fn inspect_json_is_the_report() {
    let input = int8_case("model.safetensors");
    let r = inspect(&input, &ConvertOptions::default()).unwrap();
    assert!(r.ok());
    assert!(
        r.layers.iter().any(|l| l.layout.contains("int8")),
        "{:?}",
        r.layers
    );
    let got = stdout_json(&run_ok(&["inspect", s(&input), "--json"]));
    assert_eq!(
        keys(&got),
        set(&["input", "layers", "total_bytes", "problems", "warnings"])
    );
    assert_eq!(got, lib(&r));
}

#[test]
fn check_json_is_the_report() {
    let (input, reference) = (
        int8_case("float.safetensors"),
        int8_case("model.safetensors"),
    );
    let r = check(&input, &reference, &ConvertOptions::default()).unwrap();
    assert!(!r.compatible());
    let o = run(&["check", s(&input), "--against", s(&reference), "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let got = stdout_json(&o);
    assert_eq!(
        keys(&got),
        set(&[
            "compatible",
            "missing",
            "unexpected",
            "mismatches",
            "fix",
            "unknown_layouts"
        ])
    );
    assert_eq!(got, lib(&r));
    assert_eq!(got["compatible"], false);
    assert!(got["fix"].as_str().unwrap().starts_with("migrate convert "));
    // compatible: fix is null
    let same = check(&reference, &reference, &ConvertOptions::default()).unwrap();
    assert_eq!(lib(&same)["fix"], Value::Null);
    assert_eq!(lib(&same)["compatible"], true);
}

#[test]
fn verify_and_recover_json_are_the_reports() {
    let input = int8_case("model.safetensors");
    let r = verify(&input).unwrap();
    let got = stdout_json(&run_ok(&["verify", s(&input), "--json"]));
    assert_eq!(keys(&got), set(&["ok", "tensors", "bytes", "unchecked"]));
    assert_eq!(got, lib(&r));
    assert_eq!(got["ok"], true);
    let d = tempfile::tempdir().unwrap();
    let r = ckptkit::recover(&d.path().join("x.safetensors")).unwrap();
    let got = stdout_json(&run_ok(&[
        "recover",
        s(&d.path().join("x.safetensors")),
        "--json",
    ]));
    assert_eq!(
        keys(&got),
        set(&["commits", "completed", "pending", "removed_temporaries"])
    );
    assert_eq!(got, lib(&r));
}

#[test]
fn compression_spellings_parse_in_the_library() {
    let z: ckptkit::ZstdOptions = "zstd".parse().unwrap();
    assert_eq!(z, ckptkit::ZstdOptions::default());
    assert_eq!("zstd:22".parse::<ckptkit::ZstdOptions>().unwrap().level, 22);
    for bad in ["zstd:0", "zstd:23", "zstd:x", "lz4", "zstd:"] {
        let e = bad.parse::<ckptkit::ZstdOptions>().unwrap_err();
        assert!(
            matches!(e.kind(), ckptkit::ErrorKind::Usage(_)),
            "{bad}: {e}"
        );
    }
}

#[test]
fn errors_keep_the_error_they_report() {
    use std::error::Error as _;
    let d = tempfile::tempdir().unwrap();
    let qmap = d.path().join("bad_qmap.json");
    std::fs::write(&qmap, "{\"lin\": ").unwrap();
    // a quanto map that is not JSON: the parser's error is the source
    let src =
        ckptkit::open_source(&common::cli::fx("bf16-qint8", "quantized.safetensors")).unwrap();
    let bad = ConvertOptions::default().qmap(d.path().join("bad_qmap.json"));
    let e = ckptkit::migrate::input_layers(
        &common::cli::fx("bf16-qint8", "quantized.safetensors"),
        src.as_ref(),
        &bad,
    )
    .unwrap_err();
    assert!(matches!(e.kind(), ckptkit::ErrorKind::Json(_)), "{e}");
    let s = e.source().expect("a source");
    assert!(s.downcast_ref::<serde_json::Error>().is_some(), "{s:?}");
}

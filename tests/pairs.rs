//! `check`'s fix fixes, for every pair of layouts: for each input layout X
//! and reference layout Y (plain, every quanto qtype, the int8 presets, the
//! ComfyUI layouts, block FP8, compressed-tensors FP8), both
//! made from the same float weights, `check X --against Y` says X does not
//! load where Y is expected and prints a `migrate convert` command; running
//! exactly that command gives an output that `check` accepts.
//!
//! Per pair class: a plain input gives the reference's bytes exactly
//! (activation scales excepted: they come from calibration); a lossless
//! re-layout converts back to the input byte for byte; a lossy pair's fix
//! carries `--allow-lossy`; a pair no conversion can do is refused with a
//! layout error that names the layer.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ckptkit::migrate::{check, convert, like_target, ConvertOptions};
use ckptkit::migrate::{PlanOptions, Target};

const LAYOUTS: [&str; 23] = [
    "plain",
    "quanto:qint8",
    "quanto:qint4",
    "quanto:qint2",
    "quanto:qfloat8_e4m3fn",
    "quanto:qfloat8_e5m2",
    "quanto:qfloat8_e4m3fnuz",
    "int8",
    "int8:bnb",
    "int8:ct",
    "int8:ct:int-quantized",
    "comfy:float8_e4m3fn",
    "comfy:float8_e5m2",
    "comfy:int8_tensorwise",
    "comfy:int8_tensorwise:per_row",
    "comfy:mxfp8",
    "comfy:nvfp4",
    "fp8:legacy",
    "fp8:block",
    "fp8:block:ue8m0",
    "fp8:ct:tensor",
    "fp8:ct:channel",
    "fp8:ct:block=128x128",
];

fn tensors(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let s = ckptkit::open_source(p).unwrap();
    s.tensors()
        .iter()
        .map(|t| (t.key.clone(), s.read(&t.key).unwrap().to_vec()))
        .collect()
}

/// The model in `layout`, made by ckptkit from the float weights (whose
/// quantization the fixture tests prove identical to the libraries').
fn make(float: &Path, layout: &str, dir: &Path) -> PathBuf {
    if layout == "plain" {
        return float.to_path_buf();
    }
    let out = dir.join(layout.replace(':', "_")).join("model.safetensors");
    let opts = ConvertOptions::default().target(Target::parse(layout).unwrap());
    convert(float, &out, &opts).unwrap_or_else(|e| panic!("making {layout}: {e}"));
    out
}

/// Runs the command a `check` printed, in-process: `migrate convert IN
/// OUT --like REF [--allow-lossy]`.
fn run_fix(fix: &str, out: &Path) -> ckptkit::Result<bool> {
    let words: Vec<&str> = fix.split_whitespace().collect();
    assert_eq!(&words[..2], ["migrate", "convert"], "{fix}");
    let input = PathBuf::from(words[2]);
    assert_eq!(words[3], "OUTPUT.safetensors", "{fix}");
    assert_eq!(words[4], "--like", "{fix}");
    let reference = PathBuf::from(words[5]);
    let lossy = words[6..] == ["--allow-lossy"];
    assert!(lossy || words.len() == 6, "{fix}");
    let opts = ConvertOptions::default()
        .target(like_target(&reference)?)
        .select(PlanOptions::default().allow_lossy(lossy))
        .extra_reads(vec![reference]);
    convert(&input, out, &opts).map(|_| lossy)
}

fn is_activation_scale(k: &str) -> bool {
    k.ends_with(".input_scale") || k.ends_with(".output_scale")
}

#[test]
fn checks_fix_fixes_for_every_pair_of_layouts() {
    let d = tempfile::tempdir().unwrap();
    let float = common::cli::fx("bf16-qint8", "float.safetensors");
    let refs: Vec<PathBuf> = LAYOUTS
        .iter()
        .map(|l| make(&float, l, &d.path().join("refs")))
        .collect();
    let inputs: Vec<PathBuf> = LAYOUTS
        .iter()
        .map(|l| make(&float, l, &d.path().join("inputs")))
        .collect();
    let mut classes: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (xi, x) in LAYOUTS.iter().enumerate() {
        for (yi, y) in LAYOUTS.iter().enumerate() {
            let pair = format!("{x} -> {y}");
            let r = check(&inputs[xi], &refs[yi], &ConvertOptions::default())
                .unwrap_or_else(|e| panic!("{pair}: check: {e}"));
            if xi == yi {
                assert!(r.compatible(), "{pair}: {r:?}");
                assert!(r.fix.is_none());
                continue;
            }
            assert!(
                !r.compatible(),
                "{pair}: the layouts differ, check must say so"
            );
            let fix = r.fix.clone().unwrap_or_else(|| panic!("{pair}: no fix"));
            let out = d
                .path()
                .join("out")
                .join(format!("{xi}-{yi}"))
                .join("model.safetensors");
            let lossy = match run_fix(&fix, &out) {
                Ok(l) => l,
                Err(e) => {
                    // a pair no conversion can do: refused, naming the layer
                    assert!(
                        matches!(e.kind(), ckptkit::ErrorKind::Layout(_))
                            && e.location().layer.is_some(),
                        "{pair}: `{fix}` failed: {e}"
                    );
                    classes.entry("refused").or_default().push(pair);
                    continue;
                }
            };
            let after = check(&out, &refs[yi], &ConvertOptions::default())
                .unwrap_or_else(|e| panic!("{pair}: check after the fix: {e}"));
            assert!(after.compatible(), "{pair}: `{fix}` did not fix: {after:?}");
            if *x == "plain" {
                // the reference's bytes exactly
                let (a, b) = (tensors(&out), tensors(&refs[yi]));
                assert_eq!(
                    a.keys().collect::<Vec<_>>(),
                    b.keys().collect::<Vec<_>>(),
                    "{pair}"
                );
                for (k, v) in &b {
                    if !is_activation_scale(k) {
                        assert_eq!(&a[k], v, "{pair}: {k}");
                    }
                }
                classes
                    .entry("plain input: the reference's bytes")
                    .or_default()
                    .push(pair);
            } else if lossy {
                classes
                    .entry("lossy: --allow-lossy in the fix")
                    .or_default()
                    .push(pair);
            } else {
                classes
                    .entry("the fix without --allow-lossy")
                    .or_default()
                    .push(pair);
            }
        }
    }
    for (c, pairs) in &classes {
        eprintln!("{c}: {} pairs: {}", pairs.len(), pairs.join("; "));
    }
    assert!(classes["plain input: the reference's bytes"].len() == LAYOUTS.len() - 1);
    assert!(classes.contains_key("lossy: --allow-lossy in the fix"));
}

#[test]
fn lossless_relayouts_convert_back_byte_for_byte() {
    // quanto qint8 <-> the int8 presets that hold quanto's integers and
    // per-row scales exactly: the fix needs no --allow-lossy, and converting
    // the result back gives the input's bytes
    // and quanto qfloat8_e4m3fn <-> compressed-tensors FP8 per channel (the
    // same E4M3 bytes and per-row scales in the model dtype)
    let d = tempfile::tempdir().unwrap();
    let float = common::cli::fx("f16-qint8", "float.safetensors");
    for (x, y) in [
        ("quanto:qint8", "int8"),
        ("quanto:qint8", "int8:ct"),
        ("quanto:qint8", "int8:ct:int-quantized"),
        ("quanto:qfloat8_e4m3fn", "fp8:ct:channel"),
        ("quanto:qfloat8_e4m3fn", "fp8:ct:channel:float-quantized"),
    ] {
        let q8 = d.path().join("in").join(x.replace(':', "_"));
        let q8 = match q8.join("model.safetensors").exists() {
            true => q8.join("model.safetensors"),
            false => make(&float, x, &d.path().join("in")),
        };
        let reference = make(&float, y, &d.path().join("refs"));
        let r = check(&q8, &reference, &ConvertOptions::default()).unwrap();
        let fix = r.fix.unwrap();
        assert!(!fix.contains("--allow-lossy"), "{y}: {fix}");
        let out = d
            .path()
            .join("out")
            .join(y.replace(':', "_"))
            .join("model.safetensors");
        run_fix(&fix, &out).unwrap();
        let back = d
            .path()
            .join("back")
            .join(y.replace(':', "_"))
            .join("model.safetensors");
        let opts = ConvertOptions::default().target(like_target(&q8).unwrap());
        convert(&out, &back, &opts).unwrap();
        assert_eq!(tensors(&back), tensors(&q8), "{y}: back to {x}");
    }
}

//! ComfyUI `comfy_quant` per-tensor FP8 against files the real
//! comfy-kitchen 0.2.40 wrote (tests/fixtures/comfy, see its README):
//! quantizing is byte-identical, dequantizing is bit-identical, `--like`
//! and containers carry the layout, and legacy `scaled_fp8` files are
//! refused rather than half-converted.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ckptkit::migrate::{convert, like_target, ConvertOptions, PlanOptions, Target};
use ckptkit::{SafetensorsFile, TensorSource};

fn cases() -> Vec<PathBuf> {
    common::fixture_cases("comfy", 6)
}

fn case_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// key -> (dtype, shape, bytes)
fn tensors(p: &Path) -> BTreeMap<String, (ckptkit::Dtype, Vec<u64>, Vec<u8>)> {
    let f = SafetensorsFile::open(p).unwrap();
    f.tensors()
        .iter()
        .map(|t| {
            (
                t.key.clone(),
                (t.dtype, t.shape.clone(), f.read(&t.key).unwrap().to_vec()),
            )
        })
        .collect()
}

/// The `--to` spelling of a case's layout.
fn target_of(case: &serde_json::Value) -> String {
    match case["ckptkit_target"].as_str() {
        Some(t) => t.to_string(),
        None => format!("comfy:{}", case["format"].as_str().unwrap()),
    }
}

fn opts(to: &str, exclude: Vec<String>) -> ConvertOptions {
    ConvertOptions::default()
        .target(Target::parse(to).unwrap())
        .select(PlanOptions::default().exclude(exclude))
}

/// `--to comfy:FORMAT` gives comfy-kitchen's own codes, scale and marker,
/// tensor for tensor, on every fixture. The layers whose F16 reciprocal
/// scale overflows (where the library saturates every code) are refused,
/// each naming itself, and the rest of the file still matches.
#[test]
fn quantizing_float_weights_matches_comfy_kitchen_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let mut compared = 0;
    for dir in cases() {
        let case = case_json(&dir);
        let to = target_of(&case);
        let overflow = strings(&case["inv_overflow_modules"]);
        let mut exclude = strings(&case["skipped_modules"]);
        exclude.extend(overflow.iter().cloned());
        let out = tmp
            .path()
            .join(format!("{}.safetensors", case["name"].as_str().unwrap()));
        convert(&dir.join("float.safetensors"), &out, &opts(&to, exclude)).unwrap();
        let ours = tensors(&out);
        let theirs = tensors(&dir.join("quantized.safetensors"));
        let float = tensors(&dir.join("float.safetensors"));
        let refused = |k: &str| overflow.iter().any(|m| k.starts_with(&format!("{m}.")));
        let want: BTreeSet<&String> = theirs.keys().filter(|k| !refused(k)).collect();
        let got: BTreeSet<&String> = ours.keys().filter(|k| !refused(k)).collect();
        assert_eq!(got, want, "{}", dir.display());
        for (k, t) in &ours {
            if refused(k) {
                assert_eq!(t, &float[k], "{k}: an excluded layer is copied");
            } else {
                assert_eq!(t, &theirs[k], "{}: {k}", dir.display());
                compared += 1;
            }
        }
        for m in &overflow {
            let e = convert(
                &dir.join("float.safetensors"),
                &tmp.path().join("refused.safetensors"),
                &opts(&to, Vec::new()).select(PlanOptions::default().only(vec![m.clone()])),
            )
            .unwrap_err();
            assert_eq!(e.location().layer.as_deref(), Some(m.as_str()), "{e}");
            assert!(e.to_string().contains("overflows"), "{e}");
            assert!(!tmp.path().join("refused.safetensors").exists());
        }
    }
    assert!(compared > 100, "{compared} tensors compared");
}

/// `--to plain` of comfy-kitchen's files equals the library's own
/// dequantization, bit for bit, in the model's dtype; the rest of the model
/// is the float model, and no scale or marker is left.
#[test]
fn comfy_files_dequantize_exactly_as_comfy_kitchen_does() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in cases() {
        let out = tmp.path().join("plain.safetensors");
        std::fs::remove_file(&out).ok();
        convert(
            &dir.join("quantized.safetensors"),
            &out,
            &opts("plain", Vec::new()),
        )
        .unwrap();
        let ours = tensors(&out);
        let gold = tensors(&dir.join("dequantized.safetensors"));
        let float = tensors(&dir.join("float.safetensors"));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            float.keys().collect::<Vec<_>>(),
            "{}: a plain model's key set",
            dir.display()
        );
        assert!(!gold.is_empty());
        for (k, t) in &ours {
            match gold.get(k) {
                Some(g) => assert_eq!(t, g, "{}: {k}", dir.display()),
                None => assert_eq!(t, &float[k], "{}: {k}", dir.display()),
            }
        }
    }
}

/// `check` against a ComfyUI file explains the mismatch and its fix
/// (`--like`) quantizes the float model to the library's bytes; a container
/// keeps the layout and gives the file's tensors back.
#[test]
fn like_and_containers_carry_the_comfy_layout() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in cases() {
        let case = case_json(&dir);
        if !strings(&case["inv_overflow_modules"]).is_empty() {
            continue;
        }
        let q = dir.join("quantized.safetensors");
        let r = ckptkit::migrate::check(
            &dir.join("float.safetensors"),
            &q,
            &ConvertOptions::default(),
        )
        .unwrap();
        assert!(!r.mismatches.is_empty());
        assert!(
            r.fix.as_deref().unwrap_or("").contains("--like"),
            "{:?}",
            r.fix
        );
        let out = tmp.path().join("like.safetensors");
        std::fs::remove_file(&out).ok();
        convert(
            &dir.join("float.safetensors"),
            &out,
            &ConvertOptions::default().target(like_target(&q).unwrap()),
        )
        .unwrap();
        assert_eq!(tensors(&out), tensors(&q), "{}", dir.display());
        // through a container and back
        let ck = tmp.path().join("m.ckpk");
        let back = tmp.path().join("back.safetensors");
        for p in [&ck, &back] {
            std::fs::remove_file(p).ok();
        }
        convert(&q, &ck, &ConvertOptions::default()).unwrap();
        let c = ckptkit::Container::open(&ck).unwrap();
        assert_eq!(c.manifest().version.major, 2, "a family record");
        convert(&ck, &back, &ConvertOptions::default()).unwrap();
        assert_eq!(tensors(&back), tensors(&q), "{}", dir.display());
    }
}

/// A legacy `scaled_fp8` file (the library's codes and scales under
/// ComfyUI's old key names) converts as ComfyUI's `convert_old_quants`
/// reads it: to `comfy:<its format>` the codes and scales carry over
/// untouched and the marker is left out (the library's `comfy_quant` file,
/// byte for byte); to plain it dequantizes as the library does; kept, it
/// stays legacy with its marker; legacy layers beside `comfy_quant` ones
/// are refused.
#[test]
fn legacy_scaled_fp8_files_convert_as_comfyui_reads_them() {
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 0;
    for dir in cases() {
        let legacy = dir.join("legacy.safetensors");
        if !legacy.exists() {
            continue;
        }
        n += 1;
        let case = case_json(&dir);
        let fmt = case["format"].as_str().unwrap();
        let out = tmp.path().join(format!("{n}.safetensors"));
        let s = convert(&legacy, &out, &opts(&format!("comfy:{fmt}"), Vec::new())).unwrap();
        assert!(s.lossless(), "{}", dir.display());
        assert_eq!(
            tensors(&out),
            tensors(&dir.join("quantized.safetensors")),
            "{}",
            dir.display()
        );
        // dequantized
        let plain = tmp.path().join(format!("{n}-plain.safetensors"));
        convert(&legacy, &plain, &opts("plain", Vec::new())).unwrap();
        let gold = tensors(&dir.join("dequantized.safetensors"));
        let float = tensors(&dir.join("float.safetensors"));
        let ours = tensors(&plain);
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            float.keys().collect::<Vec<_>>()
        );
        for (k, t) in &ours {
            assert_eq!(
                t,
                gold.get(k).unwrap_or(&float[k]),
                "{}: {k}",
                dir.display()
            );
        }
        // kept through a container: still legacy, marker and all
        let ck = tmp.path().join(format!("{n}.ckpk"));
        let back = tmp.path().join(format!("{n}-back.safetensors"));
        convert(&legacy, &ck, &ConvertOptions::default()).unwrap();
        convert(&ck, &back, &ConvertOptions::default()).unwrap();
        assert_eq!(tensors(&back), tensors(&legacy), "{}", dir.display());
        // half converted: refused, naming a legacy layer
        let half = tmp.path().join(format!("{n}-half.safetensors"));
        let e = convert(
            &legacy,
            &half,
            &opts(&format!("comfy:{fmt}"), vec!["lin_a".into()]),
        )
        .unwrap_err();
        assert_eq!(e.location().layer.as_deref(), Some("lin_a"), "{e}");
        assert!(!half.exists());
    }
    assert_eq!(n, 6);
}

/// Per-row int8 codes carry between quanto qint8, compressed-tensors int8
/// channel and ComfyUI `int8_tensorwise` (per row) without touching an
/// integer: their scales widen exactly to ComfyUI's F32, so the way back is
/// byte-identical to the library's file, and ComfyUI's dequantization of
/// the carried codes equals the source library's own, bit for bit.
#[test]
fn per_row_int8_codes_carry_into_comfy_and_back_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut sources: Vec<(PathBuf, &str, PathBuf)> = Vec::new();
    for d in ["bf16-qint8", "f16-qint8", "f32-qint8"] {
        let c = root.join("quanto").join(d);
        sources.push((c.join("quantized.safetensors"), "quanto:qint8", c));
    }
    for d in [
        "ct-bf16-int-channel",
        "ct-f16-int-channel",
        "ct-f32-int-channel",
    ] {
        let c = root.join("int8").join(d);
        sources.push((c.join("model.safetensors"), "int8:ct:int-quantized", c));
    }
    for (n, (file, back_to, case)) in sources.iter().enumerate() {
        let dir = tmp.path().join(format!("c{n}"));
        std::fs::create_dir_all(dir.join("back")).unwrap();
        std::fs::create_dir_all(dir.join("plain")).unwrap();
        let comfy = dir.join("comfy.safetensors");
        let s = convert(
            file,
            &comfy,
            &ConvertOptions::default()
                .target(Target::parse("comfy:int8_tensorwise:per_row").unwrap()),
        )
        .unwrap();
        let plan = s.plan.as_ref().unwrap();
        let carried = plan
            .layers
            .iter()
            .filter(|l| {
                l.passes
                    .iter()
                    .any(|p| matches!(p, ckptkit::migrate::Pass::Relayout { .. }))
            })
            .count();
        assert!(carried >= 3, "{}: {carried} layers carried", file.display());
        assert!(s.lossless(), "{}", file.display());
        // back: the library's own bytes
        let back = dir.join("back").join("back.safetensors");
        convert(
            &comfy,
            &back,
            &ConvertOptions::default().target(Target::parse(back_to).unwrap()),
        )
        .unwrap();
        assert_eq!(tensors(&back), tensors(file), "{}", file.display());
        // ComfyUI's dequantization of the carried codes = the source library's
        let gold = tensors(&case.join("dequantized.safetensors"));
        let plain = dir.join("plain").join("plain.safetensors");
        convert(
            &comfy,
            &plain,
            &opts("plain", Vec::new()).shapes_from(Some(case.join("float.safetensors"))),
        )
        .unwrap();
        let ours = tensors(&plain);
        for (k, g) in &gold {
            assert_eq!(&ours[k], g, "{}: {k}", file.display());
        }
    }
}

/// ComfyUI ConvRot layers (tests/fixtures/comfy-convrot, made by
/// comfy-kitchen 0.2.40) dequantize bit for bit as the library's f32
/// product does on the pinned torch (group sizes 16, 64, 256; BF16, F16,
/// F32); a group size that is not a power of 4 is refused, naming the layer.
#[test]
fn convrot_files_dequantize_as_comfy_kitchen_does() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<PathBuf> = common::fixture_cases("comfy-convrot", 5)
        .into_iter()
        .filter(|d| !d.ends_with("bad-groupsize"))
        .collect();
    assert_eq!(cases.len(), 4);
    for dir in cases {
        let out = tmp.path().join("plain.safetensors");
        std::fs::remove_file(&out).ok();
        convert(
            &dir.join("quantized.safetensors"),
            &out,
            &opts("plain", Vec::new()),
        )
        .unwrap();
        assert_eq!(
            tensors(&out),
            tensors(&dir.join("dequantized.safetensors")),
            "{}",
            dir.display()
        );
    }
    let bad = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/comfy-convrot/bad-groupsize/quantized.safetensors");
    let out = tmp.path().join("bad.safetensors");
    let e = convert(&bad, &out, &opts("plain", Vec::new())).unwrap_err();
    assert_eq!(e.location().layer.as_deref(), Some("lin_a"), "{e}");
    assert!(e.to_string().contains("not a power of 4"), "{e}");
    assert!(!out.exists());
}

/// The block-scaled layouts' fixtures, made by comfy-kitchen 0.2.40: the
/// library's file read with the logical shapes `--shapes-from` gives is
/// bit for bit the library's dequantization; quantizing the float model
/// with `--to <target>` is the library's file byte for byte; and that file
/// (which records its logical shapes in ckptkit.schema) reads back without
/// `--shapes-from` to the same dequantization.
fn padded_fixtures_match_comfy_kitchen(fixtures: &str, target: &str) {
    let tmp = tempfile::tempdir().unwrap();
    for dir in common::fixture_cases(fixtures, 3) {
        let (float, lib) = (
            dir.join("float.safetensors"),
            dir.join("quantized.safetensors"),
        );
        let want = tensors(&dir.join("dequantized.safetensors"));
        let run = |input: &Path, name: &str, o: ConvertOptions| {
            let out = tmp.path().join(name);
            std::fs::remove_file(&out).ok();
            convert(input, &out, &o).unwrap();
            tensors(&out)
        };
        let shaped = opts("plain", Vec::new()).shapes_from(float.clone());
        assert_eq!(
            run(&lib, "p.safetensors", shaped),
            want,
            "{}",
            dir.display()
        );
        let q = tmp.path().join("q.safetensors");
        assert_eq!(
            run(&float, "q.safetensors", opts(target, Vec::new())),
            tensors(&lib),
            "{}",
            dir.display()
        );
        let back = run(&q, "back.safetensors", opts("plain", Vec::new()));
        assert_eq!(back, want, "{}", dir.display());
    }
}

/// MXFP8 (tests/fixtures/comfy-mxfp8): the swizzled E8M0 scales
/// unswizzled, byte 0 read as 0.0 as the library does, the padded codes
/// cropped.
#[test]
fn mxfp8_files_dequantize_as_comfy_kitchen_does() {
    padded_fixtures_match_comfy_kitchen("comfy-mxfp8", "comfy:mxfp8");
}

/// NVFP4 (tests/fixtures/comfy-nvfp4): E2M1 codes unpacked high nibble
/// first, the swizzled E4M3 block scales and `weight_scale_2` applied with
/// the library's roundings (-0.0 codes included), cropped.
#[test]
fn nvfp4_files_dequantize_and_quantize_as_comfy_kitchen_does() {
    padded_fixtures_match_comfy_kitchen("comfy-nvfp4", "comfy:nvfp4");
}

/// ComfyUI's legacy scaled-FP8 form written by convert-to-quant 1.3.4's
/// simple per-tensor path (tests/fixtures/comfy-legacy; its legacy writer
/// switched back on, see the README there): `--to fp8:legacy` gives the
/// library's file byte for byte (the `scaled_fp8` marker, codes,
/// `scale_weight`), except the biases, which the library bias-corrects
/// with random calibration data and ckptkit keeps as they are. The output
/// reads back as legacy, re-lays out to `comfy_quant` with its codes
/// untouched, and is kept as it is under `fp8:legacy`.
#[test]
fn fp8_legacy_writes_convert_to_quants_file() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in common::fixture_cases("comfy-legacy", 3) {
        let float = dir.join("float.safetensors");
        let q = tmp.path().join("legacy.safetensors");
        std::fs::remove_file(&q).ok();
        convert(&float, &q, &opts("fp8:legacy", Vec::new())).unwrap();
        let (ours, lib, fl) = (
            tensors(&q),
            tensors(&dir.join("quantized.safetensors")),
            tensors(&float),
        );
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            lib.keys().collect::<Vec<_>>(),
            "{}",
            dir.display()
        );
        for (k, v) in &ours {
            let want = if k.ends_with(".bias") {
                &fl[k]
            } else {
                &lib[k]
            };
            assert_eq!(v, want, "{}: {k}", dir.display());
        }
        assert_eq!(
            ours["scaled_fp8"],
            (ckptkit::Dtype::F8E4M3, vec![2], vec![0, 0])
        );
        // read back: the legacy form with a full-precision marker
        let r = ckptkit::migrate::inspect(&q, &ConvertOptions::default()).unwrap();
        let lin = r.layers.iter().find(|l| l.path == "lin_a").unwrap();
        assert_eq!(lin.layout, "comfy:float8_e4m3fn (legacy scaled_fp8)");
        // to comfy_quant: the same codes and scale under the current names
        let cur = tmp.path().join("current.safetensors");
        std::fs::remove_file(&cur).ok();
        convert(&q, &cur, &opts("comfy:float8_e4m3fn", Vec::new())).unwrap();
        let c = tensors(&cur);
        assert_eq!(c["lin_a.weight"], ours["lin_a.weight"]);
        assert_eq!(c["lin_a.weight_scale"], ours["lin_a.scale_weight"]);
        assert!(!c.contains_key("scaled_fp8"));
        // and back to the legacy form: the same file's tensors
        let again = tmp.path().join("again.safetensors");
        std::fs::remove_file(&again).ok();
        convert(&cur, &again, &opts("fp8:legacy", Vec::new())).unwrap();
        assert_eq!(tensors(&again), ours, "{}", dir.display());
        let e = convert(
            &q,
            &tmp.path().join("x.safetensors"),
            &opts("fp8:legacy", Vec::new()),
        )
        .unwrap_err();
        assert!(
            matches!(e.kind(), ckptkit::ErrorKind::NothingChanged(_)),
            "{e}"
        );
    }
}

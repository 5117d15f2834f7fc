//! Block FP8 (DeepSeek-V3 style, transformers' fine-grained FP8) against
//! files the real transformers 5.24.0 wrote (tests/fixtures/fp8block, see
//! its README): quantizing is byte-identical (ragged edge blocks: the
//! library's quantizer on the zero-padded weight), dequantizing is
//! bit-identical to DeepSeek's formula on every shape, `--like`, containers
//! and directory outputs carry the layout and its config, and damaged
//! scales are refused naming the layer.

mod common;

use std::path::PathBuf;

use ckptkit::migrate::{convert, like_target, ConvertOptions, PlanOptions, Target};
use ckptkit::ErrorKind;

fn cases() -> Vec<PathBuf> {
    common::fixture_cases("fp8block", 4)
}

use common::{
    case_json, fixture_with_tensor as damaged, stored_tensors as tensors, strings, Stored,
};

fn opts(to: &str, exclude: Vec<String>) -> ConvertOptions {
    ConvertOptions::default()
        .target(Target::parse(to).unwrap())
        .select(PlanOptions::default().exclude(exclude))
}

/// `--to fp8:block[:ue8m0]` gives transformers' own codes and scales,
/// tensor for tensor, on every fixture, ragged weights included; the
/// excluded layer is copied.
#[test]
fn quantizing_float_weights_matches_transformers_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ragged = 0;
    for dir in cases() {
        let case = case_json(&dir);
        let to = case["ckptkit_target"].as_str().unwrap();
        let out = tmp
            .path()
            .join(format!("{}.safetensors", case["name"].as_str().unwrap()));
        convert(
            &dir.join("float.safetensors"),
            &out,
            &opts(to, strings(&case["exclude"])),
        )
        .unwrap();
        let (ours, theirs) = (tensors(&out), tensors(&dir.join("model.safetensors")));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{}",
            dir.display()
        );
        for (k, t) in &ours {
            assert_eq!(t, &theirs[k], "{}: {k}", dir.display());
        }
        ragged += strings(&case["ragged_modules"]).len();
    }
    assert!(ragged >= 8, "{ragged} ragged weights compared");
}

/// `--to plain` of the library's files equals DeepSeek's dequantization
/// (transformers' on the aligned weights), bit for bit, in the model's
/// dtype; no scale is left.
#[test]
fn block_fp8_files_dequantize_exactly_as_deepseek_does() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in cases() {
        let out = tmp.path().join("plain.safetensors");
        std::fs::remove_file(&out).ok();
        convert(&dir.join("model.safetensors"), &out, &opts("plain", vec![])).unwrap();
        assert_eq!(
            tensors(&out),
            tensors(&dir.join("dequantized.safetensors")),
            "{}",
            dir.display()
        );
    }
}

/// A directory output gets the `quantization_config` transformers reads
/// (block, E8M0 scales, the layers left in float); converting it to plain
/// removes it. `check` against the library's file prints a fix (`--like`)
/// that makes its bytes; a container keeps the layout; kept, the file is
/// copied byte for byte.
#[test]
fn directories_like_and_containers_carry_the_layout() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in cases() {
        let case = case_json(&dir);
        let to = case["ckptkit_target"].as_str().unwrap();
        let name = case["name"].as_str().unwrap();
        let q = dir.join("model.safetensors");
        // a model directory: config.json follows the layout
        let out = tmp.path().join(name);
        convert(
            &dir.join("float.safetensors"),
            &out,
            &opts(to, strings(&case["exclude"])),
        )
        .unwrap();
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let qc = &cfg["quantization_config"];
        assert_eq!(qc["quant_method"], "fp8", "{name}: {cfg}");
        assert_eq!(qc["weight_block_size"], serde_json::json!([128, 128]));
        assert_eq!(
            qc["modules_to_not_convert"],
            serde_json::json!(["lin_skip"])
        );
        let ue8m0 = case["scale_fmt"] == "ue8m0";
        assert_eq!(qc.get("scale_fmt").is_some(), ue8m0, "{name}: {qc}");
        let plain = tmp.path().join(format!("{name}-plain"));
        convert(&out, &plain, &opts("plain", vec![])).unwrap();
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(plain.join("config.json")).unwrap())
                .unwrap();
        assert!(cfg.get("quantization_config").is_none(), "{name}: {cfg}");
        // check and its fix
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
        let like = tmp.path().join(format!("{name}-like.safetensors"));
        convert(
            &dir.join("float.safetensors"),
            &like,
            &ConvertOptions::default().target(like_target(&q).unwrap()),
        )
        .unwrap();
        assert_eq!(tensors(&like), tensors(&q), "{name}");
        // through a container and back, and kept
        let ck = tmp.path().join(format!("{name}.ckpk"));
        let back = tmp.path().join(format!("{name}-back.safetensors"));
        convert(&q, &ck, &ConvertOptions::default()).unwrap();
        assert_eq!(
            ckptkit::Container::open(&ck)
                .unwrap()
                .manifest()
                .version
                .major,
            2
        );
        convert(&ck, &back, &ConvertOptions::default()).unwrap();
        assert_eq!(tensors(&back), tensors(&q), "{name}");
        // to its own layout: nothing to do, and nothing written
        let kept = tmp.path().join(format!("{name}-kept.safetensors"));
        let e = convert(&q, &kept, &opts(to, vec![])).unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::NothingChanged(_)),
            "{name}: {e}"
        );
        assert!(!kept.exists());
    }
}

/// Each damage is refused before anything is written, naming the layer:
/// scales that do not cover the weight, a zero, NaN or infinite scale (the
/// block named too), an E8M0 NaN byte, and FP8 codes whose scale is
/// missing in a model whose config says fp8 (never cast as plain).
#[test]
fn damaged_scales_are_refused_naming_the_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = cases()
        .into_iter()
        .find(|d| d.ends_with("fp8block-bf16-f32scale"))
        .unwrap();
    let key = "lin_ragged.weight_scale_inv";
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let good = tensors(&dir.join("model.safetensors"))[key].clone();
    let with = |i: usize, v: f32| {
        let mut b = good.2.clone();
        b[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        (good.0, good.1.clone(), b)
    };
    use ckptkit::Dtype::*;
    let cases: Vec<(&str, Option<Stored>, &str)> = vec![
        (
            "grid",
            Some((F32, vec![2, 1], f32s(&[1.0, 1.0]))),
            "do not cover",
        ),
        (
            "flat",
            Some((F32, vec![4], f32s(&[1.0; 4]))),
            "do not cover",
        ),
        (
            "dtype",
            Some((BF16, vec![2, 2], [0x80, 0x3f].repeat(4))),
            "do not cover",
        ),
        ("zero", Some(with(3, 0.0)), "block (1, 1)"),
        ("nan", Some(with(1, f32::NAN)), "block (0, 1)"),
        ("inf", Some(with(2, f32::INFINITY)), "block (1, 0)"),
        (
            "e8m0-nan",
            Some((F8E8M0, vec![2, 2], vec![127, 255, 127, 127])),
            "block (0, 1)",
        ),
        ("missing", None, "quant_method: fp8"),
    ];
    for (name, new, why) in cases {
        let p = damaged(&dir, &tmp.path().join(name), key, new);
        let out = tmp.path().join(format!("{name}-out.safetensors"));
        let e = convert(&p, &out, &opts("plain", vec![])).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(why), "{name}: {msg}");
        if name == "missing" {
            assert!(
                matches!(e.kind(), ErrorKind::UnknownQuantized(_)),
                "{name}: {e:?}"
            );
            assert!(msg.contains("lin_ragged"), "{name}: {msg}");
        } else {
            assert_eq!(
                e.location().layer.as_deref(),
                Some("lin_ragged"),
                "{name}: {e}"
            );
        }
        assert!(!out.exists(), "{name}: nothing is written");
    }
}

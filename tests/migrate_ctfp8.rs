//! compressed-tensors FP8 (tensor, channel, group and block strategies)
//! against files the real compressed-tensors 0.20.0 wrote
//! (tests/fixtures/ctfp8, see its README): quantizing is byte-identical,
//! dequantizing is bit-identical, directory outputs carry the library's
//! config, and damaged scales are refused naming the layer.

mod common;

use std::path::{Path, PathBuf};

use ckptkit::migrate::{convert, like_target, ConvertOptions, PlanOptions, Target};

fn cases() -> Vec<PathBuf> {
    common::fixture_cases("ctfp8", 6)
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

use common::{fixture_with_tensor as damaged, stored_tensors as tensors, Stored};

fn opts(to: &str, exclude: Vec<String>) -> ConvertOptions {
    ConvertOptions::default()
        .target(Target::parse(to).unwrap())
        .select(PlanOptions::default().exclude(exclude))
}

/// `--to fp8:ct:STRATEGY` gives compressed-tensors' own codes and scales,
/// tensor for tensor, on every fixture; the excluded layer is copied.
#[test]
fn quantizing_float_weights_matches_compressed_tensors_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let mut compared = 0;
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
        compared += 1;
    }
    assert!(compared >= 6);
}

/// `--to plain` of the library's files equals its own decompression, bit
/// for bit, in the model's dtype; no scale is left.
#[test]
fn ct_fp8_files_dequantize_exactly_as_compressed_tensors_does() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in cases() {
        let out = tmp.path().join("plain.safetensors");
        std::fs::remove_file(&out).ok();
        convert(&dir.join("model.safetensors"), &out, &opts("plain", vec![])).unwrap();
        let (ours, gold) = (tensors(&out), tensors(&dir.join("dequantized.safetensors")));
        let float = tensors(&dir.join("float.safetensors"));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            float.keys().collect::<Vec<_>>(),
            "{}: a plain model's key set",
            dir.display()
        );
        assert!(gold.len() >= 3, "{}", dir.display());
        for (k, t) in &ours {
            assert_eq!(
                t,
                gold.get(k).unwrap_or(&float[k]),
                "{}: {k}",
                dir.display()
            );
        }
    }
}

/// A directory output gets exactly the `quantization_config`
/// compressed-tensors writes for that scheme, and converting it to plain
/// removes it. `check` against the library's file prints a fix (`--like`)
/// that makes its bytes; a container keeps the layout.
#[test]
fn directories_like_and_containers_carry_the_layout() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in cases() {
        let case = case_json(&dir);
        let to = case["ckptkit_target"].as_str().unwrap();
        let name = case["name"].as_str().unwrap();
        let q = dir.join("model.safetensors");
        let out = tmp.path().join(name);
        convert(
            &dir.join("float.safetensors"),
            &out,
            &opts(to, strings(&case["exclude"])),
        )
        .unwrap();
        let read = |p: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap()
        };
        assert_eq!(
            read(&out)["quantization_config"],
            read(&dir)["quantization_config"],
            "{name}"
        );
        let plain = tmp.path().join(format!("{name}-plain"));
        convert(&out, &plain, &opts("plain", vec![])).unwrap();
        assert!(read(&plain).get("quantization_config").is_none(), "{name}");
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
        let ck = tmp.path().join(format!("{name}.ckpk"));
        let back = tmp.path().join(format!("{name}-back.safetensors"));
        convert(&q, &ck, &ConvertOptions::default()).unwrap();
        convert(&ck, &back, &ConvertOptions::default()).unwrap();
        assert_eq!(tensors(&back), tensors(&q), "{name}");
    }
}

/// Each damage is refused before anything is written, naming the layer:
/// scales that do not cover the weight (another strategy's shape, a group
/// that does not divide the row), a zero, negative, NaN or infinite scale
/// (the block named too).
#[test]
fn damaged_scales_are_refused_naming_the_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = cases()
        .into_iter()
        .find(|d| d.ends_with("ctfp8-bf16-channel"))
        .unwrap();
    let model = tensors(&dir.join("model.safetensors"));
    let (key, good) = model
        .iter()
        .find(|(k, v)| k.ends_with(".weight_scale") && v.1[0] >= 4)
        .map(|(k, v)| (k.clone(), v.clone()))
        .unwrap();
    let layer = key.trim_end_matches(".weight_scale").to_string();
    let bf16 = |v: f32| ((v.to_bits() >> 16) as u16).to_le_bytes();
    let with = |i: usize, v: f32| {
        let mut b = good.2.clone();
        b[i * 2..i * 2 + 2].copy_from_slice(&bf16(v));
        (good.0, good.1.clone(), b)
    };
    use ckptkit::Dtype::*;
    let o = good.1[0];
    let cases: Vec<(&str, Stored, &str)> = vec![
        (
            "tensor-shape",
            (BF16, vec![1], bf16(1.0).to_vec()),
            "do not cover",
        ),
        ("flat", (BF16, vec![o], good.2.clone()), "do not cover"),
        (
            "dtype",
            (F8E4M3, vec![o, 1], vec![0x38; o as usize]),
            "do not cover",
        ),
        ("zero", with(2, 0.0), "block (2, 0)"),
        ("negative", with(1, -0.5), "block (1, 0)"),
        ("nan", with(3, f32::NAN), "block (3, 0)"),
        ("inf", with(0, f32::INFINITY), "block (0, 0)"),
    ];
    for (name, new, why) in cases {
        let p = damaged(&dir, &tmp.path().join(name), &key, Some(new));
        let out = tmp.path().join(format!("{name}-out.safetensors"));
        let e = convert(&p, &out, &opts("plain", vec![])).unwrap_err();
        assert!(e.to_string().contains(why), "{name}: {e}");
        assert_eq!(
            e.location().layer.as_deref(),
            Some(layer.as_str()),
            "{name}: {e}"
        );
        assert!(!out.exists(), "{name}: nothing is written");
    }
}

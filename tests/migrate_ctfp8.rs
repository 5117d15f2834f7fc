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

use common::{
    case_json, fixture_with_tensor as damaged, stored_tensors as tensors, strings, Stored,
};

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

fn fixture(family: &str, name: &str) -> PathBuf {
    common::fixture_cases(family, 1)
        .into_iter()
        .find(|d| d.ends_with(name))
        .unwrap()
}

/// The passes of a conversion's plan, for its first quantized layer.
fn passes_of(s: &ckptkit::migrate::Summary) -> String {
    let p = s.plan.as_ref().unwrap();
    let lp = p
        .layers
        .iter()
        .find(|l| l.passes.len() == 1 && l.from != l.to)
        .unwrap();
    format!("{:?}", lp.passes)
}

/// FP8 codes carry over untouched between layouts of the same scale
/// sharing (spec/layouts.md §7.3): ComfyUI's per-tensor float8 <->
/// compressed-tensors `tensor`, DeepSeek's 128 x 128 blocks <->
/// compressed-tensors `block=128x128`. Into the wider scale dtype it is
/// lossless and converting back gives the library's own file byte for
/// byte; into a narrower one (an F32 scale into a BF16 model's) it is
/// refused unless `--allow-lossy`, and then the codes are still the same
/// bytes.
#[test]
fn fp8_codes_carry_between_comfy_deepseek_and_compressed_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &Path| tensors(p);
    // compressed-tensors -> ComfyUI -> compressed-tensors (BF16 scales widen to F32)
    for (ct, comfy_to, ct_to) in [
        ("ctfp8-bf16-tensor", "comfy:float8_e4m3fn", "fp8:ct:tensor"),
        ("ctfp8-f32-tensor", "comfy:float8_e4m3fn", "fp8:ct:tensor"),
        ("ctfp8-bf16-block", "fp8:block", "fp8:ct:block=128x128"),
    ] {
        let dir = fixture("ctfp8", ct);
        let model = dir.join("model.safetensors");
        let mid = tmp.path().join(format!("{ct}-mid.safetensors"));
        let s = convert(&model, &mid, &opts(comfy_to, vec![])).unwrap();
        assert!(
            passes_of(&s).contains("Relayout"),
            "{ct}: {}",
            passes_of(&s)
        );
        assert!(s.losses.is_empty(), "{ct}");
        let (a, b) = (t(&model), t(&mid));
        for (k, v) in &a {
            if k.ends_with(".weight") && v.0 == ckptkit::Dtype::F8E4M3 {
                assert_eq!(b[k], *v, "{ct}: {k}: the codes are the same bytes");
            }
        }
        let back = tmp.path().join(format!("{ct}-back.safetensors"));
        convert(&mid, &back, &opts(ct_to, vec![])).unwrap();
        let back = t(&back);
        for (k, v) in &a {
            assert_eq!(back.get(k), Some(v), "{ct}: {k}");
        }
    }
    // DeepSeek's F32 scales into a BF16 model's compressed-tensors blocks:
    // they rarely survive BF16, so lossy
    let dir = fixture("fp8block", "fp8block-bf16-f32scale");
    let model = dir.join("model.safetensors");
    let out = tmp.path().join("ds-ct.safetensors");
    let e = convert(&model, &out, &opts("fp8:ct:block=128x128", vec![])).unwrap_err();
    assert!(
        matches!(e.kind(), ckptkit::ErrorKind::LossyRelayout { .. }),
        "{e}"
    );
    assert!(!out.exists());
    let s = convert(
        &model,
        &out,
        &ConvertOptions::default()
            .target(Target::parse("fp8:ct:block=128x128").unwrap())
            .select(PlanOptions::default().allow_lossy(true)),
    )
    .unwrap();
    assert!(!s.losses.is_empty());
    let (a, b) = (t(&model), t(&out));
    for (k, v) in &a {
        if k.ends_with(".weight") && v.0 == ckptkit::Dtype::F8E4M3 {
            assert_eq!(b[k], *v, "{k}: the codes are the same bytes");
        }
    }
}

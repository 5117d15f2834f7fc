//! The block FP8 family through the library: the arithmetic against its
//! element-by-element statement, detection rule by rule, and every bad
//! scale refused naming the layer. (Bit-identity with transformers itself:
//! tests/migrate_fp8block.rs, on its files.)

use std::collections::BTreeMap;
use std::path::Path;

use super::*;
use crate::error::ErrorKind;
use crate::float::{bf16_bits_from_f32, f32_from_bf16_bits, round_bf16, Fp8Kind};
use crate::io::open::open_source;
use crate::io::writer::SafetensorsWriter;
use crate::layout::family::{quantized_weight, Hints};
use crate::migrate::plan::Target;
use crate::migrate::{convert, detect_layers, ConvertOptions};

type Tensors = Vec<(String, Dtype, Vec<u64>, Vec<u8>)>;

fn write(path: &Path, tensors: &Tensors) {
    let plan: Vec<_> = tensors
        .iter()
        .map(|(k, d, s, _)| (k.clone(), *d, s.clone()))
        .collect();
    std::fs::remove_file(path).ok();
    let w = SafetensorsWriter::create(path, &plan, &BTreeMap::new(), false, false).unwrap();
    for (k, _, _, b) in tensors {
        w.write_tensor(k, b).unwrap();
    }
    w.finish().unwrap();
}

fn bf16(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| bf16_bits_from_f32(x).to_le_bytes())
        .collect()
}

/// Deterministic weights spanning many binades, rounded to BF16.
fn weights(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let m = ((i * 37 % 101) as f32 - 50.0) / 23.0;
            round_bf16(m * 2f32.powi((i % 19) as i32 - 12))
        })
        .collect()
}

/// The statement: per block, `k = (1 / amax) · 448` in f32, two roundings
/// (1 if zero), `inv = 1/k`
/// (ue8m0: `2^ceil(log2(max(inv, tiny)))`, `k = 1/inv`), `q =
/// e4m3(clamp(x · k, ±448))`, element by element.
fn statement(
    x: &[f32],
    [n, k]: [usize; 2],
    [bh, bw]: [usize; 2],
    ue8m0: bool,
) -> (Vec<u8>, Vec<f32>) {
    let (gr, gc) = (n.div_ceil(bh), k.div_ceil(bw));
    let mut q = vec![0u8; n * k];
    let mut invs = Vec::new();
    for r in 0..gr {
        for c in 0..gc {
            let idx = || {
                (r * bh..((r + 1) * bh).min(n))
                    .flat_map(move |i| (c * bw..((c + 1) * bw).min(k)).map(move |j| i * k + j))
            };
            let amax = idx().map(|i| x[i].abs()).fold(0f32, f32::max);
            let mut kk = if amax > 0.0 {
                (1.0 / amax) * 448.0
            } else {
                1.0
            };
            let mut inv = 1.0 / kk;
            if ue8m0 {
                inv = 2f32.powi(ceil_exact_log2(inv.max(f32::MIN_POSITIVE)));
                kk = 1.0 / inv;
            }
            invs.push(inv);
            for i in idx() {
                q[i] = Fp8Kind::E4M3Fn.encode((x[i] * kk).clamp(-448.0, 448.0));
            }
        }
    }
    (q, invs)
}

/// `ceil(log2(v))` by the exponent, for the values where the f32 log
/// cannot round across an integer (tested below where it can).
fn ceil_exact_log2(v: f32) -> i32 {
    let e = v.log2().floor() as i32;
    if 2f32.powi(e) == v {
        e
    } else {
        e + 1
    }
}

#[test]
fn quantizing_is_the_element_by_element_statement_ragged_edges_included() {
    for (shape, block) in [
        ([300usize, 200usize], [128usize, 128usize]),
        ([130, 136], [128, 128]),
        ([5, 37], [128, 128]),
        ([64, 48], [16, 32]),
    ] {
        let n = shape[0] * shape[1];
        let x = weights(n);
        for ue8m0 in [false, true] {
            let (q, s) = math::quantize(Dtype::BF16, &bf16(&x), shape, block, ue8m0).unwrap();
            let (eq, es) = statement(&x, shape, block, ue8m0);
            assert_eq!(q, eq, "{shape:?} {block:?} ue8m0={ue8m0}");
            let stored: Vec<f32> = if ue8m0 {
                s.iter().map(|&b| math::e8m0_value(b)).collect()
            } else {
                s.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            };
            assert_eq!(stored, es, "{shape:?} ue8m0={ue8m0}");
            // and dequantizing is f32(q) · s rounded once, per block
            let back = math::dequantize(&q, shape, block, &stored, Dtype::BF16).unwrap();
            for (i, w) in back.chunks_exact(2).enumerate() {
                let (r, c) = (i / shape[1], i % shape[1]);
                let sc = stored[(r / block[0]) * shape[1].div_ceil(block[1]) + c / block[1]];
                let want = bf16_bits_from_f32(Fp8Kind::E4M3Fn.decode(q[i]) * sc);
                assert_eq!(u16::from_le_bytes([w[0], w[1]]), want, "element {i}");
            }
        }
    }
}

#[test]
fn a_zero_block_gets_scale_one_and_zero_codes() {
    let mut x = weights(256 * 128);
    x[..128 * 128].iter_mut().for_each(|v| *v = 0.0);
    let (q, s) = math::quantize(Dtype::BF16, &bf16(&x), [256, 128], [128, 128], false).unwrap();
    assert_eq!(f32::from_le_bytes(s[..4].try_into().unwrap()), 1.0);
    assert!(q[..128 * 128].iter().all(|&c| c == 0));
    assert_ne!(f32::from_le_bytes(s[4..8].try_into().unwrap()), 1.0);
}

#[test]
fn e8m0_bytes_decode_as_torch_does() {
    assert_eq!(math::e8m0_value(127), 1.0);
    assert_eq!(math::e8m0_value(1), f32::MIN_POSITIVE);
    assert_eq!(math::e8m0_value(0), 2f32.powi(-127));
    assert!(math::e8m0_value(0) > 0.0);
    assert_eq!(math::e8m0_value(254), 2f32.powi(127));
    assert!(math::e8m0_value(255).is_nan());
}

#[test]
fn the_ue8m0_scale_rounds_up_to_a_power_of_two_and_never_below_the_smallest_normal() {
    // amax 448 → inv 1 exactly
    assert_eq!(math::block_scale(448.0, true).unwrap(), (1.0, 1.0));
    // amax just above 448 → inv just above 1 → 2
    let (k, inv) = math::block_scale(448.0 * (1.0 + 2f32.powi(-20)), true).unwrap();
    assert_eq!((k, inv), (0.5, 2.0));
    // a tiny block: inv is clamped to 2^-126
    let (k, inv) = math::block_scale(1e-40, true).unwrap();
    assert_eq!((k, inv), (2f32.powi(126), f32::MIN_POSITIVE));
    // an all-zero block: inv 1
    assert_eq!(math::block_scale(0.0, true).unwrap(), (1.0, 1.0));
    // the f32 logarithm of a value a few ulps above 2^-100 rounds to -100
    let v = f32::from_bits(2f32.powi(-100).to_bits() + 3);
    assert_eq!(math::ceil_log2(v), -100);
    assert_eq!(math::ceil_log2(f32::from_bits(1f32.to_bits() + 1)), 1);
}

#[test]
fn a_block_whose_scale_overflows_is_refused_naming_it() {
    let mut x = vec![0f32; 4 * 4];
    x[5] = 1e-38; // below 448 / f32::MAX
    let b: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let e = math::quantize(Dtype::F32, &b, [4, 4], [2, 2], false).unwrap_err();
    assert!(e.to_string().contains("block (0, 0)"), "{e}");
    assert!(e.to_string().contains("overflows"), "{e}");
    // ue8m0 has no such limit
    assert!(math::quantize(Dtype::F32, &b, [4, 4], [2, 2], true).is_ok());
    // NaN and infinity are refused, naming the block
    for bad in [f32::NAN, f32::INFINITY] {
        let mut y = x.clone();
        y[15] = bad;
        let b: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
        let e = math::quantize(Dtype::F32, &b, [4, 4], [2, 2], true).unwrap_err();
        assert!(e.to_string().contains("block (1, 1)"), "{e}");
    }
}

#[test]
fn zero_negative_nan_and_infinite_scales_are_refused_naming_the_block() {
    for bad in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        let s: Vec<u8> = [1.0f32, 2.0, 3.0, bad]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let e = math::scales(Dtype::F32, &s, 2).unwrap_err();
        assert!(e.to_string().contains("block (1, 1)"), "{bad}: {e}");
    }
    let e = math::scales(Dtype::F8E8M0, &[127, 255], 2).unwrap_err();
    assert!(e.to_string().contains("block (0, 1)"), "{e}");
    assert!(math::scales(Dtype::BF16, &[0, 0], 1).is_err());
}

/// A DeepSeek-style file: `lin` [200, 136] quantized (grid 2 x 2), `norm`
/// plain, and `lin.bias` in BF16.
fn block_file(scale: (Dtype, Vec<u64>), codes: bool) -> Tensors {
    let (n, k) = (200usize, 136usize);
    let x = weights(n * k);
    let (q, s) = math::quantize(Dtype::BF16, &bf16(&x), [n, k], [128, 128], false).unwrap();
    let mut t: Tensors = vec![];
    if codes {
        t.push((
            "lin.weight".into(),
            Dtype::F8E4M3,
            vec![n as u64, k as u64],
            q,
        ));
    }
    let bytes = match scale.0 {
        Dtype::F32 if scale.1 == [2, 2] => s,
        d => vec![0x7Fu8; d.size() * scale.1.iter().product::<u64>() as usize],
    };
    t.push(("lin.weight_scale_inv".into(), scale.0, scale.1, bytes));
    t.push((
        "lin.bias".into(),
        Dtype::BF16,
        vec![n as u64],
        bf16(&weights(n)),
    ));
    t.push(("norm.weight".into(), Dtype::F32, vec![16], vec![0; 64]));
    t
}

fn layers_of(
    path: &Path,
    config: Option<Fp8Config>,
) -> crate::Result<Vec<crate::format::manifest::Layer>> {
    let src = open_source(path)?;
    let hints = match config {
        Some(c) => Hints::default().with_side(NAME, c),
        None => Hints::default(),
    };
    detect_layers(src.as_ref(), &hints)
}

#[test]
fn codes_beside_a_scale_grid_make_a_block_fp8_layer() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("m.safetensors");
    write(&f, &block_file((Dtype::F32, vec![2, 2]), true));
    let layers = layers_of(&f, None).unwrap();
    let lin = layers.iter().find(|l| l.path == "lin").unwrap();
    let want = Format {
        block: BLOCK,
        ue8m0: false,
    };
    assert_eq!(lin.quant.weights, want.record());
    let w = quantized_weight(lin).unwrap();
    // the model dtype is the bias's
    assert_eq!((w.dtype, &w.shape[..]), (Dtype::BF16, &[200u64, 136][..]));
    crate::layout::check_layer(lin).unwrap();
    // E8M0 scales make the ue8m0 form
    write(&f, &block_file((Dtype::F8E8M0, vec![2, 2]), true));
    let layers = layers_of(&f, None).unwrap();
    assert_eq!(
        layers[0].quant.weights,
        Format {
            block: BLOCK,
            ue8m0: true
        }
        .record()
    );
    // a config's block size is the one checked: 64 x 64 makes a 4 x 3 grid
    write(&f, &block_file((Dtype::F32, vec![4, 3]), true));
    let cfg = Fp8Config {
        block: Some([64, 64]),
        dtype: None,
    };
    let layers = layers_of(&f, Some(cfg)).unwrap();
    assert_eq!(
        Format::of(&layers[0].quant.weights).unwrap().block,
        [64, 64]
    );
}

#[test]
fn scales_that_do_not_cover_the_weight_are_refused_naming_the_layer() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("m.safetensors");
    for scale in [
        (Dtype::F32, vec![2, 1]),  // too few blocks
        (Dtype::F32, vec![3, 2]),  // transformers' rows // scale_rows reading
        (Dtype::F32, vec![4]),     // flat
        (Dtype::BF16, vec![2, 2]), // not F32 or E8M0
    ] {
        write(&f, &block_file(scale.clone(), true));
        let e = layers_of(&f, None).unwrap_err();
        assert_eq!(e.location().layer.as_deref(), Some("lin"), "{scale:?}: {e}");
        assert!(
            matches!(e.kind(), ErrorKind::Layout(m) if m.contains("do not cover")),
            "{scale:?}: {e}"
        );
    }
    // a scale without its weight
    write(&f, &block_file((Dtype::F32, vec![2, 2]), false));
    let e = layers_of(&f, None).unwrap_err();
    assert!(e.to_string().contains("without the `weight`"), "{e}");
    // a per-tensor config is not read yet, and says so
    write(&f, &block_file((Dtype::F32, vec![2, 2]), true));
    let cfg = Fp8Config {
        block: None,
        dtype: None,
    };
    let e = layers_of(&f, Some(cfg)).unwrap_err();
    assert!(e.to_string().contains("weight_block_size: null"), "{e}");
}

#[test]
fn the_config_is_read_for_its_block_and_dtype_and_bad_ones_are_refused() {
    let c = |s: &str| Fp8Config::from_text(s);
    assert_eq!(c(r#"{"model_type": "x"}"#).unwrap(), None);
    assert_eq!(
        c(r#"{"quantization_config": {"quant_method": "compressed-tensors"}}"#).unwrap(),
        None
    );
    assert_eq!(
        c(r#"{"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "fp8"}}"#)
            .unwrap(),
        Some(Fp8Config {
            block: Some(BLOCK),
            dtype: Some(Dtype::BF16)
        })
    );
    assert_eq!(
        c(r#"{"dtype": "float16", "quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 32]}}"#)
            .unwrap(),
        Some(Fp8Config {
            block: Some([64, 32]),
            dtype: Some(Dtype::F16)
        })
    );
    for bad in ["[128]", "[0, 128]", "[128, 128, 1]", "\"128\"", "[1e9, 1]"] {
        let t = format!(
            r#"{{"quantization_config": {{"quant_method": "fp8", "weight_block_size": {bad}}}}}"#
        );
        assert!(c(&t).is_err(), "{bad}");
    }
}

#[test]
fn converting_to_block_fp8_and_back_is_the_arithmetic() {
    let d = tempfile::tempdir().unwrap();
    let plain = d.path().join("plain.safetensors");
    let (n, k) = (200usize, 136usize);
    let x = weights(n * k);
    write(
        &plain,
        &vec![
            (
                "lin.weight".into(),
                Dtype::BF16,
                vec![n as u64, k as u64],
                bf16(&x),
            ),
            (
                "lin.bias".into(),
                Dtype::BF16,
                vec![n as u64],
                bf16(&weights(n)),
            ),
        ],
    );
    for (to, ue8m0) in [("fp8:block", false), ("fp8:block:ue8m0", true)] {
        let q = d.path().join(format!("{ue8m0}.safetensors"));
        convert(
            &plain,
            &q,
            &ConvertOptions::default().target(Target::parse(to).unwrap()),
        )
        .unwrap();
        let src = open_source(&q).unwrap();
        let (eq, es) = statement(&x, [n, k], [128, 128], ue8m0);
        assert_eq!(src.read("lin.weight").unwrap().to_vec(), eq);
        let s = src.read("lin.weight_scale_inv").unwrap().to_vec();
        let got: Vec<f32> =
            math::scales(if ue8m0 { Dtype::F8E8M0 } else { Dtype::F32 }, &s, 2).unwrap();
        assert_eq!(got, es);
        let back = d.path().join(format!("{ue8m0}-plain.safetensors"));
        convert(
            &q,
            &back,
            &ConvertOptions::default().target(Target::parse("plain").unwrap()),
        )
        .unwrap();
        let b = open_source(&back).unwrap();
        let w = b.read("lin.weight").unwrap();
        assert_eq!(b.tensors().len(), 2, "the scale is gone");
        for (i, c) in w.chunks_exact(2).enumerate() {
            let sc = es[(i / k / 128) * 2 + (i % k) / 128];
            let want = round_bf16(Fp8Kind::E4M3Fn.decode(eq[i]) * sc);
            assert_eq!(
                f32_from_bf16_bits(u16::from_le_bytes([c[0], c[1]])).to_bits(),
                want.to_bits()
            );
        }
    }
}

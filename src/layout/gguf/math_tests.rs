//! Tests of the gguf block math against gguf-py 0.19.0 (numpy 2.4.6, x86-64):
//! the fixtures in `tests/fixtures/gguf` and vectors produced by the same
//! library for the edge cases the fixtures do not reach.

use super::*;
use std::collections::BTreeSet;
use std::path::PathBuf;

fn ty(name: &str) -> GgmlType {
    GgmlType::from_name(name).unwrap_or_else(|| panic!("unknown type {name}"))
}

fn fixture(rel: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    assert_eq!(bytes.len() % 4, 0);
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn st_tensor(st: &safetensors::SafeTensors<'_>, name: &str) -> Vec<u8> {
    st.tensor(name)
        .unwrap_or_else(|e| panic!("tensor {name}: {e}"))
        .data()
        .to_vec()
}

/// Asserts bit equality, reporting the first difference and how many there are.
fn assert_bits(label: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    if let Some(&i) = bad.first() {
        panic!(
            "{label}: {} of {} elements differ; first at {i}: got {:#010x} ({}), want {:#010x} ({})",
            bad.len(),
            got.len(),
            got[i].to_bits(),
            got[i],
            want[i].to_bits(),
            want[i]
        );
    }
}

fn deq(t: &str, data: &[u8]) -> Vec<f32> {
    let t = ty(t);
    let n = data.len() / t.bytes as usize * t.block as usize;
    let mut out = vec![f32::from_bits(0x1234_5678); n];
    dequantize(t, data, &mut out).unwrap_or_else(|e| panic!("{e}"));
    out
}

fn quant(t: &str, x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    quantize(ty(t), x, &mut out).unwrap_or_else(|e| panic!("{e}"));
    out
}

fn unhex(s: &str) -> Vec<u8> {
    assert_eq!(s.len() % 2, 0);
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

/// Every tensor of `types-v3.gguf` (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
/// Q8_0 2-D and 3-D, Q2_K..Q6_K) dequantizes to gguf-py's F32 bit for bit. The
/// bytes are taken from the .gguf file at the offsets in types-v3.json and
/// checked against the `.raw` companions.
#[test]
fn types_v3_fixture_dequantizes_bit_exactly() {
    let json: serde_json::Value =
        serde_json::from_slice(&fixture("types-v3.json")).expect("types-v3.json");
    let gguf = fixture("types-v3.gguf");
    let st_bytes = fixture("types-v3.expected.safetensors");
    let st = safetensors::SafeTensors::deserialize(&st_bytes).expect("safetensors");
    let tensors = json["tensors"].as_array().expect("tensors");
    let mut types = BTreeSet::new();
    let mut raw_checked = BTreeSet::new();
    let mut specials = 0usize;
    for t in tensors {
        let name = t["name"].as_str().expect("name");
        let tname = t["ggml_type"].as_str().expect("ggml_type");
        let off = t["offset_abs"].as_u64().expect("offset_abs") as usize;
        let n = t["n_bytes"].as_u64().expect("n_bytes") as usize;
        let bytes = &gguf[off..off + n];
        if st.names().iter().any(|k| *k == format!("{name}.raw")) {
            assert_eq!(st_tensor(&st, &format!("{name}.raw")), bytes, "{name}.raw");
            raw_checked.insert(name.to_string());
        }
        let want = f32s(&st_tensor(&st, name));
        let got = deq(tname, bytes);
        assert_bits(name, &got, &want);
        specials += want
            .iter()
            .filter(|v| !v.is_finite() || v.to_bits() == 0x8000_0000)
            .count();
        types.insert(tname.to_string());
    }
    let all: BTreeSet<String> = [
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
        "Q5_K", "Q6_K",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(types, all, "every supported type is covered");
    let raw_keys: BTreeSet<String> = [
        "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_0_3d", "q2_k", "q3_k", "q4_k",
        "q5_k", "q6_k",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(raw_checked, raw_keys);
    assert!(
        specials >= 10,
        "the fixture's NaN/inf/-0.0 were compared ({specials})"
    );
}

/// The same fixture fed straight from the `.raw` tensors, row by row: rows
/// are independent (nothing carries over between blocks).
#[test]
fn types_v3_raw_rows_dequantize_independently() {
    let json: serde_json::Value =
        serde_json::from_slice(&fixture("types-v3.json")).expect("types-v3.json");
    let st_bytes = fixture("types-v3.expected.safetensors");
    let st = safetensors::SafeTensors::deserialize(&st_bytes).expect("safetensors");
    for t in json["tensors"].as_array().expect("tensors") {
        let name = t["name"].as_str().expect("name");
        let Ok(raw) = st.tensor(&format!("{name}.raw")) else {
            continue;
        };
        let tname = t["ggml_type"].as_str().expect("ggml_type");
        let row_bytes = raw.shape()[1];
        let want = f32s(&st_tensor(&st, name));
        let mut got = Vec::new();
        for row in raw.data().chunks(row_bytes) {
            got.extend(deq(tname, row));
        }
        assert_bits(&format!("{name} by rows"), &got, &want);
    }
}

const ROUNDTRIP_TYPES: [&str; 5] = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"];

/// `quantize(input)` gives gguf-py's bytes exactly (rows of zeros, tiny values
/// whose scales underflow, huge values whose scales overflow, rounding ties,
/// sign ties, constant blocks, normal data) and dequantizing those bytes gives
/// gguf-py's floats bit for bit (incl. the NaN/inf of the huge row).
#[test]
fn quant_roundtrip_fixtures_match_gguf_py() {
    let input_st = fixture("quant-roundtrip/input.safetensors");
    let st = safetensors::SafeTensors::deserialize(&input_st).expect("safetensors");
    let input = f32s(&st_tensor(&st, "input"));
    assert_eq!(input.len(), 8 * 256);
    for t in ROUNDTRIP_TYPES {
        let want = fixture(&format!("quant-roundtrip/{t}.bin"));
        let got = quant(t, &input);
        assert_eq!(got.len(), want.len(), "{t}: length");
        if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
            let bb = ty(t).bytes as usize;
            panic!(
                "{t}: byte {i} (block {}, offset {}) is {:#04x}, gguf-py wrote {:#04x}",
                i / bb,
                i % bb,
                got[i],
                want[i]
            );
        }
        // row-local: row by row gives the same bytes
        let mut by_rows = Vec::new();
        for row in input.chunks(256) {
            quantize(ty(t), row, &mut by_rows).unwrap();
        }
        assert_eq!(by_rows, want, "{t} by rows");

        let dq_st = fixture(&format!("quant-roundtrip/{t}.dequant.safetensors"));
        let dst = safetensors::SafeTensors::deserialize(&dq_st).expect("safetensors");
        let want_f = f32s(&st_tensor(&dst, "dequant"));
        assert_bits(&format!("{t} dequant"), &deq(t, &want), &want_f);
        assert!(
            want_f.iter().any(|v| !v.is_finite()),
            "{t}: the huge row's non-finite values are part of the comparison"
        );
    }
}

// ---------------------------------------------------------------------------
// Vectors from gguf-py for what the fixtures do not reach
// (math_vectors.rs, written by tests/interop/gguf/gen_math_vectors.py)
// ---------------------------------------------------------------------------

/// A dequantization made by gguf-py: `data` hex, output element `i` has bits
/// `values[index[i]]` (`index` one base-62 digit per element).
struct DeqCase {
    label: &'static str,
    ty: &'static str,
    data: &'static str,
    values: &'static [u32],
    index: &'static str,
}

/// A quantization made by gguf-py: `input` as f32 bits (8 hex digits each).
struct QuantCase {
    label: &'static str,
    ty: &'static str,
    input: &'static str,
    bytes: &'static str,
}

fn digit62(c: u8) -> usize {
    match c {
        b'0'..=b'9' => (c - b'0') as usize,
        b'a'..=b'z' => (c - b'a') as usize + 10,
        b'A'..=b'Z' => (c - b'A') as usize + 36,
        _ => panic!("bad digit {c}"),
    }
}

/// Blocks with NaN (quiet and signalling, both signs) and infinite f16 scales:
/// NaN payload propagation, default NaNs from `inf * 0` and `inf - inf`, and
/// numpy's swapped `m + d*q` order for a one-block Q4_1/Q5_1 tensor.
#[test]
fn non_finite_scales_dequantize_like_gguf_py() {
    let mut kinds = BTreeSet::new();
    let mut distinct_nans = BTreeSet::new();
    for c in DEQ_CASES {
        let data = unhex(c.data);
        let got = deq(c.ty, &data);
        let want: Vec<f32> = c
            .index
            .bytes()
            .map(|d| f32::from_bits(c.values[digit62(d)]))
            .collect();
        assert_bits(c.label, &got, &want);
        kinds.insert(c.ty);
        for v in &want {
            if v.is_nan() {
                distinct_nans.insert(v.to_bits());
            }
        }
    }
    assert_eq!(kinds.len(), 10, "{kinds:?}");
    // signalling (made quiet), quiet, negative and default NaNs all occur
    let want: BTreeSet<u32> = [0x7fe0_2000, 0x7fc0_a000, 0xffce_e000, DEFAULT_NAN_BITS].into();
    assert!(want.is_subset(&distinct_nans), "{distinct_nans:x?}");
}

/// Quantization edge cases: scales whose reciprocal overflows (numpy casts the
/// resulting NaN/inf codes), `max - min` overflowing f32, subnormal elements,
/// signed zeros (numpy's tie order in `max`/`min`), ± ties of the largest |x|,
/// a scale overflowing f16.
#[test]
fn quantize_edge_cases_like_gguf_py() {
    for c in QUANT_CASES {
        let x: Vec<f32> = unhex(c.input)
            .chunks_exact(4)
            .map(|b| f32::from_bits(u32::from_be_bytes([b[0], b[1], b[2], b[3]])))
            .collect();
        assert_eq!(x.len(), 32, "{}", c.label);
        let got = quant(c.ty, &x);
        assert_eq!(
            crate::error::hex(&got),
            c.bytes,
            "{} ({}): input {:?}",
            c.label,
            c.ty,
            x
        );
    }
}

// ---------------------------------------------------------------------------
// Scalar conversions
// ---------------------------------------------------------------------------

fn special_values(kind: &str) -> Vec<(u32, u16)> {
    let json: serde_json::Value =
        serde_json::from_slice(&fixture("types-v3.json")).expect("types-v3.json");
    let s = &json["special_values"][kind];
    let parse = |v: &serde_json::Value| {
        u32::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
    };
    let inp = s["f32_input_bits"].as_array().unwrap();
    let out = s["stored_bits"].as_array().unwrap();
    assert_eq!(inp.len(), out.len());
    assert!(!inp.is_empty());
    inp.iter()
        .zip(out)
        .map(|(i, o)| (parse(i), parse(o) as u16))
        .collect()
}

/// f32 → f16/bf16 of the fixture's special values (signed zeros, infinities,
/// NaNs, subnormals, ties, overflow) as gguf-py stored them; `quantize` gives
/// the same bytes for the finite ones and refuses the others.
#[test]
fn special_values_convert_like_gguf_py() {
    for (kind, tname) in [("f16", "F16"), ("bf16", "BF16")] {
        for (x, want) in special_values(kind) {
            let xf = f32::from_bits(x);
            let got = if kind == "f16" {
                f16_bits_from_f32_np(xf)
            } else {
                bf16_bits_from_f32_gguf(xf)
            };
            assert_eq!(got, want, "{kind} of {x:#010x}");
            let mut out = Vec::new();
            let r = quantize(ty(tname), &[1.0, xf], &mut out);
            if xf.is_finite() {
                r.unwrap();
                assert_eq!(&out[2..], &want.to_le_bytes(), "{tname} quantize {x:#010x}");
            } else {
                assert!(r.unwrap_err().contains("element 1"));
                assert!(out.is_empty());
            }
        }
    }
    // F32 quantize stores the bits as they are
    let x = [0.0f32, -0.0, f32::MAX, f32::from_bits(1), -1.5];
    let out = quant("F32", &x);
    assert_eq!(out.len(), 20);
    assert_eq!(
        f32s(&out).iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        x.map(f32::to_bits)
    );
}

/// numpy's f16 → f32 on all 65536 inputs: exact (checked against `half`), and
/// NaNs keep sign and payload without being made quiet (`0x7c01` →
/// `0x7f802000`, observed on numpy 2.4.6).
#[test]
fn f16_to_f32_all_inputs() {
    for h in 0..=u16::MAX {
        let got = f32_from_f16_np(h);
        if h & 0x7c00 == 0x7c00 && h & 0x03ff != 0 {
            let want = (u32::from(h & 0x8000) << 16) | 0x7f80_0000 | (u32::from(h & 0x3ff) << 13);
            assert_eq!(got.to_bits(), want, "{h:#06x}");
        } else {
            let want = half::f16::from_bits(h).to_f32();
            assert_eq!(got.to_bits(), want.to_bits(), "{h:#06x}");
        }
    }
    for (h, want) in [
        (0x7c01u16, 0x7f80_2000u32),
        (0xfc01, 0xff80_2000),
        (0x7d55, 0x7faa_a000),
        (0x7e00, 0x7fc0_0000),
        (0xfe01, 0xffc0_2000),
        (0x0001, 0x3380_0000),
        (0x83ff, 0xb87f_c000),
    ] {
        assert_eq!(f32_from_f16_np(h).to_bits(), want, "{h:#06x}");
    }
    // F16 and BF16 dequantization are these conversions, element by element
    let data = [0x01u8, 0x7c, 0xff, 0x83, 0x00, 0x80];
    let got = deq("F16", &data);
    assert_eq!(
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        [0x7f80_2000, 0xb87f_c000, 0x8000_0000]
    );
    let got = deq("BF16", &[0x81, 0xff, 0x01, 0x7f, 0x80, 0x3f]);
    assert_eq!(
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        [0xff81_0000, 0x7f01_0000, 0x3f80_0000]
    );
}

/// numpy's f32 → f16: round to nearest even everywhere (checked against
/// `half` on a sweep of the finite f32s and on every rounding boundary), NaN
/// kept unquieted with its top payload bits (observed on numpy 2.4.6).
#[test]
fn f32_to_f16_rounding() {
    let check = |bits: u32| {
        let x = f32::from_bits(bits);
        if x.is_nan() {
            return;
        }
        assert_eq!(
            f16_bits_from_f32_np(x),
            half::f16::from_f32(x).to_bits(),
            "{bits:#010x}"
        );
    };
    let mut b = 0u32;
    while let Some(n) = b.checked_add(7919) {
        check(b);
        b = n;
    }
    // every f16 value, the midpoints next to it and one ulp of f32 around those
    for h in 0..0x7c00u32 {
        let lo = f32_from_f16_np(h as u16).to_bits();
        let hi = f32_from_f16_np(h as u16 + 1).to_bits();
        let mid = ((f32::from_bits(lo) as f64 + f32::from_bits(hi) as f64) / 2.0) as f32;
        for s in [0u32, 0x8000_0000] {
            for v in [lo, hi, mid.to_bits() - 1, mid.to_bits(), mid.to_bits() + 1] {
                check(v | s);
            }
        }
    }
    for (x, want) in [
        (0x7f80_0001u32, 0x7c01u16),
        (0xff80_0001, 0xfc01),
        (0x7fc0_0000, 0x7e00),
        (0x7fa0_0001, 0x7d00),
        (0x7fff_ffff, 0x7fff),
        (0xffc0_0001, 0xfe00),
        (0x477f_f000, 0x7c00), // 65520 -> inf
        (0x3300_0000, 0x0000), // 2^-25 -> 0 (tie to even)
        (0x3300_0001, 0x0001),
    ] {
        assert_eq!(f16_bits_from_f32_np(f32::from_bits(x)), want, "{x:#010x}");
    }
}

/// gguf-py's bf16 rounding: ties to even, NaN quiet with sign kept.
#[test]
fn bf16_rounding() {
    for (x, want) in [
        (0x3f80_8000u32, 0x3f80u16),
        (0x3f81_8000, 0x3f82),
        (0x3f80_8001, 0x3f81),
        (0x7f7f_ffff, 0x7f80),
        (0x7f80_0001, 0x7fc0),
        (0xffc0_0001, 0xffc0),
        (0xffff_ffff, 0xffff),
        (0x7f80_0000, 0x7f80),
        (0x0000_0001, 0x0000),
    ] {
        assert_eq!(
            bf16_bits_from_f32_gguf(f32::from_bits(x)),
            want,
            "{x:#010x}"
        );
    }
}

/// The float → u8/i8 cast and rounding helpers, on values observed in numpy.
#[test]
fn numpy_cast_and_round() {
    let xs = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        300.0,
        -1.0,
        -300.0,
        3e9,
        -0.5,
        255.9,
        256.0,
    ];
    let got: Vec<u8> = xs.iter().map(|&v| np_cast_low_byte(v)).collect();
    assert_eq!(got, [0, 0, 0, 44, 255, 212, 0, 0, 255, 0]);
    for (x, want) in [
        (0.5f32, 1.0f32),
        (1.5, 2.0),
        (2.5, 3.0),
        (-2.5, -3.0),
        (-0.5, -1.0),
        (0.499_999_97, 0.0),
        (126.5, 127.0),
        (-126.49, -126.0),
    ] {
        assert_eq!(np_roundf(x), want, "{x}");
    }
    assert!(np_roundf(f32::INFINITY).is_nan());
    assert!(np_roundf(f32::NAN).is_nan());
}

// ---------------------------------------------------------------------------
// Errors and properties
// ---------------------------------------------------------------------------

/// Wrong lengths and unsupported types are errors, never panics.
#[test]
fn bad_lengths_and_types_are_errors() {
    for t in crate::format::gguf::types::TYPES {
        let supported = [
            "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
            "Q5_K", "Q6_K",
        ]
        .contains(&t.name);
        let (block, bytes) = (t.block as usize, t.bytes as usize);
        let data = vec![0u8; 3 * bytes];
        let mut out = vec![0f32; 3 * block];
        assert_eq!(
            dequantize(*t, &data, &mut out).is_ok(),
            supported,
            "{}",
            t.name
        );
        if !supported {
            continue;
        }
        for n in [bytes - 1, bytes + 1, 2 * bytes + 1] {
            if n % bytes == 0 {
                continue;
            }
            let e = dequantize(*t, &vec![0u8; n], &mut vec![0f32; 8 * block]).unwrap_err();
            assert!(e.contains("whole number"), "{e}");
        }
        for m in [0, 3 * block - 1, 3 * block + 1] {
            let e = dequantize(*t, &data, &mut vec![0f32; m]).unwrap_err();
            assert!(e.contains("output holds"), "{e}");
        }
        assert!(dequantize(*t, &[], &mut []).is_ok());
    }
    let quantizable = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"];
    for t in crate::format::gguf::types::TYPES {
        let ok = quantizable.contains(&t.name);
        let mut out = vec![7u8];
        let x = vec![0.25f32; t.block as usize * 2];
        assert_eq!(quantize(*t, &x, &mut out).is_ok(), ok, "{}", t.name);
        if !ok {
            assert_eq!(out, [7], "nothing appended on error");
            continue;
        }
        // appends
        assert_eq!(out[0], 7);
        assert_eq!(out.len(), 1 + 2 * t.bytes as usize);
        if t.block > 1 {
            for n in [1, 31, 33, 63] {
                let e = quantize(*t, &vec![0f32; n], &mut out).unwrap_err();
                assert!(e.contains("whole number"), "{e}");
            }
        }
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = vec![1.0f32; 64];
            x[37] = bad;
            let mut out = Vec::new();
            let e = quantize(*t, &x, &mut out).unwrap_err();
            assert!(e.contains("element 37"), "{e}");
            assert!(out.is_empty());
        }
    }
}

/// xorshift64*, a deterministic source of test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

/// quantize → dequantize stays within the type's error bound on random finite
/// data (scales kept inside f16's normal range): half a step for rounding
/// codes, plus what rounding `d` (and `m`) to f16 costs (half an f16 ulp,
/// 2^-11 relative, times |code|); a whole step for the Q4_0/Q5_0 element at
/// `-max`, which clips to code 15/31.
#[test]
fn roundtrip_error_is_bounded() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    const U: f32 = 1.0 / 2048.0;
    for t in ROUNDTRIP_TYPES {
        let mut worst = 0f32;
        for _ in 0..400 {
            let scale = 10f32.powf(rng.unit() * 2.0 + 0.5);
            let offset = if rng.next().is_multiple_of(2) {
                rng.unit() * 4.0 * scale
            } else {
                0.0
            };
            let x: Vec<f32> = (0..32).map(|_| rng.unit() * scale + offset).collect();
            let b = quant(t, &x);
            let y = deq(t, &b);
            let d = f32_from_f16_np(u16::from_le_bytes([b[0], b[1]])).abs();
            assert!(d.is_normal(), "{t}: scale {d} stays a normal f16 here");
            let affine = matches!(t, "Q4_1" | "Q5_1");
            let m = if affine {
                f32_from_f16_np(u16::from_le_bytes([b[2], b[3]]))
            } else {
                0.0
            };
            let cap = match t {
                "Q4_0" => 7.0,
                "Q5_0" => 15.0,
                _ => f32::INFINITY,
            };
            for i in 0..32 {
                let err = (x[i] - y[i]).abs();
                // the element's code (q - 8 / q - 16 for the symmetric types)
                let code = match t {
                    "Q8_0" => f32::from(b[2 + i] as i8),
                    _ => ((y[i] - m) / d).abs(),
                };
                let clipped = (code.abs() - cap).abs() < 0.01 && (x[i] / d).abs() > cap + 0.49;
                let step = if clipped { 1.0 } else { 0.5 };
                let bound = step * d + code.abs() * d * U + m.abs() * U + 1e-6 * x[i].abs().max(d);
                assert!(
                    err <= bound,
                    "{t}: x[{i}] = {} dequantizes to {} (err {err}, bound {bound}, d {d}, code {code})",
                    x[i],
                    y[i]
                );
                worst = worst.max(err / d);
            }
        }
        assert!(
            worst > 0.3,
            "{t}: errors reach their bound's order ({worst})"
        );
    }
}

/// The NaN-aware arithmetic gives the same bits as plain arithmetic whenever
/// the block scales are finite, so taking the fast path for such blocks is
/// exact; checked on random blocks of every block type.
#[test]
fn fast_and_exact_paths_agree_on_finite_scales() {
    let mut rng = Rng(42);
    let mut fill = |b: &mut [u8]| {
        for v in b.iter_mut() {
            *v = rng.next() as u8;
        }
    };
    let scale = |b: &mut [u8], at: usize, r: u64| {
        // a finite f16: clear the top exponent bit pattern 0x7c00 if set
        let mut h = r as u16;
        if h & 0x7c00 == 0x7c00 {
            h &= !0x4000;
        }
        b[at..at + 2].copy_from_slice(&h.to_le_bytes());
    };
    for round in 0..300u64 {
        let r = round.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        macro_rules! both {
            ($f:ident, $n:expr, $e:expr, [$($at:expr),*] $(, $single:expr)?) => {{
                let mut b = [0u8; $n];
                fill(&mut b);
                $( scale(&mut b, $at, r >> (($at % 5) * 8)); )*
                let (mut o1, mut o2) = ([0f32; $e], [0f32; $e]);
                $f::<Fast>(&b, &mut o1 $(, $single)?);
                $f::<X86>(&b, &mut o2 $(, $single)?);
                assert_bits(stringify!($f), &o1, &o2);
            }};
        }
        both!(deq_q4_0, 18, 32, [0]);
        both!(deq_q4_1, 20, 32, [0, 2], round % 2 == 0);
        both!(deq_q5_0, 22, 32, [0]);
        both!(deq_q5_1, 24, 32, [0, 2], round % 2 == 0);
        both!(deq_q8_0, 34, 32, [0]);
        both!(deq_q2_k, 84, 256, [80, 82]);
        both!(deq_q3_k, 110, 256, [108]);
        both!(deq_q4_k, 144, 256, [0, 2]);
        both!(deq_q5_k, 176, 256, [0, 2]);
        both!(deq_q6_k, 210, 256, [208]);
    }
}

/// The x86 NaN rule itself: first operand's NaN, then second's, made quiet;
/// invalid operations without NaN operands give 0xFFC00000.
#[test]
fn x86_nan_rule() {
    let a = f32::from_bits(0x7fa0_0001); // signalling
    let b = f32::from_bits(0xffc0_0005);
    assert_eq!(X86::add(a, b).to_bits(), 0x7fe0_0001);
    assert_eq!(X86::add(b, a).to_bits(), 0xffc0_0005);
    assert_eq!(X86::sub(1.0, a).to_bits(), 0x7fe0_0001);
    assert_eq!(X86::mul(f32::INFINITY, 0.0).to_bits(), DEFAULT_NAN_BITS);
    assert_eq!(
        X86::sub(f32::INFINITY, f32::INFINITY).to_bits(),
        DEFAULT_NAN_BITS
    );
    assert_eq!(X86::mul(2.0, 3.0), 6.0);
    assert_eq!(X86::add(-0.0, 0.0).to_bits(), 0);
}
include!("math_vectors.rs");

// ---------------------------------------------------------------------------
// The vectorized quantizers against straightforward scalar references
// ---------------------------------------------------------------------------

/// Scalar reference quantizers: the per-block code as first written (one
/// comparison and branch at a time, numpy's scan order spelled out), against
/// which the branch-free, vectorizing versions in `math.rs` are checked.
mod reference {
    use super::super::{f16_bits_from_f32_np, np_roundf, NP_TIE_ORDER};

    /// The float → u8 cast of numpy on x86-64, with a branch.
    fn cast(v: f32) -> u8 {
        if v.abs() < 2_147_483_648.0 {
            (v as i32) as u8
        } else {
            0
        }
    }

    /// Round half away from zero for finite |n| < 2^23, with branches.
    pub(super) fn round_small(n: f32) -> i32 {
        let a = n.abs();
        let t = a as i32;
        let r = if a - t as f32 >= 0.5 { t + 1 } else { t };
        if n < 0.0 {
            -r
        } else {
            r
        }
    }

    /// `np.where(d == 0, 0, 1 / d)`.
    fn inverse(d: f32) -> f32 {
        if d == 0.0 {
            0.0
        } else {
            1.0 / d
        }
    }

    /// numpy's scan in [`NP_TIE_ORDER`], strict comparisons.
    fn max_min(x: &[f32; 32]) -> (f32, f32) {
        let first = x[NP_TIE_ORDER[0]];
        let (mut max, mut min) = (first, first);
        for &i in NP_TIE_ORDER.iter().skip(1) {
            let v = x[i];
            if v > max {
                max = v;
            }
            if v < min {
                min = v;
            }
        }
        (max, min)
    }

    /// First element of largest |x|, with its sign.
    fn signed_absmax(x: &[f32; 32]) -> f32 {
        let mut best = x[0];
        for &v in x.iter().skip(1) {
            if v.abs() > best.abs() {
                best = v;
            }
        }
        best
    }

    /// Nibbles: low of q[j], high of q[j + 16].
    fn nibbles(q: &[u8; 32], dst: &mut [u8]) {
        for (j, d) in dst.iter_mut().take(16).enumerate() {
            *d = (q[j] & 0x0f) | (q[j + 16] << 4);
        }
    }

    /// Bit 4 of each code, little-endian u32.
    fn high_bits(q: &[u8; 32]) -> [u8; 4] {
        let mut qh = 0u32;
        for (i, &v) in q.iter().enumerate() {
            qh |= u32::from((v >> 4) & 1) << i;
        }
        qh.to_le_bytes()
    }

    /// Q8_0.
    pub(super) fn q8_0(x: &[f32; 32]) -> Vec<u8> {
        let mut amax = 0f32;
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
            }
        }
        let d = amax / 127.0;
        let id = inverse(d);
        let mut b = f16_bits_from_f32_np(d).to_le_bytes().to_vec();
        for &v in x {
            b.push(if id.is_finite() {
                round_small(v * id) as u8
            } else {
                cast(np_roundf(v * id))
            });
        }
        b
    }

    /// Q4_0 (half 8, cap 15) and Q5_0 (half 16, cap 31).
    pub(super) fn sym(x: &[f32; 32], half: f32, cap: u8) -> Vec<u8> {
        let d = signed_absmax(x) / -half;
        let id = inverse(d);
        let mut q = [0u8; 32];
        for (q, &v) in q.iter_mut().zip(x) {
            *q = cast(v * id + (half + 0.5)).min(cap);
        }
        let mut b = f16_bits_from_f32_np(d).to_le_bytes().to_vec();
        if cap == 31 {
            b.extend_from_slice(&high_bits(&q));
        }
        let mut n = [0u8; 16];
        nibbles(&q, &mut n);
        b.extend_from_slice(&n);
        b
    }

    /// Q4_1 (levels 15) and Q5_1 (levels 31).
    pub(super) fn affine(x: &[f32; 32], levels: u8) -> Vec<u8> {
        let (max, min) = max_min(x);
        let d = (max - min) / f32::from(levels);
        let id = inverse(d);
        let mut q = [0u8; 32];
        for (q, &v) in q.iter_mut().zip(x) {
            *q = cast((v - min) * id + 0.5).min(levels);
        }
        let mut b = f16_bits_from_f32_np(d).to_le_bytes().to_vec();
        b.extend_from_slice(&f16_bits_from_f32_np(min).to_le_bytes());
        if levels == 31 {
            b.extend_from_slice(&high_bits(&q));
        }
        let mut n = [0u8; 16];
        nibbles(&q, &mut n);
        b.extend_from_slice(&n);
        b
    }
}

/// A random block of one of several shapes that reach the quantizers' corner
/// cases: ties of the largest magnitude (both signs), signed zeros (all-zero
/// blocks, zero maxima and minima), exact halves of Q8_0's codes, subnormal
/// elements and scales (`1 / d` overflowing), `max - min` overflowing, huge
/// and tiny magnitudes.
fn corner_block(rng: &mut Rng) -> [f32; 32] {
    let mut x = [0f32; 32];
    let kind = rng.next() % 10;
    let scales = [1.0f32, 1e-3, 3e-39, 1e-44, 2.0e-38, 1e30, 3.0e38, 0.02];
    let scale = scales[(rng.next() % scales.len() as u64) as usize];
    for v in x.iter_mut() {
        let r = rng.next();
        *v = match kind {
            // uniform
            0 | 1 => rng.unit() * scale,
            // few levels: ties of max |x| with both signs, signed zeros
            2 => [-2.0f32, -1.0, -0.0, 0.0, 1.0, 2.0][(r % 6) as usize] * scale,
            // signed zeros only
            3 => {
                if r & 1 == 0 {
                    0.0
                } else {
                    -0.0
                }
            }
            // non-positive with zeros (max is a zero) / non-negative (min is)
            4 => -(rng.unit().abs() * scale) * ((r >> 8) % 2) as f32,
            5 => {
                let z = if r & 2 == 0 { 0.0 } else { -0.0 };
                if r & 1 == 0 {
                    z
                } else {
                    rng.unit().abs() * scale
                }
            }
            // halves of Q8_0 codes: max |x| = 127, codes hit .5 exactly
            6 => ((r % 509) as f32 - 254.0) * 0.5,
            // random subnormals and tiny normals, any sign
            7 => f32::from_bits((r as u32) & 0x80ff_ffff),
            // extremes: max - min overflows
            8 => [f32::MAX, -f32::MAX, 0.0, -0.0, 1.0][(r % 5) as usize],
            // random finite bit patterns
            _ => {
                let b = r as u32;
                let f = f32::from_bits(b);
                if f.is_finite() {
                    f
                } else {
                    f32::from_bits(b & 0xbfff_ffff)
                }
            }
        };
    }
    if kind == 6 {
        x[(rng.next() % 32) as usize] = if rng.next() & 1 == 0 { 127.0 } else { -127.0 };
    }
    // a level times a huge scale may overflow: keep the block finite
    for v in x.iter_mut() {
        if !v.is_finite() {
            *v = f32::MAX.copysign(*v);
        }
    }
    x
}

/// The vectorized quantizers give the reference's bytes on blocks built to hit
/// every tie, signed zero, subnormal scale and overflow, for all five block
/// types, through `quantize` (several blocks per call) and per block.
#[test]
fn vectorized_quantizers_match_scalar_reference() {
    let mut rng = Rng(0x5eed_0bad_cafe_f00d);
    type Ref = fn(&[f32; 32]) -> Vec<u8>;
    let refs: [(&str, Ref); 5] = [
        ("Q8_0", reference::q8_0),
        ("Q4_0", |x| reference::sym(x, 8.0, 15)),
        ("Q5_0", |x| reference::sym(x, 16.0, 31)),
        ("Q4_1", |x| reference::affine(x, 15)),
        ("Q5_1", |x| reference::affine(x, 31)),
    ];
    for round in 0..4000 {
        let blocks: Vec<[f32; 32]> = (0..7).map(|_| corner_block(&mut rng)).collect();
        let flat: Vec<f32> = blocks.iter().flatten().copied().collect();
        for (name, f) in refs {
            let want: Vec<u8> = blocks.iter().flat_map(f).collect();
            let got = quant(name, &flat);
            if got != want {
                let bytes = want.len() / blocks.len();
                let b = (0..blocks.len())
                    .find(|&b| got[b * bytes..][..bytes] != want[b * bytes..][..bytes])
                    .unwrap();
                panic!(
                    "{name} round {round} block {b}: {:08x?}\n got {:02x?}\nwant {:02x?}",
                    blocks[b].map(f32::to_bits),
                    &got[b * bytes..][..bytes],
                    &want[b * bytes..][..bytes]
                );
            }
        }
    }
}

/// The branch-free rounding and casts equal the branching forms: every f32 in
/// [-2^23, 2^23] near an integer or a half, and a random sweep of the range.
#[test]
fn branch_free_rounding_matches_reference() {
    let check = |v: f32| {
        if v.abs() < 8_388_608.0 {
            assert_eq!(
                round_half_away_small(v),
                reference::round_small(v),
                "{v} ({:#010x})",
                v.to_bits()
            );
        }
        if (0.0..8_388_608.0).contains(&v) {
            assert_eq!(cast_low_byte_small(v), np_cast_low_byte(v), "{v}");
        }
    };
    for k in -1000i32..=1000 {
        for base in [
            k as f32,
            k as f32 + 0.5,
            k as f32 * 4096.0,
            k as f32 * 8191.5,
        ] {
            let mut u = base;
            let mut d = base;
            for _ in 0..4 {
                check(u);
                check(d);
                u = f32::from_bits(u.to_bits().wrapping_add(1));
                d = f32::from_bits(d.to_bits().wrapping_sub(1));
            }
        }
    }
    for v in [
        0.0f32,
        -0.0,
        8_388_607.5,
        -8_388_607.5,
        8_388_607.0,
        4_194_303.5,
        1e-45,
    ] {
        check(v);
    }
    let mut rng = Rng(7);
    for _ in 0..2_000_000 {
        let v = f32::from_bits(rng.next() as u32);
        check(v);
        check(rng.unit() * 300.0);
    }
}

/// `quantize_into` names the first non-finite element by its index in the
/// tensor (`first` + its index in the slice), for the block and float types,
/// and refuses an output of the wrong size.
#[test]
fn quantize_into_reports_the_tensor_index() {
    for name in ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16"] {
        let t = ty(name);
        let mut x = vec![0.5f32; 96];
        x[70] = f32::NAN;
        x[90] = f32::INFINITY;
        let mut out = vec![0u8; quantized_len(t, x.len()).unwrap()];
        let e = quantize_into(t, &x, &mut out, 32 * 1024).unwrap_err();
        assert!(e.contains(&format!("element {}", 32 * 1024 + 70)), "{e}");
        let mut short = vec![0u8; out.len() - 1];
        let e = quantize_into(t, &x[..64], &mut short, 0).unwrap_err();
        assert!(e.contains("the output holds"), "{e}");
    }
}

/// Every instruction set `quantize_into` may run on this CPU (the baseline,
/// and AVX2 / AVX-512 where present) gives the scalar reference's bytes on the
/// corner-case blocks, for all five block types and F16/BF16, and refuses the
/// same non-finite element; `widen_quantize_into` from BF16, F16 and F32 bytes
/// equals widening first and quantizing then.
#[test]
fn every_instruction_set_gives_the_reference_bytes() {
    let isas = Isa::available();
    eprintln!("instruction sets compared: {isas:?}");
    let mut rng = Rng(0x0dd5_eed5_1234_5678);
    type Ref = fn(&[f32; 32]) -> Vec<u8>;
    let refs: [(&str, Ref); 7] = [
        ("Q8_0", reference::q8_0),
        ("Q4_0", |x| reference::sym(x, 8.0, 15)),
        ("Q5_0", |x| reference::sym(x, 16.0, 31)),
        ("Q4_1", |x| reference::affine(x, 15)),
        ("Q5_1", |x| reference::affine(x, 31)),
        ("F16", |x| {
            x.iter()
                .flat_map(|&v| f16_bits_from_f32_np(v).to_le_bytes())
                .collect()
        }),
        ("BF16", |x| {
            x.iter()
                .flat_map(|&v| bf16_bits_from_f32_gguf(v).to_le_bytes())
                .collect()
        }),
    ];
    for round in 0..1500 {
        let blocks: Vec<[f32; 32]> = (0..9).map(|_| corner_block(&mut rng)).collect();
        let flat: Vec<f32> = blocks.iter().flatten().copied().collect();
        for (name, f) in refs {
            let t = ty(name);
            let want: Vec<u8> = blocks.iter().flat_map(f).collect();
            for &isa in &isas {
                let mut got = vec![0u8; want.len()];
                quantize_into_at(isa, t, &flat, &mut got, 0).unwrap();
                assert!(got == want, "{name} {isa:?} round {round}: differs");
            }
        }
    }
    // a non-finite element is refused, by its index, at every level
    for name in ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16"] {
        let t = ty(name);
        let mut x = vec![0.25f32; 320];
        x[211] = f32::NEG_INFINITY;
        let n = quantized_len(t, x.len()).unwrap();
        for &isa in &isas {
            let e = quantize_into_at(isa, t, &x, &mut vec![0u8; n], 64).unwrap_err();
            assert!(e.contains("element 275"), "{name} {isa:?}: {e}");
        }
    }
    // fused widening: the bytes of each float type, widened and quantized
    let x: Vec<f32> = (0..32 * 40).map(|_| rng.unit() * 3.0).collect();
    for fd in [FloatDtype::Bf16, FloatDtype::F16, FloatDtype::F32] {
        let mut bytes = vec![0u8; x.len() * fd.size()];
        fd.encode_into(&x, &mut bytes).unwrap();
        let wide = fd.decode(&bytes).unwrap();
        for name in ["Q8_0", "Q4_1", "Q5_0", "F16"] {
            let t = ty(name);
            let want = quant(name, &wide);
            let mut got = vec![0u8; want.len()];
            let mut scratch = vec![0f32; x.len()];
            widen_quantize_into(t, fd, &bytes, &mut scratch, &mut got, 0).unwrap();
            assert!(got == want, "{name} from {fd:?}: differs");
            // a scratch of the wrong length is refused, not overrun
            let mut short = vec![0f32; x.len() - 1];
            assert!(widen_quantize_into(t, fd, &bytes, &mut short, &mut got, 0).is_err());
        }
    }
}

//! Block FP8 arithmetic (spec/layouts.md §6.2), op by op as the references
//! round: dequantizing is DeepSeek's `weight_dequant` (the f32 product of
//! the code and its block's scale, stored to the model dtype), quantizing
//! is transformers' fine-grained FP8 quantizer (`Fp8Quantize`) with the
//! ragged edge blocks taken as if zero-padded.

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::float::Fp8Kind;

/// The largest finite E4M3 value (`torch.finfo(float8_e4m3fn).max`).
pub(crate) const FP8_MAX: f32 = 448.0;

/// The value of an E8M0 scale byte as torch's `.to(float32)` decodes it:
/// `2^(b - 127)`, byte 0 is 2^-127 (an f32 subnormal), byte 255 is NaN.
pub(crate) fn e8m0_value(b: u8) -> f32 {
    match b {
        255 => f32::NAN,
        0 => f32::from_bits(0x0040_0000),
        b => f32::from_bits(u32::from(b) << 23),
    }
}

/// The stored scales (F32 or F8_E8M0 bytes) as f32, each checked to be a
/// positive finite number: a zero, negative, NaN or infinite scale would
/// dequantize its block into garbage. `cols` is the grid's width, for the
/// block named in the error.
pub(crate) fn scales(dtype: Dtype, b: &[u8], cols: usize) -> Result<Vec<f32>> {
    let v: Vec<f32> = match dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F8E8M0 => b.iter().map(|&x| e8m0_value(x)).collect(),
        d => {
            return Err(Error::layout(format!(
                "a block FP8 scale is F32 or F8_E8M0, not {d}"
            )))
        }
    };
    if let Some((i, s)) = v
        .iter()
        .enumerate()
        .find(|(_, s)| !(s.is_finite() && **s > 0.0))
    {
        let cols = cols.max(1);
        return Err(Error::layout(format!(
            "the scale of block ({}, {}) is {s}: a block scale is a positive finite number \
             (the checkpoint is damaged, or not block FP8)",
            i / cols,
            i % cols
        )));
    }
    Ok(v)
}

/// Dequantizes E4M3 codes `q` ([n, k], row-major) with their block scales
/// `s` ([ceil(n/bh), ceil(k/bw)], positive and finite) to `to`:
/// `w = rne_to(f32(q) · s)`, one rounding.
pub(crate) fn dequantize(
    q: &[u8],
    shape: [usize; 2],
    block: [usize; 2],
    s: &[f32],
    to: Dtype,
) -> Result<Vec<u8>> {
    crate::layout::blocks::dequantize(q, shape, block, s, to, |v, sc| v * sc)
}

/// `ceil(log2(v))` as torch computes it on an f32: the logarithm rounded to
/// f32 first, so a value a few ulps above a power of two `2^e` (|e| large)
/// gives `e`, not `e + 1`.
pub(crate) fn ceil_log2(v: f32) -> i32 {
    ((f64::from(v)).log2() as f32).ceil() as i32
}

/// The multiplier and the stored inverse scale of one block whose largest
/// magnitude is `amax` (transformers' `Fp8Quantize`): `k = f32(f32(1 /
/// amax) · 448)` (torch divides a number by a tensor as a reciprocal and a
/// product: two roundings, not one), 1 for an all-zero block; `inv = 1 / k`; with `ue8m0`, `inv` is rounded up
/// to a power of two `2^e` (at least 2^-126) and `k = 2^-e`. Returns `(k,
/// inv)`, or an error when `k` overflows f32 (amax below 448 / f32::MAX,
/// where the reference would store a zero scale and NaN codes).
pub(crate) fn block_scale(amax: f32, ue8m0: bool) -> Result<(f32, f32)> {
    let k = if amax > 0.0 {
        (1.0 / amax) * FP8_MAX
    } else {
        1.0
    };
    if ue8m0 {
        let inv = (1.0 / k).max(f32::MIN_POSITIVE);
        let e = ceil_log2(inv).clamp(-126, 127);
        let inv = f32::from_bits(((e + 127) as u32) << 23);
        return Ok((1.0 / inv, inv));
    }
    if !k.is_finite() {
        return Err(Error::layout(format!(
            "a block's largest magnitude {amax:e} is below 448 / f32::MAX: its multiplier 448 / \
             amax overflows (transformers would store a zero scale and NaN codes); use \
             fp8:block:ue8m0, or scale the weights"
        )));
    }
    Ok((k, 1.0 / k))
}

/// Quantizes a [n, k] weight of dtype `d` (its bytes `x`) in blocks of
/// `bh` x `bw`: per block `q = e4m3(clamp(f32(x) · k, ±448))` with `k`
/// and the stored inverse from [`block_scale`] over the block's own
/// elements (a ragged edge block is the zero-padded block: padding never
/// changes its largest magnitude). Returns the codes and the scales as
/// F32, or with `ue8m0` E8M0, bytes.
pub(crate) fn quantize(
    d: Dtype,
    x: &[u8],
    shape: [usize; 2],
    block: [usize; 2],
    ue8m0: bool,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut inv_out = Vec::new();
    let q = crate::layout::blocks::quantize(
        d,
        x,
        shape,
        block,
        |_, amax| {
            let (k, inv) = block_scale(amax, ue8m0)?;
            if ue8m0 {
                inv_out.push((inv.to_bits() >> 23) as u8);
            } else {
                inv_out.extend_from_slice(&inv.to_le_bytes());
            }
            Ok(k)
        },
        |v, k| Fp8Kind::E4M3Fn.encode((v * k).clamp(-FP8_MAX, FP8_MAX)),
    )?;
    Ok((q, inv_out))
}

//! compressed-tensors 0.20.0's FP8 weight arithmetic (spec/layouts.md
//! §7.2), op by op as torch rounds on CPU: an operation on two BF16 or F16
//! values is exact in f32, then rounded to the dtype.

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::float::{round_bf16, round_f16, Fp8Kind};

/// The largest finite E4M3 value.
pub(crate) const FP8_MAX: f32 = 448.0;

/// Rounds an f32 value to `d` (ties to even) and widens it back.
pub(crate) fn round_to(d: Dtype, x: f32) -> f32 {
    match d {
        Dtype::BF16 => round_bf16(x),
        Dtype::F16 => round_f16(x),
        _ => x,
    }
}

/// `torch.finfo(d).eps`: what a zero scale becomes.
pub(crate) fn eps(d: Dtype) -> f32 {
    match d {
        Dtype::BF16 => 2f32.powi(-7),
        Dtype::F16 => 2f32.powi(-10),
        _ => f32::EPSILON,
    }
}

/// The scale of a block whose largest magnitude is `amax`, in dtype `d`
/// (`calculate_qparams`): `s = d(amax / 448)`, and `eps(d)` where that is
/// zero.
pub(crate) fn scale_for(d: Dtype, amax: f32) -> f32 {
    let s = round_to(d, amax / FP8_MAX);
    if s == 0.0 {
        eps(d)
    } else {
        s
    }
}

/// One code (`_quantize`): `e4m3(clamp(d(x / s) + 0, ±448))`. The `+ 0`
/// is the zero point compressed-tensors adds even to a symmetric scheme
/// (an F8 zero, dropped from the file): it turns a `-0` quotient into
/// `+0`, code 0x00 (a negative quotient that rounds to zero in E4M3 stays
/// 0x80).
pub(crate) fn code(d: Dtype, x: f32, s: f32) -> u8 {
    Fp8Kind::E4M3Fn.encode((round_to(d, x / s) + 0.0).clamp(-FP8_MAX, FP8_MAX))
}

/// The stored scales (BF16, F16 or F32 bytes) as f32, each checked to be
/// positive and finite (compressed-tensors never writes another; a zero
/// or NaN scale would dequantize its block into garbage). `cols` is the
/// grid's width, for the block named in the error.
pub(crate) fn scales(dtype: Dtype, b: &[u8], cols: usize) -> Result<Vec<f32>> {
    let f = crate::float::float_dtype_of(dtype)
        .filter(|_| matches!(dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32))
        .ok_or_else(|| {
            Error::layout(format!(
                "a compressed-tensors FP8 scale is BF16, F16 or F32, not {dtype}"
            ))
        })?;
    let v = f.decode(b).map_err(|e| Error::layout(e.to_string()))?;
    if let Some((i, s)) = v
        .iter()
        .enumerate()
        .find(|(_, s)| !(s.is_finite() && **s > 0.0))
    {
        let cols = cols.max(1);
        return Err(Error::layout(format!(
            "the scale of block ({}, {}) is {s}: a scale is a positive finite number (the \
             checkpoint is damaged, or not compressed-tensors FP8)",
            i / cols,
            i % cols
        )));
    }
    Ok(v)
}

/// Quantizes a [n, k] weight of dtype `d` in blocks of `bh` x `bw`: the
/// codes, and the scales as `d` bytes.
pub(crate) fn quantize(
    d: Dtype,
    x: &[u8],
    shape: [usize; 2],
    block: [usize; 2],
) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut s_out = Vec::new();
    let q = crate::layout::blocks::quantize(
        d,
        x,
        shape,
        block,
        |_, amax| {
            let s = scale_for(d, amax);
            s_out.push(s);
            Ok(s)
        },
        |v, s| code(d, v, s),
    )?;
    let f = crate::float::float_dtype_of(d)
        .ok_or_else(|| Error::layout(format!("{d} is not a float dtype")))?;
    Ok((q, f.encode(&s_out)))
}

/// Dequantizes (`_dequantize`): `w = to(s_dtype(f32(q) · s))`, the product
/// rounded to the scale's dtype, then to the output's.
pub(crate) fn dequantize(
    q: &[u8],
    shape: [usize; 2],
    block: [usize; 2],
    s: &[f32],
    s_dtype: Dtype,
    to: Dtype,
) -> Result<Vec<u8>> {
    crate::layout::blocks::dequantize(q, shape, block, s, to, |v, sc| round_to(s_dtype, v * sc))
}

//! comfy-kitchen 0.2.40's per-tensor FP8 arithmetic (spec/layouts.md §5.2),
//! re-stated op by op: every step rounds where the library's torch ops
//! round (a product of two bf16 or f16 values is exact in f32, then rounded
//! to the dtype; an f32 division rounds once, then to the dtype).

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::float::{f32_from_bf16_bits, f32_from_f16_bits, round_bf16, round_f16, Fp8Kind};

/// Rounds an f32 value to `d` (ties to even) and widens it back.
pub(crate) fn round_to(d: Dtype, x: f32) -> f32 {
    match d {
        Dtype::BF16 => round_bf16(x),
        Dtype::F16 => round_f16(x),
        _ => x,
    }
}

/// The values of BF16, F16 or F32 bytes, widened exactly to f32.
pub(crate) fn widen(d: Dtype, b: &[u8]) -> Result<Vec<f32>> {
    Ok(match d {
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| f32_from_bf16_bits(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| f32_from_f16_bits(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        d => {
            return Err(Error::layout(format!(
                "a ComfyUI FP8 weight or scale is BF16, F16 or F32, not {d}"
            )))
        }
    })
}

/// f32 values (already representable in `d`) as `d` bytes.
pub(crate) fn narrow(d: Dtype, v: &[f32]) -> Result<Vec<u8>> {
    let f = crate::float::float_dtype_of(d)
        .ok_or_else(|| Error::layout(format!("{d} is not a float dtype")))?;
    Ok(f.encode(v))
}

/// The per-tensor scale comfy-kitchen computes for weights `x` of dtype
/// `d` (`amax / finfo(T).max`, computed in `d`), as the F32 it stores. An
/// all-zero weight gets 1.0 where the library's 0 would make every code
/// NaN (spec/layouts.md §5.2: the one deliberate difference).
pub(crate) fn scale_of(d: Dtype, kind: Fp8Kind, x: &[f32]) -> Result<f32> {
    let mut amax = 0f32;
    for &v in x {
        if !v.is_finite() {
            return Err(Error::layout(
                "the weight holds NaN or infinity, which a per-tensor FP8 scale cannot hold \
                 (comfy-kitchen would write NaN codes); fix the weights first",
            ));
        }
        amax = amax.max(v.abs());
    }
    if amax == 0.0 {
        return Ok(1.0);
    }
    let s = round_to(d, amax / kind.max());
    if !round_to(d, 1.0 / s).is_finite() {
        // an F16 model whose amax is below max / 65504 (0.0068 for e4m3fn,
        // 0.875 for e5m2): the library's reciprocal overflows, every non-zero
        // code saturates at ±max and every zero becomes NaN
        return Err(Error::layout(format!(
            "the weight's largest magnitude {amax:e} gives a scale whose reciprocal overflows \
             {d}: every code would saturate at ±{} and every zero become NaN (comfy-kitchen \
             writes exactly that); quantize it from an F32 or BF16 model",
            kind.max()
        )));
    }
    Ok(s)
}

/// Quantizes weights `x` of dtype `d` with scale `s` (comfy-kitchen's
/// `quantize_per_tensor_fp8`): `q = fp8(clamp(rne_d(x · rne_d(1 / s)), ±max))`.
pub(crate) fn quantize(d: Dtype, kind: Fp8Kind, x: &[f32], s: f32) -> Vec<u8> {
    let inv = round_to(d, 1.0 / s);
    let max = kind.max();
    x.iter()
        .map(|&v| {
            let t = round_to(d, v * inv);
            // NaN stays NaN (excluded above); infinities clamp
            kind.encode(t.clamp(-max, max))
        })
        .collect()
}

/// Dequantizes codes with their stored scale to `to` (comfy-kitchen's
/// `dequantize_per_tensor_fp8`): `w = rne_to(to(q) · rne_to(s))`, the scale
/// rounded to the output dtype before the product.
pub(crate) fn dequantize(kind: Fp8Kind, q: &[u8], s: f32, to: Dtype) -> Result<Vec<u8>> {
    let s = round_to(to, s);
    let v: Vec<f32> = q
        .iter()
        .map(|&c| round_to(to, kind.decode(c) * s))
        .collect();
    narrow(to, &v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_is_rounded_to_the_output_dtype_before_the_product() {
        // s = 1/3 is not a bf16 value: rne_bf16(1/3) = 0.333984375
        let q = [Fp8Kind::E4M3Fn.encode(448.0)];
        let w = dequantize(Fp8Kind::E4M3Fn, &q, 1.0 / 3.0, Dtype::BF16).unwrap();
        let got = f32_from_bf16_bits(u16::from_le_bytes([w[0], w[1]]));
        assert_eq!(got, round_bf16(448.0 * 0.333_984_4));
        assert_ne!(got, round_bf16(448.0 / 3.0));
    }

    #[test]
    fn zero_and_non_finite_weights() {
        assert_eq!(
            scale_of(Dtype::BF16, Fp8Kind::E4M3Fn, &[0.0, -0.0]).unwrap(),
            1.0
        );
        let q = quantize(Dtype::BF16, Fp8Kind::E4M3Fn, &[0.0, -0.0], 1.0);
        assert_eq!(q, [0x00, 0x80]);
        assert!(scale_of(Dtype::F32, Fp8Kind::E4M3Fn, &[1.0, f32::NAN]).is_err());
        assert!(scale_of(Dtype::F32, Fp8Kind::E5M2, &[f32::INFINITY]).is_err());
        // an f16 weight too small for an f16 scale's reciprocal
        assert!(scale_of(Dtype::F16, Fp8Kind::E4M3Fn, &[1e-6]).is_err());
        assert!(scale_of(Dtype::F16, Fp8Kind::E4M3Fn, &[0.006]).is_err());
        assert!(scale_of(Dtype::F16, Fp8Kind::E4M3Fn, &[0.007]).is_ok());
        assert!(scale_of(Dtype::BF16, Fp8Kind::E4M3Fn, &[1e-30]).is_ok());
    }

    #[test]
    fn the_largest_magnitude_maps_to_the_largest_code() {
        for kind in [Fp8Kind::E4M3Fn, Fp8Kind::E5M2] {
            for d in [Dtype::BF16, Dtype::F16, Dtype::F32] {
                let x = [0.5f32, -2.0, 0.25];
                let s = scale_of(d, kind, &x).unwrap();
                let q = quantize(d, kind, &x, s);
                assert_eq!(kind.decode(q[1]), -kind.max(), "{kind:?} {d}");
            }
        }
    }
}

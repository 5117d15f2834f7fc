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

/// The largest magnitude of BF16, F16 or F32 bytes, or an error when one
/// is NaN or infinite. Taken over the absolute bit patterns (their order is
/// the magnitudes' for finite values; NaN and infinity sort above them), so
/// the loop is an integer maximum the compiler vectorizes.
pub(crate) fn amax_of(d: Dtype, b: &[u8]) -> Result<f32> {
    let (amax, finite) = match d {
        Dtype::BF16 | Dtype::F16 => {
            let m = b
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7FFF)
                .fold(0u16, u16::max);
            if d == Dtype::BF16 {
                (f32_from_bf16_bits(m), m < 0x7F80)
            } else {
                (f32_from_f16_bits(m), m < 0x7C00)
            }
        }
        Dtype::F32 => {
            let m = b
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7FFF_FFFF)
                .fold(0u32, u32::max);
            (f32::from_bits(m), m < 0x7F80_0000)
        }
        d => {
            return Err(Error::layout(format!(
                "a ComfyUI weight is BF16, F16 or F32, not {d}"
            )))
        }
    };
    if !finite {
        return Err(Error::layout(
            "the weight holds NaN or infinity, which a per-tensor FP8 scale cannot hold \
             (comfy-kitchen would write NaN codes); fix the weights first",
        ));
    }
    Ok(amax)
}

/// The per-tensor scale comfy-kitchen computes for weights of dtype `d`
/// whose largest magnitude is `amax` (`amax / finfo(T).max`, computed in
/// `d`), as the F32 it stores. An all-zero weight gets 1.0 where the
/// library's 0 would make every code NaN (spec/layouts.md §5.2: a
/// deliberate difference).
pub(crate) fn scale_for(d: Dtype, kind: Fp8Kind, amax: f32) -> Result<f32> {
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

/// [`scale_for`] of f32 values (the values of a `d` tensor).
#[cfg(test)]
pub(crate) fn scale_of(d: Dtype, kind: Fp8Kind, x: &[f32]) -> Result<f32> {
    let b: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    scale_for(d, kind, amax_of(Dtype::F32, &b)?)
}

/// Quantizes weights `x` of dtype `d` with scale `s` (comfy-kitchen's
/// `quantize_per_tensor_fp8`): `q = fp8(clamp(rne_d(x · rne_d(1 / s)), ±max))`.
/// The element-by-element statement of [`quantize_bytes`].
#[cfg(test)]
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

/// [`quantize`] straight from the weight's finite BF16, F16 or F32 bytes,
/// with the dtype and format resolved once, outside the loop.
pub(crate) fn quantize_bytes(d: Dtype, kind: Fp8Kind, b: &[u8], s: f32) -> Result<Vec<u8>> {
    codes_times(d, kind, b, round_to(d, 1.0 / s), true)
}

/// The FP8 codes `fp8(clamp(x · inv, ±max))` of finite BF16, F16 or F32
/// bytes `b`, the product rounded to `d` when `in_d` (comfy-kitchen's ops
/// in the model dtype), else kept in f32 (convert-to-quant's f32 math).
fn codes_times(d: Dtype, kind: Fp8Kind, b: &[u8], inv: f32, in_d: bool) -> Result<Vec<u8>> {
    let max = kind.max();
    fn run<const N: usize>(
        b: &[u8],
        widen: impl Fn([u8; N]) -> f32,
        round: impl Fn(f32) -> f32,
        encode: impl Fn(f32) -> u8,
        inv: f32,
        max: f32,
    ) -> Vec<u8> {
        // in blocks through a stack buffer: both loops are plain arithmetic
        // over arrays, which the compiler vectorizes
        const BLOCK: usize = 256;
        let mut out = vec![0u8; b.len() / N];
        let mut tmp = [0f32; BLOCK];
        for (o, c) in out.chunks_mut(BLOCK).zip(b.chunks(BLOCK * N)) {
            for (t, e) in tmp.iter_mut().zip(c.chunks_exact(N)) {
                let mut a = [0u8; N];
                a.copy_from_slice(e);
                *t = widen(a);
            }
            for (q, &t) in o.iter_mut().zip(tmp.iter()) {
                *q = encode(round(t * inv).clamp(-max, max));
            }
        }
        out
    }
    let bf16 = |a: [u8; 2]| f32_from_bf16_bits(u16::from_le_bytes(a));
    let f16 = |a: [u8; 2]| f32_from_f16_bits(u16::from_le_bytes(a));
    let f32v = f32::from_le_bytes;
    // the weights are finite (amax_of), the products at most infinite
    let rb = crate::float::round_bf16_non_nan;
    let rh = crate::float::round_f16_non_nan;
    let id = |x: f32| x;
    let e4 = |x: f32| Fp8Kind::E4M3Fn.encode(x);
    let e5 = |x: f32| Fp8Kind::E5M2.encode(x);
    Ok(match (d, kind) {
        (Dtype::BF16, Fp8Kind::E5M2) if !in_d => run(b, bf16, id, e5, inv, max),
        (Dtype::BF16, _) if !in_d => run(b, bf16, id, e4, inv, max),
        (Dtype::F16, Fp8Kind::E5M2) if !in_d => run(b, f16, id, e5, inv, max),
        (Dtype::F16, _) if !in_d => run(b, f16, id, e4, inv, max),
        (Dtype::BF16, Fp8Kind::E5M2) => run(b, bf16, rb, e5, inv, max),
        (Dtype::BF16, _) => run(b, bf16, rb, e4, inv, max),
        (Dtype::F16, Fp8Kind::E5M2) => run(b, f16, rh, e5, inv, max),
        (Dtype::F16, _) => run(b, f16, rh, e4, inv, max),
        (Dtype::F32, Fp8Kind::E5M2) => run(b, f32v, id, e5, inv, max),
        (Dtype::F32, _) => run(b, f32v, id, e4, inv, max),
        (d, _) => {
            return Err(Error::layout(format!(
                "a ComfyUI weight is BF16, F16 or F32, not {d}"
            )))
        }
    })
}

/// Quantizes a weight of dtype `d` to ComfyUI's legacy scaled-FP8 form as
/// convert-to-quant 1.3.4's simple per-tensor path does, all in f32
/// (spec/layouts.md §5.4): `a = max(amax, 1e-12)`, `m = f32(f32(1 / a) ·
/// 448)` (torch's `448 / a` is a reciprocal times 448: two roundings),
/// codes `e4m3(clamp(f32(x · m), ±448))`, stored scale `f32(1 / m)`; an
/// all-zero weight gets zero codes and scale 1. Returns the codes and the
/// stored scale.
pub(crate) fn legacy_quantize(d: Dtype, b: &[u8]) -> Result<(Vec<u8>, f32)> {
    let amax = amax_of(d, b)?;
    if amax == 0.0 {
        return Ok((vec![0u8; b.len() / d.size().max(1)], 1.0));
    }
    let m = (1.0 / amax.max(1e-12)) * 448.0;
    Ok((codes_times(d, Fp8Kind::E4M3Fn, b, m, false)?, 1.0 / m))
}

/// Dequantizes codes with their stored scale to `to` (comfy-kitchen's
/// `dequantize_per_tensor_fp8`): `w = rne_to(to(q) · rne_to(s))`, the scale
/// rounded to the output dtype before the product.
/// Each of the 256 codes' outputs is made once, so every element is one
/// table lookup straight into the output bytes.
pub(crate) fn dequantize(kind: Fp8Kind, q: &[u8], s: f32, to: Dtype) -> Result<Vec<u8>> {
    let s = round_to(to, s);
    fn run<const N: usize>(q: &[u8], table: impl Fn(u8) -> [u8; N]) -> Vec<u8> {
        let t: Vec<[u8; N]> = (0..=255u8).map(table).collect();
        // every element is written below: a reused buffer's old bytes go
        let mut out = crate::io::pool::take(q.len() * N);
        for (&c, o) in q.iter().zip(out.chunks_exact_mut(N)) {
            o.copy_from_slice(&t[usize::from(c)]);
        }
        out
    }
    let v = |c: u8| kind.decode(c) * s;
    Ok(match to {
        Dtype::BF16 => run(q, |c| crate::float::bf16_bits_from_f32(v(c)).to_le_bytes()),
        Dtype::F16 => run(q, |c| crate::float::f16_bits_from_f32(v(c)).to_le_bytes()),
        Dtype::F32 => run(q, |c| v(c).to_le_bytes()),
        d => return Err(Error::layout(format!("{d} is not a float dtype"))),
    })
}

/// The smallest positive normal of `d` (`torch.finfo(d).tiny`).
fn tiny(d: Dtype) -> f32 {
    match d {
        Dtype::F16 => 6.103_515_6e-5,
        _ => f32::MIN_POSITIVE,
    }
}

/// comfy-kitchen's `int8_tensorwise` scales for weights `x` `[rows, cols]`
/// of dtype `d`: one for the tensor, or one per row (`per_row`), each
/// `max(amax / 127, 1e-30)` computed in f32 and stored as F32.
pub(crate) fn int8_scales(x: &[f32], cols: usize, per_row: bool) -> Result<Vec<f32>> {
    if x.iter().any(|v| !v.is_finite()) {
        return Err(Error::layout(
            "the weight holds NaN or infinity, which an int8 scale cannot hold; fix the \
             weights first",
        ));
    }
    let amax = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = |a: f32| (a / 127.0).max(1e-30);
    Ok(if per_row {
        x.chunks(cols.max(1)).map(|r| scale(amax(r))).collect()
    } else {
        vec![scale(amax(x))]
    })
}

/// Quantizes weights `x` `[rows, cols]` of dtype `d` with their stored
/// scales (comfy-kitchen's `quantize_int8_tensorwise` / `_rowwise`): `s' =
/// d(s)` (the smallest normal of `d` if that is 0), `t = d(x / s')`, `q =
/// clamp(round_half_even(t), -128, 127)`: with BF16 or F16 `t` can reach
/// ±127.5, so -128 occurs.
pub(crate) fn int8_quantize(d: Dtype, x: &[f32], cols: usize, scales: &[f32]) -> Vec<u8> {
    let per_row = scales.len() > 1;
    let rounded: Vec<f32> = scales
        .iter()
        .map(|&s| match round_to(d, s) {
            0.0 => tiny(d),
            r => r,
        })
        .collect();
    x.iter()
        .enumerate()
        .map(|(k, &v)| {
            let s = rounded[if per_row { k / cols.max(1) } else { 0 }];
            let t = round_to(d, v / s);
            t.round_ties_even().clamp(-128.0, 127.0) as i8 as u8
        })
        .collect()
}

/// Dequantizes int8 codes `[rows, cols]` with their F32 scales to `to`
/// (comfy-kitchen's `dequantize_int8_simple_dtype`): `w = to(f32(q) · s)`.
pub(crate) fn int8_dequantize(q: &[u8], cols: usize, scales: &[f32], to: Dtype) -> Result<Vec<u8>> {
    let rows = q.len() / cols.max(1);
    if scales.is_empty() || (scales.len() > 1 && scales.len() != rows) {
        return Err(Error::layout(format!(
            "{} scales for {rows} rows of codes: one, or one per row",
            scales.len()
        )));
    }
    let per_row = scales.len() > 1;
    let v: Vec<f32> = q
        .iter()
        .enumerate()
        .map(|(k, &c)| {
            let s = scales[if per_row { k / cols.max(1) } else { 0 }];
            round_to(to, c as i8 as f32 * s)
        })
        .collect();
    narrow(to, &v)
}

/// comfy-kitchen's `H_4` (`int8_utils._build_hadamard`), unnormalized:
/// `H_n` is its Kronecker power divided by `sqrt(n)`.
const H4: [[i8; 4]; 4] = [[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]];

/// The signs of `H_n` (row-major, `n` x `n`): the product of `H_4`'s
/// entries over the base-4 digits of the row and column.
fn hadamard_signs(n: usize) -> Vec<bool> {
    let mut out = Vec::with_capacity(n * n);
    for j in 0..n {
        for i in 0..n {
            let (mut a, mut b, mut neg) = (j, i, false);
            while a > 0 || b > 0 {
                neg ^= H4[a % 4][b % 4] < 0;
                a /= 4;
                b /= 4;
            }
            out.push(neg);
        }
    }
    out
}

/// The terms of one output summed per block of this many inputs, the
/// block sums then added in order: the order of the f32 matrix product
/// comfy-kitchen's dequantizer runs on the pinned torch (spec/layouts.md
/// §5.6).
const CONVROT_SUM_BLOCK: usize = 128;

/// Dequantizes ConvRot codes `[rows, cols]` (int8 codes of the rotated
/// weight, one F32 scale per row) to `to` as comfy-kitchen's
/// `dequantize_int8_convrot_weight_dtype` computes it: per group of `n`
/// columns, `x = f32(q) · s` (rounded to f32), `W = x · H_nᵀ` as an f32
/// matrix product (each product exact: `H_n`'s entries are `±2^-log4(n)`;
/// the sums rounded in the library's order: ascending, per block of 128
/// inputs), then rounded to `to`. Another BLAS build may sum in another
/// order: the reference is reproduced within its own rounding, which is why
/// ConvRot is the one layout compared within 1 ulp.
pub(crate) fn convrot_dequantize(
    q: &[u8],
    cols: usize,
    scales: &[f32],
    n: usize,
    to: Dtype,
) -> Result<Vec<u8>> {
    let rows = q.len() / cols.max(1);
    let big = n as u64 > super::MAX_CONVROT_GROUP;
    if n < 4 || big || !cols.is_multiple_of(n) || scales.len() != rows || rows * cols != q.len() {
        return Err(Error::layout(format!(
            "{} ConvRot codes, {} scales: not [rows, cols] with one scale per row and cols a \
             multiple of the group size {n}",
            q.len(),
            scales.len()
        )));
    }
    let unit = 2f32.powi(-((n.trailing_zeros() / 2) as i32)); // 1 / sqrt(n)
    let signs = hadamard_signs(n);
    let mut v = Vec::with_capacity(q.len());
    let (mut x, mut total, mut acc) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    for (row, &s) in q.chunks_exact(cols).zip(scales) {
        for grp in row.chunks_exact(n) {
            for (d, &c) in x.iter_mut().zip(grp) {
                *d = f32::from(c as i8) * s;
            }
            // all outputs at once, each summing its inputs in ascending
            // order: a rank-1 update per input, vectorized across outputs
            for (b, block) in x.chunks(CONVROT_SUM_BLOCK).enumerate() {
                acc.iter_mut().for_each(|a| *a = 0.0);
                for (k, &xi) in block.iter().enumerate() {
                    let i = b * CONVROT_SUM_BLOCK + k;
                    let (pos, neg) = (xi * unit, -(xi * unit));
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a += if signs[j * n + i] { neg } else { pos };
                    }
                }
                if b == 0 {
                    total.copy_from_slice(&acc);
                } else {
                    total.iter_mut().zip(&acc).for_each(|(t, a)| *t += a);
                }
            }
            v.extend(total.iter().map(|&y| round_to(to, y)));
        }
    }
    narrow(to, &v)
}

/// Where block scale `(r, c)` sits in a swizzled scale tensor of `cp`
/// columns (a multiple of 4): cuBLAS' 128 x 4 block-scaling layout, which
/// comfy-kitchen's `to_blocked` writes for MXFP8 and NVFP4,
/// `((r/128)·(cp/4) + c/4)·512 + (r%32)·16 + ((r%128)/32)·4 + c%4`.
pub(crate) fn swizzle_at(r: usize, c: usize, cp: usize) -> usize {
    ((r / 128) * (cp / 4) + c / 4) * 512 + (r % 32) * 16 + ((r % 128) / 32) * 4 + c % 4
}

/// The value of an E8M0 scale byte as comfy-kitchen's `e8m0_to_f32`
/// decodes it: `2^(b - 127)`, but **byte 0 is 0.0** (not 2^-127) and byte
/// 255 is infinity.
pub(crate) fn comfy_e8m0(b: u8) -> f32 {
    match b {
        0 => 0.0,
        255 => f32::INFINITY,
        b => f32::from_bits(u32::from(b) << 23),
    }
}

/// Dequantizes MXFP8 (comfy-kitchen's `dequantize_mxfp8`): the stored
/// codes `stored` = `[R32, C32]`, the swizzled E8M0 scales `s` (cuBLAS'
/// 128 x 4 block-scaling layout), `w = to(f32(q) · sf)` per 32 elements
/// of a row, cropped to the logical `shape`. A scale byte 255 (infinity) is
/// refused, naming its block.
pub(crate) fn mxfp8_dequantize(
    q: &[u8],
    stored: &[u64],
    shape: &[u64],
    s: &[u8],
    to: Dtype,
) -> Result<Vec<u8>> {
    let (r32, c32) = match stored {
        [r, c] => (*r as usize, *c as usize),
        _ => return Err(Error::layout("mxfp8 codes are [R32, C32]")),
    };
    let (rows, cols) = match shape {
        [r, c] => (*r as usize, *c as usize),
        _ => return Err(Error::layout("an mxfp8 weight is [out, in]")),
    };
    let (gc, cp) = (c32 / 32, (c32 / 32).div_ceil(4) * 4);
    let rp = r32.div_ceil(128) * 128;
    if q.len() != r32 * c32 || s.len() != rp * cp || rows > r32 || cols > c32 {
        return Err(Error::layout(format!(
            "{} mxfp8 codes and {} scales for a [{rows}, {cols}] weight stored as [{r32}, {c32}]",
            q.len(),
            s.len()
        )));
    }
    let mut grid = Vec::with_capacity(r32 * gc);
    for r in 0..r32 {
        for c in 0..gc {
            let b = s[swizzle_at(r, c, cp)];
            if b == 255 {
                return Err(Error::layout(format!(
                    "the scale of row {r}, block {c} is E8M0 byte 255 (infinity): the \
                     checkpoint is damaged"
                )));
            }
            grid.push(comfy_e8m0(b));
        }
    }
    let full =
        crate::layout::blocks::dequantize(q, [r32, c32], [1, 32], &grid, to, |v, sc| v * sc)?;
    if (rows, cols) == (r32, c32) {
        return Ok(full);
    }
    let size = to.size();
    let mut out = Vec::with_capacity(rows * cols * size);
    for r in full.chunks_exact(c32 * size).take(rows) {
        out.extend_from_slice(&r[..cols * size]);
    }
    crate::io::pool::give(full);
    Ok(out)
}

/// Quantizes a `[r, c]` weight of dtype `d` to MXFP8 (comfy-kitchen's
/// `quantize_mxfp8` with its 32 x 32 padding): per 32 elements of a row,
/// `need = max(f32(amax) / 448, 2^-127)`, `e = clamp(ceil(log2_f32(need)) +
/// 127, 0, 254)`, codes `e4m3(clamp(f32(x) / 2^(e-127), ±448))`; an all-zero
/// block gets `e = 0` and zero codes. Returns the padded codes `[R32, C32]`
/// and the swizzled scale bytes. A non-zero block whose `amax` is at most
/// 448 · 2^-127 is refused: its scale would decode to 0 (the library then
/// writes saturated or NaN codes).
pub(crate) fn mxfp8_quantize(d: Dtype, x: &[u8], r: usize, c: usize) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut grid = Vec::with_capacity(r * c.div_ceil(32));
    let q = crate::layout::blocks::quantize(
        d,
        x,
        [r, c],
        [1, 32],
        |_, amax| {
            if amax == 0.0 {
                grid.push(0u8);
                return Ok(0.0); // the zero block's marker for `code`
            }
            let need = (amax / 448.0).max(2f32.powi(-127));
            let e = (((f64::from(need)).log2() as f32).ceil() as i32 + 127).clamp(0, 254);
            if e == 0 {
                return Err(Error::layout(format!(
                    "a block's largest magnitude {amax:e} is at most 448 · 2^-127: its E8M0 \
                     scale would decode to 0 (comfy-kitchen writes saturated or NaN codes)"
                )));
            }
            grid.push(e as u8);
            Ok(f32::from_bits((e as u32) << 23))
        },
        |v, sf| {
            if sf == 0.0 {
                0
            } else {
                Fp8Kind::E4M3Fn.encode((v / sf).clamp(-448.0, 448.0))
            }
        },
    )?;
    let (r32, c32) = (r.div_ceil(32) * 32, c.div_ceil(32) * 32);
    let mut codes = vec![0u8; r32 * c32];
    if c > 0 {
        for (row, out) in q.chunks_exact(c).zip(codes.chunks_exact_mut(c32)) {
            out[..c].copy_from_slice(row);
        }
    }
    let gc = c32 / 32;
    let (rp, cp) = (r32.div_ceil(128) * 128, gc.div_ceil(4) * 4);
    let mut sw = vec![0u8; rp * cp];
    for (i, &e) in grid.iter().enumerate() {
        sw[swizzle_at(i / gc.max(1), i % gc.max(1), cp)] = e;
    }
    Ok((codes, sw))
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
    fn int8_scales_codes_and_the_minus_128_code() {
        // per row: each row's amax / 127; a zero row gets 1e-30 and codes 0
        let x = [1.0f32, -2.0, 0.0, 0.0, 0.5, 0.25];
        let s = int8_scales(&x, 2, true).unwrap();
        assert_eq!(s, [2.0 / 127.0, 1e-30, 0.5 / 127.0]);
        let q = int8_quantize(Dtype::F32, &x, 2, &s);
        assert_eq!(
            q.iter().map(|&c| c as i8).collect::<Vec<_>>(),
            [64, -127, 0, 0, 127, 64]
        );
        // the stored scale rounded to bf16 can make |t| reach 127.5: -128
        // for some bf16 amax in [0.5, 1), never in f32 arithmetic
        let minus_128 = (0x3F00u16..0x3F80)
            .map(f32_from_bf16_bits)
            .filter(|&a| {
                let s = int8_scales(&[-a], 1, false).unwrap();
                int8_quantize(Dtype::BF16, &[-a], 1, &s)[0] as i8 == -128
            })
            .inspect(|&a| {
                let s = int8_scales(&[-a], 1, false).unwrap();
                assert_eq!(int8_quantize(Dtype::F32, &[-a], 1, &s)[0] as i8, -127);
            })
            .count();
        assert!(minus_128 > 0);
        // dequantize: one product in f32, then the output dtype
        let w = int8_dequantize(&[0x81], 1, &[0.5], Dtype::F32).unwrap();
        assert_eq!(f32::from_le_bytes(w[..4].try_into().unwrap()), -63.5);
        assert!(int8_scales(&[f32::NAN], 1, false).is_err());
        // scales that fit neither form are refused, not indexed past
        assert!(int8_dequantize(&[1, 2, 3, 4], 2, &[1.0, 2.0, 3.0], Dtype::F32).is_err());
        assert!(int8_dequantize(&[1, 2], 2, &[], Dtype::F32).is_err());
    }

    #[test]
    fn the_byte_quantizer_is_the_element_by_element_statement() {
        // every BF16 / F16 bit pattern that is finite, and varied F32 values
        for d in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            let b: Vec<u8> = match d {
                Dtype::F32 => (0..70_000u32)
                    .flat_map(|i| {
                        f32::from_bits(i.wrapping_mul(0x9E37_79B9) & 0xBFFF_FFFF).to_le_bytes()
                    })
                    .collect(),
                _ => (0..=u16::MAX).flat_map(|i| i.to_le_bytes()).collect(),
            };
            let x: Vec<f32> = widen(d, &b)
                .unwrap()
                .into_iter()
                .map(|v| if v.is_finite() { v } else { 0.0 })
                .collect();
            let b = narrow(d, &x).unwrap();
            for kind in [Fp8Kind::E4M3Fn, Fp8Kind::E5M2] {
                for s in [1.0f32, 0.001_953_125, 3.7e-3, 1.3e3] {
                    assert_eq!(
                        quantize_bytes(d, kind, &b, s).unwrap(),
                        quantize(d, kind, &x, s),
                        "{d} {kind:?} {s}"
                    );
                }
                let amax = amax_of(d, &b).unwrap();
                assert_eq!(amax, x.iter().fold(0f32, |m, v| m.max(v.abs())));
            }
        }
        assert!(amax_of(Dtype::BF16, &0x7F80u16.to_le_bytes()).is_err());
        assert!(amax_of(Dtype::F16, &0xFC00u16.to_le_bytes()).is_err());
        assert!(amax_of(Dtype::F32, &f32::NAN.to_le_bytes()).is_err());
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

//! comfy-kitchen 0.2.40's NVFP4 (`nvfp4`) arithmetic, re-stated op by op
//! (spec/layouts.md §5.8): E2M1 codes two to a byte (the even element in
//! the high nibble), one E4M3 scale per 16 elements of a row (swizzled like
//! MXFP8's), and one F32 multiplier `g` per tensor (`weight_scale_2`).

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::float::{bf16_bits_from_f32, f16_bits_from_f32, Fp8Kind};

use super::math::{round_to, swizzle_at};

/// Elements per scale.
pub(crate) const GROUP: usize = 16;

/// The E2M1 values of codes 0 to 7 (8 to 15 are their negatives).
const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// The largest E4M3 and E2M1 magnitudes: `g` maps a tensor's largest
/// magnitude to their product.
const E4M3_MAX: f32 = 448.0;
const E2M1_MAX: f32 = 6.0;

/// The stored shapes of an NVFP4 weight of logical shape `[r, c]`: the
/// packed codes `[R16, C16 / 2]` (each dimension rounded up to a multiple of
/// 16) and the swizzled scales `[roundup(R16, 128), roundup(C16 / 16, 4)]`.
pub(crate) fn shapes(r: u64, c: u64) -> (Vec<u64>, Vec<u64>) {
    let (r16, c16) = (r.div_ceil(16) * 16, c.div_ceil(16) * 16);
    (
        vec![r16, c16 / 2],
        vec![r16.div_ceil(128) * 128, (c16 / 16).div_ceil(4) * 4],
    )
}

/// The E2M1 code of `v` (already within ±6), rounding to nearest with ties
/// to the even code, the sign in bit 3 (so -0.0 is code 8), as
/// comfy-kitchen's `_f32_to_floatx_unpacked` does.
pub(crate) fn e2m1(v: f32) -> u8 {
    let a = v.abs();
    let m = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    m | (u8::from(v.is_sign_negative()) << 3)
}

/// The per-tensor multiplier of a weight of dtype `d` whose largest
/// magnitude is `amax`: `f32(d(amax / (448 · 6)))`, the division in f32 and
/// then rounded to `d`, as torch divides a `d` tensor by a number.
pub(crate) fn global_scale(d: Dtype, amax: f32) -> f32 {
    round_to(d, amax / (E4M3_MAX * E2M1_MAX))
}

/// Dequantizes NVFP4 (comfy-kitchen's `dequantize_nvfp4`): the packed codes
/// `q` (`stored` = `[R16, C16 / 2]`), the swizzled E4M3 scale bytes `s` and
/// the multiplier `g`, cropped to the logical `shape`. Per 16 elements of a
/// row `ts = to(to(g) · to(b8))`, and each element is `to(e2m1 · ts)`: the
/// scale product is rounded to the output dtype first, as the library's
/// ops in that dtype do. A NaN scale byte or a non-finite `g` is refused.
pub(crate) fn dequantize(
    q: &[u8],
    stored: &[u64],
    shape: &[u64],
    s: &[u8],
    g: f32,
    to: Dtype,
) -> Result<Vec<u8>> {
    let (r16, half) = match stored {
        [r, c] => (*r as usize, *c as usize),
        _ => return Err(Error::layout("nvfp4 codes are [R16, C16 / 2]")),
    };
    let (rows, cols) = match shape {
        [r, c] => (*r as usize, *c as usize),
        _ => return Err(Error::layout("an nvfp4 weight is [out, in]")),
    };
    let c16 = half * 2;
    let rp = r16.div_ceil(128) * 128;
    let cp = (c16 / GROUP).div_ceil(4) * 4;
    let fits = r16.checked_mul(half) == Some(q.len())
        && rp.checked_mul(cp) == Some(s.len())
        && rows <= r16
        && cols <= c16
        && c16 % GROUP == 0;
    if !fits {
        return Err(Error::layout(format!(
            "{} nvfp4 code bytes and {} scales for a [{rows}, {cols}] weight stored as \
             [{r16}, {half}]",
            q.len(),
            s.len()
        )));
    }
    if !g.is_finite() {
        return Err(Error::layout(format!(
            "the per-tensor scale (weight_scale_2) is {g}: the checkpoint is damaged"
        )));
    }
    let g = round_to(to, g);
    let mut lut = [0f32; 16];
    for (i, v) in lut.iter_mut().enumerate() {
        let m = round_to(to, E2M1[i & 7]);
        *v = if i & 8 != 0 { -m } else { m };
    }
    fn run<const N: usize>(
        q: &[u8],
        [rows, cols, half, cp]: [usize; 4],
        s: &[u8],
        scale: impl Fn(u8) -> f32,
        lut: &[f32; 16],
        enc: impl Fn(f32) -> [u8; N],
    ) -> Result<Vec<u8>> {
        let mut out = crate::io::pool::take(rows * cols * N);
        let mut vals = [[0u8; N]; 16];
        for (r, orow) in out
            .chunks_exact_mut((cols * N).max(1))
            .enumerate()
            .take(rows)
        {
            let qrow = &q[r * half..(r + 1) * half];
            for (b, oblk) in orow.chunks_mut(GROUP * N).enumerate() {
                let byte = s[swizzle_at(r, b, cp)];
                if byte & 0x7F == 0x7F {
                    return Err(Error::layout(format!(
                        "the scale of row {r}, block {b} is E4M3 NaN (byte {byte:#04x}): the \
                         checkpoint is damaged"
                    )));
                }
                let ts = scale(byte);
                for (v, l) in vals.iter_mut().zip(lut) {
                    *v = enc(l * ts);
                }
                let codes = &qrow[b * GROUP / 2..(b + 1) * GROUP / 2];
                for (pair, &c) in oblk.chunks_mut(2 * N).zip(codes) {
                    pair[..N].copy_from_slice(&vals[usize::from(c >> 4)]);
                    if pair.len() == 2 * N {
                        pair[N..].copy_from_slice(&vals[usize::from(c & 15)]);
                    }
                }
            }
        }
        Ok(out)
    }
    let dims = [rows, cols, half, cp];
    let scale = |b: u8| round_to(to, g * round_to(to, Fp8Kind::E4M3Fn.decode(b)));
    match to {
        Dtype::BF16 => run(q, dims, s, scale, &lut, |x| {
            bf16_bits_from_f32(x).to_le_bytes()
        }),
        Dtype::F16 => run(q, dims, s, scale, &lut, |x| {
            f16_bits_from_f32(x).to_le_bytes()
        }),
        Dtype::F32 => run(q, dims, s, scale, &lut, |x| x.to_le_bytes()),
        d => Err(Error::layout(format!(
            "an nvfp4 weight dequantizes to BF16, F16 or F32, not {d}"
        ))),
    }
}

/// Quantizes a `[r, c]` weight of dtype `d` to NVFP4 (comfy-kitchen's
/// `TensorCoreNVFP4Layout.quantize` and `quantize_nvfp4` with its 16 x 16
/// padding): `g` from the tensor's largest magnitude ([`global_scale`]);
/// per 16 elements of a row `b8 = e4m3(min(f32(amax) / 6 / g, 448))`,
/// `tot = g · b8`, codes `e2m1(clamp(f32(x) / tot, ±6))` (0 where `tot` is
/// 0). Returns the packed padded codes `[R16, C16 / 2]`, the swizzled scale
/// bytes and `g`. An all-zero weight gets `g = 0`, zero scales and codes
/// (the library divides 0 by 0 there).
pub(crate) fn quantize(d: Dtype, x: &[u8], r: usize, c: usize) -> Result<(Vec<u8>, Vec<u8>, f32)> {
    let amax = super::math::amax_of(d, x)?;
    let g = global_scale(d, amax);
    let mut grid = Vec::with_capacity(r * c.div_ceil(GROUP));
    let q = crate::layout::blocks::quantize(
        d,
        x,
        [r, c],
        [1, GROUP],
        |_, a| {
            // f32 ops; a NaN quotient (0 / 0) stays NaN as torch's clamp
            // keeps it: only a zero g gives one, and then every block is zero
            let b = a / E2M1_MAX / g;
            let b8 = if b.is_nan() {
                0
            } else {
                Fp8Kind::E4M3Fn.encode(b.min(E4M3_MAX))
            };
            grid.push(b8);
            Ok(g * Fp8Kind::E4M3Fn.decode(b8))
        },
        |v, tot| {
            if tot == 0.0 {
                0
            } else {
                e2m1((v / tot).clamp(-E2M1_MAX, E2M1_MAX))
            }
        },
    )?;
    let (r16, c16) = (r.div_ceil(GROUP) * GROUP, c.div_ceil(GROUP) * GROUP);
    let half = c16 / 2;
    let mut codes = vec![0u8; r16 * half];
    if c > 0 {
        for (row, out) in q.chunks_exact(c).zip(codes.chunks_exact_mut(half)) {
            for (o, pair) in out.iter_mut().zip(row.chunks(2)) {
                *o = pair[0] << 4 | pair.get(1).copied().unwrap_or(0);
            }
        }
    }
    let gc = c16 / GROUP;
    let (rp, cp) = (r16.div_ceil(128) * 128, gc.div_ceil(4) * 4);
    let mut sw = vec![0u8; rp * cp];
    for (i, &b) in grid.iter().enumerate() {
        sw[swizzle_at(i / gc.max(1), i % gc.max(1), cp)] = b;
    }
    Ok((codes, sw, g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e2m1_rounds_to_nearest_with_ties_to_the_even_code() {
        // every value of the format maps to its own code
        for (i, &v) in E2M1.iter().enumerate() {
            assert_eq!(e2m1(v), i as u8);
            assert_eq!(e2m1(-v), i as u8 | 8);
        }
        // ties go to the even code; just off a tie, to the nearer value
        for (v, code) in [
            (0.25, 0),
            (0.75, 2),
            (1.25, 2),
            (1.75, 4),
            (2.5, 4),
            (3.5, 6),
            (5.0, 6),
            (0.2500001, 1),
            (0.7499999, 1),
            (4.9999995, 6),
            (5.0000005, 7),
        ] {
            assert_eq!(e2m1(v), code, "{v}");
        }
        assert_eq!(e2m1(-0.0), 8);
    }

    #[test]
    fn quantize_then_dequantize_keeps_ragged_shapes_and_nibble_order() {
        // [3, 18]: one row band, two 16-blocks per row, the second ragged
        let (r, c) = (3usize, 18usize);
        let x: Vec<f32> = (0..r * c).map(|i| (i as f32 - 20.0) * 0.37).collect();
        let b: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (codes, sw, g) = quantize(Dtype::F32, &b, r, c).unwrap();
        let (qs, ss) = shapes(r as u64, c as u64);
        assert_eq!(qs, [16, 16]);
        assert_eq!(ss, [128, 4]);
        assert_eq!(codes.len(), 16 * 16);
        assert_eq!(sw.len(), 128 * 4);
        assert_eq!(g, x[r * c - 1] / 2688.0);
        // element 0 is in the high nibble of byte 0: -7.4 is the largest
        // magnitude, so its code is -6 (15)
        assert_eq!(codes[0] >> 4, 15);
        let w = dequantize(&codes, &qs, &[r as u64, c as u64], &sw, g, Dtype::F32).unwrap();
        assert_eq!(w.len(), r * c * 4);
        for (i, e) in w.chunks_exact(4).enumerate() {
            let have = f32::from_le_bytes(e.try_into().unwrap());
            // within half the widest E2M1 step (4 to 6) of the block's unit
            // amax / 6, give or take the E4M3 rounding of that unit
            let row = &x[i / c * c..(i / c + 1) * c];
            let blk = &row[(i % c) / 16 * 16..((i % c) / 16 * 16 + 16).min(c)];
            let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                (have - x[i]).abs() <= amax / 6.0 * 1.07,
                "{i}: {have} vs {}",
                x[i]
            );
        }
        // padding columns 18..32 of each row and rows 3..16 are zero codes
        assert!(codes[9..16].iter().all(|&b| b == 0));
        assert!(codes[3 * 16..].iter().all(|&b| b == 0));
    }

    #[test]
    fn an_all_zero_weight_is_zero_and_nan_scales_are_refused() {
        let b = vec![0u8; 16 * 16 * 2];
        let (codes, sw, g) = quantize(Dtype::BF16, &b, 16, 16).unwrap();
        assert_eq!(g, 0.0);
        assert!(codes.iter().all(|&c| c == 0) && sw.iter().all(|&s| s == 0));
        let w = dequantize(&codes, &[16, 8], &[16, 16], &sw, g, Dtype::BF16).unwrap();
        assert!(w.iter().all(|&v| v == 0));
        let mut bad = sw.clone();
        bad[0] = 0x7F;
        assert!(dequantize(&codes, &[16, 8], &[16, 16], &bad, 1.0, Dtype::BF16).is_err());
        assert!(dequantize(&codes, &[16, 8], &[16, 16], &sw, f32::NAN, Dtype::BF16).is_err());
        // a scale grid of the wrong size is an error, not a panic
        assert!(dequantize(&codes, &[16, 8], &[16, 16], &sw[1..], 1.0, Dtype::BF16).is_err());
        assert!(dequantize(&codes, &[16, 8], &[17, 16], &sw, 1.0, Dtype::BF16).is_err());
    }
}

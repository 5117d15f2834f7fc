//! Block FP8 arithmetic (spec/layouts.md §6.2), op by op as the references
//! round: dequantizing is DeepSeek's `weight_dequant` (the f32 product of
//! the code and its block's scale, stored to the model dtype), quantizing
//! is transformers' fine-grained FP8 quantizer (`Fp8Quantize`) with the
//! ragged edge blocks taken as if zero-padded.

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::float::{bf16_bits_from_f32, f16_bits_from_f32, Fp8Kind};

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

/// The byte size of an `n` x `k` tensor of `size`-byte elements.
fn bytes_of(n: usize, k: usize, size: usize) -> Result<usize> {
    n.checked_mul(k)
        .and_then(|v| v.checked_mul(size))
        .ok_or_else(|| Error::layout(format!("a [{n}, {k}] weight is too large")))
}

/// Dequantizes E4M3 codes `q` ([n, k], row-major) with their block scales
/// `s` ([ceil(n/bh), ceil(k/bw)], positive and finite) to `to`:
/// `w = rne_to(f32(q) · s)`. Each block's 256 possible outputs are made
/// once, so every element is one table lookup.
pub(crate) fn dequantize(
    q: &[u8],
    [n, k]: [usize; 2],
    [bh, bw]: [usize; 2],
    s: &[f32],
    to: Dtype,
) -> Result<Vec<u8>> {
    let gc = k.div_ceil(bw.max(1));
    let gr = n.div_ceil(bh.max(1));
    if q.len() != bytes_of(n, k, 1)? || s.len() != gr * gc || bh == 0 || bw == 0 {
        return Err(Error::layout(format!(
            "{} codes and {} scales for a [{n}, {k}] weight in blocks of {bh} x {bw}",
            q.len(),
            s.len()
        )));
    }
    fn run<const N: usize>(
        q: &[u8],
        [n, k]: [usize; 2],
        [bh, bw]: [usize; 2],
        s: &[f32],
        enc: impl Fn(f32) -> [u8; N],
    ) -> Vec<u8> {
        // every element is written below: a reused buffer's old bytes go
        let mut out = crate::io::pool::take(n * k * N);
        if n == 0 || k == 0 {
            return out;
        }
        let gc = k.div_ceil(bw);
        let dec = Fp8Kind::E4M3Fn.decode_table();
        let mut tables: Vec<[[u8; N]; 256]> = vec![[[0u8; N]; 256]; gc];
        for (rb, (rows, orows)) in q.chunks(bh * k).zip(out.chunks_mut(bh * k * N)).enumerate() {
            for (t, &sc) in tables.iter_mut().zip(&s[rb * gc..(rb + 1) * gc]) {
                for (e, &v) in t.iter_mut().zip(dec.iter()) {
                    *e = enc(v * sc);
                }
            }
            for (row, orow) in rows.chunks(k).zip(orows.chunks_mut(k * N)) {
                for ((qc, oc), t) in row.chunks(bw).zip(orow.chunks_mut(bw * N)).zip(&tables) {
                    for (&c, e) in qc.iter().zip(oc.chunks_exact_mut(N)) {
                        e.copy_from_slice(&t[usize::from(c)]);
                    }
                }
            }
        }
        out
    }
    let shape = [n, k];
    let block = [bh, bw];
    Ok(match to {
        Dtype::BF16 => run(q, shape, block, s, |x| bf16_bits_from_f32(x).to_le_bytes()),
        Dtype::F16 => run(q, shape, block, s, |x| f16_bits_from_f32(x).to_le_bytes()),
        Dtype::F32 => run(q, shape, block, s, |x| x.to_le_bytes()),
        d => {
            return Err(Error::layout(format!(
                "a block FP8 weight dequantizes to BF16, F16 or F32, not {d}"
            )))
        }
    })
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

/// The values of `n` x `k` BF16, F16 or F32 bytes, widened exactly.
fn widen_into(d: Dtype, b: &[u8], out: &mut Vec<f32>) -> Result<()> {
    out.clear();
    match d {
        Dtype::BF16 => out.extend(
            b.chunks_exact(2)
                .map(|c| crate::float::f32_from_bf16_bits(u16::from_le_bytes([c[0], c[1]]))),
        ),
        Dtype::F16 => out.extend(
            b.chunks_exact(2)
                .map(|c| crate::float::f32_from_f16_bits(u16::from_le_bytes([c[0], c[1]]))),
        ),
        Dtype::F32 => out.extend(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        d => {
            return Err(Error::layout(format!(
                "block FP8 quantizes BF16, F16 or F32 weights, not {d}"
            )))
        }
    }
    Ok(())
}

/// Quantizes a [n, k] weight of dtype `d` (its bytes `x`) in blocks of
/// `bh` x `bw`: per block `q = e4m3(clamp(f32(x) · k, ±448))` with `k`
/// and the stored inverse from [`block_scale`] over the block's own
/// elements (a ragged edge block is the zero-padded block: padding never
/// changes its largest magnitude). Returns the codes and the scales as
/// F32, or with `ue8m0` E8M0, bytes. Works a band of `bh` rows at a time.
pub(crate) fn quantize(
    d: Dtype,
    x: &[u8],
    [n, k]: [usize; 2],
    [bh, bw]: [usize; 2],
    ue8m0: bool,
) -> Result<(Vec<u8>, Vec<u8>)> {
    if bh == 0 || bw == 0 || x.len() != bytes_of(n, k, d.size())? {
        return Err(Error::layout(format!(
            "{} bytes for a [{n}, {k}] {d} weight in blocks of {bh} x {bw}",
            x.len()
        )));
    }
    let mut q = vec![0u8; n * k];
    let gc = k.div_ceil(bw);
    let gr = n.div_ceil(bh);
    let mut inv_out = Vec::with_capacity(gr * gc * if ue8m0 { 1 } else { 4 });
    if n == 0 || k == 0 {
        return Ok((q, inv_out));
    }
    let mut band = Vec::new();
    let mut amax = vec![0u32; gc];
    let mut mul = vec![0f32; gc];
    let e4 = |v: f32| Fp8Kind::E4M3Fn.encode(v);
    for (rb, (xb, qb)) in x
        .chunks(bh * k * d.size())
        .zip(q.chunks_mut(bh * k))
        .enumerate()
    {
        widen_into(d, xb, &mut band)?;
        // the largest magnitude of each block, over absolute bit patterns
        // (NaN and infinity sort above every finite value)
        amax.iter_mut().for_each(|a| *a = 0);
        for row in band.chunks(k) {
            for (c, a) in row.chunks(bw).zip(amax.iter_mut()) {
                *a = c
                    .iter()
                    .map(|v| v.to_bits() & 0x7FFF_FFFF)
                    .fold(*a, u32::max);
            }
        }
        for (cb, (a, m)) in amax.iter().zip(mul.iter_mut()).enumerate() {
            if *a >= 0x7F80_0000 {
                return Err(Error::layout(format!(
                    "block ({rb}, {cb}) of the weight holds NaN or infinity, which no FP8 \
                     scale can hold; fix the weights first"
                )));
            }
            let (kk, inv) =
                block_scale(f32::from_bits(*a), ue8m0).map_err(|e| match e.into_kind() {
                    crate::ErrorKind::Layout(m) => {
                        Error::layout(format!("block ({rb}, {cb}): {m}"))
                    }
                    k => Error::new(k),
                })?;
            *m = kk;
            if ue8m0 {
                inv_out.push((inv.to_bits() >> 23) as u8);
            } else {
                inv_out.extend_from_slice(&inv.to_le_bytes());
            }
        }
        for (row, qrow) in band.chunks(k).zip(qb.chunks_mut(k)) {
            for ((c, qc), &m) in row.chunks(bw).zip(qrow.chunks_mut(bw)).zip(&mul) {
                for (o, &v) in qc.iter_mut().zip(c) {
                    *o = e4((v * m).clamp(-FP8_MAX, FP8_MAX));
                }
            }
        }
    }
    Ok((q, inv_out))
}

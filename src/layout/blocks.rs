//! FP8 E4M3 codes with one scale per block of a `[n, k]` weight: the two
//! loops every block-scaled layout shares (a tensor, a row, a group of a
//! row and a tile are all blocks). Each family states its own arithmetic
//! through the closures: how a block's scale follows from its largest
//! magnitude, how an element becomes a code, how a code and its scale
//! round to the output.

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::float::{bf16_bits_from_f32, f16_bits_from_f32, Fp8Kind};

/// The byte size of an `n` x `k` tensor of `size`-byte elements.
fn bytes_of(n: usize, k: usize, size: usize) -> Result<usize> {
    n.checked_mul(k)
        .and_then(|v| v.checked_mul(size))
        .ok_or_else(|| Error::layout(format!("a [{n}, {k}] weight is too large")))
}

/// Dequantizes E4M3 codes `q` ([n, k], row-major) with one scale per `bh`
/// x `bw` block (`s`, [ceil(n/bh), ceil(k/bw)] row-major) to `to`: each
/// element is `to(value(decode(q), s))`. A block's 256 possible outputs
/// are made once, so every element is one table lookup, written into a
/// buffer reused from tensor to tensor.
pub(crate) fn dequantize(
    q: &[u8],
    [n, k]: [usize; 2],
    [bh, bw]: [usize; 2],
    s: &[f32],
    to: Dtype,
    value: impl Fn(f32, f32) -> f32 + Copy,
) -> Result<Vec<u8>> {
    let gc = k.div_ceil(bw.max(1));
    let gr = n.div_ceil(bh.max(1));
    if bh == 0 || bw == 0 || q.len() != bytes_of(n, k, 1)? || s.len() != gr * gc {
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
        value: impl Fn(f32, f32) -> f32,
        enc: impl Fn(f32) -> [u8; N],
    ) -> Vec<u8> {
        // every element is written below: a reused buffer's old bytes go
        let mut out = crate::io::pool::take(n * k * N);
        if n == 0 || k == 0 {
            return out;
        }
        let gc = k.div_ceil(bw);
        let dec = Fp8Kind::E4M3Fn.decode_table();
        if bh * bw < 256 {
            // blocks smaller than a table (groups of 32, MXFP8's rows of 32):
            // element by element, with no memory beyond the output
            for (r, (row, orow)) in q.chunks(k).zip(out.chunks_mut(k * N)).enumerate() {
                let srow = &s[(r / bh) * gc..(r / bh + 1) * gc];
                for ((qc, oc), &sc) in row.chunks(bw).zip(orow.chunks_mut(bw * N)).zip(srow) {
                    for (&c, e) in qc.iter().zip(oc.chunks_exact_mut(N)) {
                        e.copy_from_slice(&enc(value(dec[usize::from(c)], sc)));
                    }
                }
            }
            return out;
        }
        // one table of 256 outputs per block of a band: at most 256 · N bytes
        // per block of at least 256 elements, so never more than the output
        let mut tables: Vec<[[u8; N]; 256]> = vec![[[0u8; N]; 256]; gc];
        for (rb, (rows, orows)) in q.chunks(bh * k).zip(out.chunks_mut(bh * k * N)).enumerate() {
            for (t, &sc) in tables.iter_mut().zip(&s[rb * gc..(rb + 1) * gc]) {
                for (e, &v) in t.iter_mut().zip(dec.iter()) {
                    *e = enc(value(v, sc));
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
    let (shape, block) = ([n, k], [bh, bw]);
    Ok(match to {
        Dtype::BF16 => run(q, shape, block, s, value, |x| {
            bf16_bits_from_f32(x).to_le_bytes()
        }),
        Dtype::F16 => run(q, shape, block, s, value, |x| {
            f16_bits_from_f32(x).to_le_bytes()
        }),
        Dtype::F32 => run(q, shape, block, s, value, |x| x.to_le_bytes()),
        d => {
            return Err(Error::layout(format!(
                "an FP8 weight dequantizes to BF16, F16 or F32, not {d}"
            )))
        }
    })
}

/// The values of BF16, F16 or F32 bytes, widened exactly, into `out`.
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
                "FP8 quantizes BF16, F16 or F32 weights, not {d}"
            )))
        }
    }
    Ok(())
}

/// Quantizes a [n, k] weight of dtype `d` (its bytes `x`) to E4M3 codes,
/// one scale per `bh` x `bw` block (a ragged edge block is the block's own
/// elements: zero padding would not change its largest magnitude).
/// `scale(block, amax)` turns a block's largest magnitude into the value
/// `code(x, value)` quantizes each element with (and records whatever the
/// family stores); blocks come in row-major order. A block holding NaN or
/// infinity is refused, naming it. Works a band of `bh` rows at a time.
pub(crate) fn quantize(
    d: Dtype,
    x: &[u8],
    [n, k]: [usize; 2],
    [bh, bw]: [usize; 2],
    mut scale: impl FnMut([usize; 2], f32) -> Result<f32>,
    code: impl Fn(f32, f32) -> u8,
) -> Result<Vec<u8>> {
    if bh == 0 || bw == 0 || x.len() != bytes_of(n, k, d.size())? {
        return Err(Error::layout(format!(
            "{} bytes for a [{n}, {k}] {d} weight in blocks of {bh} x {bw}",
            x.len()
        )));
    }
    let mut q = vec![0u8; n * k];
    if n == 0 || k == 0 {
        return Ok(q);
    }
    let gc = k.div_ceil(bw);
    let mut band = Vec::new();
    let mut amax = vec![0u32; gc];
    let mut per = vec![0f32; gc];
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
        for (cb, (a, p)) in amax.iter().zip(per.iter_mut()).enumerate() {
            if *a >= 0x7F80_0000 {
                return Err(Error::layout(format!(
                    "block ({rb}, {cb}) of the weight holds NaN or infinity, which no FP8 \
                     scale can hold; fix the weights first"
                )));
            }
            *p = scale([rb, cb], f32::from_bits(*a)).map_err(|e| match e.into_kind() {
                crate::ErrorKind::Layout(m) => Error::layout(format!("block ({rb}, {cb}): {m}")),
                k => Error::new(k),
            })?;
        }
        for (row, qrow) in band.chunks(k).zip(qb.chunks_mut(k)) {
            for ((c, qc), &p) in row.chunks(bw).zip(qrow.chunks_mut(bw)).zip(&per) {
                for (o, &v) in qc.iter_mut().zip(c) {
                    *o = code(v, p);
                }
            }
        }
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both paths (a table per block, element by element for blocks
    /// smaller than a table) give `to(value(decode(q), s))` for every
    /// element, ragged edges included.
    #[test]
    fn dequantizing_is_the_element_by_element_statement_for_every_block_size() {
        let (n, k) = (37usize, 70usize);
        let q: Vec<u8> = (0..n * k).map(|i| (i * 131 % 251) as u8).collect();
        for block in [[1usize, 32usize], [16, 16], [128, 128], [5, 7], [n, k]] {
            let (gr, gc) = (n.div_ceil(block[0]), k.div_ceil(block[1]));
            let s: Vec<f32> = (0..gr * gc).map(|i| 0.5 + i as f32 * 0.25).collect();
            let got = dequantize(&q, [n, k], block, &s, Dtype::F32, |v, sc| v * sc).unwrap();
            for (i, w) in got.chunks_exact(4).enumerate() {
                let (r, c) = (i / k, i % k);
                let sc = s[(r / block[0]) * gc + c / block[1]];
                let want = Fp8Kind::E4M3Fn.decode(q[i]) * sc;
                let have = f32::from_le_bytes(w.try_into().unwrap());
                assert!(
                    have.to_bits() == want.to_bits() || (have.is_nan() && want.is_nan()),
                    "{block:?} [{r}, {c}]"
                );
            }
        }
        // scales that do not match the grid are an error, not a panic
        assert!(dequantize(&q, [n, k], [1, 32], &[1.0], Dtype::F32, |v, s| v * s).is_err());
    }
}

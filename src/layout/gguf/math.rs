//! ggml block (de)quantization, bit-identical to gguf-py 0.19.0's numpy code
//! (`gguf/quants.py`, numpy 2.4.6 on x86-64), spec/layouts.md §8.
//!
//! numpy evaluates every expression one operation at a time, each rounded to
//! `f32` (no fused multiply-add), so every formula below keeps `quants.py`'s
//! operations, their order and their grouping; Rust never contracts `a * b + c`.
//!
//! Where numpy's result depends on the machine rather than on IEEE 754, this
//! module reproduces numpy 2.4.6 on x86-64 (the machine the fixtures in
//! `tests/fixtures/gguf` were made on), on every host:
//!
//! * which NaN an operation with NaN operands returns (SSE: the first operand's,
//!   made quiet; `inf * 0`, `inf - inf` give the "default NaN" `0xFFC00000`),
//!   see [`Arith`];
//! * a float → `uint8`/`int8` cast of NaN or of a value out of range (C
//!   undefined behaviour; x86 truncates to `i32` and keeps the low byte), see
//!   [`np_cast_low_byte`];
//! * which zero `max`/`min` return when `+0.0` and `-0.0` tie, see [`NP_TIE_ORDER`].

use crate::float::FloatDtype;
use crate::format::gguf::GgmlType;

/// Elements per K-quant super-block (`QK_K`).
const QK_K: usize = 256;

/// The x86 "default NaN" (`0xFFC00000`): what SSE returns for an invalid
/// operation without NaN operands (`inf * 0`, `inf - inf`).
const DEFAULT_NAN_BITS: u32 = 0xFFC0_0000;

/// A type this module handles, with its geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `float32`, stored as is.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16 (the upper half of an `f32`).
    Bf16,
    /// 32 × 4-bit, scale.
    Q4_0,
    /// 32 × 4-bit, scale and minimum.
    Q4_1,
    /// 32 × 5-bit, scale.
    Q5_0,
    /// 32 × 5-bit, scale and minimum.
    Q5_1,
    /// 32 × 8-bit, scale.
    Q8_0,
    /// K-quant, 2-bit.
    Q2K,
    /// K-quant, 3-bit.
    Q3K,
    /// K-quant, 4-bit.
    Q4K,
    /// K-quant, 5-bit.
    Q5K,
    /// K-quant, 6-bit.
    Q6K,
}

impl Kind {
    /// The kind of a ggml type, checking the type table's geometry against
    /// this module's block layouts.
    fn of(t: GgmlType) -> Result<Kind, String> {
        let k = match t.name {
            "F32" => Kind::F32,
            "F16" => Kind::F16,
            "BF16" => Kind::Bf16,
            "Q4_0" => Kind::Q4_0,
            "Q4_1" => Kind::Q4_1,
            "Q5_0" => Kind::Q5_0,
            "Q5_1" => Kind::Q5_1,
            "Q8_0" => Kind::Q8_0,
            "Q2_K" => Kind::Q2K,
            "Q3_K" => Kind::Q3K,
            "Q4_K" => Kind::Q4K,
            "Q5_K" => Kind::Q5K,
            "Q6_K" => Kind::Q6K,
            other => return Err(format!("ggml type {other} is not supported")),
        };
        let (block, bytes) = k.geometry();
        if t.block != block as u64 || t.bytes != bytes as u64 {
            return Err(format!(
                "ggml type {}: the type table says {} elements in {} bytes per block, expected {block} in {bytes}",
                t.name, t.block, t.bytes
            ));
        }
        Ok(k)
    }

    /// (elements per block, bytes per block).
    fn geometry(self) -> (usize, usize) {
        match self {
            Kind::F32 => (1, 4),
            Kind::F16 | Kind::Bf16 => (1, 2),
            Kind::Q4_0 => (32, 18),
            Kind::Q4_1 => (32, 20),
            Kind::Q5_0 => (32, 22),
            Kind::Q5_1 => (32, 24),
            Kind::Q8_0 => (32, 34),
            Kind::Q2K => (QK_K, 84),
            Kind::Q3K => (QK_K, 110),
            Kind::Q4K => (QK_K, 144),
            Kind::Q5K => (QK_K, 176),
            Kind::Q6K => (QK_K, 210),
        }
    }
}

// ---------------------------------------------------------------------------
// Scalar conversions
// ---------------------------------------------------------------------------

/// numpy's `float16 → float32` (`astype(np.float32)`): exact; a NaN keeps its
/// sign and payload and is NOT made quiet (`0x7c01` → `0x7f802000`, checked on
/// numpy 2.4.6).
pub(crate) fn f32_from_f16_np(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x03ff);
    let bits = match exp {
        0 => {
            // zero or subnormal: man * 2^-24, exact in f32
            let mag = man as f32 * f32::from_bits(0x3380_0000);
            sign | mag.to_bits()
        }
        31 => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// numpy's `float32 → float16` (`astype(np.float16)`), as bits: round to
/// nearest even, overflow to ±inf (65520 → inf), underflow to subnormals or
/// signed zero (2^-25 → 0). A NaN keeps its sign and the top 10 payload bits
/// and is not made quiet (a payload that would vanish becomes 1:
/// `0x7f800001` → `0x7c01`), as numpy 2.4.6 does.
pub(crate) fn f16_bits_from_f32_np(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = (b >> 23) & 0xff;
    let man = b & 0x007f_ffff;
    if exp == 0xff {
        if man == 0 {
            return sign | 0x7c00;
        }
        let m = (man >> 13) as u16;
        return sign | 0x7c00 | if m == 0 { 1 } else { m };
    }
    if exp >= 143 {
        // |x| >= 2^16: beyond f16's largest finite value even before rounding
        return sign | 0x7c00;
    }
    if exp >= 113 {
        // f16 normal range (2^-14 <= |x| < 2^16): keep 10 mantissa bits, round
        // the other 13 to nearest even; a carry may go into the exponent, and
        // from 0x7bff into 0x7c00 = infinity, both correct.
        let mut h = ((exp - 112) << 10) | (man >> 13);
        let rem = man & 0x1fff;
        if rem > 0x1000 || (rem == 0x1000 && h & 1 == 1) {
            h += 1;
        }
        return sign | h as u16;
    }
    if exp < 102 {
        // |x| < 2^-25: rounds to zero
        return sign;
    }
    // f16 subnormal range: |x| = sig * 2^(exp-150), in units of 2^-24 that is
    // sig >> (126 - exp), shift in 14..=24
    let sig = man | 0x0080_0000;
    let shift = 126 - exp;
    let mut h = sig >> shift;
    let rem = sig & ((1u32 << shift) - 1);
    let half = 1u32 << (shift - 1);
    if rem > half || (rem == half && h & 1 == 1) {
        h += 1;
    }
    sign | h as u16
}

/// gguf-py's `float32 → bfloat16` (`quants.py` class `BF16.quantize_blocks`,
/// "same as ggml_compute_fp32_to_bf16"): a NaN becomes the quiet NaN with its
/// sign and top payload bits (`(n & 0xffff0000) | 0x00400000`), anything else
/// rounds to nearest even (the largest finite floats round to infinity).
pub(crate) fn bf16_bits_from_f32_gguf(x: f32) -> u16 {
    let mut n = x.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        n = (n & 0xffff_0000) | 0x0040_0000;
    }
    // in u64 as gguf-py does (the sum stays below 2^32 for every input anyway)
    ((u64::from(n) + 0x7fff + u64::from((n >> 16) & 1)) >> 16) as u16
}

/// numpy's float → `uint8`/`int8` cast as compiled on x86-64 (`cvttss2si`):
/// truncate toward zero to an integer and keep its low byte; NaN, ±inf and
/// values beyond ±2^31 give 0 (checked on numpy 2.4.6: NaN, ±inf, 3e9 → 0;
/// 300 → 44; -1 → 255). The cast is undefined behaviour in C, so another
/// platform's numpy may differ; Rust's own saturating `as` would give 255 for
/// +inf, hence this function. Finite `|v| >= 2^31` are multiples of 256 in
/// `f32`, so their low byte is 0 under any wider conversion as well.
fn np_cast_low_byte(v: f32) -> u8 {
    if v.abs() < 2_147_483_648.0 {
        (v as i32) as u8
    } else {
        0
    }
}

/// gguf-py's `np_roundf` (`quants.py`): round half away from zero, as
/// `sign(n) * (floor(|n|) + floor(2 * (|n| - floor(|n|))))`, op by op in `f32`
/// (NaN for NaN and ±inf: `inf - inf`).
fn np_roundf(n: f32) -> f32 {
    let a = n.abs();
    let floored = a.floor();
    let b = floored + (2.0 * (a - floored)).floor();
    np_sign(n) * b
}

/// `(floor(a), floor(a) as i32)` for `0 <= a < 2^23`, exactly, with float
/// additions only: `a + 2^23` rounds `a` to the nearest integer (the sum's ulp
/// is 1) and holds it in its low mantissa bits; one is taken off when that
/// rounded up. (Rust's `as i32` saturates, which does not vectorize on
/// baseline x86-64; this does.)
#[inline(always)]
fn floor_small(a: f32) -> (f32, i32) {
    const TWO_23: f32 = 8_388_608.0;
    let big = a + TWO_23;
    let near = big - TWO_23;
    // wrapping: no overflow for the inputs above, and no panic for others
    let k = (big.to_bits() as i32)
        .wrapping_sub(0x4b00_0000)
        .wrapping_sub(i32::from(near > a));
    (k as f32, k)
}

/// [`np_roundf`] for a finite `|n| < 2^23`, as an integer, without a libm
/// call: the truncation ([`floor_small`] of `|n|`) and the fraction
/// `|n| - trunc(|n|)` are exact there, and the half rounds away from zero as
/// `np_roundf` does. Branch-free (the sign is applied by the sign bit: `-0.0`
/// and `+0.0` both give 0), so loops over a block vectorize.
#[inline(always)]
fn round_half_away_small(n: f32) -> i32 {
    let a = n.abs();
    let (f, t) = floor_small(a);
    let r = t.wrapping_add(i32::from(a - f >= 0.5));
    // all ones for a negative n, else zero: (r ^ s) - s is r or -r
    let s = (n.to_bits() as i32) >> 31;
    (r ^ s).wrapping_sub(s)
}

/// [`np_cast_low_byte`] for `0 <= v < 2^23`: the low byte of `trunc(v)`,
/// branch-free ([`floor_small`]).
#[inline(always)]
fn cast_low_byte_small(v: f32) -> u8 {
    floor_small(v).1 as u8
}

/// `np.sign` on `f32`: -1, 0 (the input zero), 1, or NaN for NaN.
fn np_sign(n: f32) -> f32 {
    if n > 0.0 {
        1.0
    } else if n < 0.0 {
        -1.0
    } else {
        n
    }
}

// ---------------------------------------------------------------------------
// Arithmetic with numpy's (x86 SSE) NaN results
// ---------------------------------------------------------------------------

/// One `f32` operation as numpy performs it. Results are plain IEEE 754 except
/// which NaN comes out, which IEEE leaves open: x86 SSE returns the first
/// operand if it is a NaN (made quiet), else the second (made quiet), else the
/// default NaN `0xFFC00000`. [`Fast`] is used for blocks whose scales are all
/// finite, where no NaN can arise; [`X86`] computes the x86 NaN explicitly (and
/// so is right on any host and whatever operand order LLVM picks).
trait Arith {
    /// `a * b`.
    fn mul(a: f32, b: f32) -> f32;
    /// `a + b`.
    fn add(a: f32, b: f32) -> f32;
    /// `a - b`.
    fn sub(a: f32, b: f32) -> f32;
}

/// Plain hardware arithmetic, for operands that cannot produce a NaN.
struct Fast;

impl Arith for Fast {
    #[inline(always)]
    fn mul(a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    fn add(a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    fn sub(a: f32, b: f32) -> f32 {
        a - b
    }
}

/// Arithmetic whose NaN results follow x86 SSE's rule (see [`Arith`]).
struct X86;

/// The NaN x86 SSE returns for `op(a, b)` when the IEEE result `r` is a NaN.
#[inline]
fn x86_nan(a: f32, b: f32, r: f32) -> f32 {
    if !r.is_nan() {
        r
    } else if a.is_nan() {
        f32::from_bits(a.to_bits() | 0x0040_0000)
    } else if b.is_nan() {
        f32::from_bits(b.to_bits() | 0x0040_0000)
    } else {
        f32::from_bits(DEFAULT_NAN_BITS)
    }
}

impl Arith for X86 {
    #[inline]
    fn mul(a: f32, b: f32) -> f32 {
        x86_nan(a, b, a * b)
    }
    #[inline]
    fn add(a: f32, b: f32) -> f32 {
        x86_nan(a, b, a + b)
    }
    #[inline]
    fn sub(a: f32, b: f32) -> f32 {
        x86_nan(a, b, a - b)
    }
}

// ---------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------

/// Reads the little-endian f16 at `b[i..i + 2]` as numpy widens it.
#[inline(always)]
fn f16_at<const N: usize>(b: &[u8; N], i: usize) -> f32 {
    f32_from_f16_np(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// Dequantizes `data` (a whole number of blocks of type `t`, any number of
/// rows back to back) into `out`, which must hold exactly
/// `data.len() / t.bytes * t.block` elements. Supported: F32, F16, BF16, Q4_0,
/// Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
///
/// Bit-identical to gguf-py 0.19.0 `gguf.quants.dequantize(data, t)` (numpy
/// 2.4.6, x86-64) including NaN payloads, infinities, signed zeros and
/// subnormals. `data` should be the whole tensor, as gguf-py dequantizes one
/// tensor in one numpy call: numpy adds `(d * q) + m` of a Q4_1/Q5_1 tensor of
/// exactly ONE block in the other operand order (its scalar-broadcast loop),
/// which shows only when both `d` and `m` of that block are NaN/inf; this
/// function does the same when `data` is exactly one block.
pub(crate) fn dequantize(t: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), String> {
    let kind = Kind::of(t)?;
    let (block, bytes) = kind.geometry();
    if !data.len().is_multiple_of(bytes) {
        return Err(format!(
            "{}: {} bytes are not a whole number of {bytes}-byte blocks",
            t.name,
            data.len()
        ));
    }
    let n_blocks = data.len() / bytes;
    let want = n_blocks
        .checked_mul(block)
        .ok_or_else(|| format!("{}: element count overflows", t.name))?;
    if out.len() != want {
        return Err(format!(
            "{}: {} bytes dequantize to {want} elements, the output holds {}",
            t.name,
            data.len(),
            out.len()
        ));
    }
    let single = n_blocks == 1;
    match kind {
        Kind::F32 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes(arr(c)?);
            }
        }
        Kind::F16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = f32_from_f16_np(u16::from_le_bytes(arr(c)?));
            }
        }
        Kind::Bf16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes(arr(c)?)) << 16);
            }
        }
        Kind::Q4_0 => each_block(data, out, |b: &[u8; 18], o: &mut [f32; 32]| {
            if f16_at(b, 0).is_finite() {
                deq_q4_0::<Fast>(b, o)
            } else {
                deq_q4_0::<X86>(b, o)
            }
        })?,
        Kind::Q4_1 => each_block(data, out, |b: &[u8; 20], o: &mut [f32; 32]| {
            if f16_at(b, 0).is_finite() && f16_at(b, 2).is_finite() {
                deq_q4_1::<Fast>(b, o, single)
            } else {
                deq_q4_1::<X86>(b, o, single)
            }
        })?,
        Kind::Q5_0 => each_block(data, out, |b: &[u8; 22], o: &mut [f32; 32]| {
            if f16_at(b, 0).is_finite() {
                deq_q5_0::<Fast>(b, o)
            } else {
                deq_q5_0::<X86>(b, o)
            }
        })?,
        Kind::Q5_1 => each_block(data, out, |b: &[u8; 24], o: &mut [f32; 32]| {
            if f16_at(b, 0).is_finite() && f16_at(b, 2).is_finite() {
                deq_q5_1::<Fast>(b, o, single)
            } else {
                deq_q5_1::<X86>(b, o, single)
            }
        })?,
        Kind::Q8_0 => each_block(data, out, |b: &[u8; 34], o: &mut [f32; 32]| {
            if f16_at(b, 0).is_finite() {
                deq_q8_0::<Fast>(b, o)
            } else {
                deq_q8_0::<X86>(b, o)
            }
        })?,
        Kind::Q2K => each_block(data, out, |b: &[u8; 84], o: &mut [f32; QK_K]| {
            if f16_at(b, 80).is_finite() && f16_at(b, 82).is_finite() {
                deq_q2_k::<Fast>(b, o)
            } else {
                deq_q2_k::<X86>(b, o)
            }
        })?,
        Kind::Q3K => each_block(data, out, |b: &[u8; 110], o: &mut [f32; QK_K]| {
            if f16_at(b, 108).is_finite() {
                deq_q3_k::<Fast>(b, o)
            } else {
                deq_q3_k::<X86>(b, o)
            }
        })?,
        Kind::Q4K => each_block(data, out, |b: &[u8; 144], o: &mut [f32; QK_K]| {
            if f16_at(b, 0).is_finite() && f16_at(b, 2).is_finite() {
                deq_q4_k::<Fast>(b, o)
            } else {
                deq_q4_k::<X86>(b, o)
            }
        })?,
        Kind::Q5K => each_block(data, out, |b: &[u8; 176], o: &mut [f32; QK_K]| {
            if f16_at(b, 0).is_finite() && f16_at(b, 2).is_finite() {
                deq_q5_k::<Fast>(b, o)
            } else {
                deq_q5_k::<X86>(b, o)
            }
        })?,
        Kind::Q6K => each_block(data, out, |b: &[u8; 210], o: &mut [f32; QK_K]| {
            if f16_at(b, 208).is_finite() {
                deq_q6_k::<Fast>(b, o)
            } else {
                deq_q6_k::<X86>(b, o)
            }
        })?,
    }
    Ok(())
}

/// A slice as a fixed-size array (an error, never a panic, on a length mismatch).
#[inline(always)]
fn arr<const N: usize>(c: &[u8]) -> Result<[u8; N], String> {
    c.try_into()
        .map_err(|_| format!("internal: chunk of {} bytes, expected {N}", c.len()))
}

/// Runs `f` on every block of `data` and its output elements; the lengths were
/// checked by the caller, so the conversions to arrays cannot fail.
#[inline(always)]
fn each_block<const B: usize, const E: usize>(
    data: &[u8],
    out: &mut [f32],
    mut f: impl FnMut(&[u8; B], &mut [f32; E]),
) -> Result<(), String> {
    for (b, o) in data.chunks_exact(B).zip(out.chunks_exact_mut(E)) {
        let b: &[u8; B] = b
            .try_into()
            .map_err(|_| format!("internal: block of {} bytes, expected {B}", b.len()))?;
        let n = o.len();
        let o: &mut [f32; E] = o
            .try_into()
            .map_err(|_| format!("internal: block of {n} elements, expected {E}"))?;
        f(b, o);
    }
    Ok(())
}

/// Q4_0 (`d`, 16 bytes of nibbles): element `j` is the low nibble of byte `j`,
/// element `j + 16` its high nibble; `d * f32(q - 8)`.
#[inline(always)]
fn deq_q4_0<A: Arith>(b: &[u8; 18], o: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        o[j] = A::mul(d, f32::from((q & 0x0f) as i8 - 8));
        o[j + 16] = A::mul(d, f32::from((q >> 4) as i8 - 8));
    }
}

/// Adds `d * q` and `m` as numpy does: `(d * q) + m`, except that with a single
/// block in the call numpy's scalar-broadcast loop evaluates `m + (d * q)`.
#[inline(always)]
fn add_min<A: Arith>(dq: f32, m: f32, single: bool) -> f32 {
    if single {
        A::add(m, dq)
    } else {
        A::add(dq, m)
    }
}

/// Q4_1 (`d`, `m`, 16 bytes of nibbles): `(d * f32(q)) + m`.
#[inline(always)]
fn deq_q4_1<A: Arith>(b: &[u8; 20], o: &mut [f32; 32], single: bool) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for j in 0..16 {
        let q = b[4 + j];
        o[j] = add_min::<A>(A::mul(d, f32::from(q & 0x0f)), m, single);
        o[j + 16] = add_min::<A>(A::mul(d, f32::from(q >> 4)), m, single);
    }
}

/// The 5-bit values of a Q5 block: low nibbles as in Q4, bit `i` of the
/// little-endian u32 `qh` is bit 4 of element `i`.
#[inline(always)]
fn q5_values(qh: [u8; 4], qs: &[u8], q: &mut [u8; 32]) {
    let qh = u32::from_le_bytes(qh);
    for (j, &byte) in qs.iter().take(16).enumerate() {
        let hi_j = ((qh >> j) & 1) as u8;
        let hi_k = ((qh >> (j + 16)) & 1) as u8;
        q[j] = (byte & 0x0f) | (hi_j << 4);
        q[j + 16] = (byte >> 4) | (hi_k << 4);
    }
}

/// Q5_0 (`d`, `qh`, 16 bytes of nibbles): `d * f32(q - 16)`.
#[inline(always)]
fn deq_q5_0<A: Arith>(b: &[u8; 22], o: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let mut q = [0u8; 32];
    q5_values([b[2], b[3], b[4], b[5]], &b[6..22], &mut q);
    for (o, &q) in o.iter_mut().zip(q.iter()) {
        *o = A::mul(d, f32::from(q as i8 - 16));
    }
}

/// Q5_1 (`d`, `m`, `qh`, 16 bytes of nibbles): `(d * f32(q)) + m`.
#[inline(always)]
fn deq_q5_1<A: Arith>(b: &[u8; 24], o: &mut [f32; 32], single: bool) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let mut q = [0u8; 32];
    q5_values([b[4], b[5], b[6], b[7]], &b[8..24], &mut q);
    for (o, &q) in o.iter_mut().zip(q.iter()) {
        *o = add_min::<A>(A::mul(d, f32::from(q)), m, single);
    }
}

/// Q8_0 (`d`, 32 × i8): `f32(x) * d`.
#[inline(always)]
fn deq_q8_0<A: Arith>(b: &[u8; 34], o: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for (o, &x) in o.iter_mut().zip(b[2..].iter()) {
        *o = A::mul(f32::from(x as i8), d);
    }
}

/// Q2_K (`scales[16]`, `qs[64]`, `d`, `dmin`): 16 groups of 16; group `g` has
/// `dl = d * f32(scales[g] & 15)`, `ml = dmin * f32(scales[g] >> 4)`; element
/// `e = h*128 + s*32 + l` is bits `2s..2s+2` of `qs[h*32 + l]`;
/// `(dl * f32(q)) - ml`.
#[inline(always)]
fn deq_q2_k<A: Arith>(b: &[u8; 84], o: &mut [f32; QK_K]) {
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    let mut dl = [0f32; 16];
    let mut ml = [0f32; 16];
    for g in 0..16 {
        dl[g] = A::mul(d, f32::from(b[g] & 0x0f));
        ml[g] = A::mul(dmin, f32::from(b[g] >> 4));
    }
    for h in 0..2 {
        for s in 0..4 {
            for l in 0..32 {
                let e = h * 128 + s * 32 + l;
                let q = (b[16 + h * 32 + l] >> (2 * s)) & 3;
                let g = e / 16;
                o[e] = A::sub(A::mul(dl[g], f32::from(q)), ml[g]);
            }
        }
    }
}

/// Q3_K (`hmask[32]`, `qs[64]`, `scales[12]`, `d`): 16 six-bit scales (low 4
/// bits from nibbles of `scales[0..8]`, high 2 bits from `scales[8..12]`),
/// `dl = d * f32(scale - 32)`; element `e = h*128 + s*32 + l`: 2 low bits from
/// `qs[h*32 + l] >> 2s`, minus 4 when bit `e / 32` of `hmask[l]` is 0;
/// `dl * f32(q)`.
#[inline(always)]
fn deq_q3_k<A: Arith>(b: &[u8; 110], o: &mut [f32; QK_K]) {
    let d = f16_at(b, 108);
    let mut dl = [0f32; 16];
    for (j, dl) in dl.iter_mut().enumerate() {
        let low = if j < 8 {
            b[96 + j] & 0x0f
        } else {
            b[96 + j - 8] >> 4
        };
        let high = (b[104 + j % 4] >> (2 * (j / 4))) & 3;
        let scale = (low | (high << 4)) as i8 - 32;
        *dl = A::mul(d, f32::from(scale));
    }
    for h in 0..2 {
        for s in 0..4 {
            for l in 0..32 {
                let e = h * 128 + s * 32 + l;
                let ql = ((b[32 + h * 32 + l] >> (2 * s)) & 3) as i8;
                let hbit = (b[l] >> (e / 32)) & 1;
                let q = ql - (((hbit ^ 1) << 2) as i8);
                o[e] = A::mul(dl[e / 16], f32::from(q));
            }
        }
    }
}

/// The 8 six-bit scales and minimums of Q4_K/Q5_K (`Q4_K.get_scale_min`).
#[inline(always)]
fn k_scale_min(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 0x3f;
        mn[j] = s[4 + j] & 0x3f;
        sc[4 + j] = (s[8 + j] & 0x0f) | ((s[j] >> 2) & 0x30);
        mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
    }
    (sc, mn)
}

/// Per-group `d * f32(sc)` and `dmin * f32(m)` of Q4_K/Q5_K.
#[inline(always)]
fn k_group_scales<A: Arith>(b: &[u8], d: f32, dmin: f32) -> ([f32; 8], [f32; 8]) {
    let mut s = [0u8; 12];
    for (s, &x) in s.iter_mut().zip(b.iter().skip(4)) {
        *s = x;
    }
    let (sc, mn) = k_scale_min(&s);
    let mut ds = [0f32; 8];
    let mut dm = [0f32; 8];
    for g in 0..8 {
        ds[g] = A::mul(d, f32::from(sc[g]));
        dm[g] = A::mul(dmin, f32::from(mn[g]));
    }
    (ds, dm)
}

/// Q4_K (`d`, `dmin`, `scales[12]`, `qs[128]`): 8 groups of 32; element
/// `e = c*64 + s*32 + l` is nibble `s` of `qs[c*32 + l]`;
/// `(d_g * f32(q)) - dm_g`.
#[inline(always)]
fn deq_q4_k<A: Arith>(b: &[u8; 144], o: &mut [f32; QK_K]) {
    let (ds, dm) = k_group_scales::<A>(b, f16_at(b, 0), f16_at(b, 2));
    for c in 0..4 {
        for s in 0..2 {
            let g = c * 2 + s;
            for l in 0..32 {
                let q = (b[16 + c * 32 + l] >> (4 * s)) & 0x0f;
                o[g * 32 + l] = A::sub(A::mul(ds[g], f32::from(q)), dm[g]);
            }
        }
    }
}

/// Q5_K (`d`, `dmin`, `scales[12]`, `qh[32]`, `qs[128]`): as Q4_K, plus bit
/// `e / 32` of `qh[l]` as bit 4 of element `e`.
#[inline(always)]
fn deq_q5_k<A: Arith>(b: &[u8; 176], o: &mut [f32; QK_K]) {
    let (ds, dm) = k_group_scales::<A>(b, f16_at(b, 0), f16_at(b, 2));
    for c in 0..4 {
        for s in 0..2 {
            let g = c * 2 + s;
            for l in 0..32 {
                let ql = (b[48 + c * 32 + l] >> (4 * s)) & 0x0f;
                let qh = (b[16 + l] >> g) & 1;
                let q = ql | (qh << 4);
                o[g * 32 + l] = A::sub(A::mul(ds[g], f32::from(q)), dm[g]);
            }
        }
    }
}

/// Q6_K (`ql[128]`, `qh[64]`, `scales[16]` as i8, `d`): 16 groups of 16 with
/// `d * f32(scale)`; element `e = h*128 + r`: nibble `r / 64` of
/// `ql[h*64 + r % 64]` and bits `2(r/32)..+2` of `qh[h*32 + r % 32]` as bits
/// 4-5; `(d * scale) * f32(q - 32)`.
#[inline(always)]
fn deq_q6_k<A: Arith>(b: &[u8; 210], o: &mut [f32; QK_K]) {
    let d = f16_at(b, 208);
    let mut ds = [0f32; 16];
    for (g, ds) in ds.iter_mut().enumerate() {
        *ds = A::mul(d, f32::from(b[192 + g] as i8));
    }
    for h in 0..2 {
        for r in 0..128 {
            let ql = (b[h * 64 + r % 64] >> (4 * (r / 64))) & 0x0f;
            let qh = (b[128 + h * 32 + r % 32] >> (2 * (r / 32))) & 3;
            let q = (ql | (qh << 4)) as i8 - 32;
            let e = h * 128 + r;
            o[e] = A::mul(ds[e / 16], f32::from(q));
        }
    }
}

// ---------------------------------------------------------------------------
// Quantization
// ---------------------------------------------------------------------------

/// The order in which numpy 2.4.6's `max`/`min` reduction over a contiguous
/// run of 32 `float32` (`blocks.max(axis=-1)` in Q4_1/Q5_1) lets a tied
/// element win: of several elements equal to the result (which can differ only
/// as `+0.0` vs `-0.0`), the one listed first here is returned. Found by probing
/// every pair of positions on the fixtures' machine (its AVX-512 dispatch: the
/// accumulator starts as element 0 broadcast, 16 lanes take elements 1..=16, a
/// lane tree reduces them, elements 17..=31 follow one by one, later ones
/// winning), then checked on 114 788 random blocks with mixed signed zeros.
/// Another SIMD width (an AVX2-only machine) would give another order.
const NP_TIE_ORDER: [usize; 32] = [
    31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 4, 0, 12, 8, 16, 2, 10, 6, 14, 3,
    11, 7, 15, 1, 9, 5, 13,
];

/// The bits of `|v|`: for finite values (and infinities) they order as the
/// magnitudes do, and `±0.0` both give 0.
#[inline(always)]
fn abs_bits(v: f32) -> u32 {
    v.to_bits() & 0x7fff_ffff
}

/// The largest `|x|` of a block, as bits ([`abs_bits`]): an integer maximum,
/// which (unlike a float one) vectorizes as is; for finite values it is the
/// float maximum of the magnitudes, `+0.0` for an all-zero block.
#[inline(always)]
fn max_abs_bits(x: &[f32; 32]) -> u32 {
    x.iter().fold(0, |m, &v| m.max(abs_bits(v)))
}

/// The first element of `x` listed in [`NP_TIE_ORDER`] that equals `target`
/// (`+0.0 == -0.0`), or `target` if none does.
fn first_in_tie_order(x: &[f32; 32], target: f32) -> f32 {
    NP_TIE_ORDER
        .iter()
        .filter_map(|&i| x.get(i).copied())
        .find(|&v| v == target)
        .unwrap_or(target)
}

/// numpy's `(max, min)` of a Q4_1/Q5_1 block (finite values), with its choice
/// between tied signed zeros ([`NP_TIE_ORDER`]).
///
/// Any order of comparisons finds the same maximum and minimum value; elements
/// equal to it are bit-identical unless it is zero. So the values come from
/// eight lanes that vectorize, and only a zero result is settled by
/// [`NP_TIE_ORDER`] (numpy's scan keeps the first element, in that order,
/// that equals the result).
#[inline(always)]
fn np_max_min(x: &[f32; 32]) -> (f32, f32) {
    let (lanes, _) = x.as_chunks::<8>();
    let mut hi = [x[0]; 8];
    let mut lo = [x[0]; 8];
    for c in lanes {
        for j in 0..8 {
            let v = c[j];
            hi[j] = if v > hi[j] { v } else { hi[j] };
            lo[j] = if v < lo[j] { v } else { lo[j] };
        }
    }
    let mut max = hi[0];
    let mut min = lo[0];
    for j in 1..8 {
        max = if hi[j] > max { hi[j] } else { max };
        min = if lo[j] < min { lo[j] } else { min };
    }
    if max == 0.0 {
        max = first_in_tie_order(x, max);
    }
    if min == 0.0 {
        min = first_in_tie_order(x, min);
    }
    (max, min)
}

/// `np.where(d == 0, 0, 1 / d)`: the reciprocal of the unrounded `f32` scale.
#[inline(always)]
fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

/// The index of the first non-finite element of `x`, if any. Scans runs of
/// 256 elements with a branch-free test that vectorizes, then looks for the
/// element only in a run that has one.
fn first_non_finite(x: &[f32]) -> Option<usize> {
    const RUN: usize = 256;
    x.chunks(RUN).enumerate().find_map(|(k, run)| {
        let any = run
            .iter()
            .fold(0u32, |a, &v| a | u32::from(abs_bits(v) >= 0x7f80_0000));
        if any == 0 {
            None
        } else {
            run.iter().position(|v| !v.is_finite()).map(|i| k * RUN + i)
        }
    })
}

/// Whether [`quantize`] handles `kind`.
fn quantizable_kind(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::F32
            | Kind::F16
            | Kind::Bf16
            | Kind::Q4_0
            | Kind::Q4_1
            | Kind::Q5_0
            | Kind::Q5_1
            | Kind::Q8_0
    )
}

/// The number of bytes [`quantize`] makes of `n` elements of type `t`, or
/// why `t` or `n` cannot be quantized (an unsupported type, `n` not a whole
/// number of blocks, an overflow).
pub(crate) fn quantized_len(t: GgmlType, n: usize) -> Result<usize, String> {
    let kind = Kind::of(t)?;
    let (block, bytes) = kind.geometry();
    if !quantizable_kind(kind) {
        return Err(format!(
            "quantizing to {} is not supported (gguf-py 0.19.0 has no quantizer for it)",
            t.name
        ));
    }
    if !n.is_multiple_of(block) {
        return Err(format!(
            "{}: {n} elements are not a whole number of {block}-element blocks",
            t.name
        ));
    }
    (n / block)
        .checked_mul(bytes)
        .ok_or_else(|| format!("{}: byte count overflows", t.name))
}

/// Quantizes `x` to type `t` and appends the bytes to `out`, bit-identical to
/// gguf-py 0.19.0 `gguf.quants.quantize(x, t)` (numpy 2.4.6, x86-64; the
/// result is row-local, so any number of rows back to back may be passed).
/// Supported: F32, F16 (`astype(float16)`), BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1
/// (gguf-py has no K-quant quantizer). `x.len()` must be a multiple of the
/// block size. On an error nothing is appended. See [`quantize_into`].
#[cfg_attr(not(test), allow(dead_code))] // the gguf layout quantizes in place
pub(crate) fn quantize(t: GgmlType, x: &[f32], out: &mut Vec<u8>) -> Result<(), String> {
    let total = quantized_len(t, x.len())?;
    let start = out.len();
    let end = start
        .checked_add(total)
        .ok_or_else(|| format!("{}: byte count overflows", t.name))?;
    out.resize(end, 0);
    let r = match out.get_mut(start..) {
        Some(dst) => quantize_into(t, x, dst, 0),
        None => Err(format!("{}: internal: output range", t.name)),
    };
    if r.is_err() {
        out.truncate(start);
    }
    r
}

/// Quantizes `x` to type `t` into `out`, which must be exactly
/// [`quantized_len`]`(t, x.len())` bytes long, bit-identical to gguf-py 0.19.0
/// `gguf.quants.quantize(x, t)` (see [`quantize`]). `first` is the index of
/// `x[0]` in its tensor, for the error message.
///
/// Every element must be finite, else this returns an error naming the first
/// offending index (`first` + its index in `x`) and `out` is left unspecified:
/// for NaN/±inf inputs numpy's block quantizers cast NaN/inf to integers
/// (undefined behaviour in C, x86-specific results), so such inputs are refused
/// rather than imitated (the same rule holds for F32/F16/BF16, for one contract
/// across types).
///
/// Finite inputs whose block scale is an `f32` subnormal below 2^-128 make
/// `1 / d` overflow to infinity in numpy; the resulting NaN/inf codes are cast
/// the way numpy does on x86-64 ([`np_cast_low_byte`]), so the bytes still
/// match it there.
pub(crate) fn quantize_into(
    t: GgmlType,
    x: &[f32],
    out: &mut [u8],
    first: usize,
) -> Result<(), String> {
    quantize_at(Isa::best(), t, Widen::F32(x), out, first)
}

/// Widens the little-endian `src` of float type `fd` into `scratch` (exactly
/// its element count long) and quantizes it into `out`, as [`quantize_into`]
/// does: both loops in one function compiled for the CPU's [`Isa`].
pub(crate) fn widen_quantize_into(
    t: GgmlType,
    fd: FloatDtype,
    src: &[u8],
    scratch: &mut [f32],
    out: &mut [u8],
    first: usize,
) -> Result<(), String> {
    quantize_at(Isa::best(), t, Widen::From(fd, src, scratch), out, first)
}

/// The floats [`quantize_body`] quantizes: `f32` as they are, or bytes of a
/// float type widened into a scratch buffer of their element count first.
pub(crate) enum Widen<'a> {
    /// Already `f32`.
    F32(&'a [f32]),
    /// Little-endian bytes of a float type, and a buffer of as many `f32`.
    From(FloatDtype, &'a [u8], &'a mut [f32]),
}

/// [`quantize_body`] at the level `isa`, which must run on this CPU (it is
/// [`Isa::best`] or one of [`Isa::available`]).
fn quantize_at(
    isa: Isa,
    t: GgmlType,
    x: Widen<'_>,
    out: &mut [u8],
    first: usize,
) -> Result<(), String> {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::best` and `Isa::available` return an x86 level only
        // when the CPU has its features (runtime detection)
        Isa::Avx512 => unsafe { quantize_avx512(t, x, out, first) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above
        Isa::Avx2 => unsafe { quantize_avx2(t, x, out, first) },
        Isa::Baseline => quantize_body(t, x, out, first),
    }
}

/// The instruction sets [`quantize_into`] compiles its loops for. Every
/// level computes the same bytes: the loops use only IEEE-exact float
/// operations (no fused multiply-add: Rust never contracts `a * b + c`)
/// and integer ones, which wider vectors do lane by lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// The target's baseline (SSE2 on x86-64).
    Baseline,
    /// x86-64 AVX2.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// x86-64 AVX-512 (F, BW, VL).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The widest level this CPU runs (detected once, then cached by std).
    pub(crate) fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            // each level needs the one below it, so every level up to the
            // best runs here ([`Isa::available`])
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }

    /// Every level this CPU runs, the baseline first (for the tests that
    /// compare them byte for byte).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Baseline];
        #[cfg(target_arch = "x86_64")]
        v.extend([Isa::Avx2, Isa::Avx512]);
        let best = Isa::best();
        v.retain(|&l| l <= best);
        v
    }
}

/// [`quantize_into`] at the level `isa` (one of [`Isa::available`]).
#[cfg(test)]
pub(crate) fn quantize_into_at(
    isa: Isa,
    t: GgmlType,
    x: &[f32],
    out: &mut [u8],
    first: usize,
) -> Result<(), String> {
    assert!(Isa::available().contains(&isa), "{isa:?} is not available");
    quantize_at(isa, t, Widen::F32(x), out, first)
}

/// [`quantize_body`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantize_avx2(t: GgmlType, x: Widen<'_>, out: &mut [u8], first: usize) -> Result<(), String> {
    quantize_body(t, x, out, first)
}

/// [`quantize_body`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
fn quantize_avx512(t: GgmlType, x: Widen<'_>, out: &mut [u8], first: usize) -> Result<(), String> {
    quantize_body(t, x, out, first)
}

/// The body of [`quantize_into`], inlined into each [`Isa`] level's copy so
/// its loops are compiled for that level.
#[inline(always)]
#[allow(clippy::redundant_closure)] // the closures are inlined, the fn items were not
fn quantize_body(t: GgmlType, x: Widen<'_>, out: &mut [u8], first: usize) -> Result<(), String> {
    // the widening is inlined here too (the formats' loops are `#[inline]`)
    let x: &[f32] = match x {
        Widen::F32(x) => x,
        Widen::From(fd, src, scratch) => {
            fd.decode_into(src, scratch)
                .map_err(|e| format!("{}: widening {fd:?}: {e}", t.name))?;
            scratch
        }
    };
    let total = quantized_len(t, x.len())?;
    if out.len() != total {
        return Err(format!(
            "{}: {} elements quantize to {total} bytes, the output holds {}",
            t.name,
            x.len(),
            out.len()
        ));
    }
    // the float types check first; the block types check each block as they
    // go (its largest magnitude), and look for the element only if one fails
    let kind = Kind::of(t)?;
    if matches!(kind, Kind::F32 | Kind::F16 | Kind::Bf16) {
        if let Some(i) = first_non_finite(x) {
            return Err(non_finite(t, x, i, first));
        }
    }
    let finite = match kind {
        Kind::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
            true
        }
        Kind::F16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16_bits_from_f32_np(v).to_le_bytes());
            }
            true
        }
        Kind::Bf16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&bf16_bits_from_f32_gguf(v).to_le_bytes());
            }
            true
        }
        // closures, not the fn items: a closure is inlined into this body,
        // and so compiled for its instruction set (a fn item's call shim
        // was not)
        Kind::Q8_0 => quant_blocks(
            x,
            out,
            #[inline(always)]
            |c, o| quant_q8_0(c, o),
        ),
        Kind::Q4_0 => quant_blocks(
            x,
            out,
            #[inline(always)]
            |c, o| quant_q4_0(c, o),
        ),
        Kind::Q4_1 => quant_blocks(
            x,
            out,
            #[inline(always)]
            |c, o| quant_q4_1(c, o),
        ),
        Kind::Q5_0 => quant_blocks(
            x,
            out,
            #[inline(always)]
            |c, o| quant_q5_0(c, o),
        ),
        Kind::Q5_1 => quant_blocks(
            x,
            out,
            #[inline(always)]
            |c, o| quant_q5_1(c, o),
        ),
        Kind::Q2K | Kind::Q3K | Kind::Q4K | Kind::Q5K | Kind::Q6K => {
            return Err(format!("quantizing to {} is not supported", t.name));
        }
    };
    if finite {
        return Ok(());
    }
    match first_non_finite(x) {
        Some(i) => Err(non_finite(t, x, i, first)),
        None => Err(format!("{}: internal: a block was not finite", t.name)),
    }
}

/// The error for the non-finite element `x[i]`, `first` being the index of
/// `x[0]` in its tensor.
fn non_finite(t: GgmlType, x: &[f32], i: usize, first: usize) -> String {
    let v = x.get(i).copied().unwrap_or(f32::NAN);
    format!(
        "{}: element {} is {v} (bits {:#010x}); only finite values can be quantized",
        t.name,
        first.saturating_add(i),
        v.to_bits()
    )
}

/// Quantizes every 32-element block of `x` with `f` into its `B`-byte slot of
/// `out` (the caller has checked that the lengths agree; extra elements or
/// bytes, of which there are none then, would be left alone). Returns whether
/// every element was finite; the bytes of a block that was not are garbage
/// (the quantizers do not panic on such blocks), to be discarded.
#[inline(always)]
fn quant_blocks<const B: usize>(
    x: &[f32],
    out: &mut [u8],
    f: impl Fn(&[f32; 32], &mut [u8; B]),
) -> bool {
    let (xs, _) = x.as_chunks::<32>();
    let (os, _) = out.as_chunks_mut::<B>();
    let mut worst = 0u32;
    for (c, o) in xs.iter().zip(os.iter_mut()) {
        worst = worst.max(max_abs_bits(c));
        f(c, o);
    }
    worst < 0x7f80_0000
}

/// Writes the little-endian f16 (numpy's rounding) of `v` into `b[0..2]`.
#[inline(always)]
fn put_f16(b: &mut [u8], v: f32) {
    for (o, x) in b.iter_mut().zip(f16_bits_from_f32_np(v).to_le_bytes()) {
        *o = x;
    }
}

/// The element of largest `|x|` (the first on ties), with its sign
/// (`np.take_along_axis(blocks, abs(blocks).argmax(...))`).
///
/// Branch-free: the largest magnitude as an integer maximum ([`abs_bits`]
/// orders finite values as `abs` does, `±0.0` tie), then the smallest index
/// holding it as the lowest set bit of a mask; both vectorize.
#[inline(always)]
fn signed_absmax(x: &[f32; 32]) -> f32 {
    let m = max_abs_bits(x);
    // a bit per element holding it (a vector compare to a mask), the first
    // set bit is the index; `m` is some element's, so the mask is not empty
    let mask = x
        .iter()
        .zip(0u32..)
        .fold(0u32, |a, (&v, i)| a | (u32::from(abs_bits(v) == m) << i));
    x[(mask.trailing_zeros() & 31) as usize]
}

/// Q8_0: `d = max|x| / 127`, `q = np_roundf(x * id)` as int8, `d` stored as f16.
#[inline(always)]
fn quant_q8_0(x: &[f32; 32], b: &mut [u8; 34]) {
    let amax = f32::from_bits(max_abs_bits(x));
    let d = amax / 127.0;
    let id = inverse(d);
    let (head, qs) = b.split_at_mut(2);
    put_f16(head, d);
    if id.is_finite() {
        // |x * id| <= 127 (plus rounding): the fast rounding is exact there
        for (o, &v) in qs.iter_mut().zip(x.iter()) {
            *o = round_half_away_small(v * id) as u8;
        }
    } else {
        // a subnormal scale: 1/d overflowed, codes are numpy's casts of inf/NaN
        for (o, &v) in qs.iter_mut().zip(x.iter()) {
            *o = np_cast_low_byte(np_roundf(v * id));
        }
    }
}

/// The 4/5-bit codes of Q4_0/Q5_0: `d = max / -half` (`max` signed),
/// `q = min(cap, u8(trunc(x * id + (half + 0.5))))` (the cast truncates).
/// Returns `d`.
#[inline(always)]
fn codes_sym(x: &[f32; 32], half: f32, cap: u8, q: &mut [u8; 32]) -> f32 {
    let max = signed_absmax(x);
    let d = max / -half;
    let id = inverse(d);
    let offset = half + 0.5;
    if id.is_finite() {
        // |x * id| <= half (plus rounding), so x * id + offset lies in
        // (0, 2 * half + 1): the small cast is exact there
        for (q, &v) in q.iter_mut().zip(x.iter()) {
            *q = cast_low_byte_small(v * id + offset).min(cap);
        }
    } else {
        // a subnormal scale: 1/d overflowed, codes are numpy's casts of inf/NaN
        for (q, &v) in q.iter_mut().zip(x.iter()) {
            *q = np_cast_low_byte(v * id + offset).min(cap);
        }
    }
    d
}

/// The 4/5-bit codes of Q4_1/Q5_1: `d = (max - min) / levels`,
/// `q = min(levels, u8(trunc((x - min) * id + 0.5)))`. Returns `(d, min)`.
#[inline(always)]
fn codes_affine(x: &[f32; 32], levels: u8, q: &mut [u8; 32]) -> (f32, f32) {
    let (max, min) = np_max_min(x);
    let d = (max - min) / f32::from(levels);
    let id = inverse(d);
    if d.is_finite() && id.is_finite() {
        // 0 <= x - min <= max - min (finite), so (x - min) * id + 0.5 lies in
        // [0.5, levels + 1): the small cast is exact there
        for (q, &v) in q.iter_mut().zip(x.iter()) {
            *q = cast_low_byte_small((v - min) * id + 0.5).min(levels);
        }
    } else {
        // max - min overflowed (id = 0, inf * 0 = NaN) or a subnormal scale
        // (1/d overflowed): codes are numpy's casts of inf/NaN
        for (q, &v) in q.iter_mut().zip(x.iter()) {
            *q = np_cast_low_byte((v - min) * id + 0.5).min(levels);
        }
    }
    (d, min)
}

/// Packs 32 codes as 16 bytes: byte `j` = low nibble of `q[j]` | `q[j + 16] << 4`
/// (a u8 shift: bit 4 of `q[j + 16]` falls off, it goes to `qh`).
#[inline(always)]
fn pack_nibbles(q: &[u8; 32], dst: &mut [u8]) {
    let (lo, hi) = q.split_at(16);
    for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
        *d = (l & 0x0f) | (h << 4);
    }
}

/// `np.packbits(q >> 4, bitorder="little")`: bit `i` of the little-endian u32
/// is bit 4 of `q[i]`. Eight codes at a time: their bits 4 as one bit per byte
/// of a u64, gathered into its top byte by one multiplication (byte `i` moves
/// up by `56 - 7i` bits to bit `56 + i`; the other partial products land on
/// distinct bits outside the top byte, so nothing carries into it).
#[inline(always)]
fn pack_high_bits(q: &[u8; 32], dst: &mut [u8]) {
    let (eights, _) = q.as_chunks::<8>();
    for (o, e) in dst.iter_mut().zip(eights) {
        let bits = (u64::from_le_bytes(*e) >> 4) & 0x0101_0101_0101_0101;
        *o = (bits.wrapping_mul(0x0102_0408_1020_4080) >> 56) as u8;
    }
}

/// Q4_0: `d` (f16), 16 bytes of nibbles.
#[inline(always)]
fn quant_q4_0(x: &[f32; 32], b: &mut [u8; 18]) {
    let mut q = [0u8; 32];
    let d = codes_sym(x, 8.0, 15, &mut q);
    let (head, qs) = b.split_at_mut(2);
    put_f16(head, d);
    pack_nibbles(&q, qs);
}

/// Q5_0: `d` (f16), `qh` (u32), 16 bytes of nibbles.
#[inline(always)]
fn quant_q5_0(x: &[f32; 32], b: &mut [u8; 22]) {
    let mut q = [0u8; 32];
    let d = codes_sym(x, 16.0, 31, &mut q);
    let (head, rest) = b.split_at_mut(2);
    let (qh, qs) = rest.split_at_mut(4);
    put_f16(head, d);
    pack_high_bits(&q, qh);
    pack_nibbles(&q, qs);
}

/// Q4_1: `d`, `m` (f16), 16 bytes of nibbles.
#[inline(always)]
fn quant_q4_1(x: &[f32; 32], b: &mut [u8; 20]) {
    let mut q = [0u8; 32];
    let (d, m) = codes_affine(x, 15, &mut q);
    let (head, qs) = b.split_at_mut(4);
    let (hd, hm) = head.split_at_mut(2);
    put_f16(hd, d);
    put_f16(hm, m);
    pack_nibbles(&q, qs);
}

/// Q5_1: `d`, `m` (f16), `qh` (u32), 16 bytes of nibbles.
#[inline(always)]
fn quant_q5_1(x: &[f32; 32], b: &mut [u8; 24]) {
    let mut q = [0u8; 32];
    let (d, m) = codes_affine(x, 31, &mut q);
    let (head, rest) = b.split_at_mut(4);
    let (hd, hm) = head.split_at_mut(2);
    let (qh, qs) = rest.split_at_mut(4);
    put_f16(hd, d);
    put_f16(hm, m);
    pack_high_bits(&q, qh);
    pack_nibbles(&q, qs);
}

#[cfg(test)]
#[path = "math_tests.rs"]
mod tests;

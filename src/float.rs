//! Floating-point storage formats and an exact emulation of torch's CPU rounding.
//!
//! Checkpoints store weights, scales and shifts as little-endian `bf16`, `f16` or `f32`, and
//! fp8 data in one of three 8-bit formats. This module converts between those byte encodings and
//! `f32`, and reproduces the rounding that torch applies on CPU:
//!
//! * an elementwise op on `bf16`/`f16` tensors is evaluated as an `f32` op on the exactly widened
//!   inputs, and the `f32` result is then rounded to nearest, ties to even, back to the storage
//!   dtype. [`FloatDtype::round`] (and [`FloatFormat::round`]) is that final rounding, so a port
//!   computes `round(a op b)` after *every* op, in the same order as the Python code;
//! * a cast between float dtypes is a single round-to-nearest-even;
//! * conversion to fp8 (`tensor.to(torch.float8_*)`) is round-to-nearest-even with the overflow
//!   and NaN conventions of each format ([`Fp8Kind::encode`]).
//!
//! The scalar conversions are written with integer bit tricks so that the row kernels built on
//! them stay branch-light; the unit tests check them against the `half` crate.

use std::fmt;

/// Error returned by the slice conversion helpers of this module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FloatError {
    /// A byte slice whose length is not a multiple of the element size.
    RaggedBytes {
        /// Length of the slice in bytes.
        len: usize,
        /// Size of one element in bytes.
        elem_size: usize,
    },
    /// Source and destination do not hold the same number of elements.
    CountMismatch {
        /// Number of elements in the source.
        source: usize,
        /// Number of elements the destination can hold.
        destination: usize,
    },
}

impl fmt::Display for FloatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FloatError::RaggedBytes { len, elem_size } => write!(
                f,
                "byte length {len} is not a multiple of the element size {elem_size}"
            ),
            FloatError::CountMismatch {
                source,
                destination,
            } => write!(
                f,
                "element count mismatch: source has {source} elements, destination {destination}"
            ),
        }
    }
}

impl std::error::Error for FloatError {}

// ---------------------------------------------------------------------------------------------
// Scalar conversions
// ---------------------------------------------------------------------------------------------

/// Widens raw `bf16` bits to `f32` (exact: a `bf16` is the upper half of an `f32`).
#[inline(always)]
pub fn f32_from_bf16_bits(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

// The conversions below compute every candidate result and pick one with plain `if`s on
// integers, which the compiler turns into selects: the row loops that use them vectorize even
// on baseline x86-64 (SSE2).

/// The `bf16` bits every NaN becomes: torch's vectorized CPU conversion (ATen
/// `cvtfp32_bf16`) replaces any NaN by `0xFFFF`, whatever its sign and payload.
pub const BF16_NAN_BITS: u16 = 0xFFFF;

/// Rounds an `f32` to the nearest `bf16` (ties to even) and returns its bits.
///
/// Overflow gives ±infinity. Every NaN becomes [`BF16_NAN_BITS`], as in torch's vectorized CPU
/// kernels (the `half` crate instead keeps sign and payload; torch's scalar fallback gives
/// `0x7FC0`; both differ only for NaN).
#[inline(always)]
pub fn bf16_bits_from_f32(x: f32) -> u16 {
    let b = x.to_bits();
    // Adding 0x7FFF plus the lowest kept bit rounds to nearest with ties to even; a carry out of
    // the mantissa bumps the exponent, which also turns the largest values into infinity.
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    (if b & 0x7FFF_FFFF > 0x7F80_0000 {
        u32::from(BF16_NAN_BITS)
    } else {
        rounded
    }) as u16
}

/// Widens raw IEEE `f16` bits to `f32` (exact). A NaN keeps sign and payload and is made quiet.
#[inline(always)]
pub fn f32_from_f16_bits(bits: u16) -> f32 {
    let sign = u32::from(bits & 0x8000) << 16;
    let em = u32::from(bits & 0x7FFF);
    // Normal, infinity and NaN: re-bias the exponent from 15 to 127 (0x1F maps to 0xFF).
    let normal = (em << 13) + 0x3800_0000;
    let inf_nan = (em << 13) + 0x7000_0000;
    let inf_nan = if em > 0x7C00 {
        inf_nan | 0x0040_0000
    } else {
        inf_nan
    };
    // Zero or subnormal: em * 2^-24 is exact in f32.
    let sub = (em as f32 * f32::from_bits(0x3380_0000)).to_bits();
    let mag = if em >= 0x7C00 {
        inf_nan
    } else if em >= 0x0400 {
        normal
    } else {
        sub
    };
    f32::from_bits(sign | mag)
}

/// Rounds an `f32` to the nearest IEEE `f16` (ties to even) and returns its bits.
///
/// Values of magnitude 65520 and above become ±infinity; results below the normal range become
/// `f16` subnormals (rounded at 2^-24) or signed zero. A NaN keeps its sign and the top of its
/// payload and is made quiet, like `half::f16::from_f32`.
#[inline(always)]
pub fn f16_bits_from_f32(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = (b >> 16) & 0x8000;
    let a = b & 0x7FFF_FFFF;
    // Normal range (2^-14 and up): re-bias, round the 13 dropped bits, saturate to infinity.
    let r = a.wrapping_sub(0x3800_0000);
    let normal = r.wrapping_add(0x0FFF + ((r >> 13) & 1)) >> 13;
    let normal = if normal > 0x7C00 { 0x7C00 } else { normal };
    // Below 2^-14: adding 0.5 (whose ulp is 2^-24) makes the f32 adder round at the f16
    // subnormal quantum; the low bits of the sum are then the f16 code.
    let sub = (f32::from_bits(a) + 0.5)
        .to_bits()
        .wrapping_sub(0x3F00_0000);
    let nan = 0x7E00 | ((a >> 13) & 0x03FF);
    let mag = if a > 0x7F80_0000 {
        nan
    } else if a >= 0x3880_0000 {
        normal
    } else {
        sub
    };
    (sign | mag) as u16
}

/// `x` rounded to `bf16` (ties to even) and widened back to `f32` (NaN becomes the widened
/// [`BF16_NAN_BITS`]).
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000;
    f32::from_bits(if b & 0x7FFF_FFFF > 0x7F80_0000 {
        u32::from(BF16_NAN_BITS) << 16
    } else {
        rounded
    })
}

/// [`round_bf16`] for a non-NaN input (±infinity allowed); cheaper, garbage for NaN.
#[inline(always)]
pub fn round_bf16_non_nan(x: f32) -> f32 {
    let b = x.to_bits();
    f32::from_bits(b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000)
}

/// `x` rounded to `f16` (ties to even) and widened back to `f32`, without leaving `f32`.
#[inline(always)]
pub fn round_f16(x: f32) -> f32 {
    let b = x.to_bits();
    let a = b & 0x7FFF_FFFF;
    let nan = (b | 0x0040_0000) & 0xFFFF_E000;
    let r = round_f16_non_nan(x);
    if a > 0x7F80_0000 {
        f32::from_bits(nan)
    } else {
        r
    }
}

/// [`round_f16`] for a non-NaN input (±infinity allowed); cheaper, garbage for NaN.
#[inline(always)]
pub fn round_f16_non_nan(x: f32) -> f32 {
    let b = x.to_bits();
    let sign = b & 0x8000_0000;
    let a = b & 0x7FFF_FFFF;
    // Normal f16 range: keep 10 mantissa bits; 65536 and up (and infinity) saturate to infinity.
    let normal = a.wrapping_add(0x0FFF + ((a >> 13) & 1)) & 0xFFFF_E000;
    let normal = if normal >= 0x4780_0000 {
        0x7F80_0000
    } else {
        normal
    };
    // Subnormal f16 range: round at 2^-24 through the f32 adder, then remove the offset (exact).
    let sub = ((f32::from_bits(a) + 0.5) - 0.5).to_bits();
    f32::from_bits(sign | if a < 0x3880_0000 { sub } else { normal })
}

// ---------------------------------------------------------------------------------------------
// FloatDtype
// ---------------------------------------------------------------------------------------------

/// A floating-point storage dtype of weights, scales, shifts and biases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FloatDtype {
    /// bfloat16 (`BF16` in safetensors).
    Bf16,
    /// IEEE binary16 (`F16` in safetensors).
    F16,
    /// IEEE binary32 (`F32` in safetensors).
    F32,
}

/// The float format of a dtype (F16, BF16, F32 only; `None` for the rest).
pub fn float_dtype_of(d: crate::Dtype) -> Option<FloatDtype> {
    match d {
        crate::Dtype::BF16 => Some(FloatDtype::Bf16),
        crate::Dtype::F16 => Some(FloatDtype::F16),
        crate::Dtype::F32 => Some(FloatDtype::F32),
        _ => None,
    }
}

impl FloatDtype {
    /// All float dtypes.
    #[allow(dead_code)] // tests, benches and fuzz targets
    pub const ALL: [FloatDtype; 3] = [FloatDtype::Bf16, FloatDtype::F16, FloatDtype::F32];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            FloatDtype::Bf16 | FloatDtype::F16 => 2,
            FloatDtype::F32 => 4,
        }
    }

    /// The dtype string used in safetensors headers (`"BF16"`, `"F16"`, `"F32"`).
    pub const fn safetensors_name(self) -> &'static str {
        match self {
            FloatDtype::Bf16 => "BF16",
            FloatDtype::F16 => "F16",
            FloatDtype::F32 => "F32",
        }
    }

    /// Parses a safetensors dtype string; `None` for anything but `BF16`, `F16` and `F32`.
    pub fn from_safetensors_name(name: &str) -> Option<FloatDtype> {
        match name {
            "BF16" => Some(FloatDtype::Bf16),
            "F16" => Some(FloatDtype::F16),
            "F32" => Some(FloatDtype::F32),
            _ => None,
        }
    }

    /// Rounds an `f32` to this dtype (nearest, ties to even) and widens it back.
    ///
    /// This is the rounding torch applies after each elementwise op on a tensor of this dtype;
    /// it is the identity for `F32`.
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            FloatDtype::Bf16 => round_bf16(x),
            FloatDtype::F16 => round_f16(x),
            FloatDtype::F32 => x,
        }
    }

    /// Number of elements in a little-endian byte slice of this dtype.
    pub fn element_count(self, bytes: &[u8]) -> Result<usize, FloatError> {
        let size = self.size();
        if !bytes.len().is_multiple_of(size) {
            return Err(FloatError::RaggedBytes {
                len: bytes.len(),
                elem_size: size,
            });
        }
        Ok(bytes.len() / size)
    }

    /// Reads element `index` of a little-endian byte slice as `f32` (widening is exact).
    ///
    /// Returns `None` when the element lies outside the slice.
    #[allow(dead_code)] // tests, benches and fuzz targets
    pub fn read(self, bytes: &[u8], index: usize) -> Option<f32> {
        let size = self.size();
        let start = index.checked_mul(size)?;
        let raw = bytes.get(start..start.checked_add(size)?)?;
        Some(match (self, raw) {
            (FloatDtype::Bf16, &[a, b]) => f32_from_bf16_bits(u16::from_le_bytes([a, b])),
            (FloatDtype::F16, &[a, b]) => f32_from_f16_bits(u16::from_le_bytes([a, b])),
            (FloatDtype::F32, &[a, b, c, d]) => f32::from_le_bytes([a, b, c, d]),
            _ => return None,
        })
    }

    /// Appends `x`, rounded to this dtype (nearest, ties to even), as little-endian bytes.
    #[allow(dead_code)] // tests, benches and fuzz targets
    pub fn push(self, x: f32, out: &mut Vec<u8>) {
        match self {
            FloatDtype::Bf16 => out.extend_from_slice(&bf16_bits_from_f32(x).to_le_bytes()),
            FloatDtype::F16 => out.extend_from_slice(&f16_bits_from_f32(x).to_le_bytes()),
            FloatDtype::F32 => out.extend_from_slice(&x.to_le_bytes()),
        }
    }

    /// Widens every element of a little-endian byte slice into `out`, which must hold exactly as
    /// many elements.
    #[inline]
    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) -> Result<(), FloatError> {
        let n = self.element_count(bytes)?;
        if n != out.len() {
            return Err(FloatError::CountMismatch {
                source: n,
                destination: out.len(),
            });
        }
        match self {
            FloatDtype::Bf16 => Bf16Format::decode_into(bytes, out),
            FloatDtype::F16 => F16Format::decode_into(bytes, out),
            FloatDtype::F32 => F32Format::decode_into(bytes, out),
        }
        Ok(())
    }

    /// Widens every element of a little-endian byte slice to `f32`.
    pub fn decode(self, bytes: &[u8]) -> Result<Vec<f32>, FloatError> {
        let mut out = vec![0.0; self.element_count(bytes)?];
        self.decode_into(bytes, &mut out)?;
        Ok(out)
    }

    /// Rounds every value to this dtype (nearest, ties to even) and writes its little-endian
    /// bytes into `out`, which must be exactly `values.len() * size()` bytes long.
    pub fn encode_into(self, values: &[f32], out: &mut [u8]) -> Result<(), FloatError> {
        let n = self.element_count(out)?;
        if n != values.len() {
            return Err(FloatError::CountMismatch {
                source: values.len(),
                destination: n,
            });
        }
        match self {
            FloatDtype::Bf16 => Bf16Format::encode_into(values, out),
            FloatDtype::F16 => F16Format::encode_into(values, out),
            FloatDtype::F32 => F32Format::encode_into(values, out),
        }
        Ok(())
    }

    /// Rounds every value to this dtype (nearest, ties to even) and returns the little-endian
    /// bytes.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = vec![0u8; values.len().saturating_mul(self.size())];
        match self {
            FloatDtype::Bf16 => Bf16Format::encode_into(values, &mut out),
            FloatDtype::F16 => F16Format::encode_into(values, &mut out),
            FloatDtype::F32 => F32Format::encode_into(values, &mut out),
        }
        out
    }
}

impl fmt::Display for FloatDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// Converts a little-endian tensor from one float dtype to another, like torch's `.to(dtype)`:
/// the value is widened exactly and rounded once (nearest, ties to even) to `to`.
pub fn cast(from: FloatDtype, to: FloatDtype, bytes: &[u8]) -> Result<Vec<u8>, FloatError> {
    let n = from.element_count(bytes)?;
    let mut out = vec![0u8; n.saturating_mul(to.size())];
    cast_into(from, to, bytes, &mut out)?;
    Ok(out)
}

/// Like [`cast`], writing into `out`, which must be exactly the size of the converted tensor.
pub fn cast_into(
    from: FloatDtype,
    to: FloatDtype,
    bytes: &[u8],
    out: &mut [u8],
) -> Result<(), FloatError> {
    let n = from.element_count(bytes)?;
    let m = to.element_count(out)?;
    if n != m {
        return Err(FloatError::CountMismatch {
            source: n,
            destination: m,
        });
    }
    if from == to {
        out.copy_from_slice(bytes);
        return Ok(());
    }
    const BLOCK: usize = 1024;
    let mut buf = [0f32; BLOCK];
    for (src, dst) in bytes
        .chunks(BLOCK * from.size())
        .zip(out.chunks_mut(BLOCK * to.size()))
    {
        let count = src.len() / from.size();
        let Some(vals) = buf.get_mut(..count) else {
            return Err(FloatError::CountMismatch {
                source: count,
                destination: BLOCK,
            });
        };
        from.decode_into(src, vals)?;
        to.encode_into(vals, dst)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Static dispatch over the three float formats
// ---------------------------------------------------------------------------------------------

/// Compile-time counterpart of [`FloatDtype`], used to monomorphize the row kernels.
///
/// The slice methods process `min(src elements, dst elements)` elements and never panic; callers
/// check lengths beforehand.
pub trait FloatFormat: Copy + Send + Sync + 'static {
    /// The runtime dtype this format stands for.
    #[cfg_attr(not(feature = "fuzzing"), allow(dead_code))] // tests, benches and fuzz targets
    const DTYPE: FloatDtype;
    /// Size of one element in bytes.
    const SIZE: usize;
    /// Rounds an `f32` to this format (nearest, ties to even) and widens it back.
    fn round(x: f32) -> f32;
    /// Same as [`FloatFormat::round`] for any input but NaN (for which the result is
    /// unspecified); used on rows known to be NaN-free.
    fn round_non_nan(x: f32) -> f32;
    /// Widens little-endian elements from `src` into `dst`.
    fn decode_into(src: &[u8], dst: &mut [f32]);
    /// Rounds the values of `src` to this format and writes them little-endian into `dst`.
    fn encode_into(src: &[f32], dst: &mut [u8]);
}

/// [`FloatFormat`] for `bf16`.
#[derive(Clone, Copy, Debug)]
pub struct Bf16Format;

/// [`FloatFormat`] for IEEE `f16`.
#[derive(Clone, Copy, Debug)]
pub struct F16Format;

/// [`FloatFormat`] for `f32`.
#[derive(Clone, Copy, Debug)]
pub struct F32Format;

/// The [`FloatFormat`] of a 16-bit format, from its rounding and bit
/// conversion functions (bf16 and f16 differ only in those).
macro_rules! half_format {
    ($ty:ident, $dtype:ident, $round:ident, $round_nn:ident, $from_bits:ident, $to_bits:ident) => {
        impl FloatFormat for $ty {
            const DTYPE: FloatDtype = FloatDtype::$dtype;
            const SIZE: usize = 2;
            #[inline(always)]
            fn round(x: f32) -> f32 {
                $round(x)
            }
            #[inline(always)]
            fn round_non_nan(x: f32) -> f32 {
                $round_nn(x)
            }
            #[inline]
            fn decode_into(src: &[u8], dst: &mut [f32]) {
                let (chunks, _) = src.as_chunks::<2>();
                for (d, c) in dst.iter_mut().zip(chunks) {
                    *d = $from_bits(u16::from_le_bytes(*c));
                }
            }
            #[inline]
            fn encode_into(src: &[f32], dst: &mut [u8]) {
                let (chunks, _) = dst.as_chunks_mut::<2>();
                for (c, &v) in chunks.iter_mut().zip(src) {
                    *c = $to_bits(v).to_le_bytes();
                }
            }
        }
    };
}

half_format!(
    Bf16Format,
    Bf16,
    round_bf16,
    round_bf16_non_nan,
    f32_from_bf16_bits,
    bf16_bits_from_f32
);
half_format!(
    F16Format,
    F16,
    round_f16,
    round_f16_non_nan,
    f32_from_f16_bits,
    f16_bits_from_f32
);

impl FloatFormat for F32Format {
    const DTYPE: FloatDtype = FloatDtype::F32;
    const SIZE: usize = 4;
    #[inline(always)]
    fn round(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn round_non_nan(x: f32) -> f32 {
        x
    }
    #[inline]
    fn decode_into(src: &[u8], dst: &mut [f32]) {
        let (chunks, _) = src.as_chunks::<4>();
        for (d, c) in dst.iter_mut().zip(chunks) {
            *d = f32::from_le_bytes(*c);
        }
    }
    #[inline]
    fn encode_into(src: &[f32], dst: &mut [u8]) {
        let (chunks, _) = dst.as_chunks_mut::<4>();
        for (c, &v) in chunks.iter_mut().zip(src) {
            *c = v.to_le_bytes();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// fp8
// ---------------------------------------------------------------------------------------------

/// One of the three fp8 formats quanto can store.
///
/// | kind | exponent / mantissa bits | bias | max | infinity | NaN codes | negative zero |
/// |---|---|---|---|---|---|---|
/// | `E4M3Fn` | 4 / 3 | 7 | 448 | none | `0x7F`, `0xFF` | `0x80` |
/// | `E5M2` | 5 / 2 | 15 | 57344 | `0x7C`, `0xFC` | `0x7D..=0x7F`, `0xFD..=0xFF` | `0x80` |
/// | `E4M3FnUz` | 4 / 3 | 8 | 240 | none | `0x80` only | none |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Kind {
    /// `torch.float8_e4m3fn` (`F8_E4M3` in safetensors).
    E4M3Fn,
    /// `torch.float8_e5m2` (`F8_E5M2` in safetensors).
    E5M2,
    /// `torch.float8_e4m3fnuz` (`F8_E4M3FNUZ` in safetensors).
    E4M3FnUz,
}

/// Builds the 256-entry decode table of an fp8 format at compile time.
const fn fp8_table(exp_bits: u32, man_bits: u32, bias: u32, kind: u8) -> [f32; 256] {
    let mut table = [0f32; 256];
    let mut code = 0u32;
    while code < 256 {
        let sign = (code & 0x80) << 24;
        let exp = (code >> man_bits) & ((1 << exp_bits) - 1);
        let man = code & ((1 << man_bits) - 1);
        // NaN codes decode to the NaN patterns torch's CPU conversion produces (they show up in
        // dequantized all-zero rows): e4m3fn 0x7F / 0xFF -> 0x7FF00000 with the sign; e5m2 goes
        // through f16, so its 2-bit payload lands under a set quiet bit; e4m3fnuz's unsigned 0x80
        // -> 0x7FC00001.
        let mag_bits: u32 = if kind == 2 && code == 0x80 {
            0x7FC0_0001
        } else if kind == 0 && (code & 0x7F) == 0x7F {
            0x7FF0_0000
        } else if kind == 1 && exp == 31 {
            if man == 0 {
                0x7F80_0000
            } else {
                0x7FC0_0000 | (man << 21)
            }
        } else if exp == 0 {
            if man == 0 {
                0
            } else {
                // Subnormal: man * 2^(1 - bias - man_bits), a normal f32. Normalise by hand.
                let mut p = 0; // index of the leading one of `man`
                while (man >> (p + 1)) != 0 {
                    p += 1;
                }
                let e32 = 127 + 1 + p - bias - man_bits; // exponent field of the f32
                (e32 << 23) | ((man - (1 << p)) << (23 - p))
            }
        } else {
            ((exp + 127 - bias) << 23) | (man << (23 - man_bits))
        };
        // The sign bit carries over, except for e4m3fnuz's single NaN code 0x80.
        let v = if kind == 2 && code == 0x80 {
            mag_bits
        } else {
            mag_bits | sign
        };
        table[code as usize] = f32::from_bits(v);
        code += 1;
    }
    table
}

const E4M3FN_TABLE: [f32; 256] = fp8_table(4, 3, 7, 0);
const E5M2_TABLE: [f32; 256] = fp8_table(5, 2, 15, 1);
const E4M3FNUZ_TABLE: [f32; 256] = fp8_table(4, 3, 8, 2);

/// Rounds a non-NaN magnitude (as `f32` bits, sign cleared) to an fp8 code with `man_bits`
/// mantissa bits and exponent bias `bias`, nearest with ties to even. The code is unbounded
/// above: values past the largest finite code spill into the infinity/NaN codes and beyond, and
/// each format clamps that itself. Both candidate results are computed and one is selected, so
/// that row loops vectorize.
#[inline(always)]
fn fp8_round_magnitude(a: u32, man_bits: u32, bias: u32) -> u32 {
    // Subnormal range: adding 2^(24 - bias - man_bits), whose ulp is the fp8 subnormal quantum,
    // lets the f32 adder round; the low bits of the sum are the code. A value that rounds up to
    // the smallest normal yields exactly its code.
    let magic = (127 + 24 - bias - man_bits) << 23;
    let sub = (f32::from_bits(a) + f32::from_bits(magic))
        .to_bits()
        .wrapping_sub(magic);
    // Normal range: re-bias the exponent and round away the dropped mantissa bits.
    let shift = 23 - man_bits;
    let r = a.wrapping_sub((127 - bias) << 23);
    let normal = r.wrapping_add(((1 << (shift - 1)) - 1) + ((r >> shift) & 1)) >> shift;
    if a < (128 - bias) << 23 {
        sub
    } else {
        normal
    }
}

#[inline(always)]
fn encode_e4m3fn(x: f32) -> u8 {
    let b = x.to_bits();
    let a = b & 0x7FFF_FFFF;
    let sign = (b >> 24) & 0x80;
    let code = fp8_round_magnitude(a, 3, 7);
    // 0x7F is NaN: overflow and NaN inputs both land there.
    let code = if a > 0x7F80_0000 || code > 0x7F {
        0x7F
    } else {
        code
    };
    (code | sign) as u8
}

#[inline(always)]
fn encode_e5m2(x: f32) -> u8 {
    let b = x.to_bits();
    let a = b & 0x7FFF_FFFF;
    let sign = (b >> 24) & 0x80;
    let code = fp8_round_magnitude(a, 2, 15);
    let code = if code > 0x7C { 0x7C } else { code }; // overflow -> infinity
    let code = if a > 0x7F80_0000 { 0x7F } else { code };
    (code | sign) as u8
}

#[inline(always)]
fn encode_e4m3fnuz(x: f32) -> u8 {
    let b = x.to_bits();
    let a = b & 0x7FFF_FFFF;
    let sign = (b >> 24) & 0x80;
    let code = fp8_round_magnitude(a, 3, 8);
    // No negative zero; 0x80 is the only NaN and also what overflow gives.
    let signed = if code == 0 { 0 } else { code | sign };
    (if a > 0x7F80_0000 || code >= 0x80 {
        0x80
    } else {
        signed
    }) as u8
}

impl Fp8Kind {
    /// All fp8 kinds.
    #[allow(dead_code)] // tests, benches and fuzz targets
    pub const ALL: [Fp8Kind; 3] = [Fp8Kind::E4M3Fn, Fp8Kind::E5M2, Fp8Kind::E4M3FnUz];

    /// The largest finite value (`torch.finfo(dtype).max`): 448, 57344 or 240.
    pub const fn max(self) -> f32 {
        match self {
            Fp8Kind::E4M3Fn => 448.0,
            Fp8Kind::E5M2 => 57344.0,
            Fp8Kind::E4M3FnUz => 240.0,
        }
    }

    /// The dtype string used in safetensors headers.
    pub const fn safetensors_name(self) -> &'static str {
        match self {
            Fp8Kind::E4M3Fn => "F8_E4M3",
            Fp8Kind::E5M2 => "F8_E5M2",
            Fp8Kind::E4M3FnUz => "F8_E4M3FNUZ",
        }
    }

    /// Parses a safetensors dtype string (`F8_E4M3`, `F8_E5M2`, `F8_E4M3FNUZ`).
    pub fn from_safetensors_name(name: &str) -> Option<Fp8Kind> {
        match name {
            "F8_E4M3" => Some(Fp8Kind::E4M3Fn),
            "F8_E5M2" => Some(Fp8Kind::E5M2),
            "F8_E4M3FNUZ" => Some(Fp8Kind::E4M3FnUz),
            _ => None,
        }
    }

    /// The 256 decoded values of this format, indexed by code.
    pub fn decode_table(self) -> &'static [f32; 256] {
        match self {
            Fp8Kind::E4M3Fn => &E4M3FN_TABLE,
            Fp8Kind::E5M2 => &E5M2_TABLE,
            Fp8Kind::E4M3FnUz => &E4M3FNUZ_TABLE,
        }
    }

    /// Decodes one fp8 code to `f32` (exact).
    ///
    /// NaN codes decode to the NaN bit patterns torch's CPU conversion produces, which then
    /// propagate through dequantization: e4m3fn `0x7F`/`0xFF` → `0x7FF00000` with the sign,
    /// e5m2 NaNs → `0x7FC00000 | payload << 21` with the sign, e4m3fnuz `0x80` → `0x7FC00001`.
    #[inline]
    #[allow(dead_code)] // tests, benches and fuzz targets
    pub fn decode(self, code: u8) -> f32 {
        self.decode_table()[usize::from(code)]
    }

    /// The NaN code this format produces for a NaN input of the given sign.
    #[allow(dead_code)] // tests, benches and fuzz targets
    pub const fn nan_code(self, negative: bool) -> u8 {
        match self {
            Fp8Kind::E4M3Fn | Fp8Kind::E5M2 => {
                if negative {
                    0xFF
                } else {
                    0x7F
                }
            }
            Fp8Kind::E4M3FnUz => 0x80,
        }
    }

    /// Encodes an `f32` like torch's `.to(float8_*)` on CPU: round to nearest, ties to even.
    ///
    /// * zero keeps its sign, except in e4m3fnuz, which has no negative zero (`-0` → `0x00`,
    ///   and so does a negative value that rounds to zero);
    /// * NaN becomes [`Fp8Kind::nan_code`] with the input's sign;
    /// * past the largest finite value (quanto clamps before converting, so this only matters
    ///   for direct callers): e4m3fn gives NaN once the value rounds above 448 (from 464
    ///   exclusive), e5m2 gives ±infinity from 61440 inclusive, e4m3fnuz gives NaN from 248
    ///   inclusive. Infinities follow the same rules.
    #[inline]
    #[allow(dead_code)] // tests, benches and fuzz targets
    pub fn encode(self, x: f32) -> u8 {
        match self {
            Fp8Kind::E4M3Fn => encode_e4m3fn(x),
            Fp8Kind::E5M2 => encode_e5m2(x),
            Fp8Kind::E4M3FnUz => encode_e4m3fnuz(x),
        }
    }

    /// Encodes a slice (see [`Fp8Kind::encode`]); `out` receives `min(len)` codes.
    pub fn encode_into(self, values: &[f32], out: &mut [u8]) {
        fn run(values: &[f32], out: &mut [u8], f: impl Fn(f32) -> u8) {
            for (o, &v) in out.iter_mut().zip(values) {
                *o = f(v);
            }
        }
        match self {
            Fp8Kind::E4M3Fn => run(values, out, encode_e4m3fn),
            Fp8Kind::E5M2 => run(values, out, encode_e5m2),
            Fp8Kind::E4M3FnUz => run(values, out, encode_e4m3fnuz),
        }
    }
}

impl fmt::Display for Fp8Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use proptest::prelude::*;

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits()
    }

    /// Bit patterns that exercise every interesting region, plus a stride over all of u32.
    fn sample_bits(stride: u32) -> impl Iterator<Item = u32> {
        let specials = [
            0u32,
            0x8000_0000,
            0x7F80_0000,
            0xFF80_0000,
            0x7FC0_0000,
            0xFFC0_0000,
            0x7F80_0001,
            0x7FFF_FFFF,
            0x0000_0001,
            0x007F_FFFF,
            0x0080_0000,
            0x3380_0000,
            0x3380_0001,
            0x387F_FFFF,
            0x3880_0000,
            0x477F_E000,
            0x477F_EFFF,
            0x477F_F000,
            0x477F_F001,
            0x7F7F_FFFF,
            0x7F7F_8000,
            0x7F7F_7FFF,
            0x3F80_8000,
            0x3F81_8000,
            0x3F80_1000,
            0x3F80_3000,
        ];
        let strided = (0..=u32::MAX / stride).map(move |k| k.wrapping_mul(stride) ^ 0x1234_5677);
        specials
            .into_iter()
            .flat_map(|b| [b, b | 0x8000_0000, b.wrapping_add(1), b.wrapping_sub(1)])
            .chain(strided)
    }

    /// `half` rounds like us (RNE, overflow to infinity); NaN differs on purpose.
    fn check_bf16_against_half(x: f32) {
        let ours = bf16_bits_from_f32(x);
        if x.is_nan() {
            assert_eq!(ours, BF16_NAN_BITS);
            assert!(bf16::from_f32(x).is_nan());
        } else {
            assert_eq!(ours, bf16::from_f32(x).to_bits(), "{:#x}", x.to_bits());
        }
    }

    #[test]
    fn bf16_matches_half() {
        for b in sample_bits(4099) {
            check_bf16_against_half(f32::from_bits(b));
        }
        for h in 0..=u16::MAX {
            // half quiets signalling NaNs when widening; torch (and we) keep the bits.
            let (x, y) = (bf16::from_bits(h).to_f32(), f32_from_bf16_bits(h));
            assert!(same(y, x) || (x.is_nan() && y.is_nan()), "{h:#x}");
            assert_eq!(y.to_bits() >> 16, u32::from(h));
        }
    }

    #[test]
    fn f16_matches_half() {
        for b in sample_bits(4099) {
            let x = f32::from_bits(b);
            assert_eq!(f16_bits_from_f32(x), f16::from_f32(x).to_bits(), "{b:#x}");
        }
        for h in 0..=u16::MAX {
            let x = f16::from_bits(h).to_f32();
            assert!(same(f32_from_f16_bits(h), x), "{h:#x}");
        }
    }

    /// The f32-domain rounding helpers agree with encode-then-widen, bit for bit.
    fn check_round_helpers(x: f32) {
        let b = x.to_bits();
        let via_bf16 = f32_from_bf16_bits(bf16_bits_from_f32(x));
        let via_f16 = f32_from_f16_bits(f16_bits_from_f32(x));
        assert_eq!(round_bf16(x).to_bits(), via_bf16.to_bits(), "{b:#x}");
        assert_eq!(round_f16(x).to_bits(), via_f16.to_bits(), "{b:#x}");
        if !x.is_nan() {
            assert_eq!(
                round_bf16_non_nan(x).to_bits(),
                via_bf16.to_bits(),
                "{b:#x}"
            );
            assert_eq!(round_f16_non_nan(x).to_bits(), via_f16.to_bits(), "{b:#x}");
        }
    }

    #[test]
    fn round_helpers_consistent() {
        for b in sample_bits(4099) {
            check_round_helpers(f32::from_bits(b));
        }
    }

    /// Every f32: run with `cargo test --release -- --ignored`.
    #[test]
    #[ignore]
    fn exhaustive_against_half() {
        for b in 0..=u32::MAX {
            let x = f32::from_bits(b);
            check_bf16_against_half(x);
            assert_eq!(f16_bits_from_f32(x), f16::from_f32(x).to_bits(), "{b:#x}");
            check_round_helpers(x);
            for kind in Fp8Kind::ALL {
                assert_eq!(kind.encode(x), c10_style_encode(kind, x), "{kind:?} {b:#x}");
            }
        }
    }

    /// An independent, branchy transcription of the CPU float -> fp8 conversion algorithm
    /// (rebias + round-half-even bit trick, with the format's overflow rule), as a test oracle.
    fn c10_style_encode(kind: Fp8Kind, f: f32) -> u8 {
        let mut f_bits = f.to_bits();
        let sign = f_bits & 0x8000_0000;
        f_bits ^= sign;
        let sign8 = (sign >> 24) as u8;
        // (max_bits, min_normal_bits, denorm_mask, man_bits, bias)
        let (max_bits, min_normal, denorm, man, bias) = match kind {
            Fp8Kind::E4M3Fn => (1087u32 << 20, 121u32 << 23, 141u32 << 23, 3u32, 7u32),
            Fp8Kind::E5M2 => (143 << 23, 113 << 23, 134 << 23, 2, 15),
            Fp8Kind::E4M3FnUz => (0x87 << 23, 0x78 << 23, 0x8C << 23, 3, 8),
        };
        let result: u32 = if f_bits >= max_bits {
            match kind {
                Fp8Kind::E4M3Fn => 0x7F,
                Fp8Kind::E5M2 => {
                    if f_bits > 0x7F80_0000 {
                        0x7F
                    } else {
                        0x7C
                    }
                }
                Fp8Kind::E4M3FnUz => return 0x80,
            }
        } else if f_bits < min_normal {
            let fb = (f32::from_bits(f_bits) + f32::from_bits(denorm)).to_bits();
            let r = fb - denorm;
            if kind == Fp8Kind::E4M3FnUz && r == 0 {
                return 0;
            }
            r
        } else {
            let drop = 23 - man;
            let mant_odd = (f_bits >> drop) & 1;
            f_bits = f_bits
                .wrapping_add((bias.wrapping_sub(127) << 23).wrapping_add((1 << (drop - 1)) - 1));
            f_bits += mant_odd;
            f_bits >> drop
        };
        if kind == Fp8Kind::E4M3FnUz && result >= 0x80 {
            return 0x80;
        }
        result as u8 | sign8
    }

    #[test]
    fn fp8_encode_matches_oracle() {
        for b in sample_bits(4099) {
            let x = f32::from_bits(b);
            for kind in Fp8Kind::ALL {
                assert_eq!(kind.encode(x), c10_style_encode(kind, x), "{kind:?} {b:#x}");
            }
        }
        let vals: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.731).collect();
        for kind in Fp8Kind::ALL {
            let mut out = vec![0u8; vals.len()];
            kind.encode_into(&vals, &mut out);
            for (v, o) in vals.iter().zip(&out) {
                assert_eq!(*o, kind.encode(*v));
            }
        }
    }

    #[test]
    fn rounding_is_rne() {
        // bf16: 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (down).
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3*2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): up.
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert_eq!(round_bf16(-f32::MAX), f32::NEG_INFINITY);
        // f16: overflow threshold and smallest subnormal.
        assert_eq!(round_f16(65504.0), 65504.0);
        assert_eq!(round_f16(65519.99), 65504.0);
        assert_eq!(round_f16(65520.0), f32::INFINITY);
        assert_eq!(round_f16(2f32.powi(-25)), 0.0);
        assert_eq!(round_f16(2f32.powi(-25) * 1.0001), 2f32.powi(-24));
        assert_eq!(round_f16(3.0 * 2f32.powi(-25)), 2.0 * 2f32.powi(-24));
        assert!(round_bf16(f32::NAN).is_nan() && round_f16(f32::NAN).is_nan());
        assert!(same(round_f16(-0.0), -0.0) && same(round_bf16(-0.0), -0.0));
        assert_eq!(
            FloatDtype::F32.round(1.0 + f32::EPSILON),
            1.0 + f32::EPSILON
        );
    }

    #[test]
    fn dtype_helpers() {
        for d in FloatDtype::ALL {
            assert_eq!(
                FloatDtype::from_safetensors_name(d.safetensors_name()),
                Some(d)
            );
        }
        let bytes = FloatDtype::Bf16.encode(&[1.0, -2.5, 3.3]);
        assert_eq!(bytes.len(), 6);
        assert_eq!(FloatDtype::Bf16.read(&bytes, 1), Some(-2.5));
        assert_eq!(FloatDtype::Bf16.read(&bytes, 2), Some(round_bf16(3.3)));
        assert_eq!(FloatDtype::Bf16.read(&bytes, 3), None);
        assert_eq!(FloatDtype::Bf16.read(&bytes, usize::MAX), None);
        assert!(FloatDtype::F16.decode(&[1, 2, 3]).is_err());
        let mut out = [0f32; 2];
        assert!(FloatDtype::F32.decode_into(&[0; 4], &mut out).is_err());
        let mut v = Vec::new();
        FloatDtype::F16.push(0.1, &mut v);
        assert_eq!(v, f16::from_f32(0.1).to_bits().to_le_bytes());
        // cast: f32 -> bf16 -> f16 -> f32 over more than one block
        let vals: Vec<f32> = (0..3000).map(|i| (i as f32 - 1500.0) * 0.37).collect();
        let f32b = FloatDtype::F32.encode(&vals);
        let b = cast(FloatDtype::F32, FloatDtype::Bf16, &f32b).unwrap_or_default();
        assert_eq!(b, FloatDtype::Bf16.encode(&vals));
        let h = cast(FloatDtype::Bf16, FloatDtype::F16, &b).unwrap_or_default();
        let back = FloatDtype::F16.decode(&h).unwrap_or_default();
        for (x, y) in vals.iter().zip(&back) {
            assert!(same(*y, round_f16(round_bf16(*x))));
        }
        assert_eq!(
            cast(FloatDtype::F16, FloatDtype::F16, &h).as_deref(),
            Ok(&h[..])
        );
        assert!(cast(FloatDtype::F32, FloatDtype::F16, &[0; 5]).is_err());
    }

    fn reference_decode(kind: Fp8Kind, code: u8) -> f32 {
        // Straightforward decoding with powi, independent from the const table builder.
        let (eb, mb, bias) = match kind {
            Fp8Kind::E4M3Fn => (4, 3, 7),
            Fp8Kind::E5M2 => (5, 2, 15),
            Fp8Kind::E4M3FnUz => (4, 3, 8),
        };
        let neg = code & 0x80 != 0;
        let e = i32::from((code >> mb) & ((1 << eb) - 1));
        let m = f32::from(code & ((1 << mb) - 1));
        let v = match kind {
            Fp8Kind::E4M3FnUz if code == 0x80 => return f32::NAN,
            Fp8Kind::E4M3Fn if code & 0x7F == 0x7F => return f32::NAN,
            Fp8Kind::E5M2 if e == 31 && m == 0.0 => f32::INFINITY,
            Fp8Kind::E5M2 if e == 31 => return f32::NAN,
            _ if e == 0 => m * 2f32.powi(1 - bias - mb),
            _ => (1.0 + m / 2f32.powi(mb)) * 2f32.powi(e - bias),
        };
        if neg {
            -v
        } else {
            v
        }
    }

    #[test]
    fn fp8_decode_matches_reference() {
        for kind in Fp8Kind::ALL {
            for code in 0..=255u8 {
                let (a, b) = (kind.decode(code), reference_decode(kind, code));
                assert!(
                    same(a, b) || (a.is_nan() && b.is_nan()),
                    "{kind:?} {code:#x}"
                );
            }
            let finite_max = (0..=255u8)
                .map(|c| kind.decode(c))
                .filter(|v| v.is_finite())
                .fold(0f32, f32::max);
            assert_eq!(finite_max, kind.max());
            assert_eq!(
                Fp8Kind::from_safetensors_name(kind.safetensors_name()),
                Some(kind)
            );
        }
        assert_eq!(Fp8Kind::E4M3Fn.decode(0x01), 2f32.powi(-9));
        assert_eq!(Fp8Kind::E4M3FnUz.decode(0x01), 2f32.powi(-10));
        assert_eq!(Fp8Kind::E5M2.decode(0x01), 2f32.powi(-16));
        assert_eq!(Fp8Kind::E4M3FnUz.decode(0x7F), 240.0);
        assert_eq!(Fp8Kind::E5M2.decode(0xFC), f32::NEG_INFINITY);
    }

    #[test]
    fn fp8_roundtrip_all_codes() {
        for kind in Fp8Kind::ALL {
            for code in 0..=255u8 {
                let v = kind.decode(code);
                if v.is_nan() {
                    assert!(kind.decode(kind.encode(v)).is_nan());
                    continue;
                }
                let back = kind.encode(v);
                assert!(
                    same(kind.decode(back), v),
                    "{kind:?} {code:#x} -> {back:#x}"
                );
                if !(kind == Fp8Kind::E4M3FnUz && v == 0.0) {
                    assert_eq!(back, code, "{kind:?}");
                }
            }
        }
        assert_eq!(Fp8Kind::E4M3FnUz.encode(-0.0), 0);
        assert_eq!(Fp8Kind::E4M3Fn.encode(-0.0), 0x80);
        assert_eq!(Fp8Kind::E4M3Fn.encode(f32::NAN), 0x7F);
        assert_eq!(Fp8Kind::E4M3Fn.encode(-f32::NAN), 0xFF);
        assert_eq!(Fp8Kind::E5M2.encode(-f32::NAN), 0xFF);
        assert_eq!(Fp8Kind::E4M3FnUz.encode(-f32::NAN), 0x80);
    }

    /// Sorted finite values with their codes (one code per value; e4m3fnuz has a single zero).
    fn finite_values(kind: Fp8Kind) -> Vec<(f32, u8)> {
        let mut v: Vec<(f32, u8)> = (0..=255u8)
            .map(|c| (kind.decode(c), c))
            .filter(|(x, c)| x.is_finite() && !(*x == 0.0 && *c == 0x80))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    }

    #[test]
    fn fp8_midpoints_round_to_even() {
        for kind in Fp8Kind::ALL {
            let vals = finite_values(kind);
            for pair in vals.windows(2) {
                let [(lo, lc), (hi, hc)] = [pair[0], pair[1]];
                let mid = (lo + hi) / 2.0; // exact in f32
                let even = if lc & 1 == 0 { lc } else { hc };
                let got = kind.encode(mid);
                let want = if lo == 0.0 || hi == 0.0 {
                    // around zero the even neighbour is the zero code of the right sign
                    kind.encode(if mid < 0.0 { -0.0 } else { 0.0 })
                } else {
                    even
                };
                if !(lo == 0.0 || hi == 0.0) || kind != Fp8Kind::E4M3FnUz {
                    assert_eq!(got, want, "{kind:?} mid {mid} of {lo} {hi}");
                }
                // just inside the midpoint goes to the nearer side
                let below = f32::from_bits(mid.to_bits() - 1);
                let above = f32::from_bits(mid.to_bits() + 1);
                let (below, above) = if mid > 0.0 {
                    (below, above)
                } else {
                    (above, below)
                };
                assert!(
                    same(kind.decode(kind.encode(below)), lo) || lo == 0.0,
                    "{kind:?} {below}"
                );
                assert!(
                    same(kind.decode(kind.encode(above)), hi) || hi == 0.0,
                    "{kind:?} {above}"
                );
            }
        }
    }

    #[test]
    fn fp8_overflow_conventions() {
        let k = Fp8Kind::E4M3Fn;
        assert_eq!(k.encode(464.0), 0x7E); // tie between 448 (even) and the NaN slot
        assert_eq!(k.encode(464.5), 0x7F);
        assert_eq!(k.encode(1e6), 0x7F);
        assert_eq!(k.encode(f32::NEG_INFINITY), 0xFF);
        let k = Fp8Kind::E5M2;
        assert_eq!(k.encode(61439.0), 0x7B);
        assert_eq!(k.encode(61440.0), 0x7C);
        assert_eq!(k.encode(-1e9), 0xFC);
        assert_eq!(k.encode(f32::INFINITY), 0x7C);
        let k = Fp8Kind::E4M3FnUz;
        assert_eq!(k.encode(247.9), 0x7F);
        assert_eq!(k.encode(248.0), 0x80);
        assert_eq!(k.encode(-1e9), 0x80);
        assert_eq!(k.encode(-1e-30), 0x00);
    }

    proptest! {
        #[test]
        fn fp8_encode_is_nearest_and_monotonic(bits in any::<u32>(), bits2 in any::<u32>()) {
            for kind in Fp8Kind::ALL {
                let m = kind.max();
                let x = f32::from_bits(bits);
                let y = f32::from_bits(bits2);
                if !x.is_finite() || !y.is_finite() { continue; }
                let (x, y) = (x.clamp(-m, m), y.clamp(-m, m));
                let (dx, dy) = (kind.decode(kind.encode(x)), kind.decode(kind.encode(y)));
                if x <= y { prop_assert!(dx <= dy); } else { prop_assert!(dx >= dy); }
                // nearest: no finite code is strictly closer
                let err = (f64::from(dx) - f64::from(x)).abs();
                for (v, _) in finite_values(kind) {
                    prop_assert!((f64::from(v) - f64::from(x)).abs() >= err);
                }
            }
        }

        #[test]
        fn float_roundtrip(bits in any::<u32>()) {
            let x = f32::from_bits(bits);
            for d in FloatDtype::ALL {
                let r = d.round(x);
                prop_assert!(same(d.round(r), r) || r.is_nan());
                let enc = d.encode(&[x]);
                let dec = d.decode(&enc).unwrap_or_default();
                prop_assert!(dec.len() == 1 && (same(dec[0], r) || r.is_nan()));
            }
        }
    }
}

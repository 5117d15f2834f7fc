//! The error of quanto's math and packing (its own module, so that the
//! two share it without importing each other).

use std::fmt;

/// Why a quanto tensor could not be quantized, dequantized, packed or unpacked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MathError {
    /// Quantized weights must have at least two dimensions (`[O, ...]`).
    RankTooLow {
        /// Number of dimensions of the given shape.
        rank: usize,
    },
    /// A shape with a zero-sized dimension (quanto cannot reduce over an empty row).
    EmptyDimension {
        /// The offending shape.
        shape: Vec<u64>,
    },
    /// A size computation overflowed `u64` or `usize`.
    Overflow,
    /// A group size was given for an 8-bit qtype (quanto only groups qint4 / qint2).
    GroupSizeFor8Bit {
        /// The group size that was given.
        group_size: u64,
    },
    /// A group size that is zero or does not divide the per-row element count `I`.
    InvalidGroupSize {
        /// The group size that was given.
        group_size: u64,
        /// `I = numel / O`, which the group size must divide.
        row_len: u64,
    },
    /// A byte buffer of the wrong length.
    ByteLength {
        /// Which buffer.
        what: &'static str,
        /// Expected length in bytes.
        expected: u64,
        /// Actual length in bytes.
        actual: u64,
    },
    /// A stored tensor whose shape is not the one quanto writes for this weight.
    ShapeMismatch {
        /// Which tensor.
        what: &'static str,
        /// The shape quanto writes.
        expected: Vec<u64>,
        /// The shape found.
        actual: Vec<u64>,
    },
    /// A stored tensor of the wrong dtype.
    DtypeMismatch {
        /// Which tensor.
        what: &'static str,
        /// The accepted dtype(s), as safetensors names.
        expected: &'static str,
        /// The dtype found, as a safetensors name.
        actual: &'static str,
    },
    /// A qint4 / qint2 weight without its `_shift` tensor.
    MissingShift,
    /// A `_shift` tensor given for an 8-bit weight.
    UnexpectedShift,
    /// A packing bit width other than 2 or 4.
    UnsupportedBits {
        /// The bit width requested.
        bits: u32,
    },
    /// An unpacked code that does not fit the packing bit width.
    CodeOutOfRange {
        /// The first offending value.
        value: u8,
        /// The largest allowed value, `2^bits - 1`.
        max: u8,
    },
}

impl fmt::Display for MathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MathError::RankTooLow { rank } => write!(
                f,
                "quantized weights need at least 2 dimensions, got {rank}"
            ),
            MathError::EmptyDimension { shape } => {
                write!(
                    f,
                    "cannot quantize a tensor with an empty dimension: {shape:?}"
                )
            }
            MathError::Overflow => f.write_str("tensor size overflows"),
            MathError::GroupSizeFor8Bit { group_size } => write!(
                f,
                "group size {group_size} given for an 8-bit qtype (only qint4/qint2 are grouped)"
            ),
            MathError::InvalidGroupSize {
                group_size,
                row_len,
            } => write!(
                f,
                "group size {group_size} must be a non-zero divisor of the row length {row_len}"
            ),
            MathError::ByteLength {
                what,
                expected,
                actual,
            } => write!(f, "{what}: expected {expected} bytes, got {actual}"),
            MathError::ShapeMismatch {
                what,
                expected,
                actual,
            } => write!(f, "{what}: expected shape {expected:?}, got {actual:?}"),
            MathError::DtypeMismatch {
                what,
                expected,
                actual,
            } => write!(f, "{what}: expected dtype {expected}, got {actual}"),
            MathError::MissingShift => f.write_str("qint4/qint2 weight without a _shift tensor"),
            MathError::UnexpectedShift => f.write_str("8-bit weight with a _shift tensor"),
            MathError::UnsupportedBits { bits } => {
                write!(f, "unsupported packing width {bits} (expected 2 or 4)")
            }
            MathError::CodeOutOfRange { value, max } => {
                write!(f, "code {value} does not fit (max {max})")
            }
        }
    }
}

impl std::error::Error for MathError {}

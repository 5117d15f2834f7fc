//! Element types of stored and logical tensors.

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// The element type of a tensor.
///
/// These are the safetensors dtypes whose elements are whole bytes. The
/// sub-byte MX types (`F4`, `F6_*`) are not supported in format v1.
/// The declaration order is the manifest encoding (spec/container.md, §5):
/// never reorder, only append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Dtype {
    /// Boolean, one byte.
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// FP8 E5M2.
    F8E5M2,
    /// FP8 E4M3 (finite, "fn").
    F8E4M3,
    /// FP8 E4M3 FNUZ.
    F8E4M3Fnuz,
    /// FP8 E5M2 FNUZ.
    F8E5M2Fnuz,
    /// FP8 E8M0 (scale format).
    F8E8M0,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single precision.
    F32,
    /// Complex with two F32 parts.
    C64,
    /// IEEE double precision.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

impl Dtype {
    /// Every dtype, in encoding order.
    pub const ALL: [Dtype; 19] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8E5M2,
        Dtype::F8E4M3,
        Dtype::F8E4M3Fnuz,
        Dtype::F8E5M2Fnuz,
        Dtype::F8E8M0,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::C64,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        use Dtype::*;
        match self {
            Bool | U8 | I8 | F8E5M2 | F8E4M3 | F8E4M3Fnuz | F8E5M2Fnuz | F8E8M0 => 1,
            I16 | U16 | F16 | BF16 => 2,
            I32 | U32 | F32 => 4,
            C64 | F64 | I64 | U64 => 8,
        }
    }

    /// The safetensors spelling (`"BF16"`, `"F8_E4M3"`, ...).
    pub fn name(self) -> &'static str {
        use Dtype::*;
        match self {
            Bool => "BOOL",
            U8 => "U8",
            I8 => "I8",
            F8E5M2 => "F8_E5M2",
            F8E4M3 => "F8_E4M3",
            F8E4M3Fnuz => "F8_E4M3FNUZ",
            F8E5M2Fnuz => "F8_E5M2FNUZ",
            F8E8M0 => "F8_E8M0",
            I16 => "I16",
            U16 => "U16",
            F16 => "F16",
            BF16 => "BF16",
            I32 => "I32",
            U32 => "U32",
            F32 => "F32",
            C64 => "C64",
            F64 => "F64",
            I64 => "I64",
            U64 => "U64",
        }
    }

    /// Parses the safetensors spelling.
    pub fn from_name(s: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == s)
    }

    /// True for 16- and 32-bit floats, the dtypes the float filter applies to.
    pub fn is_filterable_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32)
    }

    /// Converts to the `safetensors` crate's dtype.
    pub fn to_st(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            Dtype::Bool => S::BOOL,
            Dtype::U8 => S::U8,
            Dtype::I8 => S::I8,
            Dtype::F8E5M2 => S::F8_E5M2,
            Dtype::F8E4M3 => S::F8_E4M3,
            Dtype::F8E4M3Fnuz => S::F8_E4M3FNUZ,
            Dtype::F8E5M2Fnuz => S::F8_E5M2FNUZ,
            Dtype::F8E8M0 => S::F8_E8M0,
            Dtype::I16 => S::I16,
            Dtype::U16 => S::U16,
            Dtype::F16 => S::F16,
            Dtype::BF16 => S::BF16,
            Dtype::I32 => S::I32,
            Dtype::U32 => S::U32,
            Dtype::F32 => S::F32,
            Dtype::C64 => S::C64,
            Dtype::F64 => S::F64,
            Dtype::I64 => S::I64,
            Dtype::U64 => S::U64,
        }
    }

    /// Converts from the `safetensors` crate's dtype; sub-byte types are
    /// refused.
    pub fn from_st(d: safetensors::Dtype) -> Result<Dtype> {
        use safetensors::Dtype as S;
        Ok(match d {
            S::BOOL => Dtype::Bool,
            S::U8 => Dtype::U8,
            S::I8 => Dtype::I8,
            S::F8_E5M2 => Dtype::F8E5M2,
            S::F8_E4M3 => Dtype::F8E4M3,
            S::F8_E4M3FNUZ => Dtype::F8E4M3Fnuz,
            S::F8_E5M2FNUZ => Dtype::F8E5M2Fnuz,
            S::F8_E8M0 => Dtype::F8E8M0,
            S::I16 => Dtype::I16,
            S::U16 => Dtype::U16,
            S::F16 => Dtype::F16,
            S::BF16 => Dtype::BF16,
            S::I32 => Dtype::I32,
            S::U32 => Dtype::U32,
            S::F32 => Dtype::F32,
            S::C64 => Dtype::C64,
            S::F64 => Dtype::F64,
            S::I64 => Dtype::I64,
            S::U64 => Dtype::U64,
            other => {
                return Err(Error::new(ErrorKind::UnsupportedDtype(format!(
                    "{other:?} (sub-byte dtypes are not supported)"
                ))))
            }
        })
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Number of elements of a shape, with overflow checking.
pub fn numel(shape: &[u64]) -> Result<u64> {
    shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::overflow("the element count of a shape"))
}

/// Number of bytes of a tensor of this dtype and shape, with overflow
/// checking.
pub fn byte_len(dtype: Dtype, shape: &[u64]) -> Result<u64> {
    numel(shape)?
        .checked_mul(dtype.size() as u64)
        .ok_or_else(|| Error::overflow("the byte size of a tensor"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip_and_match_safetensors() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_name(d.name()), Some(d));
            assert_eq!(Dtype::from_st(d.to_st()).unwrap(), d);
            assert_eq!(d.to_st().bitsize(), d.size() * 8);
            // the crate's serde spelling is ours
            let st = serde_json::to_string(&d.to_st()).unwrap();
            assert_eq!(st, format!("\"{}\"", d.name()));
        }
    }

    #[test]
    fn overflowing_shapes_are_errors() {
        assert!(numel(&[1 << 32, 1 << 32]).is_err());
        assert!(byte_len(Dtype::F32, &[1 << 62, 1]).is_err());
        assert_eq!(byte_len(Dtype::BF16, &[3, 0, 5]).unwrap(), 0);
        assert_eq!(byte_len(Dtype::F32, &[]).unwrap(), 4);
    }
}

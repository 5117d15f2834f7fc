//! ggml tensor types as GGUF files name them: id, name, block size and
//! bytes per block (gguf-py 0.19.0 `GGML_QUANT_SIZES`), and which of them
//! ckptkit reads.

/// A ggml tensor type known to gguf-py 0.19.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct GgmlType {
    /// The type id stored in a tensor info.
    pub id: u32,
    /// gguf-py's name (`Q4_0`).
    pub name: &'static str,
    /// Elements per block (1 for unquantized types).
    pub block: u64,
    /// Bytes per block.
    pub bytes: u64,
    /// Whether ckptkit reads (and dequantizes) tensors of this type.
    pub readable: bool,
}

const fn t(id: u32, name: &'static str, block: u64, bytes: u64, readable: bool) -> GgmlType {
    GgmlType {
        id,
        name,
        block,
        bytes,
        readable,
    }
}

/// Every type id gguf-py 0.19.0 knows (ids 4, 5, 31-33 and 36-38 were
/// removed from ggml and are unknown).
pub(crate) const TYPES: &[GgmlType] = &[
    t(0, "F32", 1, 4, true),
    t(1, "F16", 1, 2, true),
    t(2, "Q4_0", 32, 18, true),
    t(3, "Q4_1", 32, 20, true),
    t(6, "Q5_0", 32, 22, true),
    t(7, "Q5_1", 32, 24, true),
    t(8, "Q8_0", 32, 34, true),
    t(9, "Q8_1", 32, 40, false),
    t(10, "Q2_K", 256, 84, true),
    t(11, "Q3_K", 256, 110, true),
    t(12, "Q4_K", 256, 144, true),
    t(13, "Q5_K", 256, 176, true),
    t(14, "Q6_K", 256, 210, true),
    t(15, "Q8_K", 256, 292, false),
    t(16, "IQ2_XXS", 256, 66, false),
    t(17, "IQ2_XS", 256, 74, false),
    t(18, "IQ3_XXS", 256, 98, false),
    t(19, "IQ1_S", 256, 50, false),
    t(20, "IQ4_NL", 32, 18, false),
    t(21, "IQ3_S", 256, 110, false),
    t(22, "IQ2_S", 256, 82, false),
    t(23, "IQ4_XS", 256, 136, false),
    t(24, "I8", 1, 1, true),
    t(25, "I16", 1, 2, true),
    t(26, "I32", 1, 4, true),
    t(27, "I64", 1, 8, true),
    t(28, "F64", 1, 8, true),
    t(29, "IQ1_M", 256, 56, false),
    t(30, "BF16", 1, 2, true),
    t(34, "TQ1_0", 256, 54, false),
    t(35, "TQ2_0", 256, 66, false),
    t(39, "MXFP4", 32, 17, false),
    t(40, "NVFP4", 64, 36, false),
    t(41, "Q1_0", 128, 18, false),
];

impl GgmlType {
    /// The type with this id, if gguf-py knows it.
    pub(crate) fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().copied().find(|t| t.id == id)
    }

    /// The type with this name (`Q4_0`, case-insensitive), if gguf-py knows it.
    pub(crate) fn from_name(name: &str) -> Option<GgmlType> {
        TYPES
            .iter()
            .copied()
            .find(|t| t.name.eq_ignore_ascii_case(name))
    }

    /// Whether the type is stored in blocks of several elements (ckptkit
    /// keeps such a tensor as its raw blocks, U8 `[rows, row_bytes]`).
    pub(crate) fn is_blocked(&self) -> bool {
        self.block > 1
    }

    /// The safetensors dtype an unblocked type is stored as, if any.
    pub(crate) fn plain_dtype(&self) -> Option<crate::Dtype> {
        use crate::Dtype;
        Some(match self.name {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "F64" => Dtype::F64,
            "I8" => Dtype::I8,
            "I16" => Dtype::I16,
            "I32" => Dtype::I32,
            "I64" => Dtype::I64,
            _ => return None,
        })
    }

    /// Bytes of one row of `row_len` elements, or `None` when `row_len` is
    /// not a whole number of blocks (or the product overflows).
    pub(crate) fn row_bytes(&self, row_len: u64) -> Option<u64> {
        if !row_len.is_multiple_of(self.block) {
            return None;
        }
        (row_len / self.block).checked_mul(self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_are_unique_and_sizes_match_gguf_py() {
        for (i, a) in TYPES.iter().enumerate() {
            for b in &TYPES[i + 1..] {
                assert_ne!(a.id, b.id);
                assert_ne!(a.name, b.name);
            }
        }
        // gguf-py 0.19.0 GGML_QUANT_SIZES, spelled out as its formulas (QK_K = 256)
        let q = |n| GgmlType::from_name(n).map(|t| (t.block, t.bytes));
        assert_eq!(q("Q2_K"), Some((256, 2 + 2 + 256 / 16 + 256 / 4)));
        assert_eq!(q("Q3_K"), Some((256, 2 + 256 / 4 + 256 / 8 + 12)));
        assert_eq!(q("Q4_K"), Some((256, 2 + 2 + 256 / 2 + 12)));
        assert_eq!(q("Q5_K"), Some((256, 2 + 2 + 256 / 2 + 256 / 8 + 12)));
        assert_eq!(q("Q6_K"), Some((256, 2 + 256 / 2 + 256 / 4 + 256 / 16)));
        assert_eq!(q("q8_0"), Some((32, 34)));
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::from_id(31), None);
        assert_eq!(GgmlType::from_id(30).map(|t| t.name), Some("BF16"));
    }

    #[test]
    fn row_bytes_needs_whole_blocks() {
        let q4 = GgmlType::from_name("Q4_0").unwrap();
        assert_eq!(q4.row_bytes(64), Some(36));
        assert_eq!(q4.row_bytes(48), None);
        let f = GgmlType::from_name("F16").unwrap();
        assert_eq!(f.row_bytes(3), Some(6));
        assert_eq!(f.row_bytes(u64::MAX), None);
    }
}

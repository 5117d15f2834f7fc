//! The `.ckpk` container format, versions 1 and 2: pure functions over bytes, no
//! I/O. spec/container.md is the normative description; each rule there
//! names the function here that enforces it.

pub(crate) mod filter;
pub(crate) mod gguf;
pub(crate) mod header;
pub(crate) mod layers;
pub(crate) mod lookups;
pub(crate) mod manifest;
pub(crate) mod st_hashes;
pub(crate) mod st_header;
pub(crate) mod st_schema;
pub(crate) mod validate;

pub(crate) mod bounded;
pub(crate) mod codec;
pub use codec::{decode_manifest, encode_manifest, MAX_DECODE_ALLOC};
pub use header::FixedHeader;
pub use st_header::data_order;

/// The 8 magic bytes at offset 0.
pub const MAGIC: [u8; 8] = [0x89, b'C', b'K', b'P', b'K', 0x0D, 0x0A, 0x1A];
/// Highest major version this crate reads and writes. It reads 1 and 2,
/// and writes 1 whenever the manifest needs nothing of 2
/// ([`Manifest::needs_major`](manifest::Manifest::needs_major)).
pub const VERSION_MAJOR: u16 = 2;
/// Major versions this crate reads.
pub const READ_MAJORS: [u16; 2] = [1, 2];
/// Minor version this crate writes.
pub const VERSION_MINOR: u16 = 0;
/// Size of the fixed header.
pub const HEADER_LEN: u64 = 64;
/// Shards start on multiples of this (so tensor data can be mapped aligned).
pub(crate) const SHARD_ALIGN: u64 = 64;
/// The manifest starts on a multiple of this.
pub(crate) const MANIFEST_ALIGN: u64 = 8;

/// Largest manifest a reader accepts (bytes).
pub const MAX_MANIFEST_LEN: u64 = 64 << 20;
/// Most shards in one container.
pub const MAX_SHARDS: u64 = 65_536;
/// Most stored tensors in one container (all shards); also the most
/// logical tensors (all layers) and parts (all logical tensors), since each
/// logical tensor has a part and each part names its own stored tensor.
pub const MAX_TENSORS: u64 = 1 << 20;
/// Most layers in one container.
pub const MAX_LAYERS: u64 = 1 << 20;
/// Most parts in one logical tensor.
pub const MAX_PARTS: u64 = 16;
/// Largest tensor rank.
pub const MAX_RANK: usize = 8;
/// Longest key, layer path, or shard name (bytes).
pub const MAX_NAME_LEN: usize = 4096;
/// Most `metadata` entries.
pub const MAX_METADATA_ENTRIES: usize = 4096;
/// Most provenance source files.
pub const MAX_SOURCES: usize = 4096;
/// Most extensions in one list: the top-level list, or one layer's.
pub const MAX_EXTENSIONS: usize = 4096;
/// Most extensions in one container (top level and all layers together):
/// one per layer is always possible.
pub const MAX_EXTENSIONS_TOTAL: u64 = MAX_LAYERS;
/// Most parameters in one family record (container 2.0).
pub const MAX_PARAMS: u64 = 64;
/// Most parameters of all family records together (one per layer at the
/// most layers, or 16 per layer for 65,536 layers).
pub(crate) const MAX_PARAMS_TOTAL: u64 = MAX_LAYERS;
/// Largest safetensors header (`N`), as the safetensors crate enforces.
pub const MAX_ST_HEADER_LEN: u64 = 100_000_000;
/// Smallest allowed chunk size.
pub(crate) const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest allowed chunk size: a reader never needs more scratch than this
/// per chunk.
pub(crate) const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Default chunk size for writers.
pub(crate) const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;

/// Rounds `x` up to a multiple of `a` (a power of two), with overflow
/// checking.
pub(crate) fn align_up(x: u64, a: u64) -> Option<u64> {
    debug_assert!(a.is_power_of_two());
    x.checked_add(a - 1).map(|v| v & !(a - 1))
}

#[cfg(test)]
mod tests {
    #[test]
    fn align_up_overflows_to_none() {
        assert_eq!(super::align_up(u64::MAX - 3, 64), None);
        assert_eq!(super::align_up(u64::MAX - 63, 64), Some(u64::MAX - 63));
        assert_eq!(super::align_up(65, 64), Some(128));
    }
}

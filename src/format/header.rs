//! The fixed 64-byte header at offset 0 (spec/container.md §2).

use crate::error::{Error, ErrorKind, Result};
use crate::format::manifest::{Hash, Version};
use crate::format::{HEADER_LEN, MAGIC, READ_MAJORS};

/// The decoded fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    /// Format version.
    pub version: Version,
    /// Absolute offset of the manifest.
    pub manifest_offset: u64,
    /// Length of the manifest in bytes.
    pub manifest_len: u64,
    /// blake3 over header bytes 0..32 followed by the manifest bytes.
    pub digest: Hash,
}

impl FixedHeader {
    /// Encodes the header to its 64 bytes.
    pub fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[..32].copy_from_slice(&self.prefix());
        b[32..].copy_from_slice(&self.digest);
        b
    }

    /// The first 32 bytes (everything but the digest).
    pub fn prefix(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.major.to_le_bytes());
        b[10..12].copy_from_slice(&self.version.minor.to_le_bytes());
        // 12..16: flags, zero in v1
        b[16..24].copy_from_slice(&self.manifest_offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.manifest_len.to_le_bytes());
        b
    }

    /// The digest over the header prefix and the manifest bytes.
    pub fn compute_digest(prefix: &[u8; 32], manifest: &[u8]) -> Hash {
        let mut h = blake3::Hasher::new();
        h.update(prefix);
        h.update(manifest);
        *h.finalize().as_bytes()
    }

    /// Decodes and checks the header rules H1–H4 (magic, major version,
    /// zero flags, manifest placement inside a file of `file_len` bytes).
    pub fn decode(bytes: &[u8], file_len: u64) -> Result<FixedHeader> {
        let b: &[u8; 64] = bytes
            .get(..64)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| {
                Error::new(ErrorKind::Truncated {
                    what: "fixed header",
                    needed: HEADER_LEN,
                    available: bytes.len() as u64,
                })
            })?;
        if b[0..8] != MAGIC {
            return Err(Error::new(ErrorKind::BadMagic).with_offset(0));
        }
        let major = u16::from_le_bytes([b[8], b[9]]);
        let minor = u16::from_le_bytes([b[10], b[11]]);
        if !READ_MAJORS.contains(&major) {
            return Err(Error::new(ErrorKind::UnsupportedVersion { major, minor }).with_offset(8));
        }
        if b[12..16] != [0, 0, 0, 0] {
            return Err(Error::malformed("header flags must be zero").with_offset(12));
        }
        let mut u = [0u8; 8];
        u.copy_from_slice(&b[16..24]);
        let manifest_offset = u64::from_le_bytes(u);
        u.copy_from_slice(&b[24..32]);
        let manifest_len = u64::from_le_bytes(u);
        if manifest_len > crate::format::MAX_MANIFEST_LEN {
            return Err(Error::new(ErrorKind::LimitExceeded {
                what: "manifest length",
                value: manifest_len,
                limit: crate::format::MAX_MANIFEST_LEN,
            })
            .with_offset(24));
        }
        if manifest_offset < HEADER_LEN || manifest_offset % crate::format::MANIFEST_ALIGN != 0 {
            return Err(Error::malformed(format!(
                "manifest offset {manifest_offset} must be >= 64 and a multiple of 8"
            ))
            .with_offset(16));
        }
        let end = manifest_offset
            .checked_add(manifest_len)
            .ok_or_else(|| Error::overflow("manifest end").with_offset(16))?;
        if end > file_len {
            return Err(Error::new(ErrorKind::Truncated {
                what: "manifest",
                needed: end,
                available: file_len,
            })
            .with_offset(manifest_offset));
        }
        if end != file_len {
            return Err(Error::malformed(format!(
                "the manifest must end at end of file ({end}), but the file has {file_len} bytes"
            ))
            .with_offset(end));
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&b[32..64]);
        Ok(FixedHeader {
            version: Version { major, minor },
            manifest_offset,
            manifest_len,
            digest,
        })
    }
}

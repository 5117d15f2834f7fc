//! bincode 2.0.1 encoding of the manifest, with decode limits and the
//! canonical-form rule (spec/container.md §5.1).

use bincode::config;

use crate::error::{Error, ErrorKind, Result};
use crate::format::manifest::Manifest;
use crate::format::MAX_MANIFEST_LEN;

fn cfg() -> config::Configuration {
    config::standard()
}

/// Encodes a manifest to its canonical bytes.
pub fn encode_manifest(m: &Manifest) -> Result<Vec<u8>> {
    bincode::serde::encode_to_vec(m, cfg())
        .map_err(|e| Error::new(ErrorKind::ManifestDecode(format!("encode failed: {e}"))))
}

fn decode_limited<const N: usize>(bytes: &[u8]) -> Result<(Manifest, usize)> {
    bincode::serde::decode_from_slice::<Manifest, _>(bytes, cfg().with_limit::<N>())
        .map_err(|e| Error::new(ErrorKind::ManifestDecode(e.to_string())))
}

/// Decodes manifest bytes.
///
/// Rules enforced: M1 the bytes are at most [`MAX_MANIFEST_LEN`]; M2 bincode
/// decoding succeeds with a byte limit (no length prefix can make the decoder
/// allocate more than 4x the manifest's own size); M3 every byte is consumed;
/// M4 the bytes are canonical: re-encoding the decoded value gives the same
/// bytes (so non-minimal integers are invalid).
pub fn decode_manifest(bytes: &[u8]) -> Result<Manifest> {
    let len = bytes.len() as u64;
    if len > MAX_MANIFEST_LEN {
        return Err(Error::new(ErrorKind::LimitExceeded {
            what: "manifest length",
            value: len,
            limit: MAX_MANIFEST_LEN,
        }));
    }
    // The limit bounds what bincode may claim (and so allocate) while
    // decoding; pick the smallest tier at least as large as the input.
    let (m, used) = if len <= 16 << 10 {
        decode_limited::<{ 64 << 10 }>(bytes)?
    } else if len <= 256 << 10 {
        decode_limited::<{ 1 << 20 }>(bytes)?
    } else if len <= 4 << 20 {
        decode_limited::<{ 16 << 20 }>(bytes)?
    } else {
        decode_limited::<{ 256 << 20 }>(bytes)?
    };
    if used != bytes.len() {
        return Err(Error::new(ErrorKind::ManifestDecode(format!(
            "{} trailing bytes after the manifest",
            bytes.len() - used
        )))
        .with_offset(used as u64));
    }
    let again = encode_manifest(&m)?;
    if again != bytes {
        let at = again
            .iter()
            .zip(bytes)
            .position(|(a, b)| a != b)
            .unwrap_or(again.len().min(bytes.len()));
        return Err(Error::new(ErrorKind::ManifestDecode(
            "manifest is not in canonical form (non-minimal integer encoding?)".into(),
        ))
        .with_offset(at as u64));
    }
    Ok(m)
}

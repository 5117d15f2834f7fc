//! bincode 2.0.1 encoding of the manifest, with decode limits and the
//! canonical-form rule (spec/container.md §5).

use bincode::config;
use bincode::enc::write::Writer;
use bincode::error::EncodeError;

use crate::error::{Error, ErrorKind, Result};
use crate::format::bounded::Scope;
use crate::format::manifest::Manifest;
use crate::format::MAX_MANIFEST_LEN;

/// Most bytes [`decode_manifest`] allocates, whatever its input: the
/// decoded value included, the caller's input bytes not (spec/container.md
/// §5.1 derives it from the caps, the manifest length and the in-memory
/// sizes of the manifest types on 64-bit targets).
pub const MAX_DECODE_ALLOC: u64 = 661_344_256;

/// bincode's own byte limit, a backstop only: every allocation of a decode
/// is made and checked by `format::bounded`. bincode counts the in-memory
/// size of what it decodes (8 bytes for a 1-byte length or u64), at most 8
/// per input byte, so this never binds on an input of at most
/// [`MAX_MANIFEST_LEN`] bytes.
const BINCODE_LIMIT: usize = 8 * MAX_MANIFEST_LEN as usize;

fn cfg() -> config::Configuration {
    config::standard()
}

/// Encodes a manifest to its canonical bytes.
pub fn encode_manifest(m: &Manifest) -> Result<Vec<u8>> {
    bincode::serde::encode_to_vec(m, cfg())
        .map_err(|e| Error::new(ErrorKind::ManifestDecode(format!("encode failed: {e}"))))
}

/// A bincode writer that compares what is written with the expected bytes
/// and stops at the first difference.
struct Compare<'a> {
    expected: &'a [u8],
    pos: usize,
    diff: Option<usize>,
}

impl Writer for Compare<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::result::Result<(), EncodeError> {
        let rest = self.expected.get(self.pos..).unwrap_or_default();
        let same = rest.get(..bytes.len()).is_some_and(|e| {
            // most writes are one varint: a loop beats a call to memcmp
            if bytes.len() < 32 {
                e.iter().zip(bytes).all(|(a, b)| a == b)
            } else {
                e == bytes
            }
        });
        if same {
            self.pos += bytes.len();
            return Ok(());
        }
        let same = rest.iter().zip(bytes).take_while(|(a, b)| a == b).count();
        self.diff = Some(self.pos + same);
        Err(EncodeError::Other("re-encoding differs"))
    }
}

/// Decodes manifest bytes.
///
/// Rules enforced (spec/container.md §5): M1 the bytes are at most
/// [`MAX_MANIFEST_LEN`]; M2 every declared length is checked, before
/// anything is allocated for it, against its V2 count cap (an error
/// [`ErrorKind::LimitExceeded`] with the declared count) and against the
/// bytes left (a declaration they cannot hold is refused at once), so
/// decoding allocates at most [`MAX_DECODE_ALLOC`] bytes; M3 every byte is
/// consumed; M4 the bytes are canonical: re-encoding the decoded value
/// gives the same bytes (so non-minimal integers are invalid).
pub fn decode_manifest(bytes: &[u8]) -> Result<Manifest> {
    let len = bytes.len() as u64;
    if len > MAX_MANIFEST_LEN {
        return Err(Error::new(ErrorKind::LimitExceeded {
            what: "manifest length",
            value: len,
            limit: MAX_MANIFEST_LEN,
        }));
    }
    let scope = Scope::enter(bytes);
    let decoded = bincode::serde::decode_from_slice::<Manifest, _>(
        bytes,
        cfg().with_limit::<BINCODE_LIMIT>(),
    );
    let (m, used) = match decoded {
        Ok(d) => d,
        Err(e) => {
            return Err(scope
                .error(bytes)
                .unwrap_or_else(|| Error::new(ErrorKind::ManifestDecode(describe(&e)))))
        }
    };
    drop(scope);
    if used != bytes.len() {
        return Err(Error::new(ErrorKind::ManifestDecode(format!(
            "{} trailing bytes after the manifest",
            bytes.len() - used
        )))
        .with_offset(used as u64));
    }
    // M4, without a second copy of the bytes: re-encode into a comparison
    let mut cmp = Compare {
        expected: bytes,
        pos: 0,
        diff: None,
    };
    let encoded = bincode::serde::encode_into_writer(&m, &mut cmp, cfg());
    let at = match (encoded, cmp.diff) {
        (_, Some(at)) => Some(at),
        (Ok(()), None) => (cmp.pos != bytes.len()).then_some(cmp.pos),
        (Err(e), None) => {
            return Err(Error::new(ErrorKind::ManifestDecode(format!(
                "encode failed: {e}"
            ))))
        }
    };
    if let Some(at) = at {
        return Err(Error::new(ErrorKind::ManifestDecode(
            "manifest is not in canonical form (non-minimal integer encoding?)".into(),
        ))
        .with_offset(at as u64));
    }
    Ok(m)
}

/// bincode's decode errors in words (its `Display` prints the `Debug`
/// form, such as `UnexpectedEnd { additional: 1 }`).
fn describe(e: &bincode::error::DecodeError) -> String {
    use bincode::error::DecodeError as D;
    match e {
        D::UnexpectedEnd { additional } => format!(
            "the manifest ends at least {additional} byte(s) before a value it declares \
             (truncated or corrupt)"
        ),
        D::LimitExceeded => "a declared size exceeds the decoder's limit".into(),
        D::InvalidIntegerType { .. } => "an integer has an invalid size tag".into(),
        D::UnexpectedVariant {
            type_name, found, ..
        } => {
            let t = type_name.rsplit("::").next().unwrap_or(type_name);
            format!("unknown {t} variant {found} (this reader knows version 1.x)")
        }
        D::Utf8 { inner } => format!("a string is not valid UTF-8 ({inner})"),
        D::InvalidBooleanValue(v) => format!("a boolean is {v}, not 0 or 1"),
        D::OutsideUsizeRange(v) => format!("a length of {v} does not fit this machine"),
        D::OtherString(m) => m.clone(),
        D::Serde(inner) => describe_serde(inner),
        other => format!("invalid encoding ({other:?})"),
    }
}

fn describe_serde(e: &bincode::serde::DecodeError) -> String {
    format!("a value bincode's serde support cannot decode ({e:?})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_manifests_are_described_in_words() {
        use crate::format::manifest::*;
        let m = Manifest {
            version: Version { major: 1, minor: 0 },
            metadata: [("k".to_string(), "v".to_string())].into(),
            provenance: Provenance {
                tool: "ckptkit".into(),
                tool_version: "0.1.0".into(),
                sources: vec![],
            },
            shards: vec![],
            layers: vec![Layer {
                path: "a.b".into(),
                quant: Quantization {
                    weights: WeightQuant::Quanto {
                        qtype: "qint8".into(),
                        group_size: Some(300),
                    },
                    activations: Some("qint8".into()),
                },
                tensors: vec![],
                extensions: vec![],
            }],
            extensions: vec![],
        };
        let b = encode_manifest(&m).unwrap();
        for cut in 1..b.len().min(64) {
            let e = decode_manifest(&b[..b.len() - cut]).unwrap_err();
            let t = e.to_string();
            assert!(!t.contains("UnexpectedEnd") && !t.contains("{ "), "{t}");
        }
    }
}

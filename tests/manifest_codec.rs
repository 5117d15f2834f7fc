//! Properties of the manifest encoding and of size arithmetic at the
//! boundaries.

use std::collections::BTreeMap;

use ckptkit::format::{decode_manifest, encode_manifest};
use ckptkit::Dtype;
use ckptkit::*;
use proptest::prelude::*;

fn dtype() -> impl Strategy<Value = Dtype> {
    (0usize..Dtype::ALL.len()).prop_map(|i| Dtype::ALL[i])
}

fn hash() -> impl Strategy<Value = [u8; 32]> {
    proptest::array::uniform32(any::<u8>())
}

fn shape() -> impl Strategy<Value = Vec<u64>> {
    proptest::collection::vec(prop_oneof![0u64..10, any::<u64>()], 0..5)
}

fn ext() -> impl Strategy<Value = Extension> {
    (
        ".{0,12}",
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(|(name, critical, data)| Extension {
            name,
            critical,
            data,
        })
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        Just(Role::Data),
        Just(Role::Scale),
        Just(Role::Shift),
        Just(Role::ZeroPoint),
        ".{0,8}".prop_map(Role::Other)
    ]
}

fn part() -> impl Strategy<Value = Part> {
    (role(), any::<u32>(), ".{0,16}", dtype(), shape(), hash()).prop_map(
        |(role, shard, key, dtype, shape, blake3)| Part {
            role,
            shard,
            key,
            dtype,
            shape,
            blake3,
        },
    )
}

fn layer() -> impl Strategy<Value = Layer> {
    let wq = prop_oneof![
        Just(WeightQuant::Plain),
        (".{0,8}", proptest::option::of(any::<u64>()))
            .prop_map(|(qtype, group_size)| WeightQuant::Quanto { qtype, group_size }),
        (".{0,8}", ".{0,8}")
            .prop_map(|(layout, descriptor)| WeightQuant::Int8 { layout, descriptor }),
    ];
    let lt = (
        ".{0,8}",
        dtype(),
        shape(),
        any::<bool>(),
        proptest::collection::vec(part(), 0..3),
    )
        .prop_map(|(name, dtype, shape, q, parts)| LogicalTensor {
            name,
            dtype,
            shape,
            encoding: if q {
                Encoding::Quantized
            } else {
                Encoding::Plain
            },
            parts,
        });
    (
        ".{0,24}",
        wq,
        proptest::option::of(".{0,8}"),
        proptest::collection::vec(lt, 0..3),
        proptest::collection::vec(ext(), 0..2),
    )
        .prop_map(|(path, weights, activations, tensors, extensions)| Layer {
            path,
            quant: Quantization {
                weights,
                activations,
            },
            tensors,
            extensions,
        })
}

fn shard() -> impl Strategy<Value = Shard> {
    let st = (
        ".{0,16}",
        dtype(),
        shape(),
        hash(),
        0usize..3,
        proptest::collection::vec(any::<u32>(), 0..4),
    )
        .prop_map(|(key, dtype, shape, blake3, c, chunks)| StoredTensor {
            key,
            dtype,
            shape,
            blake3,
            codec: [Codec::Plain, Codec::Zstd, Codec::ZstdFloatPlanes][c],
            chunks,
        });
    (
        ".{0,16}",
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        hash(),
        proptest::option::of(any::<u32>()),
        proptest::collection::vec(st, 0..4),
    )
        .prop_map(
            |(name, offset, stored_len, header_len, header_blake3, cs, tensors)| Shard {
                name,
                offset,
                stored_len,
                header_len,
                header_blake3,
                compression: match cs {
                    None => Compression::None,
                    Some(chunk_size) => Compression::Zstd { chunk_size },
                },
                tensors,
            },
        )
}

fn manifest() -> impl Strategy<Value = Manifest> {
    (
        any::<(u16, u16)>(),
        proptest::collection::btree_map(".{0,8}", ".{0,16}", 0..4),
        (
            ".{0,8}",
            ".{0,8}",
            proptest::collection::vec(
                (".{0,12}", any::<u64>(), proptest::option::of(hash())),
                0..3,
            ),
        ),
        proptest::collection::vec(shard(), 0..3),
        proptest::collection::vec(layer(), 0..4),
        proptest::collection::vec(ext(), 0..2),
    )
        .prop_map(
            |(
                (major, minor),
                metadata,
                (tool, tool_version, sources),
                shards,
                layers,
                extensions,
            )| Manifest {
                version: Version { major, minor },
                metadata: metadata.into_iter().collect::<BTreeMap<_, _>>(),
                provenance: Provenance {
                    tool,
                    tool_version,
                    sources: sources
                        .into_iter()
                        .map(|(path, size, blake3)| SourceFile { path, size, blake3 })
                        .collect(),
                },
                shards,
                layers,
                extensions,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// encode → decode is the identity, and the encoding is canonical.
    #[test]
    fn manifest_roundtrip(m in manifest()) {
        let b = encode_manifest(&m).unwrap();
        let back = decode_manifest(&b).unwrap();
        prop_assert_eq!(&back, &m);
        prop_assert_eq!(encode_manifest(&back).unwrap(), b);
    }

    /// Any prefix, any single-byte change, or arbitrary bytes: decode
    /// returns Ok or an error, never panics; when it is Ok the value
    /// re-encodes to exactly those bytes.
    #[test]
    fn manifest_decode_never_panics(m in manifest(), cut in any::<prop::sample::Index>(), flip in any::<(prop::sample::Index, u8)>(), junk in proptest::collection::vec(any::<u8>(), 0..256)) {
        let b = encode_manifest(&m).unwrap();
        let mut variants = vec![b[..cut.index(b.len() + 1)].to_vec(), junk];
        if !b.is_empty() {
            let mut f = b.clone();
            f[flip.0.index(b.len())] ^= flip.1 | 1;
            variants.push(f);
        }
        for v in variants {
            if let Ok(d) = decode_manifest(&v) {
                prop_assert_eq!(encode_manifest(&d).unwrap(), v);
            }
        }
    }

    /// Shapes whose element or byte count overflows u64 are errors, not
    /// wrapped values; the others agree with 128-bit arithmetic. Like the
    /// safetensors crate, the element count is a left-to-right product, so
    /// a prefix that overflows is an error even if a later 0 would bring the
    /// product back (the crate refuses such a header too).
    #[test]
    fn size_arithmetic_at_the_boundaries(s in proptest::collection::vec(prop_oneof![any::<u64>(), (1u64 << 31)..(1u64 << 33), 0u64..3], 0..5), d in 0usize..Dtype::ALL.len()) {
        let dt = Dtype::ALL[d];
        let exact: Option<u128> = s
            .iter()
            .try_fold(1u128, |a, &x| a.checked_mul(x as u128).filter(|&p| p <= u64::MAX as u128));
        let bytes = exact.and_then(|n| n.checked_mul(dt.size() as u128));
        match ckptkit::byte_len(dt, &s) {
            Ok(v) => prop_assert_eq!(Some(v as u128), bytes),
            Err(_) => prop_assert!(bytes.is_none_or(|b| b > u64::MAX as u128)),
        }
    }
}

#[test]
fn offsets_at_u64_limits_are_refused() {
    use ckptkit::format::FixedHeader;
    let h = FixedHeader {
        version: Version { major: 1, minor: 0 },
        manifest_offset: u64::MAX - 7,
        manifest_len: 16,
        digest: [0; 32],
    };
    let e = FixedHeader::decode(&h.encode(), u64::MAX).unwrap_err();
    assert!(
        matches!(e.kind(), ckptkit::ErrorKind::Overflow { .. }),
        "{e}"
    );
}

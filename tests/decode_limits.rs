//! The V2 count caps are enforced while the manifest is decoded, against
//! each declared length before anything is allocated (spec/container.md
//! §5.2), and a declaration that the manifest's bytes cannot hold is
//! refused at once.
//!
//! To show that a check happens at the length prefix, before any element
//! is decoded, several cases make the first element invalid: the error must
//! be the limit, not the invalid byte; and one under the limit must then
//! fail on that byte.

mod common;

use ckptkit::format::decode_manifest;
use ckptkit::format::{
    MAX_EXTENSIONS, MAX_EXTENSIONS_TOTAL, MAX_LAYERS, MAX_METADATA_ENTRIES, MAX_PARTS, MAX_RANK,
    MAX_SHARDS, MAX_SOURCES, MAX_TENSORS,
};
use ckptkit::ErrorKind;
use common::manifest_bytes::*;

/// Decodes and returns the error.
fn err(bytes: &[u8]) -> ckptkit::Error {
    match decode_manifest(bytes) {
        Ok(m) => panic!(
            "decoded a manifest with {} shards and {} layers",
            m.shards.len(),
            m.layers.len()
        ),
        Err(e) => e,
    }
}

/// Asserts the error is the limit `what` with exactly this value and limit.
#[track_caller]
fn assert_limit(bytes: &[u8], what: &str, value: u64, limit: u64) -> ckptkit::Error {
    let e = err(bytes);
    match e.kind() {
        ErrorKind::LimitExceeded {
            what: w,
            value: v,
            limit: l,
        } if *w == what && *v == value && *l == limit => {}
        k => panic!("expected limit `{what}` {value} > {limit}, got {k:?}"),
    }
    e
}

/// Asserts the error is a decoding error, not a limit.
#[track_caller]
fn assert_decode_error(bytes: &[u8]) -> String {
    let e = err(bytes);
    match e.kind() {
        ErrorKind::ManifestDecode(m) => m.clone(),
        k => panic!("expected a decoding error, got {k:?}"),
    }
}

/// The first layer of `n` with an invalid weight-quantization variant (9).
fn layers_first_invalid(n: u64) -> Vec<u8> {
    let mut l = seq(n, &LAYER, n);
    let first = l.len() - 5 * n as usize;
    l[first + 1] = 9;
    l
}

#[test]
fn layer_count_prefix_alone_is_refused() {
    // 13 bytes: the header fields, then the claim of 1,048,577 layers
    let b = with_layers(&seq(MAX_LAYERS + 1, &[], 0));
    assert!(b.len() < 16);
    assert_limit(&b, "layer count", MAX_LAYERS + 1, MAX_LAYERS);
}

#[test]
fn layer_count_is_refused_before_any_layer_is_decoded() {
    // 1,048,577 real empty layers whose first one is invalid: the limit is
    // reported, so the layers were never decoded ...
    let over = with_layers(&layers_first_invalid(MAX_LAYERS + 1));
    assert_limit(&over, "layer count", MAX_LAYERS + 1, MAX_LAYERS);
    // ... while at the cap the invalid byte is what fails
    let at = with_layers(&layers_first_invalid(MAX_LAYERS));
    let m = assert_decode_error(&at);
    assert!(m.contains("variant") || m.contains('9'), "{m}");
}

#[test]
fn layer_count_at_the_cap_decodes() {
    let b = with_layers(&seq(MAX_LAYERS, &LAYER, MAX_LAYERS));
    let m = decode_manifest(&b).unwrap();
    assert_eq!(m.layers.len() as u64, MAX_LAYERS);
}

#[test]
fn shard_count_is_refused_at_the_prefix() {
    let mut over = seq(MAX_SHARDS + 1, &SHARD, MAX_SHARDS + 1);
    let first = over.len() - 38 * (MAX_SHARDS as usize + 1);
    over[first + 36] = 7; // compression variant 7 does not exist
    assert_limit(
        &with_shards(&over),
        "shard count",
        MAX_SHARDS + 1,
        MAX_SHARDS,
    );
    let mut at = seq(MAX_SHARDS, &SHARD, MAX_SHARDS);
    let first = at.len() - 38 * MAX_SHARDS as usize;
    at[first + 36] = 7;
    assert_decode_error(&with_shards(&at));
    // and a prefix alone
    assert_limit(
        &with_shards(&seq(MAX_SHARDS + 1, &[], 0)),
        "shard count",
        MAX_SHARDS + 1,
        MAX_SHARDS,
    );
}

#[test]
fn stored_tensors_are_counted_over_all_shards() {
    // shard 0 holds one tensor, shard 1 declares 1,048,576: each is within
    // the cap, the sum is not
    let mut shards = Vec::new();
    varint(&mut shards, 2);
    shards.extend_from_slice(&shard(1, &STORED, 1));
    shards.extend_from_slice(&shard(MAX_TENSORS, &[], 0));
    let e = assert_limit(
        &with_shards(&shards),
        "stored tensor count",
        MAX_TENSORS + 1,
        MAX_TENSORS,
    );
    assert_eq!(e.location().shard, Some(1), "{e}");
    // with an empty shard 0 the same declaration is within the cap (and
    // then too long for the bytes)
    let mut shards = Vec::new();
    varint(&mut shards, 2);
    shards.extend_from_slice(&shard(0, &[], 0));
    shards.extend_from_slice(&shard(MAX_TENSORS, &[], 0));
    assert_decode_error(&with_shards(&shards));
}

#[test]
fn logical_tensors_are_counted_over_all_layers() {
    let mut layers = Vec::new();
    varint(&mut layers, 2);
    layers.extend_from_slice(&layer(1, &logical(&none()), 1));
    layers.extend_from_slice(&layer(MAX_TENSORS, &[], 0));
    assert_limit(
        &with_layers(&layers),
        "logical tensor count",
        MAX_TENSORS + 1,
        MAX_TENSORS,
    );
    let mut layers = Vec::new();
    varint(&mut layers, 2);
    layers.extend_from_slice(&layer(0, &[], 0));
    layers.extend_from_slice(&layer(MAX_TENSORS, &[], 0));
    assert_decode_error(&with_layers(&layers));
}

#[test]
fn parts_per_logical_tensor_are_capped() {
    // 17 real parts, the first with an invalid role (variant 9)
    let mut parts = seq(MAX_PARTS + 1, &PART, MAX_PARTS + 1);
    let first = parts.len() - 37 * (MAX_PARTS as usize + 1);
    parts[first] = 9;
    let b = with_layers(&[&[1u8][..], &layer(1, &logical(&parts), 1)].concat());
    assert_limit(&b, "parts per logical tensor", MAX_PARTS + 1, MAX_PARTS);
    let mut parts = seq(MAX_PARTS, &PART, MAX_PARTS);
    let first = parts.len() - 37 * MAX_PARTS as usize;
    parts[first] = 9;
    let b = with_layers(&[&[1u8][..], &layer(1, &logical(&parts), 1)].concat());
    assert_decode_error(&b);
}

#[test]
fn parts_are_counted_over_all_logical_tensors() {
    // one layer of 65,536 logical tensors with 16 parts each (2^20 parts,
    // 39 MB), then one more logical tensor declaring one part
    let full = logical(&seq(MAX_PARTS, &PART, MAX_PARTS));
    let n = MAX_TENSORS / MAX_PARTS;
    let mut tensors = Vec::new();
    varint(&mut tensors, n + 1);
    for _ in 0..n {
        tensors.extend_from_slice(&full);
    }
    tensors.extend_from_slice(&logical(&seq(1, &PART, 1)));
    let mut l = vec![1, 0, 0, 0];
    l.extend_from_slice(&tensors);
    l.push(0);
    assert_limit(&with_layers(&l), "part count", MAX_TENSORS + 1, MAX_TENSORS);
}

#[test]
fn rank_is_capped_in_every_shape() {
    let rank = MAX_RANK as u64;
    let shape = |n: u64| seq(n, &[1], n);
    // a stored tensor: key, dtype, shape, hash, codec, chunks
    let stored = |n: u64| [&[1, b'k', 0][..], &shape(n), &[0; 32], &[0, 0]].concat();
    let shards = [&[1u8][..], &shard(1, &stored(rank + 1), 1)].concat();
    let e = assert_limit(&with_shards(&shards), "tensor rank", rank + 1, rank);
    assert_eq!(e.location().shard, Some(0), "{e}");
    assert_eq!(e.location().tensor.as_deref(), Some("k"), "{e}");
    assert!(decode_manifest(&with_shards(
        &[&[1u8][..], &shard(1, &stored(rank), 1)].concat()
    ))
    .is_ok());

    // a logical tensor: name, dtype, shape, encoding, parts
    let lt = |n: u64| [&[1, b't', 0][..], &shape(n), &[0, 0]].concat();
    let path_layer = |t: &[u8]| [&[1u8][..], &[1, b'p', 0, 0][..], &seq(1, t, 1), &[0]].concat();
    let e = assert_limit(
        &with_layers(&path_layer(&lt(rank + 1))),
        "tensor rank",
        rank + 1,
        rank,
    );
    assert_eq!(e.location().layer.as_deref(), Some("p"), "{e}");
    assert_eq!(e.location().tensor.as_deref(), Some("t"), "{e}");
    assert!(decode_manifest(&with_layers(&path_layer(&lt(rank)))).is_ok());

    // a part: role, shard, key, dtype, shape, hash
    let part = |n: u64| [&[0, 0, 0, 0][..], &shape(n), &[0; 32]].concat();
    let with_part = |n: u64| path_layer(&logical(&seq(1, &part(n), 1)));
    assert_limit(
        &with_layers(&with_part(rank + 1)),
        "tensor rank",
        rank + 1,
        rank,
    );
    assert!(decode_manifest(&with_layers(&with_part(rank))).is_ok());
}

#[test]
fn metadata_entries_are_capped() {
    let cap = MAX_METADATA_ENTRIES as u64;
    let b = manifest(&seq(cap + 1, &[], 0), &none(), &none(), &none(), &none());
    assert_limit(&b, "metadata entries", cap + 1, cap);
    // the claim of 2^60 entries of corruption case c13
    let b = manifest(&seq(1 << 60, &[], 0), &none(), &none(), &none(), &none());
    assert_limit(&b, "metadata entries", 1 << 60, cap);
    // 4096 distinct keys decode
    let mut md = Vec::new();
    varint(&mut md, cap);
    for i in 0..cap {
        let k = format!("{i:04}");
        md.push(4);
        md.extend_from_slice(k.as_bytes());
        md.push(0);
    }
    let m = decode_manifest(&manifest(&md, &none(), &none(), &none(), &none())).unwrap();
    assert_eq!(m.metadata.len() as u64, cap);
}

#[test]
fn provenance_sources_are_capped() {
    let cap = MAX_SOURCES as u64;
    let b = manifest(
        &none(),
        &seq(cap + 1, &SOURCE, cap + 1),
        &none(),
        &none(),
        &none(),
    );
    assert_limit(&b, "provenance sources", cap + 1, cap);
    let b = manifest(&none(), &seq(cap, &SOURCE, cap), &none(), &none(), &none());
    assert_eq!(
        decode_manifest(&b).unwrap().provenance.sources.len() as u64,
        cap
    );
}

#[test]
fn extensions_are_capped_per_list_and_in_all() {
    let cap = MAX_EXTENSIONS as u64;
    // top level
    let b = manifest(
        &none(),
        &none(),
        &none(),
        &none(),
        &seq(cap + 1, &EXTENSION, cap + 1),
    );
    assert_limit(&b, "extension count", cap + 1, cap);
    let b = manifest(
        &none(),
        &none(),
        &none(),
        &none(),
        &seq(cap, &EXTENSION, cap),
    );
    assert!(decode_manifest(&b).is_ok());
    // per layer
    let l = |n: u64| [&[1u8, 1, b'p', 0, 0, 0][..], &seq(n, &EXTENSION, n)].concat();
    let e = assert_limit(&with_layers(&l(cap + 1)), "extension count", cap + 1, cap);
    assert_eq!(e.location().layer.as_deref(), Some("p"), "{e}");
    assert!(decode_manifest(&with_layers(&l(cap))).is_ok());
    // in all: 256 layers of 4096 each reach the total, one more top-level
    // extension is over it
    let per = MAX_EXTENSIONS_TOTAL / cap;
    let mut layers = Vec::new();
    varint(&mut layers, per);
    let one = [&[0u8, 0, 0, 0][..], &seq(cap, &EXTENSION, cap)].concat();
    for _ in 0..per {
        layers.extend_from_slice(&one);
    }
    let ok = manifest(&none(), &none(), &none(), &layers, &none());
    assert!(decode_manifest(&ok).is_ok());
    let over = manifest(&none(), &none(), &none(), &layers, &seq(1, &EXTENSION, 1));
    assert_limit(
        &over,
        "total extension count",
        MAX_EXTENSIONS_TOTAL + 1,
        MAX_EXTENSIONS_TOTAL,
    );
}

#[test]
fn declarations_the_bytes_cannot_hold_are_refused_at_once() {
    // within every cap, but far more than the bytes can hold: refused at
    // the prefix with what was declared and what it needs
    let cases: [(Vec<u8>, &str); 4] = [
        (with_layers(&seq(MAX_LAYERS, &[], 0)), "1048576 layers"),
        (with_shards(&seq(MAX_SHARDS, &[], 0)), "65536 shards"),
        (
            with_shards(&[&[1u8][..], &shard(MAX_TENSORS, &[], 0)].concat()),
            "1048576 stored tensors",
        ),
        (
            // a stored tensor claiming 2^30 chunks
            with_shards(
                &[
                    &[1u8][..],
                    &shard(1, &[], 0),
                    &[0, 0, 0],
                    &[0; 32],
                    &[0],
                    &seq(1 << 30, &[], 0),
                ]
                .concat(),
            ),
            "1073741824 chunks",
        ),
    ];
    for (b, what) in cases {
        let m = assert_decode_error(&b);
        assert!(m.contains(what) && m.contains("too short"), "{what}: {m}");
    }
}

#[test]
fn a_string_longer_than_the_rest_is_a_decoding_error() {
    // a metadata key claiming 2^40 bytes, 3 present
    let mut md = vec![1];
    varint(&mut md, 1 << 40);
    md.extend_from_slice(b"abc");
    assert_decode_error(&manifest(&md, &[], &[], &[], &[]));
}

#[test]
fn a_valid_manifest_whose_in_memory_claims_exceed_4x_its_size_decodes() {
    // 2,300 layers with distinct 2-byte paths: 7 bytes each encoded (16 KB),
    // but bincode's own limit counted 31 bytes each (8 per decoded length):
    // the old 64 KiB limit for inputs up to 16 KiB refused this manifest.
    let n = 2_300u64;
    let mut layers = Vec::new();
    varint(&mut layers, n);
    for i in 0..n {
        let p = [b'!' + (i / 94) as u8, b'!' + (i % 94) as u8];
        layers.extend_from_slice(&[2, p[0], p[1], 0, 0, 0, 0]);
    }
    let b = with_layers(&layers);
    assert!(b.len() <= 16 << 10, "{}", b.len());
    let m = decode_manifest(&b).unwrap();
    assert_eq!(m.layers.len() as u64, n);
}

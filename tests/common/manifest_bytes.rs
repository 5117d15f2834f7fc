//! Hand-built manifest bytes (spec/container.md §5) for the decode-limit
//! tests. Every minimal element of the manifest encodes as zero bytes: an
//! empty string or sequence is its length 0, variant 0 of an enum is 0,
//! `None` is 0, a hash is 32 zeros.
#![allow(dead_code)]

/// An empty layer: path "", Plain, no activations, no tensors, no extensions.
pub const LAYER: [u8; 5] = [0; 5];
/// A minimal logical tensor: name "", BOOL, rank 0, Plain, no parts.
pub const LOGICAL: [u8; 5] = [0; 5];
/// A minimal part: role Data, shard 0, key "", BOOL, rank 0, zero hash.
pub const PART: [u8; 37] = [0; 37];
/// A minimal stored tensor: key "", BOOL, rank 0, zero hash, Plain, no chunks.
pub const STORED: [u8; 37] = [0; 37];
/// A minimal shard: name "", offsets 0, zero hash, no compression, no tensors.
pub const SHARD: [u8; 38] = [0; 38];
/// A minimal extension: name "", not critical, no data.
pub const EXTENSION: [u8; 3] = [0; 3];
/// A minimal provenance source: path "", size 0, no hash.
pub const SOURCE: [u8; 3] = [0; 3];

/// bincode's variable-length integer.
pub fn varint(out: &mut Vec<u8>, v: u64) {
    if v < 251 {
        out.push(v as u8);
    } else if v <= u16::MAX as u64 {
        out.push(251);
        out.extend_from_slice(&(v as u16).to_le_bytes());
    } else if v <= u32::MAX as u64 {
        out.push(252);
        out.extend_from_slice(&(v as u32).to_le_bytes());
    } else {
        out.push(253);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// A sequence: the declared length, then `elements` copies of `element`.
pub fn seq(declared: u64, element: &[u8], elements: u64) -> Vec<u8> {
    let mut v = Vec::new();
    varint(&mut v, declared);
    for _ in 0..elements {
        v.extend_from_slice(element);
    }
    v
}

/// An empty sequence (or map, or string).
pub fn none() -> Vec<u8> {
    vec![0]
}

/// A manifest from its encoded parts (each with its length prefix):
/// version 1.0, `metadata`, provenance (tool "", version "", `sources`),
/// `shards`, `layers`, `extensions`. Pass a prefix alone to end the bytes
/// there (later parts then are usually empty slices).
pub fn manifest(
    metadata: &[u8],
    sources: &[u8],
    shards: &[u8],
    layers: &[u8],
    extensions: &[u8],
) -> Vec<u8> {
    let mut m = vec![1, 0];
    m.extend_from_slice(metadata);
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(sources);
    m.extend_from_slice(shards);
    m.extend_from_slice(layers);
    m.extend_from_slice(extensions);
    m
}

/// A manifest with only the layer table: `layers` is its encoding.
pub fn with_layers(layers: &[u8]) -> Vec<u8> {
    manifest(&none(), &none(), &none(), layers, &none())
}

/// A manifest with only the shard table: `shards` is its encoding.
pub fn with_shards(shards: &[u8]) -> Vec<u8> {
    manifest(&none(), &none(), shards, &none(), &none())
}

/// A shard whose tensor table declares `declared` tensors and holds
/// `present` copies of `tensor`.
pub fn shard(declared: u64, tensor: &[u8], present: u64) -> Vec<u8> {
    let mut s = SHARD[..37].to_vec();
    s.extend_from_slice(&seq(declared, tensor, present));
    s
}

/// A layer whose logical-tensor table declares `declared` tensors and
/// holds `present` copies of `tensor`, then no extensions.
pub fn layer(declared: u64, tensor: &[u8], present: u64) -> Vec<u8> {
    let mut l = vec![0, 0, 0];
    l.extend_from_slice(&seq(declared, tensor, present));
    l.push(0);
    l
}

/// A logical tensor with `parts` (encoded with their length prefix).
pub fn logical(parts: &[u8]) -> Vec<u8> {
    let mut t = LOGICAL[..4].to_vec();
    t.extend_from_slice(parts);
    t
}

//! What decoding a manifest allocates, measured by a counting allocator
//! (per thread, so the tests of this binary can run in parallel): claims
//! cost nothing in proportion to what they claim, a table is allocated
//! once at its exact size, and the peak stays within the bound that
//! spec/container.md §5.2 states ([`MAX_DECODE_ALLOC`]).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;

use ckptkit::format::{
    decode_manifest, encode_manifest, MAX_DECODE_ALLOC, MAX_EXTENSIONS, MAX_LAYERS,
    MAX_METADATA_ENTRIES, MAX_SHARDS, MAX_TENSORS,
};
use ckptkit::Dtype;
use ckptkit::*;
use common::manifest_bytes::*;

struct Counting;

thread_local! {
    static CURRENT: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    let _ = CURRENT.try_with(|c| {
        let v = c.get() + delta;
        c.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counters are plain thread-local cells that never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            count(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            count(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        count(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            count(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Decodes `bytes` and returns whether it succeeded and the peak number of
/// bytes this thread had allocated meanwhile, above what it had before.
fn decode_peak(bytes: &[u8]) -> (bool, u64) {
    let start = CURRENT.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let ok = decode_manifest(bytes).is_ok();
    let peak = PEAK.with(Cell::get) - start;
    println!(
        "{} input bytes: peak {peak} bytes allocated, decoded: {ok}",
        bytes.len()
    );
    assert!(
        peak <= MAX_DECODE_ALLOC as isize,
        "peak {peak} over the bound"
    );
    (ok, peak as u64)
}

/// Generous room for an error value and its message.
const SMALL: u64 = 16 << 10;

#[test]
fn claims_cost_nothing_in_proportion_to_what_they_claim() {
    let stored = [&[1u8][..], &shard(MAX_TENSORS, &[], 0)].concat();
    let chunks = [
        &[1u8][..],
        &shard(1, &[], 0),
        &[0, 0, 0],
        &[0; 32],
        &[0],
        &seq(1 << 30, &[], 0),
    ]
    .concat();
    let cases = [
        (
            "layers over the cap",
            with_layers(&seq(MAX_LAYERS + 1, &[], 0)),
        ),
        ("layers at the cap", with_layers(&seq(MAX_LAYERS, &[], 0))),
        ("shards at the cap", with_shards(&seq(MAX_SHARDS, &[], 0))),
        ("stored tensors at the cap", with_shards(&stored)),
        ("2^30 chunks", with_shards(&chunks)),
        (
            "metadata at the cap",
            manifest(
                &seq(MAX_METADATA_ENTRIES as u64, &[], 0),
                &[],
                &[],
                &[],
                &[],
            ),
        ),
        (
            "extensions at the cap",
            manifest(
                &none(),
                &none(),
                &none(),
                &none(),
                &seq(MAX_EXTENSIONS as u64, &[], 0),
            ),
        ),
    ];
    for (what, b) in cases {
        let (ok, peak) = decode_peak(&b);
        assert!(!ok, "{what}");
        assert!(
            peak <= SMALL,
            "{what}: {peak} bytes allocated for {} input bytes",
            b.len()
        );
    }
}

#[test]
fn real_layers_over_the_cap_are_never_decoded() {
    // 5 MB: 1,048,577 empty layers; 65 MB: 13,000,000
    for n in [MAX_LAYERS + 1, 13_000_000] {
        let b = with_layers(&seq(n, &LAYER, n));
        let (ok, peak) = decode_peak(&b);
        assert!(!ok);
        assert!(peak <= SMALL, "{n} layers: {peak} bytes allocated");
    }
}

#[test]
fn a_table_at_the_cap_is_allocated_once_at_its_size() {
    let b = with_layers(&seq(MAX_LAYERS, &LAYER, MAX_LAYERS));
    let (ok, peak) = decode_peak(&b);
    assert!(ok);
    let table = MAX_LAYERS * std::mem::size_of::<Layer>() as u64;
    // exactly the table (no growth by doubling, no second copy of the
    // manifest bytes for the canonical check), plus small change
    assert!(
        peak >= table && peak <= table + SMALL,
        "{peak} for a {table}-byte table"
    );
}

/// A manifest with a distinct 4-byte marker in every string and byte-string
/// field and every optional string set.
fn marked() -> (Vec<u8>, usize) {
    let mut n = 0;
    let mut s = || {
        n += 1;
        format!("@{n:03}")
    };
    let part = Part {
        role: Role::Other(s()),
        shard: 0,
        key: s(),
        dtype: Dtype::F32,
        shape: vec![2],
        blake3: [0; 32],
    };
    let ext = |s: &mut dyn FnMut() -> String| Extension {
        name: s(),
        critical: false,
        data: s().into_bytes(),
    };
    let mut metadata = BTreeMap::new();
    metadata.insert(s(), s());
    let m = Manifest {
        version: Version { major: 1, minor: 0 },
        metadata,
        provenance: Provenance {
            tool: s(),
            tool_version: s(),
            sources: vec![SourceFile {
                path: s(),
                size: 1,
                blake3: None,
            }],
        },
        shards: vec![Shard {
            name: s(),
            offset: 64,
            stored_len: 1,
            header_len: 1,
            header_blake3: [0; 32],
            compression: Compression::Zstd { chunk_size: 4096 },
            tensors: vec![StoredTensor {
                key: s(),
                dtype: Dtype::F32,
                shape: vec![2],
                blake3: [0; 32],
                codec: Codec::Zstd,
                chunks: vec![8],
            }],
        }],
        layers: vec![
            Layer {
                path: s(),
                quant: Quantization {
                    weights: WeightQuant::Quanto {
                        qtype: s(),
                        group_size: Some(64),
                    },
                    activations: Some(s()),
                },
                tensors: vec![LogicalTensor {
                    name: s(),
                    dtype: Dtype::F32,
                    shape: vec![2],
                    encoding: Encoding::Quantized,
                    parts: vec![part],
                }],
                extensions: vec![ext(&mut s)],
            },
            Layer {
                path: s(),
                quant: Quantization {
                    weights: WeightQuant::Int8 {
                        layout: s(),
                        descriptor: s(),
                    },
                    activations: None,
                },
                tensors: vec![],
                extensions: vec![],
            },
        ],
        extensions: vec![ext(&mut s)],
    };
    let b = encode_manifest(&m).unwrap();
    (b, n)
}

#[test]
fn every_string_is_checked_before_it_is_allocated() {
    let (b, n) = marked();
    assert!(decode_manifest(&b).is_ok());
    for i in 1..=n {
        let marker = format!("@{i:03}");
        let at = b
            .windows(4)
            .position(|w| w == marker.as_bytes())
            .unwrap_or_else(|| panic!("{marker} not in the encoding"));
        assert_eq!(b[at - 1], 4, "{marker} has its length before it");
        // the length of this string now claims 100 MiB
        let mut bad = b[..at - 1].to_vec();
        varint(&mut bad, 100 << 20);
        bad.extend_from_slice(&b[at..]);
        let (ok, peak) = decode_peak(&bad);
        assert!(!ok, "{marker}");
        assert!(peak <= SMALL, "{marker}: {peak} bytes allocated");
    }
}

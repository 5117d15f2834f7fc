//! The corruption catalogue: handcrafted malformed containers and
//! safetensors files, each refused with its specific error, never a panic.
//! spec/container.md §6 lists the rules these exercise.

mod common;

use ckptkit::format::{
    MAGIC, MAX_EXTENSIONS, MAX_LAYERS, MAX_MANIFEST_LEN, MAX_METADATA_ENTRIES, MAX_PARTS,
    MAX_TENSORS,
};
use ckptkit::ErrorKind;
use ckptkit::{Compression, Extension, Role};
use common::manifest_bytes::{layer, seq, shard, varint, with_layers, with_shards, STORED};
use common::*;

fn kind(r: ckptkit::Result<()>) -> ErrorKind {
    match r {
        Ok(()) => panic!("corrupt input was accepted"),
        Err(e) => {
            // every message names a place
            let s = e.to_string();
            assert!(!s.is_empty());
            e.into_kind()
        }
    }
}

fn msg(r: ckptkit::Result<()>) -> String {
    r.expect_err("corrupt input was accepted").to_string()
}

#[test]
fn c01_empty_file() {
    assert!(matches!(
        kind(open_verify(&[])),
        ErrorKind::Truncated { .. }
    ));
}

#[test]
fn c02_truncated_inside_fixed_header() {
    let b = base_container(false);
    assert!(matches!(
        kind(open_verify(&b[..40])),
        ErrorKind::Truncated { .. }
    ));
}

#[test]
fn c03_truncated_anywhere() {
    let b = base_container(false);
    for cut in [64, 65, 100, b.len() / 2, b.len() - 1] {
        let k = kind(open_verify(&b[..cut]));
        assert!(
            matches!(k, ErrorKind::Truncated { .. } | ErrorKind::Malformed(_)),
            "cut {cut}: {k:?}"
        );
    }
}

#[test]
fn c04_wrong_magic() {
    let mut b = base_container(false);
    b[1] = b'X';
    assert!(matches!(kind(open_verify(&b)), ErrorKind::BadMagic));
}

#[test]
fn c05_safetensors_file_is_not_a_container() {
    let mut b = 16u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}              ");
    b.extend_from_slice(&[0; 64]);
    assert!(matches!(kind(open_verify(&b)), ErrorKind::BadMagic));
}

#[test]
fn c06_future_major_version() {
    let mut b = base_container(false);
    b[8] = 3;
    refix_digest(&mut b);
    assert!(matches!(
        kind(open_verify(&b)),
        ErrorKind::UnsupportedVersion { major: 3, .. }
    ));
}

#[test]
fn c07_nonzero_flags() {
    let mut b = base_container(false);
    b[12] = 1;
    refix_digest(&mut b);
    assert!(msg(open_verify(&b)).contains("flags must be zero"));
}

#[test]
fn c08_manifest_length_past_eof() {
    let mut b = base_container(false);
    let len = u64::from_le_bytes(b[24..32].try_into().unwrap());
    b[24..32].copy_from_slice(&(len + 100).to_le_bytes());
    assert!(matches!(kind(open_verify(&b)), ErrorKind::Truncated { .. }));
}

#[test]
fn c09_oversized_manifest() {
    let mut b = base_container(false);
    b[24..32].copy_from_slice(&(MAX_MANIFEST_LEN + 1).to_le_bytes());
    assert!(matches!(
        kind(open_verify(&b)),
        ErrorKind::LimitExceeded {
            what: "manifest length",
            ..
        }
    ));
}

#[test]
fn c10_manifest_offset_misaligned() {
    let mut b = base_container(false);
    let off = u64::from_le_bytes(b[16..24].try_into().unwrap());
    b[16..24].copy_from_slice(&(off + 1).to_le_bytes());
    assert!(msg(open_verify(&b)).contains("multiple of 8"));
}

#[test]
fn c11_bytes_after_manifest() {
    let mut b = base_container(false);
    b.extend_from_slice(&[0; 8]);
    assert!(msg(open_verify(&b)).contains("must end at end of file"));
}

#[test]
fn c12_manifest_digest_mismatch() {
    let mut b = base_container(false);
    let n = b.len();
    b[n - 3] ^= 0x40;
    assert!(matches!(
        kind(open_verify(&b)),
        ErrorKind::HashMismatch { .. }
    ));
}

#[test]
fn c13_bincode_huge_length_prefix() {
    let b = base_container(false);
    // version (2 x u16 varint = 2 bytes), then metadata map length 1, then
    // a key claiming 2^40 bytes. (A map claiming 2^60 entries is c44.)
    let bad = with_manifest_bytes(&b, |m| {
        m.truncate(2);
        m.push(1);
        m.push(253);
        m.extend_from_slice(&(1u64 << 40).to_le_bytes());
        m.extend_from_slice(b"abc");
    });
    assert!(matches!(
        kind(open_verify(&bad)),
        ErrorKind::ManifestDecode(_)
    ));
}

#[test]
fn c14_trailing_bytes_in_manifest() {
    let b = base_container(false);
    let bad = with_manifest_bytes(&b, |m| m.push(0));
    assert!(msg(open_verify(&bad)).contains("trailing bytes"));
}

#[test]
fn c15_non_canonical_varint() {
    let b = base_container(false);
    // major version 1 encoded as the 3-byte form 251, 1, 0
    let bad = with_manifest_bytes(&b, |m| {
        assert_eq!(m[0], 1);
        m.splice(0..1, [251u8, 1, 0]);
    });
    assert!(msg(open_verify(&bad)).contains("canonical"));
}

#[test]
fn c16_manifest_version_differs_from_header() {
    let b = base_container(false);
    let bad = with_manifest(&b, |m| m.version.minor = 7);
    assert!(msg(open_verify(&bad)).contains("differs from header"));
}

#[test]
fn c17_shard_offset_overlapping() {
    let b = base_container(false);
    let bad = with_manifest(&b, |m| m.shards[1].offset = m.shards[0].offset);
    assert!(msg(open_verify(&bad)).contains("shard offset"));
}

#[test]
fn c18_shard_out_of_file() {
    let b = base_container(false);
    let bad = with_manifest(&b, |m| m.shards[1].stored_len = u64::MAX - 10);
    let k = kind(open_verify(&bad));
    assert!(
        matches!(k, ErrorKind::Overflow { .. } | ErrorKind::Malformed(_)),
        "{k:?}"
    );
}

#[test]
fn c19_part_points_at_missing_key() {
    let b = base_container(false);
    let bad = with_manifest(&b, |m| m.layers[0].tensors[0].parts[0].key = "nope".into());
    assert!(msg(open_verify(&bad)).contains("is not in shard"));
}

#[test]
fn c20_shape_disagrees_with_shard_header() {
    let b = base_container(false);
    // same byte size, different shape: caught by the header cross-check
    let bad = with_manifest(&b, |m| {
        let t = m.shards[0]
            .tensors
            .iter_mut()
            .find(|t| t.key == "a.weight")
            .unwrap();
        t.shape = vec![8, 4];
        for l in &mut m.layers {
            for lt in &mut l.tensors {
                for p in &mut lt.parts {
                    if p.key == "a.weight" {
                        p.shape = vec![8, 4];
                        lt.shape = vec![8, 4];
                    }
                }
            }
        }
    });
    assert!(msg(open_verify(&bad)).contains("disagrees with manifest"));
}

#[test]
fn c21_size_mismatch() {
    let b = base_container(false);
    let bad = with_manifest(&b, |m| {
        let t = &mut m.shards[1].tensors[0];
        t.shape = vec![3, 3];
    });
    assert!(msg(open_verify(&bad)).contains("stored length"));
}

#[test]
fn c22_overflowing_shape() {
    let b = base_container(false);
    let bad = with_manifest(&b, |m| {
        m.shards[1].tensors[0].shape = vec![1 << 40, 1 << 40]
    });
    assert!(matches!(
        kind(open_verify(&bad)),
        ErrorKind::Overflow { .. }
    ));
}

#[test]
fn c23_duplicate_key_in_shard_table() {
    let b = base_container(false);
    let bad = with_manifest(&b, |m| {
        let k = m.shards[0].tensors[0].key.clone();
        m.shards[0].tensors[1].key = k;
    });
    assert!(msg(open_verify(&bad)).contains("duplicate tensor key"));
}

#[test]
fn c24_tensor_hash_mismatch() {
    let mut b = base_container(false);
    let c = open_bytes(&b).unwrap();
    let s = &c.manifest().shards[0];
    let off = (s.offset + s.header_len) as usize;
    drop(c);
    b[off] ^= 1;
    // opening still works (headers intact); verification finds it
    let c = open_bytes(&b).unwrap();
    let e = c.verify().unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::HashMismatch { .. }));
    assert!(e.location().tensor.is_some(), "{e}");
}

#[test]
fn c25_shard_header_hash_mismatch() {
    let mut b = base_container(false);
    // a space of JSON padding inside the first shard's header
    let c = open_bytes(&b).unwrap();
    let s = &c.manifest().shards[0];
    let pos = (s.offset + s.header_len - 1) as usize;
    drop(c);
    b[pos] = b'\t';
    assert!(matches!(
        kind(open_verify(&b)),
        ErrorKind::HashMismatch { .. }
    ));
}

#[test]
fn c26_bad_zstd_frame() {
    let mut b = base_container(true);
    let c = open_bytes(&b).unwrap();
    let s = &c.manifest().shards[0];
    let first = s.offset + s.header_len;
    // corrupt the first byte of the first stored chunk (the plane record
    // length or the zstd magic)
    let t = &s.tensors[0];
    assert!(!t.chunks.is_empty());
    drop(c);
    b[first as usize + 5] ^= 0xFF;
    let c = open_bytes(&b).unwrap();
    let k = c.verify().unwrap_err().into_kind();
    assert!(
        matches!(k, ErrorKind::Decompress(_) | ErrorKind::HashMismatch { .. }),
        "{k:?}"
    );
}

#[test]
fn c27_wrong_chunk_count() {
    let b = base_container(true);
    let bad = with_manifest(&b, |m| m.shards[0].tensors[0].chunks.push(1));
    assert!(msg(open_verify(&bad)).contains("chunks recorded"));
}

#[test]
fn c28_chunk_size_out_of_range() {
    let b = base_container(true);
    let bad = with_manifest(&b, |m| {
        m.shards[0].compression = Compression::Zstd {
            chunk_size: 1 << 30,
        }
    });
    assert!(msg(open_verify(&bad)).contains("chunk size"));
}

#[test]
fn c29_nonzero_padding() {
    let b = base_container(false);
    let c = open_bytes(&b).unwrap();
    let s0 = c.manifest().shards[0].clone();
    let s1 = c.manifest().shards[1].clone();
    drop(c);
    let gap = (s0.offset + s0.stored_len) as usize;
    assert!(gap < s1.offset as usize, "test needs a padding gap");
    let mut bad = b.clone();
    bad[gap] = 1;
    assert!(msg(open_verify(&bad)).contains("padding byte is not zero"));
}

#[test]
fn c30_unknown_critical_extension() {
    let b = base_container(false);
    let bad = with_manifest(&b, |m| {
        m.extensions.push(Extension {
            name: "future.must-understand".into(),
            critical: true,
            data: vec![1, 2, 3],
        })
    });
    assert!(matches!(kind(open_verify(&bad)), ErrorKind::Unsupported(_)));
    // a non-critical one is skipped
    let ok = with_manifest(&b, |m| {
        m.extensions.push(Extension {
            name: "future.optional".into(),
            critical: false,
            data: vec![1, 2, 3],
        })
    });
    open_verify(&ok).unwrap();
}

#[test]
fn c31_rank_over_limit() {
    let b = base_container(false);
    let bad = with_manifest(&b, |m| m.shards[1].tensors[0].shape = vec![1; 9]);
    assert!(matches!(
        kind(open_verify(&bad)),
        ErrorKind::LimitExceeded {
            what: "tensor rank",
            ..
        }
    ));
}

#[test]
fn c32_shard_name_with_path() {
    let b = base_container(false);
    let bad = with_manifest(&b, |m| m.shards[0].name = "../evil.safetensors".into());
    assert!(msg(open_verify(&bad)).contains("not a plain file name"));
}

#[test]
fn c33_tensor_in_no_layer() {
    let b = base_container(false);
    let bad = with_manifest(&b, |m| m.layers.retain(|l| l.path != "c"));
    assert!(msg(open_verify(&bad)).contains("belongs to no layer"));
}

#[test]
fn c34_part_used_twice() {
    let b = base_container(false);
    let bad = with_manifest(&b, |m| {
        let p = m.layers[0].tensors[0].parts[0].clone();
        let mut p2 = p.clone();
        p2.role = Role::Scale;
        m.layers[0].tensors[0].parts.push(p2);
    });
    assert!(msg(open_verify(&bad)).contains("more than one part"));
}

#[test]
fn c35_unknown_quanto_qtype() {
    let b = base_container(false);
    let bad = with_manifest(&b, |m| {
        m.layers[0].quant.weights = ckptkit::WeightQuant::Quanto {
            qtype: "qint3".into(),
            group_size: None,
        }
    });
    // the format reads the record; the quanto family refuses its meaning
    // wherever the layer is used: verify, inspect and every conversion
    let e = migrate_verify(&bad).expect_err("accepted");
    assert!(e.to_string().contains("unknown quanto qtype"), "{e}");
    assert_eq!(e.location().layer.as_deref(), Some("a"), "{e}");
}

#[test]
fn c36_duplicate_keys_in_shard_json() {
    // A safetensors file whose header repeats a key: the crate would keep
    // the last one silently; we refuse.
    let json = br#"{"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
    let mut f = (json.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(json);
    f.extend_from_slice(&[1, 2]);
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("dup.safetensors");
    std::fs::write(&p, &f).unwrap();
    let e = ckptkit::SafetensorsFile::open(&p).unwrap_err();
    assert!(e.to_string().contains("duplicate key `w`"), "{e}");
}

#[test]
fn c37_small_file_claiming_huge_tensor() {
    // 1 KiB file whose header declares a 4 GiB tensor: refused from the
    // header alone, without allocating.
    let json = br#"{"w":{"dtype":"F32","shape":[1073741824],"data_offsets":[0,4294967296]}}"#;
    let mut f = (json.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(json);
    f.resize(1024, 0);
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("big.safetensors");
    std::fs::write(&p, &f).unwrap();
    let e = ckptkit::SafetensorsFile::open(&p).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::Truncated { .. }), "{e}");
}

#[test]
fn c38_upstream_overflow_header() {
    // 8 contiguous U8 tensors of 2^61-1 bytes: the safetensors crate's
    // read_metadata overflows in debug builds; our checks refuse it first.
    let mut json = String::from("{");
    let n: u64 = (1 << 61) - 1;
    for i in 0..8u64 {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            "\"t{i}\":{{\"dtype\":\"U8\",\"shape\":[{n}],\"data_offsets\":[{},{}]}}",
            i * n,
            (i + 1) * n
        ));
    }
    json.push('}');
    let mut f = (json.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(json.as_bytes());
    let e = ckptkit::fuzzing::internals::st_header::parse(&f, Some(f.len() as u64)).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            ErrorKind::Overflow { .. } | ErrorKind::Truncated { .. }
        ),
        "{e}"
    );
}

#[test]
fn c39_magic_constant_is_stable() {
    assert_eq!(MAGIC, [0x89, b'C', b'K', b'P', b'K', 0x0D, 0x0A, 0x1A]);
}

/// A safetensors file `w` (U8 [2] = [1, 2]) whose metadata holds
/// `ckptkit.blake3` = `hashes`.
fn st_with_hashes(hashes: &str) -> ckptkit::Result<ckptkit::VerifyReport> {
    let md = serde_json::json!({"ckptkit.blake3": hashes}).to_string();
    let json =
        format!(r#"{{"__metadata__":{md},"w":{{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}}}"#);
    let mut f = (json.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(json.as_bytes());
    f.extend_from_slice(&[1, 2]);
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("h.safetensors");
    std::fs::write(&p, &f).unwrap();
    ckptkit::SafetensorsFile::open(&p)?.verify()
}

#[test]
fn c40_safetensors_hash_of_other_bytes() {
    let h = blake3::hash(&[1, 3]).to_hex();
    let e = st_with_hashes(&format!(r#"{{"w":"{h}"}}"#)).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::HashMismatch { .. }), "{e}");
    // where: the tensor and the offset of its data
    assert_eq!(e.location().tensor.as_deref(), Some("w"));
    assert!(e.location().offset.is_some());
    // and the right hash passes
    let ok = blake3::hash(&[1, 2]).to_hex();
    let r = st_with_hashes(&format!(r#"{{"w":"{ok}"}}"#)).unwrap();
    assert_eq!((r.tensors, r.bytes, r.unchecked), (1, 2, 0));
}

#[test]
fn c41_safetensors_hash_names_a_missing_tensor() {
    let h = blake3::hash(&[1, 2]).to_hex();
    let e = st_with_hashes(&format!(r#"{{"w":"{h}","ghost":"{h}"}}"#)).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::Json(_)), "{e}");
    assert!(e.to_string().contains("`ghost`"), "{e}");
}

#[test]
fn c42_safetensors_hash_not_hex_or_not_an_object() {
    for bad in [
        r#"{"w":"xyz"}"#.to_string(),
        format!(r#"{{"w":"{}"}}"#, "G".repeat(64)),
        format!(r#"{{"w":"{}"}}"#, "a".repeat(66)),
        r#"["w"]"#.to_string(),
        r#"{"w":5}"#.to_string(),
    ] {
        let e = st_with_hashes(&bad).unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::Json(_)), "{bad}: {e}");
    }
}

/// V9 for int8 records: a preset name means the preset exactly, a user
/// descriptor carries its own valid, unreserved name, and a recorded name
/// never makes the reader open a file.
#[test]
fn c50_int8_records_that_contradict_the_preset_namespace() {
    use ckptkit::fuzzing::internals::int8;
    let b = base_container(false);
    let with = |layout: &str, descriptor: String| {
        let bad = with_manifest(&b, |m| {
            m.layers[0].quant.weights = ckptkit::WeightQuant::Int8 {
                layout: layout.into(),
                descriptor,
            }
        });
        let e = migrate_verify(&bad).expect_err("accepted");
        assert_eq!(e.location().layer.as_deref(), Some("a"), "{e}");
        e.to_string()
    };
    // bitsandbytes' name over another divisor (issue 10 item 6)
    let mut d = int8::preset("int8:bnb").unwrap();
    d.divisor = 63.5;
    d.scale.value = int8::ScaleValue::AbsmaxOver(63.5);
    assert!(with("int8:bnb", d.to_json()).contains("differs from the built-in preset"));
    // a reserved name that is no preset
    d.name = "int8:inhouse".into();
    assert!(with("int8:inhouse", d.to_json()).contains("reserved"));
    assert!(with("int8:inhouse", String::new()).contains("not a built-in preset"));
    // a path is not a preset, even to a valid descriptor
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("mine.json");
    d.name = "mine".into();
    std::fs::write(&f, d.to_json()).unwrap();
    assert!(int8::preset(&format!("int8:{}", f.display())).is_ok());
    assert!(with(&format!("int8:{}", f.display()), String::new()).contains("not a built-in preset"));
    // the record's name and its descriptor's agree
    assert!(with("yours", d.to_json()).contains("named `mine`"));
    // a descriptor that does not validate (a wrapped constant)
    d.constants[0].values = vec![300];
    assert!(with("mine", d.to_json()).contains("does not fit U8"));
    // and the well-formed records pass their family's rules: what stops
    // them is the next rule, that this base layer has no quantized tensor
    for (layout, desc) in [
        ("int8:bnb", String::new()),
        ("int8:bnb", int8::preset("int8:bnb").unwrap().to_json()),
    ] {
        let ok = with_manifest(&b, |m| {
            m.layers[0].quant.weights = ckptkit::WeightQuant::Int8 {
                layout: layout.into(),
                descriptor: desc,
            }
        });
        let e = migrate_verify(&ok).expect_err("a record without its tensors");
        assert!(e.to_string().contains("without a quantized tensor"), "{e}");
    }
}

/// The limit `what` (value, limit) of a refused input.
fn limit(r: ckptkit::Result<()>) -> (&'static str, u64, u64) {
    match kind(r) {
        ErrorKind::LimitExceeded { what, value, limit } => (what, value, limit),
        k => panic!("expected a limit, got {k:?}"),
    }
}

#[test]
fn c43_manifest_declares_too_many_layers() {
    // a 13-byte manifest whose layer table claims 1,048,577 layers: refused
    // at the claim (spec §5.1), nothing allocated for it
    let b = base_container(false);
    let bad = with_manifest_bytes(&b, |m| *m = with_layers(&seq(MAX_LAYERS + 1, &[], 0)));
    assert_eq!(
        limit(open_verify(&bad)),
        ("layer count", MAX_LAYERS + 1, MAX_LAYERS)
    );
}

#[test]
fn c44_metadata_map_claims_2_60_entries() {
    let b = base_container(false);
    let bad = with_manifest_bytes(&b, |m| {
        m.truncate(2);
        m.push(253);
        m.extend_from_slice(&(1u64 << 60).to_le_bytes());
    });
    assert_eq!(
        limit(open_verify(&bad)),
        ("metadata entries", 1 << 60, MAX_METADATA_ENTRIES as u64)
    );
}

#[test]
fn c45_stored_tensors_over_limit_across_shards() {
    // shard 0 has one tensor, shard 1 claims 1,048,576: each within the
    // cap, together one over; the error names shard 1
    let b = base_container(false);
    let mut shards = Vec::new();
    varint(&mut shards, 2);
    shards.extend_from_slice(&shard(1, &STORED, 1));
    shards.extend_from_slice(&shard(MAX_TENSORS, &[], 0));
    let bad = with_manifest_bytes(&b, |m| *m = with_shards(&shards));
    let e = open_verify(&bad).unwrap_err();
    assert_eq!(e.location().shard, Some(1), "{e}");
    assert_eq!(
        limit(Err(e)),
        ("stored tensor count", MAX_TENSORS + 1, MAX_TENSORS)
    );
}

#[test]
fn c46_logical_tensor_with_17_parts() {
    let b = base_container(false);
    let bad = with_manifest(&b, |m| {
        let t = &mut m.layers[0].tensors[0];
        let p = t.parts[0].clone();
        t.parts = vec![p; MAX_PARTS as usize + 1];
    });
    let e = open_verify(&bad).unwrap_err();
    assert!(
        e.location().layer.is_some() && e.location().tensor.is_some(),
        "{e}"
    );
    assert_eq!(
        limit(Err(e)),
        ("parts per logical tensor", MAX_PARTS + 1, MAX_PARTS)
    );
}

#[test]
fn c47_logical_tensors_over_limit_across_layers() {
    let b = base_container(false);
    let mut layers = Vec::new();
    varint(&mut layers, 2);
    layers.extend_from_slice(&layer(1, &[0; 5], 1));
    layers.extend_from_slice(&layer(MAX_TENSORS, &[], 0));
    let bad = with_manifest_bytes(&b, |m| *m = with_layers(&layers));
    assert_eq!(
        limit(open_verify(&bad)),
        ("logical tensor count", MAX_TENSORS + 1, MAX_TENSORS)
    );
}

#[test]
fn c48_too_many_extensions() {
    let b = base_container(false);
    let ext = Extension {
        name: "x".into(),
        critical: false,
        data: vec![],
    };
    let bad = with_manifest(&b, |m| m.extensions = vec![ext; MAX_EXTENSIONS + 1]);
    assert_eq!(
        limit(open_verify(&bad)),
        (
            "extension count",
            MAX_EXTENSIONS as u64 + 1,
            MAX_EXTENSIONS as u64
        )
    );
}

#[test]
fn c49_manifest_too_short_for_its_declarations() {
    // 1,048,576 layers (the cap) claimed by a 13-byte manifest: they need at
    // least 5 bytes each, so decoding stops at the claim
    let b = base_container(false);
    let bad = with_manifest_bytes(&b, |m| *m = with_layers(&seq(MAX_LAYERS, &[], 0)));
    let m = msg(open_verify(&bad));
    assert!(
        m.contains("too short") && m.contains("1048576 layers"),
        "{m}"
    );
}

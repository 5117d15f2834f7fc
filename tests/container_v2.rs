//! Container 2.0: family records (spec/container.md §5.2, §8). Writers write
//! the lowest version that holds the content; a reader checks a family
//! record's form; a family this reader does not know is kept, verified and
//! copied but never interpreted.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ckptkit::migrate::Target;
use ckptkit::migrate::{convert, report_layers, ConvertOptions};
use ckptkit::{Container, ContainerOptions, ContainerWriter, Dtype, ErrorKind, Layer, WeightQuant};
use ckptkit::{Encoding, LogicalTensor, Param, Part, Quantization, Role};
use common::{bf16_weights, bytes, with_manifest};

/// The record of an FP8-scaled layer, a family this version does not know.
fn fp8_record() -> WeightQuant {
    WeightQuant::Family {
        name: "x-fp8-example".into(),
        params: vec![
            Param {
                key: "scale".into(),
                value: "tensor".into(),
            },
            Param {
                key: "storage".into(),
                value: "F8_E4M3".into(),
            },
        ],
    }
}

fn part(role: Role, key: &str, dtype: Dtype, shape: &[u64]) -> Part {
    Part {
        role,
        shard: 0,
        key: key.into(),
        dtype,
        shape: shape.to_vec(),
        // filled from the shard table by the writer
        blake3: [0; 32],
    }
}

/// Layer `x` stored as FP8 data and an F32 scale under `record`, and plain
/// layer `y`; written through the writer with the given layer records (or
/// the writer's own plain grouping when `None`).
fn write(path: &Path, record: Option<WeightQuant>) -> ckptkit::Manifest {
    let tensors: Vec<(String, Dtype, Vec<u64>, Vec<u8>)> = vec![
        ("x.weight".into(), Dtype::F8E4M3, vec![4, 8], bytes(7, 32)),
        ("x.weight_scale".into(), Dtype::F32, vec![], bytes(8, 4)),
        (
            "y.weight".into(),
            Dtype::BF16,
            vec![2, 4],
            bf16_weights(9, 8),
        ),
    ];
    let mut w = ContainerWriter::create(
        path,
        ContainerOptions::default()
            .compression(None)
            .overwrite(true),
    )
    .unwrap();
    let mut plan: Vec<(String, Dtype, Vec<u64>)> = tensors
        .iter()
        .map(|(k, d, s, _)| (k.clone(), *d, s.clone()))
        .collect();
    w.begin_shard("model.safetensors", &plan, &BTreeMap::new())
        .unwrap();
    ckptkit::format::data_order(&mut plan);
    for (k, _, _) in &plan {
        let t = tensors.iter().find(|t| &t.0 == k).unwrap();
        w.write_tensor(k, &t.3).unwrap();
    }
    w.finish_shard().unwrap();
    let layers = record.map(|weights| {
        vec![
            Layer {
                path: "x".into(),
                quant: Quantization {
                    weights,
                    activations: None,
                },
                tensors: vec![LogicalTensor {
                    name: "weight".into(),
                    dtype: Dtype::BF16,
                    shape: vec![4, 8],
                    encoding: Encoding::Quantized,
                    parts: vec![
                        part(Role::Data, "x.weight", Dtype::F8E4M3, &[4, 8]),
                        part(Role::Scale, "x.weight_scale", Dtype::F32, &[]),
                    ],
                }],
                extensions: vec![],
            },
            Layer {
                path: "y".into(),
                quant: Quantization {
                    weights: WeightQuant::Plain,
                    activations: None,
                },
                tensors: vec![LogicalTensor {
                    name: "weight".into(),
                    dtype: Dtype::BF16,
                    shape: vec![2, 4],
                    encoding: Encoding::Plain,
                    parts: vec![part(Role::Data, "y.weight", Dtype::BF16, &[2, 4])],
                }],
                extensions: vec![],
            },
        ]
    });
    w.finish(layers, BTreeMap::new(), vec![]).unwrap()
}

fn major(path: &Path) -> u16 {
    Container::open(path).unwrap().manifest().version.major
}

fn fixture() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("fp8.ckpk");
    write(&p, Some(fp8_record()));
    (d, p)
}

#[test]
fn writers_write_1_0_unless_the_content_needs_2_0() {
    let d = tempfile::tempdir().unwrap();
    // plain layers only: 1.0, readable by deployed 1.x readers
    let p1 = d.path().join("plain.ckpk");
    assert_eq!(write(&p1, None).version.major, 1);
    assert_eq!(major(&p1), 1);
    let b = std::fs::read(&p1).unwrap();
    assert_eq!(u16::from_le_bytes([b[8], b[9]]), 1, "fixed header major");
    // a family record: 2.0, in the manifest and the fixed header
    let p2 = d.path().join("fp8.ckpk");
    assert_eq!(write(&p2, Some(fp8_record())).version.major, 2);
    assert_eq!(major(&p2), 2);
    let b = std::fs::read(&p2).unwrap();
    assert_eq!(u16::from_le_bytes([b[8], b[9]]), 2, "fixed header major");
    // quanto and int8 records keep 1.0
    for w in [
        WeightQuant::Quanto {
            qtype: "qint8".into(),
            group_size: None,
        },
        WeightQuant::Int8 {
            layout: "int8:bnb".into(),
            descriptor: String::new(),
        },
    ] {
        assert_eq!(w.needs_major(), 1, "{w:?}");
    }
    assert_eq!(fp8_record().needs_major(), 2);
    // a converted 1.0 container stays 1.0 (--to keep copies its records)
    let out = d.path().join("copy.ckpk");
    convert(&p1, &out, &ConvertOptions::default()).unwrap();
    assert_eq!(major(&out), 1);
}

#[test]
fn a_1_x_manifest_with_a_family_record_is_malformed() {
    // rewrite a 2.0 container's manifest to claim 1.0 (V11): a 1.x reader
    // could not have read it, so no 1.x file may hold it
    let (_d, p) = fixture();
    let b = std::fs::read(&p).unwrap();
    let bad = with_manifest(&b, |m| m.version.major = 1);
    let mut bad = bad;
    bad[8..10].copy_from_slice(&1u16.to_le_bytes());
    common::refix_digest(&mut bad);
    let e = common::open_bytes(&bad)
        .map(|_| ())
        .expect_err("a 1.0 family record");
    assert!(matches!(e.kind(), ErrorKind::Malformed(_)), "{e}");
    assert!(e.to_string().contains("2.0"), "{e}");
}

#[test]
fn family_records_have_one_canonical_form() {
    let (_d, p) = fixture();
    let b = std::fs::read(&p).unwrap();
    let refusal = |params: Vec<(&str, &str)>, name: &str| {
        let bad = with_manifest(&b, |m| {
            m.layers[0].quant.weights = WeightQuant::Family {
                name: name.into(),
                params: params
                    .iter()
                    .map(|(k, v)| Param {
                        key: (*k).into(),
                        value: (*v).into(),
                    })
                    .collect(),
            }
        });
        let e = common::open_bytes(&bad)
            .map(|_| ())
            .expect_err("a non-canonical record");
        assert_eq!(e.location().layer.as_deref(), Some("x"), "{e}");
        e
    };
    let refused = |params: Vec<(&str, &str)>, name: &str| {
        let e = refusal(params, name);
        assert!(matches!(e.kind(), ErrorKind::Malformed(_)), "{e}");
    };
    // keys out of order, and a key twice
    refused(
        vec![("storage", "F8_E4M3"), ("scale", "tensor")],
        "x-fp8-example",
    );
    refused(
        vec![("scale", "tensor"), ("scale", "tensor")],
        "x-fp8-example",
    );
    // names and keys: [a-z0-9_.-], starting with a letter, 1 to 64 bytes
    for name in ["", "FP8", "8bit", "fp8 scaled", &"f".repeat(65)] {
        refused(vec![], name);
    }
    refused(vec![("Scale", "tensor")], "x-fp8-example");
    // the families with their own variant are never written as Family
    for own in ["plain", "quanto", "int8"] {
        refused(vec![], own);
    }
    // a value longer than 4096 bytes
    let long = "a".repeat(4097);
    let e = refusal(vec![("scale", &long)], "x-fp8-example");
    assert!(
        matches!(
            e.kind(),
            ErrorKind::LimitExceeded {
                value: 4097,
                limit: 4096,
                ..
            }
        ),
        "{e}"
    );
    // and the canonical record itself opens
    common::open_bytes(&b).unwrap();
}

#[test]
fn unknown_family_opens_verifies_and_reports_its_name() {
    let (_d, p) = fixture();
    let r = ckptkit::migrate::verify(&p).unwrap();
    assert_eq!(r.tensors, 3);
    let c = Container::open(&p).unwrap();
    c.verify().unwrap();
    let rep = report_layers(c.layers());
    let x = rep.iter().find(|l| l.path == "x").unwrap();
    assert!(x.layout.contains("x-fp8-example"), "{}", x.layout);
    assert!(x.layout.contains("scale=tensor"), "{}", x.layout);
    assert!(x.layout.contains("unknown"), "{}", x.layout);
}

#[test]
fn unknown_family_is_kept_byte_for_byte_into_a_container() {
    let (d, p) = fixture();
    let out = d.path().join("kept.ckpk");
    convert(&p, &out, &ConvertOptions::default()).unwrap();
    assert_eq!(major(&out), 2);
    let (a, b) = (Container::open(&p).unwrap(), Container::open(&out).unwrap());
    assert_eq!(a.layers(), b.layers());
    // every stored byte the same
    let ea = d.path().join("a.safetensors");
    let eb = d.path().join("b.safetensors");
    a.extract_shard(0, &ea, false).unwrap();
    b.extract_shard(0, &eb, false).unwrap();
    assert_eq!(std::fs::read(&ea).unwrap(), std::fs::read(&eb).unwrap());
    ckptkit::migrate::verify(&out).unwrap();
}

#[test]
fn unknown_family_is_refused_where_its_meaning_is_needed() {
    let (d, p) = fixture();
    let cases: Vec<(&str, Target)> = vec![
        ("plain.safetensors", Target::Plain(None)),
        ("keep.safetensors", Target::Keep),
        ("plain.ckpk", Target::Plain(None)),
        ("q.ckpk", Target::parse("quanto:qint8").unwrap()),
        ("i.safetensors", Target::parse("int8").unwrap()),
    ];
    for (name, target) in cases {
        let out = d.path().join(name);
        let opts = ConvertOptions::default().target(target);
        let e = convert(&p, &out, &opts).expect_err(name);
        match e.kind() {
            ErrorKind::UnknownFamily { family, .. } => assert_eq!(family, "x-fp8-example"),
            k => panic!("{name}: {k:?} ({e})"),
        }
        assert_eq!(e.location().layer.as_deref(), Some("x"), "{name}: {e}");
        assert!(!out.exists(), "{name}: no output");
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{name}: temporaries {left:?}");
    }
}

//! The test vectors of spec/vectors/: each is regenerated from its recipe
//! and must be byte-identical to the committed file; each committed file
//! must open, verify and match its JSON rendering.
//!
//! Regenerate with `CKPTKIT_REGEN_VECTORS=1 cargo test --test vectors`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ckptkit::{Container, ContainerOptions, ContainerWriter, Dtype, ZstdOptions};
use ckptkit::{Encoding, Layer, LogicalTensor, Param, Part, Quantization, Role, WeightQuant};
use common::*;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("spec/vectors")
}

fn md() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

fn part(role: Role, key: &str) -> Part {
    Part {
        role,
        shard: 0,
        key: key.into(),
        dtype: Dtype::U8,
        shape: vec![],
        blake3: [0; 32],
    }
}

fn logical(
    name: &str,
    dtype: Dtype,
    shape: Vec<u64>,
    enc: Encoding,
    parts: Vec<Part>,
) -> LogicalTensor {
    LogicalTensor {
        name: name.into(),
        dtype,
        shape,
        encoding: enc,
        parts,
    }
}

/// Writes one vector. `quantized` adds a quanto qint8 layer record.
fn make(path: &Path, comp: Option<ZstdOptions>, records: Records) {
    let mut w = ContainerWriter::create(
        path,
        ContainerOptions::default()
            .compression(comp)
            .overwrite(true),
    )
    .unwrap();
    let mut tensors: Vec<T> = vec![
        (
            "proj.weight".into(),
            Dtype::BF16,
            vec![4, 8],
            bf16_weights(11, 32),
        ),
        (
            "proj.bias".into(),
            Dtype::BF16,
            vec![4],
            bf16_weights(12, 4),
        ),
        ("norm.weight".into(), Dtype::F32, vec![8], bytes(13, 32)),
    ];
    if records == Records::Family {
        // an FP8-stored layer under a family record (2.0): the family name
        // is one no built-in family takes (`x-`), so every reader keeps it
        tensors = vec![
            ("f.weight".into(), Dtype::F8E4M3, vec![4, 8], bytes(31, 32)),
            ("f.weight_scale".into(), Dtype::F32, vec![], bytes(32, 4)),
        ];
    }
    if records == Records::Quanto {
        tensors = vec![
            (
                "q.weight._data".into(),
                Dtype::I8,
                vec![4, 8],
                bytes(21, 32),
            ),
            (
                "q.weight._scale".into(),
                Dtype::BF16,
                vec![4, 1],
                bf16_weights(22, 4),
            ),
            ("q.bias".into(), Dtype::BF16, vec![4], bf16_weights(23, 4)),
            (
                "q.input_scale".into(),
                Dtype::BF16,
                vec![],
                vec![0x80, 0x3f],
            ),
            (
                "q.output_scale".into(),
                Dtype::BF16,
                vec![],
                vec![0x80, 0x3f],
            ),
        ];
    }
    let mut plan: Vec<(String, Dtype, Vec<u64>)> = tensors
        .iter()
        .map(|t| (t.0.clone(), t.1, t.2.clone()))
        .collect();
    w.begin_shard("model.safetensors", &plan, &md()).unwrap();
    ckptkit::format::data_order(&mut plan);
    for (k, _, _) in &plan {
        let t = tensors.iter().find(|t| &t.0 == k).unwrap();
        w.write_tensor(k, &t.3).unwrap();
    }
    w.finish_shard().unwrap();
    let layers = match records {
        Records::Writer => None,
        Records::Family => Some(vec![Layer {
            path: "f".into(),
            quant: Quantization {
                weights: WeightQuant::Family {
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
                },
                activations: None,
            },
            tensors: vec![logical(
                "weight",
                Dtype::BF16,
                vec![4, 8],
                Encoding::Quantized,
                vec![
                    part(Role::Data, "f.weight"),
                    part(Role::Scale, "f.weight_scale"),
                ],
            )],
            extensions: vec![],
        }]),
        Records::Quanto => Some(vec![Layer {
            path: "q".into(),
            quant: Quantization {
                weights: WeightQuant::Quanto {
                    qtype: "qint8".into(),
                    group_size: None,
                },
                activations: None,
            },
            tensors: vec![
                logical(
                    "weight",
                    Dtype::BF16,
                    vec![4, 8],
                    Encoding::Quantized,
                    vec![
                        part(Role::Data, "q.weight._data"),
                        part(Role::Scale, "q.weight._scale"),
                    ],
                ),
                logical(
                    "bias",
                    Dtype::BF16,
                    vec![4],
                    Encoding::Plain,
                    vec![part(Role::Data, "q.bias")],
                ),
                logical(
                    "input_scale",
                    Dtype::BF16,
                    vec![],
                    Encoding::Plain,
                    vec![part(Role::Data, "q.input_scale")],
                ),
                logical(
                    "output_scale",
                    Dtype::BF16,
                    vec![],
                    Encoding::Plain,
                    vec![part(Role::Data, "q.output_scale")],
                ),
            ],
            extensions: vec![],
        }]),
    };
    let user = BTreeMap::from([("source".to_string(), "spec/vectors recipe".to_string())]);
    w.finish(layers, user, vec![]).unwrap();
}

fn hexs(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn render(c: &Container) -> String {
    let mut tensors = serde_json::Map::new();
    for (si, s) in c.manifest().shards.iter().enumerate() {
        for t in &s.tensors {
            let b = c.read_tensor(si as u32, &t.key).unwrap();
            tensors.insert(
                t.key.clone(),
                serde_json::json!({"shard": si, "dtype": t.dtype.name(), "shape": t.shape, "hex": hexs(&b)}),
            );
        }
    }
    let v = serde_json::json!({"manifest": c.manifest(), "tensors": tensors});
    serde_json::to_string_pretty(&v).unwrap() + "\n"
}

/// The layer records a vector carries.
#[derive(Clone, Copy, PartialEq)]
enum Records {
    /// The writer's own grouping (plain layers).
    Writer,
    /// A quanto qint8 layer (1.0).
    Quanto,
    /// A family record (2.0, spec/container.md §5.2).
    Family,
}

/// name, layer records, compression (float filter, chunk size)
type Recipe = (&'static str, Records, Option<(bool, u32)>);

const VECTORS: [Recipe; 5] = [
    ("plain", Records::Writer, None),
    ("quantized", Records::Quanto, None),
    ("compressed", Records::Writer, Some((false, 4096))),
    ("filtered", Records::Writer, Some((true, 4096))),
    ("family", Records::Family, None),
];

#[test]
fn vectors_match_recipes_and_json() {
    let regen = std::env::var_os("CKPTKIT_REGEN_VECTORS").is_some();
    let tmp = tempfile::tempdir().unwrap();
    for (name, records, comp) in VECTORS {
        let comp = comp.map(|(f, cs)| {
            ZstdOptions::default()
                .level(3)
                .chunk_size(cs)
                .float_filter(f)
        });
        let fresh = tmp.path().join(format!("{name}.ckpk"));
        make(&fresh, comp, records);
        let fresh_bytes = std::fs::read(&fresh).unwrap();
        let fresh_json = render(&Container::open(&fresh).unwrap());
        let committed = dir().join(format!("{name}.ckpk"));
        let committed_json = dir().join(format!("{name}.json"));
        if regen {
            std::fs::create_dir_all(dir()).unwrap();
            std::fs::write(&committed, &fresh_bytes).unwrap();
            std::fs::write(&committed_json, &fresh_json).unwrap();
        }
        let bytes =
            std::fs::read(&committed).unwrap_or_else(|_| panic!("missing {}", committed.display()));
        assert_eq!(
            bytes, fresh_bytes,
            "{name}.ckpk differs from what the writer produces"
        );
        let c = Container::open(&committed).unwrap();
        c.verify().unwrap();
        let json = std::fs::read_to_string(&committed_json).unwrap();
        assert_eq!(render(&c), json, "{name}.json differs from the container");
    }
}

//! Grouping stored tensors into layers and logical tensors.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::format::manifest::{
    Encoding, Layer, LogicalTensor, Part, Quantization, Role, Shard, WeightQuant,
};

/// Splits a key into (module path, tensor name) at the last dot. A key whose
/// only dot is its first byte (`.a`) is a top-level name, so the split stays
/// one-to-one (`a` and `.a` must not both become ("", "a")).
pub fn split_key(key: &str) -> (&str, &str) {
    match key.rfind('.') {
        Some(i) if i > 0 => (&key[..i], &key[i + 1..]),
        _ => ("", key),
    }
}

/// Every stored tensor as a plain logical tensor of the layer named by its
/// key up to the last dot. Layers come in order of first appearance.
pub fn plain_layers(shards: &[Shard]) -> Vec<Layer> {
    let mut order: Vec<String> = Vec::new();
    let mut by_path: BTreeMap<String, Vec<LogicalTensor>> = BTreeMap::new();
    for (si, s) in shards.iter().enumerate() {
        for t in &s.tensors {
            let (path, name) = split_key(&t.key);
            let entry = by_path.entry(path.to_string()).or_insert_with(|| {
                order.push(path.to_string());
                Vec::new()
            });
            entry.push(LogicalTensor {
                name: name.to_string(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                encoding: Encoding::Plain,
                parts: vec![Part {
                    role: Role::Data,
                    shard: si as u32,
                    key: t.key.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    blake3: t.blake3,
                }],
            });
        }
    }
    order
        .into_iter()
        .map(|path| {
            let tensors = by_path.remove(&path).unwrap_or_default();
            Layer {
                path,
                quant: Quantization {
                    weights: WeightQuant::Plain,
                    activations: None,
                },
                tensors,
                extensions: Vec::new(),
            }
        })
        .collect()
}

/// Fills every part's dtype, shape and hash from the shard tables.
pub fn fill_parts(layers: &mut [Layer], shards: &[Shard]) -> Result<()> {
    let index: Vec<std::collections::HashMap<&str, usize>> = shards
        .iter()
        .map(|s| {
            s.tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.key.as_str(), i))
                .collect()
        })
        .collect();
    for l in layers.iter_mut() {
        for t in l.tensors.iter_mut() {
            for p in t.parts.iter_mut() {
                let st = index
                    .get(p.shard as usize)
                    .and_then(|m| m.get(p.key.as_str()))
                    .map(|&i| &shards[p.shard as usize].tensors[i])
                    .ok_or_else(|| {
                        Error::usage(format!(
                            "layer `{}` names `{}` in shard {}, which has no such tensor",
                            l.path, p.key, p.shard
                        ))
                    })?;
                p.dtype = st.dtype;
                p.shape = st.shape.clone();
                p.blake3 = st.blake3;
            }
        }
    }
    Ok(())
}

/// A layer as `inspect` reports it, for any source.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayerReport {
    /// Module path.
    pub path: String,
    /// Human-readable layout (`plain BF16`, `quanto qint8`, ...).
    pub layout: String,
    /// Logical tensors: name, dtype, shape.
    pub tensors: Vec<(String, String, Vec<u64>)>,
    /// Stored keys.
    pub stored: Vec<String>,
    /// Stored bytes.
    pub bytes: u64,
}

/// Describes the layers of a container from its manifest.
pub fn report_layers(layers: &[Layer]) -> Vec<LayerReport> {
    layers
        .iter()
        .map(|l| LayerReport {
            path: l.path.clone(),
            layout: layout_name(l),
            tensors: l
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.dtype.to_string(), t.shape.clone()))
                .collect(),
            stored: l.parts().map(|p| p.key.clone()).collect(),
            bytes: l
                .parts()
                .map(|p| crate::dtype::byte_len(p.dtype, &p.shape).unwrap_or(0))
                .sum(),
        })
        .collect()
}

/// The display name of a layer's layout.
pub fn layout_name(l: &Layer) -> String {
    let w = match &l.quant.weights {
        WeightQuant::Plain => {
            let d = l
                .tensors
                .iter()
                .find(|t| t.name == "weight")
                .or(l.tensors.first())
                .map(|t| t.dtype.to_string())
                .unwrap_or_default();
            format!("plain {d}")
        }
        WeightQuant::Quanto { qtype, group_size } => match group_size {
            Some(g) => format!("quanto {qtype} group {g}"),
            None => format!("quanto {qtype}"),
        },
        WeightQuant::Int8 { layout, .. } => layout.clone(),
    };
    match &l.quant.activations {
        Some(a) => format!("{w}, activations {a}"),
        None => w,
    }
}

/// Plain layers of any tensor source: every stored tensor is a plain
/// logical tensor of the layer named by its key up to the last dot.
pub fn source_layers(src: &dyn crate::io::source::TensorSource) -> Vec<Layer> {
    let shards: Vec<Shard> = src
        .files()
        .iter()
        .enumerate()
        .map(|(fi, name)| Shard {
            name: name.clone(),
            offset: 0,
            stored_len: 0,
            header_len: 0,
            header_blake3: [0; 32],
            compression: crate::format::manifest::Compression::None,
            tensors: src
                .tensors()
                .iter()
                .filter(|t| t.file == fi)
                .map(|t| crate::format::manifest::StoredTensor {
                    key: t.key.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    blake3: [0; 32],
                    codec: crate::format::manifest::Codec::Plain,
                    chunks: Vec::new(),
                })
                .collect(),
        })
        .collect();
    plain_layers(&shards)
}

/// The part of a key after its layer path and a dot (`weight._data` for
/// `a.b.weight._data` in layer `a.b`).
pub fn split_key_after<'k>(key: &'k str, path: &str) -> &'k str {
    if path.is_empty() {
        return key;
    }
    key.strip_prefix(path)
        .and_then(|r| r.strip_prefix('.'))
        .unwrap_or(key)
}

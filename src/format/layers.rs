//! Layer tables built from shard tables alone: keys split into module path
//! and tensor name, every stored tensor as a plain logical tensor, and
//! parts filled in from the shards they name. Pure: no I/O, no layouts.

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
                crate::format::lookups::add(1);
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

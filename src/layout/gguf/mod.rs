//! The `gguf` family (spec/layouts.md §8): a tensor quantized in one of
//! ggml's block types, kept as its raw blocks (U8 `[rows, row_bytes]` under
//! its own key) with its ggml type and logical shape recorded in the
//! `ckptkit.gguf.tensors` metadata entry, dequantized exactly as gguf-py
//! 0.19.0 does. GGUF inputs present their block-quantized tensors this way
//! (`io::gguf_file`), and safetensors outputs that keep them record the
//! same entry, so they read back the same.

pub(crate) mod family;
pub(crate) mod math;

use std::collections::BTreeMap;

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::format::gguf::GgmlType;
use crate::format::layers::split_key;
use crate::format::manifest::{Encoding, Layer, LogicalTensor, Param, Role, WeightQuant};
use crate::io::source::SourceTensor;
use crate::layout::family::{out_part, Detected, Detector};

/// The family's name in layer records.
pub(crate) const NAME: &str = "gguf";

/// The record of a tensor in ggml type `ty`.
pub(crate) fn record(ty: GgmlType) -> WeightQuant {
    WeightQuant::Family {
        name: NAME.into(),
        params: vec![Param {
            key: "type".into(),
            value: ty.name.into(),
        }],
    }
}

/// The ggml type of a record of this family.
pub(crate) fn type_of(w: &WeightQuant) -> Result<GgmlType> {
    let WeightQuant::Family { name, params } = w else {
        return Err(Error::layout("not a gguf record"));
    };
    if name != NAME {
        return Err(Error::layout(format!("`{name}` is not a gguf record")));
    }
    match params.as_slice() {
        [Param { key, value }] if key == "type" => GgmlType::from_name(value)
            .filter(|t| t.is_blocked() && t.readable)
            .ok_or_else(|| {
                Error::layout(format!(
                    "gguf record type `{value}` is not a ggml block type ckptkit reads"
                ))
            }),
        _ => Err(Error::layout(
            "a gguf record has exactly one parameter, type=<ggml block type>",
        )),
    }
}

/// The stored shape of the raw blocks of a tensor of logical `shape` in
/// type `ty`: `[rows, row_bytes]`, rows being every dimension but the last
/// multiplied. `None` when the last dimension is not whole blocks or the
/// sizes overflow.
pub(crate) fn stored_shape(ty: GgmlType, shape: &[u64]) -> Option<Vec<u64>> {
    let (&row, lead) = shape.split_last()?;
    let rows = crate::dtype::numel(lead).ok()?;
    let row_bytes = ty.row_bytes(row)?;
    rows.checked_mul(row_bytes)?;
    Some(vec![rows, row_bytes])
}

/// Whether `stored` holds the raw blocks of a tensor of logical `shape` in
/// type `ty`: [`stored_shape`], or rows of another whole number of blocks
/// holding the same elements in row-major order (a tensor stored reshaped,
/// as ComfyUI-GGUF stores SD convolutions in rows of 256 and ckptkit
/// tensors of more than 4 dimensions: spec/gguf.md §3, §4).
pub(crate) fn blocks_fit(ty: GgmlType, shape: &[u64], stored: &[u64]) -> bool {
    if stored_shape(ty, shape).as_deref() == Some(stored) {
        return true;
    }
    let [rows, row_bytes] = *stored else {
        return false;
    };
    let n = crate::dtype::numel(shape).ok();
    row_elems(ty, row_bytes)
        .and_then(|r| r.checked_mul(rows))
        .is_some_and(|m| !shape.is_empty() && Some(m) == n)
}

/// The elements in a row of `row_bytes` bytes of type `ty`, when that is a
/// whole, non-zero number of blocks.
pub(crate) fn row_elems(ty: GgmlType, row_bytes: u64) -> Option<u64> {
    let size = ty.bytes;
    (size > 0 && row_bytes > 0 && row_bytes.is_multiple_of(size))
        .then(|| (row_bytes / size).checked_mul(ty.block))
        .flatten()
}

/// Reads the tensors `ckptkit.gguf.tensors` records.
pub(crate) struct GgufDetector {
    recorded: BTreeMap<String, crate::io::gguf_file::Recorded>,
}

impl GgufDetector {
    /// The detector of a source whose metadata is `metadata`.
    pub(crate) fn new(metadata: &BTreeMap<String, String>) -> Result<GgufDetector> {
        Ok(GgufDetector {
            recorded: crate::io::gguf_file::recorded_types(metadata)?,
        })
    }
}

impl Detector for GgufDetector {
    fn claim<'k>(&self, key: &'k str) -> Option<&'k str> {
        self.recorded.contains_key(key).then(|| split_key(key).0)
    }

    fn detect(
        &self,
        path: &str,
        claimed: &[&SourceTensor],
        _others: &[&SourceTensor],
    ) -> Result<Detected> {
        let t = match claimed {
            [] => return Ok(Detected::NotMine),
            [t] => *t,
            many => {
                let keys: Vec<&str> = many.iter().map(|t| t.key.as_str()).collect();
                return Err(Error::layout(format!(
                    "module `{path}` holds {} block-quantized GGUF tensors ({}); ckptkit's layer \
                     model holds one quantized tensor per module (`m.weight`, as GGUF models name \
                     them): rename them apart with --rename, or convert this file with llama.cpp",
                    many.len(),
                    keys.join(", ")
                ))
                .with_layer(path.to_string()));
            }
        };
        let Some((ty, shape, dtype)) = self.recorded.get(&t.key) else {
            return Ok(Detected::NotMine);
        };
        let want = stored_shape(*ty, shape);
        if t.dtype != Dtype::U8 || !blocks_fit(*ty, shape, &t.shape) {
            return Err(Error::layout(format!(
                "`{}` is recorded as {} {:?} (raw blocks U8 {:?}), but is stored as {} {:?}",
                t.key, ty.name, shape, want, t.dtype, t.shape
            ))
            .with_layer(path.to_string())
            .with_tensor(t.key.clone()));
        }
        let name = crate::format::layers::split_key_after(&t.key, path);
        Ok(Detected::Found {
            weight: LogicalTensor {
                name: name.to_string(),
                dtype: *dtype,
                shape: shape.clone(),
                encoding: Encoding::Quantized,
                parts: vec![out_part(
                    Role::Data,
                    t.key.clone(),
                    Dtype::U8,
                    t.shape.clone(),
                )],
            },
            record: record(*ty),
            used: vec![t.key.clone()],
        })
    }
}

/// The `ckptkit.gguf.tensors` entry for the block-quantized tensors of
/// `layers`, or `None` when they have none.
pub(crate) fn tensors_entry(layers: &[&Layer]) -> Option<String> {
    let mut m = serde_json::Map::new();
    for l in layers {
        let Ok(ty) = type_of(&l.quant.weights) else {
            continue;
        };
        for t in l.tensors.iter().filter(|t| t.encoding.is_quantized()) {
            for p in t.parts.iter().filter(|p| p.role == Role::Data) {
                let mut e = serde_json::json!({"type": ty.name, "shape": t.shape});
                if t.dtype != Dtype::F32 {
                    e["dtype"] = t.dtype.to_string().into();
                }
                m.insert(p.key.clone(), e);
            }
        }
    }
    (!m.is_empty()).then(|| serde_json::json!({"version": 1, "tensors": m}).to_string())
}

#[cfg(test)]
mod tests;

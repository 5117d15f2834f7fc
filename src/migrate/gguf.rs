//! A plan's output as a GGUF file (spec/gguf.md §4): which ggml type each
//! output tensor is written as, and the key-value metadata.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::format::gguf::read::Value;
use crate::format::gguf::write::OutTensor;
use crate::format::gguf::GgmlType;
use crate::format::manifest::{Role, WeightQuant};
use crate::migrate::plan::Plan;

/// `general.architecture`.
const ARCH_KEY: &str = "general.architecture";
/// `general.quantization_version` (2 since ggml's 2023 block formats).
const QVERSION_KEY: &str = "general.quantization_version";

/// The ggml type of an unquantized dtype, if GGUF has one.
fn ggml_of(d: crate::Dtype) -> Option<GgmlType> {
    crate::format::gguf::types::TYPES
        .iter()
        .copied()
        .find(|t| t.readable && !t.is_blocked() && t.plain_dtype() == Some(d))
}

/// The tensors of a GGUF output of plan `p`, in the plan's output order:
/// unquantized tensors as the ggml type of their dtype, `gguf` layers as
/// their blocks. Any other quantized layer, and a dtype GGUF has no type
/// for, is refused naming the tensor.
pub(crate) fn tensors(p: &Plan) -> Result<Vec<OutTensor>> {
    let mut out = Vec::new();
    for lp in &p.layers {
        let l = &lp.output;
        let block = match &l.quant.weights {
            WeightQuant::Plain => None,
            w if crate::layout::gguf::type_of(w).is_ok() => crate::layout::gguf::type_of(w).ok(),
            _ => {
                return Err(Error::usage(format!(
                    "layer `{}` would be {}, which a GGUF file cannot hold: convert it with \
                     --to plain (or keep it in a GGUF block type)",
                    l.path,
                    crate::layout::registry::layout_name(l)
                ))
                .with_layer(l.path.clone()))
            }
        };
        for t in &l.tensors {
            for part in &t.parts {
                let (ty, shape) = match block {
                    Some(ty) if t.encoding.is_quantized() && part.role == Role::Data => {
                        (ty, t.shape.clone())
                    }
                    _ => (
                        ggml_of(part.dtype).ok_or_else(|| {
                            Error::usage(format!(
                                "tensor `{}` is {}, which GGUF has no type for (it holds F32, \
                                 F16, BF16, F64, I8, I16, I32, I64 and ggml's block types)",
                                part.key, part.dtype
                            ))
                            .with_layer(l.path.clone())
                            .with_tensor(part.key.clone())
                        })?,
                        part.shape.clone(),
                    ),
                };
                // GGUF has no 0-D tensors: a scalar is written as [1]
                let shape = if shape.is_empty() { vec![1] } else { shape };
                out.push(OutTensor {
                    name: part.key.clone(),
                    ty,
                    shape,
                });
            }
        }
    }
    Ok(out)
}

/// The key-value metadata of a GGUF output: a GGUF input's own (as its
/// `ckptkit.gguf.kv` entry carries it), `general.architecture` from `arch`
/// when given (else the input's; neither is refused), and, for an input
/// that is not GGUF, `general.quantization_version` 2 when the output holds
/// block types; and ckptkit's `ckptkit.gguf.tensors` entry for the block
/// tensors (`tensors_entry`).
pub(crate) fn kvs(
    source_md: &BTreeMap<String, String>,
    arch: Option<&str>,
    tensors: &[OutTensor],
    tensors_entry: Option<String>,
) -> Result<Vec<(String, Value)>> {
    let own = crate::io::gguf_file::kv_from_metadata(source_md)?;
    let from_gguf = own.is_some();
    let mut kvs: Vec<(String, Value)> = own
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| {
            k != crate::format::gguf::read::ALIGNMENT_KEY
                && k != crate::io::gguf_writer::HASHES_KEY
                && k != crate::io::gguf_file::TENSORS_KEY
        })
        .collect();
    match (arch, kvs.iter_mut().find(|(k, _)| k == ARCH_KEY)) {
        (Some(a), Some(kv)) => kv.1 = Value::Str(a.to_string()),
        (Some(a), None) => kvs.insert(0, (ARCH_KEY.to_string(), Value::Str(a.to_string()))),
        (None, Some(_)) => {}
        (None, None) => {
            return Err(Error::usage(
                "a GGUF output needs `general.architecture`, and the input records none: give \
                 it with --gguf-arch (ComfyUI-GGUF reads flux, sd1, sdxl, sd3, aura, hidream, \
                 cosmos, ltxv, hyvid, wan, lumina2, qwen_image; llama.cpp its model families)",
            ))
        }
    }
    // a GGUF input's metadata is kept as it is
    if !from_gguf
        && tensors.iter().any(|t| t.ty.is_blocked())
        && !kvs.iter().any(|(k, _)| k == QVERSION_KEY)
    {
        kvs.push((QVERSION_KEY.to_string(), Value::U32(2)));
    }
    // the logical dtype and shape of each block tensor, so that reading the
    // file back restores them
    if let Some(e) = tensors_entry {
        kvs.push((crate::io::gguf_file::TENSORS_KEY.to_string(), Value::Str(e)));
    }
    Ok(kvs)
}

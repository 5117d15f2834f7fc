//! GGUF, llama.cpp's file format (v2 and v3, little-endian): pure functions
//! over bytes, no I/O. spec/gguf.md is the normative description of what
//! ckptkit reads and writes.

pub(crate) mod read;
pub(crate) mod types;
pub(crate) mod write;

pub(crate) use types::GgmlType;

use read::Value;

/// The key prefix of ComfyUI-GGUF's `comfy.gguf.orig_shape.<tensor name>`
/// entries: the row-major shape of a tensor stored reshaped (spec/gguf.md
/// §3, §4).
pub(crate) const ORIG_SHAPE_PREFIX: &str = "comfy.gguf.orig_shape.";

/// The shape an orig-shape entry holds: an array of non-negative i32, 1 to
/// [`read::MAX_DIMS`] of them (ComfyUI-GGUF refuses any other value type).
pub(crate) fn orig_shape(v: &Value) -> Result<Vec<u64>, String> {
    let Value::Array(5, elems) = v else {
        return Err(
            "ComfyUI-GGUF reads it as an array of i32 (a shape); this is another type".into(),
        );
    };
    if elems.is_empty() || elems.len() > read::MAX_DIMS as usize {
        return Err(format!(
            "a shape of {} dimensions (1 to {} are read)",
            elems.len(),
            read::MAX_DIMS
        ));
    }
    elems
        .iter()
        .map(|e| match e {
            Value::I32(d) => u64::try_from(*d).map_err(|_| format!("dimension {d} is negative")),
            _ => Err("an array element that is not an i32".into()),
        })
        .collect()
}

/// The orig-shape entry value of `shape`, `None` when a dimension does not
/// fit in an i32.
pub(crate) fn orig_shape_value(shape: &[u64]) -> Option<Value> {
    let dims = shape
        .iter()
        .map(|&d| i32::try_from(d).ok().map(Value::I32))
        .collect::<Option<Vec<_>>>()?;
    Some(Value::Array(5, dims))
}

#[cfg(test)]
mod tests;

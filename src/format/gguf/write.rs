//! Encoding a GGUF v3 header (spec/gguf.md §4): the key-value metadata,
//! the tensor infos and the data layout GGUFWriter uses (each tensor
//! padded to the alignment, the last one included), computed from the plan
//! before any tensor is written.

use crate::error::{Error, Result};
use crate::format::gguf::read::{Value, ALIGNMENT_KEY, DEFAULT_ALIGNMENT};
use crate::format::gguf::GgmlType;

/// Longest tensor name ckptkit writes (ComfyUI-GGUF's limit; ggml's own
/// `GGML_MAX_NAME` is 64 bytes, NUL included).
pub(crate) const MAX_WRITTEN_NAME: usize = 127;

/// One tensor of a GGUF output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OutTensor {
    /// Its name.
    pub name: String,
    /// Its type.
    pub ty: GgmlType,
    /// Its row-major shape (written reversed, as `ne`).
    pub shape: Vec<u64>,
}

/// A planned GGUF file: the header bytes, and where each tensor goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Magic to the end of the padding before the data section.
    pub header: Vec<u8>,
    /// Each tensor's name, absolute offset and byte length, in file order.
    pub tensors: Vec<(String, u64, u64)>,
    /// The file's length (the last tensor padded to the alignment).
    pub file_len: u64,
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Appends a value (without its type id).
fn value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend(x.to_le_bytes()),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::Str(s) => string(out, s),
        Value::Array(elem, items) => {
            out.extend(elem.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for i in items {
                value(out, i);
            }
        }
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
    }
}

/// Checks that an array's elements all have its element type.
fn check_value(key: &str, v: &Value) -> Result<()> {
    if let Value::Array(elem, items) = v {
        for i in items {
            if i.type_id() != *elem {
                return Err(Error::usage(format!(
                    "GGUF key `{key}`: an array of type {elem} holds a value of type {}",
                    i.type_id()
                )));
            }
            check_value(key, i)?;
        }
    }
    Ok(())
}

/// Plans a GGUF v3 file holding `kvs` (in order; `general.alignment` is
/// set to `alignment` when it is not 32, and must not be given) and
/// `tensors` (in order).
pub(crate) fn layout(
    kvs: &[(String, Value)],
    tensors: &[OutTensor],
    alignment: u64,
) -> Result<Layout> {
    if alignment == 0 || !alignment.is_power_of_two() || u32::try_from(alignment).is_err() {
        return Err(Error::usage(format!(
            "GGUF alignment {alignment} is not a u32 power of two"
        )));
    }
    let mut all: Vec<(String, Value)> = Vec::with_capacity(kvs.len() + 1);
    let mut seen = std::collections::HashSet::new();
    for (k, v) in kvs {
        if k == ALIGNMENT_KEY {
            return Err(Error::usage(format!(
                "`{ALIGNMENT_KEY}` is set from the alignment, not given as a key"
            )));
        }
        if !seen.insert(k.as_str()) {
            return Err(Error::usage(format!("GGUF key `{k}` given twice")));
        }
        check_value(k, v)?;
        all.push((k.clone(), v.clone()));
    }
    if alignment != DEFAULT_ALIGNMENT {
        all.push((ALIGNMENT_KEY.to_string(), Value::U32(alignment as u32)));
    }
    let mut h = b"GGUF".to_vec();
    h.extend(3u32.to_le_bytes());
    h.extend((tensors.len() as u64).to_le_bytes());
    h.extend((all.len() as u64).to_le_bytes());
    for (k, v) in &all {
        string(&mut h, k);
        h.extend(v.type_id().to_le_bytes());
        value(&mut h, v);
    }
    let mut placed = Vec::with_capacity(tensors.len());
    let mut next = 0u64;
    let mut names = std::collections::HashSet::new();
    for t in tensors {
        if t.name.len() > MAX_WRITTEN_NAME {
            return Err(Error::usage(format!(
                "tensor `{}`: its name has {} bytes; GGUF readers (ComfyUI-GGUF, ggml) take at \
                 most {MAX_WRITTEN_NAME}: shorten it with --rename",
                t.name,
                t.name.len()
            )));
        }
        if !names.insert(t.name.as_str()) {
            return Err(Error::usage(format!("tensor `{}` given twice", t.name)));
        }
        if t.shape.is_empty() || t.shape.len() > 4 {
            return Err(Error::usage(format!(
                "tensor `{}` has {} dimensions; GGUF (ggml) tensors have 1 to 4",
                t.name,
                t.shape.len()
            )));
        }
        let (&row, lead) = t.shape.split_last().unwrap_or((&0, &[]));
        let rows = lead
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::overflow("GGUF tensor rows"))?;
        if !row.is_multiple_of(t.ty.block) {
            return Err(Error::usage(format!(
                "tensor `{}`: rows of {row} elements are not whole {} blocks of {}",
                t.name, t.ty.name, t.ty.block
            )));
        }
        let n_bytes =
            t.ty.row_bytes(row)
                .and_then(|b| b.checked_mul(rows))
                .ok_or_else(|| Error::overflow("GGUF tensor byte length"))?;
        string(&mut h, &t.name);
        h.extend((t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            h.extend(d.to_le_bytes());
        }
        h.extend(t.ty.id.to_le_bytes());
        h.extend(next.to_le_bytes());
        placed.push((t.name.clone(), next, n_bytes));
        next = next
            .checked_add(n_bytes)
            .and_then(|e| crate::format::align_up(e, alignment))
            .ok_or_else(|| Error::overflow("GGUF data length"))?;
    }
    let data_start = crate::format::align_up(h.len() as u64, alignment)
        .ok_or_else(|| Error::overflow("GGUF data start"))?;
    h.resize(data_start as usize, 0);
    let file_len = data_start
        .checked_add(next)
        .ok_or_else(|| Error::overflow("GGUF file length"))?;
    Ok(Layout {
        header: h,
        tensors: placed
            .into_iter()
            .map(|(n, off, len)| (n, data_start + off, len))
            .collect(),
        file_len,
    })
}

//! A GGUF file as a tensor source (spec/gguf.md §3): unquantized tensors
//! as themselves in row-major shape, block-quantized ones as their raw
//! blocks, U8 `[rows, row_bytes]`, with their ggml type and logical shape
//! in the `ckptkit.gguf.tensors` metadata entry, and the file's key-value
//! metadata, typed, in `ckptkit.gguf.kv`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::format::gguf::read::{self, Header, Parsed, Value};
use crate::format::gguf::{orig_shape, GgmlType, ORIG_SHAPE_PREFIX};
use crate::io::backing::Backing;
use crate::io::source::{SourceTensor, TensorSource};
use crate::io::TensorBytes;

/// The metadata entry that records each block-quantized tensor's ggml type
/// and logical shape (spec/gguf.md §3).
pub const TENSORS_KEY: &str = "ckptkit.gguf.tensors";
/// The metadata entry that holds a GGUF file's key-value metadata, typed
/// (spec/gguf.md §3).
pub const KV_KEY: &str = "ckptkit.gguf.kv";

/// An open, validated GGUF file. Tensor bytes are mapped on demand.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    file: Backing,
    /// The file's length in bytes.
    #[cfg_attr(not(feature = "remote"), allow(dead_code))]
    len: u64,
    header: Header,
    tensors: Vec<SourceTensor>,
    metadata: BTreeMap<String, String>,
    index: HashMap<String, usize>,
    /// The `ckptkit.blake3` entry ckptkit writes, parsed (or why it cannot be).
    recorded: crate::io::source::RecordedHashes,
}

impl GgufFile {
    /// Opens a GGUF file and checks its header (every rule of
    /// spec/gguf.md §2) and that it holds only tensor types ckptkit reads.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let (file, len) = Backing::open_local(path)?;
        Self::from_backing(path, file, len)
    }

    /// Opens a remote object (validated as [`open`](Self::open) validates a
    /// file); its path is its URL.
    #[cfg(feature = "remote")]
    pub(crate) fn open_remote(obj: crate::io::remote::Object) -> Result<GgufFile> {
        let len = obj.size();
        let path = PathBuf::from(obj.url());
        Self::from_backing(&path, Backing::Remote(obj), len)
    }

    /// The file's length in bytes.
    #[cfg(feature = "remote")]
    pub(crate) fn byte_len(&self) -> u64 {
        self.len
    }

    fn from_backing(path: &Path, file: Backing, len: u64) -> Result<GgufFile> {
        // the header is read in doubling prefixes up to
        // [`read::MAX_HEADER_LEN`], starting with what is cheap to read
        let mut want = len.min(file.first_read().max(64));
        let header = loop {
            let mut buf = vec![0u8; want as usize];
            file.read_at(path, 0, &mut buf)?;
            match read::parse(&buf, len).map_err(|e| e.with_file(path))? {
                Parsed::Done(h) => break *h,
                Parsed::NeedMore(n) => {
                    // the parser caps n at MAX_HEADER_LEN and the file's length
                    want = n
                        .max(want.saturating_mul(2))
                        .min(len)
                        .min(read::MAX_HEADER_LEN);
                }
            }
        };
        // a file ckptkit wrote records each block tensor's logical dtype
        let own = match header.kvs.iter().find(|k| k.key == TENSORS_KEY) {
            Some(read::Kv {
                value: Value::Str(s),
                ..
            }) => parse_types(s).map_err(|e| e.with_file(path))?,
            Some(k) => {
                return Err(Error::malformed(format!("`{TENSORS_KEY}` is not a string"))
                    .with_file(path)
                    .with_offset(k.offset))
            }
            None => BTreeMap::new(),
        };
        // ComfyUI-GGUF's row-major shapes of tensors stored reshaped
        let mut orig = BTreeMap::new();
        for k in &header.kvs {
            let Some(name) = k.key.strip_prefix(ORIG_SHAPE_PREFIX) else {
                continue;
            };
            let shape = orig_shape(&k.value).map_err(|m| {
                Error::malformed(format!("`{}`: {m}", k.key))
                    .with_file(path)
                    .with_offset(k.offset)
            })?;
            orig.insert(name, (shape, k.offset, k.key.as_str()));
        }
        let mut tensors = Vec::with_capacity(header.tensors.len());
        let mut blocked = serde_json::Map::new();
        for t in &header.tensors {
            if !t.ty.readable {
                return Err(Error::new(ErrorKind::UnsupportedGgufType {
                    ggml_type: t.ty.name.to_string(),
                    id: t.ty.id,
                })
                .with_file(path)
                .with_tensor(t.name.clone())
                .with_offset(t.info_offset));
            }
            // the row-major shape: `ne` reversed, or the orig-shape entry's
            // when it has as many elements
            let logical = match orig.get(t.name.as_str()) {
                None => t.shape(),
                Some((shape, offset, key)) => {
                    // (rule G9 has checked that the stored count does not overflow)
                    let stored = crate::dtype::numel(&t.ne).ok();
                    if crate::dtype::numel(shape).ok() != stored {
                        return Err(Error::malformed(format!(
                            "`{key}` gives tensor `{}` the shape {shape:?}, which does not have \
                             the {} elements of its stored shape {:?}",
                            t.name,
                            stored.unwrap_or(0),
                            t.shape()
                        ))
                        .with_file(path)
                        .with_tensor(t.name.clone())
                        .with_offset(*offset));
                    }
                    shape.clone()
                }
            };
            let (dtype, shape) = match t.ty.plain_dtype() {
                Some(d) if !t.ty.is_blocked() => (d, logical),
                _ => {
                    let mut e = serde_json::json!({"type": t.ty.name, "shape": logical});
                    match own.get(&t.name) {
                        // F32 is what an entry without a dtype means
                        Some((ty, shape, crate::Dtype::F32))
                            if *ty == t.ty && *shape == logical => {}
                        Some((ty, shape, d)) if *ty == t.ty && *shape == logical => {
                            e["dtype"] = d.to_string().into();
                        }
                        Some(_) => {
                            return Err(Error::malformed(format!(
                                "`{TENSORS_KEY}` records tensor `{}` with another type or shape \
                                 than its tensor info",
                                t.name
                            ))
                            .with_file(path)
                            .with_tensor(t.name.clone()))
                        }
                        None => {}
                    }
                    blocked.insert(t.name.clone(), e);
                    let row_bytes = t.ty.row_bytes(t.row_len()).unwrap_or(0);
                    (crate::Dtype::U8, vec![t.rows(), row_bytes])
                }
            };
            tensors.push(SourceTensor {
                key: t.name.clone(),
                dtype,
                shape,
                len: t.n_bytes,
                file: 0,
            });
        }
        let mut metadata = BTreeMap::new();
        if !blocked.is_empty() {
            metadata.insert(
                TENSORS_KEY.to_string(),
                serde_json::json!({"version": 1, "tensors": blocked}).to_string(),
            );
        }
        metadata.insert(KV_KEY.to_string(), kv_json(&header).to_string());
        let index = crate::io::source::key_index(tensors.iter().map(|t| t.key.as_str()));
        let recorded = header
            .kvs
            .iter()
            .find(|k| k.key == crate::format::st_hashes::HASHES_KEY)
            .map(|k| match &k.value {
                Value::Str(v) => crate::format::st_hashes::parse(
                    v,
                    header.tensors.iter().map(|t| t.name.as_str()),
                )
                .map(|m| m.into_iter().collect())
                .map_err(|e| e.kind().to_string()),
                v => Err(format!(
                    "`{}` is a GGUF {}, not a string",
                    k.key,
                    read::value_type_name(v.type_id())
                )),
            });
        Ok(GgufFile {
            path: path.to_path_buf(),
            file,
            len,
            header,
            tensors,
            metadata,
            index,
            recorded,
        })
    }

    fn find(&self, key: &str) -> Result<&read::TensorInfo> {
        crate::format::lookups::add(1);
        self.index
            .get(key)
            .and_then(|&i| self.header.tensors.get(i))
            .ok_or_else(|| {
                Error::new(ErrorKind::NotFound(format!("tensor `{key}`"))).with_file(&self.path)
            })
    }

    /// Checks every tensor whose digest the file records (ckptkit writes
    /// `ckptkit.blake3`; other writers record none).
    pub(crate) fn verify(&self) -> Result<crate::VerifyReport> {
        let mut r = crate::VerifyReport::default();
        for t in &self.header.tensors {
            let Some(want) = self.recorded_hash(&t.name)? else {
                r.unchecked += 1;
                continue;
            };
            let got = self.file.hash_range(&self.path, self.start(t), t.n_bytes)?;
            if *got.as_bytes() != want {
                return Err(crate::io::source::hash_mismatch(
                    self,
                    &t.name,
                    &want,
                    got.as_bytes(),
                ));
            }
            r.tensors += 1;
            r.bytes += t.n_bytes;
        }
        Ok(r)
    }

    fn start(&self, t: &read::TensorInfo) -> u64 {
        // checked against the file's length when the header was parsed
        self.header.data_start + t.offset
    }
}

/// A value as JSON: numbers as numbers (a non-finite float as the string
/// `nan`, `inf` or `-inf`), arrays as `{"type": "array", "elem": ...,
/// "value": [...]}` so that an empty or nested array keeps its element
/// type.
fn value_json(v: &Value) -> serde_json::Value {
    use serde_json::json;
    let float = |x: f64| {
        if x.is_finite() {
            json!(x)
        } else if x.is_nan() {
            json!("nan")
        } else if x > 0.0 {
            json!("inf")
        } else {
            json!("-inf")
        }
    };
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::F32(x) => float(f64::from(*x)),
        Value::Bool(x) => json!(x),
        Value::Str(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F64(x) => float(*x),
        Value::Array(elem, items) => json!({
            "type": "array",
            "elem": read::value_type_name(*elem),
            "value": items.iter().map(value_json).collect::<Vec<_>>(),
        }),
    }
}

/// The file's key-value metadata as `ckptkit.gguf.kv` holds it: its
/// version and alignment, and each pair in file order with its type.
fn kv_json(h: &Header) -> serde_json::Value {
    let kv: Vec<serde_json::Value> = h
        .kvs
        .iter()
        .map(|k| {
            serde_json::json!({
                "key": k.key,
                "type": read::value_type_name(k.value.type_id()),
                "value": value_json(&k.value),
            })
        })
        .collect();
    serde_json::json!({"version": 1, "gguf_version": h.version, "kv": kv})
}

/// The ggml type and logical shape `ckptkit.gguf.tensors` records for each
/// block-quantized tensor, or an error naming what is wrong with the entry.
pub(crate) fn recorded_types(
    metadata: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, Recorded>> {
    match metadata.get(TENSORS_KEY) {
        Some(s) => parse_types(s),
        None => Ok(BTreeMap::new()),
    }
}

/// What `ckptkit.gguf.tensors` records of one block-quantized tensor: its
/// ggml type, logical shape and logical dtype (F32 unless recorded).
pub(crate) type Recorded = (GgmlType, Vec<u64>, crate::Dtype);

/// Parses a `ckptkit.gguf.tensors` entry.
pub(crate) fn parse_types(s: &str) -> Result<BTreeMap<String, Recorded>> {
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(rename = "type")]
        ty: String,
        shape: Vec<u64>,
        #[serde(default)]
        dtype: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct W {
        version: u32,
        tensors: BTreeMap<String, Entry>,
    }
    let w: W = serde_json::from_str(s).map_err(|e| Error::json(TENSORS_KEY, e))?;
    if w.version != 1 {
        return Err(Error::new(ErrorKind::Json(format!(
            "{TENSORS_KEY}: unknown version {}",
            w.version
        ))));
    }
    let mut out = BTreeMap::new();
    for (k, e) in w.tensors {
        let ty = GgmlType::from_name(&e.ty)
            .filter(|t| t.is_blocked())
            .ok_or_else(|| {
                Error::new(ErrorKind::Json(format!(
                    "{TENSORS_KEY}: tensor `{k}` has type `{}`, not a ggml block type",
                    e.ty
                )))
            })?;
        if !ty.readable {
            return Err(Error::new(ErrorKind::UnsupportedGgufType {
                ggml_type: ty.name.to_string(),
                id: ty.id,
            })
            .with_tensor(k));
        }
        if e.shape.len() > read::MAX_DIMS as usize {
            return Err(Error::new(ErrorKind::Json(format!(
                "{TENSORS_KEY}: tensor `{k}` has {} dimensions",
                e.shape.len()
            ))));
        }
        let dtype = match e.dtype.as_deref() {
            None | Some("F32") => crate::Dtype::F32,
            Some("F16") => crate::Dtype::F16,
            Some("BF16") => crate::Dtype::BF16,
            Some(d) => {
                return Err(Error::new(ErrorKind::Json(format!(
                    "{TENSORS_KEY}: tensor `{k}` has logical dtype `{d}`, not F32, F16 or BF16"
                ))))
            }
        };
        out.insert(k, (ty, e.shape, dtype));
    }
    Ok(out)
}

impl TensorSource for GgufFile {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }
    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    fn files(&self) -> Vec<String> {
        vec![self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()]
    }
    fn get(&self, key: &str) -> Option<&SourceTensor> {
        crate::format::lookups::add(1);
        self.index.get(key).and_then(|&i| self.tensors.get(i))
    }
    fn read(&self, key: &str) -> Result<TensorBytes> {
        let t = self.find(key)?;
        self.file
            .window(&self.path, self.start(t), t.n_bytes)
            .map_err(|e| e.with_tensor(key))
    }
    fn read_pieces(&self, key: &str, f: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let t = self.find(key)?;
        self.file
            .windows(&self.path, self.start(t), t.n_bytes, key, f)
    }
    fn recorded_hash(&self, key: &str) -> Result<Option<crate::format::manifest::Hash>> {
        crate::io::source::recorded_in(&self.recorded, key, &self.path)
    }
    fn location(&self, key: &str) -> crate::error::Location {
        crate::error::Location {
            file: Some(self.path.clone()),
            tensor: Some(key.to_string()),
            offset: self
                .index
                .get(key)
                .and_then(|&i| self.header.tensors.get(i))
                .map(|t| self.start(t)),
            ..Default::default()
        }
    }
}

/// The key-value metadata `ckptkit.gguf.kv` holds, back as values (the
/// inverse of what [`GgufFile`] records; a NaN comes back as the quiet NaN
/// of its width, its payload not recorded).
pub(crate) fn kv_from_metadata(
    metadata: &BTreeMap<String, String>,
) -> Result<Option<Vec<(String, Value)>>> {
    let Some(s) = metadata.get(KV_KEY) else {
        return Ok(None);
    };
    let bad = |m: String| Error::new(ErrorKind::Json(format!("{KV_KEY}: {m}")));
    let v: serde_json::Value = serde_json::from_str(s).map_err(|e| Error::json(KV_KEY, e))?;
    if v.get("version").and_then(|x| x.as_u64()) != Some(1) {
        return Err(bad("unknown version".into()));
    }
    let items = v
        .get("kv")
        .and_then(|x| x.as_array())
        .ok_or_else(|| bad("no `kv` list".into()))?;
    let mut out = Vec::with_capacity(items.len().min(read::MAX_VALUES as usize));
    for it in items {
        let key = it
            .get("key")
            .and_then(|k| k.as_str())
            .ok_or_else(|| bad("an entry without a key".into()))?;
        let ty = it
            .get("type")
            .and_then(|k| k.as_str())
            .ok_or_else(|| bad(format!("`{key}` has no type")))?;
        let value = it
            .get("value")
            .ok_or_else(|| bad(format!("`{key}` has no value")))?;
        let v = value_from_json(ty, value, 0)
            .ok_or_else(|| bad(format!("`{key}`: {value} is not a GGUF {ty}")))?;
        out.push((key.to_string(), v));
    }
    Ok(Some(out))
}

fn type_id_of(name: &str) -> Option<u32> {
    (0..=12).find(|&i| read::value_type_name(i) == name)
}

fn value_from_json(ty: &str, v: &serde_json::Value, depth: u32) -> Option<Value> {
    let float = |v: &serde_json::Value| -> Option<f64> {
        match v {
            serde_json::Value::String(s) => match s.as_str() {
                "nan" => Some(f64::NAN),
                "inf" => Some(f64::INFINITY),
                "-inf" => Some(f64::NEG_INFINITY),
                _ => None,
            },
            n => n.as_f64(),
        }
    };
    let int = |v: &serde_json::Value| v.as_i64().map(i128::from).or(v.as_u64().map(i128::from));
    Some(match ty {
        "u8" => Value::U8(u8::try_from(int(v)?).ok()?),
        "i8" => Value::I8(i8::try_from(int(v)?).ok()?),
        "u16" => Value::U16(u16::try_from(int(v)?).ok()?),
        "i16" => Value::I16(i16::try_from(int(v)?).ok()?),
        "u32" => Value::U32(u32::try_from(int(v)?).ok()?),
        "i32" => Value::I32(i32::try_from(int(v)?).ok()?),
        "u64" => Value::U64(u64::try_from(int(v)?).ok()?),
        "i64" => Value::I64(i64::try_from(int(v)?).ok()?),
        // recorded widened exactly: narrowing gives the stored value back
        "f32" => Value::F32(float(v)? as f32),
        "f64" => Value::F64(float(v)?),
        "bool" => Value::Bool(v.as_bool()?),
        "string" => Value::Str(v.as_str()?.to_string()),
        "array" => {
            if depth >= read::MAX_DEPTH {
                return None;
            }
            let elem = v.get("elem")?.as_str()?;
            let id = type_id_of(elem)?;
            let items = v.get("value")?.as_array()?;
            let mut out = Vec::new();
            for i in items {
                // a nested array is itself {"type": "array", ...}
                let x = if elem == "array" {
                    value_from_json("array", i, depth + 1)?
                } else {
                    value_from_json(elem, i, depth + 1)?
                };
                out.push(x);
            }
            Value::Array(id, out)
        }
        _ => return None,
    })
}

//! The optimum-quanto 0.2.7 layout: key naming, reading a checkpoint's
//! layers from the files alone (with `quanto_qmap.json`, a diffusers
//! `quantization_config`, ckptkit's own schema, or inference), and the
//! quantize / dequantize passes. spec/layouts.md describes it in prose.

pub mod error;
pub mod math;
pub mod pack;

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use math::QType;

pub(crate) mod family;

use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::float::FloatDtype;
use crate::format::layers::split_key;
use crate::format::manifest::{Encoding, Layer, LogicalTensor, Part, Role, WeightQuant};
use crate::io::source::{SourceTensor, TensorSource};

/// What the quanto family reads beside an input ([`Family::side_files`](crate::layout::family::Family)):
/// the quantization map (`quanto_qmap.json`, or the one given with
/// `--qmap`) and a diffusers `config.json`'s `QuantoConfig`.
#[derive(Debug, Clone, Default)]
pub struct QuantoSide {
    /// The quantization map.
    pub qmap: Option<QuantoMap>,
    /// A diffusers `QuantoConfig`.
    pub diffusers: Option<DiffusersQuanto>,
}

/// The family's name (its side-file hints are filed under it).
pub(crate) const FAMILY_NAME: &str = "quanto";

/// The side file optimum-quanto writes beside a checkpoint.
pub const QMAP_FILE: &str = "quanto_qmap.json";

/// One entry of a quantization map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QmapEntry {
    /// Weight qtype name or `"none"`.
    pub weights: String,
    /// Activation qtype name or `"none"`.
    pub activations: String,
}

/// A quanto quantization map (`quanto_qmap.json`), in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuantoMap {
    /// Module path → entry, in the order quanto wrote them.
    pub entries: Vec<(String, QmapEntry)>,
}

fn json_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Json(format!("{what}: {e}")))
}

fn valid_qtype(name: &str) -> bool {
    name == "none" || QType::from_name(name).is_some()
}

impl QuantoMap {
    /// Parses and validates a qmap (every qtype must be known).
    pub fn parse(text: &str) -> Result<QuantoMap> {
        let v: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| Error::json("quanto_qmap.json", e))?;
        let mut entries = Vec::with_capacity(v.len());
        for (k, e) in v {
            let e: QmapEntry = serde_json::from_value(e)
                .map_err(|er| Error::json(&format!("quanto_qmap.json entry `{k}`"), er))?;
            for (what, q) in [("weights", &e.weights), ("activations", &e.activations)] {
                if !valid_qtype(q) {
                    return Err(json_err(
                        "quanto_qmap.json",
                        format!("module `{k}`: unknown {what} qtype `{q}`"),
                    ));
                }
            }
            entries.push((k, e));
        }
        Ok(QuantoMap { entries })
    }

    /// A qmap handed over as JSON text rather than a file (a model's
    /// `quantization_map()` from Python), under the same size cap as a file.
    pub(crate) fn side_of_text(text: &str) -> Result<QuantoSide> {
        if text.len() as u64 > crate::io::files::MAX_SIDE_FILE {
            return Err(Error::new(crate::error::ErrorKind::LimitExceeded {
                what: "quanto map size",
                value: text.len() as u64,
                limit: crate::io::files::MAX_SIDE_FILE,
            }));
        }
        Ok(QuantoSide {
            qmap: Some(Self::parse(text)?),
            diffusers: None,
        })
    }

    /// Reads a qmap file.
    pub fn from_file(path: &Path) -> Result<QuantoMap> {
        Self::parse(&crate::io::files::read_side_file(path)?).map_err(|e| e.with_file(path))
    }

    /// The entry of a module (a scan: for one lookup per layer, build
    /// [`index`](Self::index) once).
    #[allow(dead_code)] // tests, benches and fuzz targets
    pub fn get(&self, module: &str) -> Option<&QmapEntry> {
        crate::format::lookups::find(&self.entries, |(k, _)| k == module).map(|(_, e)| e)
    }

    /// Module path → entry, for lookups that give what [`get`](Self::get)
    /// gives (the first entry of a repeated path).
    pub fn index(&self) -> HashMap<&str, &QmapEntry> {
        let mut m = HashMap::with_capacity(self.entries.len());
        for (k, e) in &self.entries {
            m.entry(k.as_str()).or_insert(e);
        }
        m
    }

    /// Renders as optimum-quanto writes it (`json.dump(qmap, f, indent=4)`).
    pub fn to_json(&self) -> String {
        let mut m = serde_json::Map::new();
        for (k, e) in &self.entries {
            m.insert(
                k.clone(),
                serde_json::json!({"weights": e.weights, "activations": e.activations}),
            );
        }
        let mut out = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        // serialising a Map of strings cannot fail
        let _ = serde::Serialize::serialize(&serde_json::Value::Object(m), &mut ser);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// A diffusers `QuantoConfig` (`config.json` → `quantization_config` with
/// `quant_method: "quanto"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffusersQuanto {
    /// Weight qtype (`float8` is `qfloat8_e4m3fn`).
    pub weights: QType,
    /// Modules left unquantized.
    pub modules_to_not_convert: Vec<String>,
}

impl DiffusersQuanto {
    /// Reads the `quantization_config` of a `config.json`, if it is quanto's.
    pub fn from_config(text: &str) -> Result<Option<DiffusersQuanto>> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::json("config.json", e))?;
        let Some(q) = v.get("quantization_config") else {
            return Ok(None);
        };
        if q.get("quant_method").and_then(|m| m.as_str()) != Some("quanto") {
            return Ok(None);
        }
        // diffusers' QuantoConfig says `weights_dtype`, transformers' says
        // `weights` (same values)
        let w = q
            .get("weights_dtype")
            .or_else(|| q.get("weights"))
            .and_then(|w| w.as_str())
            .ok_or_else(|| {
                json_err(
                    "config.json",
                    "quanto quantization_config has neither weights_dtype (diffusers) nor \
                     weights (transformers)",
                )
            })?;
        let weights = match w {
            "float8" => QType::QFloat8E4M3Fn,
            "int8" => QType::QInt8,
            "int4" => QType::QInt4,
            "int2" => QType::QInt2,
            other => {
                return Err(json_err(
                    "config.json",
                    format!("unknown quanto weights_dtype `{other}`"),
                ))
            }
        };
        let modules_to_not_convert = q
            .get("modules_to_not_convert")
            .and_then(|m| m.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(DiffusersQuanto {
            weights,
            modules_to_not_convert,
        }))
    }
}

/// Converts a float dtype to ours.
pub fn dtype_of_float(f: FloatDtype) -> Dtype {
    match f {
        FloatDtype::Bf16 => Dtype::BF16,
        FloatDtype::F16 => Dtype::F16,
        FloatDtype::F32 => Dtype::F32,
    }
}

/// Converts our dtype to a float dtype (F16, BF16, F32 only).
pub fn float_of(d: Dtype) -> Option<FloatDtype> {
    crate::float::float_dtype_of(d)
}

/// The stored dtype of a qtype's data tensor.
pub fn data_dtype(q: QType) -> Dtype {
    match q {
        QType::QInt8 => Dtype::I8,
        QType::QInt4 | QType::QInt2 => Dtype::U8,
        QType::QFloat8E4M3Fn => Dtype::F8E4M3,
        QType::QFloat8E5M2 => Dtype::F8E5M2,
        QType::QFloat8E4M3FnUz => Dtype::F8E4M3Fnuz,
    }
}

/// Stored keys of a quantized weight: (data, scale, shift).
pub fn weight_keys(module: &str, q: QType) -> (String, String, Option<String>) {
    let p = if module.is_empty() {
        String::new()
    } else {
        format!("{module}.")
    };
    (
        format!("{p}weight.{}", q.data_key()),
        format!("{p}weight._scale"),
        q.is_packed().then(|| format!("{p}weight._shift")),
    )
}

/// The stored tensors of one module, grouped by their key suffixes.
#[derive(Default, Debug)]
pub(crate) struct Group<'s> {
    pub(crate) data: Option<&'s SourceTensor>,
    pub(crate) packed: Option<&'s SourceTensor>,
    pub(crate) scale: Option<&'s SourceTensor>,
    pub(crate) shift: Option<&'s SourceTensor>,
    pub(crate) plain: Vec<&'s SourceTensor>,
}

/// A part that names a stored tensor of a source.
pub(crate) fn part(role: Role, t: &SourceTensor) -> Part {
    Part {
        role,
        shard: t.file as u32,
        key: t.key.clone(),
        dtype: t.dtype,
        shape: t.shape.clone(),
        blake3: [0; 32],
    }
}

pub(crate) fn lerr(path: &str, msg: impl Into<String>) -> Error {
    Error::layout(msg).with_layer(path)
}

fn qtype_from_data_dtype(d: Dtype) -> Option<QType> {
    match d {
        Dtype::I8 => Some(QType::QInt8),
        Dtype::F8E4M3 => Some(QType::QFloat8E4M3Fn),
        Dtype::F8E5M2 => Some(QType::QFloat8E5M2),
        Dtype::F8E4M3Fnuz => Some(QType::QFloat8E4M3FnUz),
        _ => None,
    }
}

/// Reads one quanto weight (`Ok(None)`: ambiguous without more hints).
pub(crate) fn quanto_weight(
    path: &str,
    g: &Group<'_>,
    qentry: Option<&QmapEntry>,
    diffusers: Option<&DiffusersQuanto>,
    shapes_from: Option<&dyn crate::io::source::TensorSource>,
    schema: Option<&crate::format::st_schema::Schema>,
) -> Result<Option<(LogicalTensor, WeightQuant)>> {
    let sch = schema.and_then(|s| s.get(path));
    let scale = g.scale.ok_or_else(|| {
        lerr(
            path,
            "quantized weight without `weight._scale`: the checkpoint is incomplete",
        )
    })?;
    let t = float_of(scale.dtype).ok_or_else(|| {
        lerr(
            path,
            format!(
                "`weight._scale` has dtype {}, expected BF16, F16 or F32",
                scale.dtype
            ),
        )
    })?;
    if g.data.is_some() && g.packed.is_some() {
        return Err(lerr(
            path,
            "both `weight._data` and `weight._data._data` are present",
        ));
    }
    // qtype: qmap > schema > diffusers config > dtypes
    let stated: Option<(QType, &str)> = if let Some(e) = qentry {
        if e.weights == "none" {
            return Err(lerr(
                path,
                "the quanto map says this module is not quantized, but it has quantized tensors",
            ));
        }
        QType::from_name(&e.weights).map(|q| (q, "the quanto map"))
    } else if let Some(e) = sch {
        QType::from_name(&e.weights).map(|q| (q, "the ckptkit schema"))
    } else if let Some(d) = diffusers {
        Some((d.weights, "config.json quantization_config"))
    } else {
        None
    };
    let data = g.data.or(g.packed).ok_or_else(|| {
        lerr(
            path,
            "quantized weight without `weight._data` (or `weight._data._data`)",
        )
    })?;
    let from_dtype = qtype_from_data_dtype(data.dtype);
    if let Some((q, src)) = stated {
        let ok = if q.is_packed() {
            g.packed.is_some() && data.dtype == Dtype::U8
        } else {
            g.data.is_some() && from_dtype == Some(q)
        };
        if !ok {
            return Err(lerr(
                path,
                format!(
                    "{src} says {} but the checkpoint stores `{}` as {}: the map does not describe this checkpoint",
                    q.name(),
                    data.key,
                    data.dtype
                ),
            ));
        }
    }
    let logical_dtype = dtype_of_float(t);
    // Logical shape candidates.
    // an empty recorded shape is an unknown one (a flat layer, below)
    let shape_hint: Option<Vec<u64>> = sch
        .map(|e| e.shape.clone())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            shapes_from.and_then(|s| {
                let k = format!("{path}.weight");
                s.get(&k).map(|t| t.shape.clone())
            })
        });
    let bias_o: Option<u64> = g
        .plain
        .iter()
        .find(|t| split_key(&t.key).1 == "bias" && t.shape.len() == 1)
        .map(|t| t.shape[0]);
    let (qtype, shape, group) = if g.data.is_some() {
        // 8-bit: data shape is the logical shape
        let q = match stated {
            Some((q, _)) => q,
            None => from_dtype.ok_or_else(|| {
                lerr(
                    path,
                    format!(
                        "`{}` has dtype {}, which no 8-bit quanto qtype stores",
                        data.key, data.dtype
                    ),
                )
            })?,
        };
        (q, data.shape.clone(), None)
    } else {
        let candidates: Vec<QType> = match stated {
            Some((q, _)) => vec![q],
            None => vec![QType::QInt4, QType::QInt2],
        };
        let mut found: Vec<(QType, Vec<u64>, Option<u64>)> = Vec::new();
        for q in candidates {
            for (shape, gs) in
                packed_shapes(q, &data.shape, &scale.shape, bias_o, shape_hint.as_deref())
            {
                if let Ok(s) = math::quanto_shapes(q, &shape, gs) {
                    let shift_ok = g.shift.is_some_and(|sh| sh.shape == s.scale);
                    if s.data == data.shape && s.scale == scale.shape && shift_ok {
                        found.push((q, shape, gs));
                    }
                }
            }
        }
        found.dedup();
        if found.len() > 1 {
            if let Some(f) = flat_form(&found, &data.shape, &scale.shape) {
                return flat_weight(path, g, f, logical_dtype);
            }
        }
        match found.len() {
            1 => found.remove(0),
            0 => {
                if g.shift.is_none() {
                    return Err(lerr(
                        path,
                        "packed quantized weight without `weight._shift`",
                    ));
                }
                if let Some(h) = &shape_hint {
                    return Err(lerr(path, format!(
                        "stored shapes (data {:?}, scale {:?}) fit no qint4/qint2 weight of shape {h:?}",
                        data.shape, scale.shape
                    )));
                }
                if stated.is_some() || bias_o.is_some() {
                    return Err(lerr(
                        path,
                        format!(
                            "stored shapes (data {:?}, scale {:?}, shift {:?}) fit no {} weight",
                            data.shape,
                            scale.shape,
                            g.shift.map(|s| s.shape.clone()).unwrap_or_default(),
                            stated.map(|s| s.0.name()).unwrap_or("qint4/qint2")
                        ),
                    ));
                }
                return Ok(None);
            }
            _ => return Ok(None),
        }
    };
    // Every part must have exactly the shape quanto writes.
    let s = math::quanto_shapes(qtype, &shape, group).map_err(|e| lerr(path, e.to_string()))?;
    if data.shape != s.data || data.dtype != data_dtype(qtype) {
        return Err(lerr(
            path,
            format!(
                "`{}` is {} {:?}; a {} weight of shape {shape:?} stores {} {:?}",
                data.key,
                data.dtype,
                data.shape,
                qtype.name(),
                data_dtype(qtype),
                s.data
            ),
        ));
    }
    if scale.shape != s.scale {
        return Err(lerr(
            path,
            format!(
                "`{}` has shape {:?}; a {} weight of shape {shape:?} stores {:?}",
                scale.key,
                scale.shape,
                qtype.name(),
                s.scale
            ),
        ));
    }
    let mut parts = vec![part(Role::Data, data), part(Role::Scale, scale)];
    match (qtype.is_packed(), g.shift) {
        (true, Some(sh)) => {
            let float_ok = sh.dtype == scale.dtype;
            let int_ok = matches!(sh.dtype, Dtype::U8 | Dtype::I8);
            if sh.shape != s.scale || !(float_ok || int_ok) {
                return Err(lerr(
                    path,
                    format!(
                        "`{}` is {} {:?}; expected {} (or an integer zero point) of shape {:?}",
                        sh.key, sh.dtype, sh.shape, scale.dtype, s.scale
                    ),
                ));
            }
            parts.push(part(
                if float_ok {
                    Role::Shift
                } else {
                    Role::ZeroPoint
                },
                sh,
            ));
        }
        (true, None) => {
            return Err(lerr(
                path,
                "packed quantized weight without `weight._shift`",
            ))
        }
        (false, Some(sh)) => {
            return Err(lerr(
                path,
                format!("`{}` is present but {} has no shift", sh.key, qtype.name()),
            ))
        }
        (false, None) => {}
    }
    if let Some(h) = &shape_hint {
        if *h != shape {
            return Err(lerr(
                path,
                format!("logical shape {shape:?} from the tensors, {h:?} from the hint"),
            ));
        }
    }
    Ok(Some((
        LogicalTensor {
            name: "weight".into(),
            dtype: logical_dtype,
            shape,
            encoding: Encoding::Quantized,
            parts,
        },
        WeightQuant::Quanto {
            qtype: qtype.name().to_string(),
            group_size: group,
        },
    )))
}

/// The element count and qtype of a packed weight whose logical shape the
/// files do not tell (several candidate shapes, no bias, no hint) but whose
/// stored tensors fix its values: every candidate reads the `[s0, d1]`
/// matrix of codes (scale rows by the data's columns) row by row, one scale
/// (and shift) per row, and ungroups by a row-major reshape, so they all
/// dequantize to the same values in the same order (spec/layouts.md §2.5).
/// `None` when the candidates disagree on the qtype (qint4 and qint2 both
/// fit).
fn flat_form(
    found: &[(QType, Vec<u64>, Option<u64>)],
    data: &[u64],
    scale: &[u64],
) -> Option<(QType, u64, u64)> {
    let q = found.first()?.0;
    if found.iter().any(|f| f.0 != q) {
        return None;
    }
    let (&[_, d1], &[s0, 1]) = (data, scale) else {
        return None;
    };
    let n = s0.checked_mul(d1)?;
    found
        .iter()
        .all(|f| crate::dtype::numel(&f.1).ok() == Some(n))
        .then_some((q, s0, d1))
}

/// A packed quanto weight recorded flat: logical shape `[n]`
/// ([`Encoding::QuantizedFlat`]), no group size (grouped and per-row
/// storage are the same matrix of codes, see [`flat_form`]); its parts are
/// checked against that matrix.
fn flat_weight(
    path: &str,
    g: &Group<'_>,
    (q, s0, d1): (QType, u64, u64),
    logical_dtype: Dtype,
) -> Result<Option<(LogicalTensor, WeightQuant)>> {
    let (Some(data), Some(scale), Some(shift)) = (g.packed, g.scale, g.shift) else {
        return Ok(None);
    };
    let s = math::quanto_shapes(q, &[s0, d1], None).map_err(|e| lerr(path, e.to_string()))?;
    if data.shape != s.data || data.dtype != data_dtype(q) || scale.shape != s.scale {
        return Ok(None);
    }
    let float_ok = shift.dtype == scale.dtype;
    if shift.shape != s.scale || !(float_ok || matches!(shift.dtype, Dtype::U8 | Dtype::I8)) {
        return Ok(None);
    }
    let parts = vec![
        part(Role::Data, data),
        part(Role::Scale, scale),
        part(
            if float_ok {
                Role::Shift
            } else {
                Role::ZeroPoint
            },
            shift,
        ),
    ];
    Ok(Some((
        LogicalTensor {
            name: "weight".into(),
            dtype: logical_dtype,
            shape: vec![s0 * d1],
            encoding: Encoding::QuantizedFlat,
            parts,
        },
        WeightQuant::Quanto {
            qtype: q.name().to_string(),
            group_size: None,
        },
    )))
}

/// The `[rows, cols]` matrix of codes a flat weight stores (see
/// [`flat_form`]): the logical shape its parts are checked and
/// dequantized against.
pub(crate) fn flat_matrix(w: &LogicalTensor) -> Option<Vec<u64>> {
    let scale = w.parts.iter().find(|p| p.role == Role::Scale)?;
    let data = w.parts.iter().find(|p| p.role == Role::Data)?;
    match (data.shape.as_slice(), scale.shape.as_slice()) {
        (&[_, d1], &[s0, 1]) if s0.checked_mul(d1) == w.shape.first().copied() => {
            Some(vec![s0, d1])
        }
        _ => None,
    }
}

/// Candidate (logical shape, group size) pairs for packed data.
fn packed_shapes(
    q: QType,
    data: &[u64],
    scale: &[u64],
    bias_o: Option<u64>,
    hint: Option<&[u64]>,
) -> Vec<(Vec<u64>, Option<u64>)> {
    let mut out = Vec::new();
    let vpi = (8 / q.bits()) as u64;
    let mut push = |shape: Vec<u64>| {
        let Some(n) = crate::dtype::numel(&shape).ok() else {
            return;
        };
        let Some(&o) = shape.first() else { return };
        // a bias gives the out dimension
        if o == 0 || bias_o.is_some_and(|b| b != o) {
            return;
        }
        let gs = math::group_size(o, n);
        out.push((shape, gs));
    };
    if let Some(h) = hint {
        push(h.to_vec());
        return out;
    }
    let (Some(&d0), Some(&s0)) = (data.first(), scale.first()) else {
        return out;
    };
    // ungrouped: data [ceil(O/vpi), *rest], scale [O,1,..] (or [1, I] when O == 1)
    if scale.iter().skip(1).all(|&x| x == 1) && d0 == s0.div_ceil(vpi) && data.len() >= 2 {
        let mut s = vec![s0];
        s.extend_from_slice(&data[1..]);
        push(s);
    }
    if scale.len() == 2 && s0 == 1 && d0 == 1 && data.len() == 2 {
        push(vec![1, data[1]]);
    }
    // grouped: data [ceil(ng/vpi), G], scale [ng, 1]; 2-D [O, ng*G/O]
    if data.len() == 2 && scale.len() == 2 && scale[1] == 1 {
        let (ng, g) = (s0, data[1]);
        let total = ng.saturating_mul(g);
        let os: Vec<u64> = match bias_o {
            Some(o) => vec![o],
            // without a bias every O dividing the total with a consistent
            // group is a candidate; more than one makes it ambiguous
            None => (1..=ng).filter(|o| ng % o == 0).collect(),
        };
        for o in os {
            if o > 0 && total % o == 0 {
                push(vec![o, total / o]);
            }
        }
    }
    out
}

/// Reads the tensors of a quantized weight and dequantizes it to its
/// logical dtype, bit-identically to quanto's `dequantize()`.
pub fn dequantize_weight(
    src: &dyn TensorSource,
    layer: &Layer,
    weight: &LogicalTensor,
) -> Result<Vec<u8>> {
    let WeightQuant::Quanto { qtype, group_size } = &layer.quant.weights else {
        return Err(lerr(&layer.path, "not a quanto layer"));
    };
    let q = QType::from_name(qtype)
        .ok_or_else(|| lerr(&layer.path, format!("unknown qtype {qtype}")))?;
    let t =
        float_of(weight.dtype).ok_or_else(|| lerr(&layer.path, "logical dtype is not a float"))?;
    let get = |role: &Role| weight.parts.iter().find(|p| &p.role == role);
    let dpart = get(&Role::Data).ok_or_else(|| lerr(&layer.path, "no data part"))?;
    let spart = get(&Role::Scale).ok_or_else(|| lerr(&layer.path, "no scale part"))?;
    let shpart = get(&Role::Shift).or_else(|| get(&Role::ZeroPoint));
    let db = src.read(&dpart.key)?;
    let sb = src.read(&spart.key)?;
    let shb = match shpart {
        Some(p) => Some(src.read(&p.key)?),
        None => None,
    };
    let sd = |d: Dtype| {
        math::StorageDtype::from_safetensors_name(d.name()).ok_or_else(|| {
            lerr(
                &layer.path,
                format!("dtype {d} is not a quanto storage dtype"),
            )
        })
    };
    let parts = math::QuantizedParts {
        data: math::QuantoTensorRef {
            dtype: sd(dpart.dtype)?,
            shape: &dpart.shape,
            bytes: &db,
        },
        scale: math::QuantoTensorRef {
            dtype: sd(spart.dtype)?,
            shape: &spart.shape,
            bytes: &sb,
        },
        shift: match (shpart, &shb) {
            (Some(p), Some(b)) => Some(math::QuantoTensorRef {
                dtype: sd(p.dtype)?,
                shape: &p.shape,
                bytes: b,
            }),
            _ => None,
        },
    };
    // the output buffer comes from the pool (see crate::io::pool)
    let n = weight
        .shape
        .iter()
        .try_fold(t.size() as u64, |a, &d| a.checked_mul(d))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| Error::overflow("dequantized size"))?;
    let mut out = crate::io::pool::take(n);
    math::dequantize_into(q, t, &weight.shape, *group_size, &parts, &mut out)
        .map_err(|e| lerr(&layer.path, e.to_string()))?;
    Ok(out)
}

/// Finds the `quanto_qmap.json` beside an input (a file's directory, or the
/// directory itself).
pub fn qmap_beside(input: &Path) -> Result<Option<QuantoMap>> {
    let dir = if input.is_dir() {
        input.to_path_buf()
    } else {
        input.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let p = if dir.as_os_str().is_empty() {
        Path::new(QMAP_FILE).to_path_buf()
    } else {
        dir.join(QMAP_FILE)
    };
    if crate::io::files::regular_file_exists(&p)? {
        Ok(Some(QuantoMap::from_file(&p)?))
    } else {
        Ok(None)
    }
}

/// Finds a diffusers quanto config in `config.json` beside an input.
pub fn diffusers_beside(input: &Path) -> Result<Option<DiffusersQuanto>> {
    match crate::io::files::config_beside(input)? {
        Some((p, text)) => DiffusersQuanto::from_config(&text).map_err(|e| e.with_file(&p)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_answers_as_get() {
        let e = |w: &str| QmapEntry {
            weights: w.into(),
            activations: "none".into(),
        };
        let m = QuantoMap {
            entries: vec![
                ("a".into(), e("qint8")),
                ("b".into(), e("qint4")),
                ("a".into(), e("qint2")),
            ],
        };
        let ix = m.index();
        for k in ["a", "b", "c"] {
            assert_eq!(ix.get(k).copied(), m.get(k), "{k}");
        }
        assert_eq!(ix["a"].weights, "qint8");
    }
}

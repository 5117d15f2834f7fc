//! ComfyUI's `comfy_quant` layouts (comfy-kitchen 0.2.40): per-tensor FP8
//! and int8, and the block-scaled MXFP8 and NVFP4 (padded codes, swizzled
//! block scales; [`nvfp4`]). `{m}.weight` F8_E4M3, F8_E5M2 or I8 `[out, in]` codes,
//! `{m}.weight_scale` F32 `[]` (int8 also `[out, 1]`: per row), and the
//! layer's format in a `{m}.comfy_quant` U8 tensor holding JSON
//! (`{"format": "float8_e4m3fn"}`) or in the file's
//! `__metadata__["_quantization_metadata"]`; an optional `{m}.input_scale`. Keys, transports, math and where ckptkit differs:
//! spec/layouts.md §5.

pub(crate) mod family;
pub(crate) mod math;
pub(crate) mod nvfp4;

use std::collections::BTreeMap;

use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::float::Fp8Kind;
use crate::format::manifest::{Encoding, LogicalTensor, Param, Role, WeightQuant};
use crate::io::source::{SourceTensor, TensorSource};
use crate::layout::family::{out_part, Detected, Detector};

/// The family's name.
pub(crate) const NAME: &str = "comfy";
/// The per-layer marker tensor's name.
pub(crate) const MARKER: &str = "comfy_quant";
/// The scale tensor's name.
pub(crate) const SCALE: &str = "weight_scale";
/// NVFP4's per-tensor multiplier.
pub(crate) const SCALE_2: &str = "weight_scale_2";
/// The legacy form's scale tensor.
pub(crate) const LEGACY_SCALE: &str = "scale_weight";
/// The legacy form's file-level marker (`{prefix}scaled_fp8`).
pub(crate) const LEGACY_MARKER: &str = "scaled_fp8";
/// The `__metadata__` key of the file-level transport.
pub(crate) const METADATA_KEY: &str = "_quantization_metadata";
/// The largest marker tensor read (its JSON is a few dozen bytes).
const MAX_MARKER: u64 = 64 << 10;

/// Every format name ComfyUI knows (`QUANT_ALGOS`); those ckptkit does not
/// read yet are refused by name rather than read as plain tensors.
const KNOWN_FORMATS: [&str; 8] = [
    "float8_e4m3fn",
    "float8_e5m2",
    "nvfp4",
    "mxfp8",
    "int8_tensorwise",
    "convrot_w4a4",
    "asym_w4a8_int8",
    "awq_w4a16",
];

/// A layout of the family: its format and, for int8, the scale's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `float8_e4m3fn` / `float8_e5m2`: FP8 codes, one F32 scale.
    Fp8(Fp8Kind),
    /// `int8_tensorwise`: I8 codes, an F32 scale `[]` or, `per_row`,
    /// `[O, 1]`.
    Int8 {
        /// One scale per output row.
        per_row: bool,
    },
    /// `mxfp8`: E4M3 codes padded to multiples of 32 in both dimensions,
    /// one E8M0 scale per 32 elements of a row, swizzled.
    Mxfp8,
    /// `nvfp4`: E2M1 codes two to a byte, padded to multiples of 16 in
    /// both dimensions, one E4M3 scale per 16 elements of a row, swizzled,
    /// and an F32 multiplier per tensor (`weight_scale_2`).
    Nvfp4,
}

impl Kind {
    /// The `format` name ComfyUI writes.
    pub(crate) fn format_name(self) -> &'static str {
        match self {
            Kind::Fp8(Fp8Kind::E5M2) => "float8_e5m2",
            Kind::Fp8(_) => "float8_e4m3fn",
            Kind::Int8 { .. } => "int8_tensorwise",
            Kind::Mxfp8 => "mxfp8",
            Kind::Nvfp4 => "nvfp4",
        }
    }

    /// The `--to` spelling (`comfy:int8_tensorwise:per_row`).
    pub(crate) fn spelling(self) -> String {
        match self {
            Kind::Int8 { per_row: true } => "comfy:int8_tensorwise:per_row".into(),
            k => format!("comfy:{}", k.format_name()),
        }
    }

    /// Parses a `--to` spelling after `comfy:`.
    pub(crate) fn parse(s: &str) -> Option<Kind> {
        match s {
            "float8_e4m3fn" => Some(Kind::Fp8(Fp8Kind::E4M3Fn)),
            "float8_e5m2" => Some(Kind::Fp8(Fp8Kind::E5M2)),
            "int8_tensorwise" => Some(Kind::Int8 { per_row: false }),
            "int8_tensorwise:per_row" => Some(Kind::Int8 { per_row: true }),
            "mxfp8" => Some(Kind::Mxfp8),
            "nvfp4" => Some(Kind::Nvfp4),
            _ => None,
        }
    }

    /// The stored dtype of the codes.
    pub(crate) fn code_dtype(self) -> Dtype {
        match self {
            Kind::Fp8(Fp8Kind::E5M2) => Dtype::F8E5M2,
            Kind::Fp8(_) | Kind::Mxfp8 => Dtype::F8E4M3,
            Kind::Int8 { .. } => Dtype::I8,
            Kind::Nvfp4 => Dtype::U8,
        }
    }

    /// Whether the codes are stored padded with swizzled block scales
    /// (MXFP8, NVFP4): no other layout reads them as they are.
    pub(crate) fn is_padded(self) -> bool {
        matches!(self, Kind::Mxfp8 | Kind::Nvfp4)
    }

    /// The stored shapes of the codes and the scales of a padded layout's
    /// `[r, c]` weight.
    pub(crate) fn padded_shapes(self, r: u64, c: u64) -> Option<(Vec<u64>, Vec<u64>)> {
        match self {
            Kind::Mxfp8 => Some(mx_shapes(r, c)),
            Kind::Nvfp4 => Some(nvfp4::shapes(r, c)),
            _ => None,
        }
    }

    /// The scale dtypes a padded layout's file may store (ComfyUI views
    /// either as the format's own): E8M0 for MXFP8, E4M3 for NVFP4, or U8.
    fn padded_scale_dtype(self, d: Dtype) -> bool {
        match self {
            Kind::Mxfp8 => matches!(d, Dtype::U8 | Dtype::F8E8M0),
            Kind::Nvfp4 => matches!(d, Dtype::U8 | Dtype::F8E4M3),
            _ => false,
        }
    }

    /// The stored scale's shape for a weight of `o` rows.
    pub(crate) fn scale_shape(self, o: u64) -> Vec<u64> {
        match self {
            Kind::Int8 { per_row: true } => vec![o, 1],
            _ => Vec::new(),
        }
    }
}

/// The stored shapes of an MXFP8 weight of logical shape `[r, c]`: the
/// codes `[R32, C32]` (each rounded up to a multiple of 32) and the
/// swizzled scales `[roundup(R32, 128), roundup(C32 / 32, 4)]`.
pub(crate) fn mx_shapes(r: u64, c: u64) -> (Vec<u64>, Vec<u64>) {
    let (r32, c32) = (r.div_ceil(32) * 32, c.div_ceil(32) * 32);
    (
        vec![r32, c32],
        vec![r32.div_ceil(128) * 128, (c32 / 32).div_ceil(4) * 4],
    )
}

/// What a layer's format record says: the layout, and ComfyUI's
/// `full_precision_matrix_mult` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Format {
    /// The layout.
    pub kind: Kind,
    /// `full_precision_matrix_mult`: compute in the model dtype.
    pub full_precision: bool,
    /// ComfyUI's legacy form (FP8 only): `m.scale_weight` beside the codes
    /// and a file-level `scaled_fp8` marker instead of the format record.
    pub legacy: bool,
    /// ConvRot (int8 per row only): the codes are those of the weight
    /// rotated by a Hadamard matrix per group of this many input columns
    /// (a power of 4). Read only.
    pub convrot: Option<u64>,
    /// The legacy form only: the layer's `scale_input` is not 1.0, so
    /// ComfyUI's `convert_old_quants` keeps it, as `input_scale`.
    pub input_scale: bool,
}

impl Format {
    /// The layer record.
    pub(crate) fn record(&self) -> WeightQuant {
        let mut params = Vec::new();
        if let Some(n) = self.convrot {
            params.push(Param {
                key: "convrot".into(),
                value: n.to_string(),
            });
        }
        params.push(Param {
            key: "format".into(),
            value: self.kind.format_name().into(),
        });
        if self.full_precision {
            params.push(Param {
                key: "full_precision_matrix_mult".into(),
                value: "true".into(),
            });
        }
        if self.kind == (Kind::Int8 { per_row: true }) {
            params.push(Param {
                key: "per_row".into(),
                value: "true".into(),
            });
        }
        if self.input_scale {
            params.push(Param {
                key: "input_scale".into(),
                value: "true".into(),
            });
        }
        if self.legacy {
            params.push(Param {
                key: "legacy".into(),
                value: "true".into(),
            });
        }
        WeightQuant::Family {
            name: NAME.into(),
            params,
        }
    }

    /// Reads a record of this family.
    pub(crate) fn of(w: &WeightQuant) -> Result<Format> {
        let WeightQuant::Family { name, params } = w else {
            return Err(Error::layout("not a ComfyUI record"));
        };
        if name != NAME {
            return Err(Error::layout(format!("`{name}` is not a ComfyUI record")));
        }
        let mut kind = None;
        let mut full_precision = false;
        let mut per_row = false;
        let mut legacy = false;
        let mut input_scale = false;
        let mut convrot = None;
        for p in params {
            match (p.key.as_str(), p.value.as_str()) {
                ("convrot", n) => {
                    convrot = Some(convrot_groupsize(n.parse::<u64>().ok()).ok_or_else(|| {
                        Error::layout(format!("ConvRot group size `{n}` is not a power of 4"))
                    })?)
                }
                ("format", f) => {
                    kind = Some(Kind::parse(f).filter(|k| k.format_name() == f).ok_or_else(
                        || Error::layout(format!("ComfyUI format `{f}` is not one ckptkit reads")),
                    )?)
                }
                ("full_precision_matrix_mult", "true") => full_precision = true,
                ("per_row", "true") => per_row = true,
                ("legacy", "true") => legacy = true,
                ("input_scale", "true") => input_scale = true,
                (k, v) => {
                    return Err(Error::layout(format!(
                        "unknown ComfyUI record parameter {k}={v}"
                    )))
                }
            }
        }
        let kind = match kind {
            Some(Kind::Int8 { .. }) => Kind::Int8 { per_row },
            Some(k) if !per_row => k,
            Some(_) => return Err(Error::layout("per_row=true belongs to int8_tensorwise")),
            None => return Err(Error::layout("a ComfyUI record without a format")),
        };
        if legacy && !matches!(kind, Kind::Fp8(_)) {
            return Err(Error::layout("legacy=true belongs to the FP8 formats"));
        }
        if input_scale && !legacy {
            return Err(Error::layout("input_scale=true belongs to the legacy form"));
        }
        if convrot.is_some() && kind != (Kind::Int8 { per_row: true }) {
            return Err(Error::layout("convrot belongs to int8_tensorwise per row"));
        }
        Ok(Format {
            kind,
            full_precision,
            legacy,
            convrot,
            input_scale,
        })
    }

    /// How passes and `inspect` name it.
    pub(crate) fn label(&self) -> String {
        match (self.legacy, self.convrot) {
            (true, _) => format!("{} (legacy scaled_fp8)", self.kind.spelling()),
            (_, Some(n)) => format!("{} (convrot {n})", self.kind.spelling()),
            _ => self.kind.spelling(),
        }
    }

    /// The marker JSON as ComfyUI writes it (Python's `json.dumps`).
    pub(crate) fn marker_json(&self) -> String {
        let mut s = format!("{{\"format\": \"{}\"", self.kind.format_name());
        if let Some(n) = self.convrot {
            s.push_str(&format!(", \"convrot\": true, \"convrot_groupsize\": {n}"));
        }
        if self.full_precision {
            s.push_str(", \"full_precision_matrix_mult\": true");
        }
        s.push('}');
        s
    }

    /// Reads a format object (`{"format": ..., ...}`, its fields possibly
    /// inside `"params"`, as ComfyUI's loader accepts). An int8 layout's
    /// scale shape is read from the tensors, later.
    fn from_json(v: &serde_json::Value, layer: &str, from: &str) -> Result<Format> {
        let get = |k: &str| v.get(k).or_else(|| v.get("params").and_then(|p| p.get(k)));
        let name = get("format").and_then(|f| f.as_str()).ok_or_else(|| {
            Error::layout(format!("{from} has no \"format\" string")).with_layer(layer.to_string())
        })?;
        let refuse = |what: &str| {
            Error::new(ErrorKind::UnknownQuantized(format!(
                "{from} says format `{name}`: {what}; converting it as plain tensors would give \
                 garbage, so it is refused (leave it out with --exclude, or convert it with ComfyUI)"
            )))
            .with_layer(layer.to_string())
        };
        let kind = match Kind::parse(name).filter(|k| k.format_name() == name) {
            Some(k) => k,
            None if KNOWN_FORMATS.contains(&name) => {
                return Err(refuse(
                    "a ComfyUI format this version of ckptkit does not read yet",
                ))
            }
            None => return Err(refuse("not a ComfyUI format")),
        };
        let convrot = match get("convrot").and_then(|b| b.as_bool()) {
            Some(true) => {
                let n = get("convrot_groupsize").map_or(Some(256), |v| v.as_u64());
                Some(convrot_groupsize(n).ok_or_else(|| {
                    refuse(&format!(
                        "with \"convrot\": true and \"convrot_groupsize\": {}, which is not a \
                         power of 4 (4, 16, 64, 256, 1024, ...; comfy-kitchen has no Hadamard \
                         matrix of another size) up to {MAX_CONVROT_GROUP}",
                        get("convrot_groupsize").map_or("null".into(), |v| v.to_string())
                    ))
                })?)
            }
            _ => None,
        };
        let full_precision = get("full_precision_matrix_mult")
            .and_then(|b| b.as_bool())
            .unwrap_or(false);
        if convrot.is_some() && !matches!(kind, Kind::Int8 { .. }) {
            return Err(refuse("with \"convrot\", which only int8_tensorwise takes"));
        }
        Ok(Format {
            kind,
            full_precision,
            legacy: false,
            convrot,
            input_scale: false,
        })
    }

    /// The same format with the int8 scale shape the stored scale has.
    fn with_scale_shape(mut self, shape: &[u64], o: u64) -> Format {
        if let Kind::Int8 { .. } = self.kind {
            // ComfyUI: a scale with dimensions is per row
            self.kind = Kind::Int8 {
                per_row: shape.len() == 2 && shape == [o, 1],
            };
        }
        self
    }
}

/// The largest ConvRot group size read: 4^6. Dequantizing builds the
/// `n` x `n` sign table and does `n` operations per element, so a file may
/// not choose it freely (ComfyUI's checkpoints use 256).
pub(crate) const MAX_CONVROT_GROUP: u64 = 4096;

/// A ConvRot group size: a power of 4 from 4 to [`MAX_CONVROT_GROUP`].
fn convrot_groupsize(n: Option<u64>) -> Option<u64> {
    n.filter(|&n| {
        (4..=MAX_CONVROT_GROUP).contains(&n) && n.is_power_of_two() && n.trailing_zeros() % 2 == 0
    })
}

/// The layers the file-level transport names, with their format objects.
fn metadata_layers(src: &dyn TensorSource) -> Result<BTreeMap<String, serde_json::Value>> {
    let Some(text) = src.metadata().get(METADATA_KEY) else {
        return Ok(BTreeMap::new());
    };
    let bad = |why: String| {
        Error::new(ErrorKind::Malformed(format!(
            "__metadata__[\"{METADATA_KEY}\"]: {why}"
        )))
        .with_file(src.describe())
    };
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let layers = v
        .get("layers")
        .and_then(|l| l.as_object())
        .ok_or_else(|| bad("no \"layers\" object".into()))?;
    Ok(layers.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// ComfyUI layer detection over one source.
pub(crate) struct ComfyDetector<'a> {
    src: &'a dyn TensorSource,
    /// `_quantization_metadata`'s layers.
    listed: BTreeMap<String, serde_json::Value>,
    /// The model dtype of a layer with no bias: the first BF16/F16/F32
    /// tensor of the source that is not a scale (F32 when there is none).
    model_dtype: Dtype,
    /// A legacy file's marker: `full_precision_matrix_mult` when it has
    /// two elements.
    legacy: Option<bool>,
    /// A plain checkpoint of the model (`--shapes-from`): the logical
    /// shapes of MXFP8 and NVFP4 weights, whose stored codes are padded.
    shapes_from: Option<&'a dyn TensorSource>,
    /// The logical shapes ckptkit's schema records for the padded layers
    /// of a file ckptkit wrote.
    recorded: BTreeMap<String, Vec<u64>>,
}

/// Whether a key is a legacy `scaled_fp8` marker.
pub(crate) fn is_legacy_marker(key: &str) -> bool {
    crate::format::layers::split_key(key).1 == LEGACY_MARKER
}

impl<'a> ComfyDetector<'a> {
    pub(crate) fn new(
        src: &'a dyn TensorSource,
        shapes_from: Option<&'a dyn TensorSource>,
        schema: Option<&crate::format::st_schema::Schema>,
    ) -> Result<ComfyDetector<'a>> {
        let recorded = schema
            .into_iter()
            .flatten()
            .filter(|(_, e)| e.weights.starts_with("comfy:") && e.shape.len() == 2)
            .map(|(p, e)| (p.clone(), e.shape.clone()))
            .collect();
        // scales (NVFP4's `weight_scale_2` too) are F32 whatever the model's dtype
        let is_scale = |key: &str| {
            let name = crate::format::layers::split_key(key).1;
            name.ends_with("scale") || name.ends_with("scale_2") || name.starts_with("scale_")
        };
        let model_dtype = src
            .tensors()
            .iter()
            .filter(|t| !is_scale(&t.key))
            .map(|t| t.dtype)
            .find(|d| matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32))
            .unwrap_or(Dtype::F32);
        let mut legacy = None;
        for t in src.tensors().iter().filter(|t| is_legacy_marker(&t.key)) {
            let n = crate::dtype::numel(&t.shape)?;
            let ok = matches!(t.dtype, Dtype::F8E4M3 | Dtype::F8E5M2 | Dtype::F32) && n <= 2;
            if !ok || legacy.is_some_and(|l| l != (n == 2)) {
                return Err(Error::layout(format!(
                    "`{}` is not a legacy ComfyUI `{LEGACY_MARKER}` marker (an F8_E4M3, F8_E5M2 \
                     or F32 tensor of 0 or 2 elements, one per file): {} {:?}",
                    t.key, t.dtype, t.shape
                ))
                .with_tensor(t.key.clone())
                .with_file(src.describe()));
            }
            legacy = Some(n == 2);
        }
        Ok(ComfyDetector {
            src,
            listed: metadata_layers(src)?,
            model_dtype,
            legacy,
            shapes_from,
            recorded,
        })
    }

    /// The format of a layer's marker tensor.
    fn marker_format(&self, path: &str, t: &SourceTensor) -> Result<Format> {
        if t.dtype != Dtype::U8 || t.shape.len() != 1 || t.len > MAX_MARKER {
            return Err(Error::layout(format!(
                "`{}` must be a U8 1-D tensor of JSON (at most {MAX_MARKER} bytes); it is {} {:?}",
                t.key, t.dtype, t.shape
            ))
            .with_layer(path.to_string())
            .with_tensor(t.key.clone()));
        }
        let b = self.src.read(&t.key)?;
        let v: serde_json::Value = serde_json::from_slice(&b).map_err(|e| {
            Error::layout(format!("`{}` does not hold JSON: {e}", t.key))
                .with_layer(path.to_string())
                .with_tensor(t.key.clone())
        })?;
        Format::from_json(&v, path, &format!("`{}`", t.key))
    }
}

impl ComfyDetector<'_> {
    /// A layer of a legacy file: FP8 `weight` codes beside a one-element
    /// `scale_weight`.
    fn detect_legacy(&self, path: &str, others: &[&SourceTensor]) -> Result<Detected> {
        let Some(full_precision) = self.legacy else {
            return Ok(Detected::NotMine);
        };
        let find = |name: &str| {
            let k = crate::layout::family::key(path, name);
            others.iter().find(|t| t.key == k).copied()
        };
        // `scale_weight`, or the `weight_scale` spelling some legacy files
        // use (ComfyUI renames only `scale_weight`: spec/layouts.md §5.4)
        let (Some(q), Some(s)) = (find("weight"), find(LEGACY_SCALE).or_else(|| find(SCALE)))
        else {
            return Ok(Detected::NotMine);
        };
        let kind = match q.dtype {
            Dtype::F8E4M3 => Fp8Kind::E4M3Fn,
            Dtype::F8E5M2 => Fp8Kind::E5M2,
            // a dummy scale beside a float weight: not a quantized layer
            _ => return Ok(Detected::NotMine),
        };
        if q.shape.len() != 2
            || !matches!(s.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16)
            || crate::dtype::numel(&s.shape)? != 1
            || s.shape.len() > 1
        {
            return Err(Error::layout(format!(
                "a legacy ComfyUI scaled-FP8 layer stores `weight` [out, in] and a one-element \
                 `{LEGACY_SCALE}`; this one has `weight` {} {:?} and `{LEGACY_SCALE}` {} {:?}",
                q.dtype, q.shape, s.dtype, s.shape
            ))
            .with_layer(path.to_string()));
        }
        // ComfyUI keeps a `scale_input` that is not 1.0 (as `input_scale`)
        let input_scale = match find("scale_input") {
            Some(t) if crate::dtype::numel(&t.shape)? == 1 && t.shape.len() <= 1 => {
                let b = self.src.read(&t.key)?;
                math::widen(t.dtype, &b)
                    .map_err(|e| e.with_tensor(t.key.clone()).with_layer(path.to_string()))?
                    .first()
                    .is_some_and(|&v| v != 1.0)
            }
            _ => false,
        };
        let format = Format {
            kind: Kind::Fp8(kind),
            full_precision,
            legacy: true,
            convrot: None,
            input_scale,
        };
        Ok(Detected::Found {
            weight: LogicalTensor {
                name: "weight".into(),
                dtype: self.dtype_of(path, others),
                shape: q.shape.clone(),
                encoding: Encoding::Quantized,
                parts: vec![
                    out_part(Role::Data, q.key.clone(), q.dtype, q.shape.clone()),
                    out_part(Role::Scale, s.key.clone(), s.dtype, s.shape.clone()),
                ],
            },
            record: format.record(),
            used: vec![q.key.clone(), s.key.clone()],
        })
    }

    /// The model dtype of a layer: its bias's, else the file's.
    fn dtype_of(&self, path: &str, others: &[&SourceTensor]) -> Dtype {
        let bias = crate::layout::family::key(path, "bias");
        others
            .iter()
            .find(|t| t.key == bias)
            .map(|b| b.dtype)
            .filter(|d| matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32))
            .unwrap_or(self.model_dtype)
    }
}

impl ComfyDetector<'_> {
    /// An MXFP8 or NVFP4 layer: codes padded (to multiples of 32 or 16),
    /// swizzled block scales, and NVFP4's per-tensor `weight_scale_2`. Its
    /// logical shape is the `--shapes-from` checkpoint's when it pads to the
    /// stored one, else the stored (padded) shape.
    fn detect_padded(
        &self,
        path: &str,
        format: Format,
        q: &SourceTensor,
        s: &SourceTensor,
        marker: Option<&SourceTensor>,
        others: &[&SourceTensor],
    ) -> Result<Detected> {
        let kind = format.kind;
        // the stored shape, read as unpadded: [R, C] codes, or NVFP4's
        // [R16, C16 / 2] bytes of two codes
        let unpadded = match (kind, q.shape.as_slice()) {
            (Kind::Nvfp4, [r, h]) => h.checked_mul(2).map(|c| vec![*r, c]),
            (_, [r, c]) => Some(vec![*r, *c]),
            _ => None,
        };
        let global = crate::layout::family::key(path, SCALE_2);
        let s2 = others.iter().find(|t| t.key == global).copied();
        let stored_ok = q.dtype == kind.code_dtype()
            && kind.padded_scale_dtype(s.dtype)
            && unpadded.as_ref().is_some_and(|u| {
                kind.padded_shapes(u[0], u[1])
                    .is_some_and(|(qs, ss)| qs == q.shape && ss == s.shape)
            })
            && match kind {
                Kind::Nvfp4 => {
                    s2.is_some_and(|t| t.dtype == Dtype::F32 && t.shape.len() <= 1 && t.len == 4)
                }
                _ => true,
            };
        if !stored_ok {
            let s2_was = match (kind, s2) {
                (Kind::Nvfp4, Some(t)) => format!(" and `{SCALE_2}` {} {:?}", t.dtype, t.shape),
                (Kind::Nvfp4, None) => format!(" and no `{SCALE_2}`"),
                _ => String::new(),
            };
            let wanted = match kind {
                Kind::Nvfp4 => format!(
                    "`weight` U8 [R16, C16 / 2] (two E2M1 codes a byte, padded to multiples of \
                     16), `{SCALE}` F8_E4M3 or U8 [roundup(R16, 128), roundup(C16 / 16, 4)] \
                     (swizzled) and an F32 `{SCALE_2}` of one element"
                ),
                _ => format!(
                    "`weight` F8_E4M3 [R32, C32] (padded to multiples of 32) and `{SCALE}` U8 or \
                     F8_E8M0 [roundup(R32, 128), roundup(C32 / 32, 4)] (swizzled)"
                ),
            };
            return Err(Error::layout(format!(
                "a ComfyUI {} layer stores {wanted}; this one has `weight` {} {:?} and \
                 `{SCALE}` {} {:?}{s2_was}",
                kind.format_name(),
                q.dtype,
                q.shape,
                s.dtype,
                s.shape
            ))
            .with_layer(path.to_string()));
        }
        let stored = unpadded.unwrap_or_default();
        let key = crate::layout::family::key(path, "weight");
        let hinted = self.shapes_from.and_then(|h| {
            h.tensors()
                .iter()
                .find(|t| t.key == key)
                .map(|t| t.shape.clone())
        });
        // --shapes-from, else ckptkit's schema, else the stored shape
        let (hinted, from) = match hinted {
            Some(h) => (Some(h), "--shapes-from"),
            None => (self.recorded.get(path).cloned(), "ckptkit.schema"),
        };
        let shape = match hinted {
            Some(h)
                if h.len() == 2
                    && kind
                        .padded_shapes(h[0], h[1])
                        .is_some_and(|(qs, _)| qs == q.shape) =>
            {
                h
            }
            Some(h) => {
                return Err(Error::layout(format!(
                    "{from} gives `{key}` the shape {h:?}, which does not pad to the stored {} \
                     codes {:?}",
                    kind.format_name(),
                    q.shape
                ))
                .with_layer(path.to_string()))
            }
            None => stored,
        };
        let mut parts = vec![
            out_part(Role::Data, q.key.clone(), q.dtype, q.shape.clone()),
            out_part(Role::Scale, s.key.clone(), s.dtype, s.shape.clone()),
        ];
        let mut used = vec![q.key.clone(), s.key.clone()];
        for (t, role) in [(s2, SCALE_2), (marker, MARKER)] {
            if let Some(t) = t.filter(|_| role == MARKER || kind == Kind::Nvfp4) {
                parts.push(out_part(
                    Role::Other(role.into()),
                    t.key.clone(),
                    t.dtype,
                    t.shape.clone(),
                ));
                used.push(t.key.clone());
            }
        }
        Ok(Detected::Found {
            weight: LogicalTensor {
                name: "weight".into(),
                dtype: self.dtype_of(path, others),
                shape,
                encoding: Encoding::Quantized,
                parts,
            },
            record: format.record(),
            used,
        })
    }
}

impl Detector for ComfyDetector<'_> {
    fn claim<'k>(&self, _key: &'k str) -> Option<&'k str> {
        // `{m}.comfy_quant`, `{m}.weight`, `{m}.weight_scale` are module m's
        // by their keys already
        None
    }

    fn detect(
        &self,
        path: &str,
        _claimed: &[&SourceTensor],
        others: &[&SourceTensor],
    ) -> Result<Detected> {
        let find = |name: &str| {
            let k = crate::layout::family::key(path, name);
            others.iter().find(|t| t.key == k).copied()
        };
        let marker = find(MARKER);
        let from_marker = marker.map(|t| self.marker_format(path, t)).transpose()?;
        let from_metadata = self
            .listed
            .get(path)
            .map(|v| {
                Format::from_json(
                    v,
                    path,
                    &format!("__metadata__[\"{METADATA_KEY}\"] for this layer"),
                )
            })
            .transpose()?;
        let format = match (from_marker, from_metadata) {
            (None, None) => return self.detect_legacy(path, others),
            (Some(a), Some(b)) if a != b => {
                return Err(Error::layout(format!(
                    "its `{MARKER}` tensor says {} and __metadata__[\"{METADATA_KEY}\"] says {}; \
                     ComfyUI would take the metadata's, other readers the tensor's, so which \
                     one is meant cannot be told: re-save the checkpoint with one of them",
                    a.marker_json(),
                    b.marker_json()
                ))
                .with_layer(path.to_string()))
            }
            (Some(a), _) => a,
            (None, Some(b)) => b,
        };
        let (Some(q), Some(s)) = (find("weight"), find(SCALE)) else {
            return Err(Error::layout(format!(
                "a ComfyUI {} layer needs `weight` and `{SCALE}`",
                format.kind.format_name()
            ))
            .with_layer(path.to_string()));
        };
        if format.kind.is_padded() {
            return self.detect_padded(path, format, q, s, marker, others);
        }
        let o = q.shape.first().copied().unwrap_or(0);
        let format = format.with_scale_shape(&s.shape, o);
        if let Some(n) = format.convrot {
            let i = q.shape.get(1).copied().unwrap_or(0);
            if format.kind != (Kind::Int8 { per_row: true })
                || q.shape.len() != 2
                || !i.is_multiple_of(n)
            {
                return Err(Error::layout(format!(
                    "a ConvRot layer stores int8 codes [out, in] with one F32 scale per row \
                     ([out, 1]) and in-features a multiple of its group size {n}; this one has \
                     `weight` {} {:?} and `{SCALE}` {} {:?}",
                    q.dtype, q.shape, s.dtype, s.shape
                ))
                .with_layer(path.to_string()));
            }
        }
        let scale_ok = matches!(s.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16)
            && (crate::dtype::numel(&s.shape)? == 1 && s.shape.len() <= 1
                || s.shape == format.kind.scale_shape(o));
        if q.dtype != format.kind.code_dtype() || q.shape.len() != 2 || !scale_ok {
            return Err(Error::layout(format!(
                "a ComfyUI {} layer stores `weight` {} [out, in] and an F32 `{SCALE}` of one \
                 element{}; this one has `weight` {} {:?} and `{SCALE}` {} {:?}",
                format.kind.format_name(),
                format.kind.code_dtype(),
                if matches!(format.kind, Kind::Int8 { .. }) {
                    " or one per row ([out, 1])"
                } else {
                    ""
                },
                q.dtype,
                q.shape,
                s.dtype,
                s.shape
            ))
            .with_layer(path.to_string()));
        }
        // the dequantized weight takes the model's dtype: the layer's bias,
        // else the file's first float tensor
        let dtype = self.dtype_of(path, others);
        let mut parts = vec![
            out_part(Role::Data, q.key.clone(), q.dtype, q.shape.clone()),
            out_part(Role::Scale, s.key.clone(), s.dtype, s.shape.clone()),
        ];
        let mut used = vec![q.key.clone(), s.key.clone()];
        if let Some(m) = marker {
            parts.push(out_part(
                Role::Other(MARKER.into()),
                m.key.clone(),
                m.dtype,
                m.shape.clone(),
            ));
            used.push(m.key.clone());
        }
        Ok(Detected::Found {
            weight: LogicalTensor {
                name: "weight".into(),
                dtype,
                shape: q.shape.clone(),
                encoding: Encoding::Quantized,
                parts,
            },
            record: format.record(),
            used,
        })
    }

    fn finish(&self, layers: &[crate::format::manifest::Layer]) -> Result<()> {
        // a layer the metadata names must be there
        for path in self.listed.keys() {
            if !layers.iter().any(|l| &l.path == path) {
                return Err(Error::layout(format!(
                    "__metadata__[\"{METADATA_KEY}\"] names layer `{path}`, which the file \
                     does not have (its layer names must be the file's key prefixes)"
                ))
                .with_layer(path.clone())
                .with_file(self.src.describe()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

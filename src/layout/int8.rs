//! The int8 family as data: a declarative descriptor says where the integer
//! payload, the scale and an optional zero point live (relative to the
//! module path), how they are stored and what the numbers mean. Built-in
//! presets describe ckptkit's own `int8`, bitsandbytes LLM.int8 and
//! compressed-tensors int8; a user's in-house layout is a small JSON file.
//! spec/layouts.md §3 is the prose version.

use serde::{Deserialize, Serialize};

use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::float::FloatDtype;

/// How the integer payload is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// One I8 per value, logical shape `[O, I]`.
    I8,
    /// Four values per little-endian I32 word, each stored as the byte
    /// `q + offset` (compressed-tensors `pack-quantized`), shape
    /// `[O, ceil(I / 4)]`, the last word zero-padded.
    PackedI32,
}

/// The integer payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// Key relative to the module path (`weight`, `weight_packed`).
    pub key: String,
    /// Storage form.
    pub storage: Storage,
    /// Added to each value before packing (128 for compressed-tensors).
    #[serde(default)]
    pub offset: i32,
    /// Key of an I64 `[2]` tensor holding the logical `[O, I]` (packed
    /// forms), if the layout stores one.
    #[serde(default)]
    pub shape_key: Option<String>,
}

/// Which elements share one scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// One scale for the whole tensor.
    Tensor,
    /// One scale per output row.
    Channel,
    /// One scale per group of N consecutive elements of a row.
    Group(u64),
}

/// What the stored scale number is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleValue {
    /// The scale itself: `w = q · s`.
    Scale,
    /// An absmax to be divided by a constant: `w = q · A · (1/c)`.
    AbsmaxOver(f64),
}

/// The shape the scale is stored with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleShape {
    /// `[O, 1]` (channel), `[O, I/G]` (group), `[1]` (tensor).
    Column,
    /// `[O]` (channel), `[]` (tensor).
    Vector,
}

/// The scale tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleSpec {
    /// Key relative to the module path.
    pub key: String,
    /// Stored dtype; `None` means the model's dtype.
    #[serde(default)]
    pub dtype: Option<String>,
    /// Which elements share a scale.
    pub granularity: Granularity,
    /// What the stored number is.
    pub value: ScaleValue,
    /// Stored shape.
    pub shape: ScaleShape,
}

/// A zero point (asymmetric layouts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZeroPointSpec {
    /// Key relative to the module path.
    pub key: String,
}

/// Rounding of `w / s` to an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rounding {
    /// Ties to even (torch.round).
    HalfEven,
    /// Ties away from zero (C `roundf`).
    HalfAway,
}

/// A constant tensor a layout requires (e.g. bitsandbytes `weight_format`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstTensor {
    /// Key relative to the module path.
    pub key: String,
    /// Stored dtype (safetensors spelling).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// Values (integers), row-major.
    pub values: Vec<i64>,
}

/// The dtype every intermediate result of quantization is rounded to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arithmetic {
    /// f32: ckptkit's own, and bitsandbytes (its f16 × f32 ops promote to
    /// f32).
    #[default]
    F32,
    /// The dtype of the weight being quantized (the model dtype, or
    /// [`QuantizeMath::cast`] when set), as torch computes on a bf16/f16
    /// tensor: each op in f32, rounded back to that dtype
    /// (compressed-tensors).
    Weight,
}

/// How a weight value is brought onto the integer grid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleOp {
    /// `v = w / s` with `s = a / divisor` (compressed-tensors `_quantize`).
    #[default]
    Divide,
    /// `v = w · m` with `m = (1/a) · divisor`, every op rounded: bitsandbytes
    /// writes `127.0 / SCB`, which torch evaluates as `SCB.reciprocal() *
    /// 127`. An all-zero group gives `0 · ∞ = NaN`, stored as q = 0.
    ReciprocalMultiply,
}

/// What the scale of an all-zero group becomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZeroScale {
    /// 0 (and q = 0).
    #[default]
    Zero,
    /// `finfo(scale dtype).eps` (compressed-tensors `calculate_qparams`),
    /// q = 0.
    Eps,
}

/// How a library computes the quantization, op by op. Every field defaults
/// to ckptkit's own arithmetic, so a descriptor that omits `math` keeps
/// quantizing as before.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuantizeMath {
    /// Dtype the float weight is cast to before anything else (`F16` for
    /// bitsandbytes); `None` keeps the model dtype.
    pub cast: Option<String>,
    /// Dtype of the intermediate results.
    pub arithmetic: Arithmetic,
    /// Division by the scale or multiplication by a reciprocal.
    pub scale_op: ScaleOp,
    /// The scale of an all-zero group.
    pub zero_scale: ZeroScale,
}

impl QuantizeMath {
    /// Whether every field has its default (then it is left out of the
    /// JSON).
    pub fn is_default(&self) -> bool {
        *self == QuantizeMath::default()
    }
}

/// A declarative int8 layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Int8Descriptor {
    /// Display name (`int8`, `int8:bnb`, ...).
    pub name: String,
    /// Integer payload.
    pub payload: Payload,
    /// Scale.
    pub scale: ScaleSpec,
    /// Zero point, for asymmetric layouts.
    #[serde(default)]
    pub zero_point: Option<ZeroPointSpec>,
    /// Inclusive integer range, e.g. `[-127, 127]`.
    pub range: [i32; 2],
    /// Rounding of quantization.
    pub rounding: Rounding,
    /// Quantization divides the absmax by this to get the scale (127,
    /// 127.5, ...).
    pub divisor: f64,
    /// Extra constant tensors.
    #[serde(default)]
    pub constants: Vec<ConstTensor>,
    /// The library's quantization arithmetic (absent = ckptkit's own).
    #[serde(default, skip_serializing_if = "QuantizeMath::is_default")]
    pub math: QuantizeMath,
}

fn derr(name: &str, msg: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Usage(format!("int8 layout `{name}`: {msg}")))
}

impl Int8Descriptor {
    /// Checks that the descriptor does not contradict itself.
    pub fn validate(&self) -> Result<()> {
        let n = &self.name;
        let [lo, hi] = self.range;
        if !(-128..=127).contains(&lo) || !(-128..=127).contains(&hi) || lo >= hi {
            return Err(derr(
                n,
                format!("range [{lo}, {hi}] must lie in [-128, 127] with min < max"),
            ));
        }
        if self.zero_point.is_none() && lo > 0 {
            return Err(derr(n, "a symmetric layout needs negative values"));
        }
        if !(self.divisor.is_finite() && self.divisor > 0.0 && self.divisor <= 256.0) {
            return Err(derr(
                n,
                format!("divisor {} must be in (0, 256]", self.divisor),
            ));
        }
        if let ScaleValue::AbsmaxOver(c) = self.scale.value {
            if !(c.is_finite() && c > 0.0 && c <= 256.0) {
                return Err(derr(n, format!("absmax divisor {c} must be in (0, 256]")));
            }
        }
        if let Granularity::Group(g) = self.scale.granularity {
            if g == 0 || g > 1 << 20 {
                return Err(derr(n, format!("group size {g} must be in 1..=1048576")));
            }
            if self.scale.shape != ScaleShape::Column {
                return Err(derr(n, "group scales are stored as columns [O, I/G]"));
            }
        }
        match self.payload.storage {
            Storage::I8 if self.payload.offset != 0 => {
                return Err(derr(n, "an offset only applies to packed storage"))
            }
            Storage::PackedI32 => {
                let lo2 = lo + self.payload.offset;
                let hi2 = hi + self.payload.offset;
                if !(0..=255).contains(&lo2) || !(0..=255).contains(&hi2) {
                    return Err(derr(n, "range + offset must fit in a byte"));
                }
            }
            _ => {}
        }
        if let Some(d) = &self.scale.dtype {
            let dt =
                Dtype::from_name(d).ok_or_else(|| derr(n, format!("unknown scale dtype `{d}`")))?;
            if !dt.is_filterable_float() {
                return Err(derr(n, "scale dtype must be F16, BF16 or F32"));
            }
        }
        if let Some(c) = &self.math.cast {
            let dt =
                Dtype::from_name(c).ok_or_else(|| derr(n, format!("unknown cast dtype `{c}`")))?;
            if !dt.is_filterable_float() {
                return Err(derr(n, "the cast dtype must be F16, BF16 or F32"));
            }
        }
        if self.math.scale_op == ScaleOp::ReciprocalMultiply && self.zero_point.is_some() {
            return Err(derr(
                n,
                "reciprocal_multiply needs a symmetric layout (no zero point)",
            ));
        }
        let mut keys = vec![self.payload.key.as_str(), self.scale.key.as_str()];
        keys.extend(self.payload.shape_key.as_deref());
        keys.extend(self.zero_point.as_ref().map(|z| z.key.as_str()));
        for c in &self.constants {
            keys.push(&c.key);
            let dt = Dtype::from_name(&c.dtype)
                .ok_or_else(|| derr(n, format!("unknown dtype `{}`", c.dtype)))?;
            let ne = crate::dtype::numel(&c.shape)?;
            if ne != c.values.len() as u64
                || ne > 4096
                || !matches!(dt, Dtype::U8 | Dtype::I8 | Dtype::I32 | Dtype::I64)
            {
                return Err(derr(
                    n,
                    format!(
                        "constant `{}` must list its {ne} integer values (at most 4096)",
                        c.key
                    ),
                ));
            }
        }
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != keys.len() || keys.iter().any(|k| k.is_empty() || k.len() > 256) {
            return Err(derr(
                n,
                "keys must be distinct, non-empty and at most 256 bytes",
            ));
        }
        Ok(())
    }

    /// Parses and validates a descriptor from JSON.
    pub fn from_json(text: &str) -> Result<Self> {
        let d: Int8Descriptor = serde_json::from_str(text)
            .map_err(|e| Error::new(ErrorKind::Json(format!("int8 descriptor: {e}"))))?;
        d.validate()?;
        Ok(d)
    }

    /// Canonical JSON (what the manifest records).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The scale's stored dtype for a model of dtype `model`.
    pub fn scale_dtype(&self, model: Dtype) -> Dtype {
        self.scale
            .dtype
            .as_deref()
            .and_then(Dtype::from_name)
            .unwrap_or(model)
    }

    /// Full key of a part for module `m`.
    pub fn key(m: &str, k: &str) -> String {
        if m.is_empty() {
            k.to_string()
        } else {
            format!("{m}.{k}")
        }
    }

    /// Stored shapes for a logical `[O, I]` weight: payload, scale, zero
    /// point.
    pub fn shapes(&self, o: u64, i: u64) -> Result<(Vec<u64>, Vec<u64>, Vec<u64>)> {
        let payload = match self.payload.storage {
            Storage::I8 => vec![o, i],
            Storage::PackedI32 => vec![o, i.div_ceil(4)],
        };
        let groups = match self.scale.granularity {
            Granularity::Tensor => 0,
            Granularity::Channel => 1,
            Granularity::Group(g) => {
                if !i.is_multiple_of(g) {
                    return Err(Error::layout(format!(
                        "{}: in-features {i} is not a multiple of the group size {g}",
                        self.name
                    )));
                }
                i / g
            }
        };
        let scale = match (self.scale.granularity, self.scale.shape) {
            (Granularity::Tensor, ScaleShape::Column) => vec![1],
            (Granularity::Tensor, ScaleShape::Vector) => vec![],
            (Granularity::Channel, ScaleShape::Column) => vec![o, 1],
            (Granularity::Channel, ScaleShape::Vector) => vec![o],
            (Granularity::Group(_), _) => vec![o, groups],
        };
        Ok((payload, scale.clone(), scale))
    }

    /// Number of scales per row (0 = one for the tensor).
    fn per_row(&self, i: u64) -> u64 {
        match self.scale.granularity {
            Granularity::Tensor => 0,
            Granularity::Channel => 1,
            Granularity::Group(g) => i / g.max(1),
        }
    }
}

/// A built-in preset by name: `int8`, `int8:bnb`, `int8:ct` (channel,
/// pack-quantized) with optional `:group=N` and `:int-quantized`.
pub fn preset(name: &str) -> Result<Int8Descriptor> {
    let bad = || {
        derr(name, "unknown int8 layout; use int8, int8:bnb, int8:ct[:group=N][:int-quantized] or int8:FILE.json")
    };
    let mut parts = name.split(':');
    if parts.next() != Some("int8") {
        return Err(bad());
    }
    let d = match parts.next() {
        None => Int8Descriptor {
            name: "int8".into(),
            payload: Payload {
                key: "weight.q".into(),
                storage: Storage::I8,
                offset: 0,
                shape_key: None,
            },
            scale: ScaleSpec {
                key: "weight.scale".into(),
                dtype: None,
                granularity: Granularity::Channel,
                value: ScaleValue::Scale,
                shape: ScaleShape::Column,
            },
            zero_point: None,
            range: [-128, 127],
            rounding: Rounding::HalfEven,
            divisor: 127.0,
            constants: vec![],
            math: QuantizeMath::default(),
        },
        Some("bnb") => {
            if parts.next().is_some() {
                return Err(bad());
            }
            Int8Descriptor {
                name: "int8:bnb".into(),
                payload: Payload {
                    key: "weight".into(),
                    storage: Storage::I8,
                    offset: 0,
                    shape_key: None,
                },
                scale: ScaleSpec {
                    key: "SCB".into(),
                    dtype: Some("F32".into()),
                    granularity: Granularity::Channel,
                    value: ScaleValue::AbsmaxOver(127.0),
                    shape: ScaleShape::Vector,
                },
                zero_point: None,
                range: [-127, 127],
                rounding: Rounding::HalfEven,
                divisor: 127.0,
                constants: vec![ConstTensor {
                    key: "weight_format".into(),
                    dtype: "U8".into(),
                    shape: vec![],
                    values: vec![0],
                }],
                // Int8Params._quantize casts to f16; int8_vectorwise_quant
                // computes round(A * (127.0 / SCB)) in f32
                math: QuantizeMath {
                    cast: Some("F16".into()),
                    arithmetic: Arithmetic::F32,
                    scale_op: ScaleOp::ReciprocalMultiply,
                    zero_scale: ZeroScale::Zero,
                },
            }
        }
        Some("ct") => {
            let mut group = None;
            let mut int_quantized = false;
            for p in parts {
                if let Some(g) = p.strip_prefix("group=") {
                    group = Some(g.parse::<u64>().map_err(|_| bad())?);
                } else if p == "int-quantized" {
                    int_quantized = true;
                } else {
                    return Err(bad());
                }
            }
            let mut n = "int8:ct".to_string();
            if let Some(g) = group {
                n.push_str(&format!(":group={g}"));
            }
            if int_quantized {
                n.push_str(":int-quantized");
            }
            Int8Descriptor {
                name: n,
                payload: if int_quantized {
                    Payload {
                        key: "weight".into(),
                        storage: Storage::I8,
                        offset: 0,
                        shape_key: None,
                    }
                } else {
                    Payload {
                        key: "weight_packed".into(),
                        storage: Storage::PackedI32,
                        offset: 128,
                        shape_key: Some("weight_shape".into()),
                    }
                },
                scale: ScaleSpec {
                    key: "weight_scale".into(),
                    dtype: None,
                    granularity: group.map_or(Granularity::Channel, Granularity::Group),
                    value: ScaleValue::Scale,
                    shape: ScaleShape::Column,
                },
                zero_point: None,
                range: [-128, 127],
                rounding: Rounding::HalfEven,
                divisor: 127.5,
                constants: vec![],
                // calculate_qparams and _quantize compute in the model dtype
                math: QuantizeMath {
                    cast: None,
                    arithmetic: Arithmetic::Weight,
                    scale_op: ScaleOp::Divide,
                    zero_scale: ZeroScale::Eps,
                },
            }
        }
        Some(path) if path.ends_with(".json") => {
            let rest: Vec<&str> = std::iter::once(path).chain(parts).collect();
            let p = rest.join(":");
            let text = crate::layout::quanto::read_side_file(std::path::Path::new(&p))?;
            return Int8Descriptor::from_json(&text);
        }
        _ => return Err(bad()),
    };
    d.validate()?;
    Ok(d)
}

fn round_int(x: f32, r: Rounding) -> f32 {
    match r {
        Rounding::HalfEven => x.round_ties_even(),
        Rounding::HalfAway => x.round(),
    }
}

/// The stored tensors of one int8 weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Int8Weight {
    /// Integer values, row-major `[O, I]`.
    pub q: Vec<i8>,
    /// Scale tensor bytes in its stored dtype and shape.
    pub scale: Vec<u8>,
    /// Zero points (one per scale), if the layout has them.
    pub zero_point: Option<Vec<i8>>,
}

fn scale_count(d: &Int8Descriptor, o: u64, i: u64) -> u64 {
    match d.per_row(i) {
        0 => 1,
        k => o * k,
    }
}

/// `torch.finfo(T).eps` of a float dtype.
fn eps_of(f: FloatDtype) -> f32 {
    match f {
        FloatDtype::Bf16 => 0.0078125,   // 2^-7
        FloatDtype::F16 => 0.0009765625, // 2^-10
        FloatDtype::F32 => f32::EPSILON, // 2^-23
    }
}

/// Quantizes a float weight `[O, I]` (`w` in dtype `model`) to the layout.
///
/// The descriptor's [`QuantizeMath`] says how, op by op (spec/layouts.md
/// §3.2). With `W` the dtype the weight is quantized in (`cast`, else the
/// model dtype), `P` the dtype of intermediate results (f32, or `W` for
/// `arithmetic: weight`), `S` the scale's stored dtype and `RN_X` a round to
/// nearest-even in X, per scale group (symmetric):
///
/// * `a = max|RN_W(w)|` (exact);
/// * `divide`: `s = RN_S(RN_P(a / divisor))`, an all-zero result becomes 0
///   or `eps(S)`; `q = clamp(round(RN_P(w / s)))`, q = 0 when s = 0;
/// * `reciprocal_multiply`: `m = RN_P(RN_P(1 / a) · divisor)`,
///   `q = clamp(round(RN_P(w · m)))`, a NaN (0 · ∞) giving 0.
///
/// With a zero point: `s = RN_S(RN_P(RN_P(max − min) / (hi − lo)))`,
/// `z = clamp(round(RN_P(lo − RN_P(min / s))))` (0 for a zero group),
/// `q = clamp(round(RN_P(RN_P(w / s) + z)))` — for `arithmetic: f32`,
/// ckptkit's original `q = clamp(round(w / s) + z)`.
///
/// A weight that does not fit the cast dtype (bitsandbytes: beyond f16's
/// ±65504) is refused: the library would store an infinite scale and lose
/// the row.
pub fn quantize(d: &Int8Descriptor, model: Dtype, o: u64, i: u64, w: &[u8]) -> Result<Int8Weight> {
    let f = crate::layout::quanto::float_of(model)
        .ok_or_else(|| Error::layout(format!("cannot quantize {model}")))?;
    let mut vals = f.decode(w).map_err(|e| Error::layout(e.to_string()))?;
    let n = o
        .checked_mul(i)
        .ok_or_else(|| Error::overflow("weight size"))? as usize;
    if vals.len() != n {
        return Err(Error::layout(format!(
            "weight has {} values, expected {n}",
            vals.len()
        )));
    }
    // the dtype the library quantizes in
    let wf = match &d.math.cast {
        None => f,
        Some(c) => Dtype::from_name(c)
            .and_then(crate::layout::quanto::float_of)
            .ok_or_else(|| Error::layout(format!("{}: cast dtype `{c}`", d.name)))?,
    };
    if wf != f {
        for v in vals.iter_mut() {
            let r = wf.round(*v);
            if r.is_infinite() && v.is_finite() {
                return Err(Error::layout(format!(
                    "{}: the weight value {v} does not fit {wf}, which this layout casts the \
                     weight to (the library would store an infinite scale and lose the row)",
                    d.name
                )));
            }
            *v = r;
        }
    }
    let pf = match d.math.arithmetic {
        Arithmetic::F32 => FloatDtype::F32,
        Arithmetic::Weight => wf,
    };
    let legacy = d.math.arithmetic == Arithmetic::F32;
    let sd = d.scale_dtype(model);
    let sf = crate::layout::quanto::float_of(sd).ok_or_else(|| Error::layout("scale dtype"))?;
    let ns = scale_count(d, o, i) as usize;
    let glen = if ns == 0 { 1 } else { n / ns.max(1) };
    let [lo, hi] = d.range;
    let (lof, hif) = (lo as f32, hi as f32);
    let rn = |x: f32| pf.round(x);
    // the integer of a grid value; NaN (0 · ∞, 0 / 0) stores 0
    let to_q = |v: f32| -> i8 {
        if v.is_nan() {
            0
        } else {
            round_int(v.clamp(lof, hif), d.rounding) as i8
        }
    };
    let zero_scale = |s: f32| match (s == 0.0, d.math.zero_scale) {
        (true, ZeroScale::Eps) => eps_of(sf),
        _ => s,
    };
    let mut q = vec![0i8; n];
    let mut scales = vec![0f32; ns];
    let mut amaxes = vec![0f32; ns];
    let mut zps = d.zero_point.as_ref().map(|_| vec![0i8; ns]);
    for (gi, (wg, qg)) in vals
        .chunks(glen.max(1))
        .zip(q.chunks_mut(glen.max(1)))
        .enumerate()
    {
        let (s, z) = if d.zero_point.is_some() {
            let mn = wg.iter().copied().fold(f32::INFINITY, f32::min).min(0.0);
            let mx = wg
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max)
                .max(0.0);
            let steps = (hi - lo) as f32;
            let s = if legacy {
                sf.round(((mx - mn) as f64 / (hi - lo) as f64) as f32)
            } else {
                sf.round(rn(rn(mx - mn) / steps))
            };
            let z = if s > 0.0 {
                let z = if legacy {
                    lof - mn / s
                } else {
                    rn(lof - rn(mn / s))
                };
                round_int(z, d.rounding).clamp(lof, hif)
            } else {
                0.0
            };
            let s = zero_scale(s);
            for (x, y) in wg.iter().zip(qg.iter_mut()) {
                *y = if s == 0.0 {
                    0
                } else if legacy {
                    (round_int(x / s, d.rounding) + z).clamp(lof, hif) as i8
                } else {
                    to_q(rn(rn(x / s) + z))
                };
            }
            (s, z)
        } else {
            let a = wg.iter().fold(0f32, |m, x| m.max(x.abs()));
            if let Some(am) = amaxes.get_mut(gi) {
                *am = sf.round(a);
            }
            let s = if legacy {
                sf.round((a as f64 / d.divisor) as f32)
            } else {
                sf.round(rn(a / d.divisor as f32))
            };
            let s = zero_scale(s);
            match d.math.scale_op {
                ScaleOp::Divide => {
                    for (x, y) in wg.iter().zip(qg.iter_mut()) {
                        *y = if s == 0.0 { 0 } else { to_q(rn(x / s)) };
                    }
                }
                ScaleOp::ReciprocalMultiply => {
                    let m = rn(rn(1.0 / a) * d.divisor as f32);
                    for (x, y) in wg.iter().zip(qg.iter_mut()) {
                        *y = to_q(rn(x * m));
                    }
                }
            }
            (s, 0.0)
        };
        if let Some(sl) = scales.get_mut(gi) {
            *sl = s;
        }
        if let Some(z2) = zps.as_mut().and_then(|v| v.get_mut(gi)) {
            *z2 = z as i8;
        }
    }
    // an absmax layout stores the absmax itself (bitsandbytes' SCB)
    let stored: Vec<f32> = match d.scale.value {
        ScaleValue::Scale => scales,
        ScaleValue::AbsmaxOver(_) => amaxes,
    };
    Ok(Int8Weight {
        q,
        scale: sf.encode(&stored),
        zero_point: zps,
    })
}

/// Dequantizes to dtype `out`: `w = T(q · s)` (scale form) or
/// `w = T(f32(q · A) · f32(1/c))` (absmax form, bitsandbytes' order), with
/// `q − z` for a zero point.
pub fn dequantize(
    d: &Int8Descriptor,
    o: u64,
    i: u64,
    qw: &Int8Weight,
    scale_dtype: Dtype,
    out: Dtype,
) -> Result<Vec<u8>> {
    let sf =
        crate::layout::quanto::float_of(scale_dtype).ok_or_else(|| Error::layout("scale dtype"))?;
    let of = crate::layout::quanto::float_of(out).ok_or_else(|| Error::layout("output dtype"))?;
    let s = sf
        .decode(&qw.scale)
        .map_err(|e| Error::layout(e.to_string()))?;
    let n = (o * i) as usize;
    let ns = scale_count(d, o, i) as usize;
    if qw.q.len() != n || s.len() != ns.max(1) {
        return Err(Error::layout(format!(
            "{}: {} values and {} scales for [{o}, {i}]",
            d.name,
            qw.q.len(),
            s.len()
        )));
    }
    let glen = n / ns.max(1);
    let mut vals = vec![0f32; n];
    for (gi, (qg, vg)) in
        qw.q.chunks(glen.max(1))
            .zip(vals.chunks_mut(glen.max(1)))
            .enumerate()
    {
        let sc = s[gi];
        let z = qw
            .zero_point
            .as_ref()
            .and_then(|z| z.get(gi))
            .copied()
            .unwrap_or(0) as f32;
        for (x, y) in qg.iter().zip(vg.iter_mut()) {
            let qv = *x as f32 - z;
            *y = match d.scale.value {
                ScaleValue::Scale => qv * sc,
                ScaleValue::AbsmaxOver(c) => (qv * sc) * ((1.0 / c) as f32),
            };
        }
    }
    Ok(of.encode(&vals))
}

/// Packs int8 values into little-endian I32 words of `q + offset` bytes,
/// row by row (`[O, ceil(I/4)]`, zero padding).
pub fn pack_i32(q: &[i8], o: u64, i: u64, offset: i32) -> Vec<u8> {
    let words = i.div_ceil(4) as usize;
    let mut out = vec![0u8; o as usize * words * 4];
    for (row, orow) in q.chunks(i.max(1) as usize).zip(out.chunks_mut(words * 4)) {
        for (x, b) in row.iter().zip(orow.iter_mut()) {
            *b = (*x as i32 + offset) as u8;
        }
    }
    out
}

/// Inverse of [`pack_i32`]; padding must be zero.
pub fn unpack_i32(b: &[u8], o: u64, i: u64, offset: i32) -> Result<Vec<i8>> {
    let words = i.div_ceil(4) as usize;
    if b.len() != o as usize * words * 4 {
        return Err(Error::layout(format!(
            "packed payload has {} bytes, expected {}",
            b.len(),
            o as usize * words * 4
        )));
    }
    let mut q = Vec::with_capacity((o * i) as usize);
    for row in b.chunks(words * 4) {
        let (vals, pad) = row.split_at(i as usize);
        if pad.iter().any(|&p| p != 0) {
            return Err(Error::layout("nonzero padding in a packed payload"));
        }
        q.extend(vals.iter().map(|&v| (v as i32 - offset) as i8));
    }
    Ok(q)
}

/// Payload bytes as stored.
pub fn payload_bytes(d: &Int8Descriptor, q: &[i8], o: u64, i: u64) -> Vec<u8> {
    match d.payload.storage {
        Storage::I8 => q.iter().map(|&x| x as u8).collect(),
        Storage::PackedI32 => pack_i32(q, o, i, d.payload.offset),
    }
}

/// Reads the payload back to int8 values.
pub fn payload_values(d: &Int8Descriptor, b: &[u8], o: u64, i: u64) -> Result<Vec<i8>> {
    match d.payload.storage {
        Storage::I8 => Ok(b.iter().map(|&x| x as i8).collect()),
        Storage::PackedI32 => unpack_i32(b, o, i, d.payload.offset),
    }
}

/// The payload dtype of a descriptor.
pub fn payload_dtype(d: &Int8Descriptor) -> Dtype {
    match d.payload.storage {
        Storage::I8 => Dtype::I8,
        Storage::PackedI32 => Dtype::I32,
    }
}

/// Converts stored scale numbers between two (value form, dtype) pairs.
/// Returns the new bytes and whether converting back gives the source
/// bytes exactly.
pub fn convert_scale(
    from: (ScaleValue, Dtype),
    to: (ScaleValue, Dtype),
    bytes: &[u8],
) -> Result<(Vec<u8>, bool)> {
    let ff = crate::layout::quanto::float_of(from.1).ok_or_else(|| Error::layout("scale dtype"))?;
    let tf = crate::layout::quanto::float_of(to.1).ok_or_else(|| Error::layout("scale dtype"))?;
    let v = ff.decode(bytes).map_err(|e| Error::layout(e.to_string()))?;
    let k = |sv: ScaleValue| match sv {
        ScaleValue::Scale => 1.0f64,
        ScaleValue::AbsmaxOver(c) => c,
    };
    let (kf, kt) = (k(from.0), k(to.0));
    let conv = |x: f32, a: f64, b: f64| -> f32 {
        if a == b {
            x
        } else if b > a {
            (x as f64 * (b / a)) as f32
        } else {
            (x as f64 / (a / b)) as f32
        }
    };
    let out: Vec<f32> = v.iter().map(|&x| tf.round(conv(x, kf, kt))).collect();
    let back: Vec<f32> = out.iter().map(|&x| ff.round(conv(x, kt, kf))).collect();
    let exact = ff.encode(&back) == bytes;
    Ok((tf.encode(&out), exact))
}

/// The float dtype helper for scale conversions.
pub fn float_dtype(d: Dtype) -> Option<FloatDtype> {
    crate::layout::quanto::float_of(d)
}

/// The presets tried when reading a checkpoint, most specific first.
pub fn detection_presets() -> Vec<Int8Descriptor> {
    ["int8:ct", "int8:bnb", "int8", "int8:ct:int-quantized"]
        .iter()
        .filter_map(|n| preset(n).ok())
        .collect()
}

/// Recognises an int8 weight among a module's plain tensors (name → tensor).
/// Returns the logical weight, its quantization record, and the stored keys
/// it consumed.
pub fn detect(
    src: &dyn crate::io::source::TensorSource,
    path: &str,
    tensors: &[&crate::io::source::SourceTensor],
    descriptors: &[Int8Descriptor],
    dtype_hint: Option<Dtype>,
) -> Result<
    Option<(
        crate::format::manifest::LogicalTensor,
        crate::format::manifest::WeightQuant,
        Vec<String>,
    )>,
> {
    use crate::format::manifest::{Encoding, LogicalTensor, Part, Role, WeightQuant};
    let find = |k: &str| {
        let full = Int8Descriptor::key(path, k);
        crate::io::source::lookups::find(tensors.iter().copied(), |t| t.key == full)
    };
    for d0 in descriptors {
        let (Some(p), Some(s)) = (find(&d0.payload.key), find(&d0.scale.key)) else {
            continue;
        };
        if p.dtype != payload_dtype(d0) || p.shape.len() != 2 || !s.dtype.is_filterable_float() {
            continue;
        }
        let shape_t = d0.payload.shape_key.as_deref().map(find);
        let (o, i) = match (d0.payload.storage, shape_t) {
            (Storage::I8, _) => (p.shape[0], p.shape[1]),
            (Storage::PackedI32, Some(Some(st))) if st.dtype == Dtype::I64 && st.shape == [2] => {
                // the logical shape is stored beside the packed words
                let b = src.read(&st.key)?;
                let v: Vec<u64> = b
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .map(|x| u64::try_from(x).unwrap_or(u64::MAX))
                    .collect();
                match v[..] {
                    [o, i] if o == p.shape[0] && i.div_ceil(4) == p.shape[1] => (o, i),
                    _ => {
                        return Err(Error::layout(format!(
                            "`{}` says {:?}, which does not fit `{}` {:?}",
                            st.key, v, p.key, p.shape
                        ))
                        .with_layer(path))
                    }
                }
            }
            _ => continue,
        };
        // bnb-specific: the weight format constant must be there
        let consts: Option<Vec<_>> = d0.constants.iter().map(|c| find(&c.key)).collect();
        let Some(consts) = consts else { continue };
        let mut d = d0.clone();
        // group size from the scale's shape (compressed-tensors)
        if d.scale.granularity == Granularity::Channel
            && d.scale.shape == ScaleShape::Column
            && s.shape.len() == 2
            && s.shape[1] > 1
        {
            let i_est = i;
            if i_est % s.shape[1] == 0 {
                d.scale.granularity = Granularity::Group(i_est / s.shape[1]);
                d.name = format!(
                    "{}:group={}",
                    d.name.split(":int-quantized").next().unwrap_or(&d.name),
                    i_est / s.shape[1]
                );
                if d0.name.ends_with(":int-quantized") {
                    d.name.push_str(":int-quantized");
                }
            }
        }
        let Ok((pshape, sshape, _)) = d.shapes(o, i) else {
            continue;
        };
        let s_ok = s.shape == sshape
            || (d.scale.granularity == Granularity::Channel && s.shape == [o] && sshape == [o, 1]);
        if p.shape != pshape || !s_ok {
            continue;
        }
        let model = if d.scale.dtype.is_some() {
            // bitsandbytes keeps an F32 SCB whatever the model dtype: take it
            // from ckptkit's schema, else the bias, else F32
            let b = find("bias")
                .map(|b| b.dtype)
                .filter(|b| b.is_filterable_float());
            dtype_hint.or(b).unwrap_or(Dtype::F32)
        } else {
            s.dtype
        };
        let mk = |role: Role, t: &crate::io::source::SourceTensor| Part {
            role,
            shard: t.file as u32,
            key: t.key.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            blake3: [0; 32],
        };
        let mut parts = vec![mk(Role::Data, p), mk(Role::Scale, s)];
        let mut used = vec![p.key.clone(), s.key.clone()];
        if let Some(Some(st)) = shape_t {
            parts.push(mk(
                Role::Other(d.payload.shape_key.clone().unwrap_or_default()),
                st,
            ));
            used.push(st.key.clone());
        }
        if let Some(z) = &d.zero_point {
            if let Some(zt) = find(&z.key) {
                parts.push(mk(Role::ZeroPoint, zt));
                used.push(zt.key.clone());
            }
        }
        for (c, t) in d.constants.iter().zip(consts) {
            parts.push(mk(Role::Other(c.key.clone()), t));
            used.push(t.key.clone());
        }
        let desc = if preset(&d.name).is_ok_and(|p| p == d) {
            String::new()
        } else {
            d.to_json()
        };
        return Ok(Some((
            LogicalTensor {
                name: "weight".into(),
                dtype: model,
                shape: vec![o, i],
                encoding: Encoding::Quantized,
                parts,
            },
            WeightQuant::Int8 {
                layout: d.name.clone(),
                descriptor: desc,
            },
            used,
        )));
    }
    Ok(None)
}

/// The descriptor of a layer's `WeightQuant::Int8` record.
pub fn descriptor_of(layout: &str, descriptor: &str) -> Result<Int8Descriptor> {
    if descriptor.is_empty() {
        preset(layout)
    } else {
        Int8Descriptor::from_json(descriptor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::float::{round_bf16, round_f16};
    use proptest::prelude::*;

    #[test]
    fn presets_are_valid_and_json_roundtrips() {
        for n in [
            "int8",
            "int8:bnb",
            "int8:ct",
            "int8:ct:group=64",
            "int8:ct:int-quantized",
            "int8:ct:group=32:int-quantized",
        ] {
            let d = preset(n).unwrap();
            assert_eq!(d.name, n);
            assert_eq!(Int8Descriptor::from_json(&d.to_json()).unwrap(), d);
        }
        assert!(preset("int8:gguf").is_err());
        assert!(preset("int8:ct:group=x").is_err());
    }

    #[test]
    fn contradictory_descriptors_are_refused() {
        let mut d = preset("int8:ct").unwrap();
        d.range = [-200, 127];
        assert!(d.validate().is_err());
        let mut d = preset("int8").unwrap();
        d.payload.offset = 5;
        assert!(d.validate().is_err());
        let mut d = preset("int8:bnb").unwrap();
        d.scale.key = "weight".into();
        assert!(d.validate().is_err(), "payload and scale share a key");
        let mut d = preset("int8").unwrap();
        d.divisor = 0.0;
        assert!(d.validate().is_err());
        assert!(
            Int8Descriptor::from_json(r#"{"name":"x","payload":{"key":"w","storage":"i4"}}"#)
                .is_err()
        );
    }

    #[test]
    fn math_defaults_keep_old_descriptors_and_their_json() {
        let old = r#"{"name":"int8:old","payload":{"key":"qw","storage":"i8"},"scale":{"key":"qs","dtype":"F32","granularity":"channel","value":"scale","shape":"column"},"range":[-127,127],"rounding":"half_even","divisor":127.0}"#;
        let d = Int8Descriptor::from_json(old).unwrap();
        assert!(d.math.is_default());
        assert!(!d.to_json().contains("math"), "{}", d.to_json());
        // a partial `math` takes the defaults for the rest
        let part = old.replace(
            r#""divisor":127.0"#,
            r#""divisor":127.0,"math":{"cast":"F16"}"#,
        );
        let p = Int8Descriptor::from_json(&part).unwrap();
        assert_eq!(p.math.cast.as_deref(), Some("F16"));
        assert_eq!(p.math.arithmetic, Arithmetic::F32);
        assert_eq!(p.math.scale_op, ScaleOp::Divide);
        assert_eq!(p.math.zero_scale, ZeroScale::Zero);
        assert_eq!(Int8Descriptor::from_json(&p.to_json()).unwrap(), p);
        // contradictions and unknown fields are refused
        for bad in [
            r#""math":{"cast":"I8"}"#,
            r#""math":{"cast":"F64x"}"#,
            r#""math":{"precision":"f32"}"#,
            r#""math":{"arithmetic":"f64"}"#,
        ] {
            let j = old.replace(r#""divisor":127.0"#, &format!(r#""divisor":127.0,{bad}"#));
            assert!(Int8Descriptor::from_json(&j).is_err(), "{bad}");
        }
        let mut z = preset("int8:bnb").unwrap();
        z.zero_point = Some(ZeroPointSpec { key: "zp".into() });
        assert!(
            z.validate().is_err(),
            "reciprocal_multiply with a zero point"
        );
    }

    /// The presets' arithmetic on hand-picked values (the fixture tests in
    /// tests/migrate_int8.rs check whole library files).
    #[test]
    fn library_arithmetic_on_known_values() {
        let bf = FloatDtype::Bf16;
        // compressed-tensors, bf16: scale = RN_bf16(1.5/127.5) and the
        // quotient is rounded to bf16 before the integer rounding
        let ct = preset("int8:ct:int-quantized").unwrap();
        let w = [
            1.5f32,
            175.0 / 1024.0,
            -0.3125,
            0.44140625,
            0.0,
            0.0,
            0.0,
            0.0,
        ];
        let qw = quantize(&ct, Dtype::BF16, 2, 4, &bf.encode(&w)).unwrap();
        let s = bf.decode(&qw.scale).unwrap();
        assert_eq!(s[0], round_bf16(1.5 / 127.5));
        assert_eq!(s[0], 193.0 / 16384.0);
        assert_eq!(
            s[1], 0.0078125,
            "an all-zero row's scale is finfo(bf16).eps"
        );
        // x/s in f32: 127.33, 14.508, -26.528, 37.472; in bf16: 127.5, 14.5,
        // -26.5, 37.5 (then clamp and ties to even)
        assert_eq!(&qw.q[..4], &[127, 14, -26, 38]);
        assert_eq!(&qw.q[4..], &[0; 4]);
        // bitsandbytes: f16 first, SCB = absmax, q = round(A · RN(RN(1/SCB)·127))
        let bnb = preset("int8:bnb").unwrap();
        let w32 = [0.1f32, -0.3, 0.2999, 1e-3, 0.0, 0.0, 0.0, 0.0];
        let qb = quantize(&bnb, Dtype::F32, 2, 4, &FloatDtype::F32.encode(&w32)).unwrap();
        let scb = FloatDtype::F32.decode(&qb.scale).unwrap();
        assert_eq!(scb, vec![round_f16(0.3), 0.0]);
        let m = (1.0 / scb[0]) * 127.0;
        let want: Vec<i8> = w32[..4]
            .iter()
            .map(|&x| (round_f16(x) * m).round_ties_even() as i8)
            .collect();
        assert_eq!(&qb.q[..4], &want[..]);
        assert_eq!(&qb.q[4..], &[0; 4], "0 · ∞ stores 0");
        // a weight beyond f16 is refused rather than stored as SCB = inf
        let big = [1e5f32, 1.0, 0.0, 0.0];
        assert!(quantize(&bnb, Dtype::F32, 1, 4, &FloatDtype::F32.encode(&big)).is_err());
        assert!(quantize(&bnb, Dtype::BF16, 1, 4, &bf.encode(&big)).is_err());
    }

    fn arb_descriptor() -> impl Strategy<Value = Int8Descriptor> {
        (
            (
                any::<bool>(),
                -2i32..200,
                proptest::option::of("[a-z_]{1,8}"),
            ),
            (
                0usize..3,
                proptest::option::of(0u64..300),
                any::<bool>(),
                0.0f64..300.0,
                any::<bool>(),
            ),
            (
                -200i32..200,
                -200i32..200,
                any::<bool>(),
                0.0f64..300.0,
                any::<bool>(),
            ),
            proptest::collection::vec(
                (
                    "[a-z]{1,6}",
                    0usize..3,
                    proptest::collection::vec(0u64..3, 0..3),
                    proptest::collection::vec(-5i64..300, 0..5),
                ),
                0..2,
            ),
            (0usize..5, any::<bool>(), any::<bool>(), any::<bool>()),
        )
            .prop_map(
                |(
                    (packed, offset, shape_key),
                    (g, gs, absmax, c, column),
                    (lo, hi, even, divisor, zp),
                    consts,
                    (cast, weight_arith, recip, eps),
                )| Int8Descriptor {
                    name: "int8:prop".into(),
                    payload: Payload {
                        key: "qw".into(),
                        storage: if packed {
                            Storage::PackedI32
                        } else {
                            Storage::I8
                        },
                        offset,
                        shape_key,
                    },
                    scale: ScaleSpec {
                        key: "qs".into(),
                        dtype: Some("F32".into()),
                        granularity: match (g, gs) {
                            (0, _) => Granularity::Tensor,
                            (1, _) | (_, None) => Granularity::Channel,
                            (_, Some(n)) => Granularity::Group(n),
                        },
                        value: if absmax {
                            ScaleValue::AbsmaxOver(c)
                        } else {
                            ScaleValue::Scale
                        },
                        shape: if column {
                            ScaleShape::Column
                        } else {
                            ScaleShape::Vector
                        },
                    },
                    zero_point: zp.then(|| ZeroPointSpec { key: "qz".into() }),
                    range: [lo, hi],
                    rounding: if even {
                        Rounding::HalfEven
                    } else {
                        Rounding::HalfAway
                    },
                    divisor,
                    constants: consts
                        .into_iter()
                        .map(|(k, d, shape, values)| ConstTensor {
                            key: format!("c_{k}"),
                            dtype: ["U8", "I8", "I64"][d].into(),
                            shape,
                            values,
                        })
                        .collect(),
                    math: QuantizeMath {
                        cast: [None, Some("F16"), Some("BF16"), Some("F32"), Some("I8")][cast]
                            .map(String::from),
                        arithmetic: if weight_arith {
                            Arithmetic::Weight
                        } else {
                            Arithmetic::F32
                        },
                        scale_op: if recip {
                            ScaleOp::ReciprocalMultiply
                        } else {
                            ScaleOp::Divide
                        },
                        zero_scale: if eps { ZeroScale::Eps } else { ZeroScale::Zero },
                    },
                },
            )
    }

    proptest! {
        /// A descriptor that validates survives JSON exactly; one that does
        /// not validate is refused when read back from its JSON too.
        #[test]
        fn descriptor_json_roundtrip(d in arb_descriptor()) {
            let j = d.to_json();
            match d.validate() {
                Ok(()) => prop_assert_eq!(Int8Descriptor::from_json(&j).unwrap(), d),
                Err(_) => prop_assert!(Int8Descriptor::from_json(&j).is_err()),
            }
        }

        #[test]
        fn pack_unpack_identity(o in 1u64..5, i in 1u64..19, seed in any::<u64>()) {
            let q: Vec<i8> = (0..o * i).map(|k| (seed.wrapping_mul(k + 1) >> 7) as i8).collect();
            let b = pack_i32(&q, o, i, 128);
            prop_assert_eq!(b.len() as u64, o * i.div_ceil(4) * 4);
            prop_assert_eq!(unpack_i32(&b, o, i, 128).unwrap(), q);
        }

        /// quantize → dequantize stays within half a step (plus the
        /// rounding of the float dtype) for every preset.
        #[test]
        fn quantize_error_is_bounded(vals in proptest::collection::vec(-4.0f32..4.0, 64), p in 0usize..4) {
            let name = ["int8", "int8:bnb", "int8:ct", "int8:ct:group=8"][p];
            let d = preset(name).unwrap();
            let w: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
            let qw = quantize(&d, Dtype::F32, 4, 16, &w).unwrap();
            let back = dequantize(&d, 4, 16, &qw, d.scale_dtype(Dtype::F32), Dtype::F32).unwrap();
            let groups = if let Granularity::Group(g) = d.scale.granularity { 16 / g as usize } else { 1 };
            let glen = 16 / groups;
            for (k, (a, b)) in vals.iter().zip(back.chunks(4)).enumerate() {
                let b = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                let g0 = k / glen * glen;
                let amax = vals[g0..g0 + glen].iter().fold(0f32, |m, x| m.max(x.abs()));
                let step = amax / d.divisor as f32;
                // bitsandbytes casts the weight to f16 first: half an f16 ulp
                // of the value, and an f16 absmax (SCB) up to that much larger
                let cast = if d.math.cast.is_some() { amax * 2f32.powi(-10) } else { 0.0 };
                prop_assert!((a - b).abs() <= step * 0.5 + cast + amax * 1e-6 + 1e-30, "{name}: {a} vs {b}, step {step}");
            }
        }
    }
}

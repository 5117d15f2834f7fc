//! The int8 family as data: a declarative descriptor says where the integer
//! payload, the scale and an optional zero point live (relative to the
//! module path), how they are stored and what the numbers mean. Built-in
//! presets describe ckptkit's own `int8`, bitsandbytes LLM.int8 and
//! compressed-tensors int8; a user's in-house layout is a small JSON file.
//! spec/layouts.md §3 is the prose version.

pub(crate) mod family;

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

pub use crate::layout::codes::{Granularity, ScaleValue};

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

/// Prefixes of the layout names that belong to ckptkit's built-in layouts: a
/// name equal to one of them or starting with it and a `:` is reserved.
pub const RESERVED_PREFIXES: [&str; 6] = ["plain", "quanto", "int8", "fp8", "comfy", "gguf"];

/// Whole names a user layout may not take either: ckptkit's schema and the
/// config it writes beside an output read them as quanto qtypes.
pub const RESERVED_NAMES: [&str; 8] = [
    "none",
    "qint8",
    "qint4",
    "qint2",
    "qfloat8",
    "qfloat8_e4m3fn",
    "qfloat8_e5m2",
    "qfloat8_e4m3fnuz",
];

/// The reserved prefix (or name) a layout name falls under, compared
/// ignoring ASCII case: `int8` and `int8:foo` fall under `int8`, `int8x`
/// and `my-int8` under none.
pub fn reserved(name: &str) -> Option<&'static str> {
    let l = name.to_ascii_lowercase();
    RESERVED_PREFIXES
        .iter()
        .find(|p| {
            l.strip_prefix(**p)
                .is_some_and(|r| r.is_empty() || r.starts_with(':'))
        })
        .or_else(|| RESERVED_NAMES.iter().find(|r| l == **r))
        .copied()
}

/// A divisor (or `absmax_over` constant) in [1, 256]: below 1 the absmax
/// maps below one integer step.
fn check_divisor(n: &str, what: &str, c: f64) -> Result<()> {
    if c.is_finite() && (1.0..=256.0).contains(&c) {
        return Ok(());
    }
    let why = if !c.is_finite() || c <= 0.0 || c > 256.0 {
        String::new()
    } else {
        let ints = if c < 0.5 { "0" } else { "0 or ±1" };
        let sub = if (c as f32) < f32::MIN_POSITIVE {
            " (a subnormal divisor also overflows the scale absmax/divisor)"
        } else {
            ""
        };
        format!(
            ": the absmax would map to |q| = {c} < 1, so every stored integer would be {ints}{sub}"
        )
    };
    Err(derr(
        n,
        format!("{what} {c} must be a number in [1, 256]{why}"),
    ))
}

/// Whether an integer constant fits its dtype.
fn int_fits(dt: Dtype, v: i64) -> bool {
    match dt {
        Dtype::U8 => u8::try_from(v).is_ok(),
        Dtype::I8 => i8::try_from(v).is_ok(),
        Dtype::I32 => i32::try_from(v).is_ok(),
        _ => true,
    }
}

/// A part key: a name relative to the module path, dot-separated segments
/// that are not empty, no path separators or control characters.
fn check_key(n: &str, k: &str) -> Result<()> {
    let ok = !k.is_empty()
        && k.len() <= 256
        && !k.split('.').any(str::is_empty)
        && !k.chars().any(|c| c == '/' || c == '\\' || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(derr(
            n,
            format!(
                "key `{}` must be 1 to 256 bytes of dot-separated names (no empty segment, \
                 no `/`, `\\` or control characters)",
                k.escape_debug()
            ),
        ))
    }
}

impl Int8Descriptor {
    /// Checks that the descriptor does not contradict itself (the rules of
    /// spec/layouts.md §3). The built-in presets pass; a user's JSON must
    /// also pass [`Int8Descriptor::validate_user`].
    pub fn validate(&self) -> Result<()> {
        let n = &self.name;
        if n.is_empty()
            || n.len() > 256
            || n.chars().any(char::is_control)
            || n.trim() != n.as_str()
        {
            return Err(derr(
                n,
                "the name must be 1 to 256 bytes, without control characters or surrounding spaces",
            ));
        }
        let [lo, hi] = self.range;
        if !(-128..=127).contains(&lo) || !(-128..=127).contains(&hi) || lo >= hi {
            return Err(derr(
                n,
                format!("range [{lo}, {hi}] must lie in [-128, 127] with min < max"),
            ));
        }
        if self.zero_point.is_none() && !(lo < 0 && hi > 0) {
            return Err(derr(
                n,
                format!(
                    "a symmetric layout (no zero point) needs negative and positive values; \
                     the range [{lo}, {hi}] would clamp one sign of every weight"
                ),
            ));
        }
        check_divisor(n, "divisor", self.divisor)?;
        if let ScaleValue::AbsmaxOver(c) = self.scale.value {
            check_divisor(n, "absmax_over", c)?;
            if c != self.divisor {
                return Err(derr(
                    n,
                    format!(
                        "absmax_over {c} must equal the divisor {}: the stored absmax A \
                         dequantizes as q·A/{c}, which gives the weight back only when q was \
                         quantized with the same divisor",
                        self.divisor
                    ),
                ));
            }
            if self.zero_point.is_some() {
                return Err(derr(
                    n,
                    "an absmax_over scale needs a symmetric layout (no zero point): \
                     an asymmetric group has no absmax to store",
                ));
            }
        }
        if let Granularity::Block(_) = self.scale.granularity {
            return Err(derr(
                n,
                "int8 layouts have no block granularity (tensor, channel or group)",
            ));
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
                if self.payload.shape_key.is_none() {
                    return Err(derr(
                        n,
                        "packed_i32 storage needs a `shape_key`: the packed words \
                         [O, ceil(I/4)] do not say I, so the file could not be read back",
                    ));
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
        for c in &self.constants {
            let dt = Dtype::from_name(&c.dtype)
                .ok_or_else(|| derr(n, format!("unknown dtype `{}`", c.dtype)))?;
            let ne = crate::dtype::numel(&c.shape)?;
            if ne != c.values.len() as u64
                || ne > 4096
                || c.shape.len() > crate::format::MAX_RANK
                || !matches!(dt, Dtype::U8 | Dtype::I8 | Dtype::I32 | Dtype::I64)
            {
                return Err(derr(
                    n,
                    format!(
                        "constant `{}` must list its {ne} integer values (at most 4096, rank at \
                         most {}) in U8, I8, I32 or I64",
                        c.key,
                        crate::format::MAX_RANK
                    ),
                ));
            }
            if let Some(v) = c.values.iter().find(|&&v| !int_fits(dt, v)) {
                return Err(derr(
                    n,
                    format!(
                        "constant `{}`: the value {v} does not fit {dt} (it would be stored wrapped)",
                        c.key
                    ),
                ));
            }
        }
        let keys = self.part_keys();
        for k in &keys {
            check_key(n, k)?;
        }
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != keys.len() {
            return Err(derr(
                n,
                "two parts have the same key; keys must be distinct",
            ));
        }
        Ok(())
    }

    /// [`Int8Descriptor::validate`], plus the rule for descriptors a user
    /// writes: the name is not in the namespace of ckptkit's built-in
    /// layouts (see [`reserved`]), unless the descriptor is a built-in
    /// preset exactly.
    pub fn validate_user(&self) -> Result<()> {
        self.validate()?;
        let n = &self.name;
        let Some(r) = reserved(n) else {
            return Ok(());
        };
        if is_builtin(self) {
            return Ok(());
        }
        let rule = if r == "none" {
            "`none` is reserved: ckptkit's schema reads it as \"not quantized\"".to_string()
        } else if RESERVED_NAMES.contains(&r) {
            format!(
                "`{r}` is reserved: it is a quanto qtype name, which ckptkit's schema and the \
                 config.json it writes read as quanto"
            )
        } else {
            format!(
                "names equal to `{r}` or starting with `{r}:` are reserved for ckptkit's built-in \
                 layouts"
            )
        };
        let why = if builtin(n).is_some() {
            "this descriptor differs from the built-in preset of that name, and a file written \
             with it would be read back as the preset; "
        } else {
            ""
        };
        Err(derr(
            n,
            format!(
                "{why}{rule}; rename the layout, e.g. \"name\": \"my-{}\"",
                n.replace(':', "-")
            ),
        ))
    }

    /// The keys of every stored part: payload, scale, shape, zero point,
    /// constants.
    pub fn part_keys(&self) -> Vec<&str> {
        let mut keys = vec![self.payload.key.as_str(), self.scale.key.as_str()];
        keys.extend(self.payload.shape_key.as_deref());
        keys.extend(self.zero_point.as_ref().map(|z| z.key.as_str()));
        keys.extend(self.constants.iter().map(|c| c.key.as_str()));
        keys
    }

    /// Parses a user descriptor from JSON and checks it with
    /// [`Int8Descriptor::validate_user`].
    pub fn from_json(text: &str) -> Result<Self> {
        let d: Int8Descriptor =
            serde_json::from_str(text).map_err(|e| Error::json("int8 descriptor", e))?;
        d.validate_user()?;
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
            Granularity::Block(_) => {
                return Err(Error::layout(format!(
                    "{}: int8 layouts have no block granularity",
                    self.name
                )))
            }
        };
        let scale = match (self.scale.granularity, self.scale.shape) {
            (Granularity::Tensor, ScaleShape::Column) => vec![1],
            (Granularity::Tensor, ScaleShape::Vector) => vec![],
            (Granularity::Channel, ScaleShape::Column) => vec![o, 1],
            (Granularity::Channel, ScaleShape::Vector) => vec![o],
            (Granularity::Group(_) | Granularity::Block(_), _) => vec![o, groups],
        };
        Ok((payload, scale.clone(), scale))
    }

    /// Number of scales per row (0 = one for the tensor).
    fn per_row(&self, i: u64) -> u64 {
        match self.scale.granularity {
            Granularity::Tensor => 0,
            Granularity::Channel => 1,
            Granularity::Group(g) => i / g.max(1),
            // refused by `validate`
            Granularity::Block(_) => 0,
        }
    }
}

/// The layout a `--to int8...` target names: a built-in preset (`int8`,
/// `int8:bnb`, `int8:ct` (channel, pack-quantized) with optional
/// `:group=N` and `:int-quantized`), or `int8:PATH.json`, a user descriptor
/// read from that file and checked with [`Int8Descriptor::validate_user`].
pub fn preset(name: &str) -> Result<Int8Descriptor> {
    if let Some(p) = name.strip_prefix("int8:").filter(|p| p.ends_with(".json")) {
        let text = crate::io::files::read_side_file(std::path::Path::new(p))?;
        return Int8Descriptor::from_json(&text);
    }
    parse_builtin(name)
}

/// The built-in preset whose canonical name is exactly `name`
/// (`int8:ct:group=64:int-quantized`, not `int8:ct:int-quantized:group=64`);
/// never reads a file.
pub fn builtin(name: &str) -> Option<Int8Descriptor> {
    parse_builtin(name).ok().filter(|d| d.name == name)
}

/// Whether a descriptor is a built-in preset, name and all.
pub fn is_builtin(d: &Int8Descriptor) -> bool {
    builtin(&d.name).as_ref() == Some(d)
}

fn parse_builtin(name: &str) -> Result<Int8Descriptor> {
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

/// The presets tried when reading a checkpoint, most specific first.
pub fn detection_presets() -> Vec<Int8Descriptor> {
    ["int8:ct", "int8:bnb", "int8", "int8:ct:int-quantized"]
        .iter()
        .filter_map(|n| builtin(n))
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
        crate::format::lookups::find(tensors.iter().copied(), |t| t.key == full)
    };
    for d0 in descriptors {
        let (Some(p), Some(s)) = (find(&d0.payload.key), find(&d0.scale.key)) else {
            continue;
        };
        if p.dtype != payload_dtype(d0) || p.shape.len() != 2 || !s.dtype.is_filterable_float() {
            continue;
        }
        // a declared shape tensor must be there, I64 [2]
        let shape_t = match d0.payload.shape_key.as_deref().map(find) {
            None => None,
            Some(Some(st)) if st.dtype == Dtype::I64 && st.shape == [2] => Some(st),
            Some(_) => continue,
        };
        let (o, i) = match shape_t {
            None if d0.payload.storage == Storage::I8 => (p.shape[0], p.shape[1]),
            None => continue,
            Some(st) => {
                // the logical shape is stored beside the (packed) payload
                let b = src.read(&st.key)?;
                let v: Vec<u64> = b
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .map(|x| u64::try_from(x).unwrap_or(u64::MAX))
                    .collect();
                let fits = |o: u64, i: u64| match d0.payload.storage {
                    Storage::I8 => [o, i] == p.shape[..],
                    Storage::PackedI32 => o == p.shape[0] && i.div_ceil(4) == p.shape[1],
                };
                match v[..] {
                    [o, i] if fits(o, i) => (o, i),
                    _ => {
                        return Err(Error::layout(format!(
                            "`{}` says {:?}, which does not fit `{}` {:?}",
                            st.key, v, p.key, p.shape
                        ))
                        .with_layer(path))
                    }
                }
            }
        };
        // the constants must be there (bitsandbytes' `weight_format`), and
        // hold the layout's values: another value is another layout, which
        // must be neither misread nor copied as plain tensors
        let consts: Option<Vec<_>> = d0.constants.iter().map(|c| find(&c.key)).collect();
        let Some(consts) = consts else { continue };
        for (c, t) in d0.constants.iter().zip(&consts) {
            let want = const_bytes(c);
            if Dtype::from_name(&c.dtype) != Some(t.dtype)
                || t.shape != c.shape
                || src.read(&t.key)?[..] != want[..]
            {
                return Err(Error::layout(format!(
                    "`{}` looks like int8 layout `{}`, but its constant `{}` is not {} {:?} = \
                     {:?}; ckptkit does not read this variant",
                    p.key, d0.name, t.key, c.dtype, c.shape, c.values
                ))
                .with_layer(path)
                .with_tensor(t.key.clone()));
            }
        }
        let mut d = d0.clone();
        // group size from the scale's shape (compressed-tensors' channel
        // presets; a recorded or user descriptor is taken as it is)
        if is_builtin(d0)
            && d.scale.granularity == Granularity::Channel
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
        let Ok((pshape, sshape, zshape)) = d.shapes(o, i) else {
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
        let zt = match &d.zero_point {
            None => None,
            Some(z) => match find(&z.key) {
                Some(zt)
                    if zt.dtype == Dtype::I8 && (zt.shape == zshape || zt.shape == s.shape) =>
                {
                    Some(zt)
                }
                _ => continue,
            },
        };
        let mut parts = vec![mk(Role::Data, p), mk(Role::Scale, s)];
        let mut used = vec![p.key.clone(), s.key.clone()];
        if let Some(st) = shape_t {
            parts.push(mk(
                Role::Other(d.payload.shape_key.clone().unwrap_or_default()),
                st,
            ));
            used.push(st.key.clone());
        }
        if let Some(zt) = zt {
            parts.push(mk(Role::ZeroPoint, zt));
            used.push(zt.key.clone());
        }
        for (c, t) in d.constants.iter().zip(consts) {
            parts.push(mk(Role::Other(c.key.clone()), t));
            used.push(t.key.clone());
        }
        let desc = if is_builtin(&d) {
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

/// The descriptor of a layer's `WeightQuant::Int8` record (a container's
/// manifest, or ckptkit's schema in a safetensors file). An empty
/// `descriptor` names a built-in preset by its canonical name; a recorded
/// descriptor must be valid and carry the recorded name, and a name in the
/// reserved namespace ([`reserved`]) must be a built-in preset recorded
/// exactly. Never reads a file. Errors are layout errors; the caller adds
/// the layer.
pub fn descriptor_of(layout: &str, descriptor: &str) -> Result<Int8Descriptor> {
    if descriptor.is_empty() {
        return builtin(layout).ok_or_else(|| {
            Error::layout(format!(
                "int8 layout `{layout}` is recorded without its descriptor, and it is not a \
                 built-in preset (int8, int8:bnb, int8:ct[:group=N][:int-quantized])"
            ))
        });
    }
    let d: Int8Descriptor = serde_json::from_str(descriptor).map_err(|e| {
        Error::layout(format!(
            "the recorded descriptor of int8 layout `{layout}` cannot be read: {e}"
        ))
    })?;
    d.validate()
        .map_err(|e| Error::layout(format!("the recorded descriptor is refused: {e}")))?;
    if d.name != layout {
        return Err(Error::layout(format!(
            "int8 layout `{layout}` is recorded with a descriptor named `{}`",
            d.name
        )));
    }
    if let Some(r) = reserved(layout) {
        return match builtin(layout) {
            Some(b) if b == d => Ok(d),
            Some(_) => Err(Error::layout(format!(
                "int8 layout `{layout}` is recorded with a descriptor that differs from the \
                 built-in preset of that name; a preset name always means the preset"
            ))),
            None => Err(Error::layout(format!(
                "int8 layout `{layout}` is recorded with a user descriptor, but the name is \
                 reserved for ckptkit's built-in layouts (`{r}`)"
            ))),
        };
    }
    Ok(d)
}

/// The bytes of a constant tensor: its values little-endian in its dtype
/// (a validated descriptor's values fit).
pub fn const_bytes(c: &ConstTensor) -> Vec<u8> {
    let size = Dtype::from_name(&c.dtype).map_or(1, |d| d.size());
    c.values
        .iter()
        .flat_map(|&v| v.to_le_bytes()[..size.min(8)].to_vec())
        .collect()
}

/// The `quantization_config` a library writes for an int8 preset:
/// transformers' `BitsAndBytesConfig` for `int8:bnb`, compressed-tensors'
/// config for `int8:ct*` (the forms tests/fixtures/int8 and spec/layouts.md
/// record); `None` for ckptkit's own `int8` and user layouts.
pub(crate) fn library_config(layout: &str, skip: &[String]) -> Option<serde_json::Value> {
    Some(match layout {
        "int8:bnb" => serde_json::json!({
            "_load_in_4bit": false, "_load_in_8bit": true,
            "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": false,
            "llm_int8_enable_fp32_cpu_offload": false, "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0,
            "load_in_4bit": false, "load_in_8bit": true, "quant_method": "bitsandbytes"
        }),
        n if n.starts_with("int8:ct") && builtin(n).is_some() => {
            let int_q = n.ends_with(":int-quantized");
            let group = n
                .split(':')
                .find_map(|x| x.strip_prefix("group="))
                .and_then(|g| g.parse::<u64>().ok());
            let format = if int_q {
                "int-quantized"
            } else {
                "pack-quantized"
            };
            let input = if int_q {
                serde_json::json!({"dynamic": true, "group_size": null, "num_bits": 8,
                    "strategy": "token", "symmetric": true, "type": "int"})
            } else {
                serde_json::Value::Null
            };
            serde_json::json!({
                "config_groups": {"group_0": {
                    "format": format, "input_activations": input, "output_activations": null,
                    "targets": ["Linear"],
                    "weights": {"dynamic": false, "group_size": group, "num_bits": 8,
                        "strategy": if group.is_some() { "group" } else { "channel" },
                        "symmetric": true, "type": "int"}}},
                "format": format, "global_compression_ratio": null, "ignore": skip,
                "kv_cache_scheme": null, "moe_sparsity_config": null,
                "quant_method": "compressed-tensors", "quantization_status": "compressed",
                "sparsity_config": {}, "transform_config": {}, "version": "0.20.0"
            })
        }
        _ => return None,
    })
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

    /// A user descriptor like `preset(name)` but under the name `mine`.
    fn user(name: &str) -> Int8Descriptor {
        let mut d = preset(name).unwrap();
        d.name = "mine".into();
        d
    }

    fn user_err(d: &Int8Descriptor) -> String {
        let e = d.validate_user().expect_err("accepted");
        // the JSON path refuses it too
        assert!(Int8Descriptor::from_json(&d.to_json()).is_err());
        e.to_string()
    }

    #[test]
    fn reserved_names_are_refused_in_user_descriptors() {
        for n in [
            "int8",
            "int8:foo",
            "INT8:foo",
            "int8:ct:group=7",
            "plain",
            "plain:bf16",
            "quanto:qint8",
            "fp8",
            "comfy:x",
            "gguf",
            "qint8",
            "none",
        ] {
            let mut d = user("int8:bnb");
            d.name = n.into();
            assert!(d.validate().is_ok(), "{n}: structurally fine");
            let e = user_err(&d);
            assert!(e.contains("reserved") && e.contains("my-"), "{n}: {e}");
        }
        for n in ["int8x", "my-int8", "plainly", "gguf2", "inhouse", "ct:int8"] {
            let mut d = user("int8:bnb");
            d.name = n.into();
            assert!(d.validate_user().is_ok(), "{n}");
            assert_eq!(Int8Descriptor::from_json(&d.to_json()).unwrap(), d);
        }
        // issue 10 item 6: bitsandbytes' name with another divisor
        let mut d = preset("int8:bnb").unwrap();
        d.divisor = 63.5;
        d.scale.value = ScaleValue::AbsmaxOver(63.5);
        let e = user_err(&d);
        assert!(e.contains("differs from the built-in preset"), "{e}");
        // an exact copy of a preset is that preset
        for n in ["int8", "int8:bnb", "int8:ct:group=32:int-quantized"] {
            let p = preset(n).unwrap();
            assert_eq!(Int8Descriptor::from_json(&p.to_json()).unwrap(), p);
        }
    }

    #[test]
    fn recorded_layouts_are_presets_exactly_or_carry_a_valid_descriptor() {
        let bnb = preset("int8:bnb").unwrap();
        assert_eq!(descriptor_of("int8:bnb", "").unwrap(), bnb);
        assert_eq!(descriptor_of("int8:bnb", &bnb.to_json()).unwrap(), bnb);
        let mut other = bnb.clone();
        other.divisor = 63.5;
        other.scale.value = ScaleValue::AbsmaxOver(63.5);
        let e = descriptor_of("int8:bnb", &other.to_json()).unwrap_err();
        assert!(
            e.to_string().contains("differs from the built-in preset"),
            "{e}"
        );
        // a preset's name is its canonical spelling
        assert!(descriptor_of("int8:ct:group=32:int-quantized", "").is_ok());
        assert!(descriptor_of("int8:ct:int-quantized:group=32", "").is_err());
        assert!(descriptor_of("int8:ct:group=032", "").is_err());
        // a recorded name never reads a file, even a valid descriptor's
        let dir = std::env::temp_dir().join(format!("ckptkit-int8-rec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("mine.json");
        std::fs::write(&f, user("int8").to_json()).unwrap();
        let name = format!("int8:{}", f.display());
        assert!(preset(&name).is_ok(), "the CLI form reads it");
        assert!(descriptor_of(&name, "").is_err(), "a record does not");
        std::fs::remove_dir_all(&dir).unwrap();
        // user layouts: valid, named as recorded, outside the namespace
        let mine = user("int8");
        assert_eq!(descriptor_of("mine", &mine.to_json()).unwrap(), mine);
        assert!(descriptor_of("yours", &mine.to_json()).is_err());
        assert!(descriptor_of("mine", "").is_err());
        let mut r = mine.clone();
        r.name = "int8:mine".into();
        assert!(descriptor_of("int8:mine", &r.to_json()).is_err());
        let mut bad = mine.clone();
        bad.divisor = 0.25;
        assert!(descriptor_of("mine", &bad.to_json()).is_err());
        assert!(descriptor_of("mine", "{").is_err());
    }

    #[test]
    fn constants_must_fit_their_dtype() {
        for (dt, v) in [
            ("U8", 300),
            ("U8", -1),
            ("I8", 128),
            ("I8", -129),
            ("I32", 1 << 31),
            ("I32", -(1 << 31) - 1),
        ] {
            let mut d = user("int8:bnb");
            d.constants[0].dtype = dt.into();
            d.constants[0].values = vec![v];
            let e = user_err(&d);
            assert!(
                e.contains("does not fit") && e.contains(dt),
                "{dt} {v}: {e}"
            );
        }
        for (dt, v) in [
            ("U8", 255),
            ("U8", 0),
            ("I8", -128),
            ("I32", -(1 << 31)),
            ("I64", i64::MIN),
        ] {
            let mut d = user("int8:bnb");
            d.constants[0].dtype = dt.into();
            d.constants[0].values = vec![v];
            assert!(d.validate_user().is_ok(), "{dt} {v}");
            let b = const_bytes(&d.constants[0]);
            let size = Dtype::from_name(dt).unwrap().size();
            assert_eq!(b, v.to_le_bytes()[..size].to_vec());
        }
        let mut d = user("int8:bnb");
        d.constants[0].shape = vec![1; 9];
        assert!(user_err(&d).contains("rank"));
    }

    #[test]
    fn divisors_below_one_are_refused() {
        // what such a divisor does: every stored integer is 0
        for c in [0.3, 1e-310, f64::MIN_POSITIVE] {
            let mut d = user("int8");
            d.divisor = c;
            let w = FloatDtype::F32.encode(&[1.0, -0.5, 0.25, 2.0]);
            let qw = quantize(&d, Dtype::F32, 1, 4, &w).unwrap();
            assert_eq!(qw.q, vec![0; 4], "divisor {c}");
            let e = user_err(&d);
            assert!(e.contains("every stored integer would be 0"), "{c}: {e}");
        }
        let mut d = user("int8");
        d.divisor = 1e-310;
        assert!(user_err(&d).contains("subnormal"));
        for c in [0.0, -1.0, f64::NAN, f64::INFINITY, 256.5] {
            let mut d = user("int8");
            d.divisor = c;
            assert!(user_err(&d).contains("[1, 256]"), "{c}");
        }
        for c in [1.0, 127.5, 256.0] {
            let mut d = user("int8");
            d.divisor = c;
            assert!(d.validate_user().is_ok(), "{c}");
        }
        // absmax_over: the same range, and the divisor's value
        let mut d = user("int8:bnb");
        d.scale.value = ScaleValue::AbsmaxOver(1e-310);
        assert!(user_err(&d).contains("absmax_over"));
        let mut d = user("int8:bnb");
        d.scale.value = ScaleValue::AbsmaxOver(63.5);
        assert!(user_err(&d).contains("must equal the divisor"));
        let mut d = user("int8:bnb");
        d.math = QuantizeMath::default();
        d.range = [-128, 127];
        d.zero_point = Some(ZeroPointSpec { key: "zp".into() });
        assert!(user_err(&d).contains("symmetric"));
    }

    #[test]
    fn packed_storage_needs_its_shape_key() {
        let mut d = user("int8:ct");
        assert!(d.validate_user().is_ok());
        d.payload.shape_key = None;
        assert!(user_err(&d).contains("shape_key"));
    }

    #[test]
    fn keys_are_relative_names() {
        for k in ["", "a/b", "a\\b", ".a", "a.", "a..b", "a\u{0}b", "a\nb"] {
            let mut d = user("int8:ct");
            d.scale.key = k.into();
            let e = user_err(&d);
            assert!(e.contains("key"), "{k:?}: {e}");
        }
        let mut d = user("int8:ct");
        d.scale.key = "x".repeat(257);
        assert!(d.validate_user().is_err());
        let mut d = user("int8:ct");
        d.scale.key = d.payload.shape_key.clone().unwrap();
        assert!(user_err(&d).contains("distinct"));
        let mut d = user("int8:ct");
        d.scale.key = "weight.qs".into();
        assert!(d.validate_user().is_ok());
    }

    #[test]
    fn ranges_and_names_that_contradict_the_layout() {
        for r in [[-127, 0], [0, 127], [1, 127]] {
            let mut d = user("int8");
            d.range = r;
            assert!(user_err(&d).contains("negative and positive"), "{r:?}");
        }
        let mut d = user("int8");
        d.range = [0, 255];
        assert!(d.validate().is_err(), "beyond I8");
        for n in ["", " mine", "mine\n", &"m".repeat(257)] {
            let mut d = user("int8");
            d.name = n.to_string();
            assert!(user_err(&d).contains("name"), "{n:?}");
        }
    }

    #[test]
    fn math_defaults_keep_old_descriptors_and_their_json() {
        let old = r#"{"name":"old","payload":{"key":"qw","storage":"i8"},"scale":{"key":"qs","dtype":"F32","granularity":"channel","value":"scale","shape":"column"},"range":[-127,127],"rounding":"half_even","divisor":127.0}"#;
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
                0usize..6,
            ),
            (
                0usize..3,
                proptest::option::of(0u64..300),
                any::<bool>(),
                proptest::option::of(0.0f64..300.0),
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
                    (packed, offset, shape_key, name),
                    (g, gs, absmax, c, column),
                    (lo, hi, even, divisor, zp),
                    consts,
                    (cast, weight_arith, recip, eps),
                )| Int8Descriptor {
                    // user names, and reserved ones (no preset has these keys)
                    name: ["prop", "int8:prop", "int8", "int8x", "qint8", "Int8:x"][name].into(),
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
                        // absmax_over must equal the divisor; a random one
                        // mostly does not
                        value: if absmax {
                            ScaleValue::AbsmaxOver(c.unwrap_or(divisor))
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
            match d.validate_user() {
                Ok(()) => {
                    prop_assert!(d.validate().is_ok());
                    prop_assert!(reserved(&d.name).is_none(), "{}", d.name);
                    prop_assert_eq!(Int8Descriptor::from_json(&j).unwrap(), d.clone())
                }
                Err(_) => prop_assert!(Int8Descriptor::from_json(&j).is_err()),
            }
            // a recorded descriptor under its own (unreserved) name reads back
            if d.validate().is_ok() && reserved(&d.name).is_none() {
                prop_assert_eq!(descriptor_of(&d.name, &j).unwrap(), d);
            } else {
                prop_assert!(descriptor_of(&d.name, &j).is_err());
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

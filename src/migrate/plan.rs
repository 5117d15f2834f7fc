//! The planner and passes: per layer, from the source layout to the target
//! layout, as a list of passes marked lossless or lossy, then executed
//! layer by layer.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::dtype::{byte_len, Dtype};
use crate::error::{Error, ErrorKind, Result};
use crate::float::{cast, FloatDtype};
use crate::format::manifest::{
    Encoding, Layer, LogicalTensor, Part, Quantization, Role, WeightQuant,
};
use crate::io::source::TensorSource;
use crate::io::TensorBytes;
use crate::layout::int8::{self, Granularity, Int8Descriptor, ScaleValue};
use crate::layout::quanto::{self, math, QType};
use crate::schema::layout_name;

/// What to convert to.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Same layouts.
    Keep,
    /// Dequantize every quantized layer; optionally cast floats to a dtype.
    Plain(Option<Dtype>),
    /// Quantize selected plain layers with optimum-quanto; quanto layers of
    /// another qtype are dequantized and requantized.
    Quanto(QType),
    /// Quantize selected plain layers to an int8 layout; quanto qint8 and
    /// other int8 layers are re-laid out (same integers) where possible.
    Int8(Box<Int8Descriptor>),
    /// Per layer, the layout of a reference (path → weight quantization),
    /// with the reference's module order.
    Like(BTreeMap<String, LikeLayer>, Vec<String>),
}

/// A reference layer for [`Target::Like`].
#[derive(Debug, Clone, PartialEq)]
pub struct LikeLayer {
    /// quanto qtype, or `None` for plain.
    pub qtype: Option<QType>,
    /// int8 layout, when the reference layer is in the int8 family.
    pub int8: Option<Box<Int8Descriptor>>,
    /// activation qtype name (quanto), if any.
    pub activations: Option<String>,
    /// The reference's logical weight shape, when known.
    pub shape: Option<Vec<u64>>,
    /// The reference's logical weight dtype, when known.
    pub dtype: Option<Dtype>,
}

impl Target {
    /// Parses `keep`, `plain`, `plain:bf16|f16|f32`, `quanto:QTYPE`.
    pub fn parse(s: &str) -> Result<Target> {
        let bad = || {
            Error::usage(format!(
                "unknown target `{s}`; use keep, plain, plain:bf16|f16|f32, or quanto:qint8|qint4|qint2|qfloat8|qfloat8_e4m3fn|qfloat8_e5m2|qfloat8_e4m3fnuz"
            ))
        };
        Ok(match s.split_once(':') {
            None if s == "keep" => Target::Keep,
            None if s == "plain" => Target::Plain(None),
            Some(("plain", d)) => Target::Plain(Some(match d {
                "bf16" => Dtype::BF16,
                "f16" => Dtype::F16,
                "f32" => Dtype::F32,
                _ => return Err(bad()),
            })),
            Some(("quanto", q)) => Target::Quanto(QType::from_name(q).ok_or_else(bad)?),
            _ if s == "int8" || s.starts_with("int8:") => Target::Int8(Box::new(int8::preset(s)?)),
            _ => return Err(bad()),
        })
    }
}

/// Options of the planner.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Module-path globs to select (fnmatch; `*` spans dots). Empty = the
    /// default selection.
    pub include: Vec<String>,
    /// Module-path globs to leave unchanged.
    pub exclude: Vec<String>,
    /// Allow re-layouts that cannot be undone byte for byte.
    pub allow_lossy: bool,
    /// Key renames, applied in order to every output key.
    pub rename: Vec<Rename>,
}

/// A key rename: `FROM=TO`, where FROM is a regular expression matched
/// against the whole key (anchor it with `^` to touch only a prefix) and TO
/// a replacement that may use `$1`, `${name}` captures. `^_orig_mod\.=`
/// strips torch.compile's prefix; `^=transformer.` adds one.
#[derive(Debug, Clone)]
pub struct Rename {
    from: regex::Regex,
    to: String,
}

impl Rename {
    /// Parses `FROM=TO` (the first `=` separates them).
    pub fn parse(s: &str) -> Result<Rename> {
        let (f, t) = s
            .split_once('=')
            .ok_or_else(|| Error::usage(format!("rename `{s}` must be FROM=TO")))?;
        let from = regex::Regex::new(f)
            .map_err(|e| Error::usage(format!("rename `{s}`: bad regular expression: {e}")))?;
        Ok(Rename {
            from,
            to: t.to_string(),
        })
    }

    /// Applies the rename to one key (first match only).
    pub fn apply(&self, key: &str) -> String {
        self.from.replacen(key, 1, self.to.as_str()).into_owned()
    }
}

/// Applies renames to every output key and layer path of a plan, and
/// refuses a result where two tensors share a key.
pub fn apply_renames(p: &mut Plan, renames: &[Rename]) -> Result<()> {
    if renames.is_empty() {
        return Ok(());
    }
    let rn = |k: &str| renames.iter().fold(k.to_string(), |acc, r| r.apply(&acc));
    let mut seen = std::collections::HashMap::new();
    for lp in &mut p.layers {
        let old_path = lp.output.path.clone();
        for t in &mut lp.output.tensors {
            for part in &mut t.parts {
                let new = rn(&part.key);
                if let Some(prev) = seen.insert(new.clone(), part.key.clone()) {
                    return Err(Error::usage(format!(
                        "renames map both `{prev}` and `{}` to `{new}`",
                        part.key
                    )));
                }
                part.key = new;
            }
        }
        lp.output.path = rn(&old_path);
        lp.path = lp.output.path.clone();
    }
    Ok(())
}

/// One pass applied to a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "pass", rename_all = "snake_case")]
pub enum Pass {
    /// Tensors copied unchanged.
    Copy,
    /// quanto → float.
    Dequantize {
        /// Source qtype.
        qtype: String,
        /// Output dtype.
        dtype: String,
    },
    /// float → quanto.
    Quantize {
        /// Target qtype.
        qtype: String,
        /// Group size.
        group_size: Option<u64>,
    },
    /// Float dtype cast (round to nearest even).
    Cast {
        /// From dtype.
        from: String,
        /// To dtype.
        to: String,
    },
    /// quanto activation scales dropped (a plain model has no such buffers).
    DropActivationScales,
    /// `input_scale`/`output_scale` added (1.0), as quanto's `quantize()` does.
    AddActivationScales,
    /// The integer payload moved to another int8 layout unchanged, the scale
    /// converted; lossless when converting back gives the same bytes (checked
    /// on the data).
    Relayout {
        /// Source layout.
        from: String,
        /// Target layout.
        to: String,
        /// Whether both layouts dequantize to bit-identical floats.
        same_floats: bool,
        /// Whether the data may make it lossy: source integers outside the
        /// target's range (quanto's -128 in bitsandbytes' [-127, 127]), or a
        /// scale conversion that may round (an F32 absmax divided by 127
        /// into a bf16 scale). Whether it does is checked at execution; when
        /// it does, the re-layout needs `--allow-lossy`.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        may_lose: bool,
    },
}

/// The plan of one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerPlan {
    /// Module path.
    pub path: String,
    /// Source layout name.
    pub from: String,
    /// Target layout name.
    pub to: String,
    /// Passes in order.
    pub passes: Vec<Pass>,
    /// True when converting back gives the source bytes exactly.
    pub lossless: bool,
    /// True when the layer is not byte-reversible but every value written
    /// is exactly what the layout's own library computes (a dequantization
    /// bit-identical to quanto's `dequantize()`, a quantization of float
    /// weights byte-identical to the library's): nothing is lost beyond
    /// what the layout itself implies.
    pub exact: bool,
    /// Which rule decided this layer's plan, when one did (a float layer
    /// of a partly quantized input left float; a quantized layer re-laid
    /// out or requantized).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub rule: String,
    /// Stored bytes read.
    pub bytes_in: u64,
    /// Stored bytes written.
    pub bytes_out: u64,
    /// The output layer (parts name output keys; shard indexes are set by
    /// the sink).
    #[serde(skip)]
    pub output: Layer,
    /// The source layer.
    #[serde(skip)]
    pub source: Layer,
    /// Whether a re-layout that is not byte-reversible may run.
    #[serde(skip)]
    pub allow_lossy: bool,
}

/// A whole plan.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Per layer, in output order.
    pub layers: Vec<LayerPlan>,
    /// Layers a `--like` reference expects that the input lacks.
    pub unmatched: Vec<String>,
}

impl Plan {
    /// Every output tensor: key, dtype, shape.
    pub fn outputs(&self) -> Vec<(String, Dtype, Vec<u64>)> {
        self.layers
            .iter()
            .flat_map(|l| {
                l.output
                    .parts()
                    .map(|p| (p.key.clone(), p.dtype, p.shape.clone()))
            })
            .collect()
    }

    /// True when every layer is lossless.
    pub fn lossless(&self) -> bool {
        self.layers.iter().all(|l| l.lossless)
    }

    /// True when any output layer is quanto-quantized.
    pub fn has_quanto(&self) -> bool {
        self.layers.iter().any(|l| {
            matches!(l.output.quant.weights, WeightQuant::Quanto { .. })
                || l.output.quant.activations.is_some()
        })
    }
}

/// fnmatch as Python's `fnmatch.fnmatch` (case-sensitive on POSIX): `*`
/// matches any run of characters including dots, `?` one character,
/// `[seq]` / `[!seq]` a set.
pub fn fnmatch(pat: &str, s: &str) -> bool {
    let p: Vec<char> = pat.chars().collect();
    let t: Vec<char> = s.chars().collect();
    fn set(p: &[char], c: char) -> Option<(bool, usize)> {
        // returns (matched, length of the set in p) or None if unclosed
        let mut i = 1;
        let neg = p.get(1) == Some(&'!');
        if neg {
            i += 1;
        }
        let start = i;
        let mut m = false;
        while i < p.len() {
            if p[i] == ']' && i > start {
                return Some((m != neg, i + 1));
            }
            if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
                if p[i] <= c && c <= p[i + 2] {
                    m = true;
                }
                i += 3;
            } else {
                if p[i] == c {
                    m = true;
                }
                i += 1;
            }
        }
        None
    }
    fn go(p: &[char], t: &[char]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some('*') => (0..=t.len()).any(|k| go(&p[1..], &t[k..])),
            Some('?') => !t.is_empty() && go(&p[1..], &t[1..]),
            Some('[') => match (t.first(), set(p, *t.first().unwrap_or(&'\0'))) {
                (Some(_), Some((m, n))) => m && go(&p[n..], &t[1..]),
                (Some(c), None) => *c == '[' && go(&p[1..], &t[1..]),
                (None, _) => false,
            },
            Some(c) => t.first() == Some(c) && go(&p[1..], &t[1..]),
        }
    }
    go(&p, &t)
}

/// Module names that denote embedding tables, left plain by default.
pub const DEFAULT_EMBEDDING_NAMES: [&str; 8] = [
    "embed_tokens",
    "wte",
    "wpe",
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "embeddings",
    "shared",
];

fn is_embedding(path: &str) -> bool {
    let last = path.rsplit('.').next().unwrap_or(path);
    DEFAULT_EMBEDDING_NAMES.contains(&last)
}

fn selected(path: &str, opts: &PlanOptions) -> bool {
    if opts.exclude.iter().any(|g| fnmatch(g, path)) {
        return false;
    }
    if !opts.include.is_empty() {
        return opts.include.iter().any(|g| fnmatch(g, path));
    }
    true
}

fn quantizable(l: &Layer, opts: &PlanOptions) -> bool {
    let Some(w) = l.tensors.iter().find(|t| t.name == "weight") else {
        return false;
    };
    let explicit = !opts.include.is_empty() && opts.include.iter().any(|g| fnmatch(g, &l.path));
    matches!(w.shape.len(), 2 | 4)
        && w.dtype.is_filterable_float()
        && w.shape.iter().all(|&d| d > 0)
        && selected(&l.path, opts)
        && (explicit || !is_embedding(&l.path))
}

fn key(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn out_part(role: Role, key: String, dtype: Dtype, shape: Vec<u64>) -> Part {
    Part {
        role,
        shard: 0,
        key,
        dtype,
        shape,
        blake3: [0; 32],
    }
}

fn plain_logical(path: &str, name: &str, dtype: Dtype, shape: Vec<u64>) -> LogicalTensor {
    LogicalTensor {
        name: name.into(),
        dtype,
        shape: shape.clone(),
        encoding: Encoding::Plain,
        parts: vec![out_part(Role::Data, key(path, name), dtype, shape)],
    }
}

fn stored_bytes(l: &Layer) -> u64 {
    l.parts()
        .map(|p| byte_len(p.dtype, &p.shape).unwrap_or(0))
        .sum()
}

fn quanto_of(l: &Layer) -> Option<(QType, Option<u64>)> {
    match &l.quant.weights {
        WeightQuant::Quanto { qtype, group_size } => {
            QType::from_name(qtype).map(|q| (q, *group_size))
        }
        _ => None,
    }
}

const ACT_SCALES: [&str; 2] = ["input_scale", "output_scale"];

fn int8_of(l: &Layer) -> Option<Int8Descriptor> {
    match &l.quant.weights {
        WeightQuant::Int8 { layout, descriptor } => int8::descriptor_of(layout, descriptor).ok(),
        _ => None,
    }
}

/// The integer view of a quantized layer that can be re-laid out without
/// touching its integers: quanto qint8, or an int8 layout with one scale per
/// row or per tensor.
fn relayout_source(l: &Layer) -> Option<(String, ScaleValue, Granularity, [i32; 2])> {
    if let Some((q, _)) = quanto_of(l) {
        return (q == QType::QInt8).then(|| {
            (
                "quanto qint8".to_string(),
                ScaleValue::Scale,
                Granularity::Channel,
                QUANTO_QINT8_RANGE,
            )
        });
    }
    int8_of(l)
        .filter(|d| d.zero_point.is_none())
        .map(|d| (d.name.clone(), d.scale.value, d.scale.granularity, d.range))
}

/// The integers optimum-quanto's qint8 stores.
const QUANTO_QINT8_RANGE: [i32; 2] = [-128, 127];

/// The dtype of a quantized layer's stored scale.
fn scale_dtype_of(l: &Layer) -> Option<Dtype> {
    l.tensors
        .iter()
        .filter(|t| t.encoding == Encoding::Quantized)
        .flat_map(|t| &t.parts)
        .find(|p| p.role == Role::Scale)
        .map(|p| p.dtype)
}

/// Whether converting a stored scale between value forms and dtypes may
/// round (some data can make it inexact); `false` only where it is exact
/// for every value: the same form into the same or a wider dtype, or a
/// bf16 / f16 scale times an integer divisor up to 255 into F32.
fn scale_may_round(from: (ScaleValue, Dtype), to: (ScaleValue, Dtype)) -> bool {
    let narrow = matches!(from.1, Dtype::BF16 | Dtype::F16);
    let widens = from.1 == to.1 || (narrow && to.1 == Dtype::F32);
    match (from.0, to.0) {
        (ScaleValue::Scale, ScaleValue::Scale) => !widens,
        (ScaleValue::AbsmaxOver(a), ScaleValue::AbsmaxOver(b)) => a != b || !widens,
        (ScaleValue::Scale, ScaleValue::AbsmaxOver(c)) => {
            !(narrow && to.1 == Dtype::F32 && c.fract() == 0.0 && (1.0..=255.0).contains(&c))
        }
        _ => true,
    }
}

fn same_floats(a: ScaleValue, b: ScaleValue) -> bool {
    a == b
}

/// Plans the conversion of `layers` to `target`.
pub fn plan(layers: &[Layer], target: &Target, opts: &PlanOptions) -> Result<Plan> {
    let mut out = Vec::with_capacity(layers.len());
    let mut unmatched = Vec::new();
    let like_paths: Vec<&String> = match target {
        Target::Like(m, _) => m.keys().collect(),
        _ => Vec::new(),
    };
    // a partly quantized input keeps its float layers float under --to
    // FAMILY (the layers its author left out, such as norm_out or an
    // embedder), unless --include names them; a fully float input is
    // quantized by the default selection
    let input_quantized = layers
        .iter()
        .any(|l| quanto_of(l).is_some() || int8_of(l).is_some());
    let included = |path: &str| opts.include.iter().any(|g| fnmatch(g, path));
    let float_rule = |l: &Layer| -> Option<&'static str> {
        if !input_quantized {
            Some("float layer quantized (the input has no quantized layer)")
        } else if included(&l.path) {
            Some("float layer quantized: --include selects it")
        } else {
            None
        }
    };
    const LEFT_FLOAT: &str =
        "float layer left float: the input is partly quantized (--include selects float layers)";
    for l in layers {
        // an int8 record must name a preset exactly or carry a valid
        // descriptor (spec/layouts.md §3)
        if let WeightQuant::Int8 { layout, descriptor } = &l.quant.weights {
            int8::descriptor_of(layout, descriptor).map_err(|e| e.with_layer(l.path.clone()))?;
        }
        let lp = match target {
            Target::Keep => keep(l),
            Target::Plain(dt) => {
                if selected(&l.path, opts) {
                    to_plain(l, *dt)?
                } else {
                    keep(l)
                }
            }
            Target::Quanto(q) => {
                let is_q = quanto_of(l).is_some() || int8_of(l).is_some();
                if is_q && selected(&l.path, opts) {
                    let mut lp = to_quanto(l, *q, None)?;
                    lp.rule = quantized_rule(&lp);
                    lp
                } else if !is_q && quantizable(l, opts) {
                    match float_rule(l) {
                        Some(r) => {
                            let mut lp = to_quanto(l, *q, None)?;
                            lp.rule = r.into();
                            lp
                        }
                        None => with_rule(keep(l), LEFT_FLOAT),
                    }
                } else {
                    keep(l)
                }
            }
            Target::Int8(d) => {
                let is_q = quanto_of(l).is_some() || int8_of(l).is_some();
                // int8 layouts describe 2-D (Linear) weights; others are kept
                let two_d = l
                    .tensors
                    .iter()
                    .any(|t| t.name == "weight" && t.shape.len() == 2);
                if two_d && is_q && selected(&l.path, opts) {
                    let mut lp = to_int8(l, d)?;
                    lp.rule = quantized_rule(&lp);
                    lp
                } else if two_d && !is_q && quantizable(l, opts) {
                    match float_rule(l) {
                        Some(r) => {
                            let mut lp = to_int8(l, d)?;
                            lp.rule = r.into();
                            lp
                        }
                        None => with_rule(keep(l), LEFT_FLOAT),
                    }
                } else {
                    keep(l)
                }
            }
            Target::Like(refm, _) => match refm.get(&l.path) {
                Some(r) if selected(&l.path, opts) && r.int8.is_some() => {
                    let d = r
                        .int8
                        .as_deref()
                        .ok_or_else(|| Error::layout("int8 reference"))?;
                    let mut p = to_int8(l, d)?;
                    p.rule = if quanto_of(l).is_some() || int8_of(l).is_some() {
                        quantized_rule(&p)
                    } else {
                        "float layer quantized like the reference".into()
                    };
                    p
                }
                Some(r) if selected(&l.path, opts) => match r.qtype {
                    Some(q) => {
                        let mut p = to_quanto(l, q, r.activations.clone())?;
                        if let (Some(s), Some(w)) = (
                            &r.shape,
                            p.output.tensors.iter().find(|t| t.name == "weight"),
                        ) {
                            if &w.shape != s {
                                return Err(Error::layout(format!(
                                    "the reference expects a weight of shape {s:?}, the input has {:?}",
                                    w.shape
                                ))
                                .with_layer(l.path.clone()));
                            }
                        }
                        p.to = layout_name(&p.output);
                        p
                    }
                    None if r.activations.is_some() && quanto_of(l).is_none() => {
                        activations_only(l, r.activations.clone())
                    }
                    None => to_plain(l, r.dtype)?,
                },
                _ => keep(l),
            },
        };
        out.push(lp);
    }
    if !like_paths.is_empty() {
        let have: std::collections::HashSet<&str> =
            layers.iter().map(|l| l.path.as_str()).collect();
        for p in like_paths {
            if !have.contains(p.as_str()) {
                unmatched.push(p.clone());
            }
        }
    }
    for lp in &mut out {
        lp.allow_lossy = opts.allow_lossy;
        lp.exact = exactness(lp);
    }
    // requantizing a quantized layer (qint4 to int8, int8 to qint4) cannot
    // be undone byte for byte: only with --allow-lossy
    if !matches!(target, Target::Keep | Target::Plain(_)) && !opts.allow_lossy {
        if let Some(lp) = out.iter().find(|lp| requantizes(lp)) {
            return Err(Error::layout(format!(
                "`{}` would be requantized ({} -> {}): its integers cannot be carried over \
                 exactly, so converting back would not give the same bytes; pass \
                 --allow-lossy to accept, or leave it out with --exclude",
                lp.path, lp.from, lp.to
            ))
            .with_layer(lp.path.clone()));
        }
    }
    check_output_keys(&out)?;
    // a reference's module order is the output's order (quanto writes its
    // map in module registration order)
    if let Target::Like(_, order) = target {
        let pos: std::collections::HashMap<&str, usize> = order
            .iter()
            .enumerate()
            .map(|(i, p)| (p.as_str(), i))
            .collect();
        out.sort_by_key(|lp| pos.get(lp.path.as_str()).copied().unwrap_or(usize::MAX));
    }
    Ok(Plan {
        layers: out,
        unmatched,
    })
}

/// Refuses a plan whose outputs give two stored tensors the same key (an
/// int8 descriptor whose part key is also a plain tensor of the layer, a
/// part key that equals another layer's tensor), naming both, before any
/// output is created.
fn check_output_keys(layers: &[LayerPlan]) -> Result<()> {
    let mut seen: std::collections::HashMap<&str, (&Layer, &LogicalTensor, &Part)> =
        std::collections::HashMap::new();
    for lp in layers {
        let l = &lp.output;
        for t in &l.tensors {
            for p in &t.parts {
                if let Some(prev) = seen.insert(p.key.as_str(), (l, t, p)) {
                    return Err(Error::layout(format!(
                        "two tensors would be named `{}`: {} and {}; give the layout other keys",
                        p.key,
                        describe_output(prev),
                        describe_output((l, t, p))
                    ))
                    .with_layer(l.path.clone()));
                }
            }
        }
    }
    Ok(())
}

/// "layer `m`'s `bias`", "the scale of layer `m`'s `weight` (int8 layout
/// `x`)".
fn describe_output((l, t, p): (&Layer, &LogicalTensor, &Part)) -> String {
    let whose = format!("layer `{}`'s `{}`", l.path, t.name);
    if t.encoding == Encoding::Plain {
        return whose;
    }
    let role = match &p.role {
        Role::Data => "payload".to_string(),
        Role::Scale => "scale".to_string(),
        Role::Shift => "shift".to_string(),
        Role::ZeroPoint => "zero point".to_string(),
        Role::Other(n) => format!("`{n}` part"),
    };
    let layout = match &l.quant.weights {
        WeightQuant::Int8 { layout, .. } => format!("int8 layout `{layout}`"),
        _ => layout_name(l),
    };
    format!("the {role} of {whose} ({layout})")
}

fn layer_plan(l: &Layer, output: Layer, passes: Vec<Pass>, lossless: bool) -> LayerPlan {
    LayerPlan {
        path: l.path.clone(),
        from: layout_name(l),
        to: layout_name(&output),
        passes,
        lossless,
        exact: false,
        rule: String::new(),
        bytes_in: stored_bytes(l),
        bytes_out: stored_bytes(&output),
        output,
        source: l.clone(),
        allow_lossy: false,
    }
}

fn with_rule(mut lp: LayerPlan, rule: &str) -> LayerPlan {
    lp.rule = rule.to_string();
    lp
}

/// True when a layer's plan may lose information that `--allow-lossy` must
/// accept: a requantization, or a re-layout whose integers may not fit.
pub fn needs_allow_lossy(lp: &LayerPlan) -> bool {
    requantizes(lp)
        || lp
            .passes
            .iter()
            .any(|p| matches!(p, Pass::Relayout { may_lose: true, .. }))
}

/// True when a quantized source layer is dequantized and quantized again
/// (its integers are not carried over).
fn requantizes(lp: &LayerPlan) -> bool {
    lp.passes
        .iter()
        .any(|p| matches!(p, Pass::Dequantize { .. }))
        && lp.passes.iter().any(|p| matches!(p, Pass::Quantize { .. }))
}

/// The rule that planned a quantized layer under `--to FAMILY`.
fn quantized_rule(lp: &LayerPlan) -> String {
    if lp.passes == [Pass::Copy] {
        "quantized layer kept: it already has the target layout".into()
    } else if requantizes(lp) {
        "quantized layer requantized: its integers cannot be re-laid out exactly (lossy)".into()
    } else {
        "quantized layer re-laid out: same integers, scale converted".into()
    }
}

/// Whether a layer that is not byte-reversible still writes exactly what
/// the layout's own library computes ([`LayerPlan::exact`]).
fn exactness(lp: &LayerPlan) -> bool {
    if lp.lossless || requantizes(lp) {
        return false;
    }
    lp.passes.iter().all(|p| match p {
        Pass::Copy
        | Pass::Dequantize { .. }
        | Pass::Quantize { .. }
        | Pass::DropActivationScales
        | Pass::AddActivationScales => true,
        Pass::Relayout { same_floats, .. } => *same_floats,
        // rounding to a narrower float is a loss of its own
        Pass::Cast { to, .. } => to == "F32",
    })
}

fn keep(l: &Layer) -> LayerPlan {
    let mut output = l.clone();
    for t in &mut output.tensors {
        for p in &mut t.parts {
            p.shard = 0;
        }
    }
    layer_plan(l, output, vec![Pass::Copy], true)
}

fn to_plain(l: &Layer, dt: Option<Dtype>) -> Result<LayerPlan> {
    let mut passes = Vec::new();
    let mut lossless = true;
    let mut tensors = Vec::new();
    let is_q = quanto_of(l).is_some() || l.quant.activations.is_some();
    let int8_name = int8_of(l).map(|d| d.name);
    for t in &l.tensors {
        if is_q && ACT_SCALES.contains(&t.name.as_str()) {
            if !passes.contains(&Pass::DropActivationScales) {
                passes.push(Pass::DropActivationScales);
            }
            lossless = false;
            continue;
        }
        let mut dtype = t.dtype;
        if t.encoding == Encoding::Quantized {
            let name = match (quanto_of(l), &int8_name) {
                (Some((q, _)), _) => q.name().to_string(),
                (None, Some(n)) => n.clone(),
                _ => {
                    return Err(Error::layout("quantized tensor without a layout record")
                        .with_layer(l.path.clone()))
                }
            };
            passes.push(Pass::Dequantize {
                qtype: name,
                dtype: t.dtype.to_string(),
            });
            lossless = false;
        }
        if let Some(d) = dt {
            if t.dtype.is_filterable_float() && d != t.dtype {
                passes.push(Pass::Cast {
                    from: t.dtype.to_string(),
                    to: d.to_string(),
                });
                // widening to f32 is exact; every other cast rounds
                if d != Dtype::F32 {
                    lossless = false;
                }
                dtype = d;
            }
        }
        tensors.push(plain_logical(&l.path, &t.name, dtype, t.shape.clone()));
    }
    if passes.is_empty() {
        passes.push(Pass::Copy);
    }
    let output = Layer {
        path: l.path.clone(),
        quant: Quantization {
            weights: WeightQuant::Plain,
            activations: None,
        },
        tensors,
        extensions: Vec::new(),
    };
    Ok(layer_plan(l, output, passes, lossless))
}

fn to_int8(l: &Layer, d: &Int8Descriptor) -> Result<LayerPlan> {
    if int8_of(l).as_ref() == Some(d) {
        return Ok(keep(l));
    }
    let w = l
        .tensors
        .iter()
        .find(|t| t.name == "weight")
        .ok_or_else(|| Error::layout("no `weight` to quantize").with_layer(l.path.clone()))?;
    if w.shape.len() != 2 || !w.dtype.is_filterable_float() {
        return Err(Error::layout(format!(
            "int8 layouts take 2-D float weights; this one is {} {:?}",
            w.dtype, w.shape
        ))
        .with_layer(l.path.clone()));
    }
    let (o, i) = (w.shape[0], w.shape[1]);
    let mut passes = Vec::new();
    let mut lossless = false;
    let relayout_ok = relayout_source(l).filter(|(_, _, g, _)| {
        *g == Granularity::Channel && matches!(d.scale.granularity, Granularity::Channel)
            || *g == d.scale.granularity
    });
    match relayout_ok {
        Some((from, sv, _, range)) if d.zero_point.is_none() => {
            let src_dt = scale_dtype_of(l).unwrap_or(w.dtype);
            passes.push(Pass::Relayout {
                from,
                to: d.name.clone(),
                same_floats: same_floats(sv, d.scale.value),
                may_lose: range[0] < d.range[0]
                    || range[1] > d.range[1]
                    || scale_may_round((sv, src_dt), (d.scale.value, d.scale_dtype(w.dtype))),
            });
            lossless = true; // checked on the data at execution
        }
        _ => {
            if let Some((q, _)) = quanto_of(l) {
                passes.push(Pass::Dequantize {
                    qtype: q.name().into(),
                    dtype: w.dtype.to_string(),
                });
            } else if let Some(sd) = int8_of(l) {
                passes.push(Pass::Dequantize {
                    qtype: sd.name,
                    dtype: w.dtype.to_string(),
                });
            }
            passes.push(Pass::Quantize {
                qtype: d.name.clone(),
                group_size: match d.scale.granularity {
                    Granularity::Group(g) => Some(g),
                    _ => None,
                },
            });
        }
    }
    let (pshape, sshape, zshape) = d.shapes(o, i).map_err(|e| e.with_layer(l.path.clone()))?;
    let k = |x: &str| int8::Int8Descriptor::key(&l.path, x);
    let mut parts = vec![
        out_part(
            Role::Data,
            k(&d.payload.key),
            int8::payload_dtype(d),
            pshape,
        ),
        out_part(Role::Scale, k(&d.scale.key), d.scale_dtype(w.dtype), sshape),
    ];
    if let Some(sk) = &d.payload.shape_key {
        parts.push(out_part(
            Role::Other(sk.clone()),
            k(sk),
            Dtype::I64,
            vec![2],
        ));
    }
    if let Some(z) = &d.zero_point {
        parts.push(out_part(Role::ZeroPoint, k(&z.key), Dtype::I8, zshape));
    }
    for c in &d.constants {
        let dt = Dtype::from_name(&c.dtype).unwrap_or(Dtype::U8);
        parts.push(out_part(
            Role::Other(c.key.clone()),
            k(&c.key),
            dt,
            c.shape.clone(),
        ));
    }
    let mut tensors = vec![LogicalTensor {
        name: "weight".into(),
        dtype: w.dtype,
        shape: w.shape.clone(),
        encoding: Encoding::Quantized,
        parts,
    }];
    // quanto's activation-scale buffers have no meaning in an int8 layout
    for t in &l.tensors {
        if t.name == "weight" {
            continue;
        }
        if quanto_of(l).is_some() && ACT_SCALES.contains(&t.name.as_str()) {
            // the weight stays byte-reversible; converting back to quanto
            // re-adds the buffers at 1.0 (calibrated values are not carried)
            if !passes.contains(&Pass::DropActivationScales) {
                passes.push(Pass::DropActivationScales);
            }
            continue;
        }
        tensors.push(plain_logical(&l.path, &t.name, t.dtype, t.shape.clone()));
    }
    let preset_json = if int8::is_builtin(d) {
        String::new()
    } else {
        d.to_json()
    };
    let output = Layer {
        path: l.path.clone(),
        quant: Quantization {
            weights: WeightQuant::Int8 {
                layout: d.name.clone(),
                descriptor: preset_json,
            },
            activations: None,
        },
        tensors,
        extensions: Vec::new(),
    };
    Ok(layer_plan(l, output, passes, lossless))
}

/// A module whose weights stay plain but whose activations quanto
/// quantizes (QLayerNorm): the layer gains quanto's two activation-scale
/// buffers and records the activation qtype.
fn activations_only(l: &Layer, activations: Option<String>) -> LayerPlan {
    let mut lp = keep(l);
    if l.quant.activations == activations {
        return lp;
    }
    // the buffers take the weight's dtype (f32 when the module has none)
    let dtype = l
        .tensors
        .iter()
        .find(|t| t.name == "weight")
        .map(|t| t.dtype)
        .unwrap_or(Dtype::F32);
    let mut added = false;
    for n in ACT_SCALES {
        if !l.tensors.iter().any(|t| t.name == n) {
            lp.output
                .tensors
                .push(plain_logical(&l.path, n, dtype, vec![]));
            added = true;
        }
    }
    lp.output.quant.activations = activations;
    if added {
        lp.passes = vec![Pass::Copy, Pass::AddActivationScales];
    }
    lp.to = layout_name(&lp.output);
    lp.bytes_out = stored_bytes(&lp.output);
    lp
}

fn to_quanto(l: &Layer, q: QType, activations: Option<String>) -> Result<LayerPlan> {
    if let Some((sq, _)) = quanto_of(l) {
        if sq == q
            && activations
                .as_ref()
                .is_none_or(|a| l.quant.activations.as_ref() == Some(a))
        {
            return Ok(keep(l));
        }
    }
    let w = l
        .tensors
        .iter()
        .find(|t| t.name == "weight")
        .ok_or_else(|| Error::layout("no `weight` to quantize").with_layer(l.path.clone()))?;
    let t = quanto::float_of(w.dtype).ok_or_else(|| {
        Error::layout(format!("weight dtype {} cannot be quantized", w.dtype))
            .with_layer(l.path.clone())
    })?;
    let _ = t;
    let mut passes = Vec::new();
    let mut lossless = false;
    let int8_src = int8_of(l);
    if let Some((sq, _)) = quanto_of(l) {
        passes.push(Pass::Dequantize {
            qtype: sq.name().into(),
            dtype: w.dtype.to_string(),
        });
    } else if let Some(sd) = &int8_src {
        if q == QType::QInt8
            && w.shape.len() == 2
            && sd.zero_point.is_none()
            && matches!(sd.scale.granularity, Granularity::Channel)
        {
            let src_dt = scale_dtype_of(l).unwrap_or(w.dtype);
            passes.push(Pass::Relayout {
                from: sd.name.clone(),
                to: "quanto qint8".into(),
                same_floats: same_floats(sd.scale.value, ScaleValue::Scale),
                may_lose: sd.range[0] < QUANTO_QINT8_RANGE[0]
                    || sd.range[1] > QUANTO_QINT8_RANGE[1]
                    || scale_may_round((sd.scale.value, src_dt), (ScaleValue::Scale, w.dtype)),
            });
            lossless = true;
        } else {
            passes.push(Pass::Dequantize {
                qtype: sd.name.clone(),
                dtype: w.dtype.to_string(),
            });
        }
    }
    let numel = crate::dtype::numel(&w.shape)?;
    let gs = if q.is_packed() {
        math::group_size(w.shape.first().copied().unwrap_or(1), numel)
    } else {
        None
    };
    let shapes = math::quanto_shapes(q, &w.shape, gs)
        .map_err(|e| Error::layout(e.to_string()).with_layer(l.path.clone()))?;
    if !lossless {
        passes.push(Pass::Quantize {
            qtype: q.name().into(),
            group_size: gs,
        });
    }
    let (dk, sk, shk) = quanto::weight_keys(&l.path, q);
    let mut parts = vec![
        out_part(Role::Data, dk, quanto::data_dtype(q), shapes.data.clone()),
        out_part(Role::Scale, sk, w.dtype, shapes.scale.clone()),
    ];
    if let (Some(k), Some(s)) = (shk, shapes.shift.clone()) {
        parts.push(out_part(Role::Shift, k, w.dtype, s));
    }
    let mut tensors = vec![LogicalTensor {
        name: "weight".into(),
        dtype: w.dtype,
        shape: w.shape.clone(),
        encoding: Encoding::Quantized,
        parts,
    }];
    for t in &l.tensors {
        if t.name != "weight" {
            tensors.push(plain_logical(&l.path, &t.name, t.dtype, t.shape.clone()));
        }
    }
    // quanto's QModules always carry these two 0-d buffers
    let mut added = false;
    for n in ACT_SCALES {
        if !l.tensors.iter().any(|t| t.name == n) {
            tensors.push(plain_logical(&l.path, n, w.dtype, vec![]));
            added = true;
        }
    }
    if added {
        passes.push(Pass::AddActivationScales);
    }
    let output = Layer {
        path: l.path.clone(),
        quant: Quantization {
            weights: WeightQuant::Quanto {
                qtype: q.name().into(),
                group_size: gs,
            },
            activations: activations.or_else(|| l.quant.activations.clone()),
        },
        tensors,
        extensions: Vec::new(),
    };
    Ok(layer_plan(l, output, passes, lossless))
}

fn float_bytes_cast(from: Dtype, to: Dtype, b: &[u8]) -> Result<Vec<u8>> {
    if from == to {
        return Ok(b.to_vec());
    }
    let (Some(f), Some(t)) = (quanto::float_of(from), quanto::float_of(to)) else {
        return Err(Error::new(ErrorKind::UnsupportedDtype(format!(
            "cast {from} to {to}"
        ))));
    };
    cast(f, t, b).map_err(|e| Error::new(ErrorKind::Unsupported(e.to_string())))
}

fn one(dtype: Dtype) -> Vec<u8> {
    match quanto::float_of(dtype) {
        Some(FloatDtype::Bf16) => half::bf16::ONE.to_bits().to_le_bytes().to_vec(),
        Some(FloatDtype::F16) => half::f16::ONE.to_bits().to_le_bytes().to_vec(),
        _ => 1f32.to_le_bytes().to_vec(),
    }
}

/// The integer view of a quantized weight: values `[O, I]`, scale bytes,
/// what the scale means, its dtype.
struct IntView {
    q: Vec<i8>,
    scale: Vec<u8>,
    value: ScaleValue,
    dtype: Dtype,
}

fn int_view(src: &dyn TensorSource, l: &Layer, w: &LogicalTensor) -> Result<IntView> {
    let part = |r: Role| {
        w.parts
            .iter()
            .find(|p| p.role == r)
            .ok_or_else(|| Error::layout(format!("no {r:?} part")).with_layer(l.path.clone()))
    };
    let (o, i) = (w.shape[0], w.shape.get(1).copied().unwrap_or(1));
    let dp = part(Role::Data)?;
    let sp = part(Role::Scale)?;
    let data = src.read(&dp.key)?;
    let scale = src.read(&sp.key)?.into_vec();
    if quanto_of(l).is_some() {
        return Ok(IntView {
            q: data.iter().map(|&b| b as i8).collect(),
            scale,
            value: ScaleValue::Scale,
            dtype: sp.dtype,
        });
    }
    let d =
        int8_of(l).ok_or_else(|| Error::layout("not an int8 layer").with_layer(l.path.clone()))?;
    Ok(IntView {
        q: int8::payload_values(&d, &data, o, i)?,
        scale,
        value: d.scale.value,
        dtype: sp.dtype,
    })
}

/// Dequantizes any quantized weight to dtype `to`: quanto weights exactly
/// as quanto's `dequantize()` (in their dtype, then cast), int8 layouts in
/// f32 with one rounding to `to`.
fn dequantize_any(
    src: &dyn TensorSource,
    l: &Layer,
    w: &LogicalTensor,
    to: Dtype,
) -> Result<Vec<u8>> {
    if quanto_of(l).is_some() {
        let b = quanto::dequantize_weight(src, l, w)?;
        if w.dtype == to {
            return Ok(b);
        }
        let c = float_bytes_cast(w.dtype, to, &b);
        crate::io::pool::give(b);
        return c;
    }
    let d = int8_of(l)
        .ok_or_else(|| Error::layout("unknown quantized layout").with_layer(l.path.clone()))?;
    let v = int_view(src, l, w)?;
    let zp = match w.parts.iter().find(|p| p.role == Role::ZeroPoint) {
        Some(p) => Some(src.read(&p.key)?.iter().map(|&b| b as i8).collect()),
        None => None,
    };
    let qw = int8::Int8Weight {
        q: v.q,
        scale: v.scale,
        zero_point: zp,
    };
    int8::dequantize(&d, w.shape[0], w.shape[1], &qw, v.dtype, to)
}

/// One output tensor of a layer: bytes computed by a pass, or a stored
/// tensor of the source copied unchanged (streamed by the sink, whatever
/// its size).
#[derive(Debug)]
pub enum Produced {
    /// Bytes computed by a pass.
    Bytes(TensorBytes),
    /// The source tensor with this key, copied unchanged.
    Copy(String),
}

impl Produced {
    /// The bytes themselves (a copy is read whole from `src`).
    pub fn bytes(self, src: &dyn TensorSource) -> Result<TensorBytes> {
        match self {
            Produced::Bytes(b) => Ok(b),
            Produced::Copy(k) => src.read(&k),
        }
    }
}

/// The output of one layer: (key, bytes) per tensor, and what an accepted
/// lossy re-layout changed.
pub type Executed = (Vec<(String, Produced)>, Option<Loss>);

/// What a lossy re-layout changed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Loss {
    /// Module path.
    pub layer: String,
    /// Integers clamped into the target range.
    pub clamped: u64,
    /// Largest absolute change of a dequantized value.
    pub max_abs_error: f64,
    /// Largest change in units of the (target) scale.
    pub max_error_in_scales: f64,
}

fn relayout_scale(
    lp: &LayerPlan,
    v: &IntView,
    to: (ScaleValue, Dtype),
    range: [i32; 2],
    allow_lossy: bool,
) -> Result<(Vec<i8>, Vec<u8>, Option<Loss>)> {
    let (scale, exact) = int8::convert_scale((v.value, v.dtype), to, &v.scale)?;
    let clamped =
        v.q.iter()
            .filter(|&&x| (x as i32) < range[0] || (x as i32) > range[1])
            .count() as u64;
    if exact && clamped == 0 {
        return Ok((v.q.clone(), scale, None));
    }
    // measure the damage on the dequantized values
    let q2: Vec<i8> =
        v.q.iter()
            .map(|&x| (x as i32).clamp(range[0], range[1]) as i8)
            .collect();
    let f = |sv: ScaleValue, d: Dtype, b: &[u8]| -> Result<Vec<f64>> {
        let fd = quanto::float_of(d).ok_or_else(|| Error::layout("scale dtype"))?;
        let k = match sv {
            ScaleValue::Scale => 1.0,
            ScaleValue::AbsmaxOver(c) => 1.0 / c,
        };
        Ok(fd
            .decode(b)
            .map_err(|e| Error::layout(e.to_string()))?
            .iter()
            .map(|&x| x as f64 * k)
            .collect())
    };
    let s0 = f(v.value, v.dtype, &v.scale)?;
    let s1 = f(to.0, to.1, &scale)?;
    let per = (v.q.len() / s0.len().max(1)).max(1);
    let (mut mae, mut mes) = (0f64, 0f64);
    for (k, (a, b)) in v.q.iter().zip(&q2).enumerate() {
        let g = (k / per).min(s0.len().saturating_sub(1));
        let e = (*a as f64 * s0[g] - *b as f64 * s1[g]).abs();
        mae = mae.max(e);
        if s1[g] > 0.0 {
            mes = mes.max(e / s1[g]);
        }
    }
    let loss = Loss {
        layer: lp.path.clone(),
        clamped,
        max_abs_error: mae,
        max_error_in_scales: mes,
    };
    if !allow_lossy {
        return Err(Error::layout(format!(
            "re-layout cannot be undone byte for byte ({} integers outside [{}, {}], scale {}): \
             max abs error {:.3e}, {:.3} scale units; pass --allow-lossy to accept",
            clamped,
            range[0],
            range[1],
            if exact { "exact" } else { "rounded" },
            mae,
            mes
        ))
        .with_layer(lp.path.clone()));
    }
    Ok((q2, scale, Some(loss)))
}

/// The float bytes of a source tensor in dtype `to`: the mapped bytes
/// themselves when no conversion is needed, else a dequantized or cast copy.
fn float_input(
    src: &dyn TensorSource,
    l: &Layer,
    s: &LogicalTensor,
    to: Dtype,
) -> Result<TensorBytes> {
    if s.encoding == Encoding::Quantized {
        return Ok(TensorBytes::Pooled(crate::io::pool::Pooled::new(
            dequantize_any(src, l, s, to)?,
        )));
    }
    let raw = src.read(&s.parts[0].key)?;
    if s.dtype == to {
        Ok(raw)
    } else {
        let f = quanto::float_of(s.dtype)
            .ok_or_else(|| Error::layout(format!("cannot cast {}", s.dtype)))?;
        let t =
            quanto::float_of(to).ok_or_else(|| Error::layout(format!("cannot cast to {to}")))?;
        Ok(TensorBytes::Owned(
            cast(f, t, &raw).map_err(|e| Error::layout(e.to_string()))?,
        ))
    }
}

/// A layer's logical tensors by name: a scan over the few tensors of a usual
/// layer, an index over a large one (a `ParameterList` holds thousands).
struct ByName<'l> {
    tensors: &'l [LogicalTensor],
    index: Option<std::collections::HashMap<&'l str, &'l LogicalTensor>>,
}

impl<'l> ByName<'l> {
    /// Layers with more tensors than this get an index.
    const SCAN: usize = 16;

    fn new(tensors: &'l [LogicalTensor]) -> Self {
        let index = (tensors.len() > Self::SCAN).then(|| {
            let mut m = std::collections::HashMap::with_capacity(tensors.len());
            for t in tensors {
                // the first of a repeated name, as a scan finds it
                m.entry(t.name.as_str()).or_insert(t);
            }
            m
        });
        ByName { tensors, index }
    }

    fn get(&self, name: &str) -> Option<&'l LogicalTensor> {
        match &self.index {
            Some(m) => {
                crate::io::source::lookups::add(1);
                m.get(name).copied()
            }
            None => crate::io::source::lookups::find(self.tensors, |s| s.name == name),
        }
    }
}

/// Executes one layer's plan: returns every output tensor (key, bytes) and,
/// for an accepted lossy re-layout, what it changed.
pub fn execute(src: &dyn TensorSource, lp: &LayerPlan) -> Result<Executed> {
    let l = &lp.source;
    let mut out = Vec::new();
    let mut loss = None;
    let relayout = lp.passes.iter().any(|p| matches!(p, Pass::Relayout { .. }));
    let sources = ByName::new(&l.tensors);
    for t in &lp.output.tensors {
        let src_t = sources.get(&t.name);
        match (t.encoding, src_t) {
            (Encoding::Quantized, Some(s))
                if s.encoding == Encoding::Quantized && lp.passes == [Pass::Copy] =>
            {
                // output parts mirror the source's (keys may be renamed)
                for (p, sp) in t.parts.iter().zip(&s.parts) {
                    out.push((p.key.clone(), Produced::Copy(sp.key.clone())));
                }
            }
            (Encoding::Quantized, Some(s)) => match &lp.output.quant.weights {
                WeightQuant::Quanto { qtype, group_size } if relayout => {
                    let v = int_view(src, l, s)?;
                    let (q, scale, lo) = relayout_scale(
                        lp,
                        &v,
                        (ScaleValue::Scale, t.dtype),
                        [-128, 127],
                        lp.allow_lossy,
                    )?;
                    loss = lo;
                    let _ = (qtype, group_size);
                    for p in &t.parts {
                        let b = match p.role {
                            Role::Data => q.iter().map(|&x| x as u8).collect(),
                            Role::Scale => scale.clone(),
                            _ => return Err(Error::layout("unexpected role")),
                        };
                        out.push((p.key.clone(), Produced::Bytes(TensorBytes::Owned(b))));
                    }
                }
                WeightQuant::Quanto { qtype, group_size } => {
                    let float = float_input(src, l, s, t.dtype)?;
                    let q = QType::from_name(qtype).ok_or_else(|| Error::layout("qtype"))?;
                    let f = quanto::float_of(t.dtype).ok_or_else(|| Error::layout("dtype"))?;
                    let qw = math::quantize(q, f, &t.shape, &float, *group_size)
                        .map_err(|e| Error::layout(e.to_string()).with_layer(l.path.clone()))?;
                    // the input window is released before the outputs are written
                    drop(float);
                    // each part's bytes move to the writer (no copies)
                    let (mut data, mut scale, mut shift) = (
                        Some(qw.data.bytes),
                        Some(qw.scale.bytes),
                        qw.shift.map(|s| s.bytes),
                    );
                    for p in &t.parts {
                        let b = match p.role {
                            Role::Data => data.take(),
                            Role::Scale => scale.take(),
                            Role::Shift => shift.take(),
                            _ => return Err(Error::layout("unexpected role")),
                        }
                        .ok_or_else(|| {
                            Error::layout(format!("no quantized bytes for part `{}`", p.key))
                        })?;
                        out.push((p.key.clone(), Produced::Bytes(TensorBytes::Owned(b))));
                    }
                }
                WeightQuant::Int8 { layout, descriptor } => {
                    let d = int8::descriptor_of(layout, descriptor)?;
                    let (o, i) = (t.shape[0], t.shape[1]);
                    let sd = d.scale_dtype(t.dtype);
                    let (q, scale, zp) = if relayout {
                        let v = int_view(src, l, s)?;
                        let (q, scale, lo) =
                            relayout_scale(lp, &v, (d.scale.value, sd), d.range, lp.allow_lossy)?;
                        loss = lo;
                        (q, scale, None)
                    } else {
                        let float = float_input(src, l, s, t.dtype)?;
                        let qw = int8::quantize(&d, t.dtype, o, i, &float)
                            .map_err(|e| e.with_layer(l.path.clone()))?;
                        (qw.q, qw.scale, qw.zero_point)
                    };
                    for p in &t.parts {
                        let b = match &p.role {
                            Role::Data => int8::payload_bytes(&d, &q, o, i),
                            Role::Scale => scale.clone(),
                            Role::ZeroPoint => zp
                                .clone()
                                .unwrap_or_default()
                                .iter()
                                .map(|&x| x as u8)
                                .collect(),
                            Role::Other(name) if Some(name) == d.payload.shape_key.as_ref() => {
                                [o as i64, i as i64]
                                    .iter()
                                    .flat_map(|x| x.to_le_bytes())
                                    .collect()
                            }
                            Role::Other(name) => {
                                let c = d.constants.iter().find(|c| &c.key == name).ok_or_else(
                                    || Error::layout(format!("unknown part `{name}`")),
                                )?;
                                int8::const_bytes(c)
                            }
                            _ => return Err(Error::layout("unexpected role")),
                        };
                        out.push((p.key.clone(), Produced::Bytes(TensorBytes::Owned(b))));
                    }
                }
                WeightQuant::Plain => {
                    return Err(Error::layout("quantized output without a layout record"))
                }
            },
            (Encoding::Plain, Some(s)) if s.encoding == Encoding::Plain && s.dtype == t.dtype => {
                out.push((
                    t.parts[0].key.clone(),
                    Produced::Copy(s.parts[0].key.clone()),
                ));
            }
            (Encoding::Plain, Some(s)) => {
                out.push((
                    t.parts[0].key.clone(),
                    Produced::Bytes(float_input(src, l, s, t.dtype)?),
                ));
            }
            (Encoding::Plain, None) if ACT_SCALES.contains(&t.name.as_str()) => {
                out.push((
                    t.parts[0].key.clone(),
                    Produced::Bytes(TensorBytes::Owned(one(t.dtype))),
                ));
            }
            _ => {
                return Err(
                    Error::layout(format!("no source for output tensor `{}`", t.name))
                        .with_layer(l.path.clone()),
                )
            }
        }
    }
    Ok((out, loss))
}

//! The planner and passes: per layer, from the source layout to the target
//! layout, as a list of passes marked lossless or lossy, then executed
//! layer by layer.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::dtype::{byte_len, Dtype};
use crate::error::{Error, Result};
use crate::format::manifest::{Encoding, Layer, LogicalTensor, Part, Role, WeightQuant};
use crate::io::source::TensorSource;
use crate::io::TensorBytes;
use crate::layout::family::{
    self, is_quantized, plain_logical, Family, Granularity, PlanCtx, Planned, WeightInput,
    ACT_SCALES,
};
use crate::layout::registry::{family_of, layout_name};

pub use crate::layout::family::{Loss, Pass};

/// What to convert to.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Same layouts.
    Keep,
    /// Dequantize every quantized layer; optionally cast floats to a dtype.
    Plain(Option<Dtype>),
    /// A layout of a quantized family (`--to quanto:qint4`, `--to
    /// int8:ct`): quantized layers are converted (re-laid out when their
    /// integers carry over, else requantized), float layers quantized when
    /// the input has no quantized layer or `--include` names them.
    Layout(LayoutTarget),
    /// Per layer, the layout of a reference (path → weight quantization),
    /// with the reference's module order.
    Like(BTreeMap<String, LikeLayer>, Vec<String>),
}

/// A target layout: the record a family writes for it.
#[derive(Debug, Clone, PartialEq)]
pub struct LayoutTarget {
    record: WeightQuant,
}

impl LayoutTarget {
    /// The target whose layer record is `record` (a quanto qtype with no
    /// group size — it follows from each layer's shape —, an int8 layout).
    pub fn new(record: WeightQuant) -> Self {
        LayoutTarget { record }
    }

    /// The record.
    pub fn record(&self) -> &WeightQuant {
        &self.record
    }

    fn family(&self) -> &'static dyn Family {
        family_of(&self.record)
    }
}

/// A reference layer for [`Target::Like`].
#[derive(Debug, Clone, PartialEq)]
pub struct LikeLayer {
    /// The reference layer's weight layout (`WeightQuant::Plain` for a
    /// plain layer).
    pub layout: WeightQuant,
    /// activation qtype name (quanto), if any.
    pub activations: Option<String>,
    /// The reference's logical weight shape, when known.
    pub shape: Option<Vec<u64>>,
    /// The reference's logical weight dtype, when known.
    pub dtype: Option<Dtype>,
}

impl Target {
    /// Parses `keep`, `plain`, `plain:bf16|f16|f32`, and every family's
    /// spellings (`quanto:QTYPE`, `int8`, `int8:bnb`, ...).
    pub fn parse(s: &str) -> Result<Target> {
        let bad = || {
            Error::usage(format!(
                "unknown target `{s}`; use keep, plain, plain:bf16|f16|f32, {}",
                crate::layout::registry::spellings()
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
            _ => match crate::layout::registry::parse_target(s) {
                Some(r) => Target::Layout(LayoutTarget::new(r?.1)),
                None => return Err(bad()),
            },
        })
    }

    /// The target of a layer record (`--to` in code).
    pub fn layout(record: WeightQuant) -> Target {
        Target::Layout(LayoutTarget::new(record))
    }
}

/// Options of the planner: `PlanOptions::default()` and the builder
/// methods.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
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
    /// Module-path globs of the layers to write; every other layer is left
    /// out of the output (a subset, as `ckptkit.open(...).get_dequantized`
    /// reads one layer). Empty = every layer.
    pub only: Vec<String>,
}

setters!(PlanOptions {
    /// Sets `include`: module-path globs to select.
    include: Vec<String>,
    /// Sets `exclude`: module-path globs to leave unchanged.
    exclude: Vec<String>,
    /// Sets `allow_lossy`: allow re-layouts that cannot be undone byte for byte.
    allow_lossy: bool,
    /// Sets `rename`: key renames, in order.
    rename: Vec<Rename>,
    /// Sets `only`: globs of the layers to write (the others are left out).
    only: Vec<String>,
});

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

    /// The companion files the output needs beside a safetensors file
    /// (quanto's map), with their contents, from every family.
    pub(crate) fn companions(&self) -> Vec<(&'static str, String)> {
        let layers: Vec<&Layer> = self.layers.iter().map(|l| &l.output).collect();
        crate::layout::registry::companions(&layers)
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

/// Whether `--to` a layout of `fam` quantizes float layer `l` by the
/// default selection (the family takes it, it is selected, and it is not an
/// embedding table unless `--include` names it).
fn quantizable(l: &Layer, opts: &PlanOptions, fam: &dyn Family) -> bool {
    let explicit = !opts.include.is_empty() && opts.include.iter().any(|g| fnmatch(g, &l.path));
    fam.takes_float(l) && selected(&l.path, opts) && (explicit || !is_embedding(&l.path))
}

fn stored_bytes(l: &Layer) -> u64 {
    l.parts()
        .map(|p| byte_len(p.dtype, &p.shape).unwrap_or(0))
        .sum()
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
    let input_quantized = layers.iter().any(is_quantized);
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
    const MADE_PLAIN: &str = "quantized layer dequantized: the target takes no weight of its \
                              shape, and its output holds no other layout";
    const LEFT_FLOAT: &str =
        "float layer left float: the input is partly quantized (--include selects float layers)";
    let wanted = |path: &str| opts.only.is_empty() || opts.only.iter().any(|g| fnmatch(g, path));
    // layers a reference would have in a layout they cannot be made in,
    // reported together (a GGUF reference with many K-quant tensors)
    let mut unlike: Vec<Error> = Vec::new();
    for l in layers.iter().filter(|l| wanted(&l.path)) {
        let source = crate::layout::registry::of(l);
        // a record's parameters must be readable (an int8 record names a
        // preset exactly or carries a valid descriptor, spec/layouts.md §3)
        source
            .check_record(&l.quant.weights)
            .map_err(|e| e.with_layer(l.path.clone()))?;
        let ctx = PlanCtx {
            activations: None,
            source,
        };
        let into = |fam: &dyn Family, record: &WeightQuant, ctx: &PlanCtx<'_>| {
            fam.plan_into(l, record, ctx).map(|p| layer_plan(l, p))
        };
        let lp = match target {
            Target::Keep => keep(l),
            Target::Plain(dt) => {
                if selected(&l.path, opts) {
                    layer_plan(l, crate::layout::plain::to_plain(l, *dt, source)?)
                } else {
                    keep(l)
                }
            }
            Target::Layout(t) => {
                let fam = t.family();
                let is_q = is_quantized(l);
                if is_q && selected(&l.path, opts) && fam.takes(l) {
                    let mut lp = into(fam, t.record(), &ctx)?;
                    lp.rule = quantized_rule(&lp);
                    lp
                } else if is_q
                    && selected(&l.path, opts)
                    && fam.makes_the_rest_plain()
                    && !fam.owns(&l.quant.weights)
                {
                    let mut lp = layer_plan(l, crate::layout::plain::to_plain(l, None, source)?);
                    lp.rule = MADE_PLAIN.into();
                    lp
                } else if !is_q && quantizable(l, opts, fam) {
                    match float_rule(l) {
                        Some(r) => {
                            let mut lp = into(fam, t.record(), &ctx)?;
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
                Some(r) if selected(&l.path, opts) && r.layout != WeightQuant::Plain => {
                    let fam = family_of(&r.layout);
                    let ctx = PlanCtx {
                        activations: r.activations.clone(),
                        source,
                    };
                    let mut p = match into(fam, &r.layout, &ctx) {
                        Ok(p) => p,
                        Err(e) => {
                            unlike.push(e);
                            continue;
                        }
                    };
                    if let (Some(s), Some(w)) = (
                        &r.shape,
                        p.output.tensors.iter().find(|t| t.name == "weight"),
                    ) {
                        // a quantized reference's shape read from its files
                        // alone may have lost trailing dims (a grouped quanto
                        // convolution is stored as [O, rest]): the same out
                        // dimension and element count is the same weight
                        let same = w.shape.first() == s.first()
                            && crate::dtype::numel(&w.shape).ok() == crate::dtype::numel(s).ok();
                        if !same {
                            return Err(Error::layout(format!(
                                "the reference expects a weight of shape {s:?}, the input has {:?}",
                                w.shape
                            ))
                            .with_layer(l.path.clone()));
                        }
                    }
                    p.rule = if is_quantized(l) {
                        quantized_rule(&p)
                    } else {
                        "float layer quantized like the reference".into()
                    };
                    p
                }
                Some(r) if selected(&l.path, opts) => {
                    if r.activations.is_some() && !is_quantized(l) {
                        activations_only(l, r.activations.clone())
                    } else {
                        layer_plan(l, crate::layout::plain::to_plain(l, r.dtype, source)?)
                    }
                }
                _ => keep(l),
            },
        };
        if lp.passes != [Pass::Copy]
            && l.tensors
                .iter()
                .any(|t| t.encoding == crate::format::manifest::Encoding::QuantizedFlat)
        {
            return Err(Error::new(crate::error::ErrorKind::Ambiguous(format!(
                "the logical shape of this layer's weight is not recorded (a packed weight of \
                 {} elements whose files do not tell its shape); it can be kept, packed into a \
                 container and verified, but converting it needs the shape: pass a plain \
                 checkpoint of the same model (--shapes-from model.safetensors)",
                l.tensors
                    .iter()
                    .find(|t| t.encoding == crate::format::manifest::Encoding::QuantizedFlat)
                    .and_then(|t| t.shape.first())
                    .copied()
                    .unwrap_or(0)
            )))
            .with_layer(l.path.clone()));
        }
        if crate::layout::registry::is_unknown(l) && lp.passes != [Pass::Copy] {
            return Err(
                family::Unknown::refuse(&l.quant.weights, "convert it").with_layer(l.path.clone())
            );
        }
        out.push(lp);
    }
    if let Some(first) = unlike.first() {
        // layout refusals are listed together; another error (a usage or
        // I/O error) is returned as it is, the first such one
        let all_layout = unlike
            .iter()
            .all(|e| matches!(e.kind(), crate::error::ErrorKind::Layout(_)));
        if unlike.len() == 1 || !all_layout {
            let i = unlike
                .iter()
                .position(|e| !matches!(e.kind(), crate::error::ErrorKind::Layout(_)))
                .unwrap_or(0);
            return Err(unlike.swap_remove(i));
        }
        const SHOWN: usize = 20;
        let mut lines: Vec<String> = unlike.iter().take(SHOWN).map(|e| e.to_string()).collect();
        if unlike.len() > SHOWN {
            lines.push(format!("and {} more", unlike.len() - SHOWN));
        }
        let mut e = Error::layout(format!(
            "{} layers cannot be made as the reference has them:\n  {}",
            unlike.len(),
            lines.join("\n  ")
        ));
        if let Some(p) = &first.location().layer {
            e = e.with_layer(p.clone());
        }
        return Err(e);
    }
    if !opts.only.is_empty() && out.is_empty() {
        return Err(Error::usage(format!(
            "no layer of the input matches {}: list its layers with `migrate inspect`",
            opts.only.join(", ")
        )));
    }
    if !like_paths.is_empty() {
        let have: std::collections::HashSet<&str> =
            layers.iter().map(|l| l.path.as_str()).collect();
        for p in like_paths {
            if !have.contains(p.as_str()) && wanted(p) {
                unmatched.push(p.clone());
            }
        }
    }
    drop_stale_markers(layers, &mut out)?;
    add_file_markers(&mut out);
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

/// Leaves out the file-level markers the families say no longer describe
/// the output (`Family::stale_markers`); a layer left with nothing is
/// dropped.
fn drop_stale_markers(layers: &[Layer], out: &mut Vec<LayerPlan>) -> Result<()> {
    let outputs: Vec<&Layer> = out.iter().map(|lp| &lp.output).collect();
    let mut stale = Vec::new();
    for f in crate::layout::registry::FAMILIES {
        stale.extend(f.stale_markers(layers, &outputs)?);
    }
    if stale.is_empty() {
        return Ok(());
    }
    for lp in out.iter_mut() {
        let before = lp.output.tensors.len();
        lp.output
            .tensors
            .retain(|t| !t.parts.iter().any(|p| stale.contains(&p.key)));
        if lp.output.tensors.len() != before {
            for key in lp
                .source
                .parts()
                .map(|p| &p.key)
                .filter(|k| stale.contains(k))
            {
                lp.passes.retain(|p| *p != Pass::Copy);
                lp.passes.push(Pass::DropMarker { key: key.clone() });
            }
            if lp.passes.is_empty() {
                lp.passes.push(Pass::Copy);
            }
            lp.bytes_out = stored_bytes(&lp.output);
            lp.to = layout_name(&lp.output);
        }
    }
    out.retain(|lp| !lp.output.tensors.is_empty());
    Ok(())
}

/// Adds the file-level markers the families say the output needs
/// (`Family::file_markers`) to the top-level layer (path `""`, made when
/// the input has none), each a plain tensor written as zeros.
fn add_file_markers(out: &mut Vec<LayerPlan>) {
    let outputs: Vec<&Layer> = out.iter().map(|lp| &lp.output).collect();
    let mut markers = Vec::new();
    for f in crate::layout::registry::FAMILIES {
        markers.extend(f.file_markers(&outputs));
    }
    for (key, dtype, shape) in markers {
        let (path, name) = crate::format::layers::split_key(&key);
        let (path, name) = (path.to_string(), name.to_string());
        let i = match out.iter().position(|lp| lp.path == path) {
            Some(i) => i,
            None => {
                let empty = Layer {
                    path: path.clone(),
                    quant: crate::format::manifest::Quantization {
                        weights: WeightQuant::Plain,
                        activations: None,
                    },
                    tensors: Vec::new(),
                    extensions: Vec::new(),
                };
                out.push(keep(&empty));
                out.len() - 1
            }
        };
        let lp = &mut out[i];
        lp.output.tensors.push(LogicalTensor {
            name,
            dtype,
            shape: shape.clone(),
            encoding: Encoding::Plain,
            parts: vec![crate::layout::family::out_part(
                crate::format::manifest::Role::Data,
                key.clone(),
                dtype,
                shape,
            )],
        });
        lp.passes
            .retain(|p| *p != Pass::Copy || !lp.source.tensors.is_empty());
        lp.passes.push(Pass::AddMarker { key });
        lp.bytes_out = stored_bytes(&lp.output);
        lp.to = layout_name(&lp.output);
    }
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
    let fam = family_of(&l.quant.weights);
    let layout = format!("{} layout `{}`", fam.name(), fam.label(&l.quant.weights));
    format!("the {role} of {whose} ({layout})")
}

fn layer_plan(l: &Layer, p: Planned) -> LayerPlan {
    LayerPlan {
        path: l.path.clone(),
        from: layout_name(l),
        to: layout_name(&p.output),
        passes: p.passes,
        lossless: p.lossless,
        exact: false,
        rule: String::new(),
        bytes_in: stored_bytes(l),
        bytes_out: stored_bytes(&p.output),
        output: p.output,
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
        | Pass::AddActivationScales
        | Pass::DropMarker { .. }
        | Pass::AddMarker { .. } => true,
        Pass::Relayout { same_floats, .. } => *same_floats,
        // rounding to a narrower float is a loss of its own
        Pass::Cast { to, .. } => to == "F32",
    })
}

fn keep(l: &Layer) -> LayerPlan {
    layer_plan(l, Planned::keep(l))
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

fn one(dtype: Dtype) -> Vec<u8> {
    match crate::float::float_dtype_of(dtype) {
        Some(crate::float::FloatDtype::Bf16) => half::bf16::ONE.to_bits().to_le_bytes().to_vec(),
        Some(crate::float::FloatDtype::F16) => half::f16::ONE.to_bits().to_le_bytes().to_vec(),
        _ => 1f32.to_le_bytes().to_vec(),
    }
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

/// The float bytes of a source tensor in dtype `to`: the mapped bytes
/// themselves when no conversion is needed, else a dequantized or cast copy.
fn float_input(
    src: &dyn TensorSource,
    l: &Layer,
    s: &LogicalTensor,
    to: Dtype,
) -> Result<TensorBytes> {
    if s.encoding.is_quantized() {
        return Ok(TensorBytes::Pooled(crate::io::pool::Pooled::new(
            crate::layout::registry::of(l).dequantize(src, l, s, to)?,
        )));
    }
    let raw = src.read(&s.parts[0].key)?;
    if s.dtype == to {
        Ok(raw)
    } else {
        Ok(TensorBytes::Owned(
            family::cast_bytes(s.dtype, to, &raw).map_err(|e| Error::layout(e.to_string()))?,
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
                crate::format::lookups::add(1);
                m.get(name).copied()
            }
            None => crate::format::lookups::find(self.tensors, |s| s.name == name),
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
            (Encoding::Quantized | Encoding::QuantizedFlat, Some(s))
                if s.encoding.is_quantized() && lp.passes == [Pass::Copy] =>
            {
                // output parts mirror the source's (keys may be renamed)
                for (p, sp) in t.parts.iter().zip(&s.parts) {
                    out.push((p.key.clone(), Produced::Copy(sp.key.clone())));
                }
            }
            (Encoding::Quantized | Encoding::QuantizedFlat, Some(s)) => {
                let record = &lp.output.quant.weights;
                let fam = family_of(record);
                // keep the float input alive while the family quantizes it
                let float;
                let input = if relayout {
                    // the integers carry over through the family-neutral
                    // code form, converted to the target's scale form
                    let source = crate::layout::registry::of(l);
                    let mut v = source.read_codes(src, l, s)?;
                    let form = fam.target_form(record, t.dtype).ok_or_else(|| {
                        Error::layout("re-layout into a layout without a code form")
                            .with_layer(l.path.clone())
                    })?;
                    // one scale per row into the target's groups: repeated
                    if let (Some(from), Granularity::Group(g), &[rows, cols]) =
                        (source.code_form(l), form.granularity, s.shape.as_slice())
                    {
                        if from.granularity == Granularity::Channel {
                            v = crate::layout::codes::regroup_rows(v, rows, cols, g)
                                .map_err(|e| e.with_layer(l.path.clone()))?;
                        }
                    }
                    let (c, lo) = crate::layout::codes::relayout(
                        &l.path,
                        v,
                        (form.value, form.scale_dtype),
                        form.range,
                        lp.allow_lossy,
                    )?;
                    loss = lo;
                    WeightInput::Codes(c)
                } else {
                    float = float_input(src, l, s, t.dtype)?;
                    WeightInput::Float(&float)
                };
                for (k, b) in fam.produce(record, &l.path, t, input)? {
                    out.push((k, Produced::Bytes(b)));
                }
            }
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
            (Encoding::Plain, None)
                if lp.passes.iter().any(
                    |p| matches!(p, Pass::AddMarker { key } if Some(key) == t.parts.first().map(|p| &p.key)),
                ) =>
            {
                let n = crate::dtype::numel(&t.shape)?
                    .checked_mul(t.dtype.size() as u64)
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| Error::overflow("marker size"))?;
                out.push((t.parts[0].key.clone(), Produced::Bytes(TensorBytes::Owned(vec![0; n]))));
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

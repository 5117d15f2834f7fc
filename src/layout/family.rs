//! The family interface (the list of families is `layout::registry`).
//!
//! A layout family (plain, optimum-quanto, the int8 family, ...) owns
//! everything about its layers: how its records read (`WeightQuant`), its
//! target spellings for `--to`, how a layer of any family is planned into
//! one of its layouts, how its weights dequantize to a float pivot and are
//! quantized from one, the family-neutral code form it exchanges integers
//! through (so a lossless re-layout between two families needs no code
//! written for that pair), the side files it reads beside an input, and the
//! side files and `quantization_config` it writes. Nothing outside a
//! family's folder and the registry matches on a family's record.
//!
//! Adding a family: a folder under `src/layout/` with a type implementing
//! `Family`, one line in `registry::FAMILIES`, its section in spec/layouts.md, its
//! fixtures and tests (CONTRIBUTING.md, "Adding a layout family").

use serde::Serialize;

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::format::manifest::{
    Encoding, Layer, LogicalTensor, Part, Quantization, Role, WeightQuant,
};
use crate::io::source::{SourceTensor, TensorSource};
use crate::io::TensorBytes;

pub use crate::layout::codes::{CodeForm, Codes, Granularity, Loss, ScaleValue};

/// One pass applied to a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "pass", rename_all = "snake_case")]
pub enum Pass {
    /// Tensors copied unchanged.
    Copy,
    /// A quantized weight dequantized to float.
    Dequantize {
        /// Source layout (qtype or int8 layout name).
        qtype: String,
        /// Output dtype.
        dtype: String,
    },
    /// A float weight quantized.
    Quantize {
        /// Target layout.
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
    /// A file-level marker left out because no layer of the output is in
    /// the layout it announces (ComfyUI's legacy `scaled_fp8`).
    DropMarker {
        /// The marker's key.
        key: String,
    },
    /// A file-level marker added because the output holds layers in the
    /// layout it announces (ComfyUI's legacy `scaled_fp8`, written as
    /// zeros: readers look at its dtype and element count only).
    AddMarker {
        /// The marker's key.
        key: String,
    },
    /// The integer payload moved to another layout unchanged, the scale
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

/// What a family planned for one layer: the output layer (its parts name
/// output keys), the passes, and whether converting back gives the source
/// bytes exactly.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The output layer.
    pub output: Layer,
    /// Passes in order.
    pub passes: Vec<Pass>,
    /// Converting back gives the source bytes exactly.
    pub lossless: bool,
}

/// The input of a quantized output tensor: the source's codes carried over
/// (a re-layout, already converted to the target's scale form), or float
/// weights to quantize.
pub enum WeightInput<'a> {
    /// Integers and scale in the target's value form and dtype.
    Codes(Codes),
    /// Float bytes in the output tensor's dtype.
    Float(&'a [u8]),
}

/// A layout family. Implementations are crate-internal: the manifest form
/// of a family is young (spec/container.md §8).
pub(crate) trait Family: Sync {
    /// The family's name (`plain`, `quanto`, `int8`).
    fn name(&self) -> &'static str;
    /// Whether a layer record is this family's.
    fn owns(&self, w: &WeightQuant) -> bool;
    /// The weights part of a layer's layout name (`quanto qint4 group
    /// 128`, `int8:ct`, `plain BF16`); by default its record's label.
    fn weights_name(&self, l: &Layer) -> String {
        self.label(&l.quant.weights)
    }
    /// What passes call a layout of this family (`qint4`, `int8:bnb`).
    fn label(&self, w: &WeightQuant) -> String;
    /// Checks a layer record: known parameters, and stored parts of the
    /// shapes the layout implies.
    fn check_layer(&self, l: &Layer) -> Result<()>;
    /// A `--to` spelling of this family (`quanto:qint4`, `int8:ct`), as
    /// the record of the target layout (`None`: not this family's).
    fn parse_target(&self, s: &str) -> Option<Result<WeightQuant>>;
    /// The `--to` spellings, for messages.
    fn spellings(&self) -> &'static str;
    /// Whether `--to` one of this family's layouts applies to a float
    /// layer (the default selection: rank-2/4 float weights for quanto,
    /// 2-D ones for int8).
    fn takes_float(&self, l: &Layer) -> bool;
    /// Whether this family can describe a layer's weight at all (int8:
    /// 2-D weights only), so that `--to` applies to a quantized layer.
    fn takes(&self, l: &Layer) -> bool;
    /// Whether `--to` one of this family's layouts makes a selected layer
    /// quantized in another family's layout, which this family does not
    /// take, plain (dequantized to its model dtype) instead of keeping it:
    /// for a family whose output holds no other family's layouts (GGUF).
    /// Default: such layers are kept.
    fn makes_the_rest_plain(&self) -> bool {
        false
    }
    /// The code form of one of this family's layers, when its integers can
    /// be carried over to another layout unchanged (default: never).
    fn code_form(&self, _l: &Layer) -> Option<CodeForm> {
        None
    }
    /// The code form a target record of this family takes, for a weight of
    /// `model` dtype (`None`, the default: its integers are not exchanged).
    fn target_form(&self, _target: &WeightQuant, _model: Dtype) -> Option<CodeForm> {
        None
    }
    /// Plans layer `l` (of any family) into this family's layout `target`.
    fn plan_into(&self, l: &Layer, target: &WeightQuant, ctx: &PlanCtx<'_>) -> Result<Planned>;
    /// The codes of one of this family's quantized weights.
    fn read_codes(&self, src: &dyn TensorSource, l: &Layer, w: &LogicalTensor) -> Result<Codes>;
    /// Dequantizes one of this family's weights to `to`, exactly as the
    /// family's library does.
    fn dequantize(
        &self,
        src: &dyn TensorSource,
        l: &Layer,
        w: &LogicalTensor,
        to: Dtype,
    ) -> Result<Vec<u8>>;
    /// The bytes of every part of output tensor `t`, whose layout is this
    /// family's `record`, made from `input`.
    fn produce(
        &self,
        record: &WeightQuant,
        path: &str,
        t: &LogicalTensor,
        input: WeightInput<'_>,
    ) -> Result<Vec<(String, TensorBytes)>>;
    /// The `quantization_config` this family's library writes for a model
    /// all in `record`'s layout, in a config of `owner`'s kind:
    /// `Some(None)` means "none at all" (a stale one is removed), `None`
    /// that the family writes none and leaves the config alone (the
    /// default).
    fn quantization_config(
        &self,
        _record: &WeightQuant,
        _owner: ConfigOwner,
        _skip: &[String],
    ) -> Option<Option<serde_json::Value>> {
        None
    }
    /// `weights` of ckptkit's schema entry for a record of this family, and
    /// its group size and full descriptor when it has them (default: the
    /// family records no schema entry).
    fn schema_entry(
        &self,
        _record: &WeightQuant,
    ) -> Option<(String, Option<u64>, Option<serde_json::Value>)> {
        None
    }
    /// The names of the companion files this family writes beside a
    /// safetensors output (quanto: `quanto_qmap.json`). A companion belongs
    /// to that weights file alone: it is committed with it, never left
    /// describing another file, and a stale one is removed with the commit
    /// when the new output needs none.
    fn companion_names(&self) -> &'static [&'static str] {
        &[]
    }
    /// The contents of companion `name` for an output whose layers are
    /// `layers` (all of them, of any family), or `None` when that output
    /// needs none.
    fn companion(&self, _name: &str, _layers: &[&Layer]) -> Option<String> {
        None
    }
    /// The `quant_method` values of the `quantization_config`s this
    /// family's libraries write (a stale one is removed when the output no
    /// longer has such layers).
    fn config_methods(&self) -> &'static [&'static str] {
        &[]
    }
    /// The stored keys of file-level markers this family's layouts use that
    /// an output of layers `output` (planned from `input`) must leave out
    /// because they would misdescribe it, or an error naming a layer when
    /// the output cannot be described at all (ComfyUI: a legacy
    /// `scaled_fp8` marker beside `comfy_quant` layers). Default: none.
    fn stale_markers(&self, _input: &[Layer], _output: &[&Layer]) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// The `__metadata__` entries this family sets (`Some`) or removes
    /// (`None`) in an output whose layers are `layers` (all of them, of any
    /// family): a file-level record of its layers that would be stale
    /// otherwise (ComfyUI's `_quantization_metadata`). Default: none.
    /// The file-level marker tensors (key, dtype, shape) an output whose
    /// layers are `output` needs and does not have yet (ComfyUI's legacy
    /// `scaled_fp8`); they are written as zeros (default: none).
    fn file_markers(&self, _output: &[&Layer]) -> Vec<(String, Dtype, Vec<u64>)> {
        Vec::new()
    }
    /// Whether stored key `key` is one of this family's file-level markers
    /// (a reference's marker is not a layer `--like` asks the input for).
    fn is_file_marker(&self, _key: &str) -> bool {
        false
    }
    fn metadata(&self, _layers: &[&Layer]) -> Vec<(&'static str, Option<String>)> {
        Vec::new()
    }
    /// Buffers of this family's layers that mean nothing outside it
    /// (quanto's activation scales): dropped on the way to another layout.
    fn extra_buffers(&self) -> &'static [&'static str] {
        &[]
    }
    /// Checks a record's parameters alone (a readable int8 descriptor),
    /// before any planning.
    fn check_record(&self, _w: &WeightQuant) -> Result<()> {
        Ok(())
    }
    /// Gives a flat weight ([`Encoding::QuantizedFlat`]) of one of this
    /// family's layers its logical `shape` (from `--shapes-from`), with
    /// whatever its record derives from the shape; the caller then checks
    /// the layer. Families that never record flat weights refuse.
    fn resolve_flat(&self, l: &mut Layer, _shape: &[u64]) -> Result<()> {
        Err(Error::layout("this layout family records no flat weights").with_layer(l.path.clone()))
    }
    /// The names of the files beside an input that [`Family::side_files`]
    /// may read (an output must never replace them).
    fn side_names(&self) -> &'static [&'static str] {
        &[]
    }
    /// What this family reads beside an input to read its layers (its
    /// side files: quanto's `quanto_qmap.json` and diffusers `config.json`),
    /// as its own type for its detector ([`Hints::side`]); `given` names
    /// side files the user passed instead (`quanto_qmap.json` for
    /// `--qmap`). `beside` is the input whose neighbours to read, or `None`
    /// for tensors that have no file (a state dict): then only `given` is
    /// read. Default: nothing.
    fn side_files(
        &self,
        _beside: Option<&std::path::Path>,
        _given: &[(&str, &std::path::Path)],
    ) -> Result<Option<Box<dyn std::any::Any + Send + Sync>>> {
        Ok(None)
    }
    /// A `--like` reference read from this family's own side file: `path`
    /// itself when `alone` (a side file given as the reference, such as a
    /// `quanto_qmap.json`), else the one beside the checkpoint at `path`.
    /// Each module in order, with its record and activation qtype.
    /// Default: the family has no such file.
    #[allow(clippy::type_complexity)]
    fn like_from_side_file(
        &self,
        _path: &std::path::Path,
        _alone: bool,
    ) -> Result<Option<Vec<(String, WeightQuant, Option<String>)>>> {
        Ok(None)
    }
    /// This family's layer detection over one source (`None`: the family
    /// is never read from stored tensors, as plain layers are what is
    /// left).
    fn detector<'a>(&self, _ctx: &DetectCtx<'a>) -> Result<Option<Box<dyn Detector + 'a>>> {
        Ok(None)
    }
}

/// What the reader may use besides the tensors themselves: a plain
/// checkpoint of the same model (logical shapes), and what each family
/// read from its own side files beside the input ([`Family::side_files`]:
/// quanto's map and diffusers config), kept as the family's own type.
#[derive(Default)]
pub struct Hints<'a> {
    /// A plain checkpoint of the same model to take logical shapes from.
    pub shapes_from: Option<&'a dyn TensorSource>,
    side: Vec<(&'static str, Box<dyn std::any::Any + Send + Sync>)>,
}

impl<'a> Hints<'a> {
    /// The hints with what family `family` read beside the input.
    #[cfg_attr(not(feature = "fuzzing"), allow(dead_code))] // tests and fuzz targets
    pub fn with_side<T: std::any::Any + Send + Sync>(self, family: &'static str, v: T) -> Self {
        self.with_side_boxed(family, Box::new(v))
    }

    /// The same, already boxed (what [`Family::side_files`] returns); it
    /// replaces what the family had before.
    pub(crate) fn with_side_boxed(
        mut self,
        family: &'static str,
        v: Box<dyn std::any::Any + Send + Sync>,
    ) -> Self {
        self.side.retain(|(f, _)| *f != family);
        self.side.push((family, v));
        self
    }

    /// What family `family` read beside the input, if it read anything.
    pub fn side<T: std::any::Any>(&self, family: &str) -> Option<&T> {
        self.side
            .iter()
            .find(|(f, _)| *f == family)
            .and_then(|(_, v)| v.downcast_ref())
    }
}

/// What layer detection may use besides the tensors: the source, ckptkit's
/// schema recorded in its `__metadata__`, and the hints (side files found
/// beside the input, or given by the user).
pub(crate) struct DetectCtx<'a> {
    /// The source.
    pub src: &'a dyn TensorSource,
    /// ckptkit's schema (`ckptkit.schema`), when the source records one.
    pub schema: Option<&'a crate::format::st_schema::Schema>,
    /// The hints.
    pub hints: &'a Hints<'a>,
}

/// What a family's detector read for one module.
pub(crate) enum Detected {
    /// The module's weight is in this family's layout: its logical
    /// tensor, its record, and the stored keys it consumed.
    Found {
        /// The logical weight.
        weight: LogicalTensor,
        /// Its record.
        record: WeightQuant,
        /// Stored keys that make it up (they are not plain tensors).
        used: Vec<String>,
    },
    /// Not this family's.
    NotMine,
    /// This family's, but its qtype or shape cannot be told from the
    /// tensors alone (the error says which hint resolves it).
    Ambiguous,
}

/// One family's layer detection over one source, built once (its side
/// files and schema entries read), then asked per key and per module.
pub(crate) trait Detector {
    /// The module a stored key belongs to, when this family's key scheme
    /// claims it (`m.weight._data` is quanto's module `m`). Unclaimed keys
    /// belong to the module named by their key up to the last dot.
    fn claim<'k>(&self, key: &'k str) -> Option<&'k str>;
    /// Reads module `path` from the keys this family claimed for it and the
    /// module's other tensors.
    fn detect(
        &self,
        path: &str,
        claimed: &[&SourceTensor],
        others: &[&SourceTensor],
    ) -> Result<Detected>;
    /// The activation qtype this family records for a module, if any.
    fn activations(&self, _path: &str) -> Option<String> {
        None
    }
    /// An error when this family's records say a module is its own but it
    /// was not read as such.
    fn insists(&self, _path: &str) -> Option<Error> {
        None
    }
    /// The hint that resolves this family's ambiguous layers.
    fn ambiguity_hint(&self) -> String {
        String::new()
    }
    /// Checks over all layers, at the end (a map naming a module the
    /// checkpoint lacks).
    fn finish(&self, _layers: &[Layer]) -> Result<()> {
        Ok(())
    }
}

impl Planned {
    /// The layer copied unchanged (its parts' shards are set by the sink).
    pub fn keep(l: &Layer) -> Planned {
        let mut output = l.clone();
        for t in &mut output.tensors {
            for p in &mut t.parts {
                p.shard = 0;
            }
        }
        Planned {
            output,
            passes: vec![Pass::Copy],
            lossless: true,
        }
    }
}

/// Whose `config.json` it is: the quantization config a loader reads
/// depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigOwner {
    /// diffusers (`_class_name`).
    Diffusers,
    /// transformers (`model_type` / `architectures`, no `_class_name`).
    Transformers,
    /// Neither.
    Unknown,
}

/// What a family planning a layer may ask about the rest.
pub(crate) struct PlanCtx<'a> {
    /// The activation qtype a reference asks for (quanto), if any.
    pub activations: Option<String>,
    /// The family of the source layer.
    pub source: &'a dyn Family,
}

/// The family of a record that no registered family owns (a container 2.0
/// family record written by a newer ckptkit). Its layers can be verified,
/// inspected and copied into another container byte for byte; everything
/// that needs the family's meaning is refused with
/// [`ErrorKind::UnknownFamily`](crate::ErrorKind::UnknownFamily).
pub(crate) struct Unknown;

impl Unknown {
    /// The refusal to `doing` a record of an unknown family.
    pub(crate) fn refuse(w: &WeightQuant, doing: &str) -> Error {
        let family = match w {
            WeightQuant::Family { name, .. } => name.clone(),
            _ => "?".into(),
        };
        Error::new(crate::error::ErrorKind::UnknownFamily {
            family,
            doing: doing.into(),
        })
    }
}

impl Family for Unknown {
    fn name(&self) -> &'static str {
        "unknown"
    }
    fn owns(&self, w: &WeightQuant) -> bool {
        matches!(w, WeightQuant::Family { .. })
    }
    fn weights_name(&self, l: &Layer) -> String {
        match &l.quant.weights {
            WeightQuant::Family { name, params } => {
                let ps: Vec<String> = params
                    .iter()
                    .map(|p| format!("{}={}", p.key, p.value))
                    .collect();
                format!(
                    "family `{name}` ({}; unknown to this version)",
                    ps.join(", ")
                )
            }
            _ => "unknown".into(),
        }
    }
    fn label(&self, w: &WeightQuant) -> String {
        match w {
            WeightQuant::Family { name, .. } => name.clone(),
            _ => "unknown".into(),
        }
    }
    fn check_layer(&self, _l: &Layer) -> Result<()> {
        // the format's rules hold (V9, V11); the meaning is the family's
        Ok(())
    }
    fn parse_target(&self, _s: &str) -> Option<Result<WeightQuant>> {
        None
    }
    fn spellings(&self) -> &'static str {
        ""
    }
    fn takes_float(&self, _l: &Layer) -> bool {
        false
    }
    fn takes(&self, _l: &Layer) -> bool {
        false
    }
    fn plan_into(&self, _l: &Layer, target: &WeightQuant, _ctx: &PlanCtx<'_>) -> Result<Planned> {
        Err(Self::refuse(target, "convert a layer into it"))
    }
    fn read_codes(&self, _src: &dyn TensorSource, l: &Layer, _w: &LogicalTensor) -> Result<Codes> {
        Err(Self::refuse(&l.quant.weights, "re-layout it").with_layer(l.path.clone()))
    }
    fn dequantize(
        &self,
        _src: &dyn TensorSource,
        l: &Layer,
        _w: &LogicalTensor,
        _to: Dtype,
    ) -> Result<Vec<u8>> {
        Err(Self::refuse(&l.quant.weights, "dequantize it").with_layer(l.path.clone()))
    }
    fn produce(
        &self,
        record: &WeightQuant,
        path: &str,
        _t: &LogicalTensor,
        _input: WeightInput<'_>,
    ) -> Result<Vec<(String, TensorBytes)>> {
        Err(Self::refuse(record, "quantize into it").with_layer(path.to_string()))
    }
}

/// The passes that bring weight `w` of layer `l` into layout `target` of
/// family `fam`: the codes carried over (a re-layout; lossless unless the
/// data says otherwise when it runs) when the source layout's code form
/// carries to the target's, else dequantized (if quantized) and quantized
/// with `quantize`. Returns the passes and whether the plan is lossless.
pub(crate) fn carry_or_quantize(
    fam: &dyn Family,
    l: &Layer,
    w: &LogicalTensor,
    target: &WeightQuant,
    ctx: &PlanCtx<'_>,
    quantize: Pass,
) -> (Vec<Pass>, bool) {
    let carried = fam.target_form(target, w.dtype).and_then(|to| {
        ctx.source
            .code_form(l)
            .filter(|f| f.carries_to(&to) || f.regroups_to(&to, &w.shape))
            .map(|f| (f, to))
    });
    match carried {
        Some((from, to)) => (
            vec![Pass::Relayout {
                from: from.name.clone(),
                to: to.name.clone(),
                same_floats: from.same_floats(&to),
                may_lose: from.may_lose_to(&to),
            }],
            true,
        ),
        None => {
            let mut passes = Vec::new();
            if w.encoding.is_quantized() {
                passes.push(Pass::Dequantize {
                    qtype: ctx.source.label(&l.quant.weights),
                    dtype: w.dtype.to_string(),
                });
            }
            passes.push(quantize);
            (passes, false)
        }
    }
}

/// The output layer of layer `l` planned into `record` with its weight
/// made of `parts`: the layer's other tensors are kept as they are, except
/// the source family's buffers that mean nothing outside it (dropped, and
/// the pass says so).
pub(crate) fn quantized_layer(
    l: &Layer,
    w: &LogicalTensor,
    record: WeightQuant,
    parts: Vec<Part>,
    ctx: &PlanCtx<'_>,
    mut passes: Vec<Pass>,
    lossless: bool,
) -> Planned {
    let mut tensors = vec![LogicalTensor {
        name: "weight".into(),
        dtype: w.dtype,
        shape: w.shape.clone(),
        encoding: Encoding::Quantized,
        parts,
    }];
    let extra = ctx.source.extra_buffers();
    for t in &l.tensors {
        if t.name != "weight" && !extra.contains(&t.name.as_str()) {
            tensors.push(plain_logical(&l.path, &t.name, t.dtype, t.shape.clone()));
        }
    }
    if l.tensors.iter().any(|t| extra.contains(&t.name.as_str())) {
        passes.push(Pass::DropActivationScales);
    }
    Planned {
        output: Layer {
            path: l.path.clone(),
            quant: Quantization {
                weights: record,
                activations: None,
            },
            tensors,
            extensions: Vec::new(),
        },
        passes,
        lossless,
    }
}

/// The bytes of output weight `t`'s parts: the codes for `Data`, the
/// scale for `Scale`, `other(role)` for any other part (a family's marker),
/// else an error naming the part.
pub(crate) fn part_bytes(
    t: &LogicalTensor,
    q: Vec<u8>,
    scale: Vec<u8>,
    other: impl Fn(&Role) -> Option<Vec<u8>>,
) -> Result<Vec<(String, TensorBytes)>> {
    let (mut q, mut scale) = (Some(q), Some(scale));
    let mut out = Vec::with_capacity(t.parts.len());
    for p in &t.parts {
        let b = match &p.role {
            Role::Data => q.take().unwrap_or_default(),
            Role::Scale => scale.take().unwrap_or_default(),
            r => other(r).ok_or_else(|| {
                Error::layout(format!("the layout has no {r:?} part (`{}`)", p.key))
            })?,
        };
        out.push((p.key.clone(), TensorBytes::Owned(b)));
    }
    Ok(out)
}

/// The model dtype a `config.json` names (`dtype`, or the older
/// `torch_dtype`), when it is BF16, F16 or F32.
pub(crate) fn config_dtype(v: &serde_json::Value) -> Option<Dtype> {
    ["dtype", "torch_dtype"]
        .iter()
        .find_map(|k| v.get(*k).and_then(|d| d.as_str()))
        .and_then(|d| match d {
            "bfloat16" => Some(Dtype::BF16),
            "float16" => Some(Dtype::F16),
            "float32" => Some(Dtype::F32),
            _ => None,
        })
}

/// A weight dimension as an index.
pub(crate) fn usize_of(v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::overflow("weight dimension"))
}

/// The code and scale bytes of codes carried into a layout whose scale is
/// a plain multiplier stored in `scale_dtype` (the planner has converted
/// them to the target's form; anything else is refused).
pub(crate) fn carried_bytes(c: Codes, scale_dtype: Dtype) -> Result<(Vec<u8>, Vec<u8>)> {
    if c.value != ScaleValue::Scale || c.dtype != scale_dtype {
        return Err(Error::layout(format!(
            "carried codes come with a {scale_dtype} scale, not {:?} {}",
            c.value, c.dtype
        )));
    }
    Ok((c.q.iter().map(|&x| x as u8).collect(), c.scale))
}

/// The codes of a weight whose codes are one byte each (`Data`) with a
/// plain multiplier (`Scale`), as stored.
pub(crate) fn byte_codes(src: &dyn TensorSource, l: &Layer, w: &LogicalTensor) -> Result<Codes> {
    let q = src.read(&part(l, w, Role::Data)?.key)?;
    let sp = part(l, w, Role::Scale)?;
    Ok(Codes {
        q: q.iter().map(|&b| b as i8).collect(),
        scale: src.read(&sp.key)?.to_vec(),
        value: ScaleValue::Scale,
        dtype: sp.dtype,
    })
}

/// Whether a layer's weights are quantized (in any family but plain).
pub(crate) fn is_quantized(l: &Layer) -> bool {
    l.quant.weights != WeightQuant::Plain
}

/// The key of tensor `name` of module `path`.
pub(crate) fn key(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// An output part (its hash and shard are set by the sink).
pub(crate) fn out_part(role: Role, key: String, dtype: Dtype, shape: Vec<u64>) -> Part {
    Part {
        role,
        shard: 0,
        key,
        dtype,
        shape,
        blake3: [0; 32],
    }
}

/// A plain logical tensor `name` of module `path`.
pub(crate) fn plain_logical(
    path: &str,
    name: &str,
    dtype: Dtype,
    shape: Vec<u64>,
) -> LogicalTensor {
    LogicalTensor {
        name: name.into(),
        dtype,
        shape: shape.clone(),
        encoding: Encoding::Plain,
        parts: vec![out_part(Role::Data, key(path, name), dtype, shape)],
    }
}

/// A layer's `weight` (plain or quantized), or an error naming the layer.
pub(crate) fn weight_of(l: &Layer) -> Result<&LogicalTensor> {
    l.tensors
        .iter()
        .find(|t| t.name == "weight")
        .ok_or_else(|| Error::layout("no `weight` to quantize").with_layer(l.path.clone()))
}

/// The part of a quantized weight with this role.
pub(crate) fn part<'a>(l: &Layer, w: &'a LogicalTensor, r: Role) -> Result<&'a Part> {
    w.parts
        .iter()
        .find(|p| p.role == r)
        .ok_or_else(|| Error::layout(format!("no {r:?} part")).with_layer(l.path.clone()))
}

/// quanto's activation-scale buffers (0-d, one per quantized module).
pub(crate) const ACT_SCALES: [&str; 2] = ["input_scale", "output_scale"];

/// The quantized logical tensor of a quantized layer record.
pub(crate) fn quantized_weight(l: &Layer) -> Result<&LogicalTensor> {
    l.tensors
        .iter()
        .find(|t| t.encoding.is_quantized())
        .ok_or_else(|| Error::layout("a quantized layer record without a quantized tensor"))
}

/// Checks that a stored part has the shape its layout implies.
pub(crate) fn expect_part(l: &Layer, w: &LogicalTensor, role: Role, shape: &[u64]) -> Result<()> {
    let p = w.parts.iter().find(|p| p.role == role).ok_or_else(|| {
        Error::layout(format!("`{}` has no {role:?} part", w.name)).with_layer(l.path.clone())
    })?;
    if p.shape != shape {
        return Err(Error::layout(format!(
            "part `{}` ({role:?}) has shape {:?}; the layout implies {:?}",
            p.key, p.shape, shape
        ))
        .with_layer(l.path.clone())
        .with_tensor(p.key.clone()));
    }
    Ok(())
}

/// Float bytes cast between F16, BF16 and F32 (round to nearest even).
pub(crate) fn cast_bytes(from: Dtype, to: Dtype, b: &[u8]) -> Result<Vec<u8>> {
    if from == to {
        return Ok(b.to_vec());
    }
    let (Some(f), Some(t)) = (
        crate::float::float_dtype_of(from),
        crate::float::float_dtype_of(to),
    ) else {
        return Err(Error::new(crate::error::ErrorKind::UnsupportedDtype(
            format!("cast {from} to {to}"),
        )));
    };
    crate::float::cast(f, t, b)
        .map_err(|e| Error::new(crate::error::ErrorKind::Unsupported(e.to_string())))
}

//! optimum-quanto as a layout family (spec/layouts.md §2).

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::format::manifest::{Encoding, Layer, LogicalTensor, Quantization, Role, WeightQuant};
use crate::io::source::{SourceTensor, TensorSource};
use crate::io::TensorBytes;
use crate::layout::family::{
    expect_part, out_part, part, plain_logical, quantized_weight, weight_of, CodeForm, Codes,
    ConfigOwner, DetectCtx, Detected, Detector, Family, Granularity, Pass, PlanCtx, Planned,
    ScaleValue, WeightInput, ACT_SCALES,
};

use super::{float_of, math, QType, QmapEntry, QuantoMap, QMAP_FILE};

/// The record of a `quanto_qmap.json` entry's `weights` (`none`: plain).
pub(crate) fn qmap_record(weights: &str) -> WeightQuant {
    match QType::from_name(weights) {
        Some(q) => WeightQuant::Quanto {
            qtype: q.name().into(),
            group_size: None,
        },
        None => WeightQuant::Plain,
    }
}

/// The optimum-quanto family.
pub(crate) struct Quanto;

/// quanto's key suffixes of a quantized weight, longest first.
const SUFFIXES: [&str; 4] = [
    ".weight._data._data",
    ".weight._data",
    ".weight._scale",
    ".weight._shift",
];

/// quanto's layer detection over one source (spec/layouts.md §2.5): keys
/// grouped by their suffixes, the qtype from the map, the diffusers
/// config, ckptkit's schema or the dtypes.
struct QuantoDetector<'a> {
    ctx: DetectCtx<'a>,
    qmap: Option<std::collections::HashMap<&'a str, &'a QmapEntry>>,
}

impl QuantoDetector<'_> {
    /// What quanto read beside the input (map, diffusers config).
    fn side(&self) -> Option<&super::QuantoSide> {
        self.ctx.hints.side::<super::QuantoSide>("quanto")
    }

    fn qmap(&self) -> Option<&QuantoMap> {
        self.side().and_then(|s| s.qmap.as_ref())
    }

    fn entry(&self, path: &str) -> Option<&QmapEntry> {
        self.qmap.as_ref().and_then(|m| {
            crate::format::lookups::add(1);
            m.get(path).copied()
        })
    }
}

impl Detector for QuantoDetector<'_> {
    fn claim<'k>(&self, key: &'k str) -> Option<&'k str> {
        SUFFIXES.iter().find_map(|s| key.strip_suffix(s))
    }

    fn detect(
        &self,
        path: &str,
        claimed: &[&SourceTensor],
        others: &[&SourceTensor],
    ) -> Result<Detected> {
        if claimed.is_empty() {
            return Ok(Detected::NotMine);
        }
        let mut g = super::Group {
            plain: others.to_vec(),
            ..Default::default()
        };
        for t in claimed {
            let slot = if t.key.ends_with(".weight._data._data") {
                &mut g.packed
            } else if t.key.ends_with(".weight._data") {
                &mut g.data
            } else if t.key.ends_with(".weight._scale") {
                &mut g.scale
            } else {
                &mut g.shift
            };
            *slot = Some(t);
        }
        let diffusers = self.side().and_then(|s| s.diffusers.as_ref());
        let shapes = self.ctx.hints.shapes_from;
        match super::quanto_weight(
            path,
            &g,
            self.entry(path),
            diffusers,
            shapes,
            self.ctx.schema,
        )? {
            Some((weight, record)) => Ok(Detected::Found {
                weight,
                record,
                used: claimed.iter().map(|t| t.key.clone()).collect(),
            }),
            None => Ok(Detected::Ambiguous),
        }
    }

    fn activations(&self, path: &str) -> Option<String> {
        self.entry(path)
            .map(|e| e.activations.clone())
            .or_else(|| {
                self.ctx
                    .schema
                    .and_then(|s| s.get(path))
                    .map(|e| e.activations.clone())
            })
            .filter(|a| a != "none")
    }

    fn ambiguity_hint(&self) -> String {
        // the map, when it was read, gave the qtypes: only shapes are missing
        if self.qmap().is_some() {
            "the quanto map gives their qtype but not their logical shape (packed layers \
             without a bias); pass a plain checkpoint of the same model (--shapes-from \
             model.safetensors)"
                .into()
        } else {
            "pass the quanto map (--qmap quanto_qmap.json) or a plain checkpoint of the same \
             model (--shapes-from model.safetensors)"
                .into()
        }
    }

    fn finish(&self, layers: &[Layer]) -> Result<()> {
        // modules the map names that hold no tensors (never so in real quanto
        // files) are ignored; modules it names with weights must exist
        let Some(m) = self.qmap() else {
            return Ok(());
        };
        let have: std::collections::HashSet<&str> =
            layers.iter().map(|l| l.path.as_str()).collect();
        for (k, e) in &m.entries {
            if e.weights != "none" && !have.contains(k.as_str()) {
                return Err(super::lerr(
                    k,
                    format!(
                        "the quanto map says `{}` weights, but the checkpoint has no tensor of \
                         this module",
                        e.weights
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The integers quanto's qint8 stores.
const QINT8_RANGE: [i32; 2] = [-128, 127];

fn qtype_of(w: &WeightQuant) -> Option<(QType, Option<u64>)> {
    match w {
        WeightQuant::Quanto { qtype, group_size } => {
            QType::from_name(qtype).map(|q| (q, *group_size))
        }
        _ => None,
    }
}

/// The code form of an 8-bit quanto qtype whose codes other layouts
/// store too: qint8 (I8) and qfloat8_e4m3fn (FP8 E4M3 bit patterns), both
/// with one scale per output row in the model's dtype, applied as
/// `D(q · s)`.
fn form(q: QType, scale_dtype: Dtype) -> Option<CodeForm> {
    let (name, code) = match q {
        QType::QInt8 => ("quanto qint8", Dtype::I8),
        QType::QFloat8E4M3Fn => ("quanto qfloat8_e4m3fn", Dtype::F8E4M3),
        _ => return None,
    };
    Some(CodeForm {
        name: name.into(),
        value: ScaleValue::Scale,
        granularity: Granularity::Channel,
        range: QINT8_RANGE,
        scale_dtype,
        zero_point: false,
        code,
    })
}

impl Family for Quanto {
    fn detector<'a>(&self, ctx: &DetectCtx<'a>) -> Result<Option<Box<dyn Detector + 'a>>> {
        let qmap = ctx
            .hints
            .side::<super::QuantoSide>("quanto")
            .and_then(|s| s.qmap.as_ref())
            .map(QuantoMap::index);
        Ok(Some(Box::new(QuantoDetector {
            ctx: DetectCtx {
                src: ctx.src,
                schema: ctx.schema,
                hints: ctx.hints,
            },
            qmap,
        })))
    }

    fn name(&self) -> &'static str {
        super::FAMILY_NAME
    }

    fn side_names(&self) -> &'static [&'static str] {
        &[QMAP_FILE, "config.json"]
    }

    fn side_files(
        &self,
        beside: Option<&std::path::Path>,
        given: &[(&str, &std::path::Path)],
    ) -> Result<Option<Box<dyn std::any::Any + Send + Sync>>> {
        let qmap = match (given.iter().find(|(k, _)| *k == QMAP_FILE), beside) {
            (Some((_, p)), _) => Some(QuantoMap::from_file(p)?),
            (None, Some(input)) => super::qmap_beside(input)?,
            (None, None) => None,
        };
        let diffusers = match beside {
            Some(input) => super::diffusers_beside(input)?,
            None => None,
        };
        Ok(Some(Box::new(super::QuantoSide { qmap, diffusers })))
    }

    fn like_from_side_file(
        &self,
        path: &std::path::Path,
        alone: bool,
    ) -> Result<Option<Vec<(String, WeightQuant, Option<String>)>>> {
        let map = if alone {
            Some(QuantoMap::from_file(path)?)
        } else {
            super::qmap_beside(path)?
        };
        Ok(map.map(|m| {
            m.entries
                .into_iter()
                .map(|(k, e)| {
                    let act = (e.activations != "none").then_some(e.activations);
                    (k, qmap_record(&e.weights), act)
                })
                .collect()
        }))
    }

    fn owns(&self, w: &WeightQuant) -> bool {
        matches!(w, WeightQuant::Quanto { .. })
    }

    fn weights_name(&self, l: &Layer) -> String {
        match &l.quant.weights {
            WeightQuant::Quanto {
                qtype,
                group_size: Some(g),
            } => format!("quanto {qtype} group {g}"),
            WeightQuant::Quanto { qtype, .. }
                if l.tensors
                    .iter()
                    .any(|t| t.encoding == Encoding::QuantizedFlat) =>
            {
                format!("quanto {qtype} (logical shape unknown)")
            }
            WeightQuant::Quanto { qtype, .. } => format!("quanto {qtype}"),
            _ => "quanto".into(),
        }
    }

    fn label(&self, w: &WeightQuant) -> String {
        match w {
            WeightQuant::Quanto { qtype, .. } => qtype.clone(),
            _ => "quanto".into(),
        }
    }

    fn check_layer(&self, l: &Layer) -> Result<()> {
        let at = |e: Error| e.with_layer(l.path.clone());
        let WeightQuant::Quanto { qtype, group_size } = &l.quant.weights else {
            return Ok(());
        };
        let q = QType::from_name(qtype)
            .ok_or_else(|| at(Error::layout(format!("unknown quanto qtype `{qtype}`"))))?;
        let w = quantized_weight(l).map_err(at)?;
        if w.encoding == Encoding::QuantizedFlat {
            // logical shape unknown: the parts must be the matrix of codes
            // of a packed weight of that many elements, with no group size
            let m = super::flat_matrix(w).filter(|_| q.is_packed() && group_size.is_none());
            let Some(m) = m else {
                return Err(at(Error::layout(format!(
                    "a flat {qtype} weight of {:?} elements must be a packed qtype with no group \
                     size whose scale rows times data columns make that count",
                    w.shape
                ))));
            };
            let s =
                math::quanto_shapes(q, &m, None).map_err(|e| at(Error::layout(e.to_string())))?;
            expect_part(l, w, Role::Data, &s.data)?;
            expect_part(l, w, Role::Scale, &s.scale)?;
            return Ok(());
        }
        let s = math::quanto_shapes(q, &w.shape, *group_size)
            .map_err(|e| at(Error::layout(format!("{qtype} weight {:?}: {e}", w.shape))))?;
        if q.is_packed() {
            let rule = math::group_size(w.shape[0], crate::dtype::numel(&w.shape)?);
            if *group_size != rule {
                let show =
                    |g: Option<u64>| g.map_or("none (per row)".to_string(), |g| g.to_string());
                return Err(at(Error::layout(format!(
                    "{qtype} weight {:?} records group size {}; quanto uses {} for this shape",
                    w.shape,
                    show(*group_size),
                    show(rule)
                ))));
            }
        }
        expect_part(l, w, Role::Data, &s.data)?;
        expect_part(l, w, Role::Scale, &s.scale)?;
        if let Some(sh) = &s.shift {
            expect_part(l, w, Role::Shift, sh)?;
        }
        Ok(())
    }

    fn resolve_flat(&self, l: &mut Layer, shape: &[u64]) -> Result<()> {
        let path = l.path.clone();
        let WeightQuant::Quanto { group_size, .. } = &mut l.quant.weights else {
            return Err(Error::layout("not a quanto record").with_layer(path));
        };
        let n = crate::dtype::numel(shape)?;
        let o = shape.first().copied().unwrap_or(0);
        // quanto's group size follows from the shape (spec/layouts.md §2)
        *group_size = math::group_size(o, n);
        for t in l
            .tensors
            .iter_mut()
            .filter(|t| t.encoding == Encoding::QuantizedFlat)
        {
            t.shape = shape.to_vec();
            t.encoding = Encoding::Quantized;
        }
        Ok(())
    }

    fn parse_target(&self, s: &str) -> Option<Result<WeightQuant>> {
        let q = s.strip_prefix("quanto:")?;
        Some(
            QType::from_name(q)
                .map(|q| WeightQuant::Quanto {
                    qtype: q.name().into(),
                    group_size: None,
                })
                .ok_or_else(|| {
                    Error::usage(format!(
                        "unknown target `{s}`; quanto targets are {}",
                        self.spellings()
                    ))
                }),
        )
    }

    fn spellings(&self) -> &'static str {
        "quanto:qint8|qint4|qint2|qfloat8|qfloat8_e4m3fn|qfloat8_e5m2|qfloat8_e4m3fnuz"
    }

    fn takes_float(&self, l: &Layer) -> bool {
        weight_of(l).is_ok_and(|w| {
            matches!(w.shape.len(), 2 | 4)
                && w.dtype.is_filterable_float()
                && w.shape.iter().all(|&d| d > 0)
        })
    }

    fn takes(&self, _l: &Layer) -> bool {
        true
    }

    fn code_form(&self, l: &Layer) -> Option<CodeForm> {
        let (q, _) = qtype_of(&l.quant.weights)?;
        let w = quantized_weight(l).ok()?;
        let scale = w.parts.iter().find(|p| p.role == Role::Scale)?;
        (w.shape.len() == 2).then_some(())?;
        form(q, scale.dtype)
    }

    fn target_form(&self, target: &WeightQuant, model: Dtype) -> Option<CodeForm> {
        form(qtype_of(target)?.0, model)
    }

    fn plan_into(&self, l: &Layer, target: &WeightQuant, ctx: &PlanCtx<'_>) -> Result<Planned> {
        let (q, _) = qtype_of(target).ok_or_else(|| Error::layout("quanto target record"))?;
        let activations = ctx.activations.clone();
        if let Some((sq, _)) = qtype_of(&l.quant.weights) {
            if sq == q
                && activations
                    .as_ref()
                    .is_none_or(|a| l.quant.activations.as_ref() == Some(a))
            {
                return Ok(Planned::keep(l));
            }
        }
        let w = weight_of(l)?;
        float_of(w.dtype).ok_or_else(|| {
            Error::layout(format!("weight dtype {} cannot be quantized", w.dtype))
                .with_layer(l.path.clone())
        })?;
        let mut passes = Vec::new();
        let mut lossless = false;
        if w.encoding.is_quantized() {
            // the integers carry over when both sides hold the same codes
            let to = self.target_form(target, w.dtype);
            match (ctx.source.code_form(l), to) {
                (Some(from), Some(to)) if w.shape.len() == 2 && from.carries_to(&to) => {
                    passes.push(Pass::Relayout {
                        from: from.name.clone(),
                        to: to.name.clone(),
                        same_floats: from.same_floats(&to),
                        may_lose: from.may_lose_to(&to),
                    });
                    lossless = true; // checked on the data at execution
                }
                _ => passes.push(Pass::Dequantize {
                    qtype: ctx.source.label(&l.quant.weights),
                    dtype: w.dtype.to_string(),
                }),
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
        let (dk, sk, shk) = super::weight_keys(&l.path, q);
        let mut parts = vec![
            out_part(Role::Data, dk, super::data_dtype(q), shapes.data.clone()),
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
        Ok(Planned {
            output,
            passes,
            lossless,
        })
    }

    fn read_codes(&self, src: &dyn TensorSource, l: &Layer, w: &LogicalTensor) -> Result<Codes> {
        let dp = part(l, w, Role::Data)?;
        let sp = part(l, w, Role::Scale)?;
        let data = src.read(&dp.key)?;
        Ok(Codes {
            q: data.iter().map(|&b| b as i8).collect(),
            scale: src.read(&sp.key)?.into_vec(),
            value: ScaleValue::Scale,
            dtype: sp.dtype,
        })
    }

    fn dequantize(
        &self,
        src: &dyn TensorSource,
        l: &Layer,
        w: &LogicalTensor,
        to: Dtype,
    ) -> Result<Vec<u8>> {
        // exactly quanto's dequantize(), in the weight's dtype, then cast
        let b = super::dequantize_weight(src, l, w)?;
        if w.dtype == to {
            return Ok(b);
        }
        let c = crate::layout::family::cast_bytes(w.dtype, to, &b);
        crate::io::pool::give(b);
        c
    }

    fn produce(
        &self,
        record: &WeightQuant,
        path: &str,
        t: &LogicalTensor,
        input: WeightInput<'_>,
    ) -> Result<Vec<(String, TensorBytes)>> {
        let (q, group_size) = qtype_of(record).ok_or_else(|| Error::layout("quanto record"))?;
        let (mut data, mut scale, mut shift) = match input {
            WeightInput::Codes(c) => (
                Some(c.q.iter().map(|&x| x as u8).collect::<Vec<u8>>()),
                Some(c.scale),
                None,
            ),
            WeightInput::Float(float) => {
                let f = float_of(t.dtype).ok_or_else(|| Error::layout("dtype"))?;
                let qw = math::quantize(q, f, &t.shape, float, group_size)
                    .map_err(|e| Error::layout(e.to_string()).with_layer(path.to_string()))?;
                (
                    Some(qw.data.bytes),
                    Some(qw.scale.bytes),
                    qw.shift.map(|s| s.bytes),
                )
            }
        };
        // each part's bytes move to the writer (no copies)
        let mut out = Vec::with_capacity(t.parts.len());
        for p in &t.parts {
            let b = match p.role {
                Role::Data => data.take(),
                Role::Scale => scale.take(),
                Role::Shift => shift.take(),
                _ => return Err(Error::layout("unexpected role")),
            }
            .ok_or_else(|| Error::layout(format!("no quantized bytes for part `{}`", p.key)))?;
            out.push((p.key.clone(), TensorBytes::Owned(b)));
        }
        Ok(out)
    }

    fn quantization_config(
        &self,
        record: &WeightQuant,
        owner: ConfigOwner,
        skip: &[String],
    ) -> Option<Option<serde_json::Value>> {
        // transformers reads no quanto config from a pre-quantized
        // checkpoint (optimum-quanto's own transformers save writes none)
        if owner == ConfigOwner::Transformers {
            return Some(None);
        }
        let (q, _) = qtype_of(record)?;
        let w = match q {
            QType::QInt8 => "int8",
            QType::QInt4 => "int4",
            QType::QInt2 => "int2",
            QType::QFloat8E4M3Fn => "float8",
            _ => return None, // diffusers' QuantoConfig has no name for it
        };
        Some(Some(serde_json::json!({
            "quant_method": "quanto", "weights_dtype": w, "modules_to_not_convert": skip
        })))
    }

    fn schema_entry(
        &self,
        record: &WeightQuant,
    ) -> Option<(String, Option<u64>, Option<serde_json::Value>)> {
        match record {
            WeightQuant::Quanto { qtype, group_size } => Some((qtype.clone(), *group_size, None)),
            _ => None,
        }
    }

    fn companion_names(&self) -> &'static [&'static str] {
        &[QMAP_FILE]
    }

    fn companion(&self, name: &str, layers: &[&Layer]) -> Option<String> {
        if name != QMAP_FILE {
            return None;
        }
        let map = qmap_of(layers);
        (!map.entries.is_empty()).then(|| map.to_json())
    }

    fn extra_buffers(&self) -> &'static [&'static str] {
        &ACT_SCALES
    }

    fn config_methods(&self) -> &'static [&'static str] {
        &["quanto"]
    }
}

/// The quanto map of an output's layers, in their order: every quanto
/// layer, and every layer whose activations quanto quantizes (QLayerNorm:
/// weights `none`). Empty when the output has neither.
pub(crate) fn qmap_of(layers: &[&Layer]) -> QuantoMap {
    let entries = layers
        .iter()
        .filter_map(|l| {
            let weights = match &l.quant.weights {
                WeightQuant::Quanto { qtype, .. } => qtype.clone(),
                _ if l.quant.activations.is_some() => "none".into(),
                _ => return None,
            };
            let activations = l.quant.activations.clone().unwrap_or_else(|| "none".into());
            Some((
                l.path.clone(),
                QmapEntry {
                    weights,
                    activations,
                },
            ))
        })
        .collect();
    QuantoMap { entries }
}

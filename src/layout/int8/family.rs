//! The int8 family (descriptors and presets) as a layout family
//! (spec/layouts.md §3).

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::format::manifest::{Encoding, Layer, LogicalTensor, Quantization, Role, WeightQuant};
use crate::io::source::{SourceTensor, TensorSource};
use crate::io::TensorBytes;
use crate::layout::family::{
    expect_part, out_part, part, plain_logical, quantized_weight, weight_of, CodeForm, Codes,
    ConfigOwner, DetectCtx, Detected, Detector, Family, Granularity, Pass, PlanCtx, Planned,
    WeightInput,
};

use super::{descriptor_of, is_builtin, preset, Int8Descriptor};

/// The int8 family.
pub(crate) struct Int8;

/// The int8 layouts ckptkit's schema records, by module path: a built-in
/// preset by name, or a user layout with its full descriptor (checked as
/// [`descriptor_of`] checks a manifest's record). A name in the reserved
/// `int8` namespace that is not a preset, recorded without a descriptor (a
/// user layout written before descriptors were recorded), is refused: it
/// cannot be read back. Other names are other families'.
fn recorded(
    schema: Option<&crate::format::st_schema::Schema>,
) -> Result<std::collections::BTreeMap<String, Int8Descriptor>> {
    let mut out = std::collections::BTreeMap::new();
    for (path, e) in schema.into_iter().flatten() {
        let d = match &e.descriptor {
            Some(v) => descriptor_of(&e.weights, &v.to_string()),
            None if super::reserved(&e.weights) == Some("int8") => descriptor_of(&e.weights, ""),
            None => continue,
        };
        out.insert(
            path.clone(),
            d.map_err(|e| {
                let m = match e.into_kind() {
                    crate::ErrorKind::Layout(m) => m,
                    k => k.to_string(),
                };
                Error::layout(format!("ckptkit.schema: {m}")).with_layer(path.clone())
            })?,
        );
    }
    Ok(out)
}

/// The int8 family's layer detection over one source: the layouts ckptkit's
/// schema records (only that layout is tried for its module, and it must
/// match), else the detection presets (spec/layouts.md §3).
struct Int8Detector<'a> {
    ctx: DetectCtx<'a>,
    recorded: std::collections::BTreeMap<String, Int8Descriptor>,
    /// The stored keys of a recorded layout's parts, by their module: they
    /// belong to it whatever their keys look like.
    owner: std::collections::HashMap<String, String>,
    /// The layouts tried on modules no schema entry describes: the
    /// detection presets.
    presets: Vec<Int8Descriptor>,
}

impl Detector for Int8Detector<'_> {
    fn claim<'k>(&self, key: &'k str) -> Option<&'k str> {
        if let Some(m) = self.owner.get(key) {
            // a recorded module's name is a prefix of its part keys
            return key.get(..m.len()).filter(|p| *p == m.as_str());
        }
        // ckptkit's own int8 layout keeps its parts under `weight.`
        key.strip_suffix(".weight.q")
            .or_else(|| key.strip_suffix(".weight.scale"))
    }

    fn detect(
        &self,
        path: &str,
        claimed: &[&SourceTensor],
        others: &[&SourceTensor],
    ) -> Result<Detected> {
        let all: Vec<&SourceTensor> = claimed.iter().chain(others).copied().collect();
        let entry = self.ctx.schema.and_then(|s| s.get(path));
        let dtype_hint = entry.and_then(|e| Dtype::from_name(&e.dtype));
        if let Some(d) = self.recorded.get(path) {
            // ckptkit's schema says which int8 layout: only that one is tried
            let Some((weight, record, used)) = super::detect(
                self.ctx.src,
                path,
                &all,
                std::slice::from_ref(d),
                dtype_hint,
            )?
            else {
                return Err(self.mismatch(path, d));
            };
            if let Some(e) = entry {
                if (!e.dtype.is_empty() && e.dtype != weight.dtype.to_string())
                    || (!e.shape.is_empty() && e.shape != weight.shape)
                {
                    return Err(Error::layout(format!(
                        "ckptkit.schema records a {} {:?} weight, the stored tensors hold {} {:?}",
                        e.dtype, e.shape, weight.dtype, weight.shape
                    ))
                    .with_layer(path.to_string()));
                }
            }
            return Ok(Detected::Found {
                weight,
                record,
                used,
            });
        }
        Ok(
            match super::detect(self.ctx.src, path, &all, &self.presets, dtype_hint)? {
                Some((weight, record, used)) => Detected::Found {
                    weight,
                    record,
                    used,
                },
                None => Detected::NotMine,
            },
        )
    }

    fn insists(&self, path: &str) -> Option<Error> {
        self.recorded.get(path).map(|d| self.mismatch(path, d))
    }
}

impl Int8Detector<'_> {
    fn mismatch(&self, path: &str, d: &Int8Descriptor) -> Error {
        Error::layout(format!(
            "ckptkit.schema records int8 layout `{}` for this layer, but its stored tensors do \
             not match it (the layout stores {})",
            d.name,
            d.part_keys()
                .iter()
                .map(|k| format!("`{}`", Int8Descriptor::key(path, k)))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .with_layer(path.to_string())
    }
}

/// The descriptor of an int8 record (a preset exactly, or a valid user
/// descriptor carrying its name).
fn descriptor(w: &WeightQuant) -> Option<Result<Int8Descriptor>> {
    match w {
        WeightQuant::Int8 { layout, descriptor } => Some(descriptor_of(layout, descriptor)),
        _ => None,
    }
}

fn descriptor_or_err(w: &WeightQuant) -> Result<Int8Descriptor> {
    descriptor(w).unwrap_or_else(|| Err(Error::layout("not an int8 layer record")))
}

/// The record of a descriptor: a built-in preset is recorded by its name
/// alone, a user layout with its canonical JSON.
pub(crate) fn record_of(d: &Int8Descriptor) -> WeightQuant {
    WeightQuant::Int8 {
        layout: d.name.clone(),
        descriptor: if is_builtin(d) {
            String::new()
        } else {
            d.to_json()
        },
    }
}

fn form(d: &Int8Descriptor, scale_dtype: Dtype) -> CodeForm {
    CodeForm {
        name: d.name.clone(),
        value: d.scale.value,
        granularity: d.scale.granularity,
        range: d.range,
        scale_dtype,
        zero_point: d.zero_point.is_some(),
        code: Dtype::I8,
    }
}

impl Family for Int8 {
    fn detector<'a>(&self, ctx: &DetectCtx<'a>) -> Result<Option<Box<dyn Detector + 'a>>> {
        let recorded = recorded(ctx.schema)?;
        let owner = recorded
            .iter()
            .flat_map(|(path, d)| {
                d.part_keys()
                    .into_iter()
                    .map(move |k| (Int8Descriptor::key(path, k), path.clone()))
            })
            .collect();
        Ok(Some(Box::new(Int8Detector {
            ctx: DetectCtx {
                src: ctx.src,
                schema: ctx.schema,
                hints: ctx.hints,
            },
            recorded,
            owner,
            presets: super::detection_presets(),
        })))
    }

    fn name(&self) -> &'static str {
        "int8"
    }

    fn owns(&self, w: &WeightQuant) -> bool {
        matches!(w, WeightQuant::Int8 { .. })
    }

    fn label(&self, w: &WeightQuant) -> String {
        match w {
            WeightQuant::Int8 { layout, .. } => layout.clone(),
            _ => "int8".into(),
        }
    }

    fn check_record(&self, w: &WeightQuant) -> Result<()> {
        descriptor(w).transpose().map(|_| ())
    }

    fn check_layer(&self, l: &Layer) -> Result<()> {
        let at = |e: Error| e.with_layer(l.path.clone());
        let d = descriptor_or_err(&l.quant.weights).map_err(at)?;
        let w = quantized_weight(l).map_err(at)?;
        if w.shape.len() != 2 {
            return Err(at(Error::layout(format!(
                "int8 layouts describe 2-D weights; this one is {:?}",
                w.shape
            ))));
        }
        let (p, sc, z) = d.shapes(w.shape[0], w.shape[1]).map_err(at)?;
        expect_part(l, w, Role::Data, &p)?;
        expect_part(l, w, Role::Scale, &sc)?;
        if d.zero_point.is_some() {
            expect_part(l, w, Role::ZeroPoint, &z)?;
        }
        Ok(())
    }

    fn parse_target(&self, s: &str) -> Option<Result<WeightQuant>> {
        (s == "int8" || s.starts_with("int8:")).then(|| preset(s).map(|d| record_of(&d)))
    }

    fn spellings(&self) -> &'static str {
        "int8, int8:bnb, int8:ct[:group=N][:int-quantized], int8:PATH.json"
    }

    fn takes_float(&self, l: &Layer) -> bool {
        weight_of(l).is_ok_and(|w| {
            w.shape.len() == 2 && w.dtype.is_filterable_float() && w.shape.iter().all(|&d| d > 0)
        })
    }

    fn takes(&self, l: &Layer) -> bool {
        // int8 layouts describe 2-D (Linear) weights; others are kept
        weight_of(l).is_ok_and(|w| w.shape.len() == 2)
    }

    fn code_form(&self, l: &Layer) -> Option<CodeForm> {
        let d = descriptor(&l.quant.weights)?.ok()?;
        let w = quantized_weight(l).ok()?;
        let scale = w.parts.iter().find(|p| p.role == Role::Scale)?;
        Some(form(&d, scale.dtype))
    }

    fn target_form(&self, target: &WeightQuant, model: Dtype) -> Option<CodeForm> {
        let d = descriptor(target)?.ok()?;
        Some(form(&d, d.scale_dtype(model)))
    }

    fn plan_into(&self, l: &Layer, target: &WeightQuant, ctx: &PlanCtx<'_>) -> Result<Planned> {
        let d = descriptor_or_err(target).map_err(|e| e.with_layer(l.path.clone()))?;
        if descriptor(&l.quant.weights).and_then(|r| r.ok()).as_ref() == Some(&d) {
            return Ok(Planned::keep(l));
        }
        let w = weight_of(l)?;
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
        let to = form(&d, d.scale_dtype(w.dtype));
        // per-row scales carry over to per-row ones and to groups that divide
        // the rows (each group taking its row's scale); groups to equal groups
        let from = ctx
            .source
            .code_form(l)
            .filter(|f| f.carries_to(&to) || f.regroups_to(&to, &w.shape));
        match from {
            Some(from) => {
                passes.push(Pass::Relayout {
                    from: from.name.clone(),
                    to: d.name.clone(),
                    same_floats: from.same_floats(&to),
                    may_lose: from.may_lose_to(&to),
                });
                lossless = true; // checked on the data at execution
            }
            None => {
                if w.encoding.is_quantized() {
                    passes.push(Pass::Dequantize {
                        qtype: ctx.source.label(&l.quant.weights),
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
        let k = |x: &str| Int8Descriptor::key(&l.path, x);
        let mut parts = vec![
            out_part(
                Role::Data,
                k(&d.payload.key),
                super::payload_dtype(&d),
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
        // buffers of the source's family (quanto's activation scales) have
        // no meaning in an int8 layout: the weight stays byte-reversible,
        // and converting back re-adds them (calibrated values are not kept)
        let extra = ctx.source.extra_buffers();
        for t in &l.tensors {
            if t.name == "weight" {
                continue;
            }
            if extra.contains(&t.name.as_str()) {
                if !passes.contains(&Pass::DropActivationScales) {
                    passes.push(Pass::DropActivationScales);
                }
                continue;
            }
            tensors.push(plain_logical(&l.path, &t.name, t.dtype, t.shape.clone()));
        }
        let output = Layer {
            path: l.path.clone(),
            quant: Quantization {
                weights: record_of(&d),
                activations: None,
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
        let d = descriptor_or_err(&l.quant.weights).map_err(|e| e.with_layer(l.path.clone()))?;
        let (o, i) = (w.shape[0], w.shape.get(1).copied().unwrap_or(1));
        let dp = part(l, w, Role::Data)?;
        let sp = part(l, w, Role::Scale)?;
        let data = src.read(&dp.key)?;
        Ok(Codes {
            q: super::payload_values(&d, &data, o, i)?,
            scale: src.read(&sp.key)?.into_vec(),
            value: d.scale.value,
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
        let d = descriptor_or_err(&l.quant.weights).map_err(|e| e.with_layer(l.path.clone()))?;
        let v = self.read_codes(src, l, w)?;
        let zp = match w.parts.iter().find(|p| p.role == Role::ZeroPoint) {
            Some(p) => Some(src.read(&p.key)?.iter().map(|&b| b as i8).collect()),
            None => None,
        };
        let qw = super::Int8Weight {
            q: v.q,
            scale: v.scale,
            zero_point: zp,
        };
        super::dequantize(&d, w.shape[0], w.shape[1], &qw, v.dtype, to)
    }

    fn produce(
        &self,
        record: &WeightQuant,
        path: &str,
        t: &LogicalTensor,
        input: WeightInput<'_>,
    ) -> Result<Vec<(String, TensorBytes)>> {
        let d = descriptor_or_err(record)?;
        let (o, i) = (t.shape[0], t.shape[1]);
        let (q, scale, zp) = match input {
            WeightInput::Codes(c) => (c.q, c.scale, None),
            WeightInput::Float(float) => {
                let qw = super::quantize(&d, t.dtype, o, i, float)
                    .map_err(|e| e.with_layer(path.to_string()))?;
                (qw.q, qw.scale, qw.zero_point)
            }
        };
        let mut out = Vec::with_capacity(t.parts.len());
        for p in &t.parts {
            let b = match &p.role {
                Role::Data => super::payload_bytes(&d, &q, o, i),
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
                    let c = d
                        .constants
                        .iter()
                        .find(|c| &c.key == name)
                        .ok_or_else(|| Error::layout(format!("unknown part `{name}`")))?;
                    super::const_bytes(c)
                }
                _ => return Err(Error::layout("unexpected role")),
            };
            out.push((p.key.clone(), TensorBytes::Owned(b)));
        }
        Ok(out)
    }

    fn quantization_config(
        &self,
        record: &WeightQuant,
        _owner: ConfigOwner,
        skip: &[String],
    ) -> Option<Option<serde_json::Value>> {
        let WeightQuant::Int8 { layout, .. } = record else {
            return None;
        };
        super::library_config(layout, skip).map(Some)
    }

    fn schema_entry(
        &self,
        record: &WeightQuant,
    ) -> Option<(String, Option<u64>, Option<serde_json::Value>)> {
        match record {
            WeightQuant::Int8 { layout, descriptor } => Some((
                layout.clone(),
                None,
                (!descriptor.is_empty())
                    .then(|| serde_json::from_str(descriptor).ok())
                    .flatten(),
            )),
            _ => None,
        }
    }

    fn config_methods(&self) -> &'static [&'static str] {
        &["compressed-tensors", "bitsandbytes"]
    }
}

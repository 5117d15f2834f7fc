//! The ComfyUI family's seam (`layout::family::Family`).

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::format::manifest::{Encoding, Layer, LogicalTensor, Quantization, Role, WeightQuant};
use crate::io::source::TensorSource;
use crate::io::TensorBytes;
use crate::layout::family::{
    out_part, part, plain_logical, quantized_weight, weight_of, Codes, DetectCtx, Detector, Family,
    Pass, PlanCtx, Planned, WeightInput,
};

use super::{code_dtype, format_name, math, Format, MARKER, METADATA_KEY, NAME, SCALE};

/// ComfyUI's `comfy_quant` family.
pub(crate) struct Comfy;

/// Buffers of a ComfyUI layer that a plain layer has no use for.
const INPUT_SCALE: [&str; 1] = ["input_scale"];

fn float_model_dtype(d: Dtype) -> bool {
    matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32)
}

impl Family for Comfy {
    fn name(&self) -> &'static str {
        NAME
    }

    fn owns(&self, w: &WeightQuant) -> bool {
        matches!(w, WeightQuant::Family { name, .. } if name == NAME)
    }

    fn label(&self, w: &WeightQuant) -> String {
        match Format::of(w) {
            Ok(f) => format!("comfy:{}", format_name(f.kind)),
            Err(_) => NAME.into(),
        }
    }

    fn check_layer(&self, l: &Layer) -> Result<()> {
        let f = Format::of(&l.quant.weights).map_err(|e| e.with_layer(l.path.clone()))?;
        let w = quantized_weight(l).map_err(|e| e.with_layer(l.path.clone()))?;
        let q = part(l, w, Role::Data)?;
        let s = part(l, w, Role::Scale)?;
        if q.dtype != code_dtype(f.kind)
            || q.shape != w.shape
            || w.shape.len() != 2
            || !float_model_dtype(s.dtype)
            || crate::dtype::numel(&s.shape)? != 1
            || !float_model_dtype(w.dtype)
        {
            return Err(Error::layout(format!(
                "a ComfyUI {} weight is {} [out, in] codes with a one-element float scale; this \
                 record has {} {:?} codes, a {} {:?} scale, a {} {:?} weight",
                format_name(f.kind),
                code_dtype(f.kind),
                q.dtype,
                q.shape,
                s.dtype,
                s.shape,
                w.dtype,
                w.shape
            ))
            .with_layer(l.path.clone()));
        }
        Ok(())
    }

    fn parse_target(&self, s: &str) -> Option<Result<WeightQuant>> {
        let rest = s.strip_prefix("comfy:")?;
        Some(
            super::fp8_format(rest)
                .map(|kind| {
                    Format {
                        kind,
                        full_precision: false,
                    }
                    .record()
                })
                .ok_or_else(|| {
                    Error::usage(format!(
                        "unknown ComfyUI layout `{s}`: comfy:float8_e4m3fn or comfy:float8_e5m2"
                    ))
                }),
        )
    }

    fn spellings(&self) -> &'static str {
        "comfy:float8_e4m3fn|float8_e5m2"
    }

    fn takes_float(&self, l: &Layer) -> bool {
        weight_of(l).is_ok_and(|w| {
            w.shape.len() == 2 && float_model_dtype(w.dtype) && !w.encoding.is_quantized()
        })
    }

    fn takes(&self, l: &Layer) -> bool {
        weight_of(l).is_ok_and(|w| w.shape.len() == 2 && float_model_dtype(w.dtype))
    }

    fn plan_into(&self, l: &Layer, target: &WeightQuant, ctx: &PlanCtx<'_>) -> Result<Planned> {
        let f = Format::of(target).map_err(|e| e.with_layer(l.path.clone()))?;
        if self.owns(&l.quant.weights) && Format::of(&l.quant.weights).ok().as_ref() == Some(&f) {
            return Ok(Planned::keep(l));
        }
        let w = weight_of(l)?;
        if w.shape.len() != 2 || !float_model_dtype(w.dtype) {
            return Err(Error::layout(format!(
                "ComfyUI quantizes Linear weights ([out, in], BF16, F16 or F32); this one is {} {:?}",
                w.dtype, w.shape
            ))
            .with_layer(l.path.clone()));
        }
        let mut passes = Vec::new();
        if w.encoding.is_quantized() {
            passes.push(Pass::Dequantize {
                qtype: ctx.source.label(&l.quant.weights),
                dtype: w.dtype.to_string(),
            });
        }
        passes.push(Pass::Quantize {
            qtype: format!("comfy:{}", format_name(f.kind)),
            group_size: None,
        });
        let key = |s: &str| crate::layout::family::key(&l.path, s);
        let marker = f.marker_json();
        let mut tensors = vec![LogicalTensor {
            name: "weight".into(),
            dtype: w.dtype,
            shape: w.shape.clone(),
            encoding: Encoding::Quantized,
            parts: vec![
                out_part(
                    Role::Data,
                    key("weight"),
                    code_dtype(f.kind),
                    w.shape.clone(),
                ),
                out_part(Role::Scale, key(SCALE), Dtype::F32, Vec::new()),
                out_part(
                    Role::Other(MARKER.into()),
                    key(MARKER),
                    Dtype::U8,
                    vec![marker.len() as u64],
                ),
            ],
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
        Ok(Planned {
            output: Layer {
                path: l.path.clone(),
                quant: Quantization {
                    weights: f.record(),
                    activations: None,
                },
                tensors,
                extensions: Vec::new(),
            },
            passes,
            lossless: false,
        })
    }

    fn read_codes(&self, _src: &dyn TensorSource, l: &Layer, _w: &LogicalTensor) -> Result<Codes> {
        Err(Error::layout(
            "ComfyUI FP8 codes are not carried into other layouts yet: dequantize to plain first",
        )
        .with_layer(l.path.clone()))
    }

    fn dequantize(
        &self,
        src: &dyn TensorSource,
        l: &Layer,
        w: &LogicalTensor,
        to: Dtype,
    ) -> Result<Vec<u8>> {
        let f = Format::of(&l.quant.weights).map_err(|e| e.with_layer(l.path.clone()))?;
        let qp = part(l, w, Role::Data)?;
        let sp = part(l, w, Role::Scale)?;
        let q = src.read(&qp.key)?;
        let s = src.read(&sp.key)?;
        let s = *math::widen(sp.dtype, &s)?
            .first()
            .ok_or_else(|| Error::layout("empty scale").with_tensor(sp.key.clone()))?;
        if !float_model_dtype(to) {
            return Err(Error::layout(format!(
                "a ComfyUI weight dequantizes to BF16, F16 or F32, not {to}"
            ))
            .with_layer(l.path.clone()));
        }
        math::dequantize(f.kind, &q, s, to).map_err(|e| e.with_layer(l.path.clone()))
    }

    fn produce(
        &self,
        record: &WeightQuant,
        path: &str,
        t: &LogicalTensor,
        input: WeightInput<'_>,
    ) -> Result<Vec<(String, TensorBytes)>> {
        let f = Format::of(record).map_err(|e| e.with_layer(path.to_string()))?;
        let WeightInput::Float(float) = input else {
            return Err(
                Error::layout("ComfyUI FP8 takes no codes from other layouts yet")
                    .with_layer(path.to_string()),
            );
        };
        let x = math::widen(t.dtype, float).map_err(|e| e.with_layer(path.to_string()))?;
        let s = math::scale_of(t.dtype, f.kind, &x).map_err(|e| e.with_layer(path.to_string()))?;
        let mut q = Some(math::quantize(t.dtype, f.kind, &x, s));
        let mut out = Vec::with_capacity(3);
        for p in &t.parts {
            let b = match &p.role {
                Role::Data => q.take().unwrap_or_default(),
                Role::Scale => s.to_le_bytes().to_vec(),
                Role::Other(n) if n == MARKER => f.marker_json().into_bytes(),
                r => {
                    return Err(Error::layout(format!("a ComfyUI weight has no {r:?} part"))
                        .with_layer(path.to_string()))
                }
            };
            out.push((p.key.clone(), TensorBytes::Owned(b)));
        }
        Ok(out)
    }

    fn extra_buffers(&self) -> &'static [&'static str] {
        &INPUT_SCALE
    }

    fn metadata(&self, layers: &[&Layer]) -> Vec<(&'static str, Option<String>)> {
        // ComfyUI takes `_quantization_metadata` over the per-layer markers:
        // it is written only when a layer kept from the input has no marker
        // (it came through the metadata), and then names every ComfyUI layer;
        // otherwise a stale one is removed
        let mine: Vec<(&Layer, Format)> = layers
            .iter()
            .filter(|l| self.owns(&l.quant.weights))
            .filter_map(|l| Format::of(&l.quant.weights).ok().map(|f| (*l, f)))
            .collect();
        let unmarked = mine.iter().any(|(l, _)| {
            quantized_weight(l)
                .map(|w| !w.parts.iter().any(|p| p.role == Role::Other(MARKER.into())))
                .unwrap_or(false)
        });
        if !unmarked {
            return vec![(METADATA_KEY, None)];
        }
        let layers: serde_json::Map<String, serde_json::Value> = mine
            .iter()
            .map(|(l, f)| {
                let v: serde_json::Value =
                    serde_json::from_str(&f.marker_json()).unwrap_or_default();
                (l.path.clone(), v)
            })
            .collect();
        let v = serde_json::json!({"format_version": "1.0", "layers": layers});
        vec![(METADATA_KEY, Some(v.to_string()))]
    }

    fn detector<'a>(&self, ctx: &DetectCtx<'a>) -> Result<Option<Box<dyn Detector + 'a>>> {
        Ok(Some(Box::new(super::ComfyDetector::new(ctx.src)?)))
    }
}

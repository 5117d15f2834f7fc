//! A toy layout family, compiled only for the crate's own tests: it proves
//! that a family plugs in through its folder and one registry line, with
//! nothing else in the crate naming it.
//!
//! The layout: a 2-D BF16 or F32 weight `m.weight` is stored as
//! `m.weight.toy_q` (I8, the weight's shape) and `m.weight.toy_scale` (the
//! weight's dtype, shape `[]`), with `scale = absmax / 127` and `q =
//! round_half_even(w / scale)`; it dequantizes to `q * scale` computed in
//! f32 and rounded to the weight's dtype. Its layer record is the container
//! 2.0 family record `toy` with no parameters.

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::format::manifest::{Encoding, Layer, LogicalTensor, Quantization, Role, WeightQuant};
use crate::io::source::{SourceTensor, TensorSource};
use crate::io::TensorBytes;
use crate::layout::family::{
    out_part, part, plain_logical, quantized_weight, weight_of, Codes, DetectCtx, Detected,
    Detector, Family, Pass, PlanCtx, Planned, WeightInput,
};

/// The toy family.
pub(crate) struct Toy;

const NAME: &str = "toy";
const Q: &str = "toy_q";
const SCALE: &str = "toy_scale";

fn record() -> WeightQuant {
    WeightQuant::Family {
        name: NAME.into(),
        params: Vec::new(),
    }
}

fn to_f32(dt: Dtype, b: &[u8]) -> Result<Vec<f32>> {
    match dt {
        Dtype::BF16 => Ok(b
            .chunks_exact(2)
            .map(|c| crate::float::f32_from_bf16_bits(u16::from_le_bytes([c[0], c[1]])))
            .collect()),
        Dtype::F32 => Ok(b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        d => Err(Error::layout(format!(
            "the toy layout holds BF16 or F32 weights, not {d}"
        ))),
    }
}

fn from_f32(dt: Dtype, v: &[f32]) -> Vec<u8> {
    match dt {
        Dtype::BF16 => v
            .iter()
            .flat_map(|&x| crate::float::bf16_bits_from_f32(x).to_le_bytes())
            .collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Quantizes float weights: (codes, scale in the weight's dtype).
pub(crate) fn quantize(dt: Dtype, float: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let w = to_f32(dt, float)?;
    let absmax = w.iter().fold(0f32, |m, x| m.max(x.abs()));
    // the scale as stored, so that dequantizing uses exactly it
    let scale = to_f32(dt, &from_f32(dt, &[absmax / 127.0]))?[0];
    let q = w
        .iter()
        .map(|&x| {
            if scale == 0.0 {
                0
            } else {
                (x / scale).round_ties_even().clamp(-127.0, 127.0) as i8 as u8
            }
        })
        .collect();
    Ok((q, from_f32(dt, &[scale])))
}

/// Dequantizes codes with their stored scale, to the weight's dtype.
pub(crate) fn dequantize(dt: Dtype, q: &[u8], scale: &[u8]) -> Result<Vec<u8>> {
    let s = *to_f32(dt, scale)?
        .first()
        .ok_or_else(|| Error::layout("empty toy scale"))?;
    let v: Vec<f32> = q.iter().map(|&c| c as i8 as f32 * s).collect();
    Ok(from_f32(dt, &v))
}

struct ToyDetector;

impl Detector for ToyDetector {
    fn claim<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_suffix(".weight.toy_q")
            .or_else(|| key.strip_suffix(".weight.toy_scale"))
    }

    fn detect(
        &self,
        path: &str,
        claimed: &[&SourceTensor],
        _others: &[&SourceTensor],
    ) -> Result<Detected> {
        let find = |s: &str| {
            let k = format!("{path}.weight.{s}");
            claimed.iter().find(|t| t.key == k).copied()
        };
        let (Some(q), Some(s)) = (find(Q), find(SCALE)) else {
            return Ok(Detected::NotMine);
        };
        if q.dtype != Dtype::I8 || !s.shape.is_empty() || q.shape.len() != 2 {
            return Err(Error::layout(format!(
                "a toy weight is I8 codes of a 2-D shape and a scalar scale; this one has {} {:?} \
                 and a {:?} scale",
                q.dtype, q.shape, s.shape
            ))
            .with_layer(path.to_string()));
        }
        Ok(Detected::Found {
            weight: LogicalTensor {
                name: "weight".into(),
                dtype: s.dtype,
                shape: q.shape.clone(),
                encoding: Encoding::Quantized,
                parts: vec![
                    out_part(Role::Data, q.key.clone(), q.dtype, q.shape.clone()),
                    out_part(Role::Scale, s.key.clone(), s.dtype, Vec::new()),
                ],
            },
            record: record(),
            used: vec![q.key.clone(), s.key.clone()],
        })
    }
}

impl Family for Toy {
    fn name(&self) -> &'static str {
        NAME
    }

    fn owns(&self, w: &WeightQuant) -> bool {
        matches!(w, WeightQuant::Family { name, .. } if name == NAME)
    }

    fn label(&self, _w: &WeightQuant) -> String {
        NAME.into()
    }

    fn check_layer(&self, l: &Layer) -> Result<()> {
        let WeightQuant::Family { params, .. } = &l.quant.weights else {
            return Err(Error::layout("not a toy record").with_layer(l.path.clone()));
        };
        if !params.is_empty() {
            return Err(
                Error::layout("the toy family takes no parameters").with_layer(l.path.clone())
            );
        }
        quantized_weight(l).map(|_| ())
    }

    fn parse_target(&self, s: &str) -> Option<Result<WeightQuant>> {
        (s == NAME).then(|| Ok(record()))
    }

    fn spellings(&self) -> &'static str {
        "toy"
    }

    fn takes_float(&self, l: &Layer) -> bool {
        weight_of(l).is_ok_and(|w| {
            w.shape.len() == 2
                && matches!(w.dtype, Dtype::BF16 | Dtype::F32)
                && !w.encoding.is_quantized()
        })
    }

    fn takes(&self, l: &Layer) -> bool {
        weight_of(l).is_ok_and(|w| w.shape.len() == 2)
    }

    fn plan_into(&self, l: &Layer, _target: &WeightQuant, ctx: &PlanCtx<'_>) -> Result<Planned> {
        if self.owns(&l.quant.weights) {
            return Ok(Planned::keep(l));
        }
        let w = weight_of(l)?;
        if w.shape.len() != 2 || !matches!(w.dtype, Dtype::BF16 | Dtype::F32) {
            return Err(Error::layout(format!(
                "the toy layout takes 2-D BF16 or F32 weights; this one is {} {:?}",
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
            qtype: NAME.into(),
            group_size: None,
        });
        let key = |s: &str| format!("{}.weight.{s}", l.path);
        let mut tensors = vec![LogicalTensor {
            name: "weight".into(),
            dtype: w.dtype,
            shape: w.shape.clone(),
            encoding: Encoding::Quantized,
            parts: vec![
                out_part(Role::Data, key(Q), Dtype::I8, w.shape.clone()),
                out_part(Role::Scale, key(SCALE), w.dtype, Vec::new()),
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
                    weights: record(),
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
        Err(Error::layout("the toy family exchanges no codes").with_layer(l.path.clone()))
    }

    fn dequantize(
        &self,
        src: &dyn TensorSource,
        l: &Layer,
        w: &LogicalTensor,
        to: Dtype,
    ) -> Result<Vec<u8>> {
        let q = src.read(&part(l, w, Role::Data)?.key)?;
        let s = src.read(&part(l, w, Role::Scale)?.key)?;
        let v = dequantize(w.dtype, &q, &s).map_err(|e| e.with_layer(l.path.clone()))?;
        match to {
            t if t == w.dtype => Ok(v),
            // widening BF16 to F32 is exact
            Dtype::F32 => Ok(from_f32(Dtype::F32, &to_f32(w.dtype, &v)?)),
            t => Err(Error::layout(format!(
                "the toy layout dequantizes to its dtype or F32, not {t}"
            ))
            .with_layer(l.path.clone())),
        }
    }

    fn produce(
        &self,
        _record: &WeightQuant,
        path: &str,
        t: &LogicalTensor,
        input: WeightInput<'_>,
    ) -> Result<Vec<(String, TensorBytes)>> {
        let WeightInput::Float(float) = input else {
            return Err(
                Error::layout("the toy family exchanges no codes").with_layer(path.to_string())
            );
        };
        let (q, s) = quantize(t.dtype, float).map_err(|e| e.with_layer(path.to_string()))?;
        let mut out = Vec::new();
        for p in &t.parts {
            let b = match p.role {
                Role::Data => q.clone(),
                Role::Scale => s.clone(),
                _ => return Err(Error::layout("unexpected toy part").with_layer(path.to_string())),
            };
            out.push((p.key.clone(), TensorBytes::Owned(b)));
        }
        Ok(out)
    }

    fn detector<'a>(&self, _ctx: &DetectCtx<'a>) -> Result<Option<Box<dyn Detector + 'a>>> {
        Ok(Some(Box::new(ToyDetector)))
    }
}

#[cfg(test)]
mod tests;

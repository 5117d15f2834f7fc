//! Plain float (and other unquantized) layers: the pivot every family
//! dequantizes to and quantizes from (spec/layouts.md §1).

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::format::manifest::{Layer, LogicalTensor, Quantization, WeightQuant};
use crate::io::source::TensorSource;
use crate::io::TensorBytes;
use crate::layout::family::{
    plain_logical, Codes, Family, Pass, PlanCtx, Planned, WeightInput, ACT_SCALES,
};

/// The plain family.
pub(crate) struct Plain;

/// Plans a layer (of any family) to plain: quantized weights dequantized
/// exactly as their library does, float tensors optionally cast, the
/// source family's own buffers (quanto's activation scales) dropped.
pub(crate) fn to_plain(l: &Layer, dt: Option<Dtype>, source: &dyn Family) -> Result<Planned> {
    let mut passes = Vec::new();
    let mut lossless = true;
    let mut tensors = Vec::new();
    let extra = source.extra_buffers();
    for t in &l.tensors {
        let name = t.name.as_str();
        // a module whose activations quanto quantizes carries the buffers too
        if extra.contains(&name) || (l.quant.activations.is_some() && ACT_SCALES.contains(&name)) {
            if !passes.contains(&Pass::DropActivationScales) {
                passes.push(Pass::DropActivationScales);
            }
            lossless = false;
            continue;
        }
        let mut dtype = t.dtype;
        if t.encoding.is_quantized() {
            if l.quant.weights == WeightQuant::Plain {
                return Err(Error::layout("quantized tensor without a layout record")
                    .with_layer(l.path.clone()));
            }
            passes.push(Pass::Dequantize {
                qtype: source.label(&l.quant.weights),
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
    Ok(Planned {
        output,
        passes,
        lossless,
    })
}

fn not_quantized(l: &Layer) -> Error {
    Error::layout("a plain layer has no quantized weight").with_layer(l.path.clone())
}

impl Family for Plain {
    fn name(&self) -> &'static str {
        "plain"
    }

    fn owns(&self, w: &WeightQuant) -> bool {
        *w == WeightQuant::Plain
    }

    fn weights_name(&self, l: &Layer) -> String {
        let d = l
            .tensors
            .iter()
            .find(|t| t.name == "weight")
            .or(l.tensors.first())
            .map(|t| t.dtype.to_string())
            .unwrap_or_default();
        format!("plain {d}")
    }

    fn label(&self, _w: &WeightQuant) -> String {
        "plain".into()
    }

    fn check_layer(&self, _l: &Layer) -> Result<()> {
        Ok(())
    }

    fn parse_target(&self, _s: &str) -> Option<Result<WeightQuant>> {
        // `plain[:dtype]` is the planner's own target (it casts too)
        None
    }

    fn spellings(&self) -> &'static str {
        ""
    }

    fn takes_float(&self, _l: &Layer) -> bool {
        true
    }

    fn takes(&self, _l: &Layer) -> bool {
        true
    }

    fn plan_into(&self, l: &Layer, _target: &WeightQuant, ctx: &PlanCtx<'_>) -> Result<Planned> {
        to_plain(l, None, ctx.source)
    }

    fn read_codes(&self, _src: &dyn TensorSource, l: &Layer, _w: &LogicalTensor) -> Result<Codes> {
        Err(not_quantized(l))
    }

    fn dequantize(
        &self,
        _src: &dyn TensorSource,
        l: &Layer,
        _w: &LogicalTensor,
        _to: Dtype,
    ) -> Result<Vec<u8>> {
        Err(not_quantized(l))
    }

    fn produce(
        &self,
        _record: &WeightQuant,
        path: &str,
        _t: &LogicalTensor,
        _input: WeightInput<'_>,
    ) -> Result<Vec<(String, TensorBytes)>> {
        Err(Error::layout("quantized output without a layout record").with_layer(path.to_string()))
    }
}

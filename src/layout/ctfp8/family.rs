//! The compressed-tensors FP8 family's seam (`layout::family::Family`).

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::format::manifest::{Layer, LogicalTensor, Role, WeightQuant};
use crate::io::source::TensorSource;
use crate::io::TensorBytes;
use crate::layout::family::{
    byte_codes, carried_bytes, carry_or_quantize, out_part, part, part_bytes, quantized_layer,
    quantized_weight, usize_of, weight_of, CodeForm, Codes, ConfigOwner, DetectCtx, Detector,
    Family, Granularity, Pass, PlanCtx, Planned, ScaleValue, WeightInput,
};

use super::{math, CtFp8Config, CtFp8Detector, Format, METHOD, NAME, SCALE};

/// The compressed-tensors FP8 family.
pub(crate) struct CtFp8;

/// Buffers of a compressed-tensors FP8 layer a plain layer has no use
/// for: static activation scales.
const ACTIVATION_SCALE: [&str; 2] = ["input_scale", "input_zero_point"];

fn float_model_dtype(d: Dtype) -> bool {
    matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32)
}

/// The code form of a compressed-tensors FP8 layout: FP8 codes carried as
/// their bit patterns, one plain multiplier per tensor, row, group or tile.
fn form(f: &Format, scale_dtype: Dtype) -> CodeForm {
    CodeForm {
        name: f.spelling(),
        value: ScaleValue::Scale,
        granularity: match f.strategy {
            super::Strategy::Tensor => Granularity::Tensor,
            super::Strategy::Channel => Granularity::Channel,
            super::Strategy::Group(g) => Granularity::Group(g),
            super::Strategy::Block(b) => Granularity::Block(b),
        },
        range: [-128, 127],
        scale_dtype,
        zero_point: false,
        code: Dtype::F8E4M3,
    }
}

impl Family for CtFp8 {
    fn code_form(&self, l: &Layer) -> Option<CodeForm> {
        let f = Format::of(&l.quant.weights).ok()?;
        let w = quantized_weight(l).ok()?;
        let s = w.parts.iter().find(|p| p.role == Role::Scale)?;
        Some(form(&f, s.dtype))
    }

    fn target_form(&self, target: &WeightQuant, model: Dtype) -> Option<CodeForm> {
        float_model_dtype(model).then_some(())?;
        Some(form(&Format::of(target).ok()?, model))
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn owns(&self, w: &WeightQuant) -> bool {
        matches!(w, WeightQuant::Family { name, .. } if name == NAME)
    }

    fn label(&self, w: &WeightQuant) -> String {
        match Format::of(w) {
            Ok(f) => f.spelling(),
            Err(_) => NAME.into(),
        }
    }

    fn check_layer(&self, l: &Layer) -> Result<()> {
        let f = Format::of(&l.quant.weights).map_err(|e| e.with_layer(l.path.clone()))?;
        let w = quantized_weight(l).map_err(|e| e.with_layer(l.path.clone()))?;
        let q = part(l, w, Role::Data)?;
        let s = part(l, w, Role::Scale)?;
        let ok = match w.shape.as_slice() {
            [o, i] => {
                q.dtype == Dtype::F8E4M3
                    && q.shape == w.shape
                    && float_model_dtype(s.dtype)
                    && f.strategy.fits(*o, *i)
                    && s.shape == f.strategy.scale_shape(*o, *i)
                    && float_model_dtype(w.dtype)
            }
            _ => false,
        };
        if !ok {
            return Err(Error::layout(format!(
                "a compressed-tensors FP8 ({}) weight is F8_E4M3 [out, in] codes with BF16, F16 \
                 or F32 scales of the strategy's shape; this record has {} {:?} codes, a {} {:?} \
                 scale, a {} {:?} weight",
                f.spelling(),
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
        if !s.starts_with("fp8:ct") {
            return None;
        }
        Some(Format::parse(s).map(|f| f.record()).ok_or_else(|| {
            Error::usage(format!(
                "unknown compressed-tensors FP8 layout `{s}`: {}",
                self.spellings()
            ))
        }))
    }

    fn spellings(&self) -> &'static str {
        "fp8:ct:tensor|channel|group=N|block=RxC[:float-quantized]"
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
        if self.owns(&l.quant.weights) && Format::of(&l.quant.weights).ok() == Some(f) {
            return Ok(Planned::keep(l));
        }
        let w = weight_of(l)?;
        let fits = match w.shape.as_slice() {
            [o, i] => f.strategy.fits(*o, *i),
            _ => false,
        };
        if !fits || !float_model_dtype(w.dtype) {
            return Err(Error::layout(format!(
                "compressed-tensors FP8 ({}) quantizes Linear weights ([out, in], BF16, F16 or \
                 F32; a group must divide the row); this one is {} {:?}",
                f.spelling(),
                w.dtype,
                w.shape
            ))
            .with_layer(l.path.clone()));
        }
        let (passes, lossless) = carry_or_quantize(
            self,
            l,
            w,
            target,
            ctx,
            Pass::Quantize {
                qtype: f.spelling(),
                group_size: None,
            },
        );
        let key = |s: &str| crate::layout::family::key(&l.path, s);
        let parts = vec![
            out_part(Role::Data, key("weight"), Dtype::F8E4M3, w.shape.clone()),
            // compressed-tensors keeps the scale in the model's dtype
            out_part(
                Role::Scale,
                key(SCALE),
                w.dtype,
                f.strategy.scale_shape(w.shape[0], w.shape[1]),
            ),
        ];
        Ok(quantized_layer(
            l,
            w,
            f.record(),
            parts,
            ctx,
            passes,
            lossless,
        ))
    }

    fn read_codes(&self, src: &dyn TensorSource, l: &Layer, w: &LogicalTensor) -> Result<Codes> {
        byte_codes(src, l, w)
    }

    fn dequantize(
        &self,
        src: &dyn TensorSource,
        l: &Layer,
        w: &LogicalTensor,
        to: Dtype,
    ) -> Result<Vec<u8>> {
        let at = |e: Error| e.with_layer(l.path.clone());
        let f = Format::of(&l.quant.weights).map_err(at)?;
        let qp = part(l, w, Role::Data)?;
        let sp = part(l, w, Role::Scale)?;
        let (o, i) = (w.shape[0], w.shape[1]);
        let [n, k] = [usize_of(o)?, usize_of(i)?];
        let b = f.strategy.block(o, i);
        let block = [usize_of(b[0])?, usize_of(b[1])?];
        let s = math::scales(sp.dtype, &src.read(&sp.key)?, k.div_ceil(block[1]))
            .map_err(|e| at(e).with_tensor(sp.key.clone()))?;
        let q = src.read(&qp.key)?;
        math::dequantize(&q, [n, k], block, &s, sp.dtype, to).map_err(at)
    }

    fn produce(
        &self,
        record: &WeightQuant,
        path: &str,
        t: &LogicalTensor,
        input: WeightInput<'_>,
    ) -> Result<Vec<(String, TensorBytes)>> {
        let at = |e: Error| e.with_layer(path.to_string());
        let f = Format::of(record).map_err(at)?;
        let (n, k) = match t.shape.as_slice() {
            [n, k] => (usize_of(*n)?, usize_of(*k)?),
            s => return Err(at(Error::layout(format!("a [out, in] weight, not {s:?}")))),
        };
        let (q, s) = match input {
            // compressed-tensors keeps the scale in the model's dtype
            WeightInput::Codes(c) => carried_bytes(c, t.dtype).map_err(at)?,
            WeightInput::Float(float) => {
                let b = f.strategy.block(t.shape[0], t.shape[1]);
                let block = [usize_of(b[0])?, usize_of(b[1])?];
                math::quantize(t.dtype, float, [n, k], block).map_err(at)?
            }
        };
        part_bytes(t, q, s, |_| None).map_err(at)
    }

    fn quantization_config(
        &self,
        record: &WeightQuant,
        _owner: ConfigOwner,
        skip: &[String],
    ) -> Option<Option<serde_json::Value>> {
        let f = Format::of(record).ok()?;
        // compressed-tensors' own form (`ModelCompressor.update_config`)
        let mut weights = serde_json::json!({
            "dynamic": false, "group_size": null, "num_bits": 8,
            "strategy": "tensor", "symmetric": true, "type": "float",
        });
        match f.strategy {
            super::Strategy::Tensor => {}
            super::Strategy::Channel => weights["strategy"] = "channel".into(),
            super::Strategy::Group(g) => {
                weights["strategy"] = "group".into();
                weights["group_size"] = g.into();
            }
            super::Strategy::Block(b) => {
                weights["strategy"] = "block".into();
                weights["block_structure"] = serde_json::json!(b);
            }
        }
        let input = if f.dynamic_activations {
            serde_json::json!({"dynamic": true, "group_size": null, "num_bits": 8,
                "strategy": "token", "symmetric": true, "type": "float"})
        } else {
            serde_json::Value::Null
        };
        let format = f.format_name();
        Some(Some(serde_json::json!({
            "config_groups": {"group_0": {
                "format": format, "input_activations": input, "output_activations": null,
                "targets": ["Linear"], "weights": weights}},
            "format": format, "global_compression_ratio": null, "ignore": skip,
            "kv_cache_scheme": null, "moe_sparsity_config": null,
            "quant_method": METHOD, "quantization_status": "compressed",
            "sparsity_config": {}, "transform_config": {}, "version": "0.20.0"
        })))
    }

    fn schema_entry(
        &self,
        record: &WeightQuant,
    ) -> Option<(String, Option<u64>, Option<serde_json::Value>)> {
        Format::of(record).ok().map(|f| (f.spelling(), None, None))
    }

    fn config_methods(&self) -> &'static [&'static str] {
        &[METHOD]
    }

    fn extra_buffers(&self) -> &'static [&'static str] {
        &ACTIVATION_SCALE
    }

    fn side_names(&self) -> &'static [&'static str] {
        &["config.json"]
    }

    fn side_files(
        &self,
        beside: Option<&std::path::Path>,
        _given: &[(&str, &std::path::Path)],
    ) -> Result<Option<Box<dyn std::any::Any + Send + Sync>>> {
        Ok(match beside {
            Some(input) => CtFp8Config::beside(input)?.map(|c| Box::new(c) as _),
            None => None,
        })
    }

    fn detector<'a>(&self, ctx: &DetectCtx<'a>) -> Result<Option<Box<dyn Detector + 'a>>> {
        let config = ctx.hints.side::<CtFp8Config>(NAME).cloned();
        Ok(Some(Box::new(CtFp8Detector::new(
            ctx.src, config, ctx.schema,
        )?)))
    }
}

//! The block FP8 family's seam (`layout::family::Family`).

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

use super::{math, Format, Fp8BlockDetector, Fp8Config, BLOCK, METHOD, NAME, SCALE};

/// The block FP8 family.
pub(crate) struct Fp8Block;

/// Buffers of a block FP8 layer a plain layer has no use for: the static
/// activation scale transformers stores.
const ACTIVATION_SCALE: [&str; 1] = ["activation_scale"];

fn float_model_dtype(d: Dtype) -> bool {
    matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32)
}

/// The code form of a block FP8 layout with F32 scales: FP8 codes carried
/// as their bit patterns, one plain multiplier per tile. (E8M0 scales are
/// not exchanged: no other layout stores them.)
fn form(f: &Format) -> Option<CodeForm> {
    (!f.ue8m0).then(|| CodeForm {
        name: f.spelling(),
        value: ScaleValue::Scale,
        granularity: Granularity::Block(f.block),
        range: [-128, 127],
        scale_dtype: Dtype::F32,
        zero_point: false,
        code: Dtype::F8E4M3,
    })
}

impl Family for Fp8Block {
    fn code_form(&self, l: &Layer) -> Option<CodeForm> {
        form(&Format::of(&l.quant.weights).ok()?)
    }

    fn target_form(&self, target: &WeightQuant, _model: Dtype) -> Option<CodeForm> {
        form(&Format::of(target).ok()?)
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
        let ok = w.shape.len() == 2
            && q.dtype == Dtype::F8E4M3
            && q.shape == w.shape
            && s.dtype == f.scale_dtype()
            && s.shape == f.grid(w.shape[0], w.shape[1])
            && float_model_dtype(w.dtype);
        if !ok {
            return Err(Error::layout(format!(
                "a block FP8 ({}) weight is F8_E4M3 [out, in] codes with {} scales \
                 [ceil(out/{}), ceil(in/{})] and a BF16, F16 or F32 model dtype; this record has \
                 {} {:?} codes, a {} {:?} scale, a {} {:?} weight",
                f.spelling(),
                f.scale_dtype(),
                f.block[0],
                f.block[1],
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
        let rest = s.strip_prefix("fp8:block")?;
        let ue8m0 = match rest {
            "" => false,
            ":ue8m0" => true,
            _ => {
                return Some(Err(Error::usage(format!(
                    "unknown block FP8 layout `{s}`: {}",
                    self.spellings()
                ))))
            }
        };
        Some(Ok(Format {
            block: BLOCK,
            ue8m0,
        }
        .record()))
    }

    fn spellings(&self) -> &'static str {
        "fp8:block[:ue8m0]"
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
        if w.shape.len() != 2 || !float_model_dtype(w.dtype) {
            return Err(Error::layout(format!(
                "block FP8 quantizes Linear weights ([out, in], BF16, F16 or F32); this one is \
                 {} {:?}",
                w.dtype, w.shape
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
            out_part(
                Role::Scale,
                key(SCALE),
                f.scale_dtype(),
                f.grid(w.shape[0], w.shape[1]),
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
        let [n, k] = [usize_of(w.shape[0])?, usize_of(w.shape[1])?];
        let block = [usize_of(f.block[0])?, usize_of(f.block[1])?];
        let s = math::scales(sp.dtype, &src.read(&sp.key)?, k.div_ceil(block[1]))
            .map_err(|e| at(e).with_tensor(sp.key.clone()))?;
        let q = src.read(&qp.key)?;
        math::dequantize(&q, [n, k], block, &s, to).map_err(at)
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
            // carried codes come with F32 scales (no E8M0 form is carried)
            WeightInput::Codes(c) => carried_bytes(c, Dtype::F32).map_err(at)?,
            WeightInput::Float(float) => {
                let block = [usize_of(f.block[0])?, usize_of(f.block[1])?];
                math::quantize(t.dtype, float, [n, k], block, f.ue8m0).map_err(at)?
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
        // DeepSeek-V3's own form (README_WEIGHTS.md), which transformers'
        // FineGrainedFP8Config reads; the modules left in float are named as
        // transformers names them
        let mut c = serde_json::json!({
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": METHOD,
            "weight_block_size": f.block,
        });
        if f.ue8m0 {
            c["scale_fmt"] = "ue8m0".into();
        }
        if !skip.is_empty() {
            c["modules_to_not_convert"] = skip.into();
        }
        Some(Some(c))
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
            Some(input) => Fp8Config::beside(input)?.map(|c| Box::new(c) as _),
            None => None,
        })
    }

    fn detector<'a>(&self, ctx: &DetectCtx<'a>) -> Result<Option<Box<dyn Detector + 'a>>> {
        let config = ctx.hints.side::<Fp8Config>(NAME).cloned();
        Ok(Some(Box::new(Fp8BlockDetector::new(ctx.src, config))))
    }
}

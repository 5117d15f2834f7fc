//! The ComfyUI family's seam (`layout::family::Family`).

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::format::manifest::{Layer, LogicalTensor, Role, WeightQuant};
use crate::io::source::TensorSource;
use crate::io::TensorBytes;
use crate::layout::family::{
    byte_codes, carried_bytes, carry_or_quantize, out_part, part, part_bytes, quantized_layer,
    quantized_weight, weight_of, CodeForm, Codes, DetectCtx, Detector, Family, Granularity, Pass,
    PlanCtx, Planned, ScaleValue, WeightInput,
};

use super::{
    is_legacy_marker, math, nvfp4, Format, Kind, LEGACY_MARKER, LEGACY_SCALE, MARKER, METADATA_KEY,
    NAME, SCALE, SCALE_2,
};
use crate::float::Fp8Kind;

/// ComfyUI's `comfy_quant` family.
pub(crate) struct Comfy;

/// Buffers of a ComfyUI layer that a plain layer has no use for (the
/// activation scale, and its legacy name).
const INPUT_SCALE: [&str; 2] = ["input_scale", "scale_input"];

fn float_model_dtype(d: Dtype) -> bool {
    matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32)
}

/// The code form of a ComfyUI layout: int8 codes, or FP8 codes carried as
/// their bit patterns (between ComfyUI's legacy and current forms).
fn form(f: &Format, scale_dtype: Dtype) -> CodeForm {
    CodeForm {
        name: f.label(),
        value: ScaleValue::Scale,
        granularity: match f.kind {
            Kind::Int8 { per_row: true } => Granularity::Channel,
            _ => Granularity::Tensor,
        },
        range: [-128, 127],
        scale_dtype,
        zero_point: false,
        code: match f.kind {
            Kind::Int8 { .. } => Dtype::I8,
            k => k.code_dtype(),
        },
    }
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
            Ok(f) => f.label(),
            Err(_) => NAME.into(),
        }
    }

    fn check_layer(&self, l: &Layer) -> Result<()> {
        let f = Format::of(&l.quant.weights).map_err(|e| e.with_layer(l.path.clone()))?;
        let w = quantized_weight(l).map_err(|e| e.with_layer(l.path.clone()))?;
        let q = part(l, w, Role::Data)?;
        let s = part(l, w, Role::Scale)?;
        let o = w.shape.first().copied().unwrap_or(0);
        if f.kind.is_padded() {
            let global = w
                .parts
                .iter()
                .find(|p| p.role == Role::Other(SCALE_2.into()));
            let ok = match w.shape.as_slice() {
                [r, c] => {
                    let (qs, ss) = f.kind.padded_shapes(*r, *c).unwrap_or_default();
                    q.dtype == f.kind.code_dtype()
                        && q.shape == qs
                        && f.kind.padded_scale_dtype(s.dtype)
                        && s.shape == ss
                        && float_model_dtype(w.dtype)
                        && match f.kind {
                            Kind::Nvfp4 => global.is_some_and(|g| {
                                g.dtype == Dtype::F32
                                    && g.shape.len() <= 1
                                    && g.shape.iter().product::<u64>() == 1
                            }),
                            _ => global.is_none(),
                        }
                }
                _ => false,
            };
            if !ok {
                return Err(Error::layout(format!(
                    "a ComfyUI {} weight [R, C] is padded codes with swizzled block scales{}; \
                     this record has {} {:?} codes, a {} {:?} scale, a {} {:?} weight",
                    f.kind.format_name(),
                    if f.kind == Kind::Nvfp4 {
                        " and an F32 weight_scale_2"
                    } else {
                        ""
                    },
                    q.dtype,
                    q.shape,
                    s.dtype,
                    s.shape,
                    w.dtype,
                    w.shape
                ))
                .with_layer(l.path.clone()));
            }
            return Ok(());
        }
        let scale_ok = float_model_dtype(s.dtype)
            && match f.kind {
                Kind::Int8 { per_row: true } => s.shape == [o, 1],
                _ => crate::dtype::numel(&s.shape)? == 1 && s.shape.len() <= 1,
            };
        if q.dtype != f.kind.code_dtype()
            || q.shape != w.shape
            || w.shape.len() != 2
            || !scale_ok
            || f.convrot
                .is_some_and(|n| w.shape.get(1).is_none_or(|i| !i.is_multiple_of(n)))
            || !float_model_dtype(w.dtype)
        {
            return Err(Error::layout(format!(
                "a ComfyUI {} weight is {} [out, in] codes with an F32 scale {:?}; this record \
                 has {} {:?} codes, a {} {:?} scale, a {} {:?} weight",
                f.kind.spelling(),
                f.kind.code_dtype(),
                f.kind.scale_shape(o),
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
        if s == "fp8:legacy" {
            // convert-to-quant's default legacy file: e4m3fn, and a marker
            // of two elements (ComfyUI: no FP8 matrix multiply)
            return Some(Ok(Format {
                kind: Kind::Fp8(Fp8Kind::E4M3Fn),
                full_precision: true,
                legacy: true,
                convrot: None,
                input_scale: false,
            }
            .record()));
        }
        // the `FAMILY:PRESET` spellings name the same layouts
        let rest = match s {
            "fp8:comfy" => "float8_e4m3fn",
            "fp8:comfy:e5m2" => "float8_e5m2",
            "int8:comfy" => "int8_tensorwise:per_row",
            "int8:comfy:tensor" => "int8_tensorwise",
            s => s.strip_prefix("comfy:")?,
        };
        Some(
            Kind::parse(rest)
                .map(|kind| {
                    Format {
                        kind,
                        full_precision: false,
                        legacy: false,
                        convrot: None,
                        input_scale: false,
                    }
                    .record()
                })
                .ok_or_else(|| {
                    Error::usage(format!(
                        "unknown ComfyUI layout `{s}`: {}",
                        self.spellings()
                    ))
                }),
        )
    }

    fn spellings(&self) -> &'static str {
        "comfy:float8_e4m3fn|float8_e5m2|int8_tensorwise|int8_tensorwise:per_row|mxfp8|nvfp4 \
         (also fp8:comfy[:e5m2], int8:comfy[:tensor]), fp8:legacy"
    }

    fn takes_float(&self, l: &Layer) -> bool {
        weight_of(l).is_ok_and(|w| {
            w.shape.len() == 2 && float_model_dtype(w.dtype) && !w.encoding.is_quantized()
        })
    }

    fn takes(&self, l: &Layer) -> bool {
        weight_of(l).is_ok_and(|w| w.shape.len() == 2 && float_model_dtype(w.dtype))
    }

    fn code_form(&self, l: &Layer) -> Option<CodeForm> {
        // ConvRot codes are a rotated weight's, MXFP8 and NVFP4 codes padded
        // with block scales: no other layout here reads them
        let f = Format::of(&l.quant.weights)
            .ok()
            .filter(|f| f.convrot.is_none() && !f.kind.is_padded())?;
        let w = quantized_weight(l).ok()?;
        let s = w.parts.iter().find(|p| p.role == Role::Scale)?;
        Some(form(&f, s.dtype))
    }

    fn target_form(&self, target: &WeightQuant, _model: Dtype) -> Option<CodeForm> {
        let f = Format::of(target)
            .ok()
            .filter(|f| f.convrot.is_none() && !f.kind.is_padded())?;
        Some(form(&f, Dtype::F32))
    }

    fn plan_into(&self, l: &Layer, target: &WeightQuant, ctx: &PlanCtx<'_>) -> Result<Planned> {
        let f = Format::of(target).map_err(|e| e.with_layer(l.path.clone()))?;
        let source = Format::of(&l.quant.weights)
            .ok()
            .filter(|_| self.owns(&l.quant.weights));
        // a legacy layer stays as it is under `fp8:legacy`: its file's marker
        // decides the matrix multiply
        if source.as_ref().is_some_and(|s| {
            *s == f || (s.legacy && f.legacy && s.kind == Kind::Fp8(Fp8Kind::E4M3Fn))
        }) {
            return Ok(Planned::keep(l));
        }
        if let Some(n) = f.convrot {
            return Err(Error::layout(format!(
                "ckptkit reads ComfyUI's ConvRot layers (convrot {n}) but does not write them: \
                 quantize to comfy:int8_tensorwise:per_row instead"
            ))
            .with_layer(l.path.clone()));
        }
        let w = weight_of(l)?;
        if w.shape.len() != 2 || !float_model_dtype(w.dtype) {
            return Err(Error::layout(format!(
                "ComfyUI quantizes Linear weights ([out, in], BF16, F16 or F32); this one is {} {:?}",
                w.dtype, w.shape
            ))
            .with_layer(l.path.clone()));
        }
        // codes carry over from a layout of the same scale granularity and
        // code kind
        let (passes, lossless) = carry_or_quantize(
            self,
            l,
            w,
            target,
            ctx,
            Pass::Quantize {
                qtype: f.kind.spelling(),
                group_size: None,
            },
        );
        let key = |s: &str| crate::layout::family::key(&l.path, s);
        let marker = f.marker_json();
        // MXFP8 stores padded codes and swizzled U8 (E8M0) scales, NVFP4
        // packed codes, swizzled E4M3 scales and a per-tensor multiplier
        let (q_shape, s_dtype, s_shape) = match f.kind.padded_shapes(w.shape[0], w.shape[1]) {
            Some((q, s)) if f.kind == Kind::Nvfp4 => (q, Dtype::F8E4M3, s),
            Some((q, s)) => (q, Dtype::U8, s),
            None => (w.shape.clone(), Dtype::F32, f.kind.scale_shape(w.shape[0])),
        };
        // the legacy form: `scale_weight`, and a file-level marker instead
        // of the layer's (added by the plan: `file_markers`)
        let scale_key = key(if f.legacy { LEGACY_SCALE } else { SCALE });
        let mut parts = vec![
            out_part(Role::Data, key("weight"), f.kind.code_dtype(), q_shape),
            out_part(Role::Scale, scale_key, s_dtype, s_shape),
        ];
        if f.kind == Kind::Nvfp4 {
            parts.push(out_part(
                Role::Other(SCALE_2.into()),
                key(SCALE_2),
                Dtype::F32,
                Vec::new(),
            ));
        }
        if !f.legacy {
            parts.push(out_part(
                Role::Other(MARKER.into()),
                key(MARKER),
                Dtype::U8,
                vec![marker.len() as u64],
            ));
        }
        let mut planned = quantized_layer(l, w, f.record(), parts, ctx, passes, lossless);
        // a legacy layer's `scale_input` that is not 1.0 stays, renamed
        // `input_scale`, as ComfyUI's `convert_old_quants` keeps it
        let kept = source.filter(|s| s.input_scale && !f.legacy && matches!(f.kind, Kind::Fp8(_)));
        if let Some(t) = kept.and(l.tensors.iter().find(|t| t.name == "scale_input")) {
            let mut input = crate::layout::family::plain_logical(
                &l.path,
                "input_scale",
                t.dtype,
                t.shape.clone(),
            );
            input.name = t.name.clone(); // copied from the source's `scale_input`
            planned.output.tensors.push(input);
            let extra = l
                .tensors
                .iter()
                .any(|t| t.name != "scale_input" && INPUT_SCALE.contains(&t.name.as_str()));
            if !extra {
                planned.passes.retain(|p| *p != Pass::DropActivationScales);
            }
        }
        Ok(planned)
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
        let f = Format::of(&l.quant.weights).map_err(|e| e.with_layer(l.path.clone()))?;
        if !float_model_dtype(to) {
            return Err(Error::layout(format!(
                "a ComfyUI weight dequantizes to BF16, F16 or F32, not {to}"
            ))
            .with_layer(l.path.clone()));
        }
        let qp = part(l, w, Role::Data)?;
        let sp = part(l, w, Role::Scale)?;
        let q = src.read(&qp.key)?;
        let sb = src.read(&sp.key)?;
        let s = match f.kind {
            // E8M0 or E4M3 bytes, read by the block dequantizers
            Kind::Mxfp8 | Kind::Nvfp4 => Vec::new(),
            _ => math::widen(sp.dtype, &sb)?,
        };
        let cols = w.shape.get(1).copied().unwrap_or(1) as usize;
        let r = match f.kind {
            Kind::Fp8(kind) => match s.first() {
                Some(&s) => math::dequantize(kind, &q, s, to),
                None => Err(Error::layout("empty scale").with_tensor(sp.key.clone())),
            },
            Kind::Int8 { .. } => match f.convrot {
                Some(n) => math::convrot_dequantize(&q, cols, &s, n as usize, to),
                None => math::int8_dequantize(&q, cols, &s, to),
            },
            Kind::Mxfp8 => math::mxfp8_dequantize(&q, &qp.shape, &w.shape, &sb, to)
                .map_err(|e| e.with_tensor(sp.key.clone())),
            Kind::Nvfp4 => {
                let gp = part(l, w, Role::Other(SCALE_2.into()))?;
                let gb = src.read(&gp.key)?;
                let g = match gb.get(..4) {
                    Some(b) if gb.len() == 4 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    _ => {
                        return Err(Error::layout(format!(
                            "`{SCALE_2}` is one F32 value, not {} bytes",
                            gb.len()
                        ))
                        .with_tensor(gp.key.clone())
                        .with_layer(l.path.clone()))
                    }
                };
                nvfp4::dequantize(&q, &qp.shape, &w.shape, &sb, g, to)
                    .map_err(|e| e.with_tensor(sp.key.clone()))
            }
        };
        r.map_err(|e| e.with_layer(l.path.clone()))
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
        let cols = t.shape.get(1).copied().unwrap_or(1) as usize;
        let mut global = None;
        let (q, scale): (Vec<u8>, Vec<u8>) = match (f.kind, input) {
            // int8 codes, or FP8 codes as their bit patterns (the planner
            // carries codes only between forms of the same code dtype)
            (_, WeightInput::Codes(c)) => carried_bytes(c, Dtype::F32).map_err(at)?,
            (Kind::Mxfp8, WeightInput::Float(float)) => {
                let r = t.shape.first().copied().unwrap_or(0) as usize;
                math::mxfp8_quantize(t.dtype, float, r, cols).map_err(at)?
            }
            (Kind::Nvfp4, WeightInput::Float(float)) => {
                let r = t.shape.first().copied().unwrap_or(0) as usize;
                let (q, s, g) = nvfp4::quantize(t.dtype, float, r, cols).map_err(at)?;
                global = Some(g);
                (q, s)
            }
            (Kind::Fp8(_), WeightInput::Float(float)) if f.legacy => {
                let (q, s) = math::legacy_quantize(t.dtype, float).map_err(at)?;
                (q, s.to_le_bytes().to_vec())
            }
            (Kind::Fp8(k), WeightInput::Float(float)) => {
                let amax = math::amax_of(t.dtype, float).map_err(at)?;
                let s = math::scale_for(t.dtype, k, amax).map_err(at)?;
                let q = math::quantize_bytes(t.dtype, k, float, s).map_err(at)?;
                (q, s.to_le_bytes().to_vec())
            }
            (Kind::Int8 { per_row }, WeightInput::Float(float)) => {
                let x = math::widen(t.dtype, float).map_err(at)?;
                let s = math::int8_scales(&x, cols, per_row).map_err(at)?;
                (
                    math::int8_quantize(t.dtype, &x, cols, &s),
                    s.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            }
        };
        part_bytes(t, q, scale, |r| match r {
            Role::Other(m) if m == MARKER => Some(f.marker_json().into_bytes()),
            Role::Other(m) if m == SCALE_2 => global.map(|g| g.to_le_bytes().to_vec()),
            _ => None,
        })
        .map_err(at)
    }

    fn extra_buffers(&self) -> &'static [&'static str] {
        &INPUT_SCALE
    }

    fn is_file_marker(&self, key: &str) -> bool {
        is_legacy_marker(key)
    }

    fn file_markers(&self, output: &[&Layer]) -> Vec<(String, Dtype, Vec<u64>)> {
        // a legacy layer needs the file's `scaled_fp8` marker: two elements
        // when its matrix multiply is in full precision
        let legacy = output
            .iter()
            .filter_map(|l| Format::of(&l.quant.weights).ok())
            .find(|f| f.legacy);
        let has = output
            .iter()
            .flat_map(|l| l.parts())
            .any(|p| is_legacy_marker(&p.key));
        match legacy {
            Some(f) if !has => vec![(
                LEGACY_MARKER.to_string(),
                Dtype::F8E4M3,
                vec![if f.full_precision { 2 } else { 0 }],
            )],
            _ => Vec::new(),
        }
    }

    fn stale_markers(&self, input: &[Layer], output: &[&Layer]) -> Result<Vec<String>> {
        let markers: Vec<String> = input
            .iter()
            .filter(|l| l.quant.weights == WeightQuant::Plain)
            .flat_map(|l| l.parts())
            .filter(|p| is_legacy_marker(&p.key))
            .map(|p| p.key.clone())
            .collect();
        // a marker whose layers were not read (a layer without its
        // `scale_weight`) stays, and the conversion is refused as suspect
        let read = input
            .iter()
            .any(|l| Format::of(&l.quant.weights).is_ok_and(|f| f.legacy));
        if markers.is_empty() || !read {
            return Ok(Vec::new());
        }
        let formats: Vec<(&Layer, Format)> = output
            .iter()
            .filter_map(|l| Format::of(&l.quant.weights).ok().map(|f| (*l, f)))
            .collect();
        let legacy = formats.iter().find(|(_, f)| f.legacy);
        let current = formats.iter().find(|(_, f)| !f.legacy);
        match (legacy, current) {
            // nothing legacy is left: the marker would misdescribe the file
            (None, _) => Ok(markers),
            (Some(_), None) => Ok(Vec::new()),
            (Some((a, _)), Some((b, _))) => Err(Error::layout(format!(
                "the output would hold legacy scaled-FP8 layers (`{}`) beside comfy_quant ones \
                 (`{}`), which no ComfyUI version reads together; convert every legacy layer \
                 (--to comfy:float8_e4m3fn or the file's format)",
                a.path, b.path
            ))
            .with_layer(a.path.clone())),
        }
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
        // a legacy file is described by its marker; metadata would make
        // ComfyUI skip its conversion of the legacy layers
        if mine.iter().any(|(_, f)| f.legacy) {
            return vec![(METADATA_KEY, None)];
        }
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
        Ok(Some(Box::new(super::ComfyDetector::new(
            ctx.src,
            ctx.hints.shapes_from,
            ctx.schema,
        )?)))
    }

    fn schema_entry(
        &self,
        record: &WeightQuant,
    ) -> Option<(String, Option<u64>, Option<serde_json::Value>)> {
        // the padded layouts record their logical shape: the stored codes
        // do not tell it
        Format::of(record)
            .ok()
            .filter(|f| f.kind.is_padded())
            .map(|f| (f.kind.spelling(), None, None))
    }
}

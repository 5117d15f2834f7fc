//! The gguf family's seam (`layout::family::Family`).

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::format::gguf::GgmlType;
use crate::format::manifest::{Layer, LogicalTensor, Role, WeightQuant};
use crate::io::source::TensorSource;
use crate::io::TensorBytes;
use crate::layout::family::{
    carry_or_quantize, cast_bytes, out_part, part, quantized_layer, quantized_weight, weight_of,
    Codes, DetectCtx, Detector, Family, Pass, PlanCtx, Planned, WeightInput,
};

use super::{math, stored_shape, type_of, GgufDetector, NAME};

/// The block types ckptkit quantizes floats into (gguf-py's numpy
/// quantizers, which match ggml's C reference).
const QUANTIZED: [&str; 5] = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"];

/// Float dtypes a gguf layer's logical tensor may have (GGUF inputs give
/// F32; a float model quantized by ckptkit keeps its dtype, so that `plain`
/// gives it back).
fn float_dtype(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Whether a weight of this dtype and shape is quantized by `--to gguf:*`
/// (ComfyUI-GGUF's rule, spec/layouts.md §8): a float tensor of 2 to 4
/// dimensions, more than 1024 elements, rows of whole 32-element blocks.
/// Everything else stays as it is.
fn quantizable(dtype: Dtype, shape: &[u64]) -> bool {
    float_dtype(dtype)
        && (2..=4).contains(&shape.len())
        && shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .is_some_and(|n| n > 1024)
        && shape.last().is_some_and(|&r| r > 0 && r.is_multiple_of(32))
}

/// The gguf family.
pub(crate) struct Gguf;

impl Family for Gguf {
    fn name(&self) -> &'static str {
        NAME
    }

    fn owns(&self, w: &WeightQuant) -> bool {
        matches!(w, WeightQuant::Family { name, .. } if name == NAME)
    }

    fn label(&self, w: &WeightQuant) -> String {
        match type_of(w) {
            Ok(t) => format!("gguf:{}", t.name),
            Err(_) => NAME.into(),
        }
    }

    fn check_layer(&self, l: &Layer) -> Result<()> {
        let at = |e: Error| e.with_layer(l.path.clone());
        let ty = type_of(&l.quant.weights).map_err(at)?;
        let w = quantized_weight(l).map_err(at)?;
        let q = part(l, w, Role::Data)?;
        let want = stored_shape(ty, &w.shape);
        if !float_dtype(w.dtype)
            || w.parts.len() != 1
            || q.dtype != Dtype::U8
            || want.as_deref() != Some(q.shape.as_slice())
        {
            return Err(at(Error::layout(format!(
                "a {} tensor is its raw blocks, U8 [rows, row_bytes] ({want:?} for shape {:?}), \
                 read as F32; this record has {} {:?} stored, read as {}",
                ty.name, w.shape, q.dtype, q.shape, w.dtype
            ))));
        }
        Ok(())
    }

    fn parse_target(&self, s: &str) -> Option<Result<WeightQuant>> {
        let name = s.strip_prefix("gguf:")?;
        Some(match GgmlType::from_name(name) {
            Some(t) if QUANTIZED.contains(&t.name) => Ok(super::record(t)),
            Some(t) if t.is_blocked() && t.readable => Err(Error::usage(format!(
                "--to gguf:{name}: ckptkit writes {} only by keeping blocks a GGUF input has \
                 (it has no K-quant quantizer to be exact to); quantize to {}",
                t.name,
                self.spellings()
            ))),
            _ => Err(Error::usage(format!(
                "unknown GGUF block type `{name}`: {} (F32/F16/BF16 GGUF files: --to plain or \
                 plain:f16|bf16 with a .gguf output)",
                self.spellings()
            ))),
        })
    }

    fn spellings(&self) -> &'static str {
        "gguf:q8_0|q4_0|q4_1|q5_0|q5_1"
    }

    fn takes_float(&self, l: &Layer) -> bool {
        weight_of(l).is_ok_and(|w| !w.encoding.is_quantized() && quantizable(w.dtype, &w.shape))
    }

    fn takes(&self, l: &Layer) -> bool {
        weight_of(l).is_ok_and(|w| quantizable(w.dtype, &w.shape))
    }

    fn plan_into(&self, l: &Layer, target: &WeightQuant, ctx: &PlanCtx<'_>) -> Result<Planned> {
        let ty = type_of(target).map_err(|e| e.with_layer(l.path.clone()))?;
        if self.owns(&l.quant.weights) && type_of(&l.quant.weights)? == ty {
            return Ok(Planned::keep(l));
        }
        if !QUANTIZED.contains(&ty.name) {
            return Err(Error::layout(format!(
                "ckptkit does not quantize into {} (it keeps such blocks from a GGUF input)",
                ty.name
            ))
            .with_layer(l.path.clone()));
        }
        let w = weight_of(l)?;
        if !quantizable(w.dtype, &w.shape) {
            return Err(Error::layout(format!(
                "gguf:{} quantizes float weights of 2 to 4 dimensions, more than 1024 elements \
                 and rows of whole 32-element blocks; this one is {} {:?}",
                ty.name.to_lowercase(),
                w.dtype,
                w.shape
            ))
            .with_layer(l.path.clone()));
        }
        let stored = stored_shape(ty, &w.shape)
            .ok_or_else(|| Error::overflow("GGUF block shape").with_layer(l.path.clone()))?;
        let (passes, lossless) = carry_or_quantize(
            self,
            l,
            w,
            target,
            ctx,
            Pass::Quantize {
                qtype: self.label(target),
                group_size: Some(ty.block),
            },
        );
        let parts = vec![out_part(
            Role::Data,
            crate::layout::family::key(&l.path, "weight"),
            Dtype::U8,
            stored,
        )];
        Ok(quantized_layer(
            l,
            w,
            target.clone(),
            parts,
            ctx,
            passes,
            lossless,
        ))
    }

    fn read_codes(&self, _src: &dyn TensorSource, l: &Layer, _w: &LogicalTensor) -> Result<Codes> {
        Err(
            Error::layout("GGUF blocks have no code form ckptkit carries into another layout")
                .with_layer(l.path.clone()),
        )
    }

    fn dequantize(
        &self,
        src: &dyn TensorSource,
        l: &Layer,
        w: &LogicalTensor,
        to: Dtype,
    ) -> Result<Vec<u8>> {
        let at = |e: Error| e.with_layer(l.path.clone());
        let ty = type_of(&l.quant.weights).map_err(at)?;
        let q = part(l, w, Role::Data)?;
        let blocks = src.read(&q.key)?;
        let n = crate::layout::family::usize_of(
            w.shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| Error::overflow("GGUF tensor element count"))?,
        )?;
        let mut out = vec![0f32; n];
        math::dequantize(ty, &blocks, &mut out)
            .map_err(|m| at(Error::layout(m)).with_tensor(q.key.clone()))?;
        let bytes: Vec<u8> = out.iter().flat_map(|x| x.to_le_bytes()).collect();
        cast_bytes(Dtype::F32, to, &bytes).map_err(at)
    }

    fn produce(
        &self,
        record: &WeightQuant,
        path: &str,
        t: &LogicalTensor,
        input: WeightInput<'_>,
    ) -> Result<Vec<(String, TensorBytes)>> {
        let at = |e: Error| e.with_layer(path.to_string());
        let ty = type_of(record).map_err(at)?;
        let WeightInput::Float(float) = input else {
            return Err(at(Error::layout("GGUF blocks are quantized from floats")));
        };
        let fd = crate::float::float_dtype_of(t.dtype)
            .ok_or_else(|| at(Error::layout(format!("a {} weight is not float", t.dtype))))?;
        // widened to f32 a slice at a time (whole blocks: quantizing is
        // block-local), so memory holds the output, not an f32 copy
        const SLICE: usize = 32 * 1024;
        let size = t.dtype.size();
        let mut x = vec![0f32; SLICE];
        let mut out = Vec::new();
        for piece in float.chunks(SLICE * size) {
            let n = piece.len() / size;
            let xs = x
                .get_mut(..n)
                .ok_or_else(|| at(Error::layout("slice overrun")))?;
            fd.decode_into(piece, xs)
                .map_err(|e| at(Error::layout(e.to_string())))?;
            math::quantize(ty, xs, &mut out).map_err(|m| at(Error::layout(m)))?;
        }
        let key = t
            .parts
            .iter()
            .find(|p| p.role == Role::Data)
            .map(|p| p.key.clone())
            .ok_or_else(|| at(Error::layout("no data part to write the blocks to")))?;
        Ok(vec![(key, TensorBytes::Owned(out))])
    }

    fn metadata(&self, layers: &[&Layer]) -> Vec<(&'static str, Option<String>)> {
        vec![(
            crate::io::gguf_file::TENSORS_KEY,
            super::tensors_entry(layers),
        )]
    }

    fn detector<'a>(&self, ctx: &DetectCtx<'a>) -> Result<Option<Box<dyn Detector + 'a>>> {
        let d =
            GgufDetector::new(ctx.src.metadata()).map_err(|e| e.with_file(ctx.src.describe()))?;
        Ok(Some(Box::new(d)))
    }
}

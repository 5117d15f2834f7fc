//! The gguf family's seam (`layout::family::Family`).

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::format::gguf::GgmlType;
use crate::format::manifest::{Layer, LogicalTensor, Role, WeightQuant};
use crate::io::source::TensorSource;
use crate::io::TensorBytes;
use crate::layout::family::{
    carry_or_quantize, cast_bytes, out_part, part, quantized_layer, quantized_weight, weight_of,
    CodeForm, Codes, DetectCtx, Detector, Family, Granularity, Pass, PlanCtx, Planned, ScaleValue,
    WeightInput,
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
        && crate::dtype::numel(shape).is_ok_and(|n| n > 1024)
        && shape.last().is_some_and(|&r| r > 0 && r.is_multiple_of(32))
}

/// The code form of Q8_0 (spec/layouts.md §8): int8 codes, one F16 scale
/// per 32 consecutive elements of a row, `w = q · d`. Its integers carry
/// to and from an int8 layout of groups of 32 (`int8:ct:group=32`) byte
/// for byte; a scale F16 cannot hold exactly makes the carry lossy, which
/// the re-layout measures and refuses without `--allow-lossy`.
fn q8_0_form() -> CodeForm {
    CodeForm {
        name: "gguf:Q8_0".into(),
        value: ScaleValue::Scale,
        granularity: Granularity::Group(32),
        range: [-128, 127],
        scale_dtype: Dtype::F16,
        zero_point: false,
        code: Dtype::I8,
    }
}

/// Whether `ty` is Q8_0, the block type whose integers carry over.
fn is_q8_0(ty: GgmlType) -> bool {
    ty.name == "Q8_0"
}

/// Q8_0 blocks from int8 codes `[rows, cols]` (row-major) and their F16
/// scales `[rows, cols / 32]`: each block the scale's two bytes, then 32
/// codes.
fn q8_0_blocks(c: &Codes) -> std::result::Result<Vec<u8>, String> {
    if c.dtype != Dtype::F16 || c.value != ScaleValue::Scale {
        return Err(format!(
            "Q8_0 takes F16 scales of the codes' scale form, not {} {:?}",
            c.dtype, c.value
        ));
    }
    if !c.q.len().is_multiple_of(32) || c.scale.len() != c.q.len() / 32 * 2 {
        return Err(format!(
            "{} codes and {} scale bytes are not Q8_0 blocks of 32 codes and 2 scale bytes",
            c.q.len(),
            c.scale.len()
        ));
    }
    let mut out = Vec::with_capacity(c.q.len() / 32 * 34);
    for (q, d) in c.q.chunks_exact(32).zip(c.scale.chunks_exact(2)) {
        out.extend_from_slice(d);
        out.extend(q.iter().map(|&v| v as u8));
    }
    Ok(out)
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
            || !super::blocks_fit(ty, &w.shape, &q.shape)
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

    fn makes_the_rest_plain(&self) -> bool {
        // a GGUF file holds ggml types only: a quanto or int8 layer too small
        // for a block type (or with rows of partial blocks) is dequantized,
        // as the float layers of that kind stay float
        true
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

    fn code_form(&self, l: &Layer) -> Option<CodeForm> {
        // a 2-D Q8_0 weight stored in rows of its own last dimension
        let ty = type_of(&l.quant.weights).ok().filter(|t| is_q8_0(*t))?;
        let w = quantized_weight(l).ok()?;
        let q = w.parts.iter().find(|p| p.role == Role::Data)?;
        (w.shape.len() == 2 && stored_shape(ty, &w.shape).as_deref() == Some(q.shape.as_slice()))
            .then(q8_0_form)
    }

    fn target_form(&self, target: &WeightQuant, _model: Dtype) -> Option<CodeForm> {
        type_of(target)
            .ok()
            .filter(|t| is_q8_0(*t))
            .map(|_| q8_0_form())
    }

    fn read_codes(&self, src: &dyn TensorSource, l: &Layer, w: &LogicalTensor) -> Result<Codes> {
        let at = |e: Error| e.with_layer(l.path.clone());
        let ty = type_of(&l.quant.weights).map_err(at)?;
        if !is_q8_0(ty) {
            return Err(at(Error::layout(format!(
                "{} blocks have no code form ckptkit carries into another layout (Q8_0 has)",
                ty.name
            ))));
        }
        let q = part(l, w, Role::Data)?;
        let blocks = src.read(&q.key)?;
        if !blocks.len().is_multiple_of(34) {
            return Err(at(Error::layout(format!(
                "{} bytes are not whole Q8_0 blocks of 34",
                blocks.len()
            )))
            .with_tensor(q.key.clone()));
        }
        let n = blocks.len() / 34;
        let (mut codes, mut scale) = (Vec::with_capacity(n * 32), Vec::with_capacity(n * 2));
        for b in blocks.chunks_exact(34) {
            scale.extend_from_slice(&b[..2]);
            codes.extend(b[2..].iter().map(|&v| v as i8));
        }
        Ok(Codes {
            q: codes,
            scale,
            value: ScaleValue::Scale,
            dtype: Dtype::F16,
        })
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
        let key = t
            .parts
            .iter()
            .find(|p| p.role == Role::Data)
            .map(|p| p.key.clone())
            .ok_or_else(|| at(Error::layout("no data part to write the blocks to")))?;
        let float = match input {
            WeightInput::Float(float) => float,
            // int8 codes carried over: Q8_0 blocks of their codes and scales
            WeightInput::Codes(c) if is_q8_0(ty) => {
                let blocks = q8_0_blocks(&c).map_err(|m| at(Error::layout(m)))?;
                return Ok(vec![(key, TensorBytes::Owned(blocks))]);
            }
            WeightInput::Codes(_) => {
                return Err(at(Error::layout(format!(
                    "{} blocks are quantized from floats (only Q8_0 takes int8 codes)",
                    ty.name
                ))))
            }
        };
        let fd = crate::float::float_dtype_of(t.dtype)
            .ok_or_else(|| at(Error::layout(format!("a {} weight is not float", t.dtype))))?;
        // widened to f32 a slice at a time (whole blocks: quantizing is
        // block-local), so memory holds the output, not an f32 copy; the slices
        // are quantized in parallel, each into its own range of the output,
        // each worker reusing one slice-sized f32 buffer
        use rayon::prelude::*;
        const SLICE: usize = 32 * 1024;
        let size = t.dtype.size();
        let n = float.len() / size;
        if n.checked_mul(size) != Some(float.len()) {
            return Err(at(Error::layout(format!(
                "{} bytes are not a whole number of {size}-byte elements",
                float.len()
            ))));
        }
        let total = math::quantized_len(ty, n).map_err(|m| at(Error::layout(m)))?;
        let slice_bytes = math::quantized_len(ty, SLICE).map_err(|m| at(Error::layout(m)))?;
        // from the pool: a fresh buffer's first writes fault page by page
        // (crate::io::pool); every byte is overwritten below
        let mut out = crate::io::pool::take(total);
        let failed = float
            .par_chunks(SLICE * size)
            .zip(out.par_chunks_mut(slice_bytes))
            .enumerate()
            .map_init(
                || vec![0f32; SLICE],
                |x, (k, (piece, dst))| -> std::result::Result<(), String> {
                    let xs = x
                        .get_mut(..piece.len() / size)
                        .ok_or_else(|| "slice overrun".to_string())?;
                    math::widen_quantize_into(ty, fd, piece, xs, dst, k * SLICE)
                },
            )
            .find_first(|r| r.is_err());
        if let Some(Err(m)) = failed {
            return Err(at(Error::layout(m)));
        }
        Ok(vec![(
            key,
            TensorBytes::Pooled(crate::io::pool::Pooled::new(out)),
        )])
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

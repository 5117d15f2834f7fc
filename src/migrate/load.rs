//! `load`: a planned conversion into memory, tensor by tensor, for callers
//! that want the converted state dict rather than a file (the Python
//! package's `ckptkit.load`).

use std::path::Path;

use rayon::prelude::*;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::io::open::{input_kind, open_source, InputKind};
use crate::io::source::{Checked, TensorSource};
use crate::io::TensorBytes;
use crate::migrate::plan::Produced;
use crate::Dtype;

use super::{planned, ConvertOptions, Summary};

/// One layer's outputs, with their dtypes and shapes, and its loss.
type LayerOut = (
    Vec<(String, Dtype, Vec<u64>, TensorBytes)>,
    Option<crate::migrate::plan::Loss>,
);

/// Executes one layer and reads what it copies, checking every size
/// against the plan.
fn materialize(src: &Checked<'_>, lp: &crate::migrate::plan::LayerPlan) -> Result<LayerOut> {
    let (outs, loss) =
        crate::migrate::plan::execute(src, lp).map_err(|e| e.with_layer(lp.path.clone()))?;
    let mut v = Vec::with_capacity(outs.len());
    for (key, produced) in outs {
        let part = lp.output.parts().find(|q| q.key == key).ok_or_else(|| {
            Error::usage(format!("executed tensor `{key}` is not in the plan"))
                .with_layer(lp.path.clone())
        })?;
        let bytes = match produced {
            Produced::Bytes(b) => b,
            Produced::Copy(from) => src.read(&from).map_err(|e| e.with_layer(lp.path.clone()))?,
        };
        let want = crate::dtype::byte_len(part.dtype, &part.shape)?;
        if bytes.len() as u64 != want {
            return Err(Error::layout(format!(
                "tensor `{key}` has {} bytes, its plan says {} {:?}",
                bytes.len(),
                part.dtype,
                part.shape
            ))
            .with_layer(lp.path.clone()));
        }
        v.push((key, part.dtype, part.shape.clone(), bytes));
    }
    Ok((v, loss))
}

/// Converts `input` as [`convert`](super::convert) would (the target,
/// selection, renames and refusals of `opts`), into memory: every output
/// tensor is handed to `each` as `(key, dtype, shape, bytes)`, layer by
/// layer in plan order, and nothing is written. Every byte read is checked
/// against the hashes the input records, as it is read. Memory: the
/// outputs of a few layers at a time, plus what `each` keeps. A checkpoint already
/// in the target layout is loaded as it is (no "nothing changed" refusal).
/// Training-checkpoint directories (several models) are refused: load one
/// model's directory.
///
/// ```no_run
/// use ckptkit::migrate::{load, ConvertOptions, Target};
/// # fn main() -> ckptkit::Result<()> {
/// let opts = ConvertOptions::default().target(Target::parse("plain")?);
/// let mut state = Vec::new();
/// load("model.safetensors".as_ref(), &opts, &mut |key, dtype, shape, bytes| {
///     state.push((key.to_string(), dtype, shape.to_vec(), bytes.into_vec()));
///     Ok(())
/// })?;
/// # Ok(()) }
/// ```
#[allow(clippy::type_complexity)]
pub fn load(
    input: &Path,
    opts: &ConvertOptions,
    each: &mut dyn FnMut(&str, Dtype, &[u64], TensorBytes) -> Result<()>,
) -> Result<Summary> {
    let t0 = Instant::now();
    let mut own = opts.clone();
    own.control = opts.control.fresh();
    let opts = &own;
    opts.control.check()?;
    if input_kind(input)? == InputKind::ShardedDir
        && crate::migrate::checkpoint::is_training_checkpoint(input)?
    {
        return Err(Error::usage(format!(
            "{} is a training-checkpoint directory (several models); load one model's directory",
            input.display()
        )));
    }
    let raw = open_source(input)?;
    let src = Checked::new(raw.as_ref(), opts.verify_input);
    let (p, warnings) = planned(input, &src, Some("load it"), false, opts)?;
    let bytes_out: u64 = p.layers.iter().map(|l| l.bytes_out).sum();
    opts.control.set_total(bytes_out);
    let mut losses = Vec::new();
    // a few layers at a time, executed in parallel, handed over in order
    let window = 2 * rayon::current_num_threads().max(1);
    for layers in p.layers.chunks(window) {
        opts.control.check()?;
        let done: Vec<Result<LayerOut>> = layers
            .par_iter()
            .map(|lp| materialize(&src, lp).map_err(|e| e.with_file(input)))
            .collect();
        for r in done {
            let (tensors, loss) = r?;
            losses.extend(loss);
            for (key, dtype, shape, bytes) in tensors {
                opts.control.add(bytes.len() as u64);
                each(&key, dtype, &shape, bytes)?;
            }
        }
    }
    opts.control.finish();
    Ok(Summary {
        tensors: p.outputs().len(),
        layers: p.layers.len(),
        bytes_in: p.layers.iter().map(|l| l.bytes_in).sum(),
        bytes_out,
        seconds: t0.elapsed().as_secs_f64(),
        losses,
        input_verified: opts.verify_input && src.unchecked() == 0,
        input_unchecked: src.unchecked(),
        warnings,
        plan: Some(p),
        ..Default::default()
    })
}

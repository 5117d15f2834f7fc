//! Training checkpoints and pipelines: directories whose models live in
//! sub-directories or beside a trainer's state.

use crate::error::{Error, Result};
use crate::io::atomic::AtomicDir;
use crate::io::sharded::find_index;
use crate::io::source::{Checked, TensorSource};
use crate::migrate::plan::plan;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::*;

/// Files that only a training run's checkpoint holds (Hugging Face
/// Trainer, accelerate, SimpleTuner): optimizer, scheduler and RNG states.
pub(crate) fn is_trainer_state(name: &str) -> bool {
    name == "trainer_state.json"
        || name == "training_state.json"
        || name.starts_with("optimizer.")
        || name.starts_with("scheduler.")
        || name.starts_with("scaler.")
        || name.starts_with("rng_state")
        || name.starts_with("random_states_")
}

/// True when a directory is a training checkpoint (or a pipeline): model
/// weights in sub-directories (`transformer/`, `text_encoder/`), or a
/// trainer's optimizer / scheduler / RNG state beside the weights. A model
/// directory is recognised by its weights and index, whatever else it holds
/// (`.gitattributes`, `tokenizer.model`, `README.md`, other weight formats).
pub fn is_training_checkpoint(dir: &Path) -> Result<bool> {
    for e in std::fs::read_dir(dir).map_err(|e| Error::from(e).with_file(dir))? {
        let e = e.map_err(|er| Error::from(er).with_file(dir))?;
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with('.') {
            continue;
        }
        if is_trainer_state(&n) {
            return Ok(true);
        }
        // a sub-directory that holds a model's weights (symlinks followed,
        // one level: pipelines and checkpoints put models one level down)
        if std::fs::metadata(e.path()).is_ok_and(|m| m.is_dir())
            && !model_files(&e.path())?.is_empty()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The model weight files of one directory (its index's files, or the files
/// with transformers/diffusers weight names).
pub(crate) fn model_files(dir: &Path) -> Result<Vec<String>> {
    if let Some(ix) = find_index(dir)? {
        let idx = crate::io::sharded::read_index(&ix)?;
        let mut v: Vec<String> = idx.weight_map.values().cloned().collect();
        v.sort();
        v.dedup();
        if let Some(n) = ix.file_name() {
            v.push(n.to_string_lossy().into_owned());
        }
        return Ok(v);
    }
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::from(e).with_file(dir))? {
        let n = e?.file_name().to_string_lossy().into_owned();
        if crate::io::sharded::is_weight_file_name(&n) {
            v.push(n);
        }
    }
    v.sort();
    Ok(v)
}

/// Converts a training checkpoint directory (e.g. `checkpoint-4000/` with
/// `transformer/diffusion_pytorch_model*.safetensors`, adapter weights,
/// `optimizer.bin`, ...): every directory's model weights are migrated, its
/// `config.json` and `quanto_qmap.json` follow the new layout, and every
/// other file is copied unchanged, so the result resumes like the original.
pub fn convert_checkpoint_dir(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
) -> Result<Summary> {
    let t0 = Instant::now();
    if output_kind(output) != OutputKind::Directory {
        return Err(Error::usage(format!(
            "{} is a training checkpoint directory; its output must be a directory, not {}",
            input.display(),
            output.display()
        )));
    }
    let mut summary = Summary::default();
    let mut plans = Vec::new();
    // plan every model first: nothing is written if any layer is in doubt
    let mut stack = vec![PathBuf::new()];
    let mut models = Vec::new();
    let mut copies = Vec::new();
    while let Some(rel) = stack.pop() {
        let d = input.join(&rel);
        let files = model_files(&d)?;
        let mut handled: std::collections::HashSet<String> = files.iter().cloned().collect();
        if !files.is_empty() {
            handled.extend(crate::layout::registry::companion_names().map(String::from));
            handled.insert("config.json".into());
            models.push((rel.clone(), files));
        }
        for e in std::fs::read_dir(&d).map_err(|e| Error::from(e).with_file(&d))? {
            let e = e?;
            let n = e.file_name().to_string_lossy().into_owned();
            if e.file_type()?.is_dir() {
                stack.push(rel.join(&n));
            } else if !handled.contains(&n)
                || (n == "config.json" && !models.iter().any(|m| m.0 == rel))
            {
                copies.push(rel.join(&n));
            } else if n == "config.json" {
                copies.push(rel.join(&n)); // copied, then updated
            }
        }
    }
    let mut sources = Vec::new();
    for (rel, files) in &models {
        let d = input.join(rel);
        let weights: Vec<String> = files
            .iter()
            .filter(|f| f.ends_with(".safetensors"))
            .cloned()
            .collect();
        let src = crate::io::sharded::ShardedDir::open_with(&d, Some(weights))?;
        let layers = input_layers(&d, &src, opts).map_err(|e| e.with_file(&d))?;
        let mut p = plan(&layers, &opts.target, &opts.select)?;
        crate::migrate::plan::apply_renames(&mut p, &opts.select.rename)?;
        refuse_suspects(&p, &input_suspects(&d, &src, &layers)?, opts)
            .map_err(|e| e.with_file(&d))?;
        summary.warnings.extend(
            selection_warnings(&layers, opts)
                .into_iter()
                .map(|w| format!("{}: {w}", d.display())),
        );
        summary.tensors += p.outputs().len();
        summary.layers += p.layers.len();
        summary.bytes_in += p.layers.iter().map(|l| l.bytes_in).sum::<u64>();
        sources.push(src);
        plans.push(p);
    }
    refuse_no_change(&plans.iter().collect::<Vec<_>>(), &summary.warnings, opts)?;
    if opts.dry_run {
        summary.plan = plans.pop();
        summary.seconds = t0.elapsed().as_secs_f64();
        return Ok(summary);
    }
    check_free_space(output, summary.bytes_in)?;
    opts.control.set_total(
        plans
            .iter()
            .flat_map(|p| &p.layers)
            .map(|l| l.bytes_out)
            .sum(),
    );
    let losses: Losses = Default::default();
    let dir = AtomicDir::create(output, opts.overwrite)?;
    for rel in &copies {
        opts.control.check()?;
        let to = dir.path().join(rel);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::from(e).with_file(parent))?;
        }
        copy_file(&input.join(rel), &to, &output.join(rel), &opts.control)?;
    }
    let mut unchecked = 0;
    for (((rel, _), raw), p) in models.iter().zip(&sources).zip(&plans) {
        let src = &Checked::new(raw, opts.verify_input);
        let out = dir.path().join(rel);
        std::fs::create_dir_all(&out)?;
        let md = output_metadata(src.metadata(), p);
        write_model_dir(src, p, &losses, &out, &model_stem(&src.files()), &md, opts)?;
        summary.warnings.extend(update_config(
            &input.join(rel),
            &out.join("config.json"),
            p,
        )?);
        unchecked += src.unchecked();
    }
    dir.commit()?;
    summary.input_verified = opts.verify_input && unchecked == 0;
    summary.input_unchecked = unchecked;
    summary.files = vec![output.to_path_buf()];
    summary.bytes_out = dir_size(output);
    summary.seconds = t0.elapsed().as_secs_f64();
    summary.plan = plans.pop();
    summary.losses = losses.into_inner().unwrap_or_default();
    Ok(summary)
}

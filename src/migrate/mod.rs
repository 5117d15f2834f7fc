//! The migration pipeline: open the input, detect its layers, plan each
//! layer's passes, execute them, and write the result to a sink, committed
//! atomically.
//!
//! ```text
//! input (file | model dir | checkpoint dir | container)   input.rs, checkpoint.rs
//!   -> layers (migrate::detect_layers, or a container's manifest)
//!   -> plan: per layer, passes, lossless / exact / lossy  plan.rs, target.rs
//!   -> execute: layer by layer, in parallel, streamed     execute.rs
//!   -> sink (safetensors file | directory | container)    sink.rs, sidefiles.rs
//! ```
//!
//! `check`, `verify` and `inspect`-side helpers live beside it (check.rs,
//! verify.rs). Everything before execution reads headers only: that is
//! what `inspect`, `check` and `--dry-run` show.

mod check;
mod checkpoint;
pub(crate) mod detect;
mod execute;
mod gguf;
mod input;
mod inspect;
// planned jobs are driven from the command line (`migrate plan`, `run-shard`, `finish`)
#[cfg(feature = "cli")]
pub(crate) mod jobs;
mod load;
mod options;
mod ordered;
pub(crate) mod plan;
pub(crate) mod sidefiles;
pub(crate) mod sink;
mod verify;

pub use crate::layout::family::Pass;
pub use check::{check, like_target, like_tensors, CheckReport, LayoutMismatch};
pub(crate) use checkpoint::{convert_checkpoint_dir, is_training_checkpoint};
pub(crate) use detect::detect_layers;
pub use detect::{report_layers, LayerReport, Suspect};
pub(crate) use detect::{source_layers, suspects};
pub use input::input_layers;
pub(crate) use input::{input_suspects, misaligned_integer_weights};
pub use inspect::{inspect, InspectReport};
pub use load::load;
pub use options::{output_kind, ConvertOptions, OutputKind, Summary};
pub use plan::{
    execute, plan, Executed, LayerPlan, LayoutTarget, LikeLayer, Loss, Plan, PlanOptions, Produced,
    Rename, Target,
};
pub(crate) use sink::{check_free_space, model_stem};
pub use verify::verify;

pub(crate) use execute::*;
pub(crate) use input::*;
pub(crate) use ordered::write_shard_once;
pub(crate) use sidefiles::*;
pub(crate) use sink::*;

use crate::error::{Error, ErrorKind, Result};
use crate::io::atomic::{AtomicDir, DestKind};
use crate::io::open::{input_kind, open_source, InputKind};
use crate::io::source::{Checked, TensorSource};
use crate::io::writer::{ContainerOptions, ContainerWriter, SafetensorsWriter};

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Converts `input` to `output` (the kinds follow the paths: a
/// `.safetensors` file, a `.ckpk` container, or a directory), planned per
/// layer for `opts.target`, executed in parallel with memory bounded by the
/// largest tensor, checked against the input's recorded hashes as it reads,
/// and committed atomically.
///
/// Progress and cancellation are per call ([`Control`](crate::Control)):
///
/// ```no_run
/// # fn main() -> ckptkit::Result<()> {
/// use ckptkit::migrate::{convert, ConvertOptions, Target};
/// use ckptkit::{Cancel, Control};
///
/// let cancel = Cancel::new(); // cancel.cancel() from anywhere stops it
/// let opts = ConvertOptions::default()
///     .target(Target::parse("plain:bf16")?)
///     .control(
///         Control::new()
///             .with_cancel(cancel.clone())
///             .with_progress(|p| eprintln!("{} / {} bytes", p.bytes_done, p.bytes_total)),
///     );
/// let summary = convert("model.safetensors".as_ref(), "plain.safetensors".as_ref(), &opts)?;
/// println!("{} layers, every byte read verified: {}", summary.layers, summary.input_verified);
/// # Ok(()) }
/// ```
pub fn convert(input: &Path, output: &Path, opts: &ConvertOptions) -> Result<Summary> {
    // this call's own progress counters (the options may serve other calls)
    let mut own = opts.clone();
    own.control = opts.control.fresh();
    let mut s = convert_inner(input, output, &own)?;
    s.output = output.to_path_buf();
    s.dry_run = opts.dry_run;
    if opts.dry_run {
        // nothing was read
        s.input_verified = false;
    } else if opts.output_hash && output.is_file() {
        s.blake3 = Some(crate::io::hash_file(output)?.to_hex().to_string());
    }
    own.control.finish();
    Ok(s)
}

fn convert_inner(input: &Path, output: &Path, opts: &ConvertOptions) -> Result<Summary> {
    let t0 = Instant::now();
    opts.control.check()?;
    check_overlap(input, output, opts)?;
    let okind = output_kind(output);
    if opts.compression.is_some() && okind != OutputKind::Container {
        return Err(Error::usage(format!(
            "--compress applies to .ckpk container outputs; {} is {}",
            output.display(),
            match okind {
                OutputKind::Safetensors => "a .safetensors file (safetensors has no compression)",
                OutputKind::Gguf => "a .gguf file (GGUF has no compression)",
                _ => "a directory of safetensors files (safetensors has no compression)",
            }
        )));
    }
    // only nothing, or the expected kind, may be at the output, --force or not
    let dest = if okind == OutputKind::Directory {
        DestKind::Dir
    } else {
        DestKind::File
    };
    if opts.dry_run {
        crate::io::atomic::check_destination_type(output, dest)?;
    } else {
        crate::io::atomic::check_destination(output, dest, opts.overwrite)?;
    }
    let kind = input_kind(input)?;
    if kind == InputKind::ShardedDir && is_training_checkpoint(input)? {
        let created = if opts.dry_run {
            Vec::new()
        } else {
            ensure_parent(output)?
        };
        let r = convert_checkpoint_dir(input, output, opts);
        if r.is_err() {
            for d in created.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
        }
        return r;
    }
    let src = open_source(input)?;
    if !opts.dry_run {
        let created = ensure_parent(output)?;
        let r = convert_opened(input, output, opts, kind, src.as_ref(), t0);
        if r.is_err() {
            // leave no directory we created behind
            for d in created.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
        }
        return r;
    }
    convert_opened(input, output, opts, kind, src.as_ref(), t0)
}

pub(crate) fn convert_opened(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
    kind: InputKind,
    raw: &dyn TensorSource,
    t0: Instant,
) -> Result<Summary> {
    // every byte read is checked against the hashes the input records
    let src = Checked::new(raw, opts.verify_input);
    let tensors = src.tensors().to_vec();
    let bytes_in: u64 = tensors.iter().map(|t| t.len).sum();
    let okind = output_kind(output);
    let multi_file = src.files().len() > 1;
    if opts.target != Target::Keep
        || !opts.select.rename.is_empty()
        || okind == OutputKind::Safetensors
        || okind == OutputKind::Gguf
        || (okind == OutputKind::Directory && !multi_file)
    {
        match convert_planned(input, output, &src, okind, opts, t0) {
            Err(e)
                if opts.target == Target::Keep && matches!(e.kind(), ErrorKind::Ambiguous(_)) => {}
            r => return r,
        }
    }
    let layers = match input_layers(input, &src, opts) {
        Ok(l) => Some(l),
        // a byte copy to safetensors needs no understanding of the layers
        Err(e) if okind != OutputKind::Container && matches!(e.kind(), ErrorKind::Ambiguous(_)) => {
            None
        }
        Err(e) => return Err(e),
    };
    if okind != OutputKind::Container {
        if let Some(l) = &layers {
            crate::layout::registry::refuse_unknown(l, UNKNOWN_OUTSIDE)
                .map_err(|e| e.with_file(input))?;
        }
    }
    let n_layers = layers
        .as_ref()
        .map(|l| l.len())
        .unwrap_or_else(|| count_layers(&tensors));
    if opts.dry_run {
        return Ok(Summary {
            tensors: tensors.len(),
            layers: n_layers,
            bytes_in,
            seconds: t0.elapsed().as_secs_f64(),
            ..Default::default()
        });
    }
    check_free_space(output, bytes_in)?;
    opts.control.set_total(bytes_in);
    let (mut carried, mut skipped) = (Vec::new(), Vec::new());
    let files = match okind {
        OutputKind::Safetensors => {
            let mut md = src.metadata().clone();
            md.entry("format".into()).or_insert_with(|| "pt".into());
            write_safetensors(&src, &tensors, output, &md, opts)?;
            vec![output.to_path_buf()]
        }
        OutputKind::Container => {
            let carry = Carry::of(input, raw)?;
            write_container(&src, output, layers, &carry, opts)?;
            vec![output.to_path_buf()]
        }
        OutputKind::Gguf => {
            // a GGUF output needs each tensor's ggml type: only planned
            return Err(Error::usage(format!(
                "{} needs every layer's layout known to be written as GGUF (give the hint the \
                 ambiguity error names)",
                input.display()
            )));
        }
        OutputKind::Directory => {
            let (f, (c, sk)) = write_directory(&src, kind, input, output, opts)?;
            carried = c;
            skipped = sk;
            f
        }
    };
    let mut bytes_out = 0;
    for f in &files {
        bytes_out += dir_size(f);
    }
    Ok(Summary {
        tensors: tensors.len(),
        layers: n_layers,
        bytes_in,
        bytes_out,
        files,
        seconds: t0.elapsed().as_secs_f64(),
        plan: None,
        losses: Vec::new(),
        input_verified: opts.verify_input && src.unchecked() == 0,
        input_unchecked: src.unchecked(),
        warnings: Vec::new(),
        carried,
        skipped,
        ..Default::default()
    })
}

/// What writing a layer of an unknown family outside a container would do.
pub(crate) const UNKNOWN_OUTSIDE: &str =
    "write it outside a container (safetensors has no place for its record, which would be \
     lost)";

/// A planned conversion's plan: the input's layers (`unknown`: refuse
/// layers of unknown families, saying what would be done with them), the
/// plan with its renames, refusing layers that look quantized in a layout
/// ckptkit does not know, a plan that changes nothing (`refuse_unchanged`)
/// and a reference with layers the input lacks. Returns the plan and the
/// selection's warnings.
pub(crate) fn planned(
    input: &Path,
    src: &Checked<'_>,
    unknown: Option<&str>,
    refuse_unchanged: bool,
    opts: &ConvertOptions,
) -> Result<(Plan, Vec<String>)> {
    let layers = input_layers(input, src, opts).map_err(|e| e.with_file(input))?;
    if let Some(doing) = unknown {
        crate::layout::registry::refuse_unknown(&layers, doing).map_err(|e| e.with_file(input))?;
    }
    let mut p = plan(&layers, &opts.target, &opts.select).map_err(|e| e.with_file(input))?;
    crate::migrate::plan::apply_renames(&mut p, &opts.select.rename)?;
    refuse_suspects(&p, &input_suspects(input, src, &layers)?, opts)
        .map_err(|e| e.with_file(input))?;
    let warnings = selection_warnings(&layers, opts);
    if refuse_unchanged {
        refuse_no_change(&[&p], &warnings, opts)?;
    }
    if !p.unmatched.is_empty() {
        let n = p.unmatched.len();
        let list: Vec<&str> = p.unmatched.iter().take(20).map(|s| s.as_str()).collect();
        return Err(Error::layout(format!(
            "the reference expects {n} layer(s) the input does not have: {}{}",
            list.join(", "),
            if n > 20 { ", ..." } else { "" }
        )));
    }
    Ok((p, warnings))
}

pub(crate) fn convert_planned(
    input: &Path,
    output: &Path,
    src: &Checked<'_>,
    okind: OutputKind,
    opts: &ConvertOptions,
    t0: Instant,
) -> Result<Summary> {
    let unknown = (okind != OutputKind::Container).then_some(UNKNOWN_OUTSIDE);
    let (p, warnings) = planned(input, src, unknown, true, opts)?;
    let bytes_in: u64 = p.layers.iter().map(|l| l.bytes_in).sum();
    let bytes_out: u64 = p.layers.iter().map(|l| l.bytes_out).sum();
    let mut summary = Summary {
        tensors: p.outputs().len(),
        layers: p.layers.len(),
        bytes_in,
        bytes_out,
        files: vec![output.to_path_buf()],
        seconds: 0.0,
        plan: None,
        losses: Vec::new(),
        input_verified: false,
        input_unchecked: 0,
        warnings,
        ..Default::default()
    };
    // a GGUF output's tensors and metadata are known from the plan, so a
    // dry run reports what they refuse or warn about
    let gguf_out = match okind {
        OutputKind::Gguf => {
            let (tensors, orig) = gguf::tensors(&p).map_err(|e| e.with_file(input))?;
            let layers: Vec<&crate::format::manifest::Layer> =
                p.layers.iter().map(|l| &l.output).collect();
            let (kvs, notes) = gguf::kvs(
                src.metadata(),
                opts.gguf_arch.as_deref(),
                &tensors,
                orig,
                crate::layout::gguf::tensors_entry(&layers),
            )
            .map_err(|e| e.with_file(input))?;
            summary.warnings.extend(notes);
            Some((tensors, kvs))
        }
        _ => None,
    };
    if opts.dry_run {
        summary.seconds = t0.elapsed().as_secs_f64();
        summary.plan = Some(p);
        return Ok(summary);
    }
    check_free_space(output, bytes_out)?;
    opts.control.set_total(bytes_out);
    let losses: Losses = Default::default();
    let md = output_metadata(src.metadata(), &p);
    match okind {
        OutputKind::Safetensors => {
            let slots = claim_companions(input, output, opts, p.companions())?;
            let w =
                SafetensorsWriter::create(output, &p.outputs(), &md, opts.overwrite, opts.hashes)?
                    .with_control(opts.control.clone());
            let all: Vec<usize> = (0..p.layers.len()).collect();
            run_layers(src, &p, &all, &losses, &w, &opts.control)?;
            commit_with_companions(w, slots)?;
        }
        OutputKind::Gguf => {
            let Some((tensors, kvs)) = gguf_out else {
                return Err(Error::usage("internal: a GGUF output without its header"));
            };
            let w = crate::io::gguf_writer::GgufWriter::create(
                output,
                &kvs,
                &tensors,
                crate::format::gguf::read::DEFAULT_ALIGNMENT,
                opts.overwrite,
            )?
            .with_control(opts.control.clone());
            let all: Vec<usize> = (0..p.layers.len()).collect();
            run_layers(src, &p, &all, &losses, &w, &opts.control)?;
            w.finish()?;
        }
        OutputKind::Directory => {
            let dir = AtomicDir::create(output, opts.overwrite)?;
            if input.is_dir() {
                let (c, sk) = carry_model_files(input, dir.path(), &opts.control)?;
                summary.carried = c;
                summary.skipped = sk;
            }
            let stem = model_stem(&src.files());
            write_model_dir(src, &p, &losses, dir.path(), &stem, &md, opts)?;
            summary
                .warnings
                .extend(update_config(input, &dir.path().join("config.json"), &p)?);
            dir.commit()?;
        }
        OutputKind::Container => {
            let carry = Carry::of(input, src.inner())?;
            let co = ContainerOptions {
                compression: opts.compression,
                overwrite: opts.overwrite,
            };
            write_planned_container(src, &p, &losses, output, co, &md, &carry, opts)?;
        }
    }
    summary.seconds = t0.elapsed().as_secs_f64();
    summary.bytes_out = dir_size(output);
    summary.plan = Some(p);
    summary.losses = losses.into_inner().unwrap_or_default();
    summary.input_verified = opts.verify_input && src.unchecked() == 0;
    summary.input_unchecked = src.unchecked();
    Ok(summary)
}

/// Writes a plan's output as a container at `dest`: the layers of each
/// shard executed in parallel into an uncompressed shard (positioned
/// writes, any order), or, compressed, walked in data order and every
/// tensor written once ([`write_shard_once`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_planned_container(
    src: &Checked<'_>,
    p: &Plan,
    losses: &Losses,
    dest: &Path,
    co: ContainerOptions,
    md: &BTreeMap<String, String>,
    carry: &Carry,
    opts: &ConvertOptions,
) -> Result<()> {
    let compressed = co.compression.is_some();
    let mut w = ContainerWriter::create(dest, co)?.with_control(opts.control.clone());
    let groups = group_layers(p, opts.max_shard_size);
    let n = groups.len();
    let mut out_layers = Vec::new();
    for (gi, g) in groups.iter().enumerate() {
        let name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", gi + 1)
        };
        w.begin_shard(&name, &outputs_of(p, g), md)?;
        if compressed {
            write_shard_once(src, p, g, losses, &w, &opts.control)?;
        } else {
            run_layers(src, p, g, losses, &w, &opts.control)?;
        }
        w.finish_shard()?;
        for &i in g {
            let mut l = p.layers[i].output.clone();
            for t in &mut l.tensors {
                for part in &mut t.parts {
                    part.shard = gi as u32;
                }
            }
            out_layers.push(l);
        }
    }
    w.finish_with_provenance(
        Some(out_layers),
        carry.metadata.clone(),
        carry.extensions.clone(),
        carry.sources.clone(),
    )?;
    Ok(())
}

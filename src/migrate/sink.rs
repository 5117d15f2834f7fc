//! Sinks: where a conversion's tensors go (a safetensors file with its
//! `quanto_qmap.json`, a directory of shards, a container), streamed and
//! committed atomically.

use crate::error::{Error, ErrorKind, Result};
use crate::format::manifest::{Layer, SourceFile};
use crate::format::st_header::data_order;
use crate::io::atomic::AtomicDir;
use crate::io::open::{input_kind, InputKind};
use crate::io::sharded::{find_index, plan_shards, ShardIndex};
use crate::io::source::{Checked, SourceTensor, TensorSource};
use crate::io::writer::{ContainerOptions, ContainerWriter, SafetensorsWriter};
use crate::layout::registry::companion_names;
use crate::migrate::plan::Plan;
use crate::Dtype;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;

/// What a container output carries over from its input besides tensors
/// and layers: a container input's user metadata and extensions, and the
/// input as provenance.
#[derive(Debug, Clone, Default)]
pub(crate) struct Carry {
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) extensions: Vec<crate::format::manifest::Extension>,
    pub(crate) sources: Vec<SourceFile>,
}

impl Carry {
    pub(crate) fn of(input: &Path, src: &dyn TensorSource) -> Result<Carry> {
        // a remote input is recorded by its URL, never its local stand-in
        let (path, size) = crate::io::open::remote_origin(input).unwrap_or_else(|| {
            let size = std::fs::metadata(input)
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .unwrap_or(0);
            (input.display().to_string(), size)
        });
        let sources = vec![SourceFile {
            path,
            size,
            blake3: None,
        }];
        if input_kind(input)? != InputKind::Container {
            return Ok(Carry {
                sources,
                ..Default::default()
            });
        }
        let c = crate::io::open::open_container(input)?;
        Ok(Carry {
            metadata: src.metadata().clone(),
            extensions: c.manifest().extensions.clone(),
            sources,
        })
    }
}

pub(crate) fn dir_size(p: &Path) -> u64 {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| dir_size(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

/// Refuses to start when the output's file system has less free space than
/// the bytes about to be written (plus 1 %).
pub fn check_free_space(output: &Path, need: u64) -> Result<()> {
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return Ok(());
    };
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid
    // NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Ok(());
    }
    let free = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
    let need = need.saturating_add(need / 100);
    if free < need {
        return Err(Error::new(ErrorKind::Unsupported(format!(
            "not enough free space in {}: {need} bytes needed, {free} available",
            dir.display()
        ))));
    }
    Ok(())
}

/// Where tensors go: a writer that takes whole tensors or streams them,
/// from several threads (positioned writes).
pub(crate) trait Sink: Sync {
    /// Writes one whole tensor.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<()>;
    /// Writes one tensor streamed by `feed`; returns its blake3 when asked
    /// (or when the sink hashes anyway).
    fn put_from(
        &self,
        key: &str,
        want_hash: bool,
        feed: &mut crate::io::Feed<'_>,
    ) -> Result<Option<crate::format::manifest::Hash>>;
}

impl Sink for SafetensorsWriter {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.write_tensor(key, bytes)
    }
    fn put_from(
        &self,
        key: &str,
        want_hash: bool,
        feed: &mut crate::io::Feed<'_>,
    ) -> Result<Option<crate::format::manifest::Hash>> {
        self.write_from(key, want_hash, feed)
    }
}

impl Sink for ContainerWriter {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.write_tensor(key, bytes).map(|_| ())
    }
    fn put_from(
        &self,
        key: &str,
        _want_hash: bool,
        feed: &mut crate::io::Feed<'_>,
    ) -> Result<Option<crate::format::manifest::Hash>> {
        self.write_from(key, feed).map(Some)
    }
}

pub(crate) fn plan_of(tensors: &[&SourceTensor]) -> Vec<(String, Dtype, Vec<u64>)> {
    tensors
        .iter()
        .map(|t| (t.key.clone(), t.dtype, t.shape.clone()))
        .collect()
}

/// Copies one tensor from `from` (a source key) to `to` (an output key),
/// streamed piece by piece whatever its size; the bytes are hashed as they
/// are written and, when the source records a hash and `src` verifies,
/// checked against it (a mismatch fails the conversion like `verify`).
pub(crate) fn copy_one(src: &Checked<'_>, from: &str, to: &str, sink: &dyn Sink) -> Result<()> {
    let want = if src.verifying() {
        src.recorded_hash(from)?
    } else {
        None
    };
    let got = sink.put_from(to, want.is_some(), &mut |put| {
        src.inner().read_pieces(from, put)
    })?;
    match (want, got) {
        (Some(w), Some(g)) if w != g => {
            Err(crate::io::source::hash_mismatch(src.inner(), from, &w, &g))
        }
        (Some(_), _) => Ok(()),
        (None, _) => {
            src.note_unchecked();
            Ok(())
        }
    }
}

/// Copies tensors from a source into a positioned writer in parallel,
/// streamed and checked ([`copy_one`]).
pub(crate) fn copy_parallel(
    src: &Checked<'_>,
    tensors: &[&SourceTensor],
    sink: &dyn Sink,
) -> Result<()> {
    tensors
        .par_iter()
        .try_for_each(|t| copy_one(src, &t.key, &t.key, sink))
}

pub(crate) fn write_safetensors(
    src: &Checked<'_>,
    tensors: &[SourceTensor],
    output: &Path,
    md: &BTreeMap<String, String>,
    opts: &ConvertOptions,
) -> Result<()> {
    let refs: Vec<&SourceTensor> = tensors.iter().collect();
    let w = SafetensorsWriter::create(output, &plan_of(&refs), md, opts.overwrite, opts.hashes)?
        .with_control(opts.control.clone());
    copy_parallel(src, &refs, &w)?;
    w.finish()?;
    Ok(())
}

pub(crate) fn write_container(
    src: &Checked<'_>,
    output: &Path,
    layers: Option<Vec<Layer>>,
    carry: &Carry,
    opts: &ConvertOptions,
) -> Result<()> {
    let mut w = ContainerWriter::create(
        output,
        ContainerOptions {
            compression: opts.compression,
            overwrite: opts.overwrite,
        },
    )?
    .with_control(opts.control.clone());
    copy_shards(src, &mut w, opts.compression.is_some())?;
    w.finish_with_provenance(
        layers,
        carry.metadata.clone(),
        carry.extensions.clone(),
        carry.sources.clone(),
    )?;
    Ok(())
}

/// Copies every file (shard) of a source into a container writer as one
/// shard each, keeping names and metadata.
pub(crate) fn copy_shards(
    src: &Checked<'_>,
    w: &mut ContainerWriter,
    compressed: bool,
) -> Result<()> {
    let names = src.files();
    let mut by_file: Vec<Vec<&SourceTensor>> = vec![Vec::new(); names.len()];
    for t in src.tensors() {
        if let Some(v) = by_file.get_mut(t.file) {
            v.push(t);
        }
    }
    for (fi, name) in names.iter().enumerate() {
        let ts = &by_file[fi];
        let plan = plan_of(ts);
        w.begin_shard(name, &plan, &src.file_metadata(fi))?;
        if compressed {
            // compressed shards take tensors in data order, each streamed
            // chunk by chunk
            let mut order = plan.clone();
            data_order(&mut order);
            for (k, _, _) in &order {
                copy_one(src, k, k, w)?;
            }
        } else {
            copy_parallel(src, ts, w)?;
        }
        w.finish_shard()?;
    }
    Ok(())
}

/// What a directory output carried from a model directory: names carried,
/// names skipped (with why).
pub(crate) type Carried = (Vec<String>, Vec<String>);

pub(crate) fn write_directory(
    src: &Checked<'_>,
    kind: InputKind,
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
) -> Result<(Vec<PathBuf>, Carried)> {
    let dir = AtomicDir::create(output, opts.overwrite)?;
    let carried = if input.is_dir() {
        carry_model_files(input, dir.path(), &opts.control)?
    } else {
        Default::default()
    };
    let names = src.files();
    // Keep the input's file names and grouping when it has several files;
    // otherwise split by size with the usual naming.
    let groups: Vec<(String, Vec<&SourceTensor>)> = if names.len() > 1 {
        names
            .iter()
            .enumerate()
            .map(|(fi, n)| {
                (
                    n.clone(),
                    src.tensors().iter().filter(|t| t.file == fi).collect(),
                )
            })
            .collect()
    } else {
        let stem = model_stem(&names);
        let list: Vec<(String, u64)> = src
            .tensors()
            .iter()
            .map(|t| (t.key.clone(), t.len))
            .collect();
        plan_shards(&stem, &list, opts.max_shard_size)
            .into_iter()
            .map(|(n, keys)| {
                let ts = keys.iter().filter_map(|k| src.get(k)).collect();
                (n, ts)
            })
            .collect()
    };
    let mut index = ShardIndex::default();
    let mut total = 0u64;
    for (fi, (name, ts)) in groups.iter().enumerate() {
        let mut md = if names.len() > 1 {
            src.file_metadata(fi)
        } else {
            src.metadata().clone()
        };
        md.entry("format".into()).or_insert_with(|| "pt".into());
        let p = dir.path().join(name);
        let w = SafetensorsWriter::create(&p, &plan_of(ts), &md, false, opts.hashes)?
            .with_control(opts.control.clone());
        copy_parallel(src, ts, &w)?;
        w.finish()?;
        for t in ts {
            index.weight_map.insert(t.key.clone(), name.clone());
            total += t.len;
        }
    }
    if groups.len() > 1 {
        index
            .metadata
            .insert("total_size".into(), serde_json::Value::from(total));
        let index_name = match (kind, find_index(input).ok().flatten()) {
            (InputKind::ShardedDir, Some(p)) => p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model.safetensors.index.json".into()),
            _ => {
                let stem = groups[0].0.split('-').next().unwrap_or("model");
                format!("{stem}.safetensors.index.json")
            }
        };
        let text =
            serde_json::to_string_pretty(&index).map_err(|e| Error::json("writing JSON", e))?;
        std::fs::write(dir.path().join(index_name), text)?;
    }
    dir.commit()?;
    Ok((vec![output.to_path_buf()], carried))
}

/// Groups whole layers into output files of at most `max` bytes each.
pub(crate) fn group_layers(p: &Plan, max: u64) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut cur = Vec::new();
    let mut size = 0u64;
    for (i, l) in p.layers.iter().enumerate() {
        if !cur.is_empty() && size.saturating_add(l.bytes_out) > max {
            groups.push(std::mem::take(&mut cur));
            size = 0;
        }
        cur.push(i);
        size = size.saturating_add(l.bytes_out);
    }
    if !cur.is_empty() || groups.is_empty() {
        groups.push(cur);
    }
    groups
}

pub(crate) fn outputs_of(p: &Plan, idx: &[usize]) -> Vec<(String, Dtype, Vec<u64>)> {
    idx.iter()
        .flat_map(|&i| {
            p.layers[i]
                .output
                .parts()
                .map(|q| (q.key.clone(), q.dtype, q.shape.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The file-name stem of the input's weight files, so that outputs follow
/// its convention: the stem of sharded names (`model`,
/// `diffusion_pytorch_model`, `consolidated` from
/// `consolidated-00001-of-00002.safetensors`) or of the transformers and
/// diffusers single-file names; `model` otherwise (a directory made from a
/// lone `flux1-dev.safetensors` is named as transformers expects).
pub fn model_stem(files: &[String]) -> String {
    files
        .first()
        .filter(|n| n.contains("-of-") || crate::io::sharded::is_weight_file_name(n))
        .and_then(|n| crate::io::sharded::weight_file_stem(n))
        .filter(|s| crate::format::validate::safe_file_name(s))
        .unwrap_or("model")
        .to_string()
}

/// The name of output file `gi` of `n` in a directory: `{stem}.safetensors`
/// alone, else `{stem}-0000k-of-0000n.safetensors`.
pub(crate) fn shard_name(stem: &str, gi: usize, n: usize) -> String {
    if n == 1 {
        format!("{stem}.safetensors")
    } else {
        format!("{stem}-{:05}-of-{n:05}.safetensors", gi + 1)
    }
}

/// Writes output file `gi` of a directory (`groups` from [`group_layers`])
/// into `dir`, committed in place.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_model_shard(
    src: &Checked<'_>,
    p: &Plan,
    groups: &[Vec<usize>],
    gi: usize,
    losses: &Losses,
    dir: &Path,
    stem: &str,
    md: &BTreeMap<String, String>,
    opts: &ConvertOptions,
) -> Result<()> {
    let name = shard_name(stem, gi, groups.len());
    let outs = outputs_of(p, &groups[gi]);
    let w = SafetensorsWriter::create(&dir.join(&name), &outs, md, true, opts.hashes)?
        .with_control(opts.control.clone());
    run_layers(src, p, &groups[gi], losses, &w, &opts.control)?;
    w.finish()
}

/// Writes what a directory holds beside its weight files: the index when
/// there are several, and the families' side files (`quanto_qmap.json`).
pub(crate) fn write_model_tail(
    p: &Plan,
    groups: &[Vec<usize>],
    dir: &Path,
    stem: &str,
) -> Result<()> {
    let n = groups.len();
    if n > 1 {
        let mut index = ShardIndex::default();
        let mut total = 0u64;
        for (gi, g) in groups.iter().enumerate() {
            let name = shard_name(stem, gi, n);
            for (k, d, s) in outputs_of(p, g) {
                total += crate::dtype::byte_len(d, &s)?;
                index.weight_map.insert(k, name.clone());
            }
        }
        index
            .metadata
            .insert("total_size".into(), serde_json::Value::from(total));
        let text =
            serde_json::to_string_pretty(&index).map_err(|e| Error::json("writing JSON", e))?;
        std::fs::write(dir.join(format!("{stem}.safetensors.index.json")), text)?;
    }
    for (name, text) in p.companions() {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(())
}

/// Writes a plan's output as `{stem}.safetensors` or
/// `{stem}-0000k-of-0000n.safetensors` + `{stem}.safetensors.index.json`
/// (+ `quanto_qmap.json`) into an existing directory.
pub(crate) fn write_model_dir(
    src: &Checked<'_>,
    p: &Plan,
    losses: &Losses,
    dir: &Path,
    stem: &str,
    md: &BTreeMap<String, String>,
    opts: &ConvertOptions,
) -> Result<()> {
    let groups = group_layers(p, opts.max_shard_size);
    for gi in 0..groups.len() {
        write_model_shard(src, p, &groups, gi, losses, dir, stem, md, opts)?;
        let name = shard_name(stem, gi, groups.len());
        opts.control.file_done(&dir.join(&name), &name)?;
    }
    write_model_tail(p, &groups, dir, stem)
}

/// What happens to one companion file (a family's side file, such as
/// quanto's `quanto_qmap.json`) beside a safetensors output.
pub(crate) enum Companion {
    /// It is written (locked from now until the commit) with these contents.
    Write(crate::io::atomic::AtomicFile, String),
    /// The output's stale one is removed with the commit.
    Remove(crate::io::atomic::Removal),
}

/// The companion files beside a safetensors output belong to that output
/// alone. For each name a family writes ([`companion_names`]), refused:
/// touching one the conversion reads (the input's); touching one that
/// belongs to another weights file in the directory (replacing it breaks
/// that model; leaving it beside an output that needs none recreates the
/// mismatch ckptkit exists to prevent); replacing or removing an existing
/// one without `overwrite`. The slots are locked before any tensor is
/// written, so a second writer of the same file is refused at once.
/// `wanted`: the companions the output needs, with their contents.
pub(crate) fn claim_companions(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
    wanted: Vec<(&'static str, String)>,
) -> Result<Vec<Companion>> {
    let mut slots = Vec::new();
    for name in companion_names() {
        let text = wanted
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t.clone());
        let path = output.with_file_name(name);
        let exists = std::fs::symlink_metadata(&path).is_ok();
        let write = text.is_some();
        if exists || write {
            let q = crate::io::paths::resolve(&path);
            if let Some(r) = read_set(input, opts)
                .into_iter()
                .find(|r| crate::io::paths::resolve(r) == q)
            {
                return Err(Error::usage(format!(
                    "{} would {} {}, which this conversion reads; write the output to another \
                     directory",
                    output.display(),
                    if write { "replace" } else { "remove" },
                    r.display()
                )));
            }
        }
        if exists {
            crate::io::atomic::check_destination(&path, crate::io::atomic::DestKind::File, true)?;
            let others = other_weight_files(output)?;
            if !others.is_empty() {
                return Err(Error::new(ErrorKind::Conflict(format!(
                    "{} belongs to another weights file in this directory ({}); {} it would break \
                     that model{}; write the output to another directory",
                    path.display(),
                    others.join(", "),
                    if write { "replacing" } else { "removing" },
                    if write {
                        ""
                    } else {
                        ", and leaving it beside this output would describe the wrong file"
                    }
                )))
                .with_file(&path));
            }
            if !opts.overwrite {
                return Err(Error::new(ErrorKind::OutputExists(path)));
            }
        }
        match text {
            Some(t) => slots.push(Companion::Write(
                crate::io::atomic::AtomicFile::create(&path, true)?,
                t,
            )),
            None if exists => {
                slots.push(Companion::Remove(crate::io::atomic::Removal::new(&path)?))
            }
            None => {}
        }
    }
    Ok(slots)
}

/// The `*.safetensors` files in an output's directory other than the output
/// itself (regular, not hidden), sorted.
pub(crate) fn other_weight_files(output: &Path) -> Result<Vec<String>> {
    let dir = output
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let me = output.file_name();
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(v);
    };
    for e in rd.flatten() {
        let n = e.file_name();
        let s = n.to_string_lossy();
        if Some(n.as_os_str()) == me || s.starts_with('.') || !s.ends_with(".safetensors") {
            continue;
        }
        if std::fs::metadata(e.path()).is_ok_and(|m| m.is_file()) {
            v.push(s.into_owned());
        }
    }
    v.sort();
    Ok(v)
}

/// Commits a safetensors output together with its companion files
/// (written, or removed when the output needs none), through one journal:
/// a companion never describes another file.
pub(crate) fn commit_with_companions(w: SafetensorsWriter, slots: Vec<Companion>) -> Result<()> {
    let weights = w.finish_pending()?;
    if slots.is_empty() {
        return weights.commit();
    }
    // weights first: the journal is named after them
    let mut writes = vec![weights];
    let mut removes = Vec::new();
    for s in slots {
        match s {
            Companion::Write(f, text) => {
                use std::io::Write;
                f.file()?
                    .write_all(text.as_bytes())
                    .map_err(|e| Error::from(e).with_file(f.temp()))?;
                writes.push(f);
            }
            Companion::Remove(r) => removes.push(r),
        }
    }
    crate::io::atomic::commit_together(writes, removes)
}

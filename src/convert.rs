//! Whole-checkpoint conversion: read any source, write any sink, atomically.
//!
//! Today this carries tensors across unchanged (`keep`): safetensors file,
//! sharded directory or container in; safetensors file, sharded directory
//! or container out. Layer-level migration passes plug in here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

use crate::error::{Error, ErrorKind, Result};
use crate::format::manifest::{Layer, SourceFile};
use crate::format::st_header::crate_order;
use crate::io::atomic::{check_interrupt, clean_stale_temps, AtomicDir};
use crate::io::container::Container;
use crate::io::sharded::{find_index, plan_shards, ShardIndex};
use crate::io::source::{input_kind, open_source, InputKind, SourceTensor, TensorSource};
use crate::io::writer::{ContainerOptions, ContainerWriter, SafetensorsWriter, ZstdOptions};
use crate::Dtype;

/// The kind of output, decided by the output path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// `*.safetensors`: one file.
    Safetensors,
    /// `*.ckpk`: a container.
    Container,
    /// Anything else: a directory of safetensors shards with an index.
    Directory,
}

/// Decides the output kind from the path's extension.
pub fn output_kind(path: &Path) -> OutputKind {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => OutputKind::Safetensors,
        Some("ckpk") => OutputKind::Container,
        _ => OutputKind::Directory,
    }
}

/// Options of [`convert`].
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// zstd settings for container outputs (`None` = uncompressed).
    pub compression: Option<ZstdOptions>,
    /// Replace an existing output.
    pub overwrite: bool,
    /// Plan only: validate the input and report, write nothing.
    pub dry_run: bool,
    /// Largest data size of one file when writing a directory.
    pub max_shard_size: u64,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            compression: None,
            overwrite: false,
            dry_run: false,
            max_shard_size: 5_000_000_000,
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Stored tensors written.
    pub tensors: usize,
    /// Layers in the output.
    pub layers: usize,
    /// Tensor bytes read.
    pub bytes_in: u64,
    /// Bytes of the output files.
    pub bytes_out: u64,
    /// Output files written.
    pub files: Vec<PathBuf>,
    /// Wall time in seconds.
    pub seconds: f64,
}

fn same_or_inside(input: &Path, output: &Path) -> Result<bool> {
    let inp = input
        .canonicalize()
        .map_err(|e| Error::from(e).with_file(input))?;
    let parent = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(par) = parent.canonicalize() else {
        return Ok(false);
    };
    let out = match output.file_name() {
        Some(n) => par.join(n),
        None => par,
    };
    Ok(out == inp || out.starts_with(&inp))
}

/// Converts `input` to `output`, carrying every tensor across unchanged.
pub fn convert(input: &Path, output: &Path, opts: &ConvertOptions) -> Result<Summary> {
    let t0 = Instant::now();
    if same_or_inside(input, output)? {
        return Err(Error::usage(format!(
            "output {} is the input or lies inside it; choose another path",
            output.display()
        )));
    }
    let kind = input_kind(input)?;
    let src = open_source(input)?;
    let tensors = src.tensors().to_vec();
    let bytes_in: u64 = tensors.iter().map(|t| t.len).sum();
    let okind = output_kind(output);
    if !opts.overwrite && std::fs::symlink_metadata(output).is_ok() {
        return Err(Error::new(ErrorKind::OutputExists(output.to_path_buf())));
    }
    let layers = if kind == InputKind::Container {
        Some(Container::open(input)?.layers().to_vec())
    } else {
        None
    };
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
    clean_stale_temps(output);
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(Error::new(ErrorKind::NotFound(format!(
                "output directory {} does not exist",
                parent.display()
            ))));
        }
    }
    check_free_space(output, bytes_in)?;
    let files = match okind {
        OutputKind::Safetensors => {
            let mut md = src.metadata().clone();
            md.entry("format".into()).or_insert_with(|| "pt".into());
            write_safetensors(src.as_ref(), &tensors, output, &md, opts.overwrite)?;
            vec![output.to_path_buf()]
        }
        OutputKind::Container => {
            write_container(src.as_ref(), input, output, layers, opts)?;
            vec![output.to_path_buf()]
        }
        OutputKind::Directory => write_directory(src.as_ref(), kind, input, output, opts)?,
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
    })
}

fn dir_size(p: &Path) -> u64 {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| dir_size(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

fn count_layers(tensors: &[SourceTensor]) -> usize {
    let mut s: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for t in tensors {
        s.insert(crate::schema::split_key(&t.key).0);
    }
    s.len()
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

fn plan_of(tensors: &[&SourceTensor]) -> Vec<(String, Dtype, Vec<u64>)> {
    tensors
        .iter()
        .map(|t| (t.key.clone(), t.dtype, t.shape.clone()))
        .collect()
}

/// Copies tensors from a source into a positioned writer in parallel.
fn copy_parallel(
    src: &dyn TensorSource,
    tensors: &[&SourceTensor],
    write: &(dyn Fn(&str, &[u8]) -> Result<[u8; 32]> + Sync),
) -> Result<()> {
    tensors.par_iter().try_for_each(|t| {
        check_interrupt()?;
        let b = src.read(&t.key)?;
        write(&t.key, &b)?;
        Ok(())
    })
}

fn write_safetensors(
    src: &dyn TensorSource,
    tensors: &[SourceTensor],
    output: &Path,
    md: &BTreeMap<String, String>,
    overwrite: bool,
) -> Result<()> {
    let refs: Vec<&SourceTensor> = tensors.iter().collect();
    let w = SafetensorsWriter::create(output, &plan_of(&refs), md, overwrite)?;
    copy_parallel(src, &refs, &|k, b| w.write_tensor(k, b))?;
    w.finish()?;
    Ok(())
}

fn write_container(
    src: &dyn TensorSource,
    input: &Path,
    output: &Path,
    layers: Option<Vec<Layer>>,
    opts: &ConvertOptions,
) -> Result<()> {
    let mut w = ContainerWriter::create(
        output,
        ContainerOptions {
            compression: opts.compression,
            overwrite: opts.overwrite,
        },
    )?;
    let names = src.files();
    for (fi, name) in names.iter().enumerate() {
        let ts: Vec<&SourceTensor> = src.tensors().iter().filter(|t| t.file == fi).collect();
        let plan = plan_of(&ts);
        w.begin_shard(name, &plan, &src.file_metadata(fi))?;
        if opts.compression.is_some() {
            let mut order = plan.clone();
            crate_order(&mut order);
            for (k, _, _) in &order {
                check_interrupt()?;
                let b = src.read(k)?;
                w.write_tensor(k, &b)?;
            }
        } else {
            let wr = &w;
            copy_parallel(src, &ts, &|k, b| wr.write_tensor(k, b))?;
        }
        w.finish_shard()?;
    }
    let metadata = if input_kind(input)? == InputKind::Container {
        src.metadata().clone()
    } else {
        BTreeMap::new()
    };
    let size = std::fs::metadata(input).map(|m| m.len()).unwrap_or(0);
    let sources = vec![SourceFile {
        path: input.display().to_string(),
        size,
        blake3: None,
    }];
    w.finish_with_provenance(layers, metadata, Vec::new(), sources)?;
    Ok(())
}

fn write_directory(
    src: &dyn TensorSource,
    kind: InputKind,
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
) -> Result<Vec<PathBuf>> {
    let dir = AtomicDir::create(output, opts.overwrite)?;
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
        let stem = names
            .first()
            .and_then(|n| n.strip_suffix(".safetensors"))
            .filter(|s| !s.is_empty())
            .unwrap_or("model")
            .to_string();
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
        let w = SafetensorsWriter::create(&p, &plan_of(ts), &md, false)?;
        copy_parallel(src, ts, &|k, b| w.write_tensor(k, b))?;
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
        let text = serde_json::to_string_pretty(&index)
            .map_err(|e| Error::new(ErrorKind::Json(e.to_string())))?;
        std::fs::write(dir.path().join(index_name), text)?;
    }
    dir.commit()?;
    Ok(vec![output.to_path_buf()])
}

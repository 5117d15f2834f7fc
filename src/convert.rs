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
use crate::format::st_header::data_order;
use crate::io::atomic::{check_interrupt, AtomicDir, DestKind};
use crate::io::container::{Container, VerifyReport};
use crate::io::safetensors_file::SafetensorsFile;
use crate::io::sharded::{find_index, plan_shards, ShardIndex, ShardedDir};
use crate::io::source::{input_kind, open_source, Checked, InputKind, SourceTensor, TensorSource};
use crate::io::writer::{ContainerOptions, ContainerWriter, SafetensorsWriter, ZstdOptions};
use crate::layout::quanto::{self, QuantoMap, QMAP_FILE};
use crate::plan::{plan, Plan, PlanOptions, Target};
use crate::schema::{detect_layers, Hints};
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
    /// Target layouts.
    pub target: Target,
    /// Layer selection.
    pub select: PlanOptions,
    /// The input's quanto map (default: `quanto_qmap.json` beside it).
    pub qmap: Option<PathBuf>,
    /// A plain checkpoint of the same model to take logical shapes from.
    pub shapes_from: Option<PathBuf>,
    /// Record every tensor's blake3 in safetensors outputs (`ckptkit.blake3`
    /// in `__metadata__`, checked by `verify`). Containers always carry
    /// hashes in their manifest.
    pub hashes: bool,
    /// Other files the conversion reads (a `--like` reference): the output
    /// may not equal, contain or lie inside them.
    pub extra_reads: Vec<PathBuf>,
    /// Check every byte read against the hashes the input records (a
    /// container's manifest, a ckptkit safetensors file's `ckptkit.blake3`),
    /// as it is read; a mismatch fails the conversion with no output.
    pub verify_input: bool,
    /// Treat layers that look quantized in an unknown layout (FP8 or int
    /// codes beside scales) as plain tensors anyway.
    pub assume_plain: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            compression: None,
            overwrite: false,
            dry_run: false,
            max_shard_size: 5_000_000_000,
            target: Target::Keep,
            select: PlanOptions::default(),
            qmap: None,
            shapes_from: None,
            hashes: true,
            extra_reads: Vec::new(),
            verify_input: true,
            assume_plain: false,
        }
    }
}

/// Reads the layers of any input: a container's manifest, or the quanto-aware
/// grouping of a safetensors source with the hints found beside it or given.
pub fn input_layers(
    input: &Path,
    src: &dyn TensorSource,
    opts: &ConvertOptions,
) -> Result<Vec<Layer>> {
    if input_kind(input)? == InputKind::Container {
        return Ok(Container::open(input)?.layers().to_vec());
    }
    let qmap = match &opts.qmap {
        Some(p) => Some(QuantoMap::from_file(p)?),
        None => quanto::qmap_beside(input)?,
    };
    let shapes = match &opts.shapes_from {
        Some(p) => Some(open_source(p)?),
        None => None,
    };
    let hints = Hints {
        qmap,
        diffusers: quanto::diffusers_beside(input)?,
        shapes_from: shapes.as_deref(),
        ..Default::default()
    };
    detect_layers(src, &hints)
}

/// The `quant_method` of a `quantization_config` in the `config.json`
/// beside an input (a file's directory, or the directory itself), if any.
fn config_quant_method(input: &Path) -> Result<Option<String>> {
    let dir = if input.is_dir() {
        input.to_path_buf()
    } else {
        input
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    };
    let p = dir.join("config.json");
    if !crate::io::files::regular_file_exists(&p)? {
        return Ok(None);
    }
    let text = quanto::read_side_file(&p)?;
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(None);
    };
    Ok(v.get("quantization_config").map(|q| {
        q.get("quant_method")
            .and_then(|m| m.as_str())
            .unwrap_or("unknown")
            .to_string()
    }))
}

/// The layers of an input that look quantized in a layout ckptkit does not
/// know ([`crate::schema::Suspect`]).
pub fn input_suspects(
    input: &Path,
    src: &dyn TensorSource,
    layers: &[Layer],
) -> Result<Vec<crate::schema::Suspect>> {
    let method = if input_kind(input)? == InputKind::Container {
        None
    } else {
        config_quant_method(input)?
    };
    Ok(crate::schema::suspects(src, layers, method.as_deref()))
}

/// Integer weight payloads of a file (I8 / U8 parts of quantized weights)
/// whose data does not start at a multiple of 16 bytes in the file: torch's
/// CPU int8 matmul (`_weight_int8pack_mm`, which optimum-quanto uses for
/// bf16 on CPU) can crash on such a tensor once `safetensors.torch.load_file`
/// maps it in place. ckptkit's own writer aligns them (spec/container.md §3).
pub fn misaligned_integer_weights(src: &dyn TensorSource, layers: &[Layer]) -> Vec<String> {
    let mut out = Vec::new();
    for l in layers {
        for t in l
            .tensors
            .iter()
            .filter(|t| t.encoding == crate::Encoding::Quantized)
        {
            for p in &t.parts {
                if !matches!(p.dtype, Dtype::I8 | Dtype::U8) || p.role != crate::Role::Data {
                    continue;
                }
                let loc = src.location(&p.key);
                // compressed container data is never mapped in place
                if let (Some(off), None) = (loc.offset, loc.shard) {
                    if off % 16 != 0 {
                        out.push(format!(
                            "`{}` ({}) starts at byte {off} of {}, not a multiple of 16: torch's \
                             CPU int8 matmul can crash on it when the file is memory-mapped \
                             (safetensors load_file); `migrate convert` writes it aligned",
                            p.key,
                            p.dtype,
                            loc.file
                                .map(|f| f.display().to_string())
                                .unwrap_or_default()
                        ));
                    }
                }
            }
        }
    }
    out
}

/// Refuses a plan that would change a layer of unknown quantized layout
/// (anything but copying it), unless the user vouches that it is plain.
fn refuse_suspects(
    p: &Plan,
    suspects: &[crate::schema::Suspect],
    opts: &ConvertOptions,
) -> Result<()> {
    if opts.assume_plain || suspects.is_empty() {
        return Ok(());
    }
    let by: std::collections::HashMap<&str, &crate::schema::Suspect> =
        suspects.iter().map(|s| (s.layer.as_str(), s)).collect();
    let bad: Vec<String> = p
        .layers
        .iter()
        .filter(|lp| lp.passes != [crate::plan::Pass::Copy])
        .filter_map(|lp| by.get(lp.source.path.as_str()).map(|s| s.describe()))
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    let n = bad.len();
    Err(Error::new(ErrorKind::UnknownQuantized(format!(
        "{n} layer(s) look quantized in a layout ckptkit does not know, and this conversion \
         would change them as if they were plain, which produces garbage: {}{}; convert them \
         with their own library, leave them out (--exclude), or pass --assume-plain if they \
         really are plain tensors",
        bad.iter().take(5).cloned().collect::<Vec<_>>().join("; "),
        if n > 5 { "; ..." } else { "" }
    ))))
}

/// Warnings about a plan: `--include` / `--exclude` patterns that match no
/// layer of the input.
fn selection_warnings(layers: &[Layer], opts: &ConvertOptions) -> Vec<String> {
    let mut w = Vec::new();
    for (flag, pats) in [
        ("--include", &opts.select.include),
        ("--exclude", &opts.select.exclude),
    ] {
        for g in pats {
            if !layers.iter().any(|l| crate::plan::fnmatch(g, &l.path)) {
                w.push(format!("{flag} `{g}` matches no layer of the input"));
            }
        }
    }
    w
}

/// An explicit `--to` that changes no layer at all is an error (exit 1),
/// not a silent copy that reports "all lossless".
fn refuse_no_change(plans: &[&Plan], warnings: &[String], opts: &ConvertOptions) -> Result<()> {
    let explicit = matches!(
        opts.target,
        Target::Plain(_) | Target::Quanto(_) | Target::Int8(_)
    );
    if !explicit || opts.dry_run {
        return Ok(());
    }
    let layers: usize = plans.iter().map(|p| p.layers.len()).sum();
    let changed = plans
        .iter()
        .flat_map(|p| &p.layers)
        .filter(|l| l.passes != [crate::plan::Pass::Copy])
        .count();
    if changed > 0 {
        return Ok(());
    }
    let selected = !opts.select.include.is_empty() || !opts.select.exclude.is_empty();
    Err(Error::new(ErrorKind::NothingChanged(format!(
        "the target layout changes none of the {layers} layer(s){}{}",
        if selected {
            " selected by --include / --exclude"
        } else {
            " (they already have it, or none can take it)"
        },
        if warnings.is_empty() {
            String::new()
        } else {
            format!(" ({})", warnings.join("; "))
        }
    ))))
}

/// What a conversion did.
#[derive(Debug, Clone, Default)]
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
    /// The plan that was executed (or would be, for a dry run).
    pub plan: Option<Plan>,
    /// Lossy re-layouts accepted with `allow_lossy`, with their errors.
    pub losses: Vec<crate::plan::Loss>,
    /// Every byte read was checked against a hash the input records
    /// (false when some input tensor records none, or with
    /// `verify_input: false`).
    pub input_verified: bool,
    /// Input tensors read whose bytes had no recorded hash to check.
    pub input_unchecked: u64,
    /// Things the user should know (`--include` patterns that matched
    /// nothing, ...).
    pub warnings: Vec<String>,
    /// Files of a model directory carried into the output unchanged
    /// (`config.json`, tokenizer files, README ...; `config.json` then
    /// follows the new layout).
    pub carried: Vec<String>,
    /// Entries of a model directory not carried, with why (weights in any
    /// format, hidden files, sub-directories).
    pub skipped: Vec<String>,
}

/// Every path a conversion reads: the input, the side files found beside a
/// file input, and the files given as hints or references.
fn read_set(input: &Path, opts: &ConvertOptions) -> Vec<PathBuf> {
    fn with_sides(v: &mut Vec<PathBuf>, p: &Path) {
        v.push(p.to_path_buf());
        if !p.is_dir() {
            let dir = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            for side in [QMAP_FILE, "config.json"] {
                let s = dir.join(side);
                if std::fs::symlink_metadata(&s).is_ok() {
                    v.push(s);
                }
            }
        }
    }
    let mut v = Vec::new();
    if input_kind(input).ok() == Some(InputKind::Safetensors) {
        with_sides(&mut v, input);
    } else {
        v.push(input.to_path_buf());
    }
    for p in opts.qmap.iter().chain(&opts.shapes_from) {
        v.push(p.clone());
    }
    for p in &opts.extra_reads {
        with_sides(&mut v, p);
    }
    v
}

/// Refuses an output that equals, contains or lies inside anything the
/// conversion reads (symlinks and not-yet-existing parents resolved). The
/// `quanto_qmap.json` slot of a safetensors output is checked when it is
/// claimed ([`claim_qmap_slot`]).
fn check_overlap(input: &Path, output: &Path, opts: &ConvertOptions) -> Result<()> {
    let writes = crate::io::paths::output_forms(output);
    for r in read_set(input, opts) {
        let rr = crate::io::paths::resolve(&r);
        for w in &writes {
            if !crate::io::paths::overlap(w, &rr) {
                continue;
            }
            let how = if *w == rr {
                "is"
            } else if w.starts_with(&rr) {
                "lies inside"
            } else {
                "contains"
            };
            let what = if r == input {
                "the input"
            } else {
                "a file this conversion reads"
            };
            return Err(Error::usage(format!(
                "output {} {how} {what} ({}); writing there could destroy it — choose another path",
                output.display(),
                r.display()
            )));
        }
    }
    Ok(())
}

/// Converts `input` to `output`, carrying every tensor across unchanged.
pub fn convert(input: &Path, output: &Path, opts: &ConvertOptions) -> Result<Summary> {
    let t0 = Instant::now();
    check_overlap(input, output, opts)?;
    let okind = output_kind(output);
    if opts.compression.is_some() && okind != OutputKind::Container {
        return Err(Error::usage(format!(
            "--compress applies to .ckpk container outputs; {} is {}",
            output.display(),
            match okind {
                OutputKind::Safetensors => "a .safetensors file (safetensors has no compression)",
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

/// Creates the missing parent directories of an output; returns them,
/// outermost first.
fn ensure_parent(output: &Path) -> Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut p = output.parent().filter(|p| !p.as_os_str().is_empty());
    while let Some(d) = p {
        if let Ok(md) = std::fs::metadata(d) {
            if !md.is_dir() {
                return Err(Error::new(ErrorKind::FileType {
                    found: crate::io::files::type_name(&md),
                    expected: "a directory",
                })
                .with_file(d));
            }
            break;
        }
        missing.push(d.to_path_buf());
        p = d.parent().filter(|p| !p.as_os_str().is_empty());
    }
    missing.reverse();
    for d in &missing {
        std::fs::create_dir(d).map_err(|e| Error::from(e).with_file(d))?;
    }
    Ok(missing)
}

fn convert_opened(
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
    })
}

/// What a container output carries over from its input besides tensors
/// and layers: a container input's user metadata and extensions, and the
/// input as provenance.
#[derive(Debug, Clone, Default)]
struct Carry {
    metadata: BTreeMap<String, String>,
    extensions: Vec<crate::format::manifest::Extension>,
    sources: Vec<SourceFile>,
}

impl Carry {
    fn of(input: &Path, src: &dyn TensorSource) -> Result<Carry> {
        let size = std::fs::metadata(input)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .unwrap_or(0);
        let sources = vec![SourceFile {
            path: input.display().to_string(),
            size,
            blake3: None,
        }];
        if input_kind(input)? != InputKind::Container {
            return Ok(Carry {
                sources,
                ..Default::default()
            });
        }
        let c = Container::open(input)?;
        Ok(Carry {
            metadata: src.metadata().clone(),
            extensions: c.manifest().extensions.clone(),
            sources,
        })
    }
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

/// Where tensors go: a writer that takes whole tensors or streams them,
/// from several threads (positioned writes).
trait Sink: Sync {
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

fn plan_of(tensors: &[&SourceTensor]) -> Vec<(String, Dtype, Vec<u64>)> {
    tensors
        .iter()
        .map(|t| (t.key.clone(), t.dtype, t.shape.clone()))
        .collect()
}

/// Copies one tensor from `from` (a source key) to `to` (an output key),
/// streamed piece by piece whatever its size; the bytes are hashed as they
/// are written and, when the source records a hash and `src` verifies,
/// checked against it (a mismatch fails the conversion like `verify`).
fn copy_one(src: &Checked<'_>, from: &str, to: &str, sink: &dyn Sink) -> Result<()> {
    check_interrupt()?;
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
fn copy_parallel(src: &Checked<'_>, tensors: &[&SourceTensor], sink: &dyn Sink) -> Result<()> {
    tensors
        .par_iter()
        .try_for_each(|t| copy_one(src, &t.key, &t.key, sink))
}

fn write_safetensors(
    src: &Checked<'_>,
    tensors: &[SourceTensor],
    output: &Path,
    md: &BTreeMap<String, String>,
    opts: &ConvertOptions,
) -> Result<()> {
    let refs: Vec<&SourceTensor> = tensors.iter().collect();
    let w = SafetensorsWriter::create(output, &plan_of(&refs), md, opts.overwrite, opts.hashes)?;
    copy_parallel(src, &refs, &w)?;
    w.finish()?;
    Ok(())
}

fn write_container(
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
    )?;
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
fn copy_shards(src: &Checked<'_>, w: &mut ContainerWriter, compressed: bool) -> Result<()> {
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
type Carried = (Vec<String>, Vec<String>);

fn write_directory(
    src: &Checked<'_>,
    kind: InputKind,
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
) -> Result<(Vec<PathBuf>, Carried)> {
    let dir = AtomicDir::create(output, opts.overwrite)?;
    let carried = if input.is_dir() {
        carry_model_files(input, dir.path())?
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
        let w = SafetensorsWriter::create(&p, &plan_of(ts), &md, false, opts.hashes)?;
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
        let text = serde_json::to_string_pretty(&index)
            .map_err(|e| Error::new(ErrorKind::Json(e.to_string())))?;
        std::fs::write(dir.path().join(index_name), text)?;
    }
    dir.commit()?;
    Ok((vec![output.to_path_buf()], carried))
}

/// Groups whole layers into output files of at most `max` bytes each.
fn group_layers(p: &Plan, max: u64) -> Vec<Vec<usize>> {
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

fn outputs_of(p: &Plan, idx: &[usize]) -> Vec<(String, Dtype, Vec<u64>)> {
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

/// Writes a plan's output as `{stem}.safetensors` or
/// `{stem}-0000k-of-0000n.safetensors` + `{stem}.safetensors.index.json`
/// (+ `quanto_qmap.json`) into an existing directory.
fn write_model_dir(
    src: &Checked<'_>,
    p: &Plan,
    losses: &Losses,
    dir: &Path,
    stem: &str,
    md: &BTreeMap<String, String>,
    opts: &ConvertOptions,
) -> Result<()> {
    let groups = group_layers(p, opts.max_shard_size);
    let n = groups.len();
    let mut index = ShardIndex::default();
    let mut total = 0u64;
    for (gi, g) in groups.iter().enumerate() {
        let name = if n == 1 {
            format!("{stem}.safetensors")
        } else {
            format!("{stem}-{:05}-of-{n:05}.safetensors", gi + 1)
        };
        let outs = outputs_of(p, g);
        let w = SafetensorsWriter::create(&dir.join(&name), &outs, md, false, opts.hashes)?;
        run_layers(src, p, g, losses, &w)?;
        w.finish()?;
        for (k, d, s) in outs {
            total += crate::dtype::byte_len(d, &s)?;
            index.weight_map.insert(k, name.clone());
        }
    }
    if n > 1 {
        index
            .metadata
            .insert("total_size".into(), serde_json::Value::from(total));
        let text = serde_json::to_string_pretty(&index)
            .map_err(|e| Error::new(ErrorKind::Json(e.to_string())))?;
        std::fs::write(dir.join(format!("{stem}.safetensors.index.json")), text)?;
    }
    if p.has_quanto() {
        std::fs::write(dir.join(QMAP_FILE), qmap_for(p).to_json())?;
    }
    Ok(())
}

/// Whose `config.json` it is: the quantization config a loader reads
/// depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConfigOwner {
    /// diffusers (`_class_name`): `QuantoConfig` with `weights_dtype`.
    Diffusers,
    /// transformers (`model_type` / `architectures`, no `_class_name`).
    Transformers,
    /// Neither.
    Unknown,
}

fn config_owner(obj: &serde_json::Map<String, serde_json::Value>) -> ConfigOwner {
    if obj.contains_key("_class_name") {
        ConfigOwner::Diffusers
    } else if obj.contains_key("model_type") || obj.contains_key("architectures") {
        ConfigOwner::Transformers
    } else {
        ConfigOwner::Unknown
    }
}

/// Makes `config.json` (copied or beside the input) follow the new layout,
/// by whose config it is (spec/layouts.md §4): nothing is rewritten when no
/// layer's layout changed; a diffusers config gets diffusers' `QuantoConfig`
/// for a quanto output; a transformers config gets no quanto
/// `quantization_config` (optimum-quanto's own transformers save writes
/// none, and transformers cannot load pre-quantized quanto checkpoints) and
/// loses a stale one; compressed-tensors and bitsandbytes outputs get their
/// libraries' forms; a config whose output has no quantized layer loses a
/// quantization config ckptkit knows. Returns a warning when the config
/// cannot describe the output (mixed layouts).
fn update_config(input: &Path, dest: &Path, p: &Plan) -> Result<Option<String>> {
    if p.layers
        .iter()
        .all(|l| l.passes == [crate::plan::Pass::Copy])
    {
        return Ok(None); // the layout did not change: the config is carried as is
    }
    let dir = if input.is_dir() {
        input.to_path_buf()
    } else {
        input.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let srcp = dir.join("config.json");
    let from = if dest.is_file() {
        dest.to_path_buf()
    } else {
        srcp
    };
    if !crate::io::files::regular_file_exists(&from)? {
        return Ok(None);
    }
    let text = quanto::read_side_file(&from)?;
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(None); // not ours to judge: copied as is
    };
    let Some(obj) = v.as_object_mut() else {
        return Ok(None);
    };
    let owner = config_owner(obj);
    let qtypes: std::collections::BTreeSet<String> = p
        .layers
        .iter()
        .filter_map(|l| match &l.output.quant.weights {
            crate::WeightQuant::Quanto { qtype, .. } => Some(qtype.clone()),
            crate::WeightQuant::Int8 { layout, .. } => Some(layout.clone()),
            _ => None,
        })
        .collect();
    let method = obj
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(|m| m.as_str())
        .map(str::to_owned);
    let ours = method
        .as_deref()
        .is_some_and(|m| ["quanto", "compressed-tensors", "bitsandbytes"].contains(&m));
    // plain 2-D layers: what a library's ignore / skip list names
    let skip: Vec<String> = p
        .layers
        .iter()
        .filter(|l| {
            matches!(l.output.quant.weights, crate::WeightQuant::Plain)
                && l.output
                    .tensors
                    .iter()
                    .any(|t| t.name == "weight" && t.shape.len() == 2)
        })
        .map(|l| l.path.clone())
        .collect();
    let mut warning = None;
    let is_quanto = |q: &str| crate::layout::quanto::QType::from_name(q).is_some();
    if qtypes.is_empty() {
        if !ours {
            return Ok(None);
        }
        obj.remove("quantization_config");
    } else if qtypes.len() > 1 {
        warning = Some(format!(
            "{}: a quantization_config cannot describe layers of several layouts ({}); \
             it was left as it was",
            dest.display(),
            qtypes.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
        if owner == ConfigOwner::Transformers && method.as_deref() == Some("quanto") {
            obj.remove("quantization_config");
        } else {
            return Ok(warning);
        }
    } else {
        let q = qtypes.iter().next().cloned().unwrap_or_default();
        if is_quanto(&q) && owner == ConfigOwner::Transformers {
            // transformers reads no quanto config from a pre-quantized checkpoint
            if method.is_none() {
                return Ok(None);
            }
            obj.remove("quantization_config");
        } else {
            let Some(cfg) = library_config(&q, skip) else {
                return Ok(None);
            };
            obj.insert("quantization_config".into(), cfg);
        }
    }
    let out =
        serde_json::to_string_pretty(&v).map_err(|e| Error::new(ErrorKind::Json(e.to_string())))?;
    std::fs::write(dest, out + "\n").map_err(|e| Error::from(e).with_file(dest))?;
    Ok(warning)
}

/// Weight files of any format, which a converted model directory does not
/// carry: the conversion writes the model's weights itself.
fn is_weights_name(n: &str) -> bool {
    const EXT: [&str; 10] = [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".gguf",
        ".onnx",
        ".msgpack",
        ".h5",
        ".index.json",
    ];
    EXT.iter().any(|e| n.ends_with(e))
}

/// Copies every top-level regular file of a model directory into the
/// output directory (following symlinks, as Hugging Face caches use them),
/// except weights in any format, `quanto_qmap.json` (written for the new
/// layout) and hidden files; sub-directories are not carried. Returns the
/// names carried and the names skipped, with why.
fn carry_model_files(input: &Path, out: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let mut carried = Vec::new();
    let mut skipped = Vec::new();
    let mut names = Vec::new();
    for e in std::fs::read_dir(input).map_err(|e| Error::from(e).with_file(input))? {
        let e = e.map_err(|er| Error::from(er).with_file(input))?;
        names.push(e.file_name());
    }
    names.sort();
    for n in names {
        let shown = n.to_string_lossy().into_owned();
        let Some(name) = n.to_str() else {
            skipped.push(format!("{shown} (name is not UTF-8)"));
            continue;
        };
        let p = input.join(name);
        let why = if name.starts_with('.') {
            Some("hidden")
        } else if name == QMAP_FILE {
            Some("written for the new layout")
        } else if is_weights_name(name) {
            Some("weights")
        } else {
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => Some("directory"),
                Ok(m) if m.is_file() => None,
                _ => Some("not a regular file"),
            }
        };
        if let Some(w) = why {
            skipped.push(format!("{name} ({w})"));
            continue;
        }
        check_interrupt()?;
        copy_file(&p, &out.join(name), &out.join(name))?;
        carried.push(name.to_string());
    }
    Ok((carried, skipped))
}

/// The `quantization_config` a library writes for a layout: diffusers'
/// QuantoConfig, transformers' BitsAndBytesConfig, compressed-tensors'
/// config (the forms tests/fixtures/int8 and spec/layouts.md record).
fn library_config(layout: &str, skip: Vec<String>) -> Option<serde_json::Value> {
    Some(match layout {
        "qint8" | "qint4" | "qint2" | "qfloat8_e4m3fn" => {
            let w = match layout {
                "qint8" => "int8",
                "qint4" => "int4",
                "qint2" => "int2",
                _ => "float8",
            };
            serde_json::json!({"quant_method": "quanto", "weights_dtype": w, "modules_to_not_convert": skip})
        }
        "int8:bnb" => serde_json::json!({
            "_load_in_4bit": false, "_load_in_8bit": true,
            "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": false,
            "llm_int8_enable_fp32_cpu_offload": false, "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0,
            "load_in_4bit": false, "load_in_8bit": true, "quant_method": "bitsandbytes"
        }),
        n if n.starts_with("int8:ct") => {
            let int_q = n.ends_with(":int-quantized");
            let group = n
                .split(':')
                .find_map(|x| x.strip_prefix("group="))
                .and_then(|g| g.parse::<u64>().ok());
            let format = if int_q {
                "int-quantized"
            } else {
                "pack-quantized"
            };
            let input = if int_q {
                serde_json::json!({"dynamic": true, "group_size": null, "num_bits": 8,
                    "strategy": "token", "symmetric": true, "type": "int"})
            } else {
                serde_json::Value::Null
            };
            serde_json::json!({
                "config_groups": {"group_0": {
                    "format": format, "input_activations": input, "output_activations": null,
                    "targets": ["Linear"],
                    "weights": {"dynamic": false, "group_size": group, "num_bits": 8,
                        "strategy": if group.is_some() { "group" } else { "channel" },
                        "symmetric": true, "type": "int"}}},
                "format": format, "global_compression_ratio": null, "ignore": skip,
                "kv_cache_scheme": null, "moe_sparsity_config": null,
                "quant_method": "compressed-tensors", "quantization_status": "compressed",
                "sparsity_config": {}, "transform_config": {}, "version": "0.20.0"
            })
        }
        _ => return None,
    })
}

/// ckptkit's schema of the quanto layers of a plan (for `__metadata__`).
fn schema_for(p: &Plan) -> Option<String> {
    let mut s = quanto::Schema::new();
    for l in &p.layers {
        let o = &l.output;
        let w = o.tensors.iter().find(|t| t.name == "weight");
        let (weights, gs, descriptor) = match &o.quant.weights {
            crate::WeightQuant::Quanto { qtype, group_size } => (qtype.clone(), *group_size, None),
            crate::WeightQuant::Int8 { layout, descriptor } => (
                layout.clone(),
                None,
                quanto::SchemaEntry::int8_descriptor(descriptor),
            ),
            _ if o.quant.activations.is_some() => ("none".to_string(), None, None),
            _ => continue,
        };
        s.insert(
            o.path.clone(),
            quanto::SchemaEntry {
                weights,
                activations: o.quant.activations.clone().unwrap_or_else(|| "none".into()),
                group_size: gs,
                dtype: w.map(|w| w.dtype.to_string()).unwrap_or_default(),
                shape: w.map(|w| w.shape.clone()).unwrap_or_default(),
                descriptor,
            },
        );
    }
    (!s.is_empty()).then(|| quanto::schema_json(&s))
}

/// The quanto map of a plan's output (modules in natural path order).
pub fn qmap_for(p: &Plan) -> QuantoMap {
    let mut entries = Vec::new();
    for l in &p.layers {
        let o = &l.output;
        let w = match &o.quant.weights {
            crate::WeightQuant::Quanto { qtype, .. } => qtype.clone(),
            _ if o.quant.activations.is_some() => "none".into(),
            _ => continue,
        };
        entries.push((
            o.path.clone(),
            quanto::QmapEntry {
                weights: w,
                activations: o.quant.activations.clone().unwrap_or_else(|| "none".into()),
            },
        ));
    }
    QuantoMap { entries }
}

/// Lossy re-layouts accepted while executing a plan.
type Losses = std::sync::Mutex<Vec<crate::plan::Loss>>;

fn run_layers(
    src: &Checked<'_>,
    p: &Plan,
    idx: &[usize],
    losses: &Losses,
    sink: &dyn Sink,
) -> Result<()> {
    idx.par_iter().try_for_each(|&i| {
        check_interrupt()?;
        let lp = &p.layers[i];
        let (tensors, loss) =
            crate::plan::execute(src, lp).map_err(|e| e.with_layer(lp.path.clone()))?;
        for (k, b) in tensors {
            match b {
                crate::plan::Produced::Bytes(b) => sink.put(&k, &b)?,
                crate::plan::Produced::Copy(from) => {
                    copy_one(src, &from, &k, sink).map_err(|e| e.with_layer(lp.path.clone()))?
                }
            }
        }
        if let Some(l) = loss {
            if let Ok(mut g) = losses.lock() {
                g.push(l);
            }
        }
        Ok(())
    })
}

fn convert_planned(
    input: &Path,
    output: &Path,
    src: &Checked<'_>,
    okind: OutputKind,
    opts: &ConvertOptions,
    t0: Instant,
) -> Result<Summary> {
    let layers = input_layers(input, src, opts).map_err(|e| e.with_file(input))?;
    let mut p = plan(&layers, &opts.target, &opts.select).map_err(|e| e.with_file(input))?;
    crate::plan::apply_renames(&mut p, &opts.select.rename)?;
    refuse_suspects(&p, &input_suspects(input, src, &layers)?, opts)
        .map_err(|e| e.with_file(input))?;
    let warnings = selection_warnings(&layers, opts);
    refuse_no_change(&[&p], &warnings, opts)?;
    if !p.unmatched.is_empty() {
        let n = p.unmatched.len();
        let list: Vec<&str> = p.unmatched.iter().take(20).map(|s| s.as_str()).collect();
        return Err(Error::layout(format!(
            "the reference expects {n} layer(s) the input does not have: {}{}",
            list.join(", "),
            if n > 20 { ", ..." } else { "" }
        )));
    }
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
        carried: Vec::new(),
        skipped: Vec::new(),
    };
    if opts.dry_run {
        summary.seconds = t0.elapsed().as_secs_f64();
        summary.plan = Some(p);
        return Ok(summary);
    }
    check_free_space(output, bytes_out)?;
    let losses: Losses = Default::default();
    let mut md = src.metadata().clone();
    md.remove(quanto::SCHEMA_KEY);
    md.entry("format".into()).or_insert_with(|| "pt".into());
    if let Some(s) = schema_for(&p) {
        md.insert(quanto::SCHEMA_KEY.into(), s);
    }
    match okind {
        OutputKind::Safetensors => {
            let slot = claim_qmap_slot(input, output, opts, p.has_quanto())?;
            let w =
                SafetensorsWriter::create(output, &p.outputs(), &md, opts.overwrite, opts.hashes)?;
            let all: Vec<usize> = (0..p.layers.len()).collect();
            run_layers(src, &p, &all, &losses, &w)?;
            commit_with_qmap(&p, w, slot)?;
        }
        OutputKind::Directory => {
            let dir = AtomicDir::create(output, opts.overwrite)?;
            if input.is_dir() {
                let (c, sk) = carry_model_files(input, dir.path())?;
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
            if opts.compression.is_some() {
                // compressed shards take tensors in data order, which
                // interleaves layers: the migrated layers are staged in an
                // uncompressed container beside the output (a temporary of
                // the output's, removed whatever happens), then packed
                let mut w = ContainerWriter::create(output, co)?;
                let stage = crate::io::atomic::temp_path_for(output);
                let _cleanup = RemoveOnDrop(stage.clone());
                let staged = ContainerOptions {
                    compression: None,
                    overwrite: false,
                };
                write_planned_container(
                    src,
                    &p,
                    &losses,
                    &stage,
                    staged,
                    &md,
                    &Carry::default(),
                    opts,
                )?;
                let c = Container::open(&stage)?;
                copy_shards(&Checked::new(&c, true), &mut w, true)?;
                w.finish_with_provenance(
                    Some(c.layers().to_vec()),
                    carry.metadata,
                    carry.extensions,
                    carry.sources,
                )?;
            } else {
                write_planned_container(src, &p, &losses, output, co, &md, &carry, opts)?;
            }
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

/// Removes a path when dropped (a staging file).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes a plan's output as an uncompressed container at `dest`.
#[allow(clippy::too_many_arguments)]
fn write_planned_container(
    src: &Checked<'_>,
    p: &Plan,
    losses: &Losses,
    dest: &Path,
    co: ContainerOptions,
    md: &BTreeMap<String, String>,
    carry: &Carry,
    opts: &ConvertOptions,
) -> Result<()> {
    let mut w = ContainerWriter::create(dest, co)?;
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
        run_layers(src, p, g, losses, &w)?;
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

/// What happens to the `quanto_qmap.json` beside a safetensors output.
enum QmapSlot {
    /// Nothing is there and nothing is written.
    None,
    /// A new map is written (locked from now until the commit).
    Write(crate::io::atomic::AtomicFile),
    /// The output's stale map is removed with the commit.
    Remove(crate::io::atomic::Removal),
}

/// The `quanto_qmap.json` beside a safetensors output belongs to that
/// output alone. Refused: touching the input's companion; touching a map
/// that belongs to another weights file in the directory (replacing it
/// breaks that model; leaving it beside a plain output recreates the
/// mismatch ckptkit exists to prevent); replacing or removing an existing
/// map without `overwrite`. The slot is locked before any tensor is
/// written, so a second writer of the same map is refused at once.
fn claim_qmap_slot(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
    quanto: bool,
) -> Result<QmapSlot> {
    let overwrite = opts.overwrite;
    let qpath = output.with_file_name(QMAP_FILE);
    let exists = std::fs::symlink_metadata(&qpath).is_ok();
    if exists || quanto {
        let q = crate::io::paths::resolve(&qpath);
        if let Some(r) = read_set(input, opts)
            .into_iter()
            .find(|r| crate::io::paths::resolve(r) == q)
        {
            return Err(Error::usage(format!(
                "{} would {} {}, which this conversion reads; write the output to another \
                 directory",
                output.display(),
                if quanto { "replace" } else { "remove" },
                r.display()
            )));
        }
    }
    if exists {
        crate::io::atomic::check_destination(&qpath, crate::io::atomic::DestKind::File, true)?;
        let others = other_weight_files(output)?;
        if !others.is_empty() {
            return Err(Error::new(ErrorKind::Conflict(format!(
                "{} belongs to another weights file in this directory ({}); {} it would break \
                 that model{}; write the output to another directory",
                qpath.display(),
                others.join(", "),
                if quanto { "replacing" } else { "removing" },
                if quanto {
                    ""
                } else {
                    ", and leaving it beside a plain output would describe the wrong file"
                }
            )))
            .with_file(&qpath));
        }
        if !overwrite {
            return Err(Error::new(ErrorKind::OutputExists(qpath)));
        }
    }
    Ok(if quanto {
        QmapSlot::Write(crate::io::atomic::AtomicFile::create(&qpath, true)?)
    } else if exists {
        QmapSlot::Remove(crate::io::atomic::Removal::new(&qpath)?)
    } else {
        QmapSlot::None
    })
}

/// The `*.safetensors` files in an output's directory other than the output
/// itself (regular, not hidden), sorted.
fn other_weight_files(output: &Path) -> Result<Vec<String>> {
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

/// Commits a safetensors output together with its `quanto_qmap.json`
/// companion (written, or removed when the output has no quanto layers),
/// through one journal: a map never describes another file.
fn commit_with_qmap(p: &Plan, w: SafetensorsWriter, slot: QmapSlot) -> Result<()> {
    let weights = w.finish_pending()?;
    match slot {
        QmapSlot::Write(q) => {
            use std::io::Write;
            let mut f = q.file()?;
            f.write_all(qmap_for(p).to_json().as_bytes())
                .map_err(|e| Error::from(e).with_file(q.temp()))?;
            // weights first: the journal is named after them
            crate::io::atomic::commit_together(vec![weights, q], vec![])
        }
        QmapSlot::Remove(r) => crate::io::atomic::commit_together(vec![weights], vec![r]),
        QmapSlot::None => weights.commit(),
    }
}

/// Reads a `--like` reference: a `quanto_qmap.json` file alone, a
/// checkpoint (with the qmap beside it, if any) or a container.
pub fn like_target(reference: &Path) -> Result<Target> {
    let mut m = BTreeMap::new();
    let mut order = Vec::new();
    let is_json = reference.extension().and_then(|e| e.to_str()) == Some("json");
    let from_qmap = |q: QuantoMap| {
        let mut m = BTreeMap::new();
        let mut order = Vec::new();
        for (k, e) in q.entries {
            order.push(k.clone());
            m.insert(
                k,
                crate::plan::LikeLayer {
                    qtype: crate::layout::quanto::QType::from_name(&e.weights),
                    activations: (e.activations != "none").then_some(e.activations),
                    shape: None,
                    dtype: None,
                },
            );
        }
        Target::Like(m, order)
    };
    if is_json {
        return Ok(from_qmap(QuantoMap::from_file(reference)?));
    }
    let src = open_source(reference)?;
    let layers = match input_layers(reference, src.as_ref(), &ConvertOptions::default()) {
        Ok(l) => l,
        // --like needs each layer's layout (qtype; the group rule follows
        // from the input's shapes), not the reference's logical shapes: a
        // reference whose packed layers cannot be told apart without a
        // shape hint still gives its layouts through its map
        Err(e) if matches!(e.kind(), ErrorKind::Ambiguous(_)) => {
            match quanto::qmap_beside(reference)? {
                Some(q) => return Ok(from_qmap(q)),
                None => return Err(e.with_file(reference)),
            }
        }
        Err(e) => return Err(e),
    };
    for l in layers {
        order.push(l.path.clone());
        let w = l.tensors.iter().find(|t| t.name == "weight");
        let qtype = match &l.quant.weights {
            crate::WeightQuant::Quanto { qtype, .. } => {
                crate::layout::quanto::QType::from_name(qtype)
            }
            _ => None,
        };
        m.insert(
            l.path.clone(),
            crate::plan::LikeLayer {
                qtype,
                activations: l.quant.activations.clone(),
                shape: w.map(|w| w.shape.clone()),
                dtype: w.map(|w| w.dtype),
            },
        );
    }
    Ok(Target::Like(m, order))
}

/// A layer whose layout differs between a checkpoint and its reference.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayoutMismatch {
    /// Module path.
    pub layer: String,
    /// What the checkpoint has, e.g. "plain BF16 `weight`".
    pub have: String,
    /// What the reference expects.
    pub expected: String,
}

/// Will a checkpoint load where a reference's layout is expected?
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// Keys the reference has and the checkpoint lacks.
    pub missing: Vec<String>,
    /// Keys the checkpoint has and the reference lacks.
    pub unexpected: Vec<String>,
    /// Per-layer layout differences.
    pub mismatches: Vec<LayoutMismatch>,
    /// Layers of the checkpoint that look quantized in a layout ckptkit
    /// does not know: it cannot tell whether they match, nor convert them.
    pub unknown_layouts: Vec<crate::schema::Suspect>,
}

impl CheckReport {
    /// True when nothing differs.
    pub fn compatible(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatches.is_empty()
    }
}

fn describe_layout(l: &Layer) -> String {
    let keys: Vec<String> = l
        .tensors
        .iter()
        .filter(|t| t.name == "weight")
        .flat_map(|t| {
            t.parts
                .iter()
                .map(|p| format!("`{}`", crate::schema::split_key_after(&p.key, &l.path)))
        })
        .collect();
    format!("{} {}", crate::schema::layout_name(l), keys.join(" + "))
}

/// Compares a checkpoint's keys and layouts with a reference (a
/// checkpoint, a container, or a `quanto_qmap.json`).
pub fn check(input: &Path, reference: &Path, opts: &ConvertOptions) -> Result<CheckReport> {
    let src = open_source(input)?;
    let layers = input_layers(input, src.as_ref(), opts)?;
    let mut report = CheckReport {
        unknown_layouts: input_suspects(input, src.as_ref(), &layers)?,
        ..Default::default()
    };
    let is_json = reference.extension().and_then(|e| e.to_str()) == Some("json");
    // what the input would become to match the reference
    let target = like_target(reference)?;
    let p = plan(&layers, &target, &PlanOptions::default())?;
    let planned = || -> Vec<Layer> { p.layers.iter().map(|l| l.output.clone()).collect() };
    let keys_of = |ls: &[Layer]| -> std::collections::BTreeSet<String> {
        ls.iter()
            .flat_map(|l| l.parts().map(|p| p.key.clone()).collect::<Vec<_>>())
            .collect()
    };
    let (expected_layers, want) = if is_json {
        let e = planned();
        let w = keys_of(&e);
        (e, w)
    } else {
        let r = open_source(reference)?;
        match input_layers(reference, r.as_ref(), &ConvertOptions::default()) {
            Ok(e) => {
                let w = keys_of(&e);
                (e, w)
            }
            // packed layers the reference's tensors alone do not tell apart:
            // its map gave the layouts (like_target), its keys are its own
            Err(e) if matches!(e.kind(), ErrorKind::Ambiguous(_)) => (
                planned(),
                r.tensors().iter().map(|t| t.key.clone()).collect(),
            ),
            Err(e) => return Err(e),
        }
    };
    let have: std::collections::BTreeSet<String> =
        src.tensors().iter().map(|t| t.key.clone()).collect();
    report.missing = want.difference(&have).cloned().collect();
    report.unexpected = have.difference(&want).cloned().collect();
    let by: std::collections::HashMap<&str, &Layer> =
        layers.iter().map(|l| (l.path.as_str(), l)).collect();
    for e in &expected_layers {
        if let Some(l) = by.get(e.path.as_str()) {
            if l.quant != e.quant {
                report.mismatches.push(LayoutMismatch {
                    layer: e.path.clone(),
                    have: describe_layout(l),
                    expected: describe_layout(e),
                });
            }
        }
    }
    Ok(report)
}

/// Verifies any input: a container's every hash and structural rule; a
/// safetensors file's structure and the blake3 hashes ckptkit recorded in it
/// (if any); a directory's index (if any) and every `.safetensors` and
/// `.ckpk` file in it and its sub-directories (not following symlinks, at
/// most 8 levels deep). The report sums the files.
pub fn verify(path: &Path) -> Result<VerifyReport> {
    let mut r = VerifyReport::default();
    match input_kind(path)? {
        InputKind::Container => add_report(&mut r, verify_container(path)?),
        InputKind::Safetensors => add_report(&mut r, SafetensorsFile::open(path)?.verify()?),
        InputKind::ShardedDir => verify_dir(path, 0, &mut r)?,
    }
    Ok(r)
}

/// A container's structure, every layer record (it must be one the
/// conversions accept) and every hash.
fn verify_container(path: &Path) -> Result<VerifyReport> {
    let c = Container::open(path)?;
    for l in c.layers() {
        crate::layout::check_layer(l).map_err(|e| e.with_file(path))?;
    }
    c.verify()
}

fn add_report(r: &mut VerifyReport, x: VerifyReport) {
    r.tensors += x.tensors;
    r.bytes += x.bytes;
    r.unchecked += x.unchecked;
}

fn verify_dir(dir: &Path, depth: u32, r: &mut VerifyReport) -> Result<()> {
    if depth > 8 {
        return Err(Error::new(ErrorKind::LimitExceeded {
            what: "directory depth",
            value: depth as u64,
            limit: 8,
        })
        .with_file(dir));
    }
    if find_index(dir)?.is_some() {
        // the index names existing files and every key once
        ShardedDir::open(dir)?;
    }
    let mut entries = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::from(e).with_file(dir))? {
        let e = e.map_err(|e| Error::from(e).with_file(dir))?;
        entries.push((e.file_name(), e.file_type()?));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, ft) in entries {
        let p = dir.join(&name);
        let n = name.to_string_lossy();
        if ft.is_dir() {
            verify_dir(&p, depth + 1, r)?;
        } else if ft.is_file() && n.ends_with(".safetensors") {
            add_report(r, SafetensorsFile::open(&p)?.verify()?);
        } else if ft.is_file() && n.ends_with(".ckpk") {
            add_report(r, verify_container(&p)?);
        }
    }
    Ok(())
}

/// Copies a file that is carried unchanged into an output, reading only a
/// regular file and naming the right path in errors: the input when reading
/// fails, the output (`shown`, its final name) when writing does (a full
/// disk is the output's problem).
fn copy_file(from: &Path, to: &Path, shown: &Path) -> Result<u64> {
    use std::io::{Read, Write};
    let mut r = crate::io::files::open_regular(from)?;
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|e| Error::from(e).with_file(shown))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        check_interrupt()?;
        let k = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::from(e).with_file(from).with_offset(n)),
        };
        w.write_all(&buf[..k])
            .map_err(|e| Error::from(e).with_file(shown).with_offset(n))?;
        n += k as u64;
    }
    Ok(n)
}

/// Files that only a training run's checkpoint holds (Hugging Face
/// Trainer, accelerate, SimpleTuner): optimizer, scheduler and RNG states.
fn is_trainer_state(name: &str) -> bool {
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
fn model_files(dir: &Path) -> Result<Vec<String>> {
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
            handled.insert(QMAP_FILE.into());
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
        crate::plan::apply_renames(&mut p, &opts.select.rename)?;
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
    let losses: Losses = Default::default();
    let dir = AtomicDir::create(output, opts.overwrite)?;
    for rel in &copies {
        check_interrupt()?;
        let to = dir.path().join(rel);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::from(e).with_file(parent))?;
        }
        copy_file(&input.join(rel), &to, &output.join(rel))?;
    }
    let mut unchecked = 0;
    for (((rel, _), raw), p) in models.iter().zip(&sources).zip(&plans) {
        let src = &Checked::new(raw, opts.verify_input);
        let out = dir.path().join(rel);
        std::fs::create_dir_all(&out)?;
        let mut md = src.metadata().clone();
        md.remove(quanto::SCHEMA_KEY);
        md.entry("format".into()).or_insert_with(|| "pt".into());
        if let Some(s) = schema_for(p) {
            md.insert(quanto::SCHEMA_KEY.into(), s);
        }
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

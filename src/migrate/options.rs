//! What a conversion is asked to do, and what it reports.

use crate::io::writer::ZstdOptions;
use crate::migrate::plan::{Plan, PlanOptions, Target};
use std::path::{Path, PathBuf};

/// The kind of output, decided by the output path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// `*.safetensors`: one file.
    Safetensors,
    /// `*.ckpk`: a container.
    Container,
    /// Anything else: a directory of safetensors shards with an index.
    Directory,
    /// `*.gguf`: one GGUF v3 file (spec/gguf.md §4).
    Gguf,
}

/// Decides the output kind from the path's extension.
pub fn output_kind(path: &Path) -> OutputKind {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => OutputKind::Safetensors,
        Some("ckpk") => OutputKind::Container,
        Some("gguf") => OutputKind::Gguf,
        _ => OutputKind::Directory,
    }
}

/// Options of [`convert`](super::convert), [`check`](super::check) and
/// [`inspect`](super::inspect): start from `ConvertOptions::default()` and
/// set what differs with the builder methods (new options are added
/// without breaking callers).
///
/// ```
/// use ckptkit::migrate::{ConvertOptions, Target};
/// let opts = ConvertOptions::default()
///     .target(Target::parse("quanto:qint8")?)
///     .compression(ckptkit::ZstdOptions::default())
///     .overwrite(true);
/// assert!(opts.overwrite && opts.compression.is_some());
/// # Ok::<(), ckptkit::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
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
    /// Cancellation and progress of the call (each call counts its own
    /// bytes, so one `Control` can serve calls on several threads).
    pub control: crate::Control,
    /// Hash a single-file output once it is written ([`Summary::blake3`]):
    /// one more read of the output, which `migrate convert` always does to
    /// print it.
    pub output_hash: bool,
    /// `general.architecture` of a GGUF output whose input records none
    /// (a GGUF input's own is kept): ComfyUI-GGUF's names are `flux`,
    /// `sd1`, `sdxl`, `sd3`, `wan`, ...; llama.cpp's its model families.
    pub gguf_arch: Option<String>,
}

setters!(ConvertOptions {
    /// Sets `compression`: zstd for a container output (`None`: uncompressed).
    @into compression: Option<ZstdOptions>,
    /// Sets `overwrite`: replace an existing output.
    overwrite: bool,
    /// Sets `dry_run`: plan and report, write nothing.
    dry_run: bool,
    /// Sets `max_shard_size`: largest data bytes per file of a directory output.
    max_shard_size: u64,
    /// Sets `target`: the target layouts.
    target: Target,
    /// Sets `select`: which layers, renames, lossy re-layouts.
    select: PlanOptions,
    /// Sets `qmap`: the input's quanto map.
    @into qmap: Option<PathBuf>,
    /// Sets `shapes_from`: a plain checkpoint to take logical shapes from.
    @into shapes_from: Option<PathBuf>,
    /// Sets `hashes`: record blake3 hashes in safetensors outputs.
    hashes: bool,
    /// Sets `extra_reads`: other files the conversion reads.
    extra_reads: Vec<PathBuf>,
    /// Sets `verify_input`: check every byte read against the input's hashes.
    verify_input: bool,
    /// Sets `assume_plain`: read unknown quantized-looking layers as plain.
    assume_plain: bool,
    /// Sets `control`: progress and cancellation of the call.
    control: crate::Control,
    /// Sets `output_hash`: hash a single-file output into the summary.
    output_hash: bool,
    /// Sets `gguf_arch`: `general.architecture` of a GGUF output.
    gguf_arch: Option<String>,
});

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
            control: crate::Control::default(),
            output_hash: false,
            gguf_arch: None,
        }
    }
}

/// What a conversion did. Serialized as `migrate convert --json` prints it
/// (README, "JSON output"): the fields below except `files`, plus
/// `lossless` (every layer byte-reversible, from the plan).
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// The output path.
    pub output: PathBuf,
    /// Nothing was written: the plan is what would be done.
    pub dry_run: bool,
    /// blake3 (hex) of a single-file output, with
    /// [`ConvertOptions::output_hash`].
    pub blake3: Option<String>,
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
    pub losses: Vec<crate::migrate::plan::Loss>,
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

impl Summary {
    /// Whether every layer can be converted back byte for byte (true
    /// when nothing was planned: a byte copy).
    pub fn lossless(&self) -> bool {
        self.plan.as_ref().map(|p| p.lossless()).unwrap_or(true)
    }
}

impl serde::Serialize for Summary {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut m = s.serialize_struct("Summary", 16)?;
        m.serialize_field("output", &self.output.display().to_string())?;
        m.serialize_field("tensors", &self.tensors)?;
        m.serialize_field("layers", &self.layers)?;
        m.serialize_field("bytes_in", &self.bytes_in)?;
        m.serialize_field("bytes_out", &self.bytes_out)?;
        m.serialize_field("seconds", &self.seconds)?;
        m.serialize_field("dry_run", &self.dry_run)?;
        m.serialize_field("lossless", &self.lossless())?;
        m.serialize_field("blake3", &self.blake3)?;
        m.serialize_field("losses", &self.losses)?;
        m.serialize_field("plan", &self.plan)?;
        m.serialize_field("input_verified", &self.input_verified)?;
        m.serialize_field("input_unchecked", &self.input_unchecked)?;
        m.serialize_field("warnings", &self.warnings)?;
        m.serialize_field("carried", &self.carried)?;
        m.serialize_field("skipped", &self.skipped)?;
        m.end()
    }
}

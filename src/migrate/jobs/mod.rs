//! A conversion to a directory split into jobs that separate processes (or
//! machines sharing the file system) run: `plan` writes a plan file naming
//! one job per output file, `run_job` writes one of them into a staging
//! directory beside the output with a completion record, `finish` checks
//! every record and commits the directory. The result is byte-identical to
//! [`convert`](crate::migrate::convert) to the same directory: every step
//! re-derives the same plan from the same pinned input and options, and
//! writes with the same code.
//!
//! The staging directory is `.NAME.ckptkit-jobs` beside the output `NAME`:
//! hidden, named after the plan it belongs to (`plan.id` inside), removed by
//! `finish` after the commit. A job that crashes leaves at most a temporary
//! file there, which the next writer of that file removes; nothing appears
//! at the output before `finish` commits.
//!
//! With the `remote` feature, the input may be a URL (mounted by every step,
//! its objects pinned by ETag) and the output an object-store prefix
//! (`remote.rs`: the jobs upload their files and records there).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::io::atomic::{AtomicDir, AtomicFile, DestKind};
use crate::io::open::{input_kind, open_source, InputKind};
use crate::io::source::{Checked, TensorSource};
use crate::migrate::plan::{Plan, Target};
use crate::migrate::{
    carry_model_files, check_overlap, group_layers, is_training_checkpoint, model_stem,
    output_kind, output_metadata, outputs_of, planned, shard_name, update_config,
    write_model_shard, write_model_tail, ConvertOptions, Losses, OutputKind,
};

#[cfg(feature = "remote")]
mod remote;

/// The `format` field of a plan file.
pub(crate) const PLAN_FORMAT: &str = "ckptkit-plan";
/// The plan file version this build writes and reads.
pub(crate) const PLAN_VERSION: u32 = 1;
/// Largest plan file read (a plan lists every output tensor).
const MAX_PLAN_LEN: u64 = 256 << 20;
/// Largest completion record read.
const MAX_RECORD_LEN: u64 = 64 << 10;
/// The suffix of the staging directory beside an output.
pub(crate) const STAGING_SUFFIX: &str = ".ckptkit-jobs";
/// The file in the staging directory naming the plan it belongs to.
const PLAN_ID_FILE: &str = "plan.id";

/// A conversion split into jobs, as written to a plan file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct JobPlan {
    /// Always [`PLAN_FORMAT`].
    pub format: String,
    /// [`PLAN_VERSION`].
    pub version: u32,
    /// The ckptkit version that wrote it: another version may plan
    /// differently, so it refuses the plan.
    pub ckptkit: String,
    /// The input path as given.
    pub input: String,
    /// The output directory as given.
    pub output: String,
    /// The caller's options, as it recorded them (the command line's
    /// arguments): the plan is re-derived from them by every job.
    pub options: serde_json::Value,
    /// The input files, pinned: size and blake3 of the header.
    pub inputs: Vec<Pin>,
    /// One job per output file, in order.
    pub jobs: Vec<Job>,
}

/// One input file as the plan saw it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Pin {
    /// Its path (the input as given, joined with the file name).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// blake3 of its first bytes: the 8-byte length and the safetensors
    /// header (names, dtypes, shapes, offsets, metadata).
    pub header_blake3: String,
    /// A remote object's ETag (feature `remote`): every ranged read of a
    /// job is conditional on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// One output file and what writing it reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Job {
    /// The output file's name in the directory.
    pub shard: String,
    /// Its tensors' data bytes.
    pub bytes: u64,
    /// Its tensors, in header order.
    pub tensors: Vec<JobTensor>,
    /// The input bytes it reads.
    pub reads: Vec<JobRead>,
}

/// One tensor a job writes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct JobTensor {
    /// Key.
    pub key: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
}

/// One stored tensor a job reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct JobRead {
    /// Index into [`JobPlan::inputs`].
    pub input: usize,
    /// The stored key.
    pub key: String,
    /// Absolute offset of its data in the file.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// What a finished job left: its file's size and blake3.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct JobRecord {
    /// The plan's id (blake3 of the plan file).
    pub plan: String,
    /// The job's index.
    pub job: usize,
    /// The output file's name.
    pub shard: String,
    /// Its size.
    pub size: u64,
    /// Its blake3.
    pub blake3: String,
    /// The object's ETag, when the output is remote (feature `remote`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// What [`run_job`] did.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct JobOutcome {
    /// The record (new, or the one found).
    #[serde(flatten)]
    pub record: JobRecord,
    /// The job had already been done: its record matched its file, and
    /// nothing was written.
    pub already_done: bool,
    /// Layers whose re-layout was lossy (allowed by the options).
    pub lossy_layers: Vec<String>,
}

fn job_error(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Job(msg.into()))
}

/// The staging directory of an output.
pub(crate) fn staging_dir(output: &Path) -> Result<PathBuf> {
    let name = output
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::usage(format!("output {} has no UTF-8 name", output.display())))?;
    Ok(output.with_file_name(format!(".{name}{STAGING_SUFFIX}")))
}

/// Where a step reads the plan's input: a path, or (feature `remote`) a
/// URL, mounted for as long as this value lives.
struct Located {
    /// The path to open (a mount's local stand-in for a URL).
    path: PathBuf,
    /// The URL, for a remote input.
    url: Option<String>,
    #[cfg(feature = "remote")]
    _mount: Option<crate::io::remote::Mount>,
}

/// Locates the input as given to `plan` (mounting a URL).
fn locate(given: &str) -> Result<Located> {
    if !crate::io::paths::is_url(given) {
        return Ok(Located {
            path: PathBuf::from(given),
            url: None,
            #[cfg(feature = "remote")]
            _mount: None,
        });
    }
    #[cfg(feature = "remote")]
    {
        let m = crate::io::remote::Mount::open(given)?;
        Ok(Located {
            path: m.path().to_path_buf(),
            url: Some(given.to_string()),
            _mount: Some(m),
        })
    }
    #[cfg(not(feature = "remote"))]
    Err(Error::usage(format!(
        "{given} is a URL: this ckptkit was built without remote inputs (build it with \
         `--features remote`)"
    )))
}

/// True when the plan's output is a URL (refused without the `remote`
/// feature).
fn remote_output(output: &str) -> Result<bool> {
    if !crate::io::paths::is_url(output) {
        return Ok(false);
    }
    if cfg!(feature = "remote") {
        Ok(true)
    } else {
        Err(Error::usage(format!(
            "{output} is a URL: this ckptkit was built without remote outputs (build it with \
             `--features remote`)"
        )))
    }
}

/// The input, opened as every step opens it (the kinds a plan takes).
fn open_input(input: &Path) -> Result<Box<dyn TensorSource>> {
    match input_kind(input)? {
        InputKind::Safetensors => {}
        InputKind::ShardedDir => {
            if is_training_checkpoint(input)? {
                return Err(Error::usage(format!(
                    "{} is a training checkpoint directory: convert it with `migrate convert`",
                    input.display()
                )));
            }
        }
        InputKind::Container | InputKind::Gguf => {
            return Err(Error::usage(format!(
                "{}: plans take a .safetensors file or a sharded directory; convert a container \
                 or GGUF input with `migrate convert`",
                input.display()
            )))
        }
    }
    open_source(input)
}

/// The pins of the input's files: for a URL, each object's URL, size,
/// ETag and header blake3, from the mount.
fn pins(input: &Located, files: &[String]) -> Result<Vec<Pin>> {
    if let Some(url) = &input.url {
        return remote_pins(&input.path, url);
    }
    let input = &input.path;
    let mut v = Vec::with_capacity(files.len());
    for f in files {
        let p = if input.is_dir() {
            input.join(f)
        } else {
            input.to_path_buf()
        };
        let (size, h) = header_hash(&p)?;
        v.push(Pin {
            path: p.to_string_lossy().into_owned(),
            size,
            header_blake3: h,
            etag: None,
        });
    }
    Ok(v)
}

#[cfg(feature = "remote")]
fn remote_pins(path: &Path, url: &str) -> Result<Vec<Pin>> {
    use crate::io::remote::{mounted, Mounted};
    let pin = |u: String, f: &crate::io::safetensors_file::SafetensorsFile| -> Result<Pin> {
        Ok(Pin {
            path: u,
            size: f.byte_len(),
            header_blake3: f.header_blake3()?,
            etag: f.etag().map(str::to_string),
        })
    };
    match mounted(path) {
        Some(Mounted::File(f)) => Ok(vec![pin(url.to_string(), &f)?]),
        Some(Mounted::Dir(d)) => d
            .weight_files()
            .map(|(n, f)| pin(format!("{}/{n}", url.trim_end_matches('/')), f))
            .collect(),
        _ => Err(Error::usage(format!(
            "{url}: plans take a .safetensors file or a sharded directory; convert a container \
             or GGUF input with `migrate convert`"
        ))),
    }
}

#[cfg(not(feature = "remote"))]
fn remote_pins(_path: &Path, url: &str) -> Result<Vec<Pin>> {
    Err(Error::usage(format!("{url}: built without remote inputs")))
}

/// Size and blake3 of the 8-byte length and header of a safetensors file.
fn header_hash(p: &Path) -> Result<(u64, String)> {
    let mut f = crate::io::files::open_regular(p)?;
    let size = f.metadata().map_err(|e| Error::from(e).with_file(p))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| Error::from(e).with_file(p))?;
    let n = u64::from_le_bytes(len);
    if n > crate::format::MAX_ST_HEADER_LEN || n > size.saturating_sub(8) {
        return Err(Error::new(ErrorKind::Malformed(format!(
            "safetensors header length {n} is past the end of a {size}-byte file"
        )))
        .with_file(p));
    }
    let mut h = blake3::Hasher::new();
    h.update(&len);
    let mut rest = (&mut f).take(n);
    std::io::copy(&mut rest, &mut h).map_err(|e| Error::from(e).with_file(p))?;
    Ok((size, h.finalize().to_hex().to_string()))
}

/// The plan of a conversion and its jobs, derived from the opened input.
struct Derived {
    plan: Plan,
    groups: Vec<Vec<usize>>,
    stem: String,
    jobs: Vec<Job>,
}

fn derive(
    input: &Path,
    output: &Path,
    src: &Checked<'_>,
    opts: &ConvertOptions,
) -> Result<Derived> {
    if output_kind(output) != OutputKind::Directory {
        return Err(Error::usage(format!(
            "{}: a plan writes a directory (one job per file); convert to a single file with \
             `migrate convert`",
            output.display()
        )));
    }
    if opts.target == Target::Keep && opts.select.rename.is_empty() && src.files().len() > 1 {
        return Err(Error::usage(format!(
            "{} keeps its layout and its files: that is a copy of its files, nothing to plan",
            input.display()
        )));
    }
    let (plan, _) = planned(
        input,
        src,
        Some(crate::migrate::UNKNOWN_OUTSIDE),
        true,
        opts,
    )?;
    let groups = group_layers(&plan, opts.max_shard_size);
    let stem = model_stem(&src.files());
    let mut jobs = Vec::with_capacity(groups.len());
    for (gi, g) in groups.iter().enumerate() {
        let mut tensors = Vec::new();
        let mut bytes = 0u64;
        for (key, dtype, shape) in outputs_of(&plan, g) {
            bytes = bytes
                .checked_add(crate::dtype::byte_len(dtype, &shape)?)
                .ok_or_else(|| Error::new(ErrorKind::Overflow { what: "job bytes" }))?;
            tensors.push(JobTensor { key, dtype, shape });
        }
        let mut reads = Vec::new();
        for &i in g {
            for part in plan.layers[i].source.parts() {
                let t = src.get(&part.key).ok_or_else(|| {
                    Error::new(ErrorKind::NotFound(part.key.clone())).with_file(input)
                })?;
                let offset = src.location(&t.key).offset.unwrap_or(0);
                reads.push(JobRead {
                    input: t.file,
                    key: t.key.clone(),
                    offset,
                    len: t.len,
                });
            }
        }
        jobs.push(Job {
            shard: shard_name(&stem, gi, groups.len()),
            bytes,
            tensors,
            reads,
        });
    }
    Ok(Derived {
        plan,
        groups,
        stem,
        jobs,
    })
}

/// Plans a conversion of `input` to the directory `output` as jobs.
/// `options` is what the caller records to rebuild `opts` in every job.
pub(crate) fn make_plan(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
    options: serde_json::Value,
) -> Result<JobPlan> {
    let text = |p: &Path| {
        p.to_str().map(str::to_owned).ok_or_else(|| {
            Error::usage(format!(
                "{} is not valid UTF-8: a plan records its paths as text",
                p.display()
            ))
        })
    };
    let (input_text, output_text) = (text(input)?, text(output)?);
    let at = locate(&input_text)?;
    if remote_output(&output_text)? {
        #[cfg(feature = "remote")]
        remote::check_output(&output_text, opts.overwrite)?;
    } else {
        check_overlap(&at.path, output, opts)?;
        crate::io::atomic::check_destination(output, DestKind::Dir, opts.overwrite)?;
    }
    let raw = open_input(&at.path)?;
    let src = Checked::new(raw.as_ref(), opts.verify_input);
    let d = derive(&at.path, output, &src, opts)?;
    Ok(JobPlan {
        format: PLAN_FORMAT.into(),
        version: PLAN_VERSION,
        ckptkit: env!("CARGO_PKG_VERSION").into(),
        input: input_text,
        output: output_text,
        options,
        inputs: pins(&at, &src.files())?,
        jobs: d.jobs,
    })
}

/// Writes a plan file atomically.
pub(crate) fn write_plan(plan: &JobPlan, path: &Path, overwrite: bool) -> Result<()> {
    write_json(plan, path, overwrite)
}

/// Writes `v` as JSON to `path` atomically (temporary file, fsync, rename).
fn write_json<T: Serialize>(v: &T, path: &Path, overwrite: bool) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::json("writing JSON", e))?;
    let f = AtomicFile::create(path, overwrite)?;
    f.file()?
        .write_all(text.as_bytes())
        .map_err(|e| Error::from(e).with_file(f.temp()))?;
    f.commit()
}

/// Reads a plan file and its id (the blake3 of its bytes), refusing one
/// another version wrote.
pub(crate) fn read_plan(path: &Path) -> Result<(JobPlan, String)> {
    let bytes = read_capped(path, MAX_PLAN_LEN, "plan file length")?;
    let id = blake3::hash(&bytes).to_hex().to_string();
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::json("reading the plan", e).with_file(path))?;
    let field = |k: &str| v.get(k).cloned().unwrap_or(serde_json::Value::Null);
    if field("format") != PLAN_FORMAT {
        return Err(job_error(format!(
            "not a ckptkit plan file (its `format` is {})",
            field("format")
        ))
        .with_file(path));
    }
    let ours = env!("CARGO_PKG_VERSION");
    if field("version") != PLAN_VERSION || field("ckptkit") != ours {
        return Err(job_error(format!(
            "the plan was written by ckptkit {} (plan version {}); this is ckptkit {ours} (plan \
             version {PLAN_VERSION}), which may plan differently: plan again with this version",
            field("ckptkit"),
            field("version")
        ))
        .with_file(path));
    }
    let plan: JobPlan = serde_json::from_value(v)
        .map_err(|e| Error::json("reading the plan", e).with_file(path))?;
    // names are joined to the staging directory before the jobs are derived
    // again: only plain file names
    if let Some(j) = plan.jobs.iter().find(|j| {
        !crate::format::validate::safe_file_name(&j.shard) || !j.shard.ends_with(".safetensors")
    }) {
        return Err(job_error(format!(
            "job file name {:?} is not a plain .safetensors file name",
            j.shard
        ))
        .with_file(path));
    }
    Ok((plan, id))
}

fn read_capped(path: &Path, cap: u64, what: &'static str) -> Result<Vec<u8>> {
    let f = crate::io::files::open_regular(path)?;
    let len = f
        .metadata()
        .map_err(|e| Error::from(e).with_file(path))?
        .len();
    if len > cap {
        return Err(Error::new(ErrorKind::LimitExceeded {
            what,
            value: len,
            limit: cap,
        })
        .with_file(path));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(cap)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::from(e).with_file(path))?;
    Ok(bytes)
}

/// Checks the plan's input files against their pins, before anything
/// else reads them (a remote input: its objects as mounted now, whose
/// every read is conditional on the ETag compared here).
fn check_pins(plan: &JobPlan, at: &Located) -> Result<()> {
    let now = match &at.url {
        Some(url) => Some(remote_pins(&at.path, url)?),
        None => None,
    };
    for a in &plan.inputs {
        let p = Path::new(&a.path);
        let changed = |now: String| {
            job_error(format!(
                "{} changed since the plan (planned: {} bytes, header blake3 {}{}; now: {now}): \
                 plan again",
                a.path,
                a.size,
                a.header_blake3,
                a.etag
                    .as_deref()
                    .map(|e| format!(", ETag {e}"))
                    .unwrap_or_default()
            ))
            .with_file(p)
        };
        if let Some(now) = &now {
            match now.iter().find(|n| n.path == a.path) {
                Some(n) if n == a => continue,
                Some(n) => {
                    return Err(changed(format!(
                        "{} bytes, header blake3 {}, ETag {}",
                        n.size,
                        n.header_blake3,
                        n.etag.as_deref().unwrap_or("none")
                    )))
                }
                None => return Err(changed("not among the input's files".into())),
            }
        }
        let size = crate::io::files::open_regular(p)?
            .metadata()
            .map_err(|e| Error::from(e).with_file(p))?
            .len();
        if size != a.size {
            return Err(changed(format!("{size} bytes")));
        }
        let (_, h) = header_hash(p)?;
        if h != a.header_blake3 {
            return Err(changed(format!("header blake3 {h}")));
        }
    }
    Ok(())
}

/// Opens the plan's input (pins checked) and re-derives the jobs, which
/// must be the plan's.
fn reopen<'a>(
    plan: &JobPlan,
    at: &Located,
    raw: &'a dyn TensorSource,
    opts: &ConvertOptions,
) -> Result<(Checked<'a>, Derived)> {
    let input = at.path.as_path();
    let src = Checked::new(raw, opts.verify_input);
    let now = pins(at, &src.files())?;
    if now != plan.inputs {
        return Err(job_error(format!(
            "the input {} has other files now than when planned: plan again",
            plan.input
        )));
    }
    let d = derive(input, Path::new(&plan.output), &src, opts)?;
    if d.jobs != plan.jobs {
        return Err(job_error(
            "the options or the files they read (a --like reference, a quanto map) give a \
             different plan now: plan again",
        ));
    }
    Ok((src, d))
}

/// Makes (or reuses) the staging directory of `plan` (`id`); refuses one
/// that belongs to another plan.
fn staging(plan: &JobPlan, id: &str, create: bool) -> Result<PathBuf> {
    let dir = staging_dir(Path::new(&plan.output))?;
    let idp = dir.join(PLAN_ID_FILE);
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(m) => {
            return Err(Error::new(ErrorKind::FileType {
                found: crate::io::files::type_name(&m),
                expected: "a directory",
            })
            .with_file(&dir))
        }
        Err(_) if create => {
            crate::migrate::ensure_parent(&dir)?;
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::from(e).with_file(&dir)),
            }
        }
        Err(_) => {
            return Err(job_error(format!(
                "no job of this plan has run: {} does not exist",
                dir.display()
            )))
        }
    }
    match read_capped(&idp, MAX_RECORD_LEN, "plan id length") {
        Ok(b) if b == id.as_bytes() => Ok(dir),
        Ok(b) => Err(Error::new(ErrorKind::Conflict(format!(
            "{} holds the jobs of another plan ({}); finish that plan, or remove the directory \
             to start over",
            dir.display(),
            String::from_utf8_lossy(&b)
        )))
        .with_file(&dir)),
        Err(_) if create => {
            // the first job here; others may be starting at the same moment:
            // the id is written to a temporary and linked into place, which
            // fails if another got there first (then its id is compared)
            let tmp = crate::io::atomic::temp_path_for(&idp);
            let r = std::fs::write(&tmp, id.as_bytes())
                .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::hard_link(&tmp, &idp));
            let _ = std::fs::remove_file(&tmp);
            match r {
                Ok(()) => crate::io::atomic::sync_dir(&dir)?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::from(e).with_file(&idp)),
            }
            staging(plan, id, false)
        }
        Err(e) => Err(e),
    }
}

fn record_path(dir: &Path, shard: &str) -> PathBuf {
    dir.join(format!("{shard}.done.json"))
}

/// The record of job `k` if it exists and matches its file.
fn done(dir: &Path, id: &str, k: usize, job: &Job) -> Result<Option<JobRecord>> {
    let rp = record_path(dir, &job.shard);
    if std::fs::symlink_metadata(&rp).is_err() {
        return Ok(None);
    }
    let bytes = read_capped(&rp, MAX_RECORD_LEN, "job record length")?;
    let r: JobRecord = serde_json::from_slice(&bytes)
        .map_err(|e| Error::json("reading a job record", e).with_file(&rp))?;
    if r.plan != id || r.job != k || r.shard != job.shard {
        return Err(job_error(format!(
            "the record of job {k} ({}) is not this plan's job {k}",
            job.shard
        ))
        .with_file(&rp));
    }
    let fp = dir.join(&job.shard);
    let size = std::fs::symlink_metadata(&fp).map(|m| m.len()).ok();
    if size != Some(r.size) || crate::io::hash_file(&fp)?.to_hex().as_str() != r.blake3 {
        return Ok(None);
    }
    Ok(Some(r))
}

/// Runs job `k` of a plan (id `id`, from [`read_plan`]) with the options the
/// plan records, rebuilt by the caller: writes its file into the staging
/// directory, then its completion record. A job whose record matches its
/// file is not run again.
pub(crate) fn run_job(
    plan: &JobPlan,
    id: &str,
    k: usize,
    opts: &ConvertOptions,
) -> Result<JobOutcome> {
    let job = plan.jobs.get(k).ok_or_else(|| {
        Error::usage(format!(
            "the plan has {} job(s), numbered from 0; there is no job {k}",
            plan.jobs.len()
        ))
    })?;
    opts.control.check()?;
    if remote_output(&plan.output)? {
        #[cfg(feature = "remote")]
        return remote::run_job(plan, id, k, job, opts);
    }
    let dir = staging(plan, id, true)?;
    if let Some(record) = done(&dir, id, k, job)? {
        return Ok(JobOutcome {
            record,
            already_done: true,
            lossy_layers: Vec::new(),
        });
    }
    // a record left from an earlier run goes first: a crash below must not
    // leave it beside a file it does not describe
    let rp = record_path(&dir, &job.shard);
    if std::fs::symlink_metadata(&rp).is_ok() {
        std::fs::remove_file(&rp).map_err(|e| Error::from(e).with_file(&rp))?;
    }
    let lossy_layers = write_job(plan, k, job, &dir, opts)?;
    crate::io::atomic::fault_point("job-before-record");
    let fp = dir.join(&job.shard);
    let size = std::fs::symlink_metadata(&fp)
        .map_err(|e| Error::from(e).with_file(&fp))?
        .len();
    let record = JobRecord {
        plan: id.into(),
        job: k,
        shard: job.shard.clone(),
        size,
        blake3: crate::io::hash_file(&fp)?.to_hex().to_string(),
        etag: None,
    };
    write_json(&record, &rp, true)?;
    Ok(JobOutcome {
        record,
        already_done: false,
        lossy_layers,
    })
}

/// Writes job `k`'s file into `dir`: the input located and its pins
/// checked, the plan derived again (it must be the plan's). Gives the
/// layers whose re-layout was lossy.
fn write_job(
    plan: &JobPlan,
    k: usize,
    job: &Job,
    dir: &Path,
    opts: &ConvertOptions,
) -> Result<Vec<String>> {
    let at = locate(&plan.input)?;
    check_pins(plan, &at)?;
    let raw = open_input(&at.path)?;
    let (src, d) = reopen(plan, &at, raw.as_ref(), opts)?;
    opts.control.set_total(job.bytes);
    let losses: Losses = Default::default();
    let md = output_metadata(src.metadata(), &d.plan);
    write_model_shard(
        &src, &d.plan, &d.groups, k, &losses, dir, &d.stem, &md, opts,
    )?;
    Ok(losses
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .map(|l| l.layer)
        .collect())
}

/// Checks every job's record against its file, then commits the output
/// directory (the files, the index, the side files, the model files carried
/// from the input directory, as `convert` writes them) and removes the
/// staging directory. Returns the files committed, and the warnings.
pub(crate) fn finish(
    plan: &JobPlan,
    id: &str,
    opts: &ConvertOptions,
) -> Result<(Vec<String>, Vec<String>)> {
    if remote_output(&plan.output)? {
        #[cfg(feature = "remote")]
        return remote::finish(plan, id, opts);
    }
    let output = Path::new(&plan.output);
    let dir = staging(plan, id, false)?;
    let mut missing = Vec::new();
    for (k, job) in plan.jobs.iter().enumerate() {
        if done(&dir, id, k, job)?.is_none() {
            missing.push(format!("{k} ({})", job.shard));
        }
    }
    if !missing.is_empty() {
        return Err(job_error(format!(
            "{} of {} job(s) not done (no record, or a file that does not match it): {}; run \
             them, then finish",
            missing.len(),
            plan.jobs.len(),
            missing.join(", ")
        ))
        .with_file(&dir));
    }
    let at = locate(&plan.input)?;
    let input = at.path.as_path();
    check_pins(plan, &at)?;
    let raw = open_input(input)?;
    let (_src, d) = reopen(plan, &at, raw.as_ref(), opts)?;
    check_overlap(input, output, opts)?;
    let out = AtomicDir::create(output, opts.overwrite)?;
    let mut warnings = Vec::new();
    if input.is_dir() {
        carry_model_files(input, out.path(), &opts.control)?;
    }
    let mut files = Vec::new();
    for job in &plan.jobs {
        let from = dir.join(&job.shard);
        let to = out.path().join(&job.shard);
        // linked, not moved: until the commit the staging copy is the job's
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).map_err(|e| Error::from(e).with_file(&to))?;
        }
        files.push(job.shard.clone());
    }
    write_model_tail(&d.plan, &d.groups, out.path(), &d.stem)?;
    warnings.extend(update_config(
        input,
        &out.path().join("config.json"),
        &d.plan,
    )?);
    out.commit()?;
    std::fs::remove_dir_all(&dir).map_err(|e| Error::from(e).with_file(&dir))?;
    Ok((files, warnings))
}

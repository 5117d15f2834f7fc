//! The `migrate` command line (cargo feature `cli`, on by default): its
//! argument parsing, printing and exit codes, over the library. All the
//! work is in the library; the `migrate` binary (`examples/migrate.rs`) is
//! [`main`], and an embedding (the Python package's console script) calls
//! [`run`] with its own arguments and cancellation handle.
//!
//! Exit codes: 0 success (and `check`: compatible), 1 failure (and
//! `check`: incompatible), 2 usage errors; 130 after a second Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::migrate::jobs;
use crate::migrate::{check, convert, inspect, like_target, ConvertOptions, InspectReport};
use crate::migrate::{Plan, PlanOptions, Rename, Target};
use crate::ZstdOptions;
use clap::{Parser, Subcommand};

const EXAMPLES: &str = "\
Examples:
  # dequantize an optimum-quanto checkpoint (its quanto_qmap.json beside it) to plain bf16
  migrate convert transformer/diffusion_pytorch_model.safetensors plain.safetensors --to plain:bf16
  # quantize to exactly what a trainer expects: the layouts of its quanto map (or checkpoint)
  migrate convert model.safetensors quantized/model.safetensors --like quanto_qmap.json
  # pack into a compressed, hash-verified container, then check it
  migrate convert model.safetensors model.ckpk --compress zstd
  migrate verify model.ckpk
  # why does a resume fail? compare with what the model expects
  migrate check checkpoint.safetensors --against quanto_qmap.json";

#[derive(Parser)]
#[command(name = "migrate", version, about = "Inspect, verify and convert ML checkpoints", after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// No progress or summary output.
    #[arg(short, long, global = true)]
    quiet: bool,
}

/// What tells an input's layouts when its tensors alone do not.
#[derive(clap::Args, Clone, serde::Serialize, serde::Deserialize)]
struct Hints {
    /// The input's quanto map (default: quanto_qmap.json beside INPUT).
    #[arg(long)]
    qmap: Option<PathBuf>,
    /// A plain checkpoint of the same model to take logical shapes from.
    #[arg(long)]
    shapes_from: Option<PathBuf>,
}

impl Hints {
    /// Conversion options carrying these hints.
    fn options(self) -> ConvertOptions {
        ConvertOptions::default()
            .qmap(self.qmap)
            .shapes_from(self.shapes_from)
    }
}

/// `convert`'s arguments, also recorded in a plan file (`migrate plan`) so
/// that every job rebuilds the same options.
#[derive(clap::Args, Clone, serde::Serialize, serde::Deserialize)]
struct ConvertArgs {
    /// A .safetensors file, a sharded directory, a .ckpk container, or a
    /// .gguf file.
    input: PathBuf,
    /// Output path.
    output: PathBuf,
    /// Target layout: keep, plain, plain:bf16|f16|f32,
    /// quanto:qint8|qint4|qint2|qfloat8|qfloat8_e4m3fn|qfloat8_e5m2|qfloat8_e4m3fnuz,
    /// int8, int8:bnb, int8:ct[:group=N][:int-quantized], int8:PATH.json,
    /// comfy:float8_e4m3fn|float8_e5m2|int8_tensorwise[:per_row]|mxfp8|nvfp4 (also
    /// fp8:comfy[:e5m2], int8:comfy[:tensor]), fp8:legacy, fp8:block[:ue8m0],
    /// fp8:ct:tensor|channel|group=N|block=RxC[:float-quantized],
    /// gguf:q8_0|q4_0|q4_1|q5_0|q5_1.
    #[arg(long, default_value = "keep")]
    to: String,
    /// Take every layer's layout from REF: a checkpoint (with its
    /// quanto_qmap.json), a container, or a quanto_qmap.json alone.
    #[arg(long, conflicts_with = "to")]
    like: Option<PathBuf>,
    #[command(flatten)]
    hints: Hints,
    /// Only convert layers whose module path matches (fnmatch; `*` spans dots).
    #[arg(long)]
    include: Vec<String>,
    /// Leave layers whose module path matches unchanged.
    #[arg(long)]
    exclude: Vec<String>,
    /// Write only the layers whose module path matches (fnmatch); the
    /// others are left out of the output.
    #[arg(long)]
    only: Vec<String>,
    /// Rename keys: FROM=TO, FROM a regular expression (`^_orig_mod\.=`
    /// strips a prefix, `^=transformer.` adds one; `$1` captures work).
    #[arg(long)]
    rename: Vec<String>,
    /// Compress a container output: `zstd` or `zstd:LEVEL`.
    #[arg(long)]
    compress: Option<String>,
    /// Disable the float plane filter when compressing.
    #[arg(long)]
    no_float_filter: bool,
    /// Show the plan, write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
    /// Allow re-layouts that cannot be undone byte for byte (their error
    /// is reported).
    #[arg(long)]
    allow_lossy: bool,
    /// Largest data bytes per file when writing a directory.
    #[arg(long, default_value_t = 5_000_000_000)]
    max_shard_size: u64,
    /// `general.architecture` of a .gguf output whose input records none
    /// (ComfyUI-GGUF: flux, sd1, sdxl, sd3, wan, ...).
    #[arg(long)]
    gguf_arch: Option<String>,
    /// Do not record per-tensor blake3 hashes in safetensors outputs
    /// (saves hashing time; `verify` can then check structure only).
    #[arg(long)]
    no_hashes: bool,
    /// Do not check the bytes read against the hashes the input records
    /// (a container's manifest, a ckptkit safetensors file's entry).
    /// By default every byte is checked as it is read, and a mismatch
    /// fails the conversion with no output.
    #[arg(long)]
    no_verify_input: bool,
    /// Treat layers that look quantized in a layout ckptkit does not know
    /// (FP8 or integer codes beside scale tensors, a `scaled_fp8`
    /// marker, a config naming a quantization ckptkit cannot read) as
    /// plain tensors. Without it, conversions that would change them are
    /// refused: casting their codes without their scales gives garbage.
    #[arg(long)]
    assume_plain: bool,
}

impl ConvertArgs {
    /// The conversion options these arguments give (without progress or
    /// cancellation), or the usage error.
    fn options(&self) -> Result<ConvertOptions, String> {
        let target = match &self.like {
            Some(r) => like_target(r).map_err(|e| e.to_string())?,
            None => match Target::parse(&self.to) {
                Ok(t) => t,
                Err(e) => return Err(e.to_string()),
            },
        };
        let compression = match self.compress.as_deref().map(str::parse::<ZstdOptions>) {
            None => None,
            Some(Ok(mut c)) => {
                c.float_filter = !self.no_float_filter;
                Some(c)
            }
            Some(Err(e)) => return Err(e.to_string()),
        };
        let rename = self
            .rename
            .iter()
            .map(|r| Rename::parse(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        Ok(self
            .hints
            .clone()
            .options()
            .compression(compression)
            .overwrite(self.force)
            .dry_run(self.dry_run)
            .max_shard_size(self.max_shard_size)
            .gguf_arch(self.gguf_arch.clone())
            .target(target)
            .select(
                PlanOptions::default()
                    .include(self.include.clone())
                    .exclude(self.exclude.clone())
                    .only(self.only.clone())
                    .allow_lossy(self.allow_lossy)
                    .rename(rename),
            )
            .hashes(!self.no_hashes)
            .extra_reads(self.like.iter().cloned().collect())
            .verify_input(!self.no_verify_input)
            .assume_plain(self.assume_plain))
    }
}

// parsed once per process: the size of its largest variant does not matter
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Convert INPUT to OUTPUT (format from OUTPUT's extension:
    /// .safetensors, .ckpk, .gguf, or a directory).
    Convert(ConvertArgs),
    /// Plan a conversion to a directory as jobs, one per output file, for
    /// separate processes or machines sharing the file system (a
    /// Kubernetes indexed Job, a Slurm array: one `run-shard` per index),
    /// then `finish`. Takes `convert`'s arguments; paths are kept as given,
    /// so every job must see them at the same paths.
    Plan {
        #[command(flatten)]
        args: ConvertArgs,
        /// Where to write the plan (JSON).
        #[arg(long)]
        plan_file: PathBuf,
    },
    /// Run job K (from 0) of a plan: write its output file into the staging
    /// directory beside the output, with a completion record. A job whose
    /// record matches its file is not run again.
    RunShard {
        /// The plan file.
        plan: PathBuf,
        /// The job's index, from 0 (a Kubernetes JOB_COMPLETION_INDEX).
        k: usize,
        /// Print the job's record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every job's record against its file, then commit the output
    /// directory (byte-identical to `convert`) and remove the staging
    /// directory.
    Finish {
        /// The plan file.
        plan: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List layers, layouts, shapes and sizes.
    Inspect {
        /// Input checkpoint.
        input: PathBuf,
        #[command(flatten)]
        hints: Hints,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Will INPUT load where REF's layout is expected? Exit 0 compatible,
    /// 1 incompatible, 2 trouble.
    Check {
        /// The checkpoint to check.
        input: PathBuf,
        /// The expected layout: a checkpoint (with its quanto_qmap.json), a
        /// container, or a quanto_qmap.json alone.
        #[arg(long)]
        against: PathBuf,
        #[command(flatten)]
        hints: Hints,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check structure and hashes. Exit 0 only when everything holds.
    /// Read-only: a pending interrupted commit is reported, not completed.
    Verify {
        /// Input checkpoint.
        input: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Complete ckptkit commits interrupted by a crash beside PATH (a
    /// weights file and its quanto_qmap.json appear together), and remove
    /// the temporaries of writers that are gone.
    Recover {
        /// A file (or directory) whose directory holds the interrupted commit.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The `migrate` binary: parses the process's arguments, installs its
/// signal handlers (the first Ctrl-C or SIGTERM cancels the running
/// command, which removes its temporaries; a second exits at once;
/// SIGPIPE ends the process quietly), runs the command and returns its
/// exit code. For a process's `main` only: an embedding that owns the
/// process's signals calls [`run`].
pub fn main() -> ExitCode {
    install_ctrlc();
    run(std::env::args_os(), crate::Cancel::from_static(&CANCELLED))
}

/// Runs one `migrate` command line (`args`, the program name first) as the
/// binary does, printing to stdout and stderr, and returns its exit code.
/// Installs no signal handler: the command stops, leaving no output, once
/// `cancel` is cancelled.
pub fn run<I, T>(args: I, cancel: crate::Cancel) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run_cli(cli, cancel) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            // usage errors found by the library (output inside the input,
            // colliding renames, contradictory options) exit like clap's
            ExitCode::from(if matches!(e.kind(), crate::ErrorKind::Usage(_)) {
                2
            } else {
                1
            })
        }
    }
}

/// Set by the first Ctrl-C / SIGTERM; the conversion's cancellation handle
/// reads it ([`crate::Cancel::from_static`]).
static CANCELLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn install_ctrlc() {
    extern "C" fn on_signal(_: libc::c_int) {
        if CANCELLED.load(std::sync::atomic::Ordering::Relaxed) {
            // a second Ctrl-C: stop now; the temporaries left behind are
            // removed by the next write of the same output
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(130) }
        }
        CANCELLED.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only reads and stores an atomic flag, or calls
    // _exit; all are async-signal-safe. The action struct is zeroed (empty
    // mask) and fully initialised before use.
    unsafe {
        // a closed pipe (`migrate inspect x | head`) ends the process quietly
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as libc::sighandler_t;
        // no SA_RESTART: a blocking system call returns EINTR at the first
        // signal, so the first Ctrl-C always interrupts
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
}

/// A progress bar on stderr (only when it is a terminal), fed by the
/// conversion's progress callback.
fn progress_bar(enabled: bool) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(bar)
}

/// blake3 of an output file, for the summary (read through bounded
/// windows, so memory stays flat on large outputs).
/// A library report as one line of JSON (`--json`).
/// The options a plan records, rebuilt as `convert` builds them.
fn plan_options(p: &jobs::JobPlan, cancel: crate::Cancel) -> Result<ConvertOptions, crate::Error> {
    let args: ConvertArgs = serde_json::from_value(p.options.clone()).map_err(|e| {
        crate::Error::new(crate::ErrorKind::Job(format!(
            "the plan's options are not this version's `convert` options: {e}"
        )))
    })?;
    let opts = args.options().map_err(|e| {
        crate::Error::new(crate::ErrorKind::Job(format!("the plan's options: {e}")))
    })?;
    Ok(opts.control(crate::Control::new().with_cancel(cancel)))
}

fn to_json<T: serde::Serialize>(r: &T) -> String {
    serde_json::to_string(r).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

fn shorten(v: &[String]) -> String {
    let mut s: Vec<&str> = v.iter().take(8).map(|s| s.as_str()).collect();
    if v.len() > 8 {
        s.push("...");
    }
    s.join(", ")
}

fn summarize(p: &Plan) -> String {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    let (mut exact, mut lossy) = (0, 0);
    for l in &p.layers {
        let k = if l.from == l.to {
            "kept".to_string()
        } else {
            format!("{} -> {}", l.from, l.to)
        };
        *counts.entry(k).or_default() += 1;
        if !l.lossless {
            if l.exact {
                exact += 1;
            } else {
                lossy += 1;
            }
        }
    }
    let mut parts: Vec<String> = counts
        .into_iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    if exact == 0 && lossy == 0 {
        parts.push("all lossless".into());
    }
    if exact > 0 {
        // the values are exactly what the layout's library computes; only
        // converting back would not give the same bytes
        parts.push(format!("{exact} exact (not byte-reversible)"));
    }
    if lossy > 0 {
        parts.push(format!("{lossy} lossy"));
    }
    parts.join(", ")
}

fn print_plan(p: &Plan) {
    println!(
        "{:<44} {:<28} {:<28} {:>8} passes",
        "layer", "from", "to", "lossless"
    );
    let mut rules: Vec<(String, String)> = Vec::new();
    for l in &p.layers {
        let passes: Vec<String> = l
            .passes
            .iter()
            .map(|x| {
                serde_json::to_value(x)
                    .ok()
                    .and_then(|v| v.get("pass").and_then(|s| s.as_str()).map(String::from))
                    .unwrap_or_default()
            })
            .collect();
        println!(
            "{:<44} {:<28} {:<28} {:>8} {}",
            if l.path.is_empty() {
                "(top level)"
            } else {
                &l.path
            },
            l.from,
            l.to,
            if l.lossless {
                "yes"
            } else if l.exact {
                "exact"
            } else {
                "no"
            },
            passes.join(" + ")
        );
        if !l.rule.is_empty() {
            rules.push((l.path.clone(), l.rule.clone()));
        }
    }
    for (path, rule) in rules {
        println!("  {path}: {rule}");
    }
    for u in &p.unmatched {
        println!("unmatched: the reference has layer `{u}`, the input does not");
    }
}

/// The remote inputs of one command, mounted for as long as it runs
/// (feature `remote`); without the feature a URL is refused.
#[derive(Default)]
struct Mounts {
    #[cfg(feature = "remote")]
    list: Vec<crate::io::remote::Mount>,
    /// A remote output: staged locally, uploaded after the conversion.
    #[cfg(feature = "remote")]
    upload: Option<std::sync::Arc<crate::io::remote::Upload>>,
    /// What the upload sent.
    #[cfg(feature = "remote")]
    uploaded: std::sync::Mutex<Option<crate::io::remote::UploadReport>>,
}

impl Mounts {
    /// True when `p` is a URL (s3, gs, az, abfs, http, https).
    fn is_url(p: &std::path::Path) -> bool {
        crate::io::paths::is_url(&p.to_string_lossy())
    }

    /// Mounts `p` when it is a URL and makes it the mount's local path.
    #[cfg_attr(not(feature = "remote"), allow(clippy::ptr_arg))]
    fn input(&mut self, p: &mut PathBuf) -> Result<(), crate::Error> {
        if !Self::is_url(p) {
            return Ok(());
        }
        let s = p.to_string_lossy().into_owned();
        #[cfg(feature = "remote")]
        {
            let m = crate::io::remote::Mount::open(&s)?;
            *p = m.path().to_path_buf();
            self.list.push(m);
            Ok(())
        }
        #[cfg(not(feature = "remote"))]
        Err(crate::Error::usage(format!(
            "{s} is a URL: this migrate was built without remote inputs (build it with \
             `--features remote`)"
        )))
    }

    /// Prepares a remote output when `p` is a URL and makes `p` its local
    /// staging path.
    #[cfg_attr(not(feature = "remote"), allow(clippy::ptr_arg))]
    fn output(&mut self, p: &mut PathBuf, overwrite: bool) -> Result<(), crate::Error> {
        if !Self::is_url(p) {
            return Ok(());
        }
        let s = p.to_string_lossy().into_owned();
        #[cfg(feature = "remote")]
        {
            let dir = crate::migrate::output_kind(std::path::Path::new(&s))
                == crate::migrate::OutputKind::Directory;
            let u = crate::io::remote::Upload::prepare(&s, dir, overwrite)?;
            *p = u.path().to_path_buf();
            self.upload = Some(std::sync::Arc::new(u));
            Ok(())
        }
        #[cfg(not(feature = "remote"))]
        {
            let _ = overwrite;
            Err(crate::Error::usage(format!(
                "{s} is a URL: this migrate was built without remote outputs (build it with \
                 `--features remote`)"
            )))
        }
    }

    /// The conversion's control, which uploads each weight file of a
    /// remote directory output as soon as it is written (`Upload::stream_file`).
    fn streaming(&self, control: crate::Control) -> crate::Control {
        #[cfg(feature = "remote")]
        if let Some(u) = &self.upload {
            let (u, ctl) = (u.clone(), control.clone());
            return control.with_file_done(move |path, name| u.stream_file(path, name, &ctl));
        }
        control
    }

    /// Bytes of a remote output uploaded while the conversion ran (not in
    /// the staged output's size).
    fn streamed_bytes(&self) -> u64 {
        #[cfg(feature = "remote")]
        if let Some(u) = &self.upload {
            return u.streamed_bytes();
        }
        0
    }

    /// Uploads a staged remote output, if any.
    fn commit(&self, ctl: &crate::Control) -> Result<(), crate::Error> {
        #[cfg(feature = "remote")]
        if let Some(u) = &self.upload {
            let r = u.commit(ctl)?;
            *self.uploaded.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        }
        let _ = ctl;
        Ok(())
    }

    /// How a path is shown: a mount's URL for its local path.
    fn shown(&self, p: &std::path::Path) -> String {
        #[cfg(feature = "remote")]
        if let Some(m) = self.list.iter().find(|m| m.path() == p) {
            return m.url().to_string();
        }
        self.unmounted(&p.display().to_string())
    }

    /// `s` with every mount's local path written as its URL (the commands
    /// a report suggests, paths in messages).
    fn unmounted(&self, s: &str) -> String {
        #[cfg(feature = "remote")]
        {
            let mut s = s.to_string();
            for m in &self.list {
                let local = m.path().display().to_string();
                let url = m.url().trim_end_matches('/');
                s = s.replace(&local, url);
            }
            if let Some(u) = &self.upload {
                let local = u.path().display().to_string();
                s = s.replace(&local, u.url().trim_end_matches('/'));
            }
            s
        }
        #[cfg(not(feature = "remote"))]
        s.to_string()
    }

    /// A report as JSON: mounts' local paths shown as their URLs, and what
    /// was fetched (`"remote"`: per URL, bytes and requests).
    fn json<T: serde::Serialize>(&self, r: &T) -> String {
        #[cfg(feature = "remote")]
        if !self.list.is_empty() || self.upload.is_some() {
            let Ok(mut v) = serde_json::to_value(r) else {
                return to_json(r);
            };
            self.unmount_json(&mut v);
            if let Some(o) = v.as_object_mut() {
                for val in o.values_mut() {
                    if let Some(m) = val.as_str().and_then(|s| {
                        self.list
                            .iter()
                            .find(|m| m.url().trim_end_matches('/') == s)
                    }) {
                        // the URL as given (a directory keeps its slash)
                        *val = serde_json::Value::String(m.url().to_string());
                    }
                }
                let remote: Vec<serde_json::Value> = self
                    .list
                    .iter()
                    .map(|m| {
                        serde_json::json!({
                            "url": m.url(),
                            "fetched_bytes": m.fetched_bytes(),
                            "requests": m.requests(),
                        })
                    })
                    .collect();
                o.insert("remote".into(), serde_json::Value::Array(remote));
                if let Some(r) = &*self.uploaded.lock().unwrap_or_else(|p| p.into_inner()) {
                    if let Ok(u) = serde_json::to_value(r) {
                        o.insert("upload".into(), u);
                    }
                }
            }
            return to_json(&v);
        }
        to_json(r)
    }

    #[cfg(feature = "remote")]
    fn unmount_json(&self, v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) => *s = self.unmounted(s),
            serde_json::Value::Array(a) => a.iter_mut().for_each(|x| self.unmount_json(x)),
            serde_json::Value::Object(o) => o.values_mut().for_each(|x| self.unmount_json(x)),
            _ => {}
        }
    }
}

fn run_cli(mut cli: Cli, cancel: crate::Cancel) -> Result<u8, crate::Error> {
    let mut mounts = Mounts::default();
    match &mut cli.cmd {
        Cmd::Convert(a) => {
            mounts.input(&mut a.input)?;
            if !a.dry_run {
                mounts.output(&mut a.output, a.force)?;
            }
        }
        Cmd::Inspect { input, .. } | Cmd::Verify { input, .. } => mounts.input(input)?,
        Cmd::Check { input, against, .. } => {
            mounts.input(input)?;
            mounts.input(against)?;
        }
        // a plan's steps mount a remote input themselves (jobs.rs); without
        // the feature, a URL is refused here as for the other commands
        #[cfg(not(feature = "remote"))]
        Cmd::Plan { args, .. } => mounts.input(&mut args.input.clone())?,
        _ => {}
    }
    run_cmd(cli, cancel, &mounts)
        .map_err(|e| e.map_file(|p| PathBuf::from(mounts.unmounted(&p.display().to_string()))))
}

fn run_cmd(cli: Cli, cancel: crate::Cancel, mounts: &Mounts) -> Result<u8, crate::Error> {
    match cli.cmd {
        Cmd::Convert(a) => {
            let opts = match a.options() {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(2);
                }
            };
            let ConvertArgs {
                input,
                output,
                json,
                dry_run,
                ..
            } = a;
            // printed (not with -q), and in --json: one more read of the output
            let opts = opts.output_hash(json || !cli.quiet);
            let bar = progress_bar(!(json || cli.quiet || dry_run));
            let mut control = crate::Control::new().with_cancel(cancel);
            if let Some(b) = bar.clone() {
                control = control.with_progress(move |p| {
                    b.set_length(p.bytes_total);
                    b.set_position(p.bytes_done);
                });
            }
            let opts = opts.control(mounts.streaming(control));
            let s = convert(&input, &output, &opts);
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let mut s = s?;
            s.bytes_out += mounts.streamed_bytes();
            // a remote output: the staged, committed output is uploaded
            mounts.commit(&opts.control)?;
            if !json {
                for w in &s.warnings {
                    eprintln!("warning: {w}");
                }
            }
            if dry_run && !json && !cli.quiet {
                if let Some(p) = &s.plan {
                    print_plan(p);
                }
            }
            if json {
                println!("{}", mounts.json(&s));
            } else if !cli.quiet {
                if dry_run {
                    println!(
                        "dry run: would write {} tensors in {} layers ({} bytes) to {}",
                        s.tensors,
                        s.layers,
                        s.bytes_in,
                        mounts.shown(&output)
                    );
                } else {
                    let gbs = s.bytes_in as f64 / s.seconds.max(1e-9) / 1e9;
                    let kinds = s
                        .plan
                        .as_ref()
                        .map(summarize)
                        .unwrap_or_else(|| "all kept, lossless".into());
                    println!(
                        "wrote {}: {} tensors, {} layers ({kinds}), {} bytes in, {} bytes out, {:.2} s ({gbs:.2} GB/s)",
                        mounts.shown(&output),
                        s.tensors,
                        s.layers,
                        s.bytes_in,
                        s.bytes_out,
                        s.seconds
                    );
                    for l in &s.losses {
                        println!(
                            "lossy re-layout `{}`: {} integers clamped, max abs error {:.3e} ({:.3} scale units)",
                            l.layer, l.clamped, l.max_abs_error, l.max_error_in_scales
                        );
                    }
                    if let Some(h) = &s.blake3 {
                        println!("blake3 {h}  {}", mounts.shown(&output));
                    }
                }
            }
            Ok(0)
        }
        Cmd::Plan { args, plan_file } => {
            if args.dry_run {
                eprintln!("error: a plan writes nothing but the plan: drop --dry-run");
                return Ok(2);
            }
            let opts = match args.options() {
                Ok(o) => o.control(crate::Control::new().with_cancel(cancel)),
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(2);
                }
            };
            let recorded = serde_json::to_value(&args)
                .map_err(|e| crate::Error::usage(format!("recording the options: {e}")))?;
            let plan = jobs::make_plan(&args.input, &args.output, &opts, recorded)?;
            // the plan file is replaced only with --force, as the output is
            jobs::write_plan(&plan, &plan_file, args.force)?;
            if args.json {
                println!("{}", to_json(&plan));
            } else if !cli.quiet {
                let bytes: u64 = plan.jobs.iter().map(|j| j.bytes).sum();
                println!(
                    "wrote {}: {} job(s) (0 to {}) writing {} bytes to {}; run `migrate run-shard {} K` \
                     for each K, then `migrate finish {}`",
                    plan_file.display(),
                    plan.jobs.len(),
                    plan.jobs.len().saturating_sub(1),
                    bytes,
                    args.output.display(),
                    plan_file.display(),
                    plan_file.display()
                );
            }
            Ok(0)
        }
        Cmd::RunShard { plan, k, json } => {
            let (p, id) = jobs::read_plan(&plan)?;
            let opts = plan_options(&p, cancel)?;
            let bar = progress_bar(!(json || cli.quiet));
            let opts = match bar.clone() {
                Some(b) => {
                    let control = opts.control.clone().with_progress(move |pr| {
                        b.set_length(pr.bytes_total);
                        b.set_position(pr.bytes_done);
                    });
                    opts.control(control)
                }
                None => opts,
            };
            let r = jobs::run_job(&p, &id, k, &opts);
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let r = r?;
            if json {
                println!("{}", to_json(&r));
            } else if !cli.quiet {
                println!(
                    "job {k}: {} {} ({} bytes, blake3 {})",
                    r.record.shard,
                    if r.already_done {
                        "was already done"
                    } else {
                        "written"
                    },
                    r.record.size,
                    r.record.blake3
                );
                for l in &r.lossy_layers {
                    println!("lossy re-layout `{l}` (allowed by the plan's options)");
                }
            }
            Ok(0)
        }
        Cmd::Finish { plan, json } => {
            let (p, id) = jobs::read_plan(&plan)?;
            let opts = plan_options(&p, cancel)?;
            let (files, warnings) = jobs::finish(&p, &id, &opts)?;
            if json {
                println!(
                    "{}",
                    to_json(&serde_json::json!({
                        "output": p.output,
                        "files": files,
                        "warnings": warnings,
                    }))
                );
            } else {
                for w in &warnings {
                    eprintln!("warning: {w}");
                }
                if !cli.quiet {
                    println!(
                        "wrote {}: {} file(s) from {} job(s)",
                        p.output,
                        files.len(),
                        p.jobs.len()
                    );
                }
            }
            Ok(0)
        }
        Cmd::Inspect { input, hints, json } => {
            let opts = hints.options();
            let r = inspect(&input, &opts)?;
            let InspectReport {
                layers,
                total_bytes: total,
                problems,
                warnings,
                ..
            } = &r;
            if json {
                println!("{}", mounts.json(&r));
            } else {
                for l in layers {
                    let shapes: Vec<String> = l
                        .tensors
                        .iter()
                        .map(|(n, d, s)| format!("{n} {d} {s:?}"))
                        .collect();
                    println!(
                        "{:<48} {:<24} {:>12} B  {}",
                        if l.path.is_empty() {
                            "(top level)"
                        } else {
                            &l.path
                        },
                        l.layout,
                        l.bytes,
                        shapes.join(", ")
                    );
                }
                println!("{} layers, {} bytes", layers.len(), total);
                for w in warnings {
                    println!("warning: {w}");
                }
                for p in problems {
                    println!("problem: {p}");
                }
            }
            Ok(if problems.is_empty() { 0 } else { 1 })
        }
        Cmd::Check {
            input,
            against,
            hints,
            json,
        } => {
            let opts = hints.options();
            let r = match check(&input, &against, &opts) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(2);
                }
            };
            let fix = r.fix.clone().unwrap_or_default();
            if json {
                println!("{}", mounts.json(&r));
            } else if r.compatible() {
                for u in &r.unknown_layouts {
                    println!("note: unknown quantized layout: {}", u.describe());
                }
                println!(
                    "compatible: {} loads where {} is expected",
                    mounts.shown(&input),
                    mounts.shown(&against)
                );
            } else {
                for m in &r.mismatches {
                    println!(
                        "`{}`: checkpoint has {}; expected {}",
                        m.layer, m.have, m.expected
                    );
                }
                for u in &r.unknown_layouts {
                    println!("unknown quantized layout: {}", u.describe());
                }
                if !r.missing.is_empty() {
                    println!(
                        "missing keys ({}): {}",
                        r.missing.len(),
                        shorten(&r.missing)
                    );
                }
                if !r.unexpected.is_empty() {
                    println!(
                        "unexpected keys ({}): {}",
                        r.unexpected.len(),
                        shorten(&r.unexpected)
                    );
                }
                println!("to fix:\n  {}", mounts.unmounted(&fix));
            }
            Ok(if r.compatible() { 0 } else { 1 })
        }
        Cmd::Recover { path, json } => {
            let r = crate::recover(&path)?;
            if json {
                println!("{}", to_json(&r));
            } else if !cli.quiet {
                for c in &r.completed {
                    println!("completed: {}", c.display());
                }
                for p in &r.pending {
                    println!("still pending (its writer is running): {}", p.display());
                }
                println!(
                    "{} commit(s) completed, {} pending, {} temporary file(s) removed",
                    r.commits,
                    r.pending.len(),
                    r.removed_temps
                );
            }
            Ok(if r.pending.is_empty() { 0 } else { 1 })
        }
        Cmd::Verify { input, json } => {
            let r = crate::migrate::verify(&input)?;
            if json {
                println!("{}", mounts.json(&r));
            } else if !cli.quiet {
                println!(
                    "ok: {} tensors, {} bytes verified (blake3)",
                    r.tensors, r.bytes
                );
                if r.unchecked > 0 {
                    println!(
                        "note: {} tensors carry no recorded hash (not written by ckptkit): their structure is valid, their bytes were not checked",
                        r.unchecked
                    );
                }
            }
            Ok(0)
        }
    }
}

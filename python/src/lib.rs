//! `ckptkit._ckptkit`: the Python binding of ckptkit, thin over the
//! library's API (`ckptkit::migrate`). Every call that reads tensors runs
//! on a worker thread with the GIL released; the calling thread waits in
//! steps of 100 ms, and between them checks for signals (Ctrl-C cancels
//! the call through its own cancellation handle, leaving no output) and
//! calls the progress callback with the latest numbers. The module installs
//! no signal handler: Python's own raises `KeyboardInterrupt`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use ckptkit::migrate::{ConvertOptions, PlanOptions, Rename, Target};
use ckptkit::{Cancel, Control, ErrorKind, ZstdOptions};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    ckptkit,
    Error,
    PyException,
    "Every ckptkit error: `file`, `layer`, `tensor` and `offset` say where (None when unknown)."
);
create_exception!(
    ckptkit,
    UsageError,
    Error,
    "The call itself is wrong: bad options, an output inside the input, colliding renames."
);
create_exception!(
    ckptkit,
    OutputExistsError,
    Error,
    "The output exists and `force` was not given."
);
create_exception!(
    ckptkit,
    HashMismatchError,
    Error,
    "Bytes do not match their recorded blake3 hash: the file is corrupt."
);
create_exception!(ckptkit, AmbiguousLayoutError, Error, "Layers whose layout cannot be told from the input alone; the message says which hint resolves them.");
create_exception!(
    ckptkit,
    LayoutError,
    Error,
    "A layer's layout is inconsistent, or quantized in a layout ckptkit does not know."
);
create_exception!(
    ckptkit,
    LossyRelayoutError,
    Error,
    "The conversion would lose information and `allow_lossy` was not given."
);
create_exception!(
    ckptkit,
    UnknownFamilyError,
    Error,
    "A container records a layout family this version does not know."
);
create_exception!(
    ckptkit,
    PendingCommitError,
    Error,
    "The file is part of an interrupted commit; `migrate recover` completes it."
);
create_exception!(
    ckptkit,
    CorruptFileError,
    Error,
    "The file breaks its format's rules (truncated, malformed, over a limit)."
);

/// A Python exception for a library error, with its location attached.
fn to_py(py: Python<'_>, e: ckptkit::Error) -> PyErr {
    let msg = e.to_string();
    let err = match e.kind() {
        ErrorKind::Usage(_) => UsageError::new_err(msg),
        ErrorKind::OutputExists(_) => OutputExistsError::new_err(msg),
        ErrorKind::HashMismatch { .. } => HashMismatchError::new_err(msg),
        ErrorKind::Ambiguous(_) => AmbiguousLayoutError::new_err(msg),
        ErrorKind::Layout(_) | ErrorKind::UnknownQuantized(_) => LayoutError::new_err(msg),
        ErrorKind::LossyRelayout { .. } => LossyRelayoutError::new_err(msg),
        ErrorKind::UnknownFamily { .. } => UnknownFamilyError::new_err(msg),
        ErrorKind::PendingCommit { .. } => PendingCommitError::new_err(msg),
        ErrorKind::BadMagic
        | ErrorKind::Truncated { .. }
        | ErrorKind::Malformed(_)
        | ErrorKind::ManifestDecode(_)
        | ErrorKind::Safetensors(_)
        | ErrorKind::Decompress(_)
        | ErrorKind::LimitExceeded { .. }
        | ErrorKind::Overflow { .. } => CorruptFileError::new_err(msg),
        ErrorKind::Interrupted => pyo3::exceptions::PyKeyboardInterrupt::new_err(msg),
        _ => Error::new_err(msg),
    };
    let at = e.location();
    let value = err.value(py);
    let file = at.file.as_ref().map(|p| p.display().to_string());
    let _ = value.setattr("file", file);
    let _ = value.setattr("layer", at.layer.clone());
    let _ = value.setattr("tensor", at.tensor.clone());
    let _ = value.setattr("offset", at.offset);
    err
}

/// A library report as the Python object its JSON is (the CLI's `--json`).
fn to_dict<T: serde::Serialize>(py: Python<'_>, r: &T) -> PyResult<Py<PyAny>> {
    let text = serde_json::to_string(r)
        .map_err(|e| Error::new_err(format!("report does not serialize: {e}")))?;
    let json = py.import("json")?;
    Ok(json.call_method1("loads", (text,))?.unbind())
}

/// Runs `work` on a worker thread with the GIL released; meanwhile, every
/// 100 ms, checks for signals (a pending `KeyboardInterrupt` cancels
/// `cancel`, waits for the worker to stop, and is raised) and calls
/// `progress(done, total)` when the numbers moved.
fn run_cancellable<R, F>(py: Python<'_>, cancel: Cancel, counters: Counters, work: F) -> PyResult<R>
where
    R: Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    // waited on with the GIL released, from this thread only
    let rx = Mutex::new(rx);
    let wait = |timeout: Option<Duration>| -> Result<R, mpsc::RecvTimeoutError> {
        let rx = rx
            .lock()
            .map_err(|_| mpsc::RecvTimeoutError::Disconnected)?;
        match timeout {
            Some(t) => rx.recv_timeout(t),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        }
    };
    let worker = std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    let mut shown = (u64::MAX, u64::MAX);
    loop {
        let got = py.detach(|| wait(Some(Duration::from_millis(100))));
        let report = |shown: &mut (u64, u64)| -> PyResult<()> {
            if let Some((c, f)) = &counters {
                let now = (c[0].load(Ordering::Relaxed), c[1].load(Ordering::Relaxed));
                if now != *shown {
                    *shown = now;
                    f.call1(py, now)?;
                }
            }
            Ok(())
        };
        match got {
            Ok(r) => {
                let _ = worker.join();
                report(&mut shown)?;
                return Ok(r);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = worker.join();
                return Err(Error::new_err("the worker thread panicked"));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let stop = py.check_signals().and_then(|()| report(&mut shown));
        if let Err(e) = stop {
            // stop the work and wait for it: it removes its temporaries
            cancel.cancel();
            let _ = py.detach(|| wait(None));
            let _ = worker.join();
            return Err(e);
        }
    }
}

/// The layer selection of a call (`include`, `exclude`, `rename`,
/// `allow_lossy`), as `convert` and `load` take it.
fn selection(
    py: Python<'_>,
    include: Vec<String>,
    exclude: Vec<String>,
    rename: Vec<String>,
    allow_lossy: bool,
) -> PyResult<PlanOptions> {
    let renames = rename
        .iter()
        .map(|r| Rename::parse(r))
        .collect::<ckptkit::Result<Vec<_>>>()
        .map_err(|e| to_py(py, e))?;
    Ok(PlanOptions::default()
        .include(include)
        .exclude(exclude)
        .allow_lossy(allow_lossy)
        .rename(renames))
}

/// A progress callback's shared counters (bytes done, bytes total) and the
/// callback itself, for [`run_cancellable`].
type Counters = Option<(Arc<[AtomicU64; 2]>, Py<PyAny>)>;

/// A call's own cancellation handle and control; when `progress` is given,
/// the control stores the latest numbers in counters that the waiting
/// thread hands to it.
fn call_control(progress: Option<Py<PyAny>>) -> (Cancel, Control, Counters) {
    let cancel = Cancel::new();
    let mut control = Control::new().with_cancel(cancel.clone());
    let counters = progress.map(|f| {
        let c: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let mine = c.clone();
        control = control.clone().with_progress(move |p| {
            mine[1].store(p.bytes_total, Ordering::Relaxed);
            mine[0].store(p.bytes_done, Ordering::Relaxed);
        });
        (c, f)
    });
    (cancel, control, counters)
}

fn opts_with_hints(qmap: Option<PathBuf>, shapes_from: Option<PathBuf>) -> ConvertOptions {
    ConvertOptions::default()
        .qmap(qmap)
        .shapes_from(shapes_from)
}

/// inspect(path, *, qmap=None, shapes_from=None) -> dict
/// --
///
/// Layers, layouts, shapes and sizes of a checkpoint (a safetensors file, a
/// sharded or training-checkpoint directory, or a .ckpk container): the
/// fields of `migrate inspect --json`.
#[pyfunction]
#[pyo3(signature = (path, *, qmap=None, shapes_from=None))]
fn inspect(
    py: Python<'_>,
    path: PathBuf,
    qmap: Option<PathBuf>,
    shapes_from: Option<PathBuf>,
) -> PyResult<Py<PyAny>> {
    let opts = opts_with_hints(qmap, shapes_from);
    let r = run_cancellable(py, Cancel::new(), None, move || {
        ckptkit::migrate::inspect(&path, &opts)
    })?;
    to_dict(py, &r.map_err(|e| to_py(py, e))?)
}

/// check(path, against, *, qmap=None, shapes_from=None) -> dict
/// --
///
/// Will the checkpoint at `path` load where the layout of `against` (a
/// checkpoint, a container, or a quanto_qmap.json) is expected? The fields
/// of `migrate check --json`: `compatible`, the mismatches, and `fix`, the
/// command that makes it load.
#[pyfunction]
#[pyo3(signature = (path, against, *, qmap=None, shapes_from=None))]
fn check(
    py: Python<'_>,
    path: PathBuf,
    against: PathBuf,
    qmap: Option<PathBuf>,
    shapes_from: Option<PathBuf>,
) -> PyResult<Py<PyAny>> {
    let opts = opts_with_hints(qmap, shapes_from);
    let r = run_cancellable(py, Cancel::new(), None, move || {
        ckptkit::migrate::check(&path, &against, &opts)
    })?;
    to_dict(py, &r.map_err(|e| to_py(py, e))?)
}

/// verify(path) -> dict
/// --
///
/// Checks the structure and every recorded blake3 hash of a checkpoint; the
/// fields of `migrate verify --json`. Raises HashMismatchError (naming the
/// tensor and byte offset) on corruption.
#[pyfunction]
fn verify(py: Python<'_>, path: PathBuf) -> PyResult<Py<PyAny>> {
    let r = run_cancellable(py, Cancel::new(), None, move || {
        ckptkit::migrate::verify(&path)
    })?;
    to_dict(py, &r.map_err(|e| to_py(py, e))?)
}

/// convert(src, dst, *, to=None, like=None, include=(), exclude=(), rename=(), compress=None, allow_lossy=False, force=False, progress=None, qmap=None, shapes_from=None, max_shard_size=None) -> dict
/// --
///
/// `migrate convert`: converts `src` into `dst` (format from its
/// extension: .safetensors, .ckpk, or a directory). `to` is a target
/// spelling ("plain", "plain:bf16", "quanto:qint8", "int8:bnb", ...;
/// default: keep every layer's layout); `like` a reference whose layouts to
/// take instead (a checkpoint, a container, or a quanto_qmap.json).
/// `compress` is "zstd" or "zstd:LEVEL" for a container. `progress`, if
/// given, is called as `progress(bytes_done, bytes_total)` from the calling
/// thread, at most about ten times a second. Ctrl-C stops the conversion
/// and raises KeyboardInterrupt, leaving no output. Returns the fields of
/// `migrate convert --json`.
#[pyfunction]
#[pyo3(signature = (src, dst, *, to=None, like=None, include=Vec::new(), exclude=Vec::new(), rename=Vec::new(), compress=None, allow_lossy=false, force=false, progress=None, qmap=None, shapes_from=None, max_shard_size=None))]
#[allow(clippy::too_many_arguments)]
fn convert(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    to: Option<String>,
    like: Option<PathBuf>,
    include: Vec<String>,
    exclude: Vec<String>,
    rename: Vec<String>,
    compress: Option<String>,
    allow_lossy: bool,
    force: bool,
    progress: Option<Py<PyAny>>,
    qmap: Option<PathBuf>,
    shapes_from: Option<PathBuf>,
    max_shard_size: Option<u64>,
) -> PyResult<Py<PyAny>> {
    if to.is_some() && like.is_some() {
        return Err(UsageError::new_err("give `to` or `like`, not both"));
    }
    let target = match (&like, &to) {
        (Some(r), _) => ckptkit::migrate::like_target(r).map_err(|e| to_py(py, e))?,
        (None, Some(t)) => Target::parse(t).map_err(|e| to_py(py, e))?,
        (None, None) => Target::parse("keep").map_err(|e| to_py(py, e))?,
    };
    let compression = match compress.as_deref() {
        None => None,
        Some(c) => Some(c.parse::<ZstdOptions>().map_err(|e| to_py(py, e))?),
    };
    let select = selection(py, include, exclude, rename, allow_lossy)?;
    let (cancel, control, counters) = call_control(progress);
    let mut opts = ConvertOptions::default()
        .target(target)
        .compression(compression)
        .overwrite(force)
        .select(select)
        .qmap(qmap)
        .shapes_from(shapes_from)
        .extra_reads(like.into_iter().collect())
        .output_hash(true)
        .control(control);
    if let Some(n) = max_shard_size {
        opts = opts.max_shard_size(n);
    }
    let r = run_cancellable(py, cancel, counters, move || {
        ckptkit::migrate::convert(&src, &dst, &opts)
    })?;
    to_dict(py, &r.map_err(|e| to_py(py, e))?)
}

/// _cli_main(argv) -> int
/// --
///
/// Runs one `migrate` command line (argv with the program name first)
/// exactly as the binary does, printing to stdout and stderr; returns its
/// exit code. Ctrl-C cancels it (no partial output) and raises
/// KeyboardInterrupt.
#[pyfunction]
fn _cli_main(py: Python<'_>, argv: Vec<String>) -> PyResult<i32> {
    let cancel = Cancel::new();
    let c = cancel.clone();
    let code = run_cancellable(py, cancel, None, move || {
        // ExitCode has no accessor: compare with the codes the CLI uses
        let code = ckptkit::cli::run(argv, c);
        [0u8, 1, 2, 130]
            .into_iter()
            .find(|&k| std::process::ExitCode::from(k) == code)
            .map_or(1, i32::from)
    })?;
    Ok(code)
}

/// Bytes read or computed by the library, handed to numpy without a copy
/// (the array owns the Rust buffer), viewed as `dtype` with `shape`; torch
/// tensors share the array's memory.
fn to_array(
    py: Python<'_>,
    key: &str,
    dtype: ckptkit::Dtype,
    shape: &[u64],
    bytes: Vec<u8>,
    framework: &str,
) -> PyResult<Py<PyAny>> {
    let (np_name, pt_name, raw) = dtype_names(dtype).ok_or_else(|| {
        Error::new_err(format!("tensor `{key}`: dtype {dtype} has no numpy form"))
    })?;
    let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    let arr = numpy::PyArray1::<u8>::from_vec(py, bytes).into_any();
    let viewed = arr
        .call_method1("view", (raw,))?
        .call_method1("reshape", (shape,))?;
    if framework == "pt" {
        let torch = py.import("torch")?;
        let t = torch.call_method1("from_numpy", (viewed,))?;
        let out = if raw != np_name {
            t.call_method1("view", (torch.getattr(pt_name)?,))?
        } else {
            t
        };
        return Ok(out.unbind());
    }
    if raw == np_name {
        return Ok(viewed.unbind());
    }
    let ml = py.import("ml_dtypes").map_err(|_| {
        Error::new_err(format!(
            "tensor `{key}` is {dtype}: numpy has no such dtype; install ml_dtypes, or ask for framework=\"pt\""
        ))
    })?;
    Ok(viewed
        .call_method1("view", (ml.getattr(np_name)?,))?
        .unbind())
}

fn check_framework(framework: &str) -> PyResult<()> {
    if framework != "np" && framework != "pt" {
        return Err(UsageError::new_err(format!(
            "framework must be \"np\" or \"pt\", not {framework:?}"
        )));
    }
    Ok(())
}

/// `like` as the library's target: a path that exists is a reference (a
/// checkpoint, a container, a quanto_qmap.json); other text is a target
/// spelling ("plain", "plain:bf16", "quanto:qint8", ...).
fn like_to_target(py: Python<'_>, like: &Bound<'_, PyAny>) -> PyResult<(Target, Option<PathBuf>)> {
    if let Ok(p) = like.extract::<PathBuf>() {
        if p.exists() {
            let t = ckptkit::migrate::like_target(&p).map_err(|e| to_py(py, e))?;
            return Ok((t, Some(p)));
        }
        if let Some(s) = p.to_str() {
            return Ok((Target::parse(s).map_err(|e| to_py(py, e))?, None));
        }
    }
    Err(UsageError::new_err(
        "like must be a path to a reference checkpoint, container or quanto_qmap.json, or a \
         target spelling such as \"plain\" or \"quanto:qint8\" (ckptkit.load takes a state dict too)",
    ))
}

/// load(path, *, like=None, framework="pt", device="cpu", allow_lossy=False, include=(), exclude=(), only=(), rename=(), qmap=None, shapes_from=None, progress=None) -> dict
/// --
///
/// The state dict of the checkpoint at `path` (a file, a directory or a
/// container) in the layout of `like`: a reference checkpoint, container
/// or quanto_qmap.json whose layouts to take, or a target spelling such as
/// "plain" (dequantize everything) or "quanto:qint8"; None keeps every
/// layer's layout. Converted in memory, layer by layer, exactly as
/// `convert` would write it, with no temporary file; every byte read is
/// checked against the hashes the file records. `only` (module-path
/// globs) loads just those layers. Tensors are torch tensors ("pt", moved
/// with `.to(device)` when device is not "cpu") or numpy arrays ("np").
/// Raises a ckptkit.Error naming the layer when a layout cannot be matched
/// (LossyRelayoutError unless allow_lossy).
#[pyfunction]
#[pyo3(signature = (path, *, like=None, framework="pt", device="cpu", allow_lossy=false, include=Vec::new(), exclude=Vec::new(), only=Vec::new(), rename=Vec::new(), qmap=None, shapes_from=None, progress=None, like_tensors=None, like_qmap=None, like_qmap_json=None))]
#[allow(clippy::too_many_arguments)]
fn load(
    py: Python<'_>,
    path: PathBuf,
    like: Option<&Bound<'_, PyAny>>,
    framework: &str,
    device: &str,
    allow_lossy: bool,
    include: Vec<String>,
    exclude: Vec<String>,
    only: Vec<String>,
    rename: Vec<String>,
    qmap: Option<PathBuf>,
    shapes_from: Option<PathBuf>,
    progress: Option<Py<PyAny>>,
    like_tensors: Option<Vec<DescribedTensor>>,
    like_qmap: Option<PathBuf>,
    like_qmap_json: Option<String>,
) -> PyResult<Py<PyAny>> {
    check_framework(framework)?;
    let (target, reference) = match (like, like_tensors) {
        (Some(_), Some(_)) => {
            return Err(UsageError::new_err(
                "give `like` or `like_tensors`, not both",
            ))
        }
        (Some(l), None) => like_to_target(py, l)?,
        (None, Some(described)) => {
            let mut v = Vec::with_capacity(described.len());
            for (k, d, shape, value) in described {
                let dtype = dtype_from_name(&d).ok_or_else(|| {
                    UsageError::new_err(format!(
                        "`{k}` of the state dict has dtype {d}, which ckptkit does not store"
                    ))
                })?;
                v.push((k, dtype, shape, value));
            }
            let t =
                ckptkit::migrate::like_tensors(&v, like_qmap.as_deref(), like_qmap_json.as_deref())
                    .map_err(|e| to_py(py, e))?;
            (t, like_qmap)
        }
        (None, None) => (Target::parse("keep").map_err(|e| to_py(py, e))?, None),
    };
    let select = selection(py, include, exclude, rename, allow_lossy)?.only(only);
    let (cancel, control, counters) = call_control(progress);
    let opts = ConvertOptions::default()
        .target(target)
        .select(select)
        .qmap(qmap)
        .shapes_from(shapes_from)
        .extra_reads(reference.into_iter().collect())
        .control(control);
    let tensors = load_tensors(py, path, opts, cancel, counters)?;
    state_dict(py, tensors, framework, device)
}

/// A state dict's tensor as the Python layer describes it: key, dtype name,
/// shape, and the bytes of a small integer tensor (None for the rest).
type DescribedTensor = (String, String, Vec<u64>, Option<Vec<u8>>);

/// What [`ckptkit::migrate::load`] hands over: key, dtype, shape, bytes.
type Loaded = Vec<(String, ckptkit::Dtype, Vec<u64>, Vec<u8>)>;

/// Runs [`ckptkit::migrate::load`] with the GIL released (cancellable).
fn load_tensors(
    py: Python<'_>,
    path: PathBuf,
    opts: ConvertOptions,
    cancel: Cancel,
    counters: Counters,
) -> PyResult<Loaded> {
    let r = run_cancellable(py, cancel, counters, move || -> ckptkit::Result<Loaded> {
        let mut out = Vec::new();
        ckptkit::migrate::load(&path, &opts, &mut |k, d, s, b| {
            out.push((k.to_string(), d, s.to_vec(), b.into_vec()));
            Ok(())
        })?;
        Ok(out)
    })?;
    r.map_err(|e| to_py(py, e))
}

/// A dict of arrays (numpy) or tensors (torch, moved to `device`) owning
/// the loaded bytes.
fn state_dict(
    py: Python<'_>,
    tensors: Loaded,
    framework: &str,
    device: &str,
) -> PyResult<Py<PyAny>> {
    let dict = pyo3::types::PyDict::new(py);
    for (k, d, s, b) in tensors {
        let mut t = to_array(py, &k, d, &s, b, framework)?;
        if framework == "pt" && device != "cpu" {
            t = t.call_method1(py, "to", (device,))?;
        }
        dict.set_item(k, t)?;
    }
    Ok(dict.into_any().unbind())
}

/// A stored dtype from its torch or numpy name (`torch.bfloat16`,
/// `bfloat16`, `float8_e4m3fn`, ...).
fn dtype_from_name(name: &str) -> Option<ckptkit::Dtype> {
    use ckptkit::Dtype as D;
    let n = name.strip_prefix("torch.").unwrap_or(name);
    [
        D::F64,
        D::F32,
        D::F16,
        D::BF16,
        D::I64,
        D::I32,
        D::I16,
        D::I8,
        D::U64,
        D::U32,
        D::U16,
        D::U8,
        D::Bool,
        D::F8E4M3,
        D::F8E5M2,
        D::F8E4M3Fnuz,
        D::F8E5M2Fnuz,
        D::F8E8M0,
    ]
    .into_iter()
    .find(|&d| dtype_names(d).is_some_and(|(np, pt, _)| np == n || pt == n))
}

/// The numpy / torch dtype names of a stored dtype: (numpy or ml_dtypes name,
/// torch name, the numpy integer dtype of the same width to view it as).
fn dtype_names(d: ckptkit::Dtype) -> Option<(&'static str, &'static str, &'static str)> {
    use ckptkit::Dtype as D;
    Some(match d {
        D::F64 => ("float64", "float64", "float64"),
        D::F32 => ("float32", "float32", "float32"),
        D::F16 => ("float16", "float16", "float16"),
        D::BF16 => ("bfloat16", "bfloat16", "uint16"),
        D::I64 => ("int64", "int64", "int64"),
        D::I32 => ("int32", "int32", "int32"),
        D::I16 => ("int16", "int16", "int16"),
        D::I8 => ("int8", "int8", "int8"),
        D::U64 => ("uint64", "uint64", "uint64"),
        D::U32 => ("uint32", "uint32", "uint32"),
        D::U16 => ("uint16", "uint16", "uint16"),
        D::U8 => ("uint8", "uint8", "uint8"),
        D::Bool => ("bool", "bool", "bool"),
        D::F8E4M3 => ("float8_e4m3fn", "float8_e4m3fn", "uint8"),
        D::F8E5M2 => ("float8_e5m2", "float8_e5m2", "uint8"),
        D::F8E4M3Fnuz => ("float8_e4m3fnuz", "float8_e4m3fnuz", "uint8"),
        D::F8E5M2Fnuz => ("float8_e5m2fnuz", "float8_e5m2fnuz", "uint8"),
        D::F8E8M0 => ("float8_e8m0fnu", "float8_e8m0fnu", "uint8"),
        _ => return None,
    })
}

/// A lazy reader over any input ckptkit reads (a safetensors file, a
/// sharded or training-checkpoint directory, a .ckpk container), like
/// safetensors' `safe_open`: nothing but headers is read until a tensor is
/// asked for, and every tensor's bytes are checked against the hash the
/// file records for them (a container's manifest, a ckptkit safetensors
/// file's `ckptkit.blake3`).
#[pyclass(module = "ckptkit")]
struct Reader {
    src: Box<dyn ckptkit::TensorSource>,
    path: PathBuf,
    qmap: Option<PathBuf>,
    shapes_from: Option<PathBuf>,
}

#[pymethods]
impl Reader {
    /// keys() -> list[str]
    /// --
    ///
    /// The stored tensor keys, in file order.
    fn keys(&self) -> Vec<String> {
        self.src.tensors().iter().map(|t| t.key.clone()).collect()
    }

    /// metadata() -> dict[str, str]
    /// --
    ///
    /// The safetensors `__metadata__` (of the first file of a directory).
    fn metadata(&self) -> std::collections::BTreeMap<String, String> {
        self.src.metadata().clone()
    }

    /// layers() -> list[dict]
    /// --
    ///
    /// The layers with their layouts, as `ckptkit.inspect` reports them.
    fn layers(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let opts = opts_with_hints(self.qmap.clone(), self.shapes_from.clone());
        let r = ckptkit::migrate::inspect(&self.path, &opts).map_err(|e| to_py(py, e))?;
        to_dict(py, &r.layers)
    }

    /// get_dequantized(layer, framework="np", dtype=None) -> dict
    /// --
    ///
    /// One layer (a module path, as `layers()` names it) in plain form:
    /// `{"<layer>.weight": ..., "<layer>.bias": ...}` as a plain model's
    /// state dict holds them, dequantized exactly as `load(path,
    /// like="plain")` dequantizes it (the layer's own library's arithmetic),
    /// in the model's dtype or `dtype` ("f32", "bf16", ...). Nothing else is
    /// read; the bytes read are checked against their recorded hashes. A
    /// plain layer comes back as stored.
    #[pyo3(signature = (layer, framework="np", dtype=None))]
    fn get_dequantized(
        &self,
        py: Python<'_>,
        layer: &str,
        framework: &str,
        dtype: Option<&str>,
    ) -> PyResult<Py<PyAny>> {
        check_framework(framework)?;
        let prefix = format!("{layer}.");
        if !self
            .src
            .tensors()
            .iter()
            .any(|t| t.key.starts_with(&prefix))
        {
            let e = Error::new_err(format!(
                "{}: no layer `{layer}` (no stored tensor starts with `{prefix}`); `layers()` lists them",
                self.src.describe()
            ));
            let _ = e.value(py).setattr("file", self.src.describe());
            let _ = e.value(py).setattr("layer", layer);
            return Err(e);
        }
        let spelling = match dtype {
            None => "plain".to_string(),
            Some(d) => format!("plain:{d}"),
        };
        let target = Target::parse(&spelling).map_err(|e| to_py(py, e))?;
        // the layer's path as a glob matching only itself
        let exact: String = layer
            .chars()
            .map(|c| match c {
                '*' | '?' | '[' => format!("[{c}]"),
                c => c.to_string(),
            })
            .collect();
        let (cancel, control, counters) = call_control(None);
        let opts = opts_with_hints(self.qmap.clone(), self.shapes_from.clone())
            .target(target)
            .select(PlanOptions::default().only(vec![exact]))
            .control(control);
        let tensors = load_tensors(py, self.path.clone(), opts, cancel, counters)?;
        state_dict(py, tensors, framework, "cpu")
    }

    /// get_tensor(name, framework="np") -> numpy.ndarray | torch.Tensor
    /// --
    ///
    /// One stored tensor, as stored (a quantized layer's codes and scales
    /// are separate tensors), its bytes checked against their recorded
    /// hash. The array owns the bytes read (no further copy); torch tensors
    /// share them (`torch.from_numpy`). numpy has no bfloat16 or float8:
    /// with `framework="np"` those need the `ml_dtypes` package, else
    /// `ckptkit.Error`; with `"pt"` they are viewed as torch's own dtypes.
    #[pyo3(signature = (name, framework="np"))]
    fn get_tensor(&self, py: Python<'_>, name: &str, framework: &str) -> PyResult<Py<PyAny>> {
        check_framework(framework)?;
        let t = self
            .src
            .tensors()
            .iter()
            .find(|t| t.key == name)
            .cloned()
            .ok_or_else(|| {
                let e = Error::new_err(format!("{}: no tensor `{name}`", self.src.describe()));
                let _ = e.value(py).setattr("file", self.src.describe());
                let _ = e.value(py).setattr("tensor", name);
                e
            })?;
        // refused before any byte is read
        dtype_names(t.dtype).ok_or_else(|| {
            Error::new_err(format!(
                "tensor `{name}`: dtype {} has no numpy form",
                t.dtype
            ))
        })?;
        let src = &self.src;
        let key = t.key.clone();
        let bytes = py
            .detach(|| -> ckptkit::Result<Vec<u8>> {
                let b = src.read(&key)?.into_vec();
                Ok(b)
            })
            .map_err(|e| to_py(py, e))?;
        if let Some(want) = src.recorded_hash(&key).map_err(|e| to_py(py, e))? {
            let got = blake3::hash(&bytes);
            if got.as_bytes() != &want {
                let e = HashMismatchError::new_err(format!(
                    "{}: tensor `{key}`: its bytes do not match their recorded blake3 hash; the file is corrupt",
                    src.describe()
                ));
                let _ = e.value(py).setattr("file", src.describe());
                let _ = e.value(py).setattr("tensor", key.as_str());
                return Err(e);
            }
        }
        to_array(py, &key, t.dtype, &t.shape, bytes, framework)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        false
    }

    fn __len__(&self) -> usize {
        self.src.tensors().len()
    }

    fn __repr__(&self) -> String {
        format!(
            "ckptkit.open({:?}: {} tensors)",
            self.path,
            self.src.tensors().len()
        )
    }
}

/// open(path, *, qmap=None, shapes_from=None) -> Reader
/// --
///
/// A lazy reader over a checkpoint: `keys()`, `metadata()`, `layers()`,
/// `get_tensor(name, framework="np"|"pt")` (a stored tensor as stored),
/// `get_dequantized(layer)` (one layer in plain form). `qmap` and
/// `shapes_from` are the hints `inspect` and `load` take. Usable as a
/// context manager.
#[pyfunction]
#[pyo3(signature = (path, *, qmap=None, shapes_from=None))]
fn open(
    py: Python<'_>,
    path: PathBuf,
    qmap: Option<PathBuf>,
    shapes_from: Option<PathBuf>,
) -> PyResult<Reader> {
    let p = path.clone();
    let src = py
        .detach(move || ckptkit::open_source(&p))
        .map_err(|e| to_py(py, e))?;
    Ok(Reader {
        src,
        path,
        qmap,
        shapes_from,
    })
}

/// ckptkit's native module; `import ckptkit` re-exports it.
#[pymodule]
fn _ckptkit(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(check, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(_cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(open, m)?)?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_class::<Reader>()?;
    m.add("Error", py.get_type::<Error>())?;
    m.add("UsageError", py.get_type::<UsageError>())?;
    m.add("OutputExistsError", py.get_type::<OutputExistsError>())?;
    m.add("HashMismatchError", py.get_type::<HashMismatchError>())?;
    m.add(
        "AmbiguousLayoutError",
        py.get_type::<AmbiguousLayoutError>(),
    )?;
    m.add("LayoutError", py.get_type::<LayoutError>())?;
    m.add("LossyRelayoutError", py.get_type::<LossyRelayoutError>())?;
    m.add("UnknownFamilyError", py.get_type::<UnknownFamilyError>())?;
    m.add("PendingCommitError", py.get_type::<PendingCommitError>())?;
    m.add("CorruptFileError", py.get_type::<CorruptFileError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

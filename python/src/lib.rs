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
fn run_cancellable<R, F>(
    py: Python<'_>,
    cancel: Cancel,
    counters: Option<(Arc<[AtomicU64; 2]>, Py<PyAny>)>,
    work: F,
) -> PyResult<R>
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
    let renames = rename
        .iter()
        .map(|r| Rename::parse(r))
        .collect::<ckptkit::Result<Vec<_>>>()
        .map_err(|e| to_py(py, e))?;
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
    let mut opts = ConvertOptions::default()
        .target(target)
        .compression(compression)
        .overwrite(force)
        .select(
            PlanOptions::default()
                .include(include)
                .exclude(exclude)
                .allow_lossy(allow_lossy)
                .rename(renames),
        )
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

/// ckptkit's native module; `import ckptkit` re-exports it.
#[pymodule]
fn _ckptkit(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(check, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(_cli_main, m)?)?;
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

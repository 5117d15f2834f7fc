//! Per-call control of long operations: a cancellation handle and a
//! progress callback, passed with each call (no process-wide state), so
//! that two conversions in one process report and stop independently.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, ErrorKind, Result};

/// A cancellation handle. Clones share the flag: cancelling any clone stops
/// the operation it was given to at its next tensor (or piece of a large
/// tensor) with [`ErrorKind::Interrupted`]; the operation then removes its
/// temporaries and leaves no output.
///
/// ```
/// let c = ckptkit::Cancel::new();
/// let for_the_worker = c.clone();
/// c.cancel();
/// assert!(for_the_worker.is_cancelled());
/// ```
#[derive(Clone, Debug)]
pub struct Cancel(Flag);

#[derive(Clone, Debug)]
enum Flag {
    Shared(Arc<AtomicBool>),
    Static(&'static AtomicBool),
}

impl Default for Cancel {
    fn default() -> Self {
        Cancel::new()
    }
}

impl Cancel {
    /// A new handle, not cancelled.
    pub fn new() -> Self {
        Cancel(Flag::Shared(Arc::new(AtomicBool::new(false))))
    }

    /// A handle over a flag that lives for the whole process, such as the
    /// one a signal handler sets (storing `true` is async-signal-safe).
    pub fn from_static(flag: &'static AtomicBool) -> Self {
        Cancel(Flag::Static(flag))
    }

    fn flag(&self) -> &AtomicBool {
        match &self.0 {
            Flag::Shared(a) => a,
            Flag::Static(s) => s,
        }
    }

    /// Asks the operation to stop.
    pub fn cancel(&self) {
        self.flag().store(true, Ordering::SeqCst);
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.flag().load(Ordering::Relaxed)
    }

    /// Fails with [`ErrorKind::Interrupted`] once cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::new(ErrorKind::Interrupted))
        } else {
            Ok(())
        }
    }
}

/// How far an operation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Progress {
    /// Tensor bytes written so far.
    pub bytes_done: u64,
    /// Tensor bytes the operation will write in all (0 while unknown).
    pub bytes_total: u64,
}

/// A progress callback: called from the operation's worker threads, at
/// most about ten times a second, and once more at the end.
pub type ProgressFn = dyn Fn(Progress) + Send + Sync;

/// Called with each weight file of a directory output once it is written
/// and committed in place: its path and its name in the directory.
pub(crate) type FileFn = dyn Fn(&std::path::Path, &str) -> Result<()> + Send + Sync;

/// The control of one operation: its cancellation handle, its progress
/// callback, and its own counters. Options carry one; each call starts
/// from fresh counters, so one `Control` (or options holding it) can serve
/// several calls, one after another or at once.
#[derive(Clone, Default)]
pub struct Control {
    cancel: Cancel,
    progress: Option<Arc<ProgressFn>>,
    file_done: Option<Arc<FileFn>>,
    state: Arc<State>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("cancel", &self.cancel)
            .field("progress", &self.progress.is_some())
            .field("file_done", &self.file_done.is_some())
            .field("bytes_done", &self.state.done.load(Ordering::Relaxed))
            .finish()
    }
}

#[derive(Debug)]
struct State {
    done: AtomicU64,
    total: AtomicU64,
    /// Milliseconds after `start` of the last callback.
    last_ms: AtomicU64,
    start: Instant,
}

impl Default for State {
    fn default() -> Self {
        State {
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
            start: Instant::now(),
        }
    }
}

/// Least time between two progress callbacks.
const PROGRESS_EVERY_MS: u64 = 100;

impl Control {
    /// A control that never cancels and reports nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// With this cancellation handle.
    pub fn with_cancel(mut self, cancel: Cancel) -> Self {
        self.cancel = cancel;
        self
    }

    /// With this progress callback.
    pub fn with_progress(mut self, f: impl Fn(Progress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    /// With this callback for each weight file of a directory output, once
    /// written (a remote output uploads it then).
    #[cfg(all(feature = "remote", feature = "cli"))]
    pub(crate) fn with_file_done(
        mut self,
        f: impl Fn(&std::path::Path, &str) -> Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.file_done = Some(Arc::new(f));
        self
    }

    /// Tells the file callback, if any, that a directory output's weight
    /// file `name` at `path` is written.
    pub(crate) fn file_done(&self, path: &std::path::Path, name: &str) -> Result<()> {
        match &self.file_done {
            Some(f) => f(path, name),
            None => Ok(()),
        }
    }

    /// The cancellation handle.
    pub fn cancel_handle(&self) -> &Cancel {
        &self.cancel
    }

    /// The same handle and callback with fresh counters (one per call).
    pub(crate) fn fresh(&self) -> Control {
        Control {
            cancel: self.cancel.clone(),
            progress: self.progress.clone(),
            file_done: self.file_done.clone(),
            state: Arc::new(State::default()),
        }
    }

    /// Fails with [`ErrorKind::Interrupted`] once cancelled.
    pub(crate) fn check(&self) -> Result<()> {
        self.cancel.check()
    }

    /// Sets the bytes the operation will write.
    pub(crate) fn set_total(&self, n: u64) {
        self.state.total.store(n, Ordering::Relaxed);
    }

    /// Bytes written so far.
    pub fn bytes_done(&self) -> u64 {
        self.state.done.load(Ordering::Relaxed)
    }

    /// Counts `n` more bytes written, and calls the callback when the last
    /// call is long enough ago.
    pub(crate) fn add(&self, n: u64) {
        let done = self.state.done.fetch_add(n, Ordering::Relaxed) + n;
        let Some(f) = &self.progress else {
            return;
        };
        let now = self.state.start.elapsed().as_millis() as u64;
        let last = self.state.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= PROGRESS_EVERY_MS
            && self
                .state
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            f(Progress {
                bytes_done: done,
                bytes_total: self.state.total.load(Ordering::Relaxed),
            });
        }
    }

    /// The final callback, with everything counted.
    pub(crate) fn finish(&self) {
        if let Some(f) = &self.progress {
            f(Progress {
                bytes_done: self.bytes_done(),
                bytes_total: self.state.total.load(Ordering::Relaxed),
            });
        }
    }
}

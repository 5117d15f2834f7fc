//! Atomic outputs: write to a temporary file in the destination's directory,
//! fsync, rename. An error, a panic or Ctrl-C leaves no partial output; a
//! crash leaves at most temporaries with a recognisable name, which the next
//! write of the same output removes.
//!
//! Ownership (spec/container.md §9): every output is locked
//! ([`OutputLock`]) from its first temporary until it is committed; a
//! commit journal is completed only by a process that can take the locks of
//! every file it names and that runs as the journal's owner; read-only
//! operations never rename or delete anything.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, ErrorKind, Result};
use crate::io::lock::{lock_path, OutputLock};

/// The marker in every temporary name: `.NAME.ckptkit-tmp.PID.N`.
pub const TEMP_MARKER: &str = ".ckptkit-tmp.";

/// The record ckptkit leaves in every directory it writes, listing what it
/// wrote or carried there: `--force` replaces an existing directory only
/// when every entry in it is listed in such a record (or it is empty).
pub const RECORD_NAME: &str = ".ckptkit-output.json";

/// The companion files a commit journal may rename beside its weights file
/// (spec/container.md §9): a journal `.NAME.ckptkit-commit` renames onto
/// `NAME` and these names only.
pub const COMPANION_NAMES: [&str; 1] = ["quanto_qmap.json"];

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Test-only fault injection (debug builds only): when the environment
/// variable `CKPTKIT_FAULT` equals `point`, the process announces it on
/// stderr and stops there until killed, so that tests can kill a writer at
/// an exact step of its commit.
#[cfg(debug_assertions)]
pub(crate) fn fault_point(point: &str) {
    if std::env::var("CKPTKIT_FAULT").is_ok_and(|v| v == point) {
        eprintln!("ckptkit fault point `{point}` reached; waiting to be killed");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub(crate) fn fault_point(_point: &str) {}

fn file_name_of(p: &Path) -> Result<String> {
    let n = p
        .file_name()
        .ok_or_else(|| Error::usage(format!("output path {} has no file name", p.display())))?;
    n.to_str().map(str::to_owned).ok_or_else(|| {
        Error::usage(format!(
            "output name {} is not valid UTF-8; choose a UTF-8 name (index files and journals \
             record names as text)",
            p.display()
        ))
    })
}

/// A temporary path beside `dest`.
pub fn temp_path_for(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = format!(".{name}{TEMP_MARKER}{}.{n}{nanos:x}", std::process::id());
    dest.with_file_name(tmp)
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Fsyncs a directory so that a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::from(e).with_file(dir))
}

// SAFETY-free wrapper: the effective user id of this process.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// What an output path must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestKind {
    /// A regular file (`.safetensors`, `.ckpk`, a side file).
    File,
    /// A directory.
    Dir,
}

/// Checks what is at an output path before anything is written: nothing, or
/// the kind expected (judged after following symlinks; a symlink itself is
/// replaced, never what it points to). Anything else (a FIFO, a device, a
/// directory where a file goes, a file where a directory goes) is refused
/// whatever `overwrite` says. An existing output without `overwrite` is
/// [`ErrorKind::OutputExists`]; an existing directory with `overwrite` must
/// be empty or hold only entries ckptkit recorded writing
/// ([`RECORD_NAME`]), else [`ErrorKind::ForeignEntries`].
pub fn check_destination(dest: &Path, kind: DestKind, overwrite: bool) -> Result<()> {
    if !check_destination_type(dest, kind)? {
        return Ok(());
    }
    if !overwrite {
        return Err(Error::new(ErrorKind::OutputExists(dest.to_path_buf())));
    }
    if kind == DestKind::Dir && fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir()) {
        check_replaceable(dest)?;
    }
    Ok(())
}

/// The type half of [`check_destination`]: `Ok(false)` when nothing is at
/// `dest`, `Ok(true)` when something of the expected kind (or a dangling
/// symlink) is, an error naming what is there otherwise.
pub fn check_destination_type(dest: &Path, kind: DestKind) -> Result<bool> {
    let Ok(lmd) = fs::symlink_metadata(dest) else {
        return Ok(false);
    };
    let expected = match kind {
        DestKind::File => "a regular file",
        DestKind::Dir => "a directory",
    };
    match fs::metadata(dest) {
        Ok(md) => {
            let ok = match kind {
                DestKind::File => md.is_file(),
                DestKind::Dir => md.is_dir(),
            };
            if !ok {
                return Err(Error::new(ErrorKind::FileType {
                    found: crate::io::files::type_name(&md),
                    expected,
                })
                .with_file(dest));
            }
        }
        // a dangling symlink: only the link is replaced
        Err(_) if lmd.file_type().is_symlink() => {}
        Err(e) => return Err(Error::from(e).with_file(dest)),
    }
    Ok(true)
}

/// Largest `.ckptkit-output.json` read.
const MAX_RECORD_LEN: u64 = 64 << 20;
/// Most entries walked when checking or recording a directory.
const MAX_WALK_ENTRIES: usize = 1 << 20;
/// Deepest directory level walked.
const MAX_WALK_DEPTH: usize = 16;

#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    version: u32,
    written_by: String,
    /// Every entry, as a relative path with `/` separators, sorted.
    entries: Vec<String>,
}

/// Every entry under `dir` (files, directories, links; not following
/// symlinks), as relative `/`-separated paths, sorted. Non-UTF-8 names are
/// rendered lossily (they can never match a record, so they count as
/// foreign).
pub(crate) fn walk(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new(), 0usize)];
    while let Some((d, rel, depth)) = stack.pop() {
        if depth > MAX_WALK_DEPTH {
            return Err(Error::new(ErrorKind::LimitExceeded {
                what: "directory depth",
                value: depth as u64,
                limit: MAX_WALK_DEPTH as u64,
            })
            .with_file(&d));
        }
        for e in fs::read_dir(&d).map_err(|e| Error::from(e).with_file(&d))? {
            let e = e.map_err(|e| Error::from(e).with_file(&d))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let ft = e
                .file_type()
                .map_err(|er| Error::from(er).with_file(e.path()))?;
            if ft.is_dir() {
                stack.push((e.path(), r.clone(), depth + 1));
            }
            out.push(r);
            if out.len() > MAX_WALK_ENTRIES {
                return Err(Error::new(ErrorKind::LimitExceeded {
                    what: "directory entries",
                    value: out.len() as u64,
                    limit: MAX_WALK_ENTRIES as u64,
                })
                .with_file(dir));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The entries a `.ckptkit-output.json` record lists (relative
/// `/`-separated paths), or why it is not one (a remote output's record is
/// read with it: only what it lists may be replaced).
pub(crate) fn record_entries(bytes: &[u8]) -> std::result::Result<Vec<String>, String> {
    if bytes.len() as u64 > MAX_RECORD_LEN {
        return Err(format!("larger than {MAX_RECORD_LEN} bytes"));
    }
    serde_json::from_slice::<Record>(bytes)
        .map(|r| r.entries)
        .map_err(|e| e.to_string())
}

/// Refuses to replace a directory unless it is empty or every entry in it
/// is listed in its ckptkit record.
pub fn check_replaceable(dir: &Path) -> Result<()> {
    let have = walk(dir)?;
    if have.is_empty() {
        return Ok(());
    }
    let rp = dir.join(RECORD_NAME);
    let listed: std::collections::HashSet<String> = match fs::symlink_metadata(&rp) {
        Ok(md) if md.is_file() => {
            let bytes = crate::io::files::read_capped(&rp, MAX_RECORD_LEN, "output record size")?;
            record_entries(&bytes)
                .map_err(|e| {
                    Error::new(ErrorKind::Json(format!("ckptkit output record: {e}")))
                        .with_file(&rp)
                })?
                .into_iter()
                .collect()
        }
        _ => Default::default(),
    };
    let foreign: Vec<&String> = have
        .iter()
        .filter(|e| e.as_str() != RECORD_NAME && !listed.contains(e.as_str()))
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    Err(Error::new(ErrorKind::ForeignEntries {
        dir: dir.to_path_buf(),
        entries: foreign.iter().take(5).map(|s| s.to_string()).collect(),
        total: foreign.len(),
    })
    .with_file(dir))
}

/// Writes the record of everything in `dir` (called on a finished
/// temporary directory, just before it is committed).
fn write_record(dir: &Path) -> Result<()> {
    let entries: Vec<String> = walk(dir)?
        .into_iter()
        .filter(|e| e != RECORD_NAME)
        .collect();
    let r = Record {
        version: 1,
        written_by: format!("ckptkit {}", env!("CARGO_PKG_VERSION")),
        entries,
    };
    let body = serde_json::to_vec_pretty(&r).map_err(|e| Error::usage(e.to_string()))?;
    let p = dir.join(RECORD_NAME);
    fs::write(&p, body).map_err(|e| Error::from(e).with_file(&p))
}

/// Removes what a temporary path holds (a file, a link, or a directory
/// tree), never following a symlink.
fn remove_any(p: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Atomically exchanges two paths (Linux `renameat2(RENAME_EXCHANGE)`);
/// `false` when the file system cannot.
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let ca = std::ffi::CString::new(a.as_os_str().as_bytes())
            .map_err(|_| Error::usage("path contains NUL"))?;
        let cb = std::ffi::CString::new(b.as_os_str().as_bytes())
            .map_err(|_| Error::usage("path contains NUL"))?;
        // SAFETY: two valid NUL-terminated paths; no memory is shared.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(false),
            _ => Err(Error::from(e).with_file(b)),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Ok(false)
    }
}

/// Prepares `dest`'s directory for a write by the holder of `dest`'s lock:
/// completes the interrupted commits there whose locks can be taken, then
/// removes the temporaries of `dest` left by a writer that is gone.
fn prepare(dest: &Path, lock: &OutputLock) -> Result<()> {
    let dir = parent_dir(dest);
    complete_pending_commits_holding(&dir, &[lock])?;
    remove_stale_temps(&dir, &[lock], Some(&file_name_of(dest)?))?;
    Ok(())
}

/// A file being written atomically to `dest`.
#[derive(Debug)]
pub struct AtomicFile {
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    overwrite: bool,
    lock: Option<OutputLock>,
}

impl AtomicFile {
    /// Locks `dest` and creates its temporary file. Fails if `dest` exists
    /// and `overwrite` is false, if something other than a regular file is
    /// there, or if another process is writing it.
    pub fn create(dest: &Path, overwrite: bool) -> Result<AtomicFile> {
        file_name_of(dest)?;
        check_destination(dest, DestKind::File, overwrite)?;
        let lock = OutputLock::acquire(dest)?;
        prepare(dest, &lock)?;
        let mut f = Self::create_unlocked(dest, overwrite)?;
        f.lock = Some(lock);
        Ok(f)
    }

    fn create_unlocked(dest: &Path, overwrite: bool) -> Result<AtomicFile> {
        let tmp = temp_path_for(dest);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::from(e).with_file(&tmp))?;
        Ok(AtomicFile {
            dest: dest.to_path_buf(),
            tmp,
            file: Some(file),
            overwrite,
            lock: None,
        })
    }

    /// The open temporary file.
    pub fn file(&self) -> Result<&File> {
        self.file
            .as_ref()
            .ok_or_else(|| Error::usage("atomic file already committed"))
    }

    /// The destination path.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// The temporary path (for error messages).
    pub fn temp(&self) -> &Path {
        &self.tmp
    }

    /// Flushes to disk and renames into place.
    pub fn commit(mut self) -> Result<()> {
        let file = self
            .file
            .take()
            .ok_or_else(|| Error::usage("atomic file already committed"))?;
        file.sync_all()
            .map_err(|e| Error::from(e).with_file(&self.tmp))?;
        drop(file);
        if let Err(e) = check_destination(&self.dest, DestKind::File, self.overwrite) {
            let _ = fs::remove_file(&self.tmp);
            return Err(e);
        }
        if let Err(e) = fs::rename(&self.tmp, &self.dest) {
            let _ = fs::remove_file(&self.tmp);
            return Err(Error::from(e).with_file(&self.dest));
        }
        sync_dir(&parent_dir(&self.dest))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
        // the lock (if any) is released after the temporary is gone
    }
}

/// A directory being built atomically at `dest`: everything is written
/// under a temporary directory beside it, which replaces the destination in
/// one step on commit. With `overwrite`, an existing destination is
/// replaced only if it is empty or ckptkit's record lists all of it.
#[derive(Debug)]
pub struct AtomicDir {
    dest: PathBuf,
    tmp: Option<PathBuf>,
    overwrite: bool,
    _lock: OutputLock,
}

impl AtomicDir {
    /// Locks `dest` and creates the temporary directory.
    pub fn create(dest: &Path, overwrite: bool) -> Result<AtomicDir> {
        file_name_of(dest)?;
        check_destination(dest, DestKind::Dir, overwrite)?;
        let lock = OutputLock::acquire(dest)?;
        prepare(dest, &lock)?;
        let tmp = temp_path_for(dest);
        fs::create_dir(&tmp).map_err(|e| Error::from(e).with_file(&tmp))?;
        Ok(AtomicDir {
            dest: dest.to_path_buf(),
            tmp: Some(tmp),
            overwrite,
            _lock: lock,
        })
    }

    /// The temporary directory to write into.
    pub fn path(&self) -> &Path {
        self.tmp.as_deref().unwrap_or(&self.dest)
    }

    /// Records what it holds ([`RECORD_NAME`]), fsyncs every file, then
    /// puts it in place in one step (replacing an existing destination when
    /// allowed and safe).
    pub fn commit(mut self) -> Result<()> {
        let tmp = self
            .tmp
            .take()
            .ok_or_else(|| Error::usage("atomic dir already committed"))?;
        let r = self.commit_inner(&tmp);
        if r.is_err() {
            let _ = remove_any(&tmp);
        }
        r
    }

    fn commit_inner(&self, tmp: &Path) -> Result<()> {
        write_record(tmp)?;
        sync_tree(tmp)?;
        // checked again: the destination may have changed while we wrote
        check_destination(&self.dest, DestKind::Dir, self.overwrite)?;
        fault_point("dir-before-swap");
        let parent = parent_dir(&self.dest);
        if fs::symlink_metadata(&self.dest).is_ok() {
            if exchange(tmp, &self.dest)? {
                // the old directory is now at the temporary name
                sync_dir(&parent)?;
                let _ = remove_any(tmp);
                return Ok(());
            }
            let trash = temp_path_for(&self.dest);
            fs::rename(&self.dest, &trash).map_err(|e| Error::from(e).with_file(&self.dest))?;
            if let Err(e) = fs::rename(tmp, &self.dest) {
                // put the old one back
                let _ = fs::rename(&trash, &self.dest);
                return Err(Error::from(e).with_file(&self.dest));
            }
            sync_dir(&parent)?;
            let _ = remove_any(&trash);
            return Ok(());
        }
        fs::rename(tmp, &self.dest).map_err(|e| Error::from(e).with_file(&self.dest))?;
        sync_dir(&parent)
    }
}

fn sync_tree(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).map_err(|e| Error::from(e).with_file(dir))? {
        let e = e.map_err(|e| Error::from(e).with_file(dir))?;
        let p = e.path();
        let ft = e.file_type().map_err(|er| Error::from(er).with_file(&p))?;
        if ft.is_dir() {
            sync_tree(&p)?;
        } else if ft.is_file() {
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|er| Error::from(er).with_file(&p))?;
        }
    }
    sync_dir(dir)
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if let Some(t) = self.tmp.take() {
            let _ = remove_any(&t);
        }
    }
}

/// The suffix of a commit journal: `.NAME.ckptkit-commit` beside the
/// first file of a [`commit_together`].
pub const JOURNAL_SUFFIX: &str = ".ckptkit-commit";

/// Largest journal read.
const MAX_JOURNAL_LEN: u64 = 1 << 20;

/// The journal path of a group whose first file is `dest`.
pub fn journal_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    dest.with_file_name(format!(".{name}{JOURNAL_SUFFIX}"))
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Journal {
    version: u32,
    /// `[temporary name, destination name]`, both in the journal's directory.
    renames: Vec<(String, String)>,
    /// Destination names removed after the renames (version 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    removes: Vec<String>,
}

impl Journal {
    /// Every name the journal changes.
    fn destinations(&self) -> impl Iterator<Item = &str> {
        self.renames
            .iter()
            .map(|(_, d)| d.as_str())
            .chain(self.removes.iter().map(String::as_str))
    }
}

/// A file to remove as part of a [`commit_together`] (a stale
/// `quanto_qmap.json` beside a weights file that no longer needs it),
/// locked from creation to commit.
#[derive(Debug)]
pub struct Removal {
    path: PathBuf,
    _lock: OutputLock,
}

impl Removal {
    /// Locks `path` for removal.
    pub fn new(path: &Path) -> Result<Removal> {
        file_name_of(path)?;
        Ok(Removal {
            path: path.to_path_buf(),
            _lock: OutputLock::acquire(path)?,
        })
    }
}

/// Commits several files of one directory as one unit (a weights file and
/// its `quanto_qmap.json`, or a weights file and the removal of a stale
/// one): every temporary is flushed, then a journal listing the renames and
/// removals is made durable, then they happen, then the journal is removed.
/// A crash before the journal leaves the old state (plus temporaries); a
/// crash after it leaves a journal that the next write there, or `migrate
/// recover`, rolls forward once the writer is gone (its locks are free), so
/// the new files appear together or not at all. Readers refuse a file whose
/// journal is pending ([`pending_commit`]).
pub fn commit_together(mut files: Vec<AtomicFile>, removals: Vec<Removal>) -> Result<()> {
    if files.len() <= 1 && removals.is_empty() {
        return match files.pop() {
            Some(f) => f.commit(),
            None => Ok(()),
        };
    }
    let first = files
        .first()
        .map(|f| f.dest.clone())
        .ok_or_else(|| Error::usage("commit_together needs a file"))?;
    let dir = parent_dir(&first);
    let mut renames = Vec::with_capacity(files.len());
    for f in &mut files {
        if parent_dir(&f.dest) != dir {
            return Err(Error::usage("commit_together needs files of one directory"));
        }
        let file = f
            .file
            .as_ref()
            .ok_or_else(|| Error::usage("atomic file already committed"))?;
        file.sync_all()
            .map_err(|e| Error::from(e).with_file(&f.tmp))?;
        check_destination(&f.dest, DestKind::File, f.overwrite)?;
        renames.push((file_name_of(&f.tmp)?, file_name_of(&f.dest)?));
    }
    let mut removes = Vec::new();
    for r in &removals {
        if parent_dir(&r.path) != dir {
            return Err(Error::usage("commit_together needs files of one directory"));
        }
        check_destination(&r.path, DestKind::File, true)?;
        removes.push(file_name_of(&r.path)?);
    }
    let j = Journal {
        version: if removes.is_empty() { 1 } else { 2 },
        renames,
        removes,
    };
    let jname = file_name_of(&journal_path(&first))?;
    validate_journal(&jname, &j)?;
    let body = serde_json::to_vec(&j).map_err(|e| Error::usage(e.to_string()))?;
    let jf = AtomicFile::create_unlocked(&journal_path(&first), true)?;
    {
        use std::io::Write;
        let mut w = jf.file()?;
        w.write_all(&body)
            .map_err(|e| Error::from(e).with_file(jf.temp()))?;
    }
    jf.commit()?;
    // from here on the journal owns the temporaries
    for f in &mut files {
        f.file = None;
    }
    fault_point("after-journal");
    roll_forward(&dir, &journal_path(&first), &j)?;
    drop(removals);
    drop(files); // releases the locks, after the journal is gone
    Ok(())
}

/// Checks a journal's names (spec/container.md §9): plain names in its
/// directory; destinations are the journal's own file (`NAME` of
/// `.NAME.ckptkit-commit`) and its companions only; each source is a
/// ckptkit temporary of its own destination.
fn validate_journal(jname: &str, j: &Journal) -> Result<()> {
    let bad = |msg: String| Error::new(ErrorKind::Journal(msg));
    if j.version != 1 && j.version != 2 {
        return Err(bad(format!("unknown version {}", j.version)));
    }
    let own = jname
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(JOURNAL_SUFFIX))
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad(format!("`{jname}` is not a journal name")))?;
    let plain =
        |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0');
    let allowed = |d: &str| d == own || COMPANION_NAMES.contains(&d);
    for (t, d) in &j.renames {
        let ok = plain(t)
            && plain(d)
            && allowed(d)
            && t.starts_with(&format!(".{d}{TEMP_MARKER}"))
            && !d.contains(TEMP_MARKER);
        if !ok {
            return Err(bad(format!(
                "invalid rename {t:?} -> {d:?}: a journal of `{own}` renames only ckptkit \
                 temporaries onto `{own}` and its companions ({})",
                COMPANION_NAMES.join(", ")
            )));
        }
    }
    for d in &j.removes {
        if !plain(d) || !COMPANION_NAMES.contains(&d.as_str()) {
            return Err(bad(format!(
                "invalid removal {d:?}: a journal removes only companions ({})",
                COMPANION_NAMES.join(", ")
            )));
        }
    }
    if j.renames.is_empty() && j.removes.is_empty() {
        return Err(bad("it lists nothing to do".into()));
    }
    Ok(())
}

/// A journal's renames (`[temporary, destination]`) and removals.
#[cfg(feature = "fuzzing")]
pub(crate) type JournalOps = (Vec<(String, String)>, Vec<String>);

/// Parses and validates a journal's bytes as found in a file named `name`
/// (what the next write or `recover` would act on); returns its renames and
/// removals. For the fuzz targets.
#[cfg(feature = "fuzzing")]
pub(crate) fn parse_journal(name: &str, bytes: &[u8]) -> Result<JournalOps> {
    let j: Journal = serde_json::from_slice(bytes)
        .map_err(|er| Error::new(ErrorKind::Journal(format!("invalid JSON: {er}"))))?;
    validate_journal(name, &j)?;
    Ok((j.renames, j.removes))
}

/// Renames every temporary of a journal still present over its
/// destination, removes what it removes, then removes the journal.
fn roll_forward(dir: &Path, jp: &Path, j: &Journal) -> Result<Vec<PathBuf>> {
    let mut done = Vec::new();
    for (t, d) in &j.renames {
        let (tp, dp) = (dir.join(t), dir.join(d));
        match fs::symlink_metadata(&tp) {
            Ok(md) => {
                if !md.is_file() || md.uid() != euid() {
                    return Err(Error::new(ErrorKind::Journal(format!(
                        "`{t}` is not a regular file of this user; remove the journal by hand \
                         after checking the directory"
                    )))
                    .with_file(jp));
                }
                fs::rename(&tp, &dp).map_err(|e| Error::from(e).with_file(&dp))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // already renamed
            Err(e) => return Err(Error::from(e).with_file(&tp)),
        }
        done.push(dp);
    }
    sync_dir(dir)?;
    for d in &j.removes {
        let dp = dir.join(d);
        match fs::remove_file(&dp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::from(e).with_file(&dp)),
        }
        done.push(dp);
    }
    sync_dir(dir)?;
    match fs::remove_file(jp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::from(e).with_file(jp)),
    }
    sync_dir(dir)?;
    Ok(done)
}

/// One journal found in a directory: its path, its owner, and its contents
/// (or why they are invalid).
struct Found {
    path: PathBuf,
    uid: u32,
    journal: Result<Journal>,
}

fn journals(dir: &Path) -> Result<Vec<Found>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::from(e).with_file(dir)),
    };
    for e in rd.flatten() {
        let Some(n) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !(n.starts_with('.') && n.ends_with(JOURNAL_SUFFIX)) || n.contains(TEMP_MARKER) {
            continue;
        }
        let p = e.path();
        let Ok(lmd) = fs::symlink_metadata(&p) else {
            continue;
        };
        let journal = (|| {
            if !lmd.is_file() {
                return Err(Error::new(ErrorKind::FileType {
                    found: crate::io::files::type_name(&lmd),
                    expected: "a regular file",
                }));
            }
            let bytes =
                crate::io::files::read_capped(&p, MAX_JOURNAL_LEN, "commit journal length")?;
            let j: Journal = serde_json::from_slice(&bytes)
                .map_err(|er| Error::new(ErrorKind::Journal(format!("invalid JSON: {er}"))))?;
            validate_journal(&n, &j)?;
            Ok(j)
        })()
        .map_err(|er| er.with_file(&p));
        out.push(Found {
            path: p,
            uid: lmd.uid(),
            journal,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The pending commit journal that names `path` (as a destination or a
/// removal), if any. Read-only: nothing is renamed or removed; journals
/// that are invalid are not reported here (they cannot be completed; the
/// next write into the directory refuses them).
pub fn pending_commit(path: &Path) -> Result<Option<PathBuf>> {
    let dir = parent_dir(path);
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(None);
    };
    for f in journals(&dir)? {
        if let Ok(j) = &f.journal {
            if j.destinations().any(|d| d == name) {
                return Ok(Some(f.path));
            }
        }
    }
    Ok(None)
}

/// What [`recover`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Journals completed.
    pub commits: usize,
    /// Destinations renamed into place or removed by completed journals.
    pub completed: Vec<PathBuf>,
    /// Journals left pending because their writer still runs.
    pub pending: Vec<PathBuf>,
    /// Temporaries of finished writers removed.
    pub removed_temps: usize,
}

/// Paths as displayed (lossy for non-UTF-8 names).
pub(crate) fn display_paths(v: &[PathBuf]) -> Vec<String> {
    v.iter().map(|p| p.display().to_string()).collect()
}

/// `{"commits", "completed", "pending", "removed_temporaries"}`: `migrate
/// recover --json`.
impl serde::Serialize for Recovered {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut m = s.serialize_struct("Recovered", 4)?;
        m.serialize_field("commits", &self.commits)?;
        m.serialize_field("completed", &display_paths(&self.completed))?;
        m.serialize_field("pending", &display_paths(&self.pending))?;
        m.serialize_field("removed_temporaries", &self.removed_temps)?;
        m.end()
    }
}

fn complete_pending_commits_holding(dir: &Path, held: &[&OutputLock]) -> Result<Recovered> {
    let mut r = Recovered::default();
    for f in journals(dir)? {
        let j = f.journal?;
        if f.uid != euid() {
            return Err(Error::new(ErrorKind::Journal(format!(
                "owned by user {} (this is user {}); only its owner completes it — remove it \
                 by hand after checking the directory",
                f.uid,
                euid()
            )))
            .with_file(&f.path));
        }
        // the writer is gone exactly when every lock it held can be taken
        let mut locks = Vec::new();
        let mut busy = false;
        for d in j.destinations() {
            let dp = dir.join(d);
            if held.iter().any(|l| l.path() == lock_path(&dp)) {
                continue;
            }
            match OutputLock::try_acquire(&dp)? {
                Some(l) => locks.push(l),
                None => {
                    busy = true;
                    break;
                }
            }
        }
        if busy {
            r.pending.push(f.path);
            continue;
        }
        r.completed.extend(roll_forward(dir, &f.path, &j)?);
        r.commits += 1;
    }
    Ok(r)
}

/// Removes the temporaries in `dir` (of `only`, or of every name) whose
/// writer is gone: their name's lock can be taken (or is held by the
/// caller), they belong to this user and no pending journal names them.
fn remove_stale_temps(dir: &Path, held: &[&OutputLock], only: Option<&str>) -> Result<usize> {
    let pending: std::collections::HashSet<String> = journals(dir)?
        .into_iter()
        .filter_map(|f| f.journal.ok())
        .flat_map(|j| j.renames.into_iter().map(|(t, _)| t))
        .collect();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(_) => return Ok(0),
    };
    let mut removed = 0;
    for e in rd.flatten() {
        let Some(n) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Some((owner, _)) = n.strip_prefix('.').and_then(|r| r.split_once(TEMP_MARKER)) else {
            continue;
        };
        if only.is_some_and(|o| o != owner) || pending.contains(&n) {
            continue;
        }
        let p = e.path();
        let Ok(md) = fs::symlink_metadata(&p) else {
            continue;
        };
        if md.uid() != euid() {
            continue;
        }
        let dest = dir.join(owner);
        let mine = held.iter().any(|l| l.path() == lock_path(&dest));
        let lock = if mine {
            None
        } else {
            match OutputLock::try_acquire(&dest)? {
                Some(l) => Some(l),
                None => continue, // its writer still runs
            }
        };
        if remove_any(&p).is_ok() {
            removed += 1;
        }
        drop(lock);
    }
    Ok(removed)
}

/// Completes the interrupted commits of `path`'s directory (or of `path`
/// itself, when it is a directory) whose writers are gone, and removes
/// their leftover temporaries: what `migrate recover` does. Journals must
/// be valid and owned by this user; one whose writer still runs is left
/// pending and reported.
pub fn recover(path: &Path) -> Result<Recovered> {
    let mut dirs = vec![parent_dir(path)];
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        dirs.push(path.to_path_buf());
    }
    let mut r = Recovered::default();
    for dir in dirs {
        let x = complete_pending_commits_holding(&dir, &[])?;
        r.commits += x.commits;
        r.completed.extend(x.completed);
        r.pending.extend(x.pending);
        r.removed_temps += remove_stale_temps(&dir, &[], None)?;
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileTypeExt;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn dropped_file_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("x.bin");
        {
            let f = AtomicFile::create(&dest, false).unwrap();
            f.file().unwrap().write_all(b"abc").unwrap();
        }
        assert!(names(d.path()).is_empty(), "no temporary, no lock file");
        let f = AtomicFile::create(&dest, false).unwrap();
        f.file().unwrap().write_all(b"abc").unwrap();
        f.commit().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"abc");
        assert!(AtomicFile::create(&dest, false).is_err());
        assert_eq!(names(d.path()), ["x.bin"]);
    }

    #[test]
    fn a_second_writer_of_the_same_output_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("x.bin");
        let a = AtomicFile::create(&dest, false).unwrap();
        let e = AtomicFile::create(&dest, true).unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::Busy { .. }), "{e}");
        // its temporary was not taken for stale
        assert!(a.temp().exists());
        drop(a);
    }

    #[test]
    fn stale_temps_of_finished_writers_are_cleaned_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("m.ckpk");
        // a crashed writer's temporary (its lock is free)
        let stale = d.path().join(format!(".m.ckpk{TEMP_MARKER}999999999.0"));
        fs::write(&stale, b"x").unwrap();
        // a live writer of another output in the same directory
        let other = d.path().join("o.ckpk");
        let live = AtomicFile::create(&other, false).unwrap();
        let f = AtomicFile::create(&dest, false).unwrap();
        assert!(!stale.exists());
        assert!(live.temp().exists());
        drop(f);
        // recover removes only what no live writer owns
        let stale2 = d.path().join(format!(".m.ckpk{TEMP_MARKER}999999999.1"));
        fs::write(&stale2, b"x").unwrap();
        let r = recover(&dest).unwrap();
        assert_eq!(r.removed_temps, 1);
        assert!(live.temp().exists());
        drop(live);
    }

    #[test]
    fn special_files_at_an_output_path_are_refused_even_with_force() {
        let d = tempfile::tempdir().unwrap();
        for (p, kind) in [
            (Path::new("/dev/null"), DestKind::File),
            (d.path(), DestKind::File),
        ] {
            let e = check_destination(p, kind, true).unwrap_err();
            assert!(matches!(e.kind(), ErrorKind::FileType { .. }), "{e}");
            assert!(!e.to_string().contains("--force"), "{e}");
        }
        let f = d.path().join("f");
        fs::write(&f, b"x").unwrap();
        let e = check_destination(&f, DestKind::Dir, true).unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::FileType { .. }), "{e}");
        let fifo = d.path().join("p");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(AtomicFile::create(&fifo, true).is_err());
        assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    }

    #[test]
    fn force_replaces_only_directories_ckptkit_wrote() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let a = AtomicDir::create(&out, false).unwrap();
        fs::write(a.path().join("model.safetensors"), b"1").unwrap();
        fs::create_dir(a.path().join("sub")).unwrap();
        fs::write(a.path().join("sub/x"), b"1").unwrap();
        a.commit().unwrap();
        assert!(out.join(RECORD_NAME).is_file());
        // ours: replaceable
        let b = AtomicDir::create(&out, true).unwrap();
        fs::write(b.path().join("model.safetensors"), b"2").unwrap();
        b.commit().unwrap();
        assert_eq!(fs::read(out.join("model.safetensors")).unwrap(), b"2");
        assert!(!out.join("sub").exists());
        // a foreign file makes it irreplaceable, named in the error
        fs::write(out.join("notes.txt"), b"mine").unwrap();
        let e = AtomicDir::create(&out, true).unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::ForeignEntries { total: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("notes.txt"), "{e}");
        assert_eq!(fs::read(out.join("notes.txt")).unwrap(), b"mine");
        // an empty directory is replaceable; a directory without a record is not
        let empty = d.path().join("empty");
        fs::create_dir(&empty).unwrap();
        AtomicDir::create(&empty, true).unwrap().commit().unwrap();
        let theirs = d.path().join("theirs");
        fs::create_dir(&theirs).unwrap();
        for i in 0..7 {
            fs::write(theirs.join(format!("f{i}")), b"x").unwrap();
        }
        let e = AtomicDir::create(&theirs, true).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("7 entries") && msg.contains("...") && msg.contains("f0"),
            "{msg}"
        );
        assert_eq!(fs::read_dir(&theirs).unwrap().count(), 7);
        // nothing but the outputs remains beside them
        assert_eq!(names(d.path()), ["empty", "out", "theirs"]);
    }

    fn atomic_with(dest: &Path, body: &[u8]) -> AtomicFile {
        let f = AtomicFile::create(dest, true).unwrap();
        f.file().unwrap().write_all(body).unwrap();
        f
    }

    #[test]
    fn commit_together_leaves_both_files_and_no_journal() {
        let d = tempfile::tempdir().unwrap();
        let w = d.path().join("model.safetensors");
        let q = d.path().join("quanto_qmap.json");
        fs::write(&q, b"old map").unwrap();
        commit_together(
            vec![atomic_with(&w, b"weights"), atomic_with(&q, b"new map")],
            vec![],
        )
        .unwrap();
        assert_eq!(fs::read(&w).unwrap(), b"weights");
        assert_eq!(fs::read(&q).unwrap(), b"new map");
        assert_eq!(names(d.path()), ["model.safetensors", "quanto_qmap.json"]);
        assert!(pending_commit(&w).unwrap().is_none());
        // a plain replacement removes the map in the same journal
        commit_together(
            vec![atomic_with(&w, b"plain")],
            vec![Removal::new(&q).unwrap()],
        )
        .unwrap();
        assert_eq!(names(d.path()), ["model.safetensors"]);
    }

    #[test]
    fn commit_together_refuses_existing_output_before_any_rename() {
        let d = tempfile::tempdir().unwrap();
        let w = d.path().join("model.safetensors");
        let q = d.path().join("quanto_qmap.json");
        fs::write(&w, b"old").unwrap();
        let a = atomic_with(&q, b"map");
        let mut b = atomic_with(&d.path().join("tmpdest"), b"w");
        b.dest = w.clone();
        b.overwrite = false;
        assert!(matches!(
            commit_together(vec![b, a], vec![]).unwrap_err().kind(),
            ErrorKind::OutputExists(_)
        ));
        assert_eq!(fs::read(&w).unwrap(), b"old");
        assert!(!q.exists(), "nothing renamed");
        assert_eq!(
            names(d.path()),
            ["model.safetensors"],
            "temporaries removed"
        );
    }

    fn plant(d: &Path, done: usize) -> (PathBuf, PathBuf) {
        let w = d.join("model.safetensors");
        let q = d.join("quanto_qmap.json");
        fs::write(&w, b"old weights").unwrap();
        fs::write(&q, b"old map").unwrap();
        let tw = temp_path_for(&w);
        let tq = temp_path_for(&q);
        fs::write(&tw, b"new weights").unwrap();
        fs::write(&tq, b"new map").unwrap();
        let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
        let j = Journal {
            version: 1,
            renames: vec![(name(&tw), name(&w)), (name(&tq), name(&q))],
            removes: vec![],
        };
        fs::write(journal_path(&w), serde_json::to_vec(&j).unwrap()).unwrap();
        if done >= 1 {
            fs::rename(&tw, &w).unwrap();
        }
        if done >= 2 {
            fs::rename(&tq, &q).unwrap();
        }
        (w, q)
    }

    /// The states a crash can leave after the journal became durable: no
    /// rename done, or some done. Reading refuses; recovering (or the next
    /// write there) rolls forward to the new pair.
    #[test]
    fn interrupted_commit_is_refused_then_rolled_forward_from_any_point() {
        for done in 0..=2 {
            let d = tempfile::tempdir().unwrap();
            let (w, q) = plant(d.path(), done);
            assert!(pending_commit(&w).unwrap().is_some());
            assert!(pending_commit(&q).unwrap().is_some());
            let r = recover(&w).unwrap();
            assert_eq!(r.completed.len(), 2, "done={done}");
            assert_eq!(fs::read(&w).unwrap(), b"new weights", "done={done}");
            assert_eq!(fs::read(&q).unwrap(), b"new map", "done={done}");
            assert!(pending_commit(&w).unwrap().is_none());
            assert_eq!(names(d.path()), ["model.safetensors", "quanto_qmap.json"]);
        }
        // the next write into the directory completes it too
        let d = tempfile::tempdir().unwrap();
        let (w, _) = plant(d.path(), 0);
        drop(AtomicFile::create(&d.path().join("other.safetensors"), false).unwrap());
        assert_eq!(fs::read(&w).unwrap(), b"new weights");
    }

    #[test]
    fn a_journal_whose_writer_runs_is_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let (w, _) = plant(d.path(), 0);
        // the writer still holds the lock of its weights file
        let held = OutputLock::acquire(&w).unwrap();
        let r = recover(&w).unwrap();
        assert!(r.completed.is_empty());
        assert_eq!(r.pending.len(), 1);
        assert_eq!(r.removed_temps, 0, "its temporaries are kept");
        assert_eq!(fs::read(&w).unwrap(), b"old weights");
        drop(held);
        assert_eq!(recover(&w).unwrap().completed.len(), 2);
    }

    #[test]
    fn hostile_journals_are_refused_before_any_rename() {
        let d = tempfile::tempdir().unwrap();
        let w = d.path().join("m.safetensors");
        fs::write(&w, b"keep").unwrap();
        fs::write(d.path().join("victim"), b"keep").unwrap();
        let t = format!(".m.safetensors{TEMP_MARKER}1.0");
        fs::write(d.path().join(&t), b"evil").unwrap();
        let bad = [
            r#"{"version":1,"renames":[["../x.ckptkit-tmp.1.0","m.safetensors"]]}"#.to_string(),
            r#"{"version":1,"renames":[["plain-name","m.safetensors"]]}"#.to_string(),
            format!(r#"{{"version":1,"renames":[["{t}","/etc/passwd"]]}}"#),
            // a destination that is not the journal's own file or a companion
            format!(r#"{{"version":1,"renames":[["{t}","victim"]]}}"#),
            // a temporary of another destination
            r#"{"version":1,"renames":[[".victim.ckptkit-tmp.1.0","m.safetensors"]]}"#.to_string(),
            r#"{"version":2,"renames":[],"removes":["victim"]}"#.to_string(),
            r#"{"version":3,"renames":[]}"#.to_string(),
            "not json".to_string(),
        ];
        for b in bad {
            fs::write(journal_path(&w), &b).unwrap();
            // read-only: a bad journal is not reported as a pending commit
            assert!(pending_commit(&w).unwrap().is_none(), "{b}");
            let e = recover(&w).unwrap_err();
            assert!(matches!(e.kind(), ErrorKind::Journal(_)), "{b}: {e}");
            assert!(e.to_string().contains("commit journal"), "{e}");
            assert_eq!(fs::read(&w).unwrap(), b"keep");
            assert_eq!(fs::read(d.path().join("victim")).unwrap(), b"keep");
        }
        let f = File::create(journal_path(&w)).unwrap();
        f.set_len(MAX_JOURNAL_LEN + 1).unwrap();
        let e = recover(&w).unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
        // a journal that is a FIFO or a symlink to a device is refused unread
        fs::remove_file(journal_path(&w)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", journal_path(&w)).unwrap();
        let e = recover(&w).unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::FileType { .. }), "{e}");
    }
}

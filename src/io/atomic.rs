//! Atomic outputs: write to a temporary file in the destination's directory,
//! fsync, rename. An error, a panic or Ctrl-C leaves no partial output;
//! leftover temporaries (after a crash) carry a recognisable name and are
//! removed by [`clean_stale_temps`].

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, ErrorKind, Result};

/// The marker in every temporary name: `.NAME.ckptkit-tmp.PID.N`.
pub const TEMP_MARKER: &str = ".ckptkit-tmp.";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Asks every running write to stop at its next tensor (used by Ctrl-C
/// handlers). The writer then fails with [`ErrorKind::Interrupted`] and
/// removes its temporary.
pub fn request_interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Fails with [`ErrorKind::Interrupted`] when an interrupt was requested.
pub fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        Err(Error::new(ErrorKind::Interrupted))
    } else {
        Ok(())
    }
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

/// A file being written atomically to `dest`.
#[derive(Debug)]
pub struct AtomicFile {
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    overwrite: bool,
}

impl AtomicFile {
    /// Creates the temporary file. Fails if `dest` exists and `overwrite`
    /// is false.
    pub fn create(dest: &Path, overwrite: bool) -> Result<AtomicFile> {
        if !overwrite && fs::symlink_metadata(dest).is_ok() {
            return Err(Error::new(ErrorKind::OutputExists(dest.to_path_buf())));
        }
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
        if !self.overwrite && fs::symlink_metadata(&self.dest).is_ok() {
            return Err(Error::new(ErrorKind::OutputExists(self.dest.clone())));
        }
        if self.overwrite {
            if let Ok(md) = fs::symlink_metadata(&self.dest) {
                if md.is_dir() {
                    fs::remove_dir_all(&self.dest)
                        .map_err(|e| Error::from(e).with_file(&self.dest))?;
                }
            }
        }
        fs::rename(&self.tmp, &self.dest).map_err(|e| Error::from(e).with_file(&self.dest))?;
        sync_dir(&parent_dir(&self.dest))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A directory being built atomically at `dest`: everything is written
/// under a temporary directory beside it, which is renamed into place on
/// commit. With `overwrite`, an existing destination is replaced whole.
#[derive(Debug)]
pub struct AtomicDir {
    dest: PathBuf,
    tmp: Option<PathBuf>,
    overwrite: bool,
}

impl AtomicDir {
    /// Creates the temporary directory.
    pub fn create(dest: &Path, overwrite: bool) -> Result<AtomicDir> {
        if !overwrite && fs::symlink_metadata(dest).is_ok() {
            return Err(Error::new(ErrorKind::OutputExists(dest.to_path_buf())));
        }
        let tmp = temp_path_for(dest);
        fs::create_dir(&tmp).map_err(|e| Error::from(e).with_file(&tmp))?;
        Ok(AtomicDir {
            dest: dest.to_path_buf(),
            tmp: Some(tmp),
            overwrite,
        })
    }

    /// The temporary directory to write into.
    pub fn path(&self) -> &Path {
        self.tmp.as_deref().unwrap_or(&self.dest)
    }

    /// Fsyncs every file, then renames into place (replacing an existing
    /// destination when allowed).
    pub fn commit(mut self) -> Result<()> {
        let tmp = self
            .tmp
            .take()
            .ok_or_else(|| Error::usage("atomic dir already committed"))?;
        sync_tree(&tmp)?;
        let old = if fs::symlink_metadata(&self.dest).is_ok() {
            if !self.overwrite {
                let _ = fs::remove_dir_all(&tmp);
                return Err(Error::new(ErrorKind::OutputExists(self.dest.clone())));
            }
            let trash = temp_path_for(&self.dest);
            fs::rename(&self.dest, &trash).map_err(|e| Error::from(e).with_file(&self.dest))?;
            Some(trash)
        } else {
            None
        };
        fs::rename(&tmp, &self.dest).map_err(|e| Error::from(e).with_file(&self.dest))?;
        sync_dir(&parent_dir(&self.dest))?;
        if let Some(trash) = old {
            if trash.is_dir() {
                let _ = fs::remove_dir_all(&trash);
            } else {
                let _ = fs::remove_file(&trash);
            }
        }
        Ok(())
    }
}

fn sync_tree(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).map_err(|e| Error::from(e).with_file(dir))? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            sync_tree(&p)?;
        } else {
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
            let _ = fs::remove_dir_all(t);
        }
    }
}

/// The suffix of a commit journal: `.NAME.ckptkit-commit` beside the
/// first file of a [`commit_together`].
pub const JOURNAL_SUFFIX: &str = ".ckptkit-commit";

/// Largest journal [`complete_pending_commits`] reads.
const MAX_JOURNAL_LEN: u64 = 1 << 20;

/// The journal path of a group whose first file is `dest`.
pub fn journal_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    dest.with_file_name(format!(".{name}{JOURNAL_SUFFIX}"))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Journal {
    version: u32,
    /// `[temporary name, destination name]`, both in the journal's directory.
    renames: Vec<(String, String)>,
}

/// Commits several files of one directory as one unit (a weights file and
/// its `quanto_qmap.json`): every temporary is flushed, then a journal
/// listing the renames is made durable, then the renames happen, then the
/// journal is removed. A crash before the journal leaves the old state
/// (plus temporaries); a crash after it leaves a journal that
/// [`complete_pending_commits`] rolls forward, so the new files appear
/// together or not at all. Readers refuse a file whose journal is pending
/// ([`pending_commit`]).
pub fn commit_together(mut files: Vec<AtomicFile>) -> Result<()> {
    if files.len() <= 1 {
        return match files.pop() {
            Some(f) => f.commit(),
            None => Ok(()),
        };
    }
    let dir = parent_dir(&files[0].dest);
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
        if !f.overwrite && fs::symlink_metadata(&f.dest).is_ok() {
            return Err(Error::new(ErrorKind::OutputExists(f.dest.clone())));
        }
        if fs::symlink_metadata(&f.dest).is_ok_and(|m| m.is_dir()) {
            return Err(Error::new(ErrorKind::OutputExists(f.dest.clone())));
        }
        let name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| Error::usage("output path has no file name"))
        };
        renames.push((name(&f.tmp)?, name(&f.dest)?));
    }
    let journal = journal_path(&files[0].dest);
    let body = serde_json::to_vec(&Journal {
        version: 1,
        renames,
    })
    .map_err(|e| Error::usage(e.to_string()))?;
    let j = AtomicFile::create(&journal, true)?;
    {
        use std::io::Write;
        let mut jf = j.file()?;
        jf.write_all(&body)
            .map_err(|e| Error::from(e).with_file(j.temp()))?;
    }
    j.commit()?;
    // from here on the journal owns the temporaries
    for f in &mut files {
        f.file = None;
    }
    complete_pending_commits(&dir).map(|_| ())
}

/// The pending commit journal that names `path` as a destination, if any.
pub fn pending_commit(path: &Path) -> Result<Option<PathBuf>> {
    let dir = parent_dir(path);
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(None);
    };
    for (jp, j) in journals(&dir)? {
        if j.renames.iter().any(|(_, d)| *d == name) {
            return Ok(Some(jp));
        }
    }
    Ok(None)
}

fn journals(dir: &Path) -> Result<Vec<(PathBuf, Journal)>> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if !(n.starts_with('.') && n.ends_with(JOURNAL_SUFFIX)) || n.contains(TEMP_MARKER) {
            continue;
        }
        let p = e.path();
        let bad = |msg: String| {
            Error::new(ErrorKind::Malformed(format!("commit journal: {msg}"))).with_file(&p)
        };
        let len = e
            .metadata()
            .map_err(|er| Error::from(er).with_file(&p))?
            .len();
        if len > MAX_JOURNAL_LEN {
            return Err(Error::new(ErrorKind::LimitExceeded {
                what: "commit journal length",
                value: len,
                limit: MAX_JOURNAL_LEN,
            })
            .with_file(&p));
        }
        let bytes = fs::read(&p).map_err(|er| Error::from(er).with_file(&p))?;
        let j: Journal = serde_json::from_slice(&bytes).map_err(|er| bad(er.to_string()))?;
        if j.version != 1 {
            return Err(bad(format!("unknown version {}", j.version)));
        }
        for (t, d) in &j.renames {
            let plain = |s: &str| {
                !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
            };
            if !plain(t) || !plain(d) || !t.contains(TEMP_MARKER) || d.contains(TEMP_MARKER) {
                return Err(bad(format!("invalid rename {t:?} -> {d:?}")));
            }
        }
        out.push((p, j));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Rolls forward every commit of `dir` that was interrupted after its
/// journal became durable: each temporary still present is renamed over
/// its destination, then the journal is removed. Returns the destinations
/// completed. Journals are validated (size cap, version, plain file names
/// that are ckptkit temporaries) before anything is renamed.
pub fn complete_pending_commits(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut done = Vec::new();
    for (jp, j) in journals(dir)? {
        for (t, d) in &j.renames {
            let (tp, dp) = (dir.join(t), dir.join(d));
            if fs::symlink_metadata(&tp).is_ok() {
                fs::rename(&tp, &dp).map_err(|e| Error::from(e).with_file(&dp))?;
            }
            done.push(dp);
        }
        sync_dir(dir)?;
        fs::remove_file(&jp).map_err(|e| Error::from(e).with_file(&jp))?;
        sync_dir(dir)?;
    }
    Ok(done)
}

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Prepares `dest`'s directory for a new write: first completes the
/// interrupted commits recorded there ([`complete_pending_commits`]), then
/// removes temporaries left beside `dest` by a crashed run (a process that
/// no longer exists). Returns how many temporaries were removed.
pub fn clean_stale_temps(dest: &Path) -> Result<usize> {
    let dir = parent_dir(dest);
    complete_pending_commits(&dir)?;
    let Some(name) = dest.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(0);
    };
    let prefix = format!(".{name}{TEMP_MARKER}");
    let mut removed = 0;
    let Ok(rd) = fs::read_dir(&dir) else {
        return Ok(0);
    };
    for e in rd.flatten() {
        let fname = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = fname.strip_prefix(&prefix) else {
            continue;
        };
        let pid: Option<u32> = rest.split('.').next().and_then(|p| p.parse().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !pid_alive(pid) {
                let p = e.path();
                let ok = if p.is_dir() {
                    fs::remove_dir_all(&p).is_ok()
                } else {
                    fs::remove_file(&p).is_ok()
                };
                removed += ok as usize;
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn dropped_file_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("x.bin");
        {
            let f = AtomicFile::create(&dest, false).unwrap();
            f.file().unwrap().write_all(b"abc").unwrap();
        }
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
        let f = AtomicFile::create(&dest, false).unwrap();
        f.file().unwrap().write_all(b"abc").unwrap();
        f.commit().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"abc");
        assert!(AtomicFile::create(&dest, false).is_err());
    }

    #[test]
    fn stale_temps_of_dead_processes_are_cleaned() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("m.ckpk");
        let stale = d.path().join(format!(".m.ckpk{TEMP_MARKER}999999999.0"));
        fs::write(&stale, b"x").unwrap();
        let live = d
            .path()
            .join(format!(".m.ckpk{TEMP_MARKER}{}.0", std::process::id()));
        fs::write(&live, b"x").unwrap();
        assert_eq!(clean_stale_temps(&dest).unwrap(), 1);
        assert!(!stale.exists());
        assert!(live.exists());
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
        commit_together(vec![
            atomic_with(&w, b"weights"),
            atomic_with(&q, b"new map"),
        ])
        .unwrap();
        assert_eq!(fs::read(&w).unwrap(), b"weights");
        assert_eq!(fs::read(&q).unwrap(), b"new map");
        let mut names: Vec<String> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["model.safetensors", "quanto_qmap.json"]);
        assert!(pending_commit(&w).unwrap().is_none());
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
            commit_together(vec![b, a]).unwrap_err().kind(),
            ErrorKind::OutputExists(_)
        ));
        assert_eq!(fs::read(&w).unwrap(), b"old");
        assert!(!q.exists(), "nothing renamed");
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "temporaries removed"
        );
    }

    /// The states a crash can leave after the journal became durable: no
    /// rename done, or some done. Rolling forward gives the new pair.
    #[test]
    fn interrupted_commit_is_rolled_forward_from_any_point() {
        for done in 0..=2 {
            let d = tempfile::tempdir().unwrap();
            let w = d.path().join("model.safetensors");
            let q = d.path().join("quanto_qmap.json");
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
            };
            fs::write(journal_path(&w), serde_json::to_vec(&j).unwrap()).unwrap();
            if done >= 1 {
                fs::rename(&tw, &w).unwrap();
            }
            if done >= 2 {
                fs::rename(&tq, &q).unwrap();
            }
            assert!(pending_commit(&w).unwrap().is_some());
            assert!(pending_commit(&q).unwrap().is_some());
            // stale-temp cleaning completes the commit first, never deletes it
            clean_stale_temps(&w).unwrap();
            assert_eq!(fs::read(&w).unwrap(), b"new weights", "done={done}");
            assert_eq!(fs::read(&q).unwrap(), b"new map", "done={done}");
            assert!(pending_commit(&w).unwrap().is_none());
            assert_eq!(fs::read_dir(d.path()).unwrap().count(), 2);
        }
    }

    #[test]
    fn hostile_journals_are_refused_before_any_rename() {
        let d = tempfile::tempdir().unwrap();
        let w = d.path().join("m.safetensors");
        let bad = [
            r#"{"version":1,"renames":[["../x.ckptkit-tmp.1.0","m.safetensors"]]}"#.to_string(),
            r#"{"version":1,"renames":[["plain-name","m.safetensors"]]}"#.to_string(),
            r#"{"version":1,"renames":[[".m.ckptkit-tmp.1.0","/etc/passwd"]]}"#.to_string(),
            r#"{"version":2,"renames":[]}"#.to_string(),
            "not json".to_string(),
        ];
        for b in bad {
            fs::write(journal_path(&w), &b).unwrap();
            let e = complete_pending_commits(d.path()).unwrap_err();
            assert!(matches!(e.kind(), ErrorKind::Malformed(_)), "{b}: {e}");
            assert!(e.to_string().contains("commit journal"), "{e}");
        }
        let f = File::create(journal_path(&w)).unwrap();
        f.set_len(MAX_JOURNAL_LEN + 1).unwrap();
        let e = complete_pending_commits(d.path()).unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    }
}

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

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes temporaries left beside `dest` by a crashed run (a process that
/// no longer exists). Returns how many were removed.
pub fn clean_stale_temps(dest: &Path) -> usize {
    let dir = parent_dir(dest);
    let Some(name) = dest.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return 0;
    };
    let prefix = format!(".{name}{TEMP_MARKER}");
    let mut removed = 0;
    let Ok(rd) = fs::read_dir(&dir) else { return 0 };
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
    removed
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
        assert_eq!(clean_stale_temps(&dest), 1);
        assert!(!stale.exists());
        assert!(live.exists());
    }
}

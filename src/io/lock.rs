//! Output locks: which process owns an output while it is being written.
//!
//! Every output (file or directory) and every companion file committed with
//! it (`quanto_qmap.json`) is owned, from its first temporary until its
//! commit journal is removed, by the process that holds an exclusive
//! `flock` on `.NAME.ckptkit-lock` beside it. The kernel releases the lock
//! when that process ends, however it ends, so "the writer is gone" is
//! exactly "the lock can be taken": no process ids (they are reused, and
//! processes of other containers sharing a volume look dead).
//!
//! Locks are only ever tried, never waited for: a second writer of the same
//! output or companion is refused with [`ErrorKind::Busy`]. The lock file
//! is removed by its holder before the lock is released; a process that
//! locked a file that was removed meanwhile notices (the path no longer
//! names the inode it locked) and tries again.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};

/// The suffix of lock files: `.NAME.ckptkit-lock`.
pub const LOCK_SUFFIX: &str = ".ckptkit-lock";

/// An exclusive lock on one output name, released (and its file removed)
/// when dropped.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    file: File,
}

/// The lock file of `dest`: `.NAME.ckptkit-lock` in the same directory.
pub fn lock_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    dest.with_file_name(format!(".{name}{LOCK_SUFFIX}"))
}

impl OutputLock {
    /// Takes the lock of `dest`, or `None` when another process holds it.
    pub fn try_acquire(dest: &Path) -> Result<Option<OutputLock>> {
        let path = lock_path(dest);
        // a racing holder may remove the file between our open and our
        // flock; a few rounds always suffice unless processes keep racing
        for _ in 0..64 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open(&path)
                .map_err(|e| Error::from(e).with_file(&path))?;
            // SAFETY: flock on a descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Ok(None);
                }
                return Err(Error::from(e).with_file(&path));
            }
            let mine = file
                .metadata()
                .map_err(|e| Error::from(e).with_file(&path))?;
            match std::fs::symlink_metadata(&path) {
                Ok(now) if now.ino() == mine.ino() && now.dev() == mine.dev() => {
                    return Ok(Some(OutputLock { path, file }));
                }
                _ => continue, // removed or replaced by its previous holder
            }
        }
        Err(Error::new(ErrorKind::Busy { lock: path.clone() }).with_file(path))
    }

    /// Takes the lock of `dest`, failing with [`ErrorKind::Busy`] when
    /// another process holds it.
    pub fn acquire(dest: &Path) -> Result<OutputLock> {
        match Self::try_acquire(dest)? {
            Some(l) => Ok(l),
            None => {
                let lock = lock_path(dest);
                Err(Error::new(ErrorKind::Busy { lock }).with_file(dest))
            }
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // remove the file while still holding the lock, but only if it is
        // still ours (it always is: nobody else removes a held lock file)
        if let (Ok(now), Ok(mine)) = (std::fs::symlink_metadata(&self.path), self.file.metadata()) {
            if now.ino() == mine.ino() && now.dev() == mine.dev() {
                let _ = std::fs::remove_file(&self.path);
            }
        }
        // closing the descriptor releases the flock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_refuses_a_second_holder_and_is_removed_when_dropped() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("m.safetensors");
        let a = OutputLock::acquire(&dest).unwrap();
        assert!(a.path().exists());
        // flock locks belong to the open file description: a second open in
        // this process conflicts exactly like another process would
        assert!(OutputLock::try_acquire(&dest).unwrap().is_none());
        let e = OutputLock::acquire(&dest).unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::Busy { .. }), "{e}");
        drop(a);
        assert!(!lock_path(&dest).exists());
        let b = OutputLock::acquire(&dest).unwrap();
        drop(b);
    }

    #[test]
    fn a_symlink_planted_as_lock_file_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("m.safetensors");
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, lock_path(&dest)).unwrap();
        assert!(OutputLock::acquire(&dest).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }
}

//! Opening files that ckptkit did not write: every input, side file and
//! journal is hostile until checked.
//!
//! Rules (spec/container.md §11):
//! - only regular files are read (and directories of them); the type is
//!   judged after following symlinks (Hugging Face caches are symlinks
//!   into `blobs/`), so a symlink to `/dev/zero` or a FIFO is refused;
//! - files are opened non-blocking, so a FIFO that appears between the
//!   check and the open cannot hang the process, and the type is checked
//!   again on the opened descriptor;
//! - side files are read up to their cap plus one byte, never by the size
//!   the file system reports (which is 0 for devices).

use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};

/// What kind of file system object `md` describes, in words.
pub fn type_name(md: &Metadata) -> &'static str {
    let t = md.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

fn wrong_type(path: &Path, md: &Metadata, expected: &'static str) -> Error {
    Error::new(ErrorKind::FileType {
        found: type_name(md),
        expected,
    })
    .with_file(path)
}

/// The metadata of `path` after following symlinks, with the path in the
/// error.
pub fn stat(path: &Path) -> Result<Metadata> {
    std::fs::metadata(path).map_err(|e| Error::from(e).with_file(path))
}

/// Opens a regular file for reading: refuses anything else (FIFOs, devices,
/// sockets, directories) without blocking, judged after following symlinks
/// and checked again on the opened descriptor.
pub fn open_regular(path: &Path) -> Result<File> {
    let md = stat(path)?;
    if !md.is_file() {
        return Err(wrong_type(path, &md, "a regular file"));
    }
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::from(e).with_file(path))?;
    let md = f.metadata().map_err(|e| Error::from(e).with_file(path))?;
    if !md.is_file() {
        return Err(wrong_type(path, &md, "a regular file"));
    }
    Ok(f)
}

/// True when `path` names a regular file (after following symlinks);
/// false when it does not exist. Anything else there (a FIFO, a device, a
/// directory) is an error: a side file that exists must be readable.
pub fn regular_file_exists(path: &Path) -> Result<bool> {
    match std::fs::metadata(path) {
        Ok(md) if md.is_file() => Ok(true),
        Ok(md) => Err(wrong_type(path, &md, "a regular file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // a dangling symlink is an error too: it names something
            if std::fs::symlink_metadata(path).is_ok() {
                return Err(Error::from(e).with_file(path));
            }
            Ok(false)
        }
        Err(e) => Err(Error::from(e).with_file(path)),
    }
}

/// Reads a whole side file of at most `cap` bytes (a qmap, a config, an
/// index, a descriptor, a journal): a regular file, read up to `cap + 1`
/// bytes so that neither a device nor a file that grows can make it read
/// more. `what` names the limit in the error.
pub fn read_capped(path: &Path, cap: u64, what: &'static str) -> Result<Vec<u8>> {
    let f = open_regular(path)?;
    let mut buf = Vec::new();
    f.take(cap.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| Error::from(e).with_file(path))?;
    if buf.len() as u64 > cap {
        return Err(Error::new(ErrorKind::LimitExceeded {
            what,
            value: buf.len() as u64,
            limit: cap,
        })
        .with_file(path));
    }
    Ok(buf)
}

/// Largest side file (a quanto map, a `config.json`, a descriptor)
/// accepted.
pub const MAX_SIDE_FILE: u64 = 64 << 20;

/// Reads a small JSON side file: a regular file (after following
/// symlinks), at most [`MAX_SIDE_FILE`] bytes, read up to the cap and no
/// further whatever the file system claims.
pub fn read_side_file(path: &Path) -> Result<String> {
    read_capped_text(path, MAX_SIDE_FILE, "side file size")
}

/// The `config.json` beside an input (in the directory of a file input, or
/// in a directory input), read under the side-file cap: its path and text,
/// or `None` when there is none.
pub fn config_beside(input: &Path) -> Result<Option<(std::path::PathBuf, String)>> {
    let dir = if input.is_dir() {
        input.to_path_buf()
    } else {
        input.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let p = dir.join("config.json");
    if !regular_file_exists(&p)? {
        return Ok(None);
    }
    let text = read_side_file(&p)?;
    Ok(Some((p, text)))
}

/// [`read_capped`] as UTF-8 text.
pub fn read_capped_text(path: &Path, cap: u64, what: &'static str) -> Result<String> {
    String::from_utf8(read_capped(path, cap, what)?).map_err(|e| {
        Error::new(ErrorKind::Json(format!(
            "not UTF-8 text (invalid byte at {})",
            e.utf8_error().valid_up_to()
        )))
        .with_file(path)
        .with_offset(e.utf8_error().valid_up_to() as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_fifos_and_dirs_are_refused_as_files() {
        let e = open_regular(Path::new("/dev/zero")).unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::FileType { found, .. } if found.contains("character")),
            "{e}"
        );
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("p");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // would block forever if opened for reading without O_NONBLOCK
        let e = read_capped(&fifo, 10, "x").unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        let e = open_regular(d.path()).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        // a symlink to a device is judged by what it points to
        let link = d.path().join("l");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(read_capped(&link, 10, "x").is_err());
        assert!(regular_file_exists(&link).is_err());
        assert!(!regular_file_exists(&d.path().join("none")).unwrap());
    }

    #[test]
    fn reads_stop_at_the_cap() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        assert_eq!(read_capped(&p, 10, "x").unwrap().len(), 10);
        let e = read_capped(&p, 9, "side file size").unwrap_err();
        assert!(
            matches!(
                e.kind(),
                ErrorKind::LimitExceeded {
                    value: 10,
                    limit: 9,
                    ..
                }
            ),
            "{e}"
        );
        // a symlink to a regular file is followed (Hugging Face caches)
        let link = d.path().join("l");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(read_capped(&link, 10, "x").unwrap(), b"0123456789");
    }
}

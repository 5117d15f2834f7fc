//! Sources and sinks: safetensors files, Hugging Face sharded directories,
//! containers; memory-mapped windows; atomic commits.

pub mod atomic;
pub(crate) mod backing;
pub mod container;
pub mod files;
pub(crate) mod gguf_file;
pub(crate) mod gguf_writer;
pub mod lock;
pub mod open;
pub mod paths;
pub mod pool;
#[cfg(feature = "remote")]
pub mod remote;
pub mod safetensors_file;
pub mod sharded;
pub mod source;
pub mod writer;

use std::fs::File;
use std::ops::Deref;
use std::os::unix::fs::FileExt;
use std::path::Path;

use memmap2::{Mmap, MmapOptions};

use crate::error::{Error, ErrorKind, Result};

/// Receives one tensor's bytes, in order, piece by piece.
pub type PieceSink<'a> = dyn FnMut(&[u8]) -> Result<()> + 'a;

/// Hands one tensor's bytes, in order and in pieces, to the sink it is
/// given (streamed writes: [`writer::SafetensorsWriter::write_from`],
/// [`writer::ContainerWriter::write_from`]).
pub type Feed<'a> = dyn FnMut(&mut PieceSink<'_>) -> Result<()> + 'a;

/// The bytes of one tensor: a read-only window mapped from the file
/// (zero-copy, released when dropped) or an owned buffer (decompressed
/// data).
#[derive(Debug)]
pub enum TensorBytes {
    /// A memory-mapped window of exactly the tensor's bytes.
    Mapped(Mmap),
    /// Owned bytes.
    Owned(Vec<u8>),
    /// Owned bytes whose allocation goes back to the buffer pool when
    /// dropped (`pool`).
    Pooled(pool::Pooled),
}

impl Deref for TensorBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            TensorBytes::Mapped(m) => m,
            TensorBytes::Owned(v) => v,
            TensorBytes::Pooled(p) => p,
        }
    }
}

impl TensorBytes {
    /// Converts into an owned vector (copies a mapped window).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            TensorBytes::Mapped(m) => m.to_vec(),
            TensorBytes::Owned(v) => v,
            TensorBytes::Pooled(p) => p.into_vec(),
        }
    }
}

/// Maps `len` bytes at `offset` of `file` (which the caller has checked lie
/// inside the file). Empty ranges give an empty owned buffer, and ranges
/// under 64 KiB an owned copy (cheaper than a mapping).
pub fn map_window(file: &File, path: &Path, offset: u64, len: u64) -> Result<TensorBytes> {
    if len == 0 {
        return Ok(TensorBytes::Owned(Vec::new()));
    }
    let l = usize::try_from(len).map_err(|_| Error::overflow("window length"))?;
    if len < SMALL_READ {
        // mapping and unmapping a window costs more than copying a small
        // tensor (the unmap's TLB shootdown dominated conversions of
        // checkpoints with 10^5 small tensors: BENCHMARKS.md)
        let mut b = vec![0u8; l];
        read_at(file, path, offset, &mut b)?;
        return Ok(TensorBytes::Owned(b));
    }
    // SAFETY: the map is read-only. Like every mmap-based reader, we rely on
    // the file not being truncated or modified while mapped; ckptkit never
    // modifies inputs and writes outputs through new files and renames.
    let m = unsafe {
        MmapOptions::new()
            .offset(offset)
            .len(l)
            .populate()
            .map(file)
    }
    .map_err(|e| Error::from(e).with_file(path).with_offset(offset))?;
    Ok(TensorBytes::Mapped(m))
}

/// Hands the `len` bytes at `offset` of `file` to `f` in order, one mapped
/// window of at most [`source::PIECE`] bytes at a time (released as it goes),
/// so memory stays bounded whatever the length; errors name `key`.
pub(crate) fn read_windows(
    file: &File,
    path: &Path,
    offset: u64,
    len: u64,
    key: &str,
    f: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(source::PIECE as u64);
        let w = map_window(file, path, offset + done, n).map_err(|e| e.with_tensor(key))?;
        f(&w)?;
        done += n;
    }
    Ok(())
}

/// Windows shorter than this are read, not mapped.
const SMALL_READ: u64 = 64 << 10;

/// Reads exactly `buf.len()` bytes at `offset`, reporting truncation with
/// its position.
pub fn read_at(file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::new(ErrorKind::Truncated {
                what: "data",
                needed: offset.saturating_add(buf.len() as u64),
                available: file.metadata().map(|m| m.len()).unwrap_or(0),
            })
            .with_file(path)
            .with_offset(offset)
        } else {
            Error::from(e).with_file(path).with_offset(offset)
        }
    })
}

/// Size of hashing windows for whole-file passes.
pub(crate) const WINDOW: u64 = 64 << 20;

/// blake3 of a whole regular file (the hash `migrate convert` prints for a
/// single-file output), in bounded memory.
pub fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let f = files::open_regular(path)?;
    let len = f
        .metadata()
        .map_err(|e| Error::from(e).with_file(path))?
        .len();
    hash_range(&f, path, 0, len)
}

/// blake3 of `len` bytes at `offset`, read through successive mapped
/// windows so that resident memory stays bounded.
pub fn hash_range(file: &File, path: &Path, offset: u64, len: u64) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(WINDOW);
        let w = map_window(file, path, offset + done, n)?;
        #[cfg(unix)]
        if let TensorBytes::Mapped(m) = &w {
            let _ = m.advise(memmap2::Advice::Sequential);
        }
        if n >= 1 << 20 {
            h.update_rayon(&w);
        } else {
            h.update(&w);
        }
        done += n;
    }
    Ok(h.finalize())
}

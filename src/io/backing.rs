//! Where an input file's bytes are: a local file (mapped windows) or, with
//! the `remote` feature, a remote object (ranged reads). Every reader of a
//! file format (safetensors, container, GGUF) reads through this, so each
//! validation rule applies to a remote object unchanged.

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};
use crate::io::TensorBytes;

/// A readable file's bytes.
#[derive(Debug)]
pub(crate) enum Backing {
    /// A local regular file.
    Local(File),
    /// A remote object, read by range.
    #[cfg(feature = "remote")]
    Remote(crate::io::remote::Object),
}

impl Backing {
    /// Opens a local regular file (refusing FIFOs, devices and sockets);
    /// gives it with its length.
    pub(crate) fn open_local(path: &Path) -> Result<(Backing, u64)> {
        let file = crate::io::files::open_regular(path)?;
        let len = file
            .metadata()
            .map_err(|e| Error::from(e).with_file(path))?
            .len();
        Ok((Backing::Local(file), len))
    }

    /// How many bytes a header parser should ask for first: a megabyte of a
    /// local file costs nothing, a remote object's first read is the
    /// read-ahead fetched when it was opened.
    pub(crate) fn first_read(&self) -> u64 {
        match self {
            Backing::Local(_) => 1 << 20,
            #[cfg(feature = "remote")]
            Backing::Remote(o) => o.read_ahead(),
        }
    }

    /// The ETag of a remote object; `None` for a local file.
    #[cfg(all(feature = "remote", feature = "cli"))]
    pub(crate) fn etag(&self) -> Option<&str> {
        match self {
            Backing::Local(_) => None,
            #[cfg(feature = "remote")]
            Backing::Remote(o) => o.etag(),
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub(crate) fn read_at(&self, path: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Backing::Local(f) => crate::io::read_at(f, path, offset, buf),
            #[cfg(feature = "remote")]
            Backing::Remote(o) => o.read_at(offset, buf),
        }
    }

    /// The `len` bytes at `offset`: a mapped window of a local file, owned
    /// bytes of a remote one.
    pub(crate) fn window(&self, path: &Path, offset: u64, len: u64) -> Result<TensorBytes> {
        match self {
            Backing::Local(f) => crate::io::map_window(f, path, offset, len),
            #[cfg(feature = "remote")]
            Backing::Remote(o) => o.range(offset, len).map(TensorBytes::Owned),
        }
    }

    /// Hands the `len` bytes at `offset` to `f` in order, in bounded pieces
    /// (errors name the tensor `key`).
    pub(crate) fn windows(
        &self,
        path: &Path,
        offset: u64,
        len: u64,
        key: &str,
        f: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        match self {
            Backing::Local(file) => crate::io::read_windows(file, path, offset, len, key, f),
            #[cfg(feature = "remote")]
            Backing::Remote(o) => o.pieces(offset, len, f).map_err(|e| e.with_tensor(key)),
        }
    }

    /// blake3 of the `len` bytes at `offset`, read in bounded pieces.
    pub(crate) fn hash_range(&self, path: &Path, offset: u64, len: u64) -> Result<blake3::Hash> {
        match self {
            Backing::Local(f) => crate::io::hash_range(f, path, offset, len),
            #[cfg(feature = "remote")]
            Backing::Remote(o) => {
                let mut h = blake3::Hasher::new();
                o.pieces(offset, len, &mut |b| {
                    h.update_rayon(b);
                    Ok(())
                })?;
                Ok(h.finalize())
            }
        }
    }
}

//! A single safetensors file as a tensor source.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::format::manifest::Hash;
use crate::format::st_hashes;
use crate::format::st_header::{self, StHeader};
use crate::io::backing::Backing;
use crate::io::source::{SourceTensor, TensorSource};
use crate::io::TensorBytes;

/// An open, validated safetensors file. Tensor bytes are mapped on demand,
/// one window per tensor, and released when dropped (or, for a remote
/// object, fetched by range).
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: Backing,
    /// The file's length in bytes.
    len: u64,
    header: StHeader,
    tensors: Vec<SourceTensor>,
    /// The `ckptkit.blake3` entry, parsed (or why it cannot be).
    recorded: crate::io::source::RecordedHashes,
    /// Key → index into `header.tensors` (and `tensors`: same order).
    index: HashMap<String, usize>,
}

impl SafetensorsFile {
    /// Opens and validates the header (every rule of
    /// `st_header::parse`, with the file's length).
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        if let Some(journal) = crate::io::atomic::pending_commit(path)? {
            return Err(Error::new(ErrorKind::PendingCommit { journal }).with_file(path));
        }
        let (file, len) = Backing::open_local(path)?;
        Self::from_backing(path, file, len)
    }

    /// Opens a remote object (validated as [`open`](Self::open) validates a
    /// file); its path is its URL.
    #[cfg(feature = "remote")]
    pub(crate) fn open_remote(obj: crate::io::remote::Object) -> Result<SafetensorsFile> {
        let len = obj.size();
        let path = PathBuf::from(obj.url());
        Self::from_backing(&path, Backing::Remote(obj), len)
    }

    fn from_backing(path: &Path, file: Backing, len: u64) -> Result<SafetensorsFile> {
        let mut first = [0u8; 8];
        if len < 8 {
            return Err(Error::new(crate::error::ErrorKind::Truncated {
                what: "safetensors header length",
                needed: 8,
                available: len,
            })
            .with_file(path));
        }
        file.read_at(path, 0, &mut first)?;
        let hl = st_header::header_len(&first, len).map_err(|e| e.with_file(path))?;
        let mut buf = vec![0u8; hl as usize];
        file.read_at(path, 0, &mut buf)?;
        let header = st_header::parse(&buf, Some(len)).map_err(|e| e.with_file(path))?;
        let index = crate::io::source::key_index(header.tensors.iter().map(|t| t.key.as_str()));
        let tensors = header
            .tensors
            .iter()
            .map(|t| SourceTensor {
                key: t.key.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                len: t.len(),
                file: 0,
            })
            .collect();
        let recorded = header.metadata.get(st_hashes::HASHES_KEY).map(|v| {
            st_hashes::parse(v, header.tensors.iter().map(|t| t.key.as_str()))
                .map(|m| m.into_iter().collect())
                .map_err(|e| e.kind().to_string())
        });
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            file,
            len,
            header,
            tensors,
            recorded,
            index,
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &StHeader {
        &self.header
    }

    /// The file's length in bytes.
    pub fn byte_len(&self) -> u64 {
        self.len
    }

    /// blake3 of the 8-byte length and the header, as stored (what a plan
    /// pins).
    #[cfg(all(feature = "remote", feature = "cli"))]
    pub(crate) fn header_blake3(&self) -> Result<String> {
        self.file
            .hash_range(&self.path, 0, self.header.header_len)
            .map(|h| h.to_hex().to_string())
    }

    /// The ETag of a remote object (every read of it is conditional on
    /// it); `None` for a local file.
    #[cfg(all(feature = "remote", feature = "cli"))]
    pub(crate) fn etag(&self) -> Option<&str> {
        self.file.etag()
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// blake3 of one tensor's bytes, read in bounded windows.
    pub fn hash_tensor(&self, key: &str) -> Result<blake3::Hash> {
        let t = self.find(key)?;
        self.file
            .hash_range(&self.path, self.header.header_len + t.start, t.len())
    }

    /// Checks the tensors against the blake3 hashes ckptkit records in
    /// `__metadata__` (`st_hashes::HASHES_KEY`), in parallel. The header
    /// was validated by [`open`](Self::open); a file without recorded
    /// hashes reports zero tensors checked. The first mismatch is an
    /// [`ErrorKind::HashMismatch`] naming the file, the tensor and the
    /// offset of its data.
    pub fn verify(&self) -> Result<crate::VerifyReport> {
        use rayon::prelude::*;
        let Some(value) = self.header.metadata.get(st_hashes::HASHES_KEY) else {
            return Ok(crate::VerifyReport {
                tensors: 0,
                bytes: 0,
                unchecked: self.tensors.len() as u64,
            });
        };
        let recorded = st_hashes::parse(value, self.header.tensors.iter().map(|t| t.key.as_str()))
            .map_err(|e| e.with_file(&self.path))?;
        let list: Vec<(&String, &[u8; 32])> = recorded.iter().collect();
        let bytes = list.par_iter().try_fold(
            || 0u64,
            |acc, (key, want)| -> Result<u64> {
                let t = self.find(key)?;
                let got = self.hash_tensor(key)?;
                if got.as_bytes() != *want {
                    return Err(Error::new(ErrorKind::HashMismatch {
                        what: format!("tensor `{key}`"),
                        expected: st_hashes::to_hex(want),
                        actual: got.to_hex().to_string(),
                    })
                    .with_file(&self.path)
                    .with_tensor(key.as_str())
                    .with_offset(self.header.header_len + t.start));
                }
                Ok(acc + t.len())
            },
        );
        let bytes = bytes.try_reduce(|| 0, |a, b| Ok(a + b))?;
        Ok(crate::VerifyReport {
            tensors: list.len() as u64,
            bytes,
            unchecked: (self.tensors.len() - list.len()) as u64,
        })
    }

    fn find(&self, key: &str) -> Result<&st_header::HeaderTensor> {
        crate::format::lookups::add(1);
        let i = self.index.get(key).copied();
        i.and_then(|i| self.header.tensors.get(i)).ok_or_else(|| {
            Error::new(crate::error::ErrorKind::NotFound(format!("tensor `{key}`")))
                .with_file(&self.path)
        })
    }
}

impl TensorSource for SafetensorsFile {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }
    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.header.metadata
    }
    fn files(&self) -> Vec<String> {
        vec![self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()]
    }
    fn get(&self, key: &str) -> Option<&SourceTensor> {
        crate::format::lookups::add(1);
        self.index.get(key).and_then(|&i| self.tensors.get(i))
    }
    fn read(&self, key: &str) -> Result<TensorBytes> {
        let t = self.find(key)?;
        self.file
            .window(&self.path, self.header.header_len + t.start, t.len())
            .map_err(|e| e.with_tensor(key))
    }
    fn read_pieces(&self, key: &str, f: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let t = self.find(key)?;
        self.file.windows(
            &self.path,
            self.header.header_len + t.start,
            t.len(),
            key,
            f,
        )
    }
    fn recorded_hash(&self, key: &str) -> Result<Option<Hash>> {
        crate::io::source::recorded_in(&self.recorded, key, &self.path)
    }
    fn location(&self, key: &str) -> crate::error::Location {
        crate::error::Location {
            file: Some(self.path.clone()),
            tensor: Some(key.to_string()),
            offset: self
                .header
                .get(key)
                .map(|t| self.header.header_len + t.start),
            ..Default::default()
        }
    }
}

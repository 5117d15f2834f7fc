//! A single safetensors file as a tensor source.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::st_header::{self, StHeader};
use crate::io::source::{SourceTensor, TensorSource};
use crate::io::{map_window, read_at, TensorBytes};

/// An open, validated safetensors file. Tensor bytes are mapped on demand,
/// one window per tensor, and released when dropped.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    header: StHeader,
    tensors: Vec<SourceTensor>,
}

impl SafetensorsFile {
    /// Opens and validates the header (every rule of
    /// [`st_header::parse`], with the file's length).
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = File::open(path).map_err(|e| Error::from(e).with_file(path))?;
        let len = file
            .metadata()
            .map_err(|e| Error::from(e).with_file(path))?
            .len();
        let mut first = [0u8; 8];
        if len < 8 {
            return Err(Error::new(crate::error::ErrorKind::Truncated {
                what: "safetensors header length",
                needed: 8,
                available: len,
            })
            .with_file(path));
        }
        read_at(&file, path, 0, &mut first)?;
        let hl = st_header::header_len(&first, len).map_err(|e| e.with_file(path))?;
        let mut buf = vec![0u8; hl as usize];
        read_at(&file, path, 0, &mut buf)?;
        let header = st_header::parse(&buf, Some(len)).map_err(|e| e.with_file(path))?;
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
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            file,
            header,
            tensors,
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &StHeader {
        &self.header
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// blake3 of one tensor's bytes, read in bounded windows.
    pub fn hash_tensor(&self, key: &str) -> Result<blake3::Hash> {
        let t = self.find(key)?;
        crate::io::hash_range(
            &self.file,
            &self.path,
            self.header.header_len + t.start,
            t.len(),
        )
    }

    fn find(&self, key: &str) -> Result<&st_header::HeaderTensor> {
        self.header.get(key).ok_or_else(|| {
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
    fn read(&self, key: &str) -> Result<TensorBytes> {
        let t = self.find(key)?;
        map_window(
            &self.file,
            &self.path,
            self.header.header_len + t.start,
            t.len(),
        )
        .map_err(|e| e.with_tensor(key))
    }
}

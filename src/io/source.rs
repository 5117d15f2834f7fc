//! The tensor-source abstraction: every input (safetensors file, sharded
//! directory, container) lists its stored tensors without reading them and
//! hands out one tensor's bytes on demand.

use std::collections::BTreeMap;
use std::path::Path;

use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::io::TensorBytes;

/// One stored tensor of a source (its bytes are not read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTensor {
    /// Key.
    pub key: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    /// Byte length.
    pub len: u64,
    /// Index of the file (or shard) that holds it.
    pub file: usize,
}

/// Anything that holds stored tensors.
pub trait TensorSource: Send + Sync {
    /// A short description (the path) for messages.
    fn describe(&self) -> String;
    /// Every stored tensor, in a stable order (file, then data order).
    fn tensors(&self) -> &[SourceTensor];
    /// The `__metadata__` of the source (merged over files; for a container,
    /// its user metadata).
    fn metadata(&self) -> &BTreeMap<String, String>;
    /// The names of the files (or shards) that hold the tensors.
    fn files(&self) -> Vec<String>;
    /// The `__metadata__` of one file (or shard) of the source.
    fn file_metadata(&self, file: usize) -> BTreeMap<String, String> {
        let _ = file;
        self.metadata().clone()
    }
    /// Reads one tensor's bytes.
    fn read(&self, key: &str) -> Result<TensorBytes>;
    /// Finds a tensor by key.
    fn get(&self, key: &str) -> Option<&SourceTensor> {
        self.tensors().iter().find(|t| t.key == key)
    }
}

/// What kind of input a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// A single `.safetensors` file.
    Safetensors,
    /// A Hugging Face sharded directory (or a directory with one weight
    /// file).
    ShardedDir,
    /// A `.ckpk` container.
    Container,
}

/// Decides the kind of an input path: directories are sharded checkpoints,
/// files starting with the container magic are containers, anything else is
/// read as safetensors.
pub fn input_kind(path: &Path) -> Result<InputKind> {
    let md = crate::io::files::stat(path)?;
    if md.is_dir() {
        return Ok(InputKind::ShardedDir);
    }
    // refuses FIFOs, devices and sockets without blocking on them
    let f = crate::io::files::open_regular(path)?;
    let mut magic = [0u8; 8];
    use std::os::unix::fs::FileExt;
    let is_ckpk =
        md.len() >= 8 && f.read_exact_at(&mut magic, 0).is_ok() && magic == crate::format::MAGIC;
    Ok(if is_ckpk {
        InputKind::Container
    } else {
        InputKind::Safetensors
    })
}

/// Opens any supported input as a tensor source.
pub fn open_source(path: &Path) -> Result<Box<dyn TensorSource>> {
    Ok(match input_kind(path)? {
        InputKind::Safetensors => {
            Box::new(crate::io::safetensors_file::SafetensorsFile::open(path)?)
        }
        InputKind::ShardedDir => Box::new(crate::io::sharded::ShardedDir::open(path)?),
        InputKind::Container => Box::new(crate::io::container::Container::open(path)?),
    })
}

/// Fails when two files of a source hold the same key.
pub(crate) fn check_unique(tensors: &[SourceTensor], what: &str) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for t in tensors {
        if !seen.insert(t.key.as_str()) {
            return Err(Error::new(ErrorKind::Safetensors(format!(
                "tensor `{}` appears in more than one file of {what}",
                t.key
            ))));
        }
    }
    Ok(())
}

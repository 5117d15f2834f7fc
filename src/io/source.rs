//! The tensor-source abstraction: every input (safetensors file, sharded
//! directory, container) lists its stored tensors without reading them and
//! hands out one tensor's bytes on demand.

use std::collections::BTreeMap;
use std::path::Path;

use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Result};
use crate::io::TensorBytes;

/// A process-wide count of the entries that name lookups examine on the
/// per-tensor and per-layer paths (a scan adds the entries it looked at, an
/// indexed lookup adds 1). Tests read it to check that the work per tensor
/// does not grow with the tensor count; one relaxed atomic add per lookup.
#[doc(hidden)]
pub mod lookups {
    use std::sync::atomic::{AtomicU64, Ordering};

    static EXAMINED: AtomicU64 = AtomicU64::new(0);

    /// Records `n` examined entries.
    #[inline]
    pub fn add(n: usize) {
        EXAMINED.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Entries examined so far by this process.
    pub fn count() -> u64 {
        EXAMINED.load(Ordering::Relaxed)
    }

    /// Finds the first element of `items` that `hit` accepts, counting the
    /// elements examined.
    #[inline]
    pub fn find<T>(
        items: impl IntoIterator<Item = T>,
        mut hit: impl FnMut(&T) -> bool,
    ) -> Option<T> {
        let mut n = 0;
        let r = items.into_iter().find(|x| {
            n += 1;
            hit(x)
        });
        add(n);
        r
    }
}

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
    /// Finds a tensor by key. The default scans [`tensors`](Self::tensors);
    /// the sources of this crate answer from an index built when they are
    /// opened.
    fn get(&self, key: &str) -> Option<&SourceTensor> {
        lookups::find(self.tensors(), |t| t.key == key)
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
    let md = std::fs::metadata(path).map_err(|e| Error::from(e).with_file(path))?;
    if md.is_dir() {
        return Ok(InputKind::ShardedDir);
    }
    let mut magic = [0u8; 8];
    let f = std::fs::File::open(path).map_err(|e| Error::from(e).with_file(path))?;
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
    match first_duplicate(tensors) {
        Some(key) => Err(duplicate_key(key, what)),
        None => Ok(()),
    }
}

/// The first key (in the order of `tensors`) that an earlier tensor
/// already has.
pub(crate) fn first_duplicate(tensors: &[SourceTensor]) -> Option<&str> {
    let mut seen = std::collections::HashSet::with_capacity(tensors.len());
    for t in tensors {
        lookups::add(1);
        if !seen.insert(t.key.as_str()) {
            return Some(&t.key);
        }
    }
    None
}

/// The error for a key that two files of a source hold.
pub(crate) fn duplicate_key(key: &str, what: &str) -> Error {
    Error::new(ErrorKind::Malformed(format!(
        "tensor `{key}` appears in more than one file of {what}"
    )))
}

/// Key → position in `tensors`, the first one for a repeated key (what a
/// scan from the front finds).
pub(crate) fn key_index<'a>(
    keys: impl ExactSizeIterator<Item = &'a str>,
) -> std::collections::HashMap<String, usize> {
    let mut m = std::collections::HashMap::with_capacity(keys.len());
    for (i, k) in keys.enumerate() {
        m.entry(k.to_string()).or_insert(i);
    }
    m
}

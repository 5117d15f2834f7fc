//! Opening any input: what kind it is, and its tensor source.

use std::path::Path;

use crate::error::Result;
use crate::io::source::TensorSource;

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
    /// A GGUF file (it starts with `GGUF`).
    Gguf,
}

/// Decides the kind of an input path: directories are sharded checkpoints,
/// files starting with the container magic are containers, files starting
/// with `GGUF` are GGUF, anything else is read as safetensors.
pub fn input_kind(path: &Path) -> Result<InputKind> {
    #[cfg(feature = "remote")]
    if let Some(k) = crate::io::remote::mounted_kind(path) {
        return Ok(k);
    }
    let md = crate::io::files::stat(path)?;
    if md.is_dir() {
        return Ok(InputKind::ShardedDir);
    }
    // refuses FIFOs, devices and sockets without blocking on them
    let f = crate::io::files::open_regular(path)?;
    let mut first = [0u8; 8];
    let n = md.len().min(8) as usize;
    use std::os::unix::fs::FileExt;
    // a file that cannot be read here is read (and refused) as safetensors
    let n = if f.read_exact_at(&mut first[..n], 0).is_ok() {
        n
    } else {
        0
    };
    Ok(file_kind(&first[..n]))
}

/// The kind of a file (local or remote) by its first bytes (up to 8): the
/// container magic, `GGUF`, else safetensors.
pub(crate) fn file_kind(first: &[u8]) -> InputKind {
    if first.len() >= 8 && first[..8] == crate::format::MAGIC {
        InputKind::Container
    } else if first.len() >= 4 && first[..4] == crate::format::gguf::read::MAGIC {
        InputKind::Gguf
    } else {
        InputKind::Safetensors
    }
}

/// The URL and size a mounted remote input is recorded by in provenance
/// (feature `remote`); `None` for a local path.
pub(crate) fn remote_origin(path: &Path) -> Option<(String, u64)> {
    #[cfg(feature = "remote")]
    return crate::io::remote::mounted_url(path);
    #[cfg(not(feature = "remote"))]
    {
        let _ = path;
        None
    }
}

/// Opens any supported input as a tensor source.
pub fn open_source(path: &Path) -> Result<Box<dyn TensorSource>> {
    #[cfg(feature = "remote")]
    if let Some(m) = crate::io::remote::mounted(path) {
        return Ok(match m {
            crate::io::remote::Mounted::File(f) => Box::new(Shared(f)),
            crate::io::remote::Mounted::Dir(d) => Box::new(Shared(d)),
            crate::io::remote::Mounted::Container(c) => Box::new(Shared(c)),
            crate::io::remote::Mounted::Gguf(g) => Box::new(Shared(g)),
        });
    }
    Ok(match input_kind(path)? {
        InputKind::Safetensors => {
            Box::new(crate::io::safetensors_file::SafetensorsFile::open(path)?)
        }
        InputKind::ShardedDir => Box::new(crate::io::sharded::ShardedDir::open(path)?),
        InputKind::Container => Box::new(crate::io::container::Container::open(path)?),
        InputKind::Gguf => Box::new(crate::io::gguf_file::GgufFile::open(path)?),
    })
}

/// Opens a container input (a mounted remote one is shared, not opened
/// again).
pub(crate) fn open_container(
    path: &Path,
) -> Result<std::sync::Arc<crate::io::container::Container>> {
    #[cfg(feature = "remote")]
    if let Some(crate::io::remote::Mounted::Container(c)) = crate::io::remote::mounted(path) {
        return Ok(c);
    }
    Ok(std::sync::Arc::new(crate::io::container::Container::open(
        path,
    )?))
}

/// A mounted remote input's source, shared by every command that opens it.
#[cfg(feature = "remote")]
struct Shared<T>(std::sync::Arc<T>);

#[cfg(feature = "remote")]
impl<T: TensorSource> TensorSource for Shared<T> {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn tensors(&self) -> &[crate::io::source::SourceTensor] {
        self.0.tensors()
    }
    fn metadata(&self) -> &std::collections::BTreeMap<String, String> {
        self.0.metadata()
    }
    fn files(&self) -> Vec<String> {
        self.0.files()
    }
    fn file_metadata(&self, file: usize) -> std::collections::BTreeMap<String, String> {
        self.0.file_metadata(file)
    }
    fn read(&self, key: &str) -> Result<crate::io::TensorBytes> {
        self.0.read(key)
    }
    fn read_pieces(&self, key: &str, f: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        self.0.read_pieces(key, f)
    }
    fn recorded_hash(&self, key: &str) -> Result<Option<crate::format::manifest::Hash>> {
        self.0.recorded_hash(key)
    }
    fn location(&self, key: &str) -> crate::error::Location {
        self.0.location(key)
    }
    fn get(&self, key: &str) -> Option<&crate::io::source::SourceTensor> {
        self.0.get(key)
    }
}

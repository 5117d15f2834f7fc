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
    let is_gguf = md.len() >= 4
        && f.read_exact_at(&mut magic[..4], 0).is_ok()
        && magic[..4] == crate::format::gguf::read::MAGIC;
    Ok(if is_ckpk {
        InputKind::Container
    } else if is_gguf {
        InputKind::Gguf
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
        InputKind::Gguf => Box::new(crate::io::gguf_file::GgufFile::open(path)?),
    })
}

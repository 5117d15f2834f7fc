//! `verify`: structure, layer records and every recorded hash, of any input.

use crate::error::{Error, ErrorKind, Result};
use crate::io::container::{Container, VerifyReport};
use crate::io::open::{input_kind, InputKind};
use crate::io::safetensors_file::SafetensorsFile;
use crate::io::sharded::{find_index, ShardedDir};
use std::path::Path;

/// Verifies any input: a container's every hash and structural rule; a
/// safetensors file's structure and the blake3 hashes ckptkit recorded in it
/// (if any); a GGUF file's structure; a directory's index (if any) and
/// every `.safetensors`, `.ckpk` and `.gguf` file in it and its sub-directories (not following symlinks, at
/// most 8 levels deep). The report sums the files.
pub fn verify(path: &Path) -> Result<VerifyReport> {
    let mut r = VerifyReport::default();
    #[cfg(feature = "remote")]
    if let Some(m) = crate::io::remote::mounted(path) {
        match m {
            crate::io::remote::Mounted::File(f) => add_report(&mut r, f.verify()?),
            crate::io::remote::Mounted::Dir(d) => {
                for (_, f) in d.weight_files() {
                    add_report(&mut r, f.verify()?);
                }
            }
            crate::io::remote::Mounted::Container(c) => add_report(&mut r, check_container(&c)?),
            crate::io::remote::Mounted::Gguf(g) => add_report(&mut r, g.verify()?),
        }
        return Ok(r);
    }
    match input_kind(path)? {
        InputKind::Container => add_report(&mut r, verify_container(path)?),
        InputKind::Safetensors => add_report(&mut r, SafetensorsFile::open(path)?.verify()?),
        InputKind::ShardedDir => verify_dir(path, 0, &mut r)?,
        InputKind::Gguf => add_report(&mut r, verify_gguf(path)?),
    }
    Ok(r)
}

/// A GGUF file's structure (every rule of spec/gguf.md §2) and the blake3
/// of every tensor its `ckptkit.blake3` entry records (ckptkit writes it;
/// other writers' tensors are reported unchecked).
pub(crate) fn verify_gguf(path: &Path) -> Result<VerifyReport> {
    crate::io::gguf_file::GgufFile::open(path)?.verify()
}

/// A container's structure, every layer record (it must be one the
/// conversions accept) and every hash.
pub(crate) fn verify_container(path: &Path) -> Result<VerifyReport> {
    check_container(&Container::open(path)?)
}

fn check_container(c: &Container) -> Result<VerifyReport> {
    for l in c.layers() {
        crate::layout::check_layer(l).map_err(|e| e.with_file(c.path()))?;
    }
    c.verify()
}

pub(crate) fn add_report(r: &mut VerifyReport, x: VerifyReport) {
    r.tensors += x.tensors;
    r.bytes += x.bytes;
    r.unchecked += x.unchecked;
}

pub(crate) fn verify_dir(dir: &Path, depth: u32, r: &mut VerifyReport) -> Result<()> {
    if depth > 8 {
        return Err(Error::new(ErrorKind::LimitExceeded {
            what: "directory depth",
            value: depth as u64,
            limit: 8,
        })
        .with_file(dir));
    }
    if find_index(dir)?.is_some() {
        // the index names existing files and every key once
        ShardedDir::open(dir)?;
    }
    let mut entries = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::from(e).with_file(dir))? {
        let e = e.map_err(|e| Error::from(e).with_file(dir))?;
        entries.push((e.file_name(), e.file_type()?));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, ft) in entries {
        let p = dir.join(&name);
        let n = name.to_string_lossy();
        if ft.is_dir() {
            verify_dir(&p, depth + 1, r)?;
        } else if ft.is_file() && n.ends_with(".safetensors") {
            add_report(r, SafetensorsFile::open(&p)?.verify()?);
        } else if ft.is_file() && n.ends_with(".ckpk") {
            add_report(r, verify_container(&p)?);
        } else if ft.is_file() && n.ends_with(".gguf") {
            add_report(r, verify_gguf(&p)?);
        }
    }
    Ok(())
}

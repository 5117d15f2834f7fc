//! Reading `.ckpk` containers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{hex, Error, ErrorKind, Result};
use crate::format::filter::decode_chunk;
use crate::format::header::FixedHeader;
use crate::format::manifest::{Layer, Manifest, Shard, StoredTensor};
use crate::format::st_header::{self, StHeader};
use crate::format::validate::{self, Placement, TensorLoc};
use crate::format::{decode_manifest, HEADER_LEN};
use crate::io::backing::Backing;
use crate::io::source::{duplicate_key, first_duplicate, SourceTensor, TensorSource, PIECE};
use crate::io::TensorBytes;

/// An open, structurally validated container.
///
/// Opening checks the fixed header, the manifest's digest, encoding and
/// structural rules, every shard's safetensors header (hash and
/// agreement with the manifest) and every padding byte. Tensor data is only
/// read by [`read_tensor`](Container::read_tensor) and verified by
/// [`verify`](Container::verify) / [`verify_tensor`](Container::verify_tensor).
#[derive(Debug)]
pub struct Container {
    path: PathBuf,
    file: Backing,
    /// The file's length in bytes.
    len: u64,
    header: FixedHeader,
    manifest: Manifest,
    placement: Placement,
    shard_headers: Vec<(Vec<u8>, StHeader)>,
    inventory: Vec<SourceTensor>,
    /// Key → index into `inventory` (the first shard that holds it).
    key_index: std::collections::HashMap<String, usize>,
    /// A key that two shards hold: read as a [`TensorSource`], such a
    /// container is refused (keys are unique within a shard, rule V5).
    duplicate: Option<String>,
}

/// A summary of a successful verification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Tensors whose hash was checked.
    pub tensors: u64,
    /// Raw bytes hashed.
    pub bytes: u64,
    /// Tensors with no recorded hash (a safetensors file not written by
    /// ckptkit): only their structure was checked. Always 0 for containers.
    pub unchecked: u64,
}

/// `{"ok": true, "tensors", "bytes", "unchecked"}`: `migrate verify --json`.
impl serde::Serialize for VerifyReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut m = s.serialize_struct("VerifyReport", 4)?;
        // a report exists only for a verification that passed
        m.serialize_field("ok", &true)?;
        m.serialize_field("tensors", &self.tensors)?;
        m.serialize_field("bytes", &self.bytes)?;
        m.serialize_field("unchecked", &self.unchecked)?;
        m.end()
    }
}

impl Container {
    /// Opens and validates a container.
    pub fn open(path: &Path) -> Result<Container> {
        Self::open_inner(path).map_err(|e| e.with_file(path))
    }

    fn open_inner(path: &Path) -> Result<Container> {
        let (file, len) = Backing::open_local(path)?;
        Self::from_backing(path, file, len)
    }

    /// Opens a remote object (validated as [`open`](Self::open) validates a
    /// file); its path is its URL.
    #[cfg(feature = "remote")]
    pub(crate) fn open_remote(obj: crate::io::remote::Object) -> Result<Container> {
        let len = obj.size();
        let path = PathBuf::from(obj.url());
        Self::from_backing(&path, Backing::Remote(obj), len).map_err(|e| e.with_file(&path))
    }

    fn from_backing(path: &Path, file: Backing, len: u64) -> Result<Container> {
        let mut hb = [0u8; 64];
        if len < HEADER_LEN {
            let mut b = vec![0u8; len as usize];
            file.read_at(path, 0, &mut b)?;
            if b.len() >= 8 && b[..8] != crate::format::MAGIC {
                return Err(Error::new(ErrorKind::BadMagic).with_offset(0));
            }
            return Err(Error::new(ErrorKind::Truncated {
                what: "fixed header",
                needed: HEADER_LEN,
                available: len,
            }));
        }
        file.read_at(path, 0, &mut hb)?;
        let header = FixedHeader::decode(&hb, len)?;
        let mut mbytes = vec![0u8; header.manifest_len as usize];
        file.read_at(path, header.manifest_offset, &mut mbytes)?;
        let digest = FixedHeader::compute_digest(&header.prefix(), &mbytes);
        if digest != header.digest {
            return Err(Error::new(ErrorKind::HashMismatch {
                what: "fixed header and manifest".into(),
                expected: hex(&header.digest),
                actual: hex(&digest),
            })
            .with_offset(32));
        }
        let manifest =
            decode_manifest(&mbytes).map_err(|e| e.rebase_offset(header.manifest_offset))?;
        let placement = validate::validate(&manifest, &header)?;
        // padding between regions must be zero
        let mut pos = HEADER_LEN;
        let mut gaps = Vec::new();
        for s in &manifest.shards {
            gaps.push((pos, s.offset));
            pos = s.offset + s.stored_len;
        }
        gaps.push((pos, header.manifest_offset));
        for (a, b) in gaps {
            if b > a {
                let mut g = vec![0u8; (b - a) as usize];
                file.read_at(path, a, &mut g)?;
                if let Some(i) = g.iter().position(|&x| x != 0) {
                    return Err(
                        Error::malformed("padding byte is not zero").with_offset(a + i as u64)
                    );
                }
            }
        }
        let mut shard_headers = Vec::with_capacity(manifest.shards.len());
        for (si, s) in manifest.shards.iter().enumerate() {
            let r = Self::check_shard_header(&file, path, s)
                .map_err(|e| e.with_shard(si as u32).with_offset(s.offset))?;
            shard_headers.push(r);
        }
        let mut inventory = Vec::new();
        for (si, s) in manifest.shards.iter().enumerate() {
            for t in &s.tensors {
                inventory.push(SourceTensor {
                    key: t.key.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    len: crate::dtype::byte_len(t.dtype, &t.shape)?,
                    file: si,
                });
            }
        }
        let key_index = crate::io::source::key_index(inventory.iter().map(|t| t.key.as_str()));
        let duplicate = first_duplicate(&inventory).map(str::to_string);
        Ok(Container {
            path: path.to_path_buf(),
            file,
            len,
            header,
            manifest,
            placement,
            shard_headers,
            inventory,
            key_index,
            duplicate,
        })
    }

    fn check_shard_header(file: &Backing, path: &Path, s: &Shard) -> Result<(Vec<u8>, StHeader)> {
        let mut hb = vec![0u8; s.header_len as usize];
        if s.header_len > crate::format::MAX_ST_HEADER_LEN + 8 {
            return Err(Error::new(ErrorKind::LimitExceeded {
                what: "shard header length",
                value: s.header_len,
                limit: crate::format::MAX_ST_HEADER_LEN + 8,
            }));
        }
        file.read_at(path, s.offset, &mut hb)?;
        let h = *blake3::hash(&hb).as_bytes();
        if h != s.header_blake3 {
            return Err(Error::new(ErrorKind::HashMismatch {
                what: format!("safetensors header of shard `{}`", s.name),
                expected: hex(&s.header_blake3),
                actual: hex(&h),
            }));
        }
        let raw_total = s.tensors.iter().try_fold(s.header_len, |acc, t| {
            crate::dtype::byte_len(t.dtype, &t.shape).and_then(|l| {
                acc.checked_add(l)
                    .ok_or_else(|| Error::overflow("shard raw length"))
            })
        })?;
        let parsed = st_header::parse(&hb, Some(raw_total))?;
        if parsed.header_len != s.header_len {
            return Err(Error::malformed(format!(
                "shard header declares {} bytes, manifest says {}",
                parsed.header_len, s.header_len
            )));
        }
        if parsed.tensors.len() != s.tensors.len() {
            return Err(Error::malformed(format!(
                "shard header lists {} tensors, manifest lists {}",
                parsed.tensors.len(),
                s.tensors.len()
            )));
        }
        for (a, b) in parsed.tensors.iter().zip(&s.tensors) {
            if a.key != b.key || a.dtype != b.dtype || a.shape != b.shape {
                return Err(Error::malformed(format!(
                    "shard header tensor `{}` ({} {:?}) disagrees with manifest tensor `{}` ({} {:?})",
                    a.key, a.dtype, a.shape, b.key, b.dtype, b.shape
                ))
                .with_tensor(b.key.clone()));
            }
        }
        Ok((hb, parsed))
    }

    /// The file's length in bytes.
    pub fn byte_len(&self) -> u64 {
        self.len
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The decoded manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The layer table.
    pub fn layers(&self) -> &[Layer] {
        &self.manifest.layers
    }

    /// The fixed header.
    pub fn fixed_header(&self) -> &FixedHeader {
        &self.header
    }

    /// The safetensors `__metadata__` of a shard.
    pub fn shard_metadata(&self, shard: u32) -> Option<&BTreeMap<String, String>> {
        self.shard_headers
            .get(shard as usize)
            .map(|(_, h)| &h.metadata)
    }

    fn stored(&self, shard: u32, key: &str) -> Result<(&StoredTensor, &TensorLoc)> {
        crate::format::lookups::add(1);
        let si = shard as usize;
        let ti = self
            .placement
            .index
            .get(si)
            .and_then(|m| m.get(key))
            .copied()
            .ok_or_else(|| {
                Error::new(ErrorKind::NotFound(format!(
                    "tensor `{key}` in shard {shard}"
                )))
                .with_file(&self.path)
            })?;
        Ok((
            &self.manifest.shards[si].tensors[ti],
            &self.placement.tensors[si][ti],
        ))
    }

    /// Reads one stored tensor: a zero-copy mapped window when the shard is
    /// uncompressed, else decompressed chunk by chunk (the buffer grows only
    /// as chunks decode successfully). The bytes are not hash-checked; use
    /// [`verify_tensor`](Self::verify_tensor) or
    /// [`read_tensor_verified`](Self::read_tensor_verified).
    pub fn read_tensor(&self, shard: u32, key: &str) -> Result<TensorBytes> {
        let (t, loc) = self.stored(shard, key)?;
        self.read_loc(t, loc)
            .map_err(|e| e.with_file(&self.path).with_shard(shard).with_tensor(key))
    }

    /// Reads one stored tensor and checks its hash.
    pub fn read_tensor_verified(&self, shard: u32, key: &str) -> Result<TensorBytes> {
        let b = self.read_tensor(shard, key)?;
        let (t, _) = self.stored(shard, key)?;
        let h = crate::io::writer::blake3_of(&b);
        if h != t.blake3 {
            return Err(mismatch(t, &h)
                .with_file(&self.path)
                .with_shard(shard)
                .with_tensor(key));
        }
        Ok(b)
    }

    fn read_loc(&self, t: &StoredTensor, loc: &TensorLoc) -> Result<TensorBytes> {
        match loc {
            TensorLoc::Plain { offset, len } => self.file.window(&self.path, *offset, *len),
            TensorLoc::Chunked { codec, chunks, .. } => {
                let mut out: Vec<u8> = Vec::new();
                let mut stored = Vec::new();
                for c in chunks {
                    stored.resize(c.stored_len as usize, 0);
                    self.file.read_at(&self.path, c.offset, &mut stored)?;
                    let start = out.len();
                    out.try_reserve(c.raw_len as usize)
                        .map_err(|_| Error::overflow("tensor buffer"))?;
                    out.resize(start + c.raw_len as usize, 0);
                    decode_chunk(*codec, t.dtype, &stored, &mut out[start..])
                        .map_err(|e| e.with_offset(c.offset))?;
                }
                Ok(TensorBytes::Owned(out))
            }
        }
    }

    /// Checks one stored tensor's hash, reading it in bounded windows (or
    /// chunk by chunk).
    pub fn verify_tensor(&self, shard: u32, key: &str) -> Result<u64> {
        let (t, loc) = self.stored(shard, key)?;
        self.verify_loc(t, loc)
            .map_err(|e| e.with_file(&self.path).with_shard(shard).with_tensor(key))
    }

    fn verify_loc(&self, t: &StoredTensor, loc: &TensorLoc) -> Result<u64> {
        let (h, n) = match loc {
            TensorLoc::Plain { offset, len } => (
                *self.file.hash_range(&self.path, *offset, *len)?.as_bytes(),
                *len,
            ),
            TensorLoc::Chunked { codec, chunks, len } => {
                let mut hasher = blake3::Hasher::new();
                let mut stored = Vec::new();
                let mut raw = Vec::new();
                for c in chunks {
                    stored.resize(c.stored_len as usize, 0);
                    self.file.read_at(&self.path, c.offset, &mut stored)?;
                    raw.resize(c.raw_len as usize, 0);
                    decode_chunk(*codec, t.dtype, &stored, &mut raw)
                        .map_err(|e| e.with_offset(c.offset))?;
                    hasher.update(&raw);
                }
                (*hasher.finalize().as_bytes(), *len)
            }
        };
        if h != t.blake3 {
            return Err(mismatch(t, &h));
        }
        Ok(n)
    }

    /// Verifies every tensor (in parallel, bounded memory). Structural rules
    /// and header hashes were already checked by [`open`](Self::open).
    pub fn verify(&self) -> Result<VerifyReport> {
        let jobs: Vec<(u32, &StoredTensor, &TensorLoc)> = self
            .manifest
            .shards
            .iter()
            .enumerate()
            .flat_map(|(si, s)| {
                s.tensors
                    .iter()
                    .zip(&self.placement.tensors[si])
                    .map(move |(t, l)| (si as u32, t, l))
            })
            .collect();
        let bytes = jobs
            .par_iter()
            .map(|(si, t, l)| {
                self.verify_loc(t, l).map_err(|e| {
                    e.with_file(&self.path)
                        .with_shard(*si)
                        .with_tensor(t.key.clone())
                })
            })
            .try_reduce(|| 0u64, |a, b| Ok(a + b))?;
        Ok(VerifyReport {
            tensors: jobs.len() as u64,
            bytes,
            unchecked: 0,
        })
    }

    /// Writes shard `shard` out as a standalone safetensors file (atomic).
    pub fn extract_shard(&self, shard: u32, dest: &Path, overwrite: bool) -> Result<()> {
        let (hb, h) = self
            .shard_headers
            .get(shard as usize)
            .ok_or_else(|| Error::new(ErrorKind::NotFound(format!("shard {shard}"))))?;
        let out = crate::io::atomic::AtomicFile::create(dest, overwrite)?;
        let f = out.file()?;
        use std::os::unix::fs::FileExt;
        f.write_all_at(hb, 0)
            .map_err(|e| Error::from(e).with_file(out.temp()))?;
        for t in &h.tensors {
            // streamed piece by piece and hashed as written, whatever the
            // tensor claims; a mismatch leaves no output
            let mut at = h.header_len + t.start;
            let mut hasher = blake3::Hasher::new();
            self.read_tensor_pieces(shard, &t.key, &mut |piece| {
                hasher.update(piece);
                f.write_all_at(piece, at)
                    .map_err(|e| Error::from(e).with_file(out.temp()))?;
                at += piece.len() as u64;
                Ok(())
            })?;
            let (st, _) = self.stored(shard, &t.key)?;
            let got = *hasher.finalize().as_bytes();
            if got != st.blake3 {
                return Err(mismatch(st, &got)
                    .with_file(&self.path)
                    .with_shard(shard)
                    .with_tensor(t.key.clone()));
            }
        }
        out.commit()
    }

    /// The raw header bytes of a shard (`8 + N`).
    pub fn shard_header_bytes(&self, shard: u32) -> Option<&[u8]> {
        self.shard_headers.get(shard as usize).map(|(b, _)| &b[..])
    }
}

fn mismatch(t: &StoredTensor, h: &[u8; 32]) -> Error {
    Error::new(ErrorKind::HashMismatch {
        what: format!("tensor `{}`", t.key),
        expected: hex(&t.blake3),
        actual: hex(h),
    })
}

impl TensorSource for Container {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
    fn tensors(&self) -> &[SourceTensor] {
        &self.inventory
    }
    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.manifest.metadata
    }
    fn files(&self) -> Vec<String> {
        self.manifest
            .shards
            .iter()
            .map(|s| s.name.clone())
            .collect()
    }
    fn file_metadata(&self, file: usize) -> BTreeMap<String, String> {
        self.shard_metadata(file as u32)
            .cloned()
            .unwrap_or_default()
    }
    fn get(&self, key: &str) -> Option<&SourceTensor> {
        crate::format::lookups::add(1);
        self.key_index.get(key).and_then(|&i| self.inventory.get(i))
    }
    fn read(&self, key: &str) -> Result<TensorBytes> {
        let s = self.shard_of(key)?;
        self.read_tensor(s, key)
    }
    fn read_pieces(&self, key: &str, f: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let s = self.shard_of(key)?;
        self.read_tensor_pieces(s, key, f)
    }
    fn recorded_hash(&self, key: &str) -> Result<Option<crate::format::manifest::Hash>> {
        let s = self.shard_of(key)?;
        Ok(Some(self.stored(s, key)?.0.blake3))
    }
    fn location(&self, key: &str) -> crate::error::Location {
        let mut l = crate::error::Location {
            file: Some(self.path.clone()),
            tensor: Some(key.to_string()),
            ..Default::default()
        };
        if let Ok(s) = self.shard_of(key) {
            l.shard = Some(s);
            if let Ok((_, loc)) = self.stored(s, key) {
                l.offset = Some(match loc {
                    TensorLoc::Plain { offset, .. } => *offset,
                    TensorLoc::Chunked { chunks, .. } => {
                        chunks.first().map(|c| c.offset).unwrap_or(0)
                    }
                });
            }
        }
        l
    }
}

impl Container {
    fn shard_of(&self, key: &str) -> Result<u32> {
        if let Some(k) = &self.duplicate {
            return Err(duplicate_key(k, &self.path.display().to_string()));
        }
        self.get(key).map(|t| t.file as u32).ok_or_else(|| {
            Error::new(ErrorKind::NotFound(format!("tensor `{key}`"))).with_file(&self.path)
        })
    }

    /// Streams one stored tensor's bytes in pieces: mapped windows of at
    /// most `PIECE` bytes of an uncompressed shard, or one decoded chunk
    /// at a time of a compressed one (at most 16 MiB, whatever the tensor
    /// claims). Not hash-checked.
    pub fn read_tensor_pieces(
        &self,
        shard: u32,
        key: &str,
        f: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let (t, loc) = self.stored(shard, key)?;
        let at = |e: Error| e.with_file(&self.path).with_shard(shard).with_tensor(key);
        match loc {
            TensorLoc::Plain { offset, len } => {
                let mut done = 0u64;
                while done < *len {
                    let n = (*len - done).min(PIECE as u64);
                    let w = self.file.window(&self.path, offset + done, n).map_err(at)?;
                    f(&w)?;
                    done += n;
                }
            }
            TensorLoc::Chunked { codec, chunks, .. } => {
                let mut stored = Vec::new();
                let mut raw = Vec::new();
                for c in chunks {
                    stored.resize(c.stored_len as usize, 0);
                    self.file
                        .read_at(&self.path, c.offset, &mut stored)
                        .map_err(at)?;
                    raw.resize(c.raw_len as usize, 0);
                    decode_chunk(*codec, t.dtype, &stored, &mut raw)
                        .map_err(|e| at(e.with_offset(c.offset)))?;
                    f(&raw)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::manifest::{Encoding, LogicalTensor, Part, Quantization, Role, WeightQuant};
    use crate::io::writer::{ContainerOptions, ContainerWriter};
    use crate::Dtype;

    fn layer(path: &str, shard: u32) -> Layer {
        Layer {
            path: path.into(),
            quant: Quantization {
                weights: WeightQuant::Plain,
                activations: None,
            },
            tensors: vec![LogicalTensor {
                name: "w".into(),
                dtype: Dtype::U8,
                shape: vec![2],
                encoding: Encoding::Plain,
                parts: vec![Part {
                    role: Role::Data,
                    shard,
                    key: "x.w".into(),
                    dtype: Dtype::U8,
                    shape: vec![2],
                    blake3: [0; 32],
                }],
            }],
            extensions: Vec::new(),
        }
    }

    /// Keys are unique within a shard (V5); a key that two shards hold is
    /// valid in a container, but reading it as a tensor source is refused.
    #[test]
    fn a_key_in_two_shards_is_refused_as_a_source() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dup.ckpk");
        let mut w = ContainerWriter::create(&p, ContainerOptions::default()).unwrap();
        let plan = [("x.w".to_string(), Dtype::U8, vec![2])];
        for (i, name) in ["a.safetensors", "b.safetensors"].iter().enumerate() {
            w.begin_shard(name, &plan, &Default::default()).unwrap();
            w.write_tensor("x.w", &[i as u8; 2]).unwrap();
            w.finish_shard().unwrap();
        }
        w.finish(
            Some(vec![layer("a", 0), layer("b", 1)]),
            Default::default(),
            Vec::new(),
        )
        .unwrap();
        let c = Container::open(&p).unwrap();
        c.verify().unwrap();
        assert_eq!(&c.read_tensor(1, "x.w").unwrap()[..], &[1, 1]);
        assert_eq!(c.get("x.w").map(|t| t.file), Some(0));
        for key in ["x.w", "absent"] {
            let e = TensorSource::read(&c, key).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "invalid safetensors data: tensor `x.w` appears in more than one file of {}",
                    p.display()
                )
            );
        }
    }
}

//! The tensor-source abstraction: every input (safetensors file, sharded
//! directory, container) lists its stored tensors without reading them and
//! hands out one tensor's bytes on demand.

use std::collections::BTreeMap;

use crate::dtype::Dtype;
use crate::error::{Error, ErrorKind, Location, Result};
use crate::format::lookups;
use crate::format::manifest::Hash;
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
    /// Reads one tensor's bytes (not hash-checked: see `read_checked`).
    fn read(&self, key: &str) -> Result<TensorBytes>;
    /// Streams one tensor's bytes, in order, in pieces of at most
    /// `PIECE` bytes (mapped windows released as it goes, or decoded
    /// chunks), so that memory stays bounded whatever the tensor's size.
    /// Not hash-checked: conversions hash the pieces as they write them
    /// and compare with [`recorded_hash`](Self::recorded_hash).
    fn read_pieces(&self, key: &str, f: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let b = self.read(key)?;
        for p in b.chunks(PIECE) {
            f(p)?;
        }
        Ok(())
    }
    /// The blake3 of a tensor's bytes as the source records it (a
    /// container's manifest, a ckptkit safetensors file's `ckptkit.blake3`
    /// entry), or `None` when nothing is recorded. An entry that exists but
    /// cannot be read is an error: the file claims hashes it cannot back.
    fn recorded_hash(&self, key: &str) -> Result<Option<Hash>> {
        let _ = key;
        Ok(None)
    }
    /// Where a tensor's bytes are, for messages: the file, the shard, the
    /// tensor and the absolute offset of its data, as far as known.
    fn location(&self, key: &str) -> Location {
        let _ = key;
        Location {
            file: Some(self.describe().into()),
            ..Default::default()
        }
    }
    /// Finds a tensor by key. The default scans [`tensors`](Self::tensors);
    /// the sources of this crate answer from an index built when they are
    /// opened.
    fn get(&self, key: &str) -> Option<&SourceTensor> {
        lookups::find(self.tensors(), |t| t.key == key)
    }
}

/// A file's parsed `ckptkit.blake3` entry: absent, the digests by key, or
/// why it cannot be read.
pub(crate) type RecordedHashes =
    Option<std::result::Result<std::collections::HashMap<String, Hash>, String>>;

/// [`TensorSource::recorded_hash`] of a file whose entry is `recorded`: an
/// entry that exists but cannot be read is an error naming the file.
pub(crate) fn recorded_in(
    recorded: &RecordedHashes,
    key: &str,
    file: &std::path::Path,
) -> Result<Option<Hash>> {
    match recorded {
        None => Ok(None),
        Some(Ok(m)) => Ok(m.get(key).copied()),
        Some(Err(msg)) => Err(Error::new(ErrorKind::Json(msg.clone())).with_file(file)),
    }
}

/// Largest piece [`TensorSource::read_pieces`] hands out.
pub const PIECE: usize = 16 << 20;

fn located(e: Error, l: &Location) -> Error {
    let mut e = e;
    if let Some(f) = &l.file {
        e = e.with_file(f);
    }
    if let Some(s) = l.shard {
        e = e.with_shard(s);
    }
    if let Some(t) = &l.tensor {
        e = e.with_tensor(t.clone());
    }
    if let Some(o) = l.offset {
        e = e.with_offset(o);
    }
    e
}

/// The error for bytes whose blake3 differs from the recorded one: what
/// `verify` says, with the file, tensor and offset.
pub fn hash_mismatch(src: &dyn TensorSource, key: &str, want: &Hash, got: &Hash) -> Error {
    let mut l = src.location(key);
    l.tensor.get_or_insert_with(|| key.to_string());
    located(
        Error::new(ErrorKind::HashMismatch {
            what: format!("tensor `{key}`"),
            expected: crate::error::hex(want),
            actual: crate::error::hex(got),
        }),
        &l,
    )
}

/// Reads one tensor and, when `verify` and the source records its hash,
/// checks the bytes against it (a mismatch is [`ErrorKind::HashMismatch`]
/// naming the file, the tensor and the offset). Returns the bytes and
/// whether they were checked.
pub fn read_checked(
    src: &dyn TensorSource,
    key: &str,
    verify: bool,
) -> Result<(TensorBytes, bool)> {
    let want = if verify {
        src.recorded_hash(key)?
    } else {
        None
    };
    let b = src.read(key)?;
    if let Some(want) = want {
        let got = crate::io::writer::blake3_of(&b);
        if got != want {
            return Err(hash_mismatch(src, key, &want, &got));
        }
        return Ok((b, true));
    }
    Ok((b, false))
}

/// A source whose every `read` is checked against the hashes it records
/// (when `verify`), counting the tensors read that had no hash to check.
pub struct Checked<'a> {
    inner: &'a dyn TensorSource,
    verify: bool,
    unchecked: std::sync::atomic::AtomicU64,
}

impl<'a> Checked<'a> {
    /// Wraps a source.
    pub fn new(inner: &'a dyn TensorSource, verify: bool) -> Self {
        Checked {
            inner,
            verify,
            unchecked: Default::default(),
        }
    }
    /// Whether reads are checked.
    pub fn verifying(&self) -> bool {
        self.verify
    }
    /// Tensors read so far whose bytes had no recorded hash (or were not
    /// checked because verification is off).
    pub fn unchecked(&self) -> u64 {
        self.unchecked.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Counts one tensor read without a check.
    pub fn note_unchecked(&self) {
        self.unchecked
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    /// The wrapped source.
    pub fn inner(&self) -> &'a dyn TensorSource {
        self.inner
    }
}

impl TensorSource for Checked<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn tensors(&self) -> &[SourceTensor] {
        self.inner.tensors()
    }
    fn metadata(&self) -> &BTreeMap<String, String> {
        self.inner.metadata()
    }
    fn files(&self) -> Vec<String> {
        self.inner.files()
    }
    fn file_metadata(&self, file: usize) -> BTreeMap<String, String> {
        self.inner.file_metadata(file)
    }
    fn read(&self, key: &str) -> Result<TensorBytes> {
        let (b, checked) = read_checked(self.inner, key, self.verify)?;
        if !checked {
            self.note_unchecked();
        }
        Ok(b)
    }
    fn read_pieces(&self, key: &str, f: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        self.inner.read_pieces(key, f)
    }
    fn recorded_hash(&self, key: &str) -> Result<Option<Hash>> {
        self.inner.recorded_hash(key)
    }
    fn location(&self, key: &str) -> Location {
        self.inner.location(key)
    }
    fn get(&self, key: &str) -> Option<&SourceTensor> {
        self.inner.get(key)
    }
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
    Error::new(ErrorKind::Safetensors(format!(
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

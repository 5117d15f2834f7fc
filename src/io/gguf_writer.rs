//! Writing one GGUF v3 file atomically (spec/gguf.md §4): the header is
//! planned from the tensor list before any tensor is written, tensors are
//! written in any order by positioned writes (streamed, hashed as they go),
//! and the `ckptkit.blake3` entry, rendered with placeholders of the same
//! length, is rewritten in place with the real digests before the commit.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use crate::control::Control;
use crate::error::{Error, Result};
use crate::format::gguf::read::Value;
use crate::format::gguf::write::{layout, Layout, OutTensor};
use crate::format::manifest::Hash;
use crate::format::st_hashes;
use crate::io::atomic::AtomicFile;

/// The GGUF key under which ckptkit records each tensor's blake3, in the
/// form of the safetensors entry of the same name (spec/gguf.md §4).
pub(crate) const HASHES_KEY: &str = st_hashes::HASHES_KEY;

/// A GGUF file being written.
pub(crate) struct GgufWriter {
    out: AtomicFile,
    ctl: Control,
    kvs: Vec<(String, Value)>,
    tensors: Vec<OutTensor>,
    alignment: u64,
    plan: Layout,
    index: HashMap<String, usize>,
    hashes: Mutex<Vec<Option<Hash>>>,
}

impl GgufWriter {
    /// Creates the temporary output and writes the header for `kvs` (a
    /// `ckptkit.blake3` entry among them is replaced) and `tensors`.
    pub(crate) fn create(
        path: &Path,
        kvs: &[(String, Value)],
        tensors: &[OutTensor],
        alignment: u64,
        overwrite: bool,
    ) -> Result<GgufWriter> {
        let mut kvs: Vec<(String, Value)> = kvs
            .iter()
            .filter(|(k, _)| k != HASHES_KEY)
            .cloned()
            .collect();
        kvs.push((
            HASHES_KEY.to_string(),
            Value::Str(st_hashes::render(
                tensors.iter().map(|t| (t.name.as_str(), None)),
            )),
        ));
        let plan = layout(&kvs, tensors, alignment).map_err(|e| e.with_file(path))?;
        let out = AtomicFile::create(path, overwrite)?;
        let f = out.file()?;
        f.set_len(plan.file_len)
            .and_then(|_| f.write_all_at(&plan.header, 0))
            .map_err(|e| Error::from(e).with_file(out.temp()))?;
        let index = plan
            .tensors
            .iter()
            .enumerate()
            .map(|(i, (n, _, _))| (n.clone(), i))
            .collect();
        let n = plan.tensors.len();
        Ok(GgufWriter {
            out,
            ctl: Control::default(),
            kvs,
            tensors: tensors.to_vec(),
            alignment,
            plan,
            index,
            hashes: Mutex::new(vec![None; n]),
        })
    }

    /// Uses `ctl` to stop when it is cancelled and to report progress.
    pub(crate) fn with_control(mut self, ctl: Control) -> Self {
        self.ctl = ctl;
        self
    }

    /// Writes one tensor streamed by `feed`, in pieces; returns its blake3.
    pub(crate) fn write_from(&self, key: &str, feed: &mut crate::io::Feed<'_>) -> Result<Hash> {
        let at = |e: Error| e.with_file(self.out.dest()).with_tensor(key);
        self.ctl.check()?;
        let i = *self.index.get(key).ok_or_else(|| {
            at(Error::usage(format!(
                "tensor `{key}` is not in the GGUF plan"
            )))
        })?;
        let (_, off, len) = *self
            .plan
            .tensors
            .get(i)
            .ok_or_else(|| at(Error::usage("internal: GGUF plan index out of range")))?;
        let f = self.out.file()?;
        let mut h = blake3::Hasher::new();
        crate::io::writer::write_fed(&self.ctl, f, off, len, key, Some(&mut h), feed)
            .map_err(at)?;
        let hash = *h.finalize().as_bytes();
        let mut g = self
            .hashes
            .lock()
            .map_err(|_| Error::usage("writer poisoned"))?;
        if g[i].is_some() {
            return Err(at(Error::usage(format!("tensor `{key}` written twice"))));
        }
        g[i] = Some(hash);
        Ok(hash)
    }

    /// Checks that every tensor was written, records the digests and
    /// commits.
    pub(crate) fn finish(self) -> Result<()> {
        let hashes = self
            .hashes
            .into_inner()
            .map_err(|_| Error::usage("writer poisoned"))?;
        let mut done = Vec::with_capacity(hashes.len());
        for ((name, _, _), h) in self.plan.tensors.iter().zip(&hashes) {
            let h = h.as_ref().ok_or_else(|| {
                Error::usage(format!("tensor `{name}` was planned but never written"))
            })?;
            done.push((name.as_str(), Some(h)));
        }
        let mut kvs = self.kvs;
        if let Some(kv) = kvs.iter_mut().find(|(k, _)| k == HASHES_KEY) {
            kv.1 = Value::Str(st_hashes::render(done));
        }
        let again = layout(&kvs, &self.tensors, self.alignment)?;
        if again.header.len() != self.plan.header.len() {
            return Err(Error::usage(
                "internal: the hashed GGUF header changed length; nothing was committed",
            ));
        }
        self.out
            .file()?
            .write_all_at(&again.header, 0)
            .map_err(|e| Error::from(e).with_file(self.out.temp()))?;
        self.out.commit()
    }
}

impl crate::migrate::sink::Sink for GgufWriter {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.write_from(key, &mut |put| put(bytes)).map(|_| ())
    }
    fn put_from(
        &self,
        key: &str,
        _want_hash: bool,
        feed: &mut crate::io::Feed<'_>,
    ) -> Result<Option<Hash>> {
        self.write_from(key, feed).map(Some)
    }
}

//! Hugging Face sharded directories: `*.safetensors.index.json` with a
//! `weight_map` (key → file) and `metadata.total_size`, or a directory that
//! holds a single weight file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::format::validate::safe_file_name;
use crate::io::safetensors_file::SafetensorsFile;
use crate::io::source::{check_unique, SourceTensor, TensorSource};
use crate::io::TensorBytes;

/// The index file's contents.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardIndex {
    /// `metadata` (holds `total_size`); other entries are kept.
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Tensor key → file name.
    pub weight_map: BTreeMap<String, String>,
}

/// Largest index file accepted.
pub const MAX_INDEX_LEN: u64 = 256 << 20;

/// Finds the index file in a directory, if any (the one whose name ends in
/// `.safetensors.index.json`; more than one is an error).
pub fn find_index(dir: &Path) -> Result<Option<PathBuf>> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::from(e).with_file(dir))? {
        let e = e?;
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with(".safetensors.index.json") && !n.starts_with('.') {
            found.push(e.path());
        }
    }
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(Error::new(ErrorKind::Index(format!(
            "several index files in {}: {}; keep one",
            dir.display(),
            found
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        )))
        .with_file(dir)),
    }
}

/// Reads and parses an index file.
pub fn read_index(path: &Path) -> Result<ShardIndex> {
    let text = crate::io::files::read_capped_text(path, MAX_INDEX_LEN, "index file size")?;
    serde_json::from_str(&text)
        .map_err(|e| Error::new(ErrorKind::Index(e.to_string())).with_file(path))
}

/// A sharded checkpoint directory as one tensor source.
#[derive(Debug)]
pub struct ShardedDir {
    dir: PathBuf,
    index: Option<ShardIndex>,
    files: Vec<(String, SafetensorsFile)>,
    tensors: Vec<SourceTensor>,
    by_key: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
}

impl ShardedDir {
    /// Opens a directory: through its index when it has one, else its single
    /// `*.safetensors` file.
    pub fn open(dir: &Path) -> Result<ShardedDir> {
        Self::open_with(dir, None)
    }

    /// Opens a directory's model weights: through its index when it has
    /// one, else the given weight files (or, with `None`, its single
    /// `*.safetensors` file).
    pub fn open_with(dir: &Path, files: Option<Vec<String>>) -> Result<ShardedDir> {
        let listed = |dir: &Path| -> Result<Vec<String>> {
            let mut names = Vec::new();
            for e in std::fs::read_dir(dir).map_err(|e| Error::from(e).with_file(dir))? {
                let n = e
                    .map_err(|er| Error::from(er).with_file(dir))?
                    .file_name()
                    .to_string_lossy()
                    .into_owned();
                if n.ends_with(".safetensors") && !n.starts_with('.') {
                    names.push(n);
                }
            }
            Ok(names)
        };
        Self::open_impl(dir, dir, files, &listed, &|n: &str| {
            SafetensorsFile::open(&dir.join(n))
        })
    }

    /// Opens a remote directory: its index (if any) in the local directory
    /// `side` its side files were fetched into, its weight files (`listed`:
    /// the `*.safetensors` names under it) through `open`; messages name
    /// `shown` (its URL).
    #[cfg(feature = "remote")]
    pub(crate) fn open_listed(
        side: &Path,
        shown: &Path,
        listed: Vec<String>,
        open: &dyn Fn(&str) -> Result<SafetensorsFile>,
    ) -> Result<ShardedDir> {
        Self::open_impl(side, shown, None, &|_: &Path| Ok(listed.clone()), open)
    }

    fn open_impl(
        side: &Path,
        shown: &Path,
        files: Option<Vec<String>>,
        list: &dyn Fn(&Path) -> Result<Vec<String>>,
        open: &dyn Fn(&str) -> Result<SafetensorsFile>,
    ) -> Result<ShardedDir> {
        let dir = shown;
        let index_path = find_index(side)?;
        let (names, index) = match (&index_path, files) {
            (None, Some(names)) => (names, None),
            (index_path, _) => match index_path {
                Some(p) => {
                    let idx = read_index(p)?;
                    let mut names: Vec<String> = idx.weight_map.values().cloned().collect();
                    names.sort();
                    names.dedup();
                    for n in &names {
                        if !safe_file_name(n) {
                            return Err(Error::new(ErrorKind::Index(format!(
                                "it names `{n}`, which is not a file in the directory"
                            )))
                            .with_file(p));
                        }
                    }
                    (names, Some(idx))
                }
                None => {
                    let mut names = list(side)?;
                    names.sort();
                    // several files: the one transformers or diffusers loads
                    if names.len() > 1 {
                        let named: Vec<String> = names
                            .iter()
                            .filter(|n| is_weight_file_name(n))
                            .cloned()
                            .collect();
                        if named.len() == 1 {
                            names = named;
                        }
                    }
                    if names.len() != 1 {
                        return Err(Error::new(ErrorKind::NotFound(format!(
                            "{} has no *.safetensors.index.json and {} .safetensors files{}; \
                             expected an index or exactly one weight file",
                            dir.display(),
                            names.len(),
                            if names.is_empty() {
                                String::new()
                            } else {
                                format!(" ({})", names.join(", "))
                            }
                        ))));
                    }
                    (names, None)
                }
            },
        };
        let mut files = Vec::new();
        let mut tensors = Vec::new();
        let mut metadata = BTreeMap::new();
        for (fi, n) in names.iter().enumerate() {
            let f = open(n)?;
            for t in f.tensors() {
                let mut t = t.clone();
                t.file = fi;
                tensors.push(t);
            }
            for (k, v) in f.metadata() {
                metadata.entry(k.clone()).or_insert_with(|| v.clone());
            }
            files.push((n.clone(), f));
        }
        check_unique(&tensors, &dir.display().to_string())?;
        if let (Some(idx), Some(p)) = (&index, &index_path) {
            for t in &tensors {
                match idx.weight_map.get(&t.key) {
                    Some(f) if *f == files[t.file].0 => {}
                    Some(f) => {
                        return Err(Error::new(ErrorKind::Index(format!(
                            "it maps `{}` to {f}, but the tensor is in {}",
                            t.key, files[t.file].0
                        )))
                        .with_file(p))
                    }
                    None => {
                        return Err(Error::new(ErrorKind::Index(format!(
                            "`{}` in {} is missing from it",
                            t.key, files[t.file].0
                        )))
                        .with_file(p))
                    }
                }
            }
            if idx.weight_map.len() != tensors.len() {
                let have: std::collections::HashSet<&str> =
                    tensors.iter().map(|t| t.key.as_str()).collect();
                let missing: Vec<&String> = idx
                    .weight_map
                    .keys()
                    .filter(|k| !have.contains(k.as_str()))
                    .take(5)
                    .collect();
                return Err(Error::new(ErrorKind::Index(format!(
                    "it lists tensors that no file holds: {}",
                    missing
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
                .with_file(p));
            }
        }
        let by_key = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.key.clone(), i))
            .collect();
        Ok(ShardedDir {
            dir: dir.to_path_buf(),
            index,
            files,
            tensors,
            by_key,
            metadata,
        })
    }

    /// The parsed index, when the directory has one.
    pub fn index(&self) -> Option<&ShardIndex> {
        self.index.as_ref()
    }

    /// The weight files, in name order.
    pub fn weight_files(&self) -> impl Iterator<Item = (&str, &SafetensorsFile)> {
        self.files.iter().map(|(n, f)| (n.as_str(), f))
    }
}

impl TensorSource for ShardedDir {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }
    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    fn files(&self) -> Vec<String> {
        self.files.iter().map(|(n, _)| n.clone()).collect()
    }
    fn file_metadata(&self, file: usize) -> BTreeMap<String, String> {
        self.files
            .get(file)
            .map(|(_, f)| f.metadata().clone())
            .unwrap_or_default()
    }
    fn get(&self, key: &str) -> Option<&SourceTensor> {
        crate::format::lookups::add(1);
        self.by_key.get(key).and_then(|&i| self.tensors.get(i))
    }
    fn read(&self, key: &str) -> Result<TensorBytes> {
        self.file_of(key)?.read(key)
    }
    fn read_pieces(&self, key: &str, f: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        self.file_of(key)?.read_pieces(key, f)
    }
    fn recorded_hash(&self, key: &str) -> Result<Option<crate::format::manifest::Hash>> {
        self.file_of(key)?.recorded_hash(key)
    }
    fn location(&self, key: &str) -> crate::error::Location {
        match self.file_of(key) {
            Ok(f) => f.location(key),
            Err(_) => crate::error::Location {
                file: Some(self.dir.clone()),
                tensor: Some(key.to_string()),
                ..Default::default()
            },
        }
    }
}

impl ShardedDir {
    fn file_of(&self, key: &str) -> Result<&SafetensorsFile> {
        crate::format::lookups::add(1);
        let i = *self.by_key.get(key).ok_or_else(|| {
            Error::new(ErrorKind::NotFound(format!("tensor `{key}`"))).with_file(&self.dir)
        })?;
        Ok(&self.files[self.tensors[i].file].1)
    }
}

/// The naming stem of a weight file: `model-00001-of-00003.safetensors` →
/// `model`, `flux1-dev.safetensors` → `flux1-dev`; `None` for a name that
/// is not `*.safetensors` or whose stem is empty.
pub fn weight_file_stem(n: &str) -> Option<&str> {
    let stem = n.strip_suffix(".safetensors")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let base = match stem.rsplit_once("-of-") {
        Some((head, tail)) if digits(tail) => match head.rsplit_once('-') {
            Some((b, k)) if digits(k) => b,
            _ => stem,
        },
        _ => stem,
    };
    (!base.is_empty()).then_some(base)
}

/// True for the weight-file names transformers and diffusers write:
/// `model.safetensors`, `diffusion_pytorch_model-00001-of-00003.safetensors`.
pub fn is_weight_file_name(n: &str) -> bool {
    matches!(
        weight_file_stem(n),
        Some("model") | Some("diffusion_pytorch_model")
    )
}

/// Splits tensors (in the given order) into shards of at most `max_bytes`
/// of data each (a tensor larger than the limit gets a shard of its own),
/// named `{stem}-0000k-of-0000n.safetensors` as transformers and diffusers
/// name them. One shard keeps the plain `{stem}.safetensors` name.
pub fn plan_shards(
    stem: &str,
    tensors: &[(String, u64)],
    max_bytes: u64,
) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut cur: Vec<String> = Vec::new();
    let mut size = 0u64;
    for (k, len) in tensors {
        if !cur.is_empty() && size.saturating_add(*len) > max_bytes {
            groups.push(std::mem::take(&mut cur));
            size = 0;
        }
        cur.push(k.clone());
        size = size.saturating_add(*len);
    }
    if !cur.is_empty() || groups.is_empty() {
        groups.push(cur);
    }
    let n = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            let name = if n == 1 {
                format!("{stem}.safetensors")
            } else {
                format!("{stem}-{:05}-of-{n:05}.safetensors", i + 1)
            };
            (name, g)
        })
        .collect()
}

//! Remote outputs (`s3://`, `gs://`, `az://`): a conversion writes its
//! output, complete and committed, into a private local staging directory;
//! [`Upload::commit`] then sends every file as a multipart upload with
//! explicit part numbers, the first part (the file's header) last, and
//! completes each upload only once all its parts are stored, so an object
//! appears whole or not at all. A directory is committed by its index and
//! its `.ckptkit-output.json` record, uploaded after every weight file.
//! An error or a cancellation aborts the uploads in flight.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;

use super::{child, list_all, private_dir, private_dir_in, remote_err, store_of, Store};
use crate::control::Control;
use crate::error::{Error, ErrorKind, Result};
use crate::io::atomic::RECORD_NAME;

/// Where a plan's jobs put their completion records under a remote output
/// prefix (removed when the plan is finished).
pub(crate) const JOBS_PREFIX: &str = ".ckptkit-jobs/";
/// Default size of every part but the last.
const PART: u64 = 32 << 20;
/// The smallest part S3 accepts (but for the last).
const MIN_PART: u64 = 5 << 20;
/// The most parts of one upload (S3's limit).
const MAX_PARTS: u64 = 10_000;
/// Parts in flight at once, per file.
const IN_FLIGHT: usize = 4;

/// An output at a remote URL: where to write it locally first, then its
/// upload. Dropping it removes the staging directory.
///
/// ```no_run
/// # fn main() -> ckptkit::Result<()> {
/// use ckptkit::migrate::{convert, ConvertOptions, Target};
/// let up = ckptkit::Upload::prepare("s3://models/flux-bf16/", true, false)?;
/// let opts = ConvertOptions::default().target(Target::parse("plain:bf16")?);
/// convert("flux/".as_ref(), up.path(), &opts)?;
/// let sent = up.commit(&opts.control)?;
/// println!("{} objects, {} bytes uploaded", sent.objects, sent.uploaded_bytes);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Upload {
    url: String,
    store: Arc<Store>,
    key: ObjectPath,
    dir: bool,
    root: PathBuf,
    local: PathBuf,
    /// Objects of a previous ckptkit output at the prefix (`--force`),
    /// removed after the commit unless the new output has them too.
    replaced: Vec<String>,
    /// `--force`: companions of a file output may replace objects too.
    overwrite: bool,
    /// Files of a staged directory that are already stored under their
    /// names (a plan's jobs uploaded them, or they were streamed): listed
    /// in the record, not sent again.
    stored: Mutex<std::collections::HashSet<String>>,
    /// Files uploaded while the conversion ran
    /// ([`stream_file`](Self::stream_file)): removed again if the output
    /// is never committed.
    streamed: Mutex<Vec<String>>,
    #[cfg_attr(not(feature = "cli"), allow(dead_code))]
    streamed_bytes: AtomicU64,
    committed: std::sync::atomic::AtomicBool,
    uploaded: AtomicU64,
    parts: AtomicU64,
}

/// What [`Upload::commit`] sent.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UploadReport {
    /// The output URL.
    pub url: String,
    /// Objects written.
    pub objects: u64,
    /// Bytes uploaded.
    pub uploaded_bytes: u64,
    /// Parts uploaded (over every object).
    pub parts: u64,
    /// Objects of the previous output removed (`--force`).
    pub removed: Vec<String>,
    /// Weight files of a directory output uploaded while the conversion
    /// ran, each as soon as it was written (so the staging directory held
    /// one at a time).
    pub streamed: u64,
}

impl Upload {
    /// Prepares an output at `url` (a directory when `dir`: the URL is a
    /// prefix): checks the destination (an existing object, or objects under
    /// the prefix, are refused unless `overwrite`; with it, a prefix may
    /// hold only what a previous ckptkit output's record there lists) and
    /// makes the staging directory (under the temporary directory, or
    /// `CKPTKIT_STAGING` when set).
    pub fn prepare(url: &str, dir: bool, overwrite: bool) -> Result<Upload> {
        Self::prepare_impl(url, dir, overwrite, Some(&[]))
    }

    /// A plan job's upload to the directory output at `url`: its staging
    /// directory, without the destination checks (the plan made them, and
    /// other jobs' files may be there already).
    #[cfg(feature = "cli")]
    pub(crate) fn for_job(url: &str) -> Result<Upload> {
        Self::prepare_impl(url, true, true, None)
    }

    /// [`prepare`](Self::prepare)s a directory output that a plan's jobs
    /// have partly written: the objects named `ours` (the jobs' files) and
    /// those under [`JOBS_PREFIX`] (their records, removed after the
    /// commit) are not in the way.
    #[cfg(feature = "cli")]
    pub(crate) fn prepare_with(url: &str, overwrite: bool, ours: &[String]) -> Result<Upload> {
        Self::prepare_impl(url, true, overwrite, Some(ours))
    }

    /// `ours`: `None` skips the destination checks.
    fn prepare_impl(
        url: &str,
        dir: bool,
        overwrite: bool,
        ours: Option<&[String]>,
    ) -> Result<Upload> {
        let (store, key, u) = store_of(url)?;
        if store.multipart.is_none() {
            return Err(Error::usage(format!(
                "{url}: {} URLs are inputs only; write outputs to s3://, gs:// or az://",
                u.scheme()
            )));
        }
        let store = Arc::new(store);
        let key_s = key.as_ref().trim_end_matches('/').to_string();
        if key_s.is_empty() {
            return Err(Error::usage(format!(
                "{url}: name an object or a prefix inside the bucket, not the bucket itself"
            )));
        }
        let key = ObjectPath::from(key_s.as_str());
        let mut replaced = Vec::new();
        if let (true, Some(ours)) = (dir, ours) {
            let (jobs, have): (Vec<String>, Vec<String>) = list_all(&store, &key_s, url)?
                .into_iter()
                .filter(|h| !ours.contains(h))
                .partition(|h| h.starts_with(JOBS_PREFIX));
            if !have.is_empty() {
                replaced = replaceable(&store, &key_s, url, &have, overwrite)?;
            }
            replaced.extend(jobs);
        } else if !dir && store.head(&key, url)?.is_some() && !overwrite {
            return Err(Error::new(ErrorKind::OutputExists(PathBuf::from(url))));
        }
        let root = match std::env::var_os("CKPTKIT_STAGING") {
            Some(d) => private_dir_in(Path::new(&d))?,
            None => private_dir()?,
        };
        let name = key_s.rsplit('/').next().unwrap_or("output").to_string();
        Ok(Upload {
            url: url.to_string(),
            store,
            key,
            dir,
            local: root.join(name),
            root,
            replaced,
            overwrite,
            stored: Default::default(),
            streamed: Default::default(),
            streamed_bytes: AtomicU64::new(0),
            committed: Default::default(),
            uploaded: AtomicU64::new(0),
            parts: AtomicU64::new(0),
        })
    }

    /// Where the conversion writes the output before it is uploaded.
    pub fn path(&self) -> &Path {
        &self.local
    }

    /// The output URL, as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Uploads the staged output: each file as a multipart upload whose
    /// first part is sent last; for a file, the files written beside it
    /// first (a quanto output's `quanto_qmap.json`, checked like the output
    /// against existing objects); for a directory, weight files first, then
    /// other files, then indexes, then the output record; then the objects
    /// of a replaced previous output that the new one does not have are
    /// removed. Stops (aborting the uploads in flight) when `ctl` is
    /// cancelled.
    pub fn commit(&self, ctl: &Control) -> Result<UploadReport> {
        let mut report = UploadReport {
            url: self.url.clone(),
            ..Default::default()
        };
        if !self.dir {
            // the files the conversion wrote beside it (a quanto output's
            // quanto_qmap.json) go beside it, before it: a reader that sees
            // the weights finds them
            let parent = self
                .key
                .as_ref()
                .rsplit_once('/')
                .map(|(p, _)| p)
                .unwrap_or("");
            let parent_url = self.url.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
            let mut companions = Vec::new();
            for (rel, p) in local_files(&self.root)? {
                if p == self.local || rel.contains('/') {
                    continue;
                }
                let key = child(parent, &rel, &self.url)?;
                let u = format!("{parent_url}/{rel}");
                if self.store.head(&key, &u)?.is_some() {
                    if !self.overwrite {
                        return Err(Error::new(ErrorKind::OutputExists(PathBuf::from(u))));
                    }
                    // as on disk: never another model's side file
                    let own = self.key.as_ref().rsplit('/').next().unwrap_or("");
                    let others: Vec<String> = super::list(&self.store, parent, &self.url)?
                        .into_iter()
                        .map(|(n, _)| n)
                        .filter(|n| n.ends_with(".safetensors") && n != own)
                        .collect();
                    if !others.is_empty() {
                        return Err(Error::new(ErrorKind::Conflict(format!(
                            "{u} belongs to another weights file beside it ({}); replacing it \
                             would break that model; write the output to another prefix",
                            others.join(", ")
                        ))));
                    }
                }
                companions.push((key, u, p));
            }
            companions.sort_by(|a, b| a.1.cmp(&b.1));
            for (key, u, p) in &companions {
                self.put_file(p, key, u, ctl)?;
            }
            self.put_file(&self.local, &self.key, &self.url, ctl)?;
            report.objects = 1 + companions.len() as u64;
        } else {
            let mut files = local_files(&self.local)?;
            files.sort_by_key(|(rel, _)| (rank(rel), rel.clone()));
            for (rel, p) in &files {
                let (key, u) = self.at(rel)?;
                if !self.is_stored(rel) {
                    self.put_file(p, &key, &u, ctl)?;
                }
                report.objects += 1;
            }
            let new: std::collections::HashSet<&str> =
                files.iter().map(|(r, _)| r.as_str()).collect();
            for old in &self.replaced {
                if new.contains(old.as_str()) {
                    continue;
                }
                let (key, _) = self.at(old)?;
                self.store
                    .rt
                    .block_on(self.store.inner.delete(&key))
                    .map_err(|e| remote_err(&self.url, &format!("cannot remove `{old}`"), e))?;
                report.removed.push(old.clone());
            }
        }
        report.uploaded_bytes = self.uploaded.load(Ordering::Relaxed);
        report.parts = self.parts.load(Ordering::Relaxed);
        report.streamed = self.lock_streamed().len() as u64;
        self.committed.store(true, Ordering::Relaxed);
        Ok(report)
    }

    /// Marks files of the staged directory as already stored under their
    /// names (a plan's jobs uploaded them): [`commit`](Self::commit) lists
    /// them in the record without sending them.
    #[cfg(feature = "cli")]
    pub(crate) fn already_stored(&self, names: impl IntoIterator<Item = String>) {
        self.stored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(names);
    }

    fn is_stored(&self, rel: &str) -> bool {
        self.stored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(rel)
    }

    fn lock_streamed(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.streamed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A weight file of a directory output, written and committed in the
    /// staging directory (`local`, named `rel` in it): uploaded now, while
    /// the conversion goes on, and its local copy emptied (it stays in the
    /// staged directory, so the output record lists it), so the staging
    /// file system holds one weight file at a time. Only for a directory
    /// output replacing nothing (with `--force` over a previous output,
    /// every file waits for [`commit`](Self::commit), which keeps the
    /// previous output whole until then). If the output is never committed,
    /// dropping this removes what was streamed.
    #[cfg(feature = "cli")]
    pub(crate) fn stream_file(&self, local: &Path, rel: &str, ctl: &Control) -> Result<()> {
        if !self.dir || !self.replaced.is_empty() {
            return Ok(());
        }
        self.lock_streamed().push(rel.to_string());
        let (size, _) = self.put_one(local, rel, ctl)?;
        self.streamed_bytes.fetch_add(size, Ordering::Relaxed);
        self.already_stored([rel.to_string()]);
        std::fs::File::create(local).map_err(|e| Error::from(e).with_file(local))?;
        Ok(())
    }

    /// Bytes of the weight files uploaded while the conversion ran.
    #[cfg(feature = "cli")]
    pub(crate) fn streamed_bytes(&self) -> u64 {
        self.streamed_bytes.load(Ordering::Relaxed)
    }

    /// Uploads one local file to `rel` under the output prefix (as
    /// [`commit`](Self::commit) uploads each file); gives the object's size
    /// and ETag as stored.
    #[cfg(feature = "cli")]
    pub(crate) fn put_one(
        &self,
        local: &Path,
        rel: &str,
        ctl: &Control,
    ) -> Result<(u64, Option<String>)> {
        let (key, u) = self.at(rel)?;
        self.put_file(local, &key, &u, ctl)?;
        let m = self.store.head(&key, &u)?.ok_or_else(|| {
            Error::new(ErrorKind::Remote(format!(
                "{u}: the object is not there after its upload completed"
            )))
        })?;
        Ok((m.size, m.e_tag))
    }

    /// The size and ETag of `rel` under the output prefix, if it exists.
    #[cfg(feature = "cli")]
    pub(crate) fn stat(&self, rel: &str) -> Result<Option<(u64, Option<String>)>> {
        let (key, u) = self.at(rel)?;
        Ok(self.store.head(&key, &u)?.map(|m| (m.size, m.e_tag)))
    }

    /// The bytes of the small object `rel` under the output prefix (at most
    /// `cap` bytes; a larger one is refused), if it exists.
    #[cfg(feature = "cli")]
    pub(crate) fn read_small(&self, rel: &str, cap: u64) -> Result<Option<Vec<u8>>> {
        let (key, u) = self.at(rel)?;
        let Some(m) = self.store.head(&key, &u)? else {
            return Ok(None);
        };
        if m.size > cap {
            return Err(Error::new(ErrorKind::LimitExceeded {
                what: "object size",
                value: m.size,
                limit: cap,
            })
            .with_file(&u));
        }
        if m.size == 0 {
            return Ok(Some(Vec::new()));
        }
        self.store
            .get(&key, &u, m.e_tag.as_deref(), 0..m.size)
            .map(Some)
    }

    /// The object `rel` under the output prefix: its path in the store and
    /// its URL.
    fn at(&self, rel: &str) -> Result<(ObjectPath, String)> {
        let key = child(self.key.as_ref(), rel, &self.url)?;
        Ok((key, format!("{}/{rel}", self.url.trim_end_matches('/'))))
    }

    /// One file as one multipart upload: parts 2.. in parallel, part 1 (the
    /// header) last, then completed; aborted on any error.
    fn put_file(&self, local: &Path, key: &ObjectPath, url: &str, ctl: &Control) -> Result<()> {
        let mp = self
            .store
            .multipart
            .as_ref()
            .ok_or_else(|| Error::usage(format!("{url}: not a store that takes uploads")))?;
        let f = crate::io::files::open_regular(local)?;
        let size = f
            .metadata()
            .map_err(|e| Error::from(e).with_file(local))?
            .len();
        let part = part_size(size);
        let n = size.div_ceil(part).max(1) as usize;
        ctl.check()?;
        let id = self
            .store
            .rt
            .block_on(mp.create_multipart(key))
            .map_err(|e| remote_err(url, "cannot start the upload", e))?;
        let r = self.send_parts(mp.as_ref(), &f, local, key, url, &id, size, part, n, ctl);
        match r {
            Ok(ids) => {
                let done = self
                    .store
                    .rt
                    .block_on(mp.complete_multipart(key, &id, ids))
                    .map_err(|e| remote_err(url, "cannot complete the upload", e));
                if done.is_err() {
                    let _ = self.store.rt.block_on(mp.abort_multipart(key, &id));
                }
                done.map(|_| ())
            }
            Err(e) => {
                // nothing appears under the key; the parts are released
                let _ = self.store.rt.block_on(mp.abort_multipart(key, &id));
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn send_parts(
        &self,
        mp: &dyn MultipartStore,
        f: &std::fs::File,
        local: &Path,
        key: &ObjectPath,
        url: &str,
        id: &str,
        size: u64,
        part: u64,
        n: usize,
        ctl: &Control,
    ) -> Result<Vec<PartId>> {
        let ids: Mutex<Vec<Option<PartId>>> = Mutex::new(vec![None; n]);
        let put = |i: usize| -> Result<()> {
            ctl.check()?;
            let off = i as u64 * part;
            let len = part.min(size - off);
            let mut buf = vec![0u8; len as usize];
            crate::io::read_at(f, local, off, &mut buf)?;
            let pid = self
                .store
                .rt
                .block_on(mp.put_part(key, &id.to_string(), i, buf.into()))
                .map_err(|e| {
                    remote_err(url, &format!("cannot upload part {}", i + 1), e).with_offset(off)
                })?;
            self.uploaded.fetch_add(len, Ordering::Relaxed);
            self.parts.fetch_add(1, Ordering::Relaxed);
            ids.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(pid);
            Ok(())
        };
        // every part but the first, a few at a time
        let next = AtomicUsize::new(1);
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..IN_FLIGHT.min(n.saturating_sub(1)) {
                s.spawn(|| loop {
                    if failed.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    if let Err(e) = put(i) {
                        failed
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        return;
                    }
                });
            }
        });
        if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        // the first part, holding the header, last
        put(0)?;
        ids.into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                p.ok_or_else(|| Error::usage(format!("internal: part {} not uploaded", i + 1)))
            })
            .collect()
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
        if self.committed.load(Ordering::Relaxed) {
            return;
        }
        // an output never committed leaves none of its files behind (those
        // a killed process streamed stay, without an index or a record)
        for rel in self.lock_streamed().iter() {
            if let Ok((key, _)) = self.at(rel) {
                let _ = self.store.rt.block_on(self.store.inner.delete(&key));
            }
        }
    }
}

/// The part size for a file of `size` bytes: 32 MiB (or
/// `CKPTKIT_UPLOAD_PART_SIZE`, at least 5 MiB), larger when the file would
/// need more than 10 000 parts.
fn part_size(size: u64) -> u64 {
    let p = std::env::var("CKPTKIT_UPLOAD_PART_SIZE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|v| v.max(MIN_PART))
        .unwrap_or(PART);
    p.max(size.div_ceil(MAX_PARTS))
}

/// Upload order in a directory: weights, other files, indexes, the record.
fn rank(rel: &str) -> u8 {
    if rel == RECORD_NAME {
        3
    } else if rel.ends_with(".index.json") {
        2
    } else if rel.ends_with(".safetensors") || rel.ends_with(".ckpk") || rel.ends_with(".gguf") {
        0
    } else {
        1
    }
}

/// Every file under a staged output directory, by `/`-separated relative
/// path (the walk that writes its record).
fn local_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for rel in crate::io::atomic::walk(dir)? {
        let p = dir.join(&rel);
        let md = std::fs::symlink_metadata(&p).map_err(|e| Error::from(e).with_file(&p))?;
        if md.is_file() {
            out.push((rel, p));
        }
    }
    Ok(out)
}

/// The objects under a prefix that an upload with `overwrite` may replace:
/// all of them, when the prefix holds a ckptkit output record listing each;
/// otherwise the upload is refused, naming up to five objects.
fn replaceable(
    store: &Store,
    key: &str,
    url: &str,
    have: &[String],
    overwrite: bool,
) -> Result<Vec<String>> {
    if !overwrite {
        return Err(Error::usage(format!(
            "{url} already holds {} object(s) ({}); --force replaces a previous ckptkit output \
             there (only the objects its {RECORD_NAME} lists)",
            have.len(),
            have.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    let listed: std::collections::HashSet<String> = if have.iter().any(|h| h == RECORD_NAME) {
        let p = child(key, RECORD_NAME, url)?;
        let meta = store.head(&p, url)?;
        let bytes = match meta {
            Some(m) if m.size > 0 => {
                store.get(&p, url, m.e_tag.as_deref(), 0..m.size.min(64 << 20))?
            }
            _ => Vec::new(),
        };
        crate::io::atomic::record_entries(&bytes)
            .map_err(|e| {
                Error::new(ErrorKind::Json(format!("ckptkit output record: {e}")))
                    .with_file(format!("{}/{RECORD_NAME}", url.trim_end_matches('/')))
            })?
            .into_iter()
            .collect()
    } else {
        Default::default()
    };
    let foreign: Vec<&String> = have
        .iter()
        .filter(|h| h.as_str() != RECORD_NAME && !listed.contains(h.as_str()))
        .collect();
    if !foreign.is_empty() {
        return Err(Error::new(ErrorKind::ForeignEntries {
            dir: PathBuf::from(url),
            entries: foreign.iter().take(5).map(|s| s.to_string()).collect(),
            total: foreign.len(),
        }));
    }
    Ok(have.to_vec())
}

//! Remote inputs (feature `remote`): a checkpoint at an `s3://`, `gs://`,
//! `az://` or `http(s)://` URL, read through the `object_store` crate with
//! ranged requests.
//!
//! A remote input is *mounted*: its small side files (`config.json`, the
//! shard index, `quanto_qmap.json`, ...) are fetched into a private local
//! directory, and the input's path inside that directory resolves, for
//! every command ([`crate::io::open::open_source`], `verify`), to a tensor
//! source whose bytes are fetched by range on demand. Nothing else of the
//! crate knows the input is remote: layouts, side files and provenance are
//! read exactly as for a local checkpoint. Only headers are fetched when
//! the layers are read (`inspect`, `check`); tensor bytes are fetched in
//! pieces of at most [`PIECE`](crate::io::source::PIECE) bytes when they
//! are converted, each request conditional on the ETag seen when the
//! object was opened (an object replaced while it is read is refused).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};

use crate::error::{Error, ErrorKind, Result};
use crate::io::container::Container;
use crate::io::gguf_file::GgufFile;
use crate::io::open::InputKind;
use crate::io::safetensors_file::SafetensorsFile;
use crate::io::sharded::ShardedDir;

mod upload;
#[cfg(feature = "cli")]
pub(crate) use upload::JOBS_PREFIX;
pub use upload::{Upload, UploadReport};

/// Bytes fetched with the first request for an object: the 8-byte length
/// and, for most checkpoints, the whole safetensors header.
pub(crate) const READ_AHEAD: u64 = 64 << 10;

/// Largest side file fetched (a shard index is capped at the same size
/// locally).
const MAX_SIDE_FILE: u64 = crate::io::sharded::MAX_INDEX_LEN;

/// Largest total of side files fetched for one input.
const MAX_SIDE_TOTAL: u64 = 1 << 30;

/// Most objects listed under a remote directory.
const MAX_LISTED: usize = 100_000;

/// Pieces of one tensor fetched at once (memory: this many pieces of at
/// most `PIECE` bytes per tensor being read).
const AHEAD: usize = 4;

/// Attempts for one ranged read whose response failed or came back short
/// (the store's own client retries each request before that).
const READ_ATTEMPTS: u32 = 4;

/// Side files looked for over HTTP(S), which cannot list a directory.
const HTTP_SIDE_FILES: &[&str] = &[
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "quanto_qmap.json",
];

/// Weight files looked for over HTTP(S) in a directory without an index.
const HTTP_WEIGHT_FILES: &[&str] = &["model.safetensors", "diffusion_pytorch_model.safetensors"];

/// One store (a bucket, a container, an HTTP host) and what was fetched
/// from it.
pub(crate) struct Store {
    inner: Arc<dyn ObjectStore>,
    /// The same store's multipart uploads with explicit part numbers (S3,
    /// GCS, Azure; not HTTP, which is read-only).
    multipart: Option<Arc<dyn object_store::multipart::MultipartStore>>,
    /// The same store's listing page by page (S3, GCS, Azure; HTTP cannot
    /// list).
    paged: Option<Arc<dyn PaginatedListStore>>,
    rt: tokio::runtime::Runtime,
    fetched: AtomicU64,
    requests: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.inner)
    }
}

fn remote_err(url: &str, what: &str, e: impl std::fmt::Display) -> Error {
    let hint = if url.to_ascii_lowercase().starts_with("http") {
        ""
    } else {
        " (credentials and endpoints come from the store's environment variables: AWS_*, \
         GOOGLE_*, AZURE_*)"
    };
    Error::new(ErrorKind::Remote(format!("{url}: {what}: {e}{hint}")))
}

fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: Duration::from_secs(180),
    }
}

/// Builds the store of a URL (credentials and endpoints from the
/// environment) and the object path inside it.
pub(crate) fn store_of(url: &str) -> Result<(Store, ObjectPath, url::Url)> {
    let u = url::Url::parse(url).map_err(|e| remote_err(url, "not a URL", e))?;
    let opts = object_store::ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(10))
        .with_timeout(Duration::from_secs(120));
    type Built = (
        Arc<dyn ObjectStore>,
        Option<Arc<dyn object_store::multipart::MultipartStore>>,
        Option<Arc<dyn PaginatedListStore>>,
    );
    fn both<S>(s: S) -> Built
    where
        S: ObjectStore + object_store::multipart::MultipartStore + PaginatedListStore,
    {
        let s = Arc::new(s);
        (s.clone(), Some(s.clone()), Some(s))
    }
    let built: std::result::Result<Built, object_store::Error> =
        match u.scheme().to_ascii_lowercase().as_str() {
            "s3" => object_store::aws::AmazonS3Builder::from_env()
                .with_url(url)
                .with_retry(retry_config())
                .build()
                .map(both),
            "gs" => object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(url)
                .with_retry(retry_config())
                .build()
                .map(both),
            "az" | "abfs" => object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(url)
                .with_retry(retry_config())
                .build()
                .map(both),
            "http" | "https" => object_store::http::HttpBuilder::new()
                .with_url(&u[..url::Position::BeforePath])
                .with_client_options(opts.clone().with_allow_http(u.scheme() == "http"))
                .with_retry(retry_config())
                .build()
                .map(|s| (Arc::new(s) as _, None, None)),
            s => {
                return Err(remote_err(
                    url,
                    "unsupported scheme",
                    format!("`{s}` (s3, gs, az, http and https are read)"),
                ))
            }
        };
    let (inner, multipart, paged) =
        built.map_err(|e| remote_err(url, "cannot reach the store", e))?;
    let key = match u.scheme() {
        // the bucket is the host; the key is the path
        "http" | "https" | "s3" | "gs" | "az" | "abfs" => u.path().trim_start_matches('/'),
        _ => "",
    };
    let key = percent_decode(key);
    let path = ObjectPath::parse(&key).map_err(|e| remote_err(url, "not an object path", e))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ckptkit-remote")
        .enable_all()
        .build()
        .map_err(|e| Error::from(e).with_file(url))?;
    Ok((
        Store {
            inner,
            multipart,
            paged,
            rt,
            fetched: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        },
        path,
        u,
    ))
}

/// A URL path's percent escapes decoded (invalid escapes kept as written).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

impl Store {
    fn head(&self, path: &ObjectPath, url: &str) -> Result<Option<object_store::ObjectMeta>> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match self.rt.block_on(self.inner.head(path)) {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(remote_err(url, "cannot read the object's size", e)),
        }
    }

    /// The bytes `range` of an object, conditional on its ETag; a response
    /// that fails while its body is read, or comes back short, is asked
    /// again (the client already retried the request itself).
    fn get(
        &self,
        path: &ObjectPath,
        url: &str,
        etag: Option<&str>,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<u8>> {
        let want = range.end - range.start;
        let mut last = String::new();
        for attempt in 0..READ_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(100 << attempt));
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            let opts = GetOptions {
                range: Some(GetRange::Bounded(range.clone())),
                if_match: etag.map(str::to_string),
                ..Default::default()
            };
            // the body is read up to the length asked for, never further: a
            // server cannot make us hold more than the range
            let r = self.rt.block_on(async {
                use futures_util::StreamExt;
                let res = self.inner.get_opts(path, opts).await?;
                let mut body = res.into_stream();
                let mut out = Vec::new();
                if out.try_reserve_exact(want as usize).is_err() {
                    return Ok(Err(format!(
                        "cannot hold a range of {want} bytes in memory"
                    )));
                }
                while let Some(chunk) = body.next().await {
                    let chunk = chunk?;
                    if out.len() as u64 + chunk.len() as u64 > want {
                        return Ok(Err(format!(
                            "the server sent more than the {want} bytes asked for"
                        )));
                    }
                    out.extend_from_slice(&chunk);
                }
                Ok(Ok(out))
            });
            match r {
                Ok(Ok(b)) if b.len() as u64 == want => {
                    self.fetched.fetch_add(want, Ordering::Relaxed);
                    return Ok(b);
                }
                Ok(Ok(b)) => {
                    last = format!("asked for {want} bytes, got {}", b.len());
                }
                Ok(Err(msg)) => {
                    return Err(remote_err(url, "refused", msg).with_offset(range.start));
                }
                Err(object_store::Error::Precondition { .. }) => {
                    return Err(Error::new(ErrorKind::Remote(format!(
                        "{url} changed while it was read (its ETag is no longer {}); read it \
                         again from the start",
                        etag.unwrap_or("?")
                    )))
                    .with_offset(range.start));
                }
                Err(e @ object_store::Error::NotFound { .. }) => {
                    return Err(remote_err(url, "the object is gone", e).with_offset(range.start))
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(remote_err(
            url,
            &format!(
                "reading bytes {}..{} failed {READ_ATTEMPTS} times",
                range.start, range.end
            ),
            last,
        )
        .with_offset(range.start))
    }
}

/// One remote object, opened: its size, its ETag and its first bytes.
#[derive(Debug)]
pub(crate) struct Object {
    store: Arc<Store>,
    path: ObjectPath,
    url: String,
    size: u64,
    etag: Option<String>,
    head: Vec<u8>,
}

impl Object {
    fn open(store: &Arc<Store>, path: ObjectPath, url: String) -> Result<Object> {
        let meta = store
            .head(&path, &url)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound(format!("{url}: no such object"))))?;
        let n = meta.size.min(READ_AHEAD);
        let mut o = Object {
            store: store.clone(),
            path,
            url,
            size: meta.size,
            etag: meta.e_tag,
            head: Vec::new(),
        };
        o.head = o.fetch(0, n)?;
        Ok(o)
    }

    /// The object's size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// How many of its first bytes were fetched when it was opened.
    pub(crate) fn read_ahead(&self) -> u64 {
        self.head.len() as u64
    }

    /// The ETag seen when it was opened (every read is conditional on it).
    #[cfg(feature = "cli")]
    pub(crate) fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }

    /// The object's URL.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    fn fetch(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                Error::new(ErrorKind::Truncated {
                    what: "data",
                    needed: offset.saturating_add(len),
                    available: self.size,
                })
                .with_file(&self.url)
                .with_offset(offset)
            })?;
        if len == 0 {
            return Ok(Vec::new());
        }
        self.store
            .get(&self.path, &self.url, self.etag.as_deref(), offset..end)
            .map_err(|e| e.with_file(&self.url))
    }

    /// Reads exactly `buf.len()` bytes at `offset` (from the bytes fetched
    /// when the object was opened, when they hold them).
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let b = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&b);
        Ok(())
    }

    /// The `len` bytes at `offset`, owned.
    pub(crate) fn range(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        usize::try_from(len).map_err(|_| Error::overflow("remote read length"))?;
        match offset.checked_add(len) {
            // served from the bytes fetched when the object was opened
            Some(end) if end <= self.head.len() as u64 => {
                Ok(self.head[offset as usize..end as usize].to_vec())
            }
            _ => self.fetch(offset, len),
        }
    }

    /// Hands the `len` bytes at `offset` to `f` in order, in pieces of at
    /// most `PIECE` bytes, fetching up to `AHEAD` pieces at once.
    pub(crate) fn pieces(
        &self,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let piece = crate::io::source::PIECE as u64;
        let mut done = 0u64;
        while done < len {
            // up to AHEAD pieces fetched at once, handed on in order
            let mut batch = Vec::with_capacity(AHEAD);
            let mut at = done;
            while at < len && batch.len() < AHEAD {
                let n = (len - at).min(piece);
                batch.push((offset + at, n));
                at += n;
            }
            let got: Vec<Result<Vec<u8>>> = if batch.len() == 1 {
                vec![self.range(batch[0].0, batch[0].1)]
            } else {
                std::thread::scope(|s| {
                    let hs: Vec<_> = batch
                        .iter()
                        .map(|&(o, n)| s.spawn(move || self.range(o, n)))
                        .collect();
                    hs.into_iter()
                        .map(|h| {
                            h.join().unwrap_or_else(|_| {
                                Err(Error::new(ErrorKind::Remote(format!(
                                    "{}: a read thread panicked",
                                    self.url
                                ))))
                            })
                        })
                        .collect()
                })
            };
            for b in got {
                f(&b?)?;
            }
            done = at;
        }
        Ok(())
    }
}

/// What a mounted input is.
#[derive(Debug, Clone)]
pub(crate) enum Mounted {
    /// One safetensors object.
    File(Arc<SafetensorsFile>),
    /// A directory (prefix) of safetensors objects.
    Dir(Arc<ShardedDir>),
    /// One `.ckpk` container object.
    Container(Arc<Container>),
    /// One GGUF object.
    Gguf(Arc<GgufFile>),
}

impl Mounted {
    /// Opens one object as the kind its first bytes say (as
    /// [`input_kind`](crate::io::open::input_kind) decides for a local
    /// file): a container, a GGUF file, else safetensors.
    fn of_object(obj: Object) -> Result<Mounted> {
        let mut first = [0u8; 8];
        let n = obj.size().min(8) as usize;
        obj.read_at(0, &mut first[..n])?;
        Ok(match crate::io::open::file_kind(&first[..n]) {
            InputKind::Container => Mounted::Container(Arc::new(Container::open_remote(obj)?)),
            InputKind::Gguf => Mounted::Gguf(Arc::new(GgufFile::open_remote(obj)?)),
            _ => Mounted::File(Arc::new(SafetensorsFile::open_remote(obj)?)),
        })
    }

    /// Its kind, as an input.
    fn kind(&self) -> InputKind {
        match self {
            Mounted::File(_) => InputKind::Safetensors,
            Mounted::Dir(_) => InputKind::ShardedDir,
            Mounted::Container(_) => InputKind::Container,
            Mounted::Gguf(_) => InputKind::Gguf,
        }
    }

    /// Its size in bytes, for a single object (0 for a directory).
    fn byte_len(&self) -> u64 {
        match self {
            Mounted::File(f) => f.byte_len(),
            Mounted::Dir(_) => 0,
            Mounted::Container(c) => c.byte_len(),
            Mounted::Gguf(g) => g.byte_len(),
        }
    }
}

type Registry = Mutex<BTreeMap<PathBuf, (Mounted, String)>>;

fn registry() -> &'static Registry {
    static R: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
    R.get_or_init(Default::default)
}

/// The mounted input at `path`, if `path` is a mount's path.
pub(crate) fn mounted(path: &Path) -> Option<Mounted> {
    let r = registry().lock().unwrap_or_else(|p| p.into_inner());
    r.get(path).map(|(m, _)| m.clone())
}

/// The URL of the mount at `path` and, for a single object, its size (for
/// provenance).
pub(crate) fn mounted_url(path: &Path) -> Option<(String, u64)> {
    let r = registry().lock().unwrap_or_else(|p| p.into_inner());
    r.get(path).map(|(m, u)| (u.clone(), m.byte_len()))
}

/// The kind of the mounted input at `path`, if any.
pub(crate) fn mounted_kind(path: &Path) -> Option<InputKind> {
    mounted(path).map(|m| m.kind())
}

/// A remote checkpoint, mounted for the life of this value: pass
/// [`path`](Mount::path) to any function that takes an input path
/// ([`convert`](crate::migrate::convert), [`inspect`](crate::migrate::inspect),
/// [`check`](crate::migrate::check), [`verify`](crate::migrate::verify)). Dropping it
/// removes its local side files and the mount.
///
/// ```no_run
/// # fn main() -> ckptkit::Result<()> {
/// let m = ckptkit::Mount::open("s3://models/flux-dev/")?;
/// let opts = ckptkit::migrate::ConvertOptions::default();
/// let report = ckptkit::migrate::inspect(m.path(), &opts)?;
/// println!("{} layers; {} bytes fetched", report.layers.len(), m.fetched_bytes());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Mount {
    url: String,
    path: PathBuf,
    root: PathBuf,
    store: Arc<Store>,
}

impl Mount {
    /// Mounts the checkpoint at `url`: an `s3://`, `gs://`, `az://` or
    /// `http(s)://` URL of a `.safetensors`, `.ckpk` or `.gguf` object (its
    /// kind read from its first bytes, as for a local file), or of a directory
    /// (prefix) holding a shard index or a single weight file. Credentials
    /// and endpoints come from each store's standard environment variables
    /// (`AWS_*`, `GOOGLE_*`, `AZURE_*`). Reads the headers and the side
    /// files; no tensor bytes.
    pub fn open(url: &str) -> Result<Mount> {
        if !crate::io::paths::is_url(url) {
            return Err(Error::usage(format!(
                "{url} is not an s3://, gs://, az:// or http(s):// URL"
            )));
        }
        let (store, path, u) = store_of(url)?;
        let store = Arc::new(store);
        let root = private_dir()?;
        let r = Self::mount_in(url, &u, &store, path, &root);
        match r {
            Ok((local, mounted)) => {
                registry()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(local.clone(), (mounted, url.to_string()));
                Ok(Mount {
                    url: url.to_string(),
                    path: local,
                    root,
                    store,
                })
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&root);
                Err(e)
            }
        }
    }

    fn mount_in(
        url: &str,
        u: &url::Url,
        store: &Arc<Store>,
        path: ObjectPath,
        root: &Path,
    ) -> Result<(PathBuf, Mounted)> {
        let http = matches!(u.scheme(), "http" | "https");
        let key = path.as_ref().to_string();
        let name_of = |k: &str| -> String {
            k.rsplit('/')
                .find(|s| !s.is_empty())
                .unwrap_or("remote")
                .to_string()
        };
        let url_of = |name: &str| -> String { format!("{}/{name}", url.trim_end_matches('/')) };
        let lower = key.to_ascii_lowercase();
        if [".safetensors", ".gguf", ".ckpk"]
            .iter()
            .any(|e| lower.ends_with(e))
        {
            // a file: its side files are those beside it
            let name = name_of(&key);
            let dir_key = key.strip_suffix(&name).unwrap_or("").trim_end_matches('/');
            let dir_url = url.strip_suffix(&name).unwrap_or(url).trim_end_matches('/');
            let local_dir = root.join("input");
            std::fs::create_dir(&local_dir).map_err(|e| Error::from(e).with_file(&local_dir))?;
            let side = ["config.json", "quanto_qmap.json"];
            fetch_side_files(store, dir_key, dir_url, &local_dir, &side)?;
            let obj = Object::open(store, path.clone(), url.to_string())?;
            return Ok((local_dir.join(&name), Mounted::of_object(obj)?));
        }
        // a directory (prefix)
        let dir_key = key.trim_end_matches('/').to_string();
        let local_dir = root.join(name_of(&dir_key));
        std::fs::create_dir(&local_dir).map_err(|e| Error::from(e).with_file(&local_dir))?;
        let weights: Vec<String> = if http {
            fetch_side_files(
                store,
                &dir_key,
                url.trim_end_matches('/'),
                &local_dir,
                HTTP_SIDE_FILES,
            )?;
            let mut w = Vec::new();
            for n in HTTP_WEIGHT_FILES {
                let p = child(&dir_key, n, url)?;
                if store.head(&p, &url_of(n))?.is_some() {
                    w.push(n.to_string());
                }
            }
            w
        } else {
            let listed = list(store, &dir_key, url)?;
            if listed.is_empty() {
                return Err(Error::new(ErrorKind::NotFound(format!(
                    "{url}: no objects under this prefix"
                ))));
            }
            let side: Vec<&str> = listed
                .iter()
                .filter(|(n, _)| is_side_file(n))
                .map(|(n, _)| n.as_str())
                .collect();
            fetch_side_files(
                store,
                &dir_key,
                url.trim_end_matches('/'),
                &local_dir,
                &side,
            )?;
            listed
                .iter()
                .filter(|(n, _)| n.ends_with(".safetensors") && !n.starts_with('.'))
                .map(|(n, _)| n.clone())
                .collect()
        };
        let shown = PathBuf::from(url.trim_end_matches('/'));
        let dir = ShardedDir::open_listed(&local_dir, &shown, weights, &|n: &str| {
            let p = child(&dir_key, n, url)?;
            SafetensorsFile::open_remote(Object::open(store, p, url_of(n))?)
        })?;
        Ok((local_dir, Mounted::Dir(Arc::new(dir))))
    }

    /// The local path that stands for the remote input (pass it to any
    /// function that takes an input path while this value lives).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The URL, as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Bytes fetched from the store so far (headers, side files, tensor
    /// bytes).
    pub fn fetched_bytes(&self) -> u64 {
        self.store.fetched.load(Ordering::Relaxed)
    }

    /// Requests sent to the store so far (not counting the client's own
    /// retries of a request).
    pub fn requests(&self) -> u64 {
        self.store.requests.load(Ordering::Relaxed)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.path);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// True for the names fetched as side files from a listed directory:
/// small files a local conversion reads or carries (JSON, text, tokenizer
/// models), not weights.
fn is_side_file(n: &str) -> bool {
    let l = n.to_ascii_lowercase();
    !n.starts_with('.')
        && [
            ".json", ".txt", ".model", ".md", ".py", ".yaml", ".yml", ".jinja",
        ]
        .iter()
        .any(|e| l.ends_with(e))
}

fn child(dir_key: &str, name: &str, url: &str) -> Result<ObjectPath> {
    let k = if dir_key.is_empty() {
        name.to_string()
    } else {
        format!("{dir_key}/{name}")
    };
    ObjectPath::parse(&k).map_err(|e| remote_err(url, "not an object path", e))
}

/// The objects and sub-prefixes directly under a prefix.
#[derive(Default)]
struct Level {
    objects: Vec<object_store::ObjectMeta>,
    common_prefixes: Vec<ObjectPath>,
}

/// One level of a prefix: its objects and its sub-prefixes, read page by
/// page, refused as soon as they pass `budget` entries (never collected
/// whole first). A page cut off while its body is read is asked again (the
/// client already retried the request itself).
fn list_level(store: &Store, dir_key: &str, url: &str, what: &str, budget: usize) -> Result<Level> {
    let paged = store.paged.as_ref().ok_or_else(|| {
        Error::new(ErrorKind::Remote(format!(
            "{url}: this store cannot list objects"
        )))
    })?;
    // a paged listing takes its prefix as written: the level's delimiter
    let prefix = (!dir_key.is_empty()).then(|| format!("{dir_key}/"));
    let mut out = Level::default();
    let mut token: Option<String> = None;
    loop {
        let opts = PaginatedListOptions {
            delimiter: Some("/".into()),
            page_token: token.clone(),
            ..Default::default()
        };
        let mut attempt = 0;
        let page = loop {
            store.requests.fetch_add(1, Ordering::Relaxed);
            match store
                .rt
                .block_on(paged.list_paginated(prefix.as_deref(), opts.clone()))
            {
                Ok(p) => break p,
                Err(e @ object_store::Error::NotFound { .. }) => {
                    return Err(remote_err(url, what, e))
                }
                Err(e) if attempt + 1 >= READ_ATTEMPTS => return Err(remote_err(url, what, e)),
                Err(_) => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(100 << attempt));
                }
            }
        };
        out.objects.extend(page.result.objects);
        out.common_prefixes.extend(page.result.common_prefixes);
        if out.objects.len() + out.common_prefixes.len() > budget {
            return Err(Error::new(ErrorKind::Remote(format!(
                "{url}: more than {MAX_LISTED} objects under this prefix, more than a \
                 checkpoint directory may hold"
            ))));
        }
        match page.page_token {
            Some(t) if Some(&t) != token.as_ref() => token = Some(t),
            _ => break,
        }
    }
    Ok(out)
}

/// Every object under a prefix, at any depth, by its `/`-separated path
/// relative to the prefix (at most `MAX_LISTED` objects and sub-prefixes
/// in all).
fn list_all(store: &Store, dir_key: &str, url: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir_key.to_string()];
    while let Some(k) = stack.pop() {
        let budget = MAX_LISTED.saturating_sub(out.len() + stack.len());
        let r = list_level(store, &k, url, "cannot list the destination", budget)?;
        for m in r.objects {
            let full = m.location.as_ref();
            let rel = full
                .strip_prefix(dir_key)
                .unwrap_or(full)
                .trim_start_matches('/');
            out.push(rel.to_string());
        }
        for p in r.common_prefixes {
            stack.push(p.as_ref().to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// The objects directly under a prefix, by name, with their sizes.
pub(crate) fn list(store: &Store, dir_key: &str, url: &str) -> Result<Vec<(String, u64)>> {
    let r = list_level(store, dir_key, url, "cannot list the directory", MAX_LISTED)?;
    let mut out: Vec<(String, u64)> = r
        .objects
        .into_iter()
        .filter_map(|m| m.location.filename().map(|n| (n.to_string(), m.size)))
        .collect();
    out.sort();
    Ok(out)
}

/// Fetches the side files that exist among `names` into `local_dir`,
/// each capped in size, all capped in total.
fn fetch_side_files(
    store: &Arc<Store>,
    dir_key: &str,
    dir_url: &str,
    local_dir: &Path,
    names: &[&str],
) -> Result<()> {
    let mut total = 0u64;
    for n in names {
        if !crate::format::validate::safe_file_name(n) {
            continue;
        }
        let u = format!("{dir_url}/{n}");
        let p = child(dir_key, n, &u)?;
        let Some(meta) = store.head(&p, &u)? else {
            continue;
        };
        if meta.size > MAX_SIDE_FILE {
            return Err(Error::new(ErrorKind::Remote(format!(
                "{u}: a side file of {} bytes, more than the {MAX_SIDE_FILE} read beside a \
                 checkpoint",
                meta.size
            ))));
        }
        total = total.saturating_add(meta.size);
        if total > MAX_SIDE_TOTAL {
            return Err(Error::new(ErrorKind::Remote(format!(
                "{dir_url}: its side files add up to more than {MAX_SIDE_TOTAL} bytes"
            ))));
        }
        let bytes = if meta.size == 0 {
            Vec::new()
        } else {
            store.get(&p, &u, meta.e_tag.as_deref(), 0..meta.size)?
        };
        let dest = local_dir.join(n);
        std::fs::write(&dest, &bytes).map_err(|e| Error::from(e).with_file(&dest))?;
    }
    Ok(())
}

/// A new private directory (mode 0700) under the temporary directory.
pub(crate) fn private_dir() -> Result<PathBuf> {
    private_dir_in(&std::env::temp_dir())
}

/// A new private directory (mode 0700) under `base`.
pub(crate) fn private_dir_in(base: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    static N: AtomicU64 = AtomicU64::new(0);
    for _ in 0..100 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = base.join(format!(
            "ckptkit-remote-{}-{}-{nanos:08x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::from(e).with_file(&p)),
        }
    }
    Err(Error::new(ErrorKind::Remote(
        "cannot create a private temporary directory".into(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::paths::is_url;

    #[test]
    fn urls_are_recognised_by_scheme() {
        assert!(is_url("s3://b/k.safetensors"));
        assert!(is_url("HTTPS://host/x"));
        assert!(is_url("az://c/p/"));
        assert!(!is_url("s3://"));
        assert!(!is_url("model.safetensors"));
        assert!(!is_url("file:///x"));
    }

    #[test]
    fn percent_escapes_are_decoded() {
        assert_eq!(percent_decode("a%20b/c%2Fd"), "a b/c/d");
        assert_eq!(percent_decode("trailing%2"), "trailing%2");
        assert_eq!(percent_decode("bad%zzx"), "bad%zzx");
    }

    /// A store whose listing never ends: every page holds 1000 sub-prefixes
    /// and a token for the next.
    struct Endless(AtomicU64);

    impl PaginatedListStore for Endless {
        fn list_paginated<'a, 'b, 'f>(
            &'a self,
            _prefix: Option<&'b str>,
            _opts: PaginatedListOptions,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = object_store::Result<object_store::list::PaginatedListResult>,
                    > + Send
                    + 'f,
            >,
        >
        where
            'a: 'f,
            'b: 'f,
            Self: 'f,
        {
            let n = self.0.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move {
                Ok(object_store::list::PaginatedListResult {
                    result: object_store::ListResult {
                        common_prefixes: (0..1000)
                            .map(|i| ObjectPath::from(format!("p{n}-{i}")))
                            .collect(),
                        objects: Vec::new(),
                        extensions: Default::default(),
                    },
                    page_token: Some(format!("t{n}")),
                })
            })
        }
    }

    #[test]
    fn an_endless_listing_is_refused_at_the_cap_while_it_is_paged() {
        let endless = Arc::new(Endless(AtomicU64::new(0)));
        let store = Store {
            inner: Arc::new(object_store::memory::InMemory::new()),
            multipart: None,
            paged: Some(endless.clone()),
            rt: tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
            fetched: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        };
        let e = list(&store, "dir", "s3://b/dir/").unwrap_err();
        assert!(e.to_string().contains("more than 100000 objects"), "{e}");
        // refused on the first page past the cap, not after collecting more
        let pages = endless.0.load(Ordering::Relaxed);
        assert_eq!(pages as usize, MAX_LISTED / 1000 + 1);
        let e = list_all(&store, "dir", "s3://b/dir/").unwrap_err();
        assert!(e.to_string().contains("more than 100000 objects"), "{e}");
    }

    #[test]
    fn side_files_are_small_kinds_only() {
        assert!(is_side_file("config.json"));
        assert!(is_side_file("tokenizer.model"));
        assert!(!is_side_file("model.safetensors"));
        assert!(!is_side_file("pytorch_model.bin"));
        assert!(!is_side_file(".hidden.json"));
    }
}

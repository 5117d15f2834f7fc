//! The one public error type of the crate.
//!
//! Every fallible operation returns [`Error`], a boxed [`ErrorKind`] plus a
//! [`Location`] that says where the problem is: which file, which shard,
//! which tensor and which byte offset, as far as they are known.

use std::fmt;
use std::path::{Path, PathBuf};

/// A specialised `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where an error happened. Every field is optional; the `Display` of
/// [`Error`] prints the ones that are known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Location {
    /// The file being read or written.
    pub file: Option<PathBuf>,
    /// The shard index inside a container.
    pub shard: Option<u32>,
    /// The layer (module path), e.g. `transformer_blocks.0.attn.to_q`.
    pub layer: Option<String>,
    /// The stored tensor key, e.g. `x.weight._data`.
    pub tensor: Option<String>,
    /// The absolute byte offset in the file.
    pub offset: Option<u64>,
}

/// What went wrong.
#[derive(Debug)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An operating-system I/O error.
    Io(std::io::Error),
    /// The file does not start with the container magic.
    BadMagic,
    /// The container's major version is not one this reader knows.
    UnsupportedVersion {
        /// Major version found in the file.
        major: u16,
        /// Minor version found in the file.
        minor: u16,
    },
    /// The file ends before a structure it declares.
    Truncated {
        /// What was being read.
        what: &'static str,
        /// How many bytes were needed (end offset).
        needed: u64,
        /// How many bytes the file has.
        available: u64,
    },
    /// A declared size or count exceeds a documented limit.
    LimitExceeded {
        /// The limit's name, as in the spec.
        what: &'static str,
        /// The declared value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// Arithmetic on declared sizes, shapes or offsets overflows.
    Overflow {
        /// What was being computed.
        what: &'static str,
    },
    /// The file breaks a structural rule of the format (offsets, padding,
    /// ordering, cross-references). The message names the rule.
    Malformed(String),
    /// The manifest could not be decoded.
    ManifestDecode(String),
    /// A stored hash does not match the bytes.
    HashMismatch {
        /// What was hashed (manifest, shard header, tensor).
        what: String,
        /// The hash recorded in the file (hex).
        expected: String,
        /// The hash of the bytes found (hex).
        actual: String,
    },
    /// A safetensors header or file is invalid.
    Safetensors(String),
    /// A compressed chunk could not be decoded.
    Decompress(String),
    /// A tensor, layer or shard was asked for and does not exist.
    NotFound(String),
    /// The dtype is not supported by this operation.
    UnsupportedDtype(String),
    /// The input is valid but this operation cannot be done on it.
    Unsupported(String),
    /// A GGUF tensor is stored in a ggml type ckptkit does not read (the
    /// IQ, TQ and FP4 types, Q8_1, Q8_K); the location names the tensor.
    UnsupportedGgufType {
        /// gguf-py's name of the type (`IQ2_XXS`).
        ggml_type: String,
        /// Its id.
        id: u32,
    },
    /// The layout of a layer is inconsistent (wrong shapes, missing parts,
    /// a quantization map that disagrees with the tensors).
    Layout(String),
    /// Layers whose layout cannot be determined from the input alone; the
    /// message says which hint resolves them.
    Ambiguous(String),
    /// A JSON side file (index, qmap, config, descriptor) is invalid.
    Json(String),
    /// The caller used the API wrongly (e.g. wrote tensors out of plan order).
    Usage(String),
    /// The output exists and overwriting was not allowed.
    OutputExists(PathBuf),
    /// The operation was interrupted (Ctrl-C); no output was left behind.
    Interrupted,
    /// The file is part of a ckptkit commit that was interrupted after it
    /// became durable (a weights file and its companions); reading it now
    /// could pair it with stale companions. `migrate recover` completes it.
    PendingCommit {
        /// The commit journal beside the file.
        journal: PathBuf,
    },
    /// A path is not the kind of file system object the operation reads or
    /// writes (a FIFO, a device, a socket, a directory where a file is
    /// expected, or the reverse). Judged after following symlinks.
    FileType {
        /// What was found, in words ("a FIFO (named pipe)").
        found: &'static str,
        /// What is expected ("a regular file").
        expected: &'static str,
    },
    /// Another ckptkit process holds the lock of an output (or of a side
    /// file such as `quanto_qmap.json`) this operation would write.
    Busy {
        /// The lock file.
        lock: PathBuf,
    },
    /// `--force` would replace a directory that holds entries ckptkit did not
    /// write there (no `.ckptkit-output.json` record lists them).
    ForeignEntries {
        /// The directory.
        dir: PathBuf,
        /// Up to five of the foreign entries (relative paths).
        entries: Vec<String>,
        /// How many foreign entries there are in all.
        total: usize,
    },
    /// A layer looks quantized in a layout ckptkit does not know (an 8-bit or
    /// packed weight beside scale-like tensors or a marker, or named by a
    /// `quantization_config` it cannot read); converting it as plain would
    /// produce garbage. The message names the layer and the tensors.
    UnknownQuantized(String),
    /// A Hugging Face index file (`*.safetensors.index.json`) is invalid or
    /// disagrees with the files it names.
    Index(String),
    /// A ckptkit commit journal is invalid or not ours to complete.
    Journal(String),
    /// A job of a planned conversion cannot run or finish: the plan file
    /// is another version's or not a plan, the input changed since the
    /// plan, a job's record does not match its file, jobs are not done.
    Job(String),
    /// A remote input (`s3://`, `gs://`, `az://`, `http(s)://`) cannot be
    /// read: the store's error after its retries, an object that changed
    /// while it was read, a URL or kind ckptkit cannot read remotely.
    Remote(String),
    /// The output would replace or remove a file that belongs to something
    /// else (another model's `quanto_qmap.json`).
    Conflict(String),
    /// A conversion to an explicit target layout would change no layer
    /// (the selection matched nothing, or every layer already has it);
    /// nothing was written.
    NothingChanged(String),
    /// A layer is in a layout family this version of ckptkit does not know
    /// (a container 2.0 family record): it can be verified, inspected and
    /// copied into another container byte for byte, not converted.
    UnknownFamily {
        /// The family's name as recorded.
        family: String,
        /// What was asked of it (`dequantize it`, `write it outside a
        /// container ...`).
        doing: String,
    },
    /// A re-layout between two integer layouts cannot be undone byte for
    /// byte on this layer's data (integers outside the target's range, a
    /// scale that rounds), and lossy re-layouts were not allowed
    /// (`PlanOptions::allow_lossy`, `--allow-lossy`).
    LossyRelayout {
        /// Integers that would be clamped into the target range.
        clamped: u64,
        /// The target range.
        range: [i64; 2],
        /// Whether the scale converts exactly.
        scale_exact: bool,
        /// Largest absolute error of a dequantized value.
        max_abs_error: f64,
        /// The same, in units of the target's scale.
        max_error_in_scales: f64,
    },
}

/// The error type of every ckptkit operation.
///
/// It carries an [`ErrorKind`] and a [`Location`]; both are boxed so that
/// `Result<T>` stays small.
pub struct Error(Box<Inner>);

struct Inner {
    kind: ErrorKind,
    loc: Location,
    /// The error this one reports (a JSON parser's, a decoder's).
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// Creates an error of the given kind with no location.
    pub fn new(kind: ErrorKind) -> Self {
        Error(Box::new(Inner {
            kind,
            loc: Location::default(),
            source: None,
        }))
    }

    /// Keeps the error this one reports, for
    /// [`source`](std::error::Error::source).
    pub fn with_source(mut self, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.0.source = Some(Box::new(e));
        self
    }

    /// An [`ErrorKind::Json`] error about `what`, keeping the parser's
    /// error as its source.
    pub(crate) fn json(what: &str, e: serde_json::Error) -> Self {
        Error::new(ErrorKind::Json(format!("{what}: {e}"))).with_source(e)
    }

    /// Shorthand for [`ErrorKind::Malformed`].
    pub fn malformed(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Malformed(msg.into()))
    }

    /// Shorthand for [`ErrorKind::Layout`].
    pub fn layout(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Layout(msg.into()))
    }

    /// Shorthand for [`ErrorKind::Usage`].
    pub fn usage(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Usage(msg.into()))
    }

    /// Shorthand for [`ErrorKind::Overflow`].
    pub fn overflow(what: &'static str) -> Self {
        Self::new(ErrorKind::Overflow { what })
    }

    /// The kind of error.
    pub fn kind(&self) -> &ErrorKind {
        &self.0.kind
    }

    /// Consumes the error, returning its kind.
    pub fn into_kind(self) -> ErrorKind {
        self.0.kind
    }

    /// Where the error happened.
    pub fn location(&self) -> &Location {
        &self.0.loc
    }

    /// Sets the file, unless one is already set.
    pub fn with_file(mut self, p: impl AsRef<Path>) -> Self {
        if self.0.loc.file.is_none() {
            self.0.loc.file = Some(p.as_ref().to_path_buf());
        }
        self
    }

    /// Rewrites the file of the location with `f` (a remote input's local
    /// stand-in shown as its URL).
    #[cfg(feature = "cli")]
    pub(crate) fn map_file(mut self, f: impl Fn(&Path) -> PathBuf) -> Self {
        if let Some(p) = self.0.loc.file.take() {
            self.0.loc.file = Some(f(&p));
        }
        self
    }

    /// Sets the shard index, unless one is already set.
    pub fn with_shard(mut self, s: u32) -> Self {
        self.0.loc.shard.get_or_insert(s);
        self
    }

    /// Sets the layer, unless one is already set.
    pub fn with_layer(mut self, l: impl Into<String>) -> Self {
        if self.0.loc.layer.is_none() {
            self.0.loc.layer = Some(l.into());
        }
        self
    }

    /// Sets the tensor key, unless one is already set.
    pub fn with_tensor(mut self, t: impl Into<String>) -> Self {
        if self.0.loc.tensor.is_none() {
            self.0.loc.tensor = Some(t.into());
        }
        self
    }

    /// Sets the byte offset, unless one is already set.
    pub fn with_offset(mut self, o: u64) -> Self {
        self.0.loc.offset.get_or_insert(o);
        self
    }

    /// Makes the byte offset absolute: adds `base` to it (an error without
    /// one is placed at `base`), keeping the rest of the location.
    pub(crate) fn rebase_offset(mut self, base: u64) -> Self {
        let o = self.0.loc.offset.unwrap_or(0);
        self.0.loc.offset = Some(base.saturating_add(o));
        self
    }

    /// True when this is an I/O error from the operating system.
    pub fn is_io(&self) -> bool {
        matches!(self.0.kind, ErrorKind::Io(_))
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Io(e) => write!(f, "I/O error: {e}"),
            ErrorKind::BadMagic => write!(
                f,
                "not a ckptkit container (bad magic); is this a .safetensors file?"
            ),
            ErrorKind::UnsupportedVersion { major, minor } => write!(
                f,
                "container format version {major}.{minor} is not supported by this reader \
                 (it reads major versions 1 and 2); upgrade ckptkit"
            ),
            ErrorKind::Truncated {
                what,
                needed,
                available,
            } => write!(
                f,
                "file truncated: {what} needs {needed} bytes but the file has {available}"
            ),
            ErrorKind::LimitExceeded { what, value, limit } => {
                write!(f, "{what} is {value}, over the limit of {limit}")
            }
            ErrorKind::Overflow { what } => write!(f, "arithmetic overflow computing {what}"),
            ErrorKind::Malformed(m) => write!(f, "malformed container: {m}"),
            ErrorKind::ManifestDecode(m) => write!(f, "manifest cannot be decoded: {m}"),
            ErrorKind::HashMismatch {
                what,
                expected,
                actual,
            } => write!(
                f,
                "integrity check failed for {what}: recorded blake3 {expected}, found {actual}"
            ),
            ErrorKind::Safetensors(m) => write!(f, "invalid safetensors data: {m}"),
            ErrorKind::Decompress(m) => write!(f, "compressed chunk cannot be decoded: {m}"),
            ErrorKind::NotFound(m) => write!(f, "not found: {m}"),
            ErrorKind::UnsupportedDtype(m) => write!(f, "unsupported dtype: {m}"),
            ErrorKind::Unsupported(m) => write!(f, "unsupported: {m}"),
            ErrorKind::UnsupportedGgufType { ggml_type, id } => write!(
                f,
                "unsupported GGUF tensor type {ggml_type} ({id}): ckptkit reads F32, F16, BF16, \
                 F64, I8-I64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K-Q6_K"
            ),
            ErrorKind::Layout(m) => write!(f, "layout error: {m}"),
            ErrorKind::Ambiguous(m) => write!(f, "ambiguous layout: {m}"),
            ErrorKind::Json(m) => write!(f, "invalid JSON: {m}"),
            ErrorKind::Usage(m) => write!(f, "{m}"),
            ErrorKind::OutputExists(p) => write!(
                f,
                "output {} already exists; pass --force to replace it",
                p.display()
            ),
            ErrorKind::Interrupted => write!(f, "interrupted; no output was written"),
            ErrorKind::PendingCommit { journal } => write!(
                f,
                "an interrupted ckptkit commit of this file is pending ({}); \
                 run `migrate recover` on the file to complete it",
                journal.display()
            ),
            ErrorKind::FileType { found, expected } => write!(
                f,
                "is {found}, not {expected}; ckptkit reads and writes only regular files \
                 and directories"
            ),
            ErrorKind::Busy { lock } => write!(
                f,
                "another ckptkit process is writing this output (it holds {}); \
                 wait for it to finish, or write elsewhere",
                lock.display()
            ),
            ErrorKind::ForeignEntries {
                dir,
                entries,
                total,
            } => write!(
                f,
                "--force replaces only a directory that is empty or that ckptkit wrote, and {} \
                 holds {total} entr{} no ckptkit record lists ({}{}); remove them yourself or \
                 choose another output",
                dir.display(),
                if *total == 1 { "y" } else { "ies" },
                entries.join(", "),
                if *total > entries.len() { ", ..." } else { "" }
            ),
            ErrorKind::UnknownQuantized(m) => write!(f, "unknown quantized layout: {m}"),
            ErrorKind::Index(m) => write!(f, "invalid index file: {m}"),
            ErrorKind::Journal(m) => write!(f, "commit journal: {m}"),
            ErrorKind::Conflict(m) => write!(f, "{m}"),
            ErrorKind::Job(m) => write!(f, "{m}"),
            ErrorKind::Remote(m) => write!(f, "{m}"),
            ErrorKind::NothingChanged(m) => write!(f, "{m}; nothing was written"),
            ErrorKind::UnknownFamily { family, doing } => write!(
                f,
                "layout family `{family}` is not known to this version of ckptkit, which cannot \
                 {doing} (it can verify and inspect such a layer, and copy it into another \
                 container byte for byte); upgrade ckptkit"
            ),
            ErrorKind::LossyRelayout {
                clamped,
                range,
                scale_exact,
                max_abs_error,
                max_error_in_scales,
            } => write!(
                f,
                "re-layout cannot be undone byte for byte ({clamped} integers outside [{}, {}], \
                 scale {}): max abs error {max_abs_error:.3e}, {max_error_in_scales:.3} scale \
                 units; pass --allow-lossy to accept",
                range[0],
                range[1],
                if *scale_exact { "exact" } else { "rounded" },
            ),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.0.loc;
        let mut parts = Vec::new();
        if let Some(p) = &l.file {
            parts.push(p.display().to_string());
        }
        if let Some(s) = l.shard {
            parts.push(format!("shard {s}"));
        }
        if let Some(s) = &l.layer {
            parts.push(format!("layer `{s}`"));
        }
        if let Some(s) = &l.tensor {
            parts.push(format!("tensor `{s}`"));
        }
        if let Some(o) = l.offset {
            parts.push(format!("byte {o}"));
        }
        if parts.is_empty() {
            write!(f, "{}", self.0.kind)
        } else {
            write!(f, "{}: {}", parts.join(", "), self.0.kind)
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error({:?}, {:?})", self.0.kind, self.0.loc)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.0.kind {
            ErrorKind::Io(e) => Some(e),
            _ => self
                .0
                .source
                .as_deref()
                .map(|e| e as &(dyn std::error::Error + 'static)),
        }
    }
}

impl From<ErrorKind> for Error {
    fn from(k: ErrorKind) -> Self {
        Error::new(k)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::new(ErrorKind::Io(e))
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        match e.0.kind {
            ErrorKind::Io(io) => io,
            _ => std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        }
    }
}

/// Hex rendering of a hash for messages.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

//! The manifest: the schema and integrity record of a container.
//!
//! These types are encoded with bincode 2.0.1 (`config::standard()`:
//! little-endian, variable-length integers); spec/container.md §5 gives the
//! byte-level encoding field by field. Field order here *is* the encoding:
//! never reorder fields or enum variants; later minor versions add
//! information through [`Extension`] records.
//!
//! Every `String`, `Vec` and map field is decoded through
//! `format::bounded` (`deserialize_with`), which checks its declared length
//! against the limits before allocating it (spec/container.md §5.1); a new
//! field of such a type needs the same attribute. Serialization is the
//! derived one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::dtype::Dtype;

/// A 32-byte blake3 digest.
pub type Hash = [u8; 32];

/// Format version (major.minor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// Incompatible changes bump the major version.
    pub major: u16,
    /// Compatible additions (new extensions) bump the minor version.
    pub minor: u16,
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Must equal the version in the fixed header.
    pub version: Version,
    /// Free-form user metadata (training step, source, notes...).
    #[serde(deserialize_with = "crate::format::bounded::metadata")]
    pub metadata: BTreeMap<String, String>,
    /// Which tool wrote the container and from what.
    pub provenance: Provenance,
    /// The shard table, in file order.
    #[serde(deserialize_with = "crate::format::bounded::shards")]
    pub shards: Vec<Shard>,
    /// The layer table: how stored tensors make up the model's layers.
    #[serde(deserialize_with = "crate::format::bounded::layers")]
    pub layers: Vec<Layer>,
    /// Named extension sections (see [`Extension`]).
    #[serde(deserialize_with = "crate::format::bounded::extensions")]
    pub extensions: Vec<Extension>,
}

/// Where a container came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// Tool name, e.g. `ckptkit`.
    #[serde(deserialize_with = "crate::format::bounded::string")]
    pub tool: String,
    /// Tool version, e.g. `0.1.0`.
    #[serde(deserialize_with = "crate::format::bounded::string")]
    pub tool_version: String,
    /// The source files the container was made from.
    #[serde(deserialize_with = "crate::format::bounded::sources")]
    pub sources: Vec<SourceFile>,
}

/// One source file of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Path as given to the tool (informational).
    #[serde(deserialize_with = "crate::format::bounded::string")]
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// blake3 of the whole file, when it was computed.
    pub blake3: Option<Hash>,
}

/// How a shard's tensor data is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// The shard is stored verbatim: it is a complete safetensors file.
    None,
    /// Each tensor's bytes are cut into chunks of `chunk_size` raw bytes
    /// (the last chunk of a tensor may be shorter), each stored raw or as an
    /// independent zstd frame.
    Zstd {
        /// Raw bytes per chunk; a multiple of 8 between
        /// `MIN_CHUNK_SIZE` and
        /// `MAX_CHUNK_SIZE`.
        chunk_size: u32,
    },
}

/// One shard: a safetensors blob inside the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// The file name this shard has when extracted
    /// (e.g. `model-00001-of-00002.safetensors`).
    #[serde(deserialize_with = "crate::format::bounded::string")]
    pub name: String,
    /// Absolute offset of the shard's first byte in the container.
    pub offset: u64,
    /// Bytes the shard occupies in the container.
    pub stored_len: u64,
    /// Bytes of the safetensors header: 8 + N.
    pub header_len: u64,
    /// blake3 of those `header_len` bytes.
    pub header_blake3: Hash,
    /// Compression of the tensor data.
    pub compression: Compression,
    /// The shard's tensors, in safetensors data order.
    #[serde(deserialize_with = "crate::format::bounded::stored_tensors")]
    pub tensors: Vec<StoredTensor>,
}

/// How one stored tensor's chunks are encoded (compressed shards only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    /// Uncompressed shard: the bytes are in place.
    Plain,
    /// Each chunk is raw (stored length = raw length) or one zstd frame.
    Zstd,
    /// Each chunk is float-filtered into byte planes, and each plane is
    /// stored raw or as one zstd frame (spec/container.md §4.3).
    ZstdFloatPlanes,
}

/// A tensor as stored in a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTensor {
    /// Key in the shard's safetensors header.
    #[serde(deserialize_with = "crate::format::bounded::tensor_name")]
    pub key: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (rank at most [`MAX_RANK`](crate::format::MAX_RANK)).
    #[serde(deserialize_with = "crate::format::bounded::shape")]
    pub shape: Vec<u64>,
    /// blake3 of the tensor's raw (uncompressed) bytes.
    pub blake3: Hash,
    /// Encoding of the chunks.
    pub codec: Codec,
    /// Stored length of each chunk; empty for [`Codec::Plain`].
    #[serde(deserialize_with = "crate::format::bounded::chunks")]
    pub chunks: Vec<u32>,
}

/// The weight quantization of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WeightQuant {
    /// Not quantized.
    Plain,
    /// optimum-quanto: `qtype` is quanto's name (`qint8`, `qint4`, ...).
    Quanto {
        /// Weight qtype name as quanto writes it in its map.
        #[serde(deserialize_with = "crate::format::bounded::string")]
        qtype: String,
        /// Group size along the flattened weight, `None` = per output row.
        group_size: Option<u64>,
    },
    /// An int8 layout: a preset name (`int8`, `int8:bnb`, ...) or a
    /// descriptor.
    Int8 {
        /// The preset's canonical name, or the user descriptor's name
        /// (never in the reserved namespace, spec/layouts.md §3.3).
        #[serde(deserialize_with = "crate::format::bounded::string")]
        layout: String,
        /// The descriptor as canonical JSON (empty for built-in presets).
        #[serde(deserialize_with = "crate::format::bounded::string")]
        descriptor: String,
    },
    /// Container 2.0: a layout family by name, with its parameters
    /// (spec/container.md §5.2). The families that have a variant of their
    /// own (plain, quanto, int8) are always written with it.
    Family {
        /// The family's name (`fp8`, `gguf`, ...): 1 to 64 bytes of
        /// `[a-z0-9_.-]`.
        #[serde(deserialize_with = "crate::format::bounded::string")]
        name: String,
        /// The parameters, keys strictly ascending (byte order), each value
        /// in the family's canonical spelling.
        #[serde(deserialize_with = "crate::format::bounded::params")]
        params: Vec<Param>,
    },
}

/// One parameter of a [`WeightQuant::Family`] record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Param {
    /// The parameter's name: 1 to 64 bytes of `[a-z0-9_.-]`.
    #[serde(deserialize_with = "crate::format::bounded::string")]
    pub key: String,
    /// Its value, as the family spells it canonically (`128`, `F32`,
    /// `e4m3fn`); at most [`MAX_NAME_LEN`](crate::format::MAX_NAME_LEN)
    /// bytes.
    #[serde(deserialize_with = "crate::format::bounded::string")]
    pub value: String,
}

impl WeightQuant {
    /// The container version a record needs: 2 for a
    /// [`Family`](WeightQuant::Family) record, else 1.
    pub fn needs_major(&self) -> u16 {
        match self {
            WeightQuant::Family { .. } => 2,
            _ => 1,
        }
    }
}

/// The quantization record of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quantization {
    /// How the weights are stored.
    pub weights: WeightQuant,
    /// Activation qtype name (quanto), or `None`.
    #[serde(deserialize_with = "crate::format::bounded::opt_string")]
    pub activations: Option<String>,
}

/// The role of a stored part within a logical tensor.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// The values themselves (plain tensor or quantized payload).
    Data,
    /// A scale.
    Scale,
    /// A float shift (quanto `_shift`).
    Shift,
    /// An integer zero point.
    ZeroPoint,
    /// Any other constant tensor a layout needs, by name.
    Other(#[serde(deserialize_with = "crate::format::bounded::string")] String),
}

/// How a logical tensor is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encoding {
    /// One `Data` part that is the tensor itself.
    Plain,
    /// Parts combined by the layer's [`WeightQuant`].
    Quantized,
    /// Container 2.0: parts combined by the layer's [`WeightQuant`], the
    /// model's shape not recorded (the stored tensors do not tell it, as
    /// for a grouped quanto qint4 weight without a bias): `shape` is the
    /// element count alone, `[n]`. Converting such a tensor into a layout
    /// that needs its shape takes a shape from elsewhere
    /// (`--shapes-from`).
    QuantizedFlat,
}

impl Encoding {
    /// Whether the tensor is made of its layer's quantized parts.
    pub fn is_quantized(self) -> bool {
        !matches!(self, Encoding::Plain)
    }
}

/// A stored tensor that makes up (part of) a logical tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// What this part is.
    pub role: Role,
    /// Index into [`Manifest::shards`].
    pub shard: u32,
    /// Key inside that shard.
    #[serde(deserialize_with = "crate::format::bounded::string")]
    pub key: String,
    /// Stored dtype (must match the shard table).
    pub dtype: Dtype,
    /// Stored shape (must match the shard table).
    #[serde(deserialize_with = "crate::format::bounded::shape")]
    pub shape: Vec<u64>,
    /// blake3 of the stored bytes (must match the shard table).
    pub blake3: Hash,
}

/// A model parameter or buffer (`weight`, `bias`, `input_scale`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogicalTensor {
    /// Name relative to the layer.
    #[serde(deserialize_with = "crate::format::bounded::tensor_name")]
    pub name: String,
    /// The dtype the model sees.
    pub dtype: Dtype,
    /// The shape the model sees.
    #[serde(deserialize_with = "crate::format::bounded::shape")]
    pub shape: Vec<u64>,
    /// How it is encoded.
    pub encoding: Encoding,
    /// Its stored parts.
    #[serde(deserialize_with = "crate::format::bounded::parts")]
    pub parts: Vec<Part>,
}

/// A layer: a module path with its logical tensors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// The module path (`transformer_blocks.0.attn.to_q`); empty for
    /// top-level tensors.
    #[serde(deserialize_with = "crate::format::bounded::layer_path")]
    pub path: String,
    /// Quantization record.
    pub quant: Quantization,
    /// Logical tensors.
    #[serde(deserialize_with = "crate::format::bounded::logical_tensors")]
    pub tensors: Vec<LogicalTensor>,
    /// Per-layer extensions.
    #[serde(deserialize_with = "crate::format::bounded::extensions")]
    pub extensions: Vec<Extension>,
}

/// A named extension section. Readers skip unknown extensions unless
/// `critical` is set, in which case they refuse the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extension {
    /// Reverse-DNS-style name, e.g. `ckptkit.example`.
    #[serde(deserialize_with = "crate::format::bounded::string")]
    pub name: String,
    /// A reader that does not know this extension must refuse the file.
    pub critical: bool,
    /// Opaque payload.
    #[serde(deserialize_with = "crate::format::bounded::bytes")]
    pub data: Vec<u8>,
}

impl Layer {
    /// Iterates over every stored part of every logical tensor.
    pub fn parts(&self) -> impl Iterator<Item = &Part> {
        self.tensors.iter().flat_map(|t| t.parts.iter())
    }

    /// The container major version this layer needs: 2 when its record is
    /// a [`WeightQuant::Family`] or a tensor's shape is not recorded
    /// ([`Encoding::QuantizedFlat`]), else 1.
    pub fn needs_major(&self) -> u16 {
        let flat = self
            .tensors
            .iter()
            .any(|t| t.encoding == Encoding::QuantizedFlat);
        self.quant
            .weights
            .needs_major()
            .max(if flat { 2 } else { 1 })
    }
}

impl Manifest {
    /// The lowest container major version that can hold these layers (1
    /// whenever every layer is plain, quanto or int8 with recorded shapes,
    /// so that 1.x readers keep reading what ckptkit writes).
    pub fn needs_major(layers: &[Layer]) -> u16 {
        layers.iter().map(Layer::needs_major).max().unwrap_or(1)
    }
}

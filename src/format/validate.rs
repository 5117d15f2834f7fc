//! Structural validation of a decoded manifest against the file it came
//! from (spec/container.md §6). Pure: works on the manifest and the numbers
//! from the fixed header.

use std::collections::{HashMap, HashSet};

use crate::dtype::byte_len;
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::FixedHeader;
use crate::format::manifest::{Codec, Compression, Encoding, Manifest, Role, WeightQuant};
use crate::format::{
    align_up, HEADER_LEN, MANIFEST_ALIGN, MAX_CHUNK_SIZE, MAX_LAYERS, MAX_METADATA_ENTRIES,
    MAX_NAME_LEN, MAX_PARTS, MAX_RANK, MAX_SHARDS, MAX_TENSORS, MIN_CHUNK_SIZE, SHARD_ALIGN,
};

/// One stored chunk: absolute position and sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLoc {
    /// Absolute offset in the container.
    pub offset: u64,
    /// Stored bytes.
    pub stored_len: u64,
    /// Raw bytes it decodes to.
    pub raw_len: u64,
}

/// Where a stored tensor's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorLoc {
    /// Uncompressed: `len` bytes at absolute `offset`.
    Plain {
        /// Absolute offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// Compressed: the chunks in order.
    Chunked {
        /// Codec of the chunks.
        codec: Codec,
        /// The chunks.
        chunks: Vec<ChunkLoc>,
        /// Total raw length.
        len: u64,
    },
}

/// Positions derived from a validated manifest.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Per shard, per tensor (in shard-table order).
    pub tensors: Vec<Vec<TensorLoc>>,
    /// Per shard, key → index into its tensor table.
    pub index: Vec<HashMap<String, usize>>,
}

fn limit(what: &'static str, value: u64, limit: u64) -> Error {
    Error::new(ErrorKind::LimitExceeded { what, value, limit })
}

fn name_ok(what: &'static str, s: &str) -> Result<()> {
    if s.len() > MAX_NAME_LEN {
        return Err(limit(what, s.len() as u64, MAX_NAME_LEN as u64));
    }
    Ok(())
}

/// Checks that a shard name is a plain file name (no path separators,
/// not `.`/`..`, no NUL), since extraction writes it as a file.
pub fn safe_file_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\', '\0'])
}

/// Validates a manifest (rules V1–V11) and derives tensor positions.
pub fn validate(m: &Manifest, h: &FixedHeader) -> Result<Placement> {
    // V1 version
    if m.version != h.version {
        return Err(Error::malformed(format!(
            "manifest version {}.{} differs from header version {}.{}",
            m.version.major, m.version.minor, h.version.major, h.version.minor
        )));
    }
    // V2 counts
    if m.shards.len() as u64 > MAX_SHARDS {
        return Err(limit("shard count", m.shards.len() as u64, MAX_SHARDS));
    }
    if m.layers.len() as u64 > MAX_LAYERS {
        return Err(limit("layer count", m.layers.len() as u64, MAX_LAYERS));
    }
    if m.metadata.len() > MAX_METADATA_ENTRIES {
        return Err(limit(
            "metadata entries",
            m.metadata.len() as u64,
            MAX_METADATA_ENTRIES as u64,
        ));
    }
    let total: u64 = m.shards.iter().map(|s| s.tensors.len() as u64).sum();
    if total > MAX_TENSORS {
        return Err(limit("stored tensor count", total, MAX_TENSORS));
    }
    // V10 extensions
    check_extensions(&m.extensions)?;

    let mut placement = Placement {
        tensors: Vec::with_capacity(m.shards.len()),
        index: Vec::with_capacity(m.shards.len()),
    };
    let mut pos = HEADER_LEN;
    let mut names = HashSet::new();
    for (si, s) in m.shards.iter().enumerate() {
        let si32 = si as u32;
        let err_at = |e: Error| e.with_shard(si32);
        // V4 names
        name_ok("shard name length", &s.name).map_err(err_at)?;
        if !safe_file_name(&s.name) {
            return Err(err_at(Error::malformed(format!(
                "shard name `{}` is not a plain file name",
                s.name
            ))));
        }
        if !names.insert(s.name.as_str()) {
            return Err(err_at(Error::malformed(format!(
                "duplicate shard name `{}`",
                s.name
            ))));
        }
        // V3 placement
        let want = align_up(pos, SHARD_ALIGN).ok_or_else(|| Error::overflow("shard offset"))?;
        if s.offset != want {
            return Err(err_at(Error::malformed(format!(
                "shard offset is {} but must be {want} (previous end {pos} aligned to {SHARD_ALIGN})",
                s.offset
            )))
            .with_offset(s.offset));
        }
        if s.header_len < 16 || s.header_len > s.stored_len {
            return Err(err_at(Error::malformed(format!(
                "shard header length {} must be >= 16 and <= the stored length {}",
                s.header_len, s.stored_len
            ))));
        }
        let end = s
            .offset
            .checked_add(s.stored_len)
            .ok_or_else(|| err_at(Error::overflow("shard end")))?;
        if end > h.manifest_offset {
            return Err(err_at(Error::malformed(format!(
                "shard [{}, {end}) overlaps the manifest at {}",
                s.offset, h.manifest_offset
            ))));
        }
        // V5/V6 tensors
        let mut locs = Vec::with_capacity(s.tensors.len());
        let mut idx = HashMap::with_capacity(s.tensors.len());
        let mut cur = s
            .offset
            .checked_add(s.header_len)
            .ok_or_else(|| err_at(Error::overflow("shard data start")))?;
        let chunk_size = match s.compression {
            Compression::None => None,
            Compression::Zstd { chunk_size } => {
                if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) || chunk_size % 8 != 0 {
                    return Err(err_at(Error::malformed(format!(
                        "chunk size {chunk_size} must be a multiple of 8 in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
                    ))));
                }
                Some(chunk_size as u64)
            }
        };
        for (ti, t) in s.tensors.iter().enumerate() {
            let terr = |e: Error| e.with_shard(si32).with_tensor(t.key.clone());
            name_ok("tensor key length", &t.key).map_err(terr)?;
            if idx.insert(t.key.clone(), ti).is_some() {
                return Err(terr(Error::malformed("duplicate tensor key in shard")));
            }
            if t.shape.len() > MAX_RANK {
                return Err(terr(limit(
                    "tensor rank",
                    t.shape.len() as u64,
                    MAX_RANK as u64,
                )));
            }
            let len = byte_len(t.dtype, &t.shape).map_err(terr)?;
            match chunk_size {
                None => {
                    if t.codec != Codec::Plain || !t.chunks.is_empty() {
                        return Err(terr(Error::malformed(
                            "tensors of an uncompressed shard must have codec Plain and no chunks",
                        )));
                    }
                    locs.push(TensorLoc::Plain { offset: cur, len });
                    cur = cur
                        .checked_add(len)
                        .ok_or_else(|| terr(Error::overflow("tensor end")))?;
                }
                Some(cs) => {
                    let planes = match t.codec {
                        Codec::Zstd => 0u64,
                        Codec::ZstdFloatPlanes if t.dtype.is_filterable_float() => {
                            t.dtype.size() as u64
                        }
                        _ => {
                            return Err(terr(Error::malformed(format!(
                                "codec {:?} is not valid for a {} tensor in a compressed shard",
                                t.codec, t.dtype
                            ))))
                        }
                    };
                    let want = len.div_ceil(cs);
                    if t.chunks.len() as u64 != want {
                        return Err(terr(Error::malformed(format!(
                            "{} chunks recorded, {want} needed for {len} bytes in chunks of {cs}",
                            t.chunks.len()
                        ))));
                    }
                    let mut chunks = Vec::with_capacity(t.chunks.len());
                    let mut left = len;
                    for &c in &t.chunks {
                        let raw = left.min(cs);
                        left -= raw;
                        let c = c as u64;
                        let max = raw + 4 * planes;
                        if c > max || c == 0 {
                            return Err(terr(Error::malformed(format!(
                                "stored chunk of {c} bytes for {raw} raw bytes (allowed 1..={max})"
                            ))));
                        }
                        chunks.push(ChunkLoc {
                            offset: cur,
                            stored_len: c,
                            raw_len: raw,
                        });
                        cur = cur
                            .checked_add(c)
                            .ok_or_else(|| terr(Error::overflow("chunk end")))?;
                    }
                    locs.push(TensorLoc::Chunked {
                        codec: t.codec,
                        chunks,
                        len,
                    });
                }
            }
        }
        if cur != end {
            return Err(err_at(Error::malformed(format!(
                "shard stored length {} does not equal its header plus tensor data ({})",
                s.stored_len,
                cur.saturating_sub(s.offset)
            ))));
        }
        placement.tensors.push(locs);
        placement.index.push(idx);
        pos = end;
    }
    let want = if m.shards.is_empty() {
        HEADER_LEN
    } else {
        align_up(pos, MANIFEST_ALIGN).ok_or_else(|| Error::overflow("manifest offset"))?
    };
    if h.manifest_offset != want {
        return Err(Error::malformed(format!(
            "manifest offset is {} but must be {want}",
            h.manifest_offset
        ))
        .with_offset(16));
    }

    // V7–V9 layers
    let mut used: Vec<Vec<bool>> = m
        .shards
        .iter()
        .map(|s| vec![false; s.tensors.len()])
        .collect();
    let mut paths = HashSet::new();
    for l in &m.layers {
        let lerr = |e: Error| e.with_layer(l.path.clone());
        name_ok("layer path length", &l.path).map_err(lerr)?;
        if !paths.insert(l.path.as_str()) {
            return Err(lerr(Error::malformed("duplicate layer path")));
        }
        check_extensions(&l.extensions).map_err(lerr)?;
        // V9 the record's form (its meaning is its family's: spec §6)
        check_record_form(&l.quant).map_err(lerr)?;
        // V11 what only 2.0 may hold
        if l.needs_major() > m.version.major {
            return Err(lerr(Error::malformed(format!(
                "the layer needs container format 2.0 (a family record or a tensor without \
                 a recorded shape), but the container says {}.{}",
                m.version.major, m.version.minor
            ))));
        }
        let mut tnames = HashSet::new();
        for t in &l.tensors {
            let lerr = |e: Error| e.with_layer(l.path.clone()).with_tensor(t.name.clone());
            name_ok("logical tensor name length", &t.name).map_err(lerr)?;
            if !tnames.insert(t.name.as_str()) {
                return Err(lerr(Error::malformed(
                    "duplicate logical tensor name in layer",
                )));
            }
            if t.shape.len() > MAX_RANK {
                return Err(lerr(limit(
                    "tensor rank",
                    t.shape.len() as u64,
                    MAX_RANK as u64,
                )));
            }
            byte_len(t.dtype, &t.shape).map_err(lerr)?;
            if t.parts.is_empty() || t.parts.len() as u64 > MAX_PARTS {
                return Err(lerr(Error::malformed(format!(
                    "{} parts (1..={MAX_PARTS} allowed)",
                    t.parts.len()
                ))));
            }
            let mut roles = HashSet::new();
            for p in &t.parts {
                let s = m.shards.get(p.shard as usize).ok_or_else(|| {
                    lerr(Error::malformed(format!(
                        "part `{}` names shard {} of {}",
                        p.key,
                        p.shard,
                        m.shards.len()
                    )))
                })?;
                crate::format::lookups::add(1);
                let ti = *placement.index[p.shard as usize]
                    .get(&p.key)
                    .ok_or_else(|| {
                        lerr(Error::malformed(format!(
                            "part `{}` is not in shard {}",
                            p.key, p.shard
                        )))
                    })?;
                let st = &s.tensors[ti];
                if st.dtype != p.dtype || st.shape != p.shape || st.blake3 != p.blake3 {
                    return Err(lerr(Error::malformed(format!(
                        "part `{}` disagrees with the shard table (dtype, shape or hash)",
                        p.key
                    ))));
                }
                let u = &mut used[p.shard as usize][ti];
                if *u {
                    return Err(lerr(Error::malformed(format!(
                        "stored tensor `{}` is used by more than one part",
                        p.key
                    ))));
                }
                *u = true;
                if !roles.insert(&p.role) {
                    return Err(lerr(Error::malformed(format!("role {:?} twice", p.role))));
                }
            }
            if t.encoding == Encoding::QuantizedFlat && t.shape.len() != 1 {
                return Err(lerr(Error::malformed(format!(
                    "a tensor without a recorded shape has shape [element count], not {:?}",
                    t.shape
                ))));
            }
            if t.encoding.is_quantized() && l.quant.weights == WeightQuant::Plain {
                return Err(lerr(Error::malformed(
                    "a quantized tensor in a layer whose record is plain",
                )));
            }
            if t.encoding == Encoding::Plain {
                let p = &t.parts[0];
                if t.parts.len() != 1
                    || p.role != Role::Data
                    || p.dtype != t.dtype
                    || p.shape != t.shape
                {
                    return Err(lerr(Error::malformed(
                        "a plain tensor must have exactly one Data part of its own dtype and shape",
                    )));
                }
            }
        }
    }
    for (si, u) in used.iter().enumerate() {
        if let Some(ti) = u.iter().position(|x| !x) {
            return Err(Error::malformed(format!(
                "stored tensor `{}` belongs to no layer",
                m.shards[si].tensors[ti].key
            ))
            .with_shard(si as u32));
        }
    }
    Ok(placement)
}

/// Longest family name or parameter key (bytes).
pub const MAX_FAMILY_NAME_LEN: usize = 64;

/// Family names that have a record variant of their own, and so are never
/// written as a [`WeightQuant::Family`] record (one encoding per content).
pub const OWN_VARIANT_FAMILIES: [&str; 3] = ["plain", "quanto", "int8"];

/// Whether `s` is a family name or parameter key: 1 to 64 bytes of
/// `[a-z0-9_.-]`, starting with a letter.
pub fn family_word(s: &str) -> bool {
    s.len() <= MAX_FAMILY_NAME_LEN
        && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

/// V9: the form of a layer's quantization record, which the format fixes
/// whatever the family: a [`WeightQuant::Family`] record is a family name
/// other than those with a variant of their own, with parameters whose
/// keys are strictly ascending; names are bounded. What the record means
/// (a known quanto qtype, a valid int8 descriptor, a family this reader
/// knows) is the family's to check, when the layer is read for a
/// conversion, an inspection or `verify` (spec/container.md §6, V9).
fn check_record_form(q: &crate::format::manifest::Quantization) -> Result<()> {
    match &q.weights {
        WeightQuant::Plain => {}
        WeightQuant::Quanto { qtype, group_size } => {
            name_ok("quanto qtype length", qtype)?;
            if *group_size == Some(0) {
                return Err(Error::malformed("group size 0"));
            }
        }
        WeightQuant::Int8 { layout, .. } => {
            name_ok("int8 layout name length", layout)?;
        }
        WeightQuant::Family { name, params } => {
            if !family_word(name) {
                return Err(Error::malformed(format!(
                    "family name `{}` is not 1 to {MAX_FAMILY_NAME_LEN} bytes of [a-z0-9_.-] \
                     starting with a letter",
                    name.escape_debug()
                )));
            }
            if OWN_VARIANT_FAMILIES.contains(&name.as_str()) {
                return Err(Error::malformed(format!(
                    "a `{name}` layer is recorded with its own record variant, never as a \
                     family record"
                )));
            }
            if params.len() as u64 > crate::format::MAX_PARAMS {
                return Err(limit(
                    "parameters per record",
                    params.len() as u64,
                    crate::format::MAX_PARAMS,
                ));
            }
            for p in params {
                if !family_word(&p.key) {
                    return Err(Error::malformed(format!(
                        "parameter key `{}` of family `{name}` is not 1 to \
                         {MAX_FAMILY_NAME_LEN} bytes of [a-z0-9_.-] starting with a letter",
                        p.key.escape_debug()
                    )));
                }
                name_ok("parameter value length", &p.value)?;
            }
            if let Some(w) = params.windows(2).find(|w| w[0].key >= w[1].key) {
                return Err(Error::malformed(format!(
                    "parameters of family `{name}` are not in strictly ascending key order \
                     (`{}` before `{}`)",
                    w[0].key, w[1].key
                )));
            }
        }
    }
    if let Some(a) = &q.activations {
        name_ok("activation qtype length", a)?;
    }
    Ok(())
}

fn check_extensions(exts: &[crate::format::manifest::Extension]) -> Result<()> {
    let mut seen = HashSet::new();
    for e in exts {
        name_ok("extension name length", &e.name)?;
        if !seen.insert(e.name.as_str()) {
            return Err(Error::malformed(format!(
                "duplicate extension `{}`",
                e.name
            )));
        }
        if e.critical {
            return Err(Error::new(ErrorKind::Unsupported(format!(
                "critical extension `{}` is not understood by this reader; upgrade ckptkit",
                e.name
            ))));
        }
    }
    Ok(())
}

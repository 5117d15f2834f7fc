//! Fuzz target bodies, shared by the `cargo fuzz` targets in `fuzz/` and by
//! the replay test `tests/fuzz_regressions.rs`, so the two cannot drift.
//!
//! Every function takes arbitrary bytes and returns `()`. It never panics,
//! whatever the input, unless a property is violated; then it panics with a
//! message that names the property, which is the fuzzer's failure signal.
//! Targets that need structure decode it from the bytes with a small
//! hand-written reader, so plain `cargo test` can replay any saved input
//! without extra features.
//!
//! This module is not part of the stable API.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::dtype::{byte_len, Dtype};
use crate::error::ErrorKind;
use crate::format::filter::{decode_chunk, encode_chunk};
use crate::format::header::FixedHeader;
use crate::format::manifest::Codec;
use crate::format::st_header;
use crate::format::{decode_manifest, encode_manifest, validate, HEADER_LEN, MAGIC};
use crate::io::container::Container;
use crate::io::open::open_source;
use crate::io::safetensors_file::SafetensorsFile;
use crate::io::source::TensorSource;
use crate::io::writer::{ContainerOptions, ContainerWriter, ZstdOptions};

/// Tensors declared larger than this are not read (their size is only
/// declared; reading them could take seconds or gigabytes).
const MAX_READ: u64 = 16 << 20;

/// `verify()` of a whole container is skipped when its tensors declare more
/// raw bytes than this in total (compressed chunks can expand a lot).
const MAX_VERIFY_TOTAL: u64 = 64 << 20;

/// Largest tensor `writer_ops` generates: three 4 KiB chunks, so tensors
/// span several chunks and end with a short one.
const MAX_GEN_TENSOR: u64 = 12 << 10;

// ---------------------------------------------------------------------------
// helpers

/// A file under `std::env::temp_dir()` with a unique name, removed on drop.
struct TempPath(PathBuf);

impl TempPath {
    fn new(tag: &str) -> TempPath {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("ckptkit-fuzz-{}-{n}-{tag}", std::process::id());
        TempPath(std::env::temp_dir().join(name))
    }

    fn write(tag: &str, bytes: &[u8]) -> TempPath {
        let t = TempPath::new(tag);
        if let Err(e) = std::fs::write(&t.0, bytes) {
            // Not a property of the library, but nothing would be tested.
            fuzz_fail(format_args!(
                "fuzz harness: cannot write {}: {e}",
                t.0.display()
            ));
        }
        t
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The one place that panics on purpose: a violated property.
#[allow(clippy::panic)]
#[cold]
#[track_caller]
fn fuzz_fail(msg: std::fmt::Arguments<'_>) -> ! {
    panic!("{msg}")
}

macro_rules! fail {
    ($($t:tt)*) => { fuzz_fail(format_args!($($t)*)) };
}

/// Reads structure from fuzz bytes; reads past the end give zeros.
struct ByteReader<'a> {
    data: &'a [u8],
}

impl<'a> ByteReader<'a> {
    fn new(data: &'a [u8]) -> Self {
        ByteReader { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// Up to `n` bytes (fewer at the end of the input).
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Repairs the integrity hashes that any mutation of a container breaks:
/// each shard's `header_blake3` (when the manifest decodes) and the fixed
/// header's digest. Without this, a mutated manifest is always rejected at
/// the digest check and the fuzzer never reaches decoding and validation.
/// (Hash checking itself is covered by unit tests.)
fn repair_hashes(buf: &mut [u8]) {
    if buf.len() < HEADER_LEN as usize || buf[..8] != MAGIC {
        return;
    }
    let moff = u64_at(buf, 16);
    let mlen = u64_at(buf, 24);
    let Some(mend) = moff.checked_add(mlen) else {
        return;
    };
    if moff < HEADER_LEN || mend > buf.len() as u64 {
        return;
    }
    let (ms, me) = (moff as usize, mend as usize);
    if let Ok(mut m) = decode_manifest(&buf[ms..me]) {
        let mut changed = false;
        for s in &mut m.shards {
            let Some(end) = s.offset.checked_add(s.header_len) else {
                continue;
            };
            if end > buf.len() as u64 {
                continue;
            }
            let h = *blake3::hash(&buf[s.offset as usize..end as usize]).as_bytes();
            if h != s.header_blake3 {
                s.header_blake3 = h;
                changed = true;
            }
        }
        if changed {
            if let Ok(b) = encode_manifest(&m) {
                // A hash is 32 single-byte elements, so the length is kept.
                if b.len() == me - ms {
                    buf[ms..me].copy_from_slice(&b);
                }
            }
        }
    }
    let mut prefix = [0u8; 32];
    prefix.copy_from_slice(&buf[..32]);
    let digest = FixedHeader::compute_digest(&prefix, &buf[ms..me]);
    buf[32..64].copy_from_slice(&digest);
}

// ---------------------------------------------------------------------------
// container

/// Fuzz target: arbitrary bytes as a `.ckpk` file.
///
/// The header digest and shard header hashes are repaired first (see the
/// module source), then the file is opened; on success every layer is
/// walked, every tensor of at most 16 MiB is read, and the container is
/// verified. Properties: nothing panics; a successful read returns the
/// declared length; a successful `verify()` implies every tensor reads back
/// with a matching hash.
pub fn container_bytes(data: &[u8]) {
    let mut buf = data.to_vec();
    repair_hashes(&mut buf);
    let tmp = TempPath::write("container.ckpk", &buf);
    let Ok(c) = Container::open(&tmp.0) else {
        return;
    };
    exercise_container(&c);
}

fn exercise_container(c: &Container) {
    let m = c.manifest();
    for l in c.layers() {
        for p in l.parts() {
            let found = m
                .shards
                .get(p.shard as usize)
                .is_some_and(|s| s.tensors.iter().any(|t| t.key == p.key));
            if !found {
                fail!(
                    "open accepted layer `{}` whose part `{}` (shard {}) is not stored",
                    l.path,
                    p.key,
                    p.shard
                );
            }
        }
    }
    let mut total = 0u64;
    let mut count = 0u64;
    for (si, s) in m.shards.iter().enumerate() {
        for t in &s.tensors {
            count += 1;
            let len = match byte_len(t.dtype, &t.shape) {
                Ok(l) => l,
                Err(e) => fail!("open accepted tensor `{}` whose size overflows: {e}", t.key),
            };
            total = total.saturating_add(len);
            if len > MAX_READ {
                continue;
            }
            match c.read_tensor(si as u32, &t.key) {
                Ok(b) => {
                    if b.len() as u64 != len {
                        fail!(
                            "read_tensor({si}, `{}`) gave {} bytes, {} {:?} needs {len}",
                            t.key,
                            b.len(),
                            t.dtype,
                            t.shape
                        );
                    }
                }
                Err(e) => {
                    if matches!(e.kind(), ErrorKind::NotFound(_)) {
                        fail!("read_tensor({si}, `{}`) of a listed tensor: {e}", t.key);
                    }
                }
            }
        }
    }
    if total <= MAX_VERIFY_TOTAL {
        if let Ok(rep) = c.verify() {
            if rep.tensors != count {
                fail!("verify() checked {} tensors of {count}", rep.tensors);
            }
            for (si, s) in m.shards.iter().enumerate() {
                for t in &s.tensors {
                    if let Err(e) = c.read_tensor_verified(si as u32, &t.key) {
                        fail!(
                            "verify() passed but read_tensor_verified({si}, `{}`) failed: {e}",
                            t.key
                        );
                    }
                }
            }
        }
    } else {
        for (si, s) in m.shards.iter().enumerate() {
            for t in &s.tensors {
                if byte_len(t.dtype, &t.shape).is_ok_and(|l| l <= MAX_READ) {
                    let _ = c.verify_tensor(si as u32, &t.key);
                }
            }
        }
    }
    // the TensorSource view of the same container
    let src: &dyn TensorSource = c;
    let _ = src.files();
    let _ = src.metadata();
    for t in src.tensors() {
        if t.len <= MAX_READ {
            if let Ok(b) = src.read(&t.key) {
                if b.len() as u64 != t.len {
                    fail!(
                        "TensorSource::read(`{}`) gave {} bytes, listed {}",
                        t.key,
                        b.len(),
                        t.len
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// manifest

/// Fuzz target: arbitrary bytes as manifest bytes.
///
/// Properties: a decoded manifest re-encodes to exactly the input (the codec
/// enforces canonical form) and decodes again to an equal value; structural
/// validation of any decoded manifest, against a header that places the
/// manifest where validation expects it, does not panic.
pub fn manifest_bytes(data: &[u8]) {
    let Ok(m) = decode_manifest(data) else {
        return;
    };
    let enc = match encode_manifest(&m) {
        Ok(b) => b,
        Err(e) => fail!("a decoded manifest does not encode: {e}"),
    };
    if enc != data {
        let at = enc.iter().zip(data).position(|(a, b)| a != b);
        fail!(
            "decode_manifest accepted non-canonical bytes: re-encoding gives {} bytes, input has {} (first difference at {at:?})",
            enc.len(),
            data.len()
        );
    }
    match decode_manifest(&enc) {
        Ok(m2) if m2 == m => {}
        Ok(_) => fail!("manifest decode(encode(m)) != m"),
        Err(e) => fail!("re-encoded manifest does not decode: {e}"),
    }
    // validate against a header that puts the manifest where it belongs
    let manifest_offset = m
        .shards
        .last()
        .and_then(|s| s.offset.checked_add(s.stored_len))
        .and_then(|end| crate::format::align_up(end, crate::format::MANIFEST_ALIGN))
        .unwrap_or(HEADER_LEN);
    let header = FixedHeader {
        version: m.version,
        manifest_offset,
        manifest_len: data.len() as u64,
        digest: [0; 32],
    };
    let _ = validate::validate(&m, &header);
}

// ---------------------------------------------------------------------------
// safetensors

/// Fuzz target: arbitrary bytes as a safetensors file.
///
/// Parses the header in memory with [`st_header::parse`] and also opens the
/// bytes as a file with [`SafetensorsFile::open`], reading every tensor of
/// at most 16 MiB through [`TensorSource`]. Properties: both paths agree on
/// success and on the parsed header; every listed tensor reads back as the
/// bytes at its offsets; whatever ckptkit accepts, the `safetensors` crate
/// accepts too, with the same tensors.
pub fn safetensors_bytes(data: &[u8]) {
    let pure = st_header::parse(data, Some(data.len() as u64));
    let tmp = TempPath::write("st.safetensors", data);
    let file = SafetensorsFile::open(&tmp.0);
    let (h, f) = match (pure, file) {
        (Ok(h), Ok(f)) => (h, f),
        (Err(_), Err(_)) => return,
        (Ok(_), Err(e)) => {
            fail!("st_header::parse accepted the bytes but SafetensorsFile::open failed: {e}")
        }
        (Err(e), Ok(_)) => {
            fail!("SafetensorsFile::open accepted the bytes but st_header::parse failed: {e}")
        }
    };
    if f.header() != &h {
        fail!(
            "st_header::parse and SafetensorsFile::open disagree:\n  parse: {h:?}\n  open:  {:?}",
            f.header()
        );
    }
    if TensorSource::metadata(&f) != &h.metadata {
        fail!("SafetensorsFile metadata differs from the parsed header");
    }
    let listed: Vec<(&str, Dtype, &[u64], u64)> = TensorSource::tensors(&f)
        .iter()
        .map(|t| (t.key.as_str(), t.dtype, &t.shape[..], t.len))
        .collect();
    let parsed: Vec<(&str, Dtype, &[u64], u64)> = h
        .tensors
        .iter()
        .map(|t| (t.key.as_str(), t.dtype, &t.shape[..], t.len()))
        .collect();
    if listed != parsed {
        fail!("SafetensorsFile lists {listed:?}, the header has {parsed:?}");
    }
    for t in &h.tensors {
        if t.len() > MAX_READ {
            continue;
        }
        let b = match TensorSource::read(&f, &t.key) {
            Ok(b) => b,
            Err(e) => fail!("reading listed tensor `{}` failed: {e}", t.key),
        };
        let (s, e) = (
            (h.header_len + t.start) as usize,
            (h.header_len + t.end) as usize,
        );
        if b[..] != data[s..e] {
            fail!(
                "tensor `{}` read back different bytes than at [{s}, {e})",
                t.key
            );
        }
    }
    // recorded hashes: verify either accounts for every tensor or names
    // what is wrong, and a passing verify means the recorded digests are
    // the bytes' digests
    match f.verify() {
        Ok(r) => {
            if r.tensors + r.unchecked != h.tensors.len() as u64 {
                fail!("verify counted {r:?} of {} tensors", h.tensors.len());
            }
            if let Some(v) = h.metadata.get(crate::format::st_hashes::HASHES_KEY) {
                let m = match crate::format::st_hashes::parse(
                    v,
                    h.tensors.iter().map(|t| t.key.as_str()),
                ) {
                    Ok(m) => m,
                    Err(e) => fail!("verify passed but the hash entry does not parse: {e}"),
                };
                for (k, want) in m {
                    let Some(t) = h.get(&k) else {
                        fail!("hash entry names `{k}`, not in the header")
                    };
                    let (s, e) = (
                        (h.header_len + t.start) as usize,
                        (h.header_len + t.end) as usize,
                    );
                    if blake3::hash(&data[s..e]).as_bytes() != &want {
                        fail!("verify passed a wrong hash for `{k}`");
                    }
                }
            }
        }
        Err(e) => {
            if !matches!(
                e.kind(),
                crate::ErrorKind::Json(_) | crate::ErrorKind::HashMismatch { .. }
            ) {
                fail!("verify failed with an unexpected error: {e}");
            }
        }
    }
    // ckptkit is stricter than the safetensors crate, never more lenient.
    let theirs = match safetensors::SafeTensors::deserialize(data) {
        Ok(st) => st,
        Err(e) => fail!("ckptkit accepted a file the safetensors crate rejects: {e:?}"),
    };
    let mut tv: Vec<(String, Dtype, Vec<u64>, &[u8])> = Vec::new();
    for (k, v) in theirs.tensors() {
        let d = match Dtype::from_st(v.dtype()) {
            Ok(d) => d,
            Err(e) => fail!("safetensors crate dtype of `{k}`: {e}"),
        };
        tv.push((
            k,
            d,
            v.shape().iter().map(|&x| x as u64).collect(),
            v.data(),
        ));
    }
    tv.sort_by(|a, b| a.0.cmp(&b.0));
    let mut ours: Vec<(String, Dtype, Vec<u64>, &[u8])> = h
        .tensors
        .iter()
        .map(|t| {
            let (s, e) = (
                (h.header_len + t.start) as usize,
                (h.header_len + t.end) as usize,
            );
            (t.key.clone(), t.dtype, t.shape.clone(), &data[s..e])
        })
        .collect();
    ours.sort_by(|a, b| a.0.cmp(&b.0));
    if ours != tv {
        fail!("ckptkit and the safetensors crate see different tensors");
    }
}

// ---------------------------------------------------------------------------
// writer round trip

struct GenTensor {
    key: String,
    dtype: Dtype,
    shape: Vec<u64>,
    data: Vec<u8>,
}

struct GenShard {
    name: String,
    tensors: Vec<GenTensor>,
    metadata: BTreeMap<String, String>,
}

impl GenShard {
    fn new(i: usize) -> GenShard {
        GenShard {
            name: format!("model-{:05}.safetensors", i + 1),
            tensors: Vec::new(),
            metadata: BTreeMap::new(),
        }
    }
}

struct GenPlan {
    compression: Option<ZstdOptions>,
    shards: Vec<GenShard>,
    metadata: BTreeMap<String, String>,
}

/// Characters keys are made of: separators, escapes, non-ASCII.
const KEY_ALPHABET: [&str; 10] = ["a", "b", "c", ".", "_", "0", "é", "\"", "\\", "\n"];

fn gen_key(r: &mut ByteReader<'_>) -> String {
    let n = r.u8() % 10;
    (0..n)
        .map(|_| KEY_ALPHABET[r.u8() as usize % KEY_ALPHABET.len()])
        .collect()
}

fn gen_string(r: &mut ByteReader<'_>) -> String {
    let n = (r.u8() % 12) as usize;
    String::from_utf8_lossy(r.bytes(n)).into_owned()
}

fn gen_tensor(r: &mut ByteReader<'_>, key: String) -> GenTensor {
    let dtype = Dtype::ALL[r.u8() as usize % Dtype::ALL.len()];
    let rank = r.u8() % 5;
    let mut shape: Vec<u64> = (0..rank).map(|_| u64::from(r.u8() % 17)).collect();
    // shrink the largest dimension until the tensor is small enough
    while byte_len(dtype, &shape).map_or(true, |l| l > MAX_GEN_TENSOR) {
        if let Some(d) = shape.iter_mut().max() {
            *d /= 2;
        }
    }
    let len = byte_len(dtype, &shape).unwrap_or(0) as usize;
    let mode = r.u8() % 4;
    let seed = r.u8();
    let data: Vec<u8> = match mode {
        // zeros: compresses to almost nothing
        0 => vec![0; len],
        // bytes from the input, repeated
        1 => {
            let src = r.bytes(len.min(64));
            if src.is_empty() {
                vec![seed; len]
            } else {
                src.iter().copied().cycle().take(len).collect()
            }
        }
        // smooth, float-like: exponent bytes nearly constant
        2 => (0..len)
            .map(|i| {
                if i % 2 == 1 {
                    0x3f
                } else {
                    (i as u8).wrapping_mul(seed)
                }
            })
            .collect(),
        // pseudo-random: incompressible, stored raw
        _ => {
            let mut x = u32::from(seed) | 0x1000_0000;
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect()
        }
    };
    GenTensor {
        key,
        dtype,
        shape,
        data,
    }
}

fn gen_plan(data: &[u8]) -> GenPlan {
    let mut r = ByteReader::new(data);
    let flags = r.u8();
    let compression = (flags & 1 != 0).then_some(ZstdOptions {
        level: if flags & 8 != 0 { 3 } else { 1 },
        chunk_size: if flags & 2 != 0 { 8192 } else { 4096 },
        float_filter: flags & 4 != 0,
    });
    let mut shards = vec![GenShard::new(0)];
    let mut metadata = BTreeMap::new();
    let mut keys = HashSet::new();
    let mut ops = 0;
    while !r.is_empty() && ops < 64 {
        ops += 1;
        let op = r.u8() % 8;
        let cur = shards.len() - 1;
        match op {
            0..=3 => {
                let key = gen_key(&mut r);
                let t = gen_tensor(&mut r, key);
                // keys are unique over the whole container (the layer table
                // is derived from them)
                if shards[cur].tensors.len() < 16 && keys.insert(t.key.clone()) {
                    shards[cur].tensors.push(t);
                }
            }
            4 => {
                let (k, v) = (gen_string(&mut r), gen_string(&mut r));
                shards[cur].metadata.insert(k, v);
            }
            5 => {
                let (k, v) = (gen_string(&mut r), gen_string(&mut r));
                metadata.insert(k, v);
            }
            6 if shards.len() < 8 => shards.push(GenShard::new(shards.len())),
            _ => {}
        }
    }
    GenPlan {
        compression,
        shards,
        metadata,
    }
}

/// Fuzz target: a sequence of writer operations decoded from the bytes.
///
/// Byte 0 picks the options (bit 0 compression, bit 1 chunk size 8192
/// instead of 4096, bit 2 float filter, bit 3 zstd level 3 instead of 1);
/// then each op byte adds a tensor (any dtype, rank 0–4, at most 12 KiB,
/// zero / repeated / float-like / random data), a shard or container
/// metadata entry, or a shard break. The container is written with
/// [`ContainerWriter`] (compressed shards in the plan's data order,
/// [`st_header::data_order`]), reopened and compared: shard names, every
/// tensor's dtype, shape and bytes, `verify()`, shard and container
/// metadata, and the [`open_source`] view.
pub fn writer_ops(data: &[u8]) {
    let plan = gen_plan(data);
    let dest = TempPath::new("writer.ckpk");
    let opts = ContainerOptions {
        compression: plan.compression,
        overwrite: false,
    };
    let mut w = match ContainerWriter::create(&dest.0, opts) {
        Ok(w) => w,
        Err(e) => fail!("ContainerWriter::create: {e}"),
    };
    for (si, s) in plan.shards.iter().enumerate() {
        let specs: Vec<(String, Dtype, Vec<u64>)> = s
            .tensors
            .iter()
            .map(|t| (t.key.clone(), t.dtype, t.shape.clone()))
            .collect();
        if let Err(e) = w.begin_shard(&s.name, &specs, &s.metadata) {
            fail!("begin_shard({}) with {specs:?}: {e}", s.name);
        }
        let mut order = specs.clone();
        if plan.compression.is_some() {
            st_header::data_order(&mut order);
        } else {
            // any order is allowed: write them backwards
            order.reverse();
        }
        for (key, _, _) in &order {
            let Some(t) = s.tensors.iter().find(|t| &t.key == key) else {
                fail!("data_order lost tensor `{key}`");
            };
            match w.write_tensor(key, &t.data) {
                Ok(h) => {
                    if h != *blake3::hash(&t.data).as_bytes() {
                        fail!("write_tensor(`{key}`) returned a wrong hash");
                    }
                }
                Err(e) => fail!("write_tensor(`{key}`, {} {:?}): {e}", t.dtype, t.shape),
            }
        }
        match w.finish_shard() {
            Ok(i) if i as usize == si => {}
            Ok(i) => fail!("finish_shard returned index {i}, expected {si}"),
            Err(e) => fail!("finish_shard({}): {e}", s.name),
        }
    }
    let written = match w.finish(None, plan.metadata.clone(), Vec::new()) {
        Ok(m) => m,
        Err(e) => fail!("ContainerWriter::finish: {e}"),
    };
    let c = match Container::open(&dest.0) {
        Ok(c) => c,
        Err(e) => fail!("reopening a container the writer produced: {e}"),
    };
    let m = c.manifest();
    if m != &written {
        fail!("the reopened manifest differs from the one finish() returned");
    }
    if m.metadata != plan.metadata {
        fail!(
            "container metadata {:?} != written {:?}",
            m.metadata,
            plan.metadata
        );
    }
    let names: Vec<&str> = m.shards.iter().map(|s| s.name.as_str()).collect();
    let want: Vec<&str> = plan.shards.iter().map(|s| s.name.as_str()).collect();
    if names != want {
        fail!("shard names {names:?} != written {want:?}");
    }
    let mut count = 0u64;
    for (si, s) in plan.shards.iter().enumerate() {
        let ms = &m.shards[si];
        if ms.tensors.len() != s.tensors.len() {
            fail!(
                "shard {si} has {} tensors, {} were written",
                ms.tensors.len(),
                s.tensors.len()
            );
        }
        match c.shard_metadata(si as u32) {
            Some(md) if md == &s.metadata => {}
            other => fail!(
                "shard {si} __metadata__ {other:?} != written {:?}",
                s.metadata
            ),
        }
        // the writer's layout: data at a multiple of 64, every tensor at a
        // multiple of its alignment class (spec/container.md §3)
        let hl = ms.header_len;
        if (ms.offset + hl) % 64 != 0 {
            fail!(
                "shard {si}: data section at {} is not 64-aligned",
                ms.offset + hl
            );
        }
        let Some(hb) = c.shard_header_bytes(si as u32) else {
            fail!("shard {si}: no header bytes")
        };
        match st_header::parse(hb, None) {
            Ok(h) => {
                for t in &h.tensors {
                    let class = st_header::align_class(t.end - t.start);
                    if t.start % class != 0 {
                        fail!(
                            "shard {si}: `{}` at {} is not {class}-aligned",
                            t.key,
                            t.start
                        );
                    }
                }
            }
            Err(e) => fail!("shard {si}: its header does not parse: {e}"),
        }
        for t in &s.tensors {
            count += 1;
            let Some(st) = ms.tensors.iter().find(|x| x.key == t.key) else {
                fail!("tensor `{}` missing from shard {si}", t.key);
            };
            if st.dtype != t.dtype || st.shape != t.shape {
                fail!(
                    "tensor `{}`: stored {} {:?}, written {} {:?}",
                    t.key,
                    st.dtype,
                    st.shape,
                    t.dtype,
                    t.shape
                );
            }
            match c.read_tensor(si as u32, &t.key) {
                Ok(b) if b[..] == t.data[..] => {}
                Ok(b) => fail!(
                    "tensor `{}` ({} {:?}, codec {:?}) read back {} different bytes",
                    t.key,
                    t.dtype,
                    t.shape,
                    st.codec,
                    b.len()
                ),
                Err(e) => fail!("read_tensor({si}, `{}`): {e}", t.key),
            }
        }
    }
    match c.verify() {
        Ok(rep) if rep.tensors == count => {}
        Ok(rep) => fail!(
            "verify() checked {} tensors, {count} were written",
            rep.tensors
        ),
        Err(e) => fail!("verify() of a freshly written container: {e}"),
    }
    let src = match open_source(&dest.0) {
        Ok(s) => s,
        Err(e) => fail!("open_source of a freshly written container: {e}"),
    };
    if src.tensors().len() as u64 != count {
        fail!(
            "open_source lists {} tensors, {count} were written",
            src.tensors().len()
        );
    }
    for s in &plan.shards {
        for t in &s.tensors {
            match src.read(&t.key) {
                Ok(b) if b[..] == t.data[..] => {}
                Ok(_) => fail!("TensorSource::read(`{}`) gave different bytes", t.key),
                Err(e) => fail!("TensorSource::read(`{}`): {e}", t.key),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// chunk codec

/// Fuzz target: the chunk codecs.
///
/// Byte 0 picks the codec, byte 1 the dtype, byte 2 the zstd level, bytes
/// 3–4 an output length; the rest is the payload. Properties: encoding
/// succeeds exactly when the codec applies (the float planes codec needs
/// F16/BF16/F32 and whole elements); the stored size stays within what the
/// container validator allows; decoding gives the payload back; and
/// decoding the payload itself as a stored chunk, for the chosen output
/// length, does not panic (and for `Plain` copies it).
pub fn chunk_codec(data: &[u8]) {
    let mut r = ByteReader::new(data);
    let codec = [Codec::Plain, Codec::Zstd, Codec::ZstdFloatPlanes][r.u8() as usize % 3];
    let dtype = Dtype::ALL[r.u8() as usize % Dtype::ALL.len()];
    let level = [1, 3, -1, 0][r.u8() as usize % 4];
    let out_len = usize::from(r.u16());
    let raw = r.rest();

    let applies = match codec {
        Codec::ZstdFloatPlanes => {
            dtype.is_filterable_float() && raw.len().is_multiple_of(dtype.size())
        }
        _ => true,
    };
    match encode_chunk(codec, dtype, level, raw) {
        Ok(stored) => {
            if !applies {
                fail!(
                    "encode_chunk({codec:?}, {dtype}) accepted {} bytes it cannot encode",
                    raw.len()
                );
            }
            let planes = if codec == Codec::ZstdFloatPlanes {
                dtype.size()
            } else {
                0
            };
            if stored.len() > raw.len() + 4 * planes {
                fail!(
                    "encode_chunk({codec:?}, {dtype}) stored {} bytes for {} raw (limit raw + {})",
                    stored.len(),
                    raw.len(),
                    4 * planes
                );
            }
            if codec == Codec::Plain && stored != raw {
                fail!("Plain encode changed the bytes");
            }
            let mut back = vec![0u8; raw.len()];
            if let Err(e) = decode_chunk(codec, dtype, &stored, &mut back) {
                fail!(
                    "decode_chunk({codec:?}, {dtype}) of its own {}-byte encoding: {e}",
                    stored.len()
                );
            }
            if back != raw {
                fail!(
                    "decode_chunk({codec:?}, {dtype}, level {level}) round trip changed the bytes"
                );
            }
        }
        Err(e) => {
            if applies {
                fail!(
                    "encode_chunk({codec:?}, {dtype}) of {} bytes failed: {e}",
                    raw.len()
                );
            }
        }
    }
    // arbitrary stored bytes
    let mut out = vec![0u8; out_len];
    let res = decode_chunk(codec, dtype, raw, &mut out);
    if codec == Codec::Plain && res.is_ok() != (raw.len() == out_len) {
        fail!(
            "Plain decode of {} bytes into {out_len}: {res:?}",
            raw.len()
        );
    }
}

// ---------------------------------------------------------------------------
// layouts, side files, migrations

/// An in-memory tensor source for the layout targets.
struct MemSource {
    tensors: Vec<crate::io::source::SourceTensor>,
    bytes: std::collections::BTreeMap<String, Vec<u8>>,
    md: std::collections::BTreeMap<String, String>,
}

impl MemSource {
    fn new(items: Vec<(String, Dtype, Vec<u64>, Vec<u8>)>) -> Self {
        let tensors = items
            .iter()
            .map(|(k, d, s, b)| crate::io::source::SourceTensor {
                key: k.clone(),
                dtype: *d,
                shape: s.clone(),
                len: b.len() as u64,
                file: 0,
            })
            .collect();
        MemSource {
            tensors,
            bytes: items.into_iter().map(|(k, _, _, b)| (k, b)).collect(),
            md: Default::default(),
        }
    }
}

impl crate::io::source::TensorSource for MemSource {
    fn describe(&self) -> String {
        "fuzz".into()
    }
    fn tensors(&self) -> &[crate::io::source::SourceTensor] {
        &self.tensors
    }
    fn metadata(&self) -> &std::collections::BTreeMap<String, String> {
        &self.md
    }
    fn files(&self) -> Vec<String> {
        vec!["fuzz.safetensors".into()]
    }
    fn read(&self, key: &str) -> crate::Result<crate::io::TensorBytes> {
        Ok(crate::io::TensorBytes::Owned(
            self.bytes.get(key).cloned().unwrap_or_default(),
        ))
    }
}

const FUZZ_TARGET_NAMES: [&str; 17] = [
    "plain",
    "plain:f32",
    "quanto:qint8",
    "quanto:qint4",
    "quanto:qfloat8_e5m2",
    "int8",
    "int8:bnb",
    "int8:ct:group=8",
    "comfy:float8_e4m3fn",
    "comfy:int8_tensorwise:per_row",
    "comfy:mxfp8",
    "comfy:nvfp4",
    "fp8:legacy",
    "fp8:block",
    "fp8:block:ue8m0",
    "fp8:ct:channel",
    "fp8:ct:group=8",
];

/// Target 3: safetensors bytes → the source abstraction → layout detection
/// for every family → a plan for several targets → execution of every layer
/// whose tensors are small. Ok or a typed error, never a panic.
pub fn layout_detect(data: &[u8]) {
    use crate::io::source::TensorSource;
    let t = TempPath::write("layout.safetensors", data);
    let Ok(f) = crate::io::safetensors_file::SafetensorsFile::open(&t.0) else {
        return;
    };
    if f.tensors().iter().map(|t| t.len).sum::<u64>() > 1 << 20 {
        return;
    }
    let Ok(layers) = crate::migrate::detect_layers(&f, &Default::default()) else {
        return;
    };
    for name in FUZZ_TARGET_NAMES {
        let Ok(target) = crate::migrate::plan::Target::parse(name) else {
            fail!("built-in target {name} does not parse")
        };
        let Ok(p) = crate::migrate::plan::plan(&layers, &target, &Default::default()) else {
            continue;
        };
        for lp in &p.layers {
            if let Ok((out, _)) = crate::migrate::plan::execute(&f, lp) {
                for (k, b) in out {
                    let Ok(b) = b.bytes(&f) else {
                        fail!("{name}: copied tensor {k} cannot be read")
                    };
                    let Some(part) = lp.output.parts().find(|q| q.key == k) else {
                        fail!("{name}: executed tensor {k} is not in the plan")
                    };
                    if crate::dtype::byte_len(part.dtype, &part.shape).ok() != Some(b.len() as u64)
                    {
                        fail!(
                            "{name}: {k} has {} bytes, the plan says {:?} {:?}",
                            b.len(),
                            part.dtype,
                            part.shape
                        )
                    }
                }
            }
        }
    }
}

/// Target 9: GGUF bytes → the header parser (whole, and grown from a short
/// prefix as the source reads it: both must agree) → the GGUF source →
/// layout detection → `plain` and `keep` plans executed for every layer
/// whose tensors are small: every dequantized tensor has the plan's byte
/// length, every kept one the source's bytes. Ok or a typed error, never a
/// panic.
pub fn gguf_bytes(data: &[u8]) {
    use crate::format::gguf::read::{parse, Parsed};
    use crate::io::source::TensorSource;
    let len = data.len() as u64;
    let whole = parse(data, len);
    // the prefix loop the source runs, from 16 bytes
    let mut have = data.len().min(16);
    let grown = loop {
        match parse(&data[..have], len) {
            Ok(Parsed::NeedMore(n)) => {
                if n as usize <= have || n > len {
                    fail!("NeedMore({n}) with {have} of {len} bytes")
                }
                have = n as usize;
            }
            r => break r,
        }
    };
    match (&whole, &grown) {
        // compared by their Debug forms: a NaN float value is not equal
        // to itself, though both parses read the same bytes
        (Ok(Parsed::Done(a)), Ok(Parsed::Done(b))) if format!("{a:?}") != format!("{b:?}") => {
            fail!("the header parsed whole and from a prefix differ")
        }
        (Ok(Parsed::NeedMore(n)), _) => fail!("NeedMore({n}) on the whole file"),
        (Ok(_), Err(e)) | (Err(e), Ok(_)) => {
            fail!("the header parsed whole and from a prefix disagree: {e}")
        }
        _ => {}
    }
    let t = TempPath::write("fuzz.gguf", data);
    let Ok(f) = crate::io::gguf_file::GgufFile::open(&t.0) else {
        return;
    };
    if f.tensors().iter().map(|t| t.len).sum::<u64>() > 1 << 20 {
        return;
    }
    let Ok(layers) = crate::migrate::detect_layers(&f, &Default::default()) else {
        return;
    };
    for target in [
        crate::migrate::plan::Target::Plain(None),
        crate::migrate::plan::Target::Keep,
    ] {
        let Ok(p) = crate::migrate::plan::plan(&layers, &target, &Default::default()) else {
            continue;
        };
        for lp in &p.layers {
            let Ok((out, _)) = crate::migrate::plan::execute(&f, lp) else {
                continue;
            };
            for (k, b) in out {
                let Ok(b) = b.bytes(&f) else {
                    fail!("copied tensor {k} cannot be read")
                };
                let Some(part) = lp.output.parts().find(|q| q.key == k) else {
                    fail!("executed tensor {k} is not in the plan")
                };
                if crate::dtype::byte_len(part.dtype, &part.shape).ok() != Some(b.len() as u64) {
                    fail!(
                        "{k} has {} bytes, the plan says {:?} {:?}",
                        b.len(),
                        part.dtype,
                        part.shape
                    )
                }
                if target == crate::migrate::plan::Target::Keep {
                    match f.read(&k) {
                        Ok(src) if *src == *b => {}
                        _ => fail!("kept tensor {k} differs from the source's bytes"),
                    }
                }
            }
        }
    }
}

/// Target 4: a quanto qmap, a diffusers config or an int8 descriptor (the
/// first byte chooses) → parse → validate → render → parse gives the same
/// value.
pub fn side_json(data: &[u8]) {
    let (&k, rest) = match data.split_first() {
        Some(x) => x,
        None => return,
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match k % 6 {
        3 => {
            // a commit journal, as the next write or `migrate recover` reads
            // it: whatever it says, a valid one only renames ckptkit
            // temporaries of its own file and companions onto them
            let name = ".m.safetensors.ckptkit-commit";
            if let Ok((renames, removes)) = crate::io::atomic::parse_journal(name, rest) {
                let allowed = |d: &str| {
                    d == "m.safetensors" || crate::io::atomic::COMPANION_NAMES.contains(&d)
                };
                for (t, d) in &renames {
                    let temp_of_dest =
                        t.starts_with(&format!(".{d}{}", crate::io::atomic::TEMP_MARKER));
                    if !allowed(d) || !temp_of_dest || t.contains('/') || d.contains('/') {
                        fail!("journal accepted a rename {t:?} -> {d:?}")
                    }
                }
                for d in &removes {
                    if !crate::io::atomic::COMPANION_NAMES.contains(&d.as_str()) {
                        fail!("journal accepted a removal of {d:?}")
                    }
                }
            }
        }
        4 => {
            // a Hugging Face index and ckptkit's schema entry
            let _ = serde_json::from_str::<crate::io::sharded::ShardIndex>(text);
            let md: std::collections::BTreeMap<String, String> = [(
                crate::format::st_schema::SCHEMA_KEY.to_string(),
                text.to_string(),
            )]
            .into();
            let _ = crate::format::st_schema::schema_of(&md);
        }
        5 => {
            // the ckptkit.blake3 entry of a safetensors file
            let _ = crate::format::st_hashes::parse(text, ["a", "b.weight"]);
        }
        0 => {
            if let Ok(m) = crate::layout::quanto::QuantoMap::parse(text) {
                let again = crate::layout::quanto::QuantoMap::parse(&m.to_json());
                if again.as_ref().ok() != Some(&m) {
                    fail!("qmap does not survive its own rendering: {again:?}")
                }
            }
        }
        1 => {
            // a config.json, as the quanto and block FP8 families read it
            let _ = crate::layout::quanto::DiffusersQuanto::from_config(text);
            let _ = crate::layout::ctfp8::CtFp8Config::from_text(text);
            if let Ok(Some(c)) = crate::layout::fp8block::Fp8Config::from_text(text) {
                if c.block
                    .is_some_and(|b| b.iter().any(|&s| s == 0 || s > 1 << 16))
                {
                    fail!("block FP8 config accepted a block side out of range: {c:?}")
                }
            }
        }
        _ => {
            if let Ok(d) = crate::layout::int8::Int8Descriptor::from_json(text) {
                let again = crate::layout::int8::Int8Descriptor::from_json(&d.to_json());
                if again.as_ref().ok() != Some(&d) {
                    fail!("int8 descriptor does not survive its own rendering: {again:?}")
                }
                // a valid descriptor plans and quantizes a small weight
                let w = vec![0x3Cu8; 2 * 4 * 32];
                if d.shapes(4, 32).is_ok() {
                    let _ = crate::layout::int8::quantize(&d, Dtype::F16, 4, 32, &w);
                }
            }
        }
    }
}

/// Target 6: an arbitrary small float weight and an arbitrary (source,
/// target) layout pair → plan → execute → back. Properties: every pass
/// returns Ok or a typed error; quantize → dequantize stays within half a
/// quantization step (plus the float rounding) of finite inputs; re-layouts
/// that run without `allow_lossy` convert back byte for byte.
pub fn migration(data: &[u8]) {
    use crate::migrate::plan::{execute, plan, PlanOptions, Target};
    let mut r = ByteReader::new(data);
    let o = 1 + (r.u8() % 6) as u64;
    let i = 8 * (1 + (r.u8() % 8) as u64);
    let d = [Dtype::BF16, Dtype::F16, Dtype::F32][(r.u8() % 3) as usize];
    let a = FUZZ_TARGET_NAMES[(r.u8() as usize) % FUZZ_TARGET_NAMES.len()];
    let b = FUZZ_TARGET_NAMES[(r.u8() as usize) % FUZZ_TARGET_NAMES.len()];
    let n = (o * i) as usize;
    let Some(f) = crate::layout::quanto::float_of(d) else {
        return;
    };
    // finite values in [-8, 8]
    let vals: Vec<f32> = (0..n).map(|_| (r.u16() as i16 as f32) / 4096.0).collect();
    let w = f.encode(&vals);
    let bias = f.encode(&vec![0.5; o as usize]);
    let src = MemSource::new(vec![
        ("m.weight".into(), d, vec![o, i], w),
        ("m.bias".into(), d, vec![o], bias),
    ]);
    let run = |s: &MemSource, t: &str| -> Option<MemSource> {
        let layers = crate::migrate::detect_layers(s, &Default::default()).ok()?;
        let target = Target::parse(t).ok()?;
        let p = plan(&layers, &target, &PlanOptions::default()).ok()?;
        let mut items = Vec::new();
        for lp in &p.layers {
            let (out, _) = execute(s, lp).ok()?;
            for (k, bytes) in out {
                let part = lp.output.parts().find(|q| q.key == k)?;
                items.push((
                    k,
                    part.dtype,
                    part.shape.clone(),
                    bytes.bytes(s).ok()?.into_vec(),
                ));
            }
        }
        // with the output's `__metadata__` (ckptkit's schema records the
        // logical shapes of padded layouts)
        let mut out = MemSource::new(items);
        out.md = crate::migrate::sidefiles::output_metadata(&s.md, &p);
        Some(out)
    };
    let Some(qa) = run(&src, a) else { return };
    // back to plain: within the bound
    if let Some(back) = run(&qa, "plain") {
        if let Some(got) = back.bytes.get("m.weight") {
            let bd = back
                .tensors
                .iter()
                .find(|t| t.key == "m.weight")
                .map(|t| t.dtype);
            if let Some(g) = bd
                .and_then(crate::layout::quanto::float_of)
                .and_then(|g| g.decode(got).ok())
            {
                let amax = vals.iter().fold(0f32, |m, x| m.max(x.abs()));
                for (x, y) in vals.iter().zip(&g) {
                    if amax == 0.0 || y.is_nan() && a.contains("qfloat8") {
                        continue; // quanto stores NaN for all-zero fp8 rows
                    }
                    // loose bound: a 2-bit step over the whole range
                    if (x - y).abs() > 2.0 * amax / 3.0 + 1e-3 {
                        fail!("{a} -> plain: {x} came back as {y} (amax {amax})")
                    }
                }
            }
        }
    }
    // re-layouts in the int8 family are byte-reversible when they run
    let family = |t: &str| t == "quanto:qint8" || t.starts_with("int8");
    if family(a) && family(b) && !b.contains("group") && !a.contains("group") {
        if let Some(qb) = run(&qa, b) {
            if let Some(again) = run(&qb, a) {
                for (k, v) in &qa.bytes {
                    if k.ends_with("input_scale") || k.ends_with("output_scale") {
                        continue;
                    }
                    if again.bytes.get(k) != Some(v) {
                        fail!("{a} -> {b} -> {a} changed {k}")
                    }
                }
            }
        }
    }
}

/// Internals that the crate's own tests, benchmarks and fuzz targets
/// exercise directly (kernels, parsers, family math). Not part of the API:
/// only built with the `fuzzing` feature, hidden from the docs, and free to
/// change in any release.
pub mod internals {
    /// Float dtypes and conversions.
    pub mod float {
        pub use crate::float::*;
    }
    /// The float byte-plane filter.
    pub mod filter {
        pub use crate::format::filter::*;
    }
    /// safetensors header parsing and data order.
    pub mod st_header {
        pub use crate::format::st_header::*;
    }
    /// The tensor-lookup counter (O(1) per tensor checks).
    pub mod lookups {
        pub use crate::format::lookups::*;
    }
    /// The manifest codec and its allocation bound.
    pub mod codec {
        pub use crate::format::codec::*;
    }
    /// optimum-quanto: qtypes, maps, math and packing.
    pub mod quanto {
        pub use crate::layout::quanto::*;
    }
    /// int8 layouts: descriptors and presets.
    pub mod int8 {
        pub use crate::layout::int8::*;
    }
    pub use crate::io::hash_range;
    /// Layer detection with explicit hints (the library reads them from
    /// side files: `migrate::input_layers`).
    pub mod detect {
        pub use crate::layout::family::Hints;
        pub use crate::migrate::detect::detect_layers;
    }
}

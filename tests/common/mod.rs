//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod cli;
pub mod manifest_bytes;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ckptkit::format::FixedHeader;
use ckptkit::format::{decode_manifest, encode_manifest};
use ckptkit::{Container, ContainerOptions, ContainerWriter, Dtype, Manifest, ZstdOptions};

/// A tensor spec with its bytes.
pub type T = (String, Dtype, Vec<u64>, Vec<u8>);

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// bf16 values resembling weights (small normal-ish numbers).
pub fn bf16_weights(seed: u64, n: usize) -> Vec<u8> {
    let r = bytes(seed, n * 2);
    r.chunks(2)
        .map(|c| {
            let u = (c[0] as f32 + c[1] as f32 / 256.0) / 256.0 - 0.5;
            half::bf16::from_f32(u * 0.04)
        })
        .flat_map(|v| v.to_bits().to_le_bytes())
        .collect()
}

/// Writes shards of tensors into a container at `path`.
pub fn write_container<S: AsRef<str>>(
    path: &Path,
    shards: &[(S, Vec<T>, BTreeMap<String, String>)],
    compression: Option<ZstdOptions>,
    metadata: BTreeMap<String, String>,
) -> ckptkit::Result<Manifest> {
    let mut w = ContainerWriter::create(
        path,
        ContainerOptions::default()
            .compression(compression)
            .overwrite(true),
    )?;
    for (name, ts, md) in shards {
        let mut plan: Vec<(String, Dtype, Vec<u64>)> = ts
            .iter()
            .map(|(k, d, s, _)| (k.clone(), *d, s.clone()))
            .collect();
        w.begin_shard(name.as_ref(), &plan, md)?;
        ckptkit::format::data_order(&mut plan);
        for (k, _, _) in &plan {
            let t = ts.iter().find(|t| &t.0 == k).expect("planned");
            w.write_tensor(k, &t.3)?;
        }
        w.finish_shard()?;
    }
    w.finish(None, metadata, Vec::new())
}

/// A small valid container's bytes: two shards, quantized-looking tensors.
pub fn base_container(compressed: bool) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("base.ckpk");
    let mut md = BTreeMap::new();
    md.insert("format".to_string(), "pt".to_string());
    let s0 = vec![
        (
            "a.weight".to_string(),
            Dtype::BF16,
            vec![4, 8],
            bf16_weights(1, 32),
        ),
        (
            "a.bias".to_string(),
            Dtype::BF16,
            vec![4],
            bf16_weights(2, 4),
        ),
        (
            "b.weight._data".to_string(),
            Dtype::I8,
            vec![2, 3],
            bytes(3, 6),
        ),
    ];
    let s1 = vec![("c.weight".to_string(), Dtype::F32, vec![3, 2], bytes(4, 24))];
    let comp = compressed.then_some(
        ZstdOptions::default()
            .level(1)
            .chunk_size(4096)
            .float_filter(true),
    );
    let mut user = BTreeMap::new();
    user.insert("step".to_string(), "4000".to_string());
    write_container(
        &p,
        &[
            ("model-00001-of-00002.safetensors", s0, md.clone()),
            ("model-00002-of-00002.safetensors", s1, md),
        ],
        comp,
        user,
    )
    .expect("write base");
    std::fs::read(&p).expect("read base")
}

/// Writes bytes to a temp file and opens them as a container; also
/// verifies when the open succeeds.
pub fn open_bytes(b: &[u8]) -> ckptkit::Result<Container> {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("x.ckpk");
    std::fs::write(&p, b).expect("write");
    let c = Container::open(&p)?;
    Ok(c)
}

/// Opens and verifies.
pub fn open_verify(b: &[u8]) -> ckptkit::Result<()> {
    let c = open_bytes(b)?;
    c.verify()?;
    Ok(())
}

/// Writes the bytes to a file and runs the pipeline's `verify` on it:
/// structure, every layer record's meaning (its family's rules) and hashes.
pub fn migrate_verify(b: &[u8]) -> ckptkit::Result<ckptkit::VerifyReport> {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("x.ckpk");
    std::fs::write(&p, b).expect("write");
    ckptkit::migrate::verify(&p)
}

/// The header of container bytes.
pub fn header(b: &[u8]) -> FixedHeader {
    FixedHeader::decode(b, b.len() as u64).expect("valid header")
}

/// Replaces the manifest bytes and fixes length and digest.
pub fn with_manifest_bytes(b: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let h = header(b);
    let mut m = b[h.manifest_offset as usize..].to_vec();
    f(&mut m);
    let mut out = b[..h.manifest_offset as usize].to_vec();
    let mut nh = h;
    nh.manifest_len = m.len() as u64;
    nh.digest = FixedHeader::compute_digest(&nh.prefix(), &m);
    out[..64].copy_from_slice(&nh.encode());
    out.extend_from_slice(&m);
    out
}

/// Decodes, mutates, re-encodes the manifest (fixing the digest).
pub fn with_manifest(b: &[u8], f: impl FnOnce(&mut Manifest)) -> Vec<u8> {
    with_manifest_bytes(b, |mb| {
        let mut m = decode_manifest(mb).expect("valid manifest");
        f(&mut m);
        *mb = encode_manifest(&m).expect("encode");
    })
}

/// Recomputes the digest after editing header fields.
pub fn refix_digest(b: &mut [u8]) {
    let mut prefix = [0u8; 32];
    prefix.copy_from_slice(&b[..32]);
    let off = u64::from_le_bytes(b[16..24].try_into().unwrap()) as usize;
    let d = FixedHeader::compute_digest(&prefix, &b[off.min(b.len())..]);
    b[32..64].copy_from_slice(&d);
}

/// The names in a directory, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A temp path for a test.
pub fn tmp(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// The case directories (those holding a `case.json`) of a fixture family
/// under tests/fixtures, sorted; at least `min` of them must exist.
pub fn fixture_cases(family: &str, min: usize) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(family);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("fixtures directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    v.sort();
    assert!(v.len() >= min, "{family} fixtures missing");
    v
}

/// A stored tensor: dtype, shape, bytes.
pub type Stored = (Dtype, Vec<u64>, Vec<u8>);

/// Every tensor of a safetensors file, by key.
pub fn stored_tensors(p: &Path) -> BTreeMap<String, Stored> {
    use ckptkit::TensorSource;
    let f = ckptkit::SafetensorsFile::open(p).unwrap();
    f.tensors()
        .iter()
        .map(|t| {
            (
                t.key.clone(),
                (t.dtype, t.shape.clone(), f.read(&t.key).unwrap().to_vec()),
            )
        })
        .collect()
}

/// A copy of a fixture's model directory (`model.safetensors` and its
/// `config.json`) in `to`, with tensor `key` replaced by `new` (or removed);
/// returns the copied `model.safetensors`.
pub fn fixture_with_tensor(dir: &Path, to: &Path, key: &str, new: Option<Stored>) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(dir.join("config.json"), to.join("config.json")).unwrap();
    let mut t = stored_tensors(&dir.join("model.safetensors"));
    match new {
        Some(v) => t.insert(key.to_string(), v),
        None => t.remove(key),
    };
    let plan: Vec<_> = t
        .iter()
        .map(|(k, (d, s, _))| (k.clone(), *d, s.clone()))
        .collect();
    let p = to.join("model.safetensors");
    let w = ckptkit::SafetensorsWriter::create(&p, &plan, &BTreeMap::new(), false, false).unwrap();
    for (k, (_, _, b)) in &t {
        w.write_tensor(k, b).unwrap();
    }
    w.finish().unwrap();
    p
}

/// A fixture case's `case.json`.
pub fn case_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap()
}

/// A JSON array of strings.
pub fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

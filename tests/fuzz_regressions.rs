//! Replays the fuzz seeds and regressions through the same functions the
//! `cargo fuzz` targets call (`ckptkit::fuzzing`), in a debug build, so
//! overflow checks are on. A file that panics fails the test.
//!
//! `cargo test --test fuzz_regressions -- --ignored write_seeds` regenerates
//! `fuzz/seeds/` and the hand-made files in `fuzz/regressions/`.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use ckptkit::fuzzing;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 9] = [
    ("container", fuzzing::container_bytes),
    ("manifest", fuzzing::manifest_bytes),
    ("safetensors", fuzzing::safetensors_bytes),
    ("writer_ops", fuzzing::writer_ops),
    ("chunk_codec", fuzzing::chunk_codec),
    ("layout_detect", fuzzing::layout_detect),
    ("side_json", fuzzing::side_json),
    ("migration", fuzzing::migration),
    ("gguf", fuzzing::gguf_bytes),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            // README-like notes next to the inputs are not inputs
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".md") || n.starts_with('.'))
        })
        .collect();
    v.sort();
    v
}

fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = e.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = e.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

fn replay(name: &str, f: Target) {
    let root = fuzz_dir();
    if !root.exists() {
        eprintln!("no fuzz/ directory (packaged crate?): nothing to replay");
        return;
    }
    let seeds = files_in(&root.join("seeds").join(name));
    assert!(
        !seeds.is_empty(),
        "fuzz/seeds/{name}/ is empty; regenerate with `cargo test --test fuzz_regressions -- --ignored write_seeds`"
    );
    let mut files = seeds;
    files.extend(files_in(&root.join("regressions").join(name)));
    let mut failures = Vec::new();
    for p in &files {
        let data = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| f(&data))) {
            failures.push(format!("{}: {}", p.display(), panic_message(&*e)));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} {name} inputs panicked:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    eprintln!("{name}: {} inputs replayed", files.len());
}

#[test]
fn replay_container() {
    replay(TARGETS[0].0, TARGETS[0].1);
}

#[test]
fn replay_manifest() {
    replay(TARGETS[1].0, TARGETS[1].1);
}

#[test]
fn replay_safetensors() {
    replay(TARGETS[2].0, TARGETS[2].1);
}

#[test]
fn replay_writer_ops() {
    replay(TARGETS[3].0, TARGETS[3].1);
}

#[test]
fn replay_chunk_codec() {
    replay(TARGETS[4].0, TARGETS[4].1);
}

#[test]
fn replay_layout_detect() {
    replay(TARGETS[5].0, TARGETS[5].1);
}

#[test]
fn replay_side_json() {
    replay(TARGETS[6].0, TARGETS[6].1);
}

#[test]
fn replay_migration() {
    replay(TARGETS[7].0, TARGETS[7].1);
}

#[test]
fn replay_gguf() {
    replay(TARGETS[8].0, TARGETS[8].1);
}

// ---------------------------------------------------------------------------
// seed generation

mod gen {
    use super::*;
    use ckptkit::{ContainerOptions, ContainerWriter, Dtype, SafetensorsWriter, ZstdOptions};

    pub struct Out {
        root: PathBuf,
        tmp: PathBuf,
    }

    impl Out {
        pub fn new() -> Out {
            let tmp = std::env::temp_dir().join(format!("ckptkit-seedgen-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).unwrap();
            Out {
                root: fuzz_dir(),
                tmp,
            }
        }

        pub fn put(&self, kind: &str, target: &str, name: &str, bytes: &[u8]) {
            let d = self.root.join(kind).join(target);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(name), bytes).unwrap();
        }

        pub fn tmp(&self, name: &str) -> PathBuf {
            self.tmp.join(name)
        }
    }

    impl Drop for Out {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }

    pub type Spec = (String, Dtype, Vec<u64>, Vec<u8>);

    pub fn spec(key: &str, dtype: Dtype, shape: &[u64], fill: impl Fn(usize) -> u8) -> Spec {
        let n = ckptkit::byte_len(dtype, shape).unwrap() as usize;
        (
            key.into(),
            dtype,
            shape.to_vec(),
            (0..n).map(fill).collect(),
        )
    }

    /// bf16 values near 1.0 (exponent plane nearly constant).
    pub fn bf16ish(i: usize) -> u8 {
        if i % 2 == 1 {
            0x3f
        } else {
            (i as u8).wrapping_mul(37)
        }
    }

    pub fn container(
        out: &Out,
        name: &str,
        compression: Option<ZstdOptions>,
        shards: &[(&str, Vec<Spec>, BTreeMap<String, String>)],
        metadata: BTreeMap<String, String>,
    ) -> Vec<u8> {
        let path = out.tmp(name);
        let mut w = ContainerWriter::create(
            &path,
            ContainerOptions::default()
                .compression(compression)
                .overwrite(true),
        )
        .unwrap();
        for (sname, specs, md) in shards {
            let mut plan: Vec<(String, Dtype, Vec<u64>)> = specs
                .iter()
                .map(|(k, d, s, _)| (k.clone(), *d, s.clone()))
                .collect();
            w.begin_shard(sname, &plan, md).unwrap();
            ckptkit::format::data_order(&mut plan);
            for (k, _, _) in &plan {
                let data = &specs.iter().find(|s| &s.0 == k).unwrap().3;
                w.write_tensor(k, data).unwrap();
            }
            w.finish_shard().unwrap();
        }
        w.finish(None, metadata, Vec::new()).unwrap();
        std::fs::read(&path).unwrap()
    }

    pub fn safetensors(
        out: &Out,
        name: &str,
        specs: &[Spec],
        md: &BTreeMap<String, String>,
    ) -> Vec<u8> {
        let path = out.tmp(name);
        let plan: Vec<(String, Dtype, Vec<u64>)> = specs
            .iter()
            .map(|(k, d, s, _)| (k.clone(), *d, s.clone()))
            .collect();
        let w = SafetensorsWriter::create(&path, &plan, md, true, false).unwrap();
        for (k, _, _, data) in specs {
            w.write_tensor(k, data).unwrap();
        }
        w.finish().unwrap();
        std::fs::read(&path).unwrap()
    }

    /// The manifest bytes of a container (from the fixed header).
    pub fn manifest_of(c: &[u8]) -> Vec<u8> {
        let off = u64::from_le_bytes(c[16..24].try_into().unwrap()) as usize;
        let len = u64::from_le_bytes(c[24..32].try_into().unwrap()) as usize;
        c[off..off + len].to_vec()
    }

    /// Encoder for the `writer_ops` byte format (mirror of the decoder in
    /// `src/fuzzing.rs`).
    pub struct Ops(pub Vec<u8>);

    pub const KEY_ALPHABET: [&str; 10] = ["a", "b", "c", ".", "_", "0", "é", "\"", "\\", "\n"];

    impl Ops {
        pub fn new(flags: u8) -> Ops {
            Ops(vec![flags])
        }
        /// `mode`: 0 zeros, 1 repeated `bytes`, 2 float-like, 3 random.
        pub fn tensor(
            mut self,
            key: &str,
            dtype: usize,
            shape: &[u8],
            mode: u8,
            seed: u8,
            bytes: &[u8],
        ) -> Ops {
            self.0.push(0);
            let chars: Vec<u8> = key
                .chars()
                .map(|c| KEY_ALPHABET.iter().position(|a| a.starts_with(c)).unwrap() as u8)
                .collect();
            self.0.push(chars.len() as u8);
            self.0.extend(chars);
            self.0.push(dtype as u8);
            self.0.push(shape.len() as u8);
            self.0.extend_from_slice(shape);
            self.0.push(mode);
            self.0.push(seed);
            if mode == 1 {
                self.0.extend_from_slice(bytes);
            }
            self
        }
        fn kv(mut self, op: u8, k: &str, v: &str) -> Ops {
            self.0.push(op);
            self.0.push(k.len() as u8);
            self.0.extend_from_slice(k.as_bytes());
            self.0.push(v.len() as u8);
            self.0.extend_from_slice(v.as_bytes());
            self
        }
        pub fn shard_meta(self, k: &str, v: &str) -> Ops {
            self.kv(4, k, v)
        }
        pub fn meta(self, k: &str, v: &str) -> Ops {
            self.kv(5, k, v)
        }
        pub fn shard_break(mut self) -> Ops {
            self.0.push(6);
            self
        }
    }
}

/// Writes `fuzz/seeds/<target>/` and the hand-made `fuzz/regressions/`
/// inputs. Run it after a format change:
/// `cargo test --test fuzz_regressions -- --ignored write_seeds`.
#[test]
#[ignore]
fn write_seeds() {
    use ckptkit::{Dtype, ZstdOptions};
    use gen::*;

    let out = Out::new();
    // ---- gguf: the files gguf-py wrote (tests/fixtures/gguf)
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    for name in [
        "types-v3.gguf",
        "align64.gguf",
        "nested-array.gguf",
        "model-v3.gguf",
    ] {
        if let Ok(b) = std::fs::read(fixtures.join(name)) {
            out.put("seeds", "gguf", name, &b);
        }
    }
    let idx = |d: Dtype| Dtype::ALL.iter().position(|x| *x == d).unwrap();
    let md = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let zstd = |chunk_size, float_filter| {
        ZstdOptions::default()
            .level(1)
            .chunk_size(chunk_size)
            .float_filter(float_filter)
    };

    // ---- container (and its manifests)
    let plain = container(
        &out,
        "plain.ckpk",
        None,
        &[(
            "model.safetensors",
            vec![
                spec("proj.weight", Dtype::BF16, &[2, 3], bf16ish),
                spec("proj.bias", Dtype::BF16, &[2], |_| 0),
            ],
            BTreeMap::new(),
        )],
        BTreeMap::new(),
    );
    let compressed = container(
        &out,
        "zstd.ckpk",
        Some(zstd(4096, true)),
        &[(
            "model.safetensors",
            vec![
                spec("blk.0.w", Dtype::BF16, &[48, 64], bf16ish),
                spec("blk.0.q", Dtype::I8, &[40, 128], |i| (i % 7) as u8),
                spec("blk.0.s", Dtype::F32, &[3], |i| i as u8),
            ],
            md(&[("format", "pt")]),
        )],
        md(&[("step", "1000")]),
    );
    let two_shards = container(
        &out,
        "two.ckpk",
        Some(zstd(8192, false)),
        &[
            (
                "model-00001-of-00002.safetensors",
                vec![
                    spec("a.w", Dtype::F16, &[4, 4], |i| i as u8),
                    spec("a.e", Dtype::F8E4M3, &[0, 3], |_| 0),
                    spec("scalar", Dtype::I64, &[], |i| i as u8),
                ],
                md(&[("format", "pt"), ("k\"ey", "v\\al")]),
            ),
            (
                "model-00002-of-00002.safetensors",
                vec![spec("b.w", Dtype::U16, &[2, 2, 2], |i| (i * 3) as u8)],
                BTreeMap::new(),
            ),
        ],
        md(&[("note", "two shards"), ("é", "ü")]),
    );
    let empty = container(&out, "empty.ckpk", None, &[], BTreeMap::new());
    for (n, c) in [
        ("plain.ckpk", &plain),
        ("zstd.ckpk", &compressed),
        ("two_shards.ckpk", &two_shards),
        ("empty.ckpk", &empty),
    ] {
        out.put("seeds", "container", n, c);
        out.put(
            "seeds",
            "manifest",
            &n.replace(".ckpk", ".manifest"),
            &manifest_of(c),
        );
    }

    // ---- safetensors
    let st1 = safetensors(
        &out,
        "a.safetensors",
        &[
            spec("w", Dtype::F32, &[2, 2], |i| i as u8),
            spec("b", Dtype::BF16, &[3], bf16ish),
            spec("empty", Dtype::U8, &[0], |_| 0),
            spec("s", Dtype::C64, &[], |i| i as u8),
        ],
        &md(&[("format", "pt")]),
    );
    let st2 = safetensors(
        &out,
        "b.safetensors",
        &Dtype::ALL
            .iter()
            .enumerate()
            .map(|(i, d)| spec(&format!("t{i}"), *d, &[1, 2], |j| j as u8))
            .collect::<Vec<_>>(),
        &BTreeMap::new(),
    );
    out.put("seeds", "safetensors", "small.safetensors", &st1);
    out.put("seeds", "safetensors", "all_dtypes.safetensors", &st2);
    // with the per-tensor hashes ckptkit's writer records (ckptkit.blake3)
    let hashed_path = out.tmp("hashed.safetensors");
    let plan: Vec<(String, Dtype, Vec<u64>)> = vec![
        ("w".into(), Dtype::F32, vec![2]),
        ("b".into(), Dtype::U8, vec![3]),
    ];
    let w = ckptkit::SafetensorsWriter::create(
        &hashed_path,
        &plan,
        &md(&[("format", "pt")]),
        true,
        true,
    )
    .unwrap();
    w.write_tensor("w", &[0, 0, 128, 63, 0, 0, 0, 64]).unwrap();
    w.write_tensor("b", &[1, 2, 3]).unwrap();
    w.finish().unwrap();
    out.put(
        "seeds",
        "safetensors",
        "hashed.safetensors",
        &std::fs::read(&hashed_path).unwrap(),
    );
    // the uncompressed shard of a container is a complete safetensors file
    let off = 64usize;
    let hl = u64::from_le_bytes(plain[off..off + 8].try_into().unwrap()) as usize + 8;
    out.put(
        "seeds",
        "safetensors",
        "from_container.safetensors",
        &plain[off..off + hl + 16],
    );

    // ---- writer_ops
    let seeds_ops = [
        (
            "plain_two_tensors",
            Ops::new(0)
                .tensor("a.c", idx(Dtype::BF16), &[3, 5], 2, 7, &[])
                .tensor("a.b", idx(Dtype::F32), &[5], 3, 1, &[]),
        ),
        (
            "zstd_planes_multichunk",
            Ops::new(0b101)
                .tensor("c.a", idx(Dtype::BF16), &[16, 16, 16], 2, 3, &[])
                .tensor("c.b", idx(Dtype::I8), &[16, 16, 16], 3, 9, &[])
                .shard_meta("format", "pt"),
        ),
        (
            "zstd_8k_shards_meta",
            Ops::new(0b011)
                .tensor("a0.c", idx(Dtype::F16), &[8, 8], 1, 0, &[1, 2, 3, 4, 5])
                .meta("step", "7")
                .shard_break()
                .tensor("b0.c", idx(Dtype::U64), &[2, 3], 0, 0, &[])
                .tensor("b0.a", idx(Dtype::F8E8M0), &[], 3, 5, &[])
                .shard_meta("k", "v"),
        ),
        (
            "escapes",
            Ops::new(0b1101)
                .tensor("é\"\\\n", idx(Dtype::F32), &[2], 3, 2, &[])
                .tensor("_.0", idx(Dtype::Bool), &[1, 1, 1, 1], 1, 0, &[1])
                .shard_meta("\"q\"", "\u{1F600}"),
        ),
        (
            "empty_tensor",
            Ops::new(1)
                .tensor("a", idx(Dtype::I32), &[0, 4], 0, 0, &[])
                .tensor("b", idx(Dtype::I32), &[4], 3, 0, &[]),
        ),
    ];
    for (n, ops) in seeds_ops {
        out.put("seeds", "writer_ops", n, &ops.0);
    }

    // ---- chunk_codec: [codec, dtype, level, out_len (2 bytes LE), payload]
    let cc = |name: &str, codec: u8, d: Dtype, payload: Vec<u8>| {
        let mut b = vec![codec, idx(d) as u8, 0];
        b.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        b.extend(payload);
        out.put("seeds", "chunk_codec", name, &b);
    };
    cc(
        "planes_bf16",
        2,
        Dtype::BF16,
        (0..2048).map(bf16ish).collect(),
    );
    cc(
        "planes_f32",
        2,
        Dtype::F32,
        (0..1024).map(|i| (i % 5) as u8).collect(),
    );
    cc("zstd_zeros", 1, Dtype::U8, vec![0; 1000]);
    cc(
        "zstd_random",
        1,
        Dtype::I8,
        (0..300u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect(),
    );
    cc("plain", 0, Dtype::U8, b"plain bytes".to_vec());
    let frame = zstd::bulk::compress(&[0u8; 4096], 1).unwrap();
    let mut b = vec![1, idx(Dtype::U8) as u8, 0, 0x00, 0x10];
    b.extend_from_slice(&frame);
    out.put("seeds", "chunk_codec", "zstd_frame_as_stored", &b);

    // ---- hand-made regressions
    // safetensors: 8 contiguous U8 tensors of 2^61-1 bytes each; the data
    // end is 2^64-8, so `8 + N + end` overflows (safetensors 0.8.0 panics
    // in debug builds at tensor.rs:420).
    let big = (1u64 << 61) - 1;
    let mut json = String::from("{");
    for i in 0..8u64 {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            "\"t{i}\":{{\"dtype\":\"U8\",\"shape\":[{big}],\"data_offsets\":[{},{}]}}",
            i * big,
            (i + 1) * big
        ));
    }
    json.push('}');
    let mut st = (json.len() as u64).to_le_bytes().to_vec();
    st.extend_from_slice(json.as_bytes());
    out.put("regressions", "safetensors", "overflow_8x2p61", &st);
    // shape whose element count overflows
    let json = br#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,0]}}"#;
    let mut st = (json.len() as u64).to_le_bytes().to_vec();
    st.extend_from_slice(json);
    out.put("regressions", "safetensors", "shape_overflow", &st);
    // header length claiming 2^63
    let mut st = (1u64 << 63).to_le_bytes().to_vec();
    st.extend_from_slice(b"{}");
    out.put("regressions", "safetensors", "huge_header_len", &st);

    // gguf: an F32 tensor with a zero dimension between dimensions whose
    // product overflows; 0 elements in ggml's order, an overflow in the
    // reversed order the planner multiplies in (found by the fuzzer)
    let mut g = b"GGUF".to_vec();
    g.extend(3u32.to_le_bytes());
    g.extend(1u64.to_le_bytes()); // tensors
    g.extend(0u64.to_le_bytes()); // metadata pairs
    let name = b"ckptkit.test.zero_dim";
    g.extend((name.len() as u64).to_le_bytes());
    g.extend(name);
    g.extend(4u32.to_le_bytes());
    for d in [25210765039u64, 0, 17873661021126656, 18084767257853952] {
        g.extend(d.to_le_bytes());
    }
    g.extend(0u32.to_le_bytes()); // F32
    g.extend(0u64.to_le_bytes()); // offset
    g.resize(g.len().next_multiple_of(32), 0);
    out.put("regressions", "gguf", "zero_dim_hides_overflow", &g);

    // gguf: an F64 value that is a NaN (i64::MAX's bytes), which once made
    // the target's whole-versus-prefix comparison fail (NaN != NaN)
    let mut g = b"GGUF".to_vec();
    g.extend(3u32.to_le_bytes()); // version
    g.extend(0u64.to_le_bytes()); // tensors
    g.extend(1u64.to_le_bytes()); // metadata pairs
    let name = b"ckptkit.test.f64";
    g.extend((name.len() as u64).to_le_bytes());
    g.extend(name);
    g.extend(12u32.to_le_bytes()); // F64
    g.extend(i64::MAX.to_le_bytes());
    g.resize(g.len().next_multiple_of(32), 0);
    out.put("regressions", "gguf", "nan_kv_value", &g);

    // manifest: a string length prefix of 2^40 (bincode varint 253 = u64)
    let mut m = vec![1, 0, 1, 253];
    m.extend_from_slice(&(1u64 << 40).to_le_bytes());
    m.extend_from_slice(b"xy");
    out.put("regressions", "manifest", "huge_string_len", &m);
    // a map length of 2^60
    let mut m = vec![1, 0, 253];
    m.extend_from_slice(&(1u64 << 60).to_le_bytes());
    out.put("regressions", "manifest", "huge_map_len", &m);
    // a valid manifest with one trailing byte / one byte missing
    let good = manifest_of(&two_shards);
    let mut t = good.clone();
    t.push(0);
    out.put("regressions", "manifest", "trailing_byte", &t);
    out.put(
        "regressions",
        "manifest",
        "truncated",
        &good[..good.len() - 1],
    );

    // container: truncations of a valid compressed container
    for cut in [7, 8, 63, 64, 65, 200, compressed.len() - 1] {
        out.put(
            "regressions",
            "container",
            &format!("truncated_{cut}"),
            &compressed[..cut],
        );
    }
    // manifest placed at offset 2^64-8 with length 16 (end overflows)
    let mut c = plain[..64].to_vec();
    c[16..24].copy_from_slice(&(u64::MAX - 7).to_le_bytes());
    c[24..32].copy_from_slice(&16u64.to_le_bytes());
    out.put("regressions", "container", "manifest_end_overflow", &c);

    // writer_ops: several empty tensors share data offset 0; the
    // safetensors crate orders them in HashMap order, so the cross-check in
    // st_header::parse failed at random (found by fuzzing).
    let mut ops = Ops::new(1);
    for k in ["a", "b", "c", "0", "_", "é"] {
        ops = ops.tensor(k, idx(Dtype::F32), &[0], 0, 0, &[]);
    }
    out.put("regressions", "writer_ops", "six_empty_tensors", &ops.0);
    // writer_ops: keys `a` and `.a` both became layer ``, tensor `a` in
    // schema::plain_layers, so finish(None, ..) failed validation.
    let ops = Ops::new(0)
        .tensor("a", idx(Dtype::U8), &[1], 0, 0, &[])
        .tensor(".a", idx(Dtype::U8), &[1], 0, 0, &[]);
    out.put("regressions", "writer_ops", "dot_key_collision", &ops.0);

    // chunk_codec: a float-planes record claiming u32::MAX bytes
    let mut b = vec![2, idx(Dtype::BF16) as u8, 0, 8, 0];
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    b.extend_from_slice(&[1, 2, 3, 4]);
    out.put("regressions", "chunk_codec", "planes_len_u32max", &b);
}

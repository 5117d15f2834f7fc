//! Write → read properties of the container, bit-flip detection, and shard
//! identity with the safetensors crate.

mod common;

use std::collections::BTreeMap;

use ckptkit::{Container, Dtype, ZstdOptions};
use common::*;
use proptest::prelude::*;

const DTYPES: [Dtype; 7] = [
    Dtype::BF16,
    Dtype::F16,
    Dtype::F32,
    Dtype::I8,
    Dtype::U8,
    Dtype::F8E4M3,
    Dtype::F8E5M2,
];

fn tensor_strategy() -> impl Strategy<Value = (Dtype, Vec<u64>, u64)> {
    (
        0usize..DTYPES.len(),
        proptest::collection::vec(0u64..6, 0..=4),
        any::<u64>(),
    )
        .prop_map(|(d, s, seed)| (DTYPES[d], s, seed))
}

fn shards_strategy() -> impl Strategy<Value = Vec<Vec<(Dtype, Vec<u64>, u64)>>> {
    proptest::collection::vec(proptest::collection::vec(tensor_strategy(), 0..6), 1..4)
}

fn build(spec: &[Vec<(Dtype, Vec<u64>, u64)>]) -> Vec<(String, Vec<T>, BTreeMap<String, String>)> {
    spec.iter()
        .enumerate()
        .map(|(si, ts)| {
            let tensors = ts
                .iter()
                .enumerate()
                .map(|(ti, (d, s, seed))| {
                    let n = ckptkit::byte_len(*d, s).unwrap() as usize;
                    (
                        format!("layer{si}.m{ti}.weight"),
                        *d,
                        s.clone(),
                        bytes(*seed, n),
                    )
                })
                .collect();
            let mut md = BTreeMap::new();
            md.insert("format".into(), "pt".into());
            md.insert(format!("shard{si}"), "x\"y\\z".into());
            (format!("part-{si}.safetensors"), tensors, md)
        })
        .collect()
}

fn check_roundtrip(spec: &[Vec<(Dtype, Vec<u64>, u64)>], comp: Option<ZstdOptions>) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("rt.ckpk");
    let shards = build(spec);
    let mut user = BTreeMap::new();
    user.insert("training_step".to_string(), "123".to_string());
    let written = write_container(&p, &shards, comp, user.clone()).unwrap();
    let c = Container::open(&p).unwrap();
    assert_eq!(c.manifest(), &written, "manifest read back differs");
    assert_eq!(c.manifest().metadata, user);
    assert_eq!(c.manifest().shards.len(), shards.len());
    for (si, (name, ts, md)) in shards.iter().enumerate() {
        assert_eq!(&c.manifest().shards[si].name, name);
        assert_eq!(c.shard_metadata(si as u32).unwrap(), md);
        for (k, dt, s, b) in ts {
            let st = c.manifest().shards[si]
                .tensors
                .iter()
                .find(|t| &t.key == k)
                .unwrap();
            assert_eq!((st.dtype, &st.shape), (*dt, s));
            let got = c.read_tensor(si as u32, k).unwrap();
            assert_eq!(&got[..], &b[..], "bytes of {k}");
        }
    }
    let r = c.verify().unwrap();
    assert_eq!(
        r.tensors as usize,
        shards.iter().map(|s| s.1.len()).sum::<usize>()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn write_read_identical_uncompressed(spec in shards_strategy()) {
        check_roundtrip(&spec, None);
    }

    #[test]
    fn write_read_identical_compressed(spec in shards_strategy(), filter in any::<bool>()) {
        check_roundtrip(&spec, Some(ZstdOptions::default().level(1).chunk_size(4096).float_filter(filter)));
    }
}

#[test]
fn large_tensor_spans_many_chunks() {
    let spec = vec![vec![
        (Dtype::BF16, vec![300, 40], 7),
        (Dtype::I8, vec![9000], 8),
    ]];
    check_roundtrip(
        &spec,
        Some(
            ZstdOptions::default()
                .level(3)
                .chunk_size(4096)
                .float_filter(true),
        ),
    );
    check_roundtrip(
        &spec,
        Some(
            ZstdOptions::default()
                .level(1)
                .chunk_size(4096)
                .float_filter(false),
        ),
    );
}

fn flips_all_detected(b: &[u8]) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f.ckpk");
    let mut undetected = Vec::new();
    let mut buf = b.to_vec();
    for byte in 0..b.len() {
        for bit in 0..8 {
            buf[byte] ^= 1 << bit;
            std::fs::write(&p, &buf).unwrap();
            let ok = Container::open(&p).and_then(|c| c.verify()).is_ok();
            if ok {
                undetected.push((byte, bit));
            }
            buf[byte] ^= 1 << bit;
        }
    }
    assert!(undetected.is_empty(), "undetected flips at {undetected:?}");
}

#[test]
fn every_single_bit_flip_is_detected_uncompressed() {
    flips_all_detected(&base_container(false));
}

#[test]
fn every_single_bit_flip_is_detected_compressed() {
    flips_all_detected(&base_container(true));
}

struct V(safetensors::Dtype, Vec<usize>, Vec<u8>);
impl safetensors::View for &V {
    fn dtype(&self) -> safetensors::Dtype {
        self.0
    }
    fn shape(&self) -> &[usize] {
        &self.1
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.2)
    }
    fn data_len(&self) -> usize {
        self.2.len()
    }
}

fn shard_identity(spec: &[Vec<(Dtype, Vec<u64>, u64)>], comp: Option<ZstdOptions>) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("id.ckpk");
    let shards: Vec<_> = build(spec)
        .into_iter()
        .map(|(n, ts, _)| {
            let mut md = BTreeMap::new();
            md.insert("format".to_string(), "pt".to_string());
            md.insert("step".to_string(), "7".to_string());
            (n, ts, md)
        })
        .collect();
    write_container(&p, &shards, comp, BTreeMap::new()).unwrap();
    let c = Container::open(&p).unwrap();
    for (si, (_, ts, md)) in shards.iter().enumerate() {
        let out = d.path().join(format!("shard{si}.safetensors"));
        c.extract_shard(si as u32, &out, false).unwrap();
        let ours = std::fs::read(&out).unwrap();
        // the safetensors crate reads every tensor and the metadata back
        let (n, meta) = safetensors::SafeTensors::read_metadata(&ours).unwrap();
        let st = safetensors::SafeTensors::deserialize(&ours).unwrap();
        assert_eq!(st.len(), ts.len());
        for (k, dt, shape, bytes) in ts {
            let v = st.tensor(k).unwrap();
            assert_eq!(v.dtype(), dt.to_st(), "{k}");
            assert_eq!(
                v.shape(),
                &shape.iter().map(|&x| x as usize).collect::<Vec<_>>()[..]
            );
            assert_eq!(v.data(), &bytes[..], "{k}");
        }
        let theirs_md: BTreeMap<String, String> = meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        assert_eq!(&theirs_md, md);
        // the writer's convention: data starts at a multiple of 64, every
        // tensor at a multiple of its alignment class, back to back
        let data_start = 8 + n as u64;
        assert_eq!(
            data_start % 64,
            0,
            "shard {si}: data section at {data_start}"
        );
        let mut infos: Vec<(u64, u64)> = meta
            .tensors()
            .values()
            .map(|i| (i.data_offsets.0 as u64, i.data_offsets.1 as u64))
            .collect();
        infos.sort();
        let mut pos = 0;
        for (start, end) in infos {
            assert_eq!(start, pos, "no holes");
            let class = ckptkit::fuzzing::internals::st_header::align_class(end - start);
            assert_eq!(start % class, 0, "a {}-byte tensor at {start}", end - start);
            pos = end;
        }
        // uncompressed shards are the same bytes in place
        if comp.is_none() {
            let s = &c.manifest().shards[si];
            let whole = std::fs::read(&p).unwrap();
            assert_eq!(
                &whole[s.offset as usize..(s.offset + s.stored_len) as usize],
                &ours[..]
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn extracted_shards_read_in_safetensors_and_are_aligned(spec in shards_strategy(), z in any::<bool>()) {
        shard_identity(&spec, z.then(ZstdOptions::default));
    }
}

#[test]
fn tensor_data_is_aligned_for_zero_copy() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("al.ckpk");
    let spec = vec![
        vec![(Dtype::I8, vec![3], 1), (Dtype::F32, vec![5], 2)],
        vec![
            (Dtype::U8, vec![7], 3),
            (Dtype::F64, vec![2], 4),
            (Dtype::BF16, vec![3], 5),
        ],
    ];
    write_container(&p, &build(&spec), None, BTreeMap::new()).unwrap();
    let c = Container::open(&p).unwrap();
    for (si, s) in c.manifest().shards.iter().enumerate() {
        assert_eq!(s.offset % 64, 0);
        for t in &s.tensors {
            let b = c.read_tensor(si as u32, &t.key).unwrap();
            assert_eq!(
                b.as_ptr() as usize % t.dtype.size(),
                0,
                "{} misaligned",
                t.key
            );
        }
    }
}

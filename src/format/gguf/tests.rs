//! The GGUF header parser against files gguf-py 0.19.0 wrote
//! (tests/fixtures/gguf, whose README says how they were made), and one
//! named test per kind of hostile header.

use super::read::{parse, Header, Parsed, Value, MAX_DEPTH, MAX_TENSORS, MAX_VALUES};
use crate::error::ErrorKind;

fn fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_slice(&fixture(name)).unwrap()
}

fn header(bytes: &[u8]) -> Header {
    match parse(bytes, bytes.len() as u64).unwrap() {
        Parsed::Done(h) => *h,
        Parsed::NeedMore(n) => panic!("asks for {n} bytes of a whole file"),
    }
}

fn err(bytes: &[u8]) -> crate::Error {
    match parse(bytes, bytes.len() as u64) {
        Err(e) => e,
        Ok(p) => panic!("accepted: {p:?}"),
    }
}

/// The JSON form of a parsed value, as the fixture generator writes it.
fn as_json(v: &Value) -> serde_json::Value {
    use serde_json::json;
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::F32(x) => json!(*x as f64),
        Value::Bool(x) => json!(x),
        Value::Str(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F64(x) => json!(x),
        Value::Array(_, items) => serde_json::Value::Array(items.iter().map(as_json).collect()),
    }
}

/// The generator's nested-array form, flattened to plain JSON arrays.
fn plain_json(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(plain_json).collect()),
        serde_json::Value::Object(o) if o.contains_key("value") => plain_json(&o["value"]),
        x => x.clone(),
    }
}

fn check_against_json(h: &Header, j: &serde_json::Value) {
    assert_eq!(h.alignment, j["alignment"].as_u64().unwrap());
    assert_eq!(h.data_start, j["data_start"].as_u64().unwrap());
    let kv = j["kv"].as_array().unwrap();
    assert_eq!(h.kvs.len(), kv.len());
    for (k, want) in h.kvs.iter().zip(kv) {
        assert_eq!(k.key, want["key"].as_str().unwrap());
        assert_eq!(k.offset, want["offset"].as_u64().unwrap(), "{}", k.key);
        assert_eq!(
            u64::from(k.value.type_id()),
            want["type_id"].as_u64().unwrap(),
            "{}",
            k.key
        );
        assert_eq!(as_json(&k.value), plain_json(&want["value"]), "{}", k.key);
        // floats bit for bit where the generator recorded the bits
        if let Some(bits) = want.get("bits") {
            let got: Vec<String> = match &k.value {
                Value::F32(x) => vec![format!("{:#010x}", x.to_bits())],
                Value::F64(x) => vec![format!("{:#018x}", x.to_bits())],
                Value::Array(_, items) => items
                    .iter()
                    .map(|v| match v {
                        Value::F32(x) => format!("{:#010x}", x.to_bits()),
                        Value::F64(x) => format!("{:#018x}", x.to_bits()),
                        v => panic!("{v:?}"),
                    })
                    .collect(),
                v => panic!("{v:?}"),
            };
            let want: Vec<String> = match bits {
                serde_json::Value::String(s) => vec![s.clone()],
                a => a
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect(),
            };
            assert_eq!(got, want, "{}", k.key);
        }
    }
    let ts = j["tensors"].as_array().unwrap();
    assert_eq!(h.tensors.len(), ts.len());
    for (t, want) in h.tensors.iter().zip(ts) {
        assert_eq!(t.name, want["name"].as_str().unwrap());
        assert_eq!(t.ty.name, want["ggml_type"].as_str().unwrap());
        let ne: Vec<u64> = want["ne"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(t.ne, ne, "{}", t.name);
        let shape: Vec<u64> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(t.shape(), shape, "{}", t.name);
        assert_eq!(t.offset, want["offset"].as_u64().unwrap(), "{}", t.name);
        assert_eq!(t.n_bytes, want["n_bytes"].as_u64().unwrap(), "{}", t.name);
        assert_eq!(
            t.info_offset,
            want["info_offset"].as_u64().unwrap(),
            "{}",
            t.name
        );
    }
}

#[test]
fn reads_every_kv_and_tensor_type_gguf_py_wrote() {
    let b = fixture("types-v3.gguf");
    let h = header(&b);
    assert_eq!(h.version, 3);
    let j = json("types-v3.json");
    assert_eq!(h.infos_end, j["tensor_info_end"].as_u64().unwrap());
    check_against_json(&h, &j);
}

#[test]
fn reads_v2_as_v3() {
    let h2 = header(&fixture("types-v2.gguf"));
    let mut h3 = header(&fixture("types-v3.gguf"));
    assert_eq!(h2.version, 2);
    h3.version = 2;
    assert_eq!(h2, h3);
}

#[test]
fn takes_the_alignment_from_the_last_kv() {
    let h = header(&fixture("align64.gguf"));
    assert_eq!((h.alignment, h.data_start), (64, 320));
    check_against_json(&h, &json("align64.json"));
}

#[test]
fn reads_nested_arrays_and_what_follows_them() {
    let h = header(&fixture("nested-array.gguf"));
    check_against_json(&h, &json("nested-array.json"));
    assert_eq!(
        h.get("ckptkit.test.after_nested"),
        Some(&Value::U32(0xdead_beef))
    );
}

#[test]
fn a_short_prefix_asks_for_more_then_parses() {
    let b = fixture("types-v3.gguf");
    let mut have = 64usize;
    loop {
        match parse(&b[..have], b.len() as u64).unwrap() {
            Parsed::Done(h) => {
                assert_eq!(*h, header(&b));
                break;
            }
            Parsed::NeedMore(n) => {
                assert!(n as usize > have && n as usize <= b.len());
                have = n as usize;
            }
        }
    }
}

// ---- hostile headers: a tiny writer, then one test per attack ----

/// A GGUF header under construction (little-endian, as the spec says).
#[derive(Default, Clone)]
struct G {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_t: u64,
    version: u32,
    data: Vec<u8>,
    align: u64,
}

impl G {
    fn new() -> G {
        G {
            version: 3,
            align: 32,
            ..Default::default()
        }
    }
    fn s(out: &mut Vec<u8>, s: &[u8]) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s);
    }
    fn kv_raw(mut self, key: &str, ty: u32, value: &[u8]) -> G {
        Self::s(&mut self.kv, key.as_bytes());
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(value);
        self.n_kv += 1;
        self
    }
    fn tensor_raw(mut self, name: &str, ne: &[u64], ty: u32, offset: u64) -> G {
        Self::s(&mut self.infos, name.as_bytes());
        self.infos.extend((ne.len() as u32).to_le_bytes());
        for d in ne {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend(offset.to_le_bytes());
        self.n_t += 1;
        self
    }
    /// An F32 tensor with its data, laid out as GGUFWriter does.
    fn f32(mut self, name: &str, ne: &[u64]) -> G {
        let n: u64 = ne.iter().product();
        let off = self.data.len() as u64;
        self = self.tensor_raw(name, ne, 0, off);
        self.data.extend(vec![0u8; n as usize * 4]);
        while !(self.data.len() as u64).is_multiple_of(self.align) {
            self.data.push(0);
        }
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(self.version.to_le_bytes());
        b.extend(self.n_t.to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kv);
        b.extend(&self.infos);
        while !(b.len() as u64).is_multiple_of(self.align) {
            b.push(0);
        }
        b.extend(&self.data);
        b
    }
}

fn u32v(x: u32) -> Vec<u8> {
    x.to_le_bytes().to_vec()
}

fn message(e: &crate::Error) -> String {
    e.to_string()
}

#[test]
fn the_tiny_writer_makes_files_the_parser_reads() {
    let g = G::new()
        .kv_raw("general.architecture", 8, &{
            let mut v = Vec::new();
            G::s(&mut v, b"x");
            v
        })
        .f32("a.weight", &[3, 2])
        .f32("b.weight", &[5]);
    let h = header(&g.bytes());
    assert_eq!(h.tensors.len(), 2);
    assert_eq!(h.tensors[1].offset, 32);
    assert_eq!(h.tensors[0].shape(), vec![2, 3]);
}

#[test]
fn attack_bad_magic() {
    let mut b = G::new().bytes();
    b[0] = b'X';
    assert!(message(&err(&b)).contains("not a GGUF file"));
}

#[test]
fn attack_version_1_and_4_and_big_endian() {
    for (v, needle) in [
        (1u32, "version 1"),
        (4, "version 4"),
        (0x0300_0000, "big-endian"),
    ] {
        let mut g = G::new();
        g.version = v;
        let e = err(&g.bytes());
        assert!(matches!(e.kind(), ErrorKind::Unsupported(_)), "{e}");
        assert!(message(&e).contains(needle), "{e}");
        assert_eq!(e.location().offset, Some(4));
    }
}

#[test]
fn attack_kv_count_beyond_the_file() {
    let mut b = G::new().bytes();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = err(&b);
    assert!(matches!(e.kind(), ErrorKind::Truncated { .. }), "{e}");
    assert_eq!(e.location().offset, Some(16));
}

#[test]
fn attack_tensor_count_beyond_the_file_or_the_cap() {
    let mut b = G::new().bytes();
    b[8..16].copy_from_slice(&1000u64.to_le_bytes());
    assert!(matches!(err(&b).kind(), ErrorKind::Truncated { .. }));
    b[8..16].copy_from_slice(&(MAX_TENSORS + 1).to_le_bytes());
    assert!(matches!(err(&b).kind(), ErrorKind::LimitExceeded { .. }));
}

#[test]
fn attack_string_length_past_the_end() {
    let mut v = Vec::new();
    v.extend((1u64 << 40).to_le_bytes());
    v.extend(b"abc");
    let b = G::new().kv_raw("k", 8, &v).bytes();
    let e = err(&b);
    assert!(
        matches!(
            e.kind(),
            ErrorKind::Truncated { .. } | ErrorKind::LimitExceeded { .. }
        ),
        "{e}"
    );
    // a key whose length runs past the end
    let mut b = G::new().kv_raw("k", 4, &u32v(1)).bytes();
    b[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    let e = err(&b);
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    assert_eq!(e.location().offset, Some(24));
}

#[test]
fn attack_unknown_value_type() {
    let e = err(&G::new().kv_raw("k", 13, &[0; 8]).bytes());
    assert!(message(&e).contains("unknown GGUF value type 13"), "{e}");
    assert!(message(&e).contains("`k`"), "{e}");
    let mut arr = u32v(99);
    arr.extend(1u64.to_le_bytes());
    let e = err(&G::new().kv_raw("k", 9, &arr).bytes());
    assert!(message(&e).contains("unknown GGUF value type 99"), "{e}");
}

#[test]
fn attack_array_count_beyond_the_file() {
    let mut arr = u32v(8);
    arr.extend((u64::MAX / 2).to_le_bytes());
    let e = err(&G::new().kv_raw("k", 9, &arr).bytes());
    assert!(matches!(e.kind(), ErrorKind::Truncated { .. }), "{e}");
}

#[test]
fn attack_arrays_nested_past_the_depth_cap() {
    // MAX_DEPTH + 1 arrays, each holding the next
    let nest = |arrays: u32| {
        let mut v = Vec::new();
        for _ in 1..arrays {
            v.extend(u32v(9));
            v.extend(1u64.to_le_bytes());
        }
        v.extend(u32v(4));
        v.extend(0u64.to_le_bytes());
        v
    };
    let e = err(&G::new().kv_raw("deep", 9, &nest(MAX_DEPTH + 1)).bytes());
    assert!(
        matches!(e.kind(), ErrorKind::LimitExceeded { what, .. } if what.contains("nesting")),
        "{e}"
    );
    // MAX_DEPTH arrays deep is fine
    header(&G::new().kv_raw("deep", 9, &nest(MAX_DEPTH)).bytes());
}

#[test]
fn attack_more_values_than_the_cap() {
    // one u8 array of MAX_VALUES elements: with the array itself, one value
    // too many (each parsed value costs memory, a byte of file does not)
    let mut v = u32v(0);
    v.extend(MAX_VALUES.to_le_bytes());
    v.extend(vec![7u8; MAX_VALUES as usize]);
    let e = err(&G::new().kv_raw("big", 9, &v).bytes());
    assert!(
        matches!(e.kind(), ErrorKind::LimitExceeded { what, .. } if what.contains("values")),
        "{e}"
    );
}

#[test]
fn attack_bool_that_is_not_0_or_1() {
    let e = err(&G::new().kv_raw("b", 7, &[2]).bytes());
    assert!(message(&e).contains("0 or 1"), "{e}");
}

#[test]
fn attack_duplicate_key_and_duplicate_tensor() {
    let e = err(&G::new().kv_raw("k", 0, &[1]).kv_raw("k", 0, &[2]).bytes());
    assert!(message(&e).contains("appears twice"), "{e}");
    let e = err(&G::new().f32("t", &[4]).f32("t", &[4]).bytes());
    assert!(message(&e).contains("appears twice"), "{e}");
    assert_eq!(e.location().tensor.as_deref(), Some("t"));
}

#[test]
fn attack_alignment_not_a_u32_power_of_two() {
    let e = err(&G::new().kv_raw("general.alignment", 4, &u32v(48)).bytes());
    assert!(message(&e).contains("not a power of two"), "{e}");
    let e = err(&G::new().kv_raw("general.alignment", 4, &u32v(0)).bytes());
    assert!(message(&e).contains("not a power of two"), "{e}");
    let e = err(&G::new()
        .kv_raw("general.alignment", 10, &64u64.to_le_bytes())
        .bytes());
    assert!(message(&e).contains("must be a u32"), "{e}");
}

#[test]
fn attack_offsets_out_of_order_overlapping_or_with_gaps() {
    // b claims a's bytes (overlap), or starts after a gap
    for off in [0u64, 64, 5] {
        let g = G::new().f32("a", &[8]).tensor_raw("b", &[8], 0, off);
        let mut b = g.bytes();
        b.extend([0u8; 64]);
        let e = err(&b);
        assert!(message(&e).contains("expected 32"), "{off}: {e}");
        assert_eq!(e.location().tensor.as_deref(), Some("b"));
    }
}

#[test]
fn attack_data_past_the_end() {
    let mut b = G::new().f32("a", &[8]).bytes();
    b.truncate(b.len() - 1);
    let e = err(&b);
    assert!(matches!(e.kind(), ErrorKind::Truncated { .. }), "{e}");
    assert_eq!(e.location().tensor.as_deref(), Some("a"));
}

#[test]
fn attack_dims_whose_product_overflows() {
    let b = G::new()
        .tensor_raw("t", &[1 << 32, 1 << 32, 1 << 2], 0, 0)
        .bytes();
    let e = err(&b);
    assert!(matches!(e.kind(), ErrorKind::Overflow { .. }), "{e}");
    assert_eq!(e.location().tensor.as_deref(), Some("t"));
    // the element count fits, the byte length does not
    let b = G::new().tensor_raw("t", &[1 << 62, 2], 0, 0).bytes();
    assert!(matches!(err(&b).kind(), ErrorKind::Overflow { .. }));
    // a zero dimension does not hide an overflow of the others (the shape
    // a fuzzer found: 0 elements in ggml's order, an overflow in the
    // reversed order safetensors and the planner multiply in)
    let b = G::new()
        .tensor_raw(
            "t",
            &[25210765039, 0, 17873661021126656, 18084767257853952],
            0,
            0,
        )
        .bytes();
    let e = err(&b);
    assert!(matches!(e.kind(), ErrorKind::Overflow { .. }), "{e}");
    assert_eq!(e.location().tensor.as_deref(), Some("t"));
    // without the overflow, a zero dimension is a valid empty tensor
    header(
        &G::new()
            .tensor_raw("t", &[1 << 40, 0, 1 << 20], 0, 0)
            .bytes(),
    );
    // a dimension ggml reads as negative
    let b = G::new().tensor_raw("t", &[u64::MAX], 0, 0).bytes();
    assert!(message(&err(&b)).contains("negative"));
}

#[test]
fn attack_rank_past_the_cap() {
    let b = G::new().tensor_raw("t", &[1; 9], 0, 0).bytes();
    assert!(matches!(err(&b).kind(), ErrorKind::LimitExceeded { .. }));
}

#[test]
fn attack_unknown_tensor_type_and_partial_blocks() {
    let e = err(&G::new().tensor_raw("t", &[32], 4, 0).bytes());
    assert!(message(&e).contains("unknown ggml type 4"), "{e}");
    // Q8_0 rows of 48 elements
    let e = err(&G::new().tensor_raw("t", &[48], 8, 0).bytes());
    assert!(message(&e).contains("whole Q8_0 blocks"), "{e}");
}

#[test]
fn attack_names_that_are_not_utf8() {
    let mut g = G::new();
    G::s(&mut g.kv, &[0xff, 0xfe]);
    g.kv.extend(u32v(0));
    g.kv.push(0);
    g.n_kv = 1;
    assert!(message(&err(&g.bytes())).contains("not UTF-8"));
}

#[test]
fn every_truncation_of_a_real_file_is_an_error_not_a_panic() {
    let b = fixture("align64.gguf");
    for n in 0..b.len() {
        // the last tensor's trailing padding is not needed
        if n >= 448 + 68 {
            continue;
        }
        assert!(parse(&b[..n], n as u64).is_err(), "{n} bytes accepted");
    }
}

// ---- the writer's header: what GGUFWriter wrote, byte for byte ----

/// Re-plans a parsed file with the writer: same KVs (the alignment from
/// its own key), same tensors.
fn replan(h: &Header) -> super::write::Layout {
    use super::write::{layout, OutTensor};
    let kvs: Vec<(String, Value)> = h
        .kvs
        .iter()
        .filter(|k| k.key != super::read::ALIGNMENT_KEY)
        .map(|k| (k.key.clone(), k.value.clone()))
        .collect();
    let tensors: Vec<OutTensor> = h
        .tensors
        .iter()
        .map(|t| OutTensor {
            name: t.name.clone(),
            ty: t.ty,
            shape: t.shape(),
        })
        .collect();
    layout(&kvs, &tensors, h.alignment).unwrap()
}

#[test]
fn the_writer_plans_gguf_py_s_files_byte_for_byte() {
    for name in [
        "types-v3.gguf",
        "align64.gguf",
        "nested-array.gguf",
        "model-v3.gguf",
    ] {
        let b = fixture(name);
        let h = header(&b);
        let l = replan(&h);
        assert_eq!(l.header.len() as u64, h.data_start, "{name}");
        assert_eq!(l.header[..], b[..h.data_start as usize], "{name}");
        assert_eq!(l.file_len, b.len() as u64, "{name}");
        for (t, (n, off, len)) in h.tensors.iter().zip(&l.tensors) {
            assert_eq!(
                (&t.name, h.data_start + t.offset, t.n_bytes),
                (n, *off, *len)
            );
        }
        // and the parser reads the planned header back
        let mut again = l.header.clone();
        again.resize(l.file_len as usize, 0);
        let h2 = header(&again);
        assert_eq!((h2.kvs, h2.tensors), (h.kvs.clone(), h.tensors.clone()));
    }
}

#[test]
fn the_writer_refuses_what_readers_would_not_take() {
    use super::write::{layout, OutTensor};
    let t = |name: &str, ty: &str, shape: &[u64]| OutTensor {
        name: name.into(),
        ty: crate::format::gguf::GgmlType::from_name(ty).unwrap(),
        shape: shape.to_vec(),
    };
    let long = "x".repeat(128);
    let cases: Vec<(Vec<OutTensor>, &str)> = vec![
        (vec![t(&long, "F32", &[2])], "at most 127"),
        (vec![t("a", "F32", &[2]), t("a", "F32", &[2])], "twice"),
        (vec![t("a", "F32", &[1, 1, 1, 1, 1])], "1 to 4"),
        (vec![t("a", "Q8_0", &[2, 48])], "whole Q8_0 blocks"),
    ];
    for (ts, needle) in cases {
        let e = layout(&[], &ts, 32).unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
    }
    let kv = |k: &str, v: Value| (k.to_string(), v);
    assert!(layout(&[kv("general.alignment", Value::U32(64))], &[], 32).is_err());
    assert!(layout(&[kv("k", Value::U8(1)), kv("k", Value::U8(2))], &[], 32).is_err());
    assert!(layout(&[kv("k", Value::Array(4, vec![Value::U8(1)]))], &[], 32).is_err());
    assert!(layout(&[], &[], 48).is_err());
}

//! GGUF files gguf-py 0.19.0 wrote (tests/fixtures/gguf, see its README)
//! through the public API: opened as a source, inspected, converted to
//! plain (bit-identical to gguf-py's dequantization), kept (the raw blocks
//! byte for byte, with the record that reads them back), and refused with
//! a typed error where ckptkit cannot read them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ckptkit::migrate::{convert, inspect, ConvertOptions, Pass, PlanOptions, Target};
use ckptkit::{open_source, Dtype, ErrorKind, SafetensorsFile, TensorSource};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

/// key -> (dtype, shape, bytes)
type Tensors = BTreeMap<String, (Dtype, Vec<u64>, Vec<u8>)>;

fn tensors(src: &dyn TensorSource) -> Tensors {
    src.tensors()
        .iter()
        .map(|t| {
            (
                t.key.clone(),
                (t.dtype, t.shape.clone(), src.read(&t.key).unwrap().to_vec()),
            )
        })
        .collect()
}

fn st(p: &Path) -> (Tensors, BTreeMap<String, String>) {
    let f = SafetensorsFile::open(p).unwrap();
    let md = f.metadata().clone();
    (tensors(&f), md)
}

fn to(target: &str) -> ConvertOptions {
    ConvertOptions::default().target(Target::parse(target).unwrap())
}

/// The expected tensors gguf-py wrote beside a fixture: `<name>` its
/// dequantization (F32), `<name>.raw` its stored bytes.
fn expected(stem: &str) -> Tensors {
    st(&fixture(&format!("{stem}.expected.safetensors"))).0
}

fn bits_equal(a: &[u8], b: &[u8]) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("{} bytes vs {}", a.len(), b.len()));
    }
    match a.chunks(4).zip(b.chunks(4)).position(|(x, y)| x != y) {
        None => Ok(()),
        Some(i) => Err(format!(
            "element {i}: {:02x?} vs {:02x?}",
            &a[i * 4..i * 4 + 4],
            &b[i * 4..i * 4 + 4]
        )),
    }
}

#[test]
fn a_gguf_file_is_recognised_and_its_blocks_are_listed_as_raw_bytes() {
    let p = fixture("align64.gguf");
    // read as GGUF, not as safetensors (which it is not)
    let src = open_source(&p).unwrap();
    let t = tensors(src.as_ref());
    let exp = expected("align64");
    // F16 and I8 as themselves; Q8_0 as its raw blocks, U8 [rows, row_bytes]
    assert_eq!(t["a.f16"].0, Dtype::F16);
    assert_eq!(t["a.f16"].1, vec![3, 7]);
    assert_eq!(t["a.f16"].2, exp["a.f16.raw"].2);
    assert_eq!(t["b.i8"], exp["b.i8"]);
    assert_eq!(t["c.q8_0"].0, Dtype::U8);
    assert_eq!(t["c.q8_0"].1, vec![1, 68]);
    assert_eq!(t["c.q8_0"].2, exp["c.q8_0.raw"].2);
    let md = src.metadata();
    let recorded: serde_json::Value = serde_json::from_str(&md["ckptkit.gguf.tensors"]).unwrap();
    assert_eq!(
        recorded["tensors"]["c.q8_0"],
        serde_json::json!({"type": "Q8_0", "shape": [1, 64]})
    );
    let kv: serde_json::Value = serde_json::from_str(&md["ckptkit.gguf.kv"]).unwrap();
    let last = kv["kv"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        last,
        serde_json::json!({"key": "general.alignment", "type": "u32", "value": 64})
    );
}

#[test]
fn inspect_names_the_ggml_type_of_each_quantized_layer() {
    let r = inspect(&fixture("align64.gguf"), &ConvertOptions::default()).unwrap();
    let c = r.layers.iter().find(|l| l.path == "c").unwrap();
    assert_eq!(c.layout, "gguf:Q8_0");
    assert_eq!(
        c.tensors,
        vec![("q8_0".to_string(), "F32".to_string(), vec![1, 64])]
    );
    let a = r.layers.iter().find(|l| l.path == "a").unwrap();
    assert_eq!(a.layout, "plain F16");
}

#[test]
fn plain_is_gguf_py_dequantization_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plain.safetensors");
    convert(&fixture("align64.gguf"), &out, &to("plain")).unwrap();
    let (t, md) = st(&out);
    let exp = expected("align64");
    assert_eq!(t["c.q8_0"].0, Dtype::F32);
    assert_eq!(t["c.q8_0"].1, vec![1, 64]);
    bits_equal(&t["c.q8_0"].2, &exp["c.q8_0"].2).unwrap();
    // unquantized tensors are copied as they are
    assert_eq!(t["a.f16"].2, exp["a.f16.raw"].2);
    assert_eq!(t["b.i8"], exp["b.i8"]);
    // nothing left that says "blocks"; the GGUF metadata kept
    assert!(!md.contains_key("ckptkit.gguf.tensors"), "{md:?}");
    assert!(md.contains_key("ckptkit.gguf.kv"));
}

#[test]
fn keep_copies_the_blocks_and_they_read_back_as_gguf_layers() {
    let dir = tempfile::tempdir().unwrap();
    let kept = dir.path().join("kept.safetensors");
    convert(&fixture("align64.gguf"), &kept, &to("keep")).unwrap();
    let (t, md) = st(&kept);
    let src = open_source(&fixture("align64.gguf")).unwrap();
    assert_eq!(t, tensors(src.as_ref()));
    assert_eq!(
        md["ckptkit.gguf.tensors"],
        src.metadata()["ckptkit.gguf.tensors"]
    );
    // the kept file is read as the GGUF file was: plain from it is the same
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    convert(&kept, &a, &to("plain")).unwrap();
    convert(&fixture("align64.gguf"), &b, &to("plain")).unwrap();
    assert_eq!(st(&a).0, st(&b).0);
    // and through a container
    let c = dir.path().join("kept.ckpk");
    convert(&fixture("align64.gguf"), &c, &to("keep")).unwrap();
    let d = dir.path().join("d.safetensors");
    convert(&c, &d, &to("plain")).unwrap();
    assert_eq!(st(&d).0, st(&b).0);
}

#[test]
fn plain_bf16_rounds_the_f32_dequantization_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bf16.safetensors");
    convert(&fixture("align64.gguf"), &out, &to("plain:bf16")).unwrap();
    let (t, _) = st(&out);
    let exp = expected("align64");
    let want: Vec<u8> = exp["c.q8_0"]
        .2
        .chunks(4)
        .flat_map(|c| {
            // round to nearest even (no NaN here)
            let b = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            (((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16).to_le_bytes()
        })
        .collect();
    assert_eq!(t["c.q8_0"].0, Dtype::BF16);
    assert_eq!(t["c.q8_0"].2, want);
}

#[test]
fn model_named_file_dequantizes_every_type_as_gguf_py() {
    let p = fixture("model-v3.gguf");
    if !p.exists() {
        panic!("tests/fixtures/gguf/model-v3.gguf is missing: regenerate the fixtures (README)");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plain.safetensors");
    convert(&p, &out, &to("plain")).unwrap();
    let (t, _) = st(&out);
    let exp = expected("model-v3");
    let mut quantized = 0;
    for (k, (dt, shape, bytes)) in &t {
        let (edt, eshape, ebytes) = &exp[k];
        assert_eq!(shape, eshape, "{k}");
        if exp.contains_key(&format!("{k}.raw")) && *dt != Dtype::F32 {
            // F16 / BF16 stay themselves
            assert_eq!(bytes, &exp[&format!("{k}.raw")].2, "{k}");
        } else {
            assert_eq!(*edt, Dtype::F32);
            bits_equal(bytes, ebytes).unwrap_or_else(|e| panic!("{k}: {e}"));
            quantized += exp.contains_key(&format!("{k}.raw")) as usize;
        }
    }
    // Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 (2-D and 3-D) Q2_K..Q6_K
    assert_eq!(quantized, 11);
    // keep: the blocks byte for byte, K-quants included
    let kept = dir.path().join("kept.safetensors");
    convert(&p, &kept, &to("keep")).unwrap();
    let (k, _) = st(&kept);
    for (name, (dt, _, bytes)) in &k {
        if *dt == Dtype::U8 {
            assert_eq!(bytes, &exp[&format!("{name}.raw")].2, "{name}");
        }
    }
}

#[test]
fn a_module_with_two_block_tensors_is_refused_naming_both() {
    // types-v3.gguf keeps every tensor at the root (`q4_0`, `q8_0`, ...)
    let e = inspect(&fixture("types-v3.gguf"), &ConvertOptions::default())
        .map(|r| r.problems.join("\n"))
        .unwrap_or_else(|e| e.to_string());
    assert!(e.contains("block-quantized GGUF tensors"), "{e}");
    assert!(e.contains("q4_0") && e.contains("q6_k"), "{e}");
}

#[test]
fn v2_files_read_as_v3() {
    let a = open_source(&fixture("types-v2.gguf")).unwrap();
    let b = open_source(&fixture("types-v3.gguf")).unwrap();
    assert_eq!(tensors(a.as_ref()), tensors(b.as_ref()));
}

/// A copy of a fixture with some bytes changed.
fn patched(dir: &Path, name: &str, at: usize, bytes: &[u8]) -> PathBuf {
    let mut b = std::fs::read(fixture(name)).unwrap();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    let p = dir.join(format!("patched-{at}-{name}"));
    std::fs::write(&p, b).unwrap();
    p
}

#[test]
fn an_unsupported_tensor_type_is_a_typed_error_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    // align64.json: the info of `c.q8_0` starts at 230: u64 name length 6, the
    // name, u32 n_dims 2, two u64 dims, then the u32 type
    let at = 230 + 8 + 6 + 4 + 16;
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("align64.json")).unwrap()).unwrap();
    assert_eq!(j["tensors"][2]["info_offset"], 230);
    // IQ4_NL (20): 32-element blocks like Q8_0's, so the header stays valid
    // (its 64 elements take 36 bytes, inside the file; it is the last tensor)
    let p = patched(dir.path(), "align64.gguf", at, &20u32.to_le_bytes());
    let e = open_source(&p).err().unwrap();
    match e.kind() {
        ErrorKind::UnsupportedGgufType { ggml_type, id } => {
            assert_eq!((ggml_type.as_str(), *id), ("IQ4_NL", 20))
        }
        k => panic!("{k:?}"),
    }
    assert_eq!(e.location().tensor.as_deref(), Some("c.q8_0"));
    assert_eq!(e.location().offset, Some(230));
    assert!(
        e.to_string()
            .contains("unsupported GGUF tensor type IQ4_NL"),
        "{e}"
    );
}

#[test]
fn verify_checks_the_structure_and_reports_tensors_unchecked() {
    let r = ckptkit::migrate::verify(&fixture("align64.gguf")).unwrap();
    assert_eq!((r.tensors, r.unchecked), (0, 3));
    let dir = tempfile::tempdir().unwrap();
    let mut b = std::fs::read(fixture("align64.gguf")).unwrap();
    b.truncate(400);
    let p = dir.path().join("short.gguf");
    std::fs::write(&p, b).unwrap();
    let e = ckptkit::migrate::verify(&p).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::Truncated { .. }), "{e}");
    assert_eq!(e.location().tensor.as_deref(), Some("c.q8_0"));
}

// ---- GGUF outputs ----

fn kv(src: &dyn TensorSource) -> serde_json::Value {
    serde_json::from_str(&src.metadata()["ckptkit.gguf.kv"]).unwrap()
}

/// The KV list without ckptkit's own digest entry.
fn kv_list(src: &dyn TensorSource) -> Vec<serde_json::Value> {
    kv(src)["kv"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["key"] != "ckptkit.blake3" && e["key"] != "ckptkit.gguf.tensors")
        .cloned()
        .collect()
}

#[test]
fn gguf_to_gguf_keep_gives_the_same_tensors_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["model-v3.gguf", "align64.gguf"] {
        let out = dir.path().join(name);
        convert(&fixture(name), &out, &to("keep")).unwrap();
        let a = open_source(&fixture(name)).unwrap();
        let b = open_source(&out).unwrap();
        assert_eq!(tensors(a.as_ref()), tensors(b.as_ref()), "{name}");
        assert_eq!(
            a.metadata()["ckptkit.gguf.tensors"],
            b.metadata()["ckptkit.gguf.tensors"]
        );
        // the same KVs in the same order (the alignment of align64 is not
        // kept: ckptkit writes 32), plus ckptkit's digests
        let strip = |v: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
            v.into_iter()
                .filter(|e| e["key"] != "general.alignment")
                .collect()
        };
        assert_eq!(
            strip(kv_list(a.as_ref())),
            strip(kv_list(b.as_ref())),
            "{name}"
        );
        let digests = kv(b.as_ref())["kv"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["key"] == "ckptkit.blake3")
            .cloned()
            .unwrap();
        let d: BTreeMap<String, String> =
            serde_json::from_str(digests["value"].as_str().unwrap()).unwrap();
        for (k, (_, _, bytes)) in tensors(b.as_ref()) {
            assert_eq!(d[&k], blake3::hash(&bytes).to_hex().to_string(), "{k}");
        }
    }
}

#[test]
fn gguf_to_plain_gguf_dequantizes_into_f32_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plain.gguf");
    convert(&fixture("model-v3.gguf"), &out, &to("plain")).unwrap();
    let g = open_source(&out).unwrap();
    assert!(!g.metadata().contains_key("ckptkit.gguf.tensors"));
    let st_out = dir.path().join("plain.safetensors");
    convert(&fixture("model-v3.gguf"), &st_out, &to("plain")).unwrap();
    assert_eq!(tensors(g.as_ref()), st(&st_out).0);
}

#[test]
fn safetensors_to_gguf_needs_an_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.safetensors");
    convert(&fixture("model-v3.gguf"), &plain, &to("plain")).unwrap();
    // a safetensors file carries the GGUF metadata it came from: drop it
    let f = SafetensorsFile::open(&plain).unwrap();
    let t = tensors(&f);
    let bare = dir.path().join("bare.safetensors");
    let plan: Vec<(String, Dtype, Vec<u64>)> = t
        .iter()
        .map(|(k, (d, s, _))| (k.clone(), *d, s.clone()))
        .collect();
    let w =
        ckptkit::SafetensorsWriter::create(&bare, &plan, &BTreeMap::new(), false, true).unwrap();
    for (k, (_, _, b)) in &t {
        w.write_tensor(k, b).unwrap();
    }
    w.finish().unwrap();
    let out = dir.path().join("out.gguf");
    let e = convert(&bare, &out, &to("keep")).unwrap_err();
    assert!(e.to_string().contains("--gguf-arch"), "{e}");
    assert!(!out.exists());
    convert(&bare, &out, &to("keep").gguf_arch(Some("flux".into()))).unwrap();
    let g = open_source(&out).unwrap();
    assert_eq!(tensors(g.as_ref()), t);
    let kvs = kv_list(g.as_ref());
    assert_eq!(
        kvs[0],
        serde_json::json!({"key": "general.architecture", "type": "string", "value": "flux"})
    );
}

#[test]
fn ckptkit_gguf_records_digests_that_verify_and_conversions_check() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kept.gguf");
    convert(&fixture("model-v3.gguf"), &out, &to("keep")).unwrap();
    let r = ckptkit::migrate::verify(&out).unwrap();
    assert_eq!((r.tensors, r.unchecked), (15, 0));
    // one flipped byte in the last tensor's data
    let mut b = std::fs::read(&out).unwrap();
    let n = b.len();
    b[n - 40] ^= 1;
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, &b).unwrap();
    let e = ckptkit::migrate::verify(&bad).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::HashMismatch { .. }), "{e}");
    assert_eq!(e.location().tensor.as_deref(), Some("token_embd.weight"));
    let e = convert(&bad, &dir.path().join("x.safetensors"), &to("plain")).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::HashMismatch { .. }), "{e}");
    assert!(!dir.path().join("x.safetensors").exists());
}

/// A float model whose `m.weight` is the quantizer fixture's input (F32
/// [8, 256], made by the fixture generator), with a small bias.
fn float_model(dir: &Path, dtype: Dtype) -> PathBuf {
    let (t, _) = st(&fixture("quant-roundtrip/input.safetensors"));
    let x = &t["input"].2;
    let w: Vec<u8> = match dtype {
        Dtype::F32 => x.clone(),
        _ => x
            .chunks(4)
            .flat_map(|c| {
                let b = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                (((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16).to_le_bytes()
            })
            .collect(),
    };
    let p = dir.join(format!("model-{dtype}.safetensors"));
    let plan = vec![
        ("m.bias".to_string(), dtype, vec![8]),
        ("m.weight".to_string(), dtype, vec![8, 256]),
    ];
    let bias = vec![0u8; 8 * dtype.size()];
    let wr = ckptkit::SafetensorsWriter::create(&p, &plan, &BTreeMap::new(), false, true).unwrap();
    wr.write_tensor("m.weight", &w).unwrap();
    wr.write_tensor("m.bias", &bias).unwrap();
    wr.finish().unwrap();
    p
}

#[test]
fn quantizing_to_gguf_gives_gguf_py_s_blocks_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let model = float_model(dir.path(), Dtype::F32);
    for ty in ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"] {
        let want = std::fs::read(fixture(&format!("quant-roundtrip/{ty}.bin"))).unwrap();
        let out = dir.path().join(format!("{ty}.gguf"));
        let opts = to(&format!("gguf:{}", ty.to_lowercase())).gguf_arch(Some("test".into()));
        let s = convert(&model, &out, &opts).unwrap();
        assert!(!s.lossless(), "{ty}: quantizing is lossy");
        let g = open_source(&out).unwrap();
        let t = tensors(g.as_ref());
        assert_eq!(t["m.weight"].0, Dtype::U8, "{ty}");
        assert_eq!(t["m.weight"].2, want, "{ty}: the blocks gguf-py makes");
        // the bias (8 elements) stays F32
        assert_eq!(t["m.bias"].0, Dtype::F32);
        ckptkit::migrate::verify(&out).unwrap();
        // back to plain: gguf-py's dequantization
        let back = dir.path().join(format!("{ty}.plain.safetensors"));
        convert(&out, &back, &to("plain")).unwrap();
        let exp = st(&fixture(&format!(
            "quant-roundtrip/{ty}.dequant.safetensors"
        )))
        .0;
        bits_equal(&st(&back).0["m.weight"].2, &exp["dequant"].2)
            .unwrap_or_else(|e| panic!("{ty}: {e}"));
        // the same blocks kept in a safetensors file
        let kept = dir.path().join(format!("{ty}.safetensors"));
        convert(&model, &kept, &to(&format!("gguf:{}", ty.to_lowercase()))).unwrap();
        assert_eq!(st(&kept).0["m.weight"].2, want, "{ty}");
    }
}

#[test]
fn a_bf16_model_quantized_to_gguf_comes_back_as_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let model = float_model(dir.path(), Dtype::BF16);
    let out = dir.path().join("q8.gguf");
    convert(
        &model,
        &out,
        &to("gguf:q8_0").gguf_arch(Some("test".into())),
    )
    .unwrap();
    let back = dir.path().join("back.safetensors");
    convert(&out, &back, &to("plain")).unwrap();
    let t = st(&back).0;
    assert_eq!(
        (t["m.weight"].0, &t["m.weight"].1),
        (Dtype::BF16, &vec![8, 256])
    );
    assert_eq!(t["m.bias"].0, Dtype::BF16);
}

#[test]
fn k_quants_and_unknown_types_are_not_quantizer_targets() {
    let e = Target::parse("gguf:q4_k").unwrap_err();
    assert!(e.to_string().contains("only by keeping blocks"), "{e}");
    let e = Target::parse("gguf:q9_9").unwrap_err();
    assert!(e.to_string().contains("unknown GGUF block type"), "{e}");
}

#[test]
fn a_quanto_layer_cannot_go_into_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = float_model(dir.path(), Dtype::BF16);
    let q = dir.path().join("q.safetensors");
    convert(&model, &q, &to("quanto:qint8")).unwrap();
    let e = convert(
        &q,
        &dir.path().join("q.gguf"),
        &to("keep").gguf_arch(Some("t".into())),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("which a GGUF file cannot hold"),
        "{e}"
    );
    // requantized on the way, it can (lossy: refused unless allowed)
    let opts = to("gguf:q8_0").gguf_arch(Some("t".into()));
    let e = convert(&q, &dir.path().join("p.gguf"), &opts).unwrap_err();
    assert!(e.to_string().contains("--allow-lossy"), "{e}");
    let opts = opts.select(ckptkit::migrate::PlanOptions::default().allow_lossy(true));
    convert(&q, &dir.path().join("p.gguf"), &opts).unwrap();
}

#[test]
fn like_a_gguf_reference_takes_each_tensor_s_type() {
    let dir = tempfile::tempdir().unwrap();
    let f32_model = float_model(dir.path(), Dtype::F32);
    let reference = dir.path().join("ref.gguf");
    convert(
        &f32_model,
        &reference,
        &to("gguf:q4_1").gguf_arch(Some("test".into())),
    )
    .unwrap();
    let target = ckptkit::migrate::like_target(&reference).unwrap();
    let out = dir.path().join("like.gguf");
    let opts = ConvertOptions::default()
        .target(target)
        .gguf_arch(Some("test".into()));
    convert(&f32_model, &out, &opts).unwrap();
    let want = std::fs::read(fixture("quant-roundtrip/Q4_1.bin")).unwrap();
    assert_eq!(
        tensors(open_source(&out).unwrap().as_ref())["m.weight"].2,
        want
    );
    // a K-quant reference layer cannot be quantized into
    let kref = ckptkit::migrate::like_target(&fixture("model-v3.gguf")).unwrap();
    let (t, _) = st(&fixture("model-v3.expected.safetensors"));
    let plain = dir.path().join("k.safetensors");
    let plan = vec![("blk.10.q2_k.weight".to_string(), Dtype::F32, vec![2, 512])];
    let w =
        ckptkit::SafetensorsWriter::create(&plain, &plan, &BTreeMap::new(), false, true).unwrap();
    w.write_tensor("blk.10.q2_k.weight", &t["blk.10.q2_k.weight"].2)
        .unwrap();
    w.finish().unwrap();
    let e = convert(
        &plain,
        &dir.path().join("k.gguf"),
        &ConvertOptions::default()
            .target(kref)
            .gguf_arch(Some("t".into())),
    )
    .unwrap_err();
    assert!(e.to_string().contains("Q2_K"), "{e}");
    assert_eq!(e.location().layer.as_deref(), Some("blk.10.q2_k"));
    // every layer the reference has as a K-quant is listed, in one error
    let names = [
        "blk.10.q2_k.weight",
        "blk.12.q4_k.weight",
        "blk.14.q6_k.weight",
    ];
    let plan: Vec<(String, Dtype, Vec<u64>)> = names
        .iter()
        .map(|n| (n.to_string(), Dtype::F32, vec![2, 512]))
        .collect();
    let many = dir.path().join("many.safetensors");
    let w =
        ckptkit::SafetensorsWriter::create(&many, &plan, &BTreeMap::new(), false, true).unwrap();
    for n in names {
        w.write_tensor(n, &t[n].2).unwrap();
    }
    w.finish().unwrap();
    let e = convert(
        &many,
        &dir.path().join("many.gguf"),
        &ConvertOptions::default()
            .target(ckptkit::migrate::like_target(&fixture("model-v3.gguf")).unwrap())
            .gguf_arch(Some("t".into())),
    )
    .unwrap_err();
    let m = e.to_string();
    assert!(m.contains("3 layers cannot be made"), "{m}");
    for (layer, ty) in [
        ("blk.10.q2_k", "Q2_K"),
        ("blk.12.q4_k", "Q4_K"),
        ("blk.14.q6_k", "Q6_K"),
    ] {
        assert!(m.contains(layer) && m.contains(ty), "{layer}: {m}");
    }
}

/// A float model of F32 [2, 2] tensors under `names`.
fn named_model(dir: &Path, file: &str, names: &[&str]) -> PathBuf {
    let p = dir.join(file);
    let plan: Vec<(String, Dtype, Vec<u64>)> = names
        .iter()
        .map(|n| (n.to_string(), Dtype::F32, vec![2, 2]))
        .collect();
    let w = ckptkit::SafetensorsWriter::create(&p, &plan, &BTreeMap::new(), false, true).unwrap();
    for n in names {
        w.write_tensor(n, &[0u8; 16]).unwrap();
    }
    w.finish().unwrap();
    p
}

fn arch_of(p: &Path) -> serde_json::Value {
    let g = open_source(p).unwrap();
    kv_list(g.as_ref())
        .into_iter()
        .find(|kv| kv["key"] == "general.architecture")
        .map(|kv| kv["value"].clone())
        .unwrap_or_default()
}

#[test]
fn the_architecture_comes_from_comfyui_gguf_s_key_probes() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        // BFL's Flux names under ComfyUI's prefix
        (
            &[
                "model.diffusion_model.double_blocks.0.img_attn.proj.weight",
                "model.diffusion_model.img_in.weight",
            ],
            "flux",
        ),
        // both SD probes' keys: the first in ComfyUI-GGUF's order (sdxl) wins
        (
            &[
                "down_blocks.0.downsamplers.0.conv.weight",
                "add_embedding.linear_1.weight",
            ],
            "sdxl",
        ),
        (&["down_blocks.0.downsamplers.0.conv.weight"], "sd1"),
        // a probe needs every key of one of its sets
        (
            &[
                "blocks.0.self_attn.norm_q.weight",
                "text_embedding.2.weight",
                "head.modulation",
            ],
            "wan",
        ),
    ];
    for (i, (names, arch)) in cases.iter().enumerate() {
        let m = named_model(dir.path(), &format!("m{i}.safetensors"), names);
        let out = dir.path().join(format!("m{i}.gguf"));
        let s = convert(&m, &out, &to("keep")).unwrap();
        assert_eq!(arch_of(&out), *arch, "{names:?}");
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("from the tensor names")),
            "{:?}",
            s.warnings
        );
        // nothing about names that will not load
        assert!(!s
            .warnings
            .iter()
            .any(|w| w.contains("will likely not load")));
    }
    // two of wan's three keys are not wan, nor anything else
    let m = named_model(
        dir.path(),
        "partial.safetensors",
        &["blocks.0.self_attn.norm_q.weight", "head.modulation"],
    );
    let out = dir.path().join("partial.gguf");
    let e = convert(&m, &out, &to("keep")).unwrap_err();
    assert!(e.to_string().contains("recognise no model"), "{e}");
    assert!(!out.exists());
}

#[test]
fn diffusers_names_are_refused_without_an_architecture_and_warned_with_one() {
    let dir = tempfile::tempdir().unwrap();
    let m = named_model(
        dir.path(),
        "diffusers.safetensors",
        &[
            "transformer_blocks.0.attn.norm_added_k.weight",
            "x_embedder.weight",
        ],
    );
    let out = dir.path().join("d.gguf");
    // refused at plan time: a dry run says so too
    let e = convert(&m, &out, &to("keep").dry_run(true)).unwrap_err();
    assert!(e.to_string().contains("diffusers"), "{e}");
    assert!(
        e.to_string()
            .contains("transformer_blocks.0.attn.norm_added_k.weight"),
        "{e}"
    );
    assert!(matches!(e.kind(), ErrorKind::Usage { .. }), "{e}");
    assert!(!out.exists());
    let s = convert(&m, &out, &to("keep").gguf_arch(Some("flux".into()))).unwrap();
    assert_eq!(arch_of(&out), "flux");
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("will likely not load") && w.contains("diffusers names")),
        "{:?}",
        s.warnings
    );
}

#[test]
fn names_that_will_not_load_in_comfyui_gguf_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let warnings = |file: &str, names: &[&str], arch: &str| {
        let m = named_model(dir.path(), file, names);
        let out = dir.path().join(format!("{file}.gguf"));
        convert(&m, &out, &to("keep").gguf_arch(Some(arch.into())))
            .unwrap()
            .warnings
    };
    // `model.` is stripped by the probes, not by ComfyUI-GGUF's loader
    let w = warnings(
        "prefixed.safetensors",
        &["model.double_blocks.0.img_attn.proj.weight"],
        "flux",
    );
    assert!(
        w.iter().any(|w| w.contains(r"--rename '^model\.='")),
        "{w:?}"
    );
    // names of another model than the architecture says
    let w = warnings(
        "wan.safetensors",
        &[
            "blocks.0.self_attn.norm_q.weight",
            "text_embedding.2.weight",
            "head.modulation",
        ],
        "flux",
    );
    assert!(w.iter().any(|w| w.contains("a `wan` model")), "{w:?}");
    // the names of the architecture given: no warning
    let w = warnings(
        "flux.safetensors",
        &["model.diffusion_model.double_blocks.0.img_attn.proj.weight"],
        "flux",
    );
    assert!(w.is_empty(), "{w:?}");
    // an LLM architecture: llama.cpp's name tables are out of scope, no guess
    let w = warnings("llm.safetensors", &["blk.0.attn_q.weight"], "llama");
    assert!(w.is_empty(), "{w:?}");
}

/// The orig-shape entry of `name` in a GGUF source's KV list.
fn orig_entry(src: &dyn TensorSource, name: &str) -> Option<serde_json::Value> {
    kv_list(src)
        .into_iter()
        .find(|kv| kv["key"] == format!("comfy.gguf.orig_shape.{name}"))
}

#[test]
fn tensors_of_more_than_4_dims_are_written_reshaped_with_comfyui_gguf_s_orig_shape() {
    let dir = tempfile::tempdir().unwrap();
    // a Wan-style Conv3d patch embedding [out, in, t, h, w], and a 4-D one
    let p = dir.path().join("wan.safetensors");
    let plan = vec![
        (
            "patch_embedding.weight".to_string(),
            Dtype::BF16,
            vec![4, 3, 1, 2, 2],
        ),
        ("conv.weight".to_string(), Dtype::F32, vec![2, 3, 1, 1]),
    ];
    let five: Vec<u8> = (0..48u16)
        .flat_map(|i| (0x3c00 + i).to_le_bytes())
        .collect();
    let four: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let w = ckptkit::SafetensorsWriter::create(&p, &plan, &BTreeMap::new(), false, true).unwrap();
    w.write_tensor("patch_embedding.weight", &five).unwrap();
    w.write_tensor("conv.weight", &four).unwrap();
    w.finish().unwrap();
    let out = dir.path().join("wan.gguf");
    convert(&p, &out, &to("keep").gguf_arch(Some("wan".into()))).unwrap();
    // (a 5-D tensor info would be refused by the writer: it wrote 2-D rows)
    let g = open_source(&out).unwrap();
    let t = tensors(g.as_ref());
    assert_eq!(
        t["patch_embedding.weight"],
        (Dtype::BF16, vec![4, 3, 1, 2, 2], five.clone())
    );
    assert_eq!(t["conv.weight"], (Dtype::F32, vec![2, 3, 1, 1], four));
    let e = orig_entry(g.as_ref(), "patch_embedding.weight").unwrap();
    assert_eq!(e["type"], "array");
    assert_eq!(e["value"]["elem"], "i32");
    assert_eq!(e["value"]["value"], serde_json::json!([4, 3, 1, 2, 2]));
    // 4-D tensors are written as they are
    assert!(orig_entry(g.as_ref(), "conv.weight").is_none());
    // back to safetensors, and GGUF to GGUF: the entry is written anew, once
    let back = dir.path().join("back.safetensors");
    convert(&out, &back, &to("keep")).unwrap();
    assert_eq!(st(&back).0["patch_embedding.weight"].1, vec![4, 3, 1, 2, 2]);
    let again = dir.path().join("again.gguf");
    convert(&out, &again, &to("keep")).unwrap();
    let g2 = open_source(&again).unwrap();
    assert_eq!(tensors(g2.as_ref()), t);
    let n = kv_list(g2.as_ref())
        .iter()
        .filter(|kv| {
            kv["key"]
                .as_str()
                .unwrap()
                .starts_with("comfy.gguf.orig_shape.")
        })
        .count();
    assert_eq!(n, 1);
}

#[test]
fn blocks_stored_in_other_rows_keep_their_shape_through_gguf() {
    let dir = tempfile::tempdir().unwrap();
    // a Q8_0 convolution [8, 3, 3, 8] (576 elements) stored in rows of 32
    // elements, as ComfyUI-GGUF stores SD convolutions in rows of 256
    let blocks: Vec<u8> = (0..18u32)
        .flat_map(|r| {
            let mut b = (0x2000u16 + r as u16).to_le_bytes().to_vec(); // f16 scale
            b.extend((0..32u32).map(|i| (i * 7 + r) as u8));
            b
        })
        .collect();
    let p = dir.path().join("conv.safetensors");
    let md = BTreeMap::from([(
        "ckptkit.gguf.tensors".to_string(),
        serde_json::json!({"version": 1, "tensors": {"c.weight": {"type": "Q8_0", "shape": [8, 3, 3, 8]}}})
            .to_string(),
    )]);
    let plan = vec![("c.weight".to_string(), Dtype::U8, vec![18, 34])];
    let w = ckptkit::SafetensorsWriter::create(&p, &plan, &md, false, true).unwrap();
    w.write_tensor("c.weight", &blocks).unwrap();
    w.finish().unwrap();
    let out = dir.path().join("conv.gguf");
    convert(&p, &out, &to("keep").gguf_arch(Some("sd1".into()))).unwrap();
    let g = open_source(&out).unwrap();
    assert_eq!(
        tensors(g.as_ref())["c.weight"],
        (Dtype::U8, vec![18, 34], blocks.clone())
    );
    let e = orig_entry(g.as_ref(), "c.weight").unwrap();
    assert_eq!(e["value"]["value"], serde_json::json!([8, 3, 3, 8]));
    // both dequantize to the same [8, 3, 3, 8] tensor
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    convert(&p, &a, &to("plain")).unwrap();
    convert(&out, &b, &to("plain")).unwrap();
    let (ta, tb) = (st(&a).0, st(&b).0);
    assert_eq!(ta["c.weight"].1, vec![8, 3, 3, 8]);
    assert_eq!(ta, tb);
    // rows that do not hold the shape's elements are refused
    let md = BTreeMap::from([(
        "ckptkit.gguf.tensors".to_string(),
        serde_json::json!({"version": 1, "tensors": {"c.weight": {"type": "Q8_0", "shape": [8, 3, 3, 9]}}})
            .to_string(),
    )]);
    let bad = dir.path().join("bad.safetensors");
    let w = ckptkit::SafetensorsWriter::create(&bad, &plan, &md, false, true).unwrap();
    w.write_tensor("c.weight", &blocks).unwrap();
    w.finish().unwrap();
    let e = convert(
        &bad,
        &dir.path().join("bad.gguf"),
        &to("keep").gguf_arch(Some("sd1".into())),
    )
    .unwrap_err();
    assert!(e.to_string().contains("c.weight"), "{e}");
}

#[test]
fn a_bad_orig_shape_entry_is_a_typed_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    let plan = vec![("x".to_string(), Dtype::F32, vec![1, 2, 1, 2, 3])];
    let w = ckptkit::SafetensorsWriter::create(&p, &plan, &BTreeMap::new(), false, true).unwrap();
    w.write_tensor("x", &[0u8; 48]).unwrap();
    w.finish().unwrap();
    let out = dir.path().join("m.gguf");
    convert(&p, &out, &to("keep").gguf_arch(Some("test".into()))).unwrap();
    let good = std::fs::read(&out).unwrap();
    // the entry: key, u32 type 9 (array), u32 element type 5 (i32), u64 count 5, dims
    let key = b"comfy.gguf.orig_shape.x";
    let at = good.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(good[at..at + 8], [9, 0, 0, 0, 5, 0, 0, 0]);
    let dims = at + 16;
    let cases: &[(usize, &[u8], &str)] = &[
        (at + 4, &4u32.to_le_bytes(), "array of i32"),
        (dims + 4, &(-2i32).to_le_bytes(), "negative"),
        (
            dims + 4,
            &3i32.to_le_bytes(),
            "does not have the 12 elements",
        ),
    ];
    for (i, (off, bytes, msg)) in cases.iter().enumerate() {
        let mut b = good.clone();
        b[*off..*off + bytes.len()].copy_from_slice(bytes);
        let p = dir.path().join(format!("bad{i}.gguf"));
        std::fs::write(&p, b).unwrap();
        let e = open_source(&p).err().unwrap();
        assert!(matches!(e.kind(), ErrorKind::Malformed(_)), "{e}");
        assert!(e.to_string().contains(msg), "{msg}: {e}");
        assert!(e.to_string().contains("comfy.gguf.orig_shape.x"), "{e}");
        assert!(e.location().offset.is_some(), "{e}");
    }
}

/// A float model `m.weight` [16, 128] of `dtype` with values of magnitude
/// about `scale`, and `m.bias`.
fn linear_model(dir: &Path, name: &str, dtype: Dtype, scale: f32) -> PathBuf {
    let p = dir.join(name);
    let x: Vec<f32> = (0..16 * 128)
        .map(|i| ((i * 7919 % 251) as f32 - 125.0) / 125.0 * scale)
        .collect();
    let w: Vec<u8> = match dtype {
        Dtype::F16 => x
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        _ => x
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
    };
    let plan = vec![
        ("m.bias".to_string(), dtype, vec![16]),
        ("m.weight".to_string(), dtype, vec![16, 128]),
    ];
    let wr = ckptkit::SafetensorsWriter::create(&p, &plan, &BTreeMap::new(), false, true).unwrap();
    wr.write_tensor("m.weight", &w).unwrap();
    wr.write_tensor("m.bias", &vec![0u8; 16 * dtype.size()])
        .unwrap();
    wr.finish().unwrap();
    p
}

#[test]
fn int8_groups_of_32_carry_into_q8_0_and_back_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [Dtype::F16, Dtype::BF16] {
        let model = linear_model(dir.path(), &format!("lin-{dtype}.safetensors"), dtype, 0.05);
        let int8 = dir.path().join(format!("int8-{dtype}.safetensors"));
        convert(&model, &int8, &to("int8:ct:group=32:int-quantized")).unwrap();
        let (ti, _) = st(&int8);
        let (q, s) = (&ti["m.weight"], &ti["m.weight_scale"]);
        assert_eq!((q.0, &q.1), (Dtype::I8, &vec![16, 128]));
        assert_eq!(s.1, vec![16, 4]);
        // into Q8_0: the codes and the scales (as F16) carried, no float pass
        let g = dir.path().join(format!("q8-{dtype}.gguf"));
        let sum = convert(&int8, &g, &to("gguf:q8_0").gguf_arch(Some("t".into()))).unwrap();
        let plan = sum.plan.unwrap();
        assert!(plan.lossless(), "{:?}", plan.layers);
        let src = open_source(&g).unwrap();
        let blocks = &tensors(src.as_ref())["m.weight"].2;
        let f16_scales: Vec<[u8; 2]> = match dtype {
            Dtype::F16 => s.2.chunks(2).map(|c| [c[0], c[1]]).collect(),
            _ => {
                s.2.chunks(2)
                    .map(|c| {
                        let v = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                        let h = half::f16::from_f32(v);
                        assert_eq!(h.to_f32(), v, "a BF16 scale this size is exact in F16");
                        h.to_le_bytes()
                    })
                    .collect()
            }
        };
        let mut want: Vec<u8> = Vec::new();
        for (b, sc) in f16_scales.iter().enumerate() {
            want.extend(sc);
            want.extend(&q.2[b * 32..b * 32 + 32]);
        }
        assert_eq!(blocks, &want, "{dtype}");
        // and back: the int8 file's tensors byte for byte
        let back = dir.path().join(format!("back-{dtype}.safetensors"));
        let sum = convert(&g, &back, &to("int8:ct:group=32:int-quantized")).unwrap();
        assert!(sum.plan.unwrap().lossless());
        let (tb, _) = st(&back);
        assert_eq!(tb["m.weight"], ti["m.weight"], "{dtype}");
        if dtype == Dtype::F16 {
            assert_eq!(tb["m.weight_scale"], ti["m.weight_scale"]);
        }
        // the packed form (compressed-tensors pack-quantized: codes in I32
        // words) carries the same codes: the same Q8_0 blocks, and back to
        // the packed file's tensors
        let packed = dir.path().join(format!("packed-{dtype}.safetensors"));
        convert(&model, &packed, &to("int8:ct:group=32")).unwrap();
        let (tp, _) = st(&packed);
        assert!(
            !tp.contains_key("m.weight") && tp.keys().any(|k| k.starts_with("m.weight_packed")),
            "{:?}",
            tp.keys().collect::<Vec<_>>()
        );
        let gp = dir.path().join(format!("q8-packed-{dtype}.gguf"));
        let sum = convert(&packed, &gp, &to("gguf:q8_0").gguf_arch(Some("t".into()))).unwrap();
        assert!(sum.plan.unwrap().lossless(), "{dtype} packed");
        let src = open_source(&gp).unwrap();
        assert_eq!(
            &tensors(src.as_ref())["m.weight"].2,
            &want,
            "{dtype} packed"
        );
        let back = dir.path().join(format!("back-packed-{dtype}.safetensors"));
        let sum = convert(&gp, &back, &to("int8:ct:group=32")).unwrap();
        assert!(sum.plan.unwrap().lossless());
        let (tb, _) = st(&back);
        assert_eq!(
            tb["m.weight_packed"], tp["m.weight_packed"],
            "{dtype} packed"
        );
        if dtype == Dtype::F16 {
            assert_eq!(tb["m.weight_scale"], tp["m.weight_scale"]);
        }
    }
}

/// One scale per row (compressed-tensors int8 per channel, quanto qint8,
/// ComfyUI int8 per row) carries into Q8_0 too: each block is the row's
/// scale in F16 and 32 of the row's codes, lossless; the dequantized floats
/// are the source's `q·s` (in f32, of the F16 scale, which equals the source
/// scale here).
#[test]
fn per_row_int8_codes_carry_into_q8_0_with_the_row_scale_in_each_block() {
    let dir = tempfile::tempdir().unwrap();
    let model = linear_model(dir.path(), "rows.safetensors", Dtype::F16, 0.05);
    for (target, codes, scale) in [
        ("int8:ct:int-quantized", "m.weight", "m.weight_scale"),
        ("quanto:qint8", "m.weight._data", "m.weight._scale"),
        ("int8:comfy", "m.weight", "m.weight_scale"),
    ] {
        // a directory each: quanto writes a quanto_qmap.json beside its file
        let sub = dir.path().join(target.replace(':', "-"));
        std::fs::create_dir(&sub).unwrap();
        let src = sub.join("model.safetensors");
        convert(&model, &src, &to(target)).unwrap();
        let (ts, _) = st(&src);
        let get = |k: &str| {
            ts.get(k)
                .unwrap_or_else(|| panic!("{target}: no {k} in {:?}", ts.keys()))
        };
        let (q, sc) = (get(codes), get(scale));
        assert_eq!((q.0, &q.1), (Dtype::I8, &vec![16, 128]), "{target}");
        assert_eq!(
            sc.1.iter().product::<u64>(),
            16,
            "{target}: one scale per row"
        );
        let (f16_scales, exact): (Vec<[u8; 2]>, Vec<bool>) =
            sc.2.chunks(sc.0.size())
                .map(|c| {
                    let v = match sc.0 {
                        Dtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                        Dtype::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                        _ => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    };
                    let h = half::f16::from_f32(v);
                    (h.to_le_bytes(), h.to_f32() == v)
                })
                .unzip();
        let g = sub.join("model.gguf");
        let q8 = to("gguf:q8_0").gguf_arch(Some("t".into()));
        if exact.contains(&false) {
            // ComfyUI's F32 row scales: F16 cannot hold them, so carrying the
            // codes would round them; refused as a lossy re-layout, no output
            assert_eq!((target, sc.0), ("int8:comfy", Dtype::F32));
            refused_for_the_scale(&src, &g, &q8);
            continue;
        }
        let sum = convert(&src, &g, &q8).unwrap();
        let plan = sum.plan.unwrap();
        assert!(plan.lossless(), "{target}: {:?}", plan.layers);
        let src_g = open_source(&g).unwrap();
        let blocks = &tensors(src_g.as_ref())["m.weight"].2;
        let mut want: Vec<u8> = Vec::new();
        for (r, d) in f16_scales.iter().enumerate() {
            for b in 0..4 {
                want.extend(d);
                want.extend(&q.2[r * 128 + b * 32..][..32]);
            }
        }
        assert_eq!(blocks, &want, "{target}");
    }
}

/// A file optimum-quanto wrote (the committed qint8 fixture, BF16 model):
/// every layer `gguf:q8_0` takes (2-D, rows of whole groups of 32, more than
/// 1024 elements) carries into Q8_0 with its row scale in each block,
/// lossless; the others are dequantized to BF16. The same layers go into `int8:ct:group=32` losslessly too (each
/// group its row's scale), and that file into the same Q8_0 bytes.
#[test]
fn a_quanto_file_s_rows_carry_into_q8_0() {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/quanto/bf16-qint8/quantized.safetensors");
    let (ts, _) = st(&src);
    // the layers `gguf:q8_0` does not quantize (4-D convolutions with rows
    // of 3 and 9 elements, a row of 202, and at most 1024 elements, which
    // stay float by ComfyUI-GGUF's rule) are dequantized: a GGUF file
    // cannot hold a quanto layer
    let odd: Vec<String> = ts
        .iter()
        .filter_map(|(k, (_, shape, _))| {
            let path = k.strip_suffix(".weight._data")?;
            let n: u64 = shape.iter().product();
            (shape.len() != 2 || shape[1] % 32 != 0 || n <= 1024).then(|| path.to_string())
        })
        .collect();
    assert_eq!(odd.len(), 8, "{odd:?}");
    let g = dir.path().join("q.gguf");
    let opts = to("gguf:q8_0")
        .gguf_arch(Some("t".into()))
        .select(PlanOptions::default().allow_lossy(true));
    let plan = convert(&src, &g, &opts).unwrap().plan.unwrap();
    let src_g = open_source(&g).unwrap();
    let tg = tensors(src_g.as_ref());
    let mut carried = Vec::new();
    for l in &plan.layers {
        let Some(q) = ts.get(&format!("{}.weight._data", l.path)) else {
            continue;
        };
        if odd.contains(&l.path) {
            // dequantized to the model's dtype, as `--to plain` does
            assert_eq!(l.to, "plain BF16", "{}: {:?}", l.path, l.passes);
            assert!(
                l.passes
                    .iter()
                    .any(|p| matches!(p, Pass::Dequantize { .. })),
                "{}",
                l.path
            );
            let w = &tg[&format!("{}.weight", l.path)];
            assert_eq!(w.0, Dtype::BF16, "{}", l.path);
            continue;
        }
        let relayout = l.passes.iter().any(|p| matches!(p, Pass::Relayout { .. }));
        let rows_of_32 = q.1.len() == 2 && q.1[1] % 32 == 0;
        assert_eq!(relayout, rows_of_32, "{}: {:?}", l.path, l.passes);
        assert_eq!(l.lossless, rows_of_32, "{}", l.path);
        if !rows_of_32 {
            continue;
        }
        let sc = &ts[&format!("{}.weight._scale", l.path)];
        assert_eq!(sc.0, Dtype::BF16);
        let cols = q.1[1] as usize;
        let mut want: Vec<u8> = Vec::new();
        for (r, c) in sc.2.chunks(2).enumerate() {
            // quanto's BF16 row scales are F16 numbers: the carry is exact
            let v = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            let d = half::f16::from_f32(v);
            assert_eq!(d.to_f32(), v, "{}", l.path);
            for b in 0..cols / 32 {
                want.extend(d.to_le_bytes());
                want.extend(&q.2[r * cols + b * 32..][..32]);
            }
        }
        assert_eq!(tg[&format!("{}.weight", l.path)].2, want, "{}", l.path);
        carried.push(l.path.clone());
    }
    assert_eq!(carried.len(), 4, "{carried:?}");
    // the rows into int8 groups of 32 (each group its row's scale), then
    // that file into Q8_0: the same blocks
    let sub = dir.path().join("int8");
    std::fs::create_dir(&sub).unwrap();
    let int8 = sub.join("model.safetensors");
    let opts = to("int8:ct:group=32:int-quantized").select(
        PlanOptions::default()
            .allow_lossy(true)
            .include(carried.clone()),
    );
    let plan = convert(&src, &int8, &opts).unwrap().plan.unwrap();
    for l in plan.layers.iter().filter(|l| carried.contains(&l.path)) {
        assert!(l.lossless, "{}: {:?}", l.path, l.passes);
    }
    let g2 = sub.join("q.gguf");
    convert(
        &int8,
        &g2,
        &to("gguf:q8_0")
            .gguf_arch(Some("t".into()))
            .select(PlanOptions::default().allow_lossy(true)),
    )
    .unwrap();
    let src_g2 = open_source(&g2).unwrap();
    let tg2 = tensors(src_g2.as_ref());
    for p in &carried {
        let k = format!("{p}.weight");
        assert_eq!(tg2[&k].2, tg[&k].2, "{k}");
    }
}

#[test]
fn a_bf16_scale_f16_cannot_hold_is_a_lossy_carry_refused() {
    let dir = tempfile::tempdir().unwrap();
    // scales near 1e-9: far below F16's smallest subnormal (6e-8)
    let model = linear_model(dir.path(), "tiny.safetensors", Dtype::BF16, 1e-7);
    let int8 = dir.path().join("tiny-int8.safetensors");
    convert(&model, &int8, &to("int8:ct:group=32:int-quantized")).unwrap();
    let g = dir.path().join("tiny.gguf");
    refused_for_the_scale(&int8, &g, &to("gguf:q8_0").gguf_arch(Some("t".into())));
}

/// Converting `src` to `out` is refused as a lossy re-layout because a scale
/// does not survive, and writes nothing.
fn refused_for_the_scale(src: &Path, out: &Path, opts: &ConvertOptions) {
    let e = convert(src, out, opts).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            ErrorKind::LossyRelayout {
                scale_exact: false,
                ..
            }
        ),
        "{e}"
    );
    assert!(!out.exists());
}

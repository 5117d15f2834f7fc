//! Fidelity with real clients (SimpleTuner, diffusers, transformers,
//! llmcompressor): regression tests of the defects found running them
//! against ckptkit (issue 11). The live suites in tests/interop check the
//! same outputs with the libraries themselves.

mod common;

use std::path::{Path, PathBuf};

use common::cli::*;

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(&out(o)).unwrap_or_else(|e| panic!("{e}: {}", out(o)))
}

/// A model directory: the quanto qint8 fixture as `model.safetensors`, its
/// map, a config and the other files a Hugging Face repository holds.
fn model_dir(at: &Path, config: &str) -> PathBuf {
    std::fs::create_dir_all(at).unwrap();
    std::fs::copy(
        fx("bf16-qint8", "quantized.safetensors"),
        at.join("model.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        fx("bf16-qint8", "quanto_qmap.json"),
        at.join("quanto_qmap.json"),
    )
    .unwrap();
    std::fs::write(at.join("config.json"), config).unwrap();
    at.to_path_buf()
}

fn config_of(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

// ---- item 1: a model directory keeps its config and other files ----

#[test]
fn model_directory_files_are_carried_into_directory_outputs() {
    let d = tempfile::tempdir().unwrap();
    let cfg = r#"{"model_type": "llama", "hidden_size": 64}"#;
    let m = model_dir(&d.path().join("m"), cfg);
    std::fs::write(m.join("generation_config.json"), r#"{"do_sample": false}"#).unwrap();
    std::fs::write(m.join("README.md"), "# a model\n").unwrap();
    std::fs::write(m.join(".gitattributes"), "*.safetensors filter=lfs\n").unwrap();
    std::fs::write(m.join("pytorch_model.bin"), b"old weights").unwrap();
    std::fs::create_dir(m.join("original")).unwrap();
    std::fs::write(m.join("original/params.json"), "{}").unwrap();
    // Hugging Face caches hold symlinks into blobs/: followed
    let blob = d.path().join("blob-tokenizer");
    std::fs::write(&blob, r#"{"model": {}}"#).unwrap();
    std::os::unix::fs::symlink(&blob, m.join("tokenizer.json")).unwrap();
    let out_dir = d.path().join("out");
    let o = run_ok(&["convert", s(&m), s(&out_dir), "--to", "plain", "--json"]);
    let v = json(&o);
    // carried byte for byte; the config needs no rewrite (no quantization
    // config to remove), so it is the input's exactly
    for n in [
        "config.json",
        "generation_config.json",
        "README.md",
        "tokenizer.json",
    ] {
        assert_eq!(
            std::fs::read(m.join(n)).unwrap(),
            std::fs::read(out_dir.join(n)).unwrap(),
            "{n}"
        );
    }
    assert!(std::fs::symlink_metadata(out_dir.join("tokenizer.json"))
        .unwrap()
        .is_file());
    let carried: Vec<&str> = v["carried"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(
        carried,
        [
            "README.md",
            "config.json",
            "generation_config.json",
            "tokenizer.json"
        ]
    );
    let skipped = v["skipped"].to_string();
    for n in [
        ".gitattributes",
        "pytorch_model.bin",
        "original",
        "quanto_qmap.json",
    ] {
        assert!(skipped.contains(n), "{n} in {skipped}");
        assert!(!out_dir.join(n).exists(), "{n}");
    }
    // a keep copy of a sharded directory carries them too
    let sharded = d.path().join("sharded");
    run_ok(&[
        "convert",
        s(&m),
        s(&sharded),
        "--to",
        "plain",
        "--max-shard-size",
        "4000",
    ]);
    let again = d.path().join("again");
    run_ok(&["convert", s(&sharded), s(&again)]);
    assert_eq!(
        std::fs::read(again.join("config.json")).unwrap(),
        cfg.as_bytes()
    );
}

// ---- item 2: whose config decides the quantization_config written ----

#[test]
fn quantization_config_follows_whose_config_it_is() {
    let d = tempfile::tempdir().unwrap();
    // transformers: no quanto quantization_config (transformers reads
    // `weights`, and cannot load pre-quantized quanto checkpoints); a stale
    // one is removed
    let tcfg = r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "quantization_config": {"quant_method": "quanto", "weights": "int8"}}"#;
    let m = model_dir(&d.path().join("t"), tcfg);
    let out4 = d.path().join("t4");
    run_ok(&[
        "convert",
        s(&m),
        s(&out4),
        "--to",
        "quanto:qint4",
        "--allow-lossy",
    ]);
    let c = config_of(&out4);
    assert!(c.get("quantization_config").is_none(), "{c}");
    assert_eq!(c["model_type"], "llama");
    // compressed-tensors keeps its own form in a transformers config
    let f = d.path().join("float");
    std::fs::create_dir(&f).unwrap();
    std::fs::copy(
        fx("bf16-qint8", "float.safetensors"),
        f.join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(f.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let ct = d.path().join("tct");
    run_ok(&["convert", s(&f), s(&ct), "--to", "int8:ct"]);
    let q = &config_of(&ct)["quantization_config"];
    assert_eq!(q["quant_method"], "compressed-tensors", "{q}");
    // a model whose layers end up in two layouts (quanto convolutions kept,
    // Linears in int8): no single config describes it; a stale quanto one
    // is removed from a transformers config, and the user is told
    let mixed = d.path().join("mixed");
    let o = run_ok(&["convert", s(&m), s(&mixed), "--to", "int8:ct", "--json"]);
    assert!(config_of(&mixed).get("quantization_config").is_none());
    assert!(json(&o)["warnings"].to_string().contains("several layouts"));
    // diffusers: QuantoConfig's form with weights_dtype
    let dcfg = r#"{"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1",
        "quantization_config": {"quant_method": "quanto", "weights_dtype": "int8"}}"#;
    let m = model_dir(&d.path().join("dm"), dcfg);
    let o = d.path().join("d4");
    run_ok(&[
        "convert",
        s(&m),
        s(&o),
        "--to",
        "quanto:qint4",
        "--allow-lossy",
    ]);
    let q = &config_of(&o)["quantization_config"];
    assert_eq!(q["quant_method"], "quanto");
    assert_eq!(q["weights_dtype"], "int4", "{q}");
    assert!(q.get("weights").is_none(), "{q}");
    // and to plain, the quanto config goes
    let p = d.path().join("dp");
    run_ok(&["convert", s(&m), s(&p), "--to", "plain"]);
    assert!(config_of(&p).get("quantization_config").is_none());
}

fn tensors(p: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let src = ckptkit::open_source(p).unwrap();
    src.tensors()
        .iter()
        .map(|t| (t.key.clone(), src.read(&t.key).unwrap().to_vec()))
        .collect()
}

// ---- item 4: float layers of a partly quantized model stay float ----

#[test]
fn partly_quantized_models_keep_their_float_layers_and_round_trip() {
    let d = tempfile::tempdir().unwrap();
    // the fixture left `lin_excluded` in float (quantize(exclude=...))
    let q8 = fx("bf16-qint8", "quantized.safetensors");
    let qmap = fx("bf16-qint8", "quanto_qmap.json");
    for preset in [
        "int8",
        "int8:ct",
        "int8:ct:int-quantized",
        "int8:ct:group=32",
    ] {
        let sub = d.path().join(preset.replace(':', "_"));
        std::fs::create_dir(&sub).unwrap();
        let mid = sub.join("mid.safetensors");
        let o = run(&["convert", s(&q8), s(&mid), "--to", preset, "--json"]);
        if preset.contains("group") {
            // rows of 202 in-features hold no group of 32, so that layer is
            // requantized (lossy): refused without --allow-lossy (the layers
            // whose rows are whole groups carry, each group its row's scale)
            assert_eq!(code(&o), 1, "{preset}: {}", err(&o));
            continue;
        }
        assert_eq!(code(&o), 0, "{preset}: {}", err(&o));
        let v = json(&o);
        let layers = v["plan"]["layers"].as_array().unwrap();
        let ex = layers.iter().find(|l| l["path"] == "lin_excluded").unwrap();
        assert_eq!(ex["to"], "plain BF16", "{preset}: {ex}");
        assert!(ex["rule"].as_str().unwrap().contains("left float"), "{ex}");
        // and back to the original layout, byte for byte
        let back = sub.join("back").join("model.safetensors");
        run_ok(&["convert", s(&mid), s(&back), "--like", s(&qmap)]);
        assert_eq!(tensors(&back), tensors(&q8), "{preset}: round trip");
    }
    // --include selects a float layer explicitly
    let inc = d.path().join("inc/inc.safetensors");
    let o = run_ok(&[
        "convert",
        s(&q8),
        s(&inc),
        "--to",
        "int8",
        "--include",
        "lin_*",
        "--include",
        "conv*",
        "--json",
    ]);
    let v = json(&o);
    let ex = v["plan"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["path"] == "lin_excluded")
        .unwrap()
        .clone();
    assert_eq!(ex["to"], "int8", "{ex}");
    // a fully float model is quantized by the default selection, as before
    let f = d.path().join("f/f.safetensors");
    let o = run_ok(&[
        "convert",
        s(&fx("bf16-qint8", "float.safetensors")),
        s(&f),
        "--to",
        "int8",
        "--json",
    ]);
    assert!(json(&o)["plan"]["layers"]
        .to_string()
        .contains("\"to\":\"int8\""));
    // a layer that cannot be re-laid out exactly (qint4 -> int8) is
    // requantized only with --allow-lossy, and the plan says so
    let q4 = fx("bf16-qint4", "quantized.safetensors");
    let hint = fx("bf16-qint4", "float.safetensors");
    let o = run(&[
        "convert",
        s(&q4),
        s(&d.path().join("x/x.safetensors")),
        "--to",
        "int8",
        "--shapes-from",
        s(&hint),
    ]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(
        err(&o).contains("requantized") && err(&o).contains("--allow-lossy"),
        "{}",
        err(&o)
    );
    let o = run_ok(&[
        "convert",
        s(&q4),
        s(&d.path().join("x/x.safetensors")),
        "--to",
        "int8",
        "--shapes-from",
        s(&hint),
        "--allow-lossy",
        "--json",
    ]);
    let v = json(&o);
    let l = v["plan"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| {
            l["rule"]
                .as_str()
                .is_some_and(|r| r.contains("requantized"))
        })
        .unwrap_or_else(|| panic!("{v}"))
        .clone();
    assert_eq!(l["lossless"], false, "{l}");
    assert_eq!(l["exact"], false, "{l}");
}

// ---- item 6: a dequantization is exact, not "lossy" ----

#[test]
fn dequantization_is_reported_exact_not_lossy() {
    let d = tempfile::tempdir().unwrap();
    let o = run_ok(&[
        "convert",
        s(&fx("bf16-qint8", "quantized.safetensors")),
        s(&d.path().join("p.safetensors")),
        "--to",
        "plain",
        "--json",
    ]);
    let v = json(&o);
    for l in v["plan"]["layers"].as_array().unwrap() {
        if l["from"] == l["to"] {
            assert_eq!(l["lossless"], true, "{l}");
        } else {
            assert_eq!(l["lossless"], false, "{l}");
            assert_eq!(l["exact"], true, "{l}");
        }
    }
    // a narrowing cast is a loss of its own
    let o = run_ok(&[
        "convert",
        s(&fx("bf16-qint8", "quantized.safetensors")),
        s(&d.path().join("h.safetensors")),
        "--to",
        "plain:f16",
    ]);
    assert!(out(&o).contains("lossy"), "{}", out(&o));
}

// ---- item 3: --like a packed quanto checkpoint with bias-less layers ----

#[test]
fn like_a_packed_checkpoint_needs_only_its_layouts() {
    let d = tempfile::tempdir().unwrap();
    for qt in ["qint4", "qint2"] {
        let case = format!("bf16-{qt}");
        // the reference: the real quanto checkpoint (with a bias-less layer,
        // `lin_nobias`, whose shape the tensors alone do not tell)
        let reference = fx(&case, "quantized.safetensors");
        let o = run(&["inspect", s(&reference)]);
        assert!(
            out(&o).contains("lin_nobias"),
            "the fixture has the ambiguous layer"
        );
        let outp = d.path().join(&case).join("model.safetensors");
        run_ok(&[
            "convert",
            s(&fx(&case, "float.safetensors")),
            s(&outp),
            "--like",
            s(&reference),
        ]);
        // quanto's own bytes, tensor for tensor
        assert_eq!(tensors(&outp), tensors(&reference), "{qt}");
        run_ok(&["check", s(&outp), "--against", s(&reference)]);
    }
    // the bias-less layer packs into a container as it is (flat); a
    // conversion that needs its shape names only what can still help: the
    // map was read already
    run_ok(&[
        "convert",
        s(&fx("bf16-qint4", "quantized.safetensors")),
        s(&d.path().join("x.ckpk")),
    ]);
    let o = run(&[
        "convert",
        s(&fx("bf16-qint4", "quantized.safetensors")),
        s(&d.path().join("x.safetensors")),
        "--to",
        "plain",
    ]);
    assert_eq!(code(&o), 1);
    assert!(
        err(&o).contains("--shapes-from") && !err(&o).contains("--qmap"),
        "{}",
        err(&o)
    );
}

// ---- item 5: every tensor ckptkit writes is aligned ----

#[test]
fn outputs_align_tensor_data_and_inspect_flags_misaligned_integer_weights() {
    use ckptkit::TensorSource;
    let d = tempfile::tempdir().unwrap();
    let q8 = fx("bf16-qint8", "quantized.safetensors");
    // quanto's own file packs tensors back to back: int8 weights land
    // anywhere; inspect says so (a warning, not a failure)
    let o = run_ok(&["inspect", s(&q8), "--json"]);
    let v = json(&o);
    assert!(
        v["warnings"].to_string().contains("not a multiple of 16"),
        "{v}"
    );
    // ckptkit's outputs: files, shards of a directory, container shards
    let f = d.path().join("f/model.safetensors");
    let dir = d.path().join("dir");
    let ck = d.path().join("m.ckpk");
    let ext = d.path().join("ext.safetensors");
    run_ok(&["convert", s(&q8), s(&f)]);
    run_ok(&["convert", s(&q8), s(&dir), "--max-shard-size", "3000"]);
    run_ok(&["convert", s(&q8), s(&ck)]);
    run_ok(&["convert", s(&ck), s(&ext)]);
    let mut files = vec![f.clone(), ext];
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            files.push(p);
        }
    }
    assert!(files.len() > 3);
    for p in &files {
        let st = ckptkit::SafetensorsFile::open(p).unwrap();
        let h = st.header();
        assert_eq!(h.header_len % 64, 0, "{}", p.display());
        for t in &h.tensors {
            let len = t.end - t.start;
            let class = ckptkit::fuzzing::internals::st_header::align_class(len);
            assert_eq!(
                (h.header_len + t.start) % class,
                0,
                "{} {}",
                p.display(),
                t.key
            );
            if len % 16 == 0 {
                assert_eq!(
                    (h.header_len + t.start) % 16,
                    0,
                    "{} {}",
                    p.display(),
                    t.key
                );
            }
        }
        let _ = st.tensors();
    }
    let o = run_ok(&["inspect", s(&f), "--json"]);
    let v = json(&o);
    // what remains misaligned is only what no layout without holes can
    // align: int8 weights whose length is not a multiple of 16
    for w in v["warnings"].as_array().unwrap() {
        let w = w.as_str().unwrap();
        let key = w.split('`').nth(1).unwrap();
        let st = ckptkit::SafetensorsFile::open(&f).unwrap();
        let t = st.header().get(key).unwrap();
        assert_ne!((t.end - t.start) % 16, 0, "{w}");
    }
    // a container's uncompressed shards are aligned in place too
    let c = ckptkit::Container::open(&ck).unwrap();
    for sh in &c.manifest().shards {
        assert_eq!((sh.offset + sh.header_len) % 64, 0);
    }
}

//! Whole-file migrations on the real optimum-quanto fixtures: the outputs
//! must equal what quanto itself wrote, tensor for tensor.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ckptkit::migrate::Target;
use ckptkit::migrate::{convert, like_target, ConvertOptions};
use ckptkit::{SafetensorsFile, TensorSource};

fn cases() -> Vec<PathBuf> {
    common::fixture_cases("quanto", 20)
}

fn keys(f: &SafetensorsFile) -> BTreeSet<String> {
    f.tensors().iter().map(|t| t.key.clone()).collect()
}

fn is_act_case(dir: &Path) -> bool {
    dir.file_name().unwrap().to_string_lossy().contains("-act_")
}

#[test]
fn like_qmap_quantizes_exactly_as_quanto() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in cases() {
        let out_dir = tmp.path().join(dir.file_name().unwrap());
        std::fs::create_dir(&out_dir).unwrap();
        let out = out_dir.join("model.safetensors");
        let opts =
            ConvertOptions::default().target(like_target(&dir.join("quanto_qmap.json")).unwrap());
        convert(&dir.join("float.safetensors"), &out, &opts).unwrap();
        let ours = SafetensorsFile::open(&out).unwrap();
        let theirs = SafetensorsFile::open(&dir.join("quantized.safetensors")).unwrap();
        assert_eq!(keys(&ours), keys(&theirs), "{}", dir.display());
        for t in theirs.tensors() {
            let o = ours.get(&t.key).unwrap();
            assert_eq!((o.dtype, &o.shape), (t.dtype, &t.shape), "{}", t.key);
            // calibrated activation scales cannot come from a float file
            let calibrated = is_act_case(&dir)
                && (t.key.ends_with("input_scale") || t.key.ends_with("output_scale"));
            if !calibrated {
                assert_eq!(
                    &ours.read(&t.key).unwrap()[..],
                    &theirs.read(&t.key).unwrap()[..],
                    "{}: {}",
                    dir.display(),
                    t.key
                );
            }
        }
        // the companion map equals quanto's
        let qmap = std::fs::read_to_string(out_dir.join("quanto_qmap.json")).unwrap();
        let want = std::fs::read_to_string(dir.join("quanto_qmap.json")).unwrap();
        let a = ckptkit::fuzzing::internals::quanto::QuantoMap::parse(&qmap).unwrap();
        let b = ckptkit::fuzzing::internals::quanto::QuantoMap::parse(&want).unwrap();
        let mut ae = a.entries.clone();
        let mut be = b.entries.clone();
        ae.sort_by(|x, y| x.0.cmp(&y.0));
        be.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(ae, be, "{}", dir.display());
        // our output describes itself
        assert!(ours.metadata().contains_key("ckptkit.schema"));
        assert_eq!(
            ours.metadata().get("format").map(String::as_str),
            Some("pt")
        );
    }
}

#[test]
fn dequantize_to_plain_gives_quanto_floats_and_the_plain_key_set() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in cases() {
        let out = tmp.path().join(format!(
            "{}.safetensors",
            dir.file_name().unwrap().to_string_lossy()
        ));
        let opts = ConvertOptions::default()
            .target(Target::Plain(None))
            .qmap(Some(dir.join("quanto_qmap.json")))
            .shapes_from(Some(dir.join("float.safetensors")));
        convert(&dir.join("quantized.safetensors"), &out, &opts).unwrap();
        let ours = SafetensorsFile::open(&out).unwrap();
        let float = SafetensorsFile::open(&dir.join("float.safetensors")).unwrap();
        let gold = SafetensorsFile::open(&dir.join("dequantized.safetensors")).unwrap();
        assert_eq!(
            keys(&ours),
            keys(&float),
            "{}: a plain model's key set",
            dir.display()
        );
        for t in gold.tensors() {
            assert_eq!(
                &ours.read(&t.key).unwrap()[..],
                &gold.read(&t.key).unwrap()[..],
                "{}",
                t.key
            );
        }
        let q = SafetensorsFile::open(&dir.join("quantized.safetensors")).unwrap();
        for t in float.tensors() {
            if t.key.ends_with(".bias") || gold.get(&t.key).is_none() && q.get(&t.key).is_some() {
                assert_eq!(
                    &ours.read(&t.key).unwrap()[..],
                    &q.read(&t.key).unwrap()[..],
                    "{}",
                    t.key
                );
            }
        }
        assert!(
            !tmp.path().join("quanto_qmap.json").exists(),
            "plain output must have no qmap"
        );
    }
}

#[test]
fn quanto_through_container_and_back_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in cases() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let ck = tmp.path().join(format!("{name}.ckpk"));
        let opts = ConvertOptions::default()
            .qmap(Some(dir.join("quanto_qmap.json")))
            .shapes_from(Some(dir.join("float.safetensors")))
            .compression(Some(ckptkit::ZstdOptions::default()));
        convert(&dir.join("quantized.safetensors"), &ck, &opts).unwrap();
        let c = ckptkit::Container::open(&ck).unwrap();
        c.verify().unwrap();
        assert!(c
            .layers()
            .iter()
            .any(|l| matches!(l.quant.weights, ckptkit::WeightQuant::Quanto { .. })));
        let back_dir = tmp.path().join(&name);
        std::fs::create_dir(&back_dir).unwrap();
        let back = back_dir.join("model.safetensors");
        convert(&ck, &back, &ConvertOptions::default()).unwrap();
        let a = SafetensorsFile::open(&back).unwrap();
        let b = SafetensorsFile::open(&dir.join("quantized.safetensors")).unwrap();
        assert_eq!(keys(&a), keys(&b));
        for t in b.tensors() {
            assert_eq!(
                &a.read(&t.key).unwrap()[..],
                &b.read(&t.key).unwrap()[..],
                "{}",
                t.key
            );
        }
        assert!(back_dir.join("quanto_qmap.json").is_file());
    }
}

/// Writes `keys` of `src` into `dir/name` (a plain copy of their bytes).
fn write_subset(src: &SafetensorsFile, keys: &[&String], dir: &Path, name: &str) {
    let plan: Vec<_> = keys
        .iter()
        .map(|k| {
            let t = src.get(k).unwrap();
            ((*k).clone(), t.dtype, t.shape.clone())
        })
        .collect();
    let md = [("format".to_string(), "pt".to_string())].into();
    let w = ckptkit::SafetensorsWriter::create(&dir.join(name), &plan, &md, false, false).unwrap();
    for k in keys {
        w.write_tensor(k, &src.read(k).unwrap()).unwrap();
    }
    w.finish().unwrap();
}

/// A quanto checkpoint split so that every layer's `weight._data` sits in
/// one shard and its `weight._scale` in the other, under a non-standard
/// stem (`consolidated-0000k-of-00002`): dequantizing the directory gives
/// exactly what dequantizing the single file gives; output files follow the
/// input's naming; a shard missing from the set is refused before anything
/// is written.
#[test]
fn layers_split_across_shards_and_the_input_naming_convention() {
    let case = cases()
        .into_iter()
        .find(|d| d.ends_with("bf16-qint4"))
        .unwrap();
    let single = SafetensorsFile::open(&case.join("quantized.safetensors")).unwrap();
    let all: Vec<&String> = single.tensors().iter().map(|t| &t.key).collect();
    let (scales, rest): (Vec<&String>, Vec<&String>) =
        all.iter().partition(|k| k.ends_with("._scale"));
    assert!(scales.len() >= 3 && rest.iter().any(|k| k.ends_with("._data")));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sharded");
    std::fs::create_dir(&dir).unwrap();
    let (a, b) = (
        "consolidated-00001-of-00002.safetensors",
        "consolidated-00002-of-00002.safetensors",
    );
    write_subset(&single, &rest, &dir, a);
    write_subset(&single, &scales, &dir, b);
    let mut weight_map = serde_json::Map::new();
    for k in &rest {
        weight_map.insert((*k).clone(), a.into());
    }
    for k in &scales {
        weight_map.insert((*k).clone(), b.into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.join("consolidated.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    std::fs::copy(case.join("quanto_qmap.json"), dir.join("quanto_qmap.json")).unwrap();
    let plain = ConvertOptions::default()
        .target(Target::Plain(None))
        .shapes_from(Some(case.join("float.safetensors")));
    // reference: the single file
    let want = tmp.path().join("want.safetensors");
    convert(
        &case.join("quantized.safetensors"),
        &want,
        &plain.clone().qmap(Some(case.join("quanto_qmap.json"))),
    )
    .unwrap();
    let want = SafetensorsFile::open(&want).unwrap();
    // the directory, re-sharded small: the input's stem is kept
    let out = tmp.path().join("out");
    convert(&dir, &out, &plain.clone().max_shard_size(3000)).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(
        names.contains(&"consolidated.safetensors.index.json".to_string())
            && names
                .iter()
                .filter(|n| n.starts_with("consolidated-0000") && n.ends_with(".safetensors"))
                .count()
                > 1
            && !names.contains(&"quanto_qmap.json".to_string()),
        "{names:?}"
    );
    let got = ckptkit::open_source(&out).unwrap();
    let gk: BTreeSet<String> = got.tensors().iter().map(|t| t.key.clone()).collect();
    assert_eq!(gk, keys(&want));
    for t in want.tensors() {
        assert_eq!(
            &got.read(&t.key).unwrap()[..],
            &want.read(&t.key).unwrap()[..],
            "{}",
            t.key
        );
    }
    // a lone single file becomes a directory named as transformers expects
    let flux = tmp.path().join("flux1-dev.safetensors");
    std::fs::copy(case.join("float.safetensors"), &flux).unwrap();
    let fout = tmp.path().join("flux-out");
    convert(&flux, &fout, &ConvertOptions::default()).unwrap();
    assert!(fout.join("model.safetensors").is_file());

    // the scale shard missing (and dropped from the index): the layers lose
    // their partners; refused before any output exists
    std::fs::remove_file(dir.join(b)).unwrap();
    let mut wm = index["weight_map"].as_object().unwrap().clone();
    wm.retain(|_, v| v != b);
    std::fs::write(
        dir.join("consolidated.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": wm}).to_string(),
    )
    .unwrap();
    let bad = tmp.path().join("bad");
    let e = convert(&dir, &bad, &plain).unwrap_err();
    assert!(
        e.to_string().contains("without `weight._scale`") && e.location().layer.is_some(),
        "{e}"
    );
    assert!(!bad.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path())
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("ckptkit-tmp"))
            .count(),
        0
    );
}

/// Packed (qint4/qint2) fixture cases.
fn packed_cases() -> Vec<PathBuf> {
    let v: Vec<PathBuf> = cases()
        .into_iter()
        .filter(|d| {
            let n = d.file_name().unwrap().to_string_lossy().into_owned();
            n.ends_with("qint4") || n.ends_with("qint2")
        })
        .collect();
    assert!(v.len() >= 6, "qint4/qint2 fixtures: {v:?}");
    v
}

/// A module without a bias in a qint4/qint2 file: its shape is not in the
/// files, its values are. It packs into a container without hints (once
/// refused as ambiguous), verifies, is kept byte for byte, refuses
/// conversions that need its shape, and dequantizes exactly as quanto with
/// `--shapes-from`.
#[test]
fn flat_weights_pack_verify_and_dequantize_with_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in packed_cases() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let input = tmp.path().join(&name).join("in");
        std::fs::create_dir_all(&input).unwrap();
        let q = input.join("model.safetensors");
        std::fs::copy(dir.join("quantized.safetensors"), &q).unwrap();
        std::fs::copy(dir.join("quanto_qmap.json"), input.join("quanto_qmap.json")).unwrap();
        let ck = tmp.path().join(&name).join("model.ckpk");
        convert(&q, &ck, &ConvertOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let c = ckptkit::Container::open(&ck).unwrap();
        assert_eq!(
            c.manifest().version.major,
            2,
            "{name}: a flat weight is 2.0"
        );
        let flat: Vec<&ckptkit::Layer> = c
            .layers()
            .iter()
            .filter(|l| {
                l.tensors
                    .iter()
                    .any(|t| t.encoding == ckptkit::Encoding::QuantizedFlat)
            })
            .collect();
        assert!(
            flat.iter().any(|l| l.path == "lin_nobias"),
            "{name}: {:?}",
            flat.iter().map(|l| &l.path).collect::<Vec<_>>()
        );
        let float = SafetensorsFile::open(&dir.join("float.safetensors")).unwrap();
        for l in &flat {
            let w = &l.tensors[0];
            let real = float.get(&format!("{}.weight", l.path)).unwrap();
            assert_eq!(
                w.shape,
                vec![real.shape.iter().product::<u64>()],
                "{name} {}",
                l.path
            );
        }
        ckptkit::migrate::verify(&ck).unwrap();
        // kept into another container: the same records and bytes
        let ck2 = tmp.path().join(&name).join("copy.ckpk");
        convert(&ck, &ck2, &ConvertOptions::default()).unwrap();
        assert_eq!(ckptkit::Container::open(&ck2).unwrap().layers(), c.layers());
        // a conversion that needs the shape: refused, naming the layer and
        // the hint, with no output
        let out = tmp.path().join(&name).join("plain.safetensors");
        let e = convert(
            &ck,
            &out,
            &ConvertOptions::default().target(Target::Plain(None)),
        )
        .unwrap_err();
        assert!(
            matches!(e.kind(), ckptkit::ErrorKind::Ambiguous(_))
                && e.to_string().contains("--shapes-from"),
            "{name}: {e}"
        );
        assert!(e.location().layer.is_some(), "{name}: {e}");
        assert!(!out.exists());
        // with the shapes: exactly what quanto dequantizes
        let opts = ConvertOptions::default()
            .target(Target::Plain(None))
            .shapes_from(dir.join("float.safetensors"));
        convert(&ck, &out, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ours = SafetensorsFile::open(&out).unwrap();
        let theirs = SafetensorsFile::open(&dir.join("dequantized.safetensors")).unwrap();
        for l in &flat {
            let k = format!("{}.weight", l.path);
            let (o, t) = (ours.get(&k).unwrap(), theirs.get(&k).unwrap());
            assert_eq!(o.shape, t.shape, "{name} {k}");
            assert_eq!(
                &ours.read(&k).unwrap()[..],
                &theirs.read(&k).unwrap()[..],
                "{name} {k}"
            );
        }
    }
}

/// A flat weight kept into a safetensors file records its shape as
/// unknown in ckptkit's schema, so the file reads back flat.
#[test]
fn flat_weights_survive_a_safetensors_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed_cases().remove(0);
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let q = input.join("model.safetensors");
    std::fs::copy(dir.join("quantized.safetensors"), &q).unwrap();
    std::fs::copy(dir.join("quanto_qmap.json"), input.join("quanto_qmap.json")).unwrap();
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("model.safetensors");
    convert(&q, &out, &ConvertOptions::default()).unwrap();
    let src = ckptkit::open_source(&out).unwrap();
    let layers =
        ckptkit::migrate::input_layers(&out, src.as_ref(), &ConvertOptions::default()).unwrap();
    let l = layers.iter().find(|l| l.path == "lin_nobias").unwrap();
    assert_eq!(l.tensors[0].encoding, ckptkit::Encoding::QuantizedFlat);
    // and every stored byte is the input's
    let (a, b) = (
        SafetensorsFile::open(&q).unwrap(),
        SafetensorsFile::open(&out).unwrap(),
    );
    for t in a.tensors() {
        assert_eq!(
            &a.read(&t.key).unwrap()[..],
            &b.read(&t.key).unwrap()[..],
            "{}",
            t.key
        );
    }
}

/// A plain `lin.weight` stored beside quanto's `lin.weight._data` and
/// `lin.weight._scale`: both read as the layer's `weight`, so which one a
/// loader takes is undefined. Every command refuses the layer by name
/// rather than planning one tensor and executing the other (a fuzz find:
/// the plan said BF16 [4, 32], execution produced the dequantized [4, 160]).
#[test]
fn a_plain_weight_beside_quantos_weight_data_is_refused() {
    let case = cases()
        .into_iter()
        .find(|d| d.ends_with("bf16-qint8"))
        .unwrap();
    let src = SafetensorsFile::open(&case.join("quantized.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // the model's keys, with `lin_excluded.weight` (plain BF16 [4, 32])
    // stored again under the name `lin_zero_row.weight`
    let mut plan: Vec<(String, ckptkit::Dtype, Vec<u64>)> = src
        .tensors()
        .iter()
        .map(|t| (t.key.clone(), t.dtype, t.shape.clone()))
        .collect();
    let extra = src.get("lin_excluded.weight").unwrap();
    assert!(src.get("lin_zero_row.weight._data").is_some());
    plan.push((
        "lin_zero_row.weight".into(),
        extra.dtype,
        extra.shape.clone(),
    ));
    let input = tmp.path().join("both.safetensors");
    let md = [("format".to_string(), "pt".to_string())].into();
    let w = ckptkit::SafetensorsWriter::create(&input, &plan, &md, false, false).unwrap();
    for t in src.tensors() {
        w.write_tensor(&t.key, &src.read(&t.key).unwrap()).unwrap();
    }
    w.write_tensor(
        "lin_zero_row.weight",
        &src.read("lin_excluded.weight").unwrap(),
    )
    .unwrap();
    w.finish().unwrap();
    for target in [Target::Plain(None), Target::parse("quanto:qint8").unwrap()] {
        let out = tmp.path().join("out.safetensors");
        let opts = ConvertOptions::default()
            .target(target)
            .qmap(Some(case.join("quanto_qmap.json")));
        let e = convert(&input, &out, &opts).expect_err("a layer with two weights converted");
        assert!(matches!(e.kind(), ckptkit::ErrorKind::Layout(_)), "{e}");
        assert_eq!(e.location().layer.as_deref(), Some("lin_zero_row"), "{e}");
        let m = e.to_string();
        assert!(
            m.contains("`lin_zero_row.weight._data`")
                && m.contains("`lin_zero_row.weight`")
                && m.contains("both read as `weight`"),
            "{m}"
        );
        assert!(!out.exists());
    }
}

/// `migrate::load` converts into memory exactly what `convert` writes: for
/// every quanto fixture, dequantized to plain, each tensor handed over once
/// in the plan's order equals quanto's own `dequantized.safetensors`; a
/// corrupt input is refused as `convert` refuses it, naming the tensor.
#[test]
fn load_converts_into_memory_what_convert_writes() {
    use ckptkit::migrate::load;
    for dir in cases() {
        let opts = ConvertOptions::default()
            .target(Target::Plain(None))
            .qmap(Some(dir.join("quanto_qmap.json")))
            .shapes_from(Some(dir.join("float.safetensors")));
        let gold = SafetensorsFile::open(&dir.join("dequantized.safetensors")).unwrap();
        let float = SafetensorsFile::open(&dir.join("float.safetensors")).unwrap();
        let mut seen = BTreeSet::new();
        let mut compared = 0;
        let s = load(
            &dir.join("quantized.safetensors"),
            &opts,
            &mut |k, d, shape, b| {
                let t = float
                    .get(k)
                    .unwrap_or_else(|| panic!("{}: extra tensor {k}", dir.display()));
                assert_eq!((d, shape), (t.dtype, &t.shape[..]), "{k}");
                // quanto's dequantize() for every weight it dequantized
                if gold.get(k).is_some() {
                    assert_eq!(&b[..], &gold.read(k).unwrap()[..], "{}: {k}", dir.display());
                    compared += 1;
                }
                assert!(seen.insert(k.to_string()), "{k} twice");
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            seen,
            keys(&float),
            "{}: a plain model's key set",
            dir.display()
        );
        assert_eq!(compared, gold.tensors().len(), "{}", dir.display());
        assert!(s.input_verified || s.input_unchecked > 0);
        assert_eq!(s.tensors, seen.len());
    }
    // corrupt bytes in a file ckptkit wrote: refused, as convert refuses them
    let case = cases()
        .into_iter()
        .find(|d| d.ends_with("bf16-qint8"))
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q.safetensors");
    convert(
        &case.join("float.safetensors"),
        &out,
        &ConvertOptions::default().target(Target::parse("quanto:qint8").unwrap()),
    )
    .unwrap();
    // one bit of a weight's codes (every conversion to plain reads them)
    let codes = SafetensorsFile::open(&out)
        .unwrap()
        .read("lin_g128.weight._data")
        .unwrap()
        .to_vec();
    let mut b = std::fs::read(&out).unwrap();
    let at = b
        .windows(codes.len())
        .position(|w| w == &codes[..])
        .unwrap();
    b[at + 100] ^= 0x40;
    std::fs::write(&out, &b).unwrap();
    let e = load(
        &out,
        &ConvertOptions::default().target(Target::Plain(None)),
        &mut |_, _, _, _| Ok(()),
    )
    .expect_err("corrupt input loaded");
    assert!(
        matches!(e.kind(), ckptkit::ErrorKind::HashMismatch { .. }),
        "{e}"
    );
}

/// A reference described by its tensors alone (a model's state dict: keys,
/// dtypes, shapes) with its quanto map gives the same `--like` target as
/// the checkpoint file with the map beside it, on every fixture.
#[test]
fn like_tensors_reads_a_state_dict_as_like_target_reads_its_file() {
    use ckptkit::migrate::like_tensors;
    for dir in cases() {
        let file = dir.join("quantized.safetensors");
        let f = SafetensorsFile::open(&file).unwrap();
        let described: Vec<_> = f
            .tensors()
            .iter()
            .map(|t| (t.key.clone(), t.dtype, t.shape.clone(), None))
            .collect();
        let qmap = dir.join("quanto_qmap.json");
        let from_tensors = like_tensors(&described, Some(&qmap), None).unwrap();
        assert_eq!(
            from_tensors,
            like_target(&file).unwrap(),
            "{}",
            dir.display()
        );
        // the same map handed over as JSON text (Python's quantization_map(model))
        let text = std::fs::read_to_string(&qmap).unwrap();
        let from_text = like_tensors(&described, None, Some(&text)).unwrap();
        assert_eq!(from_text, from_tensors, "{}", dir.display());
    }
}

/// Without its map a packed quanto model's state dict is ambiguous; with the
/// map as text it is not; a map as both file and text, or a broken text, is
/// refused.
#[test]
fn like_tensors_takes_the_quanto_map_as_text() {
    use ckptkit::migrate::like_tensors;
    let dir = cases()
        .into_iter()
        .find(|d| d.ends_with("bf16-qint4"))
        .unwrap();
    let file = dir.join("quantized.safetensors");
    let f = SafetensorsFile::open(&file).unwrap();
    let described: Vec<_> = f
        .tensors()
        .iter()
        .map(|t| (t.key.clone(), t.dtype, t.shape.clone(), None))
        .collect();
    let qmap = dir.join("quanto_qmap.json");
    let text = std::fs::read_to_string(&qmap).unwrap();
    assert!(
        like_tensors(&described, None, None).is_err(),
        "qint4 without its map"
    );
    like_tensors(&described, None, Some(&text)).unwrap();
    let both = like_tensors(&described, Some(&qmap), Some(&text)).unwrap_err();
    assert!(
        matches!(both.kind(), ckptkit::ErrorKind::Usage(_)),
        "{both}"
    );
    let bad = like_tensors(
        &described,
        None,
        Some(r#"{"lin": {"weights": "qint9", "activations": "none"}}"#),
    )
    .unwrap_err();
    assert!(bad.to_string().contains("qint9"), "{bad}");
}

/// `only` writes the named layers and nothing else, converted as a full
/// conversion converts them (the subset a reader's `get_dequantized` loads);
/// globs that match no layer are refused before anything is written.
#[test]
fn only_the_selected_layers_are_loaded_and_written() {
    use ckptkit::migrate::{load, PlanOptions};
    let dir = cases()
        .into_iter()
        .find(|d| d.ends_with("bf16-qint8"))
        .unwrap();
    let gold = SafetensorsFile::open(&dir.join("dequantized.safetensors")).unwrap();
    let only = |globs: &[&str]| {
        ConvertOptions::default()
            .target(Target::Plain(None))
            .shapes_from(Some(dir.join("float.safetensors")))
            .select(PlanOptions::default().only(globs.iter().map(|g| g.to_string()).collect()))
    };
    let mut got = Vec::new();
    load(
        &dir.join("quantized.safetensors"),
        &only(&["lin_g64", "conv_*27"]),
        &mut |k, _, _, b| {
            got.push((k.to_string(), b.into_vec()));
            Ok(())
        },
    )
    .unwrap();
    let names: BTreeSet<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "conv_k3_i27.bias",
            "conv_k3_i27.weight",
            "lin_g64.bias",
            "lin_g64.weight"
        ])
    );
    for (k, b) in &got {
        if k.ends_with(".weight") {
            assert_eq!(&b[..], &gold.read(k).unwrap()[..], "{k}");
        }
    }
    // convert: the same subset in the file
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sub.safetensors");
    convert(
        &dir.join("quantized.safetensors"),
        &out,
        &only(&["lin_g64"]),
    )
    .unwrap();
    assert_eq!(
        keys(&SafetensorsFile::open(&out).unwrap()),
        BTreeSet::from(["lin_g64.bias".to_string(), "lin_g64.weight".to_string()])
    );
    // nothing matches: refused, nothing written
    let none = tmp.path().join("none.safetensors");
    let e = convert(
        &dir.join("quantized.safetensors"),
        &none,
        &only(&["no_such_layer"]),
    )
    .unwrap_err();
    assert!(matches!(e.kind(), ckptkit::ErrorKind::Usage(_)), "{e}");
    assert!(e.to_string().contains("no_such_layer"), "{e}");
    assert!(!none.exists());
}

//! Whole-file migrations on the real optimum-quanto fixtures: the outputs
//! must equal what quanto itself wrote, tensor for tensor.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ckptkit::convert::{convert, like_target, ConvertOptions};
use ckptkit::plan::Target;
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
        let opts = ConvertOptions {
            target: like_target(&dir.join("quanto_qmap.json")).unwrap(),
            ..Default::default()
        };
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
        let a = ckptkit::layout::quanto::QuantoMap::parse(&qmap).unwrap();
        let b = ckptkit::layout::quanto::QuantoMap::parse(&want).unwrap();
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
        let opts = ConvertOptions {
            target: Target::Plain(None),
            qmap: Some(dir.join("quanto_qmap.json")),
            shapes_from: Some(dir.join("float.safetensors")),
            ..Default::default()
        };
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
        let opts = ConvertOptions {
            qmap: Some(dir.join("quanto_qmap.json")),
            shapes_from: Some(dir.join("float.safetensors")),
            compression: Some(ckptkit::ZstdOptions::default()),
            ..Default::default()
        };
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

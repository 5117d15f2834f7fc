//! Bit-exactness against files written by the real optimum-quanto 0.2.7
//! (tests/fixtures/quanto, made by tests/interop/gen_quanto_fixtures.py;
//! see the README there). No Python is needed to run these.

mod common;

use std::path::{Path, PathBuf};

use ckptkit::fuzzing::internals::detect::{detect_layers, Hints};
use ckptkit::fuzzing::internals::quanto::{self, math, QType, QuantoMap};
use ckptkit::{Encoding, SafetensorsFile, TensorSource, WeightQuant};

fn cases() -> Vec<PathBuf> {
    common::fixture_cases("quanto", 20)
}

fn case_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap()
}

/// Quantized modules of a case: (name, weight shape, group size).
fn modules(c: &serde_json::Value) -> Vec<(String, Option<u64>)> {
    c["modules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["weight_qtype"].as_str().is_some_and(|w| w != "none"))
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["group_size"].as_u64(),
            )
        })
        .collect()
}

/// Hints holding a quanto map, as the quanto family reads it beside a file.
fn with_map(qmap: QuantoMap) -> Hints<'static> {
    Hints::default().with_side(
        "quanto",
        quanto::QuantoSide {
            qmap: Some(qmap),
            diffusers: None,
        },
    )
}

#[test]
fn dequantize_matches_quanto_bit_for_bit() {
    let mut checked = 0;
    for dir in cases() {
        let src = SafetensorsFile::open(&dir.join("quantized.safetensors")).unwrap();
        let gold = SafetensorsFile::open(&dir.join("dequantized.safetensors")).unwrap();
        let qmap = QuantoMap::from_file(&dir.join("quanto_qmap.json")).unwrap();
        // the map alone resolves every layer that has a bias; a bias-less
        // packed one is read flat (its values known, its shape not), and a
        // plain checkpoint of the same model gives it its shape
        let hints = with_map(qmap.clone());
        let alone = detect_layers(&src, &hints).unwrap();
        let flat: Vec<&str> = alone
            .iter()
            .filter(|l| {
                l.tensors
                    .iter()
                    .any(|t| t.encoding == Encoding::QuantizedFlat)
            })
            .map(|l| l.path.as_str())
            .collect();
        let packed =
            dir.to_string_lossy().ends_with("qint4") || dir.to_string_lossy().ends_with("qint2");
        assert_eq!(
            flat,
            if packed { vec!["lin_nobias"] } else { vec![] },
            "{}",
            dir.display()
        );
        let layers = if packed {
            let float = SafetensorsFile::open(&dir.join("float.safetensors")).unwrap();
            let mut hints = with_map(qmap);
            hints.shapes_from = Some(&float);
            detect_layers(&src, &hints).unwrap()
        } else {
            alone
        };
        for l in &layers {
            let WeightQuant::Quanto { .. } = &l.quant.weights else {
                continue;
            };
            let w = l.tensors.iter().find(|t| t.name == "weight").unwrap();
            let ours = quanto::dequantize_weight(&src, l, w).unwrap();
            let key = format!("{}.weight", l.path);
            let theirs = gold.read(&key).unwrap();
            assert_eq!(&ours[..], &theirs[..], "{}: {key}", dir.display());
            checked += 1;
        }
        assert_eq!(
            layers
                .iter()
                .filter(|l| matches!(l.quant.weights, WeightQuant::Quanto { .. }))
                .count(),
            gold.tensors().len(),
            "{}",
            dir.display()
        );
    }
    assert!(checked > 150, "only {checked} weights checked");
}

#[test]
fn quantize_matches_quanto_bit_for_bit() {
    let mut checked = 0;
    for dir in cases() {
        let c = case_json(&dir);
        let qtype = QType::from_name(c["weights"].as_str().unwrap()).unwrap();
        let float = SafetensorsFile::open(&dir.join("float.safetensors")).unwrap();
        let q = SafetensorsFile::open(&dir.join("quantized.safetensors")).unwrap();
        let qmap = QuantoMap::from_file(&dir.join("quanto_qmap.json")).unwrap();
        for (m, e) in &qmap.entries {
            if e.weights == "none" {
                continue;
            }
            let wkey = format!("{m}.weight");
            let wt = float.get(&wkey).unwrap();
            let dt = quanto::float_of(wt.dtype).unwrap();
            let gs = if qtype.is_packed() {
                math::group_size(wt.shape[0], ckptkit::numel(&wt.shape).unwrap())
            } else {
                None
            };
            let bytes = float.read(&wkey).unwrap();
            let ours = math::quantize(qtype, dt, &wt.shape, &bytes, gs).unwrap();
            let (dk, sk, shk) = quanto::weight_keys(m, qtype);
            assert_eq!(
                &ours.data.bytes[..],
                &q.read(&dk).unwrap()[..],
                "{}: {dk}",
                dir.display()
            );
            assert_eq!(ours.data.shape, q.get(&dk).unwrap().shape);
            assert_eq!(
                &ours.scale.bytes[..],
                &q.read(&sk).unwrap()[..],
                "{}: {sk}",
                dir.display()
            );
            assert_eq!(ours.scale.shape, q.get(&sk).unwrap().shape);
            if let Some(shk) = shk {
                let sh = ours.shift.as_ref().unwrap();
                assert_eq!(
                    &sh.bytes[..],
                    &q.read(&shk).unwrap()[..],
                    "{}: {shk}",
                    dir.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 150, "only {checked} weights checked");
}

#[test]
fn inference_without_qmap_agrees_with_the_real_map() {
    // With no map, 8-bit qtypes come from the dtypes and packed ones from
    // the shapes; whatever is inferred must equal what quanto recorded, and
    // whatever cannot be inferred must be reported as ambiguous.
    for dir in cases() {
        let c = case_json(&dir);
        let src = SafetensorsFile::open(&dir.join("quantized.safetensors")).unwrap();
        match detect_layers(&src, &Hints::default()) {
            Ok(layers) => {
                for (m, gs) in modules(&c) {
                    let l = layers.iter().find(|l| l.path == m).unwrap();
                    match &l.quant.weights {
                        WeightQuant::Quanto { qtype, group_size } => {
                            assert_eq!(qtype, c["weights"].as_str().unwrap(), "{m}");
                            assert_eq!(*group_size, gs, "{}: {m}", dir.display());
                        }
                        other => panic!("{m}: {other:?}"),
                    }
                }
            }
            Err(e) => {
                assert!(
                    matches!(e.kind(), ckptkit::ErrorKind::Ambiguous(_)),
                    "{}: {e}",
                    dir.display()
                );
                assert!(e.to_string().contains("--qmap"), "{e}");
                assert!(QType::from_name(c["weights"].as_str().unwrap())
                    .unwrap()
                    .is_packed());
            }
        }
    }
}

#[test]
fn contradicting_qmap_is_refused_naming_the_layer() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quanto/bf16-qint8");
    let src = SafetensorsFile::open(&dir.join("quantized.safetensors")).unwrap();
    let mut qmap = QuantoMap::from_file(&dir.join("quanto_qmap.json")).unwrap();
    let (m, _) = qmap.entries[0].clone();
    qmap.entries[0].1.weights = "qint4".into();
    let e = detect_layers(&src, &with_map(qmap)).unwrap_err();
    assert!(matches!(e.kind(), ckptkit::ErrorKind::Layout(_)), "{e}");
    assert_eq!(e.location().layer.as_deref(), Some(m.as_str()), "{e}");
    assert!(e.to_string().contains("qint4"), "{e}");
}

#[test]
fn qmap_renders_as_quanto_writes_it() {
    for dir in cases() {
        let text = std::fs::read_to_string(dir.join("quanto_qmap.json")).unwrap();
        let m = QuantoMap::parse(&text).unwrap();
        assert_eq!(m.to_json(), text, "{}", dir.display());
    }
}

/// Rewrites a fixture with `edit` applied to its tensor list.
fn rewrite(
    case: &str,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> (tempfile::TempDir, PathBuf) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/quanto")
        .join(case);
    let src = SafetensorsFile::open(&dir.join("quantized.safetensors")).unwrap();
    let mut ts: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = src
        .tensors()
        .iter()
        .map(|t| {
            (
                t.key.clone(),
                t.dtype.to_st(),
                t.shape.iter().map(|&d| d as usize).collect(),
                src.read(&t.key).unwrap().into_vec(),
            )
        })
        .collect();
    edit(&mut ts);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = ts
        .iter()
        .map(|(k, d, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("model.safetensors");
    std::fs::write(&p, bytes).unwrap();
    std::fs::copy(
        dir.join("quanto_qmap.json"),
        tmp.path().join("quanto_qmap.json"),
    )
    .unwrap();
    (tmp, p)
}

fn detect_err(p: &Path) -> ckptkit::Error {
    let src = SafetensorsFile::open(p).unwrap();
    let qmap = QuantoMap::from_file(&p.with_file_name("quanto_qmap.json")).unwrap();
    detect_layers(&src, &with_map(qmap)).unwrap_err()
}

#[test]
fn missing_scale_is_refused() {
    let (_d, p) = rewrite("bf16-qint8", |ts| {
        ts.retain(|t| t.0 != "lin_g128.weight._scale")
    });
    let e = detect_err(&p);
    assert_eq!(e.location().layer.as_deref(), Some("lin_g128"), "{e}");
    assert!(e.to_string().contains("without `weight._scale`"), "{e}");
}

#[test]
fn wrong_scale_shape_is_refused() {
    let (_d, p) = rewrite("bf16-qint8", |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.0 == "lin_g128.weight._scale")
            .unwrap();
        // [16,1] -> [8,2]: same bytes, wrong shape
        t.2 = vec![8, 2];
    });
    let e = detect_err(&p);
    assert_eq!(e.location().layer.as_deref(), Some("lin_g128"), "{e}");
    assert!(
        e.to_string().contains("_scale") && e.to_string().contains("[16, 1]"),
        "{e}"
    );
}

#[test]
fn packed_size_that_fits_no_shape_is_refused() {
    let (_d, p) = rewrite("bf16-qint4", |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.0 == "lin_g96.weight._data._data")
            .unwrap();
        // drop one packed row
        let row = t.2[1];
        t.2[0] -= 1;
        t.3.truncate(t.3.len() - row);
    });
    let e = detect_err(&p);
    assert_eq!(e.location().layer.as_deref(), Some("lin_g96"), "{e}");
    assert!(e.to_string().contains("fit no"), "{e}");
}

#[test]
fn qint4_map_over_qint8_data_is_refused() {
    let (d, p) = rewrite("bf16-qint8", |_| {});
    let q = std::fs::read_to_string(d.path().join("quanto_qmap.json")).unwrap();
    std::fs::write(
        d.path().join("quanto_qmap.json"),
        q.replace("\"qint8\"", "\"qint4\""),
    )
    .unwrap();
    let e = detect_err(&p);
    assert!(matches!(e.kind(), ckptkit::ErrorKind::Layout(_)), "{e}");
    assert!(
        e.to_string().contains("qint4") && e.to_string().contains("I8"),
        "{e}"
    );
}

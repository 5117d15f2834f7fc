//! The gguf family's records, stored shapes and detection.

use std::collections::BTreeMap;

use super::*;
use crate::format::manifest::Param;

fn q(name: &str) -> GgmlType {
    GgmlType::from_name(name).unwrap()
}

#[test]
fn records_name_one_readable_block_type() {
    assert_eq!(type_of(&record(q("Q6_K"))).unwrap(), q("Q6_K"));
    let with = |v: &str| WeightQuant::Family {
        name: NAME.into(),
        params: vec![Param {
            key: "type".into(),
            value: v.into(),
        }],
    };
    // unquantized, unreadable, unknown
    for bad in ["F16", "IQ2_XXS", "Q9_9"] {
        assert!(type_of(&with(bad)).is_err(), "{bad}");
    }
    assert!(type_of(&WeightQuant::Family {
        name: NAME.into(),
        params: vec![],
    })
    .is_err());
}

#[test]
fn stored_shape_is_rows_by_row_bytes() {
    assert_eq!(stored_shape(q("Q8_0"), &[2, 3, 64]), Some(vec![6, 68]));
    assert_eq!(stored_shape(q("Q4_K"), &[512]), Some(vec![1, 288]));
    assert_eq!(stored_shape(q("Q8_0"), &[4, 48]), None);
    assert_eq!(stored_shape(q("Q8_0"), &[]), None);
    assert_eq!(stored_shape(q("Q8_0"), &[u64::MAX, 1 << 40, 32]), None);
}

fn st(key: &str, dtype: Dtype, shape: &[u64]) -> SourceTensor {
    SourceTensor {
        key: key.into(),
        dtype,
        shape: shape.to_vec(),
        len: 0,
        file: 0,
    }
}

fn detector(entries: &[(&str, &str, &[u64])]) -> GgufDetector {
    let mut t = serde_json::Map::new();
    for (k, ty, shape) in entries {
        t.insert(
            k.to_string(),
            serde_json::json!({"type": ty, "shape": shape}),
        );
    }
    let mut md = BTreeMap::new();
    md.insert(
        crate::io::gguf_file::TENSORS_KEY.to_string(),
        serde_json::json!({"version": 1, "tensors": t}).to_string(),
    );
    GgufDetector::new(&md).unwrap()
}

#[test]
fn detects_a_recorded_tensor_and_claims_only_recorded_keys() {
    let d = detector(&[("blk.0.attn_q.weight", "Q4_0", &[4, 64])]);
    assert_eq!(d.claim("blk.0.attn_q.weight"), Some("blk.0.attn_q"));
    assert_eq!(d.claim("blk.0.attn_q.bias"), None);
    let t = st("blk.0.attn_q.weight", Dtype::U8, &[4, 36]);
    match d.detect("blk.0.attn_q", &[&t], &[]).unwrap() {
        Detected::Found {
            weight,
            record: r,
            used,
        } => {
            assert_eq!(weight.name, "weight");
            assert_eq!((weight.dtype, weight.shape), (Dtype::F32, vec![4, 64]));
            assert_eq!(r, record(q("Q4_0")));
            assert_eq!(used, vec!["blk.0.attn_q.weight".to_string()]);
        }
        _ => panic!("not detected"),
    }
}

#[test]
fn refuses_stored_bytes_that_disagree_with_the_record() {
    let d = detector(&[("m.weight", "Q4_0", &[4, 64])]);
    for t in [
        st("m.weight", Dtype::U8, &[4, 34]),
        st("m.weight", Dtype::I8, &[4, 36]),
        st("m.weight", Dtype::U8, &[144]),
    ] {
        let e = d.detect("m", &[&t], &[]).err().unwrap();
        assert!(e.to_string().contains("recorded as Q4_0"), "{e}");
        assert_eq!(e.location().tensor.as_deref(), Some("m.weight"));
    }
}

#[test]
fn refuses_unknown_entry_versions_and_types() {
    let md = |v: serde_json::Value| {
        let mut m = BTreeMap::new();
        m.insert(crate::io::gguf_file::TENSORS_KEY.to_string(), v.to_string());
        m
    };
    assert!(GgufDetector::new(&md(serde_json::json!({"version": 2, "tensors": {}}))).is_err());
    let e = GgufDetector::new(&md(
        serde_json::json!({"version": 1, "tensors": {"x": {"type": "IQ1_S", "shape": [256]}}}),
    ))
    .err()
    .unwrap();
    assert!(
        matches!(e.kind(), crate::ErrorKind::UnsupportedGgufType { .. }),
        "{e}"
    );
    assert!(GgufDetector::new(&md(
        serde_json::json!({"version": 1, "tensors": {"x": {"type": "F16", "shape": [2]}}})
    ))
    .is_err());
}

#[test]
fn the_entry_written_for_an_output_reads_back() {
    let d = detector(&[("m.weight", "Q6_K", &[2, 512])]);
    let t = st("m.weight", Dtype::U8, &[2, 420]);
    let Detected::Found { weight, record, .. } = d.detect("m", &[&t], &[]).unwrap() else {
        panic!()
    };
    let l = Layer {
        path: "m".into(),
        quant: crate::format::manifest::Quantization {
            weights: record,
            activations: None,
        },
        tensors: vec![weight],
        extensions: Vec::new(),
    };
    crate::layout::check_layer(&l).unwrap();
    let entry = tensors_entry(&[&l]).unwrap();
    let mut md = BTreeMap::new();
    md.insert(crate::io::gguf_file::TENSORS_KEY.to_string(), entry);
    let again = GgufDetector::new(&md).unwrap();
    assert_eq!(again.recorded, d.recorded);
}

//! The compressed-tensors FP8 family through the library: its config read
//! rule by rule, the records and spellings, the arithmetic's corner cases,
//! and detection. (Bit-identity with compressed-tensors itself:
//! tests/migrate_ctfp8.rs, on its files.)

use super::*;
use crate::float::{bf16_bits_from_f32, f32_from_bf16_bits};

fn config(weights: &str, format: &str) -> String {
    format!(
        r#"{{"dtype": "bfloat16", "quantization_config": {{"quant_method": "compressed-tensors",
        "format": "{format}", "config_groups": {{"group_0": {{"format": "{format}",
        "targets": ["Linear"], "weights": {weights}}}}}}}}}"#
    )
}

#[test]
fn the_config_gives_the_strategy_and_bad_ones_are_refused() {
    let w = |s: &str| {
        format!(r#"{{"num_bits": 8, "type": "float", "symmetric": true, "dynamic": false, {s}}}"#)
    };
    for (weights, strategy) in [
        (w(r#""strategy": "tensor""#), Strategy::Tensor),
        (w(r#""strategy": "channel""#), Strategy::Channel),
        (
            w(r#""strategy": "group", "group_size": 32"#),
            Strategy::Group(32),
        ),
        (
            w(r#""strategy": "block", "block_structure": [128, 64]"#),
            Strategy::Block([128, 64]),
        ),
    ] {
        for (format, dynamic) in [("naive-quantized", false), ("float-quantized", true)] {
            let c = CtFp8Config::from_text(&config(&weights, format))
                .unwrap()
                .unwrap();
            assert_eq!(
                c.format,
                Format {
                    strategy,
                    dynamic_activations: dynamic
                }
            );
            assert_eq!(c.dtype, Some(Dtype::BF16));
        }
    }
    // int weights are the int8 family's; other methods are not this family's
    let int = r#"{"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel"}"#;
    assert_eq!(
        CtFp8Config::from_text(&config(int, "int-quantized")).unwrap(),
        None
    );
    assert_eq!(
        CtFp8Config::from_text(r#"{"quantization_config": {"quant_method": "fp8"}}"#).unwrap(),
        None
    );
    for bad in [
        w(r#""strategy": "group", "group_size": 0"#),
        w(r#""strategy": "block", "block_structure": [128]"#),
        w(r#""strategy": "block", "block_structure": [128, 0]"#),
        w(r#""strategy": "token""#),
        r#"{"num_bits": 4, "type": "float", "symmetric": true, "strategy": "channel"}"#.into(),
        r#"{"num_bits": 8, "type": "float", "symmetric": false, "strategy": "channel"}"#.into(),
    ] {
        assert!(
            CtFp8Config::from_text(&config(&bad, "naive-quantized")).is_err(),
            "{bad}"
        );
    }
    let ch = w(r#""strategy": "channel""#);
    assert!(CtFp8Config::from_text(&config(&ch, "pack-quantized")).is_err());
}

#[test]
fn records_and_spellings_round_trip() {
    for s in [
        "fp8:ct:tensor",
        "fp8:ct:channel",
        "fp8:ct:group=32",
        "fp8:ct:block=128x128",
        "fp8:ct:channel:float-quantized",
    ] {
        let f = Format::parse(s).unwrap();
        assert_eq!(f.spelling(), s);
        assert_eq!(Format::of(&f.record()).unwrap(), f);
    }
    for bad in [
        "fp8:ct:group=0",
        "fp8:ct:block=128",
        "fp8:ct:row",
        "fp8:ct:group=08",
    ] {
        assert!(Format::parse(bad).is_none(), "{bad}");
    }
    assert_eq!(Strategy::Group(32).scale_shape(8, 96), vec![8, 3]);
    assert_eq!(
        Strategy::Block([128, 128]).scale_shape(130, 136),
        vec![2, 2]
    );
    assert_eq!(Strategy::Tensor.scale_shape(130, 136), vec![1]);
    assert!(!Strategy::Group(32).fits(8, 100));
}

#[test]
fn the_arithmetic_corner_cases_are_the_librarys() {
    let bf = |x: f32| f32_from_bf16_bits(bf16_bits_from_f32(x));
    // a zero block's scale is the dtype's eps
    assert_eq!(math::scale_for(Dtype::BF16, 0.0), 0.0078125);
    assert_eq!(math::scale_for(Dtype::F16, 0.0), 0.0009765625);
    assert_eq!(math::scale_for(Dtype::F32, 0.0), f32::EPSILON);
    // the scale is amax / 448 rounded to the dtype
    assert_eq!(math::scale_for(Dtype::BF16, 1.0), bf(1.0 / 448.0));
    // -0 becomes +0 (the zero point CT adds); a tiny negative stays -0
    assert_eq!(math::code(Dtype::BF16, -0.0, 1.0), 0x00);
    assert_eq!(math::code(Dtype::BF16, -1e-9, 1.0), 0x80);
    // the quotient is rounded to the dtype before the code, and clamped
    assert_eq!(math::code(Dtype::BF16, 1000.0, 1.0), 0x7E);
    assert_eq!(math::code(Dtype::BF16, -1000.0, 1.0), 0xFE);
    // dequantizing rounds the product to the scale's dtype
    let q = [0x7Eu8, 0x01];
    let s = [bf(0.3)];
    let out = math::dequantize(&q, [1, 2], [1, 2], &s, Dtype::BF16, Dtype::F32).unwrap();
    let v: Vec<f32> = out
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(v, vec![bf(448.0 * s[0]), bf(2f32.powi(-9) * s[0])]);
}

#[test]
fn fp8_codes_beside_a_weight_scale_are_read_only_with_the_config() {
    use crate::io::open::open_source;
    use crate::layout::family::Hints;
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("m.safetensors");
    let plan = vec![
        ("l.weight".to_string(), Dtype::F8E4M3, vec![4u64, 64]),
        ("l.weight_scale".to_string(), Dtype::BF16, vec![4, 2]),
    ];
    let w =
        crate::io::writer::SafetensorsWriter::create(&f, &plan, &Default::default(), false, false)
            .unwrap();
    w.write_tensor("l.weight", &[0x38; 256]).unwrap();
    w.write_tensor("l.weight_scale", &[0x80, 0x3f].repeat(8))
        .unwrap();
    w.finish().unwrap();
    let src = open_source(&f).unwrap();
    let detect = |c: Option<Strategy>| {
        let hints = match c {
            Some(strategy) => Hints::default().with_side(
                NAME,
                CtFp8Config {
                    format: Format {
                        strategy,
                        dynamic_activations: false,
                    },
                    dtype: None,
                },
            ),
            None => Hints::default(),
        };
        crate::migrate::detect_layers(src.as_ref(), &hints)
    };
    // no config: not read (a suspect layer, refused when converted)
    assert_eq!(detect(None).unwrap()[0].quant.weights, WeightQuant::Plain);
    // group 32: read, the model dtype is the scale's
    let l = detect(Some(Strategy::Group(32))).unwrap();
    let w = crate::layout::family::quantized_weight(&l[0]).unwrap();
    assert_eq!((w.dtype, &w.shape[..]), (Dtype::BF16, &[4u64, 64][..]));
    // another strategy's shape: refused naming the layer
    for s in [Strategy::Channel, Strategy::Group(16), Strategy::Tensor] {
        let e = detect(Some(s)).unwrap_err();
        assert_eq!(e.location().layer.as_deref(), Some("l"), "{s:?}");
        assert!(e.to_string().contains("do not cover"), "{e}");
    }
}

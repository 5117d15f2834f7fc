//! The ComfyUI family through the library: detection rule by rule, the two
//! metadata transports, quantize and dequantize against the arithmetic
//! re-stated here, and the stale-metadata rule. (Bit-identity with
//! comfy-kitchen itself: tests/migrate_comfy.rs, on its files.)

use std::collections::BTreeMap;
use std::path::Path;

use super::*;
use crate::error::ErrorKind;
use crate::float::{bf16_bits_from_f32, f32_from_bf16_bits, round_bf16};
use crate::io::open::open_source;
use crate::io::writer::SafetensorsWriter;
use crate::layout::family::Hints;
use crate::migrate::plan::Target;
use crate::migrate::{convert, detect_layers, ConvertOptions};

type Tensors = Vec<(String, Dtype, Vec<u64>, Vec<u8>)>;

fn write(path: &Path, tensors: &Tensors, md: &BTreeMap<String, String>) {
    let plan: Vec<_> = tensors
        .iter()
        .map(|(k, d, s, _)| (k.clone(), *d, s.clone()))
        .collect();
    let w = SafetensorsWriter::create(path, &plan, md, false, false).unwrap();
    for (k, _, _, b) in tensors {
        w.write_tensor(k, b).unwrap();
    }
    w.finish().unwrap();
}

fn bf16(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| bf16_bits_from_f32(x).to_le_bytes())
        .collect()
}

fn weights(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 23.0)
        .collect()
}

/// A ComfyUI file: `lin` quantized (e4m3fn, scale 0.01), `norm` plain.
fn comfy_file(marker: Option<&str>) -> Tensors {
    let codes: Vec<u8> = (0..8 * 16).map(|i| (i * 7 % 0x7E) as u8).collect();
    let mut t: Tensors = vec![
        ("lin.weight".into(), Dtype::F8E4M3, vec![8, 16], codes),
        (
            "lin.weight_scale".into(),
            Dtype::F32,
            vec![],
            0.01f32.to_le_bytes().to_vec(),
        ),
        ("lin.bias".into(), Dtype::BF16, vec![8], bf16(&weights(8))),
        (
            "norm.weight".into(),
            Dtype::BF16,
            vec![16],
            bf16(&weights(16)),
        ),
    ];
    if let Some(m) = marker {
        t.push((
            "lin.comfy_quant".into(),
            Dtype::U8,
            vec![m.len() as u64],
            m.as_bytes().to_vec(),
        ));
    }
    t
}

fn metadata(layers: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(
        METADATA_KEY.to_string(),
        format!("{{\"format_version\": \"1.0\", \"layers\": {layers}}}"),
    )])
}

fn layers_of(path: &Path) -> crate::Result<Vec<crate::format::manifest::Layer>> {
    let src = open_source(path)?;
    detect_layers(src.as_ref(), &Hints::default())
}

fn to(t: &str) -> ConvertOptions {
    ConvertOptions::default().target(Target::parse(t).unwrap())
}

#[test]
fn a_marker_tensor_or_the_metadata_makes_a_comfy_layer() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("m.safetensors");
    let e4 = Format {
        kind: Kind::Fp8(Fp8Kind::E4M3Fn),
        full_precision: false,
        legacy: false,
        convrot: None,
        input_scale: false,
    };
    for (marker, md) in [
        (Some(r#"{"format": "float8_e4m3fn"}"#), BTreeMap::new()),
        (None, metadata(r#"{"lin": {"format": "float8_e4m3fn"}}"#)),
        (
            Some(r#"{"format": "float8_e4m3fn"}"#),
            metadata(r#"{"lin": {"format": "float8_e4m3fn"}}"#),
        ),
        // fields inside "params", as ComfyUI's loader accepts
        (
            Some(r#"{"params": {"format": "float8_e4m3fn"}}"#),
            BTreeMap::new(),
        ),
    ] {
        std::fs::remove_file(&f).ok();
        write(&f, &comfy_file(marker), &md);
        let layers = layers_of(&f).unwrap();
        let lin = layers.iter().find(|l| l.path == "lin").unwrap();
        assert_eq!(lin.quant.weights, e4.record(), "{marker:?} {md:?}");
        let w = quantized_weight(lin).unwrap();
        // the model dtype is the bias's
        assert_eq!((w.dtype, &w.shape[..]), (Dtype::BF16, &[8u64, 16][..]));
        let norm = layers.iter().find(|l| l.path == "norm").unwrap();
        assert_eq!(norm.quant.weights, WeightQuant::Plain);
    }
}

use crate::layout::family::quantized_weight;

#[test]
fn contradictions_and_unknown_formats_are_refused_naming_the_layer() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("m.safetensors");
    let refused = |marker: Option<&str>, md: BTreeMap<String, String>| {
        std::fs::remove_file(&f).ok();
        write(&f, &comfy_file(marker), &md);
        layers_of(&f).unwrap_err()
    };
    // the two transports disagree
    let e = refused(
        Some(r#"{"format": "float8_e4m3fn"}"#),
        metadata(r#"{"lin": {"format": "float8_e5m2"}}"#),
    );
    assert_eq!(e.location().layer.as_deref(), Some("lin"), "{e}");
    assert!(e.to_string().contains("float8_e5m2"), "{e}");
    // a format ComfyUI knows and ckptkit does not read yet
    let e = refused(Some(r#"{"format": "convrot_w4a4"}"#), BTreeMap::new());
    assert!(matches!(e.kind(), ErrorKind::UnknownQuantized(_)), "{e}");
    assert!(e.to_string().contains("convrot_w4a4"), "{e}");
    // not JSON; no format
    for m in ["{\"format\": ", r#"{"fmt": "float8_e4m3fn"}"#] {
        let e = refused(Some(m), BTreeMap::new());
        assert_eq!(e.location().layer.as_deref(), Some("lin"), "{e}");
    }
    // the codes' dtype must be the format's
    let e = refused(Some(r#"{"format": "float8_e5m2"}"#), BTreeMap::new());
    assert!(e.to_string().contains("F8_E5M2"), "{e}");
    // the metadata names a layer the file lacks
    let e = refused(
        Some(r#"{"format": "float8_e4m3fn"}"#),
        metadata(r#"{"lin": {"format": "float8_e4m3fn"}, "gone": {"format": "float8_e4m3fn"}}"#),
    );
    assert_eq!(e.location().layer.as_deref(), Some("gone"), "{e}");
    // metadata that is not JSON
    let e = refused(
        None,
        BTreeMap::from([(METADATA_KEY.to_string(), "{".to_string())]),
    );
    assert!(matches!(e.kind(), ErrorKind::Malformed(_)), "{e}");
}

#[test]
fn fp8_codes_beside_a_scale_without_a_format_are_refused_not_cast() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("m.safetensors");
    write(&f, &comfy_file(None), &BTreeMap::new());
    // "plain" changes nothing here (an F8 tensor is a plain tensor's
    // dtype); a cast would change the codes without their scale
    let e = convert(&f, &d.path().join("p.safetensors"), &to("plain:bf16")).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::UnknownQuantized(_)), "{e}");
    // beside a legacy `scaled_fp8` marker, the `weight_scale` spelling is
    // the legacy layer's scale: read and applied, not refused
    let mut t = comfy_file(None);
    t.push(("scaled_fp8".into(), Dtype::F8E4M3, vec![0], Vec::new()));
    std::fs::remove_file(&f).unwrap();
    write(&f, &t, &BTreeMap::new());
    let layers = layers_of(&f).unwrap();
    let lin = layers.iter().find(|l| l.path == "lin").unwrap();
    assert!(Format::of(&lin.quant.weights).unwrap().legacy);
    let plain = d.path().join("legacy-plain.safetensors");
    convert(&f, &plain, &to("plain")).unwrap();
    let w = open_source(&plain)
        .unwrap()
        .read("lin.weight")
        .unwrap()
        .to_vec();
    let s = round_bf16(0.01);
    for (c, x) in t[0].3.iter().zip(w.chunks_exact(2)) {
        let x = f32_from_bf16_bits(u16::from_le_bytes([x[0], x[1]]));
        assert_eq!(x, round_bf16(Fp8Kind::E4M3Fn.decode(*c) * s));
    }
}

#[test]
fn dequantize_and_quantize_follow_comfy_kitchens_arithmetic() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("m.safetensors");
    write(
        &f,
        &comfy_file(Some(r#"{"format": "float8_e4m3fn"}"#)),
        &BTreeMap::new(),
    );
    let plain = d.path().join("plain.safetensors");
    convert(&f, &plain, &to("plain")).unwrap();
    let p = open_source(&plain).unwrap();
    let keys: Vec<&str> = p.tensors().iter().map(|t| t.key.as_str()).collect();
    assert!(!keys
        .iter()
        .any(|k| k.contains("comfy_quant") || k.contains("scale")));
    let w: Vec<f32> = p
        .read("lin.weight")
        .unwrap()
        .chunks_exact(2)
        .map(|c| f32_from_bf16_bits(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    let s = round_bf16(0.01);
    let codes = &comfy_file(None)[0].3;
    for (c, x) in codes.iter().zip(&w) {
        assert_eq!(*x, round_bf16(Fp8Kind::E4M3Fn.decode(*c) * s));
    }
    // quantize the plain file again: codes, scale and marker as stated
    for (fmt, kind) in [
        ("float8_e4m3fn", Fp8Kind::E4M3Fn),
        ("float8_e5m2", Fp8Kind::E5M2),
    ] {
        let q = d.path().join(format!("{fmt}.safetensors"));
        convert(&plain, &q, &to(&format!("comfy:{fmt}"))).unwrap();
        let src = open_source(&q).unwrap();
        let marker = src.read("lin.comfy_quant").unwrap().to_vec();
        assert_eq!(marker, format!("{{\"format\": \"{fmt}\"}}").as_bytes());
        let scale = f32::from_le_bytes(
            src.read("lin.weight_scale").unwrap()[..4]
                .try_into()
                .unwrap(),
        );
        let amax = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert_eq!(scale, round_bf16(amax / kind.max()));
        let inv = round_bf16(1.0 / scale);
        let codes = src.read("lin.weight").unwrap().to_vec();
        for (c, x) in codes.iter().zip(&w) {
            let t = round_bf16(x * inv).clamp(-kind.max(), kind.max());
            assert_eq!(*c, kind.encode(t), "{fmt} {x}");
        }
        // 1-D tensors stay plain; the layer reads back as written
        assert_eq!(src.get("norm.weight").map(|t| t.dtype), Some(Dtype::BF16));
        let layers = layers_of(&q).unwrap();
        assert!(layers.iter().any(|l| l.path == "lin"
            && l.quant.weights
                == Format {
                    kind: Kind::Fp8(kind),
                    full_precision: false,
                    legacy: false,
                    convrot: None,
                    input_scale: false,
                }
                .record()));
    }
}

#[test]
fn the_file_level_record_is_kept_true_or_removed() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("m.safetensors");
    write(
        &f,
        &comfy_file(None),
        &metadata(r#"{"lin": {"format": "float8_e4m3fn"}}"#),
    );
    // dequantized: a stale record would make ComfyUI cast the plain weight
    let plain = d.path().join("plain.safetensors");
    convert(&f, &plain, &to("plain")).unwrap();
    assert!(!open_source(&plain)
        .unwrap()
        .metadata()
        .contains_key(METADATA_KEY));
    // kept without a marker: the record is what says its format
    let ck = d.path().join("m.ckpk");
    convert(&f, &ck, &ConvertOptions::default()).unwrap();
    let back = d.path().join("back.safetensors");
    convert(&ck, &back, &ConvertOptions::default()).unwrap();
    let md = open_source(&back).unwrap().metadata().clone();
    let v: serde_json::Value = serde_json::from_str(&md[METADATA_KEY]).unwrap();
    assert_eq!(v["layers"]["lin"]["format"], "float8_e4m3fn");
    assert_eq!(layers_of(&back).unwrap(), layers_of(&f).unwrap());
    // re-quantized with a marker: the record is dropped
    let q = d.path().join("q.safetensors");
    convert(&plain, &q, &to("comfy:float8_e5m2")).unwrap();
    assert!(!open_source(&q)
        .unwrap()
        .metadata()
        .contains_key(METADATA_KEY));
}

/// An int8 ComfyUI file: `lin` I8 with a scale of `scale_shape`.
fn int8_file(scale_shape: Vec<u64>, marker: &str) -> Tensors {
    let n: u64 = scale_shape.iter().product();
    let codes: Vec<u8> = (0..8 * 16).map(|i| (i * 37 % 256) as u8).collect();
    vec![
        ("lin.weight".into(), Dtype::I8, vec![8, 16], codes),
        (
            "lin.weight_scale".into(),
            Dtype::F32,
            scale_shape,
            (0..n)
                .flat_map(|i| (0.01 + i as f32 * 0.001).to_le_bytes())
                .collect(),
        ),
        ("lin.bias".into(), Dtype::F16, vec![8], vec![0; 16]),
        (
            "lin.comfy_quant".into(),
            Dtype::U8,
            vec![marker.len() as u64],
            marker.as_bytes().to_vec(),
        ),
    ]
}

#[test]
fn int8_tensorwise_reads_its_scale_shape_and_refuses_bad_convrot() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("m.safetensors");
    let int8 = r#"{"format": "int8_tensorwise"}"#;
    for (shape, per_row) in [(vec![], false), (vec![1], false), (vec![8, 1], true)] {
        std::fs::remove_file(&f).ok();
        write(&f, &int8_file(shape.clone(), int8), &BTreeMap::new());
        let layers = layers_of(&f).unwrap();
        let lin = layers.iter().find(|l| l.path == "lin").unwrap();
        let want = Format {
            kind: Kind::Int8 { per_row },
            full_precision: false,
            legacy: false,
            convrot: None,
            input_scale: false,
        };
        assert_eq!(lin.quant.weights, want.record(), "{shape:?}");
        assert_eq!(quantized_weight(lin).unwrap().dtype, Dtype::F16);
        // dequantized: f32(q) * s, rounded to the model dtype
        let plain = d.path().join("p.safetensors");
        std::fs::remove_file(&plain).ok();
        convert(&f, &plain, &to("plain:f32")).unwrap();
        let w = open_source(&plain)
            .unwrap()
            .read("lin.weight")
            .unwrap()
            .to_vec();
        let t = int8_file(shape.clone(), int8);
        for (k, c) in t[0].3.iter().enumerate() {
            let s = if per_row {
                0.01 + (k / 16) as f32 * 0.001
            } else {
                0.01
            };
            let got = f32::from_le_bytes(w[k * 4..k * 4 + 4].try_into().unwrap());
            assert_eq!(got, *c as i8 as f32 * s, "{shape:?} {k}");
        }
    }
    for (shape, marker) in [
        (vec![8], int8),
        (vec![1, 8], int8),
        // ConvRot needs a power of 4 dividing the row, and a scale per row
        (
            vec![8, 1],
            r#"{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 32}"#,
        ),
        (
            vec![8, 1],
            r#"{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 64}"#,
        ),
        (
            vec![],
            r#"{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 16}"#,
        ),
        // a power of 4 too large to build its sign table from a file's say-so
        (
            vec![8, 1],
            r#"{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 16384}"#,
        ),
    ] {
        std::fs::remove_file(&f).ok();
        write(&f, &int8_file(shape.clone(), marker), &BTreeMap::new());
        let e = layers_of(&f).unwrap_err();
        assert_eq!(e.location().layer.as_deref(), Some("lin"), "{shape:?}: {e}");
    }
}

#[test]
fn the_family_preset_spellings_name_the_same_layouts() {
    use crate::layout::family::Family;
    let parse = |s: &str| family::Comfy.parse_target(s).unwrap().unwrap();
    for (alias, name) in [
        ("fp8:comfy", "comfy:float8_e4m3fn"),
        ("fp8:comfy:e5m2", "comfy:float8_e5m2"),
        ("int8:comfy", "comfy:int8_tensorwise:per_row"),
        ("int8:comfy:tensor", "comfy:int8_tensorwise"),
    ] {
        assert_eq!(parse(alias), parse(name), "{alias}");
    }
    // the int8 family's own spellings stay its own
    assert!(family::Comfy.parse_target("int8:ct").is_none());
    assert!(matches!(
        crate::layout::registry::parse_target("int8:comfy"),
        Some(Ok((f, _))) if f.name() == NAME
    ));
}

#[test]
fn convrot_layers_dequantize_as_comfy_kitchens_f32_product() {
    // H_16 from its definition: the Kronecker square of H_4 over 4
    let h4 = [[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]];
    let h = |j: usize, i: usize| (h4[j / 4][i / 4] * h4[j % 4][i % 4]) as f32 / 4.0;
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("m.safetensors");
    let marker = r#"{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 16}"#;
    let t = int8_file(vec![8, 1], marker);
    write(&f, &t, &BTreeMap::new());
    let layers = layers_of(&f).unwrap();
    let lin = layers.iter().find(|l| l.path == "lin").unwrap();
    assert_eq!(Format::of(&lin.quant.weights).unwrap().convrot, Some(16));
    let plain = d.path().join("p.safetensors");
    convert(&f, &plain, &to("plain:f32")).unwrap();
    let w = open_source(&plain)
        .unwrap()
        .read("lin.weight")
        .unwrap()
        .to_vec();
    let q = &t[0].3;
    // the statement: x = f32(q) * s, then each output summed in f32 in
    // ascending order of its inputs
    for r in 0..8 {
        let s = 0.01f32 + r as f32 * 0.001;
        for j in 0..16 {
            let mut y = 0f32;
            for i in 0..16 {
                y += ((q[r * 16 + i] as i8) as f32 * s) * h(j, i);
            }
            let k = r * 16 + j;
            let got = f32::from_le_bytes(w[k * 4..k * 4 + 4].try_into().unwrap());
            assert_eq!(got.to_bits(), y.to_bits(), "row {r} column {j}");
        }
    }
    // groups of 256 sum per block of 128, then the two block sums
    let codes: Vec<u8> = (0..256)
        .map(|i: i32| ((i * 37 % 255) - 127) as i8 as u8)
        .collect();
    let got = math::convrot_dequantize(&codes, 256, &[0.0123], 256, Dtype::F32).unwrap();
    let signs = |j: usize, i: usize| {
        let (mut a, mut b, mut neg) = (j, i, false);
        while a > 0 || b > 0 {
            neg ^= h4[a % 4][b % 4] < 0;
            a /= 4;
            b /= 4;
        }
        if neg {
            -1.0f32 / 16.0
        } else {
            1.0 / 16.0
        }
    };
    for j in 0..256 {
        let x = |i: usize| (codes[i] as i8) as f32 * 0.0123f32 * signs(j, i);
        let (mut a, mut b) = (0f32, 0f32);
        for i in 0..128 {
            a += x(i);
            b += x(i + 128);
        }
        let g = f32::from_le_bytes(got[j * 4..j * 4 + 4].try_into().unwrap());
        assert_eq!(g.to_bits(), (a + b).to_bits(), "output {j}");
    }
    // ConvRot is read, never written
    let back = ConvertOptions::default().target(crate::migrate::plan::Target::layout(
        lin.quant.weights.clone(),
    ));
    let e = convert(&plain, &d.path().join("back.safetensors"), &back).unwrap_err();
    assert!(e.to_string().contains("does not write them"), "{e}");
}

#[test]
fn mxfp8_layers_unswizzle_their_scales_and_crop_to_the_logical_shape() {
    // (quantizing is byte-identical to comfy-kitchen: tests/migrate_comfy.rs)
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("m.safetensors");
    // logical [40, 64]: stored [64, 64], scales [64, 2] swizzled into [128, 4]
    let (r32, c32, gc, cp) = (64usize, 64usize, 2usize, 4usize);
    let codes: Vec<u8> = (0..r32 * c32).map(|i| (i * 29 % 0x7E) as u8).collect();
    let grid = |r: usize, c: usize| -> u8 {
        if r == 3 && c == 1 {
            0 // comfy-kitchen's zero block: scale 0.0
        } else {
            (120 + (r * 3 + c) % 9) as u8
        }
    };
    let mut sw = vec![0u8; 128 * cp];
    for r in 0..r32 {
        for c in 0..gc {
            let i =
                ((r / 128) * (cp / 4) + c / 4) * 512 + (r % 32) * 16 + ((r % 128) / 32) * 4 + c % 4;
            sw[i] = grid(r, c);
        }
    }
    let marker = r#"{"format": "mxfp8"}"#;
    let t: Tensors = vec![
        (
            "lin.weight".into(),
            Dtype::F8E4M3,
            vec![64, 64],
            codes.clone(),
        ),
        (
            "lin.weight_scale".into(),
            Dtype::U8,
            vec![128, 4],
            sw.clone(),
        ),
        (
            "lin.comfy_quant".into(),
            Dtype::U8,
            vec![marker.len() as u64],
            marker.as_bytes().to_vec(),
        ),
        ("lin.bias".into(), Dtype::F32, vec![40], vec![0; 160]),
    ];
    write(&f, &t, &BTreeMap::new());
    // the model's logical shapes
    let shapes = d.path().join("shapes.safetensors");
    write(
        &shapes,
        &vec![
            (
                "lin.weight".into(),
                Dtype::F32,
                vec![40, 64],
                vec![0; 40 * 64 * 4],
            ),
            ("lin.bias".into(), Dtype::F32, vec![40], vec![0; 160]),
        ],
        &BTreeMap::new(),
    );
    let plain = d.path().join("p.safetensors");
    convert(&f, &plain, &to("plain").shapes_from(shapes.clone())).unwrap();
    let src = open_source(&plain).unwrap();
    let w = src.read("lin.weight").unwrap().to_vec();
    assert_eq!(w.len(), 40 * 64 * 4, "cropped to [40, 64]");
    for r in 0..40 {
        for c in 0..64 {
            let sf = math::comfy_e8m0(grid(r, c / 32));
            let want = Fp8Kind::E4M3Fn.decode(codes[r * 64 + c]) * sf;
            let k = (r * 64 + c) * 4;
            let got = f32::from_le_bytes(w[k..k + 4].try_into().unwrap());
            assert_eq!(got.to_bits(), want.to_bits(), "[{r}, {c}]");
        }
    }
    assert_eq!(math::comfy_e8m0(0), 0.0);
    assert_eq!(math::comfy_e8m0(127), 1.0);
    // without the shapes, the stored (padded) shape
    let layers = layers_of(&f).unwrap();
    let lin = layers.iter().find(|l| l.path == "lin").unwrap();
    assert_eq!(quantized_weight(lin).unwrap().shape, vec![64, 64]);
    // a scale byte 255 (infinity) is refused, naming the layer; ckptkit
    // does not write mxfp8
    let mut bad = t.clone();
    bad[1].3[0] = 255;
    std::fs::remove_file(&f).ok();
    write(&f, &bad, &BTreeMap::new());
    let e = convert(&f, &d.path().join("x.safetensors"), &to("plain")).unwrap_err();
    assert_eq!(e.location().layer.as_deref(), Some("lin"), "{e}");
    assert!(e.to_string().contains("255"), "{e}");
    // a non-zero block too small for an E8M0 scale is refused, naming it
    let tiny = d.path().join("tiny.safetensors");
    let mut v = vec![0u8; 32 * 32 * 4];
    v[4..8].copy_from_slice(&1e-37f32.to_le_bytes());
    write(
        &tiny,
        &vec![("lin.weight".into(), Dtype::F32, vec![32, 32], v)],
        &BTreeMap::new(),
    );
    let e = convert(&tiny, &d.path().join("y.safetensors"), &to("comfy:mxfp8")).unwrap_err();
    assert_eq!(e.location().layer.as_deref(), Some("lin"), "{e}");
    assert!(e.to_string().contains("block (0, 0)"), "{e}");
}

#[test]
fn nvfp4_layers_unpack_nibbles_high_first_unswizzle_and_crop() {
    // (quantizing is byte-identical to comfy-kitchen: tests/migrate_comfy.rs)
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("m.safetensors");
    // logical [20, 40]: stored codes [32, 24] (C16 = 48, two codes a byte),
    // scales [32, 3] swizzled into [128, 4], g one F32
    let (r16, half, gc, cp) = (32usize, 24usize, 3usize, 4usize);
    let codes: Vec<u8> = (0..r16 * half).map(|i| (i * 37 % 256) as u8).collect();
    let grid = |r: usize, c: usize| -> u8 { (0x30 + (r * 5 + c * 3) % 40) as u8 };
    let mut sw = vec![0u8; 128 * cp];
    for r in 0..r16 {
        for c in 0..gc {
            sw[math::swizzle_at(r, c, cp)] = grid(r, c);
        }
    }
    let g = 0.013_f32;
    let marker = r#"{"format": "nvfp4"}"#;
    let t: Tensors = vec![
        ("lin.weight".into(), Dtype::U8, vec![32, 24], codes.clone()),
        (
            "lin.weight_scale".into(),
            Dtype::F8E4M3,
            vec![128, 4],
            sw.clone(),
        ),
        (
            "lin.weight_scale_2".into(),
            Dtype::F32,
            vec![],
            g.to_le_bytes().to_vec(),
        ),
        (
            "lin.comfy_quant".into(),
            Dtype::U8,
            vec![marker.len() as u64],
            marker.as_bytes().to_vec(),
        ),
        ("lin.bias".into(), Dtype::F32, vec![20], vec![0; 80]),
    ];
    write(&f, &t, &BTreeMap::new());
    let shapes = d.path().join("shapes.safetensors");
    write(
        &shapes,
        &vec![(
            "lin.weight".into(),
            Dtype::F32,
            vec![20, 40],
            vec![0; 20 * 40 * 4],
        )],
        &BTreeMap::new(),
    );
    let plain = d.path().join("p.safetensors");
    convert(&f, &plain, &to("plain").shapes_from(shapes.clone())).unwrap();
    let w = open_source(&plain)
        .unwrap()
        .read("lin.weight")
        .unwrap()
        .to_vec();
    assert_eq!(w.len(), 20 * 40 * 4, "cropped to [20, 40]");
    let e2m1 = [0.0f32, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    for r in 0..20 {
        for c in 0..40 {
            let byte = codes[r * half + c / 2];
            let code = if c % 2 == 0 { byte >> 4 } else { byte & 15 };
            let v = e2m1[usize::from(code & 7)] * if code & 8 != 0 { -1.0 } else { 1.0 };
            let want = v * (g * Fp8Kind::E4M3Fn.decode(grid(r, c / 16)));
            let k = (r * 40 + c) * 4;
            let got = f32::from_le_bytes(w[k..k + 4].try_into().unwrap());
            assert_eq!(got.to_bits(), want.to_bits(), "[{r}, {c}]");
        }
    }
    // without the shapes, the stored (padded) shape, two codes a byte
    let layers = layers_of(&f).unwrap();
    let lin = layers.iter().find(|l| l.path == "lin").unwrap();
    assert_eq!(quantized_weight(lin).unwrap().shape, vec![32, 48]);
    // kept: the same bytes
    let kept = d.path().join("k.safetensors");
    convert(&f, &kept, &to("keep")).unwrap();
    let k = open_source(&kept).unwrap();
    assert_eq!(k.read("lin.weight").unwrap().to_vec(), codes);
    assert_eq!(k.read("lin.weight_scale").unwrap().to_vec(), sw);
    // damaged: a NaN scale byte, no weight_scale_2, a weight_scale_2 of two
    // values, codes of the wrong shape; each refused naming the layer
    let damaged: Vec<(Tensors, &str)> = vec![
        (
            {
                let mut b = t.clone();
                b[1].3[0] = 0x7F;
                b
            },
            "NaN",
        ),
        (
            t.iter()
                .filter(|x| x.0 != "lin.weight_scale_2")
                .cloned()
                .collect(),
            "weight_scale_2",
        ),
        (
            {
                let mut b = t.clone();
                b[2].2 = vec![2];
                b[2].3 = vec![0; 8];
                b
            },
            "weight_scale_2",
        ),
        (
            {
                let mut b = t.clone();
                b[0].2 = vec![24, 32];
                b
            },
            "U8 [R16, C16 / 2]",
        ),
    ];
    for (bad, says) in damaged {
        std::fs::remove_file(&f).ok();
        write(&f, &bad, &BTreeMap::new());
        let e = convert(&f, &d.path().join("x.safetensors"), &to("plain")).unwrap_err();
        assert_eq!(e.location().layer.as_deref(), Some("lin"), "{e}");
        assert!(e.to_string().contains(says), "{says}: {e}");
    }
}

#[test]
fn legacy_scale_inputs_other_than_one_are_kept_as_input_scale() {
    // ComfyUI's convert_old_quants renames `scale_input` to `input_scale`
    // and drops it when it is 1.0
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("m.safetensors");
    let mut t = comfy_file(None);
    t[1].0 = "lin.scale_weight".into();
    let mut other = t[0].clone();
    other.0 = "lin2.weight".into();
    let mut other_scale = t[1].clone();
    other_scale.0 = "lin2.scale_weight".into();
    t.push(other);
    t.push(other_scale);
    let one = |k: &str, v: f32| (k.to_string(), Dtype::F32, vec![], v.to_le_bytes().to_vec());
    t.push(one("lin.scale_input", 0.5));
    t.push(one("lin2.scale_input", 1.0));
    t.push(("scaled_fp8".into(), Dtype::F8E4M3, vec![0], Vec::new()));
    write(&f, &t, &BTreeMap::new());
    let layers = layers_of(&f).unwrap();
    let fmt = |p: &str| Format::of(&layers.iter().find(|l| l.path == p).unwrap().quant.weights);
    assert!(fmt("lin").unwrap().input_scale);
    assert!(!fmt("lin2").unwrap().input_scale);
    let cur = d.path().join("cur.safetensors");
    convert(&f, &cur, &to("comfy:float8_e4m3fn")).unwrap();
    let src = open_source(&cur).unwrap();
    let keys: Vec<&str> = src.tensors().iter().map(|t| t.key.as_str()).collect();
    assert_eq!(
        src.read("lin.input_scale").unwrap().to_vec(),
        0.5f32.to_le_bytes()
    );
    assert!(
        !keys
            .iter()
            .any(|k| k.contains("scale_input") || *k == "lin2.input_scale"),
        "{keys:?}"
    );
    // a plain model has no activation scales
    let plain = d.path().join("plain.safetensors");
    convert(&f, &plain, &to("plain")).unwrap();
    let src = open_source(&plain).unwrap();
    assert!(!src.tensors().iter().any(|t| t.key.contains("scale")));
}

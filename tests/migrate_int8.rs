//! int8 layouts: re-layout round trips on the real quanto fixtures, and
//! quantize / dequantize properties for every layout pair on generated
//! weights (in memory, through the planner and executor).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ckptkit::fuzzing::internals::detect::{detect_layers, Hints};
use ckptkit::fuzzing::internals::quanto;
use ckptkit::migrate::{convert, ConvertOptions};
use ckptkit::migrate::{execute, plan, PlanOptions, Target};
use ckptkit::{Dtype, Error, SafetensorsFile, SourceTensor, TensorBytes, TensorSource};
use proptest::prelude::*;

fn fx(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/quanto")
        .join(case)
}

fn opts(t: &str, lossy: bool) -> ConvertOptions {
    ConvertOptions::default()
        .target(Target::parse(t).unwrap())
        .select(
            PlanOptions::default()
                .allow_lossy(lossy)
                .exclude(vec!["lin_excluded".into()]),
        )
}

fn tensors(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let f = SafetensorsFile::open(p).unwrap();
    f.tensors()
        .iter()
        .map(|t| (t.key.clone(), f.read(&t.key).unwrap().into_vec()))
        .collect()
}

/// quanto qint8 → LAYOUT → quanto qint8 gives quanto's own bytes back
/// whenever the plan runs without --allow-lossy; when it refuses, it says
/// why and --allow-lossy reports the error.
#[test]
fn quanto_qint8_relayout_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let mut exact = BTreeMap::new();
    for case in ["bf16-qint8", "f16-qint8", "f32-qint8"] {
        let src = fx(case).join("quantized.safetensors");
        let orig = tensors(&src);
        for layout in ["int8", "int8:ct", "int8:ct:int-quantized", "int8:bnb"] {
            let d = tmp.path().join(format!("{case}-{layout}"));
            std::fs::create_dir(&d).unwrap();
            let mid = d.join("mid.safetensors");
            let r = convert(&src, &mid, &opts(layout, false));
            let lossy = match r {
                Ok(s) => {
                    assert!(s.losses.is_empty());
                    false
                }
                Err(e) => {
                    assert!(
                        e.to_string().contains("--allow-lossy"),
                        "{case} {layout}: {e}"
                    );
                    // a typed refusal, with the numbers --allow-lossy reports
                    let ckptkit::ErrorKind::LossyRelayout {
                        clamped,
                        max_abs_error,
                        ..
                    } = *e.kind()
                    else {
                        panic!("{case} {layout}: not a lossy-relayout refusal: {e:?}");
                    };
                    let layer = e.location().layer.clone().expect("the layer is named");
                    let s = convert(&src, &mid, &opts(layout, true)).unwrap();
                    // the refused layer's numbers are those the accepted run reports
                    let l = s.losses.iter().find(|l| l.layer == layer).unwrap();
                    assert_eq!((l.clamped, l.max_abs_error), (clamped, max_abs_error));
                    true
                }
            };
            let back_dir = d.join("back");
            std::fs::create_dir(&back_dir).unwrap();
            let back = back_dir.join("model.safetensors");
            convert(&mid, &back, &opts("quanto:qint8", false)).unwrap();
            let got = tensors(&back);
            if !lossy {
                for (k, v) in &orig {
                    if k.ends_with("input_scale") || k.ends_with("output_scale") {
                        continue;
                    }
                    assert_eq!(got.get(k), Some(v), "{case} via {layout}: {k}");
                }
            }
            exact.insert(format!("{case} via {layout}"), !lossy);
        }
    }
    // ckptkit's own int8 and compressed-tensors are always byte-reversible
    // for quanto qint8 (same payload, same scale bits)
    for (k, v) in &exact {
        if !k.contains("bnb") {
            assert!(v, "{k} was lossy");
        }
    }
}

/// An in-memory tensor source.
struct Mem {
    tensors: Vec<SourceTensor>,
    bytes: BTreeMap<String, Vec<u8>>,
    md: BTreeMap<String, String>,
}

impl Mem {
    fn new(items: Vec<(String, Dtype, Vec<u64>, Vec<u8>)>) -> Self {
        let tensors = items
            .iter()
            .map(|(k, d, s, b)| SourceTensor {
                key: k.clone(),
                dtype: *d,
                shape: s.clone(),
                len: b.len() as u64,
                file: 0,
            })
            .collect();
        Mem {
            tensors,
            bytes: items.into_iter().map(|(k, _, _, b)| (k, b)).collect(),
            md: BTreeMap::new(),
        }
    }
}

impl TensorSource for Mem {
    fn describe(&self) -> String {
        "memory".into()
    }
    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }
    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.md
    }
    fn files(&self) -> Vec<String> {
        vec!["mem".into()]
    }
    fn read(&self, key: &str) -> Result<TensorBytes, Error> {
        Ok(TensorBytes::Owned(
            self.bytes.get(key).cloned().unwrap_or_default(),
        ))
    }
}

fn migrate(src: &Mem, target: &Target, lossy: bool) -> Result<Mem, Error> {
    let layers = detect_layers(src, &Hints::default())?;
    let p = plan(&layers, target, &PlanOptions::default().allow_lossy(lossy))?;
    let mut items = Vec::new();
    for lp in &p.layers {
        let (out, _) = execute(src, lp)?;
        for (k, b) in out {
            let part = lp.output.parts().find(|q| q.key == k).unwrap();
            items.push((k, part.dtype, part.shape.clone(), b.bytes(src)?.into_vec()));
        }
    }
    Ok(Mem::new(items))
}

fn floats(m: &Mem, key: &str, d: Dtype) -> Vec<f32> {
    let f = quanto::float_of(d).unwrap();
    f.decode(&m.bytes[key]).unwrap()
}

const TARGETS: [&str; 11] = [
    "quanto:qint8",
    "quanto:qint4",
    "quanto:qint2",
    "quanto:qfloat8_e4m3fn",
    "quanto:qfloat8_e5m2",
    "quanto:qfloat8_e4m3fnuz",
    "int8",
    "int8:bnb",
    "int8:ct",
    "int8:ct:group=32",
    "int8:ct:int-quantized",
];

/// The largest error of one element after quantize → dequantize: half a
/// quantization step of its group plus the rounding of the float dtype
/// (and, for fp8, half an fp8 ulp at the value).
fn bound(target: &str, amax: f32, range: f32, x: f32, d: Dtype) -> f32 {
    let eps = match d {
        Dtype::BF16 => 1.0 / 128.0,
        Dtype::F16 => 1.0 / 1024.0,
        _ => 1.0 / (1 << 23) as f32,
    };
    // bitsandbytes quantizes f16(w) whatever the model dtype (spec §3.2):
    // an f32 model gets f16's rounding too
    let eps = if target == "int8:bnb" {
        eps.max(1.0 / 1024.0)
    } else {
        eps
    };
    let step = match target {
        "quanto:qint8" | "int8" | "int8:bnb" => amax / 127.0,
        "int8:ct" | "int8:ct:group=32" => amax / 127.5,
        "quanto:qint4" => range / 15.0,
        "quanto:qint2" => range / 3.0,
        "quanto:qfloat8_e4m3fn" => x.abs() / 8.0 + amax / 448.0 * 2f32.powi(-9),
        "quanto:qfloat8_e4m3fnuz" => x.abs() / 8.0 + amax / 240.0 * 2f32.powi(-10),
        "int8:ct:int-quantized" => amax / 127.5,
        _ => x.abs() / 4.0 + amax / 57344.0 * 2f32.powi(-16),
    };
    // rounding of w/s (one ulp of T at 127) and of the product
    step * 0.5 + step * 128.0 * eps + (x.abs() + amax) * eps * 2.0
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// plain → every layout → plain: each element within the documented
    /// bound of its group.
    #[test]
    fn plain_to_any_layout_and_back_is_within_the_bound(
        vals in proptest::collection::vec(-3.0f32..3.0, 8 * 64),
        dsel in 0usize..3,
    ) {
        let d = [Dtype::BF16, Dtype::F32, Dtype::F16][dsel];
        let f = quanto::float_of(d).unwrap();
        let w = f.encode(&vals);
        let vals = f.decode(&w).unwrap(); // as stored
        let bias = f.encode(&[0.25; 8]);
        let src = Mem::new(vec![("m.weight".into(), d, vec![8, 64], w), ("m.bias".into(), d, vec![8], bias)]);
        for t in TARGETS {
            let q = migrate(&src, &Target::parse(t).unwrap(), false).unwrap();
            let back = migrate(&q, &Target::Plain(None), false).unwrap();
            let got = floats(&back, "m.weight", d);
            // groups: quanto qint4/qint2 on I=64: no groups (I <= 128) -> per row
            let glen = if t.contains("group=32") { 32 } else { 64 };
            for (k, (a, b)) in vals.iter().zip(&got).enumerate() {
                let g0 = k / glen * glen;
                let g = &vals[g0..g0 + glen];
                let amax = g.iter().fold(0f32, |m, x| m.max(x.abs()));
                let range = g.iter().fold(f32::MIN, |m, x| m.max(*x)) - g.iter().fold(f32::MAX, |m, x| m.min(*x));
                if amax == 0.0 && t.contains("qfloat8") {
                    // quanto stores NaN for an all-zero row in fp8 (0/0)
                    prop_assert!(b.is_nan(), "{t}: all-zero row gives NaN, as quanto");
                    continue;
                }
                let bnd = bound(t, amax, range, *a, d);
                prop_assert!((a - b).abs() <= bnd, "{t} {d}: element {k}: {a} -> {b}, bound {bnd}");
            }
        }
    }

    /// Every pair: a weight already in layout A, converted to layout T,
    /// dequantizes within T's bound of A's own dequantized values (each hop
    /// adds at most half a step of its target grid).
    #[test]
    fn every_pair_converts_within_the_target_bound(
        vals in proptest::collection::vec(-3.0f32..3.0, 4 * 64),
        a in 0usize..11,
        t in 0usize..11,
        dsel in 0usize..3,
    ) {
        let d = [Dtype::BF16, Dtype::F32, Dtype::F16][dsel];
        let f = quanto::float_of(d).unwrap();
        let bias = f.encode(&[0.25; 4]);
        let src = Mem::new(vec![("m.weight".into(), d, vec![4, 64], f.encode(&vals)), ("m.bias".into(), d, vec![4], bias)]);
        let qa = migrate(&src, &Target::parse(TARGETS[a]).unwrap(), false).unwrap();
        let base = floats(&migrate(&qa, &Target::Plain(None), false).unwrap(), "m.weight", d);
        // a re-layout that cannot be undone is refused; accept it here
        let qt = migrate(&qa, &Target::parse(TARGETS[t]).unwrap(), true).unwrap();
        let got = floats(&migrate(&qt, &Target::Plain(None), false).unwrap(), "m.weight", d);
        let tn = TARGETS[t];
        let glen = if tn.contains("group=32") { 32 } else { 64 };
        for (k, (x, y)) in base.iter().zip(&got).enumerate() {
            let g0 = k / glen * glen;
            let g: Vec<f32> = base[g0..g0 + glen].iter().copied().filter(|v| !v.is_nan()).collect();
            let amax = g.iter().fold(0f32, |m, v| m.max(v.abs()));
            if x.is_nan() || amax == 0.0 {
                continue; // fp8 all-zero rows are NaN, as in quanto
            }
            let range = g.iter().fold(f32::MIN, |m, v| m.max(*v)) - g.iter().fold(f32::MAX, |m, v| m.min(*v));
            // a lossy re-layout may clamp one integer step
            let slack = if TARGETS[a].contains("qint8") || TARGETS[a].starts_with("int8") { amax / 127.0 } else { 0.0 };
            let bnd = bound(tn, amax, range, *x, d) + slack;
            prop_assert!((x - y).abs() <= bnd, "{} -> {tn} ({d}): element {k}: {x} -> {y}, bound {bnd}", TARGETS[a]);
        }
    }

    /// Between quanto qint8 and the int8 layouts, whatever the plan runs
    /// without --allow-lossy converts back byte for byte.
    #[test]
    fn int8_family_relayouts_are_byte_reversible(
        vals in proptest::collection::vec(-3.0f32..3.0, 4 * 32),
        bf in any::<bool>(),
        a in 0usize..4,
        b in 0usize..4,
    ) {
        let fam = ["quanto:qint8", "int8", "int8:ct", "int8:bnb"];
        let d = if bf { Dtype::BF16 } else { Dtype::F32 };
        let f = quanto::float_of(d).unwrap();
        let w = f.encode(&vals);
        // a bias tells the model dtype, which bitsandbytes' F32 SCB does not
        let bias = f.encode(&[0.5; 4]);
        let src = Mem::new(vec![("m.weight".into(), d, vec![4, 32], w), ("m.bias".into(), d, vec![4], bias)]);
        let first = migrate(&src, &Target::parse(fam[a]).unwrap(), false).unwrap();
        if let Ok(second) = migrate(&first, &Target::parse(fam[b]).unwrap(), false) {
            let again = migrate(&second, &Target::parse(fam[a]).unwrap(), false).unwrap();
            for (k, v) in &first.bytes {
                if k.ends_with("input_scale") || k.ends_with("output_scale") {
                    continue;
                }
                prop_assert_eq!(again.bytes.get(k), Some(v), "{} -> {} -> {}: {}", fam[a], fam[b], fam[a], k);
            }
        }
    }
}

#[test]
fn user_descriptor_json_round_trips_and_converts() {
    let tmp = tempfile::tempdir().unwrap();
    let desc = r#"{
        "name": "inhouse",
        "payload": {"key": "qweight", "storage": "i8"},
        "scale": {"key": "qscale", "dtype": "F32", "granularity": "channel", "value": {"absmax_over": 127.0}, "shape": "vector"},
        "range": [-127, 127],
        "rounding": "half_away",
        "divisor": 127.0,
        "constants": [{"key": "qversion", "dtype": "U8", "shape": [1], "values": [3]}]
    }"#;
    let dp = tmp.path().join("inhouse.json");
    std::fs::write(&dp, desc).unwrap();
    let d = ckptkit::fuzzing::internals::int8::Int8Descriptor::from_json(desc).unwrap();
    assert_eq!(
        ckptkit::fuzzing::internals::int8::Int8Descriptor::from_json(&d.to_json()).unwrap(),
        d
    );
    let out = tmp.path().join("o.safetensors");
    let target = format!("int8:{}", dp.display());
    let s = convert(
        &fx("f32-qint8").join("float.safetensors"),
        &out,
        &opts(&target, false),
    )
    .unwrap();
    assert!(s.layers > 0);
    let t = tensors(&out);
    assert!(t.contains_key("lin_g128.qweight") && t.contains_key("lin_g128.qscale"));
    assert_eq!(t["lin_g128.qversion"], vec![3]);
    // and back to plain, reading the layout from the recorded descriptor
    let ck = tmp.path().join("o.ckpk");
    convert(
        &fx("f32-qint8").join("float.safetensors"),
        &ck,
        &opts(&target, false),
    )
    .unwrap();
    let c = ckptkit::Container::open(&ck).unwrap();
    assert!(c.layers().iter().any(|l| matches!(&l.quant.weights, ckptkit::WeightQuant::Int8 { descriptor, .. } if !descriptor.is_empty())));
    convert(
        &ck,
        &tmp.path().join("p.safetensors"),
        &opts("plain", false),
    )
    .unwrap();
}

#[test]
fn bad_layout_names_are_refused_before_writing() {
    for t in [
        "int8:gguf",
        "int8:ct:group=0",
        "int8:/nonexistent.json",
        "quanto:qint3",
    ] {
        assert!(Target::parse(t).is_err(), "{t}");
    }
}

fn int8_cases() -> Vec<PathBuf> {
    common::fixture_cases("int8", 12)
}

/// Checkpoints written by the real compressed-tensors 0.20.0 and
/// bitsandbytes 0.50.2 (tests/fixtures/int8, see its README) are read
/// exactly: our dequantization equals the library's own, bit for bit.
#[test]
fn real_compressed_tensors_and_bitsandbytes_files_are_read_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for dir in int8_cases() {
        let gold = SafetensorsFile::open(&dir.join("dequantized.safetensors")).unwrap();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        // the library's dequantized dtype is ours to ask for
        let dt = gold.tensors()[0].dtype;
        let target = match dt {
            Dtype::F32 => "plain:f32",
            Dtype::F16 => "plain:f16",
            _ => "plain:bf16",
        };
        let out_dir = tmp.path().join(&name);
        std::fs::create_dir(&out_dir).unwrap();
        let out = out_dir.join("model.safetensors");
        let mut o = opts(target, false);
        o.select.exclude.clear();
        let s = convert(&dir.join("model.safetensors"), &out, &o).unwrap();
        let plan = s.plan.unwrap();
        assert!(
            plan.layers.iter().any(|l| l.from.starts_with("int8")),
            "{name}: no int8 layer recognised: {:?}",
            plan.layers.iter().map(|l| &l.from).collect::<Vec<_>>()
        );
        let ours = SafetensorsFile::open(&out).unwrap();
        for t in gold.tensors() {
            assert_eq!(
                &ours.read(&t.key).unwrap()[..],
                &gold.read(&t.key).unwrap()[..],
                "{name}: {}",
                t.key
            );
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} weights checked");
}

/// The preset that writes what a fixture case's library wrote, from the
/// recipe in its `case.json` (and its directory name, which must agree).
fn preset_of_case(dir: &Path) -> &'static str {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let (lib, form, strategy) = (
        case["library"].as_str().unwrap(),
        case["form"].as_str().unwrap(),
        case["strategy"].as_str().unwrap(),
    );
    let t = match (lib, form, strategy, case["group_size"].as_u64()) {
        ("compressed-tensors", "pack-quantized", "channel", None) => "int8:ct",
        ("compressed-tensors", "pack-quantized", "group", Some(32)) => "int8:ct:group=32",
        ("compressed-tensors", "int-quantized", "channel", None) => "int8:ct:int-quantized",
        ("bitsandbytes", _, "row", None) => "int8:bnb",
        other => panic!("{name}: unexpected recipe {other:?}"),
    };
    let by_name = match name.rsplit('-').next() {
        Some("channel") if name.contains("-pack-") => "int8:ct",
        Some("group32") => "int8:ct:group=32",
        Some("channel") if name.contains("-int-") => "int8:ct:int-quantized",
        Some("llm_int8") => "int8:bnb",
        _ => "?",
    };
    assert_eq!(t, by_name, "{name}: case.json and directory name disagree");
    t
}

/// Quantizes a case's `float.safetensors` to `target` (the library's
/// skipped Linear stays float) and lists, tensor by tensor, where our
/// file differs from the library's `model.safetensors`: key set, dtype,
/// shape, bytes.
fn diff_against_library(dir: &Path, target: &str, out: &Path) -> (Vec<String>, usize) {
    let mut o = opts(target, false);
    o.select.exclude = vec!["lin_skip".into()];
    convert(&dir.join("float.safetensors"), out, &o).unwrap();
    let gold = SafetensorsFile::open(&dir.join("model.safetensors")).unwrap();
    let ours = SafetensorsFile::open(out).unwrap();
    let keys = |f: &SafetensorsFile| {
        f.tensors()
            .iter()
            .map(|t| t.key.clone())
            .collect::<std::collections::BTreeSet<_>>()
    };
    let mut diffs = Vec::new();
    for k in keys(&gold).symmetric_difference(&keys(&ours)) {
        diffs.push(format!("key `{k}` is in only one file"));
    }
    let mut compared = 0;
    for g in gold.tensors() {
        let Some(u) = ours.tensors().iter().find(|t| t.key == g.key) else {
            continue;
        };
        if (g.dtype, &g.shape) != (u.dtype, &u.shape) {
            diffs.push(format!(
                "`{}`: library {} {:?}, ours {} {:?}",
                g.key, g.dtype, g.shape, u.dtype, u.shape
            ));
            continue;
        }
        let (gb, ub) = (gold.read(&g.key).unwrap(), ours.read(&g.key).unwrap());
        if gb[..] != ub[..] {
            let n = gb.iter().zip(ub.iter()).filter(|(a, b)| a != b).count();
            diffs.push(format!("`{}`: {n} of {} bytes differ", g.key, gb.len()));
        }
        compared += 1;
    }
    (diffs, compared)
}

/// The presets quantize float weights exactly as the libraries do: for every
/// fixture case, `float.safetensors` quantized with the matching preset is
/// byte-identical to the checkpoint compressed-tensors 0.20.0 or
/// bitsandbytes 0.50.2 wrote itself (same keys, dtypes, shapes and bytes:
/// integers, scales, `weight_shape`, `weight_format`, biases, the LayerNorm
/// and the skipped Linear). The cases hold an all-zero row (CT scale
/// `finfo(T).eps`, bnb SCB 0), an all-zero group, out_features 1, a Linear
/// without bias and in_features 201 (packing padding).
///
/// The CT int-quantized (W8A8) files hold no activation tensors: the
/// preset's input activations are dynamic per-token, so the library
/// registers no `input_scale`/`input_zero_point`, and a symmetric scheme
/// stores no `weight_zero_point`; the key-set comparison checks that we
/// write none either.
#[test]
fn quantizing_float_weights_matches_the_library_files_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let mut compared = 0;
    let mut failures = Vec::new();
    for dir in int8_cases() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let out_dir = tmp.path().join(&name);
        std::fs::create_dir(&out_dir).unwrap();
        let target = preset_of_case(&dir);
        let (diffs, n) = diff_against_library(&dir, target, &out_dir.join("model.safetensors"));
        compared += n;
        failures.extend(diffs.into_iter().map(|d| format!("{name} ({target}): {d}")));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // 12 cases, at least the 6 quantized modules' tensors in each
    assert!(compared >= 12 * 6 * 2, "only {compared} tensors compared");
}

/// The fixtures tell every part of the presets' arithmetic apart: with any
/// one `math` field put back to ckptkit's default, some case is no longer
/// byte-identical (so the test above would fail if the quantizer were
/// wrong). The descriptor is handed over as a user descriptor file.
#[test]
fn each_library_arithmetic_rule_is_needed_for_the_fixtures() {
    use ckptkit::fuzzing::internals::int8::{preset, Arithmetic, ScaleOp, ZeroScale};
    let tmp = tempfile::tempdir().unwrap();
    type Edit = fn(&mut ckptkit::fuzzing::internals::int8::Int8Descriptor);
    let ablations: [(&str, &str, &str, Edit); 5] = [
        // (what, preset, case, change)
        (
            "f32 instead of bf16 arithmetic",
            "int8:ct",
            "ct-bf16-pack-channel",
            |d| d.math.arithmetic = Arithmetic::F32,
        ),
        (
            "f32 instead of f16 arithmetic",
            "int8:ct:group=32",
            "ct-f16-pack-group32",
            |d| d.math.arithmetic = Arithmetic::F32,
        ),
        (
            "zero scale 0 instead of eps",
            "int8:ct:int-quantized",
            "ct-f32-int-channel",
            |d| d.math.zero_scale = ZeroScale::Zero,
        ),
        ("no f16 cast", "int8:bnb", "bnb-f32-llm_int8", |d| {
            d.math.cast = None
        }),
        (
            "w / (SCB/127) instead of w · RN(RN(1/SCB)·127)",
            "int8:bnb",
            "bnb-bf16-llm_int8",
            |d| d.math.scale_op = ScaleOp::Divide,
        ),
    ];
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/int8");
    for (k, (what, p, case, edit)) in ablations.iter().enumerate() {
        let dir = fixtures.join(case);
        assert_eq!(preset_of_case(&dir), *p);
        let mut d = preset(p).unwrap();
        edit(&mut d);
        assert_ne!(d, preset(p).unwrap(), "{what}: no change");
        d.name = format!("ablation{k}");
        let dp = tmp.path().join(format!("ablation{k}.json"));
        std::fs::write(&dp, d.to_json()).unwrap();
        let out_dir = tmp.path().join(format!("out{k}"));
        std::fs::create_dir(&out_dir).unwrap();
        let (diffs, _) = diff_against_library(
            &dir,
            &format!("int8:{}", dp.display()),
            &out_dir.join("model.safetensors"),
        );
        assert!(
            !diffs.is_empty(),
            "{case} with {what} is still byte-identical"
        );
        // only payload/scale bytes differ: same keys, dtypes and shapes
        assert!(
            diffs.iter().all(|d| d.contains("bytes differ")),
            "{case} with {what}: {diffs:?}"
        );
    }
}

/// A user layout with a dotted key (grouped under its module only because
/// ckptkit's schema says so) and a constant.
const MINE: &str = r#"{
    "name": "mine",
    "payload": {"key": "qweight", "storage": "i8"},
    "scale": {"key": "weight.qs", "dtype": "F32", "granularity": "channel", "value": "scale", "shape": "column"},
    "range": [-127, 127],
    "rounding": "half_away",
    "divisor": 127.0,
    "constants": [{"key": "qversion", "dtype": "U8", "shape": [1], "values": [3]}]
}"#;

/// Issue 10 item 6: a safetensors file written with `--to int8:PATH.json`
/// records the descriptor in `ckptkit.schema` and is read back with it:
/// `--to plain` dequantizes (it used to copy the int8 bytes and report "all
/// lossless"), exactly as the same conversion through a container does.
#[test]
fn user_layout_in_safetensors_reads_back_like_its_container() {
    let tmp = tempfile::tempdir().unwrap();
    let dp = tmp.path().join("mine.json");
    std::fs::write(&dp, MINE).unwrap();
    let target = format!("int8:{}", dp.display());
    let float = fx("f32-qint8").join("float.safetensors");
    let (st, ck) = (tmp.path().join("q.safetensors"), tmp.path().join("q.ckpk"));
    convert(&float, &st, &opts(&target, false)).unwrap();
    convert(&float, &ck, &opts(&target, false)).unwrap();
    let md = SafetensorsFile::open(&st).unwrap().metadata().clone();
    let schema: serde_json::Value = serde_json::from_str(&md["ckptkit.schema"]).unwrap();
    assert_eq!(schema["version"], 1);
    let e = &schema["layers"]["lin_g128"];
    assert_eq!(e["weights"], "mine");
    assert_eq!(e["descriptor"]["scale"]["key"], "weight.qs", "{e}");
    let (p1, p2) = (
        tmp.path().join("p1.safetensors"),
        tmp.path().join("p2.safetensors"),
    );
    let s = convert(&st, &p1, &opts("plain", false)).unwrap();
    let plan = s.plan.unwrap();
    let l = plan.layers.iter().find(|l| l.path == "lin_g128").unwrap();
    assert_eq!((l.from.as_str(), l.to.as_str()), ("mine", "plain F32"));
    assert!(!plan.lossless());
    convert(&ck, &p2, &opts("plain", false)).unwrap();
    let (a, b) = (tensors(&p1), tensors(&p2));
    assert_eq!(a, b, "safetensors and container routes differ");
    assert!(!a.keys().any(|k| k.contains("qweight") || k.contains("qs")));
    // and the weights are the float ones within half a step
    let f = tensors(&float);
    let w0: Vec<f32> = f["lin_g128.weight"]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let w1: Vec<f32> = a["lin_g128.weight"]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for (r0, r1) in w0.chunks(256).zip(w1.chunks(256)) {
        let amax = r0.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (x, y) in r0.iter().zip(r1) {
            assert!(
                (x - y).abs() <= amax / 127.0 * 0.5 + amax * 1e-6,
                "{x} -> {y}"
            );
        }
    }
    // the same layout again changes nothing: refused, nothing written
    let again = tmp.path().join("again.safetensors");
    let e = convert(&st, &again, &opts(&target, false)).unwrap_err();
    assert!(
        matches!(e.kind(), ckptkit::ErrorKind::NothingChanged(_)),
        "{e}"
    );
    assert!(!again.exists());
}

/// The schema of a file (ckptkit's own, or edited) read into memory with
/// its `ckptkit.schema` replaced by `edit(schema)`.
fn with_schema(p: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> Mem {
    let f = SafetensorsFile::open(p).unwrap();
    let mut m = Mem::new(
        f.tensors()
            .iter()
            .map(|t| {
                (
                    t.key.clone(),
                    t.dtype,
                    t.shape.clone(),
                    f.read(&t.key).unwrap().into_vec(),
                )
            })
            .collect(),
    );
    let mut s: serde_json::Value = serde_json::from_str(&f.metadata()["ckptkit.schema"]).unwrap();
    edit(&mut s);
    m.md.insert("ckptkit.schema".into(), s.to_string());
    m
}

/// A layout ckptkit's schema records is trusted only as far as it holds:
/// a preset name means the preset exactly, a user layout needs its
/// descriptor, and the tensors must be that layout's.
#[test]
fn schema_int8_records_are_checked_against_the_presets_and_the_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dp = tmp.path().join("mine.json");
    std::fs::write(&dp, MINE).unwrap();
    let float = fx("f32-qint8").join("float.safetensors");
    let (mine, bnb) = (
        tmp.path().join("m.safetensors"),
        tmp.path().join("b.safetensors"),
    );
    convert(
        &float,
        &mine,
        &opts(&format!("int8:{}", dp.display()), false),
    )
    .unwrap();
    convert(&float, &bnb, &opts("int8:bnb", false)).unwrap();
    let err = |m: &Mem| {
        let e = detect_layers(m, &Hints::default()).expect_err("accepted");
        assert_eq!(e.location().layer.as_deref(), Some("lin_g128"), "{e}");
        e.to_string()
    };
    // untouched, both read back
    assert!(detect_layers(&with_schema(&mine, |_| {}), &Hints::default()).is_ok());
    assert!(detect_layers(&with_schema(&bnb, |_| {}), &Hints::default()).is_ok());
    // the preset's name over another divisor
    let m = with_schema(&bnb, |s| {
        let mut d = ckptkit::fuzzing::internals::int8::preset("int8:bnb").unwrap();
        d.divisor = 63.5;
        d.scale.value = ckptkit::fuzzing::internals::int8::ScaleValue::AbsmaxOver(63.5);
        s["layers"]["lin_g128"]["descriptor"] = serde_json::to_value(&d).unwrap();
    });
    assert!(err(&m).contains("differs from the built-in preset"));
    // a user layout without its descriptor (older files), or renamed
    let m = with_schema(&mine, |s| {
        let e = &mut s["layers"]["lin_g128"];
        e["weights"] = "int8:mine".into();
        e.as_object_mut().unwrap().remove("descriptor");
    });
    assert!(err(&m).contains("not a built-in preset"));
    let m = with_schema(&mine, |s| {
        s["layers"]["lin_g128"]["weights"] = "yours".into()
    });
    assert!(err(&m).contains("named `mine`"));
    // tensors that are not the recorded layout's
    let m = with_schema(&mine, |s| {
        s["layers"]["lin_g128"]["descriptor"]["constants"][0]["values"][0] = 4.into()
    });
    assert!(err(&m).contains("its constant `lin_g128.qversion` is not U8 [1] = [4]"));
    let m = with_schema(&mine, |s| {
        s["layers"]["lin_g128"]["descriptor"]["constants"][0]["key"] = "qv2".into()
    });
    assert!(err(&m).contains("do not match"));
    let m = with_schema(&bnb, |s| {
        s["layers"]["lin_g128"]["weights"] = "int8:ct".into()
    });
    assert!(err(&m).contains("do not match"));
    let m = with_schema(&mine, |s| {
        s["layers"]["lin_g128"]["shape"] = serde_json::json!([16, 128])
    });
    assert!(err(&m).contains("[16, 128]"));
    // without a schema: bitsandbytes' keys with another `weight_format`
    // (a tile layout) are neither read as the row format nor copied
    let mut m = with_schema(&bnb, |_| {});
    m.md.clear();
    assert!(detect_layers(&m, &Hints::default()).is_ok());
    m.bytes.insert("lin_g128.weight_format".into(), vec![1]);
    let e = err(&m);
    assert!(
        e.contains("constant `lin_g128.weight_format` is not U8 [] = [0]"),
        "{e}"
    );
}

/// Issue 10 item 17: key collisions a plan would create are refused by
/// the planner, naming both tensors (the writer used to report an internal
/// size mismatch).
#[test]
fn colliding_output_keys_are_refused_by_the_planner() {
    let f32s = |n: usize| quanto::float_of(Dtype::F32).unwrap().encode(&vec![0.5; n]);
    let src = Mem::new(vec![
        ("m.weight".into(), Dtype::F32, vec![4, 8], f32s(32)),
        ("m.bias".into(), Dtype::F32, vec![4], f32s(4)),
    ]);
    let layers = detect_layers(&src, &Hints::default()).unwrap();
    let mut d = ckptkit::fuzzing::internals::int8::Int8Descriptor::from_json(MINE).unwrap();
    d.payload.key = "bias".into();
    let e = plan(
        &layers,
        &Target::layout(ckptkit::WeightQuant::Int8 {
            layout: d.name.clone(),
            descriptor: d.to_json(),
        }),
        &PlanOptions::default(),
    )
    .unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("two tensors would be named `m.bias`")
            && s.contains("the payload of layer `m`'s `weight` (int8 layout `mine`)")
            && s.contains("layer `m`'s `bias`"),
        "{s}"
    );
    // a plain tensor named like a part of the layout
    let src = Mem::new(vec![
        ("m.weight".into(), Dtype::F32, vec![4, 8], f32s(32)),
        ("m.weight.q".into(), Dtype::F32, vec![4], f32s(4)),
    ]);
    let layers = detect_layers(&src, &Hints::default()).unwrap();
    let e = plan(
        &layers,
        &Target::parse("int8").unwrap(),
        &PlanOptions::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("two tensors would be named `m.weight.q`"),
        "{e}"
    );
    // across layers: `m`'s part `weight.qs` and layer `m.weight`'s `qs`
    let src = Mem::new(vec![
        ("m.weight".into(), Dtype::F32, vec![4, 8], f32s(32)),
        ("m.weight.qs".into(), Dtype::F32, vec![4], f32s(4)),
    ]);
    let layers = detect_layers(&src, &Hints::default()).unwrap();
    let d = ckptkit::fuzzing::internals::int8::Int8Descriptor::from_json(MINE).unwrap();
    let e = plan(
        &layers,
        &Target::layout(ckptkit::WeightQuant::Int8 {
            layout: d.name.clone(),
            descriptor: d.to_json(),
        }),
        &PlanOptions::default(),
    )
    .unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("two tensors would be named `m.weight.qs`")
            && s.contains("the scale of layer `m`'s `weight`")
            && s.contains("layer `m.weight`'s `qs`"),
        "{s}"
    );
}

/// A compressed-tensors or bitsandbytes model's state dict (keys, dtypes,
/// shapes, and the values of its small integer tensors: CT's `weight_shape`,
/// bnb's `weight_format`) gives the same `--like` target as the library's
/// checkpoint file; without those values the packed layouts are refused,
/// naming the tensor whose value is missing.
#[test]
fn like_tensors_reads_an_int8_state_dict_as_like_target_reads_its_file() {
    use ckptkit::migrate::{like_target, like_tensors};
    let mut packed = 0;
    for dir in int8_cases() {
        let file = dir.join("model.safetensors");
        let f = SafetensorsFile::open(&file).unwrap();
        let small = |t: &SourceTensor| {
            (t.dtype == Dtype::I64 || t.dtype == Dtype::U8)
                .then(|| f.read(&t.key).unwrap().to_vec())
        };
        let described: Vec<_> = f
            .tensors()
            .iter()
            .map(|t| (t.key.clone(), t.dtype, t.shape.clone(), small(t)))
            .collect();
        let want = like_target(&file).unwrap();
        assert_eq!(
            like_tensors(&described, None, None).unwrap(),
            want,
            "{}",
            dir.display()
        );
        let bare: Vec<_> = described
            .iter()
            .map(|(k, d, s, _)| (k.clone(), *d, s.clone(), None))
            .collect();
        match like_tensors(&bare, None, None) {
            Ok(t) => assert_eq!(t, want, "{}", dir.display()),
            Err(e) => {
                packed += 1;
                let t = e.location().tensor.clone().unwrap_or_default();
                assert!(
                    t.ends_with("weight_shape") || t.ends_with("weight_format"),
                    "{e}"
                );
                assert!(e.to_string().contains("no value"), "{e}");
            }
        }
    }
    assert!(packed >= 3, "the packed and bnb cases need their values");
}

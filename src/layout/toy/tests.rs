//! The toy family end to end through the library, and the rule that no
//! file outside a family's folder and the registry names a family.

use std::path::Path;

use super::*;
use crate::io::open::open_source;
use crate::io::writer::SafetensorsWriter;
use crate::layout::family::Hints;
use crate::migrate::plan::Target;
use crate::migrate::{convert, detect_layers, ConvertOptions};

/// BF16 bits of deterministic, varied weights.
fn weights(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let x = ((i * 37 % 101) as f32 - 50.0) / 17.0;
            crate::float::bf16_bits_from_f32(x).to_le_bytes()
        })
        .collect()
}

fn model(path: &Path) -> Vec<u8> {
    let w = weights(8 * 16);
    let plan = vec![
        ("blocks.0.proj.weight".to_string(), Dtype::BF16, vec![8, 16]),
        ("blocks.0.proj.bias".to_string(), Dtype::BF16, vec![8]),
        ("norm.weight".to_string(), Dtype::BF16, vec![16]),
    ];
    let s = SafetensorsWriter::create(path, &plan, &Default::default(), false, true).unwrap();
    s.write_tensor("blocks.0.proj.weight", &w).unwrap();
    s.write_tensor("blocks.0.proj.bias", &weights(8)).unwrap();
    s.write_tensor("norm.weight", &weights(16)).unwrap();
    s.finish().unwrap();
    w
}

fn to(t: &str) -> ConvertOptions {
    ConvertOptions {
        target: Target::parse(t).unwrap(),
        ..Default::default()
    }
}

fn bf16s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| crate::float::f32_from_bf16_bits(u16::from_le_bytes([c[0], c[1]])))
        .collect()
}

#[test]
fn the_toy_family_plugs_in_through_its_folder_and_the_registry() {
    let d = tempfile::tempdir().unwrap();
    let (float, q, back) = (
        d.path().join("float.safetensors"),
        d.path().join("toy.safetensors"),
        d.path().join("back.safetensors"),
    );
    let w = model(&float);
    // quantize: `--to toy` is parsed, planned and produced by the family
    convert(&float, &q, &to("toy")).unwrap();
    let src = open_source(&q).unwrap();
    let codes = src.read("blocks.0.proj.weight.toy_q").unwrap().to_vec();
    let scale = bf16s(&src.read("blocks.0.proj.weight.toy_scale").unwrap())[0];
    // the layout's math, computed here independently of the family
    let wf = bf16s(&w);
    let absmax = wf.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert_eq!(scale, crate::float::round_bf16(absmax / 127.0));
    for (c, x) in codes.iter().zip(&wf) {
        assert_eq!(*c as i8, (x / scale).round_ties_even() as i8);
    }
    // 1-D tensors stay plain
    assert_eq!(src.read("norm.weight").unwrap().to_vec(), weights(16));
    // detection reads it back as the toy family's layer
    let layers = detect_layers(src.as_ref(), &Hints::default()).unwrap();
    let proj = layers.iter().find(|l| l.path == "blocks.0.proj").unwrap();
    assert_eq!(proj.quant.weights, record());
    assert_eq!(
        crate::layout::registry::family_of(&proj.quant.weights).name(),
        "toy"
    );
    // dequantize: q * scale rounded to BF16
    convert(&q, &back, &to("plain")).unwrap();
    let b = open_source(&back).unwrap();
    let got = bf16s(&b.read("blocks.0.proj.weight").unwrap());
    let want: Vec<f32> = codes
        .iter()
        .map(|&c| crate::float::round_bf16(c as i8 as f32 * scale))
        .collect();
    assert_eq!(got, want);
    // into a container its record is a 2.0 family record, read back by the
    // family, and dequantized from there to the same bytes
    let ck = d.path().join("toy.ckpk");
    convert(&q, &ck, &ConvertOptions::default()).unwrap();
    let c = crate::Container::open(&ck).unwrap();
    assert_eq!(c.manifest().version.major, 2);
    assert!(c.layers().iter().any(|l| l.quant.weights == record()));
    let back2 = d.path().join("back2.safetensors");
    convert(&ck, &back2, &to("plain")).unwrap();
    assert_eq!(
        open_source(&back2)
            .unwrap()
            .read("blocks.0.proj.weight")
            .unwrap()
            .to_vec(),
        b.read("blocks.0.proj.weight").unwrap().to_vec()
    );
}

/// Files under `src/` (relative paths), recursively.
fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_file_outside_a_family_folder_and_the_registry_names_a_family_variant() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    sources(&root.join("examples"), &mut files);
    // the record's definition and its form (spec/container.md §5) live in
    // format/; family.rs holds the unknown family, registry.rs the list
    let allowed = |rel: &str| {
        rel.starts_with("src/format/")
            || rel == "src/layout/family.rs"
            || rel == "src/layout/registry.rs"
            // any family folder (`src/layout/NAME/...`)
            || rel
                .strip_prefix("src/layout/")
                .is_some_and(|r| r.contains('/'))
    };
    let variants = [
        "WeightQuant::Quanto",
        "WeightQuant::Int8",
        "WeightQuant::Family",
    ];
    let mut offenders = Vec::new();
    for f in &files {
        let rel = f
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if !allowed(&rel) && variants.iter().any(|v| code.contains(v)) {
                offenders.push(format!("{rel}:{}: {}", n + 1, line.trim()));
            }
            // the toy family is named only in its folder, the module list and
            // the registry line
            let toy_ok = rel.starts_with("src/layout/toy/")
                || (rel == "src/layout/mod.rs" && code.trim() == "mod toy;")
                || (rel == "src/layout/registry.rs" && code.trim() == "&crate::layout::toy::Toy,");
            if !toy_ok && code.contains("toy") {
                offenders.push(format!("{rel}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "family variants named outside their folders:\n{}",
        offenders.join("\n")
    );
}

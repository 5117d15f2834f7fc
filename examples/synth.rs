//! Writes a synthetic checkpoint for benchmarks: `synth OUT.safetensors
//! GIGABYTES [plain-bf16|quanto-qint8] [ROWS COLS [LAYERS]]`.
//!
//! LAYERS, when given, sets the number of layers (GIGABYTES is then
//! ignored): `synth x.safetensors 0 plain-bf16 2 2 50000` writes 100,000
//! small tensors, for benchmarks of the per-tensor cost.
//!
//! plain-bf16: N layers `blocks.i.proj.weight` BF16 [ROWS, COLS] with
//! weight-like values, plus a bias. quanto-qint8: the same layers as quanto
//! stores them (`weight._data` I8, `weight._scale` BF16 [ROWS, 1], `bias`,
//! `input_scale`, `output_scale`) and a `quanto_qmap.json` beside. Memory
//! stays at one tensor.

use std::collections::BTreeMap;

use ckptkit::{Dtype, SafetensorsWriter};

fn fill(seed: u64, out: &mut [u8], kind: &str) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    match kind {
        "bf16" => {
            for c in out.chunks_exact_mut(8) {
                let r = next();
                for (i, e) in c.chunks_exact_mut(2).enumerate() {
                    // sum of uniforms ~ normal, scaled like weights (std ~0.02)
                    let u = ((r >> (16 * i)) & 0xFFFF) as f32 / 65536.0 - 0.5;
                    let v = half::bf16::from_f32(u * 0.07);
                    e.copy_from_slice(&v.to_bits().to_le_bytes());
                }
            }
        }
        _ => {
            for c in out.chunks_exact_mut(8) {
                let r = next();
                c.copy_from_slice(&r.to_le_bytes());
            }
        }
    }
}

fn main() -> ckptkit::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 3 {
        eprintln!(
            "usage: synth OUT.safetensors GIGABYTES [plain-bf16|quanto-qint8] [ROWS COLS [LAYERS]]"
        );
        std::process::exit(2);
    }
    let out = std::path::PathBuf::from(&a[1]);
    let gb: f64 = a[2].parse().expect("GIGABYTES");
    let kind = a.get(3).map(String::as_str).unwrap_or("plain-bf16");
    let rows: u64 = a.get(4).map(|s| s.parse().expect("ROWS")).unwrap_or(4096);
    let cols: u64 = a.get(5).map(|s| s.parse().expect("COLS")).unwrap_or(4096);
    let quanto = kind == "quanto-qint8";
    let per_layer = if quanto { rows * cols } else { rows * cols * 2 };
    let n = match a.get(6) {
        Some(l) => l.parse().expect("LAYERS"),
        None => ((gb * 1e9) / per_layer as f64).ceil().max(1.0) as u64,
    };
    let mut plan = Vec::new();
    for i in 0..n {
        let m = format!("blocks.{i}.proj");
        if quanto {
            plan.push((format!("{m}.weight._data"), Dtype::I8, vec![rows, cols]));
            plan.push((format!("{m}.weight._scale"), Dtype::BF16, vec![rows, 1]));
            plan.push((format!("{m}.input_scale"), Dtype::BF16, vec![]));
            plan.push((format!("{m}.output_scale"), Dtype::BF16, vec![]));
        } else {
            plan.push((format!("{m}.weight"), Dtype::BF16, vec![rows, cols]));
        }
        plan.push((format!("{m}.bias"), Dtype::BF16, vec![rows]));
    }
    let md = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let w = SafetensorsWriter::create(&out, &plan, &md, true, false)?;
    let mut buf = Vec::new();
    for (i, (k, d, s)) in plan.iter().enumerate() {
        let len = ckptkit::byte_len(*d, s)? as usize;
        buf.resize(len, 0);
        if k.ends_with("_scale") && s.is_empty() {
            buf.copy_from_slice(&half::bf16::ONE.to_bits().to_le_bytes());
        } else if k.ends_with("weight._scale") {
            for e in buf.chunks_exact_mut(2) {
                e.copy_from_slice(&half::bf16::from_f32(0.035 / 127.0).to_bits().to_le_bytes());
            }
        } else {
            let kind = if *d == Dtype::I8 { "i8" } else { "bf16" };
            let mut tail = [0u8; 8];
            let whole = len / 8 * 8;
            fill(i as u64, &mut buf[..whole], kind);
            fill(i as u64 + 7, &mut tail, kind);
            let rest = len - whole;
            buf[whole..].copy_from_slice(&tail[..rest]);
        }
        w.write_tensor(k, &buf)?;
    }
    w.finish()?;
    if quanto {
        let mut q = String::from("{");
        for i in 0..n {
            if i > 0 {
                q.push(',');
            }
            q.push_str(&format!(
                "\n    \"blocks.{i}.proj\": {{\n        \"weights\": \"qint8\",\n        \"activations\": \"none\"\n    }}"
            ));
        }
        q.push_str("\n}");
        std::fs::write(out.with_file_name("quanto_qmap.json"), q)?;
    }
    eprintln!("wrote {} ({n} layers)", out.display());
    Ok(())
}

//! The per-tensor cost: converting and verifying a checkpoint of 100,000 small tensors
//! (50,000 layers `blocks.{i}.proj` with a BF16 [2, 2] weight and a [2] bias, as
//! `synth x.safetensors 0 plain-bf16 2 2 50000` writes them). Run with
//! `cargo bench --bench tensor_count -- --quick`.
//!
//! `CKPTKIT_BENCH_TENSORS` changes the tensor count; `CKPTKIT_BENCH_DIR` the directory
//! of the inputs and outputs (default: `/dev/shm` when it exists, else the system's
//! temporary directory).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use ckptkit::migrate::{self, ConvertOptions};
use ckptkit::{Dtype, SafetensorsWriter};
use criterion::{criterion_group, criterion_main, Criterion};

fn write_input(path: &Path, layers: usize) {
    let mut plan = Vec::with_capacity(2 * layers);
    for i in 0..layers {
        plan.push((format!("blocks.{i}.proj.weight"), Dtype::BF16, vec![2, 2]));
        plan.push((format!("blocks.{i}.proj.bias"), Dtype::BF16, vec![2]));
    }
    let md = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let w = SafetensorsWriter::create(path, &plan, &md, true, false).expect("create");
    for (i, (k, d, s)) in plan.iter().enumerate() {
        let len = ckptkit::byte_len(*d, s).expect("len") as usize;
        let b: Vec<u8> = (0..len).map(|j| ((i * 7 + j) % 61) as u8).collect();
        w.write_tensor(k, &b).expect("write");
    }
    w.finish().expect("finish");
}

fn tensor_count(c: &mut Criterion) {
    let n: usize = std::env::var("CKPTKIT_BENCH_TENSORS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let root = std::env::var_os("CKPTKIT_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| Some(std::path::PathBuf::from("/dev/shm")).filter(|p| p.is_dir()))
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(root).expect("tempdir");
    let d = dir.path();
    let input = d.join("input.safetensors");
    write_input(&input, n / 2);
    let ckpk = d.join("out.ckpk");
    let st = d.join("out.safetensors");
    let opts = ConvertOptions::default().overwrite(true);
    // the outputs the verify and .ckpk rows read
    migrate::convert(&input, &ckpk, &opts).expect("to .ckpk");
    migrate::convert(&input, &st, &opts).expect("to safetensors");

    let mut g = c.benchmark_group(format!("tensors_{}k", n / 1000));
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("convert safetensors -> ckpk", |b| {
        b.iter(|| black_box(migrate::convert(&input, &ckpk, &opts).expect("convert")))
    });
    g.bench_function("verify ckpk", |b| {
        b.iter(|| black_box(migrate::verify(&ckpk).expect("verify")))
    });
    g.bench_function("convert safetensors -> safetensors", |b| {
        b.iter(|| black_box(migrate::convert(&input, &st, &opts).expect("convert")))
    });
    g.bench_function("verify safetensors", |b| {
        b.iter(|| black_box(migrate::verify(&st).expect("verify")))
    });
    let back = d.join("back.safetensors");
    g.bench_function("convert ckpk -> safetensors", |b| {
        b.iter(|| black_box(migrate::convert(&ckpk, &back, &opts).expect("convert")))
    });
    g.finish();
}

criterion_group!(benches, tensor_count);
criterion_main!(benches);

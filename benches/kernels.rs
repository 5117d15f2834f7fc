//! Kernel throughput (GB/s of input bytes unless noted), each next to a memcpy baseline on the
//! same machine. Run with `cargo bench --bench kernels -- --quick` (a few minutes on 2 cores).
//!
//! Throughput is `Throughput::Bytes` of the *logical* tensor in its float dtype (bf16,
//! 2 B/element) for quantize and dequantize, of the unpacked codes for pack / unpack, and of the
//! raw (uncompressed) chunk bytes for the filter and the codecs, so every line compares with
//! memcpy of the same amount.

use std::hint::black_box;
use std::time::Duration;

use ckptkit::fuzzing::internals::filter;
use ckptkit::fuzzing::internals::float::FloatDtype;
use ckptkit::fuzzing::internals::quanto::math::{self, QType};
use ckptkit::fuzzing::internals::quanto::pack;
use ckptkit::{Codec, Dtype};
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};

const ROWS: usize = 4096;
const COLS: usize = 4096;
const MIB: usize = 1 << 20;

/// Deterministic weight-like bf16 bytes: approximately N(0, 0.02) (sum of 4 uniforms),
/// rounded to bf16 as torch would store trained weights.
fn weight_bf16(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut out = Vec::with_capacity(n * 2);
    for _ in 0..n {
        let r = next();
        let s: f32 = (0..4)
            .map(|i| ((r >> (16 * i)) & 0xFFFF) as f32 / 65536.0)
            .sum::<f32>()
            - 2.0;
        // sum of 4 U(0,1) has variance 1/3
        let v = s * (0.02 / (1.0f32 / 3.0).sqrt());
        out.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
    }
    out
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = vec![0u8; n];
    for c in out.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    out
}

fn small<M: criterion::measurement::Measurement>(g: &mut BenchmarkGroup<'_, M>) {
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));
}

fn baseline_and_hash(c: &mut Criterion) {
    let n = 64 * MIB;
    let src = random_bytes(n, 1);
    let mut dst = vec![0u8; n];
    dst.copy_from_slice(&src); // pre-fault
    let mut g = c.benchmark_group("baseline");
    small(&mut g);
    g.throughput(Throughput::Bytes(n as u64));
    g.bench_function("memcpy_64MiB", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
        })
    });
    g.bench_function("blake3_update_64MiB", |b| {
        b.iter(|| {
            let mut h = blake3::Hasher::new();
            h.update(black_box(&src));
            black_box(h.finalize())
        })
    });
    g.bench_function("blake3_update_rayon_64MiB", |b| {
        b.iter(|| {
            let mut h = blake3::Hasher::new();
            h.update_rayon(black_box(&src));
            black_box(h.finalize())
        })
    });
    g.finish();
}

fn quanto_math(c: &mut Criterion) {
    let shape = [ROWS as u64, COLS as u64];
    let w = weight_bf16(ROWS * COLS, 2);
    let logical_bytes = w.len() as u64;
    let mut g = c.benchmark_group("quanto_bf16_4096x4096");
    small(&mut g);
    g.throughput(Throughput::Bytes(logical_bytes));
    let cases = [
        (QType::QInt8, None),
        (
            QType::QInt4,
            math::group_size(ROWS as u64, (ROWS * COLS) as u64),
        ),
        (QType::QFloat8E4M3Fn, None),
    ];
    for (q, gs) in cases {
        if q == QType::QInt4 {
            assert_eq!(gs, Some(128), "qint4 group size for [4096, 4096]");
        }
        g.bench_function(format!("quantize_{}", q.name()), |b| {
            b.iter(|| {
                black_box(math::quantize(q, FloatDtype::Bf16, &shape, black_box(&w), gs).unwrap())
            })
        });
        let qw = math::quantize(q, FloatDtype::Bf16, &shape, &w, gs).unwrap();
        let parts = qw.parts();
        let mut out = vec![0u8; w.len()];
        g.bench_function(format!("dequantize_{}", q.name()), |b| {
            b.iter(|| {
                black_box(
                    math::dequantize(q, FloatDtype::Bf16, &shape, gs, black_box(&parts)).unwrap(),
                )
            })
        });
        g.bench_function(format!("dequantize_into_{}", q.name()), |b| {
            b.iter(|| {
                math::dequantize_into(q, FloatDtype::Bf16, &shape, gs, black_box(&parts), &mut out)
                    .unwrap();
                black_box(&out);
            })
        });
    }
    g.finish();
}

fn pack4(c: &mut Criterion) {
    // qint4 G=128 on [4096, 4096]: codes [131072, 128] packed along dim 0.
    let rows = ROWS * COLS / 128;
    let row_len = 128;
    let codes: Vec<u8> = random_bytes(rows * row_len, 3)
        .into_iter()
        .map(|b| b & 0x0F)
        .collect();
    let packed = pack::pack(4, &codes, rows, row_len).unwrap();
    let mut g = c.benchmark_group("pack_int4_16Mi_codes");
    small(&mut g);
    g.throughput(Throughput::Bytes(codes.len() as u64));
    g.bench_function("pack", |b| {
        b.iter(|| black_box(pack::pack(4, black_box(&codes), rows, row_len).unwrap()))
    });
    g.bench_function("unpack", |b| {
        b.iter(|| black_box(pack::unpack(4, black_box(&packed), rows, row_len).unwrap()))
    });
    g.finish();
}

fn float_filter(c: &mut Criterion) {
    let raw = weight_bf16(16 * MIB / 2, 4);
    let mut planes = vec![0u8; raw.len()];
    let mut back = vec![0u8; raw.len()];
    filter::split(Dtype::BF16, &raw, &mut planes).unwrap();
    let mut g = c.benchmark_group("filter_bf16_16MiB");
    small(&mut g);
    g.throughput(Throughput::Bytes(raw.len() as u64));
    g.bench_function("split", |b| {
        b.iter(|| filter::split(Dtype::BF16, black_box(&raw), &mut planes).unwrap())
    });
    g.bench_function("merge", |b| {
        b.iter(|| filter::merge(Dtype::BF16, black_box(&planes), &mut back).unwrap())
    });
    g.finish();
    assert_eq!(raw, back);
}

fn codecs(c: &mut Criterion) {
    // 16 chunks of 1 MiB, encoded one after the other on one thread (the container writer runs
    // one such loop per core).
    let raw = weight_bf16(16 * MIB / 2, 5);
    let mut g = c.benchmark_group("codec_bf16_1MiB_chunks_level1");
    small(&mut g);
    g.throughput(Throughput::Bytes(raw.len() as u64));
    for (name, codec) in [
        ("zstd", Codec::Zstd),
        ("zstd_float_planes", Codec::ZstdFloatPlanes),
    ] {
        let stored: Vec<Vec<u8>> = raw
            .chunks(MIB)
            .map(|ch| filter::encode_chunk(codec, Dtype::BF16, 1, ch).unwrap())
            .collect();
        let ratio = stored.iter().map(Vec::len).sum::<usize>() as f64 / raw.len() as f64;
        eprintln!("{name}: stored/raw = {ratio:.4}");
        g.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| {
                for ch in raw.chunks(MIB) {
                    black_box(filter::encode_chunk(codec, Dtype::BF16, 1, black_box(ch)).unwrap());
                }
            })
        });
        let mut out = vec![0u8; MIB];
        g.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| {
                for s in &stored {
                    filter::decode_chunk(codec, Dtype::BF16, black_box(s), &mut out).unwrap();
                    black_box(&out);
                }
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    baseline_and_hash,
    quanto_math,
    pack4,
    float_filter,
    codecs
);
criterion_main!(benches);

//! The work per tensor does not grow with the tensor count (issue 10, item 12).
//!
//! Every conversion and verification below runs on checkpoints of 10,000 and
//! 100,000 small tensors, and the library's lookup counter
//! ([`ckptkit::fuzzing::internals::lookups`]: every entry a name lookup examines on
//! the per-tensor and per-layer paths) must grow at most 12 times for 10 times
//! the tensors: a lookup that scans a list per tensor makes it grow 100
//! times. No timing is asserted.
//!
//! The counter is process-wide (it sees rayon's worker threads), so this
//! binary holds this one test: nothing else runs beside it.
//! `CKPTKIT_SCALING_SIZES=SMALL,LARGE` overrides the two tensor counts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ckptkit::fuzzing::internals::lookups;
use ckptkit::migrate::Target;
use ckptkit::migrate::{self, ConvertOptions};
use ckptkit::{Dtype, SafetensorsWriter};

type Plan = Vec<(String, Dtype, Vec<u64>)>;

fn write_file(path: &Path, plan: &Plan) {
    let md = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let w = SafetensorsWriter::create(path, plan, &md, true, false).expect("create");
    for (i, (k, d, s)) in plan.iter().enumerate() {
        let len = ckptkit::byte_len(*d, s).expect("len") as usize;
        let b = if k.ends_with("_scale") {
            // positive bf16 scales (0.0078125)
            [0x00u8, 0x3c].repeat(len / 2)
        } else {
            (0..len).map(|j| ((i * 7 + j) % 61) as u8).collect()
        };
        w.write_tensor(k, &b).expect("write");
    }
    w.finish().expect("finish");
}

/// `n` plain tensors: half of them in two-tensor layers
/// (`blocks.{i}.proj.weight` / `.bias`), half in one big layer (`params.{i}`,
/// as a `ParameterList` stores them).
fn plain_plan(n: usize) -> Plan {
    let mut plan = Vec::with_capacity(n);
    for i in 0..n / 4 {
        plan.push((format!("blocks.{i}.proj.weight"), Dtype::BF16, vec![2, 2]));
        plan.push((format!("blocks.{i}.proj.bias"), Dtype::BF16, vec![2]));
    }
    for i in 0..n - plan.len() {
        plan.push((format!("params.{i}"), Dtype::BF16, vec![2]));
    }
    plan
}

/// `n` tensors of quanto qint8 layers (five tensors each) with their
/// `quanto_qmap.json`, and a plain reference of the same model's weights
/// (for `shapes_from`).
fn quanto_inputs(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
    let layers = n / 5;
    let mut plan = Vec::with_capacity(n);
    let mut reference = Vec::with_capacity(layers);
    let mut qmap = serde_json::Map::new();
    for i in 0..layers {
        let m = format!("blocks.{i}.proj");
        plan.push((format!("{m}.weight._data"), Dtype::I8, vec![2, 2]));
        plan.push((format!("{m}.weight._scale"), Dtype::BF16, vec![2, 1]));
        plan.push((format!("{m}.input_scale"), Dtype::BF16, vec![]));
        plan.push((format!("{m}.output_scale"), Dtype::BF16, vec![]));
        plan.push((format!("{m}.bias"), Dtype::BF16, vec![2]));
        reference.push((format!("{m}.weight"), Dtype::BF16, vec![2, 2]));
        qmap.insert(
            m,
            serde_json::json!({"weights": "qint8", "activations": "none"}),
        );
    }
    let qdir = dir.join("quanto");
    std::fs::create_dir(&qdir).expect("mkdir");
    let q = qdir.join("model.safetensors");
    write_file(&q, &plan);
    std::fs::write(
        qdir.join("quanto_qmap.json"),
        serde_json::Value::Object(qmap).to_string(),
    )
    .expect("qmap");
    let r = dir.join("reference.safetensors");
    write_file(&r, &reference);
    (q, r)
}

/// Lookups counted while `f` runs.
fn counted(f: impl FnOnce()) -> u64 {
    let before = lookups::count();
    f();
    lookups::count() - before
}

/// The lookups of every step, for `n` tensors.
fn run(n: usize) -> Vec<(&'static str, u64)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let plain = d.join("plain.safetensors");
    write_file(&plain, &plain_plan(n));
    let (quanto, reference) = quanto_inputs(d, n);
    let opts = ConvertOptions::default();
    let ok = |r: ckptkit::Result<migrate::Summary>, what: &str| {
        r.unwrap_or_else(|e| panic!("{what} at {n} tensors: {e}"));
    };
    let verified = |p: &Path| {
        let r = migrate::verify(p).unwrap_or_else(|e| panic!("verify {}: {e}", p.display()));
        assert_eq!(
            r.tensors as usize + r.unchecked as usize,
            n,
            "{}",
            p.display()
        );
    };
    let mut rows = Vec::new();
    let mut step = |name: &'static str, f: &mut dyn FnMut()| {
        let t0 = std::time::Instant::now();
        let c = counted(f);
        // the time is printed for information only
        let s = t0.elapsed().as_secs_f64();
        eprintln!("{n:>7} tensors  {name:<36} {c:>9} lookups  {s:6.2} s");
        rows.push((name, c));
    };
    let st = d.join("out.safetensors");
    let ck = d.join("out.ckpk");
    let zk = d.join("zstd.ckpk");
    let dir_out = d.join("sharded");
    // ~8 files of whole layers (the `params` layer alone is about half)
    let sharded = ConvertOptions::default().max_shard_size((n as u64 * 5) / 8);
    step("safetensors -> safetensors", &mut || {
        ok(migrate::convert(&plain, &st, &opts), "st->st")
    });
    step("verify safetensors", &mut || verified(&st));
    step("safetensors -> .ckpk", &mut || {
        ok(migrate::convert(&plain, &ck, &opts), "st->ckpk")
    });
    step("verify .ckpk", &mut || verified(&ck));
    step("safetensors -> .ckpk (zstd)", &mut || {
        let z = ConvertOptions::default().compression(Some(Default::default()));
        ok(migrate::convert(&plain, &zk, &z), "st->ckpk zstd")
    });
    step("safetensors -> directory", &mut || {
        ok(migrate::convert(&plain, &dir_out, &sharded), "st->dir")
    });
    step("verify directory", &mut || verified(&dir_out));
    step("directory -> .ckpk", &mut || {
        ok(
            migrate::convert(&dir_out, &d.join("from-dir.ckpk"), &opts),
            "dir->ckpk",
        )
    });
    step("quanto -> plain (qmap, shapes-from)", &mut || {
        let o = ConvertOptions::default()
            .target(Target::Plain(None))
            .shapes_from(Some(reference.clone()));
        ok(
            migrate::convert(&quanto, &d.join("dequantized.safetensors"), &o),
            "quanto->plain",
        )
    });
    step("check quanto against plain", &mut || {
        let r = migrate::check(&quanto, &reference, &opts).expect("check");
        assert!(!r.compatible());
    });
    step(".ckpk -> safetensors", &mut || {
        ok(
            migrate::convert(&ck, &d.join("back.safetensors"), &opts),
            "ckpk->st",
        )
    });
    // the copies carry the input's tensors unchanged (same data section)
    let data = |p: &Path| {
        let f = ckptkit::SafetensorsFile::open(p).expect("open");
        let b = std::fs::read(p).expect("read");
        b[f.header().header_len as usize..].to_vec()
    };
    let want = data(&plain);
    for p in [&st, &d.join("back.safetensors")] {
        assert!(data(p) == want, "{} differs from the input", p.display());
    }
    rows
}

#[test]
fn lookups_grow_linearly_with_the_tensor_count() {
    let sizes: Vec<usize> = std::env::var("CKPTKIT_SCALING_SIZES")
        .ok()
        .map(|s| {
            s.split(',')
                .map(|x| x.trim().parse().expect("CKPTKIT_SCALING_SIZES=SMALL,LARGE"))
                .collect()
        })
        .unwrap_or_else(|| vec![10_000, 100_000]);
    let (small, large) = (sizes[0], sizes[1]);
    let a = run(small);
    let b = run(large);
    let growth = large as f64 / small as f64;
    let limit = 1.2 * growth;
    let mut bad = Vec::new();
    eprintln!(
        "step                                 {small:>10} {large:>12}   ratio (limit {limit:.1})"
    );
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let ratio = *y as f64 / (*x).max(1) as f64;
        eprintln!("{name:<36} {x:>10} {y:>12}   {ratio:.2}");
        if ratio > limit {
            bad.push(format!("{name}: {x} -> {y} lookups ({ratio:.1}x)"));
        }
    }
    assert!(
        bad.is_empty(),
        "lookups grow faster than the tensor count ({growth}x): {bad:?}"
    );
}

//! A compressed container from a planned conversion is written once: no
//! uncompressed staging copy beside the output, the same content as the
//! uncompressed conversion, and a cancelled conversion leaves nothing.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use ckptkit::migrate::Target;
use ckptkit::migrate::{convert, ConvertOptions};
use ckptkit::ZstdOptions;
use ckptkit::{Cancel, Container, Control, Dtype, ErrorKind, Progress, SafetensorsWriter};

/// The tests of this file run one at a time: the first one counts the
/// bytes the whole process writes.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A float model of `layers` Linear layers, bf16 [1024, 1024] weights
/// (2 MiB each) and bf16 biases; with `distinct` false, every layer holds
/// the same values (quick to make when only the size matters).
fn model(path: &Path, layers: usize, distinct: bool) {
    let mut plan = Vec::new();
    for i in 0..layers {
        plan.push((
            format!("blocks.{i}.proj.weight"),
            Dtype::BF16,
            vec![1024, 1024],
        ));
        plan.push((format!("blocks.{i}.proj.bias"), Dtype::BF16, vec![1024]));
    }
    let w = SafetensorsWriter::create(path, &plan, &Default::default(), false, true).unwrap();
    let (weight, bias) = (
        common::bf16_weights(7, 1024 * 1024),
        common::bf16_weights(8, 1024),
    );
    for (i, (k, _, s)) in plan.iter().enumerate() {
        let n: u64 = s.iter().product();
        if distinct {
            w.write_tensor(k, &common::bf16_weights(i as u64, n as usize))
                .unwrap();
        } else {
            w.write_tensor(k, if n == 1024 { &bias } else { &weight })
                .unwrap();
        }
    }
    w.finish().unwrap();
}

fn zstd() -> Option<ZstdOptions> {
    Some(ZstdOptions::default())
}

fn qint8(compression: Option<ZstdOptions>) -> ConvertOptions {
    ConvertOptions::default()
        .compression(compression)
        .target(Target::parse("quanto:qint8").unwrap())
}

/// Bytes this process has passed to write calls so far (`wchar`), or
/// `None` where /proc/self/io is missing.
fn written_by_process() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/io").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn a_compressed_container_from_a_planned_conversion_is_written_once() {
    let _g = serial();
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("in/model.safetensors");
    std::fs::create_dir_all(d.path().join("in")).unwrap();
    std::fs::create_dir_all(d.path().join("out")).unwrap();
    model(&input, 6, true); // 12 MiB of bf16
    let output = d.path().join("out/q.ckpk");
    let seen: Arc<Mutex<Vec<Progress>>> = Default::default();
    let s = seen.clone();
    let mut opts = qint8(zstd());
    opts.control = Control::new().with_progress(move |p| s.lock().unwrap().push(p));
    let Some(before) = written_by_process() else {
        eprintln!("note: /proc/self/io is missing; the bytes written are not measured");
        return;
    };
    let summary = convert(&input, &output, &opts).unwrap();
    let after = written_by_process().unwrap();
    let size = std::fs::metadata(&output).unwrap().len();
    let written = after - before;
    // staging the layers uncompressed first writes about twice the output
    assert!(
        written <= size + size / 100 + (64 << 10),
        "{written} bytes written for a {size}-byte output"
    );
    assert!(
        written >= size / 2,
        "{written} bytes measured for a {size}-byte output"
    );
    assert_eq!(common::entries(&d.path().join("out")), ["q.ckpk"]);
    // progress counts each output byte once
    let plan_bytes: u64 = summary
        .plan
        .as_ref()
        .unwrap()
        .layers
        .iter()
        .map(|l| l.bytes_out)
        .sum();
    let last = *seen.lock().unwrap().last().expect("progress was reported");
    assert_eq!(last.bytes_total, plan_bytes);
    assert_eq!(last.bytes_done, plan_bytes);
    ckptkit::migrate::verify(&output).unwrap();
}

/// Opens both containers and compares their layer tables and every
/// tensor's bytes; returns the number of tensors compared.
fn same_content(a: &Path, b: &Path) -> usize {
    let (ca, cb) = (Container::open(a).unwrap(), Container::open(b).unwrap());
    assert_eq!(ca.layers(), cb.layers(), "layer tables");
    let mut n = 0;
    for l in ca.layers() {
        for t in &l.tensors {
            for p in &t.parts {
                let x = ca.read_tensor(p.shard, &p.key).unwrap();
                let y = cb.read_tensor(p.shard, &p.key).unwrap();
                assert!(x[..] == y[..], "{} differs", p.key);
                n += 1;
            }
        }
    }
    let shards = |c: &Container| -> Vec<(String, Vec<String>)> {
        c.manifest()
            .shards
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.tensors.iter().map(|t| t.key.clone()).collect(),
                )
            })
            .collect()
    };
    assert_eq!(shards(&ca), shards(&cb), "shard names and tensor order");
    n
}

#[test]
fn the_compressed_output_equals_the_uncompressed_one_tensor_for_tensor() {
    let _g = serial();
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("model.safetensors");
    model(&input, 5, true);
    for (target, max_shard) in [
        ("quanto:qint8", u64::MAX),
        ("quanto:qint8", 3 << 20), // several shards
        ("int8", 2 << 20),
        ("plain:f32", u64::MAX),
    ] {
        let opts = |compression| {
            ConvertOptions::default()
                .compression(compression)
                .target(Target::parse(target).unwrap())
                .max_shard_size(max_shard)
                .overwrite(true)
        };
        let (plain, packed) = (d.path().join("plain.ckpk"), d.path().join("packed.ckpk"));
        let sp = convert(&input, &plain, &opts(None)).unwrap();
        let sz = convert(&input, &packed, &opts(zstd())).unwrap();
        let n = same_content(&plain, &packed);
        assert_eq!(n, sp.tensors, "{target}");
        assert_eq!(sz.tensors, sp.tensors);
        assert_eq!(sz.losses.len(), sp.losses.len(), "{target}");
        let c = Container::open(&packed).unwrap();
        if max_shard != u64::MAX {
            assert!(c.manifest().shards.len() > 1, "{target}: several shards");
        }
        assert!(c
            .manifest()
            .shards
            .iter()
            .all(|s| !matches!(s.compression, ckptkit::Compression::None)));
        ckptkit::migrate::verify(&packed).unwrap();
    }
}

#[test]
fn a_cancelled_compressed_conversion_leaves_no_output_and_no_temporaries() {
    let _g = serial();
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("in/model.safetensors");
    std::fs::create_dir_all(d.path().join("in")).unwrap();
    std::fs::create_dir_all(d.path().join("out")).unwrap();
    model(&input, 32, false);
    let cancel = Cancel::new();
    let at: Arc<Mutex<Option<Progress>>> = Default::default();
    let (k, a) = (cancel.clone(), at.clone());
    // zstd's slowest level: seconds of work, still running at the first
    // progress report (100 ms in), which cancels it with some bytes written
    let mut opts = qint8(Some(ZstdOptions::default().level(19)));
    opts.control = Control::new()
        .with_cancel(cancel.clone())
        .with_progress(move |p| {
            a.lock().unwrap().get_or_insert(p);
            k.cancel();
        });
    let output = d.path().join("out/q.ckpk");
    let e = convert(&input, &output, &opts).expect_err("cancelled");
    assert!(matches!(e.kind(), ErrorKind::Interrupted), "{e}");
    let p = at.lock().unwrap().expect("cancelled while writing");
    assert!(
        p.bytes_done > 0 && p.bytes_done < p.bytes_total,
        "mid-write: {p:?}"
    );
    assert!(
        common::entries(&d.path().join("out")).is_empty(),
        "{:?}",
        common::entries(&d.path().join("out"))
    );
    assert!(!output.exists());
}

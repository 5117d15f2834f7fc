//! Progress and cancellation are per call: two conversions in one process
//! report their own progress, and cancelling one leaves the other complete
//! and the cancelled one with no output and no temporaries.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ckptkit::migrate::Target;
use ckptkit::migrate::{convert, ConvertOptions};
use ckptkit::{Cancel, Control, Dtype, ErrorKind, Progress, SafetensorsWriter};

/// A float model of `layers` bf16 [512, 512] Linear weights (0.5 MiB each).
fn model(path: &Path, layers: usize) {
    let plan: Vec<(String, Dtype, Vec<u64>)> = (0..layers)
        .map(|i| {
            (
                format!("blocks.{i}.proj.weight"),
                Dtype::BF16,
                vec![512, 512],
            )
        })
        .collect();
    let w = SafetensorsWriter::create(path, &plan, &Default::default(), false, true).unwrap();
    for (i, (k, _, _)) in plan.iter().enumerate() {
        w.write_tensor(k, &common::bf16_weights(i as u64, 512 * 512))
            .unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn two_conversions_on_two_threads_report_and_stop_on_their_own() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("in/model.safetensors");
    std::fs::create_dir(d.path().join("in")).unwrap();
    model(&input, 256);
    for dir in ["a", "b"] {
        std::fs::create_dir(d.path().join(dir)).unwrap();
    }
    // A: quantize to a file, recording its progress
    let seen_a: Arc<Mutex<Vec<Progress>>> = Default::default();
    let sa = seen_a.clone();
    let opts_a = ConvertOptions::default()
        .target(Target::parse("quanto:qint8").unwrap())
        .control(Control::new().with_progress(move |p| sa.lock().unwrap().push(p)));
    // B: the same into a directory, cancelled by its own first progress report
    let cancel_b = Cancel::new();
    let calls_b = Arc::new(AtomicU64::new(0));
    let (cb, kb) = (calls_b.clone(), cancel_b.clone());
    let opts_b = ConvertOptions::default()
        .target(Target::parse("int8").unwrap())
        .control(
            Control::new()
                .with_cancel(cancel_b.clone())
                .with_progress(move |_| {
                    cb.fetch_add(1, Ordering::SeqCst);
                    kb.cancel();
                }),
        );
    let (out_a, out_b) = (d.path().join("a/q.safetensors"), d.path().join("b/out"));
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| convert(&input, &out_a, &opts_a));
        let tb = s.spawn(|| convert(&input, &out_b, &opts_b));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    // A finished, and its last report counts exactly its own bytes
    let summary = ra.expect("A completes");
    let seen = seen_a.lock().unwrap();
    let last = *seen.last().expect("A reported progress");
    assert_eq!(last.bytes_done, last.bytes_total, "{seen:?}");
    let plan_bytes: u64 = summary
        .plan
        .unwrap()
        .layers
        .iter()
        .map(|l| l.bytes_out)
        .sum();
    assert_eq!(last.bytes_total, plan_bytes);
    assert!(seen.windows(2).all(|w| w[0].bytes_done <= w[1].bytes_done));
    ckptkit::migrate::verify(&out_a).unwrap();
    assert_eq!(
        common::entries(&d.path().join("a")),
        ["q.safetensors", "quanto_qmap.json"]
    );
    // B stopped mid-way: interrupted, nothing left behind
    assert!(
        calls_b.load(Ordering::SeqCst) >= 1,
        "B was cancelled while running"
    );
    assert!(cancel_b.is_cancelled());
    let e = rb.expect_err("B was cancelled");
    assert!(matches!(e.kind(), ErrorKind::Interrupted), "{e}");
    assert!(
        common::entries(&d.path().join("b")).is_empty(),
        "{:?}",
        common::entries(&d.path().join("b"))
    );
    // the options can serve another call: fresh counters, the same handle
    let again = d.path().join("a/again.safetensors");
    let r = convert(&input, &again, &opts_b);
    assert!(matches!(r.unwrap_err().kind(), ErrorKind::Interrupted));
    assert!(!again.exists());
}

//! A conversion planned as jobs (`migrate plan`, `run-shard`, `finish`):
//! the result is `convert`'s byte for byte whatever the order the jobs run
//! in, jobs are idempotent, a killed job or finish leaves no output, and a
//! plan is refused when its input, its version or its staging directory
//! is not what it says.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cli::*;

/// A model directory: quanto's qint8 file with its map and a config that
/// names the quantization (so `finish` rewrites it as `convert` does).
fn model_dir(root: &Path) -> PathBuf {
    let d = root.join("in");
    std::fs::create_dir(&d).unwrap();
    for f in ["quantized.safetensors", "quanto_qmap.json"] {
        let to = if f == "quantized.safetensors" {
            "diffusion_pytorch_model.safetensors"
        } else {
            f
        };
        std::fs::copy(fx("bf16-qint8", f), d.join(to)).unwrap();
    }
    std::fs::write(
        d.join("config.json"),
        r#"{"_class_name": "Toy", "quantization_config": {"quant_method": "quanto", "weights": "int8"}}"#,
    )
    .unwrap();
    std::fs::write(d.join("README.md"), "a toy model\n").unwrap();
    d
}

/// Every file under `dir` by its path relative to `dir`, with its blake3.
fn tree(dir: &Path) -> Vec<(String, String)> {
    snapshot(dir)
        .into_iter()
        .map(|(p, h)| (p.strip_prefix(dir).unwrap().display().to_string(), h))
        .collect()
}

fn plan(args: &[&str], input: &Path, output: &Path, plan: &Path) {
    let mut a = vec!["plan", s(input), s(output), "--plan-file", s(plan), "-q"];
    a.extend_from_slice(args);
    run_ok(&a);
}

fn jobs_in(plan: &Path) -> usize {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(plan).unwrap()).unwrap();
    v["jobs"].as_array().unwrap().len()
}

/// The options most tests plan with (6 jobs).
const PLAIN_6000: [&str; 4] = ["--to", "plain", "--max-shard-size", "6000"];

/// The model directory under `root`, planned to `b` with [`PLAIN_6000`]:
/// `(input, b, plan)`.
fn planned(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let input = model_dir(root);
    let (b, p) = (root.join("b"), root.join("p.json"));
    plan(&PLAIN_6000, &input, &b, &p);
    (input, b, p)
}

/// `convert` of the model directory to `a`, and the same conversion planned
/// to `b` (6 jobs): `(a, b, plan, jobs)`.
fn converted_and_planned(root: &Path) -> (PathBuf, PathBuf, PathBuf, usize) {
    let (input, b, p) = planned(root);
    let a = root.join("a");
    let mut conv = vec!["convert", s(&input), s(&a), "-q"];
    conv.extend_from_slice(&PLAIN_6000);
    run_ok(&conv);
    let n = jobs_in(&p);
    assert_eq!(n, 6);
    (a, b, p, n)
}

#[test]
fn jobs_in_any_order_give_convert_s_directory_byte_for_byte() {
    let d = tempfile::tempdir().unwrap();
    let input = model_dir(d.path());
    for (i, args) in [
        // quanto -> plain: the config loses its quantization_config
        vec!["--to", "plain", "--max-shard-size", "6000"],
        // quanto -> int8:ct with a rename: a new side file set, a new config
        vec![
            "--to",
            "int8:ct",
            "--max-shard-size",
            "4000",
            "--rename",
            "^=transformer.",
        ],
        // one job
        vec!["--to", "plain:f32"],
    ]
    .into_iter()
    .enumerate()
    {
        let a = d.path().join(format!("a{i}"));
        let b = d.path().join(format!("b{i}"));
        let p = d.path().join(format!("plan{i}.json"));
        let mut conv = vec!["convert", s(&input), s(&a), "-q"];
        conv.extend_from_slice(&args);
        run_ok(&conv);
        plan(&args, &input, &b, &p);
        let n = jobs_in(&p);
        assert_eq!(
            n,
            std::fs::read_dir(&a)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .count(),
            "one job per output file"
        );
        assert!(i == 2 || n > 2, "{args:?} gives {n} jobs");
        // last job first
        for k in (0..n).rev() {
            run_ok(&["run-shard", s(&p), &k.to_string(), "-q"]);
        }
        assert!(!b.exists(), "nothing at the output before finish");
        run_ok(&["finish", s(&p), "-q"]);
        assert_eq!(tree(&a), tree(&b), "{args:?}");
        assert!(tree(&b).iter().any(|(f, _)| f == "config.json"));
        assert_eq!(
            entries(d.path())
                .iter()
                .filter(|e| e.contains("ckptkit-jobs"))
                .count(),
            0
        );
    }
}

#[test]
fn a_job_whose_record_matches_its_file_is_not_run_again_and_a_damaged_one_is() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, p, n) = converted_and_planned(d.path());
    for k in 0..n {
        run_ok(&["run-shard", s(&p), &k.to_string()]);
    }
    let staging = d.path().join(".b.ckptkit-jobs");
    let shard = staging.join("diffusion_pytorch_model-00001-of-00006.safetensors");
    let before = std::fs::metadata(&shard).unwrap();
    let o = run_ok(&["run-shard", s(&p), "0", "--json"]);
    let r: serde_json::Value = serde_json::from_str(out(&o).trim()).unwrap();
    assert_eq!(r["already_done"], true, "{}", out(&o));
    let after = std::fs::metadata(&shard).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (before.ino(), before.mtime_nsec()),
        (after.ino(), after.mtime_nsec())
    );
    // a byte of a finished job's file flipped: finish refuses it by name ...
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, &bytes).unwrap();
    let o = run(&["finish", s(&p)]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(
        err(&o).contains("1 of 6 job(s) not done")
            && err(&o).contains("0 (diffusion_pytorch_model-00001-of-00006"),
        "{}",
        err(&o)
    );
    assert!(!b.exists());
    // ... and running the job again rewrites it
    let o = run_ok(&["run-shard", s(&p), "0"]);
    assert!(out(&o).contains("written"), "{}", out(&o));
    run_ok(&["finish", s(&p), "-q"]);
    assert_eq!(tree(&a), tree(&b));
}

#[test]
fn jobs_started_at_the_same_moment_all_run() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, p, n) = converted_and_planned(d.path());
    // every job is a first job here: the staging directory and its plan id
    // are created by whichever comes first, and the others use them
    let children: Vec<_> = (0..n)
        .map(|k| {
            Command::new(bin())
                .args(["run-shard", s(&p), &k.to_string(), "-q"])
                .current_dir(root())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    run_ok(&["finish", s(&p), "-q"]);
    assert_eq!(tree(&a), tree(&b));
}

/// Starts `migrate` with the fault point `point` set; returns once
/// `ready()` holds and the process has had time to stop there.
fn stopped_at(point: &str, args: &[&str], ready: impl Fn() -> bool) -> std::process::Child {
    let c = Command::new(bin())
        .args(args)
        .current_dir(root())
        .env("CKPTKIT_FAULT", point)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !ready() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "never reached {point}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // what `ready` sees appears just before the process stops
    std::thread::sleep(Duration::from_millis(300));
    c
}

#[test]
fn a_killed_job_or_finish_leaves_no_output_and_running_again_completes_it() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, p, n) = converted_and_planned(d.path());
    let staging = d.path().join(".b.ckptkit-jobs");
    // job 2 killed after its file is written, before its record
    let mut c = stopped_at("job-before-record", &["run-shard", s(&p), "2"], || {
        staging
            .join("diffusion_pytorch_model-00003-of-00006.safetensors")
            .exists()
    });
    c.kill().unwrap();
    c.wait().unwrap();
    assert!(!staging
        .join("diffusion_pytorch_model-00003-of-00006.safetensors.done.json")
        .exists());
    for k in (0..n).filter(|&k| k != 2) {
        run_ok(&["run-shard", s(&p), &k.to_string(), "-q"]);
    }
    let o = run(&["finish", s(&p)]);
    assert_eq!(code(&o), 1);
    assert!(
        err(&o).contains("2 (diffusion_pytorch_model-00003-of-00006.safetensors)"),
        "{}",
        err(&o)
    );
    run_ok(&["run-shard", s(&p), "2", "-q"]);
    // finish killed just before its directory is put in place
    let parent_before = entries(d.path());
    let mut c = stopped_at("dir-before-swap", &["finish", s(&p)], || {
        entries(d.path())
            .iter()
            .any(|e| e.starts_with(".b.ckptkit-tmp."))
    });
    c.kill().unwrap();
    c.wait().unwrap();
    assert!(!b.exists(), "a killed finish commits nothing");
    assert!(parent_before.iter().all(|e| d.path().join(e).exists()));
    run_ok(&["finish", s(&p), "-q"]);
    assert_eq!(tree(&a), tree(&b));
    assert!(!staging.exists());
}

#[test]
fn an_input_changed_since_the_plan_is_refused_by_its_pin() {
    let d = tempfile::tempdir().unwrap();
    let (input, b, p) = planned(d.path());
    let w = input.join("diffusion_pytorch_model.safetensors");
    // same size, one header byte changed (a metadata value)
    let mut bytes = std::fs::read(&w).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let at = bytes[8..8 + n]
        .windows(4)
        .position(|x| x == b"\"pt\"")
        .map(|i| i + 9)
        .expect("a format entry");
    bytes[at] = b'q';
    std::fs::write(&w, &bytes).unwrap();
    let o = run(&["run-shard", s(&p), "0"]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(
        err(&o).contains("changed since the plan") && err(&o).contains("plan again"),
        "{}",
        err(&o)
    );
    // a file grown
    bytes.push(0);
    std::fs::write(&w, &bytes).unwrap();
    let o = run(&["run-shard", s(&p), "1"]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(err(&o).contains("changed since the plan"), "{}", err(&o));
    assert!(!b.exists());
}

#[test]
fn a_plan_of_another_version_or_another_plan_s_staging_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (input, b, p) = planned(d.path());
    // the plan file is not replaced without --force
    let o = run(&[
        "plan",
        s(&input),
        s(&b),
        "--to",
        "plain",
        "--plan-file",
        s(&p),
    ]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(err(&o).contains("exists"), "{}", err(&o));
    let text = std::fs::read_to_string(&p).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut old = v.clone();
    old["ckptkit"] = "0.0.1".into();
    let po = d.path().join("old.json");
    std::fs::write(&po, serde_json::to_string(&old).unwrap()).unwrap();
    let o = run(&["run-shard", s(&po), "0"]);
    assert_eq!(code(&o), 1);
    assert!(
        err(&o).contains("written by ckptkit \"0.0.1\"") && err(&o).contains("plan again"),
        "{}",
        err(&o)
    );
    let mut other = v.clone();
    other["format"] = "something-else".into();
    std::fs::write(&po, serde_json::to_string(&other).unwrap()).unwrap();
    let o = run(&["finish", s(&po)]);
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("not a ckptkit plan file"), "{}", err(&o));
    let mut escape = v.clone();
    escape["jobs"][0]["shard"] = "../escape.safetensors".into();
    std::fs::write(&po, serde_json::to_string(&escape).unwrap()).unwrap();
    let o = run(&["run-shard", s(&po), "0"]);
    assert_eq!(code(&o), 1);
    assert!(
        err(&o).contains("not a plain .safetensors file name"),
        "{}",
        err(&o)
    );
    // jobs of a second plan of the same output do not mix with the first's
    run_ok(&["run-shard", s(&p), "0", "-q"]);
    let p2 = d.path().join("p2.json");
    plan(
        &["--to", "plain:f32", "--max-shard-size", "6000"],
        &input,
        &b,
        &p2,
    );
    let o = run(&["run-shard", s(&p2), "0"]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(
        err(&o).contains("holds the jobs of another plan"),
        "{}",
        err(&o)
    );
    // finishing needs every job, whose files the first plan's staging holds
    let o = run(&["finish", s(&p)]);
    assert_eq!(code(&o), 1);
    assert!(!b.exists());
}

#[test]
fn what_a_plan_cannot_do_is_refused_before_anything_is_written() {
    let d = tempfile::tempdir().unwrap();
    let input = model_dir(d.path());
    let p = d.path().join("p.json");
    for (args, says) in [
        (
            vec![s(&input), "out.safetensors", "--to", "plain"],
            "a plan writes a directory",
        ),
        (
            vec![s(&input), "b", "--to", "plain", "--dry-run"],
            "drop --dry-run",
        ),
    ] {
        let mut a = vec!["plan"];
        a.extend(args);
        a.extend(["--plan-file", s(&p)]);
        let o = run(&a);
        assert_ne!(code(&o), 0);
        assert!(err(&o).contains(says), "{a:?}: {}", err(&o));
        assert!(!p.exists());
    }
}

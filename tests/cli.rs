//! The `migrate` binary as a user meets it: every subcommand, every input
//! and output kind, the failure paths, exit codes, messages, and that no
//! partial output is ever left behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::cli::*;

/// `float.safetensors` of a quanto fixture quantized to qint8 as a sharded
/// directory (several files, an index, the qmap).
fn sharded_qint8(dir: &Path) -> PathBuf {
    let sharded = dir.join("sharded");
    run_ok(&[
        "convert",
        s(&fx("bf16-qint8", "float.safetensors")),
        s(&sharded),
        "--to",
        "quanto:qint8",
        "--max-shard-size",
        "4000",
    ]);
    sharded
}

#[test]
fn help_shows_everyday_examples() {
    let o = run(&["--help"]);
    assert_eq!(code(&o), 0);
    let t = out(&o);
    assert!(
        t.contains("Examples") && t.contains("convert") && t.contains("--compress zstd"),
        "{t}"
    );
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(code(&run(&["frobnicate"])), 2);
    assert_eq!(code(&run(&["convert", "a"])), 2);
    let d = tempfile::tempdir().unwrap();
    let o = run(&[
        "convert",
        s(&fx("bf16-qint8", "float.safetensors")),
        s(&d.path().join("x.safetensors")),
        "--to",
        "quanto:qint3",
    ]);
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert!(err(&o).contains("unknown target"), "{}", err(&o));
    assert!(entries(d.path()).is_empty());
}

#[test]
fn inspect_lists_quanto_layers_text_and_json() {
    // without a shape hint the one bias-less packed layer is read flat:
    // its values are known, its shape is not, and inspect says so
    let o = run_ok(&["inspect", s(&fx("bf16-qint4", "quantized.safetensors"))]);
    let line = out(&o)
        .lines()
        .find(|l| l.starts_with("lin_nobias "))
        .map(String::from)
        .unwrap_or_default();
    assert!(
        line.contains("quanto qint4 (logical shape unknown)") && !out(&o).contains("problem"),
        "{}",
        out(&o)
    );
    let o = run_ok(&[
        "inspect",
        s(&fx("bf16-qint4", "quantized.safetensors")),
        "--shapes-from",
        s(&fx("bf16-qint4", "float.safetensors")),
    ]);
    assert!(out(&o).contains("quanto qint4 group 128"), "{}", out(&o));
    let o = run(&[
        "inspect",
        "--json",
        s(&fx("bf16-qint8", "quantized.safetensors")),
    ]);
    assert_eq!(code(&o), 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["layout"] == "quanto qint8"));
}

#[test]
fn dequantize_file_to_file_and_refuse_existing_output() {
    let d = tempfile::tempdir().unwrap();
    let dst = d.path().join("plain.safetensors");
    let o = run_ok(&[
        "convert",
        s(&fx("bf16-qint8", "quantized.safetensors")),
        s(&dst),
        "--to",
        "plain",
    ]);
    // dequantized values are exactly quanto's: "exact", not "lossy"
    assert!(
        out(&o).contains("exact (not byte-reversible)") && !out(&o).contains("lossy"),
        "{}",
        out(&o)
    );
    assert_eq!(
        entries(d.path()),
        vec!["plain.safetensors"],
        "no qmap for a plain output, no temporaries"
    );
    let before = std::fs::read(&dst).unwrap();
    // existing output: refused, untouched
    let o = run(&[
        "convert",
        s(&fx("bf16-qint8", "quantized.safetensors")),
        s(&dst),
        "--to",
        "plain:f32",
    ]);
    assert_eq!(code(&o), 1);
    assert!(
        err(&o).contains("already exists") && err(&o).contains("--force"),
        "{}",
        err(&o)
    );
    assert_eq!(std::fs::read(&dst).unwrap(), before);
    // --force replaces it
    run_ok(&[
        "convert",
        s(&fx("bf16-qint8", "quantized.safetensors")),
        s(&dst),
        "--to",
        "plain:f32",
        "--force",
    ]);
    assert_ne!(std::fs::read(&dst).unwrap(), before);
    assert_eq!(entries(d.path()), vec!["plain.safetensors"]);
}

#[test]
fn quantize_writes_qmap_companion() {
    let d = tempfile::tempdir().unwrap();
    let dst = d.path().join("q.safetensors");
    run_ok(&[
        "convert",
        s(&fx("bf16-qint8", "float.safetensors")),
        s(&dst),
        "--to",
        "quanto:qint4",
        "--exclude",
        "lin_excluded",
    ]);
    assert_eq!(entries(d.path()), vec!["q.safetensors", "quanto_qmap.json"]);
    let q: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("quanto_qmap.json")).unwrap())
            .unwrap();
    assert_eq!(q["lin_g128"]["weights"], "qint4");
    assert!(q.get("lin_excluded").is_none());
    // dry run writes nothing and shows the plan
    let d2 = tempfile::tempdir().unwrap();
    let o = run(&[
        "convert",
        s(&fx("bf16-qint8", "float.safetensors")),
        s(&d2.path().join("q.safetensors")),
        "--to",
        "quanto:qint8",
        "--dry-run",
    ]);
    assert_eq!(code(&o), 0);
    assert!(out(&o).contains("quantize"), "{}", out(&o));
    assert!(entries(d2.path()).is_empty());
}

#[test]
fn ambiguous_qint4_without_map_is_refused_with_the_hint() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("in");
    std::fs::create_dir(&input).unwrap();
    std::fs::copy(
        fx("bf16-qint4", "quantized.safetensors"),
        input.join("model.safetensors"),
    )
    .unwrap();
    let outp = d.path().join("out.safetensors");
    let o = run(&[
        "convert",
        s(&input.join("model.safetensors")),
        s(&outp),
        "--to",
        "plain",
    ]);
    assert_eq!(code(&o), 1);
    let e = err(&o);
    // without the map a single-row packed layer may be qint4 or qint2 (a
    // bias-less one is read flat, its qtype told by its shapes)
    assert!(
        e.contains("lin_o1") && e.contains("--qmap") && e.contains("--shapes-from"),
        "{e}"
    );
    assert!(!outp.exists());
    // with the hint it works
    run_ok(&[
        "convert",
        s(&input.join("model.safetensors")),
        s(&outp),
        "--to",
        "plain",
        "--qmap",
        s(&fx("bf16-qint4", "quanto_qmap.json")),
        "--shapes-from",
        s(&fx("bf16-qint4", "float.safetensors")),
    ]);
}

#[test]
fn truncated_input_fails_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let b = std::fs::read(fx("bf16-qint8", "float.safetensors")).unwrap();
    let t = d.path().join("t.safetensors");
    std::fs::write(&t, &b[..b.len() - 10]).unwrap();
    let o = run(&["convert", s(&t), s(&d.path().join("o.ckpk"))]);
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("truncated"), "{}", err(&o));
    assert!(!err(&o).contains("panicked"));
    assert_eq!(entries(d.path()), vec!["t.safetensors"]);
    assert_eq!(code(&run(&["verify", s(&t)])), 1);
}

#[test]
fn container_pack_verify_corrupt_unpack() {
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("m.ckpk");
    run_ok(&[
        "convert",
        s(&fx("bf16-qint8", "quantized.safetensors")),
        s(&ck),
        "--compress",
        "zstd:3",
    ]);
    assert_eq!(code(&run(&["verify", s(&ck)])), 0);
    let o = run(&["inspect", s(&ck)]);
    assert!(out(&o).contains("quanto qint8"), "{}", out(&o));
    // unpack to a sharded directory and to a file; tensors identical
    let back = d.path().join("back.safetensors");
    assert_eq!(code(&run(&["convert", s(&ck), s(&back)])), 0);
    let a = ckptkit::SafetensorsFile::open(&back).unwrap();
    let b = ckptkit::SafetensorsFile::open(&fx("bf16-qint8", "quantized.safetensors")).unwrap();
    use ckptkit::TensorSource;
    for t in b.tensors() {
        assert_eq!(&a.read(&t.key).unwrap()[..], &b.read(&t.key).unwrap()[..]);
    }
    // corrupt one byte in the middle: verify fails, convert fails, no output
    let mut bytes = std::fs::read(&ck).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    let bad = d.path().join("bad.ckpk");
    std::fs::write(&bad, &bytes).unwrap();
    let o = run(&["verify", s(&bad)]);
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("bad.ckpk"), "{}", err(&o));
    let elsewhere = tempfile::tempdir().unwrap();
    let o = run(&[
        "convert",
        s(&bad),
        s(&elsewhere.path().join("x.safetensors")),
    ]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(entries(elsewhere.path()).is_empty());
    assert!(!entries(d.path()).iter().any(|e| e.contains("ckptkit-tmp")));
}

#[test]
fn sharded_directory_in_and_out() {
    let d = tempfile::tempdir().unwrap();
    let sharded = sharded_qint8(d.path());
    let names = entries(&sharded);
    assert!(
        names.contains(&"model.safetensors.index.json".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"quanto_qmap.json".to_string()));
    assert!(
        names.iter().filter(|n| n.ends_with(".safetensors")).count() > 1,
        "{names:?}"
    );
    // the directory reads back, keep into a container and to one file
    let ck = d.path().join("s.ckpk");
    assert_eq!(code(&run(&["convert", s(&sharded), s(&ck)])), 0);
    let c = ckptkit::Container::open(&ck).unwrap();
    assert!(c.manifest().shards.len() > 1);
    let one = d.path().join("one.safetensors");
    run_ok(&["convert", s(&ck), s(&one), "--to", "plain"]);
}

#[test]
fn output_may_not_be_or_lie_inside_input() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("ckpt");
    std::fs::create_dir(&input).unwrap();
    std::fs::copy(
        fx("bf16-qint8", "float.safetensors"),
        input.join("model.safetensors"),
    )
    .unwrap();
    // a usage error: exit 2
    let o = run(&["convert", s(&input), s(&input.join("inner.safetensors"))]);
    assert_eq!(code(&o), 2);
    assert!(err(&o).contains("inside"), "{}", err(&o));
    let f = input.join("model.safetensors");
    let o = run(&["convert", s(&f), s(&f), "--force"]);
    assert_eq!(code(&o), 2);
    assert_eq!(entries(&input), vec!["model.safetensors"]);
}

#[test]
fn unwritable_output_location() {
    let d = tempfile::tempdir().unwrap();
    // a file where a directory is expected (root bypasses permission bits)
    std::fs::write(d.path().join("file"), b"x").unwrap();
    let o = run(&[
        "convert",
        s(&fx("bf16-qint8", "float.safetensors")),
        s(&d.path().join("file/sub/o.safetensors")),
    ]);
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("not a directory"), "{}", err(&o));
    assert_eq!(entries(d.path()), vec!["file"]);
    // missing directories are created, and removed again when the
    // conversion fails
    let o = run(&[
        "convert",
        s(&fx("bf16-qint4", "quantized.safetensors")),
        s(&d.path().join("new/dir/o.safetensors")),
        "--to",
        "plain",
        "--qmap",
        "/nonexistent/quanto_qmap.json",
    ]);
    assert_eq!(code(&o), 1);
    assert_eq!(entries(d.path()), vec!["file"]);
    run_ok(&[
        "convert",
        s(&fx("bf16-qint8", "float.safetensors")),
        s(&d.path().join("new/dir/o.safetensors")),
    ]);
    assert_eq!(entries(&d.path().join("new/dir")), vec!["o.safetensors"]);
}

#[test]
fn check_reports_mismatch_and_fix() {
    let o = run(&[
        "check",
        s(&fx("bf16-qint8", "float.safetensors")),
        "--against",
        s(&fx("bf16-qint8", "quanto_qmap.json")),
    ]);
    assert_eq!(code(&o), 1);
    let t = out(&o);
    assert!(t.contains("`lin_g128`: checkpoint has plain BF16 `weight`; expected quanto qint8 `weight._data` + `weight._scale`"), "{t}");
    assert!(t.contains("migrate convert") && t.contains("--like"), "{t}");
    let o = run(&[
        "check",
        s(&fx("bf16-qint8", "quantized.safetensors")),
        "--against",
        s(&fx("bf16-qint8", "quantized.safetensors")),
    ]);
    assert_eq!(code(&o), 0, "{}", out(&o));
    let o = run(&[
        "check",
        "/nonexistent.safetensors",
        "--against",
        s(&fx("bf16-qint8", "quanto_qmap.json")),
    ]);
    assert_eq!(code(&o), 2);
}

#[test]
fn readme_quickstart_runs_as_written() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let block = readme
        .split("<!-- quickstart -->")
        .nth(1)
        .and_then(|r| r.split("<!-- /quickstart -->").next())
        .expect("quickstart block");
    let prefix = "cargo run --release --example migrate -- ";
    let mut n = 0;
    for line in block.lines().filter(|l| l.starts_with(prefix)) {
        let args: Vec<&str> = line[prefix.len()..].split_whitespace().collect();
        let o = run(&args);
        // `check` exits 1 when it finds the mismatch it is shown for
        let ok = if args[0] == "check" {
            code(&o) == 1
        } else {
            code(&o) == 0
        };
        assert!(ok, "`{line}` exited {}: {}{}", code(&o), out(&o), err(&o));
        n += 1;
    }
    assert!(n >= 8, "quick start has {n} commands");
    let main_job = readme
        .lines()
        .find(|l| l.starts_with(prefix) && l.contains("--to plain --force"))
        .unwrap();
    let args: Vec<&str> = main_job[prefix.len()..].split_whitespace().collect();
    assert_eq!(code(&run(&args)), 0);
}

#[test]
fn training_checkpoint_directory_is_migrated_and_the_rest_copied() {
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("checkpoint-4000");
    let tr = ck.join("transformer");
    std::fs::create_dir_all(&tr).unwrap();
    std::fs::copy(
        fx("bf16-qint8", "quantized.safetensors"),
        tr.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        fx("bf16-qint8", "quanto_qmap.json"),
        tr.join("quanto_qmap.json"),
    )
    .unwrap();
    std::fs::write(
        tr.join("config.json"),
        r#"{"_class_name": "FluxTransformer2DModel", "quantization_config": {"quant_method": "quanto", "weights_dtype": "int8"}}"#,
    )
    .unwrap();
    std::fs::copy(
        fx("bf16-qint8", "float.safetensors"),
        ck.join("pytorch_lora_weights.safetensors"),
    )
    .unwrap();
    for (n, b) in [
        ("optimizer.bin", &b"opt"[..]),
        ("scheduler.bin", b"sch"),
        ("random_states_0.pkl", b"rng"),
        ("training_state.json", b"{\"step\": 4000}"),
    ] {
        std::fs::write(ck.join(n), b).unwrap();
    }
    let out = d.path().join("checkpoint-4000-plain");
    let o = run(&["convert", s(&ck), s(&out), "--to", "plain"]);
    assert_eq!(code(&o), 0, "{}{}", out_s(&o), err(&o));
    // every other file byte for byte
    for n in [
        "optimizer.bin",
        "scheduler.bin",
        "random_states_0.pkl",
        "training_state.json",
        "pytorch_lora_weights.safetensors",
    ] {
        assert_eq!(
            std::fs::read(ck.join(n)).unwrap(),
            std::fs::read(out.join(n)).unwrap(),
            "{n}"
        );
    }
    // the transformer is plain now, without qmap, and its config says so
    assert_eq!(
        entries(&out.join("transformer")),
        vec!["config.json", "diffusion_pytorch_model.safetensors"]
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("transformer/config.json")).unwrap(),
    )
    .unwrap();
    assert!(cfg.get("quantization_config").is_none(), "{cfg}");
    assert_eq!(cfg["_class_name"], "FluxTransformer2DModel");
    let m = ckptkit::SafetensorsFile::open(
        &out.join("transformer/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    use ckptkit::TensorSource;
    assert!(m.get("lin_g128.weight").is_some() && m.get("lin_g128.weight._data").is_none());
    // and back to quanto qint8: diffusers-style config and the qmap reappear
    let back = d.path().join("checkpoint-4000-q8");
    run_ok(&[
        "convert",
        s(&out),
        s(&back),
        "--to",
        "quanto:qint8",
        "--exclude",
        "lin_excluded",
    ]);
    assert!(back.join("transformer/quanto_qmap.json").is_file());
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(back.join("transformer/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["quantization_config"]["weights_dtype"], "int8");
    // input untouched
    assert!(tr.join("quanto_qmap.json").is_file());
}

fn out_s(o: &Output) -> String {
    out(o)
}

/// The data offset of `key` in a safetensors file (header length + start).
fn data_offset(path: &Path, key: &str) -> usize {
    let f = ckptkit::SafetensorsFile::open(path).unwrap();
    let h = f.header();
    (h.header_len + h.get(key).unwrap().start) as usize
}

#[test]
fn safetensors_outputs_carry_hashes_that_verify_checks() {
    use ckptkit::TensorSource;
    let d = tempfile::tempdir().unwrap();
    // a directory output (sharded) and a file output, both hashed
    let sharded = sharded_qint8(d.path());
    let o = run_ok(&["verify", s(&sharded), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    let n = ckptkit::open_source(&sharded).unwrap().tensors().len() as u64;
    assert_eq!(
        v["tensors"], n,
        "every tensor of every shard is hash-checked"
    );
    assert_eq!(v["unchecked"], 0);

    let file = d.path().join("plain.safetensors");
    run_ok(&[
        "convert",
        s(&fx("bf16-qint8", "quantized.safetensors")),
        s(&file),
        "--to",
        "plain",
    ]);
    let o = run_ok(&["verify", s(&file)]);
    assert!(out(&o).contains("verified (blake3)"), "{}", out(&o));

    // one flipped bit in one tensor's data: verify fails naming tensor and offset
    let key = "lin_i128.weight";
    let off = data_offset(&file, key);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[off + 3] ^= 0x10;
    let bad = d.path().join("bad.safetensors");
    std::fs::write(&bad, &bytes).unwrap();
    let o = run(&["verify", s(&bad)]);
    assert_eq!(code(&o), 1);
    let e = err(&o);
    assert!(
        e.contains("integrity check failed") && e.contains(key) && e.contains(&off.to_string()),
        "{e}"
    );
    // converting the corrupted file fails like verify, with no output
    let re = d.path().join("re.safetensors");
    let o = run(&["convert", s(&bad), s(&re)]);
    assert_eq!(code(&o), 1);
    assert!(
        err(&o).contains("integrity check failed") && err(&o).contains(key),
        "{}",
        err(&o)
    );
    assert!(!re.exists());
    // unless the user opts out; the new output's hashes describe the new bytes
    let o = run_ok(&["convert", s(&bad), s(&re), "--no-verify-input", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v["input_verified"], false);
    assert_eq!(code(&run(&["verify", s(&re)])), 0);

    // a file not written by ckptkit: structure only, said so
    let o = run_ok(&["verify", s(&fx("bf16-qint8", "quantized.safetensors"))]);
    assert!(out(&o).contains("carry no recorded hash"), "{}", out(&o));

    // --no-hashes: no entry, structure only
    let nh = d.path().join("nh.safetensors");
    run_ok(&[
        "convert",
        s(&fx("bf16-qint8", "quantized.safetensors")),
        s(&nh),
        "--to",
        "plain",
        "--no-hashes",
    ]);
    let f = ckptkit::SafetensorsFile::open(&nh).unwrap();
    assert!(!f.header().metadata.contains_key("ckptkit.blake3"));
    // same tensors either way
    let g = ckptkit::SafetensorsFile::open(&file).unwrap();
    for t in &f.header().tensors {
        assert_eq!(
            &f.read(&t.key).unwrap()[..],
            &g.read(&t.key).unwrap()[..],
            "{}",
            t.key
        );
    }
}

#[test]
fn interrupted_weights_and_qmap_commit_is_refused_then_completed_by_recover() {
    // The state a crash leaves between the renames of a weights file and its
    // quanto_qmap.json: new temporaries and a durable journal, the old pair
    // still in place. Readers (verify included) must refuse the file and
    // change nothing; `recover` rolls forward.
    let d = tempfile::tempdir().unwrap();
    let w = d.path().join("model.safetensors");
    let q = d.path().join("quanto_qmap.json");
    let src = fx("bf16-qint8", "float.safetensors");
    assert_eq!(
        code(&run(&["convert", s(&src), s(&w), "--to", "quanto:qint8"])),
        0
    );
    let newer = tempfile::tempdir().unwrap();
    let nw = newer.path().join("model.safetensors");
    assert_eq!(
        code(&run(&["convert", s(&src), s(&nw), "--to", "quanto:qint4"])),
        0
    );
    let tw = d.path().join(".model.safetensors.ckptkit-tmp.999999999.1");
    let tq = d.path().join(".quanto_qmap.json.ckptkit-tmp.999999999.2");
    std::fs::copy(&nw, &tw).unwrap();
    std::fs::copy(newer.path().join("quanto_qmap.json"), &tq).unwrap();
    let journal = d.path().join(".model.safetensors.ckptkit-commit");
    std::fs::write(
        &journal,
        serde_json::json!({"version": 1, "renames": [
            [tw.file_name().unwrap().to_str().unwrap(), "model.safetensors"],
            [tq.file_name().unwrap().to_str().unwrap(), "quanto_qmap.json"]]})
        .to_string(),
    )
    .unwrap();
    let before = entries(d.path());
    for cmd in [
        &["inspect", s(&w)][..],
        &["verify", s(&w)],
        &["check", s(&w), "--against", s(&src)],
    ] {
        let o = run(cmd);
        assert_ne!(code(&o), 0, "{cmd:?}");
        assert!(
            err(&o).contains("interrupted ckptkit commit") && err(&o).contains("migrate recover"),
            "{cmd:?}: {}",
            err(&o)
        );
        assert_eq!(entries(d.path()), before, "{cmd:?} is read-only");
    }
    let o = run_ok(&["recover", s(&w)]);
    assert!(out(&o).contains("1 commit(s) completed"), "{}", out(&o));
    assert_eq!(std::fs::read(&w).unwrap(), std::fs::read(&nw).unwrap());
    assert!(std::fs::read_to_string(&q).unwrap().contains("qint4"));
    assert_eq!(
        entries(d.path()),
        vec!["model.safetensors", "quanto_qmap.json"]
    );
    run_ok(&["inspect", s(&w)]);
}

/// Names of a sibling of `p`'s (temporaries included) that mention `stem`.
fn siblings_named(dir: &Path, stem: &str) -> Vec<String> {
    entries(dir)
        .into_iter()
        .filter(|n| n.contains(stem))
        .collect()
}

#[test]
fn ctrl_c_and_sigterm_leave_no_partial_output() {
    // A checkpoint large enough that quantizing it takes seconds in this
    // build: 96 layers of bf16 [1024, 1024] (192 MiB).
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("big.safetensors");
    let synth = bin().with_file_name("synth");
    let o = Command::new(&synth)
        .args([s(&input), "0.2", "plain-bf16", "1024", "1024"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", err(&o));
    for (signal, output) in [
        (libc::SIGINT, d.path().join("out.safetensors")),
        (libc::SIGTERM, d.path().join("outdir")),
    ] {
        let stem = output.file_name().unwrap().to_str().unwrap().to_string();
        let child = Command::new(bin())
            .args([
                "-q",
                "convert",
                s(&input),
                s(&output),
                "--to",
                "quanto:qint8",
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // wait until the output's temporary exists: the conversion is running
        let t0 = std::time::Instant::now();
        while siblings_named(d.path(), &stem).is_empty() {
            assert!(t0.elapsed().as_secs() < 60, "no temporary appeared");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let o = child.wait_with_output().unwrap();
        assert_eq!(
            code(&o),
            1,
            "signal {signal}: the conversion must stop, not finish: {}",
            err(&o)
        );
        assert!(err(&o).contains("interrupted"), "{}", err(&o));
        assert!(
            siblings_named(d.path(), &stem).is_empty(),
            "signal {signal}: left {:?}",
            entries(d.path())
        );
        assert!(!d.path().join("quanto_qmap.json").exists());
    }
    // the input is untouched
    run_ok(&["verify", s(&input), "--json"]);
    assert_eq!(entries(d.path()), vec!["big.safetensors"]);
}

/// The user int8 descriptors of issue 10 items 6 and 17, as the CLI user
/// meets them: a preset's name and a wrapped constant are refused before
/// anything is written; a layout whose keys collide is refused by the
/// planner, naming both tensors; a safetensors file written with a user
/// layout converts back to plain by dequantizing, byte for byte as the
/// container route does.
#[test]
fn int8_user_descriptors_from_the_command_line() {
    let d = tempfile::tempdir().unwrap();
    let float = fx("bf16-qint8", "float.safetensors");
    let desc = |name: &str, payload: &str, divisor: &str, constant: i64| {
        let p = d.path().join(format!("{name}.json").replace(':', "_"));
        std::fs::write(
            &p,
            format!(
                r#"{{"name":"{name}","payload":{{"key":"{payload}","storage":"i8"}},
                "scale":{{"key":"qscale","dtype":"F32","granularity":"channel","value":{{"absmax_over":{divisor}}},"shape":"vector"}},
                "range":[-127,127],"rounding":"half_even","divisor":{divisor},
                "constants":[{{"key":"qversion","dtype":"U8","shape":[],"values":[{constant}]}}]}}"#
            ),
        )
        .unwrap();
        format!("int8:{}", p.display())
    };
    let od = d.path().join("out");
    std::fs::create_dir(&od).unwrap();
    let convert = |to: &str, input: &Path, name: &str| {
        run(&["convert", s(input), s(&od.join(name)), "--to", to])
    };
    // a preset's name with another divisor
    let o = convert(
        &desc("int8:bnb", "weight", "63.5", 0),
        &float,
        "a.safetensors",
    );
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert!(
        err(&o).contains("differs from the built-in preset") && err(&o).contains("my-int8-bnb"),
        "{}",
        err(&o)
    );
    // a constant that does not fit its dtype
    let o = convert(
        &desc("mine", "qweight", "127", 300),
        &float,
        "a.safetensors",
    );
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert!(err(&o).contains("300 does not fit U8"), "{}", err(&o));
    // a payload stored under the layer's bias key
    let o = convert(&desc("mine", "bias", "127", 3), &float, "a.safetensors");
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(
        err(&o).contains("two tensors would be named `lin_after_ln.bias`"),
        "{}",
        err(&o)
    );
    assert!(entries(&od).is_empty(), "{:?}", entries(&od));
    // safetensors → plain dequantizes, like the container
    let mine = desc("mine", "qweight", "127", 3);
    run_ok(&[
        "convert",
        s(&float),
        s(&od.join("q.safetensors")),
        "--to",
        &mine,
    ]);
    run_ok(&["convert", s(&float), s(&od.join("q.ckpk")), "--to", &mine]);
    let o = run_ok(&[
        "convert",
        s(&od.join("q.safetensors")),
        s(&od.join("p1.safetensors")),
        "--to",
        "plain",
    ]);
    assert!(
        out(&o).contains("mine -> plain BF16") && !out(&o).contains("all lossless"),
        "{}",
        out(&o)
    );
    run_ok(&[
        "convert",
        s(&od.join("q.ckpk")),
        s(&od.join("p2.safetensors")),
        "--to",
        "plain",
    ]);
    assert_eq!(
        std::fs::read(od.join("p1.safetensors")).unwrap(),
        std::fs::read(od.join("p2.safetensors")).unwrap()
    );
    let o = run_ok(&["inspect", s(&od.join("q.safetensors"))]);
    assert!(out(&o).contains("mine"), "{}", out(&o));
}

/// The command line as a library function (`ckptkit::cli::run`, what the
/// Python package's console script calls): the binary's exit codes, in
/// process, with the caller's cancellation handle and no signal handler.
#[test]
fn the_command_line_runs_in_process_with_the_callers_cancel_handle() {
    use ckptkit::Cancel;
    use std::process::ExitCode;
    let fixture = fx("bf16-qint8", "quantized.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str], cancel: Cancel| {
        let mut v = vec!["migrate"];
        v.extend_from_slice(args);
        ckptkit::cli::run(v, cancel)
    };
    assert_eq!(
        run(&["verify", s(&fixture), "-q"], Cancel::new()),
        ExitCode::SUCCESS
    );
    assert_eq!(run(&["convert"], Cancel::new()), ExitCode::from(2));
    assert_eq!(
        run(&["verify", "/nonexistent.safetensors", "-q"], Cancel::new()),
        ExitCode::from(1)
    );
    // a conversion whose handle is already cancelled stops, leaving nothing
    let out = tmp.path().join("plain.safetensors");
    let c = Cancel::new();
    c.cancel();
    assert_eq!(
        run(&["convert", s(&fixture), s(&out), "--to", "plain", "-q"], c),
        ExitCode::from(1)
    );
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    // and with a live handle it converts
    assert_eq!(
        run(
            &["convert", s(&fixture), s(&out), "--to", "plain", "-q"],
            Cancel::new()
        ),
        ExitCode::SUCCESS
    );
    assert!(out.exists());
}

/// `convert --only GLOB` writes the matching layers and nothing else.
#[test]
fn only_writes_the_matching_layers() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("sub.safetensors");
    let o = run(&[
        "convert",
        s(&fx("bf16-qint8", "quantized.safetensors")),
        s(&out),
        "--to",
        "plain",
        "--only",
        "lin_g*",
        "--shapes-from",
        s(&fx("bf16-qint8", "float.safetensors")),
    ]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    use ckptkit::TensorSource;
    let f = ckptkit::SafetensorsFile::open(&out).unwrap();
    let mut keys: Vec<&str> = f.tensors().iter().map(|t| t.key.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "lin_g128.bias",
            "lin_g128.weight",
            "lin_g64.bias",
            "lin_g64.weight",
            "lin_g96.bias",
            "lin_g96.weight"
        ]
    );
}

/// Without the `remote` feature a URL input is refused with how to get it,
/// not read as a local path.
#[cfg(not(feature = "remote"))]
#[test]
fn a_url_input_without_the_remote_feature_says_how_to_build_it() {
    for cmd in [
        vec!["inspect", "s3://bucket/model.safetensors"],
        vec![
            "convert",
            "https://host/m.safetensors",
            "/nonexistent/out.safetensors",
        ],
        vec!["verify", "gs://bucket/dir/"],
        vec![
            "plan",
            "s3://bucket/dir/",
            "/nonexistent/out",
            "--plan-file",
            "/nonexistent/plan.json",
        ],
    ] {
        let o = run(&cmd);
        assert_eq!(code(&o), 2, "{cmd:?}: {}", err(&o));
        assert!(
            err(&o).contains("--features remote"),
            "{cmd:?}: {}",
            err(&o)
        );
    }
}

//! Trust: a conversion never deletes or changes what it reads or what the
//! user did not ask to replace, never launders corrupt bytes, and refuses
//! hostile files quickly and clearly. Each test here is a regression test
//! of a defect found by a hostile-input campaign (issue 10).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cli::*;

/// Runs `migrate`, killing it (and failing) if it has not finished within
/// `secs`: a hang is a failure, not a stuck test suite.
fn run_within(secs: u64, args: &[&str]) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("migrate {args:?} hung for {secs} s: {}", err(&o));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn float() -> PathBuf {
    fx("bf16-qint8", "float.safetensors")
}

/// A directory holding a quanto qint8 model and its map.
fn quanto_dir(at: &Path) -> PathBuf {
    std::fs::create_dir_all(at).unwrap();
    for f in ["quantized.safetensors", "quanto_qmap.json"] {
        let to = if f == "quantized.safetensors" {
            "model.safetensors"
        } else {
            f
        };
        std::fs::copy(fx("bf16-qint8", f), at.join(to)).unwrap();
    }
    at.to_path_buf()
}

// ---- item 1: outputs never contain, equal or lie inside what is read ----

#[test]
fn force_into_a_directory_holding_the_input_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let outer = quanto_dir(&d.path().join("outer"));
    std::fs::write(outer.join("notes.txt"), b"mine").unwrap();
    let before = snapshot(d.path());
    // the input file inside the output directory
    let o = run(&[
        "convert",
        s(&outer.join("model.safetensors")),
        s(&outer),
        "--force",
    ]);
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert!(err(&o).contains("contains the input"), "{}", err(&o));
    // the input directory inside the output directory
    let inner = quanto_dir(&d.path().join("p/inner"));
    let before_p = snapshot(d.path());
    let o = run(&["convert", s(&inner), s(&d.path().join("p")), "--force"]);
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert_eq!(snapshot(d.path()), before_p);
    // an output under a not-yet-existing directory of the input
    let o = run(&["convert", s(&outer), s(&outer.join("sub/out.safetensors"))]);
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert!(err(&o).contains("lies inside"), "{}", err(&o));
    assert!(!outer.join("sub").exists());
    // through a symlink to the input's directory
    std::os::unix::fs::symlink(&outer, d.path().join("link")).unwrap();
    let o = run(&[
        "convert",
        s(&outer.join("model.safetensors")),
        s(&d.path().join("link/new.safetensors")),
        "--to",
        "plain",
    ]);
    // beside the input is fine, but the qmap slot is the input's companion
    assert_ne!(code(&o), 0, "{}", err(&o));
    // a --qmap or --shapes-from file is read too: the output may not replace it
    let o = run(&[
        "convert",
        s(&float()),
        s(&d.path().join("q.json")),
        "--qmap",
        s(&d.path().join("q.json")),
    ]);
    assert_eq!(code(&o), 2, "{}", err(&o));
    std::fs::remove_file(d.path().join("link")).unwrap();
    let after: Vec<_> = snapshot(d.path())
        .into_iter()
        .filter(|(p, _)| !p.starts_with(d.path().join("p")))
        .collect();
    assert_eq!(
        after,
        before,
        "nothing was written, moved or removed: {:?}",
        entries(&outer)
    );
}

#[test]
fn force_replaces_only_directories_that_ckptkit_wrote() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    run_ok(&["convert", s(&float()), s(&out), "--to", "quanto:qint8"]);
    let rec = std::fs::read_to_string(out.join(".ckptkit-output.json")).unwrap();
    assert!(
        rec.contains("model.safetensors") && rec.contains("quanto_qmap.json"),
        "{rec}"
    );
    // ckptkit's own output: --force replaces it
    run_ok(&[
        "convert",
        s(&fx("bf16-qint8", "quantized.safetensors")),
        s(&out),
        "--to",
        "plain",
        "--force",
    ]);
    assert!(!out.join("quanto_qmap.json").exists());
    // a file the user put there makes it irreplaceable
    std::fs::write(out.join("my-notes.txt"), b"keep me").unwrap();
    let o = run(&["convert", s(&float()), s(&out), "--force"]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(err(&o).contains("my-notes.txt"), "{}", err(&o));
    assert_eq!(std::fs::read(out.join("my-notes.txt")).unwrap(), b"keep me");
    // a directory ckptkit did not write is never replaced
    let theirs = d.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("model.safetensors"), b"x").unwrap();
    let o = run(&["convert", s(&float()), s(&theirs), "--force"]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert_eq!(
        std::fs::read(theirs.join("model.safetensors")).unwrap(),
        b"x"
    );
    // an empty directory is replaced
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    run_ok(&["convert", s(&float()), s(&empty), "--force"]);
    assert!(empty.join("model.safetensors").is_file());
}

// ---- item 3: --force never replaces what is not a file of the expected kind ----

#[test]
fn force_does_not_replace_fifos_devices_or_directories() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("out.safetensors");
    mkfifo(&fifo);
    let o = run_within(30, &["convert", s(&float()), s(&fifo), "--force"]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(err(&o).contains("FIFO"), "{}", err(&o));
    assert!(!err(&o).contains("--force"), "{}", err(&o));
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    let o = run(&["convert", s(&float()), "/dev/null"]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(
        err(&o).contains("character device") && !err(&o).contains("--force"),
        "{}",
        err(&o)
    );
    // a directory where a file output goes
    let dir = d.path().join("x.safetensors");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("keep"), b"k").unwrap();
    let o = run(&["convert", s(&float()), s(&dir), "--force"]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(err(&o).contains("directory"), "{}", err(&o));
    assert_eq!(std::fs::read(dir.join("keep")).unwrap(), b"k");
    // a file where a directory output goes
    let file = d.path().join("outdir");
    std::fs::write(&file, b"f").unwrap();
    let o = run(&["convert", s(&float()), s(&file), "--force"]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert_eq!(std::fs::read(&file).unwrap(), b"f");
}

// ---- item 4: another model's quanto_qmap.json is never removed or replaced ----

#[test]
fn another_models_qmap_is_neither_removed_nor_replaced() {
    let d = tempfile::tempdir().unwrap();
    let dir = quanto_dir(&d.path().join("models"));
    let before = snapshot(&dir);
    for to in ["plain", "quanto:qint4"] {
        // a quantized input for --to plain (with its map), float for quanto
        let q8 = fx("bf16-qint8", "quantized.safetensors");
        let input = if to == "plain" { q8 } else { float() };
        let o = run(&[
            "convert",
            s(&input),
            s(&dir.join("other.safetensors")),
            "--to",
            to,
            "--force",
        ]);
        assert_eq!(code(&o), 1, "--to {to}: {}", err(&o));
        assert!(
            err(&o).contains("belongs to another weights file")
                && err(&o).contains("model.safetensors"),
            "{}",
            err(&o)
        );
        assert_eq!(snapshot(&dir), before, "--to {to}");
    }
    // the output's own map goes with it (one journal), with --force
    let own = d.path().join("own");
    std::fs::create_dir(&own).unwrap();
    let m = own.join("m.safetensors");
    run_ok(&["convert", s(&float()), s(&m), "--to", "quanto:qint8"]);
    assert!(own.join("quanto_qmap.json").is_file());
    let q8 = fx("bf16-qint8", "quantized.safetensors");
    let o = run(&["convert", s(&q8), s(&m), "--to", "plain"]);
    assert_eq!(code(&o), 1, "without --force: {}", err(&o));
    assert!(err(&o).contains("already exists"), "{}", err(&o));
    run_ok(&["convert", s(&q8), s(&m), "--to", "plain", "--force"]);
    assert_eq!(entries(&own), ["m.safetensors"]);
}

// ---- items 5 and 8: commit journals belong to their writer ----

#[test]
fn a_killed_writers_commit_is_completed_only_once_it_is_gone() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("shared");
    std::fs::create_dir(&dir).unwrap();
    let a = dir.join("a.safetensors");
    // writer 1 stops between its journal and its renames
    let qmap = fx("bf16-qint8", "quanto_qmap.json");
    let mut w1 = Command::new(bin())
        .args(["convert", s(&float()), s(&a), "--like", s(&qmap), "-q"])
        .env("CKPTKIT_FAULT", "after-journal")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let journal = dir.join(".a.safetensors.ckptkit-commit");
    let t0 = Instant::now();
    while !journal.exists() {
        assert!(t0.elapsed() < Duration::from_secs(60), "no journal");
        std::thread::sleep(Duration::from_millis(5));
    }
    // writer 2, into the same directory with the same side file, runs
    // meanwhile: it neither completes writer 1's journal nor takes its map
    let b = dir.join("b.safetensors");
    let o = run(&["convert", s(&float()), s(&b), "--to", "quanto:qint4"]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(err(&o).contains("another ckptkit process"), "{}", err(&o));
    assert!(journal.exists(), "writer 1's journal is untouched");
    assert!(!a.exists() && !b.exists());
    // read-only commands report the pending commit and change nothing
    let snap = entries(&dir);
    let o = run(&["recover", s(&a)]);
    assert_eq!(code(&o), 1, "still pending: {}", out(&o));
    assert_eq!(entries(&dir), snap);
    // writer 1 dies
    w1.kill().unwrap();
    w1.wait().unwrap();
    let o = run_ok(&["recover", s(&a)]);
    assert!(out(&o).contains("1 commit(s) completed"), "{}", out(&o));
    run_ok(&["verify", s(&a)]);
    // the map describes writer 1's model, which loads with it
    let q = std::fs::read_to_string(dir.join("quanto_qmap.json")).unwrap();
    assert!(q.contains("qint8") && !q.contains("qint4"), "{q}");
    run_ok(&[
        "check",
        s(&a),
        "--against",
        s(&fx("bf16-qint8", "quantized.safetensors")),
    ]);
    // writer 2 now finds the map taken by another model and says so
    let o = run(&[
        "convert",
        s(&float()),
        s(&b),
        "--to",
        "quanto:qint4",
        "--force",
    ]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(
        err(&o).contains("belongs to another weights file"),
        "{}",
        err(&o)
    );
    assert_eq!(
        entries(&dir),
        ["a.safetensors", "quanto_qmap.json"],
        "no temporaries, locks or journals left"
    );
}

#[test]
fn a_planted_journal_never_makes_a_read_only_command_rename() {
    let d = tempfile::tempdir().unwrap();
    let dir = quanto_dir(&d.path().join("m"));
    let model = dir.join("model.safetensors");
    // a ckptkit-temporary-looking file and a journal that would rename it
    // over the model file itself
    let evil = dir.join(".x.ckptkit-tmp.1.0");
    std::fs::copy(float(), &evil).unwrap();
    std::fs::write(
        dir.join(".model.safetensors.ckptkit-commit"),
        format!(
            r#"{{"version":1,"renames":[["{}","model.safetensors"]]}}"#,
            evil.file_name().unwrap().to_str().unwrap()
        ),
    )
    .unwrap();
    let before = snapshot(&dir);
    for args in [
        vec!["verify", s(&model)],
        vec!["inspect", s(&model)],
        vec!["check", s(&model), "--against", s(&float())],
    ] {
        let _ = run(&args);
        assert_eq!(snapshot(&dir), before, "{args:?} changed the directory");
    }
    // recovering refuses it: the temporary is not the model's own
    let o = run(&["recover", s(&model)]);
    assert_eq!(code(&o), 1, "{}", out(&o));
    assert!(err(&o).contains("commit journal"), "{}", err(&o));
    assert_eq!(snapshot(&dir), before);
}

// ---- items 10 and 11: side files and inputs that are not regular files ----

#[test]
fn side_files_that_are_devices_fifos_or_links_to_them_are_refused_at_once() {
    let d = tempfile::tempdir().unwrap();
    // a model directory whose index is a link to /dev/zero
    let m = d.path().join("sharded");
    std::fs::create_dir(&m).unwrap();
    std::fs::copy(float(), m.join("model-00001-of-00001.safetensors")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", m.join("model.safetensors.index.json")).unwrap();
    let o = run_within(30, &["inspect", s(&m)]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(err(&o).contains("character device"), "{}", err(&o));
    // quanto_qmap.json and config.json beside a file: a link to /dev/zero, a FIFO
    for (name, fifo) in [
        ("quanto_qmap.json", false),
        ("config.json", false),
        ("quanto_qmap.json", true),
        ("config.json", true),
    ] {
        let dir = d.path().join(format!("{name}-{fifo}"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(float(), dir.join("model.safetensors")).unwrap();
        if fifo {
            mkfifo(&dir.join(name));
        } else {
            std::os::unix::fs::symlink("/dev/zero", dir.join(name)).unwrap();
        }
        let o = run_within(
            30,
            &[
                "convert",
                s(&dir.join("model.safetensors")),
                s(&d.path().join("o.safetensors")),
            ],
        );
        assert_eq!(code(&o), 1, "{name} {fifo}: {}", err(&o));
        assert!(
            err(&o).contains(if fifo { "FIFO" } else { "character device" }),
            "{}",
            err(&o)
        );
    }
    // --qmap and --like pointing at a device or a FIFO
    let fifo = d.path().join("q.json");
    mkfifo(&fifo);
    let zero = d.path().join("zero.json");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let int8_zero = format!("int8:{}", s(&zero));
    for args in [
        vec!["convert", s(&float()), "OUT", "--qmap", "/dev/zero"],
        vec!["convert", s(&float()), "OUT", "--like", "/dev/zero"],
        vec!["convert", s(&float()), "OUT", "--like", s(&fifo)],
        vec!["convert", s(&float()), "OUT", "--to", &int8_zero],
    ] {
        let outp = d.path().join("out.safetensors");
        let args: Vec<&str> = args
            .into_iter()
            .map(|a| if a == "OUT" { s(&outp) } else { a })
            .collect();
        let o = run_within(30, &args);
        assert_ne!(code(&o), 0, "{args:?}");
        assert!(
            err(&o).contains("not a regular file") || err(&o).contains("is a"),
            "{args:?}: {}",
            err(&o)
        );
        assert!(!outp.exists());
    }
}

#[test]
fn inputs_that_are_fifos_or_devices_are_refused_without_blocking() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("in.safetensors");
    mkfifo(&fifo);
    for cmd in ["inspect", "verify"] {
        let o = run_within(30, &[cmd, s(&fifo)]);
        assert_eq!(code(&o), 1, "{cmd}: {}", err(&o));
        assert!(err(&o).contains("FIFO"), "{cmd}: {}", err(&o));
    }
    let o = run_within(
        30,
        &["convert", s(&fifo), s(&d.path().join("o.safetensors"))],
    );
    assert_eq!(code(&o), 1, "{}", err(&o));
    let o = run_within(30, &["verify", "/dev/zero"]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(
        err(&o).contains("character device") && !err(&o).contains("truncated"),
        "{}",
        err(&o)
    );
}

// ---- item 2: conversions check every byte they read against recorded hashes ----

#[test]
fn corrupt_inputs_are_not_laundered_into_outputs_that_verify() {
    let d = tempfile::tempdir().unwrap();
    let q = fx("bf16-qint8", "quantized.safetensors");
    // ckptkit-written inputs: a container (plain and compressed) and a
    // safetensors file with its ckptkit.blake3 entry
    let ck = d.path().join("m.ckpk");
    let ckz = d.path().join("mz.ckpk");
    std::fs::create_dir(d.path().join("st")).unwrap();
    let st = d.path().join("st/m.safetensors");
    run_ok(&["convert", s(&q), s(&ck)]);
    run_ok(&["convert", s(&q), s(&ckz), "--compress", "zstd"]);
    run_ok(&[
        "convert",
        s(&q),
        s(&st),
        "--qmap",
        s(&fx("bf16-qint8", "quanto_qmap.json")),
    ]);
    // a clean conversion says its input was verified
    let o = run_ok(&[
        "convert",
        s(&ck),
        s(&d.path().join("ok/ok.safetensors")),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v["input_verified"], true, "{v}");
    // a foreign file records no hashes: converted, reported unverified
    let o = run_ok(&["convert", s(&q), s(&d.path().join("f.ckpk")), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v["input_verified"], false, "{v}");
    // flip one bit in the data of a tensor of each input
    let c = ckptkit::Container::open(&ck).unwrap();
    let key = "lin_i128.weight._data";
    let flip = |src: &Path, off: usize, name: &str| -> PathBuf {
        let mut b = std::fs::read(src).unwrap();
        b[off] ^= 0x04;
        let p = d.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let si = c
        .manifest()
        .shards
        .iter()
        .position(|sh| sh.tensors.iter().any(|t| t.key == key))
        .unwrap();
    let sh = &c.manifest().shards[si];
    let start = ckptkit::SafetensorsFile::open(&st)
        .unwrap()
        .header()
        .get(key)
        .unwrap()
        .start as usize;
    let _ = start;
    let bad_ck = {
        // offset of the tensor's data inside the container
        let t = sh.tensors.iter().position(|t| t.key == key).unwrap();
        let hdr = c.shard_header_bytes(si as u32).unwrap().len();
        let mut off = sh.offset as usize + hdr;
        let f = ckptkit::fuzzing::internals::st_header::parse(
            c.shard_header_bytes(si as u32).unwrap(),
            None,
        )
        .unwrap();
        off += f
            .tensors
            .iter()
            .find(|x| x.key == sh.tensors[t].key)
            .unwrap()
            .start as usize;
        flip(&ck, off + 1, "bad.ckpk")
    };
    let bad_st = {
        let f = ckptkit::SafetensorsFile::open(&st).unwrap();
        let off = (f.header().header_len + f.header().get(key).unwrap().start) as usize;
        flip(&st, off + 1, "st/bad.safetensors")
    };
    // compressed: flip a byte in the middle of the file (inside a chunk)
    let zlen = std::fs::metadata(&ckz).unwrap().len() as usize;
    let bad_z = flip(&ckz, zlen / 2, "badz.ckpk");
    for bad in [&bad_ck, &bad_st, &bad_z] {
        assert_ne!(code(&run(&["verify", s(bad)])), 0, "{}", bad.display());
        for (out_name, extra) in [
            ("o.safetensors", vec![]),
            ("o.ckpk", vec![]),
            ("oz.ckpk", vec!["--compress", "zstd"]),
            ("odir", vec![]),
            ("plain.safetensors", vec!["--to", "plain"]),
            ("int8.safetensors", vec!["--to", "int8"]),
        ] {
            let outp = d.path().join("outs").join(out_name);
            let mut args = vec!["convert", s(bad), s(&outp)];
            args.extend(extra);
            let o = run(&args);
            assert_eq!(code(&o), 1, "{args:?}: {}", err(&o));
            assert!(
                err(&o).contains("integrity check failed") || err(&o).contains("cannot be decoded"),
                "{args:?}: {}",
                err(&o)
            );
            assert!(
                !d.path().join("outs").exists() || entries(&d.path().join("outs")).is_empty(),
                "{args:?} left {:?}",
                entries(&d.path().join("outs"))
            );
        }
    }
    // the message names the tensor (and for plain data, where it is)
    let o = run(&["convert", s(&bad_st), s(&d.path().join("x.safetensors"))]);
    assert!(
        err(&o).contains(key) && err(&o).contains("byte "),
        "{}",
        err(&o)
    );
}

// ---- item 9: a decompression bomb converts in bounded memory ----

/// Runs `migrate` and returns its output and its peak resident memory (KiB),
/// from the kernel's own accounting of the finished child.
fn run_rss(args: &[&str]) -> (Output, u64) {
    let child = Command::new(bin())
        .args(args)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    // read the pipes on threads so the child never blocks on them
    let mut child = child;
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut so, &mut v).unwrap();
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut se, &mut v).unwrap();
        v
    });
    let mut status = 0;
    // SAFETY: wait4 on our own child, with owned out-parameters.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid);
    use std::os::unix::process::ExitStatusExt;
    let o = Output {
        status: std::process::ExitStatus::from_raw(status),
        stdout: t1.join().unwrap(),
        stderr: t2.join().unwrap(),
    };
    (o, ru.ru_maxrss as u64)
}

/// A small container whose one tensor claims `mib` MiB of zeros,
/// compressed (each chunk is a tiny zstd frame).
fn bomb(path: &Path, mib: u64) {
    use ckptkit::{ContainerOptions, ContainerWriter, Dtype, ZstdOptions};
    let len = mib << 20;
    let mut w = ContainerWriter::create(
        path,
        ContainerOptions::default()
            .compression(Some(
                ZstdOptions::default()
                    .level(1)
                    .chunk_size(16 << 20)
                    .float_filter(false),
            ))
            .overwrite(false),
    )
    .unwrap();
    w.begin_shard(
        "model.safetensors",
        &[("bomb.weight".to_string(), Dtype::U8, vec![len])],
        &Default::default(),
    )
    .unwrap();
    let zeros = vec![0u8; 16 << 20];
    w.write_from("bomb.weight", &mut |sink| {
        for _ in 0..(len / zeros.len() as u64) {
            sink(&zeros)?;
        }
        Ok(())
    })
    .unwrap();
    w.finish_shard().unwrap();
    w.finish(None, Default::default(), Vec::new()).unwrap();
}

#[test]
fn a_decompression_bomb_converts_in_bounded_memory() {
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("bomb.ckpk");
    bomb(&b, 2048);
    let size = std::fs::metadata(&b).unwrap().len();
    assert!(size < 256 << 10, "the bomb is small: {size} bytes");
    const LIMIT_KIB: u64 = 256 << 10;
    // re-compress: container to compressed container, streamed chunk by chunk
    let (o, rss) = run_rss(&[
        "convert",
        s(&b),
        s(&d.path().join("again.ckpk")),
        "--compress",
        "zstd",
        "-q",
    ]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(
        rss < LIMIT_KIB,
        "convert --compress zstd peaked at {rss} KiB"
    );
    // verify and extract stream too
    let (o, rss) = run_rss(&["verify", s(&d.path().join("again.ckpk"))]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(rss < LIMIT_KIB, "verify peaked at {rss} KiB");
    // paths that write the bytes out in full: a 512 MiB bomb (more than the
    // limit, so a whole-tensor buffer would exceed it) keeps the test's disk
    // use small
    let b = d.path().join("bomb512.ckpk");
    bomb(&b, 512);
    let (o, rss) = run_rss(&["convert", s(&b), s(&d.path().join("plain.ckpk")), "-q"]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(
        rss < LIMIT_KIB,
        "unpack to an uncompressed container peaked at {rss} KiB"
    );
    let (o, rss) = run_rss(&["convert", s(&b), s(&d.path().join("x.safetensors")), "-q"]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(
        rss < LIMIT_KIB,
        "extract to safetensors peaked at {rss} KiB"
    );
    assert_eq!(
        std::fs::metadata(d.path().join("x.safetensors"))
            .unwrap()
            .len(),
        (512u64 << 20)
            + ckptkit::SafetensorsFile::open(&d.path().join("x.safetensors"))
                .unwrap()
                .header()
                .header_len
    );
}

// ---- item 8b: unknown quantized layouts are never cast as if plain ----

/// Writes a safetensors file (no ckptkit hashes) with these tensors.
fn write_st(path: &Path, tensors: &[(&str, ckptkit::Dtype, Vec<u64>, Vec<u8>)]) {
    let plan: Vec<(String, ckptkit::Dtype, Vec<u64>)> = tensors
        .iter()
        .map(|(k, d, s, _)| (k.to_string(), *d, s.clone()))
        .collect();
    let w =
        ckptkit::SafetensorsWriter::create(path, &plan, &Default::default(), false, false).unwrap();
    for (k, _, _, b) in tensors {
        w.write_tensor(k, b).unwrap();
    }
    w.finish().unwrap();
}

/// A stored tensor: key, dtype, shape, bytes.
type StoredT<'a> = (&'a str, ckptkit::Dtype, Vec<u64>, Vec<u8>);
/// A case: name, tensors, config.json, what the refusal must say.
type Case<'a> = (&'a str, Vec<StoredT<'a>>, Option<&'a str>, &'a str);

#[test]
fn fp8_checkpoints_of_unknown_layout_are_refused_not_cast() {
    use ckptkit::Dtype::*;
    let d = tempfile::tempdir().unwrap();
    let f8 = |n: usize| (0..n).map(|i| (i * 7 % 120) as u8).collect::<Vec<u8>>();
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let bias = [0x80u8, 0x3f].repeat(4);
    let cases: Vec<Case> = vec![
        // compressed-tensors FP8: per-channel weight_scale
        (
            "ct",
            vec![
                ("l.weight", F8E4M3, vec![4, 4], f8(16)),
                (
                    "l.weight_scale",
                    F32,
                    vec![4, 1],
                    f32s(&[0.1, 0.2, 0.3, 0.4]),
                ),
                ("l.bias", BF16, vec![4], bias.clone()),
            ],
            None,
            "l.weight_scale",
        ),
        // ComfyUI legacy scaled fp8 whose layer lost its `scale_weight`
        // (the complete form is read: tests/migrate_comfy.rs)
        (
            "comfy",
            vec![
                ("l.weight", F8E4M3, vec![4, 4], f8(16)),
                ("l.bias", F32, vec![4], f32s(&[1.0; 4])),
                ("scaled_fp8", F8E4M3, vec![0], vec![]),
            ],
            None,
            "scaled_fp8",
        ),
        // (DeepSeek block FP8, `weight_scale_inv`, is read:
        // tests/migrate_fp8block.rs)
        // no scale tensor, but config.json says the model is quantized
        (
            "config",
            vec![
                ("l.weight", F8E4M3, vec![4, 4], f8(16)),
                ("l.bias", F32, vec![4], f32s(&[1.0; 4])),
            ],
            Some(r#"{"model_type": "llama", "quantization_config": {"quant_method": "fp8"}}"#),
            "quant_method: fp8",
        ),
    ];
    for (name, tensors, config, why) in cases {
        let dir = d.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let input = dir.join("model.safetensors");
        write_st(&input, &tensors);
        if let Some(c) = config {
            std::fs::write(dir.join("config.json"), c).unwrap();
        }
        let outs = d.path().join(format!("{name}-out"));
        for to in ["plain:bf16", "plain:f32", "int8"] {
            let o = run(&[
                "convert",
                s(&input),
                s(&outs.join("o.safetensors")),
                "--to",
                to,
            ]);
            assert!(!outs.exists(), "{name} --to {to}: no output");
            if to != "plain:bf16" {
                // refused, either for the layout or because nothing else
                // would change (a --to that changes nothing is exit 1 too)
                assert_eq!(code(&o), 1, "{name} {to}: {}", err(&o));
                continue;
            }
            assert_eq!(code(&o), 1, "{name} --to {to}: {}", err(&o));
            let e = err(&o);
            assert!(
                e.contains("unknown quantized layout")
                    && e.contains("layer `l`")
                    && e.contains(why),
                "{name}: {e}"
            );
            assert!(!outs.exists(), "{name}: no output");
        }
        // inspect and check say so
        let o = run(&["inspect", s(&input)]);
        assert_eq!(code(&o), 1, "{name}");
        assert!(out(&o).contains("unknown quantized"), "{name}: {}", out(&o));
        let o = run(&["check", s(&input), "--against", s(&input), "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
        assert_eq!(v["unknown_layouts"][0]["layer"], "l", "{name}: {v}");
        // copies that keep every byte are fine; --assume-plain vouches
        run_ok(&["convert", s(&input), s(&outs.join("copy.ckpk"))]);
        run_ok(&[
            "convert",
            s(&input),
            s(&outs.join("cast.safetensors")),
            "--to",
            "plain:bf16",
            "--assume-plain",
        ]);
    }
}

// ---- item 14: a model directory is recognised by its weights and index ----

#[test]
fn a_hugging_face_model_directory_with_other_files_is_a_model_directory() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("model");
    run_ok(&[
        "convert",
        s(&float()),
        s(&m),
        "--to",
        "quanto:qint8",
        "--max-shard-size",
        "4000",
    ]);
    let _ = std::fs::remove_file(m.join(".ckptkit-output.json"));
    std::fs::write(m.join(".gitattributes"), "*.safetensors filter=lfs\n").unwrap();
    std::fs::write(m.join("tokenizer.model"), b"\x0a\x0bspm").unwrap();
    std::fs::copy(float(), m.join("consolidated-00001-of-00001.safetensors")).unwrap();
    std::fs::create_dir(m.join("original")).unwrap();
    std::fs::write(m.join("original/params.json"), "{}").unwrap();
    let out = d.path().join("plain");
    let o = run(&["convert", s(&m), s(&out), "--to", "plain", "--json"]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    let v: serde_json::Value = serde_json::from_str(&out_text(&o)).unwrap();
    assert!(v["plan"]["layers"].as_array().unwrap().len() > 5, "{v}");
    // the weights of the index were converted; the other weight files are
    // not part of the model the index describes
    assert!(
        out.join("model.safetensors.index.json").is_file()
            || out.join("model.safetensors").is_file()
    );
    assert!(!out.join("consolidated-00001-of-00001.safetensors").exists());
}

fn out_text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

// ---- item 18: verify accepts only containers the conversions can read ----

#[test]
fn verify_refuses_layer_records_that_every_conversion_refuses() {
    use ckptkit::WeightQuant;
    let d = tempfile::tempdir().unwrap();
    // every bundled quanto and int8 fixture packs into containers that verify
    for family in ["quanto", "int8"] {
        for case in std::fs::read_dir(root().join("tests/fixtures").join(family)).unwrap() {
            let case = case.unwrap().path();
            let q = case.join(if family == "quanto" {
                "quantized.safetensors"
            } else {
                "model.safetensors"
            });
            if !q.is_file() {
                continue;
            }
            let ck = d.path().join(format!(
                "{family}-{}.ckpk",
                case.file_name().unwrap().to_str().unwrap()
            ));
            let o = run(&["convert", s(&q), s(&ck)]);
            if code(&o) != 0 {
                // a case that needs a shape hint cannot be packed without it
                assert!(
                    err(&o).contains("ambiguous"),
                    "{}: {}",
                    q.display(),
                    err(&o)
                );
                continue;
            }
            run_ok(&["verify", s(&ck)]);
        }
    }
    // a qint8 layer that records a group size: structurally valid, but no
    // conversion reads it
    let ck = d.path().join("m.ckpk");
    run_ok(&[
        "convert",
        s(&fx("bf16-qint8", "quantized.safetensors")),
        s(&ck),
    ]);
    let bytes = std::fs::read(&ck).unwrap();
    let bad = common::with_manifest(&bytes, |m| {
        let l = m
            .layers
            .iter_mut()
            .find(|l| matches!(l.quant.weights, WeightQuant::Quanto { .. }))
            .unwrap();
        l.quant.weights = WeightQuant::Quanto {
            qtype: "qint8".into(),
            group_size: Some(64),
        };
    });
    let bp = d.path().join("bad.ckpk");
    std::fs::write(&bp, bad).unwrap();
    ckptkit::Container::open(&bp).unwrap();
    let o = run(&["verify", s(&bp)]);
    assert_eq!(code(&o), 1, "{}", out(&o));
    assert!(
        err(&o).contains("layer `") && err(&o).contains("group"),
        "{}",
        err(&o)
    );
    let o = run(&[
        "convert",
        s(&bp),
        s(&d.path().join("x.safetensors")),
        "--to",
        "plain",
    ]);
    assert_eq!(code(&o), 1, "the conversions refuse it too: {}", err(&o));
}

// ---- item 7: nothing dropped while the summary says lossless ----

#[test]
fn container_copies_carry_extensions_and_metadata() {
    use ckptkit::Extension;
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("m.ckpk");
    run_ok(&[
        "convert",
        s(&fx("bf16-qint8", "quantized.safetensors")),
        s(&ck),
    ]);
    let ext = |n: &str| Extension {
        name: n.into(),
        critical: false,
        data: vec![1, 2, 3],
    };
    let with = common::with_manifest(&std::fs::read(&ck).unwrap(), |m| {
        m.extensions.push(ext("org.example.notes"));
        m.layers[0].extensions.push(ext("org.example.layer"));
        m.metadata.insert("step".into(), "4000".into());
    });
    let src = d.path().join("ext.ckpk");
    std::fs::write(&src, with).unwrap();
    for (name, extra) in [("a.ckpk", vec![]), ("z.ckpk", vec!["--compress", "zstd"])] {
        let outp = d.path().join(name);
        let mut args = vec!["convert", s(&src), s(&outp)];
        args.extend(extra);
        run_ok(&args);
        let c = ckptkit::Container::open(&outp).unwrap();
        assert_eq!(
            c.manifest().extensions,
            vec![ext("org.example.notes")],
            "{name}"
        );
        assert_eq!(
            c.layers()[0].extensions,
            vec![ext("org.example.layer")],
            "{name}"
        );
        assert_eq!(
            c.manifest().metadata.get("step").map(|s| s.as_str()),
            Some("4000")
        );
        // provenance names the input, never a temporary
        let prov = &c.manifest().provenance.sources;
        assert_eq!(prov.len(), 1);
        assert!(prov[0].path.ends_with("ext.ckpk"), "{:?}", prov[0].path);
    }
    // a planned conversion into a compressed container records the input too
    let z = d.path().join("plain-z.ckpk");
    run_ok(&[
        "convert",
        s(&src),
        s(&z),
        "--to",
        "plain",
        "--compress",
        "zstd",
    ]);
    let c = ckptkit::Container::open(&z).unwrap();
    let p = &c.manifest().provenance.sources[0].path;
    assert!(p.ends_with("ext.ckpk") && !p.contains("ckptkit-tmp"), "{p}");
}

#[test]
fn output_names_that_are_not_utf8_are_refused() {
    use std::os::unix::ffi::OsStrExt;
    let d = tempfile::tempdir().unwrap();
    let name = std::ffi::OsStr::from_bytes(b"m\xff.safetensors");
    let outp = d.path().join(name);
    let o = Command::new(bin())
        .arg("convert")
        .arg(float())
        .arg(&outp)
        .args(["--to", "quanto:qint8"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert!(err(&o).contains("UTF-8"), "{}", err(&o));
    assert!(entries(d.path()).is_empty(), "{:?}", entries(d.path()));
}

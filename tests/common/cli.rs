//! Running the `migrate` example binary from tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `migrate` binary cargo built next to the test binaries (or the one
/// `CKPTKIT_TEST_MIGRATE` names: how a regression test is shown to fail on
/// an older build).
pub fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CKPTKIT_TEST_MIGRATE") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join("examples").join("migrate");
    assert!(p.is_file(), "build the example first: {}", p.display());
    p
}

/// The crate root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A file of a quanto fixture case.
pub fn fx(case: &str, file: &str) -> PathBuf {
    root().join("tests/fixtures/quanto").join(case).join(file)
}

/// Runs `migrate` with these arguments from the crate root.
pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

/// Runs the binary and asserts success (printing its stderr if not).
pub fn run_ok(args: &[&str]) -> Output {
    let o = run(args);
    assert_eq!(code(&o), 0, "migrate {args:?}: {}", err(&o));
    o
}

/// A path as `&str`.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The exit code (-1 when killed by a signal).
pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// stderr as text.
pub fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// stdout as text.
pub fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The sorted entry names of a directory (temporaries and hidden files
/// included).
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Every file under `dir` with the blake3 of its bytes, for before/after
/// comparisons.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let h = blake3::hash(&std::fs::read(&p).unwrap())
                    .to_hex()
                    .to_string();
                v.push((p.clone(), h));
            } else {
                v.push((p.clone(), String::new()));
            }
        }
    }
    v.sort();
    v
}

/// Makes a FIFO.
pub fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

//! Remote inputs over HTTP (feature `remote`): a Range-capable HTTP/1.1
//! server on 127.0.0.1, started by each test, serves a directory; `migrate`
//! reads from it. `inspect` fetches headers only; `convert` from a URL is
//! byte-identical to `convert` of the same files on disk; transient
//! failures are retried; an object replaced while it is read, a corrupted
//! tensor and a server that never completes a response are refused with
//! the URL named.

mod common;

use std::path::{Path, PathBuf};

use common::cli::*;
use server::Server;

/// A model directory: quanto's qint8 file with its map and a config.
fn model_dir(root: &Path) -> PathBuf {
    let d = root.join("in");
    std::fs::create_dir(&d).unwrap();
    std::fs::copy(
        fx("bf16-qint8", "quantized.safetensors"),
        d.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        fx("bf16-qint8", "quanto_qmap.json"),
        d.join("quanto_qmap.json"),
    )
    .unwrap();
    std::fs::write(
        d.join("config.json"),
        r#"{"_class_name": "Toy", "quantization_config": {"quant_method": "quanto", "weights": "int8"}}"#,
    )
    .unwrap();
    d
}

/// Every file under `dir` by relative path, with its blake3.
fn tree(dir: &Path) -> Vec<(String, String)> {
    snapshot(dir)
        .into_iter()
        .map(|(p, h)| (p.strip_prefix(dir).unwrap().display().to_string(), h))
        .collect()
}

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", out(o)))
}

#[test]
fn inspect_of_a_1_gib_remote_file_fetches_its_header_only() {
    let d = tempfile::tempdir().unwrap();
    // a safetensors file of 1 GiB of BF16 (sparse on disk: only the header
    // is written)
    let header =
        br#"{"w.weight":{"dtype":"BF16","shape":[32768,16384],"data_offsets":[0,1073741824]}}"#;
    let mut h = header.to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let p = d.path().join("big.safetensors");
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    std::fs::write(&p, &bytes).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(bytes.len() as u64 + (1 << 30)).unwrap();
    let srv = Server::start(d.path());
    let url = srv.url("big.safetensors");
    let o = run_ok(&["inspect", &url, "--json"]);
    let v = json(&o);
    assert_eq!(v["input"], url.as_str());
    assert_eq!(v["total_bytes"], 1u64 << 30);
    assert_eq!(v["layers"][0]["path"], "w");
    let fetched = v["remote"][0]["fetched_bytes"].as_u64().unwrap();
    assert!(fetched < 1 << 20, "fetched {fetched} bytes");
    // what the server sent agrees with what migrate counted
    assert_eq!(srv.body_bytes(), fetched);
}

#[test]
fn convert_from_a_url_is_convert_of_the_same_files_byte_for_byte() {
    let d = tempfile::tempdir().unwrap();
    let input = model_dir(d.path());
    let srv = Server::start(d.path());
    // a directory (prefix) over HTTP, to a directory
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    run_ok(&["convert", s(&input), s(&a), "--to", "plain", "-q"]);
    run_ok(&["convert", &srv.url("in/"), s(&b), "--to", "plain", "-q"]);
    assert_eq!(tree(&a), tree(&b));
    assert!(tree(&b).iter().any(|(p, _)| p == "config.json"));
    // one file (its quanto_qmap.json fetched from beside it) to one file
    let (fa, fb) = (
        d.path().join("a.safetensors"),
        d.path().join("b.safetensors"),
    );
    let one = input.join("diffusion_pytorch_model.safetensors");
    run_ok(&["convert", s(&one), s(&fa), "--to", "plain", "-q"]);
    let url = srv.url("in/diffusion_pytorch_model.safetensors");
    let o = run_ok(&["convert", &url, s(&fb), "--to", "plain", "--json"]);
    assert_eq!(std::fs::read(&fa).unwrap(), std::fs::read(&fb).unwrap());
    let v = json(&o);
    assert_eq!(v["remote"][0]["url"], url.as_str());
    // every tensor byte was fetched once, plus the header read-ahead
    let size = std::fs::metadata(&one).unwrap().len();
    let fetched = v["remote"][0]["fetched_bytes"].as_u64().unwrap();
    assert!(fetched >= size && fetched < 3 * size, "{fetched} of {size}");
    // a container records the URL as its source, never the local stand-in
    let c = d.path().join("c.ckpk");
    run_ok(&["convert", &url, s(&c), "-q"]);
    let text = String::from_utf8_lossy(&std::fs::read(&c).unwrap()).into_owned();
    assert!(text.contains(&url), "the container does not name {url}");
    assert!(
        !text.contains("ckptkit-remote-"),
        "a temporary path was recorded"
    );
}

#[test]
fn transient_failures_are_retried_and_the_output_is_exact() {
    let d = tempfile::tempdir().unwrap();
    let input = model_dir(d.path());
    let srv = Server::start(d.path());
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    run_ok(&["convert", s(&input), s(&a), "--to", "plain", "-q"]);
    // three 503s, then two responses cut off half-way through their body
    srv.fail_next(3, 2);
    run_ok(&["convert", &srv.url("in/"), s(&b), "--to", "plain", "-q"]);
    assert_eq!(tree(&a), tree(&b));
    assert_eq!(srv.pending_faults(), (0, 0), "the faults were not all hit");
}

#[test]
fn a_server_that_never_completes_a_response_is_an_error_naming_the_url() {
    let d = tempfile::tempdir().unwrap();
    model_dir(d.path());
    let srv = Server::start(d.path());
    // the header read-ahead of the object succeeds; every later ranged
    // read is cut off half-way
    let out_dir = d.path().join("o");
    let url = srv.url("in/diffusion_pytorch_model.safetensors");
    srv.cut_every_get_after(srv.gets() + 1);
    let o = run(&["convert", &url, s(&out_dir), "--to", "plain"]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    let e = err(&o);
    // the first read cut off is the side file beside the weights
    assert!(
        e.contains(&srv.url("in/")) && e.contains("failed 4 times"),
        "{e}"
    );
    assert!(!out_dir.exists(), "an output was left");
}

#[test]
fn an_object_replaced_while_it_is_read_is_refused() {
    let d = tempfile::tempdir().unwrap();
    model_dir(d.path());
    let srv = Server::start(d.path());
    // the ETag changes once the first object has been opened
    srv.change_etag_after(srv.gets() + 1);
    let url = srv.url("in/diffusion_pytorch_model.safetensors");
    let o = run(&[
        "convert",
        &url,
        s(&d.path().join("o.safetensors")),
        "--to",
        "plain",
    ]);
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("changed while it was read"), "{}", err(&o));
    assert!(!d.path().join("o.safetensors").exists());
}

#[test]
fn verify_of_a_url_checks_recorded_hashes_and_names_a_corrupt_tensor() {
    let d = tempfile::tempdir().unwrap();
    let input = model_dir(d.path());
    // a ckptkit-written file records every tensor's blake3
    let w = d.path().join("w.safetensors");
    run_ok(&["convert", s(&input), s(&w), "--to", "plain", "-q"]);
    let srv = Server::start(d.path());
    let url = srv.url("w.safetensors");
    let v = json(&run_ok(&["verify", &url, "--json"]));
    assert!(v["tensors"].as_u64().unwrap() > 0);
    assert_eq!(v["unchecked"], 0);
    // one flipped byte in the last tensor's data
    let mut b = std::fs::read(&w).unwrap();
    let n = b.len();
    b[n - 1] ^= 1;
    std::fs::write(&w, &b).unwrap();
    let o = run(&["verify", &url]);
    assert_eq!(code(&o), 1);
    let e = err(&o);
    assert!(e.contains(&url) && e.contains("blake3"), "{e}");
}

#[test]
fn hostile_remote_headers_are_refused_as_for_local_files() {
    let d = tempfile::tempdir().unwrap();
    // a header length past the end of the object
    let mut b = (1u64 << 40).to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(d.path().join("long.safetensors"), &b).unwrap();
    let srv = Server::start(d.path());
    let o = run(&["inspect", &srv.url("long.safetensors")]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(
        err(&o).contains(&srv.url("long.safetensors")),
        "{}",
        err(&o)
    );
    // a missing object, and a directory with no weights
    let o = run(&["inspect", &srv.url("absent.safetensors")]);
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("no such object"), "{}", err(&o));
    std::fs::create_dir(d.path().join("empty")).unwrap();
    let o = run(&["inspect", &srv.url("empty/")]);
    assert_eq!(code(&o), 1);
}

#[test]
fn errors_in_side_files_name_their_url_not_the_local_copy() {
    let d = tempfile::tempdir().unwrap();
    let input = model_dir(d.path());
    std::fs::write(input.join("quanto_qmap.json"), "{ not json").unwrap();
    let srv = Server::start(d.path());
    let o = run(&[
        "convert",
        &srv.url("in/"),
        s(&d.path().join("o")),
        "--to",
        "plain",
    ]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    let e = err(&o);
    assert!(e.contains(&srv.url("in/quanto_qmap.json")), "{e}");
    assert!(!e.contains("ckptkit-remote-"), "{e}");
}

#[test]
fn an_empty_side_file_is_fetched_and_carried() {
    let d = tempfile::tempdir().unwrap();
    let input = model_dir(d.path());
    std::fs::write(input.join("generation_config.json"), "").unwrap();
    let srv = Server::start(d.path());
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    run_ok(&["convert", s(&input), s(&a), "--to", "plain", "-q"]);
    run_ok(&["convert", &srv.url("in/"), s(&b), "--to", "plain", "-q"]);
    assert_eq!(tree(&a), tree(&b));
    assert_eq!(
        std::fs::read(b.join("generation_config.json")).unwrap(),
        b""
    );
}

#[test]
fn an_http_url_is_an_input_only() {
    let d = tempfile::tempdir().unwrap();
    let input = model_dir(d.path());
    let srv = Server::start(d.path());
    let o = run(&[
        "convert",
        s(&input),
        &srv.url("out.safetensors"),
        "--to",
        "plain",
    ]);
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert!(err(&o).contains("inputs only"), "{}", err(&o));
    assert!(!d.path().join("out.safetensors").exists());
}

#[test]
fn a_plan_of_a_url_pins_its_objects_by_etag_and_its_jobs_write_what_convert_writes() {
    let d = tempfile::tempdir().unwrap();
    model_dir(d.path());
    let srv = Server::start(d.path());
    let url = srv.url("in/");
    let opts = ["--to", "plain", "--max-shard-size", "6000", "-q"];
    let a = d.path().join("a");
    let mut args = vec!["convert", url.as_str(), s(&a)];
    args.extend(opts);
    run_ok(&args);
    // plan, run every job, finish: what convert from the same URL wrote
    let (b, plan) = (d.path().join("b"), d.path().join("plan.json"));
    let mut args = vec!["plan", url.as_str(), s(&b), "--plan-file", s(&plan)];
    args.extend(opts);
    run_ok(&args);
    let p: serde_json::Value = serde_json::from_slice(&std::fs::read(&plan).unwrap()).unwrap();
    assert_eq!(p["input"], url.as_str());
    let pins = p["inputs"].as_array().unwrap();
    assert!(!pins.is_empty());
    for pin in pins {
        assert!(pin["path"].as_str().unwrap().starts_with(&url), "{pin}");
        assert!(!pin["etag"].as_str().unwrap().is_empty(), "{pin}");
    }
    assert!(!std::fs::read_to_string(&plan)
        .unwrap()
        .contains("ckptkit-remote-"));
    let n = p["jobs"].as_array().unwrap().len();
    assert!(n > 1, "{n} job(s)");
    for k in 0..n {
        run_ok(&["run-shard", s(&plan), &k.to_string(), "-q"]);
    }
    run_ok(&["finish", s(&plan), "-q"]);
    assert_eq!(tree(&a), tree(&b));
    // an object replaced after the plan: its job is refused, naming it
    let (c, plan) = (d.path().join("c"), d.path().join("plan-c.json"));
    let mut args = vec!["plan", url.as_str(), s(&c), "--plan-file", s(&plan)];
    args.extend(opts);
    run_ok(&args);
    // (every ETag the server gives from now on is another one)
    srv.change_etag_after(srv.gets() - 1);
    let o = run(&["run-shard", s(&plan), "0"]);
    assert_eq!(code(&o), 1, "{}", err(&o));
    let e = err(&o);
    assert!(
        e.contains("changed since the plan") && e.contains(&url),
        "{e}"
    );
    assert!(!c.exists());
    // jobs upload to object stores, never to an HTTP server
    // (tests/remote/s3_moto.py runs a plan whose jobs upload to S3)
    let o = run(&[
        "plan",
        &url,
        &srv.url("out/"),
        "--plan-file",
        s(&d.path().join("plan-http.json")),
    ]);
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert!(err(&o).contains("inputs only"), "{}", err(&o));
    assert!(!d.path().join("plan-http.json").exists());
}

/// A plain BF16 safetensors file of about 4 MiB (two tensors, finite
/// values, no recorded hashes).
fn bf16_file(p: &Path) {
    let (rows, cols) = (1024usize, 2048usize);
    let big = rows * cols * 2;
    let header = format!(
        r#"{{"blk.0.w.weight":{{"dtype":"BF16","shape":[{rows},{cols}],"data_offsets":[0,{big}]}},"blk.0.w.bias":{{"dtype":"BF16","shape":[{rows}],"data_offsets":[{big},{}]}}}}"#,
        big + rows * 2
    );
    let mut h = header.into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    let mut x = 0x9e37_79b9_u32;
    for i in 0..(rows * cols + rows) {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        // mantissa from the generator, exponent in [2^-4, 2^1], either sign
        let hi = 0x3d + (x >> 24) as u8 % 4;
        bytes.push((x >> 8) as u8);
        bytes.push(if i % 3 == 0 { hi | 0x80 } else { hi });
    }
    std::fs::write(p, bytes).unwrap();
}

#[test]
fn containers_and_gguf_files_are_read_from_urls_as_from_disk() {
    let d = tempfile::tempdir().unwrap();
    let st = d.path().join("in.safetensors");
    bf16_file(&st);
    let (c, g) = (d.path().join("m.ckpk"), d.path().join("m.gguf"));
    run_ok(&["convert", s(&st), s(&c), "-q"]);
    run_ok(&[
        "convert",
        s(&st),
        s(&g),
        "--to",
        "gguf:q8_0",
        "--gguf-arch",
        "test",
        "-q",
    ]);
    let srv = Server::start(d.path());
    for (name, local) in [("m.ckpk", &c), ("m.gguf", &g)] {
        let url = srv.url(name);
        let size = std::fs::metadata(local).unwrap().len();
        // inspect: the same layers as on disk, from the header only
        let here = json(&run_ok(&["inspect", s(local), "--json"]));
        let there = json(&run_ok(&["inspect", &url, "--json"]));
        assert_eq!(here["layers"], there["layers"], "{name}");
        assert_eq!(here["total_bytes"], there["total_bytes"], "{name}");
        assert_eq!(there["input"], url.as_str());
        let fetched = there["remote"][0]["fetched_bytes"].as_u64().unwrap();
        assert!(
            fetched < 128 << 10 && fetched * 16 < size,
            "{name}: {fetched} of {size}"
        );
        // verify: every recorded hash checked, as on disk
        let here = json(&run_ok(&["verify", s(local), "--json"]));
        let there = json(&run_ok(&["verify", &url, "--json"]));
        for k in ["tensors", "bytes", "unchecked"] {
            assert_eq!(here[k], there[k], "{name}: {k}");
        }
        assert!(there["tensors"].as_u64().unwrap() >= 2 && there["unchecked"] == 0);
        // convert: byte-identical to converting the file on disk
        let (a, b) = (
            d.path().join(format!("{name}.a.safetensors")),
            d.path().join(format!("{name}.b.safetensors")),
        );
        run_ok(&["convert", s(local), s(&a), "--to", "plain:f32", "-q"]);
        run_ok(&["convert", &url, s(&b), "--to", "plain:f32", "-q"]);
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{name}"
        );
        // a flipped byte in the weight (the middle of the file) is found,
        // and the URL named
        let mut bytes = std::fs::read(local).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 1;
        std::fs::write(local, &bytes).unwrap();
        let o = run(&["verify", &url]);
        assert_eq!(code(&o), 1, "{name}: {}", err(&o));
        let e = err(&o);
        assert!(e.contains(&url) && e.contains("blake3"), "{name}: {e}");
        assert!(!e.contains("ckptkit-remote-"), "{name}: {e}");
    }
}

/// A small HTTP/1.1 file server with byte ranges, ETags, `If-Match` and
/// injected faults, for the tests only.
mod server {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct State {
        /// GET requests answered 503 from now on.
        fail_503: u32,
        /// GET responses cut off half-way from now on.
        cut: u32,
        /// Every GET after this many is cut off.
        cut_every_after: Option<u64>,
        /// The ETag changes after this many GETs.
        etag_after: Option<u64>,
        gets: u64,
        body_bytes: u64,
    }

    pub struct Server {
        addr: String,
        state: Arc<Mutex<State>>,
    }

    impl Server {
        pub fn start(root: &Path) -> Server {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let state = Arc::new(Mutex::new(State::default()));
            let (st, root) = (state.clone(), root.to_path_buf());
            std::thread::spawn(move || {
                for c in l.incoming().flatten() {
                    let (st, root) = (st.clone(), root.clone());
                    std::thread::spawn(move || {
                        let _ = serve(c, &root, &st);
                    });
                }
            });
            Server { addr, state }
        }
        pub fn url(&self, rel: &str) -> String {
            format!("http://{}/{rel}", self.addr)
        }
        pub fn fail_next(&self, n503: u32, cut: u32) {
            let mut s = self.state.lock().unwrap();
            s.fail_503 = n503;
            s.cut = cut;
        }
        pub fn pending_faults(&self) -> (u32, u32) {
            let s = self.state.lock().unwrap();
            (s.fail_503, s.cut)
        }
        pub fn cut_every_get_after(&self, gets: u64) {
            self.state.lock().unwrap().cut_every_after = Some(gets);
        }
        pub fn change_etag_after(&self, gets: u64) {
            self.state.lock().unwrap().etag_after = Some(gets);
        }
        pub fn gets(&self) -> u64 {
            self.state.lock().unwrap().gets
        }
        pub fn body_bytes(&self) -> u64 {
            self.state.lock().unwrap().body_bytes
        }
    }

    fn serve(c: TcpStream, root: &Path, st: &Mutex<State>) -> std::io::Result<()> {
        let mut r = BufReader::new(c.try_clone()?);
        let mut w = c;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or("").to_string();
            let target = parts.next().unwrap_or("/").to_string();
            let (mut range, mut if_match) = (None, None);
            loop {
                let mut h = String::new();
                r.read_line(&mut h)?;
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    match k.trim().to_ascii_lowercase().as_str() {
                        "range" => range = Some(v.trim().to_string()),
                        "if-match" => if_match = Some(v.trim().to_string()),
                        _ => {}
                    }
                }
            }
            let path: PathBuf = root.join(target.trim_start_matches('/'));
            let file = std::fs::metadata(&path).ok().filter(|m| m.is_file());
            let Some(md) = file else {
                w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
                continue;
            };
            let size = md.len();
            let mut s = st.lock().unwrap();
            if method == "GET" {
                s.gets += 1;
            }
            let changed = s.etag_after.is_some_and(|n| s.gets > n);
            let etag = format!(
                "\"{}-{}\"",
                size,
                md.modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
                    + u128::from(changed)
            );
            if method == "HEAD" {
                drop(s);
                write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nETag: {etag}\r\nAccept-Ranges: bytes\r\n\r\n"
                )?;
                continue;
            }
            if method != "GET" {
                drop(s);
                w.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")?;
                continue;
            }
            if s.fail_503 > 0 {
                s.fail_503 -= 1;
                drop(s);
                w.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")?;
                continue;
            }
            if if_match.as_deref().is_some_and(|m| m != etag && m != "*") {
                drop(s);
                w.write_all(b"HTTP/1.1 412 Precondition Failed\r\nContent-Length: 0\r\n\r\n")?;
                continue;
            }
            let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                Some(r) => {
                    let (a, b) = r.split_once('-').unwrap_or((r, ""));
                    let a: u64 = a.parse().unwrap_or(0);
                    let b: u64 = b.parse().map(|b: u64| b + 1).unwrap_or(size).min(size);
                    (a, b)
                }
                None => (0, size),
            };
            if start >= end && size > 0 {
                drop(s);
                write!(
                    w,
                    "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{size}\r\nContent-Length: 0\r\n\r\n"
                )?;
                continue;
            }
            let len = end - start;
            let cut = if s.cut > 0 {
                s.cut -= 1;
                true
            } else {
                s.cut_every_after.is_some_and(|n| s.gets > n)
            };
            let send = if cut { len / 2 } else { len };
            s.body_bytes += send;
            drop(s);
            let status = if range.is_some() {
                format!(
                    "206 Partial Content\r\nContent-Range: bytes {start}-{}/{size}",
                    end - 1
                )
            } else {
                "200 OK".to_string()
            };
            write!(
                w,
                "HTTP/1.1 {status}\r\nContent-Length: {len}\r\nETag: {etag}\r\nAccept-Ranges: bytes\r\n\r\n"
            )?;
            let mut f = std::fs::File::open(&path)?;
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(start))?;
            std::io::copy(&mut f.take(send), &mut w)?;
            if cut {
                w.flush()?;
                let _ = w.shutdown(std::net::Shutdown::Both);
                return Ok(());
            }
        }
    }
}

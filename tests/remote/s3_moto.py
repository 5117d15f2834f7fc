"""Remote inputs on S3 (feature `remote`), against a local S3 server.

moto's S3 server runs in this process on 127.0.0.1; a small proxy in front of
it injects transient faults (503 answers, responses cut off half-way). The
`migrate` binary reads `s3://` URLs through the proxy, with credentials and
endpoint from the standard AWS_* environment variables only.

    python tests/remote/s3_moto.py target/debug/examples/migrate

Each check asserts on migrate's output; the first failure ends the run with
a non-zero exit code. Run by .ci/remote.sh (moto and boto3 pinned there).
"""

import http.client
import http.server
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

from common import bf16_file, model_dir, tree

BUCKET = "ckptkit-test"


class Faults:
    """Faults the proxy injects into the next GET requests."""

    def __init__(self):
        self.lock = threading.Lock()
        self.fail_503 = 0
        self.cut = 0
        self.gets = 0
        self.body_bytes = 0
        # every request: (method, path, query)
        self.log = []
        # seconds each UploadPart request waits before it is forwarded
        self.part_delay = 0.0

    def take(self):
        with self.lock:
            self.gets += 1
            if self.fail_503:
                self.fail_503 -= 1
                return "503"
            if self.cut:
                self.cut -= 1
                return "cut"
            return None


def start_proxy(upstream_port, faults):
    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def forward(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else None
            with faults.lock:
                faults.log.append((self.command, *self.path.split("?", 1), "")[:3])
            if self.command == "PUT" and "partNumber=" in self.path and faults.part_delay:
                time.sleep(faults.part_delay)
            fault = faults.take() if self.command == "GET" else None
            if fault == "503":
                msg = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)
                return
            c = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
            c.request(self.command, self.path, body=body, headers=dict(self.headers))
            r = c.getresponse()
            data = r.read()
            self.send_response(r.status)
            for k, v in r.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            # a HEAD answer keeps the object's length
            length = r.getheader("Content-Length") if self.command == "HEAD" else len(data)
            self.send_header("Content-Length", str(length or 0))
            self.end_headers()
            if self.command == "HEAD":
                return
            if fault == "cut":
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            with faults.lock:
                faults.body_bytes += len(data)
            self.wfile.write(data)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def main():
    migrate = Path(sys.argv[1]).resolve()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    faults = Faults()
    proxy = start_proxy(port, faults)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("AWS_")
    } | {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.server_address[1]}",
        "AWS_ALLOW_HTTP": "true",
    }
    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=BUCKET)

    def run(*args, ok=True, environ=None):
        r = subprocess.run(
            [str(migrate), *args], capture_output=True, text=True, env=environ or env
        )
        if ok and r.returncode != 0:
            raise AssertionError(f"migrate {args}: exit {r.returncode}: {r.stderr}")
        return r

    checks = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        local = model_dir(tmp)
        for f in local.iterdir():
            s3.upload_file(str(f), BUCKET, f"models/toy/{f.name}")
        prefix = f"s3://{BUCKET}/models/toy/"

        # inspect: the same layers as on disk, only headers and side files fetched
        here = json.loads(run("inspect", str(local), "--json").stdout)
        there = json.loads(run("inspect", prefix, "--json").stdout)
        assert there["layers"] == here["layers"], "remote inspect differs"
        assert there["input"] == prefix, there["input"]
        size = (local / "diffusion_pytorch_model.safetensors").stat().st_size
        fetched = there["remote"][0]["fetched_bytes"]
        header = 8 + int.from_bytes(
            (local / "diffusion_pytorch_model.safetensors").read_bytes()[:8], "little"
        )
        side = sum((local / n).stat().st_size for n in ("config.json", "quanto_qmap.json", "README.md"))
        assert header <= fetched <= min(size, 64 << 10) + side, (fetched, size, side, header)
        checks += 1

        # inspect of a 1 GiB object fetches its header only (under 1 MiB)
        gib = tmp / "gib.safetensors"
        header = json.dumps(
            {"w.weight": {"dtype": "BF16", "shape": [32768, 16384], "data_offsets": [0, 1 << 30]}}
        ).encode()
        header += b" " * (-len(header) % 8)
        with open(gib, "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
            f.truncate(8 + len(header) + (1 << 30))
        s3.upload_file(str(gib), BUCKET, "big/gib.safetensors")
        gib.unlink()
        r = json.loads(run("inspect", f"s3://{BUCKET}/big/gib.safetensors", "--json").stdout)
        assert r["total_bytes"] == 1 << 30, r["total_bytes"]
        assert r["remote"][0]["fetched_bytes"] < 1 << 20, r["remote"]
        s3.delete_object(Bucket=BUCKET, Key="big/gib.safetensors")
        checks += 1

        # convert from the bucket: byte-identical to convert of the files on disk
        a, b = tmp / "a", tmp / "b"
        run("convert", str(local), str(a), "--to", "plain", "-q")
        run("convert", prefix, str(b), "--to", "plain", "-q")
        assert tree(a) == tree(b), "remote convert differs"
        checks += 1

        # one object (its quanto_qmap.json read from beside it) to one file
        fa, fb = tmp / "a.safetensors", tmp / "b.safetensors"
        run("convert", str(local / "diffusion_pytorch_model.safetensors"), str(fa), "--to", "plain", "-q")
        run("convert", prefix + "diffusion_pytorch_model.safetensors", str(fb), "--to", "plain", "-q")
        assert fa.read_bytes() == fb.read_bytes(), "remote single-file convert differs"
        checks += 1

        # transient faults: three 503s and two responses cut off, retried
        faults.fail_503, faults.cut = 3, 2
        c = tmp / "c"
        run("convert", prefix, str(c), "--to", "plain", "-q")
        assert (faults.fail_503, faults.cut) == (0, 0), "faults not hit"
        assert tree(a) == tree(c), "convert through faults differs"
        checks += 1

        # check against a local reference, from the bucket
        r = json.loads(run("check", prefix, "--against", str(local), "--json").stdout)
        assert r["compatible"] and r["remote"][0]["url"] == prefix, r
        # against a plain reference: incompatible, and the fix names the URL
        r = run("check", prefix, "--against", str(a), "--json", ok=False)
        assert r.returncode == 1, r.stderr
        fix = json.loads(r.stdout)["fix"]
        assert prefix.rstrip("/") in fix and "ckptkit-remote-" not in fix, fix
        checks += 1

        # verify of a ckptkit-written object checks its recorded hashes
        s3.upload_file(str(fa), BUCKET, "written/a.safetensors")
        v = json.loads(run("verify", f"s3://{BUCKET}/written/a.safetensors", "--json").stdout)
        assert v["tensors"] > 0 and v["unchecked"] == 0, v
        checks += 1

        # a plan of the prefix: objects pinned by ETag, jobs read the bucket,
        # finish gives what convert of the files on disk gives
        pf, pd, ref = tmp / "plan.json", tmp / "planned", tmp / "ref6"
        six = ("--to", "plain", "--max-shard-size", "6000")
        r = json.loads(run("plan", prefix, str(pd), *six, "--plan-file", str(pf), "--json").stdout)
        assert r["inputs"] and all(p["etag"] and p["path"].startswith(prefix) for p in r["inputs"]), r
        assert len(r["jobs"]) > 1, r["jobs"]
        for k in range(len(r["jobs"])):
            run("run-shard", str(pf), str(k), "-q")
        run("finish", str(pf), "-q")
        run("convert", str(local), str(ref), *six, "-q")
        assert tree(pd) == tree(ref), "the planned output differs from convert's"
        checks += 1

        # a plan whose jobs upload to the bucket: each job's object and record
        # there, finish refused until every job is done, then the prefix holds
        # what convert writes, and no record is left
        pf2, dest = tmp / "plan-s3.json", f"s3://{BUCKET}/planned/toy/"
        r = json.loads(run("plan", prefix, dest, *six, "--plan-file", str(pf2), "--json").stdout)
        n = len(r["jobs"])
        for k in range(n - 1):
            out = json.loads(run("run-shard", str(pf2), str(k), "--json").stdout)
            assert out["etag"] and not out["already_done"], out
        early = run("finish", str(pf2), ok=False)
        assert early.returncode == 1 and f"{n - 1} (" in early.stderr, early.stderr
        staged = objects(s3, "planned/toy/")
        assert not [o for o in staged if o.endswith(".index.json") or o == ".ckptkit-output.json"], staged
        # (migrate inspect refuses a prefix of several weights and no index)
        partial = run("inspect", dest, ok=False)
        assert partial.returncode != 0 and "index" in partial.stderr, partial.stderr
        run("run-shard", str(pf2), str(n - 1), "-q")
        again = json.loads(run("run-shard", str(pf2), "0", "--json").stdout)
        assert again["already_done"], again
        run("finish", str(pf2), "-q")
        pdown = tmp / "planned-down"
        download_tree(s3, "planned/toy/", pdown)
        assert tree(pdown) == tree(ref), "the uploaded planned output differs from convert's"
        assert not [o for o in objects(s3, "planned/toy/") if o.startswith(".ckptkit-jobs/")]
        checks += 1

        # a prefix listed in several pages (moto answers 1000 keys a page):
        # the model's files, listed after 1100 other objects, are found
        for i in range(1100):
            s3.put_object(Bucket=BUCKET, Key=f"models/paged/blob-{i:04}.bin", Body=b"x")
        for f in local.iterdir():
            s3.upload_file(str(f), BUCKET, f"models/paged/{f.name}")
        before = len(faults.log)
        paged = json.loads(run("inspect", f"s3://{BUCKET}/models/paged/", "--json").stdout)
        assert paged["layers"] == here["layers"], "a listing of several pages lost files"
        pages = [q for m, p, q in faults.log[before:] if m == "GET" and "list-type=2" in q]
        assert len(pages) >= 2, pages
        checks += 1

        # refusals: a missing bucket, a missing object
        missing = run("inspect", f"s3://no-such-bucket-{os.getpid()}/m.safetensors", ok=False)
        assert missing.returncode == 1 and "no-such-bucket" in missing.stderr, missing.stderr
        gone = run("inspect", f"s3://{BUCKET}/models/absent.safetensors", ok=False)
        assert gone.returncode == 1 and "no such object" in gone.stderr, gone.stderr
        checks += 1

        checks += check_outputs(run, s3, faults, tmp, local, a, migrate, env)

    proxy.shutdown()
    server.stop()
    print(f"s3 (moto): {checks} checks passed")


def objects(s3, prefix):
    r = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"][len(prefix):] for o in r.get("Contents", []))


def download_tree(s3, prefix, dest):
    for rel in objects(s3, prefix):
        p = Path(dest) / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(BUCKET, prefix + rel, str(p))


def part_puts(faults, key):
    """The part numbers of the UploadPart requests for `key`, in order."""
    out = []
    for method, path, query in faults.log:
        q = urllib.parse.parse_qs(query)
        if method == "PUT" and path == f"/{BUCKET}/{key}" and "partNumber" in q:
            out.append(int(q["partNumber"][0]))
    return out


def interrupted(cmd, env, started, what):
    """Runs `cmd`, sends it SIGINT once `started()` is true, and checks that
    it stopped saying it was interrupted; gives its standard error."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not started() and time.time() < deadline:
        time.sleep(0.05)
    assert started(), what
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "interrupted" in err.lower(), err
    return err


def check_outputs(run, s3, faults, tmp, local, plain_dir, migrate, env):
    """Outputs at s3:// URLs: multipart uploads with the header part last,
    byte-identical to local outputs; directories committed by their record;
    --force limited to a previous output's objects; Ctrl-C aborts."""
    checks = 0
    big = tmp / "big.safetensors"
    bf16_file(big, 12 << 20)
    env_parts = dict(env, CKPTKIT_UPLOAD_PART_SIZE=str(5 << 20))

    # one file: 24 MiB of F32 in 5 parts, part 1 (the header) sent last
    here = tmp / "big-f32.safetensors"
    run("convert", str(big), str(here), "--to", "plain:f32", "-q")
    key = "out/big-f32.safetensors"
    r = run("convert", str(big), f"s3://{BUCKET}/{key}", "--to", "plain:f32", "--json", environ=env_parts)
    report = json.loads(r.stdout)
    assert report["upload"]["parts"] == 5 and report["upload"]["objects"] == 1, report
    assert report["output"] == f"s3://{BUCKET}/{key}", report["output"]
    got = tmp / "got.safetensors"
    s3.download_file(BUCKET, key, str(got))
    assert got.read_bytes() == here.read_bytes(), "uploaded file differs from the local output"
    parts = part_puts(faults, key)
    assert sorted(parts) == [1, 2, 3, 4, 5] and parts[-1] == 1, parts
    whole = [m for m, p, q in faults.log if m == "PUT" and p == f"/{BUCKET}/{key}" and "partNumber" not in q]
    assert not whole, "a whole-object PUT was sent"
    checks += 1

    # a container and a GGUF file: uploaded byte-identical to the local
    # outputs, then read back from the bucket as from disk
    for name, args in (("m.ckpk", ()), ("m.gguf", ("--to", "gguf:q8_0", "--gguf-arch", "test"))):
        here = tmp / name
        run("convert", str(big), str(here), *args, "-q")
        url = f"s3://{BUCKET}/kinds/{name}"
        run("convert", str(big), url, *args, "-q")
        got = tmp / f"got-{name}"
        s3.download_file(BUCKET, f"kinds/{name}", str(got))
        assert got.read_bytes() == here.read_bytes(), f"the uploaded {name} differs"
        i_here = json.loads(run("inspect", str(here), "--json").stdout)
        i_there = json.loads(run("inspect", url, "--json").stdout)
        assert i_there["layers"] == i_here["layers"], f"remote inspect of {name} differs"
        fetched = i_there["remote"][0]["fetched_bytes"]
        assert fetched < 128 << 10, (name, fetched)
        v = json.loads(run("verify", url, "--json").stdout)
        assert v["tensors"] >= 1 and v["unchecked"] == 0, (name, v)
        fa, fb = tmp / f"{name}.a.safetensors", tmp / f"{name}.b.safetensors"
        run("convert", str(here), str(fa), "--to", "plain:f32", "-q")
        run("convert", url, str(fb), "--to", "plain:f32", "-q")
        assert fa.read_bytes() == fb.read_bytes(), f"convert of the remote {name} differs"
    checks += 1

    # a quanto output's quanto_qmap.json goes beside it, as on disk
    qdir = tmp / "q"
    qdir.mkdir()
    run("convert", str(big), str(qdir / "model.safetensors"), "--to", "quanto:qint8", "-q")
    run("convert", str(big), f"s3://{BUCKET}/q/model.safetensors", "--to", "quanto:qint8", "-q")
    assert objects(s3, "q/") == ["model.safetensors", "quanto_qmap.json"], objects(s3, "q/")
    qdown = tmp / "qdown"
    download_tree(s3, "q/", qdown)
    assert tree(qdown) == tree(qdir), "the quanto output or its map differs"
    r = run("convert", str(big), f"s3://{BUCKET}/q/other.safetensors", "--to", "quanto:qint8", ok=False)
    assert r.returncode != 0 and "quanto_qmap.json" in r.stderr, r.stderr
    # with --force too: the map belongs to model.safetensors
    r = run("convert", str(big), f"s3://{BUCKET}/q/other.safetensors", "--to", "quanto:qint8", "--force", ok=False)
    assert r.returncode == 1 and "another weights file" in r.stderr, r.stderr
    assert objects(s3, "q/") == ["model.safetensors", "quanto_qmap.json"], objects(s3, "q/")
    # the same output again, with --force: replaced
    run("convert", str(big), f"s3://{BUCKET}/q/model.safetensors", "--to", "quanto:qint8", "--force", "-q")
    checks += 1

    # an existing object is not replaced without --force
    r = run("convert", str(big), f"s3://{BUCKET}/{key}", "--to", "plain:f32", ok=False)
    assert r.returncode != 0 and "exists" in r.stderr, r.stderr
    run("convert", str(big), f"s3://{BUCKET}/{key}", "--to", "plain:f32", "--force", "-q")
    checks += 1

    # a directory: the same files as a local directory output, its record last
    # (each weight file streamed as soon as it is written; bytes_out counts them)
    dest = "out/toy/"
    r = run("convert", str(local), f"s3://{BUCKET}/{dest}", "--to", "plain", "--max-shard-size", "6000", "--json")
    report = json.loads(r.stdout)
    six = tmp / "six"
    here = json.loads(run("convert", str(local), str(six), "--to", "plain", "--max-shard-size", "6000", "--json").stdout)
    down = tmp / "down"
    download_tree(s3, dest, down)
    assert tree(down) == tree(six), "uploaded directory differs from the local output"
    shards = [p for p, _ in tree(six) if p.endswith(".safetensors")]
    assert len(shards) > 1 and report["upload"]["streamed"] == len(shards), (shards, report["upload"])
    assert report["bytes_out"] == here["bytes_out"], (report["bytes_out"], here["bytes_out"])
    completes = [p for m, p, q in faults.log if m == "POST" and "uploadId=" in q and p.startswith(f"/{BUCKET}/{dest}")]
    assert completes[-1].endswith("/.ckptkit-output.json"), completes[-3:]
    assert completes[-2].endswith(".index.json"), completes[-3:]
    checks += 1

    # --force replaces only a previous output: the old shards go, a foreign object stops it
    r = run("convert", str(local), f"s3://{BUCKET}/{dest}", "--to", "plain", ok=False)
    assert r.returncode == 2 and "--force" in r.stderr, r.stderr
    run("convert", str(local), f"s3://{BUCKET}/{dest}", "--to", "plain", "--force", "-q")
    assert objects(s3, dest) == [p for p, _ in tree(plain_dir)], objects(s3, dest)
    s3.put_object(Bucket=BUCKET, Key=dest + "notes/foreign.txt", Body=b"not ckptkit's")
    r = run("convert", str(local), f"s3://{BUCKET}/{dest}", "--to", "plain", "--force", ok=False)
    assert r.returncode == 1 and "notes/foreign.txt" in r.stderr, r.stderr
    assert "notes/foreign.txt" in objects(s3, dest)
    checks += 1

    # Ctrl-C once a directory's first weight file is streamed: what was
    # streamed is removed, nothing is left under the prefix
    faults.part_delay = 0.5
    prefix = "out/cancelled-dir/"
    interrupted(
        [str(migrate), "convert", str(local), f"s3://{BUCKET}/{prefix}", "--to", "plain",
         "--max-shard-size", "6000", "-q"],
        env, lambda: objects(s3, prefix), "no weight file was streamed",
    )
    faults.part_delay = 0.0
    assert objects(s3, prefix) == [], objects(s3, prefix)
    checks += 1

    # Ctrl-C during the upload: the upload is aborted, nothing under the key
    faults.part_delay = 1.0
    key = "out/cancelled.safetensors"
    interrupted(
        [str(migrate), "convert", str(big), f"s3://{BUCKET}/{key}", "--to", "plain:f32", "-q"],
        env_parts, lambda: part_puts(faults, key), "no part was sent",
    )
    faults.part_delay = 0.0
    assert key not in objects(s3, ""), "a cancelled upload left an object"
    pending = s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert not [u for u in pending if u["Key"] == key], pending
    checks += 1
    return checks


if __name__ == "__main__":
    main()

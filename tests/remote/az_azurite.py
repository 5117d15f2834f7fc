"""Remote inputs and outputs on Azure Blob Storage (feature `remote`), against
Azurite, Microsoft's local emulator, on 127.0.0.1.

Azurite runs on the Node.js that the `nodejs-bin` wheel carries (CI machines
have no Node.js of their own); the container is made with azure-storage-blob.
The `migrate` binary reads and writes `az://` URLs with the emulator's
well-known account through the standard AZURE_* environment variables only.

    python tests/remote/az_azurite.py target/debug/examples/migrate AZURITE_BLOB_MAIN_JS

Each check asserts on migrate's output; the first failure ends the run with
a non-zero exit code. Run by .ci/remote.sh (versions pinned there).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from azure.storage.blob import BlobServiceClient

from common import bf16_file, model_dir, tree

CONTAINER = "ckptkit-test"
# Azurite's documented development account
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_azurite(main_js, data):
    port = free_port()
    p = subprocess.Popen(
        [sys.executable, "-m", "nodejs", str(main_js), "--blobHost", "127.0.0.1",
         "--blobPort", str(port), "--location", str(data), "--skipApiVersionCheck", "--silent"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p, port
        except OSError:
            if p.poll() is not None:
                raise AssertionError(f"Azurite exited: {p.stdout.read().decode(errors='replace')}")
            time.sleep(0.2)
    p.kill()
    raise AssertionError("Azurite did not start in 60 s")


def main():
    migrate, main_js = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server, port = start_azurite(main_js, tmp / "azurite")
        try:
            checks = run_checks(migrate, port, tmp)
        finally:
            server.kill()
            server.wait()
    print(f"az (Azurite): {checks} checks passed")


def run_checks(migrate, port, tmp):
    endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "AZURITE_"))} | {
        "AZURE_STORAGE_USE_EMULATOR": "true",
        "AZURITE_BLOB_STORAGE_URL": f"http://127.0.0.1:{port}",
    }
    svc = BlobServiceClient.from_connection_string(
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={endpoint};"
    )
    box = svc.create_container(CONTAINER)

    def run(*args, ok=True, environ=None):
        r = subprocess.run([str(migrate), *args], capture_output=True, text=True, env=environ or env)
        if ok and r.returncode != 0:
            raise AssertionError(f"migrate {args}: exit {r.returncode}: {r.stderr}")
        return r

    def objects(prefix):
        return sorted(b.name[len(prefix):] for b in box.list_blobs(name_starts_with=prefix))

    def download(prefix, dest):
        for rel in objects(prefix):
            p = Path(dest) / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(box.download_blob(prefix + rel).readall())

    checks = 0
    local = model_dir(tmp)
    for f in local.iterdir():
        box.upload_blob(f"models/toy/{f.name}", f.read_bytes())
    prefix = f"az://{CONTAINER}/models/toy/"

    # inspect: the same layers as on disk, headers and side files only
    here = json.loads(run("inspect", str(local), "--json").stdout)
    there = json.loads(run("inspect", prefix, "--json").stdout)
    assert there["layers"] == here["layers"], "remote inspect differs"
    side = sum((local / n).stat().st_size for n in ("config.json", "quanto_qmap.json", "README.md"))
    assert there["remote"][0]["fetched_bytes"] <= (64 << 10) + side, there["remote"]
    checks += 1

    # convert from the container: byte-identical to convert of the files on disk
    six = ("--to", "plain", "--max-shard-size", "6000")
    a, b = tmp / "a", tmp / "b"
    run("convert", str(local), str(a), *six, "-q")
    run("convert", prefix, str(b), *six, "-q")
    assert tree(a) == tree(b), "remote convert differs"
    checks += 1

    # a file output of several blocks (5 MiB each), committed by its block list
    big = tmp / "big.safetensors"
    bf16_file(big, 12 << 20)
    here = tmp / "big-f32.safetensors"
    run("convert", str(big), str(here), "--to", "plain:f32", "-q")
    url = f"az://{CONTAINER}/out/big-f32.safetensors"
    env_parts = dict(env, CKPTKIT_UPLOAD_PART_SIZE=str(5 << 20))
    r = json.loads(run("convert", str(big), url, "--to", "plain:f32", "--json", environ=env_parts).stdout)
    assert r["upload"]["parts"] == 5, r["upload"]
    got = box.download_blob("out/big-f32.safetensors").readall()
    assert got == here.read_bytes(), "the uploaded file differs from the local output"
    # and read back: every recorded hash checked
    v = json.loads(run("verify", url, "--json").stdout)
    assert v["tensors"] == 1 and v["unchecked"] == 0, v
    refused = run("convert", str(big), url, "--to", "plain:f32", ok=False)
    assert refused.returncode != 0 and "exists" in refused.stderr, refused.stderr
    checks += 1

    # a directory output: the same files as on disk, its record listing them
    run("convert", str(local), f"az://{CONTAINER}/out/toy/", *six, "-q")
    down = tmp / "down"
    download("out/toy/", down)
    assert tree(down) == tree(a), "the uploaded directory differs from the local output"
    checks += 1

    # a plan from the container to the container: jobs upload their files,
    # finish commits the prefix, no record is left
    pf, dest = tmp / "plan.json", f"az://{CONTAINER}/planned/toy/"
    plan = json.loads(run("plan", prefix, dest, *six, "--plan-file", str(pf), "--json").stdout)
    assert all(p["etag"] for p in plan["inputs"]), plan["inputs"]
    for k in range(len(plan["jobs"])):
        run("run-shard", str(pf), str(k), "-q")
    run("finish", str(pf), "-q")
    pdown = tmp / "pdown"
    download("planned/toy/", pdown)
    assert tree(pdown) == tree(a), "the planned output differs from convert's"
    assert not [o for o in objects("planned/toy/") if o.startswith(".ckptkit-jobs/")]
    checks += 1

    # a GGUF file and a container, read from the container as from disk
    for name, args in (("m.ckpk", ()), ("m.gguf", ("--to", "gguf:q8_0", "--gguf-arch", "test"))):
        here = tmp / name
        run("convert", str(big), str(here), *args, "-q")
        box.upload_blob(f"kinds/{name}", here.read_bytes())
        url = f"az://{CONTAINER}/kinds/{name}"
        i_here = json.loads(run("inspect", str(here), "--json").stdout)
        i_there = json.loads(run("inspect", url, "--json").stdout)
        assert i_there["layers"] == i_here["layers"], name
        fa, fb = tmp / f"{name}.a.safetensors", tmp / f"{name}.b.safetensors"
        run("convert", str(here), str(fa), "--to", "plain:f32", "-q")
        run("convert", url, str(fb), "--to", "plain:f32", "-q")
        assert fa.read_bytes() == fb.read_bytes(), name
    checks += 1
    return checks


if __name__ == "__main__":
    main()

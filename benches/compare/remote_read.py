"""Remote inputs and outputs against a local S3 server: ckptkit's convert from
and to s3:// against the same convert on local files, and against boto3
moving the same bytes (download_file / upload_file), in one run.

    python benches/compare/remote_read.py MIGRATE SYNTH WORKDIR [GB] [REPS]

MIGRATE is a `migrate` built with `--features remote`; SYNTH the `synth`
example; WORKDIR a directory on tmpfs (the files are GB each). moto's S3
server runs in this process on 127.0.0.1 (pip install 'moto[server]==5.2.5'
boto3==1.44.8); it is Python, so it is the bottleneck for both clients:
the ratios, not the absolute rates, are the result.
"""

import os
import statistics
import subprocess
import sys
import time
import logging
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from moto.server import ThreadedMotoServer


def timed(f, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    migrate, synth, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    gb = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
    reps = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    work.mkdir(parents=True, exist_ok=True)
    src = work / "in.safetensors"
    subprocess.run([str(synth), str(src), str(gb), "plain-bf16"], check=True, capture_output=True)
    size = src.stat().st_size
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        AWS_ALLOW_HTTP="true",
        CKPTKIT_STAGING=str(work),
    )
    s3 = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="bench",
        aws_secret_access_key="bench", region_name="us-east-1",
    )
    s3.create_bucket(Bucket="bench")
    cfg = TransferConfig(multipart_chunksize=32 << 20, max_concurrency=4)
    # (uploads: boto3 with ckptkit's part size and concurrency)
    s3.upload_file(str(src), "bench", "in.safetensors", Config=cfg)
    url = "s3://bench/in.safetensors"
    (work / "out").mkdir(exist_ok=True)
    out = work / "out" / "out.safetensors"

    def mig(*a):
        subprocess.run([str(migrate), *a, "-q", "--force"], check=True, env=env)

    rows = []
    t_local = timed(lambda: mig("convert", str(src), str(out), "--to", "quanto:qint8"), reps)
    rows.append(("convert local -> local (quanto:qint8)", t_local))
    # moto's cost grows with the number of ranged requests: boto3 is timed
    # with ckptkit's request size (16 MiB, 4 at once) and with its defaults
    same = TransferConfig(multipart_chunksize=16 << 20, max_concurrency=4)
    t_get = timed(lambda: s3.download_file("bench", "in.safetensors", str(out), Config=same), reps)
    rows.append(("boto3 download_file, 16 MiB ranges, 4 at once", t_get))
    t_def = timed(lambda: s3.download_file("bench", "in.safetensors", str(out)), reps)
    rows.append(("boto3 download_file, its defaults (8 MiB ranges, 10 at once)", t_def))
    t_in = timed(lambda: mig("convert", url, str(out), "--to", "quanto:qint8"), reps)
    rows.append(("convert s3:// -> local (quanto:qint8)", t_in))
    mig("convert", str(src), str(out), "--to", "quanto:qint8")
    t_put = timed(lambda: s3.upload_file(str(out), "bench", "copy.safetensors", Config=cfg), reps)
    rows.append(("boto3 upload_file (the output's bytes)", t_put))
    t_out = timed(lambda: mig("convert", str(src), "s3://bench/out.safetensors", "--to", "quanto:qint8"), reps)
    rows.append(("convert local -> s3:// (quanto:qint8)", t_out))
    server.stop()
    print(f"input {size / 1e9:.2f} GB, median of {reps}")
    print("| path | seconds | input GB/s |")
    print("|---|---:|---:|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} | {size / 1e9 / t:.2f} |")
    print(f"convert s3:// / boto3 download at the same request size: {t_in / t_get:.2f}x; "
          f"convert s3:// / convert local: {t_in / t_local:.2f}x; "
          f"convert to s3:// / (convert local + boto3 upload): {t_out / (t_local + t_put):.2f}x")


if __name__ == "__main__":
    main()

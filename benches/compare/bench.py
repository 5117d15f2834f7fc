#!/usr/bin/env python3
"""Side-by-side comparisons for issue 7 (driven by run.sh; standard library only).

Every measured command runs under `/usr/bin/time -v` (peak RSS = "Maximum resident set
size"); wall time is taken around it with a monotonic clock. Each comparison runs REPS times,
interleaved with its baseline (ours, baseline, ours, baseline, ...) so that load from other
processes hits both sides alike; tables show medians. Outputs are deleted between runs
(untimed), so every run writes a fresh file, as `cp` does.
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20
LAYER_ROWS = 4096
LAYER_COLS = 4096
BF16_LAYER = LAYER_ROWS * LAYER_COLS * 2  # 32 MiB, the largest tensor of every synthetic file
I8_LAYER = LAYER_ROWS * LAYER_COLS


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def measure(cmd, env=None):
    """Runs cmd under /usr/bin/time -v; returns wall seconds and peak RSS bytes."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-v", "-o", tf.name] + cmd, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=env)
        wall = time.perf_counter() - t0
        text = open(tf.name).read()
    if p.returncode != 0:
        log(p.stdout.decode(errors="replace")[-4000:])
        log(p.stderr.decode(errors="replace")[-4000:])
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}")
    rss = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Maximum resident set size (kbytes):"):
            rss = int(line.split(":")[1]) * 1024
    return {"wall_s": wall, "rss_bytes": rss, "stdout": p.stdout.decode(errors="replace")}


def size_of(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def rm(*paths):
    for p in paths:
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.remove(p)


def file_hash(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(16 * MIB)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def tensor_digest(path):
    """{name: (dtype, shape, sha256 of the bytes)} of a safetensors file (metadata ignored)."""
    out = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        base = 8 + n
        for name, t in header.items():
            if name == "__metadata__":
                continue
            a, b = t["data_offsets"]
            f.seek(base + a)
            h = hashlib.sha256()
            left = b - a
            while left:
                chunk = f.read(min(left, 16 * MIB))
                h.update(chunk)
                left -= len(chunk)
            out[name] = (t["dtype"], tuple(t["shape"]), h.hexdigest())
    return out


def warm(path):
    """Reads a file once so that it is in the page cache."""
    with open(path, "rb") as f:
        while f.read(64 * MIB):
            pass


def gb(nbytes):
    return nbytes / 1e9


def fmt_s(s):
    return f"{s:.3f} s" if s < 10 else f"{s:.1f} s"


def fmt_mib(b):
    return "n/a" if b is None else f"{b / MIB:,.0f} MiB"


def fmt_size(b):
    return f"{b / 1e9:.3f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"


class Bench:
    def __init__(self, a):
        self.a = a
        self.results = {"tasks": {}, "checks": {}, "compression": {}}
        self.py = os.path.join(a.venv, "bin", "python") if a.venv else None
        self.here = os.path.dirname(os.path.abspath(__file__))
        self.env = dict(os.environ)
        if a.venv:
            self.env["PATH"] = os.path.join(a.venv, "bin") + os.pathsep + self.env.get("PATH", "")

    # -- recording ------------------------------------------------------------------------------
    def record(self, name, m, **info):
        t = self.results["tasks"].setdefault(name, {"runs": []})
        t["runs"].append({"wall_s": m["wall_s"], "rss_bytes": m["rss_bytes"]})
        t.update(info)
        walls = [r["wall_s"] for r in t["runs"]]
        rss = [r["rss_bytes"] for r in t["runs"] if r["rss_bytes"] is not None]
        t["median_wall_s"] = statistics.median(walls)
        t["median_rss_bytes"] = int(statistics.median(rss)) if rss else None
        t["max_rss_bytes"] = max(rss) if rss else None
        log(f"  {name}: {m['wall_s']:.3f} s, {fmt_mib(m['rss_bytes'])}")

    def migrate(self, *args):
        return measure([self.a.migrate, "-q"] + list(args))

    # -- inputs ---------------------------------------------------------------------------------
    def synth(self, path, kind, layers):
        per = I8_LAYER if kind == "quanto-qint8" else BF16_LAYER
        gbytes = (layers * per - 1) / 1e9  # synth takes ceil(GB / layer size) layers
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sh([self.a.synth, path, repr(gbytes), kind, str(LAYER_ROWS), str(LAYER_COLS)],
           stderr=subprocess.DEVNULL)
        return size_of(path)

    # -- phases ---------------------------------------------------------------------------------
    def copy_floor(self, root, disk):
        """cp / cp + sync against the three migrations and verify, on one filesystem."""
        tag = "disk" if disk else "tmpfs"
        layers = self.a.layers
        q = os.path.join(root, "q", "model.safetensors")
        p = os.path.join(root, "p", "model.safetensors")
        log(f"[{tag}] inputs: {layers} layers of {LAYER_ROWS}x{LAYER_COLS} in {root}")
        qs = self.synth(q, "quanto-qint8", layers)
        ps = self.synth(p, "plain-bf16", layers)
        if disk:
            sh(["sync"])
        warm(q)
        warm(p)
        cp_out = os.path.join(root, "cp.out")
        deq = os.path.join(root, "ours-plain.safetensors")
        qnt = os.path.join(root, "ours-quanto", "model.safetensors")
        ckpk = os.path.join(root, "ours.ckpk")
        py_deq = os.path.join(root, "py-plain.safetensors")
        py_qnt = os.path.join(root, "py-quanto", "model.safetensors")
        python = self.py is not None and not disk and "python" not in self.a.skip
        hashes = {}
        for rep in range(self.a.reps):
            last = rep == self.a.reps - 1
            log(f"[{tag}] repetition {rep + 1}/{self.a.reps}")

            def settle():
                if disk:
                    sh(["sync"])

            # baseline: a copy of the larger file (p is the larger side of every job here)
            settle()
            if disk:
                m = measure(["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", p, cp_out])
            else:
                m = measure(["cp", p, cp_out])
            self.record(f"{tag}/cp", m, bytes=ps)
            rm(cp_out)

            settle()
            m = self.migrate("convert", q, deq, "--to", "plain", "--force")
            self.record(f"{tag}/dequantize", m, in_bytes=qs, out_bytes=size_of(deq))
            if last and python:
                hashes["ours-plain"] = tensor_digest(deq)
            rm(deq)

            settle()
            m = self.migrate("convert", p, qnt, "--to", "quanto:qint8", "--force")
            self.record(f"{tag}/quantize", m, in_bytes=ps, out_bytes=size_of(os.path.dirname(qnt)))
            if last and python:
                hashes["ours-quanto"] = tensor_digest(qnt)
            rm(os.path.dirname(qnt))

            # the same two jobs without the per-tensor blake3 that our safetensors outputs
            # record by default (cp computes no hash: this is the like-for-like row)
            settle()
            m = self.migrate("convert", q, deq, "--to", "plain", "--force", "--no-hashes")
            self.record(f"{tag}/dequantize-nohash", m, in_bytes=qs, out_bytes=size_of(deq))
            rm(deq)
            settle()
            m = self.migrate("convert", p, qnt, "--to", "quanto:qint8", "--force", "--no-hashes")
            self.record(f"{tag}/quantize-nohash", m, in_bytes=ps,
                        out_bytes=size_of(os.path.dirname(qnt)))
            rm(os.path.dirname(qnt))

            settle()
            m = self.migrate("convert", p, ckpk, "--force")
            self.record(f"{tag}/keep-ckpk", m, in_bytes=ps, out_bytes=size_of(ckpk))

            if disk:
                sh(["sync"])
            warm(ckpk)
            m = self.migrate("verify", ckpk)
            self.record(f"{tag}/verify", m, in_bytes=size_of(ckpk))
            rm(ckpk)

            if python:
                m = measure([self.py, os.path.join(self.here, "py_quanto.py"), "dequant", q, py_deq],
                            env=self.env)
                self.record(f"{tag}/python-dequantize", m, in_bytes=qs, out_bytes=size_of(py_deq))
                if last:
                    hashes["python-plain"] = tensor_digest(py_deq)
                rm(py_deq)
                m = measure([self.py, os.path.join(self.here, "py_quanto.py"), "quant", p, py_qnt],
                            env=self.env)
                self.record(f"{tag}/python-quantize", m, in_bytes=ps,
                            out_bytes=size_of(os.path.dirname(py_qnt)))
                if last:
                    hashes["python-quanto"] = tensor_digest(py_qnt)
                rm(os.path.dirname(py_qnt))
        if hashes:
            self.results["checks"]["dequantize: every tensor (name, dtype, shape, bytes) identical to the Python path's"] = \
                hashes.get("ours-plain") == hashes.get("python-plain")
            self.results["checks"]["quantize: every tensor (name, dtype, shape, bytes) identical to the Python path's"] = \
                hashes.get("ours-quanto") == hashes.get("python-quanto")
        rm(os.path.dirname(q), os.path.dirname(p))

    def memory(self, root):
        """Peak RSS of every direction at two checkpoint sizes (size of the plain bf16 side)."""
        for size_gb in self.a.mem_sizes:
            layers = max(1, round(size_gb * 1e9 / BF16_LAYER))
            tag = f"memory-{size_gb:g}GB"
            q = os.path.join(root, "mq", "model.safetensors")
            p = os.path.join(root, "mp", "model.safetensors")
            out = os.path.join(root, "mout")
            log(f"[{tag}] {layers} layers of {LAYER_ROWS}x{LAYER_COLS}")
            qs = self.synth(q, "quanto-qint8", layers)
            for rep in range(self.a.mem_reps):
                m = self.migrate("convert", q, os.path.join(out, "plain.safetensors"), "--to", "plain",
                                 "--force")
                self.record(f"{tag}/dequantize", m, in_bytes=qs, out_bytes=size_of(out), layers=layers)
                rm(out)
            rm(os.path.dirname(q))
            ps = self.synth(p, "plain-bf16", layers)
            for rep in range(self.a.mem_reps):
                m = self.migrate("convert", p, os.path.join(out, "model.safetensors"), "--to",
                                 "quanto:qint8", "--force")
                self.record(f"{tag}/quantize", m, in_bytes=ps, out_bytes=size_of(out), layers=layers)
                rm(out)
                m = self.migrate("convert", p, os.path.join(out, "model.ckpk"), "--force")
                self.record(f"{tag}/keep-ckpk", m, in_bytes=ps, out_bytes=size_of(out), layers=layers)
                rm(out)
                m = self.migrate("convert", p, os.path.join(out, "model.ckpk"), "--compress", "zstd",
                                 "--force")
                self.record(f"{tag}/keep-ckpk-zstd", m, in_bytes=ps, out_bytes=size_of(out),
                            layers=layers)
                rm(out)
            rm(os.path.dirname(p))

    def compression(self, root):
        if self.py is None:
            log("[compress] no venv: skipped")
            return
        here_py = os.path.join(self.here, "py_compress.py")
        src = subprocess.run([self.py, here_py, "find-model"], check=True, stdout=subprocess.PIPE,
                             env=self.env).stdout.decode().strip()
        log(f"[compress] model: {src}")
        files = {}
        for dt in ("bf16", "f32"):
            d = os.path.join(root, f"model-{dt}")
            os.makedirs(d, exist_ok=True)
            f = os.path.join(d, "model.safetensors")
            sh([self.py, here_py, "cast", src, f, dt], env=self.env)
            files[dt] = f
        reps = self.a.compress_reps
        for dt, f in files.items():
            raw = size_of(f)
            warm(f)
            res = {"file_bytes": raw}
            ckpk = f[:-len(".safetensors")] + ".ckpk"
            back = os.path.join(os.path.dirname(f), "back", "model.safetensors")
            runs = {"compress": [], "verify": [], "unpack": []}
            for rep in range(reps):
                m = self.migrate("convert", f, ckpk, "--compress", "zstd", "--force")
                runs["compress"].append(m["wall_s"])
                stored = size_of(ckpk)
                m = self.migrate("verify", ckpk)
                runs["verify"].append(m["wall_s"])
                # unpacked without the hash entry, so that the file can be compared whole
                m = self.migrate("convert", ckpk, back, "--force", "--no-hashes")
                runs["unpack"].append(m["wall_s"])
                if rep == 0:
                    res["unpack_identical"] = file_hash(back) == file_hash(f)
                rm(os.path.dirname(back))
                if rep < reps - 1:
                    rm(ckpk)
            res["ours"] = {"stored_bytes": stored, "ratio": stored / raw,
                           "compress_s": runs["compress"], "verify_s": runs["verify"],
                           "unpack_s": runs["unpack"]}
            rm(ckpk)
            m = self.migrate("convert", f, ckpk, "--compress", "zstd", "--no-float-filter", "--force")
            res["ours_no_filter"] = {"stored_bytes": size_of(ckpk), "ratio": size_of(ckpk) / raw}
            rm(ckpk)
            zdt = "bfloat16" if dt == "bf16" else "float32"
            out = subprocess.run([self.py, here_py, "zipnn", f, zdt, str(reps), "2"], check=True,
                                 stdout=subprocess.PIPE, env=self.env).stdout.decode()
            res["zipnn"] = json.loads(out.strip().splitlines()[-1])
            out = subprocess.run([self.py, here_py, "zstd", f, "3", str(reps)], check=True,
                                 stdout=subprocess.PIPE, env=self.env).stdout.decode()
            res["zstd3"] = json.loads(out.strip().splitlines()[-1])
            self.results["compression"][dt] = res
            log(f"  [{dt}] ours {res['ours']['ratio']:.4f} zipnn {res['zipnn']['ratio']:.4f} "
                f"zstd-3 {res['zstd3']['ratio']:.4f}")
        rm(*[os.path.dirname(f) for f in files.values()])


# -- report -------------------------------------------------------------------------------------

def med(xs):
    return statistics.median(xs)


def report(res, a):
    T = res["tasks"]
    rows = []
    verdicts = []

    def row(target, ours, base, ratio, rss, sizes, goal, met):
        rows.append((target, ours, base, ratio, rss, sizes, goal,
                     "n/a" if met is None else ("**yes**" if met else "**no**")))
        verdicts.append({"target": target, "goal": goal, "met": met})

    for tag, limit, base_name in (("tmpfs", 1.5, "cp"), ("disk", 1.2, "cp + sync")):
        base = T.get(f"{tag}/cp")
        if not base:
            continue
        for job, label in (("dequantize", "convert qint8 → plain bf16"),
                           ("dequantize-nohash", "convert qint8 → plain bf16, --no-hashes"),
                           ("quantize", "convert plain bf16 → quanto:qint8"),
                           ("quantize-nohash", "convert plain bf16 → quanto:qint8, --no-hashes"),
                           ("keep-ckpk", "convert keep → .ckpk (uncompressed)")):
            t = T.get(f"{tag}/{job}")
            if not t:
                continue
            r = t["median_wall_s"] / base["median_wall_s"]
            row(f"2 {tag}: {label}", fmt_s(t["median_wall_s"]),
                f"{base_name} {fmt_size(base['bytes'])}: {fmt_s(base['median_wall_s'])}",
                f"{r:.2f}×", f"{fmt_mib(t['median_rss_bytes'])} / {fmt_mib(base['median_rss_bytes'])}",
                f"{fmt_size(t['in_bytes'])} → {fmt_size(t['out_bytes'])}", f"≤ {limit}× {base_name}",
                r <= limit)
        v = T.get(f"{tag}/verify")
        if v:
            rate = gb(v["in_bytes"]) / v["median_wall_s"]
            goal = "≥ 3 GB/s (warm)" if tag == "tmpfs" else "(info)"
            row(f"2 {tag}: verify uncompressed .ckpk", f"{fmt_s(v['median_wall_s'])} = {rate:.2f} GB/s",
                "", "", fmt_mib(v["median_rss_bytes"]), fmt_size(v["in_bytes"]), goal,
                rate >= 3.0 if tag == "tmpfs" else None)

    for job, label in (("dequantize", "dequantize (requantize + dequantize() + save_file)"),
                       ("quantize", "quantize (quantize + freeze + save_file)")):
        o, p = T.get(f"tmpfs/{job}"), T.get(f"tmpfs/python-{job}")
        if not (o and p):
            continue
        speed = p["median_wall_s"] / o["median_wall_s"]
        mem = p["median_rss_bytes"] / o["median_rss_bytes"]
        row(f"3 vs Python: {label}", fmt_s(o["median_wall_s"]), f"Python {fmt_s(p['median_wall_s'])}",
            f"{speed:.1f}× faster, {mem:.1f}× less memory",
            f"{fmt_mib(o['median_rss_bytes'])} / {fmt_mib(p['median_rss_bytes'])}",
            f"{fmt_size(o['in_bytes'])} → {fmt_size(o['out_bytes'])}", "≥ 5× faster, ≥ 20× less memory",
            speed >= 5 and mem >= 20)

    bound = 4 * BF16_LAYER + 64 * MIB
    sizes = sorted({k.split("/")[0] for k in T if k.startswith("memory-")},
                   key=lambda s: float(s[len("memory-"):-2]))
    for job in ("dequantize", "quantize", "keep-ckpk", "keep-ckpk-zstd"):
        ts = [(s, T.get(f"{s}/{job}")) for s in sizes]
        ts = [(s, t) for s, t in ts if t]
        if not ts:
            continue
        peaks = [t["max_rss_bytes"] for _, t in ts]
        within = max(peaks) <= bound
        flat = max(peaks) <= 1.10 * min(peaks)
        row(f"1 memory: {job}",
            ", ".join(f"{s[len('memory-'):]}: {fmt_mib(t['max_rss_bytes'])}" for s, t in ts),
            f"bound {fmt_mib(bound)}", f"{max(peaks) / bound:.2f}× bound; "
            f"largest/smallest {max(peaks) / min(peaks):.2f}", "",
            ", ".join(f"{fmt_size(t['in_bytes'])} → {fmt_size(t['out_bytes'])}" for _, t in ts),
            "≤ 4 × 32 MiB + 64 MiB, flat within 10 %", within and flat)

    C = res["compression"]
    for dt, goal_ratio in (("bf16", 0.665), ("f32", 0.82)):
        c = C.get(dt)
        if not c:
            continue
        raw = c["file_bytes"]
        o, z, s = c["ours"], c["zipnn"], c["zstd3"]
        oc = gb(raw) / med(o["compress_s"])
        ov = gb(raw) / med(o["verify_s"])
        ou = gb(raw) / med(o["unpack_s"])
        zc = gb(raw) / med(z["compress_s"])
        zd = gb(raw) / med(z["decompress_s"])
        sc = gb(raw) / med(s["compress_s"])
        sd = gb(raw) / med(s["decompress_s"])
        row(f"4 {dt}: size ratio", f"{o['ratio']:.4f} (no filter {c['ours_no_filter']['ratio']:.4f})",
            f"ZipNN {z['ratio']:.4f}; zstd-3 {s['ratio']:.4f}", f"{o['ratio'] / z['ratio']:.3f}", "",
            f"{fmt_size(raw)} → {fmt_size(o['stored_bytes'])}",
            f"≤ ZipNN (ref. {goal_ratio})", o["ratio"] <= z["ratio"])
        row(f"4 {dt}: compress", f"{oc:.2f} GB/s (whole process)",
            f"ZipNN {zc:.2f} GB/s (in memory, 2 threads); zstd-3 {sc:.2f} GB/s", f"{oc / zc:.2f}×", "",
            fmt_size(raw), "≥ ZipNN", oc >= zc)
        row(f"4 {dt}: decompress", f"verify {ov:.2f} GB/s; unpack {ou:.2f} GB/s (whole process)",
            f"ZipNN {zd:.2f} GB/s; zstd-3 {sd:.2f} GB/s", f"{ov / zd:.2f}× (verify)", "",
            fmt_size(raw), "≥ ZipNN", ov >= zd)

    head = ["target", "ours (median)", "baseline (median)", "ratio", "peak RSS ours / baseline",
            "sizes", "goal", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(x).replace("|", "\\|") for x in r) + " |")
    if res["checks"]:
        lines.append("")
        for k, v in res["checks"].items():
            lines.append(f"- {k}: {'yes' if v else 'no'}")
    for dt, c in C.items():
        if "unpack_identical" in c:
            lines.append(f"- {dt}: compressed container unpacks to the identical file: "
                         f"{'yes' if c['unpack_identical'] else 'no'}")
    return "\n".join(lines) + "\n", verdicts


def machine():
    def out(cmd):
        try:
            return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  check=False).stdout.decode().strip()
        except OSError:
            return ""
    return {"nproc": out(["nproc"]), "uptime": out(["uptime"]), "kernel": platform.release(),
            "lscpu": out(["lscpu"]).splitlines()[:20], "free": out(["free", "-h"])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--migrate", required=True)
    ap.add_argument("--synth", required=True)
    ap.add_argument("--venv", default=None, help="Python peers' venv (none: Python rows skipped)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shm", default="/dev/shm/ckptkit-bench")
    ap.add_argument("--disk", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--skip", default="", help="comma list of: tmpfs,disk,memory,python,compress")
    ap.add_argument("--command", default="", help="the command line, for the report")
    a = ap.parse_args()
    a.skip = {s for s in a.skip.split(",") if s}
    a.layers = 4 if a.quick else 64
    a.mem_sizes = [0.25, 1.0] if a.quick else [1.0, 4.0]
    a.mem_reps = 1 if a.quick else 2
    a.compress_reps = max(a.reps, 5)

    b = Bench(a)
    started = time.time()
    b.results["config"] = {"quick": a.quick, "reps": a.reps, "layers": a.layers,
                           "layer_shape": [LAYER_ROWS, LAYER_COLS], "memory_sizes_gb": a.mem_sizes,
                           "shm": a.shm, "disk": a.disk, "command": a.command,
                           "date": datetime.datetime.now().isoformat(timespec="seconds")}
    b.results["machine_before"] = machine()
    for d in (a.shm, a.disk):
        rm(d)
        os.makedirs(d)
    try:
        if "tmpfs" not in a.skip:
            b.copy_floor(a.shm, disk=False)
        if "disk" not in a.skip:
            b.copy_floor(a.disk, disk=True)
        if "memory" not in a.skip:
            b.memory(a.shm)
        if "compress" not in a.skip:
            b.compression(a.shm)
    finally:
        rm(a.shm, a.disk)
    b.results["machine_after"] = {"uptime": machine()["uptime"]}
    b.results["elapsed_s"] = time.time() - started
    table, verdicts = report(b.results, a)
    b.results["verdicts"] = verdicts
    os.makedirs(a.out_dir, exist_ok=True)
    suffix = ""
    mach = b.results["machine_before"]
    md = [f"# ckptkit comparisons{' (quick run)' if a.quick else ''}", "",
          f"- command: `{a.command}`",
          f"- date: {b.results['config']['date']}, elapsed {b.results['elapsed_s']:.0f} s",
          f"- inputs: {a.layers} layers of bf16 [{LAYER_ROWS}, {LAYER_COLS}] (largest tensor 32 MiB); "
          f"{a.reps} repetitions, medians",
          f"- machine: {mach['nproc']} CPUs; load before: `{mach['uptime']}`; after: "
          f"`{b.results['machine_after']['uptime']}`", "", table]
    with open(os.path.join(a.out_dir, f"results{suffix}.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(a.out_dir, f"results{suffix}.json"), "w") as f:
        json.dump(b.results, f, indent=1)
    print(table)


if __name__ == "__main__":
    main()

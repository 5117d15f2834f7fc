"""BF16 safetensors to quantized GGUF (Q8_0, Q4_0), file to file: ckptkit against gguf-py.

    python benches/compare/gguf_quant.py MIGRATE WORKDIR [REPS] [--size-gb X] [--types q8_0,q4_0]

To reproduce (WORKDIR on tmpfs, so the disk's pace does not hide the conversion's):

    cargo build --release --example migrate
    bash tests/interop/gguf/setup_venv.sh
    target/gguf-venv/bin/python benches/compare/gguf_quant.py target/release/examples/migrate /dev/shm/ggufq 3

Run it with the pinned gguf-py venv (`target/gguf-venv/bin/python`: gguf 0.19.0, numpy 2.4.6,
safetensors 0.8.0; no torch). REPS defaults to 3, --size-gb to 1.0, --types to q8_0,q4_0. Peak RSS is
read from `/usr/bin/time -v`, which must be installed.

Input. The first run writes `WORKDIR/bf16-X.safetensors` (kept for later runs of the same size;
delete it to remake): a seeded BF16 model of about X GB (1 GB = 1e9 bytes), N layers
`layers.{i}.weight` [4096, 4096] and `layers.{i}.bias` [4096], N = round(X GB / 33.6 MB). Values are
drawn from a seeded numpy generator 512 rows at a time, N(0, 0.02) times a per-row scale
exp(0.5 z) (z standard normal), rounded from f32 to bf16 to nearest even, and each chunk is written
as soon as it is drawn: the safetensors file is written by hand (8-byte little-endian header length,
the JSON header with dtype "BF16", shape and data_offsets, then the data), so the generator holds one
chunk at a time (safetensors.numpy cannot hold bf16, nor write a file in pieces).

Paths, each run as a fresh process writing a GGUF file (general.architecture "test") into WORKDIR:

- ckptkit: `MIGRATE -q convert IN OUT.gguf --to gguf:TYPE --gguf-arch test --force`. Weights of 2 to
           4 dims with more than 1024 elements and a row length that is a multiple of 32 are quantized
           to TYPE; other tensors (here the biases) keep their dtype, BF16;
- gguf-py: what a script built on gguf-py does (`python gguf_quant.py --run-gguf-py IN OUT TYPE`):
           a numpy memmap of the safetensors file, each tensor's bf16 bits widened to f32
           (bits << 16), `gguf.quants.quantize(w, TYPE)` for the weights the same rule picks, the
           biases' raw bf16 bits as they are (raw_dtype BF16, as ckptkit writes them);
           `GGUFWriter.add_tensor(name, q, raw_dtype=...)` for each, then `write_header_to_file`,
           `write_kv_data_to_file`, `write_tensors_to_file`. GGUFWriter keeps every added tensor in
           memory until `write_tensors_to_file`, so this path holds the whole quantized model at once;
           and the memmapped input pages it has read stay mapped (they count in its RSS too).
           gguf-py's quantizers are numpy, one core; the time includes importing numpy and gguf;
- cp input:  `cp IN COPY`: the baseline of the issue's target (ckptkit within 1.5x of it), as in the
           other quantize rows of BENCHMARKS.md: reading the input and writing a file its size;
- cp output: `cp OUT OUT2`, OUT being ckptkit's checked GGUF output kept aside: a copy of a file the
           size of the output (a stricter floor, for information).

Method. Before timing, ckptkit and gguf-py run once per type (untimed) and both GGUF files are read
with `gguf.GGUFReader` (in a child process): same tensor names, and for each the same GGML type,
shape and data bytes (`tensor.data`), or the first difference is printed and the script exits 1 (it
also exits 1, with ckptkit's message, if ckptkit refuses the input). Then runs alternate (ckptkit,
gguf-py, cp, ckptkit, ...), REPS each per type; outputs are deleted between runs (not timed); the
page cache is warm. Each run is `/usr/bin/time -v CMD` (stdout to /dev/null): wall seconds from
Python's `time.perf_counter` around it, peak RSS from its "Maximum resident set size". The table gives
wall-second medians, the ratio to ckptkit's median, and the largest peak RSS over the runs; a line
below it the min-max spread of each path's wall seconds, then for each type whether the two speed
targets are met (gguf-py's median at least 20x ckptkit's; ckptkit's at most 1.5x `cp input`'s).

Memory bound. ckptkit's goal is a peak RSS within 4x the largest output tensor + 64 MiB: up to four
tensor-sized buffers in flight plus a fixed allowance for the program, so memory does not grow with
the checkpoint. The script reads the largest tensor from ckptkit's GGUF output (a Q8_0 [4096, 4096] is
17 MiB, a Q4_0 one 9 MiB), prints the bound, and whether ckptkit's peak RSS met it.

WORKDIR is deleted at the end (the input is large), unless --keep is given.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

DIM = 4096
CHUNK = 512
SEED = 20251203
MIB = 1024 * 1024
LAYER_BYTES = (DIM * DIM + DIM) * 2
PATHS = ("ckptkit", "gguf-py", "cp input", "cp output")


# ---- children: input generation, the gguf-py path, output comparison


def to_bf16_bits(x):
    """f32 array -> uint16 bf16 bits, rounded to nearest even (no NaN in these inputs)."""
    import numpy as np

    b = x.astype(np.float32, copy=False).view(np.uint32)
    return ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def make_input(path, layers):
    import numpy as np

    names, off = {}, 0
    for i in range(layers):
        for name, shape in ((f"layers.{i}.weight", [DIM, DIM]), (f"layers.{i}.bias", [DIM])):
            n = 2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
            names[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
            off += n
    hdr = json.dumps({"__metadata__": {"format": "pt"}, **names}, separators=(",", ":")).encode()
    hdr += b" " * (-len(hdr) % 8)
    g = np.random.default_rng(SEED)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(hdr)))
        f.write(hdr)
        for i in range(layers):
            for r in range(0, DIM, CHUNK):
                std = np.float32(0.02) * np.exp(np.float32(0.5) * g.standard_normal((CHUNK, 1), np.float32))
                f.write(to_bf16_bits(g.standard_normal((CHUNK, DIM), np.float32) * std).tobytes())
            std = np.float32(0.02) * np.exp(np.float32(0.5) * g.standard_normal(dtype=np.float32))
            f.write(to_bf16_bits(g.standard_normal(DIM, np.float32) * std).tobytes())
        assert f.tell() == 8 + len(hdr) + off
    os.replace(path + ".tmp", path)


def quantized(shape, row_block=32):
    n = 1
    for d in shape:
        n *= d
    return 2 <= len(shape) <= 4 and n > 1024 and shape[-1] % row_block == 0


def run_gguf_py(src, out, qname):
    """A user's script on gguf-py: memmap the safetensors file, quantize, GGUFWriter."""
    import numpy as np
    import gguf

    qtype = gguf.GGMLQuantizationType[qname.upper()]
    with open(src, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        hdr = json.loads(f.read(n))
    hdr.pop("__metadata__", None)
    mm = np.memmap(src, dtype=np.uint8, mode="r")
    base = 8 + n
    w = gguf.GGUFWriter(out, arch="test")
    for name, info in sorted(hdr.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        assert info["dtype"] == "BF16", (name, info["dtype"])
        s, e = info["data_offsets"]
        bits = mm[base + s : base + e].view(np.uint16).reshape(info["shape"])
        if quantized(info["shape"], gguf.GGML_QUANT_SIZES[qtype][0]):
            x = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.array(bits), raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def compare(a, b):
    """Exit 0 (printing {"tensors": n, "largest": bytes, "types": {...}} as JSON) when GGUF files A and B
    hold the same tensors (names, GGML types, shapes, data bytes); else print the first difference and
    exit 1."""
    import numpy as np
    from gguf import GGUFReader

    ra, rb = GGUFReader(a), GGUFReader(b)
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    if ta.keys() != tb.keys():
        sys.exit(f"names differ: only in {a}: {sorted(ta.keys() - tb.keys())[:5]}; "
                 f"only in {b}: {sorted(tb.keys() - ta.keys())[:5]}")
    types = {}
    for k in sorted(ta):
        x, y = ta[k], tb[k]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            sys.exit(f"{k}: {x.tensor_type.name} {list(x.shape)} in {a}, {y.tensor_type.name} {list(y.shape)} in {b}")
        xb = np.ascontiguousarray(x.data).reshape(-1).view(np.uint8)
        yb = np.ascontiguousarray(y.data).reshape(-1).view(np.uint8)
        if xb.size != yb.size:
            sys.exit(f"{k}: {xb.size} data bytes in {a}, {yb.size} in {b}")
        if not np.array_equal(xb, yb):
            d = np.flatnonzero(xb != yb)
            sys.exit(f"{k} ({x.tensor_type.name}): byte {d[0]} is 0x{xb[d[0]]:02x} in {a}, 0x{yb[d[0]]:02x} "
                     f"in {b}; {d.size} bytes differ in this tensor")
        types[x.tensor_type.name] = types.get(x.tensor_type.name, 0) + 1
    print(json.dumps({"tensors": len(ta), "largest": max(int(t.n_bytes) for t in ta.values()), "types": types}))


# ---- the parent: stdlib only


def measure(cmd):
    """Runs `/usr/bin/time -v CMD` (stdout to /dev/null): (wall s, peak RSS MiB, exit code, stderr)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-v", "-o", tf.name, *cmd],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", tf.read())
    return wall, (int(m.group(1)) / 1024 if m else float("nan")), p.returncode, p.stderr


def self_cmd(*args):
    return [sys.executable, os.path.abspath(__file__), *args]


def rm(path):
    if os.path.exists(path):
        os.remove(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("migrate")
    ap.add_argument("workdir")
    ap.add_argument("reps", nargs="?", type=int, default=3)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--types", default="q8_0,q4_0")
    ap.add_argument("--keep", action="store_true", help="keep WORKDIR (and the input) at the end")
    a = ap.parse_args()
    types = [t.strip().lower() for t in a.types.split(",") if t.strip()]
    for t in types:
        if t not in ("q8_0", "q4_0"):
            sys.exit(f"unsupported type {t!r} (q8_0, q4_0)")
    layers = max(1, round(a.size_gb * 1e9 / LAYER_BYTES))
    migrate = os.path.abspath(a.migrate) if os.sep in a.migrate else a.migrate
    t_start = time.perf_counter()
    os.makedirs(a.workdir, exist_ok=True)
    try:
        src = os.path.join(a.workdir, f"bf16-{a.size_gb:g}.safetensors")
        if not os.path.exists(src):
            print(f"making {src} (seed {SEED}, {layers} layers) ...", flush=True)
            wall, rss, rc, err = measure(self_cmd("--make", src, str(layers)))
            if rc != 0:
                sys.exit(f"making {src} failed (exit {rc}):\n{err.strip()}")
            print(f"made {src}: {os.path.getsize(src) / 1e9:.3f} GB in {wall:.1f} s, "
                  f"generator peak RSS {rss:.0f} MiB", flush=True)

        plans, results = {}, {}
        for t in types:
            outs = {n: os.path.join(a.workdir, f"out-{t}-{n}.gguf") for n in PATHS}
            cmds = {
                "ckptkit": [migrate, "-q", "convert", src, outs["ckptkit"], "--to", f"gguf:{t}",
                            "--gguf-arch", "test", "--force"],
                "gguf-py": self_cmd("--run-gguf-py", src, outs["gguf-py"], t),
                "cp input": ["cp", src, outs["cp input"]],
                "cp output": None,
            }
            # Check before timing: both write the same tensors, byte for byte.
            for n in ("ckptkit", "gguf-py"):
                rm(outs[n])
                wall, rss, rc, err = measure(cmds[n])
                if rc != 0:
                    what = "ckptkit refused" if n == "ckptkit" else f"{n} failed on"
                    sys.exit(f"[{t}] {what} {src} (exit {rc}):\n{err.strip()}")
                print(f"[{t}] check run: {n} {wall:.2f} s, peak RSS {rss:.0f} MiB", flush=True)
            p = subprocess.run(self_cmd("--compare", outs["ckptkit"], outs["gguf-py"]),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if p.returncode != 0:
                print(f"[{t}] ckptkit and gguf-py wrote different tensors; first difference:\n"
                      f"{p.stderr.strip()}", file=sys.stderr)
                sys.exit(1)
            info = json.loads(p.stdout)
            results[t] = {"out": {n: os.path.getsize(outs[n]) for n in ("ckptkit", "gguf-py")}, **info}
            print(f"[{t}] ckptkit and gguf-py GGUF files hold the same {info['tensors']} tensors "
                  f"(names, types {info['types']}, shapes, data bytes)", flush=True)
            floor = os.path.join(a.workdir, f"floor-{t}.gguf")
            os.replace(outs["ckptkit"], floor)
            cmds["cp output"] = ["cp", floor, outs["cp output"]]
            rm(outs["gguf-py"])
            plans[t] = (outs, cmds)

        for t, (outs, cmds) in plans.items():
            times = {n: [] for n in cmds}
            rss = {n: [] for n in cmds}
            for _ in range(a.reps):
                for n, c in cmds.items():
                    rm(outs[n])
                    wall, peak, rc, err = measure(c)
                    if rc != 0:
                        sys.exit(f"[{t}] {n} exited {rc} in a timed run:\n{err.strip()}")
                    times[n].append(wall)
                    rss[n].append(peak)
                    rm(outs[n])
            results[t]["times"], results[t]["rss"] = times, rss
            print(f"[{t}] timed: " + json.dumps({n: [round(x, 3) for x in v] for n, v in times.items()}),
                  flush=True)

        print(f"\n## BF16 -> GGUF, {a.reps} runs per path, alternating\n")
        print(f"input {src}: {os.path.getsize(src) / 1e9:.3f} GB ({layers} layers); outputs: "
              + "; ".join(f"{t} {r['out']['ckptkit'] / 1e9:.3f} GB" for t, r in results.items()) + "\n")
        print("| type | path | median s | / ckptkit | peak RSS MiB |")
        print("|---|---|---:|---:|---:|")
        for t, r in results.items():
            base = statistics.median(r["times"]["ckptkit"])
            for n, v in r["times"].items():
                m = statistics.median(v)
                print(f"| {t.upper() if n == 'ckptkit' else ''} | {n} | {m:.2f} | {m / base:.2f} | "
                      f"{max(r['rss'][n]):.0f} |")
        print("\nspread (min-max s): " + "; ".join(
            f"{t} {n} {min(v):.2f}-{max(v):.2f}" for t, r in results.items() for n, v in r["times"].items()))
        print()
        for t, r in results.items():
            largest = r["largest"]
            bound = 4 * largest + 64 * MIB
            peak = max(r["rss"]["ckptkit"])
            print(f"[{t}] RSS bound: 4 x the largest output tensor ({largest / MIB:.1f} MiB) + 64 MiB = "
                  f"{bound / MIB:.0f} MiB; ckptkit peak {peak:.0f} MiB ({peak * MIB / bound:.2f}x bound): "
                  + ("met" if peak * MIB <= bound else "NOT met"))
        for t, r in results.items():
            med = {n: statistics.median(v) for n, v in r["times"].items()}
            speed = med["gguf-py"] / med["ckptkit"]
            vs_cp = med["ckptkit"] / med["cp input"]
            print(f"[{t}] targets: >= 20x gguf-py: {speed:.1f}x, " + ("met" if speed >= 20 else "NOT met")
                  + f"; <= 1.5x cp of the input: {vs_cp:.2f}x, " + ("met" if vs_cp <= 1.5 else "NOT met"))
        print(f"\ntotal {time.perf_counter() - t_start:.0f} s", flush=True)
    finally:
        if a.keep:
            for t in types:
                for n in PATHS:
                    rm(os.path.join(a.workdir, f"out-{t}-{n}.gguf"))
        else:
            shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--make":
        make_input(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) == 5 and sys.argv[1] == "--run-gguf-py":
        run_gguf_py(sys.argv[2], sys.argv[3], sys.argv[4])
    elif len(sys.argv) == 4 and sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        main()

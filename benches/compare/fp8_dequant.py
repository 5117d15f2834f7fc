"""FP8 dequantization to BF16, file to file: ckptkit against the libraries that define the layouts.

    python benches/compare/fp8_dequant.py MIGRATE WORKDIR [REPS] [--layout block|comfy|both]

To reproduce (WORKDIR on tmpfs, so the disk's pace does not hide the conversion's):

    cargo build --release --example migrate
    target/interop-venv/bin/python benches/compare/fp8_dequant.py target/release/examples/migrate /dev/shm/fp8d 5

Run it with a Python that has torch, safetensors 0.8.0, transformers 5.24.0 and comfy-kitchen 0.2.40
(`target/interop-venv/bin/python`). REPS defaults to 3, --layout to both.

Inputs. The first run makes them in WORKDIR (kept for later runs; delete them to remake). Both come
from one seeded BF16 model of 1.0 GB that is never written out: 30 Linear layers `layers.{i}` with a
`weight` [4096, 4096] (layer 1's is ragged, [4000, 4000], so partial blocks occur on both edges) and
a BF16 `bias` [N]. Weights are drawn chunk by chunk (512 rows) from a seeded torch generator, with a
spread of row and layer magnitudes so that the scales differ; each is quantized as it is drawn, and
only the FP8 codes are kept, so the generator holds about the FP8 file at once. The quantizers are the
reference libraries' own:

- block (`fp8-block.safetensors`, DeepSeek style): transformers' `Fp8Quantize._quantize_one` with
  `FineGrainedFP8Config(weight_block_size=(128, 128))` (scale_fmt "float"): `{m}.weight` F8_E4M3
  [N, K] and `{m}.weight_scale_inv` F32 [ceil(N/128), ceil(K/128)]. The ragged weight is zero-padded
  to whole blocks, quantized, and its codes cropped back to [N, K] (zeros do not change a block's
  amax, so the scales are those of the weight alone);
- comfy (`fp8-comfy.safetensors`, ComfyUI `comfy_quant`): comfy-kitchen's
  `QuantizedTensor.from_float(w, "TensorCoreFP8Layout", scale="recalculate",
  dtype=float8_e4m3fn)` (eager backend): `{m}.weight` F8_E4M3, `{m}.weight_scale` F32 [], and the
  marker `{m}.comfy_quant` U8, the bytes of `{"format": "float8_e4m3fn"}`.

Paths, each run as a fresh process writing a BF16 checkpoint (every weight dequantized, scales and
markers left out, biases copied) into WORKDIR:

- ckptkit:       `MIGRATE -q convert IN OUT --to plain --force` (the model dtype is the biases' BF16);
- transformers:  (block) `safe_open(IN, "pt")`, one weight and its scale at a time through
                 `Fp8Dequantize._dequantize_one(q, s, output_dtype=torch.bfloat16)`, results collected
                 and written with `save_file`. `_dequantize_one` takes the block size from the shapes
                 (N / scale rows, K / scale columns) and only refuses shapes that do not divide: for
                 the [4000, 4000] weight with its [32, 32] scales it would silently use 125-wide
                 blocks. So, like a careful script, this path zero-pads a ragged weight's codes to
                 whole 128-blocks first and crops the result. The quantizer argument of
                 `Fp8Dequantize` is a stand-in (`_dequantize_one` does not read it);
- comfy-kitchen: (comfy) `safe_open`, one weight at a time through
                 `comfy_kitchen.dequantize_per_tensor_fp8(q, s, torch.bfloat16)` under
                 `registry.use_backend("eager")`, markers dropped, `save_file`;
- cp:            `cp PLAIN OUT`, PLAIN being ckptkit's checked BF16 output kept aside: the floor, a copy of
                 a file the size of the output (WORKDIR/plain-LAYOUT.safetensors).

The Python paths use all cores (`torch.set_num_threads(os.cpu_count())`); their time includes
importing torch and the library, as it would for any script.

Method. Before timing, ckptkit and the reference run once per layout (untimed) and their outputs
are compared: same keys, dtypes, shapes and bytes; otherwise the first difference is printed and the
script exits 1 (it also exits 1, with ckptkit's message, if ckptkit refuses the input). Then runs
alternate (ckptkit, reference, cp, ckptkit, ...), REPS each; outputs are deleted between runs (not
timed); the page cache is warm. Each run is measured as `measure.sh` does: fork/exec, wall time to
the child's exit, peak RSS from `os.wait4`'s `ru_maxrss`. This process imports no torch (the
comparison and the input generation run in children of their own), so the RSS a forked child
inherits from it before exec stays at the interpreter's ~10 MiB. The tables give wall-second
medians, the ratio to ckptkit's median, and the largest peak RSS over the runs.

Memory bound. ckptkit's goal is a peak RSS within 4x the largest output tensor + 64 MiB: up to four
tensor-sized buffers in flight (read, convert, write) plus a fixed allowance for the program, so
memory does not grow with the checkpoint. Here the largest output tensor is a BF16 [4096, 4096],
32 MiB, so the bound is 4 x 32 + 64 = 192 MiB; the script reads the largest tensor from ckptkit's
output header, prints the bound, and whether ckptkit's peak RSS met it.
"""

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time

LAYERS = 30
DIM = 4096
RAGGED = (1, (4000, 4000))  # layer index, [N, K]
BLOCK = 128
SEED = 20240917
MIB = 1024 * 1024
INPUTS = {"block": "fp8-block.safetensors", "comfy": "fp8-comfy.safetensors"}
REFERENCE = {"block": "transformers", "comfy": "comfy-kitchen"}

BLOCK_REF = r"""
import os, sys, torch
from types import SimpleNamespace
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.integrations.finegrained_fp8 import Fp8Dequantize
torch.set_num_threads(os.cpu_count() or 1)
src, out, block = sys.argv[1], sys.argv[2], int(sys.argv[3])
deq = Fp8Dequantize(SimpleNamespace(quantization_config=None))  # not read by _dequantize_one
res = {}
with safe_open(src, "pt") as f:
    keys = set(f.keys())
    for k in f.keys():
        if k.endswith(".weight_scale_inv"):
            continue
        sk = k[: -len(".weight")] + ".weight_scale_inv"
        if not (k.endswith(".weight") and sk in keys):
            res[k] = f.get_tensor(k)
            continue
        q, s = f.get_tensor(k), f.get_tensor(sk)
        n, m = q.shape
        pn, pm = s.shape[0] * block, s.shape[1] * block
        if (pn, pm) != (n, m):  # ragged: whole blocks, or _dequantize_one picks another block size
            p = torch.zeros(pn, pm, dtype=q.dtype)
            p[:n, :m] = q
            q = p
        res[k] = deq._dequantize_one(q, s, output_dtype=torch.bfloat16)[:n, :m].contiguous()
save_file(res, out)
"""

COMFY_REF = r"""
import json, os, sys, torch
import comfy_kitchen as ck
from comfy_kitchen.registry import registry
from safetensors import safe_open
from safetensors.torch import save_file
torch.set_num_threads(os.cpu_count() or 1)
src, out = sys.argv[1], sys.argv[2]
res = {}
with registry.use_backend("eager"), safe_open(src, "pt") as f:
    keys = set(f.keys())
    for k in f.keys():
        if k.endswith(".comfy_quant") or k.endswith(".weight_scale"):
            continue
        m = k[: -len(".weight")]
        if not (k.endswith(".weight") and m + ".comfy_quant" in keys):
            res[k] = f.get_tensor(k)
            continue
        fmt = json.loads(bytes(f.get_tensor(m + ".comfy_quant").tolist()))["format"]
        assert fmt == "float8_e4m3fn", (k, fmt)
        res[k] = ck.dequantize_per_tensor_fp8(f.get_tensor(k), f.get_tensor(m + ".weight_scale"),
                                              torch.bfloat16)
save_file(res, out)
"""


# ---- children: input generation and output comparison (they import torch, this process does not)


def bf16_model():
    """Yields (module, weight, bias) of the seeded BF16 model, one layer at a time."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    for i in range(LAYERS):
        n, k = RAGGED[1] if i == RAGGED[0] else (DIM, DIM)
        layer_mag = 2.0 ** (i % 5 - 2)
        w = torch.empty(n, k, dtype=torch.bfloat16)
        for r in range(0, n, 512):
            rows = min(512, n - r)
            std = 0.02 * layer_mag * torch.exp(0.5 * torch.randn(rows, 1, generator=g))
            w[r : r + rows] = (torch.randn(rows, k, generator=g) * std).to(torch.bfloat16)
        b = (0.01 * torch.randn(n, generator=g)).to(torch.bfloat16)
        yield f"layers.{i}", w, b


def make_input(layout, path):
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(os.cpu_count() or 1)
    res = {}
    if layout == "block":
        from types import SimpleNamespace

        from transformers import FineGrainedFP8Config
        from transformers.integrations.finegrained_fp8 import Fp8Quantize

        cfg = FineGrainedFP8Config(weight_block_size=(BLOCK, BLOCK))
        quant = Fp8Quantize(SimpleNamespace(quantization_config=cfg))
        for m, w, b in bf16_model():
            n, k = w.shape
            pn, pk = -(-n // BLOCK) * BLOCK, -(-k // BLOCK) * BLOCK
            if (pn, pk) != (n, k):
                p = torch.zeros(pn, pk, dtype=w.dtype)
                p[:n, :k] = w
                w = p
            q = quant._quantize_one(m + ".weight", w)
            res[m + ".weight"] = q[m + ".weight"][:n, :k].contiguous()
            res[m + ".weight_scale_inv"] = q[m + ".weight_scale_inv"].contiguous()
            assert res[m + ".weight"].dtype == torch.float8_e4m3fn, m
            res[m + ".bias"] = b
    else:
        from comfy_kitchen.registry import registry
        from comfy_kitchen.tensor import QuantizedTensor

        marker = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
        with registry.use_backend("eager"):
            for m, w, b in bf16_model():
                q = QuantizedTensor.from_float(w, "TensorCoreFP8Layout", scale="recalculate",
                                               dtype=torch.float8_e4m3fn)
                res.update({kk: vv.contiguous() for kk, vv in q.state_dict(m + ".weight").items()})
                res[m + ".comfy_quant"] = marker.clone()
                res[m + ".bias"] = b
    save_file(res, path + ".tmp")
    os.replace(path + ".tmp", path)


def compare(a, b):
    """Exit 0 when A and B hold the same tensors (keys, dtypes, shapes, bytes); else print the first
    difference and exit 1."""
    import torch
    from safetensors import safe_open

    with safe_open(a, "pt") as x, safe_open(b, "pt") as y:
        ka, kb = set(x.keys()), set(y.keys())
        if ka != kb:
            sys.exit(f"keys differ: only in {a}: {sorted(ka - kb)[:5]}; only in {b}: {sorted(kb - ka)[:5]}")
        for k in sorted(ka):
            s, t = x.get_tensor(k), y.get_tensor(k)
            if s.dtype != t.dtype or s.shape != t.shape:
                sys.exit(f"{k}: {s.dtype} {list(s.shape)} in {a}, {t.dtype} {list(t.shape)} in {b}")
            sb, tb = s.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
            if not torch.equal(sb, tb):
                e = int(torch.nonzero(sb != tb)[0]) // s.element_size()
                idx = list(torch.unravel_index(torch.tensor(e), s.shape)) if s.dim() else []
                sv, tv = (u.reshape(-1)[e : e + 1] for u in (s, t))
                hx = [bytes(u.view(torch.uint8).tolist())[::-1].hex() for u in (sv, tv)]
                sys.exit(f"{k}{[int(i) for i in idx]}: {sv.float().item()!r} (0x{hx[0]}) in {a}, "
                         f"{tv.float().item()!r} (0x{hx[1]}) in {b}; "
                         f"{int((sb != tb).sum())} bytes differ in this tensor")


# ---- the parent: stdlib only


def measure(cmd):
    """Runs CMD (stdout to /dev/null): (wall s, peak RSS MiB, exit code), as measure.sh does."""
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, 1)
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    _, status, ru = os.wait4(pid, 0)
    return time.monotonic() - t0, ru.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h


def largest_tensor(path):
    return max(e - s for s, e in (v["data_offsets"] for v in header(path).values()))


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
    ap.add_argument("--layout", choices=("block", "comfy", "both"), default="both")
    a = ap.parse_args()
    layouts = ["block", "comfy"] if a.layout == "both" else [a.layout]
    os.makedirs(a.workdir, exist_ok=True)
    migrate = os.path.abspath(a.migrate) if os.sep in a.migrate else a.migrate

    plans = {}
    for lay in layouts:
        src = os.path.join(a.workdir, INPUTS[lay])
        if not os.path.exists(src):
            print(f"making {src} (seed {SEED}, {LAYERS} layers) ...", flush=True)
            wall, rss, rc = measure(self_cmd("--make", lay, src))
            if rc != 0:
                sys.exit(f"making {src} failed (exit {rc})")
            print(f"made {src}: {os.path.getsize(src) / 1e9:.3f} GB in {wall:.1f} s, "
                  f"generator peak RSS {rss:.0f} MiB", flush=True)
        outs = {n: os.path.join(a.workdir, f"out-{lay}-{n}.safetensors")
                for n in ("ckptkit", REFERENCE[lay], "cp")}
        ref = [sys.executable, "-c", BLOCK_REF if lay == "block" else COMFY_REF, src, outs[REFERENCE[lay]]]
        if lay == "block":
            ref.append(str(BLOCK))
        cmds = {
            "ckptkit": [migrate, "-q", "convert", src, outs["ckptkit"], "--to", "plain", "--force"],
            REFERENCE[lay]: ref,
            "cp": ["cp", src, outs["cp"]],
        }
        plans[lay] = (src, outs, cmds)

    results = {}
    try:
        # Check every layout before timing any, so a refusal or a difference shows at once.
        for lay, (src, outs, cmds) in plans.items():
            ref = REFERENCE[lay]
            for n in ("ckptkit", ref):
                rm(outs[n])
                p = subprocess.run(cmds[n], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if p.returncode != 0:
                    what = "ckptkit refused" if n == "ckptkit" else f"{n} failed on"
                    sys.exit(f"[{lay}] {what} {src} (exit {p.returncode}):\n{p.stderr.strip()}")
            p = subprocess.run(self_cmd("--compare", outs["ckptkit"], outs[ref]),
                               stderr=subprocess.PIPE, text=True)
            if p.returncode != 0:
                print(f"[{lay}] ckptkit and {ref} wrote different tensors; first difference:\n"
                      f"{p.stderr.strip()}", file=sys.stderr)
                sys.exit(1)
            n_tensors = len(header(outs["ckptkit"]))
            results[lay] = {
                "in": os.path.getsize(src),
                "out": {n: os.path.getsize(outs[n]) for n in ("ckptkit", ref)},
                "largest": largest_tensor(outs["ckptkit"]),
            }
            print(f"[{lay}] ckptkit and {ref} outputs hold the same {n_tensors} tensors "
                  "(keys, dtypes, shapes, bytes)", flush=True)
            # the floor: `cp` of a file the size of the output (ckptkit's own, kept aside)
            floor = os.path.join(a.workdir, f"plain-{lay}.safetensors")
            os.replace(outs["ckptkit"], floor)
            cmds["cp"] = ["cp", floor, outs["cp"]]
            rm(outs[ref])

        for lay, (src, outs, cmds) in plans.items():
            times = {n: [] for n in cmds}
            rss = {n: [] for n in cmds}
            for _ in range(a.reps):
                for n, c in cmds.items():
                    rm(outs[n])
                    wall, peak, rc = measure(c)
                    if rc != 0:
                        sys.exit(f"[{lay}] {n} exited {rc} in a timed run")
                    times[n].append(wall)
                    rss[n].append(peak)
                    rm(outs[n])
            r = results[lay]
            print(f"\n### {lay}: {REFERENCE[lay]} vs ckptkit, {a.reps} runs each\n")
            print(json.dumps({n: [round(t, 3) for t in v] for n, v in times.items()}))
            print(f"input {src}: {r['in'] / 1e9:.3f} GB; output (BF16): "
                  + ", ".join(f"{n} {s / 1e9:.3f} GB" for n, s in r["out"].items()) + "\n")
            base = statistics.median(times["ckptkit"])
            print("| path | median s | / ckptkit | peak RSS MiB |")
            print("|---|---:|---:|---:|")
            for n, v in times.items():
                m = statistics.median(v)
                print(f"| {n} | {m:.2f} | {m / base:.2f} | {max(rss[n]):.0f} |")
            largest = r["largest"]
            bound = 4 * largest + 64 * MIB
            peak = max(rss["ckptkit"])
            print(f"\nRSS bound: 4 x largest output tensor ({largest / MIB:.0f} MiB) + 64 MiB = "
                  f"{bound / MIB:.0f} MiB; ckptkit peak {peak:.0f} MiB ({peak * MIB / bound:.2f}x bound): "
                  + ("met" if peak * MIB <= bound else "NOT met"), flush=True)
    finally:
        for _, outs, _ in plans.values():
            for p in outs.values():
                rm(p)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--make":
        make_input(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        main()

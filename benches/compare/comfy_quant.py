"""ComfyUI per-tensor FP8 quantization, file to file: ckptkit against comfy-kitchen itself.

    python benches/compare/comfy_quant.py MIGRATE MODEL.safetensors [REPS]

MODEL is a plain BF16 checkpoint (e.g. `synth MODEL 1 plain-bf16 4096 4096`). Each run is a
fresh process writing `comfy_quant` float8_e4m3fn (every 2-D weight) next to MODEL:

- ckptkit:      `MIGRATE -q convert MODEL OUT --to comfy:float8_e4m3fn --force`;
- comfy-kitchen: safetensors `load_file`, `QuantizedTensor.from_float(w, "TensorCoreFP8Layout",
                 scale="recalculate", dtype=float8_e4m3fn)` per 2-D weight (eager backend, all
                 cores), its `state_dict`, the `comfy_quant` marker, `save_file`: what a
                 quantize script built on the library does;
- cp:           `cp MODEL OUT` (the disk's pace; the floor).

Runs alternate (ckptkit, comfy-kitchen, cp, ...); prints wall-second medians and the ratios
to ckptkit, after checking once that both outputs hold the same tensors. Run it with a
Python that has torch, safetensors and comfy-kitchen 0.2.40 (`target/interop-venv/bin/python`).
"""

import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, os, sys, torch
from safetensors.torch import load_file, save_file
from comfy_kitchen.tensor import QuantizedTensor
from comfy_kitchen.registry import registry
torch.set_num_threads(os.cpu_count() or 1)
src, out = sys.argv[1], sys.argv[2]
sd = load_file(src)
marker = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
res = {}
with registry.use_backend("eager"):
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 2:
            m = k[: -len(".weight")]
            q = QuantizedTensor.from_float(v, "TensorCoreFP8Layout", scale="recalculate",
                                           dtype=torch.float8_e4m3fn)
            res.update({kk: vv.contiguous() for kk, vv in q.state_dict(k).items()})
            res[m + ".comfy_quant"] = marker.clone()
        else:
            res[k] = v
save_file(res, out)
"""


def timed(cmd):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def same_tensors(a, b):
    import torch
    from safetensors import safe_open

    with safe_open(a, "pt") as x, safe_open(b, "pt") as y:
        if sorted(x.keys()) != sorted(y.keys()):
            return False
        for k in x.keys():
            s, t = x.get_tensor(k), y.get_tensor(k)
            if s.dtype != t.dtype or s.shape != t.shape:
                return False
            if not torch.equal(s.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)):
                return False
    return True


def main():
    migrate, model = sys.argv[1], sys.argv[2]
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    d = os.path.dirname(os.path.abspath(model))
    outs = {n: os.path.join(d, f"bench-{n}.safetensors") for n in ("ckptkit", "comfy-kitchen", "cp")}
    cmds = {
        "ckptkit": [migrate, "-q", "convert", model, outs["ckptkit"], "--to", "comfy:float8_e4m3fn", "--force"],
        "comfy-kitchen": [sys.executable, "-c", CHILD, model, outs["comfy-kitchen"]],
        "cp": ["cp", model, outs["cp"]],
    }
    times = {n: [] for n in cmds}
    try:
        for r in range(reps):
            for n, c in cmds.items():
                if n != "ckptkit" and os.path.exists(outs[n]):
                    os.remove(outs[n])
                times[n].append(timed(c))
            if r == 0 and not same_tensors(outs["ckptkit"], outs["comfy-kitchen"]):
                sys.exit("ckptkit and comfy-kitchen wrote different tensors")
        size = os.path.getsize(model)
        print(json.dumps({n: [round(t, 3) for t in v] for n, v in times.items()}))
        base = statistics.median(times["ckptkit"])
        print(f"model {size / 1e9:.2f} GB, {reps} runs each")
        print("| path | median s | / ckptkit |")
        print("|---|---:|---:|")
        for n, v in times.items():
            m = statistics.median(v)
            print(f"| {n} | {m:.2f} | {m / base:.2f} |")
    finally:
        for p in outs.values():
            if os.path.exists(p):
                os.remove(p)


if __name__ == "__main__":
    main()

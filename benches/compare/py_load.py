"""`ckptkit.load` against optimum-quanto's own path to the same state dict, in memory.

    python benches/compare/py_load.py MODEL_DIR [REPS]

MODEL_DIR holds a quanto checkpoint (`model.safetensors` + `quanto_qmap.json`, e.g. from
`synth MODEL_DIR/model.safetensors 1 quanto-qint8`). Each run is a fresh process that imports
torch, notes its RSS (VmRSS), then builds the plain BF16 state dict:

- ckptkit: `ckptkit.load(path, like="plain")` (torch tensors over Rust buffers);
- quanto:  `load_file` + build the model on the meta device + `requantize` + `dequantize()`
           every weight (py_quanto.py's path, without writing a file).

It reports wall seconds of that step, peak RSS above the after-import RSS (VmHWM - VmRSS),
and issue 13's bound for ckptkit: output bytes + 4 x the largest tensor + 64 MiB. Runs
alternate (ckptkit, quanto, ...); medians are printed with the ratio quanto / ckptkit.
Run it with a Python that has torch, optimum-quanto and the ckptkit wheel (CI's live
suites' venv: `target/interop-venv/bin/python`).
"""

import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, os, sys, time
import torch

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)

torch.set_num_threads(os.cpu_count() or 1)
path, mode = sys.argv[1], sys.argv[2]
base = status("VmRSS")
t0 = time.perf_counter()
if mode == "ckptkit":
    import ckptkit
    sd = ckptkit.load(path, like="plain")
else:
    sys.path.insert(0, sys.argv[3])
    import py_quanto
    sd = py_quanto.dequantized_state(path)
seconds = time.perf_counter() - t0
weights = {k: v for k, v in sd.items() if k.endswith(".weight")}
out = sum(v.numel() * v.element_size() for v in sd.values())
largest = max(v.numel() * v.element_size() for v in sd.values())
print(json.dumps({"seconds": seconds, "peak_above_import": status("VmHWM") - base,
                  "out_bytes": out, "largest": largest, "weights": len(weights)}))
"""


def run(py, path, mode, here):
    p = subprocess.run([py, "-c", CHILD, path, mode, here], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{mode} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    model = os.path.join(os.path.abspath(sys.argv[1]), "model.safetensors")
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    here = os.path.dirname(os.path.abspath(__file__))
    runs = {"ckptkit": [], "quanto": []}
    for r in range(reps):
        for mode in runs:
            m = run(sys.executable, model, mode, here)
            runs[mode].append(m)
            print(f"run {r + 1} {mode}: {m['seconds']:.2f} s, peak above import {m['peak_above_import'] / 2**20:.0f} MiB")
    med = {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()}
    peak = {k: max(x["peak_above_import"] for x in v) for k, v in runs.items()}
    c = runs["ckptkit"][0]
    bound = c["out_bytes"] + 4 * c["largest"] + (64 << 20)
    mib = lambda n: f"{n / 2**20:.0f} MiB"
    print()
    print("| path | median s | peak RSS above import |")
    print("|---|---:|---:|")
    for k in runs:
        print(f"| {k} | {med[k]:.2f} | {mib(peak[k])} |")
    print()
    print(f"output {mib(c['out_bytes'])}, largest tensor {mib(c['largest'])}, bound {mib(bound)}: "
          f"ckptkit {'within' if peak['ckptkit'] <= bound else 'OVER'} it; quanto/ckptkit time {med['quanto'] / med['ckptkit']:.2f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Real loaders on ckptkit's output, memory-mapped: every quantized Linear's forward on CPU in bf16.

    python tests/interop/check_forward_mmap.py --case-dir DIR --weights FILE --qmap FILE
    python tests/interop/check_forward_mmap.py --self-case --migrate BIN --work DIR

safetensors.torch.load_file maps tensors at their file offsets (no copies).  torch 2.15's
CPU int8 matmul (`_weight_int8pack_mm`, which optimum-quanto 0.2.7 uses for a bf16 x qint8
Linear when in_features % 4 == 0) can crash on an int8 weight that does not start on a
16-byte boundary.  For every quantized Linear of the model, a fresh subprocess (a segfault
fails that check, not the suite) loads FILE with load_file, requantizes a meta-built model
with the map, and runs that Linear's forward on a bf16 input; the output must equal, bit for
bit, the same forward on tensors copied into fresh allocations (interop_common.load_tensors).

--self-case builds its own bf16 model with Linear layers of 200 input features and an even
number of outputs (and 256 / 64 / 96 in-features), quantizes it with `migrate convert --to
quanto:qint8`, and checks that output.

Exit status: 0 all checks passed, 1 any failure (printed on stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interop_common as ic  # noqa: E402
import quanto_models as qm  # noqa: E402


def forward_one(case: dict, state_dict, qmap: dict, name: str) -> torch.Tensor:
    model = qm.requantize_into_meta_model(case, state_dict, qmap)
    spec = next(s for s in case["specs"] if s["name"] == name)
    g = torch.Generator().manual_seed(case.get("seed", 0) + 7)
    x = (torch.randn(3, spec["in_features"], generator=g) * 1.5).to(torch.bfloat16)
    with torch.no_grad():
        return getattr(model, name)(x)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(ic.tensor_bytes(t.contiguous())).hexdigest()


def child(args) -> int:
    # mapped in place: no clone, exactly what a user's load_file gives
    from safetensors.torch import load_file

    case = json.load(open(args.case_json))
    qmap = json.load(open(args.qmap))
    out = forward_one(case, load_file(args.weights), qmap, args.one)
    print(digest(out))
    return 0


def check(case: dict, case_json: str, weights: str, qmap_path: str) -> list[str]:
    errors = []
    qmap = json.load(open(qmap_path))
    copied = ic.load_tensors(weights)
    linears = [s["name"] for s in case["specs"]
               if s["kind"] == "Linear" and qmap.get(s["name"], {}).get("weights", "none") != "none"]
    if not linears:
        return [f"{weights}: no quantized Linear to run"]
    for name in linears:
        want = digest(forward_one(case, copied, qmap, name))
        # torch 2.15's _weight_int8pack_mm reads past the weight for some shapes on
        # CPU (in_features 200: its result changes with the memory after the tensor):
        # where two fresh copies disagree, only the crash check applies
        again = digest(forward_one(case, {k: v.clone() for k, v in copied.items()}, qmap, name))
        deterministic = want == again
        if not deterministic:
            print(f"info: {name}: torch's int8 matmul is not deterministic for this shape on this CPU;"
                  " checking that it runs on the mapped file, not its values")
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--one", name,
                            "--case-json", case_json, "--weights", weights, "--qmap", qmap_path],
                           capture_output=True, text=True)
        if r.returncode != 0:
            errors.append(f"{name}: forward on the memory-mapped file ended with status {r.returncode}"
                          f" (negative: killed by signal {-r.returncode}): {r.stderr.strip()[-300:]}")
        elif deterministic and r.stdout.strip() != want:
            errors.append(f"{name}: forward on the memory-mapped file differs from the copied one")
    return errors


def self_case(migrate: str, work: str) -> tuple[dict, str, str, str]:
    from safetensors.torch import save_file

    os.makedirs(work, exist_ok=True)
    specs = [qm.lin("lin_200x6", 200, 6), qm.lin("lin_200x10", 200, 10, bias=False),
             qm.lin("lin_256x16", 256, 16), qm.lin("lin_64x2", 64, 2), qm.lin("lin_96x4", 96, 4),
             qm.lin("lin_202x4", 202, 4)]
    case = {"name": "bf16-self", "dtype": "bfloat16", "weights": "qint8", "activations": None,
            "seed": int.from_bytes(os.urandom(4), "little"), "specs": specs}
    model = qm.build_model(case)
    qm.init_float_weights(model, case["seed"])
    flt = os.path.join(work, "float.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, flt, metadata={"format": "pt"})
    case_json = os.path.join(work, "case.json")
    json.dump(case, open(case_json, "w"))
    out = os.path.join(work, "q", "model.safetensors")
    subprocess.run([migrate, "-q", "convert", flt, out, "--to", "quanto:qint8"], check=True)
    return case, case_json, out, os.path.join(work, "q", "quanto_qmap.json")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case-dir")
    ap.add_argument("--weights")
    ap.add_argument("--qmap")
    ap.add_argument("--self-case", action="store_true")
    ap.add_argument("--migrate")
    ap.add_argument("--work")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--one")
    ap.add_argument("--case-json")
    a = ap.parse_args()
    if a.child:
        return child(a)
    if a.self_case:
        case, case_json, weights, qmap = self_case(a.migrate, a.work)
    else:
        case_json = os.path.join(a.case_dir, "case.json")
        case = json.load(open(case_json))
        weights, qmap = a.weights, a.qmap
    errors = check(case, case_json, weights, qmap)
    for e in errors:
        print(f"MISMATCH: {e}", file=sys.stderr)
    if not errors:
        print(f"OK: {case['name']}: every quantized Linear runs on the memory-mapped file")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A partly quantized quanto model (layers excluded from quantization) through the int8 family and back.

    python tests/interop/check_int8_roundtrip.py --case-dir DIR --migrate BIN --work DIR

DIR holds a case made by the real optimum-quanto 0.2.7 (gen_quanto_fixtures.py):
quantized.safetensors (quanto's frozen state dict; its `lin_excluded` layer left float by
quantize(exclude=...)) and quanto_qmap.json.  For every int8 layout (int8, int8:ct,
int8:ct:int-quantized) the quanto checkpoint is converted with `migrate convert --to
LAYOUT`, then back with `--like quanto_qmap.json`; the result must equal quanto's own file
tensor for tensor, bit for bit, and the float layers must have stayed float on the way.
For int8:bnb (integers in [-127, 127]) the same holds when no stored code is -128;
when one is, the conversion must be refused without --allow-lossy.

Exit status: 0 all checks passed, 1 any mismatch (printed on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interop_common as ic  # noqa: E402

LAYOUTS = ["int8", "int8:ct", "int8:ct:int-quantized", "int8:bnb"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case-dir", required=True)
    ap.add_argument("--migrate", required=True)
    ap.add_argument("--work", required=True)
    a = ap.parse_args()
    q = os.path.join(a.case_dir, "quantized.safetensors")
    qmap = os.path.join(a.case_dir, "quanto_qmap.json")
    theirs = ic.load_tensors(q)
    # 2-D quanto int8 codes: bitsandbytes stores [-127, 127]
    has_m128 = any(
        k.endswith(".weight._data") and t.dim() == 2 and bool((t == -128).any())
        for k, t in theirs.items()
    )
    errors = []
    for layout in LAYOUTS:
        tag = layout.replace(":", "_")
        mid_dir = os.path.join(a.work, tag, "mid")
        back_dir = os.path.join(a.work, tag, "back")
        os.makedirs(mid_dir, exist_ok=True)
        os.makedirs(back_dir, exist_ok=True)
        mid = os.path.join(mid_dir, "model.safetensors")
        r = subprocess.run([a.migrate, "convert", q, mid, "--to", layout, "--json"],
                           capture_output=True, text=True)
        if layout == "int8:bnb" and has_m128:
            if r.returncode == 0 or "--allow-lossy" not in r.stderr:
                errors.append(f"{layout}: a -128 code must be refused without --allow-lossy: {r.stderr}")
            continue
        if r.returncode != 0:
            errors.append(f"{layout}: convert failed: {r.stderr.strip()}")
            continue
        plan = json.loads(r.stdout)["plan"]["layers"]
        for lp in plan:
            if lp["from"].startswith("plain") and lp["to"] != lp["from"]:
                errors.append(f"{layout}: float layer {lp['path']} became {lp['to']}")
        back = os.path.join(back_dir, "model.safetensors")
        r = subprocess.run([a.migrate, "-q", "convert", mid, back, "--like", qmap],
                           capture_output=True, text=True)
        if r.returncode != 0:
            errors.append(f"{layout}: convert back failed: {r.stderr.strip()}")
            continue
        ours = ic.load_tensors(back)
        if set(ours) != set(theirs):
            errors.append(f"{layout}: key sets differ: {sorted(set(ours) ^ set(theirs))}")
        for k in theirs:
            if k in ours:
                d = ic.same_tensor(ours[k], theirs[k])
                if d:
                    errors.append(f"{layout}: {k}: {d}")
    for e in errors:
        print(f"MISMATCH: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

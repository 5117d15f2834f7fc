#!/usr/bin/env bash
# Create (or reuse) the small pinned Python venv for the GGUF golden fixtures
# (tests/interop/gguf/requirements.txt: gguf-py, numpy, safetensors; no torch).
#
#   tests/interop/gguf/setup_venv.sh [VENV_DIR]     (default: <repo>/target/gguf-venv)
#
# Idempotent: a stamp file inside the venv records the sha256 of requirements.txt; if it
# matches, nothing is installed.  Prints the venv path on the last line, so
#
#   venv="$(tests/interop/gguf/setup_venv.sh | tail -n1)"
#   "$venv/bin/python" tests/interop/gguf/gen_gguf_fixtures.py
#
# regenerates tests/fixtures/gguf.  Env: PYTHON (interpreter used to create the venv,
# default python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../../.." && pwd)"
venv="${1:-$repo_root/target/gguf-venv}"
case "$venv" in /*) ;; *) venv="$repo_root/$venv" ;; esac
req="$here/requirements.txt"
python="${PYTHON:-python3}"

want="$(sha256sum "$req" | cut -d' ' -f1)"
stamp="$venv/.ckptkit-gguf-stamp"

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "gguf venv up to date: $venv" >&2
    echo "$venv"
    exit 0
fi

start=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
rm -f "$stamp"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-cache-dir)
"${pip[@]}" install --quiet -r "$req"

# Smoke test: the pinned versions are the ones imported, and gguf-py round-trips a Q8_0 block.
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
import safetensors.numpy  # noqa: F401
x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 32)
q = quantize(x, Q.Q8_0)
assert q.dtype == np.uint8 and q.shape == (1, 34)
assert np.abs(dequantize(q, Q.Q8_0) - x).max() < 1e-2
print(" ".join(f"{p} {md.version(p)}" for p in ("gguf", "numpy", "safetensors")))
PY

echo "$want" > "$stamp"
echo "gguf venv ready in $(( $(date +%s) - start ))s: $venv" >&2
echo "$venv"

#!/usr/bin/env bash
# Create (or reuse) the pinned Python venv for the optimum-quanto interop fixtures/checks.
#
#   tests/interop/setup_venv.sh [VENV_DIR]     (default: <repo>/target/interop-venv)
#
# Idempotent: a stamp file inside the venv records the sha256 of requirements.txt; if it
# matches, nothing is installed.  Afterwards put "$VENV_DIR/bin" on PATH (quanto JIT-builds
# its CPU extension with ninja from there).  Prints the venv path on the last line.
# Env: PYTHON (interpreter used to create the venv, default python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
venv="${1:-$repo_root/target/interop-venv}"
case "$venv" in /*) ;; *) venv="$repo_root/$venv" ;; esac
req="$here/requirements.txt"
python="${PYTHON:-python3}"

want="$(sha256sum "$req" | cut -d' ' -f1)"
stamp="$venv/.ckptkit-interop-stamp"

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "interop venv up to date: $venv" >&2
    echo "$venv"
    exit 0
fi

start=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
rm -f "$stamp"
"$venv/bin/python" -m pip install --disable-pip-version-check --quiet --upgrade pip
"$venv/bin/python" -m pip install --disable-pip-version-check --quiet -r "$req"

# Warm up: build quanto's C++ CPU extension (qint4/qint2 unpack) once now, not mid-test.
PATH="$venv/bin:$PATH" "$venv/bin/python" - <<'PY'
import torch
from optimum.quanto import freeze, qint4, quantize
m = torch.nn.Sequential(torch.nn.Linear(64, 8))
quantize(m, weights=qint4)
freeze(m)
m[0].weight.dequantize()
import importlib.metadata as md
print("torch", torch.__version__, "optimum-quanto", md.version("optimum-quanto"),
      "safetensors", md.version("safetensors"))
PY

echo "$want" > "$stamp"
echo "interop venv ready in $(( $(date +%s) - start ))s: $venv" >&2
echo "$venv"

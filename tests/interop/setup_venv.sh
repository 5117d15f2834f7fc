#!/usr/bin/env bash
# Create (or reuse) the one pinned Python venv for all interop fixtures, live suites and
# benchmark peers (tests/interop/requirements.txt: torch, optimum-quanto, compressed-tensors,
# bitsandbytes, transformers).
#
#   tests/interop/setup_venv.sh [VENV_DIR]     (default: <repo>/target/interop-venv)
#
# Idempotent: a stamp file inside the venv records the sha256 of requirements.txt; if it
# matches, nothing is installed.  Afterwards put "$VENV_DIR/bin" on PATH (quanto JIT-builds
# its CPU extension with ninja from there).  Prints the venv path on the last line.
# pip runs with --no-cache-dir: torch and its CUDA wheels are ~3.5 GB of downloads, and a
# cached copy beside the installed one is what ran a CI machine out of disk.
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
# pip keeps every downloaded wheel in TMPDIR until the install ends: ~3.5 GB on top of the
# ~6 GB installed.  Where /dev/shm has room and no TMPDIR is set, those downloads go to
# memory rather than to a disk that may be small.
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] &&
    [ "$(df -Pk /dev/shm | awk 'NR==2 {print $4}')" -gt $((6 * 1024 * 1024)) ]; then
    TMPDIR="$(mktemp -d /dev/shm/ckptkit-pip.XXXXXX)"
    export TMPDIR
    trap 'rm -rf "$TMPDIR"' EXIT
fi
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
rm -f "$stamp"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-cache-dir)
"${pip[@]}" install --quiet --upgrade pip
"${pip[@]}" install --quiet -r "$req"

# Smoke test, and build quanto's C++ CPU extension (qint4/qint2 unpack) once now, not
# mid-test; bitsandbytes and compressed-tensors both quantize on CPU.
PATH="$venv/bin:$PATH" "$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch
from optimum.quanto import freeze, qint4, quantize
m = torch.nn.Sequential(torch.nn.Linear(64, 8))
quantize(m, weights=qint4)
freeze(m)
m[0].weight.dequantize()
import bitsandbytes as bnb
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                             QuantizationScheme, apply_quantization_config)
b = bnb.nn.Linear8bitLt(64, 8, has_fp16_weights=False).to("cpu")
assert b.weight.dtype == torch.int8 and b.weight.SCB is not None
lin = torch.nn.Sequential(torch.nn.Linear(64, 8))
apply_quantization_config(lin, QuantizationConfig(config_groups={"g": QuantizationScheme(
    targets=["Linear"], weights=QuantizationArgs(num_bits=8, strategy="channel"))}), show_progress=False)
print(" ".join(f"{p} {md.version(p)}" for p in ("torch", "optimum-quanto", "compressed-tensors",
                                                "bitsandbytes", "transformers", "safetensors")))
PY

echo "$want" > "$stamp"
echo "interop venv ready in $(( $(date +%s) - start ))s: $venv" >&2
echo "$venv"

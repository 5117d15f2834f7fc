#!/usr/bin/env bash
# Create (or reuse) the pinned Python venv for the int8 interop fixtures/checks
# (compressed-tensors 0.20.0 + bitsandbytes 0.50.2 + transformers 5.24.0, torch 2.15.0 CPU).
#
#   tests/interop/int8/setup_venv.sh [VENV_DIR]     (default: <repo>/target/interop-int8-venv)
#
# Idempotent: a stamp file inside the venv records the sha256 of requirements.txt; if it
# matches, nothing is installed.  Prints the venv path on the last line.
# Env: PYTHON (interpreter used to create the venv, default python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../../.." && pwd)"
venv="${1:-$repo_root/target/interop-int8-venv}"
case "$venv" in /*) ;; *) venv="$repo_root/$venv" ;; esac
req="$here/requirements.txt"
python="${PYTHON:-python3}"

want="$(sha256sum "$req" | cut -d' ' -f1)"
stamp="$venv/.ckptkit-interop-int8-stamp"

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "int8 interop venv up to date: $venv" >&2
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

# Smoke test: both libraries quantize on CPU.
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch
import bitsandbytes as bnb
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config
m = bnb.nn.Linear8bitLt(64, 8, has_fp16_weights=False).to("cpu")
assert m.weight.dtype == torch.int8 and m.weight.SCB is not None
lin = torch.nn.Sequential(torch.nn.Linear(64, 8))
apply_quantization_config(lin, QuantizationConfig(config_groups={"g": QuantizationScheme(
    targets=["Linear"], weights=QuantizationArgs(num_bits=8, strategy="channel"))}), show_progress=False)
print("torch", torch.__version__, "compressed-tensors", md.version("compressed-tensors"),
      "bitsandbytes", md.version("bitsandbytes"), "transformers", md.version("transformers"))
PY

echo "$want" > "$stamp"
echo "int8 interop venv ready in $(( $(date +%s) - start ))s: $venv" >&2
echo "$venv"

#!/usr/bin/env bash
# ckptkit.ray on a local Ray cluster (ray.init(num_cpus=2), 127.0.0.1 only):
# python/tests/test_ray.py against the wheel .ci/python.sh built, in its own
# venv (Ray, pytest; no torch).
#
#   bash .ci/ray.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=target/ray-venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check --no-cache-dir)
"${pip[@]}" install --quiet 'ray==2.60.0' 'pytest>=8,<9'
"${pip[@]}" install --quiet --force-reinstall --no-deps target/wheels/ckptkit-*.whl
# the suite skips itself without Ray: here Ray must be there
"$VENV/bin/python" -c "import ray; print('ray', ray.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider python/tests/test_ray.py

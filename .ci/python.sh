#!/usr/bin/env bash
# The Python package (python/): build the abi3 wheel with maturin, install it
# into its own venv (no torch: the package needs nothing at import time), and
# run its pytest suite.
#
#   bash .ci/python.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --manifest-path python/Cargo.toml -- --check
cargo clippy --quiet --manifest-path python/Cargo.toml -- -D warnings
VENV=target/py-venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check 'maturin>=1.9,<2' 'pytest>=8,<9'
rm -rf target/wheels
start=$(date +%s)
"$VENV/bin/maturin" build --release --quiet -m python/Cargo.toml -o target/wheels \
    --interpreter "$VENV/bin/python"
echo "   wheel built in $(($(date +%s) - start)) s: $(ls target/wheels)"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --force-reinstall target/wheels/ckptkit-*.whl
# the package imports without numpy or torch
"$VENV/bin/python" -c "import sys, ckptkit; assert 'numpy' not in sys.modules and 'torch' not in sys.modules; print('ckptkit', ckptkit.__version__)"
PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/python" -m pytest -q python/tests

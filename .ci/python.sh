#!/usr/bin/env bash
# The Python package (python/): build the abi3 manylinux_2_28 wheel with
# maturin (linking through zig, so the wheel does not depend on this machine's
# glibc; auditwheel checks the tag), install it into its own venv (no torch:
# the package needs nothing at import time), and run its pytest suite.
#
#   bash .ci/python.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --manifest-path python/Cargo.toml -- --check
cargo clippy --quiet --manifest-path python/Cargo.toml -- -D warnings
VENV=target/py-venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check 'maturin>=1.9,<2' 'pytest>=8,<9' \
    'ziglang>=0.14,<0.15' 'auditwheel>=6,<7' \
    'numpy>=2,<3' 'ml_dtypes>=0.5,<1'
rm -rf target/wheels
start=$(date +%s)
PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/maturin" build --release --quiet -m python/Cargo.toml \
    -o target/wheels --interpreter "$VENV/bin/python" --zig --compatibility manylinux_2_28
echo "   wheel built in $(($(date +%s) - start)) s: $(ls target/wheels)"
"$VENV/bin/auditwheel" show target/wheels/ckptkit-*.whl | tee target/wheels/auditwheel.txt
grep -q 'manylinux_2_28_' target/wheels/auditwheel.txt
"$VENV/bin/pip" install --quiet --disable-pip-version-check --force-reinstall target/wheels/ckptkit-*.whl
# the package imports without numpy or torch
"$VENV/bin/python" -c "import sys, ckptkit; assert 'numpy' not in sys.modules and 'torch' not in sys.modules; print('ckptkit', ckptkit.__version__)"
PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/python" -m pytest -q python/tests

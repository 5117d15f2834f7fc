#!/usr/bin/env bash
# Remote inputs (feature `remote`): tests/remote.rs against a Range-capable
# HTTP server of its own, then tests/remote/s3_moto.py against moto's S3
# server with a fault-injecting proxy (127.0.0.1 only), in its own venv.
# gs:// and az:// are built (same code path through object_store) but not
# run against an emulator (README, "Remote inputs").
#
#   bash .ci/remote.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# the features the clippy step checked, so the library is built once more only
cargo build --quiet --features fuzzing,remote --example migrate
cargo test --quiet --features fuzzing,remote --test remote
cargo test --quiet --features fuzzing,remote --doc remote
VENV=target/remote-venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip --disable-pip-version-check --no-cache-dir install --quiet \
    'moto[server]==5.2.5' 'boto3==1.44.8'
"$VENV/bin/python" tests/remote/s3_moto.py target/debug/examples/migrate

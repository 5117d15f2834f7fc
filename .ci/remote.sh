#!/usr/bin/env bash
# Remote inputs (feature `remote`): tests/remote.rs against a Range-capable
# HTTP server of its own, then tests/remote/s3_moto.py against moto's S3
# server with a fault-injecting proxy, and tests/remote/az_azurite.py
# against Azurite (Azure Blob Storage's emulator, on the Node.js of the
# nodejs-bin wheel, with the npm lock file in tests/remote/azurite/); all on
# 127.0.0.1, in one venv. gs:// is built (the same code through
# object_store) but not run against an emulator (README, "Remote inputs").
#
#   bash .ci/remote.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# the features the clippy step checked, so the library is built once more only
cargo build --quiet --features fuzzing,remote --example migrate
cargo test --quiet --features fuzzing,remote --test remote
cargo test --quiet --features fuzzing,remote --doc remote
# the remote module's unit tests (listing caps, URL parsing)
cargo test --quiet --features fuzzing,remote --lib remote::
VENV=target/remote-venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip --disable-pip-version-check --no-cache-dir install --quiet \
    'moto[server]==5.2.5' 'boto3==1.44.8' \
    'nodejs-bin==18.4.0a4' 'azure-storage-blob==12.24.1' 'azure-core==1.41.0'
"$VENV/bin/python" tests/remote/s3_moto.py target/debug/examples/migrate
AZURITE=target/azurite
if ! cmp -s tests/remote/azurite/package-lock.json "$AZURITE/package-lock.json"; then
    rm -rf "$AZURITE" && mkdir -p "$AZURITE"
    cp tests/remote/azurite/package.json tests/remote/azurite/package-lock.json "$AZURITE/"
    (cd "$AZURITE" && "../remote-venv/bin/python" -W ignore -m nodejs.npm ci --no-audit --no-fund --silent)
fi
"$VENV/bin/python" tests/remote/az_azurite.py target/debug/examples/migrate \
    "$AZURITE/node_modules/azurite/dist/src/blob/main.js"

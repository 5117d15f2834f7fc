#!/usr/bin/env bash
# Live ComfyUI nvfp4 interop against comfy-kitchen 0.2.40: see ../padded_live.sh.
#
#   bash tests/interop/comfy/nvfp4/live.sh [VENV_DIR]      # env: LIVE_SEED, MIGRATE
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../padded_live.sh" nvfp4 "$@"

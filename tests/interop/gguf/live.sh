#!/usr/bin/env bash
# Live GGUF interop against gguf-py 0.19.0 (PyPI gguf; the pinned venv of
# tests/interop/gguf/setup_venv.sh: gguf, numpy, safetensors, no torch).  With a new random seed,
# check_gguf_live.py writes a GGUF file with gguf.GGUFWriter (random shapes and values: Q8_0, Q4_0,
# Q4_1, Q5_0, Q5_1 quantized by gguf.quants.quantize, one of them 3-D and one 1-D; Q2_K..Q6_K as random
# raw blocks with sane f16 scales; F32, F16, BF16, F64, I8, I16, I32, I64; KVs of every type, arrays
# included; general.alignment 64 half of the time), the same file as GGUF v2, and checks ckptkit:
#   * --to plain: every block tensor F32 bit-identical to gguf.quants.dequantize (NaN, inf, -0
#     included), every other tensor byte-identical, in numpy shape;
#   * --to keep: raw blocks U8 [rows, row_bytes] byte-identical, ckptkit.gguf.tensors, and every KV
#     in ckptkit.gguf.kv, in order, typed, with its exact value;
#   * the kept file --to plain equals the GGUF --to plain; the v2 file gives the same output;
#   * a Q4_0 tensor's type patched to IQ4_NL (20) is refused ("unsupported GGUF tensor type", naming it);
#   * migrate verify accepts the files; migrate inspect lists the gguf:<TYPE> layers;
#   * GGUF output: a float safetensors model (F32/F16/BF16, hand-written) --to gguf:q8_0|q4_0|q4_1|q5_0|q5_1
#     --gguf-arch live: quantizable weights byte-identical to gguf.quants.quantize, others kept, read by
#     GGUFReader, ckptkit's KVs; back --to plain = dequantize rounded to the model dtype; migrate verify
#     checks every tensor and fails on a flipped bit;
#   * the GGUF file --to keep into GGUF (directly, through safetensors, from v2): every tensor (K-quants
#     included) and KV (but general.alignment) as in the original, in order;
#   * ComfyUI-GGUF's comfy.gguf.orig_shape entries: SD convolutions written by GGUFWriter as its
#     converter writes them (rows of 256, F32/F16/Q8_0/Q4_1/Q5_0/Q4_K/Q6_K) read in their torch shape
#     with gguf-py's values, kept through GGUF -> GGUF with their entries typed as its loader requires;
#     a 5-D tensor ckptkit writes is 2-D rows plus the entry in GGUFReader's eyes.
# One OK/FAIL line per check, then a summary; exits non-zero on any failure.
#
#   bash tests/interop/gguf/live.sh [VENV_DIR]
#
# Env: LIVE_SEED (default: random), MIGRATE (a built migrate binary; default: cargo builds
# target/release/examples/migrate).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
venv="$(bash "$here/setup_venv.sh" "${1:-$root/target/gguf-venv}" | tail -n 1)"
py="$venv/bin/python"
if [ -z "${MIGRATE:-}" ]; then
    (cd "$root" && cargo build --release --example migrate --quiet)
    MIGRATE="$root/target/release/examples/migrate"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
seed="${LIVE_SEED:-$(( (RANDOM << 15) | RANDOM ))}"
echo "live gguf interop: seed $seed, work dir $work"
"$py" "$here/check_gguf_live.py" --migrate "$MIGRATE" --work "$work" --seed "$seed"

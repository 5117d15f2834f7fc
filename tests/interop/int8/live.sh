#!/usr/bin/env bash
# Live int8 interop: ckptkit writes int8:ct (channel, group, int-quantized)
# and int8:bnb checkpoints (with config.json) from the float weights of every
# case in tests/fixtures/int8, and the real compressed-tensors 0.20.0 and
# bitsandbytes 0.50.2 load them with their own code paths
# (tests/interop/int8/check_int8.py): key sets, dtypes, shapes and the
# libraries' dequantized weights equal ours bit for bit.
#
#   bash tests/interop/int8/live.sh [VENV_DIR]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
venv="$(bash "$root/tests/interop/setup_venv.sh" "${1:-$root/target/interop-venv}" | tail -n 1)"
py="$venv/bin/python"
if [ -z "${MIGRATE:-}" ]; then
    (cd "$root" && cargo build --release --example migrate --quiet)
    MIGRATE="$root/target/release/examples/migrate"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
pass=0
fail=0
for case in "$root"/tests/fixtures/int8/*/; do
    case="${case%/}"
    name="$(basename "$case")"
    [ -f "$case/case.json" ] || continue
    case "$name" in
        *-pack-channel) target=int8:ct ;;
        *-pack-group32) target=int8:ct:group=32 ;;
        *-int-channel) target=int8:ct:int-quantized ;;
        bnb-*) target=int8:bnb ;;
        *) continue ;;
    esac
    dtype=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['dtype'])" "$case/case.json")
    deq_to=plain:bf16
    cast=()
    case "$dtype" in float16) deq_to=plain:f16 ;; float32) deq_to=plain:f32 ;; esac
    # bitsandbytes dequantizes to F32; ours rounds the same f32 value once to the
    # model dtype, so the library output is cast for the comparison
    case "$name" in bnb-*) deq_to=plain; cast=(--cast-library-output) ;; esac
    in="$work/$name/in"
    mkdir -p "$in"
    cp "$case/float.safetensors" "$in/model.safetensors"
    cp "$case/config.json" "$in/config.json"
    ok=1
    "$MIGRATE" -q convert "$in" "$work/$name/out" --to "$target" --exclude lin_skip || ok=0
    "$MIGRATE" -q convert "$work/$name/out" "$work/$name/deq.safetensors" --to "$deq_to" || ok=0
    if [ $ok = 1 ] && "$py" "$here/check_int8.py" --case-dir "$case" --ours "$work/$name/out/model.safetensors" \
        --config "$work/$name/out/config.json" --expect-dequantized "$work/$name/deq.safetensors" "${cast[@]}"; then
        pass=$((pass + 1))
    else
        echo "FAIL $name"
        fail=$((fail + 1))
    fi
done
echo "live int8 interop: $pass passed, $fail failed"
[ "$fail" -eq 0 ] && [ "$pass" -gt 0 ]

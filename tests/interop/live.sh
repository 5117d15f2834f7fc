#!/usr/bin/env bash
# The live interop suite: fresh cases from the real optimum-quanto 0.2.7 with a
# new random seed, converted by the `migrate` binary in both directions, and
# checked in Python bit for bit (tests/interop/check_against_quanto.py).
#
#   bash tests/interop/live.sh [VENV_DIR]
#
# Env: LIVE_SEED (default: random), LIVE_ONLY (substring filter of case names),
#      MIGRATE (path of a built migrate binary; default: builds it).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$(bash "$here/setup_venv.sh" "${1:-$root/target/interop-venv}" | tail -n 1)"
export PATH="$venv/bin:$PATH"
py="$venv/bin/python"

if [ -z "${MIGRATE:-}" ]; then
    (cd "$root" && cargo build --release --example migrate --quiet)
    MIGRATE="$root/target/release/examples/migrate"
fi
seed="${LIVE_SEED:-$(( (RANDOM << 15) | RANDOM ))}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "live interop: seed $seed, work dir $work"
only=()
[ -n "${LIVE_ONLY:-}" ] && only=(--only "$LIVE_ONLY")
"$py" "$here/gen_quanto_fixtures.py" --out "$work/cases" --seed "$seed" "${only[@]}" >/dev/null

pass=0
fail=0
for case in "$work"/cases/*/; do
    case="${case%/}"
    name="$(basename "$case")"
    [ -f "$case/case.json" ] || continue
    out="$work/out/$name"
    mkdir -p "$out/q" "$out/p"
    skip=()
    case "$name" in *-act_*) skip=(--skip-activation-scales) ;; esac
    ok=1
    # float -> quanto, matching quanto's own map
    if ! "$MIGRATE" -q convert "$case/float.safetensors" "$out/q/model.safetensors" --like "$case/quanto_qmap.json"; then
        echo "FAIL $name: migrate convert --like failed"; ok=0
    fi
    # quanto -> plain
    if ! "$MIGRATE" -q convert "$case/quantized.safetensors" "$out/p/model.safetensors" --to plain \
        --qmap "$case/quanto_qmap.json" --shapes-from "$case/float.safetensors"; then
        echo "FAIL $name: migrate convert --to plain failed"; ok=0
    fi
    # a partly quantized qint8 model (quanto left `lin_excluded` float) through every
    # int8 layout and back, byte for byte (activation cases carry calibrated
    # activation scales that an int8 layout cannot hold)
    case "$name" in
        *-qint8)
            if ! "$py" "$here/check_int8_roundtrip.py" --case-dir "$case" --migrate "$MIGRATE" \
                --work "$out/int8"; then
                echo "FAIL $name: int8 round trip"; ok=0
            fi ;;
    esac
    # real loaders: load_file maps tensors in place; torch's bf16 x int8 CPU matmul
    # crashes on misaligned int8 weights (quanto's own files have some)
    case "$name" in
        bf16-qint8)
            if [ $ok = 1 ] && ! "$py" "$here/check_forward_mmap.py" --case-dir "$case" \
                --weights "$out/q/model.safetensors" --qmap "$out/q/quanto_qmap.json"; then
                echo "FAIL $name: forward on the memory-mapped output"; ok=0
            fi ;;
    esac
    if [ $ok = 1 ] && "$py" "$here/check_against_quanto.py" --case-dir "$case" \
        --ours-quantized "$out/q/model.safetensors" --qmap "$out/q/quanto_qmap.json" \
        --ours-dequantized "$out/p/model.safetensors" --plain-checkpoint "${skip[@]}"; then
        pass=$((pass + 1))
    else
        echo "FAIL $name"
        fail=$((fail + 1))
    fi
done
# a model with Linear layers of 200 input features and an even number of outputs
if "$py" "$here/check_forward_mmap.py" --self-case --migrate "$MIGRATE" --work "$work/self"; then
    pass=$((pass + 1))
else
    echo "FAIL self case: forward on the memory-mapped output"
    fail=$((fail + 1))
fi
echo "live interop (seed $seed): $pass passed, $fail failed"
[ "$fail" -eq 0 ] && [ "$pass" -gt 0 ]

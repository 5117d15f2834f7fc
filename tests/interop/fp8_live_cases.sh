# Sourced by the FP8 live suites (tests/interop/fp8block/live.sh,
# tests/interop/ctfp8/live.sh): `fp8_live_cases GENERATOR CHECKER LABEL`
# generates fresh cases with the library (seed $seed, into $work/cases) and,
# for each, has ckptkit write
#   1. the quantized file from the float weights (--to <case.json ckptkit_target>,
#      --exclude <case.json exclude>) and a plain file from the library's own
#      model.safetensors (--to plain), checked by `CHECKER --ours --ours-plain`;
#   2. a model directory from the float weights and the case's config.json
#      without its quantization_config, checked by `CHECKER --ours --config`.
# Expects py, MIGRATE, work and seed set; sets pass and fail.
fp8_live_cases() {
    local gen="$1" check="$2" label="$3"
    echo "$label: seed $seed, work dir $work"
    "$py" "$gen" --out "$work/cases" --seed "$seed" --no-probes >/dev/null
    pass=0
    fail=0
    local case name target w ok m
    for case in "$work"/cases/*/; do
        case="${case%/}"
        name="$(basename "$case")"
        [ -f "$case/case.json" ] || continue
        target=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['ckptkit_target'])" "$case/case.json")
        local excl=()
        for m in $("$py" -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))['exclude']))" "$case/case.json"); do
            excl+=(--exclude "$m")
        done
        w="$work/$name"
        mkdir -p "$w/in"
        ok=1
        # 1. file to file, and the library's file (its config.json beside it) to plain
        "$MIGRATE" -q convert "$case/float.safetensors" "$w/ours.safetensors" --to "$target" "${excl[@]}" || ok=0
        "$MIGRATE" -q convert "$case/model.safetensors" "$w/plain.safetensors" --to plain || ok=0
        if [ $ok = 1 ]; then
            "$py" "$check" --case "$case" --ours "$w/ours.safetensors" \
                --ours-plain "$w/plain.safetensors" || ok=0
        fi
        # 2. a model directory: the float weights with the float model's config.json
        cp "$case/float.safetensors" "$w/in/model.safetensors"
        "$py" -c "import json,sys; c=json.load(open(sys.argv[1])); c.pop('quantization_config'); json.dump(c, open(sys.argv[2], 'w'), indent=2, sort_keys=True)" \
            "$case/config.json" "$w/in/config.json"
        if "$MIGRATE" -q convert "$w/in" "$w/dir" --to "$target" "${excl[@]}"; then
            shopt -s nullglob
            local outs=("$w"/dir/*.safetensors)
            shopt -u nullglob
            if [ ${#outs[@]} -ne 1 ] || [ ! -f "$w/dir/config.json" ]; then
                echo "$name: the directory output holds ${#outs[@]} .safetensors files and config.json: $(ls "$w/dir")"
                ok=0
            elif ! "$py" "$check" --case "$case" --ours "${outs[0]}" --config "$w/dir/config.json"; then
                ok=0
            fi
        else
            ok=0
        fi
        if [ $ok = 1 ]; then
            pass=$((pass + 1))
        else
            echo "FAIL $name"
            fail=$((fail + 1))
        fi
    done
}

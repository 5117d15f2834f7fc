#!/usr/bin/env bash
# Bounded fuzzing of every cargo-fuzz target, on the stable toolchain.
#
#   bash .ci/fuzz.sh                      # 60 s per target, no sanitizer
#   FUZZ_SECONDS=600 bash .ci/fuzz.sh     # longer
#   FUZZ_ASAN=1 bash .ci/fuzz.sh          # AddressSanitizer on stable (RUSTC_BOOTSTRAP)
#   FUZZ_TARGETS="manifest safetensors" bash .ci/fuzz.sh
#
# The committed seeds are copied into fuzz/corpus/<t> (scratch, git-ignored);
# fuzz/regressions/<t> is passed as a read-only extra input directory.
# Exits non-zero on any crash, timeout or OOM and prints the artifact paths.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=${FUZZ_SECONDS:-60}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [ "${FUZZ_ASAN:-0}" = 1 ]; then
    # -Zsanitizer on a stable rustc. Don't let cargo reuse a cached failed
    # rustc query from an earlier non-bootstrap run (fuzz/target/.rustc_info.json).
    export RUSTC_BOOTSTRAP=1 CARGO_CACHE_RUSTC_INFO=0
    SAN=()
    MODE=asan
else
    SAN=(--sanitizer none)
    MODE=none
fi

# max_len per target: larger than every seed, small enough to stay fast.
max_len() {
    case "$1" in
        container) echo 16384 ;;
        manifest) echo 8192 ;;
        safetensors) echo 16384 ;;
        writer_ops) echo 2048 ;;
        chunk_codec) echo 16384 ;;
        layout_detect) echo 65536 ;;
        side_json) echo 4096 ;;
        migration) echo 2048 ;;
        gguf) echo 16384 ;;
        *) echo 65536 ;;
    esac
}

# The targets write temporary files; keep them off the disk (fsync) when
# /dev/shm exists, and in one directory that is removed at the end.
TMPBASE=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && TMPBASE=/dev/shm
FUZZ_TMP=$(mktemp -d "$TMPBASE/ckptkit-fuzz.XXXXXX")
trap 'rm -rf "$FUZZ_TMP"' EXIT
export TMPDIR=$FUZZ_TMP

# Resolve the fuzz crate to the versions the main crate is locked to.
[ -f fuzz/Cargo.lock ] || { [ -f Cargo.lock ] && cp Cargo.lock fuzz/Cargo.lock; } || true

echo "== building fuzz targets (sanitizer: $MODE)"
start=$(date +%s)
cargo fuzz build "${SAN[@]}"
echo "   build took $(($(date +%s) - start)) s"

if [ -n "${FUZZ_TARGETS:-}" ]; then
    read -r -a TARGETS <<<"$FUZZ_TARGETS"
else
    mapfile -t TARGETS < <(cargo fuzz list)
fi

status=0
summary=()
for t in "${TARGETS[@]}"; do
    corpus=fuzz/corpus/$t
    artifacts=fuzz/artifacts/$t
    log=fuzz/artifacts/$t.log
    mkdir -p "$corpus" "$artifacts"
    [ -d "fuzz/seeds/$t" ] && cp -n fuzz/seeds/"$t"/* "$corpus"/ 2>/dev/null || true
    inputs=("$corpus")
    [ -d "fuzz/regressions/$t" ] && inputs+=("fuzz/regressions/$t")
    dict=()
    [ -f "fuzz/dict/$t.dict" ] && dict=("-dict=fuzz/dict/$t.dict")
    before=$(find "$artifacts" -type f | wc -l)
    stamp=$FUZZ_TMP/stamp-$t
    touch "$stamp"

    echo "== fuzzing $t for ${SECS}s"
    set +e
    # outer timeout: a hung build or a stuck libFuzzer must not eat the CI budget
    timeout $((SECS + 300)) cargo fuzz run "${SAN[@]}" "$t" "${inputs[@]}" -- \
        -max_total_time="$SECS" -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 \
        -max_len="$(max_len "$t")" "${dict[@]}" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e

    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    eps=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*')
    corp=$(find "$corpus" -type f | wc -l)
    line="$t: runs=${runs:-?} exec/s=${eps:-?} cov=${cov:-?} corpus=$corp rc=$rc"
    if [ "$rc" -ne 0 ]; then
        status=1
        line="$line FAILED"
        echo "!! $t failed (rc $rc); log: $log"
        grep -m 20 -A1 -E 'panicked|ERROR: |SUMMARY|==[0-9]+==|Test unit written|deadly signal|out-of-memory|timeout' "$log" || tail -n 20 "$log"
        echo "!! new artifacts:"
        find "$artifacts" -type f -newer "$stamp" | sed 's/^/   /'
        echo "   reproduce: cargo fuzz run ${SAN[*]} $t <artifact>"
        echo "   minimize:  cargo fuzz tmin ${SAN[*]} $t <artifact>"
        echo "   then copy the minimized file to fuzz/regressions/$t/"
    elif [ "$(find "$artifacts" -type f | wc -l)" -ne "$before" ]; then
        status=1
        line="$line FAILED (new artifacts)"
    fi
    summary+=("$line")
done

echo "== summary ($MODE, ${SECS}s per target)"
printf '%s\n' "${summary[@]}"
exit $status

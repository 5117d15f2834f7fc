#!/usr/bin/env bash
# "Compressed container written once" (BENCHMARKS.md): two builds of `migrate` side by side on a
# generated 1 GB bf16 model (synth: 30 layers of bf16 [4096, 4096] + bias), into a zstd container:
#   (a) planned:   --to quanto:qint8 --compress zstd
#   (b) unplanned: --to keep --compress zstd
# Each run: wall seconds, peak RSS, and the bytes the process passed to write calls (`wchar` of
# /proc/PID/io, read while the finished process is a zombie, so nothing is missed). Runs of the
# two builds alternate; the output is deleted between runs; the page cache is warm. Prints every
# run, then medians. Deletes the generated files at the end.
#
#   bash benches/compare/written_once.sh OLD_MIGRATE NEW_MIGRATE [REPS]
#
# Env: BENCH_DIR (default /tmp/ckptkit-written-once; on disk, not tmpfs, unless you say so),
# SYNTH (default target/release/examples/synth: `cargo build --release --example synth`),
# GB (model size, default 1).
set -euo pipefail
old="$1"
new="$2"
reps="${3:-5}"
dir="${BENCH_DIR:-/tmp/ckptkit-written-once}"
synth="${SYNTH:-target/release/examples/synth}"
mkdir -p "$dir"
trap 'rm -rf "$dir"' EXIT
"$synth" "$dir/model.safetensors" "${GB:-1}" plain-bf16 >/dev/null 2>&1
cat "$dir/model.safetensors" >/dev/null

# shellcheck source=benches/compare/measure.sh
. "$(dirname "${BASH_SOURCE[0]}")/measure.sh"

for to in quanto:qint8 keep; do
    for r in $(seq "$reps"); do
        for build in old new; do
            if [ "$build" = old ]; then bin="$old"; else bin="$new"; fi
            m=$(measure "$bin" -q convert "$dir/model.safetensors" "$dir/out.ckpk" \
                --to "$to" --compress zstd --force)
            echo "to=$to build=$build run=$r $m size=$(stat -c %s "$dir/out.ckpk")"
            rm -f "$dir/out.ckpk"
        done
    done
done | tee "$dir/runs.txt"

python3 - "$dir/runs.txt" <<'EOF'
import statistics, sys
rows = [dict(f.split("=", 1) for f in l.split()) for l in open(sys.argv[1])]
print("| conversion | build | wall s (median) | runs | peak RSS MiB | bytes written | output bytes |")
print("|---|---|---:|---|---:|---:|---:|")
for to in dict.fromkeys(r["to"] for r in rows):
    for b in ("old", "new"):
        rs = [r for r in rows if r["to"] == to and r["build"] == b]
        walls = sorted(float(r["wall_s"]) for r in rs)
        print(f"| {to} | {b} | {statistics.median(walls):.2f} | {', '.join(f'{w:.2f}' for w in walls)} | "
              f"{statistics.median(int(r['rss_mib']) for r in rs):.0f} | "
              f"{statistics.median(int(r['wchar']) for r in rs):,.0f} | "
              f"{statistics.median(int(r['size']) for r in rs):,.0f} |")
EOF

#!/usr/bin/env bash
# Two builds of `migrate` side by side on the jobs users run on large checkpoints: the
# no-regression check of a change (new/old wall time, medians, at most 1.10 per row).
#
#   bash benches/compare/versus.sh OLD_MIGRATE NEW_MIGRATE [REPS]
#
# Inputs are generated once with `synth` (1 GB plain bf16, and its quanto qint8 form with a map)
# and the containers with the new build. Runs alternate (old, new, old, ...) so that both builds
# see the same machine; outputs are deleted between runs; the page cache is warm. Each run records
# wall seconds, peak RSS (the kernel's accounting of the finished process) and the bytes it passed
# to write calls (`wchar` of /proc/PID/io, read while the finished process is still a zombie).
# Prints every run, then one Markdown row per job: medians and new/old.
#
# Env: BENCH_DIR (default /dev/shm/ckptkit-versus: tmpfs, so the disk does not set the pace),
# SYNTH (default target/release/examples/synth), GB (model size, default 1), KEEP=1 keeps the
# generated inputs, ONLY=REGEX runs only the jobs whose name matches.
set -euo pipefail
old="$1"
new="$2"
reps="${3:-5}"
dir="${BENCH_DIR:-/dev/shm/ckptkit-versus}"
synth="${SYNTH:-target/release/examples/synth}"
gb="${GB:-1}"
mkdir -p "$dir/q"
if [ "${KEEP:-0}" != 1 ]; then trap 'rm -rf "$dir"' EXIT; fi

[ -f "$dir/p.safetensors" ] || "$synth" "$dir/p.safetensors" "$gb" plain-bf16 4096 4096 >/dev/null
[ -f "$dir/q/model.safetensors" ] || "$synth" "$dir/q/model.safetensors" "$gb" quanto-qint8 4096 4096 >/dev/null
[ -f "$dir/p.ckpk" ] || "$new" -q convert "$dir/p.safetensors" "$dir/p.ckpk"
[ -f "$dir/pz.ckpk" ] || "$new" -q convert "$dir/p.safetensors" "$dir/pz.ckpk" --compress zstd

# shellcheck source=benches/compare/measure.sh
. "$(dirname "${BASH_SOURCE[0]}")/measure.sh"

# name|arguments (o/ is the scratch output directory)
jobs=(
    "dequantize qint8 -> bf16|convert $dir/q/model.safetensors $dir/o/deq.safetensors --to plain"
    "quantize bf16 -> qint8|convert $dir/p.safetensors $dir/o/q8/model.safetensors --to quanto:qint8"
    "keep -> .ckpk|convert $dir/p.safetensors $dir/o/k.ckpk"
    "unpack .ckpk -> safetensors|convert $dir/p.ckpk $dir/o/u.safetensors"
    "compress (keep)|convert $dir/p.safetensors $dir/o/z.ckpk --compress zstd"
    "quantize into a compressed .ckpk|convert $dir/p.safetensors $dir/o/qz.ckpk --to quanto:qint8 --compress zstd"
    "decompress|convert $dir/pz.ckpk $dir/o/d.safetensors"
    "verify|verify $dir/p.ckpk"
)

for job in "${jobs[@]}"; do
    name="${job%%|*}"
    if [ -n "${ONLY:-}" ] && ! [[ "$name" =~ $ONLY ]]; then continue; fi
    read -r -a args <<<"${job#*|}"
    for r in $(seq "$reps"); do
        for build in old new; do
            if [ "$build" = old ]; then bin="$old"; else bin="$new"; fi
            rm -rf "$dir/o"
            mkdir -p "$dir/o/q8"
            m=$(measure "$bin" -q "${args[@]}")
            echo "job=${name// /_} build=$build run=$r $m"
        done
    done
done | tee "$dir/runs.txt"
rm -rf "$dir/o"

python3 - "$dir/runs.txt" <<'EOF'
import statistics, sys
rows = [dict(f.split("=", 1) for f in l.split()) for l in open(sys.argv[1])]
bad = [r for r in rows if r["rc"] != "0"]
if bad:
    sys.exit(f"failed runs: {bad}")
print()
print("| job | wall old (s) | wall new (s) | new/old | peak RSS old / new (MiB) | written old / new (MB) |")
print("|---|---:|---:|---:|---:|---:|")
worst = 0.0
for job in dict.fromkeys(r["job"] for r in rows):
    m = {}
    for b in ("old", "new"):
        rs = [r for r in rows if r["job"] == job and r["build"] == b]
        m[b] = (statistics.median(float(r["wall_s"]) for r in rs),
                statistics.median(int(r["rss_mib"]) for r in rs),
                statistics.median(int(r["wchar"]) for r in rs) / 1e6)
    ratio = m["new"][0] / m["old"][0]
    worst = max(worst, ratio)
    print(f"| {job.replace('_', ' ')} | {m['old'][0]:.2f} | {m['new'][0]:.2f} | {ratio:.2f} | "
          f"{m['old'][1]:.0f} / {m['new'][1]:.0f} | {m['old'][2]:.0f} / {m['new'][2]:.0f} |")
print(f"\nworst new/old: {worst:.2f}")
EOF

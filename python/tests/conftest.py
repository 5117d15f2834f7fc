"""Shared helpers of the Python package's tests."""

import json
import struct


def raw_tensors(path):
    """key -> (dtype, shape, bytes) of a safetensors file, read with nothing but struct and json."""
    b = path.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8 : 8 + n])
    h.pop("__metadata__", None)
    base = 8 + n
    return {k: (v["dtype"], v["shape"], b[base + v["data_offsets"][0] : base + v["data_offsets"][1]]) for k, v in h.items()}

"""Helpers shared by the optimum-quanto and int8 interop scripts (fixture generators, live
checkers): stable per-case seeds, bit-exact tensor comparison, file hashing and loading.

Imported by tests/interop/quanto_models.py and tests/interop/int8/int8_models.py, which re-export
these names, so call sites keep using `qm.same_tensor` / `im.same_tensor`.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from typing import Dict, Optional

import torch


def case_seed(base_seed: int, case_name: str) -> int:
    """Stable per-case seed (independent of the order cases are generated in)."""
    return (base_seed * 1_000_003 + zlib.crc32(case_name.encode())) % (2**31)


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> Optional[str]:
    """None if dtype, shape and raw bytes are identical, otherwise a description of the difference."""
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} != {b.dtype}"
    if tuple(a.shape) != tuple(b.shape):
        return f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    ba, bb = tensor_bytes(a), tensor_bytes(b)
    if ba == bb:
        return None
    fa = a.detach().contiguous().reshape(-1)
    fb = b.detach().contiguous().reshape(-1)
    ia = fa.contiguous().view(torch.uint8).reshape(fa.numel(), -1) if fa.numel() else fa
    ib = fb.contiguous().view(torch.uint8).reshape(fb.numel(), -1) if fb.numel() else fb
    diff = (ia != ib).any(dim=1).nonzero().reshape(-1)
    first = int(diff[0])
    return (
        f"{diff.numel()} of {fa.numel()} elements differ; first at flat index {first}: "
        f"{fa[first].item()!r} != {fb[first].item()!r}"
    )


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_tensors(path: str) -> Dict[str, torch.Tensor]:
    """safetensors.torch.load_file, with every tensor copied into a fresh (aligned) allocation.

    load_file in safetensors 0.8.0 can hand out tensors whose data pointer is only as aligned as
    their offset in the file.  With torch 2.15 on an AVX512 CPU, torch._weight_int8pack_mm (the
    bf16 x qint8 CPU matmul quanto uses when in_features % 4 == 0) segfaults on an int8 weight
    whose data pointer is not suitably aligned (seen: ptr % 64 == 36).  Cloning avoids that.
    """
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(path).items()}


def load_case(case_dir: str) -> dict:
    with open(os.path.join(case_dir, "case.json")) as f:
        return json.load(f)

"""Shared helpers for the ComfyUI `mxfp8` fixtures (comfy-kitchen 0.2.40 `TensorCoreMXFP8Layout`).

Used by gen_mxfp8_fixtures.py (writes tests/fixtures/comfy-mxfp8) and check_mxfp8.py.

A layer m of logical shape [R, C] is stored in ComfyUI's save form as
* `{m}.weight`        F8_E4M3 [R32, C32] (R32 = roundup(R, 32), C32 = roundup(C, 32); padding is zeros);
* `{m}.weight_scale`  U8 [roundup(R32, 128), roundup(C32 / 32, 4)]: one E8M0 byte per 32 consecutive elements of a
                       row, in cuBLAS's swizzled 128x4 block layout (comfy_kitchen.float_utils.to_blocked).  The library
                       holds it as torch.float8_e8m0fnu; the fixtures store its bytes as U8 (ComfyUI's reader has
                       no F8_E8M0);
* `{m}.comfy_quant`   U8 1-D: the bytes of json.dumps({"format": "mxfp8"}).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, List

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # tests/interop/comfy
import comfy_models as cm  # noqa: E402
from comfy_models import (  # noqa: E402,F401  (re-exported)
    DTYPES,
    case_seed,
    decode_comfy_quant,
    dtype_name,
    file_header,
    load_case,
    load_tensors,
    same_tensor,
    save_file,
    sha256_file,
    write_json,
)

CK_VERSION = cm.CK_VERSION
FORMAT = "mxfp8"
LAYOUT = "TensorCoreMXFP8Layout"
BLOCK = 32

CASES = [("mxfp8-bf16", "bfloat16"), ("mxfp8-f16", "float16"), ("mxfp8-f32", "float32")]

# name, logical weight shape, bias, quantized, extras
SPECS = [
    dict(name="lin_a", shape=[64, 128], bias=True, quantized=True, outlier=[3, 5, 60.0]),
    dict(name="lin_pad", shape=[40, 96], bias=True, quantized=True),
    dict(name="lin_zero", shape=[32, 64], bias=False, quantized=True, zero_block=[5, 1]),
    dict(name="norm", shape=[64], bias=False, quantized=False),
]


def roundup(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def stored_shapes(shape: List[int]) -> dict:
    r32, c32 = roundup(shape[0], 32), roundup(shape[1], 32)
    return {"weight": [r32, c32], "weight_scale": [roundup(r32, 128), roundup(c32 // BLOCK, 4)],
            "scales_unswizzled": [r32, c32 // BLOCK]}


def float_state_dict(dtype: str, seed: int) -> Dict[str, torch.Tensor]:
    """randn * row_scale + row_offset in f32, cast to D.  lin_a: one outlier (60x the largest other magnitude,
    so its block reaches the fp8 subnormals); lin_zero: one 32-element block [row, block] all zero."""
    T = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    sd: Dict[str, torch.Tensor] = {}
    for s in SPECS:
        n, shape = s["name"], s["shape"]
        if len(shape) == 1:
            sd[f"{n}.weight"] = (1.0 + 0.1 * torch.randn(shape, generator=g)).to(T)
            continue
        o = shape[0]
        val = torch.randn(shape, generator=g) * (0.02 + 0.1 * torch.rand(o, 1, generator=g)) \
            + (torch.linspace(-0.3, 0.3, o).reshape(o, 1) + 0.05 * torch.randn(o, 1, generator=g))
        if s.get("outlier"):
            r, c, f = s["outlier"]
            val[r, c] = f * float(val.abs().max())
        if s.get("zero_block"):
            r, b = s["zero_block"]
            val[r, b * BLOCK:(b + 1) * BLOCK] = 0.0
        sd[f"{n}.weight"] = val.to(T)
        if s["bias"]:
            sd[f"{n}.bias"] = (0.1 * torch.randn(o, generator=g)).to(T)
    return sd


def quantized_modules() -> List[str]:
    return [s["name"] for s in SPECS if s["quantized"]]


def comfy_quant_tensor() -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": FORMAT}).encode("utf-8")), dtype=torch.uint8)


def library_quantize(w: torch.Tensor):
    from comfy_kitchen.tensor import QuantizedTensor

    return QuantizedTensor.from_float(w, LAYOUT)


def library_dequantize(q: torch.Tensor, scale_u8: torch.Tensor, dtype: torch.dtype, logical_shape) -> torch.Tensor:
    """What ComfyUI builds from a loaded state dict: Params(scale (as float8_e8m0fnu), orig_dtype, orig_shape)."""
    from comfy_kitchen.tensor import QuantizedTensor
    from comfy_kitchen.tensor.mxfp8 import TensorCoreMXFP8Layout

    p = TensorCoreMXFP8Layout.Params(scale=scale_u8.contiguous().view(torch.float8_e8m0fnu), orig_dtype=dtype,
                                     orig_shape=tuple(logical_shape))
    return QuantizedTensor(q, LAYOUT, p).dequantize().contiguous()


def unswizzle(scale_u8: torch.Tensor, r32: int, nb: int) -> torch.Tensor:
    """Independent restatement of cuBLAS's block-scale layout: scale (r, c) of the [Rp, Cp] matrix is at flat
    offset (r // 128) * (Cp // 4) * 512 + (c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4."""
    flat = scale_u8.reshape(-1)
    cp = scale_u8.shape[1]
    r = torch.arange(r32).reshape(-1, 1)
    c = torch.arange(nb).reshape(1, -1)
    off = (r // 128) * (cp // 4) * 512 + (c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    return flat[off]

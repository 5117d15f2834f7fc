"""Shared helpers for the ComfyUI `nvfp4` fixtures (comfy-kitchen 0.2.40 `TensorCoreNVFP4Layout`).

Used by gen_nvfp4_fixtures.py (writes tests/fixtures/comfy-nvfp4) and check_nvfp4.py.

A layer m of logical shape [R, C] is stored in ComfyUI's save form as
* `{m}.weight`          U8 [R16, C16 / 2] (R16 = roundup(R, 16), C16 = roundup(C, 16); zero padding): two E2M1
                         codes per byte, the EVEN element of a row in the HIGH nibble (comfy-kitchen hi_first=True);
* `{m}.weight_scale`    F8_E4M3 [roundup(R16, 128), roundup(C16 / 16, 4)]: one E4M3 block scale per 16 consecutive
                         elements of a row, in cuBLAS's swizzled 128x4 block layout (comfy_kitchen.float_utils.to_blocked);
                         the library holds it as torch.float8_e4m3fn and the fixtures store it so;
* `{m}.weight_scale_2`  F32 [] : the per-tensor scale g;
* `{m}.comfy_quant`     U8 1-D: the bytes of json.dumps({"format": "nvfp4"}).

Besides the library calls, this module holds an independent numpy restatement of the quantization and of the
dequantization (`formula_quantize`, `formula_dequantize`): its own E4M3 / E2M1 / bf16 rounding, its own swizzle.
"""

from __future__ import annotations

import json
import os
import sys
from fractions import Fraction
from typing import Dict, List

import numpy as np
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # tests/interop/comfy
import comfy_models as cm  # noqa: E402
from comfy_models import (  # noqa: E402,F401  (re-exported)
    DTYPES,
    case_seed,
    decode_comfy_quant,
    dtype_name,
    f32_bits,
    file_header,
    load_case,
    load_tensors,
    same_tensor,
    save_file,
    sha256_file,
    write_json,
)

CK_VERSION = cm.CK_VERSION
FORMAT = "nvfp4"
LAYOUT = "TensorCoreNVFP4Layout"
BLOCK = 16
F4_MAX = 6.0
F8_MAX = 448.0

CASES = [("nvfp4-bf16", "bfloat16"), ("nvfp4-f16", "float16"), ("nvfp4-f32", "float32")]

# lin_tiny's largest magnitude per dtype: chosen so that g = rne_D(amax / 2688) is a SUBNORMAL of D (bf16 / f32:
# ~3.7e-40, 4 bf16 ulps; f16: ~7.4e-8 -> 1 f16 ulp, rounded down by 20 %, so the top block's scale clamps at 448).
# (1e-30, the obvious "tiny", is 0 in f16: an all-zero f16 tensor gives g = 0 and NaN; see library_edge_cases.)
TINY_AMAX = {"bfloat16": 1e-36, "float16": 2e-4, "float32": 1e-36}

# name, logical weight shape, bias, quantized, extras
SPECS = [
    dict(name="lin_a", shape=[64, 128], bias=True, quantized=True, outlier=[3, 5, 60.0],
         small_rows=[[7, 2.0 ** -10], [9, 2.0 ** -16]]),
    dict(name="lin_pad", shape=[40, 72], bias=True, quantized=True),
    dict(name="lin_zero", shape=[32, 64], bias=False, quantized=True, zero_block=[5, 1]),
    dict(name="lin_tiny", shape=[16, 16], bias=False, quantized=True, tiny=True),
    dict(name="norm", shape=[64], bias=False, quantized=False),
]


def roundup(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def stored_shapes(shape: List[int]) -> dict:
    r16, c16 = roundup(shape[0], 16), roundup(shape[1], 16)
    return {"weight": [r16, c16 // 2], "weight_scale": [roundup(r16, 128), roundup(c16 // BLOCK, 4)],
            "weight_scale_2": [], "scales_unswizzled": [r16, c16 // BLOCK]}


def float_state_dict(dtype: str, seed: int) -> Dict[str, torch.Tensor]:
    """randn * row_scale + row_offset in f32, cast to D (the mxfp8 recipe).  lin_a: one outlier (60x the largest
    other magnitude), row 7 scaled by 2^-10 (its block scales land in the E4M3 subnormals) and row 9 by 2^-16 (its
    block scales round to E4M3 0: non-zero data, scale byte 0, every code 0); lin_zero: one 16-element block
    [row, block] all zero; lin_tiny: randn scaled to amax TINY_AMAX[dtype]."""
    T = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    sd: Dict[str, torch.Tensor] = {}
    for s in SPECS:
        n, shape = s["name"], s["shape"]
        if len(shape) == 1:
            sd[f"{n}.weight"] = (1.0 + 0.1 * torch.randn(shape, generator=g)).to(T)
            continue
        o = shape[0]
        if s.get("tiny"):
            val = torch.randn(shape, generator=g)
            val = val / val.abs().max() * TINY_AMAX[dtype]
        else:
            val = torch.randn(shape, generator=g) * (0.02 + 0.1 * torch.rand(o, 1, generator=g)) \
                + (torch.linspace(-0.3, 0.3, o).reshape(o, 1) + 0.05 * torch.randn(o, 1, generator=g))
        if s.get("outlier"):
            r, c, f = s["outlier"]
            val[r, c] = f * float(val.abs().max())
        for r, f in s.get("small_rows", []):
            val[r] = val[r] * f
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


# --------------------------------------------------------------------------------------
# comfy-kitchen
# --------------------------------------------------------------------------------------


def library_quantize(w: torch.Tensor):
    from comfy_kitchen.tensor import QuantizedTensor

    return QuantizedTensor.from_float(w, LAYOUT)


def library_dequantize(q: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor, dtype: torch.dtype,
                       logical_shape) -> torch.Tensor:
    """What ComfyUI builds from a loaded state dict (comfy/ops.py _load_quantized_module):
    Params(scale=weight_scale_2, block_scale=weight_scale viewed as float8_e4m3fn, orig_dtype, orig_shape)."""
    from comfy_kitchen.tensor import QuantizedTensor
    from comfy_kitchen.tensor.nvfp4 import TensorCoreNVFP4Layout

    p = TensorCoreNVFP4Layout.Params(scale=scale_2, block_scale=scale.contiguous().view(torch.float8_e4m3fn),
                                     orig_dtype=dtype, orig_shape=tuple(logical_shape))
    return QuantizedTensor(q.to(torch.uint8), LAYOUT, p).dequantize().contiguous()


# --------------------------------------------------------------------------------------
# Independent restatement (numpy; no comfy-kitchen, no torch fp8 / bf16 rounding)
# --------------------------------------------------------------------------------------

_P_EMIN = {"bfloat16": (8, -126), "float16": (11, -14), "float32": (24, -126)}


def rne_fraction(q: Fraction, dtype: str) -> Fraction:
    """Exact round-to-nearest-even of a non-negative rational to D (with D's subnormals; no overflow here)."""
    p, emin = _P_EMIN[dtype]
    if q == 0:
        return Fraction(0)
    e = q.numerator.bit_length() - q.denominator.bit_length()
    if Fraction(2) ** e > q:
        e -= 1
    ulp = Fraction(2) ** (max(e, emin) - (p - 1))
    n = q / ulp
    fl = n.numerator // n.denominator
    rem = n - fl
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and fl % 2 == 1):
        fl += 1
    return fl * ulp


def to_f32_np(t: torch.Tensor) -> np.ndarray:
    """A bf16 / f16 / f32 tensor as exact float32 values (bf16 by bit shifting, not by a torch cast)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        u16 = t.view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
        return (u16 << 16).view(np.float32)
    if t.dtype == torch.float16:
        return t.numpy().astype(np.float32)
    return t.numpy().astype(np.float32, copy=True)


def rne_bf16_np(x: np.ndarray) -> np.ndarray:
    """float32 values rounded (nearest-even) to bf16, returned as float32 values (finite inputs)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def round_to(x64: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values that are EXACT products (few significant bits, see formula_dequantize) to D, once."""
    x32 = np.asarray(x64, dtype=np.float64).astype(np.float32)  # exact for bf16/f16 operands; the one rounding for f32
    if dtype == "float32":
        return x32
    if dtype == "float16":
        return x32.astype(np.float16).astype(np.float32)
    return rne_bf16_np(x32)


def from_numpy_as(x32: np.ndarray, dtype: str) -> torch.Tensor:
    """float32 values that are exactly representable in D -> a torch tensor of D (the cast is exact)."""
    t = torch.from_numpy(np.ascontiguousarray(x32, dtype=np.float32))
    out = t.to(DTYPES[dtype])
    if not torch.equal(out.float(), t):
        raise AssertionError("from_numpy_as: a value is not exact in " + dtype)
    return out


def e4m3_encode(b: np.ndarray) -> np.ndarray:
    """Non-negative finite float32 values <= 448 -> float8_e4m3fn bytes, round-to-nearest-even (subnormals 2^-9 k)."""
    b64 = np.asarray(b, dtype=np.float64)
    if not (np.isfinite(b64).all() and (b64 >= 0).all() and (b64 <= F8_MAX).all()):
        raise ValueError("e4m3_encode: values outside [0, 448]")
    out = np.zeros(b64.shape, dtype=np.int64)
    sub = b64 < 2.0 ** -6
    out[sub] = np.rint(b64[sub] * 2.0 ** 9).astype(np.int64)  # k = 8 is 0x08, the smallest normal: right
    nb = b64[~sub]
    _, ex = np.frexp(nb)  # nb = f * 2^ex, f in [0.5, 1)
    e = ex.astype(np.int64) - 1
    mant = np.rint((nb / np.exp2(e.astype(np.float64)) - 1.0) * 8.0).astype(np.int64)
    e = np.where(mant == 8, e + 1, e)
    mant = np.where(mant == 8, 0, mant)
    out[~sub] = ((e + 7) << 3) | mant
    if (out > 0x7E).any():
        raise AssertionError("e4m3_encode: overflow")
    return out.astype(np.uint8)


def e4m3_decode(byte: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bytes -> float64 values (NaN for 0x7F / 0xFF)."""
    b = np.asarray(byte, dtype=np.int64)
    s = np.where(b & 0x80, -1.0, 1.0)
    e = (b >> 3) & 0xF
    m = (b & 7).astype(np.float64)
    v = np.where(e == 0, m * 2.0 ** -9, (1.0 + m / 8.0) * np.exp2((e - 7).astype(np.float64)))
    v = np.where((b & 0x7F) == 0x7F, np.nan, v)
    return s * v


E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float64)


def e2m1_encode(q: np.ndarray) -> np.ndarray:
    """float32 values in [-6, 6] -> E2M1 codes (sign bit 3, including -0), round-to-nearest-even."""
    a = np.abs(np.asarray(q, dtype=np.float64))
    mag = np.where(a < 2.0, np.rint(a * 2.0), np.where(a < 4.0, np.rint(a) + 2.0, np.rint(a / 2.0) + 4.0))
    code = mag.astype(np.int64)
    return (code | np.where(np.signbit(q), 8, 0)).astype(np.uint8)


def e2m1_decode(code: np.ndarray) -> np.ndarray:
    c = np.asarray(code, dtype=np.int64)
    return np.where(c & 8, -1.0, 1.0) * E2M1_VALUES[c & 7]


def swizzle_offsets(rows: int, cols: int, cp: int) -> np.ndarray:
    """Flat offset of block scale (r, c) in the row-major [Rp, Cp] swizzled tensor (cuBLAS 128x4 layout)."""
    r = np.arange(rows).reshape(-1, 1)
    c = np.arange(cols).reshape(1, -1)
    return ((r // 128) * (cp // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4


def unswizzle(scale_u8: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Independent restatement of from_blocked on the bytes of a [Rp, Cp] weight_scale."""
    flat = scale_u8.contiguous().view(torch.uint8).reshape(-1)
    off = torch.from_numpy(swizzle_offsets(rows, cols, scale_u8.shape[1]))
    return flat[off]


def formula_quantize(w: torch.Tensor, dtype: str) -> dict:
    """The rule, restated: g = f32(rne_D(amax / 2688)) (exact rational rounding);
    per 16-block b = min(rne32(rne32(f32(amax_blk) / 6) / g), 448), b8 = rne_e4m3(b), tot = rne32(g * b8);
    code = 0 if tot == 0 else rne_e2m1(clamp(rne32(f32(x) / tot), -6, 6)) with the quotient's sign bit (so -0 -> 8);
    byte = code[2i] << 4 | code[2i + 1]."""
    R, C = w.shape
    r16, c16 = roundup(R, 16), roundup(C, 16)
    x = np.zeros((r16, c16), dtype=np.float32)
    x[:R, :C] = to_f32_np(w)
    amax = float(np.abs(x).max())
    g_frac = rne_fraction(Fraction(amax) / 2688, dtype)
    g = np.float32(float(g_frac))
    if Fraction(float(g)) != g_frac:
        raise AssertionError("g not exact in f32")
    blocks = x.reshape(r16, c16 // BLOCK, BLOCK)
    amax_blk = np.abs(blocks).max(axis=-1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        b = (amax_blk / np.float32(6.0)).astype(np.float32) / g
        b = np.minimum(b.astype(np.float32), np.float32(F8_MAX))
        clamped = int((amax_blk / np.float32(6.0) / g > np.float32(F8_MAX)).sum())
        if np.isnan(b).any():
            raise ValueError("the block scale is NaN (g == 0 and an all-zero block): the library writes NaN here")
        b8 = e4m3_encode(b)
        tot = (g * e4m3_decode(b8).astype(np.float32)).astype(np.float32)
        zero = tot == 0
        q = (blocks / np.where(zero, np.float32(1.0), tot)[..., None]).astype(np.float32)
    q = np.clip(q, np.float32(-F4_MAX), np.float32(F4_MAX))
    codes = np.where(zero[..., None], 0, e2m1_encode(q)).astype(np.uint8).reshape(r16, c16)
    packed = ((codes[:, 0::2] << 4) | codes[:, 1::2]).astype(np.uint8)
    rp, cp = roundup(r16, 128), roundup(c16 // BLOCK, 4)
    sw = np.zeros(rp * cp, dtype=np.uint8)
    sw[swizzle_offsets(r16, c16 // BLOCK, cp)] = b8
    return {"g": g, "packed": packed, "scales": b8, "swizzled": sw.reshape(rp, cp), "codes": codes,
            "clamped_blocks": clamped, "quotients_clamped": int((np.abs(blocks / np.where(zero, 1, tot)[..., None])
                                                               > F4_MAX).sum())}


def formula_dequantize(packed: np.ndarray, scales_u8: np.ndarray, g: float, dtype: str, R: int, C: int) -> torch.Tensor:
    """ts = rne_D(rne_D(g) * e4m3(b8)), w = rne_D(e2m1(code) * ts), cropped to [R, C].  Both products are exact in
    float64 (g_D has <= 24 significant bits, an E4M3 value <= 4, an E2M1 value <= 2, all far from f64's range ends),
    so each is rounded once."""
    r16 = packed.shape[0]
    codes = np.empty((r16, packed.shape[1] * 2), dtype=np.uint8)
    codes[:, 0::2] = packed >> 4
    codes[:, 1::2] = packed & 0x0F
    g_d = round_to(np.float64(g), dtype).astype(np.float64)
    ts = round_to(g_d * e4m3_decode(scales_u8), dtype).astype(np.float64)  # [r16, c16/16]
    vals = e2m1_decode(codes).reshape(r16, -1, BLOCK) * ts[..., None]
    out = round_to(vals.reshape(r16, -1), dtype)[:R, :C]
    return from_numpy_as(out, dtype)

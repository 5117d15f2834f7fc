"""Shared helpers for the ComfyUI `comfy_quant` per-tensor FP8 and `int8_tensorwise` interop fixtures
(comfy-kitchen 0.2.40).

Used by gen_comfy_fixtures.py (writes the golden fixtures), check_comfy.py (checks a ckptkit-written
file against a case) and selftest_check_comfy.py.

A *case* is a JSON-serialisable dict (stored as case.json next to the fixture files).  Everything
needed to rebuild the float state dict and quantize it exactly as the generator did comes from
that dict (name, dtype, format, seed, specs).

Library entry points (comfy-kitchen 0.2.40, CPU, eager backend; see the fixtures' README):

* quantize:   `comfy_kitchen.tensor.QuantizedTensor.from_float(w, "TensorCoreFP8Layout",
              scale="recalculate", dtype=torch.float8_e4m3fn | torch.float8_e5m2)`
              (= `TensorCoreFP8Layout.quantize`, which picks the scale and calls
              `comfy_kitchen.quantize_per_tensor_fp8` -> torch.ops.comfy_kitchen.quantize_fp8 -> the
              registry's eager `quantize_per_tensor_fp8`);
* serialise:  `QuantizedTensor.state_dict(prefix="{m}.weight")` -> `{m}.weight`, `{m}.weight_scale`;
* dequantize: `QuantizedTensor(q, "TensorCoreFP8Layout", TensorCoreFP8Layout.Params(scale=s,
              orig_dtype=D, orig_shape=q.shape)).dequantize()` (what ComfyUI builds from a loaded
              state dict), cross-checked against `comfy_kitchen.dequantize_per_tensor_fp8(q, s, D)`.

The independent re-statement of the math (`formula_quantize`, `formula_dequantize`) uses plain torch
casts between f32/bf16/f16 and its own bit-level fp8 codec in numpy (no torch fp8 cast).

`int8_tensorwise` (one format name for both scale shapes: a 0-dim F32 `weight_scale` is one scale per
tensor, an F32 `[out, 1]` one is one scale per row):

* quantize:   `QuantizedTensor.from_float(w, "TensorWiseINT8Layout", scale="recalculate",
              per_channel=False | True)` (= `TensorWiseINT8Layout.quantize` -> registry ->
              eager `quantize_int8_tensorwise(x, scale, stochastic_rounding=0)` /
              `quantize_int8_rowwise(x, stochastic_rounding=0)`), cross-checked against
              `comfy_kitchen.quantize_int8_tensorwise(w)` / `comfy_kitchen.quantize_int8_rowwise(w)`;
* serialise:  as above (`{m}.weight` I8, `{m}.weight_scale` F32 `[]` / `[out, 1]`);
* dequantize: `QuantizedTensor(q, "TensorWiseINT8Layout", TensorWiseINT8Layout.Params(scale=s,
              orig_dtype=D, orig_shape=q.shape)).dequantize()` (-> torch.ops.comfy_kitchen.
              dequantize_int8_simple_dtype), cross-checked against
              `comfy_kitchen.dequantize_int8_simple(q, s).to(D)`.

Its re-statement (`int8_formula_quantize`, `int8_formula_dequantize`) is numpy with f64 intermediates
plus torch's f32 -> bf16/f16 casts (spec/layouts.md §5.3).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from interop_common import (  # noqa: E402,F401  (re-exported)
    case_seed,
    load_case,
    load_tensors,
    same_tensor,
    sha256_file,
    tensor_bytes,
)

CK_VERSION = "0.2.40"
TORCH_VERSION = "2.15.0"
LAYOUT = "TensorCoreFP8Layout"
BACKEND = "eager"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
# safetensors dtype names of the stored codes
ST_DTYPE = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "int8_tensorwise": "I8"}

# ComfyUI `int8_tensorwise` (comfy-kitchen TensorWiseINT8Layout): one format name for both scale shapes
INT8_FORMAT = "int8_tensorwise"
INT8_LAYOUT = "TensorWiseINT8Layout"
ALL_FORMATS = [*FORMATS, INT8_FORMAT]
# format -> (comfy-kitchen layout, storage dtype of `{m}.weight`), as ComfyUI's QUANT_ALGOS maps them
FORMAT_LAYOUTS = {**{fmt: (LAYOUT, dt) for fmt, dt in FORMATS.items()}, INT8_FORMAT: (INT8_LAYOUT, torch.int8)}
# the int8 cases add one all-zero row to this layer (before its negative-max element is placed)
INT8_ZERO_ROW = ("lin_neg", 4)


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------
#
# spec fields: name, kind (Linear / Norm / Conv2d), shape of the weight, bias, and
#   quantized: the layer ComfyUI would quantize (a Linear not in the exclusion list)
#   skip:      a Linear left plain (the "excluded" layer: ckptkit --exclude lin_skip)
#   wide:      columns 128.. get log-uniform tiny magnitudes, plus two large outliers
#   neg_max:   the element of largest magnitude is negative


def lin(name, i, o, bias=True, **kw):
    return dict(name=name, kind="Linear", shape=[o, i], bias=bias, quantized=not kw.get("skip", False), **kw)


def norm(name, n):
    return dict(name=name, kind="Norm", shape=[n], bias=True, quantized=False)


def conv(name, o, i, k):
    return dict(name=name, kind="Conv2d", shape=[o, i, k, k], bias=True, quantized=False)


SPECS = [
    lin("lin_a", 64, 16),
    lin("lin_ragged", 37, 5),
    lin("lin_nobias", 32, 8, bias=False),
    lin("lin_wide", 256, 4, wide=True),
    lin("lin_neg", 24, 6, neg_max=True),
    norm("norm", 64),  # 1-D: never quantized
    conv("conv", 8, 4, 3),  # 4-D: ComfyUI's mixed_precision_ops quantize Linear only
    lin("lin_skip", 16, 4, skip=True),  # a Linear left plain
]

WIDE_OUTLIERS = [  # (row, col, factor x max|other elements|)
    (1, 77, 40.0),
    (3, 5, -20.0),
]
NEG_MAX = (2, 11, -1.5)


def case_name(dtype: str, fmt: str) -> str:
    return f"comfy-{DTYPE_SHORT[dtype]}-{fmt}"


def int8_specs() -> List[dict]:
    """SPECS with, in lin_neg only and for the int8 cases only: one all-zero row (INT8_ZERO_ROW), and the
    negative max element moved up to a magnitude that gives code -128 in bf16 (bf16_minus_128_magnitude)."""
    out = [dict(s) for s in SPECS]
    for s in out:
        if s["name"] == INT8_ZERO_ROW[0]:
            s["zero_row"] = INT8_ZERO_ROW[1]
            s["neg_max_bf16_minus_128"] = True
    return out


def bf16_minus_128_magnitude(a: float) -> float:
    """The smallest bf16 value v >= rne_bf16(a) for which comfy-kitchen's bf16 int8 arithmetic puts v exactly
    on 127.5 (rne_bf16(v / rne_bf16(f32(v)/127)) == 127.5), so that -v, as the amax element of a tensor or
    a row, gets code -128 (and +v would get a clipped 127).  v is bf16-exact, hence also exact in f16 and
    f32 (where the same value gives -127).  About 1 in 6 bf16 values qualifies."""
    bits = torch.tensor([a], dtype=torch.float32).to(torch.bfloat16).view(torch.int16)
    for _ in range(1 << 15):
        v = bits.view(torch.bfloat16)
        s = (v.float() / 127.0).to(torch.bfloat16)
        if float((v / s).float()) == 127.5:
            return float(v.float())
        bits = bits + 1
    raise RuntimeError(f"no bf16 value >= {a!r} reaches 127.5")


def case_list() -> List[dict]:
    out = []
    for dtype in ("bfloat16", "float16", "float32"):
        for fmt in FORMATS:
            out.append(dict(name=case_name(dtype, fmt), dtype=dtype, format=fmt,
                            specs=[dict(s) for s in SPECS]))
    for dtype in ("bfloat16", "float16", "float32"):
        for per_row in (False, True):
            out.append(dict(name=f"comfy-{DTYPE_SHORT[dtype]}-int8_{'rowwise' if per_row else 'tensorwise'}",
                            dtype=dtype, format=INT8_FORMAT, per_row=per_row,
                            ckptkit_target=f"comfy:{INT8_FORMAT}" + (":per_row" if per_row else ""),
                            specs=int8_specs()))
    return out


def is_int8(case: dict) -> bool:
    return case.get("format") == INT8_FORMAT


def quantized_module_names(case: dict) -> List[str]:
    return [s["name"] for s in case["specs"] if s["quantized"]]


def skipped_module_names(case: dict) -> List[str]:
    return [s["name"] for s in case["specs"] if s["kind"] == "Linear" and not s["quantized"]]


# --------------------------------------------------------------------------------------
# Float weights
# --------------------------------------------------------------------------------------


def float_state_dict(case: dict, seed: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The case's float state dict: `randn * row_scale + row_offset` in f32 (as the int8 and quanto
    fixtures), then cast to the case dtype.  One generator seeded with the case seed, specs in order."""
    T = DTYPES[case["dtype"]]
    g = torch.Generator().manual_seed(case["seed"] if seed is None else seed)
    sd: Dict[str, torch.Tensor] = {}
    for s in case["specs"]:
        shape = s["shape"]
        n = s["name"]
        if s["kind"] == "Norm":
            sd[f"{n}.weight"] = (1.0 + 0.1 * torch.randn(shape, generator=g)).to(T)
            sd[f"{n}.bias"] = (0.1 * torch.randn(shape, generator=g)).to(T)
            continue
        o = shape[0]
        base = torch.randn(shape, generator=g, dtype=torch.float32)
        row_shape = [o] + [1] * (len(shape) - 1)
        row_scale = (0.02 + 0.1 * torch.rand(o, generator=g)).reshape(row_shape)
        row_offset = (torch.linspace(-0.3, 0.3, o) + 0.05 * torch.randn(o, generator=g)).reshape(row_shape)
        val = base * row_scale + row_offset
        if s.get("wide"):
            # columns 128.. : random sign, magnitude 2^-U(3, 30) (0.125 .. 9.3e-10): with the outliers
            # below they reach the fp8 subnormals and underflow to zero (both formats)
            c0 = shape[1] // 2
            k = (o, shape[1] - c0)
            mag = torch.exp2(-(3.0 + 27.0 * torch.rand(k, generator=g)))
            sign = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
            val[:, c0:] = sign * mag
            m = float(val.abs().max())
            for r, c, f in WIDE_OUTLIERS:
                val[r, c] = f * m
        if s.get("zero_row") is not None:
            # int8 cases only: one all-zero row (the per-row scale is then the library's floor 1e-30)
            val[s["zero_row"]] = 0.0
        if s.get("neg_max"):
            r, c, f = NEG_MAX
            val[r, c] = f * float(val.abs().max())
            if s.get("neg_max_bf16_minus_128"):
                val[r, c] = -bf16_minus_128_magnitude(float(-val[r, c]))
        sd[f"{n}.weight"] = val.to(T)
        if s["bias"]:
            sd[f"{n}.bias"] = (0.1 * torch.randn(o, generator=g)).to(T)
    return sd


# --------------------------------------------------------------------------------------
# comfy-kitchen (the library's own code paths)
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def eager_backend():
    """Force comfy-kitchen's eager backend (on a CPU-only machine it is also the only one available)."""
    from comfy_kitchen.registry import registry

    with registry.use_backend(BACKEND):
        yield


def backend_report() -> dict:
    """Which comfy-kitchen backend serves the fp8 ops here (without the override)."""
    from comfy_kitchen.registry import registry

    x = torch.zeros(2, 2)
    s = torch.tensor(1.0)
    out = {}
    for fn, kw in (("quantize_per_tensor_fp8", {"x": x, "scale": s, "output_type": torch.float8_e4m3fn}),
                   ("dequantize_per_tensor_fp8", {"x": x.to(torch.float8_e4m3fn), "scale": s,
                                                  "output_type": torch.float32})):
        out[fn] = registry.get_capable_backend(fn, kw)
    out["available"] = sorted(k for k, v in registry.list_backends().items() if v["available"])
    return out


def library_quantize(w: torch.Tensor, fmt: str):
    """QuantizedTensor.from_float(w, "TensorCoreFP8Layout", scale="recalculate", dtype=T)."""
    from comfy_kitchen.tensor import QuantizedTensor

    with eager_backend():
        return QuantizedTensor.from_float(w, LAYOUT, scale="recalculate", dtype=FORMATS[fmt])


def library_quantize_with_scale(w: torch.Tensor, fmt: str, scale):
    """The same entry point with an explicit scale (probes only)."""
    from comfy_kitchen.tensor import QuantizedTensor

    with eager_backend():
        return QuantizedTensor.from_float(w, LAYOUT, scale=scale, dtype=FORMATS[fmt])


def library_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What ComfyUI does with a loaded `{m}.weight` / `{m}.weight_scale` pair: a QuantizedTensor with
    TensorCoreFP8Layout.Params(scale, orig_dtype = the compute dtype, orig_shape), then .dequantize()
    (-> TensorCoreFP8Layout.dequantize -> comfy_kitchen.dequantize_per_tensor_fp8)."""
    from comfy_kitchen.tensor import QuantizedTensor, TensorCoreFP8Layout

    with eager_backend():
        params = TensorCoreFP8Layout.Params(scale=scale, orig_dtype=dtype, orig_shape=tuple(q.shape))
        return QuantizedTensor(q, LAYOUT, params).dequantize()


def library_dequantize_function(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """comfy_kitchen.dequantize_per_tensor_fp8(q, f32(scale), dtype)."""
    import comfy_kitchen as ck

    with eager_backend():
        return ck.dequantize_per_tensor_fp8(q, scale.to(torch.float32), dtype)


# --------------------------------------------------------------------------------------
# ComfyUI state-dict forms
# --------------------------------------------------------------------------------------


def comfy_quant_tensor(fmt: str, **extra) -> torch.Tensor:
    """`{m}.comfy_quant`: U8 1-D, the bytes of json.dumps({"format": fmt}) (Python defaults)."""
    return torch.tensor(list(json.dumps({"format": fmt, **extra}).encode()), dtype=torch.uint8)


def decode_comfy_quant(t: torch.Tensor) -> dict:
    """As ComfyUI reads it: json.loads of the tensor's bytes."""
    return json.loads(bytes(t.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))


def comfy_state_dict(case: dict, float_sd: dict, qts: dict) -> Dict[str, torch.Tensor]:
    """ComfyUI's comfy_quant form: for each quantized layer m, QuantizedTensor.state_dict("{m}.weight")
    (-> `{m}.weight` codes, `{m}.weight_scale` F32 0-dim) and `{m}.comfy_quant`; every other tensor
    (biases, norm, conv, the skipped Linear) as in the float state dict."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in float_sd.items():
        m = k[: -len(".weight")] if k.endswith(".weight") else None
        if m in qts:
            part = qts[m].state_dict(f"{m}.weight")
            if set(part) != {f"{m}.weight", f"{m}.weight_scale"}:
                raise RuntimeError(f"{m}: QuantizedTensor.state_dict gave keys {sorted(part)}")
            out.update({kk: vv.detach().clone().contiguous() for kk, vv in part.items()})
            out[f"{m}.comfy_quant"] = comfy_quant_tensor(case["format"])
        else:
            out[k] = v
    return out


def legacy_state_dict(case: dict, comfy_sd: dict) -> Dict[str, torch.Tensor]:
    """The same codes under ComfyUI's legacy "scaled fp8" key names: marker `scaled_fp8` (the weight
    fp8 dtype, shape [0]), `{m}.scale_weight` instead of `{m}.weight_scale`, no comfy_quant."""
    out: Dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=FORMATS[case["format"]])}
    for k, v in comfy_sd.items():
        if k.endswith(".comfy_quant"):
            continue
        if k.endswith(".weight_scale"):
            out[k[: -len(".weight_scale")] + ".scale_weight"] = v
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------------------
# Independent re-statement (spec/layouts.md §5.2) with an own bit-level fp8 codec
# --------------------------------------------------------------------------------------

FP8_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}


def fp8_decode_table(fmt: str) -> np.ndarray:
    """f64 value of each of the 256 codes, from the bit fields (NaN for NaN codes, ±inf for e5m2 inf)."""
    if fmt == "float8_e4m3fn":
        eb, mb, bias = 4, 3, 7
    else:
        eb, mb, bias = 5, 2, 15
    vals = np.empty(256, dtype=np.float64)
    for c in range(256):
        sign = -1.0 if c & 0x80 else 1.0
        e = (c >> mb) & ((1 << eb) - 1)
        m = c & ((1 << mb) - 1)
        if fmt == "float8_e4m3fn" and e == 15 and m == 7:
            v = float("nan")
        elif fmt == "float8_e5m2" and e == 31:
            v = float("inf") if m == 0 else float("nan")
        elif e == 0:
            v = m / (1 << mb) * 2.0 ** (1 - bias)
        else:
            v = (1 + m / (1 << mb)) * 2.0 ** (e - bias)
        vals[c] = sign * v
    return vals


def fp8_is_nan_code(fmt: str, b: np.ndarray) -> np.ndarray:
    return np.isnan(fp8_decode_table(fmt)[b.astype(np.int64)])


def fp8_encode_rne(t: np.ndarray, fmt: str):
    """Round-to-nearest-even of finite f32 values (already clamped to ±max) into fp8 codes.

    Returns (codes uint8, tie mask).  NaN -> 0x7F (sign unreliable in torch; callers compare NaN-ness)."""
    table = fp8_decode_table(fmt)
    pos = table[:128]
    finite = np.isfinite(pos)
    ncodes = int(np.argmax(~finite)) if (~finite).any() else 128  # codes 0..ncodes-1 are finite, increasing
    values = pos[:ncodes]
    t = np.asarray(t, dtype=np.float32).reshape(-1)
    a = np.abs(t.astype(np.float64))
    nan = np.isnan(a)
    if np.any(a[~nan] > values[-1]):
        raise ValueError("fp8_encode_rne: value above the format's max (clamp first)")
    a0 = np.where(nan, 0.0, a)
    hi = np.searchsorted(values, a0, side="left")  # first value >= a
    hi = np.minimum(hi, ncodes - 1)
    lo = np.maximum(hi - 1, 0)
    exact = values[hi] == a0
    d_lo = a0 - values[lo]
    d_hi = values[hi] - a0
    tie = (~exact) & (d_lo == d_hi)
    pick_hi = exact | (d_hi < d_lo) | (tie & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    code = code | np.where(np.signbit(t), 0x80, 0).astype(np.uint8)
    code = np.where(nan, np.uint8(0x7F), code).astype(np.uint8)
    return code, tie & ~nan


def rne(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round an f32 tensor to dtype (torch's f32 -> bf16/f16 casts are RNE) and back to f32."""
    return x.to(dtype).to(torch.float32)


def formula_quantize(x: torch.Tensor, fmt: str):
    """(scale f32 0-dim, codes uint8, stats) per spec/layouts.md §5.2, D = x.dtype:
    s = f32(rne_D(amax_D / max_T)); inv = rne_D(f32(1) / s); t = rne_D(x * inv);
    t = clamp(t, -max_T, max_T); q = rne_T(t)."""
    D = x.dtype
    mx = np.float32(FP8_MAX[fmt])
    xf = x.to(torch.float32).numpy().astype(np.float32)
    with np.errstate(all="ignore"):
        amax = np.max(np.abs(xf)) if xf.size else np.float32(0)  # exact in D; NaN propagates
        s = rne(torch.tensor(float(np.float32(amax) / mx), dtype=torch.float32), D)  # f32 division, rounded to D
        inv = rne(torch.tensor(float(np.float32(1.0) / np.float32(s.item())), dtype=torch.float32), D)
        t = rne(torch.from_numpy((xf * np.float32(inv.item())).astype(np.float32)), D)  # exact product for bf16/f16
    tn = t.numpy()
    clamped = np.abs(tn) > mx
    tn = np.where(np.isnan(tn), tn, np.clip(tn, -mx, mx)).astype(np.float32)
    codes, tie = fp8_encode_rne(tn, fmt)
    codes = codes.reshape(x.shape)
    stats = {
        "elements": int(codes.size),
        "clamped": int(clamped.sum()),
        "ties": int(tie.sum()),
        "nan_codes": int(fp8_is_nan_code(fmt, codes).sum()),
    }
    return s.reshape(()), codes, stats


def formula_dequantize(codes: np.ndarray, scale: torch.Tensor, out_dtype: torch.dtype, fmt: str) -> torch.Tensor:
    """rne_O(O(q) * rne_O(s)), with O(q) from the own codec (fp8 values are exact in bf16/f16/f32)."""
    qv = torch.from_numpy(fp8_decode_table(fmt)[codes.astype(np.int64)].astype(np.float32))
    qO = qv.to(out_dtype)
    sO = scale.to(torch.float32).to(out_dtype)
    return (qO.to(torch.float32) * sO.to(torch.float32)).to(out_dtype)


def inv_overflows(scale: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when the library's inv = rne_D(f32(1)/s) is infinite (s == 0, or an f16 model with a small
    amax): then every non-zero element saturates to ±max and every zero becomes NaN."""
    inv = (torch.tensor(1.0, dtype=torch.float32) / scale.to(torch.float32)).to(dtype)
    return bool(torch.isinf(inv))


def code_bytes(q: torch.Tensor) -> np.ndarray:
    """The raw code bytes of an fp8 tensor."""
    return q.contiguous().view(torch.uint8).numpy().copy()


def code_stats(fmt: str, b: np.ndarray) -> dict:
    """Counts of code classes (zero, subnormal, max-magnitude, NaN) in a byte array."""
    mb = 3 if fmt == "float8_e4m3fn" else 2
    mag = b & 0x7F
    exp = mag >> mb
    table = fp8_decode_table(fmt)
    maxcode = int(np.nanargmax(np.where(np.isfinite(table[:128]), table[:128], -1.0)))
    return {
        "zero": int((mag == 0).sum()),
        "subnormal": int(((exp == 0) & (mag != 0)).sum()),
        "max_magnitude": int((mag == maxcode).sum()),
        "nan": int(fp8_is_nan_code(fmt, b).sum()),
        "negative": int(((b & 0x80) != 0).sum()),
    }


# --------------------------------------------------------------------------------------
# int8_tensorwise: the library (comfy-kitchen TensorWiseINT8Layout, eager backend)
# --------------------------------------------------------------------------------------


def int8_backend_report() -> dict:
    """Which comfy-kitchen backend serves the int8 ops here (without the override)."""
    from comfy_kitchen.registry import registry

    x = torch.zeros(2, 2)
    out = {}
    for fn, kw in (("quantize_int8_tensorwise", {"x": x, "scale": None, "stochastic_rounding": 0}),
                   ("quantize_int8_rowwise", {"x": x, "stochastic_rounding": 0}),
                   ("dequantize_int8_simple_dtype", {"q": x.to(torch.int8), "scale": torch.tensor(1.0),
                                                     "output_dtype_code": 0})):
        out[fn] = registry.get_capable_backend(fn, kw)
    out["available"] = sorted(k for k, v in registry.list_backends().items() if v["available"])
    return out


def library_quantize_int8(w: torch.Tensor, per_row: bool, scale="recalculate"):
    """QuantizedTensor.from_float(w, "TensorWiseINT8Layout", scale=scale, per_channel=per_row)
    (stochastic_rounding and convrot left at their defaults: 0 = off, False).  With per_channel=True
    the layout calls quantize_int8_rowwise, which takes no scale argument."""
    from comfy_kitchen.tensor import QuantizedTensor

    with eager_backend():
        return QuantizedTensor.from_float(w, INT8_LAYOUT, scale=scale, per_channel=per_row)


def library_quantize_int8_function(w: torch.Tensor, per_row: bool):
    """comfy_kitchen.quantize_int8_rowwise(w) / comfy_kitchen.quantize_int8_tensorwise(w): (codes, scale)."""
    import comfy_kitchen as ck

    with eager_backend():
        return ck.quantize_int8_rowwise(w) if per_row else ck.quantize_int8_tensorwise(w)


def library_dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What ComfyUI builds from a loaded `{m}.weight` / `{m}.weight_scale` pair: a QuantizedTensor with
    TensorWiseINT8Layout.Params(scale, orig_dtype = the compute dtype, orig_shape), then .dequantize()
    (-> torch.ops.comfy_kitchen.dequantize_int8_simple_dtype -> eager: (f32(q) * scale).to(dtype))."""
    from comfy_kitchen.tensor import QuantizedTensor, TensorWiseINT8Layout

    with eager_backend():
        params = TensorWiseINT8Layout.Params(scale=scale, orig_dtype=dtype, orig_shape=tuple(q.shape))
        return QuantizedTensor(q, INT8_LAYOUT, params).dequantize()


def library_dequantize_int8_function(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """comfy_kitchen.dequantize_int8_simple(q, scale).to(dtype)."""
    import comfy_kitchen as ck

    with eager_backend():
        return ck.dequantize_int8_simple(q, scale).to(dtype)


def library_quantize_case(case: dict, w: torch.Tensor):
    """The case's library call: TensorCoreFP8Layout for the fp8 formats, TensorWiseINT8Layout (per row when
    case["per_row"]) for int8_tensorwise."""
    if is_int8(case):
        return library_quantize_int8(w, bool(case.get("per_row", False)))
    return library_quantize(w, case["format"])


def library_dequantize_format(fmt: str, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ComfyUI's dequantization of a loaded (codes, scale) pair whose comfy_quant names `fmt`."""
    if fmt == INT8_FORMAT:
        return library_dequantize_int8(q, scale, dtype)
    return library_dequantize(q, scale, dtype)


# --------------------------------------------------------------------------------------
# int8_tensorwise: independent re-statement (spec/layouts.md §5.3)
# --------------------------------------------------------------------------------------

INT8_SCALE_FLOOR = np.float32(1e-30)


def _rne_bf16_from_f64(a: np.ndarray) -> np.ndarray:
    """Round f64 values straight to bf16 (8 significant bits, ties to even), for |a| in bf16's normal
    range or 0; returned as f64.  Only used for a statistic (single vs double rounding)."""
    m, e = np.frexp(a)  # a = m * 2^e, 0.5 <= |m| < 1
    return np.ldexp(np.rint(m * 256.0) / 256.0, e)


def int8_formula_quantize(x: torch.Tensor, per_row: bool):
    """(scale f32 [] or [out,1], scale' (f32 values of D), codes int8, undefined mask, stats), D = x.dtype:

    s  = max(f32(amax) / 127, f32(1e-30))   amax = max|x| over the tensor or the last dim (keepdim), f32
    s' = rne_D(s), and finfo(D).tiny if that is 0
    t  = rne_D(x / s')                       the quotient in f64, rounded to f32, then to D (both steps
                                             are innocuous double roundings, so t is the correctly
                                             rounded D quotient, which is what a division in D gives)
    q  = clamp(round_half_even(t), -128, 127)
    A NaN t has no defined int8 value (the library casts NaN to int8): `undefined` marks those."""
    D = x.dtype
    xf = x.to(torch.float32).numpy().astype(np.float32)
    with np.errstate(all="ignore"):
        if per_row:
            amax = np.max(np.abs(xf), axis=-1, keepdims=True).astype(np.float32)
        else:
            amax = np.float32(np.max(np.abs(xf)))
        s = np.maximum(np.asarray(amax, dtype=np.float32) / np.float32(127.0), INT8_SCALE_FLOOR).astype(np.float32)
        sp = rne(torch.from_numpy(np.array(s, dtype=np.float32, ndmin=1)), D).numpy().reshape(np.shape(s))
        sp_zero = sp == 0
        sp = np.where(sp_zero, np.float32(torch.finfo(D).tiny), sp).astype(np.float32)
        q64 = xf.astype(np.float64) / sp.astype(np.float64)
        t = rne(torch.from_numpy(np.ascontiguousarray(q64.astype(np.float32))), D).numpy()
        r = np.rint(t)  # round half to even
    undefined = np.isnan(t)
    rr = np.where(undefined, 0.0, r)
    codes = np.clip(rr, -128, 127).astype(np.int8)
    frac = np.abs(t - np.trunc(t))
    stats = {
        "elements": int(codes.size),
        "ties": int(((frac == 0.5) & np.isfinite(t)).sum()),
        "clipped_to_127": int((rr > 127).sum()),
        "clipped_to_minus_128": int((rr < -128).sum()),
        "abs_t_above_127": int((np.abs(np.where(undefined, 0, t)) > 127).sum()),
        "undefined_nan": int(undefined.sum()),
        "scale_prime_zero_to_tiny": int(np.sum(sp_zero)),
        "scale_prime_below_scale": int(np.sum(sp < s)),
    }
    return torch.from_numpy(np.array(s, dtype=np.float32)), sp, codes, undefined, stats


def int8_formula_dequantize(codes: np.ndarray, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """rne_O(rne_f32(f32(q) * s)): an f32 product (numpy), then torch's f32 -> O cast."""
    s = scale.to(torch.float32).numpy().astype(np.float32)
    with np.errstate(all="ignore"):
        p = (codes.astype(np.float32) * s).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(p)).to(out_dtype)


def int8_single_rounding_differs(codes: np.ndarray, scale: torch.Tensor, out_dtype: torch.dtype) -> int:
    """How many elements of rne_O(exact q*s) (one rounding) differ from the library's rne_O(rne_f32(q*s))
    (a statistic: O = bf16 or f16 only; q*s is exact in f64)."""
    if out_dtype == torch.float32:
        return 0
    s = scale.to(torch.float32).numpy().astype(np.float64)
    exact = codes.astype(np.float64) * s
    two = int8_formula_dequantize(codes, scale, out_dtype).to(torch.float32).numpy().astype(np.float64)
    if out_dtype == torch.float16:
        one = exact.astype(np.float16).astype(np.float64)  # numpy rounds f64 -> f16 directly
    else:
        one = _rne_bf16_from_f64(exact)
        small = (np.abs(exact) < 2.0 ** -126) & (exact != 0)  # bf16 subnormal range: not covered
        one = np.where(small, two, one)
    return int((one != two).sum())


def int8_code_stats(q: np.ndarray) -> dict:
    q = q.astype(np.int16)
    return {
        "minus_128": int((q == -128).sum()),
        "plus_127": int((q == 127).sum()),
        "minus_127": int((q == -127).sum()),
        "zero": int((q == 0).sum()),
        "negative": int((q < 0).sum()),
    }


# --------------------------------------------------------------------------------------
# Tensor / file helpers
# --------------------------------------------------------------------------------------


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def file_header(path: str) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def f32_bits(x: float) -> str:
    return "0x%08x" % int(np.array([x], dtype=np.float32).view(np.uint32)[0])


def pretty_json(obj, indent: int = 2, width: int = 120, _level: int = 0) -> str:
    """json.dumps with indentation, but any list/object whose one-line form fits in `width` columns
    is written on one line (keeps case.json / probes.json small and readable).  Deterministic."""
    one = json.dumps(obj)
    if not isinstance(obj, (dict, list)) or len(one) + indent * _level <= width or not obj:
        return one
    pad = " " * (indent * (_level + 1))
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(k)}: {pretty_json(v, indent, width, _level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * (indent * _level) + "}"
    items = [pad + pretty_json(v, indent, width, _level + 1) for v in obj]
    return "[\n" + ",\n".join(items) + "\n" + " " * (indent * _level) + "]"


def write_json(obj, path: str) -> None:
    with open(path, "w") as f:
        f.write(pretty_json(obj))
        f.write("\n")


def save_file(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file as st_save

    st_save({k: v.detach().contiguous() for k, v in tensors.items()}, path,
            metadata={"format": "pt"} if metadata is None else metadata)

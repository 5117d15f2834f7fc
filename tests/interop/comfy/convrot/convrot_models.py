"""Shared helpers for the ComfyUI ConvRot int8 fixtures (`int8_tensorwise` with `"convrot": true`,
comfy-kitchen 0.2.40): the cases, the library calls, an exact re-statement of the inverse rotation and
ulp arithmetic.

Used by gen_convrot_fixtures.py (writes tests/fixtures/comfy-convrot) and check_convrot.py (checks
ckptkit's `--to plain` reading of a case's quantized.safetensors).

A ConvRot layer m is stored in ComfyUI's save form as

* `{m}.weight`        I8 [out, in]: the per-row int8 codes of the *rotated* weight W·H_nᵀ (per group of n
                       input columns, H_n the normalised regular Hadamard matrix, n a power of 4);
* `{m}.weight_scale`  F32 [out, 1]: one scale per row (of the rotated weight);
* `{m}.comfy_quant`   U8 1-D: the bytes of json.dumps({"format": "int8_tensorwise", "convrot": True,
                       "convrot_groupsize": n}) (ComfyUI's comfy/ops.py `_quantized_weight_state_dict`).

Library entry points (comfy-kitchen 0.2.40, CPU, eager backend):

* quantize:   QuantizedTensor.from_float(w, "TensorWiseINT8Layout", per_channel=True, convrot=True,
              convrot_groupsize=n) -> TensorWiseINT8Layout.quantize -> registry
              `quantize_int8_convrot_weight(w, n, stochastic_rounding=0)` (eager: _build_hadamard(n, dtype=D),
              _rotate_weight in D, then quantize_int8_rowwise);
* serialise:  QuantizedTensor.state_dict("{m}.weight") -> {m}.weight, {m}.weight_scale;
* dequantize: QuantizedTensor(q, "TensorWiseINT8Layout", TensorWiseINT8Layout.Params(scale=s, orig_dtype=D,
              orig_shape, convrot=True, convrot_groupsize=n)).dequantize()
              -> torch.ops.comfy_kitchen.dequantize_int8_convrot_weight_dtype(q, s, n, code(D))
              (eager: _rotate_weight(q.float() * s, _build_hadamard(n, f32), n).to(D): an f32 product, an f32
              matmul with the ±1/sqrt(n) matrix, one cast to D).
"""

from __future__ import annotations

import json
import math
import os
import sys
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
    file_header,
    load_case,
    load_tensors,
    same_tensor,
    save_file,
    sha256_file,
    write_json,
)

CK_VERSION = cm.CK_VERSION
TORCH_VERSION = cm.TORCH_VERSION
FORMAT = "int8_tensorwise"
LAYOUT = "TensorWiseINT8Layout"
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # comfy-kitchen's output_dtype_code

# name, model dtype, ConvRot group size
CASES = [
    ("convrot-bf16-g16", "bfloat16", 16),
    ("convrot-bf16-g256", "bfloat16", 256),
    ("convrot-f16-g64", "float16", 64),
    ("convrot-f32-g16", "float32", 16),
]
BAD_NAME = "bad-groupsize"
BAD_SOURCE = "convrot-bf16-g16"
BAD_GROUPSIZE = 32  # a power of 2, not of 4: comfy-kitchen has no regular Hadamard matrix of that size

# a ConvRot case's extra spec field: zero_row (an all-zero row; its per-row scale is the 1e-30 floor)
ZERO_ROW = ("lin_zero", 3)


def specs(n: int) -> List[dict]:
    """The modules of a case with group size n (every ConvRot layer's in_features is a multiple of n).

    lin_a    [16, 64] (n <= 64) or [16, 256] (n = 256), with bias
    lin_b    [8, 256] or [8, 512], with bias; comfy_models' "wide" recipe: columns in/2.. get random sign and
             magnitude 2^-U(3,30), two outliers [1,77] = +40x and [3,5] = -20x the largest other magnitude
    lin_zero [6, 2n], no bias; row 3 is all zero
    norm     [64] weight and bias: 1-D, never quantized
    lin_skip [4, 16] with bias: a Linear left plain (ComfyUI quantizes only the layers its config names)
    """
    big = n > 64
    return [
        cm.lin("lin_a", 256 if big else 64, 16),
        cm.lin("lin_b", 512 if big else 256, 8, wide=True),
        cm.lin(ZERO_ROW[0], 2 * n, 6, bias=False, zero_row=ZERO_ROW[1]),
        cm.norm("norm", 64),
        cm.lin("lin_skip", 16, 4, skip=True),
    ]


def case_list() -> List[dict]:
    return [dict(name=name, dtype=dtype, format=FORMAT, convrot=True, groupsize=n, specs=specs(n))
            for name, dtype, n in CASES]


def convrot_module_names(case: dict) -> List[str]:
    return [s["name"] for s in case["specs"] if s["quantized"]]


def marker_dict(n: int) -> dict:
    """What ComfyUI's comfy/ops.py `_quantized_weight_state_dict` puts in `{m}.comfy_quant` for a ConvRot
    int8 layer: {"format": ...} first, then "convrot": True and "convrot_groupsize" (the layout Params
    carry no `group_size` / `act_unsigned`, so nothing else is added)."""
    return {"format": FORMAT, "convrot": True, "convrot_groupsize": int(n)}


def marker_json(n: int) -> str:
    return json.dumps(marker_dict(n))


def marker_tensor(n: int) -> torch.Tensor:
    return torch.tensor(list(marker_json(n).encode("utf-8")), dtype=torch.uint8)


def float_state_dict(case: dict) -> Dict[str, torch.Tensor]:
    """comfy_models' recipe (randn * row_scale + row_offset in f32, then cast; one generator per case)."""
    return cm.float_state_dict(case)


# --------------------------------------------------------------------------------------
# comfy-kitchen
# --------------------------------------------------------------------------------------

eager_backend = cm.eager_backend


def backend_report() -> dict:
    from comfy_kitchen.registry import registry

    w = torch.zeros(2, 16)
    q = torch.zeros(2, 16, dtype=torch.int8)
    s = torch.ones(2, 1)
    out = {
        "quantize_int8_convrot_weight": registry.get_capable_backend(
            "quantize_int8_convrot_weight", {"weight": w, "group_size": 16, "stochastic_rounding": 0}),
        "dequantize_int8_convrot_weight_dtype": registry.get_capable_backend(
            "dequantize_int8_convrot_weight_dtype", {"q": q, "scale": s, "group_size": 16, "output_dtype_code": 0}),
    }
    out["available"] = sorted(k for k, v in registry.list_backends().items() if v["available"])
    return out


def library_quantize(w: torch.Tensor, n: int):
    """QuantizedTensor.from_float(w, "TensorWiseINT8Layout", per_channel=True, convrot=True, convrot_groupsize=n)
    (is_weight=True and stochastic_rounding=0 left at their defaults)."""
    from comfy_kitchen.tensor import QuantizedTensor

    with eager_backend():
        return QuantizedTensor.from_float(w, LAYOUT, per_channel=True, convrot=True, convrot_groupsize=n)


def library_quantize_op(w: torch.Tensor, n: int):
    """torch.ops.comfy_kitchen.quantize_int8_convrot_weight(w, n): (codes, scale)."""
    import comfy_kitchen  # noqa: F401  (registers the ops)

    with eager_backend():
        return torch.ops.comfy_kitchen.quantize_int8_convrot_weight(w, n)


def library_quantize_parts(w: torch.Tensor, n: int):
    """The eager composition spelled out: rotate_int8_convrot_weight(w, n), then quantize_int8_rowwise."""
    import comfy_kitchen as ck
    from comfy_kitchen.backends.eager.quantization import rotate_int8_convrot_weight

    with eager_backend():
        return ck.quantize_int8_rowwise(rotate_int8_convrot_weight(w, n))


def library_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, n: int) -> torch.Tensor:
    """What ComfyUI builds from a loaded ConvRot layer (comfy/ops.py `_load_quantized_module`): a
    QuantizedTensor with TensorWiseINT8Layout.Params(scale, orig_dtype = the compute dtype, orig_shape,
    convrot=True, convrot_groupsize=n), then .dequantize()."""
    from comfy_kitchen.tensor import QuantizedTensor, TensorWiseINT8Layout

    with eager_backend():
        params = TensorWiseINT8Layout.Params(scale=scale, orig_dtype=dtype, orig_shape=tuple(q.shape),
                                             convrot=True, convrot_groupsize=n)
        return QuantizedTensor(q, LAYOUT, params).dequantize()


def library_dequantize_op(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, n: int) -> torch.Tensor:
    """torch.ops.comfy_kitchen.dequantize_int8_convrot_weight_dtype(q, scale, n, code(dtype))."""
    import comfy_kitchen  # noqa: F401

    with eager_backend():
        return torch.ops.comfy_kitchen.dequantize_int8_convrot_weight_dtype(q, scale, n, DTYPE_CODE[dtype])


def library_dequantize_embedding(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, n: int) -> torch.Tensor:
    """torch.ops.comfy_kitchen.dequantize_int8_embedding(q, scale, arange(out), n, code(dtype)): the
    embedding-table path (gathers every row, then un-rotates)."""
    import comfy_kitchen  # noqa: F401

    with eager_backend():
        idx = torch.arange(q.shape[0], dtype=torch.int64)
        return torch.ops.comfy_kitchen.dequantize_int8_embedding(q, scale, idx, n, DTYPE_CODE[dtype])


def library_build_hadamard(n: int) -> torch.Tensor:
    from comfy_kitchen.tensor.int8_utils import _build_hadamard

    return _build_hadamard(n, device="cpu", dtype=torch.float32)


# --------------------------------------------------------------------------------------
# Exact re-statement (no comfy-kitchen call): integer Hadamard, exact sums, one rounding
# --------------------------------------------------------------------------------------

H4 = np.array([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=np.int64)


def hadamard_int(n: int) -> np.ndarray:
    """The unnormalised regular Hadamard matrix of order n = 4^k: H4 ⊗ H4 ⊗ ... (entries ±1)."""
    k = round(math.log(n, 4))
    if n < 4 or 4 ** k != n:
        raise ValueError(f"not a power of 4: {n}")
    h = H4
    for _ in range(k - 1):
        h = np.kron(h, H4)
    return h


# D: (significant bits p incl. the implicit one, exponent of the smallest subnormal, largest finite value)
FLOAT_FORMATS = {
    torch.bfloat16: (8, -133, float(torch.finfo(torch.bfloat16).max)),
    torch.float16: (11, -24, float(torch.finfo(torch.float16).max)),
    torch.float32: (24, -149, float(torch.finfo(torch.float32).max)),
}


def quantum_exponent(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """e such that 2^e is the spacing of D's values at |x| (D's ulp at x; at 0 the smallest subnormal)."""
    p, qmin, _ = FLOAT_FORMATS[dtype]
    x = np.asarray(x, dtype=np.float64)
    _, ex = np.frexp(x)  # x = m * 2^ex, 0.5 <= |m| < 1
    return np.where(x == 0, qmin, np.maximum(ex.astype(np.int64) - p, qmin))


def rne_from_f64(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Round f64 values (taken as exact) to D once, to nearest, ties to even; overflow to ±inf."""
    x = np.asarray(x, dtype=np.float64)
    _, _, mx = FLOAT_FORMATS[dtype]
    e = quantum_exponent(x, dtype)
    r = np.ldexp(np.rint(np.ldexp(x, -e)), e)  # both scalings by powers of 2 are exact in f64
    r = np.where(np.abs(r) > mx, np.copysign(np.inf, x), r)
    # r is a D value, hence an f32 value: the f32 -> D cast below is exact
    return torch.from_numpy(np.ascontiguousarray(r.astype(np.float32))).to(dtype)


def exact_dequantize(q: torch.Tensor, scale: torch.Tensor, n: int) -> np.ndarray:
    """The exact inverse rotation in f64: for row r, group g, column j:
    s_r / sqrt(n) * sum_i q[r, g*n+i] * H_n[j][i]  (an exact integer sum; sqrt(n) = 2^k; |sum| < 2^18 and
    s_r has 24 significant bits, so the product is exact in f64)."""
    qi = q.to(torch.int64).numpy()
    out_f, in_f = qi.shape
    if in_f % n:
        raise ValueError(f"in_features {in_f} is not a multiple of {n}")
    h = hadamard_int(n)
    sums = np.einsum("rgi,ji->rgj", qi.reshape(out_f, in_f // n, n), h).reshape(out_f, in_f)
    s = scale.to(torch.float32).numpy().astype(np.float64).reshape(out_f, 1)
    return sums.astype(np.float64) * s * (1.0 / math.sqrt(n))


def order_bound(q: torch.Tensor, scale: torch.Tensor, n: int, dtype: torch.dtype) -> np.ndarray:
    """Per element, how far apart two f32 summation orders of the same terms can end up after the cast to D:
    2·n·2^-24·A + ulp_D, where A = sum_i |rne_f32(q_i·s)| / sqrt(n) over the element's group (the sum of the
    terms' magnitudes, the same for every column j of a group since |H_n[j][i]| = 1/sqrt(n)).  Each order's f32
    result is within (n-1)·u·A of the exact sum (u = 2^-24, Higham's bound for recursive summation, any order),
    so two orders are within 2(n-1)·u·A (n for n-1 absorbs the second-order term), and the two casts to D add at
    most half an ulp each.  Returns f(x): the bound for elements whose larger magnitude (of the two values
    compared) is x, ulp_D taken at x."""
    qi = q.to(torch.int64).numpy()
    out_f, in_f = qi.shape
    if in_f % n:
        raise ValueError(f"in_features {in_f} is not a multiple of {n}")
    s = scale.to(torch.float32).numpy().astype(np.float32).reshape(out_f, 1)
    t = np.abs((qi.astype(np.float32) * s).astype(np.float32)).astype(np.float64)  # |rne_f32(q * s)|
    a = t.reshape(out_f, in_f // n, n).sum(axis=2) / math.sqrt(n)  # exact enough: f64 sum of <= 4096 f32 values
    a = np.repeat(a, n, axis=1).reshape(out_f, in_f)
    sum_part = 2.0 * n * 2.0 ** -24 * a

    def bound(x: np.ndarray) -> np.ndarray:
        return sum_part + np.ldexp(1.0, quantum_exponent(np.abs(x), dtype))

    return bound


# comfy-kitchen's eager dequantization is `(q.float() * s) @ H.T` per group in f32 and then one cast to D.
# Each product q·s is rounded to f32; multiplying it by ±1/sqrt(n) = ±2^-k is exact, so only the order
# of the f32 additions matters, and that is whatever torch's CPU f32 matmul kernel does for the shape.
# On the machine that made the fixtures (torch 2.15.0 CPU, x86-64 AVX512, one thread), for n = 16, 64
# and 256 it adds the n terms of an output element in ascending i, sequentially from 0, in blocks of
# LIBRARY_K_BLOCK = 128 terms, and then adds the block sums in order; for n = 4 it uses two interleaved
# accumulators (t0 + t2) + (t1 + t3); for n = 1024 no such simple order was found (probes.json).
# library_order_dequantize restates that; the generator checks it reproduces every fixture layer bit for
# bit.  It describes this BLAS kernel, not a documented property of the library: on another AVX512 CPU
# (Intel family 6 model 167, same torch wheel) the kernel adds all 256 terms of n = 256 sequentially (no
# block of 128), which differs from the fixtures' order in a few BF16 elements per layer; the live suite
# therefore only reports the order (gen_convrot_fixtures.py --order-check report) and its checker accepts
# a difference within order_bound.
LIBRARY_K_BLOCK = 128


def library_order_dequantize(q: torch.Tensor, scale: torch.Tensor, n: int, dtype: torch.dtype,
                             k_block: int = LIBRARY_K_BLOCK, lanes: int = 1) -> torch.Tensor:
    """rne_D of: per block of k_block terms (i ascending), `lanes` interleaved f32 accumulators (term i goes
    to accumulator i % lanes, each summed sequentially from 0, then combined pairwise), the block sums added in
    order; the terms are rne_f32(q[r,g*n+i] * s_r) * H_n[j][i] / sqrt(n) (exact products).  numpy's f32
    arithmetic is correctly rounded."""
    qi = q.to(torch.int64).numpy()
    out_f, in_f = qi.shape
    if in_f % n:
        raise ValueError(f"in_features {in_f} is not a multiple of {n}")
    s = scale.to(torch.float32).numpy().astype(np.float32).reshape(out_f, 1)
    t = (qi.astype(np.float32) * s).astype(np.float32).reshape(out_f, in_f // n, n)  # rne_f32(q * s)
    hs = (hadamard_int(n).astype(np.float32) * np.float32(1.0 / math.sqrt(n))).astype(np.float32)  # ±2^-k
    total = None
    for b0 in range(0, n, k_block):
        accs = [np.zeros((out_f, in_f // n, n), dtype=np.float32) for _ in range(lanes)]
        for i in range(b0, min(n, b0 + k_block)):
            li = (i - b0) % lanes
            accs[li] = (accs[li] + t[:, :, i, None] * hs[None, None, :, i]).astype(np.float32)  # product exact
        while len(accs) > 1:
            accs = [(accs[2 * k] + accs[2 * k + 1]).astype(np.float32) for k in range(len(accs) // 2)]
        total = accs[0] if total is None else (total + accs[0]).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(total.reshape(out_f, in_f))).to(dtype)


def ordered_bits(t: torch.Tensor) -> np.ndarray:
    """Map D values to integers whose difference counts the D values between them (±0 -> 0)."""
    if t.dtype == torch.float32:
        b = t.contiguous().view(torch.int32).numpy().astype(np.int64)
        mag = b & 0x7FFFFFFF
    elif t.dtype in (torch.bfloat16, torch.float16):
        b = t.contiguous().view(torch.int16).numpy().astype(np.int64)
        mag = b & 0x7FFF
    else:
        raise TypeError(f"not a float dtype ckptkit writes: {t.dtype}")
    return np.where(b < 0, -mag, mag)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """|ordinal(a) - ordinal(b)| element by element (same dtype and shape; finite values)."""
    return np.abs(ordered_bits(a) - ordered_bits(b))


def bitwise_differs(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    w = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return a.contiguous().view(w).numpy() != b.contiguous().view(w).numpy()


ULP_BUCKETS = (("0", 0, 0), ("1", 1, 1), ("2-15", 2, 15), ("16+", 16, None))


def exactness(q: torch.Tensor, scale: torch.Tensor, n: int, lib: torch.Tensor, lib_f32: torch.Tensor) -> dict:
    """How the library's dequantization `lib` (dtype D) compares with the exact inverse rotation, rounded once
    to D (`rne_D(exact)`: ulp distance = how many D values apart) and unrounded (error in D's ulp at the exact
    value, for exact values that are not 0).  Elements whose exact value is 0 (the integer sum cancels) are
    counted apart: there D's ulp is the smallest subnormal, and the library's f32 sum leaves a residue.
    `lib_f32` is the library's dequantization of the same codes with orig_dtype f32 (its f32 stage, before the
    cast to D): its error, relative to the row's scale, is the error of the f32 products and sums alone."""
    D = lib.dtype
    ex = exact_dequantize(q, scale, n)
    rounded = rne_from_f64(ex, D)
    dist = ulp_distance(lib, rounded)
    differ = bitwise_differs(lib, rounded)
    libf = lib.to(torch.float64).numpy()
    zero = ex == 0
    nz = ~zero
    err = np.abs(libf - ex)
    err_ulps = err / np.ldexp(1.0, quantum_exponent(ex, D))
    s = scale.to(torch.float64).numpy().reshape(-1, 1)
    worst = np.unravel_index(int(np.argmax(dist)), dist.shape)
    buckets = {}
    for label, lo, hi in ULP_BUCKETS:
        sel = (dist >= lo) if hi is None else ((dist >= lo) & (dist <= hi))
        buckets[label] = int(sel.sum())
    return {
        "elements": int(lib.numel()),
        "differ_from_rounded_exact": int(differ.sum()),
        "differ_only_in_zero_sign": int((differ & (dist == 0)).sum()),
        "max_ulp_vs_rounded_exact": int(dist.max()),
        "ulp_vs_rounded_exact_counts": buckets,
        "exact_nonzero": {
            "elements": int(nz.sum()),
            "max_ulp_vs_rounded_exact": int(dist[nz].max()) if nz.any() else 0,
            "max_abs_error_in_ulps_vs_exact": round(float(err_ulps[nz].max()), 6) if nz.any() else 0.0,
        },
        "exact_zero": {
            "elements": int(zero.sum()),
            "library_nonzero": int((zero & (libf != 0)).sum()),
            "max_abs_library": repr(float(np.abs(libf[zero]).max())) if zero.any() else "0.0",
        },
        "library_f32_stage_max_abs_error_over_row_scale":
            repr(float((np.abs(lib_f32.to(torch.float64).numpy() - ex) / s).max())),
        "worst": {"index": [int(i) for i in worst], "library": repr(float(libf[worst])),
                  "rounded_exact": repr(float(rounded.to(torch.float64).numpy()[worst])),
                  "exact": repr(float(ex[worst])), "row_scale": repr(float(s[worst[0], 0]))},
    }


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def dtype_name(t) -> str:
    return str(t.dtype if isinstance(t, torch.Tensor) else t).replace("torch.", "")


def f32_bits(x: float) -> str:
    return cm.f32_bits(x)


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def setup_torch() -> None:
    """Deterministic single-threaded CPU torch (the fixtures' conditions)."""
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

"""Shared helpers for the block FP8 (DeepSeek-V3 style, transformers `FineGrainedFP8Config`) interop fixtures
(transformers 5.24.0, `transformers/integrations/finegrained_fp8.py`).

Used by gen_fp8block_fixtures.py (writes the golden fixtures), check_fp8block.py (checks ckptkit's files
against a case), selftest_check_fp8block.py and check_loader.py.

The layout, per quantized Linear `{m}`:

* `{m}.weight`            F8_E4M3 (torch.float8_e4m3fn) codes `[N, K]`;
* `{m}.weight_scale_inv`  `[ceil(N/128), ceil(K/128)]`, F32, or F8_E8M0 (torch.float8_e8m0fnu) with
                          `scale_fmt="ue8m0"`;
* `{m}.bias`              unchanged, in the model dtype D.

Library entry points:

* quantize:   `Fp8Quantize(hf_quantizer)._quantize_one("{m}.weight", w)` with a real
              `FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=[128, 128], scale_fmt=...))`.
              It passes through (returns unchanged) a weight whose shape is not a multiple of the block;
* dequantize: `Fp8Dequantize(hf_quantizer)._dequantize_one(q, s, output_dtype=D)` =
              `(f32(q) * f32(s)).to(D)`, block size derived as `rows // scale_rows`, `cols // scale_cols`.

Ragged weights (N or K not a multiple of 128; no library quantizes them), the rule of spec/layouts.md §6,
DeepSeek's "zero-padded to 128 before calculating the scale, padded portion removed":

* quantize:   zero-pad w to multiples of 128, `_quantize_one` the padded tensor, crop the codes to `[N, K]`;
              the scale grid is the ceil grid;
* dequantize: DeepSeek's `weight_dequant`: `y[i, j] = (f32(q[i, j]) * f32(s[i // 128, j // 128])).to(D)`
              (`deepseek_dequantize`), which must equal `_dequantize_one` of the codes zero-padded to the
              full grid, cropped (`library_dequantize_padded`).  `_dequantize_one` on the unpadded ragged codes
              would derive the wrong block size (e.g. 136 // 2 = 68 for 136 rows), so it is never called on them.
"""

from __future__ import annotations

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

TRANSFORMERS_VERSION = "5.24.0"
TORCH_VERSION = "2.15.0"
SAFETENSORS_VERSION = "0.8.0"
BLOCK = 128
FP8 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu
FP8_MAX = 448.0

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
ST_DTYPE = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e8m0fnu: "F8_E8M0", torch.float32: "F32",
            torch.bfloat16: "BF16", torch.float16: "F16", torch.uint8: "U8"}
SCALE_FMTS = ("float", "ue8m0")
SCALE_DTYPE = {"float": torch.float32, "ue8m0": E8M0}
TARGETS = {"float": "fp8:block", "ue8m0": "fp8:block:ue8m0"}
EXCLUDE = ["lin_skip"]
FIXTURE_MODEL_TYPE = "ckptkit_fp8block_fixture"

# (case name, D, scale_fmt)
CASES = [
    ("fp8block-bf16-f32scale", "bfloat16", "float"),
    ("fp8block-f16-f32scale", "float16", "float"),
    ("fp8block-f32-f32scale", "float32", "float"),
    ("fp8block-bf16-ue8m0", "bfloat16", "ue8m0"),
]


def lin(name, out_f, in_f, bias=True, quantized=True, **kw):
    return {"name": name, "kind": "Linear", "shape": [out_f, in_f], "bias": bias, "quantized": quantized, **kw}


# The modules, in generation order.  `scale`: the normal draws' standard deviation; `block_factors`: a factor
# per scale block (row-major over the ceil grid), so that every block has its own amax and a wrong block
# assignment shows; `zero_rows`: rows set to +0 (a whole zero block); `binades`: magnitudes 2^U(lo, hi).
SPECS = [
    lin("lin_a", 136, 128, scale=0.05, zero_rows=[128, 136],
        note="block (0,0) ordinary; block (1,0) = rows 128..135 all +0 (inverse scale 1.0)"),
    lin("lin_ragged", 130, 136, scale=0.02, block_factors=[1.0, 4.0, 0.25, 16.0],
        note="ragged in both dims: grid 2x2, edge blocks 2 rows / 8 columns"),
    lin("lin_small", 5, 37, scale=1.0, note="one partial block"),
    lin("lin_zero", 16, 16, scale=0.0, note="the whole weight +0: inverse scale 1.0, all codes 0x00"),
    lin("lin_nobias", 128, 128, bias=False, scale=1.0, binades=[-20.0, 4.0],
        note="aligned; normal * 2^U(-20, 4): e4m3 subnormals, underflow and codes next to 448; exact +amax and -amax"),
    {"name": "norm", "kind": "Norm", "shape": [64], "bias": False, "quantized": False,
     "note": "1-D: never quantized"},
    lin("lin_skip", 8, 16, quantized=False, scale=0.1,
        note="a Linear left in D (modules_to_not_convert; ckptkit --exclude lin_skip)"),
]
# lin_nobias: where the exact +amax / -amax elements go (row, col)
AMAX_POS = (17, 93)
AMAX_NEG = (101, 6)


def case_list() -> List[dict]:
    return [{"name": n, "dtype": d, "scale_fmt": f, "ckptkit_target": TARGETS[f], "exclude": list(EXCLUDE),
             "specs": SPECS} for n, d, f in CASES]


def grid(shape) -> List[int]:
    return [-(-shape[0] // BLOCK), -(-shape[1] // BLOCK)]


def is_aligned(shape) -> bool:
    return shape[0] % BLOCK == 0 and shape[1] % BLOCK == 0


def quantized_specs(case: dict) -> List[dict]:
    return [s for s in case["specs"] if s["kind"] == "Linear" and s["quantized"]]


def quantized_module_names(case: dict) -> List[str]:
    return [s["name"] for s in quantized_specs(case)]


def spec_of(case: dict, name: str) -> dict:
    return next(s for s in case["specs"] if s["name"] == name)


# --------------------------------------------------------------------------------------
# Float weights
# --------------------------------------------------------------------------------------


def float_state_dict(case: dict, seed: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The case's float model (every tensor in D).  One torch.Generator seeded with the case seed,
    specs in order; draws in f32, then one cast to D."""
    D = DTYPES[case["dtype"]]
    g = torch.Generator().manual_seed(case["seed"] if seed is None else seed)
    sd: Dict[str, torch.Tensor] = {}
    for s in case["specs"]:
        n, shape = s["name"], s["shape"]
        if s["kind"] == "Norm":
            sd[f"{n}.weight"] = (1.0 + 0.1 * torch.randn(shape, generator=g)).to(D)
            continue
        val = torch.randn(shape, generator=g, dtype=torch.float32) * s["scale"]
        if s.get("binades"):
            lo, hi = s["binades"]
            val = val * torch.exp2(lo + (hi - lo) * torch.rand(shape, generator=g))
        if s.get("block_factors"):
            gr = grid(shape)
            f = torch.tensor(s["block_factors"], dtype=torch.float32).reshape(gr)
            f = f.repeat_interleave(BLOCK, 0)[: shape[0]].repeat_interleave(BLOCK, 1)[:, : shape[1]]
            val = val * f
        if s.get("zero_rows"):
            r0, r1 = s["zero_rows"]
            val[r0:r1] = 0.0
        w = val.to(D)
        if s.get("binades"):
            # an exact +amax and an exact -amax (the same magnitude, the largest in D)
            a = w.float().abs().max().item()
            w[AMAX_POS] = a
            w[AMAX_NEG] = -a
        sd[f"{n}.weight"] = w
        if s["bias"]:
            sd[f"{n}.bias"] = (0.1 * torch.randn(shape[0], generator=g)).to(D)
    return sd


# --------------------------------------------------------------------------------------
# transformers (the library's own code paths)
# --------------------------------------------------------------------------------------


def fp8_config(scale_fmt: str, modules_to_not_convert=None):
    from transformers import FineGrainedFP8Config

    return FineGrainedFP8Config(weight_block_size=[BLOCK, BLOCK], modules_to_not_convert=modules_to_not_convert,
                                scale_fmt=scale_fmt)


def hf_quantizer(scale_fmt: str, modules_to_not_convert=None):
    """transformers' own FineGrainedFP8HfQuantizer (pre_quantized=True: nothing is validated or loaded)."""
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    return FineGrainedFP8HfQuantizer(fp8_config(scale_fmt, modules_to_not_convert))


def library_quantize(w: torch.Tensor, scale_fmt: str, key: str = "x.weight"):
    """`Fp8Quantize._quantize_one` on an aligned weight -> (codes, weight_scale_inv)."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    out = Fp8Quantize(hf_quantizer(scale_fmt))._quantize_one(key, w)
    skey = key[: -len(".weight")] + ".weight_scale_inv"
    if set(out) != {key, skey}:
        raise RuntimeError(f"_quantize_one({key}, {tuple(w.shape)}) returned keys {sorted(out)} (passed through?)")
    return out[key], out[skey]


def pad_to_block(t: torch.Tensor) -> torch.Tensor:
    """Zero-pad a 2-D tensor to multiples of 128 (one-byte dtypes, fp8 codes included, with 0x00 = +0)."""
    n, k = t.shape
    gn, gk = grid(t.shape)
    if t.element_size() == 1:
        out = torch.zeros(gn * BLOCK, gk * BLOCK, dtype=torch.uint8)
        out[:n, :k] = t.contiguous().view(torch.uint8)
        return out.view(t.dtype)
    out = torch.zeros(gn * BLOCK, gk * BLOCK, dtype=t.dtype)
    out[:n, :k] = t
    return out


def library_quantize_padded(w: torch.Tensor, scale_fmt: str, key: str = "x.weight"):
    """The ragged rule: zero-pad to multiples of 128, `_quantize_one`, crop the codes back to [N, K].
    Returns (codes, weight_scale_inv, padded codes) (the padded codes' pad region must be 0x00)."""
    n, k = w.shape
    qp, s = library_quantize(pad_to_block(w), scale_fmt, key)
    return qp[:n, :k].contiguous(), s, qp


def library_quantize_any(w: torch.Tensor, scale_fmt: str, key: str = "x.weight"):
    """Aligned: `_quantize_one` directly; ragged: the zero-pad rule.  -> (codes, weight_scale_inv)."""
    if is_aligned(w.shape):
        return library_quantize(w, scale_fmt, key)
    q, s, _ = library_quantize_padded(w, scale_fmt, key)
    return q, s


def library_dequantize(q: torch.Tensor, s: torch.Tensor, D: torch.dtype, scale_fmt: str = "float") -> torch.Tensor:
    """`Fp8Dequantize._dequantize_one(q, s, output_dtype=D)` (aligned weights only)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(hf_quantizer(scale_fmt))._dequantize_one(q, s, output_dtype=D)


def library_dequantize_padded(q: torch.Tensor, s: torch.Tensor, D: torch.dtype, scale_fmt: str = "float") -> torch.Tensor:
    """`_dequantize_one` of the codes zero-padded to the scale grid (block 128 then derives correctly), cropped."""
    n, k = q.shape
    return library_dequantize(pad_to_block(q), s, D, scale_fmt)[:n, :k].contiguous()


def library_dequantize_any(q: torch.Tensor, s: torch.Tensor, D: torch.dtype, scale_fmt: str = "float") -> torch.Tensor:
    if is_aligned(q.shape):
        return library_dequantize(q, s, D, scale_fmt)
    return library_dequantize_padded(q, s, D, scale_fmt)


def deepseek_dequantize(q: torch.Tensor, s: torch.Tensor, D: torch.dtype) -> torch.Tensor:
    """DeepSeek-V3's `weight_dequant` (inference/kernel.py), restated element by element:
    y[i, j] = (f32(q[i, j]) * f32(s[i // 128, j // 128])).to(D)  (one f32 product, one rounding to D)."""
    n, k = q.shape
    sf = s.to(torch.float32)
    full = sf.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    return (q.to(torch.float32) * full).to(D)


def case_state_dicts(case: dict, float_sd: dict):
    """(model_sd, dequantized_sd) as the library gives them for the case's float model."""
    D = DTYPES[case["dtype"]]
    fmt = case["scale_fmt"]
    model_sd, deq_sd = {}, {}
    qnames = set(quantized_module_names(case))
    for k, v in float_sd.items():
        m = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and m in qnames:
            q, s = library_quantize_any(v, fmt, k)
            model_sd[k] = q
            model_sd[f"{m}.weight_scale_inv"] = s
            deq_sd[k] = library_dequantize_any(q, s, D, fmt)
        else:
            model_sd[k] = v
            deq_sd[k] = v
    return model_sd, deq_sd


# --------------------------------------------------------------------------------------
# config.json, as transformers writes it
# --------------------------------------------------------------------------------------


def transformers_config_json(dtype: str, scale_fmt: str, modules_to_not_convert) -> str:
    """config.json text from transformers' own `PretrainedConfig.save_pretrained` for a config whose
    `quantization_config` is `FineGrainedFP8Config(weight_block_size=[128, 128], modules_to_not_convert=...,
    scale_fmt=...)` and whose `dtype` is D (what `PreTrainedModel.save_pretrained` sets), with model_type
    `ckptkit_fp8block_fixture` (a PretrainedConfig subclass: the fixture model is no transformers architecture)."""
    import tempfile

    from transformers import PretrainedConfig

    class FixtureConfig(PretrainedConfig):
        model_type = FIXTURE_MODEL_TYPE

    c = FixtureConfig()
    c.dtype = DTYPES[dtype]
    c.quantization_config = fp8_config(scale_fmt, modules_to_not_convert)
    with tempfile.TemporaryDirectory() as d:
        c.save_pretrained(d)
        with open(os.path.join(d, "config.json")) as f:
            return f.read()


# --------------------------------------------------------------------------------------
# comparison with readable messages
# --------------------------------------------------------------------------------------


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def element_text(t: torch.Tensor, idx) -> str:
    x = t[idx]
    b = x.reshape(1).contiguous().view(torch.uint8).tolist()
    hexs = "0x" + "".join("%02x" % v for v in reversed(b))
    if t.dtype in (torch.uint8, torch.int8) or not t.is_floating_point():
        return f"{x.item()} ({hexs})"
    return f"{x.to(torch.float32).item()!r} ({hexs})"


def describe_diff(ours: torch.Tensor, ref: torch.Tensor, ours_name: str = "ours",
                  ref_name: str = "library") -> Optional[str]:
    """None if dtype, shape and bytes are identical; otherwise a message with the first differing index."""
    if ours.dtype != ref.dtype:
        return f"dtype {dtype_name(ours)} != {ref_name}'s {dtype_name(ref)}"
    if tuple(ours.shape) != tuple(ref.shape):
        return f"shape {list(ours.shape)} != {ref_name}'s {list(ref.shape)}"
    if tensor_bytes(ours) == tensor_bytes(ref):
        return None
    a = ours.detach().contiguous()
    b = ref.detach().contiguous()
    ua = a.reshape(-1).view(torch.uint8).reshape(a.numel(), -1)
    ub = b.reshape(-1).view(torch.uint8).reshape(b.numel(), -1)
    diff = (ua != ub).any(dim=1).nonzero().reshape(-1)
    first = int(diff[0])
    idx = tuple(int(v) for v in np.unravel_index(first, tuple(a.shape))) if a.dim() else ()
    return (f"{diff.numel()} of {a.numel()} elements differ; first at {list(idx)}: "
            f"{ours_name} {element_text(a, idx)} != {ref_name} {element_text(b, idx)}")


# --------------------------------------------------------------------------------------
# code / scale statistics
# --------------------------------------------------------------------------------------


def code_stats(q: torch.Tensor) -> dict:
    b = q.contiguous().view(torch.uint8).numpy().reshape(-1)
    mag = b & 0x7F
    return {
        "elements": int(b.size),
        "zero": int((mag == 0).sum()),
        "negative_zero": int((b == 0x80).sum()),
        "subnormal": int(((mag >> 3) == 0).sum() - (mag == 0).sum()),
        "max_magnitude_448": int((mag == 0x7E).sum()),
        "next_to_max_416": int((mag == 0x7D).sum()),
        "nan": int((mag == 0x7F).sum()),
        "negative": int(((b & 0x80) != 0).sum() - (b == 0x80).sum()),
    }


def f32_bits(x: float) -> str:
    return "0x%08x" % int(np.array([x], dtype=np.float32).view(np.uint32)[0])


def scale_record(s: torch.Tensor) -> dict:
    sf = s.to(torch.float32).reshape(-1)
    rec = {"dtype": ST_DTYPE[s.dtype], "shape": list(s.shape), "values": [repr(v) for v in sf.tolist()]}
    if s.dtype == torch.float32:
        rec["f32_bits"] = [f32_bits(v) for v in sf.tolist()]
    else:
        rec["bytes"] = s.contiguous().view(torch.uint8).reshape(-1).tolist()
    return rec


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------


def file_header(path: str) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def pretty_json(obj, indent: int = 2, width: int = 120, _level: int = 0) -> str:
    """json.dumps with indentation; a list/object whose one-line form fits in `width` stays on one line."""
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



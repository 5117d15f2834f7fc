"""Shared model building for the optimum-quanto interop fixtures.

Used by gen_quanto_fixtures.py (writes the golden fixtures) and
check_against_quanto.py (checks ckptkit's output against real optimum-quanto).

A *case* is a JSON-serialisable dict (stored as case.json next to the fixture
files).  Everything needed to rebuild the float model, quantize it exactly as the
generator did, and feed it deterministic inputs comes from that dict plus the
float weights in float.safetensors.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from interop_common import (  # noqa: F401  (re-exported)
    case_seed,
    load_case,
    load_tensors,
    same_tensor,
    sha256_file,
    tensor_bytes,
)

DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}

# Short names used in directory names.
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}

WEIGHT_QTYPES = [
    "qint8",
    "qint4",
    "qint2",
    "qfloat8_e4m3fn",
    "qfloat8_e5m2",
    "qfloat8_e4m3fnuz",
]


# --------------------------------------------------------------------------------------
# Module specs
# --------------------------------------------------------------------------------------
#
# Each spec: name, kind and constructor args, plus fixture-only knobs:
#   zero_row:   index of an output row forced to all zeros
#   exclude:    module is passed to quantize(..., exclude=[...])
#   input_from: the module consumes the output of another module instead of a fresh input


def lin(name, i, o, bias=True, **kw):
    return dict(name=name, kind="Linear", in_features=i, out_features=o, bias=bias, **kw)


def conv(name, c, o, k, bias=True, **kw):
    return dict(name=name, kind="Conv2d", in_channels=c, out_channels=o, kernel_size=k, bias=bias, **kw)


def layernorm(name, n, **kw):
    return dict(name=name, kind="LayerNorm", normalized_shape=n, bias=True, **kw)


# The full module set (every feature); used for bf16 and for qint4/qint2 in every dtype.
FULL_MODULES = [
    lin("lin_g128", 256, 16),  # I=256 -> G=128 (TinyGemm on CPU for bf16 qint4: O % 16 == 0)
    lin("lin_g96", 576, 4),  # I=576 -> G=96
    lin("lin_g64", 320, 4),  # I=320 -> G=64
    # I=202 > 128 but not a multiple of 32 -> no groups.  (I=200 is avoided on purpose: with torch 2.15
    # the bf16 qint8 CPU forward uses torch._weight_int8pack_mm, which segfaults when I % 16 != 0.)
    lin("lin_i202", 202, 4),
    lin("lin_i128", 128, 4),  # I=128 -> no groups (strict >)
    lin("lin_oddgroups", 384, 5),  # G=128, ng=15 (odd) -> padding row when packed
    lin("lin_o1", 64, 1),  # O == 1 (per-tensor / per-column edge case)
    lin("lin_zero_row", 160, 4, zero_row=2),  # G=32, one all-zero row
    lin("lin_nobias", 96, 4, bias=False),
    conv("conv_k3_i27", 3, 4, 3),  # I=27 -> no groups
    conv("conv_k3_i288", 32, 4, 3),  # I=288 -> G=96
    layernorm("ln", 32),
    lin("lin_after_ln", 32, 8, input_from="ln"),
    lin("lin_excluded", 32, 4, exclude=True),
]

# Reduced set for f16/f32 8-bit cases (size budget): one module per distinct 8-bit code path.
REDUCED_MODULES = [
    lin("lin_g128", 256, 16),
    lin("lin_o1", 64, 1),
    lin("lin_zero_row", 160, 4, zero_row=2),
    lin("lin_nobias", 96, 4, bias=False),
    conv("conv_k3_i27", 3, 4, 3),
    layernorm("ln", 32),
    lin("lin_after_ln", 32, 8, input_from="ln"),
    lin("lin_excluded", 32, 4, exclude=True),
]

# Activation cases: LayerNorm -> Linear chain (quantized activations flow between them),
# plus independent Linear / Conv2d modules.
ACT_MODULES = [
    layernorm("ln", 32),
    lin("lin_after_ln", 32, 16, input_from="ln"),
    lin("lin_g128", 256, 16),
    lin("lin_o1", 64, 1),
    lin("lin_nobias", 96, 4, bias=False),
    conv("conv_k3_i27", 3, 4, 3),
    lin("lin_excluded", 32, 4, exclude=True),
]


def case_name(dtype: str, wq: str, aq: Optional[str]) -> str:
    n = f"{DTYPE_SHORT[dtype]}-{wq}"
    if aq is not None:
        n += f"-act_{aq}"
    return n


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def make_module(spec: dict, dtype: torch.dtype, device=None) -> nn.Module:
    kind = spec["kind"]
    if kind == "Linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"], dtype=dtype, device=device)
    if kind == "Conv2d":
        return nn.Conv2d(
            spec["in_channels"],
            spec["out_channels"],
            spec["kernel_size"],
            bias=spec["bias"],
            dtype=dtype,
            device=device,
        )
    if kind == "LayerNorm":
        return nn.LayerNorm(spec["normalized_shape"], dtype=dtype, device=device)
    raise ValueError(f"unknown module kind {kind!r}")


class FixtureModel(nn.Module):
    """Independent named submodules; forward maps {name: input} -> {name: output}.

    A module with `input_from` consumes the output of the named module instead.
    """

    def __init__(self, specs: List[dict], dtype: torch.dtype, device=None):
        super().__init__()
        self.specs = [dict(s) for s in specs]
        for s in specs:
            self.add_module(s["name"], make_module(s, dtype, device))

    def forward(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        outputs = {}
        for s in self.specs:
            name = s["name"]
            src = s.get("input_from")
            x = outputs[src] if src else inputs[name]
            outputs[name] = getattr(self, name)(x)
        return outputs


def build_model(case: dict, device=None) -> FixtureModel:
    return FixtureModel(case["specs"], DTYPES[case["dtype"]], device=device)


def init_float_weights(model: FixtureModel, seed: int) -> None:
    """Random normal weights with per-row offsets and scales (non-trivial min/max shifts)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in model.specs:
            m = getattr(model, s["name"])
            w = m.weight
            if s["kind"] == "LayerNorm":
                m.weight.copy_((1.0 + 0.1 * torch.randn(w.shape, generator=g)).to(w.dtype))
                m.bias.copy_((0.1 * torch.randn(m.bias.shape, generator=g)).to(w.dtype))
                continue
            o = w.shape[0]
            base = torch.randn(w.shape, generator=g, dtype=torch.float32)
            view = [o] + [1] * (w.dim() - 1)
            row_scale = (0.02 + 0.1 * torch.rand(o, generator=g)).reshape(view)
            row_offset = (torch.linspace(-0.3, 0.3, o) + 0.05 * torch.randn(o, generator=g)).reshape(view)
            val = base * row_scale + row_offset
            if s.get("zero_row") is not None:
                val[s["zero_row"]] = 0.0
            w.copy_(val.to(w.dtype))
            if m.bias is not None:
                m.bias.copy_((0.1 * torch.randn(m.bias.shape, generator=g)).to(w.dtype))


def make_inputs(case: dict, seed: int, batch: int = 2) -> Dict[str, torch.Tensor]:
    """Deterministic inputs for every module that does not consume another module's output."""
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case["dtype"]]
    out = {}
    for s in case["specs"]:
        if s.get("input_from"):
            continue
        if s["kind"] == "Linear":
            shape = (batch, s["in_features"])
        elif s["kind"] == "Conv2d":
            shape = (batch, s["in_channels"], 6, 6)
        else:
            shape = (batch, s["normalized_shape"])
        out[s["name"]] = (torch.randn(shape, generator=g) * 1.5).to(dtype)
    return out


def calibration_seed(case: dict) -> int:
    return case["seed"] + 1


def forward_seed(case: dict) -> int:
    return case["seed"] + 2


def exclude_list(case: dict) -> List[str]:
    return [s["name"] for s in case["specs"] if s.get("exclude")]


def quantize_and_freeze(model: FixtureModel, case: dict) -> FixtureModel:
    """quantize(..., exclude=...) -> optional Calibration -> freeze, exactly as the generator does."""
    from optimum.quanto import Calibration, freeze, qtypes, quantize

    wq = qtypes[case["weights"]]
    aq = qtypes[case["activations"]] if case.get("activations") else None
    quantize(model, weights=wq, activations=aq, exclude=exclude_list(case) or None)
    if aq is not None:
        # streamline=False: with the default streamline=True, Calibration disables output
        # quantization (a hook, not state) on modules whose outputs only reach our dict, so a
        # model re-loaded with requantize() would quantize outputs that the frozen one did not.
        with torch.no_grad(), Calibration(streamline=False):
            for k in range(case.get("calibration_steps", 2)):
                model(make_inputs(case, calibration_seed(case) + 1000 * k, batch=4))
    freeze(model)
    return model


def build_quantized_from_float(case: dict, float_sd: Dict[str, torch.Tensor]) -> FixtureModel:
    model = build_model(case)
    model.load_state_dict(float_sd, strict=True)
    return quantize_and_freeze(model, case)


def requantize_into_meta_model(case: dict, state_dict, qmap) -> FixtureModel:
    """Fresh model on the meta device, then optimum-quanto's requantize()."""
    from optimum.quanto import requantize

    with torch.device("meta"):
        model = build_model(case)
    requantize(model, state_dict, qmap, device=torch.device("cpu"))
    return model


def quantized_module_names(model: nn.Module) -> List[str]:
    from optimum.quanto.nn import QModuleMixin

    return [n for n, m in model.named_modules() if isinstance(m, QModuleMixin) and m.weight_qtype is not None]


def dequantized_weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    """`<m>.weight` = m.weight.dequantize() for every module with a quantized weight."""
    out = {}
    with torch.no_grad():
        for n in quantized_module_names(model):
            m = model.get_submodule(n)
            out[f"{n}.weight"] = m.weight.dequantize().contiguous()
    return out


def plain_outputs(outputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Flatten forward outputs: a quantized activation (QTensor) becomes `<name>._data` and `<name>._scale`."""
    from optimum.quanto import QTensor

    flat = {}
    for k, v in outputs.items():
        if isinstance(v, QTensor):
            flat[f"{k}._data"] = v._data
            flat[f"{k}._scale"] = v._scale
        else:
            flat[k] = v
    return flat


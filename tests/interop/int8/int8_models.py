"""Shared model building for the int8 interop fixtures (compressed-tensors and bitsandbytes).

Used by gen_int8_fixtures.py (writes the golden fixtures) and check_int8.py (checks a
ckptkit-written file with the real libraries' own loading/decompression code).

A *case* is a JSON-serialisable dict (stored as case.json next to the fixture files).
Everything needed to rebuild the float model, quantize it exactly as the generator did,
and load a checkpoint back comes from that dict plus float.safetensors.

Libraries and the code paths used (all CPU):

* compressed-tensors (CT) 0.20.0.  CT itself has no weight observer (calibration lives in
  llm-compressor, whose release 0.14.0.1 would install torch 2.14.0 + CT 0.19.0 and whose main
  branch pins torch <= 2.13.0, so it cannot be installed next to torch 2.15 / CT 0.20).  The weight scales are therefore computed exactly as llm-compressor's
  weight observer does it (`memoryless_minmax`: `flatten_for_calibration` then
  `torch.amin/amax(dim=(0, -1))`), followed by CT's own `calculate_qparams`; everything else is
  CT's API: `apply_quantization_config`, `ModelCompressor.from_pretrained_model`,
  `compress_model`, transformers `save_pretrained`, `ModelCompressor.update_config`.
* bitsandbytes (bnb) 0.50.2, through transformers 5.24.0 (`from_pretrained(...,
  quantization_config=BitsAndBytesConfig(load_in_8bit=True))` then `save_pretrained`), which is
  how LLM.int8 checkpoints are produced in practice.  The generator cross-checks the result
  against bnb's bare module API (`Linear8bitLt(...).to("cpu")`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import tempfile
import warnings
from typing import Dict, List, Optional

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("COMPRESSED_TENSORS_LOG_DISABLED", "1")

import sys  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from interop_common import (  # noqa: E402,F401  (re-exported)
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
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}

CT = "compressed-tensors"
BNB = "bitsandbytes"

GROUP_SIZE = 32
CT_VERSION = "0.20.0"
BNB_VERSION = "0.50.2"


def quiet_libraries() -> None:
    """Silence loguru (compressed-tensors), transformers and warnings noise."""
    try:
        from loguru import logger

        logger.disable("compressed_tensors")
    except Exception:  # noqa: BLE001
        pass
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    warnings.filterwarnings("ignore")


# --------------------------------------------------------------------------------------
# Module specs
# --------------------------------------------------------------------------------------
#
# Each spec: name, kind and constructor args, plus fixture-only knobs:
#   zero_row:   index of an output row forced to all zeros
#   zero_group: [row, col_start, col_end] forced to zeros (one whole group for G=32)
#   skip:       module left unquantized (CT `ignore`, bnb `llm_int8_skip_modules`)


def lin(name, i, o, bias=True, **kw):
    return dict(name=name, kind="Linear", in_features=i, out_features=o, bias=bias, **kw)


def layernorm(name, n, **kw):
    return dict(name=name, kind="LayerNorm", normalized_shape=n, bias=True, **kw)


# Per-channel (row) cases: CT pack-quantized channel, CT int-quantized (W8A8), bnb LLM.int8.
CHANNEL_MODULES = [
    lin("lin_i256", 256, 16),
    lin("lin_i200", 200, 8),  # 200 % 4 == 0: 50 int32 words per row, no padding byte
    lin("lin_i201", 201, 4),  # 201 % 4 == 1: 51 words, the last one carries 3 padding bytes
    lin("lin_o1", 64, 1),  # out_features == 1
    lin("lin_zero_row", 160, 4, zero_row=2),  # all-zero row
    lin("lin_nobias", 96, 4, bias=False),
    # not a Linear: never quantized.  The name ends in "norm" because CT's model-free dequantizer
    # (match_quantizable_tensors) can only tell norms from Linears by that suffix: a LayerNorm
    # called "ln" makes it fail on int-quantized files ("Missing expected compression param
    # 'ln.weight_scale'"), see the README.
    layernorm("final_norm", 32),
    lin("lin_skip", 32, 4, skip=True),  # a Linear left in float (ignore / skip list)
]

# Group cases (CT pack-quantized, strategy=group, G=32).  CT needs in_features % G == 0
# (see GROUP_PROBE_MODULES), so every quantized module here divides.
GROUP_MODULES = [
    lin("lin_i256", 256, 16),  # 8 groups per row
    lin("lin_i96", 96, 4),  # 3 groups (odd count)
    lin("lin_o1", 64, 1),
    lin("lin_zero_row", 160, 4, zero_row=2),
    lin("lin_zero_group", 128, 4, zero_group=[1, 32, 64]),  # one all-zero group
    lin("lin_nobias", 96, 4, bias=False),
    layernorm("final_norm", 32),
    lin("lin_skip", 32, 4, skip=True),
]

# Modules tried on their own for the group strategy, to record what CT does with them.
GROUP_PROBE_MODULES = [lin("lin_i200", 200, 8)]


def case_list() -> List[dict]:
    """The recipe of every case, in index order (without seeds)."""
    cases = []
    for dtype in ("bfloat16", "float16", "float32"):
        d = DTYPE_SHORT[dtype]
        cases.append(
            dict(
                name=f"ct-{d}-pack-channel",
                library=CT,
                dtype=dtype,
                form="pack-quantized",
                scheme="W8A16",
                strategy="channel",
                group_size=None,
                specs=CHANNEL_MODULES,
            )
        )
        cases.append(
            dict(
                name=f"ct-{d}-pack-group{GROUP_SIZE}",
                library=CT,
                dtype=dtype,
                form="pack-quantized",
                scheme="W8A16",
                strategy="group",
                group_size=GROUP_SIZE,
                specs=GROUP_MODULES,
            )
        )
        cases.append(
            dict(
                name=f"ct-{d}-int-channel",
                library=CT,
                dtype=dtype,
                form="int-quantized",
                scheme="W8A8 (CT preset INT8_W8A8)",
                strategy="channel",
                group_size=None,
                specs=CHANNEL_MODULES,
            )
        )
        cases.append(
            dict(
                name=f"bnb-{d}-llm_int8",
                library=BNB,
                dtype=dtype,
                form="llm_int8",
                scheme="LLM.int8 (BitsAndBytesConfig(load_in_8bit=True))",
                strategy="row",
                group_size=None,
                specs=CHANNEL_MODULES,
            )
        )
    return [copy.deepcopy(c) for c in cases]


# --------------------------------------------------------------------------------------
# Model (a tiny transformers PreTrainedModel, so that save_pretrained/from_pretrained and
# transformers' quantizers run exactly as for a real checkpoint)
# --------------------------------------------------------------------------------------

_TINY = {}


def tiny_classes():
    """(TinyConfig, TinyModel), created lazily so that importing this file is cheap."""
    if _TINY:
        return _TINY["config"], _TINY["model"]
    from transformers import PretrainedConfig, PreTrainedModel

    class Int8TinyConfig(PretrainedConfig):
        model_type = "ckptkit_int8_tiny"

        def __init__(self, specs=None, **kwargs):
            self.specs = specs or []
            super().__init__(**kwargs)

    class Int8TinyModel(PreTrainedModel):
        config_class = Int8TinyConfig
        base_model_prefix = "tiny"
        _no_split_modules: list = []

        def __init__(self, config):
            super().__init__(config)
            for s in config.specs:
                self.add_module(s["name"], make_module(s))
            self.post_init()

        def _init_weights(self, module):  # weights come from the checkpoint / init_float_weights
            pass

        def forward(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            return {s["name"]: getattr(self, s["name"])(inputs[s["name"]]) for s in self.config.specs}

    _TINY["config"], _TINY["model"] = Int8TinyConfig, Int8TinyModel
    return Int8TinyConfig, Int8TinyModel


def make_module(spec: dict, dtype: Optional[torch.dtype] = None, device=None) -> nn.Module:
    if spec["kind"] == "Linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"], dtype=dtype, device=device)
    if spec["kind"] == "LayerNorm":
        return nn.LayerNorm(spec["normalized_shape"], dtype=dtype, device=device)
    raise ValueError(f"unknown module kind {spec['kind']!r}")


def build_model(case: dict, device=None):
    """The float model (dtype of the case), on `device` (None = CPU)."""
    cfg_cls, model_cls = tiny_classes()
    cfg = cfg_cls(specs=[dict(s) for s in case["specs"]])
    if device is not None:
        with torch.device(device):
            model = model_cls(cfg)
    else:
        model = model_cls(cfg)
    return model.to(DTYPES[case["dtype"]])


def init_float_weights(model, seed: int) -> None:
    """Random normal weights with per-row offsets and scales (as the quanto fixtures do)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in model.config.specs:
            m = getattr(model, s["name"])
            w = m.weight
            if s["kind"] == "LayerNorm":
                m.weight.copy_((1.0 + 0.1 * torch.randn(w.shape, generator=g)).to(w.dtype))
                m.bias.copy_((0.1 * torch.randn(m.bias.shape, generator=g)).to(w.dtype))
                continue
            o = w.shape[0]
            base = torch.randn(w.shape, generator=g, dtype=torch.float32)
            row_scale = (0.02 + 0.1 * torch.rand(o, generator=g)).reshape(o, 1)
            row_offset = (torch.linspace(-0.3, 0.3, o) + 0.05 * torch.randn(o, generator=g)).reshape(o, 1)
            val = base * row_scale + row_offset
            if s.get("zero_row") is not None:
                val[s["zero_row"]] = 0.0
            if s.get("zero_group") is not None:
                r, c0, c1 = s["zero_group"]
                val[r, c0:c1] = 0.0
            w.copy_(val.to(w.dtype))
            if m.bias is not None:
                m.bias.copy_((0.1 * torch.randn(m.bias.shape, generator=g)).to(w.dtype))


def quantized_module_names(case: dict) -> List[str]:
    return [s["name"] for s in case["specs"] if s["kind"] == "Linear" and not s.get("skip")]


def skipped_module_names(case: dict) -> List[str]:
    return [s["name"] for s in case["specs"] if s["kind"] == "Linear" and s.get("skip")]


def float_config_dict(case: dict) -> dict:
    """config.json of the float model as transformers save_pretrained writes it."""
    model = build_model(case, device="meta")
    with tempfile.TemporaryDirectory() as d:
        model.config.save_pretrained(d)
        with open(os.path.join(d, "config.json")) as f:
            return json.load(f)


def save_float_pretrained(case: dict, float_sd: Dict[str, torch.Tensor], out_dir: str) -> None:
    """A float checkpoint directory (config.json + model.safetensors) made by save_pretrained."""
    model = build_model(case)
    model.load_state_dict(float_sd, strict=True)
    model.save_pretrained(out_dir)


# --------------------------------------------------------------------------------------
# compressed-tensors
# --------------------------------------------------------------------------------------


def ct_scheme(case: dict):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

    if case["form"] == "int-quantized":
        # CT's own W8A8 preset: channel int8 weights + dynamic per-token int8 activations
        return preset_name_to_scheme("W8A8", ["Linear"])
    if case["strategy"] == "channel":
        w = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False)
    else:
        w = QuantizationArgs(
            num_bits=8, type="int", symmetric=True, strategy="group", group_size=case["group_size"], dynamic=False
        )
    # W8A16: the preset "W8A16" is the same with strategy=group, group_size=128
    return QuantizationScheme(targets=["Linear"], weights=w)


def ct_initial_config(case: dict):
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig(
        config_groups={"group_0": ct_scheme(case)},
        ignore=skipped_module_names(case),
        quantization_status="initialized",
    )


def ct_observe_weight(module) -> None:
    """What llm-compressor's weight observer (`memoryless_minmax`) does, with CT's calculate_qparams.

    llm-compressor `observers/helpers.py::_flatten_weight`: channel -> (1, out, 1, in), group ->
    (1, out, in/G, G); `observers/min_max.py::_get_min_max`: amin/amax over dims (0, -1), in the
    weight's own dtype; `observers/base.py::get_qparams` -> CT `calculate_qparams`; then
    `update_qparams` writes scale (and zero point) into the module with `update_offload_parameter`.
    """
    from compressed_tensors.offload import update_offload_parameter
    from compressed_tensors.quantization.utils import calculate_qparams

    args = module.quantization_scheme.weights
    w = module.weight.detach()
    if args.strategy == "channel":
        v = w.unsqueeze(-2).unsqueeze(0)
    elif args.strategy == "group":
        v = w.unflatten(-1, (-1, args.group_size)).unsqueeze(0)
    else:
        raise ValueError(f"strategy {args.strategy} not used by these fixtures")
    mn = torch.amin(v, dim=(0, -1))
    mx = torch.amax(v, dim=(0, -1))
    scale, zero_point = calculate_qparams(min_vals=mn, max_vals=mx, quantization_args=args)
    update_offload_parameter(module, "weight_scale", scale)
    if hasattr(module, "weight_zero_point"):
        update_offload_parameter(module, "weight_zero_point", zero_point)


def ct_quantize_and_compress(model, case: dict):
    """apply_quantization_config -> observe weights -> freeze -> ModelCompressor.compress_model.

    Returns the ModelCompressor (whose quantization_config update_config writes)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config

    apply_quantization_config(model, ct_initial_config(case), show_progress=False)
    for name in quantized_module_names(case):
        m = getattr(model, name)
        ct_observe_weight(m)
        m.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    return compressor


def ct_quantize_to_dir(case: dict, float_sd: Dict[str, torch.Tensor], out_dir: str):
    """The library's own checkpoint: model.safetensors + config.json in out_dir.

    Returns (compressed model, compressor)."""
    model = build_model(case)
    model.load_state_dict(float_sd, strict=True)
    compressor = ct_quantize_and_compress(model, case)
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)
    return model, compressor


def ct_parse_config(qconfig_dict: dict):
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig.model_validate(qconfig_dict)


def ct_decompress_in_memory(model, compressor, case: dict) -> Dict[str, torch.Tensor]:
    """ModelCompressor.decompress_model on the freshly compressed model."""
    compressor.decompress_model(model)
    return {f"{n}.weight": getattr(model, n).weight.detach().clone().contiguous() for n in quantized_module_names(case)}


def ct_load_model_path(case: dict, sd: Dict[str, torch.Tensor], qconfig_dict: dict):
    """CT's load lifecycle (the one transformers' CompressedTensorsHfQuantizer runs):

    meta model -> apply_quantization_config(config) -> ModelCompressor.compress_model (meta
    branch: creates the compressed parameters) -> load_state_dict(strict=True, assign=True)
    -> ModelCompressor.decompress_model.

    Returns (dequantized {<m>.weight}, error text or None).  Strict loading reports any
    missing/unexpected key."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    qconfig = ct_parse_config(qconfig_dict)
    model = build_model(case, device="meta")
    apply_quantization_config(model, qconfig, show_progress=False)
    compressor = ModelCompressor(quantization_config=qconfig)
    if qconfig.quantization_status == "compressed":
        compressor.compress_model(model)
    try:
        model.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True, assign=True)
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"
    compressor.decompress_model(model)
    out = {}
    for n in quantized_module_names(case):
        w = getattr(model, n).weight
        if w.device.type == "meta":
            return None, f"{n}.weight still on meta after decompress_model"
        out[f"{n}.weight"] = w.detach().clone().contiguous()
    return out, None


def ct_model_free_path(model_dir: str, sd: Dict[str, torch.Tensor], dtype: torch.dtype):
    """CT's model-free dequantizer (entrypoints/convert CompressedTensorsDequantizer).

    `validate` runs `process` and additionally rejects leftover quantization parameters."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    conv = CompressedTensorsDequantizer(model_dir, dtype=dtype)
    return conv.validate({k: v.clone() for k, v in sd.items()})


# --------------------------------------------------------------------------------------
# transformers loading (both libraries)
# --------------------------------------------------------------------------------------


def transformers_load(model_dir: str, **kwargs):
    """TinyModel.from_pretrained(model_dir, output_loading_info=True)."""
    _, model_cls = tiny_classes()
    model, info = model_cls.from_pretrained(model_dir, output_loading_info=True, **kwargs)
    return model, info


def loading_info_problems(info: dict) -> List[str]:
    out = []
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        v = info.get(k)
        if v:
            out.append(f"{k}: {sorted(map(str, v))}")
    return out


def ct_transformers_path(case: dict, model_dir: str):
    """transformers from_pretrained (CompressedTensorsHfQuantizer, dequantize=False: the
    compressed layout is loaded into the parameters compress_model created), then
    decompress_model.  Returns (dequantized, loading problems)."""
    model, info = transformers_load(model_dir)
    problems = loading_info_problems(info)
    model.hf_quantizer.compressor.decompress_model(model)
    out = {f"{n}.weight": getattr(model, n).weight.detach().clone().contiguous() for n in quantized_module_names(case)}
    return out, problems


def ct_transformers_dequantize_path(case: dict, model_dir: str):
    """transformers from_pretrained with CompressedTensorsConfig(dequantize=True): the
    CompressedTensorsDequantize load operation decompresses each module while loading."""
    from transformers import CompressedTensorsConfig

    model, info = transformers_load(model_dir, quantization_config=CompressedTensorsConfig(dequantize=True))
    problems = loading_info_problems(info)
    out = {f"{n}.weight": getattr(model, n).weight.detach().clone().contiguous() for n in quantized_module_names(case)}
    return out, problems


# --------------------------------------------------------------------------------------
# bitsandbytes
# --------------------------------------------------------------------------------------


def bnb_config(case: dict):
    from transformers import BitsAndBytesConfig

    # llm_int8_skip_modules given explicitly; with None transformers would pick its own
    # "output head" heuristically (it skipped the last Linear of this toy model).
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skipped_module_names(case))


def bnb_quantize_to_dir(case: dict, float_sd: Dict[str, torch.Tensor], out_dir: str):
    """transformers from_pretrained(float dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
    dtype=T) -> save_pretrained(out_dir).  Returns the quantized model."""
    with tempfile.TemporaryDirectory() as fdir:
        save_float_pretrained(case, float_sd, fdir)
        model, info = transformers_load(fdir, quantization_config=bnb_config(case), dtype=DTYPES[case["dtype"]])
        problems = loading_info_problems(info)
        if problems:
            raise RuntimeError(f"transformers bnb quantization load reported {problems}")
    model.save_pretrained(out_dir)
    return model


def bnb_module_api_state_dict(case: dict, float_sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """bnb's bare module API: Linear8bitLt(has_fp16_weights=False).to(T), load the float
    weights, .to("cpu") (quantization happens here), state_dict()."""
    import bitsandbytes as bnb

    dtype = DTYPES[case["dtype"]]
    out = {}
    for s in case["specs"]:
        n = s["name"]
        local = {k[len(n) + 1 :]: v for k, v in float_sd.items() if k.startswith(n + ".")}
        if n in quantized_module_names(case):
            m = bnb.nn.Linear8bitLt(s["in_features"], s["out_features"], bias=s["bias"], has_fp16_weights=False)
            m = m.to(dtype=dtype)
            m.load_state_dict(local, strict=True)
            m = m.to("cpu")
        else:
            m = make_module(s, dtype)
            m.load_state_dict(local, strict=True)
        for k, v in m.state_dict().items():
            out[f"{n}.{k}"] = v.detach().clone()
    return out


def bnb_dequantize_model(model, case: dict) -> Dict[str, torch.Tensor]:
    """bitsandbytes.functional.int8_vectorwise_dequant(CB, SCB) for every Linear8bitLt (F32)."""
    import bitsandbytes as bnb

    out = {}
    for n in quantized_module_names(case):
        m = getattr(model, n)
        scb = m.weight.SCB if getattr(m.weight, "SCB", None) is not None else m.state.SCB
        out[f"{n}.weight"] = bnb.functional.int8_vectorwise_dequant(m.weight.data, scb).contiguous()
    return out


def bnb_native_path(case: dict, sd: Dict[str, torch.Tensor]):
    """bnb's own load path: Linear8bitLt(has_fp16_weights=False).to(T).to("cpu") (bnb requires the
    module to be quantized before load_state_dict), then load_state_dict(strict=True) on the
    whole model (Linear8bitLt._load_from_state_dict copies SCB, maybe_rearrange_weight pops and
    checks weight_format), then int8_vectorwise_dequant.  Returns (dequantized, error or None)."""
    import bitsandbytes as bnb

    dtype = DTYPES[case["dtype"]]
    model = build_model(case)
    for s in case["specs"]:
        if s["name"] in quantized_module_names(case):
            m = bnb.nn.Linear8bitLt(s["in_features"], s["out_features"], bias=s["bias"], has_fp16_weights=False)
            model.set_submodule(s["name"], m.to(dtype=dtype).to("cpu"))
    try:
        model.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"
    return bnb_dequantize_model(model, case), None


def bnb_transformers_path(case: dict, model_dir: str):
    """transformers from_pretrained of a pre-quantized bnb checkpoint (Bnb8bitDeserialize),
    then transformers' own dequantize_bnb_weight.  Returns (dequantized, problems)."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    model, info = transformers_load(model_dir)
    problems = loading_info_problems(info)
    out = {}
    for n in quantized_module_names(case):
        m = getattr(model, n)
        if not isinstance(m, bnb.nn.Linear8bitLt):
            problems.append(f"{n} loaded as {type(m).__name__}, not Linear8bitLt")
            continue
        if m.weight.dtype != torch.int8:
            problems.append(f"{n}.weight loaded as {m.weight.dtype}, not int8")
            continue
        out[f"{n}.weight"] = dequantize_bnb_weight(m.weight, m.state).detach().clone().contiguous()
    return out, problems


# --------------------------------------------------------------------------------------
# Independent re-statements of the math (checked against the libraries by the generator)
# --------------------------------------------------------------------------------------


def ct_formula(w: torch.Tensor, strategy: str, group_size: Optional[int]):
    """(scale, q, dequantized) from the formula documented in the fixtures' README.

    T = model dtype.  amax = max(|min(x,0)|, max(x,0)) over the row/group (exact in T);
    scale = RN_T(f32(amax) / 127.5), and scale = finfo(T).eps where that is 0;
    q = round_half_even(clamp(RN_T(f32(x) / f32(scale)), -128, 127));
    dequantized = RN_T(f32(q) * f32(scale))."""
    T = w.dtype
    rows, cols = w.shape
    g = cols if strategy == "channel" else group_size
    wg = w.reshape(rows, cols // g, g)
    amax = torch.maximum(wg.float().amin(-1).neg().clamp(min=0), wg.float().amax(-1).clamp(min=0))
    scale = (amax / 127.5).to(T)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(T).eps, dtype=T), scale)
    t = (wg.float() / scale.float().unsqueeze(-1)).to(T).float()
    q = torch.round(t.clamp(-128, 127)).to(torch.int8)
    deq = (q.float() * scale.float().unsqueeze(-1)).to(T)
    return scale.reshape(rows, -1), q.reshape(rows, cols), deq.reshape(rows, cols)


BNB_INV127 = 7.874015718698502e-3  # the constant bnb multiplies by (as an f32: 0x3C010204)


def bnb_formula(w: torch.Tensor):
    """(SCB, q, dequantized) from the formula documented in the fixtures' README.

    A = f16(W) (bnb casts to float16 first, whatever the model dtype); SCB = f32(max|A| per row);
    mult = RN32(RN32(1 / SCB) * 127)  -- bnb writes `127.0 / row_stats`, and torch evaluates a
    Python-scalar / tensor division as `tensor.reciprocal() * scalar` (Tensor.__rtruediv__), so it
    is NOT the correctly rounded 127/SCB (they differ for some SCB values);
    q = int8(round_half_even(f32(A) * mult))  (a zero row gives 0*inf = NaN -> 0 here);
    dequantized = f32(f32(q * SCB) * f32(1/127 constant))."""
    A = w.to(torch.float16)
    scb = A.abs().amax(1).float()
    mult = torch.reciprocal(scb) * torch.tensor(127.0, dtype=torch.float32)
    t = torch.round(A.float() * mult.unsqueeze(-1))
    t = torch.nan_to_num(t, nan=0.0)
    q = t.to(torch.int8)
    deq = (q.float() * scb.unsqueeze(-1)) * torch.tensor(BNB_INV127, dtype=torch.float32)
    return scb, q, deq


def ct_unpack_bytes(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int32 words -> little-endian bytes -> int8 q = byte - 128 (first `cols` bytes of each row)."""
    b = packed.contiguous().view(torch.uint8).reshape(packed.shape[0], -1)
    return (b[:, :cols].to(torch.int16) - 128).to(torch.int8), b[:, cols:]


# --------------------------------------------------------------------------------------
# Tensor helpers
# --------------------------------------------------------------------------------------


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def file_header(path: str) -> dict:
    """The safetensors JSON header (tensor order in the file, dtypes, shapes, __metadata__)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


@contextlib.contextmanager
def staged_dir(config: dict, weights_path: str):
    """A temporary checkpoint directory holding `config` as config.json and a copy of weights_path
    as model.safetensors (what from_pretrained / the model-free dequantizer read)."""
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        shutil.copyfile(weights_path, os.path.join(d, "model.safetensors"))
        yield d


@contextlib.contextmanager
def quiet_stderr():
    """Swallow what the libraries print on stderr (tqdm bars created with an explicit
    disable=False, e.g. CT's "Dispatching model").  Exceptions still propagate."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield

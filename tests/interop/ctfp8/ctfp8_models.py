"""Shared code for the compressed-tensors FP8 interop fixtures (formats `naive-quantized` and
`float-quantized`, compressed-tensors 0.20.0 on CPU).

Used by gen_ctfp8_fixtures.py (writes the golden fixtures), check_ctfp8.py (checks ckptkit's files)
and selftest_check_ctfp8.py.

Layout CT writes per quantized Linear `{m}` (model dtype D):

* `{m}.weight`        F8_E4M3 (torch.float8_e4m3fn) codes, the weight's own shape `[out, in]`;
* `{m}.weight_scale`  dtype D; `[1]` (tensor), `[out, 1]` (channel), `[out, in/G]` (group),
                      `[ceil(out/128), ceil(in/128)]` (block [128, 128]);
* `{m}.bias`          unchanged, dtype D.

No `weight_zero_point` (symmetric), no `input_scale` (the only activation scheme used is dynamic).

How the library files are made (llm-compressor cannot be installed next to torch 2.15 / CT 0.20, see
tests/fixtures/int8/README.md, so its weight observer `memoryless_minmax` is restated in
`ct_observe_weight`, and everything else is CT's API):

    apply_quantization_config -> observer + CT calculate_qparams -> update_offload_parameter
    -> FROZEN -> ModelCompressor.from_pretrained_model -> compress_model -> save_pretrained
    -> ModelCompressor.update_config

Decompression entry points (all CT's or transformers'): see `ct_paths`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import tempfile
from typing import Dict, List, Optional

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "int8"))
import int8_models as im  # noqa: E402  (generic helpers only: quiet_libraries, staged_dir, ...)
from interop_common import (  # noqa: E402,F401  (re-exported)
    case_seed,
    load_case,
    load_tensors,
    same_tensor,
    sha256_file,
    tensor_bytes,
)

CT_VERSION = "0.20.0"
TORCH_VERSION = "2.15.0"
TRANSFORMERS_VERSION = "5.24.0"
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = [128, 128]
GROUP_SIZE = 32
EXCLUDE = ["lin_skip"]
MODEL_TYPE = "ckptkit_ctfp8_tiny"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}

quiet_libraries = im.quiet_libraries
quiet_stderr = im.quiet_stderr
staged_dir = im.staged_dir
file_header = im.file_header
dtype_name = im.dtype_name
loading_info_problems = im.loading_info_problems


# --------------------------------------------------------------------------------------
# Modules and cases
# --------------------------------------------------------------------------------------
#
# Spec knobs (fixture only):
#   zero_row: an output row forced to 0; zero_group: [row, c0, c1] forced to 0;
#   zero_block: [r0, r1, c0, c1] forced to 0; zero_all: the whole weight is 0;
#   binades: magnitudes spread log-uniformly over 2^-22..1 of each row's amplitude (FP8 subnormal
#   codes and codes that round to 0); skip: left in float (CT `ignore`).


def lin(name, i, o, bias=True, **kw):
    return dict(name=name, kind="Linear", in_features=i, out_features=o, bias=bias, **kw)


def layernorm(name, n):
    return dict(name=name, kind="LayerNorm", normalized_shape=n, bias=True)


# tensor / channel cases
ROW_MODULES = [
    lin("lin_a", 256, 16),
    lin("lin_i201", 201, 4),  # odd in_features
    lin("lin_o1", 64, 1),  # out_features == 1
    lin("lin_binades", 64, 8, binades=True),
    lin("lin_zero_row", 96, 4, zero_row=2),
    lin("lin_zero", 32, 4, zero_all=True),  # all-zero weight: the tensor scale is eps too
    lin("lin_nobias", 96, 4, bias=False),
    # not a Linear: never quantized (the name ends in "norm": CT's model-free dequantizer tells norms
    # from Linears by that suffix only, see tests/fixtures/int8/README.md)
    layernorm("final_norm", 32),
    lin("lin_skip", 32, 4, skip=True),
]

# group cases (G = 32; CT requires in_features % G == 0)
GROUP_MODULES = [
    lin("lin_a", 256, 16),  # 8 groups per row
    lin("lin_i96", 96, 4),  # 3 groups
    lin("lin_o1", 64, 1),
    lin("lin_binades", 64, 8, binades=True),
    lin("lin_zero_group", 128, 4, zero_group=[1, 32, 64]),
    lin("lin_zero_row", 96, 4, zero_row=2),
    lin("lin_nobias", 96, 4, bias=False),
    layernorm("final_norm", 32),
    lin("lin_skip", 32, 4, skip=True),
]

# block cases ([128, 128]; CT zero-pads ragged weights to the block grid)
BLOCK_MODULES = [
    # [130, 136]: scale [2, 2]; its bottom-right block (rows 128..129, cols 128..135) is all zero
    lin("lin_ragged", 136, 130, zero_block=[128, 130, 128, 136]),
    lin("lin_aligned", 128, 128),  # [128, 128]: scale [1, 1]
    lin("lin_wide", 200, 8, bias=False),  # [8, 200]: scale [1, 2]
    lin("lin_small", 32, 4),  # [4, 32]: one partial block
    lin("lin_binades", 64, 16, binades=True),
    layernorm("final_norm", 32),
    lin("lin_skip", 32, 4, skip=True),
]


def case_list() -> List[dict]:
    def case(name, dtype, strategy, specs, target, group_size=None, block_structure=None, activations=None):
        return dict(name=name, library="compressed-tensors", dtype=dtype, strategy=strategy, group_size=group_size,
                    block_structure=block_structure, activations=activations, ckptkit_target=target,
                    exclude=list(EXCLUDE), specs=copy.deepcopy(specs))

    return [
        case("ctfp8-bf16-tensor", "bfloat16", "tensor", ROW_MODULES, "fp8:ct:tensor"),
        case("ctfp8-bf16-channel", "bfloat16", "channel", ROW_MODULES, "fp8:ct:channel"),
        case("ctfp8-bf16-group32", "bfloat16", "group", GROUP_MODULES, f"fp8:ct:group={GROUP_SIZE}",
             group_size=GROUP_SIZE),
        case("ctfp8-bf16-block", "bfloat16", "block", BLOCK_MODULES, "fp8:ct:block=128x128",
             block_structure=list(BLOCK)),
        case("ctfp8-f16-channel", "float16", "channel", ROW_MODULES, "fp8:ct:channel"),
        case("ctfp8-f32-tensor", "float32", "tensor", ROW_MODULES, "fp8:ct:tensor"),
        case("ctfp8-bf16-channel-dynamic", "bfloat16", "channel", ROW_MODULES, "fp8:ct:channel:float-quantized",
             activations="dynamic-token"),
    ]


def quantized_module_names(case: dict) -> List[str]:
    return [s["name"] for s in case["specs"] if s["kind"] == "Linear" and not s.get("skip")]


def skipped_module_names(case: dict) -> List[str]:
    return [s["name"] for s in case["specs"] if s["kind"] == "Linear" and s.get("skip")]


def quantized_weight_keys(case: dict) -> List[str]:
    return [f"{n}.weight" for n in quantized_module_names(case)]


# --------------------------------------------------------------------------------------
# Model: a tiny transformers PreTrainedModel (save_pretrained / from_pretrained / the CT HfQuantizer
# run as for a real checkpoint); modules at the top level, keys `<module>.<param>`.
# --------------------------------------------------------------------------------------

_TINY: dict = {}


def tiny_classes():
    if _TINY:
        return _TINY["config"], _TINY["model"]
    from transformers import PretrainedConfig, PreTrainedModel

    class CtFp8TinyConfig(PretrainedConfig):
        model_type = MODEL_TYPE

        def __init__(self, specs=None, **kwargs):
            self.specs = specs or []
            super().__init__(**kwargs)

    class CtFp8TinyModel(PreTrainedModel):
        config_class = CtFp8TinyConfig
        base_model_prefix = "tiny"
        _no_split_modules: list = []

        def __init__(self, config):
            super().__init__(config)
            for s in config.specs:
                self.add_module(s["name"], make_module(s))
            self.post_init()

        def _init_weights(self, module):  # the weights come from float.safetensors
            pass

        def forward(self, inputs):
            return {s["name"]: getattr(self, s["name"])(inputs[s["name"]]) for s in self.config.specs}

    _TINY["config"], _TINY["model"] = CtFp8TinyConfig, CtFp8TinyModel
    return CtFp8TinyConfig, CtFp8TinyModel


def make_module(spec: dict) -> nn.Module:
    if spec["kind"] == "Linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])
    return nn.LayerNorm(spec["normalized_shape"])


def build_model(case: dict, device=None):
    cfg_cls, model_cls = tiny_classes()
    cfg = cfg_cls(specs=[dict(s) for s in case["specs"]])
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = model_cls(cfg)
    return model.to(DTYPES[case["dtype"]])


def float_state_dict(case: dict, seed: int) -> Dict[str, torch.Tensor]:
    """The float weights: per Linear `randn * row_scale + row_offset` in f32 (as the int8 fixtures),
    knobs applied, cast to the case dtype.  One generator per case, modules in order."""
    D = DTYPES[case["dtype"]]
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for s in case["specs"]:
        n = s["name"]
        if s["kind"] == "LayerNorm":
            k = s["normalized_shape"]
            sd[f"{n}.weight"] = (1.0 + 0.1 * torch.randn(k, generator=g)).to(D)
            sd[f"{n}.bias"] = (0.1 * torch.randn(k, generator=g)).to(D)
            continue
        o, i = s["out_features"], s["in_features"]
        base = torch.randn(o, i, generator=g)
        row_scale = (0.02 + 0.1 * torch.rand(o, generator=g)).reshape(o, 1)
        row_offset = (torch.linspace(-0.3, 0.3, o) + 0.05 * torch.randn(o, generator=g)).reshape(o, 1)
        w = base * row_scale + row_offset
        if s.get("binades"):
            amp = 0.05 + 0.45 * torch.rand(o, 1, generator=g)
            expo = -22.0 * torch.rand(o, i, generator=g)
            sign = torch.where(torch.rand(o, i, generator=g) < 0.5, -1.0, 1.0)
            w = sign * amp * torch.exp2(expo)
            w[:, 0] = sign[:, 0] * amp[:, 0]  # the row's amplitude is its amax
        if s.get("zero_row") is not None:
            w[s["zero_row"]] = 0.0
        if s.get("zero_group") is not None:
            r, c0, c1 = s["zero_group"]
            w[r, c0:c1] = 0.0
        if s.get("zero_block") is not None:
            r0, r1, c0, c1 = s["zero_block"]
            w[r0:r1, c0:c1] = 0.0
        if s.get("zero_all"):
            w.zero_()
        sd[f"{n}.weight"] = w.to(D)
        if s["bias"]:
            sd[f"{n}.bias"] = (0.1 * torch.randn(o, generator=g)).to(D)
    return sd


def float_config_dict(case: dict) -> dict:
    """config.json of the float model as save_pretrained writes it (no quantization_config)."""
    model = build_model(case, device="meta")
    with tempfile.TemporaryDirectory() as d:
        model.config.save_pretrained(d)
        with open(os.path.join(d, "config.json")) as f:
            return json.load(f)


# --------------------------------------------------------------------------------------
# compressed-tensors
# --------------------------------------------------------------------------------------


def weight_args_dict(case: dict) -> dict:
    d = dict(num_bits=8, type="float", symmetric=True, strategy=case["strategy"], dynamic=False)
    if case["group_size"] is not None:
        d["group_size"] = case["group_size"]
    if case["block_structure"] is not None:
        d["block_structure"] = list(case["block_structure"])
    return d


def ct_scheme(case: dict):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

    if case.get("activations") == "dynamic-token":
        # CT's own FP8_DYNAMIC preset: channel FP8 weights + dynamic per-token FP8 input activations
        scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
        assert case["strategy"] == "channel" and scheme.weights.strategy == "channel"
        return scheme
    if case.get("activations") is not None:
        raise ValueError(f"unknown activations {case['activations']!r}")
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weight_args_dict(case)))


def ct_initial_config(case: dict):
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig(config_groups={"group_0": ct_scheme(case)}, ignore=skipped_module_names(case),
                              quantization_status="initialized")


def observer_view(w: torch.Tensor, args) -> torch.Tensor:
    """llm-compressor `observers/helpers.py::_flatten_weight` (weights): the tensor reshaped to
    `(1, *scale_shape, elements per scale)`; block weights are zero-padded to the grid first with CT's
    `maybe_pad_tensor_for_block_quant`."""
    from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant

    if args.strategy == "tensor":
        return w.reshape((1, 1, -1))
    if args.strategy == "channel":
        return w.unsqueeze(-2).unsqueeze(0)
    if args.strategy == "group":
        return w.unflatten(-1, (-1, args.group_size)).unsqueeze(0)
    if args.strategy == "block":
        bh, bw = args.block_structure
        w = maybe_pad_tensor_for_block_quant(w, args.block_structure)
        rows, cols = w.shape
        return w.reshape(rows // bh, bh, cols // bw, bw).transpose(1, 2).flatten(-2, -1).unsqueeze(0)
    raise ValueError(f"strategy {args.strategy} not used by these fixtures")


def ct_observe_weight(module) -> None:
    """llm-compressor's weight observer (`memoryless_minmax`: amin/amax over dims (0, -1) of the view
    above, in the weight's dtype), then CT's own `calculate_qparams` and `update_offload_parameter`."""
    from compressed_tensors.offload import update_offload_parameter
    from compressed_tensors.quantization.utils import calculate_qparams

    args = module.quantization_scheme.weights
    v = observer_view(module.weight.detach(), args)
    mn = torch.amin(v, dim=(0, -1))
    mx = torch.amax(v, dim=(0, -1))
    scale, zero_point = calculate_qparams(min_vals=mn, max_vals=mx, quantization_args=args)
    update_offload_parameter(module, "weight_scale", scale)
    if hasattr(module, "weight_zero_point"):
        update_offload_parameter(module, "weight_zero_point", zero_point)


def ct_quantize_and_compress(model, case: dict, record: Optional[dict] = None):
    """apply_quantization_config -> observe -> FROZEN -> ModelCompressor.compress_model.  `record`
    receives, per module, the weight_zero_point present when compression starts (apply_quantization_config
    registers one below status COMPRESSED even for symmetric schemes; CT's quantize adds it to x / s)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config

    apply_quantization_config(model, ct_initial_config(case), show_progress=False)
    for name in quantized_module_names(case):
        m = getattr(model, name)
        ct_observe_weight(m)
        m.quantization_status = QuantizationStatus.FROZEN
        if record is not None:
            zp = getattr(m, "weight_zero_point", None)
            record[name] = None if zp is None else {
                "dtype": dtype_name(zp), "shape": list(zp.shape),
                "all_positive_zero": bool((zp.float() == 0).all() and not torch.signbit(zp.float()).any())}
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    return compressor


def ct_quantize_to_dir(case: dict, float_sd: Dict[str, torch.Tensor], out_dir: str, record: Optional[dict] = None):
    """The library's own checkpoint (model.safetensors + config.json) in out_dir.
    Returns (compressed model, compressor)."""
    model = build_model(case)
    model.load_state_dict(float_sd, strict=True)
    compressor = ct_quantize_and_compress(model, case, record)
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)
    return model, compressor


def ct_decompress_in_memory(model, compressor, case: dict) -> Dict[str, torch.Tensor]:
    compressor.decompress_model(model)
    return {f"{n}.weight": getattr(model, n).weight.detach().clone().contiguous() for n in quantized_module_names(case)}


def ct_model_lifecycle(case: dict, sd: Dict[str, torch.Tensor], qconfig_dict: dict):
    """CT's load lifecycle (what transformers' CompressedTensorsHfQuantizer runs): meta model ->
    apply_quantization_config(config) -> ModelCompressor.compress_model (creates the compressed
    parameters on meta) -> load_state_dict(strict=True, assign=True) -> ModelCompressor.decompress_model.
    Returns ({<m>.weight: dequantized}, error text or None)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    qconfig = QuantizationConfig.model_validate(qconfig_dict)
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


def ct_model_free(model_dir: str, sd: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """CT's model-free dequantizer (entrypoints/convert CompressedTensorsDequantizer(dir, dtype).validate)."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    return CompressedTensorsDequantizer(model_dir, dtype=dtype).validate({k: v.clone() for k, v in sd.items()})


def transformers_load(model_dir: str, **kwargs):
    _, model_cls = tiny_classes()
    return model_cls.from_pretrained(model_dir, output_loading_info=True, **kwargs)


def ct_transformers(case: dict, model_dir: str):
    """transformers from_pretrained (CompressedTensorsHfQuantizer, dequantize=False), then
    decompress_model.  Returns (dequantized, loading problems)."""
    model, info = transformers_load(model_dir)
    problems = loading_info_problems(info)
    model.hf_quantizer.compressor.decompress_model(model)
    return {f"{n}.weight": getattr(model, n).weight.detach().clone().contiguous()
            for n in quantized_module_names(case)}, problems


def ct_transformers_dequantize(case: dict, model_dir: str):
    """transformers from_pretrained(quantization_config=CompressedTensorsConfig(dequantize=True))."""
    from transformers import CompressedTensorsConfig

    model, info = transformers_load(model_dir, quantization_config=CompressedTensorsConfig(dequantize=True))
    problems = loading_info_problems(info)
    return {f"{n}.weight": getattr(model, n).weight.detach().clone().contiguous()
            for n in quantized_module_names(case)}, problems


PATHS = ("ct_model_lifecycle", "ct_model_free_dequantizer", "transformers_from_pretrained",
         "transformers_from_pretrained_dequantize")


def ct_paths(case: dict, sd: Dict[str, torch.Tensor], qconfig_dict: dict, model_dir: str, only=None):
    """Every decompression path, run on `sd` (+ `model_dir` holding config.json + model.safetensors).
    Returns {path: ({<m>.weight: tensor} or None, [problems])}."""
    D = DTYPES[case["dtype"]]
    qkeys = set(quantized_weight_keys(case))
    out = {}
    for p in PATHS:
        if only is not None and p not in only:
            continue
        try:
            with quiet_stderr():
                if p == "ct_model_lifecycle":
                    res, err = ct_model_lifecycle(case, sd, qconfig_dict)
                    probs = [err] if err else []
                elif p == "ct_model_free_dequantizer":
                    r = ct_model_free(model_dir, sd, D)
                    extra = sorted(k for k in r if k not in qkeys and k not in sd)
                    probs = [f"unexpected tensors {extra}"] if extra else []
                    res = {k: v for k, v in r.items() if k in qkeys}
                elif p == "transformers_from_pretrained":
                    res, probs = ct_transformers(case, model_dir)
                else:
                    res, probs = ct_transformers_dequantize(case, model_dir)
        except Exception as e:  # noqa: BLE001
            res, probs = None, [f"raised {type(e).__name__}: {str(e).strip()[:400]}"]
        out[p] = (res, probs)
    return out


# --------------------------------------------------------------------------------------
# Independent restatements of CT's FP8 arithmetic (checked bit for bit by the generator)
# --------------------------------------------------------------------------------------

# significant bits (with the implicit one) and minimum normal exponent
_FMT = {"bfloat16": (8, -126), "float16": (11, -14), "float32": (24, -126), "e4m3": (4, -6)}


def np_rne(x, fmt: str) -> np.ndarray:
    """Round float64 values to nearest, ties to even, in `fmt` (subnormals included, no overflow):
    x / quantum is exact in f64 (a power-of-two scaling), np.rint rounds half to even."""
    p, emin = _FMT[fmt]
    x = np.asarray(x, dtype=np.float64)
    _, e = np.frexp(x)  # |x| = m * 2**e, 0.5 <= m < 1, so floor(log2|x|) = e - 1
    ex = np.where(x == 0, emin, np.maximum(e - 1, emin))
    quantum = np.ldexp(1.0, (ex - p + 1).astype(np.int64))
    return np.rint(x / quantum) * quantum


def np_eps(dtype: str) -> float:
    return {"bfloat16": 2.0**-7, "float16": 2.0**-10, "float32": 2.0**-23}[dtype]


def scale_index(shape, case: dict):
    """For each element (i, j) of a weight of `shape`, the (row, col) of its scale."""
    rows, cols = shape
    i = np.arange(rows)[:, None] + np.zeros((1, cols), dtype=np.int64)
    j = np.zeros((rows, 1), dtype=np.int64) + np.arange(cols)[None, :]
    s = case["strategy"]
    if s == "tensor":
        return 0 * i, 0 * j
    if s == "channel":
        return i, 0 * j
    if s == "group":
        return i, j // case["group_size"]
    if s == "block":
        bh, bw = case["block_structure"]
        return i // bh, j // bw
    raise ValueError(s)


def scale_shape(shape, case: dict):
    rows, cols = shape
    s = case["strategy"]
    if s == "tensor":
        return (1,)
    if s == "channel":
        return (rows, 1)
    if s == "group":
        return (rows, cols // case["group_size"])
    bh, bw = case["block_structure"]
    return (-(-rows // bh), -(-cols // bw))


def np_formula(w: torch.Tensor, case: dict) -> dict:
    """numpy restatement, element by element, in exact float64 arithmetic with explicit roundings.

    D = S = the model dtype (the weight's and scale's dtype):
      amax  = max |x| over the scale's elements (tensor / row / group / block; block padding adds
              zeros, which never change it) -- exact;
      s     = RNE_S(amax / 448); s = eps(S) where that is 0;
      t     = RNE_D(x / s) + 0.0            (the quotient is rounded to D first; CT then adds the zero
                                             point, +0.0 in D, which turns a -0.0 quotient into +0.0)
      q     = RNE_e4m3(clamp(t, -448, 448))  (a negative t that rounds to zero gives -0.0, code 0x80)
      deq   = RNE_D(f64(q) * f64(s))        (the product is exact in f64)
    Returns dict(scale, q, deq, t, q_without_rne_d) as float64 arrays (scale in scale_shape)."""
    D = case["dtype"]
    x = w.double().numpy()
    ri, ci = scale_index(x.shape, case)
    sshape = scale_shape(x.shape, case)
    grid = (1, 1) if case["strategy"] == "tensor" else sshape
    amax = np.zeros(grid)
    np.maximum.at(amax, (ri, ci), np.abs(x))
    scale = np_rne(amax / 448.0, D)
    scale = np.where(scale == 0, np_eps(D), scale)
    s_el = scale[ri, ci]
    t = np_rne(x / s_el, D) + 0.0
    q = np_rne(np.clip(t, -448.0, 448.0), "e4m3")
    q_direct = np_rne(np.clip(x / s_el + 0.0, -448.0, 448.0), "e4m3")
    deq = np_rne(q * s_el, D)
    return dict(scale=scale.reshape(sshape), q=q, deq=deq, t=t, q_without_rne_d=q_direct)


def torch_quantize(w: torch.Tensor, case: dict):
    """torch restatement (the ops CT's CPU path runs, written out): returns (scale, q)."""
    D = w.dtype
    rows, cols = w.shape
    s = case["strategy"]
    if s == "block":
        bh, bw = case["block_structure"]
        pr, pc = (-rows) % bh, (-cols) % bw
        wp = torch.nn.functional.pad(w, (0, pc, 0, pr))
        g = wp.reshape((rows + pr) // bh, bh, (cols + pc) // bw, bw).transpose(1, 2)  # [R, C, bh, bw]
        amax = g.abs().amax(dim=(-2, -1))
    elif s == "group":
        g = w.reshape(rows, cols // case["group_size"], case["group_size"])
        amax = g.abs().amax(-1)
    elif s == "channel":
        amax = w.abs().amax(-1, keepdim=True)
    else:
        amax = w.abs().amax().reshape(1)
    scale = amax / torch.tensor(FP8_MAX, dtype=D)  # in D: f32 division, one rounding to D
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(D).eps, dtype=D), scale)
    if s == "block":
        t = g / scale[:, :, None, None]
        t = t.transpose(1, 2).reshape(rows + pr, cols + pc)[:rows, :cols]
    elif s == "group":
        t = (g / scale[:, :, None]).reshape(rows, cols)
    else:
        t = w / scale
    # CT adds the symmetric zero point (registered while quantizing, all +0.0) to the quotient: -0.0 -> +0.0
    t = t + torch.zeros((), dtype=D)
    q = t.clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return scale, q


def torch_dequantize(q: torch.Tensor, scale: torch.Tensor, case: dict, out_dtype: torch.dtype) -> torch.Tensor:
    """(q.to(S) * s).to(D), S = the scale's dtype; block: on the zero-padded grid, cropped."""
    S = scale.dtype
    rows, cols = q.shape
    s = case["strategy"]
    if s == "block":
        bh, bw = case["block_structure"]
        pr, pc = (-rows) % bh, (-cols) % bw
        qp = torch.nn.functional.pad(q.to(S), (0, pc, 0, pr))
        g = qp.reshape((rows + pr) // bh, bh, (cols + pc) // bw, bw)
        y = (g * scale[:, None, :, None]).reshape(rows + pr, cols + pc)[:rows, :cols]
    elif s == "group":
        G = case["group_size"]
        y = (q.to(S).reshape(rows, cols // G, G) * scale[:, :, None]).reshape(rows, cols)
    else:
        y = q.to(S) * scale
    return y.to(out_dtype).contiguous()


def to_f64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def np_same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values and equal signs (so -0.0 != +0.0)."""
    return a.shape == b.shape and np.array_equal(a, b) and np.array_equal(np.signbit(a), np.signbit(b))


def write_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")

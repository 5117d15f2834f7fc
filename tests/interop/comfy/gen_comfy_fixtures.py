#!/usr/bin/env python3
"""Generate golden ComfyUI `comfy_quant` per-tensor FP8 and `int8_tensorwise` fixtures (comfy-kitchen 0.2.40) for ckptkit.

Run inside the pinned venv (tests/interop/setup_venv.sh):

    tests/interop/setup_venv.sh                     # default dir: target/interop-venv
    target/interop-venv/bin/python tests/interop/comfy/gen_comfy_fixtures.py \\
        --out tests/fixtures/comfy --seed 20261202

For every case it writes <out>/<case>/{float,quantized,dequantized}.safetensors, legacy.safetensors
(FP8 cases only) and case.json, plus <out>/index.json and (unless --no-probes) <out>/probes.json.
It aborts (exit 1) if a fixture is not self-consistent: the saved files differ from the in-memory
tensors, the library's dequantization (or, for int8, quantization) entry points disagree, or the
independent re-statement of the op order (FP8: spec/layouts.md §5.2, comfy_models.formula_*; int8:
spec/layouts.md §5.3, comfy_models.int8_formula_*) does not reproduce the library's
scale, codes and dequantized weights bit for bit.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import traceback
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_models as cm  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "comfy")
DEFAULT_SEED = 20261202

EXPECTED_VERSIONS = {"comfy-kitchen": cm.CK_VERSION, "torch": cm.TORCH_VERSION}

ENTRY_POINTS = {
    "quantize": 'comfy_kitchen.tensor.QuantizedTensor.from_float(w, "TensorCoreFP8Layout", scale="recalculate", '
                "dtype=torch.float8_e4m3fn|torch.float8_e5m2) -> TensorCoreFP8Layout.quantize -> "
                "comfy_kitchen.quantize_per_tensor_fp8 (eager backend)",
    "state_dict": 'QuantizedTensor.state_dict("{m}.weight") -> {m}.weight, {m}.weight_scale',
    "dequantize": 'QuantizedTensor(q, "TensorCoreFP8Layout", TensorCoreFP8Layout.Params(scale, orig_dtype=D, '
                  "orig_shape)).dequantize() -> comfy_kitchen.dequantize_per_tensor_fp8(q, scale, D) (eager backend)",
    "backend_override": 'comfy_kitchen.registry.registry.use_backend("eager")',
}

INT8_ENTRY_POINTS = {
    "quantize": 'comfy_kitchen.tensor.QuantizedTensor.from_float(w, "TensorWiseINT8Layout", scale="recalculate", '
                "per_channel=False|True) (stochastic_rounding=0, convrot=False: the defaults) -> "
                "TensorWiseINT8Layout.quantize -> registry quantize_int8_tensorwise(x, scale, stochastic_rounding) | "
                "quantize_int8_rowwise(x, stochastic_rounding) (eager backend)",
    "quantize_cross_check": "comfy_kitchen.quantize_int8_tensorwise(w) | comfy_kitchen.quantize_int8_rowwise(w)",
    "state_dict": 'QuantizedTensor.state_dict("{m}.weight") -> {m}.weight, {m}.weight_scale',
    "dequantize": 'QuantizedTensor(q, "TensorWiseINT8Layout", TensorWiseINT8Layout.Params(scale, orig_dtype=D, '
                  "orig_shape)).dequantize() -> torch.ops.comfy_kitchen.dequantize_int8_simple_dtype(q, scale, code(D)) "
                  "(eager backend)",
    "dequantize_cross_check": "comfy_kitchen.dequantize_int8_simple(q, scale).to(D)",
    "backend_override": 'comfy_kitchen.registry.registry.use_backend("eager")',
}


def versions() -> dict:
    v = {"python": sys.version.split()[0]}
    for pkg in ("torch", "comfy-kitchen", "safetensors", "numpy"):
        v[pkg] = importlib.metadata.version(pkg)
    v["torch_reported"] = torch.__version__
    v["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return v


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def fail(msg: str) -> None:
    print(f"FATAL: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def check_equal_dicts(what: str, ours: dict, theirs: dict) -> None:
    if set(ours) != set(theirs):
        fail(f"{what}: key sets differ: {sorted(set(ours) ^ set(theirs))}")
    for k in theirs:
        d = cm.same_tensor(ours[k], theirs[k])
        if d:
            fail(f"{what}: {k}: {d}")


def file_table(path: str) -> dict:
    hdr = cm.file_header(path)
    meta = hdr.pop("__metadata__", None)
    order = sorted(hdr, key=lambda k: (hdr[k]["data_offsets"][0], k))
    return {
        "metadata": meta,
        "tensors_in_file_order": [
            {"name": k, "dtype": hdr[k]["dtype"], "shape": hdr[k]["shape"], "data_offsets": hdr[k]["data_offsets"]}
            for k in order
        ],
    }


# --------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------


def formula_check(case: dict, float_sd: dict, comfy_sd: dict, deq: dict) -> dict:
    """The independent re-statement must give the library's scale, codes and dequantization."""
    fmt = case["format"]
    D = cm.DTYPES[case["dtype"]]
    stats = {"modules": 0, "elements": 0, "clamped": 0, "ties": 0, "codes": {}}
    totals = {"zero": 0, "subnormal": 0, "max_magnitude": 0, "nan": 0, "negative": 0}
    for m in cm.quantized_module_names(case):
        x = float_sd[f"{m}.weight"]
        s_ref, codes_ref, st = cm.formula_quantize(x, fmt)
        s_lib = comfy_sd[f"{m}.weight_scale"]
        d = cm.same_tensor(s_ref, s_lib)
        if d:
            fail(f"{case['name']}: {m}: weight_scale != f32(rne_D(amax/max_T)): {d}")
        q_lib = comfy_sd[f"{m}.weight"]
        b_lib = cm.code_bytes(q_lib)
        nan_ref = cm.fp8_is_nan_code(fmt, codes_ref)
        nan_lib = cm.fp8_is_nan_code(fmt, b_lib)
        if not np.array_equal(nan_ref, nan_lib) or not np.array_equal(codes_ref[~nan_ref], b_lib[~nan_lib]):
            bad = np.argwhere((codes_ref != b_lib) & ~(nan_ref & nan_lib))
            i = tuple(int(v) for v in bad[0])
            fail(f"{case['name']}: {m}: codes != rne_T(clamp(rne_D(x*rne_D(1/s)))): {len(bad)} differ, "
                 f"first at {list(i)}: formula 0x{codes_ref[i]:02x}, library 0x{b_lib[i]:02x}")
        dq_ref = cm.formula_dequantize(b_lib, s_lib, D, fmt)
        d = cm.same_tensor(dq_ref, deq[f"{m}.weight"])
        if d:
            fail(f"{case['name']}: {m}: dequantized != rne_O(O(q)*rne_O(s)): {d}")
        cs = cm.code_stats(fmt, b_lib)
        stats["codes"][m] = cs
        for k in totals:
            totals[k] += cs[k]
        stats["modules"] += 1
        stats["elements"] += st["elements"]
        stats["clamped"] += st["clamped"]
        stats["ties"] += st["ties"]
    stats["code_totals"] = totals
    return stats


def generate_case(out_dir: str, base_seed: int, recipe: dict, vers: dict) -> dict:
    if cm.is_int8(recipe):
        return generate_int8_case(out_dir, base_seed, recipe, vers)
    case = dict(recipe)
    name = case["name"]
    fmt = case["format"]
    D = cm.DTYPES[case["dtype"]]
    case["base_seed"] = base_seed
    case["seed"] = cm.case_seed(base_seed, name)
    cdir = os.path.join(out_dir, name)
    os.makedirs(cdir, exist_ok=True)
    qnames = cm.quantized_module_names(case)

    # 1. float state dict
    float_sd = cm.float_state_dict(case)
    fpath = os.path.join(cdir, "float.safetensors")
    cm.save_file(float_sd, fpath)
    check_equal_dicts(f"{name}: float.safetensors", cm.load_tensors(fpath), float_sd)
    float_sd = cm.load_tensors(fpath)

    # 2. the library: quantize each quantized Linear's weight, dequantize it back
    qts, deq = {}, {}
    for m in qnames:
        w = float_sd[f"{m}.weight"]
        qt = cm.library_quantize(w, fmt)
        if qt._qdata.dtype != cm.FORMATS[fmt] or tuple(qt._qdata.shape) != tuple(w.shape):
            fail(f"{name}: {m}: library codes are {qt._qdata.dtype} {tuple(qt._qdata.shape)}")
        s = qt._params.scale
        if s.dtype != torch.float32 or s.dim() != 0:
            fail(f"{name}: {m}: library scale is {s.dtype} shape {tuple(s.shape)}, expected F32 0-dim")
        with cm.eager_backend():
            dq_mem = qt.dequantize()
        q, s = qt.state_dict("x")["x"], qt.state_dict("x")["x_scale"]
        dq_load = cm.library_dequantize(q.clone(), s.clone(), D)
        dq_fn = cm.library_dequantize_function(q.clone(), s.clone(), D)
        for what, t in (("QuantizedTensor(loaded params).dequantize()", dq_load),
                        ("comfy_kitchen.dequantize_per_tensor_fp8", dq_fn)):
            d = cm.same_tensor(t, dq_mem)
            if d:
                fail(f"{name}: {m}: {what} vs from_float(...).dequantize(): {d}")
        if dq_mem.dtype != D:
            fail(f"{name}: {m}: dequantized dtype {dq_mem.dtype} != {D}")
        qts[m] = qt
        deq[f"{m}.weight"] = dq_mem.detach().clone().contiguous()

    # 3. files: comfy_quant form, dequantized, legacy
    comfy_sd = cm.comfy_state_dict(case, float_sd, qts)
    qpath = os.path.join(cdir, "quantized.safetensors")
    cm.save_file(comfy_sd, qpath)
    check_equal_dicts(f"{name}: quantized.safetensors", cm.load_tensors(qpath), comfy_sd)
    for m in qnames:
        t = comfy_sd[f"{m}.comfy_quant"]
        if cm.decode_comfy_quant(t) != {"format": fmt} or bytes(t.tolist()) != json.dumps({"format": fmt}).encode():
            fail(f"{name}: {m}: comfy_quant tensor does not decode to {{'format': {fmt!r}}}")
    dpath = os.path.join(cdir, "dequantized.safetensors")
    cm.save_file(deq, dpath)
    check_equal_dicts(f"{name}: dequantized.safetensors", cm.load_tensors(dpath), deq)
    legacy_sd = cm.legacy_state_dict(case, comfy_sd)
    lpath = os.path.join(cdir, "legacy.safetensors")
    cm.save_file(legacy_sd, lpath)
    check_equal_dicts(f"{name}: legacy.safetensors", cm.load_tensors(lpath), legacy_sd)

    # 4. self-consistency: the formula, and the plain tensors are the float ones
    formula = formula_check(case, float_sd, comfy_sd, deq)
    plain = {k: v for k, v in comfy_sd.items() if k in float_sd and k[: -len(".weight")] not in qnames}
    check_equal_dicts(f"{name}: plain tensors vs float", plain, {k: float_sd[k] for k in plain})

    # 5. case.json
    case["modules"] = module_table(case)
    case["quantized_modules"] = qnames
    case["skipped_modules"] = cm.skipped_module_names(case)
    case["comfy_quant_json"] = json.dumps({"format": fmt})
    case["codes_dtype"] = cm.ST_DTYPE[fmt]
    case["dequantized_dtype"] = cm.dtype_name(next(iter(deq.values())))
    case["scales"] = {
        m: {"value": repr(float(comfy_sd[f"{m}.weight_scale"])),
            "f32_bits": cm.f32_bits(float(comfy_sd[f"{m}.weight_scale"])),
            "amax": repr(float(float_sd[f"{m}.weight"].float().abs().max())),
            "inv_overflows": cm.inv_overflows(comfy_sd[f"{m}.weight_scale"], D)}
        for m in qnames
    }
    # layers where rne_D(1/s) is infinite: the library saturates every code to ±max (f16 + small amax)
    case["inv_overflow_modules"] = [m for m in qnames if case["scales"][m]["inv_overflows"]]
    case["files"] = {}
    for fn in ("float.safetensors", "quantized.safetensors", "dequantized.safetensors", "legacy.safetensors"):
        p = os.path.join(cdir, fn)
        case["files"][fn] = {"sha256": cm.sha256_file(p), "layout": file_table(p)}
    case["library_entry_points"] = ENTRY_POINTS
    case["backend"] = cm.backend_report()
    case["formula_check"] = "ok"
    case["formula_stats"] = formula
    case["versions"] = vers
    cm.write_json(case, os.path.join(cdir, "case.json"))
    return case


# --------------------------------------------------------------------------------------
# one int8_tensorwise case (tensorwise: 0-dim scale; rowwise: [out, 1] scale)
# --------------------------------------------------------------------------------------


def module_table(case: dict) -> list:
    return [
        {"name": s["name"], "kind": s["kind"], "weight_shape": s["shape"], "has_bias": s["bias"],
         "quantized": s["quantized"],
         "why_plain": None if s["quantized"] else {
             "Norm": "1-D: never quantized", "Conv2d": "4-D: ComfyUI quantizes Linear only",
             "Linear": "excluded layer (ckptkit --exclude lin_skip)"}[s["kind"]]}
        for s in case["specs"]
    ]


def int8_formula_check(case: dict, float_sd: dict, comfy_sd: dict, deq: dict) -> dict:
    """The independent re-statement (reference §2.2) must give the library's scale, codes and dequantization."""
    D = cm.DTYPES[case["dtype"]]
    per_row = bool(case["per_row"])
    stats = {"modules": 0, "elements": 0, "ties": 0, "clipped_to_127": 0, "clipped_to_minus_128": 0,
             "abs_t_above_127": 0, "scale_prime_below_scale": 0, "scale_prime_zero_to_tiny": 0,
             "dequant_single_rounding_would_differ": 0, "per_module": {}}
    totals = {"minus_128": 0, "plus_127": 0, "minus_127": 0, "zero": 0, "negative": 0}
    for m in cm.quantized_module_names(case):
        x = float_sd[f"{m}.weight"]
        s_ref, _sp, codes_ref, undefined, st = cm.int8_formula_quantize(x, per_row)
        if undefined.any():
            fail(f"{case['name']}: {m}: {int(undefined.sum())} NaN quotients (no defined int8 code)")
        s_lib = comfy_sd[f"{m}.weight_scale"]
        d = cm.same_tensor(s_ref, s_lib)
        if d:
            fail(f"{case['name']}: {m}: weight_scale != max(f32(amax)/127, 1e-30): {d}")
        q_lib = comfy_sd[f"{m}.weight"].numpy()
        if not np.array_equal(codes_ref, q_lib):
            bad = np.argwhere(codes_ref != q_lib)
            i = tuple(int(v) for v in bad[0])
            fail(f"{case['name']}: {m}: codes != clamp(rne(rne_D(x/s')), -128, 127): {len(bad)} differ, "
                 f"first at {list(i)}: formula {int(codes_ref[i])}, library {int(q_lib[i])}")
        dq_ref = cm.int8_formula_dequantize(q_lib, s_lib, D)
        d = cm.same_tensor(dq_ref, deq[f"{m}.weight"])
        if d:
            fail(f"{case['name']}: {m}: dequantized != rne_O(rne_f32(f32(q)*s)): {d}")
        cs = cm.int8_code_stats(q_lib)
        cs["ties"] = st["ties"]
        cs["clipped_to_127"] = st["clipped_to_127"]
        cs["abs_t_above_127"] = st["abs_t_above_127"]
        cs["scale_prime_below_scale"] = st["scale_prime_below_scale"]
        cs["dequant_single_rounding_would_differ"] = cm.int8_single_rounding_differs(q_lib, s_lib, D)
        stats["per_module"][m] = cs
        for k in totals:
            totals[k] += cs[k]
        stats["modules"] += 1
        stats["dequant_single_rounding_would_differ"] += cs["dequant_single_rounding_would_differ"]
        for k in ("elements", "ties", "clipped_to_127", "clipped_to_minus_128", "abs_t_above_127",
                  "scale_prime_below_scale", "scale_prime_zero_to_tiny"):
            stats[k] += st[k]
    stats["code_totals"] = totals
    return stats


def int8_scale_record(m: str, w: torch.Tensor, s: torch.Tensor, D: torch.dtype, per_row: bool) -> dict:
    sf = s.reshape(-1).tolist()
    wf = w.float()
    amax = wf.abs().amax(dim=-1).tolist() if per_row else [float(wf.abs().max())]
    sp = s.to(D).float()
    return {
        "shape": list(s.shape),
        "dtype": cm.dtype_name(s),
        "value": [repr(float(v)) for v in sf] if per_row else repr(sf[0]),
        "f32_bits": [cm.f32_bits(v) for v in sf] if per_row else cm.f32_bits(sf[0]),
        "amax": [repr(float(v)) for v in amax] if per_row else repr(amax[0]),
        "scale_in_D": [repr(float(v)) for v in sp.reshape(-1).tolist()] if per_row else repr(float(sp)),
        "floor_1e-30_rows" if per_row else "floor_1e-30": (
            [i for i, v in enumerate(sf) if v == float(np.float32(1e-30))] if per_row
            else sf[0] == float(np.float32(1e-30))),
    }


def generate_int8_case(out_dir: str, base_seed: int, recipe: dict, vers: dict) -> dict:
    case = dict(recipe)
    name = case["name"]
    D = cm.DTYPES[case["dtype"]]
    per_row = bool(case["per_row"])
    case["base_seed"] = base_seed
    case["seed"] = cm.case_seed(base_seed, name)
    cdir = os.path.join(out_dir, name)
    os.makedirs(cdir, exist_ok=True)
    qnames = cm.quantized_module_names(case)

    # 1. float state dict
    float_sd = cm.float_state_dict(case)
    fpath = os.path.join(cdir, "float.safetensors")
    cm.save_file(float_sd, fpath)
    check_equal_dicts(f"{name}: float.safetensors", cm.load_tensors(fpath), float_sd)
    float_sd = cm.load_tensors(fpath)
    for spec in case["specs"]:
        if spec.get("zero_row") is not None:
            wz = float_sd[f"{spec['name']}.weight"]
            if not bool((wz[spec["zero_row"]] == 0).all()) or bool(torch.signbit(wz[spec["zero_row"]]).any()):
                fail(f"{name}: {spec['name']}: row {spec['zero_row']} is not all +0")

    # 2. the library: quantize each quantized Linear's weight, dequantize it back
    qts, deq = {}, {}
    want_scale_shape = None
    for m in qnames:
        w = float_sd[f"{m}.weight"]
        qt = cm.library_quantize_int8(w, per_row)
        if qt._qdata.dtype != torch.int8 or tuple(qt._qdata.shape) != tuple(w.shape):
            fail(f"{name}: {m}: library codes are {qt._qdata.dtype} {tuple(qt._qdata.shape)}")
        s = qt._params.scale
        want_scale_shape = (w.shape[0], 1) if per_row else ()
        if s.dtype != torch.float32 or tuple(s.shape) != want_scale_shape:
            fail(f"{name}: {m}: library scale is {s.dtype} shape {tuple(s.shape)}, expected F32 {want_scale_shape}")
        q_fn, s_fn = cm.library_quantize_int8_function(w, per_row)
        for what, a, b in (("codes", q_fn, qt._qdata), ("scale", s_fn, s)):
            d = cm.same_tensor(a, b)
            if d:
                fail(f"{name}: {m}: comfy_kitchen.quantize_int8_{'rowwise' if per_row else 'tensorwise'} {what} "
                     f"vs from_float: {d}")
        with cm.eager_backend():
            dq_mem = qt.dequantize()
        q, s = qt.state_dict("x")["x"], qt.state_dict("x")["x_scale"]
        dq_load = cm.library_dequantize_int8(q.clone(), s.clone(), D)
        dq_fn = cm.library_dequantize_int8_function(q.clone(), s.clone(), D)
        for what, t in (("QuantizedTensor(loaded params).dequantize()", dq_load),
                        ("comfy_kitchen.dequantize_int8_simple(q, s).to(D)", dq_fn)):
            d = cm.same_tensor(t, dq_mem)
            if d:
                fail(f"{name}: {m}: {what} vs from_float(...).dequantize(): {d}")
        if dq_mem.dtype != D:
            fail(f"{name}: {m}: dequantized dtype {dq_mem.dtype} != {D}")
        qts[m] = qt
        deq[f"{m}.weight"] = dq_mem.detach().clone().contiguous()

    # 3. files: comfy_quant form, dequantized (no legacy form: legacy scaled fp8 is FP8 only)
    comfy_sd = cm.comfy_state_dict(case, float_sd, qts)
    qpath = os.path.join(cdir, "quantized.safetensors")
    cm.save_file(comfy_sd, qpath)
    check_equal_dicts(f"{name}: quantized.safetensors", cm.load_tensors(qpath), comfy_sd)
    fmt = case["format"]
    for m in qnames:
        t = comfy_sd[f"{m}.comfy_quant"]
        if cm.decode_comfy_quant(t) != {"format": fmt} or bytes(t.tolist()) != json.dumps({"format": fmt}).encode():
            fail(f"{name}: {m}: comfy_quant tensor does not decode to {{'format': {fmt!r}}}")
    dpath = os.path.join(cdir, "dequantized.safetensors")
    cm.save_file(deq, dpath)
    check_equal_dicts(f"{name}: dequantized.safetensors", cm.load_tensors(dpath), deq)

    # 4. self-consistency: the formula, and the plain tensors are the float ones
    formula = int8_formula_check(case, float_sd, comfy_sd, deq)
    plain = {k: v for k, v in comfy_sd.items() if k in float_sd and k[: -len(".weight")] not in qnames}
    check_equal_dicts(f"{name}: plain tensors vs float", plain, {k: float_sd[k] for k in plain})

    # 5. case.json
    case["modules"] = module_table(case)
    case["quantized_modules"] = qnames
    case["skipped_modules"] = cm.skipped_module_names(case)
    case["comfy_quant_json"] = json.dumps({"format": fmt})
    case["codes_dtype"] = cm.ST_DTYPE[fmt]
    case["dequantized_dtype"] = cm.dtype_name(next(iter(deq.values())))
    case["scale_shape"] = "[out, 1]" if per_row else "[]"
    case["zero_rows"] = {s["name"]: [s["zero_row"]] for s in case["specs"] if s.get("zero_row") is not None}
    case["scales"] = {m: int8_scale_record(m, float_sd[f"{m}.weight"], comfy_sd[f"{m}.weight_scale"], D, per_row)
                      for m in qnames}
    case["codes"] = {
        m: {"has_minus_128": formula["per_module"][m]["minus_128"] > 0,
            "minus_128": formula["per_module"][m]["minus_128"],
            "plus_127": formula["per_module"][m]["plus_127"],
            "clipped_to_127": formula["per_module"][m]["clipped_to_127"]}
        for m in qnames
    }
    case["minus_128_modules"] = [m for m in qnames if case["codes"][m]["has_minus_128"]]
    # kept for a uniform case.json schema with the FP8 cases: int8 takes no reciprocal, so always empty
    case["inv_overflow_modules"] = []
    case["files"] = {}
    for fn in ("float.safetensors", "quantized.safetensors", "dequantized.safetensors"):
        p = os.path.join(cdir, fn)
        case["files"][fn] = {"sha256": cm.sha256_file(p), "layout": file_table(p)}
    case["library_entry_points"] = INT8_ENTRY_POINTS
    case["backend"] = cm.int8_backend_report()
    case["formula_check"] = "ok"
    case["formula_stats"] = formula
    case["versions"] = vers
    cm.write_json(case, os.path.join(cdir, "case.json"))
    return case


# --------------------------------------------------------------------------------------
# probes: what comfy-kitchen 0.2.40 does in corner cases (probes.json)
# --------------------------------------------------------------------------------------


def probe_one(label: str, w: torch.Tensor, fmt: str, scale=None) -> dict:
    D = w.dtype
    try:
        qt = cm.library_quantize(w, fmt) if scale is None else cm.library_quantize_with_scale(w, fmt, scale)
    except Exception as e:  # noqa: BLE001
        return {"probe": label, "dtype": cm.dtype_name(w), "format": fmt, "error": error_text(e)}
    q, s = qt._qdata, qt._params.scale
    b = cm.code_bytes(q).reshape(-1)
    with cm.eager_backend():
        dq = qt.dequantize()
    dqf = dq.float().reshape(-1)
    res = {
        "probe": label,
        "dtype": cm.dtype_name(w),
        "format": fmt,
        "scale_arg": "recalculate" if scale is None else repr(float(scale)),
        "input": [repr(v) for v in w.float().reshape(-1).tolist()] if w.numel() <= 8 else None,
        "scale": repr(float(s)),
        "scale_f32_bits": cm.f32_bits(float(s)),
        "scale_dtype": cm.dtype_name(s),
        "code_bytes_set": sorted("0x%02x" % v for v in set(b.tolist())),
        "codes": ["0x%02x" % v for v in b.tolist()] if b.size <= 8 else None,
        "codes_nan": int(cm.fp8_is_nan_code(fmt, b).sum()),
        "elements": int(b.size),
        "dequantized_dtype": cm.dtype_name(dq),
        "dequantized_all_nan": bool(torch.isnan(dqf).all()),
        "dequantized_nan_count": int(torch.isnan(dqf).sum()),
        "dequantized": [repr(v) for v in dqf.tolist()] if dqf.numel() <= 8 else None,
    }
    # does the independent formula predict it (NaN-ness compared, NaN code sign ignored)?
    try:
        s_ref, codes_ref, _ = cm.formula_quantize(w, fmt) if scale is None else (None, None, None)
        if s_ref is not None:
            nan_ref = cm.fp8_is_nan_code(fmt, codes_ref.reshape(-1))
            nan_lib = cm.fp8_is_nan_code(fmt, b)
            same_scale = (np.isnan(float(s_ref)) and np.isnan(float(s))) or cm.same_tensor(s_ref, s) is None
            res["formula_agrees"] = bool(same_scale and np.array_equal(nan_ref, nan_lib)
                                         and np.array_equal(codes_ref.reshape(-1)[~nan_ref], b[~nan_lib]))
    except Exception as e:  # noqa: BLE001
        res["formula_agrees"] = error_text(e)
    return {k: v for k, v in res.items() if v is not None}


def run_probes(base_seed: int) -> list:
    probes = []
    g = torch.Generator().manual_seed(cm.case_seed(base_seed, "probes"))
    base = torch.randn(4, 8, generator=g) * 0.1
    for dtype in ("bfloat16", "float16", "float32"):
        D = cm.DTYPES[dtype]
        for fmt in cm.FORMATS:
            probes.append(probe_one("all-zero weight [4, 8]", torch.zeros(4, 8, dtype=D), fmt))
    for dtype in ("bfloat16", "float16", "float32"):
        D = cm.DTYPES[dtype]
        for fmt in cm.FORMATS:
            w = torch.tensor([[1.0, -2.0, float("inf"), 0.5, float("-inf"), 0.0, -0.25, 3.0]], dtype=D)
            probes.append(probe_one("weight with +inf and -inf (recalculated scale)", w, fmt))
            w = torch.tensor([[1.0, -2.0, float("nan"), 0.5, -1.0, 0.0, -0.25, 3.0]], dtype=D)
            probes.append(probe_one("weight with NaN (recalculated scale)", w, fmt))
            w = torch.tensor([[1.0, -2.0, float("inf"), float("nan"), float("-inf"), 0.0, -0.25, 3.0]], dtype=D)
            probes.append(probe_one("weight with +inf, -inf and NaN (recalculated scale)", w, fmt))
            w = torch.tensor([[1.0, -2.0, float("inf"), float("nan"), float("-inf"), 0.0, -0.25, 3.0]], dtype=D)
            probes.append(probe_one("weight with +inf, -inf and NaN, explicit scale 1/64",
                                    w, fmt, scale=torch.tensor(1.0 / 64)))
    for fmt in cm.FORMATS:
        w = (base / base.abs().max() * 1e-6).to(torch.float16)
        probes.append(probe_one("float16 weight [4, 8] with amax 1e-6 (randn scaled)", w, fmt))
        w = torch.tensor([[1e-6, -5e-7, 0.0, 2.5e-7, -1e-6, 1e-7, 6e-8, -3e-8]], dtype=torch.float16)
        probes.append(probe_one("float16 weight with amax 1e-6 (listed values, incl. 0)", w, fmt))
    return probes


def scale_class(v: float, D: torch.dtype) -> str:
    """rne_D(s) as the library sees it: 0 (then replaced by finfo(D).tiny), subnormal or normal in D, or not finite."""
    if not np.isfinite(v):
        return "not finite"
    if v == 0:
        return "zero (replaced by finfo(D).tiny)"
    return "subnormal in D" if abs(v) < torch.finfo(D).tiny else "normal in D"


def int8_probe_one(label: str, w: torch.Tensor, per_row: bool, scale=None, note: Optional[str] = None) -> dict:
    """What TensorWiseINT8Layout does with w (recalculated scale unless `scale` is given; tensorwise only)."""
    D = w.dtype
    base = {"probe": label, "dtype": cm.dtype_name(w), "format": cm.INT8_FORMAT, "per_row": per_row,
            "scale_arg": "recalculate" if scale is None else repr(float(scale))}
    if note:
        base["note"] = note
    try:
        qt = cm.library_quantize_int8(w, per_row, scale="recalculate" if scale is None else scale)
    except Exception as e:  # noqa: BLE001
        return {**base, "error": error_text(e)}
    q, s = qt._qdata, qt._params.scale
    qn = q.numpy().reshape(-1)
    with cm.eager_backend():
        dq = qt.dequantize()
    dqf = dq.float().reshape(-1)
    sl = s.reshape(-1).tolist()
    res = dict(base)
    res.update({
        "input": [repr(v) for v in w.float().reshape(-1).tolist()] if w.numel() <= 16 else None,
        "input_amax": repr(float(w.float().abs().max())),
        "scale_shape": list(s.shape),
        "scale_dtype": cm.dtype_name(s),
        "scale": [repr(v) for v in sl] if per_row else repr(sl[0]),
        "scale_f32_bits": [cm.f32_bits(v) for v in sl] if per_row else cm.f32_bits(sl[0]),
        "scale_in_D": [repr(v) for v in s.to(D).float().reshape(-1).tolist()] if per_row
        else repr(float(s.to(D).float())),
        "scale_in_D_class": sorted(set(scale_class(v, D) for v in s.to(D).float().reshape(-1).tolist())),
        "codes": [int(v) for v in qn.tolist()] if qn.size <= 16 else None,
        "code_set": sorted(set(int(v) for v in qn.tolist())),
        "code_counts": cm.int8_code_stats(qn),
        "elements": int(qn.size),
        "dequantized_dtype": cm.dtype_name(dq),
        "dequantized": [repr(v) for v in dqf.tolist()] if dqf.numel() <= 16 else None,
        "dequantized_nan_count": int(torch.isnan(dqf).sum()),
        "dequantized_all_zero": bool((dqf == 0).all()),
        "max_abs_dequant_error": None,
    })
    finite_in = torch.isfinite(w.float()).all()
    if finite_in and not torch.isnan(dqf).any():
        res["max_abs_dequant_error"] = repr(float((dqf - w.float().reshape(-1)).abs().max()))
    # does the independent formula predict it?  Elements whose quotient is NaN have no defined int8
    # value (the library casts NaN to int8); their library codes are recorded separately.
    if scale is None:
        try:
            s_ref, sp_ref, codes_ref, undefined, st = cm.int8_formula_quantize(w, per_row)
            # NaN scales: NaN-ness compared, not the NaN's sign or payload (scale_f32_bits records them)
            same_scale = bool(np.array_equal(s_ref.numpy(), s.numpy(), equal_nan=True))
            und = undefined.reshape(-1)
            res["formula_stats"] = {k: st[k] for k in ("scale_prime_zero_to_tiny", "clipped_to_127", "ties")}
            res["nan_quotient_elements"] = int(und.sum())
            if und.any():
                res["library_codes_for_nan_quotients"] = sorted(set(int(v) for v in qn[und].tolist()))
            res["formula_agrees"] = bool(same_scale and np.array_equal(codes_ref.reshape(-1)[~und], qn[~und]))
            if not same_scale or not np.array_equal(codes_ref.reshape(-1)[~und], qn[~und]):
                res["formula_codes"] = [int(v) for v in codes_ref.reshape(-1).tolist()] if qn.size <= 64 else None
            dq_ref = cm.int8_formula_dequantize(q.numpy(), s, D)
            res["formula_dequant_agrees"] = bool(np.array_equal(dq_ref.float().numpy(), dq.float().numpy(),
                                                                equal_nan=True))
        except Exception as e:  # noqa: BLE001
            res["formula_agrees"] = error_text(e)
    return {k: v for k, v in res.items() if v is not None}


def run_int8_probes(base_seed: int) -> list:
    probes = []
    g = torch.Generator().manual_seed(cm.case_seed(base_seed, "probes-int8"))
    base = torch.randn(4, 8, generator=g)
    base = base / base.abs().max()  # amax exactly 1 (f32)
    for dtype in ("bfloat16", "float16", "float32"):
        D = cm.DTYPES[dtype]
        for per_row in (False, True):
            probes.append(int8_probe_one("all-zero weight [4, 8]", torch.zeros(4, 8, dtype=D), per_row))
    for dtype in ("bfloat16", "float16", "float32"):
        D = cm.DTYPES[dtype]
        for per_row in (False, True):
            w = torch.tensor([[1.0, -2.0, float("inf"), 0.5, float("-inf"), 0.0, -0.25, 3.0],
                              [1.0, -2.0, 0.75, 0.5, -1.0, 0.0, -0.25, 3.0]], dtype=D)
            probes.append(int8_probe_one("weight with +inf and -inf in row 0 (row 1 finite)", w, per_row))
            w = torch.tensor([[1.0, -2.0, float("nan"), 0.5, -1.0, 0.0, -0.25, 3.0],
                              [1.0, -2.0, 0.75, 0.5, -1.0, 0.0, -0.25, 3.0]], dtype=D)
            probes.append(int8_probe_one("weight with NaN in row 0 (row 1 finite)", w, per_row))
        w = torch.tensor([[1.0, -2.0, float("inf"), float("nan"), float("-inf"), 0.0, -0.25, 3.0]], dtype=D)
        probes.append(int8_probe_one("weight with +inf, -inf and NaN, explicit scale 1/64 (tensorwise)",
                                     w, False, scale=torch.tensor(1.0 / 64)))
    # tiny amax: f16's scale' = rne_f16(amax/127) is 0 (-> finfo(f16).tiny) or subnormal
    # (rne_f16(amax/127) is 0 below amax = 127 * 2^-25 = 3.8e-6 and subnormal below 127 * 2^-14 = 7.8e-3)
    for amax in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
        w32 = base * amax
        for per_row in (False, True):
            probes.append(int8_probe_one(f"float16 weight [4, 8], randn scaled to amax {amax:g} in f32, then cast",
                                         w32.to(torch.float16), per_row))
    w32 = base * 1e-30
    for per_row in (False, True):
        probes.append(int8_probe_one("float16 weight [4, 8], randn scaled to amax 1e-30 in f32, then cast",
                                     w32.to(torch.float16), per_row,
                                     note="the f16 cast flushes every element to (signed) zero"))
    # bf16 / f32 keep tiny magnitudes: the 1e-30 scale floor then decides
    for dtype in ("bfloat16", "float32"):
        for amax in (1e-30, 1e-35):
            w = (base * amax).to(cm.DTYPES[dtype])
            for per_row in (False, True):
                probes.append(int8_probe_one(f"{dtype} weight [4, 8], randn scaled to amax {amax:g}", w, per_row,
                                             note="amax/127 is below the 1e-30 floor" if amax / 127 < 1e-30
                                             else "amax/127 is above the 1e-30 floor"))
    return probes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: tests/fixtures/comfy)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"base seed (default {DEFAULT_SEED})")
    ap.add_argument("--no-probes", action="store_true", help="skip the corner-case probes (probes.json)")
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    vers = versions()
    for pkg, want in EXPECTED_VERSIONS.items():
        if vers[pkg] != want:
            print(f"expected {pkg} {want}, found {vers[pkg]}", file=sys.stderr)
            return 1
    os.makedirs(args.out, exist_ok=True)

    index = {"generator": "tests/interop/comfy/gen_comfy_fixtures.py", "base_seed": args.seed, "versions": vers,
             "library_entry_points": {"float8_e4m3fn, float8_e5m2": ENTRY_POINTS, cm.INT8_FORMAT: INT8_ENTRY_POINTS},
             "cases": []}
    for recipe in cm.case_list():
        name = recipe["name"]
        try:
            case = generate_case(args.out, args.seed, recipe, vers)
        except SystemExit:
            raise
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            fail(f"{name}: {error_text(e)}")
        fs = case["formula_stats"]
        if cm.is_int8(case):
            print(f"{name}: {len(case['quantized_modules'])} quantized modules, formula ok "
                  f"({fs['elements']} codes, {fs['code_totals']['minus_128']} x -128, "
                  f"{fs['clipped_to_127']} clipped to 127, {fs['code_totals']['zero']} zero, {fs['ties']} ties)",
                  flush=True)
        else:
            print(f"{name}: {len(case['quantized_modules'])} quantized modules, formula ok "
                  f"({fs['elements']} codes, {fs['code_totals']['subnormal']} subnormal, "
                  f"{fs['code_totals']['zero']} zero, {fs['clamped']} clamped, {fs['ties']} ties)", flush=True)
        entry = {
            "name": name,
            "dtype": case["dtype"],
            "format": case["format"],
            "seed": case["seed"],
            "quantized_modules": case["quantized_modules"],
        }
        if cm.is_int8(case):
            entry["per_row"] = case["per_row"]
            entry["ckptkit_target"] = case["ckptkit_target"]
        index["cases"].append(entry)
    cm.write_json(index, os.path.join(args.out, "index.json"))
    if not args.no_probes:
        probes = {"generator": "tests/interop/comfy/gen_comfy_fixtures.py", "base_seed": args.seed,
                  "versions": vers, "probes": run_probes(args.seed) + run_int8_probes(args.seed)}
        cm.write_json(probes, os.path.join(args.out, "probes.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

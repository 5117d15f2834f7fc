#!/usr/bin/env python3
"""Generate golden compressed-tensors FP8 fixtures (CT 0.20.0, formats naive-quantized / float-quantized).

    target/interop-venv/bin/python tests/interop/ctfp8/gen_ctfp8_fixtures.py --out tests/fixtures/ctfp8 --seed 20261202

For every case it writes <out>/<case>/{float.safetensors, model.safetensors, config.json,
dequantized.safetensors, case.json}, plus <out>/index.json.  It aborts (exit 1) unless:

* model.safetensors equals the compressed model's in-memory state_dict();
* dequantized.safetensors (CT's model lifecycle -- apply_quantization_config, compress_model on a meta
  model, load_state_dict(strict), ModelCompressor.decompress_model -- run on model.safetensors with
  config.json) equals ModelCompressor.decompress_model on the in-memory compressed model, and every other
  CT / transformers path that runs gives the same tensors;
* the numpy restatement (ctfp8_models.np_formula, exact float64 arithmetic with explicit roundings) and the
  torch restatement (torch_quantize / torch_dequantize) reproduce CT's scales, codes and dequantized
  weights bit for bit;
* the plain tensors (biases, final_norm, lin_skip) equal float.safetensors.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ctfp8_models as cm  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "ctfp8")
DEFAULT_SEED = 20261202
SAVE_METADATA = {"format": "pt"}
EXPECTED_VERSIONS = {"compressed-tensors": cm.CT_VERSION, "torch": cm.TORCH_VERSION,
                     "transformers": cm.TRANSFORMERS_VERSION}
DATA_FILES = ("float.safetensors", "model.safetensors", "config.json", "dequantized.safetensors")


def versions() -> dict:
    v = {"python": sys.version.split()[0]}
    for pkg in ("torch", "compressed-tensors", "transformers", "safetensors", "numpy"):
        v[pkg] = importlib.metadata.version(pkg)
    v["torch_reported"] = torch.__version__
    v["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return v


def fail(msg: str) -> None:
    print(f"FATAL: {msg}", file=sys.__stderr__, flush=True)
    sys.exit(1)


def save_file(tensors: dict, path: str) -> None:
    from safetensors.torch import save_file as st_save

    st_save({k: v.detach().contiguous() for k, v in tensors.items()}, path, metadata=SAVE_METADATA)


def check_equal_dicts(what: str, ours: dict, theirs: dict) -> None:
    if set(ours) != set(theirs):
        fail(f"{what}: key sets differ: {sorted(set(ours) ^ set(theirs))}")
    for k in sorted(theirs):
        d = cm.same_tensor(ours[k], theirs[k])
        if d:
            fail(f"{what}: {k}: {d}")


def key_table(sd: dict) -> dict:
    return {k: {"dtype": cm.dtype_name(v), "shape": list(v.shape)} for k, v in sd.items()}


def file_table(path: str) -> dict:
    hdr = cm.file_header(path)
    meta = hdr.pop("__metadata__", None)
    order = sorted(hdr, key=lambda k: hdr[k]["data_offsets"][0])
    return {"metadata": meta,
            "tensors_in_file_order": [{"name": k, "dtype": hdr[k]["dtype"], "shape": hdr[k]["shape"],
                                       "data_offsets": hdr[k]["data_offsets"]} for k in order]}


def bits_hex(t: torch.Tensor) -> str:
    t = t.reshape(-1)[:1].contiguous()
    n = t.element_size()
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[n]
    return f"0x{int(t.view(view).item()) & ((1 << (8 * n)) - 1):0{2 * n}x}"


# --------------------------------------------------------------------------------------
# the arithmetic, restated and compared bit for bit
# --------------------------------------------------------------------------------------


def formula_check(case: dict, float_sd: dict, file_sd: dict, deq: dict) -> dict:
    name = case["name"]
    D = cm.DTYPES[case["dtype"]]
    eps = torch.finfo(D).eps
    st = dict(modules=0, elements=0, scales=0, scales_inexact=0, zero_scales_replaced_by_eps=0,
              codes_zero_from_nonzero_x=0, codes_negative_zero=0,
              quotient_negative_zero_made_positive=0, codes_subnormal=0, codes_at_max=0, clamp_active=0,
              quotient_rounded_to_D=0, q_changed_if_quotient_not_rounded_to_D=0, q_min=None, q_max=None)
    for n in cm.quantized_module_names(case):
        w = float_sd[f"{n}.weight"]
        q_file = file_sd[f"{n}.weight"]
        s_file = file_sd[f"{n}.weight_scale"]
        if q_file.dtype != cm.FP8 or list(q_file.shape) != list(w.shape):
            fail(f"{name}: {n}.weight is {q_file.dtype} {list(q_file.shape)}")
        if s_file.dtype != D or tuple(s_file.shape) != tuple(cm.scale_shape(w.shape, case)):
            fail(f"{name}: {n}.weight_scale is {s_file.dtype} {list(s_file.shape)}, "
                 f"want {D} {list(cm.scale_shape(w.shape, case))}")
        # numpy restatement (exact arithmetic, explicit roundings)
        f = cm.np_formula(w, case)
        for what, mine, lib in (("weight_scale", f["scale"], cm.to_f64(s_file)),
                                ("weight (codes)", f["q"], cm.to_f64(q_file)),
                                ("dequantized", f["deq"], cm.to_f64(deq[f"{n}.weight"]))):
            if not cm.np_same(mine, lib):
                bad = (np.argwhere((mine != lib) | (np.signbit(mine) != np.signbit(lib)))
                       if mine.shape == lib.shape else "shape")
                fail(f"{name}: {n}: {what} differs from the numpy restatement at {bad[:5]}")
        # the values the numpy restatement produced are representable: the tensors compared are exact
        # torch restatement: bytes
        s_t, q_t = cm.torch_quantize(w, case)
        for what, mine, lib in (("weight_scale", s_t, s_file), ("weight (codes)", q_t, q_file)):
            d = cm.same_tensor(mine.contiguous(), lib)
            if d:
                fail(f"{name}: {n}: {what} differs from the torch restatement: {d}")
        d = cm.same_tensor(cm.torch_dequantize(q_file, s_file, case, D), deq[f"{n}.weight"])
        if d:
            fail(f"{name}: {n}: dequantized != (q.to(S) * s).to(D): {d}")
        # statistics
        x = cm.to_f64(w)
        ri, ci = cm.scale_index(x.shape, case)
        s_el = f["scale"].reshape(-1)[0] if case["strategy"] == "tensor" else f["scale"][ri, ci]
        s_el = np.broadcast_to(s_el, x.shape)
        amax = np.zeros(f["scale"].shape if case["strategy"] != "tensor" else (1, 1))
        np.maximum.at(amax, (ri, ci), np.abs(x))
        amax = amax.reshape(f["scale"].shape)
        q = f["q"]
        st["modules"] += 1
        st["elements"] += x.size
        st["scales"] += f["scale"].size
        st["scales_inexact"] += int(((f["scale"] * 448.0) != amax).sum() - (amax == 0).sum())
        st["zero_scales_replaced_by_eps"] += int((amax == 0).sum())
        st["codes_zero_from_nonzero_x"] += int(((q == 0) & (x != 0)).sum())
        st["codes_negative_zero"] += int(((q == 0) & np.signbit(q)).sum())
        st["quotient_negative_zero_made_positive"] += int(((x / s_el == 0) & np.signbit(x / s_el)).sum())
        st["codes_subnormal"] += int(((np.abs(q) < 2.0**-6) & (q != 0)).sum())
        st["codes_at_max"] += int((np.abs(q) == 448.0).sum())
        st["clamp_active"] += int((np.abs(f["t"]) > 448.0).sum())
        st["quotient_rounded_to_D"] += int((f["t"] != x / s_el).sum())
        st["q_changed_if_quotient_not_rounded_to_D"] += int((f["q_without_rne_d"] != q).sum())
        st["q_min"] = float(q.min()) if st["q_min"] is None else min(st["q_min"], float(q.min()))
        st["q_max"] = float(q.max()) if st["q_max"] is None else max(st["q_max"], float(q.max()))
        if (amax == 0).any():
            zs = s_file.reshape(-1)[torch.from_numpy((amax == 0).reshape(-1))]
            if not bool((zs == eps).all()):
                fail(f"{name}: {n}: a zero-amax scale is {zs.tolist()}, not eps {eps}")
    return st


# --------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------


def module_info(case: dict, spec: dict) -> dict:
    info = {"name": spec["name"], "kind": spec["kind"],
            "quantized": spec["name"] in cm.quantized_module_names(case),
            "skipped": bool(spec.get("skip")), "has_bias": bool(spec.get("bias", True))}
    if spec["kind"] == "Linear":
        info["weight_shape"] = [spec["out_features"], spec["in_features"]]
        if info["quantized"]:
            info["scale_shape"] = list(cm.scale_shape(info["weight_shape"], case))
    else:
        info["weight_shape"] = [spec["normalized_shape"]]
    for k in ("zero_row", "zero_group", "zero_block", "zero_all", "binades"):
        if spec.get(k) is not None:
            info[k] = spec[k]
    return info


def weights_only_twin(case: dict, float_sd: dict) -> dict:
    """The dynamic case's float weights quantized with the weights-only scheme (naive-quantized)."""
    twin = dict(case, activations=None, name=case["name"] + "-weights-only")
    with tempfile.TemporaryDirectory() as d:
        with cm.quiet_stderr():
            _, comp = cm.ct_quantize_to_dir(twin, float_sd, d)
        sd = cm.load_tensors(os.path.join(d, "model.safetensors"))
        with open(os.path.join(d, "config.json")) as f:
            fmt = json.load(f)["quantization_config"]["format"]
    return {"format": fmt, "sd": sd}


def generate_case(out_dir: str, base_seed: int, recipe: dict, vers: dict) -> dict:
    case = dict(recipe)
    name = case["name"]
    case["base_seed"] = base_seed
    case["seed"] = cm.case_seed(base_seed, name)
    D = cm.DTYPES[case["dtype"]]
    cdir = os.path.join(out_dir, name)
    os.makedirs(cdir, exist_ok=True)

    # 1. float weights
    float_sd = cm.float_state_dict(case, case["seed"])
    fpath = os.path.join(cdir, "float.safetensors")
    save_file(float_sd, fpath)
    float_sd = cm.load_tensors(fpath)

    # 2. CT's own checkpoint and its in-memory decompression
    zp_record = {}
    with cm.quiet_stderr():
        qmodel, compressor = cm.ct_quantize_to_dir(case, float_sd, cdir, zp_record)
    zps = list(zp_record.values())
    if not all(z is not None and z["all_positive_zero"] and z["dtype"] == "float8_e4m3fn" for z in zps):
        fail(f"{name}: unexpected weight_zero_point at compression time: {zp_record}")
    mem_sd = {k: v.detach().clone() for k, v in qmodel.state_dict().items()}
    mpath = os.path.join(cdir, "model.safetensors")
    file_sd = cm.load_tensors(mpath)
    check_equal_dicts(f"{name}: model.safetensors vs the compressed model's state_dict()", file_sd, mem_sd)
    with cm.quiet_stderr():
        deq_mem = cm.ct_decompress_in_memory(qmodel, compressor, case)
    with open(os.path.join(cdir, "config.json")) as f:
        config = json.load(f)
    qc = config["quantization_config"]

    # 3. CT's decompression of model.safetensors: dequantized.safetensors, and every other path
    paths = cm.ct_paths(case, file_sd, qc, cdir)
    deq, probs = paths["ct_model_lifecycle"]
    if deq is None or probs:
        fail(f"{name}: CT model lifecycle on model.safetensors: {probs}")
    check_equal_dicts(f"{name}: CT lifecycle on model.safetensors vs decompress_model in memory", deq, deq_mem)
    save_file(deq, os.path.join(cdir, "dequantized.safetensors"))
    ok_paths, failed_paths = [], {}
    for p, (res, probs) in paths.items():
        if res is None or probs:
            failed_paths[p] = probs
            continue
        check_equal_dicts(f"{name}: {p} vs dequantized.safetensors", res, deq)
        ok_paths.append(p)

    # 4. the arithmetic
    formula = formula_check(case, float_sd, file_sd, deq)
    qn = set(cm.quantized_module_names(case))
    plain = {k: v for k, v in file_sd.items() if k in float_sd and not (
        k.endswith(".weight") and k[: -len(".weight")] in qn)}
    check_equal_dicts(f"{name}: plain tensors vs float", plain, {k: float_sd[k] for k in plain})
    want_keys = set(float_sd) | {f"{n}.weight_scale" for n in qn}
    if set(file_sd) != want_keys:
        fail(f"{name}: unexpected key set: {sorted(set(file_sd) ^ want_keys)}")

    # 5. the dynamic case: are the weight bytes those of the weights-only scheme?
    if case.get("activations"):
        twin = weights_only_twin(case, float_sd)
        differing = sorted(k for k in twin["sd"] if k not in file_sd or cm.same_tensor(twin["sd"][k], file_sd[k]))
        if set(twin["sd"]) != set(file_sd):
            differing += sorted(set(twin["sd"]) ^ set(file_sd))
        case["weights_only_twin"] = {
            "what": "the same float.safetensors quantized with the weights-only scheme (no input_activations)",
            "format": twin["format"], "tensors_identical": not differing, "differing_tensors": differing}
        if differing:
            fail(f"{name}: the {qc['format']} tensors differ from the {twin['format']} ones: {differing}")

    # 6. case.json
    eps_t = torch.tensor(torch.finfo(D).eps, dtype=D)
    case["modules"] = [module_info(case, s) for s in case["specs"]]
    case["quantized_modules"] = sorted(qn, key=cm.quantized_module_names(case).index)
    case["format"] = qc["format"]
    case["group_format"] = qc["config_groups"]["group_0"]["format"]
    case["zero_point_at_compression"] = (
        "every quantized module had a weight_zero_point (float8_e4m3fn, all +0.0, the scale's shape) when "
        "compress_model ran; CT's quantize adds it to x / s (turning -0.0 into +0.0) and the compressor then "
        "drops it from the file (symmetric)")
    case["scale_dtype"] = cm.dtype_name(file_sd[f"{case['quantized_modules'][0]}.weight_scale"])
    case["zero_scale_eps"] = {"dtype": case["dtype"], "value": float(eps_t), "bits": bits_hex(eps_t)}
    case["state_dict_keys"] = key_table(mem_sd)
    case["model_file"] = file_table(mpath)
    case["quantization_config"] = qc
    case["dequantized_dtype"] = cm.dtype_name(next(iter(deq.values())))
    case["dequantized_by"] = ("compressed-tensors model lifecycle on model.safetensors + config.json "
                              "(apply_quantization_config, ModelCompressor.compress_model on a meta model, "
                              "load_state_dict(strict=True, assign=True), ModelCompressor.decompress_model); "
                              "equals decompress_model on the in-memory compressed model")
    case["loading_paths_checked"] = ok_paths
    case["loading_paths_failed"] = failed_paths
    case["formula_check"] = formula
    case["versions"] = vers
    case["files"] = {fn: cm.sha256_file(os.path.join(cdir, fn)) for fn in DATA_FILES}
    cm.write_json(case, os.path.join(cdir, "case.json"))
    return case


# --------------------------------------------------------------------------------------
# arithmetic probes (index.json): torch's CPU roundings the formula relies on
# --------------------------------------------------------------------------------------


def all_finite(dtype) -> torch.Tensor:
    v = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    return v[torch.isfinite(v.float())]


def arithmetic_probes(seed: int) -> dict:
    out = {}
    g = torch.Generator().manual_seed(seed)
    for dt, nm in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        v = all_finite(dt)
        v = v[v.float().abs() <= cm.FP8_MAX]
        bad = int((cm.to_f64(v.to(cm.FP8)) != cm.np_rne(np.clip(cm.to_f64(v), -448, 448), "e4m3")).sum())
        out[f"{nm} -> float8_e4m3fn cast (.to), every finite value in [-448, 448]"] = {
            "values": v.numel(), "differ_from_RNE": bad}
        if bad:
            fail(f"torch {nm} -> e4m3 cast is not RNE for {bad} values")
        a = all_finite(dt)
        a = a[a.float() != 0]
        x = a[torch.randint(0, a.numel(), (500_000,), generator=g)]
        y = a[torch.randint(0, a.numel(), (500_000,), generator=g)]
        exact = cm.np_rne(cm.to_f64(x) / cm.to_f64(y), nm)
        lim = 3.0e38 if nm == "bfloat16" else 65504.0
        keep = np.abs(exact) <= lim
        res = {}
        for label, t in (("tensor / tensor", x / y),
                         ("tensor / 0-dim tensor", x / y[:1].reshape(())),
                         ("tensor / [1] tensor", x / y[:1])):
            got = cm.to_f64(t)
            ref = exact if label == "tensor / tensor" else cm.np_rne(cm.to_f64(x) / float(y[0]), nm)
            k = np.abs(ref) <= lim
            res[label] = int((got[k] != ref[k]).sum())
        recip = cm.to_f64((x.float() * torch.reciprocal(y.float())).to(dt))
        out[f"{nm} / {nm} division on CPU, {int(keep.sum())} random pairs"] = {
            "differ_from_correctly_rounded": res,
            "reciprocal_then_multiply_would_differ": int((recip[keep] != exact[keep]).sum())}
        if any(res.values()):
            fail(f"torch {nm} division is not correctly rounded: {res}")
    x = (torch.rand(1_000_000, generator=g, dtype=torch.float64) * 896 - 448).float()
    e = np.unique(cm.np_rne(np.linspace(-448, 448, 100001), "e4m3"))
    ties = torch.tensor((e[1:] + e[:-1]) / 2, dtype=torch.float32)
    x = torch.cat([x, ties, torch.nextafter(ties, torch.tensor(1e9)), torch.nextafter(ties, torch.tensor(-1e9))])
    bad = int((cm.to_f64(x.to(cm.FP8)) != cm.np_rne(cm.to_f64(x), "e4m3")).sum())
    out["float32 -> float8_e4m3fn cast, 1e6 random values in [-448, 448] plus every tie and its neighbours"] = {
        "values": x.numel(), "differ_from_RNE": bad}
    if bad:
        fail(f"torch f32 -> e4m3 cast is not RNE for {bad} values")
    return out


def group_probe(seed: int) -> dict:
    """FP8 group strategy with in_features % G != 0 (Linear 200 -> 8, G = 32)."""
    case = dict(name="probe-group32-in200", library="compressed-tensors", dtype="bfloat16", strategy="group",
                group_size=32, block_structure=None, activations=None, specs=[cm.lin("lin_i200", 200, 8)])
    sd = cm.float_state_dict(case, cm.case_seed(seed, case["name"]))
    res = {"probe": "FP8 group_size 32 on a Linear 200 -> 8 (200 % 32 != 0)"}
    try:
        with tempfile.TemporaryDirectory() as d, cm.quiet_stderr():
            cm.ct_quantize_to_dir(case, sd, d)
        res["observer_and_compress"] = "ok"
    except Exception as e:  # noqa: BLE001
        res["observer_and_compress"] = f"{type(e).__name__}: {e}"
    # CT's own compressor (no observer) with the scale apply_quantization_config allocates, filled
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import apply_quantization_config

    with cm.quiet_stderr():
        model = cm.build_model(case)
        model.load_state_dict(sd, strict=True)
        apply_quantization_config(model, cm.ct_initial_config(case), show_progress=False)
        m = model.lin_i200
        res["weight_scale_shape_after_apply_quantization_config"] = list(m.weight_scale.shape)
        with torch.no_grad():
            m.weight_scale.fill_(0.01)
        try:
            BaseCompressor.get_value_from_registry("naive-quantized").compress_module(m)
            res["naive_quantized_compress_module"] = "ok"
        except Exception as e:  # noqa: BLE001
            res["naive_quantized_compress_module"] = f"{type(e).__name__}: {e}"
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--only", default=None, help="only cases whose name contains this string (no index.json)")
    ap.add_argument("--no-probes", action="store_true", help="skip the arithmetic probes in index.json")
    args = ap.parse_args()

    cm.quiet_libraries()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    vers = versions()
    for pkg, want in EXPECTED_VERSIONS.items():
        if vers[pkg] != want:
            print(f"expected {pkg} {want}, found {vers[pkg]}", file=sys.stderr)
            return 1
    os.makedirs(args.out, exist_ok=True)
    index = {"generator": "tests/interop/ctfp8/gen_ctfp8_fixtures.py", "base_seed": args.seed, "versions": vers,
             "cases": []}
    for recipe in cm.case_list():
        name = recipe["name"]
        if args.only and args.only not in name:
            continue
        try:
            case = generate_case(args.out, args.seed, recipe, vers)
        except SystemExit:
            raise
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            fail(f"{name}: {type(e).__name__}: {e}")
        print(f"{name}: format {case['format']}, {len(case['quantized_modules'])} quantized modules, "
              f"paths ok {case['loading_paths_checked']}, failed {sorted(case['loading_paths_failed'])}", flush=True)
        index["cases"].append({k: case[k] for k in ("name", "dtype", "strategy", "group_size", "block_structure",
                                                    "activations", "format", "ckptkit_target", "exclude", "seed",
                                                    "quantized_modules")})
    if not args.only:
        if not args.no_probes:
            index["arithmetic_probes"] = arithmetic_probes(args.seed)
            index["group_probe"] = group_probe(args.seed)
        cm.write_json(index, os.path.join(args.out, "index.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

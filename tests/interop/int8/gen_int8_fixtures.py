#!/usr/bin/env python3
"""Generate golden int8 fixtures (compressed-tensors 0.20.0 and bitsandbytes 0.50.2) for ckptkit.

Run inside the pinned venv (tests/interop/setup_venv.sh):

    tests/interop/setup_venv.sh /work/venv-int8
    /work/venv-int8/bin/python tests/interop/int8/gen_int8_fixtures.py --out tests/fixtures/int8 --seed 20260301

For every case it writes <out>/<case>/{float.safetensors, model.safetensors, config.json,
dequantized.safetensors, case.json}, plus <out>/index.json.  It aborts (exit 1) if a fixture is
not self-consistent: the saved file differs from the library's in-memory state dict, one of the
library's loading paths reports missing/unexpected keys or dequantizes differently, or the
documented formula (README) does not reproduce the library's scales, integers and dequantized
values bit for bit.
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
import int8_models as im  # noqa: E402

import torch  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "int8")
DEFAULT_SEED = 20260301
SAVE_METADATA = {"format": "pt"}

EXPECTED_VERSIONS = {"compressed-tensors": im.CT_VERSION, "bitsandbytes": im.BNB_VERSION, "torch": "2.15.0"}


def versions() -> dict:
    v = {"python": sys.version.split()[0]}
    for pkg in ("torch", "compressed-tensors", "bitsandbytes", "transformers", "accelerate", "safetensors", "numpy"):
        v[pkg] = importlib.metadata.version(pkg)
    v["torch_reported"] = torch.__version__
    v["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return v


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def fail(msg: str) -> None:
    # sys.__stderr__: the library calls run under im.quiet_stderr()
    print(f"FATAL: {msg}", file=sys.__stderr__, flush=True)
    sys.exit(1)


def save_file(tensors: dict, path: str) -> None:
    from safetensors.torch import save_file as st_save

    st_save({k: v.detach().contiguous() for k, v in tensors.items()}, path, metadata=SAVE_METADATA)


def check_equal_dicts(what: str, ours: dict, theirs: dict) -> None:
    if set(ours) != set(theirs):
        fail(f"{what}: key sets differ: {sorted(set(ours) ^ set(theirs))}")
    for k in theirs:
        d = im.same_tensor(ours[k], theirs[k])
        if d:
            fail(f"{what}: {k}: {d}")


def key_table(sd: dict) -> dict:
    return {k: {"dtype": im.dtype_name(v), "shape": list(v.shape)} for k, v in sd.items()}


def file_table(path: str) -> dict:
    hdr = im.file_header(path)
    meta = hdr.pop("__metadata__", None)
    order = sorted(hdr, key=lambda k: hdr[k]["data_offsets"][0])
    return {
        "metadata": meta,
        "tensors_in_file_order": [
            {"name": k, "dtype": hdr[k]["dtype"], "shape": hdr[k]["shape"], "data_offsets": hdr[k]["data_offsets"]}
            for k in order
        ],
    }


# --------------------------------------------------------------------------------------
# formula checks (the README's statements, verified against the library output)
# --------------------------------------------------------------------------------------


def ct_formula_check(case: dict, float_sd: dict, file_sd: dict, deq: dict) -> dict:
    stats = {"modules": 0, "elements": 0, "q_min": 127, "q_max": -128, "zero_scale_count": 0, "pad_bytes": 0}
    for n in im.quantized_module_names(case):
        w = float_sd[f"{n}.weight"]
        scale, q, dq = im.ct_formula(w, case["strategy"], case["group_size"])
        s_file = file_sd[f"{n}.weight_scale"]
        d = im.same_tensor(scale, s_file)
        if d:
            fail(f"{case['name']}: {n}: weight_scale != RN_T(amax/127.5): {d}")
        if case["form"] == "pack-quantized":
            packed = file_sd[f"{n}.weight_packed"]
            q_file, pad = im.ct_unpack_bytes(packed, w.shape[1])
            if pad.numel() and int(pad.max()) != 0:
                fail(f"{case['name']}: {n}: padding bytes are not all 0x00: {pad.unique().tolist()}")
            stats["pad_bytes"] += pad.numel()
            shape = file_sd[f"{n}.weight_shape"]
            if shape.dtype != torch.int64 or shape.tolist() != list(w.shape):
                fail(f"{case['name']}: {n}: weight_shape {shape} != {list(w.shape)}")
        else:
            q_file = file_sd[f"{n}.weight"]
        d = im.same_tensor(q, q_file)
        if d:
            fail(f"{case['name']}: {n}: q != round_half_even(clamp(RN_T(x/scale))): {d}")
        d = im.same_tensor(dq, deq[f"{n}.weight"])
        if d:
            fail(f"{case['name']}: {n}: dequantized != RN_T(q*scale): {d}")
        stats["modules"] += 1
        stats["elements"] += q.numel()
        stats["q_min"] = min(stats["q_min"], int(q.min()))
        stats["q_max"] = max(stats["q_max"], int(q.max()))
        stats["q_eq_minus128"] = stats.get("q_eq_minus128", 0) + int((q == -128).sum())
        stats["zero_scale_count"] += int((s_file == torch.finfo(s_file.dtype).eps).sum())
    return stats


def bnb_formula_check(case: dict, float_sd: dict, file_sd: dict, deq: dict) -> dict:
    stats = {"modules": 0, "elements": 0, "q_min": 127, "q_max": -128, "zero_scb_rows": 0}
    for n in im.quantized_module_names(case):
        scb, q, dq = im.bnb_formula(float_sd[f"{n}.weight"])
        for what, a, b in (
            ("SCB", scb, file_sd[f"{n}.SCB"]),
            ("weight (CB)", q, file_sd[f"{n}.weight"]),
            ("dequantized", dq, deq[f"{n}.weight"]),
        ):
            d = im.same_tensor(a, b)
            if d:
                fail(f"{case['name']}: {n}: {what} differs from the documented formula: {d}")
        fmt = file_sd[f"{n}.weight_format"]
        if fmt.dtype != torch.uint8 or fmt.shape != () or int(fmt) != 0:
            fail(f"{case['name']}: {n}: weight_format is {fmt!r}")
        stats["modules"] += 1
        stats["elements"] += q.numel()
        stats["q_min"] = min(stats["q_min"], int(q.min()))
        stats["q_max"] = max(stats["q_max"], int(q.max()))
        stats["zero_scb_rows"] += int((scb == 0).sum())
    return stats


# --------------------------------------------------------------------------------------
# loading paths (self-consistency: every path must give the in-memory dequantized weights)
# --------------------------------------------------------------------------------------


def check_paths(case: dict, cdir: str, file_sd: dict, deq: dict) -> list:
    name = case["name"]
    dtype = im.DTYPES[case["dtype"]]
    with open(os.path.join(cdir, "config.json")) as f:
        config = json.load(f)
    results = {}
    if case["library"] == im.CT:
        out, err = im.ct_load_model_path(case, file_sd, config["quantization_config"])
        if err:
            fail(f"{name}: CT model load path: {err}")
        results["ct_model_decompress"] = out
        results["ct_model_free_dequantizer"] = {
            k: v for k, v in im.ct_model_free_path(cdir, file_sd, dtype).items() if k in deq
        }
        out, problems = im.ct_transformers_path(case, cdir)
        if problems:
            fail(f"{name}: transformers load: {problems}")
        results["transformers_from_pretrained"] = out
        out, problems = im.ct_transformers_dequantize_path(case, cdir)
        if problems:
            fail(f"{name}: transformers load (dequantize=True): {problems}")
        results["transformers_from_pretrained_dequantize"] = out
    else:
        out, err = im.bnb_native_path(case, file_sd)
        if err:
            fail(f"{name}: bnb native load path: {err}")
        results["bnb_linear8bitlt_load_state_dict"] = out
        out, problems = im.bnb_transformers_path(case, cdir)
        if problems:
            fail(f"{name}: transformers load: {problems}")
        results["transformers_from_pretrained"] = out
    for path, out in results.items():
        check_equal_dicts(f"{name}: {path} vs in-memory dequantized", out, deq)
    return sorted(results)


# --------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------


def module_info(case: dict, spec: dict) -> dict:
    info = {
        "name": spec["name"],
        "kind": spec["kind"],
        "quantized": spec["name"] in im.quantized_module_names(case),
        "skipped": bool(spec.get("skip")),
        "has_bias": bool(spec.get("bias", True)),
    }
    if spec["kind"] == "Linear":
        info["weight_shape"] = [spec["out_features"], spec["in_features"]]
    else:
        info["weight_shape"] = [spec["normalized_shape"]]
    for k in ("zero_row", "zero_group"):
        if spec.get(k) is not None:
            info[k] = spec[k]
    return info


def generate_case(out_dir: str, base_seed: int, recipe: dict, vers: dict) -> dict:
    case = dict(recipe)
    name = case["name"]
    case["base_seed"] = base_seed
    case["seed"] = im.case_seed(base_seed, name)
    case["specs"] = [dict(s) for s in recipe["specs"]]
    cdir = os.path.join(out_dir, name)
    os.makedirs(cdir, exist_ok=True)

    # 1. float model
    torch.manual_seed(case["seed"])
    model = im.build_model(case)
    im.init_float_weights(model, case["seed"])
    float_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(float_sd, os.path.join(cdir, "float.safetensors"))
    float_sd = im.load_tensors(os.path.join(cdir, "float.safetensors"))

    # 2. the library's own checkpoint (model.safetensors + config.json) and dequantized weights
    if case["library"] == im.CT:
        qmodel, compressor = im.ct_quantize_to_dir(case, float_sd, cdir)
        mem_sd = {k: v.detach().clone() for k, v in qmodel.state_dict().items()}
        deq = im.ct_decompress_in_memory(qmodel, compressor, case)
    else:
        qmodel = im.bnb_quantize_to_dir(case, float_sd, cdir)
        mem_sd = {k: v.detach().clone() for k, v in qmodel.state_dict().items()}
        deq = im.bnb_dequantize_model(qmodel, case)
        # the bare bnb module API gives the same tensors as transformers
        check_equal_dicts(f"{name}: transformers bnb vs Linear8bitLt.to('cpu')", mem_sd,
                          im.bnb_module_api_state_dict(case, float_sd))
    mpath = os.path.join(cdir, "model.safetensors")
    file_sd = im.load_tensors(mpath)
    check_equal_dicts(f"{name}: model.safetensors vs the model's state_dict()", file_sd, mem_sd)
    save_file(deq, os.path.join(cdir, "dequantized.safetensors"))

    # 3. self-consistency
    paths = check_paths(case, cdir, file_sd, deq)
    if case["library"] == im.CT:
        formula = ct_formula_check(case, float_sd, file_sd, deq)
    else:
        formula = bnb_formula_check(case, float_sd, file_sd, deq)
    # plain tensors (biases, LayerNorm, skipped Linear) are the float ones, unchanged
    plain = {k: v for k, v in file_sd.items() if k in float_sd and not (
        k.endswith(".weight") and k[: -len(".weight")] in im.quantized_module_names(case))}
    check_equal_dicts(f"{name}: plain tensors vs float", plain, {k: float_sd[k] for k in plain})

    # 4. case.json
    with open(os.path.join(cdir, "config.json")) as f:
        config = json.load(f)
    case["modules"] = [module_info(case, s) for s in case["specs"]]
    case["quantized_modules"] = im.quantized_module_names(case)
    case["state_dict_keys"] = key_table(mem_sd)
    case["model_file"] = file_table(mpath)
    case["quantization_config"] = config["quantization_config"]
    case["dequantized_dtype"] = im.dtype_name(next(iter(deq.values())))
    case["dequantized_by"] = (
        "ModelCompressor.decompress_model (compressed_tensors) on the compressed model"
        if case["library"] == im.CT
        else "bitsandbytes.functional.int8_vectorwise_dequant(weight.data, weight.SCB)"
    )
    case["loading_paths_checked"] = paths
    case["formula_check"] = formula
    case["versions"] = vers
    case["files"] = {
        fn: im.sha256_file(os.path.join(cdir, fn))
        for fn in ("float.safetensors", "model.safetensors", "config.json", "dequantized.safetensors")
    }
    with open(os.path.join(cdir, "case.json"), "w") as f:
        json.dump(case, f, indent=2)
        f.write("\n")
    return case


# --------------------------------------------------------------------------------------
# probes: what the libraries do in corner cases (recorded in index.json)
# --------------------------------------------------------------------------------------


def run_probes(base_seed: int) -> list:
    import bitsandbytes as bnb

    probes = []

    # CT group strategy with in_features % G != 0
    for spec in im.GROUP_PROBE_MODULES:
        for G in (32, 64):
            case = dict(name=f"probe-ct-group{G}-{spec['name']}", library=im.CT, dtype="bfloat16",
                        form="pack-quantized", strategy="group", group_size=G, specs=[spec])
            model = im.build_model(case)
            im.init_float_weights(model, im.case_seed(base_seed, case["name"]))
            try:
                im.ct_quantize_and_compress(model, case)
                res = {"ok": True, "keys": key_table(model.state_dict())}
            except Exception as e:  # noqa: BLE001
                res = {"ok": False, "error": error_text(e)}
            # CT's own compressor (no observer) on the same shape, scale filled with ones
            from compressed_tensors.compressors import BaseCompressor
            from compressed_tensors.quantization import apply_quantization_config

            m2 = im.build_model(case)
            apply_quantization_config(m2, im.ct_initial_config(case), show_progress=False)
            lin = getattr(m2, spec["name"])
            res["weight_scale_shape_after_apply_quantization_config"] = list(lin.weight_scale.shape)
            with torch.no_grad():
                lin.weight_scale.fill_(0.01)
            try:
                BaseCompressor.get_value_from_registry("pack-quantized").compress_module(lin)
                res["compress_module"] = "ok"
            except Exception as e:  # noqa: BLE001
                res["compress_module"] = error_text(e)
            probes.append({"probe": f"compressed-tensors group strategy, Linear {spec['in_features']}->"
                                    f"{spec['out_features']}, group_size {G} (in % G != 0)", **res})

    # bnb: loading a quantized state dict into a Linear8bitLt that was not quantized first
    torch.manual_seed(base_seed)
    src = bnb.nn.Linear8bitLt(64, 4, has_fp16_weights=False).to(dtype=torch.bfloat16).to("cpu")
    sd = src.state_dict()
    dst = bnb.nn.Linear8bitLt(64, 4, has_fp16_weights=False).to(dtype=torch.bfloat16)
    try:
        dst.load_state_dict(sd)
        res = {"ok": True}
    except Exception as e:  # noqa: BLE001
        res = {"ok": False, "error": error_text(e)}
    probes.append({"probe": "bitsandbytes Linear8bitLt.load_state_dict(quantized sd) before .to(device)", **res})

    # bnb: weight_format values
    dst = bnb.nn.Linear8bitLt(64, 4, has_fp16_weights=False).to(dtype=torch.bfloat16).to("cpu")
    for val in (1, 4):
        sd2 = dict(sd)
        sd2["weight_format"] = torch.tensor(val, dtype=torch.uint8)
        try:
            dst.load_state_dict(sd2)
            res = {"ok": True}
        except Exception as e:  # noqa: BLE001
            res = {"ok": False, "error": error_text(e)}
        probes.append({"probe": f"bitsandbytes load_state_dict with weight_format={val}", **res})
    sd3 = {k: v for k, v in sd.items() if k != "weight_format"}
    try:
        r = dst.load_state_dict(sd3, strict=True)
        res = {"ok": True, "result": str(r)}
    except Exception as e:  # noqa: BLE001
        res = {"ok": False, "error": error_text(e)}
    probes.append({"probe": "bitsandbytes load_state_dict(strict=True) without weight_format", **res})
    sd4 = {k: v for k, v in sd.items() if k != "SCB"}
    try:
        r = dst.load_state_dict(sd4, strict=True)
        res = {"ok": True, "result": str(r)}
    except Exception as e:  # noqa: BLE001
        res = {"ok": False, "error": error_text(e)}
    probes.append({"probe": "bitsandbytes load_state_dict(strict=True) without SCB", **res})

    # bnb: the outlier threshold does not change the stored weights
    g = torch.Generator().manual_seed(base_seed)
    w = (torch.randn(8, 64, generator=g) * 4).to(torch.float16)
    outs = []
    for thr in (0.0, 6.0):
        m = bnb.nn.Linear8bitLt(64, 8, has_fp16_weights=False, threshold=thr).to(dtype=torch.float16)
        m.load_state_dict({"weight": w, "bias": torch.zeros(8, dtype=torch.float16)})
        outs.append(m.to("cpu").state_dict())
    same = all(im.same_tensor(outs[0][k], outs[1][k]) is None for k in outs[0])
    probes.append({"probe": "bitsandbytes threshold 0.0 vs 6.0: identical weight/SCB (weights up to |x|~16)",
                   "ok": same})

    # bnb: a bf16 weight outside the float16 range
    w = torch.tensor([[1.0e5, 1.0, -2.0, 0.5]], dtype=torch.bfloat16)
    m = bnb.nn.Linear8bitLt(4, 1, bias=False, has_fp16_weights=False).to(dtype=torch.bfloat16)
    m.load_state_dict({"weight": w})
    sd5 = m.to("cpu").state_dict()
    probes.append({"probe": "bitsandbytes bf16 weight row [1e5, 1, -2, 0.5] (1e5 > f16 max)",
                   "SCB": [repr(x) for x in sd5["SCB"].tolist()], "weight": sd5["weight"].tolist()})

    # transformers loading a pre-quantized bnb checkpoint with altered tensors
    case = dict(name="probe-bnb-transformers-load", library=im.BNB, dtype="bfloat16", form="llm_int8",
                specs=[im.lin("a", 64, 8), im.lin("b", 64, 4)])
    m0 = im.build_model(case)
    im.init_float_weights(m0, im.case_seed(base_seed, case["name"]))
    fsd = {k: v.detach().clone() for k, v in m0.state_dict().items()}
    with tempfile.TemporaryDirectory() as qdir:
        im.bnb_quantize_to_dir(case, fsd, qdir)
        with open(os.path.join(qdir, "config.json")) as f:
            cfg = json.load(f)
        base = im.load_tensors(os.path.join(qdir, "model.safetensors"))
        ref, _ = im.bnb_transformers_path(case, qdir)
        variants = {
            "weight_format = 1 (col32)": lambda s: s.__setitem__("a.weight_format", torch.tensor(1, dtype=torch.uint8)),
            "weight_format missing": lambda s: s.pop("a.weight_format"),
            "SCB missing": lambda s: s.pop("a.SCB"),
            "weight stored as F16": lambda s: s.__setitem__("a.weight", s["a.weight"].to(torch.float16)),
        }
        for label, fn in variants.items():
            sd = dict(base)
            fn(sd)
            p = os.path.join(qdir, "alt.safetensors")
            save_file(sd, p)
            with im.staged_dir(cfg, p) as st:
                try:
                    out, problems = im.bnb_transformers_path(case, st)
                    same = "a.weight" in out and im.same_tensor(out["a.weight"], ref["a.weight"]) is None
                    res = {"ok": not problems, "problems": problems, "dequantized_same_as_unaltered": same}
                except Exception as e:  # noqa: BLE001
                    res = {"ok": False, "error": error_text(e)}
            probes.append({"probe": f"transformers from_pretrained of a bnb checkpoint with {label}", **res})

    # transformers' default skip heuristic (llm_int8_skip_modules=None)
    from transformers import BitsAndBytesConfig

    for last_bias in (True, False):
        case = dict(name="probe-bnb-default-skip", library=im.BNB, dtype="bfloat16", specs=[
            im.lin("first", 32, 4), im.lin("middle", 32, 4), im.lin("last", 32, 4, bias=last_bias)])
        with tempfile.TemporaryDirectory() as fdir:
            fm = im.build_model(case)
            fm.save_pretrained(fdir)
            qm_, _ = im.transformers_load(fdir, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                          dtype=torch.bfloat16)
            kinds = {s["name"]: type(getattr(qm_, s["name"])).__name__ for s in case["specs"]}
        probes.append({"probe": "transformers BitsAndBytesConfig(load_in_8bit=True) with llm_int8_skip_modules=None "
                                f"on a model of three Linears first/middle/last (last has bias={last_bias})",
                       "module_classes": kinds})
    return probes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: tests/fixtures/int8)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"base seed (default {DEFAULT_SEED})")
    ap.add_argument("--only", default=None, help="generate only cases whose name contains this string")
    ap.add_argument("--no-probes", action="store_true", help="skip the corner-case probes (index.json)")
    args = ap.parse_args()

    im.quiet_libraries()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    vers = versions()
    for pkg, want in EXPECTED_VERSIONS.items():
        if vers[pkg] != want:
            print(f"expected {pkg} {want}, found {vers[pkg]}", file=sys.stderr)
            return 1
    os.makedirs(args.out, exist_ok=True)

    index = {"generator": "tests/interop/int8/gen_int8_fixtures.py", "base_seed": args.seed, "versions": vers,
             "cases": []}
    for recipe in im.case_list():
        name = recipe["name"]
        if args.only and args.only not in name:
            continue
        try:
            with im.quiet_stderr():
                case = generate_case(args.out, args.seed, recipe, vers)
        except SystemExit:
            raise
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            fail(f"{name}: {error_text(e)}")
        print(f"{name}: {len(case['quantized_modules'])} quantized modules, paths {case['loading_paths_checked']}",
              flush=True)
        index["cases"].append({
            "name": name,
            "library": case["library"],
            "dtype": case["dtype"],
            "form": case["form"],
            "strategy": case["strategy"],
            "group_size": case["group_size"],
            "seed": case["seed"],
            "quantized_modules": case["quantized_modules"],
        })
    if not args.only:
        if not args.no_probes:
            with im.quiet_stderr():
                index["probes"] = run_probes(args.seed)
        with open(os.path.join(args.out, "index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

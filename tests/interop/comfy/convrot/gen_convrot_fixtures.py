#!/usr/bin/env python3
"""Generate golden ComfyUI ConvRot int8 fixtures (`int8_tensorwise` with `"convrot": true`, comfy-kitchen 0.2.40)
for ckptkit's reading (detect + dequantize) of them.

Run inside the pinned venv (tests/interop/setup_venv.sh):

    target/interop-venv/bin/python tests/interop/comfy/convrot/gen_convrot_fixtures.py \\
        --out tests/fixtures/comfy-convrot --seed 20261202          # both are the defaults

Per case (convrot_models.CASES) it writes <out>/<case>/{float,quantized,dequantized}.safetensors and case.json;
then <out>/bad-groupsize/{quantized.safetensors,case.json} (a copy of convrot-bf16-g16's quantized file whose
markers say convrot_groupsize 32, which comfy-kitchen refuses), <out>/probes.json (unless --no-probes) and
<out>/index.json.

It aborts (exit 1) if a fixture is not self-consistent: a saved file differs from the in-memory tensors, the
library's quantize entry points (from_float, the custom op, rotate + rowwise) disagree, its dequantize entry
points (from_float(...).dequantize(), the Params rebuilt as ComfyUI loads them, the custom op
dequantize_int8_convrot_weight_dtype, the embedding op) disagree, or the re-statement of the library's f32
arithmetic (convrot_models.library_order_dequantize) does not reproduce its dequantization bit for bit.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convrot_models as m  # noqa: E402

import torch  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "comfy-convrot")
DEFAULT_SEED = 20261202
GENERATOR = "tests/interop/comfy/convrot/gen_convrot_fixtures.py"

ENTRY_POINTS = {
    "quantize": 'comfy_kitchen.tensor.QuantizedTensor.from_float(w, "TensorWiseINT8Layout", per_channel=True, '
                "convrot=True, convrot_groupsize=n) (is_weight=True, stochastic_rounding=0: the defaults) -> "
                "TensorWiseINT8Layout.quantize -> registry quantize_int8_convrot_weight(w, n, stochastic_rounding=0) "
                "(eager: _build_hadamard(n, dtype=D); _rotate_weight(w, h, n) = per group w @ h.T in D; "
                "quantize_int8_rowwise)",
    "quantize_cross_check": "torch.ops.comfy_kitchen.quantize_int8_convrot_weight(w, n); "
                            "comfy_kitchen.quantize_int8_rowwise(comfy_kitchen.backends.eager.quantization."
                            "rotate_int8_convrot_weight(w, n))",
    "state_dict": 'QuantizedTensor.state_dict("{m}.weight") -> {m}.weight (I8), {m}.weight_scale (F32 [out, 1])',
    "marker": "ComfyUI comfy/ops.py _quantized_weight_state_dict: torch.tensor(list(json.dumps({\"format\": "
              "\"int8_tensorwise\", \"convrot\": True, \"convrot_groupsize\": n}).encode(\"utf-8\")), dtype=torch.uint8)",
    "dequantize": 'QuantizedTensor(q, "TensorWiseINT8Layout", TensorWiseINT8Layout.Params(scale=s, orig_dtype=D, '
                  "orig_shape, convrot=True, convrot_groupsize=n)).dequantize() -> "
                  "torch.ops.comfy_kitchen.dequantize_int8_convrot_weight_dtype(q, s, n, code(D)) "
                  "(eager: _rotate_weight(q.float() * s, _build_hadamard(n, f32), n).to(D))",
    "dequantize_cross_check": "from_float(...).dequantize(); torch.ops.comfy_kitchen."
                              "dequantize_int8_convrot_weight_dtype(q, s, n, code(D)); "
                              "torch.ops.comfy_kitchen.dequantize_int8_embedding(q, s, arange(out), n, code(D))",
    "backend_override": 'comfy_kitchen.registry.registry.use_backend("eager")',
}


def versions() -> dict:
    v = {"python": sys.version.split()[0]}
    for pkg in ("torch", "comfy-kitchen", "safetensors", "numpy"):
        v[pkg] = importlib.metadata.version(pkg)
    v["torch_reported"] = torch.__version__
    v["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return v


def fail(msg: str) -> None:
    print(f"FATAL: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def check_equal_dicts(what: str, ours: dict, theirs: dict) -> None:
    if set(ours) != set(theirs):
        fail(f"{what}: key sets differ: {sorted(set(ours) ^ set(theirs))}")
    for k in theirs:
        d = m.same_tensor(ours[k], theirs[k])
        if d:
            fail(f"{what}: {k}: {d}")


def save_checked(sd: dict, path: str) -> dict:
    m.save_file(sd, path)
    back = m.load_tensors(path)
    check_equal_dicts(path, back, sd)
    return back


def file_table(path: str) -> dict:
    hdr = m.file_header(path)
    meta = hdr.pop("__metadata__", None)
    order = sorted(hdr, key=lambda k: (hdr[k]["data_offsets"][0], k))
    return {"metadata": meta,
            "tensors_in_file_order": [{"name": k, "dtype": hdr[k]["dtype"], "shape": hdr[k]["shape"],
                                       "data_offsets": hdr[k]["data_offsets"]} for k in order]}


def module_table(case: dict) -> list:
    n = case["groupsize"]
    out = []
    for s in case["specs"]:
        row = {"name": s["name"], "kind": s["kind"], "weight_shape": s["shape"], "has_bias": s["bias"],
               "convrot": s["quantized"]}
        if s["quantized"]:
            row["groups_per_row"] = s["shape"][1] // n
        else:
            row["why_plain"] = {"Norm": "1-D: never quantized",
                                "Linear": "a Linear left plain (not in ComfyUI's quantized layer set)"}[s["kind"]]
        if s.get("zero_row") is not None:
            row["zero_row"] = s["zero_row"]
        if s.get("wide"):
            row["wide"] = "columns in/2.. magnitude 2^-U(3,30), outliers [1,77] = +40x, [3,5] = -20x"
        out.append(row)
    return out


def code_stats(q: torch.Tensor) -> dict:
    a = q.to(torch.int16)
    return {"minus_128": int((a == -128).sum()), "plus_127": int((a == 127).sum()),
            "minus_127": int((a == -127).sum()), "zero": int((a == 0).sum()), "elements": int(a.numel())}


# --------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------


# --order-check: fatal aborts on a summation order other than the fixtures' machine's; report collects it
ORDER_CHECK = {"fatal": True, "differs": []}


def library_layer(name: str, mod: str, w: torch.Tensor, n: int, D: torch.dtype):
    """Quantize w with the library, cross-check every entry point; returns (q, s, dequantized)."""
    qt = m.library_quantize(w, n)
    if qt._qdata.dtype != torch.int8 or tuple(qt._qdata.shape) != tuple(w.shape):
        fail(f"{name}: {mod}: library codes are {qt._qdata.dtype} {tuple(qt._qdata.shape)}")
    p = qt._params
    if not (p.convrot is True and p.convrot_groupsize == n and p.is_weight is True):
        fail(f"{name}: {mod}: library params {p!r}")
    part = qt.state_dict(f"{mod}.weight")
    if set(part) != {f"{mod}.weight", f"{mod}.weight_scale"}:
        fail(f"{name}: {mod}: QuantizedTensor.state_dict gave keys {sorted(part)}")
    q = part[f"{mod}.weight"].detach().clone().contiguous()
    s = part[f"{mod}.weight_scale"].detach().clone().contiguous()
    if s.dtype != torch.float32 or tuple(s.shape) != (w.shape[0], 1):
        fail(f"{name}: {mod}: library scale is {s.dtype} {tuple(s.shape)}, expected F32 [{w.shape[0]}, 1]")
    # quantize cross-checks
    q_op, s_op = m.library_quantize_op(w.clone(), n)
    q_pt, s_pt = m.library_quantize_parts(w.clone(), n)
    for what, (qq, ss) in (("torch.ops.comfy_kitchen.quantize_int8_convrot_weight", (q_op, s_op)),
                           ("rotate_int8_convrot_weight + quantize_int8_rowwise", (q_pt, s_pt))):
        d = m.same_tensor(qq, q) or m.same_tensor(ss, s)
        if d:
            fail(f"{name}: {mod}: {what} vs from_float: {d}")
    # dequantize cross-checks
    with m.eager_backend():
        dq = qt.dequantize().detach().clone().contiguous()
    if dq.dtype != D or tuple(dq.shape) != tuple(w.shape):
        fail(f"{name}: {mod}: dequantized {dq.dtype} {tuple(dq.shape)}")
    for what, t in (("Params rebuilt as ComfyUI loads them", m.library_dequantize(q.clone(), s.clone(), D, n)),
                    ("torch.ops.comfy_kitchen.dequantize_int8_convrot_weight_dtype",
                     m.library_dequantize_op(q.clone(), s.clone(), D, n)),
                    ("torch.ops.comfy_kitchen.dequantize_int8_embedding",
                     m.library_dequantize_embedding(q.clone(), s.clone(), D, n))):
        d = m.same_tensor(t, dq)
        if d:
            fail(f"{name}: {mod}: {what} vs from_float(...).dequantize(): {d}")
    # the re-statement of the library's f32 arithmetic
    d = m.same_tensor(m.library_order_dequantize(q, s, n, D), dq)
    if d:
        msg = (f"{name}: {mod}: library_order_dequantize (f32 products, sequential sums in blocks of "
               f"{m.LIBRARY_K_BLOCK}) vs the library: {d}")
        if ORDER_CHECK["fatal"]:
            fail(msg)
        print(f"note: this CPU's f32 matmul adds in another order than the fixtures' machine: {msg}", file=sys.stderr)
        ORDER_CHECK["differs"].append(f"{mod}: {d}")
    return q, s, dq


def generate_case(out_dir: str, base_seed: int, recipe: dict, vers: dict) -> dict:
    case = dict(recipe)
    name, n = case["name"], case["groupsize"]
    D = m.DTYPES[case["dtype"]]
    case["base_seed"] = base_seed
    case["seed"] = m.case_seed(base_seed, name)
    cdir = os.path.join(out_dir, name)
    os.makedirs(cdir, exist_ok=True)
    mods = m.convrot_module_names(case)
    ORDER_CHECK["differs"] = []

    float_sd = save_checked(m.float_state_dict(case), os.path.join(cdir, "float.safetensors"))

    quant_sd, deq_sd, layers = {}, {}, {}
    for k, v in float_sd.items():
        mod = k[: -len(".weight")] if k.endswith(".weight") else None
        if mod in mods:
            q, s, dq = library_layer(name, mod, v, n, D)
            quant_sd[f"{mod}.weight"] = q
            quant_sd[f"{mod}.weight_scale"] = s
            quant_sd[f"{mod}.comfy_quant"] = m.marker_tensor(n)
            deq_sd[k] = dq
            sf = s.reshape(-1).tolist()
            layers[mod] = {
                "weight_shape": list(v.shape),
                "scale_shape": list(s.shape),
                "scale_f32_bits": [m.f32_bits(x) for x in sf],
                "floor_1e-30_rows": [i for i, x in enumerate(sf) if m.f32_bits(x) == m.f32_bits(1e-30)],
                "codes": code_stats(q),
                "max_abs_error_vs_float": repr(float((dq.double() - v.double()).abs().max())),
                "exactness": m.exactness(q, s, n, dq, m.library_dequantize(q, s, torch.float32, n)),
            }
        else:
            quant_sd[k] = v
            deq_sd[k] = v
    quant_sd = save_checked(quant_sd, os.path.join(cdir, "quantized.safetensors"))
    save_checked(deq_sd, os.path.join(cdir, "dequantized.safetensors"))
    for mod in mods:
        t = quant_sd[f"{mod}.comfy_quant"]
        if m.decode_comfy_quant(t) != m.marker_dict(n) or bytes(t.tolist()) != m.marker_json(n).encode():
            fail(f"{name}: {mod}: comfy_quant does not hold {m.marker_json(n)}")

    ex = [layers[x]["exactness"] for x in mods]
    case["modules"] = module_table(case)
    case["convrot_modules"] = mods
    case["plain_tensors"] = sorted(k for k in float_sd if not (k.endswith(".weight") and k[: -len(".weight")] in mods))
    case["comfy_quant_json"] = m.marker_json(n)
    case["comfy_quant_bytes"] = len(m.marker_json(n).encode())
    case["codes_dtype"] = "I8"
    case["scale_dtype"] = "F32"
    case["scale_shape"] = "[out, 1]"
    case["dequantized_dtype"] = case["dtype"]
    case["dequantized_keys"] = "the float model's key set: ConvRot weights dequantized by the library, every other " \
                               "tensor as in float.safetensors"
    case["zero_rows"] = {m.ZERO_ROW[0]: [m.ZERO_ROW[1]]}
    case["layers"] = layers
    case["exactness_summary"] = {
        "compared_with": "rne_D(exact): the exact inverse rotation (integer sums of codes times +-1, times "
                         "s_r / sqrt(n), in f64) rounded once to D; ulp = how many D values apart",
        "elements": sum(e["elements"] for e in ex),
        "differ_from_rounded_exact": sum(e["differ_from_rounded_exact"] for e in ex),
        "max_ulp_vs_rounded_exact": max(e["max_ulp_vs_rounded_exact"] for e in ex),
        "within_1_ulp_of_rounded_exact": all(e["max_ulp_vs_rounded_exact"] <= 1 for e in ex),
        "ulp_vs_rounded_exact_counts": {b[0]: sum(e["ulp_vs_rounded_exact_counts"][b[0]] for e in ex)
                                        for b in m.ULP_BUCKETS},
        "exact_nonzero_max_ulp_vs_rounded_exact": max(e["exact_nonzero"]["max_ulp_vs_rounded_exact"] for e in ex),
        "exact_nonzero_max_abs_error_in_ulps_vs_exact": max(e["exact_nonzero"]["max_abs_error_in_ulps_vs_exact"]
                                                            for e in ex),
        "exact_zero_elements": sum(e["exact_zero"]["elements"] for e in ex),
        "exact_zero_library_nonzero": sum(e["exact_zero"]["library_nonzero"] for e in ex),
        "library_f32_stage_max_abs_error_over_row_scale":
            repr(max(float(e["library_f32_stage_max_abs_error_over_row_scale"]) for e in ex)),
    }
    case["files"] = {fn: {"sha256": m.sha256_file(os.path.join(cdir, fn)),
                          "layout": file_table(os.path.join(cdir, fn))}
                     for fn in ("float.safetensors", "quantized.safetensors", "dequantized.safetensors")}
    case["library_entry_points"] = ENTRY_POINTS
    order = (f"rne_D(f32 sums of rne_f32(q*s) * (+-1/sqrt(n)), sequential in ascending i, in blocks of "
             f"{m.LIBRARY_K_BLOCK}, block sums added in order)")
    differs = ORDER_CHECK["differs"]
    case["library_order_check"] = (f"ok: {order} equals the library's dequantization bit for bit" if not differs
                                   else f"differs on this CPU (--order-check report): {order} vs the library: "
                                        + "; ".join(differs))
    case["backend"] = m.backend_report()
    case["versions"] = vers
    m.write_json(case, os.path.join(cdir, "case.json"))
    return case


# --------------------------------------------------------------------------------------
# the refusal case
# --------------------------------------------------------------------------------------


def generate_bad(out_dir: str, base_seed: int, vers: dict) -> dict:
    src = os.path.join(out_dir, m.BAD_SOURCE)
    src_case = m.load_case(src)
    sd = m.load_tensors(os.path.join(src, "quantized.safetensors"))
    D = m.DTYPES[src_case["dtype"]]
    n_bad = m.BAD_GROUPSIZE
    changed = []
    for k in sorted(sd):
        if k.endswith(".comfy_quant"):
            conf = m.decode_comfy_quant(sd[k])
            conf["convrot_groupsize"] = n_bad
            sd[k] = torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)
            changed.append(k[: -len(".comfy_quant")])
    bdir = os.path.join(out_dir, m.BAD_NAME)
    os.makedirs(bdir, exist_ok=True)
    path = os.path.join(bdir, "quantized.safetensors")
    save_checked(sd, path)

    # what comfy-kitchen does with group size 32
    errors = {}
    try:
        m.library_build_hadamard(n_bad)
        fail("comfy_kitchen.tensor.int8_utils._build_hadamard(32) did not raise")
    except ValueError as e:
        errors["_build_hadamard(32)"] = m.error_text(e)
    mod = changed[0]
    q, s = sd[f"{mod}.weight"], sd[f"{mod}.weight_scale"]
    try:
        m.library_dequantize(q, s, D, n_bad)
        fail("dequantize with convrot_groupsize 32 did not raise")
    except Exception as e:  # noqa: BLE001
        errors["QuantizedTensor(q, TensorWiseINT8Layout, Params(..., convrot=True, convrot_groupsize=32))"
               ".dequantize()"] = m.error_text(e)
    w = m.load_tensors(os.path.join(src, "float.safetensors"))[f"{mod}.weight"]
    try:
        m.library_quantize(w, n_bad)
        fail("from_float with convrot_groupsize 32 did not raise")
    except Exception as e:  # noqa: BLE001
        errors["QuantizedTensor.from_float(w, TensorWiseINT8Layout, per_channel=True, convrot=True, "
               "convrot_groupsize=32)"] = m.error_text(e)
    texts = sorted(set(errors.values()))

    case = {
        "name": m.BAD_NAME,
        "kind": "refusal",
        "source_case": m.BAD_SOURCE,
        "derived_from": f"{m.BAD_SOURCE}/quantized.safetensors, every tensor unchanged except each "
                        f"{{m}}.comfy_quant, whose convrot_groupsize is {n_bad} instead of "
                        f"{src_case['groupsize']} (the dict re-encoded with json.dumps defaults)",
        "dtype": src_case["dtype"],
        "changed_layers": changed,
        "layers": {x: {"weight_shape": list(sd[f"{x}.weight"].shape),
                       "comfy_quant_json": bytes(sd[f"{x}.comfy_quant"].tolist()).decode()} for x in changed},
        "first_layer": changed[0],
        "why": f"convrot_groupsize {n_bad} is not a power of 4: comfy-kitchen has no regular Hadamard matrix of "
               f"that size (_build_hadamard accepts 4, 16, 64, 256, 1024, ...), so it cannot un-rotate these "
               f"weights, and the codes were rotated with H_{src_case['groupsize']} anyway. Every layer is "
               f"affected; the first in file order is {changed[0]}.",
        "library_errors": errors,
        "library_error_text": texts[0] if len(texts) == 1 else texts,
        "comfyui": "ComfyUI's loader (comfy/ops.py _load_quantized_module) passes the marker's convrot_groupsize "
                   "into TensorWiseINT8Layout.Params unchecked; the error above is raised at the layer's first "
                   "dequantize or int8 linear",
        "expected_ckptkit": {"command": "migrate -q convert quantized.safetensors OUT --to plain",
                             "exit": "non-zero",
                             "stderr_mentions_any_of": ["convrot_groupsize", "power of 4"]},
        "files": {"quantized.safetensors": {"sha256": m.sha256_file(path), "layout": file_table(path)}},
        "base_seed": base_seed,
        "versions": vers,
    }
    m.write_json(case, os.path.join(bdir, "case.json"))
    return case


# --------------------------------------------------------------------------------------
# probes: every group size comfy-kitchen accepts up to 1024, and what it refuses
# --------------------------------------------------------------------------------------


def run_probes(base_seed: int) -> list:
    out = []
    g = torch.Generator().manual_seed(m.case_seed(base_seed, "probes"))
    for n in (4, 16, 64, 256, 1024):
        for dtype in ("bfloat16", "float16", "float32"):
            D = m.DTYPES[dtype]
            in_f = max(2 * n, 64)
            w = (torch.randn(4, in_f, generator=g) * 0.05 + 0.01).to(D)
            w[2] = 0
            qt = m.library_quantize(w, n)
            q, s = qt._qdata.contiguous(), qt._params.scale.contiguous()
            with m.eager_backend():
                dq = qt.dequantize()
            ex = m.exactness(q, s, n, dq, m.library_dequantize(q, s, torch.float32, n))
            out.append({
                "probe": f"random [4, {in_f}] weight (row 2 zero), group size {n}",
                "dtype": dtype, "groupsize": n,
                "library_order_reproduces_library": {
                    f"k_block {m.LIBRARY_K_BLOCK}, {lanes} accumulator(s)":
                        m.same_tensor(m.library_order_dequantize(q, s, n, D, lanes=lanes), dq) is None
                    for lanes in (1, 2)},
                "elements": ex["elements"],
                "differ_from_rounded_exact": ex["differ_from_rounded_exact"],
                "max_ulp_vs_rounded_exact": ex["max_ulp_vs_rounded_exact"],
                "exact_nonzero_max_ulp_vs_rounded_exact": ex["exact_nonzero"]["max_ulp_vs_rounded_exact"],
                "exact_zero_library_nonzero": ex["exact_zero"]["library_nonzero"],
            })
    # refusals
    w = torch.randn(4, 48, generator=g).to(torch.bfloat16)
    for n, label in ((32, "group size 32 (a power of 2, not of 4)"), (8, "group size 8"), (2, "group size 2"),
                     (1, "group size 1"), (64, "in_features 48 not a multiple of the group size 64"),
                     (16, "in_features 48, group size 16 (accepted)")):
        res = {"probe": f"quantize [4, 48] bfloat16: {label}", "groupsize": n}
        try:
            qt = m.library_quantize(w, n)
            res["result"] = f"ok: codes {tuple(qt._qdata.shape)}"
        except Exception as e:  # noqa: BLE001
            res["error"] = m.error_text(e)
        out.append(res)
    q = torch.zeros(4, 48, dtype=torch.int8)
    s = torch.full((4, 1), 0.01)
    for n in (32, 64):
        res = {"probe": f"dequantize [4, 48] int8 codes with convrot_groupsize {n}", "groupsize": n}
        try:
            m.library_dequantize(q, s, torch.bfloat16, n)
            res["result"] = "ok"
        except Exception as e:  # noqa: BLE001
            res["error"] = m.error_text(e)
        out.append(res)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: tests/fixtures/comfy-convrot)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"base seed (default {DEFAULT_SEED})")
    ap.add_argument("--no-probes", action="store_true", help="skip probes.json")
    ap.add_argument("--order-check", choices=("fatal", "report"), default="fatal",
                    help="when library_order_dequantize does not reproduce the library bit for bit (another CPU's "
                         "matmul kernel): abort (fatal, the default, for committed fixtures) or note it and go on "
                         "(report, the live suite)")
    args = ap.parse_args()
    ORDER_CHECK["fatal"] = args.order_check == "fatal"

    m.setup_torch()
    vers = versions()
    for pkg, want in (("comfy-kitchen", m.CK_VERSION), ("torch", m.TORCH_VERSION)):
        if vers[pkg] != want:
            print(f"expected {pkg} {want}, found {vers[pkg]}", file=sys.stderr)
            return 1
    os.makedirs(args.out, exist_ok=True)
    index = {"generator": GENERATOR, "base_seed": args.seed, "versions": vers,
             "library_entry_points": ENTRY_POINTS, "cases": []}
    for recipe in m.case_list():
        try:
            case = generate_case(args.out, args.seed, recipe, vers)
        except SystemExit:
            raise
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            fail(f"{recipe['name']}: {m.error_text(e)}")
        es = case["exactness_summary"]
        print(f"{case['name']}: {len(case['convrot_modules'])} ConvRot layers, library checks ok; vs rne_D(exact): "
              f"{es['differ_from_rounded_exact']} of {es['elements']} differ, max {es['max_ulp_vs_rounded_exact']} ulp "
              f"{es['ulp_vs_rounded_exact_counts']}; exact != 0: max {es['exact_nonzero_max_ulp_vs_rounded_exact']} ulp; "
              f"exact == 0: {es['exact_zero_library_nonzero']} of {es['exact_zero_elements']} non-zero in the library",
              flush=True)
        index["cases"].append({"name": case["name"], "dtype": case["dtype"], "groupsize": case["groupsize"],
                               "seed": case["seed"], "convrot_modules": case["convrot_modules"],
                               "comfy_quant_json": case["comfy_quant_json"],
                               "max_ulp_vs_rounded_exact": es["max_ulp_vs_rounded_exact"],
                               "within_1_ulp_of_rounded_exact": es["within_1_ulp_of_rounded_exact"]})
    bad = generate_bad(args.out, args.seed, vers)
    print(f"{bad['name']}: {len(bad['changed_layers'])} markers say convrot_groupsize {m.BAD_GROUPSIZE}; "
          f"library: {bad['library_error_text']}", flush=True)
    index["refusal_cases"] = [{"name": bad["name"], "source_case": bad["source_case"],
                               "changed_layers": bad["changed_layers"], "library_error_text": bad["library_error_text"],
                               "expected_ckptkit": bad["expected_ckptkit"]}]
    if not args.no_probes:
        probes = run_probes(args.seed)
        m.write_json({"generator": GENERATOR, "base_seed": args.seed, "versions": vers, "probes": probes},
                     os.path.join(args.out, "probes.json"))
    m.write_json(index, os.path.join(args.out, "index.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

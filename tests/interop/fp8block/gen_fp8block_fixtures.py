#!/usr/bin/env python3
"""Generate golden block FP8 (DeepSeek-V3 style) fixtures with transformers 5.24.0's fine-grained FP8 code for ckptkit.

Run inside the pinned venv (tests/interop/setup_venv.sh):

    tests/interop/setup_venv.sh                     # default dir: target/interop-venv
    target/interop-venv/bin/python tests/interop/fp8block/gen_fp8block_fixtures.py \\
        --out tests/fixtures/fp8block --seed 20261202

For every case it writes <out>/<case>/{float,model,dequantized}.safetensors, config.json and case.json,
plus <out>/index.json and (unless --no-probes) <out>/probes.json (E8M0 decoding and the ue8m0 rounding
of torch's f32 log2).  It aborts (exit 1) if a fixture is not self-consistent: the saved files differ
from the in-memory tensors, the ragged rule's two dequantizations (DeepSeek's formula, transformers'
_dequantize_one of the zero-padded codes, cropped) disagree, the pad region of the padded codes is not
0x00, or the independent re-statement of the quantizer (numpy scales, a numpy e4m3 encoder) does not
reproduce the library's scales and codes bit for bit.  --exhaustive-log2 also checks the probes'
log2 table against every positive normal f32 (about 20 s; the output does not change).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp8block_models as fm  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "fp8block")
DEFAULT_SEED = 20261202
GENERATOR = "tests/interop/fp8block/gen_fp8block_fixtures.py"

EXPECTED_VERSIONS = {"transformers": fm.TRANSFORMERS_VERSION, "torch": fm.TORCH_VERSION,
                     "safetensors": fm.SAFETENSORS_VERSION}

ENTRY_POINTS = {
    "hf_quantizer": "transformers.quantizers.quantizer_finegrained_fp8.FineGrainedFP8HfQuantizer("
                    "FineGrainedFP8Config(weight_block_size=[128, 128], modules_to_not_convert=['lin_skip'], "
                    "scale_fmt='float'|'ue8m0'))",
    "quantize_aligned": "transformers.integrations.finegrained_fp8.Fp8Quantize(hf_quantizer)"
                        "._quantize_one('{m}.weight', w) -> {m}.weight, {m}.weight_scale_inv",
    "quantize_ragged": "zero-pad w to multiples of 128, Fp8Quantize(hf_quantizer)._quantize_one on the padded "
                       "tensor, crop the codes to [N, K]; the scale grid is the ceil grid",
    "dequantize_aligned": "transformers.integrations.finegrained_fp8.Fp8Dequantize(hf_quantizer)"
                          "._dequantize_one(q, s, output_dtype=D)",
    "dequantize_ragged": "DeepSeek weight_dequant: y[i,j] = (f32(q[i,j]) * f32(s[i//128, j//128])).to(D); "
                         "asserted equal to Fp8Dequantize._dequantize_one(zero-padded q, s, output_dtype=D) cropped",
    "config_json": "PretrainedConfig subclass (model_type 'ckptkit_fp8block_fixture'), .dtype = D, "
                   ".quantization_config = FineGrainedFP8Config(...) as above, .save_pretrained(dir)",
}


def versions() -> dict:
    v = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "safetensors", "numpy"):
        v[pkg] = importlib.metadata.version(pkg)
    v["torch_reported"] = torch.__version__
    v["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return v


def fail(msg: str) -> None:
    print(f"FATAL: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def check_equal_dicts(what: str, ours: dict, theirs: dict) -> None:
    if list(ours) and set(ours) != set(theirs):
        fail(f"{what}: key sets differ: {sorted(set(ours) ^ set(theirs))}")
    for k in theirs:
        d = fm.describe_diff(ours[k], theirs[k], "file", "memory")
        if d:
            fail(f"{what}: {k}: {d}")


def file_table(path: str) -> dict:
    hdr = fm.file_header(path)
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
# the independent re-statement of the quantizer (numpy; no torch fp8 cast)
# --------------------------------------------------------------------------------------


def e4m3_values() -> np.ndarray:
    """Value of each e4m3fn code 0x00..0x7E (positive half), from the bit layout."""
    v = np.zeros(0x7F, dtype=np.float64)
    for c in range(0x7F):
        e, m = c >> 3, c & 7
        v[c] = (m / 8.0) * 2.0 ** -6 if e == 0 else (1 + m / 8.0) * 2.0 ** (e - 7)
    return v


E4M3 = e4m3_values()


def e4m3_encode_rne(t: np.ndarray):
    """Round-to-nearest-even of finite f32 values in [-448, 448] to e4m3fn codes; -> (codes u8, ties)."""
    a = np.abs(t.astype(np.float64))
    hi = np.searchsorted(E4M3, a, side="left").clip(0, 0x7E)      # first code with value >= a
    lo = (hi - 1).clip(0)
    dlo, dhi = a - E4M3[lo], E4M3[hi] - a
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    code = np.where(E4M3[hi] == a, hi, np.where(pick_hi, hi, lo)).astype(np.uint8)
    ties = int(((dhi == dlo) & (E4M3[hi] != a) & (hi != lo)).sum())
    sign = np.signbit(t)
    return (code | np.where(sign, 0x80, 0).astype(np.uint8)).astype(np.uint8), ties


def formula_quantize(w: torch.Tensor, scale_fmt: str):
    """transformers' _quantize_one op order, re-stated in numpy on the zero-padded f32 weight:
    amax per 128x128 block; s = rn_f32(rn_f32(1 / amax) * 448) (1.0 for a zero block); inv = rn_f32(1 / s);
    ue8m0: inv = 2^ceil(rn_f32(log2(max(inv, 2^-126)))), s = 1 / inv;  t = clamp(rn_f32(x * s), +-448);
    code = rne_e4m3(t).  Returns (inv f32 [gn, gk], codes u8 [N, K], stats)."""
    n, k = w.shape
    gn, gk = fm.grid(w.shape)
    x = np.zeros((gn * fm.BLOCK, gk * fm.BLOCK), dtype=np.float32)
    x[:n, :k] = w.to(torch.float32).numpy()
    blocks = x.reshape(gn, fm.BLOCK, gk, fm.BLOCK)
    amax = np.abs(blocks).max(axis=(1, 3)).astype(np.float32)
    safe = np.where(amax > 0, amax, np.float32(1))
    # `_FP8_MAX / safe_max_abs` is a Python float over a tensor: torch's Tensor.__rtruediv__ computes it as
    # `safe_max_abs.reciprocal() * 448`, two f32 roundings, not the correctly rounded quotient
    s = np.where(amax > 0, (np.float32(1) / safe).astype(np.float32) * np.float32(fm.FP8_MAX),
                 np.float32(1)).astype(np.float32)
    quotient_differs = int(((np.float32(fm.FP8_MAX) / safe).astype(np.float32) != s)[amax > 0].sum())
    inv = (np.float32(1) / s).astype(np.float32)   # `1.0 / scales` = scales.reciprocal() * 1.0
    if scale_fmt == "ue8m0":
        l2 = np.log2(np.maximum(inv, np.float32(2.0 ** -126)).astype(np.float64)).astype(np.float32)
        inv = np.ldexp(np.float32(1), np.ceil(l2).astype(np.int32)).astype(np.float32)
        s = (np.float32(1) / inv).astype(np.float32)
    t = (blocks * s[:, None, :, None]).astype(np.float32)
    clamped = int((np.abs(t) > fm.FP8_MAX).sum())
    t = np.clip(t, -fm.FP8_MAX, fm.FP8_MAX).reshape(gn * fm.BLOCK, gk * fm.BLOCK)[:n, :k]
    codes, ties = e4m3_encode_rne(t)
    return inv, codes, {"elements": int(n * k), "clamped": clamped, "ties": ties, "blocks": int(gn * gk),
                        "blocks_where_rn_448_over_amax_differs": quotient_differs}


# --------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------


def quantize_module(name: str, m: str, w: torch.Tensor, fmt: str, D: torch.dtype) -> dict:
    """The library's codes, scale and dequantization for one Linear, with the ragged rule's checks."""
    shape = list(w.shape)
    aligned = fm.is_aligned(shape)
    key = f"{m}.weight"
    rec = {"aligned": aligned}
    if aligned:
        q, s = fm.library_quantize(w, fmt, key)
        dq = fm.library_dequantize(q, s, D, fmt)
        ds = fm.deepseek_dequantize(q, s, D)
        d = fm.describe_diff(ds, dq, "DeepSeek formula", "_dequantize_one")
        if d:
            fail(f"{name}: {m}: aligned: {d}")
    else:
        # no library quantizes a ragged weight: _quantize_one passes it through unchanged
        from transformers.integrations.finegrained_fp8 import Fp8Quantize

        passed = Fp8Quantize(fm.hf_quantizer(fmt))._quantize_one(key, w)
        if set(passed) != {key} or passed[key] is not w:
            fail(f"{name}: {m}: _quantize_one did not pass the ragged weight {shape} through: {sorted(passed)}")
        q, s, qp = fm.library_quantize_padded(w, fmt, key)
        pad = qp.view(torch.uint8).clone()
        pad[: shape[0], : shape[1]] = 0
        if bool(pad.any()):
            fail(f"{name}: {m}: the padded codes' pad region is not all 0x00")
        dq = fm.deepseek_dequantize(q, s, D)
        dp = fm.library_dequantize_padded(q, s, D, fmt)
        d = fm.describe_diff(dq, dp, "DeepSeek formula", "_dequantize_one(padded) cropped")
        if d:
            fail(f"{name}: {m}: ragged dequantizations disagree: {d}")
        # what transformers' own _dequantize_one does with the unpadded codes (block = rows // scale_rows)
        try:
            wrong = fm.library_dequantize(q, s, D, fmt)
            d = fm.describe_diff(wrong, dq, "_dequantize_one(unpadded)", "DeepSeek")
            gn, gk = fm.grid(shape)
            rec["transformers_unpadded_dequantize"] = (
                f"derives block [{shape[0] // gn}, {shape[1] // gk}]: "
                + ("equal to DeepSeek's" if d is None else d))
        except Exception as e:  # noqa: BLE001
            rec["transformers_unpadded_dequantize"] = f"{type(e).__name__}: {e}"
    if q.dtype != fm.FP8 or list(q.shape) != shape:
        fail(f"{name}: {m}: library codes are {q.dtype} {list(q.shape)}")
    if s.dtype != fm.SCALE_DTYPE[fmt] or list(s.shape) != fm.grid(shape):
        fail(f"{name}: {m}: library scale is {s.dtype} {list(s.shape)}, expected {fm.SCALE_DTYPE[fmt]} {fm.grid(shape)}")
    if dq.dtype != D:
        fail(f"{name}: {m}: dequantized dtype {dq.dtype} != {D}")
    # the independent re-statement
    inv_ref, codes_ref, st = formula_quantize(w, fmt)
    inv_lib = s.to(torch.float32).numpy()
    if not np.array_equal(inv_ref.view(np.uint32), inv_lib.view(np.uint32)):
        fail(f"{name}: {m}: weight_scale_inv != formula: library {inv_lib.tolist()}, formula {inv_ref.tolist()}")
    b = q.view(torch.uint8).numpy()
    if not np.array_equal(codes_ref, b):
        bad = np.argwhere(codes_ref != b)
        i = tuple(int(v) for v in bad[0])
        fail(f"{name}: {m}: codes != formula: {len(bad)} differ, first at {list(i)}: formula 0x{codes_ref[i]:02x}, "
             f"library 0x{b[i]:02x}")
    rec.update(q=q, s=s, dq=dq, formula=st)
    return rec


def generate_case(out_dir: str, base_seed: int, recipe: dict, vers: dict) -> dict:
    case = dict(recipe)
    name = case["name"]
    fmt = case["scale_fmt"]
    D = fm.DTYPES[case["dtype"]]
    case["base_seed"] = base_seed
    case["seed"] = fm.case_seed(base_seed, name)
    cdir = os.path.join(out_dir, name)
    if os.path.isdir(cdir):
        shutil.rmtree(cdir)
    os.makedirs(cdir)
    qnames = fm.quantized_module_names(case)

    # 1. the float model
    float_sd = fm.float_state_dict(case)
    fpath = os.path.join(cdir, "float.safetensors")
    fm.save_file(float_sd, fpath)
    check_equal_dicts(f"{name}: float.safetensors", fm.load_tensors(fpath), float_sd)
    float_sd = fm.load_tensors(fpath)

    # 2. the library
    mods = {m: quantize_module(name, m, float_sd[f"{m}.weight"], fmt, D) for m in qnames}
    model_sd, deq_sd = {}, {}
    for k, v in float_sd.items():
        m = k.rsplit(".", 1)[0]
        if m in mods and k.endswith(".weight"):
            model_sd[k] = mods[m]["q"]
            model_sd[f"{m}.weight_scale_inv"] = mods[m]["s"]
            deq_sd[k] = mods[m]["dq"]
        else:
            model_sd[k] = v
            deq_sd[k] = v
    # the same through the shared helper the checker uses
    m2, d2 = fm.case_state_dicts(case, float_sd)
    check_equal_dicts(f"{name}: case_state_dicts (model)", m2, model_sd)
    check_equal_dicts(f"{name}: case_state_dicts (dequantized)", d2, deq_sd)

    mpath = os.path.join(cdir, "model.safetensors")
    fm.save_file(model_sd, mpath)
    check_equal_dicts(f"{name}: model.safetensors", fm.load_tensors(mpath), model_sd)
    dpath = os.path.join(cdir, "dequantized.safetensors")
    fm.save_file(deq_sd, dpath)
    check_equal_dicts(f"{name}: dequantized.safetensors", fm.load_tensors(dpath), deq_sd)
    hdr = fm.file_header(mpath)
    want_scale = "F8_E8M0" if fmt == "ue8m0" else "F32"
    for m in qnames:
        if hdr[f"{m}.weight"]["dtype"] != "F8_E4M3" or hdr[f"{m}.weight_scale_inv"]["dtype"] != want_scale:
            fail(f"{name}: {m}: header dtypes {hdr[f'{m}.weight']['dtype']}, {hdr[f'{m}.weight_scale_inv']['dtype']}")

    # 3. config.json, written by transformers
    text = fm.transformers_config_json(case["dtype"], fmt, case["exclude"])
    with open(os.path.join(cdir, "config.json"), "w") as f:
        f.write(text)
    cfg = json.loads(text)

    # 4. case.json
    case["modules"] = [
        {"name": s["name"], "kind": s["kind"], "shape": s["shape"], "bias": s["bias"], "quantized": s["quantized"],
         "aligned": fm.is_aligned(s["shape"]) if s["kind"] == "Linear" else None,
         "scale_grid": fm.grid(s["shape"]) if s["quantized"] else None, "note": s["note"]}
        for s in case["specs"]
    ]
    case["quantized_modules"] = qnames
    case["aligned_modules"] = [m for m in qnames if mods[m]["aligned"]]
    case["ragged_modules"] = [m for m in qnames if not mods[m]["aligned"]]
    case["codes_dtype"] = "F8_E4M3"
    case["scale_dtype"] = want_scale
    case["config_quantization_config"] = cfg["quantization_config"]
    case["scales"] = {m: fm.scale_record(mods[m]["s"]) for m in qnames}
    case["codes"] = {m: fm.code_stats(mods[m]["q"]) for m in qnames}
    case["formula_check"] = "ok"
    case["formula_stats"] = {m: mods[m]["formula"] for m in qnames}
    case["transformers_unpadded_dequantize"] = {
        m: mods[m]["transformers_unpadded_dequantize"] for m in qnames if not mods[m]["aligned"]}
    case["files"] = {}
    for fn in ("float.safetensors", "model.safetensors", "dequantized.safetensors", "config.json"):
        p = os.path.join(cdir, fn)
        case["files"][fn] = {"sha256": fm.sha256_file(p), "bytes": os.path.getsize(p)}
        if fn.endswith(".safetensors"):
            case["files"][fn]["layout"] = file_table(p)
    case["library_entry_points"] = ENTRY_POINTS
    case["versions"] = vers
    fm.write_json(case, os.path.join(cdir, "case.json"))
    return case


# --------------------------------------------------------------------------------------
# probes: E8M0 decoding, the ue8m0 rounding of torch's f32 log2
# --------------------------------------------------------------------------------------


def f32_hex(t: torch.Tensor) -> list:
    return ["0x%08x" % (v & 0xFFFFFFFF) for v in t.contiguous().view(torch.int32).reshape(-1).tolist()]


def log2_table() -> dict:
    """For every binade 2^e (e in -126..127): J_e = how many of x = 2^e (1 + j 2^-23), j = 1, 2, ..., give
    ceil(torch.log2(x)) = e (the exact value is e + 1: x is not a power of two).  They are always j = 1..J_e.
    Checked on j < 4096 per binade here (--exhaustive-log2: every x)."""
    es = torch.arange(-126, 128, dtype=torch.int64)
    j = torch.arange(0, 4096, dtype=torch.int64)
    bits = ((es + 127) << 23)[:, None] | j[None, :]
    x = bits.to(torch.int32).view(torch.float32)
    c = torch.ceil(torch.log2(x)).to(torch.int64)
    table = {}
    for i, e in enumerate(es.tolist()):
        row = c[i]
        if int(row[0]) != e:
            fail(f"log2 table: ceil(log2(2^{e})) = {int(row[0])}")
        low = (row[1:] == e).nonzero().reshape(-1)
        n = int(low.numel())
        if n and int(low[-1]) != n - 1:
            fail(f"log2 table: binade {e}: the j with ceil = e are not 1..{n}")
        if not bool((row[1 + n:] == e + 1).all()):
            fail(f"log2 table: binade {e}: ceil is neither e nor e + 1")
        if n >= 4000:
            fail(f"log2 table: binade {e}: scan too short")
        table[e] = n
    # compress into runs of equal J_e
    runs = []
    for e in range(-126, 128):
        if runs and runs[-1]["J"] == table[e] and runs[-1]["e_max"] == e - 1:
            runs[-1]["e_max"] = e
        else:
            runs.append({"e_min": e, "e_max": e, "J": table[e]})
    # the same, as the brief's grid (k in -126..100, j in 1..64) counts it
    grid_diff = sum(min(table[e], 64) for e in range(-126, 101))
    # ceil(rn_f32(log2 x)) with the log2 taken in f64 (numpy), on the same points
    xd = x.numpy().astype(np.float64)
    ref = np.ceil(np.log2(xd).astype(np.float32)).astype(np.int64)
    f64_agrees = bool(np.array_equal(ref, c.numpy()))
    # pow(2, c) is exact over the whole range
    cs = torch.arange(-126, 128, dtype=torch.float32)
    pw = torch.pow(2.0, cs)
    pow_exact = bool(torch.equal(pw, torch.ldexp(torch.ones(254), cs)))
    return {"runs": runs, "grid_k_-126..100_j_1..64_differs": grid_diff, "grid_points": 227 * 64,
            "ceil_of_rn_f32_of_f64_log2_agrees_on_scanned_points": f64_agrees,
            "pow_2_c_exact_for_c_-126..127": pow_exact}


def exhaustive_log2(table: dict) -> None:
    """Every positive normal f32: ceil(torch.log2(x)) == ceil(rn_f32(f64 log2 x)), and the binade counts J_e."""
    J = {}
    for r in table["runs"]:
        for e in range(r["e_min"], r["e_max"] + 1):
            J[e] = r["J"]
    log2_bits_differ = 0
    for e in range(-126, 128):
        bits = np.arange((e + 127) << 23, (e + 128) << 23, dtype=np.uint32)
        x = bits.view(np.float32)
        tl = torch.log2(torch.from_numpy(x)).numpy()
        c = np.ceil(tl).astype(np.int64)
        ref = np.ceil(np.log2(x.astype(np.float64)).astype(np.float32)).astype(np.int64)
        log2_bits_differ += int((tl != np.log2(x.astype(np.float64)).astype(np.float32)).sum())
        if not np.array_equal(c, ref):
            fail(f"exhaustive log2: binade {e}: ceil(torch.log2) != ceil(rn_f32(f64 log2)) at "
                 f"{int((c != ref).sum())} values")
        want = np.full(x.size, e + 1)
        want[0] = e
        want[1:1 + J[e]] = e
        if not np.array_equal(c, want):
            fail(f"exhaustive log2: binade {e}: J_e = {J[e]} does not describe it")
    print(f"exhaustive log2: ok over every positive normal f32 (torch's f32 log2 differs from rn_f32(f64 log2) "
          f"at {log2_bits_differ} values, never in its ceil)", flush=True)


def e8m0_probes() -> dict:
    b = torch.tensor([0, 1, 2, 126, 127, 128, 253, 254, 255], dtype=torch.uint8)
    e = b.view(fm.E8M0)
    vals = torch.tensor([2.0 ** -127, 2.0 ** -126, 0.75, 1.0, 1.5, 3.0, 2.0 ** 127, float("inf"), float("nan"), 0.0,
                         -1.0], dtype=torch.float32)
    return {
        "decode_bytes": b.tolist(),
        "to_float32_bits": f32_hex(e.to(torch.float32)),
        "to_float32": [repr(v) for v in e.to(torch.float32).tolist()],
        "to_bfloat16_bits": ["0x%04x" % (v & 0xFFFF) for v in e.to(torch.bfloat16).view(torch.int16).tolist()],
        "to_float16_bits": ["0x%04x" % (v & 0xFFFF) for v in e.to(torch.float16).view(torch.int16).tolist()],
        "encode_float32": [repr(v) for v in vals.tolist()],
        "encode_float32_to_byte": vals.to(fm.E8M0).view(torch.uint8).tolist(),
        "note": "_quantize_one only casts exact powers of two in [2^-126, 2^127] (torch.pow(2.0, ceil(log2)))",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: tests/fixtures/fp8block)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"base seed (default {DEFAULT_SEED})")
    ap.add_argument("--no-probes", action="store_true", help="skip probes.json (live.sh uses this)")
    ap.add_argument("--exhaustive-log2", action="store_true",
                    help="also check the log2 table on every positive normal f32 (slow; output unchanged)")
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    vers = versions()
    for pkg, want in EXPECTED_VERSIONS.items():
        if vers[pkg] != want:
            print(f"expected {pkg} {want}, found {vers[pkg]}", file=sys.stderr)
            return 1
    os.makedirs(args.out, exist_ok=True)

    index = {"generator": GENERATOR, "base_seed": args.seed, "versions": vers,
             "library_entry_points": ENTRY_POINTS, "cases": []}
    for recipe in fm.case_list():
        name = recipe["name"]
        try:
            case = generate_case(args.out, args.seed, recipe, vers)
        except SystemExit:
            raise
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            fail(f"{name}: {type(e).__name__}: {e}")
        tot = {k: sum(c[k] for c in case["codes"].values()) for k in ("elements", "zero", "subnormal",
                                                                       "max_magnitude_448")}
        ties = sum(s["ties"] for s in case["formula_stats"].values())
        print(f"{name}: {len(case['quantized_modules'])} quantized modules ({len(case['ragged_modules'])} ragged), "
              f"formula ok ({tot['elements']} codes, {tot['subnormal']} subnormal, {tot['zero']} zero, "
              f"{tot['max_magnitude_448']} x 448, {ties} ties)", flush=True)
        index["cases"].append({"name": name, "dtype": case["dtype"], "scale_fmt": case["scale_fmt"],
                               "seed": case["seed"], "ckptkit_target": case["ckptkit_target"],
                               "exclude": case["exclude"], "quantized_modules": case["quantized_modules"]})
    fm.write_json(index, os.path.join(args.out, "index.json"))
    if not args.no_probes:
        table = log2_table()
        if args.exhaustive_log2:
            exhaustive_log2(table)
        probes = {"generator": GENERATOR, "versions": vers, "e8m0": e8m0_probes(),
                  "ue8m0_ceil_log2": {
                      "what": "transformers ue8m0: inv = 2^ceil(torch.log2(max(inv, 2^-126))) on f32. For x = 2^e (1 + "
                              "j 2^-23), j >= 1, the exact ceil(log2 x) is e + 1; torch gives e for j = 1..J "
                              "(rn_f32(e + log2(1 + j 2^-23)) rounds down to e), e + 1 for every larger j.",
                      **table}}
        fm.write_json(probes, os.path.join(args.out, "probes.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

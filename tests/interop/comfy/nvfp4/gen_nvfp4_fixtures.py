#!/usr/bin/env python3
"""Generate golden ComfyUI `nvfp4` fixtures (comfy-kitchen 0.2.40 TensorCoreNVFP4Layout, CPU eager backend).

    target/interop-venv/bin/python tests/interop/comfy/nvfp4/gen_nvfp4_fixtures.py \\
        --out tests/fixtures/comfy-nvfp4 --seed 20261202          # both are the defaults

Per case (nvfp4_models.CASES): <out>/<case>/{float,quantized,dequantized}.safetensors and case.json; then
<out>/index.json.  Aborts (exit 1) if the library's entry points disagree with each other (from_float(...).dequantize(),
the Params rebuilt from the saved tensors, comfy_kitchen.dequantize_nvfp4 cropped), if from_blocked or the independent
unswizzle formula disagree, if the independent restatement of the quantization (nvfp4_models.formula_quantize: g,
every code byte, every swizzled scale byte) or of the dequantization (formula_dequantize) differs from the library,
if a dequantized weight holds a NaN, or if a saved file does not load back bit for bit.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nvfp4_models as m  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "comfy-nvfp4")
DEFAULT_SEED = 20261202

COMFYUI_SOURCE = ("Comfy-Org/ComfyUI (formerly comfyanonymous/ComfyUI) at 5522e4fdda4249ac3b5331e55cc9df6135dcbd83: "
                  "comfy/ops.py _quantized_weight_state_dict / _load_quantized_module; comfy/quant_ops.py at "
                  "cd9452e366200c06c3893c06e3d26e64258a7aa1 (TensorCoreNVFP4Layout.quantize override, QUANT_ALGOS)")

ENTRY_POINTS = {
    "quantize": 'comfy_kitchen.tensor.QuantizedTensor.from_float(w, "TensorCoreNVFP4Layout") -> '
                "TensorCoreNVFP4Layout.quantize (g = torch.amax(w.abs()) / (448.0 * 6.0), computed in D, then "
                ".to(float32)) -> comfy_kitchen.quantize_nvfp4(w, g, pad_16x=(padding needed)) -> eager quantize_nvfp4 "
                "(zero-pad to 16x16; per 16-block b = clamp(amax.float() / 6 / g, max=448); b8 = b.to(float8_e4m3fn); "
                "tot = g * b8.float(); codes = _f32_to_floatx_unpacked(clamp(x.float() / tot, +-6), 2, 1) (0 where "
                "tot == 0); pack_uint4(hi_first=True); scales to_blocked(b8, flatten=False)).  ComfyUI's own "
                "comfy/quant_ops.py TensorCoreNVFP4Layout.quantize (registered over comfy-kitchen's) computes the same "
                "g and makes the same call when stochastic_rounding is 0",
    "state_dict": 'QuantizedTensor.state_dict("{m}.weight") -> {m}.weight (uint8 [R16, C16/2]), {m}.weight_scale '
                  "(float8_e4m3fn [roundup(R16,128), roundup(C16/16,4)]), {m}.weight_scale_2 (float32 []); stored "
                  "as they are (U8, F8_E4M3, F32)",
    "marker": 'ComfyUI comfy/ops.py _quantized_weight_state_dict: torch.tensor(list(json.dumps({"format": "nvfp4"})'
              '.encode("utf-8")), dtype=torch.uint8) (nothing else for nvfp4: "full_precision_matrix_mult" only when '
              "the loaded marker had it; input_scale / pre_quant_scale only when the module has them)",
    "dequantize": 'QuantizedTensor(q, "TensorCoreNVFP4Layout", TensorCoreNVFP4Layout.Params(scale=weight_scale_2, '
                  "block_scale=weight_scale.view(float8_e4m3fn), orig_dtype=D, orig_shape=(R, C))).dequantize() -> "
                  "comfy_kitchen.dequantize_nvfp4(q, g, s, D) on the padded [R16, C16] (hi nibble first; lut = E2M1 "
                  "values in D; from_blocked; ts = g.to(D) * s.to(D); lut[code] * ts in D), then "
                  "QuantizedTensor.dequantize crops to orig_shape",
    "dequantize_cross_check": "from_float(w, ...).dequantize(); comfy_kitchen.dequantize_nvfp4(q, g, s, D)[:R, :C]; "
                              "nvfp4_models.formula_dequantize (numpy: rne_D(e2m1(code) * rne_D(rne_D(g) * e4m3(b8))))",
    "quantize_cross_check": "nvfp4_models.formula_quantize (numpy, exact rational g, own E4M3 / E2M1 rounding and "
                            "swizzle) must give the library's g, code bytes and swizzled scale bytes exactly",
}

QUANTIZE_RULE = [
    "g = f32(rne_D(amax / 2688)), amax = max |w| over the logical (unpadded) tensor in D; 2688 = 448 * 6. "
    "(torch computes amax / 2688.0 in f32 and rounds once to D; checked over every positive finite bf16 and f16 "
    "value: identical to the exact rne_D(amax / 2688).)  For D = f32 it is the f32 quotient.",
    "per 16-element block of a row of the zero-padded [R16, C16] tensor: b = min(rne32(rne32(f32(amax_blk) / 6) / g), "
    "448) (two f32 divisions, in that order); b8 = rne_e4m3(b) (float8_e4m3fn, with subnormals k * 2^-9)",
    "tot = rne32(g * f32(b8)); code = 0 if tot == 0, else RNE E2M1 of clamp(rne32(f32(x) / tot), -6, 6) with the "
    "quotient's sign as bit 3 (a negative x that rounds to 0 gives code 8, -0; a block with tot == 0 gives +0 codes)",
    "byte j of a row = code[2j] << 4 | code[2j + 1] (even element in the HIGH nibble)",
    "weight_scale = to_blocked(b8 as [R16, C16/16]): byte of (r, c) at ((r//128)*(Cp//4) + c//4)*512 + (r%32)*16 + "
    "((r%128)//32)*4 + c%4 of the row-major [Rp, Cp] tensor; every other byte 0",
]
DEQUANTIZE_RULE = ("ts = rne_D(rne_D(g) * e4m3(b8)); w = rne_D(e2m1(code) * ts) (E2M1 -0 -> -0.0), on the padded "
                   "tensor, cropped to [R, C].  E4M3 byte 0 is +0: the block dequantizes to zeros")


def fail(msg: str):
    print(f"generator check failed: {msg}", file=sys.stderr)
    sys.exit(1)


def hexrows(a: np.ndarray) -> list:
    return [bytes(row.astype(np.uint8).tolist()).hex() for row in a]


def codec_checks() -> dict:
    """The restatement's E4M3 and E2M1 rounding against the library's own casts (torch's float32 -> float8_e4m3fn,
    which quantize_nvfp4 uses for the block scales, and float_utils._f32_to_floatx_unpacked(x, 2, 1) for the codes)
    on every representable value, every midpoint (the ties) and the float32 neighbours of every midpoint."""
    from comfy_kitchen.float_utils import _f32_to_floatx_unpacked

    def around(vals: np.ndarray) -> np.ndarray:
        mids = ((vals[:-1] + vals[1:]) / 2).astype(np.float32)
        return np.concatenate([vals.astype(np.float32), mids, np.nextafter(mids, np.float32(0)),
                               np.nextafter(mids, np.float32(np.inf))]).astype(np.float32)

    e4 = around(m.e4m3_decode(np.arange(0, 0x7F)))  # bytes 0..126: 0 .. 448 ascending
    e4 = e4[e4 <= m.F8_MAX]
    lib = torch.from_numpy(e4).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    if not np.array_equal(lib, m.e4m3_encode(e4)):
        bad = np.argwhere(lib != m.e4m3_encode(e4)).reshape(-1)
        fail(f"E4M3 rounding: {len(bad)} of {len(e4)} points differ from torch's cast; first {float(e4[bad[0]])!r}")
    e2 = around(m.E2M1_VALUES)
    e2 = np.concatenate([e2, -e2]).astype(np.float32)  # -0.0 included
    lib2 = _f32_to_floatx_unpacked(torch.from_numpy(e2.copy()), 2, 1).numpy()
    if not np.array_equal(lib2, m.e2m1_encode(e2)):
        bad = np.argwhere(lib2 != m.e2m1_encode(e2)).reshape(-1)
        fail(f"E2M1 rounding: {len(bad)} of {len(e2)} points differ from the library's; first {float(e2[bad[0]])!r}")
    return {"e4m3_points": int(len(e4)), "e2m1_points": int(len(e2)),
            "e4m3_ties_to_even": True, "e2m1_ties_to_even": True, "e2m1_negative_zero_code": int(m.e2m1_encode(
                np.array([-0.0], dtype=np.float32))[0])}


def edge_probe(w: torch.Tensor) -> dict:
    """What the library does with a [16, 16] tensor: g, the distinct block-scale / code bytes, NaN or not."""
    qt = m.library_quantize(w)
    part = qt.state_dict("p.weight")
    s = part["p.weight_scale"].view(torch.uint8)
    d = qt.dequantize()
    return {
        "input_amax": repr(float(w.abs().max().float())),
        "g": repr(float(part["p.weight_scale_2"])),
        "scale_bytes": sorted({int(v) for v in m.unswizzle(s, 16, 1).reshape(-1)}),
        "code_bytes": sorted({int(v) for v in part["p.weight"].reshape(-1)}),
        "dequantized_has_nan": bool(d.isnan().any()),
        "dequantized_all_zero": bool((d == 0).all()),
    }


def library_edge_cases(dtype: str) -> dict:
    D = m.DTYPES[dtype]
    ramp = torch.linspace(-1.0, 1.0, 256).reshape(16, 16)  # no zero element, every block non-zero
    underflow = {"bfloat16": 1e-38, "float16": 1e-5, "float32": 1e-42}[dtype]
    return {
        "all_zero_16x16": dict(edge_probe(torch.zeros(16, 16, dtype=D)),
                               note="g = 0, b = 0/0 = NaN: the scale byte is 0xFF (NaN) and every code byte 0xCC; "
                                    "the dequantization is all NaN (the library does not guard this)"),
        "ramp_times_1e-30": dict(edge_probe((ramp * 1e-30).to(D)),
                                 note="1e-30 is 0 in f16 (then this is the all-zero case); in bf16 / f32 g is a "
                                      "normal number and nothing special happens"),
        f"ramp_times_{underflow!r}": dict(edge_probe((ramp * underflow).to(D)),
                                          note="non-zero input whose g = rne_D(amax / 2688) underflows to 0: "
                                               "b = x/0 = inf -> 448 (byte 0x7E), tot = 0, every code 0, the "
                                               "dequantization is all zero (no NaN unless a block is all zero)"),
    }


def make_case(name: str, dtype: str, base_seed: int, out: str) -> dict:
    import comfy_kitchen as ck
    from comfy_kitchen.float_utils import from_blocked

    D = m.DTYPES[dtype]
    seed = m.case_seed(base_seed, name)
    fsd = m.float_state_dict(dtype, seed)
    qsd, dsd = {}, {}
    layers, modules = {}, []
    for s in m.SPECS:
        n = s["name"]
        st = m.stored_shapes(s["shape"]) if s["quantized"] else None
        extras = {k: s[k] for k in ("outlier", "small_rows", "zero_block") if k in s}
        if s.get("tiny"):
            extras["tiny_amax"] = m.TINY_AMAX[dtype]
        modules.append({"name": n, "logical_shape": s["shape"], "bias": s["bias"], "quantized": s["quantized"],
                        **({"stored_shapes": st} if st else {}), **extras})
    for k, w in fsd.items():
        mod = k[: -len(".weight")] if k.endswith(".weight") else None
        if mod not in m.quantized_modules():
            qsd[k] = w
            dsd[k] = w
            continue
        R, C = w.shape
        st = m.stored_shapes([R, C])
        qt = m.library_quantize(w)
        part = qt.state_dict(k)
        if set(part) != {k, f"{k}_scale", f"{k}_scale_2"}:
            fail(f"{mod}: state_dict keys {sorted(part)}")
        q, s, g = part[k].contiguous(), part[f"{k}_scale"].contiguous(), part[f"{k}_scale_2"].contiguous()
        if q.dtype != torch.uint8 or list(q.shape) != st["weight"]:
            fail(f"{mod}: weight {q.dtype} {list(q.shape)}")
        if s.dtype != torch.float8_e4m3fn or list(s.shape) != st["weight_scale"]:
            fail(f"{mod}: weight_scale {s.dtype} {list(s.shape)}")
        if g.dtype != torch.float32 or list(g.shape) != []:
            fail(f"{mod}: weight_scale_2 {g.dtype} {list(g.shape)}")
        qsd[k] = q
        qsd[f"{k}_scale"] = s
        qsd[f"{k}_scale_2"] = g
        qsd[f"{mod}.comfy_quant"] = m.comfy_quant_tensor()
        d = m.library_dequantize(q, s, g, D, (R, C))
        # cross-checks between the library's entry points
        for label, other in (("from_float(...).dequantize()", qt.dequantize()),
                             ("ck.dequantize_nvfp4 cropped", ck.dequantize_nvfp4(q, g, s, D)[:R, :C])):
            diff = m.same_tensor(d, other.contiguous())
            if diff:
                fail(f"{mod}: rebuilt-Params dequantize vs {label}: {diff}")
        if d.isnan().any() or d.isinf().any():
            fail(f"{mod}: the library's dequantization holds NaN / inf")
        r16, nb = st["scales_unswizzled"]
        s_u8 = s.view(torch.uint8)
        unsw = from_blocked(s_u8, r16, nb).contiguous()
        if not torch.equal(unsw, m.unswizzle(s_u8, r16, nb)):
            fail(f"{mod}: from_blocked and the unswizzle formula disagree")
        # the independent restatement of the quantization
        fq = m.formula_quantize(w, dtype)
        if np.float32(float(g)).view(np.uint32) != fq["g"].view(np.uint32):
            fail(f"{mod}: g {float(g)!r} (library) != {float(fq['g'])!r} (rule)")
        if not np.array_equal(fq["packed"], q.numpy()):
            diff = np.argwhere(fq["packed"] != q.numpy())
            r, c = diff[0]
            fail(f"{mod}: {len(diff)} code bytes differ from the rule; first [{r}, {c}]: library "
                 f"0x{int(q[r, c]):02x}, rule 0x{int(fq['packed'][r, c]):02x}")
        if not np.array_equal(fq["scales"], unsw.numpy()):
            diff = np.argwhere(fq["scales"] != unsw.numpy())
            r, c = diff[0]
            fail(f"{mod}: {len(diff)} block scales differ from the rule; first [{r}, {c}]: library "
                 f"0x{int(unsw[r, c]):02x}, rule 0x{int(fq['scales'][r, c]):02x}")
        if not np.array_equal(fq["swizzled"], s_u8.numpy()):
            fail(f"{mod}: the swizzled weight_scale differs from the rule's (padding bytes?)")
        # the independent restatement of the dequantization
        ind = m.formula_dequantize(q.numpy(), unsw.numpy(), float(g), dtype, R, C)
        diff = m.same_tensor(ind, d)
        if diff:
            fail(f"{mod}: independent dequantization differs: {diff}")
        dsd[k] = d
        sc = unsw.numpy().astype(np.int64)
        zero_blocks = [[int(a), int(b)] for a, b in np.argwhere(sc == 0).tolist()]
        qn = q.numpy()
        codes = np.stack([qn >> 4, qn & 0x0F], axis=-1).reshape(qn.shape[0], -1)  # the library's codes, unpacked
        layers[mod] = {
            "g": repr(float(g)),
            "g_f32_bits": m.f32_bits(float(g)),
            "g_is_subnormal_in_D": bool(0 < float(g) < torch.finfo(D).tiny),
            "amax": repr(float(w.abs().max().float())),
            "scales_unswizzled": sc.tolist(),
            "scales_unswizzled_hex": hexrows(sc),
            "scale_byte_range": [int(sc.min()), int(sc.max())],
            "e4m3_subnormal_scale_blocks": int(((sc > 0) & (sc < 8)).sum()),
            "blocks_clamped_at_448": fq["clamped_blocks"],
            "quotients_clamped_to_6": fq["quotients_clamped"],
            "negative_zero_codes": int((codes[:R, :C] == 8).sum()),
            "zero_scale_blocks_count": len(zero_blocks),
            "zero_scale_blocks_in_logical_area": [b for b in zero_blocks if b[0] < R and b[1] * m.BLOCK < C],
            "weight_padding_all_zero": bool((codes[R:, :] == 0).all() and (codes[:, C:] == 0).all()),
            "swizzle_padding_all_zero": int(s_u8.to(torch.int64).sum()) == int(sc.sum()),
        }
    cdir = os.path.join(out, name)
    os.makedirs(cdir, exist_ok=True)
    files = {"float.safetensors": fsd, "quantized.safetensors": qsd, "dequantized.safetensors": dsd}
    for fn, sd in files.items():
        p = os.path.join(cdir, fn)
        m.save_file(sd, p)
        back = m.load_tensors(p)
        if set(back) != set(sd) or any(m.same_tensor(back[k], sd[k].contiguous()) for k in sd):
            fail(f"{name}/{fn} does not load back identically")
    case = {
        "name": name,
        "dtype": dtype,
        "format": m.FORMAT,
        "layout": m.LAYOUT,
        "block_size": m.BLOCK,
        "base_seed": base_seed,
        "seed": seed,
        "seed_rule": "interop_common.case_seed(base_seed, name) = (base_seed * 1000003 + crc32(name)) % 2**31",
        "modules": modules,
        "quantized_modules": m.quantized_modules(),
        "comfy_quant_json": json.dumps({"format": m.FORMAT}),
        "comfyui_source": COMFYUI_SOURCE,
        "weight_storage": "U8 [R16, C16/2]: two E2M1 codes per byte, the even element of a row in the high nibble",
        "weight_scale_storage": "F8_E4M3: the library's float8_e4m3fn weight_scale as it is (ComfyUI views it as "
                                "float8_e4m3fn on load, so U8 bytes would load too); swizzled, cuBLAS 128x4 layout",
        "weight_scale_2_storage": "F32 [] (0-dim): g",
        "unswizzle_formula": "scale (r, c), r < R16, c < C16/16, is byte ((r//128)*(Cp//4) + c//4)*512 + (r%32)*16 + "
                             "((r%128)//32)*4 + c%4 of the row-major [Rp, Cp] weight_scale",
        "quantize_rule": QUANTIZE_RULE,
        "dequantize_rule": DEQUANTIZE_RULE,
        "layers": layers,
        "library_edge_cases": library_edge_cases(dtype),
        "files": {fn: {"sha256": m.sha256_file(os.path.join(cdir, fn)),
                       "header": m.file_header(os.path.join(cdir, fn))} for fn in files},
        "ckptkit_command": "migrate convert quantized.safetensors OUT --to plain --shapes-from float.safetensors",
        "library_entry_points": ENTRY_POINTS,
        "backend": "eager",
        "versions": {"comfy_kitchen": importlib.metadata.version("comfy-kitchen"), "torch": torch.__version__,
                     "safetensors": importlib.metadata.version("safetensors"), "numpy": np.__version__,
                     "python": sys.version.split()[0]},
    }
    m.write_json(case, os.path.join(cdir, "case.json"))
    return case


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    from comfy_kitchen.registry import registry

    v = importlib.metadata.version("comfy-kitchen")
    if v != m.CK_VERSION:
        fail(f"comfy-kitchen {v} installed, fixtures are for {m.CK_VERSION}")
    os.makedirs(args.out, exist_ok=True)
    index = {"generator": "tests/interop/comfy/nvfp4/gen_nvfp4_fixtures.py", "base_seed": args.seed, "cases": []}
    with registry.use_backend("eager"):
        index["codec_checks"] = codec_checks()
        for name, dtype in m.CASES:
            c = make_case(name, dtype, args.seed, args.out)
            index["cases"].append({"name": name, "dtype": dtype, "seed": c["seed"]})
            print(f"wrote {os.path.join(args.out, name)}")
    index["versions"] = c["versions"]
    m.write_json(index, os.path.join(args.out, "index.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

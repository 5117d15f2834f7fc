#!/usr/bin/env python3
"""Generate golden ComfyUI `mxfp8` fixtures (comfy-kitchen 0.2.40 TensorCoreMXFP8Layout, CPU eager backend).

    target/interop-venv/bin/python tests/interop/comfy/mxfp8/gen_mxfp8_fixtures.py \\
        --out tests/fixtures/comfy-mxfp8 --seed 20261202          # both are the defaults

Per case (mxfp8_models.CASES): <out>/<case>/{float,quantized,dequantized}.safetensors and case.json; then
<out>/index.json.  Aborts (exit 1) if the library's entry points disagree with each other (from_float(...).dequantize(),
the Params rebuilt from the saved U8 scale, comfy_kitchen.dequantize_mxfp8 cropped), if from_blocked or the
independent unswizzle formula disagree, if the independent dequantization (fp8 code x 2^(e-127), one rounding to D)
differs, or if a saved file does not load back bit for bit.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mxfp8_models as m  # noqa: E402

import torch  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "comfy-mxfp8")
DEFAULT_SEED = 20261202

ENTRY_POINTS = {
    "quantize": 'comfy_kitchen.tensor.QuantizedTensor.from_float(w, "TensorCoreMXFP8Layout") -> '
                "TensorCoreMXFP8Layout.quantize -> comfy_kitchen.quantize_mxfp8(w, pad_32x=(padding needed)) -> "
                "eager quantize_mxfp8 (zero-pad to 32x32; per 32-block amax; e = clamp(ceil(log2(max(amax/448, "
                "2^-127))) + 127, 0, 254), 0 for an all-zero block; codes = clamp(x.float() / 2^(e-127), +-448) "
                "-> float8_e4m3fn; scales to_blocked(flatten=False) viewed as float8_e8m0fnu)",
    "state_dict": 'QuantizedTensor.state_dict("{m}.weight") -> {m}.weight (float8_e4m3fn [R32, C32]), '
                  "{m}.weight_scale (float8_e8m0fnu [roundup(R32,128), roundup(C32/32,4)]); the fixture stores "
                  "weight_scale.view(torch.uint8) (U8, same bytes)",
    "marker": 'ComfyUI comfy/ops.py _quantized_weight_state_dict: torch.tensor(list(json.dumps({"format": "mxfp8"})'
              '.encode("utf-8")), dtype=torch.uint8) (no extra keys for mxfp8)',
    "dequantize": 'QuantizedTensor(q, "TensorCoreMXFP8Layout", TensorCoreMXFP8Layout.Params(scale=s_u8.view('
                  "torch.float8_e8m0fnu), orig_dtype=D, orig_shape=(R, C))).dequantize() -> "
                  "comfy_kitchen.dequantize_mxfp8(q, s, D) on the padded [R32, C32] (from_blocked; e8m0_to_f32; "
                  "q.float() * scale; .to(D)), then QuantizedTensor.dequantize crops to orig_shape",
    "dequantize_cross_check": "from_float(w, ...).dequantize(); comfy_kitchen.dequantize_mxfp8(q, s, D)[:R, :C]; "
                              "fp8 code (torch cast to f32) * 2^(e-127) (e = 0 -> 0), rounded once to D",
}


def fail(msg: str):
    print(f"generator check failed: {msg}", file=sys.stderr)
    sys.exit(1)


def e8m0_facts() -> dict:
    from comfy_kitchen.float_utils import e8m0_to_f32

    v = e8m0_to_f32(torch.tensor([0, 1, 127, 254, 255], dtype=torch.uint8))
    return {str(b): repr(float(x)) for b, x in zip([0, 1, 127, 254, 255], v)}


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
        modules.append({"name": n, "logical_shape": s["shape"], "bias": s["bias"], "quantized": s["quantized"],
                        **({"stored_shapes": st} if st else {}),
                        **{k: s[k] for k in ("outlier", "zero_block") if k in s}})
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
        if set(part) != {k, f"{k}_scale"}:
            fail(f"{mod}: state_dict keys {sorted(part)}")
        q, s_lib = part[k].contiguous(), part[f"{k}_scale"].contiguous()
        if q.dtype != torch.float8_e4m3fn or list(q.shape) != st["weight"]:
            fail(f"{mod}: weight {q.dtype} {list(q.shape)}")
        if s_lib.dtype != torch.float8_e8m0fnu or list(s_lib.shape) != st["weight_scale"]:
            fail(f"{mod}: weight_scale {s_lib.dtype} {list(s_lib.shape)}")
        s = s_lib.view(torch.uint8).clone()
        qsd[k] = q
        qsd[f"{k}_scale"] = s
        qsd[f"{mod}.comfy_quant"] = m.comfy_quant_tensor()
        d = m.library_dequantize(q, s, D, (R, C))
        # cross-checks
        for label, other in (("from_float(...).dequantize()", qt.dequantize()),
                             ("ck.dequantize_mxfp8 cropped", ck.dequantize_mxfp8(q, s_lib, D)[:R, :C])):
            diff = m.same_tensor(d, other.contiguous())
            if diff:
                fail(f"{mod}: rebuilt-Params dequantize vs {label}: {diff}")
        r32, nb = st["scales_unswizzled"]
        unsw = from_blocked(s, r32, nb)
        if not torch.equal(unsw, m.unswizzle(s, r32, nb)):
            fail(f"{mod}: from_blocked and the unswizzle formula disagree")
        e = unsw.to(torch.int64)
        scale_f = torch.where(e == 0, torch.zeros_like(e, dtype=torch.float64), torch.exp2((e - 127).double()))
        ind = (q.to(torch.float64).reshape(r32, nb, m.BLOCK) * scale_f.unsqueeze(-1)).reshape(r32, -1)[:R, :C]
        diff = m.same_tensor(ind.to(torch.float32).to(D), d)  # exact in f64 and f32, so one rounding to D
        if diff:
            fail(f"{mod}: independent dequantization differs: {diff}")
        dsd[k] = d
        zero_blocks = [[int(a), int(b)] for a, b in torch.nonzero(unsw == 0).tolist()]
        layers[mod] = {
            "scales_unswizzled": unsw.tolist(),
            "scale_byte_range": [int(unsw.min()), int(unsw.max())],
            "zero_scale_blocks_count": len(zero_blocks),
            "zero_scale_blocks_in_logical_rows": [b for b in zero_blocks if b[0] < R],
            "weight_padding_all_zero": bool((q.view(torch.uint8)[R:, :] == 0).all()
                                            and (q.view(torch.uint8)[:, C:] == 0).all()),
            "swizzle_padding_all_zero": int(s.view(-1).sum()) == int(unsw.to(torch.int64).sum()),
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
        "weight_scale_storage": "U8: the bytes of the library's float8_e8m0fnu weight_scale (ComfyUI's safetensors "
                                "reader has no F8_E8M0); swizzled, cuBLAS 128x4 layout",
        "unswizzle_formula": "scale (r, c), r < R32, c < C32/32, is byte (r//128)*(Cp//4)*512 + (c//4)*512 + "
                             "(r%32)*16 + ((r%128)//32)*4 + c%4 of the row-major [Rp, Cp] weight_scale",
        "e8m0_to_f32_library": e8m0_facts(),
        "layers": layers,
        "files": {fn: {"sha256": m.sha256_file(os.path.join(cdir, fn)),
                       "header": m.file_header(os.path.join(cdir, fn))} for fn in files},
        "ckptkit_command": "migrate convert quantized.safetensors OUT --to plain --shapes-from float.safetensors",
        "library_entry_points": ENTRY_POINTS,
        "backend": "eager",
        "versions": {"comfy_kitchen": importlib.metadata.version("comfy-kitchen"), "torch": torch.__version__,
                     "safetensors": importlib.metadata.version("safetensors"),
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
    index = {"generator": "tests/interop/comfy/mxfp8/gen_mxfp8_fixtures.py", "base_seed": args.seed, "cases": []}
    with registry.use_backend("eager"):
        for name, dtype in m.CASES:
            c = make_case(name, dtype, args.seed, args.out)
            index["cases"].append({"name": name, "dtype": dtype, "seed": c["seed"]})
            print(f"wrote {os.path.join(args.out, name)}")
    index["versions"] = c["versions"]
    m.write_json(index, os.path.join(args.out, "index.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

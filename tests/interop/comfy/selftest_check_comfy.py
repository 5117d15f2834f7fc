#!/usr/bin/env python3
"""Self-test of check_comfy.py on the committed fixtures.

    target/interop-venv/bin/python tests/interop/comfy/selftest_check_comfy.py [--fixtures DIR] [--only SUBSTR]

For every case:
1. The library's own files must pass (exit 0): OURS = quantized.safetensors, PLAIN = float.safetensors
   with the quantized weights replaced by dequantized.safetensors; also OURS with extra
   `__metadata__` entries, and with a consistent ComfyUI `_quantization_metadata`.
2. Deliberately corrupted copies must fail (exit 1), each with the message it was built for: one
   code byte flipped, the comfy_quant JSON changed (other format; same dict with other bytes; an
   extra key), a scale changed (one ulp; doubled; another shape or dtype), a missing / an unexpected
   key, an inconsistent `_quantization_metadata`, and corrupted PLAIN files.  The int8_tensorwise
   cases add their own: a -128 code changed, a tensorwise scale broadcast to [out, 1] and a rowwise
   scale collapsed to one value or stored as [out], the zero row's 1e-30 scale stored as 0 (equal
   dequantization: only (b) can see these), the marker naming an fp8 format or carrying `per_row`.
3. --ours-plain alone checks only (d); usage errors (a missing file, neither file) must exit 2.

Runs check_comfy.main() in-process.  Exit 0 if every expectation holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import check_comfy  # noqa: E402
import comfy_models as cm  # noqa: E402

import torch  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
DEFAULT_FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "comfy")


def run_checker(argv: list) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = check_comfy.main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue() + err.getvalue()


def other_format(fmt: str) -> str:
    """Another per-tensor format for the marker: the other fp8 format, or float8_e4m3fn for int8."""
    return next(f for f in cm.FORMATS if f != fmt)


def storage_dtype(fmt: str) -> torch.dtype:
    return cm.FORMAT_LAYOUTS[fmt][1]


def ours_corruptions(case: dict):
    """(label, change(sd) -> optional metadata, substring the checker output must contain)."""
    fmt = case["format"]
    if fmt == cm.INT8_FORMAT:
        return int8_ours_corruptions(case)
    out = []

    def flip(sd):
        t = sd["lin_a.weight"].clone()
        t.view(torch.uint8).reshape(-1)[5] ^= 0x01
        sd["lin_a.weight"] = t
    out.append(("flip one code byte of lin_a.weight", flip, ["(b) lin_a.weight", "(c) lin_a.weight"]))

    def cq_format(sd):
        sd["lin_ragged.comfy_quant"] = cm.comfy_quant_tensor(other_format(fmt))
    out.append(("comfy_quant says the other fp8 format", cq_format,
                ["(b) lin_ragged.comfy_quant: comfy_quant decodes", "comfy_quant bytes"]))

    def cq_bytes(sd):
        sd["lin_nobias.comfy_quant"] = torch.tensor(
            list(json.dumps({"format": fmt}, separators=(",", ":")).encode()), dtype=torch.uint8)
    out.append(("comfy_quant: same dict, compact separators", cq_bytes, ["(b) lin_nobias.comfy_quant: comfy_quant bytes"]))

    def cq_extra(sd):
        sd["lin_neg.comfy_quant"] = cm.comfy_quant_tensor(fmt, full_precision_matrix_mult=True)
    out.append(("comfy_quant with an extra key", cq_extra, ["(b) lin_neg.comfy_quant: comfy_quant decodes"]))

    def scale_ulp(sd):
        s = sd["lin_wide.weight_scale"]
        sd["lin_wide.weight_scale"] = torch.nextafter(s, torch.tensor(float("inf")))
    # (c) alone may not see this one: ComfyUI rounds the scale to the model dtype before multiplying
    out.append(("lin_wide.weight_scale one f32 ulp larger", scale_ulp, ["(b) lin_wide.weight_scale"]))

    def scale_x2(sd):
        sd["lin_wide.weight_scale"] = sd["lin_wide.weight_scale"] * 2
    out.append(("lin_wide.weight_scale doubled", scale_x2, ["(b) lin_wide.weight_scale", "(c) lin_wide.weight"]))

    def scale_shape(sd):
        sd["lin_a.weight_scale"] = sd["lin_a.weight_scale"].reshape(1)
    out.append(("lin_a.weight_scale with shape [1]", scale_shape, ["(b) lin_a.weight_scale: shape"]))

    def scale_bf16(sd):
        sd["lin_ragged.weight_scale"] = sd["lin_ragged.weight_scale"].to(torch.bfloat16)
    out.append(("lin_ragged.weight_scale stored as BF16", scale_bf16, ["(b) lin_ragged.weight_scale: dtype"]))

    def drop(sd):
        del sd["lin_neg.comfy_quant"]
    out.append(("drop lin_neg.comfy_quant", drop, ["(a) key sets differ; missing from ours: ['lin_neg.comfy_quant']"]))

    def extra(sd):
        sd["lin_skip.comfy_quant"] = cm.comfy_quant_tensor(fmt)
    out.append(("add lin_skip.comfy_quant", extra, ["unexpected in ours: ['lin_skip.comfy_quant']"]))

    def codes_other_dtype(sd):
        sd["lin_nobias.weight"] = sd["lin_nobias.weight"].view(torch.uint8)
    out.append(("lin_nobias.weight codes stored as U8", codes_other_dtype,
                ["(b) lin_nobias.weight: dtype", "(c) lin_nobias: ours' weight is torch.uint8"]))

    def cq_int8(sd):
        sd["lin_a.comfy_quant"] = cm.comfy_quant_tensor(cm.INT8_FORMAT)
    out.append(("comfy_quant says int8_tensorwise", cq_int8,
                ["(b) lin_a.comfy_quant: comfy_quant decodes",
                 f"(c) lin_a: ours' weight is {storage_dtype(fmt)}; ComfyUI's int8_tensorwise layout stores torch.int8"]))

    out.append(bad_qmeta_corruption(case))
    return out


def bad_qmeta_corruption(case: dict):
    fmt = case["format"]

    def bad_qmeta(sd):
        layers = {m: {"format": fmt} for m in cm.quantized_module_names(case) if m != "lin_a"}
        layers["lin_skip"] = {"format": fmt}
        return {"format": "pt", "_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    return ("_quantization_metadata naming lin_skip instead of lin_a", bad_qmeta, ["(a) ours: _quantization_metadata layers"])


def int8_ours_corruptions(case: dict):
    """The int8_tensorwise cases (tensorwise: scale []; rowwise: scale [out, 1])."""
    fmt = case["format"]
    per_row = bool(case["per_row"])
    out = []

    def flip(sd):
        t = sd["lin_a.weight"].clone()
        t.view(torch.uint8).reshape(-1)[5] ^= 0x01
        sd["lin_a.weight"] = t
    out.append(("flip one code byte of lin_a.weight", flip, ["(b) lin_a.weight", "(c) lin_a.weight"]))

    def code_m128(sd):
        t = sd["lin_neg.weight"].clone()
        flat = t.reshape(-1)
        i = int((flat == -128).nonzero()[0]) if bool((flat == -128).any()) else int(flat.abs().argmax())
        flat[i] = -127 if int(flat[i]) == -128 else -128
        sd["lin_neg.weight"] = t
    what = "the -128 code of lin_neg.weight as -127" if case["minus_128_modules"] else         "lin_neg.weight's largest code as -128"
    out.append((what, code_m128, ["(b) lin_neg.weight", "(c) lin_neg.weight"]))

    def cq_format(sd):
        sd["lin_ragged.comfy_quant"] = cm.comfy_quant_tensor("float8_e4m3fn")
    out.append(("comfy_quant says float8_e4m3fn", cq_format,
                ["(b) lin_ragged.comfy_quant: comfy_quant decodes",
                 "(c) lin_ragged: ours' weight is torch.int8; ComfyUI's float8_e4m3fn layout stores torch.float8_e4m3fn"]))

    def cq_bytes(sd):
        sd["lin_nobias.comfy_quant"] = torch.tensor(
            list(json.dumps({"format": fmt}, separators=(",", ":")).encode()), dtype=torch.uint8)
    out.append(("comfy_quant: same dict, compact separators", cq_bytes, ["(b) lin_nobias.comfy_quant: comfy_quant bytes"]))

    def cq_per_row(sd):
        sd["lin_neg.comfy_quant"] = cm.comfy_quant_tensor(fmt, per_row=per_row)
    out.append(("comfy_quant with an extra per_row key (as convert-to-quant writes)", cq_per_row,
                ["(b) lin_neg.comfy_quant: comfy_quant decodes"]))

    def scale_ulp(sd):
        s = sd["lin_wide.weight_scale"].clone()
        s.reshape(-1)[0] = torch.nextafter(s.reshape(-1)[0], torch.tensor(float("inf")))
        sd["lin_wide.weight_scale"] = s
    out.append(("lin_wide.weight_scale (first element) one f32 ulp larger", scale_ulp,
                ["(b) lin_wide.weight_scale", "(c) lin_wide.weight"] if case["dtype"] == "float32"
                else ["(b) lin_wide.weight_scale"]))

    def scale_x2(sd):
        sd["lin_wide.weight_scale"] = sd["lin_wide.weight_scale"] * 2
    out.append(("lin_wide.weight_scale doubled", scale_x2, ["(b) lin_wide.weight_scale", "(c) lin_wide.weight"]))

    def scale_bf16(sd):
        sd["lin_ragged.weight_scale"] = sd["lin_ragged.weight_scale"].to(torch.bfloat16)
    out.append(("lin_ragged.weight_scale stored as BF16", scale_bf16, ["(b) lin_ragged.weight_scale: dtype"]))

    if per_row:
        def scale_flat(sd):
            sd["lin_a.weight_scale"] = sd["lin_a.weight_scale"].reshape(-1)
        out.append(("lin_a.weight_scale stored as [out] (1-D)", scale_flat,
                    ["(b) lin_a.weight_scale: shape", "(c) lin_a: ours' weight_scale is torch.float32 (16,), not a float"]))

        def scale_one(sd):
            sd["lin_a.weight_scale"] = sd["lin_a.weight_scale"].max().reshape(())
        out.append(("lin_a.weight_scale collapsed to one 0-dim scale (the largest row's)", scale_one,
                    ["(b) lin_a.weight_scale: shape", "(c) lin_a.weight"]))

        zr = case["zero_rows"]["lin_neg"][0]

        def zero_row_scale(sd):
            s = sd["lin_neg.weight_scale"].clone()
            s[zr, 0] = 0.0
            sd["lin_neg.weight_scale"] = s
        # the zero row's codes are 0, so 0 * 0 and 0 * 1e-30 dequantize alike: only (b) sees this
        out.append((f"lin_neg.weight_scale of the zero row {zr} stored as 0 instead of 1e-30", zero_row_scale,
                    ["(b) lin_neg.weight_scale"]))
    else:
        def scale_shape(sd):
            sd["lin_a.weight_scale"] = sd["lin_a.weight_scale"].reshape(1)
        out.append(("lin_a.weight_scale with shape [1]", scale_shape,
                    ["(b) lin_a.weight_scale: shape", "(c) lin_a: ours' weight_scale is torch.float32 (1,)"]))

        def scale_rows(sd):
            n = sd["lin_a.weight"].shape[0]
            sd["lin_a.weight_scale"] = sd["lin_a.weight_scale"].reshape(1, 1).expand(n, 1).contiguous()
        # the same value on every row dequantizes alike: only (b) sees this
        out.append(("lin_a.weight_scale broadcast to [out, 1] (same value per row)", scale_rows,
                    ["(b) lin_a.weight_scale: shape"]))

    def drop(sd):
        del sd["lin_neg.comfy_quant"]
    out.append(("drop lin_neg.comfy_quant", drop, ["(a) key sets differ; missing from ours: ['lin_neg.comfy_quant']"]))

    def drop_scale(sd):
        del sd["lin_nobias.weight_scale"]
    out.append(("drop lin_nobias.weight_scale", drop_scale,
                ["missing from ours: ['lin_nobias.weight_scale']", "(c) lin_nobias: ours lacks"]))

    def extra(sd):
        sd["lin_skip.comfy_quant"] = cm.comfy_quant_tensor(fmt)
    out.append(("add lin_skip.comfy_quant", extra, ["unexpected in ours: ['lin_skip.comfy_quant']"]))

    def codes_u8(sd):
        sd["lin_nobias.weight"] = sd["lin_nobias.weight"].view(torch.uint8)
    out.append(("lin_nobias.weight codes stored as U8", codes_u8,
                ["(b) lin_nobias.weight: dtype", "(c) lin_nobias: ours' weight is torch.uint8"]))

    def codes_f8(sd):
        sd["lin_nobias.weight"] = sd["lin_nobias.weight"].view(torch.float8_e4m3fn)
    out.append(("lin_nobias.weight bytes stored as F8_E4M3", codes_f8,
                ["(b) lin_nobias.weight: dtype", "(c) lin_nobias: ours' weight is torch.float8_e4m3fn"]))

    out.append(bad_qmeta_corruption(case))
    return out


def plain_corruptions(case: dict):
    def weight(sd):
        t = sd["lin_a.weight"].clone()
        t.view(torch.uint8).reshape(-1)[0] ^= 0x01
        sd["lin_a.weight"] = t

    def bias(sd):
        sd["lin_wide.bias"] = sd["lin_wide.bias"] * 2

    def dtype(sd):
        sd["lin_neg.weight"] = sd["lin_neg.weight"].to(torch.float32 if sd["lin_neg.weight"].dtype != torch.float32
                                                        else torch.bfloat16)

    def drop(sd):
        del sd["conv.weight"]

    def codes(sd):
        sd["lin_ragged.weight"] = sd["lin_ragged.weight"].to(storage_dtype(case["format"]))

    return [
        ("plain lin_a.weight one bit changed", weight, ["(d) plain lin_a.weight vs library dequantization"]),
        ("plain lin_wide.bias doubled", bias, ["(d) plain lin_wide.bias vs float"]),
        ("plain lin_neg.weight in another dtype", dtype, ["(d) plain lin_neg.weight vs library dequantization: dtype"]),
        ("plain without conv.weight", drop, ["(d) plain: key sets differ", "missing: ['conv.weight']"]),
        ("plain lin_ragged.weight left in the codes' dtype", codes,
         ["(d) plain lin_ragged.weight vs library dequantization: dtype"]),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixtures", default=DEFAULT_FIXTURES)
    ap.add_argument("--only", default=None, help="only cases whose name contains this string")
    args = ap.parse_args()

    with open(os.path.join(args.fixtures, "index.json")) as f:
        index = json.load(f)
    failures = []
    checks = 0

    def expect(label: str, argv: list, want_rc: int, needles=()):
        nonlocal checks
        checks += 1
        rc, text = run_checker(argv)
        missing = [n for n in needles if n not in text]
        if rc != want_rc or missing:
            failures.append(f"{label}: exit {rc} (want {want_rc}); missing {missing}\n{text}")
            print(f"  FAIL {label}: exit {rc} (want {want_rc}), missing {missing}")
        else:
            print(f"  ok   {label}")

    with tempfile.TemporaryDirectory() as tmp:
        for entry in index["cases"]:
            name = entry["name"]
            if args.only and args.only not in name:
                continue
            cdir = os.path.join(args.fixtures, name)
            case = cm.load_case(cdir)
            print(name)
            lib_path = os.path.join(cdir, "quantized.safetensors")
            lib = cm.load_tensors(lib_path)
            float_sd = cm.load_tensors(os.path.join(cdir, "float.safetensors"))
            deq = cm.load_tensors(os.path.join(cdir, "dequantized.safetensors"))
            plain = {k: deq.get(k, v) for k, v in float_sd.items()}
            plain_path = os.path.join(tmp, f"{name}-plain.safetensors")
            cm.save_file(plain, plain_path)

            expect("library's own file + library plain", ["--case", cdir, "--ours", lib_path,
                                                         "--ours-plain", plain_path], 0)
            p = os.path.join(tmp, f"{name}-meta.safetensors")
            cm.save_file(lib, p, metadata={"format": "pt", "ckptkit.layout": "anything", "x": "y"})
            expect("library's file with extra __metadata__", ["--case", cdir, "--ours", p], 0)
            layers = {m: {"format": case["format"]} for m in cm.quantized_module_names(case)}
            cm.save_file(lib, p, metadata={"_quantization_metadata": json.dumps(
                {"format_version": "1.0", "layers": layers})})
            expect("library's file with a consistent _quantization_metadata", ["--case", cdir, "--ours", p], 0)

            for label, change, needles in ours_corruptions(case):
                sd = dict(lib)
                meta = change(sd)
                p = os.path.join(tmp, f"{name}-bad.safetensors")
                cm.save_file(sd, p, metadata=meta)
                expect(label, ["--case", cdir, "--ours", p], 1, needles)
            for label, change, needles in plain_corruptions(case):
                sd = dict(plain)
                change(sd)
                p = os.path.join(tmp, f"{name}-badplain.safetensors")
                cm.save_file(sd, p)
                expect(label, ["--case", cdir, "--ours", lib_path, "--ours-plain", p], 1, needles)
            expect("library plain alone (--ours-plain only)", ["--case", cdir, "--ours-plain", plain_path], 0)
            expect("neither --ours nor --ours-plain", ["--case", cdir], 2)
            expect("missing --ours file", ["--case", cdir, "--ours", os.path.join(tmp, "nope.safetensors")], 2)

    print(f"selftest_check_comfy: {checks - len(failures)} of {checks} expectations hold")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Self-test of check_int8.py on the committed fixtures.

    /work/venv-int8/bin/python tests/interop/int8/selftest_check_int8.py [--fixtures DIR] [--only SUBSTR] [--all-corruptions]

1. Every case's own files (ours = the library's model.safetensors + config.json, expected =
   the library's dequantized.safetensors) must pass with --require-identical-tensors (exit 0).
2. Deliberately corrupted copies must fail (exit 1), each for the reason it was built for;
   by default on one case per form (ct pack channel, ct pack group, ct int, bnb), with
   --all-corruptions on every case.
3. Usage errors (a missing file) must exit 2.
4. Known tolerated differences must pass without --require-identical-tensors but fail with it
   (CT pack-quantized: a non-zero padding byte is ignored by CT's unpacking).

Runs check_int8.main() in-process (the library imports are paid once).  Exit 0 if every
expectation holds, 1 otherwise.
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
import check_int8  # noqa: E402
import int8_models as im  # noqa: E402

import torch  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
DEFAULT_FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "int8")


def run_checker(argv: list) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["check_int8.py"] + argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = check_int8.main()
            except SystemExit as e:  # argparse
                rc = e.code if isinstance(e.code, int) else 2
    finally:
        sys.argv = old
    return rc, out.getvalue() + err.getvalue()


def save(sd: dict, path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata={"format": "pt"})


def corruptions(case: dict):
    """(label, what to change, substring the checker output must contain)."""
    q = im.quantized_module_names(case)
    m = "lin_i256"
    assert m in q
    out = []
    if case["library"] == im.CT:
        if case["form"] == "pack-quantized":
            def flip(sd):
                t = sd[f"{m}.weight_packed"].clone()
                b = t.view(torch.uint8).reshape(-1)
                b[5] ^= 0x01  # element 5 of row 0
                sd[f"{m}.weight_packed"] = t
            out.append(("flip one q byte in weight_packed", flip, None, "vs library dequantization"))

            def drop_shape(sd):
                del sd[f"{m}.weight_shape"]
            out.append(("drop weight_shape", drop_shape, None, "missing from ours"))

            def shape_i32(sd):
                sd[f"{m}.weight_shape"] = sd[f"{m}.weight_shape"].to(torch.int32)
            out.append(("weight_shape as I32", shape_i32, None, "weight_shape"))

            def packed_as_i8(sd):
                t = sd[f"{m}.weight_packed"]
                sd[f"{m}.weight_packed"] = (t.view(torch.uint8).to(torch.int16) - 128).to(torch.int8).reshape(t.shape[0], -1)
            out.append(("weight_packed stored as I8 [out, in]", packed_as_i8, None, "weight_packed"))
        else:
            def flip(sd):
                t = sd[f"{m}.weight"].clone()
                t[0, 5] = t[0, 5] + 1 if t[0, 5] < 127 else t[0, 5] - 1
                sd[f"{m}.weight"] = t
            out.append(("change one int8 weight", flip, None, "vs library dequantization"))

        def scale_dtype(sd):
            s = sd[f"{m}.weight_scale"]
            sd[f"{m}.weight_scale"] = s.to(torch.float16 if s.dtype == torch.float32 else torch.float32)
        out.append(("weight_scale in another dtype", scale_dtype, None, "weight_scale"))

        def scale_127(sd):
            # the scale a "amax/127" convention would write: same q bytes, different scale
            s = sd[f"{m}.weight_scale"]
            sd[f"{m}.weight_scale"] = (s.float() * 127.5 / 127.0).to(s.dtype)
        out.append(("weight_scale = amax/127 instead of amax/127.5", scale_127, None, "vs library dequantization"))

        def add_zp(sd):
            s = sd[f"{m}.weight_scale"]
            sd[f"{m}.weight_zero_point"] = torch.zeros(s.shape, dtype=torch.int8)
        out.append(("extra weight_zero_point (symmetric)", add_zp, None, "unexpected in ours"))

        def cfg_group(c):
            g = c["quantization_config"]["config_groups"]["group_0"]["weights"]
            if g["strategy"] == "group":
                g["group_size"] = 64
            else:
                g["strategy"], g["group_size"] = "group", 32
        out.append(("config: different strategy/group_size", None, cfg_group, "config"))

        def cfg_method(c):
            c["quantization_config"]["quant_method"] = "bitsandbytes"
        out.append(("config: wrong quant_method", None, cfg_method, "quant_method"))
    else:
        def flip(sd):
            t = sd[f"{m}.weight"].clone()
            t[0, 5] = t[0, 5] + 1 if t[0, 5] < 127 else t[0, 5] - 1
            sd[f"{m}.weight"] = t
        out.append(("change one int8 weight", flip, None, "vs library dequantization"))

        def drop_scb(sd):
            del sd[f"{m}.SCB"]
        out.append(("drop SCB", drop_scb, None, "missing from ours"))

        def scb_f16(sd):
            sd[f"{m}.SCB"] = sd[f"{m}.SCB"].to(torch.float16)
        out.append(("SCB as F16", scb_f16, None, "SCB"))

        def scb_div127(sd):
            sd[f"{m}.SCB"] = sd[f"{m}.SCB"] / 127.0
        out.append(("SCB stored as amax/127 (a CT-style scale)", scb_div127, None, "vs library dequantization"))

        def fmt_col32(sd):
            sd[f"{m}.weight_format"] = torch.tensor(1, dtype=torch.uint8)
        out.append(("weight_format = 1 (col32)", fmt_col32, None, "weight_format"))

        def drop_fmt(sd):
            del sd[f"{m}.weight_format"]
        out.append(("drop weight_format", drop_fmt, None, "missing from ours"))

        def cfg_4bit(c):
            c["quantization_config"]["load_in_8bit"] = False
            c["quantization_config"]["load_in_4bit"] = True
            c["quantization_config"]["_load_in_8bit"] = False
            c["quantization_config"]["_load_in_4bit"] = True
        out.append(("config: load_in_4bit instead of load_in_8bit", None, cfg_4bit, "config"))

    def bias_change(sd):
        sd[f"{m}.bias"] = (sd[f"{m}.bias"].float() + 1).to(sd[f"{m}.bias"].dtype)
    out.append(("bias changed", bias_change, None, "plain tensor"))

    def drop_module(sd):
        for k in [k for k in sd if k.startswith("lin_o1.")]:
            del sd[k]
    out.append(("a whole quantized module missing", drop_module, None, "missing from ours"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixtures", default=DEFAULT_FIXTURES)
    ap.add_argument("--only", default=None)
    ap.add_argument("--all-corruptions", action="store_true")
    args = ap.parse_args()

    cases = sorted(d for d in os.listdir(args.fixtures) if os.path.isfile(os.path.join(args.fixtures, d, "case.json")))
    if args.only:
        cases = [c for c in cases if args.only in c]
    failures = []
    seen_forms = set()

    def expect(label: str, argv: list, want_rc: int, want_text=None):
        rc, text = run_checker(argv)
        ok = rc == want_rc and (want_text is None or want_text in text)
        status = "ok " if ok else "BAD"
        print(f"  [{status}] exit {rc} (want {want_rc}): {label}", flush=True)
        if not ok:
            failures.append(label)
            print("    " + text.strip().replace("\n", "\n    "))
        elif rc == 1:
            first = next((line for line in text.splitlines() if line.startswith("MISMATCH")), "")
            print(f"         {first[:160]}")

    for name in cases:
        cdir = os.path.join(args.fixtures, name)
        case = im.load_case(cdir)
        print(f"{name}:", flush=True)
        own = ["--case-dir", cdir, "--ours", os.path.join(cdir, "model.safetensors"),
               "--expect-dequantized", os.path.join(cdir, "dequantized.safetensors")]
        expect("own files, --require-identical-tensors", own + ["--require-identical-tensors"], 0, "OK:")
        form = (case["library"], case["form"], case["strategy"])
        if not args.all_corruptions and form in seen_forms:
            continue
        seen_forms.add(form)
        with tempfile.TemporaryDirectory() as tmp:
            base_sd = im.load_tensors(os.path.join(cdir, "model.safetensors"))
            with open(os.path.join(cdir, "config.json")) as f:
                base_cfg = json.load(f)
            for label, fix_sd, fix_cfg, text in corruptions(case):
                sd = dict(base_sd)
                cfg = json.loads(json.dumps(base_cfg))
                if fix_sd:
                    fix_sd(sd)
                if fix_cfg:
                    fix_cfg(cfg)
                p = os.path.join(tmp, "ours.safetensors")
                c = os.path.join(tmp, "config.json")
                save(sd, p)
                with open(c, "w") as f:
                    json.dump(cfg, f)
                expect(f"corrupted: {label}", ["--case-dir", cdir, "--ours", p, "--config", c,
                                               "--expect-dequantized", os.path.join(cdir, "dequantized.safetensors")],
                       1, text)
            # the expected dequantization off by one ulp in one element
            deq = im.load_tensors(os.path.join(cdir, "dequantized.safetensors"))
            k = "lin_i256.weight"
            t = deq[k].clone()
            flat = t.view(torch.int16 if t.element_size() == 2 else torch.int32).reshape(-1)
            flat[7] += 1
            deq[k] = t
            e = os.path.join(tmp, "expect.safetensors")
            save(deq, e)
            expect("corrupted expected dequantization (1 ulp in one element)",
                   ["--case-dir", cdir, "--ours", os.path.join(cdir, "model.safetensors"), "--expect-dequantized", e],
                   1, "vs library dequantization")
            # expected dequantization in another dtype
            deq = im.load_tensors(os.path.join(cdir, "dequantized.safetensors"))
            other = torch.float64
            save({kk: v.to(other) for kk, v in deq.items()}, e)
            expect("expected dequantization in float64 (dtype mismatch)",
                   ["--case-dir", cdir, "--ours", os.path.join(cdir, "model.safetensors"), "--expect-dequantized", e],
                   1, "dtype")
            expect("expected dequantization in float64 with --cast-library-output",
                   ["--case-dir", cdir, "--ours", os.path.join(cdir, "model.safetensors"), "--expect-dequantized", e,
                    "--cast-library-output"], 0, "OK:")
            # a whole plain checkpoint as the expected dequantization
            float_sd = im.load_tensors(os.path.join(cdir, "float.safetensors"))
            deq = im.load_tensors(os.path.join(cdir, "dequantized.safetensors"))
            plain = dict(float_sd)
            plain.update(deq)
            save(plain, e)
            expect("expected = whole plain checkpoint (float tensors + dequantized weights)",
                   ["--case-dir", cdir, "--ours", os.path.join(cdir, "model.safetensors"), "--expect-dequantized", e],
                   0, "whole plain checkpoint")
            if case["library"] == im.CT and case["form"] == "pack-quantized":
                # a padding byte set: CT ignores it on load
                sd = dict(base_sd)
                if case["strategy"] == "channel":
                    t = sd["lin_i201.weight_packed"].clone()
                    t.view(torch.uint8).reshape(t.shape[0], -1)[0, 201] = 0x80
                    sd["lin_i201.weight_packed"] = t
                    save(sd, os.path.join(tmp, "pad.safetensors"))
                    argv = ["--case-dir", cdir, "--ours", os.path.join(tmp, "pad.safetensors"),
                            "--expect-dequantized", os.path.join(cdir, "dequantized.safetensors")]
                    expect("padding byte 0x80 instead of 0x00 (tolerated by CT)", argv, 0, "OK:")
                    expect("padding byte 0x80 with --require-identical-tensors", argv + ["--require-identical-tensors"],
                           1, "lin_i201.weight_packed")
        # usage error
        expect("usage error: missing --ours file", ["--case-dir", cdir, "--ours", os.path.join(cdir, "nope.safetensors")],
               2, "usage error")

    print(f"selftest: {len(failures)} unexpected result(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

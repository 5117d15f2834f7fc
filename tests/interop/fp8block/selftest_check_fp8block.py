#!/usr/bin/env python3
"""Self-test of check_fp8block.py on the committed fixtures.

    target/interop-venv/bin/python tests/interop/fp8block/selftest_check_fp8block.py [--fixtures DIR] [--only SUBSTR]

For every case:
1. The library's own files must pass (exit 0): OURS = model.safetensors, PLAIN = dequantized.safetensors;
   also OURS with other `__metadata__`.
2. Deliberately corrupted copies must fail (exit 1), each with the message it was built for: a flipped code
   byte; a scale changed by one ulp (F32: the next float up; E8M0: the next byte, twice the scale); a scale
   of another dtype; a scale of another shape; the zero block's scale 1.0 stored as another value (equal
   dequantization: only (a) sees it); a missing key; an extra key; codes stored as U8; corrupted PLAIN
   files (a flipped bit, a doubled bias, another dtype, a missing key, a scale left in, codes left in).
3. --config (d): transformers' own config.json passes, so does a minimal one (quant_method, weight_block_size,
   modules_to_not_convert, scale_fmt; an extra key transformers ignores is only reported); a config with the
   other scale_fmt, another block, no modules_to_not_convert, another quant_method or no quantization_config fails.
4. --ours-plain alone checks only (c); usage errors (a missing file, no file to check) must exit 2.

Runs check_fp8block.main() in-process.  Exit 0 if every expectation holds, 1 otherwise.
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
import check_fp8block  # noqa: E402
import fp8block_models as fm  # noqa: E402

import torch  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
DEFAULT_FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "fp8block")


def run_checker(argv: list) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = check_fp8block.main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue() + err.getvalue()


def one_ulp_up(s: torch.Tensor, i: int) -> torch.Tensor:
    """The scale with element i one unit in the last place larger (E8M0: the next byte = twice the value)."""
    t = s.clone().contiguous()
    if t.dtype == fm.E8M0:
        t.view(torch.uint8).reshape(-1)[i] += 1
    else:
        flat = t.reshape(-1)
        flat[i] = torch.nextafter(flat[i], torch.tensor(float("inf"), dtype=t.dtype))
    return t


def ours_corruptions(case: dict):
    """(label, change(sd), substrings the checker output must contain)."""
    fmt = case["scale_fmt"]
    out = []

    def flip(sd):
        t = sd["lin_ragged.weight"].clone()
        t.view(torch.uint8)[129, 131] ^= 0x01   # in the ragged corner block (1, 1)
        sd["lin_ragged.weight"] = t
    out.append(("flip one code byte of lin_ragged.weight (corner block)", flip,
                ["(a) lin_ragged.weight: 1 of 17680 elements differ; first at [129, 131]",
                 "(b) lin_ragged.weight: transformers' dequantization of ours", "first at [129, 131]"]))

    def scale_ulp(sd):
        sd["lin_nobias.weight_scale_inv"] = one_ulp_up(sd["lin_nobias.weight_scale_inv"], 0)
    needles = ["(a) lin_nobias.weight_scale_inv: 1 of 1 elements differ; first at [0, 0]"]
    if fmt == "ue8m0" or case["dtype"] == "float32":
        needles.append("(b) lin_nobias.weight: transformers' dequantization of ours")
    out.append(("lin_nobias.weight_scale_inv one ulp larger", scale_ulp, needles))

    def scale_ulp_ragged(sd):
        sd["lin_ragged.weight_scale_inv"] = one_ulp_up(sd["lin_ragged.weight_scale_inv"], 3)
    out.append(("lin_ragged.weight_scale_inv[1, 1] one ulp larger", scale_ulp_ragged,
                ["(a) lin_ragged.weight_scale_inv: 1 of 4 elements differ; first at [1, 1]"]))

    def scale_dtype(sd):
        s = sd["lin_a.weight_scale_inv"]
        sd["lin_a.weight_scale_inv"] = s.to(torch.float32) if s.dtype == fm.E8M0 else s.to(torch.bfloat16)
    other = "float32" if fmt == "ue8m0" else "bfloat16"
    own = "float8_e8m0fnu" if fmt == "ue8m0" else "float32"
    out.append((f"lin_a.weight_scale_inv stored as {other}", scale_dtype,
                [f"(a) lin_a.weight_scale_inv: dtype {other} != library's {own}"]))

    def scale_shape(sd):
        sd["lin_ragged.weight_scale_inv"] = sd["lin_ragged.weight_scale_inv"].reshape(1, 4)
    out.append(("lin_ragged.weight_scale_inv with shape [1, 4]", scale_shape,
                ["(a) lin_ragged.weight_scale_inv: shape [1, 4] != library's [2, 2]",
                 "(b) lin_ragged: ours' weight_scale_inv is", "not a float scale of the grid [2, 2]"]))

    def scale_floor_grid(sd):
        # a floor grid for lin_a (136 rows): one row of blocks, the scale of block (0, 0)
        sd["lin_a.weight_scale_inv"] = sd["lin_a.weight_scale_inv"][:1].clone()
    out.append(("lin_a.weight_scale_inv on the floor grid [1, 1]", scale_floor_grid,
                ["(a) lin_a.weight_scale_inv: shape [1, 1] != library's [2, 1]",
                 "(b) lin_a: ours' weight_scale_inv is", "not a float scale of the grid [2, 1]"]))

    def zero_block_scale(sd):
        s = sd["lin_zero.weight_scale_inv"].clone()
        if s.dtype == fm.E8M0:
            s.view(torch.uint8).fill_(0)           # 2^-127 instead of 1.0
        else:
            s.fill_(0.0)
        sd["lin_zero.weight_scale_inv"] = s
    out.append(("lin_zero.weight_scale_inv (all-zero block) not 1.0", zero_block_scale,
                ["(a) lin_zero.weight_scale_inv: 1 of 1 elements differ"]))

    def drop(sd):
        del sd["lin_small.weight_scale_inv"]
    out.append(("drop lin_small.weight_scale_inv", drop,
                ["(a) key sets differ from model.safetensors; missing from ours: ['lin_small.weight_scale_inv']",
                 "(b) lin_small: ours lacks"]))

    def extra(sd):
        sd["lin_skip.weight_scale_inv"] = torch.ones(1, 1, dtype=fm.SCALE_DTYPE[fmt])
    out.append(("add lin_skip.weight_scale_inv", extra, ["unexpected in ours: ['lin_skip.weight_scale_inv']"]))

    def codes_u8(sd):
        sd["lin_nobias.weight"] = sd["lin_nobias.weight"].view(torch.uint8)
    out.append(("lin_nobias.weight codes stored as U8", codes_u8,
                ["(a) lin_nobias.weight: dtype uint8 != library's float8_e4m3fn",
                 "(b) lin_nobias: ours' weight is uint8 [128, 128]"]))

    def skip_quantized(sd):
        w = sd["lin_skip.weight"]
        q, s = fm.library_quantize_any(w, fmt, "lin_skip.weight")
        sd["lin_skip.weight"], sd["lin_skip.weight_scale_inv"] = q, s
    out.append(("lin_skip quantized (the --exclude ignored)", skip_quantized,
                ["(a) lin_skip.weight: dtype float8_e4m3fn", "unexpected in ours: ['lin_skip.weight_scale_inv']"]))
    return out


def plain_corruptions(case: dict):
    D = fm.DTYPES[case["dtype"]]

    def weight(sd):
        t = sd["lin_a.weight"].clone()
        t.view(torch.uint8).reshape(-1)[3] ^= 0x01
        sd["lin_a.weight"] = t

    def bias(sd):
        sd["lin_ragged.bias"] = sd["lin_ragged.bias"] * 2

    def dtype(sd):
        sd["lin_small.weight"] = sd["lin_small.weight"].to(torch.float32 if D != torch.float32 else torch.bfloat16)

    def drop(sd):
        del sd["norm.weight"]

    def scale_left(sd, lib):
        sd["lin_a.weight_scale_inv"] = lib["lin_a.weight_scale_inv"]

    def codes_left(sd, lib):
        sd["lin_nobias.weight"] = lib["lin_nobias.weight"]

    other = "float32" if D != torch.float32 else "bfloat16"
    return [
        ("plain lin_a.weight one bit changed", weight, ["(c) plain lin_a.weight vs library dequantization: 1 of"]),
        ("plain lin_ragged.bias doubled", bias, ["(c) plain lin_ragged.bias vs float"]),
        ("plain lin_small.weight in another dtype", dtype,
         [f"(c) plain lin_small.weight vs library dequantization: dtype {other}"]),
        ("plain without norm.weight", drop, ["(c) plain: key sets differ", "missing from ours: ['norm.weight']"]),
        ("plain with lin_a.weight_scale_inv left in", scale_left,
         ["(c) plain: key sets differ", "unexpected in ours: ['lin_a.weight_scale_inv']"]),
        ("plain lin_nobias.weight left as codes", codes_left,
         ["(c) plain lin_nobias.weight vs library dequantization: dtype float8_e4m3fn"]),
    ]


def config_variants(case: dict):
    """(label, quantization_config or None, expected exit, needles)."""
    fmt = case["scale_fmt"]
    other = "float" if fmt == "ue8m0" else "ue8m0"
    minimal = {"quant_method": "fp8", "weight_block_size": [128, 128], "modules_to_not_convert": ["lin_skip"]}
    if fmt == "ue8m0":
        minimal["scale_fmt"] = "ue8m0"
    return [
        ("config: minimal quantization_config (transformers' defaults for the rest), plus DeepSeek's fmt key",
         {**minimal, "fmt": "e4m3"}, 0, ["keys transformers ignores: ['fmt']"]),
        (f"config: scale_fmt {other}", {**minimal, "scale_fmt": other}, 1,
         ["(d) config: quantization_config['scale_fmt'] parses to"]),
        ("config: weight_block_size [128, 64]", {**minimal, "weight_block_size": [128, 64]}, 1,
         ["(d) config: quantization_config['weight_block_size'] parses to [128, 64]"]),
        ("config: no modules_to_not_convert", {k: v for k, v in minimal.items() if k != "modules_to_not_convert"}, 1,
         ["(d) config: quantization_config['modules_to_not_convert'] parses to null"]),
        ("config: quant_method fbgemm_fp8", {**minimal, "quant_method": "fbgemm_fp8"}, 1,
         ["(d) config: quant_method 'fbgemm_fp8' != 'fp8'"]),
        ("config: no quantization_config", None, 1, ["(d) config: ", "has no readable quantization_config"]),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixtures", default=DEFAULT_FIXTURES)
    ap.add_argument("--only", default=None, help="only cases whose name contains this string")
    args = ap.parse_args()
    torch.set_num_threads(1)

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
            case = fm.load_case(cdir)
            print(name)
            lib_path = os.path.join(cdir, "model.safetensors")
            deq_path = os.path.join(cdir, "dequantized.safetensors")
            lib = fm.load_tensors(lib_path)
            deq = fm.load_tensors(deq_path)

            expect("library's own file + library dequantization as plain",
                   ["--case", cdir, "--ours", lib_path, "--ours-plain", deq_path], 0)
            p = os.path.join(tmp, f"{name}-meta.safetensors")
            fm.save_file(lib, p, metadata={"format": "pt", "ckptkit.layout": "anything", "x": "y"})
            expect("library's file with other __metadata__", ["--case", cdir, "--ours", p], 0)

            for label, change, needles in ours_corruptions(case):
                sd = dict(lib)
                change(sd)
                p = os.path.join(tmp, f"{name}-bad.safetensors")
                fm.save_file(sd, p)
                expect(label, ["--case", cdir, "--ours", p], 1, needles)
            for label, change, needles in plain_corruptions(case):
                sd = dict(deq)
                if change.__code__.co_argcount == 2:
                    change(sd, lib)
                else:
                    change(sd)
                p = os.path.join(tmp, f"{name}-badplain.safetensors")
                fm.save_file(sd, p)
                expect(label, ["--case", cdir, "--ours", lib_path, "--ours-plain", p], 1, needles)
            cfg_path = os.path.join(cdir, "config.json")
            expect("transformers' own config.json", ["--case", cdir, "--config", cfg_path], 0)
            with open(cfg_path) as f:
                base_cfg = json.load(f)
            for label, qc, rc, needles in config_variants(case):
                c = dict(base_cfg)
                if qc is None:
                    del c["quantization_config"]
                else:
                    c["quantization_config"] = qc
                p = os.path.join(tmp, f"{name}-config.json")
                with open(p, "w") as f:
                    json.dump(c, f)
                expect(label, ["--case", cdir, "--config", p], rc, needles)
            expect("library plain alone (--ours-plain only)", ["--case", cdir, "--ours-plain", deq_path], 0)
            expect("neither --ours, --ours-plain nor --config", ["--case", cdir], 2)
            expect("missing --ours file", ["--case", cdir, "--ours", os.path.join(tmp, "nope.safetensors")], 2)

    print(f"selftest_check_fp8block: {checks - len(failures)} of {checks} expectations hold")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

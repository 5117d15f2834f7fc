#!/usr/bin/env python3
"""Self-test of check_ctfp8.py on the committed fixtures.

    target/interop-venv/bin/python tests/interop/ctfp8/selftest_check_ctfp8.py [--fixtures DIR] [--only SUBSTR]

1. Every case's own files pass (exit 0): OURS = CT's model.safetensors (its config.json beside it, so the
   config comparison and the transformers loader check run too), PLAIN = float.safetensors with the
   quantized weights replaced by dequantized.safetensors.
2. Corrupted copies fail (exit 1) with the expected message, on one case per strategy / format: a flipped
   code byte, a -0.0 code (0x80) written as +0.0, the codes stored as U8, a scale one ulp off, a scale of
   another shape, a scale of another dtype, a missing scale, an extra weight_zero_point / input_scale, a
   whole module missing; config.json beside OURS with another strategy / format / ignore list (and one
   that differs only in "version" and "global_compression_ratio", which passes); a corrupted PLAIN (one
   ulp in a weight, a missing tensor, an extra scale, a changed bias, another dtype).
3. Usage errors exit 2.

Runs check_ctfp8.main() in-process.  Exit 0 if every expectation holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import check_ctfp8  # noqa: E402
import ctfp8_models as cm  # noqa: E402

import torch  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
DEFAULT_FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "ctfp8")


def run_checker(argv: list) -> tuple:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = check_ctfp8.main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue() + err.getvalue()


def save(sd: dict, path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata={"format": "pt"})


def bump_ulp(t: torch.Tensor, index: int = 0) -> torch.Tensor:
    t = t.clone()
    iv = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    t.view(iv).reshape(-1)[index] += 1
    return t


def model_corruptions(case: dict):
    """(label, fn(sd) changing OURS, substring the checker output must contain)."""
    m = "lin_binades"
    out = []

    def flip(sd):
        t = sd[f"{m}.weight"].clone()
        t.view(torch.uint8).reshape(-1)[5] ^= 0x01
        sd[f"{m}.weight"] = t
    out.append(("flip one code byte", flip, f"(a): {m}.weight: bytes differ"))

    def negzero(sd):
        k = next(k for k in sorted(sd) if sd[k].dtype == cm.FP8 and bool((sd[k].view(torch.uint8) == 0x80).any()))
        t = sd[k].clone()
        b = t.view(torch.uint8).reshape(-1)
        b[b == 0x80] = 0x00
        sd[k] = t
    out.append(("-0.0 codes (0x80) written as +0.0 (0x00)", negzero, "CT's decompression of ours vs dequantized"))

    def codes_u8(sd):
        sd[f"{m}.weight"] = sd[f"{m}.weight"].view(torch.uint8)
    out.append(("codes stored as U8 (same bytes)", codes_u8, f"(a): {m}.weight: dtype ours uint8"))

    def scale_ulp(sd):
        sd[f"{m}.weight_scale"] = bump_ulp(sd[f"{m}.weight_scale"])
    out.append(("weight_scale one ulp off", scale_ulp, f"(a): {m}.weight_scale: bytes differ"))

    def scale_shape(sd):
        s = sd[f"{m}.weight_scale"]
        sd[f"{m}.weight_scale"] = s.reshape(-1) if s.dim() == 2 else s.reshape(())
    out.append(("weight_scale of another shape ([out] / 0-dim)", scale_shape, f"(a): {m}.weight_scale: shape"))

    def scale_dtype(sd):
        s = sd[f"{m}.weight_scale"]
        sd[f"{m}.weight_scale"] = s.to(torch.float32 if s.dtype != torch.float32 else torch.bfloat16)
    out.append(("weight_scale in another dtype", scale_dtype, f"(a): {m}.weight_scale: dtype"))

    def drop_scale(sd):
        del sd["lin_o1.weight_scale" if "lin_o1.weight" in sd else "lin_small.weight_scale"]
    out.append(("missing weight_scale", drop_scale, "missing from ours: ['lin_"))

    def add_zp(sd):
        s = sd[f"{m}.weight_scale"]
        sd[f"{m}.weight_zero_point"] = torch.zeros(s.shape, dtype=cm.FP8)
    out.append(("extra weight_zero_point (symmetric)", add_zp, f"unexpected in ours: ['{m}.weight_zero_point']"))

    def add_input_scale(sd):
        sd[f"{m}.input_scale"] = torch.ones(1, dtype=sd[f"{m}.weight_scale"].dtype)
    out.append(("extra input_scale", add_input_scale, f"unexpected in ours: ['{m}.input_scale']"))

    def drop_module(sd):
        for k in [k for k in sd if k.startswith(f"{m}.")]:
            del sd[k]
    out.append(("a whole quantized module missing", drop_module, f"missing from ours: ['{m}.bias'"))
    return out


def config_corruptions(case: dict):
    """(label, fn(qc), expected rc, substring)."""
    out = []

    def strategy(qc):
        w = qc["config_groups"]["group_0"]["weights"]
        if w["strategy"] == "tensor":
            w["strategy"] = "channel"
        else:
            w.update(strategy="tensor", group_size=None, block_structure=None)
            w.pop("block_structure")
    out.append(("config: another strategy", strategy, 1, "quantization_config.config_groups.group_0.weights.strategy"))

    def fmt(qc):
        other = "float-quantized" if qc["format"] == "naive-quantized" else "naive-quantized"
        qc["format"] = other
        qc["config_groups"]["group_0"]["format"] = other
    out.append(("config: the other format", fmt, 1, "quantization_config.format"))

    def ignore(qc):
        qc["ignore"] = []
    out.append(("config: empty ignore list", ignore, 1, "quantization_config.ignore"))

    def drop_kv(qc):
        del qc["kv_cache_scheme"]
    out.append(("config: kv_cache_scheme left out", drop_kv, 1, "quantization_config.kv_cache_scheme: ours \"<absent>\""))

    def version(qc):
        qc["version"] = "9.9.9"
        qc["global_compression_ratio"] = 1.5
    out.append(("config: other version and global_compression_ratio (not compared)", version, 0, "OK:"))
    return out


def plain_corruptions(case: dict):
    m = "lin_binades"
    out = []

    def ulp(sd):
        sd[f"{m}.weight"] = bump_ulp(sd[f"{m}.weight"], 3)
    out.append(("plain: one ulp in a dequantized weight", ulp, f"(c) plain: {m}.weight: bytes differ"))

    def drop(sd):
        del sd["final_norm.weight"]
    out.append(("plain: a tensor missing", drop, "missing from ours: ['final_norm.weight']"))

    def extra(sd):
        sd[f"{m}.weight_scale"] = torch.ones(1)
    out.append(("plain: a scale left in", extra, f"unexpected in ours: ['{m}.weight_scale']"))

    def bias(sd):
        sd[f"{m}.bias"] = (sd[f"{m}.bias"].float() + 1).to(sd[f"{m}.bias"].dtype)
    out.append(("plain: a bias changed", bias, f"(c) plain: {m}.bias: bytes differ from float.safetensors"))

    def dtype(sd):
        sd[f"{m}.weight"] = sd[f"{m}.weight"].to(torch.float64)
    out.append(("plain: a weight in another dtype", dtype, f"(c) plain: {m}.weight: dtype ours float64"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixtures", default=DEFAULT_FIXTURES)
    ap.add_argument("--only", default=None)
    args = ap.parse_args()

    cases = sorted(d for d in os.listdir(args.fixtures) if os.path.isfile(os.path.join(args.fixtures, d, "case.json")))
    if args.only:
        cases = [c for c in cases if args.only in c]
    if not cases:
        print(f"no cases under {args.fixtures}")
        return 1
    failures = []
    seen = set()

    def expect(label: str, argv: list, want_rc: int, want_text=None):
        rc, text = run_checker(argv)
        ok = rc == want_rc and (want_text is None or want_text in text)
        print(f"  [{'ok ' if ok else 'BAD'}] exit {rc} (want {want_rc}): {label}", flush=True)
        if not ok:
            failures.append(label)
            print("    " + text.strip().replace("\n", "\n    "))
        elif rc == 1:
            first = next((ln for ln in text.splitlines() if ln.startswith("MISMATCH")), "")
            print(f"         {first[:170]}")

    for name in cases:
        cdir = os.path.join(args.fixtures, name)
        case = cm.load_case(cdir)
        print(f"{name}:", flush=True)
        float_sd = cm.load_tensors(os.path.join(cdir, "float.safetensors"))
        deq = cm.load_tensors(os.path.join(cdir, "dequantized.safetensors"))
        base_sd = cm.load_tensors(os.path.join(cdir, "model.safetensors"))
        with open(os.path.join(cdir, "config.json")) as f:
            base_cfg = json.load(f)
        with tempfile.TemporaryDirectory() as tmp:
            plain = dict(float_sd)
            plain.update(deq)
            plain_path = os.path.join(tmp, "plain.safetensors")
            save(plain, plain_path)
            expect("own files (model.safetensors + config.json beside it, plain from dequantized)",
                   ["--case", cdir, "--ours", os.path.join(cdir, "model.safetensors"), "--ours-plain", plain_path],
                   0, "OK:")
            key = (case["strategy"], case["format"])
            if key in seen:
                continue
            seen.add(key)
            ours = os.path.join(tmp, "ours.safetensors")
            for label, fn, text in model_corruptions(case):
                sd = dict(base_sd)
                fn(sd)
                save(sd, ours)
                expect(f"corrupted: {label}", ["--case", cdir, "--ours", ours], 1, text)
            # config.json beside OURS (a directory output)
            d = os.path.join(tmp, "dir")
            os.makedirs(d)
            shutil.copyfile(os.path.join(cdir, "model.safetensors"), os.path.join(d, "model.safetensors"))
            for label, fn, rc, text in config_corruptions(case):
                cfg = json.loads(json.dumps(base_cfg))
                fn(cfg["quantization_config"])
                with open(os.path.join(d, "config.json"), "w") as f:
                    json.dump(cfg, f, indent=2, sort_keys=True)
                expect(label, ["--case", cdir, "--ours", os.path.join(d, "model.safetensors")], rc, text)
            for label, fn, text in plain_corruptions(case):
                sd = dict(plain)
                fn(sd)
                p = os.path.join(tmp, "plain-bad.safetensors")
                save(sd, p)
                expect(label, ["--case", cdir, "--ours-plain", p], 1, text)
            expect("usage error: neither --ours nor --ours-plain", ["--case", cdir], 2, "usage error")
            expect("usage error: missing --ours file", ["--case", cdir, "--ours", os.path.join(tmp, "nope.safetensors")],
                   2, "usage error")
            expect("usage error: not a case directory", ["--case", tmp, "--ours", plain_path], 2, "usage error")

    print(f"selftest: {len(failures)} unexpected result(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

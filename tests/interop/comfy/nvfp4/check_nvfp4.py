#!/usr/bin/env python3
"""Check ckptkit's `--to plain` reading of a ComfyUI nvfp4 file against a fixture case (comfy-kitchen 0.2.40).

    target/interop-venv/bin/python tests/interop/comfy/nvfp4/check_nvfp4.py --case CASE_DIR \\
        --ours-plain PLAIN.safetensors [--no-env-check]
    target/interop-venv/bin/python tests/interop/comfy/nvfp4/check_nvfp4.py --self-test [--fixtures DIR]

PLAIN is `migrate convert CASE_DIR/quantized.safetensors PLAIN --to plain --shapes-from CASE_DIR/float.safetensors`
(the float model gives the logical, unpadded shapes).

  environment: the installed comfy-kitchen, run again, must dequantize quantized.safetensors into
      dequantized.safetensors (--no-env-check skips this);
  fixture: the comfy_quant markers name exactly case.json's quantized_modules, each {"format": "nvfp4"}, and each
      such layer has a U8 weight, an F8_E4M3 weight_scale and a 0-dim F32 weight_scale_2;
  (a) PLAIN has dequantized.safetensors' key set (= float's; no weight_scale / weight_scale_2 / comfy_quant left);
  (b) every tensor has dequantized.safetensors' dtype, shape and bytes (nvfp4 dequantization is two roundings to D,
      both restated exactly in nvfp4_models.formula_dequantize, so no tolerance; -0.0 must stay -0.0).

Prints one MISMATCH line per failure and a final OK/FAIL line.  Exit 0 all passed, 1 any mismatch, 2 usage error.
--self-test: the library's own file passes; a weight element changed, a -0.0 written as +0.0, the padded (uncropped)
weight, a weight in another dtype, a missing key, a leftover weight_scale, a leftover weight_scale_2 fail; a missing
file exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nvfp4_models as m  # noqa: E402

import torch  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
DEFAULT_FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "comfy-nvfp4")
CASE_FILES = ("case.json", "float.safetensors", "quantized.safetensors", "dequantized.safetensors")


def check(case_dir: str, plain_path: str, env_check: bool = True) -> int:
    files = {fn: os.path.join(case_dir, fn) for fn in CASE_FILES}
    for p in list(files.values()) + [plain_path]:
        if not os.path.isfile(p):
            print(f"usage error: {p} not found", file=sys.stderr)
            return 2
    case = m.load_case(case_dir)
    if case.get("format") != m.FORMAT or case.get("dtype") not in m.DTYPES:
        print(f"usage error: {files['case.json']} is not an nvfp4 case", file=sys.stderr)
        return 2
    name = case.get("name", case_dir)
    D = m.DTYPES[case["dtype"]]
    errors = []

    def error(msg):
        errors.append(msg)
        print(f"MISMATCH: {msg}", file=sys.stderr)

    fsd = m.load_tensors(files["float.safetensors"])
    qsd = m.load_tensors(files["quantized.safetensors"])
    dsd = m.load_tensors(files["dequantized.safetensors"])
    marked = set()
    for k, v in qsd.items():
        if k.endswith(".comfy_quant"):
            marked.add(k[: -len(".comfy_quant")])
            if m.decode_comfy_quant(v) != {"format": m.FORMAT}:
                error(f"fixture: {k} is {m.decode_comfy_quant(v)}")
    if marked != set(case["quantized_modules"]):
        error(f"fixture: markers name {sorted(marked)}, case.json {case['quantized_modules']}")
    for mod in sorted(marked):
        k = f"{mod}.weight"
        want = {k: (torch.uint8, None), f"{k}_scale": (torch.float8_e4m3fn, None), f"{k}_scale_2": (torch.float32, ())}
        for key, (dt, shape) in want.items():
            t = qsd.get(key)
            if t is None or t.dtype != dt or (shape is not None and tuple(t.shape) != shape):
                error(f"fixture: {key} is {None if t is None else (m.dtype_name(t), list(t.shape))}, want {dt}")
    if set(dsd) != set(fsd):
        error("fixture: dequantized.safetensors and float.safetensors have different key sets")
    if env_check:
        for mod in case["quantized_modules"]:
            k = f"{mod}.weight"
            try:
                d = m.library_dequantize(qsd[k], qsd[f"{k}_scale"], qsd[f"{k}_scale_2"], D, fsd[k].shape)
            except Exception as e:  # noqa: BLE001
                error(f"environment: comfy-kitchen fails on {mod}: {type(e).__name__}: {e}")
                continue
            if m.same_tensor(d, dsd[k]):
                error(f"environment: the installed comfy-kitchen no longer dequantizes {mod} into "
                      "dequantized.safetensors")
    try:
        plain = m.load_tensors(plain_path)
    except Exception as e:  # noqa: BLE001
        error(f"ours-plain: safetensors cannot load {plain_path}: {type(e).__name__}: {e}")
        plain = None
    if plain is not None:
        missing, extra = sorted(set(dsd) - set(plain)), sorted(set(plain) - set(dsd))
        if missing or extra:
            error(f"(a) plain: key set differs from dequantized.safetensors; missing: {missing}; unexpected: {extra}")
        for k in sorted(set(dsd) & set(plain)):
            d = m.same_tensor(plain[k], dsd[k])
            if d:
                what = "nvfp4 weight" if k[: -len(".weight")] in case["quantized_modules"] else "plain tensor"
                error(f"(b) plain {k} ({what}): ours {m.dtype_name(plain[k])} {list(plain[k].shape)} vs library "
                      f"{m.dtype_name(dsd[k])} {list(dsd[k].shape)}: {d}")
    if errors:
        print(f"FAIL: {name}: {len(errors)} mismatch(es)", file=sys.stderr)
        return 1
    print(f"OK: {name} (plain; {len(dsd)} tensors identical to the library's, "
          f"{len(case['quantized_modules'])} nvfp4 weights)")
    return 0


def self_test(fixtures: str) -> int:
    cases = sorted(d for d in os.listdir(fixtures)
                   if all(os.path.isfile(os.path.join(fixtures, d, f)) for f in CASE_FILES))
    if not cases:
        print(f"usage error: no nvfp4 cases under {fixtures}", file=sys.stderr)
        return 2
    bad = 0
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases:
            cdir = os.path.join(fixtures, name)
            case = m.load_case(cdir)
            D = m.DTYPES[case["dtype"]]
            dsd = m.load_tensors(os.path.join(cdir, "dequantized.safetensors"))
            qsd = m.load_tensors(os.path.join(cdir, "quantized.safetensors"))
            wk = "lin_pad.weight"
            changed = dsd[wk].clone()
            changed.view(-1)[7] = changed.view(-1)[7] * 2 + 1
            padded_shape = (qsd[wk].shape[0], qsd[wk].shape[1] * 2)
            padded = m.library_dequantize(qsd[wk], qsd[f"{wk}_scale"], qsd[f"{wk}_scale_2"], D, padded_shape)
            other = torch.float32 if D != torch.float32 else torch.bfloat16
            nz = "lin_a.weight"
            negzero = (dsd[nz] == 0) & torch.signbit(dsd[nz])
            posz = dsd[nz].clone()
            posz[negzero] = 0.0  # +0.0 where the library wrote -0.0
            variants = [
                ("the library's own dequantized.safetensors", {}, (), 0),
                (f"{wk}: one element changed", {wk: changed}, (), 1),
                (f"{nz}: {int(negzero.sum())} -0.0 written as +0.0", {nz: posz}, (), 1 if negzero.any() else 0),
                (f"{wk}: left padded {list(padded.shape)}", {wk: padded}, (), 1),
                (f"{wk}: stored as {other}", {wk: dsd[wk].to(other)}, (), 1),
                ("norm.weight missing", {}, ("norm.weight",), 1),
                (f"{wk}_scale left over", {f"{wk}_scale": qsd[f"{wk}_scale"]}, (), 1),
                (f"{wk}_scale_2 left over", {f"{wk}_scale_2": qsd[f"{wk}_scale_2"]}, (), 1),
            ]
            for label, changes, drop, expect in variants:
                sd = {k: v for k, v in dsd.items() if k not in drop}
                sd.update(changes)
                p = os.path.join(tmp, f"{name}.safetensors")
                m.save_file(sd, p)
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    rc = check(cdir, p, env_check=(expect == 0))
                total += 1
                good = rc == expect
                bad += not good
                print(f"{'ok  ' if good else 'FAIL'} {name}: {label}: exit {rc} (expected {expect})")
            total += 1
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                rc = check(cdir, os.path.join(tmp, "missing.safetensors"))
            bad += rc != 2
            print(f"{'ok  ' if rc == 2 else 'FAIL'} {name}: missing file: exit {rc} (expected 2)")
    print(f"self-test: {total - bad} of {total} expectations hold")
    return 0 if bad == 0 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Check ckptkit's --to plain reading of a ComfyUI nvfp4 case.")
    ap.add_argument("--case", help="fixture case directory")
    ap.add_argument("--ours-plain", help="ckptkit's --to plain output of CASE/quantized.safetensors")
    ap.add_argument("--no-env-check", action="store_true", help="do not re-run comfy-kitchen on the case")
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("--fixtures", default=DEFAULT_FIXTURES, help="fixture root for --self-test")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.self_test:
        return self_test(args.fixtures)
    if not args.case or not args.ours_plain:
        print("usage error: give --case and --ours-plain (or --self-test)", file=sys.stderr)
        return 2
    return check(args.case, args.ours_plain, env_check=not args.no_env_check)


if __name__ == "__main__":
    sys.exit(main())

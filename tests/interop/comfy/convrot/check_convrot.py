#!/usr/bin/env python3
"""Check ckptkit's `--to plain` reading of a ComfyUI ConvRot int8 file against a fixture case (comfy-kitchen 0.2.40).

    target/interop-venv/bin/python tests/interop/comfy/convrot/check_convrot.py --case CASE_DIR \\
        --ours-plain PLAIN.safetensors [--max-ulps 1] [--no-env-check]
    target/interop-venv/bin/python tests/interop/comfy/convrot/check_convrot.py --self-test [--fixtures DIR]

CASE_DIR is a case written by gen_convrot_fixtures.py (case.json, float.safetensors, quantized.safetensors,
dequantized.safetensors).  PLAIN is `migrate convert CASE_DIR/quantized.safetensors PLAIN --to plain`.

  environment: the installed comfy-kitchen, run again, must quantize float.safetensors into
      quantized.safetensors and dequantize that into dequantized.safetensors (the library's f32 sums follow
      torch's CPU matmul kernel, so another CPU or torch build can give other bits; --no-env-check skips this);
  (a) PLAIN has float.safetensors' key set (no weight_scale / comfy_quant left), and every tensor float's dtype
      and shape;
  (b) every tensor that is not a ConvRot weight is byte-identical to dequantized.safetensors (which holds the
      float tensors there);
  (c) every ConvRot weight (case.json convrot_modules, each also marked by quantized.safetensors' comfy_quant) is
      finite where the library's is, and within --max-ulps (default 1) of the library's dequantization element by
      element, counting D's values between them (+0 and -0 are 0 apart), or, where a sum cancels, no further
      from it than two f32 summation orders of the same terms can be (convrot_models.order_bound: the library's
      order is its BLAS kernel's, which differs between CPUs).  For each layer it prints how many
      elements are not bit-identical to the library's and the largest distance, and, for information, the same
      against the exact inverse rotation rounded once to D.

Prints one MISMATCH line per failure and a final OK/FAIL line.
Exit status: 0 all checks passed, 1 any mismatch, 2 usage error.

--self-test runs the check (without the environment check, which depends on the CPU), for every case under
--fixtures (default tests/fixtures/comfy-convrot), on the
library's own dequantized.safetensors (must pass) and on corrupted copies (must fail, or pass where noted):
one ConvRot element moved by 1 ulp (passes), by 2 ulp or the fewest past the summation-order bound (fails),
a sign flipped, a NaN, the weight left in the
rotated basis, a plain tensor moved by 1 ulp, a weight stored in another dtype, a missing key, an extra key;
and a missing file (exit 2).  Exit 0 when every expectation holds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convrot_models as m  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
DEFAULT_FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "comfy-convrot")
CASE_FILES = ("case.json", "float.safetensors", "quantized.safetensors", "dequantized.safetensors")


class Checker:
    def __init__(self):
        self.errors: list[str] = []

    def error(self, msg: str) -> None:
        self.errors.append(msg)
        print(f"MISMATCH: {msg}", file=sys.stderr)


def environment_check(chk: Checker, case: dict, float_sd: dict, lib_sd: dict, deq_sd: dict) -> None:
    n = case["groupsize"]
    D = m.DTYPES[case["dtype"]]
    for mod in case["convrot_modules"]:
        try:
            qt = m.library_quantize(float_sd[f"{mod}.weight"], n)
            part = qt.state_dict(f"{mod}.weight")
            for k, v in part.items():
                if m.same_tensor(v, lib_sd[k]):
                    chk.error(f"environment: the installed comfy-kitchen no longer gives {k} of quantized.safetensors")
            dq = m.library_dequantize(lib_sd[f"{mod}.weight"], lib_sd[f"{mod}.weight_scale"], D, n)
        except Exception as e:  # noqa: BLE001
            chk.error(f"environment: comfy-kitchen fails on {mod}: {m.error_text(e)}")
            continue
        if m.same_tensor(dq, deq_sd[f"{mod}.weight"]):
            chk.error(f"environment: the installed comfy-kitchen no longer dequantizes {mod} into "
                      "dequantized.safetensors (torch's CPU f32 matmul order differs here?)")


def convrot_layers_in_file(chk: Checker, case: dict, lib_sd: dict) -> None:
    """case.json's convrot_modules must be exactly the layers quantized.safetensors marks as ConvRot."""
    marked = set()
    for k, v in lib_sd.items():
        if k.endswith(".comfy_quant"):
            conf = m.decode_comfy_quant(v)
            if conf.get("format") == m.FORMAT and conf.get("convrot") is True:
                marked.add(k[: -len(".comfy_quant")])
                if conf.get("convrot_groupsize") != case["groupsize"]:
                    chk.error(f"fixture: {k} says convrot_groupsize {conf.get('convrot_groupsize')}, case.json "
                              f"{case['groupsize']}")
    if marked != set(case["convrot_modules"]):
        chk.error(f"fixture: ConvRot markers name {sorted(marked)}, case.json {case['convrot_modules']}")


def compare_convrot(chk: Checker, key: str, ours: torch.Tensor, lib: torch.Tensor, exact_rounded: torch.Tensor,
                    max_ulps: int, bound) -> None:
    lf = lib.to(torch.float64).numpy()
    of = ours.to(torch.float64).numpy()
    lib_finite = np.isfinite(lf)
    bad_finite = lib_finite & ~np.isfinite(of)
    if bad_finite.any():
        i = tuple(int(v) for v in np.argwhere(bad_finite)[0])
        chk.error(f"(c) plain {key}: {int(bad_finite.sum())} non-finite elements where the library's are finite; "
                  f"first at {list(i)}: {float(of[i])!r} vs {float(lf[i])!r}")
    nonfinite_lib = ~lib_finite
    if nonfinite_lib.any() and m.same_tensor(ours[torch.from_numpy(nonfinite_lib)],
                                             lib[torch.from_numpy(nonfinite_lib)]):
        chk.error(f"(c) plain {key}: differs from the library where the library's values are not finite")
    ok = lib_finite & np.isfinite(of)
    dist = np.where(ok, m.ulp_distance(ours, lib), 0)
    differ = m.bitwise_differs(ours, lib)
    dist_ex = np.where(ok, m.ulp_distance(ours, exact_rounded), 0)
    worst = np.unravel_index(int(np.argmax(dist)), dist.shape)
    print(f"  {key}: {int(differ.sum())} of {differ.size} elements not bit-identical to the library's, max "
          f"{int(dist.max())} ulp (largest at {[int(v) for v in worst]}: ours {float(of[worst])!r}, "
          f"library {float(lf[worst])!r}); "
          f"vs the exact rotation rounded to {m.dtype_name(ours)}: {int(m.bitwise_differs(ours, exact_rounded).sum())}"
          f" not identical, max {int(dist_ex.max())} ulp")
    if int(dist.max()) > max_ulps:
        # beyond max_ulps: accepted only within what another f32 summation order can give (cancelling sums)
        over = dist > max_ulps
        gap = np.where(ok, np.abs(of - lf), 0.0)
        beyond = over & (gap > bound(np.maximum(np.abs(of), np.abs(lf))))
        if beyond.any():
            j = tuple(int(v) for v in np.argwhere(beyond)[0])
            chk.error(f"(c) plain {key}: {int(beyond.sum())} elements more than {max_ulps} ulp from the library's "
                      f"dequantization and beyond the f32 summation-order bound; first at {list(j)}: ours "
                      f"{float(of[j])!r}, library {float(lf[j])!r}, {int(dist[j])} ulp apart")
        else:
            print(f"  {key}: {int(over.sum())} elements more than {max_ulps} ulp from the library's, each within the "
                  "f32 summation-order bound (sums that cancel, added in another order by this CPU's kernel)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Check ckptkit's --to plain reading of a ComfyUI ConvRot case.")
    ap.add_argument("--case", help="fixture case directory")
    ap.add_argument("--ours-plain", help="ckptkit's --to plain output of CASE/quantized.safetensors")
    ap.add_argument("--max-ulps", type=int, default=1, help="tolerance per ConvRot element, in D's ulp (default 1)")
    ap.add_argument("--no-env-check", action="store_true", help="do not re-run comfy-kitchen on the case")
    ap.add_argument("--self-test", action="store_true", help="run the checker's self-test on the fixtures")
    ap.add_argument("--fixtures", default=DEFAULT_FIXTURES, help="fixture root for --self-test")
    args = ap.parse_args(argv)
    if args.self_test:
        return self_test(args.fixtures)
    if not args.case or not args.ours_plain:
        print("usage error: give --case and --ours-plain (or --self-test)", file=sys.stderr)
        return 2
    files = {fn: os.path.join(args.case, fn) for fn in CASE_FILES}
    for p in list(files.values()) + [args.ours_plain]:
        if not os.path.isfile(p):
            print(f"usage error: {p} not found", file=sys.stderr)
            return 2
    m.setup_torch()
    case = m.load_case(args.case)
    if not case.get("convrot") or case.get("format") != m.FORMAT or case.get("dtype") not in m.DTYPES:
        print(f"usage error: {files['case.json']} is not a ConvRot int8 case", file=sys.stderr)
        return 2
    name = case.get("name", args.case)
    D = m.DTYPES[case["dtype"]]
    n = case["groupsize"]
    chk = Checker()

    float_sd = m.load_tensors(files["float.safetensors"])
    lib_sd = m.load_tensors(files["quantized.safetensors"])
    deq_sd = m.load_tensors(files["dequantized.safetensors"])
    convrot_layers_in_file(chk, case, lib_sd)
    if not args.no_env_check:
        environment_check(chk, case, float_sd, lib_sd, deq_sd)

    try:
        plain = m.load_tensors(args.ours_plain)
    except Exception as e:  # noqa: BLE001
        chk.error(f"ours-plain: safetensors cannot load {args.ours_plain}: {m.error_text(e)}")
        plain = None
    if plain is not None:
        print(f"{name}: ConvRot weights (group size {n}, {case['dtype']}):")
        missing, extra = sorted(set(float_sd) - set(plain)), sorted(set(plain) - set(float_sd))
        if missing or extra:
            chk.error(f"(a) plain: key set differs from float.safetensors; missing: {missing}; unexpected: {extra}")
        convrot_keys = {f"{x}.weight" for x in case["convrot_modules"]}
        for k in sorted(float_sd):
            if k not in plain:
                continue
            ours, ref = plain[k], deq_sd[k]
            if ours.dtype != float_sd[k].dtype or tuple(ours.shape) != tuple(float_sd[k].shape):
                chk.error(f"(a) plain {k}: {m.dtype_name(ours)} {list(ours.shape)}, the model's is "
                          f"{m.dtype_name(float_sd[k])} {list(float_sd[k].shape)}")
                continue
            if k in convrot_keys:
                mod = k[: -len(".weight")]
                q, s = lib_sd[f"{mod}.weight"], lib_sd[f"{mod}.weight_scale"]
                exact_rounded = m.rne_from_f64(m.exact_dequantize(q, s, n), D)
                compare_convrot(chk, k, ours, ref, exact_rounded, args.max_ulps, m.order_bound(q, s, n, D))
            else:
                d = m.same_tensor(ours, ref)
                if d:
                    chk.error(f"(b) plain {k} vs dequantized.safetensors (the float tensor): {d}")

    if chk.errors:
        print(f"FAIL: {name}: {len(chk.errors)} mismatch(es)", file=sys.stderr)
        return 1
    print(f"OK: {name} (plain; ConvRot weights within {args.max_ulps} ulp of the library, or within the f32 "
          "summation-order bound where a sum cancels)")
    return 0


# --------------------------------------------------------------------------------------
# self-test
# --------------------------------------------------------------------------------------


def _move_ulps(t: torch.Tensor, flat_index: int, k: int) -> torch.Tensor:
    """A copy of t with one element k values of its dtype further from zero (magnitude bits + k)."""
    w = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype]
    out = t.clone().contiguous()
    bits = out.view(w).reshape(-1)
    bits[flat_index] += k
    return out


def _past_bound(t: torch.Tensor, flat_index: int, bound) -> int:
    """The fewest ulps (at least 2) that move element flat_index of t beyond the summation-order bound."""
    x = float(t.reshape(-1)[flat_index])
    k = 2
    while True:
        y = float(_move_ulps(t, flat_index, k).reshape(-1)[flat_index])
        b = bound(np.array(max(abs(x), abs(y)))).reshape(-1)[flat_index]
        if abs(y - x) > b:
            return k
        k *= 2


def _pick(t: torch.Tensor) -> int:
    """A normal, non-zero element away from the format's limits."""
    f = t.to(torch.float64).reshape(-1).abs()
    ok = (f > torch.finfo(t.dtype).tiny * 4) & (f < 1e3)
    return int(torch.nonzero(ok)[0])


def self_test(fixtures: str) -> int:
    cases = sorted(d for d in os.listdir(fixtures)
                   if os.path.isfile(os.path.join(fixtures, d, "case.json"))
                   and all(os.path.isfile(os.path.join(fixtures, d, f)) for f in CASE_FILES))
    if not cases:
        print(f"usage error: no ConvRot cases under {fixtures}", file=sys.stderr)
        return 2
    m.setup_torch()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases:
            cdir = os.path.join(fixtures, name)
            case = m.load_case(cdir)
            if not case.get("convrot"):
                continue
            deq = m.load_tensors(os.path.join(cdir, "dequantized.safetensors"))
            lib_sd = m.load_tensors(os.path.join(cdir, "quantized.safetensors"))
            D = m.DTYPES[case["dtype"]]
            mod = case["convrot_modules"][0]
            wk = f"{mod}.weight"
            i = _pick(deq[wk])
            variants = [("the library's own dequantized.safetensors", dict(deq), 0, None)]

            def variant(label, changes, expect, needle, drop=()):
                sd = {k: v for k, v in deq.items() if k not in drop}
                sd.update(changes)
                variants.append((label, sd, expect, needle))

            order = {f"{x}.weight": m.library_order_dequantize(lib_sd[f"{x}.weight"], lib_sd[f"{x}.weight_scale"],
                                                               case["groupsize"], D) for x in case["convrot_modules"]}
            variant("every ConvRot weight re-computed in the library's f32 order (library_order_dequantize)",
                    order, 0, None)
            exact = {f"{x}.weight": m.rne_from_f64(m.exact_dequantize(lib_sd[f"{x}.weight"],
                                                                      lib_sd[f"{x}.weight_scale"], case["groupsize"]), D)
                     for x in case["convrot_modules"]}
            within = case["exactness_summary"]["within_1_ulp_of_rounded_exact"]
            variant("every ConvRot weight the exact rotation rounded once to D (case.json: within 1 ulp of the "
                    f"library: {str(within).lower()}; where not, within the summation-order bound, since the library's "
                    "f32 sums are within it of the exact ones)", exact, 0, None)
            variant(f"{wk}: one element 1 ulp further from 0", {wk: _move_ulps(deq[wk], i, 1)}, 0, None)
            k = _past_bound(deq[wk], i, m.order_bound(lib_sd[wk], lib_sd[f"{mod}.weight_scale"],
                                                        case["groupsize"], D))
            variant(f"{wk}: one element {k} ulp further from 0 (2, or the fewest past the summation-order bound)",
                    {wk: _move_ulps(deq[wk], i, k)}, 1,
                    "more than 1 ulp")
            neg = deq[wk].clone().reshape(-1)
            neg[i] = -neg[i]
            variant(f"{wk}: one element's sign flipped", {wk: neg.reshape(deq[wk].shape)}, 1, "more than 1 ulp")
            nan = deq[wk].clone().reshape(-1)
            nan[i] = float("nan")
            variant(f"{wk}: one element NaN", {wk: nan.reshape(deq[wk].shape)}, 1, "non-finite")
            rotated = (lib_sd[wk].float() * lib_sd[f"{mod}.weight_scale"]).to(D)
            variant(f"{wk}: left in the rotated basis (q * s, not un-rotated)", {wk: rotated}, 1, "more than 1 ulp")
            other = torch.float32 if D != torch.float32 else torch.bfloat16
            variant(f"{wk}: stored as {m.dtype_name(other)}", {wk: deq[wk].to(other)}, 1, "the model's is")
            variant("norm.weight: one element 1 ulp off", {"norm.weight": _move_ulps(deq["norm.weight"], 0, 1)}, 1,
                    "(b) plain norm.weight")
            variant(f"{mod}.bias missing", {}, 1, "missing: ['" + f"{mod}.bias", drop=(f"{mod}.bias",))
            variant(f"an extra key {mod}.weight_scale", {f"{mod}.weight_scale": lib_sd[f"{mod}.weight_scale"]}, 1,
                    "unexpected: ['" + f"{mod}.weight_scale")
            for k, (label, sd, expect, needle) in enumerate(variants):
                path = os.path.join(tmp, f"{name}-{k}.safetensors")
                m.save_file(sd, path)
                out, err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    rc = main(["--case", cdir, "--ours-plain", path, "--no-env-check"])
                good = rc == expect and (needle is None or needle in err.getvalue())
                results.append((good, f"{name}: {label}: exit {rc} (want {expect}"
                                      + (f", stderr with {needle!r}" if needle else "") + ")"))
                if not good:
                    results.append((False, "    stderr: " + err.getvalue().strip().replace("\n", "\n    ")))
        # usage errors
        name = cases[0]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = main(["--case", os.path.join(fixtures, name), "--ours-plain", os.path.join(tmp, "nope.safetensors")])
        results.append((rc == 2, f"{name}: a missing --ours-plain file: exit {rc} (want 2)"))
        broken = os.path.join(tmp, "broken-case")
        shutil.copytree(os.path.join(fixtures, name), broken)
        os.remove(os.path.join(broken, "dequantized.safetensors"))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = main(["--case", broken, "--ours-plain", os.path.join(fixtures, name, "dequantized.safetensors")])
        results.append((rc == 2, f"{name}: a case without dequantized.safetensors: exit {rc} (want 2)"))
    for good, text in results:
        print(("ok   " if good else "FAIL ") + text if not text.startswith("    ") else text)
    nbad = sum(1 for good, t in results if not good and not t.startswith("    "))
    ntot = sum(1 for _, t in results if not t.startswith("    "))
    print(f"self-test: {ntot - nbad} of {ntot} expectations hold")
    return 0 if nbad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Generate golden ComfyUI legacy `scaled_fp8` fixtures with convert-to-quant 1.3.4 (simple path, per tensor, CPU).

    target/interop-venv/bin/python -m pip install --no-deps --target target/c2q-site \\
        -r tests/interop/comfy/legacy/requirements.txt                      # once (live.sh does it too)
    target/interop-venv/bin/python tests/interop/comfy/legacy/gen_legacy_fixtures.py \\
        --out tests/fixtures/comfy-legacy --seed 20261202 --site target/c2q-site   # all three are the defaults

convert-to-quant 1.3.4 can NOT write the legacy form by itself: `convert_to_fp8_scaled` sets `comfy_quant = True` in
both arms of `if comfy_quant:` (formats/fp8_conversion.py:139-143, since upstream commit 25ef5ed, first released in
1.2.0), so without `--comfy_quant` it still writes `{m}.weight_scale` + `{m}.comfy_quant`. Its legacy writer (lines
690-699: `{m}.scale_weight`; 856-862: the `scaled_fp8` marker) is dead code. This generator runs the library's own
CLI (`convert_to_quant.cli.main.run_conversion`, in process) with that one function re-compiled from the installed
source with two asserted text patches:

  1. line 143  `comfy_quant = True` -> `comfy_quant = False` in the `else:` arm (re-enables the legacy branch);
  2. line 860/862 the marker's `torch.empty(...)` -> `torch.zeros(...)`: the library writes UNINITIALISED memory as
     the marker's bytes (different on every run); zeros make the fixtures reproducible (ComfyUI reads only the
     marker's presence, dtype and element count).

Everything else (argument defaults, quantization, bias correction, scale normalization, save_file) is the library's
code as installed. Per case the generator also runs the UNPATCHED 1.3.4 with the same command and requires its
comfy_quant file to hold byte-identical codes, scales (`weight_scale` == our `scale_weight`), biases and other
tensors, so the patch changes nothing but the container. With --crosscheck-site DIR (a `pip install --no-deps
--target DIR convert-to-quant==1.1.5`, the last release whose legacy writer is live) it also runs 1.1.5 unpatched
(`--calib_samples 3072`, 1.1.5's default is 6144) and requires the same bytes except the marker's (uninitialised
there); that check only prints, it writes nothing.

Per case (CASES): <out>/<case>/{float,quantized}.safetensors and case.json; then <out>/index.json. Aborts (exit 1)
if the library's output differs from the independent numpy restatement of the weight arithmetic (codes, scales),
from the torch restatement of the bias correction, from the unpatched run, or does not have the expected keys.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.metadata
import io
import os
import subprocess
import sys
import tempfile
import types
from typing import Dict, List

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/interop/comfy
import comfy_models as cm  # noqa: E402
from comfy_models import (  # noqa: E402
    DTYPES,
    case_seed,
    f32_bits,
    file_header,
    fp8_decode_table,
    fp8_encode_rne,
    same_tensor,
    save_file,
    sha256_file,
    write_json,
)

REPO_ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "comfy-legacy")
DEFAULT_SITE = os.path.join(REPO_ROOT, "target", "c2q-site")
DEFAULT_SEED = 20261202

C2Q_VERSION = "1.3.4"
PRODIGY_VERSION = "2.0.1"
CROSSCHECK_VERSION = "1.1.5"
FMT = "float8_e4m3fn"
FP8_MAX = np.float32(448.0)
CALIB_SAMPLES = 3072  # the 1.3.4 CLI default (--calib_samples)

# lin_c: the rest scaled to amax 0.5, then element [0, 0] = 0.875, so that the multiplier s = f32(f32(1 / 0.875) * 448)
# is exactly 512 and x * s is exact; then elements whose x * 512 lies exactly halfway between two e4m3fn values
# (row, col, x * 512): normal ties, subnormal ties (step 2^-9), half the smallest subnormal, 7.5 * 2^-9 (largest
# subnormal | smallest normal) and 432 (416 | 448)
TIES_AMAX = 0.875
# (row, col, x * 512, the e4m3fn value round-half-to-even gives)
TIES = [(1, 0, 1.0625, 1.0), (1, 1, 1.1875, 1.25), (1, 2, -1.0625, -1.0), (1, 3, -1.1875, -1.25),
        (1, 4, 0.5 * 2.0**-9, 0.0), (1, 5, 1.5 * 2.0**-9, 2.0 * 2.0**-9), (1, 6, -2.5 * 2.0**-9, -2.0 * 2.0**-9),
        (1, 7, 432.0, 448.0), (1, 8, -432.0, -448.0), (1, 9, 7.5 * 2.0**-9, 2.0**-6)]

CASES = [("legacy-bf16", "bfloat16"), ("legacy-f16", "float16"), ("legacy-f32", "float32")]

# name, weight shape, bias, extras.  Every 2-D `.weight` is quantized (1.3.4 has no default name exclusions);
# the 1-D norm.weight is not (only ndim == 2 weights are candidates) and is copied verbatim.
SPECS = [
    dict(name="lin_a", shape=[64, 128], bias=True, neg_max=[5, 17, 1.7]),  # amax element negative
    dict(name="lin_b", shape=[48, 96], bias=True, wide=64),  # columns 64..: tiny magnitudes (fp8 subnormals, zeros)
    dict(name="lin_c", shape=[32, 64], bias=False, ties=True),  # amax 0.875 -> multiplier exactly 512; RNE ties
    dict(name="lin_zero", shape=[16, 32], bias=True, zero=True),  # all-zero weight: the library's special case
    dict(name="norm", shape=[64], bias=False),
]

# the CLI command (run in process by run_cli; every other flag is the 1.3.4 default: --scaling_mode tensor,
# --calib_samples 3072, --optimizer prodigy (unused with --simple, but the converter imports prodigyplus),
# --output-dtype bfloat16 (casts unquantized 2-D weights; there are none here), no --comfy_quant)
def cli_args(inp: str, out: str, seed: int) -> List[str]:
    return ["-i", inp, "-o", out, "--simple", "--device", "cpu", "--manual_seed", str(seed)]


COMMAND = "convert_to_quant -i float.safetensors -o quantized.safetensors --simple --device cpu --manual_seed SEED"

PATCHES = [
    dict(file="convert_to_quant/formats/fp8_conversion.py", lines="139-143",
         old="        comfy_quant = True\n    else:\n        comfy_quant = True\n",
         new="        comfy_quant = True\n    else:\n        comfy_quant = False\n",
         why="1.3.4 forces comfy_quant = True in both arms, so its legacy branch (lines 690-699, 856-862) is "
             "unreachable; this re-enables it for a run without --comfy_quant"),
    dict(file="convert_to_quant/formats/fp8_conversion.py", lines="860-862",
         old='        new_tensors["scaled_fp8"] = torch.empty(\n            (0), dtype=TARGET_FP8_DTYPE\n'
             '        ) if (has_text_encoder_filter or include_input_scale) else torch.empty((2), '
             'dtype=TARGET_FP8_DTYPE)\n',
         new='        new_tensors["scaled_fp8"] = torch.zeros(\n            (0), dtype=TARGET_FP8_DTYPE\n'
             '        ) if (has_text_encoder_filter or include_input_scale) else torch.zeros((2), '
             'dtype=TARGET_FP8_DTYPE)\n',
         why="torch.empty leaves the marker's 2 bytes uninitialised (they differ from run to run); zeros make "
             "the fixtures reproducible. ComfyUI reads only the marker's presence, dtype and element count"),
]


def fail(msg: str):
    print(f"generator check failed: {msg}", file=sys.stderr)
    sys.exit(1)


# --------------------------------------------------------------------------------------
# The library
# --------------------------------------------------------------------------------------


class Library:
    """convert-to-quant 1.3.4 from `site` (a pip --target directory), its CLI module, and the patched
    convert_to_fp8_scaled (PATCHES) compiled from the installed source into a sibling module."""

    def __init__(self, site: str):
        site = os.path.abspath(site)
        self.site = site
        if not os.path.isdir(os.path.join(site, "convert_to_quant")):
            fail(f"convert-to-quant is not installed in {site}; run: {sys.executable} -m pip install --no-deps "
                 f"--target {site} -r {os.path.join(HERE, 'requirements.txt')}")
        sys.path.insert(0, site)
        import convert_to_quant

        if not os.path.abspath(convert_to_quant.__file__).startswith(site + os.sep):
            fail(f"convert_to_quant imported from {convert_to_quant.__file__}, not from {site}")
        self.versions = {"convert_to_quant": importlib.metadata.version("convert-to-quant"),
                         "prodigy_plus_schedule_free": importlib.metadata.version("prodigy-plus-schedule-free"),
                         "tqdm": importlib.metadata.version("tqdm"),
                         "torch": torch.__version__, "safetensors": importlib.metadata.version("safetensors"),
                         "numpy": np.__version__, "python": sys.version.split()[0]}
        if self.versions["convert_to_quant"] != C2Q_VERSION:
            fail(f"convert-to-quant {self.versions['convert_to_quant']} installed, fixtures are for {C2Q_VERSION}")
        if self.versions["prodigy_plus_schedule_free"] != PRODIGY_VERSION:
            fail(f"prodigy-plus-schedule-free {self.versions['prodigy_plus_schedule_free']} installed, "
                 f"want {PRODIGY_VERSION}")
        # convert_to_quant/cli/__init__.py re-exports the function `main`, which shadows the submodule attribute
        self.cli = importlib.import_module("convert_to_quant.cli.main")
        self.fc = importlib.import_module("convert_to_quant.formats.fp8_conversion")
        self.original = self.cli.convert_to_fp8_scaled
        if self.original is not self.fc.convert_to_fp8_scaled:
            fail("cli.main.convert_to_fp8_scaled is not formats.fp8_conversion.convert_to_fp8_scaled")
        with open(self.fc.__file__, encoding="utf-8") as f:
            src = f.read()
        self.source_sha256 = hashlib.sha256(src.encode()).hexdigest()
        patched = src
        for p in PATCHES:
            n = patched.count(p["old"])
            if n != 1:
                fail(f"patch for {p['file']}:{p['lines']}: the expected text occurs {n} times, not once")
            patched = patched.replace(p["old"], p["new"])
        self.patched_sha256 = hashlib.sha256(patched.encode()).hexdigest()
        mod = types.ModuleType("convert_to_quant.formats.fp8_conversion_legacy")
        mod.__package__ = "convert_to_quant.formats"
        mod.__file__ = self.fc.__file__
        exec(compile(patched, self.fc.__file__ + " [legacy branch re-enabled]", "exec"), mod.__dict__)
        self.legacy = mod.convert_to_fp8_scaled

    def run_cli(self, argv: List[str], legacy: bool, out_path: str) -> str:
        """The 1.3.4 CLI (get_parser().parse_args + run_conversion, i.e. convert_to_quant.cli.main.main),
        with convert_to_fp8_scaled patched (legacy) or not.  Returns its log."""
        log = io.StringIO()
        self.cli.convert_to_fp8_scaled = self.legacy if legacy else self.original
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                self.cli.run_conversion(self.cli.get_parser().parse_args(argv))
        finally:
            self.cli.convert_to_fp8_scaled = self.original
        text = log.getvalue()
        if not os.path.isfile(out_path) or "FATAL" in text or "ERROR" in text:
            fail(f"the library did not write {out_path}:\n{text[-3000:]}")
        return text


# --------------------------------------------------------------------------------------
# The float model
# --------------------------------------------------------------------------------------


def float_state_dict(dtype: str, seed: int) -> Dict[str, torch.Tensor]:
    """randn * row_scale + row_offset in f32 (as the other comfy fixtures), then cast to D; lin_a's largest
    magnitude is one negative element (1.7x the rest), lin_b's columns 64.. get random signs and magnitudes
    2^-U(3, 30), lin_zero is all zero.  One generator seeded with the case seed, specs in order."""
    T = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    sd: Dict[str, torch.Tensor] = {}
    for s in SPECS:
        n, shape = s["name"], s["shape"]
        if len(shape) == 1:
            sd[f"{n}.weight"] = (1.0 + 0.1 * torch.randn(shape, generator=g)).to(T)
            continue
        o, i = shape
        val = torch.randn(shape, generator=g) * (0.02 + 0.1 * torch.rand(o, 1, generator=g)) \
            + (torch.linspace(-0.3, 0.3, o).reshape(o, 1) + 0.05 * torch.randn(o, 1, generator=g))
        if s.get("wide"):
            c0 = s["wide"]
            k = (o, i - c0)
            mag = torch.exp2(-(3.0 + 27.0 * torch.rand(k, generator=g)))
            sign = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
            val[:, c0:] = sign * mag
        if s.get("neg_max"):
            r, c, f = s["neg_max"]
            val[r, c] = -f * float(val.abs().max())
        if s.get("zero"):
            val.zero_()
        if s.get("ties"):
            val = val * (0.5 / float(val.abs().max()))
            val[0, 0] = TIES_AMAX
            for r, c, t, _ in TIES:
                val[r, c] = t / 512.0
        sd[f"{n}.weight"] = val.to(T)
        if s["bias"]:
            sd[f"{n}.bias"] = (0.1 * torch.randn(o, generator=g)).to(T)
    return sd


def quantized_modules() -> List[str]:
    return [s["name"] for s in SPECS if len(s["shape"]) == 2]


# --------------------------------------------------------------------------------------
# Independent restatement of the weight arithmetic (numpy, own fp8 codec)
# --------------------------------------------------------------------------------------


def widen_f32(w: torch.Tensor) -> np.ndarray:
    """The weight as f32, from its bits (no torch cast): bf16 -> bits << 16, f16 -> numpy's f16 widening."""
    if w.dtype == torch.bfloat16:
        bits = w.contiguous().view(torch.int16).numpy().astype(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    if w.dtype == torch.float16:
        return w.contiguous().view(torch.int16).numpy().view(np.float16).astype(np.float32)
    return w.contiguous().numpy().astype(np.float32)


def restate_weight(w: torch.Tensor) -> dict:
    """learned_rounding.py _convert_fp8, scaling_mode "tensor", no_learned_rounding (lines 1954-1976), with
    torch's `448.0 / t` being `t.reciprocal() * 448.0` (torch/_tensor.py __rdiv__):
      x = f32(W); amax = max|x|                                  (exact)
      all zero -> codes 0, scale_weight 1.0                      (convert(), lines 716-749: torch.ones(1) -> [])
      a = max(amax, f32(1e-12)); s = f32(f32(1 / a) * 448)       (the multiplier)
      q = e4m3fn_rne(clamp(f32(x * s), -448, 448))
      scale_weight = f32(1 / s)                                  (compact_scale.reciprocal(), F32 0-dim)"""
    x = widen_f32(w)
    amax = np.float32(np.max(np.abs(x)))
    one = np.float32(1.0)
    if amax == 0:
        return dict(codes=np.zeros(x.shape, dtype=np.uint8), scale_weight=one, s=None, amax=amax, ties=0,
                    clamped=0, all_zero=True, naive_scale_differs=False, division_codes_differ=0)
    a = max(amax, np.float32(1e-12))
    s = np.float32(np.float32(one / a) * FP8_MAX)
    t = (x * s).astype(np.float32)
    clamped = int(np.count_nonzero(np.abs(t) > FP8_MAX))
    t = np.clip(t, -FP8_MAX, FP8_MAX)
    codes, ties = fp8_encode_rne(t, FMT)
    sw = np.float32(one / s)
    # what a reader might assume instead: scale = f32(amax / 448), q = rne(clamp(f32(x / scale)))
    naive = np.float32(amax / FP8_MAX)
    t2 = np.clip((x / naive).astype(np.float32), -FP8_MAX, FP8_MAX)
    codes2, _ = fp8_encode_rne(t2, FMT)
    return dict(codes=codes.reshape(x.shape), scale_weight=sw, s=s, amax=amax, ties=int(ties.sum()),
                clamped=clamped, all_zero=False, naive_scale_differs=bool(naive != sw),
                division_codes_differ=int(np.count_nonzero(codes2 != codes)))


def code_stats(codes: np.ndarray, x: np.ndarray) -> dict:
    b = codes.reshape(-1)
    mag = b & 0x7F
    return {"zero_codes": int(np.count_nonzero(mag == 0)),
            "zero_codes_from_nonzero": int(np.count_nonzero((mag == 0) & (x.reshape(-1) != 0))),
            "subnormal_codes": int(np.count_nonzero((mag > 0) & (mag < 8))),
            "max_codes_448": int(np.count_nonzero(mag == 0x7E)),
            "nan_codes": int(np.count_nonzero(mag == 0x7F))}


# --------------------------------------------------------------------------------------
# Restatement of the bias correction (the same torch ops, in the library's order)
# --------------------------------------------------------------------------------------


def restate_calibration(fsd: Dict[str, torch.Tensor], key_order: List[str], seed: int) -> Dict[int, torch.Tensor]:
    """fp8_conversion.py:136-137, 317-337: one CPU generator seeded with the CLI seed; for each key of the input
    file in its order (safetensors: sorted) that ends in `.weight` and is 2-D, a new in_features gets
    randn(3072, in_features, f32) (layers without a bias draw theirs too)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    cache: Dict[int, torch.Tensor] = {}
    for k in key_order:
        if k.endswith(".weight") and fsd[k].ndim == 2 and fsd[k].shape[1] not in cache:
            cache[fsd[k].shape[1]] = torch.randn(CALIB_SAMPLES, fsd[k].shape[1], dtype=torch.float32, generator=g)
    return cache


def restate_bias(w: torch.Tensor, b: torch.Tensor, q: torch.Tensor, r: dict, X: torch.Tensor) -> torch.Tensor:
    """fp8_conversion.py:717-754 ("even in simple mode"): dequant_w = f32(q) / s (learned_rounding.py:1973,
    zeros for an all-zero weight); b' = D(f32(b) - mean_0(X @ (f32(W) - dequant_w).T))."""
    W = w.to(torch.float32)
    if r["all_zero"]:
        deq = torch.zeros_like(W)
    else:
        deq = q.to(torch.float32) / torch.tensor(r["s"], dtype=torch.float32)
    err = W - deq
    corr = (X @ err.T).mean(dim=0)
    return (b.to(torch.float32) - corr).to(b.dtype)


# --------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------


def load(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}


def st_keys(path: str) -> List[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return list(f.keys())


def make_case(lib: Library, name: str, dtype: str, base_seed: int, out: str, crosscheck_site=None) -> dict:
    seed = case_seed(base_seed, name)
    cdir = os.path.join(out, name)
    os.makedirs(cdir, exist_ok=True)
    fpath, qpath = os.path.join(cdir, "float.safetensors"), os.path.join(cdir, "quantized.safetensors")
    fsd = float_state_dict(dtype, seed)
    save_file(fsd, fpath)
    if os.path.exists(qpath):
        os.remove(qpath)
    lib.run_cli(cli_args(fpath, qpath, seed), legacy=True, out_path=qpath)
    qsd = load(qpath)
    key_order = st_keys(fpath)
    mods = quantized_modules()

    # ---- keys, dtypes, shapes
    want = set(fsd) | {f"{m}.scale_weight" for m in mods} | {"scaled_fp8"}
    if set(qsd) != want:
        fail(f"{name}: keys {sorted(set(qsd) ^ want)} differ from the expected set")
    marker = qsd["scaled_fp8"]
    if marker.dtype != torch.float8_e4m3fn or list(marker.shape) != [2]:
        fail(f"{name}: marker {marker.dtype} {list(marker.shape)}")
    if marker.view(torch.uint8).tolist() != [0, 0]:
        fail(f"{name}: marker bytes {marker.view(torch.uint8).tolist()} (the zeros patch did not apply)")
    fmeta, qmeta = file_header(fpath).get("__metadata__"), file_header(qpath).get("__metadata__")
    if fmeta != qmeta:
        fail(f"{name}: __metadata__ {qmeta!r} is not the float file's {fmeta!r}")

    # ---- the unpatched 1.3.4, same command: the comfy_quant form, same bytes
    with tempfile.TemporaryDirectory() as td:
        cpath = os.path.join(td, "comfy.safetensors")
        lib.run_cli(cli_args(fpath, cpath, seed), legacy=False, out_path=cpath)
        csd = load(cpath)
    cwant = set(fsd) | {f"{m}.weight_scale" for m in mods} | {f"{m}.comfy_quant" for m in mods}
    if set(csd) != cwant:
        fail(f"{name}: unpatched run: keys {sorted(set(csd) ^ cwant)} differ from the comfy_quant form")
    comfy_quant_json = sorted({bytes(csd[f"{m}.comfy_quant"].tolist()).decode() for m in mods})
    for k in qsd:
        if k == "scaled_fp8":
            continue
        ck = k[: -len(".scale_weight")] + ".weight_scale" if k.endswith(".scale_weight") else k
        d = same_tensor(qsd[k], csd[ck])
        if d:
            fail(f"{name}: {k} differs from the unpatched run's {ck}: {d}")

    # ---- weights: the independent restatement
    calib = restate_calibration(fsd, key_order, seed)
    layers, biases = {}, {}
    for m in mods:
        w, q, sw = fsd[f"{m}.weight"], qsd[f"{m}.weight"], qsd[f"{m}.scale_weight"]
        if q.dtype != torch.float8_e4m3fn or q.shape != w.shape:
            fail(f"{name}: {m}.weight {q.dtype} {list(q.shape)}")
        if sw.dtype != torch.float32 or list(sw.shape) != []:
            fail(f"{name}: {m}.scale_weight {sw.dtype} {list(sw.shape)} (want F32 [])")
        r = restate_weight(w)
        qb = q.contiguous().view(torch.uint8).numpy()
        if not np.array_equal(qb, r["codes"]):
            fail(f"{name}: {m}: codes differ from the restatement in {int(np.count_nonzero(qb != r['codes']))} "
                 f"of {qb.size} elements")
        if f32_bits(float(sw)) != f32_bits(float(r["scale_weight"])):
            fail(f"{name}: {m}: scale_weight {f32_bits(float(sw))} != restatement {f32_bits(float(r['scale_weight']))}")
        x = widen_f32(w)
        dec = fp8_decode_table(FMT)[qb.astype(np.int64)]
        if m == "lin_c":
            if float(r["s"]) != 512.0 or r["ties"] < len(TIES):
                fail(f"{name}: lin_c: multiplier {float(r['s'])!r}, {r['ties']} RNE ties (want 512.0, >= {len(TIES)})")
            for rr, cc, t, want_v in TIES:
                if float(x[rr, cc]) * 512.0 != t or float(dec[rr, cc]) != want_v:
                    fail(f"{name}: lin_c[{rr}, {cc}]: x * 512 = {float(x[rr, cc]) * 512.0!r} coded as "
                         f"{float(dec[rr, cc])!r}, want {t!r} -> {want_v!r}")
        layers[m] = {
            "shape": list(w.shape),
            "amax": repr(float(r["amax"])), "amax_bits": f32_bits(float(r["amax"])),
            "all_zero": r["all_zero"],
            "multiplier_s": None if r["s"] is None else repr(float(r["s"])),
            "multiplier_s_bits": None if r["s"] is None else f32_bits(float(r["s"])),
            "scale_weight": repr(float(sw)), "scale_weight_bits": f32_bits(float(sw)),
            "scale_weight_is_f32_amax_over_448": (not r["all_zero"]) and not r["naive_scale_differs"],
            "codes_if_x_divided_by_f32_amax_over_448_differ": r["division_codes_differ"],
            "elements_clamped": r["clamped"], "rne_ties": r["ties"],
            "codes_sha256": hashlib.sha256(qb.tobytes()).hexdigest(),
            "code_value_range": [float(np.min(dec)), float(np.max(dec))],
            **code_stats(qb, x),
        }
        # ---- bias correction
        bk = f"{m}.bias"
        if bk in fsd:
            nb = restate_bias(w, fsd[bk], q, r, calib[w.shape[1]])
            d = same_tensor(qsd[bk], nb)
            if d:
                fail(f"{name}: {bk}: the library's corrected bias differs from the restatement: {d}")
            fb = fsd[bk].to(torch.float32)
            lb = qsd[bk].to(torch.float32)
            iv = torch.int32 if fsd[bk].dtype == torch.float32 else torch.int16
            changed = int((qsd[bk].view(iv) != fsd[bk].view(iv)).sum())  # bit patterns
            biases[bk] = {"dtype": dtype, "changed_elements": changed, "of": int(fsd[bk].numel()),
                          "max_abs_change": repr(float((lb - fb).abs().max())),
                          "calibration_in_features": int(w.shape[1]),
                          "sha256_library": hashlib.sha256(cm.tensor_bytes(qsd[bk])).hexdigest(),
                          "sha256_float": hashlib.sha256(cm.tensor_bytes(fsd[bk])).hexdigest()}
    for k in fsd:  # everything that is not a quantized weight or its bias: verbatim
        mod = k.rsplit(".", 1)[0]
        if mod in mods and k.endswith((".weight", ".bias")):
            continue
        d = same_tensor(qsd[k], fsd[k])
        if d:
            fail(f"{name}: {k} is not the float file's: {d}")

    if crosscheck_site:
        crosscheck(crosscheck_site, lib, fpath, qsd, seed, name)

    case = {
        "name": name,
        "dtype": dtype,
        "format": "legacy scaled_fp8, float8_e4m3fn, per tensor",
        "base_seed": base_seed,
        "seed": seed,
        "seed_rule": "interop_common.case_seed(base_seed, name) = (base_seed * 1000003 + crc32(name)) % 2**31; "
                     "the same seed builds the float model and is the library's --manual_seed (calibration data)",
        "modules": [{"name": s["name"], "shape": s["shape"], "bias": s["bias"],
                     "quantized": len(s["shape"]) == 2,
                     **{k: s[k] for k in ("neg_max", "wide", "zero", "ties") if k in s}} for s in SPECS],
        "ties": {"layer": "lin_c", "amax": TIES_AMAX, "multiplier_s": 512.0,
                 "elements_row_col_x_times_512_coded_as": [list(t) for t in TIES]},
        "quantized_modules": mods,
        "library_command": COMMAND.replace("SEED", str(seed)),
        "library_entry": "convert_to_quant.cli.main.run_conversion(get_parser().parse_args(argv)) in process "
                         "(= the console script convert_to_quant), with cli.main.convert_to_fp8_scaled replaced "
                         "by the patched copy",
        "library_patches": [{k: p[k] for k in ("file", "lines", "why")} for p in PATCHES],
        "library_source_sha256": {"fp8_conversion.py": lib.source_sha256, "patched": lib.patched_sha256},
        "unpatched_check": {
            "result": "equal",
            "what": "the unpatched 1.3.4, same command, writes the comfy_quant form ({m}.weight_scale, "
                    "{m}.comfy_quant, no scaled_fp8); its {m}.weight, {m}.weight_scale, biases and norm.weight "
                    "equal this file's {m}.weight, {m}.scale_weight, biases and norm.weight byte for byte",
            "comfy_quant_json": comfy_quant_json,
        },
        "marker": {"key": "scaled_fp8", "dtype": "F8_E4M3", "shape": [2], "bytes": [0, 0],
                   "library_bytes": "uninitialised (torch.empty); zeros here by patch 2"},
        "scale_weight": "F32 [] per quantized layer",
        "restatement_check": {
            "weights": "equal: codes and scale_weight bytes of every layer = the numpy restatement "
                       "(gen_legacy_fixtures.restate_weight, own e4m3fn RNE codec)",
            "biases": "equal: every corrected bias = the torch restatement (restate_calibration + restate_bias, "
                      "the library's ops in its order; BLAS-dependent, so exact on the machine that ran it)",
        },
        "layers": layers,
        "bias_correction": biases,
        "metadata": {"float": fmeta, "quantized": qmeta},
        "files": {fn: {"sha256": sha256_file(os.path.join(cdir, fn)), "bytes": os.path.getsize(os.path.join(cdir, fn)),
                       "header": file_header(os.path.join(cdir, fn))}
                  for fn in ("float.safetensors", "quantized.safetensors")},
        "ckptkit_command": "migrate convert float.safetensors ours.safetensors --to fp8:legacy",
        "ckptkit_expectation": "every tensor of ours = quantized.safetensors byte for byte, except the biases of "
                               "quantized layers, which must be float.safetensors' (ckptkit does no bias correction)",
        "versions": lib.versions,
        "torch_threads": torch.get_num_threads(),
    }
    write_json(case, os.path.join(cdir, "case.json"))
    return case


def crosscheck(site: str, lib: Library, fpath: str, qsd: Dict[str, torch.Tensor], seed: int, name: str) -> None:
    """convert-to-quant 1.1.5 (legacy writer live), unpatched, --calib_samples 3072, in a subprocess."""
    code = ("import sys, importlib.metadata as md, convert_to_quant, importlib\n"
            f"assert md.version('convert-to-quant') == {CROSSCHECK_VERSION!r}, md.version('convert-to-quant')\n"
            f"assert convert_to_quant.__file__.startswith({os.path.abspath(site)!r}), convert_to_quant.__file__\n"
            "sys.argv = ['convert_to_quant'] + sys.argv[1:]\n"
            "importlib.import_module('convert_to_quant.cli.main').main()\n")
    with tempfile.TemporaryDirectory() as td:
        out = os.path.join(td, "v115.safetensors")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(site), lib.site]))
        p = subprocess.run([sys.executable, "-c", code] + cli_args(fpath, out, seed) +
                           ["--calib_samples", str(CALIB_SAMPLES)], env=env, capture_output=True, text=True)
        if p.returncode != 0 or not os.path.isfile(out):
            fail(f"{name}: convert-to-quant {CROSSCHECK_VERSION} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        osd = load(out)
    if set(osd) != set(qsd):
        fail(f"{name}: {CROSSCHECK_VERSION} keys differ: {sorted(set(osd) ^ set(qsd))}")
    for k in sorted(qsd):
        if k == "scaled_fp8":
            if osd[k].dtype != qsd[k].dtype or osd[k].shape != qsd[k].shape:
                fail(f"{name}: {CROSSCHECK_VERSION} marker {osd[k].dtype} {list(osd[k].shape)}")
            continue
        d = same_tensor(osd[k], qsd[k])
        if d:
            fail(f"{name}: {k}: convert-to-quant {CROSSCHECK_VERSION} differs: {d}")
    print(f"  crosscheck: convert-to-quant {CROSSCHECK_VERSION} (unpatched, legacy writer live) wrote the same "
          f"{len(qsd)} tensors (marker: same dtype/shape, bytes {osd['scaled_fp8'].view(torch.uint8).tolist()})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--site", default=DEFAULT_SITE, help="pip --target directory holding convert-to-quant 1.3.4")
    ap.add_argument("--crosscheck-site", default=None,
                    help="pip --target directory holding convert-to-quant 1.1.5 (optional check, prints only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    lib = Library(args.site)
    os.makedirs(args.out, exist_ok=True)
    index = {"generator": "tests/interop/comfy/legacy/gen_legacy_fixtures.py", "base_seed": args.seed, "cases": []}
    for name, dtype in CASES:
        c = make_case(lib, name, dtype, args.seed, args.out, args.crosscheck_site)
        index["cases"].append({"name": name, "dtype": dtype, "seed": c["seed"]})
        print(f"wrote {os.path.join(args.out, name)}")
    index["versions"] = lib.versions
    write_json(index, os.path.join(args.out, "index.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

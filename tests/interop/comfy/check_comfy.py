#!/usr/bin/env python3
"""Check a ckptkit-written ComfyUI `comfy_quant` file (per-tensor FP8 or `int8_tensorwise`) against a fixture
case (comfy-kitchen 0.2.40).

    target/interop-venv/bin/python tests/interop/comfy/check_comfy.py --case CASE_DIR \\
        --ours OURS.safetensors [--ours-plain PLAIN.safetensors]

(at least one of --ours / --ours-plain; live.sh passes only --ours-plain when ckptkit refused to
write a case whose library output saturates, see case.json "inv_overflow_modules")

CASE_DIR is a case directory written by gen_comfy_fixtures.py (case.json, float.safetensors,
quantized.safetensors, dequantized.safetensors).  OURS is what ckptkit wrote from the case's
float.safetensors with `migrate convert float.safetensors OURS --to TARGET --exclude lin_skip`, where
TARGET is case.json's `ckptkit_target` if it has one (int8 cases: `comfy:int8_tensorwise`, or
`comfy:int8_tensorwise:per_row` for the rowwise cases), else `comfy:<format>`; PLAIN is ckptkit's
`migrate convert quantized.safetensors PLAIN --to plain`.

  environment: comfy-kitchen, run again on float.safetensors, must still give quantized.safetensors
      (otherwise the installed library is not the one the fixture was made with);
  (a) OURS' key set equals quantized.safetensors' key set (`__metadata__` is ignored, except that a
      ComfyUI `_quantization_metadata` entry, which ComfyUI would apply over the comfy_quant
      tensors, must name exactly the quantized layers with the same formats);
  (b) every tensor of OURS equals the library's (dtype, shape, bytes); for `{m}.comfy_quant` the
      decoded JSON must equal the library's as a dict AND the bytes must be identical;
  (c) the library's own dequantization of OURS' `{m}.weight` + `{m}.weight_scale` (as ComfyUI builds
      it: QuantizedTensor(q, layout for OURS' comfy_quant format, Params(scale, orig_dtype=D,
      orig_shape)).dequantize()) equals dequantized.safetensors bit for bit.  The scale must be a float
      scalar for the fp8 formats, and for int8_tensorwise a float of shape [] (one scale) or [out, 1]
      (one per row: the two shapes ComfyUI reads);
  (d) with --ours-plain: PLAIN has the float model's key set, its quantized-layer weights equal
      dequantized.safetensors bit for bit and every other tensor equals float.safetensors.

Prints one MISMATCH line per failure and a final OK/FAIL line.
Exit status: 0 all checks passed, 1 any mismatch, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_models as cm  # noqa: E402

import torch  # noqa: E402

# ComfyUI QUANT_ALGOS entries this checker knows: format -> (comfy-kitchen layout, storage dtype)
KNOWN_FORMATS = cm.FORMAT_LAYOUTS


class Checker:
    def __init__(self):
        self.errors: list[str] = []

    def error(self, msg: str) -> None:
        self.errors.append(msg)
        print(f"MISMATCH: {msg}", file=sys.stderr)


def load(chk: Checker, what: str, path: str):
    try:
        return cm.load_tensors(path)
    except Exception as e:  # noqa: BLE001
        chk.error(f"{what}: safetensors cannot load {path}: {type(e).__name__}: {e}")
        return None


def check_quant_metadata(chk: Checker, path: str, case: dict) -> None:
    """ComfyUI's convert_old_quants applies __metadata__["_quantization_metadata"] over the stored
    comfy_quant tensors; if OURS has one it must agree with them."""
    try:
        meta = cm.file_header(path).get("__metadata__") or {}
    except Exception as e:  # noqa: BLE001
        chk.error(f"(a) ours: cannot read the safetensors header: {type(e).__name__}: {e}")
        return
    if "_quantization_metadata" not in meta:
        return
    try:
        qm = json.loads(meta["_quantization_metadata"])
        layers = qm["layers"]
    except Exception as e:  # noqa: BLE001
        chk.error(f"(a) ours: __metadata__ _quantization_metadata is not ComfyUI's JSON: {type(e).__name__}: {e}")
        return
    want = {m: {"format": case["format"]} for m in cm.quantized_module_names(case)}
    if set(layers) != set(want):
        chk.error(f"(a) ours: _quantization_metadata layers {sorted(layers)} != quantized layers {sorted(want)}")
    for m, v in layers.items():
        if m in want and (not isinstance(v, dict) or v.get("format") != case["format"]):
            chk.error(f"(a) ours: _quantization_metadata layer {m}: {v!r} does not say format {case['format']!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Check a ckptkit comfy_quant file against a comfy-kitchen case.")
    ap.add_argument("--case", required=True, help="fixture case directory")
    ap.add_argument("--ours", help="ckptkit's --to comfy:<format>[:per_row] output of float.safetensors")
    ap.add_argument("--ours-plain", help="ckptkit's --to plain output of quantized.safetensors")
    args = ap.parse_args(argv)
    if not args.ours and not args.ours_plain:
        print("usage error: give --ours, --ours-plain or both", file=sys.stderr)
        return 2

    files = {fn: os.path.join(args.case, fn) for fn in
             ("case.json", "float.safetensors", "quantized.safetensors", "dequantized.safetensors")}
    for p in list(files.values()) + [args.ours, args.ours_plain]:
        if p is not None and not os.path.isfile(p):
            print(f"usage error: {p} not found", file=sys.stderr)
            return 2

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    case = cm.load_case(args.case)
    if case.get("format") not in cm.ALL_FORMATS or case.get("dtype") not in cm.DTYPES:
        print(f"usage error: {files['case.json']} is not a comfy fp8 or int8_tensorwise case", file=sys.stderr)
        return 2
    name = case.get("name", args.case)
    fmt = case["format"]
    D = cm.DTYPES[case["dtype"]]
    qnames = cm.quantized_module_names(case)
    chk = Checker()

    float_sd = cm.load_tensors(files["float.safetensors"])
    lib_sd = cm.load_tensors(files["quantized.safetensors"])
    deq_sd = cm.load_tensors(files["dequantized.safetensors"])

    # environment: the installed comfy-kitchen reproduces the fixture
    qts = {m: cm.library_quantize_case(case, float_sd[f"{m}.weight"]) for m in qnames}
    regen = cm.comfy_state_dict(case, float_sd, qts)
    if set(regen) != set(lib_sd) or any(cm.same_tensor(regen[k], lib_sd[k]) for k in lib_sd):
        chk.error(f"environment: comfy-kitchen no longer reproduces {files['quantized.safetensors']} "
                  "from float.safetensors")

    ours = load(chk, "ours", args.ours) if args.ours else None
    if ours is not None:
        # (a) key set
        check_quant_metadata(chk, args.ours, case)
        missing, extra = sorted(set(lib_sd) - set(ours)), sorted(set(ours) - set(lib_sd))
        if missing or extra:
            chk.error(f"(a) key sets differ; missing from ours: {missing}; unexpected in ours: {extra}")
        # (b) every tensor equals the library's
        for k in sorted(lib_sd):
            if k not in ours:
                continue
            if k.endswith(".comfy_quant"):
                a, b = ours[k], lib_sd[k]
                try:
                    da = cm.decode_comfy_quant(a)
                except Exception as e:  # noqa: BLE001
                    chk.error(f"(b) {k}: not a JSON object in UTF-8 bytes: {type(e).__name__}: {e}")
                    continue
                db = cm.decode_comfy_quant(b)
                if da != db:
                    chk.error(f"(b) {k}: comfy_quant decodes to {da!r}, the library's to {db!r}")
                d = cm.same_tensor(a, b)
                if d:
                    text = bytes(a.to(torch.uint8).reshape(-1).tolist()) if a.dtype == torch.uint8 else a
                    chk.error(f"(b) {k}: comfy_quant bytes {text!r} != {bytes(b.tolist())!r} ({d})")
                continue
            d = cm.same_tensor(ours[k], lib_sd[k])
            if d:
                chk.error(f"(b) {k}: {d}")
        # (c) the library's dequantization of OURS' codes and scale
        for m in qnames:
            q, s, cq = (ours.get(f"{m}.{x}") for x in ("weight", "weight_scale", "comfy_quant"))
            if q is None or s is None or cq is None:
                chk.error(f"(c) {m}: ours lacks weight, weight_scale or comfy_quant; cannot dequantize")
                continue
            try:
                ofmt = cm.decode_comfy_quant(cq).get("format")
            except Exception:  # noqa: BLE001
                ofmt = None
            if ofmt not in KNOWN_FORMATS:
                chk.error(f"(c) {m}: ours' comfy_quant format {ofmt!r} is not a per-tensor fp8 or int8_tensorwise "
                          "format")
                continue
            layout, storage = KNOWN_FORMATS[ofmt]
            if q.dtype != storage:
                chk.error(f"(c) {m}: ours' weight is {q.dtype}; ComfyUI's {ofmt} layout stores {storage}")
                continue
            if ofmt == cm.INT8_FORMAT:
                # TensorWiseINT8Layout: a 0-dim scale is one per tensor, [out, 1] one per row (requantize_kwargs:
                # per_channel = scale.dim() > 0); anything else would broadcast wrongly or fail
                if not s.is_floating_point() or (tuple(s.shape) != () and tuple(s.shape) != (q.shape[0], 1)):
                    chk.error(f"(c) {m}: ours' weight_scale is {s.dtype} {tuple(s.shape)}, not a float of shape [] "
                              f"or [{q.shape[0]}, 1]")
                    continue
            elif s.numel() != 1 or not s.is_floating_point():
                chk.error(f"(c) {m}: ours' weight_scale is {s.dtype} {tuple(s.shape)}, not a float scalar")
                continue
            try:
                dq = cm.library_dequantize_format(ofmt, q, s, D)
            except Exception as e:  # noqa: BLE001
                chk.error(f"(c) {m}: comfy-kitchen cannot dequantize ours: {type(e).__name__}: {e}")
                continue
            d = cm.same_tensor(dq, deq_sd[f"{m}.weight"])
            if d:
                chk.error(f"(c) {m}.weight: library dequantization of ours vs dequantized.safetensors: {d}")

    # (d) ckptkit's plain conversion of the library's file
    if args.ours_plain:
        plain = load(chk, "ours-plain", args.ours_plain)
        if plain is not None:
            missing, extra = sorted(set(float_sd) - set(plain)), sorted(set(plain) - set(float_sd))
            if missing or extra:
                chk.error(f"(d) plain: key sets differ from float.safetensors; missing: {missing}; unexpected: {extra}")
            for k in sorted(float_sd):
                if k not in plain:
                    continue
                ref, what = (deq_sd[k], "library dequantization") if k in deq_sd else (float_sd[k], "float")
                d = cm.same_tensor(plain[k], ref)
                if d:
                    chk.error(f"(d) plain {k} vs {what}: {d}")

    if chk.errors:
        print(f"FAIL: {name}: {len(chk.errors)} mismatch(es)", file=sys.stderr)
        return 1
    what = [w for w, given in (("comfy_quant", args.ours), ("plain", args.ours_plain)) if given]
    print(f"OK: {name} ({' + '.join(what)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Check ckptkit-written block FP8 files against a fixture case (transformers 5.24.0 fine-grained FP8).

    target/interop-venv/bin/python tests/interop/fp8block/check_fp8block.py --case CASE_DIR \\
        [--ours OURS.safetensors] [--ours-plain PLAIN.safetensors] [--config CONFIG.json]

(at least one of --ours / --ours-plain / --config)

CASE_DIR is a case directory written by gen_fp8block_fixtures.py (case.json, float.safetensors,
model.safetensors, dequantized.safetensors).  OURS is what ckptkit wrote from the case's float.safetensors
with `migrate convert float.safetensors OURS --to TARGET --exclude lin_skip`, TARGET = case.json's
`ckptkit_target` (`fp8:block` or `fp8:block:ue8m0`); PLAIN is ckptkit's
`migrate convert model.safetensors PLAIN --to plain`.  CONFIG is the config.json ckptkit wrote beside a
directory output (live.sh: the float model with a config.json without quantization_config, converted as a
directory).

  environment: transformers, run again on float.safetensors, must still give model.safetensors and
      dequantized.safetensors (otherwise the installed library is not the one the fixture was made with);
  (a) OURS holds exactly model.safetensors' tensors: the same key set (`__metadata__` is ignored) and every
      tensor equal in dtype, shape and bytes;
  (b) transformers' dequantization of OURS' `{m}.weight` codes + `{m}.weight_scale_inv` equals
      dequantized.safetensors bit for bit: `Fp8Dequantize._dequantize_one(q, s, output_dtype=D)` for an
      aligned weight, and on the codes zero-padded to the scale grid, cropped, for a ragged one.  The codes
      must be F8_E4M3 of the module's shape and the scale the ceil grid [ceil(N/128), ceil(K/128)];
  (c) PLAIN equals dequantized.safetensors tensor for tensor: the float model's key set (the scales gone),
      every tensor equal in dtype, shape and bytes;
  (d) with --config: CONFIG's `quantization_config`, parsed by transformers as from_pretrained does
      (`AutoQuantizationConfig.from_dict`), serialises (`to_dict()`) exactly as the case's config.json's
      does: quant_method "fp8", weight_block_size [128, 128], the case's scale_fmt, modules_to_not_convert
      ["lin_skip"], and transformers' defaults for the rest.  Keys transformers ignores are reported, not failed.

Prints one MISMATCH line per failure and a final OK/FAIL line.
Exit status: 0 all checks passed, 1 any mismatch, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp8block_models as fm  # noqa: E402

import torch  # noqa: E402


class Checker:
    def __init__(self):
        self.errors: list[str] = []

    def error(self, msg: str) -> None:
        self.errors.append(msg)
        print(f"MISMATCH: {msg}", file=sys.stderr)


def load(chk: Checker, what: str, path: str):
    try:
        return fm.load_tensors(path)
    except Exception as e:  # noqa: BLE001
        chk.error(f"{what}: safetensors cannot load {path}: {type(e).__name__}: {e}")
        return None


def key_sets(chk: Checker, tag: str, ours: dict, ref: dict, ref_file: str) -> None:
    missing, extra = sorted(set(ref) - set(ours)), sorted(set(ours) - set(ref))
    if missing or extra:
        chk.error(f"{tag} key sets differ from {ref_file}; missing from ours: {missing}; unexpected in ours: {extra}")


def parsed_quantization_config(qc: dict) -> dict:
    """transformers' own parse of a quantization_config (as from_pretrained does it), serialised."""
    from transformers.quantizers.auto import AutoQuantizationConfig

    return json.loads(json.dumps(AutoQuantizationConfig.from_dict(dict(qc)).to_dict()))


def check_config(chk: Checker, path: str, case_config: str) -> None:
    try:
        with open(path) as f:
            qc = json.load(f)["quantization_config"]
        if not isinstance(qc, dict):
            raise TypeError(f"quantization_config is {type(qc).__name__}")
    except Exception as e:  # noqa: BLE001
        chk.error(f"(d) config: {path} has no readable quantization_config: {type(e).__name__}: {e}")
        return
    with open(case_config) as f:
        ref_qc = json.load(f)["quantization_config"]
    if qc.get("quant_method") != "fp8":
        chk.error(f"(d) config: quant_method {qc.get('quant_method')!r} != 'fp8'")
        return
    try:
        ours = parsed_quantization_config(qc)
    except Exception as e:  # noqa: BLE001
        chk.error(f"(d) config: transformers rejects our quantization_config: {type(e).__name__}: {e}")
        return
    ref = parsed_quantization_config(ref_qc)
    for k in sorted(set(ours) | set(ref)):
        if ours.get(k) != ref.get(k):
            chk.error(f"(d) config: quantization_config[{k!r}] parses to {json.dumps(ours.get(k))}, "
                      f"transformers' config.json to {json.dumps(ref.get(k))}")
    ignored = sorted(set(qc) - set(ours))
    absent = sorted(set(ref_qc) - set(qc))
    if ignored or absent:
        print(f"note: (d) config: keys transformers ignores: {ignored}; keys left to transformers' defaults: {absent}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Check ckptkit block FP8 files against a transformers fp8 case.")
    ap.add_argument("--case", required=True, help="fixture case directory")
    ap.add_argument("--ours", help="ckptkit's --to fp8:block[:ue8m0] --exclude lin_skip output of float.safetensors")
    ap.add_argument("--ours-plain", help="ckptkit's --to plain output of model.safetensors")
    ap.add_argument("--config", help="the config.json ckptkit wrote with a --to fp8:block[:ue8m0] directory output")
    args = ap.parse_args(argv)
    if not args.ours and not args.ours_plain and not args.config:
        print("usage error: give --ours, --ours-plain, --config or several", file=sys.stderr)
        return 2
    files = {fn: os.path.join(args.case, fn) for fn in
             ("case.json", "float.safetensors", "model.safetensors", "dequantized.safetensors")}
    for p in list(files.values()) + [args.ours, args.ours_plain, args.config]:
        if p is not None and not os.path.isfile(p):
            print(f"usage error: {p} not found", file=sys.stderr)
            return 2

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    case = fm.load_case(args.case)
    if case.get("scale_fmt") not in fm.SCALE_FMTS or case.get("dtype") not in fm.DTYPES or "specs" not in case:
        print(f"usage error: {files['case.json']} is not a block FP8 case", file=sys.stderr)
        return 2
    name = case.get("name", args.case)
    fmt = case["scale_fmt"]
    D = fm.DTYPES[case["dtype"]]
    chk = Checker()

    float_sd = fm.load_tensors(files["float.safetensors"])
    lib_sd = fm.load_tensors(files["model.safetensors"])
    deq_sd = fm.load_tensors(files["dequantized.safetensors"])

    # environment: the installed transformers reproduces the fixture
    regen, regen_deq = fm.case_state_dicts(case, float_sd)
    for what, a, b in (("model.safetensors", regen, lib_sd), ("dequantized.safetensors", regen_deq, deq_sd)):
        if set(a) != set(b) or any(fm.describe_diff(a[k], b[k]) for k in b):
            chk.error(f"environment: transformers no longer reproduces {what} from float.safetensors")

    ours = load(chk, "ours", args.ours) if args.ours else None
    if ours is not None:
        # (a) the library's tensors, exactly
        key_sets(chk, "(a)", ours, lib_sd, "model.safetensors")
        for k in sorted(lib_sd):
            if k in ours:
                d = fm.describe_diff(ours[k], lib_sd[k])
                if d:
                    chk.error(f"(a) {k}: {d}")
        # (b) transformers' dequantization of OUR codes and scales
        for s in fm.quantized_specs(case):
            m, shape = s["name"], s["shape"]
            q, sc = ours.get(f"{m}.weight"), ours.get(f"{m}.weight_scale_inv")
            if q is None or sc is None:
                chk.error(f"(b) {m}: ours lacks {m}.weight or {m}.weight_scale_inv; cannot dequantize")
                continue
            if q.dtype != fm.FP8 or list(q.shape) != shape:
                chk.error(f"(b) {m}: ours' weight is {fm.dtype_name(q)} {list(q.shape)}, not float8_e4m3fn {shape}; "
                          "cannot dequantize")
                continue
            if list(sc.shape) != fm.grid(shape) or not sc.is_floating_point():
                chk.error(f"(b) {m}: ours' weight_scale_inv is {fm.dtype_name(sc)} {list(sc.shape)}, not a float "
                          f"scale of the grid {fm.grid(shape)}; cannot dequantize")
                continue
            try:
                dq = fm.library_dequantize_any(q, sc, D, fmt)
            except Exception as e:  # noqa: BLE001
                chk.error(f"(b) {m}: transformers cannot dequantize ours: {type(e).__name__}: {e}")
                continue
            d = fm.describe_diff(dq, deq_sd[f"{m}.weight"], "ours dequantized", "dequantized.safetensors")
            if d:
                chk.error(f"(b) {m}.weight: transformers' dequantization of ours vs dequantized.safetensors: {d}")

    # (c) ckptkit's plain reading of the library's file
    if args.ours_plain:
        plain = load(chk, "ours-plain", args.ours_plain)
        if plain is not None:
            key_sets(chk, "(c) plain:", plain, deq_sd, "dequantized.safetensors")
            for k in sorted(deq_sd):
                if k in plain:
                    what = "library dequantization" if k.rsplit(".", 1)[0] in fm.quantized_module_names(case) \
                        and k.endswith(".weight") else "float"
                    d = fm.describe_diff(plain[k], deq_sd[k], "plain", "dequantized.safetensors")
                    if d:
                        chk.error(f"(c) plain {k} vs {what}: {d}")

    # (d) ckptkit's config.json
    if args.config:
        check_config(chk, args.config, os.path.join(args.case, "config.json"))

    if chk.errors:
        print(f"FAIL: {name}: {len(chk.errors)} mismatch(es)", file=sys.stderr)
        return 1
    what = [w for w, given in (("fp8 block", args.ours), ("plain", args.ours_plain), ("config", args.config))
            if given]
    print(f"OK: {name} ({' + '.join(what)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

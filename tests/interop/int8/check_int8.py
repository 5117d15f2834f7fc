#!/usr/bin/env python3
"""Check a ckptkit-written int8 checkpoint with the real compressed-tensors / bitsandbytes code.

    /work/venv-int8/bin/python tests/interop/int8/check_int8.py --case-dir DIR --ours FILE \\
        [--config CONFIG.json] [--expect-dequantized FILE] [--require-identical-tensors] \\
        [--cast-library-output]

DIR is a fixture case directory (case.json + float.safetensors; see gen_int8_fixtures.py).
FILE is our safetensors file in the case's layout (compressed-tensors pack-quantized /
int-quantized, or bitsandbytes LLM.int8).  CONFIG is our config.json; only its
"quantization_config" is used (default: DIR/config.json, the library's own).

The library's own checkpoint is regenerated from float.safetensors exactly as the generator made
it (it must still equal DIR/model.safetensors when that file exists), then:

  config: our quantization_config is parsed by the library (CT QuantizationConfig /
      transformers BitsAndBytesConfig) and must equal the library's own after that round trip
      (CT's "version" string is reported, not compared).
  (a) our key set equals the library's key set for this model;
  (b) every tensor has the library's dtype and shape; plain tensors (biases, norms, skipped
      Linears) equal float.safetensors bit for bit; with --require-identical-tensors every
      tensor must equal the library's bit for bit;
  (c) our file is loaded by every library loading path and dequantized by the library:
        compressed-tensors: CT's model lifecycle (apply_quantization_config, compress_model on a
          meta model, load_state_dict(strict=True, assign=True), decompress_model); CT's
          model-free CompressedTensorsDequantizer.validate; transformers from_pretrained
          (dequantize=False, then decompress_model) and from_pretrained(dequantize=True);
        bitsandbytes: Linear8bitLt.load_state_dict(strict=True) + int8_vectorwise_dequant;
          transformers from_pretrained (Bnb8bitDeserialize) + dequantize_bnb_weight;
      loading must report no missing/unexpected keys, every path must give the same tensors, and
      with --expect-dequantized they must equal that file bit for bit (dtype, shape, bytes).
      The expected file holds either exactly `<module>.weight` for the quantized modules, or a
      whole plain checkpoint (the float model's key set; other tensors compared with
      float.safetensors).  The library's output dtype is the model dtype for CT and float32 for
      bitsandbytes; --cast-library-output casts it to the expected file's dtype first (what
      transformers' dequantize(dtype=...) does) instead of reporting a dtype mismatch.

Prints one MISMATCH line per difference and a final OK/FAIL line.
Exit status: 0 all checks passed, 1 any mismatch, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import int8_models as im  # noqa: E402

import torch  # noqa: E402


class Checker:
    def __init__(self):
        self.errors: list[str] = []

    def error(self, msg: str) -> None:
        self.errors.append(msg)
        print(f"MISMATCH: {msg}", file=sys.stderr)

    def key_sets(self, what: str, ours, theirs) -> bool:
        ours, theirs = set(ours), set(theirs)
        if ours == theirs:
            return True
        self.error(f"{what}: key sets differ; missing from ours: {sorted(theirs - ours)}; "
                   f"unexpected in ours: {sorted(ours - theirs)}")
        return False

    def tensors(self, what: str, ours: dict, theirs: dict) -> None:
        for k in sorted(theirs):
            if k in ours:
                d = im.same_tensor(ours[k], theirs[k])
                if d:
                    self.error(f"{what}: {k}: {d}")


def info(msg: str) -> None:
    print(f"info: {msg}")


def canonical_config(library: str, qc: dict) -> dict:
    """The library's own parse -> serialize round trip of a quantization_config."""
    if library == im.CT:
        d = im.ct_parse_config(qc).model_dump()
        d = json.loads(json.dumps(d, default=str))
        return d
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig.from_dict(dict(qc)).to_dict()


def library_reference(case: dict, float_sd: dict, out_dir: str) -> None:
    if case["library"] == im.CT:
        im.ct_quantize_to_dir(case, float_sd, out_dir)
    else:
        im.bnb_quantize_to_dir(case, float_sd, out_dir)


def run_paths(chk: Checker, case: dict, ours_sd: dict, qc: dict, staged: str) -> dict:
    """{path name: dequantized dict} for every path that ran; failures are reported."""
    dtype = im.DTYPES[case["dtype"]]
    qnames = {f"{n}.weight" for n in im.quantized_module_names(case)}
    results = {}

    def attempt(name, fn):
        try:
            with im.quiet_stderr():
                return fn()
        except Exception as e:  # noqa: BLE001
            chk.error(f"{name}: raised {type(e).__name__}: {e}")
            if os.environ.get("CHECK_INT8_TRACEBACK"):
                traceback.print_exc()
            return None

    if case["library"] == im.CT:
        r = attempt("CT model load (apply_quantization_config/compress_model/load_state_dict strict/decompress_model)",
                    lambda: im.ct_load_model_path(case, ours_sd, qc))
        if r is not None:
            out, err = r
            if err:
                chk.error(f"CT model load: {err}")
            else:
                results["ct_model_decompress"] = out
        r = attempt("CT model-free CompressedTensorsDequantizer.validate",
                    lambda: im.ct_model_free_path(staged, ours_sd, dtype))
        if r is not None:
            extra = sorted(k for k in r if k not in qnames and k not in ours_sd)
            if extra:
                chk.error(f"CT model-free dequantizer produced unexpected tensors {extra}")
            results["ct_model_free_dequantizer"] = {k: v for k, v in r.items() if k in qnames}
        for name, fn in (("transformers_from_pretrained", im.ct_transformers_path),
                         ("transformers_from_pretrained_dequantize", im.ct_transformers_dequantize_path)):
            r = attempt(name, lambda fn=fn: fn(case, staged))
            if r is not None:
                out, problems = r
                for p in problems:
                    chk.error(f"{name}: {p}")
                results[name] = out
    else:
        r = attempt("bnb Linear8bitLt load_state_dict(strict=True)", lambda: im.bnb_native_path(case, ours_sd))
        if r is not None:
            out, err = r
            if err:
                chk.error(f"bnb Linear8bitLt load_state_dict: {err}")
            else:
                results["bnb_linear8bitlt_load_state_dict"] = out
        r = attempt("transformers_from_pretrained", lambda: im.bnb_transformers_path(case, staged))
        if r is not None:
            out, problems = r
            for p in problems:
                chk.error(f"transformers_from_pretrained: {p}")
            results["transformers_from_pretrained"] = out
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description="Check a ckptkit int8 checkpoint with compressed-tensors / bitsandbytes.")
    ap.add_argument("--case-dir", required=True)
    ap.add_argument("--ours", required=True, help="our safetensors file")
    ap.add_argument("--config", help="our config.json (its quantization_config is used); default: <case-dir>/config.json")
    ap.add_argument("--expect-dequantized", help="our own dequantization, compared bit for bit with the library's")
    ap.add_argument("--require-identical-tensors", action="store_true",
                    help="every tensor of --ours must equal the library's own bit for bit")
    ap.add_argument("--cast-library-output", action="store_true",
                    help="cast the library's dequantized tensors to the expected file's dtype before comparing")
    args = ap.parse_args()

    config_path = args.config or os.path.join(args.case_dir, "config.json")
    for p in (os.path.join(args.case_dir, "case.json"), os.path.join(args.case_dir, "float.safetensors"),
              args.ours, config_path, args.expect_dequantized):
        if p is not None and not os.path.isfile(p):
            print(f"usage error: {p} not found", file=sys.stderr)
            return 2

    im.quiet_libraries()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    case = im.load_case(args.case_dir)
    if case.get("library") not in (im.CT, im.BNB):
        print(f"usage error: case.json library {case.get('library')!r} is not {im.CT!r} or {im.BNB!r}", file=sys.stderr)
        return 2
    name = case.get("name", args.case_dir)
    chk = Checker()
    float_sd = im.load_tensors(os.path.join(args.case_dir, "float.safetensors"))
    qnames = {f"{n}.weight" for n in im.quantized_module_names(case)}

    # the library's own checkpoint for this model
    with tempfile.TemporaryDirectory() as refdir:
        with im.quiet_stderr():
            library_reference(case, float_sd, refdir)
        ref_sd = im.load_tensors(os.path.join(refdir, "model.safetensors"))
        with open(os.path.join(refdir, "config.json")) as f:
            ref_config = json.load(f)
    fixture_model = os.path.join(args.case_dir, "model.safetensors")
    if os.path.isfile(fixture_model):
        fixture_sd = im.load_tensors(fixture_model)
        if set(fixture_sd) != set(ref_sd) or any(im.same_tensor(fixture_sd[k], ref_sd[k]) for k in ref_sd):
            chk.error(f"environment: the library no longer reproduces {fixture_model} from float.safetensors")

    # our files
    try:
        ours_sd = im.load_tensors(args.ours)
    except Exception as e:  # noqa: BLE001
        chk.error(f"ours: safetensors cannot load {args.ours}: {type(e).__name__}: {e}")
        print(f"FAIL: {name}: {len(chk.errors)} mismatch(es)", file=sys.stderr)
        return 1
    try:
        with open(config_path) as f:
            ours_config = json.load(f)
        qc = ours_config["quantization_config"]
    except Exception as e:  # noqa: BLE001
        chk.error(f"config: {config_path} has no readable quantization_config: {type(e).__name__}: {e}")
        print(f"FAIL: {name}: {len(chk.errors)} mismatch(es)", file=sys.stderr)
        return 1

    # config
    want_method = "compressed-tensors" if case["library"] == im.CT else "bitsandbytes"
    if qc.get("quant_method") != want_method:
        chk.error(f"config: quant_method {qc.get('quant_method')!r} != {want_method!r}")
    try:
        ours_canon = canonical_config(case["library"], qc)
        ref_canon = canonical_config(case["library"], ref_config["quantization_config"])
        if case["library"] == im.CT:
            info(f"config version: ours {qc.get('version')!r}, library {ref_config['quantization_config'].get('version')!r}")
        if ours_canon != ref_canon:
            keys = sorted(k for k in set(ours_canon) | set(ref_canon) if ours_canon.get(k) != ref_canon.get(k))
            for k in keys:
                chk.error(f"config: quantization_config[{k!r}]: ours {json.dumps(ours_canon.get(k))} != "
                          f"library {json.dumps(ref_canon.get(k))}")
    except Exception as e:  # noqa: BLE001
        chk.error(f"config: the library rejects our quantization_config: {type(e).__name__}: {e}")

    # (a) key set, (b) dtypes/shapes, plain tensors
    chk.key_sets("(a) keys (ours vs the library's own file)", ours_sd, ref_sd)
    for k in sorted(set(ours_sd) & set(ref_sd)):
        a, b = ours_sd[k], ref_sd[k]
        if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
            chk.error(f"(b) {k}: ours {im.dtype_name(a)} {list(a.shape)} != library {im.dtype_name(b)} {list(b.shape)}")
    plain = {k: float_sd[k] for k in float_sd if k not in qnames}
    chk.tensors("(b) plain tensor vs float.safetensors", ours_sd, plain)
    differing = sorted(k for k in set(ours_sd) & set(ref_sd) if im.same_tensor(ours_sd[k], ref_sd[k]))
    info(f"tensors differing from the library's own bytes: {differing if differing else 'none'}")
    if args.require_identical_tensors:
        for k in differing:
            chk.error(f"(b) {k}: {im.same_tensor(ours_sd[k], ref_sd[k])} (--require-identical-tensors)")

    # (c) load + dequantize with the library
    staged_config = im.float_config_dict(case)
    staged_config["quantization_config"] = qc
    with im.staged_dir(staged_config, args.ours) as staged:
        results = run_paths(chk, case, ours_sd, qc, staged)
    lib_deq = None
    for path, out in results.items():
        if chk.key_sets(f"(c) {path}: dequantized modules", out, qnames):
            if lib_deq is None:
                lib_deq, first = out, path
            else:
                chk.tensors(f"(c) {path} vs {first}", out, lib_deq)
    if lib_deq is not None:
        info(f"library paths run: {sorted(results)}; dequantized dtype {im.dtype_name(next(iter(lib_deq.values())))}")
        own = os.path.join(args.case_dir, "dequantized.safetensors")
        if os.path.isfile(own):
            own_sd = im.load_tensors(own)
            same = set(own_sd) == set(lib_deq) and not any(im.same_tensor(lib_deq[k], own_sd[k]) for k in own_sd)
            info(f"library dequantization of ours equals its dequantization of its own file: {same}")
    elif not results:
        chk.error("(c) no library loading path succeeded")

    if args.expect_dequantized and lib_deq is not None:
        try:
            exp = im.load_tensors(args.expect_dequantized)
        except Exception as e:  # noqa: BLE001
            chk.error(f"(c) cannot load --expect-dequantized: {type(e).__name__}: {e}")
            exp = None
        if exp is not None:
            if set(exp) == qnames:
                mode = "quantized weights only"
            elif set(exp) == set(float_sd):
                mode = "whole plain checkpoint"
                chk.tensors("(c) expected plain tensor vs float.safetensors", exp, plain)
            else:
                mode = "unrecognised key set"
                chk.key_sets("(c) --expect-dequantized keys (quantized <m>.weight or the float model's keys)",
                             exp, qnames)
            info(f"--expect-dequantized: {mode}")
            lib_cmp = {}
            for k, v in lib_deq.items():
                if k in exp and exp[k].dtype != v.dtype and args.cast_library_output:
                    info(f"{k}: library output cast {im.dtype_name(v)} -> {im.dtype_name(exp[k])}")
                    v = v.to(exp[k].dtype)
                lib_cmp[k] = v
            chk.tensors("(c) ours (expected) vs library dequantization", {k: exp[k] for k in qnames if k in exp},
                        lib_cmp)

    if chk.errors:
        print(f"FAIL: {name}: {len(chk.errors)} mismatch(es)", file=sys.stderr)
        return 1
    done = ["config", "keys", "dtypes/shapes", f"library load+dequantize ({len(results)} paths agree)"]
    if args.expect_dequantized:
        done.append("dequantized bit for bit")
    if args.require_identical_tensors:
        done.append("tensors identical to the library's")
    print(f"OK: {name}: {', '.join(done)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Check ckptkit-written compressed-tensors FP8 files against a fixture case (compressed-tensors 0.20.0).

    target/interop-venv/bin/python tests/interop/ctfp8/check_ctfp8.py --case CASE_DIR \\
        [--ours OURS.safetensors] [--ours-plain PLAIN.safetensors] [--config CONFIG.json] [--no-loader]

(at least one of --ours / --ours-plain)

CASE_DIR is a case directory written by gen_ctfp8_fixtures.py (case.json, float.safetensors,
model.safetensors, config.json, dequantized.safetensors).  OURS is what ckptkit wrote from the case's
float.safetensors with `migrate convert float.safetensors OURS --to TARGET --exclude lin_skip`, TARGET =
case.json's `ckptkit_target`; PLAIN is ckptkit's `migrate convert model.safetensors PLAIN --to plain`
(the case's config.json beside model.safetensors).

  environment: compressed-tensors, run again on float.safetensors, must still give model.safetensors
      (otherwise the installed library is not the one the fixture was made with);
  config: when --config is given, or a config.json lies beside OURS (a directory output), its
      quantization_config must equal the case's config.json's key for key ("version" and
      "global_compression_ratio" are not compared) and compressed-tensors must parse it
      (QuantizationConfig.model_validate); the differing keys are listed;
  (a) OURS holds exactly model.safetensors' tensors: the same key set (`__metadata__` is ignored) and every
      tensor equal in dtype, shape and bytes;
  (b) compressed-tensors' own decompression of OURS equals dequantized.safetensors bit for bit: CT's
      model lifecycle (apply_quantization_config, ModelCompressor.compress_model on a meta model,
      load_state_dict(strict=True, assign=True), ModelCompressor.decompress_model), and the other paths
      the generator found working for this case (CT's model-free CompressedTensorsDequantizer, transformers
      from_pretrained with and without dequantize=True), on a staged directory (the case's float config +
      OUR quantization_config if we wrote one, else the case's).  With a config.json beside OURS, the
      transformers paths also load that directory itself (the loader check; --no-loader skips it);
  (c) PLAIN equals dequantized.safetensors tensor for tensor: the float model's key set (scales gone);
      quantized `<m>.weight` equal to dequantized.safetensors, every other tensor to float.safetensors,
      in dtype, shape and bytes.

Prints one MISMATCH line per failure and a final OK/FAIL line.
Exit status: 0 all checks passed, 1 any mismatch, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ctfp8_models as cm  # noqa: E402

import torch  # noqa: E402

IGNORED_CONFIG_KEYS = ("version", "global_compression_ratio")


class Checker:
    def __init__(self):
        self.errors: list[str] = []

    def error(self, msg: str) -> None:
        self.errors.append(msg)
        print(f"MISMATCH: {msg}", file=sys.stderr)

    def key_sets(self, tag: str, ours: dict, ref: dict, ref_name: str) -> None:
        missing, extra = sorted(set(ref) - set(ours)), sorted(set(ours) - set(ref))
        if missing or extra:
            self.error(f"{tag}: key set differs from {ref_name}; missing from ours: {missing}; "
                       f"unexpected in ours: {extra}")

    def tensors(self, tag: str, ours: dict, ref: dict, ref_name: str) -> None:
        for k in sorted(set(ours) & set(ref)):
            a, b = ours[k], ref[k]
            if a.dtype != b.dtype:
                self.error(f"{tag}: {k}: dtype ours {cm.dtype_name(a)} != {ref_name} {cm.dtype_name(b)}")
            elif tuple(a.shape) != tuple(b.shape):
                self.error(f"{tag}: {k}: shape ours {list(a.shape)} != {ref_name} {list(b.shape)}")
            else:
                d = cm.same_tensor(a, b)
                if d:
                    self.error(f"{tag}: {k}: bytes differ from {ref_name}: {d}")


def info(msg: str) -> None:
    print(f"info: {msg}")


def load(chk: Checker, what: str, path: str):
    try:
        return cm.load_tensors(path)
    except Exception as e:  # noqa: BLE001
        chk.error(f"{what}: safetensors cannot load {path}: {type(e).__name__}: {e}")
        return None


def dict_diff(a, b, path=""):
    """Dotted paths where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}" if path else k
            if k not in a:
                out.append((p, "<absent>", b[k]))
            elif k not in b:
                out.append((p, a[k], "<absent>"))
            else:
                out.extend(dict_diff(a[k], b[k], p))
        return out
    return [] if a == b else [(path, a, b)]


def check_config(chk: Checker, path: str, case_qc: dict):
    """Returns our quantization_config (or None if unusable)."""
    try:
        with open(path) as f:
            qc = json.load(f)["quantization_config"]
        if not isinstance(qc, dict):
            raise TypeError(f"quantization_config is {type(qc).__name__}")
    except Exception as e:  # noqa: BLE001
        chk.error(f"config: {path} has no readable quantization_config: {type(e).__name__}: {e}")
        return None
    ours = {k: v for k, v in qc.items() if k not in IGNORED_CONFIG_KEYS}
    ref = {k: v for k, v in case_qc.items() if k not in IGNORED_CONFIG_KEYS}
    for p, a, b in dict_diff(ours, ref):
        chk.error(f"config: quantization_config.{p}: ours {json.dumps(a)} != CT's {json.dumps(b)}")
    info(f"config: version ours {qc.get('version')!r}, CT's {case_qc.get('version')!r}; "
         f"global_compression_ratio ours {qc.get('global_compression_ratio')!r} (not compared)")
    try:
        from compressed_tensors.quantization import QuantizationConfig

        parsed = QuantizationConfig.model_validate(qc)
    except Exception as e:  # noqa: BLE001
        chk.error(f"config: compressed-tensors rejects our quantization_config: {type(e).__name__}: {e}")
        return None
    if parsed.format != case_qc.get("format"):
        chk.error(f"config: compressed-tensors reads format {parsed.format!r}, the case has {case_qc.get('format')!r}")
    return qc


def check_environment(chk: Checker, case: dict, float_sd: dict, lib_sd: dict) -> None:
    with tempfile.TemporaryDirectory() as d:
        try:
            with cm.quiet_stderr():
                cm.ct_quantize_to_dir(case, float_sd, d)
            again = cm.load_tensors(os.path.join(d, "model.safetensors"))
        except Exception as e:  # noqa: BLE001
            chk.error(f"environment: compressed-tensors cannot quantize float.safetensors: {type(e).__name__}: {e}")
            return
    if set(again) != set(lib_sd) or any(cm.same_tensor(again[k], lib_sd[k]) for k in lib_sd):
        chk.error("environment: compressed-tensors no longer reproduces model.safetensors from float.safetensors")


def run_paths(chk: Checker, case: dict, tag: str, sd: dict, qc: dict, model_dir: str, deq_sd: dict, only) -> list:
    qkeys = set(cm.quantized_weight_keys(case))
    ran = []
    for p, (res, probs) in cm.ct_paths(case, sd, qc, model_dir, only=only).items():
        for pr in probs:
            chk.error(f"{tag} {p}: {pr}")
        if res is None:
            continue
        chk.key_sets(f"{tag} {p}: dequantized modules", res, qkeys, "the quantized modules")
        chk.tensors(f"{tag} {p}: CT's decompression of ours vs dequantized.safetensors", res, deq_sd,
                    "dequantized.safetensors")
        ran.append(p)
    return ran


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Check ckptkit compressed-tensors FP8 files against a CT case.")
    ap.add_argument("--case", required=True, help="fixture case directory")
    ap.add_argument("--ours", help="ckptkit's --to <ckptkit_target> --exclude lin_skip output of float.safetensors")
    ap.add_argument("--ours-plain", help="ckptkit's --to plain output of model.safetensors")
    ap.add_argument("--config", help="our config.json (default: config.json beside --ours, if there is one)")
    ap.add_argument("--no-loader", action="store_true",
                    help="do not load the directory holding --ours with transformers from_pretrained")
    args = ap.parse_args(argv)
    if not args.ours and not args.ours_plain:
        print("usage error: give --ours, --ours-plain or both", file=sys.stderr)
        return 2
    files = {fn: os.path.join(args.case, fn) for fn in
             ("case.json", "float.safetensors", "model.safetensors", "config.json", "dequantized.safetensors")}
    for p in list(files.values()) + [args.ours, args.ours_plain, args.config]:
        if p is not None and not os.path.isfile(p):
            print(f"usage error: {p} not found", file=sys.stderr)
            return 2
    case = cm.load_case(args.case)
    if case.get("library") != "compressed-tensors" or case.get("dtype") not in cm.DTYPES or "ckptkit_target" not in case:
        print(f"usage error: {files['case.json']} is not a compressed-tensors FP8 case", file=sys.stderr)
        return 2
    config_path = args.config
    if config_path is None and args.ours:
        beside = os.path.join(os.path.dirname(os.path.abspath(args.ours)), "config.json")
        if os.path.isfile(beside):
            config_path = beside

    cm.quiet_libraries()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    name = case.get("name", args.case)
    chk = Checker()
    float_sd = cm.load_tensors(files["float.safetensors"])
    lib_sd = cm.load_tensors(files["model.safetensors"])
    deq_sd = cm.load_tensors(files["dequantized.safetensors"])
    with open(files["config.json"]) as f:
        case_config = json.load(f)
    case_qc = case_config["quantization_config"]
    qkeys = set(cm.quantized_weight_keys(case))
    done = []

    check_environment(chk, case, float_sd, lib_sd)

    ours_qc = None
    if args.ours and config_path:
        ours_qc = check_config(chk, config_path, case_qc)
        done.append(f"config ({config_path})")

    if args.ours:
        ours_sd = load(chk, "(a)", args.ours)
        if ours_sd is not None:
            # (a)
            chk.key_sets("(a) keys", ours_sd, lib_sd, "CT's model.safetensors")
            chk.tensors("(a)", ours_sd, lib_sd, "CT's model.safetensors")
            done.append("(a) tensors identical to CT's")
            # (b)
            qc = ours_qc if ours_qc is not None else case_qc
            only = set(case.get("loading_paths_checked") or ["ct_model_lifecycle"])
            staged_config = cm.float_config_dict(case)
            staged_config["quantization_config"] = qc
            with cm.staged_dir(staged_config, args.ours) as staged:
                ran = run_paths(chk, case, "(b)", ours_sd, qc, staged, deq_sd, only)
            if not ran:
                chk.error("(b) no compressed-tensors decompression path ran")
            done.append(f"(b) CT decompression ({len(ran)} paths)")
            if config_path and not args.no_loader and os.path.dirname(os.path.abspath(config_path)) == \
                    os.path.dirname(os.path.abspath(args.ours)):
                loader = {"transformers_from_pretrained", "transformers_from_pretrained_dequantize"} & only
                d = os.path.dirname(os.path.abspath(args.ours))
                ran = run_paths(chk, case, "(b) loader", ours_sd, qc, d, deq_sd, loader)
                if loader and not ran:
                    chk.error("(b) loader: transformers could not load our directory")
                done.append(f"(b) transformers from_pretrained of our directory ({len(ran)} paths)")

    if args.ours_plain:
        plain_sd = load(chk, "(c)", args.ours_plain)
        if plain_sd is not None:
            want = {k: (deq_sd[k] if k in qkeys else float_sd[k]) for k in float_sd}
            chk.key_sets("(c) keys", plain_sd, want, "the float model (dequantized.safetensors + plain tensors)")
            chk.tensors("(c) plain", {k: v for k, v in plain_sd.items() if k in qkeys},
                        {k: want[k] for k in qkeys}, "dequantized.safetensors")
            chk.tensors("(c) plain", {k: v for k, v in plain_sd.items() if k not in qkeys},
                        {k: v for k, v in want.items() if k not in qkeys}, "float.safetensors")
            done.append("(c) plain equals CT's dequantization")

    if chk.errors:
        print(f"FAIL: {name}: {len(chk.errors)} mismatch(es)", file=sys.stderr)
        return 1
    print(f"OK: {name}: {', '.join(done)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Loader check: transformers 5.24.0 loads ckptkit's block FP8 model directory (`--to fp8:block`).

    target/interop-venv/bin/python tests/interop/fp8block/check_loader.py --migrate MIGRATE [--seed N] [--work DIR]
    target/interop-venv/bin/python tests/interop/fp8block/check_loader.py --self-test [--seed N] [--work DIR]

1. A tiny LlamaForCausalLM (hidden 256, intermediate 512, 4 heads, 2 kv heads, 1 layer, vocab 128, bf16; every
   Linear 128-aligned) is built from the seed and written with `save_pretrained` (safetensors) into WORK/src.
2. `MIGRATE -q convert WORK/src WORK/out --to fp8:block --exclude model.embed_tokens --exclude lm_head`
   (directory in, directory out: ckptkit copies the side files and rewrites config.json's quantization_config).
   With --self-test the directory is written by transformers' own code instead: `Fp8Quantize._quantize_one`
   for every Linear of the decoder layer, config.json by `LlamaConfig.save_pretrained` with
   `quantization_config = FineGrainedFP8Config(weight_block_size=[128, 128],
   modules_to_not_convert=["model.embed_tokens", "lm_head"])`; that checks this script's transformers side.
3. On disk: config.json carries `quantization_config` with quant_method "fp8" and weight_block_size [128, 128]
   (scale_fmt "float" or absent); every quantized Linear has `{m}.weight` F8_E4M3 + `{m}.weight_scale_inv` F32
   equal bit for bit to `_quantize_one(original)`; every other tensor equals the original.
4. `AutoModelForCausalLM.from_pretrained(WORK/out)` on CPU (transformers then forces dequantize=True): every
   quantized Linear's loaded weight equals `_dequantize_one(_quantize_one(original), output_dtype=bf16)` bit
   for bit, every other tensor equals the original, no scale is left; and the logits for a fixed input equal,
   bit for bit, those of the plain model made of those weights (WORK/src's files with the expected weights,
   loaded by the same from_pretrained).

Prints one MISMATCH line per failure and a final OK/FAIL line.  Exit 0 pass, 1 mismatch, 2 usage error
(or ckptkit refused / failed).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp8block_models as fm  # noqa: E402

import torch  # noqa: E402

DEFAULT_SEED = 20261202
EXCLUDE = ["model.embed_tokens", "lm_head"]
D = torch.bfloat16


class Checker:
    def __init__(self):
        self.errors: list[str] = []

    def error(self, msg: str) -> None:
        self.errors.append(msg)
        print(f"MISMATCH: {msg}", file=sys.stderr)


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=1, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
                       dtype=D)


def build_model(seed: int):
    """The tiny Llama: transformers' own init from the seed, then each Linear weight scaled per 128x128 block by
    2^U(-4, 4) and the norms set to 1 + 0.1 randn, so the blocks get different scales."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config()).to(D).eval()
    g = torch.Generator().manual_seed(fm.case_seed(seed, "check_loader"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and name.startswith("model.layers."):
                gn, gk = fm.grid(p.shape)
                f = torch.exp2(-4 + 8 * torch.rand(gn, gk, generator=g))
                f = f.repeat_interleave(fm.BLOCK, 0)[: p.shape[0]].repeat_interleave(fm.BLOCK, 1)[:, : p.shape[1]]
                p.copy_((p.float() * f).to(D))
            elif p.dim() == 1:
                p.copy_((1 + 0.1 * torch.randn(p.shape, generator=g)).to(D))
    return model


def quantized_names(sd: dict) -> list:
    """The Linears ckptkit quantizes: every 2-D `.weight` except the excluded embedding and lm_head."""
    return sorted(k[: -len(".weight")] for k, v in sd.items()
                  if k.endswith(".weight") and v.dim() == 2 and k[: -len(".weight")] not in EXCLUDE)


def write_self_test(src: str, out: str, original: dict) -> None:
    """The quantized directory as transformers' own code writes it (stands in for ckptkit)."""
    from transformers import LlamaConfig

    os.makedirs(out)
    for f in os.listdir(src):
        if f not in ("model.safetensors", "config.json"):
            shutil.copy2(os.path.join(src, f), os.path.join(out, f))
    qn = set(quantized_names(original))
    sd = {}
    for k, v in original.items():
        m = k[: -len(".weight")] if k.endswith(".weight") else None
        if m in qn:
            q, s = fm.library_quantize(v, "float", k)
            sd[k], sd[f"{m}.weight_scale_inv"] = q, s
        else:
            sd[k] = v
    fm.save_file(sd, os.path.join(out, "model.safetensors"))
    cfg = LlamaConfig.from_pretrained(src)
    cfg.quantization_config = fm.fp8_config("float", list(EXCLUDE))
    cfg.save_pretrained(out)


def load_dir_tensors(d: str) -> dict:
    sd = {}
    for p in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        for k, v in fm.load_tensors(p).items():
            if k in sd:
                raise RuntimeError(f"{k} is in more than one file of {d}")
            sd[k] = v
    return sd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="transformers loads ckptkit's --to fp8:block model directory")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--migrate", help="the ckptkit migrate binary")
    g.add_argument("--self-test", action="store_true", help="write the quantized directory with transformers' code")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--work", help="work directory (default: a temporary one, removed afterwards)")
    args = ap.parse_args(argv)
    if args.migrate and not os.access(args.migrate, os.X_OK):
        print(f"usage error: {args.migrate} is not an executable", file=sys.stderr)
        return 2
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()   # the "no GPU: dequantizing" warning is expected
    tmp = None
    if args.work:
        work = args.work
        os.makedirs(work, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory()
        work = tmp.name
    src, out = os.path.join(work, "src"), os.path.join(work, "out")
    for d in (src, out):
        if os.path.exists(d):
            shutil.rmtree(d)
    chk = Checker()
    label = "self-test (transformers' quantizer)" if args.self_test else "ckptkit --to fp8:block"

    # 1. the model
    model = build_model(args.seed)
    model.save_pretrained(src)
    original = fm.load_tensors(os.path.join(src, "model.safetensors"))
    qn = quantized_names(original)

    # 2. the quantized directory
    if args.self_test:
        write_self_test(src, out, original)
    else:
        cmd = [args.migrate, "-q", "convert", src, out, "--to", "fp8:block"]
        for x in EXCLUDE:
            cmd += ["--exclude", x]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"FAIL: {' '.join(cmd)} exited {r.returncode}:\n{r.stdout}{r.stderr}", file=sys.stderr)
            return 2
    if not os.path.isdir(out) or not os.path.isfile(os.path.join(out, "config.json")):
        print(f"FAIL: {out} is not a model directory with a config.json", file=sys.stderr)
        return 1

    # 3. on disk
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    qc = cfg.get("quantization_config")
    print(f"{label}: config.json quantization_config = {json.dumps(qc, sort_keys=True)}")
    if not isinstance(qc, dict) or qc.get("quant_method") != "fp8" or qc.get("weight_block_size") != [128, 128] \
            or qc.get("scale_fmt", "float") != "float":
        chk.error(f"config.json: quantization_config {qc!r} is not fp8 with weight_block_size [128, 128] and "
                  "scale_fmt float")
    disk = load_dir_tensors(out)
    want_disk, expected = {}, {}
    for k, v in original.items():
        m = k[: -len(".weight")] if k.endswith(".weight") else None
        if m in qn:
            q, s = fm.library_quantize(v, "float", k)
            want_disk[k], want_disk[f"{m}.weight_scale_inv"] = q, s
            expected[k] = fm.library_dequantize(q, s, D)
        else:
            want_disk[k] = v
            expected[k] = v
    missing, extra = sorted(set(want_disk) - set(disk)), sorted(set(disk) - set(want_disk))
    if missing or extra:
        chk.error(f"on disk: key sets differ from transformers' quantization; missing: {missing}; unexpected: {extra}")
    for k in sorted(want_disk):
        if k in disk:
            d = fm.describe_diff(disk[k], want_disk[k], "ours", "transformers")
            if d:
                chk.error(f"on disk {k}: {d}")

    # 4. transformers loads it
    try:
        loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    except Exception as e:  # noqa: BLE001
        chk.error(f"from_pretrained({out}) failed: {type(e).__name__}: {e}")
        loaded = None
    if loaded is not None:
        kinds = sorted({type(loaded.get_submodule(m)).__name__ for m in qn})
        print(f"{label}: loaded {type(loaded).__name__} {fm.dtype_name(next(loaded.parameters()))}, quantized "
              f"Linears loaded as {kinds}, config.quantization_config after loading: "
              f"{getattr(loaded.config, 'quantization_config', None)!r}")
        lsd = {k: v.detach() for k, v in loaded.state_dict().items()}
        missing, extra = sorted(set(expected) - set(lsd)), sorted(set(lsd) - set(expected))
        if missing or extra:
            chk.error(f"loaded: state dict keys differ; missing: {missing}; unexpected: {extra}")
        for k in sorted(expected):
            if k in lsd:
                what = "_dequantize_one(_quantize_one(original))" if k[: -len(".weight")] in qn else "original"
                d = fm.describe_diff(lsd[k].contiguous(), expected[k], "loaded", what)
                if d:
                    chk.error(f"loaded {k} vs {what}: {d}")
        # logits against the plain model made of the same weights: WORK/ref = the src directory with the
        # expected weights, loaded by the same from_pretrained (a model built directly and cast with .to(bf16)
        # would differ: that casts the rotary inv_freq buffer to bf16, from_pretrained keeps it f32)
        refdir = os.path.join(work, "ref")
        if os.path.exists(refdir):
            shutil.rmtree(refdir)
        shutil.copytree(src, refdir)
        fm.save_file(expected, os.path.join(refdir, "model.safetensors"))
        ref = AutoModelForCausalLM.from_pretrained(refdir, device_map="cpu").eval()
        orig = AutoModelForCausalLM.from_pretrained(src, device_map="cpu").eval()
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            a = loaded(input_ids=ids).logits
            b = ref(input_ids=ids).logits
            c = orig(input_ids=ids).logits
        d = fm.describe_diff(a, b, "loaded", "reference")
        if d:
            chk.error(f"logits: {d}")
        print(f"{label}: logits {list(a.shape)} {fm.dtype_name(a)}; max |loaded - unquantized original| = "
              f"{(a.float() - c.float()).abs().max().item():.4g} (information only)")

    if tmp is not None:
        tmp.cleanup()
    if chk.errors:
        print(f"FAIL: loader check ({label}): {len(chk.errors)} mismatch(es)", file=sys.stderr)
        return 1
    print(f"OK: loader check ({label}): {len(qn)} quantized Linears, {len(original) - len(qn)} other tensors, "
          "logits equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())

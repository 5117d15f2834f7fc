"""The Python path that `migrate` is compared with (run inside the bench venv).

    py_quanto.py dequant IN.safetensors OUT.safetensors
        load IN with safetensors, build the model on the meta device, optimum-quanto
        `requantize` it with the quanto_qmap.json beside IN, `dequantize()` every weight,
        `save_file` the plain state dict.
    py_quanto.py quant IN.safetensors OUT_DIR/model.safetensors [QTYPE]
        load IN, build the model on the meta device, `load_state_dict(assign=True)`,
        `quantize(weights=QTYPE)` + `freeze`, `save_file` the state dict and write
        quanto_qmap.json beside the output.

The model is the one the synthetic checkpoints describe: every `<module>.weight` of rank 2
becomes an nn.Linear named `<module>` (e.g. 64 x Linear(4096, 4096) named blocks.i.proj).
"""

import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def linear_shapes(path, quantized):
    """{module: (out, in, has_bias)} from the header, without reading data."""
    shapes = {}
    keys = set()
    with safe_open(path, "pt") as f:
        for k in f.keys():
            keys.add(k)
            suffix = ".weight._data" if quantized else ".weight"
            if k.endswith(suffix):
                s = f.get_slice(k).get_shape()
                if len(s) == 2:
                    shapes[k[: -len(suffix)]] = (s[0], s[1])
    return {m: (o, i, f"{m}.bias" in keys) for m, (o, i) in shapes.items()}


def build(shapes, dtype):
    root = torch.nn.Module()
    for name, (o, i, bias) in shapes.items():
        parent = root
        parts = name.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, torch.nn.Module())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], torch.nn.Linear(i, o, bias=bias, dtype=dtype))
    return root


def dequantized_state(src):
    """The plain state dict of a quanto checkpoint: `load_file`, the model on the meta device,
    `requantize` with the quanto_qmap.json beside `src`, `dequantize()` every weight."""
    from optimum.quanto import requantize
    from optimum.quanto.nn import QModuleMixin

    with open(os.path.join(os.path.dirname(os.path.abspath(src)), "quanto_qmap.json")) as f:
        qmap = json.load(f)
    state_dict = load_file(src)
    shapes = linear_shapes(src, quantized=True)
    dtype = next(v.dtype for k, v in state_dict.items() if k.endswith("weight._scale"))
    with torch.device("meta"):
        model = build(shapes, dtype)
    requantize(model, state_dict, qmap, device=torch.device("cpu"))
    del state_dict
    out = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, QModuleMixin) and m.weight_qtype is not None:
                out[f"{name}.weight"] = m.weight.dequantize().contiguous()
                if m.bias is not None:
                    out[f"{name}.bias"] = m.bias.detach().contiguous()
    return out


def dequant(src, dst):
    save_file(dequantized_state(src), dst, metadata={"format": "pt"})


def quant(src, dst, qtype_name):
    from optimum.quanto import freeze, qtypes, quantization_map, quantize

    state_dict = load_file(src)
    shapes = linear_shapes(src, quantized=False)
    dtype = next(iter(state_dict.values())).dtype
    with torch.device("meta"):
        model = build(shapes, dtype)
    model.load_state_dict(state_dict, assign=True)
    quantize(model, weights=qtypes[qtype_name])
    freeze(model)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    save_file(sd, dst, metadata={"format": "pt"})
    with open(os.path.join(os.path.dirname(os.path.abspath(dst)), "quanto_qmap.json"), "w") as f:
        json.dump(quantization_map(model), f, indent=4)


def main():
    torch.set_num_threads(os.cpu_count() or 1)
    if len(sys.argv) < 4 or sys.argv[1] not in ("dequant", "quant"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    if sys.argv[1] == "dequant":
        dequant(sys.argv[2], sys.argv[3])
    else:
        quant(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "qint8")


if __name__ == "__main__":
    main()

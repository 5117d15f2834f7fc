"""`ckptkit.load(..., like=model.state_dict())` against real compressed-tensors models.

Each compressed-tensors fixture (tests/fixtures/int8/ct-*, written by the real library) with
its model rebuilt by the generator's own code (tests/interop/int8/int8_models.py):
(a) the int8 checkpoint into the plain model, strict, every weight equal to CT's own
decompression; (b) the int8 checkpoint into the compressed model (the parameters CT's
`compress_model` creates, as transformers does when it loads such a checkpoint), strict,
every tensor equal to the file's, and after CT's `decompress_model` the forward equal to
that of the model CT itself quantized; (c) a plain checkpoint into the compressed model,
strict, every tensor byte-identical to what CT's `compress_model` made from those weights;
and the empty (meta) model transformers builds before loading works as a reference too.
Runs where torch and compressed-tensors are installed (CI: the live suites' venv).
"""

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")

import ckptkit  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "interop" / "int8"))
import int8_models as im  # noqa: E402

INT8 = ROOT / "tests" / "fixtures" / "int8"
CASES = sorted(p.parent for p in INT8.glob("ct-*/model.safetensors"))


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def compressed_model(case, float_sd):
    """The float model quantized and compressed by CT (its state dict is what CT saves),
    with CT's compressor."""
    m = im.build_model(case)
    m.load_state_dict(float_sd, strict=True)
    return m, im.ct_quantize_and_compress(m, case)


def empty_compressed_model(case, case_dir):
    """What transformers builds before loading a CT checkpoint: a meta model with the
    checkpoint's quantization config applied and the compressed parameters created."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    qconfig = im.ct_parse_config(json.loads((case_dir / "config.json").read_text())["quantization_config"])
    m = im.build_model(case, device="meta")
    apply_quantization_config(m, qconfig, show_progress=False)
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(m)
    return m, compressor


def inputs(case):
    g = torch.Generator().manual_seed(11)
    dt = im.DTYPES[case["dtype"]]
    return {
        s["name"]: torch.randn(3, s["in_features"] if s["kind"] == "Linear" else s["normalized_shape"], generator=g).to(dt)
        for s in case["specs"]
    }


@pytest.mark.parametrize("case_dir", CASES, ids=lambda p: p.name)
def test_a_ct_checkpoint_into_the_plain_model(case_dir):
    case = im.load_case(str(case_dir))
    model = im.build_model(case)
    state = ckptkit.load(case_dir / "model.safetensors", like=model.state_dict())
    model.load_state_dict(state, strict=True)
    gold = im.load_tensors(str(case_dir / "dequantized.safetensors"))
    assert gold
    for k, t in gold.items():
        assert same(model.state_dict()[k], t), k


@pytest.mark.parametrize("case_dir", CASES, ids=lambda p: p.name)
def test_a_ct_checkpoint_into_the_compressed_model_and_its_forward(case_dir):
    case = im.load_case(str(case_dir))
    float_sd = im.load_tensors(str(case_dir / "float.safetensors"))
    theirs, theirs_compressor = compressed_model(case, float_sd)
    # a compressed model of other weights: the load must replace them
    target, compressor = compressed_model(case, {k: v * 2 for k, v in float_sd.items()})
    state = ckptkit.load(case_dir / "model.safetensors", like=target.state_dict())
    stored = im.load_tensors(str(case_dir / "model.safetensors"))
    assert sorted(state) == sorted(stored)
    for k, t in stored.items():
        assert same(state[k], t), k
    target.load_state_dict(state, strict=True)
    # both decompressed by CT itself, then run
    compressor.decompress_model(target)
    theirs_compressor.decompress_model(theirs)
    with torch.no_grad():
        ours_out, theirs_out = target(inputs(case)), theirs(inputs(case))
    for name, t in theirs_out.items():
        assert same(ours_out[name], t), name


@pytest.mark.parametrize("case_dir", CASES, ids=lambda p: p.name)
def test_a_plain_checkpoint_into_the_compressed_model(case_dir):
    case = im.load_case(str(case_dir))
    float_sd = im.load_tensors(str(case_dir / "float.safetensors"))
    theirs = compressed_model(case, float_sd)[0].state_dict()
    target, _ = compressed_model(case, {k: v * 2 for k, v in float_sd.items()})
    state = ckptkit.load(case_dir / "float.safetensors", like=target.state_dict())
    assert sorted(state) == sorted(theirs)
    for k, t in theirs.items():
        assert same(state[k], t), k
    target.load_state_dict(state, strict=True)


def test_the_meta_model_transformers_builds_reads_the_same():
    """transformers builds a CT model on the meta device before it loads a checkpoint
    (apply_quantization_config, compress_model, load_state_dict(assign=True)); CT keeps
    `weight_shape` on the CPU, so the layout reads from the empty model too, and what ckptkit
    loads into it decompresses to CT's own dequantization. A `weight_shape` without a value
    is refused, naming it."""
    case_dir = INT8 / "ct-bf16-pack-group32"
    case = im.load_case(str(case_dir))
    meta, compressor = empty_compressed_model(case, case_dir)
    state = ckptkit.load(case_dir / "float.safetensors", like=meta.state_dict())
    meta.load_state_dict(state, strict=True, assign=True)
    compressor.decompress_model(meta)
    gold = im.load_tensors(str(case_dir / "dequantized.safetensors"))
    for k, t in gold.items():
        assert same(meta.state_dict()[k], t), k
    described = dict(empty_compressed_model(case, case_dir)[0].state_dict())
    key = next(k for k in described if k.endswith(".weight_shape"))
    described[key] = torch.empty(2, dtype=torch.int64, device="meta")
    with pytest.raises(ckptkit.UsageError) as e:
        ckptkit.load(case_dir / "float.safetensors", like=described)
    assert e.value.tensor == key and "no value" in str(e.value)

"""`ckptkit.load`: a state dict converted in memory, against files optimum-quanto wrote."""

from pathlib import Path

import numpy as np
import pytest

import ckptkit
from conftest import raw_tensors

ROOT = Path(__file__).resolve().parents[2]
QUANTO = ROOT / "tests" / "fixtures" / "quanto"
CASES = sorted(p.parent for p in QUANTO.glob("*/quantized.safetensors"))


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_dequantized_in_memory_equals_quantos_dequantize(case):
    state = ckptkit.load(case / "quantized.safetensors", like="plain", framework="np", shapes_from=case / "float.safetensors")
    plain = raw_tensors(case / "float.safetensors")
    assert sorted(state) == sorted(plain), "a plain model's key set"
    gold = raw_tensors(case / "dequantized.safetensors")
    for k, (dtype, shape, data) in gold.items():
        assert list(state[k].shape) == shape, k
        assert state[k].tobytes() == data, k


@pytest.mark.parametrize("case", [c for c in CASES if c.name.endswith("qint8")], ids=lambda p: p.name)
def test_quantized_in_memory_equals_what_quanto_wrote(case):
    state = ckptkit.load(case / "float.safetensors", like=case / "quanto_qmap.json", framework="np")
    theirs = raw_tensors(case / "quantized.safetensors")
    for k, (dtype, shape, data) in theirs.items():
        if k.endswith(("._data", "._scale")):
            assert state[k].tobytes() == data, k


def test_load_refuses_what_it_cannot_match(tmp_path):
    q = QUANTO / "bf16-qint8" / "quantized.safetensors"
    with pytest.raises(ckptkit.UsageError):
        ckptkit.load(q, like="plain", like_qmap=QUANTO / "bf16-qint8" / "quanto_qmap.json")
    with pytest.raises(ckptkit.Error):
        ckptkit.load(q, like="quanto:qint9")
    with pytest.raises(ckptkit.UsageError):
        ckptkit.load(q, framework="jax")
    # keeping the layout is a load of what is stored
    kept = ckptkit.load(q, framework="np")
    assert kept["lin_g64.weight._data"].dtype == np.int8


INT8 = ROOT / "tests" / "fixtures" / "int8"
INT8_CASES = sorted(p.parent for p in INT8.glob("*/model.safetensors"))


@pytest.mark.parametrize("case", INT8_CASES, ids=lambda p: p.name)
def test_int8_checkpoints_dequantize_in_memory_as_their_libraries_do(case):
    """compressed-tensors and bitsandbytes checkpoints made by the real libraries, into a
    plain state dict equal to the libraries' own dequantization (dequantized.safetensors)."""
    # bitsandbytes' own dequantization is always F32 (int8_vectorwise_dequant); CT's is the
    # model's dtype (tests/fixtures/int8/README.md)
    like = "plain:f32" if case.name.startswith("bnb") else "plain"
    state = ckptkit.load(case / "model.safetensors", like=like, framework="np")
    gold = raw_tensors(case / "dequantized.safetensors")
    assert gold
    for k, (dtype, shape, data) in gold.items():
        assert list(state[k].shape) == shape, k
        assert state[k].tobytes() == data, k
    assert sorted(state) == sorted(raw_tensors(case / "float.safetensors")), "a plain model's key set"

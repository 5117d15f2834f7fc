"""compressed-tensors FP8 files made by the real compressed-tensors 0.20.0 (tests/fixtures/ctfp8),
through the Python package: loaded as the library decompresses them, read layer by layer, and
quantized in memory exactly as the library does, for every strategy."""

import json
from pathlib import Path

import pytest

import ckptkit
from conftest import raw_tensors

ROOT = Path(__file__).resolve().parents[2]
CTFP8 = ROOT / "tests" / "fixtures" / "ctfp8"
CASES = sorted(p.parent for p in CTFP8.glob("*/model.safetensors"))


def test_there_are_cases():
    assert len(CASES) >= 6


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_ct_fp8_files_load_as_compressed_tensors_decompresses_them(case):
    state = ckptkit.load(case / "model.safetensors", like="plain", framework="np")
    gold = raw_tensors(case / "dequantized.safetensors")
    plain = raw_tensors(case / "float.safetensors")
    assert sorted(state) == sorted(plain), "a plain model's key set"
    for k, (dtype, shape, data) in plain.items():
        want = gold.get(k, (dtype, shape, data))
        assert list(state[k].shape) == want[1], k
        assert state[k].tobytes() == want[2], k
    target = json.loads((case / "case.json").read_text())["ckptkit_target"]
    with ckptkit.open(case / "model.safetensors") as f:
        layers = {l["path"]: l["layout"] for l in f.layers()}
        quantized = [p for p, lay in layers.items() if lay == target]
        assert quantized, layers
        for p in quantized:
            got = f.get_dequantized(p)
            assert got[p + ".weight"].tobytes() == gold[p + ".weight"][2], p


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_ct_fp8_quantized_in_memory_equals_what_compressed_tensors_wrote(case):
    c = json.loads((case / "case.json").read_text())
    theirs = raw_tensors(case / "model.safetensors")
    state = ckptkit.load(case / "float.safetensors", like=c["ckptkit_target"], framework="np",
                         exclude=c["exclude"])
    assert sorted(state) == sorted(theirs)
    for k, (dtype, shape, data) in theirs.items():
        assert state[k].tobytes() == data, k

"""Block FP8 (DeepSeek-V3 style) files made by the real transformers 5.24.0 fine-grained FP8 code
(tests/fixtures/fp8block), through the Python package: loaded as DeepSeek dequantizes them, read
layer by layer, and quantized in memory exactly as the library does (ragged weights included)."""

import json
from pathlib import Path

import pytest

import ckptkit
from conftest import raw_tensors

ROOT = Path(__file__).resolve().parents[2]
FP8BLOCK = ROOT / "tests" / "fixtures" / "fp8block"
CASES = sorted(p.parent for p in FP8BLOCK.glob("*/model.safetensors"))


def test_there_are_cases():
    assert len(CASES) >= 4


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_block_fp8_files_load_as_deepseek_dequantizes_them(case):
    state = ckptkit.load(case / "model.safetensors", like="plain", framework="np")
    gold = raw_tensors(case / "dequantized.safetensors")
    assert sorted(state) == sorted(gold), "a plain model's key set"
    for k, (dtype, shape, data) in gold.items():
        assert list(state[k].shape) == shape, k
        assert state[k].tobytes() == data, k
    target = json.loads((case / "case.json").read_text())["ckptkit_target"]
    with ckptkit.open(case / "model.safetensors") as f:
        layouts = {l["path"]: l["layout"] for l in f.layers()}
        assert layouts["lin_ragged"] == target
        got = f.get_dequantized("lin_ragged")
        assert got["lin_ragged.weight"].tobytes() == gold["lin_ragged.weight"][2]
        assert got["lin_ragged.bias"].tobytes() == gold["lin_ragged.bias"][2]


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_block_fp8_quantized_in_memory_equals_what_transformers_wrote(case):
    target = json.loads((case / "case.json").read_text())["ckptkit_target"]
    theirs = raw_tensors(case / "model.safetensors")
    for like in (case / "model.safetensors", target):
        kw = {} if isinstance(like, Path) else {"exclude": ["lin_skip"]}
        state = ckptkit.load(case / "float.safetensors", like=like, framework="np", **kw)
        assert sorted(state) == sorted(theirs), like
        for k, (dtype, shape, data) in theirs.items():
            assert state[k].tobytes() == data, (like, k)

"""ComfyUI `comfy_quant` FP8 files made by the real comfy-kitchen 0.2.40 (tests/fixtures/comfy),
through the Python package: loaded, read layer by layer, and quantized in memory exactly as
the library does."""

import json
from pathlib import Path

import pytest

import ckptkit
from conftest import raw_tensors

ROOT = Path(__file__).resolve().parents[2]
COMFY = ROOT / "tests" / "fixtures" / "comfy"
CASES = sorted(p.parent for p in COMFY.glob("*/quantized.safetensors"))


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_comfy_files_load_as_comfy_kitchen_dequantizes_them(case):
    state = ckptkit.load(case / "quantized.safetensors", like="plain", framework="np")
    gold = raw_tensors(case / "dequantized.safetensors")
    plain = raw_tensors(case / "float.safetensors")
    assert sorted(state) == sorted(plain), "a plain model's key set"
    for k, (dtype, shape, data) in plain.items():
        want = gold.get(k, (dtype, shape, data))
        assert list(state[k].shape) == want[1], k
        assert state[k].tobytes() == want[2], k
    with ckptkit.open(case / "quantized.safetensors") as f:
        layouts = {l["path"]: l["layout"] for l in f.layers()}
        case_json = json.loads((case / "case.json").read_text())
        assert layouts["lin_a"] == case_json.get("ckptkit_target", "comfy:" + case_json["format"])
        assert f.get_dequantized("lin_a")["lin_a.weight"].tobytes() == gold["lin_a.weight"][2]


@pytest.mark.parametrize("case", [c for c in CASES if "f16-float8_e5m2" not in c.name], ids=lambda p: p.name)
def test_comfy_quantized_in_memory_equals_what_comfy_kitchen_wrote(case):
    state = ckptkit.load(case / "float.safetensors", like=case / "quantized.safetensors", framework="np")
    theirs = raw_tensors(case / "quantized.safetensors")
    assert sorted(state) == sorted(theirs)
    for k, (dtype, shape, data) in theirs.items():
        assert state[k].tobytes() == data, k


@pytest.mark.parametrize("case", [c for c in CASES if (c / "legacy.safetensors").exists()], ids=lambda p: p.name)
def test_legacy_scaled_fp8_files_load_as_comfyui_reads_them(case):
    """ComfyUI's legacy form (`scale_weight`, the `scaled_fp8` marker) of the same codes."""
    state = ckptkit.load(case / "legacy.safetensors", like="plain", framework="np")
    gold = raw_tensors(case / "dequantized.safetensors")
    plain = raw_tensors(case / "float.safetensors")
    assert sorted(state) == sorted(plain)
    for k, t in gold.items():
        assert state[k].tobytes() == t[2], k
    fmt = json.loads((case / "case.json").read_text())["format"]
    relaid = ckptkit.load(case / "legacy.safetensors", like=f"comfy:{fmt}", framework="np")
    for k, (dtype, shape, data) in raw_tensors(case / "quantized.safetensors").items():
        assert relaid[k].tobytes() == data, k

"""`get_tensor(..., framework="pt")` against safetensors' own torch loader.

Runs where torch is installed (CI: the live interop venv, after the live
suites); skipped elsewhere, where the numpy tests cover the same reads.
"""

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")

import ckptkit  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = sorted((ROOT / "tests" / "fixtures" / "quanto").glob("*/quantized.safetensors"))


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.parent.name)
def test_torch_tensors_equal_safetensors_load_file(path):
    theirs = st_torch.load_file(str(path))
    f = ckptkit.open(path)
    assert sorted(f.keys()) == sorted(theirs)
    for k, t in theirs.items():
        ours = f.get_tensor(k, framework="pt")
        assert ours.dtype == t.dtype, k
        assert ours.shape == t.shape, k
        # bit for bit (NaN payloads included)
        assert torch.equal(ours.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.parent.name)
def test_load_into_torch_equals_quantos_dequantize(path):
    case = path.parent
    state = ckptkit.load(path, like="plain", shapes_from=case / "float.safetensors")
    plain = st_torch.load_file(str(case / "float.safetensors"))
    assert sorted(state) == sorted(plain)
    for k, t in plain.items():
        assert state[k].dtype == t.dtype and state[k].shape == t.shape, k
    for k, t in st_torch.load_file(str(case / "dequantized.safetensors")).items():
        assert torch.equal(state[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k

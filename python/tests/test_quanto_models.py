"""`ckptkit.load(..., like=model.state_dict())` against real optimum-quanto models.

The fixture models of tests/fixtures/quanto, rebuilt with the generator's own
code (tests/interop/quanto_models.py): (a) a quantized checkpoint into the
plain model, strict; (c) a plain checkpoint into the frozen quantized model,
strict, with tensors equal to what quanto's quantize() + freeze() made; (b) a quantized
checkpoint into the frozen quantized model, its layout kept.
Runs where torch and optimum-quanto are installed (CI: the live suites' venv).
"""

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("optimum.quanto")

import ckptkit  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "interop"))
import quanto_models as qm  # noqa: E402

QUANTO = ROOT / "tests" / "fixtures" / "quanto"
CASES = sorted(p for p in QUANTO.iterdir() if (p / "case.json").exists() and "act_" not in p.name)


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("case_dir", CASES, ids=lambda p: p.name)
def test_a_quantized_checkpoint_into_the_plain_model(case_dir):
    case = qm.load_case(str(case_dir))
    model = qm.build_model(case)
    state = ckptkit.load(
        case_dir / "quantized.safetensors", like=model.state_dict(), shapes_from=case_dir / "float.safetensors"
    )
    model.load_state_dict(state, strict=True)
    gold = qm.load_tensors(str(case_dir / "dequantized.safetensors"))
    for k, t in gold.items():
        assert same(model.state_dict()[k], t), k


@pytest.mark.parametrize("case_dir", [c for c in CASES if c.name.endswith(("qint8", "qint4"))], ids=lambda p: p.name)
def test_a_plain_checkpoint_into_the_frozen_quantized_model(case_dir):
    from optimum.quanto import quantization_map

    case = qm.load_case(str(case_dir))
    float_sd = qm.load_tensors(str(case_dir / "float.safetensors"))
    qmodel = qm.build_quantized_from_float(case, float_sd)
    theirs = {k: v for k, v in qmodel.state_dict().items() if hasattr(v, "dtype")}
    state = ckptkit.load(case_dir / "float.safetensors", like=qmodel.state_dict(), like_qmap=quantization_map(qmodel))
    assert sorted(state) == sorted(theirs)
    for k, t in theirs.items():
        if k.endswith(("input_scale", "output_scale")):
            continue  # calibration, not weights
        assert same(state[k], t), k
    qmodel.load_state_dict(state, strict=True)


@pytest.mark.parametrize("case_dir", [c for c in CASES if c.name.endswith(("qint8", "qint4"))], ids=lambda p: p.name)
def test_a_quantized_checkpoint_into_the_frozen_quantized_model(case_dir):
    """The layout is kept: every tensor as quanto saved it, and the model (quantized from
    other weights) then holds exactly what the checkpoint holds."""
    from optimum.quanto import quantization_map

    case = qm.load_case(str(case_dir))
    float_sd = qm.load_tensors(str(case_dir / "float.safetensors"))
    qmodel = qm.build_quantized_from_float(case, {k: v * 2 for k, v in float_sd.items()})
    state = ckptkit.load(case_dir / "quantized.safetensors", like=qmodel.state_dict(), like_qmap=quantization_map(qmodel))
    stored = qm.load_tensors(str(case_dir / "quantized.safetensors"))
    assert sorted(state) == sorted(stored)
    for k, t in stored.items():
        assert same(state[k], t), k
    qmodel.load_state_dict(state, strict=True)
    for k, t in qmodel.state_dict().items():
        if hasattr(t, "dtype") and k in stored:
            assert same(t, stored[k]), k

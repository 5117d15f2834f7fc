"""The failure ckptkit started from, end to end with real optimum-quanto and diffusers.

A tiny Flux transformer (diffusers' FluxTransformer2DModel) quantized with quanto qint8 and
frozen, as a SimpleTuner int8-quanto run does, its checkpoint saved with its quanto map:
(a) resumed into a plain model with `ckptkit.load(..., like=model.state_dict())`, strict, every
weight equal to quanto's `dequantize()`; (b) resumed into a frozen quantized model (of other
weights), strict, every tensor as saved, and its forward equal to the original quantized
model's; (c) the reverse, a plain checkpoint into the frozen quantized model, strict, every
tensor equal to what `quantize()` + `freeze()` made, and its forward equal to the original's
too. Fresh random weights each run (the seed is printed). Runs where torch, diffusers and optimum-quanto are installed (CI: the live
suites' venv).
"""

import json
import os

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
quanto = pytest.importorskip("optimum.quanto")

from safetensors.torch import save_file  # noqa: E402

import ckptkit  # noqa: E402


def tiny_flux():
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 4, 8),
    ).to(torch.bfloat16)


def quantized(float_sd):
    m = tiny_flux()
    m.load_state_dict(float_sd, strict=True)
    quanto.quantize(m, weights=quanto.qint8)
    quanto.freeze(m)
    return m


def inputs():
    # in_channels 64: with 4, quanto's own CPU int8 matmul (torch._weight_int8pack_mm) crashes
    # on the original quantized model, before ckptkit is involved
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)
    return dict(
        hidden_states=r(1, 16, 64),
        encoder_hidden_states=r(1, 3, 32),
        pooled_projections=r(1, 32),
        timestep=torch.tensor([0.5], dtype=torch.bfloat16),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(3, 3),
        return_dict=False,
    )


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_the_seed_a_simpletuner_flux_resume(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    print("seed", seed)
    torch.manual_seed(seed)
    float_sd = {k: v.detach().clone() for k, v in tiny_flux().state_dict().items()}
    qmodel = quantized(float_sd)
    qmap = quanto.quantization_map(qmodel)
    ckpt_dir = tmp_path / "transformer"
    ckpt_dir.mkdir()
    ckpt = ckpt_dir / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in qmodel.state_dict().items()}, str(ckpt))
    (ckpt_dir / "quanto_qmap.json").write_text(json.dumps(qmap))

    # the bug: a plain model cannot load it
    plain = tiny_flux()
    with pytest.raises(RuntimeError, match="weight._data"):
        plain.load_state_dict(dict(qmodel.state_dict()), strict=True)

    # (a) into the plain model
    state = ckptkit.load(ckpt, like=plain.state_dict())
    plain.load_state_dict(state, strict=True)
    n = 0
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            if isinstance(m, quanto.nn.QModuleMixin) and m.weight_qtype is not None:
                assert same(plain.get_submodule(name).weight, m.weight.dequantize()), name
                n += 1
    assert n >= 10

    # (b) into a frozen quantized model (built from other weights): the layout is kept
    other = quantized({k: v.detach().clone() for k, v in tiny_flux().state_dict().items()})
    state = ckptkit.load(ckpt, like=other.state_dict(), like_qmap=quanto.quantization_map(other))
    theirs = qmodel.state_dict()
    assert sorted(state) == sorted(theirs)
    for k, t in theirs.items():
        assert same(state[k], t), k
    with torch.no_grad():
        assert not torch.equal(other(**inputs())[0], qmodel(**inputs())[0]), "the load must matter"
    other.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(other(**inputs())[0], qmodel(**inputs())[0])

    # (c) a plain checkpoint into the frozen quantized model
    plain_ckpt = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in float_sd.items()}, str(plain_ckpt))
    target = quantized(float_sd)
    state = ckptkit.load(plain_ckpt, like=target.state_dict(), like_qmap=quanto.quantization_map(target))
    assert sorted(state) == sorted(theirs)
    for k, t in theirs.items():
        assert same(state[k], t), k
    fresh = quantized(float_sd)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs())[0], qmodel(**inputs())[0])

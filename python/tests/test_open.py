"""`ckptkit.open`: stored tensors into numpy, checked against their hashes."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ckptkit
from conftest import raw_tensors

ROOT = Path(__file__).resolve().parents[2]
QUANTIZED = ROOT / "tests" / "fixtures" / "quanto" / "bf16-qint8" / "quantized.safetensors"


def test_every_stored_tensor_reads_as_stored():
    raw = raw_tensors(QUANTIZED)
    with ckptkit.open(QUANTIZED) as f:
        assert sorted(f.keys()) == sorted(raw)
        assert len(f) == len(raw)
        assert f.metadata() == ckptkit.open(QUANTIZED).metadata()
        for k, (dtype, shape, data) in raw.items():
            a = f.get_tensor(k)
            assert list(a.shape) == shape, k
            assert a.tobytes() == data, k
            if dtype == "I8":
                assert a.dtype == np.int8
            if dtype == "BF16":
                assert str(a.dtype) == "bfloat16"  # through ml_dtypes
        layers = {l["path"]: l["layout"] for l in f.layers()}
        assert layers["lin_g64"].startswith("quanto qint8")


def test_a_container_reads_the_same_tensors(tmp_path):
    ckpk = tmp_path / "m.ckpk"
    ckptkit.convert(QUANTIZED, ckpk, compress="zstd")
    a, b = ckptkit.open(QUANTIZED), ckptkit.open(ckpk)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert a.get_tensor(k).tobytes() == b.get_tensor(k).tobytes(), k


def test_corrupt_bytes_are_refused_naming_the_tensor(tmp_path):
    st = tmp_path / "p.safetensors"
    ckptkit.convert(QUANTIZED, st, to="plain")
    raw = raw_tensors(st)
    key = max(raw, key=lambda k: len(raw[k][2]))
    data = bytearray(st.read_bytes())
    i = data.find(raw[key][2])
    data[i + 5] ^= 0x01
    st.write_bytes(bytes(data))
    f = ckptkit.open(st)
    with pytest.raises(ckptkit.HashMismatchError) as e:
        f.get_tensor(key)
    assert e.value.tensor == key and e.value.file == str(st)
    with pytest.raises(ckptkit.Error) as e:
        f.get_tensor("no.such.tensor")
    assert e.value.tensor == "no.such.tensor"
    with pytest.raises(ckptkit.UsageError):
        f.get_tensor(key, framework="jax")


def test_bfloat16_without_ml_dtypes_is_a_clear_error():
    code = (
        "import sys; sys.modules['ml_dtypes'] = None\n"
        "import ckptkit\n"
        f"f = ckptkit.open({str(QUANTIZED)!r})\n"
        "f.get_tensor('lin_g64.weight._data')\n"
        "try:\n"
        "    f.get_tensor('lin_g64.weight._scale')\n"
        "except ckptkit.Error as e:\n"
        "    print('refused:', e)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "refused:" in p.stdout and "ml_dtypes" in p.stdout and "BF16" in p.stdout


QUANTO = ROOT / "tests" / "fixtures" / "quanto"
INT8 = ROOT / "tests" / "fixtures" / "int8"


@pytest.mark.parametrize(
    "case", sorted(p.parent for p in QUANTO.glob("*/quantized.safetensors")), ids=lambda p: p.name
)
def test_each_layer_dequantizes_as_quanto_does(case):
    """get_dequantized(layer), one layer at a time, equals quanto's dequantize() of its weight
    (dequantized.safetensors) and the float model's other tensors; together the layers give a
    plain model's key set."""
    gold = raw_tensors(case / "dequantized.safetensors")
    plain = raw_tensors(case / "float.safetensors")
    seen = set()
    f = ckptkit.open(case / "quantized.safetensors", shapes_from=case / "float.safetensors")
    for layer in f.layers():
        got = f.get_dequantized(layer["path"])
        assert got and all(k.startswith(layer["path"] + ".") for k in got), layer["path"]
        for k, a in got.items():
            dtype, shape, data = gold.get(k) or plain[k]
            assert list(a.shape) == shape, k
            assert a.tobytes() == data, k
            seen.add(k)
    assert seen == set(plain)


@pytest.mark.parametrize(
    "case", sorted(p.parent for p in INT8.glob("ct-*/model.safetensors")), ids=lambda p: p.name
)
def test_int8_layers_dequantize_as_compressed_tensors_does(case):
    gold = raw_tensors(case / "dequantized.safetensors")
    f = ckptkit.open(case / "model.safetensors")
    for k, (dtype, shape, data) in gold.items():
        layer = k.rsplit(".", 1)[0]
        a = f.get_dequantized(layer)[k]
        assert list(a.shape) == shape and a.tobytes() == data, k


def test_get_dequantized_of_a_container_in_another_dtype_and_its_refusals(tmp_path):
    ckpk = tmp_path / "m.ckpk"
    ckptkit.convert(QUANTIZED, ckpk, compress="zstd")
    gold = raw_tensors(QUANTIZED.parent / "dequantized.safetensors")
    with ckptkit.open(ckpk) as f:
        w = f.get_dequantized("lin_g64")["lin_g64.weight"]
        assert w.tobytes() == gold["lin_g64.weight"][2]
        w32 = f.get_dequantized("lin_g64", dtype="f32")["lin_g64.weight"]
        assert w32.dtype == np.float32
        # bf16 widens to f32 exactly
        assert np.array_equal(w32, w.astype(np.float32))
        with pytest.raises(ckptkit.Error) as e:
            f.get_dequantized("lin_g6")  # a prefix of a layer is not a layer
        assert e.value.layer == "lin_g6"
        with pytest.raises(ckptkit.UsageError):
            f.get_dequantized("lin_g64", framework="jax")
    # corrupt codes of one layer: refused naming the tensor; other layers still read
    st = tmp_path / "q.safetensors"
    ckptkit.convert(QUANTIZED.parent / "float.safetensors", st, to="quanto:qint8")
    raw = raw_tensors(st)
    data = bytearray(st.read_bytes())
    i = data.find(raw["lin_g64.weight._data"][2])
    data[i + 3] ^= 0x01
    st.write_bytes(bytes(data))
    f = ckptkit.open(st)
    with pytest.raises(ckptkit.HashMismatchError) as e:
        f.get_dequantized("lin_g64")
    assert e.value.tensor == "lin_g64.weight._data"
    assert "lin_g96.weight" in f.get_dequantized("lin_g96")

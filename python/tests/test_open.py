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

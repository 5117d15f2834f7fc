"""What the object-store checks share (s3_moto.py, az_azurite.py): the toy
model directory, a large BF16 file, and a directory's files with their
hashes."""

import hashlib
import json
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests/fixtures/quanto/bf16-qint8"


def model_dir(root):
    d = Path(root) / "toy"
    d.mkdir()
    shutil.copy(FIXTURE / "quantized.safetensors", d / "diffusion_pytorch_model.safetensors")
    shutil.copy(FIXTURE / "quanto_qmap.json", d / "quanto_qmap.json")
    (d / "config.json").write_text(
        '{"_class_name": "Toy", "quantization_config": {"quant_method": "quanto", "weights": "int8"}}'
    )
    (d / "README.md").write_text("a toy model\n")
    return d


def tree(d):
    d = Path(d)
    return sorted(
        (str(p.relative_to(d)), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in d.rglob("*")
        if p.is_file()
    )


def bf16_file(path, n_bytes):
    """A safetensors file of one BF16 tensor with finite random values."""
    data = bytearray(os.urandom(n_bytes))
    # high bytes: keep sign and the low exponent bit, pin the rest (|x| < 2)
    table = bytes(((b & 0x81) | 0x3C) for b in range(256))
    data[1::2] = bytes(data[1::2]).translate(table)
    n = n_bytes // 2
    header = json.dumps(
        {"w.weight": {"dtype": "BF16", "shape": [n // 1024, 1024], "data_offsets": [0, n_bytes]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    Path(path).write_bytes(len(header).to_bytes(8, "little") + header + bytes(data))

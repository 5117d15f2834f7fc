"""The Python API against the bundled fixtures and the `migrate` console script."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ckptkit

ROOT = Path(__file__).resolve().parents[2]
FX = ROOT / "tests" / "fixtures" / "quanto" / "bf16-qint8"
QUANTIZED = FX / "quantized.safetensors"
FLOAT = FX / "float.safetensors"
QMAP = FX / "quanto_qmap.json"
MIGRATE = shutil.which("migrate")


def cli_json(*args):
    """`migrate ARGS --json` through the console script: (exit code, parsed JSON)."""
    assert MIGRATE, "the package's console script `migrate` is not on PATH"
    p = subprocess.run([MIGRATE, *map(str, args), "--json"], capture_output=True, text=True)
    return p.returncode, json.loads(p.stdout)


def test_inspect_equals_the_clis_json():
    r = ckptkit.inspect(QUANTIZED)
    code, cli = cli_json("inspect", QUANTIZED)
    assert code == 0
    assert r == cli
    layouts = {l["path"]: l["layout"] for l in r["layers"]}
    assert layouts["lin_g64"].startswith("quanto qint8")


def test_check_names_the_fix_and_the_fix_fixes(tmp_path):
    r = ckptkit.check(FLOAT, QMAP)
    assert r["compatible"] is False
    assert r == cli_json("check", FLOAT, "--against", QMAP)[1]
    assert "--like" in r["fix"]
    out = tmp_path / "q" / "model.safetensors"
    s = ckptkit.convert(FLOAT, out, like=QMAP)
    assert s["output"] == str(out) and s["lossless"] is False
    assert (tmp_path / "q" / "quanto_qmap.json").exists()
    assert ckptkit.check(out, QMAP)["compatible"] is True
    # the layouts optimum-quanto wrote (bytes: tests/migrate_quanto.rs)
    ours = ckptkit.inspect(out)
    theirs = ckptkit.inspect(QUANTIZED)
    assert [l["layout"] for l in ours["layers"]] == [l["layout"] for l in theirs["layers"]]


def test_convert_returns_the_clis_summary_and_reports_progress(tmp_path):
    calls = []
    a = ckptkit.convert(QUANTIZED, tmp_path / "a.safetensors", to="plain", progress=lambda d, t: calls.append((d, t)))
    code, b = cli_json("convert", QUANTIZED, tmp_path / "b.safetensors", "--to", "plain")
    assert code == 0
    assert a.pop("output") == str(tmp_path / "a.safetensors")
    assert b.pop("output") == str(tmp_path / "b.safetensors")
    a.pop("seconds"), b.pop("seconds")
    # the same fields, and the same bytes written (blake3 of the output)
    assert a == b
    assert calls, "the progress callback was never called"
    assert calls[-1][0] == calls[-1][1] > 0
    assert all(d <= t for d, t in calls)
    # both outputs hold the same tensors
    assert ckptkit.verify(tmp_path / "a.safetensors") == ckptkit.verify(tmp_path / "b.safetensors")


def test_errors_are_typed_and_say_where(tmp_path):
    out = tmp_path / "m.ckpk"
    ckptkit.convert(QUANTIZED, out)
    with pytest.raises(ckptkit.OutputExistsError):
        ckptkit.convert(QUANTIZED, out)
    ckptkit.convert(QUANTIZED, out, force=True)
    with pytest.raises(ckptkit.UsageError):
        ckptkit.convert(QUANTIZED, tmp_path / "x.safetensors", to="quanto:qint9")
    # one flipped bit in the tensor data of a ckptkit-written file
    st = tmp_path / "p.safetensors"
    ckptkit.convert(QUANTIZED, st, to="plain")
    data = bytearray(st.read_bytes())
    data[-3] ^= 0x10
    st.write_bytes(bytes(data))
    with pytest.raises(ckptkit.HashMismatchError) as e:
        ckptkit.verify(st)
    assert isinstance(e.value, ckptkit.Error)
    assert e.value.file == str(st)
    assert e.value.tensor
    assert isinstance(e.value.offset, int)
    with pytest.raises(ckptkit.Error) as e:
        ckptkit.inspect(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in str(e.value)


def test_the_console_script_is_the_command_line():
    assert subprocess.run([MIGRATE, "--help"], capture_output=True).returncode == 0
    p = subprocess.run([MIGRATE, "convert"], capture_output=True, text=True)
    assert p.returncode == 2 and "required" in p.stderr
    p = subprocess.run([MIGRATE, "verify", str(QUANTIZED)], capture_output=True, text=True)
    assert p.returncode == 0 and "verified" in p.stdout


def big_plain_model(path: Path, layers: int, rows: int = 4096, cols: int = 4096):
    """A sparse bf16 safetensors file of zeros (no disk used, fast to read)."""
    header = {}
    off = 0
    n = rows * cols * 2
    for i in range(layers):
        header[f"l{i}.weight"] = {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [off, off + n]}
        off += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.truncate(8 + len(text) + off)


def test_ctrl_c_stops_a_conversion_and_leaves_nothing(tmp_path):
    src = tmp_path / "in.safetensors"
    big_plain_model(src, layers=96)  # 3 GiB of zeros
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "m.ckpk"
    child = textwrap.dedent(
        f"""
        import sys, ckptkit
        started = False
        def progress(done, total):
            global started
            if done and not started:
                started = True
                print("started", flush=True)
        try:
            ckptkit.convert({str(src)!r}, {str(dst)!r}, to="quanto:qint8", compress="zstd", progress=progress)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
        print("finished", flush=True)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "started"
    p.send_signal(signal.SIGINT)
    rest = p.stdout.read()
    assert p.wait(timeout=120) == 3, rest
    assert "interrupted" in rest
    assert os.listdir(out_dir) == [], "the cancelled conversion left files behind"


def test_help_is_useful():
    assert "quanto_qmap.json" in ckptkit.check.__doc__
    assert "progress" in ckptkit.convert.__doc__
    assert "Ctrl-C" in ckptkit.convert.__doc__


INT8 = ROOT / "tests" / "fixtures" / "int8"
COMFY = ROOT / "tests" / "fixtures" / "comfy"
FP8BLOCK = ROOT / "tests" / "fixtures" / "fp8block"
CTFP8 = ROOT / "tests" / "fixtures" / "ctfp8"
EVERY_FAMILY = (
    [QUANTIZED, FLOAT]
    + sorted(INT8.glob("*/model.safetensors"))
    + sorted(COMFY.glob("*/quantized.safetensors"))
    + sorted(COMFY.glob("*/legacy.safetensors"))
    + sorted(FP8BLOCK.glob("*/model.safetensors"))
    + sorted(CTFP8.glob("*/model.safetensors"))
    + sorted((ROOT / "tests" / "fixtures" / "comfy-convrot").glob("convrot-*/quantized.safetensors"))
    + sorted((ROOT / "tests" / "fixtures" / "comfy-mxfp8").glob("*/quantized.safetensors"))
    + sorted((ROOT / "tests" / "fixtures" / "comfy-nvfp4").glob("*/quantized.safetensors"))
)


@pytest.mark.parametrize("path", EVERY_FAMILY, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_inspect_verify_and_check_agree_with_the_cli_on_every_family(path):
    assert ckptkit.inspect(path) == cli_json("inspect", path)[1]
    assert ckptkit.verify(path) == cli_json("verify", path)[1]
    r = ckptkit.check(path, FLOAT)
    code, cli = cli_json("check", path, "--against", FLOAT)
    assert r == cli
    assert code == (0 if r["compatible"] else 1)


@pytest.mark.parametrize("path", [p for p in EVERY_FAMILY if p != FLOAT], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_convert_agrees_with_the_cli_on_every_family(path, tmp_path):
    # into a container: every family's layers, kept (a plain input: the same, compressed)
    a = ckptkit.convert(path, tmp_path / "a.ckpk", compress="zstd")
    code, b = cli_json("convert", path, tmp_path / "b.ckpk", "--compress", "zstd")
    assert code == 0
    assert a.pop("output") == str(tmp_path / "a.ckpk")
    assert b.pop("output") == str(tmp_path / "b.ckpk")
    a.pop("seconds"), b.pop("seconds")
    a.pop("files", None), b.pop("files", None)
    assert a == b
    # and dequantized to plain (--shapes-from: quanto's packed layers need shapes)
    plain = dict(shapes_from=FLOAT) if path == QUANTIZED else {}
    extra = ["--shapes-from", FLOAT] if path == QUANTIZED else []
    a = ckptkit.convert(path, tmp_path / "a.safetensors", to="plain", **plain)
    code, b = cli_json("convert", path, tmp_path / "b.safetensors", "--to", "plain", *extra)
    assert code == 0
    for r in (a, b):
        r.pop("output"), r.pop("seconds"), r.pop("files", None)
    assert a == b

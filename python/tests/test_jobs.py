"""ckptkit.jobs: a conversion planned as jobs, run in this process, gives
ckptkit.convert's directory byte for byte; failures raise with migrate's
message."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import ckptkit
from ckptkit import jobs

FIXTURE = Path(__file__).resolve().parents[2] / "tests/fixtures/quanto/bf16-qint8"


def model_dir(root: Path) -> Path:
    """quanto's qint8 file with its map, as a model directory."""
    d = root / "in"
    d.mkdir()
    shutil.copy(FIXTURE / "quantized.safetensors", d / "diffusion_pytorch_model.safetensors")
    shutil.copy(FIXTURE / "quanto_qmap.json", d / "quanto_qmap.json")
    return d


def tree(d: Path) -> dict:
    """relative path -> sha256 of every file under d."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def test_jobs_in_this_process_give_convert_s_directory(tmp_path):
    src = model_dir(tmp_path)
    ckptkit.convert(src, tmp_path / "a", to="plain", max_shard_size=3500)
    n = jobs.plan(src, tmp_path / "b", tmp_path / "plan.json", to="plain", max_shard_size=3500)
    assert n == 8
    records = [jobs.run_shard(tmp_path / "plan.json", k) for k in reversed(range(n))]
    assert all(not r["already_done"] for r in records)
    again = jobs.run_shard(tmp_path / "plan.json", 0)
    assert again["already_done"] and again["blake3"] == records[-1]["blake3"]
    done = jobs.finish(tmp_path / "plan.json")
    assert len(done["files"]) == 8
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "diffusion_pytorch_model.safetensors.index.json").read_text())


def test_failures_raise_with_migrate_s_message(tmp_path):
    src = model_dir(tmp_path)
    with pytest.raises(ckptkit.UsageError, match="a plan writes a directory"):
        jobs.plan(src, tmp_path / "b.safetensors", tmp_path / "plan.json", to="plain")
    with pytest.raises(TypeError, match="unknown option 'bogus'"):
        jobs.plan(src, tmp_path / "b", tmp_path / "plan.json", bogus=1)
    jobs.plan(src, tmp_path / "b", tmp_path / "plan.json", to="plain", max_shard_size=3500)
    with pytest.raises(ckptkit.Error, match=r"2 \(diffusion_pytorch_model-00003-of-00008"):
        for k in (0, 1, 3, 4, 5, 6, 7):
            jobs.run_shard(tmp_path / "plan.json", k)
        jobs.finish(tmp_path / "plan.json")
    assert not (tmp_path / "b").exists()
    with pytest.raises(ckptkit.UsageError, match="no job 8"):
        jobs.run_shard(tmp_path / "plan.json", 8)

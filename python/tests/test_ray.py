"""ckptkit.ray on a local Ray cluster: tasks give ckptkit.convert's
directory byte for byte, a worker killed in the middle of its job is retried,
and convert_many converts several checkpoints. Runs where Ray is installed
(.ci/ray.sh); skipped elsewhere."""

import os
import signal
import shutil
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import ckptkit  # noqa: E402
import ckptkit.ray  # noqa: E402
from test_jobs import model_dir, tree  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_tasks_give_convert_s_directory_byte_for_byte(tmp_path):
    src = model_dir(tmp_path)
    ckptkit.convert(src, tmp_path / "a", to="plain", max_shard_size=3500)
    done = ckptkit.ray.convert(src, tmp_path / "b", to="plain", max_shard_size=3500)
    assert len(done["jobs"]) == 8 and len(done["files"]) == 8
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    # the plan and the staging directory are gone
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "in"]


def test_a_worker_killed_in_its_job_is_retried_and_the_result_is_identical(tmp_path):
    src = model_dir(tmp_path)
    ckptkit.convert(src, tmp_path / "a", to="plain", max_shard_size=3500)
    marker = tmp_path / "killed.pid"
    staging = tmp_path / ".b.ckptkit-jobs"
    shard = "diffusion_pytorch_model-00004-of-00008.safetensors"

    calls = tmp_path / "job3.pids"

    def hook(k):
        if k == 3:
            with open(calls, "a") as f:
                f.write(f"{os.getpid()}\n")
        # job 3, first attempt: leave what a writer killed mid-file leaves
        # (its file half written, no record), note the worker's pid, die
        if k == 3 and not marker.exists():
            staging.mkdir(exist_ok=True)
            whole = (tmp_path / "a" / shard).read_bytes()
            (staging / shard).write_bytes(whole[: len(whole) // 2])
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    done = ckptkit.ray.convert(src, tmp_path / "b", to="plain", max_shard_size=3500,
                               _task_hook=hook)
    assert marker.exists(), "the hook ran and killed its worker"
    pids = calls.read_text().split()
    assert len(pids) == 2 and pids[0] == marker.read_text() and pids[1] != pids[0], pids
    record = done["jobs"][3]
    assert not record["already_done"], "the retry wrote the file again"
    assert tree(tmp_path / "a") == tree(tmp_path / "b")


def test_convert_many_converts_each_checkpoint(tmp_path):
    pairs = []
    for i in range(3):
        root = tmp_path / f"m{i}"
        root.mkdir()
        src = model_dir(root)
        ckptkit.convert(src, root / "a", to="plain:f32" if i == 1 else "plain", max_shard_size=6000)
        pairs.append((src, root / "b"))
    # every conversion gets the same options: the second one differs from its reference
    done = ckptkit.ray.convert_many(pairs, to="plain", max_shard_size=6000)
    assert [len(d["files"]) for d in done] == [6, 6, 6]
    assert tree(tmp_path / "m0" / "a") == tree(tmp_path / "m0" / "b")
    assert tree(tmp_path / "m2" / "a") == tree(tmp_path / "m2" / "b")
    assert tree(tmp_path / "m1" / "a") != tree(tmp_path / "m1" / "b")


def test_a_failed_conversion_resumes_without_redoing_finished_jobs(tmp_path):
    src = model_dir(tmp_path)
    ckptkit.convert(src, tmp_path / "a", to="plain", max_shard_size=3500)

    def fail_job_5(k):
        if k == 5:
            raise RuntimeError("job 5 fails this time")

    with pytest.raises(Exception, match="job 5 fails this time"):
        ckptkit.ray.convert(src, tmp_path / "b", to="plain", max_shard_size=3500, max_retries=0,
                            _task_hook=fail_job_5)
    assert not (tmp_path / "b").exists()
    done = ckptkit.ray.convert(src, tmp_path / "b", to="plain", max_shard_size=3500)
    assert [r["already_done"] for r in done["jobs"]] == [k != 5 for k in range(8)]
    assert tree(tmp_path / "a") == tree(tmp_path / "b")

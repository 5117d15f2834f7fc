"""Shard-parallel conversion on Ray: plan on the driver, one Ray task per
job (``ckptkit.jobs.run_shard``, retried when it fails or its worker dies),
finish on the driver. The result is byte-identical to ``ckptkit.convert``
with the same options.

Every worker must see the input, the output's directory and the plan file at
the same paths as the driver (one machine, or a shared file system).

>>> import ray, ckptkit.ray                                          # doctest: +SKIP
>>> ray.init()                                                       # doctest: +SKIP
>>> ckptkit.ray.convert("in/", "out/", to="plain:bf16")              # doctest: +SKIP
>>> ckptkit.ray.convert_many([("a/", "a-bf16/"), ("b/", "b-bf16/")], to="plain:bf16")  # doctest: +SKIP

Without Ray, the same plan runs as a Kubernetes indexed Job or a Slurm array:
one ``migrate run-shard PLAN K`` per index, then ``migrate finish PLAN``
(README).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from ckptkit import jobs
from ckptkit.jobs import PathLike


def _ray():
    try:
        import ray
    except ImportError as e:  # pragma: no cover - the message is the point
        raise ImportError("ckptkit.ray needs Ray: pip install ray") from e
    return ray


def _default_plan_file(dst: PathLike) -> str:
    d = os.path.abspath(os.fspath(dst))
    return os.path.join(os.path.dirname(d), f".{os.path.basename(d)}.ckptkit-plan.json")


def _plan_or_resume(src: PathLike, dst: PathLike, pf: str, options: Dict[str, Any]) -> int:
    """Plans into ``pf``; where a failed run left the same plan there, keeps
    it, so that the jobs it finished are not run again."""
    if not os.path.lexists(pf):
        return jobs.plan(src, dst, pf, **options)
    fresh = pf + ".new"
    if os.path.lexists(fresh):
        os.remove(fresh)
    n = jobs.plan(src, dst, fresh, **options)
    with open(fresh, "rb") as a, open(pf, "rb") as b:
        same = a.read() == b.read()
    if same:
        os.remove(fresh)
        return n
    os.remove(fresh)
    raise jobs.Error(
        f"{pf} holds another plan of {os.fspath(dst)} (left by a run that failed): remove it and "
        f"the staging directory beside the output to start over"
    )


def _job(plan_file: str, k: int, hook: Optional[Callable[[int], None]]) -> Dict[str, Any]:
    if hook is not None:
        hook(k)
    return jobs.run_shard(plan_file, k)


def _submit(plan_file: str, n: int, max_retries: int, num_cpus: float,
            hook: Optional[Callable[[int], None]]) -> List[Any]:
    ray = _ray()
    task = ray.remote(_job).options(
        max_retries=max_retries, retry_exceptions=True, num_cpus=num_cpus
    )
    return [task.remote(plan_file, k, hook) for k in range(n)]


def _finish(plan_file: str, records: List[Dict[str, Any]], own_plan: bool) -> Dict[str, Any]:
    done = jobs.finish(plan_file)
    if own_plan:
        os.remove(plan_file)
    done["jobs"] = records
    return done


def convert(src: PathLike, dst: PathLike, *, plan_file: Optional[PathLike] = None,
            max_retries: int = 3, num_cpus: float = 1, _task_hook: Optional[Callable[[int], None]] = None,
            **options: Any) -> Dict[str, Any]:
    """Converts ``src`` to the directory ``dst`` with one Ray task per output
    file; ``options`` are ``convert``'s (``to``, ``like``, ``include``,
    ``max_shard_size``, ``force``, ...). ``plan_file`` defaults to
    ``.DST.ckptkit-plan.json`` beside ``dst``, removed once finished.
    Returns ``finish``'s result with each job's record under ``jobs``."""
    return convert_many([(src, dst)], plan_files=None if plan_file is None else [plan_file],
                        max_retries=max_retries, num_cpus=num_cpus, _task_hook=_task_hook,
                        **options)[0]


def convert_many(pairs: Iterable[Tuple[PathLike, PathLike]], *,
                 plan_files: Optional[List[PathLike]] = None, max_retries: int = 3,
                 num_cpus: float = 1, _task_hook: Optional[Callable[[int], None]] = None,
                 **options: Any) -> List[Dict[str, Any]]:
    """Converts each ``(src, dst)`` with the same options: every job of every
    conversion is submitted at once, and each conversion is finished in order
    once its own jobs are done. A conversion that failed part way resumes
    where it stopped when run again with the same options. Returns one result per pair, in order; the
    first failure raises once every other conversion has been finished."""
    ray = _ray()
    pairs = list(pairs)
    if plan_files is not None and len(plan_files) != len(pairs):
        raise ValueError("plan_files needs one plan file per pair")
    planned = []
    for i, (src, dst) in enumerate(pairs):
        own = plan_files is None
        pf = _default_plan_file(dst) if own else os.fspath(plan_files[i])
        n = _plan_or_resume(src, dst, pf, options) if own else jobs.plan(src, dst, pf, **options)
        planned.append((pf, own, _submit(pf, n, max_retries, num_cpus, _task_hook)))
    results: List[Any] = []
    first_error: Optional[BaseException] = None
    for pf, own, refs in planned:
        try:
            # every job settles (done, or failed for good) before a failure
            # is raised: no task of this conversion is left running
            ray.wait(refs, num_returns=len(refs))
            results.append(_finish(pf, ray.get(refs), own))
        except Exception as e:  # finish the others first
            results.append(e)
            first_error = first_error or e
    if first_error is not None:
        raise first_error
    return results

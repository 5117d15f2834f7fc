"""A conversion to a directory as jobs: ``plan``, ``run_shard``, ``finish``.

The same steps as ``migrate plan`` / ``migrate run-shard`` / ``migrate finish``
(spec/jobs.md), run in this process: plan once, run each job anywhere the
input and output paths are the same (in any order, retried freely: a job
whose record matches its file is not run again), then finish, which commits
a directory byte-identical to ``ckptkit.convert`` with the same options.

>>> from ckptkit import jobs
>>> n = jobs.plan("in/", "out/", "plan.json", to="plain:bf16")  # doctest: +SKIP
>>> for k in range(n):                                           # doctest: +SKIP
...     jobs.run_shard("plan.json", k)
>>> jobs.finish("plan.json")                                     # doctest: +SKIP

``ckptkit.ray`` runs the jobs as Ray tasks.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any, Dict, List, Sequence, Union

from ckptkit._ckptkit import Error, UsageError, _cli_main

PathLike = Union[str, "os.PathLike[str]"]

# convert's options, by keyword: (flag, kind)
_OPTIONS = {
    "to": ("--to", "value"),
    "like": ("--like", "path"),
    "qmap": ("--qmap", "path"),
    "shapes_from": ("--shapes-from", "path"),
    "include": ("--include", "list"),
    "exclude": ("--exclude", "list"),
    "only": ("--only", "list"),
    "rename": ("--rename", "list"),
    "max_shard_size": ("--max-shard-size", "value"),
    "force": ("--force", "flag"),
    "allow_lossy": ("--allow-lossy", "flag"),
    "no_hashes": ("--no-hashes", "flag"),
    "no_verify_input": ("--no-verify-input", "flag"),
    "assume_plain": ("--assume-plain", "flag"),
}


def convert_args(src: PathLike, dst: PathLike, options: Dict[str, Any]) -> List[str]:
    """``convert``'s command-line arguments for ``src``, ``dst`` and keyword options."""
    argv = [os.fspath(src), os.fspath(dst)]
    for key, value in options.items():
        if key not in _OPTIONS:
            raise TypeError(
                f"unknown option {key!r}; the options are: {', '.join(sorted(_OPTIONS))}"
            )
        flag, kind = _OPTIONS[key]
        if value is None or value is False:
            continue
        if kind == "flag":
            if value is not True:
                raise TypeError(f"{key} is True or False, not {value!r}")
            argv.append(flag)
        elif kind == "list":
            items = [value] if isinstance(value, (str, os.PathLike)) else list(value)
            for item in items:
                argv += [flag, os.fspath(item)]
        elif kind == "path":
            argv += [flag, os.fspath(value)]
        else:
            argv += [flag, str(value)]
    return argv


def _run(args: Sequence[str]) -> str:
    """Runs one ``migrate`` command in this process; returns its stdout, or
    raises with its error message (exit 2: ``UsageError``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        saved = os.dup(1), os.dup(2)
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            code = _cli_main(["migrate", *args])
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace").strip()
    if code != 0:
        message = stderr.removeprefix("error: ") or f"migrate {args[0]} failed (exit {code})"
        raise (UsageError if code == 2 else Error)(message)
    return stdout


def plan(src: PathLike, dst: PathLike, plan_file: PathLike, **options: Any) -> int:
    """Plans the conversion of ``src`` to the directory ``dst`` (``convert``'s
    keyword options: ``to``, ``like``, ``include``, ``max_shard_size``, ...)
    into ``plan_file``; returns the number of jobs."""
    text = _run(["plan", *convert_args(src, dst, options), "--plan-file", os.fspath(plan_file), "--json"])
    return len(json.loads(text)["jobs"])


def run_shard(plan_file: PathLike, k: int) -> Dict[str, Any]:
    """Runs job ``k`` (from 0) of a plan; returns its record (``shard``,
    ``size``, ``blake3``, ``already_done``, ``lossy_layers``)."""
    return json.loads(_run(["run-shard", os.fspath(plan_file), str(int(k)), "--json"]))


def finish(plan_file: PathLike) -> Dict[str, Any]:
    """Checks every job and commits the output directory; returns
    ``output``, ``files`` and ``warnings``."""
    return json.loads(_run(["finish", os.fspath(plan_file), "--json"]))

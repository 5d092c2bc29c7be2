"""A pool of long-lived helper processes answering JSON requests under per-request deadlines.

Both verifiers that run untrusted or unbounded work use it: the sandbox (`sandbox.py`: one request per
program) and the math verifier (`math.py`: one request per answer). A helper prints one JSON "hello"
line when ready, then answers one JSON line per request line (`_serve.serve` is that side). Why
processes and not threads: a request can hang inside C code that no signal interrupts, and the only
safe bound is to kill the process running it. A helper that misses a deadline is killed (its whole
session) and a replacement is spawned at once, so its start-up overlaps whatever the caller does
next instead of delaying the next request by the full start-up time.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["SCRUBBED_ENV", "WorkerPool"]

T = TypeVar("T")
# The environment helpers that handle untrusted input start from: nothing of the caller's (API keys and
# tokens would otherwise sit in every helper's memory, and in every process it forks).
SCRUBBED_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


class _Worker:
    """One helper process slot: the process (restarted as needed), its read buffer and hello."""

    def __init__(self, argv: list[str], env: dict[str, str] | None):
        self.argv, self.env = argv, env
        self.proc: subprocess.Popen | None = None
        self.buf = b""
        self.hello: dict[str, Any] | None = None

    def spawn(self) -> None:
        """Start the process without waiting for its hello (`ensure_ready` waits)."""
        spawn = lambda: subprocess.Popen(
            [*self.argv, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C aimed at the trainer must not kill jobs half-way
            cwd="/",
            env=self.env,
        )
        self.proc = _from_launcher_thread(spawn)
        self.buf, self.hello = b"", None

    def ensure_ready(self, timeout: float) -> None:
        """A live process that has said hello, spawning one if needed."""
        if self.proc is not None and self.proc.poll() is not None:
            self.kill()
        if self.proc is None:
            self.spawn()
        if self.hello is None:
            self.hello = self._read_line(time.monotonic() + timeout)
            if self.hello is None:
                try:  # an EOF (it died) rather than silence (it hangs)? then it is exiting now
                    code = self.proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    code = None
                self.kill()
                why = (
                    f"exited with code {code}" if code is not None else f"did not start within {timeout:.0f}s"
                )
                raise RuntimeError(f"helper process {self.argv!r} {why} (its stderr says why)")

    def call(
        self, request: dict[str, Any], deadline_s: float, startup_timeout: float
    ) -> dict[str, Any] | None:
        self.ensure_ready(startup_timeout)
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:  # it died since `ensure_ready` looked
            reply = None
        else:
            reply = self._read_line(time.monotonic() + deadline_s)
        if reply is None:  # missed its deadline or died: the only safe state is a fresh process
            self.kill()
            self.spawn()
        return reply

    def _read_line(self, deadline: float) -> dict[str, Any] | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()
        self.proc, self.buf, self.hello = None, b"", None


_launcher: queue.Queue | None = None
_launcher_lock = threading.Lock()


def _from_launcher_thread(fn: Callable[[], T]) -> T:
    """Run `fn` on one long-lived thread. Helpers die with their parent via PR_SET_PDEATHSIG, which
    fires when the *thread* that started them exits: a helper started from a short-lived caller thread
    would be killed, maybe in the middle of another thread's request."""
    global _launcher
    with _launcher_lock:
        if _launcher is None:
            _launcher = queue.Queue()

            def serve(requests: queue.Queue) -> None:
                while True:
                    job, box, done = requests.get()
                    try:
                        box.append(job())
                    except BaseException as exc:
                        box.append(exc)
                    done.set()

            threading.Thread(target=serve, args=(_launcher,), name="frl-launcher", daemon=True).start()
    box: list = []
    done = threading.Event()
    _launcher.put((fn, box, done))
    done.wait()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


class WorkerPool:
    """`size` helper processes started lazily from `argv` (the parent's pid is appended); thread-safe.

    `call` / `map` send requests to idle helpers; a request whose helper does not answer within
    `deadline_s` (counted from when the helper got it, not from when it was queued) yields None and
    the helper is replaced. Start-up (`startup_timeout`) is not charged to the request's deadline.
    """

    def __init__(
        self, argv: list[str], size: int, env: dict[str, str] | None = None, startup_timeout: float = 120.0
    ):
        if size < 1:
            raise ValueError(f"worker pool size must be >= 1, got {size}")
        self.size, self.startup_timeout = size, startup_timeout
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()  # warm helpers first
        self._all = [_Worker(argv, env) for _ in range(size)]
        for worker in self._all:
            self._idle.put(worker)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def call(self, request: dict[str, Any], deadline_s: float) -> dict[str, Any] | None:
        worker = self._idle.get()
        try:
            return worker.call(request, deadline_s, self.startup_timeout)
        finally:
            self._idle.put(worker)

    def map(self, requests: list[dict[str, Any]], deadline_s: float) -> list[dict[str, Any] | None]:
        """Replies in request order, computed by up to `size` helpers in parallel."""
        if len(requests) <= 1 or self.size == 1:
            return [self.call(r, deadline_s) for r in requests]
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.size, thread_name_prefix="frl-pool")
        return list(self._executor.map(lambda r: self.call(r, deadline_s), requests))

    def hello(self) -> dict[str, Any]:
        """The ready message of a started helper (starting one if needed)."""
        worker = self._idle.get()
        try:
            worker.ensure_ready(self.startup_timeout)
            return dict(worker.hello or {})
        finally:
            self._idle.put(worker)

    def start_all(self) -> None:
        """Start every helper now (in parallel) instead of on first use."""
        self.map([{"ping": True}] * self.size, deadline_s=self.startup_timeout)

    def pids(self) -> list[int]:
        """Process ids of the helpers alive now (including replacements still starting)."""
        return [w.proc.pid for w in self._all if w.alive()]

    def hellos(self) -> list[dict[str, Any]]:
        """Ready messages of the helpers that have said hello."""
        return [dict(w.hello) for w in self._all if w.alive() and w.hello is not None]

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
        for worker in self._all:
            worker.kill()

    def __del__(self) -> None:
        try:
            for worker in self._all:
                worker.kill()
        except Exception:
            pass

"""Run untrusted Python programs against tests: isolated, bounded in time and resources, in parallel.

Why this shape. A GRPO step verifies hundreds of generated programs, and the trainer process (threads,
CUDA, gigabytes of memory) must never fork itself. Instead a pool of small long-lived *workers*
(`python -I sandbox.py`, stdlib only, common modules preloaded) receives jobs over a pipe, and for
every job forks once:

    worker (root; own mount + network namespace: read-only tree, private /tmp; a child subreaper)
      └─ harness: PID 1 of a fresh PID (+ IPC) namespace, own session, rlimits, unprivileged uid;
         runs the program, then the tests

Containment, strongest first, each used where the platform allows it (`SandboxPool.capabilities()`):
- PID namespace: when the harness (its init) exits or is killed, the kernel kills every process in
  it, including children that called setsid() or double-forked; nothing outlives the call.
- Unprivileged uid (root only): one uid per worker, claimed with a lock file so that concurrent pools
  never share one. File permissions then apply and RLIMIT_NPROC counts that uid alone. Without a PID
  namespace, every process of that uid is killed after the job (kill(-1) as the uid), and orphans,
  which come back to the worker as child subreaper, are killed and reaped.
- Mount namespace: the whole tree is read-only; /tmp, /var/tmp and /dev/shm are fresh private tmpfs
  mounts, so a program can write only inside its own working directory, removed after the job. An
  interpreter under a private directory (pyenv in /root) is made reachable for the sandbox uid.
- Network namespace: no interface but a downed loopback, so connections fail. Without it, socket
  creation is refused inside the interpreter (best effort: `_socket` gets through).
- Always: rlimits (address space, CPU seconds, file size, open files, no core dumps), a wall-clock
  deadline after which the harness and its process group are SIGKILLed, and an output cap.

The pass signal cannot come from the exit code or from stdout: the worker puts a per-job random nonce
in a pipe; the harness reads it only after the tests ran to completion and echoes it on a second pipe;
the worker accepts exactly that nonce. While the program runs, the nonce is in no Python object of
its process (frames and `gc` reveal nothing), so `sys.exit(0)`, `os._exit(0)`, killed parents, patched
`AssertionError` / `os._exit`, swallowed signals, or writing guesses to every descriptor all end as
not passed. A program that deliberately reads the harness's nonce descriptor (fd 4) and writes it to
fd 3 could forge a pass: nothing short of running the tests outside the program's interpreter stops
that.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import queue
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STATUSES = ("passed", "failed", "timeout", "error")


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


# --------------------------------------------------------------------------------------------------
# Generic pool of JSON-speaking helper processes with per-request deadlines (also used by math.py).
# --------------------------------------------------------------------------------------------------


class _Worker:
    def __init__(self, argv: list[str], env: dict[str, str] | None):
        self.argv, self.env = argv, env
        self.proc: subprocess.Popen | None = None
        self.buf = b""
        self.hello: dict[str, Any] | None = None

    def start(self, timeout: float) -> None:
        spawn = lambda: subprocess.Popen(
            [*self.argv, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C aimed at the trainer must not kill jobs half-way
            cwd="/",
            env=self.env,
        )
        self.proc = _from_launcher_thread(spawn)
        self.buf = b""
        self.hello = self._read_line(time.monotonic() + timeout)
        if self.hello is None:
            self.kill()
            raise RuntimeError(f"helper process {self.argv!r} did not start within {timeout:.0f}s")

    def call(
        self, request: dict[str, Any], deadline_s: float, startup_timeout: float
    ) -> dict[str, Any] | None:
        if self.proc is None or self.proc.poll() is not None:
            self.start(startup_timeout)
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.kill()
            return None
        reply = self._read_line(time.monotonic() + deadline_s)
        if reply is None:  # missed its deadline or died: the only safe state is a fresh process
            self.kill()
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
        self.proc, self.buf = None, b""


_launcher: queue.Queue | None = None
_launcher_lock = threading.Lock()


def _from_launcher_thread(fn):
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
    """`size` helper processes started lazily from `argv`; thread-safe.

    A helper prints one JSON "hello" line when ready, then answers one JSON line per request. A helper
    that misses a request's deadline is killed (its whole session) and restarted on next use; the
    request then yields None.
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
            if worker.proc is None or worker.proc.poll() is not None:
                worker.start(self.startup_timeout)
            return dict(worker.hello or {})
        finally:
            self._idle.put(worker)

    def start_all(self) -> None:
        """Start every helper now (in parallel) instead of on first use."""
        self.map([{"ping": True}] * self.size, deadline_s=self.startup_timeout)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._all if w.proc is not None and w.proc.poll() is None]

    def hellos(self) -> list[dict[str, Any]]:
        """Ready messages of the helpers running now."""
        return [dict(w.hello or {}) for w in self._all if w.proc is not None and w.proc.poll() is None]

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


# --------------------------------------------------------------------------------------------------
# Parent side: the sandbox pool.
# --------------------------------------------------------------------------------------------------


class SandboxPool:
    """Parallel sandboxed execution: `workers` helper processes, each running one program at a time.

    `uid_base`: when running as root, each worker claims a free uid in [uid_base, uid_base + 1000)
    (lock files in the system temp dir) and runs programs as that uid/gid. `network=True` keeps the
    host network (default: none). `tmpfs_bytes` bounds the private /tmp of each worker.
    `namespaces=False` skips Linux namespaces (what a container without CAP_SYS_ADMIN gets), leaving the
    uid, subreaper and rlimit containment; the tests use it to check that fallback.
    """

    _warned = False

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
        }
        argv = [sys.executable, "-I", str(Path(__file__).resolve()), "--worker", json.dumps(options)]
        self._pool = WorkerPool(argv, workers, startup_timeout=60.0)
        self.workers = workers
        self._checked = False

    def run(self, program: str, tests: str, limits: SandboxLimits | None = None) -> ExecutionResult:
        return self.run_many([(program, tests)], limits)[0]

    def run_many(
        self, jobs: list[tuple[str, str]], limits: SandboxLimits | None = None
    ) -> list[ExecutionResult]:
        """Run (program, tests) pairs in parallel; results in input order."""
        if not self._checked:
            self._checked = True
            self.capabilities()  # starts a worker; warns once if programs could not import the stdlib
        limits = limits or SandboxLimits()
        requests = [{"program": p, "tests": t, "limits": asdict(limits)} for p, t in jobs]
        # The worker enforces the timeout itself; the pool deadline only catches a wedged worker.
        replies = self._pool.map(requests, deadline_s=limits.timeout + 30.0)
        return [
            ExecutionResult(**r) if r else ExecutionResult("error", "sandbox worker died or hung")
            for r in replies
        ]

    def capabilities(self) -> dict[str, Any]:
        """Which isolation mechanisms the workers obtained on this machine."""
        caps = self._pool.hello().get("capabilities", {})
        if caps.get("python_readable") is False and not SandboxPool._warned:
            SandboxPool._warned = True
            warnings.warn(
                f"sandboxed programs run as uid {caps.get('uid')}, which cannot read the Python installation "
                f"under {sys.base_prefix} (a private directory) and there is no mount namespace to expose it: "
                "programs can import only the preloaded modules (sandbox.PRELOAD). Install Python in a "
                "world-readable place, or run with CAP_SYS_ADMIN.",
                RuntimeWarning,
                stacklevel=2,
            )
        return caps

    def start(self) -> SandboxPool:
        """Start all workers now rather than on first use."""
        self._pool.start_all()
        return self

    def worker_pids(self) -> list[int]:
        return self._pool.pids()

    def worker_uids(self) -> list[int]:
        """The uids programs run as, one per running worker (empty when not root)."""
        return [h["capabilities"]["uid"] for h in self._pool.hellos() if h.get("capabilities", {}).get("uid")]

    def close(self) -> None:
        self._pool.close()


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
    tests: str,
    timeout: float = 5.0,
    limits: SandboxLimits | None = None,
    pool: SandboxPool | None = None,
) -> ExecutionResult:
    """Run `program` then `tests` (Python source, e.g. asserts) in the sandbox.

    Passed means the tests ran to completion without raising. `limits` overrides `timeout`.
    """
    limits = limits or SandboxLimits(timeout=timeout)
    return (pool or default_pool()).run(program, tests, limits)


# --------------------------------------------------------------------------------------------------
# Worker side (runs as `python -I sandbox.py --worker OPTIONS PARENT_PID`; stdlib only).
# --------------------------------------------------------------------------------------------------

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_MOVE = 1, 2, 4, 8, 32, 4096, 8192
MS_REC, MS_PRIVATE = 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 1
SETUP_FAILED = 117  # harness exit code when sandbox setup (not the program) failed

_libc = ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> bool:
    return _libc.unshare(ctypes.c_int(flags)) == 0


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> bool:
    enc = lambda s: None if s is None else s.encode()
    return _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) == 0


def _make_tree_readonly() -> bool:
    class MountAttr(ctypes.Structure):
        _fields_ = [
            ("attr_set", ctypes.c_uint64),
            ("attr_clr", ctypes.c_uint64),
            ("propagation", ctypes.c_uint64),
            ("userns_fd", ctypes.c_uint64),
        ]

    attr = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    if sys.platform == "linux" and os.uname().machine in ("x86_64", "aarch64"):
        if (
            _libc.syscall(
                SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)
            )
            == 0
        ):
            return True
    # Kernels before 5.12: remount each mount point read-only, keeping its nosuid/nodev/noexec.
    ok = True
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        target, options = fields[4].encode().decode("unicode_escape"), fields[5].split(",")
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        flags |= sum(
            f
            for name, f in (("nosuid", MS_NOSUID), ("nodev", MS_NODEV), ("noexec", MS_NOEXEC))
            if name in options
        )
        ok &= _mount(None, target, None, flags)
    return ok


def _python_paths() -> list[str]:
    paths = {sys.base_prefix, sys.prefix, sys.exec_prefix, os.path.dirname(sys.executable)}
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    paths.update(os.path.realpath(p) for p in list(paths))
    return sorted(paths)


def _blocked_ancestors(paths: list[str], uid: int) -> dict[str, set[str]]:
    """Directories on the way to `paths` that others cannot traverse -> the child names needed below them."""
    blocked: dict[str, set[str]] = {}
    for path in paths:
        parts = Path(path).parts
        for depth in range(1, len(parts)):
            ancestor = str(Path(*parts[:depth]))
            st = os.stat(ancestor)
            if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
                blocked.setdefault(ancestor, set()).add(parts[depth])
                break
    return blocked


def _mount_private_tmpfs(path: str, options: str) -> bool:
    """Cover `path` (/tmp, /var/tmp, /dev/shm) with a fresh tmpfs, keeping reachable what the worker needs.

    When the interpreter, the virtual environment or this project live below `path` (a checkout in
    /tmp, say), a plain tmpfs would hide them from the worker. Each such top-level entry is opened as an
    O_PATH descriptor before the tmpfs goes on, then bind-mounted back read-only through
    /proc/self/fd: the program sees those directories (read-only) and an otherwise empty `path`.
    """
    needed = {*_python_paths(), os.path.dirname(os.path.abspath(__file__))}
    prefix = path.rstrip("/") + "/"
    children = sorted({p[len(prefix) :].split("/", 1)[0] for p in needed if p.startswith(prefix)} - {""})
    fds = {child: os.open(prefix + child, os.O_PATH | os.O_DIRECTORY) for child in children}
    try:
        if not _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, options):
            return False
        for child, fd in fds.items():
            target = prefix + child
            os.mkdir(target)
            if not _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC):
                return False
            _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        return True
    finally:
        for fd in fds.values():
            os.close(fd)


def _expose_python(uid: int | None) -> bool:
    """Make the interpreter and its import paths reachable by the sandbox uid.

    An interpreter under a private directory (pyenv in /root, mode 0700) is unreadable once the program
    runs as an unprivileged uid. In the worker's own mount namespace, cover each blocking directory with
    a traversable tmpfs holding only the needed subdirectories, moved back in as bind mounts.
    """
    if uid is None:
        return True
    for _ in range(8):  # nested private directories: one level per round
        blocked = _blocked_ancestors(_python_paths(), uid)
        if not blocked:
            return True
        for ancestor, children in blocked.items():
            stash = tempfile.mkdtemp(dir="/tmp")
            kept = [c for c in sorted(children) if os.path.isdir(os.path.join(ancestor, c))]
            for child in kept:
                os.mkdir(os.path.join(stash, child))
                if not _mount(
                    os.path.join(ancestor, child), os.path.join(stash, child), None, MS_BIND | MS_REC
                ):
                    return False
            if not _mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755"):
                return False
            for child in kept:
                os.mkdir(os.path.join(ancestor, child))
                if not _mount(os.path.join(stash, child), os.path.join(ancestor, child), None, MS_MOVE):
                    return False
    return False


# Imported once in the worker so that forked programs find them in sys.modules: faster, and usable even
# where the sandbox uid cannot read the interpreter's files and no mount namespace is available.
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
    "fractions",
    "decimal",
    "statistics",
    "datetime",
    "json",
    "dataclasses",
    "enum",
    "numbers",
    "socket",
    "unittest",
)


def _probe(fn) -> bool:
    """Run `fn` in a throwaway child and report whether it succeeded (keeps the worker unchanged)."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if fn() else 1)
        except BaseException:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


def _claim_uid(base: int, span: int = 1000) -> tuple[int, int] | None:
    """A uid no other live sandbox worker holds: (uid, lock fd kept open for the worker's life)."""
    lock_dir = Path(tempfile.gettempdir()) / "filtered-rl-sandbox-uids"
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    for uid in range(base, base + span):
        fd = os.open(lock_dir / f"{uid}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return uid, fd
        except BlockingIOError:
            os.close(fd)
    return None


class _Isolation:
    """What this worker obtained at start-up; filled by `setup`."""

    def __init__(self) -> None:
        self.uid: int | None = None
        self.uid_lock: int | None = None
        self.net_namespace = self.mount_namespace = self.readonly_root = self.pid_namespace = False
        self.tmp_root = tempfile.gettempdir()
        self.private_shm = self.pidfd = self.python_exposed = False

    def setup(self, uid_base: int, network: bool, tmpfs_bytes: int, namespaces: bool) -> None:
        if os.geteuid() == 0:
            claimed = _claim_uid(uid_base)
            if claimed and _probe(lambda: (os.setgroups([]), os.setgid(claimed[0]), os.setuid(claimed[0]))):
                self.uid, self.uid_lock = claimed
                _kill_uid(self.uid)  # leftovers of a previous holder of this uid that was itself killed
            if not network and namespaces:
                self.net_namespace = _unshare(CLONE_NEWNET)
            if namespaces and _unshare(CLONE_NEWNS):
                # Private propagation first, so nothing below leaks into the host's mount table.
                self.mount_namespace = _mount(None, "/", None, MS_REC | MS_PRIVATE)
            if self.mount_namespace:
                # A scratch tmpfs for _expose_python's bind mounts, later covered by the real private /tmp.
                _mount_private_tmpfs("/tmp", "size=1m,mode=0700")
                self.python_exposed = _expose_python(self.uid)
                self.readonly_root = _make_tree_readonly()
                # Fresh writable tmpfs mounts on top of the read-only tree (the scratch one stays underneath).
                for path, opts in (
                    ("/tmp", f"size={tmpfs_bytes},mode=0755"),
                    ("/var/tmp", "size=1m,mode=0755"),
                    ("/dev/shm", f"size={min(tmpfs_bytes, 64 << 20)},mode=1777"),
                ):
                    if os.path.isdir(path):
                        mounted = _mount_private_tmpfs(path, opts)
                        self.private_shm |= mounted and path == "/dev/shm"
                self.tmp_root = "/tmp"
        self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY) if namespaces else None
        if not self.mount_namespace:
            self.python_exposed = self.uid is None or not _blocked_ancestors(_python_paths(), self.uid)
        self.pid_namespace = namespaces and _probe(self.fresh_pid_namespace)
        self.pidfd = hasattr(os, "pidfd_open") and _probe(
            lambda: os.close(os.pidfd_open(os.getpid())) or True
        )

    def fresh_pid_namespace(self) -> bool:
        """Make the next child PID 1 of a new PID namespace, with a new IPC namespace.

        unshare(CLONE_NEWPID) works once per target namespace, so first point our children's namespace
        back at our own (setns), then unshare again. The worker itself stays where it is; it only moves
        to a new IPC namespace, which it does not use, and the previous one dies with its last job.
        """
        _libc.setns(self.own_pid_ns, CLONE_NEWPID)
        return _unshare(CLONE_NEWPID | CLONE_NEWIPC)

    def capabilities(self) -> dict[str, Any]:
        return {
            "root": os.geteuid() == 0,
            "uid_drop": self.uid is not None,
            "uid": self.uid,
            "pid_namespace": self.pid_namespace,
            "net_namespace": self.net_namespace,
            "mount_namespace": self.mount_namespace,
            "readonly_root": self.readonly_root,
            "private_tmp": self.mount_namespace and self.tmp_root == "/tmp",
            "pidfd": self.pidfd,
            "python_readable": self.python_exposed,
        }


def _harness(program: str, tests: str, result_fd: int, nonce_fd: int) -> None:
    """Runs inside the sandboxed process. Everything it needs later is bound to locals first, so that a
    program rebinding builtins (`AssertionError`, `BaseException`, `os._exit`, `json.dumps`) cannot
    change what the harness does."""
    write, read, exit_, dumps = os.write, os.read, os._exit, json.dumps
    base_exception, compile_, exec_ = BaseException, compile, exec
    import builtins

    def report(status: str, exc: BaseException) -> None:
        try:
            reason = f"{type(exc).__name__}: {exc}"[:500]
        except base_exception:
            reason = type(exc).__name__
        try:
            write(result_fd, b"F" + dumps({"status": status, "reason": reason}).encode())
        finally:
            exit_(1)

    namespace = {"__name__": "__sandbox__", "__builtins__": builtins}
    try:
        exec_(compile_(program, "<program>", "exec"), namespace)
    except base_exception as exc:
        report("error", exc)
    try:
        exec_(compile_(tests, "<tests>", "exec"), namespace)
    except base_exception as exc:
        report("failed", exc)
    try:
        write(result_fd, read(nonce_fd, 64))
    except base_exception:
        exit_(1)
    exit_(0)


def _refuse_sockets() -> None:
    """Fallback when there is no network namespace (best effort: code using `_socket` gets through)."""
    import socket

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError("network access is disabled in the sandbox")

    socket.socket.__init__ = refuse
    socket.create_connection = refuse


def _become_untrusted(
    job: dict[str, Any], iso: _Isolation, workdir: str, res_w: int, out_w: int, nonce_r: int
) -> None:
    """In the harness process: apply every limit, then run the program. Never returns."""
    try:
        limits = SandboxLimits(**job["limits"])
        os.setsid()  # own session and group: kill(0, ...) and killpg reach this job only
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.dup2(res_w, 3)
        os.dup2(nonce_r, 4)
        os.closerange(5, 1 << 16)
        os.chdir(workdir)
        cpu = int(-(-(limits.cpu_seconds or limits.timeout) // 1))
        for which, value in (
            (resource.RLIMIT_AS, limits.memory_bytes),
            (resource.RLIMIT_CPU, (cpu, cpu + 1)),
            (resource.RLIMIT_FSIZE, limits.max_file_bytes),
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_NOFILE, limits.max_open_files),
        ):
            resource.setrlimit(which, value if isinstance(value, tuple) else (value, value))
        if iso.uid is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
            os.setgroups([])
            os.setgid(iso.uid)
            os.setuid(iso.uid)
        # After setuid (which clears it): die with the worker; never regain privileges via setuid binaries.
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(
            {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": workdir,
                "TMPDIR": workdir,
                "LANG": "C.UTF-8",
                "PYTHONDONTWRITEBYTECODE": "1",
            }
        )
        tempfile.tempdir = workdir
        if not iso.net_namespace and not job.get("network", False):
            _refuse_sockets()
        program, tests = job["program"], job["tests"]
    except BaseException:
        os._exit(SETUP_FAILED)
    _harness(program, tests, 3, 4)
    os._exit(SETUP_FAILED)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` (kill(-1) from a helper running as that uid; atomic w.r.t. fork)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _remove_owned(uid: int, directories: tuple[str, ...]) -> None:
    """Without a private /tmp: delete what the sandbox uid left at the top of world-writable directories."""
    for directory in directories:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
            except OSError:
                pass


def _kill(pid: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_available(fd: int, limit: int) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    try:
        while len(data) <= limit:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    return data


def _run_job(job: dict[str, Any], iso: _Isolation) -> dict[str, Any]:
    limits = SandboxLimits(**job["limits"])
    nonce = secrets.token_hex(16).encode()
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="job-", dir=iso.tmp_root)
    if iso.uid is not None:
        os.chown(workdir, iso.uid, iso.uid)
    res_r, res_w = os.pipe()
    out_r, out_w = os.pipe()
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    if iso.pid_namespace:  # the next child is PID 1 of a fresh PID namespace (and gets a fresh IPC one)
        iso.fresh_pid_namespace()
    harness = os.fork()
    if harness == 0:
        nonce = None  # the untrusted process must not find it in this frame  # noqa: F841
        try:
            _become_untrusted(job, iso, workdir, res_w, out_w, nonce_r)
        finally:  # whatever happens, the child never returns into the worker's loop
            os._exit(SETUP_FAILED)
    for fd in (res_w, out_w, nonce_r):
        os.close(fd)
    job.clear()
    pidfd = os.pidfd_open(harness) if iso.pidfd else None
    deadline = start + limits.timeout
    result, output, output_size, verdict = b"", b"", 0, None
    streams = {res_r, out_r}
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            verdict = ("timeout", f"exceeded the {limits.timeout:g}s wall-clock limit")
            break
        waiting = [*streams, pidfd] if pidfd is not None else list(streams)
        ready = select.select(waiting, [], [], remaining if pidfd is not None else min(remaining, 0.005))[0]
        if (pidfd is not None and pidfd in ready) or (pidfd is None and _exited(harness)):
            break
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                streams.discard(fd)
            elif fd == res_r:
                result += chunk
            else:
                output_size += len(chunk)
                output = (output + chunk)[-2000:]
        if output_size > limits.max_output_bytes:
            verdict = ("error", f"output exceeded {limits.max_output_bytes} bytes")
            break
        if len(result) > 1 << 16:
            verdict = ("error", "result channel flooded")
            break

    # Killing the harness, PID 1 of its namespace, makes the kernel kill everything in that namespace.
    # Without a namespace: its process group, every process of the sandbox uid, and any orphan that
    # came back to this worker (a child subreaper).
    if verdict is not None:
        _kill(harness)
        _kill(harness, group=True)
    if iso.uid is not None and not iso.pid_namespace:
        _kill_uid(iso.uid)
    _, status, usage = os.wait4(harness, 0)
    if not iso.pid_namespace:
        _kill_descendants()
    if iso.uid is not None and not iso.mount_namespace:
        _remove_owned(iso.uid, ("/tmp", "/var/tmp", "/dev/shm"))
    if pidfd is not None:
        os.close(pidfd)
    result += _read_available(res_r, 1 << 16)
    output = (output + _read_available(out_r, 1 << 16))[-2000:]
    os.close(res_r)
    os.close(out_r)
    shutil.rmtree(workdir, ignore_errors=True)
    if iso.private_shm:
        for entry in os.scandir("/dev/shm"):
            shutil.rmtree(entry.path, ignore_errors=True) if entry.is_dir() else os.unlink(entry.path)
    cpu_used = usage.ru_utime + usage.ru_stime
    status, reason = verdict or _classify(result, nonce, status, cpu_used, limits, output)
    return {"status": status, "reason": reason, "duration": round(time.monotonic() - start, 4)}


def _exited(pid: int) -> bool:
    """Whether our child `pid` has exited, leaving it unreaped (no pidfd available)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_descendants() -> None:
    """In the worker (a child subreaper, so orphans come back to it): SIGKILL and reap all descendants."""
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    while True:
        try:
            pids = children.read_text().split()
        except OSError:
            pids = []
        for pid in pids:
            _kill(int(pid))
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _classify(
    result: bytes, nonce: bytes, status: int, cpu_used: float, limits: SandboxLimits, output: bytes
) -> tuple[str, str]:
    if result == nonce:
        return "passed", ""
    if result.startswith(b"F"):
        try:
            report = json.loads(result[1:])
            if report["status"] in ("failed", "error"):
                return report["status"], str(report["reason"])
        except (ValueError, KeyError, TypeError):
            pass
        return "error", "unreadable failure report"
    if result:
        return "error", "unexpected data on the result channel"
    tail = output.decode(errors="replace").strip()[-300:]
    tail = f": {tail}" if tail else ""
    cpu_limit = int(-(-(limits.cpu_seconds or limits.timeout) // 1))
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        # RLIMIT_CPU sends SIGXCPU at the soft limit and SIGKILL at the hard one.
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= cpu_limit):
            return "timeout", f"exceeded the {cpu_limit}s CPU limit"
        return "error", f"killed by {signal.Signals(sig).name}{tail}"
    code = os.WEXITSTATUS(status)
    if code == SETUP_FAILED:
        return "error", "sandbox setup failed"
    return "error", f"exited with code {code} before the tests finished{tail}"


def _send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _worker_main(options: dict[str, Any], parent_pid: int) -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        return
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    iso = _Isolation()
    iso.setup(
        int(options["uid_base"]),
        bool(options["network"]),
        int(options["tmpfs_bytes"]),
        bool(options.get("namespaces", True)),
    )
    _send({"ready": True, "capabilities": iso.capabilities()})
    for line in sys.stdin.buffer:
        job = json.loads(line)
        if job.get("ping"):
            _send({"pong": True})
            continue
        job["network"] = bool(options["network"])
        try:
            reply = _run_job(job, iso)
        except Exception as exc:  # a sandbox bug must not take the worker down
            reply = {
                "status": "error",
                "reason": f"sandbox failure: {type(exc).__name__}: {exc}",
                "duration": 0.0,
            }
        _send(reply)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _worker_main(json.loads(sys.argv[2]), int(sys.argv[3]))

"""The zygote: the process every harness is forked from (`python -I -S _zygote.py OPTIONS`), stdlib only.

The sandbox worker execs it once, after its isolation setup: the zygote inherits the worker's mount
and network namespaces and its uid, but none of its memory. Why: a fork costs in proportion to the
memory the forking process has mapped (page tables to copy, ~170 ns per page here) and to every page
either side writes afterwards (a copy-on-write fault each), so the process that forks must be small
and do little. A fresh `-S` interpreter holding only the modules programs commonly import has ~7 MB of
private memory in ~22 MB mapped (a worker that forked programs itself after its start-up code and
`site`'s imports, as before the zygote, had ~14 MB in ~29 MB), and its loop below writes a few dozen
pages per job. Everything the harnesses share is prepared here once (modules, environment,
signal dispositions, no-new-privileges, `gc.freeze()` so that no collection walks the shared heap).

Per job, over the socket from the worker: an 8-byte length with the harness's three pipe ends attached
(SCM_RIGHTS), then the job (`pack_job`: a flat binary layout, because decoding JSON in the harness
cost ~60 page faults of its ~300). The zygote forks the harness and answers its pid; it sends one
byte when the harness has exited (still unreaped, so the worker can kill it by pid until then); on the
worker's reply it kills the harness's process group, reaps it (and, without a PID namespace,
everything the job left: the zygote is their child subreaper), then answers the wait status and the
harness's CPU seconds.

The harness runs the program and then the tests in one interpreter; the pass signal is a per-job nonce
that `_harness` echoes only after the tests completed (see `_sandbox_worker.py`).
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import resource
import signal
import socket
import struct
import sys
from typing import Any

try:
    from . import _harness, _landlock, _linux, _seccomp
except ImportError:  # run as a script (the normal case): import the siblings, then forget the path
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    import _harness
    import _landlock
    import _linux
    import _seccomp

    sys.path.pop()

SETUP_FAILED = 117  # harness exit code when sandbox setup (not the program) failed
# The programs' environment (HOME and TMPDIR are set per job): set once here, inherited by each harness.
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


_HEAD = struct.Struct("<IIB")  # lengths of program, workdir (UTF-8); number of rlimits


def pack_job(program: str, workdir: str, rlimits: list[tuple[int, int, int]]) -> bytes:
    """The job as the harness reads it: header, (resource, soft, hard) int64 triples, then the texts.
    The tests are not in it: they reach the harness through their own pipe (see `_harness.py`)."""
    texts = [t.encode("utf-8", "surrogatepass") for t in (program, workdir)]
    numbers = struct.pack(f"<{3 * len(rlimits)}q", *(n for triple in rlimits for n in triple))
    return _HEAD.pack(*(len(t) for t in texts), len(rlimits)) + numbers + b"".join(texts)


def unpack_job(payload: bytes) -> tuple[str, str, list[tuple[int, int, int]]]:
    """(program, workdir, rlimits) from `pack_job`'s bytes."""
    n_program, n_workdir, n_rlimits = _HEAD.unpack_from(payload)
    numbers = struct.unpack_from(f"<{3 * n_rlimits}q", payload, _HEAD.size)
    rlimits = [numbers[i : i + 3] for i in range(0, len(numbers), 3)]
    start = _HEAD.size + 24 * n_rlimits
    program = payload[start : start + n_program].decode("utf-8", "surrogatepass")
    workdir = payload[start + n_program : start + n_program + n_workdir].decode("utf-8", "surrogatepass")
    return program, workdir, rlimits


# --------------------------------------------------------------------------------------------------
# In the harness.
# --------------------------------------------------------------------------------------------------


def _refuse_sockets() -> None:
    """Fallback when there is no network namespace (best effort: code using `_socket` gets through)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError("network access is disabled in the sandbox")

    socket.socket.__init__ = refuse
    socket.create_connection = refuse


def _become_untrusted(payload: bytes, fds: list[int], box: dict[str, Any]) -> None:
    """In the harness process: the per-process system calls, then the program. Never returns.

    The job is decoded here, so that its objects are allocated in this process, not in the zygote.
    `box` holds what the zygote prepared (see `main`). Order matters: what needs root (joining the
    cgroup) comes before the uid drop; Landlock and seccomp come last: they are irreversible.
    """
    try:
        program, workdir, rlimits = unpack_job(payload)
        os.setsid()  # own session and group: kill(0, ...) and killpg reach this job only
        for fd in box["cgroup_fds"]:
            os.write(fd, b"0")
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in fds]  # out of the way of 0..5
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for target, fd in zip((3, 1, 4, 5), high):  # result, output, nonce, tests
            os.dup2(fd, target)
        os.dup2(1, 2)
        os.chdir(workdir)
        if workdir != box["usual_workdir"]:  # else the zygote set them once
            os.environ["HOME"] = os.environ["TMPDIR"] = workdir
        for which, soft, hard in rlimits:
            resource.setrlimit(which, (soft, hard))
        if box["uid"] is not None:
            os.setgroups([])
            os.setgid(box["uid"])
            os.setuid(box["uid"])
        _linux.libc.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
        _linux.prctl(_linux.PR_SET_DUMPABLE, 0)  # the program's process cannot read this one's memory
        if box["landlock"] is not None and not _landlock.restrict_self(box["landlock"]):
            raise OSError("Landlock failed")
        os.closerange(6, 1 << 16)
        if box["seccomp"] is not None and not box["seccomp"].install():
            raise OSError("seccomp failed")
        if box["refuse_sockets"]:
            _refuse_sockets()
    except BaseException:
        os._exit(SETUP_FAILED)
    _harness.start(program, 3, 4, 5)
    os._exit(SETUP_FAILED)


# --------------------------------------------------------------------------------------------------
# In the zygote.
# --------------------------------------------------------------------------------------------------


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes from a stream socket (EOFError if the other end closes first)."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the other end of the zygote channel is gone")
        data += chunk
    return data


def _kill_descendants() -> None:
    """In the zygote (a child subreaper, so orphans come back to it): SIGKILL and reap all descendants."""
    children = f"/proc/{os.getpid()}/task/{os.getpid()}/children"
    while True:
        try:
            with open(children) as f:
                pids = f.read().split()
        except OSError:
            pids = []
        for pid in pids:
            _linux.kill(int(pid))
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _prepare(preload: list[str], path: list[str], usual_workdir: str | None) -> list[str]:
    """Once: everything each harness would otherwise redo after its fork; the modules that loaded."""
    import _sitebuiltins  # what `site` (skipped by -S) would have added: programs may call exit()
    import builtins

    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")
    builtins.help = _sitebuiltins._Helper()
    sys.path[:] = path  # the worker's import paths (with site-packages, without running .pth hooks)
    loaded = []
    for name in preload:
        try:
            __import__(name)
            loaded.append(name)
        except ImportError:
            pass
    # Warm up what is initialised lazily on first use, which every harness would otherwise redo: the
    # first compile() builds the ~120 `ast` node types (~2 ms, measured), then exec and json's codecs.
    namespace: dict[str, Any] = {}
    exec(compile("def f(x):\n    return [x, {'k': x}]\n", "<warm-up>", "exec"), namespace)
    exec(compile("assert f(1)[0] == 1\n", "<warm-up>", "exec"), namespace)
    unpack_job(pack_job("x", "/", [(1, 2, 3)]))
    json.dumps({"status": "failed", "reason": "AssertionError: "})
    _harness.decode(json.loads(json.dumps(_harness.encode([1, 2.5, "x", (None,), {3: b""}]))))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(SANDBOX_ENV)
    if usual_workdir:
        os.environ["HOME"] = os.environ["TMPDIR"] = usual_workdir
    _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)  # inherited: no harness regains privileges via exec
    gc.collect()
    gc.freeze()  # collections in a harness leave the shared heap alone (no copy-on-write of it)
    return loaded


def main(options: dict[str, Any]) -> None:
    _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the worker
    if os.getppid() != options["worker_pid"]:
        return
    _linux.prctl(_linux.PR_SET_CHILD_SUBREAPER, 1)  # orphans of a harness come back here
    sock = socket.socket(fileno=options["fd"])
    uid, pid_namespace = options["uid"], options["pid_namespace"]
    own_pid_ns = options["pid_ns_fd"] if pid_namespace else -1
    bpf = bytes.fromhex(options["seccomp_bpf"]) if options["seccomp_bpf"] else None
    box = {  # what each harness needs, prepared once (see `_become_untrusted`)
        "uid": uid,
        "usual_workdir": options["usual_workdir"],
        "cgroup_fds": options["cgroup_fds"],
        "landlock": options["landlock_fd"],
        "seccomp": _seccomp.LoadedFilter(bpf) if bpf else None,
        # Without seccomp or a network namespace, the interpreter-level block is all there is.
        "refuse_sockets": options["refuse_sockets"] and not bpf,
    }
    report = json.dumps(_prepare(options["preload"], options["sys_path"], options["usual_workdir"])).encode()
    sock.sendall(len(report).to_bytes(4, "little") + report)
    recv_fds, fork, send = socket.recv_fds, os.fork, sock.sendall
    while True:
        try:
            head, fds, _, _ = recv_fds(sock, 8, 4)
            if not head:
                return
            if len(head) < 8:
                head += recv_exact(sock, 8 - len(head))
            payload = recv_exact(sock, int.from_bytes(head, "little"))
        except (EOFError, OSError):
            return
        if pid_namespace:  # the next child is PID 1 of a fresh PID namespace (and gets a fresh IPC one)
            _linux.fresh_pid_namespace(own_pid_ns)
        harness = fork()
        if harness == 0:
            try:
                _become_untrusted(payload, fds, box)
            finally:  # whatever happens, the child never returns into the zygote's loop
                os._exit(SETUP_FAILED)
        for fd in fds:
            os.close(fd)
        del payload
        send(harness.to_bytes(4, "little"))
        os.waitid(os.P_PID, harness, os.WEXITED | os.WNOWAIT)
        send(b"x")
        recv_exact(sock, 1)
        # Killing the harness, PID 1 of its namespace, made the kernel kill everything in that namespace.
        # Without a namespace: its process group, every process of the sandbox uid, and any orphan that
        # came back to the zygote.
        _linux.kill(harness, group=True)
        _, status, usage = os.wait4(harness, 0)
        if not pid_namespace:
            if uid is not None:
                _linux.kill_uid(uid)
            _kill_descendants()
        send(struct.pack("<id", status, usage.ru_utime + usage.ru_stime))


if __name__ == "__main__" and len(sys.argv) == 2:
    main(json.loads(sys.argv[1]))

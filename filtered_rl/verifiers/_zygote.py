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
    from . import _linux
except ImportError:  # run as a script (the normal case): import the sibling, then forget the path
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    import _linux

    sys.path.pop()

SETUP_FAILED = 117  # harness exit code when sandbox setup (not the program) failed
# The programs' environment (HOME and TMPDIR are set per job): set once here, inherited by each harness.
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


_HEAD = struct.Struct("<IIIB")  # lengths of program, tests, workdir (UTF-8); number of rlimits


def pack_job(program: str, tests: str, workdir: str, rlimits: list[tuple[int, int, int]]) -> bytes:
    """The job as the harness reads it: header, (resource, soft, hard) int64 triples, then the texts."""
    texts = [t.encode("utf-8", "surrogatepass") for t in (program, tests, workdir)]
    numbers = struct.pack(f"<{3 * len(rlimits)}q", *(n for triple in rlimits for n in triple))
    return _HEAD.pack(*(len(t) for t in texts), len(rlimits)) + numbers + b"".join(texts)


def unpack_job(payload: bytes) -> tuple[str, str, str, list[tuple[int, int, int]]]:
    """(program, tests, workdir, rlimits) from `pack_job`'s bytes."""
    n_program, n_tests, n_workdir, n_rlimits = _HEAD.unpack_from(payload)
    numbers = struct.unpack_from(f"<{3 * n_rlimits}q", payload, _HEAD.size)
    rlimits = [numbers[i : i + 3] for i in range(0, len(numbers), 3)]
    start = _HEAD.size + 24 * n_rlimits
    ends = (start + n_program, start + n_program + n_tests, start + n_program + n_tests + n_workdir)
    program, tests, workdir = (
        payload[a:b].decode("utf-8", "surrogatepass") for a, b in zip((start, *ends[:2]), ends)
    )
    return program, tests, workdir, rlimits


# --------------------------------------------------------------------------------------------------
# In the harness.
# --------------------------------------------------------------------------------------------------


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

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError("network access is disabled in the sandbox")

    socket.socket.__init__ = refuse
    socket.create_connection = refuse


def _become_untrusted(
    payload: bytes, fds: list[int], uid: int | None, refuse_sockets: bool, usual_workdir: str | None
) -> None:
    """In the harness process: the per-process system calls, then the program. Never returns.

    The job is decoded here, so that its objects are allocated in this process, not in the zygote.
    """
    try:
        program, tests, workdir, rlimits = unpack_job(payload)
        res_w, out_w, nonce_r = fds
        os.setsid()  # own session and group: kill(0, ...) and killpg reach this job only
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.dup2(res_w, 3)
        os.dup2(nonce_r, 4)
        os.closerange(5, 1 << 16)
        os.chdir(workdir)
        if workdir != usual_workdir:  # else the zygote set them once
            os.environ["HOME"] = os.environ["TMPDIR"] = workdir
        for which, soft, hard in rlimits:
            resource.setrlimit(which, (soft, hard))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _linux.libc.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
        if refuse_sockets:
            _refuse_sockets()
    except BaseException:
        os._exit(SETUP_FAILED)
    _harness(program, tests, 3, 4)
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
    unpack_job(pack_job("x", "y", "/", [(1, 2, 3)]))
    json.dumps({"status": "failed", "reason": "AssertionError: "})
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
    uid, pid_namespace, refuse = options["uid"], options["pid_namespace"], options["refuse_sockets"]
    usual_workdir = options["usual_workdir"]
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY) if pid_namespace else -1
    report = json.dumps(_prepare(options["preload"], options["sys_path"], usual_workdir)).encode()
    sock.sendall(len(report).to_bytes(4, "little") + report)
    recv_fds, fork, send = socket.recv_fds, os.fork, sock.sendall
    while True:
        try:
            head, fds, _, _ = recv_fds(sock, 8, 3)
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
                _become_untrusted(payload, fds, uid, refuse, usual_workdir)
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

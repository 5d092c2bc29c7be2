"""Sandbox worker: `python -I _sandbox_worker.py --worker OPTIONS PARENT_PID`, stdlib only.

Started by `sandbox.SandboxPool` through `pool.WorkerPool`. At start-up it claims a uid and enters its
namespaces (`_isolation.py`), then execs its zygote (`_zygote.py`), and answers one job (program +
tests + limits) per request line. Per job the zygote forks one harness:

    worker (root; own mount + network namespace: read-only tree, private /tmp)
      └─ zygote (same namespaces; a fresh, small interpreter; a child subreaper)
           └─ harness: PID 1 of a fresh PID (+ IPC) namespace, own session, rlimits, unprivileged uid;
              runs the program, then the tests

The worker itself never forks per job: it makes the job's temp dir and pipes, hands them to the zygote,
watches the output and the deadline, kills the harness when it overruns, cleans up and classifies.
`_zygote.py` says why the forking is done by a separate process.

Containment when a mechanism is missing: without a PID namespace, every process of the sandbox uid is
killed after the job (kill(-1) as that uid), and orphans, which come back to the zygote as child
subreaper, are killed and reaped; without a mount namespace, what the uid left in the shared temp
directories is deleted; without a network namespace, socket creation is refused inside the
interpreter (best effort: `_socket` gets through).

The pass signal cannot come from the exit code or from stdout: the worker puts a per-job random nonce
in a pipe; the harness reads it only after the tests ran to completion and echoes it on a second pipe;
the worker accepts exactly that nonce. While the program runs, the nonce is in no Python object of
its process (the zygote never sees it; frames and `gc` reveal nothing), so `sys.exit(0)`,
`os._exit(0)`, killed parents, patched `AssertionError` / `os._exit`, swallowed signals, or writing
guesses to every descriptor all end as not passed. A program that deliberately reads the harness's
nonce descriptor (fd 4) and writes it to fd 3 could forge a pass: nothing short of running the tests
outside the program's interpreter stops that.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from typing import Any

try:
    from . import _isolation, _linux, _seccomp, _serve, _zygote
except ImportError:  # run as a script with -I (the normal case): import the siblings, then forget the path
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    import _isolation
    import _linux
    import _seccomp
    import _serve
    import _zygote

    sys.path.pop()

Isolation = _isolation.Isolation
ZYGOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_zygote.py")
SETUP_FAILED = _zygote.SETUP_FAILED
PIPE_DEFAULT, F_SETPIPE_SZ = 1 << 16, 1031


class ZygoteLost(Exception):
    """The channel to the zygote broke: it died (killed from outside, or a sandbox bug) or is dying.

    Whether it is already a zombie is a race, so the break itself is the signal: the worker then exits
    and the pool starts a fresh worker (and zygote), which is the only known-good state.
    """


class Zygote:
    """The worker's handle on its zygote (`_zygote.py` has the protocol): one `start`/`reap` per job."""

    def __init__(self, iso: Isolation, network: bool, preload: list[str], seccomp_bpf: bytes | None):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        inherited = [theirs.fileno(), *iso.cgroup.procs_fds]
        inherited += [fd for fd in (iso.own_pid_ns, iso.landlock_ruleset) if fd is not None]
        options = {
            "fd": theirs.fileno(),
            "worker_pid": os.getpid(),
            "uid": iso.uid,
            "pid_namespace": iso.pid_namespace,
            "pid_ns_fd": iso.own_pid_ns,
            "cgroup_fds": iso.cgroup.procs_fds,
            "landlock_fd": iso.landlock_ruleset,
            "seccomp_bpf": seccomp_bpf.hex() if seccomp_bpf else "",
            "refuse_sockets": not iso.net_namespace and not network,
            "preload": preload,
            "sys_path": sys.path,
            "usual_workdir": usual_workdir(iso),
        }
        argv = [sys.executable, "-I", "-S", ZYGOTE, json.dumps(options)]
        pid = os.fork()
        if pid == 0:
            try:
                for fd in inherited:
                    os.set_inheritable(fd, True)
                devnull = os.open(os.devnull, os.O_RDWR)
                os.dup2(devnull, 0)  # the parent must see EOF on our protocol pipes when the worker goes
                os.dup2(devnull, 1)
                os.execv(sys.executable, argv)
            finally:
                os._exit(127)
        theirs.close()
        self.pid, self.sock = pid, ours
        size = int.from_bytes(_zygote.recv_exact(ours, 4), "little")
        self.preloaded: list[str] = json.loads(_zygote.recv_exact(ours, size))

    def start(self, payload: bytes, fds: list[int]) -> int:
        """Fork a harness for `payload` with `fds` (result, output, nonce, tests); its pid."""
        try:
            socket.send_fds(self.sock, [len(payload).to_bytes(8, "little")], fds)
            self.sock.sendall(payload)
            return int.from_bytes(_zygote.recv_exact(self.sock, 4), "little")
        except (EOFError, OSError) as exc:
            raise ZygoteLost from exc

    def fileno(self) -> int:
        """Readable once the harness has exited (for select)."""
        return self.sock.fileno()

    def reap(self) -> tuple[int, float]:
        """After the harness exited or was killed: (wait status, CPU seconds it used)."""
        try:
            _zygote.recv_exact(self.sock, 1)
            self.sock.sendall(b"r")
            status, cpu = struct.unpack("<id", _zygote.recv_exact(self.sock, 12))
        except (EOFError, OSError) as exc:
            raise ZygoteLost from exc
        return status, cpu


def usual_workdir(iso: Isolation) -> str | None:
    """One fixed working directory for every job when /tmp is this worker's own (nobody else can
    create it between jobs): the zygote then sets HOME and TMPDIR once, not each harness."""
    return "/tmp/job" if iso.minimal_root else None


def _make_workdir(iso: Isolation) -> str:
    """The job's empty working directory, owned by the sandbox uid."""
    usual = usual_workdir(iso)
    try:
        if usual is None:
            raise FileExistsError
        os.mkdir(usual, 0o700)
        workdir = usual
    except FileExistsError:  # shared /tmp, or a previous job's leftovers could not be removed
        workdir = tempfile.mkdtemp(prefix="job-", dir=iso.tmp_root)
    if iso.uid is not None:
        os.chown(workdir, iso.uid, iso.uid)
    return workdir


def _rlimits(limits: dict[str, Any], cpu: int, uid: int | None) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) for one job."""
    rlimits = [
        (resource.RLIMIT_AS, int(limits["memory_bytes"]), int(limits["memory_bytes"])),
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard one
        (resource.RLIMIT_FSIZE, int(limits["max_file_bytes"]), int(limits["max_file_bytes"])),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NOFILE, int(limits["max_open_files"]), int(limits["max_open_files"])),
    ]
    if uid is not None:  # counts processes per uid: only meaningful for a uid of our own
        rlimits.append((resource.RLIMIT_NPROC, int(limits["max_processes"]), int(limits["max_processes"])))
    return rlimits


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


def _remove_dir(path: str) -> None:
    try:
        os.rmdir(path)  # the common case: the program left nothing
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def run_job(job: dict[str, Any], iso: Isolation, zygote: Zygote) -> dict[str, Any]:
    """Run one (program, tests) pair in a fresh harness; {"status", "reason", "duration"}."""
    limits = job["limits"]
    timeout = float(limits["timeout"])
    cpu = int(-(-float(limits.get("cpu_seconds") or timeout) // 1))
    nonce = os.urandom(16).hex().encode()
    tests = job.pop("tests").encode("utf-8", "surrogatepass")
    start = time.monotonic()
    iso.cgroup.apply(int(limits["memory_bytes"]), int(limits["max_processes"]) + 2)
    workdir = _make_workdir(iso)
    res_r, res_w = os.pipe()
    out_r, out_w = os.pipe()
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    tests_r, tests_w = os.pipe()
    try:  # the tests wait in their pipe until the harness reads them (after the program ran)
        os.set_blocking(tests_w, False)
        if len(tests) > PIPE_DEFAULT:
            fcntl.fcntl(tests_w, F_SETPIPE_SZ, len(tests))
        fits = os.write(tests_w, tests) == len(tests) if tests else True
    except OSError:
        fits = False
    finally:
        os.close(tests_w)
    if not fits:
        for fd in (res_r, res_w, out_r, out_w, nonce_r, tests_r):
            os.close(fd)
        _remove_dir(workdir)
        return {
            "status": "error",
            "reason": f"tests of {len(tests)} bytes do not fit a pipe",
            "duration": 0.0,
        }
    payload = _zygote.pack_job(job.pop("program"), workdir, _rlimits(limits, cpu, iso.uid))
    try:
        harness = zygote.start(payload, [res_w, out_w, nonce_r, tests_r])
    finally:
        for fd in (res_w, out_w, nonce_r, tests_r):
            os.close(fd)
    del payload
    verdict, result, output = _watch(harness, zygote, res_r, out_r, start + timeout, limits)
    status, cpu_used = zygote.reap()
    if iso.uid is not None and not iso.mount_namespace:
        _remove_owned(iso.uid, ("/tmp", "/var/tmp", "/dev/shm"))
    result += _read_available(res_r, 1 << 16)
    output = (output + _read_available(out_r, 1 << 16))[-2000:]
    os.close(res_r)
    os.close(out_r)
    _remove_dir(workdir)
    if iso.minimal_root:
        for entry in os.scandir("/dev/shm"):
            shutil.rmtree(entry.path, ignore_errors=True) if entry.is_dir() else os.unlink(entry.path)
    status, reason = verdict or _classify(result, nonce, status, cpu_used, cpu, output)
    return {"status": status, "reason": reason, "duration": round(time.monotonic() - start, 4)}


def _watch(
    harness: int, zygote: Zygote, res_r: int, out_r: int, deadline: float, limits: dict[str, Any]
) -> tuple[tuple[str, str] | None, bytes, bytes]:
    """Collect the harness's result and output until it exits, breaks a limit, or the deadline passes
    (then kill it: it is not reaped before `Zygote.reap`, so its pid is still its own).
    (verdict or None, result, output tail)."""
    max_output = int(limits["max_output_bytes"])
    result, output, output_size, verdict = b"", b"", 0, None
    streams = {res_r, out_r}
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            verdict = ("timeout", f"exceeded the {float(limits['timeout']):g}s wall-clock limit")
            break
        ready = select.select([*streams, zygote], [], [], remaining)[0]
        if zygote in ready:  # the harness exited
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
        if output_size > max_output:
            verdict = ("error", f"output exceeded {max_output} bytes")
            break
        if len(result) > 1 << 16:
            verdict = ("error", "result channel flooded")
            break
    if verdict is not None:
        _linux.kill(harness)
        _linux.kill(harness, group=True)
    return verdict, result, output


def _classify(
    result: bytes, nonce: bytes, status: int, cpu_used: float, cpu_limit: int, output: bytes
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


def main(options: dict[str, Any], parent_pid: int) -> None:
    if not _serve.die_with_parent(parent_pid):
        return
    seccomp_bpf = _seccomp.compile_filter()  # before the new root: libseccomp is found on the host
    iso = Isolation()
    iso.setup(
        int(options["uid_base"]),
        bool(options["network"]),
        int(options["tmpfs_bytes"]),
        bool(options.get("namespaces", True)),
    )
    preload = list(options.get("preload", ()))
    if iso.python_unreadable:  # programs can import nothing else
        preload += list(options.get("preload_unreadable", ()))
    zygote = Zygote(iso, bool(options["network"]), preload, seccomp_bpf)

    def handle(job: dict[str, Any]) -> dict[str, Any]:
        try:
            return run_job(job, iso, zygote)
        except ZygoteLost:  # this job errs ("worker died"); the pool starts a fresh worker at once
            os._exit(70)

    def failure(exc: BaseException) -> dict[str, Any]:  # a sandbox bug must not take the worker down
        return {"status": "error", "reason": f"sandbox failure: {type(exc).__name__}: {exc}", "duration": 0.0}

    hello = {
        "ready": True,
        "capabilities": {**iso.capabilities(), "seccomp": seccomp_bpf is not None, "split_tests": True},
        "preloaded": zygote.preloaded,
        "zygote_pid": zygote.pid,
    }
    _serve.serve(handle, hello, failure)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    main(json.loads(sys.argv[2]), int(sys.argv[3]))

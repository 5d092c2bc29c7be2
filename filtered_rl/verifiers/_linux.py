"""The few Linux calls the sandbox needs that Python 3.11 lacks (prctl, unshare, setns, mount), plus
killing by uid. Stdlib only and small: both the worker (`_isolation.py`) and the zygote
(`_zygote.py`, which every harness is forked from) load it."""

from __future__ import annotations

import ctypes
import errno
import os
import signal

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38

libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def errno_name() -> str:
    """Symbolic name of the errno the last failed libc call left."""
    code = ctypes.get_errno()
    return errno.errorcode.get(code, str(code))


def prctl(option: int, value: int) -> bool:
    return libc.prctl(option, value, 0, 0, 0) == 0


def unshare(flags: int) -> bool:
    return libc.unshare(ctypes.c_int(flags)) == 0


def fresh_pid_namespace(own_pid_ns: int) -> bool:
    """Make the next child PID 1 of a new PID namespace, with a new IPC namespace.

    unshare(CLONE_NEWPID) works once per target namespace, so first point our children's namespace
    back at our own (`own_pid_ns`, an fd of /proc/self/ns/pid), then unshare again. The caller itself
    stays where it is; it only moves to a new IPC namespace, which it does not use, and the previous
    one dies with its last job.
    """
    libc.setns(own_pid_ns, CLONE_NEWPID)
    return unshare(CLONE_NEWPID | CLONE_NEWIPC)


def kill(pid: int, group: bool = False) -> None:
    """SIGKILL a process (or its process group), ignoring one that is already gone."""
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_uid(uid: int) -> None:
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

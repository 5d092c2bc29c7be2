"""The system-call filter every sandboxed program runs under (seccomp), compiled once per worker.

Why: namespaces hide the host, but a few calls reach past them or around the other mechanisms:
`socket()` (a Unix socket by file path crosses a network namespace, and without namespaces `_socket`
reaches TCP), io_uring (which makes sockets and opens files without those system calls), ptrace and
cross-process memory access, new namespaces (a program that makes a user namespace is root in it),
mounts, kernel keyrings, BPF, perf events and module loading. Denying them costs nothing measurable:
the filter is compiled by libseccomp (through `pyseccomp`) in the worker, and each harness loads the
compiled program with one prctl. Calls of another architecture (32-bit entry points on x86_64) kill
the process: libseccomp's default for a foreign architecture.

`socketpair()` stays allowed: it makes an unaddressed pair, which `multiprocessing` uses, and which
reaches nothing outside the job. Where libseccomp is missing, `compile_filter` returns None and the
pool reports `seccomp: False` (the in-interpreter socket block is then all that stops TCP in the
fallback).
"""

from __future__ import annotations

import ctypes
import errno
import os

PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
CLONE_NEWUSER = 0x10000000

DENIED = (
    "socket",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "kcmp",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "open_by_handle_at",
    "name_to_handle_at",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "acct",
    "swapon",
    "swapoff",
    "reboot",
)


def compile_filter() -> bytes | None:
    """The BPF program (raw `struct sock_filter` array), or None without libseccomp."""
    try:
        import pyseccomp as seccomp
    except (ImportError, OSError, AttributeError):  # the package, or libseccomp.so itself, is missing
        return None
    flt = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in DENIED:
        try:
            flt.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (OSError, ValueError, RuntimeError):  # a call this kernel/libseccomp does not know
            pass
    # clone3 passes its flags in memory, where no filter can see them: ENOSYS makes glibc fall back to
    # clone, whose flags are checked (no new user namespace).
    flt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    flt.add_rule(
        seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER)
    )
    read, write = os.pipe()
    try:
        with os.fdopen(write, "wb", closefd=False) as out:
            flt.export_bpf(out)
        os.close(write)
        write = -1
        data = b""
        while chunk := os.read(read, 1 << 16):
            data += chunk
        return data
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class LoadedFilter:
    """A compiled filter held ready in the zygote, so that each harness only makes the one call."""

    def __init__(self, bpf: bytes):
        self._buffer = ctypes.create_string_buffer(bpf, len(bpf))
        self._prog = _SockFprog(len(bpf) // 8, ctypes.addressof(self._buffer))
        self._libc = ctypes.CDLL(None, use_errno=True)

    def install(self) -> bool:
        """Apply the filter to this process and its future children (irreversible; needs no_new_privs)."""
        return self._libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(self._prog), 0, 0) == 0

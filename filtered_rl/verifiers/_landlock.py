"""Landlock, for the fallback without a mount namespace: what a program may read and write. Stdlib only.

Why not the `landlock` package: its one release is a development version that covers file rights
only; the kernel's ABI 4 adds TCP rules and ABI 6 scopes abstract Unix sockets and signals to the
sandbox, and both matter here. The three system calls take a few lines.

The worker builds the ruleset once (`ruleset`); every harness enforces it with one system call
(`restrict_self`) before the program runs, so a program reads only the interpreter's files and the
system's programs and libraries, and writes only below the worker's own temp directory. It works
without privileges (it needs no_new_privs, which the zygote sets) and stacks with everything else.
"""

from __future__ import annotations

import ctypes
import os
import struct

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446  # the same on x86_64 and aarch64
CREATE_RULESET_VERSION, RULE_PATH_BENEATH = 1, 1
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1, 2, 4, 8
TRUNCATE, IOCTL_DEV = 1 << 14, 1 << 15
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def abi_version() -> int:
    """The kernel's Landlock ABI (0: none, or disabled)."""
    version = _libc.syscall(
        SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION)
    )
    return max(int(version), 0)


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # EXECUTE .. MAKE_SYM (ABI 1)
    for needed, bit in ((2, 1 << 13), (3, TRUNCATE), (5, IOCTL_DEV)):  # REFER, TRUNCATE, IOCTL_DEV
        if abi >= needed:
            rights |= bit
    return rights


def ruleset(readable: list[str], writable: list[str]) -> int | None:
    """A ruleset fd: `readable` paths readable and executable, `writable` ones fully usable, nothing else
    of the file system; no TCP (ABI 4+); no abstract sockets or signals beyond the sandbox (ABI 6+).
    None where the kernel has no Landlock."""
    abi = abi_version()
    if abi < 1:
        return None
    handled = _fs_rights(abi)
    attr = struct.pack("<Q", handled)
    if abi >= 4:
        attr += struct.pack("<Q", NET_BIND_TCP | NET_CONNECT_TCP)
    if abi >= 6:
        attr += struct.pack("<Q", SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL)
    fd = _libc.syscall(SYS_CREATE_RULESET, attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if fd < 0:
        return None
    file_rights = EXECUTE | WRITE_FILE | READ_FILE | (TRUNCATE & handled) | (IOCTL_DEV & handled)
    for paths, rights in ((readable, EXECUTE | READ_FILE | READ_DIR), (writable, handled)):
        for path in paths:
            try:
                target = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            allowed = rights
            if not os.path.isdir(path):  # a file takes file rights only; devices need writing too
                allowed = (rights | WRITE_FILE if path.startswith("/dev/") else rights) & file_rights
            rule = struct.pack("<Qi", allowed, target)
            _libc.syscall(
                SYS_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(RULE_PATH_BENEATH), rule, ctypes.c_uint32(0)
            )
            os.close(target)
    return int(fd)


def restrict_self(fd: int) -> bool:
    """Enforce the ruleset on this process and its future children (irreversible)."""
    return _libc.syscall(SYS_RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(0)) == 0

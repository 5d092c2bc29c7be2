"""Sandbox worker start-up: claim an unprivileged uid, enter network and mount namespaces, lock the tree.

Stdlib only: it runs inside the sandbox worker (`_sandbox_worker.py`, started as `python -I`), once
per worker, before the worker starts its zygote (`_zygote.py`), which inherits all of it. What it
obtained is reported by `Isolation.capabilities()`; each mechanism is used only where the platform
allows it (a container without CAP_SYS_ADMIN gets no namespaces, a non-root user no uid drop), and
the worker falls back as `_sandbox_worker` describes.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from . import _linux
except ImportError:  # loaded as a top-level module by a script run with -I (see _sandbox_worker.py)
    import _linux

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_MOVE = 1, 2, 4, 8, 32, 4096, 8192
MS_REC, MS_PRIVATE = 16384, 1 << 18
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 1
libc, errno_name, kill_uid, unshare = _linux.libc, _linux.errno_name, _linux.kill_uid, _linux.unshare


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> bool:
    enc = lambda s: None if s is None else s.encode()
    return libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) == 0


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
            libc.syscall(
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


def python_paths() -> list[str]:
    """The interpreter's directories and import paths: what a program needs to read to import modules."""
    paths = {sys.base_prefix, sys.prefix, sys.exec_prefix, os.path.dirname(sys.executable)}
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    paths.update(os.path.realpath(p) for p in list(paths))
    return sorted(paths)


def worker_paths() -> list[str]:
    """What the worker and its zygote must still reach inside the mount namespace: the interpreter's
    paths and this package's directory (the zygote is exec'd from it; `-I` keeps it off sys.path)."""
    return sorted({*python_paths(), os.path.dirname(os.path.abspath(__file__))})


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
    needed = worker_paths()
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


def _expose_python(uid: int) -> str:
    """Make the interpreter and its import paths reachable by the sandbox uid; "" or what failed.

    An interpreter under a private directory (pyenv in /root, mode 0700) is unreadable once the program
    runs as an unprivileged uid. In the worker's own mount namespace, cover each blocking directory with
    a traversable tmpfs holding only the needed subdirectories, moved back in as bind mounts.
    """
    for _ in range(8):  # nested private directories: one level per round
        blocked = _blocked_ancestors(worker_paths(), uid)
        if not blocked:
            return ""
        for ancestor, children in blocked.items():
            stash = tempfile.mkdtemp(dir="/tmp")
            kept = [c for c in sorted(children) if os.path.isdir(os.path.join(ancestor, c))]
            for child in kept:
                os.mkdir(os.path.join(stash, child))
                if not _mount(
                    os.path.join(ancestor, child), os.path.join(stash, child), None, MS_BIND | MS_REC
                ):
                    return f"bind-mounting {ancestor}/{child} failed ({errno_name()})"
            if not _mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755"):
                return f"covering the private directory {ancestor} failed ({errno_name()})"
            for child in kept:
                os.mkdir(os.path.join(ancestor, child))
                if not _mount(os.path.join(stash, child), os.path.join(ancestor, child), None, MS_MOVE):
                    return f"moving {ancestor}/{child} back failed ({errno_name()})"
    return "more than 8 nested private directories"


def unreadable_by(uid: int, paths: list[str]) -> list[str]:
    """The `paths` that `uid` cannot list, tried for real in a child that became `uid`.

    A real attempt rather than a permission computation: ACLs, nested private directories, a
    directory that is itself private, and what the mount namespace shows all count.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            denied = []
            for path in paths:
                try:
                    os.listdir(path)
                except OSError:
                    denied.append(path)
            os.write(w, json.dumps(denied).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data) if data else list(paths)


def probe(fn: Callable[[], Any]) -> bool:
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


class Isolation:
    """What this worker obtained at start-up; filled by `setup`."""

    def __init__(self) -> None:
        self.uid: int | None = None
        self.uid_lock: int | None = None
        self.net_namespace = self.mount_namespace = self.readonly_root = self.pid_namespace = False
        self.tmp_root = tempfile.gettempdir()
        self.private_shm = False
        self.own_pid_ns: int | None = None
        self.no_mount_namespace = ""  # why there is none (or why exposing Python in it failed)
        self.python_unreadable: list[str] = []

    def setup(self, uid_base: int, network: bool, tmpfs_bytes: int, namespaces: bool) -> None:
        if os.geteuid() != 0:
            self.no_mount_namespace = "the worker is not root"
        else:
            claimed = _claim_uid(uid_base)
            if claimed and probe(lambda: (os.setgroups([]), os.setgid(claimed[0]), os.setuid(claimed[0]))):
                self.uid, self.uid_lock = claimed
                kill_uid(self.uid)  # leftovers of a previous holder of this uid that was itself killed
            if not network and namespaces:
                self.net_namespace = unshare(_linux.CLONE_NEWNET)
            if not namespaces:
                self.no_mount_namespace = "namespaces=False was requested"
            elif not unshare(_linux.CLONE_NEWNS):
                self.no_mount_namespace = f"unshare(CLONE_NEWNS) failed ({errno_name()}; needs CAP_SYS_ADMIN)"
            # Private propagation first, so nothing below leaks into the host's mount table.
            elif not _mount(None, "/", None, MS_REC | MS_PRIVATE):
                self.no_mount_namespace = f"making the mount namespace private failed ({errno_name()})"
            else:
                self.mount_namespace = True
            if self.mount_namespace:
                self._setup_mounts(tmpfs_bytes)
        self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY) if namespaces else None
        if self.uid is not None:
            self.python_unreadable = unreadable_by(self.uid, python_paths())
        self.pid_namespace = namespaces and probe(self.fresh_pid_namespace)

    def _setup_mounts(self, tmpfs_bytes: int) -> None:
        # A scratch tmpfs for _expose_python's bind mounts, later covered by the real private /tmp. It must
        # stay traversable (0711): with 0700, a checkout or venv under /tmp would make /tmp itself a
        # "blocked ancestor" that _expose_python covers, hiding the stash it works from (the zygote's
        # interpreter then vanished: FileNotFoundError at exec, every job failed).
        _mount_private_tmpfs("/tmp", "size=1m,mode=0711")
        if self.uid is not None:
            failed = _expose_python(self.uid)
            if failed:
                self.no_mount_namespace = f"exposing it in the worker's mount namespace failed: {failed}"
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

    def fresh_pid_namespace(self) -> bool:
        """Whether a child can be made PID 1 of a fresh namespace (see `_linux.fresh_pid_namespace`)."""
        return _linux.fresh_pid_namespace(self.own_pid_ns)

    def capabilities(self) -> dict[str, Any]:
        """Which mechanisms are in force; `python_unreadable` lists import paths the programs cannot
        read (as found by trying), with `python_note` saying why no mount namespace exposed them."""
        caps = {
            "root": os.geteuid() == 0,
            "uid_drop": self.uid is not None,
            "uid": self.uid,
            "pid_namespace": self.pid_namespace,
            "net_namespace": self.net_namespace,
            "mount_namespace": self.mount_namespace,
            "readonly_root": self.readonly_root,
            "private_tmp": self.mount_namespace and self.tmp_root == "/tmp",
            "python_readable": not self.python_unreadable,
            "python_unreadable": self.python_unreadable,
        }
        if self.python_unreadable:
            caps["python_note"] = self.no_mount_namespace or (
                "the mount namespace made every private parent directory traversable, but these paths "
                f"themselves deny uid {self.uid}"
            )
        return caps

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
    from . import _cgroup, _landlock, _linux
except ImportError:  # loaded as a top-level module by a script run with -I (see _sandbox_worker.py)
    import _cgroup
    import _landlock
    import _linux

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_MOVE = 1, 2, 4, 8, 32, 4096, 8192
MS_REC, MS_PRIVATE, MNT_DETACH = 16384, 1 << 18, 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine, 155)
DEVICES = ("null", "zero", "full", "random", "urandom")
# Readable in the fallback (no mount namespace), besides the interpreter's paths: programs and libraries.
SYSTEM_DIRS = ("/usr", "/bin", "/lib", "/lib64", "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
# All the environment a sandbox worker starts with (the pool passes nothing else of the caller's).
SCRUBBED_ENV_KEYS = ("PATH", "LANG", "LC_ALL")
libc, errno_name, kill_uid, unshare = _linux.libc, _linux.errno_name, _linux.kill_uid, _linux.unshare


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> bool:
    enc = lambda s: None if s is None else s.encode()
    return libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) == 0


def python_paths() -> list[str]:
    """The interpreter's directories and import paths: what a program needs to read to import modules."""
    paths = {sys.base_prefix, sys.prefix, sys.exec_prefix, os.path.dirname(sys.executable)}
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    paths.update(os.path.realpath(p) for p in list(paths))
    return sorted(paths)


def worker_paths() -> list[str]:
    """What the worker and its zygote must still reach in the new root: the interpreter's paths and
    this package's directory (the zygote is exec'd from it; `-I` keeps it off sys.path)."""
    return sorted({*python_paths(), os.path.dirname(os.path.abspath(__file__))})


def _sources() -> list[str]:
    """What the new root shows, read-only: the interpreter, its import paths, the system's programs and
    libraries (/usr) and this package's directory (the zygote is exec'd from it). Nested entries are
    dropped: a recursive bind of the parent already holds them. Nothing else of the host: no project
    tree, no home directory, no /etc, no /run, no host /proc."""
    wanted = {"/usr", *(p for p in worker_paths() if not p.endswith(".zip"))}
    wanted = {os.path.realpath(p) for p in wanted if os.path.isdir(p)} | {
        p for p in wanted if os.path.isdir(p)
    }
    kept: list[str] = []
    for path in sorted(wanted):
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def _bind_readonly(fd: int, target: str) -> bool:
    """Bind the directory open as `fd` (O_PATH) at `target`, then make that bind read-only."""
    if not _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC):
        return False
    return _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _build_root(root: str, tmpfs_bytes: int, sources: dict[str, int], devices: dict[str, int]) -> str:
    """Populate the tmpfs at `root` with what a program may see; "" or what failed.

    `sources` and `devices` were opened (O_PATH) before anything was mounted, so that a source below a
    directory that gets covered (a checkout or venv under /tmp) stays reachable. Directories created
    here are 0755 on our own tmpfs: an interpreter below a private directory (pyenv in /root, mode 0700)
    is reachable by the sandbox uid without exposing anything else of that directory.
    """
    for name in ("bin", "lib", "lib32", "lib64", "libx32", "sbin"):  # merged-/usr symlinks
        if os.path.islink(f"/{name}"):
            os.symlink(os.readlink(f"/{name}"), f"{root}/{name}")
    # The writable /tmp first: a source below /tmp (a CI checkout, a venv) is then bound on top of it.
    for path, opts in (("/tmp", f"size={tmpfs_bytes},mode=0755"), ("/dev", "size=64k,mode=0755")):
        os.makedirs(root + path, mode=0o755, exist_ok=True)
        if not _mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NOEXEC, opts):
            return f"mounting a tmpfs on {path} failed ({errno_name()})"
    for path, fd in sources.items():
        os.makedirs(root + path, mode=0o755, exist_ok=True)
        if not _bind_readonly(fd, root + path):
            return f"bind-mounting {path} failed ({errno_name()})"
    for name, fd in devices.items():
        open(f"{root}/dev/{name}", "w").close()
        if not _mount(f"/proc/self/fd/{fd}", f"{root}/dev/{name}", None, MS_BIND):
            return f"binding /dev/{name} failed ({errno_name()})"
    os.mkdir(f"{root}/dev/shm", 0o1777)
    if not _mount(
        "tmpfs", f"{root}/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=16m,mode=1777"
    ):
        return f"mounting a tmpfs on /dev/shm failed ({errno_name()})"
    for path in ("/proc", "/etc", "/var"):
        os.makedirs(root + path, mode=0o755, exist_ok=True)
    # A /proc of its own that shows a program only its own job's processes: `hidepid=invisible` hides
    # every process a viewer may not ptrace (other uids, and the non-dumpable tests' process), and
    # `subset=pid` hides the system-wide files (/proc/sys, ...). Once per worker: a /proc mounted per
    # job in the job's PID namespace doubled the median job time (its teardown is slow). Without
    # those options (kernels before 5.8) there is no /proc at all.
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    _mount("proc", f"{root}/proc", "proc", flags, "hidepid=invisible,subset=pid")
    os.symlink("/tmp", f"{root}/var/tmp")
    return ""


def _pivot(root: str) -> str:
    """Make `root` the process's `/` and drop the host's tree entirely; "" or what failed."""
    os.chdir(root)
    if libc.syscall(SYS_PIVOT_ROOT, b".", b".") != 0:
        return f"pivot_root failed ({errno_name()})"
    if libc.umount2(b".", MNT_DETACH) != 0:  # the old root, stacked under the new one
        return f"detaching the old root failed ({errno_name()})"
    os.chdir("/")
    # The root itself read-only (its writable mounts, /tmp and /dev/shm, stay writable).
    _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return ""


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
        self.net_namespace = self.mount_namespace = self.minimal_root = self.pid_namespace = False
        self.private_proc = False
        self.tmp_root = tempfile.gettempdir()
        self.no_mount_namespace = ""  # why there is none (or why building the new root failed)
        self.python_unreadable: list[str] = []
        self.own_pid_ns: int | None = None
        self.cgroup = _cgroup.JobCgroup(None)
        self.landlock_ruleset: int | None = None  # fallback only: see `_landlock.py`

    def setup(self, uid_base: int, network: bool, tmpfs_bytes: int, namespaces: bool) -> None:
        if os.geteuid() != 0:
            self.no_mount_namespace = "the worker is not root"
        else:
            claimed = _claim_uid(uid_base)
            if claimed and probe(lambda: (os.setgroups([]), os.setgid(claimed[0]), os.setuid(claimed[0]))):
                self.uid, self.uid_lock = claimed
                kill_uid(self.uid)  # leftovers of a previous holder of this uid that was itself killed
                self.cgroup = _cgroup.JobCgroup.create(f"filtered-rl-sandbox-{self.uid}")
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
        # Opened while the host's /proc is still there: the zygote needs it to make PID namespaces.
        self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY) if namespaces else None
        self.pid_namespace = namespaces and probe(self.fresh_pid_namespace)
        if self.mount_namespace:
            failed = self._enter_minimal_root(tmpfs_bytes)
            if failed:
                self.no_mount_namespace = f"building the sandbox's root failed: {failed}"
        if not self.minimal_root:
            # The worker's own directory for its jobs' working directories (root's, traversable): with
            # Landlock, the only place a program may write.
            self.tmp_root = tempfile.mkdtemp(prefix="filtered-rl-sandbox-")
            os.chmod(self.tmp_root, 0o711)
            self.landlock_ruleset = _landlock.ruleset(
                readable=[*python_paths(), *SYSTEM_DIRS], writable=[self.tmp_root]
            )
        if self.uid is not None:
            self.python_unreadable = unreadable_by(self.uid, python_paths())

    def _enter_minimal_root(self, tmpfs_bytes: int) -> str:
        # The new root is a tmpfs mounted over /tmp (an always-present directory); sources are opened
        # before it covers anything.
        root = tempfile.gettempdir()
        sources = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in _sources()}
        devices = {d: os.open(f"/dev/{d}", os.O_PATH) for d in DEVICES if os.path.exists(f"/dev/{d}")}
        try:
            if not _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755"):
                return f"mounting the root tmpfs failed ({errno_name()})"
            failed = _build_root(root, tmpfs_bytes, sources, devices) or _pivot(root)
        finally:
            for fd in (*sources.values(), *devices.values()):
                os.close(fd)
        if not failed:
            self.minimal_root, self.tmp_root = True, "/tmp"
            self.private_proc = os.path.exists("/proc/self/maps")
        return failed

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
            "private_proc": self.private_proc,
            "net_namespace": self.net_namespace,
            "mount_namespace": self.mount_namespace,
            "minimal_root": self.minimal_root,
            "private_tmp": self.minimal_root,
            "landlock": self.landlock_ruleset is not None,
            "memory_cgroup": self.cgroup.limits_memory,
            "pids_cgroup": self.cgroup.limits_pids,
            "scrubbed_environment": set(os.environ) <= set(SCRUBBED_ENV_KEYS),
            "python_readable": not self.python_unreadable,
            "python_unreadable": self.python_unreadable,
        }
        if self.python_unreadable:
            caps["python_note"] = self.no_mount_namespace or (
                "the sandbox's root made every private parent directory traversable, but these paths "
                f"themselves deny uid {self.uid}"
            )
        return caps

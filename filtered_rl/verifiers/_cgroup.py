"""One cgroup per sandbox worker: a memory and a process cap on a job as a whole. Stdlib only.

Why: rlimits are per process (RLIMIT_AS) or per uid (RLIMIT_NPROC), so a job of 32 processes of 1 GiB
each could take 32 GiB of the host. A worker runs one job at a time, so a cgroup per worker, which
every harness joins before it runs anything, caps the job's processes together (memory, including
the files it writes to its private tmpfs, and the number of processes). The kernel's OOM killer then
acts inside the job only.

cgroup v2 is used where the worker's own cgroup can delegate the memory and pids controllers; else
the v1 `memory` and `pids` hierarchies (hybrid hosts, such as this project's CI). Either is optional:
`limits_memory` / `limits_pids` say what is in force, and the pool reports them as capabilities.
The directory is named after the worker's claimed uid, so a restarted worker reuses it (no growth).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["JobCgroup"]


def _own_cgroups() -> dict[str, str]:
    """controller (or "" for v2) -> this process's path in that hierarchy."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _mounts() -> dict[str, str]:
    """ "" -> the cgroup2 mount point; "memory" / "pids" -> their v1 mount points."""
    found: dict[str, str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fstype, _, options = after.split(" ", 2)
        mount_point = before.split()[4]
        if fstype == "cgroup2":
            found.setdefault("", mount_point)
        elif fstype == "cgroup":
            for controller in ("memory", "pids"):
                if controller in options.split(","):
                    found.setdefault(controller, mount_point)
    return found


def _write(path: Path, value: str) -> bool:
    try:
        path.write_text(value)
        return True
    except OSError:
        return False


class JobCgroup:
    """Handles on the cgroup(s) of one worker; `procs_fds` are what a harness writes "0" to, to join."""

    def __init__(self, dirs: dict[str, Path] | None):
        self.dirs = dirs or {}
        self.memory_file = self.pids_file = None
        if "" in self.dirs:  # v2
            self.memory_file, self.pids_file = self.dirs[""] / "memory.max", self.dirs[""] / "pids.max"
            _write(self.dirs[""] / "memory.swap.max", "0")
        else:
            if "memory" in self.dirs:
                self.memory_file = self.dirs["memory"] / "memory.limit_in_bytes"
            if "pids" in self.dirs:
                self.pids_file = self.dirs["pids"] / "pids.max"
        self.limits_memory = bool(self.memory_file and self.memory_file.exists())
        self.limits_pids = bool(self.pids_file and self.pids_file.exists())
        self.procs_fds = [os.open(d / "cgroup.procs", os.O_WRONLY) for d in self.dirs.values()]
        self._applied: tuple[int, int] | None = None

    @classmethod
    def create(cls, name: str) -> JobCgroup:
        """The cgroup `name` below this process's own, made if needed; an empty handle where none can be."""
        try:
            own, mounts = _own_cgroups(), _mounts()
            if "" in mounts and "" in own:
                parent = Path(mounts[""] + own[""])
                available = (parent / "cgroup.controllers").read_text().split()
                if {"memory", "pids"} <= set(available):
                    enabled = (parent / "cgroup.subtree_control").read_text().split()
                    if {"memory", "pids"} <= set(enabled) or _write(
                        parent / "cgroup.subtree_control", "+memory +pids"
                    ):
                        (parent / name).mkdir(exist_ok=True)
                        return cls({"": parent / name})
            dirs = {}
            for controller in ("memory", "pids"):
                if controller in mounts and controller in own:
                    directory = Path(mounts[controller] + own[controller].rstrip("/")) / name
                    directory.mkdir(exist_ok=True)
                    dirs[controller] = directory
            return cls(dirs)
        except OSError:
            return cls(None)

    def apply(self, memory_bytes: int, max_processes: int) -> None:
        """Set the caps for the next job (written only when they change)."""
        if self._applied == (memory_bytes, max_processes):
            return
        if self.limits_memory:
            files = [self.memory_file]
            memsw = self.memory_file.with_name("memory.memsw.limit_in_bytes")  # v1: no swapping around it
            if memsw.exists():
                files.append(memsw)
            # v1 wants memory <= memory+swap at every moment: lower memory first, raise memsw first.
            if not all(_write(f, str(memory_bytes)) for f in files):
                all(_write(f, str(memory_bytes)) for f in reversed(files))
        if self.limits_pids:
            _write(self.pids_file, str(max_processes))
        self._applied = (memory_bytes, max_processes)

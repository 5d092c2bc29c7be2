"""Process helpers for tests: run a multi-process launch (accelerate / torchrun) bounded in time, on a
free port; check whether a process is still alive.

The launch gets its own session, so that on timeout the launcher *and* its worker processes are killed:
`subprocess.run(timeout=...)` kills only the launcher and leaves a hung worker running after the test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (for tests that check nothing outlives a call)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def free_port() -> int:
    """A free local TCP port for the launcher's rendezvous (`--main_process_port`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launch(
    command: list[str], *, env: dict, cwd=None, timeout: float = 300
) -> subprocess.CompletedProcess:
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(
            f"{command[:4]}… did not exit within {timeout} s; last output:\n{stdout[-2000:]}\n{stderr[-2000:]}"
        )
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

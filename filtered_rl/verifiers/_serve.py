"""The helper side of `pool.py`'s protocol: die with the parent, say hello, answer one line per line.

Stdlib only and deliberately light (no `threading`, no package imports): the sandbox worker loads this
file by path into the process it forks every program from, and each module imported there is paid
for again in every fork (`threading` alone adds ~120 page faults to each one, see `_sandbox_worker`).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> bool:
    """Have the kernel SIGKILL this process when its parent goes; False if the parent already went.

    Stdin EOF would tell us too, but only while idle: a helper busy in C code must not outlive it.
    """
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return os.getppid() == parent_pid


def serve(
    handle: Callable[[dict[str, Any]], dict[str, Any]],
    hello: dict[str, Any],
    on_error: Callable[[BaseException], dict[str, Any]],
) -> None:
    """Answer requests from stdin until EOF: `handle(request)`, or `on_error(exc)` if it raises.

    The protocol channel is a private copy of stdout; fd 1 and `sys.stdout` then point at stderr, so
    that a stray print (ours, a library's) cannot corrupt a reply.
    """
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    send(hello)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            reply = {"pong": True} if request.get("ping") else handle(request)
        except BaseException as exc:  # MemoryError, RecursionError, a bug: the helper must stay up
            reply = on_error(exc)
        send(reply)

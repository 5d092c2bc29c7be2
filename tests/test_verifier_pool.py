"""The generic helper-process pool (`filtered_rl.verifiers.pool`) and its helper side (`_serve`), with a
toy helper: what the sandbox and the math verifier both rely on."""

from __future__ import annotations

import os
import sys
import time

import pytest
from _launch import alive

from filtered_rl.verifiers.pool import WorkerPool

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="helpers die with the parent via prctl")

HELPER = """
import os, sys, time
from filtered_rl.verifiers._serve import die_with_parent, serve

def handle(request):
    if "sleep" in request:
        time.sleep(request["sleep"])
    if request.get("print"):
        print("stray output that must not reach the protocol channel")
    if request.get("raise"):
        raise ValueError("asked to")
    return {"echo": request.get("echo"), "pid": os.getpid()}

if os.environ.get("FRL_TEST_CRASH_AT_START"):
    os._exit(3)
if die_with_parent(int(sys.argv[-1])):
    serve(handle, {"ready": True, "pid": os.getpid()}, lambda exc: {"error": type(exc).__name__})
"""


@pytest.fixture
def pool():
    pool = WorkerPool([sys.executable, "-c", HELPER], size=2, startup_timeout=60)
    yield pool
    pool.close()


def test_replies_come_back_in_request_order_from_several_helpers(pool):
    replies = pool.map([{"echo": i, "sleep": 0.05 * (i % 3), "print": i % 2 == 0} for i in range(12)], 30)
    assert [r["echo"] for r in replies] == list(range(12))
    assert len({r["pid"] for r in replies}) == 2  # both helpers served
    assert pool.call({"raise": True}, 30) == {"error": "ValueError"}  # the helper stays up
    assert pool.call({"echo": "again"}, 30)["echo"] == "again"


def test_a_missed_deadline_kills_the_helper_and_starts_its_replacement_at_once():
    pool = WorkerPool([sys.executable, "-c", HELPER], size=1, startup_timeout=60)
    try:
        first = pool.call({"echo": 1}, 30)["pid"]
        started = time.monotonic()
        assert pool.call({"sleep": 60}, deadline_s=0.5) is None
        assert time.monotonic() - started < 5
        replacement = pool.pids()
        # Spawned already (its imports overlap whatever the caller does next), not on the next call.
        assert len(replacement) == 1 and replacement[0] != first
        deadline = time.monotonic() + 5
        while alive(first) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(first), "the helper that missed its deadline is still running"
        assert pool.call({"echo": 2}, 30) == {"echo": 2, "pid": replacement[0]}
    finally:
        pool.close()


def test_a_helper_that_dies_at_start_is_reported_as_such(monkeypatch):
    monkeypatch.setenv("FRL_TEST_CRASH_AT_START", "1")
    pool = WorkerPool([sys.executable, "-c", HELPER], size=1, startup_timeout=60)
    try:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="exited with code 3"):
            pool.call({"echo": 1}, 30)
        assert time.monotonic() - started < 30  # an EOF, not a wait for the start-up timeout
    finally:
        pool.close()


def test_close_kills_every_helper(pool):
    pool.start_all()
    pids = pool.pids()
    assert len(pids) == 2 and all(alive(p) for p in pids)
    pool.close()
    assert pool.pids() == [] and not any(alive(p) for p in pids)
    assert os.getpid() not in pids


def test_pool_size_is_validated():
    with pytest.raises(ValueError, match="size"):
        WorkerPool([sys.executable, "-c", HELPER], size=0)
